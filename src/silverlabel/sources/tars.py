"""Existing WebDataset tar shards (img2dataset output, imagenet-12k-wds style).

Samples are grouped by key; the image member is read later by offset. ``.txt`` becomes
the caption, ``.cls`` the human label, and a ``.json`` member's ``url``/``uid``/``caption``/
``key`` are kept when present; ``--keep-cols`` carries other keys of the ``.json`` member
into the samples table, typed by their first value. Member names are untrusted: they are
only ever identifiers, no path is written from them.

A path may be a tar, a folder of tars, or a brace pattern ``shards-{0000..0099}.tar``,
``{train,val}-{00000,00002}.tar`` (:func:`expand_braces`). img2dataset's own output is read
by :mod:`silverlabel.sources.img2dataset`, which keeps its metadata too.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from silverlabel.errors import UserError
from silverlabel.formats.wds import TarSample, iter_tar_samples, read_member
from silverlabel.sources import (
    KIND_TAR,
    Item,
    SourceOptions,
    check_keep_cols,
    derive_uid,
    expand_braces,
    has_braces,
    normalize_uid,
    register_source,
)

_SIDE_MAX = 1 << 20  # side members (.json/.txt/.cls) above 1 MiB are ignored
#: samples of the first tar looked at for the keys and types of ``--keep-cols``
_PEEK_SAMPLES = 100

__all__ = ["TarSource", "expand_braces", "json_field", "json_value", "tar_files"]


def tar_files(path: str) -> list[str]:
    """The tars a path names: a tar, a folder's ``*.tar`` (sorted) or a brace pattern."""
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(glob.escape(path), "*.tar")))
        if not files:
            raise UserError(f"{path}: folder holds no .tar files")
        return files
    files = expand_braces(path) if has_braces(path) and not os.path.exists(path) else [path]
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{f}: no such tar file")
    return files


def read_json_member(f, s: TarSample) -> dict[str, Any] | None:
    """A sample's ``.json`` member as a dict; None when absent, too large or not an object."""
    loc = s.members.get("json")
    if loc is None or loc[1] > _SIDE_MAX:
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
        self.extra_fields: list[pa.Field] = self._keep_fields() if self.keep_cols else []

    def _keep_fields(self) -> list[pa.Field]:
        """Types of the ``--keep-cols`` keys, from the ``.json`` members of the first tar's
        first samples; a clear error for a key they do not have."""
        first = self.files[0]
        metas: list[dict[str, Any]] = []
        try:
            with open(first, "rb") as f:
                for s in iter_tar_samples(first):
                    meta = read_json_member(f, s)
                    if meta is not None:
                        metas.append(meta)
                    if len(metas) >= _PEEK_SAMPLES:
                        break
        except Exception as e:  # tarfile raises several types for damaged archives
            raise UserError(f"{first}: not a readable tar file ({type(e).__name__}: {e})") from None
        if not metas:
            raise UserError(f"{first}: --keep-cols reads keys of the samples' .json members, and its first "
                            f"{_PEEK_SAMPLES} samples have none")
        keys = list(dict.fromkeys(k for m in metas for k in m))
        check_keep_cols(self.keep_cols, keys, f"{first} (.json members)")
        return [json_field(c, [m.get(c) for m in metas]) for c in self.keep_cols]

    def describe(self) -> dict[str, Any]:
        return {"kind": "tar", "path": os.path.abspath(self.path), "files": len(self.files),
                "keep_cols": list(self.keep_cols)}

    def items(self) -> Iterator[Item]:
        index = 0
        for tar_path in self.files:
            name = os.path.basename(tar_path)
            try:
                samples = list(iter_tar_samples(tar_path))
            except Exception as e:  # tarfile raises several types for damaged archives
                raise UserError(f"{tar_path}: not a readable tar file ({type(e).__name__}: {e})") from None
            with open(tar_path, "rb") as f:
                for s in samples:
                    yield self._item(index, name, tar_path, f, s)
                    index += 1

    def _item(self, index: int, name: str, tar_path: str, f, s) -> Item:
        def side(ext: str) -> bytes | None:
            loc = s.members.get(ext)
            if loc is None or loc[1] > _SIDE_MAX:
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
