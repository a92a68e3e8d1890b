"""The pool ``select`` reads, cut into units, and the rules that need all of it at once.

:func:`open_input` reads a silverlabel dataset (its successful samples joined with one
``labels/NAME``; one unit per samples file) or a bare table (COYO-Labeled-300M columns,
or a ``uid`` column as DataComp's metadata; one unit per parquet file) and writes the
SELECT of the pool's common columns (view ``pool0`` of :mod:`.units`) from constant
column names only. Nothing read from a manifest or a file goes into SQL text: the labels
name must be a plain folder name (:meth:`silverlabel.dataset.Pool.labels_dir`) and becomes
a path, and paths reach DuckDB as relations.

The pool-wide rules run on the driver over one unit of the whole pool, with the same views
as every unit, and leave key tables for the units (:func:`write_keys`): the uid list
(``--uids``) and the keys that ``--dedupe`` and ``--exclude-near`` drop, found by
:mod:`silverlabel.dedupe` over the pool's keys and one hash column (never its rows).
"""

from __future__ import annotations

import functools

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from silverlabel.dataset import Pool, atomic_write, dataset_identity, display, is_file, parquet_source, url_of
from silverlabel.errors import UserError
from silverlabel.formats.tables import check_parquet

from .config import SelectConfig
from .units import Unit

#: What the duplicate rules removed: removed_key, kept_key (null for --exclude-near), distance, rule.
DUPLICATES_FILE = "duplicates.parquet"

_SAMPLE_COLUMNS = ("s.key, s.id, s.uid, s.url, s.caption, s.width, s.height, s.imagehash, s.sha256, "
                   "s.shard AS source_shard, s.label AS source_label, s.source AS source_path")


@dataclass
class Input:
    kind: str  # dataset | labels_table | samples_table
    pool_sql: str
    units: list[Unit]  # one per samples file / table file
    label_space: str | None  # the labels' label space (None: no teacher labels)
    source_dataset: str | None  # the dataset's id (dataset_identity; None: a bare table)
    joins_labels: bool
    #: with --allow-partial, what the labels do not cover: labels name, files, partial, samples
    missing: dict[str, Any] | None = None
    root: Path | None = None  # where the input lies (the manifest names it relative to the selection)
    labels_name: str | None = None  # the labels read from the dataset

    def whole(self) -> Unit:
        """One unit of the whole pool (the local engine's fast path, the pool-wide rules)."""
        return Unit(0, tuple(f for u in self.units for f in u.files), tuple(f for u in self.units for f in u.labels))


def open_input(cfg: SelectConfig) -> Input:
    """The input of ``cfg`` as an :class:`Input`; a clear error for anything else, and a
    UserError naming the first file that is not readable parquet (its footer is read). A
    dataset at a URL (``s3://bucket/pool``) is read from the store (its parquet files are
    fetched into this process's staging folder for DuckDB, which reads local files)."""
    if url_of(cfg.source) is not None:
        ds = Pool(cfg.source)
        if not ds.exists():
            raise UserError(f"{ds.location}: no silverlabel dataset there (a bare table is read from a local path)")
        return _open_dataset(cfg, ds.root)
    src = Path(cfg.source).resolve()
    if not src.exists():
        raise FileNotFoundError(f"{cfg.source}: no such dataset, file or folder")
    if (src / "silverlabel.json").is_file():
        return _open_dataset(cfg, src)
    return _open_table(cfg, src)


def unreadable_file(pool: Input) -> UserError | None:
    """After a DuckDB error in a pass: the one-line error naming the first of the pool's
    files that is not readable parquet (every page is read: a damaged page names no file in
    DuckDB's text), or None when they all read (the error is not the input's)."""
    for f in pool.whole().all_files():
        try:
            pf = pq.ParquetFile(parquet_source(f))
            for i in range(pf.num_row_groups):
                pf.read_row_group(i)
        except (OSError, pa.ArrowException) as e:
            return UserError(f"{display(f)}: not a readable parquet file ({str(e).splitlines()[0]})")
    return None


