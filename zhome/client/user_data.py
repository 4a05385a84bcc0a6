"""Per-user room data endpoints: typing, receipts, read markers, account
data, room tags, push rules and the notifications list.

Spec: client-server-api modules "Typing Notifications", "Receipts",
"Fully read markers", "Client Config", "Room Tagging", "Push Notifications"
("Push Rules: API", "Listing Notifications").
"""

from __future__ import annotations

import re
import time
from urllib.parse import unquote
from typing import TYPE_CHECKING, Any, Optional

from twisted.web.server import Request

from zhome.client.account import CS
from zhome.client.serialize import serialize_events
from zhome.http.errors import MatrixError, bad_json, forbidden, invalid_param, not_found, unrecognized
from zhome.http.server import JsonResource, query_arg, query_int, read_json_body
from zhome.push.rules import (
    HISTORICAL_ACTIONS,
    KINDS,
    build_ruleset,
    default_rule,
    find_rule,
    is_default_rule_id,
)
from zhome.rooms.events import Event
from zhome.storage.relations import MAIN_THREAD, THREAD

if TYPE_CHECKING:
    from zhome.server import HomeServer

RECEIPT_TYPES = ("m.read", "m.read.private", "m.fully_read")
# Receipt types that move the user's own read-up-to mark, and so clear
# notification counts ("Marking notifications as read").
READ_RECEIPT_TYPES = ("m.read", "m.read.private")

# Account data types the server owns: clients change them through their own
# APIs (read markers, push rules), never through /account_data.
SERVER_CONTROLLED_ACCOUNT_DATA = ("m.fully_read", "m.push_rules")

DEFAULT_TYPING_TIMEOUT_MS = 30_000
# GET /notifications page sizes; the spec names no default.
DEFAULT_NOTIFICATIONS_LIMIT = 20
MAX_NOTIFICATIONS_LIMIT = 100

_USER = r"/user/(?P<user_id>[^/]+)"
_ROOM = r"/rooms/(?P<room_id>[^/]+)"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _is_int(v: Any) -> bool:
    # bool is an int subclass in Python but not an integer in JSON.
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float))) and not isinstance(v, bool)


