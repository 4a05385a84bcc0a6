"""Encryption at rest, end to end on both engines: a database written
before it (encryption off) is sealed by the background job on the next
start, with nothing in the clear left on disk and everything still served;
a master-key rotation while messages keep coming, then a restart with only
the new key."""

from __future__ import annotations

import secrets
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable

import yaml

from tests.e2e.harness import CS, ClientUser, ZhomeProcess, q
from tests.e2e.test_admin_api import Admin
from tests.e2e.test_erasure import _marker, _open_stored, _send, _timeline, _upload, _where_stored

WAIT_S = 60.0


def _set_encryption(hs: ZhomeProcess, enabled: bool) -> None:
    cfg = yaml.safe_load(hs.config_path.read_text())
    cfg.setdefault("encryption", {})["enabled"] = enabled
    hs.config_path.write_text(yaml.safe_dump(cfg))


def _wait(what: str, check: Callable[[], Any]) -> Any:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _login_device(hs: ZhomeProcess, user: ClientUser, name: str) -> dict[str, Any]:
    status, out = hs.request("POST", CS + "/login", {
        "type": "m.login.password", "identifier": {"type": "m.id.user", "user": user.user_id},
        "password": "correct horse battery", "initial_device_display_name": name})
    assert status == 200, out
    return dict(out)


def _send_to_device(sender: ClientUser, user_id: str, device_id: str, marker: str) -> None:
    sender.ok("PUT", f"/sendToDevice/org.example.note/{secrets.token_hex(8)}",
              {"messages": {user_id: {device_id: {"note": marker}}}})


def _to_device_notes(hs: ZhomeProcess, token: str) -> list[str]:
    status, out = hs.request("GET", CS + "/sync?timeout=0", token=token)
    assert status == 200, out
    return [e["content"].get("note") for e in out.get("to_device", {}).get("events", [])]


def test_a_database_from_before_is_sealed_in_the_background(zhome_factory: Any, tmp_path: Path) -> None:
    hs: ZhomeProcess = zhome_factory()
    _set_encryption(hs, False)
    hs.start()
    admin = Admin(hs, "root", tmp_path)
    alice = ClientUser(hs, "alice")
    m_body, m_name, m_data, m_dev, m_file, m_note, m_field = (_marker() for _ in range(7))
    room = alice.ok("POST", "/createRoom", {"name": "Ward"})["room_id"]
    alice.ok("PUT", f"/profile/{q(alice.user_id)}/displayname", {"displayname": f"Alice {m_name}"})
    alice.ok("PUT", f"/profile/{q(alice.user_id)}/org.example.pager", {"org.example.pager": m_field})
    events = [_send(alice, room, {"msgtype": "m.text", "body": f"old {i} {m_body}"}) for i in range(30)]
    alice.ok("PUT", f"/user/{q(alice.user_id)}/account_data/org.example.notes", {"note": m_data})
    phone = _login_device(hs, alice, f"phone {m_dev}")
    _send_to_device(alice, alice.user_id, phone["device_id"], m_note)
    mxc = _upload(alice, b"file body", f"{m_file}.txt")
    hs.stop()
    # The control: with encryption off every marker is in the clear.
    for m in (m_body, m_name, m_data, m_dev, m_file, m_note, m_field):
        assert _where_stored(hs, m), m

    _set_encryption(hs, True)
    hs.start()
    status = _wait("the sealing backlog", lambda: (lambda s: s if s["backlog_done"] else None)(
        admin.ok("GET", "/_zhome/admin/v1/encryption")))
    assert status["enabled"] and status["data_keys"] >= 2 and status["backlog_sealed_rows"] >= len(events)
    # Everything reads as before.
    bodies = {e["event_id"]: e["content"].get("body") for e in _timeline(alice, room)}
    assert all(m_body in (bodies[e] or "") for e in events)
    assert alice.ok("GET", f"/profile/{q(alice.user_id)}")["displayname"] == f"Alice {m_name}"
    assert alice.ok("GET", f"/profile/{q(alice.user_id)}/org.example.pager") == {"org.example.pager": m_field}
    assert alice.ok("GET", f"/user/{q(alice.user_id)}/account_data/org.example.notes") == {"note": m_data}
    devices = alice.ok("GET", "/devices")["devices"]
    assert f"phone {m_dev}" in [d.get("display_name") for d in devices]
    media = admin.ok("GET", f"/_synapse/admin/v1/users/{q(alice.user_id)}/media")["media"]
    assert [m["upload_name"] for m in media] == [f"{m_file}.txt"]
    found = alice.ok("POST", "/user_directory/search", {"search_term": m_name[:12]})["results"]
    # Alice does not find herself through a private room; the admin list does.
    assert found == []
    listed = admin.ok("GET", "/_synapse/admin/v2/users?" + urllib.parse.urlencode({"name": m_name[3:15]}))
    assert [u["name"] for u in listed["users"]] == [alice.user_id]
    assert mxc
    hs.stop()
    for m in (m_body, m_name, m_data, m_dev, m_file, m_note, m_field):
        assert not _where_stored(hs, m), (m, _where_stored(hs, m))
    opened = _open_stored(hs, events[:1])
    assert m_body in opened[events[0]]["content"]["body"]
    # The waiting to-device message, sealed meanwhile, still reaches the phone.
    hs.start()
    assert _to_device_notes(hs, phone["access_token"]) == [m_note]


