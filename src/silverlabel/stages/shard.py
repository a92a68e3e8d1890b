"""``silverlabel shard``: a selection -> pre-shuffled WebDataset shards that timm and wids read.

::

    TRAINSET/
      silverlabel.json               manifest: stage "shard", config, parents, counts per split
      _info.json                     timm's wds reader: splits -> filenames, shard_lengths (written last)
      {name}-{split}.wids.json       wids shard index per split (url, nsamples, filesize, md5sum)
      classes.json                   copy of the selection's class map
      {name}-{split}-{0000..}.tar    the shards, directly in TRAINSET (as imagenet-12k-wds is laid
                                     out), so TRAINSET is the ``root`` of ``wds/NAME`` in timm
      .done/{tar name}.json          per-shard commit record (silverlabel.stage: inputs, samples, bytes, md5)

Members per sample, in this order: the image bytes copied from the source shard without
re-encoding (``.jpg`` for every silverlabel dataset), ``.cls`` (the class index as ASCII
text, ``-1`` when the selection has no labels), ``.json`` (label, class_name, top-k labels
and label_probs when the selection has them, width, height, and where the sample came
from), and ``.txt`` when the sample has a caption.

How it runs:

1. *plan* (driver): the selection's rows are put in key order, then permuted with
   ``numpy.random.Generator(PCG64(seed))``; each split's rows, in that shuffled order, are
   cut into ``k`` consecutive runs whose lengths differ by at most one
   (``k = --shards`` or ``ceil(n / --samples-per-shard)``). The plan depends only on the
   selection's rows and the seed, never on the order of its files or on ``--workers``.
2. *index* (one unit per source shard): each source tar that feeds an unfinished output
   shard is indexed once (headers) to locate the selected samples' image members, and read
   once in full to check it against the size and md5 that ingest recorded for it (its
   ``.done`` record): a truncated or bit-flipped source tar is an error naming it, never
   copied into a training set.
3. *write* (one unit per output shard): the shard's samples are read source tar by source
   tar, each tar opened once and read front to back in offset order (no random seek per
   sample), then written in shuffled order to a reproducible tar (fixed headers) under a
   temporary name, renamed into place, and recorded in ``.done/``. The JPEG bytes of one
   shard are held in memory, or spooled to a temporary file above ``memory_limit``.
4. ``classes.json``, the wids indexes, the manifest and finally ``_info.json``.

Same selection + same settings = byte-identical files (the manifest records times).
A rerun after a crash redoes only the shards without a matching ``.done`` record.

    >>> from silverlabel.stages.shard import ShardConfig, run_shard   # doctest: +SKIP
    >>> s = run_shard(ShardConfig(selection="sel", output="trainset", shards=8))  # doctest: +SKIP
    >>> s.splits["train"]["shards"]  # doctest: +SKIP
    8
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from silverlabel import __version__
from silverlabel.dataset import (MANIFEST, Pool, Selection, TrainSet, atomic_write, display, file_digest, file_size,
                                 is_file, is_identity, make_identity, map_ordered, open_read, parent_entry,
                                 parquet_source, read_bytes, records_digest, url_of, without_locations,
                                 write_json_atomic)
from silverlabel.engine import Engine, Report
from silverlabel.errors import UserError
from silverlabel.options import cpu_count, engine_field, opt, positive_int, ray_address_field, split_counts
from silverlabel.formats.selection import SELECTION_SCHEMA
from silverlabel.formats.wds import HashingFile, ShardWriter, iter_tar_samples, read_member
from silverlabel.stage import (BaseStage, Commit, StageRun, changed_settings, file_identity, read_record,
                              recorded_output, run_stage)

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "{name}-{split}-{index:04d}.tar"
DEFAULT_SAMPLES_PER_SHARD = 10_000
#: Splits listed first in _info.json (then the others by name).
_SPLIT_ORDER = ("train", "validation", "test")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_KEY_PATTERN = r"^[A-Za-z0-9_\-]+$"
#: What to do about a source tar that is not what ingest recorded.
_REPAIR = " (restore it, or delete it and run silverlabel ingest again)"
#: Columns the plan needs; the others of SELECTION_SCHEMA are optional (null when absent).
REQUIRED_COLUMNS = ("key", "split", "source_dataset", "source_shard", "source_key")
#: Columns carried to the writing units (the sample's .cls/.json/.txt).
_META_COLUMNS = ("key", "source_key", "id", "uid", "url", "caption", "cls", "class_name", "labels",
                 "label_probs", "width", "height", "source_dataset", "source_shard")


@dataclass(frozen=True)
class ShardConfig:
    """Everything ``shard`` needs. ``workers``, ``engine`` and ``memory_limit`` do not change
    the output.

    ``shards``: shards per split, as an int (every split) or a mapping ``{split: n}``; splits
    it does not name get ``ceil(n / samples_per_shard)`` shards. A split never gets more
    shards than samples.
    """

    selection: str = opt(help="selection folder (silverlabel select)", positional=True, metavar="SELECTION")
    output: str = opt(help="folder to write the shards to", short="-o", metavar="TRAINSET", required=True)
    seed: int = opt(0, "seed of the global pre-shuffle", type=int)
    shards: int | Mapping[str, int] | None = opt(
        None, "shards per split: N for every split, or per split (the others use --samples-per-shard)",
        type=split_counts, metavar="N|SPLIT=N,...")
    samples_per_shard: int | None = opt(None, "ceil(n/M) shards per split of n samples", type=positive_int,
                                        metavar="M", default_help="default: 10000")  # None: 10,000
    name: str | None = opt(None, "dataset name", default_help="default: the selection folder's name")
    template: str = opt(DEFAULT_TEMPLATE, "shard file names", default_help=f"default: {DEFAULT_TEMPLATE}")
    # runtime: how fast, not what
    workers: int = opt(default_factory=cpu_count, help="processes", type=positive_int, group="run",
                       default_help="default: cores; with --engine ray: the cluster's CPUs", auto_workers="cpu")
    engine: str = engine_field()  # local | ray
    ray_address: str | None = ray_address_field()  # None (this machine's cluster), auto, ray://host:port
    memory_limit: int = 1 << 30  # spool a shard's images to disk above this many bytes

    def __post_init__(self) -> None:
        if isinstance(self.shards, Mapping):
            pairs = tuple(sorted((str(k), int(v)) for k, v in self.shards.items()))
            object.__setattr__(self, "shards", pairs)
        elif self.shards is not None:
            object.__setattr__(self, "shards", int(self.shards))
        if isinstance(self.shards, int):
            if self.samples_per_shard is not None:
                raise UserError("use --shards N or --samples-per-shard M, not both")
            if self.shards < 1:
                raise UserError(f"--shards must be >= 1, got {self.shards}")
        elif self.shards is not None:
            bad = [f"{k}={v}" for k, v in self.shards if v < 1]
            if bad:
                raise UserError(f"--shards: shard counts must be >= 1 ({', '.join(bad)})")
        if self.samples_per_shard is not None and self.samples_per_shard < 1:
            raise UserError(f"--samples-per-shard must be >= 1, got {self.samples_per_shard}")
        if self.name is None:
            sel = self.selection.rstrip("/")
            object.__setattr__(self, "name", sel.rsplit("/", 1)[-1] if url_of(sel) is not None
                               else Path(os.path.abspath(sel)).name)
            if not _NAME_RE.match(self.name):
                raise UserError(f"the selection folder's name {self.name!r} cannot name shards; give --name")
        elif not _NAME_RE.match(self.name):
            raise UserError(f"--name {self.name!r}: use letters, digits, '.', '-' or '_'")
        shard_filename(self.template, self.name, "train", 0)  # validates the template
        if shard_filename(self.template, self.name, "train", 0) == shard_filename(self.template, self.name, "train", 1):
            raise UserError(f"--template {self.template!r} must contain {{index}}")
        if self.workers < (0 if self.engine == "ray" else 1):  # ray: 0 = the cluster's CPUs
            raise UserError(f"--workers must be >= 1, got {self.workers}")
        if os.path.abspath(self.output) == os.path.abspath(self.selection):
            raise UserError("-o must not be the selection folder")

    def shards_for(self, split: str, n: int) -> int:
        """Number of output shards for a split of ``n`` samples."""
        if isinstance(self.shards, int):
            k = self.shards
        elif self.shards is not None and split in dict(self.shards):
            k = dict(self.shards)[split]
        else:
            k = math.ceil(n / (self.samples_per_shard or DEFAULT_SAMPLES_PER_SHARD))
        return max(1, min(k, n))

    def output_config(self) -> dict[str, Any]:
        """The settings that determine the output; a resumed run must match them."""
        return {
            "selection": self.selection,
            "seed": self.seed,
            "shards": self.shards if not isinstance(self.shards, tuple) else dict(self.shards),
            "samples_per_shard": self.samples_per_shard or (None if isinstance(self.shards, int) else DEFAULT_SAMPLES_PER_SHARD),
            "name": self.name,
            "template": self.template,
        }


def shard_filename(template: str, name: str, split: str, index: int) -> str:
    """The file name of output shard ``index`` of ``split``; a ValueError for a bad template.

    >>> shard_filename(DEFAULT_TEMPLATE, "in12k", "train", 7)
    'in12k-train-0007.tar'
    """
    try:
        out = template.format(name=name, split=split, index=index)
    except KeyError as e:
        raise UserError(f"--template {template!r}: unknown field {{{e.args[0]}}} (use {{name}}, {{split}}, {{index}})") from None
    except (IndexError, ValueError) as e:
        raise UserError(f"--template {template!r}: {e} (fields: {{name}}, {{split}}, {{index}})") from None
    if not out.endswith(".tar") or "/" in out or "\\" in out or out.startswith(".") or out == ".tar":
        raise UserError(f"--template {template!r} gives {out!r}: shard names must end in .tar and contain no '/'")
    return out


def even_lengths(n: int, k: int) -> list[int]:
    """``n`` samples over ``k`` shards, lengths differing by at most one (longer ones first).

    >>> even_lengths(10, 3)
    [4, 3, 3]
    """
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


# ---------------------------------------------------------------------------------------
# units and their functions


@dataclass
class IndexUnit:
    """One source tar, the source keys to locate in it, and its md5 as ingest recorded it
    (None: no record to check against)."""

    id: int
    path: str
    keys: list[str]
    md5: str | None = None


@dataclass
class ShardUnit:
    """One output shard: its rows in output order and where each image lies."""

    split: str
    index: int
    filename: str
    meta: pa.Table | None  # _META_COLUMNS, in output (shuffled) order (None: a unit found done)
    paths: list[str]  # source tars this shard reads
    src: np.ndarray  # per row: index into paths
    offsets: np.ndarray  # per row: image member offset in its source tar
    sizes: np.ndarray
    exts: list[str]  # per row: the image member's extension
    commit: Commit  # written last: the shard is done


@dataclass
class ShardResult:
    filename: str
    samples: int
    bytes: int
    md5: str
    seconds: float


def index_source_shard(unit: IndexUnit, cfg: ShardConfig, report: Report | None = None
                       ) -> tuple[int, list[tuple[str, int, int]]]:
    """``(unit.id, locations)``: the (image extension, offset, size) of each of ``unit.keys``
    in the source tar, found by reading its headers only."""
    wanted = set(unit.keys)
    found: dict[str, tuple[str, int, int]] = {}
    where = display(unit.path)
    try:
        if unit.md5 is not None and file_digest(unit.path, "md5") != unit.md5:
            raise UserError(f"{where}: corrupt source shard: its md5 differs from the one ingest recorded"
                            f"{_REPAIR}")
        with open_read(unit.path) as f:  # a pool at a URL: headers by ranged reads, data skipped
            for s in iter_tar_samples(f):
                if s.key in wanted:
                    ext = s.image_ext()
                    if ext is None:
                        raise UserError(f"{where}: sample {s.key!r} has no image member")
                    found[s.key] = (ext, *s.members[ext])
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: source shard not found") from None
    missing = [k for k in unit.keys if k not in found]
    if missing:
        raise UserError(f"{where}: has no sample {missing[0]!r} (and {len(missing) - 1} more selected keys missing)"
                         if len(missing) > 1 else f"{where}: has no sample {missing[0]!r} named by the selection")
    return unit.id, [found[k] for k in unit.keys]


def _floats32(values: list[float]) -> list[float]:
    """float32 values as the shortest decimals that read back to the same float32."""
    return [float(x) for x in np.asarray(values, dtype=np.float32).astype(str)]


def sample_members(row: dict[str, Any], image_ext: str, image: bytes) -> dict[str, bytes]:
    """The members of one output sample, in their fixed order."""
    label = -1 if row.get("cls") is None else int(row["cls"])
    meta: dict[str, Any] = {"label": label, "class_name": row.get("class_name")}
    if row.get("labels") is not None:
        meta["labels"] = [int(x) for x in row["labels"]]
    if row.get("label_probs") is not None:
        meta["label_probs"] = _floats32(row["label_probs"])
    meta["width"] = row.get("width")
    meta["height"] = row.get("height")
    meta["source"] = {
        "key": row.get("source_key"),
        "uid": row.get("uid"),
        "id": row.get("id"),
        "url": row.get("url"),
        "dataset": row.get("source_dataset"),
        "shard": row.get("source_shard"),
    }
    members = {
        image_ext: image,
        "cls": str(label).encode(),
        "json": json.dumps(meta, ensure_ascii=False).encode(),
    }
    if row.get("caption") is not None:
        members["txt"] = str(row["caption"]).encode()
    return members


def write_shard(unit: ShardUnit, cfg: ShardConfig, report: Report | None = None) -> ShardResult:
    """Write output shard ``unit`` atomically, then its commit record. Idempotent."""
    t0 = time.monotonic()
    report = report or (lambda d, s: None)
    out = TrainSet(cfg.output).root  # a training set at a URL: this process's staging folder
    n = unit.meta.num_rows
    images: list[Any] = [None] * n
    spool = None
    if int(unit.sizes.sum()) > cfg.memory_limit:
        tmp = out / ".tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        spool = tempfile.TemporaryFile(dir=tmp)
    try:
        # read: source by source, each front to back
        order = np.lexsort((unit.offsets, unit.src))
        current, f = -1, None
        try:
            for pos in order.tolist():
                s = int(unit.src[pos])
                if s != current:
                    if f is not None:
                        f.close()
                    f = open_read(unit.paths[s])  # a pool at a URL: ranged reads, front to back
                    current = s
                data = read_member(f, int(unit.offsets[pos]), int(unit.sizes[pos]))
                if spool is not None:
                    images[pos] = spool.tell()
                    spool.write(data)
                else:
                    images[pos] = data
        finally:
            if f is not None:
                f.close()
        # write: in output order
        rows = unit.meta.to_pylist()
        path = out / unit.filename
        with atomic_write(path) as f:
            hf = HashingFile(f)
            with ShardWriter(hf) as writer:
                for pos, row in enumerate(rows):
                    if spool is not None:
                        spool.seek(images[pos])
                        image = spool.read(int(unit.sizes[pos]))
                    else:
                        image = images[pos]
                        images[pos] = None
                    writer.write(row["key"], sample_members(row, unit.exts[pos], image))
                    report(1, 1)
            f.flush()
            size = f.tell()
    finally:
        if spool is not None:
            spool.close()
    md5 = hf.md5.hexdigest()
    unit.commit.write([path], info={"samples": n, "bytes": size, "md5": md5}, md5={path: md5})
    return ShardResult(unit.filename, n, size, md5, time.monotonic() - t0)


# ---------------------------------------------------------------------------------------
# the plan


@dataclass
class _Plan:
    table: pa.Table  # the selection (_META_COLUMNS)
    loc: np.ndarray  # per row: index into locators
    locators: list[tuple[str, str]]  # (source_dataset as stored, source_shard)
    paths: list[str]  # per locator: the source tar's path
    splits: dict[str, list[tuple[int, str, np.ndarray]]]  # split -> [(index, filename, rows)]


def read_selection(files: list[Path]) -> pa.Table:
    """The selection rows with _META_COLUMNS + split (absent optional columns as nulls)."""
    tables = []
    for p in files:
        try:
            pf = pq.ParquetFile(parquet_source(p))
        except Exception as e:
            raise UserError(f"{display(p)}: not a readable parquet file ({e})") from None
        names = pf.schema_arrow.names
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise UserError(f"{display(p)}: missing column(s) {', '.join(missing)} of the selection format")
        cols = [c for c in (*_META_COLUMNS, "split") if c in names]
        t = pf.read(columns=cols)
        arrays = []
        for c in (*_META_COLUMNS, "split"):
            typ = SELECTION_SCHEMA.field(c).type
            if c in names:
                try:
                    arrays.append(t.column(c).cast(typ))
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                    raise UserError(f"{display(p)}: column {c!r} is not {typ} ({e})") from None
            else:
                arrays.append(pa.nulls(t.num_rows, typ))
        tables.append(pa.Table.from_arrays(arrays, names=[*_META_COLUMNS, "split"]))
    return pa.concat_tables(tables).combine_chunks()


def _source_tar(selection: str, dataset: str, shard: str, roots: dict[str, Path]) -> str:
    """The tar ``shard`` of the dataset ``dataset`` names: an id the selection's manifest
    maps to a folder (``roots``, :meth:`Dataset.parent_roots`), or (a selection of an older
    version, or one written by hand) the dataset's path, relative to the selection or not."""
    if dataset in roots:
        return str(Pool(roots[dataset]).shards_dir / shard)
    if is_identity(dataset):
        raise UserError(f"{selection}: source dataset {dataset} is not among the parents its "
                        f"{MANIFEST} names; select again")
    ds = Path(dataset)
    if not ds.is_absolute() and not ds.exists() and (Path(selection) / ds).exists():
        ds = Path(selection) / ds
    return str(Pool(ds).shards_dir / shard)


