"""ReaL-style label sets from the teacher, for a training set without human multi-labels.

For each sample of SPLIT: the classes of TRAINSET/classes.json whose teacher probability
(the sample's ``labels``/``label_probs``, in the selection's label space) is >= --min-prob.
Writes ``{key: [cls, ...]}`` for ``silverlabel eval --real-labels``. With ImageNet itself use
the real ReaL file instead (timm ships it as ``timm/data/_info/imagenet_real_labels.json``).

    python examples/teacher_label_sets.py demo-output/trainset --min-prob 0.05 -o real.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from silverlabel.formats.wds import iter_tar_samples, read_member


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trainset")
    ap.add_argument("--split", default="validation")
    ap.add_argument("--min-prob", type=float, default=0.05)
    ap.add_argument("-o", "--out", required=True)
    args = ap.parse_args()
    root = Path(args.trainset)
    doc = json.loads((root / "classes.json").read_text())
    to_cls = {int(c["source_index"]): int(c["cls"]) for c in doc["classes"] if c.get("source_index") is not None}
    sets: dict[str, list[int]] = {}
    info = json.loads((root / "_info.json").read_text())  # the training set's shard list (timm's format)
    for name in info["splits"][args.split]["filenames"]:
        path = str(root / name)
        with open(path, "rb") as f:
            for s in iter_tar_samples(path):
                meta = json.loads(read_member(f, *s.members["json"]))
                chosen = {to_cls[i] for i, p in zip(meta.get("labels", []), meta.get("label_probs", []))
                          if p >= args.min_prob and i in to_cls}
                sets[s.key] = sorted(chosen)
    Path(args.out).write_text(json.dumps(sets))
    print(f"{args.out}: label sets of {len(sets)} samples ({sum(1 for v in sets.values() if not v)} empty)")


if __name__ == "__main__":
    main()