def test_to_device_messages_and_report_reasons_are_sealed(zhome: ZhomeProcess, tmp_path: Path) -> None:
    admin = Admin(zhome, "root", tmp_path)
    alice, bob = ClientUser(zhome, "alice"), ClientUser(zhome, "bob")
    phone = _login_device(zhome, bob, "phone")
    marker, why = _marker(), _marker()
    _send_to_device(alice, bob.user_id, phone["device_id"], marker)
    room = alice.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"]
    bob.ok("POST", f"/join/{q(room)}", {})
    eid = _send(alice, room, {"msgtype": "m.text", "body": "hello"})
    bob.ok("POST", f"/rooms/{q(room)}/report/{q(eid)}", {"reason": f"because {why}"})
    zhome.stop()
    for m in (marker, why):
        assert not _where_stored(zhome, m), _where_stored(zhome, m)
    zhome.start()
    assert _to_device_notes(zhome, phone["access_token"]) == [marker]
    reports = admin.ok("GET", "/_synapse/admin/v1/event_reports")["event_reports"]
    assert [r["reason"] for r in reports] == [f"because {why}"]


def test_rotation_while_serving_then_only_the_new_key(zhome: ZhomeProcess, tmp_path: Path) -> None:
    admin = Admin(zhome, "root", tmp_path)
    alice = ClientUser(zhome, "alice")
    bob = ClientUser(zhome, "bob")
    room = alice.ok("POST", "/createRoom", {"preset": "private_chat", "invite": [bob.user_id]})["room_id"]
    bob.ok("POST", f"/join/{q(room)}", {})
    bodies = {}
    for i in range(20):
        body = f"before {i} {secrets.token_hex(4)}"
        bodies[_send(alice if i % 2 else bob, room, {"msgtype": "m.text", "body": body})] = body
    before = admin.ok("GET", "/_zhome/admin/v1/encryption")
    assert len(before["master_keys"]) == 1
    rotated = admin.ok("POST", "/_zhome/admin/v1/encryption/rotate", {})
    assert rotated["master_key"] != before["current_master_key"] and rotated["generation"] == before["generation"] + 1
    for i in range(10):
        body = f"after {i} {secrets.token_hex(4)}"
        bodies[_send(alice, room, {"msgtype": "m.text", "body": body})] = body
    status = _wait("the re-wrap", lambda: (lambda s: s if not s["rewrap_running"] and len(s["master_keys"]) == 1
                                          else None)(admin.ok("GET", "/_zhome/admin/v1/encryption")))
    assert status["current_master_key"] == rotated["master_key"]
    assert set(status["data_keys_by_master_key"]) == {rotated["master_key"]}
    key_ring = (zhome.workdir / "data" / "data_encryption.key").read_text()
    assert len([ln for ln in key_ring.splitlines() if ln and not ln.startswith("#")]) == 1
    # The operator sees the same through the admin socket, without a token.
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "zhome", "admin", "encryption-status", "-c", str(zhome.config_path)],
                         capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout)["current_master_key"] == rotated["master_key"]
    # The audit log names the rotation.
    entries = admin.ok("GET", "/_zhome/admin/v1/audit?limit=1000")["entries"]
    assert any(e["action"] == "POST zadmin_encryption_rotate" for e in entries)
    zhome.stop()
    zhome.start()
    got = {e["event_id"]: e["content"].get("body") for e in _timeline(bob, room)}
    assert {e: got.get(e) for e in bodies} == bodies
    # A non-admin may neither look nor rotate.
    for method in ("GET", "POST"):
        path = "/_zhome/admin/v1/encryption" + ("/rotate" if method == "POST" else "")
        status_code, out = zhome.request(method, path, {} if method == "POST" else None, token=alice.token)
        assert (status_code, out.get("errcode")) == (403, "M_FORBIDDEN")