def _open_dataset(cfg: SelectConfig, src: Path) -> Input:
    ds = Pool(src)
    man = ds.read_manifest()
    where = display(ds.manifest_path)
    if man.get("stage") != "ingest":
        raise UserError(f"{cfg.source}: select reads an ingest dataset, this one is {man.get('stage')!r}")
    labels = man.get("labels") or {}
    if not isinstance(labels, dict):
        raise UserError(f"{where}: 'labels' must be a mapping of labels names")
    if cfg.labels_name is not None and cfg.labels_name not in labels:
        raise UserError(f"{cfg.source}: no labels named {cfg.labels_name!r} (have: {', '.join(map(str, labels)) or 'none'})")
    name = cfg.labels_name if cfg.labels_name is not None else (sorted(labels)[0] if labels else None)
    samples = ds.samples_files()
    if not samples:
        raise UserError(f"{cfg.source}: no samples/*.parquet (is the ingest finished?)")
    for p in samples:
        check_parquet(p)
    space = None
    label_files: list[tuple[str, ...]] = [()] * len(samples)
    if name is not None:
        try:
            folder = ds.labels_dir(name)  # a plain folder name, or a UserError
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        try:
            space = labels[name]["config"]["label_space"]
        except (KeyError, TypeError):
            raise UserError(f"{where}: labels {name!r} have no config.label_space") from None
        if not isinstance(space, str):
            raise UserError(f"{where}: labels {name!r}: label_space must be a name, not {space!r}")
        label_files = [(str(folder / p.name),) if is_file(folder / p.name) else () for p in samples]
        if not any(label_files):
            raise UserError(f"{display(folder)}: no labels files for the samples (is `silverlabel label` finished?)")
        for lab in label_files:
            for p in lab:
                check_parquet(p)
        missing = _missing_labels(cfg, labels[name], folder, samples, label_files)
        sql = (f"SELECT {_SAMPLE_COLUMNS}, l.labels, l.label_probs FROM samples s JOIN labels l USING (key) "
               "WHERE s.status = 'success'")
    else:
        sql = (f"SELECT {_SAMPLE_COLUMNS}, NULL::INTEGER[] AS labels, NULL::FLOAT[] AS label_probs "
               "FROM samples s WHERE s.status = 'success'")
        missing = None
    units = [Unit(i, (str(p),), lab) for i, (p, lab) in enumerate(zip(samples, label_files))]
    return Input("dataset", sql, units, space, dataset_identity(src), name is not None, missing, src, name)


def _missing_labels(cfg: SelectConfig, block: Any, folder: Path, samples: list[Path],
                    label_files: list[tuple[str, ...]]) -> dict[str, Any] | None:
    """What the labels in ``folder`` leave out: shards without a labels file, or labels made
    with ``--limit``. A UserError unless ``--allow-partial``; then the report's entry."""
    absent = [p for p, lab in zip(samples, label_files) if not lab]
    partial = isinstance(block, dict) and bool(block.get("partial"))
    if not absent and not partial:
        return None
    what = (f"no labels file for {len(absent)} of {len(samples)} shards ({absent[0].stem}"
            f"{', ...' if len(absent) > 1 else ''})" if absent else "labels made with --limit (partial)")
    if not cfg.allow_partial:
        raise UserError(f"{display(folder)}: {what}; run silverlabel label {cfg.source} to finish them, or pass "
                        "--allow-partial to select without the unlabeled samples")
    return {"labels": folder.name, "labels_files_missing": [f"{p.stem}.parquet" for p in absent],
            "labels_partial": partial,
            "samples_without_labels_file": sum(Pool.statuses(p).count("success") for p in absent)}


def _open_table(cfg: SelectConfig, src: Path) -> Input:
    import duckdb

    files = sorted(src.glob("*.parquet")) if src.is_dir() else [src]
    if not files:
        raise UserError(f"{cfg.source}: not a silverlabel dataset and no *.parquet in it")
    try:
        for f in files:
            check_parquet(f)
        with duckdb.connect() as con:
            has = set(con.read_parquet([str(f) for f in files]).columns)
    except duckdb.Error as e:
        raise UserError(f"{cfg.source}: not a silverlabel dataset nor readable parquet "
                        f"({str(e).splitlines()[0]})") from None
    units = [Unit(i, (str(f),)) for i, f in enumerate(files)]

    def opt(*names: str) -> dict[str, str]:  # a column, or NULL under its name when the table lacks it
        return {c: (c if c in has else f"NULL AS {c}") for c in names}

    if {"labels", "label_probs", "id"} <= has:  # COYO-Labeled-300M schema
        o = opt("url", "imagehash", "width", "height", "uid")
        sql = (f"SELECT CAST(id AS VARCHAR) AS key, id, {o['uid']}, {o['url']}, NULL AS caption, {o['width']}, "
               f"{o['height']}, {o['imagehash']}, NULL AS sha256, NULL AS source_shard, NULL AS source_label, "
               "NULL AS source_path, labels, label_probs FROM src")
        return Input("labels_table", sql, units, "in21k", None, False, root=src)
    if "uid" in has:  # DataComp metadata and the like
        o = opt("url", "width", "height", "sha256")
        cap = "text" if "text" in has else ("caption" if "caption" in has else "NULL")
        idcol = "id" if "id" in has else "NULL::BIGINT"
        sql = (f"SELECT uid AS key, {idcol} AS id, uid, {o['url']}, {cap} AS caption, {o['width']}, {o['height']}, "
               f"NULL AS imagehash, {o['sha256']}, NULL AS source_shard, NULL AS source_label, NULL AS source_path, "
               "NULL::INTEGER[] AS labels, NULL::FLOAT[] AS label_probs FROM src")
        return Input("samples_table", sql, units, None, None, False, root=src)
    raise UserError(f"{cfg.source}: a bare table needs the COYO-Labeled columns (id, labels, label_probs) or a uid "
                    f"column (has: {', '.join(sorted(has))})")


def has_source_labels(con: Any, pool: Input) -> bool:
    """Whether any successful sample of the dataset has a source label (ImageFolder class, .cls)."""
    if pool.kind != "dataset":
        return False
    return bool(con.execute("SELECT EXISTS (SELECT 1 FROM samples WHERE label IS NOT NULL "
                            "AND status = 'success')").fetchone()[0])


