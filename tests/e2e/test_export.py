"""Right of access and portability: the export ZIP, checked field by field,
for an admin and for the user themself, on both engines.
"""

from __future__ import annotations

import io
import json
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

from tests.e2e.harness import ClientUser, ZhomeProcess, q
from tests.e2e.test_admin_api import Admin


def _zip(hs: ZhomeProcess, path: str, token: str) -> zipfile.ZipFile:
    req = urllib.request.Request(hs.base_url + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "application/zip"
        assert "attachment" in r.headers["Content-Disposition"]
        return zipfile.ZipFile(io.BytesIO(r.read()))


def _json(z: zipfile.ZipFile, name: str) -> Any:
    return json.loads(z.read(name))


def test_export_contents(zhome: ZhomeProcess, tmp_path: Path) -> None:
    admin = Admin(zhome, "root", tmp_path)
    alice = ClientUser(zhome, "alice")
    bob = ClientUser(zhome, "bob")
    alice.ok("PUT", f"/profile/{q(alice.user_id)}/displayname", {"displayname": "Alice Jansen"})
    device = alice.ok("GET", "/account/whoami")["device_id"]
    alice.ok("PUT", f"/devices/{q(device)}", {"display_name": "ward phone"})
    alice.ok("PUT", f"/user/{q(alice.user_id)}/account_data/org.example.prefs", {"theme": "dark"})
    room = alice.ok("POST", "/createRoom", {"preset": "public_chat", "name": "Ward 3"})["room_id"]
    bob.ok("POST", f"/join/{q(room)}", {})
    alice.ok("PUT", f"/rooms/{q(room)}/send/m.room.message/t1", {"msgtype": "m.text", "body": "shift notes"})
    bob.ok("PUT", f"/rooms/{q(room)}/send/m.room.message/t2", {"msgtype": "m.text", "body": "thanks"})
    secret = bob.ok("POST", "/createRoom", {"preset": "private_chat"})["room_id"]
    bob.ok("PUT", f"/rooms/{q(secret)}/send/m.room.message/t3", {"msgtype": "m.text", "body": "not for alice"})
    status, up = zhome.request("POST", "/_matrix/media/v3/upload?filename=scan.pdf", raw=b"%PDF scan bytes",
                               token=alice.token, headers={"Content-Type": "application/pdf"})
    assert status == 200
    admin.ok("GET", f"/_synapse/admin/v2/users/{q(alice.user_id)}")  # an audit entry about alice
    # Her privacy settings: transfer only to a partner, invites only from her clinic.
    assert zhome.request("PUT", "/_zhome/client/v1/privacy", {"do_not_transfer": True,
                         "allowed_servers": ["partner.example"]}, token=alice.token)[0] == 200
    invites = {"default": "block", "allowed_servers": ["localhost"], "blocked_users": ["@bob:localhost"]}
    assert zhome.request("PUT", "/_zhome/client/v1/invite_permissions", invites, token=alice.token)[0] == 200

    for z in (_zip(zhome, f"/_zhome/admin/v1/users/{q(alice.user_id)}/export", admin.token),
              _zip(zhome, "/_zhome/client/v1/export", alice.token)):
        profile = _json(z, "profile.json")
        assert profile["name"] == alice.user_id and profile["displayname"] == "Alice Jansen"
        devices = _json(z, "devices.json")
        assert [(d["device_id"], d["display_name"]) for d in devices] == [(device, "ward phone")]
        assert all(set(d) <= {"device_id", "display_name", "last_seen_ts", "last_seen_ip"} for d in devices)
        assert _json(z, "threepids.json") == []
        assert _json(z, "account_data.json")["global"]["org.example.prefs"] == {"theme": "dark"}
        rooms = _json(z, "rooms.json")
        assert [(r["room_id"], r["membership"]) for r in rooms] == [(room, "join")]
        events = [json.loads(line) for line in z.read(rooms[0]["file"]).splitlines()]
        bodies = [e["content"].get("body") for e in events if e["type"] == "m.room.message"]
        assert bodies == ["shift notes", "thanks"]
        assert all(e["room_id"] == room for e in events)
        assert b"not for alice" not in b"".join(z.read(n) for n in z.namelist())
        media = _json(z, "media.json")
        assert [(m["mxc"], m["content_type"], m["upload_name"]) for m in media] == [
            (up["content_uri"], "application/pdf", "scan.pdf")]
        assert z.read(media[0]["file"]) == b"%PDF scan bytes"
        privacy = _json(z, "privacy.json")
        assert privacy["legal_holds"] == [] and privacy["erasures"] == []
        transfer = privacy["transfer"]
        assert (transfer["do_not_transfer"], transfer["allowed_servers"], transfer["set_by"]) == (
            True, ["partner.example"], alice.user_id)
        assert privacy["invite_permissions"] == {
            "default": "block", "allowed_users": [], "blocked_users": ["@bob:localhost"],
            "allowed_servers": ["localhost"], "blocked_servers": [], "set_by": alice.user_id,
            "set_ts": privacy["invite_permissions"]["set_ts"]}
        audit = [json.loads(line) for line in z.read("audit.jsonl").splitlines()]
        assert any(e["action"] == "GET admin_user" and e["target"] == {"user_id": alice.user_id} for e in audit)

    status, out = zhome.request("GET", f"/_zhome/admin/v1/users/{q(alice.user_id)}/export", token=bob.token)
    assert (status, out["errcode"]) == (403, "M_FORBIDDEN")
    assert zhome.request("GET", "/_zhome/client/v1/export")[0] == 401
