"""Server discovery: from a server name to an address, Host header and TLS name.

Spec: server-server-api "Resolving server names" (and appendix "Server
Name"). In order:

1. an IP literal is used as is, with its port or 8448;
2. a hostname with an explicit port is resolved with AAAA/A records;
3. otherwise ``https://<hostname>/.well-known/matrix/server`` may delegate to
   ``<delegated_hostname>[:<delegated_port>]``, handled like 1, 2, or by SRV
   (``_matrix-fed._tcp`` then the deprecated ``_matrix._tcp``) and 8448;
4. without delegation, SRV records for the hostname;
5. otherwise the hostname on port 8448.

Well-known answers are cached per their Cache-Control (default 24 hours, at
most 48) and failures for an hour; whole resolutions for a few minutes, since
DNS answers change. Both caches are bounded. Unless
``allow_private_addresses`` is set, addresses that are not globally routable
(loopback, RFC 1918, link-local, ...) are refused, so a server name cannot
be used to reach the internal network.

The DNS and HTTP look-ups are injectable callables, so tests need neither.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import random
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_PORT = 8448
WELL_KNOWN_DEFAULT_TTL = 24 * 3600.0
WELL_KNOWN_MAX_TTL = 48 * 3600.0
WELL_KNOWN_ERROR_TTL = 3600.0
RESOLUTION_TTL = 600.0
WELL_KNOWN_MAX_SIZE = 64 * 1024
MAX_REDIRECTS = 5


class ResolutionError(Exception):
    """The server name cannot be turned into a usable address."""


class PrivateAddressRefused(ResolutionError):
    """The server name resolves only to addresses we may not connect to."""


@dataclass(frozen=True)
class ResolvedServer:
    """Where and how to connect for one server name.

    ``host`` is what the addresses came from (an IP literal or a hostname);
    ``addresses`` are the checked IP addresses to try, in order.
    """

    host: str
    port: int
    host_header: str
    tls_server_name: str
    addresses: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class SrvRecord:
    priority: int
    weight: int
    target: str
    port: int


@dataclass(frozen=True)
class WellKnownResponse:
    code: int
    body: bytes
    cache_control: str | None = None


# Injectable look-ups.
WellKnownFetcher = Callable[[str], Awaitable[WellKnownResponse]]
SrvLookup = Callable[[str], Awaitable[list[SrvRecord]]]
AddressLookup = Callable[[str], Awaitable[list[str]]]


_HOSTNAME = re.compile(r"[A-Za-z0-9.-]{1,255}")


def parse_server_name(name: str) -> tuple[str, int | None]:
    """``(host, port or None)``; IPv6 hosts come without brackets.

    ValueError when ``name`` is not a valid server name.
    """
    if not isinstance(name, str) or not name:
        raise ValueError("empty server name")
    port_text: str | None = None
    if name.startswith("["):
        end = name.find("]")
        if end == -1:
            raise ValueError(f"bad server name {name!r}")
        host, rest = name[1:end], name[end + 1 :]
        ipaddress.IPv6Address(host)
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"bad server name {name!r}")
            port_text = rest[1:]
    else:
        host = name
        if ":" in name:
            host, port_text = name.rsplit(":", 1)
        if not _HOSTNAME.fullmatch(host) or host.startswith(".") or ".." in host:
            raise ValueError(f"bad server name {name!r}")
    port: int | None = None
    if port_text is not None:
        if not re.fullmatch(r"[0-9]{1,5}", port_text) or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"bad port in server name {name!r}")
        port = int(port_text)
    return host, port


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def parse_cache_control(value: str | None) -> float:
    """Seconds to cache a well-known answer for."""
    if not value:
        return WELL_KNOWN_DEFAULT_TTL
    directives = [d.strip().lower() for d in value.split(",")]
    if "no-store" in directives or "no-cache" in directives:
        return 0.0
    for d in directives:
        if d.startswith("max-age="):
            try:
                return min(max(float(int(d[8:].strip('"'))), 0.0), WELL_KNOWN_MAX_TTL)
            except ValueError:
                break
    return WELL_KNOWN_DEFAULT_TTL


def _delegated_name(response: WellKnownResponse) -> str | None:
    """``m.server`` from a valid well-known response, else None."""
    if response.code != 200 or len(response.body) > WELL_KNOWN_MAX_SIZE:
        return None
    try:
        body = json.loads(response.body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict):
        return None
    delegated = body.get("m.server")
    if not isinstance(delegated, str):
        return None
    try:
        parse_server_name(delegated)
    except ValueError:
        return None
    return delegated


def _with_port(host: str, port: int | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if port is None else f"{shown}:{port}"


class _TTLCache:
    """A small bounded mapping whose entries expire."""

    def __init__(self, clock: Callable[[], float], max_entries: int) -> None:
        self._clock = clock
        self._max = max_entries
        self._data: OrderedDict[str, tuple[float, Any]] = OrderedDict()

    def get(self, key: str) -> tuple[bool, Any]:
        item = self._data.get(key)
        if item is None:
            return False, None
        expires, value = item
        if expires <= self._clock():
            del self._data[key]
            return False, None
        return True, value

    def set(self, key: str, value: Any, ttl: float) -> None:
        if ttl <= 0:
            self._data.pop(key, None)
            return
        self._data[key] = (self._clock() + ttl, value)
        self._data.move_to_end(key)
        while len(self._data) > self._max:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


class ServerResolver:
    """Resolves server names per the spec, with caching.

    Without injected look-ups it uses the reactor's name resolver, Twisted
    Names for SRV, and HTTPS (through ``tls_policy``) for well-known.
    """

    def __init__(
        self,
        *,
        allow_private_addresses: bool = False,
        reactor: Any = None,
        tls_policy: Any = None,
        well_known_fetcher: WellKnownFetcher | None = None,
        srv_lookup: SrvLookup | None = None,
        address_lookup: AddressLookup | None = None,
        clock: Callable[[], float] | None = None,
        max_cache_entries: int = 10000,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.allow_private_addresses = allow_private_addresses
        self._tls_policy = tls_policy
        self._fetch_well_known = well_known_fetcher or self._default_fetch_well_known
        self._lookup_srv = srv_lookup or _default_srv_lookup
        self._lookup_addresses = address_lookup or self._default_address_lookup
        self._clock = clock or time.monotonic
        self._well_known = _TTLCache(self._clock, max_cache_entries)
        self._resolved = _TTLCache(self._clock, max_cache_entries)

    # -- public --------------------------------------------------------------

    async def resolve(self, server_name: str) -> ResolvedServer:
        hit, cached = self._resolved.get(server_name)
        if hit:
            return cached
        resolved = await self._resolve(server_name)
        self._resolved.set(server_name, resolved, RESOLUTION_TTL)
        return resolved

    def clear_cache(self) -> None:
        self._well_known.clear()
        self._resolved.clear()

    # -- the algorithm ---------------------------------------------------------

    async def _resolve(self, server_name: str) -> ResolvedServer:
        try:
            host, port = parse_server_name(server_name)
        except ValueError as e:
            raise ResolutionError(str(e)) from None
        # Step 1: IP literal.
        if is_ip_literal(host):
            return self._ip_literal(host, port, host_header=server_name)
        # Step 2: hostname with explicit port.
        if port is not None:
            return await self._hostname_at(host, port, host_header=server_name, tls_name=host)
        # Step 3: well-known delegation.
        delegated = await self._well_known_for(host)
        if delegated is not None:
            d_host, d_port = parse_server_name(delegated)
            if is_ip_literal(d_host):
                return self._ip_literal(d_host, d_port, host_header=delegated)
            if d_port is not None:
                return await self._hostname_at(d_host, d_port, host_header=delegated, tls_name=d_host)
            return await self._srv_or_default(d_host)
        # Steps 4 and 5.
        return await self._srv_or_default(host)

    def _ip_literal(self, ip: str, port: int | None, host_header: str) -> ResolvedServer:
        addresses = self._checked([ip], ip)
        return ResolvedServer(ip, port or DEFAULT_PORT, host_header, ip, addresses)

    async def _hostname_at(self, host: str, port: int, host_header: str, tls_name: str) -> ResolvedServer:
        addresses = await self._addresses(host)
        return ResolvedServer(host, port, host_header, tls_name, addresses)

    async def _srv_or_default(self, host: str) -> ResolvedServer:
        # The certificate and Host header are for ``host`` even when SRV
        # points elsewhere: DNS is not authenticated, TLS is.
        for service in ("_matrix-fed._tcp.", "_matrix._tcp."):
            try:
                records = await self._lookup_srv(service + host)
            except Exception as e:  # DNS errors mean "no SRV record"
                logger.debug("SRV lookup %s%s failed: %s", service, host, e)
                records = []
            records = [r for r in records if r.target not in ("", ".")]
            last_error: ResolutionError | None = None
            for record in _srv_order(records):
                target = record.target.rstrip(".")
                try:
                    addresses = await self._addresses(target)
                except ResolutionError as e:
                    last_error = e
                    continue
                return ResolvedServer(target, record.port, host, host, addresses)
            if last_error is not None:
                raise last_error
        return await self._hostname_at(host, DEFAULT_PORT, host_header=host, tls_name=host)

    async def _well_known_for(self, host: str) -> str | None:
        hit, cached = self._well_known.get(host)
        if hit:
            return cached
        try:
            response = await self._fetch_well_known(host)
        except Exception as e:
            logger.info("No /.well-known/matrix/server for %s: %s", host, e)
            self._well_known.set(host, None, WELL_KNOWN_ERROR_TTL)
            return None
        delegated = _delegated_name(response)
        if delegated is None:
            self._well_known.set(host, None, WELL_KNOWN_ERROR_TTL)
        else:
            self._well_known.set(host, delegated, parse_cache_control(response.cache_control))
        return delegated

    # -- addresses -------------------------------------------------------------

    def _checked(self, addresses: list[str], host: str) -> tuple[str, ...]:
        if self.allow_private_addresses:
            return tuple(addresses)
        allowed = tuple(a for a in addresses if is_public_address(a))
        if not allowed:
            raise PrivateAddressRefused(
                f"{host} resolves only to non-public addresses (federation.allow_private_addresses is false)"
            )
        return allowed

    async def _addresses(self, host: str) -> tuple[str, ...]:
        if is_ip_literal(host):
            return self._checked([host], host)
        try:
            found = await self._lookup_addresses(host)
        except Exception as e:
            raise ResolutionError(f"cannot resolve {host}: {e}") from None
        if not found:
            raise ResolutionError(f"cannot resolve {host}: no addresses")
        # Deduplicate, keep order (the resolver's preference).
        return self._checked(list(dict.fromkeys(found)), host)

    async def _default_address_lookup(self, host: str) -> list[str]:
        return await lookup_addresses(self.reactor, host)

    async def _default_fetch_well_known(self, host: str) -> WellKnownResponse:
        return await fetch_well_known(self, host)


async def lookup_addresses(reactor: Any, host: str) -> list[str]:
    """The IPv4 and IPv6 addresses of ``host``, by the reactor's name
    resolver (getaddrinfo in a worker thread: never blocks the reactor)."""
    from twisted.internet import defer
    from twisted.internet.interfaces import IHostResolution, IResolutionReceiver
    from zope.interface import implementer

    done: defer.Deferred[list[str]] = defer.Deferred()
    found: list[str] = []

    @implementer(IResolutionReceiver)
    class _Receiver:
        def resolutionBegan(self, resolution: IHostResolution) -> None:  # noqa: N802
            pass

        def addressResolved(self, address: Any) -> None:  # noqa: N802
            found.append(address.host)

        def resolutionComplete(self) -> None:  # noqa: N802
            done.callback(found)

    reactor.nameResolver.resolveHostName(_Receiver(), host, 0)
    return await done


def _srv_order(records: list[SrvRecord]) -> list[SrvRecord]:
    """Lowest priority first; weighted random order within a priority (RFC 2782)."""
    ordered: list[SrvRecord] = []
    for priority in sorted({r.priority for r in records}):
        group = [r for r in records if r.priority == priority]
        while group:
            total = sum(r.weight for r in group)
            if total == 0:
                pick = group[0]
            else:
                point = random.randint(0, total)
                running = 0
                pick = group[-1]
                for r in group:
                    running += r.weight
                    if running >= point:
                        pick = r
                        break
            ordered.append(pick)
            group.remove(pick)
    return ordered


async def _default_srv_lookup(name: str) -> list[SrvRecord]:
    from twisted.names import client, dns, error

    try:
        answers, _, _ = await client.lookupService(name)
    except (error.DNSNameError, error.DomainError, error.DNSServerError, error.DNSQueryRefusedError):
        return []
    records = []
    for answer in answers:
        if answer.type == dns.SRV:
            payload = answer.payload
            records.append(SrvRecord(payload.priority, payload.weight, str(payload.target), payload.port))
    return records


async def fetch_well_known(resolver: ServerResolver, host: str, timeout: float = 10.0) -> WellKnownResponse:
    """GET ``https://<host>/.well-known/matrix/server``, following redirects.

    Connections go only to addresses the resolver's policy allows, with the
    certificate checked for the URL's host; the body is capped.
    """
    from urllib.parse import urljoin, urlsplit

    from twisted.web.client import Agent
    from twisted.web.http_headers import Headers

    from zhome.federation.transport import CheckedEndpointFactory, read_body_limited

    if resolver._tls_policy is None:
        from zhome.federation.tls import FederationTLSPolicy

        resolver._tls_policy = FederationTLSPolicy()
    agent = Agent.usingEndpointFactory(
        resolver.reactor, CheckedEndpointFactory(resolver.reactor, resolver, resolver._tls_policy)
    )
    url = f"https://{_with_port(host, None)}/.well-known/matrix/server"
    seen: set[str] = set()
    for _ in range(MAX_REDIRECTS + 1):
        seen.add(url)
        d = agent.request(b"GET", url.encode("ascii"), Headers({b"User-Agent": [b"zhome"]}))
        d.addTimeout(timeout, resolver.reactor)
        response = await d
        if response.code in (301, 302, 303, 307, 308):
            location = response.headers.getRawHeaders(b"location")
            await read_body_limited(response, WELL_KNOWN_MAX_SIZE, resolver.reactor, timeout, discard=True)
            if not location:
                break
            url = urljoin(url, location[0].decode("ascii", "replace"))
            if urlsplit(url).scheme != "https" or url in seen:
                raise ResolutionError("bad or looping redirect for .well-known")
            continue
        body = await read_body_limited(response, WELL_KNOWN_MAX_SIZE, resolver.reactor, timeout)
        cache_control = response.headers.getRawHeaders(b"cache-control")
        return WellKnownResponse(
            response.code, body, cache_control[0].decode("ascii", "replace") if cache_control else None
        )
    raise ResolutionError("too many redirects for .well-known")
