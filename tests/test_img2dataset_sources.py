"""img2dataset's own outputs, written by img2dataset itself, ingested as they are.

img2dataset runs as a subprocess from its own venv (``make img2dataset-env`` builds
``bench/.venv-img2dataset``; ``SILVERLABEL_IMG2DATASET_PYTHON`` names another interpreter),
downloading from a loopback server; ingesting its output must then make no HTTP request.
Without that venv these tests skip, except under CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from httpserver import MisbehavingServer, sample_jpeg
from PIL import Image
from rangeserver import RangeServer

from silverlabel.cli import main as cli_main
from silverlabel.formats.wds import ShardWriter, iter_tar_samples, read_member
from silverlabel.sources import SourceOptions, kind_of, load_bytes, open_source
from silverlabel.sources.tables import read_cell

ROOT = Path(__file__).resolve().parents[1]
I2D_VENV_PYTHON = ROOT / "bench" / ".venv-img2dataset" / "bin" / "python"
FORMATS = ("webdataset", "parquet", "files")
#: (width, height) of the served photos; img2dataset shrinks their short side to 64 px
SIZES = [(150 + 13 * i, 100 + 7 * i) for i in range(7)]

# one interpreter run writes all three formats (img2dataset's import costs seconds)
_RUNNER = """
import json, sys
from img2dataset import download
for cfg in json.loads(sys.argv[1]):
    download(**cfg)
"""


def _i2d_python() -> str:
    explicit = os.environ.get("SILVERLABEL_IMG2DATASET_PYTHON")
    if explicit:
        return explicit
    if I2D_VENV_PYTHON.exists():
        return str(I2D_VENV_PYTHON)
    if os.environ.get("CI"):
        pytest.fail(f"{I2D_VENV_PYTHON} is missing: `make test` builds it (make img2dataset-env)")
    pytest.skip("img2dataset's venv is not built (make img2dataset-env)")


@pytest.fixture(scope="module")
def i2d(tmp_path_factory):
    """img2dataset's three output formats of 8 URLs (7 photos, one 404), 4 per shard."""
    py = _i2d_python()
    base = tmp_path_factory.mktemp("img2dataset")
    with MisbehavingServer() as server:
        photos = {f"/photo{i}.jpg": sample_jpeg(w, h, seed=i) for i, (w, h) in enumerate(SIZES)}
        urls = [server.add(path, data) for path, data in photos.items()] + [server.url("/status/404")]
        captions = [f"a photo, number {i}" for i in range(len(urls))]
        pq.write_table(pa.table({"url": urls, "caption": captions, "score": [i / 10 for i in range(len(urls))]}),
                       base / "urls.parquet")
        configs = [dict(url_list=str(base / "urls.parquet"), input_format="parquet", url_col="url",
                        caption_col="caption", save_additional_columns=["score"], output_folder=str(base / fmt),
                        output_format=fmt, processes_count=1, thread_count=2, distributor="multiprocessing",
                        number_sample_per_shard=4, image_size=64, resize_mode="keep_ratio", timeout=10, retries=0,
                        enable_wandb=False, compute_hash="sha256") for fmt in FORMATS]
        env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", "WANDB_SILENT": "true",
               "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        env.pop("PYTHONPATH", None)
        p = subprocess.run([py, "-c", _RUNNER, json.dumps(configs)], capture_output=True, text=True, env=env,
                           timeout=240, cwd=base)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
        # img2dataset really downloaded: every URL once per format
        assert all(server.hits[path] == len(FORMATS) for path in photos), dict(server.hits)
        assert server.hits["/status/404"] == len(FORMATS)
        yield SimpleNamespace(base=base, server=server, urls=urls, captions=captions, photos=photos)


def _rows(pool: Path) -> list[dict]:
    files = sorted(glob.glob(str(pool / "samples" / "*.parquet")))
    return [r for f in files for r in pq.read_table(f).to_pylist()]


