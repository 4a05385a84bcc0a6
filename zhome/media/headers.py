"""Response headers for served media: Content-Disposition, CSP, ranges.

Spec: client-server-api "Content repository" (Content-Security-Policy,
Cross-Origin-Resource-Policy) and "Serving inline content" (inline only for
the listed content types); RFC 6266 / 5987 for filename encoding; RFC 9110
for single byte ranges.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import quote

CSP = (b"sandbox; default-src 'none'; script-src 'none'; plugin-types application/pdf; "
       b"style-src 'unsafe-inline'; media-src 'self'; object-src 'self';")

INLINE_TYPES = frozenset({
    "text/css", "text/plain", "text/csv", "application/json", "application/ld+json", "image/jpeg", "image/gif",
    "image/png", "image/apng", "image/webp", "image/avif", "video/mp4", "video/webm", "video/ogg",
    "video/quicktime", "audio/mp4", "audio/webm", "audio/aac", "audio/mpeg", "audio/ogg", "audio/wave",
    "audio/wav", "audio/x-wav", "audio/x-pn-wav", "audio/flac", "audio/x-flac",
})

MAX_FILENAME_CHARS = 255
_CONTENT_TYPE = re.compile(r"^[A-Za-z0-9!#$&^_.+-]{1,64}/[A-Za-z0-9!#$&^_.+-]{1,64}\Z")


def sanitise_filename(name: str | None) -> str | None:
    """A safe display file name, or None: no path parts, no control or
    bidi-override characters, no leading dots, at most 255 characters."""
    if not name:
        return None
    name = unicodedata.normalize("NFC", name)
    # Keep only the last path component, whatever the separator.
    name = re.split(r"[/\\]", name)[-1]
    cleaned = "".join(
        c for c in name
        if unicodedata.category(c) not in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")
    )
    cleaned = cleaned.replace('"', "'").strip().lstrip(".").strip()
    if not cleaned:
        return None
    return cleaned[:MAX_FILENAME_CHARS]


def normalise_content_type(value: str | None) -> str | None:
    """The bare lower-case ``type/subtype`` (parameters kept for text types), or None if malformed."""
    if not value:
        return None
    base, _, params = value.partition(";")
    base = base.strip().lower()
    if not _CONTENT_TYPE.fullmatch(base):
        return None
    if base.startswith("text/") and "charset" in params.lower():
        m = re.search(r"charset\s*=\s*\"?([A-Za-z0-9_.:-]{1,40})", params, re.I)
        if m:
            return f"{base}; charset={m.group(1)}"
    return base


def is_inline(content_type: str | None) -> bool:
    return bool(content_type) and content_type.split(";")[0].strip().lower() in INLINE_TYPES  # type: ignore[union-attr]


def content_disposition(content_type: str | None, filename: str | None) -> bytes:
    kind = "inline" if is_inline(content_type) else "attachment"
    safe = sanitise_filename(filename)
    if not safe:
        return kind.encode("ascii")
    ascii_name = "".join(c if 0x20 <= ord(c) < 0x7F and c not in '"\\;%' else "_" for c in safe)
    header = f'{kind}; filename="{ascii_name}"'
    if ascii_name != safe:
        header += "; filename*=utf-8''" + quote(safe, safe="")
    return header.encode("ascii")


class RangeNotSatisfiable(Exception):
    pass


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end exclusive) for a single ``bytes=`` range, None to send
    the whole entity (no header, or one we ignore as the RFC allows)."""
    if not header:
        return None
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if m is None:
        return None  # multiple or malformed ranges: serve it all
    first, last = m.group(1), m.group(2)
    if first == "" and last == "":
        return None
    if first == "":
        suffix = int(last)
        if suffix == 0:
            raise RangeNotSatisfiable()
        return max(0, size - suffix), size
    start = int(first)
    end = size if last == "" else min(int(last) + 1, size)
    if start >= size or (last != "" and int(last) < start):
        raise RangeNotSatisfiable()
    return start, end
