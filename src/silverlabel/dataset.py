"""The dataset directories, as typed views: every path and reader of a stage's output.

::

    POOL/ (ingest; Pool)
      silverlabel.json                   manifest: format version, stage, config, parents, counts
      shards/{name}-{000000..}.tar       WebDataset shards
      samples/{name}-{000000..}.parquet  one row per input item, failures included
      labels/{labels}/{name}-{000000..}.parquet   (label stage; Pool.labels_path)
    SELECTION/ (select; Selection)       selection/*.parquet, classes.json
    TRAINSET/ (shard, reinforce; TrainSet)  {tars}, _info.json, classes.json, {name}-{split}.wids.json
    RUN/ (train; Run)                    checkpoint.pt, checkpoint-final.pt, metrics.jsonl, metrics.csv
    any output: .done/{unit}.json        a unit's commit record (silverlabel.stage.Commit)

Nothing written records where it lies: a dataset is named by :func:`dataset_identity` (its
manifest's ``id``: ``KIND@sha256:HEX``, a hash of its stage, its settings, its inputs' names
and its content), a user-given input by :func:`input_name` (a URL as given, a local file as its
base name and content digest, a local folder as its base name and a digest of its files'
names and sizes), and a parent by :func:`parent_entry` (its id
and its location relative to the child, the one thing a later stage needs to find it).

Nothing appears under a final name before it is complete: :func:`atomic_write` writes to
a hidden temporary name in the same folder, fsyncs, renames, and fsyncs the folder.
A stage reads another stage's output only through these views, never by building its paths.

An output may be a URL of any fsspec filesystem (``s3://bucket/pool``; issue 16). Its view's
``root`` is then this process's *staging* mirror of the URL (:func:`stage_path`: a private
temporary folder, never published) and ``url`` the URL: writers write under ``root`` as for
a local folder, and :func:`atomic_write` uploads each finished file to its final name (an
object PUT is atomic; there is no rename on an object store); a unit's commit record is put
last (:class:`silverlabel.stage.Commit`). Readers take a staging path for the object it
mirrors (:func:`url_of`) and read the store: :func:`read_bytes`, :func:`open_read` (ranged
reads), :func:`parquet_source`, :func:`file_size`, :func:`list_files`. Relative names are
the same in the bucket and on disk, so nothing written says which it was.

    >>> import tempfile
    >>> ds = Dataset(tempfile.mkdtemp())
    >>> ds.shard_path("demo", 3).name
    'demo-000003.tar'
    >>> TrainSet("ts").wids_index_path("in12k", "train").name
    'in12k-train.wids.json'
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import stat
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from silverlabel import __version__
from silverlabel.errors import UserError

FORMAT_VERSION = 1
MANIFEST = "silverlabel.json"
INFO_FILE = "_info.json"
DONE_DIR = ".done"
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


# ---------------------------------------------------------------------------------------
# outputs at URLs: a local staging mirror per process, and reads from the store

#: the prefix of each process's staging folder (:func:`stage_path`)
STAGING_PREFIX = "silverlabel-staging-"
_STAGING_RE = re.compile(r"^silverlabel-staging-[A-Za-z0-9_-]+$")
_STAGING_PID_RE = re.compile(r"^silverlabel-staging-(\d+)-[A-Za-z0-9_]+$")
_staging_base: Path | None = None
#: mirror path -> (size, version) of the store's object a :func:`fetch_local` copy was made from
_fetched: dict[str, tuple[int, str]] = {}


def _staging() -> Path:
    """This process's staging folder (``silverlabel-staging-PID-XXXX`` in the temporary
    folder), made on first use and removed when the process exits; the folders of this
    user's processes that are gone (SIGKILLed) are removed then too."""
    global _staging_base
    if _staging_base is None or not _staging_base.is_dir():
        import atexit
        import shutil
        import tempfile

        _staging_base = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-"))
        atexit.register(shutil.rmtree, str(_staging_base), True)
        _remove_dead_staging(_staging_base.parent)
    return _staging_base


def _remove_dead_staging(tmp: Path) -> None:
    """Remove the staging folders in ``tmp`` that are this user's and whose process is gone."""
    import shutil

    with contextlib.suppress(OSError):
        for d in tmp.iterdir():
            m = _STAGING_PID_RE.match(d.name)
            if m is None or int(m.group(1)) == os.getpid():
                continue
            try:
                if d.stat().st_uid != os.getuid():
                    continue
                os.kill(int(m.group(1)), 0)
            except ProcessLookupError:  # its process is gone
                shutil.rmtree(d, ignore_errors=True)
            except OSError:  # alive (another user's process with that id: EPERM) or unreadable
                continue


def stage_path(url: str) -> Path:
    """Where this process stages (and caches) the object or prefix ``url``: its staging
    folder / scheme / bucket / path. A private temporary folder, never published: what is
    written there is uploaded to ``url`` (:func:`publish`).

        >>> stage_path("s3://bucket/pool/x.tar").parts[-4:]
        ('s3', 'bucket', 'pool', 'x.tar')
    """
    from urllib.parse import urlsplit

    from silverlabel import fs

    parts = urlsplit(fs.public(str(url)))
    rest = [p for p in parts.path.split("/") if p and p not in (".", "..")]
    return _staging().joinpath(parts.scheme, parts.netloc or "_", *rest)


