"""Input files wherever they live: local paths, URLs of any fsspec filesystem, ``pipe:``.

A SOURCE may be a local path or a URL: ``s3://bucket/meta/*.parquet``,
``gs://bucket/shards/{00000..00099}.tar``, ``hf://datasets/org/name/data/x.parquet``,
``https://host/shard-0000.tar``, ``file:///data/x.tar``, or a ``pipe:`` command as webdataset
has them. Local paths are read with the standard library, as before; URLs through
`fsspec <https://filesystem-spec.readthedocs.io>`_, whose filesystems (``s3fs``, ``gcsfs``,
``aiohttp`` for http, ``adlfs``) are optional extras, imported only when a URL of theirs is
read (``pip install 'silverlabel[s3]'``, ``[gcs]``, ``[http]``, ``[azure]``; a clear error
says which when missing); ``hf://`` uses ``huggingface_hub``, a dependency already.

Nothing is downloaded whole: tables are streamed in record batches over a read-ahead file,
tars are indexed header by header (a forward seek past a large member skips it), and a
worker reads each tar member, parquet cell or image file with a ranged read of its own
(:func:`read_range`, :func:`read_capped`), so the driver moves no image bytes.

Credentials come from each filesystem's standard chain (environment variables, its config
files, instance roles, ``huggingface-cli login``), never from silverlabel's settings. Storage
options reach a filesystem through fsspec's environment configuration: ``FSSPEC_S3_ENDPOINT_URL``
(or ``FSSPEC_S3='{"endpoint_url": ...}'``), or botocore's own ``AWS_ENDPOINT_URL`` /
``AWS_ENDPOINT_URL_S3`` for an S3-compatible store (MinIO, Ceph, R2). What is recorded or
printed about a URL is :func:`public`: no ``user:password@``, no signing parameters.

``pipe:CMD`` runs CMD and reads its standard output, as webdataset does
(``pipe:curl -s https://host/shard-0000.tar``). The command is the user's by definition: it is
run through the shell (``shell=True``) because that is webdataset's documented meaning of a
``pipe:`` URL; it is only ever taken from a SOURCE the user typed, never from data (a URL
column, a listing, a manifest). A stream cannot be read by range, so its output is read once,
in order, into a local temporary file that lives until the process exits; the local engine's
workers read that file (a Ray cluster without a shared folder needs a URL instead).

    >>> is_remote("s3://bucket/x.parquet"), is_remote("/data/x.parquet"), is_remote("pipe:cat x.tar")
    (True, False, True)
    >>> public("https://me:secret@host/a.tar?X-Amz-Signature=abc&X-Amz-Credential=AKIA&v=2")
    'https://host/a.tar?v=2'
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable
from typing import Any, BinaryIO
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from silverlabel.errors import UserError

PIPE = "pipe:"
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
#: a URL in free text; trailing punctuation (``: 403``, a full stop) is not part of it
_URL_IN_TEXT_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]*[^\s'\"<>.,:;)\]]")
#: query parameters that carry a secret or a signature (dropped from every recorded URL)
_SECRET_PARAMS = frozenset({"signature", "sig", "token", "access_token", "key", "api_key", "apikey", "password",
                            "secret", "client_secret", "awsaccesskeyid", "googleaccessid", "expires", "se", "sp",
                            "sv", "sr", "st", "spr", "skoid", "sktid", "skt", "ske", "sks", "skv"})
_SECRET_PREFIXES = ("x-amz-", "x-goog-")
#: the package each filesystem needs, and the silverlabel extra that brings it
_INSTALL = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"),
            "hf": ("huggingface_hub", None), "http": ("aiohttp", "http"), "https": ("aiohttp", "http"),
            "az": ("adlfs", "azure"), "abfs": ("adlfs", "azure"), "abfss": ("adlfs", "azure")}
#: what a table or tar index reads ahead per request (one GET streams this much)
READ_AHEAD = 8 << 20
#: how long a worker trusts a remote file's size and etag before asking again
_INFO_TTL = 60.0


def scheme(path: str | os.PathLike) -> str | None:
    """The URL scheme of ``path`` (``s3``, ``https``, ``pipe``), lower-cased; None for a
    local path."""
    s = str(path)
    if s.startswith(PIPE):
        return "pipe"
    m = _SCHEME_RE.match(s)
    return m.group(1).lower() if m else None


def is_pipe(path: str | os.PathLike) -> bool:
    """True for a ``pipe:CMD`` input."""
    return str(path).startswith(PIPE)


def is_remote(path: str | os.PathLike) -> bool:
    """True for anything not read with ``open()``: a URL other than ``file://``, or ``pipe:``."""
    s = scheme(path)
    return s is not None and s not in ("file", "local")


