"""Real-socket tests of silverlabel.sources.http.Fetcher against tests/httpserver.py."""

from __future__ import annotations

import email.utils
import io
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from httpserver import MisbehavingServer, sample_jpeg, self_signed_cert
from silverlabel.sources import http as slhttp
from silverlabel.sources.http import FetchConfig, Fetcher, FetchResult, robots_opt_out

pytestmark = pytest.mark.timeout(30)

FAST = FetchConfig(allow_private_network=True, timeout=2.0, retries=2, backoff=0.01, max_retry_after=5.0)


@pytest.fixture
def server():
    with MisbehavingServer() as s:
        yield s


@pytest.fixture
def fetcher():
    with Fetcher(FAST) as f:
        yield f


def is_jpeg(data: bytes | None) -> bool:
    return data is not None and Image.open(io.BytesIO(data)).format == "JPEG"


# --- success paths ---------------------------------------------------------------------


def test_fetch_served_file(server, fetcher):
    url = server.add("/cat.jpg", sample_jpeg(), headers={"Cache-Control": "max-age=60"})
    r = fetcher.fetch(url)
    assert (r.status, r.error, r.http_status, r.final_url) == ("success", "", 200, url)
    assert r.attempts == 1
    assert r.data == sample_jpeg()


def test_request_headers(server, fetcher):
    r = fetcher.fetch(server.add("/a.jpg", sample_jpeg()))
    assert r.status == "success"
    headers = server.last_headers("/a.jpg")
    assert headers["User-Agent"] == FAST.user_agent
    assert headers["User-Agent"].startswith("silverlabel/")
    assert headers["Accept"] == "image/*,*/*;q=0.8"
    assert headers["Accept-Encoding"] == "identity"
    assert headers["Host"] == f"127.0.0.1:{server.port}"


def test_custom_user_agent(server):
    with Fetcher(FetchConfig(allow_private_network=True, user_agent="mybot/1.0 (+mailto:me@example.org)")) as f:
        assert f.fetch(server.add("/a.jpg", sample_jpeg())).status == "success"
    assert server.last_headers("/a.jpg")["User-Agent"] == "mybot/1.0 (+mailto:me@example.org)"


@pytest.mark.parametrize("ctype", ["image/png", "application/octet-stream", "binary/octet-stream",
                                   "IMAGE/JPEG; charset=binary", None])
def test_accepted_content_types(server, fetcher, ctype):
    r = fetcher.fetch(server.add("/x", b"\x89PNG...", content_type=ctype))
    assert r.status == "success" and r.data == b"\x89PNG..."


def test_url_quoting(server, fetcher):
    server.add("/a%20b/caf%C3%A9.jpg", sample_jpeg())
    r = fetcher.fetch(server.url("/a b/café.jpg"))
    assert r.status == "success", r.error
    assert server.hits["/a%20b/caf%C3%A9.jpg"] == 1


def test_gzip_body_is_decoded(server, fetcher):
    r = fetcher.fetch(server.url("/gzip"))
    assert r.status == "success" and r.data == sample_jpeg()


def test_connection_close_response(server, fetcher):
    for _ in range(3):
        assert fetcher.fetch(server.url("/close")).status == "success"
    assert len(server.client_ports) == 3


# --- HTTP errors and retries -------------------------------------------------------------


def test_404_not_retried(server, fetcher):
    r = fetcher.fetch(server.url("/status/404"))
    assert (r.status, r.error, r.http_status, r.attempts) == ("failed_download", "HTTP 404", 404, 1)
    assert server.hits["/status/404"] == 1


def test_5xx_retried_until_exhausted(server, fetcher):
    r = fetcher.fetch(server.url("/status/503"))
    assert (r.status, r.error, r.http_status, r.attempts) == ("failed_download", "HTTP 503", 503, 3)
    assert server.hits["/status/503"] == 3


