"""One skeleton for every stage: plan units, skip the done ones, run the rest, commit, index.

A stage (ingest, label, shard, reinforce; select can adopt it) is an object that says *what*
its units are and what it needs; :func:`run_stage` does the rest the same way for all:

1. ``stage.prepare()`` validates the input and checks that the output is this stage's, made
   with the same settings (a UserError otherwise) -- before any file is written;
2. the output folder is made, the temporaries a killed run left are removed, and the
   ``running`` manifest is written when the output is new (``stage.manifest()``);
3. ``stage.plan()`` yields the units; a unit whose :class:`Commit` record checks out is
   skipped (or handed back by ``stage.redo``, as ``ingest --retry-failed`` does);
4. the remaining units run on the engine that ``--engine`` names: a stage with
   ``needs_gpu`` gets workers that keep its model loaded, one per GPU (Ray: actors), so no
   stage names an engine;
5. the temporaries of units that died and were retried are removed, and ``stage.finish``
   writes the index files and the final manifest and returns the summary.

Progress: units ``report(done, ok)`` per item; a stage that knows its amount of work
before running says so with ``stage.total()`` (a parquet table's row count, a training
set's shard lengths) and ``stage.done_work(unit, record)`` (what a unit found done stands
for), so the bar (:class:`silverlabel.log.Progress`) has a total and an ETA for the work
left; :class:`BaseStage`'s defaults: no total, and a done unit's count from its record.
Skips and resumes are logged (``-v``).

"This unit is done" is recorded one way: the unit function writes its outputs atomically,
then, last, ``unit.commit.write(outputs)``: ``.done/{unit}.json`` next to the outputs,
holding a hash of the unit's config, the identity (bytes + md5) of each input, and the size and md5
of each output. :meth:`Commit.check` accepts a record only when the config and the inputs
are the same as now and every output still has its recorded size, so a unit whose input
changed (a shard re-fetched by ``ingest --retry-failed``) is stale and is redone. An input
written by an upstream unit takes its identity from that unit's record (no re-hashing);
any other input is hashed.

An output at a URL (``-o s3://bucket/pool``) is committed the same way, in an object store's
terms: the unit writes its files into this process's staging mirror of the URL
(:func:`silverlabel.dataset.stage_path`), each uploaded to its final name as it is closed
(one PUT each; no rename), then ``commit.write`` puts the record, last, and drops the staged
copies. ``check`` reads the record by its planned name (``.done/NAME.json``, never a listing,
which may lag) and asks the store for each output's size, so a killed run leaves nothing a
rerun trusts (its stray objects are overwritten when the unit is redone), and a rerun on
another machine needs nothing but the bucket.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "out.txt").write_bytes(b"hello")
    >>> c = Commit(str(d / ".done" / "u.json"), config={"k": 1}, inputs={})
    >>> c.check() is None
    True
    >>> c.write([d / "out.txt"])["outputs"]["out.txt"]["bytes"]
    5
    >>> c.check() is not None, Commit(c.path, config={"k": 2}, inputs={}).check()
    (True, None)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from silverlabel import __version__
from silverlabel.dataset import (Dataset, check_writable, clean_temporaries, display, file_digest, file_size,
                                 map_ordered, prefetch, put_bytes, read_bytes, stage_path, storage_error, url_of,
                                 write_json_atomic)
from silverlabel.errors import UserError
from silverlabel.engine import Engine, Report, stage_engine, unit_name
from silverlabel.log import set_total, skip

log = logging.getLogger(__name__)

#: in every output folder while a stage runs on it (:func:`output_lock`)
LOCK_FILE = ".lock"


def _as_stored(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples -> lists, ...), to compare with a record."""
    return json.loads(json.dumps(obj, default=str))


def config_hash(config: Any) -> str:
    """sha256 of a config as stored (canonical JSON): what a commit record keeps of it."""
    return hashlib.sha256(json.dumps(_as_stored(config), sort_keys=True).encode()).hexdigest()


def read_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """A commit record, or None when there is none (or it is unreadable: then not done); at a
    URL or staging path, read from the store."""
    try:
        rec = json.loads(read_bytes(path))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def recorded_output(record: Mapping[str, Any] | None, rel: str | os.PathLike) -> dict[str, Any] | None:
    """``{"bytes", "md5"}`` a commit record (as read: :func:`read_record`) lists for its
    output ``rel`` (relative to the folder above ``.done``); None when there is no record or
    it lists no such output with an integer size and an md5. The one reader of a record's
    outputs for whoever asks what a unit wrote: an input's identity (:func:`file_identity`),
    shard's source tars, verify's staleness checks.

        >>> recorded_output({"outputs": {"shards/a.tar": {"bytes": 3, "md5": "ab"}}}, Path("shards") / "a.tar")
        {'bytes': 3, 'md5': 'ab'}
        >>> recorded_output({"outputs": {"shards/a.tar": {"bytes": 3}}}, "shards/a.tar") is None
        True
    """
    outputs = (record or {}).get("outputs")
    out = outputs.get(Path(rel).as_posix()) if isinstance(outputs, dict) else None
    if not isinstance(out, dict) or type(out.get("bytes")) is not int or not isinstance(out.get("md5"), str) \
            or not out["md5"]:
        return None
    return {"bytes": out["bytes"], "md5": out["md5"]}


