"""The push delivery workers against fakes: retries with bounded backoff,
no retry for a refusal, rejected pushkeys, positions, and the body.

Spec: Push Gateway API ``POST /_matrix/push/v1/notify``; client-server-api
"Push Notifications" → "Pushers".
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest_twisted
from twisted.internet import defer, task

from zhome.push.delivery import PushDelivery, priority_of, tweaks_of
from zhome.storage.notifications import StoredNotification
from zhome.storage.pushers import Pusher

ALICE = "@alice:test.local"
URL = "http://127.0.0.1:1/_matrix/push/v1/notify"


@dataclass
class FakeEvent:
    event_id: str
    type: str = "m.room.message"
    sender: str = "@bob:test.local"
    content: dict[str, Any] = field(default_factory=lambda: {"msgtype": "m.text", "body": "hi"})
    state_key: Optional[str] = None
    rejected_reason: Optional[str] = None
    pdu: dict[str, Any] = field(default_factory=dict)


class FakeStore:
    def __init__(self, pushers: list[Pusher]) -> None:
        self.pushers = pushers
        self.advanced: list[tuple[int, int]] = []
        self.deleted: list[int] = []

    async def get_all(self, kind: str) -> list[Pusher]:
        return [p for p in self.pushers if p.kind == kind]

    async def advance(self, pusher_id: int, so: int) -> None:
        self.advanced.append((pusher_id, so))

    async def delete_by_id(self, pusher_id: int) -> bool:
        self.deleted.append(pusher_id)
        return True


class FakeNotifications:
    def __init__(self, rows: list[StoredNotification]) -> None:
        self.rows = rows

    async def get_after(self, user_id: str, after: int, upto: int, limit: int) -> list[StoredNotification]:
        return [r for r in self.rows if after < r.stream_ordering <= upto][:limit]


class FakeEvents:
    async def get_event(self, event_id: str) -> Any:
        return FakeEvent(event_id)

    async def get_current_state_event_id(self, room_id: str, etype: str, state_key: str) -> Optional[str]:
        return None

    async def get_total_unread(self, user_id: str) -> int:
        return 3


def _pusher(pid: int = 1, pushkey: str = "key", data: Optional[dict[str, Any]] = None) -> Pusher:
    return Pusher(pid, ALICE, "DEV", 1, "http", "org.example", pushkey, 1_700_000_000_000, "App", "Phone", None,
                  "en", data or {"url": URL}, 0)


def _row(so: int, actions: Optional[list[Any]] = None) -> StoredNotification:
    return StoredNotification("!r:test.local", f"$e{so}", so, int(time.time() * 1000),
                              actions if actions is not None else ["notify"], False)


class Gateway:
    """post_json that answers from a script: an exception, or (status, body)."""

    def __init__(self, script: list[Any]) -> None:
        self.script = list(script)
        self.calls: list[dict[str, Any]] = []

    async def post(self, url: str, body: dict[str, Any]) -> tuple[int, Any]:
        self.calls.append(body)
        answer = self.script.pop(0) if self.script else (200, {"rejected": []})
        if isinstance(answer, Exception):
            raise answer
        return answer


def _pool(gw: Gateway, rows: list[StoredNotification], pushers: list[Pusher], clock: task.Clock) -> tuple[
        PushDelivery, FakeStore]:
    store = FakeStore(pushers)
    pool = PushDelivery(store, FakeNotifications(rows), FakeEvents(), gw.post,  # type: ignore[arg-type]
                        lambda: max((r.stream_ordering for r in rows), default=0), clock=clock,
                        retry_min_s=1.0, retry_max_s=4.0)
    return pool, store


async def _settle() -> None:
    for _ in range(20):
        await defer.succeed(None)


@pytest_twisted.ensureDeferred
async def test_retries_with_backoff_then_delivers_in_order() -> None:
    clock = task.Clock()
    gw = Gateway([ConnectionRefusedError(), (503, None), (200, {"rejected": []})])
    pool, store = _pool(gw, [_row(5), _row(7)], [_pusher()], clock)
    await pool.start()
    await _settle()
    assert len(gw.calls) == 1
    clock.advance(1.0)
    await _settle()
    assert len(gw.calls) == 2
    clock.advance(1.9)
    await _settle()
    assert len(gw.calls) == 2
    clock.advance(0.1)
    await _settle()
    # Delivered the first, then the second, positions recorded after each.
    assert [c["notification"]["event_id"] for c in gw.calls] == ["$e5", "$e5", "$e5", "$e7"]
    assert store.advanced == [(1, 5), (1, 7)]
    await pool.stop()


@pytest_twisted.ensureDeferred
async def test_attempts_are_bounded_and_refusals_not_retried() -> None:
    clock = task.Clock()
    from zhome.push import delivery

    gw = Gateway([ConnectionRefusedError()] * delivery.MAX_ATTEMPTS + [(400, {"errcode": "M_BAD_JSON"})])
    pool, store = _pool(gw, [_row(1), _row(2), _row(3)], [_pusher()], clock)
    await pool.start()
    for _ in range(delivery.MAX_ATTEMPTS + 2):
        await _settle()
        clock.advance(4.0)
    await _settle()
    # MAX_ATTEMPTS for the first, one for the refused second, one for the third.
    assert len(gw.calls) == delivery.MAX_ATTEMPTS + 2
    assert store.advanced == [(1, 1), (1, 2), (1, 3)]
    await pool.stop()


@pytest_twisted.ensureDeferred
async def test_rejected_pushkey_removes_the_pusher() -> None:
    clock = task.Clock()
    gw = Gateway([(200, {"rejected": ["key"]})])
    pool, store = _pool(gw, [_row(1), _row(2)], [_pusher()], clock)
    await pool.start()
    await _settle()
    assert len(gw.calls) == 1 and store.deleted == [1]
    assert not pool.has_pushers(ALICE)
    # Someone else's pushkey in the list does not count.
    gw2 = Gateway([(200, {"rejected": ["other"]})])
    pool2, store2 = _pool(gw2, [_row(1), _row(2)], [_pusher()], clock)
    await pool2.start()
    await _settle()
    assert len(gw2.calls) == 2 and store2.deleted == []
    await pool.stop()
    await pool2.stop()


@pytest_twisted.ensureDeferred
async def test_stop_cancels_a_pending_retry() -> None:
    clock = task.Clock()
    gw = Gateway([ConnectionRefusedError()] * 5)
    pool, store = _pool(gw, [_row(1)], [_pusher()], clock)
    await pool.start()
    await _settle()
    await pool.stop()
    clock.advance(100)
    await _settle()
    assert len(gw.calls) == 1 and store.advanced == []


@pytest_twisted.ensureDeferred
async def test_body_formats() -> None:
    clock = task.Clock()
    actions = ["notify", {"set_tweak": "sound", "value": "default"}, {"set_tweak": "highlight"}]
    gw = Gateway([])
    pool, _ = _pool(gw, [_row(1, actions)], [_pusher(data={"url": URL, "format": "event_id_only", "x": 1})],
                    clock)
    await pool.start()
    await _settle()
    [body] = gw.calls
    assert body == {"notification": {
        "event_id": "$e1", "room_id": "!r:test.local", "prio": "high", "counts": {"unread": 3},
        "devices": [{"app_id": "org.example", "pushkey": "key", "pushkey_ts": 1_700_000_000,
                     "data": {"format": "event_id_only", "x": 1},
                     "tweaks": {"sound": "default", "highlight": True}}]}}
    await pool.stop()
    assert tweaks_of(["notify", {"set_tweak": "highlight", "value": False}]) == {"highlight": False}
    assert priority_of(FakeEvent("$x"), ["notify"]) == "low"  # type: ignore[arg-type]
    assert priority_of(FakeEvent("$x", type="m.room.encrypted"), ["notify"]) == "high"  # type: ignore[arg-type]
