"""Sources: URL tables in every format, folders, tar shards."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from silverlabel.formats.wds import ShardWriter, iter_tar_samples
from silverlabel.sources import SourceOptions, kind_of, open_source
from silverlabel.sources.tars import TarSource, expand_braces

UIDS = ["0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210"]


def _items(path, **kw):
    return list(open_source(str(path), SourceOptions(**kw)).items())


def test_coyo_shaped_parquet(tmp_path):
    p = tmp_path / "coyo.parquet"
    pq.write_table(pa.table({
        "id": pa.array([4_123_000_001, 4_123_000_002], pa.int64()),
        "url": ["http://a.example/1.jpg", "https://b.example/2.png"],
        "text": ["a dog", "a cat"],
        "width": [640, 800], "height": [480, 600], "image_phash": ["ab", "cd"],
        "clip_similarity_vitb32": [0.31, 0.29],
    }), p)
    src = open_source(str(p), SourceOptions(keep_cols=("clip_similarity_vitb32",)))
    items = list(src.items())
    assert [i.id for i in items] == [4_123_000_001, 4_123_000_002]
    assert [i.caption for i in items] == ["a dog", "a cat"]  # 'text' is the caption
    assert items[0].extra == {"clip_similarity_vitb32": 0.31}
    assert src.extra_fields[0].type == pa.float64()
    assert all(len(i.uid) == 32 for i in items)


def test_datacomp_shaped_parquet_keeps_uids(tmp_path):
    p = tmp_path / "dc.parquet"
    pq.write_table(pa.table({"uid": [UIDS[0], UIDS[1].upper()], "url": ["http://x/1", "http://x/2"],
                             "text": ["t1", "t2"], "original_width": [1, 2], "sha256": ["s", "t"]}), p)
    items = _items(p)
    assert [i.uid for i in items] == [UIDS[0], UIDS[1]]
    assert [i.id for i in items] == [None, None]  # filled from the input position by ingest


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "csv.gz", "jsonl.gz"])
def test_text_formats(tmp_path, fmt):
    rows = [{"url": "http://h/1.jpg", "caption": "one, with comma", "uid": UIDS[0], "id": "7"},
            {"url": "http://h/2.jpg", "caption": "two", "uid": UIDS[1], "id": "8"}]
    base = fmt.replace(".gz", "")
    if base == "jsonl":
        text = "".join(json.dumps(r) + "\n" for r in rows)
    else:
        d = "," if base == "csv" else "\t"
        lines = [d.join(rows[0])] + [d.join((f'"{v}"' if d in str(v) else str(v)) for v in r.values()) for r in rows]
        text = "\n".join(lines) + "\n"
    p = tmp_path / f"urls.{fmt}"
    data = text.encode()
    p.write_bytes(gzip.compress(data) if fmt.endswith(".gz") else data)
    items = _items(p)
    assert [(i.url, i.caption, i.uid, i.id) for i in items] == [
        ("http://h/1.jpg", "one, with comma", UIDS[0], 7), ("http://h/2.jpg", "two", UIDS[1], 8)]


def test_folder_of_tables_in_order(tmp_path):
    d = tmp_path / "meta"
    d.mkdir()
    for i in range(3):
        pq.write_table(pa.table({"url": [f"http://h/{i}-{j}.jpg" for j in range(2)]}), d / f"part-{i:03d}.parquet")
    items = _items(d)
    assert [i.url.rsplit("/", 1)[1] for i in items] == ["0-0.jpg", "0-1.jpg", "1-0.jpg", "1-1.jpg", "2-0.jpg", "2-1.jpg"]
    assert kind_of(str(d)) == "table"


def test_bad_rows_become_invalid_items(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"url": None}, {"url": "  "}, {"url": "ftp://x/y.jpg"}, {"url": "http://ok/1.jpg", "uid": "xyz"},
        {"url": "http://ok/2.jpg", "id": "seven"}, {"url": "http://ok/3.jpg"}]) + "\n")
    errs = [i.error for i in _items(p)]
    assert errs[0] == errs[1] == "empty url"
    assert "only http(s)" in errs[2] and "32 hex" in errs[3] and "not an integer" in errs[4]
    assert errs[5] is None


def test_bad_tables_give_clear_errors(tmp_path):
    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"link": ["http://x"]}), p)
    with pytest.raises(ValueError, match=r"t\.parquet: no column 'url'.*--url-col"):
        _items(p)
    assert _items(p, url_col="link")[0].url == "http://x"
    with pytest.raises(ValueError, match="--keep-cols names missing columns: nope"):
        _items(p, url_col="link", keep_cols=("nope",))
    j = tmp_path / "broken.jsonl"
    j.write_text('{"url": "http://a"}\n{not json\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: not valid JSON"):
        _items(j)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="not a readable parquet file"):
        _items(junk)
    with pytest.raises(FileNotFoundError):
        _items(tmp_path / "missing.csv")


def test_imagefolder_and_flat_folder(tmp_path):
    for rel in ["n01/a.JPEG", "n01/b.png", "n02/sub/c.jpg", "n02/notes.txt", "n02/.hidden.jpg"]:
        f = tmp_path / "in" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x")
    items = _items(tmp_path / "in")
    assert [(i.source, i.label) for i in items] == [("n01/a.JPEG", "n01"), ("n01/b.png", "n01"), ("n02/sub/c.jpg", "n02")]
    flat = _items(tmp_path / "in", folder_labels="off")
    assert all(i.label is None for i in flat)
    (tmp_path / "in" / "top.jpg").write_bytes(b"x")
    assert all(i.label is None for i in _items(tmp_path / "in"))  # images at the top: not ImageFolder


def _wds(path, samples):
    with open(path, "wb") as f, ShardWriter(f) as w:
        for key, members in samples:
            w.write(key, members)


def test_tar_shards_img2dataset_and_imagenet12k_styles(tmp_path):
    _wds(tmp_path / "a-00.tar", [
        ("000000000", {"jpg": b"J0", "txt": b"caption 0", "json": json.dumps({"url": "http://src/0.jpg", "key": "000000000"}).encode()}),
        ("000000001", {"jpg": b"J1", "cls": b"417", "json": b"{}"}),
    ])
    _wds(tmp_path / "a-01.tar", [("k2", {"json": b"{}"})])  # no image member
    items = _items(str(tmp_path / "a-{00..01}.tar"))
    assert [i.source for i in items] == ["a-00.tar#000000000", "a-00.tar#000000001", "a-01.tar#k2"]
    assert items[0].caption == "caption 0" and items[0].url == "http://src/0.jpg"
    assert items[1].label == "417"
    assert "no image member" in items[2].error
    from silverlabel.sources import load_bytes

    assert load_bytes(items[1]) == b"J1"


def test_tar_member_names_are_never_paths(tmp_path):
    """Malicious member names are only keys: reading a tar writes nothing anywhere."""
    p = tmp_path / "evil.tar"
    with tarfile.open(p, "w") as t:
        for name, data in [("../../etc/evil.jpg", b"E1"), ("/abs/path.jpg", b"E2"), ("ok.jpg", b"E3")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        t.addfile(link)
    before = set(os.listdir(tmp_path))
    items = _items(p)
    assert len(items) == 3  # the symlink is ignored
    assert set(os.listdir(tmp_path)) == before


def test_expand_braces():
    """Brace patterns as webdataset and bash read them (the braceexpand package)."""
    assert expand_braces("x-{000..002}.tar") == ["x-000.tar", "x-001.tar", "x-002.tar"]
    assert expand_braces("x-{00000,00002}.tar") == ["x-00000.tar", "x-00002.tar"]
    assert expand_braces("{train,val}-{0..1}.tar") == ["train-0.tar", "train-1.tar", "val-0.tar", "val-1.tar"]
    assert expand_braces("x-{a,b{1..2}}.tar") == ["x-a.tar", "x-b1.tar", "x-b2.tar"]  # nested
    assert expand_braces("x-{0..10..5}.tar") == ["x-0.tar", "x-5.tar", "x-10.tar"]  # a step
    assert expand_braces("x-{09..11}.tar") == ["x-09.tar", "x-10.tar", "x-11.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="not a valid brace pattern"):
        expand_braces("x-{0..2.tar")
    with pytest.raises(ValueError, match="more than"):
        expand_braces("x-{0..99999999}.tar")


def test_brace_lists_and_ranges_name_tars_and_tables(tmp_path):
    for name in ("train-00000", "train-00001", "val-00000"):
        _wds(tmp_path / f"{name}.tar", [("k", {"jpg": name.encode(), "json": b"{}"})])
        pq.write_table(pa.table({"url": [f"http://h.example/{name}.jpg"]}), tmp_path / f"{name}.parquet")
    items = _items(str(tmp_path / "{train-{00000,00001},val-00000}.tar"))
    assert [i.source for i in items] == ["train-00000.tar#k", "train-00001.tar#k", "val-00000.tar#k"]
    assert kind_of(str(tmp_path / "{train,val}-00000.parquet")) == "table"
    urls = [i.url for i in _items(str(tmp_path / "{val-00000,train-{00000..00001}}.parquet"))]
    assert urls == ["http://h.example/val-00000.jpg", "http://h.example/train-00000.jpg",
                    "http://h.example/train-00001.jpg"]
    with pytest.raises(FileNotFoundError, match=r"val-00001\.parquet"):
        _items(str(tmp_path / "{train,val}-{00000..00001}.parquet"))
    with pytest.raises(FileNotFoundError, match=r"val-00001\.tar"):
        _items(str(tmp_path / "{train,val}-00001.tar"))


def test_keep_cols_on_tars_from_the_json_member(tmp_path):
    meta = [{"url": "http://src/0.jpg", "score": 0.5, "n": 3, "ok": True, "tags": ["a", "b"], "note": "x"},
            {"url": "http://src/1.jpg", "score": 1, "n": None, "ok": False, "tags": [], "note": None},
            {"url": "http://src/2.jpg"}]
    _wds(tmp_path / "a.tar", [(f"k{i}", {"jpg": b"J", "json": json.dumps(m).encode()}) for i, m in enumerate(meta)])
    src = open_source(str(tmp_path / "a.tar"), SourceOptions(keep_cols=("score", "n", "ok", "tags", "note")))
    assert [(f.name, str(f.type)) for f in src.extra_fields] == [
        ("score", "double"), ("n", "int64"), ("ok", "bool"), ("tags", "string"), ("note", "string")]
    assert [i.extra for i in src.items()] == [
        {"score": 0.5, "n": 3, "ok": True, "tags": '["a", "b"]', "note": "x"},
        {"score": 1.0, "n": None, "ok": False, "tags": "[]", "note": None},
        {"score": None, "n": None, "ok": None, "tags": None, "note": None}]  # a key a sample lacks: null
    assert src.describe()["keep_cols"] == ["score", "n", "ok", "tags", "note"]
    assert _items(tmp_path / "a.tar")[0].extra is None  # nothing asked, nothing kept
    with pytest.raises(ValueError, match=r"a\.tar \(\.json members\): --keep-cols names missing columns: nope"):
        _items(tmp_path / "a.tar", keep_cols=("score", "nope"))
    with pytest.raises(ValueError, match="url would overwrite a samples-table column"):
        _items(tmp_path / "a.tar", keep_cols=("url",))
    _wds(tmp_path / "b.tar", [("k0", {"jpg": b"J"})])
    with pytest.raises(ValueError, match=r"b\.tar: --keep-cols reads keys of the samples' \.json members"):
        _items(tmp_path / "b.tar", keep_cols=("score",))
    _wds(tmp_path / "c.tar", [("k0", {"jpg": b"J", "json": b'{"n": 1}'}), ("k1", {"jpg": b"J", "json": b'{"n": "many"}'})])
    with pytest.raises(ValueError, match=r"c\.tar#k1: 'n' is 'many', not int64"):
        _items(tmp_path / "c.tar", keep_cols=("n",))


def test_keep_cols_on_tars_reach_the_samples_table(tmp_path):
    from httpserver import sample_jpeg

    from silverlabel.cli import main as cli_main

    _wds(tmp_path / "in.tar", [(f"k{i}", {"jpg": sample_jpeg(96, 72, seed=i),
                                          "json": json.dumps({"score": i / 4, "source": "web"}).encode()})
                               for i in range(3)])
    assert cli_main(["ingest", str(tmp_path / "in.tar"), "-o", str(tmp_path / "pool"), "--workers", "1",
                     "--no-progress", "--keep-cols", "score"]) == 0
    t = pq.read_table(next((tmp_path / "pool" / "samples").glob("*.parquet")))
    assert t.column("score").to_pylist() == [0.0, 0.25, 0.5] and t.schema.field("score").type == pa.float64()
    assert t.column("status").to_pylist() == ["success"] * 3


def test_keep_cols_on_a_remote_tar_index_it_once(tmp_path):
    pytest.importorskip("aiohttp")
    from rangeserver import RangeServer

    _wds(tmp_path / "a.tar", [(f"k{i}", {"jpg": os.urandom(50_000), "txt": f"cap {i}".encode(),
                                         "json": json.dumps({"n": i}).encode()}) for i in range(6)])
    with RangeServer({"/a.tar": (tmp_path / "a.tar").read_bytes()}) as server:
        src = TarSource(server.url("/a.tar"), SourceOptions(keep_cols=("n",)))
        items = list(src.items())
        assert [(i.caption, i.extra) for i in items] == [(f"cap {i}", {"n": i}) for i in range(6)]
        # one forward pass (one read-ahead block here): the types' peek and the items share it
        assert server.gets("/a.tar") == [f"bytes=0-{(tmp_path / 'a.tar').stat().st_size - 1}"]
        assert list(src.items()) == items  # a second listing indexes again, with the same items
    local = TarSource(str(tmp_path / "a.tar"), SourceOptions(keep_cols=("n",)))
    assert [(i.caption, i.extra, i.offset) for i in local.items()] == [(i.caption, i.extra, i.offset) for i in items]


def test_shard_writer_is_reproducible(tmp_path):
    for name in ("one.tar", "two.tar"):
        _wds(tmp_path / name, [("000000001", {"jpg": b"a", "json": b"{}"})])
    assert (tmp_path / "one.tar").read_bytes() == (tmp_path / "two.tar").read_bytes()
    assert [s.key for s in iter_tar_samples(str(tmp_path / "one.tar"))] == ["000000001"]
    with pytest.raises(ValueError):
        ShardWriter(io.BytesIO()).write("bad.key", {"jpg": b""})


class _CountingFile(io.BytesIO):
    """A seekable file that counts the reads that reach it (a remote file's requests)."""

    reads = 0

    def read(self, n=-1):
        self.reads += 1
        return super().read(n)


def test_remote_tar_index_keeps_side_members_and_skips_images(tmp_path):
    from silverlabel.formats.wds import read_member
    from silverlabel.sources.tars import _IndexingReader, read_json_member

    big = os.urandom(300_000)  # an image member: skipped by the index pass, never kept
    _wds(tmp_path / "a.tar", [(f"k{i}", {"jpg": big, "txt": f"cap {i}".encode(),
                                         "json": json.dumps({"n": i}).encode()}) for i in range(4)])
    raw = _CountingFile((tmp_path / "a.tar").read_bytes())
    reader = _IndexingReader(raw)
    samples = list(iter_tar_samples(reader))
    reader.indexing = False
    assert [s.key for s in samples] == ["k0", "k1", "k2", "k3"]
    assert sum(len(v) for v in reader.kept.values()) < 200  # the .txt and .json members only
    before = raw.reads
    assert [read_json_member(reader, s) for s in samples] == [{"n": i} for i in range(4)]
    assert [read_member(reader, *s.members["txt"]) for s in samples] == [f"cap {i}".encode() for i in range(4)]
    assert raw.reads == before  # served from the index pass: no second read
    assert read_member(reader, *samples[2].members["jpg"]) == big and raw.reads == before + 1


def test_remote_tar_index_keeps_a_bounded_amount(tmp_path, monkeypatch):
    from silverlabel.sources import tars
    from silverlabel.sources.tars import _IndexingReader, read_json_member

    monkeypatch.setattr(tars, "_KEPT_MAX", 40)
    _wds(tmp_path / "a.tar", [(f"k{i}", {"jpg": b"J" * 600, "json": json.dumps({"n": i, "pad": "x" * 10}).encode()})
                              for i in range(5)])
    reader = _IndexingReader(_CountingFile((tmp_path / "a.tar").read_bytes()))
    samples = list(iter_tar_samples(reader))
    reader.indexing = False
    assert 0 < reader.kept_bytes <= 40 and len(reader.kept) == 1
    assert [read_json_member(reader, s)["n"] for s in samples] == list(range(5))  # the rest read again


def test_remote_paths_are_told_apart_and_named_in_public(tmp_path):
    from silverlabel import fs
    from silverlabel.sources import describe_location, pattern_files

    from silverlabel.sources import _is_table, _is_tar_name

    # the name rules see a URL's path, not its query (no request is needed to tell them)
    assert _is_tar_name("https://h.example/shards/s-0001.tar?X-Amz-Signature=abc")
    assert _is_table("s3://bucket/meta/part-{00000..00003}.parquet")
    assert fs.basename("pipe:curl -s https://h/a/shard-0003.tar") == "shard-0003.tar"
    # a pipe: pattern is expanded as webdataset does it, and its command is not run to list it
    assert pattern_files("pipe:cat /x/s-{0..2}.tar") == [f"pipe:cat /x/s-{i}.tar" for i in range(3)]
    assert describe_location(str(tmp_path), []) == {"path": str(tmp_path)}
    assert fs.public("pipe:curl -s 'https://u:p@h/x.tar?sig=S&a=1'") == "pipe:curl -s 'https://h/x.tar?a=1'"
