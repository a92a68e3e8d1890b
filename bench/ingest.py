#!/usr/bin/env python3
"""Ingest throughput: silverlabel vs img2dataset vs the in-process kernel.

A figure, not a test. Everything runs on this machine over loopback:

1. make a pool: N photo-like JPEGs of ``--size`` (``silverlabel.demodata``), or with
   ``--pool mixed`` a web-like one (long sides 200..2,000 px, aspect 0.5..2, ~10%
   PNG/WebP/gray/CMYK, ~1% truncated, ~1% 404s); serve it from a separate process
   (``ImageServerProcess``) and write the URL list as ``urls.parquet`` and ``urls.txt``;
2. time ``silverlabel ingest urls.parquet -o OUT/silverlabel --workers W
   --samples-per-shard 250 --no-progress`` (wall clock and CPU of the whole command);
3. time img2dataset (its own venv, ``bench/.venv-img2dataset``, created on
   first use) on the same URLs with matching settings (keep_ratio, shortest
   edge 600 only if bigger, JPEG q90, webdataset, 250 per shard, W processes);
4. time two in-process kernels over the same bytes already in memory, W worker
   processes, no network, no writing: the *limit* with the libraries silverlabel uses
   (libjpeg-turbo decode with DCT-domain reduction, OpenCV resize, libjpeg-turbo encode,
   nothing else) and silverlabel's own ``process_image`` (orientation, colour, pHash,
   sha256 included), whose CPU time is split by stage;
5. measure where silverlabel's CPU goes per image (read, sha256, header, decode,
   resize, encode, hash, tar, parquet), one step after the other in one process, and the
   kernel's share per kind of input (format, mode, resize factor);
6. print markdown tables (and append them, with the command and a machine
   description, to ``--markdown FILE``).

Usage::

    .venv/bin/python bench/ingest.py --n 2000 --workers 2 --markdown BENCHMARKS.md

See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import multiprocessing as mp
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
I2D_VENV = BENCH / ".venv-img2dataset"
I2D_REQUIREMENTS = BENCH / "requirements-img2dataset.txt"
IMAGE_EXTS = {"jpg", "jpeg", "png", "webp"}

try:
    from silverlabel import demodata
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(REPO / "src"))
    from silverlabel import demodata
sys.path.append(str(REPO / "tests"))  # the server-in-a-process fixture, shared with the tests
from fixtures.imageserver import ImageServerProcess, as_served_files  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# pool generation (parallel, deterministic)
# ---------------------------------------------------------------------------


def _gen_chunk(args: tuple[int, int, int, int, int]) -> list[tuple[str, bytes]]:
    start, count, w, h, seed = args
    return list(demodata.photo_like_images(count, size=(w, h), seed=seed, start=start))


def make_pool(n: int, size: tuple[int, int], seed: int, procs: int) -> list[tuple[str, bytes]]:
    chunk = 50
    tasks = [(s, min(chunk, n - s), size[0], size[1], seed) for s in range(0, n, chunk)]
    if procs <= 1:
        return [item for t in tasks for item in _gen_chunk(t)]
    with mp.get_context("fork").Pool(procs) as pool:
        return [item for part in pool.imap(_gen_chunk, tasks) for item in part]


def _gen_mixed(args: tuple[int, int, int]) -> list[tuple[str, bytes | None]]:
    """Images ``start .. start+count-1`` of the web-like pool; ``None``: a URL that 404s."""
    import numpy as np
    from PIL import Image

    start, count, seed = args
    out: list[tuple[str, bytes | None]] = []
    for i in range(start, start + count):
        rng = np.random.default_rng([seed, i])
        long_side = int(rng.uniform(200, 2000))
        ratio = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))  # width / height
        w, h = (long_side, max(1, round(long_side / ratio))) if ratio >= 1 else (max(1, round(long_side * ratio)), long_side)
        (_, jpg), = demodata.photo_like_images(1, size=(w, h), seed=seed, start=i)
        u = rng.uniform()
        name, data = f"img_{i:05d}.jpg", jpg
        if u < 0.03:
            buf = io.BytesIO()
            Image.open(io.BytesIO(jpg)).save(buf, "PNG", compress_level=6)
            name, data = f"img_{i:05d}.png", buf.getvalue()
        elif u < 0.06:
            buf = io.BytesIO()
            Image.open(io.BytesIO(jpg)).save(buf, "WEBP", quality=90)
            name, data = f"img_{i:05d}.webp", buf.getvalue()
        elif u < 0.08:
            buf = io.BytesIO()
            Image.open(io.BytesIO(jpg)).convert("L").save(buf, "JPEG", quality=90)
            data = buf.getvalue()
        elif u < 0.10:
            buf = io.BytesIO()
            Image.open(io.BytesIO(jpg)).convert("CMYK").save(buf, "JPEG", quality=90)
            data = buf.getvalue()
        elif u < 0.11:
            data = jpg[: len(jpg) // 2]  # truncated: a decode failure
        elif u < 0.12:
            data = None  # missing: the server answers 404
        out.append((name, data))
    return out


def make_mixed_pool(n: int, seed: int, procs: int) -> list[tuple[str, bytes | None]]:
    """A web-like pool: long sides 200..2,000 px, aspect ratios 0.5..2, ~10% PNG/WebP/gray/
    CMYK, ~1% truncated JPEGs and ~1% URLs that 404."""
    chunk = 25
    tasks = [(s, min(chunk, n - s), seed) for s in range(0, n, chunk)]
    if procs <= 1:
        return [item for t in tasks for item in _gen_mixed(t)]
    with mp.get_context("fork").Pool(procs) as pool:
        return [item for part in pool.imap(_gen_mixed, tasks) for item in part]


# ---------------------------------------------------------------------------
# URL tables
# ---------------------------------------------------------------------------


def write_url_lists(urls: list[str], directory: Path) -> tuple[Path, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    parquet = directory / "urls.parquet"
    txt = directory / "urls.txt"
    pq.write_table(pa.table({"url": pa.array(urls, pa.string())}), parquet)
    txt.write_text("".join(u + "\n" for u in urls))
    return parquet, txt


# ---------------------------------------------------------------------------
# counting webdataset output
# ---------------------------------------------------------------------------


def count_wds_images(directory: Path) -> tuple[int, int, int]:
    """(#samples with an image member, #tar shards, image bytes) under ``directory``."""
    keys: set[str] = set()
    shards = 0
    nbytes = 0
    for tar_path in sorted(directory.rglob("*.tar")):
        shards += 1
        try:
            with tarfile.open(tar_path) as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    base, _, ext = m.name.rpartition(".")
                    if ext.lower() in IMAGE_EXTS:
                        keys.add(f"{tar_path}:{base}")
                        nbytes += m.size
        except (tarfile.TarError, OSError) as exc:
            log(f"warning: cannot read {tar_path}: {exc}")
    return len(keys), shards, nbytes


def i2d_stats(directory: Path) -> dict[str, int]:
    tot: dict[str, int] = {}
    for p in directory.glob("*_stats.json"):
        try:
            st = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        for k in ("count", "successes", "failed_to_download", "failed_to_resize"):
            tot[k] = tot.get(k, 0) + int(st.get(k, 0) or 0)
    return tot


# ---------------------------------------------------------------------------
# subprocess runner
# ---------------------------------------------------------------------------


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def proc_cpu_seconds(pid: Optional[int]) -> float:
    """user+system CPU seconds of a live process (all its threads), from /proc."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def run_timed(cmd: list[str], log_path: Path, env: Optional[dict] = None,
              timeout: float = 3600) -> tuple[float, int, float]:
    """Run ``cmd``; return (wall seconds, exit code, CPU seconds of it and its
    reaped descendants)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cpu0 = _children_cpu()
    with open(log_path, "wb") as fh:
        fh.write(("$ " + shlex.join(cmd) + "\n").encode())
        fh.flush()
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                  stdin=subprocess.DEVNULL, timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = -9
            fh.write(f"\n[bench] killed after {timeout}s\n".encode())
        dt = time.perf_counter() - t0
    return dt, rc, _children_cpu() - cpu0


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------
# silverlabel
# ---------------------------------------------------------------------------


def compile_checkout() -> None:
    """Compile this checkout's modules to bytecode before timing. An installed package has
    them compiled (pip does, as it did img2dataset's); a checkout run with
    ``PYTHONDONTWRITEBYTECODE=1`` (this machine's environment) would otherwise compile every
    module changed since its last ``.pyc`` in the driver and in the fork server, on every run
    (~40 ms of a run here). (A ``--silverlabel`` command run from elsewhere: compile it there.)"""
    import compileall

    compileall.compile_dir(str(REPO / "src" / "silverlabel"), quiet=1)
    log("compiled src/silverlabel to bytecode (as an installed package is)")


def silverlabel_command(args: argparse.Namespace) -> Optional[list[str]]:
    if args.silverlabel:
        return shlex.split(args.silverlabel)
    exe = Path(sys.executable).parent / "silverlabel"
    if exe.exists():
        return [str(exe)]
    venv_exe = REPO / ".venv" / "bin" / "silverlabel"
    if venv_exe.exists():
        return [str(venv_exe)]
    if (REPO / "src" / "silverlabel" / "cli.py").exists():
        return [sys.executable, "-m", "silverlabel.cli"]
    return None


def run_silverlabel(base_cmd: list[str], urls_parquet: Path, out: Path, args, tag: str) -> dict[str, Any]:
    if out.exists():
        shutil.rmtree(out)
    cmd = base_cmd + [
        "ingest", str(urls_parquet), "-o", str(out),
        "--workers", str(args.workers),
        "--samples-per-shard", str(args.samples_per_shard),
        "--min-side", "48", "--max-shortest-edge", str(args.max_edge),
        "--quality", str(args.quality),
        "--timeout", str(args.timeout),
        "--no-progress",
        "--allow-private-network",  # the pool is served on loopback
    ] + shlex.split(args.silverlabel_extra)
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", str(REPO / "src"))
    dt, rc, cpu = run_timed(cmd, out.parent / "logs" / f"silverlabel-{tag}.log", env=env,
                            timeout=args.run_timeout)
    ok, shards, nbytes = count_wds_images(out)
    return {"seconds": dt, "rc": rc, "cpu": cpu, "successes": ok, "shards": shards, "out_bytes": nbytes,
            "cmd": cmd,
            "log": out.parent / "logs" / f"silverlabel-{tag}.log"}


# ---------------------------------------------------------------------------
# img2dataset (own venv)
# ---------------------------------------------------------------------------

I2D_RUNNER = """
import json, sys
cfg = json.loads(sys.argv[1])
from img2dataset import download
download(**cfg)
"""


def _find_i2d_python(explicit: Optional[str]) -> str:
    """img2dataset imports ``imghdr`` (removed in Python 3.13): need <= 3.12."""
    if explicit:
        return explicit
    if sys.version_info < (3, 13):
        return sys.executable
    for name in ("python3.12", "python3.11", "python3.10"):
        p = shutil.which(name)
        if p:
            return p
    raise SystemExit("img2dataset needs Python <= 3.12 (it imports imghdr); pass --i2d-python")


def ensure_i2d_venv(python: str) -> Path:
    py = I2D_VENV / "bin" / "python"
    if py.exists():
        probe = subprocess.run([str(py), "-c", "import img2dataset"], capture_output=True,
                               env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
        if probe.returncode == 0:
            return py
    log(f"creating {I2D_VENV} with {python} and installing img2dataset (one-off, a few minutes)")
    subprocess.run([python, "-m", "venv", "--clear", str(I2D_VENV)], check=True)
    pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["--upgrade", "pip"], check=True)
    subprocess.run(pip + ["-r", str(I2D_REQUIREMENTS)], check=True)
    return py


def i2d_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "NO_ALBUMENTATIONS_UPDATE": "1",   # albumentations phones home on import otherwise
        "WANDB_MODE": "disabled",
        "WANDB_DISABLED": "true",
        "WANDB_SILENT": "true",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    })
    env.pop("PYTHONPATH", None)
    return env


