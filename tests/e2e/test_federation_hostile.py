"""A hostile remote server against a real zhome.

A real zhome "A" (federation over TLS on 127.0.0.2) has a public room made by
its local user. "E" is a fake remote server run inside the test: its own
ed25519 key, served at ``/_matrix/key/v2/server`` from a small HTTPS server
on 127.0.0.6 in a background thread. E's user joins A's room properly
(make_join / send_join v2), then E sends transactions that break the rules.

Each case checks that A answers as the spec says, that the room state A
shows its clients is unchanged, and that A keeps serving.

Spec: server-server-api "Transactions" (at most 50 PDUs and 100 EDUs,
per-PDU results, idempotent per origin and transaction ID),
"Authentication" ("Request Authentication": X-Matrix, destination),
"Checks performed on receipt of a PDU" (signatures: reject; content hash:
redact; auth rules: reject), "Validating hashes and signatures on received
events".
"""

from __future__ import annotations

import http.client
import itertools
import json
import ssl
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest

from tests.e2e.conftest import _engine_database
from tests.e2e.harness import CS, ZhomeProcess, free_port, q
from tests.rooms.builders import auth_event_ids, build_pdu
from zhome.crypto.event_hashing import compute_event_id, hash_and_sign_event
from zhome.crypto.keys import SigningKey, key_id, new_signing_key, verify_key_base64
from zhome.crypto.signing import sign_json
from zhome.federation.request_auth import sign_request
from zhome.federation.tls import generate_self_signed_certificate
from zhome.rooms.versions import KNOWN_ROOM_VERSIONS, RoomVersion, get_room_version

FED = "/_matrix/federation"
E_IP = "127.0.0.6"
_TXN = itertools.count()


def _unverified_client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# -- E: the fake remote server ---------------------------------------------------