def test_408_retried(server, fetcher):
    r = fetcher.fetch(server.url("/status/408"))
    assert r.error == "HTTP 408" and server.hits["/status/408"] == 3


def test_flaky_500_then_success(server, fetcher):
    r = fetcher.fetch(server.url("/flaky/a"))
    assert (r.status, r.attempts, r.http_status) == ("success", 2, 200)
    assert is_jpeg(r.data)
    assert server.hits["/flaky/a"] == 2
    assert len(server.client_ports) == 1  # the 500's small body was drained: connection kept


def test_no_retries(server):
    with Fetcher(FetchConfig(allow_private_network=True, retries=0, backoff=0.01)) as f:
        r = f.fetch(server.url("/flaky/b"))
    assert (r.status, r.error, r.attempts) == ("failed_download", "HTTP 500", 1)


def test_ratelimit_honours_retry_after(server, fetcher):
    start = time.monotonic()
    r = fetcher.fetch(server.url("/ratelimit/a"))
    elapsed = time.monotonic() - start
    assert (r.status, r.attempts) == ("success", 2)
    assert server.hits["/ratelimit/a"] == 2
    assert elapsed >= 0.95  # waited Retry-After: 1 instead of the 0.01 s backoff


def test_retry_after_http_date(server, fetcher):
    start = time.monotonic()
    r = fetcher.fetch(server.url("/unavailable/a"))
    assert (r.status, r.attempts) == ("success", 2)
    assert time.monotonic() - start >= server.retry_after_wait - 0.05


def test_retry_after_over_cap_fails_at_once(server, fetcher):
    start = time.monotonic()
    r = fetcher.fetch(server.url("/slow-retry-after"))
    assert (r.status, r.http_status) == ("failed_download", 429)
    assert r.error == "HTTP 429, Retry-After 3600 s exceeds cap"
    assert server.hits["/slow-retry-after"] == 1
    assert time.monotonic() - start < 5


def test_retry_after_parsing():
    assert slhttp._retry_after("7") == 7.0
    assert slhttp._retry_after(None) is None
    assert slhttp._retry_after("soon") is None
    future = email.utils.formatdate(time.time() + 100, usegmt=True)
    assert 95 <= slhttp._retry_after(future) <= 101
    assert slhttp._retry_after("Thu, 01 Jan 1970 00:00:00 GMT") == 0.0


# --- content checks ----------------------------------------------------------------------


def test_html_refused(server, fetcher):
    r = fetcher.fetch(server.url("/html"))
    assert (r.status, r.error, r.http_status, r.data) == (
        "failed_download", "content-type text/html is not an image", 200, None)


def test_json_refused(server, fetcher):
    r = fetcher.fetch(server.url("/json"))
    assert r.error == "content-type application/json is not an image"


CAP_ERROR = "body exceeds byte cap of 100000 bytes"


def test_byte_cap_from_content_length(server):
    with Fetcher(FetchConfig(allow_private_network=True, max_bytes=100_000)) as f:
        start = time.monotonic()
        r = f.fetch(server.url("/big?size=50000000"))
    assert (r.status, r.error, r.attempts) == ("failed_download", CAP_ERROR, 1)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("route", ["/big-no-length", "/big-chunked"])
def test_byte_cap_while_reading(server, route):
    with Fetcher(FetchConfig(allow_private_network=True, max_bytes=100_000)) as f:
        r = f.fetch(server.url(f"{route}?size=200000000"))
    assert (r.status, r.error, r.attempts) == ("failed_download", CAP_ERROR, 1)
    time.sleep(0.2)
    assert server.sent[route] < 50_000_000  # aborted early, not read to the end and discarded


@pytest.mark.parametrize("route", ["/big", "/big-no-length", "/big-chunked"])
def test_big_body_under_cap(server, route):
    with Fetcher(FetchConfig(allow_private_network=True, max_bytes=3_000_000)) as f:
        r = f.fetch(server.url(f"{route}?size=2500000"))
    assert r.status == "success" and len(r.data) == 2_500_000


