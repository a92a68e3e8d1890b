#!/usr/bin/env python3
"""Is ``reinforce`` on a GPU deterministic run to run? A diagnostic, not a benchmark.

Builds bench/multigpu.py's toy training set, reinforces it twice per variant with one worker
(in this process) and compares the two outputs member by member (bench/multigpu.py's
``rnf_diff``). Variants switch one suspect off at a time:

- ``base``: the stage as it is (``--replay auto``: torch replay on the GPU);
- ``sync``: the replay thread waits for its stream at the end of each batch (as label's producer does);
- ``noreuse``: the decoder allocates new output buffers for every batch;
- ``nohw``: nvJPEG on the SMs instead of the hardware JPEG engines;
- ``pil``: the CPU replay (Pillow) feeding the same GPU teacher.

    python bench/reinforce_determinism.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "bench"), str(REPO / "tests")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--variants", default="base,sync,noreuse,nohw,pil")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import multigpu
    import torch

    from silverlabel import inference
    from silverlabel.stages import reinforce
    from silverlabel.stages.reinforce import ReinforceConfig, run_reinforce
    from silverlabel.teachers import TeacherSpec

    root = args.out or Path(tempfile.mkdtemp(prefix="silverlabel-rnf-det-"))
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "ts" / "_info.json").exists():
        multigpu.toy_trainset(root, args.images, (320, 240))
    orig_prepare = reinforce._TorchReplay._prepare
    orig_init = inference.GpuDecoder.__init__

    def sync_prepare(self, batch):
        out = orig_prepare(self, batch)
        if self.cuda:
            self.stream.synchronize()
        return out

    def init_with(**kw):
        def init(self, device, use_hw=True, pool=None):
            orig_init(self, device, use_hw=kw.get("use_hw", use_hw), pool=pool)
            if "reuse" in kw:
                self.reuse = kw["reuse"]
        return init

    results = {}
    for variant in args.variants.split(","):
        reinforce._TorchReplay._prepare = sync_prepare if variant == "sync" else orig_prepare
        inference.GpuDecoder.__init__ = (init_with(reuse=False) if variant == "noreuse" else
                                         init_with(use_hw=False) if variant == "nohw" else orig_init)
        outs = []
        for rep in range(2):
            out = root / f"{variant}-{rep}"
            shutil.rmtree(out, ignore_errors=True)
            run_reinforce(ReinforceConfig(trainset=str(root / "ts"), output=str(out),
                                          teachers=(TeacherSpec("efficientnet_lite0"),), augs=4, topk=10,
                                          device=args.device, workers=1,
                                          replay="pil" if variant == "pil" else "auto"))
            outs.append(out)
            reinforce.close_replay_pool()
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
        d = multigpu.rnf_diff(*outs)
        d["examples"] = d["examples"][:2]
        results[variant] = d
        print(variant, json.dumps(d), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
