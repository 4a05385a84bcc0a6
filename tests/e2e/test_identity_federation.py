"""Third-party invites across servers, on both engines: the identity
service of server A registers a user of server B by B's OpenID token
(federation openid/userinfo), an invitation by email to a room on A is
bound by that user of B, A's identity service calls 3pid/onbind on B, B
asks A with exchange_third_party_invite, and A's invite reaches B's user,
who joins over federation."""

from __future__ import annotations

import time
import urllib.parse
from typing import Any, Callable

from tests.e2e.conftest import ZhomeServers
from tests.e2e.harness import ClientUser, free_port, q
from tests.e2e.mailsink import MailSink
from tests.e2e.test_identity import IS, is_validate
from tests.e2e.test_threepids import email_overrides, new_address


def _wait(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_invite_by_email_to_a_user_of_another_server(zhome_pair: ZhomeServers) -> None:
    sink = MailSink(free_port()).start()
    try:
        overrides = email_overrides(sink.port)
        overrides["identity_service"] = {"enabled": True}
        a = zhome_pair.spawn("127.0.0.4", "ida", overrides=overrides)
        b = zhome_pair.b
        alice = ClientUser(a, "alice")
        bob = ClientUser(b, "bob")
        id_server = urllib.parse.urlsplit(a.base_url).netloc
        room = alice.ok("POST", "/createRoom", {"preset": "private_chat", "name": "Cross"})["room_id"]
        openid = alice.ok("POST", f"/user/{q(alice.user_id)}/openid/request_token", {})
        token = a.request("POST", IS + "/account/register", openid)[1]["token"]
        address = new_address()
        alice.ok("POST", f"/rooms/{q(room)}/invite", {"id_server": id_server, "id_access_token": token,
                                                      "medium": "email", "address": address})
        assert sink.wait_for(address)
        # Bob of server B: an identity account on A from B's OpenID token.
        openid = bob.ok("POST", f"/user/{q(bob.user_id)}/openid/request_token", {})
        assert openid["matrix_server_name"] == b.server_name
        status, out = a.request("POST", IS + "/account/register", openid)
        assert status == 200, out
        bob_token = out["token"]
        assert a.request("GET", IS + "/account", token=bob_token)[1] == {"user_id": bob.user_id}
        sid, secret = is_validate(a, sink, bob_token, address)
        # Bob's client binds at A's identity service itself (B would reach an
        # identity server only over HTTPS, which A's test listener is not).
        status, out = a.request("POST", IS + "/3pid/bind", {"sid": sid, "client_secret": secret,
                                                            "mxid": bob.user_id}, token=bob_token)
        assert status == 200 and out["mxid"] == bob.user_id, out

        def invited() -> Any:
            sync = bob.ok("GET", "/sync?timeout=1000")
            return sync["rooms"].get("invite", {}).get(room)

        _wait("the invite on B", invited)
        member = alice.ok("GET", f"/rooms/{q(room)}/state/m.room.member/{q(bob.user_id)}")
        assert member["membership"] == "invite" and member["third_party_invite"]["signed"]["mxid"] == bob.user_id
        bob.ok("POST", f"/join/{q(room)}", {})
        _wait("bob joined on A", lambda: alice.ok(
            "GET", f"/rooms/{q(room)}/state/m.room.member/{q(bob.user_id)}")["membership"] == "join")
    finally:
        sink.stop()
