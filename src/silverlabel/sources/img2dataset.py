"""img2dataset's own outputs, taken as they are: its ``webdataset``, ``parquet`` and ``files``
output formats.

img2dataset (``img2dataset/writer.py``, ``downloader.py``) writes, for each shard ``{shard}``
(zero-padded digits) of its output folder:

- ``{shard}.parquet``, one row per input URL, failures included: the input's columns (``url``,
  ``caption``, its ``save_additional_columns``), then ``key``, ``status`` (``success``,
  ``failed_to_download``, ``failed_to_resize``), ``error_message``, ``width``, ``height``,
  ``original_width``, ``original_height``, optionally ``exif`` and the ``compute_hash``
  column (``sha256`` by default, of the bytes it downloaded);
- the images: ``{shard}.tar`` (``webdataset``: ``{key}.jpg`` + ``.txt`` + ``.json``), a
  ``{shard}/`` folder of the same files (``files``), or (``parquet``) a binary column named
  after the encode format (``jpg``) in ``{shard}.parquet`` itself;
- ``{shard}_stats.json``: the shard's counts and its histogram of statuses.

Each metadata row becomes one item, in the file's order. Its image is read where img2dataset
stored it and never downloaded again; its ``url`` and ``caption`` are used as they are. A row
img2dataset failed stays a row, with status ``source_{status}`` (``source_failed_to_download``)
and its ``error_message``. Every other metadata column travels into the samples table under
its own name prefixed ``source_`` (``source_key``, ``source_sha256``,
``source_original_width``, ...), beside silverlabel's own ``sha256``/``width``/``height`` of
the image it stores; ``--keep-cols`` keeps named columns under their own names as well. The
stats files go into the manifest's description of the source (:meth:`Img2DatasetSource.describe`),
never into the data. A shard whose metadata parquet is gone is read from its samples' ``.json``.

A path may be the output folder, one of its ``.parquet``/``.tar`` files, or a brace pattern
over them (``out/{00000..00009}.tar``), local or remote (``s3://bucket/out``: listed once;
tars indexed in one forward pass, embedded cells and files read by each worker with ranged
reads). :func:`is_img2dataset` recognises them by their
metadata's columns, so a plain URL table, tar or image folder is never taken for one.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from silverlabel import fs
from silverlabel.errors import UserError
from silverlabel.formats.wds import iter_tar_samples
from silverlabel.sources import (
    KIND_EMBEDDED,
    KIND_FILE,
    KIND_TAR,
    Item,
    SourceOptions,
    check_keep_cols,
    derive_uid,
    describe_location,
    expand_braces,
    has_braces,
    normalize_uid,
    pattern_files,
    register_source,
)
from silverlabel.sources.folder import IMAGE_SUFFIXES
from silverlabel.sources.tables import _to_int, embedded_group_problem, with_file
from silverlabel.sources.tars import SIDE_MAX, json_field, json_value, open_tar_index, read_json_member

#: the columns img2dataset adds to every metadata row: what tells its outputs apart
SIGNATURE = frozenset({"key", "status", "error_message", "width", "height", "original_width", "original_height"})
#: the image column of its ``parquet`` output is named after ``encode_format``
IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp")
#: metadata columns that become silverlabel's own, not ``source_`` columns
OWN_COLUMNS = ("url", "caption")
PREFIX = "source_"
_STEM_RE = re.compile(r"^\d+$")
#: the types img2dataset gives its own columns, for shards read from ``.json`` alone
_KNOWN_TYPES = {"key": pa.string(), "status": pa.string(), "error_message": pa.string(), "width": pa.int32(),
                "height": pa.int32(), "original_width": pa.int32(), "original_height": pa.int32(),
                "exif": pa.string(), "sha256": pa.string(), "md5": pa.string()}


# ---------------------------------------------------------------------------------------
# recognising the layout


def _schema(path: str) -> pa.Schema | None:
    try:
        return with_file(path, pq.read_schema)
    except Exception:  # not parquet, unreadable: not ours to judge here
        return None


def _is_metadata(path: str) -> bool:
    schema = _schema(path) if fs.isfile(path) else None
    return schema is not None and SIGNATURE <= set(schema.names)


#: bytes at the start of a remote tar read to recognise it (its first sample's ``.json``)
_HEAD_BYTES = 4 << 20


def _first_tar_json(path: str) -> dict[str, Any] | None:
    try:
        if fs.is_remote(path):  # the tar's first megabytes only, not the whole tar
            size = fs.info(path)["size"]
            f: Any = io.BytesIO(fs.read_range(path, 0, min(size, _HEAD_BYTES)))
        else:
            f = open(path, "rb")
        samples = iter_tar_samples(f)
        with f:
            for s in samples:
                meta = read_json_member(f, s)
                if meta is not None or s.image_ext() is not None:
                    return meta
    except Exception:  # a damaged tar is the tar source's to report
        return None
    return None


def _read_small(path: str, cap: int = SIDE_MAX) -> bytes:
    """A small file's bytes, local or remote (one ranged read of at most ``cap`` + 1 bytes);
    OSError when it holds more than ``cap`` bytes."""
    with fs.open_input(path, read_ahead=0) as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise OSError(f"larger than {cap >> 20} MiB")
    return data


def _read_json_file(path: str) -> dict[str, Any] | None:
    try:
        obj = json.loads(_read_small(path))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _file_names(folder: str) -> list[str]:
    """The names of the files in a shard folder, sorted (one listing)."""
    return [n for n, d in fs.listdir(folder) if not d]


def _first_folder_json(folder: str, names: list[str] | None = None) -> dict[str, Any] | None:
    """The first ``.json`` of a ``files`` shard folder (``names``: its files, when listed)."""
    try:
        names = _file_names(folder) if names is None else names
    except OSError:
        return None
    jsons = [n for n in names if n.endswith(".json") and not n.startswith(".")]
    return _read_json_file(fs.join(folder, jsons[0])) if jsons else None


def _stems(entries: list[tuple[str, bool]]) -> list[str]:
    """img2dataset's shard names among a folder's ``(name, is_folder)`` entries (``00000``
    from ``00000.parquet``, ``00000.tar``, ``00000/``), in shard order."""
    stems = set()
    for name, is_dir in entries:
        if is_dir:
            stem = name
        elif name.endswith((".parquet", ".tar")):
            stem = name.rsplit(".", 1)[0]
        else:
            continue
        if _STEM_RE.match(stem):
            stems.add(stem)
    return sorted(stems, key=lambda s: (int(s), s))


def _shard_is_img2dataset(base: str, entries: set[tuple[str, bool]] | None = None) -> bool:
    """Whether the shard at ``base`` (a path without extension) was written by img2dataset:
    its metadata parquet, else its first ``.json``, has img2dataset's columns. ``entries``:
    its folder's listing, when known (no request per file asked about)."""
    sh = _shard_at(base, entries)
    if sh.metadata:
        return _is_metadata(sh.metadata)
    if sh.tar:
        meta = _first_tar_json(sh.tar)
    elif sh.folder:
        meta = _first_folder_json(sh.folder)
    else:
        return False
    return meta is not None and SIGNATURE <= set(meta)


