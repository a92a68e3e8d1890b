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
import math
import struct
import threading
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageCms, ImageFile, UnidentifiedImageError

from silverlabel.errors import UserError

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
            raise UserError(f"min_side must be >= 1, got {self.min_side}")
        if self.max_shortest_edge is not None and self.max_shortest_edge < self.min_side:
            raise UserError(
                f"max_shortest_edge ({self.max_shortest_edge}) must be >= min_side ({self.min_side})"
            )
        if not 1 <= self.quality <= 100:
            raise UserError(f"quality must be in 1..100, got {self.quality}")
        if self.max_pixels < 1:
            raise UserError(f"max_pixels must be >= 1, got {self.max_pixels}")


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
    8x8 block against its median) and the same bits, including on flat images where only
    rounding noise separates the coefficients. Two exact shortcuts make it ~3x cheaper:

    * the 32x32 Lanczos downscale, which costs as much as decoding the JPEG when done by
      Pillow's scalar loops, is recomputed with BLAS on Pillow's own fixed-point
      coefficients (see :func:`_resize32`): integer sums in float64 are exact, so the
      pixels are Pillow's, bit for bit; sizes that fail a self-check use Pillow;
    * the DCT is a small matrix product; only when a coefficient lies so close to the
      median that rounding could flip its bit (flat or near-flat images) is the hash
      recomputed with ``scipy.fftpack`` and ``numpy.median``, exactly as ``imagehash``.
      scipy is thus rarely imported (its import costs ~0.5 s of CPU per process).

    >>> from PIL import Image
    >>> phash(Image.new("RGB", (64, 64), "white"))
    '8000000000000000'
    """
    gray = img.convert("L")
    pixels = _resize32(gray)
    if pixels is None:
        pixels = np.asarray(gray.resize((32, 32), Image.Resampling.LANCZOS))
    low = _DCT8 @ pixels.astype(np.float64) @ _DCT8.T  # == fftpack dct(dct(x,0),1)[:8,:8] up to rounding
    flat = np.sort(low, axis=None)
    med = (flat[31] + flat[32]) / 2
    if np.min(np.abs(low - med)) <= _DCT_MARGIN * max(1.0, float(np.abs(flat).max())):
        return _phash_reference(pixels)  # a bit could depend on rounding: do it imagehash's way
    bits = (low > med).ravel()
    return f"{int.from_bytes(np.packbits(bits).tobytes(), 'big'):016x}"


def _phash_reference(pixels: np.ndarray) -> str:
    import scipy.fftpack  # the DCT imagehash uses: same routine, same rounding

    dct = scipy.fftpack.dct(scipy.fftpack.dct(pixels, axis=0), axis=1)
    low = dct[:8, :8]
    bits = (low > np.median(low)).ravel()
    return f"{int.from_bytes(np.packbits(bits).tobytes(), 'big'):016x}"


# Rows 0..7 of the unnormalised DCT-II matrix scipy.fftpack uses: y[k] = 2 sum x[n] cos(pi k (2n+1) / 2N).
_DCT8 = 2.0 * np.cos(np.pi * np.arange(8)[:, None] * (2 * np.arange(32)[None, :] + 1) / 64.0)
# Relative distance to the median below which a bit is recomputed the reference way. The
# matrix product and pocketfft differ by ~1e-15 relative; 1e-9 leaves a wide safety margin.
_DCT_MARGIN = 1e-9

# --- exact Pillow Lanczos downscale to 32x32 (8-bit, one band), on BLAS -----------------
#
# Pillow resamples 8-bit images in two separable passes with fixed-point coefficients
# k = round(w * 2**22) (w: normalised Lanczos weights) and rounds every pass:
# out = clip((sum(pixel * k) + 2**21) >> 22, 0, 255). A pass is thus a matrix product of
# integers, which float64 computes exactly (the sums stay far below 2**53), followed by
# the same floor and clip. The integer coefficients are read back from Pillow itself by
# resizing impulses in an "I" (int32) image, whose pass computes round(2**22 * w) with the
# same weights, so no resampling code is re-implemented. Which pass Pillow runs first
# depends on the shape, so it is learnt per size from a probe image, along with a check
# that the result is Pillow's; a size that fails the check (or is small, or huge) uses
# Pillow. Plans are cached per (width, height) and built on a size's second sighting.

_ONE = 1 << 22
_HALF = float(1 << 21)
_INV = 1.0 / _ONE
_PLAN_SIDE = (33, 4096)  # sides outside this range use Pillow
_PLANS: dict[tuple[int, int], object] = {}  # (w, h) -> _Plan, or False for "use Pillow"
_SEEN: dict[tuple[int, int], int] = {}
_PLAN_LOCK = threading.Lock()
_MAX_PLANS = 64  # a plan holds two (side, 32) float64 matrices: <= ~4 MB each


def _weights(n_in: int) -> np.ndarray:
    """Pillow's 8-bit fixed-point Lanczos weights for n_in -> 32: matrix (n_in, 32)."""
    support = 3.0 * max(n_in / 32.0, 1.0)
    period = 2 * math.ceil(support) + 5  # > any window plus slack: one impulse per window
    rows = min(period, n_in)
    comb = np.zeros((rows, n_in), np.int32)
    for r in range(rows):
        comb[r, r::rows] = _ONE
    out = np.asarray(Image.fromarray(comb, "I").resize((32, rows), Image.Resampling.LANCZOS), np.float64)
    m = np.zeros((n_in, 32))
    scale = n_in / 32.0
    for x in range(32):
        center = (x + 0.5) * scale
        lo = max(0, math.floor(center - support) - 1)
        hi = min(n_in, math.ceil(center + support) + 2)
        j = np.arange(lo, hi)
        m[j, x] = out[j % rows, x]
    return m


