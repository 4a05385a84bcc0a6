"""The notification log in SQL, on both engines: rows written with the
event (and rolled back with it), pages with read state from receipts, and
retention by count and by age.

Spec: client-server-api "Push Notifications" → "Listing Notifications".
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import defer, reactor, task

from tests.storage.test_event_graph import _server
from zhome.server import HomeServer
from zhome.storage.database import Txn

ALICE = "@alice:test.local"
BOB = "@bob:test.local"


async def _room(hs: HomeServer) -> str:
    room_id, _ = await hs.room_creation.create_room(ALICE, {"preset": "public_chat"})
    await hs.membership.update(BOB, BOB, room_id, "join")
    return room_id


async def _say(hs: HomeServer, room_id: str, body: str, sender: str = ALICE) -> str:
    ev = await hs.event_creator.send(room_id, "m.room.message", sender, {"msgtype": "m.text", "body": body})
    return ev.event_id


async def _rows(hs: HomeServer, user_id: str) -> list[tuple[Any, ...]]:
    # Rows are staged first and moved into the log by a pass (or a read).
    await hs.notification_log.store.fold()
    return await hs.db.execute("t", "SELECT event_id, stream_ordering, highlight FROM user_notifications"
                               " WHERE user_id = ? ORDER BY stream_ordering", user_id)


@pytest_twisted.ensureDeferred
async def test_rows_follow_push_rules_and_receipts(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    hs = await _server(tmp_path, db_config)
    room_id = await _room(hs)
    first = await _say(hs, room_id, "hello")
    mention = (await hs.event_creator.send(room_id, "m.room.message", ALICE, {
        "msgtype": "m.text", "body": "look", "m.mentions": {"user_ids": [BOB]}})).event_id

    # Bob's rules notified him; Alice sent both and has none.
    rows = await _rows(hs, BOB)
    assert [(r[0], r[2]) for r in rows] == [(first, 0), (mention, 1)]
    assert await _rows(hs, ALICE) == []
    first_so = (await hs.events.get_event(first)).internal["stream_ordering"]  # type: ignore[union-attr]
    assert rows[0][1] == first_so

    entries, token = await hs.notification_log.get_page(BOB, None, 10, False)
    assert [e.event.event_id for e in entries] == [mention, first] and token is None
    assert [e.read for e in entries] == [False, False]
    assert "notify" in entries[1].notification.actions and entries[0].notification.highlight
    highlights, _ = await hs.notification_log.get_page(BOB, None, 10, True)
    assert [e.event.event_id for e in highlights] == [mention]

    await hs.user_data.set_receipt(room_id, "m.read", BOB, first, {"ts": 1})
    entries, _ = await hs.notification_log.get_page(BOB, None, 10, False)
    assert [e.read for e in entries] == [False, True]
    # Paging below a position, with a token while more remain.
    page, token = await hs.notification_log.get_page(BOB, None, 1, False)
    assert [e.event.event_id for e in page] == [mention] and token is not None
    page, token = await hs.notification_log.get_page(BOB, int(token), 1, False)
    assert [e.event.event_id for e in page] == [first] and token is None
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_rows_roll_back_with_the_event(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    hs = await _server(tmp_path, db_config)
    room_id = await _room(hs)

    def fail(txn: Txn, item: Any) -> None:
        raise RuntimeError("boom")

    hs.persister.txn_hooks.append(fail)
    try:
        await _say(hs, room_id, "lost")
    except RuntimeError:
        pass
    else:
        raise AssertionError("the failing hook did not fail the send")
    hs.persister.txn_hooks.remove(fail)
    assert await _rows(hs, BOB) == []
    await _say(hs, room_id, "kept")
    assert len(await _rows(hs, BOB)) == 1
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_count_retention(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    hs = await _server(tmp_path, db_config)
    room_id = await _room(hs)
    log = hs.notification_log
    log.max_per_user, log.trim_every = 5, 3
    sent = []
    for i in range(12):
        sent.append(await _say(hs, room_id, f"m{i}"))
        await log.flush()
    # Trimmed after the 3rd, 6th, 9th and 12th: the newest five remain.
    assert [r[0] for r in await _rows(hs, BOB)] == sent[-5:]
    for i in range(2):
        sent.append(await _say(hs, room_id, f"more{i}"))
        await log.flush()
    # No trim until the next third notification: growth is bounded, not exact.
    assert [r[0] for r in await _rows(hs, BOB)] == sent[-7:]
    sent.append(await _say(hs, room_id, "third"))
    await log.flush()
    assert [r[0] for r in await _rows(hs, BOB)] == sent[-5:]
    # Sends alone never trim: the periodic pass does.
    for i in range(3):
        sent.append(await _say(hs, room_id, f"late{i}"))
    assert len(await _rows(hs, BOB)) == 8
    await log.expire_once()
    assert [r[0] for r in await _rows(hs, BOB)] == sent[-5:]
    # Trimming one user leaves the others alone.
    await _say(hs, room_id, "from bob", sender=BOB)
    assert await hs.notification_log.store.trim_user(BOB, 2) == 3
    assert len(await _rows(hs, ALICE)) == 1
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_age_retention(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    hs = await _server(tmp_path, db_config)
    room_id = await _room(hs)
    recent = await _say(hs, room_id, "recent")
    log = hs.notification_log
    old_ts = int(time.time() * 1000) - log.max_age_ms - 60_000
    await hs.db.run_interaction("old", log.store.insert_txn, [
        (BOB, room_id, "$old1", 1, old_ts, '["notify"]', 0),
        (BOB, room_id, "$old2", 2, old_ts, '["notify"]', 0),
    ])
    assert len(await _rows(hs, BOB)) == 3
    assert await log.expire_once() == 2
    assert [r[0] for r in await _rows(hs, BOB)] == [recent]
    await hs.stop()


async def _count(hs: HomeServer, table: str) -> int:
    rows = await hs.db.execute("t", f"SELECT COUNT(*) FROM {table}")
    return int(rows[0][0])


@pytest_twisted.ensureDeferred
async def test_staged_rows_are_read_moved_once_and_purged(tmp_path: Path,
                                                         db_config: tuple[str, dict[str, Any]]) -> None:
    """Rows are appended to the staging table with the event; every read
    and delete of the log moves them over first, each row exactly once,
    so nothing staged is missed by a reader or left behind by a purge."""
    hs = await _server(tmp_path, db_config)
    room_id = await _room(hs)
    ids = [await _say(hs, room_id, f"m{i}") for i in range(3)]
    assert await _count(hs, "user_notifications_staging") == 3
    # A read moves them first and sees them all.
    entries, _ = await hs.notification_log.get_page(BOB, None, 10, False)
    assert [e.event.event_id for e in entries] == ids[::-1]
    assert await _count(hs, "user_notifications_staging") == 0
    assert await _count(hs, "user_notifications") == 3
    # Folds at the same time move nothing twice.
    more = [await _say(hs, room_id, f"n{i}") for i in range(3)]
    moved = await defer.gatherResults([defer.ensureDeferred(hs.notification_log.store.fold()) for _ in range(4)])
    assert sum(moved) == 3
    assert await _count(hs, "user_notifications") == 6
    # A purge of events meets their rows though they are still staged.
    gone = await _say(hs, room_id, "gone")
    assert await _count(hs, "user_notifications_staging") == 1
    await hs.privacy_store.purge_content([gone, more[0]])
    assert await _count(hs, "user_notifications_staging") == 0
    left = await hs.db.execute("t", "SELECT event_id FROM user_notifications")
    assert {r[0] for r in left} == set(ids + more[1:])
    # The background pass moves what is staged without any read.
    await _say(hs, room_id, "later")
    for _ in range(100):
        if await _count(hs, "user_notifications_staging") == 0:
            break
        await task.deferLater(reactor, 0.05, lambda: None)
    assert await _count(hs, "user_notifications_staging") == 0
    await hs.stop()
