"""The dataset card (``README.md``) in the Hugging Face dataset-card form, from the facts.

YAML front matter, then the usual sections (description, structure, creation, considerations,
additional information). Every number comes from ``Facts.compute()``; nothing is queried here
except the samples table's schema for the field list. Sections a machine cannot know are marked
``[More Information Needed]``.

    >>> size_category(184), size_category(12_811), size_category(1_281_167)
    ('n<1K', '10K<n<100K', '1M<n<10M')
    >>> print(_table(["a", "n"], [["x|y", 3]], "lr"))
    | a | n |
    | --- | ---: |
    | x\\|y | 3 |
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from silverlabel import __version__
from silverlabel.stages.card.facts import Facts
from silverlabel.stages.card.plots import PLOT_TITLES

_MORE = "[More Information Needed]"


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


def _multi_label(d: dict[str, Any]) -> bool:
    """Whether the samples carry a top-k list (k > 1) to train a multi-label model on."""
    return bool(d.get("topk") and d["topk"] > 1)


def card_yaml(f: Facts) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The YAML Hugging Face reads, in the three parts :func:`~silverlabel.stages.card.hub.merge_yaml`
    merges: derived from the facts (always rewritten; ``configs``/``dataset_info`` are added by
    the caller), from flags (None: the flag was not given, the card's value stays) and defaults
    (written only where the card has no value)."""
    d = f.d
    task_ids = ["multi-class-image-classification"] + (["multi-label-image-classification"] if _multi_label(d) else [])
    derived = {"size_categories": [size_category(d["samples"])], "task_ids": task_ids,
               "tags": ["silverlabel", "webdataset" if f.lin.kind == "trainset" else "parquet", "machine-labeled"]}
    flags = {"license": f.cfg.license, "pretty_name": f.cfg.pretty_name,
             "task_categories": list(f.cfg.task_categories) if f.cfg.task_categories else None}
    defaults = {"pretty_name": d["name"], "license": "other", "task_categories": ["image-classification"],
                "annotations_creators": ["machine-generated"], "language_creators": ["found"], "language": ["en"],
                "multilinguality": ["monolingual"], "source_datasets": ["original"]}
    return derived, flags, defaults


def _description(f: Facts) -> list[str]:
    """Dataset Description: the summary in one paragraph, the supported tasks."""
    d, lin = f.d, f.lin
    n, ncls = d["samples"], d["num_classes"]
    teacher = d.get("teacher")
    multi = _multi_label(d)
    kind_word = {"pool": "an ingested image pool", "selection": "a selection", "trainset": "a training set"}[lin.kind]
    out = [f"# Dataset Card for {d['name']}\n", "## Dataset Description\n", "### Dataset Summary\n"]
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
    return out


def _structure(f: Facts) -> list[str]:
    """Dataset Structure: a real instance, the fields, the splits, the largest classes."""
    d, lin = f.d, f.lin
    ncls = d["num_classes"]
    out = ["## Dataset Structure\n", "### Data Instances\n"]
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
    return out


def _source_data(f: Facts) -> list[str]:
    """Dataset Creation, first part: where the images came from and what became of them."""
    d = f.d
    sel, ing = d.get("select"), d.get("ingest")
    out = ["### Source Data\n"]
    if ing:
        for p in ing["parents"]:
            extra = ", ".join(f"{k}: {v if isinstance(v, str) else json.dumps(v)}" for k, v in p.items()
                              if k not in ("kind", "path", "name") and v not in (None, [], {}))
            out.append(f"- {p.get('kind')} `{p.get('name') or p.get('path')}`" + (f" ({extra})" if extra else ""))
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
        out.append(f"Selected from the bare {what} `{par.get('name') or par.get('path')}`: no images were fetched "
                   "yet "
                   "(`silverlabel ingest` on this selection fetches them).\n")
    else:
        out.append("The ingested pool this dataset came from is not available; no source statistics.\n")
    if d.get("sizes"):
        s = d["sizes"]
        out.append(f"Stored images: shorter side {s['min_short_side']:,} px at least, median "
                   f"{s['median_short_side']:,} px; longer side at most {s['max_long_side']:,} px.\n")
    return out


def _filters(f: Facts) -> list[str]:
    """The parameters of every stage and what each select rule removed."""
    d = f.d
    sel, ing = d.get("select"), d.get("ingest")
    out = ["### Filters and their parameters\n"]
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
    return out


def _annotations(f: Facts) -> list[str]:
    """Who labeled the images and how; COYO's threshold table."""
    d, lin = f.d, f.lin
    teacher = d.get("teacher")
    out = ["### Annotations\n"]
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
    return out


