"""Encryption at rest for the media store.

Not a Matrix spec section: this is zhome's own at-rest format. Every stored
file (original or thumbnail) is sealed with AES-256-GCM under a random
per-file key; the per-file key is stored in the database only wrapped (also
AES-256-GCM) by the server's media key. Rotating the server key re-wraps
the per-file keys and never touches the files.

File format (all integers big-endian)::

    magic "ZHM1" | file nonce (8 bytes) | segment size (4 bytes)
    then segments: AES-GCM(plaintext segment) = ciphertext || 16-byte tag

Segment ``i`` is sealed with nonce ``file_nonce || i (4 bytes)`` and the
header, the index and a last-segment flag as associated data, so segments
cannot be reordered, dropped or the file truncated without the tag failing.
Plaintext segments are ``segment_size`` bytes except the last, so a byte
range maps to whole segments and needs no other part of the file.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"ZHM1"
HEADER_SIZE = 16
TAG_SIZE = 16
DEFAULT_SEGMENT_SIZE = 64 * 1024
KEY_SIZE = 32
_KEY_CHECK_LABEL = b"zhome media key check v1"
_WRAP_AAD = b"zhome media file key v1"


class MediaKeyError(ValueError):
    """The server media key is missing, malformed or not the one the data needs."""


class DecryptionError(Exception):
    """A stored file failed authentication: corrupted, truncated or wrong key."""


# ---------------------------------------------------------------------------
# The server key


@dataclass(frozen=True)
class ServerKey:
    key: bytes

    @property
    def key_id(self) -> str:
        """A short public name for the key (not secret: derived by HMAC)."""
        return self.check_value()[:16]

    def check_value(self) -> str:
        """Stored in the database so start-up can tell a wrong key."""
        return hmac.new(self.key, _KEY_CHECK_LABEL, hashlib.sha256).hexdigest()

    def wrap(self, file_key: bytes) -> str:
        nonce = os.urandom(12)
        sealed = AESGCM(self.key).encrypt(nonce, file_key, _WRAP_AAD)
        return base64.b64encode(nonce + sealed).decode("ascii")

    def unwrap(self, wrapped: str) -> bytes:
        try:
            raw = base64.b64decode(wrapped.encode("ascii"), validate=True)
            return AESGCM(self.key).decrypt(raw[:12], raw[12:], _WRAP_AAD)
        except (InvalidTag, ValueError) as e:
            raise MediaKeyError("cannot unwrap a media file key: wrong server media key") from e


def new_key_text() -> str:
    """A new server media key as stored in a key file: base64 of 32 random bytes."""
    return base64.b64encode(os.urandom(KEY_SIZE)).decode("ascii")


def write_key_file(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(new_key_text() + "\n")


def read_key_file(path: str) -> ServerKey:
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except FileNotFoundError:
        raise MediaKeyError(f"media encryption key file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MediaKeyError(f"cannot read media encryption key file {path}: {e}") from None
    try:
        key = base64.b64decode(text, validate=True)
    except ValueError:
        raise MediaKeyError(f"media encryption key file {path} is not base64") from None
    if len(key) != KEY_SIZE:
        raise MediaKeyError(f"media encryption key file {path} must hold {KEY_SIZE} bytes, base64; got {len(key)}")
    return ServerKey(key)


class KeyRing:
    """The current server key plus old ones still able to unwrap file keys."""

    def __init__(self, current: ServerKey, old: tuple[ServerKey, ...] = ()) -> None:
        self.current = current
        self.by_id = {k.key_id: k for k in (*old, current)}

    def unwrap(self, key_id: str, wrapped: str) -> bytes:
        key = self.by_id.get(key_id)
        if key is None:
            raise MediaKeyError(f"media file key is wrapped by unknown server key {key_id}")
        return key.unwrap(wrapped)


# ---------------------------------------------------------------------------
# Files


def new_file_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def _nonce(file_nonce: bytes, index: int) -> bytes:
    return file_nonce + struct.pack(">I", index)


def _aad(header: bytes, index: int, last: bool) -> bytes:
    return header + struct.pack(">IB", index, 1 if last else 0)


def encrypted_size(plain_size: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    segments = max(1, -(-plain_size // segment_size))
    return HEADER_SIZE + plain_size + segments * TAG_SIZE


class StreamEncryptor:
    """Seals plaintext into the file format as it arrives: ``write`` pieces of
    any size, then ``close``. A segment is sealed once more bytes follow it,
    so the last one (which carries the last-segment flag) is sealed by
    ``close``; the output is the same as ``encrypt_stream`` makes. Blocking
    (writes to ``dst``): run off the reactor."""

    def __init__(self, file_key: bytes, dst: BinaryIO, segment_size: int = DEFAULT_SEGMENT_SIZE) -> None:
        if len(file_key) != KEY_SIZE:
            raise ValueError("file key must be 32 bytes")
        if segment_size < 1 or segment_size > 1 << 24:
            raise ValueError("bad segment size")
        self._aes = AESGCM(file_key)
        self._file_nonce = os.urandom(8)
        self._header = MAGIC + self._file_nonce + struct.pack(">I", segment_size)
        self._segment_size = segment_size
        self._dst = dst
        self._pending = b""
        self._index = 0
        self._closed = False
        self.size = 0

    def _seal(self, segment: bytes, last: bool) -> None:
        if self._index >= 1 << 32:
            raise ValueError("file too large")
        if self._index == 0:
            self._dst.write(self._header)
        self._dst.write(self._aes.encrypt(_nonce(self._file_nonce, self._index), segment,
                                          _aad(self._header, self._index, last)))
        self.size += len(segment)
        self._index += 1

    def write(self, data: bytes) -> None:
        if self._closed:
            raise ValueError("write after close")
        buf = self._pending + data if self._pending else data
        pos = 0
        seg = self._segment_size
        while len(buf) - pos > seg:
            self._seal(buf[pos:pos + seg], last=False)
            pos += seg
        self._pending = buf[pos:]

    def close(self) -> int:
        """Seal the last segment; the plaintext size."""
        if not self._closed:
            self._closed = True
            self._seal(self._pending, last=True)
            self._pending = b""
        return self.size


def encrypt_stream(file_key: bytes, src: BinaryIO, dst: BinaryIO, segment_size: int = DEFAULT_SEGMENT_SIZE,
                   first: bytes = b"") -> int:
    """Encrypt all of ``src`` (after ``first``, bytes already read from it)
    into ``dst``; returns the plaintext size. Blocking: run off the reactor."""
    encryptor = StreamEncryptor(file_key, dst, segment_size)
    if first:
        encryptor.write(first)
    while True:
        chunk = src.read(segment_size)
        if not chunk:
            return encryptor.close()
        encryptor.write(chunk)


def encrypt_bytes(file_key: bytes, data: bytes, segment_size: int = DEFAULT_SEGMENT_SIZE) -> bytes:
    import io

    out = io.BytesIO()
    encrypt_stream(file_key, io.BytesIO(data), out, segment_size)
    return out.getvalue()


def _read_header(src: BinaryIO) -> tuple[bytes, bytes, int]:
    header = src.read(HEADER_SIZE)
    if len(header) != HEADER_SIZE or header[:4] != MAGIC:
        raise DecryptionError("not a zhome encrypted media file")
    segment_size = struct.unpack(">I", header[12:16])[0]
    if segment_size < 1:
        raise DecryptionError("bad segment size")
    return header, header[4:12], segment_size


def decrypt_range(file_key: bytes, src: BinaryIO, plain_size: int, start: int = 0,
                  end: int | None = None) -> Iterator[bytes]:
    """Plaintext bytes ``start`` to ``end`` (exclusive; None: to the end),
    decrypting only the segments that hold them. Blocking."""
    header, file_nonce, segment_size = _read_header(src)
    if end is None or end > plain_size:
        end = plain_size
    if start >= end:
        # Still authenticate an empty file's single segment.
        if plain_size == 0:
            _decrypt_segment(AESGCM(file_key), src, header, file_nonce, segment_size, 0, 0)
        return
    last_index = max(0, (plain_size - 1) // segment_size)
    aes = AESGCM(file_key)
    first = start // segment_size
    for index in range(first, (end - 1) // segment_size + 1):
        src.seek(HEADER_SIZE + index * (segment_size + TAG_SIZE))
        length = segment_size if index < last_index else plain_size - index * segment_size
        plain = _decrypt_segment(aes, src, header, file_nonce, segment_size, index, length,
                                 last=index == last_index)
        seg_start = index * segment_size
        lo = max(start - seg_start, 0)
        hi = min(end - seg_start, len(plain))
        yield plain[lo:hi]


def _decrypt_segment(aes: AESGCM, src: BinaryIO, header: bytes, file_nonce: bytes, segment_size: int,
                     index: int, length: int, last: bool = True) -> bytes:
    sealed = src.read(length + TAG_SIZE)
    if len(sealed) != length + TAG_SIZE:
        raise DecryptionError("encrypted media file is truncated")
    try:
        return aes.decrypt(_nonce(file_nonce, index), sealed, _aad(header, index, last))
    except InvalidTag:
        raise DecryptionError("encrypted media file failed authentication") from None


def decrypt_all(file_key: bytes, src: BinaryIO, plain_size: int) -> bytes:
    return b"".join(decrypt_range(file_key, src, plain_size))
