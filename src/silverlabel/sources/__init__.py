"""Where images come from. One module per kind of source, one registry.

A source turns a user's path into an ordered stream of :class:`Item` (one per input row,
file or tar sample); :func:`load_bytes` gets an item's image bytes in a worker.

    >>> kind_of("metadata/part-0001.parquet"), kind_of("shards/00000.tar")
    ('table', 'tar')

To add a source: a module with a class implementing :class:`Source` and one
``@register_source`` line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa

from silverlabel.errors import UserError

KIND_URL = "url"
KIND_FILE = "file"
KIND_TAR = "tar"

_UID_RE = re.compile(r"^[0-9a-f]{32}$")


@dataclass(slots=True)
class Item:
    """One input element, with everything a worker needs to produce its sample row.

    ``error`` is set when the input itself is unusable (empty URL, malformed uid): the
    item still becomes a row, with status ``invalid_input``.
    """

    index: int
    kind: str
    source: str
    url: str | None = None
    uid: str | None = None
    id: int | None = None
    caption: str | None = None
    label: str | None = None
    extra: dict[str, Any] | None = None
    error: str | None = None
    path: str | None = None
    offset: int = 0
    size: int = -1


class Source(Protocol):
    """What every source provides."""

    #: Columns carried through to the samples table (``--keep-cols``), typed.
    extra_fields: list[pa.Field]

    def items(self) -> Iterator[Item]:
        """Items in input order; ``index`` is the position within this source."""
        ...

    def describe(self) -> dict[str, Any]:
        """Lineage record for the manifest: kind, path and options."""
        ...


@dataclass(frozen=True)
class SourceOptions:
    """Options that shape how sources are read (CLI: ``--url-col`` etc.)."""

    url_col: str = "url"
    caption_col: str | None = None  # None: "caption", else "text" (COYO-700M, DataComp)
    uid_col: str = "uid"
    id_col: str = "id"
    keep_cols: tuple[str, ...] = ()
    folder_labels: str = "auto"  # auto | on | off
    kind: str | None = None  # force a source kind instead of detecting it


_REGISTRY: dict[str, Callable[[str, SourceOptions], Source]] = {}
TABLE_SUFFIXES = (".parquet", ".csv", ".tsv", ".jsonl", ".ndjson", ".json")


def register_source(kind: str) -> Callable:
    """Class decorator: ``@register_source("tar")`` makes ``kind`` usable as a source."""

    def deco(cls):
        _REGISTRY[kind] = cls
        return cls

    return deco


def _strip_gz(name: str) -> str:
    return name[:-3] if name.endswith(".gz") else name


def kind_of(path: str) -> str:
    """Guess the source kind of a path: ``table``, ``tar`` or ``folder``."""
    name = _strip_gz(path.lower())
    if name.endswith(".tar") or ("{" in name and ".tar" in name):
        return "tar"
    if name.endswith(TABLE_SUFFIXES):
        return "table"
    if os.path.isdir(path):
        if selection_table_dir(path) is not None:
            return "table"
        entries = [e.name.lower() for e in os.scandir(path) if not e.name.startswith(".")]
        if entries and all(_strip_gz(e).endswith(TABLE_SUFFIXES) for e in entries if os.path.isfile(os.path.join(path, e))) and any(
            _strip_gz(e).endswith(TABLE_SUFFIXES) for e in entries
        ):
            return "table"
        if any(e.endswith(".tar") for e in entries) and not any(os.path.isdir(os.path.join(path, e)) for e in entries):
            return "tar"
        return "folder"
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    raise UserError(f"{path}: cannot tell what kind of source this is; use --source-kind table|folder|tar")


def selection_table_dir(path: str) -> str | None:
    """``SELECTION/selection`` when ``path`` is a selection directory (the output of
    ``silverlabel select``, manifest stage ``select``), else None: a selection is a URL
    table, so ``silverlabel ingest SELECTION`` downloads the selected images."""
    import json

    try:
        with open(os.path.join(path, "silverlabel.json")) as f:
            stage = json.load(f).get("stage")
    except (OSError, ValueError, AttributeError):
        return None
    table_dir = os.path.join(path, "selection")
    return table_dir if stage == "select" and os.path.isdir(table_dir) else None


def open_source(path: str, options: SourceOptions) -> Source:
    """Create the source for ``path`` (detected kind unless ``options.kind`` forces one)."""
    from silverlabel.sources import folder, tables, tars  # noqa: F401  (registration)

    kind = options.kind or kind_of(path)
    if kind == "table" and os.path.isdir(path):
        path = selection_table_dir(path) or path
    if kind not in _REGISTRY:
        raise UserError(f"unknown source kind {kind!r} (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[kind](path, options)


def normalize_uid(value: Any) -> tuple[str | None, str | None]:
    """(uid, error): a 32-hex uid lower-cased, or an error message for a malformed one."""
    if value is None:
        return None, None
    s = str(value).strip().lower()
    if not s:
        return None, None
    if not _UID_RE.match(s):
        return None, f"uid {str(value)[:60]!r} is not 32 hex digits"
    return s, None


def derive_uid(locator: str) -> str:
    """A stable 32-hex uid for items whose input has none: md5 of the URL or path."""
    import hashlib

    return hashlib.md5(locator.encode("utf-8", "surrogatepass")).hexdigest()


def load_bytes(item: Item) -> bytes:
    """Read a local item's image bytes (files and tar members). Raises OSError."""
    if item.kind == KIND_FILE:
        with open(item.path, "rb") as f:
            return f.read()
    if item.kind == KIND_TAR:
        from silverlabel.formats.wds import read_member

        with open(item.path, "rb") as f:
            return read_member(f, item.offset, item.size)
    raise UserError(f"item kind {item.kind!r} has no local bytes")


__all__ = [
    "Item",
    "Source",
    "SourceOptions",
    "derive_uid",
    "kind_of",
    "load_bytes",
    "normalize_uid",
    "open_source",
    "register_source",
    "selection_table_dir",
]
