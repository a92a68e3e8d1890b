"""Logging and progress: what a run says while it works, and how loud.

Modules log through the standard :mod:`logging` module, each to its own logger
(``logging.getLogger(__name__)``: the ``silverlabel`` hierarchy). Importing silverlabel, or
calling a stage function, configures nothing: a program that uses the Python API keeps
control of its logging (and sees warnings through Python's last-resort handler until it
configures any). Only the command line calls :func:`configure`, once, with the level that
``-v``/``-q``/``--log-level`` (or ``SILVERLABEL_LOG_LEVEL``) chose: messages to stderr, short.

What goes where, by convention:

* the one result a command prints (counts, where the output is) -- stdout, always;
* diagnostics -- logging: ``info`` for what a run decides (resumes, skips, the engine, a pass
  starting), ``debug`` for detail per unit, ``warning`` for what the user should look at
  (rows skipped, a fallback taken), errors as the CLI's one line;
* progress -- a bar on stderr (:class:`Progress`), only where stderr is a terminal (or
  ``SILVERLABEL_PROGRESS=1`` / ``--progress``), with a total and an ETA when the amount of work
  is known; elsewhere, with ``-v``, a log line every 30 s.

Worker processes log at the level the driver chose: the local engine hands its workers the
driver's level and forwards their records to the driver's handlers (:func:`worker_logging`,
:func:`forward_records`); Ray workers get the level and write to their stderr, which Ray
shows on the driver's console.

    >>> level_from_flags(verbose=0, quiet=False, level=None, env={})
    30
    >>> level_from_flags(verbose=2, quiet=False, level=None, env={}), level_from_flags(0, True, None, {})
    (10, 40)
    >>> level_from_flags(0, False, "info", {}), level_from_flags(0, False, None, {"SILVERLABEL_LOG_LEVEL": "debug"})
    (20, 10)
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

#: the top of the package's logger hierarchy
ROOT = "silverlabel"
#: names ``--log-level`` takes
LEVELS = ("debug", "info", "warning", "error", "critical")
#: the environment variable that sets the level when no flag does
LEVEL_ENV = "SILVERLABEL_LOG_LEVEL"
#: the environment variable that forces progress bars on stderr that is not a terminal
PROGRESS_ENV = "SILVERLABEL_PROGRESS"


def parse_level(name: str) -> int:
    """A level from its name (``warning``, any case) or number; a ValueError otherwise.

        >>> parse_level("WARNING"), parse_level("15")
        (30, 15)
    """
    text = str(name).strip()
    if text.isdigit():
        return int(text)
    if text.lower() not in LEVELS:
        raise ValueError(f"not a log level: {name!r} (use one of {', '.join(LEVELS)})")
    return logging.getLevelName(text.upper())


def level_from_flags(verbose: int, quiet: bool, level: str | None, env: Mapping[str, str] | None = None) -> int:
    """The level the command line asks for: ``--log-level`` first, then ``-q`` (errors only),
    then ``-v`` (info; ``-vv`` debug), then ``SILVERLABEL_LOG_LEVEL``, else warnings."""
    env = os.environ if env is None else env
    if level:
        return parse_level(level)
    if quiet:
        return logging.ERROR
    if verbose:
        return logging.INFO if verbose == 1 else logging.DEBUG
    if env.get(LEVEL_ENV):
        return parse_level(env[LEVEL_ENV])
    return logging.WARNING


class _Format(logging.Formatter):
    """``silverlabel: message`` (info), ``silverlabel: warning: message``; at debug level
    a time and the logger and process of each line, since workers speak too."""

    def __init__(self, detailed: bool):
        super().__init__()
        self.detailed = detailed

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text = f"{text}\n{record.exc_text}"
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        if self.detailed:
            stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
            return f"{stamp} {record.name}[{record.process}]: {level}{text}"
        return f"silverlabel: {level}{text}"


class _StderrHandler(logging.Handler):
    """To ``sys.stderr`` as it is when the record comes (a test's capture sees it), above
    any progress bar (tqdm's ``write`` redraws the bar below the line)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            tqdm = sys.modules.get("tqdm")
            if tqdm is not None and getattr(tqdm.tqdm, "_instances", None):
                tqdm.tqdm.write(text, file=sys.stderr)
            else:
                sys.stderr.write(text + "\n")
                sys.stderr.flush()
        except Exception:
            self.handleError(record)


def configure(level: int) -> logging.Logger:
    """Send the ``silverlabel`` loggers' records at ``level`` and above to stderr (the CLI's
    set-up; called again, it replaces its handler rather than adding one)."""
    logger = logging.getLogger(ROOT)
    for h in list(logger.handlers):
        if isinstance(h, _StderrHandler):
            logger.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(_Format(detailed=level < logging.INFO))
    logger.addHandler(handler)
    logger.setLevel(level)
    return logger


def current_level() -> int:
    """The level the ``silverlabel`` loggers log at in this process (what workers get)."""
    return logging.getLogger(ROOT).getEffectiveLevel()


def worker_logging(level: int, queue: Any = None) -> None:
    """Set up a worker process: its ``silverlabel`` records at ``level`` go into ``queue``
    (to the driver, :func:`forward_records`), or with no queue to its stderr. Idempotent."""
    import logging.handlers

    logger = logging.getLogger(ROOT)
    logger.setLevel(level)
    for h in list(logger.handlers):
        if getattr(h, "_silverlabel_worker", False):
            logger.removeHandler(h)
    handler: logging.Handler
    if queue is not None:
        handler = logging.handlers.QueueHandler(queue)
        logger.propagate = False  # the driver's handlers show it, once
    else:
        handler = _StderrHandler()
        handler.setFormatter(_Format(detailed=level < logging.INFO))
    handler._silverlabel_worker = True  # type: ignore[attr-defined]
    logger.addHandler(handler)


def forward_records(record: logging.LogRecord) -> None:
    """Hand a worker's record to this process's handlers for its logger (the driver side of
    :func:`worker_logging`); the worker already applied the level."""
    logging.getLogger(record.name).handle(record)


# ---------------------------------------------------------------------------------------
# progress


def progress_wanted(no_progress: bool = False, quiet: bool = False, force: bool = False) -> bool:
    """Whether to draw a bar: not with ``--no-progress`` or ``-q``; else where stderr is a
    terminal, or where asked (``--progress``, ``SILVERLABEL_PROGRESS=1``)."""
    if no_progress or quiet:
        return False
    if force or os.environ.get(PROGRESS_ENV, "") not in ("", "0"):
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def format_eta(seconds: float) -> str:
    """``1:02:03``, ``4:05``: how long is left.

        >>> format_eta(3723), format_eta(245.2), format_eta(-1)
        ('1:02:03', '4:05', '0:00')
    """
    s = max(0, int(round(seconds)))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """A stage's progress: a :data:`~silverlabel.engine.Report` (``progress(done, ok)``)
    that also takes the amount of work, when the stage knows it.

    ``set_total(n)``: the items this run will report (None: unknown, then a rate and no
    total); ``skip(n)``: items of units found done (taken off the total, so the ETA is that of
    the work left); ``phase(desc, total)``: a new pass of a stage with several (a new bar).
    The bar (tqdm, on stderr) is drawn when ``bar`` is true; otherwise, with the ``silverlabel``
    logger at info level, a line every ``every`` seconds says how far the stage is.

        >>> p = Progress(bar=False, desc="ingest")
        >>> p.set_total(10); p(4, 3); p.skip(2)
        >>> p.done, p.ok, p.total, p.describe()[:19]
        (4, 3, 8, 'ingest: 4/8 (50.0%)')
    """

    log = logging.getLogger(f"{ROOT}.progress")

    def __init__(self, bar: bool, desc: str = "", unit: str = "img", success: bool = True, every: float = 30.0):
        self.enabled = bar
        self.desc = desc
        self.unit = unit
        self.success = success  # show the share of items that succeeded
        self.every = every
        self.bar: Any = None
        self.total: int | None = None
        self.done = self.ok = 0
        self.t0 = self.last_log = time.monotonic()
        self.lock = threading.Lock()  # reports come from the engine's thread, totals from the plan's

    # -- what stages tell --------------------------------------------------------------
    def set_total(self, total: int | None) -> None:
        """The items this run will report in all (None: not known)."""
        with self.lock:
            if not self.done:  # the rate counts from here, not from the checks before
                self.t0 = self.last_log = time.monotonic()
            self.total = None if total is None else max(0, int(total))
            if self.bar is not None:
                self.bar.total = self.total
                self.bar.refresh()

    def skip(self, items: int) -> None:
        """Items of work found done (a resumed run): not part of this run's total."""
        if self.total is not None and items:
            self.set_total(self.total - items)

    def phase(self, desc: str, total: int | None = None, unit: str | None = None, success: bool = False) -> None:
        """A new pass (select's count and write passes, card's steps): the bar starts over,
        drawn at once when the pass's size is known (its first item may take a while)."""
        self.close()
        self.desc, self.unit, self.success = desc, unit or self.unit, success
        self.log.info("%s", _sized(desc, total, self.unit))
        self.done = self.ok = 0
        self.total = None if total is None else int(total)
        self.t0 = self.last_log = time.monotonic()
        if self.enabled and self.total is not None:
            self(0, 0)

    def __call__(self, done: int, ok: int) -> None:
        with self.lock:
            self._add(done, ok)

    def _add(self, done: int, ok: int) -> None:
        self.done += done
        self.ok += ok
        if self.enabled and self.bar is None:  # made on the first progress: an error prints no empty bar
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, unit=self.unit, desc=self.desc, dynamic_ncols=True, smoothing=0.1,
                            file=sys.stderr, initial=0)
        if self.bar is not None:
            self.bar.update(done)
            if self.success:
                self.bar.set_postfix_str(f"success {100 * self.ok / max(1, self.done):.1f}%", refresh=False)
        elif self.log.isEnabledFor(logging.INFO):
            now = time.monotonic()
            if now - self.last_log >= self.every:
                self.last_log = now
                self.log.info("%s", self.describe(now))


    def describe(self, now: float | None = None) -> str:
        """``ingest: 400/1000 (40.0%), 52.1 img/s, ETA 0:11`` (no total: the count and rate)."""
        elapsed = max(1e-9, (time.monotonic() if now is None else now) - self.t0)
        rate = self.done / elapsed
        if self.total:
            eta = f", ETA {format_eta((self.total - self.done) / rate)}" if rate > 0 else ""
            return (f"{self.desc}: {self.done}/{self.total} ({100 * self.done / self.total:.1f}%), "
                    f"{rate:.1f} {self.unit}/s{eta}")
        return f"{self.desc}: {self.done} {self.unit}, {rate:.1f} {self.unit}/s"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


#: what each stage's progress counts, and whether its bar shows the share of items that
#: succeeded: one table for the stage commands and ``silverlabel build``
STAGE_UNITS: dict[str, tuple[str, bool]] = {
    "ingest": ("img", True), "label": ("img", False), "select": ("row", False), "shard": ("sample", False),
    "reinforce": ("sample", False), "card": ("step", False), "eval": ("img", False),
}


def stage_progress(stage: str, bar: bool) -> Progress:
    """The :class:`Progress` of a stage, in its unit (:data:`STAGE_UNITS`).

        >>> p = stage_progress("shard", bar=False)
        >>> p.desc, p.unit, p.success
        ('shard', 'sample', False)
    """
    unit, success = STAGE_UNITS.get(stage, ("item", False))
    return Progress(bar=bar, desc=stage, unit=unit, success=success)


def _sized(desc: str, total: int | None, unit: str) -> str:
    """``select: count pass (3 parts)``."""
    return desc if total is None else f"{desc} ({total} {unit}{'' if total == 1 else 's'})"


def set_total(progress: Any, total: int | None) -> None:
    """Tell ``progress`` the amount of work when it takes it (a :class:`Progress`); a plain
    ``report`` callable is left alone."""
    f = getattr(progress, "set_total", None)
    if f is not None:
        f(total)


def skip(progress: Any, items: int) -> None:
    """Tell ``progress`` that ``items`` of its total were found done (see :class:`Progress`)."""
    f = getattr(progress, "skip", None)
    if f is not None and items:
        f(items)


def phase(progress: Any, desc: str, total: int | None = None, unit: str | None = None) -> None:
    """Start a new pass on ``progress`` when it has passes (a :class:`Progress`); logs it
    at info level either way."""
    f = getattr(progress, "phase", None)
    if f is not None:
        f(desc, total, unit)
    else:
        logging.getLogger(ROOT).info("%s", _sized(desc, total, unit or "item"))
