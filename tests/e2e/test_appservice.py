"""The Application Service API end to end: real zhome processes (SQLite and
PostgreSQL) and a real application service built on mautrix-python."""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.e2e.appservice_mautrix import MautrixService
from tests.e2e.harness import CS, ClientUser, ZhomeProcess, free_port, q

AS_TOKEN = "as_token_for_the_test_bridge"
HS_TOKEN = "hs_token_for_the_test_bridge"
GHOSTS = "@bridge_"


def _registration(tmp_path: Path, port: int, **over: Any) -> Path:
    data: dict[str, Any] = {
        "id": "testbridge", "url": f"http://127.0.0.1:{port}", "as_token": AS_TOKEN, "hs_token": HS_TOKEN,
        "sender_localpart": "bridgebot", "rate_limited": False, "receive_ephemeral": True,
        "protocols": ["testproto"],
        "namespaces": {"users": [{"exclusive": True, "regex": r"@bridge_.*:localhost"}],
                       "aliases": [{"exclusive": True, "regex": r"#bridge_.*:localhost"}], "rooms": []},
    }
    data.update(over)
    path = tmp_path / "bridge-registration.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class Bridge:
    def __init__(self, hs: ZhomeProcess, port: int) -> None:
        self.hs = hs
        self.port = port
        self.service: MautrixService | None = None

    def start_service(self) -> MautrixService:
        self.service = MautrixService(self.hs.base_url, "localhost", self.port, AS_TOKEN, HS_TOKEN, "bridgebot",
                                      "testbridge", GHOSTS)
        return self.service

    def stop_service(self) -> None:
        if self.service is not None:
            self.service.stop()
            self.service = None

    def as_req(self, method: str, path: str, body: Any = None, **query: str) -> tuple[int, Any]:
        qs = "&".join(f"{k}={q(v)}" for k, v in query.items())
        return self.hs.request(method, CS + path + (("?" + qs) if qs else ""), body, token=AS_TOKEN)


@pytest.fixture
def bridge(zhome_factory: Any, tmp_path: Path) -> Iterator[Bridge]:
    port = free_port()
    reg = _registration(tmp_path, port)
    hs = zhome_factory(overrides={"app_service_config_files": [str(reg)]})
    hs.start()
    b = Bridge(hs, port)
    b.start_service()
    try:
        yield b
    finally:
        b.stop_service()


def _sync_messages(user: ClientUser, room_id: str, since: str | None = None) -> tuple[list[dict[str, Any]], str]:
    path = "/sync?timeout=0" + (f"&since={since}" if since else "")
    body = user.ok("GET", path)
    room = body.get("rooms", {}).get("join", {}).get(room_id, {})
    return room.get("timeline", {}).get("events", []), body["next_batch"]


