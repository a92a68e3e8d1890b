"""``silverlabel card``: a dataset card (``README.md``), plots and a static HTML report.

The card is written in the Hugging Face dataset-card form (YAML front matter, then the
usual sections) from what silverlabel knows about a dataset: the manifests along its
lineage (ingest -> label -> select -> shard) and its tables. Any silverlabel directory
works:

* an ingested (and labeled) pool: statuses, image sizes, the teacher's labels;
* a selection: its rows, classes.json, report.json (what each rule removed) and
  duplicates.parquet (which near-duplicates were removed), plus the pool it came from;
* a training set (``shard`` output, ``_info.json``): its splits and shards, plus the whole
  chain above it. When the selection it came from is gone, the per-sample facts are read
  from the shards' ``.json`` members instead.

Outputs::

    DATASET/README.md            the card (or -o PATH)
    DATASET/card/*.png           plots: class frequency, top-1 probability, labels per image
                                 against threshold, image sizes, ingest statuses
    DATASET/card/card.json       every number the card states, machine-readable
    HTML_DIR/index.html          with --html: a self-contained report (no server, no network)
    HTML_DIR/thumbs/*.jpg        one sprite of small thumbnails per class / group
    HTML_DIR/plots/*.png         copies of the plots

Every aggregate is a DuckDB query over the parquet tables, so the card of a 300M-row pool
never holds 300M rows in memory; only the few thousand thumbnails shown are decoded.

    >>> size_category(184), size_category(12_811), size_category(1_281_167)
    ('n<1K', '10K<n<100K', '1M<n<10M')
    >>> brace_pattern(["demo-train-0000.tar", "demo-train-0001.tar", "demo-train-0002.tar"])
    'demo-train-{0000..0002}.tar'
"""

from __future__ import annotations

import contextlib
import html
import io
import json
import os
import re
import shutil
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from silverlabel import __version__
from silverlabel.dataset import MANIFEST, Dataset, atomic_write, write_json_atomic
from silverlabel.errors import UserError

CARD_DIR = "card"
README = "README.md"
COYO_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5)
CURVE_THRESHOLDS = tuple(round(k / 20, 2) for k in range(1, 20))  # 0.05 .. 0.95, includes COYO's
PLOT_TITLES = {
    "class_frequency": "Class frequency",
    "top1_probability": "Top-1 probability",
    "labels_per_threshold": "Labels per image against threshold",
    "image_sizes": "Image sizes",
    "ingest_status": "Ingest statuses",
}
_MORE = "[More Information Needed]"


