"""Ingest reads its inputs where they live: an S3 bucket, an http(s) server, a ``pipe:``.

Real parts: moto's S3 server on loopback (moto's WSGI app under werkzeug, as
``ThreadedMotoServer`` runs it, wrapped to count the requests it answers), reached by s3fs
through botocore's standard ``AWS_ENDPOINT_URL``, with made-up credentials from the standard
environment variables; a loopback HTTP server that honours ``Range``; real tars, parquet and
JPEGs. Each remote ingest must give the same tars and samples tables, byte for byte, as the
same files ingested from local disk, and no credential may reach any output file.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from httpserver import MisbehavingServer, sample_jpeg

from silverlabel import fs as sfs
from silverlabel.cli import main as cli_main
from silverlabel.errors import UserError
from silverlabel.formats.wds import ShardWriter, iter_tar_samples
from silverlabel.sources import SourceOptions, kind_of, load_bytes, open_source

pytest.importorskip("s3fs")
pytest.importorskip("moto.moto_server.werkzeug_app")
from rangeserver import RangeServer  # noqa: E402
from s3server import s3_bucket  # noqa: E402

KEY_ID = "AKIASILVERLABELTEST1"
SECRET = "s3cr3t-Zq9xWv7-never-written"
BUCKET = "silver-inputs"
IMAGES = 6


@pytest.fixture(scope="module")
def s3():
    with s3_bucket(BUCKET, KEY_ID, SECRET) as server:
        yield server


@pytest.fixture(scope="module")
def images():
    with MisbehavingServer() as server:
        urls = [server.add(f"/img/{i}.jpg", sample_jpeg(120 + 9 * i, 90 + 5 * i, seed=i)) for i in range(IMAGES)]
        yield server, urls


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, images):
    """The local files every test ingests, also uploaded under ``s3://BUCKET/{test}/``."""
    base = tmp_path_factory.mktemp("inputs")
    _, urls = images
    captions = [f"photo {i}" for i in range(IMAGES + 2)]
    pq.write_table(pa.table({"url": urls + ["", "ftp://x/y.jpg"], "caption": captions}), base / "urls.parquet")
    (base / "shards").mkdir()
    for t in range(3):
        with open(base / "shards" / f"shard-{t:05d}.tar", "wb") as f, ShardWriter(f) as w:
            for i in range(3):
                k = 3 * t + i
                w.write(f"s{k:04d}", {"jpg": sample_jpeg(100 + 7 * k, 80 + 3 * k, seed=k), "txt": f"c{k}".encode(),
                                      "json": json.dumps({"url": f"http://h.example/{k}.jpg", "n": k}).encode()})
    # img2dataset's parquet output: its metadata columns and the image bytes in a jpg column
    (base / "i2d").mkdir()
    for shard in range(2):
        rows = [{"url": f"http://h.example/{shard}-{i}.jpg", "caption": f"c{i}", "key": f"{shard:05d}{i:04d}",
                 "status": "success" if i != 2 else "failed_to_download",
                 "error_message": None if i != 2 else "404", "width": 64, "height": 48, "original_width": 320,
                 "original_height": 240, "sha256": f"{i:064x}"} for i in range(5)]
        jpgs = [sample_jpeg(64 + i, 48, seed=10 * shard + i) if i != 2 else None for i in range(5)]
        table = pa.Table.from_pylist(rows).append_column(pa.field("jpg", pa.binary()), pa.array(jpgs, pa.binary()))
        pq.write_table(table, base / "i2d" / f"{shard:05d}.parquet", row_group_size=2)
        (base / "i2d" / f"{shard:05d}_stats.json").write_text(json.dumps(
            {"count": 5, "successes": 4, "failed_to_download": 1, "failed_to_resize": 0,
             "status_dict": {"success": 4, "failed_to_download": 1}}))
    return base


def _upload(s3, local: Path, prefix: str) -> str:
    """Copy ``local`` (a file or folder) to ``s3://BUCKET/prefix``; returns that URL."""
    dest = f"{BUCKET}/{prefix}"
    if local.is_dir():
        for p in sorted(local.iterdir()):
            s3.fs.put_file(str(p), f"{dest}/{p.name}")
    else:
        s3.fs.put_file(str(local), dest)
    s3.fs.invalidate_cache()
    return f"s3://{dest}"