def _i2d_metadata(folder: Path) -> dict[str, dict]:
    """img2dataset's own record of each key, read straight from its metadata parquet."""
    out = {}
    for f in sorted(folder.glob("*.parquet")):
        cols = [c for c in pq.read_schema(f).names if c != "jpg"]
        out.update({r["key"]: r for r in pq.read_table(f, columns=cols).to_pylist()})
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_img2dataset_output_is_ingested_as_it_is_with_no_request(i2d, fmt, tmp_path):
    out = i2d.base / fmt
    assert kind_of(str(out)) == "img2dataset"
    requests_before = len(i2d.server.requests)
    pool = tmp_path / "pool"
    assert cli_main(["ingest", str(out), "-o", str(pool), "--workers", "1", "--threads", "4", "--no-progress",
                     "--allow-private-network", "--retries", "0", "--keep-cols", "score"]) == 0
    assert len(i2d.server.requests) == requests_before  # not one URL fetched again

    meta = _i2d_metadata(out)
    rows = _rows(pool)
    assert len(rows) == len(meta) == len(i2d.urls)  # the failed row is a row too
    by_key = {r["source_key"]: r for r in rows}
    assert set(by_key) == set(meta)
    for key, m in meta.items():
        r = by_key[key]
        assert (r["url"], r["caption"], r["score"]) == (m["url"], m["caption"], m["score"])
        assert r["source_status"] == m["status"] and r["source_sha256"] == m["sha256"]
        assert (r["source_original_width"], r["source_original_height"]) == (m["original_width"], m["original_height"])
        if m["status"] != "success":
            assert m["url"].endswith("/status/404")
            assert r["status"] == "source_failed_to_download" and "404" in r["error"]
            continue
        assert r["status"] == "success", r["error"]
        # img2dataset's hash is of the bytes the server sent; silverlabel's of the image it stores
        served = i2d.photos[m["url"].split(str(i2d.server.port), 1)[1]]
        assert m["sha256"] == hashlib.sha256(served).hexdigest()
        assert (r["source_original_width"], r["source_original_height"]) == Image.open(io.BytesIO(served)).size
        assert min(r["width"], r["height"]) == 64 and (r["width"], r["height"]) == (m["width"], m["height"])
        assert r["sha256"] != r["source_sha256"]
    assert sum(r["status"] == "success" for r in rows) == len(i2d.photos)

    # the stored images are img2dataset's (decodable, its size) and the shard .json carries its metadata
    stored = {}
    for tar in sorted((pool / "shards").glob("*.tar")):
        with open(tar, "rb") as f:
            for s in iter_tar_samples(str(tar)):
                stored[s.key] = json.loads(read_member(f, *s.members["json"]))
                assert Image.open(io.BytesIO(read_member(f, *s.members["jpg"]))).size == (
                    stored[s.key]["width"], stored[s.key]["height"])
    assert {m["source_key"] for m in stored.values()} == {k for k, m in meta.items() if m["status"] == "success"}
    assert all(m["source_sha256"] == meta[m["source_key"]]["sha256"] for m in stored.values())

    # img2dataset's _stats.json is the source's stats in the manifest, not data
    manifest = json.loads((pool / "silverlabel.json").read_text())
    parent = manifest["parents"][0]
    assert parent["kind"] == "img2dataset" and parent["format"] == fmt and parent["shards"] == 2
    assert parent["stats"]["count"] == len(i2d.urls) and parent["stats"]["successes"] == len(i2d.photos)
    assert parent["stats"]["failed_to_download"] == 1


def test_img2dataset_files_by_name_and_pattern(i2d):
    """Its .tar or .parquet files, one or a brace pattern, are img2dataset output too: the
    embedded bytes and the tar members are read, never a URL."""
    requests_before = len(i2d.server.requests)
    for pattern, kind in [("webdataset/{00000..00001}.tar", "tar"), ("webdataset/{00000,00001}.parquet", "tar"),
                          ("parquet/{00000..00001}.parquet", "embedded"), ("parquet/00000.parquet", "embedded")]:
        path = str(i2d.base / pattern)
        assert kind_of(path) == "img2dataset", pattern
        items = list(open_source(path, SourceOptions()).items())
        ok = [it for it in items if it.error is None]
        assert {it.kind for it in ok} == {kind}
        assert len(items) == (4 if pattern.endswith("00000.parquet") else 8)
        for it in ok:
            data = load_bytes(it)
            assert Image.open(io.BytesIO(data)).size == (it.extra["source_width"], it.extra["source_height"])
    assert len(i2d.server.requests) == requests_before


# ---------------------------------------------------------------------------------------
# the layout rules, on shards written here in img2dataset's layout (no venv needed)

I2D_COLUMNS = {"url": pa.string(), "caption": pa.string(), "key": pa.string(), "status": pa.string(),
               "error_message": pa.string(), "width": pa.int32(), "height": pa.int32(),
               "original_width": pa.int32(), "original_height": pa.int32(), "sha256": pa.string()}