def make_plan(cfg: ShardConfig, files: list[Path], roots: dict[str, Path]) -> _Plan:
    """The shards to write from the selection's parquet ``files``: the rows shuffled and cut
    per split, and the source tar of each; ``roots``: the selection's parent datasets, id ->
    folder (:meth:`Dataset.parent_roots` of the manifest the caller read)."""
    import pyarrow.compute as pc

    sel = Selection(cfg.selection).location
    table = read_selection(files)
    n = table.num_rows
    if n == 0:
        raise UserError(f"{sel}: the selection is empty")
    no_bytes = table.column("source_dataset").null_count
    if no_bytes:
        raise UserError(
            f"{sel}: {no_bytes} of {n} selected samples come from a bare URL table and have no image bytes; "
            f"download them first with `silverlabel ingest {cfg.selection} -o DATASET`, then select from DATASET"
        )
    for c in ("key", "split", "source_shard", "source_key"):
        nulls = table.column(c).null_count
        if nulls:
            raise UserError(f"{sel}: {nulls} selected rows have no {c!r}")
    keys = table.column("key")
    ok = pc.match_substring_regex(keys, _KEY_PATTERN)
    if not pc.all(ok).as_py():
        bad = keys.filter(pc.invert(ok))[0].as_py()
        raise UserError(f"{sel}: invalid sample key {bad!r}: keys use letters, digits, '_' or '-'")
    order = pc.sort_indices(keys).to_numpy()
    sorted_keys = keys.take(order)
    if n > 1:
        dup = pc.equal(sorted_keys.slice(1), sorted_keys.slice(0, n - 1))
        if pc.any(dup).as_py():
            i = int(np.flatnonzero(dup.to_numpy(zero_copy_only=False))[0])
            raise UserError(f"{sel}: key {sorted_keys[i].as_py()!r} is selected more than once")

    # the global pre-shuffle
    rng = np.random.Generator(np.random.PCG64(cfg.seed))
    shuffled = order[rng.permutation(n)]

    split_enc = table.column("split").dictionary_encode().combine_chunks()
    split_codes = split_enc.indices.to_numpy()[shuffled]
    split_names = split_enc.dictionary.to_pylist()
    for s in split_names:
        if not _NAME_RE.match(s):
            raise UserError(f"{sel}: split name {s!r} cannot name shards (letters, digits, '.', '-', '_')")
    unknown = [f"{k}={v}" for k, v in cfg.shards if k not in split_names] if isinstance(cfg.shards, tuple) else []
    if unknown:
        raise UserError(f"--shards {unknown[0]}: the selection has no split {unknown[0].split('=')[0]!r} "
                        f"(has: {', '.join(sorted(split_names))})")

    locator = pc.binary_join_element_wise(table.column("source_dataset"), table.column("source_shard"), "\0")
    loc_enc = locator.dictionary_encode().combine_chunks()
    loc = loc_enc.indices.to_numpy().astype(np.int64)
    locators = [tuple(s.split("\0", 1)) for s in loc_enc.dictionary.to_pylist()]
    paths = [_source_tar(sel, d, s, roots) for d, s in locators]

    splits: dict[str, list[tuple[int, str, np.ndarray]]] = {}
    seen: dict[str, str] = {}
    ordered = sorted(range(len(split_names)),
                     key=lambda i: (_SPLIT_ORDER.index(split_names[i]) if split_names[i] in _SPLIT_ORDER
                                    else len(_SPLIT_ORDER), split_names[i]))
    for code in ordered:
        split = split_names[code]
        rows = shuffled[split_codes == code]
        k = cfg.shards_for(split, len(rows))
        units = []
        start = 0
        for i, length in enumerate(even_lengths(len(rows), k)):
            name = shard_filename(cfg.template, cfg.name, split, i)
            if name in seen:
                raise UserError(f"--template {cfg.template!r} names shards of {seen[name]!r} and {split!r} "
                                 f"alike ({name}); include {{split}}")
            seen[name] = split
            units.append((i, name, rows[start:start + length]))
            start += length
        splits[split] = units
    return _Plan(table.select(list(_META_COLUMNS)), loc, locators, paths, splits)


