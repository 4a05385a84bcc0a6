"""In-memory stand-ins for the federation client's streamed responses.

``BytesResponse`` behaves as ``zhome.federation.transport.RemoteResponse``
for a body already in memory, handing it over in pieces of ``chunk`` bytes
and honouring the writer's pauses, so a fake federation client can answer
``open_get`` / ``open_url`` from bytes.
"""

from __future__ import annotations

from typing import Any, Optional

from zhome.federation.transport import BodyWriter, FederationResponseTooLarge


class BytesResponse:
    def __init__(self, content_type: str, body: bytes, headers: Optional[dict[str, str]] = None,
                 chunk: int = 65536) -> None:
        self.code = 200
        self.body = body
        self.chunk = chunk
        self.headers = {"content-type": content_type, **{k.lower(): v for k, v in (headers or {}).items()}}
        self.aborted = False
        self.delivered = 0

    def header(self, name: str) -> Optional[str]:
        return self.headers.get(name.lower())

    @property
    def content_type(self) -> str:
        return self.headers["content-type"]

    def abort(self) -> None:
        self.aborted = True

    async def read_into(self, write: BodyWriter, max_size: int) -> int:
        for i in range(0, len(self.body), self.chunk):
            piece = self.body[i:i + self.chunk]
            if i + len(piece) > max_size:
                raise FederationResponseTooLarge(f"response larger than {max_size} bytes")
            waiting: Any = write(piece)
            self.delivered = i + len(piece)
            if waiting is not None:
                await waiting
        return len(self.body)

    async def read_all(self, max_size: int) -> bytes:
        parts: list[bytes] = []

        def write(data: bytes) -> None:
            parts.append(data)

        await self.read_into(write, max_size)
        return b"".join(parts)
