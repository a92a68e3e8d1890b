"""The command line is generated from the config dataclasses: same defaults as the Python
API, choices from the registries, declared converters, one-line user errors and tracebacks
for bugs; ``import silverlabel`` is cheap and exposes the stages."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from silverlabel.cli import COMMANDS, SelectRun, build_parser, config_from_args, main
from silverlabel.errors import UserError


def _config(argv: list[str], cls: type, **given):
    return config_from_args(cls, build_parser().parse_args(argv), **given)


def _classes():
    from silverlabel.stages.card import CardConfig
    from silverlabel.stages.evaluate import EvalConfig
    from silverlabel.stages.ingest import IngestConfig
    from silverlabel.stages.label import LabelConfig
    from silverlabel.stages.lowshot import LowShotConfig
    from silverlabel.stages.reinforce import ReinforceConfig
    from silverlabel.stages.select import SelectConfig
    from silverlabel.stages.shard import ShardConfig
    from silverlabel.stages.train import TrainConfig

    return [
        (["ingest", "urls.parquet", "-o", "pool"], IngestConfig(("urls.parquet",), "pool")),
        (["label", "pool"], LabelConfig("pool")),
        (["select", "pool", "-o", "sel"], SelectConfig("pool", "sel")),
        (["shard", "sel", "-o", "trainset"], ShardConfig("sel", "trainset")),
        (["reinforce", "trainset", "-o", "rnf"], ReinforceConfig("trainset", "rnf")),
        (["train", "trainset", "-o", "run"], TrainConfig("trainset", "run")),
        (["eval", "run", "--data", "trainset"], EvalConfig("run", "trainset")),
        (["eval", "run", "--data", "trainset", "--lowshot", "0.01", "0.1"], LowShotConfig("run", "trainset")),
        (["card", "pool"], CardConfig("pool")),
    ]


def test_cli_defaults_are_the_api_defaults():
    for argv, want in _classes():
        assert _config(argv, type(want)) == want, argv


def test_every_field_flag_reaches_its_config():
    """A flag given on the command line arrives in the config field that declares it."""
    from silverlabel.stages.train import TrainConfig

    args = ["train", "ts", "-o", "run", "--model", "resnet18", "--img-size", "64", "--batch-size", "8", "--steps",
            "3", "--epochs", "2", "--lr", "0.5", "--warmup-steps", "1", "--weight-decay", "0", "--grad-clip", "0",
            "--optimizer", "sgd", "--schedule", "linear", "--loss", "soft-topk", "--label-threshold", "0.2",
            "--label-smoothing", "0.1", "--label-space-classes", "10", "--seed", "3", "--device", "cpu",
            "--accum-steps", "2", "--ema-decay", "0.9", "--ckpt-every", "5", "--log-every", "2", "--workers", "1",
            "--init", "x.pt", "--kd-aug", "sequential", "--p-reinforced", "0.5", "--no-tensorboard"]
    cfg = _config(args, TrainConfig)
    assert cfg == TrainConfig("ts", "run", model="resnet18", img_size=64, batch_size=8, steps=3, epochs=2, lr=0.5,
                              warmup_steps=1, weight_decay=0.0, grad_clip=None, optimizer="sgd", schedule="linear",
                              loss="soft-topk", label_threshold=0.2, label_smoothing=0.1, label_space_classes=10,
                              seed=3, device="cpu", accum_steps=2, ema_decay=0.9, ckpt_every=5, log_every=2,
                              num_workers=1, init="x.pt", kd_aug="sequential", p_reinforced=0.5, tensorboard=False)


def test_declared_converters():
    from silverlabel.stages.ingest import IngestConfig
    from silverlabel.stages.label import LabelConfig
    from silverlabel.stages.lowshot import LowShotConfig
    from silverlabel.stages.reinforce import ReinforceConfig
    from silverlabel.stages.shard import ShardConfig
    from silverlabel.teachers import TeacherSpec

    ing = _config(["ingest", "a.csv", "b.tar", "-o", "p", "--max-bytes", "1.5MB", "--robots-optout", "noindex,noai",
                   "--ignore-robots", "--insecure", "--max-shortest-edge", "0", "--keep-cols", "x, y",
                   "--source-kind", "table", "--engine", "ray"], IngestConfig)
    assert ing.sources == ("a.csv", "b.tar") and ing.fetch.max_bytes == 3 << 19
    assert ing.fetch.robots_optout == ("noai", "noimageai", "noindex")
    assert not ing.fetch.respect_robots and not ing.fetch.verify_tls and ing.image.max_shortest_edge is None
    assert ing.source_options.keep_cols == ("x", "y") and ing.source_options.kind == "table"
    assert ing.workers == 0 and ing.engine == "ray"  # --engine ray without --workers: the whole cluster
    assert _config(["shard", "s", "-o", "t", "--shards", "train=4,validation=2"], ShardConfig).shards == (
        ("train", 4), ("validation", 2))
    lab = _config(["label", "p", "--teacher", "efficientnet_lite0", "--teacher", "timm:resnet18", "--checkpoint", "-",
                   "--checkpoint", "r.pth", "--teacher-space", "in1k", "--device", "cpu"], LabelConfig)
    assert lab.teachers == (TeacherSpec("efficientnet_lite0", label_space="in1k"),
                            TeacherSpec("timm:resnet18", checkpoint="r.pth", label_space="in1k"))
    assert lab.workers == 1  # --device cpu: one process whatever the GPUs
    rnf = _config(["reinforce", "t", "-o", "r", "--scale", "0.5,1", "--split", "train", "--split", "validation",
                   "--mix", "cutmix"], ReinforceConfig)
    assert rnf.policy.scale == (0.5, 1.0) and rnf.policy.mix == "cutmix" and rnf.splits == ("train", "validation")
    low = _config(["eval", "r", "--data", "t", "--lowshot", "0.5", "--lowshot-modes", "probe", "--split", "val",
                   "--workers", "2"], LowShotConfig)
    assert (low.fractions, low.modes, low.val_split, low.num_workers) == ((0.5,), ("probe",), "val", 2)
    sel = config_from_args(SelectRun, build_parser().parse_args(["select", "p", "-o", "s", "--engine", "ray"]))
    assert dataclasses.asdict(sel) == {"engine": "ray", "ray_address": None, "workers": 0}


def _choices(command: str, flag: str) -> list[str]:
    sub = build_parser()._subparsers._group_actions[0]
    action = next(a for a in sub.choices[command]._actions if flag in a.option_strings)
    return list(action.choices)


def test_choices_come_from_the_registries():
    from silverlabel.engine import engine_names
    from silverlabel.losses import loss_names
    from silverlabel.sources import source_kinds
    from silverlabel.teachers.labelspace import space_names

    assert _choices("train", "--loss") == loss_names() == ["ce", "bce-multihot", "soft-topk", "kd"]
    for command, flag in [("label", "--label-space"), ("label", "--teacher-space"), ("select", "--label-space"),
                          ("reinforce", "--label-space"), ("classes", "--space")]:
        assert _choices(command, flag) == space_names(), (command, flag)
    assert _choices("ingest", "--source-kind") == source_kinds()
    for command in ("ingest", "label", "select", "shard", "reinforce"):
        assert _choices(command, "--engine") == engine_names()


@pytest.mark.parametrize("command", [c.name for c in COMMANDS])
def test_help_has_examples_and_every_flag(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: silverlabel {command}")
    assert "examples:\n  silverlabel " in out or "examples:\n  # " in out  # every command shows examples


def test_argument_errors_exit_2_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "ts", "-o", "run", "--loss", "nope"])
    assert e.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["ingest", "x.csv", "-o", "p", "--max-bytes", "lots"])
    assert e.value.code == 2 and "not a size: 'lots'" in capsys.readouterr().err
    # a config's own check is a UserError: one line, exit 2
    assert main(["train", str(tmp_path), "-o", str(tmp_path / "run"), "--lr", "-1"]) == 2
    err = capsys.readouterr().err
    assert err == "silverlabel train: error: lr must be > 0, got -1.0\n"
    assert main(["label", "p", "--checkpoint", "a", "--checkpoint", "b"]) == 2
    assert "2 --checkpoint for 1 --teacher" in capsys.readouterr().err


_BUG = """
import sys
import numpy as np
import silverlabel.teachers.labelspace as ls
from silverlabel.errors import UserError

