"""``select`` as passes over the label shards, so it runs on any engine (``--engine ray``).

The DuckDB path (:func:`silverlabel.stages.select.run_select`) sees the whole pool at once.
The rules that need global state reduce to small summaries that the driver merges, so the
same selection can be computed by mapping over the dataset's shards:

1. *count* (one unit per shard): the shard's rows (samples joined with its labels file),
   the uid list, the label-space remapping / roll-up, the label rule and ``--min-prob`` ->
   per class: its count and its ``V`` validation candidates, the rows with the smallest
   ``md5(seed:key), key`` (what DuckDB's ``row_number() OVER (PARTITION BY class ORDER BY
   md5, key)`` ranks first); for ``--uids``, the shard's matched rows and which listed uids
   it holds (positions in the sorted list, merged on the driver for
   ``uids_missing_from_pool``).
2. *plan* (driver): the class rule (``--val-per-class``, ``--min-train-per-class``,
   ``--top-classes``) on the merged counts, with the same ranking and class order as the
   DuckDB path; the validation draw = the ``V`` smallest candidates per class; the train
   counts and ``balanced_quotas`` for ``--fraction --balanced``.
3. *fraction* (one unit per shard, only with ``--fraction``): per class the ``quota``
   smallest ``md5(seed:f:key), key`` among the shard's train rows; merged on the driver.
4. *write* (one unit per shard): the shard's selected rows, ``--keys-file`` applied, in
   ``(split, key)`` order to ``selection/part-{shard}.parquet``; counts per class and split.

The driver holds per class at most ``V`` candidates and the ``quota`` chosen keys, and with
``--uids`` the list itself and one flag per listed uid, never the pool. The result has the
same rows (every column), ``classes.json`` and ``report.json`` as the DuckDB path; only the
cut of the selection table into part files differs (one part per source shard), which
``shard`` does not see (it orders by key).

Supported: a silverlabel dataset as input; ``--uids`` (a uid listed ``k > 1`` times gives
rows ``key-1 .. key-k``, ``source_key`` the sample's key), ``--label top1|source|none``,
``--label-space`` remapping and ``--rollup-depth`` / ``--rollup-to`` (the same index map as
the DuckDB path, :func:`silverlabel.stages.select._label_mapping`; the top-k mapped, the
probabilities of classes that land on one target summed in double in list order and cast
to float32, re-ranked by ``p DESC, class``, a row none of whose labels maps dropped, as the
DuckDB path's SQL), ``--min-prob``, ``--multi-label``, the class rule, the validation draw,
``--fraction --balanced``, ``--keys-file``. ``--dedupe`` and ``--exclude-near`` (they compare
every row with every other, i.e. need the whole pool) and bare tables raise a ValueError
that names them: run those with the DuckDB path (``--engine local``).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from silverlabel import __version__
from silverlabel.dataset import Dataset, atomic_write
from silverlabel.engine import Report, create_engine
from silverlabel.errors import UserError
from silverlabel.formats.selection import CLASSES_FILE, REPORT_FILE, SELECTION_DIR, SELECTION_SCHEMA
from silverlabel.stages import select as _select
from silverlabel.stages.select import SelectConfig, SelectSummary, balanced_quotas

_SAMPLE_COLUMNS = ["key", "id", "uid", "url", "caption", "width", "height", "imagehash", "shard", "label", "source",
                   "status"]
_FNAME = re.compile(r"[^/#]+\Z")  # DuckDB's regexp_extract(..., '[^/#]+$')


def unsupported_rules(cfg: SelectConfig) -> list[str]:
    """The options of ``cfg`` that only the DuckDB path implements."""
    bad = []
    for name, flag in (("dedupe", "--dedupe"), ("exclude_near", "--exclude-near")):
        if getattr(cfg, name):
            bad.append(flag)
    return bad


# ---------------------------------------------------------------------------------------
# units


@dataclass
class ShardUnit:
    index: int  # position of the samples file in the dataset
    samples: str
    labels: str | None  # the shard's labels file (None: the dataset has no labels)
    validation: list[str] = field(default_factory=list)  # pass 2/3: this shard's validation keys
    fraction: list[str] | None = None  # pass 3: this shard's train keys kept by --fraction


@dataclass
class _Plan:
    """What the passes after *count* need (shipped once per pass)."""

    cfg: SelectConfig
    mode: str
    has_labels: bool
    source_dataset: str
    classes: dict[str, tuple[int, str | None]] = field(default_factory=dict)  # class_id -> (cls, class_name)
    quotas: dict[int, int] = field(default_factory=dict)
    wanted: frozenset[str] | None = None
    uid_list: np.ndarray | None = None  # --uids: the distinct uids, sorted, as S32 bytes
    uid_copies: np.ndarray | None = None  # ... and how often each is listed
    mapping: np.ndarray | None = None  # --label-space / --rollup-*: labels' index -> output index (-1: none)


def _md5(seed: int, salt: str, key: str) -> str:
    return hashlib.md5(f"{seed}:{salt}{key}".encode()).hexdigest()


def _ge(p: float | None, thr: np.float32) -> bool:
    """DuckDB's ``FLOAT >= FLOAT`` as a filter: NULL is false, NaN is larger than any number."""
    return p is not None and (math.isnan(p) or np.float32(p) >= thr)


