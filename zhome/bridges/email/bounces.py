"""Delivery status notifications (bounces) for the bridge's outbound mail.

RFC 3464: a DSN is ``multipart/report; report-type=delivery-status``
(RFC 6522) with a ``message/delivery-status`` part: one block of
per-message fields, then one block per recipient with ``Final-Recipient``
(``rfc822; address``), ``Action`` and ``Status`` (RFC 3463: ``5.x.x`` is
permanent, ``4.x.x`` transient), and usually the returned message or its
headers (``message/rfc822`` or ``text/rfc822-headers``), whose
``Message-ID`` names the mail of ours that bounced.

Parsed with Python's ``email`` package. A report that is not one is just
dropped; nothing here is ever posted or answered.
"""

from __future__ import annotations

import email.policy
import re
from dataclasses import dataclass
from email.message import EmailMessage, Message
from email.parser import BytesParser, HeaderParser
from typing import Optional


@dataclass(frozen=True)
class RecipientStatus:
    address: str
    action: str
    status: str

    @property
    def hard(self) -> bool:
        return self.action == "failed" and self.status.startswith("5.")


@dataclass(frozen=True)
class DeliveryReport:
    recipients: list[RecipientStatus]
    #: The Message-ID of the returned (bounced) message, when it came back.
    returned_message_id: Optional[str]


def _address(value: str) -> str:
    kind, sep, addr = value.partition(";")
    addr = (addr if sep else kind).strip().strip("<>").strip()
    return addr.lower()


def _fields(block: Message) -> dict[str, str]:
    return {k.lower(): str(v).strip() for k, v in block.items()}


def parse_report(raw: bytes) -> Optional[DeliveryReport]:
    """The DSN in ``raw``, or None when the mail is not one."""
    try:
        msg = BytesParser(policy=email.policy.default).parsebytes(raw)
    except Exception:
        return None
    assert isinstance(msg, EmailMessage)
    if msg.get_content_type() != "multipart/report":
        return None
    if str(msg.get_param("report-type", "") or "").lower() != "delivery-status":
        return None
    recipients: list[RecipientStatus] = []
    returned: Optional[str] = None
    for part in msg.iter_parts():
        ctype = part.get_content_type()
        if ctype == "message/delivery-status":
            payload = part.get_payload()
            blocks = payload if isinstance(payload, list) else []
            for block in blocks[1:51]:
                if not isinstance(block, Message):
                    continue
                f = _fields(block)
                address = _address(f.get("final-recipient", "") or f.get("original-recipient", ""))
                status = f.get("status", "").split()[0] if f.get("status") else ""
                if address and "@" in address and re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", status):
                    recipients.append(RecipientStatus(address, f.get("action", "").lower(), status))
        elif ctype == "message/rfc822":
            inner = part.get_payload()
            inner_msg = inner[0] if isinstance(inner, list) and inner else None
            if isinstance(inner_msg, Message):
                returned = _message_id(str(inner_msg.get("Message-ID", "") or ""))
        elif ctype == "text/rfc822-headers":
            try:
                text = part.get_content()
            except Exception:
                continue
            headers = HeaderParser().parsestr(text if isinstance(text, str) else "", headersonly=True)
            returned = _message_id(str(headers.get("Message-ID", "") or ""))
    if not recipients:
        return None
    return DeliveryReport(recipients, returned)


def _message_id(value: str) -> Optional[str]:
    m = re.search(r"<[^<>\s]{1,250}>", value)
    return m.group(0) if m else None
