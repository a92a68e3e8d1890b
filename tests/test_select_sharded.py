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


#: in21k classes whose in1k / in12k images merge: lion cub, lion, lioness -> in1k lion; tiger cub,
#: tiger, Bengal tiger -> in1k tiger; hammerhead, smooth hammerhead -> hammerhead (in1k and
#: in12k); stingray, roughtail stingray -> stingray; jay; organism (in neither: dropped)
MERGING_IN21K = (220, 2433, 2434, 222, 2436, 2437, 486, 487, 496, 497, 723, 0)


def make_labeled_dataset(root: Path, label_ids: tuple[int, ...] | None = None) -> Path:
    """An ImageFolder dataset (6 source classes, 31 images, one broken) in shards of 5,
    with synthetic top-5 teacher labels over 12 in21k classes (``label_ids``, default
    0..11); one shard has no labels file (as after ``label --limit``-less partial runs),
    one row a low top-1 probability exactly at float32(0.3). With ``label_ids``, also a
    row whose merged probabilities tie (0.25 + 0.125 + 0.125 = 0.375, then 0.25 and 0.25)
    and a row none of whose labels maps to in1k or in12k."""
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
            top, pr = top.tolist(), pr.tolist()
            if label_ids is not None:
                top = [label_ids[t] for t in top]
                if i == 2 and j == 0:
                    top, pr = [220, 222, 2433, 486, 487], [0.25, 0.25, 0.125, 0.125, 0.125]
                elif i == 2 and j == 1:
                    top, pr = [0, 1], [0.6, 0.3]  # organism, entity-level: no in1k / in12k class
            labels.append(top)
            probs.append(pr)
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


@pytest.fixture(scope="module")
def merging_dataset(tmp_path_factory) -> Path:
    return make_labeled_dataset(tmp_path_factory.mktemp("selmerge"), MERGING_IN21K)


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


def assert_same_selection(dataset: Path, tmp_path: Path, **opts) -> tuple[list[dict], dict, dict]:
    """Both paths on ``dataset`` with ``opts``: same rows (every column), classes.json,
    report.json (byte for byte), manifest and summary; returns (rows, classes, report)."""
    a = run_select(SelectConfig(source=str(dataset), output=str(tmp_path / "duck"), threads=1, **opts))
    b = run_select_sharded(SelectConfig(source=str(dataset), output=str(tmp_path / "sharded"), threads=1, **opts),
                           engine="local", workers=2)
    ca, cb = selection_content(tmp_path / "duck"), selection_content(tmp_path / "sharded")
    assert ca[0] == cb[0] and len(ca[0]) == a.rows > 0
    assert ca[1:] == cb[1:]
    assert (a.rows, a.splits, a.classes, a.removed) == (b.rows, b.splits, b.classes, b.removed)
    assert (tmp_path / "duck" / "report.json").read_bytes() == (tmp_path / "sharded" / "report.json").read_bytes()
    assert (tmp_path / "duck" / "classes.json").read_bytes() == (tmp_path / "sharded" / "classes.json").read_bytes()
    return ca[0], ca[1], ca[2]


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_select_equals_duckdb(case, dataset, tmp_path):
    opts = dict(CASES[case])
    if opts.pop("keys_file", False):
        opts["keys_file"] = str(keys_file(tmp_path, dataset))
    assert_same_selection(dataset, tmp_path, **opts)


def uid_list(tmp: Path, dataset: Path, fmt: str) -> tuple[Path, str, str]:
    """Every other pool uid once, one uid twice, one three times, one uid of a sample whose
    shard has no labels (not in the pool), one uid in no sample; (file, twice, thrice)."""
    from silverlabel.stages.select import uids_to_npy

    rows = sorted((r for r in pq.read_table(dataset / "samples").to_pylist() if r["status"] == "success"),
                  key=lambda r: r["key"])
    labeled = set(pq.read_table(dataset / "labels" / "synthetic", columns=["key"]).column("key").to_pylist())
    no_labels = {r["uid"] for r in rows if r["key"] not in labeled}
    pool = [r["uid"] for r in rows if r["key"] in labeled]
    twice, thrice = pool[1], pool[6]
    listed = pool[::2] + [twice, twice] + [thrice] * 2 + [min(no_labels), "f" * 32]  # thrice: pool[6] is in [::2]
    assert listed.count(thrice) == 3 and listed.count(twice) == 2
    if fmt == "npy":
        p = tmp / "uids.npy"
        uids_to_npy(listed, str(p))
    else:
        p = tmp / "uids.txt"
        p.write_text("\n".join(u.upper() if i % 3 == 0 else u for i, u in enumerate(listed)) + "\n")
    return p, twice, thrice


UID_CASES = {
    "npy-top1-val": dict(val_per_class=1, seed=5),
    "txt-top1-fraction-keys": dict(val_per_class=1, fraction=0.5, balanced=True, keys_file=True, seed=2),
    "npy-source-val": dict(label="source", val_per_class=1, min_train_per_class=1),
    "txt-none": dict(label="none"),
    "npy-remap-in1k-minprob": dict(label_space="in1k", min_prob=0.3, multi_label=True),
}


