"""Relations and threads against a real zhome, over raw HTTP, every answer
checked against the spec's response schema.

Spec: client-server-api "Relationships API"
(``/_matrix/client/v1/rooms/{roomId}/relations/{eventId}[/{relType}[/{eventType}]]``),
"Threading" (``/_matrix/client/v1/rooms/{roomId}/threads``, the ``m.thread``
aggregation), "Event replacements" (the ``m.replace`` aggregation),
"Reference relations", "Aggregations of child events" (bundled in
/event, /messages, /context, /sync, /relations and /threads; users the
requester ignores are left out), "History visibility", "Redactions".
"""

from __future__ import annotations

import itertools
import urllib.parse
from typing import Any, Optional

import jsonschema

from tests.e2e.harness import ZhomeProcess, q
from tests.e2e.openapi import Spec

CS = "/_matrix/client/v3"
V1 = "/_matrix/client/v1"
REL = "/rooms/{roomId}/relations/{eventId}"
_txn = itertools.count()



class User:
    def __init__(self, hs: ZhomeProcess, spec: Spec, name: str) -> None:
        self.hs = hs
        self.spec = spec
        reg = hs.register(name)
        self.user_id: str = reg["user_id"]
        self.token: str = reg["access_token"]

    def req(self, method: str, path: str, body: Any = None, prefix: str = CS) -> tuple[int, Any]:
        return self.hs.request(method, prefix + path, body, token=self.token)

    def ok(self, method: str, path: str, body: Any = None, prefix: str = CS) -> Any:
        status, out = self.req(method, path, body, prefix)
        assert status == 200, (method, path, status, out)
        return out

    def send(self, room_id: str, content: dict[str, Any], etype: str = "m.room.message") -> str:
        out = self.ok("PUT", f"/rooms/{q(room_id)}/send/{q(etype)}/t{next(_txn)}", content)
        return str(out["event_id"])

    def redact(self, room_id: str, event_id: str) -> None:
        self.ok("PUT", f"/rooms/{q(room_id)}/redact/{q(event_id)}/r{next(_txn)}", {})

    def event(self, room_id: str, event_id: str) -> dict[str, Any]:
        out = self.ok("GET", f"/rooms/{q(room_id)}/event/{q(event_id)}")
        self.check("/rooms/{roomId}/event/{eventId}", 200, out, prefix=CS)
        return dict(out)

    def check(self, template: str, status: int, body: Any, prefix: str = V1) -> None:
        try:
            schema = self.spec.response_schema(template, "get", status)
        except KeyError:
            schema = self.spec.schema_file("definitions/errors/error.yaml")
        errors = list(jsonschema.Draft202012Validator(schema).iter_errors(body))
        assert not errors, f"GET {template} {status}: " + "; ".join(e.message for e in errors[:5])

    def relations(self, room_id: str, event_id: str, rel_type: Optional[str] = None,
                  event_type: Optional[str] = None, status: int = 200, **params: Any) -> Any:
        path, template = f"/rooms/{q(room_id)}/relations/{q(event_id)}", REL
        if rel_type is not None:
            path, template = path + "/" + q(rel_type), template + "/{relType}"
        if event_type is not None:
            path, template = path + "/" + q(event_type), template + "/{eventType}"
        if params:
            path += "?" + urllib.parse.urlencode(params)
        code, out = self.req("GET", path, prefix=V1)
        assert code == status, (path, code, out)
        self.check(template, status, out)
        return out

    def threads(self, room_id: str, status: int = 200, **params: Any) -> Any:
        path = f"/rooms/{q(room_id)}/threads" + ("?" + urllib.parse.urlencode(params) if params else "")
        code, out = self.req("GET", path, prefix=V1)
        assert code == status, (path, code, out)
        self.check("/rooms/{roomId}/threads", status, out)
        return out

    def join(self, room_id: str) -> None:
        self.ok("POST", f"/join/{q(room_id)}", {})


