"""Every stage writes to a bucket as it writes to disk (issue 16, the output side).

Real parts: moto's S3 server on loopback (as tests/test_remote_inputs.py runs it), reached by
s3fs through botocore's ``AWS_ENDPOINT_URL`` with made-up credentials from the standard
environment variables; a loopback HTTP server serving real JPEGs; the real default teacher
on the CPU; real tars and parquet. The pipeline ingest -> label -> select -> shard runs once
on local disk and once with every output in ``s3://BUCKET/...``: every file must be the same,
byte for byte (the manifests less ``updated``), no credential may reach any output, the
training set in the bucket must read back with webdataset (a ``pipe:`` URL) and timm's wds
reader, and ``verify`` must pass on the bucket. A unit killed after uploading part of its
files but before its commit record leaves nothing a rerun trusts: the rerun gives the same
bucket, object for object.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from httpserver import MisbehavingServer

from silverlabel import fs as sfs
from silverlabel.demodata import photo_like_images

pytest.importorskip("s3fs")
pytest.importorskip("moto.moto_server.werkzeug_app")
from s3server import s3_bucket  # noqa: E402  (the same loopback S3 server)

KEY_ID = "AKIASILVERLABELOUT01"
SECRET = "s3cr3t-Out-Kx81-never-written"
BUCKET = "silver-outputs"
IMAGES = 10


@pytest.fixture(scope="module")
def s3():
    with s3_bucket(BUCKET, KEY_ID, SECRET) as server:
        yield server


@pytest.fixture(scope="module")
def table_url(s3, tmp_path_factory):
    """A URL table in the bucket whose images a loopback HTTP server serves."""
    with MisbehavingServer() as server:
        urls = [server.add(f"/img/{name}", data) for name, data in photo_like_images(IMAGES, size=(160, 120), seed=3)]
        urls.append(server.url("/status/404"))  # a failed download: a row, no image
        base = tmp_path_factory.mktemp("table")
        pq.write_table(pa.table({"url": urls, "caption": [f"photo {i}" for i in range(len(urls))]}),
                       base / "urls.parquet")
        s3.fs.put_file(str(base / "urls.parquet"), f"{BUCKET}/in/urls.parquet")
        s3.fs.invalidate_cache()
        yield f"s3://{BUCKET}/in/urls.parquet"


def _ingest_cfg(source: str, out: str, **kw):
    from silverlabel.sources.http import FetchConfig
    from silverlabel.stages.ingest import IngestConfig

    return IngestConfig(sources=(source,), output=out, samples_per_shard=4, workers=1, threads=4,
                        fetch=FetchConfig(allow_private_network=True, retries=0), **kw)


def _pipeline(table: str, base: str) -> dict[str, str]:
    """ingest -> label -> select -> shard with outputs under ``base`` (a folder or a URL)."""
    from silverlabel.stages.ingest import run_ingest
    from silverlabel.stages.label import LabelConfig, run_label
    from silverlabel.stages.select import SelectConfig, run_select
    from silverlabel.stages.shard import ShardConfig, run_shard

    out = {k: f"{base}/{k}" for k in ("pool", "sel", "trainset")}
    run_ingest(_ingest_cfg(table, out["pool"]))
    run_label(LabelConfig(dataset=out["pool"], device="cpu", decode_threads=1, batch_size=4, topk=5, label_space="in1k",
                          workers=1))
    run_select(SelectConfig(out["pool"], out["sel"], val_per_class=0))
    run_shard(ShardConfig(selection=out["sel"], output=out["trainset"], shards=2, workers=1))
    return out


def _local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def _bucket_files(s3, url: str) -> dict[str, bytes]:
    s3.fs.invalidate_cache()
    prefix = url[len("s3://"):]
    return {k[len(prefix) + 1:]: s3.fs.cat_file(k) for k in sorted(s3.fs.find(prefix))}


def _comparable(files: dict[str, bytes]) -> dict[str, bytes]:
    """Manifests less their ``updated`` time; every other file as it is."""
    out = {}
    for name, data in files.items():
        if name.endswith("silverlabel.json"):
            doc = json.loads(data)
            doc.pop("updated", None)
            data = json.dumps(doc, sort_keys=True).encode()
        out[name] = data
    return out


@pytest.fixture(scope="module")
def both(s3, table_url, tmp_path_factory):
    """The pipeline on local disk and in the bucket, from the same URL table."""
    local = tmp_path_factory.mktemp("local")
    _pipeline(table_url, str(local))
    remote = _pipeline(table_url, f"s3://{BUCKET}/run")
    return local, remote


def test_bucket_outputs_are_the_local_outputs_byte_for_byte(s3, both):
    local, remote = both
    for name in ("pool", "sel", "trainset"):
        here = _comparable(_local_files(local / name))
        there = _comparable(_bucket_files(s3, remote[name]))
        assert sorted(there) == sorted(here), name
        for rel in here:
            assert there[rel] == here[rel], f"{name}/{rel} differs"
    # what each holds, so the comparison is not of two empty folders
    pool = _bucket_files(s3, remote["pool"])
    assert sum(n.startswith("shards/") for n in pool) == 3 and sum(n.startswith("samples/") for n in pool) == 3
    assert sum(n.startswith("labels/efficientnet_lite0/") and n.endswith(".parquet") for n in pool) == 3
    man = json.loads(pool["silverlabel.json"])
    assert man["state"] == "complete" and man["counts"]["success"] == IMAGES
    assert "efficientnet_lite0" in man["labels"]
    ts = _bucket_files(s3, remote["trainset"])
    assert {"_info.json", "classes.json", "silverlabel.json"} <= set(ts)
    assert sum(n.endswith(".tar") and "/" not in n for n in ts) == 2


def test_nothing_records_where_or_with_what_credentials(s3, both):
    local, remote = both
    for name in ("pool", "sel", "trainset"):
        for rel, data in _bucket_files(s3, remote[name]).items():
            for secret in (KEY_ID, SECRET, "silverlabel-staging", str(local), "127.0.0.1:" + s3.endpoint.rsplit(":", 1)[1]):
                assert secret.encode() not in data, f"{secret} in {name}/{rel}"
    sel = json.loads(_bucket_files(s3, remote["sel"])["silverlabel.json"])
    assert sel["parents"][0]["location"] == "../pool"  # relative, as on disk


def test_webdataset_and_timm_read_the_bucket(s3, both, tmp_path):
    wds = pytest.importorskip("webdataset")
    _local, remote = both
    info = json.loads(s3.fs.cat_file(remote["trainset"][len("s3://"):] + "/_info.json"))
    names = info["splits"]["train"]["filenames"]
    # webdataset straight from the bucket, through pipe: URLs (the credentials from the environment)
    cat = "import s3fs, sys; sys.stdout.buffer.write(s3fs.S3FileSystem().cat_file(sys.argv[1]))"
    urls = [f"pipe:{shlex.quote(sys.executable)} -c {shlex.quote(cat)} "
            f"{shlex.quote(remote['trainset'][len('s3://'):] + '/' + n)}" for n in names]
    got = list(wds.WebDataset(urls, shardshuffle=False).to_tuple("__key__", "jpg", "cls"))
    assert len(got) == info["splits"]["train"]["num_samples"] == IMAGES
    assert all(jpg[:2] == b"\xff\xd8" and int(cls) >= 0 for _k, jpg, cls in got)
    # timm's wds reader, on the objects copied down
    timm_data = pytest.importorskip("timm.data")
    down = tmp_path / "trainset"
    down.mkdir()
    for rel, data in _bucket_files(s3, remote["trainset"]).items():
        if "/" not in rel:
            (down / rel).write_bytes(data)
    ds = timm_data.create_dataset(f"wds/{info['name']}", root=str(down), split="train")
    assert len(ds) == IMAGES
    assert sorted(t for _img, t in ds) == sorted(int(cls) for _k, _j, cls in got)


def test_verify_reads_the_bucket(s3, both):
    from silverlabel.verify import VerifyConfig, verify

    _local, remote = both
    for name in ("pool", "sel", "trainset"):
        report = verify(VerifyConfig(remote[name]))
        assert report.ok, (name, report.problems)
    # a damaged object is found
    key = remote["trainset"][len("s3://"):] + "/" + json.loads(
        s3.fs.cat_file(remote["trainset"][len("s3://"):] + "/_info.json"))["splits"]["train"]["filenames"][0]
    good = s3.fs.cat_file(key)
    try:
        s3.fs.pipe_file(key, good[:-1024])
        s3.fs.invalidate_cache()
        sfs.forget()
        report = verify(VerifyConfig(remote["trainset"]))
        assert not report.ok and any(p.kind == "corrupt" for p in report.problems)
    finally:
        s3.fs.pipe_file(key, good)
        s3.fs.invalidate_cache()


def test_a_unit_killed_before_its_record_is_redone(s3, both, table_url, monkeypatch):
    """A unit dies after uploading its tar (and, in one case, its samples table) but before
    its commit record: nothing of it is trusted, the rerun redoes it and the bucket ends as
    a clean run leaves it, with no stray or duplicate object."""
    import silverlabel.stage as stage_mod
    from silverlabel.stages.ingest import run_ingest

    url = f"s3://{BUCKET}/killed/pool"
    real_write = stage_mod.Commit.write
    calls = {"n": 0}

    def dying_write(self, outputs, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the second shard: both files are in the bucket, its record never is
            raise KeyboardInterrupt("killed before the record")
        return real_write(self, outputs, *a, **kw)

    monkeypatch.setattr(stage_mod.Commit, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run_ingest(_ingest_cfg(table_url, url))
    monkeypatch.setattr(stage_mod.Commit, "write", real_write)
    partial = _bucket_files(s3, url)
    assert "shards/data-000001.tar" in partial and ".done/data-000001.json" not in partial
    assert ".done/data-000000.json" in partial
    s = run_ingest(_ingest_cfg(table_url, url))
    assert s.shards_skipped == 1 and s.shards_done_now == 2
    _local, remote = both
    clean = {k: v for k, v in _comparable(_bucket_files(s3, remote["pool"])).items() if not k.startswith("labels/")}
    clean.pop("silverlabel.json")
    again = _comparable(_bucket_files(s3, url))
    man = json.loads(again.pop("silverlabel.json"))
    assert again == clean
    assert man["counts"]["success"] == IMAGES


def test_resume_needs_only_the_bucket(s3, both, table_url):
    """A rerun in a fresh process (another machine: no staging folder) finds every unit done
    from the bucket alone and rewrites nothing but the manifest."""
    import subprocess

    _local, remote = both
    before = _bucket_files(s3, remote["pool"])
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_remote_outputs as t; "
            "from silverlabel.stages.ingest import run_ingest; "
            "s = run_ingest(t._ingest_cfg(sys.argv[2], sys.argv[3])); print(s.shards_done_now, s.shards_skipped)")
    p = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), "s3://" + BUCKET + "/in/urls.parquet",
                        remote["pool"]], capture_output=True, text=True, env=os.environ.copy(), timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["0", "3"]
    after = _bucket_files(s3, remote["pool"])
    assert sorted(after) == sorted(before)
    assert all(after[k] == before[k] for k in before if k != "silverlabel.json")


_KILLER = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import silverlabel.stage as stage_mod
import test_remote_outputs as t

real = stage_mod.Commit.write
calls = [0]

def write(self, outputs, *a, **kw):
    calls[0] += 1
    if calls[0] == int(sys.argv[2]):  # this unit's files are in the bucket; SIGKILL before its record
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, outputs, *a, **kw)

stage_mod.Commit.write = write
stage, src, out = sys.argv[3:6]
if stage == "ingest":
    from silverlabel.stages.ingest import run_ingest
    run_ingest(t._ingest_cfg(src, out))
else:
    from silverlabel.stages.shard import ShardConfig, run_shard
    run_shard(ShardConfig(selection=src, output=out, shards=2, workers=1))
"""


