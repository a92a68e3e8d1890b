"""The local engine's worker processes (issue 14): forked from a fork server that preloaded
numpy, pyarrow, OpenCV, pandas (not for ingest) and the unit function's module, yet each worker with the
driver's environment and working directory of the moment its pool starts (the server keeps
the environment it started with); spawned instead with ``SILVERLABEL_START_METHOD=spawn``
or where there is no fork server; progress and log records all in before ``map`` returns.

Real parts: real worker processes, a real fork server (stopped and restarted by the tests
that need one started under a known environment), ``ingest`` of a loopback HTTP server
through a real forward proxy (tests/fixtures/proxyserver.py).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
from multiprocessing import forkserver
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fixtures.proxyserver import ForwardProxy
from httpserver import MisbehavingServer, sample_jpeg
from silverlabel.engine import local
from silverlabel.engine.local import START_METHOD_ENV, LocalEngine, resolve_start_method, start_forkserver
from silverlabel.errors import UserError

pytestmark = pytest.mark.timeout(120)
needs_forkserver = pytest.mark.skipif("forkserver" not in mp.get_all_start_methods(),
                                      reason="no fork server on this platform")
REPO = Path(__file__).resolve().parents[1]
VAR, GONE = "SILVERLABEL_TEST_ENGINE_VAR", "SILVERLABEL_TEST_ENGINE_GONE"
PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
              "no_proxy", "NO_PROXY", "REQUEST_METHOD")


@pytest.fixture(autouse=True)
def _importable(monkeypatch):
    """Workers unpickle this module's unit functions by name (``tests.test_engine_local``):
    the repository root on the driver's ``sys.path``, which workers take with them."""
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.delenv(START_METHOD_ENV, raising=False)


def _whoami(unit, names, report):
    """A unit function: what the worker process sees."""
    report(1, 1)
    method = "forkserver" if forkserver._forkserver.get_inherited_fds() is not None else "spawn"
    return {"unit": unit, "pid": os.getpid(), "ppid": os.getppid(), "method": method,
            "env": {n: os.environ.get(n) for n in names}, "cwd": os.getcwd(), "path": list(sys.path),
            "identity": list(mp.current_process()._identity), "numpy_loaded": "numpy" in sys.modules}


def _leave_atexit_mark(unit, folder, report):
    """A unit function whose process leaves a file when it exits (atexit, as ingest's staging
    folders and HTTP connections are cleaned)."""
    import atexit

    path = Path(folder) / f"exited-{os.getpid()}"
    atexit.register(path.write_text, "bye")
    return os.getpid()


def _chatty(unit, n, report):
    """A unit function that reports n items of progress one by one, then logs a warning."""
    for _ in range(n):
        report(1, 1)
    logging.getLogger("silverlabel.test_engine").warning("unit %d done", unit)
    return unit


def _write_std(unit, _config, report):
    """A unit function that writes to file descriptors 1 and 2 directly (as C libraries do)."""
    os.write(1, f"out {unit}\n".encode())
    os.write(2, f"err {unit}\n".encode())
    return unit


def _server_pid() -> int | None:
    return forkserver._forkserver._forkserver_pid


def _fresh_server(monkeypatch, **env: str) -> int:
    """A fork server started now under ``env``; the caller then changes the environment."""
    local._stop_forkserver()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert start_forkserver()
    pid = _server_pid()
    assert pid is not None
    return pid


# --- the environment, the folder, the process -------------------------------------------


@needs_forkserver
def test_workers_take_the_drivers_environment_not_the_servers(monkeypatch, tmp_path):
    server = _fresh_server(monkeypatch, **{GONE: "set when the server started"})
    monkeypatch.delenv(VAR, raising=False)
    monkeypatch.setenv(VAR, "set after the server started")
    monkeypatch.delenv(GONE)
    monkeypatch.chdir(tmp_path)
    out = list(LocalEngine(2).map(_whoami, range(6), [VAR, GONE, "OPENBLAS_NUM_THREADS"]))
    assert sorted(r["unit"] for r in out) == list(range(6))
    assert {r["method"] for r in out} == {"forkserver"}
    assert {r["ppid"] for r in out} == {server}  # forked by that server, which kept its environment
    assert all(r["numpy_loaded"] for r in out)  # preloaded there
    assert [r["env"][VAR] for r in out] == ["set after the server started"] * 6
    assert [r["env"][GONE] for r in out] == [None] * 6
    assert all(r["env"]["OPENBLAS_NUM_THREADS"] == os.environ.get("OPENBLAS_NUM_THREADS", "1") for r in out)
    assert {r["cwd"] for r in out} == {str(tmp_path)}
    assert all(r["path"][0] == str(REPO) for r in out)  # the driver's sys.path
    # two processes, each with its own identity (GPU stages pick GPU k by it: devices.worker_device)
    ids = {r["pid"]: tuple(r["identity"]) for r in out}
    assert len(ids) == 2 and len(set(ids.values())) == 2 and all(ids.values())
    assert os.getpid() not in ids
    # the next pool changes its mind with the driver, on the same server
    monkeypatch.setenv(VAR, "changed again")
    again = list(LocalEngine(2).map(_whoami, range(2), [VAR]))
    assert [r["env"][VAR] for r in again] == ["changed again"] * 2 and {r["ppid"] for r in again} == {server}


