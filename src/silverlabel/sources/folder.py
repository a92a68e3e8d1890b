"""Image folders: ImageFolder layout (a sub-folder per class) or a flat/recursive folder.

With ``folder_labels="auto"`` a folder whose top level holds only sub-folders is read as
ImageFolder and each image keeps its class folder's name as its human ``label``.
Files are listed in sorted order, so keys are the same on every machine. A folder may be a
remote prefix (``s3://bucket/images``): listed once, and each worker reads its own files.

    >>> import tempfile, os
    >>> d = tempfile.mkdtemp(); os.makedirs(f"{d}/cat"); open(f"{d}/cat/a.jpg", "wb").close()
    >>> [(i.source, i.label) for i in FolderSource(d, SourceOptions()).items()]
    [('cat/a.jpg', 'cat')]
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from silverlabel import fs
from silverlabel.errors import UserError
from silverlabel.sources import KIND_FILE, Item, SourceOptions, derive_uid, describe_location, register_source

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def _walk(root: str) -> Iterator[str]:
    """Relative paths of image files under ``root``, sorted, hidden entries skipped.

    A folder that cannot be listed stops the source with an error naming it: its images
    would otherwise be missing without a trace.
    """
    if fs.is_remote(root):
        for rel in fs.walk_files(root):
            parts = rel.split("/")
            if not any(p.startswith(".") for p in parts) and rel.lower().endswith(IMAGE_SUFFIXES):
                yield rel
        return

    def refuse(e: OSError) -> None:
        raise UserError(f"{e.filename}: cannot list this folder ({e.strerror}); fix its permissions or move it out")

    for dirpath, dirnames, filenames in os.walk(root, onerror=refuse):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES):
                yield os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")


def _utf8_error(rel: str) -> str | None:
    """An error for a file name that is not valid UTF-8 (it cannot be stored as text)."""
    try:
        rel.encode("utf-8")
        return None
    except UnicodeEncodeError:
        return f"file name is not valid UTF-8: {_printable(rel)}"


def _printable(rel: str) -> str:
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@register_source("folder")
class FolderSource:
    """Image files of a folder become items of kind ``file``."""

    extra_fields: list = []

    def __init__(self, path: str, options: SourceOptions):
        if not fs.isdir(path):
            raise FileNotFoundError(f"{fs.public(path)}: no such folder")
        manifest = fs.join(path, "silverlabel.json")
        if fs.isfile(manifest):
            raise UserError(f"{fs.public(path)}: this is a silverlabel dataset, not a folder of images; to ingest its "
                            f"images again give its shards ({fs.public(fs.join(path, 'shards'))})")
        self.path = path
        mode = options.folder_labels
        if mode not in ("auto", "on", "off"):
            raise UserError(f"--folder-labels must be auto, on or off, not {mode!r}")
        entries = [(n, d) for n, d in fs.listdir(path) if not n.startswith(".")]
        top_images = [n for n, d in entries if not d and n.lower().endswith(IMAGE_SUFFIXES)]
        has_dirs = any(d for _, d in entries)
        self.labeled = mode == "on" or (mode == "auto" and has_dirs and not top_images)
        if mode == "on" and top_images:
            raise UserError(f"{fs.public(path)}: --folder-labels on, but {top_images[0]} is not in a class folder")
        self._files: list[str] | None = None

    @property
    def remote_files(self) -> list[str]:
        """A remote folder's image files (listed once); what its ``content`` digest covers.
        (Not ``files``: a local folder is named by all its files, as ingest does it.)"""
        if self._files is None:
            self._files = [fs.join(self.path, rel) for rel in _walk(self.path)]
        return self._files

    def describe(self) -> dict[str, Any]:
        where = describe_location(self.path, self.remote_files if fs.is_remote(self.path) else [])
        return {"kind": "folder", **where, "layout": "imagefolder" if self.labeled else "flat"}

    def known_length(self) -> int:
        """The number of image files (a listing)."""
        return len(self.remote_files) if fs.is_remote(self.path) else sum(1 for _ in _walk(self.path))

    def items(self) -> Iterator[Item]:
        index = -1
        rels = (f[len(self.path) + 1:] for f in self.remote_files) if fs.is_remote(self.path) else _walk(self.path)
        for index, rel in enumerate(rels):
            error = _utf8_error(rel)
            shown = _printable(rel) if error else rel
            yield Item(
                index=index,
                kind=KIND_FILE,
                source=shown,
                uid=derive_uid(shown),
                label=shown.split("/", 1)[0] if self.labeled else None,
                path=fs.join(self.path, rel),
                error=error,
            )
        if index < 0:
            raise UserError(f"{fs.public(self.path)}: no image files in this folder "
                            f"(looked for {', '.join(IMAGE_SUFFIXES)})")
