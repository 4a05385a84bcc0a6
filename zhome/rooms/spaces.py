"""The space hierarchy: GET /_matrix/client/v1/rooms/{roomId}/hierarchy and
GET /_matrix/federation/v1/hierarchy/{roomId}.

Spec: client-server-api "Spaces" ("Discovering rooms within spaces",
space_hierarchy.yaml) and server-server-api "Spaces".

The walk starts at the requested room and goes depth first, as the spec
says: a space's children in the spec's order (``order`` keys first, then
the ``m.space.child`` event's ``origin_server_ts``, then room ID), each
space's children right after it. Only ``m.space.child`` events with a
non-empty ``via`` link (with ``suggested_only``: only those marked
``suggested``), and only rooms of type ``m.space`` have children. A room
is listed when the user may see it (zhome/rooms/previews.py) and is not
banned from it; a room the user may not see is left out together with
everything below it. A room seen twice (a loop, or a room in two spaces)
is listed once.

Rooms this server is not in are asked of the ``via`` servers of the link
that led to them (``/federation/v1/hierarchy``); an answer also describes
the room's children, which are then taken from it rather than asked
again, and its ``inaccessible_children`` are not asked for at all. Answers
are kept for a minute (failures for half of one), so that paging does not
ask again. Local data always wins over another server's.

Paging: ``next_batch`` is an opaque token naming the start room, the
filters and how many rooms were listed before; the next page walks again
and skips those (a tree that changes between two pages may shift a room
from one page to the next). A token used with other filters is refused
(400 M_INVALID_PARAM), as the spec asks. Each walk is bounded: at most
``MAX_WALK`` rooms visited, ``MAX_REMOTE_REQUESTS`` requests to other
servers within ``REMOTE_BUDGET_S`` seconds, ``MAX_DEPTH`` levels deep.

The federation answer lists the room and its children that this server is
in and the requesting server may see; children it may not see are named
in ``inaccessible_children``, children this server does not know are left
out.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional

from zhome.http.errors import forbidden, invalid_param, not_found
from zhome.rooms.events import Event
from zhome.rooms.previews import RoomFacts, RoomPreviews, summary_visible
from zhome.storage.events import EventsStore
from zhome.util.ids import server_of

logger = logging.getLogger(__name__)

DEFAULT_LIMIT = 50
MAX_LIMIT = 100
MAX_DEPTH = 20
MAX_WALK = 500
MAX_REMOTE_REQUESTS = 20
MAX_CHILDREN = 1000
MAX_VIA_TRIED = 3
REMOTE_TTL_S = 60.0
REMOTE_FAILURE_TTL_S = 30.0
REMOTE_CACHE_SIZE = 1000
# Seconds a walk may spend asking other servers (each request has its own timeout too).
REMOTE_BUDGET_S = 20.0
REMOTE_TIMEOUT_S = 10.0

# Fetch a room's hierarchy from a server: (server, room ID, suggested_only) -> the answer.
RemoteFetch = Callable[[str, str, bool], Awaitable[Any]]

_SUMMARY_STR = ("room_id", "name", "topic", "canonical_alias", "avatar_url", "join_rule", "room_type",
                "encryption", "room_version")
_SUMMARY_BOOL = ("world_readable", "guest_can_join")


@dataclass
class _Child:
    room_id: str
    via: list[str]


@dataclass
class _Walk:
    """One walk's view of other servers' answers."""

    user_id: str
    suggested_only: bool
    remote: dict[str, dict[str, Any]] = field(default_factory=dict)
    inaccessible: set[str] = field(default_factory=set)
    requests: int = 0
    memberships: Optional[dict[str, tuple[str, str]]] = None
    #: After this (time.monotonic()) no other server is asked.
    deadline: float = 0.0


class SpaceHierarchy:
    def __init__(self, server_name: str, events: EventsStore, previews: RoomPreviews,
                 host_in_room: Callable[[str], Awaitable[bool]], fetch: Optional[RemoteFetch],
                 room_allows: Optional[Callable[[str, str], Awaitable[bool]]] = None) -> None:
        """``fetch`` is None without federation; ``room_allows(server,
        room_id)``: whether the room's ACL and residency policy let that
        server read it."""
        self.server_name = server_name
        self.events = events
        self.previews = previews
        self.host_in_room = host_in_room
        self.fetch = fetch
        self.room_allows = room_allows
        self._cache: OrderedDict[tuple[str, bool], tuple[float, Optional[dict[str, Any]]]] = OrderedDict()

    # -- the client API --------------------------------------------------------------
    async def hierarchy(self, user_id: str, room_id: str, suggested_only: bool, max_depth: Optional[int],
                        limit: Optional[int], from_token: Optional[str]) -> dict[str, Any]:
        if limit is None:
            limit = DEFAULT_LIMIT
        if limit <= 0:
            raise invalid_param("'limit' must be greater than zero")
        limit = min(limit, MAX_LIMIT)
        if max_depth is not None and max_depth < 0:
            raise invalid_param("'max_depth' must not be negative")
        depth_cap = MAX_DEPTH if max_depth is None else min(max_depth, MAX_DEPTH)
        skip = 0
        if from_token is not None:
            skip = _decode_token(from_token, room_id, suggested_only, max_depth)

        walk = _Walk(user_id, suggested_only, deadline=time.monotonic() + REMOTE_BUDGET_S)
        stack: list[tuple[str, int, list[str]]] = [(room_id, 0, _servers_of_id(room_id))]
        seen: set[str] = set()
        rooms: list[dict[str, Any]] = []
        listed = 0
        while stack and len(rooms) < limit and len(seen) < MAX_WALK:
            rid, depth, via = stack.pop()
            if rid in seen:
                continue
            seen.add(rid)
            got = await self._room(walk, rid, via, fetch_children=depth < depth_cap)
            if got is None:
                if depth == 0:
                    raise forbidden("You may not view this room")
                continue
            entry, children = got
            if listed >= skip:
                rooms.append(entry)
            listed += 1
            if depth < depth_cap:
                for child in reversed(children):
                    if child.room_id not in seen:
                        stack.append((child.room_id, depth + 1, child.via))
        out: dict[str, Any] = {"rooms": rooms}
        if any(rid not in seen for rid, _, _ in stack) and len(seen) < MAX_WALK:
            out["next_batch"] = _encode_token(room_id, suggested_only, max_depth, listed)
        return out

    async def _room(self, walk: _Walk, room_id: str, via: list[str],
                    fetch_children: bool) -> Optional[tuple[dict[str, Any], list[_Child]]]:
        """(the room's entry, its children) as the user may see them; None
        when the room is unknown or hidden from the user."""
        if await self.host_in_room(room_id):
            facts = await self.previews.facts(room_id)
            if facts is None:
                return None
            visible, membership = await self.previews.visible_to_user(facts, walk.user_id)
            if not visible or membership == "ban":
                # Spec: a banned user may not view the room.
                return None
            entry, children = await self._local_entry(facts, walk.suggested_only)
            return entry, children
        if room_id in walk.inaccessible:
            return None
        summary = walk.remote.get(room_id)
        needs_answer = summary is None or (fetch_children and summary.get("room_type") == "m.space"
                                           and "children_state" not in summary)
        if needs_answer:
            answered = await self._ask(walk, room_id, via)
            if answered is not None:
                summary = answered
        if summary is None:
            return None
        if walk.memberships is None:
            walk.memberships = await self.events.get_rooms_for_user(walk.user_id)
        mine = walk.memberships
        membership = mine[room_id][0] if room_id in mine else None
        joined = {r for r, (m, _) in mine.items() if m == "join"}
        if not summary_visible(summary, membership, joined):
            return None
        children_state = summary.get("children_state") or []
        entry = dict(summary, children_state=children_state)
        return entry, _children_of(children_state, walk.suggested_only) if summary.get("room_type") == "m.space" \
            else []

    async def _local_entry(self, facts: RoomFacts, suggested_only: bool) -> tuple[dict[str, Any], list[_Child]]:
        entry = await self.previews.summary(facts)
        children_state: list[dict[str, Any]] = []
        if facts.room_type == "m.space":
            ids = [eid for (t, _), eid in facts.state.items() if t == "m.space.child"][:MAX_CHILDREN]
            evs = await self.events.get_events(ids)
            children_state = _ordered([_stripped_child(e) for e in evs.values()
                                       if e.state_key and _links(e.content, suggested_only)])
        entry["children_state"] = children_state
        return entry, _children_of(children_state, suggested_only)

    async def _ask(self, walk: _Walk, room_id: str, via: list[str]) -> Optional[dict[str, Any]]:
        """Another server's answer for ``room_id``: its summary is returned,
        its children's summaries and inaccessible children kept in ``walk``."""
        answer = await self._remote_answer(walk, room_id, via)
        if answer is None:
            return None
        room = _clean_summary(answer.get("room"))
        if room is None or room["room_id"] != room_id:
            return None
        for child in answer.get("children") or []:
            summary = _clean_summary(child)
            if summary is not None and summary["room_id"] not in walk.remote:
                walk.remote[summary["room_id"]] = summary
        walk.inaccessible.update(r for r in answer.get("inaccessible_children") or [] if isinstance(r, str))
        walk.remote[room_id] = room
        return room

    async def _remote_answer(self, walk: _Walk, room_id: str, via: list[str]) -> Optional[dict[str, Any]]:
        if self.fetch is None:
            return None
        key = (room_id, walk.suggested_only)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        servers = [s for s in dict.fromkeys(via) if isinstance(s, str) and s != self.server_name][:MAX_VIA_TRIED]
        answer: Optional[dict[str, Any]] = None
        for server in servers:
            if walk.requests >= MAX_REMOTE_REQUESTS or time.monotonic() > walk.deadline:
                return None
            walk.requests += 1
            try:
                got = await self.fetch(server, room_id, walk.suggested_only)
            except Exception as e:
                logger.info("space hierarchy: %s did not answer for %s: %s", server, room_id, type(e).__name__)
                continue
            if isinstance(got, dict) and isinstance(got.get("room"), dict):
                answer = got
                break
        self._cache[key] = (now + (REMOTE_TTL_S if answer is not None else REMOTE_FAILURE_TTL_S), answer)
        self._cache.move_to_end(key)
        while len(self._cache) > REMOTE_CACHE_SIZE:
            self._cache.popitem(last=False)
        return answer

    # -- the federation API ------------------------------------------------------------
    async def federation_hierarchy(self, origin: str, room_id: str, suggested_only: bool) -> dict[str, Any]:
        facts = await self.previews.facts(room_id) if await self.host_in_room(room_id) else None
        if facts is None or not await self._server_may_see(origin, facts):
            raise not_found("Room not found")
        room, children = await self._local_entry(facts, suggested_only)
        out_children: list[dict[str, Any]] = []
        inaccessible: list[str] = []
        for child in children:
            if not await self.host_in_room(child.room_id):
                continue
            child_facts = await self.previews.facts(child.room_id)
            if child_facts is None:
                continue
            if await self._server_may_see(origin, child_facts):
                out_children.append((await self._local_entry(child_facts, suggested_only))[0])
            else:
                inaccessible.append(child.room_id)
        return {"room": room, "children": out_children, "inaccessible_children": inaccessible}

    async def _server_may_see(self, origin: str, facts: RoomFacts) -> bool:
        if self.room_allows is not None and not await self.room_allows(origin, facts.room_id):
            return False
        return await self.previews.visible_to_server(facts, origin)


def _links(content: dict[str, Any], suggested_only: bool) -> bool:
    via = content.get("via")
    if not isinstance(via, list) or not any(isinstance(s, str) and s for s in via):
        return False
    return not suggested_only or content.get("suggested") is True


def _valid_order(content: dict[str, Any]) -> Optional[str]:
    order = content.get("order")
    if isinstance(order, str) and len(order) <= 50 and all("\x20" <= c <= "\x7e" for c in order):
        return order
    return None


def _ordered(children_state: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Spec "Ordering of children within a space": valid ``order`` keys
    first (by code point), then the event's ``origin_server_ts``, then the
    room ID."""
    def key(ev: dict[str, Any]) -> tuple[int, str, int, str]:
        order = _valid_order(ev["content"])
        return (0 if order is not None else 1, order or "", ev["origin_server_ts"], ev["state_key"])

    return sorted(children_state, key=key)


def _stripped_child(e: Event) -> dict[str, Any]:
    return {"type": e.type, "state_key": e.state_key, "content": e.content, "sender": e.sender,
            "origin_server_ts": e.origin_server_ts}


def _children_of(children_state: list[Any], suggested_only: bool) -> list[_Child]:
    out: list[_Child] = []
    for ev in children_state:
        if not isinstance(ev, dict) or ev.get("type") != "m.space.child":
            continue
        room_id, content = ev.get("state_key"), ev.get("content")
        if not isinstance(room_id, str) or not room_id.startswith("!") or not isinstance(content, dict):
            continue
        if _links(content, suggested_only):
            out.append(_Child(room_id, [s for s in content["via"] if isinstance(s, str) and s]))
    return out[:MAX_CHILDREN]


def _clean_summary(raw: Any) -> Optional[dict[str, Any]]:
    """A room summary from another server, with only well-typed fields."""
    if not isinstance(raw, dict) or not isinstance(raw.get("room_id"), str) or not raw["room_id"].startswith("!"):
        return None
    out: dict[str, Any] = {}
    for k in _SUMMARY_STR:
        if isinstance(raw.get(k), str):
            out[k] = raw[k]
    for k in _SUMMARY_BOOL:
        out[k] = raw.get(k) is True
    members = raw.get("num_joined_members")
    out["num_joined_members"] = members if isinstance(members, int) and not isinstance(members, bool) \
        and members >= 0 else 0
    allowed = raw.get("allowed_room_ids")
    if isinstance(allowed, list):
        out["allowed_room_ids"] = [r for r in allowed if isinstance(r, str) and r.startswith("!")]
    if out.get("encryption") not in (None, "m.megolm.v1.aes-sha2"):
        del out["encryption"]
    children = raw.get("children_state")
    if isinstance(children, list):
        out["children_state"] = _ordered([
            {"type": "m.space.child", "state_key": ev["state_key"], "content": ev["content"],
             "sender": ev["sender"], "origin_server_ts": ev["origin_server_ts"]}
            for ev in children[:MAX_CHILDREN]
            if isinstance(ev, dict) and ev.get("type") == "m.space.child" and isinstance(ev.get("state_key"), str)
            and isinstance(ev.get("content"), dict) and isinstance(ev.get("sender"), str)
            and isinstance(ev.get("origin_server_ts"), int) and not isinstance(ev.get("origin_server_ts"), bool)])
    return out


def _servers_of_id(room_id: str) -> list[str]:
    """The server named in a room ID (before room version 12), to ask when
    this server does not know the room."""
    return [server_of(room_id)] if ":" in room_id else []


def _encode_token(room_id: str, suggested_only: bool, max_depth: Optional[int], listed: int) -> str:
    raw = json.dumps({"r": room_id, "s": suggested_only, "d": max_depth, "n": listed}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_token(token: str, room_id: str, suggested_only: bool, max_depth: Optional[int]) -> int:
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, TypeError):
        raise invalid_param("Unknown 'from' token")
    if not isinstance(data, dict) or not isinstance(data.get("n"), int) or data["n"] < 0 or data.get("r") != room_id:
        raise invalid_param("Unknown 'from' token")
    if data.get("s") != suggested_only or data.get("d") != max_depth:
        raise invalid_param("suggested_only and max_depth cannot change on paginated requests")
    return int(data["n"])
