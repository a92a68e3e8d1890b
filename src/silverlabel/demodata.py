"""The demo's pictures and its loopback image server (what ``make demo`` needs).

Everything here works offline: the pictures come from the photographs that
ship inside the installed ``scikit-image`` wheel (``skimage.data``), and the
server is a plain :mod:`http.server` bound to ``127.0.0.1``.

* :func:`real_photos` -- the real photographs bundled with scikit-image,
  encoded as JPEG (a couple as PNG).
* :func:`photo_like_images` -- any number of deterministic, photo-like JPEGs
  (random crops / rescales / flips / rotations / mild colour jitter of those
  photographs), about 640x480 by default.
* :class:`ImageServer` -- a real HTTP/1.1 keep-alive server on loopback that
  serves an in-memory ``{path: (bytes, content_type)}`` dict.

The same server in a separate process (for benchmarks) lives with the test fixtures,
``tests/fixtures/imageserver.py``.

Example::

    from silverlabel.demodata import ImageServer, photo_like_images

    files = {name: (data, "image/jpeg") for name, data in photo_like_images(20)}
    with ImageServer(files) as srv:
        urls = [srv.url(name) for name in files]
        ...  # fetch them with any HTTP client

``scikit-image`` is only imported when pictures are first needed.
"""

from __future__ import annotations

import functools
import http.server
import io
import mimetypes
import threading
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import Any, Optional, Union

from silverlabel.errors import UserError

__all__ = [
    "real_photos",
    "photo_like_images",
    "content_type_for",
    "ImageServer",
]

# skimage.data loaders whose files are inside the scikit-image wheel itself
# (no pooch download). Anything else in skimage.data may try the network, so
# it is never called. Order is fixed: it defines the output order.
_COLOR_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "motorcycle_left",   # from skimage.data.stereo_motorcycle()
    "motorcycle_right",  # idem
)
_GRAY_PHOTOS = (
    "camera",
    "moon",
    "coins",
    "clock",
    "page",
    "text",
    "grass",
    "gravel",
    "brick",
)
# These are written as PNG instead of JPEG, for format variety.
_PNG_NAMES = frozenset({"coffee", "coins"})

# photo_like_images() draws its content from these (colour photos dominate).
_POOL_NAMES = _COLOR_PHOTOS + ("camera", "moon", "coins", "clock", "grass", "brick")

ServedFile = Union[bytes, tuple]  # bytes | (bytes, ctype) | (bytes, ctype, headers)


# --------------------------------------------------------------------------
# pictures
# --------------------------------------------------------------------------


def _load_skimage_array(name: str):
    try:
        import skimage.data as skdata
    except ImportError as exc:  # pragma: no cover - depends on environment
        raise ImportError(
            "silverlabel.demodata needs scikit-image for its bundled photos "
            "(pip install scikit-image)"
        ) from exc
    if name in ("motorcycle_left", "motorcycle_right"):
        left, right, _disp = skdata.stereo_motorcycle()
        return left if name == "motorcycle_left" else right
    return getattr(skdata, name)()


@functools.lru_cache(maxsize=None)
def _source_images() -> tuple[tuple[str, Any], ...]:
    """(name, PIL.Image) for every bundled photo that loads offline, cached."""
    import numpy as np
    from PIL import Image

    out = []
    for name in _COLOR_PHOTOS + _GRAY_PHOTOS:
        try:
            arr = _load_skimage_array(name)
        except Exception:  # missing from this scikit-image version, needs pooch, ...
            continue
        arr = np.asarray(arr)
        if arr.dtype != np.uint8:
            continue
        if arr.ndim == 3 and arr.shape[2] == 4:
            arr = arr[:, :, :3]
        if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
            continue
        img = Image.fromarray(np.ascontiguousarray(arr))
        img.load()
        out.append((name, img))
    if not out:  # pragma: no cover - depends on environment
        raise RuntimeError("no bundled scikit-image photo could be loaded")
    return tuple(out)


