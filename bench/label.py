"""Label-stage benchmark (a figure, not a test): silverlabel's GPU path against the GPU's limits.

    python bench/label.py --images 16000 --teachers efficientnet_lite0,vit_base_patch16_224,vit_large_patch16_224

Builds two datasets with ``silverlabel ingest`` (so the input is exactly what ``label`` reads
in production): the **uniform** pool (photo-like 640x480 JPEGs) and the **mixed** pool
(shortest edges 200..1,200, aspect ratios 0.5..2 log-uniform, ~10% PNG/WebP/grayscale/CMYK
and ~5% progressive JPEGs; ingest caps the shortest edge at 600, re-encodes what is not an
RGB JPEG and keeps RGB JPEGs that need no change, progressive ones included). Then, in ONE
process on the same GPU, it measures what issue 15's targets are stated against:

- the bf16 matmul peak (8192^3, random data, median of 10 after warm-up);
- the raw batched decode rate of each pool's shard JPEGs: nvImageCodec on the hardware
  JPEG engines (``HW_GPU_ONLY``) and ``torchvision.io.decode_jpeg(list, device="cuda")``
  (nvJPEG on the SMs), decode only, batches of ``--batch``;
- decode + resize/crop/normalize alone (silverlabel's producer, no model);
- per teacher: the synthetic rate (what ``label`` runs per batch: the model with pure
  fp16 weights + probabilities + in21k mapping + top-50, CUDA-graph replays on one
  in-memory batch), the naive loop (a torch DataLoader with all cores, PIL decode + timm's
  eval transform, the model under autocast, top-50), and ``label_shard`` end to end over
  every shard of both pools (tar read, decode, resize, model, top-k, parquet written)
  after a warm-up shard; MFU from FLOPs counted by ``torch.utils.flop_counter``;
- top-1 agreement of the GPU path with the CPU path on ``--agree`` images of each pool
  (efficientnet_lite0, real weights), and on the uniform pool with the engines off
  (nvJPEG decoding), to see which part of a disagreement the decoder makes.

ViT teachers have random weights (speed only). Prints a markdown table (also to
--markdown) and writes every number to --json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------
# pools


def _uniform_chunk(start: int) -> list[tuple[str, bytes]]:
    from silverlabel.demodata import photo_like_images

    return list(photo_like_images(50, size=(640, 480), seed=11, start=start))


def _mixed_one(args: tuple[int, int]) -> tuple[str, bytes]:
    """One image of the mixed pool: its size, aspect and format drawn from its index."""
    from PIL import Image

    from silverlabel.demodata import photo_like_images

    i, seed = args
    rng = np.random.default_rng([seed, i])
    short = int(rng.integers(200, 1201))
    aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))  # width / height
    w, h = (int(short * aspect), short) if aspect >= 1 else (short, int(short / aspect))
    _, data = next(photo_like_images(1, size=(w, h), seed=seed, start=i))
    kind = rng.random()
    if kind >= 0.15:
        return f"m{i:06d}.jpg", data
    img = Image.open(io.BytesIO(data))
    b = io.BytesIO()
    if kind < 0.03:
        img.save(b, format="PNG", compress_level=1)
        return f"m{i:06d}.png", b.getvalue()
    if kind < 0.06:
        img.save(b, format="WEBP", quality=90)
        return f"m{i:06d}.webp", b.getvalue()
    if kind < 0.08:
        img.convert("L").save(b, format="JPEG", quality=90)
    elif kind < 0.10:
        img.convert("CMYK").save(b, format="JPEG", quality=90)
    else:  # progressive RGB, at most 600 px on the shorter side: ingest keeps it as it is
        if min(img.size) > 600:
            img = img.resize((img.width * 600 // min(img.size), img.height * 600 // min(img.size)), Image.BICUBIC)
        img.save(b, format="JPEG", quality=90, progressive=True)
    return f"m{i:06d}.jpg", b.getvalue()


def build_pool(root: Path, kind: str, n: int, unique: int, workers: int, shard_size: int) -> Path:
    from multiprocessing import Pool as Procs

    from silverlabel.stages.ingest import IngestConfig, run_ingest

    folder = root / f"{kind}-photos"
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with Procs(workers) as procs:
        if kind == "uniform":
            pool = [x for part in procs.map(_uniform_chunk, range(0, unique, 50)) for x in part][:unique]
        else:
            pool = procs.map(_mixed_one, [(i, 12) for i in range(unique)], chunksize=8)
    for i in range(n):
        name, data = pool[i % unique]
        (folder / f"{i:06d}_{name}").write_bytes(data)
    out = root / kind
    s = run_ingest(IngestConfig(sources=(str(folder),), output=str(out), samples_per_shard=shard_size, workers=workers,
                                decode_threads=max(2, workers // -(-n // shard_size))))  # cores over shards
    print(f"{kind} pool: {s.counts} in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def shard_jpegs(ds: Path, limit: int) -> list[bytes]:
    from silverlabel.formats.wds import iter_tar_samples

    out: list[bytes] = []
    for tar in sorted((ds / "shards").glob("*.tar")):
        with open(tar, "rb") as f:
            for s in iter_tar_samples(str(tar)):
                ext = s.image_ext()
                if ext is None:
                    continue
                off, size = s.members[ext]
                f.seek(off)
                out.append(f.read(size))
                if len(out) == limit:
                    return out
    return out


def pixels_per_image(blobs: list[bytes]) -> float:
    from PIL import Image

    return float(np.mean([np.prod(Image.open(io.BytesIO(b)).size) for b in blobs[:2000]]))


# ---------------------------------------------------------------------------------------
# limits


def timed(fn, warmup: int = 2, runs: int = 5) -> float:
    """Median seconds of ``fn()`` (synchronized) over ``runs`` after ``warmup``."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def matmul_peak() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192**3 / timed(lambda: a @ b, warmup=3, runs=10)