def url_of(path: str | os.PathLike) -> str | None:
    """The URL a path stands for: a URL itself (less a trailing ``/``), a staging path of any
    process (:func:`stage_path`, so a unit planned on one machine names the same object on
    another), else None (a local path).

        >>> url_of(stage_path("s3://bucket/pool") / "shards" / "a.tar")
        's3://bucket/pool/shards/a.tar'
        >>> url_of("/data/pool") is None
        True
    """
    from silverlabel import fs

    s = str(path)
    if fs.is_remote(s):
        return s.rstrip("/") if not fs.is_pipe(s) else s
    parts = Path(s).parts
    for i, p in enumerate(parts):
        if _STAGING_RE.match(p) and len(parts) >= i + 3:
            netloc = "" if parts[i + 2] == "_" else parts[i + 2]
            return f"{parts[i + 1]}://{netloc}/" + "/".join(parts[i + 3:]) if len(parts) > i + 3 else \
                f"{parts[i + 1]}://{netloc}"
    return None


def local_target(path: str | os.PathLike) -> Path:
    """Where this process writes the output ``path`` names: its own staging path for a URL or
    another process's staging path, the path itself otherwise."""
    u = url_of(path)
    return stage_path(u) if u is not None else Path(_file_url_path(path))


def _file_url_path(path: str | os.PathLike) -> str | os.PathLike:
    """``file:///data/pool`` -> ``/data/pool``; any other path as it is."""
    s = str(path)
    return s[len("file://"):] if s.lower().startswith("file://") else path


def check_writable(path: str | os.PathLike, flag: str = "-o") -> None:
    """A UserError naming ``flag`` when ``path`` is a URL no stage can write to: an
    http(s) URL (read-only in fsspec) or a ``pipe:`` command; checked before any work.

        >>> check_writable("https://host/pool")
        Traceback (most recent call last):
        ...
        silverlabel.errors.UserError: -o https://host/pool: an http(s) URL cannot be written; write to a folder or an object store (s3://, gs://, ...)
    """
    from silverlabel import fs

    s = str(path)
    if fs.is_pipe(s):
        raise UserError(f"{flag} {fs.public(s)}: a pipe: command cannot be written to; give a folder or a URL")
    if fs.scheme(s) in ("http", "https"):
        raise UserError(f"{flag} {fs.public(s)}: an http(s) URL cannot be written; write to a folder or an "
                        "object store (s3://, gs://, ...)")


def display(path: str | os.PathLike) -> str:
    """``path`` as messages show it: the public URL it stands for, else the path."""
    from silverlabel import fs

    u = url_of(path)
    return fs.public(u) if u is not None else str(path)


def publish(local: str | os.PathLike, url: str) -> None:
    """Upload the local file ``local`` to ``url`` (one PUT: the object appears whole or not
    at all); an OSError naming the public URL when the store refuses it."""
    from silverlabel import fs

    store, p = fs.filesystem(url)
    fs._remote_call(url, store.put_file, str(local), p)
    fs.forget_one(url)


def put_bytes(url: str, data: bytes) -> None:
    """Write ``data`` as the object ``url`` (one PUT)."""
    from silverlabel import fs

    store, p = fs.filesystem(url)
    fs._remote_call(url, store.pipe_file, p, data)
    fs.forget_one(url)


def remove(path: str | os.PathLike) -> None:
    """Delete a file: the object a URL or staging path names (and its staged copy), or a
    local file; nothing when it is not there."""
    from silverlabel import fs

    u = url_of(path)
    if u is None:
        Path(path).unlink(missing_ok=True)
        return
    stage_path(u).unlink(missing_ok=True)
    store, p = fs.filesystem(u)
    with contextlib.suppress(FileNotFoundError):
        fs._remote_call(u, store.rm_file, p)
    fs.forget_one(u)


def read_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of a file: from the store for a URL or staging path, else from disk."""
    from silverlabel import fs

    u = url_of(path)
    if u is None:
        return Path(path).read_bytes()
    store, p = fs.filesystem(u)
    return fs._remote_call(u, store.cat_file, p)


def file_size(path: str | os.PathLike) -> int:
    """A file's size (the store's answer, asked now, for a URL or staging path);
    FileNotFoundError when there is none."""
    from silverlabel import fs

    u = url_of(path)
    if u is None:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a folder", str(path))
        return st.st_size
    i = fs.info(u)
    if i["type"] != "file":
        raise FileNotFoundError(f"{fs.public(u)}: not a file")
    return i["size"]


def is_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file (an object, for a URL or staging path)."""
    try:
        file_size(path)
        return True
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return False


def open_read(path: str | os.PathLike, read_ahead: int | None = None) -> BinaryIO:
    """A binary file to read ``path`` from: a local file, or for a URL or staging path a
    seekable remote file that reads ranges (``read_ahead`` bytes per request; 0: each read
    one request, as a reader that knows its byte ranges wants)."""
    from silverlabel import fs

    u = url_of(path)
    if u is None:
        return open(path, "rb")
    fs.forget_one(u)
    return fs.open_input(u, fs.READ_AHEAD if read_ahead is None else read_ahead)


def parquet_source(path: str | os.PathLike) -> Any:
    """What pyarrow's parquet readers take for ``path``: the local path, or an open remote
    file (footer and column chunks read by range; closed with the reader's garbage)."""
    if url_of(path) is None:
        return str(path)
    return open_read(path, 0)


def list_files(folder: str | os.PathLike, suffix: str = "") -> list[Path]:
    """The files directly in ``folder`` whose names end with ``suffix`` (hidden ones left
    out), sorted; for a URL or staging folder, the store's listing as staging paths."""
    from silverlabel import fs

    u = url_of(folder)
    if u is None:
        folder = Path(folder)
        return sorted(p for p in folder.iterdir() if p.name.endswith(suffix) and not p.name.startswith(".")
                      and p.is_file()) if folder.is_dir() else []
    fs.forget_one(u)
    try:
        entries = fs.listdir(u)
    except (FileNotFoundError, NotADirectoryError):
        return []
    base = stage_path(u)
    return [base / n for n, is_dir in entries if not is_dir and n.endswith(suffix) and not n.startswith(".")]


