"""Invite permissions on running zhomes, both engines: a user (or an admin
for them) allows or blocks invites by user-ID and server-name patterns,
with a default; refused invites are refused before anything is stored,
locally (``/invite``, ``/createRoom``, a member state event) and over
federation (``PUT /_matrix/federation/v2/invite``); bad settings are 400;
the admin's changes are audited; deactivation forgets the setting.
"""

from __future__ import annotations

import time
import urllib.parse
from pathlib import Path
from typing import Any

from tests.e2e.conftest import ZhomeServers
from tests.e2e.harness import CS, ClientUser, ZhomeProcess, q
from tests.e2e.test_admin_api import Admin

OWN = "/_zhome/client/v1/invite_permissions"
DEFAULTS = {"default": "allow", "allowed_users": [], "blocked_users": [], "allowed_servers": [],
            "blocked_servers": []}
WAIT_S = 30.0


def _set(user: ClientUser, settings: dict[str, Any]) -> dict[str, Any]:
    status, out = user.hs.request("PUT", OWN, settings, token=user.token)
    assert status == 200, (settings, status, out)
    return dict(out)


def _invite(inviter: ClientUser, room: str, invitee: ClientUser) -> tuple[int, Any]:
    return inviter.req("POST", f"/rooms/{q(room)}/invite", {"user_id": invitee.user_id})


def _refused(got: tuple[int, Any], invitee: ClientUser) -> None:
    status, out = got
    assert (status, out.get("errcode")) == (403, "M_FORBIDDEN"), got
    assert invitee.user_id in out["error"] and "invite" in out["error"], out


def _invited_rooms(user: ClientUser) -> set[str]:
    return set(user.ok("GET", "/sync?timeout=0")["rooms"].get("invite", {}))


def _member_state(user: ClientUser, room: str, target: ClientUser) -> int:
    return user.req("GET", f"/rooms/{q(room)}/state/m.room.member/{q(target.user_id)}")[0]