def test_exactly_at_cap(server):
    server.add("/exact", bytes(1000))
    with Fetcher(FetchConfig(allow_private_network=True, max_bytes=1000)) as f:
        assert f.fetch(server.url("/exact")).status == "success"
    with Fetcher(FetchConfig(allow_private_network=True, max_bytes=999)) as f:
        assert f.fetch(server.url("/exact")).error == "body exceeds byte cap of 999 bytes"


def test_truncated_body_is_an_error(server, fetcher):
    r = fetcher.fetch(server.url("/truncated-body"))
    assert r.status == "failed_download" and r.error.startswith("IncompleteRead")
    assert r.attempts == 3  # a connection problem: retried


# --- X-Robots-Tag ------------------------------------------------------------------------


def test_noai_opted_out(server, fetcher):
    r = fetcher.fetch(server.url("/noai"))
    assert (r.status, r.error, r.data, r.attempts) == ("opted_out", "X-Robots-Tag: noai", None, 1)


def test_other_bot_directive_does_not_apply(server, fetcher):
    assert fetcher.fetch(server.url("/otherbot-noai")).status == "success"


def test_robots_can_be_ignored(server):
    with Fetcher(FetchConfig(allow_private_network=True, respect_robots=False)) as f:
        assert f.fetch(server.url("/noai")).status == "success"


def test_robots_multiple_headers_and_bot_prefix(server, fetcher):
    headers = [("X-Robots-Tag", "noindex"), ("X-Robots-Tag", "SilverLabel: NoImageAI")]
    r = fetcher.fetch(server.add("/multi", sample_jpeg(), headers=headers))
    assert (r.status, r.error) == ("opted_out", "X-Robots-Tag: noimageai")


def test_robots_user_directives(server):
    url = server.add("/noindex", sample_jpeg(), headers={"X-Robots-Tag": "noindex, nofollow"})
    with Fetcher(FetchConfig(allow_private_network=True)) as f:
        assert f.fetch(url).status == "success"
    with Fetcher(FetchConfig(allow_private_network=True, robots_optout=("noai", "noimageai", "noindex"))) as f:
        assert f.fetch(url).error == "X-Robots-Tag: noindex"


@pytest.mark.parametrize("values, expected", [
    (["noai"], "noai"),
    (["NOAI"], "noai"),
    (["noindex, noimageai"], "noimageai"),
    (["googlebot: noai"], None),
    (["googlebot: noindex, noai"], None),  # the prefix scopes the whole list
    (["googlebot: noindex, silverlabel: noai"], "noai"),
    (["*: noai"], "noai"),
    (["silverlabel: noai"], "noai"),
    (["unavailable_after: 25 Jun 2010 15:00:00 PST, noai"], "noai"),  # not a bot name
    (["max-image-preview: large"], None),
    (["googlebot: noai", "all"], None),
    ([], None),
])
def test_robots_parsing(values, expected):
    assert robots_opt_out(values, "silverlabel", ("noai", "noimageai")) == expected


# --- redirects ---------------------------------------------------------------------------


def test_redirect_chain(server, fetcher):
    r = fetcher.fetch(server.url("/redirect/5"))
    assert r.status == "success" and is_jpeg(r.data)
    assert r.final_url == server.url("/redirect/0")
    assert all(server.hits[f"/redirect/{i}"] == 1 for i in range(6))


def test_too_many_redirects(server, fetcher):
    r = fetcher.fetch(server.url("/redirect/6"))
    assert (r.status, r.error, r.attempts) == ("failed_download", "too many redirects (>5)", 1)


def test_redirect_loop(server, fetcher):
    r = fetcher.fetch(server.url("/redirect-loop"))
    assert r.error == "too many redirects (>5)"
    assert server.hits["/redirect-loop"] == 6


