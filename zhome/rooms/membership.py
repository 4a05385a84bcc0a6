"""Membership changes: join, invite, leave, kick, ban, unban, knock.

Spec: client-server-api "Room membership"; the auth rules decide what is
allowed, this module builds the member event a client asked for.
"""

from __future__ import annotations

from typing import Any, Optional

from zhome.http.errors import MatrixError, forbidden, not_found
from zhome.rooms.event_creation import EventCreator
from zhome.rooms.events import Event
from zhome.storage.accounts import AccountsStore
from zhome.storage.events import EventsStore


class MembershipService:
    def __init__(self, server_name: str, creator: EventCreator, events: EventsStore, accounts: AccountsStore) -> None:
        self.server_name = server_name
        self.creator = creator
        self.events = events
        self.accounts = accounts
        # Set by federation when it exists: joins of rooms not known here.
        self.remote_join: Any = None

    def is_mine(self, user_id: str) -> bool:
        return user_id.endswith(":" + self.server_name)

    async def current_membership(self, room_id: str, user_id: str) -> Optional[str]:
        eid = await self.events.get_current_state_event_id(room_id, "m.room.member", user_id)
        if eid is None:
            return None
        ev = await self.events.get_event(eid)
        return ev.membership if ev else None

    async def _profile_content(self, user_id: str) -> dict[str, Any]:
        if not self.is_mine(user_id):
            return {}
        p = await self.accounts.get_profile(user_id)
        out: dict[str, Any] = {}
        if p:
            if p.get("displayname") is not None:
                out["displayname"] = p["displayname"]
            if p.get("avatar_url") is not None:
                out["avatar_url"] = p["avatar_url"]
        return out

    async def update(
        self,
        sender: str,
        target: str,
        room_id: str,
        membership: str,
        reason: Optional[str] = None,
        extra: Optional[dict[str, Any]] = None,
        txn_id: Optional[str] = None,
        device_id: Optional[str] = None,
    ) -> Event:
        known = await self.creator.rooms.get_room_version(room_id)
        if known is None:
            if membership in ("join", "knock") and self.remote_join is not None:
                return await self.remote_join(sender, room_id, membership, reason, extra)
            raise not_found("Room not found on this server")
        content: dict[str, Any] = {"membership": membership}
        if membership in ("join", "invite", "knock"):
            content.update(await self._profile_content(target))
        if extra:
            for k, v in extra.items():
                if k not in ("membership",):
                    content[k] = v
        if reason is not None:
            if not isinstance(reason, str):
                raise MatrixError(400, "M_BAD_JSON", "'reason' must be a string")
            content["reason"] = reason
        if membership == "join":
            current = await self.current_membership(room_id, target)
            if current == "join":
                # Re-joining is a no-op unless the profile changed; the spec
                # allows returning the existing membership.
                eid = await self.events.get_current_state_event_id(room_id, "m.room.member", target)
                ev = await self.events.get_event(eid) if eid else None
                if ev is not None and all(ev.content.get(k) == content.get(k) for k in ("displayname", "avatar_url")):
                    return ev
        if membership == "invite":
            current = await self.current_membership(room_id, target)
            if current == "join":
                raise forbidden(f"{target} is already in the room.")
            if current == "ban":
                raise forbidden(f"{target} is banned from the room")
        return await self.creator.send(
            room_id, "m.room.member", sender, content, state_key=target, txn_id=txn_id, device_id=device_id
        )
