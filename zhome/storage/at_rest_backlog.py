"""Sealing what was stored before encryption at rest (or while it was off).

A database from before encryption at rest holds events, account data and
device names in the clear. After start-up this job seals them in bounded
batches, a short pause between batches so requests keep their share of
the database, until none is left. Each row is updated only if it is still
what was read, so a concurrent write or purge is never undone.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional

from twisted.internet import defer, task

from zhome.storage.at_rest import PREFIX
from zhome.storage.database import Txn

if TYPE_CHECKING:
    from zhome.server import HomeServer

logger = logging.getLogger("zhome.storage.at_rest")

BATCH = 500
PAUSE_S = 0.05


def _seal_account_data_txn(hs: "HomeServer", txn: Txn, limit: int) -> int:
    txn.execute("SELECT user_id, room_id, type, content FROM account_data WHERE content NOT LIKE ?"
                " LIMIT ?", (PREFIX + "%", limit))
    rows = txn.fetchall()
    for user_id, room_id, dtype, content in rows:
        txn.execute("UPDATE account_data SET content = ? WHERE user_id = ? AND room_id = ? AND type = ?"
                    " AND content = ?",
                    (hs.user_data.seal_content(user_id, room_id, dtype, content), user_id, room_id, dtype, content))
    return len(rows)


def _seal_devices_txn(hs: "HomeServer", txn: Txn, limit: int) -> int:
    txn.execute("SELECT user_id, device_id, display_name, last_seen_ip FROM devices"
                " WHERE (display_name IS NOT NULL AND display_name NOT LIKE ?)"
                " OR (last_seen_ip IS NOT NULL AND last_seen_ip NOT LIKE ?) LIMIT ?",
                (PREFIX + "%", PREFIX + "%", limit))
    rows = txn.fetchall()
    acc = hs.accounts
    for user_id, device_id, name, ip in rows:
        new_name = name if name is None or name.startswith(PREFIX) else acc._seal_name(user_id, device_id, name)
        new_ip = ip if ip is None or ip.startswith(PREFIX) else acc._seal_ip(user_id, device_id, ip)
        txn.execute("UPDATE devices SET display_name = ?, last_seen_ip = ? WHERE user_id = ? AND device_id = ?"
                    " AND display_name IS NOT DISTINCT FROM ? AND last_seen_ip IS NOT DISTINCT FROM ?",
                    (new_name, new_ip, user_id, device_id, name, ip))
    return len(rows)


def _seal_profiles_txn(hs: "HomeServer", txn: Txn, limit: int) -> int:
    txn.execute("SELECT user_id, displayname, avatar_url FROM profiles"
                " WHERE (displayname IS NOT NULL AND displayname NOT LIKE ?)"
                " OR (avatar_url IS NOT NULL AND avatar_url NOT LIKE ?) LIMIT ?", (PREFIX + "%", PREFIX + "%", limit))
    rows = txn.fetchall()
    acc = hs.accounts
    for user_id, name, avatar in rows:
        new_name = name if name is None or name.startswith(PREFIX) else acc.seal_profile(user_id, "displayname", name)
        new_av = avatar if avatar is None or avatar.startswith(PREFIX) else acc.seal_profile(
            user_id, "avatar_url", avatar)
        txn.execute("UPDATE profiles SET displayname = ?, avatar_url = ? WHERE user_id = ?"
                    " AND displayname IS NOT DISTINCT FROM ? AND avatar_url IS NOT DISTINCT FROM ?",
                    (new_name, new_av, user_id, name, avatar))
    return len(rows)


def _seal_remote_profiles_txn(hs: "HomeServer", txn: Txn, limit: int) -> int:
    from zhome.storage.at_rest import seal_text

    txn.execute("SELECT user_id, display_name, avatar_url FROM user_directory_remote_profiles"
                " WHERE (display_name IS NOT NULL AND display_name NOT LIKE ?)"
                " OR (avatar_url IS NOT NULL AND avatar_url NOT LIKE ?) LIMIT ?", (PREFIX + "%", PREFIX + "%", limit))
    rows = txn.fetchall()
    for user_id, name, avatar in rows:
        new_name = name if name is None or name.startswith(PREFIX) else seal_text(
            hs.sealer, user_id, name, f"remote_profiles.display_name\x00{user_id}")
        new_av = avatar if avatar is None or avatar.startswith(PREFIX) else seal_text(
            hs.sealer, user_id, avatar, f"remote_profiles.avatar_url\x00{user_id}")
        txn.execute("UPDATE user_directory_remote_profiles SET display_name = ?, avatar_url = ? WHERE user_id = ?"
                    " AND display_name IS NOT DISTINCT FROM ? AND avatar_url IS NOT DISTINCT FROM ?",
                    (new_name, new_av, user_id, name, avatar))
    return len(rows)


def _seal_media_names_txn(hs: "HomeServer", txn: Txn, limit: int) -> int:
    repo = hs.media_repository
    if repo is None:
        return 0
    txn.execute("SELECT origin, media_id, user_id, upload_name FROM media WHERE upload_name IS NOT NULL"
                " AND upload_name NOT LIKE ? LIMIT ?", (PREFIX + "%", limit))
    rows = txn.fetchall()
    for origin, media_id, user_id, name in rows:
        txn.execute("UPDATE media SET upload_name = ? WHERE origin = ? AND media_id = ? AND upload_name = ?",
                    (repo.store.seal_name(origin, media_id, user_id, name), origin, media_id, name))
    return len(rows)


#: Tables the job rewrites: their old row versions are scrubbed afterwards.
SEALED_TABLES = ("events", "account_data", "devices", "profiles", "user_directory_remote_profiles", "media")


class SealingBacklog:
    def __init__(self, hs: "HomeServer") -> None:
        self.hs = hs
        self._running: Optional[defer.Deferred[None]] = None
        self._stopping = False
        self.sealed = 0
        self.done = not hs.sealer.enabled

    def start(self) -> None:
        if self.hs.sealer.enabled:
            self._running = defer.ensureDeferred(self._run())

    async def _run(self) -> None:
        from zhome.util.reactor import reactor

        hs = self.hs
        steps = (("events", hs.events.seal_backlog_txn),
                 ("account data", lambda txn, n: _seal_account_data_txn(hs, txn, n)),
                 ("devices", lambda txn, n: _seal_devices_txn(hs, txn, n)),
                 ("profiles", lambda txn, n: _seal_profiles_txn(hs, txn, n)),
                 ("remote profiles", lambda txn, n: _seal_remote_profiles_txn(hs, txn, n)),
                 ("media names", lambda txn, n: _seal_media_names_txn(hs, txn, n)))
        for name, step in steps:
            # Bounded: every batch seals or moves past up to BATCH rows, and
            # rows written from now on are sealed already.
            while not self._stopping:
                try:
                    n = await hs.db.run_interaction(f"seal_backlog_{name.replace(' ', '_')}", step, BATCH)
                except Exception:
                    logger.exception("sealing stored %s failed; the rest waits for the next start", name)
                    return
                self.sealed += n
                if n < BATCH:
                    break
                await task.deferLater(reactor, PAUSE_S, lambda: None)
        if self._stopping:
            return
        if self.sealed:
            # The clear text of the rows just sealed leaves the files too
            # (SQLite overwrites freed space; PostgreSQL's old row versions
            # go with a vacuum).
            try:
                await hs.db.scrub(SEALED_TABLES)
            except Exception:
                logger.exception("scrubbing after sealing failed")
                return
            logger.info("sealed %d rows stored before encryption at rest", self.sealed)
        self.done = True

    async def stop(self) -> None:
        self._stopping = True
        if self._running is not None:
            await self._running
