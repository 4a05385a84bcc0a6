"""A real SMTP server on loopback (aiosmtpd) that keeps what it receives."""

from __future__ import annotations

import email
import email.policy
import re
import threading
import time
from email.message import EmailMessage
from typing import Any, Optional

from aiosmtpd.controller import Controller


class _Handler:
    def __init__(self, sink: "MailSink") -> None:
        self.sink = sink

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,  # noqa: N802
                          rcpt_options: Any) -> str:
        if address in self.sink.refuse:
            return "550 5.1.1 No such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's name
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with self.sink.lock:
            self.sink.mails.append((envelope.mail_from, list(envelope.rcpt_tos), msg))
        return "250 OK"


class MailSink:
    def __init__(self, port: int) -> None:
        self.port = port
        self.lock = threading.Lock()
        self.mails: list[tuple[str, list[str], EmailMessage]] = []
        #: Recipients refused at RCPT with 550 (a mailbox that does not exist).
        self.refuse: set[str] = set()
        self.controller: Optional[Controller] = None

    def start(self) -> "MailSink":
        self.controller = Controller(_Handler(self), hostname="127.0.0.1", port=self.port)
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def to(self, address: str) -> list[EmailMessage]:
        with self.lock:
            return [m for _f, rcpt, m in self.mails if address in rcpt]

    def wait_for(self, address: str, count: int = 1, timeout: float = 30.0) -> list[EmailMessage]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.to(address)
            if len(got) >= count:
                return got
            time.sleep(0.1)
        raise AssertionError(f"no mail #{count} to the address within {timeout}s (got {len(self.to(address))})")


def body_of(msg: EmailMessage) -> str:
    part = msg.get_body(preferencelist=("plain",))
    assert part is not None
    return str(part.get_content())


def link_in(msg: EmailMessage) -> str:
    m = re.search(r"(https?://\S+)", body_of(msg))
    assert m, body_of(msg)
    return m.group(1)