def map_ordered(fn: Any, items: Iterable[Any], threads: int = 1) -> Iterator[Any]:
    """``fn(item)`` for each item, in order; with ``threads > 1`` up to that many calls at once
    on threads (calls that are a few requests to a store each, which then overlap), the items
    still pulled lazily: at most ``threads`` ahead of what the caller has taken.

        >>> list(map_ordered(len, ["a", "bb"], threads=4))
        [1, 2]
    """
    if threads <= 1:
        yield from map(fn, items)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads, thread_name_prefix="silverlabel-store") as ex:
        window: deque = deque()
        for item in items:
            window.append(ex.submit(fn, item))
            if len(window) >= threads:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def put_unless(q: Any, item: Any, stop: Any) -> bool:
    """``q.put(item)`` on a bounded queue, given up (False) once the event ``stop`` is set: a
    producer thread whose consumer has gone does not block for ever."""
    import queue

    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def prefetch(items: Iterable[Any], ahead: int = 2) -> Iterator[Any]:
    """``items`` in order, pulled on a thread of their own up to ``ahead`` ahead of the
    caller: a plan whose next item costs a file's read (an md5 of an input shard) overlaps
    the work on the item before. An exception in ``items`` is raised here, in order; a
    caller that stops early stops the thread (after the item it is on).

        >>> list(prefetch(iter(range(5)), ahead=2))
        [0, 1, 2, 3, 4]
    """
    import queue
    import threading

    q: queue.Queue = queue.Queue(max(1, ahead))
    stop = threading.Event()
    end = object()

    def put(item: Any) -> bool:
        return put_unless(q, item, stop)

    def run() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
        except BaseException as e:  # raised in the caller's thread, after the items before it
            put((end, e))
            return
        put((end, None))

    t = threading.Thread(target=run, name="silverlabel-plan", daemon=True)
    t.start()
    try:
        while True:
            item, err = q.get()
            if item is end:
                if err is not None:
                    raise err
                return
            yield item
    finally:
        stop.set()
        t.join()


def drop_local(path: str | os.PathLike) -> None:
    """Remove this process's staged copy of a URL's object (:func:`fetch_local`), a cache no
    longer needed; nothing for a local path."""
    u = url_of(path)
    if u is not None:
        stage_path(u).unlink(missing_ok=True)
        _fetched.pop(str(stage_path(u)), None)


def fetch_local(path: str | os.PathLike) -> Path:
    """A local file with the bytes of ``path``: the path itself when local, else this
    process's staged copy of the object, downloaded when absent or when the object changed
    since (its size and version)."""
    from silverlabel import fs

    u = url_of(path)
    if u is None:
        return Path(path)
    i = fs.info(u)
    dest = stage_path(u)
    key = (i["size"], i["version"])
    if dest.is_file() and _fetched.get(str(dest)) == key and dest.stat().st_size == i["size"]:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    store, p = fs.filesystem(u)
    try:
        fs._remote_call(u, store.get_file, p, str(tmp))
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    _fetched[str(dest)] = key
    return dest


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[BinaryIO]:
    """Open a temporary sibling of ``path`` for writing; rename it into place on success.

    On an exception the temporary file is removed and ``path`` is untouched. A SIGKILL
    leaves only a hidden ``.NAME.tmp-PID`` file, which :meth:`Dataset.clean_temporaries`
    removes on the next run. A staging path (an output at a URL, :func:`stage_path`) is then
    uploaded to its object, and the staged copy kept (a commit record reads its digest, then
    drops it).
    """
    path = local_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        f = open(tmp, mode)
    except OSError as e:
        if e.errno in STORAGE_ERRNOS:
            raise OSError(e.errno, e.strerror, str(path)) from e  # the file meant, not its temporary
        raise
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        url = url_of(path)
        if url is not None:
            publish(path, url)
    except BaseException as e:
        # close() flushes what is buffered and so fails again on a full disk: the temporary
        # is removed whatever close() says
        with contextlib.suppress(OSError):
            f.close()
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS and e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from e  # a failed write() names no file
        raise


#: errno values of a storage that refuses writes: full, over quota, read-only, not permitted
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def storage_error(e: BaseException, where: str | os.PathLike | None = None) -> UserError | None:
    """A full disk, a read-only or forbidden folder, as one line naming the path (``where``
    when the error names none); None for any other error.

    >>> print(storage_error(OSError(errno.ENOSPC, "No space left on device", "out/a.tar")))
    out/a.tar: No space left on device (free some space or write elsewhere, then run the same command again)
    """
    if not isinstance(e, OSError) or e.errno not in STORAGE_ERRNOS:
        return None
    hint = {errno.ENOSPC: " (free some space or write elsewhere, then run the same command again)",
            errno.EDQUOT: " (free some space or write elsewhere, then run the same command again)",
            errno.EROFS: " (choose a writable output folder)"}.get(e.errno, "")
    return UserError(f"{e.filename or where or '?'}: {e.strerror or os.strerror(e.errno)}{hint}")


def check_target(path: str | os.PathLike | None, flag: str, folder: bool) -> None:
    """A UserError naming ``flag`` when ``path`` cannot be written as a ``folder`` (or a file):
    it, or a folder above it, exists as the other kind. Checked before any work is done.

    >>> check_target("/", "--out", folder=False)
    Traceback (most recent call last):
    ...
    silverlabel.errors.UserError: --out /: is a folder; give a file name
    """
    if path is None:
        return
    p = Path(path)
    if p.exists() and p.is_dir() != folder:
        raise UserError(f"{flag} {path}: is a folder; give a file name" if not folder
                        else f"{flag} {path}: is a file, not a folder")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} {path}: {parent} is a file, not a folder")
            break


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    data = json.dumps(obj, indent=2, sort_keys=False, default=str).encode() + b"\n"
    with atomic_write(path) as f:
        f.write(data)


