"""Server-side key backups over HTTP on a real zhome: versions, keys at the
three levels, the replacement rule, etags and counts, the wrong-version
error, and bad input refused with nothing stored.

Spec: client-server-api "End-to-End Encryption" → "Server-side key backups"
(/room_keys/version, /room_keys/keys).
"""

from __future__ import annotations

import os
from typing import Any

from unpaddedbase64 import encode_base64

from tests.e2e.harness import ClientUser, ZhomeProcess, q

ALG = "m.megolm_backup.v1.curve25519-aes-sha2"
ROOM = "!ward3:localhost"
OTHER_ROOM = "!ward4:localhost"


def _auth_data(**extra: Any) -> dict[str, Any]:
    return {"public_key": encode_base64(os.urandom(32)), **extra}


def _key(first: int = 0, forwarded: int = 0, verified: bool = False, tag: str = "a") -> dict[str, Any]:
    return {"first_message_index": first, "forwarded_count": forwarded, "is_verified": verified,
            "session_data": {"ephemeral": f"eph-{tag}", "ciphertext": f"ct-{tag}", "mac": f"mac-{tag}"}}


def _create(u: ClientUser, **auth: Any) -> str:
    version = u.ok("POST", "/room_keys/version", {"algorithm": ALG, "auth_data": _auth_data(**auth)})["version"]
    assert isinstance(version, str)
    return version


def _session_path(version: str, room_id: str = ROOM, session_id: str = "sess1") -> str:
    return f"/room_keys/keys/{q(room_id)}/{q(session_id)}?version={q(version)}"


def test_backup_versions_lifecycle(zhome: ZhomeProcess) -> None:
    alice, bob = ClientUser(zhome, "alice"), ClientUser(zhome, "bob")
    # No backup yet: clients rely on exactly this answer.
    status, resp = alice.req("GET", "/room_keys/version")
    assert (status, resp["errcode"]) == (404, "M_NOT_FOUND"), resp

    auth = _auth_data(signatures={alice.user_id: {"ed25519:DEV": "sig"}})
    v1 = alice.ok("POST", "/room_keys/version", {"algorithm": ALG, "auth_data": auth})["version"]
    info = alice.ok("GET", "/room_keys/version")
    assert info == {"version": v1, "algorithm": ALG, "auth_data": auth, "count": 0, "etag": info["etag"]}
    assert isinstance(info["etag"], str)
    assert alice.ok("GET", f"/room_keys/version/{v1}") == info

    # Versions are per user: bob has none, and cannot see alice's.
    assert bob.req("GET", "/room_keys/version")[0] == 404
    assert bob.req("GET", f"/room_keys/version/{v1}")[1]["errcode"] == "M_NOT_FOUND"

    v2 = _create(alice)
    assert int(v2) > int(v1)
    assert alice.ok("GET", "/room_keys/version")["version"] == v2

    # Update: auth_data changes, version and algorithm must match.
    new_auth = _auth_data()
    assert alice.ok("PUT", f"/room_keys/version/{v2}", {"algorithm": ALG, "auth_data": new_auth,
                                                        "version": v2}) == {}
    assert alice.ok("GET", f"/room_keys/version/{v2}")["auth_data"] == new_auth
    assert alice.ok("PUT", f"/room_keys/version/{v1}", {"algorithm": ALG, "auth_data": new_auth}) == {}
    status, resp = alice.req("PUT", f"/room_keys/version/{v2}", {"algorithm": ALG, "auth_data": _auth_data(),
                                                                 "version": v1})
    assert (status, resp["errcode"]) == (400, "M_INVALID_PARAM"), resp
    status, resp = alice.req("PUT", f"/room_keys/version/{v2}", {"algorithm": "m.megolm_backup.v1",
                                                                 "auth_data": _auth_data()})
    assert (status, resp["errcode"]) == (400, "M_INVALID_PARAM"), resp
    assert alice.ok("GET", f"/room_keys/version/{v2}")["auth_data"] == new_auth
    status, resp = alice.req("PUT", "/room_keys/version/999", {"algorithm": ALG, "auth_data": _auth_data()})
    assert (status, resp["errcode"]) == (404, "M_NOT_FOUND"), resp
    status, resp = bob.req("PUT", f"/room_keys/version/{v2}", {"algorithm": ALG, "auth_data": _auth_data()})
    assert (status, resp["errcode"]) == (404, "M_NOT_FOUND"), resp

    # Delete the current one: the one before becomes current again.
    assert alice.ok("DELETE", f"/room_keys/version/{v2}") == {}
    assert alice.ok("GET", "/room_keys/version")["version"] == v1
    assert alice.req("GET", f"/room_keys/version/{v2}")[0] == 404
    # Deleting again succeeds (the spec: previously deleted is not an error);
    # a version that never existed is 404, and so is another user's.
    assert alice.ok("DELETE", f"/room_keys/version/{v2}") == {}
    for path, who in (("/room_keys/version/999", alice), ("/room_keys/version/bogus", alice),
                      (f"/room_keys/version/{v1}", bob)):
        status, resp = who.req("DELETE", path)
        assert (status, resp["errcode"]) == (404, "M_NOT_FOUND"), (path, resp)
    assert alice.ok("GET", "/room_keys/version")["version"] == v1

    # A version is never handed out twice, even after a delete and a restart.
    zhome.restart()
    v3 = _create(alice)
    assert int(v3) > int(v2)
    assert alice.ok("DELETE", f"/room_keys/version/{v3}") == {}
    assert alice.ok("DELETE", f"/room_keys/version/{v1}") == {}
    assert alice.req("GET", "/room_keys/version")[0] == 404
    assert int(_create(alice)) > int(v3)
    # Another user's versions are counted separately.
    assert _create(bob) == "1"


