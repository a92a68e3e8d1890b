"""The driver of ``select``: pool-wide rules, three passes of units, the plan between them.

1. *pool* (driver): open the input (:func:`.pool.open_input`), decide the label rule, read
   the lists (all before the output is touched); write the uid list, run the duplicate
   rules over the whole pool's keys and hashes.
2. *count* (units): rows, class counts, validation candidates (:func:`.units.count_unit`).
3. *plan* (driver): the class rule on the merged counts (:func:`.rules.choose_classes`),
   the validation draw (the ``V`` smallest candidates of a class over all units), the
   train counts and ``balanced_quotas`` for ``--fraction --balanced``.
4. *fraction* (units, only with ``--fraction``): per class the ``quota`` best train rows of
   each unit (:func:`.units.fraction_unit`); the driver keeps the ``quota`` best overall.
5. *write* (units): each unit's part of the selection table (:func:`.units.write_unit`);
   then ``classes.json``, ``report.json``, ``duplicates.parquet`` and the manifest.

The driver holds per class ``V`` candidates and the chosen fraction keys, never the pool's
rows. Units are the whole pool in one (``--engine local``, the fast path) or one per
samples / table file (``--engine ray``, or ``per_shard=True``); either way they run the same
SQL, so the selection is the same: rows (every column), ``classes.json``, ``report.json``
and ``duplicates.parquet``. Only the cut of the selection table into part files differs
(``part-{unit}-{j}.parquet``), which ``shard`` does not see: it orders by key. Workers read
the pool's files and the key tables (in ``OUTPUT/.select-tmp``, removed at the end) and
write their parts into the output, so on Ray the pool and the output are on a file system
every node sees. Keys are unique in a pool (a dataset's keys, COYO ids, DataComp uids).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from silverlabel import __version__
from silverlabel.dataset import (Dataset, Selection, atomic_write, check_writable, display, input_name, list_files, make_identity,
                                 named_config, parent_entry, remove, url_of, without_locations)
from silverlabel.engine import Report, create_engine
from silverlabel.errors import UserError
from silverlabel.formats.selection import CLASSES_FILE, REPORT_FILE, SELECTION_DIR, SELECTION_SCHEMA
from silverlabel.log import phase
from silverlabel.stage import output_lock

from .config import SelectConfig, SelectSummary
from .pool import (DUPLICATES_FILE, Input, duplicate_rules, has_source_labels, open_input, unreadable_file,
                   write_duplicates, write_keys, write_uid_list)
from .rules import (balanced_quotas, choose_classes, label_mapping, load_uids, output_label_space, read_names,
                    reference_hashes, write_classes_and_report)
from .units import Plan, Unit, connect, count_unit, fraction_unit, write_unit

#: Temporary key tables for the units, inside the output (so every worker sees them).
TMP_DIR = ".select-tmp"


def _check_output(out: Path) -> None:
    ours = {SELECTION_DIR, CLASSES_FILE, REPORT_FILE, DUPLICATES_FILE, "silverlabel.json", "README.md", "card"}
    url = url_of(out)
    if url is not None:  # a selection at a URL: what the store lists there
        from silverlabel import fs

        fs.forget_one(url)
        try:
            names = [n for n, _d in fs.listdir(url)]
        except (FileNotFoundError, NotADirectoryError):
            names = []
        if any(n not in ours and not n.startswith(".") for n in names):
            raise UserError(f"{display(url)}: exists and is not a selection; choose another -o")
        return
    if out.exists() and any(p.name not in ours and not p.name.startswith(".") for p in out.iterdir()):
        raise UserError(f"{out}: exists and is not a selection; choose another -o")


def _label_rule(cfg: SelectConfig, pool: Input, con: Any) -> str:
    """``--label`` resolved: top1 (teacher labels), source (ImageFolder classes, .cls) or none."""
    mode = cfg.label
    has_source = mode == "source" or (mode == "auto" and not pool.label_space)
    has_source = has_source and has_source_labels(con, pool)
    if mode == "auto":
        mode = "top1" if pool.label_space else ("source" if has_source else "none")
    if mode == "top1" and not pool.label_space:
        raise UserError(f"{cfg.source}: has no teacher labels (run silverlabel label first, or use --label source)")
    if mode == "source" and not has_source:
        raise UserError(f"{cfg.source}: has no source labels (ImageFolder classes or .cls); use --label top1")
    if mode == "none":  # a class rule on a pool without labels would silently keep everything
        needs = [flag for flag, on in (("--fraction", cfg.fraction is not None),
                                       ("--top-classes", cfg.top_classes is not None),
                                       ("--val-per-class", cfg.val_per_class > 0),
                                       ("--min-train-per-class", cfg.min_train_per_class > 0),
                                       ("--min-prob", cfg.min_prob is not None)) if on]
        if needs:
            raise UserError(f"{cfg.source}: has no labels (run silverlabel label first, or ingest an ImageFolder), "
                            f"so {', '.join(needs)} cannot apply")
    return mode


def _reset_output(out: Path) -> Path:
    """Empty the selection folder ``out`` for a new selection; returns its temporary folder.
    The old manifest goes first, so a run that dies half way leaves no manifest and
    ``shard`` refuses the folder instead of reading a mix. At a URL, the objects go the same
    way (the manifest first)."""
    remove(out / "silverlabel.json")
    if url_of(out) is not None:
        for old in list_files(out / SELECTION_DIR, ".parquet"):
            remove(old)
    tmp = out / TMP_DIR
    _drop_tmp(out)
    tmp.mkdir(parents=True)
    sel_dir = out / SELECTION_DIR
    sel_dir.mkdir(parents=True, exist_ok=True)
    for old in sel_dir.glob("*.parquet"):
        old.unlink()
    return tmp


def _drop_tmp(out: Path) -> None:
    """Remove the key tables and spill files (at a URL: their objects too)."""
    shutil.rmtree(out / TMP_DIR, ignore_errors=True)
    if url_of(out) is not None:
        for f in list_files(out / TMP_DIR):
            remove(f)


def _with(plan: Plan, files: dict[str, str] | None = None, tables: dict[str, pa.Table] | None = None) -> Plan:
    """``plan`` with more key tables."""
    return dataclasses.replace(plan, files={**plan.files, **(files or {})}, tables={**plan.tables, **(tables or {})})


@dataclass
class _Counts:
    """The merged summaries of the count pass."""

    rows: int = 0  # the pool's rows
    uid_matched: int = 0  # of them, with a listed uid
    uids_missing: int = 0  # listed uids in no row
    before_label: int = 0  # rows the label rule sees (after --uids and the duplicate rules)
    labeled: int = 0  # rows with a class (after --min-prob)
    counts: dict[str, int] = field(default_factory=dict)  # rows per class
    candidates: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # V smallest (md5, key) per class


def _count_pass(eng: Any, units: list[Unit], plan: Plan, progress: Report | None, n_uids: int) -> _Counts:
    n = _Counts()
    found = np.zeros(n_uids, bool)
    phase(progress, "select: count pass", len(units), "part")
    for res in _ticked(eng.map(count_unit, units, plan), progress):
        n.rows += res["rows"]
        n.uid_matched += res["uid_matched"]
        found[np.asarray(res["uid_hits"], np.int64)] = True
        n.before_label += res["before_label"]
        n.labeled += res["labeled"]
        for c, k in res["counts"].items():
            n.counts[c] = n.counts.get(c, 0) + k
        _merge_best(n.candidates, res["candidates"], lambda c: plan.val_per_class)
    n.uids_missing = int(n_uids - found.sum())
    return n


def _ticked(results: Any, progress: Report | None) -> Any:
    """``results`` of a pass, one tick of ``progress`` per part done."""
    for res in results:
        if progress is not None:
            progress(1, 1)
        yield res


def _merge_best(best: dict[Any, list[tuple[str, str]]], rows: list[tuple], limit: Any) -> None:
    """Keep per class the ``limit(class)`` smallest (md5, key) of ``best`` and ``rows``."""
    touched = set()
    for c, m, k in rows:
        best.setdefault(c, []).append((m, k))
        touched.add(c)
    for c in touched:
        best[c] = sorted(best[c])[: limit(c)]


#: SelectConfig fields that name an input file or folder (published by name, not path)
PATH_FIELDS = ("source", "keys_file", "uids", "exclude_near", "rollup_to")


def published_config(cfg: SelectConfig, pool: Input, out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The manifest's ``config`` and ``parents``: every input named by its id or content
    digest (:func:`silverlabel.dataset.input_name`), the source dataset also by its location
    relative to the selection (where ``shard`` finds its images)."""
    if pool.kind == "dataset":
        parent = parent_entry("dataset", pool.root, out, labels=pool.labels_name)
        config = {**named_config(cfg.output_config(), PATH_FIELDS[1:]), "source": parent["id"]}
    else:
        files = [f for u in pool.units for f in u.files]
        parent = {"kind": pool.kind, "name": input_name(pool.root, files)}
        config = {**named_config(cfg.output_config(), PATH_FIELDS[1:]), "source": parent["name"]}
    return config, [parent]


