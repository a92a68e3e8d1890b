"""``silverlabel verify DATASET``: is every unit of a dataset still what was recorded?

The one command to run before trusting or publishing a dataset. It reads, never writes, and
checks what the stages recorded against what is on disk:

- **commit records** (``.done/{unit}.json``, :class:`silverlabel.stage.Commit`): every
  recorded output exists (else *missing*) with its recorded size and md5 (else *corrupt*);
  a record that is not JSON is *corrupt*; a unit's files without a record are *unrecorded*
  (a run that never finished them);
- **a pool** (ingest): each samples table has its tar and record, the success rows of a
  table are the samples of its tar, the manifest's counts are the tables' (else *count*); for
  each labels set in the manifest, every shard has a labels file whose record was made from
  the shard's current tar and samples table (else *stale*), every success row is labeled
  (else *coverage*), and its class map ``_classes.json`` is the recorded one;
- **a selection**: its parquet files read, the rows and splits add up to the manifest's, and
  the source shards its rows point at exist;
- **a training set** (shard, reinforce): every tar of ``_info.json`` exists, is recorded and
  holds ``shard_lengths`` samples; the selection it was cut from (when still there) is the
  one recorded (else *stale*), and a reinforced set's tars were made from the source set's
  current tars;
- **a run** (train): every checkpoint loads as weights only and names its step and config;
  the metrics files parse.

A problem is a row (kind, path, detail); the exit code is 0 when there are none, 1 otherwise.

A dataset at a URL (``silverlabel verify s3://bucket/pool``) is checked the same way against
the store: records read by name, sizes asked of the store, md5s and tars read by range.

    >>> report = verify(VerifyConfig("data/pool"))  # doctest: +SKIP
    >>> report.ok, [p.kind for p in report.problems]  # doctest: +SKIP
    (True, [])
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from silverlabel.dataset import (DONE_DIR, ID_KINDS, Dataset, Pool, Run, Selection, TrainSet, display, file_digest,
                                 file_size, is_file, is_identity, list_files, open_read, parent_location,
                                 parquet_source)
from silverlabel.errors import UserError
from silverlabel.formats.labels import CLASSES_FILE, CLASSES_UNIT
from silverlabel.options import opt
from silverlabel.stage import file_identity, read_record, recorded_output

#: the kinds of problem, in the order a report lists them
KINDS = ("missing", "corrupt", "stale", "unrecorded", "count", "coverage")


@dataclass(frozen=True)
class VerifyConfig:
    dataset: str = opt(help="pool, selection, training set or run folder", positional=True, metavar="DATASET")
    hashes: bool = opt(True, "compare sizes only, not md5s (fast)", flag="--sizes-only", action="store_false",
                       default_help="")
    as_json: bool = opt(False, "print the report as JSON", flag="--json", action="store_true")


@dataclass(frozen=True)
class Problem:
    kind: str  # one of KINDS
    path: str  # the file (or folder) concerned
    detail: str


@dataclass
class VerifyReport:
    dataset: str
    kind: str  # pool | selection | trainset | run
    checked: Counter = field(default_factory=Counter)  # what was looked at: files, records, rows, ...
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, kind: str, path: str | os.PathLike, detail: str) -> None:
        self.problems.append(Problem(kind, display(path), detail))  # at a URL: the public URL

    def to_json(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "kind": self.kind, "ok": self.ok, "checked": dict(self.checked),
                "problems": [asdict(p) for p in self.problems]}


# ---------------------------------------------------------------------------------------
# commit records


def check_records(done: Path, report: VerifyReport, hashes: bool = True) -> dict[str, dict[str, Any]]:
    """Check every commit record in the ``done`` folder against its outputs; returns the
    readable records by unit name."""
    records: dict[str, dict[str, Any]] = {}
    root = done.parent
    for path in list_files(done, ".json"):
        report.checked["records"] += 1
        rec = read_record(path)
        outputs = rec.get("outputs") if rec is not None else None
        if not isinstance(outputs, dict):
            report.add("corrupt", path, "commit record is not a readable record; the unit will be redone")
            continue
        records[path.stem] = rec
        for rel, want in outputs.items():
            report.checked["files"] += 1
            f = root / rel
            try:
                size = file_size(f)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                size = None
            if size is None:
                report.add("missing", f, f"recorded {want.get('bytes')} bytes, not there")
            elif size != want.get("bytes"):
                report.add("corrupt", f, f"{size} bytes, recorded {want.get('bytes')}")
            elif hashes and want.get("md5") and file_digest(f, "md5") != want["md5"]:
                report.add("corrupt", f, f"md5 differs from the recorded {want['md5']}")
    return records


def _tar_keys(path: Path, report: VerifyReport) -> list[str] | None:
    """The sample keys of a tar, or None (a *corrupt* problem) when it cannot be read."""
    from silverlabel.formats.wds import iter_tar_samples

    try:
        with open_read(path) as f:  # at a URL: the headers by ranged reads
            return [s.key for s in iter_tar_samples(f)]
    except Exception as e:  # tarfile raises several types for a damaged archive
        report.add("corrupt", path, f"not a readable tar ({type(e).__name__}: {e})")
        return None


def _parquet(path: Path, report: VerifyReport, columns: list[str]) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(parquet_source(path)).read(columns=columns)
    except Exception as e:  # pyarrow raises several types for a damaged file
        report.add("corrupt", path, f"not a readable parquet file ({type(e).__name__}: {str(e)[:200]})")
        return None


# ---------------------------------------------------------------------------------------
# one function per kind of dataset


def verify_pool(pool: Pool, man: dict[str, Any], report: VerifyReport, hashes: bool) -> None:
    records = check_records(pool.done_dir, report, hashes)
    name = man.get("name", "data")
    counts: Counter = Counter()
    success: dict[str, list[str]] = {}
    samples = pool.samples_files(man)  # the manifest verify read: not read again
    for table in samples:
        stem = table.stem
        tar = pool.shard_path(name, pool.shard_index(table))
        if stem not in records:
            report.add("unrecorded", table, "samples table without a commit record (an unfinished shard)")
        t = _parquet(table, report, ["key", "status"])
        if t is None:
            continue
        report.checked["rows"] += t.num_rows
        statuses = t.column("status").to_pylist()
        counts.update(statuses)
        success[stem] = [k for k, s in zip(t.column("key").to_pylist(), statuses) if s == "success"]
        if is_file(tar):
            keys = _tar_keys(tar, report)
            if keys is not None and sorted(keys) != sorted(success[stem]):
                report.add("count", tar, f"{len(keys)} samples, its samples table has {len(success[stem])} "
                           "success rows")
        elif stem not in records:  # else its record reports it
            report.add("missing", tar, "the tar of a samples table")
    for stem in sorted(set(records) - {t.stem for t in samples}):
        report.add("missing", pool.samples_dir / f"{stem}.parquet", "recorded unit without its samples table")
    if man.get("state") in (None, "complete") and man.get("counts") is not None and dict(man["counts"]) != dict(counts):
        report.add("count", pool.manifest_path, f"counts {man['counts']} differ from the samples tables' {dict(counts)}")
    for labels in sorted(man.get("labels") or {}):
        verify_labels(pool, name, labels, records, success, report, hashes)


def verify_labels(pool: Pool, name: str, labels: str, ingested: dict[str, dict[str, Any]],
                  success: dict[str, list[str]], report: VerifyReport, hashes: bool) -> None:
    """One labels set: a file per shard, made from the shard as it is now, labeling every
    success row."""
    folder = pool.labels_dir(labels)
    records = check_records(folder / DONE_DIR, report, hashes)  # the class map's record too (.done/classes.json)
    classes = folder / CLASSES_FILE
    if is_file(classes) and CLASSES_UNIT not in records:
        report.add("unrecorded", classes, "class map without a commit record; run silverlabel label again")
    for stem, keys in success.items():
        shard = Pool.shard_index(stem)
        path = pool.labels_path(labels, name, shard)
        if not is_file(path):
            if keys:
                report.add("coverage", path, f"no labels file: {len(keys)} success rows unlabeled by {labels}")
            continue
        rec = records.get(path.stem)
        if rec is None:
            report.add("unrecorded", path, "labels file without a commit record")
        else:
            made_from = rec.get("inputs", {})
            tar_now = recorded_output(ingested.get(stem), f"shards/{pool.shard_path(name, shard).name}")
            samples_now = recorded_output(ingested.get(stem), f"samples/{stem}.parquet")
            if (tar_now is not None and made_from.get("tar") != tar_now) or (
                    samples_now is not None and made_from.get("samples") != samples_now):
                report.add("stale", path, "made from another version of its shard; run silverlabel label again")
        t = _parquet(path, report, ["key"])
        if t is None:
            continue
        have = set(t.column("key").to_pylist())
        missing = [k for k in keys if k not in have]
        if missing:
            report.add("coverage", path, f"{len(missing)} success rows unlabeled by {labels} (e.g. key {missing[0]})")
        extra = have - set(keys)
        if extra:
            report.add("stale", path, f"{len(extra)} labeled keys are not success rows of the shard "
                       f"(e.g. {sorted(extra)[0]})")


def verify_selection(sel: Selection, man: dict[str, Any], report: VerifyReport) -> None:
    rows = 0
    splits: Counter = Counter()
    sources: set[tuple[str, str]] = set()
    for path in sel.files(man):  # the manifest verify read: not read again
        report.checked["files"] += 1
        t = _parquet(path, report, ["split", "source_dataset", "source_shard"])
        if t is None:
            continue
        rows += t.num_rows
        splits.update(t.column("split").to_pylist())
        sources.update(zip(t.column("source_dataset").to_pylist(), t.column("source_shard").to_pylist()))
    report.checked["rows"] += rows
    want = man.get("counts") or {}
    have = {"rows": rows, **{f"split_{k}": v for k, v in splits.items()}}
    if want and dict(want) != have:
        report.add("count", sel.manifest_path, f"counts {want} differ from the selection's {have}")
    if not is_file(sel.classes_path):
        report.add("missing", sel.classes_path, "the class map of the selection")
    roots = sel.parent_roots("dataset", man)  # source_dataset holds an id; the manifest says where it is
    for dataset, shard in sorted(s for s in sources if s[0] and s[1]):
        if dataset not in roots and is_identity(dataset):
            report.add("missing", sel.manifest_path, f"source dataset {dataset} of selected samples is not a parent")
            continue
        tar = Pool(roots.get(dataset, dataset)).shards_dir / shard
        if not is_file(tar):
            report.add("missing", tar, "source shard of selected samples (moved or deleted?)")


def verify_trainset(ts: TrainSet, man: dict[str, Any], report: VerifyReport, hashes: bool) -> None:
    records = check_records(ts.done_dir, report, hashes)
    try:
        info = ts.read_info()
    except FileNotFoundError as e:
        report.add("missing", ts.info_path, str(e))
        info = {}
    for split, entry in (info.get("splits") or {}).items():
        for filename, length in zip(entry.get("filenames", []), entry.get("shard_lengths", [])):
            tar = ts.tar_path(filename)
            rec = records.get(filename)
            if rec is None:
                report.add("unrecorded", tar, f"tar of split {split} without a commit record")
            if not is_file(tar):
                if rec is None:
                    report.add("missing", tar, f"tar of split {split}")
                continue
            keys = _tar_keys(tar, report)
            if keys is not None and len(keys) != length:
                report.add("count", tar, f"{len(keys)} samples, _info.json says {length}")
    parent = next(iter(man.get("parents") or []), {})
    where = parent_location(ts.root, parent)
    if man.get("stage") == "shard" and man.get("selection_sha256") and where is not None:
        sel = Selection(where)
        if sel.exists():
            try:
                now = sel.fingerprint()
            except UserError as e:
                report.add("stale", sel.root, f"the selection it was cut from is damaged ({e})")
            else:
                if now != man["selection_sha256"]:
                    report.add("stale", ts.root, f"its selection {sel.location} changed since it was sharded")
    if man.get("stage") == "reinforce" and where is not None:
        src = TrainSet(where)
        for filename, rec in records.items():
            made_from = rec.get("inputs", {}).get("source")
            tar = src.tar_path(filename)
            if isinstance(made_from, dict) and is_file(tar):
                if file_identity(tar, src.commit_path(filename)) != made_from:
                    report.add("stale", ts.tar_path(filename), f"made from another version of {tar}")


def verify_run(run: Run, report: VerifyReport) -> None:
    from silverlabel.stages.train import load_weights

    found = False
    for path in (run.checkpoint_path, run.final_checkpoint_path):
        if not path.is_file():
            continue
        found = True
        report.checked["files"] += 1
        try:
            ck = load_weights(path)
        except UserError as e:
            report.add("corrupt", path, str(e))
            continue
        if not isinstance(ck, dict) or not all(k in ck for k in ("model", "config", "step")):
            report.add("corrupt", path, "not a silverlabel train checkpoint (needs model, config, step)")
    if not found:
        report.add("missing", run.checkpoint_path, "no checkpoint")
    if run.metrics_jsonl.is_file():
        report.checked["files"] += 1
        for i, line in enumerate(run.metrics_jsonl.read_text(errors="replace").splitlines(), 1):
            try:
                json.loads(line)
            except ValueError:
                report.add("corrupt", run.metrics_jsonl, f"line {i} is not JSON")
                break


def verify(cfg: VerifyConfig) -> VerifyReport:
    """Check ``cfg.dataset`` (see the module docstring); reads only. A URL is read from its store."""
    ds = Dataset(cfg.dataset)
    if ds.url is not None:
        if not ds.exists():
            raise FileNotFoundError(f"{ds.location}: no silverlabel dataset there (no {ds.manifest_path.name})")
    elif not ds.root.is_dir():
        raise FileNotFoundError(f"{ds.root}: no such dataset or run folder")
    root = ds.root
    if not ds.exists():
        run = Run(root)
        if run.checkpoint_path.is_file() or run.final_checkpoint_path.is_file():
            report = VerifyReport(str(root), "run")
            verify_run(run, report)
            return report
        raise UserError(f"{root}: not a silverlabel dataset or run (no {ds.manifest_path.name}, no checkpoint)")
    man = ds.read_manifest()  # a UserError unless a JSON object
    stage = man.get("stage")
    kind = ID_KINDS.get(stage) if stage != "train" else None
    if kind is None:
        raise UserError(f"{display(ds.manifest_path)}: stage {stage!r} is not one verify knows (ingest, select, shard, "
                        "reinforce)")
    report = VerifyReport(ds.location, kind)
    if man.get("state") not in (None, "complete"):
        report.add("unrecorded", ds.manifest_path, f"state is {man['state']!r}: the last {stage} did not finish; "
                   "run it again to complete the dataset")
    if kind == "pool":
        verify_pool(Pool(root), man, report, cfg.hashes)
    elif kind == "selection":
        verify_selection(Selection(root), man, report)
    else:
        verify_trainset(TrainSet(root), man, report, cfg.hashes)
    report.problems.sort(key=lambda p: (KINDS.index(p.kind), p.path))
    return report


def format_report(r: VerifyReport, max_rows: int = 50) -> str:
    """The report as a short text: a summary line, then one line per problem."""
    checked = ", ".join(f"{v} {k}" for k, v in r.checked.items()) or "nothing"
    head = f"silverlabel verify: {r.kind} {r.dataset}: checked {checked}; "
    if r.ok:
        return head + "all good"
    by_kind = Counter(p.kind for p in r.problems)
    lines = [head + f"{len(r.problems)} problems (" + ", ".join(f"{n} {k}" for k, n in by_kind.items()) + ")"]
    lines += [f"  {p.kind:<10} {p.path}: {p.detail}" for p in r.problems[:max_rows]]
    if len(r.problems) > max_rows:
        lines.append(f"  ... {len(r.problems) - max_rows} more (--json lists all)")
    return "\n".join(lines)
