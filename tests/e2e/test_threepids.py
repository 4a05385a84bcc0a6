"""3PIDs by email end to end on both engines, with a real SMTP server on
loopback: validation mails and their links, adding and removing an
address with user-interactive auth, password reset by email, the outbox
surviving a restart, OpenID tokens, addresses never in the clear on disk,
erasure, the admin API's threepids, and Matrix errors for bad input."""

from __future__ import annotations

import secrets
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.e2e.harness import CS, ClientUser, ZhomeProcess, free_port, q
from tests.e2e.mailsink import MailSink, body_of, link_in
from tests.e2e.test_admin_api import Admin
from tests.e2e.test_erasure import _where_stored

PASSWORD = "correct horse battery"


def email_overrides(smtp_port: int, **extra: Any) -> dict[str, Any]:
    return {"email": {"smtp_host": "127.0.0.1", "smtp_port": smtp_port, "notif_from": "zhome <noreply@localhost>",
                      "outbox_min_backoff_ms": 200, "outbox_max_backoff_ms": 1000, **extra}}


@pytest.fixture
def sink() -> Iterator[MailSink]:
    s = MailSink(free_port()).start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def hs(zhome_factory: Any, sink: MailSink) -> ZhomeProcess:
    proc: ZhomeProcess = zhome_factory(overrides=email_overrides(sink.port))
    return proc.start()


def new_address() -> str:
    return f"m{secrets.token_hex(12)}@example.org"


def request_token(user: ClientUser | ZhomeProcess, path: str, address: str, secret: str,
                  attempt: int = 1) -> tuple[int, Any]:
    body = {"client_secret": secret, "email": address, "send_attempt": attempt}
    if isinstance(user, ClientUser):
        return user.req("POST", path, body)
    return user.request("POST", CS + path, body)


