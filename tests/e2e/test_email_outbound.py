"""The email bridge's outbound mail end to end: a real ``zhome run`` with
the bridge, an aiosmtpd sink as the relay, room messages sent through the
Client-Server API. One server is shared by the checks (in order) to keep
the run short: coalescing, sanitised HTML, DKIM, attachments and signed
links, threading headers, one-click unsubscribe, a restart between a
message and its due time, and quiet period 0.
"""

from __future__ import annotations

import base64
import email.policy
import sqlite3
import time
import urllib.error
import urllib.parse
import urllib.request
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Optional

import dkim
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.e2e.harness import ZhomeProcess, free_port, q
from tests.e2e.mailsink import MailSink, body_of
from tests.e2e.dnsstub import DnsStub
from tests.e2e.test_email_bridge import DOMAIN, MailRoom, dns, ghost, mail, wait_for  # noqa: F401 - dns fixture
from zhome.bridges.email.links import derive_key, download_sig

BOB, CAROL = "bob@example.net", "carol@example.org"


def _http(method: str, url: str, data: Optional[bytes] = None,
          content_type: str = "application/x-www-form-urlencoded") -> tuple[int, bytes, Any]:
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers


def _local(hs: ZhomeProcess, url: str) -> str:
    """A link of a mail, on this test's server (public_baseurl is 127.0.0.1 too)."""
    parts = urllib.parse.urlsplit(url)
    return hs.base_url + parts.path + ("?" + parts.query if parts.query else "")


def _html(msg: EmailMessage) -> str:
    part = msg.get_body(preferencelist=("html",))
    assert part is not None
    return str(part.get_content())


def _participant_known(r: MailRoom, user_id: str) -> bool:
    with sqlite3.connect(r.bridge_db) as conn:
        row = conn.execute("SELECT membership FROM ghost_members WHERE user_id = ? AND room_id = ?",
                           (user_id, r.room_id)).fetchone()
    return row is not None and row[0] in ("join", "invite")


def _queued(r: MailRoom) -> int:
    with sqlite3.connect(r.bridge_db) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM outbound_events").fetchone()[0])


