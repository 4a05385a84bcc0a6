"""The email bridge's inbound half end to end: a real ``zhome run`` with
``email_bridge.enabled: true`` on SQLite and PostgreSQL, mail delivered by
Python's smtplib over loopback, results read back through the
Client-Server API as a room member sees them.
"""

from __future__ import annotations

import contextlib

import email.policy
import email.utils
import smtplib
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

import pytest

from tests.conftest import fresh_pg_database
from tests.e2e.dnsstub import DnsStub
from tests.e2e.harness import ClientUser, ZhomeProcess, _server_env, free_port, q
from tests.e2e.mailsink import MailSink, body_of
from zhome.bridges.email.tokens import ghost_localpart, reply_localpart

DOMAIN = "mail.test"
BOT = "@emailbot:localhost"
MAX_SIZE = 64 * 1024
T = TypeVar("T")


def wait_for(fn: Callable[[], Optional[T]], what: str, timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class MailRoom:
    """A zhome with the bridge on, and a room with the address team@mail.test."""

    def __init__(self, hs: ZhomeProcess, smtp_port: int, bridge_db_url: Optional[str] = None) -> None:
        self.hs = hs
        self.smtp_port = smtp_port
        #: The bridge's PostgreSQL database, when it has one (else its SQLite file).
        self.bridge_db_url = bridge_db_url
        self.alice = ClientUser(hs, "alice")
        self.room_id: str = self.alice.ok("POST", "/createRoom", {"preset": "private_chat"})["room_id"]

    @property
    def bridge_db(self) -> Path:
        return self.hs.workdir / "data" / "email_bridge.db"

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows from the bridge's own database, on whichever engine it is."""
        if self.bridge_db_url is None:
            with sqlite3.connect(self.bridge_db) as conn:
                return [tuple(r) for r in conn.execute(sql, params)]
        import psycopg2

        conn = psycopg2.connect(self.bridge_db_url)
        try:
            with conn.cursor() as cur:
                cur.execute(sql.replace("?", "%s"), params)
                return [tuple(r) for r in cur.fetchall()]
        finally:
            conn.close()

    def enable_address(self, localpart: str = "team", policy: str = "authenticated",
                       state_first: bool = False) -> None:
        def set_state() -> None:
            self.alice.ok("PUT", f"/rooms/{q(self.room_id)}/state/org.zhome.email_address/",
                          {"localpart": localpart, "policy": policy})

        if state_first:
            # Set before the bridge is in the room: it reads it on joining.
            set_state()
        self.alice.ok("POST", f"/rooms/{q(self.room_id)}/invite", {"user_id": BOT})
        wait_for(lambda: BOT in self.alice.ok("GET", f"/rooms/{q(self.room_id)}/joined_members")["joined"],
                 "the bridge's user to join")
        if not state_first:
            set_state()
        wait_for(lambda: self.rcpt_code(f"{localpart}@{DOMAIN}") == 250, "the bridge to learn the address")

    def smtp(self) -> smtplib.SMTP:
        deadline = time.monotonic() + 20
        while True:
            try:
                return smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=30)
            except (ConnectionRefusedError, socket.timeout):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def rcpt_code(self, rcpt: str, mail_from: str = "bob@example.net") -> int:
        with self.smtp() as s:
            s.ehlo("client.test")
            assert s.mail(mail_from)[0] == 250
            code = s.rcpt(rcpt)[0]
            s.rset()
            return code

    def send(self, msg: EmailMessage | bytes, rcpt: str = f"team@{DOMAIN}", mail_from: str = "bob@example.net") -> None:
        raw = msg if isinstance(msg, bytes) else msg.as_bytes(policy=email.policy.SMTP)
        with self.smtp() as s:
            refused = s.sendmail(mail_from, [rcpt], raw)
            assert refused == {}

    def messages(self) -> list[dict[str, Any]]:
        out = self.alice.ok("GET", f"/rooms/{q(self.room_id)}/messages?dir=b&limit=200")
        return [e for e in out["chunk"] if e["type"] == "m.room.message"]

    def wait_message(self, pred: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        return wait_for(lambda: next((e for e in self.messages() if pred(e)), None), what)

    def states(self) -> list[tuple[int, str, str]]:
        return self.query("SELECT id, state, COALESCE(outcome, '') FROM inbound_mail ORDER BY id")  # type: ignore[return-value]


def mail(text: str, *, sender: str = "Bob Smith <bob@example.net>", subject: str = "Hello",
         html: Optional[str] = None, **headers: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = f"team@{DOMAIN}"
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate()
    msg["Message-ID"] = headers.pop("message_id", email.utils.make_msgid(domain="example.net"))
    for k, v in headers.items():
        msg[k.replace("_", "-")] = v
    msg.set_content(text)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    return msg


def ghost(address: str) -> str:
    return f"@{ghost_localpart('email_', address)}:localhost"


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsStub]:
    """The senders' domains publish SPF for loopback and DMARC p=none: the
    unsigned mail of these tests passes the sender checks (aligned SPF)."""
    records: dict[str, list[tuple[str, str]]] = {}
    for domain in ("example.net", "example.com", "example.org"):
        records[domain] = [("TXT", "v=spf1 ip4:127.0.0.1 -all")]
        records[f"_dmarc.{domain}"] = [("TXT", "v=DMARC1; p=none")]
    stub = DnsStub(records).start()
    yield stub
    stub.stop()


@pytest.fixture
def mail_room(zhome_factory: Any, dns: DnsStub, db_config: tuple[str, dict[str, Any]]) -> Iterator[MailRoom]:
    """A room with an email address. On PostgreSQL the bridge keeps its own
    database there too (email_bridge.database_url), beside the homeserver's."""
    smtp_port = free_port()
    bridge = {"dns_servers": [dns.address], "enabled": True, "mail_domain": DOMAIN,
              "smtp_listen": f"127.0.0.1:{smtp_port}", "appservice_listen": f"127.0.0.1:{free_port()}",
              "max_mail_size": MAX_SIZE}
    with contextlib.ExitStack() as stack:
        if db_config[0] != "sqlite3":
            name = stack.enter_context(fresh_pg_database())
            bridge["database_url"] = f"postgresql://postgres@127.0.0.1:5432/{name}"
        hs = zhome_factory(overrides={"email_bridge": bridge})
        # Stopped before the bridge's database is dropped.
        stack.callback(hs.stop)
        hs.start()
        room = MailRoom(hs, smtp_port, bridge.get("database_url"))
        room.enable_address()
        yield room


def test_refused_at_rcpt_and_over_the_size_limit(mail_room: MailRoom) -> None:
    r = mail_room
    # No room has this address; another domain is nobody's here.
    assert r.rcpt_code(f"nobody@{DOMAIN}") == 550
    assert r.rcpt_code("team@elsewhere.test") == 550
    assert r.rcpt_code(f"team@{DOMAIN}") == 250
    big = mail("x" * 100 + "\n" + ("y" * 75 + "\n") * 1200, subject="big")
    # Announced SIZE larger than the limit: refused at MAIL FROM.
    with r.smtp() as s:
        s.ehlo("client.test")
        assert s.has_extn("size") and int(s.esmtp_features["size"]) == MAX_SIZE
        with pytest.raises(smtplib.SMTPSenderRefused) as info:
            s.sendmail("bob@example.net", [f"team@{DOMAIN}"], big.as_bytes(policy=email.policy.SMTP))
        assert info.value.smtp_code == 552
    # No SIZE given: counted while receiving, refused after the final dot.
    with r.smtp() as s:
        s.ehlo("client.test")
        assert s.mail("bob@example.net")[0] == 250
        assert s.rcpt(f"team@{DOMAIN}")[0] == 250
        code, _ = s.data(big.as_bytes(policy=email.policy.SMTP))
        assert code == 552
    # The server keeps serving; nothing of the refused mail was stored or posted.
    r.send(mail("after the big one"))
    r.wait_message(lambda e: e["content"].get("body") == "after the big one", "the small mail")
    assert not any("yyyy" in e["content"].get("body", "") for e in r.messages())
    assert len(r.states()) == 1


def test_mail_is_posted_by_the_senders_ghost(mail_room: MailRoom) -> None:
    r = mail_room
    marker = f"Hello team, first mail {time.time_ns()}"
    r.send(mail(marker, html=f"<p>{marker} <b>bold</b><script>alert('x')</script>"
                              "<a href='javascript:alert(1)'>bad</a> <a href='https://example.org/'>ok</a></p>"))
    ev = r.wait_message(lambda e: e["content"].get("body") == marker, "the posted mail")
    bob = ghost("bob@example.net")
    assert ev["sender"] == bob
    assert ev["content"]["msgtype"] == "m.text"
    assert ev["content"]["format"] == "org.matrix.custom.html"
    formatted = ev["content"]["formatted_body"]
    assert "<b>bold</b>" in formatted and marker in formatted and 'href="https://example.org/"' in formatted
    assert "script" not in formatted and "alert" not in formatted and "javascript" not in formatted
    # The ghost's display name is the From: header's.
    members = r.alice.ok("GET", f"/rooms/{q(r.room_id)}/joined_members")["joined"]
    assert members[bob]["display_name"] == "Bob Smith"
    # Posted: the mail's content is gone from the bridge's table, and never
    # was there in clear.
    wait_for(lambda: r.states() and r.states()[0][1] == "posted", "the row marked posted")
    assert [row[0] for row in r.query("SELECT message FROM inbound_mail")] == [""]
    if r.bridge_db_url is None:
        assert marker.encode() not in r.bridge_db.read_bytes()
    else:
        # Nothing of the mail in clear in any column of the bridge's tables.
        for (table,) in r.query("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"):
            assert not r.query(f"SELECT 1 FROM {table} t WHERE CAST(t AS TEXT) LIKE ?", (f"%{marker}%",)), table


def test_replies_strip_quoted_history_and_thread(mail_room: MailRoom) -> None:
    r = mail_room
    first = mail("The first question.", message_id="<first-1@example.net>")
    r.send(first)
    ev1 = r.wait_message(lambda e: e["content"].get("body") == "The first question.", "the first mail")
    quoted = ("Here is the answer.\n\n"
              "On Mon, 30 Nov 2026 at 10:00, Bob Smith <bob@example.net> wrote:\n"
              "> The first question.\n")
    reply = mail(quoted, sender="Carol <carol@example.com>", subject="Re: Hello",
                 message_id="<reply-1@example.com>", In_Reply_To="<first-1@example.net>",
                 References="<first-1@example.net>")
    r.send(reply, mail_from="carol@example.com")
    ev2 = r.wait_message(lambda e: "answer" in e["content"].get("body", ""), "the reply")
    assert ev2["content"]["body"] == "Here is the answer."
    assert ev2["sender"] == ghost("carol@example.com")
    assert ev2["content"]["m.relates_to"] == {"m.in_reply_to": {"event_id": ev1["event_id"]}}

    # A signed reply address for Carol and the first event.
    secret = bytes.fromhex(r.query("SELECT value FROM bridge_meta WHERE name = 'reply_secret'")[0][0])
    n = r.query("SELECT n FROM known_events WHERE event_id = ?", (ev1["event_id"],))[0][0]
    good = reply_localpart(secret, n, r.room_id, ev1["event_id"], "carol@example.com")
    assert r.rcpt_code(f"{good}@{DOMAIN}", "carol@example.com") == 250
    # Forged: the same token from another sender, a token for another
    # event number, a made-up MAC: all 550 at RCPT.
    assert r.rcpt_code(f"{good}@{DOMAIN}", "mallory@example.org") == 550
    moved = good.replace(f"reply+{n}.", f"reply+{n + 1}.")
    assert r.rcpt_code(f"{moved}@{DOMAIN}", "carol@example.com") == 550
    assert r.rcpt_code(f"reply+{n}.{'a' * 20}@{DOMAIN}", "carol@example.com") == 550
    by_token = mail("Answer through the reply address.", sender="Carol <carol@example.com>")
    r.send(by_token, rcpt=f"{good}@{DOMAIN}", mail_from="carol@example.com")
    ev3 = r.wait_message(lambda e: e["content"].get("body") == "Answer through the reply address.", "token reply")
    assert ev3["sender"] == ghost("carol@example.com")
    assert ev3["content"]["m.relates_to"] == {"m.in_reply_to": {"event_id": ev1["event_id"]}}


def _download(hs: ZhomeProcess, token: str, mxc: str) -> bytes:
    server, media_id = mxc[len("mxc://"):].split("/", 1)
    req = urllib.request.Request(f"{hs.base_url}/_matrix/client/v1/media/download/{server}/{media_id}")
    req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return bytes(resp.read())


def test_attachments_become_media_events(mail_room: MailRoom) -> None:
    r = mail_room
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    pdf = b"%PDF-1.4\n" + b"binary \x00\x01\x02 data\n" * 50
    msg = mail("See the attached files.")
    msg.add_attachment(png, maintype="image", subtype="png", filename="photo.png")
    msg.add_attachment(pdf, maintype="application", subtype="pdf", filename="report.pdf")
    r.send(msg)
    image = r.wait_message(lambda e: e["content"].get("msgtype") == "m.image", "the image")
    file = r.wait_message(lambda e: e["content"].get("msgtype") == "m.file", "the file")
    text = r.wait_message(lambda e: e["content"].get("body") == "See the attached files.", "the text")
    assert image["sender"] == file["sender"] == text["sender"] == ghost("bob@example.net")
    assert image["content"]["body"] == "photo.png" and image["content"]["info"]["mimetype"] == "image/png"
    assert file["content"]["body"] == "report.pdf" and file["content"]["info"]["size"] == len(pdf)
    assert _download(r.hs, r.alice.token, image["content"]["url"]) == png
    assert _download(r.hs, r.alice.token, file["content"]["url"]) == pdf


def test_auto_replies_loops_and_malformed_mail_are_not_posted(mail_room: MailRoom) -> None:
    r = mail_room
    r.send(mail("I am out of office (auto).", Auto_Submitted="auto-replied"))
    r.send(mail("Bulk newsletter.", Precedence="bulk"))
    r.send(mail("Our own mail coming back.", message_id=f"<zhome.abc123@{DOMAIN}>"))
    broken = (b"From: Bob <bob@example.net>\r\nTo: team@mail.test\r\nSubject: broken\r\n"
              b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed\r\n\r\nBroken body text.\r\n")
    r.send(broken)
    # Not auto-replied to anything: Auto-Submitted: no is an ordinary mail.
    r.send(mail("A person wrote this.", Auto_Submitted="no"))
    r.wait_message(lambda e: e["content"].get("body") == "A person wrote this.", "the ordinary mail")
    wait_for(lambda: all(s != "pending" for _, s, _ in r.states()), "every mail handled")
    bodies = [e["content"].get("body", "") for e in r.messages()]
    for text in ("out of office", "newsletter", "coming back", "Broken body"):
        assert not any(text in b for b in bodies), text
    states = [(s, o) for _, s, o in r.states()]
    assert states[0] == ("ignored", "auto-submitted")
    assert states[1] == ("ignored", "precedence bulk")
    assert states[2] == ("ignored", "loop (our own Message-ID)")
    assert states[3][0] == "failed" and states[3][1].startswith("malformed")
    assert states[4] == ("posted", "posted")


def test_a_crash_after_250_posts_the_mail_once(mail_room: MailRoom) -> None:
    r = mail_room
    marker = f"Sent just before the crash {time.time_ns()}"
    r.send(mail(marker, sender="Dave <dave@example.org>"), mail_from="dave@example.org")
    # 250 was answered: kill at once, before (or while) it is posted.
    r.hs.stop(kill=True)
    r.hs.start()
    r.wait_message(lambda e: e["content"].get("body") == marker, "the mail after the restart")
    # A second restart and a later mail: still exactly one copy.
    r.hs.restart()
    r.send(mail("after the second restart"))
    r.wait_message(lambda e: e["content"].get("body") == "after the second restart", "the later mail")
    copies = [e for e in r.messages() if e["content"].get("body") == marker]
    assert len(copies) == 1 and copies[0]["sender"] == ghost("dave@example.org")


def test_email_participants_policy_and_lmtp(zhome_factory: Any, dns: DnsStub) -> None:
    smtp_port, lmtp_port = free_port(), free_port()
    hs = zhome_factory(overrides={"email_bridge": {
        "dns_servers": [dns.address],
        "enabled": True, "mail_domain": DOMAIN, "smtp_listen": f"127.0.0.1:{smtp_port}",
        "lmtp_listen": f"127.0.0.1:{lmtp_port}", "appservice_listen": f"127.0.0.1:{free_port()}"}})
    hs.start()
    r = MailRoom(hs, smtp_port)
    r.alice.ok("POST", f"/rooms/{q(r.room_id)}/invite", {"user_id": BOT})
    wait_for(lambda: BOT in r.alice.ok("GET", f"/rooms/{q(r.room_id)}/joined_members")["joined"], "the bot")
    r.alice.ok("PUT", f"/rooms/{q(r.room_id)}/state/org.zhome.email_address/",
               {"localpart": "Care-Team", "policy": "email_participants"})
    # Only the room's email participants may write: nobody yet.
    wait_for(lambda: r.states() == [] and _address_known(r, "care-team"), "the address")
    assert r.rcpt_code(f"care-team@{DOMAIN}", "erin@example.org") == 550
    # Alice invites Erin's ghost (the bridge registers it when asked).
    r.alice.ok("POST", f"/rooms/{q(r.room_id)}/invite", {"user_id": ghost("erin@example.org")})
    wait_for(lambda: r.rcpt_code(f"care-team@{DOMAIN}", "erin@example.org") == 250, "Erin a participant")
    assert r.rcpt_code(f"care-team@{DOMAIN}", "mallory@example.org") == 550

    # LMTP (RFC 2033): LHLO, recipients checked one by one, a reply per recipient.
    with smtplib.LMTP("127.0.0.1", lmtp_port, timeout=30) as lmtp:
        assert lmtp.docmd("EHLO", "mta.test")[0] == 500  # not LMTP
        assert lmtp.ehlo("mta.test")[0] == 250  # smtplib's LMTP sends LHLO
        assert lmtp.has_extn("size")
        msg = mail("Delivered over LMTP.", sender="Erin <erin@example.org>")
        msg.replace_header("To", f"care-team@{DOMAIN}")
        refused = lmtp.sendmail("erin@example.org", [f"care-team@{DOMAIN}", f"nobody@{DOMAIN}"],
                                msg.as_bytes(policy=email.policy.SMTP))
        assert list(refused) == [f"nobody@{DOMAIN}"] and refused[f"nobody@{DOMAIN}"][0] == 550
    # Over LMTP SPF is not run and this mail has no DKIM signature: DMARC
    # fails at a p=none domain, and the room's default policy marks it.
    ev = r.wait_message(lambda e: e["content"].get("body") == "Unverified sender:\nDelivered over LMTP.",
                        "the LMTP mail")
    assert ev["content"]["org.zhome.email.auth"]["dmarc"] == "fail"
    assert ev["sender"] == ghost("erin@example.org")
    members = r.alice.ok("GET", f"/rooms/{q(r.room_id)}/joined_members")["joined"]
    assert members[ghost("erin@example.org")]["display_name"] == "Erin"
    # The bridge's user removed from the room: the address is no more.
    r.alice.ok("POST", f"/rooms/{q(r.room_id)}/kick", {"user_id": BOT})
    wait_for(lambda: r.rcpt_code(f"care-team@{DOMAIN}", "erin@example.org") == 550, "the address gone")


def _address_known(r: MailRoom, localpart: str) -> bool:
    return bool(r.query("SELECT 1 FROM room_addresses WHERE localpart = ?", (localpart,)))


def test_bridge_in_its_own_process(zhome_factory: Any, dns: DnsStub) -> None:
    smtp_port = free_port()
    hs = zhome_factory(overrides={"email_bridge": {
        "dns_servers": [dns.address],
        "enabled": True, "in_process": False, "mail_domain": DOMAIN, "smtp_listen": f"127.0.0.1:{smtp_port}",
        "appservice_listen": f"127.0.0.1:{free_port()}"}})
    hs.start()
    # zhome run loads the registration but does not run the bridge itself.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", smtp_port), timeout=5).close()
    log = open(hs.workdir / "bridge.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "zhome", "bridge-email", "--config-path", str(hs.config_path)],
                            stdout=log, stderr=subprocess.STDOUT, env=_server_env())
    try:
        r = MailRoom(hs, smtp_port)
        r.enable_address(state_first=True)
        r.send(mail("Through the separate bridge."))
        ev = r.wait_message(lambda e: e["content"].get("body") == "Through the separate bridge.", "the mail")
        assert ev["sender"] == ghost("bob@example.net")
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        log.close()
    assert proc.returncode == 0, (hs.workdir / "bridge.log").read_text()


def test_room_messages_are_mailed_to_email_participants(zhome_factory: Any, dns: DnsStub) -> None:
    sink = MailSink(free_port()).start()
    try:
        smtp_port = free_port()
        hs = zhome_factory(overrides={
            "email": {"smtp_host": "127.0.0.1", "smtp_port": sink.port, "notif_from": f"zhome <noreply@{DOMAIN}>"},
            "email_bridge": {"dns_servers": [dns.address],
                             "enabled": True, "mail_domain": DOMAIN, "smtp_listen": f"127.0.0.1:{smtp_port}",
                             "appservice_listen": f"127.0.0.1:{free_port()}", "quiet_period_ms": 300}})
        hs.start()
        r = MailRoom(hs, smtp_port)
        r.enable_address()
        r.send(mail("Hi from Bob.", message_id="<bob-1@example.net>"))
        ev_bob = r.wait_message(lambda e: e["content"].get("body") == "Hi from Bob.", "Bob's mail")
        sent = r.alice.ok("PUT", f"/rooms/{q(r.room_id)}/send/m.room.message/a1", {
            "msgtype": "m.text", "body": "Thanks Bob, noted.",
            "m.relates_to": {"m.in_reply_to": {"event_id": ev_bob["event_id"]}}})
        out = sink.wait_for("bob@example.net")[0]
        assert "Thanks Bob, noted." in body_of(out)
        assert str(out["Message-ID"]).startswith("<zhome.") and str(out["Message-ID"]).endswith(f"@{DOMAIN}>")
        assert str(out["In-Reply-To"]) == "<bob-1@example.net>"
        reply_to = str(out["Reply-To"])
        assert reply_to.startswith("reply+") and reply_to.endswith(f"@{DOMAIN}")
        # Bob answers from his mail client: a Matrix reply to Alice's message.
        answer = mail("Bob's answer.\n\nOn Tue, 1 Dec 2026, zhome <noreply@mail.test> wrote:\n> Thanks Bob, noted.\n",
                      In_Reply_To=str(out["Message-ID"]))
        r.send(answer, rcpt=reply_to)
        ev = r.wait_message(lambda e: e["content"].get("body") == "Bob's answer.", "Bob's answer")
        assert ev["content"]["m.relates_to"] == {"m.in_reply_to": {"event_id": sent["event_id"]}}
        # The reply address is Bob's alone; our own mail coming back is a loop.
        assert r.rcpt_code(reply_to, "mallory@example.org") == 550
        r.send(out.as_bytes(policy=email.policy.SMTP))
        wait_for(lambda: all(s != "pending" for _, s, _ in r.states()), "every mail handled")
        assert r.states()[-1][1:] == ("ignored", "loop (our own Message-ID)")
        # Bob's own mails were not mailed back to him.
        assert len(sink.to("bob@example.net")) == 1
    finally:
        sink.stop()


def test_bridge_is_off_by_default(zhome: ZhomeProcess) -> None:
    # Nothing of the bridge runs or is written when the section is left out.
    data = zhome.workdir / "data"
    assert not (data / "email_bridge_registration.yaml").exists()
    assert not (data / "email_bridge.db").exists()
    assert "email bridge" not in zhome.log()
    assert zhome.request("GET", "/_matrix/client/versions")[0] == 200


def test_generate_config_mail_flags_make_a_working_bridge(zhome_factory: Any, dns: DnsStub) -> None:
    # What an operator gets from `zhome generate-config --mail-domain ...`:
    # the listener, the registration, the relay and the identity service.
    sink = MailSink(free_port()).start()
    try:
        smtp_port = free_port()
        hs = zhome_factory(
            generate_args=["--mail-domain", DOMAIN, "--smtp-port", str(smtp_port),
                           "--smtp-relay", f"127.0.0.1:{sink.port}"],
            # Only what a test needs changed: a free port, no waiting.
            overrides={"email_bridge": {"appservice_listen": f"127.0.0.1:{free_port()}", "quiet_period_ms": 0,
                                        "dns_servers": [dns.address]}})
        hs.start()
        status, wk = hs.request("GET", "/.well-known/matrix/client")
        assert status == 200 and wk["m.identity_server"]["base_url"].startswith("http://127.0.0.1:")
        r = MailRoom(hs, smtp_port)
        assert r.rcpt_code(f"nobody@{DOMAIN}") == 550
        r.enable_address()
        r.send(mail("Hello from a generated config."))
        r.wait_message(lambda e: e["content"].get("body") == "Hello from a generated config.", "the mail")
        r.alice.ok("PUT", f"/rooms/{q(r.room_id)}/send/m.room.message/g1", {"msgtype": "m.text", "body": "Got it."})
        out = sink.wait_for("bob@example.net")[0]
        assert "Got it." in body_of(out)
        assert str(out["From"]).endswith(f"<noreply@{DOMAIN}>")
    finally:
        sink.stop()


def test_email_participants_are_refused_in_encrypted_rooms(mail_room: MailRoom) -> None:
    # The bridge cannot read an encrypted room: the inviter is told at once.
    r = mail_room
    carol = ghost("carol@example.net")
    encrypted = r.alice.ok("POST", "/createRoom", {"preset": "private_chat", "initial_state": [
        {"type": "m.room.encryption", "state_key": "", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}]})["room_id"]
    status, body = r.alice.req("POST", f"/rooms/{q(encrypted)}/invite", {"user_id": carol})
    assert status == 403 and body["errcode"] == "M_FORBIDDEN"
    assert "takes part by email" in body["error"] and "encrypted" in body["error"]
    # The same person into a room without encryption is fine.
    r.alice.ok("POST", f"/rooms/{q(r.room_id)}/invite", {"user_id": carol})
    # An ordinary user into the encrypted room is fine too.
    ClientUser(r.hs, "dave")
    r.alice.ok("POST", f"/rooms/{q(encrypted)}/invite", {"user_id": "@dave:localhost"})


def test_a_room_turning_encryption_on_tells_its_email_participants(zhome_factory: Any, dns: DnsStub) -> None:
    sink = MailSink(free_port()).start()
    try:
        smtp_port = free_port()
        hs = zhome_factory(overrides={
            "email": {"smtp_host": "127.0.0.1", "smtp_port": sink.port, "notif_from": f"zhome <noreply@{DOMAIN}>"},
            "email_bridge": {"enabled": True, "mail_domain": DOMAIN, "smtp_listen": f"127.0.0.1:{smtp_port}",
                             "appservice_listen": f"127.0.0.1:{free_port()}", "quiet_period_ms": 0,
                             "dns_servers": [dns.address]}})
        hs.start()
        r = MailRoom(hs, smtp_port)
        r.enable_address()
        r.send(mail("Hello, I am Bob."))
        r.wait_message(lambda e: e["content"].get("body") == "Hello, I am Bob.", "Bob's mail")
        r.alice.ok("PUT", f"/rooms/{q(r.room_id)}/state/m.room.encryption/", {"algorithm": "m.megolm.v1.aes-sha2"})
        # The room is told, and so is Bob, by mail; mail to the room is refused from now on.
        notice = r.wait_message(lambda e: e["sender"] == BOT and "end-to-end encrypted" in e["content"]["body"],
                                "the bridge's notice")
        assert notice["content"]["msgtype"] == "m.notice" and "1 person" in notice["content"]["body"]
        told = wait_for(lambda: [m for m in sink.to("bob@example.net") if "end-to-end encrypted" in body_of(m)],
                        "Bob's mail about it")
        assert len(told) == 1
        assert r.rcpt_code(f"team@{DOMAIN}") == 550
        with r.smtp() as s:
            s.ehlo("client.test")
            s.mail("bob@example.net")
            code, text = s.rcpt(f"team@{DOMAIN}")
        assert code == 550 and b"end-to-end encrypted" in text
    finally:
        sink.stop()


def test_starttls_with_a_configured_certificate(zhome_factory: Any, dns: DnsStub, tmp_path: Path) -> None:
    import ssl

    from zhome.federation.tls import generate_self_signed_certificate

    cert, key = generate_self_signed_certificate(DOMAIN)
    (tmp_path / "mail.crt").write_bytes(cert)
    (tmp_path / "mail.key").write_bytes(key)
    smtp_port = free_port()
    hs = zhome_factory(overrides={"email_bridge": {
        "enabled": True, "mail_domain": DOMAIN, "smtp_listen": f"127.0.0.1:{smtp_port}",
        "appservice_listen": f"127.0.0.1:{free_port()}", "dns_servers": [dns.address],
        "tls_certificate_path": str(tmp_path / "mail.crt"), "tls_private_key_path": str(tmp_path / "mail.key")}})
    hs.start()
    r = MailRoom(hs, smtp_port)
    r.enable_address()
    trust = ssl.create_default_context(cafile=str(tmp_path / "mail.crt"))
    trust.check_hostname = False
    with r.smtp() as s:
        s.ehlo("client.test")
        assert s.has_extn("starttls")
        assert s.starttls(context=trust)[0] == 220
        s.ehlo("client.test")
        assert not s.has_extn("starttls")
        assert s.sendmail("bob@example.net", [f"team@{DOMAIN}"],
                          mail("Sent over TLS.").as_bytes(policy=email.policy.SMTP)) == {}
    r.wait_message(lambda e: e["content"].get("body") == "Sent over TLS.", "the mail sent over TLS")
