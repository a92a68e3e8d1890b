"""The static HTML report: one self-contained folder (no server, no network).

``HTML_DIR/index.html`` is ``assets/report.html`` with the report's data inlined as JSON;
``HTML_DIR/thumbs/*.jpg`` are sprites, one horizontal strip of small thumbnails per class (a
deterministic draw: md5 of the key), per 16 least-confident samples and per near-duplicate
cluster; ``HTML_DIR/plots/*.png`` are copies of the card's plots. Only the thumbnails shown are
decoded, each tar read once.

    >>> write_report(facts, Path("report"), plots)  # doctest: +SKIP
    352
"""

from __future__ import annotations

import html
import io
import json
import os
import shutil
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from silverlabel import __version__
from silverlabel.dataset import atomic_write, is_file, open_read
from silverlabel.stages.card.facts import Facts
from silverlabel.stages.card.plots import PLOT_TITLES

Ref = tuple[str, str]  # (tar path, key in the tar); ("", "") when the image is nowhere
_LEAST_PER_SPRITE = 16
_MEMBERS_SHOWN = 15  # removed duplicates shown per cluster


def _thumb(data: bytes, size: int) -> Any:
    from PIL import Image, ImageOps

    im = Image.open(io.BytesIO(data))
    im.draft("RGB", (size * 2, size * 2))
    im = ImageOps.exif_transpose(im).convert("RGB")
    return ImageOps.fit(im, (size, size), Image.BILINEAR)


def _read_images(wanted: set[Ref], threads: int) -> dict[Ref, bytes]:
    """Image bytes of (tar, key) pairs, each tar indexed and read once."""
    from silverlabel.formats.wds import iter_tar_samples, read_member

    by_tar: dict[str, set[str]] = defaultdict(set)
    for tar, key in wanted:
        if tar and key:
            by_tar[tar].add(key)

    def one(tar: str) -> dict[Ref, bytes]:
        got = {}
        if not is_file(tar):  # a staging path (a dataset at a URL): the store's object
            return got
        keys = by_tar[tar]
        with open_read(tar) as f:
            for s in iter_tar_samples(f):
                if s.key in keys:
                    ext = s.image_ext()
                    if ext:
                        got[(tar, s.key)] = read_member(f, *s.members[ext])
        return got

    out: dict[Ref, bytes] = {}
    with ThreadPoolExecutor(max(1, threads)) as ex:
        for got in ex.map(one, sorted(by_tar)):
            out.update(got)
    return out


class _Sprites:
    """Groups of thumbnails written as one horizontal JPEG strip each."""

    def __init__(self, out: Path, size: int):
        self.out = out
        self.size = size
        self.groups: dict[str, list[Ref]] = {}
        self.written = 0

    def add(self, name: str, refs: list[Ref]) -> None:
        self.groups[name] = refs

    def write(self, threads: int) -> dict[str, list[int]]:
        """Read the images and write the sprites; returns, per group, the cell of each ref (-1: no image)."""
        from PIL import Image

        images = _read_images({r for refs in self.groups.values() for r in refs}, threads)
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


class _LabelNames:
    """Label names of the report, each stored once (``names``) and referred to by index."""

    def __init__(self, name_of):
        self.name_of = name_of
        self.index: dict[str, int] = {}

    def top(self, labels, probs, k: int = 3) -> list[list]:
        """[[name index, probability], ...] of the first ``k`` labels."""
        out = []
        for i, p in list(zip(labels or [], probs or []))[:k]:
            nm = self.name_of(int(i))
            if nm not in self.index:
                self.index[nm] = len(self.index)
            out.append([self.index[nm], round(float(p), 4)])
        return out


def _item(names: _LabelNames, key: str, split: str, labels, probs, tar: str | None, tar_key: str | None) -> dict:
    return {"k": key, "s": split, "p": names.top(labels, probs), "ref": (tar, tar_key)}


def _class_grids(f: Facts, names: _LabelNames, sprites: _Sprites) -> list[dict]:
    """The largest classes, each with up to ``per_class`` samples (a deterministic draw: md5 of key)."""
    cfg = f.cfg
    classes = f.d["classes"][: cfg.max_classes]
    class_items: dict[int, list[dict]] = defaultdict(list)
    if classes and cfg.per_class:
        f.con.register("shown_classes", pa.table({"cls": pa.array([c["cls"] for c in classes], pa.int32())}))
        rows = f.rows("""SELECT cls, key, split, labels[1:3], label_probs[1:3], tar, tar_key FROM (
                SELECT *, row_number() OVER (PARTITION BY cls ORDER BY md5(key), key) AS r FROM items
                WHERE cls IN (SELECT cls FROM shown_classes)) WHERE r <= ? ORDER BY cls, r""", [cfg.per_class])
        for c, *row in rows:
            class_items[int(c)].append(_item(names, *row))
    cdata = []
    for c in classes:
        items = class_items.get(c["cls"], [])
        sprites.add(f"c{c['cls']}", [it["ref"] for it in items])
        cdata.append({"c": c["cls"], "n": c["name"], "w": c.get("wnid") or "", "t": c["total"],
                      "sp": c.get("splits", {}), "i": items})
    return cdata


