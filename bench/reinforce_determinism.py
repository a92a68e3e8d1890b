#!/usr/bin/env python3
"""Is ``reinforce`` on a GPU deterministic run to run? A diagnostic, not a benchmark.

Builds bench/multigpu.py's toy training set (photos that vary in size, some gray), then for
each variant starts a fresh process that reinforces it ``--runs`` times with one worker and
compares every run with the first, member by member (bench/multigpu.py's ``rnf_diff``), and
prints the GPU decoder's paths. Variants switch one suspect off at a time:

- ``host``: the stage's default (torch replay on the GPU of images Pillow decoded on the host);
- ``base``: the torch replay of images the GPU decoded (``--decode gpu``: hardware engines);
- ``sync``: the replay thread waits for its stream at the end of each batch;
- ``noreuse``: the decoder allocates new output buffers for every batch;
- ``nohw``: nvJPEG on the SMs instead of the hardware JPEG engines;
- ``pil``: the CPU replay (Pillow) feeding the same GPU teacher;
- ``dense``: the float64 matrix-product resize instead of the Triton kernels;
- ``nocache``: ``base`` with PyTorch's CUDA caching allocator off (every allocation fresh).

What it showed on the H200 (BENCHMARKS.md, "reinforce determinism, diagnosed"): a process's
first shard differs from later runs (the later runs identical to each other) in every
variant but ``pil``, with nvJPEG in 1 sample; ``--trace`` shows the decoded images already
differ, in the last MCUs of the scan, and everything after follows from them. Untested
suspect: the consumer reads before the engines have written those last blocks (stale
memory is the previous run's image in a reused buffer, garbage in a fresh one), which
``--decode-check``'s pass-to-pass comparison and the decoded images' CUDA array interface
(a stream to wait for?) can show.

    python bench/reinforce_determinism.py --json out.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "bench"), str(REPO / "tests")]


def one_variant(variant: str, root: Path, runs: int, device: str) -> dict:
    """In this (fresh) process: reinforce ``runs`` times with ``variant``; each run vs the first."""
    import multigpu
    import torch

    from silverlabel import inference
    from silverlabel.stages import reinforce
    from silverlabel.stages.reinforce import ReinforceConfig, run_reinforce
    from silverlabel.teachers import TeacherSpec

    orig_prepare = reinforce._TorchReplay._prepare
    orig_init = inference.GpuDecoder.__init__

    def sync_prepare(self, batch):
        out = orig_prepare(self, batch)
        if self.cuda:
            self.stream.synchronize()
        return out

    def init(self, device, use_hw=True, pool=None):
        orig_init(self, device, use_hw=use_hw and variant != "nohw", pool=pool)
        if variant == "noreuse":
            self.reuse = False

    if variant == "sync":
        reinforce._TorchReplay._prepare = sync_prepare
    if variant == "dense":  # the float64 matrix-product resize instead of the Triton kernels
        from silverlabel import replay_torch

        orig_resize = replay_torch.resized_crops
        def dense(images, crops, size, method="auto"):
            return orig_resize(images, crops, size, "dense")

        replay_torch.resized_crops = dense
    inference.GpuDecoder.__init__ = init
    outs, counts = [], []
    for rep in range(runs):
        out = root / f"{variant}-{rep}"
        shutil.rmtree(out, ignore_errors=True)
        run_reinforce(ReinforceConfig(trainset=str(root / "ts"), output=str(out),
                                      teachers=(TeacherSpec("efficientnet_lite0"),), augs=4, topk=10,
                                      device=device, workers=1, replay="pil" if variant == "pil" else "auto",
                                      decode="host" if variant == "host" else "gpu"))
        runner = next(iter(reinforce._RUNNER_CACHE.values()), None)
        counts.append(dict(runner.decoders[0].counts) if runner is not None and runner.decoders else {})
        outs.append(out)
        reinforce.close_replay_pool()
    res: dict = {"decoder_counts_cumulative": counts}
    for rep in range(1, runs):
        d = multigpu.rnf_diff(outs[0], outs[rep])
        d["examples"] = [(e["key"], e["tar"], e.get("max_prob_diff")) for e in d["examples"]]
        res[f"run0_vs_run{rep}"] = d
    if runs > 2:
        d = multigpu.rnf_diff(outs[1], outs[2])
        d["examples"] = [(e["key"], e["tar"], e.get("max_prob_diff")) for e in d["examples"]]
        res["run1_vs_run2"] = d
    return res


def trace(root: Path, device: str, use_hw: bool) -> dict:
    """In this (fresh) process: reinforce twice with the torch replay, recording per batch the
    bytes of every decoded image, of every view after the crop+resize, after the RandAugment
    ops and at the teacher's input, and the teacher's outputs; then where run 0 and run 1 part."""
    import hashlib
    import logging

    import numpy as np
    import torch

    from silverlabel import inference, replay_torch
    from silverlabel.stages import reinforce
    from silverlabel.stages.reinforce import ReinforceConfig, run_reinforce
    from silverlabel.teachers import TeacherSpec

    logging.basicConfig(level=logging.WARNING)
    rec: list = []  # per run: list of per-call dicts
    orig_prepare = reinforce._TorchReplay._prepare
    orig_resize = replay_torch.resized_crops
    orig_ops = replay_torch.apply_ops
    orig_init = inference.GpuDecoder.__init__
    orig_decode = reinforce._TorchReplay._decode
    stash: dict = {}

    def sync() -> None:
        if torch.cuda.is_available() and device != "cpu":
            torch.cuda.current_stream().synchronize()

    def h(t) -> str:
        return hashlib.sha1(np.ascontiguousarray(t.detach().cpu().numpy()).tobytes()).hexdigest()[:12]

    def init(self, device, use_hw=True, pool=None):
        orig_init(self, device, use_hw=use_hw and use_hw_flag, pool=pool)

    use_hw_flag = use_hw
    inference.GpuDecoder.__init__ = init

    def decode(self, need):
        images, keep = orig_decode(self, need)
        sync()
        stash["images"] = [(self.index[i].key, tuple(t.shape), t.stride(), h(t), t.cpu().numpy().copy())
                           for i, t in zip(need, images)]
        return images, keep

    def resize(images, crops, size, method="auto"):
        out = orig_resize(images, crops, size, method=method)
        sync()
        stash.setdefault("crops", []).append([h(x) for x in out])
        stash.setdefault("crop_meta", []).append([(int(c[0]), tuple(int(v) for v in c[1])) for c in crops])
        return out

    def ops(x, op_lists):
        before = [h(v) for v in x]
        out = orig_ops(x, op_lists)
        sync()
        stash.setdefault("ops", []).append((before, [h(v) for v in out], [list(map(tuple, o)) for o in op_lists]))
        return out

    def prepare(self, batch):
        stash.clear()
        out = orig_prepare(self, batch)
        if self.stream is not None:
            self.stream.synchronize()
        rec[-1].append({"keys": [self.index[i].key for i in batch], "images": stash.get("images"),
                        "crops": stash.get("crops"), "crop_meta": stash.get("crop_meta"), "ops": stash.get("ops"),
                        "final": [[h(v) for v in x] for x in out[0]]})
        return out

    reinforce._TorchReplay._decode = decode
    reinforce._TorchReplay._prepare = prepare
    replay_torch.resized_crops = resize
    replay_torch.apply_ops = ops
    outs = []
    for rep in range(2):
        rec.append([])
        out = root / f"trace-{int(use_hw)}-{rep}"
        shutil.rmtree(out, ignore_errors=True)
        run_reinforce(ReinforceConfig(trainset=str(root / "ts"), output=str(out),
                                      teachers=(TeacherSpec("efficientnet_lite0"),), augs=4, topk=10,
                                      device=device, workers=1, replay="torch", decode="gpu"))
        outs.append(out)
    import multigpu

    from PIL import Image

    from silverlabel.formats.wds import iter_tar_samples

    pillow = {}
    for tar in sorted((root / "ts").glob("*-train-0000.tar")):
        with open(tar, "rb") as f:
            for smp in iter_tar_samples(str(tar)):
                off, size = smp.members["jpg"]
                f.seek(off)
                pillow[smp.key] = np.asarray(Image.open(io.BytesIO(f.read(size))).convert("RGB"))
    res: dict = {"triton_failed": list(replay_torch._TRITON_FAILED), "calls": [len(r) for r in rec],
                 "rnf": {k: v for k, v in multigpu.rnf_diff(outs[0], outs[1]).items() if k != "examples"}}
    first = {}
    stages = {"images": 0, "crops": 0, "ops_in": 0, "ops_out": 0, "final": 0}
    examples = []
    for c, (a, b) in enumerate(zip(rec[0], rec[1])):
        assert a["keys"] == b["keys"]
        for (ka, sa, sta, ha, xa), (_kb, sb, stb, hb, xb) in zip(a["images"], b["images"]):
            if ha != hb:
                stages["images"] += 1
                first.setdefault("images", c)
                if len(examples) < 8:
                    d = np.abs(xa.astype(int) - xb.astype(int)) if xa.shape == xb.shape else None
                    ref = pillow.get(ka)
                    e = {"call": c, "key": ka, "shape": [sa, sb], "strides": [sta, stb],
                         "px_differ": None if d is None else int((d > 0).sum()),
                         "max": None if d is None else int(d.max())}
                    if d is not None:
                        ys, xs_ = np.nonzero(d.max(-1) if d.ndim == 3 else d)
                        e["bbox_yx"] = [int(ys.min()), int(ys.max()), int(xs_.min()), int(xs_.max())]
                    if ref is not None:
                        e["vs_pillow_max"] = [int(np.abs(x.astype(int) - ref.astype(int)).max()) for x in (xa, xb)]
                    examples.append(e)
        for ca, cb, ma in zip(a["crops"], b["crops"], a["crop_meta"]):
            for v, (x, y) in enumerate(zip(ca, cb)):
                if x != y:
                    stages["crops"] += 1
                    first.setdefault("crops", c)
                    if len(examples) < 16:
                        examples.append({"call": c, "crop_view": v, "crop": ma[v]})
        for (ba, oa, la), (bb, ob, _lb) in zip(a["ops"], b["ops"]):
            for v in range(len(ba)):
                if ba[v] != bb[v]:
                    stages["ops_in"] += 1
                elif oa[v] != ob[v]:
                    stages["ops_out"] += 1
                    first.setdefault("ops_out", c)
                    if len(examples) < 24:
                        examples.append({"call": c, "ops_view": v, "ops": la[v]})
        for fa, fb in zip(a["final"], b["final"]):
            stages["final"] += sum(x != y for x, y in zip(fa, fb))
    res.update(differing=stages, first_call=first, examples=examples)
    return res


def decode_check(root: Path, device: str, use_hw: bool, passes: int = 3, batch: int = 80,
                 devsync: bool = False, reuse: bool = True) -> dict:
    """In this (fresh) process: the GPU decoder alone over the first shard's JPEGs, in batches,
    ``passes`` times; each image against Pillow's decode (a JPEG decoder may differ by a grey
    level or two; more is a wrong decode) and against its own first pass; and the CUDA array
    interface of a decoded image (a ``stream`` there is one the consumer must wait for).
    ``devsync`` waits for the whole device after each batch (not just the decode stream);
    ``reuse=False`` decodes into new buffers every batch. For each image whose bytes change
    between passes, ``tail`` gives each pass's largest difference from Pillow in the last
    16 rows (the bottom MCU row), to tell which pass decoded it right."""
    import hashlib

    import numpy as np
    import torch
    from PIL import Image

    from silverlabel.formats.wds import iter_tar_samples
    from silverlabel.inference import GpuDecoder
    from silverlabel.replay_torch import ref_tensor

    tar = sorted((root / "ts").glob("*-train-0000.tar"))[0]
    blobs, keys = [], []
    with open(tar, "rb") as f:
        for smp in iter_tar_samples(str(tar)):
            off, size = smp.members["jpg"]
            f.seek(off)
            blobs.append(f.read(size))
            keys.append(smp.key)
    ref = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs]
    dec = GpuDecoder(device, use_hw=use_hw)
    dec.reuse = reuse
    stream = torch.cuda.Stream(device)
    out: dict = {"counts": None, "passes": [], "cuda_array_interface": None}
    first: dict = {}
    tails: dict = {}
    with torch.cuda.stream(stream):
        for p in range(passes):
            bad, changed = [], []
            for b0 in range(0, len(blobs), batch):
                refs, errors, keep = dec.decode(blobs[b0:b0 + batch])
                stream.synchronize()
                if devsync:
                    torch.cuda.synchronize(device)
                if out["cuda_array_interface"] is None and keep:  # does the decoder name a stream to wait for?
                    ims = [im for item in keep if isinstance(item, tuple) for im in item[1] if im is not None]
                    if ims:
                        cai = dict(ims[0].__cuda_array_interface__)
                        out["cuda_array_interface"] = {k: str(v) for k, v in cai.items()}
                for j, r in enumerate(refs):
                    x = ref_tensor(r, device).cpu().numpy()
                    digest = hashlib.sha1(x.tobytes()).hexdigest()
                    if first.setdefault(keys[b0 + j], digest) != digest:
                        changed.append(keys[b0 + j])
                    d = np.abs(x.astype(int) - ref[b0 + j].astype(int))
                    tails.setdefault(keys[b0 + j], []).append(int(d[-16:].max()))
                    if d.max() > 8:
                        ys, xs_ = np.nonzero(d.max(-1))
                        bad.append({"key": keys[b0 + j], "shape": list(x.shape), "max": int(d.max()),
                                    "bbox_yx": [int(ys.min()), int(ys.max()), int(xs_.min()), int(xs_.max())]})
                del keep
            out["passes"].append({"pass": p, "bad": len(bad), "examples": bad[:6], "changed_vs_pass0": len(changed),
                                  "changed_examples": changed[:6]})
    out["counts"] = dict(dec.counts)
    changed_keys = [k for k, v in tails.items() if len(set(v)) > 1]
    out["tail_max_vs_pillow_of_changed"] = {k: tails[k] for k in changed_keys[:12]}
    out["changed_any_pass"] = len(changed_keys)
    out["devsync"], out["reuse"] = devsync, reuse
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--runs", type=int, default=3, help="runs per variant, in one process")
    ap.add_argument("--variants", default="host,base,nocache,nohw,noreuse,sync,pil")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant in this process
    ap.add_argument("--trace", choices=("hw", "nohw"), help="record where run 0 and run 1 part, in this process")
    ap.add_argument("--decode-check", choices=("hw", "nohw"), help="the GPU decoder alone vs Pillow, in this process")
    ap.add_argument("--devsync", action="store_true", help="--decode-check: wait for the whole device after each batch")
    ap.add_argument("--no-reuse", action="store_true", help="--decode-check: new decode buffers every batch")
    args = ap.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="silverlabel-rnf-det-"))
    root.mkdir(parents=True, exist_ok=True)
    if args.one:
        print("RESULT " + json.dumps(one_variant(args.one, root, args.runs, args.device)), flush=True)
        return 0
    import multigpu

    if not (root / "ts" / "_info.json").exists():
        multigpu.toy_trainset(root, args.images, (320, 240))
    if args.decode_check:
        res = decode_check(root, args.device, args.decode_check == "hw", devsync=args.devsync,
                           reuse=not args.no_reuse)
        print("DECODE " + json.dumps(res), flush=True)
        return 0
    if args.trace:
        res = trace(root, args.device, args.trace == "hw")
        print("TRACE " + json.dumps(res), flush=True)
        if args.json:
            args.json.write_text(json.dumps(res, indent=1))
        return 0
    results = {}
    for variant in args.variants.split(","):
        env = dict(os.environ)
        if variant == "nocache":
            env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
        p = subprocess.run([sys.executable, __file__, "--one", "base" if variant == "nocache" else variant,
                            "--out", str(root), "--runs", str(args.runs), "--device", args.device],
                           env=env, capture_output=True, text=True)
        lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        results[variant] = json.loads(lines[-1][7:]) if lines else {"error": p.stderr[-2000:]}
        print(variant, json.dumps(results[variant])[:1500], flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
