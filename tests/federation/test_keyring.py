"""Tests for zhome.federation.keyring and key_resource (spec: server-server-api
"Retrieving server keys", "Querying Keys Through Another Server",
"Validating hashes and signatures on received events"; rooms/v5.md key
validity). Storage-backed tests run on both engines via ``database``."""

from __future__ import annotations

import io
import json
from typing import Any, Optional

import pytest
import pytest_twisted
from signedjson.key import decode_verify_key_base64
from signedjson.sign import verify_signed_json
from twisted.internet import defer, reactor, task

from zhome.crypto.event_hashing import hash_and_sign_event
from zhome.crypto.keys import key_id, new_signing_key, verify_key_base64
from zhome.crypto.signing import SignatureError, sign_json
from zhome.federation.key_resource import KeyServlets
from zhome.federation.keyring import KEY_SERVER_PATH, KeyLookupError, Keyring
from zhome.http.errors import MatrixError
from zhome.http.server import JsonResource
from zhome.rooms.versions import get_room_version
from zhome.storage.database import Database

T0 = 1_700_000_000.0  # seconds
T0_MS = int(T0 * 1000)
HOUR_MS = 3600 * 1000


class FakeClock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance_ms(self, ms: int) -> None:
        self.t += ms / 1000


class FakeFederation:
    """fetch_json serving other in-process keyrings' key responses."""

    def __init__(self) -> None:
        self.servers: dict[str, Keyring] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail = False
        # Serve this server's response when asked for another (a lying or
        # misconfigured server).
        self.impersonate: dict[str, str] = {}
        self.gate: Optional[defer.Deferred[None]] = None

    async def fetch_json(self, destination: str, path: str) -> dict[str, Any]:
        self.calls.append((destination, path))
        if self.gate is not None:
            await self.gate
        if self.fail:
            raise ConnectionRefusedError(f"{destination} unreachable")
        assert path == KEY_SERVER_PATH
        source = self.impersonate.get(destination, destination)
        if source not in self.servers:
            raise ConnectionRefusedError(f"no such server {destination}")
        return self.servers[source].local_keys_json()


def vk_of(key: Any) -> Any:
    return decode_verify_key_base64(key.alg, key.version, verify_key_base64(key))


def make_remote(fed: FakeFederation, db: Database, name: str, clock: FakeClock, **kw: Any) -> tuple[Keyring, Any]:
    key = kw.pop("key", None) or new_signing_key()
    kr = Keyring(name, [key], kw.pop("old_verify_keys", {}), db, None, clock=clock, **kw)
    fed.servers[name] = kr
    return kr, key


def make_local(fed: FakeFederation, db: Database, clock: FakeClock) -> Keyring:
    return Keyring("local.test", [new_signing_key()], {}, db, fed.fetch_json, clock=clock)


# -- our own keys ------------------------------------------------------------


def test_local_keys_json_self_signed_and_valid_in_future() -> None:
    k1, k2 = new_signing_key("k1"), new_signing_key("k2")
    old = new_signing_key("old")
    clock = FakeClock()
    kr = Keyring(
        "local.test", [k1, k2], {key_id(old): (verify_key_base64(old), T0_MS - 1000)}, None,  # type: ignore[arg-type]
        None, clock=clock,
    )
    body = kr.local_keys_json()
    assert body["server_name"] == "local.test"
    assert body["valid_until_ts"] > T0_MS
    assert set(body["verify_keys"]) == {"ed25519:k1", "ed25519:k2"}
    assert body["old_verify_keys"] == {"ed25519:old": {"key": verify_key_base64(old), "expired_ts": T0_MS - 1000}}
    for k in (k1, k2):
        verify_signed_json(body, "local.test", vk_of(k))
    assert set(body["signatures"]["local.test"]) == {"ed25519:k1", "ed25519:k2"}

    # Cached until half the validity has passed, then remade.
    first_until = body["valid_until_ts"]
    clock.advance_ms(HOUR_MS)
    assert kr.local_keys_json()["valid_until_ts"] == first_until
    clock.advance_ms(4 * 24 * HOUR_MS)
    renewed = kr.local_keys_json()
    assert renewed["valid_until_ts"] > first_until
    verify_signed_json(renewed, "local.test", vk_of(k1))


