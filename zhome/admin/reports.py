"""Reporting content and reading the reports.

Spec: client-server-api "Reporting content": POST /rooms/{roomId}/report/
{eventId} (the reporter must be able to see the event; otherwise 404),
POST /rooms/{roomId}/report and POST /users/{userId}/report. For rooms
and users zhome answers 200 whether or not the target exists, as the spec
allows, so a report does not reveal which rooms and accounts exist; only
reports of existing targets are stored.

Admins read event reports through Synapse's admin API shape
(GET/DELETE /_synapse/admin/v1/event_reports[/{id}]); every report kind,
rooms and users included, through /_zhome/admin/v1/reports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from twisted.web.server import Request

from zhome.admin.common import backwards_arg, int_arg, require_admin
from zhome.http.errors import MatrixError, bad_json, invalid_param, not_found
from zhome.http.server import JsonResource, query_arg, read_json_body
from zhome.util.ids import is_valid_room_id, is_valid_user_id

if TYPE_CHECKING:
    from zhome.server import HomeServer

CS = r"/_matrix/client/(?:r0|v3)"
MAX_REASON = 1000
MAX_PAGE = 1000


def _reason(body: dict[str, Any], required: bool) -> Optional[str]:
    reason = body.get("reason")
    if reason is None and not required:
        return None
    if not isinstance(reason, str):
        raise bad_json("reason must be a string")
    if len(reason) > MAX_REASON:
        raise bad_json(f"reason must be at most {MAX_REASON} characters")
    return reason


class ReportServlets:
    def __init__(self, hs: "HomeServer") -> None:
        self.hs = hs
        self.store = hs.admin_store

    def register_routes(self, r: JsonResource) -> None:
        room = r"/rooms/(?P<room_id>[^/]+)"
        r.register("POST", CS + room + r"/report/(?P<event_id>[^/]+)", self.on_report_event, "report_event")
        r.register("POST", CS + room + r"/report", self.on_report_room, "report_room")
        r.register("POST", CS + r"/users/(?P<user_id>[^/]+)/report", self.on_report_user, "report_user")
        r.register("GET", r"/_synapse/admin/v1/event_reports", self.on_list_event_reports, "admin_event_reports")
        r.register("GET", r"/_synapse/admin/v1/event_reports/(?P<report_id>[^/]+)", self.on_get_event_report,
                   "admin_event_report")
        r.register("DELETE", r"/_synapse/admin/v1/event_reports/(?P<report_id>[^/]+)",
                   self.on_delete_event_report, "admin_event_report")
        r.register("GET", r"/_zhome/admin/v1/reports", self.on_list_all_reports, "admin_reports")

    # -- client ------------------------------------------------------------------------
    async def on_report_event(self, request: Request, room_id: str, event_id: str) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        body = read_json_body(request)
        reason = _reason(body, required=False)
        score = body.get("score")
        if score is not None and (not isinstance(score, int) or isinstance(score, bool) or not -100 <= score <= 0):
            raise bad_json("score must be an integer from -100 to 0")
        # The same check as reading the event: a reporter reports only what they can see.
        try:
            await self.hs.room_servlets._visible_event(room_id, event_id, req.user_id)
        except MatrixError as e:
            if e.code in (403, 404):
                raise not_found("Event not found or you are not allowed to see it")
            raise
        await self.store.add_report("event", req.user_id, room_id=room_id, event_id=event_id, reason=reason,
                                    score=score)
        return 200, {}

    async def on_report_room(self, request: Request, room_id: str) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        body = read_json_body(request)
        reason = _reason(body, required=True)
        if not is_valid_room_id(room_id):
            raise invalid_param("Invalid room ID")
        if await self.hs.rooms.get_room_version(room_id) is not None:
            await self.store.add_report("room", req.user_id, room_id=room_id, reason=reason)
        return 200, {}

    async def on_report_user(self, request: Request, user_id: str) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        body = read_json_body(request)
        reason = _reason(body, required=True)
        if not is_valid_user_id(user_id):
            raise invalid_param("Invalid user ID")
        if await self.hs.accounts.get_user(user_id) is not None or await self._known_remote(user_id):
            await self.store.add_report("user", req.user_id, target_user_id=user_id, reason=reason)
        return 200, {}

    async def _known_remote(self, user_id: str) -> bool:
        return bool(await self.hs.events.get_rooms_for_user(user_id))

    # -- admin -------------------------------------------------------------------------
    async def _require_admin(self, request: Request) -> None:
        await require_admin(self.hs, request)

    async def _describe(self, report: dict[str, Any], with_event: bool) -> dict[str, Any]:
        out = {k: report[k] for k in ("id", "received_ts", "room_id", "event_id", "user_id", "reason", "score")}
        room_id = report["room_id"]
        name = alias = sender = None
        if room_id:
            state = await self.hs.events.get_state_events(await self.hs.events.get_current_state_ids(room_id))
            if ("m.room.name", "") in state:
                name = state[("m.room.name", "")].content.get("name")
            if ("m.room.canonical_alias", "") in state:
                alias = state[("m.room.canonical_alias", "")].content.get("alias")
        event = await self.hs.events.get_event(report["event_id"]) if report["event_id"] else None
        if event is not None:
            sender = event.sender
        out.update(name=name, canonical_alias=alias, sender=sender)
        if with_event:
            out["event_json"] = dict(event.pdu) if event is not None else None
        return out

    def _page_args(self, request: Request) -> tuple[int, int, bool]:
        backwards = backwards_arg(request, "b")
        return int_arg(request, "from", 0), min(int_arg(request, "limit", 100), MAX_PAGE), backwards

    async def on_list_event_reports(self, request: Request) -> tuple[int, Any]:
        await self._require_admin(request)
        offset, limit, backwards = self._page_args(request)
        reports, total = await self.store.list_reports(
            "event", offset=offset, limit=limit, backwards=backwards,
            user_id=query_arg(request, "user_id") or None, room_id=query_arg(request, "room_id") or None)
        body: dict[str, Any] = {"event_reports": [await self._describe(r, False) for r in reports], "total": total}
        if reports and offset + len(reports) < total:
            body["next_token"] = offset + len(reports)
        return 200, body

    async def _report(self, report_id: str) -> dict[str, Any]:
        if not report_id.isdigit():
            raise invalid_param("The report ID must be a non-negative integer")
        report = await self.store.get_report(int(report_id))
        if report is None or report["kind"] != "event":
            raise not_found("Event report not found")
        return report

    async def on_get_event_report(self, request: Request, report_id: str) -> tuple[int, Any]:
        await self._require_admin(request)
        return 200, await self._describe(await self._report(report_id), True)

    async def on_delete_event_report(self, request: Request, report_id: str) -> tuple[int, Any]:
        await self._require_admin(request)
        report = await self._report(report_id)
        await self.store.delete_report(report["id"])
        return 200, {}

    async def on_list_all_reports(self, request: Request) -> tuple[int, Any]:
        await self._require_admin(request)
        offset, limit, backwards = self._page_args(request)
        kind = query_arg(request, "kind") or "event"
        if kind not in ("event", "room", "user"):
            raise invalid_param("kind must be event, room or user")
        reports, total = await self.store.list_reports(kind, offset=offset, limit=limit, backwards=backwards)
        body: dict[str, Any] = {"reports": reports, "total": total}
        if reports and offset + len(reports) < total:
            body["next_token"] = offset + len(reports)
        return 200, body
