"""Mail about missed messages, per room, end to end: a real ``zhome run``,
mail caught by an aiosmtpd sink."""

from __future__ import annotations

import time
from typing import Any, Iterator

import pytest

from tests.e2e.harness import ClientUser, ZhomeProcess, free_port, q
from tests.e2e.mailsink import MailSink, body_of
from tests.e2e.test_threepids import add_3pid, email_overrides, new_address, validate

SETTING = "org.zhome.email_notifications"


@pytest.fixture
def sink() -> Iterator[MailSink]:
    s = MailSink(free_port()).start()
    try:
        yield s
    finally:
        s.stop()


def test_missed_messages_mailed_per_room(zhome_factory: Any, sink: MailSink) -> None:
    hs: ZhomeProcess = zhome_factory(overrides=email_overrides(
        sink.port, missed_messages_delay_ms=1000, missed_messages_interval_ms=200)).start()
    alice, bob = ClientUser(hs, "alice"), ClientUser(hs, "bob")
    address = new_address()
    sid, secret = validate(hs, sink, bob, "/account/3pid/email/requestToken", address)
    assert add_3pid(bob, sid, secret)[0] == 200
    on = alice.ok("POST", "/createRoom", {"preset": "public_chat", "name": "Ward 5"})["room_id"]
    off = alice.ok("POST", "/createRoom", {"preset": "public_chat", "name": "Ward 6"})["room_id"]
    for r in (on, off):
        bob.ok("POST", f"/join/{q(r)}", {})
    bob.ok("PUT", f"/user/{q(bob.user_id)}/rooms/{q(on)}/account_data/{SETTING}", {"enabled": True})
    time.sleep(1.0)  # the mailer has seen the setting
    before = len(sink.to(address))
    for r in (on, off):
        alice.ok("PUT", f"/rooms/{q(r)}/send/m.room.message/m1", {"msgtype": "m.text", "body": "secret words"})
    mails = sink.wait_for(address, before + 1)
    mail = mails[-1]
    assert "Ward 5" in str(mail["Subject"]) and "1 unread message" in str(mail["Subject"]), mail["Subject"]
    text = body_of(mail)
    assert alice.user_id in text and "secret words" not in text and q(on).replace("%21", "!") in text
    # Read messages are not mailed; the room without the setting never is.
    ev = alice.ok("PUT", f"/rooms/{q(on)}/send/m.room.message/m2", {"msgtype": "m.text", "body": "more"})
    bob.ok("POST", f"/rooms/{q(on)}/receipt/m.read/{q(ev['event_id'])}", {})
    time.sleep(2.5)
    assert len(sink.to(address)) == before + 1, [m["Subject"] for m in sink.to(address)]
    # A restart does not mail again.
    hs.restart()
    time.sleep(1.0)
    assert len(sink.to(address)) == before + 1
