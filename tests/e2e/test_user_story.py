"""The core user story with a stock client library (matrix-nio): register,
log in, create a room, invite, chat both ways with /sync long-poll delivery,
leave, and everything survives a restart of the server."""

from __future__ import annotations

import asyncio
import time

import nio

from tests.e2e.harness import ZhomeProcess

PASSWORD = "correct horse battery staple"


async def _register(base: str, name: str) -> nio.AsyncClient:
    c = nio.AsyncClient(base, name)
    resp = await c.register(name, PASSWORD)
    assert isinstance(resp, nio.RegisterResponse), resp
    return c


async def _sync_until(client: nio.AsyncClient, predicate, rounds: int = 20) -> nio.SyncResponse:
    """Long-poll /sync until ``predicate(response)`` holds (bounded)."""
    for _ in range(rounds):
        resp = await client.sync(timeout=5000, since=client.next_batch)
        assert isinstance(resp, nio.SyncResponse), resp
        if predicate(resp):
            return resp
    raise AssertionError("condition not reached through /sync")


def _bodies(resp: nio.SyncResponse, room_id: str) -> list[str]:
    room = resp.rooms.join.get(room_id)
    if room is None:
        return []
    return [e.body for e in room.timeline.events if isinstance(e, nio.RoomMessageText)]


def test_user_story_survives_restart(zhome: ZhomeProcess) -> None:
    asyncio.run(_story(zhome))


async def _story(zhome: ZhomeProcess) -> None:
    alice = await _register(zhome.base_url, "alice")
    bob = await _register(zhome.base_url, "bob")
    try:
        # Log in again with the password (a second device for Alice).
        alice2 = nio.AsyncClient(zhome.base_url, "@alice:localhost")
        login = await alice2.login(PASSWORD, device_name="laptop")
        assert isinstance(login, nio.LoginResponse), login
        assert login.user_id == "@alice:localhost"
        bad = await nio.AsyncClient(zhome.base_url, "@alice:localhost").login("wrong password")
        assert isinstance(bad, nio.LoginError) and bad.status_code == "M_FORBIDDEN"

        created = await alice.room_create(name="Care team", topic="Shift handover")
        assert isinstance(created, nio.RoomCreateResponse), created
        room_id = created.room_id
        await alice.sync(timeout=0)
        await bob.sync(timeout=0)

        invited = await alice.room_invite(room_id, "@bob:localhost")
        assert isinstance(invited, nio.RoomInviteResponse), invited
        resp = await _sync_until(bob, lambda r: room_id in r.rooms.invite)
        invite_state = resp.rooms.invite[room_id].invite_state
        assert any(getattr(e, "name", None) == "Care team" for e in invite_state)

        joined = await bob.join(room_id)
        assert isinstance(joined, nio.JoinResponse), joined

        # Bob waits in a long-poll; Alice's message must wake it.
        waiter = asyncio.create_task(_sync_until(bob, lambda r: "hello bob" in _bodies(r, room_id)))
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        sent = await alice.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": "hello bob"})
        assert isinstance(sent, nio.RoomSendResponse), sent
        await asyncio.wait_for(waiter, 30)
        assert time.monotonic() - t0 < 5

        sent = await bob.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": "hi alice"})
        assert isinstance(sent, nio.RoomSendResponse), sent
        await _sync_until(alice, lambda r: "hi alice" in _bodies(r, room_id))

        members = await alice.joined_members(room_id)
        assert sorted(m.user_id for m in members.members) == ["@alice:localhost", "@bob:localhost"]

        # Restart the server in the middle: nothing acknowledged is lost.
        zhome.restart()
        msgs = await bob.room_messages(room_id, start="", limit=50)
        assert isinstance(msgs, nio.RoomMessagesResponse), msgs
        bodies = [e.body for e in msgs.chunk if isinstance(e, nio.RoomMessageText)]
        assert bodies[:2] == ["hi alice", "hello bob"]
        sent = await alice.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": "after restart"})
        assert isinstance(sent, nio.RoomSendResponse), sent
        await _sync_until(bob, lambda r: "after restart" in _bodies(r, room_id))

        left = await bob.room_leave(room_id)
        assert isinstance(left, nio.RoomLeaveResponse), left
        resp = await _sync_until(bob, lambda r: room_id in r.rooms.leave)
        members = await alice.joined_members(room_id)
        assert [m.user_id for m in members.members] == ["@alice:localhost"]
        # After leaving, Bob can no longer send.
        denied = await bob.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": "ghost"})
        assert isinstance(denied, nio.RoomSendError) and denied.status_code == "M_FORBIDDEN"
        await alice2.close()
    finally:
        await alice.close()
        await bob.close()
