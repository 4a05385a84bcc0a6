"""Who may look at a room from outside it, and the summary they see.

Spec: client-server-api "Room summaries" (GET /room_summary) and "Spaces"
(the rooms GET /hierarchy lists), server-server-api "Spaces" (what
GET /federation/v1/hierarchy tells another server). One rule for all of
them:

- anyone may see a room whose join rule is public, knock or
  knock_restricted, or whose history is world_readable;
- a user also sees it when joined, invited or knocking, and a restricted
  room when joined to one of the rooms its join rule allows;
- another server sees it when one of its users is joined or invited, and
  a restricted room when one of its users is joined to an allowed room
  (that server then decides for its own user, from ``allowed_room_ids``).

Everyone else must not learn that the room exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional

from zhome.rooms.events import StateMap
from zhome.storage.events import EventsStore
from zhome.util.ids import server_of

OPEN_JOIN_RULES = ("public", "knock", "knock_restricted")
_FACT_TYPES = ("m.room.create", "m.room.join_rules", "m.room.history_visibility", "m.room.encryption")


@dataclass(frozen=True)
class RoomFacts:
    """What deciding on and summarising a room needs, from its current state."""

    room_id: str
    state: StateMap
    join_rule: str
    world_readable: bool
    allowed_rooms: list[str]
    room_version: str
    room_type: Optional[str]
    encryption: Optional[str]

    @property
    def open(self) -> bool:
        """Visible to anyone (no membership needed)."""
        return self.join_rule in OPEN_JOIN_RULES or self.world_readable


def allowed_rooms_of(join_rules: dict[str, Any]) -> list[str]:
    """The room IDs a restricted join rule lets members of join from."""
    if join_rules.get("join_rule") not in ("restricted", "knock_restricted"):
        return []
    allow = join_rules.get("allow")
    if not isinstance(allow, list):
        return []
    return [a["room_id"] for a in allow if isinstance(a, dict) and a.get("type") == "m.room_membership"
            and isinstance(a.get("room_id"), str)]


def summary_visible(summary: dict[str, Any], membership: Optional[str], joined_rooms: set[str]) -> bool:
    """The same rule for a room known only from its summary (another
    server's answer): ``membership`` is the user's as known here,
    ``joined_rooms`` the rooms the user is joined to."""
    if summary.get("join_rule") in OPEN_JOIN_RULES or summary.get("world_readable") is True:
        return True
    if membership in ("join", "invite", "knock"):
        return True
    allowed = summary.get("allowed_room_ids")
    return (summary.get("join_rule") == "restricted" and isinstance(allowed, list)
            and any(isinstance(r, str) and r in joined_rooms for r in allowed))


class RoomPreviews:
    def __init__(self, events: EventsStore, public_entry: Callable[[str], Awaitable[dict[str, Any]]]) -> None:
        """``public_entry`` gives a room's entry as the public room directory
        lists it (name, topic, alias, avatar, join rule, counts, type)."""
        self.events = events
        self.public_entry = public_entry

    async def facts(self, room_id: str) -> Optional[RoomFacts]:
        """None when this server has no state of the room."""
        state = await self.events.get_current_state_ids(room_id)
        if ("m.room.create", "") not in state:
            return None
        wanted = {t: state[(t, "")] for t in _FACT_TYPES if (t, "") in state}
        evs = await self.events.get_events(wanted.values())
        content = {t: evs[eid].content for t, eid in wanted.items() if eid in evs}
        join_rules = content.get("m.room.join_rules", {})
        join_rule = join_rules.get("join_rule", "invite")
        create = content.get("m.room.create", {})
        version = create.get("room_version", "1")
        room_type = create.get("type")
        algorithm = content.get("m.room.encryption", {}).get("algorithm")
        return RoomFacts(
            room_id=room_id, state=state, join_rule=join_rule if isinstance(join_rule, str) else "invite",
            world_readable=content.get("m.room.history_visibility", {}).get("history_visibility") == "world_readable",
            allowed_rooms=allowed_rooms_of(join_rules), room_version=version if isinstance(version, str) else "1",
            room_type=room_type if isinstance(room_type, str) else None,
            encryption=algorithm if isinstance(algorithm, str) else None)

    async def membership(self, facts: RoomFacts, user_id: str) -> Optional[str]:
        member_id = facts.state.get(("m.room.member", user_id))
        member = await self.events.get_event(member_id) if member_id else None
        return member.membership if member is not None else None

    async def visible_to_user(self, facts: RoomFacts, user_id: Optional[str]) -> tuple[bool, Optional[str]]:
        """(whether ``user_id``, None for an anonymous caller, may see the
        room; their membership in it)."""
        membership = await self.membership(facts, user_id) if user_id is not None else None
        if facts.open or membership in ("join", "invite", "knock"):
            return True, membership
        if user_id is not None and facts.join_rule == "restricted" and facts.allowed_rooms:
            mine = await self.events.get_rooms_for_user(user_id)
            if any(r in mine and mine[r][0] == "join" for r in facts.allowed_rooms):
                return True, membership
        return False, membership

    async def visible_to_server(self, facts: RoomFacts, server: str) -> bool:
        if facts.open:
            return True
        ids = [eid for (t, sk), eid in facts.state.items() if t == "m.room.member" and server_of(sk) == server]
        evs = await self.events.get_events(ids)
        if any(e.membership in ("join", "invite") for e in evs.values()):
            return True
        if facts.join_rule != "restricted":
            return False
        for allowed in facts.allowed_rooms:
            if any(server_of(u) == server for u in await self.events.get_joined_users(allowed)):
                return True
        return False

    async def summary(self, facts: RoomFacts) -> dict[str, Any]:
        """The room summary (spec: room_summary.yaml) without a user's membership."""
        out = await self.public_entry(facts.room_id)
        out["room_version"] = facts.room_version
        if facts.encryption is not None:
            out["encryption"] = facts.encryption
        if facts.allowed_rooms:
            out["allowed_room_ids"] = facts.allowed_rooms
        return out
