"""Bad input is answered with the right Matrix error.

Spec: client-server-api "Standard error response", "Common error codes",
"Rate limiting" and "Web browser clients" (CORS). Every check asserts on the
HTTP status and the ``errcode`` the server answered, and where a request must
not have changed anything, on what the server still stores.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from typing import Any, Optional

from tests.e2e.harness import ZhomeProcess

CS = "/_matrix/client/v3"
SECRET_BODY = "zz-confidential-message-body-7f3a"


def _err(resp: tuple[int, Any], status: int, errcode: str) -> dict[str, Any]:
    code, body = resp
    assert code == status, resp
    assert isinstance(body, dict), resp
    assert body.get("errcode") == errcode, resp
    assert isinstance(body.get("error"), str), resp
    return body


def _path(room_id: str, tail: str) -> str:
    return f"{CS}/rooms/{urllib.parse.quote(room_id)}/{tail}"


def _message_bodies(zhome: ZhomeProcess, token: str, room_id: str) -> list[Any]:
    status, body = zhome.request("GET", _path(room_id, "messages?dir=b&limit=100"), token=token)
    assert status == 200, body
    return [e["content"].get("body") for e in body["chunk"] if e["type"] == "m.room.message"]


def _assert_log_clean(zhome: ZhomeProcess, secrets: list[str]) -> None:
    log = zhome.log_path.read_text(errors="replace")
    for s in secrets:
        assert s not in log, f"{s[:12]}... appears in the server log"
    assert "Traceback" not in log, log[-3000:]


def _raw(zhome: ZhomeProcess, method: str, path: str, headers: Optional[dict[str, str]] = None,
         body: Optional[bytes] = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", zhome.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def test_bad_bodies(zhome: ZhomeProcess) -> None:
    alice = zhome.register("alice")
    tok = alice["access_token"]
    status, created = zhome.request("POST", CS + "/createRoom", {}, token=tok)
    assert status == 200, created
    room = created["room_id"]
    send = _path(room, "send/m.room.message/")

    # Not JSON at all, and broken JSON.
    _err(zhome.request("PUT", send + "t1", raw=b"{not json", token=tok), 400, "M_NOT_JSON")
    _err(zhome.request("PUT", send + "t2", raw=b"\xff\xfe", token=tok), 400, "M_NOT_JSON")
    _err(zhome.request("POST", CS + "/createRoom", raw=b'{"name": "x"', token=tok), 400, "M_NOT_JSON")
    # NaN is not JSON.
    _err(zhome.request("PUT", send + "t3", raw=b'{"body": NaN}', token=tok), 400, "M_NOT_JSON")

    # Valid JSON that is not an object: malformed, so M_BAD_JSON.
    for raw in (b"[1, 2]", b'"text"', b"42", b"null"):
        _err(zhome.request("PUT", send + "t4", raw=raw, token=tok), 400, "M_BAD_JSON")
    _err(zhome.request("POST", CS + "/createRoom", raw=b"[]", token=tok), 400, "M_BAD_JSON")

    # Wrong field types.
    _err(zhome.request("POST", CS + "/createRoom", {"invite": "@bob:localhost"}, token=tok), 400, "M_BAD_JSON")
    _err(zhome.request("POST", CS + "/createRoom", {"name": 5}, token=tok), 400, "M_BAD_JSON")
    _err(zhome.request("POST", CS + "/createRoom", {"creation_content": []}, token=tok), 400, "M_BAD_JSON")
    _err(zhome.request("POST", CS + "/login", {"type": 5, "user": "alice", "password": "x"}), 400, "M_BAD_JSON")
    _err(zhome.request("POST", CS + "/login", {"type": "m.login.password", "user": "alice", "password": 5}),
         400, "M_BAD_JSON")
    prof = f"{CS}/profile/{urllib.parse.quote(alice['user_id'])}/displayname"
    _err(zhome.request("PUT", prof, {"displayname": 5}, token=tok), 400, "M_BAD_JSON")

    # Floats and out-of-range integers are not canonical JSON.
    _err(zhome.request("PUT", send + "t5", {"msgtype": "m.text", "body": "f", "n": 1.5}, token=tok),
         400, "M_BAD_JSON")
    _err(zhome.request("PUT", send + "t6", {"msgtype": "m.text", "body": "f", "n": {"deep": [0.25]}}, token=tok),
         400, "M_BAD_JSON")
    _err(zhome.request("PUT", send + "t7", {"msgtype": "m.text", "body": "f", "n": 2 ** 53}, token=tok),
         400, "M_BAD_JSON")
    _err(zhome.request("PUT", _path(room, "state/m.room.topic/"), {"topic": "t", "x": 0.5}, token=tok),
         400, "M_BAD_JSON")

    # Over the 65536-byte event limit: M_TOO_LARGE and nothing stored.
    big = "B" * 70000
    _err(zhome.request("PUT", send + "t8", {"msgtype": "m.text", "body": big}, token=tok), 413, "M_TOO_LARGE")
    big_state = {"topic": "T" * 70000}
    _err(zhome.request("PUT", _path(room, "state/m.room.topic/"), big_state, token=tok), 413, "M_TOO_LARGE")

    # None of the refused events were stored; a good one afterwards is.
    status, ok = zhome.request("PUT", send + "t9", {"msgtype": "m.text", "body": SECRET_BODY}, token=tok)
    assert status == 200 and ok["event_id"].startswith("$"), ok
    assert _message_bodies(zhome, tok, room) == [SECRET_BODY]
    status, topic = zhome.request("GET", _path(room, "state/m.room.topic/"), token=tok)
    assert status == 404 and topic["errcode"] == "M_NOT_FOUND", topic

    # Request bodies over the configured maximum (1 MiB by default).
    huge = json.dumps({"msgtype": "m.text", "body": "H" * (2 * 1024 * 1024)}).encode()
    _err(zhome.request("PUT", send + "t10", raw=huge, token=tok), 413, "M_TOO_LARGE")
    _err(zhome.request("PUT", _path(room, "send/" + "x" * 300 + "/t11"), {"body": "a"}, token=tok),
         400, "M_BAD_JSON")

    # Bad /messages parameters.
    msgs = _path(room, "messages")
    _err(zhome.request("GET", msgs + "?dir=x", token=tok), 400, "M_INVALID_PARAM")
    _err(zhome.request("GET", msgs + "?dir=b&limit=abc", token=tok), 400, "M_INVALID_PARAM")
    _err(zhome.request("GET", msgs + "?dir=b&limit=-1", token=tok), 400, "M_INVALID_PARAM")
    _err(zhome.request("GET", msgs + "?dir=b&from=garbage", token=tok), 400, "M_INVALID_PARAM")
    _err(zhome.request("GET", msgs + "?dir=b&filter=notjson", token=tok), 400, "M_BAD_JSON")
    _err(zhome.request("GET", msgs + "?dir=b&filter=%5B%5D", token=tok), 400, "M_BAD_JSON")
    _err(zhome.request("GET", msgs + "?dir=b&filter=%7Bbad", token=tok), 400, "M_BAD_JSON")
    for bad_filter in ('{"types": 5}', '{"not_types": "m.room.message"}', '{"senders": [1]}', '{"limit": "x"}',
                       '{"limit": -3}', '{"contains_url": "yes"}'):
        _err(zhome.request("GET", msgs + "?dir=b&filter=" + urllib.parse.quote(bad_filter), token=tok),
             400, "M_BAD_JSON")
    _err(zhome.request("GET", CS + "/sync?since=garbage", token=tok), 400, "M_INVALID_PARAM")

    _assert_log_clean(zhome, [tok, SECRET_BODY, big[:200]])


def test_auth_errors(zhome: ZhomeProcess) -> None:
    alice = zhome.register("alice")
    tok = alice["access_token"]
    _err(zhome.request("GET", CS + "/account/whoami"), 401, "M_MISSING_TOKEN")
    _err(zhome.request("POST", CS + "/createRoom", {}), 401, "M_MISSING_TOKEN")
    body = _err(zhome.request("GET", CS + "/account/whoami", token="zha_not_a_real_token"), 401, "M_UNKNOWN_TOKEN")
    assert body.get("soft_logout") is False, body
    body = _err(zhome.request("GET", CS + "/account/whoami?access_token=nope"), 401, "M_UNKNOWN_TOKEN")
    assert body.get("soft_logout") is False, body
    # After logout the token is unknown too.
    status, _ = zhome.request("POST", CS + "/logout", {}, token=tok)
    assert status == 200
    body = _err(zhome.request("GET", CS + "/account/whoami", token=tok), 401, "M_UNKNOWN_TOKEN")
    assert body.get("soft_logout") is False, body
    _assert_log_clean(zhome, [tok, "zha_not_a_real_token", "correct horse battery"])


def test_forbidden(zhome: ZhomeProcess) -> None:
    alice = zhome.register("alice")["access_token"]
    bob = zhome.register("bob")["access_token"]
    carol = zhome.register("carol")["access_token"]
    status, created = zhome.request("POST", CS + "/createRoom",
                                    {"preset": "public_chat", "name": "Original"}, token=alice)
    assert status == 200, created
    room = created["room_id"]
    status, _ = zhome.request("POST", _path(room, "join"), {}, token=bob)
    assert status == 200

    status, pl_before = zhome.request("GET", _path(room, "state/m.room.power_levels/"), token=alice)
    assert status == 200 and "@bob:localhost" not in pl_before.get("users", {}), pl_before

    # Bob (power 0) may not raise himself or rename the room.
    pl = json.loads(json.dumps(pl_before))
    pl["users"]["@bob:localhost"] = 100
    _err(zhome.request("PUT", _path(room, "state/m.room.power_levels/"), pl, token=bob), 403, "M_FORBIDDEN")
    _err(zhome.request("PUT", _path(room, "state/m.room.name/"), {"name": "Hijacked"}, token=bob),
         403, "M_FORBIDDEN")
    status, pl_after = zhome.request("GET", _path(room, "state/m.room.power_levels/"), token=alice)
    assert status == 200 and pl_after == pl_before, pl_after
    status, name = zhome.request("GET", _path(room, "state/m.room.name/"), token=bob)
    assert status == 200 and name == {"name": "Original"}, name

    # Carol is not in the room: she can neither send nor read.
    _err(zhome.request("PUT", _path(room, "send/m.room.message/c1"), {"msgtype": "m.text", "body": "hi"},
                       token=carol), 403, "M_FORBIDDEN")
    _err(zhome.request("PUT", _path(room, "state/m.room.topic/"), {"topic": "x"}, token=carol), 403, "M_FORBIDDEN")
    _err(zhome.request("GET", _path(room, "messages?dir=b"), token=carol), 403, "M_FORBIDDEN")
    # A room that does not exist at all.
    _err(zhome.request("PUT", _path("!nowhere:localhost", "send/m.room.message/c2"),
                       {"msgtype": "m.text", "body": "hi"}, token=carol), 403, "M_FORBIDDEN")
    # None of that reached the room.
    status, state = zhome.request("GET", _path(room, "state"), token=alice)
    assert status == 200
    assert not any(e["type"] == "m.room.topic" for e in state), state
    assert "@carol:localhost" not in {e["state_key"] for e in state if e["type"] == "m.room.member"}
    assert _message_bodies(zhome, alice, room) == []


def test_routing_and_registration_errors(zhome: ZhomeProcess) -> None:
    _err(zhome.request("GET", CS + "/no/such/endpoint"), 404, "M_UNRECOGNIZED")
    _err(zhome.request("GET", "/_matrix/client/v3/"), 404, "M_UNRECOGNIZED")
    _err(zhome.request("POST", "/_matrix/nonsense"), 404, "M_UNRECOGNIZED")
    _err(zhome.request("DELETE", CS + "/createRoom"), 405, "M_UNRECOGNIZED")
    _err(zhome.request("POST", CS + "/account/whoami", {}), 405, "M_UNRECOGNIZED")
    _err(zhome.request("PUT", "/_matrix/client/versions", {}), 405, "M_UNRECOGNIZED")

    alice = zhome.register("alice")
    tok = alice["access_token"]
    dummy = {"type": "m.login.dummy"}
    _err(zhome.request("POST", CS + "/register", {"username": "alice", "password": "another pass", "auth": dummy}),
         400, "M_USER_IN_USE")
    _err(zhome.request("GET", CS + "/register/available?username=alice"), 400, "M_USER_IN_USE")
    for bad in ("Bad Name", "ALICE!", "a:b", "", "_" * 300):
        _err(zhome.request("POST", CS + "/register", {"username": bad, "password": "pw pw pw", "auth": dummy}),
             400, "M_INVALID_USERNAME")

    status, created = zhome.request("POST", CS + "/createRoom", {"room_alias_name": "team"}, token=tok)
    assert status == 200 and created.get("room_alias") == "#team:localhost", created
    _err(zhome.request("POST", CS + "/createRoom", {"room_alias_name": "team"}, token=tok), 400, "M_ROOM_IN_USE")
    status, joined = zhome.request("GET", CS + "/joined_rooms", token=tok)
    assert status == 200 and joined["joined_rooms"] == [created["room_id"]], joined
    status, found = zhome.request("GET", CS + "/directory/room/%23team:localhost")
    assert status == 200 and found["room_id"] == created["room_id"], found

    _err(zhome.request("POST", CS + "/createRoom", {"room_version": "999"}, token=tok),
         400, "M_UNSUPPORTED_ROOM_VERSION")
    _err(zhome.request("POST", CS + "/createRoom", {"room_version": ""}, token=tok),
         400, "M_UNSUPPORTED_ROOM_VERSION")
    status, joined = zhome.request("GET", CS + "/joined_rooms", token=tok)
    assert status == 200 and joined["joined_rooms"] == [created["room_id"]], joined
    _assert_log_clean(zhome, [tok])


def test_rate_limit(zhome_factory: Any) -> None:
    hs = zhome_factory(rate_limits=True,
                       overrides={"rate_limits": {"message": {"per_second": 0.5, "burst_count": 5}}}).start()
    # Registration is itself rate-limited per IP; one user is enough.
    tok = hs.register("alice")["access_token"]
    status, created = hs.request("POST", CS + "/createRoom", {}, token=tok)
    assert status == 200, created
    room = created["room_id"]
    answers = []
    for i in range(20):
        answers.append(hs.request("PUT", _path(room, f"send/m.room.message/r{i}"),
                                  {"msgtype": "m.text", "body": f"n{i}"}, token=tok))
    ok = [a for a in answers if a[0] == 200]
    limited = [a for a in answers if a[0] == 429]
    assert len(ok) + len(limited) == len(answers), answers
    assert 1 <= len(ok) <= 7 and limited, answers
    for status, body in limited:
        assert body["errcode"] == "M_LIMIT_EXCEEDED", body
        assert type(body["retry_after_ms"]) is int and body["retry_after_ms"] > 0, body
    # Only the accepted sends were stored.
    assert len(_message_bodies(hs, tok, room)) == len(ok)


def test_cors(zhome: ZhomeProcess) -> None:
    status, headers, data = _raw(zhome, "GET", "/_matrix/client/versions", {"Origin": "https://app.example"})
    assert status == 200 and "versions" in json.loads(data)
    assert headers.get("access-control-allow-origin") == "*", headers
    assert headers.get("content-type", "").startswith("application/json"), headers

    # Errors carry the CORS headers too (the browser must read them).
    status, headers, data = _raw(zhome, "GET", CS + "/account/whoami", {"Origin": "https://app.example"})
    assert status == 401 and json.loads(data)["errcode"] == "M_MISSING_TOKEN"
    assert headers.get("access-control-allow-origin") == "*", headers

    status, headers, _ = _raw(zhome, "OPTIONS", CS + "/rooms/!x:localhost/send/m.room.message/1", {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "PUT",
        "Access-Control-Request-Headers": "Authorization, Content-Type",
    })
    assert status in (200, 204), status
    assert headers.get("access-control-allow-origin") == "*", headers
    methods = {m.strip() for m in headers.get("access-control-allow-methods", "").split(",")}
    assert {"GET", "POST", "PUT", "DELETE", "OPTIONS"} <= methods, headers
    allowed = {h.strip().lower() for h in headers.get("access-control-allow-headers", "").split(",")}
    assert {"authorization", "content-type", "x-requested-with"} <= allowed, headers
