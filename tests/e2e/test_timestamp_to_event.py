"""GET /_matrix/client/v1/rooms/{roomId}/timestamp_to_event through a real
zhome, on SQLite and PostgreSQL; the federation endpoint of the same name is
tested with the other server-server checks (test_federation_hostile.py).

Spec: client-server-api "GET /_matrix/client/v1/rooms/{roomId}/timestamp_to_event".
"""

from __future__ import annotations

import time

from tests.e2e.harness import ClientUser, ZhomeProcess, q
from tests.e2e.openapi import Spec

V1 = "/_matrix/client/v1"


def _jump(u: ClientUser, room_id: str, ts: int, direction: str) -> tuple[int, dict]:
    return u.hs.request("GET", f"{V1}/rooms/{q(room_id)}/timestamp_to_event?ts={ts}&dir={direction}",
                        token=u.token)


def test_jump_to_a_date(zhome: ZhomeProcess) -> None:
    spec = Spec()
    alice, bob, eve = ClientUser(zhome, "alice"), ClientUser(zhome, "bob"), ClientUser(zhome, "eve")
    room_id = alice.ok("POST", "/createRoom", {"preset": "private_chat", "initial_state": [
        {"type": "m.room.history_visibility", "state_key": "", "content": {"history_visibility": "joined"}}]}
    )["room_id"]
    sent: list[tuple[str, int]] = []
    for i in range(5):
        eid = alice.ok("PUT", f"/rooms/{q(room_id)}/send/m.room.message/t{i}",
                       {"msgtype": "m.text", "body": f"message {i}"})["event_id"]
        ts = alice.ok("GET", f"/rooms/{q(room_id)}/event/{q(eid)}")["origin_server_ts"]
        sent.append((eid, ts))
        time.sleep(0.02)

    # Between message 1 and 2: forwards gives 2, backwards gives 1.
    between = (sent[1][1] + sent[2][1]) // 2 if sent[2][1] > sent[1][1] + 1 else sent[2][1]
    status, body = _jump(alice, room_id, between, "f")
    assert status == 200, body
    spec.validate(body, "/rooms/{roomId}/timestamp_to_event", "get", 200)
    assert body == {"event_id": sent[2][0], "origin_server_ts": sent[2][1]}
    status, body = _jump(alice, room_id, sent[2][1] - 1, "b")
    assert status == 200 and body["event_id"] == sent[1][0], body
    # An exact timestamp is its own answer in both directions.
    assert _jump(alice, room_id, sent[3][1], "f")[1]["event_id"] == sent[3][0]
    assert _jump(alice, room_id, sent[3][1], "b")[1]["event_id"] == sent[3][0]
    # Past the end forwards, and before the room backwards: nothing.
    status, body = _jump(alice, room_id, sent[-1][1] + 60_000, "f")
    assert status == 404 and body["errcode"] == "M_NOT_FOUND", body
    status, body = _jump(alice, room_id, 1, "b")
    assert status == 404 and body["errcode"] == "M_NOT_FOUND", body
    # Far in the past forwards: the room's first event (its creation).
    status, body = _jump(alice, room_id, 1, "f")
    assert status == 200 and alice.ok("GET", f"/rooms/{q(room_id)}/event/{q(body['event_id'])}")["type"] == \
        "m.room.create", body

    # Someone outside the room may not ask.
    status, body = _jump(eve, room_id, sent[0][1], "f")
    assert status == 403 and body["errcode"] == "M_FORBIDDEN", body
    status, body = _jump(eve, "!nowhere:localhost", sent[0][1], "f")
    assert status == 403 and body["errcode"] == "M_FORBIDDEN", body

    # A member who joined later, with history visible from joining only,
    # is shown their own join rather than what came before it.
    alice.ok("POST", f"/rooms/{q(room_id)}/invite", {"user_id": bob.user_id})
    bob.ok("POST", f"/join/{q(room_id)}", {})
    status, body = _jump(bob, room_id, sent[0][1], "f")
    assert status == 200, body
    seen = bob.ok("GET", f"/rooms/{q(room_id)}/event/{q(body['event_id'])}")
    assert seen["type"] == "m.room.member" and seen["state_key"] == bob.user_id, seen
    # Backwards from the last message: the messages are hidden from bob; the
    # newest event before them that he may see is the visibility setting
    # itself (visible under the room's earlier, default setting).
    status, body = _jump(bob, room_id, sent[-1][1], "b")
    assert status == 200, body
    assert bob.ok("GET", f"/rooms/{q(room_id)}/event/{q(body['event_id'])}")["type"] == "m.room.history_visibility"


def test_bad_parameters(zhome: ZhomeProcess) -> None:
    alice = ClientUser(zhome, "alice")
    room_id = alice.ok("POST", "/createRoom", {})["room_id"]
    base = f"{V1}/rooms/{q(room_id)}/timestamp_to_event"
    for query, code in (("?ts=5", "M_MISSING_PARAM"), ("?dir=f", "M_MISSING_PARAM"),
                        ("?ts=5&dir=up", "M_INVALID_PARAM"), ("?ts=soon&dir=f", "M_INVALID_PARAM")):
        status, body = zhome.request("GET", base + query, token=alice.token)
        assert status == 400 and body["errcode"] == code, (query, status, body)
    status, body = zhome.request("GET", base + "?ts=5&dir=f")
    assert status == 401 and body["errcode"] == "M_MISSING_TOKEN", body
