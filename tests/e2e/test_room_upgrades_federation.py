"""A room upgrade seen from another server (zhome_pair: A 127.0.0.2, B
127.0.0.3), on SQLite and PostgreSQL: B's member gets the tombstone over
federation and follows it into the replacement room, joining through the
upgrading user's server as the spec tells clients to.

Spec: client-server-api "Room Upgrades".
"""

from __future__ import annotations

import time
from typing import Any, Callable

from tests.e2e.conftest import ZhomeServers
from tests.e2e.harness import ClientUser, q


def wait_for(pred: Callable[[], Any], what: str, wait_s: float = 30.0) -> Any:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"not reached within {wait_s}s: {what}")


def test_remote_member_follows_the_tombstone(zhome_pair: ZhomeServers) -> None:
    a, b = zhome_pair.a, zhome_pair.b
    alice, bob = ClientUser(a, "upalice"), ClientUser(b, "upbob")
    old = alice.ok("POST", "/createRoom", {"room_version": "10", "preset": "public_chat", "name": "Shared"})[
        "room_id"]
    bob.ok("POST", f"/join/{q(old)}?server_name={q(a.server_name)}", {})
    pl = alice.ok("GET", f"/rooms/{q(old)}/state/m.room.power_levels/")
    pl["users"][bob.user_id] = 50
    alice.ok("PUT", f"/rooms/{q(old)}/state/m.room.power_levels/", pl)

    # B's own alias for the room and bob's tag on it, kept by B.
    alias_b = f"#shared-b:{b.server_name}"
    bob.ok("PUT", f"/directory/room/{q(alias_b)}", {"room_id": old})
    bob.ok("PUT", f"/user/{q(bob.user_id)}/rooms/{q(old)}/tags/u.work", {})

    new = alice.ok("POST", f"/rooms/{q(old)}/upgrade", {"new_version": "12"})["replacement_room"]

    def tombstone() -> Any:
        status, body = bob.req("GET", f"/rooms/{q(old)}/state/m.room.tombstone/")
        return body if status == 200 else None

    tomb = wait_for(tombstone, "the tombstone at B")
    assert tomb["replacement_room"] == new
    # The predecessor's sender names the server to join through.
    sender_server = alice.user_id.split(":", 1)[1]
    assert bob.ok("POST", f"/join/{q(new)}?via={q(sender_server)}", {})["room_id"] == new
    # B follows the upgrade as its user does.
    assert bob.ok("GET", f"/directory/room/{q(alias_b)}")["room_id"] == new
    assert bob.ok("GET", f"/user/{q(bob.user_id)}/rooms/{q(new)}/tags")["tags"] == {"u.work": {}}
    create = bob.ok("GET", f"/rooms/{q(new)}/state/m.room.create/")
    assert create["predecessor"]["room_id"] == old and create["room_version"] == "12"
    assert bob.ok("GET", f"/rooms/{q(new)}/state/m.room.name/") == {"name": "Shared"}
    # The moderator's level came along.
    bob.ok("PUT", f"/rooms/{q(new)}/state/m.room.topic/", {"topic": "from B"})
    wait_for(lambda: alice.req("GET", f"/rooms/{q(new)}/state/m.room.topic/")[1].get("topic") == "from B",
             "B's topic at A")
    # B has the old room closed to ordinary members too.
    wait_for(lambda: bob.ok("GET", f"/rooms/{q(old)}/state/m.room.power_levels/").get("events_default") == 50,
             "the old room's raised events_default at B")
