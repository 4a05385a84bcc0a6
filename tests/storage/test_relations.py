"""The relations index (zhome/storage/relations.py) on both engines:
written with each timeline event, left out for rejected, soft-failed and
redacted events, dropped with the content (redaction, erasure, retention,
purges), rebuilt by the background pass for events stored before it, and
the bundled aggregations served from it (zhome/client/aggregations.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted

from zhome.client.serialize import serialize_events
from zhome.http.auth import Requester
from zhome.http.errors import MatrixError
from zhome.rooms.events import Event
from zhome.server import HomeServer
from zhome.storage.events import PersistItem
from tests.storage.test_event_graph import _config

ALICE, BOB, CAROL = "@alice:test.local", "@bob:test.local", "@carol:test.local"


async def _server(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> HomeServer:
    hs = HomeServer(_config(tmp_path, db_config))
    await hs.setup()
    for u in (ALICE, BOB, CAROL):
        await hs.accounts.create_user(u, None, displayname=u[1:].split(":")[0])
    return hs


async def _room(hs: HomeServer) -> str:
    room_id, _ = await hs.room_creation.create_room(ALICE, {"preset": "public_chat"})
    await hs.membership.update(BOB, BOB, room_id, "join")
    return room_id


def _rel(rel_type: str, parent: str, **extra: Any) -> dict[str, Any]:
    return {"m.relates_to": {"rel_type": rel_type, "event_id": parent, **extra}}


async def _send(hs: HomeServer, room_id: str, sender: str, content: dict[str, Any],
                etype: str = "m.room.message") -> Event:
    return await hs.event_creator.send(room_id, etype, sender, content)


async def _rows(hs: HomeServer, room_id: str) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in await hs.db.execute(
        "t", "SELECT event_id, parent_id, rel_type, type, sender, edit_ok FROM event_relations WHERE room_id = ?"
        " ORDER BY stream_ordering", room_id)]


async def _threads(hs: HomeServer, room_id: str) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in await hs.db.execute(
        "t", "SELECT root_id, latest_event_id FROM event_threads WHERE room_id = ? ORDER BY root_id", room_id)]


def _requester(user_id: str) -> Requester:
    return Requester(user_id, "DEV", 1, False)


async def _served(hs: HomeServer, ev: Event, user_id: str) -> dict[str, Any]:
    fresh = await hs.events.get_event(ev.event_id)
    assert fresh is not None
    return (await serialize_events(hs.events, [fresh], requester=_requester(user_id)))[0]


@pytest_twisted.ensureDeferred
async def test_index_follows_the_events(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    hs = await _server(tmp_path, db_config)
    room_id = await _room(hs)
    root = await _send(hs, room_id, ALICE, {"msgtype": "m.text", "body": "root"})
    r1 = await _send(hs, room_id, BOB, {"msgtype": "m.text", "body": "r1", **_rel("m.thread", root.event_id)})
    edit = await _send(hs, room_id, ALICE, {"msgtype": "m.text", "body": "* root2",
                                             "m.new_content": {"msgtype": "m.text", "body": "root2"},
                                             **_rel("m.replace", root.event_id)})
    bad_edit = await _send(hs, room_id, ALICE, {"msgtype": "m.text", "body": "* no new content",
                                                 **_rel("m.replace", root.event_id)})
    react = await _send(hs, room_id, BOB, _rel("m.annotation", r1.event_id, key="👍"), "m.reaction")
    ref = await _send(hs, room_id, BOB, {"msgtype": "m.text", "body": "see", **_rel("m.reference", root.event_id)})
    # Not a relation: a reply alone, a malformed m.relates_to, one without an event ID.
    await _send(hs, room_id, BOB, {"msgtype": "m.text", "body": "re",
                                   "m.relates_to": {"m.in_reply_to": {"event_id": root.event_id}}})
    await _send(hs, room_id, BOB, {"msgtype": "m.text", "body": "x", "m.relates_to": "nope"})
    await _send(hs, room_id, BOB, {"msgtype": "m.text", "body": "y", "m.relates_to": {"rel_type": "m.thread"}})

    assert await _rows(hs, room_id) == [
        (r1.event_id, root.event_id, "m.thread", "m.room.message", BOB, 0),
        (edit.event_id, root.event_id, "m.replace", "m.room.message", ALICE, 1),
        (bad_edit.event_id, root.event_id, "m.replace", "m.room.message", ALICE, 0),
        (react.event_id, r1.event_id, "m.annotation", "m.reaction", BOB, 0),
        (ref.event_id, root.event_id, "m.reference", "m.room.message", BOB, 0),
    ]
    assert await _threads(hs, room_id) == [(root.event_id, r1.event_id)]
    r2 = await _send(hs, room_id, ALICE, {"msgtype": "m.text", "body": "r2", **_rel("m.thread", root.event_id)})
    assert await _threads(hs, room_id) == [(root.event_id, r2.event_id)]

    # Children newest first, filtered, paged by position, and recursively.
    rel = hs.relations
    top = 1 << 60
    kids = [e for e, _ in await rel.children(room_id, root.event_id, None, None, -top, top, True, 10)]
    assert kids == [r2.event_id, ref.event_id, bad_edit.event_id, edit.event_id, r1.event_id]
    assert [e for e, _ in await rel.children(room_id, root.event_id, "m.thread", None, -top, top, False, 10)] == [
        r1.event_id, r2.event_id]
    assert await rel.children(room_id, root.event_id, "m.thread", "m.reaction", -top, top, True, 10) == []
    so_edit = edit.internal["stream_ordering"]
    assert [e for e, _ in await rel.children(room_id, root.event_id, None, None, -top, so_edit, True, 10)] == [
        edit.event_id, r1.event_id]
    deep = [e for e, _ in await rel.children(room_id, root.event_id, None, None, -top, top, True, 10, depth=3)]
    assert deep == [r2.event_id, ref.event_id, react.event_id, bad_edit.event_id, edit.event_id, r1.event_id]
    # A filter applies on the way down too: the reaction hangs off a thread reply.
    assert await rel.children(room_id, root.event_id, "m.annotation", None, -top, top, True, 10, depth=3) == []
    # Another room's ID finds nothing.
    other = await _room(hs)
    assert await rel.children(other, root.event_id, None, None, -top, top, True, 10) == []

    # Redacting a child drops it; the thread's latest goes back to r1.
    await hs.event_creator.send(room_id, "m.room.redaction", ALICE, {}, redacts=r2.event_id)
    assert await _threads(hs, room_id) == [(root.event_id, r1.event_id)]
    await hs.event_creator.send(room_id, "m.room.redaction", ALICE, {}, redacts=react.event_id)
    await hs.event_creator.send(room_id, "m.room.redaction", BOB, {}, redacts=r1.event_id)
    assert await _threads(hs, room_id) == []
    assert [r[0] for r in await _rows(hs, room_id)] == [edit.event_id, bad_edit.event_id, ref.event_id]
    # Redacting the parent keeps its children (the spec: they remain).
    await hs.event_creator.send(room_id, "m.room.redaction", ALICE, {}, redacts=root.event_id)
    assert [r[0] for r in await _rows(hs, room_id)] == [edit.event_id, bad_edit.event_id, ref.event_id]
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_rejected_and_soft_failed_are_not_indexed(tmp_path: Path,
                                                        db_config: tuple[str, dict[str, Any]]) -> None:
    hs = await _server(tmp_path, db_config)
    room_id = await _room(hs)
    root = await _send(hs, room_id, ALICE, {"msgtype": "m.text", "body": "root"})
    made = []
    for flag in ("rejected", "soft_failed", "outlier"):
        ev, _, _ = await hs.event_creator.create_event(room_id, "m.room.message", BOB,
                                                       {"body": flag, **_rel("m.thread", root.event_id)}, None, None)
        item = PersistItem(ev, None, {})
        if flag == "rejected":
            ev.rejected_reason = "auth"
        elif flag == "soft_failed":
            item.soft_failed = True
        else:
            item.outlier = True
        made.append(item)
        await hs.db.run_interaction("t", hs.relations.persist_txn_hook, item)
    assert await _rows(hs, room_id) == []
    # The same event accepted is indexed.
    made[1].soft_failed = False
    await hs.db.run_interaction("t", hs.relations.persist_txn_hook, made[1])
    assert [r[0] for r in await _rows(hs, room_id)] == [made[1].event.event_id]
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_background_pass_indexes_older_events(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    hs = await _server(tmp_path, db_config)
    room_id = await _room(hs)
    root = await _send(hs, room_id, ALICE, {"msgtype": "m.text", "body": "root"})
    replies = [await _send(hs, room_id, BOB, {"msgtype": "m.text", "body": f"r{i}",
                                              **_rel("m.thread", root.event_id)}) for i in range(7)]
    await hs.event_creator.send(room_id, "m.room.redaction", BOB, {}, redacts=replies[3].event_id)
    expected = await _rows(hs, room_id)
    threads = await _threads(hs, room_id)
    assert len(expected) == 6 and threads == [(root.event_id, replies[-1].event_id)]

    # As a database from before the index: nothing indexed, no pass run.
    def wipe(txn: Any) -> None:
        for table in ("event_relations", "event_threads"):
            txn.execute(f"DELETE FROM {table}")
        txn.execute("DELETE FROM at_rest_progress WHERE name IN ('event_relations', 'event_relations_done')")

    await hs.db.run_interaction("t", wipe)
    hs.relations.backlog._complete = False
    passes = 0
    while await hs.db.run_interaction("t", hs.relations.backlog.batch_txn, 4):
        passes += 1
    assert passes >= 3
    # The redacted reply stays out; everything else is back.
    assert await _rows(hs, room_id) == expected
    assert await _threads(hs, room_id) == threads
    assert await hs.relations.complete()
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_content_removal_drops_relations(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    hs = await _server(tmp_path, db_config)
    room_id = await _room(hs)
    root = await _send(hs, room_id, ALICE, {"msgtype": "m.text", "body": "root"})
    r1 = await _send(hs, room_id, BOB, {"msgtype": "m.text", "body": "r1", **_rel("m.thread", root.event_id)})
    r2 = await _send(hs, room_id, ALICE, {"msgtype": "m.text", "body": "r2", **_rel("m.thread", root.event_id)})
    assert (await _served(hs, root, ALICE))["unsigned"]["m.relations"]["m.thread"]["count"] == 2

    # Erasure and retention purge content: the relation goes with it.
    await hs.privacy_store.purge_content([r2.event_id])
    assert [r[0] for r in await _rows(hs, room_id)] == [r1.event_id]
    assert await _threads(hs, room_id) == [(root.event_id, r1.event_id)]
    thread = (await _served(hs, root, ALICE))["unsigned"]["m.relations"]["m.thread"]
    assert thread["count"] == 1 and thread["latest_event"]["event_id"] == r1.event_id

    # Purging history takes the thread (root and reply) out.
    later = await _send(hs, room_id, ALICE, {"msgtype": "m.text", "body": "after"})
    await hs.privacy_store.purge_history(room_id, later.internal["stream_ordering"], True, ":test.local")
    assert await _rows(hs, room_id) == [] and await _threads(hs, room_id) == []

    # Purging the room leaves nothing of it.
    r3 = await _send(hs, room_id, BOB, {"msgtype": "m.text", "body": "r3", **_rel("m.thread", later.event_id)})
    assert await _threads(hs, room_id) == [(later.event_id, r3.event_id)]
    await hs.privacy_store.purge_room(room_id)
    assert await _rows(hs, room_id) == [] and await _threads(hs, room_id) == []
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_bundled_aggregations(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    hs = await _server(tmp_path, db_config)
    room_id = await _room(hs)
    await hs.membership.update(CAROL, CAROL, room_id, "join")
    root = await _send(hs, room_id, ALICE, {"msgtype": "m.text", "body": "root"})
    plain = await _send(hs, room_id, ALICE, {"msgtype": "m.text", "body": "plain"})
    assert "m.relations" not in (await _served(hs, root, ALICE))["unsigned"]

    r1 = await _send(hs, room_id, BOB, {"msgtype": "m.text", "body": "r1", **_rel("m.thread", root.event_id)})
    # Cached as having no children a moment ago: the reply shows at once.
    thread = (await _served(hs, root, ALICE))["unsigned"]["m.relations"]["m.thread"]
    assert thread["count"] == 1 and thread["latest_event"]["event_id"] == r1.event_id
    assert thread["current_user_participated"] is True  # Alice sent the root
    assert (await _served(hs, root, BOB))["unsigned"]["m.relations"]["m.thread"]["current_user_participated"]
    assert not (await _served(hs, root, CAROL))["unsigned"]["m.relations"]["m.thread"]["current_user_participated"]

    # The latest reply carries its own edit; the root's edit is the latest valid one by its sender.
    r2 = await _send(hs, room_id, CAROL, {"msgtype": "m.text", "body": "r2", **_rel("m.thread", root.event_id)})
    r2_edit = await _send(hs, room_id, CAROL, {"msgtype": "m.text", "body": "* r2!",
                                               "m.new_content": {"msgtype": "m.text", "body": "r2!"},
                                               **_rel("m.replace", r2.event_id)})
    e1 = await _send(hs, room_id, ALICE, {"msgtype": "m.text", "body": "* e1", "m.new_content": {"body": "e1"},
                                          **_rel("m.replace", root.event_id)})
    await _send(hs, room_id, BOB, {"msgtype": "m.text", "body": "* not yours", "m.new_content": {"body": "x"},
                                   **_rel("m.replace", root.event_id)})
    await _send(hs, room_id, ALICE, {"msgtype": "m.text", "body": "* no new content",
                                     **_rel("m.replace", root.event_id)})
    await _send(hs, room_id, ALICE, {"body": "* other type", "m.new_content": {"body": "y"},
                                     **_rel("m.replace", root.event_id)}, "org.example.other")
    ref = await _send(hs, room_id, BOB, {"msgtype": "m.text", "body": "see", **_rel("m.reference", root.event_id)})
    await _send(hs, room_id, BOB, _rel("m.annotation", root.event_id, key="👍"), "m.reaction")

    for viewer, participated in ((ALICE, True), (BOB, True), (CAROL, True)):
        rels = (await _served(hs, root, viewer))["unsigned"]["m.relations"]
        assert set(rels) == {"m.thread", "m.replace", "m.reference"}, rels  # m.annotation is not aggregated
        assert rels["m.thread"]["count"] == 2
        assert rels["m.thread"]["current_user_participated"] is participated
        latest = rels["m.thread"]["latest_event"]
        assert latest["event_id"] == r2.event_id and latest["content"]["body"] == "r2"
        assert latest["unsigned"]["m.relations"]["m.replace"]["event_id"] == r2_edit.event_id
        assert rels["m.replace"]["event_id"] == e1.event_id
        assert rels["m.replace"]["content"]["m.new_content"] == {"body": "e1"}
        assert rels["m.reference"] == {"chunk": [{"event_id": ref.event_id}]}
    served_root = await _served(hs, root, ALICE)
    assert served_root["content"] == {"msgtype": "m.text", "body": "root"}  # the original is served, not the edit

    # Users someone ignores are left out of what they are served.
    await hs.user_data.set_account_data(ALICE, "", "m.ignored_user_list", {"ignored_users": {CAROL: {}}})
    thread = (await _served(hs, root, ALICE))["unsigned"]["m.relations"]["m.thread"]
    assert thread["count"] == 1 and thread["latest_event"]["event_id"] == r1.event_id

    # A batch of events is read together; the one without relations gets nothing.
    evs = await hs.events.get_events([root.event_id, plain.event_id, r1.event_id])
    views = await serialize_events(hs.events, [evs[root.event_id], evs[plain.event_id], evs[r1.event_id]],
                                   requester=_requester(BOB))
    assert "m.thread" in views[0]["unsigned"]["m.relations"]
    assert "m.relations" not in views[1]["unsigned"] and "m.relations" not in views[2]["unsigned"]
    # Events served to nobody in particular (application services, admin) carry none.
    assert "m.relations" not in (await serialize_events(hs.events, [evs[root.event_id]]))[0]["unsigned"]

    # Once the index is complete, events of a room without any relation
    # cost no query at all, and an event already read costs none either.
    assert hs.relations.backlog.running is not None
    await hs.relations.backlog.running
    quiet_room = await _room(hs)
    quiet = [await _send(hs, quiet_room, ALICE, {"msgtype": "m.text", "body": f"q{i}"}) for i in range(3)]
    asked: list[str] = []
    hs.db.on_interaction = lambda desc, secs: asked.append(desc)
    await serialize_events(hs.events, quiet, requester=_requester(ALICE))
    assert "relations_aggregate" not in asked, asked
    # In a room with relations: one query for a new event, none once read.
    plain2 = await _send(hs, room_id, ALICE, {"msgtype": "m.text", "body": "plain2"})
    await _served(hs, plain2, ALICE)
    await _served(hs, plain2, ALICE)
    assert asked.count("relations_aggregate") == 1, asked
    # A first relation in that room is seen at once.
    q_reply = await _send(hs, quiet_room, BOB,
                          {"msgtype": "m.text", "body": "r", **_rel("m.thread", quiet[0].event_id)})
    assert (await _served(hs, quiet[0], ALICE))["unsigned"]["m.relations"]["m.thread"]["latest_event"][
        "event_id"] == q_reply.event_id

    # A redacted original gets no edit bundled; its thread stays.
    await hs.event_creator.send(room_id, "m.room.redaction", ALICE, {}, redacts=root.event_id)
    rels = (await _served(hs, root, BOB))["unsigned"]["m.relations"]
    assert "m.replace" not in rels and rels["m.thread"]["count"] == 2
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_relation_checks_on_send(tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    hs = await _server(tmp_path, db_config)
    room_id = await _room(hs)
    root = await _send(hs, room_id, ALICE, {"msgtype": "m.text", "body": "root"})
    r1 = await _send(hs, room_id, BOB, {"msgtype": "m.text", "body": "r1", **_rel("m.thread", root.event_id)})
    try:
        await _send(hs, room_id, BOB, {"msgtype": "m.text", "body": "nested", **_rel("m.thread", r1.event_id)})
        raise AssertionError("a thread off a thread reply was accepted")
    except MatrixError as e:
        assert (e.code, e.errcode) == (400, "M_UNKNOWN")
    first = await _send(hs, room_id, BOB, _rel("m.annotation", root.event_id, key="👍"), "m.reaction")
    try:
        await _send(hs, room_id, BOB, _rel("m.annotation", root.event_id, key="👍"), "m.reaction")
        raise AssertionError("a duplicate annotation was accepted")
    except MatrixError as e:
        assert (e.code, e.errcode) == (400, "M_DUPLICATE_ANNOTATION")
    # Another key, another user, or after the first was redacted: fine.
    await _send(hs, room_id, BOB, _rel("m.annotation", root.event_id, key="🎉"), "m.reaction")
    await _send(hs, room_id, ALICE, _rel("m.annotation", root.event_id, key="👍"), "m.reaction")
    await hs.event_creator.send(room_id, "m.room.redaction", BOB, {}, redacts=first.event_id)
    await _send(hs, room_id, BOB, _rel("m.annotation", root.event_id, key="👍"), "m.reaction")
    await hs.stop()
