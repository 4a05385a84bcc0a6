"""Unread counts by thread on both engines (zhome/storage/events.py,
room_unread; zhome/storage/relations.py, the thread of an event): counted
into the event's thread as it is persisted, the thread found by following
relations for at most three hops, replaced by thread, summed for the
badge, split correctly by a history purge, lowered by a redaction, and
the counts kept before migration 0036 carried over into the main
timeline.

Spec: client-server-api "Threaded read receipts", "Receiving
notifications" / "Marking notifications as read".
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest_twisted

from zhome.storage.database import Database
from zhome.storage.migrations import SCHEMA_DIR, find_schema_files, prepare_database
from zhome.storage.relations import MAIN_THREAD
from tests.storage.test_relations import ALICE, BOB, _rel, _room, _send, _server

DbConfig = tuple[str, dict[str, Any]]


def _msg(body: str, **extra: Any) -> dict[str, Any]:
    return {"msgtype": "m.text", "body": body, **extra}


@pytest_twisted.ensureDeferred
async def test_counts_go_to_the_events_thread(tmp_path: Path, db_config: DbConfig) -> None:
    hs = await _server(tmp_path, db_config)
    room_id = await _room(hs)  # Alice and Bob: every message of Bob's notifies Alice
    root = await _send(hs, room_id, BOB, _msg("root"))
    reply = await _send(hs, room_id, BOB, _msg("reply", **_rel("m.thread", root.event_id)))
    # A reference to a thread reply is in the thread (two hops), one to the
    # root is in the main timeline (the root is).
    ref_reply = await _send(hs, room_id, BOB, _msg("about the reply", **_rel("m.reference", reply.event_id)))
    ref_root = await _send(hs, room_id, BOB, _msg("about the root", **_rel("m.reference", root.event_id)))
    # Three hops still find the thread; a fourth does not.
    hop3 = await _send(hs, room_id, BOB, _msg("hop 3", **_rel("m.reference", ref_reply.event_id)))
    hop4 = await _send(hs, room_id, BOB, _msg("hop 4", **_rel("m.reference", hop3.event_id)))
    # A reaction notifies no one (.m.rule.reaction): no count anywhere.
    await _send(hs, room_id, BOB, _rel("m.annotation", reply.event_id, key="+1"), "m.reaction")
    threads = await hs.relations.threads_of([root, reply, ref_reply, ref_root, hop3, hop4])
    assert threads == {root.event_id: MAIN_THREAD, reply.event_id: root.event_id,
                       ref_reply.event_id: root.event_id, ref_root.event_id: MAIN_THREAD,
                       hop3.event_id: root.event_id, hop4.event_id: MAIN_THREAD}

    by_thread = await hs.events.get_unread_counts_by_thread(ALICE, [room_id])
    assert by_thread == {room_id: {MAIN_THREAD: (3, 0), root.event_id: (3, 0)}}
    # Totals: the room's and the badge's are over every thread.
    assert await hs.events.get_unread_counts(ALICE, room_id) == (6, 0)
    assert await hs.events.get_total_unread(ALICE) == 6
    # Alice's own reply counts for Bob, in the thread; and having sent it,
    # she has read everything before it ("Receiving notifications").
    await _send(hs, room_id, ALICE, _msg("mine", **_rel("m.thread", root.event_id)))
    assert await hs.events.get_unread_counts_by_thread(BOB, [room_id]) == {
        room_id: {root.event_id: (1, 0)}}
    assert await hs.events.get_total_unread(BOB) == 1
    assert await hs.events.get_unread_counts_by_thread(ALICE, [room_id]) == {}
    assert await hs.events.get_total_unread(ALICE) == 0

    # A redacted event has lost its relation: main timeline.
    await hs.event_creator.send(room_id, "m.room.redaction", BOB, {}, redacts=ref_reply.event_id)
    fresh = await hs.events.get_event(ref_reply.event_id)
    assert fresh is not None
    assert await hs.relations.threads_of([fresh]) == {ref_reply.event_id: MAIN_THREAD}
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_set_counts_by_thread(tmp_path: Path, db_config: DbConfig) -> None:
    hs = await _server(tmp_path, db_config)
    room_id = await _room(hs)
    ev = hs.events
    await ev.set_unread_counts(ALICE, room_id, {MAIN_THREAD: (2, 1), "$t1": (3, 0), "$t2": (0, 0)})
    # A thread without counts gets no row.
    assert await ev.get_unread_counts_by_thread(ALICE, [room_id]) == {
        room_id: {MAIN_THREAD: (2, 1), "$t1": (3, 0)}}
    # One thread replaced, the others kept.
    await ev.set_unread_counts(ALICE, room_id, {"$t1": (1, 1)}, only_thread="$t1")
    await ev.set_unread_counts(ALICE, room_id, {}, only_thread=MAIN_THREAD)
    assert await ev.get_unread_counts_by_thread(ALICE, [room_id]) == {room_id: {"$t1": (1, 1)}}
    await ev.set_unread_counts(ALICE, room_id, {"$t9": (4, 0)}, only_thread="$t2")
    assert await ev.get_unread_counts_by_thread(ALICE, [room_id]) == {room_id: {"$t1": (1, 1)}}
    # All replaced.
    await ev.set_unread_counts(ALICE, room_id, {"$t2": (5, 2)})
    assert await ev.get_unread_counts_by_thread(ALICE, [room_id]) == {room_id: {"$t2": (5, 2)}}
    assert await ev.get_unread_counts(ALICE, room_id) == (5, 2)
    await ev.set_unread_counts(ALICE, room_id, {})
    assert await ev.get_unread_counts_by_thread(ALICE, [room_id]) == {}
    assert await ev.get_unread_counts(ALICE, room_id) == (0, 0)
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_history_purge_lowers_each_threads_count(tmp_path: Path, db_config: DbConfig) -> None:
    hs = await _server(tmp_path, db_config)
    room_id = await _room(hs)
    root = await _send(hs, room_id, BOB, _msg("root"))
    await _send(hs, room_id, BOB, _msg("r1", **_rel("m.thread", root.event_id)))
    r2 = await _send(hs, room_id, BOB, _msg("r2", **_rel("m.thread", root.event_id)))
    # In the thread through its relation to r2.
    await _send(hs, room_id, BOB, _msg("about r2", **_rel("m.reference", r2.event_id)))
    await _send(hs, room_id, BOB, _msg("main 1"))
    cut = await _send(hs, room_id, BOB, _msg("main 2"))
    await _send(hs, room_id, BOB, _msg("r3", **_rel("m.thread", root.event_id)))
    assert await hs.events.get_unread_counts_by_thread(ALICE, [room_id]) == {
        room_id: {MAIN_THREAD: (3, 0), root.event_id: (4, 0)}}
    # Before "main 2": the root, r1, r2, the reference and "main 1" go (and
    # the room's creation events, which notified no one).
    await hs.privacy_store.purge_history(room_id, cut.internal["stream_ordering"], True, ":test.local")
    assert await hs.events.get_unread_counts_by_thread(ALICE, [room_id]) == {
        room_id: {MAIN_THREAD: (1, 0), root.event_id: (1, 0)}}
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_redaction_lowers_the_count_by_the_notification_log(tmp_path: Path, db_config: DbConfig) -> None:
    """A redaction takes its target off the counts of those the log says
    it notified, whether their row is still staged or already folded, in
    the target's thread, its highlight too; where retention removed the
    row, the count stays (the next receipt recounts it)."""
    hs = await _server(tmp_path, db_config)
    room_id = await _room(hs)

    async def redact(target: Any) -> None:
        await hs.event_creator.send(room_id, "m.room.redaction", BOB, {}, redacts=target.event_id)

    async def staged(target: Any) -> int:
        rows = await hs.db.execute("t", "SELECT COUNT(*) FROM user_notifications_staging WHERE event_id = ?",
                                   target.event_id)
        return int(rows[0][0])

    root = await _send(hs, room_id, BOB, _msg("root"))
    reply = await _send(hs, room_id, BOB, _msg("reply", **_rel("m.thread", root.event_id)))
    mention = await _send(hs, room_id, BOB, _msg("for alice", **{"m.mentions": {"user_ids": [ALICE]}}))
    assert await hs.events.get_unread_counts_by_thread(ALICE, [room_id]) == {
        room_id: {MAIN_THREAD: (2, 1), root.event_id: (1, 0)}}
    assert await staged(reply) == 1
    await redact(reply)
    assert await hs.events.get_unread_counts_by_thread(ALICE, [room_id]) == {room_id: {MAIN_THREAD: (2, 1)}}
    await hs.notification_log.store.fold()
    assert await staged(mention) == 0
    await redact(mention)
    assert await hs.events.get_unread_counts_by_thread(ALICE, [room_id]) == {room_id: {MAIN_THREAD: (1, 0)}}
    # A second redaction of it takes nothing more off.
    await redact(mention)
    assert await hs.events.get_unread_counts_by_thread(ALICE, [room_id]) == {room_id: {MAIN_THREAD: (1, 0)}}
    # Retention removed the log's rows: the count is left as it is.
    later = await _send(hs, room_id, BOB, _msg("later"))
    assert await hs.notification_log.store.delete_older_than(2 ** 62) > 0
    await redact(later)
    assert await hs.events.get_unread_counts_by_thread(ALICE, [room_id]) == {room_id: {MAIN_THREAD: (2, 0)}}
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_migration_keeps_counts_in_the_main_timeline(db_config: DbConfig, tmp_path: Path) -> None:
    schema = tmp_path / "schema"
    schema.mkdir()
    files = find_schema_files(SCHEMA_DIR)
    target = next(f for f in files if f.version == 36)
    for f in files:
        if f.version < 36:
            shutil.copy(f.path, schema / f.path.name)
    db = Database(*db_config)
    try:
        assert await prepare_database(db, schema) == 35
        await db.execute("old", "INSERT INTO room_unread (user_id, room_id, notification_count, highlight_count)"
                         " VALUES (?, ?, ?, ?)", ALICE, "!r:test.local", 4, 1)
        shutil.copy(target.path, schema / target.path.name)
        assert await prepare_database(db, schema) == 36
        rows = await db.execute("new", "SELECT user_id, room_id, thread_id, notification_count, highlight_count"
                                " FROM room_unread")
        assert [tuple(r) for r in rows] == [(ALICE, "!r:test.local", MAIN_THREAD, 4, 1)]

        # The new key: one row per thread, the upsert adds up within one.
        def upsert(txn: Any) -> None:
            txn.executemany(
                "INSERT INTO room_unread (user_id, room_id, thread_id, notification_count, highlight_count)"
                " VALUES (?,?,?,?,?) ON CONFLICT (user_id, room_id, thread_id) DO UPDATE SET"
                " notification_count = room_unread.notification_count + excluded.notification_count,"
                " highlight_count = room_unread.highlight_count + excluded.highlight_count",
                [(ALICE, "!r:test.local", MAIN_THREAD, 1, 0), (ALICE, "!r:test.local", "$root", 2, 1)])

        await db.run_interaction("upsert", upsert)
        rows = await db.execute("new", "SELECT thread_id, notification_count, highlight_count FROM room_unread")
        assert sorted(tuple(r) for r in rows) == [("$root", 2, 1), (MAIN_THREAD, 5, 1)]
    finally:
        await db.close()