def _read_rows(unit: ShardUnit, plan: _Plan) -> list[dict[str, Any]]:
    """The shard's pool rows: successful samples joined with their labels (inner join, as
    the DuckDB path), in key order."""
    pf = pq.ParquetFile(unit.samples)
    names = pf.schema_arrow.names
    t = pf.read(columns=[c for c in _SAMPLE_COLUMNS if c in names])
    rows = [r for r in t.to_pylist() if r["status"] == "success"]
    if plan.has_labels:
        if unit.labels is None or not Path(unit.labels).is_file():
            return []
        lt = pq.ParquetFile(unit.labels).read(columns=["key", "labels", "label_probs"])
        by_key = {k: (l, p) for k, l, p in zip(lt.column("key").to_pylist(), lt.column("labels").to_pylist(),
                                               lt.column("label_probs").to_pylist())}
        out = []
        for r in rows:
            hit = by_key.get(r["key"])
            if hit is not None:
                r["labels"], r["label_probs"] = hit
                out.append(r)
        rows = out
    else:
        for r in rows:
            r["labels"] = r["label_probs"] = None
    for r in rows:
        r["source_key"] = r["key"]
    rows.sort(key=lambda r: r["key"])
    return rows


def _apply_uids(rows: list[dict[str, Any]], plan: _Plan) -> tuple[list[dict[str, Any]], int, np.ndarray]:
    """The uid rule of the DuckDB path (``JOIN uid_list ON p.uid = u.uid``, ``copies`` rows
    ``key-1..key-k`` when a uid is listed ``k > 1`` times): (rows, distinct keys matched,
    positions in ``plan.uid_list`` of the listed uids this shard holds)."""
    lst, copies = plan.uid_list, plan.uid_copies
    # exact string equality: only a 32-character ASCII uid can equal a listed one (all are 32-hex)
    cand = np.array([u.encode() if isinstance(u, str) and len(u) == 32 and u.isascii() else b""
                     for u in (r["uid"] for r in rows)], dtype="S32")
    pos = np.minimum(np.searchsorted(lst, cand), max(len(lst) - 1, 0))
    hit = (lst[pos] == cand) & (cand != b"") if len(lst) else np.zeros(len(rows), bool)
    out = []
    matched = set()
    for r, h, i in zip(rows, hit.tolist(), pos.tolist()):
        if not h:
            continue
        matched.add(r["key"])
        k = int(copies[i])
        if k > 1:
            out.extend(dict(r, key=f"{r['key']}-{j}") for j in range(1, k + 1))
        else:
            out.append(r)
    out.sort(key=lambda r: r["key"])
    return out, len(matched), np.unique(pos[hit]).astype(np.int64)


def _prob_order(item: tuple[int, float | None]) -> tuple:
    """``ORDER BY p DESC, dst`` as DuckDB sorts FLOATs: NaN first, NULL last."""
    d, p = item
    if p is None:
        return (2, 0.0, d)
    if math.isnan(p):
        return (0, 0.0, d)
    return (1, -p, d)


