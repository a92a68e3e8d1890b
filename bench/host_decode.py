"""How the host JPEG decode scales with processes on this machine (issue 15).

``label --decode host`` decodes in ``--host-procs`` processes. On the lent H200 (16 cores)
14 of them decoded 6.0-7.5k 640x480 JPEGs/s, ~430-530 per process, while one core of the
2-core development VM does ~920 with the same call. This bench separates the machine from
the stage: N spawned processes, nothing else running, each decoding the same in-memory
JPEGs with the stage's call (``augment.decode_rgb_array``: simplejpeg, Pillow's settings)
into a buffer of its own, for a fixed time; images/s in all and per process, for each N.
It also prints the CPU topology (a "core" that is a hyperthread sibling does ~half).

    python bench/host_decode.py --procs 1 2 4 8 14 16 --seconds 3
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def topology() -> dict:
    """CPU model, logical CPUs usable here, and how many logical CPUs share a physical core."""
    info: dict = {"logical": os.cpu_count(), "usable": len(os.sched_getaffinity(0))}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = set()
    for cpu in sorted(os.sched_getaffinity(0)):
        p = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((p / "physical_package_id").read_text().strip(), (p / "core_id").read_text().strip()))
        except OSError:
            return info
    info["physical_cores"] = len(cores)
    return info


def _worker(blobs: list[bytes], kind: str, seconds: float, start, out) -> None:
    import numpy as np

    from silverlabel.augment import decode_rgb_array

    buf = np.empty(4 << 20, np.uint8)
    buf[:] = 0  # touched, so no page faults in the timed part

    def alloc(shape):
        return buf[:shape[0] * shape[1] * shape[2]].reshape(shape)

    def one(data: bytes) -> None:
        if kind == "simplejpeg":
            decode_rgb_array(data, alloc)
        else:
            from PIL import Image
            import io

            with Image.open(io.BytesIO(data)) as im:
                im.convert("RGB").load()

    for data in blobs[:8]:  # warm-up: imports, first calls
        one(data)
    start.wait()
    t0 = time.perf_counter()
    c0 = time.process_time()
    n = 0
    while time.perf_counter() - t0 < seconds:
        one(blobs[n % len(blobs)])
        n += 1
    out.put((n, time.perf_counter() - t0, time.process_time() - c0))


def rate(blobs: list[bytes], procs: int, kind: str, seconds: float) -> dict:
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(procs + 1), ctx.Queue()
    ps = [ctx.Process(target=_worker, args=(blobs[i::procs] or blobs, kind, seconds, start, out)) for i in range(procs)]
    for p in ps:
        p.start()
    start.wait()
    got = [out.get() for _ in ps]
    for p in ps:
        p.join()
    per = [n / wall for n, wall, _ in got]
    return {"procs": procs, "img_s": round(sum(per), 1), "per_proc": round(sum(per) / procs, 1),
            "cpu_share": round(sum(cpu for _, _, cpu in got) / sum(wall for _, wall, _ in got), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4, 8, 14, 16])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--images", type=int, default=256, help="distinct 640x480 JPEGs, cycled")
    ap.add_argument("--kinds", default="simplejpeg", help="comma list: simplejpeg, pillow")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from silverlabel.demodata import photo_like_images

    blobs = [data for _, data in photo_like_images(args.images, size=(640, 480), seed=11)]
    res = {"topology": topology(), "rows": []}
    print(json.dumps(res["topology"]), flush=True)
    for kind in args.kinds.split(","):
        for n in args.procs:
            row = {"kind": kind, **rate(blobs, n, kind, args.seconds)}
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
