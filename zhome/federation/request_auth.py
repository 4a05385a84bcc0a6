"""X-Matrix request authentication.

Spec: server-server-api "Authentication" → "Request Authentication". The
sender signs the JSON object ``{method, uri, origin, destination, content}``
(``content`` only when the request has a body; ``uri`` is the path and query
exactly as sent) with its server key, and sends the signature in an
``Authorization: X-Matrix origin=…,destination=…,key=…,sig=…`` header.

The header follows RFC 7235 auth-params: names are case-insensitive, order
does not matter, values are tokens or quoted strings with backslash escapes;
for older servers a colon is accepted in unquoted values. A request whose
``destination`` is not this server is refused with 401, as the spec says.
An ``origin`` that is not a server name (appendices "Server Name": a host
and an optional port of digits; ``example.org:http`` is none) is not a
credential that could be checked but a malformed request: 400, before any
attempt to fetch keys for it. Other header faults (no header, parameters
missing or garbled, a signature that does not verify) are 401.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nacl.signing import VerifyKey

from zhome.crypto.keys import SigningKey
from zhome.crypto.signing import SignatureError, sign_json, verify_json_signature
from zhome.http.errors import MatrixError
from zhome.util.ids import is_valid_server_name

GetVerifyKey = Callable[[str, str, int], Awaitable[VerifyKey | None]]

_SCHEME = "X-Matrix"
# RFC 7230 tchar, plus ":" for compatibility with older servers.
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z:]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_PARAM = re.compile(rf"\s*({_TOKEN})\s*=\s*({_QUOTED}|{_TOKEN})\s*")
_BAD_VALUE = re.compile(r'[\s",\\]')


def unauthorized(msg: str) -> MatrixError:
    return MatrixError(401, "M_UNAUTHORIZED", msg)


def request_json(
    method: str, uri: str, origin: str, destination: str, content: Any | None
) -> dict[str, Any]:
    """The object that is signed for a request (step 1 of the spec)."""
    obj: dict[str, Any] = {"method": method, "uri": uri, "origin": origin, "destination": destination}
    if content is not None:
        obj["content"] = content
    return obj


def sign_request(
    origin: str, destination: str, method: str, uri: str, content: Any | None, signing_key: SigningKey
) -> str:
    """The ``Authorization`` header value for a request from ``origin``.

    ``uri`` is the path and query as they go on the wire; ``content`` is the
    parsed JSON body, or None for requests without one.
    """
    signed = sign_json(request_json(method, uri, origin, destination, content), origin, signing_key)
    (key_id, sig), = signed["signatures"][origin].items()
    for name, value in (("origin", origin), ("destination", destination), ("key", key_id)):
        # Server names and key IDs never hold these; refuse rather than
        # produce a header the other side would parse differently.
        if _BAD_VALUE.search(value):
            raise ValueError(f"cannot put {name} {value!r} in an X-Matrix header")
    return f'{_SCHEME} origin="{origin}",destination="{destination}",key="{key_id}",sig="{sig}"'


def _unquote(value: str) -> str:
    if value.startswith('"'):
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def parse_authorization_header(value: str | bytes) -> tuple[str, str | None, str, str]:
    """``(origin, destination or None, key ID, signature)`` from an X-Matrix header.

    Raises a 401 ``M_UNAUTHORIZED`` MatrixError when the header is malformed
    or lacks origin, key or sig, a 400 one when the origin is not a server name.
    """
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise unauthorized("Authorization header is not UTF-8") from None
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != _SCHEME.lower():
        raise unauthorized("Authorization header does not use the X-Matrix scheme")
    params: dict[str, str] = {}
    pos = 0
    rest = rest.strip()
    if not rest:
        raise unauthorized("X-Matrix header has no parameters")
    while pos < len(rest):
        m = _PARAM.match(rest, pos)
        if m is None:
            raise unauthorized("Malformed X-Matrix Authorization header")
        name = m.group(1).lower()
        if name in params:
            raise unauthorized(f"Duplicate {name!r} in X-Matrix Authorization header")
        params[name] = _unquote(m.group(2))
        pos = m.end()
        if pos < len(rest):
            if rest[pos] != ",":
                raise unauthorized("Malformed X-Matrix Authorization header")
            pos += 1
    for required in ("origin", "key", "sig"):
        if not params.get(required):
            raise unauthorized(f"X-Matrix Authorization header has no {required!r}")
    destination = params.get("destination")
    if destination == "":
        raise unauthorized("X-Matrix Authorization header has an empty 'destination'")
    origin = params["origin"]
    if not is_valid_server_name(origin):
        raise MatrixError(400, "M_UNAUTHORIZED", "X-Matrix 'origin' is not a server name")
    return origin, destination, params["key"], params["sig"]


def _header_values(request: Any) -> list[bytes]:
    headers = request.requestHeaders.getRawHeaders(b"Authorization") or []
    return [h for h in headers if h.strip().lower().startswith(b"x-matrix")]


def _uri(request: Any) -> str:
    # request.uri is the request target as received: path and query.
    raw: bytes = request.uri
    return raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else str(raw)


def reject_json_constant(name: str) -> Any:
    """``parse_constant`` for json.loads: NaN and Infinity are not JSON,
    though Python's parser takes them; a body or response holding them is
    refused rather than stored or passed on to clients."""
    raise ValueError(f"{name} is not JSON")


def _content(body: bytes | Any | None) -> Any | None:
    if body is None or isinstance(body, (bytes, bytearray)):
        raw = bytes(body) if body is not None else b""
        if not raw.strip():
            return None
        try:
            return json.loads(raw.decode("utf-8"), parse_constant=reject_json_constant)
        except (ValueError, UnicodeDecodeError):
            raise MatrixError(400, "M_NOT_JSON", "Content not JSON.") from None
    return body


async def authenticate_request(
    request: Any,
    body: bytes | Any | None,
    our_server_name: str,
    get_verify_key: GetVerifyKey,
    *,
    is_server_allowed: Callable[[str], bool] | None = None,
    now_ms: Callable[[], int] | None = None,
) -> str:
    """Check a request's X-Matrix signature; return the origin server name.

    ``body`` is the raw body bytes or the already parsed JSON (None or empty
    bytes: no content). ``get_verify_key(server, key_id, at_ts)`` returns the
    origin's public key valid at ``at_ts`` (ms), or None when unknown.
    Failures raise a 401 ``M_UNAUTHORIZED`` MatrixError (403 ``M_FORBIDDEN``
    for a server the federation policy refuses).
    """
    headers = _header_values(request)
    if not headers:
        raise unauthorized("Missing X-Matrix Authorization header")
    method = request.method.decode("ascii") if isinstance(request.method, bytes) else str(request.method)
    uri = _uri(request)
    content = _content(body)
    ts = int(time.time() * 1000) if now_ms is None else now_ms()
    last_error: MatrixError | None = None
    # A sender may send several headers (several keys); one valid is enough.
    for header in headers:
        origin, destination, key_id, sig = parse_authorization_header(header)
        if destination is not None and destination != our_server_name:
            raise unauthorized(f"Request is for {destination!r}, not this server")
        if is_server_allowed is not None and not is_server_allowed(origin):
            raise MatrixError(403, "M_FORBIDDEN", "Federation with this server is not allowed")
        verify_key = await get_verify_key(origin, key_id, ts)
        if verify_key is None:
            last_error = unauthorized(f"No key {key_id} known for {origin}")
            continue
        obj = request_json(method, uri, origin, destination or our_server_name, content)
        obj["signatures"] = {origin: {key_id: sig}}
        try:
            verify_json_signature(obj, origin, key_id, verify_key)
        except SignatureError:
            last_error = unauthorized(f"Invalid X-Matrix signature from {origin}")
            continue
        return origin
    assert last_error is not None
    raise last_error
