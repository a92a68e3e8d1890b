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

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

Report = Callable[[int, int], None]
ShardFn = Callable[[Any, Any, Report], Any]


class Engine(Protocol):
    def map(self, fn: ShardFn, units: Iterable[Any], config: Any, progress: Report | None = None) -> Iterator[Any]:
        """Run ``fn(unit, config, report)`` for every unit; yield results as they complete."""
        ...


def create_engine(name: str, workers: int = 1, **options: Any) -> Engine:
    """``local`` (process pool) is built in; other engines are imported only when asked for."""
    if name == "local":
        from silverlabel.engine.local import LocalEngine

        return LocalEngine(workers=workers)
    raise ValueError(f"unknown engine {name!r} (available: local)")


def _square(x, _cfg, _report):  # for the doctest (must be importable by workers)
    return x * x
