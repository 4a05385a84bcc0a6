"""Presence state in SQL and the service's timeouts, on both engines.

Spec: client-server-api "Presence": the server marks users unavailable when
idle and offline when their clients stop syncing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted

from tests.storage.test_event_graph import _server
from zhome.sync.presence import IDLE_AFTER_MS, REMOTE_OFFLINE_AFTER_MS, SYNC_OFFLINE_AFTER_MS

ALICE = "@alice:test.local"
BOB = "@bob:test.local"
REMOTE = "@rita:remote.example"


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t

    def advance_ms(self, ms: int) -> None:
        self.t += ms / 1000.0


@pytest_twisted.ensureDeferred
async def test_sync_marks_online_and_costs_nothing_after(tmp_path: Path, db_config: tuple[str, Any]) -> None:
    hs = await _server(tmp_path, db_config)
    clock = Clock()
    hs.presence.clock = clock
    p = hs.presence
    assert p.current_position() == 0
    await p.user_synced(ALICE, "online")
    pos = p.current_position()
    assert pos == 1 and hs.notifier.current_token().presence == 1
    # Syncing on changes nobody's view: no new stream position.
    for _ in range(5):
        clock.advance_ms(1000)
        await p.user_synced(ALICE, "online")
    assert p.current_position() == pos
    # offline leaves the state alone; unavailable changes it.
    await p.user_synced(ALICE, "offline")
    assert (await p.get_presence([ALICE]))[ALICE].state == "online"
    await p.user_synced(ALICE, "unavailable")
    assert (await p.get_presence([ALICE]))[ALICE].state == "unavailable"
    # A chosen "unavailable" is not undone by a client syncing as online.
    await p.set_status(ALICE, "unavailable", "in a meeting")
    await p.user_synced(ALICE, "online")
    got = (await p.get_presence([ALICE]))[ALICE]
    assert (got.state, got.status_msg) == ("unavailable", "in a meeting")
    await p.set_status(ALICE, "online")
    assert (await p.get_presence([ALICE]))[ALICE].status_msg == "in a meeting"
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_idle_and_offline_timeouts(tmp_path: Path, db_config: tuple[str, Any]) -> None:
    hs = await _server(tmp_path, db_config)
    clock = Clock()
    hs.presence.clock = clock
    p = hs.presence
    await p.set_status(ALICE, "online")
    await p.user_synced(BOB, "online")
    p.sync_started(BOB)
    clock.advance_ms(SYNC_OFFLINE_AFTER_MS + 1000)
    await p.check_timeouts()
    # Alice has no client syncing: offline. Bob's sync is still running.
    assert (await p.get_presence([ALICE]))[ALICE].state == "offline"
    assert (await p.get_presence([BOB]))[BOB].state == "online"
    # Still syncing but inactive for long: unavailable.
    clock.advance_ms(IDLE_AFTER_MS)
    await p.check_timeouts()
    assert (await p.get_presence([BOB]))[BOB].state == "unavailable"
    p.sync_ended(BOB)
    clock.advance_ms(SYNC_OFFLINE_AFTER_MS + 1000)
    await p.check_timeouts()
    assert (await p.get_presence([BOB]))[BOB].state == "offline"

    # A remote user whose server goes silent goes offline.
    await p.on_remote_presence("remote.example", [
        {"user_id": REMOTE, "presence": "online", "last_active_ago": 5, "currently_active": True},
        {"user_id": "@mallory:elsewhere.example", "presence": "online"},
        {"user_id": "@rita2:remote.example", "presence": "dancing"},
        "junk",
    ])
    seen = await p.get_presence([REMOTE, "@mallory:elsewhere.example", "@rita2:remote.example"])
    assert seen[REMOTE].state == "online"
    # Only a server's own users, in a known state.
    assert seen["@mallory:elsewhere.example"].stream_id == 0
    assert seen["@rita2:remote.example"].stream_id == 0
    clock.advance_ms(REMOTE_OFFLINE_AFTER_MS + 1000)
    await p.check_timeouts()
    assert (await p.get_presence([REMOTE]))[REMOTE].state == "offline"
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_changes_only_for_users_sharing_a_room(tmp_path: Path, db_config: tuple[str, Any]) -> None:
    hs = await _server(tmp_path, db_config)
    p = hs.presence
    await p.set_status(ALICE, "online")
    await p.set_status(BOB, "online")
    pos = p.current_position()
    assert {s.user_id for s in await p.changes_for_user(ALICE, 0, pos)} == {ALICE}
    room_id, _ = await hs.room_creation.create_room(ALICE, {"preset": "public_chat"})
    await hs.membership.update(BOB, BOB, room_id, "join")
    assert {s.user_id for s in await p.changes_for_user(ALICE, 0, pos)} == {ALICE, BOB}
    assert await p.changes_for_user(ALICE, pos, pos) == []
    events = await p.get_presence_events([BOB, "@nobody:test.local"])
    assert [e["sender"] for e in events] == [BOB] and events[0]["content"]["presence"] == "online"
    await hs.stop()
