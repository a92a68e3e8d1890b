"""Where images come from. One module per kind of source, one registry.

A source turns a user's path into an ordered stream of :class:`Item` (one per input row,
file or tar sample); :func:`load_bytes` gets an item's image bytes in a worker.

    >>> kind_of("metadata/part-0001.parquet"), kind_of("shards/00000.tar")
    ('table', 'tar')

Wherever a path is accepted, a brace pattern names several files, expanded as webdataset
and the shell do it (:func:`expand_braces`, the ``braceexpand`` package). A path may be a URL
of any fsspec filesystem (``s3://``, ``gs://``, ``hf://``, ``http(s)://``) or a ``pipe:``
command (:mod:`silverlabel.fs`): listed, detected and read where it lies, a remote glob
(``s3://b/meta/*.parquet``) included; workers read image bytes with ranged reads of their own.

To add a source: a module with a class implementing :class:`Source`, decorated with
``@register_source("kind", detect=fn)`` (``fn(path) -> bool`` recognises its paths; without
it the kind is used only when named by ``--source-kind``), and one line in
:data:`SOURCE_MODULES`.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa

from silverlabel import fs
from silverlabel.errors import UserError
from silverlabel.registry import Registry
from silverlabel.options import csv_list, opt

KIND_URL = "url"
KIND_FILE = "file"
KIND_TAR = "tar"
#: image bytes embedded in a parquet column (img2dataset's ``parquet`` output): ``path``,
#: row ``offset`` within the file, ``column``
KIND_EMBEDDED = "embedded"

_UID_RE = re.compile(r"^[0-9a-f]{32}$")


@dataclass(slots=True)
class Item:
    """One input element, with everything a worker needs to produce its sample row.

    ``error`` is set when the input itself is unusable (empty URL, malformed uid): the
    item still becomes a row, with status ``status`` (default ``invalid_input``; a source
    that records its own failures says so, e.g. ``source_failed_to_download``).
    ``extra`` holds the carried-through columns the source declares in ``extra_fields``.
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
    status: str | None = None
    column: str | None = None


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


#: The modules that register the built-in sources (a new source: one more line here).
SOURCE_MODULES = ("silverlabel.sources.tars", "silverlabel.sources.tables", "silverlabel.sources.folder",
                  "silverlabel.sources.img2dataset")
#: kind -> ``cls(path, options) -> Source``
_REGISTRY = Registry("source kind", SOURCE_MODULES)
#: (kind, ``detect(path) -> bool``), asked in order by :func:`kind_of`; a folder no rule claims
#: is an image folder
_DETECTORS: list[tuple[str, Callable[[str], bool]]] = []
TABLE_SUFFIXES = (".parquet", ".csv", ".tsv", ".jsonl", ".ndjson", ".json")


#: at most this many paths from one brace pattern (``{0..999999999}`` is a typo, not a dataset)
MAX_BRACE_PATHS = 1_000_000
_RANGE_RE = re.compile(r"\{(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?\}")


def register_source(kind: str, detect: Callable[[str], bool] | None = None, first: bool = False) -> Callable:
    """Class decorator: ``@register_source("tar")`` makes ``kind`` usable as a source;
    ``detect(path)`` lets :func:`kind_of` recognise its paths, asked after the built-in
    rules, or before them with ``first=True`` (a layout that would otherwise pass for a
    plain table, tar or folder)."""

    if detect is not None:
        if first:
            _DETECTORS.insert(0, (kind, detect))
        else:
            _DETECTORS.append((kind, detect))
    return _REGISTRY.register(kind)


def has_braces(path: str) -> bool:
    """Whether ``path`` is a brace pattern (holds ``{`` ... ``}``)."""
    return "{" in path and "}" in path[path.index("{"):]


def expand_braces(pattern: str) -> list[str]:
    """The paths a brace pattern names, in order, as webdataset and bash expand them
    (``braceexpand``): ranges keep their zero padding, lists and nesting work, ``\\{``
    is a literal brace.

    >>> expand_braces("s-{8..10}.tar")
    ['s-8.tar', 's-9.tar', 's-10.tar']
    >>> expand_braces("{train,val}-{00000..00001}.tar")
    ['train-00000.tar', 'train-00001.tar', 'val-00000.tar', 'val-00001.tar']
    >>> expand_braces("plain.tar")
    ['plain.tar']
    """
    import itertools

    from braceexpand import braceexpand

    # braceexpand lists a range before it yields: refuse a huge one before it is built
    for m in _RANGE_RE.finditer(pattern):
        lo, hi, step = int(m.group(1)), int(m.group(2)), abs(int(m.group(3) or 1)) or 1
        if abs(hi - lo) // step + 1 > MAX_BRACE_PATHS:
            raise UserError(f"{pattern}: {m.group(0)} names more than {MAX_BRACE_PATHS:,} paths; check the range")
    try:
        paths = list(itertools.islice(braceexpand(pattern), MAX_BRACE_PATHS + 1))
    except ValueError as e:  # UnbalancedBracesError
        raise UserError(f"{pattern}: not a valid brace pattern ({e})") from None
    if len(paths) > MAX_BRACE_PATHS:
        raise UserError(f"{pattern}: names more than {MAX_BRACE_PATHS:,} paths; check the ranges")
    return paths


