"""Where encrypted media files live: the storage backend interface.

Not a Matrix spec section. The repository only ever hands a backend
ciphertext, under a relative name it made itself (hex digits and "/"), so a
backend never sees plaintext or a client-chosen path. The filesystem
backend is the default; an S3-compatible backend implements the same four
abstract methods. All methods block: callers run them with ``deferToThread``.
"""

from __future__ import annotations

import abc
import os
import re
import tempfile
from typing import BinaryIO, Callable

_NAME = re.compile(r"^[a-z0-9_]+(/[a-z0-9_]+)*$")


class StorageBackend(abc.ABC):
    @abc.abstractmethod
    def write(self, name: str, produce: Callable[[BinaryIO], None]) -> None:
        """Store the file ``name``; ``produce`` writes its (encrypted) bytes.
        Atomic: a failure leaves no file behind."""

    @abc.abstractmethod
    def open(self, name: str) -> BinaryIO:
        """A seekable binary file object; FileNotFoundError when absent."""

    @abc.abstractmethod
    def delete(self, name: str) -> None:
        """Remove ``name``; absent is not an error."""

    @abc.abstractmethod
    def exists(self, name: str) -> bool: ...

    def staging_file(self) -> BinaryIO:
        """An anonymous read-write file for (encrypted) bytes on their way to
        ``write``: it has no name and is gone when closed or on a crash."""
        return tempfile.TemporaryFile()


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"bad media storage name {name!r}")
    return name


class FileSystemBackend(StorageBackend):
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        os.makedirs(self.root, mode=0o700, exist_ok=True)

    def _path(self, name: str) -> str:
        return os.path.join(self.root, *check_name(name).split("/"))

    def write(self, name: str, produce: Callable[[BinaryIO], None]) -> None:
        path = self._path(name)
        directory = os.path.dirname(path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_")
        try:
            with os.fdopen(fd, "wb") as f:
                produce(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def open(self, name: str) -> BinaryIO:
        return open(self._path(name), "rb")

    def staging_file(self) -> BinaryIO:
        # On the store's own filesystem: /tmp may be small or in memory.
        return tempfile.TemporaryFile(dir=self.root, prefix=".tmp_")

    def delete(self, name: str) -> None:
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            pass

    def exists(self, name: str) -> bool:
        return os.path.exists(self._path(name))