def _ingest(source: str, out: Path, *extra: str) -> None:
    assert cli_main(["ingest", source, "-o", str(out), "--workers", "1", "--threads", "4", "--no-progress",
                     "--allow-private-network", "--retries", "0", "--samples-per-shard", "4", *extra]) == 0


def _outputs(pool: Path) -> dict[str, bytes]:
    """The tars and samples tables of a pool, by relative name."""
    return {str(p.relative_to(pool)): p.read_bytes()
            for sub in ("shards", "samples") for p in sorted((pool / sub).iterdir())}


def _no_secrets(*roots: Path) -> None:
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file():
                data = p.read_bytes()
                for secret in (KEY_ID, SECRET, "SIGSECRET", "pw@"):
                    assert secret.encode() not in data, f"{secret} in {p}"


def test_url_table_in_a_bucket_ingests_as_from_disk(s3, inputs, tmp_path):
    url = _upload(s3, inputs / "urls.parquet", "table/urls.parquet")
    assert kind_of(url) == "table"
    src = open_source(url, SourceOptions())
    assert src.known_length() == IMAGES + 2
    _ingest(str(inputs / "urls.parquet"), tmp_path / "local")
    _ingest(url, tmp_path / "remote")
    local, remote = _outputs(tmp_path / "local"), _outputs(tmp_path / "remote")
    assert len(local) == 4 and remote == local
    manifest = json.loads((tmp_path / "remote" / "silverlabel.json").read_text())
    parent = manifest["parents"][0]
    assert parent["name"] == url and parent["content"].startswith("sha256:")
    assert manifest["config"]["sources"] == [url]
    _no_secrets(tmp_path / "remote")

    # the same bucket object, its ETag changed: a resume is refused, not mixed
    s3.fs.pipe_file(f"{BUCKET}/table/urls.parquet", (inputs / "urls.parquet").read_bytes() + b"")  # same bytes
    _ingest(url, tmp_path / "remote")  # same ETag (md5 of the bytes): resumes, nothing to do
    pq.write_table(pa.table({"url": ["http://h.example/other.jpg"]}), tmp_path / "other.parquet")
    s3.fs.put_file(str(tmp_path / "other.parquet"), f"{BUCKET}/table/urls.parquet")
    s3.fs.invalidate_cache()
    with pytest.raises(UserError, match="was ingested from other sources"):
        from silverlabel.stages.ingest import IngestConfig, run_ingest

        run_ingest(IngestConfig(sources=(url,), output=str(tmp_path / "remote"), workers=1))


def test_tar_shards_in_a_bucket_by_brace_pattern_read_by_range(s3, inputs, tmp_path):
    prefix = _upload(s3, inputs / "shards", "wds")
    pattern = prefix + "/shard-{00000..00002}.tar"
    assert kind_of(pattern) == "tar"
    s3.requests.clear()
    _ingest(str(inputs / "shards" / "shard-{00000..00002}.tar"), tmp_path / "local")
    _ingest(pattern, tmp_path / "remote", "--workers", "2")  # two worker processes: env credentials inherited
    assert _outputs(tmp_path / "remote") == _outputs(tmp_path / "local")
    _no_secrets(tmp_path / "remote")

    # every image member was fetched by a worker with a ranged read of exactly its bytes, and
    # no GET of a tar asked for the whole object without a range
    gets = [(p, r) for m, p, r in s3.requests if m == "GET" and p.endswith(".tar")]
    assert gets and all(r is not None for _, r in gets)
    for t in range(3):
        path = inputs / "shards" / f"shard-{t:05d}.tar"
        for s in iter_tar_samples(str(path)):
            off, size = s.members["jpg"]
            want = f"bytes={off}-{off + size - 1}"
            assert (f"/{BUCKET}/wds/shard-{t:05d}.tar", want) in gets, (s.key, want)

    # a glob over the prefix names the same files; a folder (prefix) of tars is a tar source
    assert open_source(prefix + "/*.tar", SourceOptions()).files == [f"{prefix}/shard-{t:05d}.tar" for t in range(3)]
    assert kind_of(prefix) == "tar"
    with pytest.raises(FileNotFoundError, match=r"s3://silver-inputs/wds/shard-00008\.tar: no such tar file"):
        open_source(prefix + "/shard-{00008..00009}.tar", SourceOptions())


