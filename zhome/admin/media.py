"""The admin API's media, in the shape of Synapse's media admin API: one
file's details, quarantine and protection, deleting one file, local files
by age and size, the remote cache by age, and a user's uploads (list and
delete). A quarantined file is served to nobody, locally or over
federation.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Optional

from twisted.web.server import Request

from zhome.admin.common import backwards_arg, int_arg, require_admin, require_local_user
from zhome.http.errors import invalid_param, not_found
from zhome.http.server import JsonResource, query_arg
from zhome.storage.database import Database, Txn

if TYPE_CHECKING:
    from zhome.server import HomeServer

SYN1 = r"/_synapse/admin/v1"
MEDIA = r"(?P<server_name>[^/]+)/(?P<media_id>[^/]+)"
MAX_PAGE = 1000
USER_MEDIA_ORDER = {"media_id": "m.media_id", "upload_name": "m.upload_name", "created_ts": "m.created_ts",
                    "last_access_ts": "m.created_ts", "media_length": "m.size", "media_type": "m.content_type",
                    "quarantined_by": "q.quarantined_by", "safe_from_quarantine": "q.protected"}


class MediaAdminStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        #: (origin, media_id) quarantined: a mirror of media_quarantine, asked on every download.
        self.quarantined: set[tuple[str, str]] = set()

    async def load(self) -> None:
        rows = await self.db.execute("quarantine_load", "SELECT origin, media_id FROM media_quarantine"
                                     " WHERE quarantined_by IS NOT NULL")
        self.quarantined = {(o, m) for o, m in rows}

    def is_quarantined(self, origin: str, media_id: str) -> bool:
        return (origin, media_id) in self.quarantined

    async def status(self, origin: str, media_id: str) -> tuple[Optional[str], bool]:
        rows = await self.db.execute("quarantine_status", "SELECT quarantined_by, protected FROM media_quarantine"
                                     " WHERE origin = ? AND media_id = ?", origin, media_id)
        return (rows[0][0], bool(rows[0][1])) if rows else (None, False)

    async def set_quarantine(self, origin: str, media_id: str, by: Optional[str]) -> bool:
        """Quarantine (``by`` set) or release; False when the file is protected."""
        def txn_fn(txn: Txn) -> bool:
            txn.execute("SELECT protected FROM media_quarantine WHERE origin = ? AND media_id = ?", (origin, media_id))
            row = txn.fetchone()
            if row is None:
                txn.execute("INSERT INTO media_quarantine (origin, media_id, quarantined_by, protected)"
                            " VALUES (?,?,?,0)", (origin, media_id, by))
                return True
            if by is not None and row[0]:
                return False
            txn.execute("UPDATE media_quarantine SET quarantined_by = ? WHERE origin = ? AND media_id = ?",
                        (by, origin, media_id))
            return True

        ok = await self.db.run_interaction("set_quarantine", txn_fn)
        if ok and by is not None:
            self.quarantined.add((origin, media_id))
        elif ok:
            self.quarantined.discard((origin, media_id))
        return ok

    async def set_protected(self, origin: str, media_id: str, protected: bool) -> None:
        def txn_fn(txn: Txn) -> None:
            txn.execute("SELECT 1 FROM media_quarantine WHERE origin = ? AND media_id = ?", (origin, media_id))
            if txn.fetchone() is None:
                txn.execute("INSERT INTO media_quarantine (origin, media_id, quarantined_by, protected)"
                            " VALUES (?,?,NULL,?)", (origin, media_id, int(protected)))
            else:
                txn.execute("UPDATE media_quarantine SET protected = ? WHERE origin = ? AND media_id = ?",
                            (int(protected), origin, media_id))

        await self.db.run_interaction("set_protected", txn_fn)

    async def forget(self, origin: str, media_id: str) -> None:
        await self.db.run_interaction("quarantine_forget", lambda txn: txn.execute(
            "DELETE FROM media_quarantine WHERE origin = ? AND media_id = ?", (origin, media_id)))
        self.quarantined.discard((origin, media_id))

    async def user_media(self, user_id: str, offset: int, limit: int, order: str, backwards: bool,
                         open_name: Any = None) -> tuple[list[dict[str, Any]], int]:
        """One page of a user's uploads. File names are sealed at rest
        (``open_name(origin, media_id, stored)`` opens them), so an order by
        name is applied here to all of the user's uploads."""
        col = USER_MEDIA_ORDER[order]
        direction = "DESC" if backwards else "ASC"
        by_name = order == "upload_name"
        if by_name:
            col, page = "m.media_id", (-1, 0)
        else:
            page = (limit, offset)
        opener = open_name or (lambda _o, _m, name: name)

        def txn_fn(txn: Txn) -> tuple[list[dict[str, Any]], int]:
            txn.execute("SELECT COUNT(*) FROM media WHERE user_id = ?", (user_id,))
            row = txn.fetchone()
            txn.execute("SELECT m.origin, m.media_id, m.content_type, m.size, m.upload_name, m.created_ts,"
                        " q.quarantined_by, q.protected FROM media m LEFT JOIN media_quarantine q ON"
                        f" q.origin = m.origin AND q.media_id = m.media_id WHERE m.user_id = ?"
                        f" ORDER BY {col} {direction}, m.media_id"
                        + (" LIMIT ? OFFSET ?" if not by_name else ""), (user_id, *page) if not by_name else (user_id,))
            media = [{"media_id": mid, "media_type": ctype, "media_length": size,
                      "upload_name": opener(origin, mid, name),
                      "created_ts": ts, "last_access_ts": ts, "quarantined_by": qb, "safe_from_quarantine": bool(p)}
                     for origin, mid, ctype, size, name, ts, qb, p in txn.fetchall()]
            if by_name:
                media.sort(key=lambda m: m["media_id"])
                named = sorted((m for m in media if m["upload_name"] is not None),
                               key=lambda m: m["upload_name"], reverse=backwards)
                unnamed = [m for m in media if m["upload_name"] is None]
                media = (named + unnamed) if backwards else (unnamed + named)
                media = media[offset:offset + limit]
            return media, int(row[0]) if row else 0

        return await self.db.run_interaction("admin_user_media", txn_fn)

    async def local_media_before(self, origin: str, before_ts: int, size_gt: int) -> list[str]:
        rows = await self.db.execute(
            "admin_media_before", "SELECT m.media_id FROM media m LEFT JOIN media_quarantine q ON"
            " q.origin = m.origin AND q.media_id = m.media_id WHERE m.origin = ? AND m.created_ts < ?"
            " AND COALESCE(m.size, 0) > ? AND COALESCE(q.protected, 0) = 0 ORDER BY m.created_ts",
            origin, before_ts, size_gt)
        return [r[0] for r in rows]

    async def remote_media_before(self, origin: str, before_ts: int) -> list[tuple[str, str]]:
        rows = await self.db.execute(
            "admin_remote_before", "SELECT origin, media_id FROM remote_media_cache WHERE origin <> ?"
            " AND last_access_ts < ?", origin, before_ts)
        return [(o, m) for o, m in rows]


