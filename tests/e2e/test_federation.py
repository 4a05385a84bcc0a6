"""Two (and three) real zhome processes federating over TLS on loopback IPs.

Server A is 127.0.0.2, server B 127.0.0.3, each on its own database of the
same engine. Every assertion is on what a server serves through the
Client-Server API. Spec: server-server-api (joins, invites, transactions,
EDUs, queries, public rooms) as seen from the client side of each server.

The pair is shared by the whole module (per engine); each scenario uses
its own rooms and users so they do not interfere.
"""

from __future__ import annotations

import concurrent.futures
import time
import urllib.request
from typing import Any, Callable, Optional
from urllib.parse import quote

import pytest
import yaml

from tests.e2e.conftest import ZhomeServers
from tests.e2e.harness import ZhomeProcess, free_port

CS = "/_matrix/client/v3"
WAIT_S = 30.0


def q(s: str) -> str:
    return quote(s, safe="")


class User:
    """A logged-in user on one server, with an incremental /sync view."""

    def __init__(self, hs: ZhomeProcess, localpart: str) -> None:
        self.hs = hs
        reg = hs.register(localpart)
        self.user_id: str = reg["user_id"]
        self.token: str = reg["access_token"]
        self.since: Optional[str] = None
        # Everything /sync delivered so far.
        self.timeline: dict[str, list[dict[str, Any]]] = {}
        self.invites: dict[str, list[dict[str, Any]]] = {}
        self.left: dict[str, list[dict[str, Any]]] = {}
        self.ephemeral: dict[str, list[dict[str, Any]]] = {}
        self.joined: set[str] = set()
        # user_id -> the latest m.presence content /sync delivered.
        self.presence: dict[str, dict[str, Any]] = {}

    def req(self, method: str, path: str, body: Any = None, expect: Optional[int] = 200) -> Any:
        status, resp = self.hs.request(method, path, body, self.token)
        if expect is not None:
            assert status == expect, (method, path, status, resp)
        return resp if expect is not None else (status, resp)

    # -- sync ----------------------------------------------------------------------
    def sync_once(self, timeout_ms: int = 1000) -> dict[str, Any]:
        path = f"{CS}/sync?timeout={timeout_ms}"
        if self.since:
            path += f"&since={q(self.since)}"
        resp = self.req("GET", path)
        self.since = resp["next_batch"]
        for e in resp.get("presence", {}).get("events", []):
            if e.get("type") == "m.presence":
                self.presence[e["sender"]] = e["content"]
        rooms = resp.get("rooms", {})
        for rid, r in rooms.get("join", {}).items():
            self.joined.add(rid)
            self.timeline.setdefault(rid, []).extend(r.get("timeline", {}).get("events", []))
            self.ephemeral.setdefault(rid, []).extend(r.get("ephemeral", {}).get("events", []))
        for rid, r in rooms.get("invite", {}).items():
            self.invites[rid] = r.get("invite_state", {}).get("events", [])
        for rid, r in rooms.get("leave", {}).items():
            self.joined.discard(rid)
            self.left.setdefault(rid, []).extend(r.get("timeline", {}).get("events", []))
        return resp

    def sync_until(self, pred: Callable[[], bool], what: str, wait_s: float = WAIT_S) -> None:
        """Long-poll /sync until ``pred()`` holds on what was delivered."""
        deadline = time.monotonic() + wait_s
        if pred():
            return
        while time.monotonic() < deadline:
            self.sync_once(timeout_ms=1000)
            if pred():
                return
        raise AssertionError(f"{self.user_id}: not delivered through /sync within {wait_s}s: {what}")

    def bodies(self, room_id: str) -> list[str]:
        return [e["content"].get("body") for e in self.timeline.get(room_id, [])
                if e.get("type") == "m.room.message" and "body" in e.get("content", {})]

    # -- actions ---------------------------------------------------------------------
    def create_room(self, **body: Any) -> str:
        return str(self.req("POST", f"{CS}/createRoom", body)["room_id"])

    def send(self, room_id: str, body: str) -> str:
        txn = f"t{time.monotonic_ns()}"
        return str(self.req("PUT", f"{CS}/rooms/{q(room_id)}/send/m.room.message/{txn}",
                            {"msgtype": "m.text", "body": body})["event_id"])

    def join(self, target: str, query: str = "") -> str:
        return str(self.req("POST", f"{CS}/join/{q(target)}{query}", {})["room_id"])

    def state(self, room_id: str) -> list[dict[str, Any]]:
        return list(self.req("GET", f"{CS}/rooms/{q(room_id)}/state"))

    def state_event(self, room_id: str, etype: str, state_key: str = "") -> Optional[dict[str, Any]]:
        status, body = self.req("GET", f"{CS}/rooms/{q(room_id)}/state/{etype}/{q(state_key)}", expect=None)
        return body if status == 200 else None

    def put_state(self, room_id: str, etype: str, content: dict[str, Any], state_key: str = "") -> str:
        return str(self.req("PUT", f"{CS}/rooms/{q(room_id)}/state/{etype}/{q(state_key)}", content)["event_id"])

    def messages(self, room_id: str, limit: int = 200) -> list[dict[str, Any]]:
        """The room's timeline, oldest first, through /messages backwards."""
        out: list[dict[str, Any]] = []
        frm = ""
        for _ in range(20):
            path = f"{CS}/rooms/{q(room_id)}/messages?dir=b&limit=100"
            if frm:
                path += f"&from={q(frm)}"
            resp = self.req("GET", path)
            out.extend(resp.get("chunk", []))
            if not resp.get("chunk") or "end" not in resp or len(out) >= limit:
                break
            frm = resp["end"]
        return list(reversed(out))

    def message_bodies(self, room_id: str) -> list[str]:
        return [e["content"].get("body") for e in self.messages(room_id)
                if e.get("type") == "m.room.message" and "body" in e.get("content", {})]

    def membership_of(self, room_id: str, user_id: str) -> Optional[str]:
        ev = self.state_event(room_id, "m.room.member", user_id)
        return ev.get("membership") if ev else None


