"""Federation with a real Synapse (pinned in requirements-synapse.txt).

A zhome on 127.0.0.2 and a Synapse on 127.0.0.5, each named by its IP
literal and federation port, talk over TLS with self-signed certificates.
Every scenario checks what each side serves to its own clients through the
Client-Server API. One Synapse and one zhome serve the whole module.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import ZhomeProcess, free_port
from tests.e2e.synapse_peer import SynapsePeer

WAIT_S = 30.0


class Client:
    """A logged-in user of one server, over plain HTTP."""

    def __init__(self, base_url: str, user_id: str, token: str) -> None:
        self.base_url = base_url
        self.user_id = user_id
        self.token = token
        self.since: str | None = None

    def request(self, method: str, path: str, body: Any = None,
                query: dict[str, Any] | None = None) -> tuple[int, Any]:
        return _request(self.base_url, method, path, body, self.token, query)

    def ok(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None) -> Any:
        status, resp = self.request(method, path, body, query)
        assert status == 200, (self.user_id, method, path, status, resp)
        return resp

    def create_room(self, **body: Any) -> str:
        return str(self.ok("POST", "/_matrix/client/v3/createRoom", body)["room_id"])

    def send(self, room_id: str, body: str) -> str:
        return str(self.ok("PUT", f"/_matrix/client/v3/rooms/{_q(room_id)}/send/m.room.message/{uuid.uuid4().hex}",
                           {"msgtype": "m.text", "body": body})["event_id"])

    def join(self, target: str, via: list[str] | None = None) -> str:
        q = {"server_name": via} if via else None
        return str(self.ok("POST", f"/_matrix/client/v3/join/{_q(target)}", {}, q)["room_id"])

    def joined_members(self, room_id: str) -> set[str]:
        status, resp = self.request("GET", f"/_matrix/client/v3/rooms/{_q(room_id)}/joined_members")
        return set(resp.get("joined", {})) if status == 200 else set()

    def sync(self, timeout_ms: int = 1000) -> dict[str, Any]:
        q: dict[str, Any] = {"timeout": str(timeout_ms), "filter": json.dumps({"room": {"timeline": {"limit": 50}}})}
        if self.since:
            q["since"] = self.since
        resp = self.ok("GET", "/_matrix/client/v3/sync", query=q)
        self.since = resp["next_batch"]
        return resp

    def sync_until(self, pred: Callable[[dict[str, Any]], Any], what: str, wait: float = WAIT_S) -> Any:
        """Incremental /sync until ``pred(response)`` is truthy; returns that value."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            got = pred(self.sync())
            if got:
                return got
        raise AssertionError(f"{self.user_id} did not see {what} via /sync within {wait}s")

    def wait_for(self, pred: Callable[[], Any], what: str, wait: float = WAIT_S) -> Any:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            got = pred()
            if got:
                return got
            time.sleep(0.2)
        raise AssertionError(f"{self.user_id}: {what} not seen within {wait}s")

    def event(self, room_id: str, event_id: str) -> tuple[int, Any]:
        return self.request("GET", f"/_matrix/client/v3/rooms/{_q(room_id)}/event/{_q(event_id)}")

    def timeline_bodies(self, room_id: str, limit: int = 50) -> list[str]:
        resp = self.ok("GET", f"/_matrix/client/v3/rooms/{_q(room_id)}/messages",
                       query={"dir": "b", "limit": str(limit)})
        return [e["content"].get("body") for e in resp["chunk"] if e["type"] == "m.room.message"]


def _q(s: str) -> str:
    return urllib.parse.quote(s, safe="")


def _request(base: str, method: str, path: str, body: Any = None, token: str | None = None,
             query: dict[str, Any] | None = None) -> tuple[int, Any]:
    url = base + path
    if query:
        url += "?" + urllib.parse.urlencode(query, doseq=True)
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            payload, status = r.read(), r.status
    except urllib.error.HTTPError as e:
        payload, status = e.read(), e.code
    try:
        return status, json.loads(payload) if payload else None
    except ValueError:
        return status, payload


def register(base_url: str, username: str) -> Client:
    body: dict[str, Any] = {"username": username, "password": "correct horse battery staple",
                            "auth": {"type": "m.login.dummy"}}
    status, resp = _request(base_url, "POST", "/_matrix/client/v3/register", body)
    if status == 401 and isinstance(resp, dict) and "session" in resp:
        body["auth"]["session"] = resp["session"]
        status, resp = _request(base_url, "POST", "/_matrix/client/v3/register", body)
    assert status == 200, (base_url, status, resp)
    client = Client(base_url, resp["user_id"], resp["access_token"])
    client.sync(timeout_ms=0)
    return client