def _rel(rel_type: str, parent: str, **extra: Any) -> dict[str, Any]:
    return {"m.relates_to": {"rel_type": rel_type, "event_id": parent, **extra}}


def _msg(body: str, **extra: Any) -> dict[str, Any]:
    return {"msgtype": "m.text", "body": body, **extra}


def _ids(chunk: list[dict[str, Any]]) -> list[str]:
    return [e["event_id"] for e in chunk]


def _public_room(owner: User, *members: User) -> str:
    room_id = str(owner.ok("POST", "/createRoom", {"preset": "public_chat"})["room_id"])
    for m in members:
        m.join(room_id)
    return room_id


def test_threads_and_their_aggregation(zhome: ZhomeProcess, spec: Spec) -> None:
    alice, bob, carol, dave = (User(zhome, spec, n) for n in ("alice", "bob", "carol", "dave"))
    room = _public_room(alice, bob, carol, dave)
    root = alice.send(room, _msg("what do we do about the lift?"))
    b1 = bob.send(room, _msg("call the engineer", **_rel("m.thread", root)))
    c1 = carol.send(room, _msg("already did", **_rel("m.thread", root)))
    b2 = bob.send(room, _msg("great", **_rel("m.thread", root)))

    # The root as each user is served it: count, latest event, participation.
    for user, participated in ((alice, True), (bob, True), (carol, True), (dave, False)):
        thread = user.event(room, root)["unsigned"]["m.relations"]["m.thread"]
        assert thread["count"] == 3, thread
        assert thread["latest_event"]["event_id"] == b2
        assert thread["latest_event"]["content"]["body"] == "great"
        assert thread["latest_event"]["room_id"] == room
        assert thread["current_user_participated"] is participated, user.user_id
    # The same bundle in /messages, /context and an initial /sync.
    msgs = dave.ok("GET", f"/rooms/{q(room)}/messages?dir=b&limit=20")
    dave.check("/rooms/{roomId}/messages", 200, msgs, prefix=CS)
    by_id = {e["event_id"]: e for e in msgs["chunk"]}
    assert by_id[root]["unsigned"]["m.relations"]["m.thread"]["count"] == 3
    assert "m.relations" not in by_id[b1]["unsigned"]
    ctx = carol.ok("GET", f"/rooms/{q(room)}/context/{q(root)}?limit=4")
    assert ctx["event"]["unsigned"]["m.relations"]["m.thread"]["current_user_participated"] is True
    sync = bob.ok("GET", "/sync?timeout=0")
    timeline = {e["event_id"]: e for e in sync["rooms"]["join"][room]["timeline"]["events"]}
    assert timeline[root]["unsigned"]["m.relations"]["m.thread"]["latest_event"]["event_id"] == b2
    assert "room_id" not in timeline[root]["unsigned"]["m.relations"]["m.thread"]["latest_event"]

    # The thread's events through the relations API.
    out = dave.relations(room, root, "m.thread")
    assert _ids(out["chunk"]) == [b2, c1, b1] and "next_batch" not in out and "recursion_depth" not in out

    # A second thread, then new activity in the first: latest activity first.
    root2 = carol.send(room, _msg("lunch?"))
    dave_reply = dave.send(room, _msg("yes", **_rel("m.thread", root2)))
    assert _ids(alice.threads(room)["chunk"]) == [root2, root]
    alice.send(room, _msg("thanks all", **_rel("m.thread", root)))
    listed = alice.threads(room)["chunk"]
    assert _ids(listed) == [root, root2]
    assert listed[0]["unsigned"]["m.relations"]["m.thread"]["count"] == 4
    # include=participated: started or replied to.
    assert _ids(dave.threads(room, include="participated")["chunk"]) == [root2]
    assert _ids(bob.threads(room, include="participated")["chunk"]) == [root]
    assert _ids(carol.threads(room, include="participated")["chunk"]) == [root, root2]
    assert dave.threads(room, include="all")["chunk"][1]["unsigned"]["m.relations"]["m.thread"][
        "latest_event"]["event_id"] == dave_reply
    # Paged one at a time.
    first = alice.threads(room, limit=1)
    assert _ids(first["chunk"]) == [root] and first["next_batch"]
    second = alice.threads(room, limit=1, **{"from": first["next_batch"]})
    assert _ids(second["chunk"]) == [root2] and "next_batch" not in second

    # A thread cannot start from a thread reply.
    code, err = bob.req("PUT", f"/rooms/{q(room)}/send/m.room.message/t{next(_txn)}",
                        _msg("nested", **_rel("m.thread", b1)))
    assert code == 400 and err["errcode"] == "M_UNKNOWN", (code, err)

    # Users one ignores leave one's aggregations (the root of an ignored user comes redacted).
    dave.ok("PUT", f"/user/{q(dave.user_id)}/account_data/m.ignored_user_list",
            {"ignored_users": {alice.user_id: {}}})
    thread = dave.event(room, root)["unsigned"]["m.relations"]["m.thread"]
    assert thread["count"] == 3 and thread["latest_event"]["event_id"] == b2
    listed = dave.threads(room)["chunk"]
    assert listed[0]["event_id"] == root and listed[0]["content"] == {}
    assert b2 in _ids(dave.relations(room, root)["chunk"])