def file_digest(path: str | os.PathLike, h: Any = "sha256") -> str:
    """The hex digest of a file's bytes, read in 1 MiB blocks: ``h`` a hashlib name, or a
    hash object to feed (which may already hold other data)."""
    h = hashlib.new(h) if isinstance(h, str) else h
    with open_read(path) as f:  # an object of the store, for a URL or staging path
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


#: inputs larger than this are named by their size and their first and last NAME_SAMPLE bytes
NAME_FULL_LIMIT = 256 << 20
NAME_SAMPLE = 8 << 20


def name_digest(path: str | os.PathLike, h: Any = "sha256") -> str:
    """The digest that names a local input (:func:`input_name`): all its bytes, or for a
    file over ``NAME_FULL_LIMIT`` its size and its first and last ``NAME_SAMPLE`` bytes, so
    naming a terabyte of input tars on every run and resume costs seconds, not a full read.
    A name, not an integrity check: commit records hold the outputs' full digests."""
    h = hashlib.new(h) if isinstance(h, str) else h
    size = os.path.getsize(path)
    if size <= NAME_FULL_LIMIT:
        return file_digest(path, h)
    h.update(b"size:%d\0" % size)
    with open(path, "rb") as f:
        h.update(f.read(NAME_SAMPLE))
        f.seek(size - NAME_SAMPLE)
        h.update(f.read(NAME_SAMPLE))
    return h.hexdigest()


def read_json(path: Path, missing: str) -> Any:
    """The JSON document at ``path``: FileNotFoundError(``missing``) when there is none, a
    UserError naming the file when it is not JSON."""
    try:
        return json.loads(read_bytes(path))
    except FileNotFoundError:
        raise FileNotFoundError(missing) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{display(path)}: corrupt JSON ({e})") from None


def check_name(name: str, what: str = "labels name") -> str:
    """``name`` if it is one plain path component (no separator, not ``.``/``..``, not hidden,
    no NUL), else a UserError: a name from a flag or a manifest never leaves its folder.

    >>> check_name("vit_base_patch16_224.augreg_in21k")
    'vit_base_patch16_224.augreg_in21k'
    >>> check_name("../../x")
    Traceback (most recent call last):
    ...
    silverlabel.errors.UserError: labels name '../../x' is not a plain folder name
    """
    if not isinstance(name, str) or not name or name.startswith(".") or any(c in name for c in "/\\\x00"):
        raise UserError(f"{what} {name!r} is not a plain folder name")
    return name


def clean_temporaries(folders: list[Path]) -> int:
    """Remove the ``.NAME.tmp-PID`` files :func:`atomic_write` left in ``folders`` and their
    ``.done`` subfolders (a killed run); returns how many."""
    removed = 0
    for folder in folders:
        for f in (folder, folder / DONE_DIR):
            if not f.is_dir():
                continue
            for p in f.iterdir():
                if _TMP_RE.match(p.name):
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
                        removed += 1
    return removed