@pytest.mark.parametrize("case", list(UID_CASES))
def test_sharded_uids_equal_duckdb(case, dataset, merging_dataset, tmp_path):
    opts = dict(UID_CASES[case])
    ds = merging_dataset if "label_space" in opts else dataset
    path, twice, thrice = uid_list(tmp_path, ds, case.split("-")[0])
    if opts.pop("keys_file", False):
        rows = sorted(pq.read_table(ds / "samples").to_pylist(), key=lambda r: r["key"])
        picks = [f"{rows[1]['key']}-2", rows[0]["key"], rows[2]["uid"], f"{rows[6]['key']}-3", "nope"]
        (tmp_path / "keys.txt").write_text("\n".join(picks) + "\n")
        opts["keys_file"] = str(tmp_path / "keys.txt")
    rows, _classes, report = assert_same_selection(ds, tmp_path, uids=str(path), **opts)
    assert report["removed"]["uids_missing_from_pool"] == 2  # the no-labels sample's uid and f...f
    assert report["removed"]["not_in_uids"] > 0
    by_uid: dict[str, list[str]] = {}
    for r in rows:
        by_uid.setdefault(r["uid"], []).append(r["key"])
    if "min_prob" not in opts and "keys_file" not in opts:
        src = {r["uid"]: r["source_key"] for r in rows}
        assert sorted(by_uid[twice]) == [f"{src[twice]}-1", f"{src[twice]}-2"]
        assert sorted(by_uid[thrice]) == [f"{src[thrice]}-{i}" for i in (1, 2, 3)]
        assert all(r["source_key"] == r["key"] for r in rows if r["uid"] not in (twice, thrice))


REMAP_CASES = {
    "in1k": dict(label_space="in1k"),
    "in1k-minprob-multilabel-val-fraction": dict(label_space="in1k", min_prob=0.3, multi_label=True, val_per_class=1,
                                                 min_train_per_class=3, fraction=0.4, balanced=True, seed=4),
    "in12k-classes": dict(label_space="in12k", val_per_class=1, min_train_per_class=1, top_classes=4, seed=1),
    "rollup-depth": dict(rollup_depth=11, val_per_class=1),
    "rollup-to": dict(rollup_to=True, min_prob=0.2),
}


@pytest.mark.parametrize("case", list(REMAP_CASES))
def test_sharded_label_space_and_rollup_equal_duckdb(case, merging_dataset, tmp_path):
    from silverlabel.teachers.hierarchy import load_hierarchy
    from silverlabel.teachers.labelspace import get_label_space

    opts = dict(REMAP_CASES[case])
    if opts.get("rollup_to"):
        hier, in21k = load_hierarchy(), get_label_space("in21k")
        big_cat = hier.path_to_root(in21k.wnids[2433])[1]  # lion -> big cat
        shark = hier.path_to_root(in21k.wnids[486])[1]  # hammerhead -> shark
        (tmp_path / "targets.txt").write_text(f"{big_cat}\n{shark} # a comment\n")
        opts["rollup_to"] = str(tmp_path / "targets.txt")
    rows, classes, report = assert_same_selection(merging_dataset, tmp_path, **opts)
    if case == "in1k":
        in1k = get_label_space("in1k")
        lion, tiger, hammerhead = (in1k.index(w) for w in ("n02129165", "n02129604", "n01494475"))
        tie = next(r for r in rows if r["labels"][0] == lion and r["label_probs"][0] == 0.375)
        assert tie["labels"] == [lion, hammerhead, tiger] and tie["label_probs"] == [0.375, 0.25, 0.25]
        assert classes["label_space"] == "in1k" and {c["name"] for c in classes["classes"]} >= {"lion", "tiger"}
        assert report["input_rows"] == len(rows) + 1  # the organism-only row maps to nothing and is dropped
        assert report["removed"] == {"below_min_prob_or_unlabeled": 1}  # ... and the report says so
    if case.startswith("rollup"):
        assert classes["label_space"] == "wordnet-rollup"


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
    (dict(uids="u.txt", exclude_near="ref"), "support --exclude-near:"),
    (dict(dedupe="exact", exclude_near="ref", label_space="in1k"), "support --dedupe, --exclude-near:"),
])
def test_unsupported_rules_are_named(opts, named, dataset, tmp_path):
    with pytest.raises(ValueError, match="does not support") as e:
        run_select_sharded(SelectConfig(source=str(dataset), output=str(tmp_path / "x"), **opts))
    assert named in str(e.value) and "--engine local" in str(e.value)
    assert not (tmp_path / "x").exists()  # refused before touching the output


def test_cli_select_engine_ray_refuses_what_it_cannot_do(dataset, tmp_path):
    from silverlabel.cli import main

    assert main(["select", str(dataset), "-o", str(tmp_path / "x"), "--engine", "ray", "--dedupe", "exact"]) == 2