def _killed(stage: str, src: str, out: str, at: int, tmp: Path) -> None:
    import signal
    import subprocess

    env = {**os.environ, "TMPDIR": str(tmp)}  # the killed process's staging folder stays there
    p = subprocess.run([sys.executable, "-c", _KILLER, str(Path(__file__).parent), str(at), stage, src, out],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]


def _without_manifest(files: dict[str, bytes]) -> tuple[dict[str, bytes], dict]:
    files = dict(files)
    man = json.loads(files.pop("silverlabel.json"))
    for k in ("updated",):
        man.pop(k, None)
    for p in man.get("parents") or []:
        p.pop("location", None)
    return files, man


def test_sigkill_mid_shard_then_rerun_is_identical(s3, both, tmp_path):
    """shard SIGKILLed after the second tar is uploaded, before its record: the rerun (a new
    process) redoes exactly that tar and the training set equals the clean one."""
    from silverlabel.stages.shard import ShardConfig, run_shard

    _local, remote = both
    out = f"s3://{BUCKET}/killed/trainset"
    _killed("shard", remote["sel"], out, at=2, tmp=tmp_path)
    partial = _bucket_files(s3, out)
    assert ".done/sel-train-0000.tar.json" in partial and ".done/sel-train-0001.tar.json" not in partial
    assert "sel-train-0001.tar" in partial and "_info.json" not in partial  # uploaded, not trusted
    s = run_shard(ShardConfig(selection=remote["sel"], output=out, shards=2, workers=1))
    assert (s.shards_done_now, s.shards_skipped) == (1, 1)
    got, man = _without_manifest(_bucket_files(s3, out))
    want, want_man = _without_manifest(_bucket_files(s3, remote["trainset"]))
    assert sorted(got) == sorted(want) and all(got[k] == want[k] for k in want)
    assert man == want_man