def test_bad_version_bodies_are_refused(zhome: ZhomeProcess) -> None:
    alice = ClientUser(zhome, "alice")
    cases: list[tuple[Any, str]] = [
        ({"algorithm": "m.megolm_backup.v1", "auth_data": _auth_data()}, "M_INVALID_PARAM"),
        ({"algorithm": "org.example.unknown", "auth_data": _auth_data()}, "M_INVALID_PARAM"),
        ({"auth_data": _auth_data()}, "M_BAD_JSON"),
        ({"algorithm": 5, "auth_data": _auth_data()}, "M_BAD_JSON"),
        ({"algorithm": ALG}, "M_BAD_JSON"),
        ({"algorithm": ALG, "auth_data": "anopaquestring"}, "M_BAD_JSON"),
        ({"algorithm": ALG, "auth_data": {}}, "M_BAD_JSON"),
        ({"algorithm": ALG, "auth_data": {"public_key": 7}}, "M_BAD_JSON"),
        ({"algorithm": ALG, "auth_data": {"public_key": "not base64!"}}, "M_BAD_JSON"),
        ({"algorithm": ALG, "auth_data": {"public_key": encode_base64(b"short")}}, "M_BAD_JSON"),
        ({"algorithm": ALG, "auth_data": _auth_data(signatures="x")}, "M_BAD_JSON"),
        ({"algorithm": ALG, "auth_data": _auth_data(signatures={alice.user_id: {"ed25519:D": 1}})}, "M_BAD_JSON"),
    ]
    for body, errcode in cases:
        status, resp = alice.req("POST", "/room_keys/version", body)
        assert (status, resp.get("errcode")) == (400, errcode), (body, resp)
    status, resp = zhome.request("POST", "/_matrix/client/v3/room_keys/version", raw=b"[1]", token=alice.token)
    assert (status, resp["errcode"]) == (400, "M_BAD_JSON")
    # Nothing was created by any of them.
    assert alice.req("GET", "/room_keys/version")[0] == 404
    assert _create(alice) == "1"
    # Without an access token nothing is answered.
    status, resp = zhome.request("GET", "/_matrix/client/v3/room_keys/version")
    assert (status, resp["errcode"]) == (401, "M_MISSING_TOKEN")


