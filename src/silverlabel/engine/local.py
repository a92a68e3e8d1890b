"""The local engine: a process pool on one machine.

Units are submitted through a bounded window (so a table of 700M rows is never
materialised as work items), results come back as they complete, and per-item progress
from the workers flows through a queue to the driver's progress bar; so do the workers' log
records (at the driver's level: :func:`silverlabel.log.worker_logging`), shown by the
driver's handlers. ``workers=1`` runs in-process, which keeps tracebacks simple when
debugging.

Workers are forked from a fork server (``multiprocessing``'s ``forkserver`` start method)
that has imported numpy, pyarrow, OpenCV (:mod:`silverlabel.engine.preload`), pandas where
the stage's workers need it (:func:`preload_modules`) and the unit function's module once,
so a worker starts in milliseconds instead of importing them again (~0.35 s of CPU each).
Never a plain fork of the driver: it may run threads (progress, servers). The server starts
with the first pool and lives as long as the driver, with the environment it started with:
each worker takes the driver's environment of the moment its pool starts (tests and users
change proxies, endpoints, credentials). Where there is no fork server, or with
``SILVERLABEL_START_METHOD=spawn`` (debugging), workers are spawned: fresh interpreters that
import everything themselves.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import util as mp_util
from typing import Any

from silverlabel.engine import Report, ShardFn, unit_name
from silverlabel.errors import UserError
from silverlabel.log import current_level, forward_records, worker_logging

log = logging.getLogger(__name__)
_progress_queue: Any = None


#: ``forkserver`` (the default where the platform has it) or ``spawn``; never ``fork``.
START_METHOD_ENV = "SILVERLABEL_START_METHOD"
START_METHODS = ("forkserver", "spawn")

#: The fork server's own imports (see its docstring), before the unit function's module.
PRELOAD_MODULE = "silverlabel.engine.preload"

#: What pyarrow imports the first time it converts Python objects to an array or table (it asks
#: whether they are pandas objects): ~0.2 s, preloaded unless the stage's workers never do that.
PANDAS_MODULES = ("pandas", "pyarrow.pandas_compat")

#: Unit modules whose workers build their tables from Arrow buffers
#: (:func:`silverlabel.formats.tables.column_array`), so never import pandas
#: (tests/test_ingest_pandas_free.py): their fork server does not preload it either.
PANDAS_FREE = ("silverlabel.stages.ingest",)


def _init_worker(q: Any, level: int = logging.WARNING, environ: Mapping[str, str] | None = None,
                 stdio: _DriverStdio | None = None) -> None:
    global _progress_queue
    _progress_queue = q
    _exit_with_driver()
    if stdio is not None:
        stdio.install()
    if environ is not None:  # forked from the fork server, which has the environment it started with
        _take_environment(environ)
        # a fork server's child ends with os._exit, after multiprocessing's finalizers but
        # without the interpreter's exit: run the atexit handlers (staging folders, pipe
        # copies, HTTP connections) as a spawned worker's exit does, last
        mp_util.Finalize(None, atexit._run_exitfuncs, exitpriority=-100)
    # the driver's log level; records go through the queue to the driver's handlers
    worker_logging(level, q)
    # Parallelism comes from the worker processes: numpy's OpenBLAS must not start a
    # thread per core in each of them (idle BLAS threads busy-wait and eat the CPU the other
    # workers need). Runs before the unit function's module imports numpy; the user's own
    # setting wins. (A fork server loaded numpy with the same default: engine.preload.)
    if "numpy" not in sys.modules or environ is not None:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _exit_with_driver() -> None:
    """End this worker when the driver is gone (killed, say): a pool worker waits for work
    forever otherwise, and a fork server lives as long as any of its workers. A daemon
    thread waits on the parent's sentinel (the driver's, also for a fork server's child)."""
    parent = mp.parent_process()
    sentinel = getattr(parent, "sentinel", None)
    if sentinel is None:
        return

    def watch() -> None:
        from multiprocessing.connection import wait as wait_for

        wait_for([sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="silverlabel-driver-watch", daemon=True).start()


class _DriverStdio:
    """The driver's stdout and stderr (file descriptors 1 and 2), for a fork server's child:
    it would otherwise write to the server's, those the driver had when the server started
    (another test's capture under pytest, say), where a spawned worker inherits the driver's
    of the moment. Passed with the process (``multiprocessing.reduction.DupFd``), so only
    pickled while a fork server's child is being started."""

    def __init__(self, fds: list[Any] | None = None):
        self.fds = fds

    def __reduce__(self) -> tuple[Any, ...]:
        from multiprocessing import reduction

        fds: list[Any] = []
        for fd in (1, 2):
            try:
                os.fstat(fd)
            except OSError:  # closed in the driver: the child keeps the server's
                fds.append(None)
                continue
            fds.append(reduction.DupFd(fd))
        return (_DriverStdio, (fds,))

    def install(self) -> None:
        """In the child: make the driver's descriptors this process's 1 and 2."""
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        for target, dup in zip((1, 2), self.fds or ()):
            if dup is None:
                continue
            fd = dup.detach()
            if fd != target:
                os.dup2(fd, target)
                os.close(fd)


def _take_environment(environ: Mapping[str, str]) -> None:
    """Make this process's environment ``environ`` (the driver's), as a spawned worker's is."""
    for name in [n for n in os.environ if n not in environ]:
        del os.environ[name]
    for name, value in environ.items():
        if os.environ.get(name) != value:
            os.environ[name] = value
    if "tempfile" in sys.modules:  # tempfile caches the folder it found ($TMPDIR) on first use
        sys.modules["tempfile"].tempdir = None


def resolve_start_method(method: str | None = None) -> str:
    """The start method the local engine's pools use: ``method``, else ``$SILVERLABEL_START_METHOD``,
    else ``forkserver``; ``spawn`` where the platform has no fork server.

        >>> resolve_start_method("spawn")
        'spawn'
    """
    chosen = (method or os.environ.get(START_METHOD_ENV, "") or "forkserver").strip().lower()
    if chosen not in START_METHODS:
        source = "start_method" if method else START_METHOD_ENV
        raise UserError(f"{source}={chosen!r}: the local engine starts its workers with "
                        f"{' or '.join(START_METHODS)}")
    if chosen == "forkserver" and "forkserver" not in mp.get_all_start_methods():
        return "spawn"
    return chosen


def preload_modules(fn_module: str | None = None) -> list[str]:
    """What the fork server imports before forking workers: :mod:`silverlabel.engine.preload`,
    pandas (:data:`PANDAS_MODULES`) unless ``fn_module`` is one of :data:`PANDAS_FREE`, the
    CLI (a worker runs the driver's main script again, and the ``silverlabel`` script is
    ``from silverlabel.cli import main``) when the driver runs it, and ``fn_module`` when it is
    one of silverlabel's own: those are known to import neither torch nor anything that starts
    a thread or reads credentials when imported (tests/test_engine_local.py checks the
    stages'); a user's module might, and is imported by each worker instead. (A module that
    is not installed is skipped by the server: pandas is optional.)

        >>> preload_modules("silverlabel.stages.ingest")[-1]
        'silverlabel.stages.ingest'
        >>> "pandas" in preload_modules("silverlabel.stages.ingest")
        False
        >>> "pandas" in preload_modules("silverlabel.stages.label")
        True
        >>> preload_modules("my_plugin") == preload_modules()
        True
    """
    mods = [PRELOAD_MODULE]
    if fn_module not in PANDAS_FREE:
        mods.extend(PANDAS_MODULES)
    if "silverlabel.cli" in sys.modules:
        mods.append("silverlabel.cli")
    if fn_module and fn_module.split(".")[0] == "silverlabel" and fn_module not in mods:
        mods.append(fn_module)
    return mods


def start_forkserver(fn_module: str | None = None, method: str | None = None) -> bool:
    """Start the fork server now (if it is not running) with :func:`preload_modules`, so that
    its imports overlap the caller's own work; False where workers are spawned instead
    (:func:`resolve_start_method`). The first pool does this itself; a driver that knows early that
    it will run a pool (the CLI, from ``--engine`` and ``--workers`` before it parses the
    rest) can call it sooner. A server already running keeps what it preloaded."""
    if resolve_start_method(method) != "forkserver":
        return False
    from multiprocessing import forkserver

    mp.get_context("forkserver").set_forkserver_preload(preload_modules(fn_module))
    forkserver.ensure_running()
    global _stop_registered
    if not _stop_registered:
        _stop_registered = True
        atexit.register(_stop_forkserver)
    return True


_stop_registered = False


def _stop_forkserver() -> None:
    """At the driver's exit: end the fork server and reap it. Left alone, it would notice
    the driver's exit, tear down its interpreter as an orphan (~0.1 s, its CPU time then
    counted nowhere: ``time silverlabel ...`` and benchmarks would miss it) and hold the
    driver's stdout/stderr open meanwhile. Its workers are gone by now (each pool joins
    them), so nothing is lost by a SIGTERM; multiprocessing's own stop then reaps it."""
    import signal
    from multiprocessing import forkserver

    server = forkserver._forkserver
    pid = getattr(server, "_forkserver_pid", None)
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGTERM)
        server._stop()  # closes the "alive" pipe, waits for the pid, removes the socket
    except (AttributeError, OSError):  # another Python's internals, or already gone
        pass