@dataclass(frozen=True)
class CardConfig:
    """Everything ``card`` needs."""

    dataset: str
    output: str | None = None  # README path (default DATASET/README.md); plots go next to it in card/
    html: str | None = None  # report folder
    plots: bool = True
    pretty_name: str | None = None
    license: str = "other"
    per_class: int = 8  # thumbnails per class in the report
    max_classes: int = 10_000  # classes with a grid in the report (the largest)
    least_confident: int = 48
    max_clusters: int = 200  # near-duplicate clusters shown
    failures_per_status: int = 20
    thumb_size: int = 96
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)

    def __post_init__(self) -> None:
        for name in ("per_class", "max_classes", "least_confident", "max_clusters", "failures_per_status"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0")
        if not 16 <= self.thumb_size <= 512:
            raise UserError(f"--thumb-size must be in 16..512, got {self.thumb_size}")


@dataclass
class CardSummary:
    readme: str
    kind: str
    samples: int
    classes: int
    splits: dict[str, int]
    plots: list[str]
    report: str | None
    thumbnails: int
    seconds: float
    notes: list[str]


# ---------------------------------------------------------------------------------------
# small pure helpers


def size_category(n: int) -> str:
    """The Hugging Face ``size_categories`` bucket of ``n`` samples."""
    if n < 1_000:
        return "n<1K"
    bounds = [(10**k, 10 ** (k + 1)) for k in range(3, 12)]
    names = {10**3: "1K", 10**4: "10K", 10**5: "100K", 10**6: "1M", 10**7: "10M", 10**8: "100M",
             10**9: "1B", 10**10: "10B", 10**11: "100B", 10**12: "1T"}
    for lo, hi in bounds:
        if lo <= n < hi:
            return f"{names[lo]}<n<{names[hi]}"
    return "n>1T"


def brace_pattern(names: list[str]) -> str:
    """``prefix-{0000..0004}.tar`` for consecutive numbered names, else first .. last."""
    if not names:
        return ""
    if len(names) == 1:
        return names[0]
    m = [re.fullmatch(r"(.*?)(\d+)(\D*)", n) for n in names]
    if all(m) and len({(x.group(1), x.group(3), len(x.group(2))) for x in m}) == 1:
        nums = [int(x.group(2)) for x in m]
        if nums == list(range(nums[0], nums[0] + len(nums))):
            return f"{m[0].group(1)}{{{m[0].group(2)}..{m[-1].group(2)}}}{m[0].group(3)}"
    return f"{names[0]} .. {names[-1]}"


def _q(path: str | os.PathLike) -> str:
    """A path as a DuckDB string literal body."""
    return str(path).replace("'", "''")


def _fmt(n: Any) -> str:
    if isinstance(n, bool) or n is None:
        return str(n)
    if isinstance(n, int):
        return f"{n:,}"
    if isinstance(n, float):
        return f"{n:.4g}"
    return str(n)


def _yaml_str(s: str) -> str:
    """A YAML scalar: JSON strings are valid YAML."""
    return json.dumps(s, ensure_ascii=False)


def compact_json(obj: Any, indent: int = 0) -> str:
    """JSON with objects one key a line and lists on one line (readable data instances).

    >>> print(compact_json({"a": [1, 2], "b": {"c": "x"}}))
    {
      "a": [1, 2],
      "b": {
        "c": "x"
      }
    }
    """
    pad = "  " * (indent + 1)
    if isinstance(obj, dict) and obj:
        items = [f"{pad}{json.dumps(k)}: {compact_json(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + "  " * indent + "}"
    if isinstance(obj, list):
        return "[" + ", ".join(compact_json(v, indent + 1) if isinstance(v, dict) else json.dumps(v, ensure_ascii=False)
                               for v in obj) + "]"
    return json.dumps(obj, ensure_ascii=False)


def _md_escape(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    align = align or "l" * len(header)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(_md_escape(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# lineage


@dataclass
class Lineage:
    """The dataset and the directories above it that still exist."""

    root: Path
    kind: str  # pool | selection | trainset
    manifest: dict[str, Any]
    pool: Path | None = None
    pool_manifest: dict[str, Any] | None = None
    selection: Path | None = None
    selection_manifest: dict[str, Any] | None = None
    trainset: Path | None = None
    trainset_manifest: dict[str, Any] | None = None
    labels_name: str | None = None
    notes: list[str] = field(default_factory=list)

    def chain(self) -> list[tuple[str, Path, dict[str, Any]]]:
        out = []
        for stage, p, m in (("ingest", self.pool, self.pool_manifest),
                            ("select", self.selection, self.selection_manifest),
                            ("shard", self.trainset, self.trainset_manifest)):
            if p is not None and m is not None:
                out.append((stage, p, m))
        return out


def _manifest(path: Path) -> dict[str, Any] | None:
    try:
        return Dataset(path).read_manifest()
    except (FileNotFoundError, ValueError):
        return None


def resolve_lineage(dataset: str | os.PathLike) -> Lineage:
    """Find what ``dataset`` is and the pool / selection / training set it comes from."""
    root = Path(dataset)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such dataset directory")
    man = _manifest(root)
    has_info = (root / "_info.json").is_file()
    if man is None and not has_info:
        raise UserError(f"{root}: not a silverlabel dataset (no {MANIFEST} or _info.json)")
    man = man or {"stage": "shard"}
    stage = man.get("stage")
    if stage == "shard" or has_info:
        if not has_info:
            raise UserError(f"{root}: training set is not finished (no _info.json); run silverlabel shard again")
        lin = Lineage(root, "trainset", man, trainset=root, trainset_manifest=man)
        parent = next((p for p in man.get("parents", []) if p.get("kind") == "selection"), None)
        if parent:
            sel = Path(parent["path"])
            sm = _manifest(sel)
            if sm is not None and sm.get("stage") == "select":
                lin.selection, lin.selection_manifest = sel, sm
                from silverlabel.stages.shard import selection_files, selection_fingerprint

                with contextlib.suppress(Exception):
                    if man.get("selection_sha256") not in (None, selection_fingerprint(selection_files(sel))):
                        lin.notes.append(f"selection {sel} changed after these shards were written: its rows and "
                                         "report may not describe this training set")
            else:
                lin.notes.append(f"selection {sel} not found: per-sample facts read from the shards")
    elif stage == "select":
        lin = Lineage(root, "selection", man, selection=root, selection_manifest=man)
    elif stage == "ingest":
        lin = Lineage(root, "pool", man, pool=root, pool_manifest=man)
    else:
        raise UserError(f"{root}: card reads an ingest, select or shard output, this one is {stage!r}")
    if lin.selection_manifest is not None and lin.pool is None:
        parent = (lin.selection_manifest.get("parents") or [{}])[0]
        if parent.get("kind") == "dataset":
            pm = _manifest(Path(parent["path"]))
            if pm is not None and pm.get("stage") == "ingest":
                lin.pool, lin.pool_manifest = Path(parent["path"]), pm
            else:
                lin.notes.append(f"source dataset {parent.get('path')} not found: no ingest statistics")
    if lin.pool_manifest is not None:
        labels = lin.pool_manifest.get("labels") or {}
        want = (lin.selection_manifest or {}).get("config", {}).get("labels_name")
        lin.labels_name = want if want in labels else (sorted(labels)[0] if labels else None)
    return lin


# ---------------------------------------------------------------------------------------
# the facts


class _Names:
    """Class index -> human name for the labels' index space."""

    def __init__(self, space: str | None, classes_doc: dict[str, Any] | None):
        self.space = None
        self.by_index: dict[int, tuple[str | None, str]] = {}
        if space in ("in1k", "in12k", "in21k"):
            from silverlabel.teachers.labelspace import get_label_space

            self.space = get_label_space(space)
        for c in (classes_doc or {}).get("classes", []):
            if c.get("source_index") is not None:
                self.by_index[int(c["source_index"])] = (c.get("wnid"), c.get("name"))

    def name(self, i: int) -> str:
        if i in self.by_index:
            return self.by_index[i][1]
        if self.space is not None and 0 <= i < len(self.space):
            return self.space.lemma(i)
        return f"#{i}"

    def wnid(self, i: int) -> str | None:
        if i in self.by_index:
            return self.by_index[i][0]
        if self.space is not None and 0 <= i < len(self.space):
            return self.space.wnids[i]
        return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _trainset_rows(root: Path, info: dict[str, Any], tmp: Path) -> Path:
    """Per-sample facts of a training set from its shards' .json members (no selection)."""
    from silverlabel.formats.wds import iter_tar_samples, read_member

    rows: dict[str, list] = defaultdict(list)
    for split, s in info["splits"].items():
        for name in s["filenames"]:
            tar = root / name
            with open(tar, "rb") as f:
                for sample in iter_tar_samples(str(tar)):
                    meta = json.loads(read_member(f, *sample.members["json"])) if "json" in sample.members else {}
                    rows["key"].append(sample.key)
                    rows["split"].append(split)
                    label = meta.get("label")
                    rows["cls"].append(None if label is None or label < 0 else int(label))
                    rows["class_name"].append(meta.get("class_name"))
                    rows["labels"].append(meta.get("labels"))
                    rows["label_probs"].append(meta.get("label_probs"))
                    rows["width"].append(meta.get("width"))
                    rows["height"].append(meta.get("height"))
                    rows["tar"].append(str(tar))
                    rows["tar_key"].append(sample.key)
    schema = pa.schema([("key", pa.string()), ("split", pa.string()), ("cls", pa.int32()), ("class_name", pa.string()),
                        ("labels", pa.list_(pa.int32())), ("label_probs", pa.list_(pa.float32())),
                        ("width", pa.int32()), ("height", pa.int32()), ("tar", pa.string()), ("tar_key", pa.string())])
    path = tmp / "trainset_rows.parquet"
    pq.write_table(pa.table({n: rows[n] for n in schema.names}, schema=schema), path)
    return path


class Facts:
    """Everything the card says, computed once (DuckDB over the tables)."""

    def __init__(self, lin: Lineage, cfg: CardConfig, con, tmp: Path):
        self.lin = lin
        self.cfg = cfg
        self.con = con
        self.d: dict[str, Any] = {"silverlabel_version": __version__, "kind": lin.kind, "path": str(lin.root.resolve())}
        self._setup_views(tmp)

    # -- views -------------------------------------------------------------------------
    def _setup_views(self, tmp: Path) -> None:
        lin, con = self.lin, self.con
        self.has_samples = self.has_labels = False
        if lin.pool is not None:
            samples = lin.pool / "samples"
            if any(samples.glob("*.parquet")):
                con.execute(f"CREATE VIEW samples AS SELECT * FROM read_parquet('{_q(samples)}/*.parquet', "
                            "union_by_name=true)")
                self.has_samples = True
            if lin.labels_name and any((lin.pool / "labels" / lin.labels_name).glob("*.parquet")):
                con.execute(f"CREATE VIEW labels AS SELECT * FROM read_parquet("
                            f"'{_q(lin.pool / 'labels' / lin.labels_name)}/*.parquet')")
                self.has_labels = True
        self.classes_doc = None
        if lin.kind == "pool":
            if not self.has_samples:
                raise UserError(f"{lin.root}: has no samples table yet (ingest not finished?)")
            shards = _q(lin.pool / "shards")
            if self.has_labels:
                con.execute(f"""CREATE VIEW items AS SELECT s.key, 'all' AS split, l.labels[1] AS cls,
                    NULL::VARCHAR AS class_name, l.labels, l.label_probs, s.width, s.height,
                    '{shards}/' || s.shard AS tar, s.key AS tar_key
                    FROM samples s JOIN labels l USING (key) WHERE s.status = 'success'""")
            else:
                con.execute(f"""CREATE VIEW items AS SELECT s.key, 'all' AS split, NULL::INTEGER AS cls,
                    NULL::VARCHAR AS class_name, NULL::INTEGER[] AS labels, NULL::FLOAT[] AS label_probs,
                    s.width, s.height, '{shards}/' || s.shard AS tar, s.key AS tar_key
                    FROM samples s WHERE s.status = 'success'""")
        else:
            if lin.selection is not None:
                sel = _q(lin.selection / "selection")
                con.execute(f"""CREATE VIEW items AS SELECT key, split, cls, class_name, labels, label_probs,
                    width, height, CASE WHEN source_dataset IS NULL THEN NULL
                                        ELSE source_dataset || '/shards/' || source_shard END AS tar,
                    source_key AS tar_key FROM read_parquet('{sel}/*.parquet')""")
                self.classes_doc = _read_json(lin.selection / "classes.json")
            if lin.kind == "trainset":
                self.info = _read_json(lin.root / "_info.json")
                if self.info is None:
                    raise UserError(f"{lin.root}/_info.json: unreadable")
                if lin.selection is None:
                    path = _trainset_rows(lin.root, self.info, tmp)
                    con.execute(f"CREATE VIEW items AS SELECT * FROM read_parquet('{_q(path)}')")
                self.classes_doc = _read_json(lin.root / "classes.json") or self.classes_doc
        self.label_space = self._label_space()
        self.names = _Names(self.label_space, self.classes_doc)
        self.has_probs = self.scalar("SELECT count(*) FROM items WHERE len(label_probs) > 0") > 0

    def _label_space(self) -> str | None:
        """The index space of the ``labels`` lists of the items."""
        lin = self.lin
        teacher_space = None
        if lin.pool_manifest and lin.labels_name:
            teacher_space = lin.pool_manifest["labels"][lin.labels_name]["config"].get("label_space")
        if lin.kind == "pool":
            return teacher_space
        scfg = (lin.selection_manifest or {}).get("config", {})
        report = _read_json(lin.selection / "report.json") if lin.selection else None
        rule = (report or {}).get("label_rule")
        if scfg.get("rollup_depth") is not None or scfg.get("rollup_to"):
            return None if rule == "top1" else teacher_space
        if rule == "top1" and scfg.get("label_space"):
            return scfg["label_space"]
        if teacher_space:
            return teacher_space
        space = (self.classes_doc or {}).get("label_space")
        if space in ("in1k", "in12k", "in21k"):
            return space
        parent = ((lin.selection_manifest or {}).get("parents") or [{}])[0]
        return "in21k" if parent.get("kind") == "labels_table" else None

    def scalar(self, sql: str) -> Any:
        return self.con.execute(sql).fetchall()[0][0]

    def rows(self, sql: str) -> list[tuple]:
        return self.con.execute(sql).fetchall()

    # -- computing ---------------------------------------------------------------------
    def compute(self) -> dict[str, Any]:
        d, lin = self.d, self.lin
        d["lineage"] = [{"stage": s, "path": str(p.resolve()), "silverlabel_version": m.get("silverlabel_version"),
                         "updated": m.get("updated")} for s, p, m in lin.chain()]
        d["notes"] = list(lin.notes)
        d["name"] = self.cfg.pretty_name or self._default_name()
        # splits
        if lin.kind == "trainset":
            d["splits"] = [{"name": s, "samples": int(v["num_samples"]), "shards": len(v["filenames"]),
                            "pattern": brace_pattern(list(v["filenames"])),
                            "min_shard": min(v["shard_lengths"], default=0),
                            "max_shard": max(v["shard_lengths"], default=0)}
                           for s, v in self.info["splits"].items()]
        elif lin.kind == "selection":
            d["splits"] = [{"name": s, "samples": int(n), "shards": None, "pattern": None}
                           for s, n in self.rows("SELECT split, count(*) FROM items GROUP BY 1 ORDER BY 1")]
        else:
            shards = sorted(p.name for p in (lin.pool / "shards").glob("*.tar"))
            d["splits"] = [{"name": "all", "samples": int(self.scalar("SELECT count(*) FROM items")),
                            "shards": len(shards), "pattern": "shards/" + brace_pattern(shards)}]
        d["samples"] = sum(s["samples"] for s in d["splits"])
        # classes
        if lin.kind == "pool":
            counts = self.rows("SELECT cls, count(*) AS n FROM items WHERE cls IS NOT NULL "
                               "GROUP BY 1 ORDER BY n DESC, cls")
            d["classes"] = [{"cls": int(c), "name": self.names.name(int(c)), "wnid": self.names.wnid(int(c)),
                             "total": int(n)} for c, n in counts]
            d["class_rule"] = "teacher top-1" if self.has_labels else None
        else:
            per: dict[int, dict[str, int]] = defaultdict(dict)
            row_names: dict[int, str] = {}
            for c, s, n, nm in self.rows("SELECT cls, split, count(*), any_value(class_name) FROM items "
                                         "WHERE cls IS NOT NULL AND cls >= 0 GROUP BY 1, 2"):
                per[int(c)][s] = int(n)
                row_names[int(c)] = nm
            doc = {int(c["cls"]): c for c in (self.classes_doc or {}).get("classes", [])}
            if not per and doc:  # no per-sample rows: the class map's counts
                per = {c: {k: int(v[k]) for k in ("train", "validation") if v.get(k)} for c, v in doc.items()}
            d["classes"] = sorted(
                [{"cls": c, "name": (doc.get(c) or {}).get("name") or row_names.get(c) or str(c),
                  "wnid": (doc.get(c) or {}).get("wnid"),
                  "splits": per[c], "total": sum(per[c].values())} for c in per],
                key=lambda r: (-r["total"], r["cls"]))
            rep = _read_json(lin.selection / "report.json") if lin.selection else None
            d["class_rule"] = (rep or {}).get("label_rule")
        d["num_classes"] = len(d["classes"])
        d["label_space"] = self.label_space
        d["class_space"] = (self.classes_doc or {}).get("label_space") if lin.kind != "pool" else self.label_space
        # statuses (ingest)
        if self.has_samples:
            d["status"] = {s: int(n) for s, n in self.rows("SELECT status, count(*) AS n FROM samples GROUP BY 1 "
                                                             "ORDER BY n DESC, 1")}
            d["inputs"] = sum(d["status"].values())
        # probabilities and thresholds
        if self.has_probs:
            hist = dict(self.rows("SELECT least(floor(label_probs[1] * 50)::INTEGER, 49), count(*) FROM items "
                                  "WHERE len(label_probs) > 0 GROUP BY 1"))
            d["top1_hist"] = {"edges": [i / 50 for i in range(51)], "counts": [int(hist.get(i, 0)) for i in range(50)]}
            d["top1_mean"] = float(self.scalar("SELECT avg(label_probs[1]) FROM items WHERE len(label_probs) > 0"))
            d["topk"] = int(self.scalar("SELECT max(len(labels)) FROM items"))
            d["curve"] = self._threshold_stats()
            d["thresholds"] = [r for r in d["curve"] if r["threshold"] in COYO_THRESHOLDS]
        # image sizes
        wh = self.rows("SELECT width, height, count(*) FROM items WHERE width IS NOT NULL AND height IS NOT NULL "
                       "GROUP BY 1, 2")
        if wh:
            w, h, n = (np.array(x, dtype=np.int64) for x in zip(*wh))
            short = np.minimum(w, h)
            order = np.argsort(short, kind="stable")
            cum = np.cumsum(n[order])
            median = int(short[order][np.searchsorted(cum, (cum[-1] + 1) // 2)])
            d["sizes"] = {"w": w.tolist(), "h": h.tolist(), "n": n.tolist(), "min_short_side": int(short.min()),
                          "median_short_side": median, "max_long_side": int(np.maximum(w, h).max())}
        # creation facts
        d["ingest"] = self._ingest()
        d["teacher"] = self._teacher()
        d["select"] = self._select()
        d["shard"] = self._shard()
        d["seeds"] = {k: v for k, v in (("select", (d["select"] or {}).get("config", {}).get("seed")),
                                         ("shard", (d["shard"] or {}).get("config", {}).get("seed"))) if v is not None}
        d["instance"] = self._instance()
        return d

    def _default_name(self) -> str:
        lin = self.lin
        if lin.kind == "trainset":
            return self.info.get("name") or lin.root.resolve().name
        return lin.root.resolve().name

    def _threshold_stats(self) -> list[dict[str, Any]]:
        """COYO's table over the items' top-k lists (labels.threshold_stats, streamed)."""
        from silverlabel.stages.label import threshold_stats

        n = int(self.scalar("SELECT coalesce(max(list_max(labels)), 0) FROM items")) + 1
        if self.lin.kind == "pool":
            files = sorted((self.lin.pool / "labels" / self.lin.labels_name).glob("*.parquet"))
            # pool labels rows are exactly the labeled successes (items joins them 1:1)
            return threshold_stats(files, CURVE_THRESHOLDS, num_classes=n)
        tmp = self._items_labels_file()
        return threshold_stats([tmp], CURVE_THRESHOLDS, num_classes=n)

    def _items_labels_file(self) -> Path:
        tmp = self.con.execute("SELECT current_setting('temp_directory')").fetchall()[0][0] or "."
        path = Path(tmp) / "labels.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.con.execute(f"COPY (SELECT labels, label_probs FROM items WHERE len(label_probs) > 0) TO '{_q(path)}' "
                         "(FORMAT parquet)")
        return path

    def _ingest(self) -> dict[str, Any] | None:
        m = self.lin.pool_manifest
        if m is None:
            return None
        return {"path": str(self.lin.pool.resolve()), "parents": m.get("parents", []), "config": m.get("config", {}),
                "counts": m.get("counts", {}), "shards": m.get("shards"), "version": m.get("silverlabel_version")}

    def _teacher(self) -> dict[str, Any] | None:
        m, name = self.lin.pool_manifest, self.lin.labels_name
        if m is None or not name:
            return None
        rec = m["labels"][name]
        space = rec["config"].get("label_space")
        size = None
        if space in ("in1k", "in12k", "in21k"):
            from silverlabel.teachers.labelspace import get_label_space

            size = len(get_label_space(space))
        return {"name": name, "config": rec["config"], "rows": rec.get("rows"),
                "decode_errors": rec.get("decode_errors"),
                "partial": rec.get("partial"), "label_space": space, "label_space_size": size}

    def _select(self) -> dict[str, Any] | None:
        m, sel = self.lin.selection_manifest, self.lin.selection
        if m is None:
            return None
        dups = None
        path = sel / "duplicates.parquet"
        if path.is_file():
            t = pq.read_table(path, columns=["rule", "kept_key"])
            dups = dict(Counter(t.column("rule").to_pylist()))
        return {"path": str(sel.resolve()), "config": m.get("config", {}), "parents": m.get("parents", []),
                "report": _read_json(sel / "report.json") or {}, "duplicates": dups}

    def _shard(self) -> dict[str, Any] | None:
        m = self.lin.trainset_manifest
        if self.lin.kind != "trainset" or not m:
            return None
        return {"config": m.get("config", {}), "name": self.info.get("name")}

    def _instance(self) -> dict[str, Any] | None:
        """A real sample, as a user of this dataset sees it."""
        lin = self.lin
        if lin.kind == "trainset":
            from silverlabel.formats.wds import iter_tar_samples, read_member

            split = next((s for s in self.info["splits"].values() if s["filenames"]), None)
            if split is None:
                return None
            tar = lin.root / split["filenames"][0]
            sample = next(iter_tar_samples(str(tar)), None)
            if sample is None:
                return None
            out: dict[str, Any] = {"__key__": sample.key, "__url__": split["filenames"][0]}
            with open(tar, "rb") as f:
                for ext, loc in sample.members.items():
                    data = read_member(f, *loc)
                    if ext == "json":
                        out[ext] = json.loads(data)
                    elif ext == "cls":
                        out[ext] = int(data.decode())
                    elif ext == "txt":
                        out[ext] = data.decode("utf-8", "replace")
                    else:
                        out[ext] = _image_note(data, ext)
            return out
        if lin.kind == "selection":
            rows = pq.read_table(sorted((lin.selection / "selection").glob("*.parquet"))[0]).slice(0, 1).to_pylist()
            return _jsonable(rows[0]) if rows else None
        rows = self.con.sql("SELECT * FROM samples WHERE status = 'success' ORDER BY key LIMIT 1").to_arrow_table()
        if rows.num_rows == 0:
            return None
        row = rows.to_pylist()[0]
        if self.has_labels:
            lab = self.con.execute(f"SELECT labels, label_probs FROM labels WHERE key = '{_q(row['key'])}'").fetchall()
            if lab:
                row["labels"], row["label_probs"] = lab[0][0], lab[0][1]
        return _jsonable(row)


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in row.items():
        if isinstance(v, float):
            v = float(np.float32(v).astype(str))
        elif isinstance(v, list) and v and isinstance(v[0], float):
            v = [float(x) for x in np.asarray(v, np.float32).astype(str)]
        out[k] = v
    return out


def _image_note(data: bytes, ext: str) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return f"<{im.format} image, {im.width}x{im.height}, {len(data):,} bytes>"
    except Exception:
        return f"<{ext}, {len(data):,} bytes>"


# ---------------------------------------------------------------------------------------
# plots


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    with atomic_write(path) as f:
        f.write(buf.getvalue())


def write_plots(d: dict[str, Any], out: Path) -> list[Path]:
    """The PNG plots the facts allow; returns their paths."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    style = {"figure.figsize": (7, 4), "axes.grid": True, "grid.alpha": 0.3, "font.size": 9}
    with plt.rc_context(style):
        if d.get("classes"):
            counts = np.array([c["total"] for c in d["classes"]])
            fig, ax = plt.subplots()
            ranks = np.arange(1, len(counts) + 1)
            if len(counts) <= 200:
                ax.bar(ranks, counts, width=1.0, color="#4c72b0")
            else:
                ax.fill_between(ranks, counts, step="mid", color="#4c72b0", alpha=0.8)
            ax.set_yscale("log")
            ax.set_xlabel("class rank (largest first)")
            ax.set_ylabel("samples (log)")
            head, tail = d["classes"][0], d["classes"][-1]
            ax.set_title(f"{len(counts):,} classes: largest {head['name']} ({head['total']:,}), "
                         f"smallest {tail['name']} ({tail['total']:,})")
            fig.tight_layout()
            _save(fig, out / "class_frequency.png")
            plt.close(fig)
            written.append(out / "class_frequency.png")
        if d.get("top1_hist"):
            h = d["top1_hist"]
            fig, ax = plt.subplots()
            ax.hist(np.array(h["edges"][:-1]), bins=h["edges"], weights=h["counts"], color="#55a868")
            for t in COYO_THRESHOLDS:
                ax.axvline(t, color="gray", ls="--", lw=0.8)
            ax.set_xlabel("top-1 probability")
            ax.set_ylabel("images")
            ax.set_title(f"Top-1 probability of {sum(h['counts']):,} images (mean {d['top1_mean']:.3f})")
            fig.tight_layout()
            _save(fig, out / "top1_probability.png")
            plt.close(fig)
            written.append(out / "top1_probability.png")
        if d.get("curve"):
            c = d["curve"]
            t = [r["threshold"] for r in c]
            fig, ax = plt.subplots()
            ax.plot(t, [r["avg_labels_per_image"] for r in c], "o-", color="#4c72b0", label="labels per image")
            ax.set_xlabel("probability threshold")
            ax.set_ylabel("average labels per image")
            ax2 = ax.twinx()
            ax2.plot(t, [100 * r["share_with_label"] for r in c], "s--", color="#c44e52",
                     label="images with >= 1 label")
            ax2.set_ylabel("% images with >= 1 label")
            ax2.set_ylim(0, 100)
            ax2.grid(False)
            lines = ax.get_lines() + ax2.get_lines()
            ax.legend(lines, [line.get_label() for line in lines], loc="upper right")
            ax.set_title("Labels per image against threshold")
            fig.tight_layout()
            _save(fig, out / "labels_per_threshold.png")
            plt.close(fig)
            written.append(out / "labels_per_threshold.png")
        if d.get("sizes"):
            s = d["sizes"]
            w, h, n = np.array(s["w"]), np.array(s["h"]), np.array(s["n"])
            fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 4))
            hi = max(2, int(max(w.max(), h.max())))
            bins = np.linspace(0, hi * 1.02, 41)
            _, _, _, im = a1.hist2d(w, h, bins=[bins, bins], weights=n, cmap="viridis", cmin=1)
            a1.set_xlabel("width (px)")
            a1.set_ylabel("height (px)")
            a1.set_title("stored width x height")
            fig.colorbar(im, ax=a1, label="images")
            short = np.minimum(w, h)
            a2.hist(short, bins=np.linspace(0, short.max() * 1.02 + 1, 41), weights=n, color="#8172b2")
            a2.set_xlabel("shorter side (px)")
            a2.set_ylabel("images")
            a2.set_title(f"shorter side (median {s['median_short_side']} px)")
            fig.tight_layout()
            _save(fig, out / "image_sizes.png")
            plt.close(fig)
            written.append(out / "image_sizes.png")
        if d.get("status"):
            st = d["status"]
            fig, ax = plt.subplots(figsize=(7, max(2.0, 0.45 * len(st) + 1)))
            names = list(st)[::-1]
            vals = [st[k] for k in names]
            colors = ["#55a868" if k == "success" else "#c44e52" for k in names]
            ax.barh(names, vals, color=colors)
            total = sum(vals)
            for i, v in enumerate(vals):
                ax.text(v, i, f" {v:,} ({100 * v / total:.1f}%)", va="center")
            ax.set_xscale("log")
            ax.set_xlim(0.8, max(vals) * 8)
            ax.set_xlabel("inputs (log)")
            ax.set_title(f"Ingest statuses of {total:,} inputs")
            fig.tight_layout()
            _save(fig, out / "ingest_status.png")
            plt.close(fig)
            written.append(out / "ingest_status.png")
    return written


# ---------------------------------------------------------------------------------------
# the card


_FIELD_DOCS = {
    "key": "sample key (WebDataset `__key__`), unique in the dataset",
    "uid": "32-hex uid (DataComp-style; from the input or derived from the URL/path)",
    "id": "integer id from the input table",
    "url": "where the image was fetched from",
    "caption": "caption/alt-text from the source, if any",
    "status": "ingest outcome: success, failed_download, failed_decode, too_small, opted_out, ...",
    "error": "one-line reason when status is not success",
    "width": "stored image width (px)",
    "height": "stored image height (px)",
    "original_width": "width before resizing (px)",
    "original_height": "height before resizing (px)",
    "sha256": "sha256 of the downloaded bytes",
    "imagehash": "64-bit perceptual hash, 16 hex (`str(imagehash.phash(img))`)",
    "shard": "tar shard holding the image",
    "source": "where the bytes came from (URL, relative path or tar#key)",
    "label": "human label from the source (ImageFolder class, .cls), if any",
    "labels": "teacher top-k class indices, most probable first",
    "label_probs": "teacher probabilities of `labels`",
    "source_key": "key of the sample in its source dataset",
    "split": "train / validation / ...",
    "cls": "class index into classes.json (-1 without labels)",
    "class_name": "human name of `cls`",
    "source_dataset": "dataset directory holding the image bytes",
    "source_shard": "tar in `source_dataset/shards` holding the image",
}


def _fields(f: Facts) -> list[list[str]]:
    lin = f.lin
    if lin.kind == "trainset":
        inst = f.d.get("instance") or {}
        rows = [["`__key__`", "string", _FIELD_DOCS["key"]]]
        for ext, v in inst.items():
            if ext.startswith("__"):
                continue
            if ext == "cls":
                rows.append(["`cls`", "int (ASCII)", "class index into classes.json (-1 without labels)"])
            elif ext == "txt":
                rows.append(["`txt`", "string", "caption"])
            elif ext == "json":
                rows.append(["`json`", "object", "per-sample metadata:"])
                for k, sub in v.items():
                    doc = {"label": "= cls", "source": "key, uid, id, url, dataset, shard of the sample's origin"}.get(
                        k, _FIELD_DOCS.get(k, ""))
                    typ = "list" if isinstance(sub, list) else type(sub).__name__ if sub is not None else "null"
                    rows.append([f"`json.{k}`", {"str": "string", "dict": "object"}.get(typ, typ), doc])
            else:
                rows.append([f"`{ext}`", "bytes", f"the image ({ext.upper()}, copied unchanged from the source shard)"])
        return rows
    if lin.kind == "selection":
        from silverlabel.formats.selection import SELECTION_SCHEMA

        return [[f"`{fl.name}`", str(fl.type), _FIELD_DOCS.get(fl.name, "")] for fl in SELECTION_SCHEMA]
    schema = pq.read_schema(sorted((lin.pool / "samples").glob("*.parquet"))[0])
    rows = [[f"`{fl.name}`", str(fl.type), _FIELD_DOCS.get(fl.name, "carried through from the source table")]
            for fl in schema]
    if f.has_labels:
        rows += [["`labels`", "list<int32>", f"{_FIELD_DOCS['labels']} (labels/{lin.labels_name}/*.parquet)"],
                 ["`label_probs`", "list<float32>", _FIELD_DOCS["label_probs"]]]
    return rows


def _config_rows(stage: str, cfg: dict[str, Any], skip: tuple[str, ...] = ()) -> list[list[str]]:
    rows = []

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else k, x)
        elif v is not None and v != [] and v is not False:
            rows.append([stage, f"`{prefix}`", f"`{v if isinstance(v, str) else json.dumps(v)}`"])

    for k, v in cfg.items():
        if k not in skip:
            walk(k, v)
    return rows


def render_card(f: Facts, plots: list[Path], readme: Path) -> str:
    d, lin = f.d, f.lin
    n, ncls = d["samples"], d["num_classes"]
    teacher = d.get("teacher")
    sel = d.get("select")
    multi = bool(d.get("topk") and d["topk"] > 1)
    task_ids = ["multi-class-image-classification"] + (["multi-label-image-classification"] if multi else [])
    fm = ["---", f"pretty_name: {_yaml_str(d['name'])}", f"license: {_yaml_str(f.cfg.license)}",
          "annotations_creators:", "- machine-generated", "language_creators:", "- found", "language:", "- en",
          "multilinguality:", "- monolingual", "size_categories:", f"- {_yaml_str(size_category(n))}",
          "source_datasets:", "- original", "task_categories:", "- image-classification", "task_ids:"]
    fm += [f"- {t}" for t in task_ids]
    fm += ["tags:", "- silverlabel", "- webdataset", "- machine-labeled", "---", ""]
    out = fm
    kind_word = {"pool": "an ingested image pool", "selection": "a selection", "trainset": "a training set"}[lin.kind]
    out.append(f"# Dataset Card for {d['name']}\n")
    out.append("## Dataset Description\n")
    out.append("### Dataset Summary\n")
    summary = f"{d['name']} is {kind_word} of **{n:,} images**"
    if ncls:
        summary += f" in **{ncls:,} classes**"
    if len(d["splits"]) > 1 or lin.kind == "trainset":
        summary += " (" + ", ".join(f"{s['name']}: {s['samples']:,}" for s in d["splits"]) + ")"
    summary += "."
    if teacher:
        tnames = " + ".join(t["name"] for t in teacher["config"]["teachers"])
        summary += (f" Every image was labeled by a machine teacher ({tnames}) with its top-{teacher['config']['topk']}"
                    f" classes and their probabilities over the {teacher['label_space']} label space")
        if teacher.get("label_space_size"):
            summary += f" ({teacher['label_space_size']:,} classes)"
        summary += ", in the COYO-Labeled-300M format."
    if d.get("inputs") is not None:
        summary += (f" It was built by [silverlabel](https://github.com/silverlabel/silverlabel) {__version__} from "
                    f"{d['inputs']:,} inputs, of which {d['status'].get('success', 0):,} were stored as images.")
    if lin.kind == "trainset":
        summary += (" The shards are pre-shuffled WebDataset tars with `_info.json`, read directly by timm "
                    f"(`--dataset wds/{d['shard']['name']} --data-dir <this folder>`), webdataset and wids.")
    out.append(summary + "\n")
    out.append("### Supported Tasks\n")
    tasks = "- `image-classification`: train on `cls` (one class per image)."
    if multi:
        tasks += ("\n- multi-label / distillation: train on the teacher's top-k `labels` and `label_probs` "
                  "(e.g. BCE on labels above a threshold, as COYO-ViT does).")
    out.append(tasks + "\n")

    # structure
    out.append("## Dataset Structure\n")
    out.append("### Data Instances\n")
    inst = d.get("instance")
    if inst is not None:
        where = {"trainset": "one sample of the first shard, as webdataset yields it",
                 "selection": "one row of `selection/*.parquet`",
                 "pool": "one row of `samples/*.parquet` with its labels row joined"}[lin.kind]
        out.append(f"A real instance ({where}):\n")
        out.append("```json\n" + compact_json(inst) + "\n```\n")
    else:
        out.append("This dataset has no samples.\n")
    out.append("### Data Fields\n")
    out.append(_table(["field", "type", "description"], _fields(f)) + "\n")
    out.append("### Data Splits\n")
    srows = []
    for s in d["splits"]:
        srows.append([s["name"], f"{s['samples']:,}", "" if s["shards"] is None else f"{s['shards']:,}",
                      "" if not s["pattern"] else f"`{s['pattern']}`",
                      f"{s['min_shard']:,}-{s['max_shard']:,}" if s.get("min_shard") is not None else ""])
    out.append(_table(["split", "samples", "shards", "shard files", "samples per shard"], srows, "lrrll") + "\n")
    if d["classes"]:
        top = d["classes"][:10]
        split_names = [s["name"] for s in d["splits"]] if lin.kind != "pool" else []
        header = ["rank", "class", "wnid"] + split_names + ["total"]
        rows = [[i + 1, c["name"], c.get("wnid") or ""] + [f"{c.get('splits', {}).get(s, 0):,}" for s in split_names]
                + [f"{c['total']:,}"] for i, c in enumerate(top)]
        what = "teacher top-1 classes" if lin.kind == "pool" else "classes"
        out.append(f"The {len(top)} largest of the {ncls:,} {what} (all of them: "
                   f"{'`classes.json`' if lin.kind != 'pool' else '`card/card.json`'}):\n")
        out.append(_table(header, rows, "rll" + "r" * (len(split_names) + 1)) + "\n")
        totals = [c["total"] for c in d["classes"]]
        out.append(f"Samples per class: min {min(totals):,}, median {int(np.median(totals)):,}, max {max(totals):,}.\n")

    # creation
    out.append("## Dataset Creation\n")
    out.append("### Curation Rationale\n")
    out.append(f"{_MORE} (why this dataset was made; silverlabel recorded how, below.)\n")
    out.append("### Source Data\n")
    ing = d.get("ingest")
    if ing:
        for p in ing["parents"]:
            extra = ", ".join(f"{k}: {v if isinstance(v, str) else json.dumps(v)}" for k, v in p.items()
                              if k not in ("kind", "path") and v not in (None, [], {}))
            out.append(f"- {p.get('kind')} `{p.get('path')}`" + (f" ({extra})" if extra else ""))
        out.append("")
        out.append(f"Ingested into `{ing['path']}` ({ing.get('shards') or 0} shards) with silverlabel "
                   f"{ing.get('version')}. What happened to each input (the samples table's `status`):\n")
        total = sum(d["status"].values())
        out.append(_table(["status", "inputs", "share"],
                          [[k, f"{v:,}", f"{100 * v / max(1, total):.1f}%"] for k, v in d["status"].items()]
                          + [["**total**", f"**{total:,}**", "100.0%"]], "lrr") + "\n")
    elif sel and (sel.get("parents") or [{}])[0].get("kind") in ("labels_table", "samples_table"):
        par = sel["parents"][0]
        what = "labels table (COYO-Labeled-300M schema)" if par["kind"] == "labels_table" else "metadata table"
        out.append(f"Selected from the bare {what} `{par.get('path')}`: no images were fetched yet "
                   "(`silverlabel ingest` on this selection fetches them).\n")
    else:
        out.append("The ingested pool this dataset came from is not available; no source statistics.\n")
    if d.get("sizes"):
        s = d["sizes"]
        out.append(f"Stored images: shorter side {s['min_short_side']:,} px at least, median "
                   f"{s['median_short_side']:,} px; longer side at most {s['max_long_side']:,} px.\n")
    out.append("### Filters and their parameters\n")
    prow = []
    if ing:
        c = ing["config"]
        prow += _config_rows("ingest", {"image": c.get("image", {}), "fetch": {
            k: c.get("fetch", {}).get(k) for k in ("robots_optout", "respect_robots", "max_bytes", "timeout")},
            "samples_per_shard": c.get("samples_per_shard")})
    if sel:
        prow += _config_rows("select", sel["config"],
                             skip=("source",) + (() if sel["config"].get("exclude_near") else ("max_distance",)))
    if d.get("shard"):
        prow += _config_rows("shard", d["shard"]["config"], skip=("selection",))
    out.append(_table(["stage", "parameter", "value"], prow) + "\n" if prow else "No recorded parameters.\n")
    if sel:
        rep = sel["report"]
        removed = rep.get("removed", {})
        out.append(f"`select` read {rep.get('input_rows', 0):,} labeled images and kept "
                   f"{rep.get('selected_rows', 0):,} (label rule: {rep.get('label_rule')}). What each rule removed:\n")
        out.append(_table(["rule", "removed"], [[k.replace("_", " "), f"{v:,}"] for k, v in removed.items()]
                          or [["(nothing)", "0"]], "lr") + "\n")
        if sel.get("duplicates") is not None:
            out.append(f"The removed duplicates and the sample each duplicated are listed in "
                       f"`{Path(sel['path']).name}/duplicates.parquet` ({sum(sel['duplicates'].values()):,} rows).\n")
    out.append("### Annotations\n")
    if teacher:
        c = teacher["config"]
        trows = [[t["name"], t.get("checkpoint") or "built-in weights", t.get("activation") or "softmax",
                  t.get("label_space") or "native"] for t in c["teachers"]]
        out.append("Annotation process: machine-generated. " + ("An ensemble (probabilities averaged) of:"
                   if len(trows) > 1 else "The teacher:") + "\n")
        out.append(_table(["teacher", "checkpoint", "activation", "native label space"], trows) + "\n")
        space_note = f"{teacher['label_space']}" + (f" ({teacher['label_space_size']:,} classes)"
                                                     if teacher.get("label_space_size") else "")
        out.append(f"Label space: {space_note}; top-k = {c['topk']}; preprocessing: image size "
                   f"{c.get('img_size') or 'teacher default'}, crop_pct {c.get('crop_pct') or 'teacher default'}, "
                   f"interpolation {c.get('interpolation') or 'teacher default'}; labeled images: "
                   f"{(teacher.get('rows') or 0):,}; decode errors: {(teacher.get('decode_errors') or 0):,}"
                   + ("; **partial labeling (--limit)**" if teacher.get("partial") else "") + ".\n")
    elif d.get("topk"):
        out.append(f"Annotation process: machine-generated; the top-{d['topk']} labels and probabilities come with the "
                   f"input table (label space {d.get('label_space') or 'unknown'}); no teacher run is recorded.\n")
    if d.get("class_rule") and lin.kind != "pool":
        space = d.get("class_space")
        rule = {"top1": "the teacher's top-1 class", "source": "the source's own label (ImageFolder / .cls)",
                "none": "none (unlabeled)"}.get(d["class_rule"], d["class_rule"])
        out.append(f"Class of a sample (`cls`): {rule}; class space: {space}.\n")
    if d.get("thresholds"):
        out.append("### Threshold statistics\n")
        out.append(f"As in COYO-Labeled-300M's card, over the {d['thresholds'][0]['images']:,} labeled images of this "
                   "dataset: labels per image, distinct labels and share of images with at least one label above "
                   "each probability threshold.\n")
        rows = [[f"{r['threshold']:.1f}", f"{r['avg_labels_per_image']:.3f}", f"{r['distinct_labels']:,}",
                 f"{100 * r['share_with_label']:.1f}%"] for r in d["thresholds"]]
        out.append(_table(["threshold", "labels per image", "distinct labels", "images with >= 1 label"], rows, "rrrr")
                   + "\n")
    out.append("### Seeds and reproducibility\n")
    seeds = ", ".join(f"{k} seed {v}" for k, v in d["seeds"].items()) or "no random draws recorded"
    out.append(f"{seeds}. Random draws are functions of (seed, key), so the same inputs and settings give the same "
               "dataset (and byte-identical shards).\n")
    out.append("### Lineage\n")
    out.append(_table(["stage", "directory", "silverlabel", "updated"],
                      [[x["stage"], f"`{x['path']}`", x.get("silverlabel_version") or "", x.get("updated") or ""]
                       for x in d["lineage"]]) + "\n")
    for note in d.get("notes", []):
        out.append(f"> Note: {note}\n")

    # plots
    if plots:
        out.append("## Dataset Statistics\n")
        for p in plots:
            rel = os.path.relpath(p, readme.parent).replace(os.sep, "/")
            title = PLOT_TITLES.get(p.stem, p.stem)
            out.append(f"**{title}**\n\n![{title}]({rel})\n")

    out.append("## Considerations for Using the Data\n")
    out.append("### Social Impact of Dataset\n")
    out.append(f"{_MORE}\n")
    out.append("### Discussion of Biases\n")
    bias = (f"{_MORE} The labels are a model's predictions, not human annotations: they inherit the teacher's "
            "errors and biases and the skew of the source pool.")
    if d.get("thresholds"):
        t3 = next((r for r in d["thresholds"] if r["threshold"] == 0.3), None)
        if t3:
            bias += (f" At threshold 0.3, {100 * t3['share_with_label']:.1f}% of the images have a label and "
                     f"{t3['distinct_labels']:,} classes occur.")
    out.append(bias + "\n")
    out.append("### Other Known Limitations\n")
    out.append(f"{_MORE} Web images may be removed by their owners over time; near-duplicates are removed only "
               "where the lineage above lists a de-duplication rule.\n")
    out.append("## Additional Information\n")
    out.append("### Dataset Curators\n")
    out.append(f"{_MORE}\n")
    out.append("### Licensing Information\n")
    out.append(f"{_MORE} The license field above (`{f.cfg.license}`) covers the metadata and labels. The images "
               "remain the property of their owners; state here the terms under which they may be used.\n")
    out.append("### Citation Information\n")
    out.append(f"{_MORE}\n")
    out.append(f"---\n\n*Card written by `silverlabel card` ({__version__}) from the dataset's manifests and tables; "
               "fill in the sections marked as needing information.*\n")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# the HTML report


def _thumb(data: bytes, size: int):
    from PIL import Image, ImageOps

    im = Image.open(io.BytesIO(data))
    im.draft("RGB", (size * 2, size * 2))
    im = ImageOps.exif_transpose(im).convert("RGB")
    return ImageOps.fit(im, (size, size), Image.BILINEAR)


def _read_images(wanted: set[tuple[str, str]], threads: int) -> dict[tuple[str, str], bytes]:
    """Image bytes of (tar, key) pairs, each tar indexed and read once."""
    from silverlabel.formats.wds import iter_tar_samples, read_member

    by_tar: dict[str, set[str]] = defaultdict(set)
    for tar, key in wanted:
        if tar and key:
            by_tar[tar].add(key)

    def one(tar: str) -> dict[tuple[str, str], bytes]:
        got = {}
        if not os.path.isfile(tar):
            return got
        keys = by_tar[tar]
        with open(tar, "rb") as f:
            for s in iter_tar_samples(tar):
                if s.key in keys:
                    ext = s.image_ext()
                    if ext:
                        got[(tar, s.key)] = read_member(f, *s.members[ext])
        return got

    out: dict[tuple[str, str], bytes] = {}
    with ThreadPoolExecutor(max(1, threads)) as ex:
        for got in ex.map(one, sorted(by_tar)):
            out.update(got)
    return out


class _Sprites:
    """Groups of thumbnails written as one horizontal JPEG strip each."""

    def __init__(self, out: Path, size: int):
        self.out = out
        self.size = size
        self.groups: dict[str, list[tuple[str, str]]] = {}
        self.written = 0

    def add(self, name: str, refs: list[tuple[str, str]]) -> None:
        self.groups[name] = refs

    def write(self, images: dict[tuple[str, str], bytes], threads: int) -> dict[str, list[int]]:
        """Write the sprites; returns, per group, the cell of each ref (-1: no image)."""
        from PIL import Image

        self.out.mkdir(parents=True, exist_ok=True)

        def one(item):
            name, refs = item
            cells, tiles = [], []
            for ref in refs:
                data = images.get(ref)
                tile = None
                if data is not None:
                    try:
                        tile = _thumb(data, self.size)
                    except Exception:
                        tile = None
                cells.append(len(tiles) if tile is not None else -1)
                if tile is not None:
                    tiles.append(tile)
            if tiles:
                sheet = Image.new("RGB", (self.size * len(tiles), self.size), "white")
                for i, t in enumerate(tiles):
                    sheet.paste(t, (i * self.size, 0))
                with atomic_write(self.out / f"{name}.jpg") as f:
                    sheet.save(f, "JPEG", quality=70, optimize=True)
            return name, cells, len(tiles)

        result = {}
        with ThreadPoolExecutor(max(1, threads)) as ex:
            for name, cells, n in ex.map(one, sorted(self.groups.items())):
                result[name] = cells
                self.written += n
        return result


def _labels_out(names: dict[str, int], name_of, labels, probs, k: int = 3) -> list[list]:
    out = []
    for i, p in list(zip(labels or [], probs or []))[:k]:
        nm = name_of(int(i))
        if nm not in names:
            names[nm] = len(names)
        out.append([names[nm], round(float(p), 4)])
    return out


def write_report(f: Facts, out: Path, plots: list[Path]) -> int:
    """The static HTML report in ``out``; returns the number of thumbnails."""
    cfg, con, d = f.cfg, f.con, f.d
    out.mkdir(parents=True, exist_ok=True)
    thumbs = out / "thumbs"
    if thumbs.is_dir():
        shutil.rmtree(thumbs)
    sprites = _Sprites(thumbs, cfg.thumb_size)
    names: dict[str, int] = {}
    name_of = f.names.name
    refs_needed: set[tuple[str, str]] = set()

    # per-class samples: K per class, a deterministic random draw (md5 of key)
    classes = d["classes"][: cfg.max_classes]
    class_items: dict[int, list[dict]] = defaultdict(list)
    if classes and cfg.per_class:
        con.register("shown_classes", pa.table({"cls": pa.array([c["cls"] for c in classes], pa.int32())}))
        rows = con.execute(f"""SELECT cls, key, split, labels[1:3], label_probs[1:3], tar, tar_key FROM (
                SELECT *, row_number() OVER (PARTITION BY cls ORDER BY md5(key), key) AS r FROM items
                WHERE cls IN (SELECT cls FROM shown_classes)) WHERE r <= {cfg.per_class} ORDER BY cls, r""").fetchall()
        for c, key, split, labels, probs, tar, tkey in rows:
            class_items[int(c)].append({"k": key, "s": split, "p": _labels_out(names, name_of, labels, probs),
                                        "ref": (tar, tkey)})
    cdata = []
    for c in classes:
        items = class_items.get(c["cls"], [])
        sprites.add(f"c{c['cls']}", [it["ref"] for it in items])
        refs_needed.update(it["ref"] for it in items)
        cdata.append({"c": c["cls"], "n": c["name"], "w": c.get("wnid") or "", "t": c["total"],
                      "sp": c.get("splits", {}), "i": items})

    # the least confident samples
    least = []
    if f.has_probs and cfg.least_confident:
        rows = con.execute(f"""SELECT key, split, cls, labels[1:3], label_probs[1:3], tar, tar_key FROM items
            WHERE len(label_probs) > 0 ORDER BY label_probs[1], key LIMIT {cfg.least_confident}""").fetchall()
        for key, split, c, labels, probs, tar, tkey in rows:
            least.append({"k": key, "s": split, "p": _labels_out(names, name_of, labels, probs), "ref": (tar, tkey)})
        for j in range(0, len(least), 16):
            chunk = least[j: j + 16]
            sprites.add(f"least{j // 16}", [it["ref"] for it in chunk])
            refs_needed.update(it["ref"] for it in chunk)

    # near-duplicate clusters removed by select (resolved in the pool)
    clusters: list[dict] = []
    dup_total = None
    sel = f.lin.selection
    if sel is not None and (sel / "duplicates.parquet").is_file():
        dups = pq.read_table(sel / "duplicates.parquet").to_pylist()
        dup_total = len(dups)
        groups: dict[str, list[dict]] = defaultdict(list)
        for r in dups:
            groups[r["kept_key"] or f"reference:{r['removed_key']}"].append(r)
        order = sorted(groups, key=lambda k: (-len(groups[k]), k))[: cfg.max_clusters]
        loc: dict[str, tuple[str, str]] = {}
        if f.has_samples:
            keys = sorted({k for g in order for k in [g] + [r["removed_key"] for r in groups[g]]}
                          | {k.rsplit("-", 1)[0] for g in order for k in [g] + [r["removed_key"] for r in groups[g]]})
            con.register("dup_keys", pa.table({"key": pa.array(keys, pa.string())}))
            shards = f.lin.pool / "shards"
            for key, shard in con.execute("SELECT key, shard FROM samples WHERE key IN (SELECT key FROM dup_keys) "
                                          "AND status = 'success'").fetchall():
                loc[key] = (str(shards / shard), key)

        def ref(k: str | None):
            if not k:
                return ("", "")
            return loc.get(k) or loc.get(k.rsplit("-", 1)[0]) or ("", "")

        for j, g in enumerate(order):
            members = groups[g]
            kept = None if g.startswith("reference:") else g
            refs = ([ref(kept)] if kept else []) + [ref(r["removed_key"]) for r in members[:15]]
            sprites.add(f"dup{j}", refs)
            refs_needed.update(r for r in refs if r[0])
            clusters.append({"kept": kept, "removed": [{"k": r["removed_key"], "d": r["distance"], "r": r["rule"]}
                                                       for r in members[:15]], "more": max(0, len(members) - 15)})

    # failures by status
    failures = []
    if f.has_samples:
        for status, n in d.get("status", {}).items():
            if status == "success":
                continue
            ex = con.execute(f"""SELECT key, coalesce(url, source), error FROM samples WHERE status = '{_q(status)}'
                ORDER BY key LIMIT {cfg.failures_per_status}""").fetchall()
            failures.append({"status": status, "n": n, "ex": [list(r) for r in ex]})

    # thumbnails
    images = _read_images(refs_needed, cfg.threads)
    cells = sprites.write(images, cfg.threads)
    for c in cdata:
        for it, cell in zip(c["i"], cells.get(f"c{c['c']}", [])):
            it["x"] = cell
            del it["ref"]
    for j in range(0, len(least), 16):
        for it, cell in zip(least[j: j + 16], cells.get(f"least{j // 16}", [])):
            it["x"] = cell
            it["g"] = f"least{j // 16}"
            del it["ref"]
    for j, cl in enumerate(clusters):
        cl["x"] = cells.get(f"dup{j}", [])

    # plots, copied in so the folder stands alone
    pdir = out / "plots"
    pdir.mkdir(exist_ok=True)
    plot_rel = []
    for p in plots:
        shutil.copyfile(p, pdir / p.name)
        plot_rel.append({"src": f"plots/{p.name}", "title": PLOT_TITLES.get(p.stem, p.stem)})

    data = {
        "title": d["name"], "kind": d["kind"], "version": __version__, "thumb": cfg.thumb_size,
        "stats": {"samples": d["samples"], "classes": d["num_classes"],
                  "splits": {s["name"]: s["samples"] for s in d["splits"]}, "status": d.get("status", {}),
                  "shown_classes": len(cdata), "per_class": cfg.per_class, "duplicates_removed": dup_total},
        "names": list(names), "classes": cdata, "least": least, "clusters": clusters, "failures": failures,
        "plots": plot_rel, "thresholds": d.get("thresholds") or [],
    }
    from importlib.resources import files

    template = files("silverlabel").joinpath("assets/report.html").read_text()
    blob = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
    page = template.replace("__TITLE__", html.escape(d["name"])).replace("/*__DATA__*/{}", blob)
    with atomic_write(out / "index.html") as fh:
        fh.write(page.encode())
    return sprites.written


# ---------------------------------------------------------------------------------------
# the driver


def run_card(cfg: CardConfig) -> CardSummary:
    """Write the card (and plots, and with ``cfg.html`` the report) of ``cfg.dataset``."""
    import tempfile

    import duckdb

    t0 = time.monotonic()
    lin = resolve_lineage(cfg.dataset)
    readme = Path(cfg.output) if cfg.output else lin.root / README
    if readme.is_dir():
        readme = readme / README
    with tempfile.TemporaryDirectory(prefix="silverlabel-card-") as tmp:
        con = duckdb.connect()
        con.execute(f"SET temp_directory='{_q(tmp)}'")
        con.execute(f"SET threads={max(1, cfg.threads)}")
        facts = Facts(lin, cfg, con, Path(tmp))
        d = facts.compute()
        card_dir = readme.parent / CARD_DIR
        plots = write_plots(d, card_dir) if cfg.plots else []
        text = render_card(facts, plots, readme)
        with atomic_write(readme) as f:
            f.write(text.encode())
        write_json_atomic(card_dir / "card.json", {k: v for k, v in d.items() if k != "sizes"})
        report = None
        n_thumbs = 0
        if cfg.html:
            n_thumbs = write_report(facts, Path(cfg.html), plots)
            report = str(Path(cfg.html) / "index.html")
        con.close()
    return CardSummary(str(readme), lin.kind, d["samples"], d["num_classes"],
                       {s["name"]: s["samples"] for s in d["splits"]}, [str(p) for p in plots], report, n_thumbs,
                       time.monotonic() - t0, d["notes"])
