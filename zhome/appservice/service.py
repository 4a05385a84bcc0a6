"""The configured application services, and what the homeserver asks them.

Spec: application-service-api "Querying" (``GET /users/{userId}``, ``GET
/rooms/{roomAlias}``), "Pinging" (``POST /ping``), "Third-party networks"
(``GET /thirdparty/...``); client-server-api "Application service ping",
"Third-party networks" (answered by asking the services whose
``protocols`` include the protocol). Also who is exclusive where: a
service's exclusive namespaces are closed to everyone else.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

from zhome.appservice.http import AppServiceUnreachable, RequestFn, segment, service_url
from zhome.appservice.registration import ApplicationService
from zhome.http.errors import MatrixError

logger = logging.getLogger(__name__)

QUERY_TIMEOUT_S = 10.0
PING_TIMEOUT_S = 30.0
THIRDPARTY_TIMEOUT_S = 15.0


class AppServices:
    def __init__(self, services: list[ApplicationService], request: RequestFn) -> None:
        self.services = list(services)
        self.request = request
        self._by_token = {s.as_token: s for s in services}
        self._by_id = {s.id: s for s in services}
        # (service ID, protocol) -> its last good metadata answer: a service
        # that cannot answer now is represented by what it said before.
        self._protocol_cache: dict[tuple[str, str], dict[str, Any]] = {}

    def __bool__(self) -> bool:
        return bool(self.services)

    def by_token(self, token: str) -> Optional[ApplicationService]:
        return self._by_token.get(token)

    def by_id(self, as_id: str) -> Optional[ApplicationService]:
        return self._by_id.get(as_id)

    def exclusive_user_owner(self, user_id: str) -> Optional[ApplicationService]:
        for s in self.services:
            if s.is_exclusive_user(user_id):
                return s
        return None

    def exclusive_alias_owner(self, alias: str) -> Optional[ApplicationService]:
        for s in self.services:
            if s.is_exclusive_alias(alias):
                return s
        return None

    def is_unlimited(self, user_id: str) -> bool:
        """Whether ``user_id`` belongs to a service registered with ``rate_limited: false``."""
        return any(not s.rate_limited and s.is_interested_in_user(user_id) for s in self.services)

    # -- queries ------------------------------------------------------------------
    async def _query(self, candidates: list[ApplicationService], path: str, what: str) -> bool:
        for s in candidates:
            if s.url is None:
                continue
            try:
                code, _, _ = await self.request("GET", service_url(s, path), s.hs_token, None, QUERY_TIMEOUT_S)
            except AppServiceUnreachable as e:
                logger.info("application service %s: %s query failed: %s", s.id, what, e)
                continue
            if code == 200:
                return True
        return False

    async def query_user(self, user_id: str) -> bool:
        """Ask the services whose users namespace holds ``user_id`` to create
        it; True when one answered 200 (so look it up again)."""
        cands = [s for s in self.services if s.is_interested_in_user(user_id) and user_id != s.sender]
        if not cands:
            return False
        return await self._query(cands, f"/users/{segment(user_id)}", "user")

    async def query_alias(self, alias: str) -> bool:
        cands = [s for s in self.services if s.is_interested_in_alias(alias)]
        if not cands:
            return False
        return await self._query(cands, f"/rooms/{segment(alias)}", "room alias")

    # -- ping ------------------------------------------------------------------------
    async def ping(self, service: ApplicationService, transaction_id: Optional[str]) -> int:
        """Spec: ``POST /_matrix/app/v1/ping``; the duration in milliseconds, or a MatrixError."""
        if service.url is None:
            raise MatrixError(400, "M_URL_NOT_SET", "Application service doesn't have a URL configured")
        body: dict[str, Any] = {}
        if transaction_id is not None:
            body["transaction_id"] = transaction_id
        start = time.monotonic()
        try:
            code, _, text = await self.request("POST", service_url(service, "/ping"), service.hs_token, body,
                                               PING_TIMEOUT_S)
        except AppServiceUnreachable as e:
            if e.timeout:
                raise MatrixError(504, "M_CONNECTION_TIMEOUT", "Connection to the application service timed out")
            raise MatrixError(502, "M_CONNECTION_FAILED", "Connection to the application service failed")
        duration = int((time.monotonic() - start) * 1000)
        if code != 200:
            raise MatrixError(502, "M_BAD_STATUS", f"Ping returned status {code}", status=code, body=text[:1000])
        return duration

    # -- third-party networks -----------------------------------------------------
    def protocol_services(self, protocol: str) -> list[ApplicationService]:
        return [s for s in self.services if protocol in s.protocols and s.url is not None]

    def all_protocols(self) -> list[str]:
        seen: list[str] = []
        for s in self.services:
            for p in s.protocols:
                if p not in seen:
                    seen.append(p)
        return seen

    async def _thirdparty_get(self, s: ApplicationService, path: str, query: Optional[dict[str, Any]]) -> Any:
        try:
            code, body, _ = await self.request("GET", service_url(s, path, query), s.hs_token, None,
                                               THIRDPARTY_TIMEOUT_S)
        except AppServiceUnreachable as e:
            logger.info("application service %s: third-party query failed: %s", s.id, e)
            return None
        return body if code == 200 else None

    async def protocol_info(self, protocol: str) -> Optional[dict[str, Any]]:
        """The protocol's metadata, its ``instances`` merged over the services
        that bridge it (each instance tagged with the service's ``instance_id``)."""
        merged: Optional[dict[str, Any]] = None
        for s in self.protocol_services(protocol):
            info = await self._thirdparty_get(s, f"/thirdparty/protocol/{segment(protocol)}", None)
            if isinstance(info, dict):
                self._protocol_cache[(s.id, protocol)] = info
            else:
                info = self._protocol_cache.get((s.id, protocol))
                if info is None:
                    continue
            # An instance with a network_id can be addressed (its room
            # directory: publicRooms' third_party_instance_id).
            instances = [dict(i, instance_id=f"{s.id}|{i['network_id']}") if isinstance(i.get("network_id"), str)
                         else dict(i) for i in info.get("instances") or [] if isinstance(i, dict)]
            if merged is None:
                merged = dict(info, instances=instances)
            else:
                merged["instances"] = list(merged.get("instances") or []) + instances
        return merged

    async def lookup(self, kind: str, protocol: Optional[str], query: dict[str, Any]) -> list[Any]:
        """``kind`` "location" or "user": the services' answers, concatenated."""
        if protocol is not None:
            services = self.protocol_services(protocol)
            path = f"/thirdparty/{kind}/{segment(protocol)}"
        else:
            services = [s for s in self.services if s.url is not None and s.protocols]
            path = f"/thirdparty/{kind}"
        out: list[Any] = []
        for s in services:
            got = await self._thirdparty_get(s, path, query)
            if isinstance(got, list):
                out.extend(x for x in got if isinstance(x, dict))
        return out
