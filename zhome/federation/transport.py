"""Outbound federation HTTP: signed JSON requests to other servers.

Spec: server-server-api "API standards", "TLS", "Resolving server names",
"Request Authentication". A request to a destination server name goes to the
address discovery finds, with the ``Host`` header and TLS name discovery
says, an ``X-Matrix`` Authorization header signed for the destination's
server name (not the delegated one), and a JSON body.

Connections are pooled per destination (the pool key is the server name, so
a delegated and a direct name never share a connection by accident). Every
connection goes only to addresses the resolver checked, so
``allow_private_addresses`` also holds for connections re-made by the pool.
Responses larger than ``max_response_size`` are cut off; a media body
(``open_get``, ``open_url``) goes to the caller piece by piece as it arrives,
the connection paused while the caller catches up. The log gets the
destination, method, path (never the query or a body), status and duration.
"""

from __future__ import annotations

import binascii
import io
import ipaddress
import json
import logging
import time
from typing import Any, Callable
from urllib.parse import quote, urlencode

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, DNSLookupError, TimeoutError as TxTimeoutError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, UNKNOWN_LENGTH
from zope.interface import implementer

from zhome.crypto.canonical import encode_canonical_json
from zhome.crypto.keys import SigningKey
from zhome.federation.destinations import DestinationPolicy
from zhome.federation.discovery import ResolutionError, ServerResolver
from zhome.federation.request_auth import reject_json_constant, sign_request
from zhome.util.failures import failure_chain

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_MAX_RESPONSE_SIZE = 50 * MiB
CONNECT_TIMEOUT = 20.0
FEDERATION_SCHEME = b"matrix-federation"


class FederationError(Exception):
    """Base of every outbound federation failure."""


class FederationUnreachable(FederationError):
    """No response: resolution, connection, TLS or timeout failure."""


class FederationDenied(FederationUnreachable):
    """The destination is refused by federation.allowed_servers/blocked_servers."""


class FederationInvalidResponse(FederationError):
    """A response that is not a JSON object, or too large."""


class FederationHttpError(FederationError):
    """A non-2xx answer; ``errcode`` from its Matrix error body if any."""

    def __init__(self, status: int, errcode: str | None, body: Any, destination: str = "") -> None:
        self.status = status
        self.errcode = errcode
        self.body = body
        self.destination = destination
        error = body.get("error") if isinstance(body, dict) else None
        text = f"{destination or 'remote server'} answered {status}"
        if errcode:
            text += f" {errcode}"
        if isinstance(error, str):
            text += f": {error[:200]}"
        super().__init__(text)


class FederationResponseTooLarge(FederationInvalidResponse):
    """A response body over the size the caller accepts."""


class ResponseTooLarge(Exception):
    pass