def test_local_invites_by_user_and_server_pattern(zhome: ZhomeProcess, tmp_path: Path) -> None:
    admin = Admin(zhome, "root", tmp_path)
    alice, bob, carol, dave = (ClientUser(zhome, n) for n in ("alice", "bob", "carol", "dave"))
    assert alice.hs.request("GET", OWN, token=alice.token) == (200, DEFAULTS)
    room = bob.ok("POST", "/createRoom", {"preset": "private_chat"})["room_id"]

    # Block one user: bob's invite is refused and nothing is stored.
    got = _set(alice, {"blocked_users": ["@bob:localhost"]})
    assert got == {**DEFAULTS, "blocked_users": ["@bob:localhost"], "set_by": alice.user_id,
                   "set_ts": got["set_ts"]}
    _refused(_invite(bob, room, alice), alice)
    assert _member_state(bob, room, alice) == 404
    _refused(bob.req("PUT", f"/rooms/{q(room)}/state/m.room.member/{q(alice.user_id)}",
                     {"membership": "invite"}), alice)
    rooms_before = bob.ok("GET", "/joined_rooms")["joined_rooms"]
    for body in ({"invite": [alice.user_id], "is_direct": True, "preset": "trusted_private_chat"},
                 {"invite": [carol.user_id, alice.user_id]}):
        _refused(bob.req("POST", "/createRoom", body), alice)
    assert bob.ok("GET", "/joined_rooms")["joined_rooms"] == rooms_before  # no room was made
    assert _invited_rooms(alice) == set() and _invited_rooms(carol) == set()
    # Others may invite her, into bob's room too.
    bob.ok("POST", f"/rooms/{q(room)}/invite", {"user_id": carol.user_id})
    carol.ok("POST", f"/join/{q(room)}", {})
    assert _invite(carol, room, alice)[0] == 200
    assert room in _invited_rooms(alice)
    dm = carol.ok("POST", "/createRoom", {"invite": [alice.user_id], "is_direct": True})["room_id"]
    assert dm in _invited_rooms(alice)

    # Block all but the allowed: a user pattern.
    _set(alice, {"default": "block", "allowed_users": ["@car*:localhost"]})
    room2 = dave.ok("POST", "/createRoom", {})["room_id"]
    _refused(_invite(dave, room2, alice), alice)
    room3 = carol.ok("POST", "/createRoom", {})["room_id"]
    assert _invite(carol, room3, alice)[0] == 200

    # A server pattern: all of localhost blocked, one user from it allowed.
    _set(alice, {"blocked_servers": ["local*"], "allowed_users": ["@dave:localhost"]})
    assert _invite(dave, room2, alice)[0] == 200
    room4 = carol.ok("POST", "/createRoom", {})["room_id"]
    _refused(_invite(carol, room4, alice), alice)
    # ... and a user blocked within an allowed server.
    _set(alice, {"default": "block", "allowed_servers": ["localhost"], "blocked_users": ["@carol:localhost"]})
    _refused(_invite(carol, room4, alice), alice)
    assert bob.ok("POST", "/createRoom", {"invite": [alice.user_id]})["room_id"] in _invited_rooms(alice)

    # Server notices reach her whatever she set.
    _set(alice, {"default": "block"})
    admin.ok("POST", "/_synapse/admin/v1/send_server_notice",
             {"user_id": alice.user_id, "content": {"msgtype": "m.text", "body": "Maintenance"}})
    invited = alice.ok("GET", "/sync?timeout=0")["rooms"]["invite"]
    assert any(any(e.get("sender") == "@server-notices:localhost" for e in r["invite_state"]["events"])
               for r in invited.values()), invited

    # An admin sets it for her; that is audited.
    path = f"/_zhome/admin/v1/users/{q(alice.user_id)}/invite_permissions"
    assert admin.ok("GET", path)["default"] == "block"
    got = admin.ok("PUT", path, {"default": "allow"})
    assert got == {**DEFAULTS, "set_by": admin.user_id, "set_ts": got["set_ts"]}
    assert alice.hs.request("GET", OWN, token=alice.token)[1]["set_by"] == admin.user_id
    assert _invite(carol, room4, alice)[0] == 200
    status, out = zhome.request("PUT", path, {"default": "block"}, token=bob.token)
    assert (status, out["errcode"]) == (403, "M_FORBIDDEN")
    assert zhome.request("GET", path, token=bob.token)[0] == 403
    assert admin.ok("GET", path)["default"] == "allow"
    for user_id, code in (("@alice:elsewhere.example", "M_INVALID_PARAM"), ("@ghost:localhost", "M_NOT_FOUND")):
        status, out = admin.req("PUT", f"/_zhome/admin/v1/users/{q(user_id)}/invite_permissions", {})
        assert out["errcode"] == code, (user_id, status, out)
    entries: list[dict[str, Any]] = []
    for _ in range(50):
        entries = admin.ok("GET", f"/_zhome/admin/v1/audit?user_id={q(alice.user_id)}")["entries"]
        if any(e["action"] == "PUT zadmin_invite_permissions" for e in entries):
            break
        time.sleep(0.1)
    assert (admin.user_id, "PUT zadmin_invite_permissions", {"user_id": alice.user_id}, "200") in [
        (e["actor"], e["action"], e["target"], e["outcome"]) for e in entries], entries
    own = [e for e in admin.ok("GET", f"/_zhome/admin/v1/audit?user_id={q(alice.user_id)}")["entries"]
           if e["action"] == "PUT invite_permissions"]
    assert own and all(e["actor"] == alice.user_id and e["outcome"] == "200" for e in own)

    # Deactivation forgets the setting.
    _set(alice, {"default": "block"})
    admin.ok("POST", f"/_synapse/admin/v1/deactivate/{q(alice.user_id)}", {})
    assert admin.ok("GET", path) == DEFAULTS


