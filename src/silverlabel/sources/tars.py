"""Existing WebDataset tar shards (img2dataset output, imagenet-12k-wds style).

Samples are grouped by key; the image member is read later by offset. ``.txt`` becomes
the caption, ``.cls`` the human label, and a ``.json`` member's ``url``/``uid``/``caption``/
``key`` are kept when present. Member names are untrusted: they are only ever
identifiers, no path is written from them.

A path may be a tar, a folder of tars, or a brace pattern ``shards-{0000..0099}.tar``.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator
from typing import Any

from silverlabel.errors import UserError
from silverlabel.formats.wds import iter_tar_samples, read_member
from silverlabel.sources import KIND_TAR, Item, SourceOptions, derive_uid, normalize_uid, register_source

_BRACE_RE = re.compile(r"\{(?:(\d+)\.\.(\d+)|([^{}]*,[^{}]*))\}")  # {00..99} or {a,b,c}
_SIDE_MAX = 1 << 20  # side members (.json/.txt/.cls) above 1 MiB are ignored


def expand_braces(pattern: str) -> list[str]:
    """``a-{00..02}.tar`` -> ``['a-00.tar', 'a-01.tar', 'a-02.tar']`` (zero padding kept);
    lists as webdataset and the shell have them, ``a-{00000,00002}.tar``, nested or mixed.

    >>> expand_braces("s-{8..10}.tar")
    ['s-8.tar', 's-9.tar', 's-10.tar']
    >>> expand_braces("{train,val}-{00000,00002}.tar")
    ['train-00000.tar', 'train-00002.tar', 'val-00000.tar', 'val-00002.tar']
    """
    m = _BRACE_RE.search(pattern)
    if not m:
        return [pattern]
    if m.group(3) is not None:
        parts = m.group(3).split(",")
    else:
        lo, hi = m.group(1), m.group(2)
        width = len(lo) if lo.startswith("0") else 0
        parts = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    out = []
    for part in parts:
        out.extend(expand_braces(pattern[: m.start()] + part + pattern[m.end() :]))
    return out


def _tar_files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(glob.escape(path), "*.tar")))
        if not files:
            raise UserError(f"{path}: folder holds no .tar files")
        return files
    files = expand_braces(path)
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{f}: no such tar file")
    return files


@register_source("tar")
class TarSource:
    """Samples of WebDataset tars become items of kind ``tar``."""

    extra_fields: list = []

    def __init__(self, path: str, options: SourceOptions):
        self.path = path
        self.files = _tar_files(path)

    def describe(self) -> dict[str, Any]:
        return {"kind": "tar", "path": os.path.abspath(self.path), "files": len(self.files)}

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

    @staticmethod
    def _item(index: int, name: str, tar_path: str, f, s) -> Item:
        def side(ext: str) -> bytes | None:
            loc = s.members.get(ext)
            if loc is None or loc[1] > _SIDE_MAX:
                return None
            return read_member(f, *loc)

        locator = f"{name}#{s.key}"
        meta: dict[str, Any] = {}
        raw_json = side("json")
        if raw_json:
            try:
                obj = json.loads(raw_json)
                meta = obj if isinstance(obj, dict) else {}
            except (json.JSONDecodeError, UnicodeDecodeError):
                meta = {}
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
        if image_ext is None:
            item.error = f"sample {s.key!r} has no image member (has: {', '.join(sorted(s.members))})"
        else:
            item.offset, item.size = s.members[image_ext]
        return item
