"""Membership changes: join, invite, leave, kick, ban, unban, knock.

Spec: client-server-api "Room membership"; the auth rules decide what is
allowed, this module builds the member event a client asked for.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable, Optional

from zhome.http.errors import MatrixError, forbidden, not_found
from zhome.rooms.event_creation import EventCreator
from zhome.rooms.events import Event, StateMap
from zhome.rooms.guest_access import GUEST_ACCESS, guests_can_join
from zhome.rooms.restricted import AUTHORISED_VIA, JoinNotAuthorised, RestrictedJoins
from zhome.storage.accounts import AccountsStore
from zhome.storage.events import EventsStore
from zhome.util.ids import server_of

logger = logging.getLogger(__name__)

STRIPPED_STATE_TYPES = (
    "m.room.create", "m.room.join_rules", "m.room.canonical_alias", "m.room.avatar", "m.room.name",
    "m.room.encryption", "m.room.topic",
)


class _NoLocalAuthoriser(Exception):
    """A restricted join the user may make, but no local user can vouch for."""


class MembershipService:
    def __init__(self, server_name: str, creator: EventCreator, events: EventsStore, accounts: AccountsStore) -> None:
        self.server_name = server_name
        self.creator = creator
        self.events = events
        self.accounts = accounts
        self.restricted = RestrictedJoins(server_name, events)
        # The federation handler, when federation is enabled.
        self.federation: Any = None
        #: async room_id -> bool: whether an admin blocked the room (no local joins).
        self.room_blocked: Any = None
        #: (user_id, server) -> bool: whether that user's data may go to that server.
        self.may_transfer: Any = None
        #: async (inviter, invitee): raises unless the (local) invitee accepts invites from the inviter.
        self.may_invite: Any = None
        #: async (user_id, room_id) run after a local user joined a room
        #: (locally or through another server); a failing one is logged.
        self.after_join: list[Callable[[str, str], Awaitable[None]]] = []

    def is_mine(self, user_id: str) -> bool:
        return user_id.endswith(":" + self.server_name)

    async def check_invite(self, sender: str, target: str) -> None:
        """403 unless local ``target`` accepts invites from ``sender`` (their invite permissions)."""
        if self.may_invite is not None and self.is_mine(target):
            await self.may_invite(sender, target)

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
        via: Optional[list[str]] = None,
    ) -> Event:
        """Send ``membership`` for ``target`` as ``sender`` (see ``_update``);
        a local user's own new join then runs the ``after_join`` hooks."""
        joining = (membership == "join" and sender == target and self.is_mine(target) and bool(self.after_join)
                   and await self.current_membership(room_id, target) != "join")
        ev = await self._update(sender, target, room_id, membership, reason, extra, txn_id, device_id, via)
        if joining:
            for hook in self.after_join:
                try:
                    await hook(target, room_id)
                except Exception:
                    logger.exception("a hook after %s joined %s failed", target, room_id)
        return ev

    async def _update(
        self,
        sender: str,
        target: str,
        room_id: str,
        membership: str,
        reason: Optional[str] = None,
        extra: Optional[dict[str, Any]] = None,
        txn_id: Optional[str] = None,
        device_id: Optional[str] = None,
        via: Optional[list[str]] = None,
    ) -> Event:
        content: dict[str, Any] = {"membership": membership}
        if membership in ("join", "invite", "knock"):
            content.update(await self._profile_content(target))
        if extra:
            for k, v in extra.items():
                if k not in ("membership",):
                    content[k] = v
        # Who vouches for a restricted join is the resident server's choice
        # (its make_join template, or this server's own below), never the
        # client's: it names a user whose server must sign the event.
        content.pop(AUTHORISED_VIA, None)
        if reason is not None:
            if not isinstance(reason, str):
                raise MatrixError(400, "M_BAD_JSON", "'reason' must be a string")
            content["reason"] = reason
        if (membership == "invite" and self.is_mine(target) and self.room_blocked is not None
                and await self.room_blocked(room_id)):
            raise forbidden("This room has been blocked on this server")
        if membership == "invite":
            await self.check_invite(sender, target)
        if (membership in ("join", "knock") and sender == target and self.is_mine(target)
                and self.room_blocked is not None and await self.room_blocked(room_id)
                and await self.current_membership(room_id, target) != "join"):
            raise forbidden("This room has been blocked on this server")
        # Spec "Guest Access": a guest joins only rooms that are can_join.
        guest_join = (membership == "join" and sender == target and self.is_mine(target)
                      and await self.accounts.is_guest(target))
        if sender == target and membership in ("join", "knock", "leave") and not await self.host_in_room(room_id):
            # This server has no usable copy of the room: go through a
            # server that is in it.
            if self.federation is None:
                raise not_found("Room not found on this server")
            servers = list(via or []) + await self._servers_to_try(room_id, target)
            if membership != "leave":
                self._check_transfer(target, servers)
            if membership == "leave":
                return await self.federation.remote_leave(target, room_id, servers)
            extra_content = {k: v for k, v in content.items() if k not in ("membership",)}
            return await self.federation.remote_join(target, room_id, servers, membership, extra_content,
                                                     guest=guest_join)
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
        if membership == "join" and sender == target and self.is_mine(target):
            try:
                authoriser = await self._local_authoriser(room_id, target)
            except _NoLocalAuthoriser:
                # The user may join, but none of this server's users in the
                # room may invite: another server in the room may vouch.
                servers = ([s for s in dict.fromkeys(list(via or []) + await self._servers_to_try(room_id, target))
                            if s != self.server_name] if self.federation is not None else [])
                if not servers:
                    raise forbidden("You may join this room, but no user in it may invite you")
                self._check_transfer(target, servers)
                extra_content = {k: v for k, v in content.items() if k not in ("membership",)}
                return await self.federation.join_through_resident(target, room_id, servers, extra_content)
            if authoriser is not None:
                content[AUTHORISED_VIA] = authoriser
        countersign = None
        if membership == "invite" and not self.is_mine(target):
            if self.federation is None:
                raise forbidden("Federation is not enabled on this server")
            countersign = self._countersign_invite
        return await self.creator.send(
            room_id, "m.room.member", sender, content, state_key=target, txn_id=txn_id, device_id=device_id,
            transform=countersign, extra_check=self._check_guest_may_join if guest_join else None,
        )

    async def _local_authoriser(self, room_id: str, user_id: str) -> Optional[str]:
        """The local user who authorises ``user_id``'s join to a restricted
        room (None when the join needs none); 403 when the user may not
        join, ``_NoLocalAuthoriser`` when they may but nobody here can vouch."""
        rv = await self.creator.room_version_of(room_id)
        state = await self.events.get_current_state_ids(room_id)
        try:
            return await self.restricted.authoriser_for(rv, state, user_id)
        except JoinNotAuthorised as e:
            if e.no_authoriser:
                raise _NoLocalAuthoriser()
            raise forbidden("You are not invited, and not a member of any room whose members may join this room")

    def _check_transfer(self, user_id: str, servers: list[str]) -> None:
        """403 when ``user_id``'s do-not-transfer setting refuses one of ``servers``."""
        if self.may_transfer is None:
            return
        refused = sorted({s for s in servers if not self.may_transfer(user_id, s)})
        if refused:
            raise MatrixError(403, "M_FORBIDDEN", "Your data may not be transferred to "
                              + ", ".join(refused) + " (your do-not-transfer setting)", servers=refused)

    async def _check_guest_may_join(self, event: Event, state: StateMap) -> None:
        # Checked against the state the join is built on, under the room
        # lock: a withdrawal cannot slip in between check and join.
        await self.check_guests_may_join(state)

    async def check_guests_may_join(self, state: StateMap) -> None:
        """403 unless ``state`` lets guests join."""
        eid = state.get((GUEST_ACCESS, ""))
        ev = await self.events.get_event(eid) if eid else None
        if not guests_can_join(ev.content if ev is not None else None):
            raise forbidden("Guest access is not allowed in this room")

    async def _countersign_invite(self, ev: Event, state: dict[tuple[str, str], str]) -> Event:
        assert self.federation is not None
        return await self.federation.send_invite(ev, await self.room_state_pdus(state))

    async def stripped_state(self, state: dict[tuple[str, str], str]) -> list[dict[str, Any]]:
        """The state an invitee may see before joining (spec: stripped state)."""
        keys = [(t, "") for t in STRIPPED_STATE_TYPES]
        evs = await self.events.get_events(state[k] for k in keys if k in state)
        return [{"type": e.type, "state_key": e.state_key, "content": e.content, "sender": e.sender}
                for e in evs.values()]

    async def room_state_pdus(self, state: dict[tuple[str, str], str]) -> list[dict[str, Any]]:
        """``invite_room_state``/``knock_room_state`` over federation.

        Since spec v1.16 these are full PDUs in the room version's format
        (the create event among them), not stripped events: the receiving
        server checks their signatures (Synapse refuses stripped ones for
        room version 12).
        """
        keys = [(t, "") for t in STRIPPED_STATE_TYPES]
        evs = await self.events.get_events(state[k] for k in keys if k in state)
        return [{k: v for k, v in e.pdu.items() if k != "unsigned"} for e in evs.values()]

    async def host_in_room(self, room_id: str) -> bool:
        """Whether this server holds the room's current state (a local member is in it)."""
        if await self.creator.rooms.get_room_version(room_id) is None:
            return False
        if not await self.events.get_forward_extremities(room_id):
            return False
        joined = await self.events.get_joined_users(room_id)
        if any(self.is_mine(u) for u in joined):
            return True
        # A room created here that every local user left is still ours to
        # rejoin unless other servers carried it on.
        return not any(not self.is_mine(u) for u in joined)

    async def _servers_to_try(self, room_id: str, user_id: str) -> list[str]:
        servers: list[str] = []
        eid = await self.events.get_current_state_event_id(room_id, "m.room.member", user_id)
        ev = await self.events.get_event(eid) if eid else None
        if ev is not None and ev.sender != user_id:
            servers.append(server_of(ev.sender))
        for u in await self.events.get_joined_users(room_id):
            servers.append(server_of(u))
        if ":" in room_id:
            servers.append(server_of(room_id))
        return [s for s in dict.fromkeys(servers) if s != self.server_name]
