"""``select`` with one unit per shard (what ``--engine ray`` runs) gives the same selection
as one unit of the whole pool (``--engine local``): rows, classes.json, report.json,
duplicates.parquet, and the training set ``shard`` makes from it. Most cases run the
per-shard units on the local engine; a few runs on a real local Ray cluster check several
options each (tests/test_engine_ray.py runs the CLI on Ray too)."""

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

N_PER_CLASS = (9, 7, 6, 4, 3, 2)


#: in21k classes whose in1k / in12k images merge: lion cub, lion, lioness -> in1k lion; tiger cub,
#: tiger, Bengal tiger -> in1k tiger; hammerhead, smooth hammerhead -> hammerhead (in1k and
#: in12k); stingray, roughtail stingray -> stingray; jay; organism (in neither: dropped)
MERGING_IN21K = (220, 2433, 2434, 222, 2436, 2437, 486, 487, 496, 497, 723, 0)


def make_labeled_dataset(root: Path, label_ids: tuple[int, ...] | None = None) -> Path:
    """An ImageFolder dataset (6 source classes, 31 images, one broken) in shards of 5,
    with synthetic top-5 teacher labels over 12 in21k classes (``label_ids``, default
    0..11); one shard's labels file has no rows (every image failed to decode: the join
    drops its samples), one row a low top-1 probability exactly at float32(0.3). With ``label_ids``, also a
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
        rows = [r for r in pq.read_table(p).to_pylist() if r["status"] == "success" and i != 3]
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


def assert_same_outputs(a: Path, b: Path) -> None:
    """Two selections are the same: rows (every column), manifest, and classes.json,
    report.json and duplicates.parquet byte for byte."""
    ca, cb = selection_content(a), selection_content(b)
    assert ca[0] == cb[0]
    assert ca[1:] == cb[1:]
    for name in ("report.json", "classes.json", "duplicates.parquet"):
        assert (a / name).is_file() == (b / name).is_file()
        if (a / name).is_file():
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def assert_same_selection(dataset: Path, tmp_path: Path, workers: int = 1, **opts) -> tuple[list[dict], dict, dict]:
    """The whole pool as one unit and one unit per shard (on the local engine) on
    ``dataset`` with ``opts``: the same selection and summary; returns (rows, classes, report)."""
    a = run_select(SelectConfig(source=str(dataset), output=str(tmp_path / "duck"), threads=1, **opts))
    b = run_select(SelectConfig(source=str(dataset), output=str(tmp_path / "sharded"), threads=1, **opts),
                   engine="local", workers=workers, per_shard=True)
    assert_same_outputs(tmp_path / "duck", tmp_path / "sharded")
    assert (a.rows, a.splits, a.classes, a.removed) == (b.rows, b.splits, b.classes, b.removed)
    assert a.rows > 0
    ca = selection_content(tmp_path / "duck")
    return ca[0], ca[1], ca[2]


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_select_equals_duckdb(case, dataset, tmp_path):
    opts = dict(CASES[case])
    if opts.pop("keys_file", False):
        opts["keys_file"] = str(keys_file(tmp_path, dataset))
    assert_same_selection(dataset, tmp_path, workers=2 if case == "top1-plain" else 1, **opts)


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
    run_select(SelectConfig(source=str(dataset), output=str(tmp_path / "sh"), threads=1, **opts), per_shard=True)
    digests = []
    for sel in ("duck", "sh"):
        out = tmp_path / f"train-{sel}"
        run_shard(ShardConfig(selection=str(tmp_path / sel), output=str(out), shards=2, name="t", workers=1))
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))})
    assert digests[0] == digests[1] and len(digests[0]) == 4  # train and validation, 2 shards each




# ---------------------------------------------------------------------------------------
# the pool-wide rules (--dedupe, --exclude-near) and bare tables, on every engine


def plant_duplicates(ds: Path) -> tuple[Path, Path]:
    """Make some samples of ``ds`` duplicates of samples in other shards: a few exact
    copies (same sha256 and pHash) and a few near copies (pHash 2 bits away), in the samples
    tables only (select reads nothing else). Returns (a reference hash list for
    --exclude-near holding two pool hashes 2 bits off, a uid list: every uid but one, one
    twice, one not in the pool)."""
    files = Dataset(ds).samples_files()
    tables = [pq.read_table(p).to_pylist() for p in files]
    ok = [[r for r in t if r["status"] == "success"] for t in tables]
    flip = lambda h, bits: f"{int(h, 16) ^ bits:016x}"  # noqa: E731
    # exact copies across shards: shard 0 row 0 -> shard 2 row 2, shard 1 row 1 -> shard 4 row 0
    for (a, i), (b, j) in (((0, 0), (2, 2)), ((1, 1), (4, 0))):
        ok[b][j]["sha256"], ok[b][j]["imagehash"] = ok[a][i]["sha256"], ok[a][i]["imagehash"]
    # near copies: shard 0 row 1 ~ shard 3 row 0 (3 has no labels) ~ shard 5 row 1; shard 2 row 0 ~ shard 4 row 2
    for (a, i), (b, j) in (((0, 1), (3, 0)), ((0, 1), (5, 1)), ((2, 0), (4, 2))):
        ok[b][j]["imagehash"] = flip(ok[a][i]["imagehash"], 0b101)
    for p, t in zip(files, tables):
        pq.write_table(pa.Table.from_pylist(t, schema=pq.read_schema(p)), p)
    ref = ds.parent / "reference.txt"
    ref.write_text(f"{flip(ok[1][0]['imagehash'], 0b11)}\n{flip(ok[5][0]['imagehash'], 0b1000001)}\n")
    uids = ds.parent / "uids.txt"
    listed = [r["uid"] for t in ok for r in t if r is not ok[1][2]]
    uids.write_text("\n".join(listed + [ok[0][0]["uid"], "f" * 32]) + "\n")
    return ref, uids


@pytest.fixture(scope="module")
def dup_dataset(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A labeled dataset with planted duplicates, in a folder named with an apostrophe and
    a double quote; (dataset, reference hashes, uid list)."""
    ds = make_labeled_dataset(tmp_path_factory.mktemp("seldup") / "bob's \"pool\"")
    return (ds, *plant_duplicates(ds))


