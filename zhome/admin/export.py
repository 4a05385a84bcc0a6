"""Right of access and portability (GDPR art. 15 and 20): everything zhome
holds about a user, as a ZIP of machine-readable JSON, streamed.

    GET /_zhome/admin/v1/users/{userId}/export   an admin, for any local user
    GET /_zhome/client/v1/export                 a user, for themself

The archive holds ``profile.json``, ``devices.json`` (no keys or tokens),
``threepids.json``, ``account_data.json``, ``rooms.json`` and one
``rooms/NNNN.jsonl`` per room with the events the user could see there
(client format, one per line), ``media.json`` and ``media/<id>`` (the
files they uploaded, decrypted), ``privacy.json`` (the transfer and
invite settings, legal holds, erasures) and ``audit.jsonl`` (the audit
entries about them). It is written in batches as the client reads it:
memory stays bounded whatever the size of the account, and nothing is
written to disk.
"""

from __future__ import annotations

import json
import logging
import zipfile
from typing import TYPE_CHECKING, Any, Optional, cast

from twisted.internet import task, threads
from twisted.web.server import Request

from zhome.client.serialize import serialize_events
from zhome.http.errors import forbidden, invalid_param, not_found
from zhome.http.server import CORS_HEADERS, JsonResource, already_written
from zhome.media.servlets import _Throttle
from zhome.util.ids import is_valid_user_id

if TYPE_CHECKING:
    from zhome.server import HomeServer

logger = logging.getLogger(__name__)

EVENT_BATCH = 200
#: A pause after each batch of events, so that other users' requests keep
#: their pace while a big account is exported.
BATCH_PAUSE_S = 0.02
FLUSH_BYTES = 256 * 1024
MAX_BATCHES = 10 ** 6


