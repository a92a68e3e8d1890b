"""select: the imagenet-12k rule, the 1% rule, uids, label remapping — on tables with known answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from silverlabel.dataset import dataset_identity
from silverlabel.stages.select import SelectConfig, balanced_quotas, load_uids, run_select, uids_to_npy


def _imagenet_like_counts(k: int = 1000, total: int = 1_281_167, lo: int = 732, hi: int = 1300, seed: int = 0):
    """k class sizes in [lo, hi] summing exactly to total (ImageNet-1k's train split shape)."""
    rng = np.random.default_rng(seed)
    c = rng.integers(lo, hi + 1, k)
    while c.sum() != total:
        i = rng.integers(k)
        step = np.sign(total - c.sum())
        if lo <= c[i] + step <= hi:
            c[i] += step
    return c


def _labels_table(path: Path, counts, space_size: int = 21841, seed: int = 1) -> None:
    """A bare COYO-Labeled-300M table: class i has counts[i] images with top-1 = class i."""
    rng = np.random.default_rng(seed)
    cls = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    rng.shuffle(cls)
    n = len(cls)
    second = (cls + 1) % space_size
    labels = pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32)),
                                      pa.array(np.stack([cls, second], 1).reshape(-1)))
    p1 = rng.uniform(0.3, 0.95, n).astype(np.float32)
    probs = pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32)),
                                     pa.array(np.stack([p1, (1 - p1) / 2], 1).reshape(-1)))
    pq.write_table(pa.table({
        "id": pa.array(np.arange(n, dtype=np.int64) + 10_000), "url": pa.array([f"http://x/{i}.jpg" for i in range(n)]),
        "imagehash": pa.array([f"{i:016x}" for i in range(n)]), "labels": labels, "label_probs": probs,
        "width": pa.array(np.full(n, 640, np.int32)), "height": pa.array(np.full(n, 480, np.int32)),
    }), path)


def test_balanced_quotas_is_the_simclr_rule():
    counts = dict(enumerate(_imagenet_like_counts()))
    q = balanced_quotas(counts, total=int(0.01 * 1_281_167), seed=0)
    assert sum(q.values()) == 12_811
    assert sorted(np.unique(list(q.values()), return_counts=True)[1].tolist()) == [189, 811]
    assert {v for v in q.values()} == {12, 13}
    q10 = balanced_quotas(counts, total=int(0.1 * 1_281_167), seed=0)
    assert sum(q10.values()) == 128_116
    with pytest.raises(ValueError, match="fewer than its quota"):
        balanced_quotas({"a": 1, "b": 10}, total=8, seed=0)


@pytest.fixture(scope="module")
def imagenet_table(tmp_path_factory):
    path = tmp_path_factory.mktemp("in1k") / "labels.parquet"
    _labels_table(path, _imagenet_like_counts())
    return path


def test_one_percent_subset_exactly(imagenet_table, tmp_path):
    s = run_select(SelectConfig(source=str(imagenet_table), output=str(tmp_path / "sel"), fraction=0.01,
                                balanced=True, seed=3, threads=2))
    assert s.splits == {"train": 12_811}
    t = pq.read_table(tmp_path / "sel" / "selection")
    per_class = np.unique(t.column("cls").to_numpy(), return_counts=True)[1]
    assert len(per_class) == 1000 and sorted(np.unique(per_class, return_counts=True)[1].tolist()) == [189, 811]
    assert set(per_class.tolist()) == {12, 13}
    again = run_select(SelectConfig(source=str(imagenet_table), output=str(tmp_path / "sel2"), fraction=0.01,
                                    balanced=True, seed=3, threads=2))
    assert again.rows == s.rows
    assert pq.read_table(tmp_path / "sel2" / "selection").equals(t)  # deterministic
    other = pq.read_table(run_select(SelectConfig(source=str(imagenet_table), output=str(tmp_path / "sel3"),
                                                  fraction=0.01, balanced=True, seed=4, threads=2)).output + "/selection")
    assert not other.column("key").equals(t.column("key"))  # the seed matters