class FakeServer:
    """Server "E": a key, an HTTPS listener that serves it, and a client to A."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port(E_IP)
        self.server_name = f"{E_IP}:{self.port}"
        self.key: SigningKey = new_signing_key()
        self.requests_seen: list[tuple[str, str]] = []
        # Extra GET answers by path (no query): a test's own scenario.
        self.routes: dict[str, Callable[[BaseHTTPRequestHandler], None]] = {}
        # Answers by method and (unquoted) path prefix, given the request
        # body: (status, body). Checked before everything else.
        self.handlers: list[tuple[str, str, Callable[[str, Any], tuple[int, Any]]]] = []
        cert_pem, key_pem = generate_self_signed_certificate(self.server_name)
        workdir.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = workdir / "e.crt", workdir / "e.key"
        cert_path.write_bytes(cert_pem)
        key_path.write_bytes(key_pem)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert_path), str(key_path))
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name
                pass

            def _reply(self, code: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                fake.requests_seen.append((self.command, self.path))
                path = self.path.split("?", 1)[0]
                plain = urllib.parse.unquote(path)
                for method, prefix, answer in list(fake.handlers):
                    if method == self.command and plain.startswith(prefix):
                        self._reply(*answer(self.path, json.loads(raw) if raw else None))
                        return
                route = fake.routes.get(path) if self.command == "GET" else None
                if route is not None:
                    route(self)
                elif self.command == "GET" and path.startswith("/_matrix/key/v2/server"):
                    self._reply(200, fake.key_response())
                elif self.command == "PUT" and path.startswith(FED + "/v1/send/"):
                    # A's outbound queue: accept and ignore.
                    self._reply(200, {"pdus": {}})
                else:
                    self._reply(404, {"errcode": "M_NOT_FOUND", "error": "E does not serve this"})

            do_GET = _handle  # noqa: N815 - stdlib's names
            do_PUT = _handle  # noqa: N815
            do_POST = _handle  # noqa: N815

        self.httpd = ThreadingHTTPServer((E_IP, self.port), Handler)
        self.httpd.daemon_threads = True
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="fake-server-E", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def key_response(self) -> dict[str, Any]:
        now = int(time.time() * 1000)
        body = {
            "server_name": self.server_name,
            "verify_keys": {key_id(self.key): {"key": verify_key_base64(self.key)}},
            "old_verify_keys": {},
            "valid_until_ts": now + 24 * 3600 * 1000,
        }
        return sign_json(body, self.server_name, self.key)

    # -- talking to A's federation listener ----------------------------------------
    def request(self, a: ZhomeProcess, method: str, path: str, body: Any = None, *,
                auth: Optional[str] = "sign", raw: Optional[bytes] = None,
                destination: Optional[str] = None, signed_content: Any = "same") -> tuple[int, Any]:
        """One request to A. ``auth``: "sign" (a correct X-Matrix header),
        None (no header) or a literal header value. ``signed_content``: what
        the header signs when it differs from the body sent."""
        host, _, port = a.server_name.rpartition(":")
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        headers = {}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if auth == "sign":
            content = body if signed_content == "same" else signed_content
            headers["Authorization"] = sign_request(
                self.server_name, destination or a.server_name, method, path, content, self.key)
        elif auth is not None:
            headers["Authorization"] = auth
        conn = http.client.HTTPSConnection(host, int(port), timeout=120, context=_unverified_client_context())
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            status = resp.status
        finally:
            conn.close()
        try:
            return status, json.loads(payload) if payload else None
        except ValueError:
            return status, payload


class RemoteRoom:
    """E's view of A's room after joining: what it needs to build events."""

    def __init__(self, e: FakeServer, room_id: str, rv: RoomVersion, state: dict[tuple[str, str], str],
                 latest: str, depth: int) -> None:
        self.e = e
        self.room_id = room_id
        self.rv = rv
        self.state = state
        self.latest = latest
        self.depth = depth

    def build(self, etype: str, content: dict[str, Any], sender: str, state_key: Optional[str] = None,
              room_id: Optional[str] = None) -> dict[str, Any]:
        return build_pdu(etype, sender, content, state_key=state_key, room_id=room_id or self.room_id,
                         prev_events=[self.latest],
                         auth_events=auth_event_ids(self.rv, etype, state_key, sender, content, self.state),
                         depth=self.depth + 1, origin_server_ts=int(time.time() * 1000))

    def sign(self, pdu: dict[str, Any], key: Optional[SigningKey] = None) -> tuple[str, dict[str, Any]]:
        return hash_and_sign_event(self.rv, pdu, self.e.server_name, key or self.e.key)

    def accepted(self, event_id: str, pdu: dict[str, Any]) -> None:
        """A took ``pdu``: build on it from now on."""
        self.latest = event_id
        self.depth = pdu["depth"]
        if "state_key" in pdu:
            self.state[(pdu["type"], pdu["state_key"])] = event_id


class World:
    def __init__(self, a: ZhomeProcess, e: FakeServer, token: str, alice: str, mallory: str,
                 room: RemoteRoom, t: Optional[FakeServer] = None) -> None:
        self.a = a
        self.e = e
        self.token = token
        self.alice = alice
        self.mallory = mallory
        self.room = room
        #: A third server "T" (another fake, its own key and port), when
        #: the world was made with one; in no room until a test joins it.
        self.t = t

    # A's client API, as alice
    def client(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return self.a.request(method, CS + path, body, token=self.token)

    def room_state(self) -> list[dict[str, Any]]:
        status, body = self.client("GET", f"/rooms/{q(self.room.room_id)}/state")
        assert status == 200, (status, body)
        # unsigned.age changes with every read: compare the events themselves.
        events = [{k: v for k, v in ev.items() if k != "unsigned"} for ev in body]
        return sorted(events, key=lambda ev: (ev["type"], ev["state_key"]))

    def message_ids(self) -> list[str]:
        status, body = self.client("GET", f"/rooms/{q(self.room.room_id)}/messages?dir=b&limit=200")
        assert status == 200, (status, body)
        return [ev["event_id"] for ev in body["chunk"]]

    def send_txn(self, pdus: list[dict[str, Any]], edus: Optional[list[dict[str, Any]]] = None,
                 txn_id: Optional[str] = None, origin: Optional[str] = None,
                 server: Optional[FakeServer] = None, **kw: Any) -> tuple[int, Any]:
        """A transaction to A from E (or from ``server``)."""
        sender = server or self.e
        txn_id = txn_id or f"hostile{next(_TXN)}-{time.time_ns()}"
        body = {"origin": origin or sender.server_name, "origin_server_ts": int(time.time() * 1000),
                "pdus": pdus, "edus": edus or []}
        return sender.request(self.a, "PUT", f"{FED}/v1/send/{q(txn_id)}", body, **kw)

    def assert_serving(self) -> None:
        status, body = self.a.request("GET", "/_matrix/client/versions")
        assert status == 200 and "versions" in body, (status, body)
        assert self.a.proc is not None and self.a.proc.poll() is None, self.a.log()


def _join(a: ZhomeProcess, e: FakeServer, room_id: str, mallory: str) -> RemoteRoom:
    ver = "&".join("ver=" + q(v) for v in KNOWN_ROOM_VERSIONS)
    status, made = e.request(a, "GET", f"{FED}/v1/make_join/{q(room_id)}/{q(mallory)}?{ver}")
    assert status == 200, (status, made, a.log())
    rv = get_room_version(made["room_version"])
    template = dict(made["event"])
    template["origin_server_ts"] = int(time.time() * 1000)
    template["content"] = {"membership": "join", "displayname": "Mallory"}
    for k in ("signatures", "hashes", "unsigned", "event_id"):
        template.pop(k, None)
    event_id, signed = hash_and_sign_event(rv, template, e.server_name, e.key)
    status, joined = e.request(a, "PUT", f"{FED}/v2/send_join/{q(room_id)}/{q(event_id)}", signed)
    assert status == 200, (status, joined, a.log())
    assert isinstance(joined, dict) and isinstance(joined.get("state"), list), joined
    state: dict[tuple[str, str], str] = {}
    for pdu in joined["state"]:
        eid = _event_id_of(rv, pdu)
        state[(pdu["type"], pdu["state_key"])] = eid
    room = RemoteRoom(e, room_id, rv, state, event_id, template["depth"])
    room.accepted(event_id, template)
    return room


def _event_id_of(rv: RoomVersion, pdu: dict[str, Any]) -> str:
    return compute_event_id(rv, {k: v for k, v in pdu.items() if k != "unsigned"})


def hostile_world(engine: str, workdir: Path, third_server: bool = False) -> Iterator[World]:
    """A with alice's public room, and E with @mallory joined to it, on a
    fresh database of ``engine`` (dropped once A has stopped); for the
    module-scoped ``world`` fixtures of this file and of others.
    ``third_server``: a second fake server "T" as well (``World.t``)."""
    with _engine_database(engine) as db_url:
        a = ZhomeProcess(workdir / "a", database_url=db_url, federation_ip="127.0.0.2")
        e = FakeServer(workdir / "e")
        t = FakeServer(workdir / "t") if third_server else None
        try:
            a.start()
            reg = a.register("alice")
            token, alice = reg["access_token"], reg["user_id"]
            status, created = a.request("POST", CS + "/createRoom", {"preset": "public_chat", "name": "Open"},
                                        token=token)
            assert status == 200, (status, created)
            mallory = f"@mallory:{e.server_name}"
            room = _join(a, e, created["room_id"], mallory)
            w = World(a, e, token, alice, mallory, room, t)
            members = {ev["state_key"]: ev["content"].get("membership") for ev in w.room_state()
                       if ev["type"] == "m.room.member"}
            assert members == {alice: "join", mallory: "join"}, members
            yield w
        finally:
            a.stop()
            e.stop()
            if t is not None:
                t.stop()


@pytest.fixture(scope="module", params=["sqlite3", "postgres"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """Module-scoped, one per database engine: starting a server and joining
    for every case would cost more than the cases themselves."""
    yield from hostile_world(request.param, tmp_path_factory.mktemp(f"hostile-{request.param}"))


# -- the cases ------------------------------------------------------------------------


def test_a_valid_event_is_accepted(world: World) -> None:
    """The control case: E's properly made event gets through."""
    r = world.room
    pdu = r.build("m.room.message", {"msgtype": "m.text", "body": "hello from E"}, world.mallory)
    eid, signed = r.sign(pdu)
    status, body = world.send_txn([signed])
    assert status == 200, (status, body)
    assert body["pdus"] == {eid: {}}, body
    r.accepted(eid, pdu)
    assert eid in world.message_ids()
    world.assert_serving()


def test_bad_signature_is_rejected(world: World) -> None:
    r = world.room
    before = world.room_state()
    pdu = r.build("m.room.message", {"msgtype": "m.text", "body": "signed by someone else"}, world.mallory)
    # Same key ID as E's real key, different key: the signature cannot hold.
    impostor = new_signing_key(world.e.key.version)
    eid, signed = r.sign(pdu, key=impostor)
    status, body = world.send_txn([signed])
    assert status == 200, (status, body)
    assert set(body["pdus"]) == {eid}, body
    assert "error" in body["pdus"][eid], body
    assert eid not in world.message_ids()
    assert world.room_state() == before
    world.assert_serving()


def test_bad_content_hash_is_redacted(world: World) -> None:
    r = world.room
    before = world.room_state()
    pdu = r.build("m.room.message", {"msgtype": "m.text", "body": "original"}, world.mallory)
    eid, signed = r.sign(pdu)
    # Content is stripped by redaction: the signature (over the redacted
    # form) and the event ID still hold, the content hash does not.
    signed["content"] = {"msgtype": "m.text", "body": "tampered after signing"}
    status, body = world.send_txn([signed])
    assert status == 200, (status, body)
    assert body["pdus"] == {eid: {}}, body
    r.accepted(eid, signed)
    status, ev = world.client("GET", f"/rooms/{q(r.room_id)}/event/{q(eid)}")
    assert status == 200, (status, ev)
    assert ev["content"] == {}, ev
    assert world.room_state() == before
    world.assert_serving()


