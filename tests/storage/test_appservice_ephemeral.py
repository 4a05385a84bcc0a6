"""The persistent queue of ephemeral events for application services
(zhome/storage/appservice_ephemeral.py) on both engines: order, the bound
of 1000 waiting rows per service, rows marked for a transaction kept as
they are until it is acknowledged, stale typing notices dropped only from
new transactions, and erasure and room purges."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted

from tests.storage.test_event_graph import _server
from zhome.storage.appservice_ephemeral import MAX_QUEUED, TYPING_MAX_AGE_MS, AppServiceEphemeralStore
from zhome.storage.database import Database, Txn
from zhome.storage.ids import IdGenerator

NOW = 1_800_000_000_000


def _receipt(room: str, user: str, n: int) -> dict[str, Any]:
    return {"type": "m.receipt", "room_id": room, "content": {f"$e{n}": {"m.read": {user: {"ts": n}}}}}


def _typing(room: str, users: list[str]) -> dict[str, Any]:
    return {"type": "m.typing", "room_id": room, "content": {"user_ids": users}}


def _presence(user: str) -> dict[str, Any]:
    return {"type": "m.presence", "sender": user, "content": {"presence": "online"}}


async def _store(db: Database) -> AppServiceEphemeralStore:
    return AppServiceEphemeralStore(db, await IdGenerator.from_table(db, "appservice_ephemeral", "id"))


async def _take(db: Database, as_id: str, txn_id: int, limit: int = 100, now: int = NOW) -> int:
    def fn(txn: Txn) -> int:
        return AppServiceEphemeralStore.take_txn(txn, as_id, txn_id, now, limit)

    return await db.run_interaction("t", fn)


async def _ack(db: Database, as_id: str, txn_id: int) -> None:
    await db.run_interaction("t", lambda txn: AppServiceEphemeralStore.delete_txn(txn, as_id, txn_id))


async def _count(db: Database, as_id: str) -> int:
    rows = await db.execute("t", "SELECT COUNT(*) FROM appservice_ephemeral WHERE as_id = ?", as_id)
    return int(rows[0][0])


@pytest_twisted.ensureDeferred
async def test_order_take_and_delete_on_ack(database: Database) -> None:
    store = await _store(database)
    sent = [_receipt("!r:x", f"@u{i}:x", i) for i in range(5)]
    for i, ev in enumerate(sent):
        await store.push(["a", "b"], ev, f"@u{i}:x", NOW)
    assert await _take(database, "a", 1, limit=3) == 3
    assert await store.carried("a", 1) == sent[:3]
    # Another service's rows are its own.
    assert await store.carried("b", 1) == []
    # Pushed while transaction 1 is in flight: not added to it.
    late = _receipt("!r:x", "@late:x", 9)
    await store.push(["a"], late, "@late:x", NOW)
    assert await store.carried("a", 1) == sent[:3]
    # Not acknowledged: the same rows again (a retry, a restart).
    again = await _store(database)
    assert await again.carried("a", 1) == sent[:3]
    await _ack(database, "a", 1)
    assert await store.carried("a", 1) == []
    assert await _take(database, "a", 2) == 3
    assert await store.carried("a", 2) == sent[3:] + [late]
    await _ack(database, "a", 2)
    assert await _count(database, "a") == 0
    assert await _count(database, "b") == 5
    # Nothing left: a new transaction takes nothing.
    assert await _take(database, "a", 3) == 0


@pytest_twisted.ensureDeferred
async def test_bound_drops_oldest_waiting_never_marked(database: Database) -> None:
    store = await _store(database)
    for i in range(3):
        await store.push(["a"], _receipt("!r:x", "@u:x", i), "@u:x", NOW)
    assert await _take(database, "a", 1, limit=3) == 3
    total = MAX_QUEUED + 50
    for i in range(3, 3 + total):
        await store.push(["a"], _receipt("!r:x", "@u:x", i), "@u:x", NOW)
    # The transaction in flight keeps its rows; of the waiting ones the
    # newest MAX_QUEUED are left.
    assert [e["content"] for e in await store.carried("a", 1)] == [_receipt("!r:x", "@u:x", i)["content"]
                                                                    for i in range(3)]
    assert await _count(database, "a") == 3 + MAX_QUEUED
    await _ack(database, "a", 1)
    assert await _take(database, "a", 2, limit=MAX_QUEUED) == MAX_QUEUED
    carried = await store.carried("a", 2)
    assert [next(iter(e["content"])) for e in carried] == [f"$e{i}" for i in range(3 + 50, 3 + total)]


@pytest_twisted.ensureDeferred
async def test_stale_typing_dropped_from_new_transactions_only(database: Database) -> None:
    store = await _store(database)
    old = NOW - TYPING_MAX_AGE_MS - 1000
    await store.push(["a"], _typing("!r:x", ["@t:x"]), None, old)
    await store.push(["a"], _presence("@p:x"), "@p:x", old)
    await store.push(["a"], _typing("!r:x", ["@t2:x"]), None, NOW - 1000)
    assert await _take(database, "a", 1) == 2
    assert [e["type"] for e in await store.carried("a", 1)] == ["m.presence", "m.typing"]
    # A typing notice marked for a transaction in flight stays, however old.
    await store.push(["b"], _typing("!r:x", ["@t:x"]), None, NOW)
    assert await _take(database, "b", 1) == 1
    assert await _take(database, "b", 2, now=NOW + 10 * TYPING_MAX_AGE_MS) == 0
    assert [e["type"] for e in await store.carried("b", 1)] == ["m.typing"]


@pytest_twisted.ensureDeferred
async def test_forget_user_and_room(database: Database) -> None:
    store = await _store(database)
    await store.push(["a"], _receipt("!r:x", "@gone:x", 1), "@gone:x", NOW)
    await store.push(["a"], _presence("@gone:x"), "@gone:x", NOW)
    await store.push(["a"], _typing("!r:x", ["@other:x", "@gone:x"]), None, NOW)
    await store.push(["a"], _typing("!s:x", ["@other:x"]), None, NOW)
    await store.push(["a"], _receipt("!r:x", "@other:x", 2), "@other:x", NOW)
    await store.push(["a"], _presence("@other:x"), "@other:x", NOW)
    assert await _take(database, "a", 1, limit=2) == 2  # marked rows go too
    await database.run_interaction("t", lambda txn: AppServiceEphemeralStore.forget_user_txn(txn, "@gone:x"))
    rows = await database.execute("t", "SELECT event FROM appservice_ephemeral ORDER BY id")
    assert all("@gone:x" not in r[0] for r in rows), rows
    assert len(rows) == 3
    await database.run_interaction("t", lambda txn: AppServiceEphemeralStore.forget_room_txn(txn, "!r:x"))
    rows = await database.execute("t", "SELECT edu_type, room_id FROM appservice_ephemeral ORDER BY id")
    assert rows == [("m.typing", "!s:x"), ("m.presence", None)]


@pytest_twisted.ensureDeferred
async def test_erasure_and_purge_delete_queued_rows(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    """The privacy store's user traces and room purge reach the queue."""
    hs = await _server(tmp_path, db_config)
    try:
        store = await _store(hs.db)
        gone, other = "@alice:test.local", "@bob:test.local"
        await store.push(["a"], _receipt("!r:x", gone, 1), gone, NOW)
        await store.push(["a"], _presence(gone), gone, NOW)
        await store.push(["a"], _typing("!t:x", [gone]), None, NOW)
        await store.push(["a"], _receipt("!p:x", other, 2), other, NOW)
        await store.push(["a"], _presence(other), other, NOW)
        await hs.privacy_store.delete_user_traces(gone)
        rows = await hs.db.execute("t", "SELECT edu_type, room_id, user_id FROM appservice_ephemeral ORDER BY id")
        assert rows == [("m.receipt", "!p:x", other), ("m.presence", None, other)]
        await hs.privacy_store.purge_room("!p:x")
        rows = await hs.db.execute("t", "SELECT edu_type, room_id, user_id FROM appservice_ephemeral ORDER BY id")
        assert rows == [("m.presence", None, other)]
    finally:
        await hs.stop()
