"""Server-side search end to end on both engines: several hundred messages
searched through POST /search with paging by next_batch until exhausted,
rank and recent order, filters, groupings, context with profiles, current
state, history visibility, redaction, edits (a message found by its latest
valid edit, locally and when the edit came first over federation), bad
input, the spec's response schema, and no searched word in the clear in
the database.

Spec: client-server-api "Server Side Search" (search.yaml); the index is
described in zhome/storage/event_search.py.
"""

from __future__ import annotations

import base64
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import jsonschema

from tests.e2e.harness import ClientUser, ZhomeProcess, q
from tests.e2e.openapi import Spec
from tests.e2e.test_admin_api import Admin
from tests.e2e.test_erasure import _bytes_on_disk, _database_url, _pg_dump
from tests.e2e.test_federation_hostile import World, world  # noqa: F401 - A, and E with mallory in A's room



def _send(user: ClientUser, room: str, body: str, **extra: Any) -> str:
    content = {"msgtype": "m.text", "body": body, **extra}
    return str(user.ok("PUT", f"/rooms/{q(room)}/send/m.room.message/{secrets.token_hex(8)}", content)["event_id"])


# -- edits ----------------------------------------------------------------------------------------
def _edit(user: ClientUser, room: str, original: str, body: str, fallback: Optional[str] = None,
          etype: str = "m.room.message") -> str:
    content = {"msgtype": "m.text", "body": fallback or f"* {body}",
               "m.new_content": {"msgtype": "m.text", "body": body},
               "m.relates_to": {"rel_type": "m.replace", "event_id": original}}
    path = f"/rooms/{q(room)}/send/{q(etype)}/{secrets.token_hex(8)}"
    return str(user.ok("PUT", path, content)["event_id"])


def _latest_of(user: ClientUser, room: str, edits: list[str]) -> str:
    """The spec's most recent replacement: by origin_server_ts, then the
    lexicographically largest event ID."""
    ts = {e: user.ok("GET", f"/rooms/{q(room)}/event/{q(e)}")["origin_server_ts"] for e in edits}
    return max(edits, key=lambda e: (ts[e], e))


def _db(hs: ZhomeProcess, sql: str, args: tuple[Any, ...] = (), write: bool = False) -> list[tuple[Any, ...]]:
    """A statement on the server's database, straight (placeholders: ?)."""
    url = _database_url(hs)
    if url:
        import psycopg2

        conn = psycopg2.connect(url)
        try:
            with conn.cursor() as cur:
                cur.execute(sql.replace("?", "%s"), args)
                rows = [] if write else [tuple(r) for r in cur.fetchall()]
            conn.commit()
            return rows
        finally:
            conn.close()
    import sqlite3

    lite = sqlite3.connect(str(hs.workdir / "data" / "homeserver.db"), timeout=30)
    try:
        rows = [tuple(r) for r in lite.execute(sql, args).fetchall()]
        lite.commit()
        return rows
    finally:
        lite.close()