def _encode(img, fmt: str, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    if fmt == "PNG":
        img.save(buf, format="PNG", optimize=False, compress_level=6)
    else:
        img.save(buf, format="JPEG", quality=quality, subsampling="4:2:0")
    return buf.getvalue()


def real_photos() -> list[tuple[str, bytes]]:
    """Return the real photographs shipped with scikit-image, encoded.

    Colour and grayscale photos (astronaut, chelsea, coffee, rocket,
    hubble_deep_field, immunohistochemistry, retina, the stereo motorcycle
    pair, camera, moon, coins, clock, ...) that load offline from the
    installed package; anything that would need a download is skipped. Most
    are JPEG quality 95 (``astronaut.jpg``); ``coffee`` and ``coins`` are PNG
    (``coffee.png``) for format variety. Order and bytes are deterministic
    for a given scikit-image/Pillow installation.

    Example::

        >>> photos = real_photos()
        >>> name, data = photos[0]
        >>> name, data[:2]
        ('astronaut.jpg', b'\\xff\\xd8')
    """
    out: list[tuple[str, bytes]] = []
    for name, img in _source_images():
        fmt = "PNG" if name in _PNG_NAMES else "JPEG"
        ext = "png" if fmt == "PNG" else "jpg"
        out.append((f"{name}.{ext}", _encode(img, fmt, quality=95)))
    return out


@functools.lru_cache(maxsize=None)
def _pool() -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """(colour, grayscale) PIL images used as content by photo_like_images."""
    by_name = dict(_source_images())
    color = tuple(by_name[n] for n in _POOL_NAMES if n in by_name and by_name[n].mode == "RGB")
    gray = tuple(by_name[n] for n in _POOL_NAMES if n in by_name and by_name[n].mode != "RGB")
    if not color and not gray:
        color = tuple(by_name.values())
    return color, gray


def _variant_size(size: tuple[int, int], r: float) -> tuple[int, int]:
    """Pick an output size near ``size`` (w, h): mostly as given, sometimes
    portrait, 4:3 a bit smaller, or 3:2."""
    w, h = size
    if r < 0.60:
        return w, h  # 640x480
    if r < 0.75:
        return h, w  # 480x640 (portrait)
    if r < 0.90:
        return max(1, round(w * 15 / 16)), max(1, round(h * 15 / 16))  # 600x450
    return w, max(1, round(w * 2 / 3))  # 640x427 (3:2)


@functools.lru_cache(maxsize=4)
def _grain_field(seed: int, side: int = 1024):
    """int16 gaussian noise field (sigma ~2) used as film grain, per seed."""
    import numpy as np

    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x6A41])
    return (rng.standard_normal((side, side), dtype=np.float32) * 2.0).round().astype(np.int16)