def gil_share(fn) -> float:
    """How far a pure-Python thread gets while ``fn`` runs, against while the main thread
    sleeps as long (1.0: ``fn`` releases the GIL; near 0: it holds it)."""
    import threading

    count, stop = [0], threading.Event()

    def spin():
        while not stop.is_set():
            count[0] += 1

    def measure(work) -> tuple[int, float]:
        count[0] = 0
        stop.clear()
        th = threading.Thread(target=spin)
        th.start()
        t0 = time.perf_counter()
        work()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        stop.set()
        th.join()
        return count[0], dt

    busy, dt = measure(fn)
    idle, _ = measure(lambda: time.sleep(dt))
    return busy / max(1, idle)


def raw_decode_rates(blobs: list[bytes], batch: int) -> dict[str, float]:
    """Decode only, batches of ``batch``: the engines (nvImageCodec) and nvJPEG (torchvision)."""
    import torchvision.io as tio

    from silverlabel.inference import hardware_jpeg_decoder, jpeg_kind

    out: dict[str, float] = {}
    base = [b for b in blobs if jpeg_kind(b) == "baseline"]
    hw = hardware_jpeg_decoder(torch.cuda.current_device())
    if hw is not None:
        nvimgcodec, dec, params = hw
        streams = [nvimgcodec.CodeStream(b) for b in base]
        stream = torch.cuda.current_stream().cuda_stream

        def run_hw():
            for i in range(0, len(streams), batch):
                images = dec.decode(streams[i:i + batch], params=params, cuda_stream=stream)
            return images

        out["hw_img_s"] = len(streams) / timed(run_hw, warmup=1, runs=3)
        out["python_progress_during_hw_decode"] = gil_share(run_hw)
        ok = sum(im is not None for im in dec.decode(streams[:batch], params=params, cuda_stream=stream))
        out["hw_decoded_share"] = ok / min(batch, len(streams))
    datas = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in base]

    def run_nvjpeg():
        for i in range(0, len(datas), batch):
            tio.decode_jpeg(datas[i:i + batch], device="cuda", mode=tio.ImageReadMode.RGB)

    out["nvjpeg_img_s"] = len(datas) / timed(run_nvjpeg, warmup=1, runs=3)
    return out