def test_keys_at_three_levels_with_etag_and_count(zhome: ZhomeProcess) -> None:
    alice = ClientUser(zhome, "alice")
    v = _create(alice)
    etag0 = alice.ok("GET", "/room_keys/version")["etag"]

    # Empty backup: a missing session is 404, wider levels are empty.
    status, resp = alice.req("GET", _session_path(v))
    assert (status, resp["errcode"]) == (404, "M_NOT_FOUND"), resp
    assert alice.ok("GET", f"/room_keys/keys/{q(ROOM)}?version={v}") == {"sessions": {}}
    assert alice.ok("GET", f"/room_keys/keys?version={v}") == {"rooms": {}}

    # One session.
    r1 = alice.ok("PUT", _session_path(v), _key(first=3, tag="s1"))
    assert r1["count"] == 1 and isinstance(r1["etag"], str) and r1["etag"] != etag0
    assert alice.ok("GET", _session_path(v)) == _key(first=3, tag="s1")

    # A room's sessions.
    r2 = alice.ok("PUT", f"/room_keys/keys/{q(ROOM)}?version={v}",
                  {"sessions": {"sess2": _key(tag="s2"), "sess3": _key(tag="s3")}})
    assert r2["count"] == 3 and r2["etag"] != r1["etag"]

    # Several rooms.
    r3 = alice.ok("PUT", f"/room_keys/keys?version={v}",
                  {"rooms": {OTHER_ROOM: {"sessions": {"sess4": _key(tag="s4")}},
                             ROOM: {"sessions": {"sess5": _key(tag="s5")}}}})
    assert r3["count"] == 5 and r3["etag"] != r2["etag"]
    info = alice.ok("GET", "/room_keys/version")
    assert (info["count"], info["etag"]) == (5, r3["etag"])

    everything = alice.ok("GET", f"/room_keys/keys?version={v}")
    assert everything == {"rooms": {
        ROOM: {"sessions": {"sess1": _key(first=3, tag="s1"), "sess2": _key(tag="s2"), "sess3": _key(tag="s3"),
                            "sess5": _key(tag="s5")}},
        OTHER_ROOM: {"sessions": {"sess4": _key(tag="s4")}}}}
    assert alice.ok("GET", f"/room_keys/keys/{q(OTHER_ROOM)}?version={v}") == {"sessions": {"sess4": _key(tag="s4")}}

    # The same upload again changes nothing: same etag.
    again = alice.ok("PUT", _session_path(v), _key(first=3, tag="s1"))
    assert again == r3

    # Deletes at each level answer etag and count.
    d1 = alice.ok("DELETE", _session_path(v, session_id="sess2"))
    assert d1["count"] == 4 and d1["etag"] != r3["etag"]
    assert alice.req("GET", _session_path(v, session_id="sess2"))[0] == 404
    d_missing = alice.ok("DELETE", _session_path(v, session_id="sess2"))
    assert d_missing == d1  # nothing was there: nothing changed
    d2 = alice.ok("DELETE", f"/room_keys/keys/{q(OTHER_ROOM)}?version={v}")
    assert d2["count"] == 3 and d2["etag"] != d1["etag"]
    assert alice.ok("GET", f"/room_keys/keys/{q(OTHER_ROOM)}?version={v}") == {"sessions": {}}
    d3 = alice.ok("DELETE", f"/room_keys/keys?version={v}")
    assert d3["count"] == 0 and d3["etag"] != d2["etag"]
    assert alice.ok("GET", f"/room_keys/keys?version={v}") == {"rooms": {}}
    assert alice.ok("GET", f"/room_keys/version/{v}")["count"] == 0

    # Stored keys survive a restart.
    alice.ok("PUT", _session_path(v), _key(first=1, tag="kept"))
    zhome.restart()
    assert alice.ok("GET", _session_path(v)) == _key(first=1, tag="kept")