def _meta_rows(n: int, shard: int = 0) -> list[dict]:
    return [{"url": f"http://h.example/{shard}-{i}.jpg", "caption": f"c{i}", "key": f"{shard:05d}{i:04d}",
             "status": "success", "error_message": None, "width": 32, "height": 24, "original_width": 320,
             "original_height": 240, "sha256": f"{i:064x}"} for i in range(n)]


def _write_meta(path: Path, rows: list[dict], jpg: list[bytes | None] | None = None, row_group_size: int = 100):
    schema = pa.schema(list(I2D_COLUMNS.items()))
    table = pa.Table.from_pylist(rows, schema=schema)
    if jpg is not None:
        table = table.append_column(pa.field("jpg", pa.binary()), pa.array(jpg, pa.binary()))
    pq.write_table(table, path, row_group_size=row_group_size)


def test_embedded_cells_are_read_by_row_through_row_groups(tmp_path):
    jpgs = [sample_jpeg(32 + i, 24, seed=i) for i in range(7)]
    rows = _meta_rows(8)
    rows[3].update(status="failed_to_resize", error_message="image too small")
    _write_meta(tmp_path / "00000.parquet", rows, jpgs[:3] + [None] + jpgs[3:], row_group_size=3)
    items = list(open_source(str(tmp_path), SourceOptions()).items())
    assert [it.status for it in items] == [None] * 3 + ["source_failed_to_resize"] + [None] * 4
    assert items[3].error == "image too small"
    assert [load_bytes(it) for it in items if not it.error] == jpgs
    with pytest.raises(OSError, match="byte cap"):
        load_bytes(items[0], max_bytes=10)
    with pytest.raises(OSError, match="null"):
        read_cell(str(tmp_path / "00000.parquet"), 3, "jpg")
    with pytest.raises(OSError, match="past the end"):
        read_cell(str(tmp_path / "00000.parquet"), 8, "jpg")


def test_embedded_cells_read_by_many_threads(tmp_path):
    jpgs = [sample_jpeg(32 + i, 24, seed=i) for i in range(10)]
    path = str(tmp_path / "00000.parquet")
    _write_meta(path, _meta_rows(10), jpgs, row_group_size=3)
    rows = [r for _ in range(6) for r in range(10)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda r: read_cell(path, r, "jpg"), rows))
    assert got == [jpgs[r] for r in rows]
    with ThreadPoolExecutor(4) as pool:  # an error reaches every reader, not only the one that loaded
        futures = [pool.submit(read_cell, path, 0, "no_such_column") for _ in range(4)]
    for f in futures:
        with pytest.raises(OSError, match="no_such_column"):
            f.result()


def test_a_slow_remote_cell_read_does_not_hold_up_other_readers(tmp_path):
    pytest.importorskip("aiohttp")
    jpgs = [sample_jpeg(32 + i, 24, seed=i) for i in range(4)]
    local = tmp_path / "local.parquet"
    _write_meta(local, _meta_rows(4), jpgs, row_group_size=2)
    with RangeServer({"/00000.parquet": local.read_bytes()}, hold=True) as server, ThreadPoolExecutor(2) as pool:
        remote = pool.submit(read_cell, server.url("/00000.parquet"), 1, "jpg")
        assert server.held.wait(10), "the remote read never reached the server"
        # the remote read waits on its server; a local read in another thread goes on
        local_read = pool.submit(lambda: [read_cell(str(local), r, "jpg") for r in range(4)])
        assert local_read.result(timeout=10) == jpgs
        assert not remote.done()
        server.release.set()
        assert remote.result(timeout=30) == jpgs[1]


def test_shards_without_metadata_parquet_are_read_from_their_json(tmp_path):
    with open(tmp_path / "00000.tar", "wb") as f, ShardWriter(f) as w:
        for r in _meta_rows(2):
            w.write(r["key"], {"jpg": sample_jpeg(32, 24), "txt": r["caption"].encode(), "json": json.dumps(r).encode()})
    assert kind_of(str(tmp_path / "00000.tar")) == "img2dataset"
    src = open_source(str(tmp_path / "00000.tar"), SourceOptions())
    items = list(src.items())
    assert [(it.caption, it.extra["source_key"], it.extra["source_original_width"]) for it in items] == [
        ("c0", "000000000", 320), ("c1", "000000001", 320)]
    assert pa.field("source_original_width", pa.int32()) in src.extra_fields


