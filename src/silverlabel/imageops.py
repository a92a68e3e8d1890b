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

import functools
import hashlib
import io
import math
import re
import struct
import threading
import time
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageCms, ImageFile, UnidentifiedImageError

from silverlabel.errors import UserError
from silverlabel.options import int_or_off, opt, positive_int

# Pillow must not silently accept truncated files: a truncated JPEG is a failed decode.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# The pixel cap is ImageConfig.max_pixels, checked from the header before decoding;
# Pillow's own global limit would otherwise override a user's larger cap.
Image.MAX_IMAGE_PIXELS = None

RESIZE_FILTERS = ("fast", "area", "lanczos")
PHASH_MODES = ("fast", "exact")

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

    min_side: int = opt(48, "drop images whose shorter side is smaller", type=positive_int, group="images")
    max_shortest_edge: int | None = opt(600, "downscale so the shortest edge is at most this; 0 keeps the size",
                                        type=int_or_off, group="images")
    quality: int = opt(90, "JPEG quality when re-encoding", type=int, group="images")
    max_pixels: int = opt(100_000_000, "decompression-bomb cap", type=positive_int, group="images", default_help="1e8")
    resize_filter: str = opt("fast", "downscale filter: fast (DCT-domain reduction for JPEGs, then bilinear below 2x and "
                             "area above), area (OpenCV INTER_AREA, img2dataset's default), lanczos (Pillow)",
                             choices=RESIZE_FILTERS, group="images")
    phash: str = opt("fast", "fast: pHash of the stored pixels before encoding (within 2 bits of exact on >= 99%% of "
                     "real photos); exact: str(imagehash.phash()) of the stored JPEG (a second decode)",
                     choices=PHASH_MODES, group="images")

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
        if self.resize_filter not in RESIZE_FILTERS:
            raise UserError(f"--resize-filter must be one of {', '.join(RESIZE_FILTERS)}, not {self.resize_filter!r}")
        if self.phash not in PHASH_MODES:
            raise UserError(f"--phash must be one of {', '.join(PHASH_MODES)}, not {self.phash!r}")


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
    return _phash_gray(np.asarray(img.convert("L")))


def _phash_gray(gray: np.ndarray) -> str:
    """:func:`phash` of a 2-D uint8 array (an "L" image's pixels), without a Pillow image
    unless its Lanczos has to do the 32x32 step."""
    pixels = _resize32(gray)
    if pixels is None:
        pixels = np.asarray(Image.fromarray(np.ascontiguousarray(gray), "L").resize((32, 32), Image.Resampling.LANCZOS))
    low = _DCT8 @ pixels.astype(np.float64) @ _DCT8.T  # == fftpack dct(dct(x,0),1)[:8,:8] up to rounding
    flat = np.sort(low, axis=None)
    med = (flat[31] + flat[32]) / 2
    if np.min(np.abs(low - med)) <= _DCT_MARGIN * max(1.0, float(np.abs(flat).max())):
        return _phash_reference(pixels)  # a bit could depend on rounding: do it imagehash's way
    bits = (low > med).ravel()
    return f"{int.from_bytes(np.packbits(bits).tobytes(), 'big'):016x}"


def _phash_lowpass(gray: np.ndarray) -> str:
    """The pHash of a 2-D uint8 array with Pillow's Lanczos weights for the 32x32 step and
    imagehash's DCT folded into two small matrices per side length (cached), in floating
    point: no per-pass rounding, so within rounding of :func:`_phash_gray`, at a fraction of
    its cost on sizes seen once (Pillow's own Lanczos there). For the fast mode only."""
    h, w = gray.shape
    if not all(_PLAN_SIDE[0] <= s <= _PLAN_SIDE[1] for s in (h, w)):
        return _phash_gray(gray)
    _one_blas_thread()  # else OpenBLAS's threads split (and spin after) this product: ~2x the CPU
    low = _lowpass(h) @ gray.astype(np.float64) @ _lowpass(w).T
    flat = np.sort(low, axis=None)
    med = (flat[31] + flat[32]) / 2
    return f"{int.from_bytes(np.packbits((low > med).ravel()).tobytes(), 'big'):016x}"