class Dataset:
    """A silverlabel output directory (see the module docstring for the layout): a local
    folder, or a URL prefix (``url``; ``root`` is then this process's staging mirror of it)."""

    def __init__(self, root: str | os.PathLike):
        #: the URL of an output in an object store (None: a local folder)
        self.url = url_of(root)
        self.root = stage_path(self.url) if self.url is not None else Path(_file_url_path(root))

    @property
    def location(self) -> str:
        """Where the dataset is, as messages show it: its public URL, or its folder."""
        return display(self.url) if self.url is not None else str(self.root)

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

    def samples_files(self, manifest: Mapping[str, Any] | None = None) -> list[Path]:
        """Completed samples tables, in shard order. A finished pool at a URL names them from
        its manifest (``name``, ``shards``; ``manifest``: when the caller holds it, not read
        again), since a listing may lag."""
        if self.url is not None and (manifest is not None or self.exists()):
            man = self.read_manifest() if manifest is None else manifest
            if man.get("state") == "complete" and type(man.get("shards")) is int and isinstance(man.get("name"), str):
                return [self.samples_path(check_name(man["name"], "pool name"), i) for i in range(man["shards"])]
        return list_files(self.samples_dir, ".parquet")

    @staticmethod
    def shard_index(path: str | os.PathLike) -> int:
        """The shard number in a ``{name}-{000000}.ext`` file name."""
        return int(Path(path).stem.rsplit("-", 1)[1])

    @property
    def classes_path(self) -> Path:
        """``classes.json``, the class map of a selection or a training set."""
        from silverlabel.formats.selection import CLASSES_FILE

        return self.root / CLASSES_FILE

    @property
    def done_dir(self) -> Path:
        """Where the units' commit records live (:class:`silverlabel.stage.Commit`)."""
        return self.root / DONE_DIR

    def commit_path(self, unit: str) -> Path:
        return self.done_dir / f"{unit}.json"

    # -- manifest -------------------------------------------------------------------
    def exists(self) -> bool:
        return is_file(self.manifest_path)

    def read_manifest(self) -> dict[str, Any]:
        """The manifest: a JSON object whose ``format_version`` this version reads; a
        UserError naming the file otherwise (a newer version's output, or not a manifest)."""
        path = self.manifest_path
        man = read_json(path, f"{self.location}: not a silverlabel dataset (no {MANIFEST})")
        path = display(path)
        if not isinstance(man, dict):
            raise UserError(f"{path}: not a silverlabel manifest (a JSON object), got {type(man).__name__}")
        version = man.get("format_version")
        if type(version) is not int:
            raise UserError(f"{path}: not a silverlabel manifest (format_version {version!r} is not a number)")
        if not 1 <= version <= FORMAT_VERSION:
            raise UserError(f"{path}: format_version {version} is not one this silverlabel {__version__} reads "
                            f"(1..{FORMAT_VERSION}); upgrade silverlabel")
        return man

    def previous_run(self, stage: str) -> dict[str, Any] | None:
        """The manifest a previous run of ``stage`` left in this output folder; None when
        the folder is new (absent, or nothing but hidden files); a UserError when it holds
        anything else."""
        if not self.exists():
            if self.url is not None:
                from silverlabel import fs

                fs.forget_one(self.url)
                try:
                    entries = fs.listdir(self.url)
                except (FileNotFoundError, NotADirectoryError):
                    entries = []
                if any(not name.startswith(".") for name, _d in entries):
                    raise UserError(f"{self.location}: exists and is not a silverlabel output; choose another -o")
            elif self.root.exists() and any(not p.name.startswith(".") for p in self.root.iterdir()):
                raise UserError(f"{self.location}: output folder exists and is not a silverlabel output; "
                                "choose another -o")
            return None
        man = self.read_manifest()
        if man.get("stage") != stage:
            raise UserError(f"{self.location}: holds a {man.get('stage')!r} output, not an output of {stage}; choose another -o")
        return man

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        manifest = {"format_version": FORMAT_VERSION, **manifest, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_json_atomic(self.manifest_path, manifest)

    def parent_roots(self, kind: str | None = None, manifest: Mapping[str, Any] | None = None) -> dict[str, Path]:
        """The parents of this dataset its manifest names (``kind``: those of that kind only),
        id -> where they are now (:func:`parent_location`); a parent with no id or no location
        is left out. ``manifest``: the manifest when the caller holds it (not read again)."""
        roots = {}
        for p in (self.read_manifest() if manifest is None else manifest).get("parents") or []:
            if isinstance(p, dict) and (kind is None or p.get("kind") == kind):
                where = parent_location(self.root, p)
                ident = p.get("id") or (str(where) if where is not None else None)
                if where is not None and ident:
                    roots[ident] = where
        return roots

    # -- housekeeping ---------------------------------------------------------------
    def clean_temporaries(self) -> int:
        """Remove temporary files a killed run left behind; returns how many."""
        removed = clean_temporaries([self.root, self.shards_dir, self.samples_dir])
        if self.tmp_dir.is_dir():
            for p in self.tmp_dir.iterdir():
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    p.unlink()
                    removed += 1
        return removed


# ---------------------------------------------------------------------------------------
# names that do not say where things lie

#: the kind word of each stage's output, the first part of its id
ID_KINDS = {"ingest": "pool", "select": "selection", "shard": "trainset", "reinforce": "trainset", "train": "run"}
_ID_RE = re.compile(r"^[\w.+-]+@sha256:[0-9a-f]{64}$")


def is_identity(value: Any) -> bool:
    """True for a name :func:`make_identity` or :func:`input_name` made (``NAME@sha256:HEX``).

    >>> is_identity("pool@sha256:" + "0" * 64), is_identity("/data/pool")
    (True, False)
    """
    return isinstance(value, str) and bool(_ID_RE.match(value))


def _canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str).encode()


def make_identity(kind: str, doc: Any) -> str:
    """``KIND@sha256:HEX``: the sha256 of ``doc`` as canonical JSON. ``doc`` holds what makes
    a dataset what it is (settings, inputs' names, content digests), never a location.

    >>> make_identity("pool", {"b": 1, "a": [2]}) == make_identity("pool", {"a": [2], "b": 1})
    True
    """
    return f"{kind}@sha256:{hashlib.sha256(_canonical(doc)).hexdigest()}"


def tree_digest(files: Iterable[str | os.PathLike | tuple[str | os.PathLike, int]], base: str | os.PathLike) -> str:
    """sha256 over ``files`` (a path, or a ``(path, size)`` pair when its size is known):
    their paths relative to ``base``, sorted, and their sizes (one ``os.stat`` each, no byte
    read). What names a folder or a pattern of files (:func:`input_name`).

        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "a.jpg").write_bytes(b"xy")
        >>> tree_digest([d / "a.jpg"], d) == tree_digest([(d / "a.jpg", 2)], d)
        True
    """
    h = hashlib.sha256()
    entries = [(f, None) if not isinstance(f, tuple) else f for f in files]
    for rel, p, size in sorted(((os.path.relpath(f, base), f, size) for f, size in entries), key=lambda e: e[0]):
        h.update(Path(rel).as_posix().encode("utf-8", "surrogateescape") + b"\0")
        h.update(b"%d\0" % (os.stat(p).st_size if size is None else size))
    return h.hexdigest()