def _invited(room_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda s: room_id in s.get("rooms", {}).get("invite", {})


def _timeline(s: dict[str, Any], room_id: str) -> list[dict[str, Any]]:
    return list(s.get("rooms", {}).get("join", {}).get(room_id, {}).get("timeline", {}).get("events", []))


def _has_body(room_id: str, body: str) -> Callable[[dict[str, Any]], bool]:
    return lambda s: any(e.get("content", {}).get("body") == body for e in _timeline(s, room_id))


def _has_event(room_id: str, pred: Callable[[dict[str, Any]], bool]) -> Callable[[dict[str, Any]], bool]:
    return lambda s: any(pred(e) for e in _timeline(s, room_id))


def _redacted(resp: tuple[int, Any]) -> bool:
    status, body = resp
    return status == 200 and body["content"] == {} and "redacted_because" in body.get("unsigned", {})


def _membership(c: Client, room_id: str, user_id: str) -> str | None:
    status, body = c.request("GET", f"/_matrix/client/v3/rooms/{_q(room_id)}/state/m.room.member/{_q(user_id)}")
    return body.get("membership") if status == 200 else None


# ---------------------------------------------------------------------------
# Fixtures: one Synapse and one zhome for the module


@pytest.fixture(scope="module")
def synapse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SynapsePeer]:
    peer = SynapsePeer(tmp_path_factory.mktemp("synapse"), "127.0.0.5", free_port(), free_port())
    peer.start()
    try:
        yield peer
    finally:
        peer.stop()


@pytest.fixture(scope="module")
def zhome_fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZhomeProcess]:
    proc = ZhomeProcess(Path(tmp_path_factory.mktemp("zhome")), federation_ip="127.0.0.2")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def z(zhome_fed: ZhomeProcess) -> Client:
    return register(zhome_fed.base_url, "z" + uuid.uuid4().hex[:10])


@pytest.fixture
def s(synapse: SynapsePeer) -> Client:
    return register(synapse.base_url, "s" + uuid.uuid4().hex[:10])


def _zhome_room_with(z: Client, s: Client, **create: Any) -> str:
    """A zhome room that the Synapse user has joined by invite."""
    room_id = z.create_room(invite=[s.user_id], **create)
    s.sync_until(_invited(room_id), f"the invite to {room_id}")
    s.ok("POST", f"/_matrix/client/v3/rooms/{_q(room_id)}/join", {})
    z.wait_for(lambda: s.user_id in z.joined_members(room_id), f"{s.user_id} joined")
    return room_id


# ---------------------------------------------------------------------------
# Scenarios


def test_invite_and_join_both_directions(z: Client, s: Client) -> None:
    # zhome invites a Synapse user.
    room_id = z.create_room(preset="private_chat", name="from zhome")
    z.ok("POST", f"/_matrix/client/v3/rooms/{_q(room_id)}/invite", {"user_id": s.user_id})
    s.sync_until(_invited(room_id), "the invite from zhome")
    s.ok("POST", f"/_matrix/client/v3/rooms/{_q(room_id)}/join", {})
    z.wait_for(lambda: s.user_id in z.joined_members(room_id), "the Synapse user joined")
    assert s.joined_members(room_id) == {z.user_id, s.user_id}
    z.sync_until(_has_event(room_id, lambda e: e["type"] == "m.room.member" and e.get("state_key") == s.user_id
                            and e["content"].get("membership") == "join"), "the Synapse user's join")

    # Synapse invites a zhome user.
    room2 = s.create_room(preset="private_chat", name="from synapse")
    s.ok("POST", f"/_matrix/client/v3/rooms/{_q(room2)}/invite", {"user_id": z.user_id})
    invite = z.sync_until(lambda r: r.get("rooms", {}).get("invite", {}).get(room2), "the invite from Synapse")
    names = [e for e in invite["invite_state"]["events"] if e["type"] == "m.room.name"]
    assert names and names[0]["content"]["name"] == "from synapse"
    z.ok("POST", f"/_matrix/client/v3/rooms/{_q(room2)}/join", {})
    s.wait_for(lambda: z.user_id in s.joined_members(room2), "the zhome user joined")
    assert z.joined_members(room2) == {z.user_id, s.user_id}


def test_messages_both_ways(z: Client, s: Client) -> None:
    room_id = _zhome_room_with(z, s)
    z.send(room_id, "hello from zhome")
    s.sync_until(_has_body(room_id, "hello from zhome"), "zhome's message")
    s.send(room_id, "hello from synapse")
    z.sync_until(_has_body(room_id, "hello from synapse"), "Synapse's message")

    # And in a room that lives on Synapse.
    room2 = s.create_room(preset="public_chat")
    z.join(room2, via=[s.user_id.split(":", 1)[1]])
    s.send(room2, "synapse room, synapse message")
    z.sync_until(_has_body(room2, "synapse room, synapse message"), "the message in the Synapse room")
    z.send(room2, "synapse room, zhome message")
    s.sync_until(_has_body(room2, "synapse room, zhome message"), "zhome's message in the Synapse room")


