"""Fetch images over HTTP(S) with the standard library, robustly enough for the real web.

    >>> from silverlabel.sources.http import Fetcher, FetchConfig
    >>> with Fetcher(FetchConfig(timeout=10)) as f:          # doctest: +SKIP
    ...     r = f.fetch("https://example.org/cat.jpg")
    >>> r.status, r.http_status, len(r.data or b"")          # doctest: +SKIP
    ('success', 200, 48213)

One :class:`Fetcher` is shared by all worker threads of a process. Its parts:

* **Connection pool**: idle keep-alive ``http.client`` connections per (scheme, host,
  port), most recently used first, at most ``_MAX_IDLE`` in all and ``_IDLE_TIMEOUT``
  seconds old. A connection goes back only when its response was read to the end and did
  not say ``Connection: close``; on any error it is closed. A pooled connection that fails
  before a response arrives (the server dropped it while idle) is tried once more on a new
  connection, which does not count as a retry.
* **Per-host limit**: a ``BoundedSemaphore`` per host (created on demand, dropped when no
  thread uses it) is held from connecting until the body is read. Time spent queueing for
  a slot does not count against the deadline.
* **DNS cache**: ``socket.getaddrinfo`` once per (host, port) per ``dns_ttl`` seconds;
  connections go to the cached addresses while Host header, SNI and certificate checks
  use the real host name.
* **Deadline**: each attempt (connect, TLS, request, headers, body, redirects) has
  ``timeout`` seconds in all. Every socket operation gets the time that is left, the body
  is read in 64 KiB pieces checked against deadline and byte cap, and a watchdog thread
  shuts down any socket whose deadline passed, so servers that trickle bytes cannot
  stretch an attempt either. (Name resolution itself cannot be interrupted.)
* **Retries**: connection errors, connect/TLS timeouts, truncated bodies, 408, 429 and
  5xx are retried ``retries`` times with exponential backoff and jitter, or after the
  server's ``Retry-After`` when given (one longer than ``max_retry_after`` fails at once).
  Not retried: other 4xx, unknown host names (only EAI_AGAIN is), certificate errors,
  protocol garbage, and a timeout after the connection was made (the server stalls): a
  fetch thus takes at most about ``(retries + 1) * timeout`` plus the waits.
* **Checks before the body is read**: ``X-Robots-Tag`` opt-outs (see
  :func:`robots_opt_out`), the content type, and a Content-Length over the byte cap.
  Error and redirect bodies up to 64 KiB are read (to keep the connection), never kept.
  A gzip/deflate body sent despite ``Accept-Encoding: identity`` is decoded, under the cap.

``fetch`` never raises for network or HTTP problems: every outcome is a :class:`FetchResult`.
"""

from __future__ import annotations

import heapq
import http.client
import ipaddress
import itertools
import random
import re
import socket
import ssl
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import quote, urljoin, urlsplit

from silverlabel.errors import UserError
from silverlabel.options import csv_list, opt, parse_size, positive_int

__all__ = ["FetchConfig", "FetchResult", "Fetcher", "robots_opt_out"]


def _version() -> str:
    import silverlabel

    version = getattr(silverlabel, "__version__", None)
    if version:
        return str(version)
    try:
        from importlib.metadata import version as dist_version

        return dist_version("silverlabel")
    except Exception:
        return "0"


_CHUNK = 64 * 1024
_DRAIN_LIMIT = 64 * 1024  # error/redirect bodies up to this size are read to keep the connection
_MAX_IDLE = 128
_IDLE_TIMEOUT = 30.0
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_IMAGE_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream"})
# Robots directives that take a value after a colon ("max-snippet: 20"), i.e. are not bot names.
_VALUED_DIRECTIVES = frozenset(
    {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}
)
_BOT_PREFIX = re.compile(r"\s*([A-Za-z0-9_.*-]+)\s*:(.*)", re.S)


