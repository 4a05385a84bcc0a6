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
import shutil
import tempfile
from typing import BinaryIO, Callable

_NAME = re.compile(r"^[a-z0-9_]+(/[a-z0-9_]+)*\Z")


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

    def store_staged(self, staging: BinaryIO, name: str) -> None:
        """Store the whole of a ``staging_file`` as ``name``, like ``write``.
        The staging file stays open (the caller closes it)."""

        def produce(f: BinaryIO) -> None:
            staging.seek(0)
            shutil.copyfileobj(staging, f, 1024 * 1024)

        staging.flush()
        self.write(name, produce)


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _link_unnamed(fd: int, path: str) -> bool:
    """Give the unnamed file ``fd`` (O_TMPFILE) the name ``path``; False if
    this system does not allow it (then the caller copies)."""
    try:
        os.link(f"/proc/self/fd/{fd}", path, follow_symlinks=True)
        return True
    except OSError:
        pass
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        at_fdcwd, at_empty_path = -100, 0x1000
        return bool(libc.linkat(fd, b"", at_fdcwd, os.fsencode(path), at_empty_path) == 0)
    except (OSError, AttributeError):
        return False


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

    def _directory_of(self, name: str) -> tuple[str, str]:
        path = self._path(name)
        directory = os.path.dirname(path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        return path, directory

    @staticmethod
    def _publish(tmp: str, path: str) -> None:
        """Rename the complete file ``tmp`` to ``path``; ``tmp`` goes on failure."""
        try:
            os.replace(tmp, path)
        except BaseException:
            _remove_quietly(tmp)
            raise

    def write(self, name: str, produce: Callable[[BinaryIO], None]) -> None:
        path, directory = self._directory_of(name)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_")
        try:
            with os.fdopen(fd, "wb") as f:
                produce(f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            _remove_quietly(tmp)
            raise
        self._publish(tmp, path)

    def open(self, name: str) -> BinaryIO:
        return open(self._path(name), "rb")

    def store_staged(self, staging: BinaryIO, name: str) -> None:
        # The staging file is an unnamed file (O_TMPFILE) in the store: give
        # it a name instead of copying it, when the system allows that.
        path, directory = self._directory_of(name)
        staging.flush()
        os.fsync(staging.fileno())
        tmp = os.path.join(directory, f".tmp_{os.urandom(8).hex()}")
        if not _link_unnamed(staging.fileno(), tmp):
            super().store_staged(staging, name)
            return
        self._publish(tmp, path)

    def staging_file(self) -> BinaryIO:
        # On the store's own filesystem (/tmp may be small or in memory), and
        # linkable: an unnamed O_TMPFILE without O_EXCL can be given a name
        # by store_staged instead of being copied.
        tmpfile_flag = getattr(os, "O_TMPFILE", 0)
        if tmpfile_flag:
            try:
                fd = os.open(self.root, tmpfile_flag | os.O_RDWR, 0o600)
            except OSError:
                pass
            else:
                return os.fdopen(fd, "w+b")
        return tempfile.TemporaryFile(dir=self.root, prefix=".tmp_")

    def delete(self, name: str) -> None:
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            pass

    def exists(self, name: str) -> bool:
        return os.path.exists(self._path(name))
