"""Responses of the main client-server endpoints match the specification's
OpenAPI response schemas (``matrix-spec/data/api/client-server``).

Each call asserts its status, then validates the body against the schema the
spec documents for that (path, method, status) with JSON Schema 2020-12.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

import jsonschema

from tests.e2e.harness import ZhomeProcess
from tests.e2e.openapi import Spec

CS = "/_matrix/client/v3"



def q(s: str) -> str:
    return urllib.parse.quote(s, safe="")


class Checker:
    def __init__(self, spec: Spec, zhome: ZhomeProcess) -> None:
        self.spec = spec
        self.zhome = zhome
        self.checked: set[tuple[str, str, int]] = set()

    def validate(self, template: str, method: str, status: int, body: Any) -> None:
        try:
            schema = self.spec.response_schema(template, method, status)
        except KeyError as e:
            # Some documented error responses carry no body schema: they
            # still use the standard error response.
            if status < 400 or "documents no JSON body" not in str(e):
                raise
            schema = self.spec.schema_file("definitions/errors/error.yaml")
        errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(body), key=lambda e: list(e.path))
        assert not errors, f"{method.upper()} {template} {status}: " + "; ".join(
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5])
        self.checked.add((template, method, status))

    def call(self, template: str, method: str, path: str, body: Any = None, token: str | None = None,
             status: int = 200, prefix: str = CS) -> Any:
        code, answer = self.zhome.request(method.upper(), prefix + path, body, token=token)
        assert code == status, (method, path, code, answer)
        self.validate(template, method, status, answer)
        return answer

    def error(self, code_body: tuple[int, Any], status: int, errcode: str) -> None:
        code, body = code_body
        assert code == status and isinstance(body, dict) and body.get("errcode") == errcode, code_body
        schema = self.spec.schema_file("definitions/errors/error.yaml")
        errors = list(jsonschema.Draft202012Validator(schema).iter_errors(body))
        assert not errors, [e.message for e in errors]


def test_loader_resolves_refs(spec: Spec) -> None:
    # The sync schema pulls timeline events from definitions/ and stripped
    # state from ../../event-schemas/: both must arrive inlined.
    schema = spec.response_schema("/sync", "get", 200)
    text = repr(schema)
    assert "$ref" not in text
    assert "prev_batch" in text and "invite_state" in text
    # A known-bad body is rejected, so validation is not vacuous.
    bad = {"next_batch": 5, "rooms": {"join": {"!a:b": {"timeline": {"events": "nope"}}}}}
    assert list(jsonschema.Draft202012Validator(schema).iter_errors(bad))
    err = spec.schema_file("definitions/errors/error.yaml")
    assert list(jsonschema.Draft202012Validator(err).iter_errors({"errcode": 401}))


def test_responses_match_spec(spec: Spec, zhome: ZhomeProcess) -> None:
    c = Checker(spec, zhome)

    # -- unauthenticated discovery -------------------------------------------
    versions = c.call("/versions", "get", "/versions", prefix="/_matrix/client")
    assert any(v.startswith("v1.") for v in versions["versions"])
    flows = c.call("/login", "get", "/login")
    assert {"type": "m.login.password"} in [{"type": f["type"]} for f in flows["flows"]]

    # -- registration and login ----------------------------------------------
    uia = c.call("/register", "post", "/register", {"username": "alice", "password": "correct horse"}, status=401)
    assert uia["flows"] and isinstance(uia.get("session", ""), str)
    reg = c.call("/register", "post", "/register",
                 {"username": "alice", "password": "correct horse", "auth": {"type": "m.login.dummy"}})
    alice = reg["access_token"]
    assert reg["user_id"] == "@alice:localhost"
    code, bad = zhome.request("POST", CS + "/register", {"username": "alice", "password": "x",
                                                         "auth": {"type": "m.login.dummy"}})
    c.error((code, bad), 400, "M_USER_IN_USE")
    c.validate("/register", "post", 400, bad)
    bob = zhome.register("bob")["access_token"]
    carol = zhome.register("carol")["access_token"]

    login = c.call("/login", "post", "/login", {"type": "m.login.password",
                                                "identifier": {"type": "m.id.user", "user": "alice"},
                                                "password": "correct horse", "initial_device_display_name": "phone"})
    assert login["user_id"] == "@alice:localhost" and login["device_id"]
    code, bad = zhome.request("POST", CS + "/login", {"type": "m.login.password", "user": "alice", "password": "no"})
    c.error((code, bad), 403, "M_FORBIDDEN")
    c.validate("/login", "post", 403, bad)

    who = c.call("/account/whoami", "get", "/account/whoami", token=alice)
    assert who["user_id"] == "@alice:localhost"
    code, bad = zhome.request("GET", CS + "/account/whoami")
    c.error((code, bad), 401, "M_MISSING_TOKEN")
    c.validate("/account/whoami", "get", 401, bad)
    caps = c.call("/capabilities", "get", "/capabilities", token=alice)
    assert "m.room_versions" in caps["capabilities"]

    # -- a room with history ----------------------------------------------------
    created = c.call("/createRoom", "post", "/createRoom",
                     {"preset": "public_chat", "visibility": "public", "name": "Ward 3", "topic": "Night shift",
                      "room_alias_name": "ward3"}, token=alice)
    room = created["room_id"]
    code, bad = zhome.request("POST", CS + "/createRoom", {"room_alias_name": "ward3"}, token=alice)
    c.error((code, bad), 400, "M_ROOM_IN_USE")
    c.validate("/createRoom", "post", 400, bad)

    sent_ids = []
    for i in range(5):
        sent = c.call("/rooms/{roomId}/send/{eventType}/{txnId}", "put",
                      f"/rooms/{q(room)}/send/m.room.message/txn{i}", {"msgtype": "m.text", "body": f"m{i}"},
                      token=alice)
        sent_ids.append(sent["event_id"])
    code, bad = zhome.request("PUT", f"{CS}/rooms/{q(room)}/send/m.room.message/f", {"n": 1.5}, token=alice)
    c.error((code, bad), 400, "M_BAD_JSON")
    c.validate("/rooms/{roomId}/send/{eventType}/{txnId}", "put", 400, bad)
    state_put = c.call("/rooms/{roomId}/state/{eventType}/{stateKey}", "put",
                       f"/rooms/{q(room)}/state/m.room.topic/", {"topic": "Day shift"}, token=alice)
    assert state_put["event_id"].startswith("$")

    state = c.call("/rooms/{roomId}/state", "get", f"/rooms/{q(room)}/state", token=alice)
    assert {"m.room.create", "m.room.name", "m.room.topic"} <= {e["type"] for e in state}
    name = c.call("/rooms/{roomId}/state/{eventType}/{stateKey}", "get",
                  f"/rooms/{q(room)}/state/m.room.name/", token=alice)
    assert name == {"name": "Ward 3"}
    code, bad = zhome.request("GET", f"{CS}/rooms/{q(room)}/state/m.room.avatar/", token=alice)
    c.error((code, bad), 404, "M_NOT_FOUND")
    c.validate("/rooms/{roomId}/state/{eventType}/{stateKey}", "get", 404, bad)
    code, bad = zhome.request("GET", f"{CS}/rooms/{q(room)}/state", token=carol)
    c.error((code, bad), 403, "M_FORBIDDEN")
    c.validate("/rooms/{roomId}/state", "get", 403, bad)

    # Bob joins, Carol is invited to a second room.
    code, _ = zhome.request("POST", f"{CS}/join/{q('#ward3:localhost')}", {}, token=bob)
    assert code == 200
    members = c.call("/rooms/{roomId}/members", "get", f"/rooms/{q(room)}/members", token=alice)
    assert {e["state_key"] for e in members["chunk"]} == {"@alice:localhost", "@bob:localhost"}
    joined = c.call("/rooms/{roomId}/joined_members", "get", f"/rooms/{q(room)}/joined_members", token=alice)
    assert set(joined["joined"]) == {"@alice:localhost", "@bob:localhost"}
    jr = c.call("/joined_rooms", "get", "/joined_rooms", token=bob)
    assert jr["joined_rooms"] == [room]

    msgs = c.call("/rooms/{roomId}/messages", "get", f"/rooms/{q(room)}/messages?dir=b&limit=4", token=alice)
    assert len(msgs["chunk"]) == 4 and msgs.get("end")
    msgs = c.call("/rooms/{roomId}/messages", "get", f"/rooms/{q(room)}/messages?dir=b&limit=50", token=alice)
    bodies = [e["content"]["body"] for e in msgs["chunk"] if e["type"] == "m.room.message"]
    assert bodies == ["m4", "m3", "m2", "m1", "m0"]
    ctx = c.call("/rooms/{roomId}/context/{eventId}", "get",
                 f"/rooms/{q(room)}/context/{q(sent_ids[2])}?limit=4", token=alice)
    assert ctx["event"]["event_id"] == sent_ids[2]
    assert [e["event_id"] for e in ctx["events_before"]][:1] == [sent_ids[1]]
    assert [e["event_id"] for e in ctx["events_after"]][:1] == [sent_ids[3]]
    ev = c.call("/rooms/{roomId}/event/{eventId}", "get", f"/rooms/{q(room)}/event/{q(sent_ids[0])}", token=bob)
    assert ev["content"]["body"] == "m0" and ev["room_id"] == room
    code, bad = zhome.request("GET", f"{CS}/rooms/{q(room)}/event/{q('$missing')}", token=alice)
    c.error((code, bad), 404, "M_NOT_FOUND")
    c.validate("/rooms/{roomId}/event/{eventId}", "get", 404, bad)

    # -- sync: initial, then incremental with new messages, an invite, a leave --
    first = c.call("/sync", "get", "/sync?timeout=0", token=bob)
    assert room in first["rooms"]["join"]
    tl = first["rooms"]["join"][room]["timeline"]
    assert tl["events"] and "prev_batch" in tl
    code, other = zhome.request("POST", CS + "/createRoom", {"name": "Private"}, token=alice)
    assert code == 200
    room2 = other["room_id"]
    code, _ = zhome.request("POST", f"{CS}/rooms/{q(room2)}/invite", {"user_id": "@bob:localhost"}, token=alice)
    assert code == 200
    code, _ = zhome.request("PUT", f"{CS}/rooms/{q(room)}/send/m.room.message/late", {"msgtype": "m.text",
                                                                                       "body": "late"}, token=alice)
    assert code == 200
    inc = c.call("/sync", "get", f"/sync?timeout=0&since={q(first['next_batch'])}", token=bob)
    assert room2 in inc["rooms"]["invite"]
    assert any(e["type"] == "m.room.name" for e in inc["rooms"]["invite"][room2]["invite_state"]["events"])
    assert [e["content"].get("body") for e in inc["rooms"]["join"][room]["timeline"]["events"]] == ["late"]
    # Bob was notified of the message sent while he was in the room, and of
    # his invite to the other (".m.rule.invite_for_me").
    notes = c.call("/notifications", "get", "/notifications", token=bob)
    assert [(n["event"]["type"], n["event"]["content"].get("body") or n["event"]["content"].get("membership"))
            for n in notes["notifications"]] == [("m.room.message", "late"), ("m.room.member", "invite")]
    assert notes["notifications"][0]["room_id"] == room and notes["notifications"][0]["read"] is False
    notes = c.call("/notifications", "get", "/notifications?limit=5&only=highlight", token=bob)
    assert notes == {"notifications": []}
    c.error(zhome.request("GET", CS + "/notifications?from=nope", token=bob), 400, "M_INVALID_PARAM")
    code, _ = zhome.request("POST", f"{CS}/rooms/{q(room)}/leave", {}, token=bob)
    assert code == 200
    left = c.call("/sync", "get", f"/sync?timeout=0&since={q(inc['next_batch'])}", token=bob)
    assert room in left["rooms"]["leave"]
    again = c.call("/sync", "get", "/sync?timeout=0", token=alice)
    assert room in again["rooms"]["join"] and room2 in again["rooms"]["join"]

    # -- profile, directory, devices, push rules --------------------------------
    code, _ = zhome.request("PUT", f"{CS}/profile/{q('@alice:localhost')}/displayname",
                            {"displayname": "Alice A."}, token=alice)
    assert code == 200
    prof = c.call("/profile/{userId}", "get", f"/profile/{q('@alice:localhost')}", token=bob)
    assert prof.get("displayname") == "Alice A."
    code, bad = zhome.request("GET", f"{CS}/profile/{q('@nobody:localhost')}", token=bob)
    c.error((code, bad), 404, "M_NOT_FOUND")
    c.validate("/profile/{userId}", "get", 404, bad)
    pub = c.call("/publicRooms", "get", "/publicRooms", token=bob)
    assert [r["room_id"] for r in pub["chunk"]] == [room]
    assert pub["chunk"][0]["name"] == "Ward 3" and pub["chunk"][0]["canonical_alias"] == "#ward3:localhost"
    pub = c.call("/publicRooms", "post", "/publicRooms", {"limit": 5, "filter": {"generic_search_term": "ward"}},
                 token=bob)
    assert [r["room_id"] for r in pub["chunk"]] == [room]
    devices = c.call("/devices", "get", "/devices", token=alice)
    assert login["device_id"] in {d["device_id"] for d in devices["devices"]}
    found = c.call("/user_directory/search", "post", "/user_directory/search", {"search_term": "alice"}, token=bob)
    assert "@alice:localhost" in {u["user_id"] for u in found["results"]}
    alias = c.call("/directory/room/{roomAlias}", "get", f"/directory/room/{q('#ward3:localhost')}", token=bob)
    assert alias["room_id"] == room and "localhost" in alias["servers"]
    code, bad = zhome.request("GET", f"{CS}/directory/room/{q('#nope:localhost')}", token=bob)
    c.error((code, bad), 404, "M_NOT_FOUND")
    c.validate("/directory/room/{roomAlias}", "get", 404, bad)
    rules = c.call("/pushrules/", "get", "/pushrules/", token=alice)
    assert any(r["rule_id"] == ".m.rule.master" for r in rules["global"]["override"])

    # -- errors on unknown routes -----------------------------------------------
    c.error(zhome.request("GET", CS + "/no/such/thing"), 404, "M_UNRECOGNIZED")
    c.error(zhome.request("GET", CS + "/joined_rooms", token="bogus"), 401, "M_UNKNOWN_TOKEN")
    assert len(c.checked) >= 30, sorted(c.checked)
