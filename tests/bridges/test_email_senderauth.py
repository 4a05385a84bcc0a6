"""Sender checks (zhome/bridges/email/senderauth.py), delivery reports
(bounces.py) and rate limits (ratelimit.py), against a real DNS server on
loopback (tests/e2e/dnsstub.py)."""

from __future__ import annotations

import email.policy
import email.utils
from email.message import EmailMessage
from typing import Iterator

import dkim
import pytest

from tests.e2e.dnsstub import DnsStub, dkim_key
from zhome.bridges.email import senderauth as sa
from zhome.bridges.email.bounces import parse_report
from zhome.bridges.email.ratelimit import SenderLimits, TokenBuckets

KEY, KEY_TXT = dkim_key()


@pytest.fixture(scope="module")
def stub() -> Iterator[DnsStub]:
    s = DnsStub({
        "sel._domainkey.reject.test": [("TXT", KEY_TXT)],
        "_dmarc.reject.test": [("TXT", "v=DMARC1; p=reject")],
        "sel._domainkey.none.test": [("TXT", KEY_TXT)],
        "_dmarc.none.test": [("TXT", "v=DMARC1; p=none; adkim=s")],
        "spf.test": [("TXT", "v=spf1 ip4:127.0.0.1 -all")],
        "_dmarc.spf.test": [("TXT", "v=DMARC1; p=reject; sp=none")],
        "sub.spf.test": [("TXT", "v=spf1 -all")],
        "nodmarc.test": [("TXT", "v=spf1 ip4:192.0.2.1 -all")],
        "_dmarc.two.test": [("TXT", "v=DMARC1; p=none"), ("TXT", "v=DMARC1; p=reject")],
        "_dmarc.never.test": [("TXT", "v=DMARC1; p=reject; pct=0")],
        "_dmarc.half.test": [("TXT", "v=DMARC1; p=quarantine; pct=50")],
        "_dmarc.badpct.test": [("TXT", "v=DMARC1; p=reject; pct=200")],
    }).start()
    yield s
    s.stop()


@pytest.fixture
def resolver(stub: DnsStub) -> sa.Resolver:
    return sa.Resolver((stub.address,), timeout=2.0)


def _mail(sender: str, text: str = "Hello there.\n") -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = "team@mail.test"
    msg["Subject"] = "Hi"
    msg["Date"] = email.utils.formatdate()
    msg["Message-ID"] = email.utils.make_msgid(domain="x.test")
    msg.set_content(text)
    return msg.as_bytes(policy=email.policy.SMTP)


def _signed(sender: str, domain: str, text: str = "Hello there.\n") -> bytes:
    raw = _mail(sender, text)
    sig = dkim.sign(raw, b"sel", domain.encode(), KEY, include_headers=[b"from", b"to", b"subject", b"date"])
    return bytes(sig) + raw


def _check(resolver: sa.Resolver, raw: bytes, mail_from: str, ip: str = "127.0.0.1") -> sa.AuthResult:
    return sa.check(resolver, raw, client_ip=ip, mail_from=mail_from, helo="client.test")


def test_decision_table() -> None:
    def r(dmarc: str, policy: str | None) -> sa.AuthResult:
        return sa.AuthResult(dmarc=dmarc, dmarc_policy=policy)

    assert sa.decide(r("pass", "reject"), "reject") == "accept"
    assert sa.decide(r("fail", "reject"), "mark") == "reject"
    assert sa.decide(r("fail", "quarantine"), "mark") == "mark"
    assert sa.decide(r("fail", "none"), "quarantine") == "quarantine"
    assert sa.decide(r("fail", "none"), "reject") == "reject"
    assert sa.decide(r("fail", "none"), "bogus") == "mark"
    # No DMARC record: accepted and marked, whatever the room says.
    assert sa.decide(r("none", None), "reject") == "mark"
    assert sa.decide(r("none", None)) == "mark"


def test_dmarc_records_and_alignment() -> None:
    assert sa.parse_dmarc(b"v=DMARC1; p=reject; adkim=s") == {"v": "DMARC1", "p": "reject", "adkim": "s"}
    assert sa.parse_dmarc(b"p=reject; v=DMARC1") is None
    assert sa.parse_dmarc(b"v=spf1 -all") is None
    assert sa.organisational_domain("a.b.example.co.uk") == "example.co.uk"
    assert sa.organisational_domain("mail.example.com") == "example.com"
    assert sa.aligned("mail.example.com", "example.com", "r")
    assert not sa.aligned("mail.example.com", "example.com", "s")
    assert not sa.aligned("example.org", "example.com", "r")
    # A public suffix is no organisational domain of two registrants.
    assert not sa.aligned("alice.co.uk", "bob.co.uk", "r")


