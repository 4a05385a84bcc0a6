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


# The preamble, the metadata part and the media part's headers together may
# be no larger than this: only the media bytes can be big.
MAX_HEAD_BYTES = 64 * 1024
# Spaces or tabs allowed after a boundary before its CRLF ("transport padding").
_MAX_PADDING = 64

_MORE, _NONE, _NEXT, _CLOSE = range(4)
_HEADERS, _BODY, _EPILOGUE = range(3)


def _header_line(line: bytes) -> tuple[str, str]:
    name, sep, value = line.partition(b":")
    if not sep or not name.strip():
        raise MultipartError("malformed part header")
    return name.strip().lower().decode("latin-1"), value.strip().decode("latin-1")


class StreamParser:
    """The two parts of a federation media response, parsed as the body arrives.

    ``feed`` takes the next bytes of the body, in pieces of any size, and
    returns the bytes of the second part's body found in them. ``metadata``
    is set once the first part is complete and ``headers`` (the second part's)
    once its header lines are: a caller checks ``location`` before using the
    bytes. ``finish`` at the end of the body raises MultipartError unless the
    close delimiter came. A delimiter is CRLF, "--", the boundary, then "--"
    or optional spaces and CRLF; anything else that starts like one is
    content. Before the media bytes, at most ``max_head`` bytes are accepted.
    """

    def __init__(self, content_type: str, max_head: int = MAX_HEAD_BYTES) -> None:
        self._dash = b"--" + boundary_of(content_type).encode("latin-1")
        self._delimiter = b"\r\n" + self._dash
        self._max_head = max_head
        self._buf = b""
        self._offset = 0  # of _buf[0] in the whole body
        self._state = _BODY
        self._part = 0  # 0: the preamble, then the parts
        self._at_start = True  # a delimiter here needs no CRLF before it
        self._lines: list[bytes] = []
        self._meta: list[bytes] = []
        self._out: list[bytes] = []
        self.metadata: bytes | None = None
        self.headers: dict[str, str] | None = None
        self.done = False

    @property
    def location(self) -> str | None:
        return self.headers.get("location") if self.headers is not None else None

    @property
    def in_media(self) -> bool:
        return self._part == 2 and self._state != _HEADERS

    def feed(self, data: bytes) -> bytes:
        if self._state == _EPILOGUE:
            return b""  # after the close delimiter: ignored
        self._buf += data
        self._out = []
        while self._state != _EPILOGUE and (self._headers_step() if self._state == _HEADERS else self._body_step()):
            pass
        if self._state == _EPILOGUE:
            self._buf = b""
        elif not self.in_media and self._offset + len(self._buf) > self._max_head:
            raise MultipartError(f"no media part in the first {self._max_head} bytes")
        out, self._out = self._out, []
        return b"".join(out)

    def finish(self) -> None:
        if self.done:
            return
        if self._part < 2:
            raise MultipartError(f"multipart body ended in part {self._part} of 2" if self._part
                                 else "boundary not found")
        raise MultipartError("multipart body has no closing delimiter")

    def _consume(self, n: int) -> bytes:
        taken, self._buf = self._buf[:n], self._buf[n:]
        self._offset += n
        return taken

    def _after_boundary(self, pos: int) -> tuple[int, int]:
        """What follows a "--boundary" ending at ``pos``: (kind, end of the delimiter)."""
        buf = self._buf
        rest = buf[pos:pos + 2]
        if rest == b"--":
            return _CLOSE, pos + 2
        if rest == b"-":
            return _MORE, 0
        j = pos
        while j < len(buf) and buf[j] in b" \t":
            j += 1
            if j - pos > _MAX_PADDING:
                return _NONE, 0
        if j == len(buf) or buf[j:] == b"\r":
            return _MORE, 0
        if buf[j:j + 2] == b"\r\n":
            return _NEXT, j + 2
        return _NONE, 0

    def _delimiter_here(self) -> tuple[int, int]:
        """Whether ``_buf`` starts with a "--boundary" delimiter line (no CRLF before it)."""
        if not self._buf.startswith(self._dash):
            return (_MORE, 0) if self._dash.startswith(self._buf) else (_NONE, 0)
        return self._after_boundary(len(self._dash))

    def _emit(self, data: bytes) -> None:
        if not data:
            return
        if self._part == 1:
            self._meta.append(data)
        elif self._part == 2:
            self._out.append(data)

    def _part_ended(self, kind: int, end: int) -> None:
        self._consume(end)
        if self._part == 1:
            self.metadata = b"".join(self._meta)
            self._meta = []
        if kind == _CLOSE:
            if self._part < 2:
                raise MultipartError(f"expected 2 parts, got {self._part}")
            self.done = True
            self._state = _EPILOGUE
            return
        if self._part == 2:
            raise MultipartError("expected 2 parts, got more")
        self._part += 1
        self._lines = []
        self._state = _HEADERS

    def _headers_done(self) -> None:
        headers = dict(_header_line(line) for line in self._lines)
        if self._part == 1:
            if headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
                raise MultipartError("the first part is not application/json")
        else:
            if self._offset > self._max_head:
                raise MultipartError(f"no media part in the first {self._max_head} bytes")
            self.headers = headers

    def _headers_step(self) -> bool:
        # A part may end right after its header lines, with no blank line and
        # no body (a Location part): the next line is then a delimiter.
        kind, end = self._delimiter_here()
        if kind == _MORE:
            return False
        if kind != _NONE:
            self._headers_done()
            self._part_ended(kind, end)
            return True
        i = self._buf.find(b"\r\n")
        if i < 0:
            return False
        line = self._consume(i + 2)[:-2]
        if line:
            self._lines.append(line)
            return True
        self._headers_done()
        self._state = _BODY
        self._at_start = True
        return True

    def _body_step(self) -> bool:
        if self._at_start:
            # The first delimiter of the body, or one right after a blank
            # line ending a part's headers, has no CRLF of its own.
            kind, end = self._delimiter_here()
            if kind == _MORE:
                return False
            self._at_start = False
            if kind != _NONE:
                self._part_ended(kind, end)
                return True
        buf = self._buf
        pos = 0
        while True:
            k = buf.find(self._delimiter, pos)
            if k < 0:
                # Keep what could be the start of a delimiter.
                self._emit(self._consume(max(len(buf) - len(self._delimiter) + 1, 0)))
                return False
            kind, end = self._after_boundary(k + len(self._delimiter))
            if kind == _NONE:
                pos = k + 1
                continue
            self._emit(self._consume(k))
            if kind == _MORE:
                return False
            self._part_ended(kind, end - k)
            return True


def parse(content_type: str, body: bytes) -> MediaPart:
    """A whole response body at once (see StreamParser)."""
    parser = StreamParser(content_type, max_head=max(MAX_HEAD_BYTES, len(body)))
    media = parser.feed(body)
    parser.finish()
    return MediaPart(parser.metadata or b"", parser.headers or {}, media)