def test_max_redirects_zero(server):
    with Fetcher(FetchConfig(allow_private_network=True, max_redirects=0)) as f:
        assert f.fetch(server.url("/redirect/1")).error == "too many redirects (>0)"
        assert f.fetch(server.url("/redirect/0")).status == "success"


def test_absolute_redirect(server, fetcher):
    r = fetcher.fetch(server.url("/redirect-abs"))
    assert r.status == "success" and r.final_url == server.url("/redirect/0")


def test_private_addresses_refused_by_default(server):
    """A URL table must not reach loopback or private hosts unless the user says so: refused
    after DNS, before any connection (the server sees nothing)."""
    with Fetcher(FetchConfig()) as f:
        r = f.fetch(server.url("/redirect/0"))
    assert (r.status, r.attempts) == ("blocked_address", 1)
    assert "127.0.0.1" in r.error and "--allow-private-network" in r.error
    assert sum(server.hits.values()) == 0


def test_redirect_to_link_local_refused_even_on_an_intranet(server, fetcher):
    """The cloud metadata endpoint is refused on every redirect, --allow-private-network or not;
    nothing is sent there (the check happens after DNS, before connecting)."""
    r = fetcher.fetch(server.url("/redirect-metadata"))
    assert (r.status, r.attempts) == ("blocked_address", 1)
    assert "169.254.169.254" in r.error and r.final_url == "http://169.254.169.254/latest/meta-data/"
    assert server.hits["/redirect-metadata"] == 1


def test_redirect_to_file_refused(server, fetcher):
    r = fetcher.fetch(server.url("/redirect-file"))
    assert r.status == "failed_download"
    assert r.error == "redirect to unsupported url 'file:///etc/passwd'"


# --- network failures and deadlines ------------------------------------------------------


@pytest.mark.parametrize("url", ["ftp://x", "file:///etc/passwd", "http://", "not a url", "",
                                 "http://host:99999/x", "https:///path"])
def test_invalid_url(url, fetcher):
    r = fetcher.fetch(url)
    assert (r.status, r.error, r.attempts) == ("failed_download", f"invalid url {url!r}", 1)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_refused_retried(fetcher):
    start = time.monotonic()
    r = fetcher.fetch(f"http://127.0.0.1:{closed_port()}/x.jpg")
    assert r.status == "failed_download"
    assert r.error == "ConnectionRefusedError: [Errno 111] Connection refused"
    assert r.attempts == 3
    assert time.monotonic() - start >= 0.02  # backoff 0.01 + 0.02


def test_hang_after_headers_times_out(server):
    with Fetcher(FetchConfig(allow_private_network=True, timeout=1.0, retries=2, backoff=0.01)) as f:
        start = time.monotonic()
        r = f.fetch(server.url("/hang"))
        elapsed = time.monotonic() - start
    assert (r.status, r.error, r.http_status) == ("failed_download", "timeout after 1.0 s", 200)
    assert 0.9 <= elapsed < 10
    assert r.attempts == 1  # a stall after connecting is not retried


@pytest.mark.parametrize("route", ["/drip-headers", "/drip-body"])
def test_trickling_server_bounded_by_deadline(server, route):
    with Fetcher(FetchConfig(allow_private_network=True, timeout=0.5, retries=0)) as f:
        start = time.monotonic()
        r = f.fetch(server.url(route))
        elapsed = time.monotonic() - start
    assert (r.status, r.error) == ("failed_download", "timeout after 0.5 s")
    assert 0.45 <= elapsed < 5


def test_connect_timeout_retried():
    # A listener whose accept queue is full drops new SYNs (Linux): connect() times out.
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        filler.connect(listener.getsockname())
        with Fetcher(FetchConfig(allow_private_network=True, timeout=0.2, retries=2, backoff=0.01)) as f:
            start = time.monotonic()
            r = f.fetch(f"http://127.0.0.1:{listener.getsockname()[1]}/x.jpg")
    assert (r.status, r.error, r.attempts) == ("failed_download", "timeout after 0.2 s", 3)
    assert 0.55 <= time.monotonic() - start < 5