@needs_forkserver
def test_the_server_is_reaped_and_started_again(monkeypatch):
    server = _fresh_server(monkeypatch)
    local._stop_forkserver()
    assert _server_pid() is None
    with pytest.raises(ChildProcessError):  # reaped by this process, not left to init
        os.waitpid(server, os.WNOHANG)
    out = list(LocalEngine(2).map(_whoami, range(2), []))
    assert {r["method"] for r in out} == {"forkserver"}
    assert _server_pid() not in (None, server) and {r["ppid"] for r in out} == {_server_pid()}


@needs_forkserver
def test_ingest_with_two_workers_follows_the_proxy_environment(monkeypatch, tmp_path):
    """A stage, workers=2: the proxy set in the driver after the server started is used, and
    the one the server started with is not."""
    from silverlabel.sources.http import FetchConfig
    from silverlabel.stages.ingest import IngestConfig, run_ingest

    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    n = 6

    def table(urls: list[str], name: str) -> Path:
        path = tmp_path / name
        pq.write_table(pa.table({"url": urls}), path)
        return path

    def ingest(source: Path, out: str) -> list[str]:
        cfg = IngestConfig(sources=(str(source),), output=str(tmp_path / out), samples_per_shard=2, workers=2,
                           fetch=FetchConfig(retries=0, timeout=10, allow_private_network=True))
        run_ingest(cfg)
        return [r["status"] for r in pq.read_table(tmp_path / out / "samples").to_pylist()]

    with MisbehavingServer() as origin, ForwardProxy(hosts={"images.example": "127.0.0.1"}) as proxy:
        for k in range(n):
            origin.add(f"/img{k}.jpg", sample_jpeg(seed=k))
        direct = table([origin.url(f"/img{k}.jpg") for k in range(n)], "direct.parquet")
        named = [origin.url(f"/img{k}.jpg", host="images.example") for k in range(n)]
        # the server starts with a proxy nobody listens on; the driver then drops it
        with __import__("socket").socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]
        _fresh_server(monkeypatch, HTTP_PROXY=f"http://127.0.0.1:{dead}")
        monkeypatch.delenv("HTTP_PROXY")
        assert ingest(direct, "pool") == ["success"] * n  # direct: the server's proxy would fail them all
        assert origin.hits and proxy.count() == 0
        # and a proxy set now is used (images.example resolves only there)
        monkeypatch.setenv("HTTP_PROXY", proxy.url())
        assert ingest(table(named, "named.parquet"), "proxied") == ["success"] * n
        assert sorted(proxy.targets("GET")) == sorted(named)


@needs_forkserver
def test_workers_write_to_the_drivers_stdout_and_stderr_of_now(monkeypatch, capfd):
    """The server started under other descriptors (here: pytest's own, capture off); the
    workers' writes land where the driver's go now (this test's capture)."""
    with capfd.disabled():
        _fresh_server(monkeypatch)
    assert sorted(LocalEngine(2).map(_write_std, range(3), None)) == [0, 1, 2]
    out, err = capfd.readouterr()
    assert sorted(out.splitlines()) == ["out 0", "out 1", "out 2"]
    assert sorted(err.splitlines()) == ["err 0", "err 1", "err 2"]