class _BatchedReport:
    """Coalesce per-item progress into a queue message every ~0.2 s."""

    def __init__(self, q: Any):
        self.q = q
        self.done = self.ok = 0
        self.last = time.monotonic()

    def __call__(self, done: int, ok: int) -> None:
        self.done += done
        self.ok += ok
        now = time.monotonic()
        if now - self.last >= 0.2:
            self.flush()
            self.last = now

    def flush(self) -> None:
        if self.done or self.ok:
            self.q.put((self.done, self.ok))
            self.done = self.ok = 0


def _run_unit(fn: ShardFn, unit: Any, config: Any) -> Any:
    report = _BatchedReport(_progress_queue)
    t0 = time.monotonic()
    log.debug("%s: started", unit_name(unit))
    try:
        result = fn(unit, config, report)
    finally:
        report.flush()
    log.debug("%s: done in %.2f s", unit_name(unit), time.monotonic() - t0)
    return result


def _in_process(fn: ShardFn, units: Iterable[Any], config: Any, report: Report) -> Iterator[Any]:
    """``workers=1``: the units in this process, in order. A function with an
    ``overlap_units`` attribute of N > 1 runs up to N units at once on threads (results still
    in unit order): reinforce on a GPU starts the next shard's reading and first batches while
    this one's last batches are at the teacher, which otherwise idled between shards; the
    function itself keeps its units from contending where that matters."""
    overlap = int(getattr(fn, "overlap_units", 1))
    if overlap <= 1:
        for unit in units:
            yield fn(unit, config, report)
        return
    from concurrent.futures import ThreadPoolExecutor

    stop = threading.Event()

    def reported(done: int, size: int) -> None:
        if stop.is_set():  # the run failed or was interrupted: a unit still running stops at its next report
            raise UnitStopped("stopped: another unit failed or the run was interrupted")
        report(done, size)

    pending: list[Future] = []
    pool = ThreadPoolExecutor(overlap, thread_name_prefix="silverlabel-unit")
    try:
        for unit in units:
            pending.append(pool.submit(fn, unit, config, reported))
            if len(pending) >= overlap:
                yield pending.pop(0).result()
        while pending:
            yield pending.pop(0).result()
    finally:  # units not started are dropped; started ones end (or stop at their next report)
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)


