"""``silverlabel shard``: a selection -> pre-shuffled WebDataset shards that timm and wids read.

::

    TRAINSET/
      silverlabel.json               manifest: stage "shard", config, parents, counts per split
      _info.json                     timm's wds reader: splits -> filenames, shard_lengths (written last)
      {name}-{split}.wids.json       wids shard index per split (url, nsamples, filesize, md5sum)
      classes.json                   copy of the selection's class map
      {name}-{split}-{0000..}.tar    the shards, directly in TRAINSET (as imagenet-12k-wds is laid
                                     out), so TRAINSET is the ``root`` of ``wds/NAME`` in timm
      .done/{tar name}.json          per-shard completion record (samples, bytes, md5)

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
   shard is indexed once (headers only) to locate the selected samples' image members.
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

import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from silverlabel import __version__
from silverlabel.dataset import Dataset, atomic_write, write_json_atomic
from silverlabel.engine import Report, create_engine
from silverlabel.errors import UserError
from silverlabel.formats.selection import CLASSES_FILE, SELECTION_DIR, SELECTION_SCHEMA
from silverlabel.formats.wds import HashingFile, ShardWriter, iter_tar_samples, read_member

DEFAULT_TEMPLATE = "{name}-{split}-{index:04d}.tar"
DEFAULT_SAMPLES_PER_SHARD = 10_000
INFO_FILE = "_info.json"
DONE_DIR = ".done"
#: Splits listed first in _info.json (then the others by name).
_SPLIT_ORDER = ("train", "validation", "test")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_KEY_PATTERN = r"^[A-Za-z0-9_\-]+$"
_TMP_RE = re.compile(r"^\..+\.tmp-\d+$")
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

    selection: str
    output: str
    seed: int = 0
    shards: int | Mapping[str, int] | None = None
    samples_per_shard: int | None = None  # None: 10,000
    name: str | None = None  # None: the selection folder's name
    template: str = DEFAULT_TEMPLATE
    # runtime: how fast, not what
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    engine: str = "local"  # local | ray
    ray_address: str | None = None  # --engine ray: None (this machine's cluster), auto, ray://host:port
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
            object.__setattr__(self, "name", Path(os.path.abspath(self.selection)).name)
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
    """One source tar and the source keys to locate in it."""

    id: int
    path: str
    keys: list[str]


@dataclass
class ShardUnit:
    """One output shard: its rows in output order and where each image lies."""

    split: str
    index: int
    filename: str
    meta: pa.Table  # _META_COLUMNS, in output (shuffled) order
    paths: list[str]  # source tars this shard reads
    src: np.ndarray  # per row: index into paths
    offsets: np.ndarray  # per row: image member offset in its source tar
    sizes: np.ndarray
    exts: list[str]  # per row: the image member's extension
    fingerprint: str


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
    try:
        for s in iter_tar_samples(unit.path):
            if s.key in wanted:
                ext = s.image_ext()
                if ext is None:
                    raise UserError(f"{unit.path}: sample {s.key!r} has no image member")
                found[s.key] = (ext, *s.members[ext])
    except FileNotFoundError:
        raise FileNotFoundError(f"{unit.path}: source shard not found") from None
    missing = [k for k in unit.keys if k not in found]
    if missing:
        raise UserError(f"{unit.path}: has no sample {missing[0]!r} (and {len(missing) - 1} more selected keys missing)"
                         if len(missing) > 1 else f"{unit.path}: has no sample {missing[0]!r} named by the selection")
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
    """Write output shard ``unit`` atomically, then its ``.done`` record. Idempotent."""
    t0 = time.monotonic()
    report = report or (lambda d, s: None)
    out = Path(cfg.output)
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
                    f = open(unit.paths[s], "rb")
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
    write_json_atomic(out / DONE_DIR / f"{unit.filename}.json", {
        "file": unit.filename, "split": unit.split, "index": unit.index, "samples": n, "bytes": size,
        "md5": md5, "selection_sha256": unit.fingerprint,
    })
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


def selection_files(selection: str | os.PathLike) -> list[Path]:
    """The selection's parquet files; a ValueError when ``selection`` is not a selection."""
    root = Path(selection)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such selection folder")
    try:
        man = json.loads((root / "silverlabel.json").read_text())
    except FileNotFoundError:
        raise UserError(f"{root}: not a selection (no silverlabel.json; make one with silverlabel select)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{root / 'silverlabel.json'}: corrupt manifest ({e})") from None
    if man.get("stage") != "select":
        raise UserError(f"{root}: holds a {man.get('stage')!r} output, not a selection (silverlabel select)")
    files = sorted((root / SELECTION_DIR).glob("*.parquet")) if (root / SELECTION_DIR).is_dir() else []
    if not files:
        raise UserError(f"{root}: no {SELECTION_DIR}/*.parquet files")
    return files