def local_path(path: str | os.PathLike) -> str:
    """``file:///data/x.tar`` -> ``/data/x.tar``; any other path as it is."""
    s = str(path)
    return s[len("file://"):] if s.lower().startswith("file://") else s


def public(url: str) -> str:
    """``url`` as recorded and printed: without ``user:password@`` and without query
    parameters that sign or authorise it (``X-Amz-*``, ``X-Goog-*``, ``sig``, ``token``, ...);
    URLs inside a ``pipe:`` command are cleaned the same way.

    >>> public("s3://bucket/meta.parquet")
    's3://bucket/meta.parquet'
    >>> public("pipe:curl -s https://u:p@h/x.tar?token=T")
    'pipe:curl -s https://h/x.tar'
    """
    if is_pipe(url):
        return scrub_text(url)
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1] if "@" in parts.netloc else parts.netloc
    query = parts.query
    if query:
        kept = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True)
                if k.lower() not in _SECRET_PARAMS and not k.lower().startswith(_SECRET_PREFIXES)]
        query = urlencode(kept)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def scrub_text(text: str) -> str:
    """``text`` (an error message, a command) with every URL in it made :func:`public`."""
    return _URL_IN_TEXT_RE.sub(lambda m: public(m.group(0)), text)


def _error(url: str, e: BaseException) -> str:
    why = str(e).splitlines()[0] if str(e) else type(e).__name__
    return scrub_text(f"{public(url)}: {why}")


# ---------------------------------------------------------------------------------------
# filesystems

_fs_lock = threading.Lock()


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for a URL; a UserError naming the package and the
    silverlabel extra to install when the filesystem's implementation is missing."""
    import fsspec
    from fsspec.core import url_to_fs

    proto = scheme(url) or "file"
    kwargs: dict[str, Any] = {}
    if proto in ("http", "https"):
        # HTTP(S)_PROXY / NO_PROXY as every other client honours them
        kwargs["client_kwargs"] = {"trust_env": True}
    try:
        with _fs_lock:
            return url_to_fs(url, **kwargs)
    except ImportError as e:
        pkg, extra = _INSTALL.get(proto, (getattr(e, "name", None) or "its fsspec implementation", None))
        hint = f"pip install 'silverlabel[{extra}]' (or pip install {pkg})" if extra else f"pip install {pkg}"
        raise UserError(f"{public(url)}: reading {proto}:// needs {pkg}: {hint}") from None
    except ValueError as e:
        if proto not in fsspec.available_protocols():
            raise UserError(f"{public(url)}: {proto}:// is not a filesystem fsspec knows "
                            f"(known: s3, gs, hf, http, https, file, ...)") from None
        raise UserError(_error(url, e)) from None


def _full(fs: Any, path: str, like: str) -> str:
    """A path the filesystem listed, as a URL of the same scheme as ``like``."""
    if scheme(like) in ("http", "https"):
        return path
    return fs.unstrip_protocol(path) if "://" not in path else path


def _remote_call(url: str, fn, *args, **kwargs):
    """``fn(*args)`` with the errors of remote filesystems (botocore, aiohttp, ...) turned
    into OSError with the URL made public."""
    try:
        return fn(*args, **kwargs)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        raise type(e)(_error(url, e)) from None
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - botocore, aiohttp, google.auth: all become OSError
        raise OSError(_error(url, e)) from None


def _http_exists(path: str) -> bool:
    """An http(s) URL answers a HEAD (fsspec's own check is a GET, which would start
    sending the whole file)."""
    try:
        info(path, fresh=False)
        return True
    except FileNotFoundError:
        return False