class _WriterFailed(Exception):
    """What a body writer raised (see RemoteResponse.read_into), carried out unchanged."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


# Called with each piece of a body; a Deferred it returns pauses the
# connection until it fires; what it raises ends the read.
BodyWriter = Callable[[bytes], "defer.Deferred[Any] | None"]


# ---------------------------------------------------------------------------
# Bodies


class _LimitedBodyReader(Protocol):
    def __init__(self, done: defer.Deferred[bytes], max_size: int, discard: bool) -> None:
        self.done = done
        self.max_size = max_size
        self.discard = discard
        self.buffer = io.BytesIO()
        self.size = 0

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.max_size:
            self.done.errback(ResponseTooLarge(f"response larger than {self.max_size} bytes"))
            assert self.transport is not None
            self.transport.stopProducing()
            return
        if not self.discard:
            self.buffer.write(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: N802, B008
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(self.buffer.getvalue())
        else:
            self.done.errback(reason)


async def read_body_limited(
    response: Any, max_size: int, reactor: Any, timeout: float, discard: bool = False
) -> bytes:
    """The response body, failing with ResponseTooLarge past ``max_size``."""
    if response.length is not UNKNOWN_LENGTH and response.length > max_size:
        response.deliverBody(_LimitedBodyReader(defer.Deferred(), 0, True))
        raise ResponseTooLarge(f"response of {response.length} bytes is larger than {max_size}")
    d: defer.Deferred[bytes] = defer.Deferred()
    response.deliverBody(_LimitedBodyReader(d, max_size, discard))
    d.addTimeout(timeout, reactor)
    return await d


class _StreamingBodyReader(Protocol):
    def __init__(self, done: defer.Deferred[int], write: BodyWriter, max_size: int) -> None:
        self.done = done
        self.write = write
        self.max_size = max_size
        self.size = 0
        self.paused = 0

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.max_size:
            self.fail(Failure(ResponseTooLarge(f"response larger than {self.max_size} bytes")))
            return
        try:
            waiting = self.write(data)
        except Exception as e:
            self.fail(Failure(_WriterFailed(e)))
            return
        if waiting is not None:
            self.paused += 1
            if self.paused == 1 and self.transport is not None:
                self.transport.pauseProducing()
            waiting.addCallbacks(self._resume, self._writer_failed)

    def _resume(self, _: object) -> None:
        self.paused -= 1
        if self.paused == 0 and not self.done.called and self.transport is not None:
            self.transport.resumeProducing()

    def _writer_failed(self, failure: Failure) -> None:
        error = failure.value
        self.fail(Failure(_WriterFailed(error if error is not None else Exception("body writer failed"))))

    def fail(self, failure: Failure) -> None:
        if not self.done.called:
            self.done.errback(failure)
        self.stop()

    def stop(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: N802, B008
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(self.size)
        else:
            self.done.errback(reason)


class _Discard(Protocol):
    def connectionMade(self) -> None:  # noqa: N802
        assert self.transport is not None
        self.transport.stopProducing()


class RemoteResponse:
    """A 2xx answer whose body is still to come: ``read_into`` it or ``abort``
    it, one of them exactly once."""

    def __init__(self, client: "FederationClient", response: Any, destination: str, path: str, tls_name: str,
                 start: float, timeout: float) -> None:
        self._client = client
        self._response = response
        self._destination = destination
        self._path = path
        self._tls_name = tls_name
        self._start = start
        self._timeout = timeout
        self.code: int = response.code

    def header(self, name: str) -> str | None:
        values = self._response.headers.getRawHeaders(name.encode("ascii"))
        return values[0].decode("latin-1") if values else None

    @property
    def content_type(self) -> str:
        return self.header("Content-Type") or "application/octet-stream"

    def abort(self) -> None:
        """Drop the body unread (the connection is closed)."""
        self._response.deliverBody(_Discard())

    async def read_into(self, write: BodyWriter, max_size: int) -> int:
        """Hand the body to ``write`` as it arrives; its size. Raises what
        ``write`` raised, FederationResponseTooLarge past ``max_size``, or
        FederationUnreachable. The time left of the request's timeout is the
        time the body has to arrive."""
        response = self._response
        where = f"{self._destination}{self._path}"
        if response.length is not UNKNOWN_LENGTH and response.length > max_size:
            self.abort()
            raise FederationResponseTooLarge(
                f"{self._destination}: response of {response.length} bytes is larger than {max_size}")
        reader: _StreamingBodyReader | None = None

        def cancel(_: object) -> None:
            if reader is not None:
                reader.stop()

        d: defer.Deferred[int] = defer.Deferred(cancel)
        reader = _StreamingBodyReader(d, write, max_size)
        response.deliverBody(reader)
        d.addTimeout(max(self._timeout - (time.monotonic() - self._start), 1.0), self._client.reactor)
        try:
            return await d
        except _WriterFailed as e:
            raise e.error from None
        except ResponseTooLarge as e:
            raise FederationResponseTooLarge(f"{self._destination}: {e}") from None
        except Exception as e:
            self._client._log("GET", self._destination, self._path, "failed", self._start)
            raise FederationUnreachable(f"GET {where}: {_failure_text(e, self._tls_name)}") from None


# ---------------------------------------------------------------------------
# Connections


@implementer(IStreamClientEndpoint)
class _CheckedTLSEndpoint:
    """Connects over TLS to a host's checked addresses, one after another."""

    def __init__(self, reactor: Any, resolver: ServerResolver, tls_policy: Any,
                 destination: str | None, host: str | None, port: int | None) -> None:
        self.reactor = reactor
        self.resolver = resolver
        self.tls_policy = tls_policy
        self.destination = destination
        self.host = host
        self.port = port

    def connect(self, protocol_factory: Any) -> defer.Deferred[Any]:
        return defer.ensureDeferred(self._connect(protocol_factory))

    async def _connect(self, protocol_factory: Any) -> Any:
        if self.destination is not None:
            resolved = await self.resolver.resolve(self.destination)
            addresses, port, tls_name = resolved.addresses, resolved.port, resolved.tls_server_name
        else:
            assert self.host is not None and self.port is not None
            addresses = await self.resolver._addresses(self.host)
            port, tls_name = self.port, self.host
        creator = self.tls_policy.creatorForNetloc(tls_name.encode("idna"), port)
        last: Exception | None = None
        for address in addresses:
            if isinstance(ipaddress.ip_address(address), ipaddress.IPv6Address):
                tcp: Any = TCP6ClientEndpoint(self.reactor, address, port, timeout=CONNECT_TIMEOUT)
            else:
                tcp = TCP4ClientEndpoint(self.reactor, address, port, timeout=CONNECT_TIMEOUT)
            try:
                endpoint: Any = wrapClientTLS(creator, tcp)
                return await endpoint.connect(protocol_factory)
            except ConnectError as e:
                last = e
        raise last if last is not None else ConnectError(string="no address to connect to")


