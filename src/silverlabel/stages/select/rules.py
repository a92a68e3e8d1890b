"""The rules of ``select`` that are plain functions: quotas, class choice, uid lists, label
spaces, reference hashes, and the class map / report files. No SQL here; the driver
(:mod:`.run`) calls them on small merged summaries.

    >>> balanced_quotas({"a": 500, "b": 500, "c": 500}, total=7, seed=0)
    {'a': 2, 'b': 2, 'c': 3}
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from silverlabel.dataset import write_json_atomic
from silverlabel.errors import UserError
from silverlabel.formats.selection import CLASSES_FILE, REPORT_FILE

from .config import SelectConfig


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
    """A uid list as a table (uid, copies), sorted by uid: DataComp ``uids.npy`` (dtype
    ``u8,u8``) or text, one 32-hex uid a line."""
    if path.endswith(".npy"):
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise UserError(f"{path}: not a readable .npy uid list ({e})") from None
        names = arr.dtype.names or ()
        if (len(names) != 2 or arr.ndim != 1
                or any(arr.dtype[n].kind != "u" or arr.dtype[n].itemsize != 8 for n in names)):
            # (f8, f8) or (u4, u4) would silently change the uids
            raise UserError(f"{path}: uids.npy must be a 1-d array of dtype ('u8', 'u8') as DataComp writes, "
                            f"not {arr.dtype} of shape {arr.shape}")
        a, b = (arr[n].astype(np.uint64) for n in names)
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


def read_names(path: str) -> list[str]:
    """An official list (``--keys-file``): keys, file names or uids, one a line; sorted, distinct."""
    with open(path) as f:
        return sorted({line.strip() for line in f if line.strip()})


def label_mapping(cfg: SelectConfig, space: str) -> tuple[np.ndarray | None, list[str]]:
    """(map from the labels' indices to output indices, -1 for none, or None; output wnids)
    for ``--label-space`` remapping and the ``--rollup-*`` WordNet roll-up."""
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


def output_label_space(cfg: SelectConfig, mode: str, space: str | None) -> str | None:
    """The ``label_space`` written to ``classes.json``."""
    if mode != "top1":
        return mode  # "source" names, or "none"
    if cfg.rollup_depth is not None or cfg.rollup_to:
        return "wordnet-rollup"
    return cfg.label_space or space


def _class_name(wnid: str) -> str:
    from silverlabel.teachers.hierarchy import load_hierarchy

    hier = load_hierarchy()
    return hier.lemma(wnid) if wnid in hier else wnid


def choose_classes(counts: dict[str, int], cfg: SelectConfig, mode: str, wnids: list[str]
                   ) -> tuple[set[str], list[str], dict[str, int], dict[str, tuple[str | None, str]]]:
    """The class rule: classes with >= V + T samples, the N largest (ties by id); returns
    ``(chosen, class_ids in output order, cls_of, names {id: (wnid, name)})``."""
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
    of a selection."""
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


def reference_hashes(path: str) -> np.ndarray:
    """The 64-bit pHashes of ``--exclude-near REF``: a dataset (its successful samples), a
    parquet table or folder with an ``imagehash`` column, or a text file of 16-hex hashes."""
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
