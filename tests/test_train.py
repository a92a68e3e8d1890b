"""silverlabel train: loss goes down, every loss runs, exact resume, --init fine-tuning."""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import pytest
import torch

from toy_trainset import write_toy_trainset

from silverlabel.errors import UserError
from silverlabel.stages.train import TrainConfig, compute_loss, lr_at, run_train

LENGTHS = [16, 16, 16]
NUM_CLASSES = 4
SPACE = 10  # teacher label space of the toy set


def _write_trainset(root):
    def sample(i, split, width, height):
        c, m = i % NUM_CLASSES, 1 + i % 3
        return c, {"label": c, "labels": [(c + 2 * j) % SPACE for j in range(m)],
                   "label_probs": [round(0.6 / (j + 1), 4) for j in range(m)], "width": width, "height": height}

    return write_toy_trainset(root, {"train": LENGTHS}, sample, size=(80, 64), seed=3,
                              classes={"label_space": "top1", "num_classes": NUM_CLASSES})


@pytest.fixture(scope="module")
def trainset(tmp_path_factory):
    return str(_write_trainset(tmp_path_factory.mktemp("trainset")))


def _cfg(trainset, out, **kw):
    base = dict(model="test_vit", img_size=32, batch_size=8, lr=2e-3, log_every=1, ckpt_every=1000,
                warmup_steps=2, label_space_classes=SPACE)
    base.update(kw)
    return TrainConfig(trainset, str(out), **base)