def exists(path: str) -> bool:
    """Whether a file or folder (an object or a prefix) exists at ``path``."""
    if not is_remote(path):
        return os.path.exists(local_path(path))
    if is_pipe(path):
        return True
    if scheme(path) in ("http", "https"):
        return _http_exists(path)
    fs, p = filesystem(path)
    return bool(_remote_call(path, fs.exists, p))


def isfile(path: str) -> bool:
    """Whether ``path`` is a file (an object)."""
    if not is_remote(path):
        return os.path.isfile(local_path(path))
    if is_pipe(path):
        return True
    try:  # a listing made moments ago already knows (see :func:`info`)
        return info(path, fresh=False)["type"] == "file"
    except FileNotFoundError:
        return False


def isdir(path: str) -> bool:
    """Whether ``path`` is a folder (an object store: a prefix with objects under it).
    An http(s) URL is never a folder."""
    if not is_remote(path):
        return os.path.isdir(local_path(path))
    if is_pipe(path) or scheme(path) in ("http", "https"):
        return False
    fs, p = filesystem(path)
    return bool(_remote_call(path, fs.isdir, p.rstrip("/")))


def join(folder: str, name: str) -> str:
    """``folder/name`` for a local folder or a URL prefix."""
    if not is_remote(folder):
        return os.path.join(local_path(folder), name)
    return folder.rstrip("/") + "/" + name


def basename(path: str) -> str:
    """The last component of a path or URL (query and fragment dropped); for ``pipe:CMD``,
    that of the command's last word (``shard-0000.tar`` of ``pipe:curl -s URL/shard-0000.tar``)."""
    s = str(path)
    if is_pipe(s):
        words = s[len(PIPE):].split()
        s = words[-1] if words else "pipe"
    if scheme(s) is not None:
        s = urlsplit(s).path
    return os.path.basename(s.rstrip("/")) or "input"


def listdir(folder: str) -> list[tuple[str, bool]]:
    """(name, is_folder) of the entries of a folder or prefix, sorted by name; hidden
    entries (a leading dot) included, as :func:`os.listdir` does."""
    if not is_remote(folder):
        return sorted((e.name, e.is_dir()) for e in os.scandir(local_path(folder)))
    if scheme(folder) in ("http", "https") or is_pipe(folder):
        raise UserError(f"{public(folder)}: cannot list an http(s) or pipe: input; name its files, or a brace "
                        "pattern over them ({00000..00009})")
    fs, p = filesystem(folder)
    p = p.rstrip("/")
    entries = _remote_call(folder, fs.ls, p, detail=True)
    out = set()
    for e in entries:
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        if name and e["name"].rstrip("/") != p:
            out.add((name, e.get("type") == "directory"))
            _remember(join(folder, name), e)
    return sorted(out)


def walk_files(folder: str) -> list[str]:
    """Every file under a remote prefix (recursively), as paths relative to it, sorted."""
    fs, p = filesystem(folder)
    p = p.rstrip("/")
    found = _remote_call(folder, fs.find, p, detail=True)
    rels = []
    for f, d in found.items():
        if f.startswith(p + "/"):
            rels.append(f[len(p) + 1:])
            _remember(join(folder, rels[-1]), d)
    return sorted(rels)


#: a pattern naming more files than this in one folder lists the folder once, rather than
#: asking for each file
PREFETCH_MIN = 16


def prefetch(paths: list[str]) -> None:
    """Learn the sizes and versions of many remote files with one listing per folder
    (where more than :data:`PREFETCH_MIN` of them share it) instead of a request per file;
    :func:`isfile`, :func:`info` and :func:`content_digest` then answer from it."""
    by_folder: dict[str, int] = {}
    for p in paths:
        if is_remote(p) and not is_pipe(p) and scheme(p) not in ("http", "https") and "/" in p.split("://", 1)[1]:
            folder = p.rsplit("/", 1)[0]
            by_folder[folder] = by_folder.get(folder, 0) + 1
    for folder, n in by_folder.items():
        if n > PREFETCH_MIN:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                listdir(folder)


def has_glob(path: str) -> bool:
    """Whether a remote path holds glob characters (``*``, ``?``, ``[``)."""
    return is_remote(path) and not is_pipe(path) and scheme(path) not in ("http", "https") and any(
        c in urlsplit(path).path for c in "*?[")