class Searcher:
    def __init__(self, user: ClientUser, spec: Spec) -> None:
        self.user = user
        self.schema = spec.response_schema("/search", "post", 200)

    def raw(self, criteria: Any, next_batch: Optional[str] = None) -> tuple[int, Any]:
        path = "/search" + (f"?next_batch={q(next_batch)}" if next_batch is not None else "")
        return self.user.req("POST", path, {"search_categories": {"room_events": criteria}})

    def page(self, criteria: dict[str, Any], next_batch: Optional[str] = None) -> dict[str, Any]:
        status, body = self.raw(criteria, next_batch)
        assert status == 200, body
        errors = list(jsonschema.Draft202012Validator(self.schema).iter_errors(body))
        assert not errors, [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5]]
        return dict(body["search_categories"]["room_events"])

    def all(self, criteria: dict[str, Any], max_pages: int = 200) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Every result, following next_batch until it is absent; and the pages."""
        results: list[dict[str, Any]] = []
        pages: list[dict[str, Any]] = []
        token: Optional[str] = None
        for _ in range(max_pages):
            page = self.page(criteria, token)
            pages.append(page)
            results += page["results"]
            token = page.get("next_batch")
            if token is None:
                return results, pages
        raise AssertionError("next_batch never ran out")


def _ids(results: list[dict[str, Any]]) -> list[str]:
    return [r["result"]["event_id"] for r in results]


def test_search_room_events(zhome: ZhomeProcess, spec: Spec) -> None:
    alice, bob, carol = (ClientUser(zhome, n) for n in ("alice", "bob", "carol"))
    alice.ok("PUT", f"/profile/{q(alice.user_id)}/displayname", {"displayname": "Alice Nurse"})
    ward = alice.ok("POST", "/createRoom", {"name": "Ward Seven", "topic": "Night shift handover",
                                            "preset": "public_chat"})["room_id"]
    pharmacy = alice.ok("POST", "/createRoom", {"name": "Pharmacy", "preset": "public_chat"})["room_id"]
    for room in (ward, pharmacy):
        bob.ok("POST", f"/rooms/{q(room)}/join", {})
    expected: dict[str, tuple[str, str, int]] = {}  # event ID -> (room, sender, n)
    n = 0
    for room, count, every in ((ward, 200, 4), (pharmacy, 100, 5)):
        for i in range(count):
            n += 1
            sender = alice if i % 2 == 0 else bob
            hit = i % every == 0
            eid = _send(sender, room, f"Round {n}: {'Insulin given' if hit else 'routine check'}, bed {i % 9}", n=n)
            if hit:
                expected[eid] = (room, sender.user_id, n)
    strong = _send(bob, ward, "insulin INSULIN Insulin!")
    expected[strong] = (ward, bob.user_id, n + 1)
    s = Searcher(bob, spec)

    # Recent order, paged by next_batch until it is absent.
    crit: dict[str, Any] = {"search_term": "insulin", "order_by": "recent", "filter": {"limit": 13}}
    results, pages = s.all(crit)
    assert sorted(_ids(results)) == sorted(expected) and len(results) == len(expected) == 71
    ns = [expected[e][2] for e in _ids(results)]
    assert ns == sorted(ns, reverse=True)
    assert all(len(p["results"]) <= 13 for p in pages) and len(pages) >= 6
    assert pages[0]["highlights"] == ["insulin"]
    # count: what was given so far, exact on the last page.
    counts = [p["count"] for p in pages]
    assert counts == sorted(counts) and counts[-1] == 71

    # Rank order: the message that says it three times first; the same set.
    ranked, _ = s.all({"search_term": "Insulin", "filter": {"limit": 20}})
    assert _ids(ranked)[0] == strong and sorted(_ids(ranked)) == sorted(expected)
    ranks = [r["rank"] for r in ranked]
    assert ranks == sorted(ranks, reverse=True) and ranks[0] > ranks[-1]

    # Filters: rooms, senders, not_senders, types.
    only_pharmacy, _ = s.all({"search_term": "insulin", "filter": {"rooms": [pharmacy], "limit": 50}})
    assert sorted(_ids(only_pharmacy)) == sorted(e for e, v in expected.items() if v[0] == pharmacy)
    by_alice, _ = s.all({"search_term": "insulin", "filter": {"senders": [alice.user_id], "limit": 50}})
    assert sorted(_ids(by_alice)) == sorted(e for e, v in expected.items() if v[1] == alice.user_id)
    not_alice, _ = s.all({"search_term": "insulin", "filter": {"not_senders": [alice.user_id], "limit": 50},
                          "order_by": "recent"})
    assert sorted(_ids(not_alice)) == sorted(e for e, v in expected.items() if v[1] != alice.user_id)
    assert s.page({"search_term": "insulin", "filter": {"types": ["m.room.name"]}})["results"] == []
    # A phrase, and every word must match.
    bed_three = s.all({"search_term": "insulin bed 3", "filter": {"limit": 50}})[0]
    assert bed_three and all("bed 3" in r["result"]["content"]["body"] for r in bed_three)
    assert s.page({"search_term": '"given insulin"'})["results"] == []
    # Keys: names and topics.
    names = s.page({"search_term": "seven", "keys": ["content.name"]})["results"]
    assert [r["result"]["type"] for r in names] == ["m.room.name"]
    assert s.page({"search_term": "seven", "keys": ["content.body", "content.topic"]})["results"] == []
    assert [r["result"]["type"] for r in s.page({"search_term": "handover"})["results"]] == ["m.room.topic"]

    # Groupings by room; a group's next_batch pages within that group.
    page = s.page({"search_term": "insulin", "order_by": "recent", "filter": {"limit": 5},
                   "groupings": {"group_by": [{"key": "room_id"}, {"key": "sender"}]}})
    groups = page["groups"]["room_id"]
    assert set(groups) <= {ward, pharmacy}
    assert sorted(e for g in groups.values() for e in g["results"]) == sorted(_ids(page["results"]))
    assert sorted(e for g in page["groups"]["sender"].values() for e in g["results"]) == sorted(_ids(page["results"]))
    room_id, group = next(iter(groups.items()))
    seen = list(group["results"])
    token = group.get("next_batch")
    for _ in range(100):
        if token is None:
            break
        more = s.page({"search_term": "insulin", "order_by": "recent", "filter": {"limit": 5},
                       "groupings": {"group_by": [{"key": "room_id"}]}}, token)
        assert all(r["result"]["room_id"] == room_id for r in more["results"])
        seen += _ids(more["results"])
        token = more.get("next_batch")
    assert token is None
    assert sorted(seen) == sorted(e for e, v in expected.items() if v[0] == room_id)

    # Context with historic profiles, and current state.
    page = s.page({"search_term": "insulin", "order_by": "recent", "filter": {"limit": 3, "rooms": [pharmacy]},
                   "event_context": {"before_limit": 2, "after_limit": 1, "include_profile": True},
                   "include_state": True})
    for r in page["results"]:
        ctx = r["context"]
        assert len(ctx["events_before"]) == 2 and len(ctx["events_after"]) <= 1
        assert ctx["start"] and ctx["end"]
        senders = {e["sender"] for e in [r["result"], *ctx["events_before"], *ctx["events_after"]]}
        assert set(ctx["profile_info"]) == senders
        assert ctx["profile_info"][alice.user_id]["displayname"] == "Alice Nurse"
        before_n = [e["content"]["n"] for e in ctx["events_before"]]
        assert before_n == sorted(before_n, reverse=True) and before_n[0] < r["result"]["content"]["n"]
    state_types = {e["type"] for e in page["state"][pharmacy]}
    assert {"m.room.create", "m.room.member", "m.room.name"} <= state_types
    assert set(page["state"]) == {pharmacy}

    # Carol is in none of the rooms: nothing.
    assert Searcher(carol, spec).page({"search_term": "insulin"})["results"] == []

    # A redaction takes the hit out at once.
    alice.ok("PUT", f"/rooms/{q(ward)}/redact/{q(strong)}/{secrets.token_hex(4)}", {})
    top = s.page({"search_term": "insulin", "order_by": "recent", "filter": {"limit": 5}})
    assert strong not in _ids(top["results"]) and top["results"]
    assert s.page({"search_term": "routine"})["results"]

    # Bad input.
    def err(got: tuple[int, Any], code: str) -> None:
        assert got[0] == 400 and got[1]["errcode"] == code, got

    err(s.raw({"keys": ["content.body"]}), "M_MISSING_PARAM")
    err(s.raw({"search_term": 5}), "M_BAD_JSON")
    err(s.raw("nope"), "M_BAD_JSON")
    err(s.raw({"search_term": "x", "order_by": "oldest"}), "M_INVALID_PARAM")
    err(s.raw({"search_term": "x", "keys": ["content.secret"]}), "M_INVALID_PARAM")
    err(s.raw({"search_term": "x", "filter": {"rooms": "!a:b"}}), "M_BAD_JSON")
    err(s.raw({"search_term": "x", "groupings": {"group_by": [{"key": "type"}]}}), "M_INVALID_PARAM")
    err(s.raw({"search_term": "x", "event_context": {"before_limit": -1}}), "M_BAD_JSON")
    for bad in ("garbage!", base64.urlsafe_b64encode(b'{"o":"rank"}').decode(), "e30"):
        err(s.raw({"search_term": "insulin"}, bad), "M_INVALID_PARAM")
    recent_token = s.page({"search_term": "insulin", "order_by": "recent", "filter": {"limit": 1}})["next_batch"]
    err(s.raw({"search_term": "insulin"}, recent_token), "M_INVALID_PARAM")
    status, out = bob.req("POST", "/search", {"search_categories": {"room_events": None, "rooms": {"x": 1}}})
    assert status == 200 and out == {"search_categories": {}}
    status, out = bob.req("POST", "/search", {})
    assert status == 400 and out["errcode"] == "M_MISSING_PARAM"
    # No words: no results, not an error.
    assert s.page({"search_term": "  ?! "})["results"] == []


def test_search_follows_history_visibility(zhome: ZhomeProcess, spec: Spec) -> None:
    alice, carol, dave = (ClientUser(zhome, n) for n in ("alice", "carol", "dave"))
    room = alice.ok("POST", "/createRoom", {"preset": "public_chat", "initial_state": [
        {"type": "m.room.history_visibility", "state_key": "", "content": {"history_visibility": "joined"}}]})["room_id"]
    early = _send(alice, room, "handover note one")
    carol.ok("POST", f"/rooms/{q(room)}/join", {})
    dave.ok("POST", f"/rooms/{q(room)}/join", {})
    middle = _send(alice, room, "handover note two")
    dave.ok("POST", f"/rooms/{q(room)}/leave", {})
    late = _send(alice, room, "handover note three")

    def found(user: ClientUser) -> set[str]:
        results, _ = Searcher(user, spec).all({"search_term": "handover note", "filter": {"limit": 2}})
        return set(_ids(results))

    assert found(alice) == {early, middle, late}
    # Joined later with "joined" visibility: not what came before.
    assert found(carol) == {middle, late}
    # Left: not what came after.
    assert found(dave) == {middle}
    # Context follows visibility too.
    page = Searcher(carol, spec).page({"search_term": "two", "event_context": {"before_limit": 5}})
    assert early not in _ids([{"result": e} for e in page["results"][0]["context"]["events_before"]])
    # A former member's context stops where they left, and the state is the
    # state when they left.
    page = Searcher(dave, spec).page({"search_term": "two", "event_context": {"after_limit": 10},
                                      "include_state": True})
    after = [e["event_id"] for e in page["results"][0]["context"]["events_after"]]
    assert late not in after and after  # their own leave is there
    members = {e["state_key"]: e["content"]["membership"] for e in page["state"][room] if e["type"] == "m.room.member"}
    assert members[dave.user_id] == "leave"


def test_search_index_holds_no_plaintext(zhome: ZhomeProcess, spec: Spec, db_config: Any) -> None:
    alice = ClientUser(zhome, "alice")
    room = alice.ok("POST", "/createRoom", {"name": "Ward"})["room_id"]
    marker = "mrk" + secrets.token_hex(12)
    eid = _send(alice, room, f"the word {marker} is secret")
    page = Searcher(alice, spec).page({"search_term": marker.upper()})
    assert _ids(page["results"]) == [eid] and page["highlights"] == [marker]
    zhome.stop()
    stored = _pg_dump(zhome) if _database_url(zhome) else _bytes_on_disk(zhome)
    assert marker.encode() not in stored and marker.upper().encode() not in stored
    zhome.start()


def _index_rows(hs: ZhomeProcess, event_ids: list[str]) -> int:
    """How many of ``event_ids`` have a row in the index (server stopped)."""
    qs = ",".join("?" * len(event_ids))
    return int(_db(hs, f"SELECT COUNT(*) FROM event_search WHERE event_id IN ({qs})", tuple(event_ids))[0][0])


def test_erasure_deletes_the_index_rows(zhome: ZhomeProcess, spec: Spec, tmp_path: Path) -> None:
    """Crypto-shredding destroys the data keys, not the index key: the rows
    of an erased user's events must go themselves."""
    admin = Admin(zhome, "root", tmp_path)
    alice, bob = ClientUser(zhome, "alice"), ClientUser(zhome, "bob")
    room = alice.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"]
    bob.ok("POST", f"/rooms/{q(room)}/join", {})
    marker = "mrk" + secrets.token_hex(8)
    bobs = [_send(bob, room, f"bob says {marker} {i}") for i in range(3)]
    mine = _send(alice, room, f"alice says {marker}")
    # An edited message: its row holds the edit's words.
    draft = _send(bob, room, "bob drafts")
    bobs += [draft, _edit(bob, room, draft, f"bob edits {marker}")]
    assert len(Searcher(alice, spec).page({"search_term": marker})["results"]) == 5
    admin.ok("POST", f"/_zhome/admin/v1/users/{q(bob.user_id)}/erase")
    # Looked at before any search (a search drops rows of redacted hits).
    zhome.stop()
    assert _index_rows(zhome, bobs) == 0 and _index_rows(zhome, [mine]) == 1
    zhome.start()
    assert _ids(Searcher(alice, spec).page({"search_term": marker})["results"]) == [mine]