def is_img2dataset(path: str) -> bool:
    """Whether ``path`` is img2dataset output: its output folder, a shard's ``.parquet`` or
    ``.tar`` or a brace pattern over them, recognised by img2dataset's metadata columns.
    A ``pipe:`` input never is (its command is not run to find out)."""
    if fs.is_pipe(path):
        return False
    if fs.isdir(path):
        try:
            entries = fs.listdir(path)
        except OSError:
            return False
        stems = _stems(entries)
        return bool(stems) and _shard_is_img2dataset(fs.join(path, stems[0]), set(entries))
    if has_braces(path) and not fs.exists(path):
        try:
            path = expand_braces(path)[0]
        except UserError:
            return False
    if fs.has_glob(path):
        try:
            found = fs.glob(path)
        except (OSError, UserError):
            return False
        if not found:
            return False
        path = found[0]
    name = fs.basename(path).lower() if fs.is_remote(path) else path.lower()
    if name.endswith(".parquet"):
        return _is_metadata(path)
    if name.endswith(".tar") and fs.isfile(path):
        return _shard_is_img2dataset(path[:-4])
    return False


# ---------------------------------------------------------------------------------------
# the source


@dataclass
class _Shard:
    stem: str
    metadata: str | None = None  # {shard}.parquet
    tar: str | None = None  # webdataset
    folder: str | None = None  # files
    column: str | None = None  # parquet: the embedded image column
    stats: str | None = None
    fields: list[pa.Field] = field(default_factory=list)  # metadata columns, typed
    names: list[str] | None = None  # files: the names of the files in ``folder``, listed once

    @property
    def format(self) -> str:
        return "parquet" if self.column else ("webdataset" if self.tar else "files")