def test_outbound_mail(zhome_factory: Any, tmp_path: Path, dns: DnsStub) -> None:  # noqa: F811
    key = ed25519.Ed25519PrivateKey.generate()
    key_path = tmp_path / "dkim.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    record = b"v=DKIM1; k=ed25519; p=" + base64.b64encode(
        key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return record if name == f"sel1._domainkey.{DOMAIN}.".encode() else b""

    sink = MailSink(free_port()).start()
    try:
        smtp_port = free_port()
        hs = zhome_factory(overrides={
            "email": {"smtp_host": "127.0.0.1", "smtp_port": sink.port, "notif_from": f"zhome <noreply@{DOMAIN}>"},
            "email_bridge": {"enabled": True, "mail_domain": DOMAIN, "smtp_listen": f"127.0.0.1:{smtp_port}",
                             "appservice_listen": f"127.0.0.1:{free_port()}", "quiet_period_ms": 500,
                             "max_attachment_size": 4096, "dkim_key_path": str(key_path),
                             "dkim_selector": "sel1", "dns_servers": [dns.address]}})
        hs.start()
        r = MailRoom(hs, smtp_port)
        r.alice.ok("PUT", f"/rooms/{q(r.room_id)}/state/m.room.name/", {"name": "Care team"})
        r.enable_address()
        for address in (BOB, CAROL):
            r.alice.ok("POST", f"/rooms/{q(r.room_id)}/invite", {"user_id": ghost(address)})
            wait_for(lambda: _participant_known(r, ghost(address)), "the ghost known to the bridge")
        room = q(r.room_id)

        # 1. A burst of three messages: one mail per participant, all three in order.
        sent = [r.alice.ok("PUT", f"/rooms/{room}/send/m.room.message/b{i}", content)["event_id"] for i, content in
                enumerate([{"msgtype": "m.text", "body": "First of three."},
                           {"msgtype": "m.text", "body": "Second of three.", "format": "org.matrix.custom.html",
                            "formatted_body": "<p>Second <b>of</b> three.<script>alert('x')</script></p>"},
                           {"msgtype": "m.text", "body": "Third of three."}])]
        first: dict[str, EmailMessage] = {}
        for address in (BOB, CAROL):
            got = sink.wait_for(address)
            text = body_of(got[0])
            assert text.index("First of three.") < text.index("Second of three.") < text.index("Third of three.")
            assert text.count("alice wrote") == 3
            html = _html(got[0])
            assert "<b>of</b>" in html and "script" not in html and "alert" not in html
            assert got[0]["Subject"] == "New messages in Care team"
            assert got[0]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
            assert str(got[0]["Reply-To"]).startswith("reply+")
            raw = got[0].as_bytes(policy=email.policy.SMTP)
            assert dkim.verify(raw, dnsfunc=dnsfunc)
            assert not dkim.verify(raw.replace(b"Third of three.", b"Third of four."), dnsfunc=dnsfunc)
            first[address] = got[0]
        time.sleep(1.0)
        assert len(sink.to(BOB)) == 1 and len(sink.to(CAROL)) == 1
        assert first[BOB]["Message-ID"] == first[CAROL]["Message-ID"]

        # 1b. Mail from one email participant reaches the other, not its sender.
        r.send(mail("Bob writes to the team.", sender=f"Bob <{BOB}>"), mail_from=BOB)
        forwarded = sink.wait_for(CAROL, 2)[1]
        assert "Bob writes to the team." in body_of(forwarded) and "Bob wrote" in body_of(forwarded)
        assert len(sink.to(BOB)) == 1

        # 2. Text and an image: one mail, the image attached, the same bytes.
        png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 3
        up_status, up = hs.request("POST", "/_matrix/media/v3/upload?filename=photo.png", raw=png,
                                   token=r.alice.token, headers={"Content-Type": "image/png"})
        assert up_status == 200, up
        r.alice.ok("PUT", f"/rooms/{room}/send/m.room.message/t1", {"msgtype": "m.text", "body": "Here is a photo"})
        r.alice.ok("PUT", f"/rooms/{room}/send/m.room.message/t2", {
            "msgtype": "m.image", "body": "photo.png", "url": up["content_uri"],
            "info": {"mimetype": "image/png", "size": len(png)}})
        two = sink.wait_for(BOB, 2)[1]
        assert "Here is a photo" in body_of(two)
        atts = list(two.iter_attachments())
        assert len(atts) == 1 and atts[0].get_filename() == "photo.png" and atts[0].get_content() == png

        # 3. A file over the cap: a signed link, downloadable without login;
        # tampered or expired refused.
        big = b"%PDF-1.4\n" + bytes(range(256)) * 40
        _, up = hs.request("POST", "/_matrix/media/v3/upload?filename=report.pdf", raw=big, token=r.alice.token,
                           headers={"Content-Type": "application/pdf"})
        r.alice.ok("PUT", f"/rooms/{room}/send/m.room.message/f1", {
            "msgtype": "m.file", "body": "report.pdf", "url": up["content_uri"],
            "info": {"mimetype": "application/pdf", "size": len(big)}})
        three = sink.wait_for(BOB, 3)[2]
        assert list(three.iter_attachments()) == []
        link = next(w for w in body_of(three).replace("]", " ").split() if "/_zhome/email/v1/download/" in w)
        status, data, headers = _http("GET", _local(hs, link))
        assert status == 200 and data == big and headers["Content-Type"] == "application/pdf"
        assert "attachment" in headers["Content-Disposition"] or "inline" in headers["Content-Disposition"]
        status, _, _ = _http("GET", _local(hs, link.replace("sig=", "sig=x")))
        assert status == 403
        server_name, media_id = up["content_uri"][len("mxc://"):].split("/")
        reg = yaml.safe_load((hs.workdir / "data" / "email_bridge_registration.yaml").read_text())
        dkey = derive_key(reg["as_token"], b"zhome email links v1")
        past = int(time.time() * 1000) - 1000
        expired = (f"{hs.base_url}/_zhome/email/v1/download/{server_name}/{media_id}"
                   f"?exp={past}&sig={download_sig(dkey, server_name, media_id, past)}")
        status, body, _ = _http("GET", expired)
        assert status == 403 and b"M_FORBIDDEN" in body and b"expired" in body
        status, _, _ = _http("GET", link.split("?")[0].replace(link.split("/_zhome")[0], hs.base_url))
        assert status == 403

        # 4. A Matrix reply and a thread: In-Reply-To/References name our first mail.
        reply_id = r.alice.ok("PUT", f"/rooms/{room}/send/m.room.message/r1", {
            "msgtype": "m.text", "body": "A reply to the first.",
            "m.relates_to": {"m.in_reply_to": {"event_id": sent[0]}}})["event_id"]
        four = sink.wait_for(BOB, 4)[3]
        assert "A reply to the first." in body_of(four)
        assert four["In-Reply-To"] == first[BOB]["Message-ID"]
        assert first[BOB]["Message-ID"] in str(four["References"])
        assert str(four["Subject"]).startswith("Re: ")
        # In a thread rooted at the second message: the root's mail and the
        # replied-to event's mail.
        r.alice.ok("PUT", f"/rooms/{room}/send/m.room.message/th1", {
            "msgtype": "m.text", "body": "In the thread.",
            "m.relates_to": {"rel_type": "m.thread", "event_id": sent[1], "is_falling_back": True,
                             "m.in_reply_to": {"event_id": reply_id}}})
        five = sink.wait_for(BOB, 5)[4]
        assert "In the thread." in body_of(five)
        assert str(five["References"]).split() == [first[BOB]["Message-ID"], four["Message-ID"]]
        assert five["In-Reply-To"] == four["Message-ID"] and five["Subject"] == four["Subject"]

        # 5. One-click unsubscribe: GET does nothing, a bad token is 403, POST leaves.
        unsub = _local(hs, str(first[CAROL]["List-Unsubscribe"]).strip("<>"))
        status, page, _ = _http("GET", unsub)
        assert status == 200 and b"<form method=\"post\"" in page
        assert _participant_known(r, ghost(CAROL))
        status, _, _ = _http("POST", unsub.replace("t=", "t=A"), b"List-Unsubscribe=One-Click")
        assert status == 403
        status, _, _ = _http("POST", unsub, b"nothing")
        assert status == 400
        status, page, _ = _http("POST", unsub, b"List-Unsubscribe=One-Click")
        assert status == 200 and b"Unsubscribed" in page
        state = r.alice.ok("GET", f"/rooms/{room}/state/m.room.member/{q(ghost(CAROL))}")
        assert state["membership"] == "leave" and state["reason"] == "Unsubscribed by email"
        status, _, _ = _http("POST", unsub, b"List-Unsubscribe=One-Click")
        assert status == 200  # again: the same answer, nothing more
        wait_for(lambda: not _participant_known(r, ghost(CAROL)), "the bridge to see Carol leave")
        carol_mails = len(sink.to(CAROL))

        # 6. Restart between the message and its due time: mailed exactly once.
        r.alice.ok("PUT", f"/rooms/{room}/send/m.room.message/k1", {"msgtype": "m.text", "body": "Across a crash."})
        wait_for(lambda: _queued(r) > 0 or len(sink.to(BOB)) > 5, "the message queued", timeout=10)
        queued_before_kill = _queued(r) > 0
        hs.stop(kill=True)
        hs.start()
        wait_for(lambda: len(sink.to(BOB)) >= 6, "the mail after the restart")
        time.sleep(1.5)
        assert [m for m in sink.to(BOB) if "Across a crash." in body_of(m)] == [sink.to(BOB)[5]]
        assert len(sink.to(BOB)) == 6 and queued_before_kill
        assert len(sink.to(CAROL)) == carol_mails == 6  # unsubscribed: nothing more

        # 7. Quiet period 0: mailed promptly.
        cfg = yaml.safe_load(hs.config_path.read_text())
        cfg["email_bridge"]["quiet_period_ms"] = 0
        hs.config_path.write_text(yaml.safe_dump(cfg))
        hs.restart()
        wait_for(lambda: r.rcpt_code(f"team@{DOMAIN}") == 250, "the bridge back")
        started = time.monotonic()
        r.alice.ok("PUT", f"/rooms/{room}/send/m.room.message/z1", {"msgtype": "m.text", "body": "No waiting."})
        sink.wait_for(BOB, 7, timeout=10)
        assert time.monotonic() - started < 2.0
        assert "No waiting." in body_of(sink.to(BOB)[6])
    finally:
        sink.stop()


