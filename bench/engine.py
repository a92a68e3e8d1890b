#!/usr/bin/env python3
"""Engine scaling: ``--engine ray`` against the local engine, same machine, same work.

A figure, not a test. Two measurements:

1. **ingest** images/s with W = ``--workers`` (default 1 4 8 16) workers, the local engine
   (W spawned processes) against the Ray engine (W tasks at once on a Ray cluster of this
   machine, started here with max(W, cores) CPUs, or ``--ray-address``), fetching ``--n``
   photo-like JPEGs from loopback image servers (``--servers`` separate processes,
   ``tests/fixtures/imageserver.ImageServerProcess``) through ``run_ingest`` in this process. Every run
   writes a fresh dataset; the two engines' outputs are compared byte for byte.
2. **label** images/s on one GPU (or the CPU with ``--label-device cpu``): the local
   engine's worker (``workers=1``: the labeler in this process) against one Ray actor
   (``num_gpus=1``) running the same ``label_shard``, end to end (teacher load included,
   for both), over ``--label-images`` images in shards of ``--label-shard-size``; the
   label files are compared too.

    python bench/engine.py --n 8000 --workers 1 4 8 16 --label-images 16000 --markdown BENCHMARKS.md
    python bench/engine.py --n 200 --workers 1 2 --label-images 64 --label-device cpu   # a CPU smoke run

Prints a markdown table (and appends it, with the command and the machine, to
``--markdown``). See bench/README.md (how to carry Ray to the benchmark machine).
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if p and os.path.abspath(p) != _HERE]  # bench/ itself is not a package path

import argparse  # noqa: E402
import hashlib  # noqa: E402
import importlib.util  # noqa: E402
import multiprocessing as mp  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(_HERE).parent
SRC = REPO / "src"
try:
    import silverlabel  # noqa: F401
except ImportError:  # a checkout without the package installed
    sys.path.insert(0, str(SRC))


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _bench_ingest_module():
    """bench/ingest.py (pool generation, machine description), loaded by path (bench/ is
    kept off sys.path)."""
    if "bench_ingest" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_ingest", Path(_HERE) / "ingest.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["bench_ingest"] = mod  # its pool workers (fork) unpickle functions by this name
        spec.loader.exec_module(mod)
    return sys.modules["bench_ingest"]


def digest(root: Path, subs: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for sub in subs:
        for p in sorted((root / sub).rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def start_ray(args, max_workers: int) -> str:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # workers started by a cluster of this machine inherit this environment: make sure they
    # import this checkout's silverlabel even when it is not installed
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)
    import ray

    if ray.is_initialized():
        pass
    elif args.ray_address:
        ray.init(address=args.ray_address, logging_level="WARNING")
    else:
        ray.init(num_cpus=max(max_workers, os.cpu_count() or 1), include_dashboard=False, logging_level="WARNING")
    res = ray.cluster_resources()
    return f"Ray {ray.__version__}, cluster {int(res.get('CPU', 0))} CPUs, {int(res.get('GPU', 0))} GPUs"


# ---------------------------------------------------------------------------------------
# ingest


def ingest_once(urls: Path, out: Path, engine: str, workers: int, args) -> tuple[float, int]:
    from silverlabel.sources.http import FetchConfig
    from silverlabel.stages.ingest import IngestConfig, run_ingest

    if out.exists():
        shutil.rmtree(out)
    cfg = IngestConfig(sources=(str(urls),), output=str(out), samples_per_shard=args.samples_per_shard,
                       fetch=FetchConfig(timeout=30, retries=1, allow_private_network=True), workers=workers, engine=engine,
                       ray_address=args.ray_address)
    t0 = time.perf_counter()
    s = run_ingest(cfg)
    return time.perf_counter() - t0, s.counts.get("success", 0)


def bench_ingest(args, engines: list[str], out: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    bi = _bench_ingest_module()  # puts tests/ (the server-in-a-process fixture) on sys.path
    from fixtures.imageserver import ImageServerProcess, as_served_files

    w, h = (int(x) for x in args.size.lower().split("x"))
    t0 = time.perf_counter()
    pool = bi.make_pool(args.n, (w, h), args.seed, os.cpu_count() or 1)
    log(f"pool: {len(pool)} JPEGs, {sum(len(b) for _, b in pool) / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s")
    files = as_served_files(pool)
    servers = [ImageServerProcess(files).start() for _ in range(args.servers)]  # fork before Ray starts
    try:
        urls = [servers[i % len(servers)].url(name) for i, (name, _) in enumerate(pool)]
        table = out / "urls.parquet"
        pq.write_table(pa.table({"url": urls}), table)
        n_warm = min(len(urls), max(100, 25 * max(args.workers)))
        warm = out / "urls-warm.parquet"
        pq.write_table(pa.table({"url": urls[:n_warm]}), warm)
        ray_info = start_ray(args, max(args.workers)) if "ray" in engines else ""
        for engine in engines:  # untimed: page cache, .pyc, Ray worker processes, server threads
            ingest_once(warm, out / f"warm-{engine}", engine, max(args.workers), args)
        rows = []
        for workers in args.workers:
            times: dict[str, list[float]] = {e: [] for e in engines}
            ok: dict[str, int] = {}
            digests: dict[str, str] = {}
            for _ in range(args.repeat):
                for engine in engines:
                    dst = out / f"ingest-{engine}"
                    sec, n_ok = ingest_once(table, dst, engine, workers, args)
                    times[engine].append(sec)
                    ok[engine] = n_ok
                    digests[engine] = digest(dst, ("shards", "samples"))
                    log(f"ingest {engine:5s} W={workers:2d}: {n_ok} images in {sec:.2f} s = {n_ok / sec:.0f} images/s")
            rate = {e: ok[e] / statistics.median(times[e]) for e in engines}
            same = "yes" if len(set(digests.values())) == 1 else "NO"
            rows.append((workers, rate, same, min(ok.values())))
    finally:
        for s in servers:
            s.stop()
    lines = [f"ingest: {args.n} photo-like {args.size} JPEGs over loopback ({args.servers} server processes), "
             f"{args.samples_per_shard} per shard, median of {args.repeat}; {ray_info}", "",
             "| workers | " + " | ".join(f"{e} images/s" for e in engines)
             + (" | ray / local | identical outputs |" if len(engines) == 2 else " |"),
             "|---:|" + "---:|" * len(engines) + ("---:|---|" if len(engines) == 2 else "")]
    for workers, rate, same, n_ok in rows:
        cells = " | ".join(f"{rate[e]:.0f}" for e in engines)
        extra = f" | {rate['ray'] / rate['local']:.2f} | {same} |" if len(engines) == 2 else " |"
        lines.append(f"| {workers} | {cells}{extra}")
    return lines


# ---------------------------------------------------------------------------------------
# label


def build_label_dataset(root: Path, n: int, shard_size: int) -> Path:
    from silverlabel.demodata import photo_like_images
    from silverlabel.stages.ingest import IngestConfig, run_ingest

    folder = root / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    pool = list(photo_like_images(min(n, 500), size=(640, 480), seed=11))
    for i in range(n):
        name, data = pool[i % len(pool)]
        (folder / f"{i:06d}_{name}").write_bytes(data)
    ds = root / "ds"
    run_ingest(IngestConfig(sources=(str(folder),), output=str(ds), samples_per_shard=shard_size,
                            workers=os.cpu_count() or 1))
    return ds


def bench_label(args, engines: list[str], out: Path) -> list[str]:
    from silverlabel.stages import label as label_stage
    from silverlabel.stages.label import LabelConfig, run_label
    from silverlabel.teachers import TeacherSpec

    ds = build_label_dataset(out / "label", args.label_images, args.label_shard_size)
    ray_info = start_ray(args, 1) if "ray" in engines else ""
    spec = TeacherSpec.parse(args.teacher)
    results = {}
    for engine in engines:
        label_stage.close_labelers()  # the local run loads its teacher too
        cfg = LabelConfig(dataset=str(ds), teachers=(spec,), device=args.label_device, workers=1, engine=engine,
                          ray_address=args.ray_address, output_name=f"bench-{engine}", batch_size=args.batch_size)
        t0 = time.perf_counter()
        s = run_label(cfg)
        sec = time.perf_counter() - t0
        results[engine] = (s.images_now / sec, sec, s.images_now, digest(ds / "labels" / f"bench-{engine}", (".",)))
        log(f"label {engine:5s}: {s.images_now} images in {sec:.1f} s = {s.images_now / sec:.0f} images/s "
            f"({s.device})")
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.label_device != "cpu" else "CPU"
    same = "yes" if len({r[3] for r in results.values()}) == 1 else "no"
    if same == "no" and dev == "CPU":  # bit-identical on the CPU only for the same torch thread count
        same = "no (CPU: torch threads differ, in-process vs the actor's 1)"
    lines = [f"label: {args.teacher} on {dev}, {args.label_images} photo-like 640x480 JPEGs in shards of "
             f"{args.label_shard_size}, end to end (teacher load included); {ray_info}", "",
             "| engine | images/s | seconds | identical labels |", "|---|---:|---:|---|"]
    for engine, (rate, sec, _n, _d) in results.items():
        what = "local (labeler in-process)" if engine == "local" else "ray (one actor, num_gpus=1)"
        if args.label_device == "cpu" and engine == "ray":
            what = "ray (one actor, CPU)"
        lines.append(f"| {what} | {rate:.0f} | {sec:.1f} | {same} |")
    return lines


def machine() -> str:
    try:
        desc = _bench_ingest_module().machine_description()
    except Exception:
        desc = f"{os.cpu_count()} CPUs, Python {platform.python_version()}"
    try:
        import torch

        if torch.cuda.is_available():
            desc += f"; {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    except ImportError:
        pass
    return desc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8000, help="ingest: images (8000)")
    ap.add_argument("--size", default="640x480", help="ingest: image size (640x480)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 4, 8, 16], help="ingest: worker counts (1 4 8 16)")
    ap.add_argument("--samples-per-shard", type=int, default=0, help="ingest: default n / (4 x max workers), >= 25")
    ap.add_argument("--servers", type=int, default=0, help="image server processes (default: 1, 4 from 8 workers)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per point, median reported (1)")
    ap.add_argument("--engines", nargs="+", default=["local", "ray"], choices=["local", "ray"])
    ap.add_argument("--label-images", type=int, default=16000, help="label: images; 0 skips the label part (16000)")
    ap.add_argument("--label-shard-size", type=int, default=2000, help="label: images per shard (2000)")
    ap.add_argument("--label-device", default="auto", help="label: auto | cuda | cpu (auto)")
    ap.add_argument("--teacher", default="efficientnet_lite0")
    ap.add_argument("--batch-size", type=int, default=0, help="label batch (0: 256 on GPU, 16 on CPU)")
    ap.add_argument("--skip-ingest", action="store_true")
    ap.add_argument("--ray-address", default=None, help="join this cluster instead of starting one here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="keep outputs here (default: a temp dir, removed)")
    ap.add_argument("--markdown", type=Path, help="append the tables to this file")
    args = ap.parse_args()
    if not args.samples_per_shard:
        args.samples_per_shard = max(25, args.n // (4 * max(args.workers)))
    if not args.servers:
        args.servers = 4 if max(args.workers) >= 8 else 1
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-engine-"))
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    try:
        if not args.skip_ingest:
            lines += bench_ingest(args, args.engines, out)
        if args.label_images:
            lines += [""] + bench_label(args, args.engines, out)
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        cmd = "python bench/engine.py " + shlex.join(sys.argv[1:])
        stamp = time.strftime("%Y-%m-%d %H:%M")
        with open(args.markdown, "a") as f:
            f.write(f"\n## engine — local vs Ray ({stamp})\n\nCommand: `{cmd}`. Machine: {machine()}.\n\n{text}\n")
    return 0


if __name__ == "__main__":
    mp.freeze_support()
    raise SystemExit(main())
