"""``silverlabel ingest``: URL tables, folders and tar shards -> WebDataset shards + samples table.

The unit of work is one output shard: :func:`ingest_shard` takes the items of shard ``i``
(consecutive input rows), fetches or reads them on a thread pool, runs the image kernel,
and writes ``shards/{name}-{i:06d}.tar``, then ``samples/{name}-{i:06d}.parquet``, then
the shard's commit record ``.done/{name}-{i:06d}.json`` (:class:`silverlabel.stage.Commit`:
the hash of its input items, the size and md5 of both files), so a shard is complete only
when its record matches. It is a pure function of (unit, config): an engine can run it
anywhere, and a rerun after a crash redoes exactly the incomplete shards; ``label`` binds
its units to the recorded md5s, so a shard re-fetched by ``--retry-failed`` is relabeled.

    >>> from silverlabel.stages.ingest import IngestConfig, run_ingest   # doctest: +SKIP
    >>> summary = run_ingest(IngestConfig(sources=("urls.parquet",), output="ds"))  # doctest: +SKIP
    >>> summary.counts["success"]  # doctest: +SKIP
    280
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow.parquet as pq

from silverlabel import __version__, fs
from silverlabel.dataset import Pool, atomic_write, input_name, make_identity, open_read, parquet_source, records_digest
from silverlabel.engine import Engine, Report
from silverlabel.errors import UserError
from silverlabel.formats.tables import samples_table, write_parquet_atomic
from silverlabel.formats.wds import HashingFile, ShardWriter
from silverlabel.imageops import ImageConfig, process_image
from silverlabel.options import cpu_count, engine_field, nested, opt, positive_int, ray_address_field
from silverlabel.sources import KIND_URL, Item, SourceOptions, load_bytes, open_source
from silverlabel.sources.http import FetchConfig, Fetcher
from silverlabel.stage import BaseStage, Commit, StageRun, changed_settings, run_stage

STATUS_INVALID = "invalid_input"
STATUS_FAILED_DOWNLOAD = "failed_download"
STATUS_FAILED_READ = "failed_read"
#: Statuses that ``--retry-failed`` re-attempts (transient by nature).
RETRYABLE = (STATUS_FAILED_DOWNLOAD,)


@dataclass(frozen=True)
class IngestConfig:
    """Everything ``ingest`` needs. Options under ``runtime`` do not change the output."""

    sources: tuple[str, ...] = opt(help="URL table file/folder, image folder, or tar shards", positional=True,
                                   nargs="+", metavar="SOURCE")
    output: str = opt(help="dataset directory to write", short="-o", metavar="DATASET", required=True)
    name: str = opt("data", "shard name prefix")
    samples_per_shard: int = opt(10_000, "", type=positive_int, metavar="N")
    image: ImageConfig = nested(ImageConfig)
    fetch: FetchConfig = nested(FetchConfig)
    source_options: SourceOptions = nested(SourceOptions)
    # runtime: how fast, not what
    workers: int = opt(default_factory=cpu_count, help="processes", type=positive_int, group="run",
                       default_help="cores; with --engine ray: the cluster's CPUs", auto_workers="cpu")
    threads: int = opt(64, "concurrent fetches per process", type=positive_int, group="run")
    decode_threads: int = 2
    retry_failed: bool = opt(False, "re-attempt failed downloads of finished shards", action="store_true", group="run")
    engine: str = engine_field()  # local | ray
    ray_address: str | None = ray_address_field()  # None (this machine's cluster), auto, ray://host:port
    extra_fields: tuple = ()  # filled from the sources (typed --keep-cols)

    def __post_init__(self) -> None:
        if not self.sources:
            raise UserError("ingest needs at least one SOURCE")
        if self.samples_per_shard < 1:
            raise UserError(f"--samples-per-shard must be >= 1, got {self.samples_per_shard}")
        if self.threads < 1 or self.decode_threads < 1:
            raise UserError("--threads and --decode-threads must be >= 1")
        if not self.name or any(c in self.name for c in "/\\.{} "):
            raise UserError(f"--name {self.name!r}: use letters, digits, '-' or '_'")

    def output_config(self) -> dict[str, Any]:
        """The settings that determine the output; a resumed run must match them."""
        fetch = asdict(self.fetch)
        for k in ("retries", "backoff", "max_retry_after", "per_host", "dns_ttl", "proxy", "no_proxy", "proxy_env"):
            fetch.pop(k, None)  # how hard/fast and by which route we fetch, not what we store
        return {
            "sources": list(self.sources),
            "name": self.name,
            "samples_per_shard": self.samples_per_shard,
            "image": asdict(self.image),
            "fetch": fetch,
            "source_options": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.source_options).items()},
        }


@dataclass
class IngestUnit:
    """One output shard's worth of input items."""

    shard: int
    items: list[Item]
    retry: bool = False
    commit: Commit | None = None  # written last: the shard is done


