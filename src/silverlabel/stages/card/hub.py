"""What the Hugging Face Hub reads from a card, and how a rerun keeps what the user wrote.

``datasets.load_dataset(folder)`` (what the Hub does with a pushed folder) reads the card's
YAML: ``configs`` say which files are data (``data_files`` per split), ``dataset_info`` says
their features. Without them a training set fails (its wids index ``*.wids.json`` is taken as
data) and a pool fails (samples and labels parquet have different columns). This module
writes both:

* a training set: one ``default`` config, each split's tar shards (never ``*.wids.json``,
  ``_info.json`` or ``classes.json``), and the features ``datasets``' webdataset builder
  yields for our members (``jpg`` image, ``cls`` a ``ClassLabel`` of the class names,
  ``json`` a struct, ``txt`` a string, other members bytes, then ``__key__`` and ``__url__``);
* a pool: a ``samples`` config (the default) on ``samples/*.parquet`` and one config
  ``labels-NAME`` per labels set on ``labels/NAME/*.parquet``;
* a selection: a ``default`` config on ``selection/*.parquet`` (one ``train`` split; the
  rows carry their own ``split`` column).

The README's generated parts sit between ``<!-- silverlabel:begin NAME -->`` and
``<!-- silverlabel:end NAME -->``; :func:`merge_card` replaces those and keeps every other
line, and merges the YAML so that only the keys silverlabel owns are rewritten.

    >>> shard_glob(["t-train-0000.tar", "t-train-0001.tar"], ["t-train-0000.tar", "t-train-0001.tar",
    ...                                                     "t-validation-0000.tar"])
    't-train-*.tar'
    >>> feature_yaml(pa.struct([("labels", pa.list_(pa.int64())), ("p", pa.float64())]))
    {'struct': [{'name': 'labels', 'list': 'int64'}, {'name': 'p', 'dtype': 'float64'}]}
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa

from silverlabel.dataset import list_files, open_read
from silverlabel.errors import UserError

BEGIN = "<!-- silverlabel:begin {} -->"
END = "<!-- silverlabel:end {} -->"
_BLOCK = re.compile(r"<!-- silverlabel:begin ([\w-]+) -->\n?(.*?)<!-- silverlabel:end \1 -->", re.S)
_OLD_FOOTER = "Card written by `silverlabel card`"

#: member extensions ``datasets``' webdataset builder decodes, and to what (its DECODERS table)
_TEXT_EXTS = {"txt", "text", "transcript"}
_INT_EXTS = {"cls", "cls2", "index", "inx", "id"}
_JSON_EXTS = {"json", "jsn"}
#: decoded by the builder into types this module does not describe (tensors, msgpack, ...)
_OPAQUE_EXTS = {"ten", "tb", "mp", "msg", "npy", "npz", "cbor", "pth"}
#: image extensions the builder turns into ``Image`` features (a subset of its Pillow list)
IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "jp2", "ppm", "pgm", "pbm", "pnm", "ico"}
#: samples read from the first shard of each split to infer the ``json`` member's struct
INFER_SAMPLES = 200

#: YAML keys written only when the card has none (the user's edit wins)
_DEFAULT_KEYS = ("annotations_creators", "language_creators", "language", "multilinguality", "source_datasets")
#: YAML keys from flags: replaced when the flag is given, else kept, else the default
FLAG_KEYS = ("license", "pretty_name", "task_categories")

_ARROW_DTYPES = {"double": "float64", "float": "float32", "halffloat": "float16"}


def feature_yaml(t: pa.DataType, null: str = "null") -> dict[str, Any]:
    """The card-YAML form of the ``datasets`` feature of an arrow type (as
    ``Features._to_yaml_list`` writes it): ``{"dtype": ...}``, ``{"list": ...}`` or ``{"struct": [...]}``.
    ``null``: the dtype of a field that was null in every sample read (``string`` takes the
    values of a later sample, where ``null`` would fail on them)."""
    if pa.types.is_null(t):
        return {"dtype": null}
    if pa.types.is_struct(t):
        return {"struct": [{"name": f.name, **feature_yaml(f.type, null)} for f in t]}
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        inner = feature_yaml(t.value_type, null)
        kind = "list" if pa.types.is_list(t) else "large_list"
        if list(inner) == ["dtype"]:
            return {kind: inner["dtype"]}
        if list(inner) == ["struct"]:
            return {kind: inner["struct"]}
        return {kind: inner}
    s = str(t)
    return {"dtype": _ARROW_DTYPES.get(s, s)}


def class_label_names(classes_doc: dict[str, Any] | None) -> list[str] | None:
    """The names of ``classes.json``'s classes in ``cls`` order, made unique for a
    ``ClassLabel`` (a name two classes share gets its wnid: ``crane (n02012849)``); None
    without classes or when the ``cls`` values are not 0..n-1."""
    classes = (classes_doc or {}).get("classes") or []
    if not classes:
        return None
    by_cls = sorted(classes, key=lambda c: c.get("cls", -1))
    if [c.get("cls") for c in by_cls] != list(range(len(by_cls))):
        return None
    names = [str(c.get("name") or c.get("wnid") or c["cls"]) for c in by_cls]
    seen = Counter(names)
    names = [f"{n} ({c.get('wnid') or c['cls']})" if seen[n] > 1 else n for n, c in zip(names, by_cls)]
    if len(set(names)) != len(names):  # still clashing (no wnids): fall back on the index
        names = [f"{n} [{i}]" for i, n in enumerate(names)]
    return names


def shard_glob(files: list[str], folder_files: list[str]) -> str | list[str]:
    """One glob for a split's shards when it matches exactly them among ``folder_files``,
    else the list of names (a single shard is its own name)."""
    if len(files) == 1:
        return files[0]
    if not files or any(ch in f for f in files for ch in "*?[]{}"):
        return list(files)
    prefix = os.path.commonprefix(files).rstrip("0123456789")
    suffix = os.path.commonprefix([f[::-1] for f in files])[::-1].lstrip("0123456789")
    pattern = f"{prefix}*{suffix}"
    if sorted(fnmatch.filter(folder_files, pattern)) == sorted(files):
        return pattern
    return list(files)


def _decoded(ext: str, data: bytes) -> Any:
    """A member as ``datasets``' webdataset builder decodes it (text, int, JSON), else bytes."""
    if ext in _TEXT_EXTS:
        return data.decode("utf-8")
    if ext in _INT_EXTS:
        return int(data)
    if ext in _JSON_EXTS:
        return json.loads(data)
    return data


