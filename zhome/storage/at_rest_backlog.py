"""Sealing what was stored before encryption at rest (or while it was off).

A database from before encryption at rest holds events, account data and
device names in the clear. After start-up this job seals them in bounded
batches, a short pause between batches so requests keep their share of
the database, until none is left. Each row is updated only if it is still
what was read, so a concurrent write or purge is never undone.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Optional

from twisted.internet import defer, task

from zhome.storage.at_rest import PREFIX, seal_text
from zhome.storage.database import Txn

if TYPE_CHECKING:
    from zhome.server import HomeServer

logger = logging.getLogger("zhome.storage.at_rest")

BATCH = 500
PAUSE_S = 0.05


def _seal_columns_txn(txn: Txn, limit: int, table: str, keys: tuple[str, ...], columns: tuple[str, ...],
                      seal: Callable[[tuple[Any, ...], str, str], Optional[str]]) -> int:
    """Seal up to ``limit`` rows of ``table`` with a clear value in one of
    ``columns``: ``seal(key values, column, value)`` gives the sealed text.
    A row is only updated if it still holds what was read."""
    pending = " OR ".join(f"({c} IS NOT NULL AND {c} NOT LIKE ?)" for c in columns)
    txn.execute(f"SELECT {', '.join(keys + columns)} FROM {table} WHERE {pending} LIMIT ?",
                (*[PREFIX + "%"] * len(columns), limit))
    rows = txn.fetchall()
    sets = ", ".join(f"{c} = ?" for c in columns)
    where = " AND ".join([f"{k} = ?" for k in keys] + [f"{c} IS NOT DISTINCT FROM ?" for c in columns])
    for row in rows:
        key, values = tuple(row[:len(keys)]), tuple(row[len(keys):])
        sealed = [v if v is None or v.startswith(PREFIX) else seal(key, c, v) for c, v in zip(columns, values)]
        txn.execute(f"UPDATE {table} SET {sets} WHERE {where}", (*sealed, *key, *values))
    return len(rows)


def _steps(hs: "HomeServer") -> list[tuple[str, Callable[[Txn, int], int]]]:
    """(what, seal up to N rows of it) for everything the job seals."""
    acc, user_data, sealer = hs.accounts, hs.user_data, hs.sealer
    repo = hs.media_repository

    def device(k: tuple[Any, ...], column: str, v: str) -> Optional[str]:
        return acc.seal_name(k[0], k[1], v) if column == "display_name" else acc.seal_ip(k[0], k[1], v)

    def remote_profile(k: tuple[Any, ...], column: str, v: str) -> Optional[str]:
        return seal_text(sealer, k[0], v, f"remote_profiles.{column}\x00{k[0]}")

    steps: list[tuple[str, Callable[[Txn, int], int]]] = [
        ("events", hs.events.seal_backlog_txn),
        ("account data", lambda txn, n: _seal_columns_txn(
            txn, n, "account_data", ("user_id", "room_id", "type"), ("content",),
            lambda k, _c, v: user_data.seal_content(k[0], k[1], k[2], v))),
        ("devices", lambda txn, n: _seal_columns_txn(
            txn, n, "devices", ("user_id", "device_id"), ("display_name", "last_seen_ip"), device)),
        ("profiles", lambda txn, n: _seal_columns_txn(
            txn, n, "profiles", ("user_id",), ("displayname", "avatar_url"),
            lambda k, c, v: acc.seal_profile(k[0], c, v))),
        ("to-device messages", lambda txn, n: _seal_columns_txn(
            txn, n, "device_inbox", ("stream_id", "user_id", "device_id"), ("message_json",),
            lambda k, _c, v: hs.to_device_store.seal_message(int(k[0]), k[1], k[2], v))),
        ("report reasons", lambda txn, n: _seal_columns_txn(
            txn, n, "content_reports", ("id", "reporter"), ("reason",),
            lambda k, _c, v: hs.admin_store.seal_report_reason(int(k[0]), k[1], v))),
        ("remote profiles", lambda txn, n: _seal_columns_txn(
            txn, n, "user_directory_remote_profiles", ("user_id",), ("display_name", "avatar_url"),
            remote_profile)),
    ]
    steps.append(("extended profile fields", lambda txn, n: _seal_columns_txn(
        txn, n, "profile_fields", ("user_id", "field"), ("value",),
        lambda k, _c, v: acc.seal_profile(k[0], "field:" + k[1], v))))
    sender = getattr(hs, "federation_sender", None)
    if sender is not None:
        steps.append(("queued federation EDUs", lambda txn, n: _seal_columns_txn(
            txn, n, "federation_outbound", ("id",), ("edu_json",),
            lambda k, _c, v: sender.seal_edu(int(k[0]), v))))
    if repo is not None:
        steps.append(("media names", lambda txn, n: _seal_columns_txn(
            txn, n, "media", ("origin", "media_id", "user_id"), ("upload_name",),
            lambda k, _c, v: repo.store.seal_name(k[0], k[1], k[2], v))))
    return steps


#: Tables the job rewrites: their old row versions are scrubbed afterwards.
SEALED_TABLES = ("events", "account_data", "devices", "device_inbox", "content_reports", "profiles", "profile_fields",
                 "user_directory_remote_profiles", "federation_outbound", "media")


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
        steps = _steps(hs)
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
