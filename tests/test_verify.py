"""silverlabel verify: a pool, a selection, a training set and a run, whole and then damaged."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from silverlabel.cli import main
from silverlabel.demodata import photo_like_images
from silverlabel.verify import VerifyConfig, verify

QUIET = ["--no-progress"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A pool (3 shards, labeled by the default teacher), a selection, a training set, a run."""
    root = tmp_path_factory.mktemp("verify")
    for i, (name, data) in enumerate(photo_like_images(12, size=(64, 48), seed=4)):
        (root / "imgs" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (root / "imgs" / f"c{i % 2}" / name).write_bytes(data)
    assert main(["ingest", str(root / "imgs"), "-o", str(root / "pool"), "--workers", "1", "--samples-per-shard", "4",
                 *QUIET]) == 0
    assert main(["label", str(root / "pool"), "--workers", "1", "--device", "cpu", "--topk", "5", *QUIET]) == 0
    assert main(["select", str(root / "pool"), "-o", str(root / "sel"), "--label", "source"]) == 0
    assert main(["shard", str(root / "sel"), "-o", str(root / "ts"), "--workers", "1", "--shards", "2", *QUIET]) == 0
    assert main(["train", str(root / "ts"), "-o", str(root / "run"), "--model", "test_vit", "--img-size", "32",
                 "--batch-size", "4", "--steps", "1", "--no-tensorboard", *QUIET]) == 0
    return root


def _kinds(report):
    return sorted({(p.kind, p.path.rsplit("/", 1)[-1]) for p in report.problems})


@pytest.mark.parametrize("what,kind", [("pool", "pool"), ("sel", "selection"), ("ts", "trainset"), ("run", "run")])
def test_a_whole_chain_is_all_good(chain, capsys, what, kind):
    assert main(["verify", str(chain / what)]) == 0
    out = capsys.readouterr().out
    assert f"{kind} {chain / what}" in out and "all good" in out
    assert main(["verify", str(chain / what), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["problems"] == [] and doc["kind"] == kind


def test_a_damaged_pool(chain, tmp_path, capsys):
    pool = tmp_path / "pool"
    shutil.copytree(chain / "pool", pool)
    # a flipped byte in one tar (size unchanged), a samples table gone, a labels file short of a row
    tar0 = pool / "shards" / "data-000000.tar"
    data = bytearray(tar0.read_bytes())
    data[1024 + 700] ^= 0xFF
    tar0.write_bytes(bytes(data))
    (pool / "samples" / "data-000001.parquet").unlink()
    labels = next((pool / "labels").iterdir())
    lab2 = labels / "data-000002.parquet"
    table = pq.read_table(lab2)
    pq.write_table(table.slice(1), lab2)
    r = verify(VerifyConfig(str(pool)))
    assert not r.ok
    assert _kinds(r) == [("corrupt", "data-000000.tar"), ("corrupt", "data-000002.parquet"),
                         ("count", "silverlabel.json"),  # its counts include the lost table's rows
                         ("coverage", "data-000002.parquet"), ("missing", "data-000001.parquet")]
    # sizes only: the flipped byte goes unseen
    assert ("corrupt", "data-000000.tar") not in _kinds(verify(VerifyConfig(str(pool), hashes=False)))
    assert main(["verify", str(pool), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert not doc["ok"] and {p["kind"] for p in doc["problems"]} == {"corrupt", "count", "coverage", "missing"}


def test_labels_made_from_an_older_shard_are_stale(chain, tmp_path):
    pool = tmp_path / "pool"
    shutil.copytree(chain / "pool", pool)
    # what ingest --retry-failed does to a shard: new tar bytes, and a record saying so
    tar = pool / "shards" / "data-000001.tar"
    tar.write_bytes(tar.read_bytes() + b"\0" * 1024)
    rec_path = pool / ".done" / "data-000001.json"
    rec = json.loads(rec_path.read_text())
    from silverlabel.dataset import file_digest

    rec["outputs"]["shards/data-000001.tar"] = {"bytes": tar.stat().st_size, "md5": file_digest(tar, "md5")}
    rec_path.write_text(json.dumps(rec))
    r = verify(VerifyConfig(str(pool)))
    assert _kinds(r) == [("stale", "data-000001.parquet")]


def test_an_unfinished_ingest(chain, tmp_path):
    pool = tmp_path / "pool"
    shutil.copytree(chain / "pool", pool)
    man = json.loads((pool / "silverlabel.json").read_text())
    (pool / "silverlabel.json").write_text(json.dumps({**man, "state": "running"}))
    assert _kinds(verify(VerifyConfig(str(pool)))) == [("unrecorded", "silverlabel.json")]


def test_a_damaged_trainset_and_a_changed_selection(chain, tmp_path):
    sel, ts = tmp_path / "sel", tmp_path / "ts"
    shutil.copytree(chain / "sel", sel)
    (tmp_path / "pool").symlink_to(chain / "pool")  # the pool where the selection's manifest says: ../pool
    assert main(["shard", str(sel), "-o", str(ts), "--workers", "1", "--shards", "2", *QUIET]) == 0
    assert verify(VerifyConfig(str(ts))).ok
    tars = sorted(ts.glob("*.tar"))
    tars[0].unlink()
    info = json.loads((ts / "_info.json").read_text())
    info["splits"]["train"]["shard_lengths"][1] += 1
    (ts / "_info.json").write_text(json.dumps(info))
    part = sorted((sel / "selection").glob("*.parquet"))[0]
    pq.write_table(pq.read_table(part).slice(1), part)
    r = verify(VerifyConfig(str(ts)))
    assert _kinds(r) == sorted([("missing", tars[0].name), ("stale", "ts"), ("count", tars[1].name)])
    rs = verify(VerifyConfig(str(sel)))
    assert [p.kind for p in rs.problems] == ["count"]  # rows no longer what the manifest says


def test_a_run_with_a_damaged_checkpoint(chain, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(chain / "run", run)
    ck = run / "checkpoint-final.pt"
    ck.write_bytes(ck.read_bytes()[:100])
    assert main(["verify", str(run)]) == 1
    out = capsys.readouterr().out
    assert "corrupt" in out and "checkpoint-final.pt" in out


def test_not_a_dataset(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 2
    assert "not a silverlabel dataset or run" in capsys.readouterr().err


def test_a_selection_is_verified_from_one_read_of_its_manifest(chain, monkeypatch):
    """verify reads the selection's manifest once: its files and parents come from that read."""
    from pathlib import Path

    from silverlabel import dataset as ds_mod

    manifest = (chain / "sel" / "silverlabel.json").resolve()
    reads = []
    real = ds_mod.read_bytes

    def counting(p):
        reads.append(Path(p).resolve() == manifest)
        return real(p)

    monkeypatch.setattr(ds_mod, "read_bytes", counting)
    report = verify(VerifyConfig(str(chain / "sel")))
    assert report.ok and report.checked["files"] >= 1
    assert reads.count(True) == 1
