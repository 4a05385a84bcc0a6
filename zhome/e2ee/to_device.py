"""Send-to-device messages: PUT /sendToDevice, /sync's ``to_device``, and
the m.direct_to_device EDU both ways.

Spec: client-server-api "Send-to-Device messaging"; server-server-api
"Send-to-device messaging". ``*`` as a device ID means every device of
the user. Messages wait in the database until the device acknowledges
them with a later since token.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any, Awaitable, Callable, Optional

from twisted.internet import defer

from zhome.http.errors import bad_json
from zhome.storage.accounts import AccountsStore
from zhome.storage.to_device import MAX_PER_SYNC, ToDeviceStore
from zhome.sync.notifier import Notifier
from zhome.util.ids import is_valid_user_id, server_of

logger = logging.getLogger(__name__)

MAX_RECIPIENTS = 10000
MAX_CHECKED = 200000
TXN_ID_LIFETIME_MS = 24 * 3600 * 1000
EXPIRE_EVERY_S = 3600.0


class ToDeviceService:
    def __init__(self, server_name: str, store: ToDeviceStore, accounts: AccountsStore, notifier: Notifier) -> None:
        self.server_name = server_name
        self.store = store
        self.accounts = accounts
        self.notifier = notifier
        #: queue_edu(destinations, edu_type, content) when federating.
        self.queue_edu: Optional[Callable[[list[str], str, dict[str, Any]], Awaitable[None]]] = None
        # Positions are taken inside the writing transaction; one writer at
        # a time makes them commit in order, so a token never covers a
        # position whose message is still uncommitted (and would be
        # deleted as acknowledged).
        self._write_lock = defer.DeferredLock()
        # Hints that spare /sync a query when the to-device stream did not
        # move: devices whose last response carried messages (they need the
        # acknowledging delete) and devices looked at since this process
        # started. Losing them costs one query, never a message.
        self._delivered: set[tuple[str, str]] = set()
        #: user_id -> None, when a sync acknowledged (deleted) messages
        #: delivered before: /sync answers kept for the user hold them.
        self.on_acknowledged: list[Callable[[str], None]] = []
        # device -> the stream position up to which it was last looked at.
        self._checked: dict[tuple[str, str], int] = {}
        # user -> device -> [(position, message)]: for devices whose waiting
        # messages this process knows exactly, every message written after
        # the position in _checked. These rows are in the database too; a
        # sync takes them from here instead of querying for them. A device
        # that lets more than MAX_PER_SYNC wait, or is deleted, is dropped
        # (the database answers then).
        self._pending: dict[str, dict[str, list[tuple[int, dict[str, Any]]]]] = {}
        # Syncs reading a device's messages from the database: the messages
        # written meanwhile (what _pending holds once the read is done).
        self._recorders: dict[tuple[str, str], list[list[tuple[int, dict[str, Any]]]]] = {}
        # user -> bumped whenever the user's devices are deleted.
        self._forgotten: dict[str, int] = {}
        self._last_written = 0
        self._last_expiry = time.monotonic()
        accounts.after_device_deletion.append(self._forget_user)

    async def _add(self, rows: list[tuple[str, str, dict[str, Any]]],
                   txn_key: Optional[tuple[str, str, str]]) -> bool:
        await self._write_lock.acquire()
        try:
            is_new, positions = await self.store.add_messages(rows, txn_key)
            if positions:
                self._written(rows, positions)
                self.notifier.on_to_device(positions[-1], sorted({u for u, _, _ in rows}))
            if time.monotonic() - self._last_expiry > EXPIRE_EVERY_S:
                self._last_expiry = time.monotonic()
                await self.store.expire_txns(TXN_ID_LIFETIME_MS)
        finally:
            self._write_lock.release()
        return is_new

    def _written(self, rows: list[tuple[str, str, dict[str, Any]]], positions: list[int]) -> None:
        """After commit: the new rows join what is known to wait."""
        self._last_written = positions[-1]
        for (user_id, device_id, msg), pos in zip(rows, positions):
            by_device = self._pending.get(user_id)
            pending = by_device.get(device_id) if by_device is not None else None
            if by_device is not None and pending is not None:
                if len(pending) >= MAX_PER_SYNC:
                    del by_device[device_id]
                else:
                    pending.append((pos, msg))
            for rec in self._recorders.get((user_id, device_id), ()):
                rec.append((pos, msg))

    def _forget_user(self, user_id: str) -> None:
        """After some of the user's devices (and their messages) were deleted."""
        self._pending.pop(user_id, None)
        self._forgotten[user_id] = self._forgotten.get(user_id, 0) + 1

    def _acknowledged(self, user_id: str) -> None:
        for hook in self.on_acknowledged:
            hook(user_id)

    def _acknowledge(self, user_id: str, device_id: str, acked: int) -> None:
        self._acknowledged(user_id)

        async def delete() -> None:
            try:
                await self.store.delete_acknowledged(user_id, device_id, acked)
            except Exception:
                # They are deleted by the device's next read of the database.
                logger.warning("could not delete acknowledged to-device messages", exc_info=True)

        defer.ensureDeferred(delete())

    async def _expand_local(self, sender: str, etype: str, messages: dict[str, dict[str, Any]]
                            ) -> list[tuple[str, str, dict[str, Any]]]:
        rows: list[tuple[str, str, dict[str, Any]]] = []
        for user_id, by_device in messages.items():
            devices = await self.accounts.get_device_ids(user_id)
            for device_id, content in by_device.items():
                targets = sorted(devices) if device_id == "*" else [device_id] if device_id in devices else []
                for d in targets:
                    rows.append((user_id, d, {"sender": sender, "type": etype, "content": content}))
        return rows

    async def send(self, sender: str, sender_device: str, etype: str, txn_id: str, body: Any) -> None:
        messages = _parse_messages(body.get("messages") if isinstance(body, dict) else None)
        local = {u: m for u, m in messages.items() if server_of(u) == self.server_name}
        remote: dict[str, dict[str, dict[str, Any]]] = {}
        for u, m in messages.items():
            if server_of(u) != self.server_name:
                remote.setdefault(server_of(u), {})[u] = m
        rows = await self._expand_local(sender, etype, local)
        if not await self._add(rows, (sender, sender_device, txn_id)):
            return
        if remote and self.queue_edu is not None:
            for server, msgs in sorted(remote.items()):
                await self.queue_edu([server], "m.direct_to_device", {
                    "sender": sender, "type": etype, "message_id": secrets.token_urlsafe(16)[:32],
                    "messages": msgs})

    async def on_remote_edu(self, origin: str, content: dict[str, Any]) -> None:
        sender, etype, message_id = content.get("sender"), content.get("type"), content.get("message_id")
        if not isinstance(sender, str) or server_of(sender) != origin or not isinstance(etype, str) \
                or not isinstance(message_id, str):
            return
        try:
            messages = _parse_messages(content.get("messages"))
        except Exception:
            return
        local = {u: m for u, m in messages.items() if server_of(u) == self.server_name}
        rows = await self._expand_local(sender, etype, local)
        # The message ID makes a repeated EDU (a retried transaction under
        # another ID) deliver nothing twice.
        await self._add(rows, (sender, "federation:" + origin, message_id[:64]))

    async def for_sync(self, user_id: str, device_id: str, since_pos: Optional[int], now_pos: int
                       ) -> tuple[list[dict[str, Any]], int]:
        """The messages for this /sync response and the to-device position
        of its next_batch."""
        key = (user_id, device_id)
        checked = self._checked.get(key)
        pending = self._pending.get(user_id, {}).get(device_id)
        if checked is not None and pending is not None and (
                (since_pos is not None and since_pos >= checked) or (since_pos is None and key not in self._delivered)):
            # Everything up to ``checked`` is acknowledged (or was never
            # delivered) and what waits after it is ``pending``: no query.
            acked = since_pos or 0
            if since_pos is not None and (key in self._delivered or (pending and pending[0][0] <= acked)):
                # Deleted in the background: a later read skips them by position.
                self._acknowledge(user_id, device_id, acked)
            due = [m for p, m in pending if acked < p <= now_pos]
            self._pending[user_id][device_id] = [(p, m) for p, m in pending if p > now_pos]
            self._checked[key] = now_pos
            if due:
                self._delivered.add(key)
            else:
                self._delivered.discard(key)
            return due, now_pos
        if checked is not None and key not in self._delivered and (
                (since_pos is not None and since_pos >= now_pos) or checked >= now_pos):
            # Nothing was waiting when last looked at, nothing is to be
            # acknowledged, and no message was written since (every one
            # moves the stream on): an initial sync too is spared the query.
            return [], now_pos
        if since_pos is not None and key in self._delivered:
            self._acknowledged(user_id)
        rec: list[tuple[int, dict[str, Any]]] = []
        recorders = self._recorders.setdefault(key, [])
        recorders.append(rec)
        written_before, forgotten = self._last_written, self._forgotten.get(user_id, 0)
        try:
            events, pos = await self.store.take_for_sync(user_id, device_id, since_pos or 0, now_pos)
        finally:
            recorders.remove(rec)
            if not recorders:
                del self._recorders[key]
        if len(self._checked) >= MAX_CHECKED:
            self._checked.clear()
            self._delivered.clear()
            self._pending.clear()
        self._checked[key] = pos
        if pos >= now_pos and written_before <= pos and forgotten == self._forgotten.get(user_id, 0) \
                and len(rec) < MAX_PER_SYNC:
            # The read saw everything written before it up to ``pos``; what
            # came after it was recorded.
            self._pending.setdefault(user_id, {})[device_id] = [(p, m) for p, m in rec if p > pos]
        else:
            self._pending.get(user_id, {}).pop(device_id, None)
        if events:
            self._delivered.add(key)
        else:
            self._delivered.discard(key)
        return events, pos


def _parse_messages(raw: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(raw, dict):
        raise bad_json("messages must be an object of user IDs to devices to contents")
    total = 0
    for user_id, by_device in raw.items():
        if not isinstance(user_id, str) or not is_valid_user_id(user_id):
            raise bad_json(f"messages: {user_id!r} is not a user ID")
        if not isinstance(by_device, dict):
            raise bad_json(f"messages.{user_id} must be an object of device IDs to contents")
        for device_id, content in by_device.items():
            if not isinstance(device_id, str) or not device_id:
                raise bad_json(f"messages.{user_id}: bad device ID")
            if not isinstance(content, dict):
                raise bad_json(f"messages.{user_id}.{device_id} must be an object")
            total += 1
    if total > MAX_RECIPIENTS:
        raise bad_json(f"At most {MAX_RECIPIENTS} recipients per request")
    return raw