def _regular_files(folder: Path) -> Iterator[tuple[Path, int]]:
    """The regular files under ``folder`` (links followed) with their sizes, hidden names
    left out as the sources leave them out; a FIFO or a device is never opened."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            p = Path(dirpath) / fn
            try:
                st = p.stat()
                if not fn.startswith(".") and stat.S_ISREG(st.st_mode):
                    yield p, st.st_size
            except OSError:  # a dangling link: nothing to name
                continue


def input_name(path: str | os.PathLike, files: Iterable[str | os.PathLike] | None = None) -> str:
    """How a published file names an input the user gave, wherever it lies: a URL as given
    (less credentials); a silverlabel dataset or run by :func:`dataset_identity`; a local
    file as ``BASENAME@sha256:DIGEST`` of its bytes (up to 256 MiB read whole; a larger one
    by its size, head and tail: :func:`name_digest`); a local folder, or a pattern whose
    ``files`` are given, as its base name and a digest of its files' relative names and
    sizes (:func:`tree_digest`), read from a listing and one ``os.stat`` per file.

    Why a folder is not named by its bytes, nor by its files' times: its name is a lookup,
    taken on every run and resume, and reading a million images once more just to name
    them doubled an ingest's reads. Modification times (rsync's and make's test of
    staleness) are left out because a name is published and must be the same for the same
    files anywhere: a copy (``cp -r``, a download, a checkout) gives them new times, and
    two runs on such copies write identical manifests. The price: a file rewritten with
    other bytes of exactly the same size keeps the folder's name (a resume then goes on
    rather than being refused). What is made from the folder is still told apart: an
    output's id holds the digests of the files it wrote (:func:`records_digest`), and a
    build decides staleness locally by sizes and times (``pipeline.path_identity``).

        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "urls.txt").write_text("https://example.com/a.jpg\\n")
        >>> input_name(d / "urls.txt")
        'urls.txt@sha256:3b23e6d72ef69e67ca13937d05a19223197fea41659cddf8896767dae0131809'
        >>> input_name("s3://bucket/meta.parquet")
        's3://bucket/meta.parquet'
    """
    from silverlabel import fs

    s = str(path)
    if fs.is_remote(s):
        return fs.public(s)
    s = s[len("file://"):] if s.lower().startswith("file://") else s
    p = Path(s)
    name = p.name or os.path.basename(os.path.abspath(s))
    if files is not None:
        files = [Path(f) for f in files]
        if files != [p]:
            base = p if p.is_dir() else p.parent
            return f"{name}@sha256:{tree_digest(files, base)}"
    if p.is_dir():
        if (p / MANIFEST).is_file() or (p / INFO_FILE).is_file() or Run(p).is_run():
            return dataset_identity(p)
        return f"{name}@sha256:{tree_digest(_regular_files(p), p)}"
    if p.is_file():
        return f"{name}@sha256:{name_digest(p)}"
    raise FileNotFoundError(f"{s}: no such file or folder")


def named_config(config: Mapping[str, Any], fields: Iterable[str]) -> dict[str, Any]:
    """``config`` with each of ``fields`` that names a path (a string, or a list of them)
    replaced by its :func:`input_name`: a stage's settings as a manifest publishes them."""
    out = dict(config)
    for f in fields:
        v = out.get(f)
        if isinstance(v, (list, tuple)):
            out[f] = [input_name(x) if isinstance(x, (str, os.PathLike)) else x for x in v]
        elif isinstance(v, (str, os.PathLike)):
            out[f] = input_name(v)
    return out


def named_teachers(teachers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Teacher entries of a config with each ``checkpoint`` file named by :func:`input_name`."""
    return [dict(t, checkpoint=input_name(t["checkpoint"])) if t.get("checkpoint") else dict(t) for t in teachers]


def records_digest(root: str | os.PathLike, units: Iterable[str] | None = None) -> str:
    """sha256 over the outputs (relative names, sizes, md5s) the commit records in
    ``root/.done`` hold: the content of a stage's output, without reading it again. ``units``:
    the records' names (an output at a URL: read by name from the store, as a listing may
    lag), else every record the folder lists."""
    h = hashlib.sha256()
    done = Dataset(root).done_dir
    names = sorted(f"{u}.json" for u in units) if units is not None else None
    for p in list_files(done, ".json") if names is None else [done / n for n in names]:
        try:
            outputs = json.loads(read_bytes(p)).get("outputs") or {}
        except (OSError, ValueError, AttributeError):
            continue
        for rel in sorted(outputs):
            o = outputs[rel]
            if isinstance(o, dict):
                h.update(f"{Path(rel).as_posix()}\0{o.get('bytes')}\0{o.get('md5')}\n".encode())
    return h.hexdigest()


def dataset_identity(root: str | os.PathLike, manifest: Mapping[str, Any] | None = None) -> str:
    """The location-independent identity of a silverlabel output (``KIND@sha256:HEX``): the
    ``id`` of its manifest (pool, selection, training set, reinforced set), of its checkpoint
    (a run folder or a ``.pt`` file); for an output without one (made by an older version, or a
    training set of ``_info.json`` only), a hash of its manifest or ``_info.json`` (less the
    ``updated`` time). The same output written anywhere has the same identity. ``manifest``:
    its manifest when the caller has read it already (not read again).

        >>> import tempfile
        >>> d = Dataset(tempfile.mkdtemp())
        >>> d.write_manifest({"stage": "select", "id": "selection@sha256:" + "1" * 64})
        >>> dataset_identity(d.root) == "selection@sha256:" + "1" * 64
        True
    """
    ds = Dataset(root)
    root = ds.root
    if manifest is not None or ds.exists():
        man = ds.read_manifest() if manifest is None else manifest
        if is_identity(man.get("id")):
            return man["id"]
        kind = ID_KINDS.get(str(man.get("stage")), "dataset")
        return make_identity(kind, {k: v for k, v in man.items() if k not in ("updated", "id")})
    if ds.url is not None:
        if is_file(root / INFO_FILE):
            return make_identity("trainset", {"info": file_digest(root / INFO_FILE)})
        raise FileNotFoundError(f"{ds.location}: no silverlabel output there (no {MANIFEST} or {INFO_FILE})")
    if (root / INFO_FILE).is_file():
        return make_identity("trainset", {"info": file_digest(root / INFO_FILE)})
    run = Run(root)
    if run.is_run():
        return run.identity()
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such dataset folder")
    raise UserError(f"{root}: not a silverlabel output (no {MANIFEST}, {INFO_FILE} or checkpoint)")


def parent_entry(kind: str, root: str | os.PathLike, child: str | os.PathLike, *,
                 manifest: Mapping[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """A manifest's ``parents`` entry for the dataset at ``root`` read by the output ``child``:
    ``kind``, ``id`` (:func:`dataset_identity`; ``manifest``: the parent's manifest when the
    caller holds it) and ``location``, the parent's path relative to the child's folder
    (``../pool``), which holds wherever the two are moved together, or the URL given; plus
    ``extra``.

        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> Dataset(d / "pool").write_manifest({"stage": "ingest", "id": "pool@sha256:" + "2" * 64})
        >>> e = parent_entry("dataset", d / "pool", d / "out" / "sel")
        >>> e["location"], e["id"][:5]
        ('../../pool', 'pool@')
    """
    import posixpath
    from urllib.parse import urlsplit

    from silverlabel import fs

    ident = dataset_identity(root, manifest)
    ru, cu = url_of(root), url_of(child)
    if ru is not None:
        r, c = urlsplit(ru), urlsplit(cu or "")
        if cu is not None and (r.scheme, r.netloc) == (c.scheme, c.netloc):  # the same bucket: relative, as on disk
            rel = posixpath.relpath("/" + r.path.strip("/"), "/" + c.path.strip("/"))
            return {"kind": kind, "id": ident, "location": rel, **extra}
        return {"kind": kind, "id": ident, "location": fs.public(ru), **extra}
    # a local parent of an output in a bucket: relative to the working folder (a reader elsewhere needs -o paths)
    rel = os.path.relpath(os.path.abspath(root), os.path.abspath(child) if cu is None else os.getcwd())
    return {"kind": kind, "id": ident, "location": Path(rel).as_posix(), **extra}


def without_locations(parents: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``parents`` entries less their ``location``: what of them goes into an id."""
    return [{k: v for k, v in p.items() if k != "location"} for p in parents]


