"""The blind full-text index behind server-side search, on both engines:
the tokeniser, what is indexed with the event, the queries (phrases, keys,
rank and recent order, paging), and rows leaving with the content
(redaction, purges) and the pass over events stored before the index.

Spec: client-server-api "Server Side Search"; the design is in
zhome/storage/event_search.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from tests.storage.test_event_graph import _server
from zhome.server import HomeServer
from zhome.storage import event_search
from zhome.storage.event_search import SEARCH_KEYS, parse_query, text_of, token, words
from zhome.storage.events import PersistItem

ALICE = "@alice:test.local"
BOB = "@bob:test.local"
ALL = 2 ** 62


# -- the tokeniser ------------------------------------------------------------------------------
def test_words_are_normalised_and_split_on_word_boundaries() -> None:
    assert words("Hello, World!") == ["hello", "world"]
    # NFKC and full case folding: full-width letters, ligatures, sharp s.
    assert words("ＡＢＣ ﬁne STRASSE Straße") == ["abc", "fine", "strasse", "strasse"]
    assert words("Ｃａｆé") == words("CAFÉ") == ["café"]
    # Apostrophes and full stops inside a word, commas inside a number.
    assert words("don't stop e.g. 3,000.50 at 10:30") == ["don't", "stop", "e.g", "3,000.50", "at", "10", "30"]
    assert words("e-mail snake_case") == ["e", "mail", "snake_case"]
    # Ideographs and Hiragana are words of their own; Katakana runs stay together.
    assert words("日本語のテキスト") == ["日", "本", "語", "の", "テキスト"]
    assert words("   ") == [] and words("!!! ...") == []
    # Combining marks stay inside words (Devanagari vowel signs, virama).
    assert words("हिन्दी भाषा") == ["हिन्दी", "भाषा"]
    # A variation selector stays with its ideograph.
    assert words("葛\U000E0100城") == ["葛\U000E0100", "城"]
    assert words("한국어 텍스트") == ["한국어", "텍스트"]


def test_the_mark_ranges_hold_every_combining_mark() -> None:
    import unicodedata

    scanned = set(range(0x300, 0x20000)) | set(range(0xE0100, 0xE01F0))
    assert all(cp in scanned for cp in range(0x110000) if unicodedata.category(chr(cp))[0] == "M")


def test_queries_are_phrases_of_words() -> None:
    q = parse_query('Night shift "ward three" e-mail')
    assert q.phrases == (("night",), ("shift",), ("ward", "three"), ("e", "mail"))
    assert q.words == ["night", "shift", "ward", "three", "e", "mail"]
    assert parse_query("日本語").phrases == (("日", "本", "語"),)
    assert parse_query('"unbalanced quote').phrases == (("unbalanced", "quote"),)
    assert parse_query("").phrases == () and parse_query("?!").phrases == ()
    assert parse_query("a a A").phrases == (("a",),)


def test_tokens_are_keyed_and_opaque() -> None:
    k1, k2 = b"\x01" * 32, b"\x02" * 32
    t = token(k1, "morphine")
    assert re.fullmatch(r"[a-p]{16}", t)
    assert t == token(k1, "morphine") and t != token(k2, "morphine") and t != token(k1, "morphin")
    assert "morphine" not in t
    assert re.fullmatch(r"[a-p]{16}", token(k1, "lone\ud800surrogate"))


def test_text_of_takes_the_searchable_field() -> None:
    assert text_of("m.room.message", {"body": "hi"}) == ("content.body", "hi")
    assert text_of("m.room.name", {"name": "Ward"}) == ("content.name", "Ward")
    assert text_of("m.room.topic", {"topic": "Beds"}) == ("content.topic", "Beds")
    assert text_of("m.room.member", {"displayname": "x"}) is None
    assert text_of("m.room.message", {"body": 5}) is None
    # An edit's new content is read the same way, in place of its original's.
    assert text_of("m.room.message", {"body": "new text", "msgtype": "m.text"}) == ("content.body", "new text")
    assert text_of("m.room.message", None) is None


# -- the index ----------------------------------------------------------------------------------
async def _room(hs: HomeServer, name: str = "Ward 3") -> str:
    room_id, _ = await hs.room_creation.create_room(ALICE, {"preset": "public_chat", "name": name,
                                                            "topic": "night shift handover"})
    await hs.membership.update(BOB, BOB, room_id, "join")
    return room_id


async def _say(hs: HomeServer, room_id: str, body: str, sender: str = ALICE) -> str:
    ev = await hs.event_creator.send(room_id, "m.room.message", sender, {"msgtype": "m.text", "body": body})
    return ev.event_id


async def _find(hs: HomeServer, term: str, rooms: list[str], order: str = "recent",
                keys: tuple[str, ...] = SEARCH_KEYS, limit: int = 50, **kw: Any) -> list[str]:
    hits = await hs.event_search.search(parse_query(term), [(r, ALL) for r in rooms], keys, order, limit, **kw)
    return [h.event_id for h in hits]


@pytest_twisted.ensureDeferred
async def test_index_and_search(tmp_path: Path, db_config: tuple[str, dict[str, Any]],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    hs = await _server(tmp_path, db_config)
    room = await _room(hs)
    other = await _room(hs, "Pharmacy")
    a = await _say(hs, room, "The patient in bed four needs morphine")
    b = await _say(hs, room, "Morphine morphine morphine, bed four", sender=BOB)
    c = await _say(hs, room, "Four beds free on the ward")
    d = await _say(hs, other, "Order more morphine")
    e = await _say(hs, room, "Reply by e-mail please")

    assert await _find(hs, "morphine", [room]) == [b, a]
    assert await _find(hs, "MORPHINE", [room, other]) == [d, b, a]
    # Every word must match; a quoted phrase matches in order, adjacent.
    assert await _find(hs, "bed four", [room]) == [b, a]
    assert await _find(hs, '"four bed"', [room]) == []
    assert await _find(hs, '"bed four"', [room]) == [b, a]
    assert await _find(hs, "four", [room]) == [c, b, a]
    # Whole words only: no prefix or stem matches.
    assert await _find(hs, "morph", [room]) == [] and await _find(hs, "bed", [room]) == [b, a]
    assert await _find(hs, "e-mail", [room]) == [e] and await _find(hs, "mail e", [room]) == [e]
    # Room names and topics, each under its own key.
    names = await _find(hs, "pharmacy", [room, other])
    assert len(names) == 1 and (await hs.events.get_event(names[0])).type == "m.room.name"  # type: ignore[union-attr]
    assert await _find(hs, "pharmacy", [room, other], keys=("content.body",)) == []
    assert len(await _find(hs, "handover", [room], keys=("content.topic",))) == 1
    assert await _find(hs, "handover", [room], keys=("content.name",)) == []
    # Rank: the message saying it three times first.
    ranked = await hs.event_search.search(parse_query("morphine"), [(room, ALL)], SEARCH_KEYS, "rank", 10)
    assert [h.event_id for h in ranked] == [b, a] and ranked[0].rank > ranked[1].rank > 0
    # Paging by (rank, stream position), and a room's upper bound.
    first = ranked[0]
    assert await _find(hs, "morphine", [room], order="rank", after=(first.rank, first.stream_ordering)) == [a]
    assert await _find(hs, "morphine", [room], after=(0.0, first.stream_ordering)) == [a]
    a_so = (await hs.events.get_event(a)).internal["stream_ordering"]  # type: ignore[union-attr]
    hits = await hs.event_search.search(parse_query("morphine"), [(room, a_so)], SEARCH_KEYS, "recent", 10)
    assert [h.event_id for h in hits] == [a]
    assert await _find(hs, "morphine", [room], senders=[BOB]) == [b]
    assert await _find(hs, "morphine", [room], senders=[]) == []
    # Many rooms take several statements, merged in order.
    whole = await hs.event_search.search(parse_query("morphine"), [(room, ALL), (other, ALL)], SEARCH_KEYS,
                                         "rank", 10)
    monkeypatch.setattr(event_search, "ROOMS_PER_QUERY", 1)
    assert await _find(hs, "morphine", [room, other]) == [d, b, a]
    assert await _find(hs, "morphine", [other, room], limit=2) == [d, b]
    split = await hs.event_search.search(parse_query("morphine"), [(room, ALL), (other, ALL)], SEARCH_KEYS,
                                         "rank", 10)
    assert [h.event_id for h in split] == [h.event_id for h in whole]
    monkeypatch.undo()

    # No plaintext word in the index's rows.
    if hs.db.engine == "sqlite3":
        rows = await hs.db.execute("t", "SELECT tokens FROM event_search")
    else:
        rows = await hs.db.execute("t", "SELECT vector::text FROM event_search")
    blob = " ".join(r[0] for r in rows)
    assert "morphine" not in blob and "patient" not in blob and re.search(r"\b[a-p]{16}\b", blob)

    # A redaction takes the event out of the index at once.
    await hs.event_creator.send(room, "m.room.redaction", ALICE, {}, redacts=b)
    assert await _find(hs, "morphine", [room]) == [a]
    # Purging content (erasure, retention), history and rooms do too.
    await hs.privacy_store.purge_content([a])
    assert await _find(hs, "morphine", [room]) == []
    assert await _find(hs, "four", [room]) == [c]
    # An edit: the original is found by its new text (not the "* " fallback), the edit itself is no hit.
    edit = (await hs.event_creator.send(room, "m.room.message", ALICE, {
        "msgtype": "m.text", "body": "* four beds, one isolation",
        "m.new_content": {"msgtype": "m.text", "body": "Four beds free, one isolation"},
        "m.relates_to": {"rel_type": "m.replace", "event_id": c}})).event_id
    assert await _find(hs, "isolation", [room]) == [c]
    assert await _find(hs, '"free one isolation"', [room]) == [c]
    assert await _find(hs, "ward", [room], keys=("content.body",)) == []
    hits = await hs.event_search.search(parse_query("isolation"), [(room, ALL)], SEARCH_KEYS, "recent", 10)
    assert [h.edit_id for h in hits] == [edit]
    # Purged history leaves the index, kept (local) events included.
    last = await _say(hs, room, "four more")
    last_so = (await hs.events.get_event(last)).internal["stream_ordering"]  # type: ignore[union-attr]
    await hs.privacy_store.purge_history(room, last_so, False, ":test.local")
    assert await _find(hs, "four", [room]) == [last]
    await hs.privacy_store.purge_room(other)
    assert await _find(hs, "morphine", [other]) == [] and await _find(hs, "pharmacy", [other]) == []
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_not_indexed_and_backfill_pass(tmp_path: Path, db_config: tuple[str, dict[str, Any]],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    hs = await _server(tmp_path, db_config)
    room = await _room(hs)
    a = await _say(hs, room, "Saline drip")
    ev = await hs.events.get_event(a)
    assert ev is not None
    # Outliers and soft-failed events are not indexed (the hook alone).
    for flags in ({"outlier": True}, {"soft_failed": True}):
        item = PersistItem(ev, None, {}, **flags)
        await hs.db.run_interaction("t", lambda txn, item=item: (
            txn.execute("DELETE FROM event_search"), hs.event_search.persist_txn_hook(txn, item)))
        assert await _find(hs, "saline", [room]) == []

    # Events stored before the index: the pass indexes them, in batches.
    for i in range(7):
        await _say(hs, room, f"saline bag {i}")
    await hs.db.run_interaction("t", lambda txn: (
        txn.execute("DELETE FROM event_search"),
        txn.execute("DELETE FROM at_rest_progress WHERE name IN ('event_search', 'event_search_done')")))
    hs.event_search.backlog._complete = False
    assert await _find(hs, "saline", [room]) == []
    assert not await hs.event_search.complete()
    monkeypatch.setattr(hs.event_search.backlog, "batch", 3)
    monkeypatch.setattr(hs.event_search.backlog, "pause_s", 0.0)
    await hs.event_search.backlog.run(max_batches=20)
    assert await hs.event_search.complete()
    assert len(await _find(hs, "saline", [room])) == 8
    assert len(await _find(hs, "ward", [room])) == 1  # the room's name
    await hs.stop()


async def _edit(hs: HomeServer, room_id: str, original: str, body: str, sender: str = ALICE) -> Any:
    return await hs.event_creator.send(room_id, "m.room.message", sender, {
        "msgtype": "m.text", "body": f"* {body}", "m.new_content": {"msgtype": "m.text", "body": body},
        "m.relates_to": {"rel_type": "m.replace", "event_id": original}})


@pytest_twisted.ensureDeferred
async def test_removing_an_edits_content_brings_the_words_before_it_back(
        tmp_path: Path, db_config: tuple[str, dict[str, Any]]) -> None:
    """Erasure and retention remove content through purge_content: when it
    removes an original's latest edit, the original is found by the edit
    before it (or its own words) and no longer by the removed edit's."""
    hs = await _server(tmp_path, db_config)
    room = await _room(hs)
    p = await _say(hs, room, "Oxygen saturation low")
    edits = [await _edit(hs, room, p, "Oxygen saturation normal"), await _edit(hs, room, p, "Oxygen saturation fine")]
    word = {edits[0].event_id: "normal", edits[1].event_id: "fine"}
    # The spec's most recent: origin_server_ts, then the largest event ID.
    latest, older = sorted(edits, key=lambda e: (e.origin_server_ts, e.event_id), reverse=True)
    assert await _find(hs, word[latest.event_id], [room]) == [p]
    assert await _find(hs, word[older.event_id], [room]) == [] and await _find(hs, "low", [room]) == []

    await hs.privacy_store.purge_content([latest.event_id])
    assert await _find(hs, word[latest.event_id], [room]) == []
    assert await _find(hs, word[older.event_id], [room]) == [p]
    await hs.privacy_store.purge_content([older.event_id])
    assert await _find(hs, "low", [room]) == [p] and await _find(hs, "normal", [room]) == []
    rows = await hs.db.execute("t", "SELECT event_id, edit_id FROM event_search WHERE event_id = ?", p)
    assert [tuple(r) for r in rows] == [(p, None)]

    # An edit by someone else never counted; removing the original removes it with all.
    await _edit(hs, room, p, "Oxygen saturation bobs", sender=BOB)
    again = await _edit(hs, room, p, "Oxygen saturation again")
    assert await _find(hs, "again", [room]) == [p] and await _find(hs, "bobs", [room]) == []
    await hs.privacy_store.purge_content([p])
    assert await _find(hs, "oxygen", [room]) == []
    rows = await hs.db.execute("t", "SELECT event_id FROM event_search WHERE event_id IN (?, ?)", p, again.event_id)
    assert rows == []

    # Purged history: an original and its edits leave the index.
    q = await _say(hs, room, "Heart rate steady")
    await _edit(hs, room, q, "Heart rate rising")
    last = await _say(hs, room, "later")
    last_so = (await hs.events.get_event(last)).internal["stream_ordering"]  # type: ignore[union-attr]
    assert await _find(hs, "rising", [room]) == [q]
    await hs.privacy_store.purge_history(room, last_so, True, ":test.local")
    assert await _find(hs, "rising", [room]) == [] and await _find(hs, "heart", [room]) == []
    await hs.stop()