def _provenance(f: Facts) -> list[str]:
    """Seeds, the lineage table and the notes about missing parents."""
    d = f.d
    out = ["### Seeds and reproducibility\n"]
    seeds = ", ".join(f"{k} seed {v}" for k, v in d["seeds"].items()) or "no random draws recorded"
    out.append(f"{seeds}. Random draws are functions of (seed, key), so the same inputs and settings give the same "
               "dataset (and byte-identical shards).\n")
    out.append("### Lineage\n")
    out.append(_table(["stage", "directory", "silverlabel", "updated"],
                      [[x["stage"], f"`{x['path']}`", x.get("silverlabel_version") or "", x.get("updated") or ""]
                       for x in d["lineage"]]) + "\n")
    for note in d.get("notes", []):
        out.append(f"> Note: {note}\n")
    return out


def _statistics(plots: list[Path], readme: Path) -> list[str]:
    """The plots, linked relative to the README."""
    out: list[str] = []
    if plots:
        out.append("## Dataset Statistics\n")
        for p in plots:
            rel = os.path.relpath(p, readme.parent).replace(os.sep, "/")
            title = PLOT_TITLES.get(p.stem, p.stem)
            out.append(f"**{title}**\n\n![{title}]({rel})\n")
    return out


def _biases(f: Facts) -> list[str]:
    """What the facts say about biases (the user's own discussion goes above it)."""
    d = f.d
    bias = ("The labels are a model's predictions, not human annotations: they inherit the teacher's "
            "errors and biases and the skew of the source pool.")
    if d.get("thresholds"):
        t3 = next((r for r in d["thresholds"] if r["threshold"] == 0.3), None)
        if t3:
            bias += (f" At threshold 0.3, {100 * t3['share_with_label']:.1f}% of the images have a label and "
                     f"{t3['distinct_labels']:,} classes occur.")
    return [bias + "\n"]


def _user(*lines: str) -> str:
    return "\n".join(lines) + "\n"


def card_blocks(f: Facts, plots: list[Path], readme: Path, license: str) -> list[tuple[str | None, str]]:
    """The card's text in order: ``(name, text)`` for the blocks silverlabel writes (between
    markers, rewritten by every run) and ``(None, text)`` for the sections the curator fills in
    (written once, then left alone)."""
    def gen(*sections: list[str]) -> str:
        return "\n".join(line for section in sections for line in section) + "\n"

    return [
        ("description", gen(_description(f))),
        ("structure", gen(_structure(f))),
        (None, _user("## Dataset Creation\n", "### Curation Rationale\n",
                     f"{_MORE} (why this dataset was made; silverlabel recorded how, below.)\n")),
        ("creation", gen(_source_data(f), _filters(f), _annotations(f), _provenance(f))),
        ("statistics", gen(_statistics(plots, readme))),
        (None, _user("## Considerations for Using the Data\n", "### Social Impact of Dataset\n", f"{_MORE}\n",
                     "### Discussion of Biases\n", f"{_MORE}\n")),
        ("biases", gen(_biases(f))),
        (None, _user("### Other Known Limitations\n",
                     f"{_MORE} Web images may be removed by their owners over time; near-duplicates are removed only "
                     "where the lineage above lists a de-duplication rule.\n", "## Additional Information\n",
                     "### Dataset Curators\n", f"{_MORE}\n", "### Licensing Information\n",
                     f"{_MORE} The images remain the property of their owners; state here the terms under which "
                     "they may be used.\n")),
        ("license", f"The license field above (`{license}`) covers the metadata and labels.\n"),
        (None, _user("### Citation Information\n", f"{_MORE}\n")),
        ("footer", f"---\n\n*Card written by `silverlabel card` ({__version__}) from the dataset's manifests and "
                   "tables. Text between `silverlabel:begin`/`end` markers is rewritten by every run; fill in the "
                   "other sections, they are kept.*\n"),
    ]


def render_card(f: Facts, plots: list[Path], readme: Path, old: str | None = None,
                hub: dict[str, Any] | None = None) -> str:
    """The text of ``README.md`` from ``f``'s computed facts, merged into ``old`` (the card
    already there, if any): its YAML keys silverlabel does not own and its text outside the
    generated blocks are kept. ``hub``: the ``configs`` and ``dataset_info`` to write. Without
    ``--name``, a ``pretty_name`` the card already has names the dataset (``f.d["name"]``, so
    the title and ``card.json`` agree with the YAML)."""
    from silverlabel.stages.card.hub import compose_card, merge_body, merge_yaml, split_card

    old_yaml, old_body = split_card(old, readme) if old is not None else ({}, None)
    if f.cfg.pretty_name is None and isinstance(old_yaml.get("pretty_name"), str) and old_yaml["pretty_name"]:
        f.d["name"] = old_yaml["pretty_name"]
    derived, flags, defaults = card_yaml(f)
    data = merge_yaml(old_yaml, {**derived, **(hub or {})}, flags, defaults)
    return compose_card(data, merge_body(old_body, card_blocks(f, plots, readme, str(data["license"]))))
