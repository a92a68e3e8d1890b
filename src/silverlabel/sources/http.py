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

* **Proxies**: as ``requests`` and curl read them, where the Fetcher is made (in the
  process that downloads): ``http_proxy``/``HTTP_PROXY`` for http URLs, ``https_proxy``/
  ``HTTPS_PROXY`` for https ones, ``all_proxy``/``ALL_PROXY`` for both (lower case first;
  ``HTTP_PROXY`` is ignored where ``REQUEST_METHOD`` says we run under CGI), and
  ``no_proxy``/``NO_PROXY`` (see :class:`NoProxy`). ``FetchConfig.proxy`` (``--proxy``)
  replaces the ``*_PROXY`` variables, ``no_proxy`` (``--no-proxy``) adds hosts to
  NO_PROXY, ``proxy_env=False`` (``--no-proxy-env``) ignores the environment. Only
  ``http://`` proxies: http URLs go to it in absolute form, https URLs through a
  ``CONNECT`` tunnel with TLS (SNI, certificate check) to the origin inside. Credentials
  in the proxy URL (``http://user:pass@proxy:3128``) are sent as ``Proxy-Authorization:
  Basic`` and never shown: :class:`ProxyURL` prints without them, errors name the proxy
  without them. Connections to the proxy (http) and tunnels (https, per origin) are
  pooled like direct ones. A proxy that cannot be reached, refuses a tunnel or is set to
  something unsupported (``socks5://``) gives ``failed_download`` rows saying so.
* **Private addresses with a proxy**: the proxy's own address is the user's choice and is
  never refused (a proxy on loopback is common). The proxy resolves the target's name, so
  only what the URL itself says can be checked here: a literal IP (any spelling
  ``getaddrinfo`` accepts, ``127.1`` or ``0x7f000001`` too) that is not public, or
  ``localhost``/``*.localhost``, is refused as ``blocked_address`` before anything is
  sent, on every redirect hop too; a public-looking name that the proxy resolves to a
  private address is the proxy's policy to refuse. Hosts in NO_PROXY get the full checks.

``fetch`` never raises for network or HTTP problems: every outcome is a :class:`FetchResult`.
"""

from __future__ import annotations

import base64
import heapq
import http.client
import ipaddress
import itertools
import os
import random
import re
import socket
import ssl
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import quote, unquote, urljoin, urlsplit

from silverlabel.errors import UserError
from silverlabel.options import csv_list, opt, parse_size, positive_int

__all__ = ["FetchConfig", "FetchResult", "Fetcher", "NoProxy", "ProxyURL", "proxy_url", "robots_opt_out"]


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


# --- proxies ----------------------------------------------------------------------------

_PROXY_VARS = {"http": ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"),
               "https": ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")}


def _authority(host: str, port: int, default: int | None) -> str:
    """``host:port`` as a URL writes it: IPv6 in brackets, the port left out if default."""
    name = f"[{host}]" if ":" in host else host
    return name if port == default else f"{name}:{port}"


class ProxyURL:
    """An HTTP proxy, ``http://[user:pass@]host[:port]``, whose credentials never show.

    ``str()`` and ``repr()`` leave the credentials out (``***`` says there are some), so a
    config that holds one can be printed, logged or stored. ``host:port`` without a scheme
    means ``http://``; the port defaults to 80; ``%``-escapes in user and password are
    decoded. ``https://`` (TLS to the proxy) and ``socks*://`` proxies are not supported:
    ValueError, with a message that does not repeat the URL.

        >>> p = ProxyURL("http://alice:s%40cret@Proxy.internal:3128")
        >>> str(p), p.host, p.port, p.username
        ('http://***@proxy.internal:3128', 'proxy.internal', 3128, 'alice')
        >>> p.authorization
        'Basic YWxpY2U6c0BjcmV0'
        >>> str(ProxyURL("proxy:8080")), str(ProxyURL("http://[::1]/")), ProxyURL("http://[::1]").port
        ('http://proxy:8080', 'http://[::1]:80', 80)
    """

    __slots__ = ("host", "port", "username", "_password")

    def __init__(self, url: str | ProxyURL) -> None:
        if isinstance(url, ProxyURL):
            self.host, self.port, self.username, self._password = url.host, url.port, url.username, url._password
            return
        text = url.strip()
        if "://" not in text:
            text = "http://" + text
        parts = urlsplit(text)
        scheme = parts.scheme.lower()
        if scheme != "http":
            raise ValueError(f"proxy scheme {scheme}:// is not supported: give an http:// proxy "
                             "(https URLs go through it in a CONNECT tunnel)")
        try:
            port = parts.port or 80
        except ValueError:
            raise ValueError("proxy URL has a bad port") from None
        host = parts.hostname or ""
        if not host.isascii():
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError:
                raise ValueError("proxy URL has a bad host name") from None
        if not host or any(c in host for c in " /\\@") or any(ord(c) < 33 for c in host):
            raise ValueError("proxy URL has no host" if not host else "proxy URL has a bad host name")
        self.host, self.port = host, port
        self.username = unquote(parts.username) if parts.username is not None else None
        self._password = unquote(parts.password) if parts.password is not None else None

    @property
    def authorization(self) -> str | None:
        """The ``Proxy-Authorization`` header value (Basic), or None without credentials."""
        if self.username is None:
            return None
        pair = f"{self.username}:{self._password or ''}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")

    def secrets(self) -> list[str]:
        """Strings that must never appear in an error: the password as given and escaped,
        and the header value. Passwords under 4 characters are not scrubbed from text (they
        would mangle every message); nothing here writes them anyway."""
        if not self._password or len(self._password) < 4:
            return []
        out = {self._password, quote(self._password, safe=""), self.authorization or ""}
        out.add((self.authorization or "").removeprefix("Basic "))
        return sorted((s for s in out if s), key=len, reverse=True)

    def __str__(self) -> str:
        auth = "***@" if self.username is not None else ""
        return f"http://{auth}{_authority(self.host, self.port, None)}"

    def __repr__(self) -> str:
        return f"ProxyURL({str(self)!r})"

    def _key(self) -> tuple:
        return self.host, self.port, self.username, self._password

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ProxyURL) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __reduce__(self) -> tuple:  # pickles (to engine workers) with its credentials
        return _proxy_from_key, self._key()


def _proxy_from_key(host: str, port: int, username: str | None, password: str | None) -> ProxyURL:
    p = ProxyURL.__new__(ProxyURL)
    p.host, p.port, p.username, p._password = host, port, username, password
    return p


def proxy_url(text: str) -> ProxyURL | None:
    """The ``--proxy`` converter: a :class:`ProxyURL`, or None for ``""`` (no proxy).

        >>> proxy_url("http://u:p@127.0.0.1:3128"), proxy_url("")
        (ProxyURL('http://***@127.0.0.1:3128'), None)
    """
    if not text.strip():
        return None
    try:
        return ProxyURL(text)
    except ValueError as exc:
        import argparse

        raise argparse.ArgumentTypeError(str(exc)) from None


class NoProxy:
    """Hosts fetched directly, not through the proxy: a NO_PROXY list as curl and requests read it.

    Entries are separated by commas (or spaces). ``*`` alone means every host. A name
    matches itself and its subdomains (``example.org``, ``.example.org`` and
    ``*.example.org`` all match ``example.org`` and ``a.example.org``, not
    ``badexample.org``). An IP address or CIDR block (``10.0.0.0/8``, ``fd00::/8``)
    matches URLs whose host is a literal address in it; names are not resolved for this.
    An entry may end in ``:port`` (``[::1]:8080`` for IPv6) to match that port only.
    Case and a trailing dot do not matter.

        >>> np = NoProxy("localhost, .internal.org,example.com:8080, 10.0.0.0/8 [::1]")
        >>> [np.matches(h, p) for h, p in [("localhost", 80), ("a.internal.org", 443),
        ...     ("internal.org", 80), ("example.com", 8080), ("example.com", 80),
        ...     ("10.2.3.4", 80), ("::1", 443), ("notinternal.org", 80), ("11.0.0.1", 80)]]
        [True, True, True, True, False, True, True, False, False]
        >>> NoProxy("*").matches("anything.example", 443), NoProxy("").matches("localhost", 80)
        (True, False)
    """

    def __init__(self, spec: str | Iterable[str] = ()) -> None:
        entries = [spec] if isinstance(spec, str) else list(spec)
        self.every = False
        self.names: list[tuple[str, int | None]] = []
        self.nets: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None]] = []
        for entry in (e for text in entries for e in re.split(r"[,\s]+", text.lower()) if e):
            if entry == "*":
                self.every = True
                continue
            host, port = entry, None
            if entry.startswith("["):  # [v6] or [v6]:port
                host, _, rest = entry[1:].partition("]")
                if rest.startswith(":") and rest[1:].isdigit():
                    port = int(rest[1:])
            elif entry.count(":") == 1:  # name:port or v4:port (a bare IPv6 has several colons)
                name, _, digits = entry.partition(":")
                if digits.isdigit():
                    host, port = name, int(digits)
            try:
                self.nets.append((ipaddress.ip_network(host, strict=False), port))
                continue
            except ValueError:
                pass
            host = host.lstrip("*").lstrip(".").rstrip(".")
            if host:
                self.names.append((host, port))

    def __bool__(self) -> bool:
        return self.every or bool(self.names) or bool(self.nets)

    def matches(self, host: str, port: int) -> bool:
        """True if a URL to ``host`` (lower case, IPv6 without brackets) at ``port`` is fetched directly."""
        if self.every:
            return True
        host = host.lower().rstrip(".")
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return any((host == n or host.endswith("." + n)) and p in (None, port) for n, p in self.names)
        return any(addr in net and p in (None, port) for net, p in self.nets)


def _env_proxy(environ: Mapping[str, str], scheme: str) -> tuple[str, str] | None:
    """(variable name, value) of the proxy the environment sets for ``scheme``, or None."""
    for name in _PROXY_VARS[scheme]:
        if name == "HTTP_PROXY" and "REQUEST_METHOD" in environ:
            continue  # under CGI, HTTP_PROXY comes from a request header ("httpoxy")
        value = environ.get(name, "").strip()
        if value:
            return name, value
    return None


def _literal_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host that is an IP literal stands for, in any spelling that
    ``getaddrinfo`` (so a proxy) accepts: ``127.1``, ``2130706433``, ``0x7f.1``; else None."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if not re.fullmatch(r"[0-9a-fx.]+", host) or not host[0].isdigit():
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


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
    proxy: ProxyURL | None = opt(None, "fetch through this HTTP proxy, http://[user:pass@]host:port, instead of "
                                 "the one HTTP_PROXY/HTTPS_PROXY/ALL_PROXY name (https URLs by CONNECT); NO_PROXY "
                                 "still applies. Credentials are better kept in HTTPS_PROXY: a command line is "
                                 "visible to other users", type=proxy_url, metavar="URL", group="HTTP")
    no_proxy: tuple[str, ...] = opt((), "hosts fetched directly, not through the proxy, besides NO_PROXY's "
                                    "(names match subdomains; IPs, CIDRs, :port, *)", type=csv_list,
                                    metavar="H1,H2", group="HTTP", default_help="")
    proxy_env: bool = opt(True, "ignore HTTP_PROXY, HTTPS_PROXY, ALL_PROXY and NO_PROXY", flag="--no-proxy-env",
                          action="store_false", group="HTTP", default_help="")

    def __post_init__(self) -> None:
        if isinstance(self.proxy, str):  # FetchConfig(proxy="http://...") from Python
            try:
                object.__setattr__(self, "proxy", ProxyURL(self.proxy) if self.proxy.strip() else None)
            except ValueError as exc:
                raise UserError(f"--proxy: {exc}") from None
        if isinstance(self.no_proxy, str):
            object.__setattr__(self, "no_proxy", csv_list(self.no_proxy))


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
    if isinstance(exc, _ProxyError):
        return exc.retry
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

    @property
    def authority(self) -> str:
        """``host[:port]`` for the Host header and the absolute form (port left out if default)."""
        return _authority(self.host, self.port, 443 if self.scheme == "https" else 80)


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

    def connect(self, host: str, port: int, timeout: float, check: bool = True) -> socket.socket:
        """A TCP socket connected to the first cached address of host that accepts; with
        ``check``, refuse a host with a blocked address (not for the user's own proxy)."""
        error: OSError = OSError(f"no address for {host}")
        end = time.monotonic() + timeout
        infos = self.resolve(host, port)
        bad = [info[4][0] for info in infos if check and blocked_address(info[4][0], self.allow_private)]
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


class _ProxyError(OSError):
    """The proxy could not be reached or refused a tunnel; the message names it (no credentials)."""

    def __init__(self, message: str, retry: bool):
        super().__init__(message)
        self.retry = retry


def _open_socket(conn: _HTTPConnection | _HTTPSConnection) -> socket.socket:
    """The connection's TCP socket: to its host, or to its proxy (not address-checked)."""
    proxy = conn.proxy
    if proxy is None:
        return conn.dns.connect(conn.host, conn.port, conn.timeout)
    try:
        return conn.dns.connect(proxy.host, proxy.port, conn.timeout, check=False)
    except TimeoutError:
        raise
    except OSError as exc:
        raise _ProxyError(f"proxy {proxy} unreachable: {_describe(exc)}", _retryable(exc)) from None


def _tunnel(sock: socket.socket, proxy: ProxyURL, host: str, port: int) -> None:
    """Ask the proxy on ``sock`` for a CONNECT tunnel to host:port; _ProxyError if refused."""
    authority = _authority(host, port, None)
    head = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
    if proxy.authorization:
        head += f"Proxy-Authorization: {proxy.authorization}\r\n"
    resp = http.client.HTTPResponse(sock, method="CONNECT")
    try:
        sock.sendall((head + "\r\n").encode("ascii"))
        resp.begin()
    except TimeoutError:
        raise
    except (http.client.HTTPException, OSError) as exc:  # reset, closed, garbage
        error = f"proxy {proxy}: CONNECT {authority} failed: {_describe(exc)}"
        raise _ProxyError(error, isinstance(exc, OSError)) from None
    finally:
        resp.close()  # the response object only; the socket stays open
    if not 200 <= resp.status < 300:
        error = f"proxy {proxy} refused CONNECT {authority}: HTTP {resp.status} {resp.reason}".strip()
        raise _ProxyError(error, resp.status in (408, 429) or resp.status >= 500)


class _HTTPConnection(http.client.HTTPConnection):
    dns: _DNSCache
    proxy: ProxyURL | None = None  # set: host and port are the proxy's, requests go in absolute form
    pool_key: tuple = ()

    def connect(self) -> None:
        self.sock = _open_socket(self)


class _HTTPSConnection(http.client.HTTPSConnection):
    dns: _DNSCache
    proxy: ProxyURL | None = None  # set: a CONNECT tunnel through it to host:port
    pool_key: tuple = ()

    def connect(self) -> None:  # TLS handshake under the socket timeout; SNI = real host
        sock = _open_socket(self)
        try:
            if self.proxy is not None:
                _tunnel(sock, self.proxy, self.host, self.port)
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

    def __init__(self, cfg: FetchConfig = FetchConfig(), environ: Mapping[str, str] | None = None) -> None:
        """``environ`` (default ``os.environ``) gives the proxy variables; like ``requests``,
        they are looked at on every fetch (the settings are rebuilt only when they change)."""
        self.cfg = cfg
        self._dns = _DNSCache(cfg.dns_ttl, cfg.allow_private_network)
        self._environ = environ
        self._proxy_seen: tuple | None = None
        self._routes: tuple[dict[str, ProxyURL | str], NoProxy] = ({}, NoProxy())  # replaced whole
        self._secrets: list[str] = []
        self._tls: ssl.SSLContext | None = None  # made on first HTTPS use (loading CAs is slow)
        self._lock = threading.Lock()
        # id(conn) -> (pool key, connection, time pooled), oldest first
        self._idle: OrderedDict[int, tuple[tuple, http.client.HTTPConnection, float]]
        self._idle = OrderedDict()
        self._slots: dict[str, list] = {}  # host -> [BoundedSemaphore, users]
        self._watchdog = _Watchdog()
        self._closed = False

    def _proxy_settings(self) -> None:
        """Bring scheme -> proxy (or the one-line error of an unusable setting), the bypass
        list and the strings to scrub up to date with the environment."""
        environ = os.environ if self._environ is None else self._environ
        names = (*_PROXY_VARS["http"], *_PROXY_VARS["https"], "no_proxy", "NO_PROXY", "REQUEST_METHOD")
        seen = tuple(environ.get(n) for n in names) if self.cfg.proxy_env else ()
        if seen == self._proxy_seen:
            return
        cfg, proxies = self.cfg, {}
        if cfg.proxy is not None:
            proxies = {"http": cfg.proxy, "https": cfg.proxy}
        elif cfg.proxy_env:
            for scheme in ("http", "https"):
                found = _env_proxy(environ, scheme)
                if found is not None:
                    name, value = found
                    try:
                        proxies[scheme] = ProxyURL(value)
                    except ValueError as exc:  # every fetch that needs it says so, none goes direct
                        proxies[scheme] = f"{name}: {exc}"
        bypass = list(cfg.no_proxy)
        if cfg.proxy_env:
            bypass.append(environ.get("no_proxy") or environ.get("NO_PROXY") or "")
        secrets = {x for p in proxies.values() if isinstance(p, ProxyURL) for x in p.secrets()}
        with self._lock:
            self._routes = (proxies, NoProxy(bypass))
            self._secrets = sorted(secrets, key=len, reverse=True)
            self._proxy_seen = seen

    def proxy_for(self, url: str) -> ProxyURL | None:
        """The proxy a fetch of ``url`` goes through (None: direct); ValueError for a bad URL
        or an unusable proxy setting.

            >>> f = Fetcher(FetchConfig(), environ={"HTTPS_PROXY": "http://u:pw@127.0.0.1:3128",
            ...                                     "NO_PROXY": "intranet.example"})
            >>> f.proxy_for("https://example.org/a.jpg"), f.proxy_for("http://example.org/a.jpg")
            (ProxyURL('http://***@127.0.0.1:3128'), None)
            >>> f.proxy_for("https://img.intranet.example/a.jpg") is None
            True
        """
        return self._route(_target(url))

    def _route(self, t: _Target) -> ProxyURL | None:
        self._proxy_settings()
        proxies, bypass = self._routes
        choice = proxies.get(t.scheme)
        if choice is None or bypass.matches(t.host, t.port):
            return None
        if isinstance(choice, str):
            raise ValueError(f"unusable proxy setting {choice}")
        return choice

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
            for secret in self._secrets:  # nothing puts them there; in case an exception text does
                result.error = result.error.replace(secret, "***")
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
            try:
                proxy = self._route(target)
            except ValueError as exc:
                raise _Outcome(FetchResult("failed_download", str(exc), final_url=url)) from None
            self._check_address(target, proxy)
            status, location, body = self._hop(target, proxy, deadline)
            if location is None:
                return FetchResult("success", data=body, http_status=status, final_url=url)
            url = urljoin(url, location)
        error = f"too many redirects (>{self.cfg.max_redirects})"
        raise _Outcome(FetchResult("failed_download", error, http_status=status, final_url=url))

    def _check_address(self, t: _Target, proxy: ProxyURL | None = None) -> None:
        """Refuse a host (first or redirected to) that resolves to a non-public address; through
        a proxy (which resolves names) a literal non-public IP or a localhost name."""
        allow = self.cfg.allow_private_network
        hint = "" if allow else "; --allow-private-network fetches from private ones"
        if proxy is not None:
            addr = _literal_ip(t.host)
            if addr is not None and blocked_address(str(addr), allow):
                error = f"{t.host} is {addr}, a non-public address{hint}"
                raise _Outcome(FetchResult("blocked_address", error, final_url=t.url))
            if not allow and (t.host == "localhost" or t.host.endswith(".localhost")):
                error = f"{t.host} is a loopback name{hint}"
                raise _Outcome(FetchResult("blocked_address", error, final_url=t.url))
            return
        try:
            infos = self._dns.resolve(t.host, t.port)
        except OSError:
            return  # the connection attempt reports it, with retries where they apply
        bad = [info[4][0] for info in infos if blocked_address(info[4][0], allow)]
        if bad:
            error = f"{t.host} resolves to {bad[0]}, a non-public address{hint}"
            raise _Outcome(FetchResult("blocked_address", error, final_url=t.url))

    def _hop(self, t: _Target, proxy: ProxyURL | None, deadline: _Deadline) -> tuple[int, str | None, bytes | None]:
        """One request under the host's slot: (status, redirect location or None, body).

        Pooled connections are keyed by where they lead: the origin (direct), the proxy
        (http through it: any origin), or the origin through the proxy (an https tunnel).
        """
        with self._lock:
            slot = self._slots.get(t.host)
            if slot is None:
                slot = self._slots[t.host] = [threading.BoundedSemaphore(self.cfg.per_host), 0]
            slot[1] += 1
        queued = time.monotonic()
        slot[0].acquire()
        deadline.at += time.monotonic() - queued
        if proxy is None:
            key: tuple = t.key
        else:
            key = ("proxy", proxy) if t.scheme == "http" else (*t.key, proxy)
        try:
            conn = self._take(key)
            if conn is not None:
                try:
                    return self._exchange(conn, t, deadline, reused=True)
                except _Stale:
                    pass
            if t.scheme == "https":
                conn = _HTTPSConnection(t.host, t.port, context=self._tls_context())
            elif proxy is not None:
                conn = _HTTPConnection(proxy.host, proxy.port)
            else:
                conn = _HTTPConnection(t.host, t.port)
            conn.dns, conn.proxy, conn.pool_key = self._dns, proxy, key
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
            via = conn.proxy if t.scheme == "http" else None  # http through a proxy: absolute form
            if via is not None:
                conn.putrequest("GET", f"http://{t.authority}{t.path}", skip_host=True, skip_accept_encoding=True)
                conn.putheader("Host", t.authority)
                if via.authorization:
                    conn.putheader("Proxy-Authorization", via.authorization)
            else:
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
                if status == 407 and via is not None:
                    missing = f" from proxy {via}: its credentials are missing or wrong"
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
                if phase == "connect" and conn.proxy is not None:
                    error += f" (connecting through proxy {conn.proxy})"
                raise _Outcome(fail(error), retry=phase == "connect") from None
            if reused and phase == "request":
                raise _Stale() from exc
            if isinstance(exc, _BlockedAddress):  # the address resolved at connect time (DNS changed)
                raise _Outcome(fail(str(exc), "blocked_address")) from None
            error = str(exc) if isinstance(exc, _ProxyError) else _describe(exc)  # it names the proxy
            raise _Outcome(fail(error), retry=_retryable(exc)) from None
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
            self._idle[id(conn)] = (conn.pool_key or t.key, conn, time.monotonic())
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
