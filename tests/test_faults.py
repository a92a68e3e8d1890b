"""The fault suite (issue 13): a full disk, a read-only output, a changed resume, two runs on
one output, hostile checkpoints, outputs of the wrong kind. Each ends in one line naming the
file or flag, exit code 2, and leaves no temporary file behind.

Disk-full and read-only cases mount a small tmpfs (the tests run as root here and in CI);
they are skipped with the reason where mounting is not permitted.
"""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from toy_trainset import write_toy_trainset

from silverlabel.cli import main
from silverlabel.dataset import atomic_write
from silverlabel.errors import UserError
from silverlabel.stage import output_lock
from silverlabel.stages.train import TrainConfig, run_train

QUIET = dict(progress=False)


# ---------------------------------------------------------------------------------------
# helpers


def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a tmpfs: {e}")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")


def _umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs."""
    mnt = tmp_path / "small"
    _mount_tmpfs(mnt, "2m")
    yield mnt
    _umount(mnt)


def _temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp-" in p.name or p.name.startswith("spool-")]


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


def _noise_folder(root: Path, n: int, side: int = 320, classes: int = 1) -> Path:
    """``n`` incompressible JPEGs (~100 KB each at 320 px), in ``classes`` class folders."""
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"c{i % classes}" if classes > 1 else root
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
        (folder / f"img{i:03d}.jpg").write_bytes(buf.getvalue())
    return root


# ---------------------------------------------------------------------------------------
# disk full (item 10)


def test_atomic_write_on_a_full_disk_leaves_no_temporary(small_disk):
    target = small_disk / "big.bin"
    with pytest.raises(OSError) as e:
        with atomic_write(target) as f:
            for _ in range(6):
                f.write(os.urandom(512 * 1024))
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    assert not target.exists() and not _temporaries(small_disk)


def test_ingest_on_a_full_disk_is_one_line_and_leaves_no_temporary(tmp_path, small_disk, capsys):
    images = _noise_folder(tmp_path / "imgs", 40)  # ~4 MB of JPEGs kept as they are
    assert main(["ingest", str(images), "-o", str(small_disk / "pool"), "--workers", "1", "--no-progress",
                 "--samples-per-shard", "10"]) == 2
    _one_line_error(capsys, "No space left on device", str(small_disk / "pool"))
    assert not _temporaries(small_disk)


# ---------------------------------------------------------------------------------------
# read-only output, every stage (item 10)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A labeled-by-folder pool, a selection, a training set and a run, all tiny."""
    root = tmp_path_factory.mktemp("chain")
    images = root / "imgs"
    from silverlabel.demodata import photo_like_images

    for i, (name, data) in enumerate(photo_like_images(12, size=(64, 48), seed=1)):
        (images / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (images / f"c{i % 2}" / name).write_bytes(data)
    quiet = ["--no-progress"]
    assert main(["ingest", str(images), "-o", str(root / "pool"), "--workers", "1", *quiet]) == 0
    assert main(["select", str(root / "pool"), "-o", str(root / "sel"), "--label", "source"]) == 0
    assert main(["shard", str(root / "sel"), "-o", str(root / "ts"), "--workers", "1", *quiet]) == 0
    assert main(["train", str(root / "ts"), "-o", str(root / "run"), "--model", "test_vit", "--img-size", "32",
                 "--batch-size", "4", "--steps", "2", "--no-tensorboard", *quiet]) == 0
    return root


@pytest.fixture
def read_only(tmp_path, chain):
    """A read-only tmpfs holding a copy of the chain's pool and training set."""
    import shutil

    mnt = tmp_path / "ro"
    _mount_tmpfs(mnt, "64m")
    shutil.copytree(chain / "pool", mnt / "pool")
    shutil.copytree(chain / "ts", mnt / "ts")
    r = subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        _umount(mnt)
        pytest.skip(f"cannot remount the tmpfs read-only: {r.stderr.strip()}")
    yield mnt
    _umount(mnt)


def test_read_only_output_every_stage(chain, read_only, capsys):
    ro = read_only
    quiet = ["--no-progress"]
    commands = {
        "ingest": ["ingest", str(chain / "imgs"), "-o", str(ro / "pool2"), "--workers", "1", *quiet],
        "label": ["label", str(ro / "pool"), "--workers", "1", "--device", "cpu", *quiet],
        "select": ["select", str(chain / "pool"), "-o", str(ro / "sel"), "--label", "source"],
        "shard": ["shard", str(chain / "sel"), "-o", str(ro / "ts2"), "--workers", "1", *quiet],
        "reinforce": ["reinforce", str(chain / "ts"), "-o", str(ro / "rnf"), "--workers", "1", "--device", "cpu",
                      *quiet],
        "train": ["train", str(chain / "ts"), "-o", str(ro / "run"), "--model", "test_vit", "--img-size", "32",
                  "--batch-size", "4", "--steps", "1", *quiet],
        "eval": ["eval", str(chain / "run"), "--data", str(chain / "ts"), "--split", "train", "--out",
                 str(ro / "eval.json"), "--device", "cpu"],
        "card": ["card", str(ro / "ts"), "--no-plots"],
    }
    for stage, argv in commands.items():
        assert main(argv) == 2, stage
        err = _one_line_error(capsys, "Read-only file system")
        assert str(ro) in err, (stage, err)


# ---------------------------------------------------------------------------------------
# train --resume with other settings (item 9), --img-size (24), pickles (25)


@pytest.fixture(scope="module")
def trainset(tmp_path_factory):
    def sample(i, split, width, height):
        return i % 2, {"label": i % 2, "width": width, "height": height}

    return str(write_toy_trainset(tmp_path_factory.mktemp("ts"), {"train": [8, 8]}, sample, size=(48, 40), seed=2,
                                  classes={"label_space": "top1", "num_classes": 2}))


def _cfg(trainset, out, **kw):
    base = dict(model="test_vit", img_size=32, batch_size=4, lr=1e-3, steps=2, tensorboard=False)
    return TrainConfig(trainset, str(out), **{**base, **kw})


@pytest.mark.parametrize("change,named", [({"lr": 2e-3}, "--lr"), ({"batch_size": 8}, "--batch-size"),
                                          ({"model": "resnet18"}, "--model"),
                                          ({"lr": 2e-3, "seed": 1}, "--seed")])
def test_resume_with_other_settings_is_refused(trainset, tmp_path, change, named):
    run_train(_cfg(trainset, tmp_path / "run", steps=1), **QUIET)
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with pytest.raises(UserError, match=named) as e:
        run_train(_cfg(trainset, tmp_path / "run", **change), resume=True, **QUIET)
    assert "checkpoint.pt" in str(e.value) and "\n" not in str(e.value)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before
    # longer is the same run, continued
    s = run_train(_cfg(trainset, tmp_path / "run", steps=2, num_workers=0), resume=True, **QUIET)
    assert (s.start_step, s.steps) == (1, 2)


def test_img_size_below_or_off_the_patch_size(trainset, tmp_path, capsys):
    for size in (8, 40):
        with pytest.raises(UserError, match=f"--img-size {size}.*patch size 16"):
            run_train(_cfg(trainset, tmp_path / f"r{size}", img_size=size), **QUIET)
    assert main(["train", trainset, "-o", str(tmp_path / "cli"), "--model", "test_vit", "--img-size", "8",
                 "--batch-size", "4", "--no-progress"]) == 2
    _one_line_error(capsys, "--img-size 8")


class Payload:  # any class: a pickle of it runs code when loaded without weights_only
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_checkpoints_are_refused_in_one_line(trainset, tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": Payload()}, evil)
    with pytest.raises(UserError, match="evil.pt.*pickled") as e:
        run_train(_cfg(trainset, tmp_path / "ft", init=str(evil)), **QUIET)
    assert "weights_only=False" not in str(e.value) and "\n" not in str(e.value)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="junk.pt.*not a readable PyTorch checkpoint"):
        run_train(_cfg(trainset, tmp_path / "ft2", init=str(junk)), **QUIET)
    # eval, and a resumed run whose checkpoint was replaced by a pickle
    assert main(["eval", str(evil), "--data", trainset, "--split", "train", "--device", "cpu"]) == 2
    err = _one_line_error(capsys, "evil.pt", "pickled")
    assert "weights_only=False" not in err
    run_train(_cfg(trainset, tmp_path / "run", steps=1), **QUIET)
    (tmp_path / "run" / "checkpoint.pt").write_bytes(evil.read_bytes())
    with pytest.raises(UserError, match="checkpoint.pt.*pickled"):
        run_train(_cfg(trainset, tmp_path / "run"), resume=True, **QUIET)


# ---------------------------------------------------------------------------------------
# outputs of the wrong kind (item 26)


def test_outputs_of_the_wrong_kind(trainset, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    a_dir = tmp_path / "a-dir"
    a_dir.mkdir()
    run_train(_cfg(trainset, tmp_path / "run", steps=1), **QUIET)
    cases = [
        (["train", trainset, "-o", str(a_file), "--model", "test_vit", "--img-size", "32", "--no-progress"],
         "-o", "is a file"),
        (["train", trainset, "-o", str(a_file / "run"), "--model", "test_vit", "--no-progress"], "-o", "is a file"),
        (["eval", str(tmp_path / "run"), "--data", trainset, "--split", "train", "--out", str(a_dir)],
         "--out", "is a folder"),
        (["eval", str(tmp_path / "run"), "--data", trainset, "--split", "train", "--lowshot", "0.5", "--out",
          str(a_file)], "--out", "is a file"),
        (["card", trainset, "--html", str(a_file), "--no-plots"], "--html", "is a file"),
    ]
    for argv, flag, what in cases:
        assert main(argv) == 2, argv
        _one_line_error(capsys, flag, what)
    assert a_file.read_text() == "x" and not any(a_dir.iterdir())


# ---------------------------------------------------------------------------------------
# resume from another working directory (item 14), two runs on one output (item 15)


def test_resume_from_another_folder_with_other_images_is_refused(tmp_path, monkeypatch, capsys):
    """Sources are compared by name (base name and content digest), not by path: a relative
    SOURCE from another folder with other images is refused, the same images anywhere resume."""
    import shutil

    from silverlabel.dataset import input_name
    from silverlabel.demodata import photo_like_images

    for where, seed in (("a", 1), ("b", 2)):
        (tmp_path / where / "imgs").mkdir(parents=True)
        for name, data in photo_like_images(3, size=(64, 48), seed=seed):
            (tmp_path / where / "imgs" / name).write_bytes(data)
    out = str(tmp_path / "pool")
    monkeypatch.chdir(tmp_path / "a")
    argv = ["ingest", "imgs", "-o", out, "--workers", "1", "--samples-per-shard", "2", "--no-progress"]
    assert main(argv) == 0
    capsys.readouterr()
    monkeypatch.chdir(tmp_path / "b")
    assert main(argv) == 2
    _one_line_error(capsys, input_name(tmp_path / "a" / "imgs"), input_name(tmp_path / "b" / "imgs"),
                    str(tmp_path / "b" / "imgs"))
    shutil.copytree(tmp_path / "a" / "imgs", tmp_path / "c" / "imgs")  # the same images, elsewhere
    monkeypatch.chdir(tmp_path / "c")
    assert main(argv) == 0  # a resume (nothing left to do)
    assert "2 already complete" in capsys.readouterr().out


def test_a_second_run_on_one_output_is_refused_naming_the_holder(tmp_path, capsys):
    from silverlabel.demodata import photo_like_images

    (tmp_path / "imgs").mkdir()
    for name, data in photo_like_images(2, size=(64, 48), seed=1):
        (tmp_path / "imgs" / name).write_bytes(data)
    out = tmp_path / "pool"
    out.mkdir()
    argv = ["ingest", str(tmp_path / "imgs"), "-o", str(out), "--workers", "1", "--no-progress"]
    with output_lock(out):
        assert main(argv) == 2
        _one_line_error(capsys, str(out), f"pid {os.getpid()}")
    assert not (out / "silverlabel.json").exists()
    run = tmp_path / "run"  # train too
    run.mkdir()
    with output_lock(run), pytest.raises(UserError, match=f"{run}: in use by another silverlabel run"):
        run_train(TrainConfig(str(tmp_path / "no-trainset-needed"), str(run)), **QUIET)
    # a killed holder's lock goes with its process
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom silverlabel.stage import output_lock\n"
                               f"with output_lock({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(argv) == 2
        _one_line_error(capsys, f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait(timeout=30)
    time.sleep(0.1)
    assert main(argv) == 0


def test_select_takes_the_output_lock_too(tmp_path):
    """select is no run_stage stage; it holds OUTPUT/.lock all the same."""
    from silverlabel.stage import output_lock
    from silverlabel.stages.select import SelectConfig, run_select

    from silverlabel.stages.ingest import IngestConfig, run_ingest

    pool = tmp_path / "pool"
    run_ingest(IngestConfig(sources=(str(_noise_folder(tmp_path / "imgs", 4)),), output=str(pool), workers=1))
    out = tmp_path / "sel"
    out.mkdir()
    with output_lock(out):
        with pytest.raises(UserError, match="in use by another silverlabel run"):
            run_select(SelectConfig(source=str(pool), output=str(out), label="none"))
    assert run_select(SelectConfig(source=str(pool), output=str(out), label="none")).rows == 4
    assert (out / ".lock").read_bytes() == b""  # no pid left in a finished output