def selection_fingerprint(files: list[Path]) -> str:
    """sha256 over the selection's parquet files (names and bytes)."""
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def read_selection(files: list[Path]) -> pa.Table:
    """The selection rows with _META_COLUMNS + split (absent optional columns as nulls)."""
    tables = []
    for p in files:
        try:
            pf = pq.ParquetFile(p)
        except Exception as e:
            raise UserError(f"{p}: not a readable parquet file ({e})") from None
        names = pf.schema_arrow.names
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise UserError(f"{p}: missing column(s) {', '.join(missing)} of the selection format")
        cols = [c for c in (*_META_COLUMNS, "split") if c in names]
        t = pf.read(columns=cols)
        arrays = []
        for c in (*_META_COLUMNS, "split"):
            typ = SELECTION_SCHEMA.field(c).type
            if c in names:
                try:
                    arrays.append(t.column(c).cast(typ))
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                    raise UserError(f"{p}: column {c!r} is not {typ} ({e})") from None
            else:
                arrays.append(pa.nulls(t.num_rows, typ))
        tables.append(pa.Table.from_arrays(arrays, names=[*_META_COLUMNS, "split"]))
    return pa.concat_tables(tables).combine_chunks()


def _source_tar(selection: Path, dataset: str, shard: str) -> str:
    ds = Path(dataset)
    if not ds.is_absolute() and not ds.exists() and (selection / ds).exists():
        ds = selection / ds
    return str(ds / "shards" / shard)


def make_plan(cfg: ShardConfig, files: list[Path]) -> _Plan:
    import pyarrow.compute as pc

    sel = Path(cfg.selection)
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

    locator = pc.binary_join_element_wise(table.column("source_dataset"), table.column("source_shard"), "\0")
    loc_enc = locator.dictionary_encode().combine_chunks()
    loc = loc_enc.indices.to_numpy().astype(np.int64)
    locators = [tuple(s.split("\0", 1)) for s in loc_enc.dictionary.to_pylist()]
    paths = [_source_tar(sel, d, s) for d, s in locators]

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


def _done_record(out: Path, filename: str, fingerprint: str, samples: int) -> dict[str, Any] | None:
    """The shard's completion record when the shard is complete and matches the plan."""
    try:
        rec = json.loads((out / DONE_DIR / f"{filename}.json").read_text())
        size = (out / filename).stat().st_size
    except (OSError, ValueError):
        return None
    if rec.get("selection_sha256") != fingerprint or rec.get("samples") != samples or rec.get("bytes") != size:
        return None
    return rec


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


def _check_compatible(ds: Dataset, cfg: ShardConfig, fingerprint: str) -> None:
    if not ds.exists():
        if ds.root.exists() and any(p for p in ds.root.iterdir() if not p.name.startswith(".")):
            raise UserError(f"{ds.root}: output folder exists and is not a silverlabel training set; choose another -o")
        return
    man = ds.read_manifest()
    if man.get("stage") != "shard":
        raise UserError(f"{ds.root}: holds a {man.get('stage')!r} output, not a shard output; choose another -o")
    old = dict(man.get("config", {}))
    new = json.loads(json.dumps(cfg.output_config()))
    old.pop("selection", None)  # the folder may have moved; its content is what counts
    new.pop("selection", None)
    diffs = [k for k in new if old.get(k) != new[k]]
    if man.get("selection_sha256") != fingerprint:
        diffs.append("the selection's content")
    if diffs:
        raise UserError(f"{ds.root}: was sharded with different settings ({', '.join(diffs)}); "
                         "resume with the same command and selection, or write to a new -o")


def _clean(out: Path) -> None:
    Dataset(out).clean_temporaries()
    done = out / DONE_DIR
    if done.is_dir():
        for p in done.iterdir():
            if _TMP_RE.match(p.name):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()


def _index_units(plan: _Plan, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray, IndexUnit]]:
    """One index unit per source tar feeding ``rows``: (locator, its rows, unit)."""
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
        yield l, group, IndexUnit(l, plan.paths[l], list(dict.fromkeys(keys)))


