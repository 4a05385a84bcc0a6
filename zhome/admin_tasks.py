"""Operator tasks run from the command line (not through HTTP)."""

from __future__ import annotations

from typing import Any, Callable, Coroutine, cast

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
