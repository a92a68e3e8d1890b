"""Label-stage benchmark (a figure, not a test): silverlabel's GPU path against the naive loop.

    python bench/label.py --images 16000 --teachers efficientnet_lite0,vit_base_patch16_224,vit_large_patch16_224

Builds a dataset of photo-like 640x480 JPEG shards with ``silverlabel ingest`` (so the input
is exactly what ``label`` reads in production), then for each teacher measures, in the
same process on the same GPU:

- silverlabel: ``label_shard`` over every shard (tar read, GPU JPEG decode, resize/crop/
  normalize on the GPU, bf16 model, mapping to in21k, top-50, parquet written), after one
  warm-up shard;
- naive: what a user writes — a torch DataLoader over the same tar members with all cores,
  PIL decode + timm's eval transform, the model under bf16 autocast, top-50 on the GPU;
- the model alone on synthetic in-memory batches (the compute bound), and the bf16
  matmul peak (8192^3), for model FLOP utilisation (FLOPs counted by
  ``torch.utils.flop_counter`` on one forward pass);
- decode alone: silverlabel's GPU decode + preprocess with no model (the decode bound);
- top-1 agreement of the GPU path with the CPU path on the same images (efficientnet_lite0).

ViT teachers use random weights (speed only). Prints a markdown table (also to --markdown).
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402


def build_dataset(root: Path, n: int, unique: int, workers: int) -> Path:
    from silverlabel.demodata import photo_like_images
    from silverlabel.stages.ingest import IngestConfig, run_ingest

    folder = root / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    pool = list(photo_like_images(unique, size=(640, 480), seed=11))
    for i in range(n):
        name, data = pool[i % unique]
        (folder / f"{i:06d}_{name}").write_bytes(data)
    out = root / "ds"
    t0 = time.perf_counter()
    s = run_ingest(IngestConfig(sources=(str(folder),), output=str(out), samples_per_shard=4000, workers=workers))
    print(f"ingest: {s.counts} in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def matmul_peak() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (time.perf_counter() - t0)


def model_flops(model, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, size, size, device="cuda")
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16), FlopCounterMode(display=False) as fc:
        model(x)
    return float(fc.get_total_flops())


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def synthetic_rate(model, size: int, batch: int, dtype, steps: int = 20) -> float:
    x = torch.randn(batch, 3, size, size, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
        for _ in range(3):
            model(x).float().softmax(-1).topk(50)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            model(x).float().softmax(-1).topk(50)
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


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


def tar_items(ds: Path):
    from silverlabel.formats.wds import iter_tar_samples

    items = []
    for tar in sorted((ds / "shards").glob("*.tar")):
        for s in iter_tar_samples(str(tar)):
            off, size = s.members["jpg"]
            items.append((str(tar), off, size))
    return items


def naive_rate(model, teacher, ds: Path, batch: int, workers: int, dtype) -> float:
    from silverlabel.inference import EvalTransform

    tf = EvalTransform.from_teacher(teacher).cpu()
    items = tar_items(ds)
    loader = torch.utils.data.DataLoader(_TarMembers(items, tf), batch_size=batch, num_workers=workers,
                                         pin_memory=True, persistent_workers=False, prefetch_factor=4)
    n = 0
    t0 = None
    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
        for i, x in enumerate(loader):
            if i == 2:  # after the workers are up
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                n = 0
            out = model(x.cuda(non_blocking=True).contiguous(memory_format=torch.channels_last))
            out.float().softmax(-1).topk(50)[1].cpu()
            n += x.shape[0]
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def silverlabel_rate(cfg, ds: Path) -> tuple[float, int]:
    from silverlabel.dataset import Dataset
    from silverlabel.stages.label import label_shard, plan_label_units

    units = plan_label_units(cfg, Dataset(ds), [])
    label_shard(units[0], cfg)  # warm-up: model load, cuDNN autotune, compile
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    rows = 0
    for u in units:
        rows += label_shard(u, cfg).rows
    torch.cuda.synchronize()
    return rows / (time.perf_counter() - t0), rows


def decode_rate(labeler, ds: Path, batch: int, threads: int) -> float:
    """In-process GPU decode + prep (one nvJPEG decoder) with ``threads`` host threads."""
    from silverlabel.formats.wds import read_member

    items = tar_items(ds)[: 8 * batch]
    blobs = []
    for path, off, size in items:
        with open(path, "rb") as f:
            blobs.append(read_member(f, off, size))
    tf = labeler.transforms[0]
    prep = labeler.gpu_prep
    prep.gpu_decode_threads = threads
    for _ in range(2):
        imgs, _ = prep.decode(blobs[:batch])
        prep.prep(imgs, tf)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(0, len(blobs), batch):
        imgs, _ = prep.decode(blobs[i : i + batch])
        prep.prep(imgs, tf)
    torch.cuda.synchronize()
    return len(blobs) / (time.perf_counter() - t0)


def agreement(ds: Path, n: int, precision: str) -> float:
    """Top-1 agreement of GPU and CPU labels (efficientnet_lite0, real weights)."""
    import pyarrow.parquet as pq

    from silverlabel.stages.label import LabelConfig, run_label

    gpu = run_label(LabelConfig(dataset=str(ds), device="cuda", limit=n, output_name="agree-gpu", precision=precision))
    cpu = run_label(LabelConfig(dataset=str(ds), device="cpu", limit=n, output_name="agree-cpu",
                                decode_threads=os.cpu_count() or 1))
    a = {r["key"]: r["labels"][0] for r in pq.read_table(gpu.output, columns=["key", "labels"]).to_pylist()}
    b = {r["key"]: r["labels"][0] for r in pq.read_table(cpu.output, columns=["key", "labels"]).to_pylist()}
    common = set(a) & set(b)
    return sum(a[k] == b[k] for k in common) / max(1, len(common))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16000)
    ap.add_argument("--unique", type=int, default=1000, help="distinct generated photos (repeated to --images)")
    ap.add_argument("--teachers", default="efficientnet_lite0,vit_base_patch16_224,vit_large_patch16_224")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--agree", type=int, default=2000, help="images for the GPU/CPU top-1 agreement (0: skip)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--precision", choices=["fp16", "bf16"], default="fp16")
    ap.add_argument("--decode-procs", type=int, default=-1, help="GPU decode processes (-1: label's default)")
    ap.add_argument("--markdown", help="append the results here")
    ap.add_argument("--json", help="write raw results here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/label.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import timm

    from silverlabel.stages.label import LabelConfig, get_labeler
    from silverlabel.teachers import TeacherSpec, create_teacher

    root = Path(tempfile.mkdtemp(prefix="sl-bench-label-"))
    ds = build_dataset(root, args.images, args.unique, args.workers)
    peak = matmul_peak()
    gpu = torch.cuda.get_device_name()
    print(f"bf16 matmul peak: {peak / 1e12:.0f} TFLOP/s on {gpu}", flush=True)
    results = []
    for name in args.teachers.split(","):
        if name == "efficientnet_lite0":
            spec = TeacherSpec("efficientnet_lite0")
            teacher = create_teacher(spec)
        else:  # random weights: speed only. Register as an in-memory teacher via a checkpoint file.
            model = timm.create_model(name, pretrained=False, num_classes=21841)
            ckpt = root / f"{name}.safetensors"
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
            spec = TeacherSpec(f"timm:{name}", checkpoint=str(ckpt))
            teacher = create_teacher(spec)
        cfg = LabelConfig(dataset=str(ds), teachers=(spec,), device="cuda", batch_size=args.batch,
                          compile=args.compile, output_name=f"bench-{spec.slug}", precision=args.precision,
                          decode_procs=args.decode_procs)
        labeler = get_labeler(cfg)
        model = labeler.models[0]
        size = labeler.transforms[0].size
        flops = model_flops(model, size)
        sl, rows = silverlabel_rate(cfg, ds)
        dec1 = decode_rate(labeler, ds, args.batch, 1)
        dec = decode_rate(labeler, ds, args.batch, 4)
        syn = synthetic_rate(model, size, args.batch, DTYPES[args.precision])
        naive = naive_rate(model, teacher, ds, args.batch, args.workers, DTYPES[args.precision])
        r = {"teacher": name, "images": rows, "silverlabel_img_s": sl, "naive_img_s": naive, "synthetic_img_s": syn,
             "decode_img_s": dec, "decode_1thread_img_s": dec1, "gflops_per_img": flops / 1e9, "mfu": sl * flops / peak,
             "mfu_synthetic": syn * flops / peak, "speedup_vs_naive": sl / naive}
        print(json.dumps(r), flush=True)
        results.append(r)
        del labeler, model, teacher
        from silverlabel.stages import label as label_mod

        for lab in label_mod._LABELER_CACHE.values():
            lab.close()
        label_mod._LABELER_CACHE.clear()
        torch.cuda.empty_cache()
    agree = agreement(ds, args.agree, args.precision) if args.agree else None
    lines = [
        f"### label — {time.strftime('%Y-%m-%d')} — {gpu}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "",
        f"Command: `python bench/label.py --images {args.images} --batch {args.batch} --teachers {args.teachers}"
        f"{' --compile' if args.compile else ''} --precision {args.precision} --decode-procs {args.decode_procs}`. Shards: {args.images} photo-like 640x480 JPEGs "
        f"written by `silverlabel ingest`. bf16 matmul peak measured in the same run: {peak / 1e12:.0f} TFLOP/s.",
        "",
        "| teacher | GFLOP/img | silverlabel img/s | naive img/s | speedup | synthetic img/s | GPU decode+prep img/s (4 thr / 1 thr) | MFU end-to-end | MFU synthetic |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['teacher']} | {r['gflops_per_img']:.2f} | {r['silverlabel_img_s']:.0f} | {r['naive_img_s']:.0f} | "
            f"{r['speedup_vs_naive']:.2f}x | {r['synthetic_img_s']:.0f} | {r['decode_img_s']:.0f} / {r['decode_1thread_img_s']:.0f} | "
            f"{100 * r['mfu']:.1f}% | {100 * r['mfu_synthetic']:.1f}% |"
        )
    if agree is not None:
        lines += ["", f"GPU ({args.precision}) vs CPU (fp32) path top-1 agreement (efficientnet_lite0, {args.agree} "
                      f"images): {100 * agree:.2f}%"]
    lines += ["", f"Python {platform.python_version()}, {platform.machine()}", ""]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "agreement": agree, "peak": peak}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