def _shard_at(base: str, entries: set[tuple[str, bool]] | None = None) -> _Shard:
    """The files of the shard at ``base``; ``entries`` (its folder's listing) spares a
    request per file on an object store."""
    stem = fs.basename(base) if fs.is_remote(base) else os.path.basename(base)
    sh = _Shard(stem)

    def there(suffix: str, folder: bool = False) -> bool:
        if entries is not None:
            return (stem + suffix, folder) in entries
        return fs.isdir(base) if folder else fs.isfile(base + suffix)

    if there(".parquet"):
        sh.metadata = base + ".parquet"
    if there(".tar"):
        sh.tar = base + ".tar"
    if there("", folder=True):
        sh.folder = base
    if there("_stats.json"):
        sh.stats = base + "_stats.json"
    return sh


def _shards(path: str) -> list[_Shard]:
    if fs.isdir(path):
        entries = fs.listdir(path)
        stems = _stems(entries)
        if not stems:
            raise UserError(f"{fs.public(path)}: no img2dataset shards here (looked for 00000.parquet, 00000.tar, "
                            "00000/)")
        return [_shard_at(fs.join(path, s), set(entries)) for s in stems]
    bases: list[str] = []
    for f in pattern_files(path):
        name = fs.basename(f) if fs.is_remote(f) else f
        if not name.lower().endswith((".parquet", ".tar")):
            raise UserError(f"{fs.public(f)}: give img2dataset's output folder, or its shards' .parquet or .tar files")
        base = f.rsplit(".", 1)[0]
        if base not in bases:
            bases.append(base)
    return [_shard_at(b) for b in bases]


def _folder_index(folder: str, names: list[str]) -> dict[str, dict[str, str]]:
    """key -> {extension: path} of a ``files`` shard folder (``names``: its files), in name order."""
    out: dict[str, dict[str, str]] = {}
    for name in names:
        if name.startswith(".") or "." not in name:
            continue
        key, ext = name.split(".", 1)
        out.setdefault(key, {})[ext.lower()] = fs.join(folder, name)
    return out


def _image_of(members: dict[str, Any]) -> str | None:
    for ext in members:
        if "." + ext in IMAGE_SUFFIXES:
            return ext
    return None


def _read_stats(shards: list[_Shard]) -> dict[str, Any] | None:
    """img2dataset's own counts, summed over its ``{shard}_stats.json`` files."""
    paths = [s.stats for s in shards if s.stats]
    if not paths:
        return None
    totals: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    for p in paths:
        try:
            obj = json.loads(_read_small(p).decode("utf-8"))  # img2dataset's are a few hundred bytes
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
            for k in ("count", "successes", "failed_to_download", "failed_to_resize"):
                totals[k] += int(obj.get(k) or 0)
            for k, v in (obj.get("status_dict") or {}).items():
                statuses[str(k)] += int(v)
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise UserError(fs.scrub_text(f"{fs.public(p)}: not an img2dataset stats file ({e})")) from None
    return {"files": len(paths), **{k: totals[k] for k in ("count", "successes", "failed_to_download",
                                                           "failed_to_resize")},
            "statuses": dict(statuses.most_common(20))}


