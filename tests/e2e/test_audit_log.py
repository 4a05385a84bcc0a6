"""The audit log on a running zhome, both engines: admin actions and
data-subject requests are recorded (who, what, when, outcome), the hash
chain verifies, and an edit of a stored entry makes ``zhome admin
verify-audit`` fail naming that entry.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.e2e.harness import ClientUser, ZhomeProcess, q
from tests.e2e.test_admin_api import Admin


def _cli(hs: ZhomeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zhome", "admin", *args, "--config-path", str(hs.config_path)],
                          capture_output=True, text=True, timeout=60)


def _tamper(hs: ZhomeProcess, seq: int) -> None:
    """Edit one stored entry behind zhome's back, as an attacker with database access would."""
    url = yaml.safe_load(hs.config_path.read_text()).get("database_url")
    sql = "UPDATE audit_log SET outcome = '200' WHERE seq = %d" % seq
    if url:
        import psycopg2

        conn = psycopg2.connect(url)
        with conn, conn.cursor() as cur:
            cur.execute(sql)
        conn.close()
    else:
        conn2 = sqlite3.connect(str(hs.workdir / "data" / "homeserver.db"))
        with conn2:
            conn2.execute(sql)
        conn2.close()


def test_admin_actions_are_audited_and_tampering_is_found(zhome: ZhomeProcess, tmp_path: Path) -> None:
    admin = Admin(zhome, "root", tmp_path)
    alice = ClientUser(zhome, "alice")
    mallory = ClientUser(zhome, "mallory")
    admin.ok("GET", f"/_synapse/admin/v2/users/{q(alice.user_id)}")
    admin.ok("PUT", f"/_matrix/client/v1/admin/lock/{q(alice.user_id)}", {"locked": True})
    status, _ = zhome.request("GET", f"/_synapse/admin/v2/users/{q(alice.user_id)}", token=mallory.token)
    assert status == 403
    admin.ok("POST", f"/_synapse/admin/v1/deactivate/{q(alice.user_id)}", {"erase": True})

    entries = []
    for _ in range(50):
        entries = admin.ok("GET", "/_zhome/admin/v1/audit")["entries"]
        if len(entries) >= 4:
            break
    got = [(e["actor"], e["action"], e["target"].get("user_id"), e["outcome"]) for e in entries]
    assert got[:4] == [
        (admin.user_id, "GET admin_user", alice.user_id, "200"),
        (admin.user_id, "PUT admin_lock", alice.user_id, "200"),
        (mallory.user_id, "GET admin_user", alice.user_id, "403 M_FORBIDDEN"),
        (admin.user_id, "POST admin_deactivate", alice.user_id, "200"),
    ], got
    assert all(e["ts"] > 0 and len(e["hash"]) == 64 for e in entries)
    about = admin.ok("GET", f"/_zhome/admin/v1/audit?user_id={q(mallory.user_id)}")["entries"]
    assert [e["action"] for e in about] == ["GET admin_user"]
    assert admin.ok("GET", "/_zhome/admin/v1/audit/verify") == {"valid": True}

    ok = _cli(zhome, "verify-audit")
    assert ok.returncode == 0 and "valid" in ok.stdout, (ok.stdout, ok.stderr)
    exported = _cli(zhome, "export-audit")
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    assert [e["seq"] for e in lines][:4] == [1, 2, 3, 4] and lines[2]["outcome"] == "403 M_FORBIDDEN"

    # Someone with database access rewrites history: the refused request now looks allowed.
    _tamper(zhome, 3)
    bad = _cli(zhome, "verify-audit")
    assert bad.returncode != 0 and "entry 3" in bad.stderr, (bad.stdout, bad.stderr)
    assert admin.ok("GET", "/_zhome/admin/v1/audit/verify")["first_bad_seq"] == 3


def test_operator_cli_reaches_the_admin_api_without_a_token(zhome_factory: Any, tmp_path: Path) -> None:
    import os
    import secrets
    import stat

    sock = f"/tmp/zhome-test-{secrets.token_hex(6)}.sock"
    hs = zhome_factory(overrides={"admin_socket_path": sock}).start()
    try:
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        alice = ClientUser(hs, "alice")
        room = alice.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"]
        alice.ok("PUT", f"/rooms/{q(room)}/send/m.room.message/t1", {"msgtype": "m.text", "body": "erase me"})

        got = _cli_args(hs, "call", "GET", "/_synapse/admin/v2/users")
        assert got.returncode == 0, got.stderr
        assert [u["name"] for u in json.loads(got.stdout)["users"]] == [alice.user_id]
        got = _cli_args(hs, "erase-user", alice.user_id)
        assert got.returncode == 0, got.stderr
        report = json.loads(got.stdout)
        assert report["requested_by"] == f"@zhome-operator:{hs.server_name}" and report["erased"]["events"] >= 1
        assert alice.req("GET", "/account/whoami")[0] == 401
        # Only the admin API is served on the socket.
        got = _cli_args(hs, "call", "POST", "/_matrix/client/v3/createRoom", "--body", "{}")
        assert got.returncode != 0 and "M_UNRECOGNIZED" in got.stdout
        got = _cli_args(hs, "call", "GET", "/_zhome/admin/v1/audit")
        actions = [(e["actor"], e["action"]) for e in json.loads(got.stdout)["entries"]]
        assert (f"@zhome-operator:{hs.server_name}", "POST zadmin_erase") in actions
    finally:
        hs.stop()
    down = _cli_args(hs, "call", "GET", "/_synapse/admin/v2/users")
    assert down.returncode != 0 and "is it running" in down.stderr


def _cli_args(hs: ZhomeProcess, task: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zhome", "admin", task, "--config-path", str(hs.config_path),
                           *args], capture_output=True, text=True, timeout=120)
