"""Device lists: local changes, their m.device_list_update EDUs, remote
users' lists and what /sync and /keys/changes report.

Spec: client-server-api "Tracking the device list for a user";
server-server-api "Device Management" (m.device_list_update with
stream_id and prev_id, GET /user/devices/{userId} for a resync when the
prev_id chain has a gap).
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable, Iterable, Optional
from urllib.parse import quote

from twisted.internet import defer

from zhome.e2ee.cross_signing import parse_remote_keys
from zhome.e2ee.validation import check_device_keys
from zhome.http.errors import MatrixError
from zhome.storage.accounts import AccountsStore
from zhome.storage.database import Txn
from zhome.storage.device_lists import DeviceListStore
from zhome.storage.e2e_keys import E2eKeysStore
from zhome.storage.events import EventsStore
from zhome.storage.to_device import ToDeviceStore
from zhome.sync.notifier import Notifier
from zhome.util.ids import server_of

logger = logging.getLogger(__name__)

RESYNC_TIMEOUT_S = 10.0
MAX_REMOTE_DEVICES = 1000
MAX_SINCE_START_CACHE = 10000


class DeviceListService:
    def __init__(self, server_name: str, store: DeviceListStore, accounts: AccountsStore, keys: E2eKeysStore,
                 events: EventsStore, notifier: Notifier) -> None:
        self.server_name = server_name
        self.store = store
        self.accounts = accounts
        self.keys = keys
        self.events = events
        self.notifier = notifier
        # user -> ((device-list position, events position), answer) of changed_since_start.
        self._since_start: dict[str, tuple[tuple[int, int], list[str]]] = {}
        #: queue_edu(destinations, edu_type, content) when federating.
        self.queue_edu: Optional[Callable[[list[str], str, dict[str, Any]], Awaitable[None]]] = None
        #: get_json(destination, path, timeout=...) when federating.
        self.fetch: Optional[Callable[..., Awaitable[Any]]] = None
        #: Called with (user_id, device_ids) after local devices are deleted.
        self.on_devices_deleted: list[Callable[[str, list[str]], None]] = []
        #: Called with the user ID once a change of a local user's devices,
        #: device keys or cross-signing keys (or their signatures) has
        #: committed: caches of what /keys/query gives out drop the user.
        self.on_local_change: list[Callable[[str], None]] = []
        self._locks: dict[str, defer.DeferredLock] = {}
        accounts.device_change_hooks.append(self.devices_changed_txn)
        keys.on_device_keys_changed_txn = lambda txn, u, d: self.devices_changed_txn(txn, u, [d], False)

    # -- local changes ---------------------------------------------------------------
    def devices_changed_txn(self, txn: Txn, user_id: str, device_ids: list[str], deleted: bool) -> None:
        """In the transaction that changed the devices: their keys and
        waiting messages go with them, and the change joins the stream."""
        if deleted:
            E2eKeysStore.delete_device_keys_txn(txn, user_id, device_ids)
            ToDeviceStore.delete_for_devices_txn(txn, user_id, device_ids)
        rows = self.store.record_change_txn(txn, user_id, device_ids)
        txn.call_after_commit(lambda: self._after_local_change(user_id, rows, deleted))

    def _after_local_change(self, user_id: str, rows: list[tuple[int, str, Optional[int]]], deleted: bool) -> None:
        self.local_user_changed(user_id)
        if deleted:
            for hook in self.on_devices_deleted:
                hook(user_id, [d for _, d, _ in rows])
        # The stream moves on now, before the rooms to wake are looked up:
        # a /sync right after the request that made the change includes it.
        self.notifier.on_device_list_change(max(sid for sid, _, _ in rows), [], [user_id])
        defer.ensureDeferred(self._announce(user_id, rows))

    async def _announce(self, user_id: str, rows: list[tuple[int, str, Optional[int]]]) -> None:
        try:
            await self._wake_for(user_id, max(sid for sid, _, _ in rows))
            if self.queue_edu is None:
                return
            servers = sorted({server_of(u) for u in await self.store.users_sharing_room(user_id)}
                             - {self.server_name})
            if not servers:
                return
            devices = {d["device_id"]: d for d in await self.accounts.get_devices(user_id)}
            keys = (await self.keys.get_device_keys([user_id])).get(user_id, {})
            for stream_id, device_id, prev_id in rows:
                content: dict[str, Any] = {"user_id": user_id, "device_id": device_id, "stream_id": stream_id,
                                           "prev_id": [prev_id] if prev_id is not None else []}
                if device_id not in devices:
                    content["deleted"] = True
                else:
                    if devices[device_id].get("display_name") is not None:
                        content["device_display_name"] = devices[device_id]["display_name"]
                    if device_id in keys:
                        content["keys"] = keys[device_id]
                await self.queue_edu(servers, "m.device_list_update", content)
        except Exception:
            logger.exception("announcing device list change of %s", user_id)

    def local_user_changed(self, user_id: str) -> None:
        for hook in self.on_local_change:
            hook(user_id)

    async def notify_change(self, user_id: str, pos: int) -> None:
        """Wake /sync for a change at ``pos`` of the stream (a change of
        ``user_id``'s cross-signing keys, recorded by its store)."""
        if server_of(user_id) == self.server_name:
            self.local_user_changed(user_id)
        await self._wake_for(user_id, pos)

    async def _wake_for(self, user_id: str, pos: int) -> None:
        rooms = await self.events.get_rooms_for_user(user_id)
        joined = [r for r, (m, _) in rooms.items() if m == "join"]
        self.notifier.on_device_list_change(pos, joined, [user_id])

    # -- remote users --------------------------------------------------------------------
    def lock_for(self, user_id: str) -> defer.DeferredLock:
        """The lock held while a remote user's cached list is written."""
        return self._lock(user_id)

    def _lock(self, user_id: str) -> defer.DeferredLock:
        lock = self._locks.get(user_id)
        if lock is None:
            if len(self._locks) > 10000:
                self._locks = {k: v for k, v in self._locks.items() if v.locked}
            lock = self._locks[user_id] = defer.DeferredLock()
        return lock

    async def _shares_room_with_local_user(self, user_id: str) -> bool:
        return any(server_of(u) == self.server_name for u in await self.store.users_sharing_room(user_id))

    async def on_remote_update(self, origin: str, content: dict[str, Any]) -> None:
        """An m.device_list_update EDU from ``origin``."""
        user_id, device_id, stream_id = content.get("user_id"), content.get("device_id"), content.get("stream_id")
        if not isinstance(user_id, str) or server_of(user_id) != origin or not isinstance(device_id, str) \
                or not isinstance(stream_id, int) or isinstance(stream_id, bool):
            return
        prev_ids = content.get("prev_id") or []
        if not isinstance(prev_ids, list):
            prev_ids = []
        lock = self._lock(user_id)
        await lock.acquire()
        try:
            if not await self._shares_room_with_local_user(user_id):
                return
            known = (await self.store.get_remote_stream_ids([user_id])).get(user_id)
            if known is not None and stream_id <= known:
                return
            if known is not None and known in prev_ids:
                name = content.get("device_display_name")
                pos = await self.store.apply_remote_update(
                    user_id, device_id, stream_id, content.get("deleted") is True,
                    name if isinstance(name, str) else None,
                    verified_device_keys(user_id, device_id, content.get("keys")))
            else:
                got = await self._resync(user_id)
                pos = got if got is not None else (await self.store.record_change(user_id, [device_id]))[-1][0]
            await self._wake_for(user_id, pos)
        finally:
            lock.release()

    async def _resync(self, user_id: str, timeout_s: float = RESYNC_TIMEOUT_S) -> Optional[int]:
        """Fetch a remote user's whole device list and cache it; forget it
        when that fails. Returns the position of the recorded change."""
        if self.fetch is not None:
            try:
                resp = await self.fetch(server_of(user_id),
                                        "/_matrix/federation/v1/user/devices/" + quote(user_id, safe=""),
                                        timeout=timeout_s)
                parsed = _parse_user_devices(user_id, resp)
                if parsed is not None:
                    cross_signing = parse_remote_keys(user_id, resp.get("master_key"), resp.get("self_signing_key"))
                    return await self.store.replace_remote_devices(user_id, parsed[0], parsed[1], cross_signing)
            except Exception as e:
                logger.info("device list resync of %s failed: %s", user_id, type(e).__name__)
        return await self.store.forget_remote_user(user_id)

    async def ensure_cached(self, user_ids: Iterable[str], timeout_s: float = RESYNC_TIMEOUT_S) -> set[str]:
        """Resync the remote users not cached yet who share a room with a
        local user (in parallel, each bounded by ``timeout_s``). Returns the
        servers whose resync failed."""
        users = [u for u in user_ids if server_of(u) != self.server_name]
        failed: set[str] = set()
        if not users or self.fetch is None:
            return failed
        cached = await self.store.get_remote_stream_ids(users)

        async def one(user_id: str) -> None:
            lock = self._lock(user_id)
            await lock.acquire()
            try:
                if (await self.store.get_remote_stream_ids([user_id])) or \
                        not await self._shares_room_with_local_user(user_id):
                    return
                pos = await self._resync(user_id, timeout_s)
                if pos is not None:
                    await self._wake_for(user_id, pos)
                if not await self.store.get_remote_stream_ids([user_id]):
                    failed.add(server_of(user_id))
            finally:
                lock.release()

        missing = [u for u in users if u not in cached]
        await defer.gatherResults([defer.ensureDeferred(one(u)) for u in missing[:100]], consumeErrors=True)
        return failed

    async def on_membership_left(self, room_id: str, user_id: str) -> None:
        """After a leave: remote users who no longer share a room with any
        local user are dropped from the cache (nothing tells us about their
        devices any more)."""
        try:
            if server_of(user_id) == self.server_name:
                candidates = [u for u, in await self.events.db.execute(
                    "room_remote_members", "SELECT state_key FROM current_state_events WHERE room_id = ?"
                    " AND type = 'm.room.member' AND membership = 'join'", room_id)]
            else:
                candidates = [user_id]
            remote = [u for u in candidates if server_of(u) != self.server_name]
            for u in (await self.store.get_remote_stream_ids(remote)):
                if not await self._shares_room_with_local_user(u):
                    pos = await self.store.forget_remote_user(u)
                    if pos is not None:
                        self.notifier.on_device_list_change(pos, [], [])
        except Exception:
            logger.exception("dropping cached device lists after a leave in %s", room_id)

    async def cached_remote_keys(self, user_ids: Iterable[str]) -> dict[str, dict[str, dict[str, Any]]]:
        """Device keys of remote users whose lists are cached (users not
        cached are left out)."""
        # The cached users and their devices in one read: a list dropped
        # between two reads (a leave just made the user share no room)
        # would otherwise show as cached with no devices, and not be asked
        # of their server.
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for u, devices in (await self.store.get_remote_devices(user_ids)).items():
            out[u] = {}
            for d, (name, keys) in devices.items():
                if keys is None:
                    continue
                k = dict(keys)
                if name is not None:
                    k["unsigned"] = {**(k.get("unsigned") or {}), "device_display_name": name}
                out[u][d] = k
        return out

    # -- what changed for a reader ----------------------------------------------------------
    async def changed_since_start(self, user_id: str, dl_to: int, ev_pos: int) -> list[str]:
        """Users sharing a room with ``user_id`` whose devices ever changed
        (``dl_to`` and ``ev_pos`` the device-list and events positions: the
        answer is remembered per user until either moves, as every device
        change and every membership change moves one of them)."""
        cached = self._since_start.get(user_id)
        if cached is not None and cached[0] == (dl_to, ev_pos):
            return list(cached[1])
        found = sorted(await self.store.changed_users(user_id, 0, dl_to))
        if len(self._since_start) >= MAX_SINCE_START_CACHE:
            self._since_start.clear()
        self._since_start[user_id] = ((dl_to, ev_pos), found)
        return list(found)

    async def changes_for(self, user_id: str, dl_from: int, dl_to: int, rooms: list[str],
                          newly: dict[str, str], ev_from: int, ev_to: int,
                          known: Optional[dict[str, list[tuple[str, str]]]] = None) -> tuple[list[str], list[str]]:
        """device_lists.changed and .left for ``user_id`` between two tokens:
        ``rooms`` had events in between, ``newly`` maps rooms to the user's
        own new membership there. ``known`` gives, for rooms whose every
        event in between the caller already read (/sync's timeline), their
        (member, membership) changes, so only the other rooms are queried."""
        changed: set[str] = set()
        if dl_to > dl_from:
            changed |= await self.store.changed_users(user_id, dl_from, dl_to)
        joined_cands: set[str] = set()
        left_cands: set[str] = set()
        known = known or {}
        for room_id, members in known.items():
            for member, membership in members:
                if member != user_id:
                    (joined_cands if membership == "join" else left_cands).add(member)
        check = sorted((set(rooms) | set(newly)) - set(known))
        mine = [r for r in newly if newly[r] in ("join", "leave", "ban")]
        if check:
            for member, membership in await self.events.db.select_in(
                    "device_lists_memberships",
                    "SELECT user_id, membership FROM room_memberships WHERE stream_ordering > ? AND stream_ordering <= ?"
                    " AND room_id IN ({in})", check, before=(ev_from, ev_to)):
                if member == user_id:
                    continue
                (joined_cands if membership == "join" else left_cands).add(member)
        if mine:
            for room_id, member in await self.events.db.select_in(
                    "device_lists_room_members",
                    "SELECT room_id, state_key FROM current_state_events WHERE type = 'm.room.member'"
                    " AND membership = 'join' AND room_id IN ({in})", mine):
                if member != user_id:
                    (joined_cands if newly[room_id] == "join" else left_cands).add(member)
        if joined_cands or left_cands:
            shared = await self.store.users_sharing_room(user_id)
            changed |= joined_cands & shared
            left = left_cands - shared - {user_id}
        else:
            left = set()
        return sorted(changed - left), sorted(left)


def _parse_user_devices(user_id: str, resp: Any) -> Optional[tuple[int, dict[str, tuple[Optional[str], Any]]]]:
    if not isinstance(resp, dict) or resp.get("user_id", user_id) != user_id:
        return None
    stream_id = resp.get("stream_id")
    devices = resp.get("devices")
    if not isinstance(stream_id, int) or not isinstance(devices, list):
        return None
    out: dict[str, tuple[Optional[str], Any]] = {}
    for d in devices[:MAX_REMOTE_DEVICES]:
        if not isinstance(d, dict) or not isinstance(d.get("device_id"), str):
            continue
        name = d.get("device_display_name")
        out[d["device_id"]] = (name if isinstance(name, str) else None,
                               verified_device_keys(user_id, d["device_id"], d.get("keys")))
    return stream_id, out


def verified_device_keys(user_id: str, device_id: str, keys: Any) -> Optional[dict[str, Any]]:
    """A remote device's keys as they may be cached and served: about that
    user and device, well formed and signed by the device's own ed25519 key;
    otherwise None (the device is known, its keys are not). A server could
    else make other servers' clients encrypt to a key its user never had."""
    if not isinstance(keys, dict):
        return None
    try:
        return check_device_keys(keys, user_id, device_id)
    except MatrixError as e:
        logger.info("not caching keys of %s's device %s: %s", user_id, device_id, e)
    except Exception as e:  # whatever else a hostile shape makes the checks raise
        logger.info("not caching keys of %s's device %s: %s", user_id, device_id, type(e).__name__)
    return None