class AdminMediaServlets:
    def __init__(self, hs: "HomeServer") -> None:
        self.hs = hs
        self.store: MediaAdminStore = hs.media_admin

    def register_routes(self, r: JsonResource) -> None:
        r.register("GET", SYN1 + r"/media/" + MEDIA, self.on_details, "admin_media")
        r.register("DELETE", SYN1 + r"/media/" + MEDIA, self.on_delete, "admin_media")
        r.register("POST", SYN1 + r"/media/quarantine/" + MEDIA, self.on_quarantine, "admin_media_quarantine")
        r.register("POST", SYN1 + r"/media/unquarantine/" + MEDIA, self.on_unquarantine, "admin_media_quarantine")
        r.register("POST", SYN1 + r"/media/protect/(?P<media_id>[^/]+)", self.on_protect, "admin_media_protect")
        r.register("POST", SYN1 + r"/media/unprotect/(?P<media_id>[^/]+)", self.on_unprotect,
                   "admin_media_protect")
        r.register("POST", SYN1 + r"/media/delete", self.on_delete_old, "admin_media_delete_old")
        r.register("POST", SYN1 + r"/media/(?P<server_name>[^/]+)/delete", self.on_delete_old,
                   "admin_media_delete_old")
        r.register("POST", SYN1 + r"/purge_media_cache", self.on_purge_cache, "admin_purge_media_cache")
        r.register("GET", SYN1 + r"/users/(?P<user_id>[^/]+)/media", self.on_user_media, "admin_user_media")
        r.register("GET", SYN1 + r"/room/(?P<room_id>[^/]+)/media", self.on_room_media, "admin_room_media")
        r.register("POST", SYN1 + r"/room/(?P<room_id>[^/]+)/media/quarantine", self.on_quarantine_room,
                   "admin_room_media_quarantine")
        r.register("POST", SYN1 + r"/quarantine_media/(?P<room_id>[^/]+)", self.on_quarantine_room,
                   "admin_room_media_quarantine")
        r.register("DELETE", SYN1 + r"/users/(?P<user_id>[^/]+)/media", self.on_delete_user_media,
                   "admin_user_media")

    async def _admin(self, request: Request) -> str:
        return (await require_admin(self.hs, request)).user_id

    def _repo(self) -> Any:
        if self.hs.media_repository is None:
            raise not_found("This server has no media repository")
        return self.hs.media_repository

    async def on_details(self, request: Request, server_name: str, media_id: str) -> tuple[int, Any]:
        await self._admin(request)
        info = await self._repo().store.get_media(server_name, media_id)
        if info is None:
            raise not_found("Media not found")
        by, protected = await self.store.status(server_name, media_id)
        return 200, {"media_info": {
            "media_origin": info.origin, "user_id": info.user_id, "media_id": info.media_id,
            "media_type": info.content_type, "media_length": info.size, "upload_name": info.upload_name,
            "created_ts": info.created_ts, "last_access_ts": info.uploaded_ts or info.created_ts,
            "quarantined_by": by, "safe_from_quarantine": protected}}

    async def _delete(self, origin: str, media_ids: list[str]) -> list[str]:
        repo = self._repo()
        deleted = []
        for media_id in media_ids:
            if await repo.delete_media(origin, media_id):
                await self.store.forget(origin, media_id)
                deleted.append(media_id)
        return deleted

    async def on_delete(self, request: Request, server_name: str, media_id: str) -> tuple[int, Any]:
        await self._admin(request)
        if server_name != self.hs.server_name:
            raise invalid_param("Can only delete local media")
        deleted = await self._delete(server_name, [media_id])
        if not deleted:
            raise not_found("Media not found")
        return 200, {"deleted_media": deleted, "total": len(deleted)}

    async def _room_files(self, room_id: str) -> list[tuple[str, str]]:
        if not room_id.startswith("!") or await self.hs.rooms.get_room_version(room_id) is None:
            raise not_found("Room not found")
        return await self.hs.event_media.files_of_room(room_id)

    async def on_room_media(self, request: Request, room_id: str) -> tuple[int, Any]:
        """The files the room's stored events show (their content not purged)."""
        await self._admin(request)
        files = await self._room_files(room_id)
        local = self.hs.server_name
        return 200, {"local": [f"mxc://{o}/{m}" for o, m in files if o == local],
                     "remote": [f"mxc://{o}/{m}" for o, m in files if o != local]}

    async def on_quarantine_room(self, request: Request, room_id: str) -> tuple[int, Any]:
        admin = await self._admin(request)
        n = 0
        for origin, media_id in await self._room_files(room_id):
            if await self.store.set_quarantine(origin, media_id, admin):
                n += 1
        return 200, {"num_quarantined": n}

    async def on_quarantine(self, request: Request, server_name: str, media_id: str) -> tuple[int, Any]:
        admin = await self._admin(request)
        if not await self.store.set_quarantine(server_name, media_id, admin):
            raise invalid_param("This media is protected from quarantine")
        return 200, {}

    async def on_unquarantine(self, request: Request, server_name: str, media_id: str) -> tuple[int, Any]:
        await self._admin(request)
        await self.store.set_quarantine(server_name, media_id, None)
        return 200, {}

    async def on_protect(self, request: Request, media_id: str) -> tuple[int, Any]:
        await self._admin(request)
        await self.store.set_protected(self.hs.server_name, media_id, True)
        return 200, {}

    async def on_unprotect(self, request: Request, media_id: str) -> tuple[int, Any]:
        await self._admin(request)
        await self.store.set_protected(self.hs.server_name, media_id, False)
        return 200, {}

    async def on_delete_old(self, request: Request, server_name: Optional[str] = None) -> tuple[int, Any]:
        await self._admin(request)
        if server_name is not None and server_name != self.hs.server_name:
            raise invalid_param("Can only delete local media")
        before = query_arg(request, "before_ts")
        size_gt = query_arg(request, "size_gt") or "0"
        if before is None or not before.isdigit() or not size_gt.isdigit():
            raise invalid_param("before_ts is required; before_ts and size_gt are non-negative integers")
        if int(before) > int(time.time() * 1000):
            raise invalid_param("before_ts must not be in the future")
        ids = await self.store.local_media_before(self.hs.server_name, int(before), int(size_gt))
        deleted = await self._delete(self.hs.server_name, ids)
        return 200, {"deleted_media": deleted, "total": len(deleted)}

    async def on_purge_cache(self, request: Request) -> tuple[int, Any]:
        await self._admin(request)
        before = query_arg(request, "before_ts")
        if before is None or not before.isdigit():
            raise invalid_param("before_ts is required and is a non-negative integer")
        repo = self._repo()
        deleted = 0
        for origin, media_id in await self.store.remote_media_before(self.hs.server_name, int(before)):
            if await repo.delete_media(origin, media_id):
                deleted += 1
        return 200, {"deleted": deleted}

    def _page(self, request: Request) -> tuple[int, int, str, bool]:
        order = query_arg(request, "order_by") or "created_ts"
        if order not in USER_MEDIA_ORDER:
            raise invalid_param(f"Unknown value for order_by: {order}")
        backwards = backwards_arg(request, "f")
        return int_arg(request, "from", 0), min(int_arg(request, "limit", 100), MAX_PAGE), order, backwards

    async def on_user_media(self, request: Request, user_id: str) -> tuple[int, Any]:
        await self._admin(request)
        await require_local_user(self.hs, user_id)
        offset, limit, order, backwards = self._page(request)
        repo = self.hs.media_repository
        media, total = await self.store.user_media(user_id, offset, limit, order, backwards,
                                                   open_name=repo.store.open_name if repo is not None else None)
        body: dict[str, Any] = {"media": media, "total": total}
        if media and offset + len(media) < total:
            body["next_token"] = offset + len(media)
        return 200, body

    async def on_delete_user_media(self, request: Request, user_id: str) -> tuple[int, Any]:
        await self._admin(request)
        await require_local_user(self.hs, user_id)
        ids = [m for o, m in await self.hs.privacy_store.media_of(user_id) if o == self.hs.server_name]
        deleted = await self._delete(self.hs.server_name, ids)
        return 200, {"deleted_media": deleted, "total": len(deleted)}