def glob(pattern: str) -> list[str]:
    """The files a remote glob pattern names (``s3://b/meta/*.parquet``), sorted, as URLs."""
    fs, p = filesystem(pattern)
    found = _remote_call(pattern, fs.glob, p, detail=True)
    out = []
    for f, d in found.items():
        if d.get("type") != "directory":
            out.append(_full(fs, f, pattern))
            _remember(out[-1], d)
    return sorted(out)


# ---------------------------------------------------------------------------------------
# identity

_info_cache: dict[str, tuple[float, dict[str, Any]]] = {}


#: at most this many remembered answers (a listing of a large prefix fills it)
_INFO_CACHE_MAX = 1 << 20
_VERSION_KEYS = ("ETag", "etag", "md5", "Content-MD5", "Digest", "crc32c", "blob_id", "LastModified", "Last-Modified",
                 "last_modified", "mtime", "updated")


def _remember(path: str, d: dict[str, Any]) -> dict[str, Any]:
    """Keep what a filesystem said about ``path`` (from ``info``, or an entry of a listing)."""
    version = next((str(d[k]) for k in _VERSION_KEYS if d.get(k)), "")
    out = {"size": int(d.get("size") or 0), "version": version.strip('"'),
           "type": "directory" if d.get("type") == "directory" else "file"}
    _info_cache[path] = (time.monotonic(), out)
    if len(_info_cache) > _INFO_CACHE_MAX:
        _info_cache.pop(next(iter(_info_cache)))
    return out


def forget(path: str | None = None) -> None:
    """Drop what listings taught about files (this module's answers, and the listing cache
    of ``path``'s filesystem): called when a source is opened, so every run sees the store
    as it is now, never as an earlier run in this process saw it."""
    _info_cache.clear()
    if path is not None and is_remote(path) and not is_pipe(path):
        with contextlib.suppress(UserError):
            filesystem(path)[0].invalidate_cache()


def forget_one(path: str) -> None:
    """Drop what is known of one remote file (its remembered info, its filesystem's listing
    cache of its folder): after this process wrote or deleted it."""
    _info_cache.pop(path, None)
    if is_remote(path) and not is_pipe(path):
        with contextlib.suppress(UserError):
            fsys, p = filesystem(path)
            fsys.invalidate_cache(p)


def info(path: str, fresh: bool = True) -> dict[str, Any]:
    """``{"size": int, "version": str, "type": "file"|"directory"}`` of a path: the version
    is its ETag, else its checksum or modification time, whatever the filesystem reports
    (``""`` when none). ``fresh=False`` trusts an answer up to a minute old, from a listing
    (:func:`listdir`, :func:`glob`, :func:`walk_files`) or an earlier call, so a source
    listed once costs no request per file. FileNotFoundError when nothing is there."""
    now = time.monotonic()
    if not fresh:
        hit = _info_cache.get(path)
        if hit is not None and now - hit[0] < _INFO_TTL:
            return hit[1]
    if not is_remote(path):
        st = os.stat(local_path(path))
        return {"size": st.st_size, "version": str(st.st_mtime_ns), "type": "directory" if os.path.isdir(
            local_path(path)) else "file"}
    fs, p = filesystem(path)
    return _remember(path, _remote_call(path, fs.info, p))


def content_digest(paths: Iterable[str]) -> str:
    """``sha256:HEX`` over remote files' public names, sizes and versions (ETags): what
    tells a changed input from the one a run began with, without reading it (the answers of
    the listing that found the files, when there was one)."""
    h = hashlib.sha256()
    for p in paths:
        if is_pipe(p):
            h.update(f"{public(p)}\n".encode())
            continue
        i = info(p, fresh=False)
        h.update(f"{public(p)}\0{i['size']}\0{i['version']}\n".encode())
    return "sha256:" + h.hexdigest()


# ---------------------------------------------------------------------------------------
# reading