def test_dkim_pass_and_forged_body(resolver: sa.Resolver) -> None:
    good = _signed("Bob <bob@reject.test>", "reject.test")
    res = _check(resolver, good, "bob@reject.test")
    assert (res.dkim, res.dkim_domains, res.dmarc) == ("pass", ["reject.test"], "pass")
    assert sa.decide(res) == "accept"
    forged = good.replace(b"Hello there.", b"Send money now")
    res = _check(resolver, forged, "bob@reject.test")
    assert (res.dkim, res.dmarc, res.dmarc_policy) == ("fail", "fail", "reject")
    assert sa.decide(res, "mark") == "reject"
    # Signed by another domain than From's: not aligned.
    other = _signed("Bob <bob@none.test>", "reject.test")
    res = _check(resolver, other, "bob@none.test")
    assert res.dkim == "pass" and res.dmarc == "fail" and sa.decide(res, "quarantine") == "quarantine"


def test_spf_alignment_and_subdomain_policy(resolver: sa.Resolver) -> None:
    res = _check(resolver, _mail("Sam <sam@spf.test>"), "sam@spf.test")
    assert (res.spf, res.spf_domain, res.dmarc) == ("pass", "spf.test", "pass")
    # From another IP: SPF fails, DMARC fails, p=reject.
    res = _check(resolver, _mail("Sam <sam@spf.test>"), "sam@spf.test", ip="192.0.2.7")
    assert res.spf == "fail" and res.dmarc == "fail" and sa.decide(res) == "reject"
    # A subdomain with no record of its own gets the organisational sp=.
    res = _check(resolver, _mail("Sam <sam@sub.spf.test>"), "sam@sub.spf.test")
    assert res.dmarc == "fail" and res.dmarc_policy == "none" and sa.decide(res) == "mark"
    # No DMARC record anywhere: marked.
    res = _check(resolver, _mail("Nia <nia@nodmarc.test>"), "nia@nodmarc.test")
    assert res.dmarc == "none" and sa.decide(res, "reject") == "mark"
    # Several From: addresses (one could hide a p=reject domain): refused.
    two = _mail("Nia <nia@nodmarc.test>").replace(b"From: Nia <nia@nodmarc.test>",
                                                   b"From: Nia <nia@nodmarc.test>, Sig <sig@reject.test>")
    assert sa.decide(_check(resolver, two, "nia@nodmarc.test")) == "reject"
    twice = b"From: Sig <sig@reject.test>\r\n" + _mail("Nia <nia@nodmarc.test>")
    assert sa.decide(_check(resolver, twice, "nia@nodmarc.test")) == "reject"
    # Two records are none.
    res = _check(resolver, _mail("T <t@two.test>"), "t@two.test")
    assert res.dmarc == "none"
    # Over LMTP SPF is not run: DMARC rests on DKIM.
    res = sa.check(resolver, _mail("Sam <sam@spf.test>"), client_ip="127.0.0.1", mail_from="sam@spf.test",
                   helo="mta", run_spf=False)
    assert res.spf == "none" and res.dmarc == "fail"


def test_servfail_is_a_temporary_failure(stub: DnsStub, resolver: sa.Resolver) -> None:
    stub.servfail.add("_dmarc.broken.test")
    try:
        with pytest.raises(sa.TemporaryFailure):
            _check(resolver, _mail("B <b@broken.test>"), "b@broken.test")
    finally:
        stub.servfail.discard("_dmarc.broken.test")
    # The DKIM key's lookup failing is temporary too, not a failed signature.
    stub.servfail.add("sel._domainkey.reject.test")
    try:
        with pytest.raises(sa.TemporaryFailure):
            _check(resolver, _signed("Bob <bob@reject.test>", "reject.test"), "bob@reject.test")
    finally:
        stub.servfail.discard("sel._domainkey.reject.test")
    # Nobody listening: a timeout, also temporary.
    dead = sa.Resolver(("127.0.0.1:9",), timeout=0.5)
    with pytest.raises(sa.TemporaryFailure):
        _check(dead, _mail("B <b@reject.test>"), "b@reject.test")


def dsn(recipient: str, status: str, action: str, message_id: str) -> bytes:
    return (
        "From: Mail Delivery System <MAILER-DAEMON@relay.test>\r\n"
        "To: noreply@mail.test\r\nSubject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="BB"\r\n\r\n'
        "--BB\r\nContent-Type: text/plain\r\n\r\nYour mail could not be delivered.\r\n"
        "--BB\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; relay.test\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\nAction: {action}\r\nStatus: {status}\r\n\r\n"
        "--BB\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: zhome <noreply@mail.test>\r\nTo: {recipient}\r\nMessage-ID: {message_id}\r\n\r\n"
        "--BB--\r\n").encode()


def test_delivery_reports() -> None:
    rep = parse_report(dsn("Bob@Example.net", "5.1.1", "failed", "<zhome.abc@mail.test>"))
    assert rep is not None and rep.returned_message_id == "<zhome.abc@mail.test>"
    assert [(r.address, r.hard) for r in rep.recipients] == [("bob@example.net", True)]
    soft = parse_report(dsn("bob@example.net", "4.2.2", "delayed", "<zhome.abc@mail.test>"))
    assert soft is not None and not soft.recipients[0].hard
    assert parse_report(_mail("Bob <bob@example.net>")) is None