def host_decode_rate(ds: Path, batch: int, limit: int = 4096) -> float:
    """``label --decode host``'s decode processes alone (:class:`HostDecoder`: decode into
    the ring, copy to the GPU), two batches in flight as in ``label``: images/s."""
    from silverlabel.formats.wds import iter_tar_samples
    from silverlabel.hostdecode import HostDecoder
    from silverlabel.stages.label import LabelConfig, host_procs

    tar = sorted((ds / "shards").glob("*.tar"))[0]
    locs = [s.members[s.image_ext()] for s in iter_tar_samples(str(tar)) if s.image_ext()][:limit]
    hd = HostDecoder(host_procs(LabelConfig(dataset=str(ds))), "cuda")
    try:
        hd.start(batch)

        def run():
            inflight = []
            for i in range(0, len(locs), batch):
                if hd.want:  # as label does: a bigger ring once a batch lacked room
                    while inflight:
                        hd.finish(inflight.pop(0))
                    hd.grow()
                inflight.append(hd.submit(str(tar), locs[i:i + batch]))
                if len(inflight) == hd.SLOTS - 1:
                    hd.finish(inflight.pop(0))
            while inflight:
                hd.finish(inflight.pop(0))
            torch.cuda.synchronize()

        return len(locs) / timed(run, warmup=1, runs=3)
    finally:
        hd.close()


def prep_rates(labeler, blobs: list[bytes], batch: int) -> dict[str, float]:
    """silverlabel's producer without the model, one thread: decode alone (the chain:
    engines, nvJPEG, Pillow), resize/crop/normalize alone (on batches decoded once), both."""
    from silverlabel.inference import resize_crop_batch

    dec, tf = labeler.decoders[0], labeler.transforms[0]
    chunks = [blobs[i:i + batch] for i in range(0, len(blobs), batch)]
    out = {"decode_img_s": len(blobs) / timed(lambda: [dec.decode(c) for c in chunks], warmup=1, runs=3)}
    decoded = [dec.decode(c) for c in chunks[:4]]
    n = sum(len(c) for c in chunks[:4])

    def resize():
        for refs, _, _ in decoded:
            resize_crop_batch([r for r in refs if r is not None], tf, labeler.device, labeler.dtype)

    out["resize_img_s"] = n / timed(resize, warmup=2, runs=5)

    def both():
        for i, c in enumerate(chunks):
            labeler._prepare_batch(dec, [str(j) for j in range(len(c))], c)

    out["prep_img_s"] = len(blobs) / timed(both, warmup=1, runs=3)
    return out


def synthetic_rate(labeler, batch: int, steps: int = 30) -> float:
    """What ``label`` runs per batch (model + probs + mapping + top-k), on one in-memory batch."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    xs = [torch.randn(batch, 3, tf.size, tf.size, device="cuda", dtype=labeler.dtype, generator=gen)
          .contiguous(memory_format=torch.channels_last) for tf in labeler.transforms]
    runner = labeler._runner(batch)

    def run():
        with torch.inference_mode():
            for _ in range(steps):
                runner(xs)

    return batch * steps / timed(run, warmup=1, runs=3)


class _TarMembers(torch.utils.data.Dataset):
    def __init__(self, items, tf):
        self.items = items
        self.tf = tf

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image

        path, off, size = self.items[i]
        with open(path, "rb") as f:
            f.seek(off)
            data = f.read(size)
        return self.tf(Image.open(io.BytesIO(data)).convert("RGB"))


def naive_rate(model, tf, ds: Path, batch: int, workers: int, dtype, limit: int) -> float:
    """A torch DataLoader with PIL + timm's eval transform, the model under autocast."""
    from silverlabel.formats.wds import iter_tar_samples

    items = []
    for tar in sorted((ds / "shards").glob("*.tar")):
        for s in iter_tar_samples(str(tar)):
            off, size = s.members["jpg"]
            items.append((str(tar), off, size))
    items = items[:limit]
    loader = torch.utils.data.DataLoader(_TarMembers(items, tf.cpu()), batch_size=batch, num_workers=workers,
                                         pin_memory=True, prefetch_factor=4)
    n, t0 = 0, None
    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
        for i, x in enumerate(loader):
            if i == 2:  # after the workers are up
                torch.cuda.synchronize()
                t0, n = time.perf_counter(), 0
            out = model(x.cuda(non_blocking=True).to(dtype).contiguous(memory_format=torch.channels_last))
            out.float().softmax(-1).topk(50)[1].cpu()
            n += x.shape[0]
    torch.cuda.synchronize()
    if t0 is None:
        raise SystemExit(f"--naive-images {limit}: too few to time past 2 warm-up batches of {batch}")
    return n / (time.perf_counter() - t0)