def test_imagenet12k_rule(tmp_path):
    # 30 classes of 5..60 images: keep classes with >= 4 validation + 20 train, then the 10 largest
    counts = np.arange(5, 65, 2)
    path = tmp_path / "labels.parquet"
    _labels_table(path, counts)
    s = run_select(SelectConfig(source=str(path), output=str(tmp_path / "sel"), top_classes=10, val_per_class=4,
                                min_train_per_class=20, seed=0, threads=2))
    kept = sorted(counts.tolist())[-10:]
    assert s.classes == 10 and s.splits == {"train": sum(kept) - 40, "validation": 40}
    classes = json.loads((tmp_path / "sel" / "classes.json").read_text())
    assert [c["validation"] for c in classes["classes"]] == [4] * 10
    assert classes["classes"][0]["wnid"].startswith("n") and classes["label_space"] == "in21k"
    t = pq.read_table(tmp_path / "sel" / "selection").to_pylist()
    assert {r["cls"] for r in t} == set(range(10))
    # the selection is ordered train first, then validation, by key
    assert [r["split"] for r in t] == sorted(r["split"] for r in t)


def test_min_prob_and_multilabel(tmp_path):
    path = tmp_path / "labels.parquet"
    _labels_table(path, [50, 50])
    s = run_select(SelectConfig(source=str(path), output=str(tmp_path / "a"), min_prob=0.6, threads=2))
    probs = [r["label_probs"][0] for r in pq.read_table(tmp_path / "a" / "selection").to_pylist()]
    assert s.rows == len(probs) < 100 and min(probs) >= 0.6
    run_select(SelectConfig(source=str(path), output=str(tmp_path / "b"), min_prob=0.1, multi_label=True, threads=2))
    rows = pq.read_table(tmp_path / "b" / "selection").to_pylist()
    assert all(min(r["label_probs"]) >= 0.1 and len(r["labels"]) == len(r["label_probs"]) for r in rows)


def test_label_space_remap_to_in1k(tmp_path):
    from silverlabel.teachers.labelspace import get_label_space

    in21k, in1k = get_label_space("in21k"), get_label_space("in1k")
    cat = in21k.index("n02124075")  # Egyptian cat, in both spaces
    path = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"id": [1, 2], "labels": [[cat, 0], [cat, 5]], "label_probs": [[0.7, 0.2], [0.6, 0.3]]}),
                   path)
    run_select(SelectConfig(source=str(path), output=str(tmp_path / "s"), label_space="in1k", threads=2))
    rows = pq.read_table(tmp_path / "s" / "selection").to_pylist()
    assert [in1k.wnids[r["labels"][0]] for r in rows] == ["n02124075", "n02124075"]
    assert rows[0]["class_name"] == "Egyptian cat"


def test_uids_npy_selection_with_repeats(tmp_path):
    uids = [f"{i:032x}" for i in range(1, 41)]
    path = tmp_path / "meta.parquet"
    pq.write_table(pa.table({"uid": uids, "url": [f"http://x/{i}" for i in range(40)], "text": ["t"] * 40}), path)
    wanted = uids[:5] + [uids[7], uids[7]] + ["f" * 32]  # one listed twice, one not in the pool
    uids_to_npy(wanted, str(tmp_path / "uids.npy"))
    assert np.load(tmp_path / "uids.npy").dtype == np.dtype("u8,u8")
    s = run_select(SelectConfig(source=str(path), output=str(tmp_path / "s"), uids=str(tmp_path / "uids.npy"), threads=2))
    rows = pq.read_table(tmp_path / "s" / "selection").to_pylist()
    assert s.rows == 7
    keys = sorted(r["key"] for r in rows)
    assert f"{uids[7]}-1" in keys and f"{uids[7]}-2" in keys
    assert s.removed["uids_missing_from_pool"] == 1
    (tmp_path / "uids.txt").write_text("\n".join(wanted[:3]) + "\n")
    assert run_select(SelectConfig(source=str(path), output=str(tmp_path / "t"), uids=str(tmp_path / "uids.txt"),
                                   threads=2)).rows == 3
    assert load_uids(str(tmp_path / "uids.txt")).num_rows == 3