def test_synapse_user_joins_public_zhome_room_by_alias(z: Client, s: Client, zhome_fed: ZhomeProcess) -> None:
    local = "pub" + uuid.uuid4().hex[:8]
    room_id = z.create_room(preset="public_chat", room_alias_name=local, visibility="public")
    for i in range(3):
        z.send(room_id, f"history {i}")
    alias = f"#{local}:{zhome_fed.server_name}"
    assert s.join(alias) == room_id
    z.wait_for(lambda: s.user_id in z.joined_members(room_id), "the Synapse user joined by alias")
    z.send(room_id, "welcome")
    s.sync_until(_has_body(room_id, "welcome"), "the welcome message")
    # History from before the join (visibility "shared"): Synapse backfills
    # it from zhome when its user paginates back.
    s.wait_for(lambda: {"history 0", "history 1", "history 2"} <= set(s.timeline_bodies(room_id)),
               "the history from before the join")


def test_zhome_user_joins_synapse_room(z: Client, s: Client, synapse: SynapsePeer) -> None:
    room_id = s.create_room(preset="public_chat", visibility="public")
    s.send(room_id, "before the join")
    assert z.join(room_id, via=[synapse.server_name]) == room_id
    s.wait_for(lambda: z.user_id in s.joined_members(room_id), "the zhome user joined by room ID")
    assert z.joined_members(room_id) == {z.user_id, s.user_id}

    local = "syn" + uuid.uuid4().hex[:8]
    room2 = s.create_room(preset="public_chat", room_alias_name=local)
    assert z.join(f"#{local}:{synapse.server_name}") == room2
    s.wait_for(lambda: z.user_id in s.joined_members(room2), "the zhome user joined by alias")
    s.send(room2, "after the join")
    z.sync_until(_has_body(room2, "after the join"), "a message after joining by alias")


def test_redaction_and_kick_across(z: Client, s: Client) -> None:
    room_id = _zhome_room_with(z, s)
    # zhome redacts its own message: Synapse serves it redacted.
    ev = z.send(room_id, "zhome secret")
    s.sync_until(_has_body(room_id, "zhome secret"), "zhome's message")
    z.ok("PUT", f"/_matrix/client/v3/rooms/{_q(room_id)}/redact/{_q(ev)}/{uuid.uuid4().hex}", {"reason": "oops"})
    s.wait_for(lambda: _redacted(s.event(room_id, ev)), "the redaction from zhome")
    # Synapse redacts its own message: zhome serves it redacted.
    ev2 = s.send(room_id, "synapse secret")
    z.sync_until(_has_body(room_id, "synapse secret"), "Synapse's message")
    s.ok("PUT", f"/_matrix/client/v3/rooms/{_q(room_id)}/redact/{_q(ev2)}/{uuid.uuid4().hex}", {})
    z.wait_for(lambda: _redacted(z.event(room_id, ev2)), "the redaction from Synapse")

    # zhome kicks the Synapse user.
    z.ok("POST", f"/_matrix/client/v3/rooms/{_q(room_id)}/kick", {"user_id": s.user_id, "reason": "bye"})
    s.sync_until(lambda r: room_id in r.get("rooms", {}).get("leave", {}), "the kick from zhome")
    assert s.user_id not in z.joined_members(room_id)

    # Synapse kicks the zhome user from a Synapse room.
    room2 = s.create_room(preset="public_chat")
    z.join(room2, via=[s.user_id.split(":", 1)[1]])
    s.wait_for(lambda: z.user_id in s.joined_members(room2), "the zhome user joined")
    s.ok("POST", f"/_matrix/client/v3/rooms/{_q(room2)}/kick", {"user_id": z.user_id, "reason": "bye"})
    z.sync_until(lambda r: room2 in r.get("rooms", {}).get("leave", {}), "the kick from Synapse")
    status, resp = z.request("GET", f"/_matrix/client/v3/rooms/{_q(room2)}/state/m.room.member/{_q(z.user_id)}")
    assert status == 200 and resp["membership"] == "leave", (status, resp)