def wait_until(pred: Callable[[], bool], what: str, wait_s: float = WAIT_S, every: float = 0.2) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        if pred():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {wait_s}s: {what}")
        time.sleep(every)


def state_ids(u: User, room_id: str) -> dict[tuple[str, str], str]:
    return {(e["type"], e["state_key"]): e["event_id"] for e in u.state(room_id)}


@pytest.fixture(scope="module")
def users(zhome_pair: ZhomeServers) -> dict[str, User]:
    a, b = zhome_pair.a, zhome_pair.b
    return {"alice": User(a, "alice"), "bob": User(b, "bob"), "carol": User(b, "carol"),
            "dave": User(b, "dave"), "erin": User(b, "erin")}


def _public_room(u: User, **extra: Any) -> str:
    return u.create_room(preset="public_chat", visibility="public", **extra)


# -- 1. invite, accept, chat both ways -----------------------------------------------------
def test_invite_accept_and_chat(zhome_pair: ZhomeServers, users: dict[str, User]) -> None:
    alice, bob = users["alice"], users["bob"]
    room = alice.create_room(name="Care team", invite=[bob.user_id])

    bob.sync_until(lambda: room in bob.invites, "the invite")
    stripped = {e["type"]: e for e in bob.invites[room]}
    assert stripped["m.room.name"]["content"]["name"] == "Care team"
    assert "m.room.create" in stripped

    assert bob.join(room) == room
    assert bob.membership_of(room, bob.user_id) == "join"
    wait_until(lambda: alice.membership_of(room, bob.user_id) == "join", "A sees B's user joined")

    alice.sync_once(timeout_ms=0)
    bob.sync_once(timeout_ms=0)
    alice.send(room, "hello from A")
    bob.sync_until(lambda: "hello from A" in bob.bodies(room), "A's message at B")
    bob.send(room, "hello from B")
    alice.sync_until(lambda: "hello from B" in alice.bodies(room), "B's message at A")
    # Each side also has its own message.
    alice.sync_until(lambda: "hello from A" in alice.bodies(room), "own message at A")
    bob.sync_until(lambda: "hello from B" in bob.bodies(room), "own message at B")