def test_replacement_rule(zhome: ZhomeProcess) -> None:
    alice = ClientUser(zhome, "alice")
    v = _create(alice)

    def put(session: str, **kw: Any) -> None:
        alice.ok("PUT", _session_path(v, session_id=session), _key(**kw))

    def stored(session: str) -> dict[str, Any]:
        out: dict[str, Any] = alice.ok("GET", _session_path(v, session_id=session))
        return out

    # is_verified wins over everything else.
    put("a", first=0, forwarded=0, verified=False, tag="old")
    put("a", first=9, forwarded=9, verified=True, tag="new")
    assert stored("a")["session_data"]["mac"] == "mac-new"
    put("a", first=0, forwarded=0, verified=False, tag="worse")
    assert stored("a") == _key(first=9, forwarded=9, verified=True, tag="new")

    # Same is_verified: the lower first_message_index wins, whatever the forwarded_count.
    put("b", first=5, forwarded=0, tag="old")
    put("b", first=4, forwarded=3, tag="new")
    assert stored("b") == _key(first=4, forwarded=3, tag="new")
    put("b", first=6, forwarded=0, tag="worse")
    assert stored("b") == _key(first=4, forwarded=3, tag="new")

    # Same is_verified and index: the lower forwarded_count wins; a tie keeps the stored key.
    put("c", first=2, forwarded=2, tag="old")
    put("c", first=2, forwarded=3, tag="worse")
    assert stored("c")["session_data"]["mac"] == "mac-old"
    put("c", first=2, forwarded=2, tag="tie")
    assert stored("c")["session_data"]["mac"] == "mac-old"
    before = alice.ok("GET", f"/room_keys/version/{v}")["etag"]
    put("c", first=2, forwarded=1, tag="new")
    assert stored("c") == _key(first=2, forwarded=1, tag="new")
    assert alice.ok("GET", f"/room_keys/version/{v}")["etag"] != before

    # In one upload, each session is decided on its own.
    r = alice.ok("PUT", f"/room_keys/keys/{q(ROOM)}?version={v}",
                 {"sessions": {"a": _key(first=0, verified=False, tag="x"), "d": _key(tag="d")}})
    assert r["count"] == 4
    assert stored("a")["session_data"]["mac"] == "mac-new" and stored("d") == _key(tag="d")


def test_wrong_and_unknown_versions(zhome: ZhomeProcess) -> None:
    alice, bob = ClientUser(zhome, "alice"), ClientUser(zhome, "bob")
    # No backup at all: writing anywhere is 404.
    status, resp = alice.req("PUT", _session_path("1"), _key())
    assert (status, resp["errcode"]) == (404, "M_NOT_FOUND"), resp

    old = _create(alice)
    alice.ok("PUT", _session_path(old), _key(tag="old"))
    new = _create(alice)
    for version in (old, "999", "bogus"):
        for path, body in ((_session_path(version), _key()),
                           (f"/room_keys/keys/{q(ROOM)}?version={q(version)}", {"sessions": {"s": _key()}}),
                           (f"/room_keys/keys?version={q(version)}", {"rooms": {ROOM: {"sessions": {"s": _key()}}}})):
            status, resp = alice.req("PUT", path, body)
            assert (status, resp["errcode"], resp.get("current_version")) == (403, "M_WRONG_ROOM_KEYS_VERSION", new), \
                (path, resp)
    # The old version's keys are still readable and deletable, but not writable.
    assert alice.ok("GET", _session_path(old)) == _key(tag="old")
    assert alice.ok("GET", f"/room_keys/keys?version={new}") == {"rooms": {}}
    assert alice.ok("DELETE", _session_path(old))["count"] == 0

    # Reading or deleting keys of a version that does not exist is 404.
    for version in ("999", "bogus", "0", "-1"):
        for method in ("GET", "DELETE"):
            for path in (_session_path(version), f"/room_keys/keys/{q(ROOM)}?version={q(version)}",
                         f"/room_keys/keys?version={q(version)}"):
                status, resp = alice.req(method, path)
                assert (status, resp["errcode"]) == (404, "M_NOT_FOUND"), (method, path, resp)
    # Bob cannot read alice's backup, nor write into it.
    assert bob.req("GET", f"/room_keys/keys?version={new}")[1]["errcode"] == "M_NOT_FOUND"
    assert bob.req("PUT", _session_path(new), _key())[1]["errcode"] == "M_NOT_FOUND"
    # version is required.
    for method, body in (("GET", None), ("PUT", _key()), ("DELETE", None)):
        status, resp = alice.req(method, f"/room_keys/keys/{q(ROOM)}/s", body)
        assert (status, resp["errcode"]) == (400, "M_MISSING_PARAM"), (method, resp)

    # A deleted and recreated backup starts empty.
    alice.ok("PUT", _session_path(new), _key())
    alice.ok("DELETE", f"/room_keys/version/{new}")
    newest = _create(alice)
    assert alice.ok("GET", f"/room_keys/keys?version={newest}") == {"rooms": {}}
    assert alice.req("GET", f"/room_keys/keys?version={new}")[0] == 404