def test_sigkill_mid_ingest_then_rerun_is_identical(s3, both, table_url, tmp_path):
    from silverlabel.stages.ingest import run_ingest

    _local, remote = both
    out = f"s3://{BUCKET}/killed-ingest/pool"
    _killed("ingest", table_url, out, at=3, tmp=tmp_path)
    partial = _bucket_files(s3, out)
    assert "shards/data-000002.tar" in partial and ".done/data-000002.json" not in partial
    s = run_ingest(_ingest_cfg(table_url, out))
    assert (s.shards_done_now, s.shards_skipped) == (1, 2)
    got, man = _without_manifest(_bucket_files(s3, out))
    want, want_man = _without_manifest(_bucket_files(s3, remote["pool"]))
    want = {k: v for k, v in want.items() if not k.startswith("labels/")}
    want_man.pop("labels")
    assert sorted(got) == sorted(want) and all(got[k] == want[k] for k in want)
    assert man == want_man


@pytest.mark.slow
def test_ray_two_nodes_write_the_bucket_directly(s3, both, table_url, tmp_path_factory):
    """ingest, label (actors) and shard on a two-node Ray cluster with every output in the
    bucket: each task stages in its own node's temporary folder (the nodes get another
    TMPDIR than the driver) and publishes its unit itself; the result equals the local
    engine's, object for object."""
    ray = pytest.importorskip("ray")
    from test_engine_ray import LocalCluster

    from silverlabel.stages.ingest import run_ingest
    from silverlabel.stages.label import LabelConfig, run_label
    from silverlabel.stages.select import SelectConfig, run_select
    from silverlabel.stages.shard import ShardConfig, run_shard

    node_tmp = tmp_path_factory.mktemp("node-tmp")
    saved = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(node_tmp)  # the nodes' temporary folder (this driver's is fixed already)
    try:
        cluster = LocalCluster(tmp_path_factory.mktemp("raycluster"))
    finally:
        if saved is None:
            os.environ.pop("TMPDIR")
        else:
            os.environ["TMPDIR"] = saved
    try:
        base = f"s3://{BUCKET}/ray"
        run_ingest(replace(_ingest_cfg(table_url, f"{base}/pool"), workers=2, engine="ray",
                           ray_address=cluster.address))
        run_label(LabelConfig(dataset=f"{base}/pool", device="cpu", decode_threads=1, batch_size=4, topk=5, label_space="in1k",
                              workers=2, engine="ray", ray_address=cluster.address))
        run_select(SelectConfig(f"{base}/pool", f"{base}/sel", val_per_class=0))
        run_shard(ShardConfig(selection=f"{base}/sel", output=f"{base}/trainset", shards=2, workers=2, engine="ray",
                              ray_address=cluster.address))
    finally:
        cluster.stop()
    # the teacher's probabilities differ in the last float bits between a Ray actor (one
    # thread) and this process (the local engine's threads): labels are compared with a
    # tolerance, every other byte exactly
    import io
    import tarfile

    import numpy as np

    _local, remote = both
    for name in ("pool", "sel", "trainset"):
        got, _man = _without_manifest(_bucket_files(s3, f"{base}/{name}"))
        want, _want_man = _without_manifest(_bucket_files(s3, remote[name]))
        assert sorted(got) == sorted(want), name
        for k in want:
            if got[k] == want[k]:
                continue
            assert name != "pool" or k.startswith("labels/"), k  # ingest's files: byte for byte
            if k.endswith(".parquet"):
                a, b = pq.read_table(io.BytesIO(got[k])), pq.read_table(io.BytesIO(want[k]))
                assert a.drop(["label_probs"]).equals(b.drop(["label_probs"])), k
                assert np.allclose(np.array(a.column("label_probs").to_pylist(), float),
                                   np.array(b.column("label_probs").to_pylist(), float), atol=1e-5), k
            elif k.endswith(".tar"):
                ta, tb = (tarfile.open(fileobj=io.BytesIO(x)) for x in (got[k], want[k]))
                ma, mb = ta.getmembers(), tb.getmembers()
                assert [m.name for m in ma] == [m.name for m in mb], k
                for x, y in zip(ma, mb):
                    if not x.name.endswith(".json"):
                        assert ta.extractfile(x).read() == tb.extractfile(y).read(), (k, x.name)
            else:
                # records and wids indexes of those files: their md5s
                assert k.startswith(".done/") or "/.done/" in k or k.endswith(".wids.json"), k
    assert any(p.name.startswith("silverlabel-staging-") for p in node_tmp.iterdir())  # the nodes staged there