def test_img2dataset_parquet_with_embedded_bytes_in_a_bucket(s3, inputs, tmp_path):
    prefix = _upload(s3, inputs / "i2d", "i2d")
    assert kind_of(prefix) == "img2dataset"
    src = open_source(prefix, SourceOptions())
    assert src.describe()["stats"]["count"] == 10
    items = [it for it in src.items() if not it.error]
    s3.requests.clear()
    assert load_bytes(items[0]) == pq.read_table(inputs / "i2d" / "00000.parquet").column("jpg")[0].as_py()
    # a cell is read with ranged requests of its row group's column chunk, never the whole file
    assert all(r is not None for m, p, r in s3.requests if m == "GET")
    _ingest(str(inputs / "i2d"), tmp_path / "local")
    _ingest(prefix, tmp_path / "remote")
    assert _outputs(tmp_path / "remote") == _outputs(tmp_path / "local")
    rows = pq.read_table(tmp_path / "remote" / "samples").to_pylist()
    assert [r["status"] for r in rows].count("source_failed_to_download") == 2
    _no_secrets(tmp_path / "remote")


def test_image_folder_under_a_prefix(s3, inputs, tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "imgs" / cls / f"{i}.jpg").write_bytes(sample_jpeg(70 + i, 50, seed=i + len(cls)))
    for cls in ("cat", "dog"):
        _upload(s3, tmp_path / "imgs" / cls, f"folder/{cls}")
    url = f"s3://{BUCKET}/folder"
    assert kind_of(url) == "folder"
    src = open_source(url, SourceOptions())
    assert [(i.source, i.label) for i in src.items()] == [("cat/0.jpg", "cat"), ("cat/1.jpg", "cat"),
                                                          ("dog/0.jpg", "dog"), ("dog/1.jpg", "dog")]
    with pytest.raises(OSError, match="byte cap"):
        load_bytes(next(iter(src.items())), max_bytes=10)
    _ingest(str(tmp_path / "imgs"), tmp_path / "local")
    _ingest(url, tmp_path / "remote")
    assert _outputs(tmp_path / "remote") == _outputs(tmp_path / "local")


def test_url_table_and_tars_over_http(inputs, tmp_path):
    server = RangeServer()
    try:
        server.files["/meta/urls.parquet"] = (inputs / "urls.parquet").read_bytes()
        for t in range(3):
            server.files[f"/wds/shard-{t:05d}.tar"] = (inputs / "shards" / f"shard-{t:05d}.tar").read_bytes()
        # credentials and a signature in the URL: used to fetch, never recorded
        table_url = server.base.replace("://", "://user:pw@") + "/meta/urls.parquet?X-Amz-Signature=SIGSECRET&v=1"
        _ingest(str(inputs / "urls.parquet"), tmp_path / "local-table")
        _ingest(table_url, tmp_path / "http-table")
        assert _outputs(tmp_path / "http-table") == _outputs(tmp_path / "local-table")
        parent = json.loads((tmp_path / "http-table" / "silverlabel.json").read_text())["parents"][0]
        assert parent["name"] == server.base + "/meta/urls.parquet?v=1"

        server.requests.clear()
        _ingest(server.base + "/wds/shard-{00000..00002}.tar", tmp_path / "http-tars")
        _ingest(str(inputs / "shards"), tmp_path / "local-tars")
        assert _outputs(tmp_path / "http-tars") == _outputs(tmp_path / "local-tars")
        # ranged reads only (fsspec asks a GET after a HEAD's 404 too: of files that are not there)
        gets = [(p, r) for m, p, r in server.requests if m == "GET" and p in server.files]
        assert gets and all(r is not None for _, r in gets)
        _no_secrets(tmp_path / "http-table", tmp_path / "http-tars")

        with pytest.raises(FileNotFoundError, match=r"/wds/none\.tar"):
            open_source(server.base + "/wds/none.tar", SourceOptions())
    finally:
        server.stop()


