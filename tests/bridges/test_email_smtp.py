"""The bridge's SMTP protocol on an in-memory transport: the answers that
the end-to-end tests cannot provoke (a database that fails at commit)."""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from zhome.bridges.email.smtp import BridgeSMTPFactory, Target


class _Resolver:
    async def resolve(self, localpart: str, domain: str, mail_from: str) -> Optional[Target]:
        return Target("!room:localhost") if (localpart, domain) == ("team", "mail.test") else None


def _session(accept_ok: bool, lmtp: bool = False) -> tuple[StringTransport, list[bytes]]:
    stored: list[bytes] = []

    async def accept(target: Target, raw: bytes, envelope: Any) -> int:
        if not accept_ok:
            raise OSError("disk full")
        stored.append(raw)
        return 1

    factory = BridgeSMTPFactory("mail.test", _Resolver(), accept, 2048, lmtp=lmtp)
    proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 2525))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    proto.makeConnection(transport)
    transport.protocol = proto  # type: ignore[attr-defined]
    return transport, stored


def _codes(transport: StringTransport) -> list[str]:
    lines = transport.value().decode().split("\r\n")
    return [line[:3] for line in lines if len(line) > 3 and line[3] == " "]


def _talk(transport: StringTransport, proto_lines: list[bytes]) -> None:
    proto: Any = getattr(transport, "protocol")
    for line in proto_lines:
        proto.dataReceived(line + b"\r\n")


def test_a_failed_commit_answers_451_and_a_good_one_250() -> None:
    for ok, last in ((False, "451"), (True, "250")):
        transport, stored = _session(ok)
        _talk(transport, [b"EHLO client.test", b"MAIL FROM:<bob@example.net>", b"RCPT TO:<team@mail.test>",
                          b"DATA", b"From: bob@example.net", b"", b"..dot-stuffed line", b"."])
        codes = _codes(transport)
        assert codes[-1] == last, transport.value()
        assert stored == ([b"From: bob@example.net\r\n\r\n.dot-stuffed line\r\n"] if ok else [])


def test_size_is_announced_and_enforced() -> None:
    transport, stored = _session(True)
    _talk(transport, [b"EHLO client.test"])
    assert b"SIZE 2048" in transport.value()
    _talk(transport, [b"MAIL FROM:<bob@example.net> SIZE=4096"])
    assert _codes(transport)[-1] == "552"
    _talk(transport, [b"MAIL FROM:<bob@example.net> SIZE=100", b"RCPT TO:<nobody@mail.test>",
                      b"RCPT TO:<team@mail.test>", b"DATA"] + [b"x" * 70] * 40 + [b"."])
    assert _codes(transport)[-5:] == ["250", "550", "250", "354", "552"]
    assert stored == []


def test_lmtp_answers_once_per_recipient() -> None:
    transport, stored = _session(True, lmtp=True)
    _talk(transport, [b"EHLO mta.test"])
    assert _codes(transport)[-1] == "500"
    _talk(transport, [b"LHLO mta.test", b"MAIL FROM:<bob@example.net>", b"RCPT TO:<team@mail.test>",
                      b"RCPT TO:<team@mail.test>", b"DATA", b"Subject: x", b"", b"hi", b"."])
    assert _codes(transport)[-6:] == ["250", "250", "250", "354", "250", "250"]
    assert len(stored) == 2
