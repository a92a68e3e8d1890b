"""The downloader through an HTTP proxy (issue 16): HTTP_PROXY / HTTPS_PROXY / ALL_PROXY /
NO_PROXY, --proxy, --no-proxy, --no-proxy-env, proxy credentials, the private-network refusal.

Real parts: a counting forward proxy on loopback (tests/fixtures/proxyserver.py: absolute-form
GET for http, a CONNECT tunnel for https), the misbehaving origin of tests/httpserver.py (over
TLS with a certificate for ``images.example`` that the client is told to trust through
``SSL_CERT_FILE``), ``silverlabel ingest`` in a subprocess. The proxy resolves
``images.example`` to 127.0.0.1 itself, as an egress proxy resolves names the cluster cannot:
the client never resolves it, and fetches it with the private-network refusal on.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import tarfile
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fixtures.proxyserver import ForwardProxy, named_cert
from httpserver import MisbehavingServer, sample_jpeg
from silverlabel.errors import UserError
from silverlabel.sources.http import FetchConfig, Fetcher, NoProxy, ProxyURL

pytestmark = pytest.mark.timeout(60)

NAME = "images.example"  # resolved by the proxy only
USER, PASSWORD = "alice", "pa:ss w@rd-7Qx!"  # needs %-escapes in a URL
ESCAPED = "pa%3Ass%20w%40rd-7Qx%21"
TOKEN = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
              "no_proxy", "NO_PROXY", "REQUEST_METHOD")
FAST = dict(timeout=5.0, retries=0, backoff=0.01)
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI missing")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def origin():
    with MisbehavingServer() as s:
        for k in range(5):
            s.add(f"/img{k}.jpg", sample_jpeg(seed=k))
        yield s


@pytest.fixture
def proxy():
    with ForwardProxy(hosts={NAME: "127.0.0.1"}) as p:
        yield p


@pytest.fixture
def auth_proxy():
    with ForwardProxy(auth=(USER, PASSWORD), hosts={NAME: "127.0.0.1"}) as p:
        yield p


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI missing")
    return named_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_origin(cert, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", cert[0])  # trusted by ssl.create_default_context()
    with MisbehavingServer(tls=cert) as s:
        for k in range(5):
            s.add(f"/img{k}.jpg", sample_jpeg(seed=k))
        yield s


def dead_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def named(server: MisbehavingServer, path: str) -> str:
    return server.url(path, host=NAME)


# --- http through the proxy ------------------------------------------------------------


def test_http_urls_all_go_through_http_proxy(origin, proxy, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", proxy.url())
    urls = [named(origin, f"/img{k}.jpg") for k in range(5)]
    with Fetcher(FetchConfig(**FAST)) as f:  # private-network refusal on: the proxy is the user's choice
        results = [f.fetch(u) for u in urls]
    assert [(r.status, r.error) for r in results] == [("success", "")] * 5
    assert [r.data for r in results] == [sample_jpeg(seed=k) for k in range(5)]
    assert proxy.targets("GET") == urls and proxy.count() == 5  # absolute form, every one
    assert sum(origin.hits.values()) == 5
    assert origin.last_headers("/img4.jpg")["Host"] == f"{NAME}:{origin.port}"
    assert "Proxy-Authorization" not in proxy.requests[0][2]
    assert len(proxy.client_ports) == 1  # one keep-alive connection to the proxy


def test_lower_case_variable_wins_and_all_proxy_is_used(origin, proxy, monkeypatch):
    monkeypatch.setenv("http_proxy", proxy.url())
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{dead_port()}")
    with Fetcher(FetchConfig(**FAST)) as f:
        assert f.fetch(named(origin, "/img0.jpg")).status == "success"
    monkeypatch.delenv("http_proxy")
    monkeypatch.delenv("HTTP_PROXY")
    monkeypatch.setenv("ALL_PROXY", proxy.url())
    with Fetcher(FetchConfig(**FAST)) as f:
        assert f.fetch(named(origin, "/img1.jpg")).status == "success"
    assert proxy.count("GET") == 2


def test_http_proxy_is_ignored_under_cgi(origin, monkeypatch):
    """httpoxy: under CGI, HTTP_PROXY is a request header, not the administrator's setting."""
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{dead_port()}")
    monkeypatch.setenv("REQUEST_METHOD", "GET")
    with Fetcher(FetchConfig(allow_private_network=True, **FAST)) as f:
        assert f.fetch(origin.url("/img0.jpg")).status == "success"