def _remap(rows: list[dict[str, Any]], mapping: np.ndarray) -> list[dict[str, Any]]:
    """The DuckDB path's remapping SQL, row by row: the top-k (``unnest(labels),
    unnest(label_probs)``, the shorter list padded with NULLs) joined with the index map,
    ``dst >= 0``, ``sum(p)::FLOAT`` per target (a double sum, NULLs skipped), re-ranked by
    ``p DESC, dst``; a row with no mapped label is dropped (the inner join)."""
    n = len(mapping)
    m = mapping.tolist()
    out = []
    for r in rows:
        acc: dict[int, float | None] = {}
        for lab, p in itertools.zip_longest(r["labels"] or (), r["label_probs"] or ()):
            if lab is None or not 0 <= lab < n or m[lab] < 0:
                continue
            d = m[lab]
            if d not in acc or acc[d] is None:
                acc[d] = None if p is None else float(p)
            elif p is not None:
                acc[d] += p
        if not acc:
            continue
        ranked = sorted(((d, None if s is None else float(np.float32(s))) for d, s in acc.items()), key=_prob_order)
        r["labels"] = [d for d, _ in ranked]
        r["label_probs"] = [p for _, p in ranked]
        out.append(r)
    return out


def _pool(unit: ShardUnit, plan: _Plan) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The shard's rows after the uid list and the label-space mapping (the DuckDB path's
    ``pool1``/``pool3``), and what the report needs from them."""
    rows = _read_rows(unit, plan)
    stats: dict[str, Any] = {"rows": len(rows)}
    if plan.uid_list is not None:
        rows, stats["uid_matched"], stats["uid_hits"] = _apply_uids(rows, plan)
    stats["before_label"] = len(rows)  # rows the remapping leaves without a label count as unlabeled
    if plan.mapping is not None and plan.mode == "top1":
        rows = _remap(rows, plan.mapping)
    return rows, stats


def _labeled(rows: list[dict[str, Any]], plan: _Plan) -> list[dict[str, Any]]:
    """The label rule: ``class_id`` per row, ``--min-prob`` / ``--multi-label`` applied."""
    cfg = plan.cfg
    out = []
    if plan.mode == "top1":
        thr = None if cfg.min_prob is None else np.float32(cfg.min_prob)  # DuckDB compares FLOAT to FLOAT
        for r in rows:
            labels, probs = r["labels"], r["label_probs"]
            first = probs[0] if probs else None
            if thr is not None and not _ge(first, thr):
                continue
            r["class_id"] = str(labels[0]) if labels else None
            if cfg.multi_label and thr is not None:
                keep = [i for i, p in enumerate(probs) if _ge(p, thr)]
                r["labels"] = [labels[i] for i in keep if i < len(labels)]
                r["label_probs"] = [probs[i] for i in keep]
            out.append(r)
    elif plan.mode == "source":
        for r in rows:
            if r.get("label") is not None:
                r["class_id"] = r["label"]
                out.append(r)
    else:
        for r in rows:
            r["class_id"] = None
            out.append(r)
    return out


def count_unit(unit: ShardUnit, plan: _Plan, report: Report | None = None) -> dict[str, Any]:
    """Pass 1: rows in, rows labeled, class counts, validation candidates per class."""
    rows, stats = _pool(unit, plan)
    labeled = _labeled(rows, plan)
    counts: dict[str, int] = {}
    cands: dict[str, list[tuple[str, str]]] = {}
    v = plan.cfg.val_per_class
    for r in labeled:
        c = r["class_id"]
        if c is None:
            continue
        counts[c] = counts.get(c, 0) + 1
        if v:
            cands.setdefault(c, []).append((_md5(plan.cfg.seed, "", r["key"]), r["key"]))
    if v:
        cands = {c: sorted(lst)[:v] for c, lst in cands.items()}
    if report:
        report(stats["rows"], len(labeled))
    return {"index": unit.index, **stats, "labeled": len(labeled), "counts": counts, "candidates": cands}


def _split_rows(unit: ShardUnit, plan: _Plan) -> list[dict[str, Any]]:
    """The shard's rows of the chosen classes with cls, class_name and split."""
    val = set(unit.validation)
    out = []
    for r in _labeled(_pool(unit, plan)[0], plan):
        if plan.mode == "none":
            r["cls"], r["class_name"], r["split"] = -1, None, "train"
        else:
            hit = plan.classes.get(r["class_id"])
            if hit is None:
                continue
            r["cls"], r["class_name"] = hit
            r["split"] = "validation" if r["key"] in val else "train"
        out.append(r)
    return out


