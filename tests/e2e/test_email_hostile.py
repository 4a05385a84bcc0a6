"""The email bridge against hostile and unauthenticated mail, end to end:
one real ``zhome run`` (SQLite) with the bridge, a DNS server on loopback
(tests/e2e/dnsstub.py) publishing the senders' DKIM keys, SPF and DMARC
records, mail sent with smtplib into the bridge's SMTP listener, results
read through the Client-Server API and the bridge's database.

Domains of the stub: ``signed.test`` (DKIM key, ``p=reject``),
``lax.test`` (DKIM key, ``p=none``), ``spfok.test`` (SPF for 127.0.0.1,
``p=reject``), ``nodmarc.test`` (nothing).
"""

from __future__ import annotations

import email.policy
import email.utils
import smtplib
import sqlite3
import subprocess
import sys
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import dkim
import pytest

from tests.e2e.dnsstub import DnsStub, dkim_key
from tests.e2e.harness import ClientUser, ZhomeProcess, _server_env, free_port, q
from tests.e2e.mailsink import MailSink, body_of
from tests.e2e.test_email_bridge import BOT, DOMAIN, ghost, wait_for
from zhome.bridges.email.tokens import reply_localpart

KEY, KEY_TXT = dkim_key()
BURST = 5
MAX_SIZE = 1024 * 1024
UNVERIFIED = "Unverified sender:\n"


class Site:
    def __init__(self, hs: ZhomeProcess, smtp_port: int, dns: DnsStub, sink: MailSink) -> None:
        self.hs = hs
        self.smtp_port = smtp_port
        self.dns = dns
        self.sink = sink
        self.alice = ClientUser(hs, "alice")
        self.team = self._room("team", "mark")
        self.held = self._room("held", "quarantine")

    def _room(self, localpart: str, unauthenticated: str) -> str:
        room_id: str = self.alice.ok("POST", "/createRoom", {"preset": "private_chat"})["room_id"]
        self.alice.ok("POST", f"/rooms/{q(room_id)}/invite", {"user_id": BOT})
        wait_for(lambda: BOT in self.alice.ok("GET", f"/rooms/{q(room_id)}/joined_members")["joined"], "the bot")
        self.alice.ok("PUT", f"/rooms/{q(room_id)}/state/org.zhome.email_address/",
                      {"localpart": localpart, "policy": "authenticated", "unauthenticated": unauthenticated})
        wait_for(lambda: self.rcpt_code(f"{localpart}@{DOMAIN}", f"probe-{localpart}@spfok.test") == 250,
                 "the address")
        return room_id

    @property
    def db(self) -> Path:
        return self.hs.workdir / "data" / "email_bridge.db"

    def smtp(self) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=60)

    def rcpt_code(self, rcpt: str, mail_from: str) -> int:
        with self.smtp() as s:
            s.ehlo("client.test")
            assert s.mail(mail_from)[0] == 250
            code = s.rcpt(rcpt)[0]
            s.rset()
            return int(code)

    def send(self, raw: bytes, mail_from: str, rcpt: str = f"team@{DOMAIN}") -> tuple[int, bytes]:
        """The reply to DATA (or to RCPT when it was refused)."""
        with self.smtp() as s:
            s.ehlo("client.test")
            assert s.mail(mail_from)[0] == 250
            code, resp = s.rcpt(rcpt)
            if code != 250:
                return code, resp
            code, resp = s.data(raw)
            return code, resp

    def messages(self, room_id: str) -> list[dict[str, Any]]:
        out = self.alice.ok("GET", f"/rooms/{q(room_id)}/messages?dir=b&limit=500")
        return [e for e in out["chunk"] if e["type"] == "m.room.message"]

    def wait_message(self, room_id: str, pred: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        return wait_for(lambda: next((e for e in self.messages(room_id) if pred(e)), None), what)

    def bodies(self, room_id: str) -> list[str]:
        return [str(e["content"].get("body", "")) for e in self.messages(room_id)]

    def states(self) -> list[tuple[int, str, str]]:
        with sqlite3.connect(self.db) as conn:
            return [(int(a), str(b), str(c)) for a, b, c in conn.execute(
                "SELECT id, state, COALESCE(outcome, '') FROM inbound_mail ORDER BY id")]

    def settled(self) -> None:
        wait_for(lambda: all(s != "pending" for _, s, _ in self.states()), "every mail handled")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "zhome", "bridge-email", "--config-path",
                               str(self.hs.config_path), "quarantine", *args],
                              capture_output=True, text=True, timeout=60, env=_server_env())