@dataclass
class ShardResult:
    shard: int
    counts: dict[str, int]
    items: int
    seconds: float
    bytes_written: int


@dataclass
class IngestSummary:
    output: str
    counts: dict[str, int]  # over the whole dataset
    shards: int
    shards_done_now: int
    shards_skipped: int
    items_now: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.items_now / self.seconds if self.seconds > 0 else 0.0


def key_for(index: int) -> str:
    """Deterministic sample key from the global input position: ``000001234``."""
    return f"{index:09d}"


# ---------------------------------------------------------------------------------------
# the unit function


def _row_base(item: Item, shard_name: str) -> dict[str, Any]:
    return {
        "key": key_for(item.index),
        "uid": item.uid,
        "id": item.id if item.id is not None else item.index,
        "url": item.url,
        "caption": item.caption,
        "shard": shard_name,
        "source": item.source,
        "label": item.label,
        **(item.extra or {}),
    }


def _json_member(row: dict[str, Any], extra_names: list[str]) -> bytes:
    meta = {
        k: row.get(k)
        for k in ("key", "uid", "id", "url", "caption", "source", "label", "width", "height",
                  "original_width", "original_height", "sha256", "imagehash", *extra_names)
    }
    return json.dumps(meta, ensure_ascii=False, sort_keys=False, default=str).encode()


class _Spool:
    """Finished JPEGs of a shard, kept until the tar is written in input order (each as soon
    as every sample before it is written: those that finished out of order wait here).

    Held in memory up to ``budget`` bytes (a shard of a few hundred web images is tens of
    MB), then appended to a temp file, so a shard of any size never holds its images in
    memory and a small one never writes them to disk twice."""

    def __init__(self, folder: Path, tag: str, budget: int = 128 << 20):
        self.folder, self.tag, self.budget = folder, tag, budget
        self.memory: list[bytes] = []
        self.held = 0
        self.f: BinaryIO | None = None
        self.path: Path | None = None
        self.lock = threading.Lock()

    def put(self, data: bytes) -> tuple[int, int]:
        """Keep ``data``; returns where: (-1, index) in memory, else (offset, size) in the file."""
        with self.lock:
            if self.held + len(data) <= self.budget:
                self.memory.append(data)
                self.held += len(data)
                return -1, len(self.memory) - 1
            if self.f is None:
                self.folder.mkdir(parents=True, exist_ok=True)
                self.path = self.folder / f"spool-{self.tag}-{os.getpid()}-{threading.get_ident()}"
                self.f = open(self.path, "w+b")
            off = self.f.seek(0, os.SEEK_END)
            self.f.write(data)
            return off, len(data)

    def take(self, loc: tuple[int, int]) -> bytes:
        """The data kept at ``loc``, once: held in memory, it is let go (its bytes no longer
        count against the budget)."""
        with self.lock:
            if loc[0] < 0:
                data = self.memory[loc[1]]
                self.memory[loc[1]] = b""
                self.held -= len(data)
                return data
            assert self.f is not None
            self.f.seek(loc[0])
            return self.f.read(loc[1])

    def close(self) -> None:
        self.memory.clear()
        if self.f is not None:
            self.f.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def _previous_results(ds: Pool, cfg: IngestConfig, shard: int) -> tuple[dict[str, dict], dict[str, dict[str, bytes]]]:
    """Rows and stored members of a finished shard (for --retry-failed)."""
    from silverlabel.formats.wds import iter_tar_samples, read_member

    rows = {r["key"]: r for r in pq.ParquetFile(parquet_source(ds.samples_path(cfg.name, shard))).read().to_pylist()}
    members: dict[str, dict[str, bytes]] = {}
    with open_read(ds.shard_path(cfg.name, shard)) as f:  # a pool at a URL: read from the store
        for s in list(iter_tar_samples(f)):
            members[s.key] = {ext: read_member(f, *loc) for ext, loc in s.members.items()}
    return rows, members