def _stable(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Events without ``unsigned.age`` (which grows between attempts)."""
    out = []
    for e in events:
        e = dict(e, unsigned={k: v for k, v in (e.get("unsigned") or {}).items() if k != "age"})
        out.append(e)
    return out


def _bodies(events: list[dict[str, Any]], room_id: str) -> list[str]:
    return [e["content"]["body"] for e in events
            if e.get("room_id") == room_id and e.get("type") == "m.room.message"]


def _room_with_ghost(bridge: Bridge, name: str) -> tuple[Any, Any, ClientUser, str, str, Any]:
    """Alice's public room and the bridge's ghost ``@bridge_<name>``,
    registered through mautrix's intent API and joined to it."""
    hs, svc = bridge.hs, bridge.service
    assert svc is not None
    alice = ClientUser(hs, "alice")
    room_id = alice.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"]
    ghost_id = f"@bridge_{name}:localhost"
    ghost = svc.az.intent.user(ghost_id)
    svc.run(ghost.ensure_registered())
    svc.run(ghost.join_room(room_id))
    return hs, svc, alice, room_id, ghost_id, ghost


def test_mautrix_bridge_round_trip(bridge: Bridge) -> None:
    hs, svc, alice, room_id, ghost_id, ghost = _room_with_ghost(bridge, "bob")
    # A ghost, registered through mautrix's intent API, joins and speaks.
    svc.run(ghost.send_text(room_id, "hello from the bridge"))
    deadline = time.monotonic() + 20
    seen: list[dict[str, Any]] = []
    since = None
    while time.monotonic() < deadline and not any(e.get("sender") == ghost_id and e["content"].get("body") ==
                                                  "hello from the bridge" for e in seen):
        evs, since = _sync_messages(alice, room_id, since)
        seen += [e for e in evs if e["type"] == "m.room.message"]
        time.sleep(0.2)
    assert [e["sender"] for e in seen if e["content"].get("body") == "hello from the bridge"] == [ghost_id]

    # The normal user's message reaches the service in a transaction (the
    # room has a joined member in its namespace).
    alice.ok("PUT", f"/rooms/{q(room_id)}/send/m.room.message/t1", {"msgtype": "m.text", "body": "hi bridge"})
    got = svc.wait_for(lambda: [e for e in svc.events if e.get("content", {}).get("body") == "hi bridge"],
                       message="alice's message at the service")
    assert got[0]["sender"] == alice.user_id and got[0]["room_id"] == room_id
    # The ghost's own join arrived too, as membership in its namespace.
    assert any(e["type"] == "m.room.member" and e.get("state_key") == ghost_id for e in svc.events)

    # Ephemeral events: typing and a read receipt.
    alice.ok("PUT", f"/rooms/{q(room_id)}/typing/{q(alice.user_id)}", {"typing": True, "timeout": 10000})
    typing = svc.wait_for(lambda: [e for e in svc.ephemeral if e["type"] == "m.typing"
                                   and alice.user_id in e["content"].get("user_ids", [])], message="typing")
    assert typing[0]["room_id"] == room_id
    event_id = got[0]["event_id"]
    alice.ok("POST", f"/rooms/{q(room_id)}/receipt/m.read/{q(event_id)}", {})
    receipts = svc.wait_for(lambda: [e for e in svc.ephemeral if e["type"] == "m.receipt"], message="receipt")
    assert alice.user_id in receipts[0]["content"][event_id]["m.read"]
    # Delivered under both names of the ephemeral list.
    with_eph = [b for _, b in svc.accepted() if b.get("ephemeral")]
    assert with_eph and with_eph[0]["ephemeral"] == with_eph[0]["de.sorunome.msc2409.ephemeral"]

    # Ping through the client API.
    status, body = hs.request("POST", "/_matrix/client/v1/appservice/testbridge/ping", {"transaction_id": "p1"},
                              token=AS_TOKEN)
    assert status == 200 and isinstance(body["duration_ms"], int), body
    status, body = hs.request("POST", "/_matrix/client/v1/appservice/testbridge/ping", {}, token=alice.token)
    assert (status, body["errcode"]) == (403, "M_FORBIDDEN")
    status, body = hs.request("POST", "/_matrix/client/v1/appservice/other/ping", {}, token=AS_TOKEN)
    assert (status, body["errcode"]) == (403, "M_FORBIDDEN")


def test_durability_across_outage_and_restart(bridge: Bridge, db_config: Any) -> None:
    hs, svc = bridge.hs, bridge.service
    assert svc is not None
    alice = ClientUser(hs, "alice")
    room_id = alice.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"]
    ghost = svc.az.intent.user("@bridge_carol:localhost")
    svc.run(ghost.ensure_registered())
    svc.run(ghost.join_room(room_id))
    svc.wait_for(lambda: [e for e in svc.events if e["type"] == "m.room.member"], message="the ghost's join")

    # The service refuses transactions: the same transaction comes back.
    svc.refuse_transactions = True
    # Bodies no event ID or other stored value can contain by chance.
    tag = secrets.token_hex(6)
    sent = [f"durable-{tag}-m{i}" for i in range(1, 4)]
    for i, body in enumerate(sent, 1):
        alice.ok("PUT", f"/rooms/{q(room_id)}/send/m.room.message/m{i}", {"msgtype": "m.text", "body": body})
    refused = svc.wait_for(lambda: len([w for w in svc.wire if w[2] == 500]) >= 2 and svc.wire, timeout=30,
                           message="two refused attempts")
    first_refused = [w for w in refused if w[2] == 500][0]
    retries = [w for w in svc.wire if w[2] == 500 and w[0] == first_refused[0]]
    assert len(retries) >= 2, "a refused transaction is retried with the same ID"
    assert all(_stable(r[1]["events"]) == _stable(first_refused[1]["events"]) for r in retries), "same events"

    # The queue holds event IDs, never content (content is sealed at rest).
    db_file = hs.workdir / "data" / "homeserver.db"
    assert db_file.exists() == (db_config[0] == "sqlite3")
    if db_file.exists():
        import sqlite3

        with sqlite3.connect(db_file) as conn:
            rows = conn.execute("SELECT * FROM appservice_queue").fetchall()
        assert rows and all(len(r) == 3 and str(r[2]).startswith("$") for r in rows)
        assert sent[0].encode() not in b"".join(str(r).encode() for r in rows)

    # The service goes away; more messages; zhome restarts; the service comes back.
    bridge.stop_service()
    more = [f"durable-{tag}-m{i}" for i in (4, 5)]
    for i, body in zip((4, 5), more):
        alice.ok("PUT", f"/rooms/{q(room_id)}/send/m.room.message/m{i}", {"msgtype": "m.text", "body": body})
    hs.restart()
    svc2 = bridge.start_service()
    svc2.wait_for(lambda: set(sent + more) <= set(_bodies([e for _, b in svc2.accepted() for e in b["events"]],
                                                          room_id)),
                  timeout=60, message="every message after the restart")
    delivered = _bodies([e for _, b in svc2.accepted() for e in b["events"]], room_id)
    assert delivered == sent + more, "each exactly once, in order"
    # The first accepted transaction is the one refused before: same ID,
    # same events.
    first_ok = svc2.accepted()[0]
    assert first_ok[0] == first_refused[0]
    assert _stable(first_ok[1]["events"]) == _stable(first_refused[1]["events"])
    ids = [int(t) for t, _ in svc2.accepted()]
    assert ids == sorted(set(ids)), "transaction IDs increase and are not reused for other contents"


def _ephemeral_of(wire: list[tuple[str, dict[str, Any], int]]) -> list[dict[str, Any]]:
    return [e for _, b, _ in wire for e in b.get("ephemeral") or []]


def test_ephemeral_events_across_outage_and_restart(bridge: Bridge, db_config: Any) -> None:
    """Receipts, presence and typing for a service that is down are kept in
    the database: after a restart of zhome the transaction that failed is
    sent again with the same ID and the same ephemeral events, each is
    accepted exactly once, and nothing is sent again afterwards."""
    hs, svc, alice, room_id, ghost_id, ghost = _room_with_ghost(bridge, "erin")
    tag = secrets.token_hex(6)
    event_id = alice.ok("PUT", f"/rooms/{q(room_id)}/send/m.room.message/e0",
                        {"msgtype": "m.text", "body": f"read-me-{tag}"})["event_id"]
    svc.wait_for(lambda: [e for e in svc.events if e.get("event_id") == event_id], message="the message")

    # The service is down (answers 500); a receipt, typing and presence happen.
    svc.refuse_transactions = True
    alice.ok("POST", f"/rooms/{q(room_id)}/receipt/m.read/{q(event_id)}", {})
    alice.ok("PUT", f"/rooms/{q(room_id)}/typing/{q(alice.user_id)}", {"typing": True, "timeout": 30000})
    status, body = bridge.as_req("PUT", f"/presence/{q(ghost_id)}/status",
                                 {"presence": "online", "status_msg": f"status-{tag}"}, user_id=ghost_id)
    assert status == 200, body

    def is_receipt(e: dict[str, Any]) -> bool:
        return e["type"] == "m.receipt" and alice.user_id in e["content"].get(event_id, {}).get("m.read", {})

    def is_presence(e: dict[str, Any]) -> bool:
        return e["type"] == "m.presence" and e["content"].get("status_msg") == f"status-{tag}"

    # The first refused transaction carries ephemeral events only (nothing
    # else happened since the service went down): the receipt at least,
    # unless activity of the ghost queued its presence first.
    refused = svc.wait_for(lambda: [w for w in svc.wire if w[2] == 500], timeout=30,
                           message="a refused transaction")
    first_refused = refused[0]
    assert first_refused[1]["ephemeral"] and not first_refused[1]["events"], first_refused
    svc.wait_for(lambda: len([w for w in svc.wire if w[2] == 500 and w[0] == first_refused[0]]) >= 2,
                 timeout=30, message="the refused transaction sent again")
    attempts = [w for w in svc.wire if w[2] == 500 and w[0] == first_refused[0]]
    assert all(w[1]["ephemeral"] == first_refused[1]["ephemeral"] for w in attempts), "same ephemeral events"
    assert all(w[1]["de.sorunome.msc2409.ephemeral"] == w[1]["ephemeral"] for w in attempts)

    # zhome stops and starts again while the service is down; then it comes back.
    bridge.stop_service()
    hs.restart()
    svc2 = bridge.start_service()
    svc2.wait_for(lambda: any(is_receipt(e) for e in _ephemeral_of(svc2.wire))
                  and any(is_presence(e) for e in _ephemeral_of(svc2.wire)),
                  timeout=60, message="the receipt and the presence after the restart")
    first_ok = svc2.accepted()[0]
    assert first_ok[0] == first_refused[0], "the transaction in flight is sent again first, under its ID"
    assert first_ok[1]["ephemeral"] == first_refused[1]["ephemeral"], "with the same ephemeral events"
    assert any(e["type"] == "m.typing" and alice.user_id in e["content"]["user_ids"]
               for e in _ephemeral_of(svc2.wire)), "the fresh typing notice too"
    accepted = [e for _, b in svc2.accepted() for e in b.get("ephemeral") or []]
    assert len([e for e in accepted if is_receipt(e)]) == 1, "the receipt exactly once"
    assert len([e for e in accepted if is_presence(e)]) == 1, "the presence exactly once"
    ids = [int(t) for t, _ in svc2.accepted()]
    assert ids == sorted(set(ids)), "each transaction ID accepted once"

    # Acknowledged: not sent again, also not after another restart.
    seen = len(svc2.wire)
    done_ids = {t for t, _ in svc2.accepted()}
    hs.restart()
    time.sleep(2)
    assert not any(is_receipt(e) or is_presence(e) for e in _ephemeral_of(svc2.wire[seen:]))
    assert not any(w[0] in done_ids for w in svc2.wire[seen:]), "no acknowledged ID sent again"


def test_namespaces_and_masquerading(bridge: Bridge) -> None:
    hs, svc = bridge.hs, bridge.service
    assert svc is not None
    alice = ClientUser(hs, "alice")

    # The service's sender exists and is who the as_token acts as.
    status, body = bridge.as_req("GET", "/account/whoami")
    assert (status, body["user_id"]) == (200, "@bridgebot:localhost"), body
    # Masquerading outside the namespace is refused, inside it works.
    status, body = bridge.as_req("GET", "/account/whoami", user_id=alice.user_id)
    assert (status, body["errcode"]) == (403, "M_FORBIDDEN"), body
    status, body = bridge.as_req("GET", "/account/whoami", user_id="@bridge_nobody:localhost")
    assert (status, body["errcode"]) == (403, "M_FORBIDDEN"), body
    status, body = bridge.as_req("POST", "/register", {"type": "m.login.application_service",
                                                       "username": "bridge_dave", "inhibit_login": True})
    assert status == 200 and body == {"user_id": "@bridge_dave:localhost", "home_server": "localhost"}, body
    status, body = bridge.as_req("GET", "/account/whoami", user_id="@bridge_dave:localhost")
    assert (status, body["user_id"]) == (200, "@bridge_dave:localhost")
    # The service may only register in its namespace.
    status, body = bridge.as_req("POST", "/register", {"type": "m.login.application_service", "username": "eve"})
    assert (status, body["errcode"]) == (400, "M_EXCLUSIVE"), body

    # Ordinary registration and alias creation in the exclusive namespaces.
    status, body = hs.request("POST", CS + "/register", {"username": "bridge_mallory", "password": "pw long enough",
                                                         "auth": {"type": "m.login.dummy"}})
    assert (status, body["errcode"]) == (400, "M_EXCLUSIVE"), body
    status, body = hs.request("GET", CS + "/register/available?username=bridge_mallory")
    assert (status, body["errcode"]) == (400, "M_EXCLUSIVE"), body
    room_id = alice.ok("POST", "/createRoom", {})["room_id"]
    status, body = alice.req("PUT", f"/directory/room/{q('#bridge_room:localhost')}", {"room_id": room_id})
    assert (status, body["errcode"]) == (400, "M_EXCLUSIVE"), body

    # Appservice login, and device masquerading onto a device that exists.
    status, body = hs.request("POST", CS + "/login", {"type": "m.login.application_service",
                                                      "identifier": {"type": "m.id.user", "user": "bridge_dave"}},
                              token=AS_TOKEN)
    assert status == 200 and body["user_id"] == "@bridge_dave:localhost", body
    device = body["device_id"]
    status, body = bridge.as_req("GET", "/account/whoami", user_id="@bridge_dave:localhost", device_id=device)
    assert (status, body.get("device_id")) == (200, device), body
    status, body = bridge.as_req("GET", "/account/whoami", user_id="@bridge_dave:localhost", device_id="NOPE")
    assert status == 400 and body["errcode"] == "M_UNKNOWN_DEVICE", body
    status, body = hs.request("POST", CS + "/login", {"type": "m.login.application_service",
                                                      "identifier": {"type": "m.id.user", "user": "bridge_dave"}},
                              token=alice.token)
    assert status == 401, body

    # A user query: an unknown user in the namespace is asked of the service,
    # which registers it; one it does not know stays unknown.
    status, body = alice.req("GET", f"/profile/{q('@bridge_zoe:localhost')}")
    assert status == 200, body
    assert "@bridge_zoe:localhost" in svc.user_queries
    status, _ = bridge.as_req("GET", "/account/whoami", user_id="@bridge_zoe:localhost")
    assert status == 200
    status, body = alice.req("GET", f"/profile/{q('@nobody_here:localhost')}")
    assert status == 404 and "@nobody_here:localhost" not in svc.user_queries


@pytest.mark.parametrize("problem", ["bad_regex", "duplicate_token"])
def test_broken_registration_stops_startup(zhome_factory: Any, tmp_path: Path, problem: str) -> None:
    good = _registration(tmp_path, free_port())
    if problem == "bad_regex":
        bad = tmp_path / "broken.yaml"
        bad.write_text(yaml.safe_dump({**yaml.safe_load(good.read_text()), "id": "other", "as_token": "x",
                                       "sender_localpart": "otherbot",
                                       "namespaces": {"users": [{"exclusive": True, "regex": "@(unclosed"}]}}))
        files, key = [str(good), str(bad)], "namespaces.users[0].regex"
    else:
        bad = tmp_path / "copy.yaml"
        bad.write_text(yaml.safe_dump({**yaml.safe_load(good.read_text()), "id": "other",
                                       "sender_localpart": "otherbot"}))
        files, key = [str(good), str(bad)], "as_token"
    hs = zhome_factory(overrides={"app_service_config_files": files})
    with pytest.raises(RuntimeError):
        hs.start()
    lines = [line for line in hs.log().splitlines() if "Start-up failed" in line]
    assert len(lines) == 1, hs.log()
    assert f"{bad}: {key}: " in lines[0]
    assert "Traceback" not in hs.log()


def test_rate_limited_false_exempts_the_service_and_its_ghosts(zhome_factory: Any, tmp_path: Path) -> None:
    hs = zhome_factory(overrides={"app_service_config_files": [str(_registration(tmp_path, free_port(), url=None))]},
                       rate_limits=True)
    hs.start()
    alice = ClientUser(hs, "alice")
    room_id = alice.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"]
    bridge = Bridge(hs, 0)
    status, body = bridge.as_req("POST", "/register", {"type": "m.login.application_service",
                                                       "username": "bridge_fast", "inhibit_login": True})
    assert status == 200, body
    assert bridge.as_req("POST", f"/join/{q(room_id)}", {}, user_id="@bridge_fast:localhost")[0] == 200
    statuses = [bridge.as_req("PUT", f"/rooms/{q(room_id)}/send/m.room.message/g{i}",
                              {"msgtype": "m.text", "body": str(i)}, user_id="@bridge_fast:localhost")[0]
                for i in range(40)]
    assert statuses == [200] * 40
    alice_statuses = [alice.req("PUT", f"/rooms/{q(room_id)}/send/m.room.message/a{i}",
                                {"msgtype": "m.text", "body": str(i)})[0] for i in range(40)]
    assert 429 in alice_statuses, "an ordinary user is still rate limited"
    # No URL: ping says so.
    status, body = hs.request("POST", "/_matrix/client/v1/appservice/testbridge/ping", {}, token=AS_TOKEN)
    assert (status, body["errcode"]) == (400, "M_URL_NOT_SET")


def test_network_room_directory(zhome_factory: Any, tmp_path: Path) -> None:
    hs = zhome_factory(overrides={"app_service_config_files": [str(_registration(tmp_path, free_port(), url=None))]})
    hs.start()
    alice = ClientUser(hs, "alice")
    bridged = alice.ok("POST", "/createRoom", {})["room_id"]
    public = alice.ok("POST", "/createRoom", {"preset": "public_chat", "visibility": "public"})["room_id"]
    bridge = Bridge(hs, 0)
    path = f"/directory/list/appservice/net1/{q(bridged)}"
    assert alice.req("PUT", path, {"visibility": "public"})[0] == 403
    status, body = bridge.as_req("PUT", path, {"visibility": "public"})
    assert status == 200, body

    def listed(**body: Any) -> list[str]:
        return [r["room_id"] for r in alice.ok("POST", "/publicRooms", body)["chunk"]]

    assert listed() == [public]
    assert listed(third_party_instance_id="testbridge|net1") == [bridged]
    assert listed(third_party_instance_id="testbridge|other") == []
    assert set(listed(include_all_networks=True)) == {public, bridged}
    assert bridge.as_req("DELETE", path)[0] == 200
    assert listed(third_party_instance_id="testbridge|net1") == []
    status, body = bridge.as_req("PUT", f"/directory/list/appservice/net1/{q('!nope:localhost')}",
                                 {"visibility": "public"})
    assert status == 404, body
