"""One unit of ``select``: the per-sample rules as DuckDB SQL over the unit's parquet files.

A unit is a few parquet files: one shard's samples and its labels file, one file of a bare
table, or (the local engine's fast path) the whole pool. DuckDB runs in-process, so the
same function runs in the driver's process, a local worker or a Ray task, reading the files
directly. The SQL text depends only on the plan (which rules are on), never on the unit or
on data: files come in as DuckDB relations (no path in any SQL text), values as bound
parameters (``--min-prob``, used inside views, as a DuckDB variable set by a parameter), and
what the driver decided for the whole pool (listed uids, keys to drop, validation keys,
...) as small parquet files read the same way, or Arrow tables for the small maps.

The views, each over the one before:

========  ================================================================================
pool0     the input's common columns: successful samples joined with their labels, or a
          bare table (:func:`silverlabel.stages.select.pool.open_input` writes this SELECT)
pool1     ``--uids``: rows whose uid is listed; a uid listed ``k > 1`` times gives ``k``
          rows ``key-1..key-k``; ``source_key`` is the sample's own key
pool2     minus the keys the pool-wide rules dropped (``--dedupe``, ``--exclude-near``)
pool3     ``--label-space`` / ``--rollup-*``: the top-k mapped, the probabilities of
          classes that land on one target summed, re-ranked by (p desc, class); a row
          none of whose labels maps is dropped
labeled   the label rule (``class_id``), ``--min-prob``, ``--multi-label``
narrow    key, class_id, uid, fname: what the draws and ``--keys-file`` look at
========  ================================================================================

One function per pass of the driver (:mod:`silverlabel.stages.select.run`):
:func:`count_unit` (counts, validation candidates), :func:`fraction_unit` (the balanced
fraction's candidates) and :func:`write_unit` (the unit's part of the selection table).
All random draws are ``md5(seed:key)`` ranks, so a unit's candidates merged over units are
exactly what one unit over the whole pool ranks first.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from silverlabel.dataset import atomic_write, fetch_local, local_target
from silverlabel.engine import Report
from silverlabel.formats.selection import SELECTION_DIR, SELECTION_SCHEMA

#: Rows per part file of the selection table.
ROWS_PER_PART = 1_000_000


@dataclass(frozen=True)
class Unit:
    """Parquet files of the pool: samples files (a dataset) or table files (a bare table),
    and the labels files that go with the samples."""

    index: int
    files: tuple[str, ...]
    labels: tuple[str, ...] = ()

    def all_files(self) -> tuple[str, ...]:
        return self.files + self.labels


@dataclass(frozen=True)
class Plan:
    """What every unit of a pass needs; the driver adds to it pass by pass."""

    kind: str  # dataset | labels_table | samples_table
    pool_sql: str  # the SELECT of view pool0 (over views samples + labels, or src)
    joins_labels: bool  # pool0 joins samples with labels: a unit without labels files has no rows
    output: str  # the selection directory (absolute)
    tmp: str  # its temporary folder (absolute): key tables, and where DuckDB spills beyond memory_limit
    mode: str | None = None  # top1 | source | none; None: only the pool views (the driver's pool step)
    seed: int = 0
    val_per_class: int = 0
    min_prob: float | None = None
    multi_label: bool = False
    source_dataset: str | None = None
    memory_limit: str = "4GB"
    threads: int = 1
    #: key tables decided for the whole pool, as parquet files: uid_list (uid, copies, pos),
    #: drop_keys (key), validation_keys (key), fraction_keys (key), wanted (name, pos)
    files: dict[str, str] = field(default_factory=dict)
    #: small maps as Arrow tables: label_map (src, dst), classes_t (class_id, cls, class_name),
    #: quota_t (cls, quota)
    tables: dict[str, pa.Table] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# the SQL (constant text; only which views exist depends on the plan)

_UIDS = """SELECT p.* REPLACE (CASE WHEN u.copies > 1 THEN p.key || '-' || c.i ELSE p.key END AS key),
       p.key AS source_key
