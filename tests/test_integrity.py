"""Damaged and crafted inputs of label, select and shard (issue 13 items 4, 5, 18-23, 28):
every sample accounted for, every bad file named in one line, nothing lost.

One small real pool (12 photos in 2 ingest shards, labeled by the real default teacher on
the CPU) is made once; each test damages its own copy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from silverlabel.dataset import Dataset, TrainSet
from silverlabel.demodata import photo_like_images
from silverlabel.errors import UserError
from silverlabel.formats.wds import iter_tar_samples
from silverlabel.stages.ingest import IngestConfig, run_ingest
from silverlabel.stages.label import LabelConfig, run_label
from silverlabel.stages.select import SelectConfig, load_uids, run_select
from silverlabel.stages.shard import ShardConfig, run_shard

LABELS = "labels/efficientnet_lite0"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "silverlabel.cli", *args], capture_output=True, text=True,
                          timeout=300)


def _one_line_error(p: subprocess.CompletedProcess, *names: str) -> str:
    """The CLI's error: exit code 2, one line, no traceback, naming each of ``names``."""
    err = p.stderr.strip()
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for name in names:
        assert name in err, (name, err)
    return err


@pytest.fixture(scope="module")
def pools(tmp_path_factory) -> dict[str, Path]:
    """``plain``: 12 photos ingested into 2 shards of 6; ``labeled``: the same, labeled."""
    root = tmp_path_factory.mktemp("integrity")
    folder = root / "photos"
    folder.mkdir()
    for name, data in photo_like_images(12, size=(96, 72), seed=11):
        (folder / name).write_bytes(data)
    run_ingest(IngestConfig(sources=(str(folder),), output=str(root / "plain"), samples_per_shard=6, workers=1))
    shutil.copytree(root / "plain", root / "labeled")
    s = run_label(LabelConfig(dataset=str(root / "labeled"), device="cpu", decode_threads=1, topk=5))
    assert (s.rows, s.decode_errors) == (12, 0)
    return {"plain": root / "plain", "labeled": root / "labeled"}


def _copy(pool: Path, to: Path) -> Path:
    shutil.copytree(pool, to)
    return to


# -- item 4: a truncated tar loses no sample without a count --------------------------


