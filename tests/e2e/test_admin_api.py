"""The admin API on a running zhome, both engines: the spec's server
administration endpoints (whois, lock, suspend) and the Synapse-compatible
``/_synapse/admin`` user endpoints, called as admin tools call them.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import CS, ClientUser, ZhomeProcess, q

PASSWORD = "correct horse battery"


class Admin:
    """An admin account made with ``zhome register-user --admin``, as an operator does."""

    def __init__(self, hs: ZhomeProcess, name: str, tmp: Path) -> None:
        pw = tmp / f"{name}.pw"
        pw.write_text(PASSWORD + "\n")
        subprocess.run([sys.executable, "-m", "zhome", "register-user", "--config-path", str(hs.config_path),
                        "--admin", "--password-file", str(pw), name], check=True, capture_output=True)
        status, body = hs.request("POST", CS + "/login", {
            "type": "m.login.password", "identifier": {"type": "m.id.user", "user": name}, "password": PASSWORD})
        assert status == 200, body
        self.hs = hs
        self.user_id: str = body["user_id"]
        self.token: str = body["access_token"]

    def req(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return self.hs.request(method, path, body, token=self.token)

    def ok(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        got, out = self.req(method, path, body)
        assert got == status, (method, path, got, out)
        return out

    def wait_for_purge(self, purge_id: str) -> str:
        """The status of a history purge once it is no longer "active"
        (polled for at most 10 s)."""
        status = "active"
        for _ in range(100):
            status = str(self.ok("GET", f"/_synapse/admin/v1/purge_history_status/{purge_id}")["status"])
            if status != "active":
                break
            time.sleep(0.1)
        return status


def _login(hs: ZhomeProcess, name: str, password: str = PASSWORD) -> tuple[int, Any]:
    return hs.request("POST", CS + "/login", {
        "type": "m.login.password", "identifier": {"type": "m.id.user", "user": name}, "password": password})


def _users(admin: Admin, version: str = "v2", **params: Any) -> Any:
    return admin.ok("GET", f"/_synapse/admin/{version}/users?" + urllib.parse.urlencode(params, doseq=True))


# Every admin route, with a body where it takes one: a non-admin gets 403
# on each, before any lookup.
ADMIN_ROUTES = [
    ("GET", "/_synapse/admin/v1/server_version", None),
    ("GET", "/_synapse/admin/v2/users", None),
    ("GET", "/_synapse/admin/v3/users", None),
    ("GET", "/_synapse/admin/v2/users/{u}", None),
    ("PUT", "/_synapse/admin/v2/users/{u}", {"displayname": "x"}),
    ("POST", "/_synapse/admin/v1/deactivate/{u}", {}),
    ("POST", "/_synapse/admin/v1/reset_password/{u}", {"new_password": "x"}),
    ("GET", "/_synapse/admin/v1/whois/{u}", None),
    ("GET", "/_matrix/client/v3/admin/whois/{u}", None),
    ("GET", "/_synapse/admin/v1/users/{u}/joined_rooms", None),
    ("GET", "/_synapse/admin/v1/users/{u}/pushers", None),
    ("GET", "/_synapse/admin/v1/rooms/%21r%3Alocalhost/forward_extremities", None),
    ("GET", "/_zhome/admin/v1/users/{u}/invite_permissions", None),
    ("PUT", "/_zhome/admin/v1/users/{u}/invite_permissions", {"default": "block"}),
    ("GET", "/_synapse/admin/v1/users/{u}/admin", None),
    ("PUT", "/_synapse/admin/v1/users/{u}/admin", {"admin": True}),
    ("GET", "/_synapse/admin/v2/users/{u}/devices", None),
    ("POST", "/_synapse/admin/v2/users/{u}/delete_devices", {"devices": []}),
    ("GET", "/_synapse/admin/v2/users/{u}/devices/D", None),
    ("PUT", "/_synapse/admin/v2/users/{u}/devices/D", {"display_name": "x"}),
    ("DELETE", "/_synapse/admin/v2/users/{u}/devices/D", None),
    ("GET", "/_synapse/admin/v1/event_reports", None),
    ("GET", "/_synapse/admin/v1/event_reports/1", None),
    ("DELETE", "/_synapse/admin/v1/event_reports/1", None),
    ("GET", "/_zhome/admin/v1/reports", None),
    ("GET", "/_synapse/admin/v1/registration_tokens", None),
    ("POST", "/_synapse/admin/v1/registration_tokens/new", {}),
    ("GET", "/_synapse/admin/v1/registration_tokens/abc", None),
    ("PUT", "/_synapse/admin/v1/registration_tokens/abc", {"uses_allowed": 1}),
    ("DELETE", "/_synapse/admin/v1/registration_tokens/abc", None),
    ("GET", "/_synapse/admin/v1/media/localhost/abc", None),
    ("DELETE", "/_synapse/admin/v1/media/localhost/abc", None),
    ("POST", "/_synapse/admin/v1/media/quarantine/localhost/abc", {}),
    ("POST", "/_synapse/admin/v1/media/protect/abc", {}),
    ("POST", "/_synapse/admin/v1/media/delete?before_ts=1", {}),
    ("POST", "/_synapse/admin/v1/purge_media_cache?before_ts=1", {}),
    ("GET", "/_synapse/admin/v1/users/{u}/media", None),
    ("DELETE", "/_synapse/admin/v1/users/{u}/media", None),
    ("GET", "/_matrix/client/v1/admin/lock/{u}", None),
    ("PUT", "/_matrix/client/v1/admin/lock/{u}", {"locked": True}),
    ("GET", "/_matrix/client/v1/admin/suspend/{u}", None),
    ("PUT", "/_matrix/client/v1/admin/suspend/{u}", {"suspended": True}),
    ("GET", "/_zhome/admin/v1/encryption", None),
    ("GET", "/_synapse/admin/v1/room/!r:localhost/media", None),
    ("POST", "/_synapse/admin/v1/room/!r:localhost/media/quarantine", {}),
    ("POST", "/_synapse/admin/v1/quarantine_media/!r:localhost", {}),
    ("POST", "/_zhome/admin/v1/encryption/rotate", {}),
]


def test_every_admin_endpoint_refuses_non_admins(zhome: ZhomeProcess, tmp_path: Path) -> None:
    admin = Admin(zhome, "root", tmp_path)
    mallory = ClientUser(zhome, "mallory")
    victim = ClientUser(zhome, "victim")
    for method, path, body in ADMIN_ROUTES:
        for target in (victim.user_id, "@nobody:localhost"):
            p = path.replace("{u}", q(target))
            if "whois" in p and target == mallory.user_id:
                continue
            status, out = zhome.request(method, p, body, token=mallory.token)
            assert (status, out.get("errcode")) == (403, "M_FORBIDDEN"), (method, p, status, out)
            status, out = zhome.request(method, p, body)
            assert status == 401, (method, p, status, out)
    # Nothing changed: the victim is neither locked, suspended, renamed nor an admin.
    got = admin.ok("GET", f"/_synapse/admin/v2/users/{q(victim.user_id)}")
    assert (got["admin"], got["locked"], got["suspended"], got["deactivated"]) == (False, False, False, False)
    assert got["displayname"] == "victim"
    victim.ok("GET", "/account/whoami")
    assert admin.ok("GET", "/_synapse/admin/v1/registration_tokens") == {"registration_tokens": []}


def test_list_users_paging_search_order_and_filters(zhome: ZhomeProcess, tmp_path: Path) -> None:
    admin = Admin(zhome, "root", tmp_path)
    users = [ClientUser(zhome, f"user{i:02d}") for i in range(7)]
    users[3].ok("PUT", f"/profile/{q(users[3].user_id)}/displayname", {"displayname": "Dr. Zoë Visser"})
    admin.ok("POST", f"/_synapse/admin/v1/deactivate/{q(users[5].user_id)}", {})

    page = _users(admin, limit=3)
    assert page["total"] == 7  # root and six active users; the deactivated one is left out by default
    assert [u["name"] for u in page["users"]] == sorted(u["name"] for u in page["users"])
    seen = [u["name"] for u in page["users"]]
    for _ in range(10):
        if "next_token" not in page:
            break
        page = _users(admin, limit=3, **{"from": page["next_token"]})
        seen += [u["name"] for u in page["users"]]
    assert len(seen) == 7 and len(set(seen)) == 7 and users[5].user_id not in seen
    assert "next_token" not in page

    found = _users(admin, name="zoë")["users"]
    assert [u["name"] for u in found] == [users[3].user_id] and found[0]["displayname"] == "Dr. Zoë Visser"
    assert [u["name"] for u in _users(admin, name="user04")["users"]] == [users[4].user_id]
    assert _users(admin, user_id="_")["total"] == 0  # LIKE wildcards are literal

    newest_first = _users(admin, order_by="creation_ts", dir="b", limit=1)["users"]
    assert newest_first[0]["name"] == users[6].user_id
    assert _users(admin, admins="true")["users"][0]["name"] == admin.user_id
    assert admin.user_id not in [u["name"] for u in _users(admin, admins="false")["users"]]

    # v2: deactivated=true adds them; v3: deactivated=true gives only them.
    assert _users(admin, deactivated="true")["total"] == 8
    v3_only = _users(admin, "v3", deactivated="true")
    assert [u["name"] for u in v3_only["users"]] == [users[5].user_id] and v3_only["users"][0]["deactivated"]
    assert _users(admin, "v3")["total"] == 8
    assert _users(admin, "v3", deactivated="false")["total"] == 7

    for bad in ({"order_by": "password_hash"}, {"dir": "sideways"}, {"limit": "-1"}, {"from": "x"},
                {"deactivated": "maybe"}):
        status, out = admin.req("GET", "/_synapse/admin/v2/users?" + urllib.parse.urlencode(bad))
        assert (status, out["errcode"]) == (400, "M_INVALID_PARAM"), (bad, status, out)


def test_create_modify_reset_password_and_deactivate(zhome: ZhomeProcess, tmp_path: Path) -> None:
    admin = Admin(zhome, "root", tmp_path)
    uid = "@carer:localhost"
    made = admin.ok("PUT", f"/_synapse/admin/v2/users/{q(uid)}",
                    {"password": "first password", "displayname": "Care Giver", "admin": False}, status=201)
    assert made["name"] == uid and made["displayname"] == "Care Giver" and made["admin"] is False
    status, login = _login(zhome, "carer", "first password")
    assert status == 200, login
    carer_token = login["access_token"]

    changed = admin.ok("PUT", f"/_synapse/admin/v2/users/{q(uid)}", {"displayname": "Carer", "admin": True})
    assert changed["displayname"] == "Carer" and changed["admin"] is True
    assert zhome.request("GET", CS + f"/profile/{q(uid)}/displayname")[1] == {"displayname": "Carer"}
    assert admin.ok("GET", f"/_synapse/admin/v1/users/{q(uid)}/admin") == {"admin": True}
    admin.ok("PUT", f"/_synapse/admin/v1/users/{q(uid)}/admin", {"admin": False})
    assert admin.ok("GET", f"/_synapse/admin/v2/users/{q(uid)}")["admin"] is False

    # Bad input changes nothing.
    for bad in ({"admin": "yes"}, {"displayname": 5}, {"avatar_url": "http://x/y"}, {"user_type": "robot"},
                {"password": ""}, {"deactivated": "no"}):
        status, out = admin.req("PUT", f"/_synapse/admin/v2/users/{q(uid)}", bad)
        assert status == 400, (bad, status, out)
    assert admin.ok("GET", f"/_synapse/admin/v2/users/{q(uid)}")["displayname"] == "Carer"
    status, out = admin.req("PUT", f"/_synapse/admin/v2/users/{q('@x:elsewhere.example')}", {"password": "p"})
    assert (status, out["errcode"]) == (400, "M_INVALID_PARAM")

    admin.ok("POST", f"/_synapse/admin/v1/reset_password/{q(uid)}", {"new_password": "second password"})
    assert _login(zhome, "carer", "first password")[0] == 403
    assert _login(zhome, "carer", "second password")[0] == 200
    assert zhome.request("GET", CS + "/account/whoami", token=carer_token)[0] == 401  # logged out

    # Deactivation: rooms left, sessions ended, account data and push rules gone.
    owner = ClientUser(zhome, "owner")
    room = owner.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"]
    token = _login(zhome, "carer", "second password")[1]["access_token"]
    assert zhome.request("POST", CS + f"/join/{q(room)}", {}, token=token)[0] == 200
    assert zhome.request("PUT", CS + f"/user/{q(uid)}/account_data/org.example.notes", {"secret": "s3"},
                         token=token)[0] == 200
    assert admin.ok("GET", f"/_synapse/admin/v1/users/{q(uid)}/joined_rooms") == {"joined_rooms": [room],
                                                                                    "total": 1}
    admin.ok("POST", f"/_synapse/admin/v1/deactivate/{q(uid)}", {"erase": True})
    got = admin.ok("GET", f"/_synapse/admin/v2/users/{q(uid)}")
    assert got["deactivated"] is True and got["erased"] is True
    assert zhome.request("GET", CS + "/account/whoami", token=token)[0] == 401
    assert _login(zhome, "carer", "second password")[0] == 403
    assert uid not in owner.ok("GET", f"/rooms/{q(room)}/joined_members")["joined"]
    assert admin.ok("GET", f"/_synapse/admin/v1/users/{q(uid)}/joined_rooms")["total"] == 0

    # Reactivation needs a password; then the account data is still gone.
    status, out = admin.req("PUT", f"/_synapse/admin/v2/users/{q(uid)}", {"deactivated": False})
    assert status == 400, out
    admin.ok("PUT", f"/_synapse/admin/v2/users/{q(uid)}", {"deactivated": False, "password": "third password"})
    token = _login(zhome, "carer", "third password")[1]["access_token"]
    status, out = zhome.request("GET", CS + f"/user/{q(uid)}/account_data/org.example.notes", token=token)
    assert (status, out["errcode"]) == (404, "M_NOT_FOUND"), out


def test_whois_devices_and_joined_rooms(zhome: ZhomeProcess, tmp_path: Path) -> None:
    admin = Admin(zhome, "root", tmp_path)
    alice = ClientUser(zhome, "alice")
    bob = ClientUser(zhome, "bob")
    device = alice.ok("GET", "/account/whoami")["device_id"]
    assert device in alice.ok("GET", f"/admin/whois/{q(alice.user_id)}")["devices"]  # oneself
    assert bob.req("GET", f"/admin/whois/{q(alice.user_id)}")[0] == 403
    got = admin.ok("GET", f"/_synapse/admin/v1/whois/{q(alice.user_id)}")
    assert got["user_id"] == alice.user_id and list(got["devices"]) == [device]
    assert "connections" in got["devices"][device]["sessions"][0]

    base = f"/_synapse/admin/v2/users/{q(alice.user_id)}/devices"
    listed = admin.ok("GET", base)
    assert listed["total"] == 1 and listed["devices"][0]["device_id"] == device
    assert listed["devices"][0]["user_id"] == alice.user_id
    admin.ok("PUT", f"{base}/{q(device)}", {"display_name": "ward tablet"})
    assert admin.ok("GET", f"{base}/{q(device)}")["display_name"] == "ward tablet"
    assert admin.req("GET", f"{base}/NOPE")[0] == 404
    admin.ok("DELETE", f"{base}/{q(device)}")
    assert alice.req("GET", "/account/whoami")[0] == 401
    assert admin.ok("GET", base) == {"devices": [], "total": 0}
    assert admin.req("POST", f"/_synapse/admin/v2/users/{q(bob.user_id)}/delete_devices",
                     {"devices": "all"})[0] == 400
    bob_device = bob.ok("GET", "/account/whoami")["device_id"]
    admin.ok("POST", f"/_synapse/admin/v2/users/{q(bob.user_id)}/delete_devices", {"devices": [bob_device]})
    assert bob.req("GET", "/account/whoami")[0] == 401
    assert admin.req("GET", f"/_synapse/admin/v2/users/{q('@ghost:localhost')}/devices")[0] == 404


def test_lock_keeps_sessions_but_refuses_everything_but_logout(zhome: ZhomeProcess, tmp_path: Path) -> None:
    admin = Admin(zhome, "root", tmp_path)
    alice = ClientUser(zhome, "alice")
    path = f"/_matrix/client/v1/admin/lock/{q(alice.user_id)}"
    assert admin.ok("GET", path) == {"locked": False}
    assert admin.ok("PUT", path, {"locked": True}) == {"locked": True}
    assert admin.ok("GET", path) == {"locked": True}
    for method, p in (("GET", "/account/whoami"), ("GET", "/sync"), ("POST", "/createRoom")):
        status, out = alice.req(method, p, {} if method == "POST" else None)
        assert (status, out["errcode"], out.get("soft_logout")) == (401, "M_USER_LOCKED", True), (p, out)
    assert admin.ok("GET", f"/_synapse/admin/v2/users/{q(alice.user_id)}")["locked"] is True
    admin.ok("PUT", path, {"locked": False})
    alice.ok("GET", "/account/whoami")  # the same token works again

    other_admin = Admin(zhome, "root2", tmp_path)
    status, out = admin.req("PUT", f"/_matrix/client/v1/admin/lock/{q(other_admin.user_id)}", {"locked": True})
    assert (status, out["errcode"]) == (403, "M_FORBIDDEN")
    status, out = admin.req("GET", f"/_matrix/client/v1/admin/lock/{q('@x:elsewhere.example')}")
    assert (status, out["errcode"]) == (400, "M_INVALID_PARAM")
    status, out = admin.req("GET", f"/_matrix/client/v1/admin/lock/{q('@ghost:localhost')}")
    assert (status, out["errcode"]) == (404, "M_NOT_FOUND")
    assert admin.req("PUT", path, {"locked": "yes"})[0] == 400

    admin.ok("PUT", path, {"locked": True})
    assert alice.req("POST", "/logout", {})[0] == 200  # logging out stays possible


def test_suspended_account_reads_and_leaves_but_does_not_write(zhome: ZhomeProcess, tmp_path: Path) -> None:
    admin = Admin(zhome, "root", tmp_path)
    alice = ClientUser(zhome, "alice")
    room = alice.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"]
    other = alice.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"]
    path = f"/_matrix/client/v1/admin/suspend/{q(alice.user_id)}"
    assert admin.ok("PUT", path, {"suspended": True}) == {"suspended": True}
    assert admin.ok("GET", path) == {"suspended": True}

    for method, p, body in (("PUT", f"/rooms/{q(room)}/send/m.room.message/t1", {"msgtype": "m.text", "body": "x"}),
                            ("POST", "/createRoom", {}),
                            ("PUT", f"/profile/{q(alice.user_id)}/displayname", {"displayname": "new"}),
                            ("PUT", f"/rooms/{q(room)}/state/m.room.topic", {"topic": "t"})):
        status, out = alice.req(method, p, body)
        assert (status, out["errcode"]) == (403, "M_USER_SUSPENDED"), (p, status, out)
    alice.ok("GET", "/sync")
    alice.ok("GET", f"/rooms/{q(room)}/messages?dir=b")
    alice.ok("PUT", f"/user/{q(alice.user_id)}/account_data/org.example.private", {"a": 1})
    alice.ok("POST", f"/rooms/{q(other)}/leave", {})
    assert admin.ok("GET", f"/_synapse/admin/v2/users/{q(alice.user_id)}")["suspended"] is True

    admin.ok("PUT", path, {"suspended": False})
    alice.ok("PUT", f"/rooms/{q(room)}/send/m.room.message/t2", {"msgtype": "m.text", "body": "back"})


def test_server_version_and_moderation_capability(zhome: ZhomeProcess, tmp_path: Path) -> None:
    admin = Admin(zhome, "root", tmp_path)
    assert isinstance(admin.ok("GET", "/_synapse/admin/v1/server_version")["server_version"], str)
    caps = admin.ok("GET", CS + "/capabilities")["capabilities"]
    assert caps["m.account_moderation"] == {"lock": True, "suspend": True}
    alice = ClientUser(zhome, "alice")
    assert "m.account_moderation" not in alice.ok("GET", "/capabilities")["capabilities"]


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_list_users_shape(zhome: ZhomeProcess, tmp_path: Path, version: str) -> None:
    admin = Admin(zhome, "root", tmp_path)
    ClientUser(zhome, "alice")
    got = _users(admin, version)
    row = next(u for u in got["users"] if u["name"] == "@alice:localhost")
    assert set(row) >= {"name", "is_guest", "admin", "user_type", "deactivated", "erased", "shadow_banned",
                        "displayname", "avatar_url", "creation_ts", "locked"}
    assert isinstance(row["creation_ts"], int) and row["displayname"] == "alice"


def test_reports_are_stored_and_read_by_admins(zhome: ZhomeProcess, tmp_path: Path) -> None:
    admin = Admin(zhome, "root", tmp_path)
    alice = ClientUser(zhome, "alice")
    bob = ClientUser(zhome, "bob")
    outsider = ClientUser(zhome, "outsider")
    room = alice.ok("POST", "/createRoom", {"preset": "private_chat", "name": "Ward 3",
                                            "invite": [bob.user_id]})["room_id"]
    bob.ok("POST", f"/join/{q(room)}", {})
    event_id = alice.ok("PUT", f"/rooms/{q(room)}/send/m.room.message/t1",
                        {"msgtype": "m.text", "body": "rude words"})["event_id"]

    bob.ok("POST", f"/rooms/{q(room)}/report/{q(event_id)}", {"reason": "abusive", "score": -100})
    # Someone who cannot see the event cannot report it, and learns nothing.
    status, out = outsider.req("POST", f"/rooms/{q(room)}/report/{q(event_id)}", {"reason": "x"})
    assert (status, out["errcode"]) == (404, "M_NOT_FOUND")
    status, out = bob.req("POST", f"/rooms/{q(room)}/report/{q('$nope')}", {"reason": "x"})
    assert (status, out["errcode"]) == (404, "M_NOT_FOUND")
    for bad in ({"reason": 5}, {"score": 10}, {"score": "low"}):
        assert bob.req("POST", f"/rooms/{q(room)}/report/{q(event_id)}", bad)[0] == 400, bad
    # Rooms and users: 200 whether or not they exist; only real ones are stored.
    outsider.ok("POST", f"/rooms/{q(room)}/report", {"reason": "spam room"})
    outsider.ok("POST", f"/rooms/{q('!nope:localhost')}/report", {"reason": "spam room"})
    outsider.ok("POST", f"/users/{q(alice.user_id)}/report", {"reason": "harasses me"})
    outsider.ok("POST", f"/users/{q('@ghost:localhost')}/report", {"reason": "harasses me"})
    assert outsider.req("POST", f"/users/{q(alice.user_id)}/report", {})[0] == 400

    listed = admin.ok("GET", "/_synapse/admin/v1/event_reports")
    assert listed["total"] == 1
    rep = listed["event_reports"][0]
    assert (rep["event_id"], rep["room_id"], rep["user_id"], rep["sender"], rep["reason"], rep["score"],
            rep["name"]) == (event_id, room, bob.user_id, alice.user_id, "abusive", -100, "Ward 3")
    one = admin.ok("GET", f"/_synapse/admin/v1/event_reports/{rep['id']}")
    assert one["event_json"]["content"]["body"] == "rude words"
    assert admin.ok("GET", "/_synapse/admin/v1/event_reports?user_id=outsider")["total"] == 0
    rooms = admin.ok("GET", "/_zhome/admin/v1/reports?kind=room")["reports"]
    assert [(r["room_id"], r["user_id"]) for r in rooms] == [(room, outsider.user_id)]
    users = admin.ok("GET", "/_zhome/admin/v1/reports?kind=user")["reports"]
    assert [r["target_user_id"] for r in users] == [alice.user_id]

    status, out = zhome.request("GET", "/_synapse/admin/v1/event_reports", token=bob.token)
    assert (status, out["errcode"]) == (403, "M_FORBIDDEN")
    assert zhome.request("DELETE", f"/_synapse/admin/v1/event_reports/{rep['id']}", token=bob.token)[0] == 403
    admin.ok("DELETE", f"/_synapse/admin/v1/event_reports/{rep['id']}")
    assert admin.req("GET", f"/_synapse/admin/v1/event_reports/{rep['id']}")[0] == 404
    assert admin.ok("GET", "/_synapse/admin/v1/event_reports")["total"] == 0


def test_registration_tokens(zhome_factory: Any, tmp_path: Path) -> None:
    hs = zhome_factory(overrides={"registration": {"enable_registration": True,
                                                   "registration_requires_token": True}}).start()
    admin = Admin(hs, "root", tmp_path)
    base = "/_synapse/admin/v1/registration_tokens"
    made = admin.ok("POST", base + "/new", {"token": "ward-3.invite", "uses_allowed": 1})
    assert made == {"token": "ward-3.invite", "uses_allowed": 1, "pending": 0, "completed": 0, "expiry_time": None}
    generated = admin.ok("POST", base + "/new", {"length": 10})
    assert len(generated["token"]) == 10
    for bad in ({"token": "has space"}, {"token": "ward-3.invite"}, {"uses_allowed": -1}, {"expiry_time": 1},
                {"length": 0}):
        assert admin.req("POST", base + "/new", bad)[0] == 400, bad

    def register(name: str, token: str) -> int:
        status, first = hs.request("POST", CS + "/register", {"username": name, "password": PASSWORD})
        assert status == 401, first
        status, _ = hs.request("POST", CS + "/register", {
            "username": name, "password": PASSWORD,
            "auth": {"type": "m.login.registration_token", "token": token, "session": first["session"]}})
        return status

    assert register("newcomer", "ward-3.invite") == 200
    assert admin.ok("GET", base + "/ward-3.invite")["completed"] == 1
    assert register("second", "ward-3.invite") == 401  # used up
    assert [t["token"] for t in admin.ok("GET", base + "?valid=false")["registration_tokens"]] == ["ward-3.invite"]
    admin.ok("PUT", base + "/ward-3.invite", {"uses_allowed": 2})
    assert admin.ok("GET", base + "?valid=true")["registration_tokens"][0]["uses_allowed"] in (None, 2)
    admin.ok("DELETE", base + "/ward-3.invite")
    assert admin.req("GET", base + "/ward-3.invite")[0] == 404
    assert admin.req("DELETE", base + "/ward-3.invite")[0] == 404
    assert len(admin.ok("GET", base)["registration_tokens"]) == 1


def test_rooms_list_details_members_state_and_block(zhome: ZhomeProcess, tmp_path: Path) -> None:
    admin = Admin(zhome, "root", tmp_path)
    alice = ClientUser(zhome, "alice")
    bob = ClientUser(zhome, "bob")
    ward = alice.ok("POST", "/createRoom", {"preset": "public_chat", "name": "Ward 3", "room_alias_name": "ward3",
                                            "topic": "night shift"})["room_id"]
    bob.ok("POST", f"/join/{q(ward)}", {})
    secret = alice.ok("POST", "/createRoom", {
        "preset": "private_chat", "name": "Ärzte",
        "initial_state": [{"type": "m.room.encryption", "state_key": "",
                           "content": {"algorithm": "m.megolm.v1.aes-sha2"}}]})["room_id"]
    unnamed = bob.ok("POST", "/createRoom", {})["room_id"]

    listed = admin.ok("GET", "/_synapse/admin/v1/rooms")
    assert listed["total_rooms"] == 3 and listed["offset"] == 0
    assert [r["room_id"] for r in listed["rooms"]] == [ward, secret, unnamed]  # by name, unnamed last
    w = next(r for r in listed["rooms"] if r["room_id"] == ward)
    assert (w["name"], w["canonical_alias"], w["joined_members"], w["joined_local_members"], w["creator"],
            w["join_rules"], w["public"], w["encryption"], w["federatable"]) == (
        "Ward 3", "#ward3:localhost", 2, 2, alice.user_id, "public", False, None, True)
    assert w["state_events"] >= 6
    s = next(r for r in listed["rooms"] if r["room_id"] == secret)
    assert s["encryption"] == "m.megolm.v1.aes-sha2" and s["join_rules"] == "invite"

    by_size = admin.ok("GET", "/_synapse/admin/v1/rooms?order_by=joined_members&dir=b")["rooms"]
    assert by_size[0]["room_id"] == ward
    page = admin.ok("GET", "/_synapse/admin/v1/rooms?limit=2")
    assert len(page["rooms"]) == 2 and page["next_batch"] == 2
    rest = admin.ok("GET", "/_synapse/admin/v1/rooms?limit=2&from=2")
    assert [r["room_id"] for r in rest["rooms"]] == [unnamed] and "next_batch" not in rest
    assert rest["prev_batch"] == 0
    assert [r["room_id"] for r in admin.ok("GET", "/_synapse/admin/v1/rooms?search_term=WARD")["rooms"]] == [ward]
    assert admin.req("GET", "/_synapse/admin/v1/rooms?order_by=secret")[0] == 400

    details = admin.ok("GET", f"/_synapse/admin/v1/rooms/{q(ward)}")
    assert details["topic"] == "night shift" and details["joined_local_devices"] == 2
    assert admin.ok("GET", f"/_synapse/admin/v1/rooms/{q(ward)}/members") == {
        "members": sorted([alice.user_id, bob.user_id]), "total": 2}
    state = admin.ok("GET", f"/_synapse/admin/v1/rooms/{q(ward)}/state")["state"]
    assert {(e["type"], e["state_key"]) for e in state} >= {("m.room.create", ""), ("m.room.topic", ""),
                                                             ("m.room.member", bob.user_id)}
    assert admin.req("GET", f"/_synapse/admin/v1/rooms/{q('!nope:localhost')}")[0] == 404

    # Blocking: nobody local joins any more; unblocking lets them again.
    carol = ClientUser(zhome, "carol")
    assert admin.ok("GET", f"/_synapse/admin/v1/rooms/{q(ward)}/block") == {"block": False}
    assert admin.ok("PUT", f"/_synapse/admin/v1/rooms/{q(ward)}/block", {"block": True}) == {"block": True}
    assert admin.ok("GET", f"/_synapse/admin/v1/rooms/{q(ward)}/block") == {"block": True,
                                                                            "user_id": admin.user_id}
    status, out = carol.req("POST", f"/join/{q(ward)}", {})
    assert (status, out["errcode"]) == (403, "M_FORBIDDEN"), out
    bob.ok("PUT", f"/rooms/{q(ward)}/send/m.room.message/t1", {"msgtype": "m.text", "body": "still here"})
    assert admin.req("PUT", f"/_synapse/admin/v1/rooms/{q(ward)}/block", {"block": "yes"})[0] == 400
    admin.ok("PUT", f"/_synapse/admin/v1/rooms/{q(ward)}/block", {"block": False})
    carol.ok("POST", f"/join/{q(ward)}", {})
    for path in ("/_synapse/admin/v1/rooms", f"/_synapse/admin/v1/rooms/{q(ward)}",
                 f"/_synapse/admin/v1/rooms/{q(ward)}/members", f"/_synapse/admin/v1/rooms/{q(ward)}/state",
                 f"/_synapse/admin/v1/rooms/{q(ward)}/block"):
        status, out = zhome.request("GET", path, token=carol.token)
        assert (status, out["errcode"]) == (403, "M_FORBIDDEN"), path
    status, out = zhome.request("PUT", f"/_synapse/admin/v1/rooms/{q(ward)}/block", {"block": True},
                                token=carol.token)
    assert status == 403
    assert admin.ok("GET", f"/_synapse/admin/v1/rooms/{q(ward)}/block") == {"block": False}


def test_media_details_quarantine_protect_and_delete(zhome: ZhomeProcess, tmp_path: Path) -> None:
    import time as _time

    admin = Admin(zhome, "root", tmp_path)
    alice = ClientUser(zhome, "alice")

    def upload(data: bytes) -> str:
        status, out = zhome.request("POST", "/_matrix/media/v3/upload?filename=scan.txt", raw=data,
                                    token=alice.token, headers={"Content-Type": "text/plain"})
        assert status == 200, out
        return str(out["content_uri"]).split("/")[-1]

    def download(media_id: str) -> int:
        return zhome.request("GET", f"/_matrix/client/v1/media/download/localhost/{media_id}",
                             token=alice.token)[0]

    first, second, third = upload(b"first file"), upload(b"second file, longer"), upload(b"third")
    info = admin.ok("GET", f"/_synapse/admin/v1/media/localhost/{first}")["media_info"]
    assert (info["user_id"], info["media_length"], info["upload_name"], info["quarantined_by"]) == (
        alice.user_id, 10, "scan.txt", None)
    listed = admin.ok("GET", f"/_synapse/admin/v1/users/{q(alice.user_id)}/media?order_by=media_length&dir=b")
    assert listed["total"] == 3 and listed["media"][0]["media_id"] == second

    admin.ok("POST", f"/_synapse/admin/v1/media/quarantine/localhost/{first}")
    assert download(first) == 404
    assert admin.ok("GET", f"/_synapse/admin/v1/media/localhost/{first}")["media_info"]["quarantined_by"] == \
        admin.user_id
    admin.ok("POST", f"/_synapse/admin/v1/media/unquarantine/localhost/{first}")
    assert download(first) == 200
    admin.ok("POST", f"/_synapse/admin/v1/media/protect/{first}")
    assert admin.req("POST", f"/_synapse/admin/v1/media/quarantine/localhost/{first}")[0] == 400
    assert download(first) == 200

    assert admin.ok("DELETE", f"/_synapse/admin/v1/media/localhost/{third}") == {"deleted_media": [third],
                                                                                 "total": 1}
    assert download(third) == 404
    assert admin.req("DELETE", f"/_synapse/admin/v1/media/localhost/{third}")[0] == 404
    assert admin.req("POST", "/_synapse/admin/v1/media/delete")[0] == 400  # before_ts is required
    # A moment after the uploads, and not ahead of the server's clock (a
    # before_ts in the future is refused).
    _time.sleep(0.01)
    now = int(_time.time() * 1000) - 1
    # The protected file stays; the other one goes.
    assert admin.ok("POST", f"/_synapse/admin/v1/media/delete?before_ts={now}")["deleted_media"] == [second]
    assert download(first) == 200 and download(second) == 404
    assert admin.ok("DELETE", f"/_synapse/admin/v1/users/{q(alice.user_id)}/media")["deleted_media"] == [first]
    assert admin.ok("GET", f"/_synapse/admin/v1/users/{q(alice.user_id)}/media")["total"] == 0
    assert admin.ok("POST", f"/_synapse/admin/v1/purge_media_cache?before_ts={now}") == {"deleted": 0}
    status, out = zhome.request("GET", f"/_synapse/admin/v1/users/{q(alice.user_id)}/media", token=alice.token)
    assert (status, out["errcode"]) == (403, "M_FORBIDDEN")


def test_server_notices(zhome: ZhomeProcess, tmp_path: Path) -> None:
    admin = Admin(zhome, "root", tmp_path)
    alice = ClientUser(zhome, "alice")
    body = {"user_id": alice.user_id, "content": {"msgtype": "m.text", "body": "Maintenance tonight at 22:00"}}
    first = admin.ok("POST", "/_synapse/admin/v1/send_server_notice", body)["event_id"]
    invites = alice.ok("GET", "/sync")["rooms"]["invite"]
    assert len(invites) == 1
    room = next(iter(invites))
    alice.ok("POST", f"/join/{q(room)}", {})
    ev = alice.ok("GET", f"/rooms/{q(room)}/event/{q(first)}")
    assert ev["sender"] == "@server-notices:localhost" and ev["content"]["body"] == "Maintenance tonight at 22:00"
    tags = alice.ok("GET", f"/user/{q(alice.user_id)}/rooms/{q(room)}/tags")["tags"]
    assert "m.server_notice" in tags
    status, out = alice.req("PUT", f"/rooms/{q(room)}/send/m.room.message/t1", {"msgtype": "m.text", "body": "hi"})
    assert (status, out["errcode"]) == (403, "M_FORBIDDEN")
    second = admin.ok("POST", "/_synapse/admin/v1/send_server_notice", dict(body, content={
        "msgtype": "m.text", "body": "Done"}))["event_id"]
    assert alice.ok("GET", f"/rooms/{q(room)}/event/{q(second)}")["content"]["body"] == "Done"  # the same room
    for bad in ({"user_id": "nobody", "content": {}}, {"user_id": alice.user_id, "content": "text"},
                {"user_id": "@x:elsewhere.example", "content": {}}):
        assert admin.req("POST", "/_synapse/admin/v1/send_server_notice", bad)[0] == 400, bad
    assert admin.req("POST", "/_synapse/admin/v1/send_server_notice",
                     {"user_id": "@ghost:localhost", "content": {}})[0] == 404
    status, out = zhome.request("POST", "/_synapse/admin/v1/send_server_notice", body, token=alice.token)
    assert (status, out["errcode"]) == (403, "M_FORBIDDEN")
    status, out = zhome.request("POST", CS + "/register", {"username": "server-notices", "password": "pw-x-1",
                                                           "auth": {"type": "m.login.dummy"}})
    assert (status, out["errcode"]) == (400, "M_USER_IN_USE")


def test_delete_rooms_v1_and_v2(zhome: ZhomeProcess, tmp_path: Path) -> None:
    import secrets
    import time as _time

    admin = Admin(zhome, "root", tmp_path)
    alice = ClientUser(zhome, "alice")
    bob = ClientUser(zhome, "bob")
    marker = "MRK" + secrets.token_hex(16)
    room = alice.ok("POST", "/createRoom", {"preset": "public_chat", "room_alias_name": "spam"})["room_id"]
    bob.ok("POST", f"/join/{q(room)}", {})
    alice.ok("PUT", f"/rooms/{q(room)}/send/m.room.message/t1", {"msgtype": "m.text", "body": marker})

    got = admin.ok("DELETE", f"/_synapse/admin/v1/rooms/{q(room)}", {"block": True, "new_room_user_id":
                                                                     admin.user_id, "message": "moved"})
    assert sorted(got["kicked_users"]) == sorted([alice.user_id, bob.user_id])
    assert got["local_aliases"] == ["#spam:localhost"] and got["failed_to_kick_users"] == []
    assert got["new_room_id"] in alice.ok("GET", "/joined_rooms")["joined_rooms"]
    assert room not in alice.ok("GET", "/joined_rooms")["joined_rooms"]
    assert admin.req("GET", f"/_synapse/admin/v1/rooms/{q(room)}")[0] == 404
    assert room not in [r["room_id"] for r in admin.ok("GET", "/_synapse/admin/v1/rooms")["rooms"]]
    assert admin.ok("GET", f"/_synapse/admin/v1/rooms/{q(room)}/block")["block"] is True
    assert alice.req("POST", f"/join/{q(room)}", {})[0] in (403, 404)
    # The alias now leads to the room the members were moved to.
    status, moved = zhome.request("GET", CS + "/directory/room/" + q("#spam:localhost"))
    assert status == 200 and moved["room_id"] == got["new_room_id"]

    # v2 runs in the background; a legal hold stops a purge.
    other = alice.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"]
    hold = admin.ok("POST", "/_zhome/admin/v1/legal_holds", {"kind": "room", "target": other, "reason": "case 9"})
    status, out = admin.req("DELETE", f"/_synapse/admin/v2/rooms/{q(other)}", {})
    assert (status, out["errcode"]) == (403, "M_FORBIDDEN") and "legal hold" in out["error"]
    admin.ok("DELETE", f"/_zhome/admin/v1/legal_holds/{hold['id']}")
    delete_id = admin.ok("DELETE", f"/_synapse/admin/v2/rooms/{q(other)}", {})["delete_id"]
    for _ in range(100):
        st = admin.ok("GET", f"/_synapse/admin/v2/rooms/delete_status/{delete_id}")
        if st["status"] in ("complete", "failed"):
            break
        _time.sleep(0.2)
    assert st["status"] == "complete" and st["shutdown_room"]["kicked_users"] == [alice.user_id]
    by_room = admin.ok("GET", f"/_synapse/admin/v2/rooms/{q(other)}/delete_status")["results"]
    assert [r["delete_id"] for r in by_room] == [delete_id]
    assert admin.req("DELETE", f"/_synapse/admin/v2/rooms/{q('!nope:localhost')}", {})[0] == 404
    assert admin.req("DELETE", f"/_synapse/admin/v1/rooms/{q(other)}", {"purge": "yes"})[0] == 400
    status, out = zhome.request("DELETE", f"/_synapse/admin/v1/rooms/{q(other)}", {}, token=alice.token)
    assert (status, out["errcode"]) == (403, "M_FORBIDDEN")

    zhome.stop()
    from tests.e2e.test_erasure import _stored

    assert marker.encode() not in _stored(zhome)


def test_purge_history(zhome: ZhomeProcess, tmp_path: Path) -> None:
    import time as _time

    admin = Admin(zhome, "root", tmp_path)
    alice = ClientUser(zhome, "alice")
    room = alice.ok("POST", "/createRoom", {"preset": "private_chat", "name": "Ward"})["room_id"]
    ids = [alice.ok("PUT", f"/rooms/{q(room)}/send/m.room.message/t{i}", {"msgtype": "m.text", "body": f"m{i}"})
           ["event_id"] for i in range(5)]
    path = f"/_synapse/admin/v1/purge_history/{q(room)}/{q(ids[-1])}"
    status, out = zhome.request("POST", path, {}, token=alice.token)
    assert (status, out["errcode"]) == (403, "M_FORBIDDEN")
    purge_id = admin.ok("POST", path, {})["purge_id"]
    assert admin.wait_for_purge(purge_id) == "complete"
    chunk = alice.ok("GET", f"/rooms/{q(room)}/messages?dir=b&limit=50")["chunk"]
    assert [e["event_id"] for e in chunk if e["type"] == "m.room.message"] == [ids[-1]]
    state = alice.ok("GET", f"/rooms/{q(room)}/state")
    assert {"m.room.create", "m.room.name", "m.room.member"} <= {e["type"] for e in state}
    assert admin.req("POST", f"/_synapse/admin/v1/purge_history/{q(room)}", {})[0] == 400
    assert admin.req("GET", "/_synapse/admin/v1/purge_history_status/nope")[0] == 404
