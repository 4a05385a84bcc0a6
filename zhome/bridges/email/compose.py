"""Building the mails the bridge sends to email participants.

RFC 5322 headers; MIME (RFC 2045-2049): ``multipart/alternative`` with a
``text/plain`` and a ``text/html`` part, inside ``multipart/mixed`` when
files are attached; RFC 2369 ``List-Unsubscribe`` with RFC 8058 one-click
``List-Unsubscribe-Post``; RFC 6376 DKIM signature (dkimpy, relaxed/simple)
over the headers listed in ``SIGNED_HEADERS``, with a key loaded once
(RSA or Ed25519, PEM).

One mail carries one or more room messages (a coalesced batch), in event
order, each introduced by its sender's display name. The HTML of a message
is its ``formatted_body`` (``org.matrix.custom.html``) cut again to the
specification's allowed subset with nh3 (mime.sanitise_html), else its
escaped body; the plain text part is always there.

What is the same for every participant (media bytes, display names, the
room name) is computed once per batch by the caller and passed in; a
``MailTemplate`` builds the message once for all participants that get the
same messages and fills in each one's own headers. Messages are returned with LF line
ends (the SMTP client writes CRLF); the signature is computed over the CRLF
form, which is what the receiver checks.
"""

from __future__ import annotations

import base64
import dataclasses
import email.contentmanager
import email.generator
import functools
import email.policy
import email.utils
import html as html_lib
import logging
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Optional

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from zhome.bridges.email.mime import sanitise_html

logger = logging.getLogger(__name__)

SIGNED_HEADERS = (
    b"from", b"to", b"subject", b"date", b"message-id", b"reply-to", b"in-reply-to", b"references",
    b"list-unsubscribe", b"list-unsubscribe-post", b"mime-version", b"content-type",
)


def one_line(text: str, limit: int = 150) -> str:
    """``text`` fit for a header: no control characters, bounded."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())[:limit]


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class MailItem:
    """One room message as it appears in a mail."""
    sender_name: str
    body: str
    #: Already sanitised HTML, or None (the body is escaped instead).
    html: Optional[str] = None
    attachments: tuple[Attachment, ...] = ()
    #: (file name, download link) of files too large to attach.
    links: tuple[tuple[str, str], ...] = ()
    #: Lines said about it in the text (e.g. an encrypted file not attached).
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class MailHeaders:
    from_name: str
    from_address: str
    to: str
    subject: str
    message_id: str
    reply_to: str
    references: tuple[str, ...] = ()
    unsubscribe_url: Optional[str] = None
    extra: tuple[tuple[str, str], ...] = field(default_factory=tuple)


def html_of(body: str, content_format: object, formatted_body: object) -> Optional[str]:
    """The sanitised HTML of a message's content, or None for plain text."""
    if content_format == "org.matrix.custom.html" and isinstance(formatted_body, str) and formatted_body:
        cleaned = sanitise_html(formatted_body)
        return cleaned or None
    return None


