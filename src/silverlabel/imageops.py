"""The image kernel: decode, orient, convert, filter, resize, encode, hash.

Everything an ingest worker does to one image's bytes lives here, as a pure function
of (bytes, :class:`ImageConfig`) that never raises for bad images: the outcome is an
:class:`ImageResult` whose ``status`` says what happened.

    >>> from silverlabel.imageops import ImageConfig, process_image
    >>> import io; from PIL import Image
    >>> buf = io.BytesIO(); Image.new("RGB", (800, 1000), "teal").save(buf, "PNG")
    >>> r = process_image(buf.getvalue(), ImageConfig(max_shortest_edge=600))
    >>> (r.status, r.width, r.height, r.original_width, r.reencoded)
    ('success', 600, 750, 800, True)

Rules (the imagenet-12k-wds recipe): images whose shorter side is under ``min_side`` are
dropped (``too_small``); the shortest edge is capped at ``max_shortest_edge`` with a
high-quality (Lanczos) downscale and never upscaled; EXIF orientation is applied; CMYK,
grayscale, palette and alpha images become RGB (alpha composited on white); EXIF is
stripped, the colour profile kept. An RGB JPEG that needs no pixel change keeps its
original compressed data (only the metadata segments are removed), so nothing is lost to
a second JPEG generation. The pHash recorded is exactly ``str(imagehash.phash(img))`` of
the *stored* image.
"""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageCms, ImageFile, UnidentifiedImageError

# Pillow must not silently accept truncated files: a truncated JPEG is a failed decode.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# The pixel cap is ImageConfig.max_pixels, checked from the header before decoding;
# Pillow's own global limit would otherwise override a user's larger cap.
Image.MAX_IMAGE_PIXELS = None

STATUS_SUCCESS = "success"
STATUS_FAILED_DECODE = "failed_decode"
STATUS_TOO_SMALL = "too_small"
STATUS_BOMB = "decompression_bomb"

_ORIENT_OPS = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT,),
    3: (Image.Transpose.ROTATE_180,),
    4: (Image.Transpose.FLIP_TOP_BOTTOM,),
    5: (Image.Transpose.TRANSPOSE,),
    6: (Image.Transpose.ROTATE_270,),
    7: (Image.Transpose.TRANSVERSE,),
    8: (Image.Transpose.ROTATE_90,),
}


@dataclass(frozen=True)
class ImageConfig:
    """How images are filtered and stored.

    ``max_shortest_edge=None`` keeps the size; ``max_pixels`` is the decompression-bomb cap
    checked from the header, before any pixel is decoded.
    """

    min_side: int = 48
    max_shortest_edge: int | None = 600
    quality: int = 90
    max_pixels: int = 100_000_000

    def __post_init__(self) -> None:
        if self.min_side < 1:
            raise ValueError(f"min_side must be >= 1, got {self.min_side}")
        if self.max_shortest_edge is not None and self.max_shortest_edge < self.min_side:
            raise ValueError(
                f"max_shortest_edge ({self.max_shortest_edge}) must be >= min_side ({self.min_side})"
            )
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {self.quality}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")


@dataclass
class ImageResult:
    """Outcome of :func:`process_image` for one image.

    ``data`` is the JPEG to store (None unless ``status == "success"``); ``sha256`` is the
    digest of the *input* bytes (as img2dataset and DataComp record it, so a download can be
    verified against the source); ``imagehash`` is the pHash of the stored image.
    """

    status: str
    error: str = ""
    data: bytes | None = None
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    sha256: str | None = None
    imagehash: str | None = None
    reencoded: bool = False


def phash(img: Image.Image) -> str:
    """64-bit perceptual hash as 16 hex digits, identical to ``str(imagehash.phash(img))``.

    Same steps as the ``imagehash`` package (grayscale, 32x32 Lanczos, 2-D DCT-II, low
    8x8 block against its median) with the same DCT routine, so the bits agree exactly,
    including on flat images where only rounding noise separates the coefficients.

    >>> from PIL import Image
    >>> phash(Image.new("RGB", (64, 64), "white"))
    '8000000000000000'
    """
    import scipy.fftpack  # the DCT imagehash uses: same routine, same rounding

    small = img.convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    pixels = np.asarray(small)
    dct = scipy.fftpack.dct(scipy.fftpack.dct(pixels, axis=0), axis=1)
    low = dct[:8, :8]
    bits = (low > np.median(low)).ravel()
    value = int.from_bytes(np.packbits(bits).tobytes(), "big")
    return f"{value:016x}"