def test_retry_failed_on_a_bucket_pool(s3, tmp_path):
    """``--retry-failed`` re-fetches a failed download of a pool in the bucket: the shard's
    earlier rows and images are read back from the store, and the shard is republished."""
    from silverlabel.stages.ingest import run_ingest

    with MisbehavingServer() as server:
        (name, data), = photo_like_images(1, size=(160, 120), seed=9)
        urls = [server.add(f"/img/{name}", data), server.url("/flaky/b.jpg")]  # 500 first, then a JPEG
        pq.write_table(pa.table({"url": urls}), tmp_path / "urls.parquet")
        out = f"s3://{BUCKET}/retry/pool"
        first = run_ingest(_ingest_cfg(str(tmp_path / "urls.parquet"), out))
        assert first.counts == {"success": 1, "failed_download": 1}
        again = run_ingest(replace(_ingest_cfg(str(tmp_path / "urls.parquet"), out), retry_failed=True))
        assert again.counts == {"success": 2} and again.shards_done_now == 1
        assert server.hits[f"/img/{name}"] == 1  # the image that was there is not fetched again
    files = _bucket_files(s3, out)
    keys = [k for k, _ in _tar_members(files["shards/data-000000.tar"])]
    assert keys == ["000000000.jpg", "000000000.json", "000000001.jpg", "000000001.json"]


def _tar_members(data: bytes) -> list[tuple[str, bytes]]:
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers()]


def test_file_urls_and_plain_paths_stay_local(s3, table_url, tmp_path):
    from silverlabel.stages.ingest import run_ingest

    run_ingest(_ingest_cfg(table_url, f"file://{tmp_path}/pool"))
    assert (tmp_path / "pool" / "silverlabel.json").is_file() and (tmp_path / "pool" / ".done").is_dir()
    assert not Path("file:").exists()


