"""Email notifications of missed messages, per room (zhome/push/email_notify.py),
against a real ``zhome run`` with an SMTP sink (aiosmtpd) as its relay.

The user validates an address the way a client does (/account/3pid), then
turns mails on with an email pusher (all rooms) or a room's account data;
messages left unread for ``email.notif_delay_ms`` are mailed, read ones and
rooms turned off are not.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import pytest

from tests.e2e.harness import ClientUser, ZhomeProcess, q
from tests.e2e.mailsink import MailSink, body_of
from tests.e2e.test_threepids import add_3pid, email_overrides, new_address, sink, validate  # noqa: F401

SETTING = "org.zhome.email_notifications"


@pytest.fixture
def hs(zhome_factory: Any, sink: MailSink) -> Iterator[ZhomeProcess]:  # noqa: F811 - the sink fixture
    proc: ZhomeProcess = zhome_factory(overrides=email_overrides(
        sink.port, notif_delay_ms=700, notif_min_interval_ms=0))
    yield proc.start()


def user_with_address(hs: ZhomeProcess, sink: MailSink, name: str) -> tuple[ClientUser, str]:
    user = ClientUser(hs, name)
    address = new_address()
    sid, secret = validate(hs, sink, user, "/account/3pid/email/requestToken", address)
    status, out = add_3pid(user, sid, secret)
    assert status == 200, out
    return user, address


def email_pusher(address: str) -> dict[str, Any]:
    return {"kind": "email", "app_id": "m.email", "pushkey": address, "app_display_name": "Email",
            "device_display_name": address, "lang": "en", "data": {}}


def mails_to(sink: MailSink, address: str, before: int, settle_s: float = 3.0) -> list[Any]:
    """Every mail to ``address`` after the first ``before``, once none came for a while."""
    deadline = time.monotonic() + 20
    last, seen = time.monotonic(), len(sink.to(address))
    while time.monotonic() < deadline:
        now = len(sink.to(address))
        if now != seen:
            seen, last = now, time.monotonic()
        if time.monotonic() - last > settle_s:
            break
        time.sleep(0.1)
    return sink.to(address)[before:]


def test_missed_messages_are_mailed_per_room(hs: ZhomeProcess, sink: MailSink) -> None:
    alice, address = user_with_address(hs, sink, "alice")
    validation_mails = len(sink.to(address))
    bob = ClientUser(hs, "bob")
    bob.ok("PUT", "/profile/" + q(bob.user_id) + "/displayname", {"displayname": "Bob Baker"})
    rooms = {}
    for name in ("Ward 3", "Pharmacy", "Lunch"):
        rid = bob.ok("POST", "/createRoom", {"preset": "private_chat", "name": name, "is_direct": False})["room_id"]
        bob.ok("POST", f"/rooms/{q(rid)}/invite", {"user_id": alice.user_id})
        alice.ok("POST", f"/join/{q(rid)}", {})
        rooms[name] = rid

    # Off by default: nothing is mailed without a pusher or a room setting.
    bob.ok("PUT", f"/rooms/{q(rooms['Ward 3'])}/send/m.room.message/t0", {"msgtype": "m.text", "body": "early"})
    assert mails_to(sink, address, validation_mails, settle_s=2.0) == []

    # One room turned on.
    alice.ok("PUT", f"/user/{q(alice.user_id)}/rooms/{q(rooms['Ward 3'])}/account_data/{SETTING}", {"enabled": True})
    bob.ok("PUT", f"/rooms/{q(rooms['Ward 3'])}/send/m.room.message/t1",
           {"msgtype": "m.text", "body": "Could you check the chart of bed 4?"})
    bob.ok("PUT", f"/rooms/{q(rooms['Pharmacy'])}/send/m.room.message/t2",
           {"msgtype": "m.text", "body": "Not for the mail: this room is off"})
    got = mails_to(sink, address, validation_mails)
    assert len(got) == 1, [body_of(m) for m in got]
    text = body_of(got[0])
    assert "Ward 3" in str(got[0]["Subject"])
    assert "Bob Baker: Could you check the chart of bed 4?" in text
    assert "this room is off" not in text and "early" not in text
    assert f"#/room/{rooms['Ward 3']}" in text

    # An email pusher: every room, but one turned off, and read ones not.
    alice.ok("POST", "/pushers/set", email_pusher(address))
    alice.ok("PUT", f"/user/{q(alice.user_id)}/rooms/{q(rooms['Lunch'])}/account_data/{SETTING}", {"enabled": False})
    read = bob.ok("PUT", f"/rooms/{q(rooms['Ward 3'])}/send/m.room.message/t3",
                  {"msgtype": "m.text", "body": "Already read by Alice"})["event_id"]
    alice.ok("POST", f"/rooms/{q(rooms['Ward 3'])}/receipt/m.read/{q(read)}", {})
    bob.ok("PUT", f"/rooms/{q(rooms['Pharmacy'])}/send/m.room.message/t4",
           {"msgtype": "m.text", "body": "The order for ward 3 is ready"})
    bob.ok("PUT", f"/rooms/{q(rooms['Lunch'])}/send/m.room.message/t5", {"msgtype": "m.text", "body": "Pizza?"})
    got = mails_to(sink, address, validation_mails + 1)
    assert len(got) == 1, [body_of(m) for m in got]
    text = body_of(got[0])
    assert "Bob Baker: The order for ward 3 is ready" in text
    assert "Pizza" not in text and "Already read" not in text

    # Restarted: nothing is mailed twice.
    hs.restart()
    assert mails_to(sink, address, validation_mails + 2, settle_s=2.5) == []


def test_email_pushers_need_a_validated_address(hs: ZhomeProcess, sink: MailSink) -> None:
    alice, address = user_with_address(hs, sink, "alice")
    status, err = alice.req("POST", "/pushers/set", email_pusher(new_address()))
    assert status == 400 and err["errcode"] == "M_THREEPID_NOT_FOUND", err
    status, err = alice.req("POST", "/pushers/set", {**email_pusher(address), "app_id": "org.example"})
    assert status == 400 and err["errcode"] == "M_INVALID_PARAM", err
    alice.ok("POST", "/pushers/set", email_pusher(address))
    assert [p["kind"] for p in alice.ok("GET", "/pushers")["pushers"]] == ["email"]


def test_a_server_without_mail_takes_no_email_pusher(zhome: ZhomeProcess) -> None:
    carol = ClientUser(zhome, "carol")
    status, err = carol.req("POST", "/pushers/set", email_pusher("carol@example.org"))
    assert status == 400 and err["errcode"] == "M_THREEPID_MEDIUM_NOT_SUPPORTED", err