def test_tls_handshake_timeout_retried():
    # The TCP connection is accepted but the server never speaks TLS.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        with Fetcher(FetchConfig(allow_private_network=True, timeout=0.2, retries=1, backoff=0.01)) as f:
            r = f.fetch(f"https://127.0.0.1:{listener.getsockname()[1]}/x.jpg")
    assert (r.error, r.attempts) == ("timeout after 0.2 s", 2)


def test_unresolvable_host_not_retried(fetcher):
    r = fetcher.fetch("http://no-such-host.invalid/x.jpg")
    assert r.status == "failed_download" and r.error.startswith("gaierror")
    assert r.attempts == 1


def test_fetch_never_raises_on_garbage_server(fetcher):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()

        def serve():
            conn, _ = s.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n" * 3)

        threading.Thread(target=serve, daemon=True).start()
        r = fetcher.fetch(f"http://127.0.0.1:{s.getsockname()[1]}/x")
    assert r.status == "failed_download" and r.error.startswith("BadStatusLine")
    assert "\n" not in r.error and r.attempts == 1  # a protocol error: not retried


# --- pooling, per-host limit, DNS cache ---------------------------------------------------


def test_keep_alive_reuses_one_connection(server, fetcher):
    urls = [server.add(f"/k{i}.jpg", sample_jpeg()) for i in range(5)]
    urls += [server.url("/status/404"), server.url("/redirect/2")]
    results = [fetcher.fetch(u) for u in urls]
    assert [r.status for r in results] == ["success"] * 5 + ["failed_download", "success"]
    assert len(server.client_ports) == 1


def test_stale_pooled_connection_retried_for_free(server):
    with Fetcher(FetchConfig(allow_private_network=True, retries=0)) as f:
        assert f.fetch(server.add("/s.jpg", sample_jpeg())).status == "success"
        server.drop_connections()  # the server forgets the idle keep-alive connection
        time.sleep(0.1)
        r = f.fetch(server.url("/s.jpg"))
    assert (r.status, r.attempts) == ("success", 1)
    assert len(server.client_ports) == 2


def test_close_empties_pool(server):
    f = Fetcher(FAST)
    f.fetch(server.add("/c.jpg", sample_jpeg()))
    assert len(f._idle) == 1
    f.close()
    assert len(f._idle) == 0
    assert f.fetch(server.url("/c.jpg")).status == "success"  # still usable afterwards


def test_per_host_limit(server):
    with Fetcher(FetchConfig(allow_private_network=True, per_host=2)) as f, ThreadPoolExecutor(8) as pool:
        results = list(pool.map(f.fetch, [server.url(f"/slow/{i}?delay=0.15") for i in range(8)]))
    assert all(r.status == "success" for r in results)
    assert server.max_in_flight == 2
    assert not f._slots  # per-host semaphores are dropped when unused


def test_concurrency_without_limit_pressure(server):
    with Fetcher(FetchConfig(allow_private_network=True, per_host=16)) as f, ThreadPoolExecutor(8) as pool:
        results = list(pool.map(f.fetch, [server.url(f"/slow/{i}?delay=0.2") for i in range(8)]))
    assert all(r.status == "success" for r in results)
    assert server.max_in_flight > 2


def test_queueing_for_a_slot_does_not_eat_the_deadline(server):
    cfg = FetchConfig(allow_private_network=True, per_host=1, timeout=0.3, retries=0)
    with Fetcher(cfg) as f, ThreadPoolExecutor(3) as pool:
        results = list(pool.map(f.fetch, [server.url(f"/slow/{i}?delay=0.2") for i in range(3)]))
    assert [r.status for r in results] == ["success"] * 3  # the last one queued 0.4 s