def _least_confident(f: Facts, names: _LabelNames, sprites: _Sprites) -> list[list[dict]]:
    """The samples with the lowest top-1 probability, in sprites of 16."""
    if not (f.has_probs and f.cfg.least_confident):
        return []
    rows = f.rows("""SELECT key, split, labels[1:3], label_probs[1:3], tar, tar_key FROM items
        WHERE len(label_probs) > 0 ORDER BY label_probs[1], key LIMIT ?""", [f.cfg.least_confident])
    least = [_item(names, *row) for row in rows]
    chunks = [least[j: j + _LEAST_PER_SPRITE] for j in range(0, len(least), _LEAST_PER_SPRITE)]
    for j, chunk in enumerate(chunks):
        sprites.add(f"least{j}", [it["ref"] for it in chunk])
    return chunks


def _clusters(f: Facts, sprites: _Sprites) -> tuple[list[dict], int | None]:
    """Near-duplicate clusters removed by select (resolved in the pool), largest first; and the rows in all."""
    sel = f.lin.selection
    if sel is None or not (sel / "duplicates.parquet").is_file():
        return [], None
    dups = pq.read_table(sel / "duplicates.parquet").to_pylist()
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in dups:
        groups[r["kept_key"] or f"reference:{r['removed_key']}"].append(r)
    order = sorted(groups, key=lambda k: (-len(groups[k]), k))[: f.cfg.max_clusters]
    loc: dict[str, Ref] = {}
    if f.has_samples:
        shown = {k for g in order for k in [g] + [r["removed_key"] for r in groups[g]]}
        keys = sorted(shown | {k.rsplit("-", 1)[0] for k in shown})
        f.con.register("dup_keys", pa.table({"key": pa.array(keys, pa.string())}))
        shards = f.lin.pool / "shards"
        for key, shard in f.rows("SELECT key, shard FROM samples WHERE key IN (SELECT key FROM dup_keys) "
                                 "AND status = 'success'"):
            loc[key] = (str(shards / shard), key)

    def ref(k: str | None) -> Ref:
        if not k:
            return ("", "")
        return loc.get(k) or loc.get(k.rsplit("-", 1)[0]) or ("", "")

    clusters = []
    for j, g in enumerate(order):
        members = groups[g][:_MEMBERS_SHOWN]
        kept = None if g.startswith("reference:") else g
        sprites.add(f"dup{j}", ([ref(kept)] if kept else []) + [ref(m["removed_key"]) for m in members])
        clusters.append({"kept": kept, "removed": [{"k": m["removed_key"], "d": m["distance"], "r": m["rule"]}
                                                   for m in members],
                         "more": max(0, len(groups[g]) - _MEMBERS_SHOWN)})
    return clusters, len(dups)


def _failures(f: Facts) -> list[dict]:
    """A few examples of each ingest status other than success."""
    if not f.has_samples:
        return []
    return [{"status": status, "n": n,
             "ex": [list(r) for r in f.rows("SELECT key, coalesce(url, source), error FROM samples WHERE status = ? "
                                            "ORDER BY key LIMIT ?", [status, f.cfg.failures_per_status])]}
            for status, n in f.d.get("status", {}).items() if status != "success"]


def write_report(f: Facts, out: Path, plots: list[Path]) -> int:
    """The static HTML report in ``out``; returns the number of thumbnails."""
    cfg, d = f.cfg, f.d
    out.mkdir(parents=True, exist_ok=True)
    thumbs = out / "thumbs"
    if thumbs.is_dir():
        shutil.rmtree(thumbs)
    sprites = _Sprites(thumbs, cfg.thumb_size)
    names = _LabelNames(f.names.name)
    cdata = _class_grids(f, names, sprites)
    least = _least_confident(f, names, sprites)
    clusters, dup_total = _clusters(f, sprites)
    failures = _failures(f)

    cells = sprites.write(cfg.threads)
    for c in cdata:
        for it, cell in zip(c["i"], cells.get(f"c{c['c']}", [])):
            it["x"] = cell
            del it["ref"]
    for j, chunk in enumerate(least):
        for it, cell in zip(chunk, cells.get(f"least{j}", [])):
            it["x"] = cell
            it["g"] = f"least{j}"
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
        "names": list(names.index), "classes": cdata, "least": [it for chunk in least for it in chunk],
        "clusters": clusters, "failures": failures, "plots": plot_rel, "thresholds": d.get("thresholds") or [],
    }
    from importlib.resources import files

    template = files("silverlabel").joinpath("assets/report.html").read_text()
    blob = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
    page = template.replace("__TITLE__", html.escape(d["name"])).replace("/*__DATA__*/{}", blob)
    with atomic_write(out / "index.html") as fh:
        fh.write(page.encode())
    return sprites.written