def open_link(link: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(link, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def validate(hs: ZhomeProcess, sink: MailSink, user: ClientUser | ZhomeProcess, path: str,
             address: str) -> tuple[str, str]:
    """Ask for a token, follow the mailed link: (sid, client_secret)."""
    secret = secrets.token_hex(8)
    before = len(sink.to(address))
    status, out = request_token(user, path, address, secret)
    assert status == 200, out
    mail = sink.wait_for(address, before + 1)[-1]
    link = link_in(mail)
    assert link.startswith(hs.base_url + "/_zhome/client/v1/validate/email/submitToken?")
    status, page = open_link(link)
    assert status == 200 and "confirmed" in page, (status, page)
    return out["sid"], secret


def add_3pid(user: ClientUser, sid: str, secret: str) -> tuple[int, Any]:
    body = {"sid": sid, "client_secret": secret}
    status, out = user.req("POST", "/account/3pid/add", body)
    assert status == 401 and out["flows"] == [{"stages": ["m.login.password"]}], out
    return user.req("POST", "/account/3pid/add", {**body, "auth": {
        "type": "m.login.password", "session": out["session"],
        "identifier": {"type": "m.id.user", "user": user.user_id}, "password": PASSWORD}})


def test_validate_add_list_delete(hs: ZhomeProcess, sink: MailSink) -> None:
    alice = ClientUser(hs, "alice")
    address = new_address()
    secret = secrets.token_hex(8)
    status, out = request_token(alice, "/account/3pid/email/requestToken", address, secret)
    assert status == 200 and out["sid"], out
    assert out["submit_url"] == hs.base_url + "/_zhome/client/v1/validate/email/submitToken"
    mail = sink.wait_for(address)[0]
    assert mail["From"] == "zhome <noreply@localhost>" and mail["To"] == address
    # The same send_attempt again: the same session, no second mail.
    status, again = request_token(alice, "/account/3pid/email/requestToken", address, secret)
    assert status == 200 and again["sid"] == out["sid"]
    time.sleep(1.0)
    assert len(sink.to(address)) == 1
    # Not validated yet: adding fails.
    status, refused = add_3pid(alice, out["sid"], secret)
    assert status == 403 and refused["errcode"] == "M_THREEPID_AUTH_FAILED", refused
    # A wrong token in the link is refused, the real one validates.
    link = link_in(mail)
    bad = link.replace("token=", "token=x")
    assert open_link(bad)[0] == 400
    assert open_link(link)[0] == 200
    status, done = add_3pid(alice, out["sid"], secret)
    assert status == 200, done
    listed = alice.ok("GET", "/account/3pid")["threepids"]
    assert [(t["medium"], t["address"]) for t in listed] == [("email", address)]
    assert listed[0]["validated_at"] > 0 and listed[0]["added_at"] > 0
    # The address is now taken: another account cannot ask to add it.
    bob = ClientUser(hs, "bob")
    status, taken = request_token(bob, "/account/3pid/email/requestToken", address.upper(), "s3cret")
    assert status == 400 and taken["errcode"] == "M_THREEPID_IN_USE", taken
    status, taken = hs.request("POST", CS + "/register/email/requestToken",
                               {"client_secret": "abc", "email": address, "send_attempt": 1})
    assert status == 400 and taken["errcode"] == "M_THREEPID_IN_USE"
    caps = alice.ok("GET", "/capabilities")["capabilities"]
    assert caps["m.3pid_changes"] == {"enabled": True}
    out = alice.ok("POST", "/account/3pid/delete", {"medium": "email", "address": address})
    assert out == {"id_server_unbind_result": "no-support"}
    assert alice.ok("GET", "/account/3pid")["threepids"] == []
    # Deleting it again: nothing to delete, nowhere to unbind.
    out = alice.ok("POST", "/account/3pid/delete", {"medium": "email", "address": address})
    assert out == {"id_server_unbind_result": "no-support"}


def test_password_reset_by_email(hs: ZhomeProcess, sink: MailSink) -> None:
    alice = ClientUser(hs, "alice")
    address = new_address()
    sid, secret = validate(hs, sink, alice, "/account/3pid/email/requestToken", address)
    assert add_3pid(alice, sid, secret)[0] == 200
    # Unknown addresses are told apart (the spec's M_THREEPID_NOT_FOUND).
    status, out = request_token(hs, "/account/password/email/requestToken", new_address(), "abc")
    assert status == 400 and out["errcode"] == "M_THREEPID_NOT_FOUND", out
    sid, secret = validate(hs, sink, hs, "/account/password/email/requestToken", address)
    status, out = hs.request("POST", CS + "/account/password", {"new_password": "a brand new one"})
    assert status == 401 and out["flows"] == [{"stages": ["m.login.email.identity"]}], out
    status, out = hs.request("POST", CS + "/account/password", {"new_password": "a brand new one", "auth": {
        "type": "m.login.email.identity", "threepid_creds": {"sid": sid, "client_secret": "wrong"}}})
    assert status == 401 and out["errcode"] == "M_UNAUTHORIZED", out
    status, out = hs.request("POST", CS + "/account/password", {"new_password": "a brand new one", "auth": {
        "type": "m.login.email.identity", "threepid_creds": {"sid": sid, "client_secret": secret}}})
    assert status == 200, out
    # The old sessions are logged out, the new password logs in, the old not.
    status, _ = alice.req("GET", "/account/whoami")
    assert status == 401
    login = {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}}
    assert hs.request("POST", CS + "/login", {**login, "password": PASSWORD})[0] == 403
    assert hs.request("POST", CS + "/login", {**login, "password": "a brand new one"})[0] == 200
    # The session was used up.
    status, out = hs.request("POST", CS + "/account/password", {"new_password": "again", "auth": {
        "type": "m.login.email.identity", "threepid_creds": {"sid": sid, "client_secret": secret}}})
    assert status == 401


def test_registration_with_email_stage(zhome_factory: Any, sink: MailSink) -> None:
    hs: ZhomeProcess = zhome_factory(overrides=email_overrides(sink.port, registration_requires_email=True))
    hs.start()
    address = new_address()
    status, out = hs.request("POST", CS + "/register", {"username": "carol", "password": PASSWORD})
    assert status == 401 and out["flows"] == [{"stages": ["m.login.email.identity"]}], out
    session = out["session"]
    status, refused = hs.request("POST", CS + "/register", {"auth": {"type": "m.login.dummy", "session": session}})
    assert status == 401
    sid, secret = validate(hs, sink, hs, "/register/email/requestToken", address)
    status, out = hs.request("POST", CS + "/register", {"auth": {
        "type": "m.login.email.identity", "session": session,
        "threepid_creds": {"sid": sid, "client_secret": secret}}})
    assert status == 200 and out["user_id"] == "@carol:localhost", out
    status, listed = hs.request("GET", CS + "/account/3pid", token=out["access_token"])
    assert [t["address"] for t in listed["threepids"]] == [address]


def test_outbox_survives_a_restart_and_sends_once(zhome_factory: Any) -> None:
    port = free_port()
    hs: ZhomeProcess = zhome_factory(overrides=email_overrides(port))
    hs.start()
    address = new_address()
    # No SMTP server yet: the mail waits in the outbox.
    status, out = request_token(hs, "/register/email/requestToken", address, "abc")
    assert status == 200, out
    time.sleep(1.5)
    hs.stop()
    assert not _where_stored(hs, address.split("@")[0]), _where_stored(hs, address.split("@")[0])
    sink = MailSink(port).start()
    try:
        hs.start()
        mails = sink.wait_for(address)
        time.sleep(3.0)  # a second copy would have come by now (backoff is at most 1 s)
        assert len(sink.to(address)) == 1
        assert "validation" in mails[0]["Subject"].lower() or "confirm" in mails[0]["Subject"].lower()
        hs.restart()
        time.sleep(2.0)
        assert len(sink.to(address)) == 1
        assert open_link(link_in(mails[0]))[0] == 200
    finally:
        sink.stop()


def test_addresses_are_never_stored_in_the_clear(hs: ZhomeProcess, sink: MailSink, tmp_path: Path) -> None:
    alice = ClientUser(hs, "alice")
    address = new_address()
    sid, secret = validate(hs, sink, alice, "/account/3pid/email/requestToken", address)
    assert add_3pid(alice, sid, secret)[0] == 200
    assert body_of(sink.to(address)[0])  # it really was mailed
    hs.stop()
    local = address.split("@")[0]
    assert _where_stored(hs, local) == []
    hs.start()
    assert [t["address"] for t in alice.ok("GET", "/account/3pid")["threepids"]] == [address]


def test_erasure_removes_the_address(hs: ZhomeProcess, sink: MailSink, tmp_path: Path) -> None:
    admin = Admin(hs, "root", tmp_path)
    alice = ClientUser(hs, "alice")
    address = new_address()
    sid, secret = validate(hs, sink, alice, "/account/3pid/email/requestToken", address)
    assert add_3pid(alice, sid, secret)[0] == 200
    user = admin.ok("GET", f"/_synapse/admin/v2/users/{q(alice.user_id)}")
    assert [(t["medium"], t["address"]) for t in user["threepids"]] == [("email", address)]
    admin.ok("POST", f"/_zhome/admin/v1/users/{q(alice.user_id)}/erase", {})
    user = admin.ok("GET", f"/_synapse/admin/v2/users/{q(alice.user_id)}")
    assert user["threepids"] == []
    # The address is free again.
    status, out = request_token(hs, "/register/email/requestToken", address, "abc")
    assert status == 200, out
    hs.stop()
    assert _where_stored(hs, address.split("@")[0]) == []


def test_admin_api_threepids(hs: ZhomeProcess, tmp_path: Path) -> None:
    admin = Admin(hs, "root", tmp_path)
    a, b = new_address(), new_address()
    out = admin.ok("PUT", f"/_synapse/admin/v2/users/{q('@dora:localhost')}", {
        "password": PASSWORD, "threepids": [{"medium": "email", "address": a.upper()}]}, status=201)
    assert [(t["medium"], t["address"]) for t in out["threepids"]] == [("email", a)]
    status, login = hs.request("POST", CS + "/login", {
        "type": "m.login.password", "identifier": {"type": "m.id.user", "user": "dora"}, "password": PASSWORD})
    listed = hs.request("GET", CS + "/account/3pid", token=login["access_token"])[1]["threepids"]
    assert [t["address"] for t in listed] == [a]
    out = admin.ok("PUT", f"/_synapse/admin/v2/users/{q('@dora:localhost')}", {
        "threepids": [{"medium": "email", "address": b}]})
    assert [t["address"] for t in out["threepids"]] == [b]
    # Another user cannot get dora's address; nothing of that request is written.
    status, err = admin.req("PUT", f"/_synapse/admin/v2/users/{q('@eve:localhost')}", {
        "password": PASSWORD, "threepids": [{"medium": "email", "address": b}]})
    assert status == 400 and err["errcode"] == "M_THREEPID_IN_USE", err
    assert admin.req("GET", f"/_synapse/admin/v2/users/{q('@eve:localhost')}")[0] == 404
    for bad in ([{"medium": "msisdn", "address": "123"}], [{"medium": "email"}], "x",
                [{"medium": "email", "address": "not an address"}]):
        status, err = admin.req("PUT", f"/_synapse/admin/v2/users/{q('@dora:localhost')}", {"threepids": bad})
        assert status == 400 and err["errcode"].startswith("M_"), (bad, status, err)
    # Deactivation removes the account's 3PIDs (and frees the address).
    admin.ok("POST", f"/_synapse/admin/v1/deactivate/{q('@dora:localhost')}", {})
    assert admin.ok("GET", f"/_synapse/admin/v2/users/{q('@dora:localhost')}")["threepids"] == []
    admin.ok("PUT", f"/_synapse/admin/v2/users/{q('@eve:localhost')}", {
        "password": PASSWORD, "threepids": [{"medium": "email", "address": b}]}, status=201)


def test_openid_token_and_userinfo(hs: ZhomeProcess) -> None:
    alice = ClientUser(hs, "alice")
    bob = ClientUser(hs, "bob")
    tok = alice.ok("POST", f"/user/{q(alice.user_id)}/openid/request_token", {})
    assert tok["token_type"] == "Bearer" and tok["matrix_server_name"] == "localhost" and tok["expires_in"] > 0
    status, info = hs.request("GET", "/_matrix/federation/v1/openid/userinfo?access_token="
                              + urllib.parse.quote(tok["access_token"]))
    assert status == 200 and info == {"sub": alice.user_id}
    status, err = hs.request("GET", "/_matrix/federation/v1/openid/userinfo?access_token=nope")
    assert status == 401 and err["errcode"] == "M_UNKNOWN_TOKEN"
    status, err = hs.request("GET", "/_matrix/federation/v1/openid/userinfo")
    assert status == 401 and err["errcode"] == "M_MISSING_TOKEN"
    status, err = bob.req("POST", f"/user/{q(alice.user_id)}/openid/request_token", {})
    assert status == 403 and err["errcode"] == "M_FORBIDDEN"
    # Deactivation ends the user's OpenID tokens.
    status, out = alice.req("POST", "/account/deactivate", {})
    alice.ok("POST", "/account/deactivate", {"auth": {"type": "m.login.password", "session": out["session"],
                                                     "identifier": {"type": "m.id.user", "user": alice.user_id},
                                                     "password": PASSWORD}})
    status, err = hs.request("GET", "/_matrix/federation/v1/openid/userinfo?access_token="
                             + urllib.parse.quote(tok["access_token"]))
    assert status == 401 and err["errcode"] == "M_UNKNOWN_TOKEN"


def test_bad_input_is_answered_with_matrix_errors(hs: ZhomeProcess) -> None:
    alice = ClientUser(hs, "alice")
    cases: list[tuple[str, str, Any, int, str]] = [
        ("POST", "/account/3pid/email/requestToken", {"client_secret": "a b", "email": "x@example.org",
                                                      "send_attempt": 1}, 400, "M_INVALID_PARAM"),
        ("POST", "/account/3pid/email/requestToken", {"client_secret": "abc", "email": "not-an-address",
                                                      "send_attempt": 1}, 400, "M_INVALID_PARAM"),
        ("POST", "/account/3pid/email/requestToken", {"client_secret": "abc", "email": "x@example.org",
                                                      "send_attempt": "1"}, 400, "M_BAD_JSON"),
        ("POST", "/account/3pid/email/requestToken", {"email": "x@example.org", "send_attempt": 1}, 400,
         "M_MISSING_PARAM"),
        ("POST", "/account/3pid/email/requestToken", {"client_secret": "abc", "email": "x@example.org",
                                                      "send_attempt": 1, "next_link": "javascript:x"},
         400, "M_INVALID_PARAM"),
        ("POST", "/account/3pid/msisdn/requestToken", {"client_secret": "abc", "country": "GB",
                                                       "phone_number": "123", "send_attempt": 1},
         400, "M_THREEPID_MEDIUM_NOT_SUPPORTED"),
        ("POST", "/register/msisdn/requestToken", {}, 400, "M_THREEPID_MEDIUM_NOT_SUPPORTED"),
        ("POST", "/account/3pid/add", {"sid": 5, "client_secret": "abc"}, 400, "M_MISSING_PARAM"),
        ("POST", "/account/3pid/add", {"sid": "abc", "client_secret": "a/b"}, 400, "M_INVALID_PARAM"),
        ("POST", "/account/3pid/delete", {"medium": "msisdn", "address": "1"}, 400,
         "M_THREEPID_MEDIUM_NOT_SUPPORTED"),
        ("POST", "/account/3pid/delete", {"address": "x@example.org"}, 400, "M_MISSING_PARAM"),
        ("POST", "/account/3pid/bind", {"sid": "a", "client_secret": "b"}, 400, "M_MISSING_PARAM"),
        ("POST", "/account/3pid/unbind", {"medium": "email", "address": 3}, 400, "M_MISSING_PARAM"),
        ("POST", "/account/3pid", {"three_pid_creds": {}}, 400, "M_UNRECOGNIZED"),
        ("POST", "/user/%40nobody/openid/request_token", {}, 400, "M_INVALID_PARAM"),
    ]
    for method, path, body, code, errcode in cases:
        status, out = alice.req(method, path, body)
        assert (status, out.get("errcode")) == (code, errcode), (path, body, status, out)
    status, out = alice.hs.request("POST", CS + "/account/3pid/email/requestToken", raw=b"{nope")
    assert status == 400 and out["errcode"] == "M_NOT_JSON"
    for query in ("", "?sid=a", "?sid=a&client_secret=b", "?sid=a&client_secret=b&token=c"):
        status, page = open_link(hs.base_url + "/_zhome/client/v1/validate/email/submitToken" + query)
        assert status == 400 and "<html>" in page, (query, status)
    status, out = hs.request("POST", "/_zhome/client/v1/validate/email/submitToken",
                             {"sid": "a", "client_secret": "b", "token": "c"})
    assert status == 400 and out["errcode"] == "M_THREEPID_AUTH_FAILED"
    # Unauthenticated calls that need a token.
    status, out = hs.request("GET", CS + "/account/3pid")
    assert status == 401 and out["errcode"] == "M_MISSING_TOKEN"


def test_without_email_config_the_medium_is_not_supported(zhome: ZhomeProcess) -> None:
    alice = ClientUser(zhome, "alice")
    status, out = alice.req("POST", "/account/3pid/email/requestToken",
                            {"client_secret": "abc", "email": "x@example.org", "send_attempt": 1})
    assert status == 400 and out["errcode"] == "M_THREEPID_MEDIUM_NOT_SUPPORTED"
    assert alice.ok("GET", "/capabilities")["capabilities"]["m.3pid_changes"] == {"enabled": False}
    # A password change without a token still needs one.
    status, out = zhome.request("POST", CS + "/account/password", {"new_password": "x"})
    assert status == 401 and out["errcode"] == "M_MISSING_TOKEN"


def test_validation_mails_are_rate_limited(zhome_factory: Any, sink: MailSink) -> None:
    hs: ZhomeProcess = zhome_factory(overrides=email_overrides(sink.port), rate_limits=True)
    hs.start()
    address = new_address()
    answers = [request_token(hs, "/register/email/requestToken", address, f"secret{i}")[0] for i in range(6)]
    assert answers[0] == 200 and 429 in answers, answers
    time.sleep(1.0)
    assert len(sink.to(address)) < 6
