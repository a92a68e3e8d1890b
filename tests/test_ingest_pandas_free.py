"""``ingest`` never imports pandas (issue 14: ~0.2 s of every run's fixed cost).

pyarrow imports pandas the first time it converts Python objects to an array (``pa.array``,
``pa.table``, ``Table.from_pylist``: it asks whether they are pandas objects). The samples
table is built from Arrow buffers instead (:func:`silverlabel.formats.tables.column_array`),
the same arrays, and the local engine's fork server does not preload pandas for ingest.

Real parts: a fresh interpreter running the CLI against a real loopback HTTP server
(successes, HTTP errors, a truncated JPEG, a PNG), resumed and retried; real parquet files.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from httpserver import MisbehavingServer, gray_png, sample_jpeg, truncated_jpeg

from silverlabel.errors import UserError
from silverlabel.formats.tables import SAMPLES_SCHEMA, column_array, samples_table

pytestmark = pytest.mark.timeout(120)

#: values and types, including those column_array hands to pa.array (bool, float, bytes,
#: a str in an int column, out of range, a lone surrogate, a str subclass)
CASES = [
    ([], pa.string()), ([], pa.int32()), ([None], pa.string()), ([None, None], pa.int64()),
    (["a", None, "ü", "", "x" * 1000, "日本"], pa.string()),
    ([1, None, -5, 2**31 - 1, -(2**31)], pa.int32()), ([2**63 - 1, -(2**63), None, 0], pa.int64()),
    ([True, 1], pa.int64()), ([1.0, 2], pa.int64()), (["a", 3], pa.string()), ([b"a", "b"], pa.string()),
    (["\ud800"], pa.string()), ([2**31], pa.int32()), ([2**64], pa.int64()), (["5"], pa.int64()),
    ([None] * 9 + ["z"], pa.string()), ([7] + [None] * 20, pa.int32()), ([1.5, None], pa.float64()),
    ([["a"], None], pa.list_(pa.string())),
]


@pytest.mark.parametrize("values,arrow_type", CASES)
def test_column_array_is_pa_array(values, arrow_type):
    try:
        want = pa.array(values, type=arrow_type)
    except (pa.ArrowException, ValueError, TypeError, OverflowError) as e:  # (UnicodeEncodeError: a ValueError)
        with pytest.raises(type(e)) as got:
            column_array(values, arrow_type)
        assert str(got.value) == str(e)
        return
    got = column_array(values, arrow_type)
    got.validate(full=True)
    assert got.type == want.type and got.null_count == want.null_count
    assert got.equals(want) and got.to_pylist() == want.to_pylist()


def _row(i: int, status: str = "success", **kw) -> dict:
    row = {"key": f"{i:09d}", "uid": f"u{i}", "id": i, "url": f"http://h/{i}.jpg", "caption": None,
           "status": status, "error": None if status == "success" else "HTTP 404", "width": 640, "height": 480,
           "original_width": 1024, "original_height": 768, "sha256": "ab" * 32, "imagehash": "0f" * 8,
           "shard": "data-000000.tar", "source": f"http://h/{i}.jpg", "label": None}
    if status != "success":
        row.update(width=None, height=None, original_width=None, original_height=None, sha256=None, imagehash=None)
    row.update(kw)
    return row


def test_samples_table_writes_the_same_parquet_as_pa_array(tmp_path):
    extra = [pa.field("score", pa.float64()), pa.field("tags", pa.list_(pa.string())), pa.field("n", pa.int64())]
    rows = [_row(0, caption="a cat", score=0.5, tags=["x"], n=3), _row(1, "failed_download", score=None, tags=None),
            _row(2, caption="ünïcode 日本", label="n01440764", n=-(2**40)), _row(3, "invalid_input", id=2**62)]
    schema = SAMPLES_SCHEMA
    for f in extra:
        schema = schema.append(f)
    want = pa.Table.from_arrays([pa.array([r.get(n) for r in rows], type=f.type) for n, f in zip(schema.names, schema)],
                                schema=schema)
    got = samples_table(rows, extra)
    assert got.equals(want) and got.schema == want.schema
    pq.write_table(got, tmp_path / "got.parquet", compression="zstd")
    pq.write_table(want, tmp_path / "want.parquet", compression="zstd")
    assert (tmp_path / "got.parquet").read_bytes() == (tmp_path / "want.parquet").read_bytes()


def test_a_value_that_does_not_fit_its_column_is_still_a_user_error():
    with pytest.raises(UserError, match="column 'width' cannot be stored as int32"):
        samples_table([_row(0, width=2**40)])
    with pytest.raises(UserError, match="column 'n' cannot be stored as int64"):
        samples_table([_row(0, n="many")], [pa.field("n", pa.int64())])


_RUN = textwrap.dedent("""
    import json, sys
    from silverlabel.cli import main
    out = []
    for argv in json.loads(sys.argv[1]):
        out.append({"rc": main(argv), "pandas": "pandas" in sys.modules})
    print(json.dumps(out))
""")


@pytest.mark.parametrize("workers", [1, 2])
def test_ingest_imports_no_pandas(tmp_path, workers):
    """A run, its resume and a --retry-failed, in a fresh interpreter: with one worker the
    units run in it too; with two, the driver alone (its workers are forked from a server
    that does not preload pandas for ingest: tests/test_engine_local.py)."""
    with MisbehavingServer() as server:
        server.add("/a.jpg", sample_jpeg(320, 240, seed=1))
        server.add("/b.jpg", sample_jpeg(700, 650, seed=2))
        server.add("/t.jpg", truncated_jpeg())
        server.add("/g.png", gray_png(), content_type="image/png")
        urls = [server.url(p) for p in ("/a.jpg", "/b.jpg", "/t.jpg", "/g.png", "/status/404")] + ["", "not a url"]
        table = tmp_path / "urls.parquet"
        pq.write_table(pa.table({"url": urls, "caption": [f"c{i}" for i in range(len(urls))]}), table)
        base = ["ingest", str(table), "-o", str(tmp_path / "ds"), "--workers", str(workers), "--samples-per-shard", "3",
                "--no-progress", "--allow-private-network", "--max-shortest-edge", "600", "--retries", "0"]
        runs = [base, base, [*base, "--retry-failed"]]
        p = subprocess.run([sys.executable, "-c", _RUN, json.dumps(runs)], capture_output=True, text=True,
                           timeout=100)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got == [{"rc": 0, "pandas": False}] * 3, p.stderr
    rows = pq.ParquetFile(tmp_path / "ds" / "samples" / "data-000000.parquet").read().to_pylist()
    assert [r["status"] for r in rows] == ["success", "success", "failed_decode"]
    statuses = [r["status"] for f in sorted((tmp_path / "ds" / "samples").glob("*.parquet"))
                for r in pq.ParquetFile(f).read().to_pylist()]
    assert statuses == ["success", "success", "failed_decode", "success", "failed_download", "invalid_input",
                        "invalid_input"]