def test_cli_shard_and_verify_take_bucket_urls(s3, both, capsys):
    from silverlabel.cli import main as cli_main

    _local, remote = both
    out = f"s3://{BUCKET}/cli/trainset"
    assert cli_main(["shard", remote["sel"], "-o", out, "--shards", "2", "--workers", "1", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert f"training set: {out}" in text and "s3:/" + BUCKET not in text  # the URL, not a ./s3: path
    got, man = _without_manifest(_bucket_files(s3, out))
    want, want_man = _without_manifest(_bucket_files(s3, remote["trainset"]))
    assert got == want and man == want_man
    capsys.readouterr()
    assert cli_main(["verify", out]) == 0
    text = capsys.readouterr().out
    assert "all good" in text and out in text and "silverlabel-staging" not in text
    assert not Path("s3:").exists()
    # the label stats of a pool in the bucket read its labels files there: the local pool's table
    assert cli_main(["label", str(_local / "pool"), "--stats"]) == 0
    here = capsys.readouterr().out
    assert cli_main(["label", remote["pool"], "--stats"]) == 0
    there = capsys.readouterr().out
    assert there == here and " 0 images" not in there, there


def test_select_per_shard_units_read_key_tables_from_the_bucket(s3, both, tmp_path):
    """select with pool-wide rules (``--dedupe``, ``--keys-file``) and one unit per shard in
    worker processes: the key tables go through the bucket (a unit on any node reads them),
    the selection equals the same run on disk, and no temporary object is left."""
    from silverlabel.stages.select import SelectConfig, run_select

    local, remote = both
    keys = pq.read_table(local / "pool" / "samples").column("key").to_pylist()[:7]
    (tmp_path / "keys.txt").write_text("\n".join(keys) + "\n")
    opts = dict(dedupe="exact", keys_file=str(tmp_path / "keys.txt"), val_per_class=0)
    run_select(SelectConfig(str(local / "pool"), str(tmp_path / "sel"), **opts), workers=2, per_shard=True)
    out = f"s3://{BUCKET}/keyed/sel"
    s = run_select(SelectConfig(remote["pool"], out, **opts), workers=2, per_shard=True)
    assert s.rows == 7 and s.removed["not_in_keys_file"] == IMAGES - 7
    here, man_here = _without_manifest(_local_files(tmp_path / "sel"))  # the pool lies elsewhere relative to it
    there, man_there = _without_manifest(_bucket_files(s3, out))
    assert sorted(there) == sorted(here) and [k for k in here if there[k] != here[k]] == []
    assert man_there == man_here
    assert not any(".select-tmp" in k for k in there)


def test_worker_processes_publish_their_own_units(s3, both, table_url):
    """ingest and shard with two worker processes: each stages in its own folder and
    publishes its units; the bucket ends as the in-process run left it."""
    from silverlabel.stages.ingest import run_ingest
    from silverlabel.stages.shard import ShardConfig, run_shard

    _local, remote = both
    pool, ts = f"s3://{BUCKET}/w2/pool", f"s3://{BUCKET}/w2/trainset"
    run_ingest(replace(_ingest_cfg(table_url, pool), workers=2))
    run_shard(ShardConfig(selection=remote["sel"], output=ts, shards=2, workers=2))
    got, man = _without_manifest(_bucket_files(s3, pool))
    want, want_man = _without_manifest(_bucket_files(s3, remote["pool"]))
    want = {k: v for k, v in want.items() if not k.startswith("labels/")}
    want_man.pop("labels")
    assert got == want and man == want_man
    got, man = _without_manifest(_bucket_files(s3, ts))
    want, want_man = _without_manifest(_bucket_files(s3, remote["trainset"]))
    assert got == want and man == want_man


def test_logs_name_public_urls_only(s3, table_url, caplog):
    """At debug level, what a run on the bucket logs names the public URL, never a
    credential or a staging folder."""
    import logging

    from silverlabel.stages.ingest import run_ingest

    with caplog.at_level(logging.DEBUG, logger="silverlabel"):
        s = run_ingest(_ingest_cfg(table_url, f"s3://{BUCKET}/logged/pool"))
    assert s.output == f"s3://{BUCKET}/logged/pool"
    assert f"s3://{BUCKET}/logged/pool: running on" in caplog.text
    for secret in (KEY_ID, SECRET, "silverlabel-staging"):
        assert secret not in caplog.text


def test_unwritable_urls_are_one_line_errors(table_url, tmp_path):
    from silverlabel.errors import UserError
    from silverlabel.stages.ingest import run_ingest
    from silverlabel.stages.select import SelectConfig, run_select

    for out in ("https://u:pw@host.example/pool", "pipe:cat > x.tar"):
        with pytest.raises(UserError, match="cannot be written") as e:
            run_ingest(_ingest_cfg(table_url, out))
        assert "pw@" not in str(e.value)
    with pytest.raises(UserError, match="cannot be written"):
        run_select(SelectConfig(str(tmp_path), "https://host.example/sel"))


def test_a_killed_process_staging_folder_is_removed_by_the_next(tmp_path):
    """A SIGKILLed run cannot remove its staging folder; the next process that stages in
    the same temporary folder removes the folders of processes that are gone."""
    import subprocess

    code = ("import os, signal; from silverlabel.dataset import stage_path; "
            "p = stage_path('s3://bucket/pool/x.tar'); p.parent.mkdir(parents=True); p.write_bytes(b'x' * 1000); "
            "print(p, flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    left = Path(p.stdout.strip())
    assert left.is_file()
    code = "from silverlabel.dataset import stage_path; print(stage_path('s3://bucket/pool'))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert not left.exists()
    assert [d.name.startswith("silverlabel-staging-") for d in tmp_path.iterdir()] == []  # its own: gone at exit


def test_reinforce_reads_and_writes_the_bucket(s3, both):
    """reinforce from a training set in the bucket to the bucket: the same bytes as on disk."""
    from silverlabel.stages.reinforce import ReinforceConfig, run_reinforce
    from silverlabel.teachers import TeacherSpec

    local, remote = both
    kw = dict(teachers=(TeacherSpec("efficientnet_lite0"),), augs=2, topk=5, device="cpu", workers=1)
    run_reinforce(ReinforceConfig(trainset=str(local / "trainset"), output=str(local / "rnf"), **kw))
    out = f"s3://{BUCKET}/run/rnf"
    run_reinforce(ReinforceConfig(trainset=remote["trainset"], output=out, **kw))
    assert _comparable(_bucket_files(s3, out)) == _comparable(_local_files(local / "rnf"))
    assert not Path("s3:").exists()


# ---------------------------------------------------------------------------------------
# train, eval, card on the bucket (issue 16: the remaining stages)


@pytest.fixture(scope="module")
def toy(s3, tmp_path_factory):
    """The tiny training set of tests/test_train.py on disk and, the same files, in the bucket."""
    from test_train import _write_trainset

    local = _write_trainset(tmp_path_factory.mktemp("toy") / "trainset")
    url = f"s3://{BUCKET}/toy/trainset"
    for p in sorted(local.iterdir()):
        s3.fs.put_file(str(p), f"{url[len('s3://'):]}/{p.name}")
    s3.fs.invalidate_cache()
    return local, url


def _train_cfg(trainset, out, **kw):
    from test_train import _cfg

    return _cfg(trainset, out, **{"steps": 6, "ckpt_every": 2, "ema_decay": 0.9, "loss": "soft-topk", **kw})


def _jsonl_losses(data: bytes) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, data.decode().splitlines())]


def _no_secrets(s3, files: dict[str, bytes], tmp_path) -> None:
    for name, data in files.items():
        for secret in (KEY_ID, SECRET, s3.endpoint, "silverlabel-staging", str(tmp_path)):
            assert secret.encode() not in data, (name, secret)


@pytest.fixture(scope="module")
def trained(s3, toy, tmp_path_factory):
    """The same run on disk (from the set on disk) and in the bucket (from the set there)."""
    from silverlabel.stages.train import run_train

    local_ts, url_ts = toy
    local = tmp_path_factory.mktemp("runs") / "run"
    here = run_train(_train_cfg(str(local_ts), local), progress=False)
    out = f"s3://{BUCKET}/toy/runs/full"
    there = run_train(_train_cfg(url_ts, out), progress=False)
    return local, out, here, there


def test_train_reads_and_writes_the_bucket(s3, trained, tmp_path):
    """train from the training set in the bucket to a run in the bucket: the losses, the
    stored config and the final weights are those of the same run on disk; the run holds
    checkpoints, both metrics files and the TensorBoard events, and no endpoint, credential
    or staging path."""
    import torch

    local, out, here, there = trained
    assert there.output == out and there.checkpoint == f"{out}/checkpoint-final.pt"
    assert there.losses == here.losses and len(here.losses) == 6
    files = _bucket_files(s3, out)
    assert {"checkpoint.pt", "checkpoint-final.pt", "metrics.jsonl", "metrics.csv"} <= set(files)
    assert any(n.startswith("tb/events.out.tfevents.") for n in files) and ".lock" not in files
    assert _jsonl_losses(files["metrics.jsonl"]) == here.losses
    assert files["metrics.csv"].count(b"\n") == 7
    import io

    for name in ("checkpoint.pt", "checkpoint-final.pt"):
        a = torch.load(local / name, weights_only=True)
        b = torch.load(io.BytesIO(files[name]), weights_only=True)
        assert a["config"] == b["config"] and a["id"] == b["id"] and a["step"] == b["step"]
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), k
            assert torch.equal(a["ema"][k], b["ema"][k]), k
    _no_secrets(s3, files, local.parent)
    assert not Path("s3:").exists()