def test_pipe_input_is_a_command_the_user_gave(inputs, tmp_path):
    tars = inputs / "shards"
    cmd = "pipe:cat " + shlex.quote(str(tars)) + "/shard-{00000..00002}.tar"
    _ingest(cmd, tmp_path / "piped")
    _ingest(str(tars / "shard-{00000..00002}.tar"), tmp_path / "local")
    assert _outputs(tmp_path / "piped") == _outputs(tmp_path / "local")
    with pytest.raises(UserError, match="exited with status 3"):  # run when its items are read
        list(open_source("pipe:sh -c 'exit 3' x.tar", SourceOptions()).items())
    # a pipe: in data is never run: a URL column only ever fetches http(s)
    pq.write_table(pa.table({"url": ["pipe:touch " + shlex.quote(str(tmp_path / "ran")) + " x.jpg"]}),
                   tmp_path / "t.parquet")
    assert [i.error for i in open_source(str(tmp_path / "t.parquet"), SourceOptions()).items()][0].startswith(
        "invalid url")
    assert not (tmp_path / "ran").exists()


def test_public_urls_and_missing_filesystems():
    assert sfs.public("https://u:p@h.example/a.parquet?X-Amz-Credential=AKIA1&X-Amz-Signature=s&x=1") == \
        "https://h.example/a.parquet?x=1"
    assert sfs.public("gs://b/x.tar?X-Goog-Signature=abc") == "gs://b/x.tar"
    assert sfs.scrub_text("cannot read https://a:b@h/x?sig=1: 403") == "cannot read https://h/x: 403"
    assert not sfs.is_remote("file:///tmp/x.tar") and sfs.local_path("file:///tmp/x.tar") == "/tmp/x.tar"
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match=r"needs gcsfs: pip install 'silverlabel\[gcs\]'"):
            open_source("gs://bucket/meta.parquet", SourceOptions())
    with pytest.raises(UserError, match="nosuchfs:// is not a filesystem fsspec knows"):
        open_source("nosuchfs://bucket/meta.parquet", SourceOptions())


def test_an_endpoint_from_fsspec_environment_configuration(s3, inputs):
    """The other documented way to reach an S3-compatible store: fsspec's own environment
    configuration, ``FSSPEC_S3_ENDPOINT_URL`` (read when fsspec is imported: a fresh process)."""
    import subprocess
    import sys

    _upload(s3, inputs / "urls.parquet", "env/urls.parquet")
    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}
    env["FSSPEC_S3_ENDPOINT_URL"] = s3.endpoint
    code = ("from silverlabel.sources import SourceOptions, open_source; "
            f"print(open_source('s3://{BUCKET}/env/urls.parquet', SourceOptions()).known_length())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(IMAGES + 2)


def test_many_shards_cost_one_listing_not_a_request_each(s3, tmp_path):
    n = 20
    (tmp_path / "many").mkdir()
    for t in range(n):
        with open(tmp_path / "many" / f"{t:05d}.tar", "wb") as f, ShardWriter(f) as w:
            w.write(f"k{t}", {"jpg": sample_jpeg(40, 30, seed=t), "txt": b"x"})
    prefix = _upload(s3, tmp_path / "many", "many")
    s3.requests.clear()
    src = open_source(prefix + "/{00000..00019}.tar", SourceOptions(kind="tar"))
    assert src.describe()["content"].startswith("sha256:")
    assert len(list(src.items())) == n
    heads = [p for m, p, _ in s3.requests if m == "HEAD"]
    gets = [p for m, p, _ in s3.requests if m == "GET" and p.endswith(".tar")]
    assert len(heads) <= 2, heads  # the pattern's own name is asked once; each file's size came from the listing
    assert len(gets) == n  # one read of each tar (its index pass)