_FETCHERS: dict[FetchConfig, Fetcher] = {}
_FETCHERS_LOCK = threading.Lock()


def _process_fetcher(cfg: FetchConfig) -> Fetcher:
    """One Fetcher per process and FetchConfig, shared by the units this process runs, so
    keep-alive connections and the DNS cache outlive a shard; closed at exit."""
    with _FETCHERS_LOCK:
        fetcher = _FETCHERS.get(cfg)
        if fetcher is None:
            if not _FETCHERS:
                atexit.register(_close_fetchers)
            fetcher = _FETCHERS[cfg] = Fetcher(cfg)
        return fetcher


def _close_fetchers() -> None:
    with _FETCHERS_LOCK:
        fetchers = list(_FETCHERS.values())
        _FETCHERS.clear()
    for f in fetchers:
        f.close()


def ingest_shard(unit: IngestUnit, cfg: IngestConfig, report: Report | None = None) -> ShardResult:
    """Produce shard ``unit.shard``: its tar and its samples table, atomically.

    Every item becomes exactly one row, whatever happens to it. Idempotent: running it
    twice gives byte-identical files.
    """
    t0 = time.monotonic()
    report = report or (lambda d, s: None)
    ds = Pool(cfg.output)
    shard_name = ds.shard_path(cfg.name, unit.shard).name
    extra_names = [f.name for f in cfg.extra_fields]
    previous_rows: dict[str, dict] = {}
    previous_members: dict[str, dict[str, bytes]] = {}
    if unit.retry:
        previous_rows, previous_members = _previous_results(ds, cfg, unit.shard)

    decode_gate = threading.Semaphore(cfg.decode_threads)
    needs_fetch = any(it.kind == KIND_URL and it.error is None for it in unit.items)
    fetcher = _process_fetcher(cfg.fetch) if needs_fetch else None
    spool = _Spool(ds.tmp_dir, f"{cfg.name}-{unit.shard:06d}")

    def work(item: Item) -> tuple[dict[str, Any], dict[str, Any] | None]:
        row = _row_base(item, shard_name)
        if item.error:
            row.update(status=item.status or STATUS_INVALID, error=item.error)
            return row, None
        if item.kind == KIND_URL:
            fr = fetcher.fetch(item.url)
            if fr.status != "success":
                row.update(status=fr.status, error=fr.error)
                return row, None
            raw = fr.data
        else:
            try:
                raw = load_bytes(item, cfg.fetch.max_bytes)
            except OSError as e:
                row.update(status=STATUS_FAILED_READ, error=f"{type(e).__name__}: {e}")
                return row, None
        with decode_gate:
            res = process_image(raw, cfg.image)
        del raw
        row.update(
            status=res.status,
            error=res.error,
            width=res.width,
            height=res.height,
            original_width=res.original_width,
            original_height=res.original_height,
            sha256=res.sha256,
            imagehash=res.imagehash,
        )
        if res.status != "success":
            return row, None
        return row, {"jpg": spool.put(res.data)}

    rows: list[dict[str, Any] | None] = [None] * len(unit.items)
    stored: list[dict[str, Any] | None] = [None] * len(unit.items)
    todo: list[int] = []
    for pos, item in enumerate(unit.items):
        prev = previous_rows.get(key_for(item.index))
        if prev is not None and prev["status"] not in RETRYABLE:
            rows[pos] = prev
            if prev["status"] == "success":
                stored[pos] = {"prev": previous_members.get(prev["key"], {})}
            report(1, int(prev["status"] == "success"))
        else:
            todo.append(pos)

    tar_path = ds.shard_path(cfg.name, unit.shard)
    try:
        # The tar is written in input order while the shard is still being fetched: each
        # sample as soon as it and every one before it is done (the same bytes as writing
        # them all at the end, without a serial write after the last fetch).
        with atomic_write(tar_path) as f:
            hf = HashingFile(f)
            with ShardWriter(hf) as writer:
                written = 0  # rows[:written] are in the tar

                def write_ready() -> None:
                    nonlocal written
                    while written < len(rows) and rows[written] is not None:
                        row, st = rows[written], stored[written]
                        if st is not None:
                            if "prev" in st:
                                members = st["prev"]
                            else:
                                members = {"jpg": spool.take(st["jpg"]), "json": _json_member(row, extra_names)}
                                if row.get("caption") is not None:
                                    members["txt"] = str(row["caption"]).encode()
                            writer.write(row["key"], members)
                            stored[written] = None
                        written += 1

                write_ready()  # the rows a --retry-failed keeps
                with ThreadPoolExecutor(max_workers=min(cfg.threads, max(1, len(todo)))) as ex:
                    window = max(2 * cfg.threads, 8)
                    pending: dict[Future, int] = {}
                    # each finished future lands here: O(1) per item, where concurrent.futures.wait
                    # locks and unlocks every pending future (up to the window, 128) on each call
                    finished: queue.SimpleQueue[Future] = queue.SimpleQueue()
                    it = iter(todo)
                    while True:
                        for pos in it:
                            fut = ex.submit(work, unit.items[pos])
                            pending[fut] = pos
                            fut.add_done_callback(finished.put)
                            if len(pending) >= window:
                                break
                        if not pending:
                            break
                        fut = finished.get()
                        pos = pending.pop(fut)
                        rows[pos], stored[pos] = fut.result()
                        report(1, int(rows[pos]["status"] == "success"))
                        if pos == written:
                            write_ready()
                write_ready()
            f.flush()
            tar_bytes = f.tell()
    finally:
        spool.close()

    table = samples_table(rows, list(cfg.extra_fields))
    samples_path = ds.samples_path(cfg.name, unit.shard)
    write_parquet_atomic(table, samples_path, metadata={"silverlabel.version": __version__})
    counts = Counter(r["status"] for r in rows)
    if unit.commit is not None:
        unit.commit.write([tar_path, samples_path], info={"counts": dict(counts)}, md5={str(tar_path): hf.md5.hexdigest()})
    return ShardResult(unit.shard, dict(counts), len(rows), time.monotonic() - t0, tar_bytes)