def _bands(m: np.ndarray, block: int) -> list[tuple[int, int, int, int, np.ndarray]]:
    """Split the banded (n_in, 32) weights into row blocks with the outputs they reach."""
    out = []
    for lo in range(0, m.shape[0], block):
        part = m[lo : lo + block]
        nz = np.flatnonzero(part.any(axis=0))
        if len(nz):
            a, b = int(nz[0]), int(nz[-1]) + 1
            out.append((lo, lo + len(part), a, b, np.ascontiguousarray(part[:, a:b])))
    return out


def _fix(sums: np.ndarray) -> np.ndarray:
    return np.clip(np.floor((sums + _HALF) * _INV), 0.0, 255.0)


class _Plan:
    def __init__(self, w: int, h: int):
        block = max(64, 2 * math.ceil(3.0 * max(w, h) / 32.0))
        self.w, self.h = w, h
        self.horiz = _weights(w)  # (w, 32)
        self.vert = _weights(h)  # (h, 32)
        self.hbands = _bands(self.horiz, block)  # over input columns
        self.vbands = _bands(self.vert, block)  # over input rows
        self.vertical_first: bool | None = None

    def run(self, a: np.ndarray, vertical_first: bool) -> np.ndarray:
        if vertical_first:
            tmp = np.zeros((32, self.w))
            for lo, hi, ya, yb, k in self.vbands:
                tmp[ya:yb] += k.T @ a[lo:hi]
            return _fix(_fix(tmp) @ self.horiz)
        tmp = np.zeros((self.h, 32))
        for lo, hi, xa, xb, k in self.hbands:
            tmp[:, xa:xb] += a[:, lo:hi] @ k
        return _fix(self.vert.T @ _fix(tmp))

    def learn(self) -> bool:
        """Find Pillow's pass order for this size on noise; False if neither matches."""
        rng = np.random.default_rng(self.w * 7919 + self.h)
        for _ in range(2):
            probe = rng.integers(0, 256, (self.h, self.w), dtype=np.uint8)
            ref = np.asarray(Image.fromarray(probe, "L").resize((32, 32), Image.Resampling.LANCZOS))
            a = probe.astype(np.float64)
            hits = [vf for vf in (False, True) if np.array_equal(self.run(a, vf), ref)]
            if len(hits) != 1 or (self.vertical_first is not None and hits[0] != self.vertical_first):
                return False
            self.vertical_first = hits[0]
        return True


_THREAD = threading.local()


def _blas_single_thread() -> None:
    """Make numpy's OpenBLAS run this thread's products on this thread only.

    The products here are small; OpenBLAS would otherwise hand them to its own threads,
    whose busy-waiting roughly doubles the CPU used next to other workers. Only the calling
    thread is affected (``openblas_set_num_threads_local``); a no-op where unavailable.
    """
    global _BLAS_SET_LOCAL
    if _BLAS_SET_LOCAL is None:
        _BLAS_SET_LOCAL = False
        try:
            import ctypes

            with open("/proc/self/maps") as maps:
                libs = {line.split()[-1] for line in maps if "openblas" in line.rsplit("/", 1)[-1]}
            for lib in sorted(libs):
                fn = getattr(ctypes.CDLL(lib), "openblas_set_num_threads_local", None)
                if fn is not None:
                    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
                    _BLAS_SET_LOCAL = fn
                    break
        except Exception:  # noqa: BLE001 - not Linux, other BLAS: leave it as it is
            _BLAS_SET_LOCAL = False
    if _BLAS_SET_LOCAL:
        _BLAS_SET_LOCAL(1)


_BLAS_SET_LOCAL = None


def _resize32(gray: Image.Image) -> np.ndarray | None:
    """``gray.resize((32, 32), LANCZOS)`` as a uint8 array, exactly; None: use Pillow."""
    size = gray.size
    plan = _PLANS.get(size)
    if plan is None:
        if not all(_PLAN_SIDE[0] <= s <= _PLAN_SIDE[1] for s in size):
            return None
        with _PLAN_LOCK:
            seen = _SEEN[size] = _SEEN.get(size, 0) + 1
            if len(_SEEN) > 8 * _MAX_PLANS:
                _SEEN.clear()
            if seen < 2:
                return None  # a one-off size: building a plan costs more than it saves
            plan = _PLANS.get(size)
            if plan is None:
                try:
                    built = _Plan(*size)
                    plan = built if built.learn() else False
                except Exception:  # noqa: BLE001 - any surprise: Pillow does it
                    plan = False
                if len(_PLANS) >= _MAX_PLANS:
                    _PLANS.clear()
                _PLANS[size] = plan
    if plan is False:
        return None
    if not getattr(_THREAD, "blas_one", False):
        _THREAD.blas_one = True
        _blas_single_thread()
    a = np.asarray(gray, dtype=np.float64)
    return plan.run(a, plan.vertical_first).astype(np.uint8)


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
