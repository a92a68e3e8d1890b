"""Existing WebDataset tar shards (img2dataset output, imagenet-12k-wds style).

Samples are grouped by key; the image member is read later by offset. ``.txt`` becomes
the caption, ``.cls`` the human label, and a ``.json`` member's ``url``/``uid``/``caption``/
``key`` are kept when present; ``--keep-cols`` carries other keys of the ``.json`` member
into the samples table, typed by their first value. Member names are untrusted: they are
only ever identifiers, no path is written from them.

A path may be a tar, a folder of tars, or a brace pattern ``shards-{0000..0099}.tar``,
``{train,val}-{00000,00002}.tar`` (:func:`expand_braces`), local or remote
(``s3://b/shards/{00000..00009}.tar``, ``https://host/shard-0000.tar``, ``pipe:CMD``). A
remote tar is indexed in one forward pass by the driver (:func:`open_tar_index`: headers
and the small side members it needs, the stream read ahead in large blocks), and each
worker then reads its samples' image members with ranged reads of its own. img2dataset's
own output is read by :mod:`silverlabel.sources.img2dataset`, which keeps its metadata too.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from collections.abc import Iterator
from typing import Any, BinaryIO

import pyarrow as pa

from silverlabel import fs
from silverlabel.errors import UserError
from silverlabel.formats.wds import TarSample, iter_tar_samples, read_member, split_member_name
from silverlabel.sources import (
    KIND_TAR,
    Item,
    SourceOptions,
    check_keep_cols,
    derive_uid,
    describe_location,
    expand_braces,
    normalize_uid,
    pattern_files,
    register_source,
)

#: side members (a tar's .json/.txt/.cls, a ``files`` shard's .json) above 1 MiB are ignored
SIDE_MAX = 1 << 20
#: samples of the first tar looked at for the keys and types of ``--keep-cols``
_PEEK_SAMPLES = 100

__all__ = ["SIDE_MAX", "TarIndex", "TarSource", "expand_braces", "json_field", "json_value", "open_tar_index",
           "tar_files", "tar_index"]
#: side members a remote tar's index pass keeps, so they are not fetched a second time
_SIDE_EXTS = frozenset({"json", "txt", "cls"})
#: at most this many bytes of them per tar (past it, a side member is read again when needed)
_KEPT_MAX = 256 << 20


def tar_files(path: str) -> list[str]:
    """The tars a path names: a tar, a folder's (or a prefix's) ``*.tar`` (sorted), a brace
    pattern, or a remote glob."""
    if fs.isdir(path):
        files = [fs.join(path, n) for n, d in fs.listdir(path) if not d and n.endswith(".tar")
                 and not n.startswith(".")]
        if not files:
            raise UserError(f"{fs.public(path)}: folder holds no .tar files")
        return files
    return pattern_files(path, "tar file")


class _IndexingReader:
    """A remote tar for one forward indexing pass: while :func:`iter_tar_samples` reads a
    header and seeks past the member's data, the data of a small side member (``.json``,
    ``.txt``, ``.cls``) is kept (it is in the read-ahead block already), so reading it
    afterwards costs no request. Image members are skipped, never kept; at most
    :data:`_KEPT_MAX` bytes are kept (a hostile tar of huge side members costs reads, not
    memory)."""

    def __init__(self, f: BinaryIO, kept: dict[int, bytes] | None = None):
        self._f = f
        self._pos = 0
        self._side: tuple[int, int] | None = None
        self.indexing = kept is None
        self.kept: dict[int, bytes] = {} if kept is None else kept
        self.kept_bytes = sum(len(v) for v in self.kept.values())

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == 1:
            pos += self._pos
        elif whence == 2:
            pos = self._f.seek(0, 2) + pos
        if self._side is not None:
            start, size = self._side
            self._side = None
            if pos >= start + size and self.kept_bytes + size <= _KEPT_MAX:
                self._f.seek(start)
                data = self._f.read(size)
                if len(data) == size:
                    self.kept[start] = data
                    self.kept_bytes += size
        self._pos = pos
        return pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._f.close()

    def read(self, n: int = -1) -> bytes:
        kept = self.kept.get(self._pos)
        if kept is not None and n == len(kept):
            self._pos += n
            return kept
        self._f.seek(self._pos)
        data = self._f.read(n)
        if self.indexing and n == 512 and len(data) == 512 and data[156:157] in (b"0", b"\0"):
            parts = split_member_name(data[:100].split(b"\0", 1)[0].decode("utf-8", "replace"))
            try:
                size = int(data[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            except ValueError:
                size = -1
            if parts is not None and parts[1] in _SIDE_EXTS and 0 <= size <= SIDE_MAX:
                self._side = (self._pos + 512, size)
        self._pos += len(data)
        return data


@dataclass
class TarIndex:
    """A tar's samples (:func:`iter_tar_samples`) and the side members its remote index
    pass kept, by offset (:class:`_IndexingReader`; empty for a local tar): what
    :func:`open_tar_index` yields, and takes back to open the same tar without a second pass."""

    samples: list[TarSample]
    kept: dict[int, bytes] = field(default_factory=dict)


@contextlib.contextmanager
def open_tar_index(path: str, index: TarIndex | None = None) -> Iterator[tuple[list[TarSample], BinaryIO]]:
    """``(samples, file)`` of a tar: its samples with member offsets
    (:func:`iter_tar_samples`) and an open file to read members from. A remote tar is read
    once, forward, in large blocks, and its side members come from that pass
    (:class:`_IndexingReader`); a ``pipe:`` from its local copy. ``index`` (from
    :func:`tar_index` of the same tar) is used instead of indexing it again. A damaged tar
    is a UserError naming it."""
    if fs.is_pipe(path):
        path = fs.pipe_copy(path)
    try:
        if not fs.is_remote(path):
            samples = index.samples if index is not None else list(iter_tar_samples(path))
            f: Any = open(path, "rb")
        else:
            raw = fs.open_input(path)
            f = _IndexingReader(raw, kept=index.kept if index is not None else None)
            try:
                samples = index.samples if index is not None else list(iter_tar_samples(f))
            except BaseException:
                raw.close()
                raise
            f.indexing = False
    except Exception as e:  # tarfile raises several types for damaged archives
        why = f"{type(e).__name__}: {e}"
        raise UserError(fs.scrub_text(f"{fs.public(path)}: not a readable tar file ({why})")) from None
    try:
        yield samples, f
    finally:
        f.close()


def tar_index(samples: list[TarSample], f: BinaryIO) -> TarIndex:
    """What :func:`open_tar_index` yielded, kept for opening the same tar again with no
    second index pass."""
    return TarIndex(samples, f.kept if isinstance(f, _IndexingReader) else {})


def read_json_member(f, s: TarSample) -> dict[str, Any] | None:
    """A sample's ``.json`` member as a dict; None when absent, too large or not an object."""
    loc = s.members.get("json")
    if loc is None or loc[1] > SIDE_MAX:
        return None
    try:
        obj = json.loads(read_member(f, *loc))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def json_field(name: str, values: list[Any]) -> pa.Field:
    """The column type of a JSON key, from its first non-null value: bool, int64, float64,
    string; lists and objects are kept as JSON text.

    >>> json_field("n", [None, 3, 4.5]).type, json_field("tags", [["a"]]).type
    (DataType(int64), DataType(string))
    """
    for v in values:
        if v is None:
            continue
        if isinstance(v, bool):
            return pa.field(name, pa.bool_())
        if isinstance(v, int):
            return pa.field(name, pa.int64())
        if isinstance(v, float):
            return pa.field(name, pa.float64())
        return pa.field(name, pa.string())
    return pa.field(name, pa.string())