def trainset_features(root: Path, info: dict[str, Any], class_names: list[str] | None,
                      notes: list[str]) -> list[dict[str, Any]] | None:
    """The ``dataset_info.features`` (card-YAML form) of a training set's tars, as the
    webdataset builder yields them, with ``cls`` a ``ClassLabel`` of ``class_names``. Read
    from up to :data:`INFER_SAMPLES` samples of each split's first shard; None (and a note)
    when there is no sample or a member is of a kind the builder decodes in ways this module
    does not describe."""
    from silverlabel.formats.wds import iter_tar_samples, read_member

    rows: list[dict[str, Any]] = []
    order: list[str] = []
    for split in info.get("splits", {}).values():
        if not split.get("filenames"):
            continue
        path = root / split["filenames"][0]
        with open_read(path) as f:  # a training set at a URL: its first samples by range
            for i, s in enumerate(iter_tar_samples(f)):
                if i >= INFER_SAMPLES:
                    break
                row = {}
                for ext, (offset, size) in s.members.items():
                    if ext not in order:
                        order.append(ext)
                    ext_l = ext.rsplit(".", 1)[-1].lower()
                    if ext_l in _OPAQUE_EXTS:
                        notes.append(f"member .{ext} is decoded by datasets into a type the card does not describe: "
                                     "no dataset_info features (datasets infers them)")
                        return None
                    if ext_l in IMAGE_EXTS:
                        continue
                    try:
                        row[ext] = _decoded(ext_l, read_member(f, offset, size))
                    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                        notes.append(f"{path.name}: member {s.key}.{ext} does not decode ({e}): no dataset_info "
                                     "features")
                        return None
                rows.append(row)
    if not rows:
        return None
    features = []
    for ext in order:
        ext_l = ext.rsplit(".", 1)[-1].lower()
        if ext_l in IMAGE_EXTS:
            features.append({"name": ext, "dtype": "image"})
        elif ext == "cls" and class_names:
            features.append({"name": ext, "dtype": {"class_label": {"names": {
                str(i): n for i, n in enumerate(class_names)}}}})
        else:
            try:
                t = pa.array([r.get(ext) for r in rows]).type
            except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                notes.append(f"member .{ext} has no single type across samples ({e}): no dataset_info features")
                return None
            features.append({"name": ext, **feature_yaml(t, null="string")})
    features += [{"name": "__key__", "dtype": "string"}, {"name": "__url__", "dtype": "string"}]
    return features


