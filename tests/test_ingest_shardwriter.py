"""``ShardWriter`` writes the bytes ``tarfile`` would (issue 14: it writes each member's data
in one call instead of through ``tarfile.addfile``'s 16 KiB copy loop): same headers, same
padding, same end of archive, from any starting offset, so shards stay byte-identical
across versions (resumed pools, recorded md5s)."""

from __future__ import annotations

import io
import os
import random
import tarfile

import pytest

from silverlabel.formats.wds import FIXED_MTIME, HashingFile, ShardWriter, iter_tar_samples, read_member


def _tarfile_bytes(samples: list[tuple[str, dict[str, bytes]]], lead: bytes = b"") -> bytes:
    """What ShardWriter wrote before: tarfile.addfile with the same fixed header fields."""
    buf = io.BytesIO()
    buf.write(lead)
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = FIXED_MTIME
                info.mode = 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.type = tarfile.REGTYPE
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _writer_bytes(samples: list[tuple[str, dict[str, bytes]]], lead: bytes = b"") -> bytes:
    buf = io.BytesIO()
    buf.write(lead)
    with ShardWriter(buf) as w:
        for key, members in samples:
            w.write(key, members)
    return buf.getvalue()


SIZES = [0, 1, 511, 512, 513, 16 * 1024, 16 * 1024 + 1, 80_000, 1_000_003]


@pytest.mark.parametrize("lead", [b"", b"x" * 700, b"y" * 10240])
def test_same_bytes_as_tarfile(lead):
    rng = random.Random(7)
    samples = [(f"{i:09d}", {"jpg": os.urandom(n), "json": b'{"k": %d}' % i, "txt": "ü".encode() * (i % 3)})
               for i, n in enumerate(SIZES)]
    samples.append(("only-one_member", {"cls": str(rng.randrange(1000)).encode()}))
    want = _tarfile_bytes(samples, lead)
    got = _writer_bytes(samples, lead)
    assert got == want
    assert len(got) % tarfile.RECORDSIZE == 0  # padded by the file's offset, as tarfile pads
    # and it reads back: every member where iter_tar_samples finds it
    f = io.BytesIO(got[len(lead):])
    found = {s.key: {ext: read_member(f, *loc) for ext, loc in s.members.items()} for s in iter_tar_samples(f)}
    assert found == dict(samples)


def test_empty_archive_and_close_twice():
    buf = io.BytesIO()
    w = ShardWriter(buf)
    w.close()
    w.close()
    assert buf.getvalue() == _tarfile_bytes([]) == b"\0" * tarfile.RECORDSIZE


def test_a_name_tarfile_refuses_is_refused(tmp_path):
    key = "k" * 120  # USTAR: a name over 100 characters without a folder to split off
    with pytest.raises(ValueError) as want:
        _tarfile_bytes([(key, {"jpg": b"x"})])
    with pytest.raises(ValueError) as got:
        _writer_bytes([(key, {"jpg": b"x"})])
    assert str(got.value) == str(want.value)


def test_md5_through_hashing_file_is_the_files(tmp_path):
    import hashlib

    path = tmp_path / "s.tar"
    with open(path, "wb") as f:
        hf = HashingFile(f)
        with ShardWriter(hf) as w:
            w.write("000000001", {"jpg": os.urandom(70_000), "json": b"{}"})
    assert hf.md5.hexdigest() == hashlib.md5(path.read_bytes()).hexdigest()
    assert path.read_bytes() == _tarfile_bytes([("000000001", {"jpg": read_member(open(path, "rb"), 512, 70_000),
                                                                "json": b"{}"})])


@pytest.mark.parametrize("key_len", [1, 9, 95, 96, 97, 120])
@pytest.mark.parametrize("ext", ["jpg", "json", "seg.png", "ü"])
def test_member_names_of_every_length_give_tarfiles_headers(key_len, ext):
    """Up to 100 bytes a header is filled in from a template of tarfile's; beyond, or not
    ASCII, tarfile's own (which refuses a USTAR name it cannot split)."""
    key = ("k" * key_len)[:key_len]
    samples = [(key, {ext: b"x" * key_len})]
    try:
        want = _tarfile_bytes(samples)
    except ValueError as e:
        with pytest.raises(ValueError, match=str(e)):
            _writer_bytes(samples)
        return
    assert _writer_bytes(samples) == want


def test_read_members_joins_neighbours_and_gives_each_members_bytes(tmp_path, monkeypatch):
    """``read_members``: every location's bytes, as one read each would give, in the order
    asked, whatever the order and spacing (neighbours joined into one read, far or backward
    ones read alone, spans capped); a member past the end of the file is an OSError."""
    from silverlabel.formats import wds

    rng = random.Random(5)
    path = tmp_path / "shard.tar"
    with open(path, "wb") as f, ShardWriter(f) as w:
        for i in range(60):
            w.write(f"{i:04d}", {"jpg": rng.randbytes(rng.randrange(1, 40000)), "cls": str(i).encode(),
                                 "json": b"{}" * rng.randrange(0, 50)})
    samples = list(iter_tar_samples(str(path)))
    locs = [loc for s in samples for loc in s.members.values()]
    with open(path, "rb") as f:
        want = {loc: read_member(f, *loc) for loc in locs}
    reads = []
    real = os.pread
    monkeypatch.setattr(wds.os, "pread", lambda fd, n, off: reads.append(n) or real(fd, n, off))
    monkeypatch.setattr(wds, "READ_SPAN", 300_000)
    fd = os.open(path, os.O_RDONLY)
    try:
        for order in (locs, locs[::3], locs[::-1], [locs[5], locs[5], locs[2]] + rng.sample(locs, 40)):
            reads.clear()
            assert wds.read_members(fd, order) == [want[loc] for loc in order]
            assert max(reads) <= 300_000 + 40000
        reads.clear()
        wds.read_members(fd, locs)
        assert 1 < len(reads) < len(locs) // 10  # the shard's members in a few span reads
        size = os.path.getsize(path)
        with pytest.raises(OSError, match="truncated"):
            wds.read_members(fd, [locs[0], (size - 10, 20)])
        # lenient (label counts such a member as a failed decode): what is there, as one read gives
        assert wds.read_members(fd, [locs[0], (size - 10, 20), (size + 5, 3)], strict=False) == [
            want[locs[0]], os.pread(fd, 20, size - 10), b""]
    finally:
        os.close(fd)
