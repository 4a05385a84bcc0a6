"""Password hashing: argon2id (memory-hard, the default) or bcrypt for new
hashes, as ``password_hashing.scheme`` says; either kind of stored hash is
checked, whatever the scheme, so accounts moved from a server that used
bcrypt (Synapse's ``$2b$`` hashes) keep their passwords. The clear text is
never stored or logged.

bcrypt reads at most 72 bytes of a password. Older releases of the library
cut longer ones silently, newer ones refuse them; here they are cut at 72
bytes, explicitly and the same way for hashing and checking, so hashes made
by either kind of release verify.
"""

from __future__ import annotations

from typing import Optional

import bcrypt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from twisted.internet import defer, threads

# argon2id with 7 MiB and 5 passes, one of the equivalent settings OWASP's
# password storage guidance lists (it trades memory for passes): a few tens
# of ms a hash with a small memory peak. Hashes record their parameters, so
# changing them never breaks existing passwords.
_hasher = PasswordHasher(time_cost=5, memory_cost=7168, parallelism=1)


_scheme = "argon2"
_bcrypt_rounds = 12
BCRYPT_MAX_BYTES = 72


def configure(time_cost: int, memory_kib: int, scheme: str = "argon2", bcrypt_rounds: int = 12) -> None:
    """Set the scheme and cost of hashes made from now on (``password_hashing``)."""
    global _hasher, _scheme, _bcrypt_rounds
    if scheme not in ("argon2", "bcrypt"):
        raise ValueError(f"unknown password hashing scheme {scheme!r}")
    _hasher = PasswordHasher(time_cost=time_cost, memory_cost=memory_kib, parallelism=1)
    _scheme = scheme
    _bcrypt_rounds = bcrypt_rounds


def _bcrypt_input(password: str) -> bytes:
    return password.encode("utf-8")[:BCRYPT_MAX_BYTES]


def hash_password(password: str) -> str:
    if _scheme == "bcrypt":
        return bcrypt.hashpw(_bcrypt_input(password), bcrypt.gensalt(rounds=_bcrypt_rounds)).decode("ascii")
    return _hasher.hash(password)


def check_password(password: str, stored: str | None) -> bool:
    if not stored:
        return False
    if stored.startswith(("$2a$", "$2b$", "$2y$")):
        try:
            return bcrypt.checkpw(_bcrypt_input(password), stored.encode("ascii"))
        except ValueError:  # a malformed stored hash
            return False
    try:
        return _hasher.verify(stored, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


# Each argon2 hash takes ~19 MiB while it runs; hashing one at a time (off
# the reactor thread) bounds what a burst of logins or sign-ups adds to the
# server's memory.
_semaphore: Optional["defer.DeferredSemaphore"] = None


def _hash_slot() -> "defer.DeferredSemaphore":
    global _semaphore
    if _semaphore is None:
        _semaphore = defer.DeferredSemaphore(1)
    return _semaphore


async def hash_password_async(password: str) -> str:
    result: str = await _hash_slot().run(threads.deferToThread, hash_password, password)
    return result


async def check_password_async(password: str, stored: Optional[str]) -> bool:
    if not stored:
        return False
    result: bool = await _hash_slot().run(threads.deferToThread, check_password, password, stored)
    return result
