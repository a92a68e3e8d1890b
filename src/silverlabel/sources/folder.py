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
    """Relative paths of image files under ``root``, sorted, hidden entries skipped.

    A folder that cannot be listed stops the source with an error naming it: its images
    would otherwise be missing without a trace.
    """

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
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: no such folder")
        manifest = os.path.join(path, "silverlabel.json")
        if os.path.isfile(manifest):
            raise UserError(f"{path}: this is a silverlabel dataset, not a folder of images; to ingest its images "
                            f"again give its shards ({os.path.join(path, 'shards')})")
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
        index = -1
        for index, rel in enumerate(_walk(self.path)):
            error = _utf8_error(rel)
            shown = _printable(rel) if error else rel
            yield Item(
                index=index,
                kind=KIND_FILE,
                source=shown,
                uid=derive_uid(shown),
                label=shown.split("/", 1)[0] if self.labeled else None,
                path=os.path.join(self.path, rel),
                error=error,
            )
        if index < 0:
            raise UserError(f"{self.path}: no image files in this folder (looked for {', '.join(IMAGE_SUFFIXES)})")