def open_input(path: str, read_ahead: int = READ_AHEAD) -> BinaryIO:
    """A binary file to read ``path`` from: local files with ``open()``; remote ones as a
    seekable file that fetches ``read_ahead`` bytes per request (0: each read is one ranged
    request of its own, for a reader that knows its byte ranges, as pyarrow's parquet reader
    does); ``pipe:`` output from its local copy (:func:`pipe_copy`)."""
    if is_pipe(path):
        return open(pipe_copy(path), "rb")
    if not is_remote(path):
        return open(local_path(path), "rb")
    fs, p = filesystem(path)
    size = info(path, fresh=False)["size"] or None  # known from the listing: no request to open
    if read_ahead <= 0:
        return _remote_call(path, fs.open, p, "rb", cache_type="none", size=size)
    return _remote_call(path, fs.open, p, "rb", block_size=read_ahead, cache_type="readahead", size=size)


def readable(path: str) -> str | BinaryIO:
    """What pyarrow's readers take for ``path``: the local path itself, else an open file
    (:func:`open_input`; the caller closes it)."""
    if not is_remote(path):
        return local_path(path)
    return open_input(path)


def read_range(path: str, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset``: one ranged read (a local ``pread``, a remote
    ``Range`` request). OSError when fewer bytes are there (a truncated file)."""
    if is_pipe(path):
        path = pipe_copy(path)
    if not is_remote(path):
        with open(local_path(path), "rb") as f:
            data = os.pread(f.fileno(), size, offset) if size else b""
    else:
        fs, p = filesystem(path)
        data = _remote_call(path, fs.cat_file, p, start=offset, end=offset + size) if size else b""
    if len(data) != size:
        raise OSError(f"truncated: wanted {size} bytes at {offset}, got {len(data)}")
    return data


def read_capped(path: str, max_bytes: int | None) -> bytes:
    """A remote file's bytes, at most ``max_bytes`` (one request for at most one byte more:
    OSError when the file is larger)."""
    fs, p = filesystem(path)
    if max_bytes is None:
        return _remote_call(path, fs.cat_file, p)
    data = _remote_call(path, fs.cat_file, p, start=0, end=max_bytes + 1)
    if len(data) > max_bytes:
        raise OSError(f"file larger than the byte cap of {max_bytes} (--max-bytes)")
    return data


# ---------------------------------------------------------------------------------------
# pipe:

_pipe_dir: str | None = None
_pipe_copies: dict[str, str] = {}
_pipe_lock = threading.Lock()


def pipe_copy(url: str) -> str:
    """The local copy of a ``pipe:CMD`` input's output, made on first use in this process
    (CMD run through the shell, as webdataset runs it; a non-zero exit is a UserError with
    its last lines of stderr). The copy is named after the command's last word and removed
    when the process exits."""
    global _pipe_dir
    with _pipe_lock:
        done = _pipe_copies.get(url)
        if done is not None and os.path.exists(done):
            return done
        if _pipe_dir is None:
            _pipe_dir = tempfile.mkdtemp(prefix="silverlabel-pipe-")
            atexit.register(shutil.rmtree, _pipe_dir, True)
        folder = os.path.join(_pipe_dir, str(len(_pipe_copies)))
        os.makedirs(folder)
        dest = os.path.join(folder, basename(url))
        cmd = url[len(PIPE):].strip()
        if not cmd:
            raise UserError("pipe: needs a command (pipe:curl -s https://host/shard-0000.tar)")
        with open(dest, "wb") as out, tempfile.TemporaryFile() as err:
            # shell=True: a pipe: URL is a shell command by webdataset's definition, typed by the user
            proc = subprocess.run(cmd, shell=True, stdout=out, stderr=err, stdin=subprocess.DEVNULL)  # noqa: S602
            err.seek(0)
            tail = err.read()[-2000:].decode("utf-8", "replace").strip()
        if proc.returncode != 0:
            with contextlib.suppress(OSError):
                os.unlink(dest)
            raise UserError(scrub_text(f"{url}: the command exited with status {proc.returncode}"
                                       + (f": {tail.splitlines()[-1]}" if tail else "")))
        _pipe_copies[url] = dest
        return dest


__all__ = [
    "basename",
    "content_digest",
    "exists",
    "filesystem",
    "forget",
    "forget_one",
    "glob",
    "has_glob",
    "info",
    "is_pipe",
    "is_remote",
    "isdir",
    "isfile",
    "join",
    "listdir",
    "local_path",
    "open_input",
    "pipe_copy",
    "prefetch",
    "public",
    "read_capped",
    "read_range",
    "readable",
    "scheme",
    "scrub_text",
    "walk_files",
]
