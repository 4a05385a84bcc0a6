"""Server signing keys (ed25519).

Spec: server-server-api "Retrieving server keys"; appendices "Signing JSON".
A key file holds one line per key: ``ed25519 <version> <unpadded base64 seed>``.
"""

from __future__ import annotations

import os
import secrets
import string
from typing import Any, Iterator

from signedjson.key import (
    decode_signing_key_base64,
    encode_verify_key_base64,
    generate_signing_key,
    get_verify_key,
)
from unpaddedbase64 import encode_base64

SigningKey = Any  # nacl.signing.SigningKey with .alg and .version set by signedjson


def new_signing_key(version: str | None = None) -> SigningKey:
    if version is None:
        alphabet = string.ascii_letters + string.digits
        version = "a_" + "".join(secrets.choice(alphabet) for _ in range(4))
    return generate_signing_key(version)


def key_id(key: SigningKey) -> str:
    return f"{key.alg}:{key.version}"


def verify_key_base64(key: SigningKey) -> str:
    return encode_verify_key_base64(get_verify_key(key))


def encode_signing_key_line(key: SigningKey) -> str:
    return f"{key.alg} {key.version} {encode_base64(key.encode())}\n"


def write_signing_key_file(path: str, key: SigningKey) -> None:
    """Write ``key`` to ``path``, readable by the owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(encode_signing_key_line(key))


def _key_lines(path: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank, non-comment line of a key file."""
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if line and not line.startswith("#"):
                yield n, line.split()


def read_signing_key_file(path: str) -> list[SigningKey]:
    """All keys in ``path``; the first is the one used for signing.

    Raises ValueError naming the line when the file is malformed.
    """
    keys = []
    for n, parts in _key_lines(path):
        if len(parts) != 3 or parts[0] != "ed25519":
            raise ValueError(f"{path}:{n}: expected 'ed25519 <version> <base64 seed>'")
        try:
            keys.append(decode_signing_key_base64(parts[0], parts[1], parts[2]))
        except Exception as e:  # nacl / base64 errors
            raise ValueError(f"{path}:{n}: bad key: {e}") from None
    if not keys:
        raise ValueError(f"{path}: no signing key")
    return keys


def old_keys_path(signing_key_path: str) -> str:
    """Where the verify keys of retired signing keys are kept."""
    return signing_key_path + ".old"


def read_old_verify_keys(path: str) -> dict[str, tuple[str, int]]:
    """key_id -> (unpadded base64 verify key, expired_ts ms) from ``path``.

    Each line: ``ed25519 <version> <base64 verify key> <expired_ts>``. A
    missing file means no old keys. Raises ValueError naming a bad line.
    """
    out: dict[str, tuple[str, int]] = {}
    if not os.path.exists(path):
        return out
    for n, parts in _key_lines(path):
        if len(parts) != 4 or parts[0] != "ed25519" or not parts[3].isdigit():
            raise ValueError(f"{path}:{n}: expected 'ed25519 <version> <base64 verify key> <expired_ts>'")
        out[f"ed25519:{parts[1]}"] = (parts[2], int(parts[3]))
    return out


def rotate_signing_key(signing_key_path: str, now_ms: int) -> tuple[str, str]:
    """Replace the signing key with a new one; the old one's verify key is
    kept (with its expiry time) so other servers can still check what it
    signed. Returns (old key ID, new key ID)."""
    old = read_signing_key_file(signing_key_path)[0]
    new = new_signing_key()
    while new.version == old.version:
        new = new_signing_key()
    with open(old_keys_path(signing_key_path), "a") as f:
        f.write(f"ed25519 {old.version} {verify_key_base64(old)} {now_ms}\n")
    tmp = signing_key_path + ".new"
    write_signing_key_file(tmp, new)
    os.replace(tmp, signing_key_path)
    return key_id(old), key_id(new)