class _Sink:
    """What the ZIP writer writes to: bytes collected until flushed to the client."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        out, self.parts, self.size = b"".join(self.parts), [], 0
        return out


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=True).encode("utf-8")


class ExportServlets:
    def __init__(self, hs: "HomeServer") -> None:
        self.hs = hs

    def register_routes(self, r: JsonResource) -> None:
        r.register("GET", r"/_zhome/admin/v1/users/(?P<user_id>[^/]+)/export", self.on_admin_export,
                   "zadmin_export")
        r.register("GET", r"/_zhome/client/v1/export", self.on_own_export, "export")

    async def on_admin_export(self, request: Request, user_id: str) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        if not req.is_admin:
            raise forbidden("You are not a server admin")
        if not is_valid_user_id(user_id) or not user_id.endswith(":" + self.hs.server_name):
            raise invalid_param("Can only export local users")
        if await self.hs.accounts.get_user(user_id) is None:
            raise not_found("User not found")
        await self._stream(request, user_id)
        return 200, already_written()

    async def on_own_export(self, request: Request) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        await self._stream(request, req.user_id)
        return 200, already_written()

    async def _stream(self, request: Request, user_id: str) -> None:
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"application/zip")
        local = user_id[1:].split(":", 1)[0]
        request.setHeader(b"Content-Disposition", f'attachment; filename="zhome-export-{local}.zip"'.encode())
        request.setHeader(b"Cache-Control", b"no-store")
        # A web client on another origin may download it, as it reads any other answer.
        for k, v in CORS_HEADERS.items():
            request.setHeader(k, v)
        throttle = _Throttle()
        request.registerProducer(throttle, True)
        sink = _Sink()
        zf = zipfile.ZipFile(cast(Any, sink), "w", compression=zipfile.ZIP_DEFLATED)

        async def flush(force: bool = False) -> bool:
            if sink.size < FLUSH_BYTES and not force:
                return not throttle.stopped
            data = sink.take()
            await throttle.wait()
            if throttle.stopped or request._disconnected:
                return False
            if data:
                request.write(data)
            return True

        async def put(name: str, data: bytes) -> bool:
            await threads.deferToThread(zf.writestr, name, data)
            return await flush()

        try:
            await self._write(user_id, zf, put, flush)
            await threads.deferToThread(zf.close)
            await flush(force=True)
        except Exception:
            logger.exception("export of %s failed", user_id)
            if request.channel is not None:
                request.channel.loseConnection()
            return
        finally:
            if request.channel is not None and not request._disconnected:
                request.unregisterProducer()
        if not request.finished and not request._disconnected:
            request.finish()

    async def _write(self, user_id: str, zf: zipfile.ZipFile, put: Any, flush: Any) -> None:
        hs = self.hs
        user = await hs.admin_store.get_user(user_id) or {}
        await put("README.txt", (
            f"Everything this server (zhome, {hs.server_name}) holds about {user_id}.\n"
            "profile.json, devices.json, threepids.json, account_data.json: the account.\n"
            "rooms.json and rooms/*.jsonl: the rooms and the events you could see in each, one per line.\n"
            "media.json and media/: the files you uploaded.\n"
            "privacy.json: your transfer and invite settings, legal holds on your data and erasures;"
            " audit.jsonl: the audit log entries about you.\n"
        ).encode())
        profile = {k: user.get(k) for k in (
            "name", "displayname", "avatar_url", "creation_ts", "admin", "deactivated", "erased", "locked",
            "suspended", "user_type", "is_guest")}
        # Extended profile fields (m.tz, namespaced keys), as the user set them.
        profile["fields"] = await hs.accounts.get_profile_fields(user_id)
        await put("profile.json", _dumps(profile))
        devices = [{k: d.get(k) for k in ("device_id", "display_name", "last_seen_ts", "last_seen_ip")}
                   for d in await hs.accounts.get_devices(user_id)]
        await put("devices.json", _dumps(devices))
        await put("threepids.json", _dumps([]))
        rows = await hs.db.execute("export_account_data", "SELECT room_id, type, content FROM account_data"
                                   " WHERE user_id = ? ORDER BY room_id, type", user_id)
        account_data: dict[str, Any] = {"global": {}, "rooms": {}}
        for room_id, dtype, content in rows:
            target = account_data["global"] if not room_id else account_data["rooms"].setdefault(room_id, {})
            target[dtype] = json.loads(hs.user_data.open_content(user_id, room_id, dtype, content))
        await put("account_data.json", _dumps(account_data))

        memberships = await hs.events.get_rooms_for_user(user_id)
        rooms = []
        for n, (room_id, (membership, _)) in enumerate(sorted(memberships.items())):
            name = f"rooms/{n:04d}.jsonl"
            rooms.append({"room_id": room_id, "membership": membership, "file": name})
            await self._room_events(user_id, room_id, name, zf, flush)
        await put("rooms.json", _dumps(rooms))

        media = []
        repo = hs.media_repository
        for origin, media_id in await hs.privacy_store.media_of(user_id):
            info = await repo.store.get_media(origin, media_id) if repo is not None else None
            if info is None or not info.uploaded:
                continue
            entry = {"media_id": media_id, "mxc": f"mxc://{origin}/{media_id}", "content_type": info.content_type,
                     "upload_name": info.upload_name, "size": info.size, "created_ts": info.created_ts,
                     "file": f"media/{media_id}"}
            media.append(entry)
            await self._media_file(repo, info, entry["file"], zf, flush)
        await put("media.json", _dumps(media))

        await put("privacy.json", _dumps({
            "transfer": await hs.transfer_store.get(user_id),
            "invite_permissions": await hs.invite_policy.get(user_id),
            "legal_holds": await hs.privacy_store.list_holds("user", user_id),
            "erasures": await hs.privacy_store.list_erasures(user_id)}))
        lines = [json.dumps(e, ensure_ascii=False, sort_keys=True) for e in
                 await hs.audit.entries(0, 100000, about=user_id)]
        await put("audit.jsonl", ("\n".join(lines) + "\n" if lines else "").encode())

    async def _room_events(self, user_id: str, room_id: str, name: str, zf: zipfile.ZipFile, flush: Any) -> None:
        hs = self.hs
        out = await threads.deferToThread(zf.open, name, "w", force_zip64=True)
        try:
            pos = 0
            top = hs.notifier.current_token().events
            for _ in range(MAX_BATCHES):
                batch = await hs.events.get_room_events_between(room_id, pos, top, EVENT_BATCH, backwards=False)
                if not batch:
                    break
                pos = max(e.internal["stream_ordering"] for e in batch)
                visible = await hs.visibility.filter_events(user_id, batch)
                if visible:
                    data = b"".join(json.dumps(e, ensure_ascii=False).encode("utf-8") + b"\n"
                                    for e in await serialize_events(hs.events, visible))
                    await threads.deferToThread(out.write, data)
                if not await flush():
                    return
                if len(batch) < EVENT_BATCH:
                    break
                from zhome.util.reactor import reactor

                await task.deferLater(reactor, BATCH_PAUSE_S, lambda: None)
        finally:
            await threads.deferToThread(out.close)

    async def _media_file(self, repo: Any, info: Any, name: str, zf: zipfile.ZipFile, flush: Any) -> None:
        from zhome.media.repository import Servable

        item = Servable(info.content_type or "application/octet-stream", info.upload_name, info.size or 0,
                        info.storage_name, info.key_id, info.wrapped_key)
        out = await threads.deferToThread(zf.open, name, "w", force_zip64=True)
        f: Optional[Any] = None
        try:
            f, chunks = await threads.deferToThread(repo.open_plaintext, item)
            for _ in range(MAX_BATCHES):
                chunk = await threads.deferToThread(next, chunks, b"")
                if not chunk:
                    break
                await threads.deferToThread(out.write, chunk)
                if not await flush():
                    return
        finally:
            if f is not None:
                await threads.deferToThread(f.close)
            await threads.deferToThread(out.close)
