"""Tests for silverlabel.demodata (bundled photos, photo-like generator, loopback server) and
the same server in its own process (fixtures.imageserver, for the benchmarks)."""

from __future__ import annotations

import http.client
import io
import urllib.error
import urllib.request

import pytest
from PIL import Image

from fixtures.imageserver import ImageServerProcess, as_served_files, serve_in_process
from silverlabel.demodata import ImageServer, photo_like_images, real_photos

N = 20


@pytest.fixture(scope="module")
def photos20() -> list[tuple[str, bytes]]:
    return list(photo_like_images(N))


def test_real_photos_decode_and_formats():
    photos = real_photos()
    names = [n for n, _ in photos]
    assert len(photos) >= 8
    assert len(set(names)) == len(names)
    assert "astronaut.jpg" in names
    exts = {n.rsplit(".", 1)[1] for n in names}
    assert exts == {"jpg", "png"}
    modes = set()
    for name, data in photos:
        im = Image.open(io.BytesIO(data))
        assert im.format == ("PNG" if name.endswith(".png") else "JPEG")
        im.load()
        assert min(im.size) >= 100
        modes.add(im.mode)
    assert {"RGB", "L"} <= modes


def test_photo_like_deterministic(photos20):
    again = list(photo_like_images(N))
    assert again == photos20
    # image i does not depend on n
    assert list(photo_like_images(5)) == photos20[:5]
    assert list(photo_like_images(3, start=7)) == photos20[7:10]
    other_seed = list(photo_like_images(5, seed=1))
    assert [b for _, b in other_seed] != [b for _, b in photos20[:5]]


def test_photo_like_names_sizes_and_content(photos20):
    assert [n for n, _ in photos20] == [f"photo_{i:05d}.jpg" for i in range(N)]
    sizes = set()
    for _, data in photos20:
        im = Image.open(io.BytesIO(data))
        assert im.format == "JPEG"
        assert im.mode in ("RGB", "L")
        w, h = im.size
        sizes.add((w, h))
        assert {w, h} <= {640, 480, 600, 450, 427}
        # real content, not a flat image
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 60
    assert (640, 480) in sizes
    assert len(photos20) == len({b for _, b in photos20})


def test_photo_like_custom_size():
    for _, data in photo_like_images(6, size=(320, 200), seed=3):
        w, h = Image.open(io.BytesIO(data)).size
        assert 280 <= max(w, h) <= 320 and 180 <= min(w, h) <= 215


def _files(photos):
    files = as_served_files(photos[:3])
    files["robots.jpg"] = (photos[3][1], "image/jpeg", {"X-Robots-Tag": "noai"})
    files["raw.bin"] = b"\x00\x01"
    return files


def test_server_serves_bytes_and_types(photos20):
    files = _files(photos20)
    with ImageServer(files) as srv:
        assert srv.base_url.startswith("http://127.0.0.1:") and srv.port > 0
        for name, data in photos20[:3]:
            with urllib.request.urlopen(srv.url(name), timeout=10) as r:
                assert r.status == 200
                assert r.headers["Content-Type"] == "image/jpeg"
                assert int(r.headers["Content-Length"]) == len(data)
                assert r.read() == data
        with urllib.request.urlopen(srv.url("/robots.jpg"), timeout=10) as r:
            assert r.headers["X-Robots-Tag"] == "noai"
        with urllib.request.urlopen(srv.url("raw.bin") + "?x=1", timeout=10) as r:
            assert r.headers["Content-Type"] == "application/octet-stream"
            assert r.read() == b"\x00\x01"
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(srv.url("missing.jpg"), timeout=10)
        assert ei.value.code == 404
        assert srv.request_count >= 5
    # stopped: connection refused
    with pytest.raises(OSError):
        urllib.request.urlopen(srv.url(photos20[0][0]), timeout=2)


def test_server_keep_alive(photos20):
    files = as_served_files(photos20)
    with ImageServer(files) as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        try:
            sockets = set()
            for name, data in photos20[:5]:
                conn.request("GET", "/" + name)
                resp = conn.getresponse()
                assert resp.status == 200
                assert resp.version == 11
                assert resp.read() == data
                assert not resp.will_close
                sockets.add(id(conn.sock))
            conn.request("HEAD", "/" + photos20[0][0])
            resp = conn.getresponse()
            assert int(resp.getheader("Content-Length")) == len(photos20[0][1])
            assert resp.read() == b""
            sockets.add(id(conn.sock))
            assert len(sockets) == 1  # one TCP connection for all requests
        finally:
            conn.close()


def test_server_in_separate_process(photos20):
    files = as_served_files(photos20[:4])
    srv = serve_in_process(files)
    try:
        assert isinstance(srv, ImageServerProcess)
        assert srv.pid is not None and srv.port > 0
        name, data = photos20[2]
        with urllib.request.urlopen(srv.url(name), timeout=10) as r:
            assert r.read() == data
            assert r.headers["Content-Type"] == "image/jpeg"
    finally:
        srv.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(srv.url(photos20[0][0]), timeout=2)
