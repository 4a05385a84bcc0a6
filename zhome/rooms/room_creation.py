"""Room creation (``POST /createRoom``).

Spec: client-server-api "Creation": the create event, the creator's join,
power levels (with ``power_level_content_override``), canonical alias, the
preset's join rules / history visibility / guest access, ``initial_state``,
name, topic, then invites. Room version 12 derives the room ID from the
create event and gives creators infinite power.
"""

from __future__ import annotations

import re
import time
from typing import Any, Optional

from zhome.crypto.event_hashing import room_id_for_create_event
from zhome.http.errors import MatrixError, bad_json, invalid_param
from zhome.rooms.event_creation import EventCreator
from zhome.rooms.membership import MembershipService
from zhome.rooms.validation import check_client_content
from zhome.rooms.versions import KNOWN_ROOM_VERSIONS, RoomVersion, get_room_version
from zhome.storage.database import IntegrityError
from zhome.storage.events import PersistItem
from zhome.storage.rooms import RoomsStore
from zhome.util.ids import is_valid_user_id, random_string

PRESETS = ("private_chat", "public_chat", "trusted_private_chat")
_ALIAS_LOCALPART = re.compile(r"^[^:\s]+\Z")
# Tries at a fresh room ID before giving up (each moves the create event on by 1 ms).
CREATE_ATTEMPTS = 50


class RoomCreationService:
    def __init__(
        self,
        server_name: str,
        creator: EventCreator,
        membership: MembershipService,
        rooms: RoomsStore,
        default_room_version: str,
    ) -> None:
        self.server_name = server_name
        self.creator = creator
        self.membership = membership
        self.rooms = rooms
        self.default_room_version = default_room_version

    async def create_room(self, user_id: str, body: dict[str, Any]) -> tuple[str, Optional[str]]:
        """Create a room as ``body`` asks; returns (room_id, alias)."""
        version_id = body.get("room_version", self.default_room_version)
        if not isinstance(version_id, str):
            raise bad_json("'room_version' must be a string")
        if version_id not in KNOWN_ROOM_VERSIONS:
            raise MatrixError(400, "M_UNSUPPORTED_ROOM_VERSION", f"Room version {version_id!r} is not supported")
        rv = get_room_version(version_id)
        visibility = body.get("visibility", "private")
        if visibility not in ("public", "private"):
            raise invalid_param("'visibility' must be 'public' or 'private'")
        preset = body.get("preset")
        if preset is None:
            preset = "public_chat" if visibility == "public" else "private_chat"
        if preset not in PRESETS:
            raise invalid_param(f"Unknown preset {preset!r}")
        invites = body.get("invite", [])
        if not isinstance(invites, list) or not all(isinstance(i, str) for i in invites):
            # Wrong JSON types are M_BAD_JSON; well-typed but invalid IDs are M_INVALID_PARAM.
            raise bad_json("'invite' must be a list of user IDs")
        if not all(is_valid_user_id(i) for i in invites):
            raise invalid_param("'invite' must be a list of user IDs")
        # An invitee who does not accept invites from the creator stops the
        # creation before anything is stored.
        for invitee in invites:
            await self.membership.check_invite(user_id, invitee)
        creation_content = body.get("creation_content", {})
        check_client_content(rv, creation_content)
        initial_state = body.get("initial_state", [])
        if not isinstance(initial_state, list):
            raise bad_json("'initial_state' must be a list")
        for st in initial_state:
            if not isinstance(st, dict) or not isinstance(st.get("type"), str):
                raise bad_json("Each initial_state entry needs a 'type'")
            if not isinstance(st.get("state_key", ""), str):
                raise bad_json("initial_state 'state_key' must be a string")
            check_client_content(rv, st.get("content"))
        pl_override = body.get("power_level_content_override")
        if pl_override is not None:
            check_client_content(rv, pl_override)
        for key in ("name", "topic"):
            if key in body and not isinstance(body[key], str):
                raise bad_json(f"'{key}' must be a string")
        alias = None
        alias_name = body.get("room_alias_name")
        if alias_name is not None:
            if not isinstance(alias_name, str) or not _ALIAS_LOCALPART.match(alias_name):
                raise invalid_param("Invalid room_alias_name")
            alias = f"#{alias_name}:{self.server_name}"
            if await self.rooms.get_alias(alias) is not None:
                raise MatrixError(400, "M_ROOM_IN_USE", "Room alias already taken")

        # 1. The create event.
        cc = dict(creation_content)
        cc["room_version"] = version_id
        if not rv.implicit_room_creator:
            cc["creator"] = user_id
        else:
            cc.pop("creator", None)
        if rv.hydra and preset == "trusted_private_chat" and invites:
            extra = cc.get("additional_creators", [])
            if not isinstance(extra, list):
                raise bad_json("'additional_creators' must be a list")
            cc["additional_creators"] = sorted(set(extra) | set(invites))
        # 2. The creator joins.
        room_id = await self.start_room(rv, user_id, cc, join_extra=_is_direct(body, None))
        send = self.creator.send

        # 3. Power levels.
        creators = {user_id} | set(cc.get("additional_creators", []) if rv.hydra else [])
        pl = default_power_levels(user_id, preset, invites, rv.hydra, creators)
        if pl_override:
            pl.update(pl_override)
        await send(room_id, "m.room.power_levels", user_id, pl, state_key="")

        # 4. Canonical alias.
        if alias is not None:
            if not await self.rooms.create_alias(alias, room_id, user_id):
                raise MatrixError(400, "M_ROOM_IN_USE", "Room alias already taken")
            await send(room_id, "m.room.canonical_alias", user_id, {"alias": alias}, state_key="")

        # 5. Preset state, unless initial_state sets it.
        given = {(st["type"], st.get("state_key", "")) for st in initial_state}
        join_rule = "public" if preset == "public_chat" else "invite"
        # Spec: createRoom's presets: guest_access is can_join for the private
        # presets and forbidden for public_chat.
        preset_state = [
            ("m.room.join_rules", {"join_rule": join_rule}),
            ("m.room.history_visibility", {"history_visibility": "shared"}),
            ("m.room.guest_access", {"guest_access": "forbidden" if preset == "public_chat" else "can_join"}),
        ]
        for etype, content in preset_state:
            if (etype, "") not in given:
                await send(room_id, etype, user_id, content, state_key="")

        # 6. initial_state, 7. name and topic.
        for st in initial_state:
            await send(room_id, st["type"], user_id, st["content"], state_key=st.get("state_key", ""))
        if "name" in body:
            await send(room_id, "m.room.name", user_id, {"name": body["name"]}, state_key="")
        if "topic" in body:
            await send(room_id, "m.room.topic", user_id, {"topic": body["topic"]}, state_key="")

        # 8. Invites.
        for invitee in invites:
            await self.membership.update(user_id, invitee, room_id, "invite", extra=_is_direct(body, True))

        if visibility == "public":
            await self.rooms.set_public(room_id, True)
        return room_id, alias

    async def start_room(self, rv: RoomVersion, user_id: str, creation_content: dict[str, Any],
                         join_extra: Optional[dict[str, Any]] = None, room_id: Optional[str] = None) -> str:
        """The first two events of every room made here (``createRoom`` and
        room upgrades, zhome/rooms/room_upgrade.py): the create event with
        ``creation_content`` (which must already hold ``room_version`` and,
        before v11, ``creator``) and the creator's join. Returns the room ID.
        ``room_id`` (before v12 only, from ``unused_room_id``) is the ID to
        use; otherwise one is picked."""
        room_id = await self._persist_create_event(rv, user_id, creation_content, room_id)
        await self.membership.update(user_id, user_id, room_id, "join", extra=join_extra)
        return room_id

    async def unused_room_id(self) -> str:
        """A room ID (before room version 12) that no room has yet."""
        for _ in range(CREATE_ATTEMPTS):
            room_id = f"!{random_string(18)}:{self.server_name}"
            if await self.rooms.get_room_version(room_id) is None:
                return room_id
        raise MatrixError(503, "M_UNKNOWN", "Could not allocate a room ID; try again")

    async def _persist_create_event(self, rv: RoomVersion, user_id: str, content: dict[str, Any],
                                    chosen: Optional[str] = None) -> str:
        """Build, check and persist the create event; returns the room ID.

        From room version 12 the room ID is the create event's hash, so two
        rooms created by one user with the same content in the same
        millisecond would be the same room: the later one moves its
        ``origin_server_ts`` on until its ID is new. Earlier versions pick a
        random ID, which a collision also just re-picks.
        """
        ts = int(time.time() * 1000)
        if chosen is not None and rv.hydra:
            raise ValueError("a version 12 room ID cannot be chosen")
        for _ in range(1 if chosen is not None else CREATE_ATTEMPTS):
            room_id: Optional[str] = None
            if not rv.hydra:
                room_id = chosen or f"!{random_string(18)}:{self.server_name}"
            pdu = self.creator.build_pdu(rv, room_id, "m.room.create", user_id, content, "", [], [], 1)
            pdu["origin_server_ts"] = ts
            create_ev = self.creator.finish_event(rv, pdu)
            if rv.hydra:
                room_id = room_id_for_create_event(rv, create_ev.pdu)
            assert room_id is not None
            await self.creator.check_auth(create_ev, {})
            async with self.creator.room_locks.lock(room_id):
                if await self.rooms.get_room_version(room_id) is None:
                    try:
                        await self.creator.persister.persist(
                            PersistItem(create_ev, None, {}),
                            before_txn=lambda txn: self.rooms.store_room_txn(txn, room_id, rv.identifier, user_id),
                        )
                        return room_id
                    except IntegrityError:
                        # Created meanwhile by another process sharing the database.
                        pass
            ts += 1
        raise MatrixError(503, "M_UNKNOWN", "Could not allocate a room ID; try again")


