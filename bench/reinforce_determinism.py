#!/usr/bin/env python3
"""Is ``reinforce`` on a GPU deterministic run to run? A diagnostic, not a benchmark.

Builds bench/multigpu.py's toy training set (photos that vary in size, some gray), then for
each variant starts a fresh process that reinforces it ``--runs`` times with one worker and
compares every run with the first, member by member (bench/multigpu.py's ``rnf_diff``), and
prints the GPU decoder's paths. Variants switch one suspect off at a time:

- ``base``: the stage as it is (``--replay auto``: torch replay on the GPU);
- ``sync``: the replay thread waits for its stream at the end of each batch;
- ``noreuse``: the decoder allocates new output buffers for every batch;
- ``nohw``: nvJPEG on the SMs instead of the hardware JPEG engines;
- ``pil``: the CPU replay (Pillow) feeding the same GPU teacher;
- ``nocache``: ``base`` with PyTorch's CUDA caching allocator off (every allocation fresh).

What it showed on the H200 (2026-11-29), all runs in one process: the first run differed
from the later ones on ~4% of the first shard's samples (the same samples, the same
probabilities, every time; the later runs identical to each other); reinforce with two
workers differed in each worker's first shard. So a process's first shard differs, not a
race: something reads memory that a fresh allocation and a reused one fill differently,
or warms up. One fresh process per variant separates the suspects.

    python bench/reinforce_determinism.py --json out.json
"""

from __future__ import annotations

import argparse
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
    inference.GpuDecoder.__init__ = init
    outs, counts = [], []
    for rep in range(runs):
        out = root / f"{variant}-{rep}"
        shutil.rmtree(out, ignore_errors=True)
        run_reinforce(ReinforceConfig(trainset=str(root / "ts"), output=str(out),
                                      teachers=(TeacherSpec("efficientnet_lite0"),), augs=4, topk=10,
                                      device=device, workers=1, replay="pil" if variant == "pil" else "auto"))
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--runs", type=int, default=3, help="runs per variant, in one process")
    ap.add_argument("--variants", default="base,nocache,nohw,noreuse,sync,pil")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = ap.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="silverlabel-rnf-det-"))
    root.mkdir(parents=True, exist_ok=True)
    if args.one:
        print("RESULT " + json.dumps(one_variant(args.one, root, args.runs, args.device)), flush=True)
        return 0
    import multigpu

    if not (root / "ts" / "_info.json").exists():
        multigpu.toy_trainset(root, args.images, (320, 240))
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
