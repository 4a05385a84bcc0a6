"""Paginating room history with /messages, driven by matrix-nio.

Spec: client-server-api "Syncing" (prev_batch), "GET /rooms/{roomId}/messages"
(from, to, dir, limit, filter) and "History visibility".
"""

from __future__ import annotations

import asyncio
from typing import Any, Optional

import nio

from tests.e2e.harness import ZhomeProcess

PASSWORD = "correct horse battery staple"
TOTAL = 500
PAGE = 100


async def _client(base: str, name: str) -> nio.AsyncClient:
    c = nio.AsyncClient(base, name)
    resp = await c.register(name, PASSWORD)
    assert isinstance(resp, nio.RegisterResponse), resp
    return c


def _numbers(events: list[Any]) -> list[int]:
    return [e.source["content"]["n"] for e in events
            if e.source.get("type") == "m.room.message" and isinstance(e.source.get("content", {}).get("n"), int)]


def _bodies(events: list[Any]) -> list[str]:
    return [e.source["content"].get("body") for e in events if e.source.get("type") == "m.room.message"]


async def _page(client: nio.AsyncClient, room_id: str, start: str, end: Optional[str] = None,
                direction: nio.MessageDirection = nio.MessageDirection.back, limit: int = PAGE,
                message_filter: Optional[dict[str, Any]] = None) -> nio.RoomMessagesResponse:
    resp = await client.room_messages(room_id, start=start, end=end, direction=direction, limit=limit,
                                      message_filter=message_filter)
    assert isinstance(resp, nio.RoomMessagesResponse), resp
    assert len(resp.chunk) <= limit, (len(resp.chunk), limit)
    return resp


