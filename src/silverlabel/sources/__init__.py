"""Where images come from. One module per kind of source, one registry.

A source turns a user's path into an ordered stream of :class:`Item` (one per input row,
file or tar sample); :func:`load_bytes` gets an item's image bytes in a worker.

    >>> kind_of("metadata/part-0001.parquet"), kind_of("shards/00000.tar")
    ('table', 'tar')

To add a source: a module with a class implementing :class:`Source`, decorated with
``@register_source("kind", detect=fn)`` (``fn(path) -> bool`` recognises its paths; without
it the kind is used only when named by ``--source-kind``), and one line in
:data:`SOURCE_MODULES`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa

from silverlabel.errors import UserError
from silverlabel.options import csv_list, opt

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

    url_col: str = opt("url", "", group="URL table columns", default_help="")
    caption_col: str | None = opt(None, "default: caption, else text (COYO/DataComp)", group="URL table columns")
    uid_col: str = opt("uid", "", group="URL table columns", default_help="")
    id_col: str = opt("id", "", group="URL table columns", default_help="")
    keep_cols: tuple[str, ...] = opt((), "extra columns to carry through", type=csv_list, metavar="A,B",
                                     group="URL table columns")
    folder_labels: str = opt("auto", "ImageFolder class labels from sub-folder names", choices=("auto", "on", "off"),
                             group="URL table columns", default_help="default: auto")
    kind: str | None = opt(None, "do not guess the source kind", flag="--source-kind", choices=lambda: source_kinds())


_REGISTRY: dict[str, Callable[[str, SourceOptions], Source]] = {}
#: (kind, ``detect(path) -> bool``), asked in order by :func:`kind_of`; a folder no rule claims
#: is an image folder
_DETECTORS: list[tuple[str, Callable[[str], bool]]] = []
#: The modules that register the built-in sources (a new source: one more line here).
SOURCE_MODULES = ("silverlabel.sources.tars", "silverlabel.sources.tables", "silverlabel.sources.folder")
TABLE_SUFFIXES = (".parquet", ".csv", ".tsv", ".jsonl", ".ndjson", ".json")


def register_source(kind: str, detect: Callable[[str], bool] | None = None) -> Callable:
    """Class decorator: ``@register_source("tar")`` makes ``kind`` usable as a source;
    ``detect(path)`` lets :func:`kind_of` recognise its paths."""

    def deco(cls):
        _REGISTRY[kind] = cls
        if detect is not None:
            _DETECTORS.append((kind, detect))
        return cls

    return deco


def _load_sources() -> None:
    import importlib

    for module in SOURCE_MODULES:
        importlib.import_module(module)


def source_kinds() -> list[str]:
    """The registered source kinds (``--source-kind`` choices)."""
    _load_sources()
    return sorted(_REGISTRY)


def _strip_gz(name: str) -> str:
    return name[:-3] if name.endswith(".gz") else name


def _entries(path: str) -> list[str]:
    return [e.name.lower() for e in os.scandir(path) if not e.name.startswith(".")]


def _is_tar_name(path: str) -> bool:
    name = _strip_gz(path.lower())
    return name.endswith(".tar") or ("{" in name and ".tar" in name)


def _is_tar_folder(path: str) -> bool:
    if not os.path.isdir(path):
        return False
    entries = _entries(path)
    return any(e.endswith(".tar") for e in entries) and not any(os.path.isdir(os.path.join(path, e)) for e in entries)


def _is_table(path: str) -> bool:
    if _strip_gz(path.lower()).endswith(TABLE_SUFFIXES):
        return True
    if not os.path.isdir(path):
        return False
    if selection_table_dir(path) is not None:
        return True
    entries = _entries(path)
    files = [e for e in entries if os.path.isfile(os.path.join(path, e))]
    return all(_strip_gz(e).endswith(TABLE_SUFFIXES) for e in files) and any(
        _strip_gz(e).endswith(TABLE_SUFFIXES) for e in entries)


# the built-in kinds' rules, asked first: a file name says tar or table before a folder's
# contents are looked at
_DETECTORS += [("tar", _is_tar_name), ("table", _is_table), ("tar", _is_tar_folder)]


def kind_of(path: str) -> str:
    """Guess the source kind of a path: the first kind whose rule accepts it, else ``folder``
    for a folder."""
    _load_sources()
    for kind, detect in _DETECTORS:
        if detect(path):
            return kind
    if os.path.isdir(path):
        return "folder"
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    raise UserError(f"{path}: cannot tell what kind of source this is; use --source-kind "
                    f"{'|'.join(source_kinds())}")


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
    _load_sources()
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
    "source_kinds",
]
