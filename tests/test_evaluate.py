"""silverlabel eval: top-k / ReaL helpers, label-space mapping, end to end on a tiny run, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from toy_trainset import write_toy_trainset

from silverlabel.cli import main
from silverlabel.log import Progress
from silverlabel.stages.evaluate import EvalConfig, map_scores, real_accuracy, run_eval, topk_accuracy
from silverlabel.stages.train import TrainConfig, run_train

NUM_CLASSES = 4
SPLITS = {"train": [12, 12], "validation": [7, 6]}  # validation: 13, not a multiple of the batch size


def _write_trainset(root):
    def sample(i, split, width, height):
        c = i % NUM_CLASSES
        if split == "validation" and i % 5 == 0:
            c = -1  # unlabeled: skipped by top-k
        return c, {"label": c, "width": width, "height": height}

    classes = {"label_space": "top1", "num_classes": NUM_CLASSES,
               "classes": [{"cls": c, "wnid": f"n{c:08d}", "name": f"class-{c}"} for c in range(NUM_CLASSES)]}
    return write_toy_trainset(root, SPLITS, sample, size=(48, 40), seed=5, classes=classes)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    ts = _write_trainset(root / "trainset")
    cfg = TrainConfig(str(ts), str(root / "run"), model="test_vit", img_size=32, batch_size=8, steps=3, lr=2e-3,
                      log_every=1, ckpt_every=1000, ema_decay=0.9)
    run_train(cfg, progress=False)
    return str(ts), str(root / "run")


def test_topk_accuracy_by_hand():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.2, 0.3, 0.4],   # ranking 1,5,4,3,0,2
                           [0.9, 0.1, 0.2, 0.3, 0.4, 0.5],   # ranking 0,5,4,3,2,1
                           [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],   # ranking 5,4,3,2,1,0
                           [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])  # unlabeled
    targets = torch.tensor([1, 1, 0, -1])
    acc = topk_accuracy(logits, targets, ks=(1, 2, 5))
    # row0: top1 hit; row1: target 1 is last (rank 6) -> miss at 5; row2: target 0 is last
    assert acc == {1: pytest.approx(1 / 3), 2: pytest.approx(1 / 3), 5: pytest.approx(1 / 3)}
    targets = torch.tensor([5, 5, 5, -1])  # only row 2 ranks 5 first; all have it in the top 5
    assert topk_accuracy(logits, targets) == {1: pytest.approx(1 / 3), 5: pytest.approx(1.0)}
    assert math.isnan(topk_accuracy(logits, torch.full((4,), -1))[1])
    # k above the class count counts everything
    assert topk_accuracy(logits[:, :3], torch.tensor([2, 2, 0, -1]), ks=(5,)) == {5: 1.0}


def test_real_accuracy_skips_empty_sets():
    # 4 samples, the third has no valid label: 2 of the 3 others are right
    assert real_accuracy([3, 1, 7, 2], [[3, 4], [0], [], [2]]) == pytest.approx(2 / 3)
    assert real_accuracy(torch.tensor([3, 1, 7, 2]), [[3, 4], [0], [], [2]]) == pytest.approx(2 / 3)
    assert math.isnan(real_accuracy([1], [[]]))
    # top-k rows: right when any prediction is in the set
    assert real_accuracy([[0, 1], [2, 3]], [[1], [4]]) == 0.5


def test_label_space_mapping_in21k_to_in1k():
    from silverlabel.teachers.labelspace import get_label_space

    in21k = get_label_space("in21k")
    logits = torch.zeros(1, 21841)
    logits[0, in21k.index("n02124075")] = 10.0  # Egyptian cat
    scores = map_scores(logits.softmax(dim=1), "in21k", "in1k")
    assert scores.shape == (1, 1000)
    assert int(scores.argmax()) == 285
    assert float(scores.sum()) < 1.0  # classes outside in1k were dropped
    with pytest.raises(ValueError, match="21841"):
        map_scores(torch.zeros(1, 1000), "in21k", "in1k")


def test_run_eval_end_to_end(trained, tmp_path):
    ts, run = trained
    n_val = sum(SPLITS["validation"])
    progress = Progress(bar=False, desc="eval")
    r = run_eval(EvalConfig(run, ts, split="validation", batch_size=4, device="cpu"), progress=progress)
    assert (progress.total, progress.done, progress.ok) == (n_val, n_val, n_val)  # told the split's size up front
    with open(f"{run}/eval-validation.json") as f:
        out = json.load(f)
    assert out["counts"]["samples"] == n_val
    unlabeled = sum(1 for i in range(24, 24 + n_val) if i % 5 == 0)
    assert out["counts"]["labeled"] == n_val - unlabeled
    assert 0.0 <= out["top1"] <= out["top5"] <= 1.0
    assert out["top5"] == 1.0  # 4 classes: always in the top 5
    assert out["real"] is None and out["weights"] == "model" and out["step"] == 3
    assert sum(d["count"] for d in out["per_class"]) == out["counts"]["labeled"]
    assert [d["name"] for d in out["per_class"]] == [f"class-{c}" for c in range(NUM_CLASSES)]
    assert r["top1"] == out["top1"]

    # ReaL labels by position: every sample's set is all classes except one empty set
    labels = [list(range(NUM_CLASSES))] * n_val
    labels[0] = []
    (tmp_path / "real.json").write_text(json.dumps(labels))
    r = run_eval(EvalConfig(run, ts, split="validation", batch_size=5, ema=True, device="cpu",
                            real_labels=str(tmp_path / "real.json"), out=str(tmp_path / "e.json")))
    assert r["weights"] == "ema" and r["real"]["count"] == n_val - 1 and r["real"]["top1"] == 1.0
    assert json.loads((tmp_path / "e.json").read_text())["real"]["count"] == n_val - 1
    # by key: only the keys given count
    (tmp_path / "real2.json").write_text(json.dumps({"s00024": [99], "s00025": []}))
    r = run_eval(EvalConfig(run, ts, split="validation", device="cpu", real_labels=str(tmp_path / "real2.json"),
                            out=str(tmp_path / "e2.json")))
    assert r["real"] == {"count": 1, "top1": 0.0, "top5": 0.0}


def test_errors(trained, tmp_path):
    ts, run = trained
    with pytest.raises(ValueError, match="no split 'test'"):
        run_eval(EvalConfig(run, ts, split="test", device="cpu"))
    with pytest.raises(FileNotFoundError):
        run_eval(EvalConfig(str(tmp_path / "nope"), ts, device="cpu"))
    (tmp_path / "bad.json").write_text("[[1]]")
    with pytest.raises(ValueError, match="1 label sets for 13 samples"):
        run_eval(EvalConfig(run, ts, device="cpu", real_labels=str(tmp_path / "bad.json"), out=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="together"):
        EvalConfig(run, ts, head_space="in21k")


def test_cli(trained, tmp_path, capsys):
    ts, run = trained
    rc = main(["eval", run, "--data", ts, "--split", "train", "--batch-size", "8", "--device", "cpu",
               "--out", str(tmp_path / "t.json"), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "top-1 accuracy" in text and "top-5 accuracy" in text and "class-3" in text
    assert json.loads((tmp_path / "t.json").read_text())["counts"]["samples"] == sum(SPLITS["train"])
    # the bar of every stage (silverlabel.log.Progress): the split's total and a rate; none with -q
    argv = ["eval", run, "--data", ts, "--batch-size", "8", "--device", "cpu", "--out", str(tmp_path / "v.json")]
    n_val = sum(SPLITS["validation"])
    assert main([*argv, "--progress"]) == 0
    err = capsys.readouterr().err
    assert f"{n_val}/{n_val}" in err and "100%" in err and "img/s" in err, err
    assert main(["-q", *argv, "--progress"]) == 0 and capsys.readouterr().err == ""
    rc = main(["eval", str(tmp_path / "missing"), "--data", ts])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "error" in err