def json_value(value: Any, field: pa.Field, where: str) -> Any:
    """``value`` (from JSON) as a value of ``field``'s type; a UserError naming ``where``
    when it cannot be one (a text where the first samples had numbers)."""
    if value is None:
        return None
    t = field.type
    if pa.types.is_nested(t):  # a list or struct column (from a parquet schema): arrow converts it
        return value
    if pa.types.is_string(t):
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)
    if pa.types.is_boolean(t) and isinstance(value, bool):
        return value
    if not isinstance(value, bool):
        if pa.types.is_integer(t) and (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            return int(value)
        if pa.types.is_floating(t) and isinstance(value, (int, float)):
            return float(value)
    raise UserError(f"{where}: {field.name!r} is {str(value)[:60]!r}, not {t} as in the first samples; "
                    "leave it out of --keep-cols or make its values one type")


@register_source("tar")
class TarSource:
    """Samples of WebDataset tars become items of kind ``tar``."""

    def __init__(self, path: str, options: SourceOptions):
        self.path = path
        self.files = tar_files(path)
        self.keep_cols = tuple(options.keep_cols)
        #: the first tar's index when ``--keep-cols`` made us read it: :meth:`items` uses it once
        self._first_index: TarIndex | None = None
        self.extra_fields: list[pa.Field] = self._keep_fields() if self.keep_cols else []

    def _keep_fields(self) -> list[pa.Field]:
        """Types of the ``--keep-cols`` keys, from the ``.json`` members of the first tar's
        first samples; a clear error for a key they do not have. The tar's index is kept for
        :meth:`items` (a remote tar is read once, not twice)."""
        first = self.files[0]
        metas: list[dict[str, Any]] = []
        with open_tar_index(first) as (samples, f):
            for s in samples:
                meta = read_json_member(f, s)
                if meta is not None:
                    metas.append(meta)
                if len(metas) >= _PEEK_SAMPLES:
                    break
            self._first_index = tar_index(samples, f)
        first = fs.public(first)
        if not metas:
            raise UserError(f"{first}: --keep-cols reads keys of the samples' .json members, and its first "
                            f"{_PEEK_SAMPLES} samples have none")
        keys = list(dict.fromkeys(k for m in metas for k in m))
        check_keep_cols(self.keep_cols, keys, f"{first} (.json members)")
        return [json_field(c, [m.get(c) for m in metas]) for c in self.keep_cols]

    def describe(self) -> dict[str, Any]:
        return {"kind": "tar", **describe_location(self.path, self.files), "files": len(self.files),
                "keep_cols": list(self.keep_cols)}

    def items(self) -> Iterator[Item]:
        index = 0
        for i, tar_path in enumerate(self.files):
            name = fs.basename(tar_path)
            where = fs.pipe_copy(tar_path) if fs.is_pipe(tar_path) else tar_path
            known, self._first_index = (self._first_index if i == 0 else None), None
            with open_tar_index(where, known) as (samples, f):
                for s in samples:
                    yield self._item(index, name, where, f, s)
                    index += 1

    def _item(self, index: int, name: str, tar_path: str, f, s) -> Item:
        def side(ext: str) -> bytes | None:
            loc = s.members.get(ext)
            if loc is None or loc[1] > SIDE_MAX:
                return None
            return read_member(f, *loc)

        locator = f"{name}#{s.key}"
        meta = read_json_member(f, s) or {}
        txt = side("txt")
        cls = side("cls")
        caption = txt.decode("utf-8", "replace") if txt is not None else meta.get("caption")
        label = cls.decode("utf-8", "replace").strip() if cls is not None else None
        uid, _ = normalize_uid(meta.get("uid"))
        url = meta.get("url") if isinstance(meta.get("url"), str) else None
        image_ext = s.image_ext()
        item = Item(
            index=index,
            kind=KIND_TAR,
            source=locator,
            url=url,
            uid=uid or derive_uid(locator),
            caption=None if caption is None else str(caption),
            label=label,
            path=tar_path,
        )
        if self.extra_fields:
            item.extra = {fl.name: json_value(meta.get(fl.name), fl, locator) for fl in self.extra_fields}
        if image_ext is None:
            item.error = f"sample {s.key!r} has no image member (has: {', '.join(sorted(s.members))})"
        else:
            item.offset, item.size = s.members[image_ext]
        return item