def test_bad_input_errors(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"foo": [1]}), path)
    with pytest.raises(ValueError, match="needs the COYO-Labeled columns"):
        run_select(SelectConfig(source=str(path), output=str(tmp_path / "o")))
    with pytest.raises(FileNotFoundError):
        run_select(SelectConfig(source=str(tmp_path / "missing"), output=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="needs --balanced"):
        SelectConfig(source="x", output="y", fraction=0.1)


def test_select_from_a_dataset_with_source_labels_and_keys_file(tmp_path):
    """An ImageFolder dataset: --label source, a balanced fraction and an official file-name list."""
    from silverlabel.demodata import photo_like_images
    from silverlabel.stages.ingest import IngestConfig, run_ingest

    root = tmp_path / "imgs"
    images = list(photo_like_images(30, size=(160, 120), seed=4))
    for i, (name, data) in enumerate(images):
        d = root / f"n0000000{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
    run_ingest(IngestConfig(sources=(str(root),), output=str(tmp_path / "ds"), workers=1, samples_per_shard=8))
    s = run_select(SelectConfig(source=str(tmp_path / "ds"), output=str(tmp_path / "sel"), fraction=0.5,
                                balanced=True, seed=1, threads=2))
    rows = pq.read_table(tmp_path / "sel" / "selection").to_pylist()
    assert s.rows == 15 and s.classes == 3
    assert sorted(np.unique([r["class_name"] for r in rows], return_counts=True)[1].tolist()) == [5, 5, 5]
    assert all(r["source_dataset"] == dataset_identity(tmp_path / "ds") and r["source_shard"].endswith(".tar")
               for r in rows)
    (tmp_path / "keys.txt").write_text(f"{images[0][0]}\n{images[4][0]}\n")
    k = run_select(SelectConfig(source=str(tmp_path / "ds"), output=str(tmp_path / "k"),
                                keys_file=str(tmp_path / "keys.txt"), threads=2))
    assert k.rows == 2


def test_rollup_to_wordnet_ancestors(tmp_path):
    from silverlabel.teachers.hierarchy import load_hierarchy
    from silverlabel.teachers.labelspace import get_label_space

    in21k = get_label_space("in21k")
    hier = load_hierarchy()
    cats = ["n02124075", "n02123159", "n02123045"]  # Egyptian, tiger, tabby cat
    dog = "n02099601"  # golden retriever
    path = tmp_path / "labels.parquet"
    rows = [[in21k.index(w)] for w in cats + [dog]]
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "labels": rows, "label_probs": [[0.9]] * 4}), path)
    (tmp_path / "targets.txt").write_text("n02121808\nn02084071\n")  # domestic cat, dog
    s = run_select(SelectConfig(source=str(path), output=str(tmp_path / "to"), rollup_to=str(tmp_path / "targets.txt"),
                                threads=2))
    got = {r["id"]: r["class_name"] for r in pq.read_table(tmp_path / "to" / "selection").to_pylist()}
    assert got == {1: "domestic cat", 2: "domestic cat", 3: "domestic cat", 4: "dog"} and s.classes == 2
    d = 6
    run_select(SelectConfig(source=str(path), output=str(tmp_path / "depth"), rollup_depth=d, threads=2))
    classes = json.loads((tmp_path / "depth" / "classes.json").read_text())["classes"]
    assert all(hier.depth(c["wnid"]) <= d for c in classes)
    assert {c["wnid"] for c in classes} == {hier.ancestor_at_depth(w, d) for w in cats + [dog]}


