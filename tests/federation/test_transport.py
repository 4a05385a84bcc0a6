"""Federation transport: X-Matrix signing/checking, discovery, TLS, the client.

Spec: server-server-api "Request Authentication", "Resolving server names",
"TLS". The last tests start ``zhome run`` as a real process with a
self-signed federation listener and talk to it over HTTPS.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
import yaml
from signedjson.key import get_verify_key
from twisted.internet import reactor
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from zhome.crypto.keys import key_id, new_signing_key
from zhome.federation.destinations import DestinationPolicy
from zhome.federation.discovery import (
    PrivateAddressRefused,
    ResolvedServer,
    ServerResolver,
    SrvRecord,
    WellKnownResponse,
    parse_cache_control,
)
from zhome.federation.request_auth import (
    authenticate_request,
    parse_authorization_header,
    sign_request,
)
from zhome.federation.tls import FederationTLSPolicy, generate_self_signed_certificate, server_context_factory
from zhome.federation.transport import (
    FederationClient,
    FederationDenied,
    FederationHttpError,
    FederationInvalidResponse,
    FederationUnreachable,
)
from zhome.http.errors import MatrixError
from zhome.http.server import JsonResource, read_json_body

from tests.e2e.harness import free_port

ORIGIN = "origin.example"
DEST = "dest.example"


# ---------------------------------------------------------------------------
# X-Matrix request authentication


class FakeRequest:
    def __init__(self, method: str, uri: str, authorization: list[str]) -> None:
        self.method = method.encode()
        self.uri = uri.encode()
        self.requestHeaders = Headers({b"Authorization": [a.encode() for a in authorization]})


KEY = new_signing_key("k1")


async def _keys(server: str, kid: str, at_ts: int) -> Any:
    if server == ORIGIN and kid == key_id(KEY):
        return get_verify_key(KEY)
    return None


@pytest_twisted.ensureDeferred
async def test_sign_and_verify_round_trip() -> None:
    content = {"pdus": [], "edus": [{"edu_type": "m.typing", "content": {"x": "é"}}]}
    uri = "/_matrix/federation/v1/send/txn1?a=b%20c"
    header = sign_request(ORIGIN, DEST, "PUT", uri, content, KEY)
    assert header.startswith('X-Matrix origin="origin.example",destination="dest.example",key="ed25519:k1",sig="')
    assert parse_authorization_header(header)[:3] == (ORIGIN, DEST, "ed25519:k1")
    raw = json.dumps(content).encode()
    assert await authenticate_request(FakeRequest("PUT", uri, [header]), raw, DEST, _keys) == ORIGIN
    # Parsed JSON works as well as bytes.
    assert await authenticate_request(FakeRequest("PUT", uri, [header]), content, DEST, _keys) == ORIGIN
    # GET without a body.
    get = sign_request(ORIGIN, DEST, "GET", "/_matrix/federation/v1/version", None, KEY)
    assert await authenticate_request(FakeRequest("GET", "/_matrix/federation/v1/version", [get]), b"", DEST,
                                      _keys) == ORIGIN


async def _refused(request: FakeRequest, body: Any) -> MatrixError:
    with pytest.raises(MatrixError) as info:
        await authenticate_request(request, body, DEST, _keys)
    return info.value


@pytest_twisted.ensureDeferred
async def test_wrong_destination_refused() -> None:
    header = sign_request(ORIGIN, "other.example", "GET", "/x", None, KEY)
    err = await _refused(FakeRequest("GET", "/x", [header]), None)
    assert (err.code, err.errcode) == (401, "M_UNAUTHORIZED")


@pytest_twisted.ensureDeferred
async def test_tampering_refused() -> None:
    header = sign_request(ORIGIN, DEST, "PUT", "/x", {"a": 1}, KEY)
    for request, body in [
        (FakeRequest("PUT", "/x", [header]), b'{"a": 2}'),  # content
        (FakeRequest("PUT", "/y", [header]), b'{"a": 1}'),  # uri
        (FakeRequest("POST", "/x", [header]), b'{"a": 1}'),  # method
        (FakeRequest("PUT", "/x", [header.replace(ORIGIN, "evil.example")]), b'{"a": 1}'),  # unknown key
    ]:
        err = await _refused(request, body)
        assert (err.code, err.errcode) == (401, "M_UNAUTHORIZED")
    # A signature made with another key.
    other = sign_request(ORIGIN, DEST, "PUT", "/x", {"a": 1}, new_signing_key("k1"))
    err = await _refused(FakeRequest("PUT", "/x", [other]), b'{"a": 1}')
    assert err.code == 401
    # No header at all.
    err = await _refused(FakeRequest("GET", "/x", []), None)
    assert err.code == 401


@pytest_twisted.ensureDeferred
async def test_missing_destination_accepted_for_old_servers() -> None:
    header = sign_request(ORIGIN, DEST, "GET", "/x", None, KEY)
    old = header.replace(',destination="dest.example"', "")
    assert parse_authorization_header(old)[1] is None
    assert await authenticate_request(FakeRequest("GET", "/x", [old]), None, DEST, _keys) == ORIGIN


def test_parse_is_tolerant() -> None:
    assert parse_authorization_header(
        'X-Matrix   ORIGIN=origin.example:8448 , Key="ed25519:k1",sig="a\\bc", destination = "d.example"'
    ) == ("origin.example:8448", "d.example", "ed25519:k1", "abc")
    assert parse_authorization_header(b"x-matrix origin=o,key=ed25519:k,sig=s") == ("o", None, "ed25519:k", "s")


@pytest.mark.parametrize(
    "header",
    [
        "",
        "Bearer abc",
        "X-Matrix",
        'X-Matrix origin="o",key="ed25519:k"',  # no sig
        'X-Matrix key="ed25519:k",sig="s"',  # no origin
        'X-Matrix origin="o" key="ed25519:k",sig="s"',  # missing comma
        'X-Matrix origin="o,key="ed25519:k",sig="s"',  # unbalanced quote
        'X-Matrix origin="o",origin="p",key="k",sig="s"',  # duplicate
        'X-Matrix origin=,key="k",sig="s"',
        'X-Matrix origin="o",key="k",sig="s",destination=""',
    ],
)
def test_malformed_headers_are_401(header: str) -> None:
    with pytest.raises(MatrixError) as info:
        parse_authorization_header(header)
    assert (info.value.code, info.value.errcode) == (401, "M_UNAUTHORIZED")


@pytest.mark.parametrize("origin", ["localhost:http", "example.org:", "example.org:123456", "exa mple.org",
                                    "[::1", "example.org:8448:1", "ex_ample.org"])
def test_an_origin_that_is_no_server_name_is_400(origin: str) -> None:
    """Appendices "Server Name": a host, then a port of digits if any."""
    header = 'X-Matrix origin="' + origin + '",key="ed25519:k",sig="s",destination="d.example"'
    with pytest.raises(MatrixError) as info:
        parse_authorization_header(header)
    assert (info.value.code, info.value.errcode) == (400, "M_UNAUTHORIZED")
    for good in ("localhost:8448", "1.2.3.4:5", "[1234:5678::abcd]:5678", "d.example"):
        assert parse_authorization_header(header.replace(origin, good))[0] == good


# ---------------------------------------------------------------------------
# Discovery


class FakeDNS:
    def __init__(self, addresses: dict[str, list[str]] | None = None,
                 srv: dict[str, list[SrvRecord]] | None = None,
                 well_known: dict[str, WellKnownResponse | Exception] | None = None) -> None:
        self.addresses = addresses or {}
        self.srv = srv or {}
        self.well_known = well_known or {}
        self.calls: list[tuple[str, str]] = []
        self.now = 1000.0

    async def lookup_addresses(self, host: str) -> list[str]:
        self.calls.append(("A", host))
        if host not in self.addresses:
            raise OSError(f"NXDOMAIN {host}")
        return self.addresses[host]

    async def lookup_srv(self, name: str) -> list[SrvRecord]:
        self.calls.append(("SRV", name))
        return self.srv.get(name, [])

    async def fetch_well_known(self, host: str) -> WellKnownResponse:
        self.calls.append(("WK", host))
        answer = self.well_known.get(host, WellKnownResponse(404, b"{}"))
        if isinstance(answer, Exception):
            raise answer
        return answer

    def resolver(self, allow_private: bool = False) -> ServerResolver:
        return ServerResolver(
            allow_private_addresses=allow_private, well_known_fetcher=self.fetch_well_known,
            srv_lookup=self.lookup_srv, address_lookup=self.lookup_addresses, clock=lambda: self.now,
        )


def _wk(server: str, cache_control: str | None = None) -> WellKnownResponse:
    return WellKnownResponse(200, json.dumps({"m.server": server}).encode(), cache_control)


@pytest_twisted.ensureDeferred
async def test_ip_literals() -> None:
    dns = FakeDNS()
    r = dns.resolver()
    assert await r.resolve("1.2.3.4:8000") == ResolvedServer("1.2.3.4", 8000, "1.2.3.4:8000", "1.2.3.4",
                                                             ("1.2.3.4",))
    assert await r.resolve("1.2.3.4") == ResolvedServer("1.2.3.4", 8448, "1.2.3.4", "1.2.3.4", ("1.2.3.4",))
    v6 = await r.resolve("[2606:4700::1111]:9000")
    assert (v6.host, v6.port, v6.host_header, v6.tls_server_name) == ("2606:4700::1111", 9000, "[2606:4700::1111]:9000",
                                                                      "2606:4700::1111")
    # No DNS, no well-known for IP literals.
    assert dns.calls == []


@pytest_twisted.ensureDeferred
async def test_private_addresses_refused_unless_allowed() -> None:
    dns = FakeDNS(addresses={"internal.example": ["10.0.0.5"], "mixed.example": ["127.0.0.1", "8.8.8.8"]})
    r = dns.resolver()
    for name in ("127.0.0.1:8448", "[::1]", "192.168.1.1", "169.254.0.1", "internal.example:8448",
                 "[::ffff:127.0.0.1]"):
        with pytest.raises(PrivateAddressRefused):
            await r.resolve(name)
    # Only the public address of a mixed answer is kept.
    assert (await r.resolve("mixed.example:443")).addresses == ("8.8.8.8",)
    allowed = dns.resolver(allow_private=True)
    assert (await allowed.resolve("127.0.0.1:8448")).addresses == ("127.0.0.1",)
    assert (await allowed.resolve("internal.example:8448")).addresses == ("10.0.0.5",)


@pytest_twisted.ensureDeferred
async def test_hostname_with_port_skips_well_known_and_srv() -> None:
    dns = FakeDNS(addresses={"matrix.example": ["93.184.216.34"]})
    got = await dns.resolver().resolve("matrix.example:8449")
    assert got == ResolvedServer("matrix.example", 8449, "matrix.example:8449", "matrix.example", ("93.184.216.34",))
    assert dns.calls == [("A", "matrix.example")]


@pytest_twisted.ensureDeferred
async def test_well_known_delegation() -> None:
    dns = FakeDNS(
        addresses={"hs.example": ["93.184.216.34"], "srv-target.example": ["93.184.216.35"],
                   "plain.example": ["93.184.216.36"]},
        srv={"_matrix-fed._tcp.delegated-srv.example": [SrvRecord(10, 0, "srv-target.example.", 8500)]},
        well_known={
            "a.example": _wk("hs.example:9448"),
            "b.example": _wk("5.6.7.8"),
            "c.example": _wk("[2606:4700::2]:8000"),
            "d.example": _wk("delegated-srv.example"),
            "e.example": _wk("hs.example"),
        },
    )
    dns.addresses["delegated-srv.example"] = ["93.184.216.99"]
    r = dns.resolver()
    assert await r.resolve("a.example") == ResolvedServer("hs.example", 9448, "hs.example:9448", "hs.example",
                                                          ("93.184.216.34",))
    assert await r.resolve("b.example") == ResolvedServer("5.6.7.8", 8448, "5.6.7.8", "5.6.7.8", ("5.6.7.8",))
    c = await r.resolve("c.example")
    assert (c.host, c.port, c.host_header, c.tls_server_name) == ("2606:4700::2", 8000, "[2606:4700::2]:8000",
                                                                  "2606:4700::2")
    # Delegated name without port: SRV of the delegated name; Host and TLS
    # stay the delegated name.
    assert await r.resolve("d.example") == ResolvedServer(
        "srv-target.example", 8500, "delegated-srv.example", "delegated-srv.example", ("93.184.216.35",)
    )
    # No SRV: the delegated name on 8448.
    assert await r.resolve("e.example") == ResolvedServer("hs.example", 8448, "hs.example", "hs.example",
                                                          ("93.184.216.34",))


@pytest_twisted.ensureDeferred
async def test_invalid_well_known_falls_back_to_srv_then_8448() -> None:
    dns = FakeDNS(
        addresses={"x.example": ["93.184.216.34"], "target.example": ["93.184.216.40"],
                   "old.example": ["93.184.216.41"], "legacy-target.example": ["93.184.216.42"]},
        srv={
            "_matrix-fed._tcp.x.example": [SrvRecord(20, 0, "unused.example", 1), SrvRecord(10, 5, "target.example", 8600)],
            "_matrix._tcp.old.example": [SrvRecord(0, 0, "legacy-target.example", 8700)],
        },
        well_known={
            "x.example": WellKnownResponse(200, b"not json"),
            "old.example": ConnectionRefusedError("no"),
            "y.example": WellKnownResponse(200, b'{"m.server": "bad name!"}'),
        },
    )
    dns.addresses["y.example"] = ["93.184.216.50"]
    r = dns.resolver()
    # SRV: lowest priority wins; Host header and TLS name stay the server name.
    assert await r.resolve("x.example") == ResolvedServer("target.example", 8600, "x.example", "x.example",
                                                          ("93.184.216.40",))
    # The deprecated _matrix._tcp is used when _matrix-fed._tcp is absent.
    assert await r.resolve("old.example") == ResolvedServer("legacy-target.example", 8700, "old.example",
                                                            "old.example", ("93.184.216.42",))
    assert await r.resolve("y.example") == ResolvedServer("y.example", 8448, "y.example", "y.example",
                                                          ("93.184.216.50",))
    srv_calls = [c for c in dns.calls if c[0] == "SRV"]
    assert ("SRV", "_matrix-fed._tcp.old.example") in srv_calls
    assert srv_calls.index(("SRV", "_matrix-fed._tcp.old.example")) < srv_calls.index(("SRV", "_matrix._tcp.old.example"))


@pytest_twisted.ensureDeferred
async def test_caching() -> None:
    dns = FakeDNS(addresses={"hs.example": ["93.184.216.34"], "nowk.example": ["93.184.216.35"]},
                  well_known={"a.example": _wk("hs.example:9448", "public, max-age=7200")})
    r = dns.resolver()
    first = await r.resolve("a.example")
    assert await r.resolve("a.example") == first
    assert dns.calls.count(("WK", "a.example")) == 1
    # The whole resolution expires after minutes; the well-known answer
    # lives on per its Cache-Control.
    dns.now += 601
    await r.resolve("a.example")
    assert dns.calls.count(("WK", "a.example")) == 1
    assert dns.calls.count(("A", "hs.example")) == 2
    dns.now += 7200
    await r.resolve("a.example")
    assert dns.calls.count(("WK", "a.example")) == 2
    # A failed well-known is cached for an hour.
    await r.resolve("nowk.example")
    dns.now += 601
    await r.resolve("nowk.example")
    assert dns.calls.count(("WK", "nowk.example")) == 1
    dns.now += 3600
    await r.resolve("nowk.example")
    assert dns.calls.count(("WK", "nowk.example")) == 2


def test_cache_control() -> None:
    assert parse_cache_control(None) == 24 * 3600
    assert parse_cache_control("max-age=60") == 60
    assert parse_cache_control("max-age=99999999") == 48 * 3600
    assert parse_cache_control("no-store") == 0


def test_destination_policy() -> None:
    p = DestinationPolicy(["*.example.org", "friend.example"], ["bad.example.org"])
    assert p.is_allowed("a.example.org") and p.is_allowed("FRIEND.example")
    assert not p.is_allowed("bad.example.org") and not p.is_allowed("stranger.example")


# ---------------------------------------------------------------------------
# The client against an in-process HTTPS server


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[str, str]:
    cert, key = generate_self_signed_certificate("127.0.0.1")
    (tmp_path / "c.crt").write_bytes(cert)
    (tmp_path / "c.key").write_bytes(key)
    return str(tmp_path / "c.crt"), str(tmp_path / "c.key")


@pytest.fixture
def https_server(tls_files: tuple[str, str]) -> Iterator[str]:
    """A server named 127.0.0.1:PORT that checks X-Matrix on /echo."""
    resource = JsonResource()
    state: dict[str, Any] = {}

    async def echo(request: Any) -> tuple[int, Any]:
        body = read_json_body(request, allow_empty=True) if request.method != b"GET" else None
        origin = await authenticate_request(request, body, state["name"], _origin_keys)
        return 200, {"origin": origin, "body": body, "uri": request.uri.decode(),
                     "host": request.getHeader("host")}

    async def fail(request: Any) -> tuple[int, Any]:
        raise MatrixError(403, "M_FORBIDDEN", "no")

    async def big(request: Any) -> tuple[int, Any]:
        return 200, {"x": "y" * 5000}

    resource.register("GET", "/echo", echo)
    resource.register("PUT", "/echo", echo)
    resource.register("POST", "/echo", echo)
    resource.register("GET", "/fail", fail)
    resource.register("GET", "/big", big)
    port = reactor.listenSSL(0, Site(resource), server_context_factory(*tls_files), interface="127.0.0.1")
    state["name"] = f"127.0.0.1:{port.getHost().port}"
    yield state["name"]
    pytest_twisted.blockon(port.stopListening())


CLIENT_KEY = new_signing_key("c1")


async def _origin_keys(server: str, kid: str, at_ts: int) -> Any:
    return get_verify_key(CLIENT_KEY) if (server, kid) == ("client.example", key_id(CLIENT_KEY)) else None


def _client(verify: bool = False, trusted: tuple[str, ...] = (), **kwargs: Any) -> FederationClient:
    policy = FederationTLSPolicy(verify, trusted)
    resolver = ServerResolver(allow_private_addresses=True, tls_policy=policy)
    return FederationClient("client.example", CLIENT_KEY, resolver, policy, **kwargs)


@pytest_twisted.ensureDeferred
async def test_client_signed_requests(https_server: str) -> None:
    client = _client()
    try:
        got = await client.get_json(https_server, "/echo", query={"q": ["a b", "ü/?"], "limit": "5"})
        assert got["origin"] == "client.example"
        assert got["uri"] == "/echo?q=a%20b&q=%C3%BC%2F%3F&limit=5"
        assert got["host"] == https_server
        got = await client.put_json(https_server, "/echo", {"pdus": [{"n": 1}], "s": "é"})
        assert got["body"] == {"pdus": [{"n": 1}], "s": "é"}
        got = await client.post_json(https_server, "/echo", {})
        assert got["body"] == {}
        with pytest.raises(FederationHttpError) as info:
            await client.get_json(https_server, "/fail")
        assert (info.value.status, info.value.errcode) == (403, "M_FORBIDDEN")
        with pytest.raises(FederationHttpError) as info:
            await client.get_json(https_server, "/nope")
        assert (info.value.status, info.value.errcode) == (404, "M_UNRECOGNIZED")
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_client_limits_and_failures(https_server: str, tls_files: tuple[str, str]) -> None:
    client = _client(max_response_size=1000, destination_policy=DestinationPolicy(["*"], ["blocked.example"]))
    try:
        with pytest.raises(FederationInvalidResponse):
            await client.get_json(https_server, "/big")
        with pytest.raises(FederationDenied):
            await client.get_json("blocked.example", "/echo")
        with pytest.raises(FederationUnreachable) as info:
            await client.get_json(f"127.0.0.1:{free_port()}", "/echo", timeout=5)
        assert "connect" in str(info.value).lower()
    finally:
        await client.close()
    # Private addresses are refused by default.
    policy = FederationTLSPolicy(False)
    strict = FederationClient("client.example", CLIENT_KEY, ServerResolver(tls_policy=policy), policy)
    with pytest.raises(FederationUnreachable) as info:
        await strict.get_json(https_server, "/echo")
    assert "allow_private_addresses" in str(info.value)
    # Verification on: the self-signed certificate is refused unless trusted.
    verifying = _client(verify=True)
    with pytest.raises(FederationUnreachable) as info:
        await verifying.get_json(https_server, "/echo")
    assert "certificate" in str(info.value)
    await verifying.close()
    trusting = _client(verify=True, trusted=(tls_files[0],))
    assert (await trusting.get_json(https_server, "/echo"))["origin"] == "client.example"
    await trusting.close()


@pytest_twisted.ensureDeferred
async def test_certificate_name_checked(tmp_path: Path) -> None:
    """A trusted certificate that names another host is still refused."""
    cert, key = generate_self_signed_certificate("other.example")
    (tmp_path / "o.crt").write_bytes(cert)
    (tmp_path / "o.key").write_bytes(key)
    resource = JsonResource()

    async def ok(request: Any) -> tuple[int, Any]:
        return 200, {}

    resource.register("GET", "/ok", ok)
    factory = server_context_factory(str(tmp_path / "o.crt"), str(tmp_path / "o.key"))
    port = reactor.listenSSL(0, Site(resource), factory, interface="127.0.0.1")
    client = _client(verify=True, trusted=(str(tmp_path / "o.crt"),))
    try:
        with pytest.raises(FederationUnreachable) as info:
            await client.get_json(f"127.0.0.1:{port.getHost().port}", "/ok", signed=False)
        assert "certificate" in str(info.value)
    finally:
        await client.close()
        await port.stopListening()


def test_server_context_factory_errors(tmp_path: Path, tls_files: tuple[str, str]) -> None:
    with pytest.raises(ValueError, match="tls_certificate_path"):
        server_context_factory(str(tmp_path / "missing.crt"), tls_files[1])
    _, other_key = generate_self_signed_certificate("127.0.0.1")
    (tmp_path / "other.key").write_bytes(other_key)
    with pytest.raises(ValueError, match="does not match"):
        server_context_factory(tls_files[0], str(tmp_path / "other.key"))


# ---------------------------------------------------------------------------
# End to end: `zhome generate-config --self-signed-tls` + `zhome run`


@pytest.fixture
def zhome_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    fed_port, client_port = free_port(), free_port()
    name = f"127.0.0.1:{fed_port}"
    config = tmp_path / "homeserver.yaml"
    subprocess.run(
        [sys.executable, "-m", "zhome", "generate-config", "--server-name", name, "-c", str(config),
         "--port", str(client_port), "--federation-port", str(fed_port), "--self-signed-tls"],
        check=True, capture_output=True,
    )
    log = open(tmp_path / "zhome.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "zhome", "run", "-c", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=str(tmp_path))
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError((tmp_path / "zhome.log").read_text())
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{client_port}/_matrix/client/versions", timeout=1)
                break
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield name, tmp_path
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest_twisted.ensureDeferred
async def test_end_to_end_over_tls(zhome_server: tuple[str, Path]) -> None:
    name, workdir = zhome_server
    cfg = yaml.safe_load((workdir / "homeserver.yaml").read_text())
    assert cfg["federation"]["verify_certificates"] is False
    assert "for local testing only" in (workdir / "zhome.log").read_text()
    expected = {"server": {"name": "zhome", "version": __import__("zhome").__version__}}

    client = _client(verify=False)
    assert await client.get_json(name, "/_matrix/federation/v1/version") == expected
    await client.close()

    client = _client(verify=True)
    with pytest.raises(FederationUnreachable) as info:
        await client.get_json(name, "/_matrix/federation/v1/version")
    assert "certificate" in str(info.value)
    await client.close()

    cert = str(workdir / cfg["tls_certificate_path"])
    client = _client(verify=True, trusted=(cert,))
    assert await client.get_json(name, "/_matrix/federation/v1/version") == expected
    await client.close()


@pytest_twisted.ensureDeferred
async def test_real_well_known_fetch_with_redirect(tmp_path: Path) -> None:
    """The default fetcher: HTTPS on port 443 of the name, redirects followed.

    Needs to bind port 443 on a loopback address; skipped where that is not
    allowed.
    """
    from twisted.web.resource import Resource

    cert, key = generate_self_signed_certificate("wk.test")
    (tmp_path / "wk.crt").write_bytes(cert)
    (tmp_path / "wk.key").write_bytes(key)

    class WellKnown(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:  # noqa: N802
            if request.path == b"/.well-known/matrix/server":
                request.setResponseCode(302)
                request.setHeader(b"location", b"/moved")
                return b""
            request.setHeader(b"cache-control", b"max-age=100")
            return json.dumps({"m.server": "wk.test:9999"}).encode()

    try:
        port = reactor.listenSSL(443, Site(WellKnown()), server_context_factory(str(tmp_path / "wk.crt"),
                                                                               str(tmp_path / "wk.key")),
                                 interface="127.0.0.77")
    except Exception as e:  # CannotListenError: not root, or 443 taken
        pytest.skip(f"cannot bind 127.0.0.77:443: {e}")

    async def addresses(host: str) -> list[str]:
        return ["127.0.0.77"] if host == "wk.test" else []

    async def no_srv(name: str) -> list[SrvRecord]:
        return []

    try:
        policy = FederationTLSPolicy(True, (str(tmp_path / "wk.crt"),))
        resolver = ServerResolver(allow_private_addresses=True, tls_policy=policy, address_lookup=addresses,
                                  srv_lookup=no_srv)
        assert await resolver.resolve("wk.test") == ResolvedServer("wk.test", 9999, "wk.test:9999", "wk.test",
                                                                   ("127.0.0.77",))
    finally:
        await port.stopListening()