def mail(text: str, sender: str, rcpt: str = f"team@{DOMAIN}", **headers: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = rcpt
    msg["Subject"] = "Hello"
    msg["Date"] = email.utils.formatdate()
    msg["Message-ID"] = headers.pop("message_id", email.utils.make_msgid(domain="x.test"))
    for k, v in headers.items():
        msg[k.replace("_", "-")] = v
    msg.set_content(text)
    return msg


def raw(msg: EmailMessage) -> bytes:
    return msg.as_bytes(policy=email.policy.SMTP)


def signed(msg: EmailMessage, domain: str) -> bytes:
    data = raw(msg)
    sig = dkim.sign(data, b"sel", domain.encode(), KEY, include_headers=[b"from", b"to", b"subject", b"date"])
    return bytes(sig) + data


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    dns = DnsStub({
        "sel._domainkey.signed.test": [("TXT", KEY_TXT)],
        "_dmarc.signed.test": [("TXT", "v=DMARC1; p=reject")],
        "sel._domainkey.lax.test": [("TXT", KEY_TXT)],
        "_dmarc.lax.test": [("TXT", "v=DMARC1; p=none")],
        "spfok.test": [("TXT", "v=spf1 ip4:127.0.0.1 -all")],
        "_dmarc.spfok.test": [("TXT", "v=DMARC1; p=reject")],
    }).start()
    sink = MailSink(free_port()).start()
    smtp_port = free_port()
    hs = ZhomeProcess(tmp_path_factory.mktemp("hostile"), overrides={
        "email": {"smtp_host": "127.0.0.1", "smtp_port": sink.port, "notif_from": f"zhome <noreply@{DOMAIN}>"},
        "email_bridge": {
            "enabled": True, "mail_domain": DOMAIN, "smtp_listen": f"127.0.0.1:{smtp_port}",
            "appservice_listen": f"127.0.0.1:{free_port()}", "max_mail_size": MAX_SIZE,
            "dns_servers": [dns.address], "quiet_period_ms": 200,
            "sender_rate_per_minute": 6, "sender_burst": BURST}})
    try:
        hs.start()
        yield Site(hs, smtp_port, dns, sink)
    finally:
        hs.stop()
        sink.stop()
        dns.stop()


def test_dmarc_outcomes(site: Site) -> None:
    s = site
    # DKIM-signed and aligned: posted as it is.
    assert s.send(signed(mail("Signed and aligned.", "Sig <sig@signed.test>"), "signed.test"),
                  "sig@signed.test")[0] == 250
    ev = s.wait_message(s.team, lambda e: e["content"].get("body") == "Signed and aligned.", "the signed mail")
    assert ev["sender"] == ghost("sig@signed.test") and "org.zhome.email.auth" not in ev["content"]
    # SPF pass for loopback, aligned, no DKIM: posted as it is.
    assert s.send(raw(mail("SPF only.", "Sam <sam@spfok.test>")), "sam@spfok.test")[0] == 250
    s.wait_message(s.team, lambda e: e["content"].get("body") == "SPF only.", "the SPF mail")

    # Forged DKIM (body changed after signing) from a p=reject domain: 550 at DATA, nothing stored.
    before = len(s.states())
    forged = signed(mail("The true text.", "Sig <sig2@signed.test>"), "signed.test").replace(
        b"The true text.", b"Pay this invoice.")
    code, resp = s.send(forged, "sig2@signed.test")
    assert code == 550 and b"5.7.1" in resp
    # SPF fails too from the wrong domain's claim: the spoofed spfok.test From
    # with another envelope domain is refused as well.
    assert s.send(raw(mail("Spoofed From.", "Sam <sam@spfok.test>")), "mallory@nodmarc.test")[0] == 550
    assert len(s.states()) == before

    # The same forgery from a p=none domain: the room's policy, here mark.
    lax = signed(mail("Lax original.", "Lax <lax@lax.test>"), "lax.test").replace(b"Lax original.", b"Lax forged.")
    assert s.send(lax, "lax@lax.test")[0] == 250
    ev = s.wait_message(s.team, lambda e: e["content"].get("body") == UNVERIFIED + "Lax forged.", "the marked mail")
    assert ev["content"]["org.zhome.email.auth"]["dkim"] == "fail"
    assert ev["content"]["org.zhome.email.auth"]["dmarc"] == "fail"
    # No DMARC record: accepted and marked.
    assert s.send(raw(mail("No DMARC here.", "Nod <nod@nodmarc.test>")), "nod@nodmarc.test")[0] == 250
    ev = s.wait_message(s.team, lambda e: e["content"].get("body") == UNVERIFIED + "No DMARC here.", "no-DMARC mail")
    assert ev["content"]["org.zhome.email.auth"]["dmarc"] == "none"

    # DNS failing (SERVFAIL): 451, the sender retries; nothing accepted unchecked.
    s.dns.servfail.add("_dmarc.tempfail.test")
    try:
        before = len(s.states())
        code, resp = s.send(raw(mail("While DNS is down.", "Tim <tim@tempfail.test>")), "tim@tempfail.test")
        assert code == 451 and len(s.states()) == before
    finally:
        s.dns.servfail.discard("_dmarc.tempfail.test")

    # Quarantine: held, not posted; the room told once, with no address or content.
    held_mail = signed(mail("Held original.", "Lax <lax2@lax.test>", rcpt=f"held@{DOMAIN}"), "lax.test")
    for i in range(2):
        body = held_mail.replace(b"Held original.", f"Held forged {i}.".encode())
        assert s.send(body, "lax2@lax.test", rcpt=f"held@{DOMAIN}")[0] == 250
    notice = s.wait_message(s.held, lambda e: e["content"].get("msgtype") == "m.notice", "the held notice")
    assert notice["sender"] == BOT and "lax" not in notice["content"]["body"]
    assert "Held" not in notice["content"]["body"]
    time.sleep(1.0)
    assert len([e for e in s.messages(s.held) if e["content"].get("msgtype") == "m.notice"]) == 1
    assert not any("Held forged" in b for b in s.bodies(s.held))
    assert b"Held forged" not in s.db.read_bytes()
    listed = s.cli("list")
    assert listed.returncode == 0, listed.stderr
    ids = [int(line.split("\t")[0]) for line in listed.stdout.splitlines() if "\t" in line]
    assert len(ids) == 2 and "dmarc=fail" in listed.stdout and "lax2@" not in listed.stdout
    # Release posts it marked; delete drops the other one.
    assert s.cli("release", str(ids[0])).returncode == 0
    assert s.cli("delete", str(ids[1])).returncode == 0
    assert s.cli("release", "999999").returncode == 1
    ev = s.wait_message(s.held, lambda e: e["content"].get("body") == UNVERIFIED + "Held forged 0.", "released mail")
    assert ev["content"]["org.zhome.email.auth"]["verdict"] == "quarantine"
    assert "No mail is held." in s.cli("list").stdout
    assert not any("Held forged 1" in b for b in s.bodies(s.held))


def test_hostile_mail_is_not_posted_and_the_bridge_keeps_serving(site: Site) -> None:
    s = site
    # A reply token: only its owner may use it; moved to another room it does not verify.
    assert s.send(raw(mail("First.", "Tom <tom@spfok.test>")), "tom@spfok.test")[0] == 250
    ev = s.wait_message(s.team, lambda e: e["content"].get("body") == "First.", "Tom's mail")
    with sqlite3.connect(s.db) as conn:
        secret = bytes.fromhex(conn.execute("SELECT value FROM bridge_meta WHERE name = 'reply_secret'").fetchone()[0])
        n = conn.execute("SELECT n FROM known_events WHERE event_id = ?", (ev["event_id"],)).fetchone()[0]
    token = reply_localpart(secret, n, s.team, ev["event_id"], "tom@spfok.test")
    assert s.rcpt_code(f"{token}@{DOMAIN}", "tom@spfok.test") == 250
    assert s.rcpt_code(f"{token}@{DOMAIN}", "eve@spfok.test") == 550
    other_room = reply_localpart(secret, n, s.held, ev["event_id"], "tom@spfok.test")
    assert s.rcpt_code(f"{other_room}@{DOMAIN}", "tom@spfok.test") == 550

    before = len(s.states())
    assert s.send(raw(mail("Out of office.", "Ann <ann@spfok.test>", Auto_Submitted="auto-replied")),
                  "ann@spfok.test")[0] == 250
    assert s.send(raw(mail("List mail.", "Ann <ann2@spfok.test>", Precedence="list")), "ann2@spfok.test")[0] == 250
    assert s.send(raw(mail("Coming back.", "Ann <ann3@spfok.test>", message_id=f"<zhome.f00@{DOMAIN}>")),
                  "ann3@spfok.test")[0] == 250
    broken = (b"From: Ann <ann4@spfok.test>\r\nTo: team@mail.test\r\nSubject: broken\r\nMIME-Version: 1.0\r\n"
              b"Content-Type: multipart/mixed\r\n\r\nBroken body text.\r\n")
    assert s.send(broken, "ann4@spfok.test")[0] == 250

    # 60 MB sent for real, without SIZE: refused after the final dot, not buffered.
    pid = s.hs.proc.pid if s.hs.proc is not None else 0

    def peak_kb() -> int:
        # The process's peak resident size so far (Linux).
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        return 0

    peak_before = peak_kb()
    line = b"x" * 998 + b"\r\n"
    big = b"From: Big <big@spfok.test>\r\nTo: team@mail.test\r\nSubject: big\r\n\r\n" + line * (60 * 1024 * 1024 // 1000 + 100)
    assert len(big) > 60 * 1024 * 1024
    with s.smtp() as c:
        c.ehlo("client.test")
        assert c.mail("big@spfok.test")[0] == 250
        assert c.rcpt(f"team@{DOMAIN}")[0] == 250
        code, _ = c.data(big)
    assert code == 552
    del big
    assert peak_kb() - peak_before < 30 * 1024, "the bridge buffered the refused mail"

    # Still serving: an ordinary mail is posted, none of the others.
    assert s.send(raw(mail("After the hostile ones.", "Una <una@spfok.test>")), "una@spfok.test")[0] == 250
    s.wait_message(s.team, lambda e: e["content"].get("body") == "After the hostile ones.", "the ordinary mail")
    s.settled()
    bodies = s.bodies(s.team)
    for text in ("Out of office", "List mail", "Coming back", "Broken body", "xxxx"):
        assert not any(text in b for b in bodies), text
    outcomes = [o for _, _, o in s.states()[before:]]
    assert outcomes[:4] == ["auto-submitted", "precedence list", "loop (our own Message-ID)", outcomes[3]]
    assert outcomes[3].startswith("malformed") and len(outcomes) == 5


def _dsn(recipient: str, message_id: str, status: str = "5.1.1", action: str = "failed") -> bytes:
    return (
        "From: Mail Delivery System <MAILER-DAEMON@spfok.test>\r\n"
        f"To: noreply@{DOMAIN}\r\nSubject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
        f"Date: {email.utils.formatdate()}\r\nMessage-ID: {email.utils.make_msgid(domain='spfok.test')}\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="BB"\r\n\r\n'
        "--BB\r\nContent-Type: text/plain\r\n\r\nYour mail could not be delivered.\r\n"
        "--BB\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; spfok.test\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\nAction: {action}\r\nStatus: {status}\r\n\r\n"
        "--BB\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: zhome <noreply@{DOMAIN}>\r\nTo: {recipient}\r\nMessage-ID: {message_id}\r\n\r\n"
        "--BB--\r\n").encode()


def _send_dsn(s: Site, data: bytes, rcpt: str = f"noreply@{DOMAIN}") -> int:
    with s.smtp() as c:
        c.ehlo("spfok.test")
        assert c.mail("<>")[0] == 250
        code = c.rcpt(rcpt)[0]
        if code != 250:
            return int(code)
        return int(c.data(data)[0])


def test_a_hard_bounce_stops_mail_to_the_address(site: Site) -> None:
    s = site
    for who in ("bea", "cal"):
        assert s.send(raw(mail(f"Hi from {who}.", f"{who} <{who}@spfok.test>")), f"{who}@spfok.test")[0] == 250
        s.wait_message(s.team, lambda e, w=who: e["content"].get("body") == f"Hi from {w}.", "the mail")
    s.alice.ok("PUT", f"/rooms/{q(s.team)}/send/m.room.message/b1", {"msgtype": "m.text", "body": "To all."})
    out = s.sink.wait_for("bea@spfok.test")[-1]
    mid = str(out["Message-ID"])
    before = len(s.messages(s.team))
    # A soft bounce and a report for no mail of ours: dropped, nothing posted.
    assert _send_dsn(s, _dsn("bea@spfok.test", mid, "4.2.2", "delayed")) == 250
    assert _send_dsn(s, _dsn("bea@spfok.test", f"<zhome.0000@{DOMAIN}>")) == 250
    # The hard bounce: a notice, not the report.
    assert _send_dsn(s, _dsn("bea@spfok.test", mid)) == 250
    notice = s.wait_message(s.team, lambda e: e["content"].get("msgtype") == "m.notice"
                            and "bounces" in e["content"]["body"], "the bounce notice")
    assert notice["sender"] == BOT and ghost("bea@spfok.test") in notice["content"]["body"]
    s.settled()
    assert len(s.messages(s.team)) == before + 1
    assert not any("could not be delivered" in b for b in s.bodies(s.team))
    assert [o for _, _, o in s.states()[-3:]] == ["soft bounce", "delivery report for no mail of ours", "hard bounce"]
    with sqlite3.connect(s.db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM bouncing_addresses").fetchone()[0] == 1
    assert b"bea@spfok.test" not in s.db.read_bytes()
    # The next message goes to Cal, not to Bea.
    s.alice.ok("PUT", f"/rooms/{q(s.team)}/send/m.room.message/b2", {"msgtype": "m.text", "body": "Again."})
    to_cal = s.sink.wait_for("cal@spfok.test", count=2)[-1]
    time.sleep(0.5)
    assert len(s.sink.to("bea@spfok.test")) == 1
    # A report from the null sender to a reply address works the same; a
    # made-up token is refused at RCPT.
    n = str(to_cal["Reply-To"]).split("+", 1)[1].split(".", 1)[0]
    assert _send_dsn(s, _dsn("cal@spfok.test", str(to_cal["Message-ID"])),
                     rcpt=f"reply+{n}.{'a' * 20}@{DOMAIN}") == 550
    assert _send_dsn(s, _dsn("cal@spfok.test", str(to_cal["Message-ID"])), rcpt=str(to_cal["Reply-To"])) == 250
    s.wait_message(s.team, lambda e: e["content"].get("msgtype") == "m.notice"
                   and ghost("cal@spfok.test") in e["content"]["body"], "the second bounce notice")
    with sqlite3.connect(s.db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM bouncing_addresses").fetchone()[0] == 2
    # Another hard bounce for an address stopped already: no second notice.
    assert _send_dsn(s, _dsn("bea@spfok.test", mid)) == 250
    s.settled()
    notices = [e for e in s.messages(s.team) if e["content"].get("msgtype") == "m.notice"]
    assert len(notices) == 2

    # Bea writes again, and her mail passes the sender checks: her mailbox
    # works, so mail to her resumes and the room hears so.
    assert s.send(raw(mail("I am back.", "bea <bea@spfok.test>")), "bea@spfok.test")[0] == 250
    back = s.wait_message(s.team, lambda e: e["content"].get("msgtype") == "m.notice"
                          and "arrived again" in e["content"]["body"], "the notice that Bea's mail works")
    assert back["sender"] == BOT and ghost("bea@spfok.test") in back["content"]["body"]
    with sqlite3.connect(s.db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM bouncing_addresses").fetchone()[0] == 1
    s.alice.ok("PUT", f"/rooms/{q(s.team)}/send/m.room.message/b3", {"msgtype": "m.text", "body": "Welcome back."})
    assert "Welcome back." in body_of(s.sink.wait_for("bea@spfok.test", count=2)[-1])


def test_a_mail_bomb_is_limited(site: Site) -> None:
    s = site
    refused = accepted = 0
    other_done = False
    before = len(s.states())
    with s.smtp() as c:
        c.ehlo("client.test")
        for i in range(200):
            if i == 100:
                assert s.send(raw(mail("Meanwhile, a person.", "Pat <pat@spfok.test>")), "pat@spfok.test")[0] == 250
                other_done = True
            assert c.mail("bomber@spfok.test")[0] == 250
            code = c.rcpt(f"team@{DOMAIN}")[0]
            if code == 250:
                assert c.data(raw(mail(f"bomb {i}", "Bomber <bomber@spfok.test>")))[0] == 250
                accepted += 1
            else:
                assert code == 451
                refused += 1
                c.rset()
    assert other_done and accepted <= BURST + 1 and refused >= 200 - BURST - 1
    s.wait_message(s.team, lambda e: e["content"].get("body") == "Meanwhile, a person.", "the other sender's mail")
    s.settled()
    bombs = [b for b in s.bodies(s.team) if b.startswith("bomb ")]
    assert 1 <= len(bombs) <= BURST + 1
    # The limit refuses at RCPT: nothing of the refused ones was stored.
    assert len(s.states()) - before == accepted + 1
