"""The bridge's outbound mail on its own: MIME structure, sanitised HTML,
DKIM signatures checked with dkimpy against the public key, the signed
download and unsubscribe links, and the relay's certificate checked
against a configured CA file (aiosmtpd with STARTTLS and AUTH on loopback),
and one batch through the mailer with the homeserver down, then up."""

from __future__ import annotations

import base64
import datetime
import email
import email.policy
import ipaddress
import re
import ssl
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import dkim
import pytest
import pytest_twisted
from aiosmtpd.controller import Controller
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from tests.e2e.harness import free_port
from tests.e2e.mailsink import MailSink, _Handler
from tests.mail.test_outbox import _authenticator
from zhome.bridges.email.compose import (
    Attachment, DkimSigner, MailHeaders, MailItem, MailTemplate, build_mail, html_of, serialise,
)
from zhome.bridges.email.links import (
    check_download, check_unsubscribe, derive_key, download_sig, download_url, unsubscribe_token,
)
from zhome.mail.smtp import MailSendError, SmtpRelay


def _headers(**kw: Any) -> MailHeaders:
    base: dict[str, Any] = dict(from_name="Alice", from_address="noreply@mail.test", to="bob@example.net",
                                subject="New messages in Care", message_id="<zhome.abc@mail.test>",
                                reply_to="reply+1.aaaa@mail.test", references=("<root@x>", "<parent@x>"),
                                unsubscribe_url="https://hs.test/_zhome/email/v1/unsubscribe?t=T")
    base.update(kw)
    return MailHeaders(**base)


def _parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def test_structure_html_and_threading_headers() -> None:
    html = html_of("hi", "org.matrix.custom.html", "<p>hi <b>there</b><script>alert(1)</script>"
                                                   "<img src='https://tracker.example/x.png'></p>")
    assert html is not None and "script" not in html and "alert" not in html and "img" not in html
    items = [MailItem("Alice", "first line\nsecond", html=html),
             MailItem("Carol <c>", "see the photo", attachments=(Attachment("p.png", "image/png", b"\x89PNG..."),)),
             MailItem("Alice", "big.bin", links=(("big.bin", "https://hs.test/dl?sig=1"),))]
    msg = _parse(serialise(build_mail(_headers(), items), None))
    assert msg.get_content_type() == "multipart/mixed"
    alt = next(p for p in msg.iter_parts() if p.get_content_type() == "multipart/alternative")
    assert [p.get_content_type() for p in alt.iter_parts()] == ["text/plain", "text/html"]
    plain = str(msg.get_body(("plain",)).get_content())  # type: ignore[union-attr]
    # In event order, each introduced by its sender.
    assert plain.index("Alice wrote") < plain.index("Carol <c> wrote") < plain.index("https://hs.test/dl?sig=1")
    html_part = str(msg.get_body(("html",)).get_content())  # type: ignore[union-attr]
    assert "<b>there</b>" in html_part and "script" not in html_part and "Carol &lt;c&gt;" in html_part
    att = [p for p in msg.iter_attachments()]
    assert len(att) == 1 and att[0].get_filename() == "p.png" and att[0].get_content() == b"\x89PNG..."
    assert msg["In-Reply-To"] == "<parent@x>" and msg["References"] == "<root@x> <parent@x>"
    assert msg["List-Unsubscribe"] == "<https://hs.test/_zhome/email/v1/unsubscribe?t=T>"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert msg["Reply-To"] == "reply+1.aaaa@mail.test" and msg["Message-ID"] == "<zhome.abc@mail.test>"
    # Plain text only: the HTML is the escaped body.
    msg2 = _parse(serialise(build_mail(_headers(references=()), [MailItem("A", "x < y & z")]), None))
    assert msg2.get_content_type() == "multipart/alternative" and msg2["In-Reply-To"] is None
    assert "x &lt; y &amp; z" in str(msg2.get_body(("html",)).get_content())  # type: ignore[union-attr]


def _dns_for(record: bytes) -> Any:
    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return record if name == b"zhome._domainkey.mail.test." else b""
    return dnsfunc


