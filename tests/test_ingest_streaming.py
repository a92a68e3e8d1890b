"""``ingest`` writes a shard's tar while the shard is still being fetched (issue 14): each
sample once it and every sample before it are done. Items finishing out of order, finished
images held in memory or spilled to the spool's file, a --retry-failed that keeps some rows:
the tar and the samples table are the same bytes as a run that fetches one item at a time.

Real parts: a real loopback HTTP server (slow routes finish late, a flaky one fails first),
the real pipeline in-process, real tar and parquet files.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from httpserver import MisbehavingServer, sample_jpeg

from silverlabel.imageops import ImageConfig
from silverlabel.sources.http import FetchConfig
from silverlabel.stages import ingest
from silverlabel.stages.ingest import IngestConfig, run_ingest

pytestmark = pytest.mark.timeout(120)


def _files(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for sub in ("shards", "samples") for p in sorted((root / sub).iterdir())}


def _run(tmp_path, name: str, table, threads: int, retries: int = 0) -> dict[str, bytes]:
    cfg = IngestConfig(sources=(str(table),), output=str(tmp_path / name), samples_per_shard=7, workers=1,
                       threads=threads, image=ImageConfig(max_shortest_edge=64),
                       fetch=FetchConfig(timeout=5, retries=retries, backoff=0.01, allow_private_network=True))
    run_ingest(cfg)
    return _files(tmp_path / name)


@pytest.fixture(scope="module")
def server():
    with MisbehavingServer() as srv:
        for i in range(12):
            srv.add(f"/{i}.jpg", sample_jpeg(120 + 9 * i, 90 + 5 * i, seed=i))
        yield srv


def _table(tmp_path, server, flaky: str = "/status/500") -> object:
    # slow ones early in each shard: the rest finish before them and wait to be written
    paths = ["/slow/a?delay=0.3", "/0.jpg", "/1.jpg", "/status/404", "/2.jpg", "/slow/b?delay=0.1", "/3.jpg",
             "/4.jpg", "/slow/c?delay=0.2", "/5.jpg", "/6.jpg", "/7.jpg", flaky, "/8.jpg", "/9.jpg",
             "/10.jpg", "/11.jpg"]
    table = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": [server.url(p) for p in paths],
                             "caption": [f"caption {i}" if i % 3 else None for i in range(len(paths))]}), table)
    return table


def test_out_of_order_and_spilled_images_give_the_same_bytes(tmp_path, server, monkeypatch):
    table = _table(tmp_path, server)
    one_at_a_time = _run(tmp_path, "sequential", table, threads=1)
    concurrent = _run(tmp_path, "concurrent", table, threads=16)
    assert concurrent == one_at_a_time
    # a spool of 3 KB: most finished images go to its file and are read back from there
    monkeypatch.setattr(ingest._Spool.__init__, "__defaults__", (3000,))
    spilled = _run(tmp_path, "spilled", table, threads=16)
    assert spilled == one_at_a_time
    rows = pq.read_table(tmp_path / "spilled" / "samples").to_pylist()
    assert [r["status"] for r in rows].count("success") == len(rows) - 2  # the 404 and the 500
    assert list(tmp_path.glob("spilled/**/spool-*")) == []


def test_retry_failed_rewrites_the_shard_around_kept_rows(tmp_path, server):
    table = _table(tmp_path, server, flaky="/flaky/retried")
    first = _run(tmp_path, "pool", table, threads=8)  # /flaky/retried fails (no retries): failed_download
    rows = pq.read_table(tmp_path / "pool" / "samples").to_pylist()
    assert [r["status"] for r in rows][12] == "failed_download"
    cfg = IngestConfig(sources=(str(table),), output=str(tmp_path / "pool"), samples_per_shard=7, workers=1,
                       threads=8, retry_failed=True, image=ImageConfig(max_shortest_edge=64),
                       fetch=FetchConfig(timeout=5, retries=0, allow_private_network=True))
    run_ingest(cfg)
    again = _files(tmp_path / "pool")
    rows = pq.read_table(tmp_path / "pool" / "samples").to_pylist()
    assert [r["status"] for r in rows][12] == "success"  # the flaky server answers the second time
    assert again["shards/data-000000.tar"] == first["shards/data-000000.tar"]  # no failed download there but the 404
    assert again["shards/data-000001.tar"] != first["shards/data-000001.tar"]
    # the same bytes as a fresh run that got that image the first time
    fresh = _run(tmp_path, "fresh", table, threads=1, retries=1)
    assert again["shards/data-000001.tar"] == fresh["shards/data-000001.tar"]
    assert again["samples/data-000001.parquet"] == fresh["samples/data-000001.parquet"]