@register_source("img2dataset", detect=is_img2dataset, first=True)
class Img2DatasetSource:
    """img2dataset's output shards become items of kind ``tar``, ``file`` or ``embedded``."""

    def __init__(self, path: str, options: SourceOptions):
        self.path = path
        self.options = options
        self.shards = _shards(path)
        columns: dict[str, pa.Field] = {}
        for sh in self.shards:
            if sh.folder:
                sh.names = _file_names(sh.folder)
            self._read_layout(sh)
            for f in sh.fields:
                if f.name not in columns or pa.types.is_null(columns[f.name].type):
                    columns[f.name] = f
        self.columns = columns
        check_keep_cols(options.keep_cols, list(columns), f"{fs.public(path)} (img2dataset metadata)")
        self.source_fields = [f.with_name(PREFIX + f.name) for f in columns.values() if f.name not in OWN_COLUMNS]
        self.extra_fields = self.source_fields + [columns[c] for c in options.keep_cols]
        self.stats = _read_stats(self.shards)
        #: every file read (what names this input in a manifest)
        self.files = [p for sh in self.shards for p in (sh.metadata, sh.tar, sh.stats) if p] + [
            fs.join(sh.folder, n) for sh in self.shards if sh.folder for n in sh.names or ()]

    def _read_layout(self, sh: _Shard) -> None:
        """The shard's metadata columns and where its images are; a clear error when it has
        no images (only img2dataset's metadata) or none of its metadata."""
        if sh.metadata:
            try:
                md = with_file(sh.metadata, pq.read_metadata)
            except Exception as e:
                raise UserError(fs.scrub_text(f"{fs.public(sh.metadata)}: not a readable parquet file "
                                              f"({str(e).splitlines()[0]})")) from None
            schema = md.schema.to_arrow_schema()
            missing = SIGNATURE - set(schema.names)
            if missing:
                raise UserError(f"{fs.public(sh.metadata)}: not img2dataset metadata "
                                f"(no {', '.join(sorted(missing))} column)")
            for name in IMAGE_COLUMNS:
                i = schema.get_field_index(name)
                if i >= 0 and (pa.types.is_binary(schema.field(i).type) or pa.types.is_large_binary(schema.field(i).type)):
                    sh.column = name
                    break
            if sh.column:
                problem = embedded_group_problem(sh.metadata, sh.column, md)
                if problem:
                    raise UserError(problem)
            sh.fields = [f for f in schema if f.name != sh.column]
            if not (sh.column or sh.tar or sh.folder):
                raise UserError(f"{fs.public(sh.metadata)}: img2dataset metadata without its images (no {sh.stem}.tar, no "
                                f"{sh.stem}/ folder, no image column); to download its URLs again, give the folder or its "
                                ".parquet files with --source-kind table")
            return
        first = _first_tar_json(sh.tar) if sh.tar else (_first_folder_json(sh.folder, sh.names) if sh.folder else None)
        if first is None:
            where = sh.tar or sh.folder or sh.stem
            raise UserError(f"{fs.public(where)}: neither img2dataset's {sh.stem}.parquet nor .json metadata "
                            "beside its images")
        sh.fields = [pa.field(k, _KNOWN_TYPES[k]) if k in _KNOWN_TYPES else json_field(k, [v])
                     for k, v in first.items()]

    def describe(self) -> dict[str, Any]:
        """Lineage for the manifest: the layout and img2dataset's own stats."""
        return {
            "kind": "img2dataset",
            **describe_location(self.path, self.files),
            "format": "+".join(sorted({sh.format for sh in self.shards})),
            "shards": len(self.shards),
            "stats": self.stats,
            "keep_cols": list(self.options.keep_cols),
        }

    def items(self) -> Iterator[Item]:
        index = 0
        for sh in self.shards:
            for item in self._shard_items(sh):
                item.index = index
                index += 1
                yield item

    def _shard_items(self, sh: _Shard) -> Iterator[Item]:
        stored: dict[str, Any] = {}
        tar_file = None
        with contextlib.ExitStack() as stack:
            if sh.tar:
                samples, tar_file = stack.enter_context(open_tar_index(sh.tar))
                for s in samples:
                    stored.setdefault(s.key, s)
            elif sh.folder and not sh.column:
                stored = _folder_index(sh.folder, sh.names or [])
            seen: set[str] = set()
            if sh.metadata:
                for row_idx, row in enumerate(self._metadata_rows(sh)):
                    key = row.get("key")
                    if key is not None:
                        seen.add(str(key))
                    yield self._item(sh, row, row_idx, stored, typed=True)
            for key, st in stored.items():  # stored but not in the metadata (or no metadata)
                if key in seen:
                    continue
                if sh.tar:
                    row = read_json_member(tar_file, st) or {}
                else:
                    row = _read_json_file(st["json"]) if "json" in st else None
                    row = row or {}
                row.setdefault("key", key)
                row.setdefault("status", "success")
                yield self._item(sh, row, -1, stored, typed=False)

    def _metadata_rows(self, sh: _Shard) -> Iterator[dict[str, Any]]:
        src = fs.readable(sh.metadata)
        try:
            pf = pq.ParquetFile(src)
            cols = [f.name for f in sh.fields]
            for batch in pf.iter_batches(batch_size=8192, columns=cols):
                yield from batch.to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise UserError(fs.scrub_text(f"{fs.public(sh.metadata)}: cannot read this table: "
                                          f"{str(e).splitlines()[0]}")) from None
        finally:
            if not isinstance(src, str):
                src.close()

    def _item(self, sh: _Shard, row: dict[str, Any], row_idx: int, stored: dict[str, Any], typed: bool) -> Item:
        key = None if row.get("key") is None else str(row["key"])
        status = row.get("status")
        url = row.get("url") if isinstance(row.get("url"), str) and row.get("url").strip() else None
        caption = row.get("caption")
        o = self.options
        item = Item(index=-1, kind=KIND_TAR if sh.tar else (KIND_EMBEDDED if sh.column else KIND_FILE),
                    source=f"{sh.stem}.parquet#{key}", url=url,
                    caption=None if caption is None else str(caption))
        uid = normalize_uid(row.get(o.uid_col))[0] if o.uid_col in row else None
        item.uid = uid or derive_uid(url or f"{sh.stem}#{key}")
        if o.id_col in row:
            item.id = _to_int(row.get(o.id_col))[0]
        where = f"{sh.stem}#{key}"
        values = {f.name: (row.get(f.name) if typed else json_value(row.get(f.name), f, where))
                  for f in self.columns.values()}
        item.extra = {PREFIX + name: values[name] for name in self.columns if name not in OWN_COLUMNS}
        item.extra.update({c: values[c] for c in o.keep_cols})
        if status != "success":
            item.status = f"source_{status or 'unknown'}"
            item.error = str(row.get("error_message") or f"img2dataset status {status!r}")
            return item
        if sh.column:
            if row_idx < 0:
                item.status, item.error = "failed_read", f"{fs.basename(sh.metadata)} has no row for key {key!r}"
            else:
                item.path, item.offset, item.column = sh.metadata, row_idx, sh.column
            return item
        st = stored.get(key) if key is not None else None
        members = (st.members if sh.tar else st) if st is not None else {}
        ext = (st.image_ext() if sh.tar else _image_of(members)) if st is not None else None
        if ext is None:
            where = sh.tar or sh.folder
            item.status = "failed_read"
            item.error = f"img2dataset recorded success, but {fs.basename(where)} has no image for key {key!r}"
            return item
        if sh.tar:
            item.source = f"{sh.stem}.tar#{key}"
            item.path = sh.tar
            item.offset, item.size = members[ext]
        else:
            item.source = f"{sh.stem}/{key}.{ext}"
            item.path = members[ext]
        return item