def test_edits_reactions_paging_and_recursion(zhome: ZhomeProcess, spec: Spec) -> None:
    alice, bob = User(zhome, spec, "alice"), User(zhome, spec, "bob")
    room = _public_room(alice, bob)
    msg = alice.send(room, _msg("the meeting is at 3"))
    e1 = alice.send(room, _msg("* the meeting is at 4", **{"m.new_content": _msg("the meeting is at 4")},
                               **_rel("m.replace", msg)))
    e2 = alice.send(room, _msg("* the meeting is at 5", **{"m.new_content": _msg("the meeting is at 5")},
                               **_rel("m.replace", msg)))
    # Not valid: another sender's edit, and an edit of an edit.
    bob.send(room, _msg("* no, 6", **{"m.new_content": _msg("no, 6")}, **_rel("m.replace", msg)))
    react = bob.send(room, _rel("m.annotation", msg, key="👍"), "m.reaction")
    ref = bob.send(room, _msg("minutes", **_rel("m.reference", msg)))

    served = alice.event(room, msg)
    assert served["content"]["body"] == "the meeting is at 3"  # the original, not the edit
    rels = served["unsigned"]["m.relations"]
    assert rels["m.replace"]["event_id"] == e2 and rels["m.replace"]["content"]["m.new_content"]["body"] == (
        "the meeting is at 5")
    assert rels["m.reference"] == {"chunk": [{"event_id": ref}]}
    assert "m.annotation" not in rels
    # An edit's own bundle: none.
    assert "m.relations" not in alice.event(room, e2)["unsigned"]

    everything = alice.relations(room, msg, limit=50)["chunk"]
    assert _ids(everything)[:2] == [ref, react] and _ids(everything)[-2:] == [e2, e1] and len(everything) == 5
    assert _ids(alice.relations(room, msg, "m.annotation")["chunk"]) == [react]
    assert _ids(alice.relations(room, msg, "m.annotation", "m.reaction")["chunk"]) == [react]
    assert alice.relations(room, msg, "m.annotation", "m.room.message")["chunk"] == []
    assert _ids(alice.relations(room, msg, "m.replace", "m.room.message", limit=2)["chunk"])[1] == e2
    # The same user cannot annotate twice with the same key.
    code, err = bob.req("PUT", f"/rooms/{q(room)}/send/m.reaction/t{next(_txn)}", _rel("m.annotation", msg, key="👍"))
    assert code == 400 and err["errcode"] == "M_DUPLICATE_ANNOTATION", (code, err)

    # Paging through 23 reactions 10 at a time, backwards then forwards.
    keys = [f"k{i}" for i in range(23)]
    sent = [alice.send(room, _rel("m.annotation", msg, key=k), "m.reaction") for k in keys]
    pages: list[list[str]] = []
    token: Optional[str] = None
    for _ in range(10):
        params: dict[str, Any] = {"limit": 10, **({"from": token} if token else {})}
        out = alice.relations(room, msg, "m.annotation", "m.reaction", **params)
        pages.append(_ids(out["chunk"]))
        assert (out.get("prev_batch") == token) if token else "prev_batch" not in out
        token = out.get("next_batch")
        if token is None:
            break
    assert [len(p) for p in pages] == [10, 10, 4]
    assert [e for p in pages for e in p] == list(reversed(sent)) + [react]
    fwd: list[str] = []
    token = None
    for _ in range(10):
        params = {"limit": 10, "dir": "f", **({"from": token} if token else {})}
        out = alice.relations(room, msg, "m.annotation", **params)
        fwd += _ids(out["chunk"])
        token = out.get("next_batch")
        if token is None:
            break
    assert fwd == [react] + sent
    # from and to bound a range: from the first page's next_batch back to the start.
    first = alice.relations(room, msg, "m.annotation", limit=5)
    second = alice.relations(room, msg, "m.annotation", limit=5, **{"from": first["next_batch"]})
    bounded = alice.relations(room, msg, "m.annotation", limit=50, **{"to": second["next_batch"]})
    assert _ids(bounded["chunk"]) == _ids(first["chunk"]) + _ids(second["chunk"])
    # A /messages token works as a start.
    start = alice.ok("GET", f"/rooms/{q(room)}/messages?dir=b&limit=1")["start"]
    assert _ids(alice.relations(room, msg, "m.annotation", limit=1, **{"from": start})["chunk"]) == [sent[-1]]

    # recurse: relations of relations (a reaction on a thread reply), filters applying all the way.
    reply = bob.send(room, _msg("ok", **_rel("m.thread", msg)))
    on_reply = alice.send(room, _rel("m.annotation", reply, key="✅"), "m.reaction")
    direct = alice.relations(room, msg, "m.thread")
    assert _ids(direct["chunk"]) == [reply] and "recursion_depth" not in direct
    deep = alice.relations(room, msg, recurse="true", limit=3)
    assert _ids(deep["chunk"]) == [on_reply, reply, sent[-1]] and deep["recursion_depth"] == 3
    assert alice.relations(room, msg, recurse="false", limit=3)["recursion_depth"] == 1
    assert on_reply not in _ids(alice.relations(room, msg, recurse="false", limit=50)["chunk"])
    # The reaction relates to the reply, not through an m.annotation of msg: filtered out.
    assert on_reply not in _ids(alice.relations(room, msg, "m.annotation", recurse="true", limit=50)["chunk"])
    assert _ids(alice.relations(room, msg, "m.thread", recurse="true")["chunk"]) == [reply]

    # Redacting a relation removes it from the API and from the aggregation.
    alice.redact(room, e2)
    assert alice.event(room, msg)["unsigned"]["m.relations"]["m.replace"]["event_id"] == e1
    bob.redact(room, react)
    assert react not in _ids(alice.relations(room, msg, "m.annotation", limit=50)["chunk"])
    bob.redact(room, reply)
    assert alice.relations(room, msg, "m.thread")["chunk"] == []
    assert "m.thread" not in alice.event(room, msg)["unsigned"]["m.relations"]
    assert alice.threads(room)["chunk"] == []
    # After a redaction the same annotation may be sent again.
    bob.send(room, _rel("m.annotation", msg, key="👍"), "m.reaction")
    # Redacting the original: no edit bundled any more.
    alice.redact(room, msg)
    assert "m.replace" not in alice.event(room, msg)["unsigned"].get("m.relations", {})