@dataclass(frozen=True)
class FetchConfig:
    """How a :class:`Fetcher` behaves; see the module docstring for the semantics."""

    timeout: float = opt(20.0, "total deadline per request, s", type=float, group="HTTP")
    max_bytes: int = opt(20 * 1024 * 1024, "byte cap per image", type=parse_size, group="HTTP", default_help="20MB")
    retries: int = opt(2, "retries for errors, 429, 5xx", type=int, group="HTTP")
    backoff: float = 0.5
    max_retry_after: float = 30.0
    max_redirects: int = opt(5, "", type=int, group="HTTP")
    per_host: int = opt(16, "connections per host", type=positive_int, group="HTTP")
    user_agent: str = opt(f"silverlabel/{_version()} (+https://github.com/silverlabel/silverlabel)", "",
                          group="HTTP")
    user_agent_token: str = "silverlabel"
    robots_optout: tuple[str, ...] = opt(("noai", "noimageai"), "X-Robots-Tag directives to honour besides "
                                         "noai,noimageai (e.g. noindex)", type=csv_list, metavar="D1,D2",
                                         extend=True, group="HTTP", default_help="")
    respect_robots: bool = opt(True, "do not honour X-Robots-Tag (not recommended)", flag="--ignore-robots",
                               action="store_false", group="HTTP", default_help="")
    dns_ttl: float = 300.0
    verify_tls: bool = opt(True, "do not verify TLS certificates", flag="--insecure", action="store_false",
                           group="HTTP", default_help="")
    allow_private_network: bool = opt(False, "also fetch from loopback, private and other non-public addresses "
                                      "(an intranet pool); refused by default, after DNS and on every redirect, as "
                                      "status blocked_address (link-local and multicast always are)",
                                      action="store_true", group="HTTP", default_help="")


@dataclass
class FetchResult:
    """Outcome of one fetch: ``status`` is "success", "failed_download", "opted_out" or "blocked_address"."""

    status: str
    error: str = ""
    data: bytes | None = None
    http_status: int | None = None
    final_url: str | None = None
    attempts: int = 1


def robots_opt_out(values: list[str], token: str, optout: tuple[str, ...]) -> str | None:
    """Return the first opt-out directive in X-Robots-Tag header values that applies to us.

    Directives are comma-separated; ``name: a, b`` scopes the following directives to bot
    ``name`` (until the next prefix), and only ``token`` and ``*`` address us.

        >>> optout = ("noai", "noimageai")
        >>> robots_opt_out(["googlebot: noai", "noindex, NoImageAI"], "silverlabel", optout)
        'noimageai'
        >>> robots_opt_out(["googlebot: noindex, noai"], "silverlabel", optout) is None
        True
    """
    wanted = {d.strip().lower() for d in optout}
    token = token.strip().lower()
    for value in values:
        scope = None  # None: all bots
        for part in value.split(","):
            m = _BOT_PREFIX.fullmatch(part)
            if m and m.group(1).lower() not in _VALUED_DIRECTIVES:
                scope, part = m.group(1).lower(), m.group(2)
            directive = part.strip().lower()
            if directive in wanted and scope in (None, "*", token):
                return directive
    return None


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After value (delta seconds or HTTP-date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _describe(exc: BaseException) -> str:
    name, text = type(exc).__name__, " ".join(str(exc).split())
    return (text if text.startswith(name) else f"{name}: {text}" if text else name)[:300]


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, _BlockedAddress):
        return False
    if isinstance(exc, socket.gaierror):
        return exc.errno == socket.EAI_AGAIN
    if isinstance(exc, ssl.SSLCertVerificationError):
        return False
    if isinstance(exc, (http.client.IncompleteRead, OSError)):
        return True  # ConnectionError, RemoteDisconnected, resets, unreachable networks, TLS EOF
    return False  # other protocol errors (garbage status line, too many headers...)


@dataclass(frozen=True)
class _Target:
    url: str
    scheme: str
    host: str  # ASCII (IDNA) host name, lower case
    port: int
    path: str  # path and query, percent-quoted

    @property
    def key(self) -> tuple[str, str, int]:
        return self.scheme, self.host, self.port


