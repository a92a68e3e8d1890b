"""``silverlabel shard`` on real files: a small ingested dataset, a hand-written selection,
and the shards read back with webdataset, timm's wds reader and wids."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from silverlabel.dataset import dataset_identity, is_identity, parent_location
from silverlabel.demodata import photo_like_images
from silverlabel.formats.selection import SELECTION_SCHEMA
from silverlabel.formats.wds import iter_tar_samples, read_member
from silverlabel.stages.ingest import IngestConfig, run_ingest
from silverlabel.stages.shard import ShardConfig, even_lengths, run_shard

N_IMAGES = 40
N_CLASSES = 4


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "silverlabel.cli", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """40 generated photos ingested into 3 source shards (15, 15, 10)."""
    root = tmp_path_factory.mktemp("src")
    folder = root / "images"
    folder.mkdir()
    for name, data in photo_like_images(N_IMAGES, size=(96, 72), seed=3):
        (folder / name).write_bytes(data)
    out = root / "ds"
    summary = run_ingest(IngestConfig(sources=(str(folder),), output=str(out), samples_per_shard=15, workers=1))
    assert summary.counts == {"success": N_IMAGES} and summary.shards == 3
    return out


def _source_images(dataset: Path) -> dict[str, bytes]:
    out = {}
    for tar in sorted((dataset / "shards").glob("*.tar")):
        with open(tar, "rb") as f:
            for s in iter_tar_samples(str(tar)):
                out[s.key] = read_member(f, *s.members["jpg"])
    return out


def _write_selection(root: Path, rows: list[dict], stage: str = "select") -> Path:
    (root / "selection").mkdir(parents=True)
    half = len(rows) // 2
    for i, part in enumerate((rows[half:], rows[:half])):  # file order must not matter
        table = pa.Table.from_pylist(part, schema=SELECTION_SCHEMA)
        pq.write_table(table, root / "selection" / f"part-{i:05d}.parquet")
    classes = {"num_classes": N_CLASSES, "classes": [{"cls": c, "wnid": None, "name": f"class{c}"} for c in range(N_CLASSES)]}
    (root / "classes.json").write_text(json.dumps(classes, indent=2))
    (root / "silverlabel.json").write_text(json.dumps({"format_version": 1, "stage": stage}))
    return root


@pytest.fixture(scope="module")
def selection(tmp_path_factory, dataset):
    """Every 5th image in validation, the rest in train; image 7 selected twice (DataComp-style
    repeat: key '{source_key}-1'); captions on some."""
    samples = pq.read_table(dataset / "samples").to_pylist()
    rows = []
    for i, s in enumerate(samples):
        cls = i % N_CLASSES
        row = {
            "key": s["key"], "source_key": s["key"], "id": s["id"], "uid": s["uid"], "url": s["url"],
            "caption": f"photo {i}" if i % 3 == 0 else None,
            "split": "validation" if i % 5 == 0 else "train",
            "cls": cls, "class_name": f"class{cls}",
            "labels": [cls, (cls + 1) % N_CLASSES], "label_probs": [0.7, 0.1 + i / 1000],
            "width": s["width"], "height": s["height"], "imagehash": s["imagehash"],
            "source_dataset": str(dataset.resolve()), "source_shard": s["shard"],
        }
        rows.append(row)
        if i == 7:
            rows.append({**row, "key": f"{s['key']}-1"})
    return _write_selection(tmp_path_factory.mktemp("sel") / "mysel", rows)


@pytest.fixture(scope="module")
def selection_rows(selection):
    return {r["key"]: r for r in pq.read_table(selection / "selection").to_pylist()}


@pytest.fixture(scope="module")
def trainset(tmp_path_factory, selection):
    out = tmp_path_factory.mktemp("ts") / "trainset"
    summary = run_shard(ShardConfig(selection=str(selection), output=str(out), shards=3, workers=1))
    assert summary.shards_done_now == 6 and summary.shards_skipped == 0
    assert summary.splits["train"]["samples"] == 33 and summary.splits["validation"]["samples"] == 8
    return out


def _digest(root: Path) -> dict[str, str]:
    """sha256 of every file but the manifest (which records times), hidden ones included."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "silverlabel.json"}


