"""Room upgrades (``POST /rooms/{roomId}/upgrade``).

Spec: client-server-api "Room Upgrades", server behaviour. Upgrading a room
the user may send ``m.room.tombstone`` in (at the old room's power levels;
403 otherwise) to a version this server knows (400
M_UNSUPPORTED_ROOM_VERSION otherwise):

1. A replacement room is made through the same path as ``createRoom``
   (zhome/rooms/room_creation.py ``start_room``): its create event names
   the old room as ``predecessor`` and keeps the old room's ``type`` and
   ``m.federate``. Up to version 11 the new room's ID is chosen first and
   the tombstone (5) sent before the room is made, so that the
   predecessor's ``event_id`` is the tombstone, the old room's last event;
   in version 12 the room ID is the create event's hash, which cannot
   name a tombstone that names the room, so ``event_id`` is the old room's
   latest event before the upgrade and the tombstone comes after. In version 12 the upgrading user and
   ``additional_creators`` (as given in the request: the old room's extra
   creators are not carried over, as the spec says) are its creators;
   other versions ignore ``additional_creators``.
2. Power levels are carried over, normalised for the new version (levels
   as integers, v12 creators left out of ``users``). In a room whose
   creators have no infinite power the upgrading user is first raised to
   the highest level in the old power levels (at least 100) so that it can
   send every copied event, and the old power levels are restored last. A
   v12 room's creators who are no creators of the new room are given 100
   in ``users`` there, the top level a creator has in earlier versions,
   so nobody loses their admin rights by an upgrade.
3. State copied (the spec's list, plus what a space or a room in one
   needs): join rules, history visibility, guest access, encryption,
   server ACL, name, topic, avatar, related groups, ``m.space.child`` and
   ``m.space.parent`` events that still link (non-empty ``via``), the
   canonical alias (only the aliases that moved with it, see 4), and the
   bans (as the upgrading user: a banned user must not walk into the new
   room). Pinned events are not copied: they name events of the old room,
   which the new room does not have. Membership is not copied (nobody can
   join on another user's behalf); invites follow, see 6.
4. The old room's local aliases move to the new room; its canonical alias
   is cleared (if the user may), and a room published in the room
   directory is replaced there by the new one.
5. ``m.room.tombstone`` (``body``, ``replacement_room``) goes into the old
   room; then the old room's ``events_default`` and ``invite`` are raised
   to the greater of 50 and ``users_default + 1`` where lower, so that
   ordinary members can no longer talk or invite there ("if possible":
   skipped when the user may not change the power levels).
6. Invites (the spec leaves this open): when the new room's join rule is
   not ``public``, the members of the old room who are users of this
   server and joined are invited, so that following the tombstone works
   for them; members on other servers are not (an invite over federation
   per member would hold the request on every remote server), they need an
   invite from someone in the new room, or a join rule that lets them in.

When a local user joins a room that replaces another (its predecessor's
tombstone names it), the user's push rules, tags and direct-chat entry for
the old room are copied to the new one, and aliases and the room directory
entry this server still has for the old room move (so a server that did not
make the upgrade follows it as its users do); a tombstone naming its own
room is refused (400).

Upgrades of one room run one after the other; a request repeated while the
first is running (same user, same parameters) waits for it and gets the
same replacement room.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Awaitable, Callable, Optional

from twisted.internet import defer

from zhome.http.errors import MatrixError, bad_json, forbidden, invalid_param, not_found
from zhome.rooms import auth as auth_rules
from zhome.rooms.event_creation import EventCreator
from zhome.rooms.events import Event
from zhome.rooms.membership import MembershipService
from zhome.rooms.room_creation import RoomCreationService, default_power_levels
from zhome.rooms.versions import KNOWN_ROOM_VERSIONS, RoomVersion, get_room_version
from zhome.storage.events import EventsStore
from zhome.storage.rooms import RoomsStore
from zhome.util.ids import is_valid_user_id, server_of

logger = logging.getLogger(__name__)

# State copied as it is (state key ""), in the order it is sent.
COPIED_STATE = (
    "m.room.join_rules",
    "m.room.history_visibility",
    "m.room.guest_access",
    "m.room.encryption",
    "m.room.server_acl",
    "m.room.name",
    "m.room.topic",
    "m.room.avatar",
    "m.room.related_groups",
)
# Copied for every state key when the link still holds (non-empty "via").
SPACE_LINKS = ("m.space.child", "m.space.parent")
TOMBSTONE_BODY = "This room has been replaced"
MAX_COPIED_BANS = 1000
MAX_SPACE_LINKS = 1000
_NAMED_LEVELS = ("ban", "events_default", "invite", "kick", "redact", "state_default", "users_default", "historical")


class RoomUpgradeService:
    def __init__(self, server_name: str, creator: EventCreator, membership: MembershipService,
                 room_creation: RoomCreationService, rooms: RoomsStore, events: EventsStore) -> None:
        self.server_name = server_name
        self.creator = creator
        self.membership = membership
        self.room_creation = room_creation
        self.rooms = rooms
        self.events = events
        #: called with (old room ID, new room ID) after aliases moved
        #: (application services are told which rooms' aliases changed).
        self.aliases_moved: list[Callable[[str, str], Any]] = []
        self._running: dict[tuple[str, str, str, tuple[str, ...]], list[defer.Deferred[str]]] = {}
        self._locks: dict[str, defer.DeferredLock] = {}
        #: async (user_id, old room, new room): copy the user's own settings
        #: for the old room (push rules, tags, direct chats) to the new one.
        self.copy_user_settings: Optional[Callable[[str, str, str], Awaitable[None]]] = None

    async def upgrade(self, user_id: str, room_id: str, body: dict[str, Any]) -> str:
        """Upgrade ``room_id`` as ``body`` (``new_version``, optional
        ``additional_creators``) asks; returns the replacement room's ID."""
        new_version = body.get("new_version")
        if not isinstance(new_version, str):
            raise bad_json("'new_version' must be a string")
        if new_version not in KNOWN_ROOM_VERSIONS:
            raise MatrixError(400, "M_UNSUPPORTED_ROOM_VERSION", f"Room version {new_version!r} is not supported")
        new_rv = get_room_version(new_version)
        extra_creators: list[str] = []
        if new_rv.hydra and "additional_creators" in body:
            given = body["additional_creators"]
            if not isinstance(given, list) or not all(isinstance(u, str) for u in given):
                raise bad_json("'additional_creators' must be a list of user IDs")
            if not all(is_valid_user_id(u) for u in given):
                raise invalid_param("'additional_creators' must be a list of user IDs")
            extra_creators = sorted(set(given) - {user_id})
        key = (room_id, user_id, new_version, tuple(extra_creators))
        waiting = self._running.get(key)
        if waiting is not None:
            # The same request again (a client retrying): the same answer.
            d: defer.Deferred[str] = defer.Deferred()
            waiting.append(d)
            return await d
        self._running[key] = []
        try:
            lock = self._locks.setdefault(room_id, defer.DeferredLock())
            await lock.acquire()
            try:
                new_room = await self._upgrade(user_id, room_id, new_rv, extra_creators)
            finally:
                lock.release()
                if not lock.locked and not lock.waiting:
                    self._locks.pop(room_id, None)
        except Exception as e:
            for d in self._running.pop(key, []):
                d.errback(e)
            raise
        for d in self._running.pop(key, []):
            d.callback(new_room)
        return new_room

    async def _upgrade(self, user_id: str, old_room: str, new_rv: RoomVersion, extra_creators: list[str]) -> str:
        old_version = await self.rooms.get_room_version(old_room)
        if old_version is None:
            raise not_found("Unknown room")
        if not await self.membership.host_in_room(old_room):
            raise forbidden("You are not in this room")
        state = await self.events.get_current_state_ids(old_room)
        if await self.membership.current_membership(old_room, user_id) != "join":
            raise forbidden("You are not in this room")
        keys = [k for k in state if k[1] == "" and (k[0] in COPIED_STATE or k[0] in (
            "m.room.create", "m.room.power_levels", "m.room.canonical_alias"))]
        links = [k for k in state if k[0] in SPACE_LINKS][:MAX_SPACE_LINKS]
        evs = await self.events.get_events(state[k] for k in keys + links)
        old: dict[str, Event] = {k[0]: evs[state[k]] for k in keys if state[k] in evs}
        create = old.get("m.room.create")
        if create is None:
            raise forbidden("You are not in this room")
        auth_events = {(t, ""): e for t, e in old.items() if t in ("m.room.create", "m.room.power_levels")}
        level = auth_rules.get_user_power_level(user_id, auth_events)
        if level < auth_rules.get_required_level("m.room.tombstone", True, auth_events):
            raise forbidden("You may not upgrade this room")

        # 1. The replacement room.
        creation: dict[str, Any] = {"room_version": new_rv.identifier,
                                    "predecessor": {"room_id": old_room}}
        new_room_id: Optional[str] = None
        if new_rv.hydra:
            # The room ID is the create event's hash, so the create event
            # cannot name a tombstone that names the room: it names the old
            # room's latest event, and the tombstone follows.
            latest = await self._latest_event(old_room)
            if latest is not None:
                creation["predecessor"]["event_id"] = latest
        else:
            # The room ID is ours to choose: the tombstone goes first and is
            # the predecessor's last event.
            new_room_id = await self.room_creation.unused_room_id()
            tombstone = await self.creator.send(old_room, "m.room.tombstone", user_id,
                                                {"body": TOMBSTONE_BODY, "replacement_room": new_room_id},
                                                state_key="")
            creation["predecessor"]["event_id"] = tombstone.event_id
        for key in ("type", "m.federate"):
            if key in create.content:
                creation[key] = create.content[key]
        if not new_rv.implicit_room_creator:
            creation["creator"] = user_id
        if new_rv.hydra and extra_creators:
            creation["additional_creators"] = extra_creators
        new_creators = {user_id} | set(extra_creators) if new_rv.hydra else set()
        old_pl = old.get("m.room.power_levels")
        if old_pl is not None:
            pl = normalised_power_levels(old_pl.content)
        else:
            pl = default_power_levels(user_id, "private_chat", [], new_rv.hydra, new_creators)
        old_creators = auth_rules.creators_of(create)
        if create.room_version.hydra:
            users = pl.setdefault("users", {})
            for c in sorted(old_creators - new_creators):
                users[c] = max(100, users.get(c, 0))
        if new_rv.hydra:
            pl["users"] = {u: v for u, v in pl.get("users", {}).items() if u not in new_creators}
        new_room = await self.room_creation.start_room(new_rv, user_id, creation, room_id=new_room_id)
        send = self.creator.send

        # 2. Power levels, the upgrading user raised while it copies state.
        raised = pl
        if not new_rv.hydra:
            top = max([100, *_levels_in(pl)])
            if pl.get("users", {}).get(user_id) != top:
                raised = dict(pl, users=dict(pl.get("users", {}), **{user_id: top}))
        await send(new_room, "m.room.power_levels", user_id, raised, state_key="")

        # 3. Copied state.
        for etype in COPIED_STATE:
            ev = old.get(etype)
            if ev is not None and ev.content:
                await send(new_room, etype, user_id, dict(ev.content), state_key="")
        for k in links:
            ev = evs.get(state[k])
            via = ev.content.get("via") if ev is not None else None
            if ev is not None and isinstance(via, list) and via:
                await send(new_room, k[0], user_id, dict(ev.content), state_key=k[1])
        await self._copy_bans(old_room, new_room, user_id, state)

        # 4. Aliases.
        moved = await self.rooms.move_aliases(old_room, new_room)
        if moved:
            for hook in self.aliases_moved:
                hook(old_room, new_room)
        canonical = old.get("m.room.canonical_alias")
        if canonical is not None:
            # (The upgrading user's join may have moved them already, see
            # on_local_join.)
            here = set(await self.rooms.get_aliases_for_room(new_room))
            content = _moved_canonical_alias(canonical.content, here)
            if content:
                await send(new_room, "m.room.canonical_alias", user_id, content, state_key="")
        if raised is not pl:
            await send(new_room, "m.room.power_levels", user_id, pl, state_key="")
        if await self.rooms.is_public(old_room):
            await self.rooms.set_public(new_room, True)
            await self.rooms.set_public(old_room, False)

        # 5. The tombstone (unless it went first), then the old room is closed to talk.
        if new_room_id is None:
            await send(old_room, "m.room.tombstone", user_id,
                       {"body": TOMBSTONE_BODY, "replacement_room": new_room}, state_key="")
        if canonical is not None and canonical.content:
            await self._best_effort(send(old_room, "m.room.canonical_alias", user_id, {}, state_key=""))
        await self._restrict_old_room(old_room, user_id)

        # 6. Invites.
        join_rule = old.get("m.room.join_rules")
        if (join_rule.content.get("join_rule") if join_rule is not None else "invite") != "public":
            for member in sorted(await self.events.get_joined_users(old_room)):
                if member != user_id and server_of(member) == self.server_name:
                    await self._best_effort(self.membership.update(user_id, member, new_room, "invite"))
        if new_room_id is None:
            # The upgrading user joined before the tombstone existed (when it
            # went first, their join already carried their settings over).
            await self.on_local_join(user_id, new_room)
        return new_room

    async def on_local_join(self, user_id: str, room_id: str) -> None:
        """A local user joined ``room_id``: when it replaces a room (its
        create event names a predecessor whose tombstone points back at it),
        the user's settings for the old room follow (spec: "When a user joins
        the new room, the server should automatically transfer/replicate some
        of the user's personalized settings"), and so do this server's
        aliases and room directory entry of the old room, which matters where
        the upgrade was made on another server."""
        old_room = await self._predecessor(room_id)
        if old_room is None:
            return
        moved = await self.rooms.move_aliases(old_room, room_id)
        if moved:
            for hook in self.aliases_moved:
                hook(old_room, room_id)
        if await self.rooms.is_public(old_room):
            await self.rooms.set_public(room_id, True)
            await self.rooms.set_public(old_room, False)
        if self.copy_user_settings is not None:
            await self.copy_user_settings(user_id, old_room, room_id)

    async def _predecessor(self, room_id: str) -> Optional[str]:
        eid = await self.events.get_current_state_event_id(room_id, "m.room.create", "")
        create = await self.events.get_event(eid) if eid else None
        predecessor = create.content.get("predecessor") if create is not None else None
        old_room = predecessor.get("room_id") if isinstance(predecessor, dict) else None
        if not isinstance(old_room, str) or old_room == room_id:
            return None
        # Only a room that says it was replaced by this one: a room cannot
        # take another's aliases by naming it as its predecessor.
        tomb_id = await self.events.get_current_state_event_id(old_room, "m.room.tombstone", "")
        tomb = await self.events.get_event(tomb_id) if tomb_id else None
        if tomb is None or tomb.content.get("replacement_room") != room_id:
            return None
        return old_room

    async def _latest_event(self, room_id: str) -> Optional[str]:
        prevs = await self.events.get_forward_extremities(room_id)
        evs = await self.events.get_events(prevs)
        if not evs:
            return None
        return max(evs.values(), key=lambda e: (e.depth, e.internal.get("stream_ordering", 0))).event_id

    async def _copy_bans(self, old_room: str, new_room: str, user_id: str, state: dict[tuple[str, str], str]) -> None:
        ids = [eid for (t, _), eid in state.items() if t == "m.room.member"]
        bans = 0
        for i in range(0, len(ids), 200):
            for ev in (await self.events.get_events(ids[i:i + 200])).values():
                if ev.membership != "ban" or ev.state_key is None or bans >= MAX_COPIED_BANS:
                    continue
                content: dict[str, Any] = {"membership": "ban"}
                if isinstance(ev.content.get("reason"), str):
                    content["reason"] = ev.content["reason"]
                await self._best_effort(self.creator.send(new_room, "m.room.member", user_id, content,
                                                          state_key=ev.state_key))
                bans += 1

    async def _restrict_old_room(self, room_id: str, user_id: str) -> None:
        eid = await self.events.get_current_state_event_id(room_id, "m.room.power_levels", "")
        ev = await self.events.get_event(eid) if eid else None
        content = dict(ev.content) if ev is not None else {}
        users_default = _int_level(content.get("users_default")) or 0
        floor = max(50, users_default + 1)
        changed = False
        for key, default in (("events_default", 0), ("invite", 0)):
            current = _int_level(content.get(key))
            if (default if current is None else current) < floor:
                content[key] = floor
                changed = True
        if changed:
            await self._best_effort(self.creator.send(room_id, "m.room.power_levels", user_id, content,
                                                      state_key=""))

    @staticmethod
    async def _best_effort(step: Awaitable[Any]) -> None:
        """A step the upgrade goes on without when the auth rules refuse it."""
        try:
            await step
        except MatrixError as e:
            logger.info("room upgrade: a best-effort step was refused: %s %s", e.errcode, e.msg)


