"""GET /voip/turnServer through a real zhome on SQLite and PostgreSQL.

Spec: client-server-api "Voice over IP" ("TURN server"); the credentials
follow the TURN REST API convention (coturn's static-auth-secret).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Any

from tests.e2e.harness import CS, ClientUser, ZhomeProcess

URIS = ["turn:turn.example.org:3478?transport=udp", "turns:turn.example.org:5349?transport=tcp"]
SECRET = "shared-with-the-turn-server"


def test_no_turn_server_configured(zhome: ZhomeProcess) -> None:
    u = ClientUser(zhome, "caller")
    status, body = u.req("GET", "/voip/turnServer")
    assert status == 404 and body["errcode"] == "M_NOT_FOUND", (status, body)
    status, body = zhome.request("GET", CS + "/voip/turnServer")
    assert status == 401 and body["errcode"] == "M_MISSING_TOKEN", (status, body)


def test_shared_secret_credentials(zhome_factory: Any) -> None:
    hs = zhome_factory(overrides={"voip": {"turn_uris": URIS, "turn_shared_secret": SECRET,
                                           "turn_user_lifetime_ms": 600_000},
                                  "registration": {"allow_guest_access": True}}).start()
    u = ClientUser(hs, "caller")
    before = int(time.time())
    body = u.ok("GET", "/voip/turnServer")
    after = int(time.time())
    assert body["uris"] == URIS and body["ttl"] == 600
    expiry, user_id = body["username"].split(":", 1)
    assert user_id == u.user_id
    assert before + 600 <= int(expiry) <= after + 600
    # What the TURN server computes from the username with the same secret.
    expected = base64.b64encode(hmac.new(SECRET.encode(), body["username"].encode(), hashlib.sha1).digest()).decode()
    assert body["password"] == expected
    # The r0 path is the same endpoint.
    assert hs.request("GET", "/_matrix/client/r0/voip/turnServer", token=u.token)[1]["uris"] == URIS

    # Guests may call too (turn_allow_guests defaults to true).
    status, reg = hs.request("POST", CS + "/register?kind=guest", {})
    assert status == 200, reg
    status, body = hs.request("GET", CS + "/voip/turnServer", token=reg["access_token"])
    assert status == 200 and body["username"].endswith(":" + reg["user_id"]), body


def test_fixed_credentials_and_no_guests(zhome_factory: Any) -> None:
    hs = zhome_factory(overrides={"voip": {"turn_uris": URIS[:1], "turn_username": "calls",
                                           "turn_password": "pa55", "turn_allow_guests": False},
                                  "registration": {"allow_guest_access": True}}).start()
    u = ClientUser(hs, "caller")
    assert u.ok("GET", "/voip/turnServer") == {"username": "calls", "password": "pa55", "uris": URIS[:1],
                                                "ttl": 3600}
    status, reg = hs.request("POST", CS + "/register?kind=guest", {})
    assert status == 200, reg
    status, body = hs.request("GET", CS + "/voip/turnServer", token=reg["access_token"])
    assert status == 403 and body["errcode"] == "M_GUEST_ACCESS_FORBIDDEN", (status, body)
