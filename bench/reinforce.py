"""Reinforce-stage benchmark (a figure, not a test): augmentations/s and bytes per sample.

    python bench/reinforce.py --images 16000 --augs 10 --configs 1x16,2x8,1p15,2p7   # on a GPU machine
    python bench/reinforce.py --images 64 --augs 4 --configs 1x2,1p2 --device cpu    # a smoke run on a laptop

Builds a training set (``silverlabel shard`` layout: tars + ``_info.json``) of photo-like
640x480 JPEGs, then measures, on this machine:

- **reinforce**: ``run_reinforce`` end to end (tar read, per-sample decode, K replays with
  RandAugment at the teacher's 224 px, teacher in fp16 autocast on the GPU, top-k, packing,
  reproducible tar written atomically), for each config: ``WORKERSxTHREADS`` (worker
  processes, each with its own teacher on the same GPU, x replay threads per worker;
  ``--replay-procs 0``) or ``WORKERSpPROCS`` (replay in PROCS spawned processes per worker,
  ``--replay-procs PROCS``). Wall clock includes process start-up and teacher loading.
- **replay bound**: decode + K replays on a thread pool with every core, no teacher (the CPU
  side of reinforce; exact replay runs on the CPU with Pillow so the training loader can
  reproduce it bit for bit); and the same in the stage's replay processes (one per core, or
  ``--bound-procs``), pixels through its shared-memory ring and, for comparison, pickled back.
- **teacher bound**: ``Labeler.classify`` on an in-memory uint8 batch (normalise + model +
  top-k), i.e. the GPU side.

And prints a storage table: the measured ``.rnf`` bytes per sample and per augmentation,
the same on disk inside the tar (512-byte member header + padding to 512), and the two
published formats, from the fields and dtypes they store:

- ImageNet+ (Faghri et al., "Reinforce Data, Multiply Impact", ICCV 2023): top-10 sparse
  teacher probabilities per stored augmentation, about 73 bytes each (issue 6's figure);
- DataCompDR-12M (apple/DataCompDR-12M dataset card on Hugging Face, MobileCLIP): per sample
  30 augmentations; ``npz`` member ``image_emb`` = 30 x 1536 float32 (two ViT-L/14 teachers,
  2 x 768 concatenated), ``text_emb`` = 6 x 1536 float32 (1 real + 5 synthetic captions),
  ``paug.json`` with each augmentation's absolute-pixel crop box and RandAugment ops as JSON
  text (~80 bytes each in the card's example rows), ``syn.json`` captions. The ``-bf16``
  variant stores the embeddings in bfloat16.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# import silverlabel from this checkout's src/ (instead of this script's folder)
sys.path[0] = str(Path(__file__).resolve().parents[1] / "src")

import numpy as np  # noqa: E402


def build_trainset(root: Path, n: int, unique: int, shards: int) -> Path:
    """``shards`` tars of ``n`` photo-like JPEGs (``unique`` distinct ones repeated) + _info.json."""
    import io

    from PIL import Image

    from silverlabel.demodata import photo_like_images
    from silverlabel.formats.wds import ShardWriter

    pool = [data for _name, data in photo_like_images(unique, size=(640, 480), seed=11)]
    out = root / "trainset"
    out.mkdir(parents=True, exist_ok=True)
    lengths = [n // shards + (1 if i < n % shards else 0) for i in range(shards)]
    files, i = [], 0
    for s, length in enumerate(lengths):
        name = f"bench-train-{s:04d}.tar"
        with open(out / name, "wb") as f, ShardWriter(f) as w:
            for _ in range(length):
                data = pool[i % unique]
                width, height = Image.open(io.BytesIO(data)).size
                meta = {"label": i % 1000, "width": width, "height": height}
                w.write(f"{i:09d}", {"jpg": data, "cls": str(i % 1000).encode(), "json": json.dumps(meta).encode()})
                i += 1
        files.append(name)
    (out / "classes.json").write_text(json.dumps({"num_classes": 1000, "label_space": "in1k"}))
    (out / "_info.json").write_text(json.dumps({"name": "bench", "splits": {"train": {
        "name": "train", "num_samples": n, "filenames": files, "shard_lengths": lengths}}}))
    return out


def replay_rate(trainset: Path, augs: int, threads: int, size: int, limit: int) -> float:
    """Decode + ``augs`` replays per sample on ``threads`` threads, no teacher: augmentations/s."""
    from silverlabel.augment import AugPolicy, decode, replay_decoded, sample_augs
    from silverlabel.formats.wds import iter_tar_samples, read_member

    tar = sorted(trainset.glob("*.tar"))[0]
    blobs = []
    with open(tar, "rb") as f:
        for s in iter_tar_samples(str(tar)):
            blobs.append((s.key, read_member(f, *s.members["jpg"])))
            if len(blobs) >= limit:
                break
    policy = AugPolicy()

    def work(item):
        key, data = item
        img = decode(data)
        for aug in sample_augs(policy, 0, key, *img.size, augs):
            replay_decoded(img, aug, size)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, blobs[: min(16, len(blobs))]))  # warm-up
        t0 = time.perf_counter()
        list(pool.map(work, blobs))
        dt = time.perf_counter() - t0
    return len(blobs) * augs / dt


def replay_rate_procs(trainset: Path, augs: int, procs: int, size: int, limit: int, ring: bool = True,
                      batch: int = 256) -> float:
    """Decode + ``augs`` replays per sample in the stage's ``procs`` replay processes, no
    teacher: augmentations/s. Batches of ``batch`` augmentations, two in flight (as in
    ``reinforce_shard``); pixels land in the shared-memory ring, or are pickled back."""
    import uuid
    from collections import deque

    from silverlabel.augment import AugPolicy, sample_augs
    from silverlabel.formats.wds import iter_tar_samples, read_member
    from silverlabel.stages import reinforce as rs

    tar = sorted(trainset.glob("*.tar"))[0]
    index = list(iter_tar_samples(str(tar)))[:limit]
    policy = AugPolicy()
    with open(tar, "rb") as f:
        sizes = [rs._image_size(read_member(f, *s.members["jpg"])) for s in index]
    all_augs = [sample_augs(policy, 0, s.key, w, h, augs) for s, (w, h) in zip(index, sizes)]
    jobs = [rs._sample_job(index, all_augs, i) for i in range(len(index))]
    per_batch = max(1, batch // augs)
    shm = rs._Ring(per_batch, augs, [size]) if ring else None
    pool = rs._replay_pool(procs)

    def run(ids: list[int]) -> None:
        token = uuid.uuid4().hex
        window: deque = deque()
        for t, b in enumerate(range(0, len(ids), per_batch)):
            if len(window) == 2:
                for fut in window.popleft():
                    fut.result()
            window.append([pool.submit(rs._proc_replay, token, str(tar), jobs[i], [size], shm.shm.name if shm else None,
                                       shm.offsets(t % rs.SLOTS, row) if shm else None)
                           for row, i in enumerate(ids[b:b + per_batch])])
        for futs in window:
            for fut in futs:
                fut.result()

    try:
        run(list(range(min(max(4 * procs, rs.SLOTS * per_batch), len(jobs)))))  # warm-up: start, imports, ring
        t0 = time.perf_counter()
        run(list(range(len(jobs))))
        dt = time.perf_counter() - t0
    finally:
        rs.close_replay_pool()
        if shm is not None:
            shm.close()
    return len(jobs) * augs / dt


def teacher_rate(cfg, batch: int, steps: int = 20) -> float:
    """``Labeler.classify`` on an in-memory uint8 batch: augmentations/s (the GPU side)."""
    from silverlabel.stages.reinforce import get_teacher_runner

    runner = get_teacher_runner(cfg)
    size = runner.transforms[0].size
    x = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    for _ in range(3):
        runner.classify([x], embeddings=cfg.embeddings)
    t0 = time.perf_counter()
    for _ in range(steps):
        runner.classify([x], embeddings=cfg.embeddings)
    return batch * steps / (time.perf_counter() - t0)


def tar_member_bytes(n: int) -> int:
    """What a member of ``n`` bytes occupies in a tar: a 512-byte header + data padded to 512."""
    return 512 + -(-n // 512) * 512


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16000)
    ap.add_argument("--unique", type=int, default=500, help="distinct generated photos (repeated to --images)")
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--augs", type=int, default=10)
    ap.add_argument("--topk", type=int, default=10)
    ap.add_argument("--embeddings", action="store_true", help="also store pre-logits embeddings")
    ap.add_argument("--configs", default="1x16,2x8,4x4",
                    help="WORKERSxTHREADS (replay threads) or WORKERSpPROCS (replay processes), comma separated")
    ap.add_argument("--bound-procs", type=int, default=0, help="replay processes for the replay bound (0: cores)")
    ap.add_argument("--runs", type=int, default=1, help="repeat the bounds and the configs (noisy shared machines)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=0, help="augmented images per forward (0: stage default)")
    ap.add_argument("--markdown", help="append the results here")
    ap.add_argument("--json", help="write raw results here")
    args = ap.parse_args()

    import torch

    from silverlabel.augment import bytes_per_aug
    from silverlabel.stages.reinforce import ReinforceConfig, run_reinforce

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA GPU: use --device cpu for a smoke run", file=sys.stderr)
        return 2
    cores = os.cpu_count() or 1
    root = Path(tempfile.mkdtemp(prefix="sl-bench-reinforce-"))
    t0 = time.perf_counter()
    ts = build_trainset(root, args.images, args.unique, args.shards)
    print(f"trainset: {args.images} images in {args.shards} shards, {time.perf_counter() - t0:.1f} s", flush=True)
    base = ReinforceConfig(str(ts), str(root / "out-warm"), augs=args.augs, topk=args.topk, embeddings=args.embeddings,
                           device=args.device, batch_size=args.batch, threads=cores)
    bprocs = args.bound_procs or cores
    limit = min(args.images, 1000)
    bounds: dict[str, list[float]] = {"threads": [], "procs_ring": [], "procs_pickled": []}
    for _ in range(args.runs):
        bounds["threads"].append(replay_rate(ts, args.augs, cores, 224, limit=limit))
        bounds["procs_ring"].append(replay_rate_procs(ts, args.augs, bprocs, 224, limit=limit, ring=True))
        bounds["procs_pickled"].append(replay_rate_procs(ts, args.augs, bprocs, 224, limit=limit, ring=False))
        print(f"replay bound: {cores} threads {bounds['threads'][-1]:.0f}, {bprocs} processes "
              f"{bounds['procs_ring'][-1]:.0f} (ring) / {bounds['procs_pickled'][-1]:.0f} (pickled) augmentations/s",
              flush=True)
    replay_s = max(bounds["threads"])
    teach_s = teacher_rate(base, args.batch or (256 if args.device.startswith("cuda") else 32))
    print(f"teacher bound: {teach_s:.0f} augmentations/s", flush=True)
    runs = []
    for rep in range(args.runs):
        for conf in args.configs.split(","):
            procs = "p" in conf.lower()
            w, t = (int(x) for x in conf.lower().replace("p", "x").split("x"))
            cfg = ReinforceConfig(str(ts), str(root / f"out-{conf}-{rep}"), augs=args.augs, topk=args.topk,
                                  embeddings=args.embeddings, device=args.device, batch_size=args.batch, workers=w,
                                  threads=cores // w if procs else t, replay_procs=t if procs else 0)
            s = run_reinforce(cfg)
            r = {"config": conf, "workers": w, "threads": 0 if procs else t, "replay_procs": t if procs else 0,
                 "augs": s.augs_now, "seconds": s.seconds,
                 "augs_per_s": s.augs_per_second, "images_per_s": s.samples_now / s.seconds,
                 "bytes_per_sample": s.bytes_per_sample, "bytes_per_aug": s.bytes_per_aug}
            print(json.dumps(r), flush=True)
            runs.append(r)
    bps = runs[-1]["bytes_per_sample"]
    k = args.augs
    emb_note = " + embeddings" if args.embeddings else ""
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "CPU"
    lines = [
        f"### reinforce — {time.strftime('%Y-%m-%d')} — {dev}, {cores} CPU cores, torch {torch.__version__}",
        "",
        f"Command: `python bench/reinforce.py --images {args.images} --augs {k} --topk {args.topk}"
        f"{' --embeddings' if args.embeddings else ''} --configs {args.configs} --device {args.device}`. "
        f"Input: {args.images} photo-like 640x480 JPEGs in {args.shards} shards; teacher efficientnet_lite0 "
        f"(224 px), RandAugment 2 ops m9, no mixing; wall clock includes start-up and teacher loading.",
        "",
        "| config (workers x threads, or workers p replay processes) | augmentations/s | images/s | seconds |",
        "|---|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(f"| {r['config']} | {r['augs_per_s']:.0f} | {r['images_per_s']:.0f} | {r['seconds']:.1f} |")
    lines += [
        f"| *replay bound: decode + {k} replays, {cores} threads, no teacher* | "
        f"{' / '.join(f'{x:.0f}' for x in bounds['threads'])} | {replay_s / k:.0f} | |",
        f"| *replay bound: the same in {bprocs} replay processes, shared-memory ring* | "
        f"{' / '.join(f'{x:.0f}' for x in bounds['procs_ring'])} | {max(bounds['procs_ring']) / k:.0f} | |",
        f"| *replay bound: {bprocs} replay processes, arrays pickled back* | "
        f"{' / '.join(f'{x:.0f}' for x in bounds['procs_pickled'])} | {max(bounds['procs_pickled']) / k:.0f} | |",
        f"| *teacher bound: classify on in-memory batches* | {teach_s:.0f} | | |",
        "",
        "Storage per sample and per stored augmentation:",
        "",
        "| format | what is stored per augmentation | bytes/aug | bytes/sample |",
        "|---|---|---:|---:|",
        f"| silverlabel `.rnf` (measured, K={k}, top-{args.topk}{emb_note}) | crop 4xu16, flip/mix u8, 2 ops 2xu8, "
        f"top-{args.topk} i32+f16{' , emb f16' if args.embeddings else ''} | {bps / k:.1f} | {bps:.0f} |",
        f"| same, on disk in the tar (512 B header + padding) | | {tar_member_bytes(int(round(bps))) / k:.1f} | "
        f"{tar_member_bytes(int(round(bps)))} |",
        f"| silverlabel `.rnf`, top-10, K=30 | as above | {bytes_per_aug(10, 2) + 8 / 30:.1f} | {8 + 30 * bytes_per_aug(10, 2)} |",
        f"| silverlabel `.rnf`, top-10 + 1536-d fp16 embedding, K=30 | as above + embedding | "
        f"{bytes_per_aug(10, 2, 1536) + 8 / 30:.1f} | {8 + 30 * bytes_per_aug(10, 2, 1536)} |",
        "| ImageNet+ (top-10 sparse probabilities) | top-10 probabilities + augmentation | ~73 | |",
        f"| DataCompDR-12M image part (K=30, 1536-d fp32 + paug JSON) | embedding fp32, crop/ops JSON | ~{1536 * 4 + 80} | "
        f"~{30 * (1536 * 4 + 80)} |",
        f"| DataCompDR-12M-bf16 image part | embedding bf16, crop/ops JSON | ~{1536 * 2 + 80} | ~{30 * (1536 * 2 + 80)} |",
        f"| (DataCompDR text part, per sample: 6 x 1536 fp32 embeddings + 5 captions) | | | {6 * 1536 * 4}+ |",
        "",
        f"Python {platform.python_version()}, {platform.machine()}",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "replay_bound": replay_s, "replay_bounds": bounds,
                                               "teacher_bound": teach_s},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
