"""Invitations by email with the two ways in, end to end: a real ``zhome
run`` with the identity service and the email bridge on, mail caught by an
aiosmtpd sink, replies sent with smtplib, the registration page driven with
urllib as a browser would (a GET, then a form POST).
"""

from __future__ import annotations

import email.policy
import email.utils
import re
import smtplib
import urllib.error
import urllib.parse
import urllib.request
from email.message import EmailMessage
from typing import Any

from tests.e2e.harness import ClientUser, ZhomeProcess, free_port, q
from tests.e2e.mailsink import MailSink, body_of
from tests.e2e.dnsstub import DnsStub
from tests.e2e.test_email_bridge import dns, ghost, wait_for  # noqa: F401 - dns: the senders' DNS (a fixture)
from tests.e2e.test_identity import id_server, is_account
from tests.e2e.test_threepids import email_overrides, new_address, sink  # noqa: F401 - sink: a fixture

DOMAIN = "mail.test"
PASSWORD = "a long enough password"


def http(url: str, form: dict[str, str] | None = None) -> tuple[int, str, Any]:
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if form is not None else "GET")
    if data is not None:
        req.add_header("Content-Type", "application/x-www-form-urlencoded")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), e.headers


def register_link(msg: EmailMessage) -> str:
    m = re.search(r"(https?://\S+/_zhome/register/invitation\?t=\S+)", body_of(msg))
    assert m, body_of(msg)
    return m.group(1)


def invite_by_email(alice: ClientUser, hs: ZhomeProcess, room: str, address: str) -> None:
    token = is_account(hs, alice)
    alice.ok("POST", f"/rooms/{q(room)}/invite", {"id_server": id_server(hs), "id_access_token": token,
                                                  "medium": "email", "address": address})


def mail_for(sink: MailSink, address: str, room_name: str, count: int) -> EmailMessage:
    mails = sink.wait_for(address, count)
    return next(m for m in mails if room_name in str(m["Subject"]))


def rcpt_code(port: int, mail_from: str, rcpt: str) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        assert s.mail(mail_from)[0] == 250
        return s.rcpt(rcpt)[0]


def register_through(link: str, username: str) -> tuple[int, str]:
    status, page, headers = http(link)
    assert status == 200, page
    assert "default-src 'none'" in headers["Content-Security-Policy"] and "<script" not in page
    token = urllib.parse.parse_qs(urllib.parse.urlsplit(link).query)["t"][0]
    assert f'name="t" value="{token}"' in page
    post_url = link.split("?", 1)[0]
    # Bad input: the page again, with 400.
    status, page, _ = http(post_url, {"t": token, "username": username, "password": PASSWORD, "password2": "x"})
    assert status == 400 and "differ" in page
    status, page, _ = http(post_url, {"t": token, "username": "alice", "password": PASSWORD,
                                      "password2": PASSWORD})
    assert status == 400 and "M_USER_IN_USE" in page
    status, page, _ = http(post_url, {"t": token, "username": "<b>", "password": PASSWORD, "password2": PASSWORD})
    assert status == 400 and "M_INVALID_USERNAME" in page and "<b>" not in page
    status, page, _ = http(post_url, {"t": token, "username": username, "password": PASSWORD,
                                      "password2": PASSWORD})
    assert status == 200, page
    # Single use.
    again = http(post_url, {"t": token, "username": username + "x", "password": PASSWORD, "password2": PASSWORD})
    assert again[0] == 403
    assert http(link)[0] == 403
    return status, page


def login(hs: ZhomeProcess, username: str) -> str:
    status, out = hs.request("POST", "/_matrix/client/v3/login", {
        "type": "m.login.password", "identifier": {"type": "m.id.user", "user": username}, "password": PASSWORD})
    assert status == 200, out
    return str(out["access_token"])