def _text_part(items: list[MailItem]) -> str:
    out = []
    for item in items:
        lines = [f"{one_line(item.sender_name)} wrote:", "", item.body.rstrip()]
        for a in item.attachments:
            lines.append(f"[attached: {one_line(a.filename)}]")
        for name, url in item.links:
            lines.append(f"[{one_line(name)}: {url}]")
        lines.extend(f"[{n}]" for n in item.notes)
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def _html_part(items: list[MailItem]) -> str:
    out = ["<!DOCTYPE html><html><head><meta charset=\"utf-8\"></head><body>"]
    for item in items:
        out.append(f"<p><b>{html_lib.escape(one_line(item.sender_name))}</b> wrote:</p>")
        if item.html is not None:
            out.append(f"<div>{item.html}</div>")
        else:
            out.append("<div>" + html_lib.escape(item.body.rstrip()).replace("\n", "<br>\n") + "</div>")
        extras = [f"<li>attached: {html_lib.escape(one_line(a.filename))}</li>" for a in item.attachments]
        extras += [f"<li><a href=\"{html_lib.escape(url, quote=True)}\">{html_lib.escape(one_line(name))}</a></li>"
                   for name, url in item.links]
        extras += [f"<li>{html_lib.escape(n)}</li>" for n in item.notes]
        if extras:
            out.append("<ul>" + "".join(extras) + "</ul>")
        out.append("<hr>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def build_mail(headers: MailHeaders, items: list[MailItem]) -> EmailMessage:
    msg = EmailMessage(policy=email.policy.default)
    msg["From"] = email.utils.formataddr((one_line(headers.from_name), headers.from_address))
    msg["To"] = headers.to
    msg["Subject"] = one_line(headers.subject, 200)
    msg["Date"] = email.utils.formatdate(usegmt=True)
    msg["Message-ID"] = headers.message_id
    msg["Reply-To"] = headers.reply_to
    if headers.references:
        msg["In-Reply-To"] = headers.references[-1]
        msg["References"] = " ".join(headers.references)
    if headers.unsubscribe_url is not None:
        msg["List-Unsubscribe"] = f"<{headers.unsubscribe_url}>"
        msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    msg["Auto-Submitted"] = "no"
    for k, v in headers.extra:
        msg[k] = v
    msg.set_content(_text_part(items))
    msg.add_alternative(_html_part(items), subtype="html")
    attachments = [a for item in items for a in item.attachments]
    if attachments:
        msg.make_mixed()
        for a in attachments:
            maintype, _, subtype = a.content_type.partition("/")
            if not maintype or not subtype or maintype == "multipart":
                maintype, subtype = "application", "octet-stream"
            msg.add_attachment(a.data, maintype=maintype, subtype=subtype, filename=a.filename)
    return msg


_POLICY = email.policy.default


@functools.lru_cache(maxsize=4096)
def _folded(name: str, value: str) -> bytes:
    """The header line(s) the email package writes for ``name: value``."""
    stored = _POLICY.header_store_parse(name, value)
    return bytes(_POLICY.fold_binary(stored[0], stored[1]))


def _fast_serialise(headers: MailHeaders, items: list[MailItem]) -> Optional[bytes]:
    """What ``serialise(build_mail(headers, items), None)`` gives (with a
    Date and MIME boundary of its own), written without the email
    package's MIME objects (which cost milliseconds a mail), for the usual
    mail: no attachments, no extra headers, and text whose lines need no
    transfer encoding. None for any other: build_mail makes it."""
    if headers.extra or any(item.attachments for item in items):
        return None
    parts: list[bytes] = []
    for subtype, text in (("plain", _text_part(items)), ("html", _html_part(items))):
        cte, payload = email.contentmanager._encode_text(text, "utf-8", None, _POLICY)  # type: ignore[attr-defined]
        if cte not in ("7bit", "8bit"):
            return None
        head = f'Content-Type: text/{subtype}; charset="utf-8"\nContent-Transfer-Encoding: {cte}\n'
        if subtype == "html":
            head += "MIME-Version: 1.0\n"
        parts.append(head.encode("ascii") + b"\n" + payload.encode("ascii", "surrogateescape"))
    boundary = email.generator.Generator._make_boundary(  # type: ignore[attr-defined]
        b"".join(parts).decode("ascii", "surrogateescape"))
    top = [("From", email.utils.formataddr((one_line(headers.from_name), headers.from_address))),
           ("To", headers.to), ("Subject", one_line(headers.subject, 200)),
           ("Date", email.utils.formatdate(usegmt=True)), ("Message-ID", headers.message_id),
           ("Reply-To", headers.reply_to)]
    if headers.references:
        top += [("In-Reply-To", headers.references[-1]), ("References", " ".join(headers.references))]
    if headers.unsubscribe_url is not None:
        top += [("List-Unsubscribe", f"<{headers.unsubscribe_url}>"),
                ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click")]
    top += [("Auto-Submitted", "no"), ("MIME-Version", "1.0")]
    out = [_folded(name, value) for name, value in top]
    stored = _POLICY.header_store_parse("Content-Type", f'multipart/alternative; boundary="{boundary}"')
    out.append(bytes(_POLICY.fold_binary(stored[0], stored[1])))
    sep = f"--{boundary}\n".encode("ascii")
    out += [b"\n", sep, parts[0], b"\n", sep, parts[1], b"\n", f"--{boundary}--\n".encode("ascii")]
    return b"".join(out)


class DkimSigner:
    """Signs with one key, loaded once. ``domain`` is the From address's."""

    def __init__(self, key_pem: bytes, selector: str, domain: str) -> None:
        key = serialization.load_pem_private_key(key_pem, password=None)
        self.selector = selector.encode("ascii")
        self.domain = domain.encode("ascii")
        if isinstance(key, ed25519.Ed25519PrivateKey):
            raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                    serialization.NoEncryption())
            # dkimpy takes an Ed25519 key as the base64 of its 32 raw bytes.
            self._key = base64.b64encode(raw)
            self._algorithm = b"ed25519-sha256"
        elif isinstance(key, rsa.RSAPrivateKey):
            self._key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                          serialization.NoEncryption())
            self._algorithm = b"rsa-sha256"
        else:
            raise ValueError("the DKIM key must be RSA or Ed25519")

    @classmethod
    def from_file(cls, path: str, selector: str, domain: str) -> "DkimSigner":
        with open(path, "rb") as f:
            return cls(f.read(), selector, domain)

    def sign(self, message_lf: bytes) -> bytes:
        """``message_lf`` with its DKIM-Signature header first (LF line ends)."""
        crlf = message_lf.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        present = {line.split(b":", 1)[0].strip().lower() for line in crlf.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
                   if line and not line[:1].isspace() and b":" in line}
        sig = dkim.sign(crlf, self.selector, self.domain, self._key, canonicalize=(b"relaxed", b"simple"),
                        signature_algorithm=self._algorithm,
                        include_headers=[h for h in SIGNED_HEADERS if h in present], linesep=b"\n")
        return bytes(sig) + message_lf.replace(b"\r\n", b"\n")


