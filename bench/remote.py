#!/usr/bin/env python3
"""Local disk vs an S3-compatible bucket: the same stages, outputs (and inputs) in either.

A figure, not a test. Starts moto's S3 server in a process of its own on loopback (an
S3-compatible store with no network between: what it shows is silverlabel's own cost of
staging, uploading per file and checking records, not a cloud's latency or bandwidth), makes
``--n`` photo-like JPEGs, then times with ``--workers`` worker processes:

1. ingest of the image folder to a local pool, and to ``s3://bench/pool``;
2. select (every sample) and shard of each pool to a training set beside it;
3. ingest from the folder uploaded to the bucket (``s3://bench/photos``) to the bucket.

Prints a markdown table (images/s and the bucket's share of the local rate) and appends it,
with the command and the machine, to ``--markdown FILE``.

    .venv/bin/python bench/remote.py --n 2000 --workers 2 --markdown BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--samples-per-shard", type=int, default=250)
    ap.add_argument("--markdown")
    args = ap.parse_args()
    w, h = (int(x) for x in args.size.split("x"))
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_DEFAULT_REGION="us-east-1")
    root = Path(tempfile.mkdtemp(prefix="silverlabel-remote-"))
    try:
        import s3fs

        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        client = s3fs.S3FileSystem()
        client.mkdir("bench")
        from silverlabel.demodata import photo_like_images
        from silverlabel.stages.ingest import IngestConfig, run_ingest
        from silverlabel.stages.select import SelectConfig, run_select
        from silverlabel.stages.shard import ShardConfig, run_shard

        photos = root / "photos"
        photos.mkdir()
        for i, (name, data) in enumerate(photo_like_images(args.n, size=(w, h), seed=1)):
            (photos / f"{i:06d}_{name}").write_bytes(data)
        client.put(str(photos) + "/", "bench/photos/", recursive=True)
        rows = []

        def timed(what: str, fn) -> float:
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            print(f"{what}: {dt:.1f} s, {args.n / dt:.0f} img/s", flush=True)
            return args.n / dt

        def ingest(src: str, out: str) -> None:
            run_ingest(IngestConfig(sources=(src,), output=out, samples_per_shard=args.samples_per_shard,
                                    workers=args.workers))

        def select_shard(pool: str, sel: str, ts: str) -> None:
            run_select(SelectConfig(pool, sel, val_per_class=0))
            run_shard(ShardConfig(selection=sel, output=ts, shards=max(1, args.n // args.samples_per_shard),
                                  workers=args.workers))

        local = {k: str(root / k) for k in ("pool", "sel", "ts")}
        bucket = {k: f"s3://bench/{k}" for k in ("pool", "sel", "ts")}
        rows.append(("ingest: image folder -> pool", timed("ingest local", lambda: ingest(str(photos), local["pool"])),
                     timed("ingest to bucket", lambda: ingest(str(photos), bucket["pool"]))))
        rows.append(("select + shard: pool -> training set",
                     timed("select+shard local", lambda: select_shard(local["pool"], local["sel"], local["ts"])),
                     timed("select+shard bucket", lambda: select_shard(bucket["pool"], bucket["sel"], bucket["ts"]))))
        rows.append(("ingest: image folder in the bucket -> pool in the bucket", rows[0][1],
                     timed("ingest bucket to bucket", lambda: ingest("s3://bench/photos", "s3://bench/pool2"))))
    finally:
        server.terminate()
        shutil.rmtree(root, ignore_errors=True)
    lines = ["| stage | local img/s | bucket img/s | bucket / local |", "|---|---:|---:|---:|"]
    lines += [f"| {what} | {a:.0f} | {b:.0f} | {b / a:.2f} |" for what, a, b in rows]
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(f"\n### local disk vs an S3-compatible bucket ({time.strftime('%Y-%m-%d')})\n\n"
                    f"Command: `python bench/remote.py --n {args.n} --workers {args.workers} --size {args.size}`; "
                    f"{os.cpu_count()} cores, Python {platform.python_version()}, moto's S3 server on loopback "
                    f"(no network: silverlabel's own cost of staging, uploading per file and checking records).\n\n"
                    f"{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
