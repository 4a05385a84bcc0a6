"""zhome's own admin endpoints for the privacy rights: erasure (and its
reports), legal holds and rooms' statutory retention floors.

    POST   /_zhome/admin/v1/users/{userId}/erase             erase a user; answers the report
    GET    /_zhome/admin/v1/erasures[?user_id=]              the erasures done
    GET    /_zhome/admin/v1/erasures/{id}                    one report, with federation delivery
    POST   /_zhome/admin/v1/legal_holds                      {kind: user|room, target, reason}
    GET    /_zhome/admin/v1/legal_holds[?kind=&target=]
    DELETE /_zhome/admin/v1/legal_holds/{id}
    GET|PUT|DELETE /_zhome/admin/v1/rooms/{roomId}/retention_floor   PUT {days, reason}
    POST   /_zhome/admin/v1/retention/run                    {now?}: run the retention purge
    GET    /_zhome/admin/v1/audit[?from=&limit=&user_id=]    audit log entries, oldest first
    GET    /_zhome/admin/v1/audit/verify                     whether the hash chain holds
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from twisted.web.server import Request

from zhome.admin.erasure import erase_user
from zhome.admin.common import require_admin
from zhome.http.errors import bad_json, invalid_param, not_found
from zhome.http.server import JsonResource, query_arg, read_json_body
from zhome.util.ids import is_valid_room_id, is_valid_user_id, server_of

if TYPE_CHECKING:
    from zhome.server import HomeServer

Z1 = r"/_zhome/admin/v1"
DAY_MS = 24 * 3600 * 1000
MAX_FLOOR_DAYS = 200 * 366
MAX_REASON = 1000


def _reason(body: dict[str, Any]) -> str:
    reason = body.get("reason")
    if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON:
        raise bad_json(f"reason must be a non-empty string of at most {MAX_REASON} characters")
    return reason


class PrivacyServlets:
    def __init__(self, hs: "HomeServer") -> None:
        self.hs = hs
        self.store = hs.privacy_store

    def register_routes(self, r: JsonResource) -> None:
        r.register("POST", Z1 + r"/users/(?P<user_id>[^/]+)/erase", self.on_erase, "zadmin_erase")
        r.register("GET", Z1 + r"/erasures", self.on_list_erasures, "zadmin_erasures")
        r.register("GET", Z1 + r"/erasures/(?P<erasure_id>[^/]+)", self.on_get_erasure, "zadmin_erasure")
        r.register("POST", Z1 + r"/legal_holds", self.on_add_hold, "zadmin_holds")
        r.register("GET", Z1 + r"/legal_holds", self.on_list_holds, "zadmin_holds")
        r.register("DELETE", Z1 + r"/legal_holds/(?P<hold_id>[^/]+)", self.on_delete_hold, "zadmin_hold")
        r.register("POST", Z1 + r"/retention/run", self.on_retention_run, "zadmin_retention_run")
        r.register("GET", Z1 + r"/audit", self.on_audit, "zadmin_audit")
        r.register("GET", Z1 + r"/audit/verify", self.on_audit_verify, "zadmin_audit_verify")
        floor = Z1 + r"/rooms/(?P<room_id>[^/]+)/retention_floor"
        r.register("GET", floor, self.on_get_floor, "zadmin_floor")
        r.register("PUT", floor, self.on_put_floor, "zadmin_floor")
        r.register("DELETE", floor, self.on_delete_floor, "zadmin_floor")

    async def _require_admin(self, request: Request) -> str:
        return (await require_admin(self.hs, request)).user_id

    async def on_erase(self, request: Request, user_id: str) -> tuple[int, Any]:
        admin = await self._require_admin(request)
        if not is_valid_user_id(user_id) or server_of(user_id) != self.hs.server_name:
            raise invalid_param("Can only erase local users")
        if await self.hs.accounts.get_user(user_id) is None:
            raise not_found("User not found")
        return 200, await erase_user(self.hs, user_id, admin)

    async def on_list_erasures(self, request: Request) -> tuple[int, Any]:
        await self._require_admin(request)
        return 200, {"erasures": await self.store.list_erasures(query_arg(request, "user_id") or None)}

    async def on_get_erasure(self, request: Request, erasure_id: str) -> tuple[int, Any]:
        await self._require_admin(request)
        got = await self.store.get_erasure(erasure_id)
        if got is None:
            raise not_found("No such erasure")
        return 200, got

    async def on_add_hold(self, request: Request) -> tuple[int, Any]:
        admin = await self._require_admin(request)
        body = read_json_body(request)
        kind, target = body.get("kind"), body.get("target")
        if kind == "user":
            if not isinstance(target, str) or not is_valid_user_id(target):
                raise bad_json("target must be a user ID")
        elif kind == "room":
            if not isinstance(target, str) or not is_valid_room_id(target):
                raise bad_json("target must be a room ID")
        else:
            raise bad_json("kind must be user or room")
        return 200, await self.store.add_hold(kind, target, _reason(body), admin)

    async def on_list_holds(self, request: Request) -> tuple[int, Any]:
        await self._require_admin(request)
        return 200, {"legal_holds": await self.store.list_holds(query_arg(request, "kind") or None,
                                                                query_arg(request, "target") or None)}

    async def on_delete_hold(self, request: Request, hold_id: str) -> tuple[int, Any]:
        await self._require_admin(request)
        if not hold_id.isdigit() or not await self.store.delete_hold(int(hold_id)):
            raise not_found("No such legal hold")
        return 200, {}

    async def on_retention_run(self, request: Request) -> tuple[int, Any]:
        """Run the retention purge now; ``now`` (ms) overrides the clock,
        so an admin can see what a date would purge (tests use it too)."""
        await self._require_admin(request)
        body = read_json_body(request, allow_empty=True)
        now = body.get("now", int(time.time() * 1000))
        if not isinstance(now, int) or isinstance(now, bool) or now < 0:
            raise bad_json("now must be a time in milliseconds")
        return 200, await self.hs.retention.run_once(now)

    async def on_audit(self, request: Request) -> tuple[int, Any]:
        await self._require_admin(request)
        after = query_arg(request, "from") or "0"
        limit = query_arg(request, "limit") or "1000"
        if not after.isdigit() or not limit.isdigit():
            raise invalid_param("from and limit must be non-negative integers")
        entries = await self.hs.audit.entries(int(after), min(int(limit), 10000),
                                              about=query_arg(request, "user_id") or None)
        body: dict[str, Any] = {"entries": entries}
        if entries:
            body["next_token"] = str(entries[-1]["seq"])
        return 200, body

    async def on_audit_verify(self, request: Request) -> tuple[int, Any]:
        await self._require_admin(request)
        bad = await self.hs.audit.verify()
        return 200, {"valid": True} if bad is None else {"valid": False, "first_bad_seq": bad[0], "problem": bad[1]}

    def _room(self, room_id: str) -> None:
        if not is_valid_room_id(room_id):
            raise invalid_param("Invalid room ID")

    async def on_get_floor(self, request: Request, room_id: str) -> tuple[int, Any]:
        await self._require_admin(request)
        self._room(room_id)
        got = await self.store.get_floor(room_id)
        if got is None:
            raise not_found("The room has no retention floor")
        return 200, got

    async def on_put_floor(self, request: Request, room_id: str) -> tuple[int, Any]:
        admin = await self._require_admin(request)
        self._room(room_id)
        body = read_json_body(request)
        days = body.get("days")
        if not isinstance(days, int) or isinstance(days, bool) or not 0 < days <= MAX_FLOOR_DAYS:
            raise bad_json(f"days must be an integer from 1 to {MAX_FLOOR_DAYS}")
        await self.store.set_floor(room_id, days * DAY_MS, _reason(body), admin)
        return 200, await self.store.get_floor(room_id)

    async def on_delete_floor(self, request: Request, room_id: str) -> tuple[int, Any]:
        await self._require_admin(request)
        self._room(room_id)
        if not await self.store.delete_floor(room_id):
            raise not_found("The room has no retention floor")
        return 200, {}
