"""Upload bodies encrypted as they arrive.

Spec: client-server-api "Content repository" (POST /_matrix/media/v3/upload,
PUT /_matrix/media/v3/upload/{serverName}/{mediaId}). Twisted would write a
request body to a temporary file (plaintext, outside the media store) and
the repository would then read it back to encrypt it. For the upload
endpoints the request's body file is instead an ``EncryptingUpload``: each
piece is sealed under a new file key as it arrives into an unnamed staging
file of the storage backend, so no plaintext reaches a disk and the bytes
are written once. The handler then only names the staging file
(``MediaRepository`` via ``store``).
"""

from __future__ import annotations

import re
from typing import BinaryIO, Optional

from twisted.internet import threads

from zhome.media import crypto
from zhome.media.backend import StorageBackend
from zhome.media.thumbnailer import SNIFF_BYTES

_UPLOAD_PATH = re.compile(rb"^/_matrix/media/(?:v3|r0)/upload(?:/[^/]+/[^/]+)?/?$")


def is_upload(method: bytes, path: bytes) -> bool:
    """Whether ``method path`` (path without query) is an upload endpoint."""
    return method in (b"POST", b"PUT") and _UPLOAD_PATH.match(path) is not None


class EncryptingUpload:
    """The request body file of an upload. Twisted calls ``write`` (on the
    reactor, as it would write its own temporary file), ``tell``, ``seek``
    and ``close``; there is nothing to read back."""

    def __init__(self, backend: StorageBackend) -> None:
        self.backend = backend
        self.file_key = crypto.new_file_key()
        self._staging: Optional[BinaryIO] = backend.staging_file()
        self._encryptor = crypto.StreamEncryptor(self.file_key, self._staging)
        self.size = 0
        self.head = b""
        self._error: Optional[OSError] = None
        self._storing = False
        self._close_requested = False

    # -- the file interface Twisted uses ------------------------------------

    def write(self, data: bytes) -> None:
        if self._staging is None or self._storing or self._error is not None:
            return
        self.size += len(data)
        if len(self.head) < SNIFF_BYTES:
            self.head += data[:SNIFF_BYTES - len(self.head)]
        try:
            self._encryptor.write(data)
        except OSError as e:  # e.g. the disk is full: reported by store()
            self._error = e

    def tell(self) -> int:
        return self.size

    def seek(self, offset: int, whence: int = 0) -> int:
        # Positions only matter to readers, and there are none.
        return self.size if whence == 2 else 0

    def read(self, n: int = -1) -> bytes:
        raise OSError("an encrypted upload body cannot be read back")

    def close(self) -> None:
        if self._storing:
            # Twisted closes the body when the client goes away; the thread
            # storing it closes it when done.
            self._close_requested = True
            return
        staging, self._staging = self._staging, None
        if staging is not None:
            staging.close()

    # -- for the repository --------------------------------------------------

    async def store(self, name: str) -> int:
        """Seal the last segment and store the file as ``name``; the
        plaintext size. Raises OSError if writing failed at any point."""
        if self._staging is None:
            raise OSError("the upload body was closed before it was stored")
        self._storing = True
        try:
            return int(await threads.deferToThread(self._store_blocking, name))
        finally:
            self._storing = False
            if self._close_requested:
                self.close()

    def _store_blocking(self, name: str) -> int:
        if self._error is not None:
            raise self._error
        assert self._staging is not None
        self._encryptor.close()
        self.backend.store_staged(self._staging, name)
        return self.size


__all__ = ["EncryptingUpload", "is_upload"]
