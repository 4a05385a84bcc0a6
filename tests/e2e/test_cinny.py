"""A stock web client in a real browser: Cinny (a build in shared/cinny,
matrix-js-sdk with Olm) in headless Chromium, driven by playwright-core
(tests/browser/cinny.mjs), against a real zhome process.

Two people: A logs in through the login page, creates a room with the
create-room dialog's defaults (end-to-end encrypted), invites B, who logs in
in a second browser context and accepts; A sends a message, reloads the page
and still reads it; B reads it. zhome must then hold only Megolm ciphertext
for it.

This exercises, through a client nobody wrote for zhome: login, filters,
/sync (initial and incremental), createRoom with initial_state, the user
directory, invites and joins, /keys/upload, /keys/query, /keys/claim,
send-to-device (the Olm-encrypted room key) and room messages.

Spec: client-server-api "End-to-End Encryption" and "Send-to-Device
messaging"; "Room creation"; "Syncing".

scripts/test.sh installs the browser (Debian's chromium) and playwright-core
(npm ci in tests/browser); without them this test fails, it never skips.
"""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.e2e.harness import ClientUser, ZhomeProcess, q

REPO = Path(__file__).resolve().parents[2]
BROWSER_DIR = REPO / "tests" / "browser"
SCRIPT = BROWSER_DIR / "cinny.mjs"
CINNY_DIST = REPO.parent / "shared" / "cinny" / "dist"
CHROMIUM = Path("/usr/bin/chromium")
PASSWORD = "correct horse battery"
# The script bounds each of its steps; this bounds the whole browser run.
RUN_TIMEOUT_S = 100


def _cinny_dist() -> Path:
    """The Cinny build beside the repository (shared/cinny/dist); /work/shared
    when the tree is a worktree elsewhere."""
    for candidate in (CINNY_DIST, Path("/work/shared/cinny/dist")):
        if (candidate / "index.html").is_file():
            return candidate
    raise AssertionError(f"no Cinny build at {CINNY_DIST} (see shared/cinny/README.md)")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def cinny_web(zhome: ZhomeProcess, tmp_path: Path) -> Iterator[str]:
    """Cinny's dist copied to tmp_path, pointed at ``zhome`` and served on a
    free loopback port by a static file server thread."""
    root = tmp_path / "cinny"
    shutil.copytree(_cinny_dist(), root)
    for p in [root, *root.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)
    config_path = root / "config.json"
    config = json.loads(config_path.read_text())
    config.update({
        "homeserverList": [zhome.base_url],
        "defaultHomeserver": 0,
        "allowCustomHomeservers": True,
        "featuredCommunities": {"openAsDefault": False, "spaces": [], "rooms": [], "servers": []},
        # A plain static server has no fallback to index.html for deep paths.
        "hashRouter": {"enabled": True, "basename": "/"},
    })
    config_path.write_text(json.dumps(config))
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="cinny-static", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _run_browser(scenario: dict[str, Any], out: Path) -> dict[str, Any]:
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: scripts/test.sh installs Debian's chromium"
    assert (BROWSER_DIR / "node_modules" / "playwright-core").is_dir(), (
        "playwright-core is not installed: run `npm ci` in tests/browser (scripts/test.sh does)")
    node = shutil.which("node")
    assert node, "node is missing"
    out.mkdir(parents=True, exist_ok=True)
    scenario_path = out / "scenario.json"
    scenario_path.write_text(json.dumps({**scenario, "out": str(out), "chromium": str(CHROMIUM)}))
    try:
        proc = subprocess.run([node, str(SCRIPT), str(scenario_path)], cwd=str(BROWSER_DIR),
                              capture_output=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"the browser run took over {RUN_TIMEOUT_S}s; screenshots and console in {out}") from e
    stdout = proc.stdout.decode(errors="replace")
    stderr = proc.stderr.decode(errors="replace")
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, f"no result from the browser script (exit {proc.returncode}); stderr:\n{stderr[-3000:]}"
    result: dict[str, Any] = json.loads(lines[-1])
    result["_stderr"] = stderr[-3000:]
    return result


