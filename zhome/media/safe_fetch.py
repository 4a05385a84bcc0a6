"""Fetching a URL a user named, without becoming a way into the network.

Used by URL previews (client-server-api "Content repository",
``GET /media/preview_url``). Only ``http`` and ``https`` URLs; every
connection, the first and each redirect's, resolves its host off the
reactor, refuses addresses that are not globally routable (unless
``allow_private_addresses``), and connects to exactly the address it
checked, so a name that resolves differently a moment later (DNS
rebinding) cannot slip past the check. A host matching a configured blocked
pattern is refused on any hop as well. ``https`` certificates are checked
against the system's web PKI for the URL's host. At most ``MAX_REDIRECTS``
redirects; the body is cut off at the caller's limit while it arrives (the
limit may depend on the response's Content-Type); one deadline covers
connecting, redirects and the body. Nothing here logs the URL.
"""

from __future__ import annotations

import ipaddress
import time
from fnmatch import fnmatchcase
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, ResponseDone
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, UNKNOWN_LENGTH
from zope.interface import implementer

from zhome.federation.discovery import is_public_address, lookup_addresses
from zhome.util.failures import failure_chain

MAX_REDIRECTS = 5
MAX_URL_LENGTH = 4096
# Addresses of one host tried, in the resolver's order.
MAX_ADDRESSES = 4
REDIRECT_CODES = (301, 302, 303, 307, 308)

AddressLookup = Callable[[str], Awaitable[list[str]]]


class FetchError(Exception):
    """No usable page. The text is short, names no URL, and may be logged."""


class AddressRefused(FetchError):
    """The host resolves only to addresses that may not be reached."""


class HostBlocked(AddressRefused):
    """The host matches one of the configured blocked host patterns."""


class BodyTooLarge(FetchError):
    pass


class BadUrl(ValueError):
    """A URL that is not fetched at all (the text says why, without the URL)."""


@dataclass(frozen=True)
class Fetched:
    url: str
    """Where the body came from, after redirects."""
    content_type: Optional[str]
    body: Optional[bytes]
    """None when the caller did not want a body of this Content-Type."""


def normalise_url(url: str) -> str:
    """``url`` as it is requested: ASCII (IDNA host, percent-encoded path
    and query), without the fragment. BadUrl for what is not fetched."""
    if len(url) > MAX_URL_LENGTH:
        raise BadUrl("URL is too long")
    if any(c in url for c in "\r\n\t\x00"):
        raise BadUrl("URL contains control characters")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
        host = parts.hostname
    except ValueError:
        raise BadUrl("URL is not valid") from None
    if parts.scheme not in ("http", "https"):
        raise BadUrl("Only http and https URLs can be previewed")
    if not host:
        raise BadUrl("URL has no host")
    if parts.username is not None or parts.password is not None:
        raise BadUrl("URLs with credentials are not previewed")
    try:
        ip = ipaddress.ip_address(host)
        netloc = f"[{ip}]" if ip.version == 6 else str(ip)
    except ValueError:
        try:
            netloc = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise BadUrl("URL host is not valid") from None
    if port is not None:
        netloc += f":{port}"
    path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    query = quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
    return urlunsplit((parts.scheme, netloc, path, query, ""))


# ---------------------------------------------------------------------------
# Connections