def serialise(msg: EmailMessage, signer: Optional[DkimSigner]) -> bytes:
    raw = msg.as_bytes()
    return signer.sign(raw) if signer is not None else raw


#: Stand-ins for the headers that differ between the participants of one
#: batch: (header, MailHeaders field, stand-in value). Short, so never
#: folded: each is one line of the serialised mail.
_STAND_INS = (("To", "to", "zhome-to@placeholder.invalid"),
              ("Reply-To", "reply_to", "zhome-reply-to@placeholder.invalid"),
              ("List-Unsubscribe", "unsubscribe_url", "https://placeholder.invalid/u"))


def _header_value(attr: str, value: str) -> str:
    """What build_mail sets as the header of MailHeaders field ``attr``."""
    return f"<{value}>" if attr == "unsubscribe_url" else value


class MailTemplate:
    """``serialise(build_mail(headers, items), None)`` for many
    participants at once: the mail is built and serialised once, and each
    participant's copy only gets its own ``To``, ``Reply-To`` and
    ``List-Unsubscribe`` lines, folded by the same policy as the rest (the
    bytes are the ones build_mail gives, with the template's ``Date`` and
    MIME boundary). Building a mail with the email package costs
    milliseconds; a batch mailed to many participants pays that once."""

    def __init__(self, headers: MailHeaders, items: list[MailItem]) -> None:
        self.headers = headers
        self.items = items
        stand_in = dataclasses.replace(
            headers, to=_STAND_INS[0][2], reply_to=_STAND_INS[1][2],
            unsubscribe_url=None if headers.unsubscribe_url is None else _STAND_INS[2][2])
        raw = _fast_serialise(stand_in, items) or serialise(build_mail(stand_in, items), None)
        head, sep, body = raw.partition(b"\n\n")
        lines = {f"{name}: {_header_value(attr, value)}".encode(): (name, attr) for name, attr, value in _STAND_INS
                 if not (attr == "unsubscribe_url" and headers.unsubscribe_url is None)}
        parts: list[bytes | tuple[str, str]] = []
        for line in head.split(b"\n"):
            hit = lines.pop(line, None)
            parts.append(hit if hit is not None else line + b"\n")
        parts.append(sep[1:] + body)
        #: The mail in pieces: bytes as they are, (header, field) filled in;
        #: None when a stand-in was not found (each mail is built whole).
        self._parts: Optional[list[bytes | tuple[str, str]]] = None if lines else parts

    def render(self, to: str, reply_to: str, unsubscribe_url: Optional[str]) -> bytes:
        """The participant's mail, unsigned (what ``serialise(..., None)`` gives)."""
        if self._parts is None:
            return serialise(build_mail(dataclasses.replace(
                self.headers, to=to, reply_to=reply_to, unsubscribe_url=unsubscribe_url), self.items), None)
        values = {"to": to, "reply_to": reply_to, "unsubscribe_url": unsubscribe_url or ""}
        policy = email.policy.default
        out: list[bytes] = []
        for part in self._parts:
            if isinstance(part, bytes):
                out.append(part)
                continue
            name, attr = part
            stored = policy.header_store_parse(name, _header_value(attr, values[attr]))
            out.append(policy.fold_binary(stored[0], stored[1]))
        return b"".join(out)