def test_search_ten_thousand_messages_sqlite(tmp_path: Path, spec: Spec) -> None:
    """The issue's scale check, on SQLite only: 10,000 messages sent through
    the API (in parallel), searched and paged through in full."""
    hs = ZhomeProcess(tmp_path / "hs").start()
    try:
        alice = ClientUser(hs, "alice")
        room = alice.ok("POST", "/createRoom", {"preset": "private_chat"})["room_id"]
        started = time.monotonic()

        def send(i: int) -> str:
            word = "tachycardia" if i % 10 == 0 else "stable"
            return _send(alice, room, f"obs {i} patient {word}", n=i)

        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(send, range(10_000)))
        hits = {e for i, e in enumerate(ids) if i % 10 == 0}
        s = Searcher(alice, spec)
        results, pages = s.all({"search_term": "tachycardia", "order_by": "recent", "filter": {"limit": 100}})
        assert set(_ids(results)) == hits and len(results) == 1000 and pages[-1]["count"] == 1000
        ranked, _ = s.all({"search_term": "patient stable", "filter": {"limit": 500}}, max_pages=40)
        assert len(ranked) == 9000 and len(set(_ids(ranked))) == 9000
        assert time.monotonic() - started < 120
    finally:
        hs.stop()


def test_search_sees_the_latest_edit(zhome: ZhomeProcess, spec: Spec) -> None:
    """A message is found by the words of its latest valid edit, as the
    original event with that edit bundled; never by its older words, never
    as the edit event; invalid edits change nothing; redacting edits brings
    earlier words back; the background pass gives the same index."""
    alice, bob, dave = (ClientUser(zhome, n) for n in ("alice", "bob", "dave"))
    room = alice.ok("POST", "/createRoom", {"preset": "public_chat", "topic": "Cardiology rota"})["room_id"]
    bob.ok("POST", f"/rooms/{q(room)}/join", {})
    dave.ok("POST", f"/rooms/{q(room)}/join", {})
    s = Searcher(bob, spec)

    def hits(term: str, searcher: Searcher = s) -> list[dict[str, Any]]:
        results, _ = searcher.all({"search_term": term, "filter": {"limit": 3}})
        return [r["result"] for r in results]

    def found(term: str, searcher: Searcher = s) -> list[str]:
        return [ev["event_id"] for ev in hits(term, searcher)]

    def bundled(term: str) -> list[Optional[str]]:
        return [ev.get("unsigned", {}).get("m.relations", {}).get("m.replace", {}).get("event_id")
                for ev in hits(term)]

    original = _send(alice, room, "Morning handover for bed one")
    other = _send(alice, room, "Handover done for bed nine")
    first = _edit(alice, room, original, "Evening report for bed two", fallback="* fallbackword")
    # The original is the hit, with its content as sent and the edit bundled; the edit is no hit.
    assert found("evening") == [original] and bundled("evening") == [first]
    assert hits("evening")[0]["content"]["body"] == "Morning handover for bed one"
    assert found("morning") == [] and found("fallbackword") == []
    assert sorted(found("handover")) == [other]
    assert sorted(found("bed")) == sorted([original, other])

    # A later edit replaces the earlier one; a third right after, the spec's rule picks the latest.
    second = _edit(alice, room, original, "Night summary for bed three")
    third = _edit(alice, room, original, "Night summary for bed four")
    latest = _latest_of(alice, room, [first, second, third])
    words = {second: "three", third: "four"}
    assert latest in words, "the first edit cannot be the latest"
    assert found(words[latest]) == [original] and bundled("night") == [latest]
    assert found(words[second if latest == third else third]) == [] and found("evening") == []

    # Invalid edits change nothing: another sender, an edit of an edit, of a state event, another type.
    _edit(bob, room, original, "bobsword overwrite")
    _edit(alice, room, latest, "editofedit words")
    topic = alice.ok("GET", f"/rooms/{q(room)}/state/m.room.topic/")
    state_ids = {e["type"]: e["event_id"] for e in alice.ok("GET", f"/rooms/{q(room)}/state")}
    assert topic["topic"] == "Cardiology rota"
    _edit(alice, room, state_ids["m.room.topic"], "topicedit words")
    _edit(alice, room, original, "othertype words", etype="m.room.topic")
    alice.ok("PUT", f"/rooms/{q(room)}/send/m.room.message/{secrets.token_hex(8)}", {
        "msgtype": "m.text", "body": "nonewcontent words",
        "m.relates_to": {"rel_type": "m.replace", "event_id": original}})
    for term in ("bobsword", "editofedit", "topicedit", "othertype", "nonewcontent"):
        assert found(term) == [], term
    assert found(words[latest]) == [original] and bundled("night") == [latest]
    assert len(found("cardiology")) == 1

    # A former member does not find the message by what an edit after they left made it say.
    late = _send(alice, room, "Ward round at noon")
    assert found("noon", Searcher(dave, spec)) == [late]
    dave.ok("POST", f"/rooms/{q(room)}/leave", {})
    late_edit = _edit(alice, room, late, "Ward round at dusk")
    assert found("dusk") == [late] and found("dusk", Searcher(dave, spec)) == []
    assert found("night", Searcher(dave, spec)) == [original]

    # Redacting the latest edit brings the one before back, then the original's own words.
    alice.ok("PUT", f"/rooms/{q(room)}/redact/{q(latest)}/{secrets.token_hex(4)}", {})
    before = _latest_of(alice, room, [first] + [e for e in (second, third) if e != latest])
    assert before in words, "the first edit is older than both others"
    assert found(words[before]) == [original] and bundled("night") == [before] and found(words[latest]) == []
    alice.ok("PUT", f"/rooms/{q(room)}/redact/{q(before)}/{secrets.token_hex(4)}", {})
    assert found("evening") == [original] and bundled("evening") == [first] and found("night") == []
    alice.ok("PUT", f"/rooms/{q(room)}/redact/{q(first)}/{secrets.token_hex(4)}", {})
    assert found("morning") == [original] and bundled("morning") == [None] and found("evening") == []
    # Redacting an original takes it out with its edits.
    fourth = _edit(alice, room, original, "Final words")
    assert found("final") == [original]
    alice.ok("PUT", f"/rooms/{q(room)}/redact/{q(original)}/{secrets.token_hex(4)}", {})
    assert found("final") == [] and found("morning") == []
    _edit(alice, room, original, "After the redaction")
    # No row either (looked at before a search, which drops rows of redacted hits).
    assert _db(zhome, "SELECT event_id FROM event_search WHERE event_id = ?", (original,)) == []
    assert found("redaction") == [] and fourth not in found("bed")

    # The background pass over stored events gives the index the persist path gave.
    terms = ["morning", "evening", "night", "three", "four", "bed", "handover", "dusk", "noon", "ward",
             "bobsword", "editofedit", "topicedit", "othertype", "nonewcontent", "fallbackword", "final", "redaction", "cardiology"]
    live = {t: sorted(found(t)) for t in terms}
    live_rows = sorted(_db(zhome, "SELECT event_id, edit_id FROM event_search"))
    assert (late, late_edit) in live_rows
    zhome.stop()
    _db(zhome, "DELETE FROM event_search", write=True)
    _db(zhome, "DELETE FROM at_rest_progress WHERE name IN ('event_search', 'event_search_done')", write=True)
    zhome.start()
    for _ in range(300):
        if _db(zhome, "SELECT 1 FROM at_rest_progress WHERE name = 'event_search_done'"):
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the background pass did not finish")
    assert sorted(_db(zhome, "SELECT event_id, edit_id FROM event_search")) == live_rows
    assert {t: sorted(found(t)) for t in terms} == live