def strip_jpeg_metadata(data: bytes) -> bytes:
    """Remove EXIF/XMP (APP1) and Photoshop (APP13) segments from a JPEG, losslessly.

    The compressed image data, JFIF/Adobe markers and the ICC colour profile (APP2) are
    kept byte for byte, so the decoded pixels do not change. Raises ``ValueError`` on a
    stream that is not a well-formed JPEG header.

    >>> strip_jpeg_metadata(b"\\xff\\xd8\\xff\\xe1\\x00\\x04ab\\xff\\xda\\x00\\x02xyz")
    b'\\xff\\xd8\\xff\\xda\\x00\\x02xyz'
    """
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG (no SOI marker)")
    out = [b"\xff\xd8"]
    pos = 2
    n = len(data)
    while pos < n:
        if data[pos] != 0xFF:
            raise ValueError(f"bad JPEG marker at byte {pos}")
        marker = data[pos + 1] if pos + 1 < n else None
        if marker is None:
            raise ValueError("truncated JPEG header")
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA or marker == 0xD9:  # start of scan / end: copy the rest verbatim
            out.append(data[pos:])
            return b"".join(out)
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # standalone markers
            out.append(data[pos : pos + 2])
            pos += 2
            continue
        if pos + 4 > n:
            raise ValueError("truncated JPEG header")
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        end = pos + 2 + length
        if length < 2 or end > n:
            raise ValueError("truncated JPEG segment")
        if marker not in (0xE1, 0xED):
            out.append(data[pos:end])
        pos = end
    raise ValueError("JPEG has no image data")


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(0x0112, 1)
        value = int(value)
    except Exception:  # malformed EXIF: treat as unrotated rather than failing the image
        return 1
    return value if value in _ORIENT_OPS or value == 1 else 1


def _profile_space(icc: bytes | None) -> str | None:
    """Colour space of an ICC profile from its header ('RGB ', 'GRAY', 'CMYK', ...)."""
    if not icc or len(icc) < 20:
        return None
    return icc[16:20].decode("ascii", "replace")


def _to_rgb(img: Image.Image, icc: bytes | None) -> tuple[Image.Image, bytes | None]:
    """Convert any mode to RGB; returns the image and the profile that still applies."""
    mode = img.mode
    if mode == "RGB":
        return img, icc if _profile_space(icc) == "RGB " else None
    if mode == "CMYK":
        if _profile_space(icc) == "CMYK":
            try:  # honour the embedded CMYK profile: convert to sRGB properly
                src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
                dst = ImageCms.createProfile("sRGB")
                return ImageCms.profileToProfile(img, src, dst, outputMode="RGB"), None
            except Exception:
                pass
        return img.convert("RGB"), None
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.uint32 if mode == "I" else np.uint16)
        if mode == "I":
            arr = np.clip(arr, 0, 65535)
        img = Image.fromarray((arr >> 8).astype(np.uint8), "L")
        mode = "L"
    if mode == "F":
        arr = np.clip(np.asarray(img), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "L")
        mode = "L"
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(background, rgba).convert("RGB")
    else:
        rgb = img.convert("RGB")
    return rgb, icc if _profile_space(icc) == "RGB " else None


def _target_size(w: int, h: int, cap: int | None) -> tuple[int, int]:
    short = min(w, h)
    if cap is None or short <= cap:
        return w, h
    scale = cap / short
    if w <= h:
        return cap, max(1, round(h * scale))
    return max(1, round(w * scale)), cap


def _fail(status: str, error: str, sha: str | None = None) -> ImageResult:
    return ImageResult(status=status, error=error, sha256=sha)