def label_units(cfg, ds: Path) -> list:
    from silverlabel.dataset import Pool
    from silverlabel.stages.label import LabelUnit

    pool = Pool(str(ds))
    name = pool.read_manifest()["name"]
    pool.labels_dir(cfg.name).mkdir(parents=True, exist_ok=True)
    units = []
    for samples in pool.samples_files():
        i = pool.shard_index(samples)
        units.append(LabelUnit(i, str(pool.shard_path(name, i)), str(samples), str(pool.labels_path(cfg.name, name, i))))
    return units


def end_to_end(cfg, ds: Path) -> tuple[float, int, dict]:
    """``label_shard`` over every shard after a warm-up: images/s, rows, decode counts.

    The warm-up loads the teacher and captures its graph (4 batches); with the host decode
    (``host``, ``both``) it labels the first 16 batches, so that the decode ring has grown to
    the pool's batches (a one-time cost per process: in 8,000 images of the mixed pool it
    was a good part of the timed run)."""
    from silverlabel.stages.label import get_labeler, label_shard

    units = label_units(cfg, ds)
    warm = 16 if cfg.decode != "gpu" else 4
    label_shard(replace(units[0], limit=warm * (cfg.batch_size or 256)), cfg)  # warm-up: load, capture, compile
    labeler = get_labeler(cfg)
    before = labeler.decode_counts
    grown = labeler.host_decoder.grown if labeler.host_decoder is not None else 0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    rows = sum(label_shard(u, cfg).rows for u in units)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    after = labeler.decode_counts
    counts = {k: after[k] - before[k] for k in after}
    if labeler.host_decoder is not None:
        counts["ring_grown"] = labeler.host_decoder.grown - grown  # in the timed part
    return rows / dt, rows, counts


def agreement(ds: Path, n: int, precision: str, hw: bool = True) -> dict:
    """Top-1 agreement of GPU and CPU labels (efficientnet_lite0, real weights)."""
    import pyarrow.parquet as pq

    from silverlabel.stages.label import LabelConfig, get_labeler, run_label

    torch.backends.cudnn.allow_tf32 = precision != "fp32"  # fp32 means fp32 here (isolates decode + resize)
    name = f"agree-gpu-{precision}{'' if hw else '-nvjpeg'}"
    cfg = LabelConfig(dataset=str(ds), device="cuda", limit=n, output_name=name, precision=precision)
    for d in get_labeler(cfg).decoders:  # the labeler run_label will use (one worker: this process)
        d.use_hw = hw and d.hw is not None
    gpu = run_label(cfg)
    cpu_dir = ds / "labels" / "agree-cpu"
    if not cpu_dir.exists():
        run_label(LabelConfig(dataset=str(ds), device="cpu", limit=n, output_name="agree-cpu",
                              decode_threads=os.cpu_count() or 1))
    a = {r["key"]: r for r in pq.read_table(gpu.output, columns=["key", "labels", "label_probs"]).to_pylist()}
    b = {r["key"]: r for r in pq.read_table(cpu_dir, columns=["key", "labels", "label_probs"]).to_pylist()}
    common = sorted(set(a) & set(b))
    same = [a[k]["labels"][0] == b[k]["labels"][0] for k in common]
    margin = [b[k]["label_probs"][0] - b[k]["label_probs"][1] for k in common]
    flips = [m for m, s in zip(margin, same) if not s]
    return {"images": len(common), "top1": float(np.mean(same)),
            "median_cpu_margin_of_flips": float(np.median(flips)) if flips else None,
            "p1_max_abs_diff": float(max(abs(a[k]["label_probs"][0] - b[k]["label_probs"][0]) for k in common))}


