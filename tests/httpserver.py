"""A misbehaving HTTP/1.1 loopback server for tests, and generators of awkward image bytes.

    >>> with MisbehavingServer() as server:                 # doctest: +SKIP
    ...     server.add("/cat.jpg", sample_jpeg())
    ...     url = server.url("/cat.jpg")                    # http://127.0.0.1:PORT/cat.jpg
    ...     server.hits["/cat.jpg"], server.last_headers("/cat.jpg")["User-Agent"]

Real sockets on 127.0.0.1, one daemon thread per connection, keep-alive. Files added
with :meth:`MisbehavingServer.add` are served as given; built-in routes misbehave:

========================  ==========================================================
``/status/<code>``        that status with a small text body
``/flaky/<name>``         500 on the first request for the path, then a JPEG
``/ratelimit/<name>``     429 with ``Retry-After: 1`` first, then a JPEG
``/unavailable/<name>``   503 with an HTTP-date ``Retry-After`` (the next whole second), then a JPEG
``/slow-retry-after``     always 429 with ``Retry-After: 3600``
``/hang``                 headers (Content-Length 100000), then no body until stop()
``/drip-headers``         a status line, then one header byte every 0.2 s
``/drip-body``            Content-Length 100000, one body byte every 0.1 s
``/big?size=N``           honest Content-Length, N bytes (default 8 MiB) in 64 KiB chunks
``/big-no-length?size=N`` same without Content-Length, body ends at close
``/big-chunked?size=N``   same with chunked transfer coding
``/truncated-body``       Content-Length 1000, 500 bytes, then close
``/html``                 a text/html page
``/json``                 an application/json document
``/gzip``                 a JPEG sent with Content-Encoding: gzip
``/close``                a JPEG with Connection: close
``/slow/<name>?delay=s``  a JPEG after ``delay`` (0.2) s; tracks concurrent requests
``/redirect/<n>``         chain of n relative redirects (301/302/303/307/308) to a JPEG
``/redirect-loop``        redirects to itself
``/redirect-abs``         absolute redirect to /redirect/0
``/redirect-file``        redirects to file:///etc/passwd
``/redirect-metadata``    redirects to the cloud metadata endpoint (the client must refuse it)
``/noai``                 a JPEG with ``X-Robots-Tag: noai``
``/otherbot-noai``        a JPEG with ``X-Robots-Tag: googlebot: noai`` (not for us)
========================  ==========================================================

Counters: ``hits[path]`` (query excluded), ``requests`` (path, headers) in order,
``client_ports`` (one per TCP connection), ``max_in_flight`` (for ``/slow``), ``sent[path]``
(body bytes written by the big routes before the client went away).
"""

from __future__ import annotations

import email.utils
import gzip
import io
import socket
import ssl
import struct
import subprocess
import threading
import time
import zlib
from collections import Counter
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image

# --- image bytes -----------------------------------------------------------------------


@lru_cache(maxsize=None)
def _photo(index: int) -> Image.Image:
    from skimage import data

    loader = [data.chelsea, data.astronaut, data.coffee, data.rocket][index % 4]
    return Image.fromarray(loader()).convert("RGB")


def sample_image(w: int = 200, h: int = 150, seed: int = 0) -> Image.Image:
    """A w x h RGB photo: a seed-chosen crop of a scikit-image sample (distinct per seed)."""
    rng = np.random.default_rng(seed)
    photo = _photo(seed)
    pw, ph = photo.size
    scale = rng.uniform(0.6, 0.9)
    cw, ch = max(8, int(pw * scale)), max(8, int(ph * scale))
    if cw / ch > w / h:
        cw = max(8, int(ch * w / h))
    else:
        ch = max(8, int(cw * h / w))
    x, y = int(rng.integers(0, pw - cw + 1)), int(rng.integers(0, ph - ch + 1))
    return photo.crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.LANCZOS)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@lru_cache(maxsize=64)
def sample_jpeg(w: int = 200, h: int = 150, seed: int = 0) -> bytes:
    """A real-content RGB baseline JPEG of w x h pixels (quality 90)."""
    return _encode(sample_image(w, h, seed), "JPEG", quality=90)


