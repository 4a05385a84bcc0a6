"""The recount of unread counts after a read receipt (zhome/push/unread.py)
against events persisted while it counts, in process on both engines.

Spec: client-server-api "Receiving notifications" / "Marking notifications
as read": after a receipt the counts are of the notifying events after it,
so an event that arrives while the recount runs must still be counted.
The recount evaluates push rules (``EventCreator.unread_for``) between its
read of the room and its write; the tests persist events exactly there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

import pytest_twisted

from zhome.client.user_data import UserDataServlets
from zhome.rooms.events import Event
from zhome.server import HomeServer
from zhome.storage.relations import MAIN_THREAD
from tests.storage.test_relations import ALICE, BOB, _room, _send, _server

DbConfig = tuple[str, dict[str, Any]]


def _msg(body: str) -> dict[str, Any]:
    return {"msgtype": "m.text", "body": body}


async def _receipt(hs: HomeServer, room_id: str, ev: Event) -> None:
    # What POST /receipt/m.read does after its checks.
    await UserDataServlets(hs)._set_read_receipt(ALICE, room_id, "m.read", ev.event_id, None)


async def _receipt_while_counting(hs: HomeServer, room_id: str, ev: Event,
                                  during: Callable[[Event], Awaitable[None]]) -> None:
    """_receipt, with ``during(event)`` run each time its recount is about
    to evaluate push rules for an event."""
    original = hs.event_creator.unread_for

    async def evaluating(event: Event, state: Any, for_user: Optional[str] = None) -> Any:
        await during(event)
        return await original(event, state, for_user=for_user)

    hs.event_creator.unread_for = evaluating  # type: ignore[method-assign]
    try:
        await _receipt(hs, room_id, ev)
    finally:
        hs.event_creator.unread_for = original  # type: ignore[method-assign]


@pytest_twisted.ensureDeferred
async def test_an_event_persisted_while_counting_is_not_lost(tmp_path: Path, db_config: DbConfig) -> None:
    hs = await _server(tmp_path, db_config)
    room_id = await _room(hs)  # two members: each message of Bob's notifies Alice
    m1 = await _send(hs, room_id, BOB, _msg("one"))
    m2 = await _send(hs, room_id, BOB, _msg("two"))
    assert await hs.events.get_unread_counts(ALICE, room_id) == (2, 0)

    # While the receipt's recount evaluates push rules for "two", Bob's
    # "three" is persisted: counted into room_unread by its own transaction.
    sent: list[Event] = []

    async def during(event: Event) -> None:
        if not sent:
            sent.append(await _send(hs, room_id, BOB, _msg("three")))

    await _receipt_while_counting(hs, room_id, m1, during)
    assert len(sent) == 1
    # "two" and "three" are after the receipt: both unread.
    assert await hs.events.get_unread_counts(ALICE, room_id) == (2, 0)
    assert await hs.events.get_unread_counts_by_thread(ALICE, [room_id]) == {room_id: {MAIN_THREAD: (2, 0)}}
    # And a receipt at the end of the room clears them all.
    await _receipt(hs, room_id, sent[0])
    assert await hs.events.get_unread_counts(ALICE, room_id) == (0, 0)
    assert m2.event_id != sent[0].event_id
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_an_event_committed_but_not_yet_announced_is_counted(tmp_path: Path, db_config: DbConfig) -> None:
    """Between an event's commit and the notifier's news of it, the
    event is already in the counts: a recount then must count it too."""
    hs = await _server(tmp_path, db_config)
    room_id = await _room(hs)
    m1 = await _send(hs, room_id, BOB, _msg("one"))
    await _send(hs, room_id, BOB, _msg("two"))
    announced = hs.notifier.events_pos
    # "three" commits; its announcement is held back.
    original = hs.notifier.on_new_event
    hs.notifier.on_new_event = lambda *a, **kw: None  # type: ignore[method-assign]
    await _send(hs, room_id, BOB, _msg("three"))
    hs.notifier.on_new_event = original  # type: ignore[method-assign]
    assert hs.notifier.events_pos == announced
    assert await hs.events.get_unread_counts(ALICE, room_id) == (3, 0)
    await _receipt(hs, room_id, m1)
    assert await hs.events.get_unread_counts(ALICE, room_id) == (2, 0)
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_a_busy_room_ends_with_a_recount_that_holds_persistence(tmp_path: Path,
                                                                       db_config: DbConfig) -> None:
    """An event arrives during every optimistic attempt: each one's write
    is refused, and the last attempt, with persistence paused, counts them
    all. The number of attempts is bounded."""
    from zhome.push import unread

    hs = await _server(tmp_path, db_config)
    room_id = await _room(hs)
    m1 = await _send(hs, room_id, BOB, _msg("one"))
    m2 = await _send(hs, room_id, BOB, _msg("two"))
    sent: list[Event] = []
    paused_evaluations = 0

    async def during(event: Event) -> None:
        nonlocal paused_evaluations
        if hs.persister._lock.locked:
            # The last attempt: persisting now would wait for it.
            paused_evaluations += 1
        elif event.event_id == m2.event_id and len(sent) < 10:
            # Once per attempt (each evaluates "two" first).
            sent.append(await _send(hs, room_id, BOB, _msg(f"during attempt {len(sent) + 1}")))

    await _receipt_while_counting(hs, room_id, m1, during)
    assert len(sent) == unread.OPTIMISTIC_ATTEMPTS
    # The last attempt evaluated "two" and every event sent meanwhile.
    assert paused_evaluations == 1 + len(sent)
    assert await hs.events.get_unread_counts(ALICE, room_id) == (1 + len(sent), 0)
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_a_later_receipt_is_not_overwritten_by_an_earlier_recount(tmp_path: Path,
                                                                          db_config: DbConfig) -> None:
    """Two receipts of one user in one room: the recount of the later one
    (at the end of the room) is the one whose counts stay, though the
    earlier one's recount was still evaluating push rules when it came."""
    from twisted.internet import defer, reactor

    hs = await _server(tmp_path, db_config)
    room_id = await _room(hs)
    m1 = await _send(hs, room_id, BOB, _msg("one"))
    m2 = await _send(hs, room_id, BOB, _msg("two"))
    later: list[defer.Deferred[None]] = []

    async def during(event: Event) -> None:
        if not later:
            later.append(defer.ensureDeferred(_receipt(hs, room_id, m2)))
            # Let the later receipt run as far as it may (all of it, when
            # nothing orders the two recounts); bounded either way.
            done: defer.Deferred[None] = defer.Deferred()
            call = reactor.callLater(0.5, done.callback, None)  # type: ignore[attr-defined]
            later[0].addBoth(lambda _: (call.cancel(), done.callback(None)) if call.active() else None)
            await done

    await _receipt_while_counting(hs, room_id, m1, during)
    await later[0]
    assert await hs.events.get_unread_counts(ALICE, room_id) == (0, 0)
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_a_history_purge_while_counting_is_not_undone(tmp_path: Path, db_config: DbConfig) -> None:
    """A history purge (which runs with writes paused, as the admin API
    runs it) takes purged events off the counts; a recount that read them
    before the purge must not write them back."""
    hs = await _server(tmp_path, db_config)
    room_id = await _room(hs)
    m1 = await _send(hs, room_id, BOB, _msg("one"))
    await _send(hs, room_id, BOB, _msg("two"))
    m3 = await _send(hs, room_id, BOB, _msg("three"))
    assert await hs.events.get_unread_counts(ALICE, room_id) == (3, 0)

    # While the receipt's recount evaluates push rules for "two", the
    # history before "three" is purged: "two" was unread, so it comes off.
    purged: list[int] = []

    async def during(event: Event) -> None:
        if not purged:
            async with hs.persister.writes_paused():
                purged.append(await hs.privacy_store.purge_history(
                    room_id, int(m3.internal["stream_ordering"]), False, ":" + hs.server_name))

    await _receipt_while_counting(hs, room_id, m1, during)
    assert purged and purged[0] > 0
    # Only "three" is left after the receipt.
    assert await hs.events.get_unread_counts(ALICE, room_id) == (1, 0)