def bug(name):
    return np.zeros(3).reshape(2)  # numpy's ValueError: a bug, not bad input

def bad_input(name):
    raise UserError("no label space here")

ls.get_label_space = bug if sys.argv[1] == "bug" else bad_input
from silverlabel.cli import main
sys.exit(main(["classes", "cat"]))
"""


@pytest.mark.parametrize("kind,debug", [("bug", ""), ("user", ""), ("user", "1")])
def test_bugs_keep_their_traceback_user_errors_are_one_line(kind, debug):
    env = dict(os.environ, SILVERLABEL_DEBUG=debug)
    p = subprocess.run([sys.executable, "-c", _BUG, kind], capture_output=True, text=True, env=env, timeout=120)
    if kind == "bug" or debug:
        assert p.returncode == 1 and "Traceback" in p.stderr, p.stderr
        assert ("cannot reshape array" if kind == "bug" else "UserError: no label space here") in p.stderr
    else:
        assert p.returncode == 2 and p.stderr == "silverlabel classes: error: no label space here\n", p.stderr


_IMPORT = """
import sys, silverlabel
assert 'torch' not in sys.modules and 'silverlabel.stages' not in sys.modules, sorted(sys.modules)
from silverlabel import IngestConfig, run_ingest, SelectConfig, ShardConfig, CardConfig, UserError
assert 'torch' not in sys.modules
assert set(silverlabel.__all__) <= set(dir(silverlabel))
assert all(getattr(silverlabel, name) is not None for name in silverlabel.__all__)
from silverlabel import run_train, TrainConfig
assert run_train.__module__ == 'silverlabel.stages.train'
try:
    silverlabel.run_nothing
except AttributeError as e:
    print(e)
"""


def test_import_silverlabel_is_cheap_and_exposes_the_stages():
    p = subprocess.run([sys.executable, "-c", _IMPORT], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "has no attribute 'run_nothing'" in p.stdout


def test_python_m_silverlabel():
    p = subprocess.run([sys.executable, "-m", "silverlabel", "--version"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.startswith("silverlabel ")


def test_running_one_command_does_not_import_the_others():
    code = ("import sys\nfrom silverlabel.cli import build_parser\n"
            "build_parser('ingest').parse_args(['ingest', 'x.csv', '-o', 'p'])\n"
            "assert 'torch' not in sys.modules and 'silverlabel.stages.train' not in sys.modules\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


def test_user_error_is_a_value_error():
    assert issubclass(UserError, ValueError)
