"""The numbers of a card: DuckDB views over a dataset's tables, and ``Facts`` computed from them.

Every aggregate is a DuckDB query over the parquet tables, so the card of a 300M-row pool never
holds 300M rows in memory. ``Facts.compute()`` returns one dict (``card.json`` is that dict without
the raw size histogram); the markdown, the plots and the report only read it.

The views every query runs on:

* ``samples``: the pool's samples table (when the pool is there);
* ``labels``: the pool's ``labels/NAME`` table (when labeled);
* ``items``: one row per sample of *this* dataset: key, split, cls, class_name, labels,
  label_probs, width, height, and where its image is (``tar``, ``tar_key``).

    >>> brace_pattern(["demo-train-0000.tar", "demo-train-0001.tar", "demo-train-0002.tar"])
    'demo-train-{0000..0002}.tar'
"""

from __future__ import annotations

import io
import json
import os
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from silverlabel import __version__
from silverlabel.dataset import Selection, dataset_identity, list_files, open_read
from silverlabel.errors import UserError
from silverlabel.formats.tables import check_parquet
from silverlabel.sql import literal, read_parquet
from silverlabel.stages.card.lineage import Lineage

if TYPE_CHECKING:
    from silverlabel.stages.card import CardConfig

COYO_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5)
CURVE_THRESHOLDS = tuple(round(k / 20, 2) for k in range(1, 20))  # 0.05 .. 0.95, includes COYO's
_NAMED_SPACES = ("in1k", "in12k", "in21k")


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


class _Names:
    """Class index -> human name for the labels' index space."""

    def __init__(self, space: str | None, classes_doc: dict[str, Any] | None):
        self.space = None
        self.by_index: dict[int, tuple[str | None, str]] = {}
        if space in _NAMED_SPACES:
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
            with open_read(tar) as f:  # a training set at a URL: read from the store
                for sample in iter_tar_samples(f):
                    meta = json.loads(read_member(f, *sample.members["json"])) if "json" in sample.members else {}
                    rows["key"].append(sample.key)
                    rows["split"].append(split)
                    label = meta.get("label")
                    rows["cls"].append(None if label is None or label < 0 else int(label))
                    for col in ("class_name", "labels", "label_probs", "width", "height"):
                        rows[col].append(meta.get(col))
                    rows["tar"].append(str(tar))
                    rows["tar_key"].append(sample.key)
    schema = pa.schema([("key", pa.string()), ("split", pa.string()), ("cls", pa.int32()), ("class_name", pa.string()),
                        ("labels", pa.list_(pa.int32())), ("label_probs", pa.list_(pa.float32())),
                        ("width", pa.int32()), ("height", pa.int32()), ("tar", pa.string()), ("tar_key", pa.string())])
    path = tmp / "trainset_rows.parquet"
    pq.write_table(pa.table({n: rows[n] for n in schema.names}, schema=schema), path)
    return path


