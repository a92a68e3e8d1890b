"""Engines map a shard function over work units.

Every stage is written as ``fn(unit, config, report) -> result``: a pure, idempotent,
picklable function of one shard's work that writes its outputs atomically. An engine
decides where it runs. ``report(done, succeeded)`` is how a unit tells the driver about
progress inside the shard; engines aggregate it for the progress bar.

    >>> from silverlabel.engine import create_engine
    >>> eng = create_engine("local", workers=1)
    >>> list(eng.map(_square, [1, 2, 3], None))
    [1, 4, 9]
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from silverlabel.errors import UserError

Report = Callable[[int, int], None]
ShardFn = Callable[[Any, Any, Report], Any]


class Engine(Protocol):
    #: Where the units compute, for the summary ("cpu", "cuda", "ray (auto)").
    device: str

    def describe_device(self, device: str) -> str:
        """``--device`` as this engine's workers will resolve it (for the summary)."""
        ...

    def map(self, fn: ShardFn, units: Iterable[Any], config: Any, progress: Report | None = None) -> Iterator[Any]:
        """Run ``fn(unit, config, report)`` for every unit; yield results as they complete."""
        ...


#: Options that only the Ray engine reads; the local engine ignores them.
RAY_OPTIONS = ("address", "actor", "gpus_per_worker", "cpus_per_worker", "max_retries", "runtime_env")


def create_engine(name: str, workers: int = 1, **options: Any) -> Engine:
    """``local`` (process pool) is built in; other engines are imported only when asked for.

    ``ray`` (:mod:`silverlabel.engine.ray_engine`) takes ``address`` (None, ``auto`` or
    ``ray://host:port``), ``actor=True`` for GPU stages (a pool of actors that keep the
    model loaded), ``gpus_per_worker``, ``cpus_per_worker``, ``max_retries``, ``runtime_env``.
    The local engine never imports Ray.
    """
    unknown = set(options) - set(RAY_OPTIONS)
    if unknown:
        raise TypeError(f"unknown engine option(s): {', '.join(sorted(unknown))}")
    if name not in ENGINES:
        raise UserError(f"unknown engine {name!r} (available: {', '.join(ENGINES)})")
    return ENGINES[name](workers, **options)


def _local(workers: int, **_options: Any) -> Engine:
    from silverlabel.engine.local import LocalEngine

    return LocalEngine(workers=workers)


def _ray(workers: int, **options: Any) -> Engine:
    try:
        import ray  # noqa: F401
    except ImportError as e:
        raise UserError(f"--engine ray needs Ray: pip install 'silverlabel[ray]' ({e})") from None
    from silverlabel.engine.ray_engine import RayEngine

    return RayEngine(workers=workers, **options)


#: name -> ``factory(workers, **options)``; a new engine is one module plus one entry here.
ENGINES: dict[str, Callable[..., Engine]] = {"local": _local, "ray": _ray}


def engine_names() -> list[str]:
    """The engines ``--engine`` accepts."""
    return list(ENGINES)


def stage_engine(name: str, workers: int, *, address: str | None = None, needs_gpu: bool = False,
                 device: str = "auto") -> Engine:
    """The engine for a stage that says what it needs rather than which engine runs it.

    ``needs_gpu``: the units run a model on ``device`` (``auto``: a GPU where there is one),
    so each worker keeps the model loaded between units and gets a GPU of its own -- pool
    processes spread over the local GPUs; on Ray, a pool of actors with a GPU each (none
    with ``device="cpu"``). Otherwise the units are CPU work, one per worker.

        >>> stage_engine("local", 1).device
        'cpu'
    """
    if not needs_gpu:
        return create_engine(name, workers, address=address)
    gpus = None if device == "auto" else 0 if device == "cpu" else 1  # None: one each where there are GPUs
    engine = create_engine(name, workers, address=address, actor=True, gpus_per_worker=gpus)
    engine.device = engine.describe_device(device)
    return engine


def unit_name(unit: Any) -> str:
    """A unit as log lines name it: its commit record's name (the output shard), else its type.

        >>> unit_name(3)
        'int'
    """
    commit = getattr(unit, "commit", None)
    path = getattr(commit, "path", None)
    if isinstance(path, str):
        return os.path.splitext(os.path.basename(path))[0]
    return type(unit).__name__


def _square(x, _cfg, _report):  # for the doctest (must be importable by workers)
    return x * x