def _tar_samples(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    out = []
    with open(path, "rb") as f:
        for s in iter_tar_samples(str(path)):
            out.append((s.key, {ext: read_member(f, *loc) for ext, loc in s.members.items()}))
    return out


def test_even_lengths():
    assert even_lengths(33, 3) == [11, 11, 11]
    assert even_lengths(8, 3) == [3, 3, 2]
    assert even_lengths(25, 3) == [9, 8, 8]
    assert sum(even_lengths(10_001, 7)) == 10_001 and max(even_lengths(10_001, 7)) - min(even_lengths(10_001, 7)) == 1


def test_layout_info_and_indexes(trainset, selection):
    info = json.loads((trainset / "_info.json").read_text())
    assert info["name"] == "mysel"
    assert list(info["splits"]) == ["train", "validation"]
    for split, n in (("train", 33), ("validation", 8)):
        si = info["splits"][split]
        assert si["name"] == split and si["num_samples"] == n
        assert si["filenames"] == [f"mysel-{split}-{i:04d}.tar" for i in range(3)]
        assert sum(si["shard_lengths"]) == n and max(si["shard_lengths"]) - min(si["shard_lengths"]) <= 1
        for name, length in zip(si["filenames"], si["shard_lengths"]):
            assert len(_tar_samples(trainset / name)) == length
        wids_index = json.loads((trainset / f"mysel-{split}.wids.json").read_text())
        assert wids_index["__kind__"] == "wids-shard-index-v1" and wids_index["wids_version"] == 1
        assert [s["url"] for s in wids_index["shardlist"]] == si["filenames"]
        assert [s["nsamples"] for s in wids_index["shardlist"]] == si["shard_lengths"]
        for s in wids_index["shardlist"]:
            data = (trainset / s["url"]).read_bytes()
            assert s["filesize"] == len(data) and s["md5sum"] == hashlib.md5(data).hexdigest()
    assert (trainset / "classes.json").read_bytes() == (selection / "classes.json").read_bytes()
    man = json.loads((trainset / "silverlabel.json").read_text())
    assert man["stage"] == "shard" and man["state"] == "complete"
    assert man["counts"] == {"train": 33, "validation": 8} and man["shards"] == {"train": 3, "validation": 3}
    assert not os.path.isabs(man["parents"][0]["location"])  # relative to the training set: moves with both
    assert parent_location(trainset, man["parents"][0]).resolve() == selection.resolve()
    assert man["parents"][0]["id"] == dataset_identity(selection) == man["config"]["selection"]  # not its path
    assert is_identity(man["id"]) and man["id"].startswith("trainset@")
    assert man["config"]["seed"] == 0 and man["config"]["shards"] == 3


def test_every_sample_once_bytes_copied_labels_right(trainset, dataset, selection_rows):
    src = _source_images(dataset)
    info = json.loads((trainset / "_info.json").read_text())
    seen = Counter()
    for split, si in info["splits"].items():
        for name in si["filenames"]:
            for key, members in _tar_samples(trainset / name):
                seen[key] += 1
                row = selection_rows[key]
                assert row["split"] == split
                assert list(members)[:3] == ["jpg", "cls", "json"]  # the member order
                assert members["jpg"] == src[row["source_key"]]  # copied, not re-encoded
                assert members["cls"] == str(row["cls"]).encode()
                meta = json.loads(members["json"])
                assert meta["label"] == row["cls"] and meta["class_name"] == row["class_name"]
                assert meta["labels"] == row["labels"]
                assert meta["label_probs"][0] == 0.7 and abs(meta["label_probs"][1] - row["label_probs"][1]) < 1e-6
                assert (meta["width"], meta["height"]) == (row["width"], row["height"])
                assert meta["source"] == {"key": row["source_key"], "uid": row["uid"], "id": row["id"], "url": row["url"],
                                          "dataset": row["source_dataset"], "shard": row["source_shard"]}
                assert members.get("txt") == (row["caption"].encode() if row["caption"] else None)
    assert seen == Counter({k: 1 for k in selection_rows})


def test_shuffled_not_in_key_order(trainset):
    info = json.loads((trainset / "_info.json").read_text())
    keys = [k for name in info["splits"]["train"]["filenames"] for k, _ in _tar_samples(trainset / name)]
    assert keys != sorted(keys)


def test_webdataset_reads_it(trainset, selection_rows):
    info = json.loads((trainset / "_info.json").read_text())
    urls = [str(trainset / n) for n in info["splits"]["train"]["filenames"]]
    got = [(key, int(cls)) for key, cls in wds.WebDataset(urls, shardshuffle=False).to_tuple("__key__", "cls")]
    assert len(got) == 33
    assert all(selection_rows[k]["cls"] == c for k, c in got)


def test_timm_wds_reader_reads_it(trainset):
    timm_data = pytest.importorskip("timm.data")
    info = json.loads((trainset / "_info.json").read_text())
    expected = [int(m["cls"]) for n in info["splits"]["train"]["filenames"] for _, m in _tar_samples(trainset / n)]
    ds = timm_data.create_dataset("wds/mysel", root=str(trainset), split="train")
    assert len(ds) == 33
    got = [(img.size, target) for img, target in ds]
    assert [t for _, t in got] == expected
    assert all(size[0] > 0 for size, _ in got)
    # the label from the json sidecar instead of .cls
    ds = timm_data.create_dataset("wds/mysel", root=str(trainset), split="validation", target_key="label")
    assert sorted(t for _, t in ds) == sorted(
        int(m["cls"]) for n in info["splits"]["validation"]["filenames"] for _, m in _tar_samples(trainset / n))


def test_wids_reads_the_index(trainset, tmp_path, monkeypatch):
    wids = pytest.importorskip("wids")
    monkeypatch.setenv("WIDS_CACHE", str(tmp_path / "cache"))
    ds = wids.ShardListDataset(str(trainset / "mysel-train.wids.json"), transformations=[])
    assert len(ds) == 33
    sample = ds[32]
    assert ".jpg" in sample and ".cls" in sample


def test_deterministic_and_independent_of_workers(tmp_path, selection, trainset):
    again = tmp_path / "again"
    s = run_shard(ShardConfig(selection=str(selection), output=str(again), shards=3, workers=2))
    assert s.shards_done_now == 6
    assert _digest(again) == _digest(trainset)
    other = tmp_path / "seed1"
    run_shard(ShardConfig(selection=str(selection), output=str(other), shards=3, seed=1, workers=1))
    assert _digest(other)["mysel-train-0000.tar"] != _digest(trainset)["mysel-train-0000.tar"]


def test_spooled_shards_are_identical(tmp_path, selection, trainset):
    out = tmp_path / "spooled"
    run_shard(ShardConfig(selection=str(selection), output=str(out), shards=3, workers=1, memory_limit=0))
    assert _digest(out) == _digest(trainset)
    assert not (out / ".tmp").exists()


def test_resume_redoes_only_missing_shards(tmp_path, selection, trainset):
    out = tmp_path / "resume"
    cfg = ShardConfig(selection=str(selection), output=str(out), shards=3, workers=1)
    run_shard(cfg)
    (out / "mysel-train-0001.tar").unlink()  # as if killed before the rename
    (out / "mysel-validation-0002.tar").write_bytes(b"garbage")  # a shard that does not match its record
    (out / "_info.json").unlink()
    (out / ".mysel-train-0000.tar.tmp-12345").write_bytes(b"half")  # a killed run's temporary
    s = run_shard(cfg)
    assert (s.shards_done_now, s.shards_skipped) == (2, 4)
    assert _digest(out) == _digest(trainset)
    s = run_shard(cfg)
    assert (s.shards_done_now, s.shards_skipped) == (0, 6)
    assert _digest(out) == _digest(trainset)


def test_resume_with_other_settings_is_refused(tmp_path, selection, trainset):
    with pytest.raises(ValueError, match="different settings.*seed"):
        run_shard(ShardConfig(selection=str(selection), output=str(trainset), shards=3, seed=5, workers=1))


def test_samples_per_shard_and_per_split_counts(tmp_path, selection):
    s = run_shard(ShardConfig(selection=str(selection), output=str(tmp_path / "a"), samples_per_shard=10, workers=1))
    assert s.splits["train"]["shard_lengths"] == [9, 8, 8, 8]  # ceil(33/10) = 4 shards
    assert s.splits["validation"]["shard_lengths"] == [8]
    s = run_shard(ShardConfig(selection=str(selection), output=str(tmp_path / "b"), shards={"train": 2},
                              samples_per_shard=5, name="x", template="{name}_{split}_{index:02d}.tar", workers=1))
    assert s.splits["train"]["filenames"] == ["x_train_00.tar", "x_train_01.tar"]
    assert s.splits["validation"]["shard_lengths"] == [4, 4]
    info = json.loads((tmp_path / "b" / "_info.json").read_text())
    assert info["name"] == "x" and info["splits"]["train"]["shard_lengths"] == [17, 16]


def test_bare_table_selection_names_ingest(tmp_path, selection_rows):
    rows = [{**r, "source_dataset": None, "source_shard": None, "url": f"http://img.example/{r['key']}.jpg"}
            for r in selection_rows.values()]
    sel = _write_selection(tmp_path / "bare", rows)
    p = _cli("shard", str(sel), "-o", str(tmp_path / "out"), check=False)
    assert p.returncode == 2
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in p.stderr
    assert f"silverlabel ingest {sel} -o DATASET" in err
    assert not (tmp_path / "out").exists()
    # ... and ingest takes the selection as its URL table
    from silverlabel.sources import SourceOptions, kind_of, open_source

    assert kind_of(str(sel)) == "table"
    items = list(open_source(str(sel), SourceOptions()).items())
    assert sorted((i.url, i.uid, i.caption) for i in items if i.error is None) == sorted(
        (r["url"], r["uid"], r["caption"]) for r in rows)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--shards", "2", "--samples-per-shard", "5"), "not both"),
        (("--template", "{name}-{split}.tar"), "must contain {index}"),
        (("--template", "{name}-{index}-{nope}.tar"), "--template"),
        (("--template", "{name}/{split}-{index}.tar"), "contain no '/'"),
        (("--shards", "train=x"), "not an integer"),
    ],
)
def test_bad_arguments_one_line(tmp_path, selection, args, message):
    p = _cli("shard", str(selection), "-o", str(tmp_path / "out"), *args, check=False)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr


def test_not_a_selection(tmp_path, dataset):
    p = _cli("shard", str(dataset), "-o", str(tmp_path / "out"), check=False)
    assert p.returncode == 2 and "not a selection" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_cli_help_and_run(tmp_path, selection):
    p = _cli("shard", "--help")
    assert "--samples-per-shard" in p.stdout and "examples:" in p.stdout
    out = tmp_path / "cli"
    p = _cli("shard", str(selection), "-o", str(out), "--samples-per-shard", "20", "--seed", "3", "--workers", "1",
             "--no-progress")
    assert "41 samples in 3 shards" in p.stdout and "wds/mysel" in p.stdout
    assert json.loads((out / "_info.json").read_text())["splits"]["train"]["shard_lengths"] == [17, 16]


def _count_reads(monkeypatch, path: Path) -> Counter:
    """Count the reads of ``path`` through silverlabel.dataset's reader (the real reader runs)."""
    from silverlabel import dataset as ds_mod

    reads: Counter = Counter()
    real = ds_mod.read_bytes

    def counting(p):
        reads[Path(p).resolve() == path.resolve()] += 1
        return real(p)

    monkeypatch.setattr(ds_mod, "read_bytes", counting)
    return reads


def test_the_selections_manifest_is_read_once(tmp_path, selection, trainset, monkeypatch):
    """shard reads the selection's manifest once and takes its files, its parents and its id
    from that one read (an output in a bucket: one request, not four)."""
    reads = _count_reads(monkeypatch, selection / "silverlabel.json")
    out = tmp_path / "once"
    run_shard(ShardConfig(selection=str(selection), output=str(out), shards=3, workers=1))
    assert reads[True] == 1
    assert _digest(out) == _digest(trainset)
    man, before = (json.loads((d / "silverlabel.json").read_text()) for d in (out, trainset))
    assert man["parents"] == before["parents"] and man["id"] == before["id"]
