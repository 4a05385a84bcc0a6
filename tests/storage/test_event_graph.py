"""The room event graph in SQL, on both engines: events, edges, state
groups, current state, forward extremities, idempotent transaction IDs,
unread counts, and all of it read back by a fresh server on the same
database (a restart)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted

from zhome.config import parse_config
from zhome.crypto.event_hashing import compute_event_id, verify_content_hash
from zhome.crypto.keys import new_signing_key, write_signing_key_file
from zhome.http.errors import MatrixError
from zhome.server import HomeServer
from zhome.storage import events as events_mod


def _config(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> Any:
    key_path = tmp_path / "test.signing.key"
    if not key_path.exists():
        write_signing_key_file(str(key_path), new_signing_key())
    engine, args = db_config
    if engine == "sqlite3":
        db = f"database:\n  name: sqlite3\n  args:\n    database: {args['database']}\n"
    else:
        db = (f"database:\n  name: psycopg2\n  args:\n    host: {args['host']}\n    port: {args['port']}\n"
              f"    user: {args['user']}\n    database: {args['database']}\n")
    text = (
        "server_name: test.local\n"
        f"signing_key_path: {key_path}\n"
        f"data_dir: {tmp_path}\n"
        "listeners:\n  - port: 8008\n    type: http\n"
        + db
        + "secrets:\n  form_secret: aaaaaaaaaaaaaaaaaaaa\n  macaroon_secret_key: bbbbbbbbbbbbbbbbbbbbbbbb\n"
    )
    return parse_config(text, str(tmp_path / "homeserver.yaml"))


async def _server(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> HomeServer:
    hs = HomeServer(_config(tmp_path, db_config))
    await hs.setup()
    for u in ("@alice:test.local", "@bob:test.local"):
        await hs.accounts.create_user(u, None, displayname=u[1:].split(":")[0])
    return hs


@pytest_twisted.ensureDeferred
async def test_room_graph_persists_and_reloads(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    hs = await _server(tmp_path, db_config)
    room_id, _ = await hs.room_creation.create_room("@alice:test.local", {"name": "Ward 3", "preset": "public_chat"})
    await hs.membership.update("@bob:test.local", "@bob:test.local", room_id, "join")
    sent = []
    for i in range(5):
        ev = await hs.event_creator.send(room_id, "m.room.message", "@alice:test.local",
                                         {"msgtype": "m.text", "body": f"m{i}"}, txn_id=f"t{i}", device_id="D1")
        sent.append(ev)

    # Every event is signed, hashed, and its ID is its reference hash.
    for ev in sent:
        assert verify_content_hash(ev.pdu)
        assert compute_event_id(ev.room_version, ev.pdu) == ev.event_id
        assert "test.local" in ev.pdu["signatures"]
    # A linear chain: each message points at the previous one.
    for a, b in zip(sent, sent[1:]):
        assert b.prev_event_ids == [a.event_id]
        assert b.depth == a.depth + 1
    assert await hs.events.get_forward_extremities(room_id) == [sent[-1].event_id]

    # The same transaction ID gives the same event, and nothing new.
    again = await hs.event_creator.send(room_id, "m.room.message", "@alice:test.local",
                                        {"msgtype": "m.text", "body": "m0"}, txn_id="t0", device_id="D1")
    assert again.event_id == sent[0].event_id
    assert await hs.events.get_forward_extremities(room_id) == [sent[-1].event_id]

    # Bob's unread count grew with each of Alice's messages.
    assert await hs.events.get_unread_counts("@bob:test.local", room_id) == (5, 0)

    state = await hs.events.get_current_state_ids(room_id)
    name_id = state[("m.room.name", "")]
    assert (await hs.events.get_event(name_id)).content == {"name": "Ward 3"}  # type: ignore[union-attr]
    assert sorted(await hs.events.get_joined_users(room_id)) == ["@alice:test.local", "@bob:test.local"]
    # State after a message equals the current state (messages change none).
    assert await hs.events.get_state_after_event(sent[-1].event_id) == state
    await hs.stop()

    # A new server on the same database sees exactly the same graph.
    hs2 = HomeServer(_config(tmp_path, db_config))
    await hs2.setup()
    assert await hs2.events.get_current_state_ids(room_id) == state
    assert await hs2.events.get_forward_extremities(room_id) == [sent[-1].event_id]
    ev = await hs2.event_creator.send(room_id, "m.room.message", "@bob:test.local", {"msgtype": "m.text", "body": "x"})
    assert ev.prev_event_ids == [sent[-1].event_id]
    assert ev.internal["stream_ordering"] > sent[-1].internal["stream_ordering"]
    await hs2.stop()


@pytest_twisted.ensureDeferred
async def test_state_group_chains_are_bounded(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    hs = await _server(tmp_path, db_config)
    room_id, _ = await hs.room_creation.create_room("@alice:test.local", {})
    n = events_mod.MAX_STATE_CHAIN * 2 + 5
    for i in range(n):
        await hs.event_creator.send(room_id, "org.example.counter", "@alice:test.local", {"i": i}, state_key=f"k{i % 7}")
    rows = await hs.db.execute("t", "SELECT MAX(chain_length) FROM state_groups WHERE room_id = ?", room_id)
    assert rows[0][0] < events_mod.MAX_STATE_CHAIN
    # Reading through a cold cache gives the latest value of every key.
    hs.events._state_group_cache.clear()
    state = await hs.events.get_current_state_ids(room_id)
    last_key = f"k{(n - 1) % 7}"
    group = await hs.events.get_state_group_for_event(state[("org.example.counter", last_key)])
    assert group is not None
    from_group = await hs.events.get_state_group(group)
    evs = await hs.events.get_events([from_group[("org.example.counter", f"k{j}")] for j in range(7)])
    values = sorted(e.content["i"] for e in evs.values())
    assert values == list(range(n - 7, n))
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_rejected_by_auth_leaves_nothing(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    hs = await _server(tmp_path, db_config)
    room_id, _ = await hs.room_creation.create_room("@alice:test.local", {"preset": "private_chat"})
    before = await hs.db.execute("t", "SELECT COUNT(*) FROM events")
    try:
        await hs.event_creator.send(room_id, "m.room.message", "@bob:test.local", {"body": "not a member"})
    except MatrixError as e:
        assert e.errcode == "M_FORBIDDEN"
    else:
        raise AssertionError("a non-member could send")
    try:
        await hs.membership.update("@bob:test.local", "@bob:test.local", room_id, "join")
    except MatrixError as e:
        assert e.errcode == "M_FORBIDDEN"
    else:
        raise AssertionError("joined an invite-only room without invite")
    after = await hs.db.execute("t", "SELECT COUNT(*) FROM events")
    assert before == after
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_state_keys_for_groups_match_the_whole_state_maps(tmp_path: Path,
                                                                db_config: tuple[str, dict[str, Any]]) -> None:
    # The key-only read walks each group's chain in SQL: for every group of
    # a room (deltas on deltas, changed keys, absent keys) it must give what
    # the whole state map gives, with and without cached maps.
    hs = await _server(tmp_path, db_config)
    alice, bob = "@alice:test.local", "@bob:test.local"
    room_id, _ = await hs.room_creation.create_room(alice, {"preset": "private_chat", "name": "first"})
    await hs.membership.update(alice, bob, room_id, "invite")
    await hs.membership.update(bob, bob, room_id, "join")
    groups = []
    for i in range(12):
        ev = await hs.event_creator.send(room_id, "m.room.name", alice, {"name": f"name {i}"}, state_key="")
        groups.append(ev.internal["state_group"])
        if i == 5:
            await hs.membership.update(bob, bob, room_id, "leave")
        if i == 8:
            ev = await hs.event_creator.send(room_id, "m.room.history_visibility", alice,
                                             {"history_visibility": "joined"}, state_key="")
    keys = [("m.room.name", ""), ("m.room.member", bob), ("m.room.history_visibility", ""),
            ("m.room.member", "@nobody:test.local"), ("m.room.topic", "")]
    hs.events._state_group_cache.clear()  # noqa: SLF001 - the SQL path, not the caches
    hs.events._state_key_cache.clear()  # noqa: SLF001
    got = await hs.events.get_state_keys_for_groups(groups, keys)
    for g in groups:
        whole = await hs.events.get_state_group(g)
        assert got[g] == {k: whole[k] for k in keys if k in whole}, g
    # From the cache (filled above) the answer is the same.
    assert await hs.events.get_state_keys_for_groups(groups, keys) == got
    assert {got[groups[-1]][("m.room.name", "")]} and ("m.room.topic", "") not in got[groups[0]]
    member = await hs.events.get_event(got[groups[-1]][("m.room.member", bob)])
    assert member is not None and member.membership == "leave"
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_cached_current_state_follows_every_change(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    """get_current_state_for_rooms answers from a cache: after each kind of
    change it still equals what the table holds."""
    hs = await _server(tmp_path, db_config)
    await hs.accounts.create_user("@carol:test.local", None)
    alice, bob = "@alice:test.local", "@bob:test.local"
    room_id, _ = await hs.room_creation.create_room(alice, {"name": "Ward 3", "preset": "public_chat"})

    async def from_table() -> dict[tuple[str, str], tuple[str, Any]]:
        rows = await hs.db.execute("t", "SELECT type, state_key, event_id, membership FROM current_state_events"
                                   " WHERE room_id = ?", room_id)
        return {(t, sk): (eid, m) for t, sk, eid, m in rows}

    keys = [("m.room.member", bob), ("m.room.member", "@carol:test.local"), ("m.room.topic", ""),
            ("m.room.name", "")]

    async def check() -> dict[tuple[str, str], tuple[str, Any]]:
        table = await from_table()
        # Single keys first, while the whole state is not cached (each
        # change dropped it): read twice, the second time from the cache
        # of single keys, which the change must have dropped too.
        for _ in range(2):
            for key in keys:
                entry = table.get(key)
                assert await hs.events.get_current_state_event_id(room_id, *key) == (
                    entry[0] if entry else None), key
        cached = (await hs.events.get_current_state_for_rooms([room_id]))[room_id]
        assert cached == table
        # With the whole state cached, single keys come from it.
        for key in keys:
            assert await hs.events.get_current_state_event_id(room_id, *key) == (
                table[key][0] if key in table else None), key
        # Asked again: the same answer (from the cache now).
        assert (await hs.events.get_current_state_for_rooms([room_id]))[room_id] == cached
        return cached

    await check()
    await hs.membership.update(bob, bob, room_id, "join")
    assert (await check())[("m.room.member", bob)][1] == "join"
    await hs.event_creator.send(room_id, "m.room.message", alice, {"msgtype": "m.text", "body": "no state"})
    await check()
    await hs.event_creator.send(room_id, "m.room.topic", alice, {"topic": "beds"}, state_key="")
    assert ("m.room.topic", "") in await check()
    await hs.membership.update(alice, "@carol:test.local", room_id, "invite")
    assert (await check())[("m.room.member", "@carol:test.local")][1] == "invite"
    await hs.membership.update(bob, bob, room_id, "leave")
    assert (await check())[("m.room.member", bob)][1] == "leave"
    # A purge outside the persistence path drops the cached copy too.
    await hs.db.run_interaction("purge", lambda txn: txn.execute(
        "DELETE FROM current_state_events WHERE room_id = ?", (room_id,)))
    hs.events.drop_room_caches(room_id)
    assert await hs.events.get_current_state_event_id(room_id, "m.room.topic", "") is None
    assert (await hs.events.get_current_state_for_rooms([room_id]))[room_id] == {}
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_cached_memberships_follow_every_change(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    """get_rooms_for_user and get_membership_changes_since answer from a
    per-user cache: after each kind of change they still equal what the
    tables hold."""
    hs = await _server(tmp_path, db_config)
    alice, bob = "@alice:test.local", "@bob:test.local"
    room_id, _ = await hs.room_creation.create_room(alice, {"name": "Ward 3", "preset": "public_chat"})

    async def check(user_id: str, since: int) -> dict[str, str]:
        rows = await hs.db.execute("t", "SELECT room_id, membership, event_id FROM current_state_events"
                                   " WHERE type = 'm.room.member' AND state_key = ?", user_id)
        log = await hs.db.execute("t", "SELECT room_id, membership, stream_ordering FROM room_memberships"
                                  " WHERE user_id = ? AND stream_ordering > ? ORDER BY stream_ordering",
                                  user_id, since)
        for _ in range(2):  # the second time from the cache
            assert await hs.events.get_rooms_for_user(user_id) == {r: (m, e) for r, m, e in rows}
            assert await hs.events.get_membership_changes_since(user_id, since) == [tuple(r) for r in log]
        return {r: m for r, m, _ in rows}

    pos = hs.notifier.current_token().events
    assert await check(bob, pos) == {}
    await hs.membership.update(bob, bob, room_id, "join")
    assert await check(bob, pos) == {room_id: "join"}
    pos = hs.notifier.current_token().events
    assert await hs.events.get_membership_changes_since(bob, pos) == []
    # A message changes no membership; a profile change is a member event.
    await hs.event_creator.send(room_id, "m.room.message", alice, {"msgtype": "m.text", "body": "hello"})
    await check(bob, pos)
    other, _ = await hs.room_creation.create_room(alice, {"name": "Ward 4", "preset": "private_chat"})
    await hs.membership.update(alice, bob, other, "invite")
    assert await check(bob, pos) == {room_id: "join", other: "invite"}
    await hs.membership.update(bob, bob, room_id, "leave")
    assert await check(bob, pos) == {room_id: "leave", other: "invite"}
    # Forgotten rooms: cached with the memberships, and forgetting shows.
    assert await hs.events.get_forgotten_rooms(bob) == set()
    await hs.events.forget_room(bob, room_id)
    assert await hs.events.get_forgotten_rooms(bob) == {room_id}
    await hs.privacy_store.delete_user_traces(bob)
    assert await hs.events.get_forgotten_rooms(bob) == set()
    await hs.events.forget_room(bob, room_id)
    await hs.membership.update(bob, bob, room_id, "join")  # joining again un-forgets
    assert await hs.events.get_forgotten_rooms(bob) == set()
    # A purged room leaves no cached membership behind.
    await hs.privacy_store.purge_room(other)
    assert await check(bob, 0) == {room_id: "join"}
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_rooms_changed_since_follows_every_event(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    """get_rooms_changed_since answers from the newest position known per
    room: it still equals what the events table says."""
    hs = await _server(tmp_path, db_config)
    alice = "@alice:test.local"
    rooms = [(await hs.room_creation.create_room(alice, {"preset": "private_chat"}))[0] for _ in range(3)]
    empty = "!nothing:test.local"

    async def check(since: int) -> set[str]:
        rows = await hs.db.execute("t", "SELECT DISTINCT room_id FROM events WHERE stream_ordering > ?"
                                   " AND outlier = 0 AND soft_failed = 0", since)
        expected = {r[0] for r in rows} & set(rooms)
        for _ in range(2):  # the second time from the cache
            assert await hs.events.get_rooms_changed_since(rooms + [empty], since) == expected
        return expected

    pos = hs.notifier.current_token().events
    assert await check(pos) == set()
    assert await check(0) == set(rooms)
    await hs.event_creator.send(rooms[1], "m.room.message", alice, {"msgtype": "m.text", "body": "hi"})
    assert await check(pos) == {rooms[1]}
    hs.events.drop_room_caches(rooms[1])  # as after a purge: read again
    assert await check(pos) == {rooms[1]}
    await hs.event_creator.send(rooms[2], "m.room.topic", alice, {"topic": "t"}, state_key="")
    assert await check(pos) == {rooms[1], rooms[2]}
    # The history of a room purged up to now: no news since.
    await hs.privacy_store.purge_history(rooms[2], hs.notifier.current_token().events + 1, True, ":test.local")
    assert rooms[2] not in await check(pos)
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_cached_device_ids_follow_every_change(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    """get_device_ids (the fan-out of to-device messages) answers from a
    cache that follows every creation and deletion of a device."""
    hs = await _server(tmp_path, db_config)
    bob = "@bob:test.local"
    assert await hs.accounts.get_device_ids(bob) == frozenset()
    await hs.accounts.create_device_and_token(bob, "D1", "tok1", None, None, None)
    assert await hs.accounts.get_device_ids(bob) == {"D1"}
    assert await hs.accounts.create_device(bob, "D2", None)
    assert await hs.accounts.get_device_ids(bob) == {"D1", "D2"}
    await hs.accounts.delete_devices(bob, ["D1"])
    assert await hs.accounts.get_device_ids(bob) == {"D2"}
    await hs.accounts.create_device_and_token(bob, "D3", "tok3", None, None, None)
    await hs.accounts.delete_other_tokens(bob, "D3")
    assert await hs.accounts.get_device_ids(bob) == {"D3"}
    await hs.accounts.delete_devices(bob, None)
    assert await hs.accounts.get_device_ids(bob) == frozenset()
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_recent_events_from_memory_match_the_table(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    """The newest events of a room, which an incremental /sync reads, come
    from memory when they can: always what the events table holds."""
    hs = await _server(tmp_path, db_config)
    alice = "@alice:test.local"
    room_id, _ = await hs.room_creation.create_room(alice, {"preset": "private_chat"})
    # The room's newest position is known before the first message.
    assert await hs.events.get_rooms_changed_since([room_id], 0) == {room_id}
    marks = [hs.notifier.current_token().events]
    for i in range(events_mod.RECENT_KEPT + 20):
        await hs.event_creator.send(room_id, "m.room.message", alice, {"msgtype": "m.text", "body": f"m{i}"})
        if i % 10 == 0:
            marks.append(hs.notifier.current_token().events)
    now = hs.notifier.current_token().events

    async def expected(frm: int, to: int, limit: int) -> list[str]:
        rows = await hs.db.execute("t", "SELECT event_id FROM events WHERE room_id = ? AND stream_ordering > ?"
                                   " AND stream_ordering <= ? AND outlier = 0 AND soft_failed = 0"
                                   " AND rejected_reason IS NULL ORDER BY stream_ordering DESC LIMIT ?",
                                   room_id, frm, to, limit)
        return [r[0] for r in rows]

    async def got(frm: int, to: int, limit: int) -> list[str]:
        return [e.event_id for e in (await hs.events.get_recent_events_for_rooms([room_id], frm, to, limit))[room_id]]

    for frm in marks:
        for to in (now, marks[-1], frm + 3):
            for limit in (1, 5, 11, 200):
                assert await got(frm, to, limit) == await expected(frm, to, limit), (frm, to, limit)
    # After a purge the table answers again.
    hs.events.drop_room_caches(room_id)
    assert await got(marks[-2], now, 11) == await expected(marks[-2], now, 11)
    await hs.stop()