def test_dns_cache_resolves_once(server, monkeypatch):
    calls = []
    real = socket.getaddrinfo

    def counting(host, *args, **kwargs):
        calls.append(host)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", counting)
    urls = [server.url(f"/d{i}", host="localhost") for i in range(6)]
    urls += [server.url("/close", host="localhost")] * 3  # new connections, same cache entry
    for i in range(6):
        server.add(f"/d{i}", sample_jpeg())
    with Fetcher(FAST) as f, ThreadPoolExecutor(4) as pool:
        assert all(r.status == "success" for r in pool.map(f.fetch, urls))
    assert calls.count("localhost") == 1
    assert server.last_headers("/d0")["Host"] == f"localhost:{server.port}"


def test_dns_cache_expires(server, monkeypatch):
    calls = []
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo",
                        lambda h, *a, **k: calls.append(h) or real(h, *a, **k))
    url = server.add("/e", sample_jpeg()).replace("127.0.0.1", "localhost")
    with Fetcher(FetchConfig(allow_private_network=True, dns_ttl=0.1)) as f:
        f.fetch(url)
        time.sleep(0.2)
        f.close()  # force a new connection
        f.fetch(url)
    assert calls.count("localhost") == 2


def test_thread_safety_many_fetches(server):
    for i in range(20):
        server.add(f"/m{i}", sample_jpeg(seed=i))
    urls = [server.url(f"/m{i % 20}") for i in range(200)] + [server.url("/status/404")] * 20
    with Fetcher(FetchConfig(allow_private_network=True, per_host=8)) as f, ThreadPoolExecutor(64) as pool:
        results = list(pool.map(f.fetch, urls))
    assert [r.data == sample_jpeg(seed=i % 20) for i, r in enumerate(results[:200])] == [True] * 200
    assert all(r.error == "HTTP 404" for r in results[200:])
    assert len(server.client_ports) <= 8 + 1


# --- TLS ---------------------------------------------------------------------------------

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI missing")


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return self_signed_cert(tmp_path_factory.mktemp("tls"))


@needs_openssl
def test_https_unverified_cert_rejected(cert):
    with MisbehavingServer(tls=cert) as server, Fetcher(FAST) as f:
        r = f.fetch(server.add("/t.jpg", sample_jpeg()))
    assert r.status == "failed_download" and r.error.startswith("SSLCertVerificationError")
    assert r.attempts == 1


@needs_openssl
def test_https_without_verification(cert):
    with MisbehavingServer(tls=cert) as server, Fetcher(FetchConfig(allow_private_network=True, verify_tls=False)) as f:
        url = server.add("/t.jpg", sample_jpeg())
        results = [f.fetch(url) for _ in range(3)]
    assert [r.data == sample_jpeg() for r in results] == [True] * 3
    assert len(server.client_ports) == 1


@needs_openssl
def test_https_verified_with_sni_through_dns_cache(cert, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", cert[0])  # trusted by ssl.create_default_context()
    with MisbehavingServer(tls=cert) as server, Fetcher(FAST) as f:
        server.add("/t.jpg", sample_jpeg())
        r = f.fetch(server.url("/t.jpg", host="localhost"))
        assert (r.status, r.error) == ("success", "")
        r = f.fetch(server.url("/redirect/2", host="localhost"))
        assert r.status == "success" and r.final_url == server.url("/redirect/0", host="localhost")
    assert len(server.client_ports) == 1


def test_result_defaults():
    assert FetchResult("success") == FetchResult("success", "", None, None, None, 1)


def test_an_address_refused_at_connect_time_is_blocked_not_retried(server):
    """The check at connect time (a DNS answer that changed after the first check) gives the
    same status, and is not retried as a network error."""
    with Fetcher(FetchConfig(allow_private_network=True, retries=2, backoff=0.01)) as f:
        f._dns.allow_private = False  # the first check passes; the connection's own check refuses
        r = f.fetch(server.url("/redirect/0"))
    assert (r.status, r.attempts) == ("blocked_address", 1) and "127.0.0.1" in r.error
    assert sum(server.hits.values()) == 0