def test_forged_sender_from_a_is_rejected(world: World) -> None:
    r = world.room
    before = world.room_state()
    pdu = r.build("m.room.message", {"msgtype": "m.text", "body": "I am alice, honest"}, world.alice)
    eid, signed = r.sign(pdu)  # signed by E only
    status, body = world.send_txn([signed])
    assert status == 200, (status, body)
    assert set(body["pdus"]) == {eid} and "error" in body["pdus"][eid], body
    assert eid not in world.message_ids()
    assert world.room_state() == before
    world.assert_serving()


def test_event_failing_auth_is_rejected(world: World) -> None:
    r = world.room
    before = world.room_state()
    pl_before = [ev for ev in before if ev["type"] == "m.room.power_levels"]
    assert pl_before and pl_before[0]["content"].get("users", {}).get(world.mallory, 0) == 0
    content = dict(pl_before[0]["content"])
    content["users"] = {**content.get("users", {}), world.mallory: 100}
    pdu = r.build("m.room.power_levels", content, world.mallory, state_key="")
    eid, signed = r.sign(pdu)
    status, body = world.send_txn([signed])
    # Processed and stored as rejected: no error for the transaction
    # (server-server-api "Transactions"), but nothing changes.
    assert status == 200, (status, body)
    assert body["pdus"] == {eid: {}}, body
    assert world.room_state() == before
    assert eid not in world.message_ids()
    world.assert_serving()


def test_too_many_pdus_or_edus(world: World) -> None:
    r = world.room
    before = world.room_state()
    pdus, ids = [], []
    for i in range(51):
        pdu = r.build("m.room.message", {"msgtype": "m.text", "body": f"flood {i}"}, world.mallory)
        eid, signed = r.sign(pdu)
        pdus.append(signed)
        ids.append(eid)
    status, body = world.send_txn(pdus)
    assert status == 400, (status, body)
    assert body["errcode"] == "M_BAD_JSON", body
    world.assert_serving()
    edus = [{"edu_type": "m.typing", "content": {"room_id": r.room_id, "user_id": world.mallory,
                                                  "typing": True}} for _ in range(101)]
    status, body = world.send_txn([], edus)
    assert status == 400, (status, body)
    assert body["errcode"] == "M_BAD_JSON", body
    assert not set(ids) & set(world.message_ids())
    assert world.room_state() == before
    world.assert_serving()


def test_body_over_10_mib(world: World) -> None:
    before = world.room_state()
    pad = "a" * (10 * 1024 * 1024 + 16)
    edus = [{"edu_type": "org.example.padding", "content": {"pad": pad}}]
    status, body = world.send_txn([], edus)
    assert status == 413, (status, body)
    assert body["errcode"] == "M_TOO_LARGE", body
    assert world.room_state() == before
    world.assert_serving()


def test_request_authentication(world: World) -> None:
    before = world.room_state()
    r = world.room
    pdu = r.build("m.room.message", {"msgtype": "m.text", "body": "unauthenticated"}, world.mallory)
    eid, signed = r.sign(pdu)
    # Signed for another destination.
    status, body = world.send_txn([signed], destination="other.example:8448")
    assert status == 401 and body["errcode"] == "M_UNAUTHORIZED", (status, body)
    # No Authorization header at all.
    status, body = world.send_txn([signed], auth=None)
    assert status == 401 and body["errcode"] == "M_UNAUTHORIZED", (status, body)
    # Garbled headers.
    for garbled in ("X-Matrix", "X-Matrix origin", 'X-Matrix origin="x",,key=', "Bearer abc",
                    f'X-Matrix origin="{world.e.server_name}",key="ed25519:nope",sig="AAAA"'):
        status, body = world.send_txn([signed], auth=garbled)
        assert status == 401 and body["errcode"] == "M_UNAUTHORIZED", (garbled, status, body)
    # Claiming to be A itself, or a server whose keys cannot be fetched.
    txn_path = f"{FED}/v1/send/claim{time.time_ns()}"
    txn = {"origin": world.a.server_name, "origin_server_ts": 1, "pdus": [signed], "edus": []}
    for claimed in (world.a.server_name, "127.0.0.9:1"):
        header = sign_request(claimed, world.a.server_name, "PUT", txn_path, dict(txn, origin=claimed),
                              world.e.key)
        status, body = world.e.request(world.a, "PUT", txn_path, dict(txn, origin=claimed), auth=header)
        assert status == 401 and body["errcode"] == "M_UNAUTHORIZED", (claimed, status, body)
    # An origin that is no server name (a port of letters): a malformed request, not bad credentials.
    for claimed in ("localhost:http", "e.example:"):
        header = sign_request(claimed, world.a.server_name, "PUT", txn_path, dict(txn, origin=claimed),
                              world.e.key)
        status, body = world.e.request(world.a, "PUT", txn_path, dict(txn, origin=claimed), auth=header)
        assert status == 400 and body["errcode"] == "M_UNAUTHORIZED", (claimed, status, body)
    # A valid header, but over another body.
    status, body = world.send_txn([signed], signed_content={"origin": world.e.server_name, "pdus": [],
                                                            "edus": []})
    assert status == 401 and body["errcode"] == "M_UNAUTHORIZED", (status, body)
    assert eid not in world.message_ids()
    assert world.room_state() == before
    world.assert_serving()


def test_transaction_of_the_wrong_shape(world: World) -> None:
    before = world.room_state()
    path = f"{FED}/v1/send/shape{time.time_ns()}"
    shapes: list[Any] = [[], "txn", 5, {"origin": world.e.server_name, "pdus": {}, "edus": []},
                         {"origin": world.e.server_name, "pdus": [], "edus": "x"}]
    for body_sent in shapes:
        status, body = world.e.request(world.a, "PUT", path, body_sent)
        assert status == 400 and body["errcode"] == "M_BAD_JSON", (body_sent, status, body)
    assert world.room_state() == before
    world.assert_serving()


def test_replayed_transaction(world: World) -> None:
    r = world.room
    before = world.room_state()
    pdu = r.build("m.room.message", {"msgtype": "m.text", "body": "say it twice"}, world.mallory)
    eid, signed = r.sign(pdu)
    txn_id = f"replay-{time.time_ns()}"
    status1, body1 = world.send_txn([signed], txn_id=txn_id)
    assert status1 == 200 and body1["pdus"] == {eid: {}}, (status1, body1)
    r.accepted(eid, pdu)
    status2, body2 = world.send_txn([signed], txn_id=txn_id)
    assert (status2, body2) == (status1, body1)
    assert world.message_ids().count(eid) == 1
    assert world.room_state() == before
    world.assert_serving()