def _target(url: str) -> _Target:
    """Parse an absolute http(s) URL; ValueError if it is not one."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise UserError(url)
    host = parts.hostname
    if not host.isascii():
        host = host.encode("idna").decode("ascii")
    port = parts.port or (443 if scheme == "https" else 80)  # .port raises ValueError if bad
    path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=[]~")  # keeps existing %-escapes
    if parts.query:
        path += "?" + quote(parts.query, safe="/%:@!$&'()*+,;=[]~?")
    if any(c in host for c in " /\\@") or any(ord(c) < 33 for c in path):
        raise UserError(url)
    return _Target(url, scheme, host, port, path)


class _Outcome(Exception):
    """Ends an attempt; ``retry`` says whether another attempt may help."""

    def __init__(self, result: FetchResult, retry: bool = False, wait: float | None = None):
        super().__init__(result.error)
        self.result, self.retry, self.wait = result, retry, wait


class _Stale(Exception):
    """A pooled connection turned out to be closed by the server."""


class _Deadline:
    def __init__(self, seconds: float):
        self.at = time.monotonic() + seconds

    def left(self) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        return left


def blocked_address(ip: str, allow_private: bool = False) -> bool:
    """True for an address a URL from a table must not reach.

    Always: link-local (the cloud metadata endpoint 169.254.169.254, fe80::/10), multicast
    and unspecified addresses: no image host lives there, even on an intranet. Unless
    ``allow_private``: loopback, private, shared and every other non-public range. IPv4
    addresses mapped into IPv6 count as what they map.

        >>> [blocked_address(a) for a in ("93.184.216.34", "127.0.0.1", "169.254.169.254", "10.1.2.3")]
        [False, True, True, True]
        >>> [blocked_address(a, allow_private=True) for a in ("127.0.0.1", "10.1.2.3", "169.254.169.254")]
        [False, False, True]
        >>> blocked_address("::ffff:192.168.0.1"), blocked_address("2606:2800:220:1::1")
        (True, False)
    """
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_link_local or addr.is_multicast or addr.is_unspecified:
        return True
    return not allow_private and not addr.is_global


class _DNSCache:
    def __init__(self, ttl: float, allow_private: bool = False):
        self._ttl, self._lock = ttl, threading.Lock()
        self.allow_private = allow_private
        self._entries: dict[tuple[str, int], tuple[float, list]] = {}
        self._resolving: dict[tuple[str, int], threading.Lock] = {}

    def _cached(self, key: tuple[str, int]) -> list | None:
        hit = self._entries.get(key)
        return hit[1] if hit and hit[0] > time.monotonic() else None

    def resolve(self, host: str, port: int) -> list:
        """getaddrinfo results for (host, port), resolving at most once at a time per key."""
        key = (host, port)
        with self._lock:
            if (hit := self._cached(key)) is not None:
                return hit
            gate = self._resolving.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                if (hit := self._cached(key)) is not None:
                    return hit
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except BaseException:
                with self._lock:
                    self._resolving.pop(key, None)
                raise
            with self._lock:
                if len(self._entries) > 50_000:
                    now = time.monotonic()
                    self._entries = {k: v for k, v in self._entries.items() if v[0] > now}
                if self._ttl > 0:
                    self._entries[key] = (time.monotonic() + self._ttl, infos)
                self._resolving.pop(key, None)  # only once the entry is there
            return infos

    def connect(self, host: str, port: int, timeout: float) -> socket.socket:
        """A TCP socket connected to the first cached address of host that accepts."""
        error: OSError = OSError(f"no address for {host}")
        end = time.monotonic() + timeout
        infos = self.resolve(host, port)
        bad = [info[4][0] for info in infos if blocked_address(info[4][0], self.allow_private)]
        if bad:  # checked again here, as Fetcher._check_address does: the addresses connected to
            raise _BlockedAddress(f"{host} resolves to {bad[0]}, a non-public address")
        for family, type_, proto, _, addr in infos:
            sock = socket.socket(family, type_, proto)
            try:
                sock.settimeout(max(end - time.monotonic(), 0.001))
                sock.connect(addr)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            except OSError as exc:
                sock.close()
                error = exc
        raise error


class _BlockedAddress(OSError):
    """A host that resolves to a non-public address (see :func:`blocked_address`)."""


class _HTTPConnection(http.client.HTTPConnection):
    dns: _DNSCache

    def connect(self) -> None:
        self.sock = self.dns.connect(self.host, self.port, self.timeout)


class _HTTPSConnection(http.client.HTTPSConnection):
    dns: _DNSCache

    def connect(self) -> None:  # TLS handshake under the socket timeout; SNI = real host
        sock = self.dns.connect(self.host, self.port, self.timeout)
        try:
            self.sock = self._context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


class _Watchdog:
    """One daemon thread that shuts down sockets whose attempt deadline has passed."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[list] = []  # [deadline, seq, socket or None when done, fired]
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, at: float, sock: socket.socket) -> list:
        entry = [at, next(self._seq), sock, False]
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="silverlabel-http-watchdog")
                self._thread.start()
            heapq.heappush(self._heap, entry)
            if self._heap[0] is entry:
                self._cond.notify()
        return entry

    def done(self, entry: list) -> bool:
        """Stop watching; True if the deadline had already fired (socket is dead)."""
        with self._cond:
            entry[2] = None
            return entry[3]

    def stop(self) -> None:
        with self._cond:
            self._thread = None
            self._cond.notify_all()

    def _run(self) -> None:
        me = threading.current_thread()
        with self._cond:
            while self._thread is me:
                now = time.monotonic()
                while self._heap and (self._heap[0][2] is None or self._heap[0][0] <= now):
                    entry = heapq.heappop(self._heap)
                    if entry[2] is not None:
                        entry[3] = True
                        try:  # the plain socket call: safe next to a thread inside an SSL read
                            socket.socket.shutdown(entry[2], socket.SHUT_RDWR)
                        except OSError:
                            pass
                self._cond.wait(self._heap[0][0] - now if self._heap else None)


