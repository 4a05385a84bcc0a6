"""The homeserver's rule for people who take part by email (zhome/bridges/email).

The bridge can only mail what it can read, and it does not hold room keys:
an email participant (a ghost user in the bridge's exclusive namespace) in
an end-to-end encrypted room would get none of its messages while the room
looks as if they take part. So an invite or a join of a ghost into a room
whose state has ``m.room.encryption`` is refused with 403 ``M_FORBIDDEN``
and a message saying why, to the inviter at the moment they invite (a
pre-send check, so it holds for every path that sends a membership: the
client API, the bridge's own joins, third-party invites claimed by a ghost).

A room that turns encryption on later keeps its email participants; the
bridge tells the room and them (zhome/bridges/email/bridge.py).
"""

from __future__ import annotations

import re
from typing import Any, Awaitable, Callable

from zhome.http.errors import MatrixError

ENCRYPTION = ("m.room.encryption", "")

Check = Callable[[Any, dict[tuple[str, str], str]], Awaitable[None]]


def ghost_pattern(ghost_prefix: str, server_name: str) -> "re.Pattern[str]":
    return re.compile("@" + re.escape(ghost_prefix) + r"[^:]*:" + re.escape(server_name) + r"\Z")


def encrypted_room_guard(ghost_prefix: str, server_name: str, events: Any) -> Check:
    ghosts = ghost_pattern(ghost_prefix, server_name)

    async def check(event: Any, state: dict[tuple[str, str], str]) -> None:
        if event.type != "m.room.member" or event.membership not in ("invite", "join"):
            return
        target = event.state_key
        if not isinstance(target, str) or not ghosts.match(target) or ENCRYPTION not in state:
            return
        if event.membership == "join":
            # Someone already in (the room turned encryption on later) may
            # still change their profile.
            current = state.get(("m.room.member", target))
            ev = await events.get_event(current) if current else None
            if ev is not None and ev.membership == "join":
                return
        raise MatrixError(403, "M_FORBIDDEN",
                          f"{target} takes part by email and cannot read end-to-end encrypted messages, and "
                          "this room is encrypted. Invite them to a room without encryption, or ask them to "
                          "create an account.")

    return check
