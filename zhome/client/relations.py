"""The relations API, the threads list and the checks on new relations.

Spec: client-server-api "Relationships API"
(``GET /_matrix/client/v1/rooms/{roomId}/relations/{eventId}[/{relType}[/{eventType}]]``:
``from``, ``to``, ``limit``, ``dir`` (default ``b``), ``recurse``,
``next_batch``/``prev_batch``, ``recursion_depth``), "Querying threads in a
room" (``GET /_matrix/client/v1/rooms/{roomId}/threads``: ``include``,
``from``, ``limit``), "Validation of m.thread relationships", "Avoiding
duplicate annotations".

Tokens are those of /messages (``s<events position>_...``): a /messages
``start`` or a /sync ``next_batch`` is a valid ``from``. As in /messages,
a position means "between that event and the next": backwards from it
gives events at or before it, forwards the events after it. Children are
ordered by their position (the order /messages serves the room in).

Events the user may not see (history visibility, as /messages filters
them) and events of users they ignore are left out; a parent event they
may not see is 404 (as GET /event answers), an unknown room 403. The
threads list answers 403 to whom /messages would; it is ordered by each
thread's latest reply, and a root sent by an ignored user comes redacted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from twisted.web.server import Request

from zhome.client.serialize import serialize_events
from zhome.http.errors import MatrixError, forbidden, invalid_param, not_found
from zhome.http.server import JsonResource, query_arg, query_int
from zhome.rooms.events import Event, StateMap
from zhome.rooms.redaction import prune_event_dict
from zhome.storage.events import EventsStore
from zhome.storage.relations import ANNOTATION, MAX_RECURSION, THREAD, RelationsStore, relation_of, served_relation
from zhome.sync.notifier import StreamToken

if TYPE_CHECKING:
    from zhome.server import HomeServer

V1 = r"/_matrix/client/v1"
ROOM = r"(?P<room_id>(?:!|%21)[^/]+)"
DEFAULT_RELATIONS_LIMIT = 5
DEFAULT_THREADS_LIMIT = 5
MAX_RELATIONS_LIMIT = 1000
MAX_THREADS_LIMIT = 100
#: Rounds of reading the index per request: hidden events cannot keep a
#: request going for ever.
MAX_ROUNDS = 50
LOWEST = -(2**62)


def _decode_pos(raw: str) -> int:
    if raw.startswith("s"):
        return StreamToken.decode(raw).events
    raise invalid_param(f"Invalid pagination token {raw!r}")


class RelationServlets:
    def __init__(self, hs: "HomeServer") -> None:
        self.hs = hs
        self.events = hs.events
        self.relations: RelationsStore = hs.relations

    def register_routes(self, r: JsonResource) -> None:
        r.register("GET", V1 + "/rooms/" + ROOM + r"/relations/(?P<event_id>[^/]+)"
                   r"(?:/(?P<rel_type>[^/]+)(?:/(?P<event_type>[^/]+))?)?", self.on_relations, "relations")
        r.register("GET", V1 + "/rooms/" + ROOM + r"/threads", self.on_threads, "threads")

    # -- helpers -----------------------------------------------------------------------------
    async def _require_known_room(self, room_id: str) -> None:
        if await self.hs.rooms.get_room_version(room_id) is None:
            raise forbidden("You are not in this room")

    async def _usable(self, user_id: str, ids: list[str], room_id: str, ignored: frozenset[str]) -> list[Event]:
        """The events of ``ids`` (in that order) that are in the room's
        timeline, not sent by someone the user ignores, and visible to them."""
        evs = await self.events.get_events(ids)
        cands = [evs[i] for i in ids if i in evs and evs[i].room_id == room_id and not evs[i].rejected_reason
                 and not evs[i].internal.get("outlier") and not evs[i].internal.get("soft_failed")
                 and evs[i].sender not in ignored]
        return await self.hs.visibility.filter_events(user_id, cands)

    def _token(self, pos: int) -> str:
        return self.hs.notifier.current_token().with_events(pos).encode()

    # -- GET /rooms/{roomId}/relations/{eventId}[/{relType}[/{eventType}]] ---------------------
    async def on_relations(self, request: Request, room_id: str, event_id: str, rel_type: Optional[str] = None,
                           event_type: Optional[str] = None) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        direction = query_arg(request, "dir", "b")
        if direction not in ("b", "f"):
            raise invalid_param("'dir' must be 'b' or 'f'")
        backwards = direction == "b"
        limit = query_int(request, "limit", DEFAULT_RELATIONS_LIMIT)
        if limit is None or limit < 0:
            raise invalid_param("'limit' must be a non-negative integer")
        limit = min(limit, MAX_RELATIONS_LIMIT)
        recurse = query_arg(request, "recurse")
        if recurse not in (None, "true", "false"):
            raise invalid_param("'recurse' must be 'true' or 'false'")
        depth = MAX_RECURSION if recurse == "true" else 1
        from_raw = query_arg(request, "from")
        to_raw = query_arg(request, "to")
        now = self.hs.notifier.events_pos
        pos = _decode_pos(from_raw) if from_raw is not None else (now if backwards else LOWEST)
        to = _decode_pos(to_raw) if to_raw is not None else None

        await self._require_known_room(room_id)
        parent = await self.events.get_event(event_id)
        if parent is None or parent.room_id != room_id or parent.rejected_reason or parent.internal.get("outlier"):
            raise not_found("Event not found.")
        if not await self.hs.visibility.filter_events(req.user_id, [parent]):
            raise not_found("Event not found.")
        ignored = await self.hs.user_data.get_ignored_users(req.user_id)

        out_events: list[Event] = []
        cursor = pos
        more = False
        for _ in range(MAX_ROUNDS):
            if backwards:
                after, upto = (to if to is not None else LOWEST), cursor
            else:
                after, upto = cursor, (to if to is not None else now)
            if after >= upto or len(out_events) > limit:
                break
            want = limit + 1 - len(out_events)
            batch = await self.relations.children(room_id, event_id, rel_type, event_type, after, upto, backwards,
                                                  max(want * 2, 20), depth)
            if not batch:
                break
            cursor = batch[-1][1] - 1 if backwards else batch[-1][1]
            out_events += (await self._usable(req.user_id, [e for e, _ in batch], room_id, ignored))[:want]
            if len(batch) < max(want * 2, 20):
                break
        if len(out_events) > limit:
            more = True
            out_events = out_events[:limit]
        body: dict[str, Any] = {"chunk": await serialize_events(self.events, out_events, requester=req)}
        if more and out_events:
            last = out_events[-1].internal["stream_ordering"]
            body["next_batch"] = self._token(last - 1 if backwards else last)
        elif more:
            body["next_batch"] = self._token(pos)  # limit=0: nothing read
        if from_raw is not None:
            body["prev_batch"] = from_raw
        if recurse is not None:
            body["recursion_depth"] = depth
        return 200, body

    # -- GET /rooms/{roomId}/threads ---------------------------------------------------------------
    async def on_threads(self, request: Request, room_id: str) -> tuple[int, Any]:
        req = await self.hs.auth.get_user_by_req(request)
        include = query_arg(request, "include", "all")
        if include not in ("all", "participated"):
            raise invalid_param("'include' must be 'all' or 'participated'")
        limit = query_int(request, "limit", DEFAULT_THREADS_LIMIT)
        if limit is None or limit < 1:
            raise invalid_param("'limit' must be an integer greater than zero")
        limit = min(limit, MAX_THREADS_LIMIT)
        from_raw = query_arg(request, "from")
        pos = _decode_pos(from_raw) if from_raw is not None else self.hs.notifier.events_pos

        await self._require_known_room(room_id)
        member_id = await self.events.get_current_state_event_id(room_id, "m.room.member", req.user_id)
        member = await self.events.get_event(member_id) if member_id else None
        if member is None and not await self.hs.visibility.is_world_readable(room_id):
            raise forbidden("You are not in this room")
        ignored = await self.hs.user_data.get_ignored_users(req.user_id)
        participant = req.user_id if include == "participated" else None

        roots: list[tuple[Event, int]] = []
        cursor = pos
        for _ in range(MAX_ROUNDS):
            want = limit + 1 - len(roots)
            if want <= 0:
                break
            batch = await self.relations.threads(room_id, cursor, max(want * 2, 10), participant)
            if not batch:
                break
            cursor = batch[-1][1] - 1
            latest = dict(batch)
            # The root of an ignored user is served redacted, not left out.
            visible = await self._usable(req.user_id, [e for e, _ in batch], room_id, frozenset())
            # Only an event without a relation starts a thread.
            roots += [(ev, latest[ev.event_id]) for ev in visible if served_relation(ev) is None][:want]
            if len(batch) < max(want * 2, 10):
                break
        more = len(roots) > limit
        roots = roots[:limit]
        served = [_redacted_view(ev) if ev.sender in ignored else ev for ev, _ in roots]
        body: dict[str, Any] = {"chunk": await serialize_events(self.events, served, requester=req)}
        if more:
            body["next_batch"] = self._token(roots[-1][1] - 1)
        return 200, body


def _redacted_view(ev: Event) -> Event:
    view = Event(prune_event_dict(ev.room_version, ev.pdu), ev.event_id, ev.room_version)
    view.internal.update(ev.internal)
    return view


class RelationChecks:
    """Checks on every new local event with a relation (a pre-send check
    of the event creator): a thread cannot start from an event that has a
    relation itself (400 M_UNKNOWN, as the spec asks), and a user cannot
    annotate an event twice with the same type and key
    (400 M_DUPLICATE_ANNOTATION) unless the first was redacted."""

    def __init__(self, events: EventsStore, relations: RelationsStore) -> None:
        self.events = events
        self.relations = relations

    async def __call__(self, event: Event, state: StateMap) -> None:
        rel = relation_of(event.content)
        if rel is None or event.is_state():
            return
        rel_type, parent = rel
        if rel_type == THREAD:
            if await self.relations.relation_type_of(parent) is not None:
                raise MatrixError(400, "M_UNKNOWN", "Cannot start a thread from an event with a relation")
        elif rel_type == ANNOTATION:
            key = event.content["m.relates_to"].get("key")
            if not isinstance(key, str):
                return
            same = await self.relations.relations_by(event.room_id, parent, ANNOTATION, event.sender, event.type)
            for other in (await self.events.get_events(same)).values():
                rel_other = other.content.get("m.relates_to")
                if not other.internal.get("redacted_by") and isinstance(rel_other, dict) \
                        and rel_other.get("key") == key:
                    raise MatrixError(400, "M_DUPLICATE_ANNOTATION", "You already sent this annotation")
