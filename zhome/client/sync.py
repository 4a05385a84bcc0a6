"""GET /sync and the filter endpoints.

Spec: client-server-api "Syncing", "Filtering" (POST/GET
/user/{userId}/filter).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from twisted.web.server import Request

from zhome.client.account import CS
from zhome.http.errors import forbidden, invalid_param, not_found
from zhome.http.server import JsonResource, query_arg, query_int, read_json_body
from zhome.sync.filtering import SyncFilter, validate_filter
from zhome.sync.notifier import StreamToken

if TYPE_CHECKING:
    from zhome.server import HomeServer

MAX_SYNC_TIMEOUT_MS = 5 * 60 * 1000


class SyncServlets:
    def __init__(self, hs: "HomeServer") -> None:
        self.hs = hs

    def register_routes(self, r: JsonResource) -> None:
        r.register("GET", CS + r"/sync", self.on_sync, "sync", guests=True)
        r.register("POST", CS + r"/user/(?P<user_id>[^/]+)/filter", self.on_post_filter, "filter", guests=True)
        r.register("GET", CS + r"/user/(?P<user_id>[^/]+)/filter/(?P<filter_id>[^/]+)", self.on_get_filter,
                   "filter", guests=True)

    async def on_sync(self, request: Request) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        timeout = query_int(request, "timeout", 0) or 0
        timeout = max(0, min(timeout, MAX_SYNC_TIMEOUT_MS))
        since_raw = query_arg(request, "since")
        since = StreamToken.decode(since_raw) if since_raw else None
        full_state = query_arg(request, "full_state", "false") == "true"
        flt = await self._load_filter(req.user_id, query_arg(request, "filter"))
        presence = query_arg(request, "set_presence", "online")
        if presence not in ("online", "offline", "unavailable"):
            raise invalid_param("Unknown set_presence value")
        if since is not None and since.is_after(self.hs.notifier.current_token()):
            # A token from the future (e.g. before a database restore) would
            # make the client wait forever; start it afresh instead.
            since = None
        presence_service = self.hs.presence
        await presence_service.user_synced(req.user_id, presence)
        presence_service.sync_started(req.user_id)
        try:
            cache = self.hs.sync_response_cache
            if cache is None:
                return 200, await self.hs.sync_handler.sync(req, since, timeout, full_state, flt)
            key = (req.user_id, req.device_id, since.encode() if since is not None else None,
                   query_arg(request, "filter"), full_state, timeout)
            return 200, await cache.get(key, req.user_id, lambda rooms: self.hs.sync_handler.sync(
                req, since, timeout, full_state, flt, rooms))
        finally:
            presence_service.sync_ended(req.user_id)

    async def _load_filter(self, user_id: str, raw: str | None) -> SyncFilter:
        if raw is None:
            return SyncFilter(None)
        if raw.lstrip().startswith("{"):
            try:
                return SyncFilter(validate_filter(json.loads(raw)))
            except ValueError:
                raise invalid_param("Filter is not valid JSON")
        try:
            fid = int(raw)
        except ValueError:
            raise invalid_param("Filter must be a filter ID or a JSON object")
        stored = await self.hs.user_data.get_filter(user_id, fid)
        if stored is None:
            raise not_found("Unknown filter")
        return SyncFilter(stored)

    async def on_post_filter(self, request: Request, user_id: str) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        if req.user_id != user_id:
            raise forbidden("Cannot create filters for other users")
        body = validate_filter(read_json_body(request))
        fid = await self.hs.user_data.add_filter(user_id, body)
        return 200, {"filter_id": str(fid)}

    async def on_get_filter(self, request: Request, user_id: str, filter_id: str) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        if req.user_id != user_id:
            raise forbidden("Cannot read filters of other users")
        try:
            fid = int(filter_id)
        except ValueError:
            raise not_found("Unknown filter")
        stored = await self.hs.user_data.get_filter(user_id, fid)
        if stored is None:
            raise not_found("Unknown filter")
        return 200, stored