# -- 2. joining a public room without an invite -------------------------------------------------
def test_join_public_room_by_alias_and_by_id(zhome_pair: ZhomeServers, users: dict[str, User]) -> None:
    alice, carol, dave, erin = users["alice"], users["carol"], users["dave"], users["erin"]
    a = zhome_pair.a.server_name
    by_alias = _public_room(alice, room_alias_name="lobby", name="Lobby")
    assert carol.join(f"#lobby:{a}") == by_alias
    wait_until(lambda: alice.membership_of(by_alias, carol.user_id) == "join", "A sees the alias join")
    assert carol.state_event(by_alias, "m.room.name") == {"name": "Lobby"}

    by_server_name = _public_room(alice, name="By server_name")
    assert dave.join(by_server_name, f"?server_name={q(a)}") == by_server_name
    wait_until(lambda: alice.membership_of(by_server_name, dave.user_id) == "join", "A sees the server_name join")
    assert dave.state_event(by_server_name, "m.room.name") == {"name": "By server_name"}

    by_via = _public_room(alice, name="By via")
    assert erin.join(by_via, f"?via={q(a)}") == by_via
    wait_until(lambda: alice.membership_of(by_via, erin.user_id) == "join", "A sees the via join")
    assert erin.state_event(by_via, "m.room.name") == {"name": "By via"}

    # Without an invite, an invite-only room stays closed.
    private = alice.create_room(preset="private_chat")
    status, body = erin.req("POST", f"{CS}/join/{q(private)}?via={q(a)}", {}, expect=None)
    assert status == 403, (status, body)
    assert body["errcode"] == "M_FORBIDDEN"


# -- 3. membership, power levels and redaction across servers ------------------------------
def test_membership_power_levels_and_redaction(zhome_pair: ZhomeServers, users: dict[str, User]) -> None:
    alice, bob = users["alice"], users["bob"]
    a = zhome_pair.a.server_name
    room = _public_room(alice, name="Ward 3")
    bob.join(room, f"?via={q(a)}")
    wait_until(lambda: alice.membership_of(room, bob.user_id) == "join", "A sees B's user joined")

    # Before promotion B's user may not rename the room.
    status, _ = bob.req("PUT", f"{CS}/rooms/{q(room)}/state/m.room.name/", {"name": "nope"}, expect=None)
    assert status == 403

    # Power levels: promote B's user; B's server must see it, then B's user can rename.
    pl = alice.state_event(room, "m.room.power_levels")
    assert pl is not None
    pl["users"][bob.user_id] = 50
    alice.put_state(room, "m.room.power_levels", pl)
    wait_until(lambda: (bob.state_event(room, "m.room.power_levels") or {}).get("users", {}).get(bob.user_id) == 50,
               "B sees the promotion")
    bob.put_state(room, "m.room.name", {"name": "Ward 3 (renamed by B)"})
    wait_until(lambda: alice.state_event(room, "m.room.name") == {"name": "Ward 3 (renamed by B)"},
               "A sees B's rename")

    # Redaction: A redacts B's message; B serves it redacted.
    msg = bob.send(room, "to be redacted")
    wait_until(lambda: alice.req("GET", f"{CS}/rooms/{q(room)}/event/{q(msg)}", expect=None)[0] == 200,
               "A has B's message")
    alice.req("PUT", f"{CS}/rooms/{q(room)}/redact/{q(msg)}/r1", {"reason": "wrong room"})

    def redacted_at_b() -> bool:
        ev = bob.req("GET", f"{CS}/rooms/{q(room)}/event/{q(msg)}")
        return ev["content"] == {} and "redacted_because" in ev.get("unsigned", {})
    wait_until(redacted_at_b, "B serves the message redacted")

    # Leave.
    bob.req("POST", f"{CS}/rooms/{q(room)}/leave", {})
    wait_until(lambda: alice.membership_of(room, bob.user_id) == "leave", "A sees B's user leave")

    # Kick (after rejoining).
    bob.join(room, f"?via={q(a)}")
    wait_until(lambda: alice.membership_of(room, bob.user_id) == "join", "A sees B's user rejoin")
    bob.sync_once(timeout_ms=0)
    alice.req("POST", f"{CS}/rooms/{q(room)}/kick", {"user_id": bob.user_id, "reason": "test"})
    bob.sync_until(lambda: any(e.get("type") == "m.room.member" and e.get("state_key") == bob.user_id
                               and e.get("sender") == alice.user_id and e["content"].get("membership") == "leave"
                               for e in bob.left.get(room, [])),
                   "the kick in the leave section of B's /sync")
    status, body = bob.req("GET", f"{CS}/rooms/{q(room)}/state/m.room.member/{q(bob.user_id)}", expect=None)
    assert status == 200 and body["membership"] == "leave", (status, body)

    # Ban (after rejoining): B's user can no longer rejoin.
    bob.join(room, f"?via={q(a)}")
    wait_until(lambda: alice.membership_of(room, bob.user_id) == "join", "A sees B's user rejoin")
    alice.req("POST", f"{CS}/rooms/{q(room)}/ban", {"user_id": bob.user_id, "reason": "test"})
    bob.sync_until(lambda: any(e.get("type") == "m.room.member" and e.get("state_key") == bob.user_id
                               and e["content"].get("membership") == "ban" for e in bob.left.get(room, [])),
                   "the ban in the leave section of B's /sync")
    # A banned user no longer reads the room's state.
    status, body = bob.req("GET", f"{CS}/rooms/{q(room)}/state/m.room.member/{q(bob.user_id)}", expect=None)
    assert status == 403 and body["errcode"] == "M_FORBIDDEN", (status, body)
    status, body = bob.req("POST", f"{CS}/join/{q(room)}?via={q(a)}", {}, expect=None)
    assert status == 403, (status, body)
    assert body["errcode"] == "M_FORBIDDEN"
    assert alice.membership_of(room, bob.user_id) == "ban"