@pytest.mark.parametrize("variant", ["plain", "attachment", "no_unsubscribe", "long_and_unicode"])
def test_a_template_gives_each_participant_the_mail_build_mail_gives(variant: str) -> None:
    items = [MailItem("Alice", "hello", html="<p>hello</p>"), MailItem("Bob", "second")]
    kw: dict[str, Any] = {}
    if variant == "attachment":
        items.append(MailItem("Carol", "p.png", attachments=(Attachment("p.png", "image/png", b"\x89PNG" * 40),)))
    if variant == "no_unsubscribe":
        kw["unsubscribe_url"] = None
    if variant == "long_and_unicode":
        kw["from_name"] = "Zoë Ünïcode-Ärztin"
    template = MailTemplate(_headers(**kw), items)
    for n, to in enumerate(["bob@example.net", "dana@example.org"]):
        unsub = None if variant == "no_unsubscribe" else f"https://hs.test/_zhome/email/v1/unsubscribe?t={n}"
        reply = f"reply+{n}.bbbb@mail.test"
        if variant == "long_and_unicode":
            to = "d" * 70 + "@example.org"
            unsub = "https://hs.test/_zhome/email/v1/unsubscribe?t=" + "x" * 150
            reply = "reply+" + "9" * 60 + ".cccc@mail.test"
        got = template.render(to, reply, unsub)
        want = serialise(build_mail(_headers(**{**kw, "to": to, "reply_to": reply, "unsubscribe_url": unsub}), items),
                         None)

        def same(raw: bytes) -> bytes:  # the Date and the MIME boundary are the template's own
            return re.sub(rb"=+[0-9]+==", b"BOUNDARY", re.sub(rb"\nDate: [^\n]*", b"", raw))
        assert same(got) == same(want)
        msg = _parse(got)
        assert msg["To"] == to and msg["Reply-To"] == reply
        assert (msg["List-Unsubscribe"] is None) if unsub is None else (msg["List-Unsubscribe"] == f"<{unsub}>")


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_dkim_signature_verifies(kind: str) -> None:
    if kind == "rsa":
        key: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pub = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(pub)
    else:
        key = ed25519.Ed25519PrivateKey.generate()
        pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        record = b"v=DKIM1; k=ed25519; p=" + base64.b64encode(pub)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    signer = DkimSigner(pem, "zhome", "mail.test")
    raw = serialise(build_mail(_headers(), [MailItem("Alice", "signed body\n.leading dot")]), signer)
    assert raw.startswith(b"DKIM-Signature:") and b"\r\n" not in raw
    on_wire = raw.replace(b"\n", b"\r\n")
    assert dkim.verify(on_wire, dnsfunc=_dns_for(record))
    sig = _parse(raw)["DKIM-Signature"]
    for h in ("from", "to", "subject", "message-id", "reply-to", "list-unsubscribe", "references"):
        assert h in str(sig).replace(" ", "").lower().split("h=", 1)[1].split(";", 1)[0].split(":")
    # A changed body or header no longer verifies.
    assert not dkim.verify(on_wire.replace(b"signed body", b"forged body"), dnsfunc=_dns_for(record))
    assert not dkim.verify(on_wire.replace(b"New messages in Care", b"Pay now"), dnsfunc=_dns_for(record))


def test_download_and_unsubscribe_links() -> None:
    key = derive_key("as-token", b"zhome email links v1")
    url = download_url("https://hs.test/", key, "mxc://hs.test/abcDEF", 2_000_000_000_000)
    assert url is not None and url.startswith("https://hs.test/_zhome/email/v1/download/hs.test/abcDEF?exp=")
    sig = download_sig(key, "hs.test", "abcDEF", 2_000_000_000_000)
    assert check_download(key, "hs.test", "abcDEF", "2000000000000", sig, now_ms=1) is None
    assert check_download(key, "hs.test", "other", "2000000000000", sig, now_ms=1) == "bad signature"
    assert check_download(key, "hs.test", "abcDEF", "2000000000001", sig, now_ms=1) == "bad signature"
    assert check_download(key, "hs.test", "abcDEF", "2000000000000", sig, now_ms=2_000_000_000_001) \
        == "the link has expired"
    assert check_download(derive_key("other", b"zhome email links v1"), "hs.test", "abcDEF", "2000000000000",
                          sig, now_ms=1) == "bad signature"
    assert check_download(key, "hs.test", "abcDEF", None, sig) is not None
    ukey = derive_key("as-token", b"zhome email unsubscribe v1")
    token = unsubscribe_token(ukey, "!room:hs.test", "@email_bob=40x:hs.test")
    assert check_unsubscribe(ukey, token) == ("!room:hs.test", "@email_bob=40x:hs.test")
    assert check_unsubscribe(key, token) is None  # the download key is another key
    payload, mac = token.split(".")
    forged = base64.urlsafe_b64encode(b"!other:hs.test\x00@email_bob=40x:hs.test").decode().rstrip("=")
    assert check_unsubscribe(ukey, forged + "." + mac) is None
    assert check_unsubscribe(ukey, "garbage") is None and check_unsubscribe(ukey, None) is None


