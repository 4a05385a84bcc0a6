"""Pure parts of the email bridge: ghost IDs, reply tokens, MIME to content."""

from __future__ import annotations

import email.policy
from email.message import EmailMessage

import pytest

from zhome.bridges.email.mime import MalformedMail, parse_mail, sanitise_html
from zhome.bridges.email.tokens import (
    address_of_ghost, ghost_localpart, parse_reply_localpart, reply_localpart, verify_reply,
)

SECRET = b"s" * 32


def _raw(text: str, html: str | None = None, **headers: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = headers.pop("From", "Zoë Example <Zoe+tag@Example.org>")
    msg["To"] = "team@mail.test"
    msg["Subject"] = "Subject line"
    for k, v in headers.items():
        msg[k.replace("_", "-")] = v
    msg.set_content(text)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    return msg.as_bytes(policy=email.policy.SMTP)


def test_ghost_localparts_are_valid_and_reversible() -> None:
    local = ghost_localpart("email_", "Zoe+Tag@Example.org")
    assert local == "email_zoe=2btag=40example.org"
    assert address_of_ghost("email_", f"@{local}:localhost") == "zoe+tag@example.org"
    assert address_of_ghost("email_", "@alice:localhost") is None
    uni = ghost_localpart("email_", "zoë@exämple.org")
    assert all(c in "abcdefghijklmnopqrstuvwxyz0123456789._=-" for c in uni)
    assert address_of_ghost("email_", f"@{uni}:localhost") == "zoë@exämple.org"


def test_reply_tokens_bind_room_event_and_sender() -> None:
    local = reply_localpart(SECRET, 7, "!room:localhost", "$event", "carol@example.com")
    assert len(local) < 64
    n, mac = parse_reply_localpart(local) or (0, "")
    assert n == 7
    assert verify_reply(SECRET, mac, "!room:localhost", "$event", "Carol@Example.com")
    assert not verify_reply(SECRET, mac, "!other:localhost", "$event", "carol@example.com")
    assert not verify_reply(SECRET, mac, "!room:localhost", "$other", "carol@example.com")
    assert not verify_reply(SECRET, mac, "!room:localhost", "$event", "mallory@example.com")
    assert not verify_reply(b"t" * 32, mac, "!room:localhost", "$event", "carol@example.com")
    assert parse_reply_localpart("team") is None
    assert parse_reply_localpart("reply+x.abc") is None


def test_html_is_cut_to_the_spec_subset() -> None:
    out = sanitise_html('<p onclick="x()">Hi <b>there</b><script>alert(1)</script><style>p{}</style>'
                        '<img src="https://tracker.example/p.gif"><a href="javascript:x()">j</a>'
                        '<font color="red" style="x">r</font><iframe src="https://e.org"></iframe></p>')
    assert out == '<p>Hi <b>there</b><a rel="noopener noreferrer">j</a><font color="red">r</font></p>'


def test_parse_text_html_and_sender() -> None:
    parsed = parse_mail(_raw("Plain text", "<p>Rich <i>text</i></p>", Message_ID="<m1@example.org>"), "mail.test")
    assert (parsed.from_address, parsed.display_name) == ("Zoe+tag@Example.org", "Zoë Example")
    assert parsed.body == "Plain text"
    assert parsed.formatted_body == "<p>Rich <i>text</i></p>"
    assert parsed.message_id == "<m1@example.org>" and parsed.not_posted is None


def test_html_only_mail_gets_a_text_body() -> None:
    msg = EmailMessage()
    msg["From"] = "a@example.org"
    msg.set_content("<p>Only <b>HTML</b></p><p>second &amp; last</p>", subtype="html")
    parsed = parse_mail(msg.as_bytes(), "mail.test")
    assert parsed.body == "Only HTML\nsecond & last"
    assert parsed.formatted_body == "<p>Only <b>HTML</b></p><p>second &amp; last</p>"


def test_quoted_history_is_stripped_and_references_ordered() -> None:
    text = "New text here.\n\nOn Tue, 1 Dec 2026, Bob <bob@example.net> wrote:\n> old text\n> older\n"
    parsed = parse_mail(_raw(text, "<p>New text here.</p><blockquote>old text</blockquote>",
                             In_Reply_To="<b@x>", References="<a@x> <b@x>"), "mail.test")
    assert parsed.body == "New text here."
    # The HTML of a reply still quotes the history: not posted.
    assert parsed.formatted_body is None
    assert parsed.references == ["<b@x>", "<b@x>", "<a@x>"]


@pytest.mark.parametrize("headers, reason", [
    ({"Auto_Submitted": "auto-replied"}, "auto-submitted"),
    ({"Auto_Submitted": "auto-generated; owner-email=x@y"}, "auto-submitted"),
    ({"Precedence": "list"}, "precedence list"),
    ({"Precedence": "junk"}, "precedence junk"),
    ({"Message_ID": "<zhome.1.abc@mail.test>"}, "loop (our own Message-ID)"),
])
def test_mail_that_is_never_posted(headers: dict[str, str], reason: str) -> None:
    assert parse_mail(_raw("x", **headers), "mail.test").not_posted == reason


def test_ordinary_mail_is_posted() -> None:
    assert parse_mail(_raw("x", Auto_Submitted="no", Precedence="first-class"), "mail.test").not_posted is None
    assert parse_mail(_raw("x", Message_ID="<zhome.1@elsewhere.org>"), "mail.test").not_posted is None


@pytest.mark.parametrize("raw", [
    b"From: a@example.org\r\nContent-Type: multipart/mixed\r\n\r\nno boundary\r\n",
    b"From: a@example.org\r\nContent-Type: multipart/mixed; boundary=zz\r\n\r\nno parts at all\r\n",
    b"Subject: no sender\r\n\r\nbody\r\n",
    b"From: a@example.org\r\nContent-Type: text/plain; charset=no-such-charset\r\n\r\nbody\r\n",
])
def test_malformed_mail(raw: bytes) -> None:
    with pytest.raises(MalformedMail):
        parse_mail(raw, "mail.test")


def test_attachments() -> None:
    msg = EmailMessage()
    msg["From"] = "a@example.org"
    msg.set_content("see attached")
    msg.add_attachment(b"\x00\x01binary", maintype="application", subtype="octet-stream", filename="../../x.bin")
    msg.add_attachment("a,b\n1,2\n", subtype="csv", filename="t.csv")
    parsed = parse_mail(msg.as_bytes(), "mail.test")
    assert parsed.body == "see attached"
    assert [(a.filename, a.content_type, a.data) for a in parsed.attachments] == [
        ("....x.bin", "application/octet-stream", b"\x00\x01binary"), ("t.csv", "text/csv", b"a,b\n1,2\n")]