def test_redaction_over_federation_lowers_unread_counts(zhome_pair: ZhomeServers) -> None:
    """A redaction received over federation takes its target off the
    counts of the receiving server's users who had not read it
    (client-server-api "Receiving notifications"); one already read
    changes nothing."""
    alice, bob = User(zhome_pair.a, "alice_unread"), User(zhome_pair.b, "bob_unread")
    a = zhome_pair.a.server_name
    room = _public_room(alice, name="Night shift")
    bob.join(room, f"?via={q(a)}")
    wait_until(lambda: alice.membership_of(room, bob.user_id) == "join", "A sees B's user joined")

    def bobs_count() -> int:
        joined = bob.req("GET", f"{CS}/sync?timeout=0")["rooms"]["join"]
        return int(joined[room]["unread_notifications"]["notification_count"]) if room in joined else -1

    first, second = alice.send(room, "one"), alice.send(room, "two")
    wait_until(lambda: bobs_count() == 2, "both of A's messages unread at B")
    bob.req("POST", f"{CS}/rooms/{q(room)}/receipt/m.read/{q(first)}", {})
    assert bobs_count() == 1
    alice.req("PUT", f"{CS}/rooms/{q(room)}/redact/{q(second)}/r1", {})
    wait_until(lambda: bobs_count() == 0, "the redacted unread message off B's count")
    # Bob had read the first: its redaction leaves the count alone.
    third = alice.send(room, "three")
    alice.req("PUT", f"{CS}/rooms/{q(room)}/redact/{q(first)}/r2", {})

    def redacted_at_b() -> bool:
        status, ev = bob.req("GET", f"{CS}/rooms/{q(room)}/event/{q(first)}", expect=None)
        return status == 200 and "redacted_because" in ev.get("unsigned", {})
    wait_until(redacted_at_b, "B has the second redaction")
    assert bobs_count() == 1
    assert third


# -- 4. the outbound queue survives the destination being down ----------------------------
def test_outage_queue_delivers_in_order(zhome_pair: ZhomeServers, users: dict[str, User]) -> None:
    alice, bob = users["alice"], users["bob"]
    a = zhome_pair.a.server_name
    room = _public_room(alice, name="Outage")
    bob.join(room, f"?via={q(a)}")
    wait_until(lambda: alice.membership_of(room, bob.user_id) == "join", "A sees B's user joined")

    zhome_pair.b.stop()
    try:
        sent = [f"queued {i}" for i in range(30)]
        for body in sent:
            alice.send(room, body)
    finally:
        zhome_pair.b.start()

    def all_arrived() -> bool:
        got = [b for b in bob.message_bodies(room) if b.startswith("queued ")]
        return got == sent
    wait_until(all_arrived, "all 30 queued messages, in order, in B's /messages", wait_s=60, every=0.5)


