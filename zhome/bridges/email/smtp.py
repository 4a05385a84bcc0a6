"""The bridge's SMTP and LMTP listeners (twisted.mail).

RFC 5321 (SMTP): recipients are decided at ``RCPT TO`` (``550`` for an
address that is no room's and no valid reply address); ``250`` after DATA
only once the mail is committed to the inbound table (a database failure
answers ``451``: the sender tries again). RFC 1870 (SIZE): the limit is
announced, a larger declared size is refused at ``MAIL FROM`` and the
received bytes are counted during DATA; both answer ``552``.
RFC 2033 (LMTP): ``LHLO`` instead of ``EHLO``, and one reply per accepted
recipient after the final dot.

Sender checks (senderauth.py) run in the accept function at the end of
DATA, before the mail is committed: it raises ``SMTPServerError`` with
``550 5.7.1`` (refused by DMARC or the room's policy) or ``451`` (DNS did
not answer). Per-sender rate limits (ratelimit.py) are applied at ``RCPT
TO`` to recipients that exist: over the limit, ``451 4.7.1``.

Nothing here logs an address or a line of a mail.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional, Protocol

from twisted.internet import defer
from twisted.internet.protocol import ServerFactory
from twisted.mail import smtp
from twisted.python.failure import Failure
from zope.interface import implementer

logger = logging.getLogger(__name__)

COMMAND_TIMEOUT_S = 300


@dataclass(frozen=True)
class Target:
    """Where an accepted recipient's copy goes."""

    room_id: str
    #: The event a reply address was made for (its mail is a reply to it).
    reply_event: Optional[str] = None
    #: The only sender a reply address is valid for.
    token_address: Optional[str] = None
    #: The room address's policy for unauthenticated mail (senderauth).
    unauthenticated: str = "mark"
    #: A delivery report (bounce) for the bridge, not a mail for a room.
    bounce: bool = False


@dataclass(frozen=True)
class Envelope:
    """What the SMTP session says about a mail's sender."""

    client_ip: str
    helo: str
    mail_from: str
    lmtp: bool = False


