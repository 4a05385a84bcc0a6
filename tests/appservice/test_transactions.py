"""The per-service transaction queue (zhome/appservice/transactions.py) on
both engines: batches of at most 100 in order, a failed transaction sent
again with the same ID and events, the transaction in flight surviving a
restart, nothing sent twice."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any, Iterable, Optional

import pytest_twisted
from twisted.internet import defer, task

from zhome.appservice.registration import parse_registration
from zhome.appservice.transactions import AppServiceTransactions
from zhome.storage.appservice_ephemeral import AppServiceEphemeralStore
from zhome.storage.database import Database, Txn
from zhome.storage.ids import IdGenerator
from zhome.util.reactor import reactor

SERVICE = parse_registration({"id": "b", "url": "http://127.0.0.1:1", "as_token": "a", "hs_token": "h",
                              "sender_localpart": "bot",
                              "namespaces": {"users": [{"exclusive": True, "regex": "@b_.*"}]}},
                             "b.yaml", "example.org")


class FakeService:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.ephemeral: list[tuple[str, Any]] = []
        self.fail = 0

    async def request(self, method: str, url: str, token: str, body: Optional[Any],
                      timeout: float) -> tuple[int, Any, str]:
        assert method == "PUT" and token == "h"
        txn_id = url.rsplit("/", 1)[1]
        self.calls.append((txn_id, [e["event_id"] for e in body["events"]]))
        self.ephemeral.append((txn_id, body.get("ephemeral")))
        if self.fail > 0:
            self.fail -= 1
            return 500, None, "no"
        return 200, {}, "{}"


async def _make(db: Database, svc: FakeService,
                services: Optional[list[Any]] = None) -> AppServiceTransactions:
    async def get_events(ids: Iterable[str]) -> dict[str, Any]:
        return {i: SimpleNamespace(event_id=i) for i in ids}

    async def serialize(evs: list[Any]) -> list[dict[str, Any]]:
        return [{"event_id": e.event_id} for e in evs]

    async def aliases(room_id: str) -> list[str]:
        return []

    return AppServiceTransactions(services or [SERVICE], db,
                                  await IdGenerator.from_table(db, "appservice_queue", "id"),
                                  get_events, serialize, aliases, svc.request,
                                  ephemeral=AppServiceEphemeralStore(
                                      db, await IdGenerator.from_table(db, "appservice_ephemeral", "id")))


async def _enqueue(db: Database, txns: AppServiceTransactions, event_ids: list[str]) -> None:
    def txn_fn(txn: Txn) -> None:
        for eid in event_ids:
            txns.persist_txn_hook(txn, SimpleNamespace(event=SimpleNamespace(event_id=eid),  # type: ignore[arg-type]
                                                       appservices=["b"]))

    await db.run_interaction("t", txn_fn)


async def _until(check: Any, seconds: float = 15) -> None:
    for _ in range(int(seconds * 20)):
        if check():
            return
        await task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("timed out")


@pytest_twisted.ensureDeferred
async def test_batches_in_order(database: Database) -> None:
    svc = FakeService()
    txns = await _make(database, svc)
    ids = [f"$e{i:03d}" for i in range(250)]
    await _enqueue(database, txns, ids)
    txns.wake("b")
    await _until(lambda: sum(len(c[1]) for c in svc.calls) >= 250)
    txns.stop()
    assert [len(c[1]) for c in svc.calls] == [100, 100, 50]
    assert [e for c in svc.calls for e in c[1]] == ids
    assert [c[0] for c in svc.calls] == ["1", "2", "3"]
    assert await database.execute("t", "SELECT COUNT(*) FROM appservice_queue") == [(0,)]


@pytest_twisted.ensureDeferred
async def test_retry_same_txn_and_restart(database: Database) -> None:
    svc = FakeService()
    svc.fail = 2
    txns = await _make(database, svc)
    await _enqueue(database, txns, ["$a", "$b"])
    txns.wake("b")
    await _until(lambda: len(svc.calls) >= 2)
    # Queued while the first transaction is failing: not added to it.
    await _enqueue(database, txns, ["$c"])
    txns.wake("b")
    txns.stop()
    await defer.succeed(None)
    # A new process: the transaction in flight is sent again first.
    svc.fail = 0
    again = await _make(database, svc)
    await again.start()
    await _until(lambda: any("$c" in c[1] for c in svc.calls))
    again.stop()
    first_id, first_events = svc.calls[0]
    assert all(c == (first_id, first_events) for c in svc.calls[:-1]), svc.calls
    assert first_events == ["$a", "$b"]
    assert svc.calls[-1] == (str(int(first_id) + 1), ["$c"])
    delivered = [c for c in svc.calls]
    # Exactly once each in what was accepted: the last attempt of each ID.
    accepted = {t: evs for t, evs in delivered}
    assert [e for t in sorted(accepted, key=int) for e in accepted[t]] == ["$a", "$b", "$c"]


EPH_SERVICE = parse_registration({"id": "b", "url": "http://127.0.0.1:1", "as_token": "a", "hs_token": "h",
                                  "sender_localpart": "bot", "receive_ephemeral": True,
                                  "namespaces": {"users": [{"exclusive": True, "regex": "@b_.*"}]}},
                                 "b.yaml", "example.org")


@pytest_twisted.ensureDeferred
async def test_ephemeral_retry_same_txn_and_restart(database: Database) -> None:
    svc = FakeService()
    svc.fail = 2
    txns = await _make(database, svc, [EPH_SERVICE])
    receipt = {"type": "m.receipt", "room_id": "!r:x", "content": {"$a": {"m.read": {"@u:x": {"ts": 1}}}}}
    presence = {"type": "m.presence", "sender": "@b_p:x", "content": {"presence": "online"}}
    await _enqueue(database, txns, ["$a"])
    # Queued before the loop runs (push_ephemeral would wake it at once).
    await txns.ephemeral.push(["b"], receipt, "@u:x", int(time.time() * 1000))
    await txns.ephemeral.push(["b"], presence, "@b_p:x", int(time.time() * 1000))
    txns.wake("b")
    await _until(lambda: len(svc.calls) >= 2)
    # Pushed while the first transaction is failing: not added to it.
    later = dict(receipt, content={"$b": {"m.read": {"@u:x": {"ts": 2}}}})
    await txns.push_ephemeral([EPH_SERVICE], later, "@u:x")
    txns.stop()
    await defer.succeed(None)
    # A new process: the transaction in flight comes again, as it was.
    svc.fail = 0
    again = await _make(database, svc, [EPH_SERVICE])
    await again.start()
    await _until(lambda: any(e == [later] for _, e in svc.ephemeral))
    await task.deferLater(reactor, 0.3, lambda: None)
    again.stop()
    first_id, first_eph = svc.ephemeral[0]
    assert first_eph == [receipt, presence]
    assert all(c == (first_id, first_eph) for c in svc.ephemeral[:-1]), svc.ephemeral
    assert len(svc.ephemeral) >= 3  # two refused attempts, then accepted after the restart
    assert svc.ephemeral[-1] == (str(int(first_id) + 1), [later])
    # Acknowledged: gone, and not sent again.
    assert await database.execute("t", "SELECT COUNT(*) FROM appservice_ephemeral") == [(0,)]
    n = len(svc.calls)
    third = await _make(database, svc, [EPH_SERVICE])
    await third.start()
    await task.deferLater(reactor, 0.3, lambda: None)
    third.stop()
    assert len(svc.calls) == n


@pytest_twisted.ensureDeferred
async def test_no_ephemeral_rows_without_receive_ephemeral(database: Database) -> None:
    svc = FakeService()
    txns = await _make(database, svc)
    await txns.push_ephemeral([SERVICE], {"type": "m.typing", "room_id": "!r:x", "content": {"user_ids": []}})
    assert await database.execute("t", "SELECT COUNT(*) FROM appservice_ephemeral") == [(0,)]
    assert svc.calls == []
    txns.stop()