@pytest_twisted.ensureDeferred
async def test_own_keys_resolved_locally() -> None:
    key, old = new_signing_key(), new_signing_key()
    kr = Keyring("local.test", [key], {key_id(old): (verify_key_base64(old), T0_MS)}, None, None,  # type: ignore[arg-type]
                 clock=FakeClock())
    obj = sign_json({"a": 1}, "local.test", key)
    await kr.verify_json("local.test", obj, T0_MS)
    old_obj = sign_json({"a": 1}, "local.test", old)
    await kr.verify_json("local.test", old_obj, T0_MS - 1)
    await kr.verify_json("local.test", old_obj, None)
    with pytest.raises(KeyLookupError):
        await kr.verify_json("local.test", old_obj, T0_MS + 1)
    with pytest.raises(KeyLookupError):
        await kr.get_verify_key("local.test", "ed25519:nope", None)


# -- remote keys -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_remote_fetch_and_verify_json(database: Database) -> None:
    fed, clock = FakeFederation(), FakeClock()
    _, rkey = make_remote(fed, database, "remote.test", clock)
    local = make_local(fed, database, clock)

    obj = sign_json({"hello": "world"}, "remote.test", rkey)
    await local.verify_json("remote.test", obj, T0_MS)
    assert fed.calls == [("remote.test", KEY_SERVER_PATH)]

    tampered = dict(obj, hello="moon")
    with pytest.raises(SignatureError):
        await local.verify_json("remote.test", tampered, T0_MS)
    # Signed by another server only: not a signature of remote.test.
    with pytest.raises(SignatureError):
        await local.verify_json("remote.test", sign_json({"x": 1}, "other.test", rkey), T0_MS)
    # Signed with a key remote.test does not have.
    forged = sign_json({"hello": "world"}, "remote.test", new_signing_key("forged"))
    with pytest.raises(KeyLookupError):
        await local.verify_json("remote.test", forged, T0_MS)


@pytest_twisted.ensureDeferred
async def test_cached_keys_used_without_refetch(database: Database) -> None:
    fed, clock = FakeFederation(), FakeClock()
    _, rkey = make_remote(fed, database, "remote.test", clock)
    local = make_local(fed, database, clock)
    obj = sign_json({"n": 1}, "remote.test", rkey)

    await local.verify_json("remote.test", obj, T0_MS)
    clock.advance_ms(10 * 60 * 1000)
    await local.verify_json("remote.test", obj, T0_MS)
    assert len(fed.calls) == 1

    # A new keyring (a restart, another worker) uses the database copy.
    restarted = make_local(fed, database, clock)
    await restarted.verify_json("remote.test", obj, T0_MS)
    assert len(fed.calls) == 1
    rows = await database.execute(
        "t", "SELECT key_id, verify_key, valid_until_ts, expired_ts, key_json FROM server_signature_keys"
        " WHERE server_name = ?", "remote.test",
    )
    assert len(rows) == 1
    assert rows[0][0] == key_id(rkey) and rows[0][1] == verify_key_base64(rkey)
    assert rows[0][3] is None
    stored = json.loads(rows[0][4])
    verify_signed_json(stored, "remote.test", vk_of(rkey))


@pytest_twisted.ensureDeferred
async def test_key_served_for_wrong_server_refused(database: Database) -> None:
    fed, clock = FakeFederation(), FakeClock()
    _, evil_key = make_remote(fed, database, "evil.test", clock)
    fed.impersonate["victim.test"] = "evil.test"
    local = make_local(fed, database, clock)
    obj = sign_json({"n": 1}, "victim.test", evil_key)
    with pytest.raises(KeyLookupError, match="victim.test"):
        await local.verify_json("victim.test", obj, None)
    rows = await database.execute("t", "SELECT key_id FROM server_signature_keys WHERE server_name = ?", "victim.test")
    assert rows == []