# ---------------------------------------------------------------------------------------
# the driver


def _items_identity(items: list[Item]) -> str:
    """sha256 over a unit's input items: a shard is redone when its items changed."""
    h = hashlib.sha256()
    names = [f.name for f in fields(Item)]
    for it in items:  # where a local input lies is no part of it (its source locator is)
        # the fields in order, as dataclasses.astuple gives them (the same JSON), without its deep copies
        row = [None if name == "path" else getattr(it, name) for name in names]
        h.update(json.dumps(row, default=str).encode() + b"\n")
    return h.hexdigest()


def _cfg_source(cfg: IngestConfig, i: int) -> str:
    """The ``i``-th SOURCE for an error message: a URL or ``pipe:`` without credentials or
    signatures (:func:`silverlabel.fs.public`), a local path made absolute."""
    if i >= len(cfg.sources):
        return "?"
    s = cfg.sources[i]
    return fs.public(s) if fs.is_remote(s) else os.path.abspath(s)


def _published(source: Any) -> dict[str, Any]:
    """A source's ``parents`` entry: its ``describe()`` with the path replaced by its name
    (:func:`silverlabel.dataset.input_name`: a URL as given, a local file by its bytes, a local
    folder or pattern by its files' names and sizes)."""
    d = source.describe()
    where = d.pop("path", None) or getattr(source, "path", None)
    name = d.pop("name", None)  # a remote source names itself (its public URL; see sources.describe_location)
    return {**d, "name": name or input_name(where, getattr(source, "files", None))}