def test_train_resumes_from_the_bucket_alone(s3, toy, tmp_path):
    """A run in the bucket stopped at step 3 is resumed by a fresh process with an empty
    staging folder (another TMPDIR): it ends with the uninterrupted run's losses and weights."""
    import io
    import subprocess

    import torch

    from silverlabel.stages.train import run_train

    _local_ts, url_ts = toy
    full, part = f"s3://{BUCKET}/toy/runs/r-full", f"s3://{BUCKET}/toy/runs/r-part"
    want = run_train(_train_cfg(url_ts, full), progress=False)
    run_train(_train_cfg(url_ts, part), stop_after=3, progress=False)
    assert "checkpoint-final.pt" not in _bucket_files(s3, part)
    code = ("import sys; sys.path.insert(0, 'tests'); import json, test_remote_outputs as t; "
            "from silverlabel.stages.train import run_train; "
            f"s = run_train(t._train_cfg({url_ts!r}, {part!r}), resume=True, progress=False); "
            "print(json.dumps([s.start_step, s.steps]))")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                       cwd=Path(__file__).parent.parent)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == [3, 6]
    a, b = _bucket_files(s3, full), _bucket_files(s3, part)
    assert _jsonl_losses(b["metrics.jsonl"]) == _jsonl_losses(a["metrics.jsonl"]) == want.losses
    ca = torch.load(io.BytesIO(a["checkpoint-final.pt"]), weights_only=True)
    cb = torch.load(io.BytesIO(b["checkpoint-final.pt"]), weights_only=True)
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    # TensorBoard: the two processes' event files in the bucket read as the full run's
    from test_train import _tb_losses

    for name, files in (("full", a), ("part", b)):
        for k, v in files.items():
            if k.startswith("tb/"):
                (tmp_path / name / k).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / name / k).write_bytes(v)
    assert sum(k.startswith("tb/") for k in b) == 2
    assert _tb_losses(tmp_path / "part") == _tb_losses(tmp_path / "full")
    assert [s for s, _ in _tb_losses(tmp_path / "full")] == [s for s, _ in want.losses]
    assert list(tmp.iterdir()) == []  # the resuming process's staging folder: gone with it


