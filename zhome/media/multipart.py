"""multipart/mixed bodies of the federation media endpoints.

Spec: server-server-api "Content Repository": exactly two parts, the first
``application/json`` metadata (an empty object today), the second either
the media with its Content-Type / Content-Disposition, or a ``Location``
header to fetch it from. RFC 2046 section 5.1 for the framing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class MultipartError(Exception):
    pass


def framing(boundary: str, content_type: str, disposition: bytes | None) -> tuple[bytes, bytes]:
    """The bytes before and after the media bytes of a two-part response."""
    b = boundary.encode("ascii")
    head = b"--" + b + b"\r\nContent-Type: application/json\r\n\r\n{}\r\n--" + b + b"\r\n"
    head += b"Content-Type: " + content_type.encode("ascii") + b"\r\n"
    if disposition:
        head += b"Content-Disposition: " + disposition + b"\r\n"
    head += b"\r\n"
    tail = b"\r\n--" + b + b"--\r\n"
    return head, tail


@dataclass(frozen=True)
class MediaPart:
    metadata: bytes
    headers: dict[str, str]
    body: bytes

    @property
    def location(self) -> str | None:
        return self.headers.get("location")


def boundary_of(content_type: str) -> str:
    base, _, params = content_type.partition(";")
    if base.strip().lower() != "multipart/mixed":
        raise MultipartError(f"expected multipart/mixed, got {base.strip()[:60]!r}")
    m = re.search(r'boundary\s*=\s*(?:"([^"]{1,70})"|([^;\s]{1,70}))', params, re.I)
    if m is None:
        raise MultipartError("multipart/mixed without a boundary")
    return m.group(1) or m.group(2)


def _headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in block.split(b"\r\n"):
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            raise MultipartError("malformed part header")
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return headers


def parse(content_type: str, body: bytes) -> MediaPart:
    boundary = boundary_of(content_type).encode("latin-1")
    delimiter = b"--" + boundary
    # Parts are separated by CRLF--boundary; the first delimiter may start the body.
    start = body.find(delimiter)
    if start < 0:
        raise MultipartError("boundary not found")
    # Exactly two parts: the first ends at the next delimiter; the second
    # (the media, which may contain anything) at the last closing delimiter.
    first_start = body.find(b"\r\n", start + len(delimiter))
    if first_start < 0:
        raise MultipartError("truncated multipart body")
    first_end = body.find(b"\r\n" + delimiter, first_start)
    if first_end < 0:
        raise MultipartError("multipart body has only one part")
    after = first_end + 2 + len(delimiter)
    if body[after:after + 2] == b"--":
        raise MultipartError("expected 2 parts, got 1")
    second_start = body.find(b"\r\n", after)
    second_end = body.rfind(b"\r\n" + delimiter + b"--")
    if second_start < 0 or second_end < second_start:
        raise MultipartError("multipart body has no closing delimiter")
    parts = [body[first_start + 2:first_end], body[second_start + 2:second_end]]
    out: list[tuple[dict[str, str], bytes]] = []
    for part in parts:
        sep = part.find(b"\r\n\r\n")
        if part.startswith(b"\r\n"):
            out.append(({}, part[2:]))
        elif sep < 0:
            # Headers only (a Location part with no body).
            out.append((_headers(part), b""))
        else:
            out.append((_headers(part[:sep]), part[sep + 4:]))
    meta_headers, meta = out[0]
    if meta_headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise MultipartError("the first part is not application/json")
    return MediaPart(meta, out[1][0], out[1][1])