def test_an_edit_received_before_its_original(world: World) -> None:  # noqa: F811
    """Over federation an edit can come before the event it replaces (here
    both are built on the same prev event and sent in that order): once the
    original comes, it is found by the edit's words, not its own."""
    r = world.room
    original = r.build("m.room.message", {"msgtype": "m.text", "body": "remote draft wording"}, world.mallory)
    oid, osigned = r.sign(original)
    edit = r.build("m.room.message", {
        "msgtype": "m.text", "body": "* remote final wording",
        "m.new_content": {"msgtype": "m.text", "body": "remote final wording"},
        "m.relates_to": {"rel_type": "m.replace", "event_id": oid}}, world.mallory)
    eid, esigned = r.sign(edit)
    for event_id, signed in ((eid, esigned), (oid, osigned)):
        status, body = world.send_txn([signed])
        assert status == 200 and body["pdus"] == {event_id: {}}, (status, body)
    r.accepted(eid, edit)

    def found(term: str) -> list[dict[str, Any]]:
        status, body = world.client("POST", "/search", {"search_categories": {"room_events": {
            "search_term": term, "filter": {"rooms": [r.room_id]}}}})
        assert status == 200, (status, body)
        return [x["result"] for x in body["search_categories"]["room_events"]["results"]]

    hits = found("final")
    assert [h["event_id"] for h in hits] == [oid]
    assert hits[0]["unsigned"]["m.relations"]["m.replace"]["event_id"] == eid
    assert found("draft") == [] and found("wording")[0]["event_id"] == oid