# ---------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16000, help="images per pool")
    ap.add_argument("--unique", type=int, default=1000, help="distinct generated photos (repeated to --images)")
    ap.add_argument("--teachers", default="efficientnet_lite0,vit_base_patch16_224,vit_large_patch16_224")
    ap.add_argument("--pools", default="uniform,mixed")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--shard-size", type=int, default=10000, help="samples per shard (ingest's default)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--naive-images", type=int, default=8000)
    ap.add_argument("--agree", type=int, default=2000, help="images for the GPU/CPU top-1 agreement (0: skip)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--variants", type=int, default=1, help="also time fresh decode buffers and 3 decode processes")
    ap.add_argument("--agree-variants", type=int, default=1, help="also agreement with nvJPEG and with fp32")
    ap.add_argument("--precision", choices=["fp16", "bf16"], default="fp16")
    ap.add_argument("--host-decode", action="store_true", help="also time label --decode host (decode processes) on every pool, and those processes alone")
    ap.add_argument("--host-shares", default="0.5", help="with --host-decode, also time label --decode both at "
                    "these --host-share values")
    ap.add_argument("--host-procs", default="-1", help="with --host-shares, time --decode both with each of these "
                    "--host-procs values (-1: the default)")
    ap.add_argument("--skip-host-only", action="store_true", help="with --host-decode, time only --decode both")
    ap.add_argument("--reserve-sweep", default="", help="also time these --reserve-sms values on the first pool, "
                    "e.g. 0,16,32,66")
    ap.add_argument("--markdown", help="append the results here")
    ap.add_argument("--json", help="write raw results here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/label.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import timm
    from safetensors.torch import save_file

    from silverlabel.inference import flops_per_image, host_feeds
    from silverlabel.stages import label as label_mod
    from silverlabel.stages.label import LabelConfig, get_labeler
    from silverlabel.teachers import TeacherSpec

    t_start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="sl-bench-label-"))
    pools = {p: build_pool(root, p, args.images, args.unique, args.workers, args.shard_size) for p in args.pools.split(",")}
    peak = matmul_peak()
    gpu = torch.cuda.get_device_name()
    print(f"bf16 matmul peak: {peak / 1e12:.0f} TFLOP/s on {gpu}", flush=True)
    res: dict = {"gpu": gpu, "peak_flops": peak, "args": vars(args), "pools": {}, "teachers": []}
    blobs = {}
    for p, ds in pools.items():
        blobs[p] = shard_jpegs(ds, 4096)
        res["pools"][p] = {"pixels_per_image": pixels_per_image(blobs[p]), **raw_decode_rates(blobs[p], args.batch)}
        if args.host_decode:
            res["pools"][p]["host_procs_img_s"] = host_decode_rate(ds, args.batch)
        print(p, json.dumps(res["pools"][p]), flush=True)
    for name in args.teachers.split(","):
        if name == "efficientnet_lite0":
            spec = TeacherSpec("efficientnet_lite0")
        else:  # random weights: speed only
            ckpt = root / f"{name}.safetensors"
            if not ckpt.exists():
                model = timm.create_model(name, pretrained=False, num_classes=21841)
                save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
                del model
            spec = TeacherSpec(f"timm:{name}", checkpoint=str(ckpt))
        r: dict = {"teacher": name}
        for p, ds in pools.items():
            cfg = LabelConfig(dataset=str(ds), teachers=(spec,), device="cuda", batch_size=args.batch, decode="gpu",
                              compile=args.compile, output_name=f"bench-{spec.slug}", precision=args.precision)
            labeler = get_labeler(cfg)
            if "synthetic_img_s" not in r:
                r["gflops_per_img"] = flops_per_image(labeler) / 1e9
                procs = label_mod.host_procs(cfg)  # what label's default, --decode auto, picks here
                r["auto_decode"] = "host" if host_feeds(r["gflops_per_img"] * 1e9, procs) else "gpu"
                r["synthetic_img_s"] = synthetic_rate(labeler, args.batch)
                r["cuda_graphs"] = labeler.cuda_graphs
                r["hw_decoder"] = labeler.decoders[0].use_hw
            r.update({f"{p}_{k}": v for k, v in prep_rates(labeler, blobs[p], args.batch).items()})
            rate, rows, counts = end_to_end(cfg, ds)
            r[f"{p}_img_s"], r[f"{p}_rows"], r[f"{p}_decode_counts"] = rate, rows, counts
            lab = get_labeler(cfg)
            r[f"{p}_model_sms"] = lab.model_sms
            print(name, p, f"{rate:.0f} img/s", counts, f"model on {lab.model_sms} SMs", flush=True)
            if p == next(iter(pools)) and args.reserve_sweep:  # SMs kept from the model for the decode
                for v in (int(x) for x in args.reserve_sweep.split(",")):
                    rcfg = replace(cfg, reserve_sms=v)
                    r[f"{p}_img_s_reserve{v}"] = end_to_end(rcfg, ds)[0]
                    print(name, p, f"{v} SMs reserved: {r[f'{p}_img_s_reserve{v}']:.0f} img/s", flush=True)
                    get_labeler(rcfg).close()
            if p == next(iter(pools)) and args.variants:  # what the design choices are worth
                for d in labeler.decoders:
                    d.reuse = False
                r[f"{p}_img_s_fresh_buffers"] = end_to_end(cfg, ds)[0]
                for d in labeler.decoders:
                    d.reuse = True
                labeler.decode_procs = 3
                r[f"{p}_img_s_decode_procs3"] = end_to_end(cfg, ds)[0]
                labeler.close()
                labeler.decode_procs = 0
                print(name, p, "fresh buffers", r[f"{p}_img_s_fresh_buffers"], "3 decode processes",
                      r[f"{p}_img_s_decode_procs3"], flush=True)
            if args.host_decode:  # label --decode host: every image on the host (decode processes), none on the GPU
                if not args.skip_host_only:
                    hcfg = replace(cfg, decode="host")
                    r[f"{p}_img_s_host_decode"], _rows, hcounts = end_to_end(hcfg, ds)
                    print(name, p, f"--decode host: {r[f'{p}_img_s_host_decode']:.0f} img/s", hcounts, flush=True)
                for share in (float(x) for x in args.host_shares.split(",") if x):
                    for procs in (int(x) for x in args.host_procs.split(",")):
                        tag = f"both{share:g}" + (f"_procs{procs}" if procs >= 0 else "")
                        bcfg = replace(cfg, decode="both", host_share=share, host_procs=procs)
                        r[f"{p}_img_s_{tag}"], _rows, bcounts = end_to_end(bcfg, ds)
                        print(name, p, f"--decode both --host-share {share:g} --host-procs {procs}: "
                              f"{r[f'{p}_img_s_{tag}']:.0f} img/s", bcounts, flush=True)
                label_mod.close_labelers()  # the decode processes and ring of the last one
        first = next(iter(pools.values()))
        labeler = get_labeler(LabelConfig(dataset=str(first), teachers=(spec,), device="cuda", batch_size=args.batch,
                                          decode="gpu", compile=args.compile, output_name=f"bench-{spec.slug}",
                                          precision=args.precision))
        r["naive_img_s"] = naive_rate(labeler.models[0], labeler.transforms[0], first, args.batch, args.workers,
                                      DTYPES[args.precision], args.naive_images)
        f = r["gflops_per_img"] * 1e9
        r["mfu_synthetic"] = r["synthetic_img_s"] * f / peak
        for p in pools:
            r[f"{p}_mfu"] = r[f"{p}_img_s"] * f / peak
            r[f"{p}_vs_synthetic"] = r[f"{p}_img_s"] / r["synthetic_img_s"]
            r[f"{p}_vs_hw_decode"] = r[f"{p}_img_s"] / res["pools"][p].get("hw_img_s", float("nan"))
        r["speedup_vs_naive"] = r[next(iter(pools)) + "_img_s"] / r["naive_img_s"]
        print(json.dumps(r), flush=True)
        res["teachers"].append(r)
        label_mod.close_labelers()
        torch.cuda.empty_cache()
    if args.agree:
        res["agreement"] = {p: agreement(ds, args.agree, args.precision) for p, ds in pools.items()}
        first = next(iter(pools))
        if args.agree_variants:
            res["agreement"][f"{first}_nvjpeg"] = agreement(pools[first], args.agree, args.precision, hw=False)
            res["agreement"][f"{first}_fp32"] = agreement(pools[first], args.agree, "fp32")
        print(json.dumps(res["agreement"]), flush=True)
    res["seconds"] = time.perf_counter() - t_start
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    text = markdown(res)
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as fh:
            fh.write(text + "\n")
    return 0