def test_history_visibility(zhome: ZhomeProcess, spec: Spec) -> None:
    alice, bob, eve = User(zhome, spec, "alice"), User(zhome, spec, "bob"), User(zhome, spec, "eve")
    room = _public_room(alice, bob)
    # Sent while history is shared: visible to whoever joins later.
    parent = alice.send(room, _msg("shared history"))
    quiet = alice.send(room, _msg("another"))
    alice.ok("PUT", f"/rooms/{q(room)}/state/m.room.history_visibility/", {"history_visibility": "joined"})
    before = bob.send(room, _msg("before eve", **_rel("m.thread", parent)))
    hidden_only = bob.send(room, _msg("only before eve", **_rel("m.thread", quiet)))
    react = bob.send(room, _rel("m.annotation", parent, key="👀"), "m.reaction")
    eve.join(room)
    after = bob.send(room, _msg("after eve", **_rel("m.thread", parent)))

    assert _ids(eve.relations(room, parent, limit=10)["chunk"]) == [after]
    assert _ids(bob.relations(room, parent, limit=10)["chunk"]) == [after, react, before]
    thread = eve.event(room, parent)["unsigned"]["m.relations"]["m.thread"]
    assert thread["latest_event"]["event_id"] == after
    # The only reply is hidden from her: no thread bundled with that root.
    assert "m.relations" not in eve.event(room, quiet)["unsigned"]
    assert bob.event(room, quiet)["unsigned"]["m.relations"]["m.thread"]["latest_event"]["event_id"] == hidden_only
    # A parent she may not see is not found.
    late_parent = bob.send(room, _msg("x"))
    eve.ok("POST", f"/rooms/{q(room)}/leave", {})
    after_leave = bob.send(room, _msg("y"))
    bob.send(room, _msg("z", **_rel("m.thread", after_leave)))
    assert _ids(eve.relations(room, late_parent)["chunk"]) == []
    out = eve.relations(room, after_leave, status=404)
    assert out["errcode"] == "M_NOT_FOUND"
    # Her thread list stops where she left.
    assert after_leave not in _ids(eve.threads(room)["chunk"])