def fraction_unit(unit: ShardUnit, plan: _Plan, report: Report | None = None) -> dict[str, Any]:
    """Pass 2: per class, the ``quota`` smallest ``md5(seed:f:key), key`` train rows."""
    best: dict[int, list[tuple[str, str]]] = {}
    for r in _split_rows(unit, plan):
        if r["split"] == "train" and r["cls"] in plan.quotas:
            best.setdefault(r["cls"], []).append((_md5(plan.cfg.seed, "f:", r["key"]), r["key"]))
    best = {c: sorted(lst)[: plan.quotas[c]] for c, lst in best.items()}
    return {"index": unit.index, "best": best}


def write_unit(unit: ShardUnit, plan: _Plan, report: Report | None = None) -> dict[str, Any]:
    """Pass 3: the shard's part of the selection, in (split, key) order."""
    rows = _split_rows(unit, plan)
    if unit.fraction is not None:
        keep = set(unit.fraction)
        rows = [r for r in rows if r["split"] != "train" or r["key"] in keep]
    n0 = len(rows)
    if plan.wanted is not None:
        w = plan.wanted

        def fname(r):  # coalesce(source, url, '')
            text = r.get("source") if r.get("source") is not None else r.get("url")
            m = _FNAME.search(text if text is not None else "")
            return m.group(0) if m else ""

        rows = [r for r in rows if r["key"] in w or r.get("uid") in w or fname(r) in w]
    rows.sort(key=lambda r: (r["split"], r["key"]))
    per: dict[tuple[int, str], int] = {}
    for r in rows:
        per[(r["cls"], r["split"])] = per.get((r["cls"], r["split"]), 0) + 1
    path = None
    if rows:
        cols = {
            "key": [r["key"] for r in rows],
            "source_key": [r["source_key"] for r in rows],
            "id": [r["id"] for r in rows],
            "uid": [r["uid"] for r in rows],
            "url": [r["url"] for r in rows],
            "caption": [r["caption"] for r in rows],
            "split": [r["split"] for r in rows],
            "cls": [r["cls"] for r in rows],
            "class_name": [r["class_name"] for r in rows],
            "labels": [r["labels"] for r in rows],
            "label_probs": [r["label_probs"] for r in rows],
            "width": [r["width"] for r in rows],
            "height": [r["height"] for r in rows],
            "imagehash": [r["imagehash"] for r in rows],
            "source_dataset": [plan.source_dataset] * len(rows),
            "source_shard": [r["shard"] for r in rows],
        }
        table = pa.Table.from_pydict(cols, schema=SELECTION_SCHEMA)
        path = Path(plan.cfg.output) / SELECTION_DIR / f"part-{unit.index:05d}.parquet"
        with atomic_write(path) as f:
            pq.write_table(table, f, compression="zstd")
    if report:
        report(n0, len(rows))
    return {"index": unit.index, "rows": len(rows), "before_keys": n0, "per": per, "path": str(path) if path else None}


# ---------------------------------------------------------------------------------------
# the driver


