"""The bridge's side of the Application Service API.

Spec: application-service-api "Pushing events"
(``PUT /_matrix/app/v1/transactions/{txnId}``, and the legacy path without
the prefix), "Authorization" (the homeserver's ``hs_token`` as a Bearer
token; the old ``access_token`` query parameter is accepted too),
"Querying" (``/users/{userId}``: a ghost of a valid address is registered
on demand, so rooms can invite an email participant before it ever wrote;
``/rooms``: no rooms on demand, 404 ``M_NOT_FOUND``) and "Pinging"
(``/ping``).

Events are handed to a handler one by one; the transaction is answered
``200`` once all are handled, so a failure (the bridge's database) makes
the homeserver send it again. Handling is idempotent.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any, Awaitable, Callable

from twisted.internet import defer
from twisted.web import resource, server
from twisted.web.server import Request

logger = logging.getLogger(__name__)

MAX_BODY = 16 * 1024 * 1024
EventHandler = Callable[[dict[str, Any]], Awaitable[None]]
UserQuery = Callable[[str], Awaitable[bool]]


class AppServiceResource(resource.Resource):
    isLeaf = True

    def __init__(self, hs_token: str, on_event: EventHandler, query_user: UserQuery) -> None:
        super().__init__()
        self.hs_token = hs_token
        self.on_event = on_event
        self.query_user = query_user

    def _respond(self, request: Request, status: int, body: dict[str, Any]) -> None:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        request.write(json.dumps(body).encode())
        request.finish()

    def _authorised(self, request: Request) -> bool | None:
        """True, False (wrong token) or None (no token)."""
        header = request.getHeader(b"authorization")
        token: str | None = None
        if header and header.startswith(b"Bearer "):
            token = header[7:].strip().decode("utf-8", "replace")
        elif b"access_token" in (request.args or {}):
            token = request.args[b"access_token"][0].decode("utf-8", "replace")
        if not token:
            return None
        return hmac.compare_digest(token.encode(), self.hs_token.encode())

    def render(self, request: Request) -> Any:
        defer.ensureDeferred(self._handle(request))
        return server.NOT_DONE_YET

    async def _handle(self, request: Request) -> None:
        try:
            await self._route(request)
        except Exception:
            logger.exception("email bridge: AS request failed")
            if not request.finished:
                self._respond(request, 503, {"errcode": "M_UNKNOWN", "error": "Try again later"})

    async def _route(self, request: Request) -> None:
        auth = self._authorised(request)
        if auth is None:
            self._respond(request, 401, {"errcode": "M_UNAUTHORIZED", "error": "No hs_token"})
            return
        if not auth:
            self._respond(request, 403, {"errcode": "M_FORBIDDEN", "error": "Wrong hs_token"})
            return
        path = [p for p in request.path.decode("utf-8", "replace").split("/") if p]
        if path[:3] == ["_matrix", "app", "v1"]:
            path = path[3:]
        method = request.method.decode("ascii", "replace")
        if len(path) == 2 and path[0] == "transactions" and method == "PUT":
            try:
                raw = request.content.read(MAX_BODY + 1) if request.content is not None else b""
                body = json.loads(raw) if len(raw) <= MAX_BODY else None
            except ValueError:
                body = None
            if not isinstance(body, dict) or not isinstance(body.get("events", []), list):
                self._respond(request, 400, {"errcode": "M_NOT_JSON", "error": "Bad transaction"})
                return
            for event in body.get("events", []):
                if isinstance(event, dict):
                    await self.on_event(event)
            self._respond(request, 200, {})
            return
        if len(path) == 2 and path[0] == "users" and method == "GET":
            if await self.query_user(path[1]):
                self._respond(request, 200, {})
                return
        if path == ["ping"] and method == "POST":
            self._respond(request, 200, {})
            return
        self._respond(request, 404, {"errcode": "M_NOT_FOUND", "error": "Not found"})