@pytest_twisted.ensureDeferred
async def test_response_not_self_signed_refused(database: Database) -> None:
    fed, clock = FakeFederation(), FakeClock()
    rkr, rkey = make_remote(fed, database, "remote.test", clock)
    other = new_signing_key("other")

    async def fetch(dest: str, path: str) -> dict[str, Any]:
        body = rkr.local_keys_json()
        body.pop("signatures")
        return sign_json(body, "remote.test", other)  # signed with a key it does not advertise

    local = Keyring("local.test", [new_signing_key()], {}, database, fetch, clock=clock)
    with pytest.raises(KeyLookupError, match="not signed"):
        await local.get_verify_key("remote.test", key_id(rkey), None)


@pytest_twisted.ensureDeferred
async def test_expired_key_refetched_once_then_refused_for_v5(database: Database) -> None:
    fed, clock = FakeFederation(), FakeClock()
    _, rkey = make_remote(fed, database, "remote.test", clock, key_validity_ms=HOUR_MS)
    local = make_local(fed, database, clock)
    obj = sign_json({"n": 1}, "remote.test", rkey)

    await local.verify_json("remote.test", obj, T0_MS + HOUR_MS // 2)
    assert len(fed.calls) == 1

    clock.advance_ms(2 * 60 * 1000)  # past the refetch interval
    late = T0_MS + 2 * HOUR_MS
    with pytest.raises(KeyLookupError, match="valid only until"):
        await local.verify_json("remote.test", obj, late)
    assert len(fed.calls) == 2  # exactly one refetch
    # Room versions 1-4 ignore valid_until_ts.
    await local.verify_json("remote.test", obj, None)
    assert len(fed.calls) == 2

    # The same through verify_event: refused in v5, accepted in v4.
    pdu = {
        "type": "m.room.message", "room_id": "!r:remote.test", "sender": "@a:remote.test",
        "content": {"body": "hi"}, "origin_server_ts": late, "depth": 3,
        "prev_events": [], "auth_events": [],
    }
    for version, ok in (("4", True), ("5", False), ("10", False)):
        _, signed = hash_and_sign_event(get_room_version(version), pdu, "remote.test", rkey)
        if ok:
            await local.verify_event(get_room_version(version), signed)
        else:
            with pytest.raises(KeyLookupError):
                await local.verify_event(get_room_version(version), signed)


@pytest_twisted.ensureDeferred
async def test_valid_until_capped_at_seven_days_after_fetch(database: Database) -> None:
    fed, clock = FakeFederation(), FakeClock()
    _, rkey = make_remote(fed, database, "remote.test", clock, key_validity_ms=365 * 24 * HOUR_MS)
    local = make_local(fed, database, clock)
    obj = sign_json({"n": 1}, "remote.test", rkey)
    await local.verify_json("remote.test", obj, T0_MS + 6 * 24 * HOUR_MS)
    with pytest.raises(KeyLookupError):
        # No refetch allowed yet (< 60 s), and 8 days is past the cap.
        await local.verify_json("remote.test", obj, T0_MS + 8 * 24 * HOUR_MS)
    assert len(fed.calls) == 1


@pytest_twisted.ensureDeferred
async def test_old_verify_keys_honoured_until_expired_ts(database: Database) -> None:
    fed, clock = FakeFederation(), FakeClock()
    old = new_signing_key("old")
    expired_ts = T0_MS - HOUR_MS
    make_remote(fed, database, "remote.test", clock,
                old_verify_keys={key_id(old): (verify_key_base64(old), expired_ts)})
    local = make_local(fed, database, clock)
    obj = sign_json({"n": 1}, "remote.test", old)

    await local.verify_json("remote.test", obj, expired_ts - 1)
    await local.verify_json("remote.test", obj, expired_ts)
    await local.verify_json("remote.test", obj, None)
    with pytest.raises(KeyLookupError, match="valid only until"):
        await local.verify_json("remote.test", obj, expired_ts + 1)
    rows = await database.execute(
        "t", "SELECT valid_until_ts, expired_ts FROM server_signature_keys WHERE key_id = ?", key_id(old)
    )
    assert rows == [(None, expired_ts)]


@pytest_twisted.ensureDeferred
async def test_failure_backoff(database: Database) -> None:
    fed, clock = FakeFederation(), FakeClock()
    _, rkey = make_remote(fed, database, "remote.test", clock)
    local = make_local(fed, database, clock)
    obj = sign_json({"n": 1}, "remote.test", rkey)

    fed.fail = True
    with pytest.raises(KeyLookupError, match="unreachable"):
        await local.verify_json("remote.test", obj, T0_MS)
    assert len(fed.calls) == 1
    fed.fail = False
    clock.advance_ms(30 * 1000)
    with pytest.raises(KeyLookupError, match="not retrying"):
        await local.verify_json("remote.test", obj, T0_MS)
    assert len(fed.calls) == 1
    clock.advance_ms(31 * 1000)
    await local.verify_json("remote.test", obj, T0_MS)
    assert len(fed.calls) == 2


@pytest_twisted.ensureDeferred
async def test_no_fetcher_means_no_remote_keys(database: Database) -> None:
    local = Keyring("local.test", [new_signing_key()], {}, database, None, clock=FakeClock())
    with pytest.raises(KeyLookupError, match="no federation client"):
        await local.get_verify_key("remote.test", "ed25519:a", None)


@pytest_twisted.ensureDeferred
async def test_concurrent_lookups_share_one_fetch(database: Database) -> None:
    fed, clock = FakeFederation(), FakeClock()
    _, rkey = make_remote(fed, database, "remote.test", clock)
    local = make_local(fed, database, clock)
    fed.gate = defer.Deferred()
    kid = key_id(rkey)
    lookups = [defer.ensureDeferred(local.get_verify_key("remote.test", kid, T0_MS)) for _ in range(3)]
    for _ in range(500):  # until the fetch runs and the others wait for it
        if fed.calls and len(local._inflight.get("remote.test", [])) == 2:
            break
        await task.deferLater(reactor, 0.01, lambda: None)
    assert len(fed.calls) == 1
    fed.gate.callback(None)
    keys = await defer.gatherResults(lookups)
    assert all(bytes(k) == bytes(vk_of(rkey)) for k in keys)
    assert len(fed.calls) == 1


# -- events ------------------------------------------------------------------


def _pdu(sender: str = "@alice:remote.test", **extra: Any) -> dict[str, Any]:
    pdu = {
        "type": "m.room.message", "room_id": "!room:remote.test", "sender": sender,
        "content": {"msgtype": "m.text", "body": "hello"}, "origin_server_ts": T0_MS,
        "depth": 5, "prev_events": [], "auth_events": [],
    }
    pdu.update(extra)
    return pdu


@pytest.mark.parametrize("version", ["1", "3", "5", "11", "12"])
@pytest_twisted.ensureDeferred
async def test_verify_event(database: Database, version: str) -> None:
    rv = get_room_version(version)
    fed, clock = FakeFederation(), FakeClock()
    _, rkey = make_remote(fed, database, "remote.test", clock)
    local = make_local(fed, database, clock)
    _, signed = hash_and_sign_event(rv, _pdu(), "remote.test", rkey)
    await local.verify_event(rv, signed)

    # A change outside the redacted form does not touch the signature (the
    # content hash check is the caller's).
    await local.verify_event(rv, dict(signed, content={"body": "changed"}))
    for field, value in (("type", "m.room.topic"), ("sender", "@mallory:remote.test")):
        with pytest.raises(SignatureError):
            await local.verify_event(rv, dict(signed, **{field: value}))
    unsigned = dict(signed, signatures={})
    with pytest.raises(SignatureError):
        await local.verify_event(rv, unsigned)


@pytest_twisted.ensureDeferred
async def test_verify_event_v1_needs_event_id_server(database: Database) -> None:
    rv = get_room_version("1")
    fed, clock = FakeFederation(), FakeClock()
    _, rkey = make_remote(fed, database, "remote.test", clock)
    _, okey = make_remote(fed, database, "origin.test", clock)
    local = make_local(fed, database, clock)
    pdu = _pdu(event_id="$abc:origin.test")
    _, signed = hash_and_sign_event(rv, pdu, "remote.test", rkey)
    with pytest.raises(SignatureError, match="origin.test"):
        await local.verify_event(rv, signed)
    _, both = hash_and_sign_event(rv, signed, "origin.test", okey)
    await local.verify_event(rv, both)


@pytest_twisted.ensureDeferred
async def test_verify_event_restricted_join_needs_authorising_server(database: Database) -> None:
    fed, clock = FakeFederation(), FakeClock()
    _, rkey = make_remote(fed, database, "remote.test", clock)
    _, akey = make_remote(fed, database, "auth.test", clock)
    local = make_local(fed, database, clock)
    pdu = _pdu(type="m.room.member", state_key="@alice:remote.test",
               content={"membership": "join", "join_authorised_via_users_server": "@bob:auth.test"})
    for version in ("8", "9", "10"):
        rv = get_room_version(version)
        _, signed = hash_and_sign_event(rv, pdu, "remote.test", rkey)
        with pytest.raises(SignatureError, match="auth.test"):
            await local.verify_event(rv, signed)
        _, both = hash_and_sign_event(rv, signed, "auth.test", akey)
        await local.verify_event(rv, both)
    # Before restricted rooms the field means nothing.
    rv7 = get_room_version("7")
    _, signed7 = hash_and_sign_event(rv7, pdu, "remote.test", rkey)
    await local.verify_event(rv7, signed7)


# -- key server endpoints ----------------------------------------------------


class FakeRequest:
    def __init__(self, body: Optional[dict[str, Any]] = None, args: Optional[dict[str, str]] = None) -> None:
        self.content = io.BytesIO(json.dumps(body).encode() if body is not None else b"")
        self.args = {k.encode(): [v.encode()] for k, v in (args or {}).items()}


def _routes(servlets: KeyServlets) -> JsonResource:
    r = JsonResource()
    servlets.register_routes(r)
    return r


async def _call(r: JsonResource, method: str, path: str, request: FakeRequest) -> tuple[int, Any]:
    for route in r.routes:
        m = route.pattern.match(path)
        if m and route.method == method:
            return await route.handler(request, **{k: v for k, v in m.groupdict().items() if v is not None})
    raise AssertionError(f"no route for {method} {path}")


@pytest_twisted.ensureDeferred
async def test_key_servlets(database: Database) -> None:
    fed, clock = FakeFederation(), FakeClock()
    _, rkey = make_remote(fed, database, "remote.test", clock)
    local = make_local(fed, database, clock)
    r = _routes(KeyServlets(local))
    local_vk = vk_of(local._signing_keys[0])

    for path in ("/_matrix/key/v2/server", "/_matrix/key/v2/server/ed25519:whatever"):
        code, body = await _call(r, "GET", path, FakeRequest())
        assert code == 200 and body["server_name"] == "local.test"
        verify_signed_json(body, "local.test", local_vk)

    code, body = await _call(r, "GET", "/_matrix/key/v2/query/remote.test", FakeRequest())
    assert code == 200 and len(body["server_keys"]) == 1
    resp = body["server_keys"][0]
    verify_signed_json(resp, "remote.test", vk_of(rkey))
    verify_signed_json(resp, "local.test", local_vk)  # the notary's signature
    assert len(fed.calls) == 1

    code, body = await _call(r, "POST", "/_matrix/key/v2/query", FakeRequest({
        "server_keys": {"remote.test": {key_id(rkey): {}}, "local.test": {}},
    }))
    assert code == 200
    assert sorted(k["server_name"] for k in body["server_keys"]) == ["local.test", "remote.test"]
    assert len(fed.calls) == 1  # served from the cache

    # Demanding validity beyond what we have makes the notary fetch again
    # (once the refetch interval has passed).
    clock.advance_ms(2 * 60 * 1000)
    far = T0_MS + 30 * 24 * HOUR_MS
    code, body = await _call(r, "POST", "/_matrix/key/v2/query", FakeRequest({
        "server_keys": {"remote.test": {key_id(rkey): {"minimum_valid_until_ts": far}}},
    }))
    assert code == 200 and len(body["server_keys"]) == 1
    assert len(fed.calls) == 2

    # A server that is down and unknown: nothing to return, but no error.
    fed.fail = True
    code, body = await _call(r, "GET", "/_matrix/key/v2/query/down.test", FakeRequest())
    assert code == 200 and body == {"server_keys": []}

    with pytest.raises(MatrixError) as e:
        await _call(r, "POST", "/_matrix/key/v2/query", FakeRequest({"server_keys": ["x"]}))
    assert e.value.code == 400


@pytest_twisted.ensureDeferred
async def test_notary_serves_expired_keys_and_refetches_when_asked(database: Database) -> None:
    """server-server-api "Querying Keys Through Another Server": a notary
    returns what it has, even expired, when the origin has nothing better;
    a query it cannot meet makes it ask the origin again at once, and a
    key the origin stops publishing is not forgotten."""
    clock = FakeClock()
    k0, k1 = new_signing_key("key_0"), new_signing_key("key_1")
    expired = T0_MS - 24 * HOUR_MS
    answers: list[Any] = []
    calls: list[str] = []

    def response(key: Any, valid_until: int) -> dict[str, Any]:
        body = {"server_name": "origin.test", "valid_until_ts": valid_until, "old_verify_keys": {},
                "verify_keys": {key_id(key): {"key": verify_key_base64(key)}}}
        return sign_json(body, "origin.test", key)

    async def fetch_json(destination: str, path: str) -> dict[str, Any]:
        calls.append(destination)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    local = Keyring("local.test", [new_signing_key()], {}, database, fetch_json, clock=clock)

    async def query(kid: str, minimum: int) -> list[dict[str, Any]]:
        r = _routes(KeyServlets(local))
        code, body = await _call(r, "POST", "/_matrix/key/v2/query", FakeRequest(
            {"server_keys": {"origin.test": {kid: {"minimum_valid_until_ts": minimum}}}}))
        assert code == 200
        return body["server_keys"]

    answers.append(response(k0, expired))
    got = await query(key_id(k0), 0)
    assert [r["valid_until_ts"] for r in got] == [expired]
    # Asking for more than we hold: fetched again straight away.
    answers.append(response(k0, expired))
    got = await query(key_id(k0), expired + 1000)
    assert len(calls) == 2 and [r["valid_until_ts"] for r in got] == [expired]
    # The origin fails: what we hold is still served.
    answers.append(ConnectionRefusedError("origin down"))
    got = await query(key_id(k0), expired + 1000)
    assert len(calls) == 3 and key_id(k0) in got[0]["verify_keys"]
    # A new key (right after that failure) is fetched, and a key the origin
    # no longer lists stays known.
    answers.append(response(k1, expired))
    assert key_id(k1) in (await query(key_id(k1), 0))[0]["verify_keys"]
    answers.append(response(new_signing_key("key_2"), expired + 1000))
    await query(key_id(k1), T0_MS)
    got = await query(key_id(k1), expired)
    assert len(got) == 1 and key_id(k1) in got[0]["verify_keys"]