def parent_location(child: str | os.PathLike, entry: Mapping[str, Any]) -> Path | None:
    """Where the parent a ``parents`` entry names lies now: its ``location`` relative to the
    folder of ``child`` (or an older manifest's absolute ``path``); None when it names none."""
    where = entry.get("location") if isinstance(entry.get("location"), str) else entry.get("path")
    if not isinstance(where, str) or not where:
        return None
    from silverlabel import fs

    if fs.is_remote(where):
        return stage_path(where)  # read from the store through its staging path (url_of)
    if os.path.isabs(where):
        return Path(where)
    child = Dataset(child).root  # a URL child: its staging mirror, where a relative location resolves alike
    return Path(os.path.normpath(Path(child) / where))  # sel/../pool -> pool, as errors name it


class Pool(Dataset):
    """An ingest output: shards, samples tables and the labels written for them.

    >>> Pool("pool").labels_dir("efficientnet_lite0").as_posix()
    'pool/labels/efficientnet_lite0'
    """

    @staticmethod
    def statuses(samples: str | os.PathLike) -> list[str]:
        """The ``status`` column of one samples table."""
        import pyarrow.parquet as pq  # ParquetFile, not read_table: that imports pyarrow.dataset (~1 s)

        return pq.ParquetFile(parquet_source(samples)).read(columns=["status"]).column("status").to_pylist()

    def labels_dir(self, labels: str) -> Path:
        return self.root / "labels" / check_name(labels)

    def labels_path(self, labels: str, name: str, shard: int) -> Path:
        return self.labels_dir(labels) / f"{name}-{shard:06d}.parquet"

    def labels_files(self, labels: str) -> list[Path]:
        """The labels tables written so far, in shard order."""
        return list_files(self.labels_dir(labels), ".parquet")

    def labels_names(self) -> list[str]:
        """The labels registered in the manifest, each checked to be a plain folder name."""
        return [check_name(n) for n in (self.read_manifest().get("labels") or {})]


class Selection(Dataset):
    """A select output: ``selection/*.parquet`` and ``classes.json``."""

    def checked_manifest(self) -> dict[str, Any]:
        """The selection's manifest; a FileNotFoundError or UserError when the folder is not a
        selection."""
        if self.url is None and not self.root.is_dir():
            raise FileNotFoundError(f"{self.location}: no such selection folder")
        if not self.exists():
            if self.url is not None:
                raise FileNotFoundError(f"{self.location}: no selection there (no {MANIFEST})")
            raise UserError(f"{self.location}: not a selection (no {MANIFEST}; make one with silverlabel select)")
        return self.read_manifest()

    def files(self, manifest: Mapping[str, Any] | None = None) -> list[Path]:
        """The selection's parquet files; a UserError when the folder is not a selection.
        ``manifest``: its manifest when the caller holds it (:meth:`checked_manifest`; not
        read again)."""
        from silverlabel.formats.selection import SELECTION_DIR

        man = self.checked_manifest() if manifest is None else manifest
        if man.get("stage") != "select":
            raise UserError(f"{self.location}: holds a {man.get('stage')!r} output, not a selection (silverlabel select)")
        files = list_files(self.root / SELECTION_DIR, ".parquet")
        if not files:
            raise UserError(f"{self.location}: no {SELECTION_DIR}/*.parquet files")
        return files

    def fingerprint(self, files: list[Path] | None = None) -> str:
        """sha256 over the selection's parquet files (names and bytes)."""
        h = hashlib.sha256()
        for p in self.files() if files is None else files:
            h.update(p.name.encode() + b"\0")
            file_digest(p, h)
            h.update(b"\0")
        return h.hexdigest()


