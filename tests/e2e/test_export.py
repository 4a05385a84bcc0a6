"""Right of access and portability: the export ZIP, checked field by field,
for an admin and for the user themself, on both engines.
"""

from __future__ import annotations

import io
import json
import secrets
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

from tests.e2e.harness import ClientUser, ZhomeProcess, _server_env, q
from tests.e2e.test_admin_api import Admin


def _zip(hs: ZhomeProcess, path: str, token: str) -> zipfile.ZipFile:
    req = urllib.request.Request(hs.base_url + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "application/zip"
        assert "attachment" in r.headers["Content-Disposition"]
        assert r.headers["Access-Control-Allow-Origin"] == "*"
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


# Runs ``zhome`` and reports its peak resident memory while the command ran
# (Linux: writing 5 to clear_refs resets the high-water mark, VmHWM).
_MAXRSS = ("import sys\n"
           "from zhome.cli import main\n"
           "open('/proc/self/clear_refs', 'w').write('5')\n"
           "code = main(sys.argv[1:])\n"
           "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
           "print('MAXRSS_KB', hwm, file=sys.stderr)\n"
           "sys.exit(code)\n")


def _operator_cli(hs: ZhomeProcess, *args: str) -> tuple[subprocess.CompletedProcess[str], int]:
    """``zhome admin ARGS`` as an operator runs it, and its peak memory (KiB)."""
    got = subprocess.run([sys.executable, "-c", _MAXRSS, "admin", *args, "--config-path", str(hs.config_path)],
                         capture_output=True, text=True, timeout=300, env=_server_env())
    peak = [int(line.split()[1]) for line in got.stderr.splitlines() if line.startswith("MAXRSS_KB ")]
    assert peak, got.stderr
    return got, peak[0]


def _ageless(jsonl: bytes) -> list[dict[str, Any]]:
    """The events of a room file, without ``unsigned.age`` (which moves on between two exports)."""
    events = [json.loads(line) for line in jsonl.splitlines()]
    for e in events:
        e.get("unsigned", {}).pop("age", None)
    return events


def test_operator_export_user_cli(zhome_factory: Any, tmp_path: Path) -> None:
    """``zhome admin export-user`` writes the same ZIP as the admin endpoint,
    through the operator socket, streamed (its memory does not grow with the
    archive), never leaving a partial file, and audited with the operator as actor."""
    sock = f"/tmp/zhome-test-{secrets.token_hex(6)}.sock"
    hs = zhome_factory(overrides={"admin_socket_path": sock}).start()
    admin = Admin(hs, "root", tmp_path)
    alice = ClientUser(hs, "alice")
    room = alice.ok("POST", "/createRoom", {"preset": "private_chat", "name": "Ward 4"})["room_id"]
    alice.ok("PUT", f"/rooms/{q(room)}/send/m.room.message/t1", {"msgtype": "m.text", "body": "night shift"})
    scan = secrets.token_bytes(24 * 1024 * 1024)  # incompressible: the ZIP is at least as big
    status, up = hs.request("POST", "/_matrix/media/v3/upload?filename=scan.bin", raw=scan, token=alice.token,
                            headers={"Content-Type": "application/octet-stream"})
    assert status == 200, up

    _, baseline_kb = _operator_cli(hs, "call", "GET", "/_synapse/admin/v1/server_version")
    out = tmp_path / "alice.zip"
    got, peak_kb = _operator_cli(hs, "export-user", alice.user_id, "--out", str(out))
    assert got.returncode == 0, got.stderr
    assert str(out) in got.stdout
    assert out.stat().st_size > len(scan)
    # Streamed: the 24 MiB archive never sat in the command's memory.
    assert peak_kb < baseline_kb + 12 * 1024, (peak_kb, baseline_kb)
    assert [p.name for p in tmp_path.iterdir() if ".part" in p.name] == []

    cli_zip = zipfile.ZipFile(out)
    api_zip = _zip(hs, f"/_zhome/admin/v1/users/{q(alice.user_id)}/export", admin.token)
    assert sorted(cli_zip.namelist()) == sorted(api_zip.namelist())
    for name in cli_zip.namelist():
        if name.startswith("rooms/"):
            assert _ageless(cli_zip.read(name)) == _ageless(api_zip.read(name)), name
        elif name != "audit.jsonl":  # the second export is itself audited
            assert cli_zip.read(name) == api_zip.read(name), name
    media = _json(cli_zip, "media.json")
    assert [m["mxc"] for m in media] == [up["content_uri"]] and cli_zip.read(media[0]["file"]) == scan
    events = [json.loads(line) for line in cli_zip.read("rooms/0000.jsonl").splitlines()]
    assert "night shift" in [e["content"].get("body") for e in events]

    entries = admin.ok("GET", f"/_zhome/admin/v1/audit?user_id={q(alice.user_id)}")["entries"]
    exports = [(e["actor"], e["target"], e["outcome"]) for e in entries if e["action"] == "GET zadmin_export"]
    assert exports[0] == (f"@zhome-operator:{hs.server_name}", {"user_id": alice.user_id}, "200"), exports

    # Failures: a one-line reason, a non-zero code, and the old file untouched.
    before = out.read_bytes()
    for user_id, reason in (("@ghost:localhost", "404"), ("@x:elsewhere.example", "400"), ("nobody", "400")):
        got, _ = _operator_cli(hs, "export-user", user_id, "--out", str(out))
        assert got.returncode != 0 and reason in got.stderr, (user_id, got.stdout, got.stderr)
    assert out.read_bytes() == before
    got, _ = _operator_cli(hs, "export-user", alice.user_id, "--out", str(tmp_path))
    assert got.returncode != 0 and "directory" in got.stderr
    got, _ = _operator_cli(hs, "export-user", alice.user_id, "--out", str(tmp_path / "missing" / "a.zip"))
    assert got.returncode != 0 and "cannot write" in got.stderr and "Traceback" not in got.stderr
    hs.stop()
    got, _ = _operator_cli(hs, "export-user", alice.user_id, "--out", str(out))
    assert got.returncode != 0 and "is it running" in got.stderr
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if ".part" in p.name] == []
