"""Who vouches for a join to a restricted room.

Spec: client-server-api "Restricted rooms" (join rules ``restricted`` and
``knock_restricted``), server-server-api "Restricted rooms" (under
"Joining Rooms": the resident server names one of its users in
``join_authorised_via_users_server`` and signs the join), rooms v8/v9/v10
auth rules (the named user must be joined and able to invite).

A join needs an authorising user when the room's version has the join
rule, the rule is ``restricted`` or ``knock_restricted``, and the joiner is
neither joined nor invited already. This server can vouch only with its
own users, and only from what it knows: the joiner's membership of one of
the ``allow`` rooms (``m.room_membership``) as this server sees it, which
it trusts only for rooms it is in itself.
"""

from __future__ import annotations

from typing import Mapping, Optional

from zhome.rooms import auth
from zhome.rooms.events import Event, StateMap
from zhome.rooms.previews import allowed_rooms_of
from zhome.rooms.versions import RoomVersion
from zhome.storage.events import EventsStore
from zhome.util.ids import server_of

AUTHORISED_VIA = "join_authorised_via_users_server"

#: Why a join could not be authorised (server-server-api make_join/send_join).
CANNOT_TELL = "M_UNABLE_TO_AUTHORISE_JOIN"  # 400: in none of the allowed rooms
NOT_GRANTED = "M_UNABLE_TO_GRANT_JOIN"  # 400: allowed, but nobody here may invite
NOT_ALLOWED = "M_FORBIDDEN"  # 403: this server sees the user in none of them


class JoinNotAuthorised(Exception):
    """The join needs an authorising user and this server cannot give one.

    ``errcode`` and ``status`` are the resident server's answer: the two
    400s tell the joining server to try another resident server, the 403
    that the user may not join.
    """

    def __init__(self, errcode: str, msg: str) -> None:
        super().__init__(msg)
        self.errcode = errcode
        self.msg = msg
        self.status = 403 if errcode == NOT_ALLOWED else 400

    @property
    def no_authoriser(self) -> bool:
        """The joiner may join, but no user of this server can vouch for it."""
        return self.errcode == NOT_GRANTED


def is_restricted(rv: RoomVersion, join_rules: Optional[Event]) -> bool:
    """Whether the join rule, in this room version, asks for an authorising user."""
    rule = join_rules.content.get("join_rule") if join_rules is not None else None
    return (rule == "restricted" and rv.restricted_join_rule) or (
        rule == "knock_restricted" and rv.knock_restricted_join_rule)


def choose_authoriser(state: Mapping[tuple[str, str], Event], server_name: str,
                      exclude: str = "") -> Optional[str]:
    """A user of ``server_name`` joined in ``state`` who may invite, or None.

    ``state`` holds the create and power levels events and the member
    events to choose from. The most powerful candidate is chosen (a room
    admin is the least likely to lose the power before the join lands),
    then the smallest user ID, so the choice is stable.
    """
    invite_level = auth.get_named_level("invite", state)
    best: Optional[tuple[float, str]] = None
    for (etype, user_id), ev in state.items():
        if etype != auth.MEMBER or ev.membership != "join" or user_id == exclude:
            continue
        if server_of(user_id) != server_name:
            continue
        level = auth.get_user_power_level(user_id, state)
        if level < invite_level:
            continue
        if best is None or (-level, user_id) < (-best[0], best[1]):
            best = (level, user_id)
    return best[1] if best is not None else None


class RestrictedJoins:
    def __init__(self, server_name: str, events: EventsStore) -> None:
        self.server_name = server_name
        self.events = events

    async def _event(self, state: StateMap, key: tuple[str, str]) -> Optional[Event]:
        eid = state.get(key)
        return await self.events.get_event(eid) if eid else None

    async def needs_authoriser(self, rv: RoomVersion, state: StateMap, user_id: str) -> bool:
        """Whether ``user_id``'s join on ``state`` needs an authorising user."""
        if not is_restricted(rv, await self._event(state, (auth.JOIN_RULES, ""))):
            return False
        member = await self._event(state, (auth.MEMBER, user_id))
        return member is None or member.membership not in ("join", "invite")

    async def may_join_via_allowed_room(self, state: StateMap, user_id: str) -> None:
        """Raise ``JoinNotAuthorised`` unless this server sees ``user_id``
        joined to one of the rooms the join rule allows."""
        join_rules = await self._event(state, (auth.JOIN_RULES, ""))
        allowed = allowed_rooms_of(join_rules.content) if join_rules is not None else []
        known = False
        for room_id in dict.fromkeys(allowed):
            joined = await self.events.get_joined_users(room_id)
            if user_id in joined:
                return
            # Another server's user may be out of date here unless this
            # server takes part in the room.
            if any(server_of(u) == self.server_name for u in joined):
                known = True
        if not known:
            raise JoinNotAuthorised(CANNOT_TELL, "This server is in none of the rooms whose members may join")
        raise JoinNotAuthorised(NOT_ALLOWED, f"{user_id} is not joined to any of the rooms whose members may join")

    async def authoriser_for(self, rv: RoomVersion, state: StateMap, user_id: str) -> Optional[str]:
        """The user of this server to name in ``user_id``'s join built on
        ``state``; None when the join needs none. Raises ``JoinNotAuthorised``."""
        if not await self.needs_authoriser(rv, state, user_id):
            return None
        await self.may_join_via_allowed_room(state, user_id)
        keys = [k for k in state if k[0] == auth.MEMBER and server_of(k[1]) == self.server_name and k[1] != user_id]
        keys += [(auth.CREATE, ""), (auth.POWER_LEVELS, "")]
        wanted = {k: state[k] for k in keys if k in state}
        evs = await self.events.get_events(wanted.values())
        loaded = {k: evs[eid] for k, eid in wanted.items() if eid in evs}
        chosen = choose_authoriser(loaded, self.server_name, exclude=user_id)
        if chosen is None:
            raise JoinNotAuthorised(NOT_GRANTED, "No user of this server in the room may invite")
        return chosen