# ---------------------------------------------------------------------------------------
# the driver


@dataclass
class ShardSummary:
    output: str
    name: str
    splits: dict[str, dict[str, Any]]  # split -> {"samples", "shards", "filenames", "shard_lengths"}
    shards_done_now: int
    shards_skipped: int
    samples_now: int
    bytes_now: int
    seconds: float

    @property
    def samples(self) -> int:
        return sum(s["samples"] for s in self.splits.values())

    @property
    def shards(self) -> int:
        return sum(s["shards"] for s in self.splits.values())

    @property
    def samples_per_second(self) -> float:
        return self.samples_now / self.seconds if self.seconds > 0 else 0.0


def _index_units(plan: _Plan, rows: np.ndarray, md5: dict[int, str | None]
                 ) -> Iterator[tuple[int, np.ndarray, IndexUnit]]:
    """One index unit per source tar feeding ``rows``: (locator, its rows, unit); ``md5``:
    per locator, the tar's md5 as ingest recorded it."""
    loc = plan.loc[rows]
    order = np.argsort(loc, kind="stable")
    rows, loc = rows[order], loc[order]
    bounds = np.flatnonzero(np.diff(loc)) + 1
    source_keys = plan.table.column("source_key")
    for group in np.split(rows, bounds):
        if len(group) == 0:
            continue
        l = int(plan.loc[group[0]])
        keys = source_keys.take(group).to_pylist()
        yield l, group, IndexUnit(l, plan.paths[l], list(dict.fromkeys(keys)), md5[l])