def normalised_power_levels(content: dict[str, Any]) -> dict[str, Any]:
    """``content`` as every room version accepts it: levels as integers
    (room version 10 made string levels invalid), unusable entries dropped."""
    out: dict[str, Any] = {}
    for key, value in content.items():
        if key in _NAMED_LEVELS:
            level = _int_level(value)
            if level is not None:
                out[key] = level
        elif key in ("events", "users", "notifications"):
            if isinstance(value, dict):
                levels = {k: _int_level(v) for k, v in value.items() if isinstance(k, str)}
                out[key] = {k: v for k, v in levels.items() if v is not None}
        else:
            out[key] = value
    return out


def _int_level(value: Any) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        level = value
    elif isinstance(value, str):
        try:
            level = int(value.strip())
        except ValueError:
            return None
    else:
        return None
    return level if abs(level) <= 2 ** 53 - 1 else None


def _levels_in(pl: dict[str, Any]) -> list[int]:
    levels = [v for k, v in pl.items() if k in _NAMED_LEVELS and isinstance(v, int)]
    for key in ("events", "users", "notifications"):
        if isinstance(pl.get(key), dict):
            levels.extend(v for v in pl[key].values() if isinstance(v, int) and not math.isinf(v))
    return levels


def _moved_canonical_alias(content: dict[str, Any], moved: set[str]) -> dict[str, Any]:
    """The old room's canonical alias event as it reads in the new room:
    only the aliases that now point there."""
    out: dict[str, Any] = {}
    if content.get("alias") in moved:
        out["alias"] = content["alias"]
    alt = content.get("alt_aliases")
    if isinstance(alt, list):
        kept = [a for a in alt if a in moved]
        if kept:
            out["alt_aliases"] = kept
    return out


async def refuse_self_tombstone(event: Event, state: Any) -> None:
    """A pre-send check: a tombstone may not name its own room as the
    replacement (clients following it would loop)."""
    if event.type == "m.room.tombstone" and event.content.get("replacement_room") == event.room_id:
        raise MatrixError(400, "M_BAD_JSON", "A room cannot be replaced by itself")