def cmyk_jpeg(w: int = 200, h: int = 150) -> bytes:
    """A CMYK JPEG (as written by Pillow, with an Adobe marker)."""
    return _encode(sample_image(w, h, 1).convert("CMYK"), "JPEG", quality=90)


_INVERSE_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270,
}


def exif_rotated_jpeg(orientation: int = 6, w: int = 200, h: int = 150) -> bytes:
    """A JPEG stored rotated/flipped with an EXIF Orientation tag, like a camera writes it.

    ``ImageOps.exif_transpose`` of it gives back ``sample_image(w, h, 2)`` (upright, w x h);
    the stored pixels are h x w for orientations 5-8.
    """
    upright = sample_image(w, h, 2)
    stored = upright.transpose(_INVERSE_ORIENTATION[orientation]) if orientation != 1 else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(stored, "JPEG", quality=92, exif=exif.tobytes())


def rgba_png(w: int = 200, h: int = 150) -> bytes:
    """An RGBA PNG whose alpha runs from transparent (left) to opaque (right)."""
    img = sample_image(w, h, 3).convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, w, dtype=np.uint8), (h, 1))
    img.putalpha(Image.fromarray(alpha, "L"))
    return _encode(img, "PNG")


def gray_png(w: int = 200, h: int = 150) -> bytes:
    """A single-channel (mode L) PNG."""
    return _encode(sample_image(w, h, 0).convert("L"), "PNG")


def tiny_jpeg() -> bytes:
    """A 20 x 20 JPEG."""
    return _encode(sample_image(20, 20, 4), "JPEG", quality=90)


@lru_cache(maxsize=2)
def huge_jpeg(w: int = 3000, h: int = 2000) -> bytes:
    """A large real-content JPEG (3000 x 2000 by default, ~1 MB)."""
    img = sample_image(w, h, 5)
    noise = np.random.default_rng(5).integers(-6, 7, (h, w, 3), dtype=np.int16)  # grain
    arr = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    return _encode(Image.fromarray(arr), "JPEG", quality=85)


def truncated_jpeg() -> bytes:
    """The first 60 % of a valid JPEG: a header that parses, scan data cut off, no EOI."""
    data = sample_jpeg(200, 150, 6)
    return data[: int(len(data) * 0.6)]


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


