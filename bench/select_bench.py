#!/usr/bin/env python3
"""``select`` benchmarks. A figure, not a test.

``table``: ``select`` over a synthetic COYO-Labeled-300M table of ``--n`` rows (top-50
labels, long-tailed classes) in ``--files`` parquet files: the imagenet-12k class rule, a 1%
balanced subset, and a threshold + in1k remap, each timed in a fresh process with its peak
memory; ``--units shards`` runs one unit per file (what ``--engine ray`` runs) on the local
engine::

    .venv/bin/python bench/select_bench.py table --n 10000000 --workdir /tmp/bsel
    .venv/bin/python bench/select_bench.py table --n 10000000 --files 16 --units shards --workdir /tmp/bsel

``near-dup``: near-duplicate search over 64-bit pHashes (``silverlabel.dedupe``):

1. **Pool.** ``--n`` uniformly random 64-bit hashes, of which a fraction ``--plant``
   are replaced by near copies of other pool hashes (1..D random bits flipped), so the
   true answer contains every planted (source, copy) pair.
2. **dedupe.** Times ``dedupe_keep_first(pool, D)`` (exact multi-index search, clusters,
   keep-first) and checks recall on the planted pairs (must be 100%: source and copy in
   one cluster). Pairs among the random hashes are rare but real: their expected number,
   ``n^2/2 * P(Binomial(64, 1/2) <= D)``, is printed next to what was found.
3. **near_any.** For each ``--refs`` size: a reference set whose first half are near
   copies (1..D bits) of pool hashes and second half random; times ``near_any(pool, ref,
   D)`` and checks that every copied pool hash is flagged.
4. **Brute force.** Times the exact all-pairs comparison (numpy, blocks of ~10^6 pairs,
   popcount of xor) on a sample of ``--brute-sample`` hashes and extrapolates to the
   ``n(n-1)/2`` pairs of the pool (and ``n * refs`` for ``near_any``).

Wall and CPU seconds (process time, all threads), and peak resident memory
(``ru_maxrss``) after each step. Usage::

    .venv/bin/python bench/select_bench.py near-dup --n 10000000 --d 8 --markdown BENCHMARKS.md
"""

from __future__ import annotations

import os
import sys


import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shlex  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
try:
    from silverlabel import dedupe
