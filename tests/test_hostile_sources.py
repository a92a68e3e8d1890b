"""Bad and hostile local inputs (issue 13): FIFOs, devices, oversized tar members, file names
that are not UTF-8, damaged and odd tables, ids beyond 64 bits, duplicate tar members,
datasets or empty folders given as sources. Each ends as a row with a status or as one clear
error naming the file; nothing hangs, nothing else is lost."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from silverlabel.errors import UserError
from silverlabel.sources import SourceOptions, open_source
from silverlabel.stages.ingest import IngestConfig, run_ingest


def _jpeg(seed: int = 0, size: tuple[int, int] = (64, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _rows(out) -> dict[str, dict]:
    t = pq.read_table(os.path.join(out, "samples")).to_pylist()
    return {r["source"]: r for r in t}


def _ingest(sources, out, **kw) -> None:
    run_ingest(IngestConfig(sources=tuple(str(s) for s in sources), output=str(out), workers=1, **kw))


def test_fifo_and_device_links_are_rows_not_hangs(tmp_path):
    """A FIFO named like an image must not block ingest; a link to /dev/zero must not be read
    without bound. Run in a subprocess with a deadline: a regression hangs, it does not pass."""
    src = tmp_path / "imgs"
    src.mkdir()
    (src / "a.jpg").write_bytes(_jpeg())
    os.mkfifo(src / "b.jpg")
    os.symlink("/dev/zero", src / "c.jpg")
    out = tmp_path / "pool"
    code = ("import sys; from silverlabel.stages.ingest import IngestConfig, run_ingest; "
            "run_ingest(IngestConfig(sources=(sys.argv[1],), output=sys.argv[2], workers=1))")
    subprocess.run([sys.executable, "-c", code, str(src), str(out)], check=True, timeout=120)
    rows = _rows(out)
    assert rows["a.jpg"]["status"] == "success"
    assert rows["b.jpg"]["status"] == "failed_read" and "FIFO" in rows["b.jpg"]["error"]
    assert rows["c.jpg"]["status"] == "failed_read" and "character device" in rows["c.jpg"]["error"]


def test_byte_cap_applies_to_local_files(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    (src / "small.jpg").write_bytes(_jpeg())
    (src / "big.jpg").write_bytes(_jpeg(1, (800, 600)))
    out = tmp_path / "pool"
    from silverlabel.sources.http import FetchConfig

    _ingest([src], out, fetch=FetchConfig(max_bytes=20_000))
    rows = _rows(out)
    assert rows["small.jpg"]["status"] == "success"
    assert rows["big.jpg"]["status"] == "failed_read" and "max-bytes" in rows["big.jpg"]["error"]


def _tar_with(members: list[tuple[str, bytes]], path) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_tar_member_claiming_8_gib_is_refused_before_reading(tmp_path):
    good, other = _jpeg(1), _jpeg(2)
    tar = tmp_path / "s.tar"
    _tar_with([("a.jpg", good), ("b.jpg", other)], tar)
    raw = bytearray(tar.read_bytes())
    # rewrite b.jpg's header: size field 8 GiB (octal), checksum recomputed; the data stays small
    hdr = 512 + (len(good) + 511) // 512 * 512
    raw[hdr + 124 : hdr + 136] = b"%011o\0" % ((8 << 30) - 1)  # the largest 11-digit octal size
    raw[hdr + 148 : hdr + 156] = b" " * 8
    raw[hdr + 148 : hdr + 156] = b"%06o\0 " % sum(raw[hdr : hdr + 512])
    tar.write_bytes(bytes(raw))
    out = tmp_path / "pool"
    _ingest([tar], out)
    rows = _rows(out)
    assert rows["s.tar#a"]["status"] == "success"
    assert rows["s.tar#b"]["status"] == "failed_read"
    assert "max-bytes" in rows["s.tar#b"]["error"]


def test_adjacent_duplicate_tar_members_are_both_kept(tmp_path):
    tar = tmp_path / "d.tar"
    _tar_with([("k1.jpg", _jpeg(1)), ("k1.jpg", _jpeg(2)), ("k2.jpg", _jpeg(3))], tar)
    out = tmp_path / "pool"
    _ingest([tar], out)
    t = pq.read_table(os.path.join(out, "samples")).to_pylist()
    assert [r["source"] for r in t] == ["d.tar#k1", "d.tar#k1", "d.tar#k2"]
    assert [r["status"] for r in t] == ["success"] * 3
    assert t[0]["sha256"] != t[1]["sha256"]


@pytest.mark.skipif(sys.platform != "linux", reason="needs a filesystem that takes any bytes as a name")
def test_a_file_name_that_is_not_utf8_is_a_row(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    (src / "a.jpg").write_bytes(_jpeg())
    with open(os.path.join(os.fsencode(src), b"caf\xe9.jpg"), "wb") as f:
        f.write(_jpeg(1))
    out = tmp_path / "pool"
    _ingest([src], out)
    t = pq.read_table(os.path.join(out, "samples")).to_pylist()
    by_status = {r["status"]: r for r in t}
    assert set(by_status) == {"success", "invalid_input"}
    assert "not valid UTF-8" in by_status["invalid_input"]["error"] and "\\xe9" in by_status["invalid_input"]["source"]
    import json

    man = json.loads((out / "silverlabel.json").read_text())
    assert man["counts"] == {"success": 1, "invalid_input": 1}, man


def test_empty_folder_and_dataset_as_source_are_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no image files"):
        list(open_source(str(empty), SourceOptions()).items())
    src = tmp_path / "imgs"
    src.mkdir()
    (src / "a.jpg").write_bytes(_jpeg())
    _ingest([src], tmp_path / "pool")
    with pytest.raises(UserError, match="silverlabel dataset"):
        open_source(str(tmp_path / "pool"), SourceOptions(kind="folder"))


def _as_nobody() -> list[str]:
    """A command prefix that runs as the unprivileged user ``nobody`` (root reads every
    folder, so a permission test needs another user); [] when not root or no setpriv."""
    import shutil

    if os.geteuid() == 0 and shutil.which("setpriv"):
        return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
    return []


def test_unreadable_subfolder_is_an_error(tmp_path):
    import tempfile

    prefix = _as_nobody() if os.geteuid() == 0 else []
    if os.geteuid() == 0 and not prefix:
        pytest.skip("root reads every folder and setpriv is missing")
    base = Path(tempfile.mkdtemp(dir="/tmp" if prefix else tmp_path))
    try:
        os.chmod(base, 0o755)
        src = base / "imgs"
        (src / "cat").mkdir(parents=True)
        (src / "dog").mkdir()
        (src / "cat" / "a.jpg").write_bytes(_jpeg())
        for d in (src, src / "cat"):
            os.chmod(d, 0o755)
        os.chmod(src / "cat" / "a.jpg", 0o644)
        os.chmod(src / "dog", 0)
        code = ("import sys\nfrom silverlabel.sources import SourceOptions, open_source\n"
                "list(open_source(sys.argv[1], SourceOptions()).items())")
        p = subprocess.run([*prefix, sys.executable, "-c", code, str(src)], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "HOME": "/tmp"})
        assert p.returncode != 0 and "UserError" in p.stderr and "cannot list this folder" in p.stderr, p.stderr[-800:]
        assert str(src / "dog") in p.stderr
    finally:
        os.chmod(base / "imgs" / "dog", 0o755)
        import shutil

        shutil.rmtree(base, ignore_errors=True)


def _items(path, **kw):
    return list(open_source(str(path), SourceOptions(**kw)).items())


def test_unclosed_csv_quote_is_an_error_naming_the_line(tmp_path):
    p = tmp_path / "urls.csv"
    p.write_text('url,caption\nhttp://a/1.jpg,"ok"\nhttp://a/2.jpg,"broken\nhttp://a/3.jpg,x\nhttp://a/4.jpg,y\n')
    with pytest.raises(UserError, match=r"urls.csv:3: a quote opened here is never closed"):
        _items(p)
    ok = tmp_path / "ok.csv"  # a quoted caption with a newline in it is fine
    ok.write_text('url,caption\nhttp://a/1.jpg,"two\nlines"\nhttp://a/2.jpg,x\n')
    assert [i.caption for i in _items(ok)] == ["two\nlines", "x"]


def test_csv_with_a_byte_order_mark_reads(tmp_path):
    p = tmp_path / "excel.csv"
    p.write_bytes(b"\xef\xbb\xbfurl,caption\r\nhttp://a/1.jpg,x\r\n")
    assert [(i.url, i.caption) for i in _items(p)] == [("http://a/1.jpg", "x")]


_URLS = [b"http://a/%08x.jpg" % (i * 2654435761 % 2**32) for i in range(5000)]  # compresses poorly
_LINES = b"".join(u + b"\n" for u in _URLS)


@pytest.mark.parametrize("name,data,match", [
    ("latin.csv", b"url,caption\nhttp://a/1.jpg,caf\xe9\n", "latin.csv"),
    ("latin-header.csv", b"ur\xe9l\nhttp://a/1.jpg\n", "latin-header.csv: cannot read"),
    ("latin.jsonl", b'{"url": "http://a/1.jpg", "caption": "caf\xe9"}\n', "latin.jsonl:1"),
    ("bad.csv.gz", b"this is not gzip", "bad.csv.gz: cannot read"),
    ("cut.csv.gz", gzip.compress(b"url\n" + _LINES)[:3000], "cut.csv.gz: cannot read"),
    ("cut.jsonl.gz", gzip.compress(b"".join(b'{"url": "%s"}\n' % u for u in _URLS))[:3000], "cut.jsonl.gz"),
])
def test_damaged_tables_are_errors_naming_the_file(tmp_path, name, data, match):
    p = tmp_path / name
    p.write_bytes(data)
    with pytest.raises(UserError, match=match):
        _items(p)


def test_ids_beyond_int64_are_rows(tmp_path):
    p = tmp_path / "urls.csv"
    p.write_text("url,id\nhttp://a/1.jpg,5\nhttp://a/2.jpg,99999999999999999999\nhttp://a/3.jpg,-7\n")
    items = _items(p)
    assert [i.id for i in items] == [5, None, -7]
    assert items[1].error and "64 bits" in items[1].error and items[0].error is None


def test_brace_lists_as_webdataset_reads_them(tmp_path):
    """``{00000,00002}`` (a list, as webdataset and the shell expand it) beside ``{0..2}``."""
    for i in range(3):
        _tar_with([(f"k{i}.jpg", _jpeg(i))], tmp_path / f"d-{i:05d}.tar")
    listed = _items(str(tmp_path / "d-{00000,00002}.tar"))
    assert [i.source for i in listed] == ["d-00000.tar#k0", "d-00002.tar#k2"]
    assert len(_items(str(tmp_path / "d-{00000..00002}.tar"))) == 3