def test_files_shard_folders_are_listed_once(tmp_path, monkeypatch):
    from silverlabel import fs

    rows = [_meta_rows(2, shard=s) for s in range(2)]
    _write_meta(tmp_path / "00000.parquet", rows[0])  # shard 0 with its metadata, shard 1 with its .json alone
    for s, shard_rows in enumerate(rows):
        (tmp_path / f"{s:05d}").mkdir()
        for r in shard_rows:
            (tmp_path / f"{s:05d}" / f"{r['key']}.jpg").write_bytes(sample_jpeg(32, 24))
            (tmp_path / f"{s:05d}" / f"{r['key']}.json").write_text(json.dumps(r))
    listed: list[str] = []
    real = fs.listdir
    monkeypatch.setattr(fs, "listdir", lambda folder: listed.append(os.path.basename(folder)) or real(folder))
    src = open_source(str(tmp_path), SourceOptions())
    items = list(src.items())
    assert [(it.url, os.path.basename(it.path)) for it in items] == [
        (r["url"], f"{r['key']}.jpg") for shard_rows in rows for r in shard_rows]
    assert len(src.files) == 1 + 8  # the metadata, each shard's images and .json
    shard_lists = [n for n in listed if n in ("00000", "00001")]
    assert sorted(shard_lists) == ["00000", "00001"]  # each shard folder listed once


def test_layouts_that_are_not_img2dataset_stay_what_they_were(tmp_path):
    # an ImageFolder whose classes are numbered, a numbered URL table, a plain numbered tar
    for cls in ("0", "1"):
        (tmp_path / "imagefolder" / cls).mkdir(parents=True)
        (tmp_path / "imagefolder" / cls / "a.jpg").write_bytes(sample_jpeg(16, 16))
    assert kind_of(str(tmp_path / "imagefolder")) == "folder"
    (tmp_path / "table").mkdir()
    pq.write_table(pa.table({"url": ["http://h.example/a.jpg"], "key": ["1"], "status": ["x"]}),
                   tmp_path / "table" / "00000.parquet")
    assert kind_of(str(tmp_path / "table")) == "table"
    with open(tmp_path / "00000.tar", "wb") as f, ShardWriter(f) as w:
        w.write("k", {"jpg": b"x", "json": b'{"url": "http://h.example/a.jpg"}'})
    assert kind_of(str(tmp_path / "00000.tar")) == "tar"


def test_metadata_without_images_and_bad_stats_give_clear_errors(tmp_path):
    _write_meta(tmp_path / "00000.parquet", _meta_rows(2))
    with pytest.raises(ValueError, match=r"without its images .*--source-kind table"):
        open_source(str(tmp_path), SourceOptions())
    # the escape hatch it names: the metadata as a URL table (its stats file is not a table)
    (tmp_path / "00000_stats.json").write_text(json.dumps({"count": 2}))
    for path in (tmp_path / "00000.parquet", tmp_path):
        items = list(open_source(str(path), SourceOptions(kind="table")).items())
        assert [it.url for it in items] == ["http://h.example/0-0.jpg", "http://h.example/0-1.jpg"]
    (tmp_path / "00000").mkdir()
    (tmp_path / "00000" / "000000000.jpg").write_bytes(sample_jpeg(32, 24))
    (tmp_path / "00000_stats.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"00000_stats\.json: not an img2dataset stats file"):
        open_source(str(tmp_path), SourceOptions())
    # valid JSON, but far larger than any stats file img2dataset writes: refused before it is read whole
    (tmp_path / "00000_stats.json").write_text(json.dumps({"count": 2, "pad": "x" * (2 << 20)}))
    with pytest.raises(ValueError, match=r"00000_stats\.json: not an img2dataset stats file \(larger than 1 MiB\)"):
        open_source(str(tmp_path), SourceOptions())
    (tmp_path / "00000_stats.json").write_text(json.dumps({"count": 2, "successes": 2, "failed_to_download": 0,
                                                           "failed_to_resize": 0, "status_dict": {"success": 2}}))
    src = open_source(str(tmp_path), SourceOptions())
    assert src.describe()["stats"]["count"] == 2
    items = list(src.items())
    assert items[0].path.endswith("000000000.jpg") and items[0].error is None
    # recorded as a success, but its file is gone: a failed_read row naming it, nothing lost
    assert items[1].status == "failed_read" and "000000001" in items[1].error
    with pytest.raises(ValueError, match="--keep-cols names missing columns: nope"):
        open_source(str(tmp_path), SourceOptions(keep_cols=("nope",)))
    with pytest.raises(ValueError, match="sha256 would overwrite"):
        open_source(str(tmp_path), SourceOptions(keep_cols=("sha256",)))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