@pytest.mark.parametrize("version", ["10", "11", "12"])
def test_room_versions(z: Client, s: Client, version: str) -> None:
    room_id = z.create_room(room_version=version, preset="public_chat", name=f"v{version}")
    # An invite first: Synapse checks invite_room_state (full PDUs, with the
    # create event) strictly from room version 12 on.
    z.ok("POST", f"/_matrix/client/v3/rooms/{_q(room_id)}/invite", {"user_id": s.user_id})
    invite = s.sync_until(lambda r: r.get("rooms", {}).get("invite", {}).get(room_id), f"the v{version} invite")
    by_type = {e["type"]: e for e in invite["invite_state"]["events"]}
    assert by_type["m.room.create"]["content"].get("room_version") == version, by_type
    assert by_type["m.room.name"]["content"] == {"name": f"v{version}"}, by_type
    assert s.join(room_id, via=[z.user_id.split(":", 1)[1]]) == room_id
    z.wait_for(lambda: s.user_id in z.joined_members(room_id), f"the join to a v{version} room")
    status, create = s.request("GET", f"/_matrix/client/v3/rooms/{_q(room_id)}/state/m.room.create/")
    assert status == 200 and create.get("room_version") == version, (status, create)
    s.send(room_id, f"v{version} from synapse")
    z.sync_until(_has_body(room_id, f"v{version} from synapse"), f"Synapse's message in v{version}")
    z.send(room_id, f"v{version} from zhome")
    s.sync_until(_has_body(room_id, f"v{version} from zhome"), f"zhome's message in v{version}")


@pytest.mark.parametrize("version", ["10", "11", "12"])
def test_synapse_room_versions(z: Client, s: Client, synapse: SynapsePeer, version: str) -> None:
    room_id = s.create_room(room_version=version, preset="public_chat", name=f"synapse v{version}")
    s.ok("POST", f"/_matrix/client/v3/rooms/{_q(room_id)}/invite", {"user_id": z.user_id})
    invite = z.sync_until(lambda r: r.get("rooms", {}).get("invite", {}).get(room_id), f"the v{version} invite")
    by_type = {e["type"]: e for e in invite["invite_state"]["events"]}
    assert by_type["m.room.name"]["content"] == {"name": f"synapse v{version}"}, by_type
    assert z.join(room_id, via=[synapse.server_name]) == room_id
    s.wait_for(lambda: z.user_id in s.joined_members(room_id), f"the zhome user joined the v{version} room")
    status, create = z.request("GET", f"/_matrix/client/v3/rooms/{_q(room_id)}/state/m.room.create/")
    assert status == 200 and create.get("room_version") == version, (status, create)
    z.send(room_id, f"synapse v{version} from zhome")
    s.sync_until(_has_body(room_id, f"synapse v{version} from zhome"), f"zhome's message in v{version}")
    s.send(room_id, f"synapse v{version} from synapse")
    z.sync_until(_has_body(room_id, f"synapse v{version} from synapse"), f"Synapse's message in v{version}")


def test_reject_invites_and_leave_both_ways(z: Client, s: Client) -> None:
    # The zhome user rejects a Synapse invite (make_leave/send_leave to Synapse).
    room_id = s.create_room(preset="private_chat")
    s.ok("POST", f"/_matrix/client/v3/rooms/{_q(room_id)}/invite", {"user_id": z.user_id})
    z.sync_until(_invited(room_id), "the invite from Synapse")
    z.ok("POST", f"/_matrix/client/v3/rooms/{_q(room_id)}/leave", {})
    s.wait_for(lambda: _membership(s, room_id, z.user_id) == "leave", "the rejected invite")
    # The Synapse user rejects a zhome invite (make_leave/send_leave to zhome).
    room2 = z.create_room(preset="private_chat")
    z.ok("POST", f"/_matrix/client/v3/rooms/{_q(room2)}/invite", {"user_id": s.user_id})
    s.sync_until(_invited(room2), "the invite from zhome")
    s.ok("POST", f"/_matrix/client/v3/rooms/{_q(room2)}/leave", {})
    z.wait_for(lambda: _membership(z, room2, s.user_id) == "leave", "the rejected invite")
    # A joined Synapse user changes the name, then leaves a zhome room.
    room3 = _zhome_room_with(z, s, power_level_content_override={"users": {s.user_id: 50}})
    s.ok("PUT", f"/_matrix/client/v3/rooms/{_q(room3)}/state/m.room.name/", {"name": "renamed on synapse"})
    z.wait_for(lambda: z.request("GET", f"/_matrix/client/v3/rooms/{_q(room3)}/state/m.room.name/")[1]
               == {"name": "renamed on synapse"}, "the new name")
    s.ok("POST", f"/_matrix/client/v3/rooms/{_q(room3)}/leave", {})
    z.wait_for(lambda: s.user_id not in z.joined_members(room3), "the Synapse user left")


def test_zhome_user_sees_history_of_synapse_room(z: Client, s: Client, synapse: SynapsePeer) -> None:
    room_id = s.create_room(preset="public_chat")
    s.send(room_id, "history before zhome joined")
    z.join(room_id, via=[synapse.server_name])
    z.wait_for(lambda: "history before zhome joined" in z.timeline_bodies(room_id), "the history", wait=10)


# ---------------------------------------------------------------------------
# Older room versions, ephemeral events, queries, outages, knocking, ACLs


def _ephemeral(s: dict[str, Any], room_id: str) -> list[dict[str, Any]]:
    return list(s.get("rooms", {}).get("join", {}).get(room_id, {}).get("ephemeral", {}).get("events", []))