def test_bad_requests(zhome: ZhomeProcess, spec: Spec) -> None:
    alice, bob = User(zhome, spec, "alice"), User(zhome, spec, "bob")
    room = str(alice.ok("POST", "/createRoom", {"preset": "private_chat"})["room_id"])
    msg = alice.send(room, _msg("hi"))

    def err(user: User, path: str, status: int, errcode: str) -> None:
        code, body = user.req("GET", path, prefix=V1)
        assert code == status and body.get("errcode") == errcode, (path, code, body)
        schema = spec.schema_file("definitions/errors/error.yaml")
        assert not list(jsonschema.Draft202012Validator(schema).iter_errors(body))

    base = f"/rooms/{q(room)}/relations/{q(msg)}"
    for query in ("dir=x", "limit=abc", "limit=-1", "recurse=maybe", "from=nonsense", "to=t1-2"):
        err(alice, f"{base}?{query}", 400, "M_INVALID_PARAM")
    err(alice, f"/rooms/{q('!nowhere:localhost')}/relations/{q(msg)}", 403, "M_FORBIDDEN")
    err(alice, f"/rooms/{q(room)}/relations/{q('$missing')}", 404, "M_NOT_FOUND")
    # Someone outside a private room: as if the event did not exist.
    err(bob, base, 404, "M_NOT_FOUND")
    tbase = f"/rooms/{q(room)}/threads"
    for query in ("include=mine", "limit=0", "limit=x", "from=nonsense"):
        err(alice, f"{tbase}?{query}", 400, "M_INVALID_PARAM")
    err(bob, tbase, 403, "M_FORBIDDEN")
    err(alice, f"/rooms/{q('!nowhere:localhost')}/threads", 403, "M_FORBIDDEN")
    code, _ = alice.hs.request("GET", V1 + base)
    assert code == 401
    # Valid: an empty answer.
    assert alice.relations(room, msg) == {"chunk": []}
    assert alice.threads(room) == {"chunk": []}
