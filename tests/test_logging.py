"""What a run says and how loud: -q/-v/--log-level through the standard logging module
(worker processes included), the Python API configuring nothing, and progress with a total
where the amount of work is known."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from silverlabel.cli import build_parser, main
from silverlabel.demodata import ImageServer, real_photos
from silverlabel.log import ROOT, Progress, level_from_flags, progress_wanted

RESULT = re.compile(r"^silverlabel ingest: 8 samples in 2 shards \(2 written now, 0 already complete\)$")


@pytest.fixture(autouse=True)
def _restore_logging():
    """``main`` configures the ``silverlabel`` logger (as the CLI does in its own process):
    leave the next test the logger as it was."""
    logger = logging.getLogger(ROOT)
    level, handlers, propagate = logger.level, list(logger.handlers), logger.propagate
    yield
    logger.setLevel(level)
    logger.handlers[:] = handlers
    logger.propagate = propagate


@pytest.fixture
def images(tmp_path) -> Path:
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for i in range(8):
        (root / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(root / "ab"[i % 2] / f"{i}.jpg")
    return root


def _ingest(images: Path, out: Path, *flags: str, workers: int = 1) -> list[str]:
    return ["ingest", str(images), "-o", str(out), "--workers", str(workers), "--samples-per-shard", "4", *flags]


def test_quiet_prints_only_the_result_line(images, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SILVERLABEL_PROGRESS", "1")  # -q wins over a forced bar
    assert main(["-q", *_ingest(images, tmp_path / "pool", workers=2)]) == 0
    out, err = capsys.readouterr()
    assert RESULT.match(out.rstrip("\n")) and out.count("\n") == 1, out
    assert err == "", err
    # after the command too; and without -q the summary has its table and the output's path
    assert main(_ingest(images, tmp_path / "pool2", "--quiet")) == 0
    assert capsys.readouterr().out.count("\n") == 1
    assert main(_ingest(images, tmp_path / "pool3", "--no-progress")) == 0
    out = capsys.readouterr().out
    assert "  success" in out and str(tmp_path / "pool3") in out


def test_debug_lines_come_from_the_worker_processes(images, tmp_path, capsys):
    assert main(["-vv", *_ingest(images, tmp_path / "pool", "--no-progress", workers=2)]) == 0
    out, err = capsys.readouterr()
    assert RESULT.match(out.strip().splitlines()[0]), out
    started = re.findall(r"silverlabel\.engine\.local\[(\d+)\]: debug: (data-\d+): started", err)
    assert sorted(u for _pid, u in started) == ["data-000000", "data-000001"], err
    assert all(int(pid) != os.getpid() for pid, _u in started), err  # logged in the pool's processes
    assert "running on LocalEngine (cpu, 2 workers)" in err
    # -v: info from the driver, no debug from anyone; a resumed run says what it skipped
    assert main(["-v", *_ingest(images, tmp_path / "pool", "--no-progress", workers=2)]) == 0
    err = capsys.readouterr().err
    assert ": debug:" not in err and "resumed: 2 units found done, 0 run now" in err, err


@pytest.mark.parametrize("where", ["before", "after"])
def test_log_level_before_or_after_the_command(images, tmp_path, capsys, where):
    def run(level: str, out: str) -> str:
        flag = ["--log-level", level]
        argv = _ingest(images, tmp_path / out, "--no-progress")
        assert main(flag + argv if where == "before" else argv + flag) == 0
        return capsys.readouterr().err

    assert "running on LocalEngine" in run("INFO", "a")
    assert logging.getLogger(ROOT).level == logging.INFO
    assert run("warning", "b") == ""
    assert logging.getLogger(ROOT).level == logging.WARNING
    # --log-level overrides -v, wherever each is
    assert run("error", "c") == "" and logging.getLogger(ROOT).level == logging.ERROR


def test_flags_parse_anywhere_and_bad_levels_are_refused(capsys, monkeypatch):
    for argv in (["-v", "-v", "card", "x"], ["card", "x", "-vv"], ["-v", "card", "x", "-v"]):
        a = build_parser("card").parse_args(argv)
        assert level_from_flags(a.verbose, a.quiet, a.log_level, env={}) <= logging.INFO, argv
    a = build_parser("card").parse_args(["--log-level", "debug", "card", "x", "-q"])
    assert level_from_flags(a.verbose, a.quiet, a.log_level, env={}) == logging.DEBUG
    with pytest.raises(SystemExit) as e:
        main(["card", "x", "--log-level", "loud"])
    assert e.value.code == 2 and "invalid choice: 'loud'" in capsys.readouterr().err
    monkeypatch.setenv("SILVERLABEL_LOG_LEVEL", "chatty")
    with pytest.raises(SystemExit) as e:
        main(["classes", "285", "--space", "in1k"])
    assert e.value.code == 2 and "not a log level: 'chatty'" in capsys.readouterr().err
    monkeypatch.setenv("SILVERLABEL_LOG_LEVEL", "error")
    assert main(["classes", "285", "--space", "in1k"]) == 0
    assert logging.getLogger(ROOT).level == logging.ERROR


def test_the_python_api_configures_no_logging(images, tmp_path):
    """Importing silverlabel and running a stage (with worker processes) adds no handler to
    the root logger or to silverlabel's, changes no level, and prints nothing."""
    code = f"""
import logging, sys
root = logging.getLogger()
before = (list(root.handlers), root.level)
import silverlabel
from silverlabel import IngestConfig, run_ingest
s = run_ingest(IngestConfig(({str(images)!r},), {str(tmp_path / 'pool')!r}, workers=2, samples_per_shard=4))
assert sum(s.counts.values()) == 8, s
lib = logging.getLogger("silverlabel")
assert (list(root.handlers), root.level) == before, (root.handlers, root.level)
assert lib.handlers == [] and lib.level == logging.NOTSET and lib.propagate, lib.handlers
sys.stdout.write("ok")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("SILVERLABEL_LOG_LEVEL", "SILVERLABEL_PROGRESS")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "ok" and p.stderr == "", p.stderr


def _url_table(tmp_path: Path, srv: ImageServer, names: list[str], fmt: str) -> Path:
    table = pa.table({"url": [srv.url(n) for n in names]})
    path = tmp_path / f"urls.{fmt}"
    if fmt == "parquet":
        pq.write_table(table, path, row_group_size=2)
    else:
        path.write_text("url\n" + "".join(f"{u}\n" for u in table.column("url").to_pylist()))
    return path


def test_ingest_progress_has_a_total_when_the_parquet_row_count_is_known(tmp_path, capsys):
    photos = real_photos()[:5]
    with ImageServer({n: data for n, data in photos}) as srv:
        names = [n for n, _ in photos] + ["missing.jpg"]
        for fmt in ("parquet", "csv"):
            table = _url_table(tmp_path, srv, names, fmt)
            argv = ["ingest", str(table), "-o", str(tmp_path / fmt), "--workers", "1", "--retries", "0",
                    "--allow-private-network", "--progress"]
            assert main(argv) == 0
            err = capsys.readouterr().err
            if fmt == "parquet":  # the footer's row count: a total, a percentage and an ETA
                assert "6/6" in err and "100%" in err and "success 83.3%" in err, err
            else:  # a CSV's length is known only once read: a count and a rate, no made-up total
                assert "6img" in err and "/6" not in err and "%|" not in err, err
        # resumed: the done shard is off the total, so the bar is of the work left
        assert main(["ingest", str(tmp_path / "urls.parquet"), "-o", str(tmp_path / "parquet"), "--workers", "1",
                     "--allow-private-network", "--progress"]) == 0
        assert "img/s" not in capsys.readouterr().err  # nothing left to do: no bar at all


def test_progress_stays_off_a_non_terminal_unless_asked(monkeypatch):
    monkeypatch.delenv("SILVERLABEL_PROGRESS", raising=False)
    assert not progress_wanted()  # pytest's captured stderr is not a terminal
    assert progress_wanted(force=True) and not progress_wanted(no_progress=True, force=True)
    monkeypatch.setenv("SILVERLABEL_PROGRESS", "1")
    assert progress_wanted() and not progress_wanted(quiet=True)


def test_progress_without_a_bar_logs_where_it_is(caplog):
    p = Progress(bar=False, desc="label", unit="img", every=0)
    p.set_total(100)
    with caplog.at_level(logging.INFO, logger=ROOT):
        p(10, 10)
        p.skip(50)
        p(10, 10)
    lines = [r.getMessage() for r in caplog.records]
    assert re.fullmatch(r"label: 10/100 \(10\.0%\), [\d.]+ img/s, ETA \d+:\d\d", lines[0]), lines
    assert lines[1].startswith("label: 20/50 (40.0%)"), lines


def _labels_table(path: Path, counts: list[int]) -> None:
    """A bare COYO-Labeled table: class i (of in21k) is the top-1 of counts[i] rows."""
    cls = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    n = len(cls)
    offsets = pa.array(np.arange(0, n + 1, dtype=np.int32))
    pq.write_table(pa.table({
        "id": pa.array(np.arange(n, dtype=np.int64)), "url": [f"http://x/{i}.jpg" for i in range(n)],
        "labels": pa.ListArray.from_arrays(offsets, pa.array(cls)),
        "label_probs": pa.ListArray.from_arrays(offsets, pa.array(np.full(n, 0.9, np.float32))),
    }), path)


def test_select_and_card_say_their_passes_and_steps(tmp_path, capsys):
    table = tmp_path / "labels.parquet"
    _labels_table(table, [9, 7, 5, 3])
    sel = tmp_path / "sel"
    assert main(["-v", "select", str(table), "-o", str(sel), "--top-classes", "2", "--val-per-class", "1",
                 "--fraction", "0.5", "--balanced", "--progress"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("silverlabel select: 9 samples (train 7, validation 2)"), out
    passes = re.findall(r"silverlabel: select: (\w+) pass \(1 part\)", err)
    assert passes == ["count", "fraction", "write"], err
    assert "1/1" in err  # each pass's bar: its parts
    assert main(["card", str(sel), "--no-plots", "--progress", "--verbose"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("silverlabel card: selection, 9 samples"), out
    assert re.search(r"silverlabel: card: facts computed \([\d.]+ s\)", err) and "card: card written" in err, err
    assert "2/2" in err, err
    # neither says anything on stderr by default, nor more than the result's line with -q
    assert main(["card", str(sel), "--no-plots", "-q"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.count("\n") == 1, (out, err)


@pytest.mark.slow
def test_ray_workers_log_at_the_drivers_level(images, tmp_path):
    """``-vv`` with ``--engine ray``: the units' debug lines come from Ray's worker processes
    (Ray shows their stderr on the driver's); at the default level they say nothing."""
    pytest.importorskip("ray")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("SILVERLABEL_LOG_LEVEL", None)
    argv = [sys.executable, "-m", "silverlabel", "-vv", *_ingest(images, tmp_path / "pool", "--no-progress"),
            "--engine", "ray"]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert RESULT.match(p.stdout.strip().splitlines()[0]), p.stdout
    started = re.findall(r"silverlabel\.engine\.ray_engine\[(\d+)\]: debug: (data-\d+): started", p.stderr)
    assert sorted(u for _pid, u in started) == ["data-000000", "data-000001"], p.stderr[-3000:]
    driver = re.search(r"silverlabel\.stage\[(\d+)\]: .*running on RayEngine", p.stderr)
    assert driver and all(pid != driver.group(1) for pid, _u in started), p.stderr[-3000:]


def test_shard_progress_counts_the_work_left_on_a_resume(images, tmp_path, capsys):
    pool, sel, ts = tmp_path / "pool", tmp_path / "sel", tmp_path / "ts"
    assert main(["-q", *_ingest(images, pool)]) == 0
    assert main(["-q", "select", str(pool), "--label", "source", "-o", str(sel)]) == 0
    argv = ["shard", str(sel), "-o", str(ts), "--shards", "2", "--workers", "1", "--progress"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "8/8" in err and "sample/s" in err, err
    shard = sorted(ts.glob("*.tar"))[0]
    shard.unlink()  # one shard of two to write again
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "(1 written now, 1 already complete)" in out
    last = err.strip().split("\r")[-1]  # the bar's final frame: the work of this run
    assert "100%" in last and "4/4" in last, err