@implementer(IAgentEndpointFactory)
class CheckedEndpointFactory:
    """Endpoints for ``matrix-federation://<hex server name>/`` and ``https://`` URIs."""

    def __init__(self, reactor: Any, resolver: ServerResolver, tls_policy: Any) -> None:
        self.reactor = reactor
        self.resolver = resolver
        self.tls_policy = tls_policy

    def endpointForURI(self, uri: Any) -> Any:  # noqa: N802 - Twisted's name
        if uri.scheme == FEDERATION_SCHEME:
            destination = binascii.unhexlify(uri.host).decode("utf-8")
            return _CheckedTLSEndpoint(self.reactor, self.resolver, self.tls_policy, destination, None, None)
        if uri.scheme == b"https":
            host = uri.host.decode("idna")
            if host.startswith("["):
                host = host[1:-1]
            return _CheckedTLSEndpoint(self.reactor, self.resolver, self.tls_policy, None, host, uri.port)
        raise SchemeNotSupported(f"unsupported scheme {uri.scheme!r}")



def _failure_text(error: BaseException, tls_name: str) -> str:
    """One line saying why a request got no response, for the operator: in
    the error's own words (the URL preview fetcher's short, URL-free
    reasons leave those out: ``zhome/media/safe_fetch.py``)."""
    seen = failure_chain(error)
    for exc in seen:
        module = type(exc).__module__
        if module.startswith("OpenSSL") or module.startswith("service_identity"):
            detail = str(exc) or type(exc).__name__
            if "certificate verify failed" in detail or module.startswith("service_identity"):
                return f"TLS certificate verification failed for {tls_name}: {detail}"
            return f"TLS error with {tls_name}: {detail}"
    for exc in seen:
        if isinstance(exc, (ConnectError, DNSLookupError)):
            return f"cannot connect: {exc}"
        if isinstance(exc, (TxTimeoutError, defer.CancelledError, TimeoutError)):
            return "timed out"
    last = seen[-1] if seen else error
    return f"{type(last).__name__}: {last}"


# ---------------------------------------------------------------------------
# The client


