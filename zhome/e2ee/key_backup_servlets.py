"""Client-Server endpoints of server-side key backups.

Spec: client-server-api "Server-side key backups": ``/room_keys/version``,
``/room_keys/version/{version}``, and ``/room_keys/keys`` with its
``/{roomId}`` and ``/{roomId}/{sessionId}`` forms. Parsing and rendering
only; ``KeyBackupService`` holds the protocol.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.web.server import Request

from zhome.e2ee.key_backup import KeyBackupService, check_key_data, check_room_id, check_rooms, check_session_id, \
    check_sessions
from zhome.http.auth import Auth
from zhome.http.errors import missing_param
from zhome.http.server import JsonResource, query_arg, read_json_body

CS = r"/_matrix/client/(?:r0|v3)"
ROOM = r"(?P<room_id>[^/]+)"
SESSION = r"(?P<session_id>[^/]+)"


class KeyBackupServlets:
    def __init__(self, auth: Auth, backups: KeyBackupService) -> None:
        self.auth = auth
        self.backups = backups

    def register_routes(self, r: JsonResource) -> None:
        r.register("POST", CS + r"/room_keys/version", self.on_create_version, "room_keys_version")
        r.register("GET", CS + r"/room_keys/version", self.on_get_version, "room_keys_version")
        version = CS + r"/room_keys/version/(?P<version>[^/]+)"
        r.register("GET", version, self.on_get_version, "room_keys_version_n")
        r.register("PUT", version, self.on_update_version, "room_keys_version_n")
        r.register("DELETE", version, self.on_delete_version, "room_keys_version_n")
        for suffix, name in (("", "room_keys_keys"), ("/" + ROOM, "room_keys_room"),
                             ("/" + ROOM + "/" + SESSION, "room_keys_session")):
            path = CS + r"/room_keys/keys" + suffix
            r.register("GET", path, self.on_get_keys, name)
            r.register("PUT", path, self.on_put_keys, name)
            r.register("DELETE", path, self.on_delete_keys, name)

    # -- versions ------------------------------------------------------------
    async def on_create_version(self, request: Request) -> tuple[int, Any]:
        req = await self.auth.get_user_by_req(request)
        return 200, await self.backups.create_version(req.user_id, read_json_body(request))

    async def on_get_version(self, request: Request, version: Optional[str] = None) -> tuple[int, Any]:
        req = await self.auth.get_user_by_req(request)
        return 200, await self.backups.get_version(req.user_id, version)

    async def on_update_version(self, request: Request, version: str) -> tuple[int, Any]:
        req = await self.auth.get_user_by_req(request)
        return 200, await self.backups.update_version(req.user_id, version, read_json_body(request))

    async def on_delete_version(self, request: Request, version: str) -> tuple[int, Any]:
        req = await self.auth.get_user_by_req(request)
        return 200, await self.backups.delete_version(req.user_id, version)

    # -- keys ----------------------------------------------------------------
    async def on_put_keys(self, request: Request, room_id: Optional[str] = None,
                          session_id: Optional[str] = None) -> tuple[int, Any]:
        req = await self.auth.get_user_by_req(request)
        version = _version(request)
        body = read_json_body(request)
        if room_id is None:
            keys = check_rooms(body)
        else:
            check_room_id(room_id, "room ID", True)
            if session_id is None:
                keys = check_sessions(room_id, body, "body")
            else:
                keys = [check_key_data(room_id, check_session_id(session_id, "session ID", True), body, "body")]
        return 200, await self.backups.put_keys(req.user_id, version, keys)

    async def on_get_keys(self, request: Request, room_id: Optional[str] = None,
                          session_id: Optional[str] = None) -> tuple[int, Any]:
        req = await self.auth.get_user_by_req(request)
        version = _version(request)
        _check_path(room_id, session_id)
        return 200, await self.backups.get_keys(req.user_id, version, room_id, session_id)

    async def on_delete_keys(self, request: Request, room_id: Optional[str] = None,
                             session_id: Optional[str] = None) -> tuple[int, Any]:
        req = await self.auth.get_user_by_req(request)
        version = _version(request)
        _check_path(room_id, session_id)
        return 200, await self.backups.delete_keys(req.user_id, version, room_id, session_id)


def _version(request: Request) -> str:
    version = query_arg(request, "version")
    if version is None:
        raise missing_param("The version query parameter is required")
    return version


def _check_path(room_id: Optional[str], session_id: Optional[str]) -> None:
    if room_id is not None:
        check_room_id(room_id, "room ID", True)
    if session_id is not None:
        check_session_id(session_id, "session ID", True)
