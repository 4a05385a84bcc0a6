"""Build the RFC 5322 messages zhome sends (plain text, UTF-8)."""

from __future__ import annotations

import email.policy
import email.utils
from email.message import EmailMessage


def compose(sender: str, recipient: str, subject: str, text: str, html: str | None = None) -> bytes:
    """The message bytes, with Date and a Message-ID on the sender's domain.

    Lines end with LF: the SMTP client turns them into CRLF (and
    dot-stuffs) as it sends."""
    msg = EmailMessage(policy=email.policy.default)
    msg["From"] = sender
    msg["To"] = recipient
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate(usegmt=True)
    _, addr = email.utils.parseaddr(sender)
    domain = addr.rsplit("@", 1)[-1] if "@" in addr else None
    msg["Message-ID"] = email.utils.make_msgid(domain=domain)
    msg.set_content(text)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    return msg.as_bytes()


def envelope_address(header_value: str) -> str:
    """The bare address of a From header value ("zhome <a@b>" -> "a@b")."""
    return email.utils.parseaddr(header_value)[1] or header_value