class Facts:
    """Everything the card says, computed once (DuckDB over the tables).

    ``con`` is a DuckDB connection the views are created in; ``tmp`` a scratch folder.

        >>> facts = Facts(resolve_lineage("data/trainset"), CardConfig("data/trainset"),
        ...               duckdb.connect(), Path(tmp))  # doctest: +SKIP
        >>> facts.compute()["num_classes"]  # doctest: +SKIP
        4
    """

    def __init__(self, lin: Lineage, cfg: CardConfig, con: Any, tmp: Path):
        self.lin = lin
        self.cfg = cfg
        self.con = con
        self.tmp = tmp
        self.d: dict[str, Any] = {"silverlabel_version": __version__, "kind": lin.kind,
                                  "id": dataset_identity(lin.root)}  # no path of this machine
        self._setup_views()

    # -- views -------------------------------------------------------------------------
    def _setup_views(self) -> None:
        lin, con = self.lin, self.con
        self.has_samples = self.has_labels = False
        if lin.pool is not None:
            samples = lin.pool / "samples"
            for f in [*sorted(samples.glob("*.parquet")),
                      *(sorted(lin.labels_dir.glob("*.parquet")) if lin.labels_dir is not None else [])]:
                check_parquet(f)  # a truncated table: one line naming it, not DuckDB's traceback
            if any(samples.glob("*.parquet")):
                tables = read_parquet(samples / "*.parquet", union_by_name=True)
                con.execute(f"CREATE VIEW samples AS SELECT * FROM {tables}")
                self.has_samples = True
            if lin.labels_dir is not None and any(lin.labels_dir.glob("*.parquet")):
                con.execute(f"CREATE VIEW labels AS SELECT * FROM {read_parquet(lin.labels_dir / '*.parquet')}")
                self.has_labels = True
        self.classes_doc = None
        if lin.kind == "pool":
            if not self.has_samples:
                raise UserError(f"{lin.root}: has no samples table yet (ingest not finished?)")
            shards = literal(f"{lin.pool / 'shards'}/")
            if self.has_labels:
                cls, lists, join = "l.labels[1]", "l.labels, l.label_probs", "JOIN labels l USING (key)"
            else:
                cls, lists, join = "NULL::INTEGER", "NULL::INTEGER[] AS labels, NULL::FLOAT[] AS label_probs", ""
            con.execute(f"""CREATE VIEW items AS SELECT s.key, 'all' AS split, {cls} AS cls,
                NULL::VARCHAR AS class_name, {lists}, s.width, s.height, {shards} || s.shard AS tar, s.key AS tar_key
                FROM samples s {join} WHERE s.status = 'success'""")
        else:
            if lin.selection is not None:
                for f in sorted((lin.selection / "selection").glob("*.parquet")):
                    check_parquet(f)
                sel = read_parquet(lin.selection / "selection" / "*.parquet")
                # source_dataset is the pool's id; its shards are where the lineage found the pool
                shards = literal(f"{lin.pool / 'shards'}/") if lin.pool is not None else "NULL::VARCHAR"
                con.execute(f"""CREATE VIEW items AS SELECT key, split, cls, class_name, labels, label_probs,
                    width, height, CASE WHEN source_dataset IS NULL THEN NULL
                                        ELSE {shards} || source_shard END AS tar,
                    source_key AS tar_key FROM {sel}""")
                self.classes_doc = _read_json(lin.selection / "classes.json")
            if lin.kind == "trainset":
                self.info = _read_json(lin.root / "_info.json")
                if self.info is None:
                    raise UserError(f"{lin.root}/_info.json: unreadable")
                if lin.selection is None:
                    path = _trainset_rows(lin.root, self.info, self.tmp)
                    con.execute(f"CREATE VIEW items AS SELECT * FROM {read_parquet(path)}")
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
        if space in _NAMED_SPACES:
            return space
        parent = ((lin.selection_manifest or {}).get("parents") or [{}])[0]
        return "in21k" if parent.get("kind") == "labels_table" else None

    def scalar(self, sql: str, params: list | None = None) -> Any:
        """The one value of a query; values go in as bound ``params``, never into ``sql``."""
        return self.rows(sql, params)[0][0]

    def rows(self, sql: str, params: list | None = None) -> list[tuple]:
        """All rows of a query; values go in as bound ``params``, never into ``sql``."""
        return self.con.execute(sql, params).fetchall()

    # -- computing ---------------------------------------------------------------------
    def compute(self) -> dict[str, Any]:
        """Every number the card states (``card.json``), in a fixed key order."""
        d, lin = self.d, self.lin
        d["lineage"] = [{"stage": s, "path": _relative(p, lin.root), "id": m.get("id"),
                         "silverlabel_version": m.get("silverlabel_version"), "updated": m.get("updated")}
                        for s, p, m in lin.chain()]
        d["notes"] = list(lin.notes)
        d["name"] = self.cfg.pretty_name or self._default_name()
        d["splits"] = self._splits()
        d["samples"] = sum(s["samples"] for s in d["splits"])
        d["classes"], d["class_rule"] = self._classes()
        d["num_classes"] = len(d["classes"])
        d["label_space"] = self.label_space
        d["class_space"] = (self.classes_doc or {}).get("label_space") if lin.kind != "pool" else self.label_space
        if self.has_samples:  # statuses (ingest)
            d["status"] = {s: int(n) for s, n in self.rows("SELECT status, count(*) AS n FROM samples GROUP BY 1 "
                                                             "ORDER BY n DESC, 1")}
            d["inputs"] = sum(d["status"].values())
        if self.has_probs:
            d.update(self._probabilities())
        sizes = self._sizes()
        if sizes:
            d["sizes"] = sizes
        # creation facts
        d["ingest"] = self._ingest()
        d["teacher"] = self._teacher()
        d["select"] = self._select()
        d["shard"] = self._shard()
        d["seeds"] = {k: v for k, v in (("select", (d["select"] or {}).get("config", {}).get("seed")),
                                         ("shard", (d["shard"] or {}).get("config", {}).get("seed"))) if v is not None}
        d["instance"] = self._instance()
        return d

    def _splits(self) -> list[dict[str, Any]]:
        """Each split's sample count (and, for a training set, its shards)."""
        lin = self.lin
        if lin.kind == "trainset":
            return [{"name": s, "samples": int(v["num_samples"]), "shards": len(v["filenames"]),
                     "pattern": brace_pattern(list(v["filenames"])),
                     "min_shard": min(v["shard_lengths"], default=0), "max_shard": max(v["shard_lengths"], default=0)}
                    for s, v in self.info["splits"].items()]
        if lin.kind == "selection":
            return [{"name": s, "samples": int(n), "shards": None, "pattern": None}
                    for s, n in self.rows("SELECT split, count(*) FROM items GROUP BY 1 ORDER BY 1")]
        shards = sorted(p.name for p in list_files(lin.pool / "shards", ".tar"))  # a URL's: the store's listing
        return [{"name": "all", "samples": int(self.scalar("SELECT count(*) FROM items")),
                 "shards": len(shards), "pattern": "shards/" + brace_pattern(shards)}]

    def _classes(self) -> tuple[list[dict[str, Any]], str | None]:
        """The classes, largest first, and the rule that gave each sample its class."""
        lin = self.lin
        if lin.kind == "pool":
            counts = self.rows("SELECT cls, count(*) AS n FROM items WHERE cls IS NOT NULL "
                               "GROUP BY 1 ORDER BY n DESC, cls")
            classes = [{"cls": int(c), "name": self.names.name(int(c)), "wnid": self.names.wnid(int(c)),
                        "total": int(n)} for c, n in counts]
            return classes, "teacher top-1" if self.has_labels else None
        per: dict[int, dict[str, int]] = defaultdict(dict)
        row_names: dict[int, str] = {}
        for c, s, n, nm in self.rows("SELECT cls, split, count(*), any_value(class_name) FROM items "
                                     "WHERE cls IS NOT NULL AND cls >= 0 GROUP BY 1, 2"):
            per[int(c)][s] = int(n)
            row_names[int(c)] = nm
        doc = {int(c["cls"]): c for c in (self.classes_doc or {}).get("classes", [])}
        if not per and doc:  # no per-sample rows: the class map's counts
            per = {c: {k: int(v[k]) for k in ("train", "validation") if v.get(k)} for c, v in doc.items()}
        classes = sorted(
            [{"cls": c, "name": (doc.get(c) or {}).get("name") or row_names.get(c) or str(c),
              "wnid": (doc.get(c) or {}).get("wnid"),
              "splits": per[c], "total": sum(per[c].values())} for c in per],
            key=lambda r: (-r["total"], r["cls"]))
        rep = _read_json(lin.selection / "report.json") if lin.selection else None
        return classes, (rep or {}).get("label_rule")

    def _probabilities(self) -> dict[str, Any]:
        """The top-1 probability histogram and COYO's threshold table."""
        d: dict[str, Any] = {}
        hist = dict(self.rows("SELECT least(floor(label_probs[1] * 50)::INTEGER, 49), count(*) FROM items "
                              "WHERE len(label_probs) > 0 GROUP BY 1"))
        d["top1_hist"] = {"edges": [i / 50 for i in range(51)], "counts": [int(hist.get(i, 0)) for i in range(50)]}
        d["top1_mean"] = float(self.scalar("SELECT avg(label_probs[1]) FROM items WHERE len(label_probs) > 0"))
        d["topk"] = int(self.scalar("SELECT max(len(labels)) FROM items"))
        d["curve"] = self._threshold_stats()
        d["thresholds"] = [r for r in d["curve"] if r["threshold"] in COYO_THRESHOLDS]
        return d

    def _sizes(self) -> dict[str, Any] | None:
        """Stored width x height counts and the short / long side summary."""
        wh = self.rows("SELECT width, height, count(*) FROM items WHERE width IS NOT NULL AND height IS NOT NULL "
                       "GROUP BY 1, 2")
        if not wh:
            return None
        w, h, n = (np.array(x, dtype=np.int64) for x in zip(*wh))
        short = np.minimum(w, h)
        order = np.argsort(short, kind="stable")
        cum = np.cumsum(n[order])
        median = int(short[order][np.searchsorted(cum, (cum[-1] + 1) // 2)])
        return {"w": w.tolist(), "h": h.tolist(), "n": n.tolist(), "min_short_side": int(short.min()),
                "median_short_side": median, "max_long_side": int(np.maximum(w, h).max())}

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
            files = sorted(self.lin.labels_dir.glob("*.parquet"))
            # pool labels rows are exactly the labeled successes (items joins them 1:1)
            return threshold_stats(files, CURVE_THRESHOLDS, num_classes=n)
        path = self.tmp / "labels.parquet"
        self.con.execute("COPY (SELECT labels, label_probs FROM items WHERE len(label_probs) > 0) "
                         f"TO {literal(path)} (FORMAT parquet)")
        return threshold_stats([path], CURVE_THRESHOLDS, num_classes=n)

    def _ingest(self) -> dict[str, Any] | None:
        m = self.lin.pool_manifest
        if m is None:
            return None
        return {"path": _relative(self.lin.pool, self.lin.root), "id": m.get("id"), "parents": m.get("parents", []),
                "config": m.get("config", {}),
                "counts": m.get("counts", {}), "shards": m.get("shards"), "version": m.get("silverlabel_version")}

    def _teacher(self) -> dict[str, Any] | None:
        m, name = self.lin.pool_manifest, self.lin.labels_name
        if m is None or not name:
            return None
        rec = m["labels"][name]
        space = rec["config"].get("label_space")
        size = None
        if space in _NAMED_SPACES:
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
        return {"path": _relative(sel, self.lin.root), "id": m.get("id"), "config": m.get("config", {}),
                "parents": m.get("parents", []),
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
            with open_read(tar) as f:  # a training set at a URL: its first sample by range
                sample = next(iter_tar_samples(f), None)
                if sample is None:
                    return None
                out: dict[str, Any] = {"__key__": sample.key, "__url__": split["filenames"][0]}
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
            first = Selection(lin.selection).files()[0]  # one row, not the whole part file
            batch = next(pq.ParquetFile(first).iter_batches(batch_size=1), None)
            rows = batch.to_pylist() if batch is not None else []
            return _jsonable(rows[0]) if rows else None
        rows = self.con.sql("SELECT * FROM samples WHERE status = 'success' ORDER BY key LIMIT 1").to_arrow_table()
        if rows.num_rows == 0:
            return None
        row = rows.to_pylist()[0]
        if self.has_labels:
            lab = self.rows("SELECT labels, label_probs FROM labels WHERE key = ?", [row["key"]])
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


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to the dataset the card describes (``../pool``, ``.``): the card
    names no folder of the machine it was made on."""
    return Path(os.path.relpath(path, root)).as_posix()