# ---------------------------------------------------------------------------------------
# key tables for the units


def write_keys(path: Path, column: str, values: Iterable[str], positions: bool = False) -> str:
    """A one-column string table (sorted, distinct) for the units, with ``positions``
    a ``pos`` column too (the row number); returns its path (a selection at a URL: uploaded
    too, so a unit on any node reads it)."""
    arr = pa.array(sorted(set(values)), pa.string())
    cols = {column: arr, **({"pos": pa.array(np.arange(len(arr), dtype=np.int64))} if positions else {})}
    with atomic_write(path) as f:
        pq.write_table(pa.table(cols), f)
    return str(path)


def write_uid_list(uids: pa.Table, path: Path) -> str:
    """The ``--uids`` table (:func:`.rules.load_uids`) as (uid, copies, pos) for the units,
    pos its row in the sorted list; returns the path."""
    with atomic_write(path) as f:
        pq.write_table(uids.append_column("pos", pa.array(np.arange(uids.num_rows, dtype=np.int64))), f)
    return str(path)


_EXACT = """SELECT key, k0 FROM (
    SELECT key, first_value(key) OVER w AS k0, row_number() OVER w AS r
    FROM pool1 WHERE {col} IS NOT NULL WINDOW w AS (PARTITION BY {col} ORDER BY key))
WHERE r > 1 ORDER BY key"""
_EXACT_BY = {col: _EXACT.format(col=col) for col in ("sha256", "imagehash")}  # constant texts


def _hashes(con: Any) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(keys, uint64 pHashes, valid mask) of the pool after ``--uids``, in key order."""
    from silverlabel.dedupe import hex_to_u64_masked

    t = con.sql("SELECT key, imagehash FROM pool1 ORDER BY key").to_arrow_table()
    vals, valid = hex_to_u64_masked(t.column("imagehash"))
    return t.column("key").to_pylist(), vals, valid


def duplicate_rules(cfg: SelectConfig, con: Any, ref: np.ndarray | None
                    ) -> tuple[list[str], list[tuple], dict[str, int]]:
    """``--dedupe`` (exact: sha256, else pHash; phash:D: near duplicates, the smallest key of
    a cluster kept) and ``--exclude-near`` (``ref``: the reference pHashes) over the pool
    after ``--uids`` (view ``pool1`` of ``con``): (keys to drop, (removed, kept, distance,
    rule) rows, removed counts)."""
    drop: list[str] = []
    dups: list[tuple[str, str | None, int, str]] = []
    removed: dict[str, int] = {}
    hashes = functools.cache(lambda: _hashes(con))  # one pass over the pool for both rules
    if cfg.dedupe == "exact":
        col = "sha256" if con.execute("SELECT count(sha256) FROM pool1").fetchone()[0] else "imagehash"
        dup = con.execute(_EXACT_BY[col]).fetchall()
        drop += [r[0] for r in dup]
        dups += [(r[0], r[1], 0, "exact") for r in dup]
        removed["exact_duplicates"] = len(dup)
    elif cfg.dedupe:
        from silverlabel.dedupe import dedupe_keep_first, hamming

        try:
            d = int(cfg.dedupe.split(":", 1)[1])
        except ValueError:
            raise UserError(f"--dedupe {cfg.dedupe!r}: D must be an integer (phash:8)") from None
        keys, vals, valid = hashes()
        idx = np.flatnonzero(valid)
        keep, dup_of = dedupe_keep_first(vals[idx], d)
        g, k = idx[~keep], idx[dup_of[~keep]]
        gone = [keys[i] for i in g]
        drop += gone
        dups += list(zip(gone, [keys[i] for i in k], hamming(vals[g], vals[k]).tolist(), ["near"] * len(gone)))
        removed[f"near_duplicates_phash_{d}"] = len(gone)
    if ref is not None:
        from silverlabel.dedupe import hamming, near_any

        keys, vals, valid = hashes()
        idx = np.flatnonzero(valid)
        hit, ref_of = near_any(vals[idx], ref, cfg.max_distance)
        gone = [keys[i] for i in idx[hit]]
        drop += gone
        dist = hamming(vals[idx[hit]], ref[ref_of[hit]]).tolist()
        dups += list(zip(gone, [None] * len(gone), dist, ["near_reference"] * len(gone)))
        removed["near_reference"] = len(gone)
    return drop, dups, removed


def write_duplicates(path: Path, dups: list[tuple]) -> None:
    """``duplicates.parquet``: removed_key, kept_key, distance, rule."""
    cols = list(zip(*dups)) if dups else [[], [], [], []]
    with atomic_write(path) as f:
        pq.write_table(pa.table({"removed_key": pa.array(cols[0], pa.string()),
                                 "kept_key": pa.array(cols[1], pa.string()),
                                 "distance": pa.array(cols[2], pa.int32()),
                                 "rule": pa.array(cols[3], pa.string())}), f, compression="zstd")
