"""A received mail to Matrix event content.

RFC 5322 and MIME (RFC 2045-2049) parsed with Python's ``email`` package
(``policy.default``); RFC 3834 ``Auto-Submitted`` and the de-facto
``Precedence`` header mark mail that is never posted (auto-replies, lists).
Spec: client-server-api "m.room.message msgtypes" (``m.text`` with
``org.matrix.custom.html``, ``m.image``, ``m.file``) and "Rich replies";
the HTML kept is the specification's suggested allowed subset, enforced by
nh3 (a binding of the ammonia sanitiser). Quoted history of replies is
removed with mail-parser-reply.
"""

from __future__ import annotations

import email.errors
import email.policy
import email.utils
import html as html_lib
import re
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Optional

import nh3
from mailparser_reply import EmailReplyParser

# client-server-api "m.room.message msgtypes": the HTML tags and attributes
# clients are expected to accept. ``img`` is left out: in mail it loads a
# remote (often tracking) image, and Matrix only allows mxc: sources.
ALLOWED_TAGS = {
    "font", "del", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "p", "a", "ul", "ol", "sup", "sub",
    "li", "b", "i", "u", "strong", "em", "s", "code", "hr", "br", "div", "table", "thead", "tbody", "tr",
    "th", "td", "caption", "pre", "span", "details", "summary",
}
ALLOWED_ATTRIBUTES = {
    "font": {"data-mx-bg-color", "data-mx-color", "color"},
    "span": {"data-mx-bg-color", "data-mx-color", "data-mx-spoiler"},
    "a": {"href", "target"},
    "ol": {"start"},
    "code": {"class"},
}
URL_SCHEMES = {"https", "http", "ftp", "mailto", "magnet"}
# Removed with everything inside them, not just their tags.
DROP_WITH_CONTENT = {"script", "style", "head", "title", "noscript", "template"}

# Defects that mean the structure cannot be trusted to give the sender's text.
_FATAL_DEFECTS = (
    email.errors.NoBoundaryInMultipartDefect,
    email.errors.StartBoundaryNotFoundDefect,
    email.errors.MultipartInvariantViolationDefect,
    email.errors.CloseBoundaryNotFoundDefect,
)
_MAX_PARTS = 200
_MAX_BODY_CHARS = 60_000
_reply_parser = EmailReplyParser(languages=["en", "de", "fr", "nl", "es", "it"])


class MalformedMail(Exception):
    """The mail cannot be turned into a message; the text is a short reason
    with no content of the mail."""


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    data: bytes


@dataclass
class ParsedMail:
    from_address: str
    display_name: str
    message_id: Optional[str]
    #: In-Reply-To first, then References newest first.
    references: list[str]
    subject: str
    body: str
    formatted_body: Optional[str]
    attachments: list[Attachment] = field(default_factory=list)
    #: Why it must not be posted (auto-reply, list mail), or None.
    not_posted: Optional[str] = None


def sanitise_html(html: str) -> str:
    return nh3.clean(html, tags=ALLOWED_TAGS, clean_content_tags=DROP_WITH_CONTENT, attributes=ALLOWED_ATTRIBUTES,
                     url_schemes=URL_SCHEMES, strip_comments=True, link_rel="noopener noreferrer").strip()


def html_to_text(html: str) -> str:
    text = re.sub(r"(?i)<br\s*/?>|</p>|</div>|</li>|</h[1-6]>|</tr>", "\n", html)
    text = nh3.clean(text, tags=set(), clean_content_tags=DROP_WITH_CONTENT, strip_comments=True)
    text = html_lib.unescape(text)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(line.rstrip() for line in text.splitlines())).strip()


def _msg_ids(value: Optional[str]) -> list[str]:
    return re.findall(r"<[^<>\s]{1,250}>", value or "")


def auto_submitted_reason(msg: EmailMessage) -> Optional[str]:
    auto = str(msg.get("Auto-Submitted", "") or "").strip().lower()
    if auto and auto.split(";")[0].strip() != "no":
        return "auto-submitted"
    precedence = str(msg.get("Precedence", "") or "").strip().lower()
    if precedence in ("bulk", "list", "junk"):
        return "precedence " + precedence
    return None


