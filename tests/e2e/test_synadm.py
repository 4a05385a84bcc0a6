"""synadm, the Synapse admin command-line tool (pip, pinned in
requirements-test.txt), driving zhome's Synapse-compatible admin API
unmodified: users, rooms and registration tokens.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.e2e.harness import ClientUser, ZhomeProcess, q
from tests.e2e.test_admin_api import Admin

SYNADM = shutil.which("synadm", path=str(Path(sys.executable).parent)) or "synadm"


class Synadm:
    def __init__(self, hs: ZhomeProcess, admin: Admin, tmp: Path) -> None:
        self.config = tmp / "synadm.yaml"
        self.config.write_text(yaml.safe_dump({
            "user": admin.user_id, "token": admin.token, "base_url": hs.base_url, "admin_path": "/_synapse/admin",
            "matrix_path": "/_matrix", "format": "json", "timeout": 30, "server_discovery": "well-known",
            "homeserver": hs.server_name, "ssl_verify": False}))

    def run(self, *args: str, creates: bool = False) -> Any:
        got = subprocess.run([SYNADM, "-c", str(self.config), "--batch", "-o", "json", *args],
                             capture_output=True, text=True, timeout=60)
        assert got.returncode == 0, (args, got.returncode, got.stdout, got.stderr)
        # Creating looks the account up first, which is a 404.
        warnings = got.stderr.replace("WARNING Synapse returned status code 404\n", "") if creates else got.stderr
        assert "status code" not in warnings, (args, got.stderr)
        # Some commands print prose and several JSON documents; the last
        # one is the answer.
        out, docs, pos = got.stdout, [], 0
        decoder = json.JSONDecoder()
        while True:
            starts = [i for i in (out.find("{", pos), out.find("[", pos)) if i >= 0]
            if not starts:
                break
            try:
                doc, pos = decoder.raw_decode(out, min(starts))
            except ValueError:
                pos = min(starts) + 1
                continue
            docs.append(doc)
        return docs[-1] if docs else out.strip()


def test_synadm_users_rooms_and_tokens(zhome: ZhomeProcess, tmp_path: Path) -> None:
    admin = Admin(zhome, "root", tmp_path)
    sa = Synadm(zhome, admin, tmp_path)
    assert sa.run("version")["server_version"]

    # Users: create, list, details, password, whois, membership, suspend, deactivate.
    made = sa.run("user", "modify", "@carer:localhost", "-P", "first password 1", "-n", "Care Giver", creates=True)
    assert made["name"] == "@carer:localhost" and made["displayname"] == "Care Giver"
    status, login = zhome.request("POST", "/_matrix/client/v3/login", {
        "type": "m.login.password", "identifier": {"type": "m.id.user", "user": "carer"},
        "password": "first password 1"})
    assert status == 200, login
    names = [u["name"] for u in sa.run("user", "list")["users"]]
    assert names == ["@carer:localhost", admin.user_id]
    assert sa.run("user", "details", "@carer:localhost")["displayname"] == "Care Giver"
    sa.run("user", "password", "@carer:localhost", "-p", "second password 2")
    status, _ = zhome.request("POST", "/_matrix/client/v3/login", {
        "type": "m.login.password", "identifier": {"type": "m.id.user", "user": "carer"},
        "password": "second password 2"})
    assert status == 200
    assert sa.run("user", "whois", "@carer:localhost")["user_id"] == "@carer:localhost"

    alice = ClientUser(zhome, "alice")
    room = alice.ok("POST", "/createRoom", {"preset": "public_chat", "name": "Ward 3"})["room_id"]
    assert sa.run("user", "membership", alice.user_id)["joined_rooms"] == [room]
    sa.run("user", "suspend", "@carer:localhost")
    assert sa.run("user", "details", "@carer:localhost")["suspended"] is True

    # Rooms: list, details, members, state, block.
    rooms = sa.run("room", "list")
    assert rooms["total_rooms"] == 1 and rooms["rooms"][0]["name"] == "Ward 3"
    assert sa.run("room", "details", room)["joined_members"] == 1
    assert sa.run("room", "members", room)["members"] == [alice.user_id]
    assert any(e["type"] == "m.room.create" for e in sa.run("room", "state", room)["state"])
    sa.run("room", "block", room)
    assert sa.run("room", "block-status", room)["block"] is True

    # Registration tokens.
    made_token = sa.run("regtok", "new", "--token", "ward3-invite", "--uses-allowed", "3")
    assert made_token["token"] == "ward3-invite" and made_token["uses_allowed"] == 3
    assert [t["token"] for t in sa.run("regtok", "list")["registration_tokens"]] == ["ward3-invite"]
    assert sa.run("regtok", "details", "ward3-invite")["completed"] == 0
    sa.run("regtok", "update", "ward3-invite", "--uses-allowed", "5")
    assert sa.run("regtok", "details", "ward3-invite")["uses_allowed"] == 5
    sa.run("regtok", "delete", "ward3-invite")
    assert sa.run("regtok", "list")["registration_tokens"] == []

    sa.run("user", "deactivate", "@carer:localhost")
    assert sa.run("user", "details", "@carer:localhost")["deactivated"] is True
    assert admin.ok("GET", f"/_synapse/admin/v2/users/{q('@carer:localhost')}")["deactivated"] is True
