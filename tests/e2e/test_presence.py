"""Presence through a real zhome on SQLite and PostgreSQL.

Spec: client-server-api "Presence" (GET/PUT /presence/{userId}/status,
``set_presence`` on /sync, ``m.presence`` in /sync's ``presence``).
"""

from __future__ import annotations

import json
import time
from typing import Any, Optional
from urllib.parse import quote

from tests.e2e.harness import ClientUser, ZhomeProcess


def q(s: str) -> str:
    return quote(s, safe="")


def sync(u: ClientUser, since: Optional[str] = None, **params: str) -> dict[str, Any]:
    path = "/sync?timeout=0"
    if since:
        path += "&since=" + q(since)
    for k, v in params.items():
        path += f"&{k}={q(v)}"
    return dict(u.ok("GET", path))


def presence_of(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["sender"]: e["content"] for e in body["presence"]["events"] if e["type"] == "m.presence"}


def status(u: ClientUser, who: ClientUser) -> tuple[int, Any]:
    return u.req("GET", f"/presence/{q(who.user_id)}/status")


def test_set_and_get_presence(zhome: ZhomeProcess) -> None:
    alice = ClientUser(zhome, "alice")
    code, body = status(alice, alice)
    assert code == 200 and body["presence"] == "offline", body

    alice.ok("PUT", f"/presence/{q(alice.user_id)}/status", {"presence": "online", "status_msg": "at my desk"})
    body = alice.ok("GET", f"/presence/{q(alice.user_id)}/status")
    assert body["presence"] == "online" and body["status_msg"] == "at my desk", body
    assert isinstance(body["last_active_ago"], int) and 0 <= body["last_active_ago"] < 60_000, body
    assert body["currently_active"] is True

    # The status message stays when only the state changes; null clears it.
    alice.ok("PUT", f"/presence/{q(alice.user_id)}/status", {"presence": "unavailable"})
    body = alice.ok("GET", f"/presence/{q(alice.user_id)}/status")
    assert body["presence"] == "unavailable" and body["status_msg"] == "at my desk", body
    assert body["currently_active"] is False
    alice.ok("PUT", f"/presence/{q(alice.user_id)}/status", {"presence": "unavailable", "status_msg": None})
    assert "status_msg" not in alice.ok("GET", f"/presence/{q(alice.user_id)}/status")

    # Kept across a restart: it lives in the database.
    alice.ok("PUT", f"/presence/{q(alice.user_id)}/status", {"presence": "online", "status_msg": "back"})
    zhome.restart()
    body = alice.ok("GET", f"/presence/{q(alice.user_id)}/status")
    assert body["presence"] == "online" and body["status_msg"] == "back", body


def test_presence_validation(zhome: ZhomeProcess) -> None:
    alice = ClientUser(zhome, "alice")
    bob = ClientUser(zhome, "bob")
    path = f"/presence/{q(alice.user_id)}/status"
    for bad in ({"presence": "asleep"}, {"presence": 3}, {}, {"presence": "online", "status_msg": 5}):
        code, body = alice.req("PUT", path, bad)
        assert code == 400 and body["errcode"] in ("M_INVALID_PARAM", "M_BAD_JSON"), (bad, code, body)
    code, body = zhome.request("PUT", "/_matrix/client/v3" + path, raw=b"{not json", token=alice.token)
    assert code == 400 and body["errcode"] == "M_NOT_JSON", body
    # Nobody sets another user's presence.
    code, body = bob.req("PUT", path, {"presence": "online"})
    assert code == 403 and body["errcode"] == "M_FORBIDDEN", body
    assert alice.ok("GET", path)["presence"] == "offline"
    # Nor reads that of a user they share no room with; unknown users are 404.
    code, body = status(bob, alice)
    assert code == 403 and body["errcode"] == "M_FORBIDDEN", body
    code, body = alice.req("GET", f"/presence/{q('@nobody:localhost')}/status")
    assert code == 404 and body["errcode"] == "M_NOT_FOUND", body
    code, body = alice.req("GET", "/presence/not-a-user/status")
    assert code == 400, body
    # A bad set_presence on /sync is a 400 too.
    code, body = alice.req("GET", "/sync?set_presence=asleep")
    assert code == 400 and body["errcode"] == "M_INVALID_PARAM", body


