"""Extended profile fields through a real zhome on SQLite and PostgreSQL, and
over federation between two zhome servers.

Spec: client-server-api "Profiles" (v1.16: GET/PUT/DELETE
/profile/{userId}/{keyName}, m.tz, custom namespaced keys, the 64 KiB
limit, the m.profile_fields capability); server-server-api "Query Types"
(GET /query/profile with ``field``).
"""

from __future__ import annotations

from typing import Any

from tests.e2e.harness import CS, ClientUser, ZhomeProcess, q
from tests.e2e.openapi import Spec


def test_extended_fields_set_read_and_deleted(zhome: ZhomeProcess) -> None:
    spec = Spec()
    alice, bob = ClientUser(zhome, "alice"), ClientUser(zhome, "bob")
    me = f"/profile/{q(alice.user_id)}"
    caps = alice.ok("GET", "/capabilities")["capabilities"]
    assert caps["m.profile_fields"]["enabled"] is True

    alice.ok("PUT", me + "/displayname", {"displayname": "Alice"})
    alice.ok("PUT", me + "/m.tz", {"m.tz": "Europe/Amsterdam"})
    alice.ok("PUT", me + "/org.example.ward", {"org.example.ward": {"name": "7B", "floor": 3}})
    body = bob.ok("GET", me)
    spec.validate(body, "/profile/{userId}", "get", 200)
    assert body == {"displayname": "Alice", "m.tz": "Europe/Amsterdam",
                    "org.example.ward": {"name": "7B", "floor": 3}}, body
    body = bob.ok("GET", me + "/org.example.ward")
    spec.validate(body, "/profile/{userId}/{keyName}", "get", 200)
    assert body == {"org.example.ward": {"name": "7B", "floor": 3}}
    # Replacing a field keeps one value.
    alice.ok("PUT", me + "/m.tz", {"m.tz": "Europe/Brussels"})
    assert bob.ok("GET", me + "/m.tz") == {"m.tz": "Europe/Brussels"}

    alice.ok("DELETE", me + "/org.example.ward")
    status, body = bob.req("GET", me + "/org.example.ward")
    assert status == 404 and body["errcode"] == "M_NOT_FOUND", body
    # Deleting what is not there is fine; deleting displayname clears it.
    alice.ok("DELETE", me + "/org.example.nothing")
    alice.ok("DELETE", me + "/displayname")
    assert bob.ok("GET", me) == {"m.tz": "Europe/Brussels"}


def test_bad_profile_writes(zhome: ZhomeProcess) -> None:
    alice, bob = ClientUser(zhome, "alice"), ClientUser(zhome, "bob")
    me = f"/profile/{q(alice.user_id)}"
    cases: list[tuple[str, str, Any, int, str]] = [
        ("PUT", "/Not.Allowed", {"Not.Allowed": 1}, 400, "M_INVALID_PARAM"),
        ("PUT", "/nodots", {"nodots": 1}, 400, "M_INVALID_PARAM"),
        ("PUT", "/org.example.x", {"org.example.y": 1}, 400, "M_MISSING_PARAM"),
        ("PUT", "/m.tz", {"m.tz": 5}, 400, "M_BAD_JSON"),
        ("PUT", "/displayname", {"displayname": ["x"]}, 400, "M_BAD_JSON"),
        ("PUT", "/org.example." + "k" * 260, {"org.example." + "k" * 260: 1}, 400, "M_KEY_TOO_LARGE"),
        ("GET", "/Bad Key", None, 400, "M_INVALID_PARAM"),
    ]
    for method, path, body, status_wanted, code in cases:
        status, resp = alice.req(method, me + path.replace(" ", "%20"), body)
        assert status == status_wanted and resp["errcode"] == code, (method, path, status, resp)
    # Someone else's profile.
    status, resp = bob.req("PUT", me + "/m.tz", {"m.tz": "UTC"})
    assert status == 403 and resp["errcode"] == "M_FORBIDDEN", resp
    status, resp = bob.req("DELETE", me + "/m.tz")
    assert status == 403 and resp["errcode"] == "M_FORBIDDEN", resp

    # The whole profile stays under 64 KiB: a field that would pass it is
    # refused and nothing is written; smaller ones fit beside it.
    alice.ok("PUT", me + "/org.example.big", {"org.example.big": "x" * 40_000})
    status, resp = alice.req("PUT", me + "/org.example.more", {"org.example.more": "y" * 30_000})
    assert status == 400 and resp["errcode"] == "M_PROFILE_TOO_LARGE", resp
    assert "org.example.more" not in alice.ok("GET", me)
    alice.ok("PUT", me + "/org.example.big", {"org.example.big": "x" * 50_000})  # replacing is measured without the old value
    alice.ok("PUT", me + "/org.example.small", {"org.example.small": "z" * 1_000})


def test_fields_go_with_the_account(zhome: ZhomeProcess) -> None:
    carol = ClientUser(zhome, "carol")
    me = f"/profile/{q(carol.user_id)}"
    carol.ok("PUT", me + "/org.example.pager", {"org.example.pager": "4711"})
    status, body = zhome.request("POST", CS + "/account/deactivate", {}, token=carol.token)
    assert status == 401
    auth = {"type": "m.login.password", "session": body["session"],
            "identifier": {"type": "m.id.user", "user": carol.user_id}, "password": "correct horse battery"}
    status, body = zhome.request("POST", CS + "/account/deactivate", {"auth": auth}, token=carol.token)
    assert status == 200, body
    other = ClientUser(zhome, "dave")
    status, body = other.req("GET", me)
    assert status in (200, 404), body
    assert "org.example.pager" not in (body if status == 200 else {}), body


def test_fields_over_federation(zhome_pair: Any) -> None:
    a, b = zhome_pair.a, zhome_pair.b
    alice, bob = ClientUser(a, "pfalice"), ClientUser(b, "pfbob")
    me = f"/profile/{q(alice.user_id)}"
    alice.ok("PUT", me + "/displayname", {"displayname": "Alice A"})
    alice.ok("PUT", me + "/m.tz", {"m.tz": "Europe/Amsterdam"})
    alice.ok("PUT", me + "/org.example.role", {"org.example.role": ["nurse", "night"]})
    body = bob.ok("GET", me)
    assert body == {"displayname": "Alice A", "m.tz": "Europe/Amsterdam",
                    "org.example.role": ["nurse", "night"]}, body
    assert bob.ok("GET", me + "/org.example.role") == {"org.example.role": ["nurse", "night"]}
    status, body = bob.req("GET", me + "/org.example.none")
    assert status == 404, body
    # Only the owner's server changes a profile.
    status, body = bob.req("PUT", me + "/m.tz", {"m.tz": "UTC"})
    assert status == 403, body