def _cert(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "relay.crt", tmp_path / "relay.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert_path), str(key_path))
    return ctx, cert_path


@pytest_twisted.ensureDeferred
async def test_relay_certificate_checked_against_the_ca_file(tmp_path: Path) -> None:
    ctx, ca = _cert(tmp_path)
    other_ctx, other_ca = _cert(tmp_path / "other") if (tmp_path / "other").mkdir() is None else (None, None)
    sink = MailSink(free_port())
    sink.controller = Controller(_Handler(sink), hostname="127.0.0.1", port=sink.port, tls_context=ctx,
                                 require_starttls=True, authenticator=_authenticator, auth_require_tls=True)
    sink.controller.start()
    implicit = MailSink(free_port())
    implicit.controller = Controller(_Handler(implicit), hostname="127.0.0.1", port=implicit.port, ssl_context=ctx,
                                     # (aiosmtpd counts only STARTTLS as TLS for this check)
                                     authenticator=_authenticator, auth_require_tls=False)
    implicit.controller.start()
    msg = b"From: a@mail.test\nTo: b@example.org\nSubject: t\n\nbody\n"
    try:
        # STARTTLS + AUTH, the certificate checked against the CA file.
        await SmtpRelay("127.0.0.1", sink.port, user="zhome", password="s3cret", require_transport_security=True,
                        ca_file=str(ca), timeout_s=10).send("a@mail.test", "b@example.org", msg)
        # Implicit TLS + AUTH, likewise.
        await SmtpRelay("127.0.0.1", implicit.port, user="zhome", password="s3cret", force_tls=True,
                        require_transport_security=True, ca_file=str(ca),
                        timeout_s=10).send("a@mail.test", "c@example.org", msg)
        assert len(sink.to("b@example.org")) == 1 and len(implicit.to("c@example.org")) == 1
        # Another CA's certificate (or the system's store) does not vouch for it.
        assert other_ca is not None
        for kw in ({"ca_file": str(other_ca)}, {}):
            with pytest.raises(MailSendError):
                await SmtpRelay("127.0.0.1", sink.port, user="zhome", password="s3cret",
                                require_transport_security=True, timeout_s=10,
                                **kw).send("a@mail.test", "d@example.org", msg)
        assert sink.to("d@example.org") == []
    finally:
        sink.stop()
        implicit.stop()


class _FakeHomeserver:
    """The few Client-Server calls the mailer makes; ``down`` makes them fail."""

    def __init__(self) -> None:
        self.down = True
        self.calls = 0

    async def state_event(self, room_id: str, event_type: str, state_key: str) -> dict[str, Any]:
        from zhome.bridges.email.hsclient import HomeserverUnreachable

        self.calls += 1
        if self.down:
            raise HomeserverUnreachable("ConnectionRefusedError")
        return {"name": "Ward 3"} if event_type == "m.room.name" else {"displayname": "Dr Alice"}

    async def displayname(self, user_id: str) -> str:
        return "Dr Alice"

    async def download(self, mxc: str, max_bytes: int) -> Any:
        raise AssertionError("no media in this test")


@pytest_twisted.ensureDeferred
async def test_a_batch_waits_when_the_homeserver_is_down_then_goes_out_once(tmp_path: Path) -> None:
    from zhome.bridges.email.outbound import OutboundMailer, OutboundSettings
    from zhome.bridges.email.store import BridgeStore
    from zhome.mail.outbox import MailOutbox, ensure_schema
    from zhome.storage.database import Database
    from zhome.storage.ids import IdGenerator

    db = Database("sqlite3", {"database": str(tmp_path / "bridge.db")})
    store = BridgeStore(db, None)
    await store.setup()
    await ensure_schema(db)
    outbox = MailOutbox(db, await IdGenerator.from_table(db, "mail_outbox", "id"), None, relay=None)  # type: ignore[arg-type]
    hs = _FakeHomeserver()
    mailer = OutboundMailer(store, hs, outbox, b"s" * 32, OutboundSettings(  # type: ignore[arg-type]
        mail_domain="mail.test", from_address="noreply@mail.test", quiet_period_ms=0, ghost_prefix="email_",
        server_name="hs.test", public_baseurl="https://hs.test/", as_token="tok"))
    room = "!r:hs.test"
    try:
        for address in ("bob@example.net", "carol@example.org"):
            from zhome.bridges.email.tokens import ghost_localpart

            await store.set_membership(room, f"@{ghost_localpart('email_', address)}:hs.test", "join")
        for i in range(3):
            await mailer.queue({"room_id": room, "event_id": f"$e{i}", "sender": "@alice:hs.test",
                                "content": {"msgtype": "m.text", "body": f"message {i}"}})
        await mailer._mail_room(room)
        # Not built: nothing handed over, the rows wait (not due now).
        assert await outbox.pending() == 0
        assert len(await store.room_outbound(room, 10)) == 3 and await store.due_outbound_rooms(10) == []
        hs.down = False
        await store.postpone_outbound_rows([r[0] for r in await store.room_outbound(room, 10)], -1000)
        await mailer._mail_room(room)
        # One mail per participant, the rows gone, the Message-ID remembered
        # for every event it carried; a second pass sends nothing more.
        assert await outbox.pending() == 2 and await store.room_outbound(room, 10) == []
        mid = (await store.message_ids_of("$e2"))[0]
        assert await store.message_ids_of("$e0") == [mid] and mid.endswith("@mail.test>")
        await mailer._mail_room(room)
        assert await outbox.pending() == 2
    finally:
        await db.close()


def test_the_fast_serialiser_writes_what_the_email_package_writes() -> None:
    import random

    from zhome.bridges.email.compose import _fast_serialise

    def same(raw: bytes) -> bytes:  # the Date and the MIME boundary are its own
        return re.sub(rb"=+[0-9]+==(\.[0-9]+)?", b"BOUNDARY", re.sub(rb"\nDate: [^\n]*", b"", raw))

    rng = random.Random(2)
    words = ["hello", "Grüße", "<b>x</b>", "line\nbreak", "--", "=?utf-8?q?x?=", "\ttab", ".", "From x", "\r\n",
             "&amp;", "日本", "a" * 90]
    fast = 0
    for _ in range(300):
        items = [MailItem(rng.choice(["Alice", "Zoë Ärztin", "Bob <b>", "x" * 100]),
                          " ".join(rng.choice(words) for _ in range(rng.randint(0, 5))),
                          rng.choice([None, "<p>hi</p>", "<p>Grüße</p>"]), (),
                          rng.choice([(), (("f.bin", "https://x/y"),)]), rng.choice([(), ("a note",)]))
                 for _ in range(rng.randint(1, 3))]
        h = _headers(from_name=items[-1].sender_name,
                     subject=rng.choice(["New messages in Care", "Re: New messages in " + "R" * 90, "Ünï"]),
                     references=rng.choice([(), ("<root@x>", "<parent@x>")]),
                     unsubscribe_url=rng.choice([None, "https://hs.test/u?t=" + "T" * rng.randint(1, 150)]))
        got = _fast_serialise(h, items)
        if got is None:
            continue  # lines that need a transfer encoding: build_mail writes those
        fast += 1
        assert same(got) == same(serialise(build_mail(h, items), None))
    assert fast > 100
    # Attachments are left to build_mail.
    assert _fast_serialise(_headers(), [MailItem("A", "f", attachments=(Attachment("f", "text/plain", b"x"),))]) is None