def test_bad_settings_are_refused_and_change_nothing(zhome: ZhomeProcess, tmp_path: Path) -> None:
    alice = ClientUser(zhome, "alice")
    kept = _set(alice, {"blocked_servers": ["evil.example"]})
    for bad, errcode in (
        ({"blocked_users": "@bob:localhost"}, "M_BAD_JSON"),
        ({"allowed_servers": {"a": 1}}, "M_BAD_JSON"),
        ({"blocked_users": [5]}, "M_BAD_JSON"),
        ({"allowed_users": [None]}, "M_BAD_JSON"),
        ({"default": 1}, "M_BAD_JSON"),
        ({"blocked_user": []}, "M_BAD_JSON"),
        ({"default": "maybe"}, "M_INVALID_PARAM"),
        ({"blocked_users": ["bob"]}, "M_INVALID_PARAM"),
        ({"blocked_users": ["@bob"]}, "M_INVALID_PARAM"),
        ({"blocked_servers": ["@bob:localhost"]}, "M_INVALID_PARAM"),
        ({"blocked_servers": [""]}, "M_INVALID_PARAM"),
        ({"blocked_servers": ["a b"]}, "M_INVALID_PARAM"),
        ({"blocked_servers": ["x" * 256]}, "M_INVALID_PARAM"),
        ({"blocked_servers": ["s.example"] * 1001}, "M_INVALID_PARAM"),
    ):
        status, out = zhome.request("PUT", OWN, bad, token=alice.token)
        assert (status, out.get("errcode")) == (400, errcode), (bad, status, out)
    for raw in (b"[]", b'"x"'):
        status, out = zhome.request("PUT", OWN, raw=raw, token=alice.token)
        assert (status, out["errcode"]) == (400, "M_BAD_JSON"), (raw, out)
    status, out = zhome.request("PUT", OWN, raw=b"{not json", token=alice.token)
    assert (status, out["errcode"]) == (400, "M_NOT_JSON")
    assert zhome.request("GET", OWN, token=alice.token) == (200, kept)
    assert zhome.request("GET", OWN)[0] == 401
    # What a GET answered may be sent back as it is.
    assert _set(alice, kept)["blocked_servers"] == ["evil.example"]


def test_federated_invite_refused_by_server_pattern(zhome_pair: ZhomeServers) -> None:
    a, b = zhome_pair.a, zhome_pair.b
    alice = ClientUser(a, "alice_inv")
    bob = ClientUser(b, "bob_inv")
    room = bob.ok("POST", "/createRoom", {"preset": "private_chat"})["room_id"]
    b_host = b.server_name.rsplit(":", 1)[0]

    _set(alice, {"blocked_servers": [b_host]})
    status, out = _invite(bob, room, alice)
    assert (status, out["errcode"]) == (403, "M_FORBIDDEN"), (status, out)
    assert alice.user_id in out["error"], out  # A's reason, passed on by B
    _refused(bob.req("POST", "/createRoom", {"invite": [alice.user_id], "is_direct": True}), alice)
    assert _invited_rooms(alice) == set()
    assert _member_state(bob, room, alice) == 404
    assert "invite permissions" in out["error"]

    # A user pattern that allows bob wins over the blocked server.
    _set(alice, {"blocked_servers": [b_host], "allowed_users": [f"@bob_*:{b.server_name}"]})
    assert _invite(bob, room, alice)[0] == 200
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and room not in _invited_rooms(alice):
        time.sleep(0.3)
    assert room in _invited_rooms(alice)
    alice.ok("POST", f"/join/{q(room)}?server_name={urllib.parse.quote(b.server_name)}", {})
    assert alice.user_id in bob.ok("GET", f"/rooms/{q(room)}/joined_members")["joined"]

    # Block everyone from elsewhere: B's users are refused again, A's own are not.
    _set(alice, {"default": "block", "allowed_servers": [a.server_name]})
    other = bob.ok("POST", "/createRoom", {"preset": "private_chat"})["room_id"]
    _refused(_invite(bob, other, alice), alice)
    carol = ClientUser(a, "carol_inv")
    local = carol.ok("POST", "/createRoom", {"invite": [alice.user_id]})["room_id"]
    assert local in _invited_rooms(alice)
    assert a.request("GET", CS + "/account/whoami", token=alice.token)[0] == 200