def test_body_origin_differs_from_authenticated_origin(world: World) -> None:
    r = world.room
    before = world.room_state()
    pdu = r.build("m.room.message", {"msgtype": "m.text", "body": "whose transaction?"}, world.mallory)
    eid, signed = r.sign(pdu)
    status, body = world.send_txn([signed], origin="127.0.0.9:1234")
    assert status == 403 and body["errcode"] == "M_FORBIDDEN", (status, body)
    assert eid not in world.message_ids()
    assert world.room_state() == before
    world.assert_serving()


def test_event_for_unknown_room(world: World) -> None:
    r = world.room
    before = world.room_state()
    pdu = r.build("m.room.message", {"msgtype": "m.text", "body": "elsewhere"}, world.mallory,
                  room_id="!nosuchroom:" + world.e.server_name)
    _, signed = r.sign(pdu)
    status, body = world.send_txn([signed])
    assert status == 200, (status, body)
    assert len(body["pdus"]) == 1, body
    (result,) = body["pdus"].values()
    assert "error" in result, body
    assert world.room_state() == before
    world.assert_serving()


def test_non_json_body(world: World) -> None:
    before = world.room_state()
    status, body = world.e.request(world.a, "PUT", f"{FED}/v1/send/notjson{time.time_ns()}",
                                   raw=b"this is {not json", auth=None)
    assert status == 400 and body["errcode"] == "M_NOT_JSON", (status, body)
    status, body = world.e.request(world.a, "PUT", f"{FED}/v1/send/notjson{time.time_ns()}",
                                   raw=b"\xff\xfe\x00garbage", auth=None)
    assert status == 400 and body["errcode"] == "M_NOT_JSON", (status, body)
    assert world.room_state() == before
    world.assert_serving()


def test_malformed_pdus_and_edus_get_per_pdu_errors(world: World) -> None:
    r = world.room
    before = world.room_state()
    good = r.build("m.room.message", {"msgtype": "m.text", "body": "between the junk"}, world.mallory)
    good_id, good_signed = r.sign(good)
    no_sender = r.build("m.room.message", {"msgtype": "m.text", "body": "anon"}, world.mallory)
    no_sender_id, no_sender = r.sign(no_sender)
    del no_sender["sender"]
    floaty = r.build("m.room.message", {"msgtype": "m.text", "body": "f", "n": 1.5}, world.mallory)
    floaty_signed = dict(floaty, hashes={"sha256": "x"}, signatures={})
    huge = r.build("m.room.message", {"msgtype": "m.text", "body": "x" * 70000}, world.mallory)
    huge_id, huge_signed = r.sign(huge)
    long_type = r.build("x" * 300, {"body": "long type"}, world.mallory)
    long_type_id, long_type_signed = r.sign(long_type)
    junk: list[Any] = [1, "pdu", None, [], {"room_id": r.room_id}, no_sender, floaty_signed, huge_signed,
                       long_type_signed]
    edus: list[Any] = [1, None, {"edu_type": 5}, {"edu_type": "m.typing", "content": "x"},
                       {"edu_type": "m.receipt", "content": {r.room_id: {"m.read": {world.alice: {}}}}},
                       {"edu_type": "m.typing", "content": {"room_id": r.room_id, "user_id": world.alice,
                                                           "typing": True}}]
    status, body = world.send_txn(junk + [good_signed], edus)
    assert status == 200, (status, body)
    assert body["pdus"][good_id] == {}, body
    for eid in (huge_id, long_type_id):
        assert "error" in body["pdus"][eid], (eid, body)
    assert all("error" in v for k, v in body["pdus"].items() if k != good_id), body
    r.accepted(good_id, good)
    ids = world.message_ids()
    assert good_id in ids
    assert not {no_sender_id, huge_id, long_type_id} & set(ids)
    assert world.room_state() == before
    world.assert_serving()


def test_rejected_events_are_not_served_to_clients(world: World) -> None:
    r = world.room
    pl = r.build("m.room.power_levels", {"users": {world.mallory: 100}}, world.mallory, state_key="")
    eid, signed = r.sign(pl)
    status, body = world.send_txn([signed])
    assert status == 200 and body["pdus"] == {eid: {}}, (status, body)
    status, ev = world.client("GET", f"/rooms/{q(r.room_id)}/event/{q(eid)}")
    assert status == 404 and ev["errcode"] == "M_NOT_FOUND", (status, ev)
    # Building on the rejected event (citing it as an auth event) gets
    # nowhere either: a topic change that would pass with it is refused.
    before = world.room_state()
    topic = r.build("m.room.topic", {"topic": "mallory rules"}, world.mallory, state_key="")
    topic["auth_events"] = [eid if a == r.state[("m.room.power_levels", "")] else a
                            for a in topic["auth_events"]]
    assert eid in topic["auth_events"]
    tid, tsigned = r.sign(topic)
    status, body = world.send_txn([tsigned])
    assert status == 200 and body["pdus"] == {tid: {}}, (status, body)
    assert world.room_state() == before
    assert tid not in world.message_ids()
    world.assert_serving()


def test_event_with_unknown_prev_events(world: World) -> None:
    """A asks E for what is missing; E has nothing to give: rejected, no 500."""
    r = world.room
    before = world.room_state()
    pdu = r.build("m.room.message", {"msgtype": "m.text", "body": "out of nowhere"}, world.mallory)
    pdu["prev_events"] = ["$doesnotexistanywhere0000000000000000000000"]
    eid, signed = r.sign(pdu)
    seen = len(world.e.requests_seen)
    status, body = world.send_txn([signed])
    assert status == 200, (status, body)
    assert set(body["pdus"]) == {eid} and "error" in body["pdus"][eid], body
    asked = [p.split("?")[0] for _, p in world.e.requests_seen[seen:]]
    assert any(p.startswith(FED + "/v1/get_missing_events/") for p in asked), asked
    assert eid not in world.message_ids()
    assert world.room_state() == before
    world.assert_serving()


def test_same_event_twice_in_one_transaction(world: World) -> None:
    r = world.room
    pdu = r.build("m.room.message", {"msgtype": "m.text", "body": "echo"}, world.mallory)
    eid, signed = r.sign(pdu)
    status, body = world.send_txn([signed, signed])
    assert status == 200 and body["pdus"] == {eid: {}}, (status, body)
    r.accepted(eid, pdu)
    assert world.message_ids().count(eid) == 1
    world.assert_serving()


def _state_ids(world: World, event_id: str, endpoint: str = "state_ids") -> tuple[int, Any]:
    return world.e.request(world.a, "GET", f"{FED}/v1/{endpoint}/{q(world.room.room_id)}?event_id={q(event_id)}")


def test_state_needs_event_id(world: World) -> None:
    for endpoint in ("state", "state_ids"):
        for room in (world.room.room_id, "notaroom"):
            status, body = world.e.request(world.a, "GET", f"{FED}/v1/{endpoint}/{q(room)}")
            assert status == 400 and body["errcode"] == "M_MISSING_PARAM", (endpoint, room, status, body)
    world.assert_serving()


