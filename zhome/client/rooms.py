"""Rooms: creation, membership, sending, state, members, redaction,
events, context, /messages, aliases, the room directory.

Spec: client-server-api "Rooms", "Room membership", "Sending events",
"Getting events for a room", "Room aliases", "Listing rooms", "Redactions".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Coroutine, Optional

from twisted.web.server import Request

from zhome.client.account import CS
from zhome.client.serialize import serialize_events
from zhome.http.errors import MatrixError, bad_json, forbidden, invalid_param, not_found
from zhome.http.server import JsonResource, query_arg, query_args, query_int, read_json_body
from zhome.rooms import auth as auth_rules
from zhome.rooms.events import Event
from zhome.rooms.validation import check_client_content, check_field_lengths
from zhome.sync.filtering import EventFilter, parse_filter_param
from zhome.sync.notifier import StreamToken
from zhome.util.ids import is_valid_room_alias, is_valid_user_id, server_of

if TYPE_CHECKING:
    from zhome.server import HomeServer

# Matched on the raw path: clients may percent-encode the '!' (as %21).
ROOM = r"(?P<room_id>(?:!|%21)[^/]+)"
MAX_PAGINATION_LIMIT = 1000


class RoomServlets:
    def __init__(self, hs: "HomeServer") -> None:
        self.hs = hs
        self.events = hs.events

    def register_routes(self, r: JsonResource) -> None:
        r.register("POST", CS + r"/createRoom", self.on_create_room, "createRoom")
        r.register("POST", CS + r"/join/(?P<target>[^/]+)", self.on_join_target, "join", guests=True)
        r.register("POST", CS + r"/knock/(?P<target>[^/]+)", self.on_knock, "knock")
        r.register("POST", CS + "/rooms/" + ROOM + r"/join", self.on_join_room, "room_join", guests=True)
        for action in ("invite", "leave", "kick", "ban", "unban", "forget"):
            r.register("POST", CS + "/rooms/" + ROOM + "/" + action, self._membership_handler(action), action,
                       guests=action == "leave")
        r.register("PUT", CS + "/rooms/" + ROOM + r"/send/(?P<etype>[^/]+)/(?P<txn_id>[^/]+)",
                   self.on_send, "send", guests=True)
        r.register("PUT", CS + "/rooms/" + ROOM + r"/state/(?P<etype>[^/]+)(?:/(?P<state_key>[^/]*))?",
                   self.on_put_state, "put_state", guests=True)
        r.register("GET", CS + "/rooms/" + ROOM + r"/state/(?P<etype>[^/]+)(?:/(?P<state_key>[^/]*))?",
                   self.on_get_state_event, "get_state_event", guests=True)
        r.register("GET", CS + "/rooms/" + ROOM + r"/state", self.on_get_state, "get_state", guests=True)
        r.register("GET", CS + "/rooms/" + ROOM + r"/members", self.on_members, "members", guests=True)
        r.register("GET", CS + "/rooms/" + ROOM + r"/joined_members", self.on_joined_members, "joined_members")
        r.register("GET", CS + r"/joined_rooms", self.on_joined_rooms, "joined_rooms")
        r.register("PUT", CS + "/rooms/" + ROOM + r"/redact/(?P<event_id>[^/]+)/(?P<txn_id>[^/]+)", self.on_redact,
                   "redact")
        r.register("GET", CS + "/rooms/" + ROOM + r"/event/(?P<event_id>[^/]+)",
                   self.on_get_event, "get_event", guests=True)
        r.register("GET", CS + "/rooms/" + ROOM + r"/context/(?P<event_id>[^/]+)",
                   self.on_context, "context", guests=True)
        r.register("GET", CS + "/rooms/" + ROOM + r"/messages", self.on_messages, "messages", guests=True)
        r.register("GET", CS + "/rooms/" + ROOM + r"/aliases", self.on_room_aliases, "room_aliases")
        r.register("PUT", CS + r"/directory/room/(?P<alias>[^/]+)", self.on_put_alias, "alias")
        r.register("GET", CS + r"/directory/room/(?P<alias>[^/]+)", self.on_get_alias, "alias")
        r.register("DELETE", CS + r"/directory/room/(?P<alias>[^/]+)", self.on_delete_alias, "alias")
        r.register("GET", CS + r"/directory/list/room/" + ROOM, self.on_get_visibility, "room_visibility")
        r.register("PUT", CS + r"/directory/list/room/" + ROOM, self.on_put_visibility, "room_visibility")
        r.register("GET", CS + r"/publicRooms", self.on_public_rooms_get, "publicRooms")
        r.register("POST", CS + r"/publicRooms", self.on_public_rooms_post, "publicRooms")

    # -- helpers ---------------------------------------------------------------
    async def _membership(self, room_id: str, user_id: str) -> tuple[Optional[str], Optional[Event]]:
        eid = await self.events.get_current_state_event_id(room_id, "m.room.member", user_id)
        if eid is None:
            return None, None
        ev = await self.events.get_event(eid)
        return (ev.membership if ev else None), ev

    async def _require_known_room(self, room_id: str) -> None:
        if await self.hs.rooms.get_room_version(room_id) is None:
            raise forbidden("You are not in this room")

    async def _state_for_reader(self, room_id: str, user_id: str) -> dict[tuple[str, str], str]:
        """Current state for members; the state when they left for former
        members (not for banned ones: a ban ends what the room shows them);
        current state for anyone when the room is world_readable."""
        await self._require_known_room(room_id)
        membership, ev = await self._membership(room_id, user_id)
        if membership == "join":
            return await self.events.get_current_state_ids(room_id)
        if membership == "leave" and ev is not None:
            if await self.hs.visibility.is_world_readable(room_id):
                return await self.events.get_current_state_ids(room_id)
            return await self.events.get_state_after_event(ev.event_id)
        if await self.hs.visibility.is_world_readable(room_id):
            # Anyone may read a world_readable room without joining it.
            return await self.events.get_current_state_ids(room_id)
        raise forbidden("You are not in this room")

    async def resolve_room(self, target: str) -> tuple[str, list[str]]:
        """(room ID, servers known to be in it) for a room ID or alias."""
        return await self._resolve_room(target)

    async def _resolve_room(self, target: str, request: Optional[Request] = None) -> tuple[str, list[str]]:
        """(room ID, servers to join through) for a room ID or alias."""
        via: list[str] = []
        if request is not None:
            via = query_args(request, "via") + query_args(request, "server_name")
        if target.startswith("!"):
            return target, via
        if target.startswith("#"):
            if not is_valid_room_alias(target):
                raise invalid_param("Invalid room alias")
            server = server_of(target)
            if server == self.hs.server_name:
                found = await self.local_alias(target)
                if found is None:
                    raise not_found("Room alias not found")
                return found[0], via
            return await self._remote_alias(target, server)
        raise invalid_param("Expected a room ID or alias")

    async def local_alias(self, alias: str) -> Optional[tuple[str, str]]:
        """(room ID, creator) of a local alias; an unknown alias in an
        application service's namespace is asked of the service first
        (spec: application-service-api "Querying", ``GET /rooms/{roomAlias}``)."""
        found = await self.hs.rooms.get_alias(alias)
        if found is None and self.hs.appservices and await self.hs.appservices.query_alias(alias):
            found = await self.hs.rooms.get_alias(alias)
        return found

    async def query_unknown_users(self, user_ids: list[str]) -> None:
        """Spec: application-service-api "Querying" ``GET /users/{userId}``:
        local users that do not exist yet, in a service's namespace, are
        asked of the service (which may create them)."""
        if not self.hs.appservices:
            return
        for user_id in user_ids[:100]:
            if (isinstance(user_id, str) and server_of(user_id) == self.hs.server_name
                    and await self.hs.accounts.get_user(user_id) is None):
                await self.hs.appservices.query_user(user_id)

    def alias_changed(self, room_id: str) -> None:
        txns = getattr(self.hs, "appservice_txns", None)
        if txns is not None:
            txns.alias_changed(room_id)

    async def _remote_alias(self, alias: str, server: str) -> tuple[str, list[str]]:
        client = self.hs.federation_client
        if client is None:
            raise not_found("Room alias not found (federation is disabled)")
        from zhome.federation.transport import FederationError, FederationHttpError

        try:
            resp = await client.get_json(server, "/_matrix/federation/v1/query/directory",
                                         query={"room_alias": alias})
        except FederationHttpError as e:
            if e.status == 404:
                raise not_found("Room alias not found")
            if e.status == 403:
                # E.g. the alias's server does not federate with this one.
                detail = e.body.get("error") if isinstance(e.body, dict) else None
                raise forbidden(f"{server} refused the alias lookup: {str(detail or 'forbidden')[:200]}")
            raise MatrixError(502, "M_UNKNOWN", f"{server} answered {e.status}")
        except FederationError as e:
            raise MatrixError(502, "M_UNKNOWN", f"Could not reach {server}: {type(e).__name__}")
        room_id = resp.get("room_id") if isinstance(resp, dict) else None
        servers = resp.get("servers") if isinstance(resp, dict) else None
        if not isinstance(room_id, str):
            raise not_found("Room alias not found")
        return room_id, [server] + [s for s in (servers or []) if isinstance(s, str)]

    # -- creation and membership --------------------------------------------
    async def on_create_room(self, request: Request) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        body = read_json_body(request, allow_empty=True)
        self.hs.ratelimit_joins.check(req.user_id)
        invites = body.get("invite")
        if isinstance(invites, list):
            await self.query_unknown_users(invites)
        room_alias_name = body.get("room_alias_name")
        if isinstance(room_alias_name, str):
            self._refuse_exclusive_alias(f"#{room_alias_name}:{self.hs.server_name}", req.app_service)
        invite_3pid = body.get("invite_3pid", [])
        if not isinstance(invite_3pid, list) or len(invite_3pid) > 100:
            raise bad_json("'invite_3pid' must be a list")
        for entry in invite_3pid:
            self.hs.third_party_invites.check_params(entry)
        room_id, alias = await self.hs.room_creation.create_room(req.user_id, body)
        for entry in invite_3pid:
            # Spec: "Third-party invites", as POST /rooms/{roomId}/invite would.
            await self.hs.third_party_invites.invite(req.user_id, room_id, entry)
        out: dict[str, Any] = {"room_id": room_id}
        if alias:
            out["room_alias"] = alias
        return 200, out

    async def _join(self, request: Request, room_id: str, via: list[str]) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        body = read_json_body(request, allow_empty=True)
        self.hs.ratelimit_joins.check(req.user_id)
        if "reason" in body and not isinstance(body["reason"], str):
            raise bad_json("'reason' must be a string")
        # Other keys of the body go into the join event's content, as for
        # PUT /state/m.room.member (third_party_signed is a parameter, not content).
        extra = {k: v for k, v in body.items() if k not in ("reason", "third_party_signed", "membership")}
        if extra:
            rv = await self.hs.event_creator.room_version_of(room_id) if await self.hs.rooms.get_room_version(
                room_id) else None
            if rv is not None:
                check_client_content(rv, extra)
        await self.hs.membership.update(req.user_id, req.user_id, room_id, "join", reason=body.get("reason"),
                                        via=via, extra=extra or None)
        return 200, {"room_id": room_id}

    async def on_join_target(self, request: Request, target: str) -> tuple[int, Any]:
        await self.hs.auth.get_user_by_req(request)
        room_id, via = await self._resolve_room(target, request)
        return await self._join(request, room_id, via)

    async def on_join_room(self, request: Request, room_id: str) -> tuple[int, Any]:
        return await self._join(request, room_id, [])

    async def on_knock(self, request: Request, target: str) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        body = read_json_body(request, allow_empty=True)
        room_id, via = await self._resolve_room(target, request)
        await self.hs.membership.update(req.user_id, req.user_id, room_id, "knock", reason=body.get("reason"),
                                        via=via)
        return 200, {"room_id": room_id}

    def _membership_handler(
        self, action: str
    ) -> Callable[[Request, str], Coroutine[Any, Any, tuple[int, Any]]]:
        async def handler(request: Request, room_id: str) -> tuple[int, Any]:
            req = await self.hs.auth.get_user_by_req(request)
            body = read_json_body(request, allow_empty=True)
            if action == "forget":
                membership, _ = await self._membership(room_id, req.user_id)
                if membership in ("join", "invite", "knock"):
                    raise MatrixError(400, "M_UNKNOWN", "You must leave the room before forgetting it")
                if membership is None:
                    raise not_found("You have never been in this room")
                await self.events.forget_room(req.user_id, room_id)
                if self.hs.sync_response_cache is not None:
                    # A forgotten room leaves the user's answers; no sync wakes for it.
                    self.hs.sync_response_cache.on_wake((), (req.user_id,))
                return 200, {}
            if action == "invite" and "user_id" not in body and ("id_server" in body or "medium" in body):
                # Spec: "Third-party invites": inviting by email address.
                await self._require_known_room(room_id)
                await self.hs.third_party_invites.invite(req.user_id, room_id, body)
                return 200, {}
            if action == "leave":
                target = req.user_id
            else:
                target = body.get("user_id")
                if not isinstance(target, str) or not is_valid_user_id(target):
                    raise bad_json("'user_id' must be a valid user ID")
            reason = body.get("reason")
            if reason is not None and not isinstance(reason, str):
                raise bad_json("'reason' must be a string")
            if action == "leave":
                await self._require_known_room(room_id)
                membership, _ = await self._membership(room_id, req.user_id)
                if membership is None:
                    raise forbidden("You are not in this room")
            membership_value = {"invite": "invite", "leave": "leave", "kick": "leave", "ban": "ban",
                                "unban": "leave"}[action]
            if action == "kick":
                current, _ = await self._membership(room_id, target)
                if current not in ("join", "invite", "knock"):
                    raise forbidden(f"{target} is not in the room")
            if action == "unban":
                current, _ = await self._membership(room_id, target)
                if current != "ban":
                    raise forbidden(f"{target} is not banned")
            await self._require_known_room(room_id)
            if action == "invite":
                await self.query_unknown_users([target])
            await self.hs.membership.update(req.user_id, target, room_id, membership_value, reason=reason)
            return 200, {}

        return handler

    # -- sending -------------------------------------------------------------------
    async def on_send(self, request: Request, room_id: str, etype: str,
                      txn_id: Optional[str] = None) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        content = read_json_body(request, allow_empty=True)
        self.hs.ratelimit_message.check(req.user_id)
        check_field_lengths(etype, None)
        rv = await self.hs.event_creator.room_version_of(room_id) if await self.hs.rooms.get_room_version(
            room_id) else None
        if rv is None:
            raise forbidden("You are not in this room")
        check_client_content(rv, content)
        if etype == "m.room.redaction":
            raise MatrixError(400, "M_UNKNOWN", "Use the /redact endpoint to redact events")
        ev = await self.hs.event_creator.send(room_id, etype, req.user_id, content, txn_id=txn_id,
                                              device_id=req.device_id)
        return 200, {"event_id": ev.event_id}

    async def on_put_state(self, request: Request, room_id: str, etype: str,
                           state_key: str = "") -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        content = read_json_body(request, allow_empty=True)
        check_field_lengths(etype, state_key)
        rv_id = await self.hs.rooms.get_room_version(room_id)
        if rv_id is None:
            raise forbidden("You are not in this room")
        rv = await self.hs.event_creator.room_version_of(room_id)
        check_client_content(rv, content)
        if etype == "m.room.member":
            membership = content.get("membership")
            if not isinstance(membership, str):
                raise bad_json("m.room.member needs a 'membership'")
            if not is_valid_user_id(state_key):
                raise bad_json("The state key of m.room.member must be a user ID")
            extra = {k: v for k, v in content.items() if k not in ("membership", "reason")}
            ev = await self.hs.membership.update(req.user_id, state_key, room_id, membership,
                                                 reason=content.get("reason"), extra=extra)
            return 200, {"event_id": ev.event_id}
        if etype == "m.room.canonical_alias":
            await self._check_canonical_alias(room_id, content)
        # Sending the same state again changes nothing; answer with the
        # existing event, as clients retrying expect.
        existing_id = await self.events.get_current_state_event_id(room_id, etype, state_key)
        if existing_id:
            existing = await self.events.get_event(existing_id)
            if existing is not None and existing.content == content and existing.sender == req.user_id:
                return 200, {"event_id": existing.event_id}
        ev = await self.hs.event_creator.send(room_id, etype, req.user_id, content, state_key=state_key)
        return 200, {"event_id": ev.event_id}

    async def _check_canonical_alias(self, room_id: str, content: dict[str, Any]) -> None:
        aliases = []
        if "alias" in content:
            if not isinstance(content["alias"], str) or not is_valid_room_alias(content["alias"]):
                raise MatrixError(400, "M_INVALID_PARAM", "Invalid alias")
            aliases.append(content["alias"])
        alt = content.get("alt_aliases", [])
        if not isinstance(alt, list) or not all(isinstance(a, str) and is_valid_room_alias(a) for a in alt):
            raise MatrixError(400, "M_INVALID_PARAM", "Invalid alt_aliases")
        aliases.extend(alt)
        for a in aliases:
            if server_of(a) != self.hs.server_name:
                continue
            found = await self.hs.rooms.get_alias(a)
            if found is None or found[0] != room_id:
                raise MatrixError(400, "M_BAD_ALIAS", f"Alias {a} does not point to this room")

    async def on_get_state_event(self, request: Request, room_id: str, etype: str,
                                 state_key: str = "") -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        state = await self._state_for_reader(room_id, req.user_id)
        eid = state.get((etype, state_key))
        ev = await self.events.get_event(eid) if eid else None
        if ev is None:
            raise not_found("Event not found.")
        if query_arg(request, "format") == "event":
            return 200, (await serialize_events(self.events, [ev], requester=req))[0]
        if ev.internal.get("redacted_by"):
            return 200, (await serialize_events(self.events, [ev], requester=req))[0]["content"]
        return 200, ev.content

    async def on_get_state(self, request: Request, room_id: str) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        state = await self._state_for_reader(room_id, req.user_id)
        evs = await self.events.get_events(state.values())
        ordered = sorted(evs.values(), key=lambda e: e.internal.get("stream_ordering", 0))
        return 200, await serialize_events(self.events, ordered, requester=req)

    async def on_members(self, request: Request, room_id: str) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        at = query_arg(request, "at")
        membership = query_arg(request, "membership")
        not_membership = query_arg(request, "not_membership")
        valid = ("join", "invite", "knock", "leave", "ban")
        for v in (membership, not_membership):
            if v is not None and v not in valid:
                raise invalid_param("Unknown membership filter")
        state = await self._state_for_reader(room_id, req.user_id)
        if at is not None:
            tok = StreamToken.decode(at)
            rows = await self.events.db.execute(
                "members_at", "SELECT event_id FROM events WHERE room_id = ? AND stream_ordering <= ?"
                " AND rejected_reason IS NULL ORDER BY stream_ordering DESC LIMIT 1", room_id, tok.events)
            if rows:
                state = await self.events.get_state_after_event(rows[0][0])
        ids = [eid for (t, _), eid in state.items() if t == "m.room.member"]
        evs = await self.events.get_events(ids)
        chosen = [
            e for e in evs.values()
            if (membership is None or e.membership == membership)
            and (not_membership is None or e.membership != not_membership)
        ]
        chosen.sort(key=lambda e: e.state_key or "")
        return 200, {"chunk": await serialize_events(self.events, chosen, requester=req)}

    async def on_joined_members(self, request: Request, room_id: str) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        membership, _ = await self._membership(room_id, req.user_id)
        if membership != "join":
            raise forbidden("You are not in this room")
        state = await self.events.get_current_state_ids(room_id)
        evs = await self.events.get_events(eid for (t, _), eid in state.items() if t == "m.room.member")
        joined: dict[str, Any] = {}
        for e in evs.values():
            if e.membership == "join" and e.state_key:
                entry: dict[str, Any] = {}
                if isinstance(e.content.get("displayname"), str):
                    entry["display_name"] = e.content["displayname"]
                if isinstance(e.content.get("avatar_url"), str):
                    entry["avatar_url"] = e.content["avatar_url"]
                joined[e.state_key] = entry
        return 200, {"joined": joined}

    async def on_joined_rooms(self, request: Request) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        rooms = await self.events.get_rooms_for_user(req.user_id)
        return 200, {"joined_rooms": sorted(r for r, (m, _) in rooms.items() if m == "join")}

    # -- redaction and reading -------------------------------------------------------
    async def on_redact(self, request: Request, room_id: str, event_id: str,
                        txn_id: Optional[str] = None) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        body = read_json_body(request, allow_empty=True)
        self.hs.ratelimit_message.check(req.user_id)
        reason = body.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise bad_json("'reason' must be a string")
        target = await self.events.get_event(event_id)
        if target is None:
            raise not_found("Event not found")
        if target.room_id != room_id:
            raise invalid_param("The event is not in this room")
        content = {"reason": reason} if reason is not None else {}

        async def may_redact(event: Event, state: dict[tuple[str, str], str]) -> None:
            keys = [("m.room.create", ""), ("m.room.power_levels", "")]
            evs = await self.events.get_events(state[k] for k in keys if k in state)
            auth_events = {k: evs[state[k]] for k in keys if k in state and state[k] in evs}
            if not auth_rules.can_redact(event.room_version, req.user_id, target.sender, auth_events):
                raise forbidden("You don't have permission to redact this event")

        ev = await self.hs.event_creator.send(room_id, "m.room.redaction", req.user_id, content, txn_id=txn_id,
                                              device_id=req.device_id, redacts=event_id, extra_check=may_redact)
        return 200, {"event_id": ev.event_id}

    async def _visible_event(self, room_id: str, event_id: str, user_id: str,
                             hidden_is_forbidden: bool = False) -> Event:
        """The event, if the user may see it. A hidden event is 404 as for
        GET /event (the spec's definition), or 403 where the endpoint
        answers a reader who may not see the room that way (/context)."""
        await self._require_known_room(room_id)
        ev = await self.events.get_event(event_id)
        if ev is None or ev.room_id != room_id or ev.rejected_reason:
            raise not_found("Event not found.")
        if not await self.hs.visibility.filter_events(user_id, [ev]):
            if hidden_is_forbidden:
                raise forbidden("You may not see this event")
            raise not_found("Event not found.")
        return ev

    async def on_get_event(self, request: Request, room_id: str, event_id: str) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        ev = await self._visible_event(room_id, event_id, req.user_id)
        return 200, (await serialize_events(self.events, [ev], requester=req))[0]

    async def on_context(self, request: Request, room_id: str, event_id: str) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        limit = min(max(query_int(request, "limit", 10) or 0, 0), 100)
        flt = EventFilter(parse_filter_param(query_arg(request, "filter")))
        ev = await self._visible_event(room_id, event_id, req.user_id, hidden_is_forbidden=True)
        so = ev.internal["stream_ordering"]
        before_n = limit // 2
        after_n = limit - before_n
        before = await self._page(room_id, req.user_id, so - 1, None, True, before_n, flt)
        after = await self._page(room_id, req.user_id, so, None, False, after_n, flt)
        state = await self.events.get_state_after_event(ev.event_id)
        if flt.lazy_load_members:
            # Lazy-loading members: only those who sent one of the events.
            senders = {e.sender for e in [*before, ev, *after]}
            state = {k: v for k, v in state.items() if k[0] != "m.room.member" or k[1] in senders}
        state_evs = await self.events.get_events(state.values())
        start_pos = (before[-1].internal["stream_ordering"] - 1) if before else so - 1
        end_pos = after[-1].internal["stream_ordering"] if after else so
        base = self.hs.notifier.current_token()
        return 200, {
            "event": (await serialize_events(self.events, [ev], requester=req))[0],
            "events_before": await serialize_events(self.events, before, requester=req),
            "events_after": await serialize_events(self.events, after, requester=req),
            "state": await serialize_events(self.events, list(state_evs.values())),
            "start": _token_at(base, start_pos),
            "end": _token_at(base, end_pos),
        }

    async def _page(self, room_id: str, user_id: str, pos: int, to: Optional[int], backwards: bool, limit: int,
                    flt: EventFilter) -> list[Event]:
        """Up to ``limit`` visible, filtered events from ``pos`` in one direction."""
        out: list[Event] = []
        cursor = pos
        # Each round fetches a batch; bounded so a room of hidden events ends.
        for _ in range(50):
            if len(out) >= limit:
                break
            batch_size = max(limit * 2, 50)
            if backwards:
                lower = to if to is not None else -(2**62)
                if cursor <= lower:
                    break
                batch = await self.events.get_room_events_between(room_id, lower, cursor, batch_size, True)
            else:
                upper = to if to is not None else self.hs.notifier.events_pos
                if cursor >= upper:
                    break
                batch = await self.events.get_room_events_between(room_id, cursor, upper, batch_size, False)
            if not batch:
                break
            cursor = batch[-1].internal["stream_ordering"] + (-1 if backwards else 0)
            visible = await self.hs.visibility.filter_events(user_id, [e for e in batch if flt.matches(e)])
            for e in visible:
                if len(out) >= limit:
                    break
                out.append(e)
            if len(out) >= limit:
                break
        return out

    async def on_messages(self, request: Request, room_id: str) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        direction = query_arg(request, "dir", "b")
        if direction not in ("b", "f"):
            raise invalid_param("'dir' must be 'b' or 'f'")
        limit = query_int(request, "limit", 10)
        if limit is None or limit < 0:
            raise invalid_param("'limit' must be a non-negative integer")
        limit = min(limit, MAX_PAGINATION_LIMIT)
        flt = EventFilter(parse_filter_param(query_arg(request, "filter")))
        if flt.limit:
            limit = min(limit, flt.limit)
        await self._require_known_room(room_id)
        membership, member_ev = await self._membership(room_id, req.user_id)
        world_readable = False
        if membership is None or membership in ("leave", "ban"):
            world_readable = await self.hs.visibility.is_world_readable(room_id)
        if membership is None and not world_readable:
            raise forbidden("You are not in this room")
        base = self.hs.notifier.current_token()
        from_raw = query_arg(request, "from")
        if from_raw is not None:
            pos = _decode_pos(from_raw)
        else:
            pos = base.events if direction == "b" else -(2**62)
        to_raw = query_arg(request, "to")
        to = _decode_pos(to_raw) if to_raw is not None else None
        if membership in ("leave", "ban") and member_ev is not None and direction == "b" and not world_readable:
            # Former members see history up to when they left.
            pos = min(pos, member_ev.internal.get("stream_ordering", pos))
        events = await self._page(room_id, req.user_id, pos, to, direction == "b", limit, flt)
        if direction == "b" and len(events) < limit and self.hs.federation_handler is not None:
            # We hold no more history: ask a server in the room for older events.
            start = events[-1].internal["stream_ordering"] - 1 if events else pos
            if await self.hs.federation_handler.backfill(room_id, max(limit - len(events), 10)):
                events += await self._page(room_id, req.user_id, start, to, True, limit - len(events), flt)
        out: dict[str, Any] = {"start": _token_at(base, pos),
                               "chunk": await serialize_events(self.events, events, requester=req)}
        if events:
            last = events[-1].internal["stream_ordering"]
            out["end"] = _token_at(base, last - 1 if direction == "b" else last)
        if flt.lazy_load_members and events:
            senders = {e.sender for e in events}
            state = await self.events.get_current_state_ids(room_id)
            mids = [state[("m.room.member", s)] for s in senders if ("m.room.member", s) in state]
            mevs = await self.events.get_events(mids)
            out["state"] = await serialize_events(self.events, list(mevs.values()))
        return 200, out

    # -- aliases and directory ------------------------------------------------------------
    async def on_room_aliases(self, request: Request, room_id: str) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        # Server admins see any room's local aliases (admin tools list them).
        if not req.is_admin:
            await self._state_for_reader(room_id, req.user_id)
        return 200, {"aliases": await self.hs.rooms.get_aliases_for_room(room_id)}

    def _check_local_alias(self, alias: str) -> None:
        if not is_valid_room_alias(alias):
            raise invalid_param("Invalid room alias")
        if server_of(alias) != self.hs.server_name:
            raise invalid_param("Room alias must be on this server")

    def _refuse_exclusive_alias(self, alias: str, app_service: Optional[str]) -> None:
        """Spec: application-service-api "Registration": an alias in a
        service's exclusive namespace is only for that service."""
        owner = self.hs.appservices.exclusive_alias_owner(alias) if self.hs.appservices else None
        if owner is not None and owner.id != app_service:
            raise MatrixError(400, "M_EXCLUSIVE", "This room alias is reserved by an application service")

    async def on_put_alias(self, request: Request, alias: str) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        body = read_json_body(request)
        self._check_local_alias(alias)
        self._refuse_exclusive_alias(alias, req.app_service)
        room_id = body.get("room_id")
        if not isinstance(room_id, str) or not room_id.startswith("!"):
            raise bad_json("'room_id' must be a room ID")
        if await self.hs.rooms.get_room_version(room_id) is None:
            raise not_found("Room not found")
        membership, _ = await self._membership(room_id, req.user_id)
        if membership != "join" and req.app_service is None:
            # A service manages aliases in its namespace for rooms it bridges,
            # joined or not.
            raise forbidden("You are not in this room")
        if not await self.hs.rooms.create_alias(alias, room_id, req.user_id):
            raise MatrixError(409, "M_UNKNOWN", "Room alias already exists")
        self.alias_changed(room_id)
        return 200, {}

    async def on_get_alias(self, request: Request, alias: str) -> tuple[int, Any]:
        if not is_valid_room_alias(alias):
            raise invalid_param("Invalid room alias")
        server = server_of(alias)
        if server != self.hs.server_name:
            # Spec: server-server-api "Query Types" (GET /query/directory).
            room_id, servers = await self._remote_alias(alias, server)
            return 200, {"room_id": room_id, "servers": list(dict.fromkeys(servers))}
        found = await self.local_alias(alias)
        if found is None:
            raise not_found("Room alias not found")
        return 200, {"room_id": found[0], "servers": [self.hs.server_name]}

    async def on_delete_alias(self, request: Request, alias: str) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        self._check_local_alias(alias)
        found = await self.hs.rooms.get_alias(alias)
        if found is None:
            raise not_found("Room alias not found")
        room_id, creator = found
        service = self.hs.appservices.by_id(req.app_service) if req.app_service else None
        own_namespace = service is not None and service.is_interested_in_alias(alias)
        if creator != req.user_id and not req.is_admin and not own_namespace:
            state = await self.events.get_current_state_ids(room_id)
            keys = [("m.room.create", ""), ("m.room.power_levels", "")]
            evs = await self.events.get_events(state[k] for k in keys if k in state)
            ae = {k: evs[state[k]] for k in keys if k in state and state[k] in evs}
            level = auth_rules.get_user_power_level(req.user_id, ae)
            if level < auth_rules.get_required_level("m.room.canonical_alias", True, ae):
                raise forbidden("You may not delete this alias")
        await self.hs.rooms.delete_alias(alias)
        self.alias_changed(room_id)
        await self._drop_from_canonical_alias(room_id, alias, req.user_id)
        return 200, {}

    async def _drop_from_canonical_alias(self, room_id: str, alias: str, user_id: str) -> None:
        """A deleted alias leaves the room's m.room.canonical_alias (as its
        alias or one of its alt_aliases), so clients stop showing it."""
        eid = await self.events.get_current_state_event_id(room_id, "m.room.canonical_alias", "")
        ev = await self.events.get_event(eid) if eid else None
        if ev is None:
            return
        content = dict(ev.content)
        alt = content.get("alt_aliases")
        changed = False
        if content.get("alias") == alias:
            del content["alias"]
            changed = True
        if isinstance(alt, list) and alias in alt:
            content["alt_aliases"] = [a for a in alt if a != alias]
            changed = True
        if not changed:
            return
        try:
            await self.hs.event_creator.send(room_id, "m.room.canonical_alias", user_id, content, state_key="")
        except MatrixError:
            # The alias is gone either way; the deleter may lack the power to
            # change the state event, which then names an alias that no
            # longer resolves (clients check).
            pass

    async def on_get_visibility(self, request: Request, room_id: str) -> tuple[int, Any]:
        if await self.hs.rooms.get_room_version(room_id) is None:
            raise not_found("Room not found")
        return 200, {"visibility": "public" if await self.hs.rooms.is_public(room_id) else "private"}

    async def on_put_visibility(self, request: Request, room_id: str) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        body = read_json_body(request, allow_empty=True)
        vis = body.get("visibility", "public")
        if vis not in ("public", "private"):
            raise invalid_param("'visibility' must be 'public' or 'private'")
        if await self.hs.rooms.get_room_version(room_id) is None:
            raise not_found("Room not found")
        state = await self.events.get_current_state_ids(room_id)
        keys = [("m.room.create", ""), ("m.room.power_levels", "")]
        evs = await self.events.get_events(state[k] for k in keys if k in state)
        ae = {k: evs[state[k]] for k in keys if k in state and state[k] in evs}
        membership, _ = await self._membership(room_id, req.user_id)
        if not req.is_admin and (membership != "join" or auth_rules.get_user_power_level(req.user_id, ae)
                                 < auth_rules.get_required_level("m.room.canonical_alias", True, ae)):
            raise forbidden("You may not change this room's visibility")
        await self.hs.rooms.set_public(room_id, vis == "public")
        return 200, {}

    async def on_public_rooms_get(self, request: Request) -> tuple[int, Any]:
        limit = query_int(request, "limit")
        since = query_arg(request, "since")
        server = query_arg(request, "server")
        return 200, await self._public_rooms(limit, since, None, server)

    async def on_public_rooms_post(self, request: Request) -> tuple[int, Any]:
        await self.hs.auth.get_user_by_req(request)
        body = read_json_body(request, allow_empty=True)
        limit = body.get("limit")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)):
            raise bad_json("'limit' must be an integer")
        since = body.get("since")
        if since is not None and not isinstance(since, str):
            raise bad_json("'since' must be a string")
        flt = body.get("filter") or {}
        if not isinstance(flt, dict):
            raise bad_json("'filter' must be an object")
        term = flt.get("generic_search_term")
        if term is not None and not isinstance(term, str):
            raise bad_json("'generic_search_term' must be a string")
        # Spec: "Application service room directories": the main list by
        # default, one network's with third_party_instance_id, all with
        # include_all_networks.
        instance = body.get("third_party_instance_id")
        if instance is not None and not isinstance(instance, str):
            raise bad_json("'third_party_instance_id' must be a string")
        all_networks = body.get("include_all_networks", False)
        if not isinstance(all_networks, bool):
            raise bad_json("'include_all_networks' must be a boolean")
        room_ids: Optional[list[str]] = None
        room_list = getattr(self.hs, "appservice_room_list", None)
        if instance is not None:
            room_ids = await room_list.room_ids(instance) if room_list is not None else []
        elif all_networks and room_list is not None:
            room_ids = sorted(set(await self.hs.rooms.get_public_room_ids()) | set(await room_list.room_ids(None)))
        return 200, await self._public_rooms(limit, since, term, query_arg(request, "server"), room_ids)

    async def _public_rooms(self, limit: Optional[int], since: Optional[str], term: Optional[str],
                            server: Optional[str], room_ids: Optional[list[str]] = None) -> dict[str, Any]:
        if server is not None and server != self.hs.server_name:
            return await self._remote_public_rooms(server, limit, since, term)
        offset = 0
        if since:
            try:
                offset = int(since.lstrip("o"))
            except ValueError:
                raise invalid_param("Invalid 'since' token")
        rooms = []
        if room_ids is None:
            room_ids = await self.hs.rooms.get_public_room_ids()
        for room_id in room_ids:
            entry = await self.room_summary(room_id)
            if term:
                hay = " ".join(str(entry.get(k, "")) for k in ("name", "topic", "canonical_alias")).lower()
                if term.lower() not in hay:
                    continue
            rooms.append(entry)
        rooms.sort(key=lambda e: (-e["num_joined_members"], e["room_id"]))
        total = len(rooms)
        if limit is not None and limit >= 0:
            page = rooms[offset: offset + limit]
        else:
            page = rooms[offset:]
        out: dict[str, Any] = {"chunk": page, "total_room_count_estimate": total}
        if offset + len(page) < total:
            out["next_batch"] = f"o{offset + len(page)}"
        if offset > 0:
            out["prev_batch"] = f"o{max(0, offset - (limit or 0))}"
        return out

    async def _remote_public_rooms(self, server: str, limit: Optional[int], since: Optional[str],
                                   term: Optional[str]) -> dict[str, Any]:
        """Spec: server-server-api "Public Room Directory" (GET/POST /publicRooms)."""
        client = self.hs.federation_client
        if client is None:
            raise not_found("Remote room directories need federation")
        from zhome.federation.transport import FederationDenied, FederationError, FederationHttpError

        path = "/_matrix/federation/v1/publicRooms"
        try:
            if term is not None:
                body: dict[str, Any] = {"filter": {"generic_search_term": term}}
                if limit is not None:
                    body["limit"] = limit
                if since is not None:
                    body["since"] = since
                resp = await client.post_json(server, path, body)
            else:
                query: dict[str, Any] = {}
                if limit is not None:
                    query["limit"] = str(limit)
                if since is not None:
                    query["since"] = since
                resp = await client.get_json(server, path, query=query)
        except FederationHttpError as e:
            raise MatrixError(502, "M_UNKNOWN", f"{server} answered {e.status} to the room directory request")
        except FederationDenied:
            raise forbidden(f"Federation with {server} is not allowed")
        except FederationError as e:
            raise MatrixError(502, "M_UNKNOWN", f"Could not reach {server}: {type(e).__name__}")
        chunk = resp.get("chunk") if isinstance(resp, dict) else None
        if not isinstance(chunk, list):
            raise MatrixError(502, "M_UNKNOWN", f"{server} sent a bad room directory")
        out: dict[str, Any] = {"chunk": [r for r in chunk if isinstance(r, dict) and isinstance(r.get("room_id"), str)]}
        for k in ("next_batch", "prev_batch"):
            if isinstance(resp.get(k), str):
                out[k] = resp[k]
        if isinstance(resp.get("total_room_count_estimate"), int):
            out["total_room_count_estimate"] = resp["total_room_count_estimate"]
        return out

    async def room_summary(self, room_id: str) -> dict[str, Any]:
        state = await self.events.get_current_state_ids(room_id)
        wanted = {k: v for k, v in state.items() if k[0] in (
            "m.room.name", "m.room.topic", "m.room.canonical_alias", "m.room.avatar", "m.room.join_rules",
            "m.room.history_visibility", "m.room.guest_access", "m.room.create") and k[1] == ""}
        evs = await self.events.get_events(wanted.values())
        c = {k[0]: evs[v].content for k, v in wanted.items() if v in evs}
        joined = len(await self.events.get_joined_users(room_id))
        entry: dict[str, Any] = {
            "room_id": room_id,
            "num_joined_members": joined,
            "world_readable": c.get("m.room.history_visibility", {}).get("history_visibility") == "world_readable",
            "guest_can_join": c.get("m.room.guest_access", {}).get("guest_access") == "can_join",
            "join_rule": c.get("m.room.join_rules", {}).get("join_rule", "invite"),
        }
        for key, etype, field in (("name", "m.room.name", "name"), ("topic", "m.room.topic", "topic"),
                                  ("canonical_alias", "m.room.canonical_alias", "alias"),
                                  ("avatar_url", "m.room.avatar", "url")):
            v = c.get(etype, {}).get(field)
            if isinstance(v, str) and v:
                entry[key] = v
        rtype = c.get("m.room.create", {}).get("type")
        if isinstance(rtype, str):
            entry["room_type"] = rtype
        return entry


def _decode_pos(raw: str) -> int:
    if raw.startswith("s"):
        return StreamToken.decode(raw).events
    raise invalid_param(f"Invalid pagination token {raw!r}")


def _token_at(base: StreamToken, events_pos: int) -> str:
    return base.with_events(events_pos).encode()
