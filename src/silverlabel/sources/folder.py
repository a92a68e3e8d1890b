"""Image folders: ImageFolder layout (a sub-folder per class) or a flat/recursive folder.

With ``folder_labels="auto"`` a folder whose top level holds only sub-folders is read as
ImageFolder and each image keeps its class folder's name as its human ``label``.
Files are listed in sorted order, so keys are the same on every machine.

    >>> import tempfile, os
    >>> d = tempfile.mkdtemp(); os.makedirs(f"{d}/cat"); open(f"{d}/cat/a.jpg", "wb").close()
    >>> [(i.source, i.label) for i in FolderSource(d, SourceOptions()).items()]
    [('cat/a.jpg', 'cat')]
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from silverlabel.errors import UserError
from silverlabel.sources import KIND_FILE, Item, SourceOptions, derive_uid, register_source

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def _walk(root: str) -> Iterator[str]:
    """Relative paths of image files under ``root``, sorted, hidden entries skipped."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES):
                yield os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")


@register_source("folder")
class FolderSource:
    """Image files of a folder become items of kind ``file``."""

    extra_fields: list = []

    def __init__(self, path: str, options: SourceOptions):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: no such folder")
        self.path = path
        mode = options.folder_labels
        if mode not in ("auto", "on", "off"):
            raise UserError(f"--folder-labels must be auto, on or off, not {mode!r}")
        entries = [e for e in os.scandir(path) if not e.name.startswith(".")]
        top_images = [e for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES)]
        has_dirs = any(e.is_dir() for e in entries)
        self.labeled = mode == "on" or (mode == "auto" and has_dirs and not top_images)
        if mode == "on" and top_images:
            raise UserError(f"{path}: --folder-labels on, but {top_images[0].name} is not in a class folder")

    def describe(self) -> dict[str, Any]:
        return {"kind": "folder", "path": os.path.abspath(self.path), "layout": "imagefolder" if self.labeled else "flat"}

    def items(self) -> Iterator[Item]:
        for index, rel in enumerate(_walk(self.path)):
            yield Item(
                index=index,
                kind=KIND_FILE,
                source=rel,
                uid=derive_uid(rel),
                label=rel.split("/", 1)[0] if self.labeled else None,
                path=os.path.join(self.path, rel),
            )