def process_image(raw: bytes, cfg: ImageConfig | None = None) -> ImageResult:
    """Turn downloaded/read bytes into the JPEG to store, with its metadata.

    Never raises for a bad image: the status is one of ``success``, ``failed_decode``,
    ``too_small`` or ``decompression_bomb``, with a one-line ``error``.

    >>> process_image(b"<html>oops</html>").status
    'failed_decode'
    """
    cfg = cfg or ImageConfig()
    sha = hashlib.sha256(raw).hexdigest()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's EXIF/ICC chatter is not our error
            return _process(raw, cfg, sha)
    except Image.DecompressionBombError as e:
        return _fail(STATUS_BOMB, str(e), sha)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return _fail(STATUS_FAILED_DECODE, f"{type(e).__name__}: {msg}", sha)
    except MemoryError:
        return _fail(STATUS_BOMB, "out of memory while decoding", sha)
    except Exception as e:  # a decoder bug must not take the shard down
        return _fail(STATUS_FAILED_DECODE, f"{type(e).__name__}: {e}", sha)


def _process(raw: bytes, cfg: ImageConfig, sha: str) -> ImageResult:
    img = Image.open(io.BytesIO(raw))
    fmt = img.format
    w0, h0 = img.size
    if w0 * h0 > cfg.max_pixels:
        return _fail(STATUS_BOMB, f"{w0}x{h0} = {w0 * h0} pixels exceeds the cap of {cfg.max_pixels}", sha)
    orient = _orientation(img) if fmt in ("JPEG", "TIFF", "WEBP", "PNG", "MPO") else 1
    swapped = orient in (5, 6, 7, 8)
    ow, oh = (h0, w0) if swapped else (w0, h0)
    if min(ow, oh) < cfg.min_side:
        return ImageResult(
            status=STATUS_TOO_SMALL,
            error=f"shorter side {min(ow, oh)} px < min_side {cfg.min_side}",
            original_width=ow,
            original_height=oh,
            sha256=sha,
        )
    tw, th = _target_size(ow, oh, cfg.max_shortest_edge)
    icc = img.info.get("icc_profile")
    needs_resize = (tw, th) != (ow, oh)

    passthrough = fmt == "JPEG" and img.mode == "RGB" and orient == 1 and not needs_resize
    if passthrough:
        # Already what we would store: keep the compressed data, drop EXIF/XMP only.
        img.load()
        try:
            data = strip_jpeg_metadata(raw) if _has_strippable_segment(raw) else raw
        except ValueError:
            data = None
        if data is not None:
            return ImageResult(
                status=STATUS_SUCCESS,
                data=data,
                width=ow,
                height=oh,
                original_width=ow,
                original_height=oh,
                sha256=sha,
                imagehash=phash(img),
                reencoded=False,
            )

    if fmt == "JPEG" and needs_resize:
        # Decode at a reduced DCT scale while staying >= 2x the target (Pillow's
        # reducing_gap idea): much faster, and Lanczos does the final high-quality step.
        dw, dh = (th * 2, tw * 2) if swapped else (tw * 2, th * 2)
        img.draft(img.mode if img.mode in ("RGB", "L", "CMYK") else None, (dw, dh))
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    img.load()
    if orient != 1:
        for op in _ORIENT_OPS[orient]:
            img = img.transpose(op)
    img, icc_out = _to_rgb(img, icc)
    if img.size != (tw, th):
        img = img.resize((tw, th), Image.Resampling.LANCZOS, reducing_gap=3.0)
    buf = io.BytesIO()
    save_kw: dict = {"quality": cfg.quality}
    if icc_out:
        save_kw["icc_profile"] = icc_out
    img.save(buf, "JPEG", **save_kw)
    data = buf.getvalue()
    stored = Image.open(io.BytesIO(data))  # hash what a reader of the shard will decode
    return ImageResult(
        status=STATUS_SUCCESS,
        data=data,
        width=tw,
        height=th,
        original_width=ow,
        original_height=oh,
        sha256=sha,
        imagehash=phash(stored),
        reencoded=True,
    )


def _has_strippable_segment(data: bytes) -> bool:
    """Cheap check for APP1/APP13 markers in the header (before the first scan)."""
    head_end = data.find(b"\xff\xda")
    head = data[: head_end if head_end > 0 else 65536]
    return b"\xff\xe1" in head or b"\xff\xed" in head


def image_size_from_header(raw: bytes) -> tuple[int, int] | None:
    """Width and height from the header only (no pixel decode); None if unreadable."""
    try:
        return Image.open(io.BytesIO(raw)).size
    except Exception:
        return None