def _text_of(part: EmailMessage) -> str:
    try:
        content = part.get_content()
    except (LookupError, ValueError, AssertionError) as e:
        raise MalformedMail(f"undecodable text part ({type(e).__name__})") from None
    return content if isinstance(content, str) else content.decode("utf-8", "replace")


def parse_mail(raw: bytes, own_message_id_domain: str) -> ParsedMail:
    """The content of ``raw``; raises MalformedMail."""
    try:
        msg = BytesParser(policy=email.policy.default).parsebytes(raw)
    except Exception as e:  # the parser is lenient; anything raised is a broken mail
        raise MalformedMail(f"unparseable ({type(e).__name__})") from None
    assert isinstance(msg, EmailMessage)
    parts = list(msg.walk())
    if len(parts) > _MAX_PARTS:
        raise MalformedMail("too many MIME parts")
    for part in parts:
        if any(isinstance(d, _FATAL_DEFECTS) for d in part.defects):
            raise MalformedMail("broken MIME structure")
    try:
        from_header = str(msg.get("From", "") or "")
    except Exception:
        raise MalformedMail("unreadable From header") from None
    name, address = email.utils.parseaddr(from_header)
    if "@" not in address or any(c.isspace() for c in address):
        raise MalformedMail("no sender address in From")
    ids = _msg_ids(str(msg.get("Message-ID", "") or ""))
    message_id: Optional[str] = ids[0] if ids else None
    references = _msg_ids(str(msg.get("In-Reply-To", "") or "")) + list(
        reversed(_msg_ids(str(msg.get("References", "") or ""))))
    parsed = ParsedMail(address, name.strip() or address, message_id, references,
                        str(msg.get("Subject", "") or "")[:300], "", None)
    parsed.not_posted = auto_submitted_reason(msg)
    if parsed.not_posted is None and message_id is not None and (
            message_id.lower().endswith("@" + own_message_id_domain.lower() + ">")
            and message_id.lower().startswith("<zhome.")):
        parsed.not_posted = "loop (our own Message-ID)"
    if parsed.not_posted is not None:
        return parsed

    plain = msg.get_body(preferencelist=("plain",))
    html_part = msg.get_body(preferencelist=("html",))
    text = _text_of(plain) if isinstance(plain, EmailMessage) else None
    html = _text_of(html_part) if isinstance(html_part, EmailMessage) else None
    if text is None and html is not None:
        text = html_to_text(html)
    text = (text or "").replace("\r\n", "\n").strip()
    reply = _reply_parser.parse_reply(text=text).strip() if text else ""
    quoted = bool(reply) and reply != text
    body = reply if reply else text
    parsed.body = body[:_MAX_BODY_CHARS]
    if html is not None and not quoted:
        # A reply's HTML still holds the quoted history (in any of many
        # client-specific forms); its stripped text is posted alone.
        cleaned = sanitise_html(html)
        if cleaned and len(cleaned) <= _MAX_BODY_CHARS:
            parsed.formatted_body = cleaned
    for part in msg.iter_attachments():
        if not isinstance(part, EmailMessage) or part.is_multipart():
            continue
        try:
            data = part.get_content()
        except (LookupError, ValueError, AssertionError) as e:
            raise MalformedMail(f"undecodable attachment ({type(e).__name__})") from None
        if isinstance(data, str):
            data = data.encode("utf-8")
        elif isinstance(data, EmailMessage):
            data = data.as_bytes()
        filename = part.get_filename() or "attachment"
        filename = "".join(c for c in filename if c.isprintable() and c not in "/\\")[:200] or "attachment"
        parsed.attachments.append(Attachment(filename, part.get_content_type(), bytes(data)))
    if not parsed.body and not parsed.attachments:
        parsed.body = parsed.subject or "(empty mail)"
    return parsed


def text_content(parsed: ParsedMail) -> dict[str, object]:
    content: dict[str, object] = {"msgtype": "m.text", "body": parsed.body}
    if parsed.formatted_body:
        content["format"] = "org.matrix.custom.html"
        content["formatted_body"] = parsed.formatted_body
    return content