class Fetcher:
    """Thread-safe image fetcher with pooling, per-host limits, DNS cache and retries.

        >>> with Fetcher(FetchConfig(timeout=5, retries=1)) as f:   # doctest: +SKIP
        ...     [f.fetch(u).status for u in ["https://example.org/a.jpg", "ftp://x"]]
        ['success', 'failed_download']
    """

    def __init__(self, cfg: FetchConfig = FetchConfig()) -> None:
        self.cfg = cfg
        self._dns = _DNSCache(cfg.dns_ttl, cfg.allow_private_network)
        self._tls: ssl.SSLContext | None = None  # made on first HTTPS use (loading CAs is slow)
        self._lock = threading.Lock()
        # id(conn) -> (pool key, connection, time pooled), oldest first
        self._idle: OrderedDict[int, tuple[tuple, http.client.HTTPConnection, float]]
        self._idle = OrderedDict()
        self._slots: dict[str, list] = {}  # host -> [BoundedSemaphore, users]
        self._watchdog = _Watchdog()
        self._closed = False

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close all pooled keep-alive connections and stop the watchdog thread.

        The fetcher stays usable afterwards, only without keeping connections alive.
        """
        with self._lock:
            self._closed = True
            idle, self._idle = list(self._idle.values()), OrderedDict()
        for _, conn, _ in idle:
            conn.close()
        self._watchdog.stop()

    def fetch(self, url: str) -> FetchResult:
        """Download ``url``; never raises for network or HTTP problems.

            >>> Fetcher().fetch("file:///etc/passwd").error
            "invalid url 'file:///etc/passwd'"
        """
        try:
            _target(url)
        except (ValueError, UnicodeError):
            return FetchResult("failed_download", f"invalid url {url!r}")
        attempt = 0
        while True:
            try:
                result, retry, wait = self._attempt(url), False, None
            except _Outcome as out:
                result, retry, wait = out.result, out.retry, out.wait
            except Exception as exc:  # a bug or an exotic error: still a result, never a raise
                result, retry, wait = FetchResult("failed_download", _describe(exc)), False, None
            result.attempts = attempt + 1
            if not retry or attempt >= self.cfg.retries:
                return result
            if wait is None:
                wait = self.cfg.backoff * 2**attempt * random.uniform(1.0, 1.2)
            time.sleep(wait)
            attempt += 1

    # -- one attempt: a redirect chain under one deadline ---------------------------------

    def _attempt(self, url: str) -> FetchResult:
        deadline = _Deadline(self.cfg.timeout)
        for _ in range(self.cfg.max_redirects + 1):
            try:
                target = _target(url)
            except (ValueError, UnicodeError):
                error = f"redirect to unsupported url {url!r}"
                raise _Outcome(FetchResult("failed_download", error, final_url=url)) from None
            self._check_address(target)
            status, location, body = self._hop(target, deadline)
            if location is None:
                return FetchResult("success", data=body, http_status=status, final_url=url)
            url = urljoin(url, location)
        error = f"too many redirects (>{self.cfg.max_redirects})"
        raise _Outcome(FetchResult("failed_download", error, http_status=status, final_url=url))

    def _check_address(self, t: _Target) -> None:
        """Refuse a host (first or redirected to) that resolves to a non-public address."""
        try:
            infos = self._dns.resolve(t.host, t.port)
        except OSError:
            return  # the connection attempt reports it, with retries where they apply
        bad = [info[4][0] for info in infos if blocked_address(info[4][0], self.cfg.allow_private_network)]
        if bad:
            hint = "" if self.cfg.allow_private_network else "; --allow-private-network fetches from private ones"
            error = f"{t.host} resolves to {bad[0]}, a non-public address{hint}"
            raise _Outcome(FetchResult("blocked_address", error, final_url=t.url))

    def _hop(self, t: _Target, deadline: _Deadline) -> tuple[int, str | None, bytes | None]:
        """One request under the host's slot: (status, redirect location or None, body)."""
        with self._lock:
            slot = self._slots.get(t.host)
            if slot is None:
                slot = self._slots[t.host] = [threading.BoundedSemaphore(self.cfg.per_host), 0]
            slot[1] += 1
        queued = time.monotonic()
        slot[0].acquire()
        deadline.at += time.monotonic() - queued
        try:
            conn = self._take(t.key)
            if conn is not None:
                try:
                    return self._exchange(conn, t, deadline, reused=True)
                except _Stale:
                    pass
            if t.scheme == "https":
                conn = _HTTPSConnection(t.host, t.port, context=self._tls_context())
            else:
                conn = _HTTPConnection(t.host, t.port)
            conn.dns = self._dns
            return self._exchange(conn, t, deadline, reused=False)
        finally:
            with self._lock:
                slot[0].release()
                slot[1] -= 1
                if not slot[1]:
                    del self._slots[t.host]

    def _tls_context(self) -> ssl.SSLContext:
        with self._lock:
            if self._tls is None:
                self._tls = ssl.create_default_context()
                if not self.cfg.verify_tls:
                    self._tls.check_hostname = False
                    self._tls.verify_mode = ssl.CERT_NONE
            return self._tls

    def _exchange(self, conn: http.client.HTTPConnection, t: _Target, deadline: _Deadline,
                  reused: bool) -> tuple[int, str | None, bytes | None]:
        """Send the request on conn and read the answer: (status, location or None, body)."""
        cfg, phase, watch, status, released = self.cfg, "connect", None, None, False

        def fail(error: str, outcome: str = "failed_download") -> FetchResult:
            return FetchResult(outcome, error, http_status=status, final_url=t.url)

        try:
            if conn.sock is None:
                conn.timeout = deadline.left()
                conn.connect()
            sock = conn.sock
            watch = self._watchdog.watch(deadline.at, sock)
            phase = "request"
            sock.settimeout(deadline.left())
            conn.putrequest("GET", t.path, skip_accept_encoding=True)
            conn.putheader("User-Agent", cfg.user_agent)
            conn.putheader("Accept", "image/*,*/*;q=0.8")
            conn.putheader("Accept-Encoding", "identity")
            conn.endheaders()
            sock.settimeout(deadline.left())
            resp = conn.getresponse()
            phase, status = "response", resp.status
            if not 200 <= status < 300:  # keep the connection if the body is small, then decide
                complete = self._read(resp, sock, deadline, _DRAIN_LIMIT, drain=True)
                self._finish(conn, t, resp, watch, complete)
                watch, released = None, True
                location = resp.getheader("Location") if status in _REDIRECTS else None
                if location:
                    return status, location, None
                if status in (408, 429) or status >= 500:
                    wait = _retry_after(resp.getheader("Retry-After"))
                    if wait is not None and wait > cfg.max_retry_after:
                        error = f"HTTP {status}, Retry-After {wait:g} s exceeds cap"
                        raise _Outcome(fail(error))
                    raise _Outcome(fail(f"HTTP {status}"), retry=True, wait=wait)
                missing = " without Location" if status in _REDIRECTS else ""
                raise _Outcome(fail(f"HTTP {status}{missing}"))
            if cfg.respect_robots:
                values = resp.headers.get_all("X-Robots-Tag") or []
                directive = robots_opt_out(values, cfg.user_agent_token, cfg.robots_optout)
                if directive:
                    raise _Outcome(fail(f"X-Robots-Tag: {directive}", "opted_out"))
            ctype = (resp.getheader("Content-Type") or "").split(";")[0].strip().lower()
            if ctype not in _IMAGE_TYPES and not ctype.startswith("image/"):
                raise _Outcome(fail(f"content-type {ctype} is not an image"))
            too_big = f"body exceeds byte cap of {cfg.max_bytes} bytes"
            if resp.length is not None and resp.length > cfg.max_bytes:
                raise _Outcome(fail(too_big))
            body = self._read(resp, sock, deadline, cfg.max_bytes)
            if body is None:
                raise _Outcome(fail(too_big))
            self._finish(conn, t, resp, watch, True)
            watch, released = None, True
            encoding = (resp.getheader("Content-Encoding") or "").strip().lower()
            if encoding in ("gzip", "x-gzip", "deflate"):  # sent although we asked for identity
                body = _inflate(body, cfg.max_bytes)
                if body is None:
                    raise _Outcome(fail(too_big))
            return status, None, body
        except _Outcome:
            if not released:
                conn.close()
            raise
        except Exception as exc:
            conn.close()
            fired = watch is not None and self._watchdog.done(watch)
            if fired or isinstance(exc, TimeoutError) or time.monotonic() >= deadline.at:
                # once connected, a timeout means a stalling server: not retried (bounds wall time)
                error = f"timeout after {float(cfg.timeout)} s"
                raise _Outcome(fail(error), retry=phase == "connect") from None
            if reused and phase == "request":
                raise _Stale() from exc
            if isinstance(exc, _BlockedAddress):  # the address resolved at connect time (DNS changed)
                raise _Outcome(fail(str(exc), "blocked_address")) from None
            raise _Outcome(fail(_describe(exc)), retry=_retryable(exc)) from None
        finally:
            if watch is not None:
                self._watchdog.done(watch)

    @staticmethod
    def _read(resp: http.client.HTTPResponse, sock: socket.socket, deadline: _Deadline,
              cap: int, drain: bool = False) -> bytes | bool | None:
        """Read the body in pieces under deadline and cap: bytes, or None over the cap.

        With ``drain`` (error and redirect bodies), return whether the body was read to the
        end within ``cap``, never raising: the connection is then reusable.
        """
        expected, body = resp.length, bytearray()
        try:
            if drain and expected is not None and expected > cap:
                return False
            while True:
                sock.settimeout(deadline.left())
                chunk = resp.read1(_CHUNK)
                if not chunk:
                    break
                body += chunk
                if len(body) > cap:
                    return False if drain else None
            if expected is not None and len(body) < expected:
                raise http.client.IncompleteRead(bytes(body), expected - len(body))
            deadline.left()  # an EOF caused by the watchdog is a timeout, not the end
            resp.close()
        except Exception:
            if drain:
                return False
            raise
        return True if drain else bytes(body)

    def _finish(self, conn: http.client.HTTPConnection, t: _Target,
                resp: http.client.HTTPResponse, watch: list, complete: bool) -> None:
        """Stop the watchdog and pool the connection if it can carry another request."""
        fired = self._watchdog.done(watch)
        if not complete or fired or resp.will_close or conn.sock is None or self._closed:
            conn.close()
            return
        with self._lock:
            self._idle[id(conn)] = (t.key, conn, time.monotonic())
            evicted = self._idle.popitem(last=False)[1][1] if len(self._idle) > _MAX_IDLE else None
        if evicted is not None:
            evicted.close()

    def _take(self, key: tuple) -> http.client.HTTPConnection | None:
        """The most recently pooled idle connection for key, if one is fresh enough."""
        stale, found = [], None
        with self._lock:
            now = time.monotonic()
            for ident, (k, conn, since) in reversed(self._idle.items()):
                if now - since > _IDLE_TIMEOUT:
                    stale.append(ident)
                elif k == key:
                    found = ident
                    break
            conns = [self._idle.pop(i)[1] for i in stale]
            conn = self._idle.pop(found)[1] if found is not None else None
        for c in conns:
            c.close()
        return conn


def _inflate(data: bytes, cap: int) -> bytes | None:
    """Decode a gzip/zlib/raw-deflate body; None if it expands beyond cap bytes.

    Undecodable data is returned as it came (the image decoder will reject it if bad).
    """
    for wbits in (47, -15):  # gzip or zlib header (detected), then raw deflate
        try:
            out = zlib.decompressobj(wbits=wbits).decompress(data, cap + 1)
        except zlib.error:
            continue
        return out if len(out) <= cap else None
    return data