def test_presence_in_sync(zhome: ZhomeProcess) -> None:
    alice = ClientUser(zhome, "alice")
    bob = ClientUser(zhome, "bob")
    carol = ClientUser(zhome, "carol")

    # A sync marks the user online; they see themself in it.
    first = sync(alice)
    assert presence_of(first)[alice.user_id]["presence"] == "online", first["presence"]
    assert alice.ok("GET", f"/presence/{q(alice.user_id)}/status")["presence"] == "online"
    # Nothing changed: the next sync has no presence at all.
    again = sync(alice, first["next_batch"])
    assert presence_of(again) == {}, again["presence"]

    # set_presence=offline does not mark a user online.
    body = sync(carol, set_presence="offline")
    assert presence_of(body).get(carol.user_id, {}).get("presence", "offline") == "offline"
    assert carol.ok("GET", f"/presence/{q(carol.user_id)}/status")["presence"] == "offline"

    room = alice.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"]
    a_pos = sync(alice, again["next_batch"])["next_batch"]
    b_first = sync(bob)
    bob.ok("POST", f"/join/{q(room)}", {})
    # Bob sees alice's presence with the room he joined, alice sees his.
    b_body = sync(bob, b_first["next_batch"])
    assert presence_of(b_body).get(alice.user_id, {}).get("presence") == "online", b_body["presence"]
    a_body = sync(alice, a_pos)
    assert presence_of(a_body).get(bob.user_id, {}).get("presence") == "online", a_body["presence"]

    # A change wakes a waiting sync of a room member and shows there.
    start = time.monotonic()
    bob.ok("PUT", f"/presence/{q(bob.user_id)}/status", {"presence": "unavailable", "status_msg": "lunch"})
    a_body = sync(alice, a_body["next_batch"])
    content = presence_of(a_body)[bob.user_id]
    assert content["presence"] == "unavailable" and content["status_msg"] == "lunch", content
    assert "last_active_ago" in content
    # set_presence=unavailable from /sync.
    sync(carol, set_presence="unavailable")
    assert carol.ok("GET", f"/presence/{q(carol.user_id)}/status")["presence"] == "unavailable"
    # ... which alice does not see: she shares no room with carol.
    a_next = sync(alice, a_body["next_batch"])
    assert carol.user_id not in presence_of(a_next)
    # Alice now may read bob's presence directly.
    assert status(alice, bob)[1]["presence"] == "unavailable"
    assert time.monotonic() - start < 20

    # A filter that leaves presence out gets none.
    flt = json.dumps({"presence": {"types": []}})
    assert sync(bob, filter=flt)["presence"]["events"] == []
    flt = json.dumps({"presence": {"not_senders": [bob.user_id]}})
    assert bob.user_id not in presence_of(sync(bob, filter=flt))

    # Tokens issued before presence existed (four parts) still work.
    parts = a_next["next_batch"].split("_")
    old = "_".join(parts[:4])
    code, body = alice.req("GET", f"/sync?timeout=0&since={q(old)}")
    assert code == 200, body
    code, body = alice.req("GET", "/sync?timeout=0&since=s1_2_3")
    assert code == 400 and body["errcode"] == "M_INVALID_PARAM", body


def test_presence_disabled(zhome_factory: Any) -> None:
    hs = zhome_factory(overrides={"presence": {"enabled": False}}).start()
    alice = ClientUser(hs, "alice")
    body = sync(alice)
    assert body["presence"]["events"] == []
    alice.ok("PUT", f"/presence/{q(alice.user_id)}/status", {"presence": "online"})
    assert alice.ok("GET", f"/presence/{q(alice.user_id)}/status")["presence"] == "offline"