def test_missing_auth_events_then_rejected(world: World) -> None:
    """An event citing an auth event A lacks and E cannot supply: the
    transaction takes it (no error), A stores it as rejected, serves
    neither it nor the state at it, and the room is unchanged."""
    r = world.room
    before = world.room_state()
    eve = f"@eve:{world.e.server_name}"
    join = r.build("m.room.member", {"membership": "join"}, eve, state_key=eve)
    join_id, _ = r.sign(join)  # never sent, never served
    msg = r.build("m.room.message", {"msgtype": "m.text", "body": "who let me in?"}, eve)
    msg["auth_events"] = msg["auth_events"] + [join_id]
    eid, signed = r.sign(msg)
    seen = len(world.e.requests_seen)
    status, body = world.send_txn([signed])
    assert status == 200 and body["pdus"] == {eid: {}}, (status, body)
    asked = [p.split("?")[0] for _, p in world.e.requests_seen[seen:]]
    assert any(p.startswith(FED + "/v1/event_auth/") or p.startswith(FED + "/v1/event/") for p in asked), asked
    assert eid not in world.message_ids()
    assert world.room_state() == before
    for endpoint in ("state", "state_ids"):
        status, got = _state_ids(world, eid, endpoint)
        assert status == 404 and got["errcode"] == "M_NOT_FOUND", (endpoint, status, got)
    status, got = world.e.request(world.a, "GET", f"{FED}/v1/event/{q(eid)}")
    assert status == 404, (status, got)
    # The state at an accepted event is served.
    status, got = _state_ids(world, r.latest)
    assert status == 200 and got["pdu_ids"], (status, got)
    world.assert_serving()


def test_auth_event_fetched_but_sender_not_in_the_room(world: World) -> None:
    """E serves the missing auth event: A stores it as an outlier, checks
    the event against the state before it, and rejects it there."""
    r = world.room
    before = world.room_state()
    eve = f"@eve2:{world.e.server_name}"
    join = r.build("m.room.member", {"membership": "join"}, eve, state_key=eve)
    join_id, join_signed = r.sign(join)
    msg = r.build("m.room.message", {"msgtype": "m.text", "body": "outlier says I'm in"}, eve)
    msg["auth_events"] = msg["auth_events"] + [join_id]
    eid, signed = r.sign(msg)
    world.e.handlers.append(("GET", f"{FED}/v1/event/{join_id}", lambda path, body: (
        200, {"origin": world.e.server_name, "origin_server_ts": 0, "pdus": [join_signed]})))
    try:
        status, body = world.send_txn([signed])
    finally:
        world.e.handlers.clear()
    assert status == 200 and body["pdus"] == {eid: {}}, (status, body)
    assert eid not in world.message_ids() and join_id not in world.message_ids()
    assert world.room_state() == before
    for event_id in (eid, join_id):  # rejected; an outlier
        status, got = _state_ids(world, event_id)
        assert status == 404 and got["errcode"] == "M_NOT_FOUND", (event_id, status, got)
    world.assert_serving()


def test_gap_filled_with_get_missing_events_and_state_ids(world: World) -> None:
    """S's prev event R is missing, and R's prev event Q too: A asks for the
    missing events (gets R), then the state at Q (/state_ids, then Q
    itself), and accepts R and S; Q stays an outlier."""
    r = world.room
    rv = r.rv
    state_at_q = dict(r.state)
    q_pdu = r.build("m.room.member", {"membership": "join", "displayname": "Mallory Q"}, world.mallory,
                    state_key=world.mallory)
    q_id, q_signed = r.sign(q_pdu)
    after_q = dict(state_at_q)
    after_q[("m.room.member", world.mallory)] = q_id
    r_pdu = build_pdu("m.room.message", world.mallory, {"msgtype": "m.text", "body": "R"}, room_id=r.room_id,
                      prev_events=[q_id], depth=q_pdu["depth"] + 1, origin_server_ts=int(time.time() * 1000),
                      auth_events=auth_event_ids(rv, "m.room.message", None, world.mallory, {}, after_q))
    r_id, r_signed = r.sign(r_pdu)
    s_pdu = build_pdu("m.room.message", world.mallory, {"msgtype": "m.text", "body": "S"}, room_id=r.room_id,
                      prev_events=[r_id], depth=r_pdu["depth"] + 1, origin_server_ts=int(time.time() * 1000),
                      auth_events=auth_event_ids(rv, "m.room.message", None, world.mallory, {}, after_q))
    s_id, s_signed = r.sign(s_pdu)
    asked: list[Any] = []

    def missing(path: str, body: Any) -> tuple[int, Any]:
        asked.append(("get_missing_events", body))
        return 200, {"events": [r_signed]}

    def state_ids(path: str, body: Any) -> tuple[int, Any]:
        asked.append(("state_ids", path))
        return 200, {"pdu_ids": list(state_at_q.values()), "auth_chain_ids": []}

    def event(path: str, body: Any) -> tuple[int, Any]:
        asked.append(("event", path))
        return 200, {"origin": world.e.server_name, "origin_server_ts": 0, "pdus": [q_signed]}

    world.e.handlers.extend([("POST", f"{FED}/v1/get_missing_events/", missing),
                             ("GET", f"{FED}/v1/state_ids/", state_ids),
                             ("GET", f"{FED}/v1/event/{q_id}", event)])
    try:
        status, body = world.send_txn([s_signed])
    finally:
        world.e.handlers.clear()
    assert status == 200 and body["pdus"] == {s_id: {}}, (status, body, asked)
    kinds = [k for k, _ in asked]
    assert kinds[:2] == ["get_missing_events", "state_ids"], asked
    assert asked[0][1]["latest_events"] == [s_id]
    assert q_id in urllib.parse.unquote(asked[1][1])
    ids = world.message_ids()
    assert r_id in ids and s_id in ids and q_id not in ids
    for endpoint in ("state", "state_ids"):
        status, got = _state_ids(world, q_id, endpoint)
        assert status == 404 and got["errcode"] == "M_NOT_FOUND", (endpoint, status, got)
    status, got = _state_ids(world, s_id)
    assert status == 200 and q_id in got["pdu_ids"], (status, got)
    r.accepted(s_id, s_pdu)
    r.state[("m.room.member", world.mallory)] = q_id
    world.assert_serving()