def test_token_buckets() -> None:
    now = [0.0]
    b = TokenBuckets(60, 3, clock=lambda: now[0])
    for _ in range(3):
        assert b.allows("a")
        b.take("a")
    assert not b.allows("a") and b.allows("b")
    now[0] += 1.0  # one a second
    assert b.allows("a")
    limits = SenderLimits(60, 2, 600, 5)
    assert limits.admit("bomb@x.test", "127.0.0.1") and limits.admit("bomb@x.test", "127.0.0.1")
    # Refused attempts take nothing from the shared IP's bucket.
    assert not any(limits.admit("bomb@x.test", "127.0.0.1") for _ in range(50))
    assert limits.admit("other@y.test", "127.0.0.1")


def test_smtp_passes_the_envelope_and_limits_at_rcpt() -> None:
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport
    from twisted.mail import smtp as tw_smtp

    from zhome.bridges.email.smtp import BridgeSMTPFactory, Envelope, Target

    class Resolver:
        async def resolve(self, localpart: str, domain: str, mail_from: str) -> Target:
            return Target("!room:localhost")

    seen: list[Envelope] = []

    async def accept(target: Target, raw: bytes, envelope: Envelope) -> int:
        seen.append(envelope)
        if b"forged" in raw:
            raise tw_smtp.SMTPServerError(550, "5.7.1 Sender authentication (DMARC) failed")
        return 1

    limits = SenderLimits(60, 2, 600, 50)
    factory = BridgeSMTPFactory("mail.test", Resolver(), accept, 4096, admit=limits.admit)
    proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 2525))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.9", 40000))
    proto.makeConnection(transport)
    for line in [b"EHLO client.test", b"MAIL FROM:<bob@example.net>", b"RCPT TO:<team@mail.test>", b"DATA",
                 b"From: bob@example.net", b"", b"forged", b".",
                 b"MAIL FROM:<bob@example.net>", b"RCPT TO:<team@mail.test>", b"RCPT TO:<team@mail.test>", b"RSET",
                 b"MAIL FROM:<other@example.org>", b"RCPT TO:<team@mail.test>"]:
        proto.dataReceived(line + b"\r\n")
    replies = [r[:3] for r in transport.value().decode().split("\r\n") if len(r) > 3 and r[3] == " "]
    # 550 at DATA from the checks; the sender's third RCPT is over the
    # burst of 2 (451 4.7.1); another sender is still served.
    assert replies[5] == "550" and replies[6:] == ["250", "250", "451", "250", "250", "250"], replies
    assert b"451 4.7.1" in transport.value()
    assert seen == [Envelope("127.0.0.9", "client.test", "bob@example.net")]


def test_dmarc_pct_samples_the_policy(resolver: sa.Resolver) -> None:
    """RFC 7489 6.6.4: failing mail outside the pct sample gets the next policy down."""
    assert sa.sampled_policy("reject", 100, 0.999) == "reject"
    assert sa.sampled_policy("reject", 0, 0.0) == "quarantine"
    assert sa.sampled_policy("reject", 30, 0.29) == "reject"
    assert sa.sampled_policy("reject", 30, 0.30) == "quarantine"
    assert sa.sampled_policy("quarantine", 30, 0.5) == "none"
    assert sa.sampled_policy("none", 0, 0.5) == "none"
    # pct=0: never rejected, only quarantined (the room address decides).
    for _ in range(20):
        res = _check(resolver, _mail("Ned <ned@never.test>"), "ned@never.test")
        assert res.dmarc == "fail" and res.dmarc_policy == "quarantine" and sa.decide(res, "mark") == "mark"
    # pct=50 over many mails: both outcomes, about half each (bounded, 200 draws).
    seen = [_check(resolver, _mail("Hal <hal@half.test>"), "hal@half.test").dmarc_policy for _ in range(200)]
    assert set(seen) == {"quarantine", "none"} and 50 < seen.count("quarantine") < 150
    # A bad pct is the default, 100.
    res = _check(resolver, _mail("Bo <bo@badpct.test>"), "bo@badpct.test")
    assert res.dmarc_policy == "reject" and sa.decide(res) == "reject"


def test_answers_are_kept_for_their_ttl(stub: DnsStub, resolver: sa.Resolver) -> None:
    # Mail from one domain asks the same records: within their TTL (1 s
    # here) they are asked once. (A failure is asked again: see above.)
    with stub.lock:
        stub.queries.clear()
    for _ in range(2):
        res = _check(resolver, _mail("S <s@spf.test>"), "s@spf.test")
        assert res.spf == "pass" and res.dmarc == "pass"
    with stub.lock:
        asked = list(stub.queries)
    assert asked.count(("spf.test", "TXT")) == 1 and asked.count(("_dmarc.spf.test", "TXT")) == 1, asked
