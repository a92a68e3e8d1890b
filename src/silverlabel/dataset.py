"""The dataset directory: layout, manifest and crash-safe file writing.

::

    DATASET/
      silverlabel.json                   manifest: format version, stage, config, parents, counts
      shards/{name}-{000000..}.tar       WebDataset shards
      samples/{name}-{000000..}.parquet  one row per input item, failures included
      labels/{teacher}/...               (label stage)

Nothing appears under a final name before it is complete: :func:`atomic_write` writes to
a hidden temporary name in the same folder, fsyncs, renames, and fsyncs the folder.

    >>> import tempfile
    >>> ds = Dataset(tempfile.mkdtemp())
    >>> ds.shard_path("demo", 3).name
    'demo-000003.tar'
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from silverlabel.errors import UserError

FORMAT_VERSION = 1
MANIFEST = "silverlabel.json"
_TMP_RE = re.compile(r"^\..+\.tmp-\d+$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[BinaryIO]:
    """Open a temporary sibling of ``path`` for writing; rename it into place on success.

    On an exception the temporary file is removed and ``path`` is untouched. A SIGKILL
    leaves only a hidden ``.NAME.tmp-PID`` file, which :meth:`Dataset.clean_temporaries`
    removes on the next run.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    f = open(tmp, mode)
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        f.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    data = json.dumps(obj, indent=2, sort_keys=False, default=str).encode() + b"\n"
    with atomic_write(path) as f:
        f.write(data)


class Dataset:
    """A silverlabel dataset directory (see the module docstring for the layout)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # -- layout ---------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    @property
    def samples_dir(self) -> Path:
        return self.root / "samples"

    @property
    def tmp_dir(self) -> Path:
        return self.root / ".tmp"

    def shard_path(self, name: str, index: int) -> Path:
        return self.shards_dir / f"{name}-{index:06d}.tar"

    def samples_path(self, name: str, index: int) -> Path:
        return self.samples_dir / f"{name}-{index:06d}.parquet"

    def samples_files(self) -> list[Path]:
        """Completed samples tables, in shard order."""
        return sorted(self.samples_dir.glob("*.parquet")) if self.samples_dir.is_dir() else []

    # -- manifest -------------------------------------------------------------------
    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def read_manifest(self) -> dict[str, Any]:
        try:
            return json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.root}: not a silverlabel dataset (no {MANIFEST})") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{self.manifest_path}: corrupt manifest ({e})") from None

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        manifest = {"format_version": FORMAT_VERSION, **manifest, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_json_atomic(self.manifest_path, manifest)

    # -- housekeeping ---------------------------------------------------------------
    def clean_temporaries(self) -> int:
        """Remove temporary files a killed run left behind; returns how many."""
        removed = 0
        for folder in (self.root, self.shards_dir, self.samples_dir):
            if not folder.is_dir():
                continue
            for p in folder.iterdir():
                if _TMP_RE.match(p.name):
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
                        removed += 1
        if self.tmp_dir.is_dir():
            for p in self.tmp_dir.iterdir():
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    p.unlink()
                    removed += 1
        return removed
