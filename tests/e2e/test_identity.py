"""The Identity Service API zhome serves itself, end to end on both engines
with a real SMTP server on loopback: OpenID token to identity account,
validation by mail, binding, hashed lookup with the pepper, store-invite
and its mail, and inviting by email address: the m.room.third_party_invite,
then the bind that turns it into a real invite the user accepts."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import urllib.parse
from pathlib import Path
from typing import Any

import nio
import pytest

from tests.e2e.harness import CS, ClientUser, ZhomeProcess, q
from tests.e2e.mailsink import MailSink, link_in
from tests.e2e.test_erasure import _where_stored
from tests.e2e.test_threepids import email_overrides, new_address, open_link, sink  # noqa: F401 - sink: a fixture

IS = "/_matrix/identity/v2"


@pytest.fixture
def hs(zhome_factory: Any, sink: MailSink) -> ZhomeProcess:
    overrides = email_overrides(sink.port)
    overrides["identity_service"] = {"enabled": True}
    proc: ZhomeProcess = zhome_factory(overrides=overrides)
    return proc.start()


def id_server(hs: ZhomeProcess) -> str:
    return urllib.parse.urlsplit(hs.base_url).netloc


def is_account(hs: ZhomeProcess, user: ClientUser) -> str:
    openid = user.ok("POST", f"/user/{q(user.user_id)}/openid/request_token", {})
    status, out = hs.request("POST", IS + "/account/register", openid)
    assert status == 200 and out["token"], out
    return str(out["token"])


def lookup_hash(address: str, pepper: str) -> str:
    raw = hashlib.sha256(f"{address} email {pepper}".encode()).digest()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def is_validate(hs: ZhomeProcess, sink: MailSink, token: str, address: str) -> tuple[str, str]:
    secret = secrets.token_hex(8)
    before = len(sink.to(address))
    status, out = hs.request("POST", IS + "/validate/email/requestToken",
                             {"client_secret": secret, "email": address, "send_attempt": 1}, token=token)
    assert status == 200, out
    link = link_in(sink.wait_for(address, before + 1)[-1])
    assert link.startswith(hs.base_url + IS + "/validate/email/submitToken?")
    assert open_link(link)[0] == 200
    return out["sid"], secret


def test_register_validate_bind_lookup(hs: ZhomeProcess, sink: MailSink) -> None:
    status, out = hs.request("GET", IS)
    assert status == 200 and out == {}
    wk = hs.request("GET", "/.well-known/matrix/client")[1]
    assert wk["m.identity_server"]["base_url"] == hs.base_url
    alice = ClientUser(hs, "alice")
    token = is_account(hs, alice)
    assert hs.request("GET", IS + "/account", token=token)[1] == {"user_id": alice.user_id}
    assert hs.request("GET", IS + "/terms")[1] == {"policies": {}}
    assert hs.request("POST", IS + "/terms", {"user_accepts": []}, token=token)[0] == 200
    address = new_address()
    sid, secret = is_validate(hs, sink, token, address)
    status, v = hs.request("GET", IS + "/3pid/getValidated3pid?" + urllib.parse.urlencode(
        {"sid": sid, "client_secret": secret}), token=token)
    assert status == 200 and v["address"] == address and v["medium"] == "email", v
    # Bound through the homeserver's /account/3pid/bind, which calls the identity server over HTTP.
    alice.ok("POST", "/account/3pid/bind", {"sid": sid, "client_secret": secret, "id_server": id_server(hs),
                                            "id_access_token": token})
    details = hs.request("GET", IS + "/hash_details", token=token)[1]
    assert details["algorithms"] == ["sha256"] and details["lookup_pepper"]
    pepper = details["lookup_pepper"]
    other = new_address()
    status, found = hs.request("POST", IS + "/lookup", {"addresses": [lookup_hash(address, pepper),
                                                                     lookup_hash(other, pepper)],
                                                       "algorithm": "sha256", "pepper": pepper}, token=token)
    assert status == 200 and found == {"mappings": {lookup_hash(address, pepper): alice.user_id}}, found
    status, err = hs.request("POST", IS + "/lookup", {"addresses": [lookup_hash(address, pepper)],
                                                     "algorithm": "sha256", "pepper": "wrong"}, token=token)
    assert status == 400 and err["errcode"] == "M_INVALID_PEPPER" and err["lookup_pepper"] == pepper
    status, err = hs.request("POST", IS + "/lookup", {"addresses": [f"{address} email"], "algorithm": "none",
                                                     "pepper": pepper}, token=token)
    assert status == 400 and err["errcode"] == "M_INVALID_PARAM"
    # Nothing of the address in the clear on disk.
    hs.stop()
    assert _where_stored(hs, address.split("@")[0]) == []
    hs.start()
    assert hs.request("POST", IS + "/lookup", {"addresses": [lookup_hash(address, pepper)], "algorithm": "sha256",
                                              "pepper": pepper}, token=token)[1]["mappings"]
    # Deleting the 3PID on the homeserver unbinds it at the identity server it was bound to.
    out = alice.ok("POST", "/account/3pid/unbind", {"medium": "email", "address": address,
                                                    "id_server": id_server(hs)})
    assert out == {"id_server_unbind_result": "success"}
    assert hs.request("POST", IS + "/lookup", {"addresses": [lookup_hash(address, pepper)], "algorithm": "sha256",
                                              "pepper": pepper}, token=token)[1]["mappings"] == {}
    # Logged out: the account token is gone.
    assert hs.request("POST", IS + "/account/logout", {}, token=token)[0] == 200
    status, err = hs.request("GET", IS + "/account", token=token)
    assert status == 401 and err["errcode"] == "M_UNAUTHORIZED"


async def _nio_accept(base_url: str, name: str, room_id: str) -> None:
    client = nio.AsyncClient(base_url, name)
    try:
        login = await client.login("correct horse battery")
        assert isinstance(login, nio.LoginResponse), login
        sync = await client.sync(timeout=0)
        assert isinstance(sync, nio.SyncResponse), sync
        assert room_id in sync.rooms.invite, sync.rooms
        invite_state = sync.rooms.invite[room_id].invite_state
        assert any(isinstance(e, nio.InviteMemberEvent) and e.state_key == client.user_id
                   and e.membership == "invite" for e in invite_state), invite_state
        joined = await client.join(room_id)
        assert isinstance(joined, nio.JoinResponse), joined
    finally:
        await client.close()


def test_invite_by_email_then_bind_then_join(hs: ZhomeProcess, sink: MailSink) -> None:
    alice = ClientUser(hs, "alice")
    bob = ClientUser(hs, "bob")
    alice.ok("PUT", f"/profile/{q(alice.user_id)}/displayname", {"displayname": "Alice Adams"})
    room = alice.ok("POST", "/createRoom", {"preset": "private_chat", "name": "Ward 7"})["room_id"]
    token = is_account(hs, alice)
    address = new_address()
    alice.ok("POST", f"/rooms/{q(room)}/invite", {"id_server": id_server(hs), "id_access_token": token,
                                                  "medium": "email", "address": address})
    state = alice.ok("GET", f"/rooms/{q(room)}/state")
    tpi = [e for e in state if e["type"] == "m.room.third_party_invite"]
    assert len(tpi) == 1 and tpi[0]["sender"] == alice.user_id, tpi
    content = tpi[0]["content"]
    assert address not in str(content) and len(content["public_keys"]) == 2
    valid = hs.request("GET", IS + "/pubkey/isvalid?public_key=" + q(content["public_keys"][0]["public_key"]))
    assert valid == (200, {"valid": True})
    valid = hs.request("GET", IS + "/pubkey/ephemeral/isvalid?public_key="
                       + q(content["public_keys"][1]["public_key"]))
    assert valid == (200, {"valid": True})
    mail = sink.wait_for(address)[0]
    assert "Alice Adams" in mail["Subject"] and "Ward 7" in mail["Subject"], mail["Subject"]
    # A forged onbind (signed by a key the invitation does not list) invites nobody.
    from signedjson.key import generate_signing_key
    from signedjson.sign import sign_json

    forged = sign_json({"mxid": bob.user_id, "token": tpi[0]["state_key"]}, id_server(hs), generate_signing_key("0"))
    status, out = hs.request("PUT", "/_matrix/federation/v1/3pid/onbind", {
        "address": address, "medium": "email", "mxid": bob.user_id,
        "invites": [{"address": address, "medium": "email", "mxid": bob.user_id, "room_id": room,
                     "sender": alice.user_id, "signed": forged}]})
    assert status == 403 and out["errcode"] == "M_FORBIDDEN", out
    assert alice.req("GET", f"/rooms/{q(room)}/state/m.room.member/{q(bob.user_id)}")[0] == 404
    # Bob binds the address: the invitation becomes his invite.
    bob_token = is_account(hs, bob)
    sid, secret = is_validate(hs, sink, bob_token, address)
    status, assoc = hs.request("POST", IS + "/3pid/bind", {"sid": sid, "client_secret": secret, "mxid": bob.user_id},
                               token=bob_token)
    assert status == 200 and assoc["mxid"] == bob.user_id and assoc["address"] == address, assoc
    assert id_server(hs) in assoc["signatures"]
    member_ev = alice.ok("GET", f"/rooms/{q(room)}/state/m.room.member/{q(bob.user_id)}")
    assert member_ev["membership"] == "invite"
    assert member_ev["third_party_invite"]["signed"]["mxid"] == bob.user_id
    assert member_ev["third_party_invite"]["signed"]["token"] == tpi[0]["state_key"]
    # Bob's client (matrix-nio) sees the invite and accepts it.
    asyncio.run(_nio_accept(hs.base_url, "bob", room))
    assert alice.ok("GET", f"/rooms/{q(room)}/state/m.room.member/{q(bob.user_id)}")["membership"] == "join"
    # Inviting a bound address is an ordinary invite.
    carol = ClientUser(hs, "carol")
    carol_token = is_account(hs, carol)
    carol_address = new_address()
    sid, secret = is_validate(hs, sink, carol_token, carol_address)
    carol.ok("POST", "/account/3pid/bind", {"sid": sid, "client_secret": secret, "id_server": id_server(hs),
                                            "id_access_token": carol_token})
    alice.ok("POST", f"/rooms/{q(room)}/invite", {"id_server": id_server(hs), "id_access_token": token,
                                                  "medium": "email", "address": carol_address})
    ev = alice.ok("GET", f"/rooms/{q(room)}/state/m.room.member/{q(carol.user_id)}")
    assert ev["membership"] == "invite" and "third_party_invite" not in ev
    state = alice.ok("GET", f"/rooms/{q(room)}/state")
    assert len([e for e in state if e["type"] == "m.room.third_party_invite"]) == 1


def test_store_invite_and_signing(hs: ZhomeProcess, sink: MailSink) -> None:
    alice = ClientUser(hs, "alice")
    token = is_account(hs, alice)
    address = new_address()
    status, out = hs.request("POST", IS + "/store-invite", {
        "medium": "email", "address": address, "room_id": "!room:localhost", "sender": alice.user_id,
        "room_name": "Clinic", "sender_display_name": "Dr\nAlice"}, token=token)
    assert status == 200 and out["token"] and len(out["public_keys"]) == 2 and "@" in out["display_name"], out
    assert address not in out["display_name"]
    mail = sink.wait_for(address)[0]
    assert "Dr Alice" in mail["Subject"] and "Clinic" in mail["Subject"]
    import yaml

    key_path = yaml.safe_load(hs.config_path.read_text())["signing_key_path"]
    alg, version, _ = (Path(hs.config_path).parent / key_path).read_text().split()[:3]
    status, pk = hs.request("GET", IS + "/pubkey/" + q(f"{alg}:{version}"))
    assert status == 200 and pk["public_key"] == out["public_keys"][0]["public_key"], pk
    assert hs.request("GET", IS + "/pubkey/ed25519:nope")[0] == 404
    status, err = hs.request("POST", IS + "/sign-ed25519", {"mxid": alice.user_id, "token": out["token"],
                                                           "private_key": base64.b64encode(b"x" * 32).decode()
                                                           .rstrip("=")}, token=token)
    assert status == 403 and err["errcode"] == "M_FORBIDDEN", err
    status, err = hs.request("POST", IS + "/sign-ed25519", {"mxid": alice.user_id, "token": "unknown",
                                                           "private_key": "AAAA"}, token=token)
    assert status in (400, 404) and err["errcode"].startswith("M_")


def test_identity_bad_input(hs: ZhomeProcess) -> None:
    alice = ClientUser(hs, "alice")
    token = is_account(hs, alice)
    status, err = hs.request("POST", IS + "/account/register", {"access_token": "nope",
                                                               "matrix_server_name": "localhost",
                                                               "token_type": "Bearer", "expires_in": 60})
    assert status == 401 and err["errcode"] == "M_UNKNOWN_TOKEN"
    status, err = hs.request("POST", IS + "/account/register", {"token_type": "Bearer"})
    assert status == 400 and err["errcode"].startswith("M_")
    for method, path in (("GET", "/account"), ("GET", "/hash_details"), ("POST", "/lookup"),
                         ("POST", "/validate/email/requestToken"), ("POST", "/3pid/bind"),
                         ("POST", "/store-invite"), ("GET", "/3pid/getValidated3pid")):
        status, err = hs.request(method, IS + path, {} if method == "POST" else None)
        assert status == 401 and err["errcode"] == "M_UNAUTHORIZED", (path, status, err)
    cases: list[tuple[str, str, Any, int, str]] = [
        ("POST", "/lookup", {"addresses": "x", "algorithm": "sha256", "pepper": "p"}, 400, "M_BAD_JSON"),
        ("POST", "/lookup", {"addresses": ["x"] * 1001, "algorithm": "sha256", "pepper": "p"}, 400, "M_TOO_LARGE"),
        ("POST", "/validate/email/requestToken", {"client_secret": "abc", "email": "nope", "send_attempt": 1},
         400, "M_INVALID_EMAIL"),
        ("POST", "/validate/msisdn/requestToken", {"client_secret": "abc", "country": "GB", "phone_number": "1",
                                                   "send_attempt": 1}, 400, "M_THREEPID_MEDIUM_NOT_SUPPORTED"),
        ("POST", "/3pid/bind", {"sid": "abc", "client_secret": "def", "mxid": alice.user_id}, 404,
         "M_NO_VALID_SESSION"),
        ("POST", "/3pid/bind", {"sid": "abc", "client_secret": "def", "mxid": "@someone:else"}, 403, "M_FORBIDDEN"),
        ("POST", "/3pid/bind", {"sid": "abc", "client_secret": "def", "mxid": "nope"}, 400, "M_INVALID_PARAM"),
        ("POST", "/3pid/unbind", {"mxid": alice.user_id, "threepid": {"medium": "email",
                                                                      "address": "a@example.org"}},
         403, "M_FORBIDDEN"),
        ("POST", "/store-invite", {"medium": "msisdn", "address": "1", "room_id": "!r:localhost",
                                   "sender": alice.user_id}, 400, "M_THREEPID_MEDIUM_NOT_SUPPORTED"),
        ("POST", "/store-invite", {"medium": "email", "address": "a@example.org", "room_id": "room",
                                   "sender": alice.user_id}, 400, "M_MISSING_PARAM"),
        ("POST", "/sign-ed25519", {"mxid": alice.user_id}, 400, "M_MISSING_PARAM"),
    ]
    for method, path, body, code, errcode in cases:
        status, out = hs.request(method, IS + path, body, token=token)
        assert (status, out.get("errcode")) == (code, errcode), (path, status, out)
    status, err = hs.request("GET", IS + "/3pid/getValidated3pid?sid=abc&client_secret=def", token=token)
    assert status == 404 and err["errcode"] == "M_NO_VALID_SESSION"
    status, err = hs.request("GET", IS + "/pubkey/isvalid")
    assert status == 400 and err["errcode"] == "M_MISSING_PARAM"
    # Client invites by email with bad parameters.
    room = alice.ok("POST", "/createRoom", {})["room_id"]
    for body, errcode in (({"id_server": id_server(hs), "medium": "email", "address": "a@example.org"},
                           "M_MISSING_PARAM"),
                          ({"id_server": id_server(hs), "id_access_token": token, "medium": "msisdn",
                            "address": "1"}, "M_THREEPID_MEDIUM_NOT_SUPPORTED"),
                          ({"id_server": "a/b", "id_access_token": token, "medium": "email",
                            "address": "a@example.org"}, "M_INVALID_PARAM"),
                          ({"id_server": id_server(hs), "id_access_token": "wrong", "medium": "email",
                            "address": "a@example.org"}, "M_UNAUTHORIZED")):
        status, out = alice.req("POST", f"/rooms/{q(room)}/invite", body)
        assert status in (400, 403) and out["errcode"] == errcode, (body, status, out)
    status, out = hs.request("PUT", "/_matrix/federation/v1/3pid/onbind", {"mxid": "@x:elsewhere", "invites": []})
    assert status == 403
    status, out = hs.request("PUT", "/_matrix/federation/v1/3pid/onbind", {"mxid": alice.user_id, "invites": 3})
    assert status == 400 and out["errcode"] == "M_BAD_JSON"
