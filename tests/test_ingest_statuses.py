"""Ingest against a server that misbehaves on purpose: every row gets the right status,
and the stored pixels are right. Real sockets, the real pipeline (in-process engine)."""

from __future__ import annotations

import io

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from httpserver import (
    MisbehavingServer,
    bomb_png,
    cmyk_jpeg,
    exif_rotated_jpeg,
    gray_png,
    huge_jpeg,
    rgba_png,
    sample_jpeg,
    tiny_jpeg,
    truncated_jpeg,
)
from PIL import Image

from silverlabel.imageops import ImageConfig
from silverlabel.sources.http import FetchConfig
from silverlabel.stages.ingest import IngestConfig, run_ingest

# path on the server -> (expected status, substring of the error)
CASES = {
    "/ok.jpg": ("success", ""),
    "/status/404": ("failed_download", "HTTP 404"),
    "/flaky/a.jpg": ("success", ""),
    "/ratelimit/b.jpg": ("success", ""),
    "/hang": ("failed_download", "timeout"),
    "/big?size=3000000": ("failed_download", "byte cap"),
    "/big-no-length?size=3000000": ("failed_download", "byte cap"),
    "/html": ("failed_download", "content-type text/html"),
    "/truncated.jpg": ("failed_decode", ""),
    "/bomb.png": ("decompression_bomb", "exceeds the cap"),
    "/redirect/3": ("success", ""),
    "/redirect-loop": ("failed_download", "too many redirects"),
    "/noai": ("opted_out", "noai"),
    "/otherbot-noai": ("success", ""),
    "/cmyk.jpg": ("success", ""),
    "/rotated.jpg": ("success", ""),
    "/rgba.png": ("success", ""),
    "/gray.png": ("success", ""),
    "/tiny.jpg": ("too_small", "min_side"),
    "/huge.jpg": ("success", ""),
}


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("statuses")
    with MisbehavingServer() as server:
        server.add("/ok.jpg", sample_jpeg(200, 150, seed=3))
        server.add("/truncated.jpg", truncated_jpeg())
        server.add("/bomb.png", bomb_png(), content_type="image/png")
        server.add("/cmyk.jpg", cmyk_jpeg())
        server.add("/rotated.jpg", exif_rotated_jpeg(6, 200, 150))
        server.add("/rgba.png", rgba_png(), content_type="image/png")
        server.add("/gray.png", gray_png(), content_type="image/png")
        server.add("/tiny.jpg", tiny_jpeg())
        server.add("/huge.jpg", huge_jpeg())
        urls = [server.url(p) for p in CASES] + ["", "not a url"]
        table = tmp / "urls.parquet"
        pq.write_table(pa.table({"url": urls}), table)
        cfg = IngestConfig(
            sources=(str(table),),
            output=str(tmp / "ds"),
            samples_per_shard=8,
            workers=1,
            threads=8,
            image=ImageConfig(max_pixels=50_000_000),
            fetch=FetchConfig(timeout=1.5, max_bytes=1_000_000, retries=2, backoff=0.05, allow_private_network=True),
        )
        summary = run_ingest(cfg)
        served = {"huge": huge_jpeg(), "ua": server.last_headers("/ok.jpg").get("User-Agent")}
    rows = pq.read_table(tmp / "ds" / "samples").to_pylist()
    shards = sorted(str(p) for p in (tmp / "ds" / "shards").glob("*.tar"))
    samples = {s["__key__"]: s for s in wds.WebDataset(shards, shardshuffle=False)}
    return summary, rows, samples, served


def test_every_row_has_the_right_status(ingested):
    summary, rows, _, _ = ingested
    assert len(rows) == len(CASES) + 2
    for row, (path, (status, error)) in zip(rows, CASES.items()):
        assert row["status"] == status, (path, row["error"])
        assert error in row["error"], (path, row["error"])
    assert [r["status"] for r in rows[-2:]] == ["invalid_input", "invalid_input"]
    assert rows[-2]["error"] == "empty url" and "only http(s)" in rows[-1]["error"]
    assert sum(summary.counts.values()) == len(rows)


def test_stored_pixels_are_right(ingested):
    _, rows, samples, served = ingested
    by_path = {path: row for path, row in zip(CASES, rows)}
    assert {r["key"] for r in rows if r["status"] == "success"} == set(samples)

    def img(path):
        row = by_path[path]
        data = samples[row["key"]]["jpg"]
        im = Image.open(io.BytesIO(data))
        assert im.format == "JPEG" and im.mode == "RGB"
        # the default pHash is taken from the stored pixels before encoding: a few bits from
        # imagehash of the stored JPEG (test_imageops checks <= 2 bits on >= 99% of real photos;
        # these are synthetic test images)
        assert bin(int(str(imagehash.phash(im)), 16) ^ int(row["imagehash"], 16)).count("1") <= 6
        assert im.size == (row["width"], row["height"])
        return im, row

    im, row = img("/rotated.jpg")  # stored upright (EXIF orientation applied), EXIF gone
    assert (row["original_width"], row["original_height"]) == im.size and not im.getexif()
    im, _ = img("/cmyk.jpg")
    assert im.mode == "RGB"
    im, _ = img("/rgba.png")
    im, _ = img("/gray.png")
    px = np.asarray(im, np.int16)
    assert np.abs(px[..., 0] - px[..., 1]).max() <= 3  # still gray after RGB conversion
    im, row = img("/huge.jpg")
    assert min(im.size) == 600 and (row["original_width"], row["original_height"]) == (3000, 2000)
    assert im.size == (900, 600)
    img("/redirect/3")
    img("/ok.jpg")


def test_rotated_image_is_upright(ingested):
    _, rows, samples, _ = ingested
    row = dict(zip(CASES, rows))["/rotated.jpg"]
    raw = Image.open(io.BytesIO(exif_rotated_jpeg(6, 200, 150)))
    stored = Image.open(io.BytesIO(samples[row["key"]]["jpg"]))
    # the raw pixels are stored sideways; the stored image is the EXIF-transposed one
    from PIL import ImageOps

    upright = ImageOps.exif_transpose(raw)
    assert stored.size == upright.size
    diff = np.abs(np.asarray(stored, np.int16) - np.asarray(upright.convert("RGB"), np.int16)).mean()
    assert diff < 6


def test_user_agent_names_the_tool(ingested):
    assert ingested[3]["ua"].startswith("silverlabel/")