class UserDataServlets:
    def __init__(self, hs: "HomeServer") -> None:
        self.hs = hs

    def register_routes(self, r: JsonResource) -> None:
        r.register("PUT", CS + _ROOM + r"/typing/(?P<user_id>[^/]+)", self.on_typing, "typing", guests=True)
        r.register("POST", CS + _ROOM + r"/receipt/(?P<receipt_type>[^/]+)/(?P<event_id>[^/]+)", self.on_receipt,
                   "receipt", guests=True)
        r.register("POST", CS + _ROOM + r"/read_markers", self.on_read_markers, "read_markers", guests=True)

        r.register("GET", CS + _USER + r"/account_data/(?P<data_type>[^/]+)", self.on_get_account_data,
                   "account_data", guests=True)
        r.register("PUT", CS + _USER + r"/account_data/(?P<data_type>[^/]+)", self.on_put_account_data,
                   "account_data", guests=True)
        # Deleting account data (MSC3391): the unstable paths clients call
        # today and the stable ones it proposes.
        for prefix in (CS, r"/_matrix/client/unstable/org\.matrix\.msc3391"):
            r.register("DELETE", prefix + _USER + r"/account_data/(?P<data_type>[^/]+)",
                       self.on_delete_account_data, "delete_account_data")
            r.register("DELETE", prefix + _USER + _ROOM + r"/account_data/(?P<data_type>[^/]+)",
                       self.on_delete_room_account_data, "delete_room_account_data")
        r.register("GET", CS + _USER + _ROOM + r"/account_data/(?P<data_type>[^/]+)",
                   self.on_get_room_account_data, "room_account_data", guests=True)
        r.register("PUT", CS + _USER + _ROOM + r"/account_data/(?P<data_type>[^/]+)",
                   self.on_put_room_account_data, "room_account_data", guests=True)

        r.register("GET", CS + _USER + _ROOM + r"/tags", self.on_get_tags, "tags", guests=True)
        r.register("PUT", CS + _USER + _ROOM + r"/tags/(?P<tag>[^/]+)", self.on_put_tag, "tag", guests=True)
        r.register("DELETE", CS + _USER + _ROOM + r"/tags/(?P<tag>[^/]+)", self.on_delete_tag, "tag", guests=True)

        # One route for the whole /pushrules tree: the spec's paths differ by
        # a trailing slash (a listing) or its absence (a single item), and a
        # malformed path must get a 400 that says what is wrong, not a
        # generic 404.
        r.register("GET", CS + r"/pushrules(?P<rest>/.*)?", self.on_push_rules_path, "pushrules")
        r.register("PUT", CS + r"/pushrules(?P<rest>/.*)?", self.on_push_rules_path, "pushrules")
        r.register("DELETE", CS + r"/pushrules(?P<rest>/.*)?", self.on_push_rules_path, "pushrules")

        r.register("GET", CS + r"/notifications", self.on_notifications, "notifications")

    # -- helpers ---------------------------------------------------------------
    async def _require_joined(self, room_id: str, user_id: str) -> None:
        eid = await self.hs.events.get_current_state_event_id(room_id, "m.room.member", user_id)
        ev = await self.hs.events.get_event(eid) if eid else None
        if ev is None or ev.membership != "join":
            raise forbidden("You are not joined to this room")

    async def _require_event_in_room(self, room_id: str, event_id: str) -> Event:
        ev = await self.hs.events.get_event(event_id)
        if ev is None or ev.room_id != room_id:
            raise not_found("Event not found in this room")
        return ev

    async def _auth_self(self, request: Request, user_id: str, what: str) -> str:
        req = await self.hs.auth.get_user_by_req(request)
        if req.user_id != user_id:
            raise forbidden(f"Cannot {what} for other users.")
        return req.user_id

    async def _set_account_data(self, user_id: str, room_id: str, data_type: str, content: dict[str, Any]) -> None:
        pos = await self.hs.user_data.set_account_data(user_id, room_id, data_type, content)
        self.hs.notifier.on_account_data(pos, user_id)

    async def copy_room_settings(self, user_id: str, old_room: str, new_room: str) -> None:
        """After ``user_id`` followed a room upgrade into ``new_room``
        (zhome/rooms/room_upgrade.py): their push rules for the old room
        (room rules, and override/underride rules named after it, as
        clients mute a room), its tags and its place in m.direct are copied,
        where the new room has none of its own yet."""
        rules, enables = await self.hs.user_data.get_push_rule_changes(user_id)
        have = {(k, r) for k, r, _, _ in rules}
        copied = False
        for kind, rule_id, _, rule in rules:
            if rule_id != old_room or kind not in ("room", "override", "underride") or (kind, new_room) in have:
                continue
            new_rule = dict(rule)
            if isinstance(rule.get("conditions"), list):
                new_rule["conditions"] = [
                    dict(c, pattern=new_room) if isinstance(c, dict) and c.get("key") == "room_id"
                    and c.get("pattern") == old_room else c for c in rule["conditions"]]
            await self.hs.user_data.put_push_rule(user_id, kind, new_room, new_rule, None, None)
            for k, r, enabled, actions in enables:
                if k == kind and r == old_room:
                    await self.hs.user_data.set_push_rule_attr(user_id, kind, new_room, bool(enabled), actions)
            copied = True
        if copied:
            await self._push_rules_changed(user_id)
        tags = await self._get_tags(user_id, old_room)
        if tags and not await self._get_tags(user_id, new_room):
            await self._set_account_data(user_id, new_room, "m.tag", {"tags": tags})
        direct = await self.hs.user_data.get_account_data(user_id, "", "m.direct")
        if isinstance(direct, dict):
            updated = {other: rooms + [new_room] if isinstance(rooms, list) and old_room in rooms
                       and new_room not in rooms else rooms for other, rooms in direct.items()}
            if updated != direct:
                await self._set_account_data(user_id, "", "m.direct", updated)

    # -- typing ----------------------------------------------------------------
    async def on_typing(self, request: Request, room_id: str, user_id: str) -> tuple[int, Any]:
        await self._auth_self(request, user_id, "set typing state")
        body = read_json_body(request)
        typing = body.get("typing")
        if not isinstance(typing, bool):
            raise bad_json("'typing' must be a boolean")
        timeout = body.get("timeout", DEFAULT_TYPING_TIMEOUT_MS)
        if typing and (not _is_int(timeout) or timeout < 0):
            raise bad_json("'timeout' must be a non-negative integer")
        await self._require_joined(room_id, user_id)
        self.hs.typing.set_typing(room_id, user_id, typing, timeout if typing else 0)
        return 200, {}

    # -- receipts and read markers -----------------------------------------------
    async def on_receipt(self, request: Request, room_id: str, receipt_type: str, event_id: str) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        if receipt_type not in RECEIPT_TYPES:
            raise invalid_param(f"Receipt type must be one of {', '.join(RECEIPT_TYPES)}")
        # Older clients send no body at all; the body only carries options.
        body = read_json_body(request, allow_empty=True)
        thread_id = body.get("thread_id")
        if thread_id is not None:
            if not isinstance(thread_id, str) or not thread_id:
                raise invalid_param("thread_id field must be a non-empty string")
            if receipt_type == "m.fully_read":
                raise invalid_param("thread_id is not allowed for m.fully_read")
            if thread_id != MAIN_THREAD and not thread_id.startswith("$"):
                raise invalid_param("thread_id must be 'main' or the event ID of a thread root")
        await self._require_joined(room_id, req.user_id)
        ev = await self._require_event_in_room(room_id, event_id)
        if thread_id is not None:
            await self._check_receipt_thread(ev, thread_id)
        if receipt_type == "m.fully_read":
            await self._set_fully_read(req.user_id, room_id, event_id)
        else:
            await self._set_read_receipt(req.user_id, room_id, receipt_type, event_id, thread_id)
        return 200, {}

    async def _check_receipt_thread(self, ev: Event, thread_id: str) -> None:
        """A threaded receipt's event must be in its thread ("Threaded read
        receipts"; 400 M_INVALID_PARAM when "the event_id is not related to
        the thread_id"): for ``main`` an event in no thread, else an event
        of the thread with that root. Two events are let through: the thread
        root itself (what the thread ID names; the receipt marks none of the
        thread's events read) and a redacted event, whose relation, and so
        its thread, is gone."""
        if ev.internal.get("redacted_by"):
            return
        if thread_id == ev.event_id:
            if await self.hs.relations.children(ev.room_id, ev.event_id, THREAD, None, -(2**62), 2**62,
                                                False, 1):
                return
            raise invalid_param(f"{thread_id} is not the root of a thread")
        in_thread = (await self.hs.relations.threads_of([ev]))[ev.event_id]
        if in_thread != thread_id:
            where = "the main timeline" if in_thread == MAIN_THREAD else f"thread {in_thread}"
            raise invalid_param(f"Event {ev.event_id} is in {where}, not in thread {thread_id}")

    async def on_read_markers(self, request: Request, room_id: str) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        body = read_json_body(request)
        markers: dict[str, str] = {}
        for key in ("m.fully_read", "m.read", "m.read.private"):
            v = body.get(key)
            if v is None:
                continue
            if not isinstance(v, str):
                raise bad_json(f"'{key}' must be an event ID")
            markers[key] = v
        await self._require_joined(room_id, req.user_id)
        # Check every event before writing any marker, so a bad one leaves
        # nothing half-applied.
        for eid in set(markers.values()):
            await self._require_event_in_room(room_id, eid)
        if "m.fully_read" in markers:
            await self._set_fully_read(req.user_id, room_id, markers["m.fully_read"])
        for rtype in READ_RECEIPT_TYPES:
            if rtype in markers:
                await self._set_read_receipt(req.user_id, room_id, rtype, markers[rtype], None)
        return 200, {}

    async def _set_fully_read(self, user_id: str, room_id: str, event_id: str) -> None:
        # Spec "Fully read markers": stored as room account data, not a receipt.
        await self._set_account_data(user_id, room_id, "m.fully_read", {"event_id": event_id})

    async def _set_read_receipt(self, user_id: str, room_id: str, receipt_type: str, event_id: str,
                                thread_id: Optional[str]) -> None:
        data: dict[str, Any] = {"ts": _now_ms()}
        if thread_id is not None:
            # The m.receipt content carries thread_id next to ts.
            data["thread_id"] = thread_id
        # m.read.private is stored under its own type; /sync must show it to
        # its owner only ("Private read receipts").
        pos = await self.hs.user_data.set_receipt(room_id, receipt_type, user_id, event_id, data,
                                                  thread_id=thread_id or "")
        await self.hs.unread_recount.recount(user_id, room_id, thread_id)
        self.hs.notifier.on_receipt(pos, room_id)
        # The app's badge follows the new count.
        self.hs.push_delivery.on_unread_changed(user_id)
        if receipt_type == "m.read" and self.hs.edu_sender is not None:
            # Public receipts go to the other servers in the room; private
            # ones never leave this server.
            await self.hs.edu_sender.receipt(room_id, user_id, event_id, data)

    # -- account data ------------------------------------------------------------
    async def on_get_account_data(self, request: Request, user_id: str, data_type: str) -> tuple[int, Any]:
        await self._auth_self(request, user_id, "get account data")
        if data_type == "m.push_rules":
            # Always answerable, even before the user has changed a rule.
            return 200, await self._ruleset(user_id)
        content = await self.hs.user_data.get_account_data(user_id, "", data_type)
        if not content:  # never set, or deleted (stored as {}, see on_delete_account_data)
            raise not_found("Account data not found.")
        return 200, content

    async def on_put_account_data(self, request: Request, user_id: str, data_type: str) -> tuple[int, Any]:
        await self._auth_self(request, user_id, "add account data")
        body = read_json_body(request)
        self._check_client_settable(data_type)
        await self._set_account_data(user_id, "", data_type, body)
        return 200, {}

    async def on_get_room_account_data(self, request: Request, user_id: str, room_id: str,
                                       data_type: str) -> tuple[int, Any]:
        await self._auth_self(request, user_id, "get account data")
        self._check_room_id(room_id)
        content = await self.hs.user_data.get_account_data(user_id, room_id, data_type)
        if not content:
            raise not_found("Room account data not found.")
        return 200, content

    async def on_delete_account_data(self, request: Request, user_id: str, data_type: str) -> tuple[int, Any]:
        """MSC3391: a deleted type is kept as {} so that an incremental
        /sync tells every device it is gone; reading it answers 404 and a
        full /sync leaves it out."""
        await self._auth_self(request, user_id, "delete account data")
        self._check_client_settable(data_type)
        if await self.hs.user_data.get_account_data(user_id, "", data_type):
            await self._set_account_data(user_id, "", data_type, {})
        return 200, {}

    async def on_delete_room_account_data(self, request: Request, user_id: str, room_id: str,
                                          data_type: str) -> tuple[int, Any]:
        await self._auth_self(request, user_id, "delete account data")
        self._check_room_id(room_id)
        self._check_client_settable(data_type)
        if await self.hs.user_data.get_account_data(user_id, room_id, data_type):
            await self._set_account_data(user_id, room_id, data_type, {})
        return 200, {}

    async def on_put_room_account_data(self, request: Request, user_id: str, room_id: str,
                                       data_type: str) -> tuple[int, Any]:
        await self._auth_self(request, user_id, "add account data")
        self._check_room_id(room_id)
        body = read_json_body(request)
        self._check_client_settable(data_type)
        notifier = getattr(self.hs, "email_notifier", None)
        if notifier is not None and data_type == notifier.ROOM_SETTING:
            # Mails cover what comes from this moment on.
            await notifier.enable(user_id)
        await self._set_account_data(user_id, room_id, data_type, body)
        return 200, {}

    @staticmethod
    def _check_client_settable(data_type: str) -> None:
        if data_type in SERVER_CONTROLLED_ACCOUNT_DATA:
            # The spec gives 405 with M_BAD_JSON for server-controlled types.
            raise MatrixError(405, "M_BAD_JSON", f"Cannot set {data_type} through this API.")

    @staticmethod
    def _check_room_id(room_id: str) -> None:
        if not room_id.startswith("!"):
            raise invalid_param(f"{room_id} is not a valid room ID.")

    # -- tags --------------------------------------------------------------------
    async def _get_tags(self, user_id: str, room_id: str) -> dict[str, Any]:
        content = await self.hs.user_data.get_account_data(user_id, room_id, "m.tag")
        tags = content.get("tags") if content else None
        return dict(tags) if isinstance(tags, dict) else {}

    async def on_get_tags(self, request: Request, user_id: str, room_id: str) -> tuple[int, Any]:
        await self._auth_self(request, user_id, "get tags")
        return 200, {"tags": await self._get_tags(user_id, room_id)}

    async def on_put_tag(self, request: Request, user_id: str, room_id: str, tag: str) -> tuple[int, Any]:
        await self._auth_self(request, user_id, "add tags")
        self._check_room_id(room_id)
        body = read_json_body(request)
        if "order" in body and not _is_number(body["order"]):
            raise bad_json("'order' must be a number")
        if len(tag.encode("utf-8")) > 255:
            raise invalid_param("Tag names are limited to 255 bytes")
        tags = await self._get_tags(user_id, room_id)
        tags[tag] = body
        await self._set_account_data(user_id, room_id, "m.tag", {"tags": tags})
        return 200, {}

    async def on_delete_tag(self, request: Request, user_id: str, room_id: str, tag: str) -> tuple[int, Any]:
        await self._auth_self(request, user_id, "remove tags")
        tags = await self._get_tags(user_id, room_id)
        if tag in tags:
            del tags[tag]
            await self._set_account_data(user_id, room_id, "m.tag", {"tags": tags})
        # Removing an absent tag is not an error: the end state is the same.
        return 200, {}

    # -- push rules ----------------------------------------------------------------
    async def _ruleset(self, user_id: str) -> dict[str, Any]:
        user_rules, enables = await self.hs.user_data.get_push_rule_changes(user_id)
        return build_ruleset(user_id, user_rules, enables)

    async def _push_rules_changed(self, user_id: str) -> None:
        # Unread counts of the next messages must follow the new rules.
        cache = getattr(self.hs, "push_rules_cache", None)
        if cache is not None:
            cache.invalidate(user_id)
        # Spec "Push Rules: Events": every change reaches the user's clients
        # as m.push_rules account data holding the whole ruleset.
        await self._set_account_data(user_id, "", "m.push_rules", await self._ruleset(user_id))

    @staticmethod
    def _check_kind(kind: str) -> None:
        if kind not in KINDS:
            raise invalid_param(f"Unknown push rule kind {kind!r}")

    async def on_push_rules_path(self, request: Request, rest: Optional[str] = None) -> tuple[int, Any]:
        """Every request under ``/pushrules``, by the shape of its path.

        ``/pushrules/`` is the whole ruleset, ``/pushrules/global/`` the
        global scope, ``/pushrules/global/{kind}/`` one kind's rules,
        ``/pushrules/global/{kind}/{ruleId}`` a rule and ``.../enabled`` or
        ``.../actions`` one of its attributes. Only the listings end in a
        slash; the same path without it names nothing.
        """
        req = await self.hs.auth.get_user_by_req(request)
        method = request.method.decode("ascii", "replace")
        segs = parse_push_rule_path(request.path.decode("utf-8", "replace"))
        if segs is None:
            # "/pushrules" itself: the ruleset is "/pushrules/".
            raise unrecognized(404, "Unrecognized request: the push rules are at /pushrules/")
        if method == "GET":
            return 200, await self._get_push_rules_path(req.user_id, segs)
        # Writes address one rule (or one attribute of it).
        scope, kind, rule_id, attr = split_rule_path(segs)
        if method == "PUT":
            if attr is None:
                return await self.on_put_push_rule(request, req.user_id, kind, rule_id)
            return await self.on_put_push_rule_attr(request, req.user_id, kind, rule_id, attr)
        if attr is not None:
            raise unrecognized(400, "Unrecognized request: attributes of a rule cannot be deleted")
        return await self.on_delete_push_rule(req.user_id, kind, rule_id)

    async def _get_push_rules_path(self, user_id: str, segs: list[str]) -> Any:
        if segs == [""]:
            return await self._ruleset(user_id)
        check_scope(segs[0])
        if len(segs) == 1:
            raise unrecognized(400, "Unrecognized request: the rules of a scope are at /pushrules/global/")
        if segs[1:] == [""]:
            return (await self._ruleset(user_id))["global"]
        self._check_kind(segs[1])
        if len(segs) == 2:
            raise unrecognized(400, f"Unrecognized request: the rules of a kind are at /pushrules/global/{segs[1]}/")
        if segs[2:] == [""]:
            return (await self._ruleset(user_id))["global"][segs[1]]
        _, kind, rule_id, attr = split_rule_path(segs)
        rule = find_rule(await self._ruleset(user_id), kind, rule_id)
        if rule is None:
            raise not_found("The push rule was not found.")
        if attr is None:
            return rule
        return {attr: rule[attr]}

    async def on_put_push_rule(self, request: Request, user_id: str, kind: str, rule_id: str) -> tuple[int, Any]:
        if is_default_rule_id(rule_id):
            raise invalid_param("Rule IDs starting with '.' are reserved for server-default rules")
        if "/" in rule_id or "\\" in rule_id:
            raise invalid_param("Rule IDs may not contain slashes or backslashes")
        body = read_json_body(request)
        rule = self._validate_rule(kind, body)
        before = query_arg(request, "before")
        after = query_arg(request, "after")
        for ref in (before, after):
            if ref is not None and is_default_rule_id(ref):
                raise MatrixError(400, "M_UNKNOWN", "Cannot position a rule relative to a server-default rule")

        if before is not None and after is not None:
            # Spec: with both, the rule goes next to `before`.
            after = None
        if rule_id in (before, after):
            raise MatrixError(400, "M_UNKNOWN", "A rule cannot be positioned relative to itself")
        ok = await self.hs.user_data.put_push_rule(user_id, kind, rule_id, rule, before, after)
        if not ok:
            raise MatrixError(400, "M_UNKNOWN", f"before/after rule not found: {before or after}")
        await self._push_rules_changed(user_id)
        return 200, {}

    async def on_delete_push_rule(self, user_id: str, kind: str, rule_id: str) -> tuple[int, Any]:
        if is_default_rule_id(rule_id):
            if default_rule(user_id, kind, rule_id) is not None:
                raise forbidden("Server-default rules cannot be deleted")
            raise not_found("The push rule was not found.")
        if not await self.hs.user_data.delete_push_rule(user_id, kind, rule_id):
            raise not_found("The push rule was not found.")
        await self._push_rules_changed(user_id)
        return 200, {}

    async def on_put_push_rule_attr(self, request: Request, user_id: str, kind: str, rule_id: str,
                                    attr: str) -> tuple[int, Any]:
        body = read_json_body(request)
        enabled: Optional[bool] = None
        actions: Optional[list[Any]] = None
        if attr == "enabled":
            enabled = body.get("enabled")
            if not isinstance(enabled, bool):
                raise bad_json("'enabled' must be a boolean")
        else:
            actions = self._validate_actions(body.get("actions"))
        if find_rule(await self._ruleset(user_id), kind, rule_id) is None:
            raise not_found("The push rule was not found.")
        await self.hs.user_data.set_push_rule_attr(user_id, kind, rule_id, enabled, actions)
        await self._push_rules_changed(user_id)
        return 200, {}

    @classmethod
    def _validate_rule(cls, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        """The stored form of a PUT body: only the keys the kind uses."""
        rule: dict[str, Any] = {"actions": cls._validate_actions(body.get("actions"))}
        if kind in ("override", "underride"):
            # Optional per the spec: a rule without conditions always matches.
            conditions = body.get("conditions", [])
            if not isinstance(conditions, list):
                raise bad_json("'conditions' must be a list")
            for c in conditions:
                if not isinstance(c, dict) or not isinstance(c.get("kind"), str):
                    raise bad_json("Each condition must be an object with a string 'kind'")
            rule["conditions"] = conditions
        elif kind == "content":
            pattern = body.get("pattern")
            if not isinstance(pattern, str) or not pattern:
                raise bad_json("Content rules need a string 'pattern'")
            rule["pattern"] = pattern
        return rule

    @staticmethod
    def _validate_actions(actions: Any) -> list[Any]:
        if not isinstance(actions, list):
            raise bad_json("'actions' must be a list")
        out: list[Any] = []
        for a in actions:
            if isinstance(a, str):
                # Spec "Historical Actions": dont_notify and coalesce are
                # no-ops, "ignored, not rejected": kept as given (clients
                # read back what they set) and skipped by the evaluator.
                if a != "notify" and a not in HISTORICAL_ACTIONS:
                    raise bad_json(f"Unrecognised action {a!r}")
                out.append(a)
            elif isinstance(a, dict):
                if not isinstance(a.get("set_tweak"), str):
                    raise bad_json("Action objects must have a string 'set_tweak'")
                out.append(a)
            else:
                raise bad_json("Actions must be strings or objects")
        return out

    # -- notifications -----------------------------------------------------------
    async def on_notifications(self, request: Request) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        before = _parse_notifications_from(query_arg(request, "from"))
        limit = query_int(request, "limit", DEFAULT_NOTIFICATIONS_LIMIT)
        if limit is None or limit < 0:
            raise invalid_param("'limit' must be a non-negative integer")
        limit = min(max(limit, 1), MAX_NOTIFICATIONS_LIMIT)
        # The spec defines only "highlight"; other values filter nothing.
        only_highlight = query_arg(request, "only") == "highlight"
        entries, next_token = await self.hs.notification_log.get_page(req.user_id, before, limit, only_highlight)
        # Rows are only written for members joined at the event, but history
        # visibility is applied as everywhere else events are served.
        visible = {e.event_id for e in await self.hs.visibility.filter_events(req.user_id,
                                                                               [n.event for n in entries])}
        entries = [n for n in entries if n.event.event_id in visible]
        # Redacted events are served redacted, like everywhere else.
        events = await serialize_events(self.hs.events, [n.event for n in entries], with_room_id=False)
        out: dict[str, Any] = {"notifications": [
            {
                "actions": n.notification.actions,
                "event": ev,
                "read": n.read,
                "room_id": n.notification.room_id,
                "ts": n.notification.ts,
            }
            for n, ev in zip(entries, events)
        ]}
        if next_token is not None:
            out["next_token"] = next_token
        return 200, out


PUSH_RULE_SCOPES = ("global",)
PUSH_RULE_ATTRS = ("enabled", "actions")
_PUSHRULES_PATH = re.compile("^" + CS + r"/pushrules(?P<rest>.*)$")


def parse_push_rule_path(path: str) -> Optional[list[str]]:
    """The percent-decoded segments after ``/pushrules/`` (``[""]`` for the
    root); None for ``/pushrules`` without the slash. Segments are split
    before decoding, so an encoded slash stays inside its rule ID."""
    m = _PUSHRULES_PATH.match(path.split("?", 1)[0])
    rest = m.group("rest") if m is not None else ""
    if not rest.startswith("/"):
        return None
    return [unquote(seg) for seg in rest[1:].split("/")]


def check_scope(scope: str) -> None:
    if scope == "":
        raise unrecognized(400, "Unrecognized request: a push rule path needs a scope")
    if scope not in PUSH_RULE_SCOPES:
        raise invalid_param(f"Unknown push rule scope {scope!r}: the only scope is 'global'")


def split_rule_path(segs: list[str]) -> tuple[str, str, str, Optional[str]]:
    """(scope, kind, rule_id, attribute or None) of a path naming one rule
    or one of its attributes; a 400 for anything else."""
    check_scope(segs[0])
    if len(segs) < 2 or segs[1] == "":
        raise unrecognized(400, "Unrecognized request: a push rule path needs a kind")
    if segs[1] not in KINDS:
        raise invalid_param(f"Unknown push rule kind {segs[1]!r}")
    if len(segs) < 3 or segs[2] == "":
        raise unrecognized(400, "Unrecognized request: a push rule path needs a rule ID")
    if len(segs) == 3:
        return segs[0], segs[1], segs[2], None
    if len(segs) == 4 and segs[3] in PUSH_RULE_ATTRS:
        return segs[0], segs[1], segs[2], segs[3]
    raise unrecognized(400, f"Unrecognized request: push rules have no attribute {'/'.join(segs[3:])!r}")


def _parse_notifications_from(token: Optional[str]) -> Optional[int]:
    """A ``from`` token of /notifications: the stream position to page below."""
    if token is None:
        return None
    # Positions are non-negative BIGINTs; anything else was not handed out.
    if not (token.isascii() and token.isdigit()) or len(token) > 19 or int(token) >= 2**63:
        raise invalid_param("'from' is not a valid pagination token")
    return int(token)