def test_extended_profile_fields_are_sealed(zhome: ZhomeProcess) -> None:
    alice = ClientUser(zhome, "alice")
    marker = _marker()
    alice.ok("PUT", f"/profile/{q(alice.user_id)}/org.example.note", {"org.example.note": f"pager {marker}"})
    zhome.stop()
    assert not _where_stored(zhome, marker), _where_stored(zhome, marker)
    zhome.start()
    assert alice.ok("GET", f"/profile/{q(alice.user_id)}/org.example.note") == {"org.example.note": f"pager {marker}"}


def test_edus_waiting_for_another_server_are_sealed(tmp_path: Path) -> None:
    """A to-device message for a server that cannot be reached waits in the
    federation queue; what it says is not readable there, whether it was
    queued with encryption on or sealed later by the backlog."""
    import sqlite3

    from tests.e2e.harness import free_port

    hs = ZhomeProcess(tmp_path / "fed", federation_ip="127.0.0.2")
    # Nothing listens there: the EDUs stay queued, retried with backoff.
    far = f"@bob:127.0.0.9:{free_port('127.0.0.9')}"

    def queue(user: ClientUser, marker: str) -> None:
        user.ok("PUT", f"/sendToDevice/org.example.note/{secrets.token_hex(4)}",
                {"messages": {far: {"PHONE": {"note": marker}}}})

    def queued() -> list[str]:
        conn = sqlite3.connect(f"file:{hs.workdir / 'data' / 'homeserver.db'}?mode=ro", uri=True)
        try:
            return [r[0] for r in conn.execute("SELECT edu_json FROM federation_outbound WHERE edu_json IS NOT NULL")]
        finally:
            conn.close()

    try:
        _set_encryption(hs, False)
        hs.start()
        admin = Admin(hs, "root", tmp_path)
        alice = ClientUser(hs, "alice")
        before, after = _marker(), _marker()
        queue(alice, before)
        hs.stop()
        assert _where_stored(hs, before), "the control: queued in the clear with encryption off"

        _set_encryption(hs, True)
        hs.start()
        queue(alice, after)
        _wait("the sealing backlog", lambda: admin.ok("GET", "/_zhome/admin/v1/encryption")["backlog_done"])
        hs.stop()
        for m in (before, after):
            assert not _where_stored(hs, m), (m, _where_stored(hs, m))
        rows = queued()
        assert len(rows) == 2 and all(row.startswith("zk1:") for row in rows), rows
    finally:
        hs.stop()