# -- 5. concurrent sending converges -------------------------------------------------------------
def test_concurrent_sends_converge(zhome_pair: ZhomeServers, users: dict[str, User]) -> None:
    alice, bob = users["alice"], users["bob"]
    a = zhome_pair.a.server_name
    # B's user may change the topic too.
    room = _public_room(alice, name="Concurrent",
                        power_level_content_override={"users": {bob.user_id: 50}})
    bob.join(room, f"?via={q(a)}")
    wait_until(lambda: alice.membership_of(room, bob.user_id) == "join", "A sees B's user joined")

    expected: set[str] = set()
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        for rnd in range(6):
            futs = [pool.submit(alice.send, room, f"A round {rnd}"), pool.submit(bob.send, room, f"B round {rnd}")]
            for f in futs:
                f.result(timeout=60)
            expected |= {f"A round {rnd}", f"B round {rnd}"}

    for u, side in ((alice, "A"), (bob, "B")):
        wait_until(lambda: expected <= set(u.message_bodies(room)), f"every message in {side}'s timeline",
                   every=0.5)
    wait_until(lambda: state_ids(alice, room) == state_ids(bob, room), "identical current state")

    # Concurrent topic changes: both resolve to the same winner.
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futs = [pool.submit(alice.put_state, room, "m.room.topic", {"topic": "from A"}),
                pool.submit(bob.put_state, room, "m.room.topic", {"topic": "from B"})]
        topic_ids = {f.result(timeout=60) for f in futs}

    def converged() -> bool:
        sa, sb = state_ids(alice, room), state_ids(bob, room)
        return sa == sb and sa.get(("m.room.topic", "")) in topic_ids
    wait_until(converged, "the same resolved topic on both servers")
    ta = alice.state_event(room, "m.room.topic")
    tb = bob.state_event(room, "m.room.topic")
    assert ta == tb and ta is not None and ta["topic"] in ("from A", "from B")


# -- 6. EDUs, profile, directory and public rooms --------------------------------------------
def test_edus_profile_directory(zhome_pair: ZhomeServers, users: dict[str, User]) -> None:
    alice, bob = users["alice"], users["bob"]
    a = zhome_pair.a.server_name
    room = _public_room(alice, name="EDUs", room_alias_name="edus", topic="typing and receipts")
    bob.join(room, f"?via={q(a)}")
    wait_until(lambda: alice.membership_of(room, bob.user_id) == "join", "A sees B's user joined")
    bob.sync_once(timeout_ms=0)
    alice.sync_once(timeout_ms=0)

    # Typing: A's user types, B sees it in /sync ephemeral.
    alice.req("PUT", f"{CS}/rooms/{q(room)}/typing/{q(alice.user_id)}", {"typing": True, "timeout": 30000})
    bob.sync_until(lambda: any(e.get("type") == "m.typing" and alice.user_id in e["content"].get("user_ids", [])
                               for e in bob.ephemeral.get(room, [])), "A's user typing at B")

    # Read receipt: B's user reads A's message, A sees the m.read receipt.
    eid = alice.send(room, "please read")
    bob.sync_until(lambda: "please read" in bob.bodies(room), "the message at B")
    bob.req("POST", f"{CS}/rooms/{q(room)}/receipt/m.read/{q(eid)}", {})

    def receipt_at_a() -> bool:
        for e in alice.ephemeral.get(room, []):
            if e.get("type") == "m.receipt" and bob.user_id in e["content"].get(eid, {}).get("m.read", {}):
                return True
        return False
    alice.sync_until(receipt_at_a, "B's user's m.read receipt at A")

    # Profile of A's user, asked through B.
    alice.req("PUT", f"{CS}/profile/{q(alice.user_id)}/displayname", {"displayname": "Alice of A"})
    prof = bob.req("GET", f"{CS}/profile/{q(alice.user_id)}")
    assert prof.get("displayname") == "Alice of A", prof
    assert bob.req("GET", f"{CS}/profile/{q(alice.user_id)}/displayname") == {"displayname": "Alice of A"}
    status, body = bob.req("GET", f"{CS}/profile/{q('@nobody:' + a)}", expect=None)
    assert status == 404 and body["errcode"] == "M_NOT_FOUND", (status, body)

    # Room directory on A, asked through B.
    d = bob.req("GET", f"{CS}/directory/room/{q('#edus:' + a)}")
    assert d["room_id"] == room and a in d["servers"], d
    status, body = bob.req("GET", f"{CS}/directory/room/{q('#missing:' + a)}", expect=None)
    assert status == 404 and body["errcode"] == "M_NOT_FOUND", (status, body)

    # A's public room list, asked through B.
    pub = bob.req("GET", f"{CS}/publicRooms?server={q(a)}")
    entries = {r["room_id"]: r for r in pub["chunk"]}
    assert room in entries, pub
    assert entries[room].get("name") == "EDUs" and entries[room].get("topic") == "typing and receipts"
    pub = bob.req("POST", f"{CS}/publicRooms?server={q(a)}", {"filter": {"generic_search_term": "EDUs"}})
    assert [r["room_id"] for r in pub["chunk"]] == [room], pub