def test_eval_of_the_bucket_run_is_eval_of_the_local_run(s3, toy, trained, tmp_path):
    """eval of the run in the bucket on the set in the bucket writes its report into the run
    (or to --out at a URL): the report of the local run on the local set, less the time."""
    from silverlabel.stages.evaluate import EvalConfig, run_eval

    local_ts, url_ts = toy
    local, out, _here, _there = trained
    kw = dict(split="train", batch_size=8, device="cpu", ema=True)
    a = run_eval(EvalConfig(str(local), trainset=str(local_ts), **kw))
    b = run_eval(EvalConfig(out, trainset=url_ts, **kw))
    c = run_eval(EvalConfig(f"{out}/checkpoint.pt", trainset=url_ts, out=f"s3://{BUCKET}/toy/reports/e.json", **kw))
    assert b["output"] == f"{out}/eval-train.json" and c["output"] == f"s3://{BUCKET}/toy/reports/e.json"
    assert b["paths"] == {"run": out, "checkpoint": f"{out}/checkpoint-final.pt", "trainset": url_ts}
    assert a["run"].startswith("run@sha256:") and a["weights"] == "ema" and a["counts"]["samples"] == 48

    def timeless(doc):
        return {k: v for k, v in doc.items() if k not in ("seconds", "output", "paths", "checkpoint")}

    assert timeless(b) == timeless(a) and a["checkpoint"] == b["checkpoint"]
    assert timeless(c) == timeless(a) and c["checkpoint"].startswith("checkpoint.pt@sha256:")
    files = _bucket_files(s3, out)
    stored = json.loads(files["eval-train.json"])
    want = json.loads((local / "eval-train.json").read_text())
    assert {k: v for k, v in stored.items() if k != "seconds"} == {k: v for k, v in want.items() if k != "seconds"}
    _no_secrets(s3, {**files, "e.json": _bucket_files(s3, f"s3://{BUCKET}/toy/reports")["e.json"]}, local.parent)
    assert not Path("s3:").exists()


def _timeless(files: dict[str, bytes]) -> dict[str, bytes]:
    """The card's text files less the manifests' ``updated`` times it quotes (the two
    pipelines ran seconds apart)."""
    import re

    when = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}")
    return {k: when.sub(b"TIME", v) if k.endswith((".md", ".json")) else v for k, v in files.items()}


def test_card_on_a_bucket_dataset_writes_what_it_writes_on_disk(s3, both, tmp_path):
    """card on the training set, selection and pool in the bucket writes README.md and
    card/ into each: the same files as card on the same datasets on disk (copies, so the
    pipeline's outputs stay as the other tests compare them)."""
    import shutil

    from silverlabel.stages.card import CardConfig, run_card

    local, remote = both
    base = remote["pool"].rsplit("/", 1)[0]
    for name in ("pool", "sel", "trainset"):
        shutil.copytree(local / name, tmp_path / name, ignore=shutil.ignore_patterns(".lock"))
        s3.fs.copy(f"{base[len('s3://'):]}/{name}", f"{BUCKET}/card/{name}", recursive=True)
    s3.fs.invalidate_cache()
    for name in ("trainset", "sel", "pool"):
        url = f"s3://{BUCKET}/card/{name}"
        before = set(_bucket_files(s3, url))
        a = run_card(CardConfig(str(tmp_path / name), threads=1, html=str(tmp_path / "html" / f"{name}-disk")))
        b = run_card(CardConfig(url, threads=1, html=str(tmp_path / "html" / name)))
        assert b.thumbnails == a.thumbnails > 0  # the report's thumbnails: read from the bucket's tars by range
        assert _local_files(tmp_path / "html" / name) == _local_files(tmp_path / "html" / f"{name}-disk")
        assert b.readme == f"{url}/README.md" and a.kind == b.kind and a.samples == b.samples > 0
        assert all(p.startswith(f"{url}/card/") for p in b.plots) and len(b.plots) == len(a.plots) > 0
        files = _bucket_files(s3, url)
        written = {k: v for k, v in files.items() if k not in before}
        assert set(written) == {"README.md", "card/card.json", *(p[len(url) + 1:] for p in b.plots)}
        want = _local_files(tmp_path / name)
        assert _timeless(written) == _timeless({k: want[k] for k in written}), name  # PNGs included
        _no_secrets(s3, written, tmp_path)
    assert not Path("s3:").exists()


def test_lowshot_reads_and_writes_the_bucket(s3, toy, trained):
    """eval --lowshot of the bucket run on the bucket set into the bucket (probe and a short
    fine-tune): the report of the local run on the local set, less the time; the subset,
    backbone and fine-tuning run lie in the bucket."""
    from silverlabel.stages.lowshot import LowShotConfig, run_lowshot

    local_ts, url_ts = toy
    local, out, _here, _there = trained
    kw = dict(fractions=(0.5,), val_split="train", ft_steps=2, ft_lr=1e-3, batch_size=16, probe_iters=20, device="cpu")
    a = run_lowshot(LowShotConfig(str(local), str(local_ts), out=str(local.parent / "ls"), **kw), log=lambda *x: None)
    there = f"s3://{BUCKET}/toy/ls"
    b = run_lowshot(LowShotConfig(out, url_ts, out=there, **kw), log=lambda *x: None)
    assert b["output"] == f"{there}/lowshot.json" and b["paths"]["trainset"] == url_ts

    def timeless(doc):
        return {k: v for k, v in doc.items() if k not in ("seconds", "output", "paths")}

    assert timeless(b) == timeless(a) and a["results"]["50pct"]["finetune"]["top1"] is not None
    files = _bucket_files(s3, there)
    assert {"lowshot.json", "init.pt", "subset-50pct/_info.json", "finetune-50pct/checkpoint-final.pt",
            "finetune-50pct/eval-train.json", "finetune-50pct/lowshot-run.json"} <= set(files)
    assert timeless(json.loads(files["lowshot.json"])) == timeless(json.loads((local.parent / "ls" / "lowshot.json")
                                                                            .read_bytes()))
    _no_secrets(s3, files, local.parent)
    assert not Path("s3:").exists()