class UnitStopped(Exception):
    """Raised in a unit running beside one that failed (or when the run was interrupted), at
    its next progress report: it unwinds as on any error, leaving no output under a final name."""


class LocalEngine:
    """Map a shard function over units with ``workers`` processes.

    ``start_method``: ``forkserver`` or ``spawn`` (default: :func:`resolve_start_method`)."""

    device = "cpu"

    def __init__(self, workers: int = 1, start_method: str | None = None):
        if workers < 1:
            raise UserError(f"--workers must be >= 1, got {workers}")
        self.workers = workers
        self.start_method = resolve_start_method(start_method)  # a bad value fails here, before any work

    def describe_device(self, device: str) -> str:
        from silverlabel.devices import resolve_device

        return resolve_device(device)  # also: a UserError now for --device cuda without a GPU

    def map(self, fn: ShardFn, units: Iterable[Any], config: Any, progress: Report | None = None) -> Iterator[Any]:
        report: Report = progress or (lambda d, s: None)
        if self.workers == 1:
            yield from _in_process(fn, units, config, report)
            return
        forked = self.start_method == "forkserver"
        if forked:  # now, so that the server's imports overlap the plan's first unit
            start_forkserver(getattr(fn, "__module__", None), self.start_method)
        ctx = mp.get_context(self.start_method)
        q = ctx.Queue()
        stop = threading.Event()

        def drain() -> None:
            while True:
                try:
                    msg = q.get(timeout=0.5)
                except queue.Empty:
                    if stop.is_set():
                        return
                    continue
                except (EOFError, OSError):
                    return
                if msg is None:  # the driver's own, after the workers' last
                    return
                if isinstance(msg, logging.LogRecord):  # a worker's log record
                    forward_records(msg)
                else:
                    report(*msg)

        drainer = threading.Thread(target=drain, daemon=True)
        drainer.start()
        pending: set[Future] = set()
        it = iter(units)
        exhausted = False
        # a fork server's child would otherwise have the server's environment and stdio, not the driver's
        initargs = (q, current_level(), dict(os.environ), _DriverStdio()) if forked else (q, current_level())
        try:
            with ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker,
                                     initargs=initargs) as pool:
                while True:
                    while not exhausted and len(pending) < 2 * self.workers:
                        try:
                            unit = next(it)
                        except StopIteration:
                            exhausted = True
                            break
                        pending.add(pool.submit(_run_unit, fn, unit, config))
                    if not pending:
                        break
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        yield fut.result()
        finally:
            for fut in pending:
                fut.cancel()
            # The pool has joined its workers, whose queue writes were flushed as they
            # exited: this marker comes after their last message. (Should it never arrive,
            # a dead worker holding the queue's lock, the join gives up and stop ends the
            # drain; the driver's exit does not wait on the marker's write.)
            q.cancel_join_thread()
            q.put(None)
            drainer.join(timeout=2)
            stop.set()