def _typing(room_id: str, user_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda s: any(e["type"] == "m.typing" and user_id in e["content"].get("user_ids", [])
                         for e in _ephemeral(s, room_id))


def _read_receipt(room_id: str, user_id: str, event_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda s: any(e["type"] == "m.receipt" and user_id in e["content"].get(event_id, {}).get("m.read", {})
                         for e in _ephemeral(s, room_id))


def _synapse_room_with(z: Client, s: Client, synapse: SynapsePeer, **create: Any) -> str:
    """A public Synapse room that the zhome user has joined by room ID."""
    room_id = s.create_room(preset="public_chat", **create)
    assert z.join(room_id, via=[synapse.server_name]) == room_id
    s.wait_for(lambda: z.user_id in s.joined_members(room_id), f"{z.user_id} joined")
    return room_id


@pytest.mark.parametrize("version", [str(v) for v in range(1, 10)])
def test_synapse_room_versions_1_to_9(z: Client, s: Client, synapse: SynapsePeer, zhome_fed: ZhomeProcess,
                                      version: str) -> None:
    room_id = s.create_room(room_version=version, preset="public_chat", name=f"old v{version}")
    assert z.join(room_id, via=[synapse.server_name]) == room_id
    s.wait_for(lambda: z.user_id in s.joined_members(room_id), f"the zhome user joined the v{version} room")
    status, create = z.request("GET", f"/_matrix/client/v3/rooms/{_q(room_id)}/state/m.room.create/")
    assert status == 200 and create.get("room_version", "1") == version, (status, create)

    from_s = s.send(room_id, f"old v{version} from synapse")
    z.sync_until(_has_body(room_id, f"old v{version} from synapse"), f"Synapse's message in v{version}")
    from_z = z.send(room_id, f"old v{version} from zhome")
    s.sync_until(_has_body(room_id, f"old v{version} from zhome"), f"zhome's message in v{version}")

    # v1 and v2: the sending server chooses "$local:server" IDs (and events
    # reference each other by [id, hashes]); from v3 on IDs are the
    # reference hash (v3 standard base64, v4+ URL-safe base64).
    if version in ("1", "2"):
        assert from_z.startswith("$") and from_z.endswith(":" + zhome_fed.server_name), from_z
        assert from_s.endswith(":" + synapse.server_name), from_s
    else:
        for eid in (from_z, from_s):
            assert ":" not in eid and len(eid) == 44, eid
            if version != "3":
                assert "+" not in eid and "/" not in eid, eid
    # Both servers know both events by the same IDs.
    for c in (z, s):
        for eid in (from_z, from_s):
            status, ev = c.event(room_id, eid)
            assert status == 200 and ev["event_id"] == eid, (c.user_id, eid, status, ev)


def test_typing_and_read_receipts_across(z: Client, s: Client, synapse: SynapsePeer) -> None:
    room_id = _synapse_room_with(z, s, synapse)
    typing = f"/_matrix/client/v3/rooms/{_q(room_id)}/typing/"
    # zhome user typing -> Synapse user's /sync.
    z.ok("PUT", typing + _q(z.user_id), {"typing": True, "timeout": 30000})
    s.sync_until(_typing(room_id, z.user_id), "the zhome user typing")
    # Synapse user typing -> zhome user's /sync.
    s.ok("PUT", typing + _q(s.user_id), {"typing": True, "timeout": 30000})
    z.sync_until(_typing(room_id, s.user_id), "the Synapse user typing")
    # Stopping is sent across too, both ways.
    z.ok("PUT", typing + _q(z.user_id), {"typing": False})
    s.sync_until(lambda r: any(e["type"] == "m.typing" and z.user_id not in e["content"].get("user_ids", [])
                               for e in _ephemeral(r, room_id)), "the zhome user stopping typing")
    s.ok("PUT", typing + _q(s.user_id), {"typing": False})
    z.sync_until(lambda r: any(e["type"] == "m.typing" and s.user_id not in e["content"].get("user_ids", [])
                               for e in _ephemeral(r, room_id)), "the Synapse user stopping typing")

    # Synapse user's read receipt on a zhome message -> zhome /sync.
    from_z = z.send(room_id, "read me, synapse")
    s.sync_until(_has_body(room_id, "read me, synapse"), "zhome's message")
    s.ok("POST", f"/_matrix/client/v3/rooms/{_q(room_id)}/receipt/m.read/{_q(from_z)}", {})
    z.sync_until(_read_receipt(room_id, s.user_id, from_z), "the Synapse user's read receipt")
    # zhome user's read receipt on a Synapse message -> Synapse /sync.
    from_s = s.send(room_id, "read me, zhome")
    z.sync_until(_has_body(room_id, "read me, zhome"), "Synapse's message")
    z.ok("POST", f"/_matrix/client/v3/rooms/{_q(room_id)}/receipt/m.read/{_q(from_s)}", {})
    s.sync_until(_read_receipt(room_id, z.user_id, from_s), "the zhome user's read receipt")


def _presence_of(user_id: str, state: str, status_msg: str) -> Callable[[dict[str, Any]], Any]:
    def pred(resp: dict[str, Any]) -> Any:
        return any(e.get("sender") == user_id and e["content"].get("presence") == state
                   and e["content"].get("status_msg") == status_msg
                   for e in resp.get("presence", {}).get("events", []))
    return pred


def test_presence_across(z: Client, s: Client, synapse: SynapsePeer) -> None:
    """Spec: server-server-api "Presence" (m.presence EDUs) both ways; each
    side's /sync and GET /presence/{userId}/status show the other's."""
    room_id = _synapse_room_with(z, s, synapse)
    assert room_id
    # Synapse drops a remote user's presence while its own cache of who
    # shares a room with whom has not caught up with the join (seen under
    # load, right after the join): the zhome user sets it again, a bounded
    # number of times, each with its own status message.
    for attempt in range(3):
        msg = f"on the ward ({attempt})"
        z.ok("PUT", f"/_matrix/client/v3/presence/{_q(z.user_id)}/status",
             {"presence": "unavailable", "status_msg": msg})
        try:
            s.sync_until(_presence_of(z.user_id, "unavailable", msg), "the zhome user's presence", wait=10.0)
            break
        except AssertionError:
            if attempt == 2:
                raise
    status = s.ok("GET", f"/_matrix/client/v3/presence/{_q(z.user_id)}/status")
    assert status["presence"] == "unavailable" and status["status_msg"] == msg, status

    s.ok("PUT", f"/_matrix/client/v3/presence/{_q(s.user_id)}/status",
         {"presence": "online", "status_msg": "in clinic"})
    z.sync_until(_presence_of(s.user_id, "online", "in clinic"), "the Synapse user's presence")
    status = z.ok("GET", f"/_matrix/client/v3/presence/{_q(s.user_id)}/status")
    assert status["presence"] == "online" and status["status_msg"] == "in clinic", status


def test_profile_and_directory_queries_across(z: Client, s: Client, synapse: SynapsePeer,
                                              zhome_fed: ZhomeProcess) -> None:
    z.ok("PUT", f"/_matrix/client/v3/profile/{_q(z.user_id)}/displayname", {"displayname": "Zoë on zhome"})
    s.ok("PUT", f"/_matrix/client/v3/profile/{_q(s.user_id)}/displayname", {"displayname": "Sam on synapse"})
    got = s.ok("GET", f"/_matrix/client/v3/profile/{_q(z.user_id)}")
    assert got.get("displayname") == "Zoë on zhome", got
    got = s.ok("GET", f"/_matrix/client/v3/profile/{_q(z.user_id)}/displayname")
    assert got == {"displayname": "Zoë on zhome"}, got
    got = z.ok("GET", f"/_matrix/client/v3/profile/{_q(s.user_id)}")
    assert got.get("displayname") == "Sam on synapse", got
    got = z.ok("GET", f"/_matrix/client/v3/profile/{_q(s.user_id)}/displayname")
    assert got == {"displayname": "Sam on synapse"}, got
    # Unknown users on the other server are a 404.
    for c, server in ((s, zhome_fed.server_name), (z, synapse.server_name)):
        status, body = c.request("GET", f"/_matrix/client/v3/profile/{_q(f'@nobody{uuid.uuid4().hex[:6]}:{server}')}")
        assert status == 404 and body.get("errcode") == "M_NOT_FOUND", (c.user_id, status, body)

    zlocal, slocal = "zdir" + uuid.uuid4().hex[:8], "sdir" + uuid.uuid4().hex[:8]
    zroom = z.create_room(preset="public_chat", room_alias_name=zlocal)
    sroom = s.create_room(preset="public_chat", room_alias_name=slocal)
    got = s.ok("GET", f"/_matrix/client/v3/directory/room/{_q(f'#{zlocal}:{zhome_fed.server_name}')}")
    assert got["room_id"] == zroom and zhome_fed.server_name in got["servers"], got
    got = z.ok("GET", f"/_matrix/client/v3/directory/room/{_q(f'#{slocal}:{synapse.server_name}')}")
    assert got["room_id"] == sroom and synapse.server_name in got["servers"], got
    # Unknown aliases are a 404 from each side.
    for c, server in ((s, zhome_fed.server_name), (z, synapse.server_name)):
        status, body = c.request("GET", f"/_matrix/client/v3/directory/room/{_q(f'#nope{uuid.uuid4().hex[:6]}:{server}')}")
        assert status == 404 and body.get("errcode") == "M_NOT_FOUND", (c.user_id, status, body)


def test_synapse_sends_while_zhome_is_down(z: Client, s: Client, synapse: SynapsePeer,
                                           zhome_fed: ZhomeProcess) -> None:
    room_id = _synapse_room_with(z, s, synapse)
    s.send(room_id, "before zhome went down")
    z.sync_until(_has_body(room_id, "before zhome went down"), "the message before the outage")
    zhome_fed.stop()
    bodies = [f"while zhome was down {i}" for i in range(5)]
    try:
        for b in bodies:
            s.send(room_id, b)
    finally:
        zhome_fed.start()
    # Synapse's transaction with the first message meets a refused
    # connection; its federation client retries that request itself (the
    # peer config caps the retry delays at 1 s / 5 s, and backs a dead
    # destination off for 2 s to 10 s), and the messages queued behind it
    # follow once it is through. zhome sends Synapse nothing to hurry it:
    # no zhome-side message is used here, Synapse comes back on its own.
    seen: set[str] = set()

    def arrived(r: dict[str, Any]) -> bool:
        seen.update(e["content"].get("body") for e in _timeline(r, room_id) if e["type"] == "m.room.message")
        return set(bodies) <= seen

    z.sync_until(arrived, "all 5 messages Synapse sent while zhome was down", wait=45)
    got = z.timeline_bodies(room_id)
    assert got[:5] == bodies[::-1], got


def test_knock_then_invite_then_join(z: Client, s: Client, synapse: SynapsePeer) -> None:
    room_id = s.create_room(room_version="7", preset="private_chat", name="knock here", initial_state=[
        {"type": "m.room.join_rules", "state_key": "", "content": {"join_rule": "knock"}}])
    z.ok("POST", f"/_matrix/client/v3/knock/{_q(room_id)}", {"reason": "let me in"},
         query={"server_name": [synapse.server_name]})
    s.wait_for(lambda: _membership(s, room_id, z.user_id) == "knock", "the knock")
    knock = s.ok("GET", f"/_matrix/client/v3/rooms/{_q(room_id)}/state/m.room.member/{_q(z.user_id)}")
    assert knock.get("reason") == "let me in", knock
    knocked = z.sync_until(lambda r: r.get("rooms", {}).get("knock", {}).get(room_id), "its own knock")
    by_type = {e["type"]: e for e in knocked["knock_state"]["events"]}
    assert by_type["m.room.join_rules"]["content"] == {"join_rule": "knock"}, by_type
    assert by_type["m.room.name"]["content"] == {"name": "knock here"}, by_type
    s.ok("POST", f"/_matrix/client/v3/rooms/{_q(room_id)}/invite", {"user_id": z.user_id})
    z.sync_until(_invited(room_id), "the invite after knocking")
    z.ok("POST", f"/_matrix/client/v3/rooms/{_q(room_id)}/join", {})
    s.wait_for(lambda: z.user_id in s.joined_members(room_id), "the zhome user joined after knocking")
    assert z.joined_members(room_id) == {z.user_id, s.user_id}
    s.send(room_id, "welcome, knocker")
    z.sync_until(_has_body(room_id, "welcome, knocker"), "a message after joining")


def test_power_levels_and_server_acl_across(z: Client, s: Client, synapse: SynapsePeer,
                                            zhome_fed: ZhomeProcess) -> None:
    room_id = _synapse_room_with(z, s, synapse)
    state = f"/_matrix/client/v3/rooms/{_q(room_id)}/state/"
    # Without power the zhome user may not change the topic (zhome checks
    # the auth rules locally before sending).
    status, body = z.request("PUT", state + "m.room.topic/", {"topic": "too early"})
    assert status == 403, (status, body)
    pl = s.ok("GET", state + "m.room.power_levels/")
    pl.setdefault("users", {})[z.user_id] = 50
    s.ok("PUT", state + "m.room.power_levels/", pl)
    z.wait_for(lambda: z.request("GET", state + "m.room.power_levels/")[1].get("users", {}).get(z.user_id) == 50,
               "the raised power level")
    z.ok("PUT", state + "m.room.topic/", {"topic": "set from zhome"})
    s.wait_for(lambda: s.request("GET", state + "m.room.topic/")[1] == {"topic": "set from zhome"},
               "the topic set by the zhome user")

    # Deny zhome's host (IP literals allowed, else Synapse's own name would
    # fall under the ACL too).
    host = zhome_fed.server_name.rsplit(":", 1)[0]
    acl = {"allow": ["*"], "deny": [host], "allow_ip_literals": True}
    s.ok("PUT", state + "m.room.server_acl/", acl)
    z.wait_for(lambda: z.request("GET", state + "m.room.server_acl/")[1] == acl, "the server ACL")
    # zhome may accept these locally (its own server is not its ACL's
    # business) or refuse them; what matters is that Synapse refuses them.
    attempts = [
        z.request("PUT", f"/_matrix/client/v3/rooms/{_q(room_id)}/send/m.room.message/{uuid.uuid4().hex}",
                  {"msgtype": "m.text", "body": "after the ACL"}),
        z.request("PUT", state + "m.room.topic/", {"topic": "after the ACL"}),
    ]
    for status, sent in attempts:
        assert status in (200, 403), (status, sent)
        if status != 200:
            continue
        ev = sent["event_id"]
        # Wait until Synapse has answered the transaction that carried it
        # (zhome logs each PDU the destination refused).
        line = f"rejected PDU {ev}"
        z.wait_for(lambda: line in zhome_fed.log_path.read_text(errors="replace"),  # noqa: B023 (waited on here)
                   f"Synapse's refusal of {ev}")
        status, got = s.event(room_id, ev)
        assert status == 404, (ev, status, got)
    # A Synapse message after the zhome attempts: by then Synapse had them.
    s.send(room_id, "synapse after the ACL")
    bodies = s.timeline_bodies(room_id)
    assert "synapse after the ACL" in bodies and "after the ACL" not in bodies, bodies
    status, topic = s.request("GET", state + "m.room.topic/")
    assert status == 200 and topic == {"topic": "set from zhome"}, (status, topic)


def _upload(client: Client, data: bytes, content_type: str) -> str:
    req = urllib.request.Request(client.base_url + "/_matrix/media/v3/upload?filename=f.bin", data=data,
                                 method="POST")
    req.add_header("Authorization", f"Bearer {client.token}")
    req.add_header("Content-Type", content_type)
    with urllib.request.urlopen(req, timeout=60) as r:
        uri = json.loads(r.read())["content_uri"]
    assert uri.startswith("mxc://"), uri
    return str(uri)


def _download(client: Client, mxc: str, thumbnail: bool = False) -> tuple[int, bytes, str]:
    server, media_id = mxc[len("mxc://"):].split("/", 1)
    kind = "thumbnail" if thumbnail else "download"
    url = f"{client.base_url}/_matrix/client/v1/media/{kind}/{_q(server)}/{_q(media_id)}"
    if thumbnail:
        url += "?width=32&height=32&method=scale"
    req = urllib.request.Request(url)
    req.add_header("Authorization", f"Bearer {client.token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type", "")


def _png(width: int, height: int) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 60)).save(out, format="PNG")
    return out.getvalue()


