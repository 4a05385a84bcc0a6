"""The /sync answer cache (zhome/sync/response_cache.py) on its own: reuse,
sharing, and every way an answer stops being the answer."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet import defer

from zhome.sync.response_cache import SyncResponseCache


def answer(n: int, rooms: bool = True) -> dict[str, Any]:
    return {"next_batch": f"s{n}", "rooms": {"join": {"!a:x": {}}} if rooms else {}}


class Counter:
    def __init__(self, empty: bool = False) -> None:
        self.calls = 0
        self.empty = empty
        self.gate: defer.Deferred[None] | None = None

    async def __call__(self, rooms: set[str]) -> dict[str, Any]:
        self.calls += 1
        rooms.update({"!a:x", "!b:x"})
        if self.gate is not None:
            await self.gate
        return answer(self.calls, rooms=not self.empty)


def cache(epoch: list[int] | None = None) -> SyncResponseCache:
    e = epoch if epoch is not None else [0]
    return SyncResponseCache(60_000, 1 << 20, lambda: e[0], lambda r: bool(r["rooms"]))


@pytest_twisted.ensureDeferred
async def test_the_same_request_is_answered_once() -> None:
    c, compute = cache(), Counter()
    first = await c.get("k", "@u:x", compute)
    again = await c.get("k", "@u:x", compute)
    assert compute.calls == 1 and again.text == first.text and '"s1"' in first.text
    # Another key (another since, filter, device) is another answer.
    await c.get("k2", "@u:x", compute)
    assert compute.calls == 2


@pytest_twisted.ensureDeferred
async def test_wakes_of_the_users_rooms_or_the_user_drop_it() -> None:
    c, compute = cache(), Counter()
    await c.get("k", "@u:x", compute)
    c.on_wake(["!other:x"], ["@someone:x"])
    await c.get("k", "@u:x", compute)
    assert compute.calls == 1
    c.on_wake(["!b:x"], [])
    await c.get("k", "@u:x", compute)
    assert compute.calls == 2
    c.on_wake([], ["@u:x"])
    await c.get("k", "@u:x", compute)
    assert compute.calls == 3


@pytest_twisted.ensureDeferred
async def test_in_flight_requests_share_and_a_wake_meanwhile_is_not_kept() -> None:
    c, compute = cache(), Counter()
    compute.gate = defer.Deferred()
    a = defer.ensureDeferred(c.get("k", "@u:x", compute))
    b = defer.ensureDeferred(c.get("k", "@u:x", compute))
    # One client gives up: the other still gets the answer.
    a.cancel()
    c.on_wake(["!a:x"], [])
    compute.gate.callback(None)
    got = await b
    assert compute.calls == 1 and '"s1"' in got.text
    compute.gate = None
    await c.get("k", "@u:x", compute)
    assert compute.calls == 2, "an answer computed across a wake of its rooms was kept"


@pytest_twisted.ensureDeferred
async def test_empty_answers_and_content_changes_are_not_kept() -> None:
    epoch = [0]
    c, empty = cache(epoch), Counter(empty=True)
    await c.get("k", "@u:x", empty)
    await c.get("k", "@u:x", empty)
    assert empty.calls == 2
    compute = Counter()
    await c.get("j", "@u:x", compute)
    epoch[0] += 1
    await c.get("j", "@u:x", compute)
    assert compute.calls == 2


@pytest_twisted.ensureDeferred
async def test_size_is_bounded() -> None:
    c = SyncResponseCache(60_000, 200, lambda: 0, lambda r: True)
    compute = Counter()
    for i in range(20):
        await c.get(f"k{i}", "@u:x", compute)
    assert c._bytes <= 200 and len(c._kept) < 20  # noqa: SLF001