@functools.lru_cache(maxsize=512)
def _lowpass(n: int) -> np.ndarray:
    """(8, n): the 8 lowest DCT rows of imagehash's 32-point DCT after Pillow's n -> 32 Lanczos."""
    return np.ascontiguousarray(_DCT8 @ _lanczos32(n).T)


def _lanczos32(n: int) -> np.ndarray:
    """(n, 32): Pillow's normalised Lanczos-3 weights for n -> 32 (its ``precompute_coeffs``,
    in floating point, not rounded to its fixed point): built in numpy in microseconds, where
    reading Pillow's own integers back (:func:`_weights`) costs ~0.3 ms a side length."""
    scale = n / 32.0
    filterscale = max(scale, 1.0)
    support = 3.0 * filterscale
    center = (np.arange(32) + 0.5) * scale
    lo = np.maximum((center - support + 0.5).astype(np.int64), 0)
    hi = np.minimum((center + support + 0.5).astype(np.int64), n)
    j = lo[:, None] + np.arange(int((hi - lo).max()))[None, :]  # (32, taps): the window of each output
    x = (j - center[:, None] + 0.5) / filterscale
    px = np.pi * x
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(x == 0, 1.0, np.sin(px) * np.sin(px / 3.0) * 3.0 / (px * px))  # sinc(x) sinc(x/3)
    w *= (np.abs(x) < 3.0) & (j < hi[:, None])
    total = w.sum(axis=1, keepdims=True)
    w /= np.where(total == 0, 1.0, total)
    out = np.zeros((n, 32))
    cols = np.broadcast_to(np.arange(32)[:, None], j.shape)
    keep = j < n
    out[j[keep], cols[keep]] = w[keep]
    return out


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


def _one_blas_thread() -> None:
    """:func:`_blas_single_thread`, once per thread: before any product here large enough
    for OpenBLAS to split it (a kept JPEG's hash multiplies (8, h) by (h, w))."""
    if not getattr(_THREAD, "blas_one", False):
        _THREAD.blas_one = True
        _blas_single_thread()


def _resize32(gray: np.ndarray) -> np.ndarray | None:
    """Pillow's ``resize((32, 32), LANCZOS)`` of the 2-D uint8 array ``gray``, exactly; None: use Pillow."""
    size = (gray.shape[1], gray.shape[0])
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
    _one_blas_thread()
    return plan.run(gray.astype(np.float64), plan.vertical_first).astype(np.uint8)


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


def _orientation(img: Image.Image, header_only: bool = False) -> int:
    """EXIF orientation (1..8; 1 for none or malformed). ``header_only``: from what the
    header read found, without the PNG plugin's full decode to look for more (for a PNG
    whose chunk layout shows nothing after the pixels that could hold EXIF)."""
    try:
        value = (Image.Image.getexif(img) if header_only else img.getexif()).get(0x0112, 1)
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


def process_image(raw: bytes, cfg: ImageConfig | None = None, timings: dict[str, float] | None = None) -> ImageResult:
    """Turn downloaded/read bytes into the JPEG to store, with its metadata.

    Never raises for a bad image: the status is one of ``success``, ``failed_decode``,
    ``too_small`` or ``decompression_bomb``, with a one-line ``error``. ``timings``, when
    given, accumulates this thread's CPU seconds per kernel stage (``sha256``, ``header``,
    ``decode``, ``resize``, ``encode``, ``hash``), for benchmarks.

    >>> process_image(b"<html>oops</html>").status
    'failed_decode'
    """
    cfg = cfg or ImageConfig()
    clock = _Clock(timings)
    sha = hashlib.sha256(raw).hexdigest()
    clock.lap("sha256")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's EXIF/ICC chatter is not our error
            return _process(raw, cfg, sha, clock)
    except Image.DecompressionBombError as e:
        return _fail(STATUS_BOMB, str(e), sha)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        return _fail(STATUS_FAILED_DECODE, _error_text(e), sha)
    except MemoryError:
        return _fail(STATUS_BOMB, "out of memory while decoding", sha)
    except Exception as e:  # a decoder bug must not take the shard down
        return _fail(STATUS_FAILED_DECODE, _error_text(e), sha)


_ADDRESS = re.compile(r" (?:object )?at 0x[0-9a-fA-F]+>")


