"""TLS for the Server-Server API: our listener's certificate, and trust in others'.

Spec: server-server-api "TLS" and "Resolving server names". Federation runs
over HTTPS; the destination must present a certificate signed by a trusted
authority and valid for the name discovery says (the server name or the
delegated name, or the IP address for IP literals). SNI is sent for DNS
names and never for IP addresses.

``FederationTLSPolicy`` is the client side (a Twisted ``IPolicyForHTTPS``):
by default it trusts the operating system's authorities plus
``federation.trusted_ca_files`` and checks the name with service_identity;
with ``verify_certificates: false`` it accepts any certificate (local testing
only) but still sends SNI. ``server_context_factory`` loads the listener's
certificate chain and key.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections import OrderedDict
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer


class TLSConfigError(ValueError):
    """A certificate, key or CA file cannot be used; the text names the file."""


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSConfigError(f"{what} {path}: {e.strerror or e}") from None


def load_pem_certificates(path: str, what: str = "certificate file") -> list[x509.Certificate]:
    data = _read(path, what)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise TLSConfigError(f"{what} {path}: no PEM certificate in it")
    return certs


def server_context_factory(cert_path: str, key_path: str) -> ssl.CertificateOptions:
    """Context factory for a TLS listener; TLSConfigError when unusable.

    ``cert_path`` holds the leaf certificate first, then any intermediates.
    """
    chain = load_pem_certificates(cert_path, "tls_certificate_path")
    key_data = _read(key_path, "tls_private_key_path")
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError) as e:
        raise TLSConfigError(f"tls_private_key_path {key_path}: not an unencrypted PEM private key ({e})") from None
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != chain[0].public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise TLSConfigError(
            f"tls_private_key_path {key_path} does not match the certificate in {cert_path}"
        )
    # pyOpenSSL takes cryptography objects directly (its own wrappers are
    # deprecated for contexts); Twisted passes them through.
    return ssl.CertificateOptions(
        privateKey=key,  # type: ignore[arg-type]
        certificate=chain[0],  # type: ignore[arg-type]
        extraCertChain=list(chain[1:]),  # type: ignore[arg-type]
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )


def generate_self_signed_certificate(server_name: str, days: int = 365) -> tuple[bytes, bytes]:
    """``(certificate PEM, private key PEM)`` for the host of ``server_name``.

    An IP literal gets an IP address SAN, a DNS name a DNS SAN: that is what
    peers check (see "Resolving server names").
    """
    host = split_host(server_name)
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        san = x509.DNSName(host)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def split_host(server_name: str) -> str:
    """The hostname of a server name, without port or IPv6 brackets."""
    if server_name.startswith("["):
        end = server_name.find("]")
        return server_name[1:end] if end != -1 else server_name
    if server_name.count(":") == 1:
        return server_name.split(":", 1)[0]
    return server_name


class _SystemAndExtraTrust(ssl.OpenSSLDefaultPaths):
    """The operating system's authorities plus explicitly trusted certificates."""

    def __init__(self, extra: list[crypto.X509]) -> None:
        self._extra = extra

    def _addCACertsToContext(self, context: SSL.Context) -> None:  # noqa: N802 - Twisted's name
        context.set_default_verify_paths()
        store = context.get_cert_store()
        assert store is not None
        for cert in self._extra:
            store.add_cert(cert)


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClientCreator:
    """Sends SNI for DNS names but accepts any certificate: testing only."""

    def __init__(self, context: SSL.Context, hostname: str) -> None:
        self._context = context
        self._sni = None if (isIPAddress(hostname) or isIPv6Address(hostname)) else hostname.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:  # noqa: N802, N803
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if self._sni is not None:
            connection.set_tlsext_host_name(self._sni)
        return connection


@implementer(IPolicyForHTTPS)
class FederationTLSPolicy:
    """Client TLS for federation requests.

    ``creatorForNetloc(hostname, port)`` takes the name the certificate must
    be valid for (discovery's ``tls_server_name``), which is also sent as
    SNI unless it is an IP address.
    """

    _MAX_CACHED = 1024

    def __init__(self, verify_certificates: bool = True, trusted_ca_files: tuple[str, ...] | list[str] = ()) -> None:
        self.verify_certificates = verify_certificates
        extra: list[crypto.X509] = []
        for path in trusted_ca_files:
            for cert in load_pem_certificates(path, "federation.trusted_ca_files entry"):
                extra.append(crypto.X509.from_cryptography(cert))
        self._trust_root = _SystemAndExtraTrust(extra)
        self._unverified_context: SSL.Context | None = None
        # Building a context per connection is wasteful; one per name is enough.
        self._creators: OrderedDict[str, Any] = OrderedDict()

    def creatorForNetloc(self, hostname: bytes | str, port: int) -> Any:  # noqa: N802 - Twisted's name
        name = hostname.decode("ascii") if isinstance(hostname, bytes) else hostname
        creator = self._creators.get(name)
        if creator is not None:
            self._creators.move_to_end(name)
            return creator
        if self.verify_certificates:
            creator = ssl.optionsForClientTLS(
                name, trustRoot=self._trust_root,  # type: ignore[arg-type]
                extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2}
            )
        else:
            if self._unverified_context is None:
                options = ssl.CertificateOptions(verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
                self._unverified_context = options.getContext()
            creator = _UnverifiedClientCreator(self._unverified_context, name)
        self._creators[name] = creator
        if len(self._creators) > self._MAX_CACHED:
            self._creators.popitem(last=False)
        return creator
