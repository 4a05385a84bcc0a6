"""The mail library on its own database (as the email bridge will run it),
against a real SMTP server on loopback (aiosmtpd): STARTTLS with AUTH
required, implicit TLS, a permanent refusal dropped, a relay that is down
retried with backoff until it is up; recipients and bodies sealed."""

from __future__ import annotations

import datetime
import ssl
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import pytest_twisted
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from twisted.internet import task

from tests.e2e.harness import free_port
from tests.e2e.mailsink import MailSink, _Handler, body_of
from zhome.mail.compose import compose
from zhome.mail.outbox import MailOutbox, ensure_schema
from zhome.mail.smtp import MailSendError, SmtpRelay
from zhome.storage.at_rest import PREFIX, Sealer
from zhome.storage.database import Database
from zhome.storage.ids import IdGenerator
from zhome.util.reactor import reactor


def _self_signed(tmp_path: Path) -> ssl.SSLContext:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "smtp.crt", tmp_path / "smtp.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert_path), str(key_path))
    return ctx


class _Refusing:
    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,  # noqa: N802
                          rcpt_options: Any) -> str:
        return "550 5.1.1 no such user"


def _authenticator(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and auth_data.login == b"zhome" and auth_data.password == b"s3cret"
    return AuthResult(success=ok, handled=False)


async def _wait(what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        await task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


async def _outbox(db_config: tuple[str, dict[str, Any]], tmp_path: Path, relay: Any,
                  **kw: Any) -> tuple[Database, Sealer, MailOutbox]:
    engine, args = db_config
    db = Database(engine, args)
    await ensure_schema(db)  # no zhome migrations: the table alone
    sealer = Sealer(str(tmp_path / "master.key"), str(tmp_path / "keystore.db"))
    outbox = MailOutbox(db, await IdGenerator.from_table(db, "mail_outbox", "id"), sealer, relay, **kw)
    return db, sealer, outbox


async def _rows(db: Database) -> list[tuple[Any, ...]]:
    return await db.execute("rows", "SELECT recipient, message, attempts, next_attempt_ts FROM mail_outbox")


@pytest_twisted.ensureDeferred
async def test_starttls_with_auth_sealed_and_sent_once(db_config: tuple[str, dict[str, Any]],
                                                      tmp_path: Path) -> None:
    sink = MailSink(free_port())
    sink.controller = Controller(_Handler(sink), hostname="127.0.0.1", port=sink.port,
                                 tls_context=_self_signed(tmp_path), require_starttls=True,
                                 authenticator=_authenticator, auth_require_tls=True)
    sink.controller.start()
    relay = SmtpRelay("127.0.0.1", sink.port, user="zhome", password="s3cret", require_transport_security=True,
                      verify_certificate=False, timeout_s=10)
    db, sealer, outbox = await _outbox(db_config, tmp_path, relay)
    try:
        sent: list[int] = []
        outbox.on_sent.append(sent.append)
        # Not started yet: queued durably, sealed.
        msg = compose("zhome <noreply@example.org>", "patient@example.org", "Hello", "the body text")
        row = await outbox.enqueue("noreply@example.org", "patient@example.org", msg)
        rows = await _rows(db)
        assert len(rows) == 1 and "patient" not in rows[0][0] and "body text" not in rows[0][1]
        assert rows[0][0].startswith(PREFIX) and rows[0][1].startswith(PREFIX)
        outbox.start()
        mails = await _wait("the mail", lambda: sink.to("patient@example.org"))
        assert body_of(mails[0]).strip() == "the body text" and mails[0]["Subject"] == "Hello"
        await _wait("the row gone", lambda: sent)
        assert sent == [row] and await outbox.pending() == 0
        await task.deferLater(reactor, 0.5, lambda: None)
        assert len(sink.to("patient@example.org")) == 1
    finally:
        await outbox.stop()
        sink.stop()
        await db.close()
        sealer.close()


@pytest_twisted.ensureDeferred
async def test_wrong_password_and_no_tls_are_not_sent(db_config: tuple[str, dict[str, Any]],
                                                     tmp_path: Path) -> None:
    sink = MailSink(free_port())
    sink.controller = Controller(_Handler(sink), hostname="127.0.0.1", port=sink.port,
                                 tls_context=_self_signed(tmp_path), require_starttls=True,
                                 authenticator=_authenticator, auth_require_tls=True)
    sink.controller.start()
    plain = MailSink(free_port()).start()  # offers no STARTTLS
    try:
        msg = compose("a@example.org", "b@example.org", "x", "y")
        with pytest.raises(MailSendError):
            await SmtpRelay("127.0.0.1", sink.port, user="zhome", password="wrong",
                            verify_certificate=False, timeout_s=10).send("a@example.org", "b@example.org", msg)
        with pytest.raises(MailSendError):
            await SmtpRelay("127.0.0.1", plain.port, require_transport_security=True,
                            timeout_s=10).send("a@example.org", "b@example.org", msg)
        assert sink.mails == [] and plain.mails == []
        # Without the requirement the plain relay takes it.
        await SmtpRelay("127.0.0.1", plain.port, timeout_s=10).send("a@example.org", "b@example.org", msg)
        assert len(plain.to("b@example.org")) == 1
    finally:
        sink.stop()
        plain.stop()


@pytest_twisted.ensureDeferred
async def test_implicit_tls(tmp_path: Path) -> None:
    sink = MailSink(free_port())
    sink.controller = Controller(_Handler(sink), hostname="127.0.0.1", port=sink.port,
                                 ssl_context=_self_signed(tmp_path))
    sink.controller.start()
    try:
        relay = SmtpRelay("127.0.0.1", sink.port, force_tls=True, require_transport_security=True,
                          verify_certificate=False, timeout_s=10)
        await relay.send("a@example.org", "c@example.org", compose("a@example.org", "c@example.org", "t", "z"))
        assert len(sink.to("c@example.org")) == 1
    finally:
        sink.stop()


@pytest_twisted.ensureDeferred
async def test_permanent_refusal_drops_and_down_relay_retries(db_config: tuple[str, dict[str, Any]],
                                                             tmp_path: Path) -> None:
    refusing = Controller(_Refusing(), hostname="127.0.0.1", port=free_port())
    refusing.start()
    db, sealer, outbox = await _outbox(db_config, tmp_path, SmtpRelay("127.0.0.1", refusing.port, timeout_s=10),
                                       min_backoff_s=0.3, max_backoff_s=1.0)
    try:
        outbox.start()
        await outbox.enqueue("a@example.org", "gone@example.org", compose("a@example.org", "gone@example.org",
                                                                          "s", "b"))
        deadline = time.monotonic() + 10
        while await outbox.pending() and time.monotonic() < deadline:
            await task.deferLater(reactor, 0.1, lambda: None)
        assert await outbox.pending() == 0
    finally:
        await outbox.stop()
        refusing.stop()
    # A relay that is down: retried with backoff, sent once it is up.
    port = free_port()
    outbox.relay = SmtpRelay("127.0.0.1", port, timeout_s=5)
    outbox.start()
    try:
        await outbox.enqueue("a@example.org", "later@example.org", compose("a@example.org", "later@example.org",
                                                                           "s", "b"))
        rows: list[Any] = []

        async def attempts() -> int:
            rows[:] = await _rows(db)
            return int(rows[0][2]) if rows else 0

        deadline = time.monotonic() + 10
        while await attempts() < 2 and time.monotonic() < deadline:
            await task.deferLater(reactor, 0.1, lambda: None)
        assert rows and int(rows[0][2]) >= 2
        sink = MailSink(port).start()
        try:
            await _wait("the retried mail", lambda: sink.to("later@example.org"))
            deadline = time.monotonic() + 10
            while await outbox.pending() and time.monotonic() < deadline:
                await task.deferLater(reactor, 0.1, lambda: None)
            assert await outbox.pending() == 0
            assert len(sink.to("later@example.org")) == 1
        finally:
            sink.stop()
    finally:
        await outbox.stop()
        await db.close()
        sealer.close()



class _Counting(_Handler):
    """A sink that counts its SMTP sessions and can drop one mid-way: on
    the ``drop_at``-th mail of its first session it keeps nothing and closes
    the connection (a relay that goes away in the middle of a batch)."""

    def __init__(self, sink: MailSink, drop_at: int = 0) -> None:
        super().__init__(sink)
        #: Each session seen (kept: an ID is not reused while its object lives).
        self.sessions: list[Any] = []
        self.first: Any = None
        self.in_first = 0
        self.drop_at = drop_at
        self.dropped = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        if not any(s is session for s in self.sessions):
            self.sessions.append(session)
        if self.first is None:
            self.first = session
        if session is self.first:
            self.in_first += 1
            if self.in_first == self.drop_at:
                self.dropped += 1
                server.transport.close()
                return "421 4.3.0 going away"
        return await super().handle_DATA(server, session, envelope)


def _subjects(sink: MailSink, rcpt: str) -> list[str]:
    return [str(m["Subject"]) for m in sink.to(rcpt)]


@pytest_twisted.ensureDeferred
async def test_several_mails_per_connection_in_order_per_recipient(db_config: tuple[str, dict[str, Any]],
                                                                   tmp_path: Path) -> None:
    sink = MailSink(free_port())
    handler = _Counting(sink)
    sink.controller = Controller(handler, hostname="127.0.0.1", port=sink.port)
    sink.controller.start()
    db, sealer, outbox = await _outbox(db_config, tmp_path, SmtpRelay("127.0.0.1", sink.port, timeout_s=10),
                                       connections=2)
    try:
        rcpts = [f"p{i}@example.org" for i in range(3)]
        for n in range(8):
            for r in rcpts:
                await outbox.enqueue("a@example.org", r, compose("a@example.org", r, f"mail {n}", "text"))
        outbox.start()
        await _wait("every mail", lambda: len(sink.mails) == 24)
        deadline = time.monotonic() + 10
        while await outbox.pending() and time.monotonic() < deadline:
            await task.deferLater(reactor, 0.05, lambda: None)
        assert await outbox.pending() == 0
        # Two connections for 24 mails; each recipient's mails in order.
        assert len(handler.sessions) == 2
        for r in rcpts:
            assert _subjects(sink, r) == [f"mail {n}" for n in range(8)]
    finally:
        await outbox.stop()
        sink.stop()
        await db.close()
        sealer.close()


@pytest_twisted.ensureDeferred
async def test_a_relay_failing_mid_batch_loses_nothing(db_config: tuple[str, dict[str, Any]],
                                                       tmp_path: Path) -> None:
    sink = MailSink(free_port())
    handler = _Counting(sink, drop_at=3)
    sink.controller = Controller(handler, hostname="127.0.0.1", port=sink.port)
    sink.controller.start()
    db, sealer, outbox = await _outbox(db_config, tmp_path, SmtpRelay("127.0.0.1", sink.port, timeout_s=10),
                                       connections=1, min_backoff_s=0.3, max_backoff_s=1.0)
    sent: list[int] = []
    outbox.on_sent.append(sent.append)
    try:
        ids = [await outbox.enqueue("a@example.org", "p@example.org",
                                    compose("a@example.org", "p@example.org", f"mail {n}", "text")) for n in range(6)]
        outbox.start()
        # The first two went through before the relay went away: their rows
        # are gone at once; the other four wait for their retry.
        rows: list[Any] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            rows = await db.execute("t", "SELECT id, attempts FROM mail_outbox ORDER BY id")
            if len(rows) == 4 and all(int(r[1]) == 1 for r in rows):
                break
            await task.deferLater(reactor, 0.02, lambda: None)
        assert handler.dropped == 1 and sent == ids[:2]
        assert [int(r[0]) for r in rows] == ids[2:] and all(int(r[1]) == 1 for r in rows)
        await _wait("every mail", lambda: len(sink.mails) == 6)
        deadline = time.monotonic() + 10
        while await outbox.pending() and time.monotonic() < deadline:
            await task.deferLater(reactor, 0.05, lambda: None)
        assert await outbox.pending() == 0
        assert _subjects(sink, "p@example.org") == [f"mail {n}" for n in range(6)]
        assert sorted(sent) == ids
    finally:
        await outbox.stop()
        sink.stop()
        await db.close()
        sealer.close()