def coyo_table_folder(root: Path, files: int = 3, rows: int = 40) -> Path:
    """A bare COYO-Labeled-300M table in ``files`` parquet files, ids shuffled across the
    files, classes 3..8 (top-2 labels), every 7th pHash a 2-bit copy of an earlier one."""
    rng = np.random.default_rng(7)
    root.mkdir(parents=True)
    ids = rng.permutation(rows) + 1000
    hashes = [f"{h:016x}" for h in rng.integers(0, 2**63, rows)]
    for i in range(7, rows, 7):
        hashes[i] = f"{int(hashes[i - 5], 16) ^ 0b110:016x}"
    top = rng.integers(3, 9, rows)
    p1 = rng.uniform(0.2, 0.9, rows).astype(np.float32)
    for f in range(files):
        sl = slice(f * rows // files, (f + 1) * rows // files)
        pq.write_table(pa.table({
            "id": pa.array(ids[sl], pa.int64()), "url": [f"http://x/{i}/img{i}.jpg" for i in ids[sl]],
            "imagehash": hashes[sl],
            "labels": pa.array([[int(t), int(t) + 1] for t in top[sl]], pa.list_(pa.int32())),
            "label_probs": pa.array([[float(p), float((1 - p) / 2)] for p in p1[sl]], pa.list_(pa.float32())),
            "width": pa.array(np.full(len(ids[sl]), 64), pa.int32()), "height": pa.array(np.full(len(ids[sl]), 48), pa.int32()),
        }), root / f"part-{f}.parquet")
    return root


def datacomp_table_folder(root: Path, rows: int = 30) -> tuple[Path, Path]:
    """A bare DataComp-style metadata table (uid, url, text, sha256) in two files, two
    rows with the same sha256; and a uid list (every other uid, one twice, one missing)."""
    root.mkdir(parents=True)
    uids = [hashlib.md5(str(i).encode()).hexdigest() for i in range(rows)]
    sha = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(rows)]
    sha[20] = sha[4]
    for f, sl in enumerate((slice(0, rows // 2), slice(rows // 2, rows))):
        pq.write_table(pa.table({"uid": uids[sl], "url": [f"http://y/{u}.jpg" for u in uids[sl]],
                                 "text": [f"t{u[:4]}" for u in uids[sl]], "sha256": sha[sl]}), root / f"m{f}.parquet")
    listed = uids[::2] + [uids[4], "0" * 32]
    (root.parent / "uids.txt").write_text("\n".join(listed) + "\n")
    return root, root.parent / "uids.txt"


def test_dedupe_exclude_near_and_uids_on_shards_equal_one_unit(dup_dataset, tmp_path):
    ds, ref, uids = dup_dataset
    rows, _classes, report = assert_same_selection(
        ds, tmp_path, dedupe="phash:4", exclude_near=str(ref), max_distance=2, uids=str(uids),
        val_per_class=1, fraction=0.5, balanced=True, seed=2)
    removed = report["removed"]
    assert removed["near_duplicates_phash_4"] == 5 and removed["near_reference"] == 2
    dups = pq.read_table(tmp_path / "sharded" / "duplicates.parquet").to_pylist()
    assert {d["rule"] for d in dups} == {"near", "near_reference"}
    assert not {d["removed_key"] for d in dups} & {r["source_key"] for r in rows}
    rows, _classes, report = assert_same_selection(ds, tmp_path / "exact", dedupe="exact", label="source",
                                                   val_per_class=1)
    assert report["removed"]["exact_duplicates"] == 2


def test_bare_tables_on_shards_equal_one_unit(tmp_path):
    coyo = coyo_table_folder(tmp_path / "coyo's \"table\"")
    rows, classes, report = assert_same_selection(coyo, tmp_path / "a", dedupe="phash:2", top_classes=4,
                                                  val_per_class=1, min_prob=0.3)
    assert report["removed"]["near_duplicates_phash_2"] == 5 and classes["label_space"] == "in21k"
    assert all(r["source_dataset"] is None and r["key"] == str(r["id"]) for r in rows)
    meta, uids = datacomp_table_folder(tmp_path / "dc")
    rows, _classes, report = assert_same_selection(meta, tmp_path / "b", uids=str(uids), dedupe="exact")
    # uid 4 listed twice: rows u4-1, u4-2, exact duplicates of row 20 (same sha256, smaller key)
    assert report["removed"] == {"not_in_uids": 15, "uids_missing_from_pool": 1, "exact_duplicates": 2}
    u4, u20 = hashlib.md5(b"4").hexdigest(), hashlib.md5(b"20").hexdigest()
    dups = pq.read_table(tmp_path / "b" / "sharded" / "duplicates.parquet").to_pylist()
    assert [(d["removed_key"], d["kept_key"]) for d in dups] == [(f"{u4}-1", u20), (f"{u4}-2", u20)]
    assert all(r["source_key"] == r["key"] for r in rows)


# ---------------------------------------------------------------------------------------
# on a real Ray cluster (tests/test_engine_ray.py's): few runs, several options each


try:
    from test_engine_ray import cluster, needs_ray  # noqa: F401  (the module-scoped fixture)
except ImportError:  # pragma: no cover
    needs_ray = pytest.mark.skip(reason="tests/test_engine_ray.py not importable")


@needs_ray
def test_ray_equals_local_with_every_pool_wide_rule(cluster, dup_dataset, tmp_path):
    """Through the CLI, on Ray and locally, a dataset under a quoted path with --uids,
    --dedupe, --exclude-near, --label-space and a balanced fraction; then a bare table
    folder (quoted too) with --dedupe exact and --keys-file: identical outputs."""
    import subprocess
    import sys

    ds, ref, uids = dup_dataset
    kf = tmp_path / "it's keys.txt"
    kf.write_text("1003\n1010\nimg1021.jpg\n1030\n")
    coyo = coyo_table_folder(tmp_path / "coyo's \"t\"")
    runs = {
        "ds": (ds, ["--uids", str(uids), "--dedupe", "phash:4", "--exclude-near", str(ref), "--max-distance", "2",
                    "--val-per-class", "1", "--fraction", "0.5", "--balanced", "--seed", "3", "--min-prob", "0.1",
                    "--multi-label"]),
        "coyo": (coyo, ["--dedupe", "exact", "--keys-file", str(kf), "--top-classes", "5", "--val-per-class", "1"]),
    }
    for name, (src, opts) in runs.items():
        for engine in ("ray", "local"):
            out = tmp_path / f"{name} o'{engine}"
            cmd = [sys.executable, "-m", "silverlabel.cli", "select", str(src), "-o", str(out), *opts,
                   "--engine", engine, "--threads", "1"]
            if engine == "ray":
                cmd += ["--ray-address", cluster.address, "--workers", "2"]
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=cluster.env)
            assert p.returncode == 0, p.stderr
        assert_same_outputs(tmp_path / f"{name} o'ray", tmp_path / f"{name} o'local")
        rows = selection_content(tmp_path / f"{name} o'ray")[0]
        assert rows and (tmp_path / f"{name} o'ray" / "duplicates.parquet").is_file()
        assert len(list((tmp_path / f"{name} o'ray" / "selection").glob("*.parquet"))) > 1  # one part per unit
        assert not (tmp_path / f"{name} o'ray" / ".select-tmp").exists()