def check_keep_cols(keep_cols: tuple[str, ...] | list[str], available: list[str], where: str) -> None:
    """The clear errors of ``--keep-cols``: a name the source does not have (``where`` says
    what was looked in), or one that would overwrite a samples-table column."""
    from silverlabel.formats.tables import SAMPLES_SCHEMA

    missing = [c for c in keep_cols if c not in available]
    if missing:
        shown = ", ".join(available[:40]) + (" ..." if len(available) > 40 else "")
        raise UserError(f"{where}: --keep-cols names missing columns: {', '.join(missing)} "
                        f"(has: {shown or 'none'})")
    clash = [c for c in keep_cols if c in SAMPLES_SCHEMA.names]
    if clash:
        raise UserError(f"--keep-cols: {', '.join(clash)} would overwrite a samples-table column")


def describe_location(path: str, files: list[str]) -> dict[str, Any]:
    """Where a source reads from, for its ``describe()``: a local path as its absolute path
    (the manifest names it by its bytes); a URL as its ``name``, the URL given made public
    (:func:`silverlabel.fs.public`: no credentials, no signatures), and its ``content``, a
    digest of its files' sizes and ETags (:func:`silverlabel.fs.content_digest`), so a
    changed remote input is told from the one a run began with."""
    if not fs.is_remote(path):
        return {"path": os.path.abspath(path)}
    name = fs.public(path)
    return {"path": name, "name": name, "content": fs.content_digest(files)}


def source_kinds() -> list[str]:
    """The registered source kinds (``--source-kind`` choices)."""
    return sorted(_REGISTRY.names())


def _strip_gz(name: str) -> str:
    return name[:-3] if name.endswith(".gz") else name


def _entries(path: str) -> list[tuple[str, bool]]:
    """(lower-cased name, is_folder) of a folder's visible entries, local or remote."""
    return [(n.lower(), d) for n, d in fs.listdir(path) if not n.startswith(".")]


def _is_tar_name(path: str) -> bool:
    name = _strip_gz((fs.basename(path) if fs.is_remote(path) else path).lower())
    return name.endswith(".tar") or ("{" in name and ".tar" in name)


def _is_tar_folder(path: str) -> bool:
    if not fs.isdir(path):
        return False
    entries = _entries(path)
    return any(n.endswith(".tar") for n, _ in entries) and not any(d for _, d in entries)


def _is_table(path: str) -> bool:
    if _strip_gz(fs.basename(path).lower() if fs.is_remote(path) else path.lower()).endswith(TABLE_SUFFIXES):
        return True
    if not fs.isdir(path):
        return False
    if selection_table_dir(path) is not None:
        return True
    entries = _entries(path)
    files = [n for n, d in entries if not d]
    return all(_strip_gz(n).endswith(TABLE_SUFFIXES) for n in files) and any(
        _strip_gz(n).endswith(TABLE_SUFFIXES) for n, _ in entries)


def pattern_files(path: str, what: str = "file") -> list[str]:
    """The files a path names: itself, the paths of a brace pattern (unless a file has that
    very name) or, for a remote path, the files a glob (``*``, ``?``, ``[``) matches; each
    must exist (FileNotFoundError naming ``what`` otherwise)."""
    expand = has_braces(path) and (fs.is_pipe(path) or not fs.exists(path))  # pipe: as webdataset expands it
    files = expand_braces(path) if expand else [path]
    fs.prefetch(files)  # s3://b/{00000..09999}.tar: one listing, not ten thousand requests
    out: list[str] = []
    for f in files:
        if fs.has_glob(f):
            found = fs.glob(f)
            if not found:
                raise FileNotFoundError(f"{fs.public(f)}: matches no {what}")
            out.extend(found)
            continue
        if not fs.isfile(f):
            raise FileNotFoundError(f"{fs.public(f)}: no such {what}")
        out.append(f)
    return out