DRIVER = textwrap.dedent("""
    import os, sys, time
    from silverlabel.engine.local import LocalEngine

    def sleepy(unit, folder, report):
        with open(os.path.join(folder, f"{unit}-{os.getpid()}-{os.getppid()}"), "w"):
            pass
        time.sleep(60)

    if __name__ == "__main__":
        list(LocalEngine(2, start_method=sys.argv[2]).map(sleepy, range(2), sys.argv[1]))
""")


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_workers_and_the_server_end_when_the_driver_is_killed(tmp_path, method):
    """A driver killed mid-unit (SIGKILL: no cleanup of its own) leaves no process behind."""
    if method not in mp.get_all_start_methods() or not os.path.isdir("/proc"):
        pytest.skip("no fork server or no /proc on this platform")
    import time

    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    (tmp_path / "marks").mkdir()
    driver = subprocess.Popen([sys.executable, str(script), str(tmp_path / "marks"), method])
    try:
        deadline = time.monotonic() + 60
        while len(list((tmp_path / "marks").iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        marks = [p.name.split("-") for p in (tmp_path / "marks").iterdir()]
        assert len(marks) == 2, "the workers did not start"
    finally:
        driver.kill()
        driver.wait()
    workers, parents = {int(pid) for _u, pid, _p in marks}, {int(parent) for _u, _pid, parent in marks}
    if method == "spawn":
        assert parents == {driver.pid}
    else:  # one fork server, which would outlive the driver while a worker holds its "alive" pipe
        assert len(parents) == 1 and driver.pid not in parents
    left = (workers | parents) - {driver.pid}

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for this purpose
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 10
    while any(alive(p) for p in left) and time.monotonic() < deadline:
        time.sleep(0.05)
    stuck = [p for p in left if alive(p)]
    for pid in stuck:  # leave nothing behind when failing
        os.kill(pid, 9)
    assert not stuck


# --- the spawn fallback ------------------------------------------------------------------


def test_spawn_on_request_and_where_there_is_no_fork_server(monkeypatch):
    out = list(LocalEngine(2, start_method="spawn").map(_whoami, range(3), []))
    assert {r["method"] for r in out} == {"spawn"} and {r["ppid"] for r in out} == {os.getpid()}
    assert sorted(r["unit"] for r in out) == [0, 1, 2]
    monkeypatch.setenv(START_METHOD_ENV, "spawn")
    monkeypatch.setenv(VAR, "from the driver")
    engine = LocalEngine(2)
    assert engine.start_method == "spawn"
    assert [r["env"][VAR] for r in engine.map(_whoami, range(2), [VAR])] == ["from the driver"] * 2
    monkeypatch.delenv(START_METHOD_ENV)
    monkeypatch.setattr(mp, "get_all_start_methods", lambda: ["spawn"])  # a platform without one
    assert resolve_start_method() == "spawn" and LocalEngine(2).start_method == "spawn"
    assert start_forkserver() is False


@pytest.mark.parametrize("bad", ["fork", "threads"])
def test_bad_start_method_is_a_user_error(monkeypatch, bad):
    monkeypatch.setenv(START_METHOD_ENV, bad)
    with pytest.raises(UserError, match=f"{START_METHOD_ENV}='{bad}'.*forkserver or spawn"):
        LocalEngine(2)
    with pytest.raises(UserError, match="start_method='fork'"):
        LocalEngine(2, start_method="fork")


# --- what a worker leaves and sends --------------------------------------------------------


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_atexit_handlers_run_when_a_worker_exits(tmp_path, method):
    if method not in mp.get_all_start_methods():
        pytest.skip("no fork server on this platform")
    pids = set(LocalEngine(2, start_method=method).map(_leave_atexit_mark, range(4), str(tmp_path)))
    assert {p.name for p in tmp_path.iterdir()} == {f"exited-{pid}" for pid in pids}


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_all_progress_and_log_records_arrive_before_map_returns(caplog, method):
    if method not in mp.get_all_start_methods():
        pytest.skip("no fork server on this platform")
    got = [0, 0]

    def report(done: int, ok: int) -> None:
        got[0] += done
        got[1] += ok

    caplog.set_level(logging.WARNING, logger="silverlabel")
    units = list(range(8))
    assert sorted(LocalEngine(2, start_method=method).map(_chatty, units, 500, report)) == units
    assert got == [8 * 500, 8 * 500]  # no wait after map: everything is in
    assert sorted(r.getMessage() for r in caplog.records if r.name == "silverlabel.test_engine") == \
        sorted(f"unit {u} done" for u in units)


# --- what the fork server imports ---------------------------------------------------------

#: every unit function a stage hands to an engine
UNIT_FUNCTIONS = [("silverlabel.stages.ingest", "ingest_shard"), ("silverlabel.stages.label", "label_shard"),
                  ("silverlabel.stages.reinforce", "reinforce_shard"), ("silverlabel.stages.shard", "write_shard"),
                  ("silverlabel.stages.shard", "index_source_shard"),
                  ("silverlabel.stages.select.units", "count_unit"),
                  ("silverlabel.stages.select.units", "fraction_unit"),
                  ("silverlabel.stages.select.units", "write_unit")]


def test_the_preload_starts_no_thread_imports_no_torch_and_reads_no_settings():
    """The fork server imports the preload, the CLI and a stage's unit module; every worker
    of every stage (GPU ones included) is forked from the result. So: one thread (a fork
    copies only the forking one), no torch (CUDA, threads), no fsspec (reads its FSSPEC_*
    settings when imported), no cached temporary folder; the heavy imports done."""
    import importlib

    modules = sorted({m for m, _ in UNIT_FUNCTIONS})
    for module, name in UNIT_FUNCTIONS:
        assert getattr(importlib.import_module(module), name).__module__ == module
        assert local.preload_modules(module)[-1] == module
    script = textwrap.dedent(f"""
        import json, os, sys, tempfile
        import silverlabel.engine.preload as preload
        import silverlabel.cli
        for m in {modules!r}:
            __import__(m)
        threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1
        print(json.dumps({{"threads": threads, "loaded": preload.loaded, "tempdir": tempfile.tempdir,
                          "unwanted": [m for m in ("torch", "fsspec", "s3fs", "boto3", "huggingface_hub", "duckdb")
                                       if m in sys.modules]}}))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "JE_ARROW_MALLOC_CONF")}
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert got["threads"] == 1, got
    assert got["unwanted"] == [] and got["tempdir"] is None, got
    assert {"numpy", "pyarrow", "cv2", "PIL.Image"} <= set(got["loaded"]), got


def test_only_silverlabel_modules_are_preloaded():
    assert local.preload_modules("some_plugin.stage")[-1] != "some_plugin.stage"
    assert local.preload_modules("silverlabel.stages.ingest")[0] == local.PRELOAD_MODULE


def test_pandas_is_preloaded_only_for_stages_that_need_it():
    """pyarrow imports pandas (~0.2 s) the first time it converts Python objects: the server
    preloads it for every stage but those whose workers never do (ingest: tests/test_ingest_pandas_free.py),
    and for a user's module (unknown)."""
    for module, _ in UNIT_FUNCTIONS:
        wanted = module not in local.PANDAS_FREE
        assert ("pandas" in local.preload_modules(module)) == wanted, module
    assert "pandas" in local.preload_modules("some_plugin.stage") and "pandas" in local.preload_modules()
    assert "pandas" not in local.preload_modules("silverlabel.stages.ingest")


def test_cli_starts_the_fork_server_only_for_a_local_pool():
    """The CLI starts the fork server before parsing when the command runs a local pool of
    more than one worker, and not for one worker, another engine or a command without one."""
    from silverlabel.cli import _early_pool

    assert _early_pool("shard", ["shard", "sel", "-o", "ts", "--workers", "3"]) == "silverlabel.stages.shard"
    assert _early_pool("ingest", ["-v", "ingest", "u.parquet", "--workers", "2", "--engine", "ray"]) is None
    assert _early_pool("ingest", ["ingest", "u.parquet", "--workers", "1"]) is None
    assert _early_pool("ingest", ["ingest", "u.parquet", "--workers", "two"]) is None  # the parser's to report
    assert _early_pool("label", ["label", "pool", "--workers", "2"]) is None
    assert _early_pool("ingest", ["ingest", "--workers", "2", "--help"]) is None


def test_in_process_units_overlap_in_order_and_a_failure_stops_the_other():
    """``workers=1`` with a function whose ``overlap_units`` is 2 (reinforce): two units run at
    once on threads, results come back in unit order; when one fails, the unit beside it
    stops at its next progress report (``UnitStopped``) and no later unit starts."""
    import threading

    started, both, four, ticks = [], threading.Barrier(2, timeout=10), threading.Event(), []

    def fn(unit, config, report):
        started.append(unit)
        if unit < 2:
            both.wait()  # units 0 and 1 run at the same time, or this times out
        if unit == 3:
            assert four.wait(10)
            raise ValueError("unit 3 is broken")
        if unit == 4:
            four.set()
            try:
                for _ in range(1000):
                    report(1, 0)
                    ticks.append(1)
                    threading.Event().wait(0.01)
            except local.UnitStopped:
                ticks.append("stopped")
                raise
        return unit * 10

    fn.overlap_units = 2
    got = []
    with pytest.raises(ValueError, match="unit 3"):
        for r in LocalEngine(1).map(fn, range(8), None):
            got.append(r)
    assert got == [0, 10, 20]
    assert sorted(started) == [0, 1, 2, 3, 4]  # 4 ran beside 3, stopped; 5.. never started
    assert ticks[-1] == "stopped" and len(ticks) < 1000  # unit 4 stopped at a report, not after its 1,000

    def plain(unit, config, report):
        return threading.current_thread() is threading.main_thread()

    assert list(LocalEngine(1).map(plain, range(3), None)) == [True] * 3  # no overlap_units: this thread
