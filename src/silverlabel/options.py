"""Config fields that are also command-line flags: a default, a help text and a choice list
live in one place, the field of the stage's config dataclass.

    >>> from dataclasses import dataclass, fields
    >>> @dataclass(frozen=True)
    ... class ToyConfig:
    ...     dataset: str = opt(help="the dataset", positional=True, metavar="DATASET")
    ...     topk: int = opt(50, "labels kept per image", type=positive_int)
    >>> ToyConfig("data/pool").topk, cli_meta(fields(ToyConfig)[1])["flag"]
    (50, '--topk')

``silverlabel.cli`` turns every field that has ``cli`` metadata into an argparse option; a
flag the user does not give leaves the field to its dataclass default, so the command line
and ``run_*(Config(...))`` never disagree. Converters for the few special syntaxes (sizes
such as ``20MB``, comma lists, ``MIN,MAX`` pairs, ``0`` meaning off) are small functions here.
This module imports nothing heavy: ``silverlabel --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

META_KEY = "cli"
_MISSING = dataclasses.MISSING


def opt(default: Any = _MISSING, help: str = "", *, default_factory: Any = _MISSING, flag: str | None = None,
        short: str | None = None, metavar: str | None = None, choices: Iterable[str] | Callable[[], Iterable[str]] |
        None = None, type: Callable[[str], Any] | None = None, action: str | None = None, nargs: str | None = None,
        group: str | None = None, positional: bool = False, required: bool = False, default_help: str | None = None,
        extend: bool = False, auto_workers: str | None = None) -> Any:
    """A dataclass field with its command-line flag.

    ``flag`` defaults to ``--field-name``; ``choices`` may be a function (a registry's names,
    looked up only when the command line is parsed); ``action="store_false"`` with
    ``flag="--no-plots"`` inverts a boolean; ``extend=True`` appends the given values to the
    default instead of replacing it; ``default_help`` is how ``--help`` shows a default that
    a ``default_factory`` computes; ``action="teachers"`` makes a tuple of
    :class:`~silverlabel.teachers.TeacherSpec` from the repeatable ``--teacher`` with its
    ``--checkpoint``, ``--teacher-space`` and ``--activation``. ``auto_workers`` (``"gpu"`` or ``"cpu"``) marks the
    ``workers`` field the command line leaves at 0 with ``--engine ray`` (the whole cluster),
    and for ``"gpu"`` at 1 with ``--device cpu``.
    """
    meta = {"help": help, "flag": flag, "short": short, "metavar": metavar, "choices": choices, "type": type,
            "action": action, "nargs": nargs, "group": group, "positional": positional, "required": required,
            "default_help": default_help, "extend": extend, "auto_workers": auto_workers}
    return dataclasses.field(default=default, default_factory=default_factory, metadata={META_KEY: meta})


def cli_meta(f: dataclasses.Field) -> dict[str, Any] | None:
    """The command-line metadata of a config field (``None``: not on the command line), with
    ``flag`` filled in."""
    meta = f.metadata.get(META_KEY)
    if meta is None:
        return None
    return {**meta, "flag": meta["flag"] or "--" + f.name.replace("_", "-")}


def nested(cls: type) -> Any:
    """A sub-config field (``image: ImageConfig = nested(ImageConfig)``): its own fields are
    flags of the command."""
    return dataclasses.field(default_factory=cls, metadata={META_KEY + "_nested": True})


def is_nested(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get(META_KEY + "_nested"))


class LazyChoices:
    """Choices read from a registry when argparse first needs them (parsing or ``--help``)."""

    def __init__(self, names: Callable[[], Iterable[str]]):
        self.names = names

    def __iter__(self):
        return iter(list(self.names()))

    def __contains__(self, item: object) -> bool:
        return item in list(self.names())

    def __len__(self) -> int:
        return len(list(self.names()))


# ---------------------------------------------------------------------------------------
# converters (str -> value); a bad value is an argparse error naming the flag


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*$", re.I)


def parse_size(text: str) -> int:
    """``20MB`` -> 20971520 (binary units; plain numbers are bytes).

    >>> parse_size("20MB"), parse_size("512k"), parse_size("1000")
    (20971520, 524288, 1000)
    """
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 20MB, 512KB, 1000000)")
    unit = (m.group(2) or "b").lower()[0]
    return int(float(m.group(1)) * {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[unit])


def csv_list(text: str) -> tuple[str, ...]:
    """``"a, b,"`` -> ``("a", "b")``."""
    return tuple(s.strip() for s in text.split(",") if s.strip())


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def pair(text: str) -> tuple[float, float]:
    """``"0.08,1"`` -> ``(0.08, 1.0)``."""
    try:
        a, b = (float(x) for x in csv_list(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not MIN,MAX: {text!r}") from None
    return a, b


def int_or_off(text: str) -> int | None:
    """An integer; ``0`` means off (``None``)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    return v or None


def float_or_off(text: str) -> float | None:
    """A number; ``0`` (or less) means off (``None``)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    return v if v > 0 else None


def split_counts(text: str) -> int | dict[str, int]:
    """``16`` (every split) or ``train=1024,validation=64``.

    >>> split_counts("16"), split_counts("train=1024, validation=64")
    (16, {'train': 1024, 'validation': 64})
    """
    if "=" not in text:
        return positive_int(text)
    out: dict[str, int] = {}
    for part in csv_list(text):
        split, sep, n = part.partition("=")
        if not sep or not split.strip():
            raise argparse.ArgumentTypeError(f"not SPLIT=N: {part!r}")
        out[split.strip()] = positive_int(n.strip())
    return out


# ---------------------------------------------------------------------------------------
# fields several stages share (one help text each)


def engine_names() -> list[str]:
    from silverlabel.engine import engine_names as names

    return names()


def engine_field() -> Any:
    return opt("local", "local: a process pool on this machine; ray: Ray tasks/actors on a cluster "
               "(pip install 'silverlabel[ray]')", choices=engine_names, group="run", default_help="")


def ray_address_field() -> Any:
    return opt(None, "with --engine ray: the cluster to join (default: RAY_ADDRESS, else the cluster this "
               "machine belongs to, else a new local one; auto: an existing one or fail)",
               metavar="auto|HOST:PORT|ray://HOST:PORT", group="run")


def device_field() -> Any:
    return opt("auto", "auto (GPU if present), cpu, cuda, cuda:1")


def precision_field(help: str = "GPU autocast precision") -> Any:
    return opt("fp16", help, choices=("fp16", "bf16", "fp32"), default_help="")


def cpu_count() -> int:
    """The CPUs this process may run on: its affinity mask where the platform has one (the
    share ``taskset``, a container or a batch scheduler gave it, not the whole host's), else
    :func:`os.cpu_count`; at least 1. The default of every ``--workers``/``--threads``.

        >>> 1 <= cpu_count() <= (os.cpu_count() or 1)
        True
    """
    affinity = getattr(os, "sched_getaffinity", None)  # Linux; not macOS or Windows
    if affinity is not None:
        return max(1, len(affinity(0)))
    return max(1, os.cpu_count() or 1)


def gpu_count() -> int:
    """Visible CUDA devices, at least 1 (imports torch only when a GPU driver is present)."""
    if not (os.path.exists("/proc/driver/nvidia") or os.environ.get("CUDA_VISIBLE_DEVICES")):
        return 1
    try:
        import torch
    except ImportError:
        return 1
    return max(1, torch.cuda.device_count())