def _is_direct(body: dict[str, Any], for_invite: Optional[bool]) -> Optional[dict[str, Any]]:
    if for_invite and body.get("is_direct") is True:
        return {"is_direct": True}
    return None


def default_power_levels(
    user_id: str, preset: str, invites: list[str], hydra: bool, creators: set[str]
) -> dict[str, Any]:
    """The power levels a new room starts with. From room version 12 the
    creators are above every level and not listed in ``users``; upgrading
    the room (``m.room.tombstone``) needs 150 there, more than any level a
    non-creator can be given by default, so only creators can upgrade."""
    users: dict[str, int] = {}
    if not hydra:
        users[user_id] = 100
        if preset == "trusted_private_chat":
            for i in invites:
                users[i] = 100
    return {
        "users": users,
        "users_default": 0,
        "events": {
            "m.room.name": 50,
            "m.room.power_levels": 100,
            "m.room.history_visibility": 100,
            "m.room.canonical_alias": 50,
            "m.room.avatar": 50,
            "m.room.tombstone": 150 if hydra else 100,
            "m.room.server_acl": 100,
            "m.room.encryption": 100,
        },
        "events_default": 0,
        "state_default": 50,
        "ban": 50,
        "kick": 50,
        "redact": 50,
        "invite": 0,
        "historical": 100,
        "notifications": {"room": 50},
    }
