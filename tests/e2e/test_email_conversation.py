"""The whole conversation by email, end to end, against a real ``zhome run``
(the email bridge in its process, the identity service on, an aiosmtpd
sink as the relay, a DNS server on loopback for the sender checks):

a user invites an address the way a client does (identity service); the
invitee gets the invitation and replies twice, the second a reply to a
specific message (a Matrix reply); the user sends text and an image, which
reach the invitee as one mail with the image; zhome is killed and started
again in the middle; the invitee registers through the link and is in the
room with its history. Nothing is lost or doubled.
"""

from __future__ import annotations

import email.policy
import email.utils
import smtplib
import sqlite3
import time
from email.message import EmailMessage
from typing import Any

from tests.e2e.dnsstub import DnsStub
from tests.e2e.harness import ClientUser, ZhomeProcess, free_port, q
from tests.e2e.mailsink import MailSink, body_of
from tests.e2e.test_email_bridge import dns, ghost, wait_for  # noqa: F401 - dns: a fixture
from tests.e2e.test_email_invitation import (
    invite_by_email, login, mail_for, register_link, register_through, sink,  # noqa: F401 - sink: a fixture
)
from tests.e2e.test_threepids import email_overrides, new_address

DOMAIN = "mail.test"


def send_mail(port: int, address: str, rcpt: str, text: str, in_reply_to: str | None = None) -> str:
    msg = EmailMessage()
    msg["From"] = f"Dr. Invitee <{address}>"
    msg["To"] = rcpt
    msg["Subject"] = "Re: the ward"
    mid = email.utils.make_msgid(domain="example.org")
    msg["Message-ID"] = mid
    msg["Date"] = email.utils.formatdate()
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
        msg["References"] = in_reply_to
    msg.set_content(text + "\n\nOn a day, someone wrote:\n> earlier text\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        assert s.sendmail(address, [rcpt], msg.as_bytes(policy=email.policy.SMTP)) == {}
    return mid


def test_the_whole_conversation(zhome_factory: Any, sink: MailSink, dns: DnsStub) -> None:  # noqa: F811
    smtp_port = free_port()
    overrides = email_overrides(sink.port)
    overrides["identity_service"] = {"enabled": True}
    overrides["email_bridge"] = {"enabled": True, "mail_domain": DOMAIN, "smtp_listen": f"127.0.0.1:{smtp_port}",
                                 "appservice_listen": f"127.0.0.1:{free_port()}", "quiet_period_ms": 1500,
                                 "dns_servers": [dns.address]}
    hs: ZhomeProcess = zhome_factory(overrides=overrides).start()
    alice = ClientUser(hs, "alice")
    room = alice.ok("POST", "/createRoom", {"preset": "private_chat", "name": "Ward 5"})["room_id"]
    alice.ok("PUT", f"/rooms/{q(room)}/send/m.room.message/h1", {"msgtype": "m.text", "body": "History first"})
    address = new_address()
    g = ghost(address)

    # 1. The invitation, through the identity service as a client does it.
    invite_by_email(alice, hs, room, address)
    invitation = mail_for(sink, address, "Ward 5", 1)
    reply_to = email.utils.parseaddr(str(invitation["Reply-To"]))[1]
    link = register_link(invitation)

    def messages() -> list[dict[str, Any]]:
        chunk = alice.ok("GET", f"/rooms/{q(room)}/messages?dir=f&limit=100")["chunk"]
        return [e for e in chunk if e["type"] == "m.room.message"]

    # 2. The first reply: the ghost claims the invitation, joins, posts.
    send_mail(smtp_port, address, reply_to, "Happy to help with bed 4")
    first = wait_for(lambda: next((e for e in messages() if e["sender"] == g), None), "the first reply")
    assert first["content"]["body"] == "Happy to help with bed 4"

    # 3. Alice answers with a question; the invitee answers that very message.
    question = alice.ok("PUT", f"/rooms/{q(room)}/send/m.room.message/a1", {
        "msgtype": "m.text", "body": "Which dose do you suggest?"})["event_id"]
    asked = wait_for(lambda: [m for m in sink.to(address) if "Which dose" in body_of(m)], "the question by mail")[0]
    send_mail(smtp_port, address, str(asked["Reply-To"]), "5 mg twice a day", in_reply_to=str(asked["Message-ID"]))
    second = wait_for(lambda: next((e for e in messages() if e["sender"] == g
                                    and e["content"]["body"] == "5 mg twice a day"), None), "the second reply")
    assert second["content"]["m.relates_to"]["m.in_reply_to"]["event_id"] == question

    # 4. Text and an image within the quiet period: one mail with both; zhome
    #    is killed before that mail is due and started again.
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    status, up = hs.request("POST", "/_matrix/media/v3/upload?filename=chart.png", raw=png, token=alice.token,
                            headers={"Content-Type": "image/png"})
    assert status == 200, up
    before = len(sink.to(address))
    text = alice.ok("PUT", f"/rooms/{q(room)}/send/m.room.message/a2",
                    {"msgtype": "m.text", "body": "Here is the chart"})["event_id"]
    image = alice.ok("PUT", f"/rooms/{q(room)}/send/m.room.message/a3", {
        "msgtype": "m.image", "body": "chart.png", "url": up["content_uri"],
        "info": {"mimetype": "image/png", "size": len(png)}})["event_id"]
    # Both wait in the bridge's queue (the room is not quiet long enough
    # yet) when the process dies.
    queue = hs.workdir / "data" / "email_bridge.db"

    def queued() -> bool:
        with sqlite3.connect(queue) as conn:
            rows = conn.execute("SELECT event_id FROM outbound_events").fetchall()
        return {text, image} <= {r[0] for r in rows}
    wait_for(queued, "both messages in the bridge's queue", timeout=10)
    hs.restart(kill=True)
    coalesced = sink.wait_for(address, before + 1, timeout=60)[before]
    assert "Here is the chart" in body_of(coalesced)
    atts = list(coalesced.iter_attachments())
    assert len(atts) == 1 and atts[0].get_content() == png, [body_of(m) for m in sink.to(address)[before:]]
    time.sleep(3)
    assert len(sink.to(address)) == before + 1, "a mail went twice"

    # 5. The invitee registers through the link: a full member with the history.
    register_through(link, "invitee")
    user_id = f"@invitee:{hs.server_name}"
    token = login(hs, "invitee")
    status, member = hs.request("GET", f"/_matrix/client/v3/rooms/{q(room)}/state/m.room.member/{q(user_id)}",
                                token=token)
    assert status == 200 and member["membership"] == "join"
    assert alice.ok("GET", f"/rooms/{q(room)}/state/m.room.member/{q(g)}")["membership"] == "leave"
    status, out = hs.request("GET", f"/_matrix/client/v3/rooms/{q(room)}/messages?dir=f&limit=100", token=token)
    bodies = [e["content"].get("body") for e in out["chunk"] if e["type"] == "m.room.message"]
    want = ["History first", "Happy to help with bed 4", "Which dose do you suggest?", "5 mg twice a day",
            "Here is the chart", "chart.png"]
    assert [b for b in bodies if b in want] == want, bodies