def file_identity(path: str | os.PathLike, record: str | os.PathLike | None = None) -> dict[str, Any]:
    """``{"bytes", "md5"}`` of an input file: from ``record`` (the commit record of the unit
    that wrote it) when that lists the file at its current size, else by reading the file.

    A FileNotFoundError when the file is missing. A URL or staging path is asked of the store."""
    path = Path(path) if url_of(path) is None else path
    size = file_size(path)
    if record is not None:
        with contextlib.suppress(ValueError):  # relpath: no relative path (another drive)
            out = recorded_output(read_record(record), os.path.relpath(path, Path(record).parent.parent))
            if out is not None and out["bytes"] == size:
                return out
    return {"bytes": size, "md5": file_digest(path, "md5")}


@dataclass
class Commit:
    """A unit's "done" record at ``path`` (``OUTPUT/.done/{unit}.json``, or ``.done`` in the
    folder the unit writes into). Outputs are named relative to the folder above ``.done``.

    ``config``: what determines the unit's output (a stage's ``output_config()`` plus what is
    particular to the unit); ``inputs``: name -> :func:`file_identity` (or any JSON value
    that changes when the input does)."""

    path: str
    config: Any
    inputs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # a record of an output at a URL is named by its URL, so any process (a worker, a
        # Ray node) maps it to its own staging folder
        url = url_of(self.path)
        if url is not None:
            self.path = url

    @property
    def url_root(self) -> str | None:
        """The URL of the folder above ``.done`` (None: a local output)."""
        return self.path.rsplit("/", 2)[0] if url_of(self.path) is not None else None

    @property
    def root(self) -> Path:
        """The folder above ``.done`` where the unit writes (for a URL: this process's staging)."""
        url = self.url_root
        return stage_path(url) if url is not None else Path(self.path).parent.parent

    def check(self) -> dict[str, Any] | None:
        """The record when the unit is done with this config and these inputs, else None."""
        rec = read_record(self.path)
        if (rec is None or rec.get("config_sha256") != config_hash(self.config)
                or rec.get("inputs") != _as_stored(self.inputs)):
            return None
        outputs = rec.get("outputs")
        if not isinstance(outputs, dict):
            return None
        url = self.url_root
        for rel, out in outputs.items():
            try:
                where = url + "/" + Path(rel).as_posix() if url is not None else self.root / rel
                if file_size(where) != out.get("bytes"):
                    return None
            except (OSError, AttributeError):
                return None
        return rec

    def write(self, outputs: Iterable[str | os.PathLike], info: Mapping[str, Any] | None = None,
              md5: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Record the unit as done, after its outputs are in place (the last thing a unit
        does). ``outputs``: the files, under :attr:`root` (recorded relative to it); ``md5``:
        digests already computed while writing, by the same paths (others are read back);
        ``info``: what the stage's index files need (counts, digests).

        For an output at a URL the outputs are the staged copies, already uploaded as they
        were closed (:func:`silverlabel.dataset.atomic_write`): the record is put last, then
        the staged copies are dropped (the staging folder is a cache, not a store)."""
        md5 = {str(k): v for k, v in (md5 or {}).items()}
        recorded: dict[str, Any] = {}
        outputs = [Path(p) for p in outputs]
        for p in outputs:
            rel = Path(os.path.relpath(p, self.root)).as_posix()
            recorded[rel] = {"bytes": os.path.getsize(p), "md5": md5.get(str(p)) or _local_digest(p)}
        rec = {"config_sha256": config_hash(self.config), "inputs": _as_stored(self.inputs), "outputs": recorded,
               "info": _as_stored(dict(info or {})), "silverlabel_version": __version__}
        if self.url_root is None:
            write_json_atomic(self.path, rec)
            return rec
        for rel, out in recorded.items():  # every output is in the store, whole, before its record
            if file_size(self.url_root + "/" + rel) != out["bytes"]:
                raise OSError(f"{display(self.url_root + '/' + rel)}: the store holds another size than was written")
        put_bytes(self.path, json.dumps(rec, indent=2, default=str).encode() + b"\n")
        for p in outputs:
            with contextlib.suppress(OSError):
                p.unlink()
        return rec


def _local_digest(path: Path) -> str:
    """The md5 of a file just written on this machine (a staged output: never the store's,
    which :func:`silverlabel.dataset.file_digest` would read for a staging path)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


class Unit(Protocol):
    """What :func:`run_stage` needs of a unit: its commit record."""

    commit: Commit


class Stage(Protocol):
    """What a stage tells :func:`run_stage` (see the module docstring).

    ``config`` carries the runtime fields every stage has: ``engine``, ``workers``,
    ``ray_address`` (and ``device`` when ``needs_gpu``). ``unit_fn`` is a picklable
    module-level function ``fn(unit, config, report) -> result`` that writes its outputs
    atomically and then ``unit.commit.write(...)``."""

    config: Any
    output: Dataset
    #: True: units run a model on a GPU when there is one; each worker keeps it loaded.
    needs_gpu: bool

    @property
    def unit_fn(self) -> Callable[[Any, Any, Report], Any]: ...

    def prepare(self) -> None:
        """Validate the input and check the output (UserError); write nothing."""

    def folders(self) -> list[Path]:
        """Where the units write (temporaries are cleaned there); beyond the output's own."""

    def manifest(self) -> dict[str, Any] | None:
        """The manifest to write when the output is new (None: this stage writes none then)."""

    def plan(self, engine: Engine) -> Iterable[Any]:
        """Every unit, done or not, in order (lazily: a unit is planned as the engine takes
        it). A plan that needs a pass of its own (shard locates its images) runs it on
        ``engine``."""

    def redo(self, unit: Any, record: dict[str, Any]) -> Any | None:
        """A done unit to run again anyway (None: skip it)."""

    def total(self) -> int | None:
        """The amount of work (progress units) when known before the plan runs, else None."""

    def done_work(self, unit: Any, record: dict[str, Any]) -> int:
        """The progress units a unit found done stands for (taken off the total)."""

    def finish(self, run: StageRun) -> Any:
        """Index files and the final manifest; returns the stage's summary."""


@dataclass
class StageRun:
    """What :func:`run_stage` hands to ``stage.finish``."""

    results: list[Any]  # unit results of this run, in completion order
    skipped: list[tuple[Any, dict[str, Any]]]  # (unit, its commit record) for units found done
    seconds: float
    device: str  # where the units computed ("cpu", "cuda", "ray (auto)")
    engine: Engine
    #: every unit's name (its commit record's, :func:`silverlabel.engine.unit_name`), in plan
    #: order: what an output at a URL indexes by name, never by a listing (which may lag)
    planned: list[str] = field(default_factory=list)

    @property
    def done_now(self) -> int:
        return len(self.results)


def run_stage(stage: Stage, progress: Report | None = None) -> Any:
    """Run ``stage`` (see the module docstring); returns ``stage.finish``'s summary.

    One run at a time per output (:func:`output_lock`). A full disk or a read-only output
    ends in a UserError naming the path, after the temporaries are removed."""
    if stage.output.url is not None:
        check_writable(stage.output.url)
    stage.prepare()
    cfg = stage.config  # as prepare completed it
    engine = stage_engine(cfg.engine, cfg.workers, address=getattr(cfg, "ray_address", None),
                          needs_gpu=stage.needs_gpu, device=getattr(cfg, "device", "auto"))  # bad --device: no file yet
    out = stage.output
    try:
        out.root.mkdir(parents=True, exist_ok=True)  # an output at a URL: this process's staging mirror
        with output_lock(out.root):
            return _run_locked(stage, engine, progress)
    except OSError as e:
        err = storage_error(e, out.root)
        if err is None:
            raise
        raise err from e


def _run_locked(stage: Stage, engine: Engine, progress: Report | None) -> Any:
    out, cfg = stage.output, stage.config
    folders = stage.folders()

    def clean() -> None:
        out.clean_temporaries()
        clean_temporaries(folders)

    clean()
    try:
        manifest = stage.manifest()
        if manifest is not None and not out.exists():
            out.write_manifest(manifest)
        skipped: list[tuple[Any, dict[str, Any]]] = []
        set_total(progress, stage.total())

        planned: list[str] = []

        def todo() -> Iterator[Any]:
            ahead = CHECK_AHEAD if out.url is not None else 1  # a store: its requests overlap
            plan = stage.plan(engine)
            if getattr(stage, "plan_ahead", 0):
                plan = prefetch(plan, stage.plan_ahead)
            for unit, rec in _checked(plan, ahead):
                planned.append(unit_name(unit))
                if rec is not None:
                    again = stage.redo(unit, rec)
                    if again is None:
                        skipped.append((unit, rec))
                        log.debug("%s: done before, skipped", unit_name(unit))
                        skip(progress, stage.done_work(unit, rec))
                        continue
                    log.debug("%s: done before, redone", unit_name(unit))
                    unit = again
                yield unit

        log.info("%s: running on %s (%s, %d worker%s)", out.location, type(engine).__name__, engine.device,
                 getattr(engine, "workers", 0), "" if getattr(engine, "workers", 0) == 1 else "s")
        t0 = time.monotonic()
        results = list(engine.map(stage.unit_fn, todo(), cfg, progress))
        seconds = time.monotonic() - t0
        if skipped:
            log.info("%s: resumed: %d unit%s found done, %d run now", out.location, len(skipped),
                     "" if len(skipped) == 1 else "s", len(results))
    except BaseException:
        with contextlib.suppress(OSError):  # what the failed units left (the lock says no other run writes here)
            clean()
        raise
    clean()  # what units that died and were retried (cluster engines) left behind
    summary = stage.finish(StageRun(results, skipped, seconds, engine.device, engine, planned))
    with contextlib.suppress(OSError):
        out.tmp_dir.rmdir()
    return summary


#: commit records checked at once ahead of the engine, for an output at a URL (each check is
#: a GET of the record and a HEAD per output: thousands of units resume in seconds, not minutes)
CHECK_AHEAD = 32


def _checked(units: Iterable[Any], ahead: int) -> Iterator[tuple[Any, dict[str, Any] | None]]:
    """``(unit, unit.commit.check())`` in plan order; with ``ahead > 1`` up to ``ahead`` checks
    at once (:func:`silverlabel.dataset.map_ordered`), units still pulled from the plan lazily."""
    return map_ordered(lambda unit: (unit, unit.commit.check()), units, ahead)


@contextlib.contextmanager
def output_lock(root: str | os.PathLike) -> Iterator[None]:
    """Hold ``root/.lock`` (``flock``, exclusive) while the block runs: a second run on the
    same output gets a UserError naming the holder's pid. The kernel releases the lock when
    its process exits, however it exits, so a killed run leaves no stale lock.

        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> with output_lock(d):  # doctest: +ELLIPSIS
        ...     with output_lock(d):
        ...         pass
        Traceback (most recent call last):
        ...
        silverlabel.errors.UserError: ...: in use by another silverlabel run (pid ...); wait for it to end or choose another output
    """
    import fcntl

    path = Path(root) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise UserError(f"{root}: in use by another silverlabel run (pid {holder}); "
                            "wait for it to end or choose another output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # a finished output carries no pid of this machine
    finally:
        os.close(fd)  # releases the lock


def changed_settings(old: Mapping[str, Any], new: Mapping[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """The settings of ``new`` (an ``output_config()``) that differ from ``old`` (as stored in
    a manifest): a resumed run must have none.

    >>> changed_settings({"seed": 0, "shards": [1]}, {"seed": 1, "shards": (1,)})
    ['seed']
    """
    new = _as_stored(new)
    return [k for k in new if k not in set(ignore) and old.get(k) != new[k]]


class BaseStage:
    """Defaults for the optional parts of :class:`Stage`."""

    needs_gpu = False
    #: units planned ahead on a thread of their own while the engine runs the one before
    #: (0: in the caller's thread). For plans whose units cost a read of their input (its
    #: md5) and run nothing on the engine themselves.
    plan_ahead = 0

    def __init__(self, config: Any, output: Dataset):
        self.config = config
        self.output = output

    def folders(self) -> list[Path]:
        return []

    def manifest(self) -> dict[str, Any] | None:
        return None

    def redo(self, unit: Any, record: dict[str, Any]) -> Any | None:
        return None

    def total(self) -> int | None:
        """The progress items (what units ``report`` as done) of all units, done or not, when
        the stage knows it before running (None: a rate, no total, is shown)."""
        return None

    def done_work(self, unit: Any, record: dict[str, Any]) -> int:
        """The progress items a unit found done stands for (taken off :meth:`total`): from its
        record's ``info``, ``samples``, else the sum of ``counts``, else ``rows`` plus
        ``decode_errors``; 0 when it has none of them."""
        info = record.get("info") or {}
        if isinstance(info.get("samples"), int):
            return info["samples"]
        if isinstance(info.get("counts"), dict):
            return sum(int(v) for v in info["counts"].values())
        if isinstance(info.get("rows"), int):
            return info["rows"] + int(info.get("decode_errors", 0))
        return 0