def test_malformed_keys_are_refused_and_store_nothing(zhome: ZhomeProcess) -> None:
    alice = ClientUser(zhome, "alice")
    v = _create(alice)
    good = _key()
    bad_keys: list[Any] = [
        "nope", [], {},
        {k: val for k, val in good.items() if k != "first_message_index"},
        {k: val for k, val in good.items() if k != "forwarded_count"},
        {k: val for k, val in good.items() if k != "is_verified"},
        {k: val for k, val in good.items() if k != "session_data"},
        {**good, "first_message_index": -1}, {**good, "forwarded_count": -2},
        {**good, "first_message_index": "3"}, {**good, "first_message_index": 1.5},
        {**good, "first_message_index": True}, {**good, "forwarded_count": 2 ** 64},
        {**good, "is_verified": "true"}, {**good, "is_verified": 1},
        {**good, "session_data": "anopaquestring"}, {**good, "session_data": None},
    ]
    for bad in bad_keys:
        for path, body in ((_session_path(v), bad),
                           (f"/room_keys/keys/{q(ROOM)}?version={v}", {"sessions": {"ok": good, "bad": bad}}),
                           (f"/room_keys/keys?version={v}",
                            {"rooms": {OTHER_ROOM: {"sessions": {"ok": good}}, ROOM: {"sessions": {"bad": bad}}}})):
            status, resp = alice.req("PUT", path, body)
            assert (status, resp.get("errcode")) == (400, "M_BAD_JSON"), (path, body, resp)
    bad_bodies: list[tuple[str, Any, str]] = [
        (f"/room_keys/keys/{q(ROOM)}?version={v}", {}, "M_BAD_JSON"),
        (f"/room_keys/keys/{q(ROOM)}?version={v}", {"sessions": []}, "M_BAD_JSON"),
        (f"/room_keys/keys/{q(ROOM)}?version={v}", {"sessions": {"": good}}, "M_BAD_JSON"),
        (f"/room_keys/keys/{q(ROOM)}?version={v}", {"sessions": {"s" * 300: good}}, "M_BAD_JSON"),
        (f"/room_keys/keys?version={v}", {}, "M_BAD_JSON"),
        (f"/room_keys/keys?version={v}", {"rooms": "x"}, "M_BAD_JSON"),
        (f"/room_keys/keys?version={v}", {"rooms": {"notaroom": {"sessions": {"s": good}}}}, "M_BAD_JSON"),
        (f"/room_keys/keys?version={v}", {"rooms": {"!": {"sessions": {"s": good}}}}, "M_BAD_JSON"),
        (f"/room_keys/keys?version={v}", {"rooms": {ROOM: {"sessions": {"s": good}}, "#alias:x": {"sessions": {}}}},
         "M_BAD_JSON"),
        (f"/room_keys/keys?version={v}", {"rooms": {ROOM: []}}, "M_BAD_JSON"),
        (_session_path(v, room_id="notaroom"), good, "M_INVALID_PARAM"),
        (_session_path(v, room_id="!bad room:x"), good, "M_INVALID_PARAM"),
        (f"/room_keys/keys/{q('#alias:localhost')}?version={v}", {"sessions": {"s": good}}, "M_INVALID_PARAM"),
        (_session_path(v, session_id="s" * 300), good, "M_INVALID_PARAM"),
    ]
    for path, body, errcode in bad_bodies:
        status, resp = alice.req("PUT", path, body)
        assert (status, resp.get("errcode")) == (400, errcode), (path, body, resp)
    status, resp = zhome.request("PUT", "/_matrix/client/v3" + _session_path(v), raw=b"{not json",
                                 token=alice.token)
    assert (status, resp["errcode"]) == (400, "M_NOT_JSON")
    for path in (_session_path(v, room_id="notaroom"), f"/room_keys/keys/{q('notaroom')}?version={v}"):
        for method in ("GET", "DELETE"):
            status, resp = alice.req(method, path)
            assert (status, resp["errcode"]) == (400, "M_INVALID_PARAM"), (method, path, resp)

    # Nothing of any refused upload was stored, not even its good sessions.
    assert alice.ok("GET", f"/room_keys/keys?version={v}") == {"rooms": {}}
    info = alice.ok("GET", f"/room_keys/version/{v}")
    assert info["count"] == 0
    # The largest integers canonical JSON allows are fine.
    big = {**good, "first_message_index": 2 ** 53 - 1, "forwarded_count": 2 ** 53 - 1}
    assert alice.ok("PUT", _session_path(v), big)["count"] == 1
    assert alice.ok("GET", _session_path(v)) == big


