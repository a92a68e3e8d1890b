"""The image kernel against real images and the imagehash package."""

from __future__ import annotations

import io

import imagehash
import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageCms

from silverlabel.imageops import ImageConfig, phash, process_image, strip_jpeg_metadata


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


@pytest.fixture(scope="module")
def chelsea() -> Image.Image:
    return Image.fromarray(skimage.data.chelsea())  # 451x300 real photo


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skimage.data.astronaut())  # 512x512


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_decodes_every_format_to_rgb_jpeg(chelsea, fmt):
    src = chelsea if fmt != "GIF" else chelsea.convert("P")
    r = process_image(_encode(src, fmt))
    assert r.status == "success", r.error
    out = _decode(r.data)
    assert (out.format, out.mode, out.size) == ("JPEG", "RGB", (451, 300))
    assert (r.width, r.height, r.original_width, r.original_height) == (451, 300, 451, 300)
    diff = np.abs(np.asarray(out, np.int16) - np.asarray(chelsea.convert("RGB"), np.int16)).mean()
    assert diff < (25 if fmt == "GIF" else 4)  # palette GIF is lossy by nature


def test_phash_equals_imagehash_on_stored_image(chelsea, astronaut):
    imgs = [chelsea, astronaut, Image.fromarray(skimage.data.camera()), Image.new("RGB", (300, 200), "red")]
    for img in imgs:
        for cap in (600, 128):
            r = process_image(_encode(img, "PNG"), ImageConfig(max_shortest_edge=cap))
            assert r.imagehash == str(imagehash.phash(_decode(r.data)))
            assert len(r.imagehash) == 16
    rng = np.random.default_rng(0)
    for _ in range(20):
        arr = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
        assert phash(Image.fromarray(arr)) == str(imagehash.phash(Image.fromarray(arr)))


def test_rgb_jpeg_needing_no_change_keeps_its_bytes(chelsea):
    raw = _encode(chelsea, "JPEG", quality=80)
    r = process_image(raw)
    assert r.status == "success" and not r.reencoded
    assert r.data == raw


def test_exif_is_stripped_losslessly_and_icc_kept(chelsea):
    exif = Image.Exif()
    exif[0x010F] = "CameraMaker"  # Make
    exif[0x0112] = 1
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    raw = _encode(chelsea, "JPEG", quality=85, exif=exif.tobytes(), icc_profile=icc)
    r = process_image(raw)
    assert r.status == "success" and not r.reencoded
    out = _decode(r.data)
    assert not out.getexif() and b"CameraMaker" not in r.data
    assert out.info.get("icc_profile") == icc
    assert np.array_equal(np.asarray(out), np.asarray(_decode(raw)))  # same pixels: no second generation


def test_exif_orientation_applied(chelsea):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    raw = _encode(chelsea.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif.tobytes())
    r = process_image(raw)
    assert r.status == "success" and r.reencoded
    assert (r.width, r.height) == (451, 300)
    out = _decode(r.data)
    assert not out.getexif()
    diff = np.abs(np.asarray(out, np.int16) - np.asarray(chelsea, np.int16)).mean()
    assert diff < 6


def test_modes_convert_to_rgb():
    rgba = Image.new("RGBA", (100, 80), (255, 0, 0, 0))  # fully transparent red -> white
    r = process_image(_encode(rgba, "PNG"))
    assert np.asarray(_decode(r.data)).min() > 245
    la = Image.new("LA", (100, 80), (0, 128))  # half-transparent black -> mid grey
    px = np.asarray(_decode(process_image(_encode(la, "PNG")).data))
    assert 110 < px.mean() < 145
    gray = Image.new("L", (100, 80), 77)
    out = _decode(process_image(_encode(gray, "PNG")).data)
    assert out.mode == "RGB" and abs(int(np.asarray(out).mean()) - 77) <= 2
    cmyk = Image.new("CMYK", (100, 80), (0, 255, 255, 0))  # red in CMYK
    out = np.asarray(_decode(process_image(_encode(cmyk, "JPEG", quality=95)).data)).reshape(-1, 3).mean(0)
    assert out[0] > 200 and out[1] < 60 and out[2] < 60
    p = Image.new("P", (100, 80), 3)
    assert _decode(process_image(_encode(p, "PNG")).data).mode == "RGB"
    i16 = Image.fromarray(np.full((80, 100), 65535, np.uint16))
    assert np.asarray(_decode(process_image(_encode(i16, "PNG")).data)).min() > 245


def test_size_rules(astronaut):
    tiny = process_image(_encode(astronaut.resize((60, 40)), "PNG"))
    assert tiny.status == "too_small" and "40" in tiny.error and tiny.data is None
    ok = process_image(_encode(astronaut.resize((60, 48)), "PNG"))
    assert ok.status == "success" and (ok.width, ok.height) == (60, 48)  # never upscaled
    big = Image.fromarray(skimage.data.astronaut()).resize((2400, 1600))
    r = process_image(_encode(big, "JPEG", quality=92))
    assert (r.width, r.height, r.original_width, r.original_height) == (900, 600, 2400, 1600)
    assert _decode(r.data).size == (900, 600)
    portrait = process_image(_encode(big.transpose(Image.Transpose.ROTATE_90), "PNG"), ImageConfig(max_shortest_edge=300))
    assert (portrait.width, portrait.height) == (300, 450)
    keep = process_image(_encode(big, "PNG"), ImageConfig(max_shortest_edge=None))
    assert (keep.width, keep.height) == (2400, 1600)


def test_quality_setting(astronaut):
    raw = _encode(astronaut, "PNG")
    small = process_image(raw, ImageConfig(quality=30)).data
    large = process_image(raw, ImageConfig(quality=95)).data
    assert len(small) < len(large)


def test_bad_inputs_are_statuses_not_crashes(chelsea):
    assert process_image(b"").status == "failed_decode"
    assert process_image(b"<html><body>nope</body></html>").status == "failed_decode"
    raw = _encode(chelsea, "JPEG")
    r = process_image(raw[: len(raw) // 2])
    assert r.status == "failed_decode" and r.error
    # a decompression bomb: small file, huge header
    bomb = _encode(Image.new("L", (12000, 12000), 0), "PNG")
    assert len(bomb) < 1_000_000
    r = process_image(bomb, ImageConfig(max_pixels=50_000_000))
    assert r.status == "decompression_bomb" and "12000x12000" in r.error


def test_sha256_is_of_the_input_bytes(chelsea):
    import hashlib

    raw = _encode(chelsea, "PNG")
    assert process_image(raw).sha256 == hashlib.sha256(raw).hexdigest()


def test_strip_rejects_non_jpeg():
    with pytest.raises(ValueError):
        strip_jpeg_metadata(b"\x89PNG....")
