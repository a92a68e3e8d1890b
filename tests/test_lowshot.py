"""Low-shot evaluation (eval --lowshot): balanced subsets, the linear probe, short fine-tuning."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from silverlabel import cli
from silverlabel.formats.wds import ShardWriter
from silverlabel.loader import LoaderConfig, create_loader, steps_per_epoch
from silverlabel.stages.lowshot import (LowShotConfig, balanced_subset, fit_logistic, format_lowshot, index_split,
                                        run_lowshot)
from silverlabel.stages.train import TrainConfig, run_train

COLORS = [(200, 40, 40), (40, 180, 60), (50, 70, 210), (220, 200, 40)]  # one hue per class
PER_CLASS = {"train": [30, 26, 22, 20], "validation": [6, 6, 6, 6]}


def _image(rng, c):
    a = np.clip(np.array(COLORS[c], np.float32) + rng.normal(0, 25, (40, 48, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _write(root):
    """Two train shards and one validation shard, classes told apart by colour."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    info, i = {}, 0
    for split, counts in PER_CLASS.items():
        labels = [c for c, n in enumerate(counts) for _ in range(n)]
        rng.shuffle(labels)
        halves = [labels] if split == "validation" else [labels[: len(labels) // 2], labels[len(labels) // 2:]]
        files = []
        for s, part in enumerate(halves):
            name = f"col-{split}-{s:04d}.tar"
            with open(root / name, "wb") as f, ShardWriter(f) as w:
                for c in part:
                    w.write(f"k{i:04d}", {"jpg": _image(rng, c), "cls": str(c).encode(),
                                          "json": json.dumps({"label": c}).encode()})
                    i += 1
            files.append(name)
        info[split] = {"name": split, "num_samples": len(labels), "filenames": files,
                       "shard_lengths": [len(p) for p in halves]}
    (root / "classes.json").write_text(json.dumps({"num_classes": 4, "label_space": "source",
                                                   "classes": ["red", "green", "blue", "yellow"]}))
    (root / "_info.json").write_text(json.dumps({"name": "col", "splits": info}))
    return root


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A colour training set and a (briefly) pretrained test_vit on it."""
    base = tmp_path_factory.mktemp("lowshot")
    ts = _write(base / "trainset")
    run = base / "pre"
    run_train(TrainConfig(str(ts), str(run), model="test_vit", img_size=32, batch_size=16, steps=3, lr=1e-3,
                          log_every=1), progress=False)
    return str(ts), str(run)


def test_balanced_subset_rule(pretrained):
    ts, _ = pretrained
    train = index_split(ts, "train")
    assert len(train) == 98 and Counter(r.cls for r in train) == {0: 30, 1: 26, 2: 22, 3: 20}
    sub = balanced_subset(train, 0.1, seed=0)  # floor(9.8) = 9 = 4 classes x 2 + 1
    assert len(sub) == 9 and sorted(Counter(r.cls for r in sub).values()) == [2, 2, 2, 3]
    big = balanced_subset(train, 0.5, seed=0)  # 49 = 4 x 12 + 1
    assert len(big) == 49 and sorted(Counter(r.cls for r in big).values()) == [12, 12, 12, 13]
    assert [r.key for r in balanced_subset(train, 0.1, seed=0)] == [r.key for r in sub]  # deterministic
    assert {r.key for r in balanced_subset(train, 0.1, seed=1)} != {r.key for r in sub}
    order = [r.key for r in train]
    assert [r.key for r in sub] == sorted((r.key for r in sub), key=order.index)  # file order kept
    with pytest.raises(ValueError, match="fewer than its quota"):
        balanced_subset(train, 1.0, seed=0)  # 98 = 4 x 24 + 2 but class 3 has 20


def test_fit_logistic_hand_checkable():
    # two separable clusters: perfect accuracy; a huge L2 strength shrinks the weights to ~0
    x = torch.tensor([[-2.0, 0.1], [-1.5, -0.2], [-1.8, 0.3], [2.0, 0.0], [1.7, -0.1], [2.2, 0.2]])
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    w, b = fit_logistic(x, y, 2, wd=1e-4)
    assert ((x @ w + b).argmax(1) == y).all()
    w2, _ = fit_logistic(x, y, 2, wd=1e3)
    assert w2.abs().max() < 0.01 < w.abs().max()


def test_lowshot_probe_and_finetune(pretrained, tmp_path):
    ts, run = pretrained
    cfg = LowShotConfig(run, ts, fractions=(0.1, 0.5), ft_steps=4, ft_lr=1e-3, batch_size=16, out=str(tmp_path / "ls"),
                        probe_iters=50)
    msgs = []
    r = run_lowshot(cfg, log=msgs.append)
    assert r["val_samples"] == 24 and r["num_classes"] == 4
    assert r["subsets"]["10pct"] == {"fraction": 0.1, "samples": 9, "per_class": [2, 3]}
    assert r["subsets"]["50pct"]["samples"] == 49
    for tag in ("10pct", "50pct"):
        probe = r["results"][tag]["probe"]
        assert 0.0 <= probe["top1"] <= probe["top5"] <= 1.0
        ft = r["results"][tag]["finetune"]
        assert ft["steps"] == 4 and 0.0 <= ft["top1"] <= 1.0
        ev = json.loads((tmp_path / "ls" / f"finetune-{tag}" / "eval-validation.json").read_text())
        assert ev["counts"]["samples"] == 24 and ev["top1"] == ft["top1"]
        ck = torch.load(tmp_path / "ls" / f"finetune-{tag}" / "checkpoint-final.pt", weights_only=True)
        assert ck["model"]["head.weight"].shape[0] == 4  # the target classes' head
    # colours are linearly separable in the features: with half the labels the probe is near perfect
    assert r["results"]["50pct"]["probe"]["top1"] >= 0.9
    assert r["results"]["50pct"]["probe"]["sweep_holdout_top1"]  # the L2 strength was chosen on held-out data
    # the fine-tuning training set holds exactly the subset, members byte for byte, readable by the loader
    sub = tmp_path / "ls" / "subset-50pct"
    lcfg = LoaderConfig(str(sub), batch_size=7, train=False, drop_last=False, return_keys=True, img_size=32)
    keys = [k for b in create_loader(lcfg) for k in b[-1]]
    assert len(keys) == 49 and steps_per_epoch(lcfg) == 7
    orig = {x.key: x for x in index_split(ts, "train")}
    copy = index_split(str(sub), "train")
    assert [x.cls for x in copy] == [orig[x.key].cls for x in copy]
    with open(copy[0].shard, "rb") as a, open(orig[copy[0].key].shard, "rb") as b:
        a.seek(copy[0].image[0]), b.seek(orig[copy[0].key].image[0])
        assert a.read(copy[0].image[1]) == b.read(orig[copy[0].key].image[1])
    saved = json.loads((tmp_path / "ls" / "lowshot.json").read_text())
    assert saved["results"] == json.loads(json.dumps(r["results"]))
    table = format_lowshot(r)
    assert "50pct" in table and "probe" in table and "finetune" in table

    # a rerun reuses the subsets and the finished fine-tuning runs, with the same numbers
    mtime = (sub / "subset-train-0000.tar").stat().st_mtime_ns
    ck_mtime = (tmp_path / "ls" / "finetune-50pct" / "checkpoint-final.pt").stat().st_mtime_ns
    r2 = run_lowshot(cfg, log=msgs.append)
    assert (sub / "subset-train-0000.tar").stat().st_mtime_ns == mtime
    assert (tmp_path / "ls" / "finetune-50pct" / "checkpoint-final.pt").stat().st_mtime_ns == ck_mtime  # not retrained
    assert r2["results"] == r["results"]


def test_lowshot_new_head_other_size_and_changed_settings(pretrained, tmp_path):
    ts, run = pretrained
    base = dict(fractions=(0.5,), ft_steps=2, ft_lr=1e-3, batch_size=16, out=str(tmp_path / "ls"), probe_iters=20)
    r = run_lowshot(LowShotConfig(run, ts, img_size=48, **base), log=lambda *a: None)  # the run is 32 px
    assert r["img_size"] == 48 and r["results"]["50pct"]["probe"]["top1"] is not None
    init = torch.load(tmp_path / "ls" / "init.pt", weights_only=True)
    pre = torch.load(Path(run) / "checkpoint-final.pt", weights_only=True)["model"]
    assert "head.weight" not in init and "head.bias" not in init  # the pretrained head is never reused
    assert torch.equal(init["blocks.0.attn.qkv.weight"], pre["blocks.0.attn.qkv.weight"])
    ft = tmp_path / "ls" / "finetune-50pct"
    first = json.loads((ft / "eval-validation.json").read_text())
    assert json.loads((ft / "lowshot-run.json").read_text())["train"]["steps"] == 2
    # other settings: the old fine-tune is not resumed but started again
    r2 = run_lowshot(LowShotConfig(run, ts, img_size=48, **{**base, "ft_steps": 3}), log=lambda *a: None)
    assert r2["results"]["50pct"]["finetune"]["steps"] == 3
    rows = [json.loads(ln)["step"] for ln in (ft / "metrics.jsonl").read_text().splitlines()]
    assert rows == [3]  # a fresh run (logs every 3 steps), not the 2-step run continued
    assert first["step"] == 2
    with pytest.raises(ValueError, match="seed"):
        LowShotConfig(run, ts, seed=-1)


def test_cli_eval_lowshot(pretrained, tmp_path, capsys):
    ts, run = pretrained
    out = tmp_path / "ls"
    rc = cli.main(["eval", run, "--data", ts, "--lowshot", "0.5", "--lowshot-modes", "probe", "--out", str(out),
                   "--device", "cpu"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "50pct" in text and "probe" in text and (out / "lowshot.json").exists()
    assert cli.main(["eval", run, "--data", ts, "--lowshot", "1.5"]) == 2
    assert "fractions must be in (0, 1]" in capsys.readouterr().err