def test_invitation_reply_then_register(zhome_factory: Any, sink: MailSink, dns: DnsStub) -> None:  # noqa: F811
    smtp_port = free_port()
    overrides = email_overrides(sink.port)
    overrides["identity_service"] = {"enabled": True}
    overrides["email_bridge"] = {"enabled": True, "mail_domain": DOMAIN, "smtp_listen": f"127.0.0.1:{smtp_port}",
                                 "appservice_listen": f"127.0.0.1:{free_port()}", "quiet_period_ms": 0,
                                 "dns_servers": [dns.address]}
    hs: ZhomeProcess = zhome_factory(overrides=overrides).start()
    alice = ClientUser(hs, "alice")
    alice.ok("PUT", f"/profile/{q(alice.user_id)}/displayname", {"displayname": "Alice Adams"})
    room = alice.ok("POST", "/createRoom", {"preset": "private_chat", "name": "Ward 7"})["room_id"]
    other = alice.ok("POST", "/createRoom", {"preset": "private_chat", "name": "Ward 9"})["room_id"]
    alice.ok("PUT", f"/rooms/{q(room)}/send/m.room.message/t1", {"msgtype": "m.text", "body": "before you came"})
    address = new_address()
    invite_by_email(alice, hs, room, address)
    invite_by_email(alice, hs, other, address)
    # An encrypted room: the bridge cannot read it, so the mail offers
    # only an account (and says why).
    secret = alice.ok("POST", "/createRoom", {"preset": "private_chat", "name": "Ward 11", "initial_state": [
        {"type": "m.room.encryption", "state_key": "", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}]})["room_id"]
    invite_by_email(alice, hs, secret, address)
    sealed = mail_for(sink, address, "Ward 11", 3)
    assert sealed["Reply-To"] is None and "end-to-end encrypted" in body_of(sealed)
    assert "/_zhome/register/invitation?t=" in body_of(sealed)
    msg = mail_for(sink, address, "Ward 7", 3)
    assert "Alice Adams" in str(msg["Subject"])
    reply_to = email.utils.parseaddr(str(msg["Reply-To"]))[1]
    assert re.fullmatch(r"invite\+[0-9a-f]{32}\.[a-z2-7]{20}@" + re.escape(DOMAIN), reply_to), reply_to
    link = register_link(msg)
    assert link.startswith(hs.base_url + "/_zhome/register/invitation?t=")
    assert "reply" in body_of(msg).lower()
    # The reply address is for the invited address only, and cannot be forged.
    assert rcpt_code(smtp_port, "mallory@example.net", reply_to) == 550
    local, _, domain = reply_to.partition("@")
    tampered = local[:-1] + ("a" if local[-1] != "a" else "b") + "@" + domain
    assert rcpt_code(smtp_port, address, tampered) == 550
    # Reply way: the ghost claims the invitation, joins and posts the reply.
    reply = EmailMessage()
    reply["From"] = f"Invited Person <{address}>"
    reply["To"] = reply_to
    reply["Subject"] = "Re: " + str(msg["Subject"])
    reply["Message-ID"] = email.utils.make_msgid(domain="example.org")
    reply["Date"] = email.utils.formatdate()
    reply.set_content("Glad to be here\n\nOn a day, someone wrote:\n> quoted text\n")
    with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as s:
        assert s.sendmail(address, [reply_to], reply.as_bytes(policy=email.policy.SMTP)) == {}
    g = ghost(address)

    def ghost_reply() -> Any:
        chunk = alice.ok("GET", f"/rooms/{q(room)}/messages?dir=b&limit=50")["chunk"]
        return next((e for e in chunk if e["type"] == "m.room.message" and e["sender"] == g), None)

    ev = wait_for(ghost_reply, "the ghost's reply")
    assert "Glad to be here" in ev["content"]["body"] and "quoted text" not in ev["content"]["body"]
    member = alice.ok("GET", f"/rooms/{q(room)}/state/m.room.member/{q(g)}")
    assert member["membership"] == "join"
    chunk = alice.ok("GET", f"/rooms/{q(room)}/messages?dir=f&limit=50")["chunk"]
    joins = [i for i, e in enumerate(chunk) if e["type"] == "m.room.member" and e["state_key"] == g
             and e["content"]["membership"] == "join"]
    posted = [i for i, e in enumerate(chunk) if e["type"] == "m.room.message" and e["sender"] == g]
    assert joins and posted and joins[0] < posted[0] and len(posted) == 1
    # Registration way: the link's page makes a full account that takes the ghost's place.
    status, page = register_through(link, "invitee")
    user_id = f"@invitee:{hs.server_name}"
    assert user_id in page and hs.base_url in page
    token = login(hs, "invitee")
    for r in (room, other):
        assert hs.request("GET", f"/_matrix/client/v3/rooms/{q(r)}/state/m.room.member/{q(user_id)}",
                          token=token)[1]["membership"] == "join", r
        assert alice.ok("GET", f"/rooms/{q(r)}/state/m.room.member/{q(g)}")["membership"] == "leave", r
    status, out = hs.request("GET", f"/_matrix/client/v3/rooms/{q(room)}/messages?dir=b&limit=50", token=token)
    bodies = [e["content"].get("body", "") for e in out["chunk"] if e["type"] == "m.room.message"]
    assert "before you came" in bodies and any("Glad to be here" in b for b in bodies), bodies
    status, out = hs.request("GET", "/_matrix/client/v3/account/3pid", token=token)
    assert [t["address"] for t in out["threepids"]] == [address]
    # A reply to the invitation after registering is refused: the address is a full user's now.
    assert rcpt_code(smtp_port, address, reply_to) == 550


def test_invitation_without_the_bridge(zhome_factory: Any, sink: MailSink) -> None:
    overrides = email_overrides(sink.port)
    overrides["identity_service"] = {"enabled": True}
    hs: ZhomeProcess = zhome_factory(overrides=overrides).start()
    alice = ClientUser(hs, "alice")
    room = alice.ok("POST", "/createRoom", {"preset": "private_chat", "name": "Ward 8"})["room_id"]
    address = new_address()
    invite_by_email(alice, hs, room, address)
    # Open registration off: the invitation still lets the invitee register.
    import yaml

    hs.stop()
    cfg = yaml.safe_load(hs.config_path.read_text())
    cfg["registration"]["enable_registration"] = False
    hs.config_path.write_text(yaml.safe_dump(cfg))
    hs.start()
    msg = sink.wait_for(address)[0]
    assert msg["Reply-To"] is None and "reply to this mail" not in body_of(msg)
    register_through(register_link(msg), "invited2")
    token = login(hs, "invited2")
    assert hs.request("GET", f"/_matrix/client/v3/rooms/{q(room)}/state/m.room.member/@invited2:{q(hs.server_name)}",
                      token=token)[1]["membership"] == "join"