def _metric_losses(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def test_lr_schedule():
    cfg = TrainConfig("x", "y", lr=1.0, warmup_steps=4)
    assert [lr_at(s, cfg, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg, 14) == 1.0 and lr_at(9, cfg, 14) == pytest.approx(0.5) and lr_at(14, cfg, 14) == 0.0
    lin = dataclasses.replace(cfg, schedule="linear")
    assert lr_at(9, lin, 14) == pytest.approx(0.5)


def test_loss_goes_down(trainset, tmp_path):
    # a fixed small set: one epoch of 6 batches, repeated; 36 steps
    s = run_train(_cfg(trainset, tmp_path / "run", steps=36, lr=3e-3), progress=False)
    losses = [loss for _, loss in s.losses]
    assert len(losses) == 36 and s.steps == 36
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first, (first, last)
    assert (tmp_path / "run" / "checkpoint-final.pt").exists()
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,loss,lr,samples_per_s" and len(rows) == 37


@pytest.mark.parametrize("loss,extra", [("ce", {"label_smoothing": 0.1}),
                                        ("bce-multihot", {"label_threshold": 0.25}),
                                        ("soft-topk", {"label_smoothing": 0.1})])
def test_each_loss_runs(trainset, tmp_path, loss, extra):
    s = run_train(_cfg(trainset, tmp_path / loss, steps=2, loss=loss, optimizer="sgd", **extra),
                  progress=False)
    assert s.steps == 2 and s.final_loss is not None and s.final_loss == s.final_loss
    assert s.num_classes == (NUM_CLASSES if loss == "ce" else SPACE)
    if loss == "bce-multihot":
        ck = torch.load(tmp_path / loss / "checkpoint.pt", weights_only=True)
        assert float(ck["model"]["head.bias"].mean()) < -9  # COYO-ViT init, barely moved


def test_loss_targets():
    logits = torch.zeros(2, 5)
    labels = torch.tensor([[3, 0, -1], [1, -1, -1]])
    probs = torch.tensor([[0.6, 0.2, 0.0], [0.5, 0.0, 0.0]])
    cls = torch.tensor([3, 1])
    # bce with a threshold: row 0 keeps only label 3 (0.2 < 0.3); padding never sets index 0
    cfg = TrainConfig("x", "y", loss="bce-multihot", label_threshold=0.3)
    want = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, torch.tensor([[0, 0, 0, 1, 0], [0, 1, 0, 0, 0.]]), reduction="sum") / 2
    assert compute_loss(cfg, logits, cls, labels, probs) == pytest.approx(float(want))
    # soft-topk on uniform logits: cross-entropy = log(5) whatever the target
    cfg = TrainConfig("x", "y", loss="soft-topk")
    assert float(compute_loss(cfg, logits, cls, labels, probs)) == pytest.approx(float(torch.log(torch.tensor(5.))))
    # a confident correct logit on label 3 (weight 0.75 after renormalising) lowers it
    logits2 = logits.clone()
    logits2[0, 3] = 5
    assert compute_loss(cfg, logits2, cls, labels, probs) < compute_loss(cfg, logits, cls, labels, probs)


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_is_exact(trainset, tmp_path, accum, caplog):
    # 48 samples / 8 = 6 loader batches per epoch -> 6 // accum steps per epoch: 20 steps cross epochs
    kw = dict(steps=20 // accum, accum_steps=accum, ckpt_every=4, ema_decay=0.9, loss="soft-topk")
    quiet = dict(progress=False)
    run_train(_cfg(trainset, tmp_path / "full", **kw), **quiet)
    part = run_train(_cfg(trainset, tmp_path / "part", **kw), stop_after=10 // accum, **quiet)
    assert part.steps == 10 // accum and not (tmp_path / "part" / "checkpoint-final.pt").exists()
    # without --resume an existing run is refused
    with pytest.raises(ValueError, match="--resume"):
        run_train(_cfg(trainset, tmp_path / "part", **kw), **quiet)
    # as if killed after logging steps past the checkpoint: those events must not survive
    from torch.utils.tensorboard import SummaryWriter

    # (event files are read in name order, which has whole seconds in it: keep them apart)
    time.sleep(1.05)
    with SummaryWriter(str(tmp_path / "part" / "tb")) as w:
        w.add_scalar("train/loss", 999.0, 10 // accum + 1)
    time.sleep(1.05)
    with caplog.at_level(logging.INFO, logger="silverlabel.stages.train"):
        rest = run_train(_cfg(trainset, tmp_path / "part", **kw), resume=True, **quiet)
    assert rest.start_step == 10 // accum and rest.steps == 20 // accum
    assert [r.getMessage() for r in caplog.records if r.name == "silverlabel.stages.train"] == [
        f"resumed from {tmp_path / 'part' / 'checkpoint.pt'} at step {10 // accum}"]
    a, b = _metric_losses(tmp_path / "full"), _metric_losses(tmp_path / "part")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 20 // accum + 1))
    assert [x for _, x in a] == [x for _, x in b]  # bit-exact on CPU
    # TensorBoard: the resumed run's events (purged past the checkpoint) equal the full run's
    ta, tb = _tb_losses(tmp_path / "full"), _tb_losses(tmp_path / "part")
    assert [s for s, _ in ta] == [s for s, _ in a]
    assert ta == tb
    assert [x for _, x in ta] == pytest.approx([x for _, x in a], rel=1e-6)  # float32 in the event file
    ca = torch.load(tmp_path / "full" / "checkpoint-final.pt", weights_only=True)
    cb = torch.load(tmp_path / "part" / "checkpoint-final.pt", weights_only=True)
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
        assert torch.equal(ca["ema"][k], cb["ema"][k]), k


def test_restart_before_first_checkpoint_keeps_no_stale_rows(trainset, tmp_path):
    # a run killed before its first checkpoint, started again: metrics and TensorBoard hold one
    # copy of each step, not the dead run's rows followed by the new ones
    quiet = dict(progress=False)
    run_train(_cfg(trainset, tmp_path / "r", steps=4, loss="ce"), **quiet)
    for f in ("checkpoint.pt", "checkpoint-final.pt"):
        (tmp_path / "r" / f).unlink()
    time.sleep(1.05)  # event files are read in name order, which has whole seconds in it
    run_train(_cfg(trainset, tmp_path / "r", steps=4, loss="ce"), **quiet)
    assert [s for s, _ in _metric_losses(tmp_path / "r")] == [1, 2, 3, 4]
    assert [s for s, _ in _tb_losses(tmp_path / "r")] == [1, 2, 3, 4]
    assert (tmp_path / "r" / "metrics.csv").read_text().count("\n") == 5
    # the event files name no host and no process (issue 17: nothing machine-specific)
    import socket

    names = [p.name.split(".") for p in (tmp_path / "r" / "tb").iterdir()]
    assert len(names) == 2 and all(n[:3] == ["events", "out", "tfevents"] and n[4] == "silverlabel" for n in names)
    assert not any(socket.gethostname() in n for n in names)


def _tb_losses(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("train/loss")]


def test_init_finetune_new_classes_and_img_size(trainset, tmp_path, caplog):
    quiet = dict(progress=False)
    run_train(_cfg(trainset, tmp_path / "pre", steps=3, loss="bce-multihot"), **quiet)
    ck = torch.load(tmp_path / "pre" / "checkpoint-final.pt", weights_only=True)
    assert ck["step"] == 3 and ck["config"]["model"] == "test_vit" and ck["model"]["head.weight"].shape[0] == SPACE
    with caplog.at_level(logging.INFO, logger="silverlabel.stages.train"):
        s = run_train(_cfg(trainset, tmp_path / "ft", steps=2, img_size=48,
                           init=str(tmp_path / "pre" / "checkpoint-final.pt")), progress=False)
    # where the weights came from: an info record of train's logger, never a print
    msgs = [r.getMessage() for r in caplog.records
            if r.name == "silverlabel.stages.train" and r.levelno == logging.INFO]
    assert s.steps == 2 and s.num_classes == NUM_CLASSES
    ft = torch.load(tmp_path / "ft" / "checkpoint-final.pt", weights_only=True)
    assert ft["model"]["head.weight"].shape[0] == NUM_CLASSES
    assert ft["model"]["pos_embed"].shape[1] == 1 + 3 * 3  # 48/16 = 3x3 patches + cls token
    assert any("pos_embed" in m and "head" in m for m in msgs)


def test_bad_input(trainset, tmp_path):
    with pytest.raises(ValueError, match="loss"):
        TrainConfig(trainset, str(tmp_path), loss="mse")
    with pytest.raises(ValueError, match="label-space-classes"):
        run_train(TrainConfig(trainset, str(tmp_path / "r"), model="test_vit", img_size=32, batch_size=8, loss="soft-topk"),
                  progress=False)
    with pytest.raises(ValueError, match="batch"):
        run_train(_cfg(trainset, tmp_path / "r2", batch_size=64), progress=False)


def test_cli_train(trainset, tmp_path, capsys):
    from silverlabel.cli import main

    out = tmp_path / "cli"
    args = [trainset, "-o", str(out), "--model", "test_vit", "--img-size", "32", "--batch-size", "8",
            "--log-every", "1", "--steps", "3", "--no-progress"]
    assert main(["train", *args]) == 0
    assert "3 steps" in capsys.readouterr().out
    assert main(["train", *args]) == 2  # exists, no --resume
    assert "--resume" in capsys.readouterr().err
    assert main(["train", *args[:-3], "--steps", "4", "--no-progress", "--resume"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4


def test_ddp_two_process_gloo_equals_one_process(trainset, tmp_path):
    """2 ranks x batch 4 over gloo on the CPU: the same per-step losses (mean over ranks) and
    final weights as one process with batch 8 -- the ranks train on the two halves of each
    global batch, same crops and flips (the loader's global order). 8 steps cross the epoch
    boundary (48 samples = 6 global batches)."""
    import os
    import re
    import shutil
    import subprocess
    import sys

    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "silverlabel.cli", "train", trainset, "-o", str(out), "--model", "test_vit",
           "--img-size", "32", "--batch-size", "4", "--steps", "8", "--warmup-steps", "2", "--lr", "2e-3",
           "--log-every", "1", "--device", "cpu", "--no-progress", "--no-tensorboard"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    # torchrun --standalone picks its ports by binding and releasing them: another process
    # (a Ray cluster shutting down in an earlier test) can take one in between. Only that
    # failure of the launcher, not of training, is retried, once, from scratch.
    if r.returncode != 0 and re.search(r"EADDRINUSE|[Aa]ddress already in use|Connection (refused|reset)", r.stderr):
        shutil.rmtree(out, ignore_errors=True)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    # a rank's own error comes first in torchrun's output, the launcher's summary last
    assert r.returncode == 0, r.stderr[:3000] + "\n...\n" + r.stderr[-1500:]
    assert r.stdout.count("silverlabel train: 8 steps") == 1  # rank 0 only
    two = _metric_losses(out)
    assert [s for s, _ in two] == list(range(1, 9))
    ck2 = torch.load(out / "checkpoint-final.pt", weights_only=True)
    assert ck2["step"] == 8 and ck2["world_size"] == 2

    one_out = tmp_path / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (OMP_NUM_THREADS=1)
    try:
        run_train(TrainConfig(trainset, str(one_out), model="test_vit", img_size=32, batch_size=8, steps=8,
                              warmup_steps=2, lr=2e-3, log_every=1, device="cpu", tensorboard=False), progress=False)
    finally:
        torch.set_num_threads(threads)
    one = _metric_losses(one_out)
    assert [s for s, _ in one] == [s for s, _ in two]
    for (s, a), (_, b) in zip(one, two):
        assert b == pytest.approx(a, rel=1e-5), (s, a, b)
    assert len({round(a, 4) for _, a in one}) > 4  # the losses move: the comparison says something
    ck1 = torch.load(one_out / "checkpoint-final.pt", weights_only=True)
    for k, v in ck1["model"].items():
        # the key bias's gradient is 0 in exact arithmetic (softmax ignores a shift); AdamW
        # scales its float noise up to lr-sized steps, so it alone gets a looser bound
        atol = 1e-4 if k.endswith("qkv.bias") else 1e-5
        torch.testing.assert_close(ck2["model"][k], v, rtol=1e-4, atol=atol, msg=k)
    # the world size is part of the run: resuming the 2-rank run in one process is refused
    with pytest.raises(UserError, match="2 processes"):
        run_train(TrainConfig(trainset, str(out), model="test_vit", img_size=32, batch_size=4, steps=8,
                              warmup_steps=2, lr=2e-3, log_every=1, device="cpu", tensorboard=False),
                  resume=True, progress=False)


def test_loader_workers_scale_with_the_ranks_cores(monkeypatch):
    import os

    from silverlabel.stages.train import loader_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loader_workers(-1, "cuda") == 31 and loader_workers(3, "cuda") == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: 2 ranks share the host's 32 cores
    assert loader_workers(-1, "cuda") == 15
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert loader_workers(-1, "cuda") == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
    assert loader_workers(-1, "cuda") == 1  # never none on a GPU
    assert loader_workers(-1, "cpu") == 0  # the CPU model wants the cores
    with pytest.raises(UserError, match="num_workers"):
        TrainConfig("ts", "run", num_workers=-2)


def test_sync_batchnorm_under_ddp_keeps_the_parameters(caplog):
    import timm

    from silverlabel.stages.train import _sync_batchnorm

    def notes():
        return [r.getMessage() for r in caplog.records if r.name == "silverlabel.stages.train"
                and r.levelno == logging.WARNING]

    vit = timm.create_model("test_vit", num_classes=4)
    assert _sync_batchnorm(vit, torch.device("cuda")) is vit and not notes()  # no BatchNorm: as is
    cnn = timm.create_model("test_efficientnet", num_classes=4)
    keys, params = list(cnn.state_dict()), [id(p) for p in cnn.parameters()]
    assert _sync_batchnorm(cnn, torch.device("cpu"), master=False) is cnn and not notes()  # said by rank 0 only
    assert _sync_batchnorm(cnn, torch.device("cpu")) is cnn
    assert len(notes()) == 1 and "per rank" in notes()[0]  # no SyncBatchNorm on the CPU: a warning
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in cnn.modules())
    synced = _sync_batchnorm(cnn, torch.device("cuda"))  # conversion only: no GPU needed
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules()) > 0
    bn = torch.nn.modules.batchnorm._BatchNorm
    assert all(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules() if isinstance(m, bn))
    # the optimizer (built before) and the checkpoint keys still see the same tensors
    assert [id(p) for p in synced.parameters()] == params and list(synced.state_dict()) == keys