def test_user_directory_across_servers(zhome_pair: ZhomeServers) -> None:
    """B's directory lists A's users it shares a public room with, until B
    is no longer in the room; a private room's members are found only by
    who shares it."""
    a = zhome_pair.a.server_name
    host = User(zhome_pair.a, "dirhost")
    host.req("PUT", f"{CS}/profile/{q(host.user_id)}/displayname", {"displayname": "Directory Hostess"})
    seeker, other = User(zhome_pair.b, "dirseeker"), User(zhome_pair.b, "dirother")

    def found(u: User, term: str) -> list[str]:
        body = u.req("POST", f"{CS}/user_directory/search", {"search_term": term})
        return [r["user_id"] for r in body["results"]]

    room = _public_room(host, name="Directory lobby")
    seeker.join(room, f"?via={q(a)}")
    wait_until(lambda: host.membership_of(room, seeker.user_id) == "join", "A sees B's user joined")
    assert found(seeker, "hostess") == [host.user_id]
    # Another user of B finds A's user too: the room is public and B is in it.
    assert found(other, "hostess") == [host.user_id]
    seeker.req("POST", f"{CS}/rooms/{q(room)}/leave", {})
    assert found(seeker, "hostess") == []
    assert found(other, "hostess") == []

    private = host.create_room(preset="private_chat", invite=[seeker.user_id])
    seeker.sync_until(lambda: private in seeker.invites, "the invite at B")
    seeker.join(private, f"?via={q(a)}")
    assert found(seeker, "hostess") == [host.user_id]
    assert found(other, "hostess") == []


# -- 7. room versions ----------------------------------------------------------------------------
def test_presence_over_federation(zhome_pair: ZhomeServers) -> None:
    """m.presence EDUs: each server learns the presence of the other's users
    who share a room with its own, on joining and on every change."""
    pa, pb = User(zhome_pair.a, "pres_a"), User(zhome_pair.b, "pres_b")
    a = zhome_pair.a.server_name
    pa.sync_once(timeout_ms=0)
    pb.sync_once(timeout_ms=0)
    assert pa.presence[pa.user_id]["presence"] == "online"
    room = _public_room(pa, name="presence")
    pb.join(room, f"?via={q(a)}")
    pb.sync_until(lambda: pb.presence.get(pa.user_id, {}).get("presence") == "online",
                  "A's user online, seen at B after joining")
    pa.sync_until(lambda: pa.presence.get(pb.user_id, {}).get("presence") == "online",
                  "B's user online, seen at A after their join")
    pa.req("PUT", f"{CS}/presence/{q(pa.user_id)}/status", {"presence": "unavailable", "status_msg": "away"})
    pb.sync_until(lambda: pb.presence.get(pa.user_id, {}).get("presence") == "unavailable",
                  "A's user unavailable, seen at B")
    assert pb.presence[pa.user_id].get("status_msg") == "away", pb.presence[pa.user_id]
    got = pb.req("GET", f"{CS}/presence/{q(pa.user_id)}/status")
    assert got["presence"] == "unavailable" and got["status_msg"] == "away", got
    pb.req("PUT", f"{CS}/presence/{q(pb.user_id)}/status", {"presence": "online", "status_msg": "here"})
    pa.sync_until(lambda: pa.presence.get(pb.user_id, {}).get("status_msg") == "here",
                  "B's user's status message, seen at A")


