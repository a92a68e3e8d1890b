"""Files over loopback HTTP/1.1 with HEAD, ``Range`` (206) and ETags, for the remote-input
tests of the sources: every request is logged, and ranged GETs can be held until released.

    server = RangeServer({"/a.tar": b"..."})
    server.url("/a.tar")                                # http://127.0.0.1:PORT/a.tar
    server.gets("/a.tar")                               # the Range headers of its GETs
"""

from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class RangeServer:
    """``files`` (path -> bytes) served on 127.0.0.1. ``requests``: (method, path, Range) in
    order. While ``hold`` is set, a ranged GET sets ``held`` and waits for ``release``."""

    def __init__(self, files: dict[str, bytes] | None = None, hold: bool = False):
        self.files: dict[str, bytes] = dict(files or {})
        self.requests: list[tuple[str, str, str | None]] = []
        self.hold = hold
        self.held, self.release = threading.Event(), threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, body: bool) -> None:
                path = self.path.split("?", 1)[0]
                rng = self.headers.get("Range")
                outer.requests.append((self.command, path, rng))
                data = outer.files.get(path)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start, end = 0, len(data)
                m = re.match(r"bytes=(\d+)-(\d*)$", rng or "")
                if m:
                    start = int(m.group(1))
                    end = min(len(data), int(m.group(2)) + 1 if m.group(2) else len(data))
                    if body and outer.hold:
                        outer.held.set()
                        outer.release.wait(30)
                self.send_response(206 if m else 200)
                self.send_header("Content-Length", str(max(0, end - start)))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("ETag", f'"{len(data):x}-{sum(data[:64]):x}"')
                if m:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
                self.end_headers()
                if body:
                    self.wfile.write(data[start:end])

            def do_HEAD(self):
                self._send(False)

            def do_GET(self):
                self._send(True)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def gets(self, path: str) -> list[str | None]:
        """The Range headers of the GETs of ``path``, in order (None: the whole file)."""
        return [r for m, p, r in self.requests if m == "GET" and p == path]

    def __enter__(self) -> RangeServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
