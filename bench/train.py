"""Train-stage benchmark (a figure, not a test): how much does reading shards cost a GPU run?

    python bench/train.py --images 20000 --model vit_base_patch16_224 --batch 256 --workers 15

Writes a training set in ``silverlabel shard``'s layout (photo-like 500x375 JPEGs, ``.cls``,
``.json`` with top-k labels, ``_info.json``), then trains the same model with the same step
(bf16 autocast, AdamW, cross-entropy, grad clip) in the same process on the same GPU, fed by:

- **synthetic**: one in-memory batch on the GPU, reused (the compute bound);
- **silverlabel loader**: ``silverlabel.loader.create_loader`` (RandomResizedCrop 0.05..1 +
  flip, decode-time JPEG draft) with ``--workers`` processes and pinned memory;
- **silverlabel train**: the real ``run_train`` loop on the same shards (its own metrics);
- **timm wds loader**: ``timm.data.create_dataset("wds/...")`` + ``timm.data.create_loader``
  (its prefetcher normalises on the GPU) on the same shards and workers;
- **loader alone**: silverlabel's and timm's loaders with no model (the input bounds).

silverlabel's loader yields uint8 batches that are normalised on the GPU (as ``run_train``
does on CUDA); the CPU-normalised float32 variant is measured too. ``--warmup`` must exceed
the loaders' prefetch queues (2 batches per worker) or a slow loader looks fast.

Images/s are measured after ``--warmup`` steps over ``--steps`` steps. The target: from
shards >= 90% of synthetic. It also evaluates the trained checkpoint with ``silverlabel eval``
on the validation split (GPU path of eval). Prints a markdown table (also to --markdown).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def build_trainset(root: Path, n: int, n_val: int, unique: int, classes: int, shards: int) -> Path:
    from silverlabel.demodata import photo_like_images
    from silverlabel.formats.wds import ShardWriter

    t0 = time.perf_counter()
    pool = [data for _name, data in photo_like_images(unique, size=(500, 375), seed=7)]
    rng = np.random.default_rng(0)
    info = {}
    i = 0
    for split, total, nshards in (("train", n, shards), ("validation", n_val, max(1, shards // 16))):
        lengths = [total // nshards + (1 if s < total % nshards else 0) for s in range(nshards)]
        files = []
        for s, length in enumerate(lengths):
            name = f"bench-{split}-{s:04d}.tar"
            with open(root / name, "wb") as f, ShardWriter(f) as w:
                for _ in range(length):
                    c = int(rng.integers(classes))
                    labels = [c, *rng.choice(classes, 9, replace=False).tolist()]
                    meta = {"label": c, "labels": labels, "label_probs": [0.5] + [0.05] * 9}
                    w.write(f"s{i:07d}", {"jpg": pool[i % unique], "cls": str(c).encode(),
                                          "json": json.dumps(meta).encode()})
                    i += 1
            files.append(name)
        info[split] = {"name": split, "num_samples": total, "filenames": files, "shard_lengths": lengths}
    (root / "classes.json").write_text(json.dumps({"label_space": "in1k", "num_classes": classes}))
    (root / "_info.json").write_text(json.dumps({"name": "bench", "splits": info}))
    print(f"trainset: {n} + {n_val} images in {shards} shards, {time.perf_counter() - t0:.1f} s", flush=True)
    return root


class Step:
    """One training step of silverlabel's loop (bf16 autocast, AdamW, CE, clip)."""

    def __init__(self, model_name: str, classes: int, size: int, compile: bool):
        from silverlabel.stages.train import TrainConfig, create_model, param_groups

        cfg = TrainConfig("x", "y", model=model_name, img_size=size)
        self.model = create_model(cfg, classes).cuda().train()
        self.opt = torch.optim.AdamW(param_groups(self.model, 0.05), lr=1e-4, fused=True)
        self.fwd = torch.compile(self.model) if compile else self.model

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = self.fwd(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss


def timed(batches, step, warmup: int, steps: int, batch: int) -> float:
    it = iter(batches)
    for _ in range(warmup):
        x, y = next(it)
        step(x, y)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y = next(it)
        step(x, y)
    torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def repeat(make):
    """Iterate ``make(epoch)`` forever."""
    epoch = 0
    while True:
        yield from make(epoch)
        epoch += 1


def ours(ts: Path, batch: int, workers: int, size: int, normalize: bool = False):
    """silverlabel's loader as run_train uses it on a GPU: uint8 batches, normalised there."""
    from silverlabel.loader import EpochBatches, LoaderConfig, normalize_on

    cfg = LoaderConfig(str(ts), batch_size=batch, num_workers=workers, img_size=size, normalize=normalize)
    for x, cls, _labels, _probs in EpochBatches(cfg, pin_memory=True):  # epochs overlap, as in run_train
        yield normalize_on(x.cuda(non_blocking=True), cfg), cls.cuda(non_blocking=True)


def timm_wds(ts: Path, batch: int, workers: int, size: int):
    from timm.data import create_dataset, create_loader

    ds = create_dataset("wds/bench", root=str(ts), split="train", is_training=True, batch_size=batch, seed=0)
    # the same augmentation work as silverlabel's: RandomResizedCrop(0.05..1, bicubic) + flip,
    # no colour jitter (timm's training default adds ColorJitter 0.4, silverlabel does not)
    loader = create_loader(ds, input_size=(3, size, size), batch_size=batch, is_training=True, scale=(0.05, 1.0),
                           color_jitter=None, interpolation="bicubic", num_workers=workers, pin_memory=True,
                           use_prefetcher=True, device=torch.device("cuda"))

    def make(_epoch):
        for x, y in loader:
            yield x, y.cuda(non_blocking=True)

    return repeat(make)


def alone(batches, warmup: int, steps: int, batch: int) -> float:
    """Images/s of a feed with no model (batches land on the GPU)."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        next(it)
    torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--val-images", type=int, default=2000)
    ap.add_argument("--unique", type=int, default=1000)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--shards", type=int, default=32)
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--warmup", type=int, default=60, help="untimed steps (> the loaders' prefetch queues)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--train-steps", type=int, default=200, help="steps of the real run_train loop (crosses epochs)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--skip", default="", help="comma list of: timm,float,train,alone")
    ap.add_argument("--markdown")
    ap.add_argument("--json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/train.py needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    skip = set(filter(None, args.skip.split(",")))
    root = Path(tempfile.mkdtemp(prefix="sl-bench-train-"))
    ts = build_trainset(root, args.images, args.val_images, args.unique, args.classes, args.shards)
    res: dict[str, float] = {}
    step = Step(args.model, args.classes, args.size, args.compile)

    x = torch.randn(args.batch, 3, args.size, args.size, device="cuda")
    y = torch.randint(0, args.classes, (args.batch,), device="cuda")
    res["synthetic"] = timed(iter(lambda: (x, y), None), step, args.warmup, args.steps, args.batch)
    print(f"synthetic: {res['synthetic']:.0f} img/s", flush=True)
    res["silverlabel loader"] = timed(ours(ts, args.batch, args.workers, args.size), step, args.warmup, args.steps,
                                      args.batch)
    print(f"silverlabel loader: {res['silverlabel loader']:.0f} img/s", flush=True)
    if "timm" not in skip:
        try:
            res["timm wds loader"] = timed(timm_wds(ts, args.batch, args.workers, args.size), step,
                                           args.warmup, args.steps, args.batch)
            print(f"timm wds loader: {res['timm wds loader']:.0f} img/s", flush=True)
        except Exception as e:  # noqa: BLE001 - a figure, report why it is missing
            print(f"timm wds loader failed: {type(e).__name__}: {e}", flush=True)
    if "float" not in skip:  # the same loader normalising on the CPU (float32 batches)
        res["silverlabel loader, CPU-normalised float32"] = timed(
            ours(ts, args.batch, args.workers, args.size, normalize=True), step, args.warmup, args.steps, args.batch)
        print(f"silverlabel loader, float32: {res['silverlabel loader, CPU-normalised float32']:.0f} img/s", flush=True)
    if "alone" not in skip:
        res["silverlabel loader alone (no model)"] = alone(ours(ts, args.batch, args.workers, args.size),
                                                           args.warmup, args.steps, args.batch)
        print(f"loader alone: {res['silverlabel loader alone (no model)']:.0f} img/s", flush=True)
        if "timm" not in skip:
            try:
                res["timm wds loader alone (no model)"] = alone(timm_wds(ts, args.batch, args.workers, args.size),
                                                                args.warmup, args.steps, args.batch)
                print(f"timm loader alone: {res['timm wds loader alone (no model)']:.0f} img/s", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"timm wds loader failed: {type(e).__name__}: {e}", flush=True)
    del step
    torch.cuda.empty_cache()

    ev = None
    if "train" not in skip:
        from silverlabel.stages.evaluate import EvalConfig, run_eval
        from silverlabel.stages.train import TrainConfig, run_train

        run = root / "run"
        s = run_train(TrainConfig(str(ts), str(run), model=args.model, img_size=args.size, batch_size=args.batch,
                                  steps=args.train_steps, lr=1e-4, warmup_steps=5, loss="ce", device="cuda",
                                  num_workers=args.workers, log_every=5, ckpt_every=10**9), progress=False)
        rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        # like the other rows: all images over all time after the warm-up (epoch boundaries included)
        steady = [r for r in rows if r["step"] > min(args.warmup, args.train_steps // 2)]
        seconds = sum(5 * args.batch / r["samples_per_s"] for r in steady)
        res["silverlabel train (run_train)"] = (5 * args.batch * len(steady) / seconds if steady
                                                else s.samples_per_second)
        print(f"run_train: {res['silverlabel train (run_train)']:.0f} img/s (all logged intervals after warm-up), "
              f"loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}", flush=True)
        t0 = time.perf_counter()
        ev = run_eval(EvalConfig(str(run), str(ts), split="validation", batch_size=args.batch, device="cuda",
                                 num_workers=args.workers))
        ev["seconds"] = time.perf_counter() - t0
        print(f"eval: {ev['counts']['samples']} images, top-1 {ev['top1']:.4f}, {ev['seconds']:.1f} s", flush=True)

    gpu = torch.cuda.get_device_name()
    lines = [f"### train: {args.model} at {args.size} px, batch {args.batch}, bf16 autocast, "
             f"{'compiled, ' if args.compile else ''}{args.workers} loader workers",
             "", f"`python bench/train.py {' '.join(sys.argv[1:])}` on {gpu}, {os.cpu_count()} CPU cores, "
             f"torch {torch.__version__}, Python {platform.python_version()}; {args.images} photo-like 500x375 "
             f"JPEGs in {args.shards} shards; {args.steps} timed steps after {args.warmup}.", "",
             "| feed | images/s | vs synthetic |", "|---|---:|---:|"]
    for k, v in res.items():
        lines.append(f"| {k} | {v:.0f} | {v / res['synthetic']:.2f}x |")
    if ev is not None:
        lines.append("")
        lines.append(f"`silverlabel eval` on the GPU: {ev['counts']['samples']} validation images in "
                     f"{ev['seconds']:.1f} s (top-1 {ev['top1']:.4f}; random labels, so chance level is the point).")
    table = "\n".join(lines)
    print("\n" + table)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": res, "args": vars(args), "gpu": gpu}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