def i2d_config(url_txt: Path, out: Path, args) -> dict[str, Any]:
    return {
        "url_list": str(url_txt),
        "input_format": "txt",
        "output_folder": str(out),
        "output_format": "webdataset",
        "processes_count": args.workers,
        "thread_count": args.i2d_threads,
        "distributor": "multiprocessing",
        "number_sample_per_shard": args.samples_per_shard,
        "resize_mode": "keep_ratio",
        "image_size": args.max_edge,
        "resize_only_if_bigger": True,
        "encode_quality": args.quality,
        "encode_format": "jpg",
        # silverlabel keeps the bytes of an RGB JPEG that needs no resize
        # (imageops passthrough); skip_reencode=True is img2dataset's same rule
        "skip_reencode": not args.i2d_reencode_all,
        "disable_all_reencoding": False,
        "min_image_size": 48,
        "timeout": args.timeout,
        "retries": 0,
        "enable_wandb": False,
        "compute_hash": None,        # no hashing extras
        "extract_exif": False,       # no exif extras (cheaper for img2dataset)
        "disallowed_header_directives": ["noai", "noimageai"],  # same as silverlabel
        # output dir is removed before each run; "overwrite" is broken in
        # 1.47.0 (it deletes its own _tmp dir right after creating it)
        "incremental_mode": "incremental",
    }


