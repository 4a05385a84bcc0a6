"""Hand one message to an SMTP relay with twisted.mail.

RFC 5321 (ESMTP), RFC 3207 (STARTTLS), RFC 8314 (implicit TLS, "force_tls"),
RFC 4954 (AUTH). The relay's settings come from the ``email`` config
section (``SmtpRelay.from_config``); credentials are never logged.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.ssl import optionsForClientTLS
from twisted.mail.smtp import ESMTPSenderFactory, SMTPClientError

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
        done: defer.Deferred[Any] = defer.Deferred()
        user = self.user.encode() if self.user else None
        secret = self.password.encode() if self.password is not None and self.user else None
        factory = _NoDelaySenderFactory(
            user, secret, sender, [recipient], io.BytesIO(message), done,
            retries=0, timeout=int(self.timeout_s), contextFactory=self._tls_options(),
            heloFallback=True, requireAuthentication=bool(self.user),
            requireTransportSecurity=self.require_transport_security, hostname=self.host)
        factory.noisy = False
        if self.force_tls:
            connector = reactor.connectSSL(self.host, self.port, factory, self._tls_options(),
                                           timeout=self.timeout_s)
        else:
            connector = reactor.connectTCP(self.host, self.port, factory, timeout=self.timeout_s)
        try:
            result = await done
        except SMTPClientError as e:
            code = getattr(e, "code", None)
            permanent = isinstance(code, int) and 500 <= code < 600
            raise MailSendError(f"relay refused: {code}", permanent=permanent) from None
        except Exception as e:
            raise MailSendError(f"could not send through the relay: {type(e).__name__}") from None
        finally:
            connector.disconnect()
        # (number accepted, [(address, code, response)])
        accepted = result[0] if isinstance(result, tuple) else 1
        if not accepted:
            raise MailSendError("relay accepted no recipient", permanent=True)


class _NoDelaySenderFactory(ESMTPSenderFactory):
    """SMTP is a dialogue of short lines: each is sent at once (TCP_NODELAY),
    not held back by Nagle's algorithm until the previous one is acknowledged
    (which costs a delayed-ACK wait, tens of ms, per exchange)."""

    def buildProtocol(self, addr: Any) -> Any:
        proto = super().buildProtocol(addr)
        made = proto.connectionMade

        def connection_made() -> None:
            set_no_delay(proto.transport)
            made()

        proto.connectionMade = connection_made
        return proto