def dataset_counts(pool: Pool, units: list[str] | None = None) -> tuple[dict[str, int], int]:
    """Counts by status over all completed samples tables (``units``: those of these units,
    by name), and the number of shards."""
    counts: Counter[str] = Counter()
    files = pool.samples_files() if units is None else [pool.samples_dir / f"{u}.parquet" for u in units]
    for p in files:
        counts.update(pool.statuses(p))
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])), len(files)


def known_length(source: Any) -> int | None:
    """How many inputs ``source`` yields, when that is known without reading it: a parquet
    table's row count (from its footers), a folder's image count (a listing); None for
    CSV/TSV/JSONL tables and tar streams, whose length is known only once read.

        >>> import tempfile, pyarrow as pa
        >>> from silverlabel.sources.tables import TableSource
        >>> d = tempfile.mkdtemp()
        >>> pq.write_table(pa.table({"url": ["http://a/1.jpg", "http://a/2.jpg"]}), d + "/t.parquet")
        >>> known_length(TableSource(d + "/t.parquet", SourceOptions()))
        2
    """
    fn = getattr(source, "known_length", None)  # TableSource, FolderSource (local or remote)
    return fn() if fn is not None else None


class IngestStage(BaseStage):
    """``ingest`` for :func:`silverlabel.stage.run_stage`: one unit per output shard, cut
    from the sources as they stream (a 700M-row table is never held as units)."""

    unit_fn = staticmethod(ingest_shard)

    def prepare(self) -> None:
        # Validate the sources up front so bad input fails before any file is written.
        cfg, pool = self.config, self.output
        self.sources = [open_source(s, cfg.source_options) for s in cfg.sources]
        extra: dict[str, Any] = {}
        for src in self.sources:
            for f in src.extra_fields:
                extra.setdefault(f.name, f)
        if list(extra.values()) != list(cfg.extra_fields):
            self.config = cfg = replace(cfg, extra_fields=tuple(extra.values()))
        # each source named as the manifest publishes it: a URL as given, a file by its bytes
        self.parents = [_published(s) for s in self.sources]
        man = pool.previous_run("ingest")
        if man:
            self._check_same_sources(man)
        diffs = changed_settings(man.get("config", {}), cfg.output_config(), ignore=("sources",)) if man else []
        if diffs:
            raise UserError(
                f"{pool.location}: was ingested with different settings ({', '.join(diffs)}); "
                "resume with the same command or write to a new -o"
            )

    def _check_same_sources(self, man: dict[str, Any]) -> None:
        """A resume reads the same sources: compared by name (the manifest's ``parents``: a
        URL, a file's base name and content digest, a folder's base name and its files' names
        and sizes), so moved sources with the same bytes resume, and other files are refused
        (a file rewritten at the same size in a folder is not seen: see ``input_name``). (A
        manifest of an older version: by path.)"""
        def where(parent: Any, now: Any = None) -> str:
            if not isinstance(parent, dict):
                return repr(parent)
            if "name" not in parent and now is not None:  # an older manifest: the absolute path
                return f"{parent.get('kind')}:{os.path.abspath(now.path)}"
            content = f"@{parent['content']}" if parent.get("content") else ""  # a remote input's ETags
            return f"{parent.get('kind')}:{parent.get('name', parent.get('path'))}{content}"

        old = man.get("parents") or []
        before = [where(p) for p in old]
        now = [where(p, s if i < len(old) and isinstance(old[i], dict) and "name" not in old[i] else None)
               for i, (p, s) in enumerate(zip(self.parents, self.sources))]
        if before != now:
            i = next((i for i, (b, n) in enumerate(zip(before, now)) if b != n), None)
            shown = (f"{before[i]} before, {_cfg_source(self.config, i)} = {now[i]} now" if i is not None
                     else f"{len(before)} sources before, {len(now)} now")
            raise UserError(f"{self.output.location}: was ingested from other sources ({shown}); resume with the "
                            "same sources (the same bytes), or write to a new -o")

    def published_config(self) -> dict[str, Any]:
        """``output_config()`` as the manifest publishes it: the sources by their names."""
        return {**self.config.output_config(), "sources": [p["name"] for p in self.parents]}

    def manifest(self) -> dict[str, Any]:
        return {
            "stage": "ingest",
            "state": "running",
            "silverlabel_version": __version__,
            "name": self.config.name,
            "config": self.published_config(),
            "parents": self.parents,
            "counts": None,
        }

    def total(self) -> int | None:
        """The inputs, when every source knows its length (:func:`known_length`)."""
        lengths = [known_length(s) for s in self.sources]
        return None if None in lengths else sum(lengths)

    def plan(self, engine: Engine) -> Iterator[IngestUnit]:
        """Stream the sources in order and cut them into shard units."""
        cfg = self.config
        index = 0
        shard = 0
        batch: list[Item] = []
        for src in self.sources:
            for item in src.items():
                item.index = index
                index += 1
                batch.append(item)
                if len(batch) == cfg.samples_per_shard:
                    yield self._unit(shard, batch)
                    shard += 1
                    batch = []
        if batch:
            yield self._unit(shard, batch)

    def _unit(self, shard: int, items: list[Item]) -> IngestUnit:
        name = self.output.shard_path(self.config.name, shard).stem
        commit = Commit(str(self.output.commit_path(name)), self.config.output_config(),
                        {"items": _items_identity(items)})
        return IngestUnit(shard, items, commit=commit)

    def redo(self, unit: IngestUnit, record: dict[str, Any]) -> IngestUnit | None:
        """``--retry-failed``: a finished shard with failed downloads is fetched again."""
        if not self.config.retry_failed:
            return None
        statuses = self.output.statuses(self.output.samples_path(self.config.name, unit.shard))
        return replace(unit, retry=True) if any(s in RETRYABLE for s in statuses) else None

    def finish(self, run: StageRun) -> IngestSummary:
        pool = self.output
        by_name = run.planned if pool.url is not None else None  # a bucket: by name, never a listing
        counts, shards = dataset_counts(pool, by_name)
        manifest = self.manifest()
        labels = pool.read_manifest().get("labels")
        if labels:  # the labels written for this pool stay registered
            manifest["labels"] = labels
        manifest.update(state="complete", counts=counts, shards=shards, samples=sum(counts.values()))
        pool_id = make_identity("pool", {"config": manifest["config"], "parents": manifest["parents"],
                                         "content": records_digest(pool.root, by_name)})
        pool.write_manifest({"id": pool_id, **manifest})
        items_now = sum(r.items for r in run.results)
        return IngestSummary(pool.location, counts, shards, run.done_now, len(run.skipped), items_now, run.seconds)


def run_ingest(cfg: IngestConfig, progress: Report | None = None) -> IngestSummary:
    """Ingest ``cfg.sources`` into ``cfg.output``; resumes a previous partial run."""
    return run_stage(IngestStage(cfg, Pool(cfg.output)), progress)