def hub_metadata(kind: str, root: Path, *, info: dict[str, Any] | None = None,
                 classes_doc: dict[str, Any] | None = None, labels: list[str] = (),
                 notes: list[str] | None = None) -> dict[str, Any]:
    """``configs`` and ``dataset_info`` of a pool, selection or training set at ``root``
    (paths relative to it, with ``/``). ``info``: a training set's ``_info.json``;
    ``labels``: a pool's labels names."""
    notes = [] if notes is None else notes
    if kind == "trainset":
        info = info or {}
        folder = sorted(p.name for p in list_files(root))  # at a URL: the store's listing (tars are not mirrored)
        data_files = [{"split": name, "path": shard_glob(list(s["filenames"]), folder)}
                      for name, s in info.get("splits", {}).items() if s.get("filenames")]
        configs = [{"config_name": "default", "data_files": data_files}] if data_files else []
        features = trainset_features(root, info, class_label_names(classes_doc), notes) if data_files else None
        # no "splits": their num_bytes are the Arrow sizes the Hub computes, not the tars'
        dinfo = [{"config_name": "default", "features": features}] if features else []
        return {"configs": configs, "dataset_info": dinfo}
    if kind == "pool":
        configs = [{"config_name": "samples", "data_files": [{"split": "train", "path": "samples/*.parquet"}],
                    "default": True}]
        configs += [{"config_name": f"labels-{n}", "data_files": [{"split": "train", "path": f"labels/{n}/*.parquet"}]}
                    for n in labels]
        return {"configs": configs, "dataset_info": []}
    if kind == "selection":
        return {"configs": [{"config_name": "default", "data_files": [{"split": "train",
                                                                       "path": "selection/*.parquet"}]}],
                "dataset_info": []}
    raise ValueError(f"unknown dataset kind {kind!r}")


# ---------------------------------------------------------------------------------------
# merging with the card already there


def block(name: str, text: str) -> str:
    """``text`` between the begin/end markers of the generated block ``name``."""
    return f"{BEGIN.format(name)}\n{text.rstrip()}\n{END.format(name)}\n\n"


def _by_config(ours: list[dict[str, Any]], theirs: Any, owned: set[str]) -> list[dict[str, Any]]:
    """``ours`` then the user's entries of config names not in ``owned`` (a dict is one
    ``default`` entry)."""
    if isinstance(theirs, dict):
        theirs = [theirs]
    return ours + [c for c in (theirs or []) if isinstance(c, dict)
                   and c.get("config_name", "default") not in owned]


def merge_yaml(old: dict[str, Any], derived: dict[str, Any], flags: dict[str, Any],
               defaults: dict[str, Any]) -> dict[str, Any]:
    """The card's YAML: ``old`` (what the card has) with ``derived`` (facts: sizes, tasks,
    configs, dataset_info) written over it, ``flags`` (given on the command line; None: not
    given) written over it, ``defaults`` filling what is still missing; ``tags`` are a union;
    ``configs``/``dataset_info`` entries of other config names are kept."""
    out = dict(old)
    owned = {c["config_name"] for c in derived.get("configs", [])}
    for k, v in derived.items():
        if k in ("configs", "dataset_info"):
            v = _by_config(v, old.get(k), owned)
            if not v:
                out.pop(k, None)
                continue
        elif k == "tags":
            v = list(v) + [t for t in (old.get("tags") or []) if t not in v]
        out[k] = v
    for k, v in flags.items():
        if v is not None:
            out[k] = v
    for k, v in defaults.items():
        if out.get(k) in (None, [], ""):
            out[k] = v
    return out


def merge_body(old: str | None, blocks: list[tuple[str | None, str]]) -> str:
    """The card's text after the YAML: ``blocks`` are ``(name, text)`` for generated blocks
    and ``(None, text)`` for the parts the user fills in. A fresh card (``old`` None, or a
    card of an older silverlabel without markers) is all of them in order; a card with
    markers keeps every line outside its blocks and gets each block's new text (a block the
    user deleted stays deleted); a card written by hand keeps its text and gets the
    generated blocks after it."""
    fresh = "".join(block(n, t) if n else t for n, t in blocks)
    if old is None or not old.strip():
        return fresh
    new = {n: t for n, t in blocks if n}
    if not _BLOCK.search(old):
        if _OLD_FOOTER in old:
            return fresh
        return old.rstrip("\n") + "\n\n" + "".join(block(n, t) for n, t in blocks if n)
    return _BLOCK.sub(lambda m: block(m[1], new.get(m[1], "")).rstrip("\n"), old)


def split_card(text: str, where: str | os.PathLike = "README.md") -> tuple[dict[str, Any], str]:
    """The YAML mapping and the body of an existing card (at ``where``, for the error), read by
    ``huggingface_hub``."""
    from huggingface_hub import DatasetCard

    import yaml

    try:
        card = DatasetCard(text, ignore_metadata_errors=True)
    except (ValueError, yaml.YAMLError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{where}: the card's YAML front matter does not read as a mapping ({first}); "
                        "fix it or move the card away") from None
    return card.data.to_dict(), card.text


def compose_card(data: dict[str, Any], body: str) -> str:
    """The card's text: the YAML written by ``huggingface_hub``'s ``DatasetCardData``, then ``body``."""
    from huggingface_hub import DatasetCardData

    text = body.lstrip("\n")
    return f"---\n{DatasetCardData(**data).to_yaml()}\n---\n\n{text}"
