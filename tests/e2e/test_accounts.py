"""Accounts end to end: registration (UIA, availability, tokens, the CLI and
shared-secret registration), login, logout, password changes, devices,
refresh tokens, deactivation, profiles and the user directory.

Spec: client-server-api "Client Authentication", "Account registration and
management", "Device management", "Profiles", "User directory".
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg2

from tests.e2e.harness import ZhomeProcess
from zhome.client.account import registration_mac

CS = "/_matrix/client/v3"
PASSWORD = "correct horse battery"


def _login(hs: ZhomeProcess, user: str, password: str = PASSWORD, **extra: Any) -> tuple[int, Any]:
    return hs.request("POST", CS + "/login", {
        "type": "m.login.password", "identifier": {"type": "m.id.user", "user": user},
        "password": password, **extra})


def _pw_auth(user_id: str, password: str = PASSWORD, session: str | None = None) -> dict[str, Any]:
    auth: dict[str, Any] = {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user_id},
                            "password": password}
    if session is not None:
        auth["session"] = session
    return auth


def _assert_dead(hs: ZhomeProcess, token: str) -> None:
    status, body = hs.request("GET", CS + "/account/whoami", token=token)
    assert status == 401, (status, body)
    assert body["errcode"] == "M_UNKNOWN_TOKEN"


# -- registration ---------------------------------------------------------------


def test_registration_uia_and_availability(zhome: ZhomeProcess) -> None:
    status, body = zhome.request("GET", CS + "/register/available?username=carol")
    assert status == 200 and body == {"available": True}

    status, body = zhome.request("POST", CS + "/register", {"username": "carol", "password": PASSWORD})
    assert status == 401, (status, body)
    assert {"stages": ["m.login.dummy"]} in body["flows"]
    session = body["session"]
    assert isinstance(session, str) and session

    status, body = zhome.request("POST", CS + "/register", {
        "username": "carol", "password": PASSWORD, "auth": {"type": "m.login.dummy", "session": session}})
    assert status == 200, (status, body)
    assert body["user_id"] == "@carol:localhost"
    assert body["access_token"] and body["device_id"]
    status, who = zhome.request("GET", CS + "/account/whoami", token=body["access_token"])
    assert status == 200 and who["user_id"] == "@carol:localhost" and who["device_id"] == body["device_id"]

    status, body = zhome.request("GET", CS + "/register/available?username=carol")
    assert status == 400 and body["errcode"] == "M_USER_IN_USE"
    status, body = zhome.request("GET", CS + "/register/available?username=CAROL")
    assert status == 400 and body["errcode"] == "M_USER_IN_USE"
    status, body = zhome.request("GET", CS + "/register/available?username=not%20valid")
    assert status == 400 and body["errcode"] == "M_INVALID_USERNAME"
    # Registering the same name again is refused.
    status, body = zhome.request("POST", CS + "/register", {
        "username": "carol", "password": PASSWORD, "auth": {"type": "m.login.dummy"}})
    assert status == 400 and body["errcode"] == "M_USER_IN_USE"


def test_registration_remembers_parameters_and_is_idempotent(zhome: ZhomeProcess) -> None:
    # The first step's parameters hold for the step that completes it.
    status, body = zhome.request("POST", CS + "/register", {
        "username": "dora", "password": PASSWORD, "device_id": "DORADEV",
        "initial_device_display_name": "Dora's phone"})
    assert status == 401, body
    session = body["session"]
    status, body = zhome.request("POST", CS + "/register", {"auth": {"type": "m.login.dummy", "session": session}})
    assert status == 200, body
    assert body["user_id"] == "@dora:localhost" and body["device_id"] == "DORADEV"
    status, dev = zhome.request("GET", CS + "/devices/DORADEV", token=body["access_token"])
    assert status == 200 and dev["display_name"] == "Dora's phone"
    status, _ = _login(zhome, "dora")
    assert status == 200
    # Completing the same session again answers for the same account, not a new one.
    status, again = zhome.request("POST", CS + "/register", {"auth": {"type": "m.login.dummy", "session": session}})
    assert status == 200 and again["user_id"] == "@dora:localhost", again

    # Without a username: the repeat gives the same generated user.
    status, body = zhome.request("POST", CS + "/register", {"password": PASSWORD})
    session = body["session"]
    done = [zhome.request("POST", CS + "/register", {
        "password": PASSWORD, "auth": {"type": "m.login.dummy", "session": session}}) for _ in range(2)]
    assert [s for s, _ in done] == [200, 200]
    assert done[0][1]["user_id"] == done[1][1]["user_id"]


def test_registration_password_of_the_last_step_counts(zhome: ZhomeProcess) -> None:
    status, body = zhome.request("POST", CS + "/register", {"username": "paula", "password": "first password"})
    assert status == 401
    status, body = zhome.request("POST", CS + "/register", {
        "username": "paula", "password": PASSWORD, "auth": {"type": "m.login.dummy", "session": body["session"]}})
    assert status == 200, body
    assert _login(zhome, "paula")[0] == 200
    assert _login(zhome, "paula", password="first password")[0] == 403


def test_registration_with_inhibit_login(zhome: ZhomeProcess) -> None:
    status, body = zhome.request("POST", CS + "/register", {
        "username": "ivan", "password": PASSWORD, "inhibit_login": True})
    assert status == 401
    status, body = zhome.request("POST", CS + "/register", {
        "auth": {"type": "m.login.dummy", "session": body["session"]}})
    assert status == 200, body
    assert body["user_id"] == "@ivan:localhost"
    assert "access_token" not in body and "device_id" not in body
    # The account exists with the password given in the first step.
    status, body = _login(zhome, "ivan")
    assert status == 200, body
    status, devices = zhome.request("GET", CS + "/devices", token=body["access_token"])
    assert [d["device_id"] for d in devices["devices"]] == [body["device_id"]]


def test_registration_rate_limit_counts_completed_registrations(zhome_factory: Any) -> None:
    hs = zhome_factory(rate_limits=True, overrides={
        "rate_limits": {"registration": {"per_second": 0.001, "burst_count": 3}}}).start()

    def two_step(name: str) -> tuple[int, Any]:
        status, body = hs.request("POST", CS + "/register", {"username": name, "password": PASSWORD})
        if status != 401:
            return status, body
        return hs.request("POST", CS + "/register", {
            "username": name, "password": PASSWORD, "auth": {"type": "m.login.dummy", "session": body["session"]}})

    # Each account takes two calls and an availability check; three accounts get through.
    for name in ("reg1", "reg2", "reg3"):
        assert hs.request("GET", CS + f"/register/available?username={name}")[0] == 200
        status, body = two_step(name)
        assert status == 200, (name, body)
    status, body = two_step("reg4")
    assert status == 429 and body["errcode"] == "M_LIMIT_EXCEEDED", body
    assert body["retry_after_ms"] > 0


def test_failed_registrations_are_limited_apart(zhome_factory: Any) -> None:
    hs = zhome_factory(rate_limits=True, overrides={
        "rate_limits": {"registration": {"per_second": 0.001, "burst_count": 3}}}).start()
    hs.register("taken")
    for _ in range(3):
        status, body = hs.request("POST", CS + "/register", {
            "username": "taken", "password": PASSWORD, "auth": {"type": "m.login.dummy"}})
        assert status == 400 and body["errcode"] == "M_USER_IN_USE"
    status, body = hs.request("POST", CS + "/register", {
        "username": "taken", "password": PASSWORD, "auth": {"type": "m.login.dummy"}})
    assert status == 429 and body["errcode"] == "M_LIMIT_EXCEEDED", body


def test_registration_disabled(zhome_factory: Any) -> None:
    hs = zhome_factory(overrides={"registration": {"enable_registration": False}}).start()
    status, body = hs.request("POST", CS + "/register", {
        "username": "dave", "password": PASSWORD, "auth": {"type": "m.login.dummy"}})
    assert status == 403, (status, body)
    assert body["errcode"] == "M_FORBIDDEN"
    status, body = _login(hs, "dave")
    assert status == 403


def _insert_registration_token(hs: ZhomeProcess, db_config: tuple[str, dict[str, Any]], token: str,
                               uses_allowed: int | None) -> None:
    engine, args = db_config
    sql = "INSERT INTO registration_tokens (token, uses_allowed, completed, expiry_time) VALUES ({p},{p},0,NULL)"
    if engine == "sqlite3":
        conn = sqlite3.connect(str(hs.workdir / "data" / "homeserver.db"))
        try:
            conn.execute(sql.format(p="?"), (token, uses_allowed))
            conn.commit()
        finally:
            conn.close()
    else:
        pg = psycopg2.connect(dbname=args["database"], host=args["host"], port=args["port"], user=args["user"],
                              password=args.get("password"))
        try:
            with pg.cursor() as cur:
                cur.execute(sql.format(p="%s"), (token, uses_allowed))
            pg.commit()
        finally:
            pg.close()


def test_registration_token_flow(zhome_factory: Any, db_config: tuple[str, dict[str, Any]]) -> None:
    hs = zhome_factory(overrides={"registration": {"registration_requires_token": True}}).start()
    _insert_registration_token(hs, db_config, "letmein", 1)

    validity = CS + "/register/m.login.registration_token/validity?token="
    status, body = hs.request("GET", validity + "letmein")
    assert status == 200 and body == {"valid": True}
    status, body = hs.request("GET", validity + "nope")
    assert status == 200 and body == {"valid": False}

    status, body = hs.request("POST", CS + "/register", {"username": "erin", "password": PASSWORD})
    assert status == 401
    assert body["flows"] == [{"stages": ["m.login.registration_token"]}]
    session = body["session"]
    # The dummy stage is not enough; a wrong token is refused.
    status, body = hs.request("POST", CS + "/register", {
        "username": "erin", "password": PASSWORD, "auth": {"type": "m.login.dummy", "session": session}})
    assert status == 401
    status, body = hs.request("POST", CS + "/register", {
        "username": "erin", "password": PASSWORD,
        "auth": {"type": "m.login.registration_token", "token": "nope", "session": session}})
    assert status == 401
    status, body = hs.request("POST", CS + "/register", {
        "username": "erin", "password": PASSWORD,
        "auth": {"type": "m.login.registration_token", "token": "letmein", "session": session}})
    assert status == 200, (status, body)
    assert body["user_id"] == "@erin:localhost"

    # Its single use is spent.
    status, body = hs.request("GET", validity + "letmein")
    assert status == 200 and body == {"valid": False}
    status, body = hs.request("POST", CS + "/register", {
        "username": "frank", "password": PASSWORD,
        "auth": {"type": "m.login.registration_token", "token": "letmein"}})
    assert status == 401, (status, body)


def test_register_user_cli(zhome: ZhomeProcess, tmp_path: Path) -> None:
    pwfile = tmp_path / "pw.txt"
    pwfile.write_text("s3cret cli password\n")
    out = subprocess.run(
        [sys.executable, "-m", "zhome", "register-user", "-c", str(zhome.config_path), "gina",
         "--password-file", str(pwfile), "--admin"],
        capture_output=True, text=True, cwd=str(zhome.workdir), timeout=60)
    assert out.returncode == 0, out.stderr
    assert "@gina:localhost" in out.stdout
    status, body = _login(zhome, "gina", "s3cret cli password")
    assert status == 200, (status, body)
    assert body["user_id"] == "@gina:localhost"
    # The same name again is an error with a non-zero exit.
    again = subprocess.run(
        [sys.executable, "-m", "zhome", "register-user", "-c", str(zhome.config_path), "gina",
         "--password-file", str(pwfile)],
        capture_output=True, text=True, cwd=str(zhome.workdir), timeout=60)
    assert again.returncode != 0


def test_shared_secret_registration(zhome_factory: Any) -> None:
    secret = "a shared secret for tests"
    hs = zhome_factory(overrides={"registration": {"registration_shared_secret": secret}}).start()
    path = "/_zhome/admin/v1/register"

    status, body = hs.request("GET", path)
    assert status == 200
    nonce = body["nonce"]
    status, body = hs.request("POST", path, {
        "nonce": nonce, "username": "hank", "password": PASSWORD, "admin": False,
        "mac": registration_mac("wrong secret", nonce, "hank", PASSWORD, False)})
    assert status == 403, (status, body)
    assert body["errcode"] == "M_FORBIDDEN"

    status, body = hs.request("GET", path)
    nonce = body["nonce"]
    status, body = hs.request("POST", path, {
        "nonce": nonce, "username": "hank", "password": PASSWORD, "admin": True,
        "mac": registration_mac(secret, nonce, "hank", PASSWORD, True)})
    assert status == 200, (status, body)
    assert body["user_id"] == "@hank:localhost" and body["access_token"]
    # A nonce is good for one registration only.
    status, body = hs.request("POST", path, {
        "nonce": nonce, "username": "hank2", "password": PASSWORD, "admin": True,
        "mac": registration_mac(secret, nonce, "hank2", PASSWORD, True)})
    assert status == 403
    status, body = _login(hs, "hank")
    assert status == 200


# -- login, logout --------------------------------------------------------------


def test_login_whoami_logout(zhome: ZhomeProcess) -> None:
    zhome.register("ivan")
    status, body = zhome.request("GET", CS + "/login")
    assert status == 200 and {"type": "m.login.password"} in body["flows"]

    status, a = _login(zhome, "ivan", device_id="DEVA", initial_device_display_name="phone")
    assert status == 200, a
    assert a["user_id"] == "@ivan:localhost" and a["device_id"] == "DEVA"
    # The legacy "user" field, with a full user ID.
    status, b = zhome.request("POST", CS + "/login", {
        "type": "m.login.password", "user": "@ivan:localhost", "password": PASSWORD})
    assert status == 200, b
    assert b["user_id"] == "@ivan:localhost" and b["device_id"] != "DEVA"

    status, body = _login(zhome, "ivan", "wrong password")
    assert status == 403 and body["errcode"] == "M_FORBIDDEN"
    status, body = _login(zhome, "nobody")
    assert status == 403 and body["errcode"] == "M_FORBIDDEN"

    status, who = zhome.request("GET", CS + "/account/whoami", token=a["access_token"])
    assert status == 200 and who["user_id"] == "@ivan:localhost" and who["device_id"] == "DEVA"
    status, body = zhome.request("GET", CS + "/account/whoami")
    assert status == 401 and body["errcode"] == "M_MISSING_TOKEN"

    status, _ = zhome.request("POST", CS + "/logout", {}, token=a["access_token"])
    assert status == 200
    _assert_dead(zhome, a["access_token"])
    status, who = zhome.request("GET", CS + "/account/whoami", token=b["access_token"])
    assert status == 200

    status, c = _login(zhome, "ivan")
    assert status == 200
    status, _ = zhome.request("POST", CS + "/logout/all", {}, token=c["access_token"])
    assert status == 200
    _assert_dead(zhome, b["access_token"])
    _assert_dead(zhome, c["access_token"])
    status, devices = zhome.request("GET", CS + "/devices", token=_login(zhome, "ivan")[1]["access_token"])
    assert status == 200 and len(devices["devices"]) == 1


def test_password_change(zhome: ZhomeProcess) -> None:
    me = zhome.register("judy")
    status, other = _login(zhome, "judy")
    assert status == 200
    new_pw = "a brand new password"

    status, body = zhome.request("POST", CS + "/account/password", {"new_password": new_pw}, token=me["access_token"])
    assert status == 401 and body["flows"] == [{"stages": ["m.login.password"]}]
    session = body["session"]
    status, body = zhome.request("POST", CS + "/account/password", {
        "new_password": new_pw, "auth": _pw_auth(me["user_id"], "not it", session)}, token=me["access_token"])
    assert status == 401
    status, body = zhome.request("POST", CS + "/account/password", {
        "new_password": new_pw, "auth": _pw_auth(me["user_id"], PASSWORD, session)}, token=me["access_token"])
    assert status == 200, (status, body)

    _assert_dead(zhome, other["access_token"])
    status, _ = zhome.request("GET", CS + "/account/whoami", token=me["access_token"])
    assert status == 200
    status, body = _login(zhome, "judy", PASSWORD)
    assert status == 403
    status, body = _login(zhome, "judy", new_pw)
    assert status == 200


def test_devices(zhome: ZhomeProcess) -> None:
    me = zhome.register("karl")
    status, other = _login(zhome, "karl", device_id="TABLET", initial_device_display_name="tablet")
    assert status == 200
    tok = me["access_token"]

    status, body = zhome.request("GET", CS + "/devices", token=tok)
    assert status == 200
    ids = {d["device_id"]: d for d in body["devices"]}
    assert set(ids) == {me["device_id"], "TABLET"}
    assert ids["TABLET"].get("display_name") == "tablet"

    status, body = zhome.request("GET", CS + "/devices/TABLET", token=tok)
    assert status == 200 and body["device_id"] == "TABLET" and body["display_name"] == "tablet"
    status, body = zhome.request("PUT", CS + "/devices/TABLET", {"display_name": "old tablet"}, token=tok)
    assert status == 200
    status, body = zhome.request("GET", CS + "/devices/TABLET", token=tok)
    assert body["display_name"] == "old tablet"
    status, body = zhome.request("GET", CS + "/devices/NOPE", token=tok)
    assert status == 404 and body["errcode"] == "M_NOT_FOUND"

    # Deleting needs UIA.
    status, body = zhome.request("DELETE", CS + "/devices/TABLET", {}, token=tok)
    assert status == 401 and "session" in body
    status, _ = zhome.request("GET", CS + "/account/whoami", token=other["access_token"])
    assert status == 200
    status, body = zhome.request("DELETE", CS + "/devices/TABLET",
                                 {"auth": _pw_auth(me["user_id"], session=body["session"])}, token=tok)
    assert status == 200, (status, body)
    _assert_dead(zhome, other["access_token"])
    status, body = zhome.request("GET", CS + "/devices", token=tok)
    assert [d["device_id"] for d in body["devices"]] == [me["device_id"]]


def test_uia_is_bound_to_its_user_and_operation(zhome: ZhomeProcess) -> None:
    me = zhome.register("lena")
    zhome.register("eve")
    tok = me["access_token"]
    for device in ("FIRST", "SECOND"):
        assert _login(zhome, "lena", device_id=device)[0] == 200
    # Another user's valid credentials never authorise lena's actions.
    status, body = zhome.request("DELETE", CS + "/devices/FIRST", {"auth": _pw_auth("@eve:localhost")}, token=tok)
    assert status == 403 and body["errcode"] == "M_FORBIDDEN", body
    # A session started to delete FIRST cannot delete SECOND.
    status, body = zhome.request("DELETE", CS + "/devices/FIRST", {}, token=tok)
    assert status == 401
    status, body = zhome.request("DELETE", CS + "/devices/SECOND",
                                 {"auth": _pw_auth(me["user_id"], session=body["session"])}, token=tok)
    assert status == 403 and body["errcode"] == "M_FORBIDDEN", body
    status, devices = zhome.request("GET", CS + "/devices", token=tok)
    assert {"FIRST", "SECOND"} <= {d["device_id"] for d in devices["devices"]}


def test_usernames_with_a_trailing_newline_are_refused(zhome: ZhomeProcess) -> None:
    for name in ("trailing\n", "new\nline"):
        status, body = zhome.request("POST", CS + "/register", {
            "username": name, "password": PASSWORD, "auth": {"type": "m.login.dummy"}})
        assert status == 400 and body["errcode"] == "M_INVALID_USERNAME", (name, body)
        status, body = zhome.request("GET", CS + "/register/available?username=" + name.replace("\n", "%0A"))
        assert status == 400 and body["errcode"] == "M_INVALID_USERNAME", (name, body)


def test_refresh_tokens(zhome_factory: Any) -> None:
    hs = zhome_factory(overrides={"access_tokens": {"lifetime_ms": 2000, "refresh_tokens": True}}).start()
    hs.register("lena")
    status, body = _login(hs, "lena", refresh_token=True)
    assert status == 200, body
    assert body["expires_in_ms"] == 2000
    access, refresh = body["access_token"], body["refresh_token"]
    status, _ = hs.request("GET", CS + "/account/whoami", token=access)
    assert status == 200

    time.sleep(2.5)
    status, body = hs.request("GET", CS + "/account/whoami", token=access)
    assert status == 401 and body["errcode"] == "M_UNKNOWN_TOKEN" and body["soft_logout"] is True

    status, body = hs.request("POST", CS + "/refresh", {"refresh_token": refresh})
    assert status == 200, body
    access2, refresh2 = body["access_token"], body["refresh_token"]
    assert access2 != access and refresh2 != refresh and body["expires_in_ms"] == 2000
    status, who = hs.request("GET", CS + "/account/whoami", token=access2)
    assert status == 200 and who["user_id"] == "@lena:localhost"

    status, body = hs.request("POST", CS + "/refresh", {"refresh_token": refresh})
    assert status == 401 and body["errcode"] == "M_UNKNOWN_TOKEN"
    status, body = hs.request("POST", CS + "/refresh", {"refresh_token": refresh2})
    assert status == 200


def test_deactivate(zhome: ZhomeProcess) -> None:
    me = zhome.register("mona")
    owner = zhome.register("nick")
    status, room = zhome.request("POST", CS + "/createRoom", {"preset": "public_chat"}, token=owner["access_token"])
    assert status == 200
    room_id = room["room_id"]
    status, _ = zhome.request("POST", CS + f"/join/{room_id}", {}, token=me["access_token"])
    assert status == 200

    status, body = zhome.request("POST", CS + "/account/deactivate", {}, token=me["access_token"])
    assert status == 401 and "session" in body
    status, body = zhome.request("POST", CS + "/account/deactivate", {"auth": _pw_auth(me["user_id"])},
                                 token=me["access_token"])
    assert status == 200, (status, body)

    _assert_dead(zhome, me["access_token"])
    status, body = _login(zhome, "mona")
    assert status == 403
    status, body = zhome.request("GET", CS + f"/rooms/{room_id}/state/m.room.member/@mona:localhost",
                                 token=owner["access_token"])
    assert status == 200 and body["membership"] == "leave"
    status, body = zhome.request("GET", CS + f"/rooms/{room_id}/joined_members", token=owner["access_token"])
    assert list(body["joined"]) == ["@nick:localhost"]
    status, body = zhome.request("POST", CS + "/user_directory/search", {"search_term": "mona"},
                                 token=owner["access_token"])
    assert status == 200 and body["results"] == []
    # The name cannot be registered again.
    status, body = zhome.request("GET", CS + "/register/available?username=mona")
    assert status == 400 and body["errcode"] == "M_USER_IN_USE"


# -- profiles and the directory ---------------------------------------------------


def test_profile_and_directory(zhome: ZhomeProcess) -> None:
    me = zhome.register("olga")
    other = zhome.register("paul")
    tok = me["access_token"]
    status, room = zhome.request("POST", CS + "/createRoom", {"preset": "private_chat"}, token=tok)
    room_id = room["room_id"]

    status, body = zhome.request("PUT", CS + "/profile/@olga:localhost/displayname",
                                 {"displayname": "Olga the Nurse"}, token=tok)
    assert status == 200, body
    status, body = zhome.request("PUT", CS + "/profile/@olga:localhost/avatar_url",
                                 {"avatar_url": "mxc://localhost/abcdef"}, token=tok)
    assert status == 200, body
    status, body = zhome.request("GET", CS + "/profile/@olga:localhost/displayname")
    assert status == 200 and body == {"displayname": "Olga the Nurse"}
    status, body = zhome.request("GET", CS + "/profile/@olga:localhost/avatar_url")
    assert status == 200 and body == {"avatar_url": "mxc://localhost/abcdef"}
    status, body = zhome.request("GET", CS + "/profile/@olga:localhost")
    assert body == {"displayname": "Olga the Nurse", "avatar_url": "mxc://localhost/abcdef"}
    status, body = zhome.request("GET", CS + "/profile/@nobody:localhost")
    assert status == 404
    # Someone else's profile cannot be changed.
    status, body = zhome.request("PUT", CS + "/profile/@olga:localhost/displayname",
                                 {"displayname": "hijacked"}, token=other["access_token"])
    assert status == 403

    status, member = zhome.request("GET", CS + f"/rooms/{room_id}/state/m.room.member/@olga:localhost", token=tok)
    assert status == 200
    assert member["membership"] == "join"
    assert member["displayname"] == "Olga the Nurse"
    assert member["avatar_url"] == "mxc://localhost/abcdef"
    status, state = zhome.request("GET", CS + f"/rooms/{room_id}/state", token=tok)
    assert any(e["type"] == "m.room.member" and e["state_key"] == "@olga:localhost"
               and e["content"].get("displayname") == "Olga the Nurse" for e in state)

    # paul shares no room with olga and her room is private: he does not find her...
    status, body = zhome.request("POST", CS + "/user_directory/search", {"search_term": "the nurse"},
                                 token=other["access_token"])
    assert status == 200 and body["results"] == [], body
    # ... until he joins it (tests/e2e/test_user_directory.py has the rest).
    assert zhome.request("POST", CS + f"/rooms/{room_id}/invite", {"user_id": "@paul:localhost"}, token=tok)[0] == 200
    assert zhome.request("POST", CS + f"/rooms/{room_id}/join", {}, token=other["access_token"])[0] == 200
    status, body = zhome.request("POST", CS + "/user_directory/search", {"search_term": "the nurse"},
                                 token=other["access_token"])
    assert status == 200, body
    assert [r["user_id"] for r in body["results"]] == ["@olga:localhost"]
    assert body["results"][0]["display_name"] == "Olga the Nurse"
    assert body["limited"] is False
    status, body = zhome.request("POST", CS + "/user_directory/search", {"search_term": "zzzz"},
                                 token=other["access_token"])
    assert status == 200 and body["results"] == []