async def _page_all(client: nio.AsyncClient, room_id: str, start: str,
                    direction: nio.MessageDirection) -> tuple[list[Any], list[str], str]:
    """Follow ``end`` until the server gives none; returns events, the tokens
    each page ended at, and the ``start`` of the final (empty) page."""
    events: list[Any] = []
    ends: list[str] = []
    token = start
    for _ in range(TOTAL // 10):
        resp = await _page(client, room_id, token, direction=direction)
        events.extend(resp.chunk)
        if not resp.end:
            return events, ends, resp.start
        assert resp.chunk, "a page with an 'end' token must not be empty"
        assert resp.end != token, "pagination did not advance"
        ends.append(resp.end)
        token = resp.end
    raise AssertionError("pagination never reached the end of the room")


async def _fresh_sync(base: str, like: nio.AsyncClient) -> nio.SyncResponse:
    """An initial /sync (no since) for the same user and device."""
    c = nio.AsyncClient(base, like.user_id, device_id=like.device_id)
    c.access_token = like.access_token
    c.user_id = like.user_id
    try:
        resp = await c.sync(timeout=0)
        assert isinstance(resp, nio.SyncResponse), resp
        return resp
    finally:
        await c.close()


def test_paginate_500_messages(zhome: ZhomeProcess) -> None:
    asyncio.run(_paginate(zhome))


async def _paginate(zhome: ZhomeProcess) -> None:
    alice = await _client(zhome.base_url, "alice")
    try:
        created = await alice.room_create(name="Long history")
        assert isinstance(created, nio.RoomCreateResponse), created
        room_id = created.room_id
        await alice.sync(timeout=0)
        for i in range(TOTAL):
            sent = await alice.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": f"msg {i}", "n": i})
            assert isinstance(sent, nio.RoomSendResponse), sent

        sync = await _fresh_sync(zhome.base_url, alice)
        timeline = sync.rooms.join[room_id].timeline
        assert timeline.limited and timeline.prev_batch
        in_sync = _numbers(timeline.events)
        assert in_sync and in_sync == list(range(TOTAL - len(in_sync), TOTAL)), in_sync

        # Backwards from prev_batch: everything before the sync timeline,
        # newest first, each exactly once.
        back, back_ends, earliest = await _page_all(alice, room_id, timeline.prev_batch, nio.MessageDirection.back)
        seen = list(reversed(in_sync)) + _numbers(back)
        assert seen == list(range(TOTAL - 1, -1, -1)), (len(seen), seen[:5], seen[-5:])
        # The room's creation is at the far end of history.
        assert back[-1].source["type"] == "m.room.create", back[-1].source
        assert len(back_ends) >= (TOTAL - len(in_sync)) // PAGE

        # Forwards from the earliest token: the whole room in order.
        fwd, fwd_ends, _ = await _page_all(alice, room_id, earliest, nio.MessageDirection.front)
        assert fwd[0].source["type"] == "m.room.create", fwd[0].source
        assert _numbers(fwd) == list(range(TOTAL))
        # Exactly the backward pages reversed, then the sync timeline.
        assert [e.event_id for e in fwd] == [e.event_id for e in reversed(back)] + [
            e.event_id for e in timeline.events]

        # 'to' bounds a page: from prev_batch back to the end of the second
        # page gives exactly the first two pages, however large the limit.
        bounded = await _page(alice, room_id, timeline.prev_batch, end=back_ends[1], limit=1000)
        assert [e.event_id for e in bounded.chunk] == [e.event_id for e in back[: 2 * PAGE]]
        # ... and forwards between the same tokens, the second page in order.
        between = await _page(alice, room_id, back_ends[1], end=back_ends[0], direction=nio.MessageDirection.front,
                              limit=1000)
        assert [e.event_id for e in between.chunk] == [e.event_id for e in reversed(back[PAGE: 2 * PAGE])]

        # A filter on types: only messages, and still full pages.
        filtered, _, _ = await _filtered_all(alice, room_id, timeline.prev_batch)
        assert all(e.source["type"] == "m.room.message" for e in filtered)
        assert _numbers(filtered) == list(range(TOTAL - len(in_sync) - 1, -1, -1))
        fwd_f = nio.MessageDirection.front
        near_start = await _page(alice, room_id, earliest, direction=fwd_f, limit=PAGE)
        assert any(e.source["type"] != "m.room.message" for e in near_start.chunk), "expected state events"
        first_msgs = await _page(alice, room_id, earliest, direction=fwd_f, limit=PAGE,
                                 message_filter={"types": ["m.room.message"]})
        assert _numbers(first_msgs.chunk) == list(range(PAGE))
        only_state = await _page(alice, room_id, earliest, direction=fwd_f, limit=PAGE,
                                 message_filter={"not_types": ["m.room.message"]})
        state_types = {e.source["type"] for e in only_state.chunk}
        assert {"m.room.create", "m.room.member", "m.room.power_levels"} <= state_types, state_types
        assert "m.room.message" not in state_types
    finally:
        await alice.close()


async def _filtered_all(client: nio.AsyncClient, room_id: str, start: str) -> tuple[list[Any], int, str]:
    events: list[Any] = []
    token = start
    pages = 0
    for _ in range(TOTAL // 10):
        resp = await _page(client, room_id, token, message_filter={"types": ["m.room.message"]})
        events.extend(resp.chunk)
        pages += 1
        if not resp.end:
            return events, pages, resp.start
        token = resp.end
        # Full pages while messages remain: the filter applies before the limit.
        remaining = _numbers(resp.chunk)[-1] if resp.chunk else 0
        if remaining >= PAGE:
            assert len(resp.chunk) == PAGE, (len(resp.chunk), remaining)
    raise AssertionError("filtered pagination never ended")


def test_history_visibility_on_pagination(zhome: ZhomeProcess) -> None:
    asyncio.run(_visibility(zhome))


async def _visibility(zhome: ZhomeProcess) -> None:
    alice = await _client(zhome.base_url, "alice")
    bob = await _client(zhome.base_url, "bob")
    try:
        rooms = {}
        for vis in ("joined", "shared"):
            created = await alice.room_create(
                name=f"vis {vis}", visibility=nio.RoomVisibility.public,
                initial_state=[{"type": "m.room.history_visibility", "state_key": "",
                                "content": {"history_visibility": vis}}])
            assert isinstance(created, nio.RoomCreateResponse), created
            rooms[vis] = created.room_id
        await alice.sync(timeout=0)
        for vis, room_id in rooms.items():
            for i in range(3):
                sent = await alice.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": f"before {i}"})
                assert isinstance(sent, nio.RoomSendResponse), sent
            joined = await bob.join(room_id)
            assert isinstance(joined, nio.JoinResponse), joined
            sent = await alice.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": "after"})
            assert isinstance(sent, nio.RoomSendResponse), sent

        sync = await bob.sync(timeout=0)
        assert isinstance(sync, nio.SyncResponse), sync
        for vis, room_id in rooms.items():
            tl = sync.rooms.join[room_id].timeline
            bodies = list(reversed(_bodies(tl.events)))
            token = tl.prev_batch
            for _ in range(20):
                resp = await _page(bob, room_id, token, limit=2)
                bodies.extend(_bodies(resp.chunk))
                if not resp.end:
                    break
                token = resp.end
            if vis == "joined":
                assert bodies == ["after"], bodies
            else:
                assert bodies == ["after", "before 2", "before 1", "before 0"], bodies
            # Alice, there from the start, sees all of it either way.
            resp = await _page(alice, room_id, "", limit=50)
            assert _bodies(resp.chunk) == ["after", "before 2", "before 1", "before 0"]
            # Bob cannot fetch a hidden event through /messages from the start either.
            resp = await _page(bob, room_id, "", limit=50)
            assert _bodies(resp.chunk) == (["after"] if vis == "joined" else
                                           ["after", "before 2", "before 1", "before 0"])
    finally:
        await alice.close()
        await bob.close()
