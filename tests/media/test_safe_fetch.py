"""The URL-preview fetcher (zhome/media/safe_fetch.py): URL checks, address
checks on every hop, connections pinned to the checked address, body cap,
deadline. A Twisted web server on 127.0.0.1 plays every host."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from zhome.media.safe_fetch import AddressRefused, BadUrl, BodyTooLarge, FetchError, HostBlocked, \
    PublicEndpointFactory, SafeFetcher, normalise_url
from zhome.util.reactor import reactor


def test_normalise_url() -> None:
    assert normalise_url("https://Example.org/a b?q=ü#frag") == "https://example.org/a%20b?q=%C3%BC"
    assert normalise_url("http://bücher.example:8080") == "http://xn--bcher-kva.example:8080/"
    assert normalise_url("http://[::1]:80/x") == "http://[::1]:80/x"
    assert normalise_url("http://127.0.0.1/%41") == "http://127.0.0.1/%41"
    for bad in ("ftp://example.org/", "file:///etc/passwd", "javascript:alert(1)", "example.org", "http:///x",
                "http://u:p@example.org/", "http://example.org:99999/", "http://exa\nmple.org/",
                "https://" + "a" * 5000, "http://[::1/"):
        with pytest.raises(BadUrl):
            normalise_url(bad)


@pytest_twisted.ensureDeferred
async def test_non_public_addresses_refused() -> None:
    async def lookup(host: str) -> list[str]:
        return {"private.test": ["10.1.2.3", "169.254.1.1", "224.0.0.1", "fc00::1", "fe80::1", "100.64.0.1",
                                 "::ffff:192.168.0.1", "0.0.0.0"],
                "mixed.test": ["127.0.0.1", "93.184.216.34"]}[host]

    endpoints = PublicEndpointFactory(reactor, False, lookup)
    with pytest.raises(AddressRefused):
        await endpoints.checked_addresses("private.test")
    for literal in ("127.0.0.1", "::1", "192.168.1.1", "::ffff:127.0.0.1"):
        with pytest.raises(AddressRefused):
            await endpoints.checked_addresses(literal)
    # Only the public address of a mixed answer is ever connected to.
    assert await endpoints.checked_addresses("mixed.test") == ["93.184.216.34"]
    assert await PublicEndpointFactory(reactor, True, lookup).checked_addresses("private.test") == \
        ["10.1.2.3", "169.254.1.1", "224.0.0.1", "fc00::1", "fe80::1", "100.64.0.1", "::ffff:192.168.0.1", "0.0.0.0"]


class _Pages(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str]] = []
        self.hung: list[Request] = []

    def render_GET(self, request: Request) -> Any:  # noqa: N802
        path = request.path.decode()
        host = (request.getHeader(b"host") or b"").decode()
        self.seen.append((host, path))
        port = host.rsplit(":", 1)[1]
        if path == "/page":
            request.setHeader(b"Content-Type", b"text/html")
            return b"<title>hello</title>"
        if path == "/to-other-host":
            request.redirect(f"http://other.test:{port}/page".encode())
            return b""
        if path == "/to-ftp":
            request.redirect(b"ftp://other.test/x")
            return b""
        if path == "/chunked":
            # No Content-Length: the cap holds while reading.
            request.setHeader(b"Content-Type", b"text/html")
            for _ in range(10):
                request.write(b"x" * 1000)
            request.finish()
            return NOT_DONE_YET
        if path == "/hang":
            self.hung.append(request)
            request.write(b"")
            return NOT_DONE_YET
        request.setResponseCode(404)
        return b"no"


@pytest.fixture
def pages() -> Iterator[tuple[_Pages, int]]:
    resource = _Pages()
    port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
    yield resource, port.getHost().port
    for request in resource.hung:
        if not request.finished and not request._disconnected:
            request.finish()
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


def _limit(_: Any) -> int:
    return 4096


@pytest_twisted.ensureDeferred
async def test_pinned_to_the_checked_address_on_every_hop(pages: tuple[_Pages, int]) -> None:
    resource, port = pages
    looked_up: list[str] = []

    async def lookup(host: str) -> list[str]:
        looked_up.append(host)
        return ["127.0.0.1"]

    fetcher = SafeFetcher(reactor, True, address_lookup=lookup)
    got = await fetcher.fetch(f"http://first.test:{port}/to-other-host", _limit, time.monotonic() + 10)
    assert got.body == b"<title>hello</title>" and got.url == f"http://other.test:{port}/page"
    assert got.content_type == "text/html"
    # Each hop's host resolved and checked; the request still names the host.
    assert looked_up == ["first.test", "other.test"]
    assert resource.seen == [(f"first.test:{port}", "/to-other-host"), (f"other.test:{port}", "/page")]

    # A redirect to a scheme that is not fetched ends the fetch.
    with pytest.raises(BadUrl):
        await fetcher.fetch(f"http://first.test:{port}/to-ftp", _limit, time.monotonic() + 10)

    # A Content-Type the caller does not want: no body read.
    got = await fetcher.fetch(f"http://first.test:{port}/page", lambda _: None, time.monotonic() + 10)
    assert got.body is None

    # Refused at the first hop: nothing reaches the server.
    before = len(resource.seen)
    with pytest.raises(AddressRefused):
        await SafeFetcher(reactor, False, address_lookup=lookup).fetch(
            f"http://first.test:{port}/page", _limit, time.monotonic() + 10)
    assert len(resource.seen) == before

    # A blocked host is refused on any hop, before it is even resolved.
    blocking = SafeFetcher(reactor, True, address_lookup=lookup, blocked_hosts=("OTHER.test", "*.blocked.test"))
    looked_up.clear()
    before = len(resource.seen)
    with pytest.raises(HostBlocked):
        await blocking.fetch(f"http://first.test:{port}/to-other-host", _limit, time.monotonic() + 10)
    with pytest.raises(HostBlocked):
        await blocking.fetch(f"http://deep.blocked.test:{port}/page", _limit, time.monotonic() + 10)
    assert looked_up == ["first.test"] and resource.seen[before:] == [(f"first.test:{port}", "/to-other-host")]

    with pytest.raises(FetchError, match="answered 404"):
        await fetcher.fetch(f"http://first.test:{port}/missing", _limit, time.monotonic() + 10)


@pytest_twisted.ensureDeferred
async def test_body_cap_and_deadline(pages: tuple[_Pages, int]) -> None:
    _, port = pages
    fetcher = SafeFetcher(reactor, True)
    with pytest.raises(BodyTooLarge):
        await fetcher.fetch(f"http://127.0.0.1:{port}/chunked", _limit, time.monotonic() + 10)
    assert len((await fetcher.fetch(f"http://127.0.0.1:{port}/chunked", lambda _: 10_000,
                                    time.monotonic() + 10)).body or b"") == 10_000
    start = time.monotonic()
    with pytest.raises(FetchError, match="timed out"):
        await fetcher.fetch(f"http://127.0.0.1:{port}/hang", _limit, time.monotonic() + 0.5)
    assert time.monotonic() - start < 3
    with pytest.raises(FetchError, match="timed out"):
        await fetcher.fetch(f"http://127.0.0.1:{port}/page", _limit, time.monotonic() - 1)


@pytest_twisted.ensureDeferred
async def test_https_certificate_checked_for_the_url_host(tmp_path: Any) -> None:
    from twisted.internet.ssl import Certificate
    from twisted.web.client import BrowserLikePolicyForHTTPS

    from zhome.federation.tls import generate_self_signed_certificate, server_context_factory

    cert, key = generate_self_signed_certificate("secure.test")
    (tmp_path / "c.pem").write_bytes(cert)
    (tmp_path / "k.pem").write_bytes(key)
    resource = _Pages()
    listening = reactor.listenSSL(0, Site(resource), server_context_factory(str(tmp_path / "c.pem"),
                                                                          str(tmp_path / "k.pem")),
                                  interface="127.0.0.1")
    port = listening.getHost().port

    async def lookup(host: str) -> list[str]:
        return ["127.0.0.1"]

    try:
        # Not signed by a CA the system trusts: no page.
        with pytest.raises(FetchError, match="TLS"):
            await SafeFetcher(reactor, True, address_lookup=lookup).fetch(
                f"https://secure.test:{port}/page", _limit, time.monotonic() + 10)
        trusting = SafeFetcher(reactor, True, address_lookup=lookup,
                               tls_policy=BrowserLikePolicyForHTTPS(trustRoot=Certificate.loadPEM(cert)))
        got = await trusting.fetch(f"https://secure.test:{port}/page", _limit, time.monotonic() + 10)
        assert got.body == b"<title>hello</title>"
        # The certificate must be for the URL's host, whatever address it resolved to.
        with pytest.raises(FetchError, match="TLS"):
            await trusting.fetch(f"https://other.test:{port}/page", _limit, time.monotonic() + 10)
        assert resource.seen == [(f"secure.test:{port}", "/page")]
    finally:
        await listening.stopListening()