def test_soft_failed_event_is_stored_but_not_served(world: World) -> None:
    """Allowed by the state before it, refused by current state: soft-failed
    (server-server-api "Soft failure"), so stored but neither shown nor
    built on."""
    r = world.room
    fork_point, fork_depth, fork_state = r.latest, r.depth, dict(r.state)
    status, pl = world.client("GET", f"/rooms/{q(r.room_id)}/state/m.room.power_levels/")
    assert status == 200, (status, pl)
    pl["events"] = dict(pl.get("events") or {}, **{"m.room.message": 50})
    status, sent = world.client("PUT", f"/rooms/{q(r.room_id)}/state/m.room.power_levels/", pl)
    assert status == 200, (status, sent)
    before = world.room_state()
    msg = r.build("m.room.message", {"msgtype": "m.text", "body": "sent before I knew"}, world.mallory)
    msg["prev_events"], msg["depth"] = [fork_point], fork_depth + 1
    eid, signed = r.sign(msg)
    status, body = world.send_txn([signed])
    assert status == 200 and body["pdus"] == {eid: {}}, (status, body)
    assert eid not in world.message_ids()
    assert world.room_state() == before
    # It is stored: the state at it (the fork's) is known.
    status, got = _state_ids(world, eid)
    assert status == 200 and fork_state[("m.room.power_levels", "")] in got["pdu_ids"], (status, got)
    # Put the old levels back so later cases can talk.
    pl["events"]["m.room.message"] = 0
    status, sent = world.client("PUT", f"/rooms/{q(r.room_id)}/state/m.room.power_levels/", pl)
    assert status == 200, (status, sent)
    r.latest = sent["event_id"]
    r.depth += 3
    r.state[("m.room.power_levels", "")] = sent["event_id"]
    world.assert_serving()


def test_redaction_of_an_event_in_another_room_is_ignored(world: World) -> None:
    r = world.room
    status, created = world.client("POST", "/createRoom", {"preset": "public_chat", "name": "Second"})
    assert status == 200, (status, created)
    other = _join(world.a, world.e, created["room_id"], world.mallory)
    status, sent = world.client("PUT", f"/rooms/{q(r.room_id)}/send/m.room.message/redme{time.time_ns()}",
                                {"msgtype": "m.text", "body": "keep me"})
    assert status == 200, (status, sent)
    target = sent["event_id"]
    red = other.build("m.room.redaction", {"redacts": target} if other.rv.redacts_in_content else {}, world.mallory)
    red["redacts"] = target
    rid, rsigned = other.sign(red)
    status, body = world.e.request(world.a, "PUT", f"{FED}/v1/send/xroom{time.time_ns()}", {
        "origin": world.e.server_name, "origin_server_ts": int(time.time() * 1000), "pdus": [rsigned], "edus": []})
    assert status == 200 and body["pdus"] == {rid: {}}, (status, body)
    status, ev = world.client("GET", f"/rooms/{q(r.room_id)}/event/{q(target)}")
    assert status == 200 and ev["content"]["body"] == "keep me", (status, ev)
    status, msgs = world.client("GET", f"/rooms/{q(other.room_id)}/messages?dir=b&limit=50")
    assert status == 200 and rid not in [e["event_id"] for e in msgs["chunk"]], msgs
    r.latest, r.depth = target, r.depth + 1
    world.assert_serving()


def test_redaction_without_power_takes_no_effect(world: World) -> None:
    """rooms/v3+ "Handling redactions": E may not redact alice's event."""
    r = world.room
    status, sent = world.client("PUT", f"/rooms/{q(r.room_id)}/send/m.room.message/redme2{time.time_ns()}",
                                {"msgtype": "m.text", "body": "still here"})
    assert status == 200, (status, sent)
    target = sent["event_id"]
    r.latest, r.depth = target, r.depth + 1
    red = r.build("m.room.redaction", {}, world.mallory)
    if r.rv.redacts_in_content:
        red["content"] = {"redacts": target}
    red["redacts"] = target
    rid, rsigned = r.sign(red)
    status, body = world.send_txn([rsigned])
    assert status == 200 and body["pdus"] == {rid: {}}, (status, body)
    r.accepted(rid, red)
    status, ev = world.client("GET", f"/rooms/{q(r.room_id)}/event/{q(target)}")
    assert status == 200 and ev["content"]["body"] == "still here", (status, ev)
    assert "redacted_because" not in ev.get("unsigned", {}), ev
    world.assert_serving()


def test_float_in_the_invite_response_is_bad_json(world: World) -> None:
    """The invitee's server answers with a float in the event: the inviting
    client gets 400 M_BAD_JSON, not a 500, and no invite is stored."""
    victim = f"@victim:{world.e.server_name}"

    def invite(path: str, body: Any) -> tuple[int, Any]:
        event = dict(body["event"], bad_val=1.1)
        return 200, {"event": event}

    world.e.handlers.append(("PUT", f"{FED}/v2/invite/", invite))
    try:
        status, body = world.client("POST", f"/rooms/{q(world.room.room_id)}/invite", {"user_id": victim})
    finally:
        world.e.handlers.clear()
    assert status == 400 and body["errcode"] == "M_BAD_JSON", (status, body)
    members = {ev["state_key"] for ev in world.room_state() if ev["type"] == "m.room.member"}
    assert victim not in members
    world.assert_serving()


def test_floats_and_big_integers_from_clients_are_bad_json(world: World) -> None:
    """Every client path that makes an event refuses what canonical JSON
    cannot hold (a float, an integer beyond 2**53 in v6+): 400 M_BAD_JSON
    (M_NOT_JSON for NaN), never a 500, and nothing is stored."""
    r = world.room
    before = world.room_state()
    nan = float("nan")
    big = 2 ** 60
    rid = q(r.room_id)
    cases: list[tuple[str, str, Any]] = [
        ("POST", "/createRoom", {"creation_content": {"x": 1.5}}),
        ("POST", "/createRoom", {"initial_state": [{"type": "m.room.topic", "state_key": "",
                                                    "content": {"topic": "t", "n": nan}}]}),
        ("POST", "/createRoom", {"power_level_content_override": {"ban": 1.5}}),
        ("POST", "/createRoom", {"creation_content": {"x": big}}),
        ("PUT", f"/rooms/{rid}/state/m.room.member/{q(world.alice)}",
         {"membership": "join", "displayname": "Alice", "weight": 1.5}),
        ("PUT", f"/rooms/{rid}/state/m.room.topic/", {"topic": "x", "n": big}),
        ("PUT", f"/rooms/{rid}/send/m.room.message/f{time.time_ns()}", {"body": "x", "n": nan}),
        ("PUT", f"/rooms/{rid}/send/m.room.message/i{time.time_ns()}", {"body": "x", "n": big}),
        ("POST", f"/rooms/{rid}/invite", {"user_id": f"@someone:{world.e.server_name}", "reason": 1.5}),
        ("POST", f"/rooms/{rid}/join", {"reason": nan}),
    ]
    for method, path, body in cases:
        status, got = world.client(method, path, body)
        # NaN is not JSON at all (RFC 8259 has no such literal).
        expected = "M_NOT_JSON" if "NaN" in json.dumps(body) else "M_BAD_JSON"
        assert status == 400 and got["errcode"] == expected, (method, path, status, got)
    assert world.room_state() == before
    world.assert_serving()