@implementer(IStreamClientEndpoint)
class _CheckedEndpoint:
    """Resolves ``host``, keeps the addresses that may be reached, connects
    to them (over TLS for ``https``, checked for ``host``) in turn."""

    def __init__(self, factory: "PublicEndpointFactory", host: str, port: int, tls: bool) -> None:
        self.factory = factory
        self.host = host
        self.port = port
        self.tls = tls

    def connect(self, protocol_factory: Any) -> "defer.Deferred[Any]":
        return defer.ensureDeferred(self._connect(protocol_factory))

    async def _connect(self, protocol_factory: Any) -> Any:
        self.factory.check_host(self.host)
        addresses = await self.factory.checked_addresses(self.host)
        reactor = self.factory.reactor
        creator = self.factory.tls_policy.creatorForNetloc(self.host.encode("ascii"), self.port) if self.tls else None
        last: Optional[Exception] = None
        for address in addresses[:MAX_ADDRESSES]:
            if ipaddress.ip_address(address).version == 6:
                tcp: Any = TCP6ClientEndpoint(reactor, address, self.port, timeout=self.factory.connect_timeout)
            else:
                tcp = TCP4ClientEndpoint(reactor, address, self.port, timeout=self.factory.connect_timeout)
            endpoint: Any = wrapClientTLS(creator, tcp) if creator is not None else tcp
            try:
                return await endpoint.connect(protocol_factory)
            except ConnectError as e:
                last = e
        raise last if last is not None else ConnectError(string="no address to connect to")


@implementer(IAgentEndpointFactory)
class PublicEndpointFactory:
    """Endpoints for ``http://`` and ``https://`` URIs that reach only
    checked addresses."""

    def __init__(self, reactor: Any, allow_private_addresses: bool = False,
                 address_lookup: Optional[AddressLookup] = None, tls_policy: Any = None,
                 connect_timeout: float = 10.0, blocked_hosts: tuple[str, ...] = ()) -> None:
        self.reactor = reactor
        self.allow_private_addresses = allow_private_addresses
        self.blocked_hosts = tuple(p.lower() for p in blocked_hosts)
        self._lookup: AddressLookup = address_lookup or (lambda host: lookup_addresses(reactor, host))
        self.tls_policy = tls_policy if tls_policy is not None else BrowserLikePolicyForHTTPS()
        self.connect_timeout = connect_timeout

    def check_host(self, host: str) -> None:
        name = host.lower()
        if any(fnmatchcase(name, pattern) for pattern in self.blocked_hosts):
            raise HostBlocked("the host is blocked by configuration")

    async def checked_addresses(self, host: str) -> list[str]:
        try:
            ipaddress.ip_address(host)
            found = [host]
        except ValueError:
            try:
                found = list(dict.fromkeys(await self._lookup(host)))
            except Exception:
                raise FetchError("cannot resolve the host") from None
        if not found:
            raise FetchError("cannot resolve the host")
        if self.allow_private_addresses:
            return found
        allowed = [a for a in found if is_public_address(a)]
        if not allowed:
            raise AddressRefused("the host has only non-public addresses")
        return allowed

    def endpointForURI(self, uri: Any) -> Any:  # noqa: N802 - Twisted's name
        if uri.scheme not in (b"http", b"https"):
            raise SchemeNotSupported(f"unsupported scheme {uri.scheme!r}")
        host = uri.host.decode("ascii")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        return _CheckedEndpoint(self, host, uri.port, uri.scheme == b"https")


# ---------------------------------------------------------------------------
# Bodies