def test_label_counts_samples_a_truncated_tar_lost(pools, tmp_path, capsys):
    ds = _copy(pools["plain"], tmp_path / "ds")
    tar = ds / "shards" / "data-000001.tar"
    os.truncate(tar, tar.stat().st_size // 4)
    s = run_label(LabelConfig(dataset=str(ds), device="cpu", decode_threads=1, topk=5))
    assert s.missing >= 2 and s.rows + s.decode_errors + s.missing == 12  # every success sample counted
    block = Dataset(ds).read_manifest()["labels"]["efficientnet_lite0"]
    assert (block["rows"], block["decode_errors"], block["missing"]) == (s.rows, s.decode_errors, s.missing)
    meta = pq.read_schema(ds / LABELS / "data-000001.parquet").metadata
    assert int(meta[b"silverlabel.missing"]) == s.missing
    from silverlabel.cli import main

    assert main(["label", "--stats", str(ds)]) == 0
    assert f"{s.missing} samples not labeled" in capsys.readouterr().out


# -- item 5: labels missing for a shard ------------------------------------------------


def test_select_refuses_a_dataset_with_a_labels_file_missing(pools, tmp_path):
    ds = _copy(pools["labeled"], tmp_path / "ds")
    (ds / LABELS / "data-000001.parquet").unlink()
    cfg = SelectConfig(str(ds), str(tmp_path / "sel"))
    with pytest.raises(UserError, match=r"no labels file for 1 of 2 shards \(data-000001\).*--allow-partial"):
        run_select(cfg)
    assert not (tmp_path / "sel").exists()
    p = _cli("select", str(ds), "-o", str(tmp_path / "sel"))
    _one_line_error(p, "data-000001", "--allow-partial")
    for per_shard in (False, True):  # the whole pool as one unit, or one unit per shard
        s = run_select(replace(cfg, allow_partial=True), per_shard=per_shard)
        assert s.rows == 6 and s.removed["no_labels_file"] == 6
        report = json.loads((tmp_path / "sel" / "report.json").read_text())
        assert report["missing_labels"] == {"labels": "efficientnet_lite0",
                                            "labels_files_missing": ["data-000001.parquet"], "labels_partial": False,
                                            "samples_without_labels_file": 6}


def test_select_refuses_labels_made_with_limit(pools, tmp_path):
    ds = _copy(pools["plain"], tmp_path / "ds")
    run_label(LabelConfig(dataset=str(ds), device="cpu", decode_threads=1, topk=5, limit=8))
    cfg = SelectConfig(str(ds), str(tmp_path / "sel"))
    with pytest.raises(UserError, match=r"--limit \(partial\).*--allow-partial"):
        run_select(cfg)
    s = run_select(replace(cfg, allow_partial=True))
    assert s.rows == 8
    assert json.loads((tmp_path / "sel" / "report.json").read_text())["missing_labels"]["labels_partial"] is True


# -- item 19: damaged parquet ----------------------------------------------------------


@pytest.mark.parametrize("damaged", ["samples/data-000001.parquet", f"{LABELS}/data-000000.parquet"])
def test_select_names_a_truncated_parquet(pools, tmp_path, damaged):
    ds = _copy(pools["labeled"], tmp_path / "ds")
    f = ds / damaged
    os.truncate(f, f.stat().st_size // 2)
    p = _cli("select", str(ds), "-o", str(tmp_path / "sel"))
    _one_line_error(p, str(f), "not a readable parquet file")
    assert not (tmp_path / "sel").exists()


def test_select_names_a_parquet_damaged_past_its_footer(pools, tmp_path):
    """The footer reads, a page does not: DuckDB's text names no file; the error does."""
    ds = _copy(pools["labeled"], tmp_path / "ds")
    f = ds / "samples" / "data-000001.parquet"
    data, footer = bytearray(f.read_bytes()), pq.read_metadata(f).serialized_size + 8
    data[4:len(data) - footer] = b"\x07" * (len(data) - footer - 4)
    f.write_bytes(bytes(data))
    _one_line_error(_cli("select", str(ds), "-o", str(tmp_path / "sel")), str(f), "not a readable parquet file")
    assert not (tmp_path / "sel" / ".select-tmp").exists() and not (tmp_path / "sel" / "silverlabel.json").exists()


def test_select_names_a_truncated_file_of_a_bare_table(pools, tmp_path):
    table = tmp_path / "table"
    table.mkdir()
    for i, f in enumerate(sorted((pools["plain"] / "samples").glob("*.parquet"))):
        shutil.copy(f, table / f"part-{i}.parquet")  # a bare table with a uid column
    os.truncate(table / "part-1.parquet", 100)
    _one_line_error(_cli("select", str(table), "-o", str(tmp_path / "sel")), str(table / "part-1.parquet"))


# -- item 20: the manifest reader ------------------------------------------------------


@pytest.mark.parametrize("manifest, message", [
    ({"format_version": 99, "stage": "ingest"}, "format_version 99"),
    ([], "not a silverlabel manifest"),
    ({"stage": "ingest"}, "format_version None"),
])
def test_manifest_of_another_version_or_shape_is_refused(pools, tmp_path, manifest, message):
    ds = _copy(pools["labeled"], tmp_path / "ds")
    (ds / "silverlabel.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=message):
        Dataset(ds).read_manifest()
    _one_line_error(_cli("select", str(ds), "-o", str(tmp_path / "sel")), str(ds / "silverlabel.json"), message)
    _one_line_error(_cli("label", "--stats", str(ds)), message)


# -- item 21: uid lists ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["f8,f8", "u4,u4", "i8,i8"])
def test_lossy_uid_dtypes_are_refused(tmp_path, dtype):
    path = str(tmp_path / "uids.npy")
    np.save(path, np.zeros(3, dtype=np.dtype(dtype)))
    with pytest.raises(UserError, match=r"uids.npy: .*\('u8', 'u8'\).*not " + re.escape(str(np.dtype(dtype)))):
        load_uids(path)


def test_u8_uids_are_read(tmp_path):
    path = str(tmp_path / "uids.npy")
    np.save(path, np.array([(1, 2), (3, 4)], dtype=np.dtype("u8,u8")))
    assert load_uids(path).column("uid").to_pylist() == [f"{1:016x}{2:016x}", f"{3:016x}{4:016x}"]
    np.save(path, np.zeros((2, 2), dtype=np.dtype("u8,u8")))  # 2-d: not a list
    with pytest.raises(UserError, match="1-d"):
        load_uids(path)


# -- item 22: --keys-file names that match nothing -------------------------------------


@pytest.mark.parametrize("per_shard", [False, True])
def test_keys_file_names_not_found_are_reported(pools, tmp_path, per_shard):
    keys = pq.read_table(pools["plain"] / "samples", columns=["key"]).column("key").to_pylist()
    listed = tmp_path / "keys.txt"
    listed.write_text("\n".join([keys[0], keys[7], keys[11], "nope-1", "nope-2"]) + "\n")
    cfg = SelectConfig(str(pools["plain"]), str(tmp_path / "sel"), keys_file=str(listed))
    s = run_select(cfg, per_shard=per_shard)
    assert s.rows == 3 and s.removed["keys_not_found"] == 2
    report = json.loads((tmp_path / "sel" / "report.json").read_text())
    assert report["keys_file"] == {"names": 5, "found": 3, "not_found": 2, "not_found_examples": ["nope-1", "nope-2"]}
    p = _cli("select", str(pools["plain"]), "-o", str(tmp_path / "sel2"), "--keys-file", str(listed))
    assert p.returncode == 0 and "2  keys not found" in p.stdout, p.stdout


# -- items 18 and 23: shard ------------------------------------------------------------


@pytest.fixture
def selected(pools, tmp_path) -> tuple[Path, Path]:
    """(a copy of the plain pool, a selection of all of it)."""
    ds = _copy(pools["plain"], tmp_path / "ds")
    run_select(SelectConfig(str(ds), str(tmp_path / "sel")))
    return ds, tmp_path / "sel"


def test_shard_refuses_an_unknown_split(selected, tmp_path):
    _ds, sel = selected
    p = _cli("shard", str(sel), "-o", str(tmp_path / "ts"), "--shards", "train=2,foo=3")
    _one_line_error(p, "--shards foo=3", "'foo'", "has: train")
    assert not (tmp_path / "ts").exists()


def test_shard_refuses_a_bit_flipped_source_tar(selected, tmp_path):
    ds, sel = selected
    tar = ds / "shards" / "data-000001.tar"
    offset, size = next(iter_tar_samples(str(tar))).members["jpg"]
    with open(tar, "r+b") as f:  # one bit of a stored JPEG, size unchanged
        f.seek(offset + size // 2)
        b = f.read(1)
        f.seek(offset + size // 2)
        f.write(bytes([b[0] ^ 0x10]))
    with pytest.raises(UserError, match=f"{tar}: corrupt source shard: its md5"):
        run_shard(ShardConfig(selection=str(sel), output=str(tmp_path / "ts"), shards=2, workers=1))
    assert not list((tmp_path / "ts").glob("*.tar"))
    _one_line_error(_cli("shard", str(sel), "-o", str(tmp_path / "ts2")), str(tar), "corrupt source shard")


def test_shard_refuses_a_truncated_source_tar(selected, tmp_path):
    ds, sel = selected
    tar = ds / "shards" / "data-000000.tar"
    os.truncate(tar, tar.stat().st_size - 512)
    p = _cli("shard", str(sel), "-o", str(tmp_path / "ts"))
    _one_line_error(p, str(tar), "corrupt source shard", "ingest recorded")
    assert not (tmp_path / "ts").exists() or not list((tmp_path / "ts").glob("*.tar"))


def test_shard_copies_an_intact_pool(selected, tmp_path):
    _ds, sel = selected
    s = run_shard(ShardConfig(selection=str(sel), output=str(tmp_path / "ts"), shards=2, workers=1))
    assert s.samples == 12 and s.shards_done_now == 2


# -- item 28: _info.json and label --stats name the file -------------------------------


@pytest.mark.parametrize("info, message", [
    ([], "not a shard list"),
    ({"splits": []}, "not a shard list"),
    ({"splits": {"train": {}}}, "split 'train' has no 'filenames' list"),
    ({"splits": {"train": {"filenames": ["../../x.tar"], "shard_lengths": [1]}}}, "not a plain file name"),
    ({"splits": {"train": {"filenames": ["a.tar"], "shard_lengths": []}}}, "'shard_lengths' must be 1 counts"),
])
def test_info_json_errors_name_the_file(tmp_path, info, message):
    ts = TrainSet(tmp_path)
    ts.info_path.write_text(json.dumps(info))
    with pytest.raises(UserError, match=message) as e:
        ts.split("train")
    assert str(e.value).startswith(f"{ts.info_path}: ")
    ts.info_path.write_text("{nope")
    with pytest.raises(UserError, match=f"{ts.info_path}: corrupt JSON"):
        ts.read_info()


def test_label_stats_names_a_truncated_labels_file(pools, tmp_path):
    ds = _copy(pools["labeled"], tmp_path / "ds")
    f = ds / LABELS / "data-000001.parquet"
    os.truncate(f, f.stat().st_size // 2)
    _one_line_error(_cli("label", "--stats", str(ds)), str(f), "not a readable parquet file")


def test_card_names_a_truncated_parquet(pools, tmp_path):
    """Item 19 for card: a truncated samples or labels table is one line naming it."""
    ds = _copy(pools["labeled"], tmp_path / "ds")
    f = sorted((ds / "samples").glob("*.parquet"))[-1]
    os.truncate(f, f.stat().st_size // 2)
    _one_line_error(_cli("card", str(ds), "--no-plots"), str(f), "not a readable parquet file")


def test_class_rules_on_a_pool_without_labels_are_refused(tmp_path):
    """``select --top-classes 3`` on an unlabeled pool exited 0 with "0 classes" (issue 17)."""
    import io

    from PIL import Image

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(4):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
        (imgs / f"{i}.jpg").write_bytes(buf.getvalue())
    run_ingest(IngestConfig(sources=(str(imgs),), output=str(tmp_path / "pool"), workers=1))
    for kw in ({"top_classes": 3}, {"val_per_class": 1}, {"min_prob": 0.5}):
        with pytest.raises(UserError, match="has no labels"):
            run_select(SelectConfig(source=str(tmp_path / "pool"), output=str(tmp_path / "sel"), **kw))
    assert not (tmp_path / "sel").exists()
    assert run_select(SelectConfig(source=str(tmp_path / "pool"), output=str(tmp_path / "sel"))).rows == 4