def test_invite_to_an_unknown_room_then_rejected_when_no_server_answers(world: World) -> None:
    """A v2 invite into a room A knows nothing of is countersigned and shown
    to the invitee; rejecting it when E will not take the leave (no
    make_leave) still works: a local leave, in /sync's leave section."""
    reg = world.a.register(f"bob{time.time_ns() % 100000}")
    bob, bob_token = reg["user_id"], reg["access_token"]
    rv = world.room.rv
    room_id = f"!elsewhere{time.time_ns()}:{world.e.server_name}"
    invite = build_pdu("m.room.member", world.mallory, {"membership": "invite"}, state_key=bob, room_id=room_id,
                       prev_events=["$" + "p" * 43], auth_events=["$" + "a" * 43], depth=5,
                       origin_server_ts=int(time.time() * 1000))
    eid, signed = hash_and_sign_event(rv, invite, world.e.server_name, world.e.key)
    status, body = world.e.request(world.a, "PUT", f"{FED}/v2/invite/{q(room_id)}/{q(eid)}", {
        "event": signed, "room_version": rv.identifier,
        "invite_room_state": [{"type": "m.room.name", "state_key": "", "sender": world.mallory,
                               "content": {"name": "Elsewhere"}}]})
    assert status == 200 and world.a.server_name in body["event"]["signatures"], (status, body)
    status, synced = world.a.request("GET", CS + "/sync", token=bob_token)
    assert status == 200 and room_id in synced["rooms"]["invite"], (status, synced)
    since = synced["next_batch"]
    status, left = world.a.request("POST", CS + f"/rooms/{q(room_id)}/leave", {}, token=bob_token)
    assert status == 200, (status, left)
    status, synced = world.a.request("GET", CS + f"/sync?since={q(since)}", token=bob_token)
    assert status == 200, (status, synced)
    entry = synced["rooms"]["leave"][room_id]
    (leave,) = entry["timeline"]["events"]
    assert (leave["type"], leave["state_key"], leave["sender"]) == ("m.room.member", bob, bob), leave
    assert leave["content"]["membership"] == "leave"
    world.assert_serving()


def test_server_acl_covers_invite(world: World) -> None:
    """A server the room's m.room.server_acl denies may not /invite into it."""
    r = world.room
    reg = world.a.register(f"carol{time.time_ns() % 100000}")
    carol = reg["user_id"]
    path = f"/rooms/{q(r.room_id)}/state/m.room.server_acl/"
    status, sent = world.client("PUT", path, {"allow": ["*"], "deny": [world.e.server_name.split(":")[0]],
                                              "allow_ip_literals": True})
    assert status == 200, (status, sent)
    try:
        invite = r.build("m.room.member", {"membership": "invite"}, world.mallory, state_key=carol)
        eid, signed = r.sign(invite)
        status, body = world.e.request(world.a, "PUT", f"{FED}/v2/invite/{q(r.room_id)}/{q(eid)}", {
            "event": signed, "room_version": r.rv.identifier, "invite_room_state": []})
        assert status == 403 and body["errcode"] == "M_FORBIDDEN", (status, body)
    finally:
        status, sent = world.client("PUT", path, {"allow": ["*"], "allow_ip_literals": True})
        assert status == 200, (status, sent)
    r.latest, r.depth = sent["event_id"], r.depth + 3
    r.state[("m.room.server_acl", "")] = sent["event_id"]
    world.assert_serving()


def test_nan_is_not_json_in_requests_or_responses(world: World) -> None:
    """NaN and Infinity are not JSON: a transaction carrying them is 400
    M_NOT_JSON, and an invite answer carrying them fails the client's invite
    with a Matrix error (502), never a 500; nothing is stored."""
    r = world.room
    before = world.room_state()
    pdu = r.build("m.room.message", {"msgtype": "m.text", "body": "x"}, world.mallory)
    _, signed = r.sign(pdu)
    txn = {"origin": world.e.server_name, "origin_server_ts": 1, "pdus": [signed],
           "edus": [{"edu_type": "m.receipt", "content": {r.room_id: {"m.read": {world.mallory: {
               "event_ids": [r.latest], "data": {"ts": float("nan")}}}}}}]}
    raw = json.dumps(txn).encode()
    assert b"NaN" in raw
    # (The body is read before the signature is checked, and NaN cannot be
    # signed: canonical JSON has no such value.)
    status, body = world.e.request(world.a, "PUT", f"{FED}/v1/send/nan{time.time_ns()}", raw=raw, auth=None)
    assert status == 400 and body["errcode"] == "M_NOT_JSON", (status, body)
    victim = f"@nan:{world.e.server_name}"
    world.e.handlers.append(("PUT", f"{FED}/v2/invite/", lambda path, b: (
        200, {"event": dict(b["event"], weight=float("inf"))})))
    try:
        status, body = world.client("POST", f"/rooms/{q(r.room_id)}/invite", {"user_id": victim})
    finally:
        world.e.handlers.clear()
    assert status == 502 and body["errcode"] == "M_UNKNOWN", (status, body)
    # And an invitee server that cannot be reached at all.
    status, body = world.client("POST", f"/rooms/{q(r.room_id)}/invite", {"user_id": "@x:127.0.0.9:1"})
    assert status == 502 and body["errcode"] == "M_UNKNOWN", (status, body)
    assert world.room_state() == before
    world.assert_serving()


def test_soft_failed_events_are_not_left_as_extremities(world: World) -> None:
    """M1 (allowed) forks off before alice's PL1 forbids test.sf; SF1 and
    SF2 build on M1 and soft-fail; M2 builds on PL1 and SF2. Nothing is left
    dangling behind the soft-failed events: alice's next event follows M2
    alone (server-server-api "Soft failure")."""
    r = world.room
    fork, fork_depth, fork_state = r.latest, r.depth, dict(r.state)
    status, pl = world.client("GET", f"/rooms/{q(r.room_id)}/state/m.room.power_levels/")
    assert status == 200, (status, pl)
    pl["events"] = dict(pl.get("events") or {}, **{"test.sf": 50})
    status, sent = world.client("PUT", f"/rooms/{q(r.room_id)}/state/m.room.power_levels/", pl)
    assert status == 200, (status, sent)
    pl1 = sent["event_id"]

    def on_fork(etype: str, body: str, prev: str, depth: int) -> tuple[str, dict[str, Any]]:
        pdu = build_pdu(etype, world.mallory, {"body": body}, room_id=r.room_id, prev_events=[prev], depth=depth,
                        origin_server_ts=int(time.time() * 1000),
                        auth_events=auth_event_ids(r.rv, etype, None, world.mallory, {}, fork_state))
        eid, signed = r.sign(pdu)
        status, got = world.send_txn([signed])
        assert status == 200 and got["pdus"] == {eid: {}}, (etype, status, got)
        return eid, pdu

    m1, _ = on_fork("m.room.message", "M1", fork, fork_depth + 1)
    sf1, _ = on_fork("test.sf", "SF1", m1, fork_depth + 2)
    sf2, _ = on_fork("test.sf", "SF2", sf1, fork_depth + 3)
    ids = world.message_ids()
    assert m1 in ids and sf1 not in ids and sf2 not in ids
    r.state[("m.room.power_levels", "")] = pl1
    m2 = r.build("m.room.message", {"body": "M2"}, world.mallory)
    m2["prev_events"], m2["depth"] = [pl1, sf2], fork_depth + 10
    m2_id, m2_signed = r.sign(m2)
    status, got = world.send_txn([m2_signed])
    assert status == 200 and got["pdus"] == {m2_id: {}}, (status, got)
    r.accepted(m2_id, m2)
    seen: list[dict[str, Any]] = []

    def capture(path: str, body: Any) -> tuple[int, Any]:
        seen.extend(p for p in (body or {}).get("pdus", []) if isinstance(p, dict))
        return 200, {"pdus": {}}

    world.e.handlers.append(("PUT", f"{FED}/v1/send/", capture))
    try:
        status, sent = world.client("PUT", f"/rooms/{q(r.room_id)}/send/m.room.message/m3{time.time_ns()}",
                                    {"msgtype": "m.text", "body": "m3"})
        assert status == 200, (status, sent)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(p.get("content", {}).get("body") == "m3" for p in seen):
            time.sleep(0.1)
    finally:
        world.e.handlers.clear()
    (m3,) = [p for p in seen if p.get("content", {}).get("body") == "m3"]
    assert m3["prev_events"] == [m2_id], (m3["prev_events"], m1, pl1, m2_id)
    r.latest, r.depth = sent["event_id"], m3["depth"]
    world.assert_serving()