def _source_record(path: str) -> Path:
    """The commit record of the ingest unit that wrote source tar ``path``."""
    tar = Path(path)
    return Pool(tar.parent.parent).commit_path(tar.stem)


def _recorded(path: str) -> dict[str, Any] | None:
    """``{"bytes", "md5"}`` that ingest recorded for source tar ``path`` (None: no record)."""
    return recorded_output(read_record(_source_record(path)), os.path.relpath(path, Path(path).parent.parent))


class ShardStage(BaseStage):
    """``shard`` for :func:`silverlabel.stage.run_stage`: one unit per output shard, bound to
    the selection's content and to the source tars it reads; its plan locates the images of
    the shards still to write (each source tar indexed once, on the engine)."""

    unit_fn = staticmethod(write_shard)

    def prepare(self) -> None:
        cfg, ts = self.config, self.output
        sel = Selection(cfg.selection)
        self.selection_manifest = sel.checked_manifest()  # read once: files, parents and id come from it
        self.files = sel.files(self.selection_manifest)
        self.fingerprint = sel.fingerprint(self.files)
        man = ts.previous_run("shard")
        if man is not None:
            diffs = changed_settings(man.get("config", {}), cfg.output_config(), ignore=("selection",))
            if man.get("selection_sha256") != self.fingerprint:  # the folder may move; its content counts
                diffs.append("the selection's content")
            if diffs:
                raise UserError(f"{ts.location}: was sharded with different settings ({', '.join(diffs)}); "
                                 "resume with the same command and selection, or write to a new -o")
        roots = sel.parent_roots("dataset", self.selection_manifest)
        self.plan_ = plan = make_plan(cfg, self.files, roots)  # validates the selection before anything is written
        # which shards are left, and are their sources there (in a bucket: many requests at once)
        first_use: dict[int, None] = {}
        used_by: list[tuple[str, int, str, np.ndarray, np.ndarray, np.ndarray]] = []
        for split, units in plan.splits.items():
            for i, filename, rows in units:
                used, src = np.unique(plan.loc[rows], return_inverse=True)
                first_use.update(dict.fromkeys(used.tolist()))
                used_by.append((split, i, filename, rows, used, src))
        remote = any(url_of(plan.paths[u]) is not None for u in first_use) or ts.url is not None
        threads = 32 if remote else 1  # a store: each call is a few requests, which then overlap
        # the first bad source raises
        found = dict(zip(first_use, map_ordered(self._source, list(first_use), threads)))
        sources = {u: md5 for u, (md5, _rec) in found.items()}  # per locator: the source tar's md5
        recorded_md5 = {u: rec for u, (_md5, rec) in found.items()}  # ... as ingest recorded it
        config = {k: v for k, v in cfg.output_config().items() if k != "selection"}
        self.units: list[tuple[str, int, str, np.ndarray, list[str], np.ndarray, Commit]] = []
        for split, i, filename, rows, used, src in used_by:
            identity = hashlib.sha256(" ".join(sources[u] for u in used.tolist()).encode()).hexdigest()
            commit = Commit(str(ts.commit_path(filename)), {**config, "split": split, "index": i},
                            {"selection": self.fingerprint, "sources": identity})
            self.units.append((split, i, filename, rows, [plan.paths[u] for u in used], src.astype(np.int32),
                               commit))
        done = list(map_ordered(lambda unit: unit[6].check() is not None, self.units, threads))
        todo = [unit[3] for unit, is_done in zip(self.units, done) if not is_done]
        needed = np.concatenate(todo) if todo else np.zeros(0, dtype=np.int64)
        self.index_plan = list(_index_units(plan, needed, recorded_md5))

    def _source(self, u: int) -> tuple[str, str | None]:
        """(md5, md5 as ingest recorded it or None) of source tar ``u``; an error when it is
        missing or not the size ingest recorded."""
        plan = self.plan_
        path = plan.paths[u]
        if not is_file(path):
            raise FileNotFoundError(f"{display(path)}: source shard of selected samples not found "
                                    f"(source_dataset {plan.locators[u][0]!r} moved or deleted?)")
        recorded, size = _recorded(path), file_size(path)
        if recorded is not None and recorded["bytes"] != size:
            raise UserError(f"{display(path)}: corrupt source shard: {size} bytes, ingest recorded "
                            f"{recorded['bytes']}{_REPAIR}")
        return (recorded or file_identity(path))["md5"], recorded and recorded["md5"]

    def manifest(self) -> dict[str, Any]:
        cfg = self.config
        source_datasets = sorted({d for d, _shard in self.plan_.locators})  # their ids, as the selection has them
        parent = parent_entry("selection", cfg.selection, self.output.root, manifest=self.selection_manifest,
                              source_datasets=source_datasets)
        return {
            "stage": "shard",
            "state": "running",
            "silverlabel_version": __version__,
            "name": cfg.name,
            "config": {**cfg.output_config(), "selection": parent["id"]},
            "selection_sha256": self.fingerprint,
            "parents": [parent],
            "counts": None,
        }

    def total(self) -> int:
        """The samples of all output shards."""
        return sum(len(rows) for _s, _i, _f, rows, _p, _src, _c in self.units)

    def plan(self, engine: Engine) -> Iterator[ShardUnit]:
        plan = self.plan_
        # locate the images of the rows still to write: each source tar indexed once
        n_rows = plan.table.num_rows
        offsets = np.full(n_rows, -1, dtype=np.int64)
        sizes = np.zeros(n_rows, dtype=np.int64)
        exts = np.empty(n_rows, dtype=object)
        groups = {l: (group, unit.keys) for l, group, unit in self.index_plan}
        source_keys = plan.table.column("source_key")
        if self.index_plan:
            log.info("shard: locating the images of %d samples in %d source shards",
                     sum(len(group) for _l, group, _u in self.index_plan), len(self.index_plan))
        for l, located in engine.map(index_source_shard, (unit for _l, _g, unit in self.index_plan), self.config):
            group, keys = groups.pop(l)
            where = dict(zip(keys, located))
            for row, key in zip(group.tolist(), source_keys.take(group).to_pylist()):
                exts[row], offsets[row], sizes[row] = where[key]
        for split, i, filename, rows, paths, src, commit in self.units:
            unit = ShardUnit(split, i, filename, None, paths, src, rows, rows, [], commit)
            if len(rows) and offsets[rows[0]] >= 0:  # else found done, and run_stage skips it
                unit = replace(unit, meta=plan.table.take(rows), offsets=offsets[rows], sizes=sizes[rows],
                               exts=exts[rows].tolist())
            yield unit

    def finish(self, run: StageRun) -> ShardSummary:
        cfg, ts = self.config, self.output
        records = {filename: read_record(commit.path)["info"] for _s, _i, filename, _r, _p, _src, commit in self.units}
        # the index files, _info.json last
        sel = Selection(cfg.selection)
        if is_file(sel.classes_path):
            with atomic_write(ts.classes_path) as f:
                f.write(read_bytes(sel.classes_path))
        splits: dict[str, dict[str, Any]] = {}
        for split, units in self.plan_.splits.items():
            filenames = [name for _i, name, _rows in units]
            lengths = [len(rows) for _i, _name, rows in units]
            splits[split] = {"samples": sum(lengths), "shards": len(units), "filenames": filenames,
                             "shard_lengths": lengths}
        ts.write_wids_indexes(cfg.name, {split: s["filenames"] for split, s in splits.items()}, records)
        manifest = self.manifest()
        manifest.update(
            state="complete",
            counts={split: s["samples"] for split, s in splits.items()},
            shards={split: s["shards"] for split, s in splits.items()},
            samples=sum(s["samples"] for s in splits.values()),
        )
        ident = make_identity("trainset", {"config": manifest["config"],
                                           "parents": without_locations(manifest["parents"]),
                                           "content": records_digest(ts.root, None if ts.url is None else [
                                               f for _s, _i, f, _r, _p, _src, _c in self.units])})
        ts.write_manifest({"id": ident, **manifest})
        write_json_atomic(ts.info_path, {
            "name": cfg.name,
            "splits": {split: {"name": split, "num_samples": s["samples"], "filenames": s["filenames"],
                               "shard_lengths": s["shard_lengths"]} for split, s in splits.items()},
        })
        samples_now = sum(r.samples for r in run.results)
        bytes_now = sum(r.bytes for r in run.results)
        return ShardSummary(ts.location, cfg.name, splits, run.done_now, len(run.skipped), samples_now, bytes_now,
                            run.seconds)


def run_shard(cfg: ShardConfig, progress: Report | None = None) -> ShardSummary:
    """Materialize ``cfg.selection`` into shards in ``cfg.output``; resumes a partial run."""
    return run_stage(ShardStage(cfg, TrainSet(cfg.output)), progress)