def test_the_loader_streams_the_bucket_set_in_worker_processes(s3, toy):
    """The loader over the set in the bucket with two worker processes yields the batches
    (pixels, targets, keys) it yields over the set on disk; the shards are read by ranged
    GETs (streamed: none is fetched whole into a file)."""
    import torch

    from silverlabel.loader import LoaderConfig, create_loader

    local_ts, url_ts = toy
    kw = dict(batch_size=8, img_size=32, seed=1, return_keys=True)
    want = list(create_loader(LoaderConfig(str(local_ts), **kw), epoch=1, start_step=2))
    s3.fs.invalidate_cache()
    seen = len(s3.requests)
    got = list(create_loader(LoaderConfig(url_ts, num_workers=2, **kw), epoch=1, start_step=2))
    assert len(got) == len(want) == 4
    tars = [r for r in s3.requests[seen:] if r[0] == "GET" and r[1].endswith(".tar")]
    assert tars and all(r[2] is not None and r[2].startswith("bytes=") for r in tars)
    for a, b in zip(want, got):
        assert a[4] == b[4]
        for x, y in zip(a[:4], b[:4]):
            assert torch.equal(x, y)


def test_train_init_from_the_bucket_is_named_as_on_disk(s3, toy, trained, tmp_path):
    """--init from a checkpoint in the bucket: the weights and the run's id are those of
    --init from the same file on disk (the file is named by its bytes, not by where it is)."""
    import io

    import torch

    from silverlabel.stages.train import run_train

    local_ts, url_ts = toy
    local, out, _here, _there = trained
    a = run_train(_train_cfg(str(local_ts), tmp_path / "ft", init=str(local / "checkpoint-final.pt"), steps=1),
                  progress=False)
    b = run_train(_train_cfg(url_ts, f"s3://{BUCKET}/toy/runs/ft", init=f"{out}/checkpoint-final.pt", steps=1),
                  progress=False)
    assert a.losses == b.losses
    ca = torch.load(tmp_path / "ft" / "checkpoint-final.pt", weights_only=True)
    cb = torch.load(io.BytesIO(_bucket_files(s3, f"s3://{BUCKET}/toy/runs/ft")["checkpoint-final.pt"]),
                    weights_only=True)
    assert ca["config"]["init"] == cb["config"]["init"]
    assert ca["config"]["init"].startswith("checkpoint-final.pt@sha256:")
    assert ca["id"] == cb["id"]


def test_train_eval_card_errors_at_urls_name_the_public_url(s3, toy, tmp_path):
    """A training set, run or dataset that is not in the bucket, and an HTML report asked
    into one: one-line errors naming the public URL, never a staging folder."""
    from silverlabel.errors import UserError
    from silverlabel.stages.card import CardConfig, run_card
    from silverlabel.stages.evaluate import EvalConfig, run_eval
    from silverlabel.stages.train import run_train

    _local_ts, url_ts = toy
    missing = f"s3://{BUCKET}/toy/nothing-here"
    cases = [(lambda: run_train(_train_cfg(missing, str(tmp_path / "r")), progress=False), FileNotFoundError),
             (lambda: run_eval(EvalConfig(missing, trainset=url_ts, device="cpu")), FileNotFoundError),
             (lambda: run_card(CardConfig(missing)), FileNotFoundError),
             (lambda: run_card(CardConfig(url_ts, html=f"s3://{BUCKET}/toy/html")), UserError)]
    for call, kind in cases:
        with pytest.raises(kind) as e:
            call()
        text = str(e.value)
        assert f"s3://{BUCKET}/toy/" in text and "silverlabel-staging" not in text and "\n" not in text, text


def test_the_loader_replays_a_reinforced_set_in_the_bucket(s3, tmp_path):
    """--loss kd's loader over a reinforced set in the bucket (the files reinforce wrote on
    disk, uploaded): the samples, stored augmentations replayed with their mix partners, and
    teacher top-k of the set on disk."""
    import torch
    from test_reinforce import _cfg as _rnf_cfg
    from test_reinforce import _plain
    from toy_trainset import write_toy_trainset

    from silverlabel.loader import LoaderConfig, ShardStream
    from silverlabel.stages.reinforce import run_reinforce

    ts = write_toy_trainset(tmp_path / "ts", {"train": [6, 6]}, _plain, size=(96, 72), seed=5,
                            classes={"num_classes": 4, "label_space": "top1"})
    run_reinforce(_rnf_cfg(ts, tmp_path / "rnf", augs=2, embeddings=False))
    url = f"s3://{BUCKET}/toy/rnf"
    for p in sorted((tmp_path / "rnf").iterdir()):
        if p.is_file() and not p.name.startswith("."):
            s3.fs.put_file(str(p), f"{url[len('s3://'):]}/{p.name}")
    s3.fs.invalidate_cache()
    for kw in (dict(kd_aug="sequential"), dict(p_reinforced=0.5)):
        for epoch in (0, 1):
            cfgs = [LoaderConfig(root, batch_size=4, img_size=40, kd=True, return_keys=True, **kw)
                    for root in (str(tmp_path / "rnf"), url)]
            want, got = (list(ShardStream(c, epoch).samples()) for c in cfgs)
            assert len(want) == len(got) == 12
            for a, b in zip(want, got):
                assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