def test_redirects_through_the_proxy_keep_per_hop_checks(origin, proxy, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", proxy.url())
    with Fetcher(FetchConfig(**FAST)) as f:
        r = f.fetch(named(origin, "/redirect/3"))
        assert (r.status, r.final_url, r.data) == ("success", named(origin, "/redirect/0"), sample_jpeg())
        assert proxy.count("GET") == 4
        r = f.fetch(named(origin, "/redirect-metadata"))  # to http://169.254.169.254/...
        assert r.status == "blocked_address" and "169.254.169.254" in r.error
        assert proxy.count("GET") == 5  # the redirect was not sent to the proxy
        r = f.fetch(named(origin, "/redirect-file"))
        assert r.status == "failed_download" and "unsupported url" in r.error


def test_literal_private_targets_are_refused_before_the_proxy(origin, proxy, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", proxy.url())
    monkeypatch.setenv("HTTPS_PROXY", proxy.url())
    port = origin.port
    with Fetcher(FetchConfig(**FAST)) as f:
        for url in (f"http://127.0.0.1:{port}/img0.jpg", f"http://2130706433:{port}/img0.jpg",
                    f"http://127.1:{port}/img0.jpg", f"http://0x7f000001:{port}/img0.jpg",
                    f"http://[::1]:{port}/img0.jpg", f"https://10.1.2.3/img0.jpg",
                    f"http://localhost:{port}/img0.jpg", f"http://a.localhost:{port}/img0.jpg",
                    "http://169.254.169.254/latest/meta-data/"):
            r = f.fetch(url)
            assert r.status == "blocked_address", (url, r)
            assert "--allow-private-network" in r.error or "169.254" in url
    assert proxy.count() == 0 and sum(origin.hits.values()) == 0
    with Fetcher(FetchConfig(allow_private_network=True, **FAST)) as f:  # allowed: through the proxy
        assert f.fetch(f"http://127.0.0.1:{port}/img0.jpg").status == "success"
        assert f.fetch("http://169.254.169.254/latest/meta-data/").status == "blocked_address"  # never
    assert proxy.targets("GET") == [f"http://127.0.0.1:{port}/img0.jpg"]


# --- https through a CONNECT tunnel ----------------------------------------------------


@needs_openssl
def test_https_urls_go_through_a_connect_tunnel(tls_origin, proxy, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", proxy.url())
    urls = [named(tls_origin, f"/img{k}.jpg") for k in range(5)]
    with Fetcher(FetchConfig(**FAST)) as f:
        results = [f.fetch(u) for u in urls]
        redirected = f.fetch(named(tls_origin, "/redirect/2"))
    assert [(r.status, r.error) for r in results] == [("success", "")] * 5
    assert [r.data for r in results] == [sample_jpeg(seed=k) for k in range(5)]
    assert redirected.status == "success" and redirected.final_url == named(tls_origin, "/redirect/0")
    assert proxy.targets("CONNECT") == [f"{NAME}:{tls_origin.port}"]  # one tunnel, kept alive
    assert proxy.count("GET") == 0
    assert sum(tls_origin.hits.values()) == 8 and len(tls_origin.client_ports) == 1
    assert tls_origin.last_headers("/img0.jpg")["Host"] == f"{NAME}:{tls_origin.port}"


@needs_openssl
def test_tls_is_verified_with_the_origin_through_the_tunnel(cert, proxy, monkeypatch):
    """Without the origin's certificate trusted, the tunnel opens but TLS fails: the handshake
    is with the origin (SNI images.example), not with the proxy."""
    monkeypatch.setenv("HTTPS_PROXY", proxy.url())
    with MisbehavingServer(tls=cert) as s, Fetcher(FetchConfig(**FAST)) as f:
        r = f.fetch(named(s, "/redirect/0"))
    assert r.status == "failed_download" and r.error.startswith("SSLCertVerificationError")
    assert proxy.count("CONNECT") == 1


# --- NO_PROXY and the options ------------------------------------------------------------


@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "127.0.0.0/8", "*", "localhost,127.0.0.1", "127.0.0.1:{port}"])
def test_no_proxy_bypass_is_direct(origin, proxy, monkeypatch, no_proxy):
    monkeypatch.setenv("HTTP_PROXY", proxy.url())
    monkeypatch.setenv("NO_PROXY", no_proxy.format(port=origin.port))
    with Fetcher(FetchConfig(allow_private_network=True, **FAST)) as f:
        direct = f.fetch(origin.url("/img0.jpg"))
        proxied = f.fetch(named(origin, "/img1.jpg"))
    assert direct.status == "success" and direct.data == sample_jpeg(seed=0)
    assert origin.hits["/img0.jpg"] == 1
    if no_proxy == "*":  # everything direct: the client cannot resolve images.example
        assert proxied.status == "failed_download" and proxy.count() == 0
    else:
        assert proxied.status == "success" and proxy.targets("GET") == [named(origin, "/img1.jpg")]


def test_no_proxy_with_another_port_does_not_bypass(origin, proxy, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", proxy.url())
    monkeypatch.setenv("no_proxy", f"127.0.0.1:{origin.port + 1}")
    with Fetcher(FetchConfig(allow_private_network=True, **FAST)) as f:
        assert f.fetch(origin.url("/img0.jpg")).status == "success"
    assert proxy.count("GET") == 1


def test_no_proxy_option_and_no_proxy_env(origin, proxy, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{dead_port()}")
    cfg = FetchConfig(allow_private_network=True, **FAST)
    with Fetcher(FetchConfig(**{**asdict(cfg), "no_proxy": ("127.0.0.0/8",)})) as f:
        assert f.fetch(origin.url("/img0.jpg")).status == "success"
    with Fetcher(FetchConfig(**{**asdict(cfg), "proxy_env": False})) as f:
        assert f.fetch(origin.url("/img1.jpg")).status == "success"
    # --proxy replaces the variables; NO_PROXY still applies to it, not with --no-proxy-env
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with Fetcher(FetchConfig(**{**asdict(cfg), "proxy": proxy.url()})) as f:
        assert f.fetch(origin.url("/img2.jpg")).status == "success"
        assert proxy.count() == 0
        assert f.fetch(named(origin, "/img3.jpg")).status == "success"
    with Fetcher(FetchConfig(**{**asdict(cfg), "proxy": proxy.url(), "proxy_env": False})) as f:
        assert f.fetch(origin.url("/img4.jpg")).status == "success"
    assert proxy.targets("GET") == [named(origin, "/img3.jpg"), origin.url("/img4.jpg")]
    assert sum(origin.hits.values()) == 5


def test_environment_is_read_per_fetch(origin, proxy, monkeypatch):
    """A Fetcher kept per process (ingest keeps one per config) follows a changed environment."""
    with Fetcher(FetchConfig(allow_private_network=True, **FAST)) as f:
        assert f.fetch(origin.url("/img0.jpg")).status == "success"
        monkeypatch.setenv("HTTP_PROXY", proxy.url())
        assert f.fetch(origin.url("/img1.jpg")).status == "success"
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        assert f.fetch(origin.url("/img2.jpg")).status == "success"
    assert proxy.targets("GET") == [origin.url("/img1.jpg")]


def test_no_proxy_matching():
    np_ = NoProxy("example.org, .corp.example ,*.svc.local, 192.168.0.0/16, fd00::/8, [::1]:8080,HOST.TEST.")
    yes = [("example.org", 443), ("img.example.org", 80), ("corp.example", 80), ("a.b.corp.example", 80),
           ("x.svc.local", 80), ("192.168.4.5", 80), ("fd12::1", 443), ("::1", 8080), ("host.test", 80),
           ("Host.Test.", 80)]
    no = [("badexample.org", 80), ("example.org.evil", 80), ("192.169.0.1", 80), ("::1", 80),
          ("fe80::1", 80), ("test", 80), ("svc.local.com", 80)]
    assert [np_.matches(h, p) for h, p in yes] == [True] * len(yes)
    assert [np_.matches(h, p) for h, p in no] == [False] * len(no)
    assert not NoProxy(["", " , "]) and NoProxy("*")


# --- credentials -----------------------------------------------------------------------


def _no_secret(text: str) -> bool:
    return all(s not in text for s in (PASSWORD, ESCAPED, TOKEN))


@needs_openssl
def test_proxy_credentials_are_sent_and_never_shown(origin, tls_origin, auth_proxy, monkeypatch):
    url = auth_proxy.url(USER, ESCAPED)
    monkeypatch.setenv("HTTP_PROXY", url)
    monkeypatch.setenv("HTTPS_PROXY", url)
    with Fetcher(FetchConfig(**FAST)) as f:
        plain = f.fetch(named(origin, "/img0.jpg"))
        tls = f.fetch(named(tls_origin, "/img1.jpg"))
    assert (plain.status, tls.status) == ("success", "success")
    assert (plain.data, tls.data) == (sample_jpeg(seed=0), sample_jpeg(seed=1))
    assert [h.get("Proxy-Authorization") for _, _, h in auth_proxy.requests] == [f"Basic {TOKEN}"] * 2
    assert auth_proxy.refused == 0
    assert "Proxy-Authorization" not in origin.last_headers("/img0.jpg")  # not passed on
    # wrong credentials: a clear error naming the proxy, without any credentials
    monkeypatch.setenv("HTTP_PROXY", auth_proxy.url(USER, "wrong-password-1"))
    monkeypatch.setenv("HTTPS_PROXY", auth_proxy.url(USER, "wrong-password-1"))
    with Fetcher(FetchConfig(**FAST)) as f:
        plain = f.fetch(named(origin, "/img2.jpg"))
        tls = f.fetch(named(tls_origin, "/img3.jpg"))
    proxy_shown = f"http://***@127.0.0.1:{auth_proxy.port}"
    assert plain.status == "failed_download" and plain.http_status == 407
    assert plain.error == f"HTTP 407 from proxy {proxy_shown}: its credentials are missing or wrong"
    assert tls.status == "failed_download"
    assert tls.error == (f"proxy {proxy_shown} refused CONNECT {NAME}:{tls_origin.port}: "
                         "HTTP 407 Proxy Authentication Required")
    assert "wrong-password-1" not in plain.error + tls.error
    assert auth_proxy.refused == 2 and origin.hits["/img2.jpg"] == 0


def test_proxy_url_hides_credentials():
    p = ProxyURL(f"http://{USER}:{ESCAPED}@proxy.internal:3128")
    assert (p.host, p.port, p.username, p.authorization) == ("proxy.internal", 3128, USER, f"Basic {TOKEN}")
    cfg = FetchConfig(proxy=f"http://{USER}:{ESCAPED}@proxy.internal:3128")
    assert cfg.proxy == p and hash(cfg.proxy) == hash(p)
    shown = [str(p), repr(p), repr(cfg), json.dumps(asdict(cfg), default=str)]
    assert all(_no_secret(s) for s in shown) and "http://***@proxy.internal:3128" in shown[3]
    back = pickle.loads(pickle.dumps(cfg))  # to an engine's worker: credentials travel
    assert back == cfg and back.proxy.authorization == f"Basic {TOKEN}"
    assert ProxyURL(f"http://{USER}:{ESCAPED}@proxy.internal:3128") != ProxyURL("http://proxy.internal:3128")


@pytest.mark.parametrize("bad, words", [("socks5://u:secretpw@127.0.0.1:1080", "socks5:// is not supported"),
                                        ("https://u:secretpw@proxy:443", "https:// is not supported"),
                                        ("http://u:secretpw@proxy:notaport", "bad port"),
                                        ("http://u:secretpw@/", "no host")])
def test_unusable_proxy_is_a_clear_error_without_credentials(bad, words, origin, monkeypatch):
    with pytest.raises(UserError, match=re.escape(words)) as info:
        FetchConfig(proxy=bad)
    assert "secretpw" not in str(info.value)
    # the same in the environment: each fetch that needs it fails saying so; none goes direct
    monkeypatch.setenv("HTTP_PROXY", bad)
    with Fetcher(FetchConfig(allow_private_network=True, **FAST)) as f:
        r = f.fetch(origin.url("/img0.jpg"))
    assert r.status == "failed_download" and r.error.startswith("unusable proxy setting HTTP_PROXY: ")
    assert words in r.error and "secretpw" not in r.error
    assert origin.hits["/img0.jpg"] == 0


def test_cli_proxy_flags():
    from silverlabel.cli import build_parser, config_from_args
    from silverlabel.stages.ingest import IngestConfig

    args = build_parser("ingest").parse_args(["ingest", "u.csv", "-o", "p", "--proxy", "http://u:pw12@127.0.0.1:3128",
                                              "--no-proxy", "a.example,10.0.0.0/8", "--no-proxy-env"])
    cfg = config_from_args(IngestConfig, args).fetch
    assert (cfg.proxy, cfg.no_proxy, cfg.proxy_env) == (ProxyURL("http://u:pw12@127.0.0.1:3128"),
                                                         ("a.example", "10.0.0.0/8"), False)
    assert FetchConfig().proxy is None and FetchConfig().proxy_env
    p = subprocess.run([sys.executable, "-m", "silverlabel.cli", "ingest", "u.csv", "-o", "p", "--proxy",
                        "socks5://u:secretpw@h:1"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "socks5:// is not supported" in p.stderr and "secretpw" not in p.stderr


# --- a dead proxy --------------------------------------------------------------------------


def test_dead_proxy_is_a_clear_row_status(origin, monkeypatch):
    port = dead_port()
    monkeypatch.setenv("HTTP_PROXY", f"http://{USER}:{ESCAPED}@127.0.0.1:{port}")
    monkeypatch.setenv("HTTPS_PROXY", f"http://{USER}:{ESCAPED}@127.0.0.1:{port}")
    with Fetcher(FetchConfig(timeout=2.0, retries=1, backoff=0.01)) as f:
        plain = f.fetch(named(origin, "/img0.jpg"))
        tls = f.fetch("https://images.example/a.jpg")
    for r in (plain, tls):
        assert r.status == "failed_download" and r.attempts == 2  # a proxy restarting: retried
        assert r.error.startswith(f"proxy http://***@127.0.0.1:{port} unreachable: ConnectionRefusedError")
        assert _no_secret(r.error)
    assert sum(origin.hits.values()) == 0


# --- ingest end to end -----------------------------------------------------------------


def _jpeg_members(pool: Path) -> list[bytes]:
    out = []
    for shard in sorted((pool / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            out += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith((".jpg", ".jpeg"))]
    return sorted(out)


def _all_text(paths: list[Path], *extra: str) -> str:
    """Every byte under the given folders (as latin-1) plus extra strings: for secret greps."""
    parts = list(extra)
    for root in paths:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                parts.append(p.read_bytes().decode("latin-1"))
    return "\n".join(parts)


def _ingest_cli(table: Path, out: Path, env: dict[str, str], *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "silverlabel.cli", "ingest", str(table), "-o", str(out),
                           "--workers", "1", "--no-progress", "--retries", "0", "-vv", *flags],
                          capture_output=True, text=True, timeout=180, env=env)


def test_ingest_through_an_authenticating_proxy(tmp_path, origin, auth_proxy):
    """``silverlabel ingest`` on a URL table, proxy from HTTP_PROXY with credentials: every URL
    through the proxy, the same images as a direct ingest, the password in no file and no log."""
    n = 5
    table = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": [named(origin, f"/img{k}.jpg") for k in range(n)]}), table)
    direct_table = tmp_path / "direct.parquet"
    pq.write_table(pa.table({"url": [origin.url(f"/img{k}.jpg") for k in range(n)]}), direct_table)
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
    proxied = _ingest_cli(table, tmp_path / "pool", {**env, "HTTP_PROXY": auth_proxy.url(USER, ESCAPED)})
    assert proxied.returncode == 0, proxied.stderr
    assert re.search(rf"success\s+{n}\s", proxied.stdout), proxied.stdout
    assert sorted(auth_proxy.targets("GET")) == [named(origin, f"/img{k}.jpg") for k in range(n)]  # threads
    assert auth_proxy.refused == 0
    # the same through --proxy (the environment ignored): the proxy shows in the manifest without credentials
    flagged = _ingest_cli(table, tmp_path / "pool2", {**env, "HTTP_PROXY": f"http://127.0.0.1:{dead_port()}"},
                          "--proxy", auth_proxy.url(USER, ESCAPED), "--no-proxy-env")
    assert flagged.returncode == 0, flagged.stderr
    assert auth_proxy.count("GET") == 2 * n
    direct = _ingest_cli(direct_table, tmp_path / "direct", env, "--allow-private-network")
    assert direct.returncode == 0, direct.stderr
    images = _jpeg_members(tmp_path / "pool")
    assert len(images) == n and images == _jpeg_members(tmp_path / "pool2") == _jpeg_members(tmp_path / "direct")
    everything = _all_text([tmp_path / "pool", tmp_path / "pool2"], proxied.stdout, proxied.stderr,
                           flagged.stdout, flagged.stderr)
    assert _no_secret(everything) and USER not in everything


def test_ingest_with_a_dead_proxy_reports_every_row(tmp_path, origin):
    n = 4
    table = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": [named(origin, f"/img{k}.jpg") for k in range(n)]}), table)
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
    port = dead_port()
    p = _ingest_cli(table, tmp_path / "pool", {**env, "HTTPS_PROXY": "http://unused:1",
                                              "HTTP_PROXY": f"http://{USER}:{ESCAPED}@127.0.0.1:{port}"})
    assert p.returncode == 0, p.stderr
    assert re.search(rf"failed_download\s+{n}\s", p.stdout), p.stdout
    rows = pq.read_table(tmp_path / "pool" / "samples").to_pylist()
    assert [r["status"] for r in rows] == ["failed_download"] * n
    assert all(r["error"].startswith(f"proxy http://***@127.0.0.1:{port} unreachable") for r in rows)
    assert _no_secret(_all_text([tmp_path / "pool"], p.stdout, p.stderr))
    assert sum(origin.hits.values()) == 0