except ImportError:  # a checkout without the package installed
    sys.path.insert(0, str(REPO / "src"))
    from silverlabel import dedupe


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def flip_bits(h: np.ndarray, nbits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each ``h[i]`` with ``nbits[i]`` distinct random bits flipped (in blocks: bounded memory)."""
    out = h.copy()
    one = np.uint64(1)
    for a in range(0, len(h), 1 << 18):
        nb = nbits[a:a + (1 << 18)]
        cols = np.argsort(rng.random((len(nb), 64)), axis=1)[:, : int(nb.max(initial=0))]
        mask = np.zeros(len(nb), np.uint64)
        for k in range(cols.shape[1]):
            on = nb > k
            mask[on] |= one << cols[on, k].astype(np.uint64)
        out[a:a + len(nb)] ^= mask
    return out


def make_pool(n: int, d: int, plant: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hashes, source index, copy index): ``plant * n`` hashes are 1..d-bit copies of others."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    k = int(n * plant)
    pos = rng.permutation(n)[: 2 * k]
    src, cp = pos[:k], pos[k:]
    h[cp] = flip_bits(h[src], rng.integers(1, max(d, 1) + 1, k), rng)
    return h, src, cp


def expected_random_pairs(n: int, d: int) -> float:
    """Expected pairs within d among n uniform random 64-bit hashes."""
    p = sum(math.comb(64, k) for k in range(d + 1)) / 2.0**64
    return n * (n - 1) / 2 * p


def time_brute_force(sample: np.ndarray, d: int) -> float:
    """Seconds per pair of the exact all-pairs comparison (blocked numpy) on ``sample``."""
    t0 = time.perf_counter()
    dedupe._brute_self(np.unique(sample), d)
    s = len(sample)
    return (time.perf_counter() - t0) / (s * (s - 1) / 2)


def _timed(fn, *args, **kw) -> tuple[Any, float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0, time.process_time() - c0


def bench_near_duplicates(n: int = 10_000_000, d: int = 8, refs: tuple[int, ...] = (10_000, 100_000),
                          plant: float = 0.01, seed: int = 0, workers: int | None = None,
                          brute_sample: int = 20_000) -> dict[str, Any]:
    """Run the near-duplicate benchmark; returns a dict of results (see the module docstring)."""
    res: dict[str, Any] = {"n": n, "d": d, "plant": plant, "seed": seed, "workers": workers,
                           "numpy": np.__version__}
    log(f"pool: {n:,} hashes, {plant:.1%} planted 1..{d}-bit copies")
    t0 = time.perf_counter()
    h, src, cp = make_pool(n, d, plant, seed)
    res["gen_s"] = time.perf_counter() - t0
    res["rss_pool_mib"] = _rss_mib()
    res["plan"] = [(len(c.bits), c.radius) for c in (dedupe._plan(n, n, d, True) or [])]
    log(f"plan (chunk bits, radius): {res['plan'] or 'all pairs'}")

    (keep, dup_of), wall, cpu = _timed(dedupe.dedupe_keep_first, h, d, workers=workers)
    root = np.where(keep, np.arange(n), dup_of)
    recall = float(np.mean(root[src] == root[cp])) if len(src) else 1.0
    res["dedupe"] = {"wall_s": wall, "cpu_s": cpu, "removed": int((~keep).sum()), "planted": len(src),
                     "recall": recall, "expected_random_pairs": expected_random_pairs(n, d),
                     "rss_mib": _rss_mib()}
    log(f"dedupe_keep_first: {wall:.1f} s wall, {cpu:.1f} s CPU, removed {(~keep).sum():,} "
        f"(planted {len(src):,}, random pairs expected {expected_random_pairs(n, d):.0f}), "
        f"recall {recall:.4%}, peak RSS {_rss_mib():.0f} MiB")
    del keep, dup_of, root

    rng = np.random.default_rng(seed + 1)
    res["near_any"] = []
    for r in refs:
        k = r // 2
        hit_src = rng.integers(0, n, k)
        ref = np.concatenate([flip_bits(h[hit_src], rng.integers(1, max(d, 1) + 1, k), rng),
                              rng.integers(0, 2**64, r - k, dtype=np.uint64, endpoint=False)])
        (mask, idx), wall, cpu = _timed(dedupe.near_any, h, ref, d, workers=workers)
        rec = float(mask[hit_src].mean()) if k else 1.0
        ok_idx = bool((dedupe.hamming(h[mask], ref[idx[mask]]) <= d).all())
        row = {"refs": r, "wall_s": wall, "cpu_s": cpu, "flagged": int(mask.sum()), "copied": int(len(set(hit_src))),
               "recall": rec, "index_ok": ok_idx, "rss_mib": _rss_mib()}
        res["near_any"].append(row)
        log(f"near_any vs {r:,} refs: {wall:.1f} s wall, {cpu:.1f} s CPU, flagged {mask.sum():,} "
            f"(copied {row['copied']:,}), recall {rec:.4%}, peak RSS {_rss_mib():.0f} MiB")

    s = min(brute_sample, n)
    per_pair = time_brute_force(h[:s], d)
    res["brute"] = {"sample": s, "ns_per_pair": per_pair * 1e9,
                    "dedupe_s": per_pair * n * (n - 1) / 2,
                    "near_any_s": [per_pair * n * r for r in refs]}
    log(f"brute force: {per_pair * 1e9:.2f} ns/pair on {s:,} hashes -> dedupe "
        f"{per_pair * n * (n - 1) / 2 / 3600:.1f} h, near_any "
        + ", ".join(f"{per_pair * n * r:.0f} s" for r in refs))
    res["rss_peak_mib"] = _rss_mib()
    return res


def _fmt_s(x: float) -> str:
    if x >= 86400:
        return f"{x / 86400:.1f} days"
    if x >= 3600:
        return f"{x / 3600:.1f} h"
    if x >= 60:
        return f"{x / 60:.1f} min"
    return f"{x:.2f} s" if x < 10 else f"{x:.1f} s"


def machine() -> str:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{len(os.sched_getaffinity(0))}-core {cpu} VM, {mem:.1f} GiB, Python {platform.python_version()}, "
            f"numpy {np.__version__}")


NEAR_DUP_INTRO = """\
`silverlabel.dedupe`: exact multi-index hashing (chunks of the 64 bits, flip patterns within
each chunk's radius, popcount verification; see the module docstring) against the exact
all-pairs comparison. `dedupe_keep_first` = all pairs within D, connected components, keep one
per cluster (what `select --dedupe phash:D` runs); `near_any` = pool hashes within D of a
reference set (`select --exclude-near`). Recall is over the planted copies and must be 100%;
the random pairs found are compared with their expected number (an exactness check at scale).
"""


def _commit() -> str:
    import subprocess

    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "src/silverlabel/dedupe.py"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + (" + uncommitted dedupe.py" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def near_dup_markdown(res: dict[str, Any], command: str) -> str:
    n, d = res["n"], res["d"]
    dd = res["dedupe"]
    lines = [
        f"Command: `{command}`. Machine: {machine()}; workers={res['workers'] or 'all cores'}. "
        f"Commit {_commit()}, {_dt.datetime.now():%Y-%m-%d %H:%M}.",
        "",
        f"Pool: {n:,} uniform random 64-bit hashes, {res['plant']:.0%} of them replaced by 1..{d}-bit copies "
        f"of others. Plan (chunk bits, radius): {res['plan'] or 'all pairs'}.",
        "",
        "| step | wall | CPU | result | recall | brute force (extrapolated) | speed-up | peak RSS |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
        f"| `dedupe_keep_first(pool, {d})` | {_fmt_s(dd['wall_s'])} | {_fmt_s(dd['cpu_s'])} | "
        f"{dd['removed']:,} removed ({dd['planted']:,} planted + {dd['removed'] - dd['planted']:,} random; "
        f"{dd['expected_random_pairs']:,.0f} random pairs expected) | {dd['recall']:.2%} | "
        f"{_fmt_s(res['brute']['dedupe_s'])} | {res['brute']['dedupe_s'] / dd['wall_s']:,.0f}x | "
        f"{dd['rss_mib']:,.0f} MiB |",
    ]
    for row, bs in zip(res["near_any"], res["brute"]["near_any_s"]):
        lines.append(
            f"| `near_any(pool, {row['refs']:,} refs, {d})` | {_fmt_s(row['wall_s'])} | {_fmt_s(row['cpu_s'])} | "
            f"{row['flagged']:,} flagged ({row['copied']:,} copied) | {row['recall']:.2%} | {_fmt_s(bs)} | "
            f"{bs / row['wall_s']:,.0f}x | {row['rss_mib']:,.0f} MiB |")
    lines += [
        "",
        f"Brute force: {res['brute']['ns_per_pair']:.2f} ns/pair measured on {res['brute']['sample']:,} hashes "
        f"(all {res['brute']['sample'] ** 2 // 2:,} pairs, blocked numpy xor+popcount), times n(n-1)/2 or "
        f"n x refs. Peak RSS includes the pool itself ({res['rss_pool_mib']:,.0f} MiB after generating it; "
        f"`ru_maxrss` is a running maximum).",
    ]
    return "\n".join(lines) + "\n"


# --- select over a synthetic COYO-Labeled-300M table ---------------------------------------


def make_coyo_table(path: str, n: int, k: int = 50, classes: int = 21841, seed: int = 0, chunk: int = 1_000_000,
                    first_id: int = 0) -> None:
    """A COYO-Labeled-300M-schema parquet of ``n`` rows (top-``k`` labels, ids from
    ``first_id``), written in chunks."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    # a long-tailed class popularity, as web data has
    pop = 1.0 / np.arange(1, classes + 1) ** 0.8
    pop /= pop.sum()
    schema = pa.schema([("id", pa.int64()), ("url", pa.string()), ("imagehash", pa.string()),
                        ("labels", pa.list_(pa.int32())), ("label_probs", pa.list_(pa.float32())),
                        ("width", pa.int32()), ("height", pa.int32())])
    with pq.ParquetWriter(path, schema, compression="zstd") as w:
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            top1 = rng.choice(classes, size=m, p=pop).astype(np.int32)
            rest = rng.integers(0, classes, size=(m, k - 1), dtype=np.int32)
            labels = np.concatenate([top1[:, None], rest], 1).reshape(-1)
            p = rng.dirichlet(np.full(k, 0.3), size=m).astype(np.float32)
            p = -np.sort(-p, axis=1)
            offsets = pa.array(np.arange(0, (m + 1) * k, k, dtype=np.int32))
            ids = np.arange(first_id + start, first_id + start + m, dtype=np.int64)
            hashes = rng.integers(0, 2**63, size=m, dtype=np.int64).astype(np.uint64)
            w.write_table(pa.table({
                "id": ids, "url": pa.array([f"https://img.example/{i}.jpg" for i in ids]),
                "imagehash": pa.array([f"{h:016x}" for h in hashes.tolist()]),
                "labels": pa.ListArray.from_arrays(offsets, pa.array(labels)),
                "label_probs": pa.ListArray.from_arrays(offsets, pa.array(p.reshape(-1))),
                "width": np.full(m, 640, np.int32), "height": np.full(m, 480, np.int32),
            }, schema=schema))


def bench_select(n: int = 10_000_000, k: int = 50, workdir: str | None = None, files: int = 1,
                 units: str = "pool") -> dict:
    """Time + peak memory of three selects over an n-row COYO-schema table (``files``
    parquet files), each in a fresh process. ``units``: ``pool`` (one unit, what ``--engine
    local`` runs) or ``shards`` (one unit per file on the local engine with 2 workers: the
    units ``--engine ray`` runs, without a cluster)."""
    import json
    import os
    import subprocess
    import sys
    import tempfile
    import time

    work = workdir or tempfile.mkdtemp(prefix="sl-bench-select-")
    table = os.path.join(work, "coyo.parquet" if files == 1 else f"coyo-{files}")
    if not os.path.exists(table):
        t0 = time.perf_counter()
        if files == 1:
            make_coyo_table(table, n, k)
        else:
            os.makedirs(table)
            for i in range(files):
                make_coyo_table(os.path.join(table, f"part-{i:05d}.parquet"), n // files, k, seed=i,
                                first_id=i * (n // files))
        print(f"generated {n} rows (top-{k}, {files} files) in {time.perf_counter() - t0:.0f} s", flush=True)
    runs = {
        "imagenet-12k rule (top 11821 classes, 40 val, min 400 train)":
            dict(top_classes=11821, val_per_class=40, min_train_per_class=400),
        "1% balanced subset": dict(fraction=0.01, balanced=True, min_train_per_class=100),
        "min-prob 0.3 + remap to in1k": dict(min_prob=0.3, label_space="in1k"),
    }
    run_args = "dict(per_shard=True, workers=2)" if units == "shards" else "dict()"
    results = {}
    for name, opts in runs.items():
        out = os.path.join(work, f"sel-{units}-{len(results)}")
        code = ("import resource, sys, time; from silverlabel.stages.select import SelectConfig, run_select; "
                "t0 = time.perf_counter(); "
                f"run_select(SelectConfig({table!r}, {out!r}, threads=2, **{opts!r}), **{run_args}); "
                "print('RESULT', time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
                "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT")]
        if p.returncode or not line:
            raise RuntimeError(f"{name} failed:\n{p.stdout}\n{p.stderr}")
        _, secs, rss, child_rss = line[0].split()
        rows = json.load(open(os.path.join(out, "report.json")))
        results[name] = {"seconds": float(secs), "peak_rss_mib": max(int(rss), int(child_rss)) / 1024,
                         "selected": rows["selected_rows"], "splits": rows["splits"], "classes": rows["classes"]}
        print(name, results[name], flush=True)
    return {"rows": n, "k": k, "files": files, "units": units, "table": table, "runs": results}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="bench", required=True)
    nd = sub.add_parser("near-dup", help="near-duplicate search over pHashes (silverlabel.dedupe)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    nd.add_argument("--n", type=float, default=10_000_000, help="pool size")
    nd.add_argument("--d", type=int, default=dedupe.DEFAULT_MAX_DISTANCE, help="max Hamming distance")
    nd.add_argument("--refs", default="10000,100000", help="reference-set sizes for near_any, comma-separated")
    nd.add_argument("--plant", type=float, default=0.01, help="fraction of the pool that are near copies")
    nd.add_argument("--seed", type=int, default=0)
    nd.add_argument("--workers", type=int, default=None, help="threads (default: all cores)")
    nd.add_argument("--brute-sample", type=int, default=20_000, help="hashes timed for the brute-force estimate")
    nd.add_argument("--markdown", type=Path, default=None, help="append a results section to this file")
    tb = sub.add_parser("table", help="select rules over a synthetic COYO-Labeled-300M table (time, peak memory)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    tb.add_argument("--n", type=float, default=10_000_000, help="rows")
    tb.add_argument("--k", type=int, default=50, help="labels per row (COYO: 50)")
    tb.add_argument("--workdir", default=None, help="keep the generated table here (reused when present)")
    tb.add_argument("--files", type=int, default=1, help="parquet files the table is cut into")
    tb.add_argument("--units", choices=("pool", "shards"), default="pool",
                    help="one unit of the whole pool (--engine local) or one per file (the --engine ray units)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python bench/select_bench.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    if args.bench == "table":
        import json

        print(json.dumps(bench_select(int(args.n), args.k, args.workdir, args.files, args.units), indent=2))
        return 0
    if args.bench == "near-dup":
        refs = tuple(int(float(x)) for x in args.refs.split(",") if x.strip())
        res = bench_near_duplicates(n=int(args.n), d=args.d, refs=refs, plant=args.plant, seed=args.seed,
                                    workers=args.workers, brute_sample=args.brute_sample)
        md = near_dup_markdown(res, command)
        print(md)
        ok = res["dedupe"]["recall"] == 1.0 and all(r["recall"] == 1.0 and r["index_ok"] for r in res["near_any"])
        if args.markdown is not None:
            with open(args.markdown, "a") as fh:
                fh.write(f"\n## select — near-duplicate search over pHashes (n = {res['n']:,}, D = {res['d']}, "
                         f"2-core CPU machine)\n\n{NEAR_DUP_INTRO}\n" + md)
            log(f"appended to {args.markdown}")
        if not ok:
            log("RECALL BELOW 100%: the search missed planted pairs")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
