"""The Ray engine: the same shard functions, run on a Ray cluster.

``create_engine("ray", workers=N, address=...)`` maps a stage's unit function over its
units on a cluster (``address``: ``None`` joins the cluster this machine belongs to, or
starts a local one; ``"auto"`` joins an existing one or fails; ``"ray://host:10001"`` is a
remote cluster through Ray Client). Nothing else about a stage changes: units are pure and
idempotent and write their outputs atomically, so a unit that runs twice (a retry after a
worker died) leaves exactly the files one run leaves.

Two ways to run a unit:

* **tasks** (CPU stages: ingest, shard, select passes): one Ray task per unit, one CPU
  each, at most ``workers`` in flight (backpressure: units are pulled from the stage's
  iterator only as tasks finish, so a 700M-row table is never materialised as tasks).
  A task whose worker process or node dies is retried (``max_retries``); an exception
  raised by the unit itself is a real error and is not retried.
* **actors** (``actor=True``; GPU stages: label, reinforce): ``workers`` long-lived
  actors (one GPU each, ``gpus_per_worker``; none on a CPU-only cluster), so a teacher is
  loaded once per actor and reused for every unit it runs (the stages cache their model
  per process). Each actor holds at most two units (one running, one queued). A killed
  actor is restarted (``max_restarts``) and its unit re-run (``max_task_retries``).

Progress: units report ``(done, ok)`` to a small progress actor (cumulative per unit and
attempt, coalesced every 0.2 s); the driver polls it and calls the stage's ``progress``
callback with increments, exactly as the local engine does. Logging: a unit runs with the
``silverlabel`` loggers at the driver's level, writing to the worker's stderr, which Ray
shows on the driver's console (``log_to_driver``). A retried unit's counts are
not added twice: per unit, the driver shows the largest count any attempt reached and, when
the unit finishes, settles on the final attempt's exact totals.

Every node must be able to ``import silverlabel`` (the same version as the driver): install
it on every node (``pip install 'silverlabel[ray]'``), or run the command as a Ray job that
ships it (``ray job submit --runtime-env-json '{"pip": ["silverlabel[ray]"]}' -- silverlabel
ingest ... --engine ray``). The engine checks this before the first unit runs.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from silverlabel import __version__
from silverlabel.engine import Report, ShardFn, unit_name
from silverlabel.errors import UserError
from silverlabel.log import ROOT, current_level, worker_logging

_REPORT_EVERY = 0.2
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# what runs on the workers


class _CumulativeReport:
    """The ``report`` a unit gets on a worker: cumulative counts to the progress actor."""

    def __init__(self, sink: Any, token: int):
        self.sink = sink
        self.token = token
        self.attempt = uuid.uuid4().hex[:12]
        self.done = self.ok = 0
        self.last = time.monotonic()
        self.sent = (0, 0)

    def __call__(self, done: int, ok: int) -> None:
        self.done += done
        self.ok += ok
        now = time.monotonic()
        if now - self.last >= _REPORT_EVERY:
            self.flush()
            self.last = now

    def flush(self) -> None:
        if self.sink is None or (self.done, self.ok) == self.sent:
            return
        self.sent = (self.done, self.ok)
        try:
            self.sink.put.remote(self.token, self.attempt, self.done, self.ok)
        except Exception:  # progress is best effort; the result carries the exact totals
            pass


def _execute(fn: ShardFn, unit: Any, config: Any, token: int, sink: Any,
             level: int = logging.WARNING) -> tuple[int, Any, int, int]:
    if logging.getLogger(ROOT).level != level:  # once per worker process: the driver's level, to its stderr
        worker_logging(level)
    report = _CumulativeReport(sink, token)
    t0 = time.monotonic()
    log.debug("%s: started", unit_name(unit))
    result = fn(unit, config, report)
    log.debug("%s: done in %.2f s", unit_name(unit), time.monotonic() - t0)
    return token, result, report.done, report.ok


def silverlabel_unit(fn: ShardFn, unit: Any, config: Any, token: int, sink: Any,
                     level: int = logging.WARNING) -> tuple[int, Any, int, int]:
    """A unit as a Ray task (its worker's process title is ``ray::silverlabel_unit``)."""
    return _execute(fn, unit, config, token, sink, level)


class SilverlabelWorker:
    """A long-lived worker process for GPU stages: whatever the unit function caches per
    process (the teacher) stays loaded between units."""

    def ready(self) -> int:
        return os.getpid()

    def run(self, fn: ShardFn, unit: Any, config: Any, token: int, sink: Any,
            level: int = logging.WARNING) -> tuple[int, Any, int, int]:
        return _execute(fn, unit, config, token, sink, level)


class ProgressSink:
    """Latest cumulative (done, ok) per (unit, attempt), taken by the driver."""

    def __init__(self) -> None:
        self.latest: dict[tuple[int, str], tuple[int, int]] = {}

    def put(self, token: int, attempt: str, done: int, ok: int) -> None:
        prev = self.latest.get((token, attempt))
        if prev is None or done >= prev[0]:
            self.latest[(token, attempt)] = (done, ok)

    def take(self) -> dict[tuple[int, str], tuple[int, int]]:
        out, self.latest = self.latest, {}
        return out


def _worker_check() -> tuple[str, str]:
    import silverlabel

    return silverlabel.__version__, os.path.dirname(silverlabel.__file__)


# ---------------------------------------------------------------------------------------
# the driver


def connect(address: str | None = None, runtime_env: dict | None = None) -> None:
    """Join (or start) the cluster once per process; a session already open is reused."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict[str, Any] = {"ignore_reinit_error": True, "logging_level": "WARNING", "log_to_driver": True}
    if runtime_env:
        kwargs["runtime_env"] = runtime_env
    try:
        ray.init(address=address or None, **kwargs)
    except ConnectionError as e:
        raise UserError(f"--ray-address {address}: cannot reach a Ray cluster ({e})") from None


class _Progress:
    """Driver side: per-unit counts from all attempts -> increments for ``report``."""

    def __init__(self, report: Report):
        self.report = report
        self.shown: dict[int, list[int]] = {}
        self.finished: set[int] = set()

    def update(self, latest: dict[tuple[int, str], tuple[int, int]]) -> None:
        best: dict[int, list[int]] = {}
        for (token, _attempt), (d, o) in latest.items():
            if token in self.finished:
                continue
            b = best.setdefault(token, [0, 0])
            b[0], b[1] = max(b[0], d), max(b[1], o)
        for token, (d, o) in best.items():
            s = self.shown.setdefault(token, [0, 0])
            dd, do = max(0, d - s[0]), max(0, o - s[1])
            if dd or do:
                s[0] += dd
                s[1] += do
                self.report(dd, do)

    def finish(self, token: int, done: int, ok: int) -> None:
        s = self.shown.pop(token, [0, 0])
        self.finished.add(token)
        if done != s[0] or ok != s[1]:
            self.report(done - s[0], ok - s[1])


class RayEngine:
    """Map a shard function over units on a Ray cluster (see the module docstring).

    ``workers``: units running at once (tasks) or number of actors; 0 = the cluster's CPUs
    (tasks) or GPUs (actors; CPUs on a cluster without GPUs). ``gpus_per_worker``: GPUs per
    actor; ``None`` = 1 when the cluster has GPUs, else 0.
    """

    def __init__(self, workers: int = 0, address: str | None = None, actor: bool = False,
                 gpus_per_worker: float | None = None, cpus_per_worker: float = 1, max_retries: int = 3,
                 runtime_env: dict | None = None):
        if workers < 0:
            raise UserError(f"--workers must be >= 0 with --engine ray (0: the whole cluster), got {workers}")
        self.workers = workers
        self.address = address
        self.actor = actor
        self.gpus_per_worker = gpus_per_worker
        self.cpus_per_worker = cpus_per_worker
        self.max_retries = max_retries
        self.runtime_env = runtime_env
        self._checked = False
        self.device = "ray (cpu)"

    def describe_device(self, device: str) -> str:
        return f"ray ({device})"  # the cluster's: a GPU per actor where it has GPUs

    # -- setup ----------------------------------------------------------------------
    def _start(self) -> None:
        import ray

        connect(self.address, self.runtime_env)
        if self._checked:
            return
        try:
            version, where = ray.get(ray.remote(_worker_check).options(num_cpus=0, max_retries=1).remote(), timeout=300)
        except ray.exceptions.GetTimeoutError:
            raise UserError("the Ray cluster did not run a task within 300 s (no free worker?)") from None
        except Exception as e:
            raise UserError(
                "the Ray workers cannot import silverlabel: install it on every node "
                "(pip install 'silverlabel[ray]') or submit the command as a Ray job with a runtime_env "
                f"that ships it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        if version != __version__:
            raise UserError(f"the Ray workers run silverlabel {version} ({where}), this driver {__version__}: "
                             "install the same version on every node")
        self._checked = True

    def _gpus(self) -> float:
        import ray

        if self.gpus_per_worker is not None:
            return self.gpus_per_worker
        return 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0

    def _count(self, gpus: float) -> int:
        import ray

        if self.workers:
            return self.workers
        res = ray.cluster_resources()
        if self.actor and gpus:
            return max(1, int(res.get("GPU", 0) // gpus))
        return max(1, int(res.get("CPU", 1) // max(self.cpus_per_worker, 1e-3)))

    # -- map --------------------------------------------------------------------------
    def map(self, fn: ShardFn, units: Iterable[Any], config: Any, progress: Report | None = None) -> Iterator[Any]:
        import ray
        import ray.util.scheduling_strategies

        self._start()
        prog = _Progress(progress or (lambda d, s: None))
        sink_options: dict[str, Any] = {"num_cpus": 0, "max_restarts": -1}
        try:  # near the driver when it is a node of the cluster (not through Ray Client)
            here = ray.get_runtime_context().get_node_id()
            sink_options["scheduling_strategy"] = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                node_id=here, soft=True)
        except Exception:
            pass
        sink = ray.remote(ProgressSink).options(**sink_options).remote()
        config_ref = ray.put(config)
        level = current_level()  # the workers log at the driver's level
        gpus = self._gpus() if self.actor else 0
        n = self._count(gpus)
        actors: list[Any] = []
        load: list[int] = []
        if self.actor:
            # a function with overlap_units > 1 (reinforce) runs that many units at once in an
            # actor (a threaded actor), as the local engine does in-process: the next shard's
            # reading overlaps this one's last batches instead of idling the actor's GPU
            overlap = max(1, int(getattr(fn, "overlap_units", 1)))
            cls = ray.remote(SilverlabelWorker).options(
                num_cpus=self.cpus_per_worker, num_gpus=gpus, max_restarts=self.max_retries,
                max_task_retries=self.max_retries, max_concurrency=overlap)
            actors = [cls.remote() for _ in range(n)]
            load = [0] * n
            window = max(2, overlap) * n
        else:
            task = ray.remote(silverlabel_unit).options(num_cpus=self.cpus_per_worker, max_retries=self.max_retries,
                                                        retry_exceptions=False)
            window = n
        pending: dict[Any, tuple[int, int]] = {}  # ref -> (token, actor index)
        it = iter(units)
        exhausted = False
        token = 0
        last_poll = 0.0
        try:
            while True:
                while not exhausted and len(pending) < window:
                    try:
                        unit = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                    if self.actor:
                        a = min(range(n), key=load.__getitem__)
                        ref = actors[a].run.remote(fn, unit, config_ref, token, sink, level)
                        load[a] += 1
                    else:
                        a = -1
                        ref = task.remote(fn, unit, config_ref, token, sink, level)
                    pending[ref] = (token, a)
                    token += 1
                if not pending:
                    break
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=_REPORT_EVERY)
                now = time.monotonic()
                if now - last_poll >= _REPORT_EVERY:
                    last_poll = now
                    try:
                        prog.update(ray.get(sink.take.remote(), timeout=30))
                    except Exception:
                        pass
                for ref in ready:
                    _tok, a = pending.pop(ref)
                    if a >= 0:
                        load[a] -= 1
                    try:
                        tok, result, done, ok = ray.get(ref)
                    except ray.exceptions.RayTaskError as e:  # the unit's own error, as the local engine raises it
                        cause = getattr(e, "cause", None)
                        if isinstance(cause, Exception):
                            raise cause from None
                        raise
                    prog.finish(tok, done, ok)
                    yield result
        finally:
            for ref in pending:
                try:
                    ray.cancel(ref)
                except Exception:
                    pass
            for a in actors:
                ray.kill(a, no_restart=True)
            ray.kill(sink, no_restart=True)