FROM pool0 p JOIN uid_list u ON p.uid = u.uid,
     LATERAL (SELECT unnest(range(1, u.copies + 1)) AS i) c"""

_REMAP = """WITH u AS (SELECT key, unnest(labels) AS l, unnest(label_probs) AS p FROM pool2),
     m AS (SELECT key, dst, sum(p)::FLOAT AS p FROM u JOIN label_map ON u.l = label_map.src
           WHERE dst >= 0 GROUP BY key, dst),
     r AS (SELECT key, list(dst ORDER BY p DESC, dst) AS labels2,
                  list(p ORDER BY p DESC, dst) AS probs2 FROM m GROUP BY key)
SELECT c.* REPLACE (r.labels2 AS labels, r.probs2 AS label_probs)
FROM pool2 c JOIN r USING (key)"""

_MIN_PROB = "CAST(getvariable('min_prob') AS FLOAT)"  # FLOAT against FLOAT, as the labels are

_NARROW = """SELECT key, class_id, uid, regexp_extract(coalesce(source_path, url, ''), '[^/#]+$') AS fname
FROM labeled"""

_CANDIDATES = """SELECT class_id, m, key FROM (
    SELECT class_id, key, md5($salt || key) AS m,
           row_number() OVER (PARTITION BY class_id ORDER BY md5($salt || key), key) AS r
    FROM narrow_t WHERE class_id IS NOT NULL)
WHERE r <= $n"""

_FRACTION = """SELECT cls, m, key FROM (
    SELECT c.cls, n.key, md5($salt || n.key) AS m, q.quota,
           row_number() OVER (PARTITION BY c.cls ORDER BY md5($salt || n.key), n.key) AS r
    FROM narrow n JOIN classes_t c USING (class_id) JOIN quota_t q USING (cls)
    WHERE n.key NOT IN (SELECT key FROM validation_keys))
WHERE r <= quota"""

_SPLIT_NONE = """SELECT key, uid, fname, -1::INTEGER AS cls, NULL::VARCHAR AS class_name, 'train' AS split
FROM narrow"""

_SPLIT = """SELECT n.key, n.uid, n.fname, c.cls, c.class_name,
       CASE WHEN n.key IN (SELECT key FROM validation_keys) THEN 'validation' ELSE 'train' END AS split
FROM narrow n JOIN classes_t c USING (class_id)"""

_IN_FRACTION = "SELECT * FROM split_v WHERE split <> 'train' OR key IN (SELECT key FROM fraction_keys)"

_WANTED = """SELECT * FROM chosen_t
WHERE key IN (SELECT name FROM wanted) OR uid IN (SELECT name FROM wanted) OR fname IN (SELECT name FROM wanted)"""

_WANTED_HITS = """SELECT w.pos FROM wanted w JOIN chosen_t c ON w.name = c.key
UNION SELECT w.pos FROM wanted w JOIN chosen_t c ON w.name = c.uid
UNION SELECT w.pos FROM wanted w JOIN chosen_t c ON w.name = c.fname"""

_ROWS = """SELECT w.key, w.source_key, CAST(w.id AS BIGINT) AS id, w.uid, w.url, w.caption, f.split,
       CAST(f.cls AS INTEGER) AS cls, f.class_name,
       CAST(w.labels AS INTEGER[]) AS labels, CAST(w.label_probs AS FLOAT[]) AS label_probs,
       CAST(w.width AS INTEGER) AS width, CAST(w.height AS INTEGER) AS height, w.imagehash,
       CAST($source_dataset AS VARCHAR) AS source_dataset, w.source_shard