def _open(cfg: SelectConfig) -> tuple[Dataset, str | None, str | None, bool]:
    """(dataset, labels name, labels' label space, has source labels); refuses what this
    path does not support, naming it."""
    src = Path(cfg.source)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such dataset, file or folder")
    bad = unsupported_rules(cfg)
    if not (src / "silverlabel.json").is_file():
        bad.insert(0, "a bare table as input")
    if bad:
        raise UserError(f"select over shards (--engine ray) does not support {', '.join(bad)}: these rules need "
                         "the whole pool at once; run them with --engine local (DuckDB)")
    ds = Dataset(src)
    man = ds.read_manifest()
    if man.get("stage") != "ingest":
        raise UserError(f"{src}: select reads an ingest dataset, this one is {man.get('stage')!r}")
    labels = man.get("labels", {})
    name = cfg.labels_name or (sorted(labels)[0] if labels else None)
    if cfg.labels_name and cfg.labels_name not in labels:
        raise UserError(f"{src}: no labels named {cfg.labels_name!r} (have: {', '.join(labels) or 'none'})")
    space = labels[name]["config"]["label_space"] if name else None
    has_source = False
    for p in ds.samples_files():
        t = pq.ParquetFile(p).read(columns=["label", "status"])
        if any(lab is not None and st == "success"
               for lab, st in zip(t.column("label").to_pylist(), t.column("status").to_pylist())):
            has_source = True
            break
    return ds, name, space, has_source