def run_shard(cfg: ShardConfig, progress: Report | None = None) -> ShardSummary:
    """Materialize ``cfg.selection`` into shards in ``cfg.output``; resumes a partial run."""
    t0 = time.monotonic()
    files = selection_files(cfg.selection)
    fingerprint = selection_fingerprint(files)
    ds = Dataset(cfg.output)
    out = ds.root
    _check_compatible(ds, cfg, fingerprint)
    plan = make_plan(cfg, files)  # validates the selection before anything is written

    # which shards are left, and are their sources there
    records: dict[str, dict[str, Any]] = {}
    todo: list[tuple[str, int, str, np.ndarray]] = []
    for split, units in plan.splits.items():
        for i, filename, rows in units:
            rec = _done_record(out, filename, fingerprint, len(rows))
            if rec is None:
                todo.append((split, i, filename, rows))
            else:
                records[filename] = rec
    skipped = len(records)
    needed = np.concatenate([t[3] for t in todo]) if todo else np.zeros(0, dtype=np.int64)
    index_plan = list(_index_units(plan, needed))
    for l, group, unit in index_plan:
        if not os.path.isfile(unit.path):
            raise FileNotFoundError(
                f"{unit.path}: source shard of {len(group)} selected samples not found "
                f"(source_dataset {plan.locators[l][0]!r} moved or deleted?)")

    out.mkdir(parents=True, exist_ok=True)
    _clean(out)
    source_datasets = sorted({os.path.abspath(os.path.dirname(os.path.dirname(p))) for p in plan.paths})
    manifest: dict[str, Any] = {
        "stage": "shard",
        "state": "running",
        "silverlabel_version": __version__,
        "name": cfg.name,
        "config": cfg.output_config(),
        "selection_sha256": fingerprint,
        "parents": [{"kind": "selection", "path": os.path.abspath(cfg.selection), "source_datasets": source_datasets}],
        "counts": None,
    }
    if not ds.exists():
        ds.write_manifest(manifest)

    engine = create_engine(cfg.engine, workers=cfg.workers, address=cfg.ray_address)
    samples_now = bytes_now = 0
    if todo:
        # locate the images of the rows still to write: each source tar indexed once
        n_rows = plan.table.num_rows
        offsets = np.full(n_rows, -1, dtype=np.int64)
        sizes = np.zeros(n_rows, dtype=np.int64)
        exts = np.empty(n_rows, dtype=object)
        groups = {l: (group, unit.keys) for l, group, unit in index_plan}
        source_keys = plan.table.column("source_key")
        for l, located in engine.map(index_source_shard, (unit for _l, _g, unit in index_plan), cfg):
            group, keys = groups.pop(l)
            where = dict(zip(keys, located))
            for row, key in zip(group.tolist(), source_keys.take(group).to_pylist()):
                exts[row], offsets[row], sizes[row] = where[key]

        def shard_units() -> Iterator[ShardUnit]:
            for split, i, filename, rows in todo:
                loc = plan.loc[rows]
                used, src = np.unique(loc, return_inverse=True)
                yield ShardUnit(
                    split=split, index=i, filename=filename, meta=plan.table.take(rows),
                    paths=[plan.paths[int(u)] for u in used], src=src.astype(np.int32),
                    offsets=offsets[rows], sizes=sizes[rows], exts=exts[rows].tolist(), fingerprint=fingerprint,
                )

        for res in engine.map(write_shard, shard_units(), cfg, progress):
            records[res.filename] = {"samples": res.samples, "bytes": res.bytes, "md5": res.md5}
            samples_now += res.samples
            bytes_now += res.bytes
    done_now = len(todo)
    _clean(out)  # what units that died and were retried (cluster engines) left behind

    # the index files, _info.json last
    classes = Path(cfg.selection) / CLASSES_FILE
    if classes.is_file():
        with atomic_write(out / CLASSES_FILE) as f:
            f.write(classes.read_bytes())
    splits: dict[str, dict[str, Any]] = {}
    for split, units in plan.splits.items():
        filenames = [name for _i, name, _rows in units]
        lengths = [len(rows) for _i, _name, rows in units]
        splits[split] = {"samples": sum(lengths), "shards": len(units), "filenames": filenames, "shard_lengths": lengths}
        write_json_atomic(out / wids_index_name(cfg.name, split), {
            "__kind__": "wids-shard-index-v1",
            "wids_version": 1,
            "name": f"{cfg.name}-{split}",
            "shardlist": [{"url": name, "nsamples": records[name]["samples"], "filesize": records[name]["bytes"],
                           "md5sum": records[name]["md5"]} for name in filenames],
        })
    manifest.update(
        state="complete",
        counts={split: s["samples"] for split, s in splits.items()},
        shards={split: s["shards"] for split, s in splits.items()},
        samples=sum(s["samples"] for s in splits.values()),
    )
    ds.write_manifest(manifest)
    write_json_atomic(out / INFO_FILE, {
        "name": cfg.name,
        "splits": {split: {"name": split, "num_samples": s["samples"], "filenames": s["filenames"],
                           "shard_lengths": s["shard_lengths"]} for split, s in splits.items()},
    })
    with contextlib.suppress(OSError):
        ds.tmp_dir.rmdir()
    return ShardSummary(str(out), cfg.name, splits, done_now, skipped, samples_now, bytes_now, time.monotonic() - t0)


def wids_index_name(name: str, split: str) -> str:
    """``{name}-{split}.wids.json``, the wids shard index of a split."""
    return f"{name}-{split}.wids.json"


def read_info(trainset: str | os.PathLike) -> dict[str, Any]:
    """A training set's ``_info.json`` (the shard list per split); shard paths are relative to it."""
    path = Path(trainset) / INFO_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{trainset}: no {INFO_FILE} (not a finished silverlabel shard output)") from None
