"""Password hashing with argon2id (memory-hard); the clear text is never stored or logged."""

from __future__ import annotations

from typing import Optional

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from twisted.internet import defer, threads

# argon2id with 7 MiB and 5 passes, one of the equivalent settings OWASP's
# password storage guidance lists (it trades memory for passes): a few tens
# of ms a hash with a small memory peak. Hashes record their parameters, so
# changing them never breaks existing passwords.
_hasher = PasswordHasher(time_cost=5, memory_cost=7168, parallelism=1)


def configure(time_cost: int, memory_kib: int) -> None:
    """Set the cost of hashes made from now on (``password_hashing``)."""
    global _hasher
    _hasher = PasswordHasher(time_cost=time_cost, memory_cost=memory_kib, parallelism=1)


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def check_password(password: str, stored: str | None) -> bool:
    if not stored:
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