def markdown(res: dict) -> str:
    a = res["args"]
    pools = list(res["pools"])
    lines = [
        f"#### label — {time.strftime('%Y-%m-%d')} — {res['gpu']}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "",
        f"Command: `python bench/label.py --images {a['images']} --batch {a['batch']} --teachers {a['teachers']} "
        f"--pools {a['pools']} --shard-size {a['shard_size']} --agree {a['agree']}{' --compile' if a['compile'] else ''} --precision {a['precision']}`. "
        f"bf16 matmul peak measured in the same run: {res['peak_flops'] / 1e12:.0f} TFLOP/s.",
        "",
        "| pool | pixels/img | raw decode, engines (nvImageCodec) img/s | raw decode, nvJPEG on SMs img/s |",
        "|---|---:|---:|---:|",
    ]
    for p in pools:
        d = res["pools"][p]
        lines.append(f"| {p} | {d['pixels_per_image'] / 1e3:.0f}k | {d.get('hw_img_s', float('nan')):.0f} | "
                     f"{d['nvjpeg_img_s']:.0f} |")
    lines += ["", "| teacher | GFLOP/img | synthetic img/s (MFU) | "
              + " | ".join(f"{p} img/s (MFU, vs synthetic, vs engines)" for p in pools)
              + " | decode, resize, both (no model) img/s | naive img/s | speedup |",
              "|---|---:|---:|" + "---:|" * len(pools) + "---:|---:|---:|"]
    for r in res["teachers"]:
        cells = [f"{r[f'{p}_img_s']:.0f} ({100 * r[f'{p}_mfu']:.1f}%, {100 * r[f'{p}_vs_synthetic']:.0f}%, "
                 f"{100 * r[f'{p}_vs_hw_decode']:.0f}%)" for p in pools]
        prep = " / ".join(f"{r[f'{p}_decode_img_s']:.0f}, {r[f'{p}_resize_img_s']:.0f}, {r[f'{p}_prep_img_s']:.0f}"
                          for p in pools)
        lines.append(f"| {r['teacher']} | {r['gflops_per_img']:.2f} | {r['synthetic_img_s']:.0f} "
                     f"({100 * r['mfu_synthetic']:.1f}%) | " + " | ".join(cells)
                     + f" | {prep} | {r['naive_img_s']:.0f} | {r['speedup_vs_naive']:.2f}x |")
    lines.append("")
    for r in res["teachers"]:
        if f"{pools[0]}_img_s_fresh_buffers" in r:
            lines.append(f"- {r['teacher']}, {pools[0]} pool, end to end: {r[f'{pools[0]}_img_s']:.0f} img/s as "
                         f"shipped; {r[f'{pools[0]}_img_s_fresh_buffers']:.0f} with fresh decode buffers per batch; "
                         f"{r[f'{pools[0]}_img_s_decode_procs3']:.0f} with 3 decode processes (CUDA IPC)")
    for p in pools:
        if "python_progress_during_hw_decode" in res["pools"][p]:
            lines.append(f"- {p}: a Python thread runs at {100 * res['pools'][p]['python_progress_during_hw_decode']:.0f}% "
                         "of its idle pace during the engines' batched decode (GIL released?)")
    for r in res["teachers"]:
        if "auto_decode" in r:
            lines.append(f"- {r['teacher']}: label's default (`--decode auto`) decodes on the {r['auto_decode']} here")
        lines.append(f"- {r['teacher']} decode paths (end to end): " + "; ".join(f"{p} {r[f'{p}_decode_counts']}" for p in pools))
    for p in pools:
        if "host_procs_img_s" in res["pools"][p]:
            lines.append(f"- {p}: the host decode processes alone (decode + copy, no model): "
                         f"{res['pools'][p]['host_procs_img_s']:.0f} img/s")
    for r in res["teachers"]:  # --host-decode: label --decode host / both, same pools
        f = r["gflops_per_img"] * 1e9
        for p in pools:
            alts = [(k[len(f"{p}_img_s_"):], v) for k, v in r.items()
                    if k.startswith(f"{p}_img_s_host_decode") or k.startswith(f"{p}_img_s_both")]
            if alts:
                lines.append(f"- {r['teacher']}, {p}: engines {r[f'{p}_img_s']:.0f} img/s; " + "; ".join(
                    f"{name.replace('host_decode', '--decode host').replace('both', '--decode both, share ')} "
                    f"{v:.0f} img/s ({100 * v * f / res['peak_flops']:.1f}% MFU)" for name, v in alts))
    if res.get("agreement"):
        lines.append("")
        for k, v in res["agreement"].items():
            lines.append(f"- GPU ({a['precision']}) vs CPU (fp32) top-1 agreement, efficientnet_lite0, {k}: "
                         f"**{100 * v['top1']:.2f}%** of {v['images']} (CPU top-1 margin of the flips, median: "
                         f"{v['median_cpu_margin_of_flips']})")
    lines += ["", f"Python {platform.python_version()}, {platform.machine()}; whole run {res['seconds']:.0f} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