class Refused(Exception):
    """A recipient refused with its own reply (rather than "no such recipient")."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RecipientResolver(Protocol):
    async def resolve(self, localpart: str, domain: str, mail_from: str) -> Optional[Target]: ...


#: (target, raw message, envelope) -> row ID; durable when it returns.
AcceptFn = Callable[[Target, bytes, Envelope], Awaitable[int]]
#: (envelope sender, client IP) -> may it send one more?
AdmitFn = Callable[[str, str], bool]


class _TooBig(smtp.SMTPServerError):
    def __init__(self) -> None:
        super().__init__(552, "Message exceeds the maximum size")


@implementer(smtp.IMessage)
class _InboundMessage:
    def __init__(self, target: Target, accept: AcceptFn, max_size: int, envelope: Envelope) -> None:
        self.target = target
        self.envelope = envelope
        self.accept = accept
        self.max_size = max_size
        self.lines: list[bytes] = []
        self.size = 0
        self.too_big = False

    def lineReceived(self, line: bytes) -> None:
        if self.too_big:
            return
        self.size += len(line) + 2
        if self.size > self.max_size:
            # Keep reading to the final dot (the client is still sending),
            # keep none of it, refuse at the end.
            self.too_big = True
            self.lines = []
            return
        self.lines.append(line)

    def eomReceived(self) -> "defer.Deferred[Any]":
        if self.too_big:
            return defer.fail(_TooBig())
        raw = b"\r\n".join(self.lines) + b"\r\n"
        self.lines = []
        return defer.ensureDeferred(self._accept(raw))

    async def _accept(self, raw: bytes) -> int:
        return await self.accept(self.target, raw, self.envelope)

    def connectionLost(self) -> None:
        self.lines = []


@implementer(smtp.IMessageDelivery)
class _Delivery:
    def __init__(self, resolver: RecipientResolver, accept: AcceptFn, max_size: int,
                 admit: Optional[AdmitFn] = None, lmtp: bool = False) -> None:
        self.admit = admit
        self.lmtp = lmtp
        self.resolver = resolver
        self.accept = accept
        self.max_size = max_size

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> None:
        return None

    def validateFrom(self, helo: Any, origin: Any) -> Any:
        return origin

    def validateTo(self, user: smtp.User) -> "defer.Deferred[Callable[[], _InboundMessage]]":
        return defer.ensureDeferred(self._validate_to(user))

    async def _validate_to(self, user: smtp.User) -> Callable[[], _InboundMessage]:
        local = user.dest.local.decode("utf-8", "replace") if isinstance(user.dest.local, bytes) else str(
            user.dest.local)
        domain = user.dest.domain.decode("utf-8", "replace") if isinstance(user.dest.domain, bytes) else str(
            user.dest.domain)
        try:
            target = await self.resolver.resolve(local.lower(), domain.lower(), str(user.orig))
        except Refused as e:
            raise smtp.SMTPBadRcpt(user, e.code, e.message) from None
        except Exception:
            logger.exception("email bridge: recipient check failed")
            raise smtp.SMTPServerError(451, "Temporary failure, try again later") from None
        if target is None:
            raise smtp.SMTPBadRcpt(user, 550, "No such recipient here")
        helo_name, peer = user.helo if isinstance(user.helo, tuple) else (None, None)
        envelope = Envelope(_text(peer), _text(helo_name), str(user.orig), self.lmtp)
        if self.admit is not None and not self.admit(envelope.mail_from, envelope.client_ip):
            raise smtp.SMTPBadRcpt(user, 451, "4.7.1 Too many mails from this sender, try again later")
        accept, max_size = self.accept, self.max_size
        return lambda: _InboundMessage(target, accept, max_size, envelope)


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _failure_code(failure: Failure) -> tuple[int, bytes]:
    err = failure.value
    if isinstance(err, smtp.SMTPServerError):
        resp = err.resp if isinstance(err.resp, bytes) else str(err.resp).encode()
        return int(err.code), resp
    logger.error("email bridge: could not store a mail: %s", failure.getErrorMessage()[:200])
    return 451, b"Temporary failure storing the message, try again later"


class BridgeESMTP(smtp.ESMTP):
    max_size = 0

    def extensions(self) -> dict[bytes, Any]:
        ext = dict(super().extensions())
        ext.pop(b"AUTH", None)
        ext[b"SIZE"] = [str(self.max_size).encode()]
        ext[b"8BITMIME"] = None
        return ext

    def do_MAIL(self, rest: bytes) -> None:
        m = self.mail_re.match(rest)
        if m is not None and m.group("opts"):
            for opt in m.group("opts").split():
                key, _, value = opt.partition(b"=")
                if key.upper() == b"SIZE":
                    if not value.isdigit():
                        self.sendCode(501, b"Bad SIZE parameter")
                        return
                    if int(value) > self.max_size:
                        self.sendCode(552, b"Message exceeds the maximum size")
                        return
        super().do_MAIL(rest)

    def _messageHandled(self, resultList: list[tuple[bool, Any]]) -> None:
        failures = [r for ok, r in resultList if not ok]
        if not failures:
            self.sendCode(250, b"Message accepted")
            return
        codes = [_failure_code(f) for f in failures]
        self.sendCode(*max(codes))


class BridgeLMTP(BridgeESMTP):
    """RFC 2033: as ESMTP, greeted by LHLO, answering once per recipient."""

    def greeting(self) -> bytes:
        return self.host + b" LMTP ready"

    def do_LHLO(self, rest: bytes) -> None:
        smtp.ESMTP.do_EHLO(self, rest)

    def do_EHLO(self, rest: bytes) -> None:
        self.sendCode(500, b"This is LMTP: use LHLO")

    def do_HELO(self, rest: bytes) -> None:
        self.sendCode(500, b"This is LMTP: use LHLO")

    def _messageHandled(self, resultList: list[tuple[bool, Any]]) -> None:
        if not resultList:
            self.sendCode(250, b"Message accepted")
        for ok, result in resultList:
            if ok:
                self.sendCode(250, b"Message accepted")
            else:
                self.sendCode(*_failure_code(result))


class BridgeSMTPFactory(ServerFactory):
    def __init__(self, hostname: str, resolver: RecipientResolver, accept: AcceptFn, max_size: int,
                 lmtp: bool = False, admit: Optional[AdmitFn] = None, tls_context: Any = None) -> None:
        """``tls_context``: a server TLS context factory; STARTTLS is offered with it."""
        self.tls_context = tls_context
        self.hostname = hostname.encode("idna")
        self.delivery = _Delivery(resolver, accept, max_size, admit, lmtp)
        self.max_size = max_size
        self.lmtp = lmtp
        self.noisy = False

    def buildProtocol(self, addr: Any) -> BridgeESMTP:
        proto: BridgeESMTP = BridgeLMTP() if self.lmtp else BridgeESMTP()
        proto.max_size = self.max_size
        proto.delivery = self.delivery
        proto.host = self.hostname
        proto.timeout = COMMAND_TIMEOUT_S
        proto.noisy = False
        proto.factory = self
        if self.tls_context is not None:
            # twisted.mail's ESMTP offers STARTTLS while a context is set.
            proto.ctx = self.tls_context
        return proto