def test_media_across(z: Client, s: Client) -> None:
    """Each side's users download media that lives on the other server, through
    their own server (federation media endpoints), and get the same bytes."""
    on_synapse = b"bytes stored on synapse " + uuid.uuid4().hex.encode()
    mxc = _upload(s, on_synapse, "application/octet-stream")
    status, body, _ = _download(z, mxc)
    assert status == 200 and body == on_synapse
    on_zhome = b"bytes stored on zhome " + uuid.uuid4().hex.encode()
    mxc = _upload(z, on_zhome, "application/octet-stream")
    status, body, _ = _download(s, mxc)
    assert status == 200 and body == on_zhome
    # A thumbnail of an image on the other server.
    mxc = _upload(s, _png(400, 300), "image/png")
    status, body, ctype = _download(z, mxc, thumbnail=True)
    assert status == 200 and ctype.startswith("image/") and len(body) > 0
    # Unknown remote media is a 404 for the client.
    server = mxc[len("mxc://"):].split("/", 1)[0]
    status, body, _ = _download(z, f"mxc://{server}/doesnotexist{uuid.uuid4().hex[:8]}")
    assert status == 404 and json.loads(body)["errcode"] == "M_NOT_FOUND"


def test_stop_and_catch_up(z: Client, s: Client, synapse: SynapsePeer) -> None:
    # Last: it restarts the module's Synapse.
    room_id = _zhome_room_with(z, s)
    z.send(room_id, "before the outage")
    s.sync_until(_has_body(room_id, "before the outage"), "the message before the outage")
    synapse.stop()
    try:
        bodies = [f"while down {i}" for i in range(10)]
        for b in bodies:
            z.send(room_id, b)
    finally:
        synapse.start()
    # Through /sync, not /messages: Synapse could fill a gap in /messages by
    # backfilling from zhome, but /sync shows only what zhome pushed.
    seen: set[str] = set()

    def arrived(r: dict[str, Any]) -> bool:
        seen.update(e["content"].get("body") for e in _timeline(r, room_id) if e["type"] == "m.room.message")
        return set(bodies) <= seen

    s.sync_until(arrived, "all 10 messages sent while it was down", wait=60)
    assert s.timeline_bodies(room_id)[:10] == bodies[::-1]
    # And the other way: Synapse's messages still reach zhome.
    s.send(room_id, "after the outage")
    z.sync_until(_has_body(room_id, "after the outage"), "Synapse's message after the outage")