@lru_cache(maxsize=4)
def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A valid 8-bit grayscale PNG of width x height black pixels that is tiny on disk.

    30000 x 30000 (900 Mpixel) is ~0.9 MB: the zlib stream is built from one compressed
    block of zero rows repeated (after a full flush the compressor's output depends only
    on its input), with the Adler-32 of all-zero data computed directly.
    """
    row = width + 1  # filter byte + pixels, all zero
    rows_per_block = max(1, (1 << 20) // row)
    block = bytes(row * rows_per_block)
    c = zlib.compressobj(9)
    head = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    header, first = head[:2], head[2:]
    assert first == again, "zlib output after a full flush should not depend on history"
    full, rest = divmod(height, rows_per_block)
    tail = zlib.compressobj(9)  # a fresh compressor for the last rows, minus header and checksum
    last = (tail.compress(bytes(row * rest)) + tail.flush())[2:-4]
    total = row * height
    adler = ((total % 65521) << 16) | 1  # Adler-32 of `total` zero bytes
    stream = header + first * full + last + struct.pack(">I", adler)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", stream)
            + _png_chunk(b"IEND", b""))


def self_signed_cert(directory: str | Path) -> tuple[str, str]:
    """(certfile, keyfile) for CN/SAN localhost and 127.0.0.1, made with the openssl CLI."""
    cert, key = Path(directory) / "cert.pem", Path(directory) / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True)
    return str(cert), str(key)


# --- the server ------------------------------------------------------------------------

_REDIRECT_CODES = (301, 302, 303, 307, 308)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes
    server: _HTTPServer

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        self.server.owner._opened(self.connection, self.client_address[1])

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        self.server.owner._closed(self.connection)

    def handle(self) -> None:
        try:
            super().handle()
        except (OSError, ssl.SSLError):  # client went away, or stop() shut the socket
            self.close_connection = True

    def send(self, code: int, body: bytes = b"", ctype: str | None = "image/jpeg",
             headers: list[tuple[str, str]] | tuple = (), length: bool = True) -> None:
        self.send_response(code)
        if ctype:
            self.send_header("Content-Type", ctype)
        if length:
            self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        owner = self.server.owner
        parts = urlsplit(self.path)
        path, query = parts.path, {k: v[-1] for k, v in parse_qs(parts.query).items()}
        with owner.lock:
            owner.hits[path] += 1
            n = owner.hits[path]
            owner.requests.append((path, dict(self.headers.items())))
        if path in owner.files:
            data, ctype, headers = owner.files[path]
            return self.send(200, data, ctype, headers)
        route, _, arg = path.lstrip("/").partition("/")
        method = getattr(self, "route_" + route.replace("-", "_"), None)
        if method is None:
            return self.send(404, b"not found", "text/plain")
        method(arg, n, query)

    # -- routes (arg: the rest of the path, n: hit number for this path) --

    def route_status(self, arg: str, n: int, q: dict) -> None:
        self.send(int(arg), f"status {arg}".encode(), "text/plain")

    def route_flaky(self, arg: str, n: int, q: dict) -> None:
        if n == 1:
            return self.send(500, b"oops", "text/plain")
        self.send(200, sample_jpeg())

    def route_ratelimit(self, arg: str, n: int, q: dict) -> None:
        if n == 1:
            return self.send(429, b"slow down", "text/plain", [("Retry-After", "1")])
        self.send(200, sample_jpeg())

    def route_unavailable(self, arg: str, n: int, q: dict) -> None:
        if n == 1:
            when = int(time.time()) + 1  # whole seconds: 0 to 1 s ahead
            self.server.owner.retry_after_wait = when - time.time()
            date = email.utils.formatdate(when, usegmt=True)
            return self.send(503, b"later", "text/plain", [("Retry-After", date)])
        self.send(200, sample_jpeg())

    def route_slow_retry_after(self, arg: str, n: int, q: dict) -> None:
        self.send(429, b"much later", "text/plain", [("Retry-After", "3600")])

    def route_hang(self, arg: str, n: int, q: dict) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", "100000")
        self.end_headers()
        self.wfile.flush()
        self.server.owner.stopping.wait(60)
        self.close_connection = True

    def route_drip_headers(self, arg: str, n: int, q: dict) -> None:
        self.wfile.write(b"HTTP/1.1 200 OK\r\n")
        for byte in b"X-Slow: " + b"a" * 10000:
            if self.server.owner.stopping.wait(0.2):
                break
            self.wfile.write(bytes([byte]))
        self.close_connection = True

    def route_drip_body(self, arg: str, n: int, q: dict) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", "100000")
        self.end_headers()
        for _ in range(100000):
            if self.server.owner.stopping.wait(0.1):
                break
            self.wfile.write(b"x")
        self.close_connection = True

    def _stream(self, path: str, size: int, chunked: bool = False) -> None:
        owner, chunk = self.server.owner, bytes(64 * 1024)
        sent = 0
        try:
            while sent < size and not owner.stopping.is_set():
                piece = chunk[: size - sent]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                sent += len(piece)
                with owner.lock:
                    owner.sent[path] = sent
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        finally:
            self.close_connection = True

    def route_big(self, arg: str, n: int, q: dict) -> None:
        size = int(q.get("size", 8 << 20))
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        self._stream("/big", size)

    def route_big_no_length(self, arg: str, n: int, q: dict) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Connection", "close")
        self.end_headers()
        self._stream("/big-no-length", int(q.get("size", 8 << 20)))

    def route_big_chunked(self, arg: str, n: int, q: dict) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._stream("/big-chunked", int(q.get("size", 8 << 20)), chunked=True)

    def route_truncated_body(self, arg: str, n: int, q: dict) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(sample_jpeg()[:500])
        self.close_connection = True

    def route_html(self, arg: str, n: int, q: dict) -> None:
        page = b"<!doctype html><title>Not an image</title><p>hello</p>"
        self.send(200, page, "text/html; charset=utf-8")

    def route_json(self, arg: str, n: int, q: dict) -> None:
        self.send(200, b'{"error": "nope"}', "application/json")

    def route_gzip(self, arg: str, n: int, q: dict) -> None:
        self.send(200, gzip.compress(sample_jpeg()), "image/jpeg", [("Content-Encoding", "gzip")])

    def route_close(self, arg: str, n: int, q: dict) -> None:
        self.send(200, sample_jpeg(), "image/jpeg", [("Connection", "close")])
        self.close_connection = True

    def route_slow(self, arg: str, n: int, q: dict) -> None:
        owner = self.server.owner
        with owner.lock:
            owner.in_flight += 1
            owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
        try:
            owner.stopping.wait(float(q.get("delay", 0.2)))
        finally:
            with owner.lock:
                owner.in_flight -= 1
        self.send(200, sample_jpeg())

    def route_redirect(self, arg: str, n: int, q: dict) -> None:
        left = int(arg)
        if left <= 0:
            return self.send(200, sample_jpeg())
        code = _REDIRECT_CODES[left % len(_REDIRECT_CODES)]
        self.send(code, b"moved", "text/plain", [("Location", str(left - 1))])  # relative

    def route_redirect_loop(self, arg: str, n: int, q: dict) -> None:
        self.send(302, b"", "text/plain", [("Location", "/redirect-loop")])

    def route_redirect_abs(self, arg: str, n: int, q: dict) -> None:
        self.send(302, b"", "text/plain", [("Location", self.server.owner.url("/redirect/0"))])

    def route_redirect_file(self, arg: str, n: int, q: dict) -> None:
        self.send(302, b"", "text/plain", [("Location", "file:///etc/passwd")])

    def route_redirect_metadata(self, arg: str, n: int, q: dict) -> None:
        self.send(302, b"", "text/plain", [("Location", "http://169.254.169.254/latest/meta-data/")])

    def route_noai(self, arg: str, n: int, q: dict) -> None:
        self.send(200, sample_jpeg(), "image/jpeg", [("X-Robots-Tag", "noai")])

    def route_otherbot_noai(self, arg: str, n: int, q: dict) -> None:
        self.send(200, sample_jpeg(), "image/jpeg", [("X-Robots-Tag", "googlebot: noai")])


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    owner: MisbehavingServer


class MisbehavingServer:
    """A threaded HTTP/1.1 keep-alive server on 127.0.0.1 (or HTTPS with ``tls``).

    ``tls`` is ``(certfile, keyfile)``, e.g. from :func:`self_signed_cert`. Use as a
    context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, tls: tuple[str, str] | None = None) -> None:
        self.files: dict[str, tuple[bytes, str | None, list[tuple[str, str]]]] = {}
        self.hits: Counter[str] = Counter()
        self.sent: dict[str, int] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.client_ports: set[int] = set()
        self.in_flight = self.max_in_flight = 0
        self.retry_after_wait = 0.0  # seconds the latest HTTP-date Retry-After asked for
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self.scheme = "http"
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            self._httpd.socket = ctx.wrap_socket(self._httpd.socket, server_side=True,
                                                 do_handshake_on_connect=False)
            self.scheme = "https"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True,
                                        kwargs={"poll_interval": 0.01}, name="misbehaving-server")

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        """Absolute URL of path on this server (host may be "localhost")."""
        return f"{self.scheme}://{host}:{self.port}{path}"

    def add(self, path: str, data: bytes, content_type: str | None = "image/jpeg",
            headers: dict[str, str] | list[tuple[str, str]] | None = None) -> str:
        """Serve ``data`` at ``path``; returns its URL.

        ``content_type=None`` sends no Content-Type; headers may repeat as a list of pairs.
        """
        pairs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
        self.files[path] = (data, content_type, pairs)
        return self.url(path)

    def last_headers(self, path: str) -> dict[str, str]:
        """Request headers of the latest request for path."""
        with self.lock:
            return next(h for p, h in reversed(self.requests) if p == path)

    def drop_connections(self) -> None:
        """Shut down every open client connection (idle keep-alive ones included)."""
        with self.lock:
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass

    def _opened(self, sock: socket.socket, port: int) -> None:
        with self.lock:
            self._sockets.add(sock)
            self.client_ports.add(port)

    def _closed(self, sock: socket.socket) -> None:
        with self.lock:
            self._sockets.discard(sock)

    def start(self) -> MisbehavingServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wake hanging routes and close all connections."""
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self.drop_connections()

    def __enter__(self) -> MisbehavingServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
