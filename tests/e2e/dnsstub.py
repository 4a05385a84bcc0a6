"""A DNS server on 127.0.0.1 (UDP and TCP, dnslib's server in threads)
answering TXT and A records from a dict, for the email bridge's sender
checks: DKIM keys (``selector._domainkey.domain``), SPF and ``_dmarc``.

``records`` maps a name (no trailing dot, any case) to a list of
``("TXT", "text")`` or ``("A", "1.2.3.4")``; it may be changed while the
server runs. A name in ``servfail`` answers SERVFAIL. ``dkim_key`` makes
an RSA key (cryptography) and its ``_domainkey`` record.
"""

from __future__ import annotations

import threading
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dnslib import QTYPE, RCODE, RR, A, DNSRecord, TXT
from dnslib.server import BaseResolver, DNSServer

from tests.e2e.harness import free_port


def _free_port() -> int:
    # One port free for both UDP and TCP.
    return free_port(udp=True)


def _txt_chunks(text: str) -> list[bytes]:
    data = text.encode("ascii")
    return [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]


class _Resolver(BaseResolver):  # type: ignore[misc]
    def __init__(self, stub: "DnsStub") -> None:
        self.stub = stub

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        qname = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        with self.stub.lock:
            self.stub.queries.append((qname, qtype))
            if qname in self.stub.servfail:
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            records = list(self.stub.records.get(qname, []))
            known = qname in self.stub.records
        for rtype, value in records:
            if rtype != qtype:
                continue
            if rtype == "TXT":
                reply.add_answer(RR(request.q.qname, QTYPE.TXT, rdata=TXT(_txt_chunks(value)), ttl=1))
            elif rtype == "A":
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(value), ttl=1))
        if not known:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


class DnsStub:
    def __init__(self, records: dict[str, list[tuple[str, str]]] | None = None) -> None:
        self.lock = threading.Lock()
        self.records: dict[str, list[tuple[str, str]]] = {k.lower(): v for k, v in (records or {}).items()}
        self.servfail: set[str] = set()
        self.queries: list[tuple[str, str]] = []
        self.port = _free_port()
        resolver = _Resolver(self)
        self._servers = [DNSServer(resolver, address="127.0.0.1", port=self.port, tcp=tcp, logger=_Quiet())
                         for tcp in (False, True)]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set(self, name: str, *records: tuple[str, str]) -> None:
        with self.lock:
            self.records[name.lower()] = list(records)

    def start(self) -> "DnsStub":
        for s in self._servers:
            s.start_thread()
        return self

    def stop(self) -> None:
        for s in self._servers:
            s.stop()


class _Quiet:
    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


def dkim_key() -> tuple[bytes, str]:
    """(private key PEM for dkim.sign, the TXT record of its public key)."""
    import base64

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode("ascii")