def run_select_sharded(cfg: SelectConfig, engine: str = "local", workers: int = 1, ray_address: str | None = None,
                       progress: Report | None = None) -> SelectSummary:
    """Select from the dataset ``cfg.source`` by passes over its shards on ``engine``; the
    same selection as :func:`~silverlabel.stages.select.run_select` (see the module doc)."""
    t0 = time.monotonic()
    out = Path(cfg.output)
    dup_file = getattr(_select, "DUPLICATES_FILE", "duplicates.parquet")
    ours = {SELECTION_DIR, CLASSES_FILE, REPORT_FILE, dup_file, "silverlabel.json", "README.md", "card"}
    if out.exists() and any(p.name not in ours and not p.name.startswith(".") for p in out.iterdir()):
        raise UserError(f"{out}: exists and is not a selection; choose another -o")
    ds, labels_name, space, has_source = _open(cfg)
    has_labels = labels_name is not None
    mode = cfg.label
    if mode == "auto":
        mode = "top1" if has_labels else ("source" if has_source else "none")
    if mode == "top1" and not has_labels:
        raise UserError(f"{cfg.source}: has no teacher labels (run silverlabel label first, or use --label source)")
    if mode == "source" and not has_source:
        raise UserError(f"{cfg.source}: has no source labels (ImageFolder classes or .cls); use --label top1")
    if cfg.fraction is not None and mode == "none":
        raise UserError("--fraction --balanced needs labels (--label top1 or source)")
    wnids: list[str] = []
    mapping = None
    if mode == "top1":
        mapping, wnids = _select._label_mapping(cfg, space)
    uid_list = uid_copies = None
    if cfg.uids:
        ut = _select.load_uids(cfg.uids)  # the DuckDB path's reader: distinct uids and their copies
        uid_list = np.array(ut.column("uid").to_pylist(), dtype="S32")
        uid_copies = ut.column("copies").to_numpy()
        order = np.argsort(uid_list, kind="stable")
        uid_list, uid_copies = uid_list[order], uid_copies[order]
    wanted = None
    if cfg.keys_file:
        with open(cfg.keys_file) as f:
            wanted = frozenset(line.strip() for line in f if line.strip())

    # the output: rewritten whole, the manifest dropped first (as the DuckDB path)
    (out / "silverlabel.json").unlink(missing_ok=True)
    sel_dir = out / SELECTION_DIR
    sel_dir.mkdir(parents=True, exist_ok=True)
    for old in sel_dir.glob("*.parquet"):
        old.unlink()

    eng = create_engine(engine, workers=workers, address=ray_address)
    name = ds.read_manifest()["name"]
    units = []
    for i, p in enumerate(ds.samples_files()):
        shard = int(p.stem.rsplit("-", 1)[1])
        lab = ds.root / "labels" / labels_name / f"{name}-{shard:06d}.parquet" if labels_name else None
        units.append(ShardUnit(i, str(p), str(lab) if lab else None))
    plan = _Plan(cfg, mode, has_labels, str(Path(cfg.source).resolve()), wanted=wanted, uid_list=uid_list,
                 uid_copies=uid_copies, mapping=mapping)

    # 1. counts and validation candidates
    total_in = n_labeled = n_before = uid_matched = 0
    uid_found = np.zeros(0 if uid_list is None else len(uid_list), bool)
    counts: dict[str, int] = {}
    cands: dict[str, list[tuple[str, str, int]]] = {}
    v = cfg.val_per_class
    for res in eng.map(count_unit, units, plan, progress):
        total_in += res["rows"]
        n_before += res["before_label"]
        n_labeled += res["labeled"]
        if uid_list is not None:
            uid_matched += res["uid_matched"]
            uid_found[res["uid_hits"]] = True
        for c, n in res["counts"].items():
            counts[c] = counts.get(c, 0) + n
        for c, lst in res["candidates"].items():
            merged = cands.get(c, []) + [(m, k, res["index"]) for m, k in lst]
            cands[c] = sorted(merged)[:v]
    removed: dict[str, int] = {}  # the DuckDB path's keys, in its order
    if uid_list is not None:
        removed["not_in_uids"] = total_in - uid_matched
        removed["uids_missing_from_pool"] = int(len(uid_list) - uid_found.sum())
    if n_before - n_labeled:
        removed["below_min_prob_or_unlabeled"] = n_before - n_labeled

    # 2. the class rule and the validation draw (the DuckDB path's rules, in Python)
    chosen, class_ids, cls_of, names = _select.choose_classes(counts, cfg, mode, wnids)
    plan.classes = {c: (cls_of[c], names[c][1]) for c in class_ids}
    removed_by_class = sum(n for c, n in counts.items() if c not in chosen)
    if removed_by_class:
        removed["class_filter"] = removed_by_class
    for c in chosen:
        for _m, k, i in cands.get(c, []):
            units[i].validation.append(k)

    # 3. the balanced fraction of train
    if cfg.fraction is not None:
        train_counts = {cls_of[c]: counts[c] - len(cands.get(c, [])) for c in class_ids}
        train_counts = {c: n for c, n in train_counts.items() if n > 0}
        n_train = sum(train_counts.values())
        total = math.floor(cfg.fraction * n_train + 1e-9)
        plan.quotas = balanced_quotas(train_counts, total, cfg.seed)
        best: dict[int, list[tuple[str, str, int]]] = {}
        for res in eng.map(fraction_unit, units, plan):
            for c, lst in res["best"].items():
                merged = best.get(c, []) + [(m, k, res["index"]) for m, k in lst]
                best[c] = sorted(merged)[: plan.quotas[c]]
        for u in units:
            u.fraction = []
        for lst in best.values():
            for _m, k, i in lst:
                units[i].fraction.append(k)
        removed["outside_fraction"] = n_train - total

    # 4. write the parts
    rows = before_keys = 0
    by_cls: dict[int, dict[str, int]] = {}
    splits: dict[str, int] = {}
    for res in eng.map(write_unit, units, plan):
        rows += res["rows"]
        before_keys += res["before_keys"]
        for (c, s), n in res["per"].items():
            by_cls.setdefault(c, {})[s] = by_cls.get(c, {}).get(s, 0) + n
            splits[s] = splits.get(s, 0) + n
    if cfg.keys_file:
        removed["not_in_keys_file"] = before_keys - rows
    if rows == 0:
        with atomic_write(sel_dir / "part-00000.parquet") as f:
            pq.write_table(SELECTION_SCHEMA.empty_table(), f)
    splits = dict(sorted(splits.items()))
    if mode != "top1":
        label_space_name = mode
    elif cfg.rollup_depth is not None or cfg.rollup_to:
        label_space_name = "wordnet-rollup"
    else:
        label_space_name = cfg.label_space or space
    _select.write_classes_and_report(out, class_ids, cls_of, names, mode, label_space_name, by_cls,
                                     {"input_rows": total_in, "selected_rows": rows, "splits": splits,
                                      "classes": len(class_ids), "removed": removed, "label_rule": mode})
    (out / dup_file).unlink(missing_ok=True)
    Dataset(out).write_manifest({
        "stage": "select",
        "silverlabel_version": __version__,
        "config": cfg.output_config(),
        "parents": [{"kind": "dataset", "path": str(Path(cfg.source).resolve())}],
        "counts": {"rows": rows, **{f"split_{k}": n for k, n in splits.items()}},
        "from_table": False,
    })
    return SelectSummary(str(out), rows, splits, len(class_ids), removed, time.monotonic() - t0, False)