def test_dedupe_and_decontamination_on_planted_copies(tmp_path):
    """Rescaled, recompressed and slightly cropped copies are found; distinct photos are kept."""
    import io

    import skimage.data
    from PIL import Image

    from silverlabel.stages.ingest import IngestConfig, run_ingest

    def jpeg(img, q=92):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=q)
        return buf.getvalue()

    pool = tmp_path / "pool"
    pool.mkdir()
    originals = {n: Image.fromarray(getattr(skimage.data, n)()).convert("RGB")
                 for n in ("astronaut", "chelsea", "coffee", "rocket", "camera", "immunohistochemistry")}
    for n, img in originals.items():
        (pool / f"{n}.jpg").write_bytes(jpeg(img))
    a = originals["astronaut"]
    w, h = a.size
    (pool / "astronaut_small.jpg").write_bytes(jpeg(a.resize((w * 3 // 4, h * 3 // 4))))
    (pool / "astronaut_q40.jpg").write_bytes(jpeg(a, 40))
    (pool / "astronaut_crop.jpg").write_bytes(jpeg(a.crop((8, 8, w - 8, h - 8))))
    run_ingest(IngestConfig(sources=(str(pool),), output=str(tmp_path / "ds"), workers=1))
    s = run_select(SelectConfig(source=str(tmp_path / "ds"), output=str(tmp_path / "d"), label="none",
                                dedupe="phash:10", threads=2))
    kept = {r["key"] for r in pq.read_table(tmp_path / "d" / "selection").to_pylist()}
    samples = {r["key"]: r["source"] for r in pq.read_table(tmp_path / "ds" / "samples").to_pylist()}
    assert sorted(samples[k] for k in kept) == sorted(f"{n}.jpg" for n in originals)  # one astronaut kept
    assert s.removed["near_duplicates_phash_10"] == 3
    # which duplicates were removed, and for which kept sample (duplicates.parquet)
    dups = pq.read_table(tmp_path / "d" / "duplicates.parquet").to_pylist()
    assert len(dups) == 3 and {d["rule"] for d in dups} == {"near"}
    assert sorted(samples[d["removed_key"]] for d in dups) == ["astronaut_crop.jpg", "astronaut_q40.jpg",
                                                               "astronaut_small.jpg"]
    assert {samples[d["kept_key"]] for d in dups} == {"astronaut.jpg"} and all(0 <= d["distance"] <= 10 for d in dups)
    # decontamination against an "eval set" holding only the chelsea photo, recompressed
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "cat.jpg").write_bytes(jpeg(originals["chelsea"], 50))
    run_ingest(IngestConfig(sources=(str(ref),), output=str(tmp_path / "eval"), workers=1))
    e = run_select(SelectConfig(source=str(tmp_path / "ds"), output=str(tmp_path / "e"), label="none",
                                exclude_near=str(tmp_path / "eval"), max_distance=10, threads=2))
    assert e.removed["near_reference"] == 1 and e.rows == 8
    ref_dups = pq.read_table(tmp_path / "e" / "duplicates.parquet").to_pylist()
    assert [(samples[d["removed_key"]], d["kept_key"], d["rule"]) for d in ref_dups] == [
        ("chelsea.jpg", None, "near_reference")]


def test_exact_dedupe_by_sha256(tmp_path):
    from silverlabel.demodata import photo_like_images
    from silverlabel.stages.ingest import IngestConfig, run_ingest

    folder = tmp_path / "imgs"
    folder.mkdir()
    images = list(photo_like_images(4, size=(120, 90), seed=8))
    for name, data in images:
        (folder / name).write_bytes(data)
    (folder / "zz_copy.jpg").write_bytes(images[1][1])  # the same bytes under another name
    run_ingest(IngestConfig(sources=(str(folder),), output=str(tmp_path / "ds"), workers=1))
    s = run_select(SelectConfig(source=str(tmp_path / "ds"), output=str(tmp_path / "s"), label="none",
                                dedupe="exact", threads=2))
    assert s.rows == 4 and s.removed["exact_duplicates"] == 1
    [dup] = pq.read_table(tmp_path / "s" / "duplicates.parquet").to_pylist()
    assert (dup["distance"], dup["rule"]) == (0, "exact") and dup["removed_key"] > dup["kept_key"]
    kept = {r["key"] for r in pq.read_table(tmp_path / "s" / "selection").to_pylist()}
    assert "000000004" not in kept  # the later key of the pair is the one removed


# ---------------------------------------------------------------------------------------
# paths and names are data, never SQL


def test_paths_with_quotes(tmp_path):
    """Input, output, uid list, keys file and reference hashes under folders named with an
    apostrophe and a double quote (the Ray engine: tests/test_select_sharded.py)."""
    root = tmp_path / "out" / "bob's \"pool\""
    root.mkdir(parents=True)
    path = root / "it's.parquet"
    _labels_table(path, [6, 5, 4])
    (root / "keys'.txt").write_text("10000\n10001\n10002\n10003\n")
    (root / "ref\".txt").write_text(f"{3:016x}\n")  # the pHash of id 10003
    s = run_select(SelectConfig(source=str(path), output=str(root / "sel'ected"), keys_file=str(root / "keys'.txt"),
                                exclude_near=str(root / "ref\".txt"), max_distance=0, dedupe="exact", threads=2))
    assert s.rows == 3 and s.removed["near_reference"] == 1
    assert (root / "sel'ected" / "duplicates.parquet").is_file()
    assert not (root / "sel'ected" / ".select-tmp").exists()


def test_crafted_manifest_cannot_inject_sql(tmp_path, monkeypatch):
    """A manifest whose labels name or label space carries SQL: refused with a UserError
    before anything is written, or (a legal folder name) read as a plain path."""
    import shutil

    from test_select_sharded import make_labeled_dataset, selection_content

    from silverlabel.cli import main
    from silverlabel.errors import UserError

    monkeypatch.chdir(tmp_path)
    ds = make_labeled_dataset(tmp_path / "src")
    run_select(SelectConfig(source=str(ds), output=str(tmp_path / "plain"), val_per_class=1, threads=1))
    man_path = ds / "silverlabel.json"
    man = json.loads(man_path.read_text())
    entry = man["labels"]["synthetic"]

    def craft(labels: dict) -> None:
        man_path.write_text(json.dumps({**man, "labels": labels}))

    before = {p for p in tmp_path.rglob("*")}
    for bad in ("x') TO '/tmp/pwned' --", "../synthetic", "..", "a\x00b"):
        craft({bad: entry})
        with pytest.raises(UserError, match="not a plain folder name"):
            run_select(SelectConfig(source=str(ds), output=str(tmp_path / "o"), threads=1))
    craft({"x'); COPY (SELECT 42) TO 'pwned.csv' --": entry})  # a legal folder name, but no such folder
    with pytest.raises(UserError, match="no labels files"):
        run_select(SelectConfig(source=str(ds), output=str(tmp_path / "o"), threads=1))
    craft({"synthetic": {"config": {"label_space": "in21k'); COPY (SELECT 42) TO 'pwned.csv' --"}}})
    with pytest.raises(UserError, match="unknown label space"):
        run_select(SelectConfig(source=str(ds), output=str(tmp_path / "o"), threads=1))
    with pytest.raises(UserError, match="--memory-limit"):
        run_select(SelectConfig(source=str(ds), output=str(tmp_path / "o"), threads=1,
                                memory_limit="1GB'; COPY (SELECT 42) TO 'pwned.csv' --"))
    craft({"x') TO '/tmp/pwned' --": entry})
    assert main(["select", str(ds), "-o", str(tmp_path / "o")]) == 2  # one line, exit code 2
    assert {p for p in tmp_path.rglob("*")} == before and not Path("/tmp/pwned").exists()
    # a name full of SQL that is a legal folder name is just a folder
    name = "x'); COPY (SELECT 42) TO 'pwned.csv' --"
    shutil.move(ds / "labels" / "synthetic", ds / "labels" / name)
    craft({name: entry})
    run_select(SelectConfig(source=str(ds), output=str(tmp_path / "crafted"), val_per_class=1, threads=1))
    assert selection_content(tmp_path / "crafted")[:3] == selection_content(tmp_path / "plain")[:3]
    assert not list(tmp_path.rglob("pwned*"))
