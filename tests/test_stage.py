"""The stage skeleton on a toy stage: resume, commit records bound to input bytes, temporaries."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from silverlabel.dataset import Dataset, atomic_write
from silverlabel.errors import UserError
from silverlabel.stage import BaseStage, Commit, StageRun, file_identity, run_stage


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
