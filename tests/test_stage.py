"""The stage skeleton on a toy stage: resume, commit records bound to input bytes, temporaries."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from silverlabel.dataset import Dataset, atomic_write
from silverlabel.errors import UserError
from silverlabel.stage import BaseStage, Commit, StageRun, file_identity, read_record, recorded_output, run_stage


@dataclass(frozen=True)
class UpperConfig:
    source: str
    output: str
    suffix: str = "!"
    engine: str = "local"
    workers: int = 1

    def output_config(self) -> dict:
        return {"suffix": self.suffix}


@dataclass
class UpperUnit:
    src: str
    dst: str
    commit: Commit


def upper_file(unit: UpperUnit, cfg: UpperConfig, report) -> str:
    with atomic_write(unit.dst) as f:
        f.write(Path(unit.src).read_bytes().upper() + cfg.suffix.encode())
    unit.commit.write([unit.dst], info={"bytes": Path(unit.dst).stat().st_size})
    report(1, 1)
    return unit.dst


class UpperStage(BaseStage):
    """Every ``*.txt`` of a folder, upper-cased: one unit per file."""

    unit_fn = staticmethod(upper_file)

    def prepare(self) -> None:
        if not Path(self.config.source).is_dir():
            raise UserError(f"{self.config.source}: no such folder")
        self.output.previous_run("upper")

    def manifest(self) -> dict:
        return {"stage": "upper", "config": self.config.output_config()}

    def plan(self, engine):
        for src in sorted(Path(self.config.source).glob("*.txt")):
            dst = self.output.root / src.name
            commit = Commit(str(self.output.commit_path(src.stem)), self.config.output_config(),
                            {"src": file_identity(src)})
            yield UpperUnit(str(src), str(dst), commit)

    def finish(self, run: StageRun) -> tuple[int, int]:
        return run.done_now, len(run.skipped)


def _run(cfg: UpperConfig) -> tuple[int, int]:
    return run_stage(UpperStage(cfg, Dataset(cfg.output)))


def test_resume_redo_on_changed_input_or_config(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in "abc":
        (src / f"{name}.txt").write_text(name * 3)
    cfg = UpperConfig(str(src), str(tmp_path / "out"))
    assert _run(cfg) == (3, 0)
    assert (tmp_path / "out" / "b.txt").read_text() == "BBB!"
    assert _run(cfg) == (0, 3)
    (src / "b.txt").write_text("bbb")  # same bytes: still done
    assert _run(cfg) == (0, 3)
    (src / "b.txt").write_text("xyz")  # other bytes: that unit alone is redone
    assert _run(cfg) == (1, 2) and (tmp_path / "out" / "b.txt").read_text() == "XYZ!"
    (tmp_path / "out" / "c.txt").write_text("CC")  # an output that lost its recorded size
    assert _run(cfg) == (1, 2) and (tmp_path / "out" / "c.txt").read_text() == "CCC!"
    assert _run(replace(cfg, suffix="?")) == (3, 0)  # another config: every unit


def test_temporaries_are_removed_and_other_outputs_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a")
    out = tmp_path / "out"
    cfg = UpperConfig(str(src), str(out))
    _run(cfg)
    (out / ".a.txt.tmp-123").write_bytes(b"half")
    (out / ".done" / ".a.json.tmp-123").write_bytes(b"half")
    _run(cfg)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    Dataset(out).write_manifest({"stage": "other"})
    with pytest.raises(UserError, match="not an output of upper"):
        _run(cfg)


def test_a_units_output_is_found_in_its_record_by_one_reader(tmp_path):
    """``recorded_output`` is what a commit record says a unit wrote (the one reader shard,
    verify and ``file_identity`` share): a size and an md5, or None; ``file_identity`` takes
    the record's md5 while the file has the recorded size, and reads the file otherwise."""
    import hashlib
    import json

    out = Dataset(tmp_path / "out")
    f = out.root / "shards" / "a.tar"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"abc")
    commit = Commit(str(out.commit_path("a")), {"x": 1})
    commit.write([f])
    rec = read_record(commit.path)
    md5 = hashlib.md5(b"abc").hexdigest()
    assert recorded_output(rec, "shards/a.tar") == recorded_output(rec, Path("shards") / "a.tar") == {
        "bytes": 3, "md5": md5}
    assert recorded_output(rec, "shards/b.tar") is None and recorded_output(None, "shards/a.tar") is None
    assert file_identity(f, commit.path) == {"bytes": 3, "md5": md5}

    # the record's md5 is taken while the size matches (the bytes are not read again) ...
    rec["outputs"]["shards/a.tar"]["md5"] = "0" * 32
    Path(commit.path).write_text(json.dumps(rec))
    assert file_identity(f, commit.path) == {"bytes": 3, "md5": "0" * 32}
    # ... and the file is read when its size is not the recorded one
    f.write_bytes(b"abcd")
    assert file_identity(f, commit.path) == {"bytes": 4, "md5": hashlib.md5(b"abcd").hexdigest()}
    # an entry without an integer size and an md5 is no record of the file
    for bad in ({"bytes": "3", "md5": md5}, {"bytes": 3}, {"bytes": 3, "md5": ""}, [3, md5]):
        assert recorded_output({"outputs": {"shards/a.tar": bad}}, "shards/a.tar") is None
    assert recorded_output({"outputs": ["shards/a.tar"]}, "shards/a.tar") is None


def test_prefetch_runs_ahead_keeps_order_and_raises_in_place():
    import threading

    from silverlabel.dataset import prefetch

    second = threading.Event()

    def items():
        yield 0
        second.set()  # pulled while the caller still holds item 0
        yield 1
        yield 2
        raise ValueError("bad plan")

    got = []
    it = prefetch(items(), ahead=2)
    got.append(next(it))
    assert second.wait(10), "the next item was not pulled ahead of the caller"
    with pytest.raises(ValueError, match="bad plan"):
        for x in it:
            got.append(x)
    assert got == [0, 1, 2]  # every item before the error, in order


def test_prefetch_stops_its_thread_when_the_caller_stops():
    import threading

    from silverlabel.dataset import prefetch

    pulled = []

    def items():
        for i in range(1000):
            pulled.append(i)
            yield i

    it = prefetch(items(), ahead=2)
    assert next(it) == 0
    it.close()
    assert not any(t.name == "silverlabel-plan" and t.is_alive() for t in threading.enumerate())
    assert len(pulled) <= 5  # stopped a few items ahead, not run to the end


class AheadStage(UpperStage):
    plan_ahead = 2


def test_a_stage_planned_ahead_resumes_and_redoes_like_one_planned_inline(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"f{i}.txt").write_text(f"text {i}")
    cfg = UpperConfig(str(src), str(tmp_path / "out"))
    assert run_stage(AheadStage(cfg, Dataset(cfg.output))) == (5, 0)
    (src / "f3.txt").write_text("changed")
    assert run_stage(AheadStage(cfg, Dataset(cfg.output))) == (1, 4)
    assert (tmp_path / "out" / "f3.txt").read_text() == "CHANGED!"
