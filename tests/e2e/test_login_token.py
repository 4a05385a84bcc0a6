"""Token-based login and the well-known documents, through a real zhome.

Spec: client-server-api "POST /_matrix/client/v1/login/get_token" and
"Token-based login" (m.login.token); "Well-known URIs"
(/.well-known/matrix/client) and "GET /.well-known/matrix/support".
"""

from __future__ import annotations

from typing import Any

import yaml

from tests.e2e.harness import CS, ClientUser, ZhomeProcess
from tests.e2e.openapi import Spec

V1 = "/_matrix/client/v1"
PASSWORD = "correct horse battery"



def _get_token(hs: ZhomeProcess, u: ClientUser) -> dict[str, Any]:
    status, body = hs.request("POST", V1 + "/login/get_token", {}, token=u.token)
    assert status == 401 and body["flows"] == [{"stages": ["m.login.password"]}], (status, body)
    auth = {"type": "m.login.password", "session": body["session"],
            "identifier": {"type": "m.id.user", "user": u.user_id}, "password": PASSWORD}
    status, body = hs.request("POST", V1 + "/login/get_token", {"auth": auth}, token=u.token)
    assert status == 200, body
    return body


def test_a_login_token_logs_in_one_new_device_once(zhome: ZhomeProcess, spec: Spec) -> None:
    u = ClientUser(zhome, "phoneuser")
    caps = u.ok("GET", "/capabilities")["capabilities"]
    assert caps["m.get_login_token"] == {"enabled": True}
    flows = zhome.request("GET", CS + "/login")[1]["flows"]
    assert {"type": "m.login.token", "get_login_token": True} in flows

    body = _get_token(zhome, u)
    spec.validate(body, "/login/get_token", "post", 200)
    assert body["expires_in_ms"] == 120_000

    status, login = zhome.request("POST", CS + "/login", {"type": "m.login.token", "token": body["login_token"],
                                                          "device_id": "PHONE"})
    assert status == 200, login
    assert login["user_id"] == u.user_id and login["device_id"] == "PHONE"
    status, who = zhome.request("GET", CS + "/account/whoami", token=login["access_token"])
    assert status == 200 and who["user_id"] == u.user_id and who["device_id"] == "PHONE", who

    # One use only.
    status, again = zhome.request("POST", CS + "/login", {"type": "m.login.token", "token": body["login_token"]})
    assert status == 403 and again["errcode"] == "M_FORBIDDEN", again
    # A made-up token, and a malformed one.
    status, bad = zhome.request("POST", CS + "/login", {"type": "m.login.token", "token": "zhl_nothing"})
    assert status == 403 and bad["errcode"] == "M_FORBIDDEN", bad
    status, bad = zhome.request("POST", CS + "/login", {"type": "m.login.token", "token": 5})
    assert status == 400 and bad["errcode"] == "M_BAD_JSON", bad


def test_get_token_needs_the_password_and_a_session(zhome: ZhomeProcess) -> None:
    u = ClientUser(zhome, "tokenuser")
    status, body = zhome.request("POST", V1 + "/login/get_token", {})
    assert status == 401 and body["errcode"] == "M_MISSING_TOKEN", body
    status, body = zhome.request("POST", V1 + "/login/get_token", {}, token=u.token)
    assert status == 401
    auth = {"type": "m.login.password", "session": body["session"],
            "identifier": {"type": "m.id.user", "user": u.user_id}, "password": "wrong"}
    status, body = zhome.request("POST", V1 + "/login/get_token", {"auth": auth}, token=u.token)
    assert status == 401 and "login_token" not in body, body


def test_tokens_expire_and_go_with_the_account(zhome_factory: Any) -> None:
    hs = zhome_factory(overrides={"access_tokens": {"login_token_lifetime_ms": 1000}}).start()
    u = ClientUser(hs, "expiring")
    token = _get_token(hs, u)["login_token"]
    import time

    time.sleep(1.2)
    status, body = hs.request("POST", CS + "/login", {"type": "m.login.token", "token": token})
    assert status == 403, body

    # Logging out every device also takes the tokens not yet used.
    token = _get_token(hs, u)["login_token"]
    assert hs.request("POST", CS + "/logout/all", {}, token=u.token)[0] == 200
    status, body = hs.request("POST", CS + "/login", {"type": "m.login.token", "token": token})
    assert status == 403, body


def test_login_tokens_can_be_turned_off(zhome_factory: Any) -> None:
    hs = zhome_factory(overrides={"access_tokens": {"login_token_enabled": False}}).start()
    u = ClientUser(hs, "notokens")
    assert u.ok("GET", "/capabilities")["capabilities"]["m.get_login_token"] == {"enabled": False}
    assert all(f["type"] != "m.login.token" for f in hs.request("GET", CS + "/login")[1]["flows"])
    status, body = hs.request("POST", V1 + "/login/get_token", {}, token=u.token)
    assert status == 404 and body["errcode"] == "M_UNRECOGNIZED", body
    status, body = hs.request("POST", CS + "/login", {"type": "m.login.token", "token": "zhl_x"})
    assert status == 400 and body["errcode"] == "M_UNKNOWN", body


def test_registration_token_validity_on_the_v1_path(zhome: ZhomeProcess) -> None:
    for prefix in (V1, CS):
        status, body = zhome.request("GET", prefix + "/register/m.login.registration_token/validity?token=nope")
        assert status == 200 and body == {"valid": False}, (prefix, status, body)


def test_well_known_client_and_support(zhome_factory: Any, spec: Spec) -> None:
    hs = zhome_factory().start()
    status, body = hs.request("GET", "/.well-known/matrix/client")
    assert status == 200 and body["m.homeserver"]["base_url"].startswith("http://127.0.0.1:"), body
    status, body = hs.request("GET", "/.well-known/matrix/support")
    assert status == 404 and body["errcode"] == "M_NOT_FOUND", body
    hs.stop()

    contacts = [{"role": "m.role.admin", "matrix_id": "@admin:localhost", "email_address": "admin@example.org"},
                {"role": "m.role.security", "email_address": "security@example.org"}]
    cfg = yaml.safe_load(hs.config_path.read_text())
    cfg["well_known"] = {"client_extra": {"org.example.theme": {"colour": "teal"}},
                         "support_contacts": contacts, "support_page": "https://example.org/help"}
    hs.config_path.write_text(yaml.safe_dump(cfg))
    hs.start()
    status, body = hs.request("GET", "/.well-known/matrix/client")
    assert status == 200 and body["org.example.theme"] == {"colour": "teal"} and "m.homeserver" in body, body
    status, body = hs.request("GET", "/.well-known/matrix/support")
    assert status == 200, body
    assert body == {"contacts": contacts, "support_page": "https://example.org/help"}
    spec.validate(body, "/matrix/support", "get", 200)