def test_responses_match_the_openapi_schemas(zhome: ZhomeProcess) -> None:
    import jsonschema

    from tests.e2e.openapi import Spec

    spec = Spec()
    alice = ClientUser(zhome, "alice")
    checked: set[tuple[str, str, int]] = set()

    def call(template: str, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        code, answer = alice.req(method.upper(), path, body)
        assert code == status, (method, path, code, answer)
        schema = spec.response_schema(template, method, status)
        errors = list(jsonschema.Draft202012Validator(schema).iter_errors(answer))
        assert not errors, (method, template, status, [e.message for e in errors[:5]])
        checked.add((template, method, status))
        return answer

    ver, ver_n = "/room_keys/version", "/room_keys/version/{version}"
    keys, room, session = "/room_keys/keys", "/room_keys/keys/{roomId}", "/room_keys/keys/{roomId}/{sessionId}"
    call(ver, "get", "/room_keys/version", status=404)
    v = call(ver, "post", "/room_keys/version", {"algorithm": ALG, "auth_data": _auth_data()})["version"]
    call(ver, "get", "/room_keys/version")
    call(ver_n, "get", f"/room_keys/version/{v}")
    call(ver_n, "get", "/room_keys/version/77", status=404)
    call(ver_n, "put", f"/room_keys/version/{v}", {"algorithm": ALG, "auth_data": _auth_data()})
    call(ver_n, "put", f"/room_keys/version/{v}", {"algorithm": ALG, "auth_data": _auth_data(), "version": "9"},
         status=400)
    call(ver_n, "put", "/room_keys/version/77", {"algorithm": ALG, "auth_data": _auth_data()}, status=404)
    call(session, "put", _session_path(v), _key())
    call(room, "put", f"/room_keys/keys/{q(ROOM)}?version={v}", {"sessions": {"s2": _key()}})
    call(keys, "put", f"/room_keys/keys?version={v}", {"rooms": {OTHER_ROOM: {"sessions": {"s3": _key()}}}})
    call(session, "get", _session_path(v))
    call(session, "get", _session_path(v, session_id="missing"), status=404)
    call(room, "get", f"/room_keys/keys/{q(ROOM)}?version={v}")
    call(keys, "get", f"/room_keys/keys?version={v}")
    for template, path in ((keys, "/room_keys/keys?version=77"), (room, f"/room_keys/keys/{q(ROOM)}?version=77")):
        call(template, "get", path, status=404)
        call(template, "delete", path, status=404)
    call(session, "delete", _session_path("77"), status=404)
    newer = call(ver, "post", "/room_keys/version", {"algorithm": ALG, "auth_data": _auth_data()})["version"]
    call(session, "put", _session_path(v), _key(), status=403)
    call(room, "put", f"/room_keys/keys/{q(ROOM)}?version={v}", {"sessions": {"s": _key()}}, status=403)
    call(keys, "put", f"/room_keys/keys?version={v}", {"rooms": {}}, status=403)
    call(session, "delete", _session_path(v))
    call(room, "delete", f"/room_keys/keys/{q(ROOM)}?version={v}")
    call(keys, "delete", f"/room_keys/keys?version={v}")
    call(ver_n, "delete", f"/room_keys/version/{newer}")
    call(ver_n, "delete", "/room_keys/version/77", status=404)
    assert len(checked) == 28
