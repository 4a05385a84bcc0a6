"""Operator tasks run from the command line (not through HTTP)."""

from __future__ import annotations

import json
from typing import IO, Any, Callable, Coroutine, Optional, cast

from twisted.internet import defer

from zhome.config import HomeserverConfig
from zhome.storage.accounts import AccountsStore
from zhome.storage.database import Database
from zhome.storage.ids import IdGenerator
from zhome.storage.migrations import prepare_database
from zhome.util.ids import is_valid_user_localpart
from zhome.util.passwords import hash_password


def register_user(config: HomeserverConfig, username: str, password: str, admin: bool) -> str:
    """Create a local user directly in the database; returns the user ID.

    Raises ValueError with a one-line reason when the name is invalid or taken.
    """
    local = username[1:].split(":", 1)[0] if username.startswith("@") else username
    local = local.lower()
    if not is_valid_user_localpart(local):
        raise ValueError(f"invalid username {username!r}: use a-z, 0-9, '.', '_', '=', '-', '/', '+'")
    if not password:
        raise ValueError("the password must not be empty")
    user_id = f"@{local}:{config.server_name}"
    result: dict[str, object] = {}

    async def main(reactor: object) -> None:
        db = Database(config.database.engine, dict(config.database.args))
        try:
            await prepare_database(db)
            store = AccountsStore(db, await IdGenerator.from_table(db, "access_tokens", "id"),
                                  await IdGenerator.from_table(db, "refresh_tokens", "id"))
            result["created"] = await store.create_user(user_id, hash_password(password), admin=admin,
                                                        displayname=local)
        finally:
            await db.close()

    _run(main)
    if not result.get("created"):
        raise ValueError(f"user {user_id} already exists")
    return user_id


def _run(main: Callable[[Any], Coroutine[Any, Any, None]]) -> None:
    """Run ``main(reactor)`` to completion on a reactor that is then stopped."""
    from zhome.util.reactor import reactor

    failure: list[BaseException] = []

    def go() -> None:
        d = defer.ensureDeferred(main(reactor))
        d.addErrback(lambda f: failure.append(cast(BaseException, f.value)))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run(installSignalHandlers=False)
    if failure:
        raise failure[0]


def verify_audit(config: HomeserverConfig) -> tuple[int, Optional[tuple[int, str]]]:
    """(number of entries, None when the audit log's hash chain holds, else
    the first bad entry's seq and what is wrong with it)."""
    from zhome.storage.audit import COLUMNS, verify

    result: dict[str, Any] = {}

    async def main(reactor: object) -> None:
        db = Database(config.database.engine, dict(config.database.args))
        try:
            await prepare_database(db)
            rows = await db.execute("audit_verify", f"SELECT {COLUMNS} FROM audit_log ORDER BY seq")
            result["count"] = len(rows)
            result["bad"] = verify(rows)
        finally:
            await db.close()

    _run(main)
    return int(result["count"]), result["bad"]


def export_audit(config: HomeserverConfig, out: IO[str]) -> int:
    """Write the audit log to ``out`` as JSON lines, oldest first; returns
    the number of entries."""
    from zhome.storage.audit import AuditLog

    result: dict[str, int] = {"n": 0}

    async def main(reactor: object) -> None:
        db = Database(config.database.engine, dict(config.database.args))
        try:
            await prepare_database(db)
            log = AuditLog(db)
            after = 0
            for _ in range(10 ** 7):  # bounded: pages of 1000 entries
                page = await log.entries(after, 1000)
                if not page:
                    break
                for entry in page:
                    out.write(json.dumps(entry, ensure_ascii=False, sort_keys=True) + "\n")
                result["n"] += len(page)
                after = page[-1]["seq"]
        finally:
            await db.close()

    _run(main)
    return result["n"]