def _error_text(e: BaseException) -> str:
    """One line, the same on every run: no memory addresses (Pillow names its BytesIO).

    >>> _error_text(OSError("cannot identify image file <_io.BytesIO object at 0x7f3a2c>"))
    'OSError: cannot identify image file <_io.BytesIO>'
    """
    msg = str(e).splitlines()[0] if str(e) else ""
    msg = _ADDRESS.sub(">", msg)
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


class _Clock:
    """Per-stage CPU time of the calling thread (a no-op without a ``timings`` dict)."""

    def __init__(self, timings: dict[str, float] | None):
        self.timings = timings
        self.t = time.thread_time() if timings is not None else 0.0

    def lap(self, stage: str) -> None:
        if self.timings is not None:
            now = time.thread_time()
            self.timings[stage] = self.timings.get(stage, 0.0) + now - self.t
            self.t = now


def _process(raw: bytes, cfg: ImageConfig, sha: str, clock: _Clock) -> ImageResult:
    img = Image.open(io.BytesIO(raw))  # reads the header only
    fmt = img.format
    w0, h0 = img.size
    if w0 * h0 > cfg.max_pixels:
        return _fail(STATUS_BOMB, f"{w0}x{h0} = {w0 * h0} pixels exceeds the cap of {cfg.max_pixels}", sha)
    # a PNG whose metadata all precedes its pixels is read without decoding it (Pillow's
    # getexif() would decode the whole image to look for EXIF after the pixels)
    png = _png_layout(raw) if fmt == "PNG" else None
    broken: Exception | None = None
    if png is not None and not png[2]:
        orient = _orientation(img, header_only=True)
    else:
        if fmt == "PNG":  # getexif() decodes a PNG, and its decode error would pass for bad EXIF
            try:
                img.load()
            except Exception as e:  # noqa: BLE001 - raised below, unless the header decides first
                broken = e
        orient = 1 if broken is not None else (
            _orientation(img) if fmt in ("JPEG", "TIFF", "WEBP", "PNG", "MPO") else 1)
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
    if broken is not None:  # a PNG Pillow could not decode: not stored as whatever it left
        raise broken
    tw, th = _target_size(ow, oh, cfg.max_shortest_edge)
    icc = img.info.get("icc_profile")
    needs_resize = (tw, th) != (ow, oh)
    done = dict(status=STATUS_SUCCESS, width=tw, height=th, original_width=ow, original_height=oh, sha256=sha)
    clock.lap("header")

    if fmt == "JPEG" and img.mode == "RGB" and orient == 1 and not needs_resize:
        # Already what we would store: keep the compressed data, drop EXIF/XMP only.
        try:
            data = strip_jpeg_metadata(raw) if _has_strippable_segment(raw) else raw
        except ValueError:
            data = None
        if data is not None:
            h = _passthrough_hash(data, img, cfg, clock)  # also proves the whole stream decodes
            return ImageResult(**done, data=data, imagehash=h, reencoded=False)

    arr = None
    if fmt == "JPEG" and img.mode in ("RGB", "L") and cfg.resize_filter != "lanczos":
        # libjpeg-turbo: reduce in the DCT domain by 2/4/8 while >= 2x the target remains
        s = _dct_reduction(min(ow / tw, oh / th)) if cfg.resize_filter == "fast" else 1
        kw = {"min_width": -(-w0 // s), "min_height": -(-h0 // s)} if s > 1 else {}
        # a gray JPEG stays one channel through resize and hash (a third of the work); it
        # becomes RGB only in the encoder, with the same pixels as before (R = G = B)
        arr = _turbo_decode(raw, "GRAY" if img.mode == "L" else "RGB", kw)
        if arr is not None and img.mode == "L":
            arr = arr[..., 0]
        clock.lap("decode")
    elif fmt == "WEBP" and img.mode == "RGB" and orient == 1 and not getattr(img, "is_animated", False):
        # libwebp through OpenCV: ~40% less CPU than Pillow's path (a rotated WebP stays on
        # Pillow's, which turns it before resizing, as for PNG)
        arr = _cv2_decode(raw, (w0, h0))
        clock.lap("decode")
    elif (png is not None and not png[2] and png[:2] in ((8, 2), (8, 0)) and img.mode in ("RGB", "L")
          and orient == 1 and "transparency" not in img.info and not getattr(img, "is_animated", False)):
        # 8-bit RGB or gray, no alpha, one frame: OpenCV's libpng, ~15% less CPU than
        # Pillow's decoder and no copy out of a Pillow image; lossless, so the same pixels.
        # (A rotated PNG stays on Pillow's path, which turns it before resizing; one with
        # metadata after its pixels was decoded by Pillow above, whose pixels are used.)
        arr = _cv2_decode(raw, (w0, h0), gray=img.mode == "L")
        clock.lap("decode")
    if arr is not None:
        arr = _resize_array(arr, (th, tw) if swapped else (tw, th), cfg.resize_filter)
        arr = _orient_array(arr, orient)
        icc_out = icc if _profile_space(icc) == "RGB " else None
        clock.lap("resize")
    else:  # Pillow: other formats, CMYK, and JPEGs libjpeg-turbo's strict mode refused
        if fmt == "JPEG" and needs_resize and cfg.resize_filter != "area":
            # Decode at a reduced DCT scale while staying >= 2x the target (Pillow's
            # reducing_gap idea): much faster, and the filter does the final step. "area"
            # is OpenCV's area average of the full decode, on this path as on the turbo one.
            dw, dh = (th * 2, tw * 2) if swapped else (tw * 2, th * 2)
            img.draft(img.mode if img.mode in ("RGB", "L", "CMYK") else None, (dw, dh))
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        img.load()
        clock.lap("decode")
        if orient != 1:
            for op in _ORIENT_OPS[orient]:
                img = img.transpose(op)
        if img.mode == "L":  # gray stays one channel (R = G = B once encoded), as on the JPEG path
            icc_out = icc if _profile_space(icc) == "RGB " else None
        else:
            img, icc_out = _to_rgb(img, icc)
        arr = _resize_array(np.asarray(img), (tw, th), cfg.resize_filter)
        clock.lap("resize")
    data = _encode_jpeg(arr, cfg.quality, icc_out)
    clock.lap("encode")
    if cfg.phash == "exact":  # hash what a reader of the shard will decode
        h = phash(Image.open(io.BytesIO(data)))
    else:  # the stored pixels before encoding: within a few bits of the exact hash
        h = phash_pixels(arr)
    clock.lap("hash")
    return ImageResult(**done, data=data, imagehash=h, reencoded=True)


# --- the libjpeg-turbo / OpenCV path ---------------------------------------------------

@functools.cache
def _turbo():
    """simplejpeg (libjpeg-turbo), imported on first use."""
    import simplejpeg

    return simplejpeg


@functools.cache
def _cv2():
    """OpenCV, single-threaded (parallelism comes from ingest's processes and threads)."""
    import cv2

    cv2.setNumThreads(1)
    return cv2


def _dct_reduction(factor: float) -> int:
    """The DCT-domain reduction (1, 2, 4 or 8) that leaves >= 2x the target to resize."""
    s = 1
    while s < 8 and factor / (2 * s) >= 2:
        s *= 2
    return s


def _resize_array(arr: np.ndarray, size: tuple[int, int], how: str) -> np.ndarray:
    """Resize an HxWx3 uint8 array to ``size`` = (width, height) with filter ``how``.

    ``fast``: bilinear when the remaining factor is below 2 (as close to a Lanczos result
    as area averaging there, measured on real photos; see BENCHMARKS.md), area averaging
    above; ``area``: OpenCV's INTER_AREA (img2dataset's default); ``lanczos``: Pillow's
    antialiased Lanczos.
    """
    w, h = size
    if arr.shape[1] == w and arr.shape[0] == h:
        return arr
    if how == "lanczos":
        return np.asarray(Image.fromarray(arr).resize((w, h), Image.Resampling.LANCZOS, reducing_gap=3.0))
    cv2 = _cv2()
    factor = min(arr.shape[1] / w, arr.shape[0] / h)
    inter = cv2.INTER_LINEAR if how == "fast" and factor < 2 else cv2.INTER_AREA
    return cv2.resize(arr, (w, h), interpolation=inter)


def _orient_array(arr: np.ndarray, orient: int) -> np.ndarray:
    """Apply EXIF orientation ``orient`` to an HxWxC or HxW array (the same as Pillow's transposes)."""
    if orient == 1:
        return arr
    if orient in (5, 6, 7, 8):
        arr = arr.swapaxes(0, 1)  # TRANSPOSE; the others follow from it
        arr = {5: arr, 6: arr[:, ::-1], 7: arr[::-1, ::-1], 8: arr[::-1]}[orient]
    else:
        arr = {2: arr[:, ::-1], 3: arr[::-1, ::-1], 4: arr[::-1]}[orient]
    return np.ascontiguousarray(arr)


def _encode_jpeg(arr: np.ndarray, quality: int, icc: bytes | None) -> bytes:
    """Baseline JPEG, 4:2:0 (Pillow's default at these qualities), the ICC profile kept.

    A one-channel (gray) array is stored as RGB too. With both sides even it is handed to
    the encoder as its Y plane with flat chroma, which skips the colour conversion and gives
    the same bytes as encoding R = G = B; odd sides pad the last block differently on that
    path, so those are expanded to RGB first.
    """
    tj = _turbo()
    if arr.ndim == 2:
        h, w = arr.shape
        if h % 2 == 0 and w % 2 == 0:
            flat = np.full((h // 2, w // 2), 128, np.uint8)
            data = tj.encode_jpeg_yuv_planes(np.ascontiguousarray(arr), flat, flat, quality=quality, fastdct=True)
            return insert_icc_profile(data, icc) if icc else data
        arr = _cv2().cvtColor(np.ascontiguousarray(arr), _cv2().COLOR_GRAY2RGB)
    data = tj.encode_jpeg(np.ascontiguousarray(arr), quality=quality, colorspace="RGB", colorsubsampling="420")
    return insert_icc_profile(data, icc) if icc else data


def _cv2_decode(raw: bytes, size: tuple[int, int], gray: bool = False) -> np.ndarray | None:
    """An RGB (or, with ``gray``, 2-D gray) uint8 array from OpenCV's decoder, as stored:
    EXIF orientation is not applied here (OpenCV would, and the caller applies it once).
    None where it fails or disagrees with the header's size or layout (the caller then
    decodes with Pillow, which decides)."""
    cv2 = _cv2()
    flags = (cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR_RGB) | cv2.IMREAD_IGNORE_ORIENTATION
    arr = cv2.imdecode(np.frombuffer(raw, np.uint8), flags)
    if (arr is None or arr.dtype != np.uint8 or arr.ndim != (2 if gray else 3)
            or (arr.shape[1], arr.shape[0]) != size):
        return None
    return arr


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# chunks Pillow reads EXIF (and XMP orientation) from; after the pixels only on load()
_PNG_METADATA = (b"eXIf", b"tEXt", b"zTXt", b"iTXt")


def _png_layout(raw: bytes) -> tuple[int, int, bool] | None:
    """(bit depth, colour type, whether any EXIF/text chunk follows the first IDAT) of a
    well-formed PNG's chunk sequence (IHDR first, IEND last, every length in range), or
    None for anything else. Walks the chunk headers only; nothing is decompressed.

    >>> import io; from PIL import Image
    >>> buf = io.BytesIO(); Image.new("RGB", (4, 4)).save(buf, "PNG")
    >>> _png_layout(buf.getvalue())
    (8, 2, False)
    """
    if raw[:8] != _PNG_SIGNATURE or raw[12:16] != b"IHDR" or len(raw) < 33:
        return None
    depth, ctype = raw[24], raw[25]
    pos, n, seen_idat, late_meta = 8, len(raw), False, False
    while pos + 12 <= n:
        length, name = struct.unpack_from(">I4s", raw, pos)
        pos += 12 + length
        if pos > n:
            return None
        if name == b"IDAT":
            seen_idat = True
        elif name == b"IEND":
            return (depth, ctype, late_meta) if seen_idat else None
        elif seen_idat and name in _PNG_METADATA:
            late_meta = True
    return None


_ICC_CHUNK = 65519  # 65535 - 2 (length) - 12 ("ICC_PROFILE\0") - 2 (sequence numbers)


def insert_icc_profile(jpeg: bytes, icc: bytes) -> bytes:
    """Add ``icc`` as APP2 ``ICC_PROFILE`` segments right after SOI (and APP0, if any),
    chunked as the ICC spec and Pillow do.

    >>> from PIL import Image; import io
    >>> buf = io.BytesIO(); Image.new("RGB", (8, 8)).save(buf, "JPEG")
    >>> Image.open(io.BytesIO(insert_icc_profile(buf.getvalue(), b"x" * 70000))).info["icc_profile"] == b"x" * 70000
    True
    """
    pos = 2
    if jpeg[2:4] == b"\xff\xe0":  # keep JFIF first
        pos = 4 + struct.unpack(">H", jpeg[4:6])[0]
    chunks = [icc[i : i + _ICC_CHUNK] for i in range(0, len(icc), _ICC_CHUNK)]
    if len(chunks) > 255:
        return jpeg  # not representable; Pillow refuses such profiles too
    segs = [
        b"\xff\xe2" + struct.pack(">H", 2 + 12 + 2 + len(c)) + b"ICC_PROFILE\0" + bytes((i + 1, len(chunks))) + c
        for i, c in enumerate(chunks)
    ]
    return jpeg[:pos] + b"".join(segs) + jpeg[pos:]


def phash_pixels(arr: np.ndarray) -> str:
    """pHash of an RGB (or gray) uint8 array without encoding it: within 2 bits of
    ``str(imagehash.phash(...))`` of the image stored from these pixels on >= 99% of real
    photos (tested); near-duplicate search works at 4-10 bits.

    Gray as imagehash takes it, area averaging to 128x128 (pHash squashes to a square
    anyway), then imagehash's 32x32 Lanczos and DCT on that small image. (A cheaper bilinear
    step to 256 first gave 99.0% within 2 bits instead of 100% on 312 real-photo crops.)

    >>> phash_pixels(np.full((64, 64, 3), 255, np.uint8))
    '8000000000000000'
    """
    cv2 = _cv2()
    gray = cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY) if arr.ndim == 3 else arr
    if min(gray.shape) > 128:
        gray = cv2.resize(gray, (128, 128), interpolation=cv2.INTER_AREA)
    return _phash_gray(gray)


# DCT-scaled decode for the fast hash of a kept JPEG: >= 240 px short side. A 120 px stop
# (and the 128 px area step of phash_pixels) gave 95-97% within 2 bits on crops of the real
# photos at q75-95; 240 px with the Lanczos straight from the decode gives >= 99% (BENCHMARKS.md).
_PASS_HASH_SIDE = 240


def _passthrough_hash(data: bytes, img: Image.Image, cfg: ImageConfig, clock: _Clock) -> str:
    """pHash of a JPEG kept byte for byte; decoding it also proves the stream is whole.

    Fast mode: libjpeg-turbo's gray (Y) decode, reduced in the DCT domain while the short
    side stays >= ``_PASS_HASH_SIDE``, then imagehash's own 32x32 Lanczos and DCT on it."""
    if cfg.phash == "exact":
        img.load()
        clock.lap("decode")
        h = phash(img)
    else:
        w, h0 = img.size
        s = max(1, min(8, min(w, h0) // _PASS_HASH_SIDE))
        s = 1 << (s.bit_length() - 1)  # 1, 2, 4 or 8
        kw = {"min_width": -(-w // s), "min_height": -(-h0 // s)} if s > 1 else {}
        gray = _turbo_decode(data, "GRAY", kw)
        if gray is None:  # Pillow decides, as for any JPEG libjpeg-turbo refused
            img.load()
            clock.lap("decode")
            return phash(img)
        clock.lap("decode")
        h = _phash_lowpass(gray[..., 0])
    clock.lap("hash")
    return h


def _turbo_decode(data: bytes, colorspace: str, kw: dict) -> np.ndarray | None:
    """libjpeg-turbo's strict decode, or None where it refuses: its strict mode turns
    libjpeg's warnings (corrupt entropy data, extraneous bytes) into errors, which Pillow
    only warns about. The caller then decodes with Pillow, so an image is kept or failed
    exactly as before (a truncated JPEG still fails: Pillow refuses truncated files)."""
    try:
        return _turbo().decode_jpeg(data, colorspace=colorspace, **kw)
    except ValueError:
        return None


def _has_strippable_segment(data: bytes) -> bool:
    """Cheap check for APP1/APP13 markers in the header (before the first scan)."""
    head_end = data.find(b"\xff\xda")
    head = data[: head_end if head_end > 0 else 65536]
    return b"\xff\xe1" in head or b"\xff\xed" in head