FROM labeled w JOIN final_t f USING (key) ORDER BY f.split, w.key"""


def _labeled(plan: Plan) -> str:
    if plan.mode == "source":
        return "SELECT *, source_label AS class_id FROM pool2 WHERE source_label IS NOT NULL"
    if plan.mode == "none":
        return "SELECT *, NULL::VARCHAR AS class_id FROM pool2"
    src = "pool3" if "label_map" in plan.tables else "pool2"
    where = f"WHERE label_probs[1] >= {_MIN_PROB}" if plan.min_prob is not None else ""
    labels = "labels, label_probs"
    if plan.multi_label and plan.min_prob is not None:
        labels = (f"list_filter(labels, lambda x, i: label_probs[i] >= {_MIN_PROB}) AS labels, "
                  f"list_filter(label_probs, lambda x: x >= {_MIN_PROB}) AS label_probs")
    return f"SELECT * EXCLUDE (labels, label_probs), CAST(labels[1] AS VARCHAR) AS class_id, {labels} FROM {src} {where}"


def views(plan: Plan) -> list[tuple[str, str]]:
    """(name, SELECT) of the views a unit of ``plan`` creates, in order."""
    out = [("pool0", plan.pool_sql),
           ("pool1", _UIDS if "uid_list" in plan.files else "SELECT *, key AS source_key FROM pool0"),
           ("pool2", "SELECT * FROM pool1" + (" WHERE key NOT IN (SELECT key FROM drop_keys)"
                                              if "drop_keys" in plan.files else ""))]
    if plan.mode is None:
        return out
    if plan.mode == "top1" and "label_map" in plan.tables:
        out.append(("pool3", _REMAP))
    out += [("labeled", _labeled(plan)), ("narrow", _NARROW)]
    return out


def connect(unit: Unit, plan: Plan) -> Any:
    """A DuckDB connection with ``unit``'s files and ``plan``'s tables as views."""
    import duckdb

    spill = local_target(plan.tmp) / f"duckdb-{unit.index}-{os.getpid()}"  # one per attempt: a retried unit may overlap
    con = duckdb.connect(config={"memory_limit": plan.memory_limit, "threads": max(1, plan.threads),
                                 "preserve_insertion_order": False, "temp_directory": str(spill)})
    if plan.min_prob is not None:
        con.execute("SET VARIABLE min_prob = ?", [plan.min_prob])
    # a pool at a URL: its files fetched once per process into the staging folder (DuckDB reads local files)
    files = [str(fetch_local(f)) for f in unit.files]
    labels = [str(fetch_local(f)) for f in unit.labels]
    if plan.kind == "dataset":
        con.read_parquet(files).create_view("samples")
        if labels:
            con.read_parquet(labels).create_view("labels")
    else:
        con.read_parquet(files).create_view("src")
    for name, path in plan.files.items():  # a selection at a URL: the key tables fetched from the store
        con.read_parquet(str(fetch_local(path))).create_view(name)
    for name, table in plan.tables.items():
        con.register(name, table)
    for name, sql in views(plan):
        con.execute(f"CREATE TEMP VIEW {name} AS {sql}")  # name: one of views()' constants
    return con


def _count(con: Any, sql: str) -> int:
    return int(con.execute(sql).fetchone()[0])


def _empty(unit: Unit, plan: Plan) -> bool:
    return plan.joins_labels and not unit.labels


# ---------------------------------------------------------------------------------------
# the passes


def count_unit(unit: Unit, plan: Plan, report: Report | None = None) -> dict[str, Any]:
    """Pass 1: rows in, uids matched, rows left for the label rule, rows labeled, the
    count per class and per class the ``V`` validation candidates (smallest
    ``md5(seed:key), key``) as ``(class_id, md5, key)``."""
    res: dict[str, Any] = {"index": unit.index, "rows": 0, "uid_matched": 0, "uid_hits": [], "before_label": 0,
                           "labeled": 0, "counts": {}, "candidates": []}
    if not _empty(unit, plan):
        with contextlib.closing(connect(unit, plan)) as con:
            res["rows"] = _count(con, "SELECT count(*) FROM pool0")
            if "uid_list" in plan.files:
                res["uid_matched"] = _count(con, "SELECT count(DISTINCT source_key) FROM pool1")
                res["uid_hits"] = [r[0] for r in con.execute(
                    "SELECT DISTINCT u.pos FROM pool0 p JOIN uid_list u ON p.uid = u.uid").fetchall()]
            res["before_label"] = _count(con, "SELECT count(*) FROM pool2")
            con.execute("CREATE TEMP TABLE narrow_t AS SELECT key, class_id FROM narrow")
            res["labeled"] = _count(con, "SELECT count(*) FROM narrow_t")
            res["counts"] = dict(con.execute("SELECT class_id, count(*) FROM narrow_t WHERE class_id IS NOT NULL "
                                             "GROUP BY 1").fetchall())
            if plan.val_per_class:
                res["candidates"] = con.execute(_CANDIDATES, {"salt": f"{plan.seed}:",
                                                              "n": plan.val_per_class}).fetchall()
    if report:
        report(res["rows"], res["labeled"])
    return res


def fraction_unit(unit: Unit, plan: Plan, report: Report | None = None) -> dict[str, Any]:
    """Pass 2 (``--fraction --balanced``): per class the ``quota`` train rows with the
    smallest ``md5(seed:f:key), key``, as ``(cls, md5, key)``."""
    best: list[tuple[int, str, str]] = []
    if not _empty(unit, plan):
        with contextlib.closing(connect(unit, plan)) as con:
            best = con.execute(_FRACTION, {"salt": f"{plan.seed}:f:"}).fetchall()
    return {"index": unit.index, "best": best}


class _Parts:
    """The unit's rows as ``selection/part-{unit:05d}-{j:05d}.parquet`` files of at most
    ``ROWS_PER_PART`` rows, each written atomically."""

    def __init__(self, folder: Path, index: int):
        self.folder, self.index = folder, index
        self.names: list[str] = []  # the part files written, in order
        self.part = self.in_part = 0
        self.stack: contextlib.ExitStack | None = None
        self.writer: pq.ParquetWriter | None = None

    def add(self, batch: pa.RecordBatch) -> None:
        while batch.num_rows:
            if self.writer is None:
                self.stack = contextlib.ExitStack()
                name = f"part-{self.index:05d}-{self.part:05d}.parquet"
                f = self.stack.enter_context(atomic_write(self.folder / name))
                self.names.append(name)
                self.writer = pq.ParquetWriter(f, SELECTION_SCHEMA, compression="zstd")
            take = min(batch.num_rows, ROWS_PER_PART - self.in_part)
            self.writer.write_table(pa.Table.from_batches([batch.slice(0, take)]).cast(SELECTION_SCHEMA))
            batch = batch.slice(take)
            self.in_part += take
            if self.in_part == ROWS_PER_PART:
                self.close()

    def abort(self) -> None:
        """Drop the part being written (called while an exception propagates)."""
        if self.writer is not None:
            self.writer.close()
            self.stack.__exit__(*sys.exc_info())
            self.writer, self.stack = None, None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.stack.close()
            self.writer, self.stack = None, None
            self.part += 1
            self.in_part = 0


def write_unit(unit: Unit, plan: Plan, report: Report | None = None) -> dict[str, Any]:
    """Pass 3: the unit's selected rows in (split, key) order as part files; the rows
    before ``--keys-file``, the ``--keys-file`` names found (their ``pos``), the count
    per (cls, split) and the part files' names (``parts``)."""
    res: dict[str, Any] = {"index": unit.index, "rows": 0, "before_keys": 0, "per": {}, "wanted_hits": [],
                           "parts": []}
    if _empty(unit, plan):
        return res
    with contextlib.closing(connect(unit, plan)) as con:
        con.execute("CREATE TEMP VIEW split_v AS " + (_SPLIT_NONE if plan.mode == "none" else _SPLIT))
        con.execute("CREATE TEMP TABLE chosen_t AS " + (_IN_FRACTION if "fraction_keys" in plan.files
                                                         else "SELECT * FROM split_v"))
        con.execute("CREATE TEMP VIEW final_t AS " + (_WANTED if "wanted" in plan.files else "SELECT * FROM chosen_t"))
        res["before_keys"] = _count(con, "SELECT count(*) FROM chosen_t")
        if "wanted" in plan.files:
            res["wanted_hits"] = [r[0] for r in con.execute(_WANTED_HITS).fetchall()]
        res["per"] = {(c, s): n for c, s, n in con.execute("SELECT cls, split, count(*) FROM final_t "
                                                           "GROUP BY 1, 2").fetchall()}
        parts = _Parts(local_target(plan.output) / SELECTION_DIR, unit.index)  # at a URL: staged, uploaded on close
        try:
            for batch in con.sql(_ROWS, params={"source_dataset": plan.source_dataset}).to_arrow_reader(1 << 16):
                parts.add(batch)
                res["rows"] += batch.num_rows
        except BaseException:
            parts.abort()
            raise
        parts.close()
        res["parts"] = parts.names
    if report:
        report(res["before_keys"], res["rows"])
    return res
