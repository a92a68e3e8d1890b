"""``select`` as passes over the label shards (the path ``--engine ray`` runs) gives the
same selection as the DuckDB path: rows, classes.json, report.json, and the training set
``shard`` makes from it. Here on the local engine; tests/test_engine_ray.py runs it on Ray."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from silverlabel.dataset import Dataset
from silverlabel.demodata import photo_like_images
from silverlabel.stages.label import LABELS_SCHEMA
from silverlabel.stages.select import SelectConfig, run_select
from silverlabel.stages.select_sharded import run_select_sharded

N_PER_CLASS = (9, 7, 6, 4, 3, 2)


def make_labeled_dataset(root: Path) -> Path:
    """An ImageFolder dataset (6 source classes, 31 images, one broken) in shards of 5,
    with synthetic top-5 teacher labels over 12 in21k classes; one shard has no labels
    file (as after ``label --limit``-less partial runs), one row a low top-1 probability
    exactly at float32(0.3)."""
    from silverlabel.stages.ingest import IngestConfig, run_ingest

    folder = root / "imgs"
    pool = iter(photo_like_images(sum(N_PER_CLASS), size=(96, 72), seed=11))
    for c, n in enumerate(N_PER_CLASS):
        d = folder / f"class{c}"
        d.mkdir(parents=True)
        for _ in range(n):
            name, data = next(pool)
            (d / name).write_bytes(data)
    (folder / "class0" / "zz_broken.jpg").write_bytes(b"\xff\xd8 broken")
    ds = root / "ds"
    run_ingest(IngestConfig(sources=(str(folder),), output=str(ds), samples_per_shard=5, workers=1))
    rng = np.random.default_rng(0)
    out = ds / "labels" / "synthetic"
    out.mkdir(parents=True)
    dsobj = Dataset(ds)
    files = dsobj.samples_files()
    for i, p in enumerate(files):
        if i == 3:
            continue  # no labels for this shard: the inner join drops its rows
        rows = [r for r in pq.read_table(p).to_pylist() if r["status"] == "success"]
        labels, probs = [], []
        for j, r in enumerate(rows):
            top = rng.choice(12, size=5, replace=False).astype(np.int32)
            pr = np.sort(rng.dirichlet(np.ones(8)).astype(np.float32))[::-1][:5]
            if i == 1 and j == 0:
                pr[0] = np.float32(0.3)  # on the --min-prob 0.3 boundary
            labels.append(top.tolist())
            probs.append(pr.tolist())
        t = pa.table({"id": [r["id"] for r in rows], "url": [r["url"] for r in rows],
                      "imagehash": [r["imagehash"] for r in rows], "labels": labels, "label_probs": probs,
                      "width": [r["width"] for r in rows], "height": [r["height"] for r in rows],
                      "key": [r["key"] for r in rows]}, schema=LABELS_SCHEMA)
        pq.write_table(t, out / p.name)
    man = dsobj.read_manifest()
    man["labels"] = {"synthetic": {"config": {"label_space": "in21k"}, "rows": 0}}
    dsobj.write_manifest({k: v for k, v in man.items() if k not in ("format_version", "updated")})
    return ds


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_labeled_dataset(tmp_path_factory.mktemp("selsharded"))


def selection_content(out: Path) -> tuple[list[dict], dict, dict, dict]:
    rows = pq.read_table(out / "selection").to_pylist()
    rows.sort(key=lambda r: r["key"])
    man = json.loads((out / "silverlabel.json").read_text())
    return (rows, json.loads((out / "classes.json").read_text()), json.loads((out / "report.json").read_text()),
            {k: man[k] for k in ("stage", "config", "parents", "counts", "from_table")})


def keys_file(tmp: Path, dataset: Path) -> Path:
    rows = pq.read_table(dataset / "samples").to_pylist()
    picks = [rows[i]["key"] for i in (0, 3, 8, 12, 25)] + [Path(rows[17]["source"]).name, "not-there"]
    p = tmp / "keys.txt"
    p.write_text("\n".join(picks) + "\n")
    return p


CASES = {
    "top1-classes-val": dict(val_per_class=1, min_train_per_class=1, top_classes=5, seed=3),
    "top1-minprob-multilabel-fraction": dict(min_prob=0.3, multi_label=True, val_per_class=1, fraction=0.5,
                                             balanced=True, seed=1),
    "source-val-fraction-keys": dict(label="source", val_per_class=1, min_train_per_class=3, fraction=0.5,
                                     balanced=True, keys_file=True),
    "none-keys": dict(label="none", keys_file=True),
    "top1-plain": dict(),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_select_equals_duckdb(case, dataset, tmp_path):
    opts = dict(CASES[case])
    if opts.pop("keys_file", False):
        opts["keys_file"] = str(keys_file(tmp_path, dataset))
    a = run_select(SelectConfig(source=str(dataset), output=str(tmp_path / "duck"), threads=1, **opts))
    b = run_select_sharded(SelectConfig(source=str(dataset), output=str(tmp_path / "sharded"), threads=1, **opts),
                           engine="local", workers=2)
    ca, cb = selection_content(tmp_path / "duck"), selection_content(tmp_path / "sharded")
    assert ca[0] == cb[0] and len(ca[0]) == a.rows > 0
    assert ca[1:] == cb[1:]
    assert (a.rows, a.splits, a.classes, a.removed) == (b.rows, b.splits, b.classes, b.removed)
    assert (tmp_path / "duck" / "report.json").read_bytes() == (tmp_path / "sharded" / "report.json").read_bytes()
    assert (tmp_path / "duck" / "classes.json").read_bytes() == (tmp_path / "sharded" / "classes.json").read_bytes()


def test_shard_of_either_selection_is_byte_identical(dataset, tmp_path):
    from silverlabel.stages.shard import ShardConfig, run_shard

    opts = dict(val_per_class=1, min_train_per_class=1, seed=2)
    run_select(SelectConfig(source=str(dataset), output=str(tmp_path / "duck"), threads=1, **opts))
    run_select_sharded(SelectConfig(source=str(dataset), output=str(tmp_path / "sh"), threads=1, **opts))
    digests = []
    for sel in ("duck", "sh"):
        out = tmp_path / f"train-{sel}"
        run_shard(ShardConfig(selection=str(tmp_path / sel), output=str(out), shards=2, name="t", workers=1))
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))})
    assert digests[0] == digests[1] and len(digests[0]) == 4  # train and validation, 2 shards each


@pytest.mark.parametrize("opts, named", [
    (dict(dedupe="phash:4"), "--dedupe"),
    (dict(uids="u.txt", exclude_near="ref"), "--uids, --exclude-near"),
    (dict(rollup_depth=3), "--rollup-depth"),
    (dict(label_space="in1k"), "--label-space in1k"),
])
def test_unsupported_rules_are_named(opts, named, dataset, tmp_path):
    with pytest.raises(ValueError, match="does not support") as e:
        run_select_sharded(SelectConfig(source=str(dataset), output=str(tmp_path / "x"), **opts))
    assert named in str(e.value) and "--engine local" in str(e.value)
    assert not (tmp_path / "x").exists()  # refused before touching the output


def test_cli_select_engine_ray_refuses_what_it_cannot_do(dataset, tmp_path):
    from silverlabel.cli import main

    assert main(["select", str(dataset), "-o", str(tmp_path / "x"), "--engine", "ray", "--dedupe", "exact"]) == 2