@pytest.mark.parametrize("version", ["1", "5", "9", "10", "11", "12"])
def test_room_versions(zhome_pair: ZhomeServers, users: dict[str, User], version: str) -> None:
    alice, bob = users["alice"], users["bob"]
    a = zhome_pair.a.server_name
    room = _public_room(alice, room_version=version, name=f"v{version}")
    assert alice.state_event(room, "m.room.create")["room_version"] == version  # type: ignore[index]
    assert bob.join(room, f"?via={q(a)}") == room
    assert bob.state_event(room, "m.room.create")["room_version"] == version  # type: ignore[index]
    wait_until(lambda: alice.membership_of(room, bob.user_id) == "join", "A sees B's user joined")
    a_msg = alice.send(room, f"A in v{version}")
    b_msg = bob.send(room, f"B in v{version}")
    for u in (alice, bob):
        wait_until(lambda: {f"A in v{version}", f"B in v{version}"} <= set(u.message_bodies(room)),
                   f"both messages at {u.user_id}")
    if version == "1":
        # Server-chosen event IDs: each server names its own events.
        assert a_msg.endswith(":" + a) and b_msg.endswith(":" + zhome_pair.b.server_name), (a_msg, b_msg)
    # Both servers call the events by the same IDs (server-chosen in v1/v2).
    for eid in (a_msg, b_msg):
        ea = alice.req("GET", f"{CS}/rooms/{q(room)}/event/{q(eid)}")
        eb = bob.req("GET", f"{CS}/rooms/{q(room)}/event/{q(eid)}")
        assert ea["event_id"] == eb["event_id"] == eid
        assert ea["content"] == eb["content"]
    wait_until(lambda: state_ids(alice, room) == state_ids(bob, room), "identical current state")


# -- 8. residency: a blocked server gets nothing ------------------------------------------------
def test_blocked_server_cannot_join(zhome_pair: ZhomeServers) -> None:
    metrics_port = free_port()
    a2 = zhome_pair.spawn("127.0.0.2", "a_residency", overrides={"federation": {"blocked_servers": ["127.0.0.4"]}},
                          start=False)
    cfg = yaml.safe_load(a2.config_path.read_text())
    cfg["listeners"].append({"port": metrics_port, "type": "metrics", "bind_addresses": ["127.0.0.1"]})
    a2.config_path.write_text(yaml.safe_dump(cfg))
    a2.start()
    c = zhome_pair.spawn("127.0.0.4", "c")
    try:
        owner = User(a2, "owner")
        mallory = User(c, "mallory")
        room = _public_room(owner, room_alias_name="open", name="Open to all but C")

        status, body = mallory.req("POST", f"{CS}/join/{q(room)}?via={q(a2.server_name)}", {}, expect=None)
        assert status == 403, (status, body)
        assert body["errcode"] == "M_FORBIDDEN"
        assert "not allowed" in body["error"] or "refused" in body["error"], body

        status, body = mallory.req("POST", f"{CS}/join/{q('#open:' + a2.server_name)}", {}, expect=None)
        assert status == 403, (status, body)
        assert body["errcode"] == "M_FORBIDDEN" and "not allowed" in body["error"], body

        owner.send(room, "not for C")
        mallory.sync_once(timeout_ms=0)
        mallory.sync_once(timeout_ms=1000)
        assert room not in mallory.joined and room not in mallory.invites and room not in mallory.timeline
        status, body = mallory.req("GET", f"{CS}/rooms/{q(room)}/messages?dir=b", expect=None)
        assert status in (403, 404), (status, body)
        assert owner.membership_of(room, mallory.user_id) is None

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        refused = [line for line in text.splitlines()
                   if line.startswith("zhome_federation_residency_refused_total{")]
        assert refused and sum(float(line.split()[-1]) for line in refused) >= 1, text[-3000:]
    finally:
        c.stop()
        a2.stop()