def test_undelivered_mail_is_told_in_the_room(zhome_factory: Any, dns: DnsStub) -> None:  # noqa: F811
    """The relay refuses one participant's address for good: the room hears
    that this participant did not get the messages, and the bridge stops
    mailing them; the other participant's mail goes on as before."""
    gone = "nobody@example.net"
    sink = MailSink(free_port()).start()
    sink.refuse.add(gone)
    try:
        smtp_port = free_port()
        hs = zhome_factory(overrides={
            "email": {"smtp_host": "127.0.0.1", "smtp_port": sink.port, "notif_from": f"zhome <noreply@{DOMAIN}>"},
            "email_bridge": {"enabled": True, "mail_domain": DOMAIN, "smtp_listen": f"127.0.0.1:{smtp_port}",
                             "appservice_listen": f"127.0.0.1:{free_port()}", "quiet_period_ms": 0,
                             "dns_servers": [dns.address]}})
        hs.start()
        r = MailRoom(hs, smtp_port)
        r.enable_address()
        for address in (BOB, gone):
            r.alice.ok("POST", f"/rooms/{q(r.room_id)}/invite", {"user_id": ghost(address)})
            wait_for(lambda: _participant_known(r, ghost(address)), "the ghost known to the bridge")
        room = q(r.room_id)
        r.alice.ok("PUT", f"/rooms/{room}/send/m.room.message/u1", {"msgtype": "m.text", "body": "Anyone there?"})
        sink.wait_for(BOB)

        def notice() -> Any:
            for ev in r.alice.ok("GET", f"/rooms/{room}/messages?dir=b&limit=50")["chunk"]:
                body = ev["content"].get("body", "")
                if ev["type"] == "m.room.message" and ev["content"].get("msgtype") == "m.notice" \
                        and ghost(gone) in body and "not delivered" in body:
                    return ev
            return None

        ev = wait_for(notice, "the notice of the undelivered mail")
        assert ev["sender"].startswith("@emailbot:"), ev
        assert "no more mail" in ev["content"]["body"]
        assert gone not in ev["content"]["body"]  # the ghost's ID, never the address
        # Stopped: the next message goes to Bob only, and no second notice.
        r.alice.ok("PUT", f"/rooms/{room}/send/m.room.message/u2", {"msgtype": "m.text", "body": "Second try."})
        sink.wait_for(BOB, 2)
        time.sleep(1.0)
        notices = [e for e in r.alice.ok("GET", f"/rooms/{room}/messages?dir=b&limit=50")["chunk"]
                   if e["content"].get("msgtype") == "m.notice" and "not delivered" in e["content"].get("body", "")]
        assert len(notices) == 1, notices
        assert sink.to(gone) == []
    finally:
        sink.stop()


def test_link_pages_are_rate_limited_per_address(zhome_factory: Any, dns: DnsStub) -> None:  # noqa: F811
    smtp_port = free_port()
    hs = zhome_factory(rate_limits=True, overrides={
        "rate_limits": {"enabled": True, "email_links": {"per_second": 0.01, "burst_count": 3}},
        "email_bridge": {"enabled": True, "mail_domain": DOMAIN, "smtp_listen": f"127.0.0.1:{smtp_port}",
                         "appservice_listen": f"127.0.0.1:{free_port()}", "dns_servers": [dns.address]}})
    hs.start()
    wait_for(lambda: hs.request("GET", "/_zhome/email/v1/unsubscribe?t=nothing")[0] != 404, "the link pages")
    codes = [_http("GET", hs.base_url + "/_zhome/email/v1/unsubscribe?t=nothing")[0] for _ in range(4)]
    # The wait above took one; two more invalid-link pages (403), then refused.
    assert codes[:2] == [403, 403] and codes[2:] == [429, 429], codes
    status, _, _ = _http("GET", hs.base_url + "/_zhome/email/v1/download/localhost/abc?exp=1&sig=x")
    assert status == 429