def _make_photo_like(i: int, size: tuple[int, int], seed: int) -> bytes:
    import numpy as np
    from PIL import Image, ImageEnhance

    # One generator per (seed, i): image i does not depend on n.
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(i)])
    color, gray = _pool()
    # Mostly colour photos, some grayscale ones.
    group = color if (not gray or (color and rng.random() < 0.85)) else gray
    src = group[int(rng.integers(len(group)))]
    tw, th = _variant_size(size, float(rng.random()))

    rot = int(rng.integers(4))  # rotate by rot * 90 degrees after cropping
    cw_target, ch_target = (th, tw) if rot % 2 else (tw, th)  # pre-rotation box
    aspect = cw_target / ch_target

    # Random crop with the target aspect, covering 45%..100% of the largest
    # such box that fits in the source.
    sw, sh = src.size
    max_w = min(sw, sh * aspect)
    frac = float(np.sqrt(rng.uniform(0.45, 1.0)))
    cw = max(8.0, max_w * frac)
    ch = cw / aspect
    x0 = float(rng.uniform(0, max(0.0, sw - cw)))
    y0 = float(rng.uniform(0, max(0.0, sh - ch)))
    img = src.resize(
        (cw_target, ch_target),
        resample=Image.Resampling.BICUBIC,
        box=(x0, y0, x0 + cw, y0 + ch),
    )
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rot:
        img = img.transpose(
            (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180,
             Image.Transpose.ROTATE_270)[rot]
        )

    # Mild photometric jitter: brightness, contrast and per-channel gain in
    # one lookup table (fast), saturation via ImageEnhance.Color.
    bright = float(rng.uniform(0.85, 1.15))
    contrast = float(rng.uniform(0.85, 1.15))
    nch = 3 if img.mode == "RGB" else 1
    gains = rng.uniform(0.93, 1.07, size=nch) if nch == 3 else np.ones(1)
    hist = np.asarray(img.convert("L").histogram(), dtype=np.float64)
    mean = float((hist * np.arange(256)).sum() / max(1.0, hist.sum()))
    v = np.arange(256, dtype=np.float64)
    lut = np.concatenate([
        np.clip(mean + contrast * (v * bright * g - mean), 0, 255) for g in gains
    ]).round().astype(np.uint8)
    img = img.point(lut.tolist())
    if nch == 3:
        img = ImageEnhance.Color(img).enhance(float(rng.uniform(0.8, 1.2)))

    # A little sensor grain (upscaled crops are smoother than camera output):
    # a window of a cached, seed-determined noise field.
    w, h = img.size
    grain = _grain_field(seed, max(1024, -(-max(w, h) // 256) * 256))
    gy = int(rng.integers(grain.shape[0] - h + 1))
    gx = int(rng.integers(grain.shape[1] - w + 1))
    arr = np.asarray(img, dtype=np.int16)
    g = grain[gy:gy + h, gx:gx + w]
    arr = arr + (g[:, :, None] if arr.ndim == 3 else g)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode=img.mode)
    return _encode(img, "JPEG", quality=92)


def photo_like_images(
    n: int, size: tuple[int, int] = (640, 480), seed: int = 0, start: int = 0
) -> Iterator[tuple[str, bytes]]:
    """Yield ``n`` deterministic photo-like JPEGs as ``(name, jpeg_bytes)``.

    Each image is real photographic content: a random crop of one of the
    bundled scikit-image photos, rescaled to about ``size`` (``(width,
    height)``), randomly flipped and rotated by a multiple of 90 degrees, with
    mild brightness/contrast/colour jitter and a little grain, encoded as JPEG
    quality 92. About 60% are exactly ``size``; the rest are portrait
    (480x640), slightly smaller 4:3 (600x450) or 3:2 (640x427) for the
    default size. Names are ``photo_00000.jpg``, ``photo_00001.jpg``, ...

    The same ``(i, size, seed)`` always gives the same bytes (for a given
    Pillow/numpy installation), and image ``i`` does not depend on ``n``, so
    ``photo_like_images(10)`` is a prefix of ``photo_like_images(100)``;
    ``start`` skips ahead (images ``start .. start+n-1``), which lets callers
    generate a large pool in parallel chunks. Generation takes a few
    milliseconds per image (about 8 ms at 640x480).

    Example::

        >>> imgs = list(photo_like_images(3, seed=1))
        >>> [name for name, _ in imgs]
        ['photo_00000.jpg', 'photo_00001.jpg', 'photo_00002.jpg']
    """
    if n < 0 or start < 0:
        raise UserError("n and start must be >= 0")
    size = (int(size[0]), int(size[1]))
    if size[0] < 1 or size[1] < 1:
        raise UserError("size must be positive")
    for i in range(start, start + n):
        yield f"photo_{i:05d}.jpg", _make_photo_like(i, size, seed)


# --------------------------------------------------------------------------
# loopback HTTP server
# --------------------------------------------------------------------------


def content_type_for(name: str) -> str:
    """Guess a MIME type from a file name (``application/octet-stream`` if unknown)."""
    ctype, _ = mimetypes.guess_type(name)
    return ctype or "application/octet-stream"


def _normalize_files(files: Mapping[str, ServedFile]) -> dict[str, tuple[bytes, str, dict]]:
    out: dict[str, tuple[bytes, str, dict]] = {}
    for path, value in files.items():
        key = path.lstrip("/")
        if isinstance(value, (bytes, bytearray, memoryview)):
            out[key] = (bytes(value), content_type_for(key), {})
        else:
            data = bytes(value[0])
            ctype = value[1] if len(value) > 1 and value[1] else content_type_for(key)
            headers = dict(value[2]) if len(value) > 2 and value[2] else {}
            out[key] = (data, ctype, headers)
    return out


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every response has Content-Length
    server_version = "silverlabel-demo/1"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def _lookup(self):
        path = urllib.parse.urlsplit(self.path).path
        return self.server.files.get(urllib.parse.unquote(path).lstrip("/"))  # type: ignore[attr-defined]

    def _respond(self, head_only: bool) -> None:
        entry = self._lookup()
        if entry is None:
            body, ctype, extra, status = b"not found\n", "text/plain", {}, 404
        else:
            (body, ctype, extra), status = entry, 200
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        if not head_only:
            self.wfile.write(body)
        self.server.request_count += 1  # type: ignore[attr-defined]  # approximate under threads

    def do_GET(self) -> None:  # noqa: N802
        self._respond(head_only=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._respond(head_only=True)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # Benchmarks open hundreds of concurrent connections; the default backlog
    # of 5 would make the kernel drop SYNs and clients stall on retransmits.
    request_queue_size = 1024

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up mid-response are normal; stay quiet


class ImageServer:
    """A loopback HTTP/1.1 server for an in-memory set of files.

    ``files`` maps a path (``"photo_00000.jpg"``; a leading ``/`` is ignored)
    to ``(bytes, content_type)``, to ``(bytes, content_type, headers)`` where
    ``headers`` is a dict of extra response headers (e.g.
    ``{"X-Robots-Tag": "noai"}``), or to plain ``bytes`` (type guessed from
    the name). Unknown paths get a 404. Responses always carry
    ``Content-Length``, so connections are kept alive; each connection is
    handled by a daemon thread; request logging is off.

    Example::

        with ImageServer({"a.jpg": (jpeg_bytes, "image/jpeg")}) as srv:
            data = urllib.request.urlopen(srv.url("a.jpg")).read()

    ``port=0`` (the default) picks a free port; the real one is ``srv.port``
    after :meth:`start`.
    """

    def __init__(
        self, files: Mapping[str, ServedFile], host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self._files = _normalize_files(files)
        self._host = host
        self._port = port
        self._httpd: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> "ImageServer":
        """Bind and start serving in a background daemon thread; returns self."""
        if self._httpd is not None:
            return self
        httpd = _Server((self._host, self._port), _Handler)
        httpd.files = self._files  # type: ignore[attr-defined]
        httpd.request_count = 0  # type: ignore[attr-defined]
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
            name="silverlabel-image-server", daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket (idempotent)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "ImageServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- addresses ---------------------------------------------------------
    @property
    def port(self) -> int:
        """The bound TCP port (only meaningful once started)."""
        if self._httpd is not None:
            return int(self._httpd.server_address[1])
        return self._port

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` (no trailing slash)."""
        return f"http://{self._host}:{self.port}"

    def url(self, name: str) -> str:
        """Absolute URL for a served path, e.g. ``http://127.0.0.1:PORT/a.jpg``."""
        return f"{self.base_url}/{urllib.parse.quote(name.lstrip('/'))}"

    @property
    def request_count(self) -> int:
        """Requests answered so far (approximate under heavy concurrency)."""
        return int(getattr(self._httpd, "request_count", 0))