def run_i2d(py: Path, url_txt: Path, out: Path, args, tag: str) -> dict[str, Any]:
    if out.exists():
        shutil.rmtree(out)
    cfg = i2d_config(url_txt, out, args)
    cmd = [str(py), "-c", I2D_RUNNER, json.dumps(cfg)]
    logp = out.parent / "logs" / f"img2dataset-{tag}.log"
    dt, rc, cpu = run_timed(cmd, logp, env=i2d_env(), timeout=args.run_timeout)
    ok, shards, nbytes = count_wds_images(out)
    st = i2d_stats(out)
    return {"seconds": dt, "rc": rc, "cpu": cpu, "successes": ok, "shards": shards, "out_bytes": nbytes,
            "stats": st,
            "cmd": cmd, "config": cfg, "log": logp}


# ---------------------------------------------------------------------------
# in-process kernels: the limit with the same libraries, and silverlabel's own
# ---------------------------------------------------------------------------

_KERNEL_IMAGES: list[bytes] = []
KERNEL_LIBS = "kernel limit: libjpeg-turbo + OpenCV, decode→resize→encode, nothing else"
KERNEL_SL = "kernel: silverlabel process_image, in process"
STAGES = ("sha256", "header", "decode", "resize", "encode", "hash")


def _libs_one(raw: bytes, max_edge: int, quality: int) -> int:
    """The least work that stores the same pixels with the same libraries silverlabel uses:
    JPEGs decoded by libjpeg-turbo (reduced in the DCT domain where >= 2x the target
    remains; a JPEG needing no resize decoded at 1/8 only to prove it is whole, its bytes
    kept), anything else by Pillow; OpenCV's resize; libjpeg-turbo's encoder. No EXIF
    orientation, colour management, pHash or checksum. Returns the stored size."""
    import cv2
    import numpy as np
    import simplejpeg
    from PIL import Image

    from silverlabel.imageops import _dct_reduction

    arr = None
    if raw[:2] == b"\xff\xd8":
        h, w, cs, _ = simplejpeg.decode_jpeg_header(raw)
        if cs not in ("CMYK", "YCCK"):
            if min(w, h) <= max_edge:
                simplejpeg.decode_jpeg(raw, colorspace="GRAY", min_width=-(-w // 8), min_height=-(-h // 8))
                return len(raw)
            s = _dct_reduction(min(w, h) / max_edge)
            arr = simplejpeg.decode_jpeg(raw, min_width=-(-w // s), min_height=-(-h // s))
    if arr is None:
        arr = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    h, w = arr.shape[:2]
    if min(w, h) > max_edge:
        s = max_edge / min(w, h)
        tw, th = max(1, round(w * s)), max(1, round(h * s))
        f = min(w / tw, h / th)
        arr = cv2.resize(arr, (tw, th), interpolation=cv2.INTER_LINEAR if f < 2 else cv2.INTER_AREA)
    return len(simplejpeg.encode_jpeg(arr, quality=quality, colorspace="RGB", colorsubsampling="420"))


def _kernel_chunk(task: tuple[int, int, int, int, str]) -> tuple[int, int, float, dict[str, float]]:
    lo, hi, max_edge, quality, kind = task
    import cv2

    cv2.setNumThreads(1)
    from silverlabel.imageops import ImageConfig, process_image

    cfg = ImageConfig(max_shortest_edge=max_edge, quality=quality)
    cpu0 = time.process_time()
    ok = nbytes = 0
    timings: dict[str, float] = {}
    for i in range(lo, hi):
        raw = _KERNEL_IMAGES[i]
        if kind == "silverlabel":
            r = process_image(raw, cfg, timings)
            if r.status == "success":
                ok += 1
                nbytes += len(r.data)
            continue
        try:
            nbytes += _libs_one(raw, max_edge, quality)
            ok += 1
        except Exception:  # noqa: BLE001 - a failure, as in the pool
            pass
    return ok, nbytes, time.process_time() - cpu0, timings


def run_kernel(images: list[bytes], workers: int, max_edge: int, quality: int, kind: str) -> dict[str, Any]:
    global _KERNEL_IMAGES
    _KERNEL_IMAGES = images  # inherited by forked workers: no pickling of inputs
    n = len(images)
    chunk = 20
    tasks = [(lo, min(n, lo + chunk), max_edge, quality, kind) for lo in range(0, n, chunk)]
    with mp.get_context("fork").Pool(workers) as pool:
        # warm-up: imports, first decoder/encoder use, in every worker
        warm = [(lo, min(n, lo + 5), max_edge, quality, kind) for lo in range(0, min(n, 5 * workers * 2), 5)]
        list(pool.imap_unordered(_kernel_chunk, warm))
        t0 = time.perf_counter()
        results = list(pool.imap_unordered(_kernel_chunk, tasks))
        dt = time.perf_counter() - t0
    stages: dict[str, float] = {}
    for r in results:
        for k, v in r[3].items():
            stages[k] = stages.get(k, 0.0) + v
    return {"seconds": dt, "rc": 0, "successes": sum(r[0] for r in results),
            "out_bytes": sum(r[1] for r in results), "cpu": sum(r[2] for r in results), "stages": stages}


def stage_breakdown(urls: list[str], max_edge: int, quality: int, limit: int = 400) -> dict[str, float]:
    """CPU milliseconds per image of each step of an ingest, measured one after the other in
    this process on the first ``limit`` images: read (HTTP fetch through silverlabel's
    client), the kernel's stages, the tar member writes and the samples parquet."""
    import pyarrow.parquet as pq

    from silverlabel.formats.tables import samples_table
    from silverlabel.formats.wds import ShardWriter
    from silverlabel.imageops import ImageConfig, process_image
    from silverlabel.sources.http import FetchConfig, Fetcher

    urls = urls[:limit]
    cfg = ImageConfig(max_shortest_edge=max_edge, quality=quality)
    fetcher = Fetcher(FetchConfig(allow_private_network=True))
    out: dict[str, float] = {"read": 0.0}
    raws = []
    for u in urls:
        t = time.process_time()
        r = fetcher.fetch(u)
        out["read"] += time.process_time() - t
        raws.append(r.data if r.status == "success" else None)
    fetcher.close()
    results = []
    timings: dict[str, float] = {}
    by_kind: dict[str, list] = {}  # kind -> [images, {stage: CPU s}]
    for raw in raws:
        if raw is None:
            results.append(None)
            continue
        mine: dict[str, float] = {}
        results.append(process_image(raw, cfg, mine))
        entry = by_kind.setdefault(image_kind(raw, max_edge), [0, {}])
        entry[0] += 1
        for k, v in mine.items():
            timings[k] = timings.get(k, 0.0) + v
            entry[1][k] = entry[1].get(k, 0.0) + v
    out.update(timings)
    t = time.process_time()
    buf = io.BytesIO()
    with ShardWriter(buf) as w:
        for i, r in enumerate(results):
            if r is not None and r.status == "success":
                meta = {"key": f"{i:09d}", "url": urls[i], "width": r.width, "height": r.height,
                        "sha256": r.sha256, "imagehash": r.imagehash}
                w.write(f"{i:09d}", {"jpg": r.data, "json": json.dumps(meta).encode()})
    out["tar"] = time.process_time() - t
    t = time.process_time()
    rows = [{"key": f"{i:09d}", "uid": None, "id": i, "url": u, "caption": None, "status":
             (r.status if r is not None else "failed_download"), "error": (r.error if r is not None else "404"),
             "width": getattr(r, "width", None), "height": getattr(r, "height", None),
             "original_width": getattr(r, "original_width", None), "original_height": getattr(r, "original_height", None),
             "sha256": getattr(r, "sha256", None), "imagehash": getattr(r, "imagehash", None), "shard": "x.tar",
             "source": None, "label": None} for i, (u, r) in enumerate(zip(urls, results))]
    pq.write_table(samples_table(rows), io.BytesIO())
    out["parquet"] = time.process_time() - t
    per_image = {k: v * 1000 / max(1, len(urls)) for k, v in out.items()}
    per_image["_kinds"] = {kind: (n, {k: v * 1000 / n for k, v in st.items()}, sum(st.values()) * 1000 / max(1, len(urls)))
                           for kind, (n, st) in by_kind.items()}
    return per_image


def image_kind(raw: bytes, max_edge: int) -> str:
    """What path an input takes through the kernel: format, mode, and the shortest-edge
    factor (kept = no resize, <2x, >=2x), from Pillow's header read."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(raw))
        f = min(im.size) / max_edge
    except Exception:  # noqa: BLE001 - not an image
        return "unreadable"
    size = "no resize" if f <= 1 else ("resize <2x" if f < 2 else "resize >=2x")
    return f"{im.format} {im.mode}, {size}"


# ---------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------


def machine_description() -> str:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    except OSError:
        nproc = str(len(os.sched_getaffinity(0)))
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f", {int(line.split()[1]) / 1024 / 1024:.1f} GiB RAM"
    except (OSError, ValueError):
        pass
    import PIL

    try:
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        mem += f"; load avg now {load}"
    except OSError:
        pass
    return (f"nproc {nproc}, CPU: {model}{mem}; {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}; Pillow {PIL.__version__}")


def _versions(i2d_py: Optional[Path]) -> str:
    parts = []
    try:
        from importlib.metadata import version

        parts.append(f"silverlabel {version('silverlabel')}")
    except Exception:  # noqa: BLE001
        pass
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip()
        if rev:
            parts.append(f"git {rev}")
    except OSError:
        pass
    if i2d_py is not None:
        out = subprocess.run(
            [str(i2d_py), "-c", "import importlib.metadata as m, sys; "
             "print(m.version('img2dataset'), m.version('opencv-python-headless'), sys.version.split()[0])"],
            capture_output=True, text=True, env=i2d_env())
        if out.returncode == 0 and out.stdout.strip():
            v, cv, pyv = out.stdout.split()[:3]
            parts.append(f"img2dataset {v} (opencv {cv}, Python {pyv})")
    return "; ".join(parts)


def fmt_table(rows: list[dict[str, Any]], n: int) -> str:
    def rate(r):
        return r["successes"] / r["seconds"] if r.get("seconds") else 0.0

    i2d = next((r for r in rows if r["method"].startswith("img2dataset") and r.get("seconds")), None)
    ref_k = next((rate(r) for r in rows if r["method"] == KERNEL_LIBS and r.get("seconds")), None)
    lines = [
        "| method | images | successes | seconds | images/s | vs img2dataset | vs kernel limit "
        "| CPU s | CPU ms/image | CPU vs img2dataset | server CPU s | output MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.get("seconds") is None:
            lines.append(f"| {r['method']} ({r.get('note', '')}) | {n} |" + " – |" * 10)
            continue
        rr = rate(r)
        vi = f"**{rr / rate(i2d):.2f}x**" if i2d else "–"
        vk = f"{rr / ref_k:.2f}x" if ref_k else "–"
        ms = 1000 * r["cpu"] / max(1, n)
        ci = f"{ms / (1000 * i2d['cpu'] / max(1, n)):.2f}x" if i2d and i2d["cpu"] else "–"
        lines.append(
            f"| {r['method']} | {n} | {r['successes']} | {r['seconds']:.2f} | {rr:.1f} | {vi} | {vk} "
            f"| {r['cpu']:.1f} | {ms:.2f} | {ci} | {r['server_cpu']:.1f} | {r['out_bytes'] / 1e6:.1f} |")
    return "\n".join(lines)


def fmt_kinds(stages: dict[str, Any]) -> str:
    """The kernel's CPU per kind of input (ms per image of that kind, and its share of the
    pool's ms per image), largest share first."""
    kinds = stages.get("_kinds") or {}
    lines = ["| input kind | images | " + " | ".join(STAGES) + " | ms each | share of ms/img |",
             "|---|---:|" + "---:|" * (len(STAGES) + 2)]
    for kind, (n, st, share) in sorted(kinds.items(), key=lambda kv: -kv[1][2]):
        lines.append(f"| {kind} | {n} | " + " | ".join(f"{st.get(k, 0.0):.2f}" for k in STAGES)
                     + f" | {sum(st.values()):.2f} | {share:.2f} |")
    return "\n".join(lines)


def fmt_stages(stages: dict[str, float]) -> str:
    """The per-step CPU table (ms per image)."""
    stages = {k: v for k, v in stages.items() if not k.startswith("_")}
    order = ["read", *STAGES, "tar", "parquet"]
    keys = [k for k in order if k in stages] + sorted(k for k in stages if k not in order)
    total = sum(stages.values())
    return ("| step | " + " | ".join(keys) + " | total |\n|---|" + "---:|" * (len(keys) + 1) + "\n"
            + "| CPU ms/image | " + " | ".join(f"{stages[k]:.2f}" for k in keys) + f" | {total:.2f} |")


def summarize(method: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median run (by wall time) of a method; keeps all wall times."""
    secs = [r["seconds"] for r in runs]
    med = sorted(runs, key=lambda r: r["seconds"])[(len(runs) - 1) // 2]
    return {"method": method, "seconds": statistics.median(secs), "all_seconds": secs,
            "successes": min(r["successes"] for r in runs), "cpu": med.get("cpu", 0.0),
            "server_cpu": med.get("server_cpu", 0.0), "out_bytes": med.get("out_bytes", 0),
            "runs": runs}


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="number of images in the pool")
    p.add_argument("--workers", type=int, default=2, help="worker processes for every method")
    p.add_argument("--out", type=Path, default=None, help="work dir (default: a fresh temp dir, removed at the end)")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per method (median reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="640x480", help="nominal pool image size WxH (uniform pool)")
    p.add_argument("--pool", choices=["uniform", "mixed"], default="uniform",
                   help="uniform: photo-like JPEGs of --size; mixed: web-like (200..2,000 px, aspect 0.5..2, "
                        "~10%% PNG/WebP/gray/CMYK, ~2%% failures)")
    p.add_argument("--samples-per-shard", type=int, default=250)
    p.add_argument("--max-edge", type=int, default=600, help="shortest edge cap (resize only if bigger)")
    p.add_argument("--quality", type=int, default=90, help="JPEG re-encode quality")
    p.add_argument("--timeout", type=int, default=10, help="per-request timeout, seconds")
    p.add_argument("--i2d-threads", type=int, default=32, help="img2dataset thread_count (per process)")
    p.add_argument("--i2d-reencode-all", action="store_true",
                   help="img2dataset skip_reencode=False: re-encode even JPEGs that need no resize "
                        "(silverlabel keeps those bytes, so this makes img2dataset do more work)")
    p.add_argument("--i2d-python", default=None, help="interpreter for bench/.venv-img2dataset (<= 3.12)")
    p.add_argument("--silverlabel", default=None, help="silverlabel command (default: next to this python)")
    p.add_argument("--silverlabel-extra", default="", help="extra args appended to `silverlabel ingest`")
    p.add_argument("--only", default="silverlabel,img2dataset,kernel,stages",
                   help="comma list of methods to run")
    p.add_argument("--run-timeout", type=float, default=1800, help="kill a CLI run after this many seconds")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up runs")
    p.add_argument("--markdown", type=Path, default=None, help="append results to this markdown file")
    p.add_argument("--keep", action="store_true", help="keep outputs when --out is not given")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    only = {m.strip() for m in args.only.split(",") if m.strip()}
    w, h = (int(x) for x in args.size.lower().split("x"))
    import tempfile

    tmp = None
    if args.out is None:
        tmp = tempfile.mkdtemp(prefix="silverlabel-bench-")
        out = Path(tmp)
    else:
        out = args.out.resolve()
        out.mkdir(parents=True, exist_ok=True)

    machine_at_start = machine_description()
    t0 = time.perf_counter()
    if args.pool == "mixed":
        entries = make_mixed_pool(args.n, args.seed, max(1, args.workers))
    else:
        entries = make_pool(args.n, (w, h), args.seed, max(1, args.workers))
    pool = [(name, b) for name, b in entries if b is not None]  # what the server has
    gen_s = time.perf_counter() - t0
    total_mb = sum(len(b) for _, b in pool) / 1e6
    log(f"pool: {len(entries)} URLs, {len(pool)} served images, {total_mb:.1f} MB, generated in {gen_s:.1f}s")

    files = as_served_files(pool)
    rows: list[dict[str, Any]] = []
    i2d_py: Optional[Path] = None
    problems: list[str] = []

    # img2dataset venv first: its creation must not happen while timing.
    if "img2dataset" in only:
        try:
            i2d_py = ensure_i2d_venv(_find_i2d_python(args.i2d_python))
        except (subprocess.CalledProcessError, SystemExit, OSError) as exc:
            problems.append(f"img2dataset unavailable: {exc}")
            log(problems[-1])

    sl_cmd = silverlabel_command(args) if "silverlabel" in only else None
    if "silverlabel" in only and sl_cmd is None:
        problems.append("silverlabel CLI not found (no bin/silverlabel, no src/silverlabel/cli.py)")
        log(problems[-1])

    with ImageServerProcess(files) as srv:
        log(f"serving on {srv.base_url} (pid {srv.pid})")
        urls = [srv.url(name) for name, _ in entries]
        # served, and not cut short on purpose (make_mixed_pool truncates a few JPEGs to half)
        expected_mixed = sum(1 for n, b in entries if b is not None and not (n.endswith(".jpg") and not b.endswith(b"\xff\xd9")))
        urls_parquet, urls_txt = write_url_lists(urls, out / "urls")
        n_warm = min(len(urls), max(50, 25 * args.workers))
        warm_parquet, warm_txt = write_url_lists(urls[:n_warm], out / "urls-warmup")

        methods: list[tuple[str, Any]] = []
        if sl_cmd is not None:
            methods.append(("silverlabel ingest", lambda urls_pq, urls_txt, tag: run_silverlabel(
                sl_cmd, urls_pq, out / "silverlabel", args, tag)))
        if i2d_py is not None:
            methods.append((f"img2dataset ({args.i2d_threads} threads/proc"
                            + (", re-encode all)" if args.i2d_reencode_all else ")"), lambda urls_pq, urls_txt, tag: run_i2d(
                i2d_py, urls_txt, out / "img2dataset", args, tag)))
        if "kernel" in only:
            images = [b for _, b in pool]
            methods.append((KERNEL_LIBS, lambda urls_pq, urls_txt, tag: run_kernel(
                images, args.workers, args.max_edge, args.quality, "libs")))
            methods.append((KERNEL_SL, lambda urls_pq, urls_txt, tag: run_kernel(
                images, args.workers, args.max_edge, args.quality, "silverlabel")))

        def measured(fn, *a):
            s0 = proc_cpu_seconds(srv.pid)
            r = fn(*a)
            r["server_cpu"] = proc_cpu_seconds(srv.pid) - s0
            return r

        if sl_cmd is not None:
            compile_checkout()
        if not args.no_warmup:
            for name, fn in methods:
                if name.startswith("kernel"):
                    continue  # run_kernel warms its own pool up
                r = fn(warm_parquet, warm_txt, "warmup")
                log(f"{name} warm-up: rc={r['rc']} {r['successes']}/{n_warm} in {r['seconds']:.2f}s")

        # Interleave the methods run by run, so slow drifts of a shared
        # machine do not favour one of them.
        results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in methods}
        for k in range(args.repeat):
            for name, fn in methods:
                r = measured(fn, urls_parquet, urls_txt, f"run{k}")
                extra = f" stats={r['stats']}" if "stats" in r else ""
                log(f"{name} run {k}: rc={r['rc']} {r['successes']}/{len(urls)} in {r['seconds']:.2f}s "
                    f"(cpu {r.get('cpu', 0):.1f}s, server cpu {r['server_cpu']:.1f}s){extra}")
                if r["rc"] != 0:
                    problems.append(f"{name} exited {r['rc']}; log tail:\n{tail(r['log'])}")
                    log(problems[-1])
                # every method must keep the same images (the mixed pool's deliberate failures:
                # the missing URLs and truncated JPEGs), or the images/s compare unlike things
                expected = len(urls) if args.pool == "uniform" else expected_mixed
                if r["successes"] != expected:
                    problems.append(f"{name} wrote {r['successes']} of {expected} expected images"
                                    + (f" (stats {r['stats']})" if "stats" in r else "")
                                    + ": comparison not like for like")
                    log(problems[-1])
                results[name].append(r)
        for name, _ in methods:
            row = summarize(name, results[name])
            last = results[name][-1]
            if name.startswith("silverlabel"):
                row["cmd"] = shlex.join(last["cmd"])
            if "config" in last:
                row["config"] = last["config"]
            rows.append(row)
        if "silverlabel" in only and sl_cmd is None:
            rows.insert(0, {"method": "silverlabel ingest", "seconds": None, "note": "CLI not found"})
        if "img2dataset" in only and i2d_py is None:
            rows.append({"method": "img2dataset", "seconds": None, "note": "not installed"})
        # the fixed reference rows go last
        rows.sort(key=lambda r: r["method"].startswith("kernel"))
        stages = stage_breakdown(urls, args.max_edge, args.quality) if "stages" in only else None

    table = fmt_table(rows, len(entries))
    print(table)
    if stages:
        print("\nwhere silverlabel's CPU goes (one process, first 400 images):\n" + fmt_stages(stages))
        print("\nthe kernel by kind of input (CPU ms per image of the kind):\n" + fmt_kinds(stages))

    for p_ in problems:
        print(f"\nNOTE: {p_}")

    if args.markdown is not None:
        cmd = shlex.join([os.path.relpath(sys.executable, REPO) if sys.executable.startswith(str(REPO))
                          else sys.executable, os.path.relpath(__file__, REPO)] + sys.argv[1:])
        md = [f"\n## ingest benchmark, {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}\n",
              f"`{cmd}`\n",
              f"- machine at start: {machine_at_start}",
              f"- at end: {machine_description().split('; load avg now ')[-1].split(';')[0]} (load avg; "
              "other work on a shared machine shows up here and in the spread of the runs)",
              f"- versions: {_versions(i2d_py)}",
              ("- pool: web-like mixed pool (long side 200..2,000 px, aspect 0.5..2, ~10% PNG/WebP/gray/CMYK, "
               f"~1% truncated, ~1% 404): {len(entries)} URLs, " if args.pool == "mixed" else
               f"- pool: {len(pool)} photo-like JPEGs (q92, nominal {w}x{h}, mixed 4:3/3:4/3:2), ")
              + f"{total_mb:.1f} MB, served from 127.0.0.1 by a separate process; "
              f"{args.workers} worker processes for every method; shortest edge capped at "
              f"{args.max_edge} (resize only if bigger), JPEG q{args.quality}, "
              f"{args.samples_per_shard} samples/shard; median of {args.repeat} timed run(s) after a warm-up",
              ""]
        md.append(table)
        md.append("")
        if stages:
            md += ["CPU per step of silverlabel's ingest (ms per image; one process, first 400 images, measured "
                   "one step after the other; read = HTTP fetch through silverlabel's client):", "",
                   fmt_stages(stages), "", "The kernel by kind of input (CPU ms per image of that kind):", "",
                   fmt_kinds(stages), ""]
        for r in rows:
            if r.get("cmd"):
                md.append(f"- silverlabel: `{r['cmd']}`")
            if r.get("config"):
                md.append(f"- img2dataset: `download(**{json.dumps(r['config'])})`")
            if r.get("all_seconds") and len(r["all_seconds"]) > 1:
                md.append(f"- {r['method']} runs: " + ", ".join(f"{s:.2f}s" for s in r["all_seconds"])
                          + "; CPU s: " + ", ".join(f"{x.get('cpu', 0):.1f}" for x in r["runs"]))
        for p_ in problems:
            md.append(f"- NOTE: {p_.splitlines()[0]}")
        with open(args.markdown, "a") as fh:
            fh.write("\n".join(md) + "\n")
        log(f"appended to {args.markdown}")

    if tmp is not None and not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    elif tmp is not None:
        log(f"outputs kept in {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