class _BodyReader(Protocol):
    def __init__(self, done: "defer.Deferred[bytes]", limit: int) -> None:
        self.done = done
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.done.errback(BodyTooLarge("the body is larger than allowed"))
            self.stop()
            return
        self.parts.append(data)

    def stop(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: N802, B008
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(FetchError("the connection was lost while reading the body"))


class _Discard(Protocol):
    def connectionMade(self) -> None:  # noqa: N802
        assert self.transport is not None
        self.transport.stopProducing()


async def _read_body(response: Any, limit: int) -> bytes:
    if response.length is not UNKNOWN_LENGTH and response.length > limit:
        response.deliverBody(_Discard())
        raise BodyTooLarge("the body is larger than allowed")
    reader: Optional[_BodyReader] = None

    def cancel(_: object) -> None:
        # On the deadline: close the connection rather than read on unheard.
        if reader is not None:
            reader.stop()

    d: defer.Deferred[bytes] = defer.Deferred(cancel)
    reader = _BodyReader(d, limit)
    response.deliverBody(reader)
    return await d


# ---------------------------------------------------------------------------
# The fetcher


def _header(response: Any, name: bytes) -> Optional[str]:
    values = response.headers.getRawHeaders(name)
    return values[0].decode("latin-1") if values else None


class SafeFetcher:
    """GETs a URL through ``PublicEndpointFactory`` connections."""

    def __init__(self, reactor: Any, allow_private_addresses: bool = False, user_agent: str = "zhome",
                 address_lookup: Optional[AddressLookup] = None, tls_policy: Any = None,
                 blocked_hosts: tuple[str, ...] = ()) -> None:
        self.reactor = reactor
        self.endpoints = PublicEndpointFactory(reactor, allow_private_addresses, address_lookup, tls_policy,
                                               blocked_hosts=blocked_hosts)
        # No connection is kept: each request resolves and checks afresh.
        self.agent = Agent.usingEndpointFactory(reactor, self.endpoints,
                                                pool=HTTPConnectionPool(reactor, persistent=False))
        self.headers = Headers({
            b"User-Agent": [user_agent.encode("ascii", "replace")],
            b"Accept": [b"text/html,application/xhtml+xml,image/*;q=0.9,*/*;q=0.5"],
        })

    async def fetch(self, url: str, body_limit: Callable[[Optional[str]], Optional[int]],
                    deadline: float) -> Fetched:
        """GET ``url`` (already normalised), following redirects, by the
        ``time.monotonic()`` ``deadline``. ``body_limit(content_type)`` is the
        most bytes to read of a 2xx body, None to leave it unread. Raises
        FetchError (AddressRefused, BodyTooLarge) or BadUrl for a redirect
        to something that is not fetched."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchError("timed out")
        d = defer.ensureDeferred(self._fetch(url, body_limit))
        timed_out = [False]

        def on_timeout(result: Any, timeout: float) -> Any:
            timed_out[0] = True
            return result

        d.addTimeout(remaining, self.reactor, onTimeoutCancel=on_timeout)
        try:
            return await d
        except (FetchError, BadUrl):
            raise
        except defer.CancelledError:
            raise FetchError("timed out") from None
        except Exception as e:
            if timed_out[0]:
                raise FetchError("timed out") from None
            # The Agent may wrap what an endpoint raised (AddressRefused).
            cause = _reason(e)
            raise cause if isinstance(cause, FetchError) else FetchError(cause) from None

    async def _fetch(self, url: str, body_limit: Callable[[Optional[str]], Optional[int]]) -> Fetched:
        for _ in range(MAX_REDIRECTS + 1):
            response = await self.agent.request(b"GET", url.encode("ascii"), self.headers)
            if response.code in REDIRECT_CODES:
                location = _header(response, b"Location")
                response.deliverBody(_Discard())
                if not location:
                    raise FetchError(f"redirect ({response.code}) without a Location")
                url = normalise_url(urljoin(url, location.strip()))
                continue
            if not 200 <= response.code < 300:
                response.deliverBody(_Discard())
                raise FetchError(f"answered {response.code}")
            content_type = _header(response, b"Content-Type")
            limit = body_limit(content_type)
            if limit is None:
                response.deliverBody(_Discard())
                return Fetched(url, content_type, None)
            return Fetched(url, content_type, await _read_body(response, limit))
        raise FetchError("too many redirects")


def _reason(error: BaseException) -> FetchError | str:
    """The FetchError behind a failed request, else a short, URL-free reason."""
    seen = failure_chain(error)
    for exc in seen:
        if isinstance(exc, FetchError):
            return exc
        module = type(exc).__module__
        if module.startswith(("OpenSSL", "service_identity")):
            return "TLS failed (certificate or handshake)"
        if isinstance(exc, ConnectError):
            return "cannot connect"
    return type(seen[-1] if seen else error).__name__