def _scenario(zhome: ZhomeProcess, web: str, a: ClientUser, b: ClientUser, message: str) -> dict[str, Any]:
    return {
        "web": web,
        "homeserver": zhome.base_url,
        "message": message,
        "room_name": "Secret plans",
        "users": {
            "a": {"localpart": "alice", "password": PASSWORD, "user_id": a.user_id},
            "b": {"localpart": "bob", "password": PASSWORD, "user_id": b.user_id},
        },
    }


def _room_events(user: ClientUser, room_id: str) -> list[dict[str, Any]]:
    body = user.ok("GET", f"/rooms/{q(room_id)}/messages?dir=b&limit=100")
    events: list[dict[str, Any]] = body["chunk"]
    return events


def test_cinny_encrypted_room_two_browsers(zhome: ZhomeProcess, cinny_web: str, tmp_path: Path) -> None:
    # ClientUser registers with the harness's password (PASSWORD).
    a, b = ClientUser(zhome, "alice"), ClientUser(zhome, "bob")
    message = "The eagle lands at noon, bring the blue folder"
    out = tmp_path / "browser"
    result = _run_browser(_scenario(zhome, cinny_web, a, b, message), out)
    assert result["ok"], (
        f"Cinny failed at step {result.get('step')!r}: {result.get('error')}\n"
        f"screenshots and browser console in {out}\nzhome log: {zhome.log_path}\n{result['_stderr']}")

    room_id = result["room_id"]
    # The dialog's defaults, untouched, asked for an encrypted room.
    assert {"type": "m.room.encryption", "state_key": "", "content": {"algorithm": "m.megolm.v1.aes-sha2"}} in (
        result["create_request"].get("initial_state") or []), result["create_request"]
    # The dialog's defaults made an encrypted room: zhome holds the state.
    enc = a.ok("GET", f"/rooms/{q(room_id)}/state/m.room.encryption/")
    assert enc["algorithm"] == "m.megolm.v1.aes-sha2", enc
    assert b.ok("GET", f"/rooms/{q(room_id)}/joined_members")["joined"].keys() == {a.user_id, b.user_id}

    # What zhome stored for the message is Megolm ciphertext, not plaintext.
    assert "/send/m.room.encrypted/" in result["send_url"], result["send_url"]
    event = a.ok("GET", f"/rooms/{q(room_id)}/event/{q(result['event_id'])}")
    assert event["type"] == "m.room.encrypted", event
    assert event["sender"] == a.user_id
    content = event["content"]
    assert content["algorithm"] == "m.megolm.v1.aes-sha2", content
    assert isinstance(content.get("ciphertext"), str) and len(content["ciphertext"]) > len(message), content
    assert "body" not in content
    events = _room_events(a, room_id)
    assert result["event_id"] in {e["event_id"] for e in events}
    for e in events:
        assert message not in json.dumps(e), e
        assert e["type"] != "m.room.message", e


# The checker itself: a message B's browser cannot decrypt must fail the run
# (here A's client is told B's device has no one-time keys, as a zhome that
# answered /keys/claim wrongly would). The browser's side alone is under
# test, so one engine is enough.
@pytest.mark.parametrize("db_config", ["sqlite3"], indirect=True)
def test_cinny_run_fails_when_b_cannot_decrypt(zhome: ZhomeProcess, cinny_web: str, tmp_path: Path) -> None:
    a, b = ClientUser(zhome, "alice"), ClientUser(zhome, "bob")
    out = tmp_path / "browser"
    result = _run_browser({**_scenario(zhome, cinny_web, a, b, "this one B must not read"), "break_claim": True,
                                   "read_ms": 15_000}, out)
    assert not result["ok"], result
    assert result["step"] == "B reads the message", result
    assert "B cannot read the message" in result["error"], result
    assert "unable to decrypt" in result["error"].lower(), result
    assert (out / "cinny-B.png").is_file() and (out / "cinny-B-console.log").is_file()
