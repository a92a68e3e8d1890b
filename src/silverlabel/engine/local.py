"""The local engine: a process pool on one machine.

Units are submitted through a bounded window (so a table of 700M rows is never
materialised as work items), results come back as they complete, and per-item progress
from the workers flows through a queue to the driver's progress bar; so do the workers' log
records (at the driver's level: :func:`silverlabel.log.worker_logging`), shown by the
driver's handlers. ``workers=1`` runs in-process, which keeps tracebacks simple when
debugging.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

from silverlabel.engine import Report, ShardFn, unit_name
from silverlabel.errors import UserError
from silverlabel.log import current_level, forward_records, worker_logging

log = logging.getLogger(__name__)
_progress_queue: Any = None


def _init_worker(q: Any, level: int = logging.WARNING) -> None:
    global _progress_queue
    _progress_queue = q
    # the driver's log level; records go through the queue to the driver's handlers
    worker_logging(level, q)
    # Parallelism comes from the worker processes: numpy's OpenBLAS must not start a
    # thread per core in each of them (idle BLAS threads busy-wait and eat the CPU the other
    # workers need). Runs before the unit function's module imports numpy; the user's own
    # setting wins.
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


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


class LocalEngine:
    """Map a shard function over units with ``workers`` processes."""

    device = "cpu"

    def __init__(self, workers: int = 1):
        if workers < 1:
            raise UserError(f"--workers must be >= 1, got {workers}")
        self.workers = workers

    def describe_device(self, device: str) -> str:
        from silverlabel.devices import resolve_device

        return resolve_device(device)  # also: a UserError now for --device cuda without a GPU

    def map(self, fn: ShardFn, units: Iterable[Any], config: Any, progress: Report | None = None) -> Iterator[Any]:
        report: Report = progress or (lambda d, s: None)
        if self.workers == 1:
            for unit in units:
                yield fn(unit, config, report)
            return
        ctx = mp.get_context("spawn")  # no fork: the driver may run threads (progress, servers)
        q = ctx.Queue()
        stop = threading.Event()

        def drain() -> None:
            while not stop.is_set() or not q.empty():
                try:
                    msg = q.get(timeout=0.1)
                except queue.Empty:
                    continue
                except (EOFError, OSError):
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
        try:
            with ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker,
                                     initargs=(q, current_level())) as pool:
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
            time.sleep(0.05)
            stop.set()
            drainer.join(timeout=2)