def run_select(cfg: SelectConfig, engine: str = "local", workers: int = 1, ray_address: str | None = None,
               progress: Report | None = None, per_shard: bool | None = None) -> SelectSummary:
    """Select from ``cfg.source`` into the selection directory ``cfg.output`` on ``engine``.

    ``per_shard`` (default: on for any engine but ``local``) runs one unit per samples or
    table file instead of one unit of the whole pool; the result is the same.

        >>> run_select(SelectConfig("data/pool", "data/sel", top_classes=1000, val_per_class=50))  # doctest: +SKIP
    """
    import duckdb

    t0 = time.monotonic()
    check_writable(cfg.output)
    out = Selection(cfg.output).root.resolve()  # at a URL: this process's staging mirror, uploaded file by file
    _check_output(out)
    pool = open_input(cfg)  # validate the input before touching the output
    with contextlib.ExitStack() as held:  # the output's lock, once _select first writes
        try:
            return _select(cfg, pool, out, t0, engine, workers, ray_address, progress, per_shard, held)
        except duckdb.Error:  # a file damaged past its footer? then name it
            bad = unreadable_file(pool)
            if bad is None:
                raise
            raise bad from None
        finally:
            _drop_tmp(out)  # key tables, spill files


def _select(cfg: SelectConfig, pool: Input, out: Path, t0: float, engine: str, workers: int,
            ray_address: str | None, progress: Report | None, per_shard: bool | None,
            held: contextlib.ExitStack) -> SelectSummary:
    """:func:`run_select` on the opened input ``pool``."""
    import duckdb

    if per_shard is None:
        per_shard = engine != "local"
    base = Plan(kind=pool.kind, pool_sql=pool.pool_sql, joins_labels=pool.joins_labels, output=str(out),
                tmp=str(out / TMP_DIR),
                seed=cfg.seed, val_per_class=cfg.val_per_class, min_prob=cfg.min_prob, multi_label=cfg.multi_label,
                source_dataset=pool.source_dataset, memory_limit=cfg.memory_limit, threads=max(1, cfg.threads))
    try:  # a setting, not SQL text: the value never meets the parser as code
        duckdb.connect(config={"memory_limit": cfg.memory_limit}).close()
    except duckdb.Error as e:
        raise UserError(f"--memory-limit {cfg.memory_limit!r}: {str(e).splitlines()[0]}") from None
    # 1a. the label rule and the lists, checked before the output is touched
    with contextlib.closing(connect(pool.whole(), base)) as con:
        mode = _label_rule(cfg, pool, con)
    wnids: list[str] = []
    tables: dict[str, pa.Table] = {}
    if mode == "top1":
        mapping, wnids = label_mapping(cfg, pool.label_space)
        if mapping is not None:
            tables["label_map"] = pa.table({"src": pa.array(np.arange(len(mapping)), pa.int32()),
                                            "dst": pa.array(mapping.astype(np.int32))})
    uids = load_uids(cfg.uids) if cfg.uids else None
    wanted = read_names(cfg.keys_file) if cfg.keys_file else None
    ref = reference_hashes(cfg.exclude_near) if cfg.exclude_near else None

    out.mkdir(parents=True, exist_ok=True)
    held.enter_context(output_lock(out))  # one run per output, as every stage; nothing written before
    tmp = _reset_output(out)

    # 1b. pool-wide rules, on the driver: key tables for the units
    plan = base
    if uids is not None:
        plan = _with(plan, files={"uid_list": write_uid_list(uids, tmp / "uid_list.parquet")})
    if cfg.dedupe or cfg.exclude_near:
        phase(progress, "select: duplicate rules (hashing the pool's images)")
    with contextlib.closing(connect(pool.whole(), plan)) as con:
        drop, dups, removed_dups = duplicate_rules(cfg, con, ref)
    if drop:
        plan = _with(plan, files={"drop_keys": write_keys(tmp / "drop_keys.parquet", "key", drop)})
    if wanted is not None:
        plan = _with(plan, files={"wanted": write_keys(tmp / "wanted.parquet", "name", wanted, positions=True)})
    plan = _with(dataclasses.replace(plan, mode=mode, threads=1 if per_shard else base.threads), tables=tables)
    units = pool.units if per_shard else [pool.whole()]
    eng = create_engine(engine, workers=workers, address=ray_address)

    # 2. counts and validation candidates
    n = _count_pass(eng, units, plan, progress, 0 if uids is None else uids.num_rows)
    removed: dict[str, int] = {}
    if pool.missing and pool.missing["samples_without_labels_file"]:
        removed["no_labels_file"] = pool.missing["samples_without_labels_file"]
    if uids is not None:
        removed["not_in_uids"] = n.rows - n.uid_matched
        removed["uids_missing_from_pool"] = n.uids_missing
    removed.update(removed_dups)
    if n.before_label - n.labeled:
        removed["below_min_prob_or_unlabeled"] = n.before_label - n.labeled

    # 3. the plan: classes, validation draw, quotas
    chosen, class_ids, cls_of, names = choose_classes(n.counts, cfg, mode, wnids)
    removed_by_class = sum(c for cid, c in n.counts.items() if cid not in chosen)
    if removed_by_class:
        removed["class_filter"] = removed_by_class
    if mode != "none":
        classes = pa.table({"class_id": pa.array(class_ids, pa.string()),
                            "cls": pa.array([cls_of[c] for c in class_ids], pa.int32()),
                            "class_name": pa.array([names[c][1] for c in class_ids], pa.string())})
        validation = (k for c in chosen for _m, k in n.candidates.get(c, []))
        plan = _with(plan, tables={"classes_t": classes},
                     files={"validation_keys": write_keys(tmp / "validation_keys.parquet", "key", validation)})

    # 4. the balanced fraction of train
    if cfg.fraction is not None:
        train_counts = {cls_of[c]: n.counts[c] - len(n.candidates.get(c, [])) for c in class_ids}
        train_counts = {c: k for c, k in train_counts.items() if k > 0}
        n_train = sum(train_counts.values())
        total = math.floor(cfg.fraction * n_train + 1e-9)
        quotas = balanced_quotas(train_counts, total, cfg.seed)
        plan = _with(plan, tables={"quota_t": pa.table({"cls": pa.array(list(quotas), pa.int32()),
                                                        "quota": pa.array(list(quotas.values()), pa.int64())})})
        best: dict[int, list[tuple[str, str]]] = {}
        phase(progress, "select: fraction pass", len(units), "part")
        for res in _ticked(eng.map(fraction_unit, units, plan), progress):
            _merge_best(best, res["best"], quotas.__getitem__)
        kept = (k for lst in best.values() for _m, k in lst)
        plan = _with(plan, files={"fraction_keys": write_keys(tmp / "fraction_keys.parquet", "key", kept)})
        removed["outside_fraction"] = n_train - total

    # 5. write the parts, then classes, report, duplicates, manifest
    rows = before_keys = 0
    by_cls: dict[int, dict[str, int]] = {}
    splits: dict[str, int] = {}
    found = np.zeros(len(wanted or ()), bool)
    parts: list[str] = []  # the part files, by name (written by workers, maybe on other machines)
    phase(progress, "select: write pass", len(units), "part")
    for res in _ticked(eng.map(write_unit, units, plan), progress):
        found[np.asarray(res["wanted_hits"], np.int64)] = True
        parts += res["parts"]
        rows += res["rows"]
        before_keys += res["before_keys"]
        for (c, sp), k in res["per"].items():
            by_cls.setdefault(c, {})[sp] = by_cls.get(c, {}).get(sp, 0) + k
            splits[sp] = splits.get(sp, 0) + k
    more: dict[str, Any] = {}  # report.json's entries beyond the counts
    if wanted is not None:
        removed["not_in_keys_file"] = before_keys - rows
        removed["keys_not_found"] = int(len(wanted) - found.sum())  # names of the file that match no sample
        more["keys_file"] = {"names": len(wanted), "found": int(found.sum()),
                               "not_found": removed["keys_not_found"],
                               "not_found_examples": [wanted[i] for i in np.flatnonzero(~found)[:10].tolist()]}
    if pool.missing:
        more["missing_labels"] = pool.missing
    if rows == 0:
        with atomic_write(out / SELECTION_DIR / "part-00000-00000.parquet") as f:
            pq.write_table(SELECTION_SCHEMA.empty_table(), f)
        parts = ["part-00000-00000.parquet"]
    splits = dict(sorted(splits.items()))
    write_classes_and_report(out, class_ids, cls_of, names, mode, output_label_space(cfg, mode, pool.label_space),
                             by_cls, {"input_rows": n.rows, "selected_rows": rows, "splits": splits,
                                      "classes": len(class_ids), "removed": removed, "label_rule": mode, **more})
    if cfg.dedupe or cfg.exclude_near:
        write_duplicates(out / DUPLICATES_FILE, dups)
    else:
        remove(out / DUPLICATES_FILE)
    _drop_tmp(out)
    config, parents = published_config(cfg, pool, out)
    selection = Selection(out)
    content = selection.fingerprint(sorted(out / SELECTION_DIR / p for p in set(parts)))
    Dataset(out).write_manifest({
        "id": make_identity("selection", {"config": config, "parents": without_locations(parents),
                                          "content": content}),
        "stage": "select",
        "silverlabel_version": __version__,
        "config": config,
        "parents": parents,
        "counts": {"rows": rows, **{f"split_{k}": v for k, v in splits.items()}},
        "from_table": pool.source_dataset is None,
    })
    return SelectSummary(display(cfg.output) if url_of(cfg.output) else str(Path(cfg.output)), rows, splits, len(class_ids), removed, time.monotonic() - t0,
                         pool.source_dataset is None)
