"""The requests the synapse-admin web UI (Awesome-Technologies/synapse-admin,
react-admin on the Synapse admin API) makes for logging in, listing users
and rooms, opening a user and a room, and deactivating a user, sent as a
browser on another origin sends them (CORS preflight first), on both
engines. tests/e2e/test_synapse_admin_ui.py drives the real UI; this test
pins down each request shape it depends on, so a regression is named.
"""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tests.e2e.harness import ClientUser, ZhomeProcess, q
from tests.e2e.test_admin_api import PASSWORD, Admin

ORIGIN = "http://127.0.0.1:9"  # the UI's own origin, never the homeserver's
USER_FIELDS = {"name", "displayname", "avatar_url", "is_guest", "admin", "deactivated", "erased", "shadow_banned",
               "creation_ts", "user_type", "locked"}
ROOM_FIELDS = {"room_id", "name", "canonical_alias", "joined_members", "joined_local_members", "version", "creator",
               "encryption", "federatable", "public", "join_rules", "guest_access", "history_visibility",
               "state_events"}


def _preflight(hs: ZhomeProcess, method: str, path: str) -> dict[str, str]:
    req = urllib.request.Request(hs.base_url + path, method="OPTIONS", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization,content-type"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status in (200, 204), (path, r.status)
        return {k.lower(): v for k, v in r.headers.items()}


def _get(admin: Admin, path: str, **params: Any) -> Any:
    return admin.ok("GET", path + ("?" + urllib.parse.urlencode(params) if params else ""))


def test_synapse_admin_ui_requests(zhome: ZhomeProcess, tmp_path: Path) -> None:
    Admin(zhome, "root", tmp_path)
    alice = ClientUser(zhome, "alice")
    alice.ok("PUT", f"/profile/{q(alice.user_id)}/displayname", {"displayname": "Alice Jansen"})
    room = alice.ok("POST", "/createRoom", {"preset": "public_chat", "name": "Ward 5",
                                            "room_alias_name": "ward5"})["room_id"]

    # Every request below comes from another origin with a bearer token.
    for method, path in (("POST", "/_matrix/client/r0/login"), ("GET", "/_synapse/admin/v2/users"),
                         ("POST", f"/_synapse/admin/v1/deactivate/{q(alice.user_id)}"),
                         ("PUT", f"/_synapse/admin/v2/users/{q(alice.user_id)}")):
        headers = _preflight(zhome, method, path)
        assert headers.get("access-control-allow-origin") in ("*", ORIGIN), (path, headers)
        assert method in headers.get("access-control-allow-methods", ""), (path, headers)
        allowed = headers.get("access-control-allow-headers", "").lower()
        assert "authorization" in allowed and "content-type" in allowed, (path, headers)

    # Errors reach the UI too (a browser hides an answer without CORS headers from it).
    req = urllib.request.Request(zhome.base_url + "/_synapse/admin/v2/users", headers={
        "Origin": ORIGIN, "Authorization": f"Bearer {alice.token}"})
    try:
        urllib.request.urlopen(req, timeout=30)
        raise AssertionError("a non-admin listed the users")
    except urllib.error.HTTPError as e:
        assert e.code == 403 and e.headers["Access-Control-Allow-Origin"] in ("*", ORIGIN)

    # The login page: versions, the login flows, then a password login
    # through the r0 path with device_id null (none stored yet).
    assert zhome.request("GET", "/_matrix/client/versions")[0] == 200
    flows = zhome.request("GET", "/_matrix/client/r0/login")[1]["flows"]
    assert {"type": "m.login.password"} in [{"type": f["type"]} for f in flows]
    status, login = zhome.request("POST", "/_matrix/client/r0/login", {
        "device_id": None, "initial_device_display_name": "Synapse Admin", "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": "root"}, "password": PASSWORD},
        headers={"Origin": ORIGIN})
    assert status == 200, login
    assert {"access_token", "user_id", "device_id", "home_server"} <= set(login)
    admin = Admin.__new__(Admin)
    admin.hs, admin.user_id, admin.token = zhome, login["user_id"], login["access_token"]
    assert _get(admin, "/_synapse/admin/v1/server_version")["server_version"]

    # The users list, with its default filters and sort.
    for version in ("v2", "v3"):
        page = _get(admin, f"/_synapse/admin/{version}/users", **{
            "from": 0, "limit": 10, "guests": "true", "deactivated": "false", "locked": "false",
            "order_by": "name", "dir": "f", "name": "alice"})
        assert page["total"] == 1 and [u["name"] for u in page["users"]] == [alice.user_id], page
        assert USER_FIELDS <= set(page["users"][0]), page["users"][0]
        for order_by in ("name", "displayname", "is_guest", "admin", "deactivated", "locked", "creation_ts",
                         "avatar_url", "user_type", "shadow_banned"):
            _get(admin, f"/_synapse/admin/{version}/users", order_by=order_by, dir="b", limit=10)

    # The rooms list, sorted by each column it can sort on.
    rooms = _get(admin, "/_synapse/admin/v1/rooms", **{"from": 0, "limit": 10, "order_by": "name", "dir": "f"})
    assert rooms["total_rooms"] == 1 and [r["room_id"] for r in rooms["rooms"]] == [room]
    assert ROOM_FIELDS <= set(rooms["rooms"][0]) and rooms["rooms"][0]["name"] == "Ward 5"
    assert _get(admin, "/_synapse/admin/v1/rooms", search_term="ward")["total_rooms"] == 1
    for order_by in ("name", "encryption", "joined_members", "joined_local_members", "state_events", "version",
                     "federatable", "public", "canonical_alias", "creator", "join_rules", "guest_access",
                     "history_visibility", "alphabetical", "size"):
        _get(admin, "/_synapse/admin/v1/rooms", order_by=order_by, dir="b", limit=10)

    # A room's page: details, members, state, forward extremities.
    detail = _get(admin, f"/_synapse/admin/v1/rooms/{q(room)}")
    assert detail["room_id"] == room and detail["canonical_alias"] == "#ward5:localhost"
    paging = {"from": 0, "limit": 25, "order_by": "id", "dir": "f"}
    members = _get(admin, f"/_synapse/admin/v1/rooms/{q(room)}/members", **paging)
    assert members["members"] == [alice.user_id] and members["total"] == 1
    state = _get(admin, f"/_synapse/admin/v1/rooms/{q(room)}/state", **paging)["state"]
    assert {"m.room.create", "m.room.name"} <= {e["type"] for e in state}
    assert all({"event_id", "type", "state_key", "sender", "origin_server_ts", "content"} <= set(e) for e in state)
    fwd = _get(admin, f"/_synapse/admin/v1/rooms/{q(room)}/forward_extremities", **paging)
    assert fwd["count"] == len(fwd["results"]) >= 1
    assert all({"event_id", "state_group", "depth", "received_ts"} <= set(e) for e in fwd["results"]), fwd

    # A user's page and each of its tabs.
    user = _get(admin, f"/_synapse/admin/v2/users/{q(alice.user_id)}")
    assert user["displayname"] == "Alice Jansen" and user["threepids"] == [] and user["external_ids"] == []
    devices = _get(admin, f"/_synapse/admin/v2/users/{q(alice.user_id)}/devices", **paging)
    assert devices["total"] == len(devices["devices"]) == 1
    assert _get(admin, f"/_synapse/admin/v1/whois/{q(alice.user_id)}")["user_id"] == alice.user_id
    media = _get(admin, f"/_synapse/admin/v1/users/{q(alice.user_id)}/media",
                 **{"from": 0, "limit": 50, "order_by": "created_ts", "dir": "b"})
    assert media == {"media": [], "total": 0}
    joined = _get(admin, f"/_synapse/admin/v1/users/{q(alice.user_id)}/joined_rooms", **paging)
    assert joined == {"joined_rooms": [room], "total": 1}
    alice.ok("POST", "/pushers/set", {"kind": "http", "app_id": "org.example.app", "app_display_name": "Ward app",
                                      "device_display_name": "ward phone", "pushkey": "pk1", "lang": "nl",
                                      "profile_tag": "tag", "data": {"url": "http://127.0.0.1:9/_matrix/push/v1/notify",
                                                                     "format": "event_id_only"}})
    pushers = _get(admin, f"/_synapse/admin/v1/users/{q(alice.user_id)}/pushers", **paging)
    assert pushers["total"] == 1 and pushers["pushers"][0]["pushkey"] == "pk1", pushers
    assert {"app_display_name", "app_id", "data", "device_display_name", "kind", "lang", "profile_tag",
            "pushkey"} <= set(pushers["pushers"][0])
    assert pushers["pushers"][0]["data"]["url"].endswith("/notify")
    status, out = zhome.request("GET", f"/_synapse/admin/v1/users/{q(alice.user_id)}/pushers", token=alice.token)
    assert (status, out["errcode"]) == (403, "M_FORBIDDEN")
    status, out = admin.req("GET", f"/_synapse/admin/v1/users/{q('@x:elsewhere.example')}/pushers")
    assert (status, out["errcode"]) == (400, "M_INVALID_PARAM")

    # The edit form's save sends the whole record back, with fields of its own.
    record = {**user, "id": user["name"], "is_guest": False, "admin": False, "deactivated": False,
              "creation_ts_ms": user["creation_ts"] * 1000, "displayname": "Alice J."}
    record = {k: v for k, v in record.items() if v is not None or k == "user_type"}
    saved = admin.ok("PUT", f"/_synapse/admin/v2/users/{q(alice.user_id)}", record)
    assert saved["displayname"] == "Alice J." and saved["deactivated"] is False

    # Deactivating: the erase button's request.
    done = admin.ok("POST", f"/_synapse/admin/v1/deactivate/{q(alice.user_id)}", {"erase": True})
    assert done["id_server_unbind_result"] == "success"
    user = _get(admin, f"/_synapse/admin/v2/users/{q(alice.user_id)}")
    assert user["deactivated"] is True and user["erased"] is True
    assert _get(admin, "/_synapse/admin/v2/users", deactivated="false", name="alice")["total"] == 0