class TrainSet(Dataset):
    """A shard or reinforce output: tars directly in the folder, ``_info.json`` (written
    last, so its presence means finished), ``classes.json`` and a wids index per split."""

    @property
    def info_path(self) -> Path:
        return self.root / INFO_FILE

    def read_classes(self) -> dict[str, Any]:
        """``classes.json`` (``num_classes``, ``label_space``, ``classes``); {} when there is none."""
        if not is_file(self.classes_path):
            return {}
        doc = read_json(self.classes_path, f"{self.classes_path}: not found")
        if not isinstance(doc, dict):
            raise UserError(f"{self.classes_path}: not a class map (a JSON object)")
        return doc

    def tar_path(self, filename: str) -> Path:
        return self.root / filename

    def wids_index_path(self, name: str, split: str) -> Path:
        return self.root / f"{name}-{split}.wids.json"

    def write_wids_indexes(self, name: str, splits: dict[str, list[str]], shards: dict[str, dict[str, Any]]) -> None:
        """A wids shard index per split: ``splits`` maps a split to its tar names, ``shards``
        a tar name to its ``samples``, ``bytes`` and ``md5`` (its commit record's info)."""
        for split, filenames in splits.items():
            write_json_atomic(self.wids_index_path(name, split), {
                "__kind__": "wids-shard-index-v1",
                "wids_version": 1,
                "name": f"{name}-{split}",
                "shardlist": [{"url": fn, "nsamples": shards[fn]["samples"], "filesize": shards[fn]["bytes"],
                               "md5sum": shards[fn]["md5"]} for fn in filenames],
            })

    def read_info(self) -> dict[str, Any]:
        """``_info.json``: the shard list per split (file names relative to the folder); a
        UserError naming the file when it is not one (each split: ``filenames``, plain tar
        names, and as many ``shard_lengths``, which are never assumed).

            >>> import tempfile
            >>> ts = TrainSet(tempfile.mkdtemp())
            >>> _ = ts.info_path.write_text('{"splits": {"train": {"filenames": ["../x.tar"]}}}')
            >>> try:
            ...     ts.read_info()
            ... except UserError as e:
            ...     print(str(e).split(": ", 1)[1])
            split 'train': shard '../x.tar' is not a plain file name
        """
        path = display(self.info_path)
        info = read_json(self.info_path, f"{self.location}: no {INFO_FILE} (not a finished silverlabel shard output)")
        splits = info.get("splits") if isinstance(info, dict) else None
        if not isinstance(splits, dict):
            raise UserError(f"{path}: not a shard list (a JSON object with a 'splits' mapping)")
        for name, s in splits.items():
            files = s.get("filenames") if isinstance(s, dict) else None
            if not isinstance(files, list):
                raise UserError(f"{path}: split {name!r} has no 'filenames' list")
            for fn in files:
                try:
                    check_name(fn)
                except UserError:
                    raise UserError(f"{path}: split {name!r}: shard {fn!r} is not a plain file name") from None
            lengths = s.get("shard_lengths")
            if lengths is None:  # every reader needs them: the loader's order, reinforce, verify, timm
                raise UserError(f"{path}: split {name!r} has no 'shard_lengths' (the samples in each file, which "
                                "silverlabel shard writes); add them, or shard again")
            if (not isinstance(lengths, list) or len(lengths) != len(files)
                    or not all(type(n) is int and n >= 0 for n in lengths)):
                raise UserError(f"{path}: split {name!r}: 'shard_lengths' must be {len(files)} counts, one per file")
        return info

    def split(self, split: str, info: dict[str, Any] | None = None) -> dict[str, Any]:
        """One split's entry of ``_info.json`` (``filenames``, ``shard_lengths``, ...); a
        UserError naming the splits there are when it has no such split."""
        splits = (self.read_info() if info is None else info).get("splits", {})
        if split not in splits:
            raise UserError(f"{self.location}: no split {split!r} (has {', '.join(sorted(splits)) or 'none'})")
        return splits[split]

    def reinforce_info(self) -> dict[str, Any] | None:
        """The manifest's ``reinforce`` block when this is a reinforced set, else None."""
        try:
            man = self.read_manifest()
        except (FileNotFoundError, UserError):
            return None
        return man.get("reinforce") if man.get("stage") == "reinforce" else None


class Run:
    """A train output: checkpoints and metrics."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    checkpoint_path = property(lambda self: self.root / "checkpoint.pt")
    final_checkpoint_path = property(lambda self: self.root / "checkpoint-final.pt")
    metrics_jsonl = property(lambda self: self.root / "metrics.jsonl")
    metrics_csv = property(lambda self: self.root / "metrics.csv")

    def is_run(self) -> bool:
        """A ``.pt`` file, or a folder holding a checkpoint."""
        if self.root.is_file():
            return self.root.suffix == ".pt"
        return self.checkpoint_path.is_file() or self.final_checkpoint_path.is_file()

    def identity(self) -> str:
        """The run's id as its checkpoint records it (``run@sha256:...``, from its settings and
        its inputs' ids); for a checkpoint without one, its file name and bytes' digest."""
        ckpt = self.find_checkpoint()
        try:
            import torch

            ck = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # not a torch file, or one with objects: named by its bytes
            ck = None
        if isinstance(ck, dict) and is_identity(ck.get("id")):
            return ck["id"]
        return input_name(ckpt)

    @property
    def folder(self) -> Path:
        """Where a run's reports go: the run folder, or the folder of a ``.pt`` file."""
        return self.root.parent if self.root.is_file() else self.root

    def find_checkpoint(self) -> Path:
        """The final checkpoint, else the latest; ``root`` may itself be a ``.pt`` file."""
        if self.root.is_file():
            return self.root
        if not self.root.is_dir():
            raise FileNotFoundError(f"{display(self.root)}: no such run folder or checkpoint file")
        for p in (self.final_checkpoint_path, self.checkpoint_path):
            if p.is_file():
                return p
        raise FileNotFoundError(f"{display(self.root)}: no {self.final_checkpoint_path.name} or {self.checkpoint_path.name}")