def test_joining_a_room_on_e_refusals_and_v1_fallback(world: World) -> None:
    """Joining a room that lives on E: E's make_join refusal reaches the
    client with E's status and errcode (and room_version); a server without
    /v2/send_join is asked on /v1/send_join; a send_join answer without the
    room's create event fails the join with a Matrix error."""
    room_id = f"!onE{time.time_ns()}:{world.e.server_name}"
    join_path = f"/join/{q(room_id)}?server_name={q(world.e.server_name)}"
    make = f"{FED}/v1/make_join/{room_id}/"
    answers: list[tuple[int, Any]] = [
        (400, {"errcode": "M_TEST_ERROR_CODE", "error": "denied!"}),
        (400, {"errcode": "M_INCOMPATIBLE_ROOM_VERSION", "error": "upgrade", "room_version": "x-custom"}),
    ]
    world.e.handlers.append(("GET", make, lambda path, body: answers.pop(0)))
    try:
        status, body = world.client("POST", join_path, {})
        assert status == 400 and body["errcode"] == "M_TEST_ERROR_CODE", (status, body)
        status, body = world.client("POST", join_path, {})
        assert (status, body["errcode"], body.get("room_version")) == (400, "M_INCOMPATIBLE_ROOM_VERSION",
                                                                        "x-custom"), body
    finally:
        world.e.handlers.clear()
    rv = world.room.rv
    creator = f"@founder:{world.e.server_name}"
    create = build_pdu("m.room.create", creator, {"room_version": rv.identifier}, state_key="", room_id=room_id,
                       prev_events=[], auth_events=[], depth=1, origin_server_ts=int(time.time() * 1000))
    create_id, create_signed = hash_and_sign_event(rv, create, world.e.server_name, world.e.key)
    founder = build_pdu("m.room.member", creator, {"membership": "join"}, state_key=creator, room_id=room_id,
                        prev_events=[create_id], auth_events=[create_id], depth=2,
                        origin_server_ts=int(time.time() * 1000))
    founder_id, founder_signed = hash_and_sign_event(rv, founder, world.e.server_name, world.e.key)
    calls: list[str] = []

    def make_join(path: str, body: Any) -> tuple[int, Any]:
        user = urllib.parse.unquote(path.split("?")[0].rsplit("/", 1)[1])
        return 200, {"room_version": rv.identifier, "event": build_pdu(
            "m.room.member", user, {"membership": "join"}, state_key=user, room_id=room_id,
            prev_events=[founder_id], auth_events=[create_id, founder_id], depth=3,
            origin_server_ts=int(time.time() * 1000))}

    def v2(path: str, body: Any) -> tuple[int, Any]:
        calls.append("v2")
        return 404, {"errcode": "M_UNRECOGNIZED", "error": "no v2 here"}

    def v1(path: str, body: Any) -> tuple[int, Any]:
        calls.append("v1")
        # The room's state without its create event.
        return 200, [200, {"state": [founder_signed], "auth_chain": [founder_signed]}]

    world.e.handlers.extend([("GET", make, make_join), ("PUT", f"{FED}/v2/send_join/", v2),
                             ("PUT", f"{FED}/v1/send_join/", v1)])
    try:
        status, body = world.client("POST", join_path, {})
    finally:
        world.e.handlers.clear()
    assert calls == ["v2", "v1"], calls
    assert 400 <= status < 600 and status != 500 and "errcode" in body, (status, body)
    status, rooms = world.client("GET", "/joined_rooms")
    assert status == 200 and room_id not in rooms["joined_rooms"], rooms
    world.assert_serving()


def test_valid_event_still_accepted_after_the_abuse(world: World) -> None:
    """Nothing above left A unable to take E's honest events."""
    r = world.room
    pdu = r.build("m.room.message", {"msgtype": "m.text", "body": "still friends?"}, world.mallory)
    eid, signed = r.sign(pdu)
    status, body = world.send_txn([signed])
    assert status == 200 and body["pdus"] == {eid: {}}, (status, body)
    r.accepted(eid, pdu)
    assert eid in world.message_ids()
    world.assert_serving()


def test_timestamp_to_event_for_servers_in_the_room_only(world: World) -> None:
    """Spec: server-server-api "GET /_matrix/federation/v1/timestamp_to_event/{roomId}"."""
    room_id = world.room.room_id
    status, sent = world.client("PUT", f"/rooms/{q(room_id)}/send/m.room.message/ts{time.time_ns()}",
                                {"msgtype": "m.text", "body": "what time is it"})
    assert status == 200, sent
    status, ev = world.client("GET", f"/rooms/{q(room_id)}/event/{q(sent['event_id'])}")
    assert status == 200, ev
    path = f"{FED}/v1/timestamp_to_event/{q(room_id)}?ts={ev['origin_server_ts']}&dir=b"
    status, body = world.e.request(world.a, "GET", path)
    assert status == 200 and body == {"event_id": sent["event_id"], "origin_server_ts": ev["origin_server_ts"]}, body
    status, body = world.e.request(world.a, "GET", f"{FED}/v1/timestamp_to_event/{q(room_id)}?ts=5&dir=sideways")
    assert status == 400 and body["errcode"] == "M_INVALID_PARAM", body
    # A room E has no member in: refused, as for backfill.
    status, other = world.client("POST", "/createRoom", {})
    assert status == 200, other
    status, body = world.e.request(world.a, "GET", f"{FED}/v1/timestamp_to_event/{q(other['room_id'])}?ts=1&dir=f")
    assert status == 403 and body["errcode"] == "M_FORBIDDEN", body
    # Unsigned: refused before anything is looked up.
    status, body = world.e.request(world.a, "GET", path, auth=None)
    assert status == 401, body
