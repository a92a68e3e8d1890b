"""``silverlabel select``: classes, splits, subsets, uid lists and de-duplication.

Input is a silverlabel dataset (samples + labels), a bare labels table in the
COYO-Labeled-300M schema (no images), or a bare samples/metadata table with a ``uid``
column (DataComp metadata). Everything runs as DuckDB queries over the parquet files, so
a 300M-row table never needs 300M rows in Python; only the 64-bit pHashes (8 bytes a row)
come into memory when near-duplicates are searched.

The rules, in order: uid list (``--uids``) -> exact / near-duplicate removal
(``--dedupe``, ``--exclude-near``) -> label rule (``--label top1|source``, label-space
remapping, WordNet roll-up) -> ``--min-prob`` -> class filter (``--val-per-class``,
``--min-train-per-class``, ``--top-classes``) -> validation draw -> ``--fraction
--balanced`` subset of train -> ``--keys-file``. All random draws are functions of
(``--seed``, key) through md5, so the same input and seed give the same selection.

    >>> balanced_quotas({"a": 500, "b": 500, "c": 500}, total=7, seed=0)
    {'a': 2, 'b': 2, 'c': 3}
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from silverlabel import __version__
from silverlabel.dataset import Dataset, atomic_write, write_json_atomic
from silverlabel.errors import UserError
from silverlabel.formats.selection import CLASSES_FILE, REPORT_FILE, SELECTION_DIR, SELECTION_SCHEMA

ROWS_PER_PART = 1_000_000
#: What the duplicate rules removed: removed_key, kept_key (null for --exclude-near), distance, rule.
DUPLICATES_FILE = "duplicates.parquet"


@dataclass(frozen=True)
class SelectConfig:
    """Everything ``select`` needs (see the module docstring for the order of the rules)."""

    source: str
    output: str
    labels_name: str | None = None  # which labels/{name} of a dataset (default: the only/first one)
    label: str = "auto"  # auto | top1 | source | none
    min_prob: float | None = None
    multi_label: bool = False
    label_space: str | None = None  # remap to in12k | in1k (from the labels' space)
    rollup_depth: int | None = None
    rollup_to: str | None = None
    top_classes: int | None = None
    val_per_class: int = 0
    min_train_per_class: int = 0
    fraction: float | None = None
    balanced: bool = False
    keys_file: str | None = None
    uids: str | None = None
    dedupe: str | None = None  # exact | phash:D
    exclude_near: str | None = None
    max_distance: int = 8
    seed: int = 0
    memory_limit: str = "4GB"
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)

    def __post_init__(self) -> None:
        if self.label not in ("auto", "top1", "source", "none"):
            raise UserError(f"--label must be top1 or source, not {self.label!r}")
        if self.min_prob is not None and not 0 <= self.min_prob <= 1:
            raise UserError(f"--min-prob must be in 0..1, got {self.min_prob}")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise UserError(f"--fraction must be in (0, 1], got {self.fraction}")
        if self.fraction is not None and not self.balanced:
            raise UserError("--fraction needs --balanced (the label-balanced tfds/SimCLR rule)")
        if self.rollup_depth is not None and self.rollup_to:
            raise UserError("use --rollup-depth or --rollup-to, not both")
        if self.dedupe is not None and self.dedupe != "exact" and not self.dedupe.startswith("phash:"):
            raise UserError(f"--dedupe must be exact or phash:D, not {self.dedupe!r}")
        for name in ("val_per_class", "min_train_per_class", "max_distance"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0")

    def output_config(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("output", "memory_limit", "threads"):
            d.pop(k)
        return d


@dataclass
class SelectSummary:
    output: str
    rows: int
    splits: dict[str, int]
    classes: int
    removed: dict[str, int]
    seconds: float
    from_table: bool


# ---------------------------------------------------------------------------------------
# pure helpers (tested directly)


def balanced_quotas(counts: dict[Any, int], total: int, seed: int) -> dict[Any, int]:
    """The tfds/SimCLR balanced-subset rule: ``total`` samples, equal per class, the
    remainder one extra each for randomly chosen classes.

    1% of ImageNet's 1,281,167 over 1,000 classes -> 12,811 = 811 x 13 + 189 x 12.
    Raises when a class has fewer samples than its quota.
    """
    classes = sorted(counts)
    k = len(classes)
    if k == 0:
        return {}
    base, extra = divmod(total, k)
    rng = np.random.default_rng(seed)
    lucky = set(np.asarray(classes, dtype=object)[rng.permutation(k)[:extra]].tolist()) if extra else set()
    quotas = {c: base + (1 if c in lucky else 0) for c in classes}
    short = [c for c in classes if counts[c] < quotas[c]]
    if short:
        c = short[0]
        raise UserError(f"class {c!r} has {counts[c]} training samples, fewer than its quota {quotas[c]} "
                         f"({len(short)} such classes); lower --fraction or filter classes first")
    return quotas


def load_uids(path: str) -> pa.Table:
    """A uid list as a table (uid, copies): DataComp ``uids.npy`` (dtype ``u8,u8``) or text."""
    if path.endswith(".npy"):
        arr = np.load(path, allow_pickle=False)
        if arr.dtype.names is None or len(arr.dtype.names) != 2:
            raise UserError(f"{path}: expected a structured array of dtype ('u8','u8'), got {arr.dtype}")
        a, b = (arr[n].astype(np.uint64) for n in arr.dtype.names)
        uids = [f"{int(x):016x}{int(y):016x}" for x, y in zip(a.tolist(), b.tolist())]
    else:
        with open(path) as f:
            uids = [line.strip().lower() for line in f if line.strip()]
        bad = next((u for u in uids if len(u) != 32 or any(c not in "0123456789abcdef" for c in u)), None)
        if bad is not None:
            raise UserError(f"{path}: {bad!r} is not a 32-hex uid")
    vals, counts = np.unique(np.asarray(uids, dtype=object).astype(str), return_counts=True)
    return pa.table({"uid": pa.array(vals.tolist(), pa.string()), "copies": pa.array(counts.astype(np.int32))})


def uids_to_npy(uids: Sequence[str], path: str) -> None:
    """Write uids DataComp-style: sorted ``np.dtype("u8,u8")`` = (int(uid[:16],16), int(uid[16:],16))."""
    arr = np.array(sorted((int(u[:16], 16), int(u[16:32], 16)) for u in uids), dtype=np.dtype("u8,u8"))
    np.save(path, arr)


# ---------------------------------------------------------------------------------------
# inputs


@dataclass
class _Input:
    kind: str  # dataset | labels_table | samples_table
    pool_sql: str  # a SELECT producing the pool's common columns
    label_space: str | None
    source_dataset: str | None
    has_labels: bool
    has_source_labels: bool


def _glob(path: Path) -> str:
    return str(path / "*.parquet") if path.is_dir() else str(path)


def _open_input(cfg: SelectConfig, con) -> _Input:
    src = Path(cfg.source)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such dataset, file or folder")
    if (src / "silverlabel.json").is_file():
        ds = Dataset(src)
        man = ds.read_manifest()
        if man.get("stage") != "ingest":
            raise UserError(f"{src}: select reads an ingest dataset, this one is {man.get('stage')!r}")
        samples = _glob(ds.samples_dir)
        labels = man.get("labels", {})
        name = cfg.labels_name or (sorted(labels)[0] if labels else None)
        if cfg.labels_name and cfg.labels_name not in labels:
            raise UserError(f"{src}: no labels named {cfg.labels_name!r} (have: {', '.join(labels) or 'none'})")
        cols = ("s.key, s.id, s.uid, s.url, s.caption, s.width, s.height, s.imagehash, s.sha256, "
                "s.shard AS source_shard, s.label AS source_label, s.source AS source_path")
        if name:
            label_glob = _glob(ds.root / "labels" / name)
            sql = (f"SELECT {cols}, l.labels, l.label_probs FROM read_parquet('{samples}') s "
                   f"JOIN read_parquet('{label_glob}') l USING (key) WHERE s.status = 'success'")
            space = labels[name]["config"]["label_space"]
        else:
            sql = (f"SELECT {cols}, NULL::INTEGER[] AS labels, NULL::FLOAT[] AS label_probs "
                   f"FROM read_parquet('{samples}') s WHERE s.status = 'success'")
            space = None
        has_source = con.execute(f"SELECT count(*) FROM read_parquet('{samples}') WHERE label IS NOT NULL "
                                 "AND status = 'success'").fetchall()[0][0] > 0
        return _Input("dataset", sql, space, str(src.resolve()), name is not None, has_source)
    glob = _glob(src)
    try:
        names = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet('{glob}')").fetchall()]
    except Exception as e:
        raise UserError(f"{src}: not a silverlabel dataset nor readable parquet ({str(e).splitlines()[0]})") from None
    has = set(names)
    if {"labels", "label_probs", "id"} <= has:  # COYO-Labeled-300M schema
        key = "CAST(id AS VARCHAR)"
        opt = {c: (c if c in has else f"NULL AS {c}") for c in ("url", "imagehash", "width", "height", "uid")}
        sql = (f"SELECT {key} AS key, id, {opt['uid']}, {opt['url']}, NULL AS caption, {opt['width']}, "
               f"{opt['height']}, {opt['imagehash']}, NULL AS sha256, NULL AS source_shard, NULL AS source_label, "
               f"NULL AS source_path, labels, label_probs FROM read_parquet('{glob}')")
        return _Input("labels_table", sql, "in21k", None, True, False)
    if "uid" in has:  # DataComp metadata and the like
        opt = {c: (c if c in has else f"NULL AS {c}") for c in ("url", "width", "height", "sha256")}
        cap = "text" if "text" in has else ("caption" if "caption" in has else "NULL")
        idcol = "id" if "id" in has else "NULL::BIGINT"
        sql = (f"SELECT uid AS key, {idcol} AS id, uid, {opt['url']}, {cap} AS caption, {opt['width']}, "
               f"{opt['height']}, NULL AS imagehash, {opt['sha256']}, NULL AS source_shard, NULL AS source_label, "
               f"NULL AS source_path, NULL::INTEGER[] AS labels, NULL::FLOAT[] AS label_probs FROM read_parquet('{glob}')")
        return _Input("samples_table", sql, None, None, False, False)
    raise UserError(f"{src}: a bare table needs the COYO-Labeled columns (id, labels, label_probs) or a uid column "
                     f"(has: {', '.join(names)})")


# ---------------------------------------------------------------------------------------
# label spaces: remapping and roll-up as an index map + the output classes


def _label_mapping(cfg: SelectConfig, space: str) -> tuple[np.ndarray | None, list[str]]:
    """(map from the labels' indices to output indices or None, output wnids)."""
    from silverlabel.teachers.hierarchy import load_hierarchy
    from silverlabel.teachers.labelspace import get_label_space, index_map

    src = get_label_space(space)
    if cfg.rollup_depth is not None or cfg.rollup_to:
        hier = load_hierarchy()
        if cfg.rollup_to:
            with open(cfg.rollup_to) as f:
                targets = {line.split()[0] for line in f if line.strip() and not line.startswith("#")}
            unknown = [t for t in targets if t not in hier]
            if unknown:
                raise UserError(f"{cfg.rollup_to}: {unknown[0]!r} is not a WordNet synset")
            dst = [hier.nearest_in(w, targets) if w in hier else None for w in src.wnids]
        else:
            dst = [hier.ancestor_at_depth(w, cfg.rollup_depth) if w in hier else None for w in src.wnids]
        out = sorted({d for d in dst if d})
        pos = {w: i for i, w in enumerate(out)}
        return np.array([pos[d] if d else -1 for d in dst], np.int64), out
    if cfg.label_space and cfg.label_space != src.name:
        dst = get_label_space(cfg.label_space)
        return np.asarray(index_map(src, dst), np.int64), list(dst.wnids)
    return None, list(src.wnids)


def _class_name(wnid: str) -> str:
    from silverlabel.teachers.hierarchy import load_hierarchy

    hier = load_hierarchy()
    return hier.lemma(wnid) if wnid in hier else wnid


# ---------------------------------------------------------------------------------------
# the driver


def _hashes(con, sql: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(keys, uint64 pHashes, valid mask) of a query's key/imagehash columns."""
    from silverlabel.dedupe import hex_to_u64_masked

    t = con.sql(f"SELECT key, imagehash FROM ({sql}) ORDER BY key").to_arrow_table()
    vals, valid = hex_to_u64_masked(t.column("imagehash"))
    return t.column("key").to_pylist(), vals, valid


def _reference_hashes(path: str) -> np.ndarray:
    p = Path(path)
    if (p / "silverlabel.json").is_file():
        t = pq.read_table(p / "samples", columns=["imagehash", "status"])
        hexes = [h for h, s in zip(t.column("imagehash").to_pylist(), t.column("status").to_pylist())
                 if s == "success" and h]
    elif p.suffix == ".parquet" or p.is_dir():
        hexes = [h for h in pq.read_table(p, columns=["imagehash"]).column("imagehash").to_pylist() if h]
    else:
        with open(p) as f:
            hexes = [line.split()[0] for line in f if line.strip()]
    try:
        return np.array([int(h, 16) for h in hexes], dtype=np.uint64)
    except ValueError:
        raise UserError(f"{path}: expected 16-hex pHashes") from None


def choose_classes(counts: dict[str, int], cfg: SelectConfig, mode: str, wnids: list[str]
                   ) -> tuple[set[str], list[str], dict[str, int], dict[str, tuple[str | None, str]]]:
    """The class rule: classes with >= V + T samples, the N largest (ties by id); returns
    ``(chosen, class_ids in output order, cls_of, names {id: (wnid, name)})``. Shared by the
    DuckDB path and the sharded one."""
    need = cfg.val_per_class + cfg.min_train_per_class
    eligible = {c: n for c, n in counts.items() if n >= max(1, need)}
    ranked = sorted(eligible, key=lambda c: (-eligible[c], c))
    if cfg.top_classes is not None:
        ranked = ranked[: cfg.top_classes]
    chosen = set(ranked)
    if mode != "none" and not chosen:
        raise UserError("no class is left after the class rules (lower --val-per-class/--min-train-per-class)")
    class_ids = sorted(chosen, key=(lambda c: (0, int(c))) if mode == "top1" else (lambda c: (0, c)))
    cls_of = {c: i for i, c in enumerate(class_ids)}
    if mode == "top1":
        names = {c: (wnids[int(c)], _class_name(wnids[int(c)])) for c in class_ids}
    else:
        names = {c: (None, c) for c in class_ids}
    return chosen, class_ids, cls_of, names


def write_classes_and_report(out: Path, class_ids: list, cls_of: dict, names: dict, mode: str, label_space: str,
                             by_cls: dict[int, dict[str, int]], report: dict[str, Any]) -> None:
    """``classes.json`` (cls, wnid, name, source index, per-split counts) and ``report.json``
    of a selection; shared by the DuckDB path and the sharded one (select_sharded)."""
    write_json_atomic(out / CLASSES_FILE, {
        "label_space": label_space,
        "num_classes": len(class_ids),
        "classes": [
            {"cls": cls_of[c], "wnid": names[c][0], "name": names[c][1],
             "source_index": int(c) if mode == "top1" else None,
             "train": by_cls.get(cls_of[c], {}).get("train", 0),
             "validation": by_cls.get(cls_of[c], {}).get("validation", 0)}
            for c in class_ids
        ],
    })
    write_json_atomic(out / REPORT_FILE, report)


def run_select(cfg: SelectConfig) -> SelectSummary:
    """Select from ``cfg.source`` into the selection directory ``cfg.output``."""
    import duckdb

    t0 = time.monotonic()
    out = Path(cfg.output)
    ours = {SELECTION_DIR, CLASSES_FILE, REPORT_FILE, DUPLICATES_FILE, "silverlabel.json", "README.md", "card"}
    if out.exists() and any(p.name not in ours and not p.name.startswith(".") for p in out.iterdir()):
        raise UserError(f"{out}: exists and is not a selection; choose another -o")
    con = duckdb.connect()
    inp = _open_input(cfg, con)  # validate the input before touching the output
    # A selection is rewritten whole: drop the old manifest first, so a run that dies
    # half way leaves no manifest and `shard` refuses the folder instead of reading a mix.
    (out / "silverlabel.json").unlink(missing_ok=True)
    con.execute(f"SET memory_limit='{cfg.memory_limit}'")
    con.execute(f"SET threads={max(1, cfg.threads)}")
    con.execute("SET preserve_insertion_order=true")
    removed: dict[str, int] = {}
    con.execute(f"CREATE TEMP VIEW pool0 AS {inp.pool_sql}")
    total_in = con.execute("SELECT count(*) FROM pool0").fetchall()[0][0]
    current = "pool0"

    # 1. uid list: DataComp-style subset; a uid listed k times yields k copies
    if cfg.uids:
        uids = load_uids(cfg.uids)
        con.register("uid_list", uids)
        con.execute(f"""CREATE TEMP TABLE pool1 AS
            SELECT p.* REPLACE (CASE WHEN u.copies > 1 THEN p.key || '-' || c.i ELSE p.key END AS key),
                   p.key AS source_key
            FROM {current} p JOIN uid_list u ON p.uid = u.uid,
                 LATERAL (SELECT unnest(range(1, u.copies + 1)) AS i) c""")
        matched = con.execute("SELECT count(DISTINCT source_key) FROM pool1").fetchall()[0][0]
        removed["not_in_uids"] = total_in - matched
        removed["uids_missing_from_pool"] = int(len(uids)) - con.execute(
            f"SELECT count(DISTINCT uid) FROM {current} WHERE uid IN (SELECT uid FROM uid_list)").fetchall()[0][0]
        current = "pool1"
    else:
        con.execute(f"CREATE TEMP VIEW pool1 AS SELECT *, key AS source_key FROM {current}")
        current = "pool1"

    # 2. duplicates: exact (sha256, else pHash) and near (pHash within D), keep the smallest key
    drop_keys: list[str] = []
    dups: list[tuple[str, str | None, int, str]] = []  # (removed, kept, distance, rule) -> DUPLICATES_FILE
    if cfg.dedupe == "exact":
        col = "sha256" if con.execute(f"SELECT count(sha256) FROM {current}").fetchall()[0][0] else "imagehash"
        dup = con.execute(f"""SELECT key, k0 FROM (SELECT key, first_value(key) OVER w AS k0, row_number() OVER w AS r
                              FROM {current} WHERE {col} IS NOT NULL WINDOW w AS (PARTITION BY {col} ORDER BY key))
                              WHERE r > 1""").fetchall()
        drop_keys += [r[0] for r in dup]
        dups += [(r[0], r[1], 0, "exact") for r in dup]
        removed["exact_duplicates"] = len(dup)
    elif cfg.dedupe:
        from silverlabel.dedupe import dedupe_keep_first, hamming

        d = int(cfg.dedupe.split(":", 1)[1])
        keys, vals, valid = _hashes(con, f"SELECT * FROM {current}")
        idx = np.flatnonzero(valid)
        keep, dup_of = dedupe_keep_first(vals[idx], d)
        gone = [keys[i] for i in idx[~keep]]
        drop_keys += gone
        g, k = idx[~keep], idx[dup_of[~keep]]
        dups += list(zip(gone, [keys[i] for i in k], hamming(vals[g], vals[k]).tolist(), ["near"] * len(gone)))
        removed[f"near_duplicates_phash_{d}"] = len(gone)
    if cfg.exclude_near:
        from silverlabel.dedupe import hamming, near_any

        ref = _reference_hashes(cfg.exclude_near)
        keys, vals, valid = _hashes(con, f"SELECT * FROM {current}")
        idx = np.flatnonzero(valid)
        hit, ref_of = near_any(vals[idx], ref, cfg.max_distance)
        gone = [keys[i] for i in idx[hit]]
        drop_keys += gone
        dist = hamming(vals[idx[hit]], ref[ref_of[hit]]).tolist()
        dups += list(zip(gone, [None] * len(gone), dist, ["near_reference"] * len(gone)))
        removed["near_reference"] = len(gone)
    if drop_keys:
        con.register("drop_keys", pa.table({"key": pa.array(sorted(set(drop_keys)), pa.string())}))
        con.execute(f"CREATE TEMP VIEW pool2 AS SELECT * FROM {current} WHERE key NOT IN (SELECT key FROM drop_keys)")
        current = "pool2"

    # 3. label rule -> (class id string, top-1 prob, remapped labels)
    mode = cfg.label
    if mode == "auto":
        mode = "top1" if inp.has_labels else ("source" if inp.has_source_labels else "none")
    if mode == "top1" and not inp.has_labels:
        raise UserError(f"{cfg.source}: has no teacher labels (run silverlabel label first, or use --label source)")
    if mode == "source" and not inp.has_source_labels:
        raise UserError(f"{cfg.source}: has no source labels (ImageFolder classes or .cls); use --label top1")
    wnids: list[str] = []
    n_before = con.execute(f"SELECT count(*) FROM {current}").fetchall()[0][0]  # rows a remap empties count below
    if mode == "top1":
        mapping, wnids = _label_mapping(cfg, inp.label_space)
        if mapping is not None:  # remap + re-rank the top-k in the output space
            con.register("label_map", pa.table({"src": pa.array(np.arange(len(mapping)), pa.int32()),
                                                "dst": pa.array(mapping.astype(np.int32))}))
            con.execute(f"""CREATE TEMP VIEW pool3 AS
                WITH u AS (SELECT key, unnest(labels) AS l, unnest(label_probs) AS p FROM {current}),
                     m AS (SELECT key, dst, sum(p)::FLOAT AS p FROM u JOIN label_map ON u.l = label_map.src
                           WHERE dst >= 0 GROUP BY key, dst),
                     r AS (SELECT key, list(dst ORDER BY p DESC, dst) AS labels2,
                                  list(p ORDER BY p DESC, dst) AS probs2 FROM m GROUP BY key)
                SELECT c.* REPLACE (r.labels2 AS labels, r.probs2 AS label_probs)
                FROM {current} c JOIN r USING (key)""")
            current = "pool3"
        prob_filter = ""
        if cfg.min_prob is not None:
            prob_filter = f"WHERE label_probs[1] >= {cfg.min_prob}"
        labels_expr = "labels, label_probs"
        if cfg.multi_label and cfg.min_prob is not None:
            labels_expr = (f"list_filter(labels, lambda x, i: label_probs[i] >= {cfg.min_prob}) AS labels, "
                           f"list_filter(label_probs, lambda x: x >= {cfg.min_prob}) AS label_probs")
        con.execute(f"""CREATE TEMP VIEW labeled AS
            SELECT * EXCLUDE (labels, label_probs), CAST(labels[1] AS VARCHAR) AS class_id, {labels_expr}
            FROM {current} {prob_filter}""")
    elif mode == "source":
        con.execute(f"CREATE TEMP VIEW labeled AS SELECT *, source_label AS class_id FROM {current} "
                    "WHERE source_label IS NOT NULL")
    else:
        con.execute(f"CREATE TEMP VIEW labeled AS SELECT *, NULL::VARCHAR AS class_id FROM {current}")
    n_labeled = con.execute("SELECT count(*) FROM labeled").fetchall()[0][0]
    if n_before - n_labeled:
        removed["below_min_prob_or_unlabeled"] = n_before - n_labeled

    # 4. classes: big enough for V validation + T training, then the N largest
    counts = dict(con.execute("SELECT class_id, count(*) FROM labeled WHERE class_id IS NOT NULL GROUP BY 1").fetchall())
    chosen, class_ids, cls_of, names = choose_classes(counts, cfg, mode, wnids)
    con.register("classes_t", pa.table({
        "class_id": pa.array(class_ids, pa.string()),
        "cls": pa.array([cls_of[c] for c in class_ids], pa.int32()),
        "class_name": pa.array([names[c][1] for c in class_ids], pa.string()),
    }))
    removed_by_class = sum(n for c, n in counts.items() if c not in chosen)
    if removed_by_class:
        removed["class_filter"] = removed_by_class

    # 5. validation: V per class at random (md5 of seed and key); the rest is train. The
    #    per-sample rules run on a narrow table (key, class, names to match), never on the
    #    wide rows with their label lists; those are joined back once, when writing.
    con.execute("""CREATE TEMP TABLE narrow AS SELECT key, class_id, uid,
                   regexp_extract(coalesce(source_path, url, ''), '[^/#]+$') AS fname FROM labeled""")
    rnd = f"md5('{cfg.seed}:' || key)"
    if mode == "none":
        con.execute("CREATE TEMP VIEW split_t AS SELECT key, uid, fname, -1::INTEGER AS cls, "
                    "NULL::VARCHAR AS class_name, 'train' AS split FROM narrow")
    else:
        con.execute(f"""CREATE TEMP VIEW split_t AS
            SELECT key, uid, fname, cls, class_name,
                   CASE WHEN r <= {cfg.val_per_class} THEN 'validation' ELSE 'train' END AS split
            FROM (SELECT n.*, c.cls, c.class_name,
                         row_number() OVER (PARTITION BY n.class_id ORDER BY {rnd}, key) AS r
                  FROM narrow n JOIN classes_t c USING (class_id))""")
    final = "split_t"

    # 6. balanced fraction of train (imagenet2012_subset)
    if cfg.fraction is not None:
        if mode == "none":
            raise UserError("--fraction --balanced needs labels (--label top1 or source)")
        train_counts = dict(con.execute("SELECT cls, count(*) FROM split_t WHERE split='train' "
                                        "GROUP BY 1").fetchall())
        n_train = sum(train_counts.values())
        total = math.floor(cfg.fraction * n_train + 1e-9)
        quotas = balanced_quotas(train_counts, total, cfg.seed)
        con.register("quota_t", pa.table({"cls": pa.array(list(quotas), pa.int32()),
                                          "quota": pa.array(list(quotas.values()), pa.int64())}))
        con.execute(f"""CREATE TEMP VIEW frac_t AS
            SELECT * EXCLUDE (r, quota) FROM (
                SELECT s.*, q.quota, row_number() OVER (PARTITION BY s.cls ORDER BY md5('{cfg.seed}:f:' || key), key) AS r
                FROM split_t s JOIN quota_t q USING (cls) WHERE s.split = 'train')
            WHERE r <= quota
            UNION ALL SELECT * FROM split_t WHERE split <> 'train'""")
        removed["outside_fraction"] = n_train - total
        final = "frac_t"

    # 7. an official key list (SimCLR's 1percent.txt: file names)
    if cfg.keys_file:
        with open(cfg.keys_file) as f:
            wanted = sorted({line.strip() for line in f if line.strip()})
        con.register("keys_t", pa.table({"name": pa.array(wanted, pa.string())}))
        n0 = con.execute(f"SELECT count(*) FROM {final}").fetchall()[0][0]
        con.execute(f"""CREATE TEMP VIEW keys_v AS SELECT * FROM {final}
            WHERE key IN (SELECT name FROM keys_t) OR uid IN (SELECT name FROM keys_t)
               OR fname IN (SELECT name FROM keys_t)""")
        final = "keys_v"
        removed["not_in_keys_file"] = n0 - con.execute(f"SELECT count(*) FROM {final}").fetchall()[0][0]

    # write: parts of the selection table in (split, key) order, then classes, report, manifest
    src_ds = f"'{inp.source_dataset}'" if inp.source_dataset else "NULL"
    query = f"""SELECT w.key, w.source_key, CAST(w.id AS BIGINT) AS id, w.uid, w.url, w.caption, f.split,
                       CAST(f.cls AS INTEGER) AS cls, f.class_name,
                       CAST(w.labels AS INTEGER[]) AS labels, CAST(w.label_probs AS FLOAT[]) AS label_probs,
                       CAST(w.width AS INTEGER) AS width, CAST(w.height AS INTEGER) AS height, w.imagehash,
                       {src_ds} AS source_dataset, w.source_shard
                FROM labeled w JOIN {final} f USING (key) ORDER BY f.split, w.key"""
    sel_dir = out / SELECTION_DIR
    sel_dir.mkdir(parents=True, exist_ok=True)
    for old in sel_dir.glob("*.parquet"):
        old.unlink()
    reader = con.sql(query).to_arrow_reader(ROWS_PER_PART)
    part = 0
    rows = 0
    for batch in reader:
        table = pa.Table.from_batches([batch]).cast(SELECTION_SCHEMA)
        with atomic_write(sel_dir / f"part-{part:05d}.parquet") as f:
            pq.write_table(table, f, compression="zstd")
        part += 1
        rows += table.num_rows
    if part == 0:
        with atomic_write(sel_dir / "part-00000.parquet") as f:
            pq.write_table(SELECTION_SCHEMA.empty_table(), f)
    per_class = con.execute(f"SELECT cls, split, count(*) FROM {final} GROUP BY 1, 2").fetchall()
    splits = dict(con.execute(f"SELECT split, count(*) FROM {final} GROUP BY 1 ORDER BY 1").fetchall())
    by_cls: dict[int, dict[str, int]] = {}
    for c, s, n in per_class:
        by_cls.setdefault(c, {})[s] = n
    if mode != "top1":
        label_space_name = mode  # "source" names, or "none"
    elif cfg.rollup_depth is not None or cfg.rollup_to:
        label_space_name = "wordnet-rollup"
    else:
        label_space_name = cfg.label_space or inp.label_space
    write_classes_and_report(out, class_ids, cls_of, names, mode, label_space_name, by_cls,
                             {"input_rows": total_in, "selected_rows": rows, "splits": splits,
                              "classes": len(class_ids), "removed": removed, "label_rule": mode})
    if cfg.dedupe or cfg.exclude_near:
        cols = list(zip(*dups)) if dups else [[], [], [], []]
        with atomic_write(out / DUPLICATES_FILE) as f:
            pq.write_table(pa.table({"removed_key": pa.array(cols[0], pa.string()),
                                     "kept_key": pa.array(cols[1], pa.string()),
                                     "distance": pa.array(cols[2], pa.int32()),
                                     "rule": pa.array(cols[3], pa.string())}), f, compression="zstd")
    else:
        (out / DUPLICATES_FILE).unlink(missing_ok=True)
    Dataset(out).write_manifest({
        "stage": "select",
        "silverlabel_version": __version__,
        "config": cfg.output_config(),
        "parents": [{"kind": inp.kind, "path": str(Path(cfg.source).resolve())}],
        "counts": {"rows": rows, **{f"split_{k}": v for k, v in splits.items()}},
        "from_table": inp.source_dataset is None,
    })
    con.close()
    return SelectSummary(str(out), rows, splits, len(class_ids), removed, time.monotonic() - t0,
                         inp.source_dataset is None)