class FederationClient:
    """Signed JSON requests to other homeservers.

    ``resolver`` is a :class:`~zhome.federation.discovery.ServerResolver`;
    ``tls_policy`` an ``IPolicyForHTTPS`` whose ``creatorForNetloc`` takes
    the name the certificate must be valid for (see ``tls.FederationTLSPolicy``).
    """

    def __init__(
        self,
        server_name: str,
        signing_key: SigningKey,
        resolver: ServerResolver,
        tls_policy: Any,
        reactor: Any = None,
        *,
        destination_policy: DestinationPolicy | None = None,
        max_response_size: int = DEFAULT_MAX_RESPONSE_SIZE,
        user_agent: str | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.server_name = server_name
        self.signing_key = signing_key
        self.resolver = resolver
        self.reactor = reactor
        self.destination_policy = destination_policy or DestinationPolicy()
        self.max_response_size = max_response_size
        if user_agent is None:
            from zhome import __version__

            user_agent = f"zhome/{__version__}"
        self.user_agent = user_agent.encode("ascii")
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 5
        self.pool.cachedConnectionTimeout = 120
        # A stale pooled connection may fail a PUT that was in fact received;
        # the transaction layer retries with the same txn ID instead.
        self.pool.retryAutomatically = False
        self.agent = Agent.usingEndpointFactory(
            reactor, CheckedEndpointFactory(reactor, resolver, tls_policy), pool=self.pool
        )

    async def get_json(
        self, destination: str, path: str, query: dict[str, Any] | None = None,
        signed: bool = True, timeout: float = 60,
    ) -> Any:
        return await self.request_json("GET", destination, path, query=query, signed=signed, timeout=timeout)

    async def put_json(
        self, destination: str, path: str, body: Any, query: dict[str, Any] | None = None,
        signed: bool = True, timeout: float = 60,
    ) -> Any:
        return await self.request_json("PUT", destination, path, query=query, body=body, signed=signed,
                                       timeout=timeout)

    async def post_json(
        self, destination: str, path: str, body: Any, query: dict[str, Any] | None = None,
        signed: bool = True, timeout: float = 60,
    ) -> Any:
        return await self.request_json("POST", destination, path, query=query, body=body, signed=signed,
                                       timeout=timeout)

    async def open_get(
        self, destination: str, path: str, query: dict[str, Any] | None = None, *,
        signed: bool = True, timeout: float = 60, follow_redirects: int = 0,
    ) -> RemoteResponse:
        """A GET to a server (signed unless ``signed`` is false) whose 2xx body
        is read by the caller, as it arrives, from the RemoteResponse. Non-2xx
        answers raise FederationHttpError; up to ``follow_redirects`` 3xx
        redirects are followed with unsigned GETs (see ``open_url``)."""
        uri, resolved, headers, start = await self._prepare("GET", destination, path, query)
        if signed:
            auth = sign_request(self.server_name, destination, "GET", uri, None, self.signing_key)
            headers.addRawHeader(b"Authorization", auth.encode("utf-8"))
        target = FEDERATION_SCHEME + b"://" + binascii.hexlify(destination.encode("utf-8")) + uri.encode("ascii")
        # What a relative redirect is relative to.
        base = f"https://{resolved.host_header}{uri}"
        return await self._open(target, headers, destination, path, resolved.tls_server_name, start, timeout,
                                follow_redirects, base)

    async def _prepare(
        self, method: str, destination: str, path: str, query: dict[str, Any] | None
    ) -> tuple[str, Any, Headers, float]:
        """Policy check, URI and resolution shared by every request:
        (uri, resolved server, base headers, start time)."""
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/': {path!r}")
        if not self.destination_policy.is_allowed(destination):
            raise FederationDenied(f"federation with {destination} is not allowed by this server's policy")
        uri = path
        if query:
            uri += "?" + urlencode(query, doseq=True, quote_via=quote, safe="")
        start = time.monotonic()
        try:
            resolved = await self.resolver.resolve(destination)
        except ResolutionError as e:
            self._log(method, destination, path, "unresolvable", start)
            raise FederationUnreachable(f"cannot resolve {destination}: {e}") from None
        headers = Headers({
            b"Host": [resolved.host_header.encode("idna")],
            b"User-Agent": [self.user_agent],
        })
        return uri, resolved, headers, start

    async def open_url(self, url: str, *, timeout: float = 60, follow_redirects: int = 0) -> RemoteResponse:
        """An unsigned GET of an https:// URL (a media Location redirect), to
        checked addresses only, its body read by the caller (see ``open_get``)."""
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(url)
            target = url.encode("ascii")
            host = parts.hostname
        except (ValueError, UnicodeError):
            raise FederationInvalidResponse("redirect to a malformed URL") from None
        if parts.scheme != "https" or not host:
            raise FederationInvalidResponse("redirect to a URL that is not https://")
        start = time.monotonic()
        headers = Headers({b"User-Agent": [self.user_agent]})
        return await self._open(target, headers, host, parts.path, host, start, timeout, follow_redirects, url)

    async def _open(self, target: bytes, headers: Headers, destination: str, path: str, tls_name: str,
                    start: float, timeout: float, follow_redirects: int, url: str) -> RemoteResponse:
        from urllib.parse import urljoin

        try:
            d = self.agent.request(b"GET", target, headers, None)
            d.addTimeout(timeout, self.reactor)
            response = await d
        except ResolutionError as e:
            self._log("GET", destination, path, "unresolvable", start)
            raise FederationUnreachable(f"cannot resolve {destination}: {e}") from None
        except Exception as e:
            self._log("GET", destination, path, "failed", start)
            raise FederationUnreachable(f"GET {destination}{path}: {_failure_text(e, tls_name)}") from None
        self._log("GET", destination, path, response.code, start)
        remaining = max(timeout - (time.monotonic() - start), 1.0)
        location = response.headers.getRawHeaders(b"Location")
        if response.code in (301, 302, 303, 307, 308) and follow_redirects > 0 and location:
            try:
                await read_body_limited(response, 64 * 1024, self.reactor, remaining, discard=True)
            except Exception:
                pass  # only the Location matters
            next_url = urljoin(url, location[0].decode("latin-1").strip())
            return await self.open_url(next_url, timeout=remaining, follow_redirects=follow_redirects - 1)
        if 200 <= response.code < 300:
            return RemoteResponse(self, response, destination, path, tls_name, start, timeout)
        try:
            raw = await read_body_limited(response, 64 * 1024, self.reactor, remaining)
        except ResponseTooLarge as e:
            raise FederationInvalidResponse(f"{destination}: {e}") from None
        except Exception as e:
            self._log("GET", destination, path, "failed", start)
            raise FederationUnreachable(f"GET {destination}{path}: {_failure_text(e, tls_name)}") from None
        try:
            parsed: Any = json.loads(raw.decode("utf-8")) if raw.strip() else None
        except (ValueError, UnicodeDecodeError):
            parsed = None
        errcode = parsed.get("errcode") if isinstance(parsed, dict) else None
        raise FederationHttpError(response.code, errcode if isinstance(errcode, str) else None, parsed, destination)

    async def close(self) -> None:
        await self.pool.closeCachedConnections()

    async def request_json(
        self,
        method: str,
        destination: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        body: Any | None = None,
        signed: bool = True,
        timeout: float = 60,
    ) -> Any:
        """Send one request; the parsed JSON response on 2xx.

        ``path`` is already percent-encoded (``/_matrix/federation/v1/...``);
        ``query`` values are strings or lists of strings. Raises
        FederationHttpError, FederationUnreachable (FederationDenied) or
        FederationInvalidResponse.
        """
        uri, resolved, headers, start = await self._prepare(method, destination, path, query)
        producer = None
        if body is not None or method in ("PUT", "POST"):
            content = {} if body is None else body
            data = encode_canonical_json(content)
            headers.addRawHeader(b"Content-Type", b"application/json")
            producer = FileBodyProducer(io.BytesIO(data))
        else:
            content = None
        if signed:
            auth = sign_request(self.server_name, destination, method, uri, content, self.signing_key)
            headers.addRawHeader(b"Authorization", auth.encode("utf-8"))

        target = FEDERATION_SCHEME + b"://" + binascii.hexlify(destination.encode("utf-8")) + uri.encode("ascii")
        try:
            d = self.agent.request(method.encode("ascii"), target, headers, producer)
            d.addTimeout(timeout, self.reactor)
            response = await d
        except ResolutionError as e:
            self._log(method, destination, path, "unresolvable", start)
            raise FederationUnreachable(f"cannot resolve {destination}: {e}") from None
        except Exception as e:
            text = _failure_text(e, resolved.tls_server_name)
            self._log(method, destination, path, "failed", start)
            raise FederationUnreachable(f"{method} {destination}{path}: {text}") from None

        remaining = max(timeout - (time.monotonic() - start), 1.0)
        try:
            raw = await read_body_limited(response, self.max_response_size, self.reactor, remaining)
        except ResponseTooLarge as e:
            self._log(method, destination, path, response.code, start)
            raise FederationInvalidResponse(f"{destination}: {e}") from None
        except Exception as e:
            self._log(method, destination, path, "failed", start)
            raise FederationUnreachable(
                f"{method} {destination}{path}: {_failure_text(e, resolved.tls_server_name)}"
            ) from None
        self._log(method, destination, path, response.code, start)

        try:
            text = raw.decode("utf-8")
            parsed: Any = json.loads(text, parse_constant=reject_json_constant) if text.strip() else None
        except (ValueError, UnicodeDecodeError):
            parsed = None
            if 200 <= response.code < 300:
                raise FederationInvalidResponse(f"{destination}: response is not JSON") from None
        if not 200 <= response.code < 300:
            errcode = parsed.get("errcode") if isinstance(parsed, dict) else None
            raise FederationHttpError(
                response.code, errcode if isinstance(errcode, str) else None, parsed, destination
            )
        if not isinstance(parsed, (dict, list)):
            raise FederationInvalidResponse(f"{destination}: response is not a JSON object")
        return parsed

    def _log(self, method: str, destination: str, path: str, status: Any, start: float) -> None:
        logger.info(
            "federation %s %s%s -> %s in %.0fms", method, destination, path, status,
            (time.monotonic() - start) * 1000,
            extra={"destination": destination, "method": method, "endpoint": path, "status": status,
                   "duration_ms": round((time.monotonic() - start) * 1000, 2)},
        )