# the built-in kinds' rules, asked first: a file name says tar or table before a folder's
# contents are looked at
_DETECTORS += [("tar", _is_tar_name), ("table", _is_table), ("tar", _is_tar_folder)]


def kind_of(path: str) -> str:
    """Guess the source kind of a path: the first kind whose rule accepts it, else ``folder``
    for a folder."""
    _REGISTRY.load()
    for kind, detect in _DETECTORS:
        if detect(path):
            return kind
    if fs.isdir(path):
        return "folder"
    if not fs.exists(path):
        raise FileNotFoundError(f"{fs.public(path)}: no such file or folder")
    raise UserError(f"{fs.public(path)}: cannot tell what kind of source this is; use --source-kind "
                    f"{'|'.join(source_kinds())}")


def selection_table_dir(path: str) -> str | None:
    """``SELECTION/selection`` when ``path`` is a selection directory (the output of
    ``silverlabel select``, manifest stage ``select``), else None: a selection is a URL
    table, so ``silverlabel ingest SELECTION`` downloads the selected images."""
    import json

    try:
        with fs.open_input(fs.join(path, "silverlabel.json")) as f:
            stage = json.load(f).get("stage")
    except (OSError, ValueError, AttributeError):
        return None
    table_dir = fs.join(path, "selection")
    return table_dir if stage == "select" and fs.isdir(table_dir) else None


def open_source(path: str, options: SourceOptions) -> Source:
    """Create the source for ``path`` (detected kind unless ``options.kind`` forces one)."""
    path = fs.local_path(path)
    if fs.is_remote(path) and not fs.is_pipe(path):
        fs.forget(path)  # listings of an earlier run in this process are not trusted
        path = path.rstrip("/") if fs.scheme(path) not in ("http", "https") else path
    kind = options.kind or kind_of(path)
    if kind == "table" and fs.isdir(path):
        path = selection_table_dir(path) or path
    return _REGISTRY.lookup(kind)(path, options)


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


def load_bytes(item: Item, max_bytes: int | None = None) -> bytes:
    """Read an item's image bytes: a regular file, a tar member or a parquet cell, at most
    ``max_bytes``, where it lies: a local file, or one ranged read of a remote one
    (:func:`silverlabel.fs.read_range`), so a worker fetches only its own item's bytes.

    Raises OSError for anything else (a FIFO, a device, a link to one), for a file or member
    larger than ``max_bytes`` (checked before reading, so a tar header claiming 8 GiB costs
    nothing), for a member that runs past the end of its tar, and for a remote read that
    fails (the URL in its message made public).
    """
    if item.kind in (KIND_FILE, KIND_TAR) and item.path is not None and fs.is_remote(item.path):
        if item.kind == KIND_FILE:
            return fs.read_capped(item.path, max_bytes)
        _check_size(item.size, max_bytes, "tar member")
        try:
            return fs.read_range(item.path, item.offset, item.size)
        except OSError as e:
            raise OSError(f"tar member: {e}") from None
    if item.kind == KIND_FILE:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it
        fd = os.open(item.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(f"not a regular file ({_file_type(st.st_mode)})")
            _check_size(st.st_size, max_bytes, "file")
            data = f.read(st.st_size + 1)
            _check_size(len(data), max_bytes, "file")  # grew while we looked
            return data
    if item.kind == KIND_EMBEDDED:
        from silverlabel.sources.tables import read_cell

        return read_cell(item.path, item.offset, item.column, max_bytes)
    if item.kind == KIND_TAR:
        from silverlabel.formats.wds import read_member

        _check_size(item.size, max_bytes, "tar member")
        with open(item.path, "rb") as f:
            end = os.fstat(f.fileno()).st_size
            if item.offset + item.size > end:
                raise OSError(f"tar member truncated: {item.size} bytes at {item.offset}, the tar ends at {end}")
            return read_member(f, item.offset, item.size)
    raise UserError(f"item kind {item.kind!r} has no local bytes")


def _check_size(size: int, max_bytes: int | None, what: str) -> None:
    if max_bytes is not None and size > max_bytes:
        raise OSError(f"{what} of {size} bytes exceeds the byte cap of {max_bytes} (--max-bytes)")


def _file_type(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a plain file"


__all__ = [
    "Item",
    "Source",
    "SourceOptions",
    "check_keep_cols",
    "derive_uid",
    "describe_location",
    "expand_braces",
    "has_braces",
    "kind_of",
    "load_bytes",
    "normalize_uid",
    "open_source",
    "pattern_files",
    "register_source",
    "selection_table_dir",
    "source_kinds",
]
