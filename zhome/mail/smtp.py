"""Hand messages to an SMTP relay with twisted.mail.

RFC 5321 (ESMTP), RFC 3207 (STARTTLS), RFC 8314 (implicit TLS, "force_tls"),
RFC 4954 (AUTH). The relay's settings come from the ``email`` config
section (``SmtpRelay.from_config``); credentials are never logged.
``send_many`` hands several messages over one connection (one greeting,
TLS handshake and AUTH for all of them, ``RSET`` between two), each with
its own outcome.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from twisted.internet import defer
from twisted.internet.ssl import optionsForClientTLS
from twisted.mail.smtp import (
    SUCCESS, Address, AddressError, ESMTPSender, ESMTPSenderFactory, SMTPClient, SMTPClientError, SMTPProtocolError,
)

from zhome.util.nodelay import set_no_delay
from zhome.util.reactor import reactor


class MailSendError(Exception):
    """The relay did not take the message. ``permanent``: a 5xx answer,
    retrying will not help."""

    def __init__(self, msg: str, permanent: bool = False) -> None:
        super().__init__(msg)
        self.permanent = permanent


@dataclass(frozen=True)
class SmtpRelay:
    host: str
    port: int = 25
    user: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)
    #: Refuse to send unless the connection is TLS (STARTTLS or implicit).
    require_transport_security: bool = False
    #: Implicit TLS from the first byte (port 465 style).
    force_tls: bool = False
    #: Check the relay's certificate (off only for test set-ups).
    verify_certificate: bool = True
    #: PEM file of the CA certificates to trust for the relay; None: the system's.
    ca_file: Optional[str] = None
    timeout_s: float = 60.0

    @classmethod
    def from_config(cls, cfg: Any) -> "SmtpRelay":
        return cls(host=cfg.smtp_host, port=cfg.smtp_port, user=cfg.smtp_user, password=cfg.smtp_pass,
                   require_transport_security=cfg.require_transport_security, force_tls=cfg.force_tls,
                   verify_certificate=cfg.verify_certificate, ca_file=getattr(cfg, "smtp_ca_file", None),
                   timeout_s=cfg.timeout_ms / 1000)

    def _tls_options(self) -> Any:
        if self.verify_certificate:
            if self.ca_file is not None:
                from twisted.internet.ssl import Certificate

                with open(self.ca_file, "rb") as f:
                    return optionsForClientTLS(self.host, trustRoot=Certificate.loadPEM(f.read()))
            return optionsForClientTLS(self.host)
        from twisted.internet.ssl import CertificateOptions

        return CertificateOptions(verify=False)

    async def send(self, sender: str, recipient: str, message: bytes) -> None:
        """Deliver ``message`` from ``sender`` to ``recipient`` through the
        relay; raises MailSendError when it is not accepted."""
        outcome = (await self.send_many([(sender, recipient, message)]))[0]
        if outcome is not None:
            raise outcome

    async def send_many(self, mails: Sequence[tuple[str, str, bytes]]) -> list[Optional[MailSendError]]:
        """Deliver ``mails`` (sender, recipient, message) in order over ONE
        connection to the relay, ``RSET`` between them (RFC 5321 4.1.1.5).
        Returns each mail's outcome: None when the relay accepted it, else
        why not (``permanent`` for a 5xx answer to that mail). A refusal of
        one mail does not end the others; a failure of the connection (or
        of the relay's greeting, TLS, AUTH, a timeout) is the outcome of
        every mail not answered yet."""
        if not mails:
            return []
        done: defer.Deferred[Any] = defer.Deferred()
        user = self.user.encode() if self.user else None
        secret = self.password.encode() if self.password is not None and self.user else None
        factory = _BatchSenderFactory(
            list(mails), user, secret, done, timeout=int(self.timeout_s), contextFactory=self._tls_options(),
            heloFallback=True, requireAuthentication=bool(self.user),
            requireTransportSecurity=self.require_transport_security, hostname=self.host)
        factory.noisy = False
        if factory.sendable():
            if self.force_tls:
                connector = reactor.connectSSL(self.host, self.port, factory, self._tls_options(),
                                               timeout=self.timeout_s)
            else:
                connector = reactor.connectTCP(self.host, self.port, factory, timeout=self.timeout_s)
            try:
                await done
            except Exception as e:
                factory.fail_rest(_send_error(e))
            finally:
                connector.disconnect()
        return factory.outcomes


def _send_error(e: BaseException) -> MailSendError:
    """The MailSendError for what twisted.mail raised (no address in it)."""
    if isinstance(e, MailSendError):
        return e
    if isinstance(e, SMTPClientError):
        code = getattr(e, "code", None)
        permanent = isinstance(code, int) and 500 <= code < 600
        return MailSendError(f"relay refused: {code}", permanent=permanent)
    return MailSendError(f"could not send through the relay: {type(e).__name__}")


class _BatchSender(ESMTPSender):
    """ESMTPSender for several mails: each ``MAIL FROM`` asks the factory
    for the next one; once every mail has an outcome it says QUIT."""

    factory: "_BatchSenderFactory"

    def connectionMade(self) -> None:
        # SMTP is a dialogue of short lines: each is sent at once
        # (TCP_NODELAY), not held back by Nagle's algorithm until the
        # previous one is acknowledged (a delayed-ACK wait, tens of ms, per
        # exchange).
        set_no_delay(self.transport)
        super().connectionMade()

    def getMailFrom(self) -> Optional[str]:
        f = self.factory
        nxt = f.next_index()
        if nxt is None:
            f.finish()
            return None
        return f.envelopes[nxt][0]

    def getMailTo(self) -> list[bytes]:
        i = self.factory.next_index()
        assert i is not None
        return [self.factory.envelopes[i][1]]

    def getMailData(self) -> io.BytesIO:
        i = self.factory.next_index()
        assert i is not None
        return io.BytesIO(self.factory.mails[i][2])

    def sentMail(self, code: int, resp: bytes, numOk: int, addresses: Any, log: Any) -> None:  # noqa: N803
        if code in SUCCESS and numOk:
            self.factory.record(None)
        else:
            self.factory.record(MailSendError(f"relay refused: {code}", permanent=500 <= code < 600))

    def smtpTransferFailed(self, code: int, resp: bytes) -> None:
        if self._from is None and code >= 0:
            # The answer to RSET (no mail under way): the session is no
            # good for the next mail.
            self.sendError(SMTPProtocolError(code, resp, self.log.str()))
            return
        super().smtpTransferFailed(code, resp)

    def sendError(self, exc: Any) -> None:
        SMTPClient.sendError(self, exc)
        self.factory.fail(exc)


class _BatchSenderFactory(ESMTPSenderFactory):
    protocol = _BatchSender

    def __init__(self, mails: list[tuple[str, str, bytes]], username: Optional[bytes], password: Optional[bytes],
                 deferred: "defer.Deferred[Any]", **kw: Any) -> None:
        super().__init__(username, password, "", [b""], io.BytesIO(b""), deferred, retries=0, **kw)
        self.mails = mails
        self.outcomes: list[Optional[MailSendError]] = []
        #: (MAIL FROM, RCPT TO) of each mail; "" for one that cannot be sent.
        self.envelopes: list[tuple[str, bytes]] = []
        for sender, recipient, _message in mails:
            try:
                self.envelopes.append((str(Address(sender)), recipient.encode("ascii")))
            except (AddressError, UnicodeError):
                self.envelopes.append(("", b""))
        self._fired = False
        self._skip_unsendable()

    def _skip_unsendable(self) -> None:
        # An address SMTP cannot carry (no SMTPUTF8 here): never sendable.
        while len(self.outcomes) < len(self.mails) and not self.envelopes[len(self.outcomes)][1]:
            self.outcomes.append(MailSendError("not an address the relay can take", permanent=True))

    def sendable(self) -> bool:
        return len(self.outcomes) < len(self.mails)

    def next_index(self) -> Optional[int]:
        return len(self.outcomes) if len(self.outcomes) < len(self.mails) else None

    def record(self, outcome: Optional[MailSendError]) -> None:
        if len(self.outcomes) < len(self.mails):
            self.outcomes.append(outcome)
        self._skip_unsendable()

    def fail_rest(self, error: MailSendError) -> None:
        while len(self.outcomes) < len(self.mails):
            self.outcomes.append(error)

    def finish(self) -> None:
        if not self._fired:
            self._fired = True
            self.sendFinished = True
            self.result.callback(None)

    def _processConnectionError(self, connector: Any, err: Any) -> None:
        # Lost before every mail had its outcome: the rest fail with it.
        if self._fired:
            return
        self._fired = True
        super()._processConnectionError(connector, err)

    def fail(self, exc: Any) -> None:
        if not self._fired:
            self._fired = True
            self.sendFinished = True
            self.result.errback(exc)
