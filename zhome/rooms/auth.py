"""The authorization rules for events, room versions 1 to 12.

Spec: rooms/v1.md ... rooms/v12.md "Authorization rules" (and the
"Handling redactions" section of v3+), server-server-api "Auth events
selection", client-server-api ``m.room.power_levels`` (default levels).

Everything here is pure: the caller supplies the event and the state it is
checked against (its auth events, the state before it, or the current state
for soft failure) as a map ``(type, state_key) -> Event``. Signatures and
hashes, including the signature of the ``join_authorised_via_users_server``
homeserver on restricted joins, are checked by the caller beforehand; the
signatures of third-party invite ``signed`` blocks are checked here because
the public keys come from room state.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping, Optional, Union

from canonicaljson import encode_canonical_json
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey
from unpaddedbase64 import decode_base64

from zhome.rooms.events import Event
from zhome.rooms.versions import KNOWN_ROOM_VERSIONS, EventIdFormat, RoomVersion

AuthEvents = Mapping[tuple[str, str], Event]
PowerLevel = Union[int, float]  # float only for the infinite level of v12 creators

CREATE = "m.room.create"
MEMBER = "m.room.member"
JOIN_RULES = "m.room.join_rules"
POWER_LEVELS = "m.room.power_levels"
THIRD_PARTY_INVITE = "m.room.third_party_invite"
ALIASES = "m.room.aliases"
REDACTION = "m.room.redaction"

# client-server-api m.room.power_levels: levels used when the power levels
# event omits them, or when there is no power levels event at all.
NAMED_LEVEL_DEFAULTS: dict[str, int] = {
    "ban": 50,
    "kick": 50,
    "redact": 50,
    "invite": 0,
    "users_default": 0,
    "events_default": 0,
    "state_default": 50,
}
# The top-level integer properties whose changes rule "power levels" checks.
_PL_SCALAR_KEYS = ("users_default", "events_default", "state_default", "ban", "redact", "kick", "invite")


class AuthError(Exception):
    """An event fails the authorization rules; maps to 403 M_FORBIDDEN."""

    def __init__(self, msg: str, code: int = 403) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


# ---------------------------------------------------------------------------
# identifiers

# appendices "User Identifiers": historical localparts allow any printable
# ASCII except ':'; the whole ID is at most 255 bytes.
_LOCALPART_RE = re.compile(r"[\x21-\x39\x3b-\x7e]+")
# appendices "Server Name": IPv4, [IPv6] or a DNS name, optional port.
_SERVER_NAME_RE = re.compile(
    r"(?:\[[0-9A-Fa-f:.]{2,45}\]|[0-9A-Za-z.-]{1,255})(?::[0-9]{1,5})?"
)


def is_valid_user_id(user_id: Any) -> bool:
    """True when ``user_id`` is a (historically) valid Matrix user ID."""
    if not isinstance(user_id, str) or not user_id.startswith("@"):
        return False
    if len(user_id.encode("utf-8")) > 255:
        return False
    localpart, sep, server = user_id[1:].partition(":")
    if not sep:
        return False
    return bool(_LOCALPART_RE.fullmatch(localpart)) and bool(_SERVER_NAME_RE.fullmatch(server))


def _domain(identifier: Optional[str]) -> Optional[str]:
    """The server part of a user, room (v1-v11) or event (v1-v2) ID."""
    if not isinstance(identifier, str) or ":" not in identifier:
        return None
    return identifier.split(":", 1)[1]


# ---------------------------------------------------------------------------
# power levels

# rooms/v1 "m.room.power_levels events accept values as strings".
_STRINGY_INT_RE = re.compile(r"[ \t\n\r\f\v]*[+-]?[0-9]+[ \t\n\r\f\v]*")


def _as_level(value: Any, room_version: RoomVersion) -> Optional[int]:
    """The integer a power level value stands for, or None when invalid."""
    if isinstance(value, bool):
        # JSON true/false are not integers even though Python says so.
        return None
    if isinstance(value, int):
        return value
    if room_version.enforce_int_power_levels:
        return None
    if isinstance(value, str):
        return int(value.strip()) if _STRINGY_INT_RE.fullmatch(value) else None
    if isinstance(value, float) and not room_version.strict_canonical_json:
        # rooms/v1 "accept values as floats": truncate; non-finite is invalid.
        return int(value) if math.isfinite(value) else None
    return None


def _pl_event(auth_events: AuthEvents) -> Optional[Event]:
    return auth_events.get((POWER_LEVELS, ""))


def _create_event(auth_events: AuthEvents) -> Optional[Event]:
    return auth_events.get((CREATE, ""))


def creators_of(create_event: Event) -> set[str]:
    """The room creators: v12 sender + additional_creators; v11 the sender;
    v1-v10 ``content.creator`` (falling back to the sender, which the spec
    says is always equal to it)."""
    rv = create_event.room_version
    if rv.hydra:
        creators = {create_event.sender}
        extra = create_event.content.get("additional_creators")
        if isinstance(extra, list):
            creators.update(u for u in extra if isinstance(u, str))
        return creators
    if rv.implicit_room_creator:
        return {create_event.sender}
    creator = create_event.content.get("creator")
    return {creator if isinstance(creator, str) else create_event.sender}


def _first_creator(create_event: Event) -> Optional[str]:
    """The user whose join may directly follow the create event."""
    if create_event.room_version.implicit_room_creator:
        return create_event.sender
    creator = create_event.content.get("creator")
    return creator if isinstance(creator, str) else None


def get_named_level(name: str, auth_events: AuthEvents, default: Optional[int] = None) -> int:
    """The level called ``name`` ("invite", "kick", "ban", "redact",
    "users_default", ...) in the power levels event, else ``default``
    (the spec's default when not given)."""
    if default is None:
        default = NAMED_LEVEL_DEFAULTS.get(name, 0)
    pl = _pl_event(auth_events)
    if pl is None:
        return default
    level = _as_level(pl.content.get(name), pl.room_version)
    return default if level is None else level


def get_user_power_level(user_id: str, auth_events: AuthEvents) -> PowerLevel:
    """A user's power level; ``float('inf')`` for v12 creators."""
    create = _create_event(auth_events)
    if create is not None and create.room_version.hydra and user_id in creators_of(create):
        return math.inf
    pl = _pl_event(auth_events)
    if pl is not None:
        users = pl.content.get("users")
        if isinstance(users, dict) and user_id in users:
            level = _as_level(users[user_id], pl.room_version)
            if level is not None:
                return level
        return get_named_level("users_default", auth_events)
    # No power levels event: the creator has 100, everybody else 0.
    if create is not None and user_id in creators_of(create):
        return 100
    return 0


def get_required_level(event_type: str, is_state: bool, auth_events: AuthEvents) -> int:
    """The level needed to send an event of ``event_type``."""
    pl = _pl_event(auth_events)
    if pl is not None:
        events = pl.content.get("events")
        if isinstance(events, dict) and event_type in events:
            level = _as_level(events[event_type], pl.room_version)
            if level is not None:
                return level
    return get_named_level("state_default" if is_state else "events_default", auth_events)


def can_redact(
    room_version: RoomVersion,
    redaction_sender: str,
    original_sender: str,
    auth_events: AuthEvents,
    *,
    same_server_ok: bool = False,
) -> bool:
    """Whether a redaction by ``redaction_sender`` of an event sent by
    ``original_sender`` takes effect.

    Users may redact their own events; otherwise the redact level is
    needed. rooms/v3+ "Handling redactions" also lets a server redact events
    of its own users: pass ``same_server_ok=True`` when applying a redaction
    received over federation. (For v1/v2 the auth rules themselves carry the
    event-ID domain check; ``room_version`` is accepted so callers need not
    care.)
    """
    if redaction_sender == original_sender:
        return True
    if same_server_ok and _domain(redaction_sender) == _domain(original_sender):
        return True
    return get_user_power_level(redaction_sender, auth_events) >= get_named_level("redact", auth_events)


# ---------------------------------------------------------------------------
# auth events selection


def auth_types_for_event(
    room_version: RoomVersion,
    event_type: str,
    state_key: Optional[str],
    sender: str,
    content: Mapping[str, Any],
) -> list[tuple[str, str]]:
    """server-server-api "Auth events selection": the (type, state_key)
    pairs an event's auth_events may hold. In v12 the create event is never
    selected (the room ID names it)."""
    if event_type == CREATE:
        return []
    types: list[tuple[str, str]] = []

    def add(key: tuple[str, str]) -> None:
        if key not in types:
            types.append(key)

    if not room_version.hydra:
        add((CREATE, ""))
    add((POWER_LEVELS, ""))
    add((MEMBER, sender))
    if event_type == MEMBER and isinstance(state_key, str):
        add((MEMBER, state_key))
        membership = content.get("membership")
        # Knocks are checked against the join rule too (spec v1.16 adds
        # "knock" to this list; it is needed by the knock rules).
        if membership in ("join", "invite") or (membership == "knock" and room_version.knock_join_rule):
            add((JOIN_RULES, ""))
        if membership == "invite":
            tpi = content.get("third_party_invite")
            signed = tpi.get("signed") if isinstance(tpi, dict) else None
            token = signed.get("token") if isinstance(signed, dict) else None
            if isinstance(token, str):
                add((THIRD_PARTY_INVITE, token))
        via = content.get("join_authorised_via_users_server")
        if membership == "join" and room_version.restricted_join_rule and isinstance(via, str):
            add((MEMBER, via))
    return types


def build_auth_events(events: Iterable[Event]) -> dict[tuple[str, str], Event]:
    """Key an event's auth events by (type, state_key), rejecting
    duplicates (rule "duplicate entries for a given type and state_key")."""
    out: dict[tuple[str, str], Event] = {}
    for ev in events:
        if not ev.is_state():
            raise AuthError(f"auth event {ev.event_id} is not a state event")
        key = ev.state_tuple()
        if key in out:
            raise AuthError(f"duplicate auth events for {key}")
        out[key] = ev
    return out


# ---------------------------------------------------------------------------
# the rules


def _membership_of(user_id: Optional[str], auth_events: AuthEvents) -> Optional[str]:
    if user_id is None:
        return None
    ev = auth_events.get((MEMBER, user_id))
    return ev.membership if ev is not None else None


def _join_rule(auth_events: AuthEvents) -> Optional[str]:
    ev = auth_events.get((JOIN_RULES, ""))
    if ev is None:
        return None
    rule = ev.content.get("join_rule")
    return rule if isinstance(rule, str) else None


def check_auth_rules(event: Event, auth_events: AuthEvents) -> None:
    """Raise AuthError unless ``event`` passes the authorization rules of its
    room version against ``auth_events``.

    ``auth_events`` maps (type, state_key) to events; it must hold only
    entries the auth events selection allows for this event (in v12 plus
    the room's create event, which is implied by the room ID).
    """
    rv = event.room_version
    if event.type == CREATE:
        _check_create(event)
        return

    create = _create_event(auth_events)
    _check_auth_events(event, auth_events, create)
    assert create is not None

    # rule "m.federate": a local-only room admits no other server.
    if create.content.get("m.federate", True) is False and _domain(event.sender) != _domain(create.sender):
        raise AuthError("room is not federated and sender is not on the creator's server")

    if rv.special_case_aliases_auth and event.type == ALIASES:
        # v1-v5: a server may publish its own aliases without being joined.
        if event.state_key is None:
            raise AuthError("m.room.aliases event has no state_key")
        if _domain(event.sender) != event.state_key:
            raise AuthError("m.room.aliases state_key is not the sender's server")
        return

    if event.type == MEMBER:
        _check_membership(event, auth_events, create)
        return

    sender_level = get_user_power_level(event.sender, auth_events)
    if _membership_of(event.sender, auth_events) != "join":
        raise AuthError(f"{event.sender} is not joined to the room")

    if event.type == THIRD_PARTY_INVITE:
        if sender_level >= get_named_level("invite", auth_events):
            return
        raise AuthError("sender's power level is below the invite level")

    required = get_required_level(event.type, event.is_state(), auth_events)
    if required > sender_level:
        raise AuthError(f"sending {event.type} needs power level {required}")

    # Only a user may set state keyed by their own user ID.
    sk = event.state_key
    if sk is not None and sk.startswith("@") and sk != event.sender:
        raise AuthError("state_key is another user's ID")

    if event.type == POWER_LEVELS:
        _check_power_levels(event, auth_events, create, sender_level)
        return

    if event.type == REDACTION and rv.event_id_format is EventIdFormat.SERVER_CHOSEN:
        # v1/v2 only: later versions check redactions when applying them.
        if sender_level >= get_named_level("redact", auth_events):
            return
        if _domain(event.redacts) is not None and _domain(event.redacts) == _domain(event.event_id):
            return
        raise AuthError("redaction needs the redact level or an event from the same server")


def _check_create(event: Event) -> None:
    rv = event.room_version
    if event.pdu.get("prev_events"):
        raise AuthError("create event has prev_events")
    if rv.hydra:
        # v12: the room ID is derived from the create event's ID.
        if "room_id" in event.pdu:
            raise AuthError("create event has a room_id")
    elif _domain(event.pdu.get("room_id")) != _domain(event.sender):
        raise AuthError("room_id domain does not match the sender's domain")
    content = event.content
    if "room_version" in content and content["room_version"] not in KNOWN_ROOM_VERSIONS:
        raise AuthError(f"unknown room version {content['room_version']!r}")
    if rv.hydra and "additional_creators" in content:
        extra = content["additional_creators"]
        if not isinstance(extra, list) or not all(is_valid_user_id(u) for u in extra):
            raise AuthError("additional_creators is not a list of user IDs")
    if not rv.implicit_room_creator and "creator" not in content:
        raise AuthError("create event has no creator")


def _check_auth_events(event: Event, auth_events: AuthEvents, create: Optional[Event]) -> None:
    rv = event.room_version
    if create is None:
        raise AuthError("no m.room.create among the auth events")
    if rv.hydra:
        # v12 rule 2: the room ID must name an accepted create event.
        if create.rejected_reason is not None or event.room_id != "!" + create.event_id[1:]:
            raise AuthError("room_id is not the ID of the room's create event")
    allowed = set(auth_types_for_event(rv, event.type, event.state_key, event.sender, event.content))
    allowed.add((CREATE, ""))  # implied by room_id in v12, listed before
    for key, ev in auth_events.items():
        if not ev.is_state() or ev.state_tuple() != key:
            raise AuthError(f"auth event {ev.event_id} is not the state for {key}")
        if key not in allowed:
            raise AuthError(f"auth event {ev.event_id} {key} is not one the selection allows")
        if ev.rejected_reason is not None:
            raise AuthError(f"auth event {ev.event_id} was rejected")
        if ev.room_id != event.room_id:
            raise AuthError(f"auth event {ev.event_id} is from another room")


def _check_membership(event: Event, auth_events: AuthEvents, create: Event) -> None:
    rv = event.room_version
    target = event.state_key
    membership = event.content.get("membership")
    if target is None or not isinstance(membership, str):
        raise AuthError("member event has no state_key or membership")
    sender = event.sender
    sender_membership = _membership_of(sender, auth_events)
    target_membership = _membership_of(target, auth_events)
    sender_level = get_user_power_level(sender, auth_events)

    if membership == "join":
        prev = event.prev_event_ids
        if len(prev) == 1 and prev[0] == create.event_id and target == _first_creator(create):
            return
        if sender != target:
            raise AuthError("cannot join on behalf of another user")
        if sender_membership == "ban":
            raise AuthError(f"{sender} is banned from the room")
        rule = _join_rule(auth_events)
        if rule == "invite" or (rule == "knock" and rv.knock_join_rule):
            if sender_membership in ("invite", "join"):
                return
            raise AuthError("room is invite-only and the user is not invited")
        if (rule == "restricted" and rv.restricted_join_rule) or (
            rule == "knock_restricted" and rv.knock_restricted_join_rule
        ):
            if sender_membership in ("join", "invite"):
                return
            via = event.content.get("join_authorised_via_users_server")
            if not isinstance(via, str):
                raise AuthError("restricted join without join_authorised_via_users_server")
            if _membership_of(via, auth_events) != "join":
                raise AuthError("join_authorised_via_users_server is not joined")
            if get_user_power_level(via, auth_events) < get_named_level("invite", auth_events):
                raise AuthError("join_authorised_via_users_server cannot invite")
            return
        if rule == "public":
            return
        raise AuthError(f"join rule {rule!r} does not allow joining")

    if membership == "invite":
        if "third_party_invite" in event.content:
            _check_third_party_invite(event, auth_events, target_membership)
            return
        if sender_membership != "join":
            raise AuthError("inviter is not joined")
        if target_membership in ("join", "ban"):
            raise AuthError(f"invitee is already {target_membership}")
        if sender_level >= get_named_level("invite", auth_events):
            return
        raise AuthError("inviter's power level is below the invite level")

    if membership == "leave":
        if sender == target:
            allowed = ("invite", "join", "knock") if rv.knock_join_rule else ("invite", "join")
            if target_membership in allowed:
                return
            raise AuthError("cannot leave a room one is not in, invited to or knocking on")
        if sender_membership != "join":
            raise AuthError("kicker is not joined")
        if target_membership == "ban" and sender_level < get_named_level("ban", auth_events):
            raise AuthError("unbanning needs the ban level")
        target_level = get_user_power_level(target, auth_events)
        if sender_level >= get_named_level("kick", auth_events) and target_level < sender_level:
            return
        raise AuthError("kicking needs the kick level and more power than the target")

    if membership == "ban":
        if sender_membership != "join":
            raise AuthError("banner is not joined")
        target_level = get_user_power_level(target, auth_events)
        if sender_level >= get_named_level("ban", auth_events) and target_level < sender_level:
            return
        raise AuthError("banning needs the ban level and more power than the target")

    if membership == "knock" and rv.knock_join_rule:
        rule = _join_rule(auth_events)
        if not (rule == "knock" or (rule == "knock_restricted" and rv.knock_restricted_join_rule)):
            raise AuthError("join rule does not allow knocking")
        if sender != target:
            raise AuthError("cannot knock on behalf of another user")
        if sender_membership not in ("ban", "invite", "join"):
            return
        raise AuthError(f"cannot knock while {sender_membership}")

    raise AuthError(f"unknown membership {membership!r}")


def _decode_key(key: str) -> Optional[bytes]:
    # Identity servers publish unpadded base64; accept the URL-safe form too.
    try:
        return decode_base64(key.replace("-", "+").replace("_", "/"))
    except ValueError:  # binascii.Error included
        return None


def _check_third_party_invite(event: Event, auth_events: AuthEvents, target_membership: Optional[str]) -> None:
    if target_membership == "ban":
        raise AuthError("invitee is banned")
    tpi = event.content.get("third_party_invite")
    signed = tpi.get("signed") if isinstance(tpi, dict) else None
    if not isinstance(signed, dict):
        raise AuthError("third_party_invite has no signed block")
    mxid, token = signed.get("mxid"), signed.get("token")
    if not isinstance(mxid, str) or not isinstance(token, str):
        raise AuthError("third_party_invite.signed lacks mxid or token")
    if mxid != event.state_key:
        raise AuthError("third_party_invite mxid does not match state_key")
    invite = auth_events.get((THIRD_PARTY_INVITE, token))
    if invite is None:
        raise AuthError("no m.room.third_party_invite for the token")
    if invite.sender != event.sender:
        raise AuthError("sender did not send the m.room.third_party_invite")

    keys: list[str] = []
    if isinstance(invite.content.get("public_key"), str):
        keys.append(invite.content["public_key"])
    for entry in invite.content.get("public_keys") or []:
        if isinstance(entry, dict) and isinstance(entry.get("public_key"), str):
            keys.append(entry["public_key"])
    signatures = signed.get("signatures")
    if not isinstance(signatures, dict):
        raise AuthError("third_party_invite.signed is not signed")
    message = encode_canonical_json({k: v for k, v in signed.items() if k not in ("signatures", "unsigned")})
    for by_key in signatures.values():
        if not isinstance(by_key, dict):
            continue
        for key_id, sig in by_key.items():
            if not isinstance(key_id, str) or not key_id.startswith("ed25519:") or not isinstance(sig, str):
                continue
            sig_bytes = _decode_key(sig)
            if sig_bytes is None:
                continue
            for key in keys:
                key_bytes = _decode_key(key)
                if key_bytes is None or len(key_bytes) != 32:
                    continue
                try:
                    VerifyKey(key_bytes).verify(message, sig_bytes)
                except (BadSignatureError, ValueError, TypeError):
                    continue
                return
    raise AuthError("no third_party_invite signature matches the invite's public keys")


def _check_power_levels(event: Event, auth_events: AuthEvents, create: Event, sender_level: PowerLevel) -> None:
    rv = event.room_version
    content = event.content

    if rv.enforce_int_power_levels:
        for name in _PL_SCALAR_KEYS:
            if name in content and _as_level(content[name], rv) is None:
                raise AuthError(f"power level {name} is not an integer")
        for name in ("events", "notifications"):
            if name in content:
                value = content[name]
                if not isinstance(value, dict) or any(_as_level(v, rv) is None for v in value.values()):
                    raise AuthError(f"power levels {name} is not an object of integers")
    if "users" in content:
        users = content["users"]
        if not isinstance(users, dict) or any(
            not is_valid_user_id(u) or _as_level(v, rv) is None for u, v in users.items()
        ):
            raise AuthError("power levels users is not an object of user IDs to integers")
        if rv.hydra and creators_of(create) & set(users):
            # v12: creators' infinite power is not expressible or changeable.
            raise AuthError("room creators may not appear in power levels users")

    old_event = _pl_event(auth_events)
    if old_event is None:
        return
    old = old_event.content
    old_rv = old_event.room_version

    def level(container: Any, key: str, version: RoomVersion) -> Optional[int]:
        if not isinstance(container, dict) or key not in container:
            return None
        return _as_level(container[key], version)

    for name in _PL_SCALAR_KEYS:
        before, after = level(old, name, old_rv), level(content, name, rv)
        if before == after:
            continue
        if before is not None and before > sender_level:
            raise AuthError(f"cannot change {name} from a level above one's own")
        if after is not None and after > sender_level:
            raise AuthError(f"cannot set {name} above one's own level")

    maps = ("events", "notifications") if rv.limit_notifications_power_levels else ("events",)
    for name in maps:
        old_map, new_map = old.get(name), content.get(name)
        keys = set(old_map if isinstance(old_map, dict) else ()) | set(new_map if isinstance(new_map, dict) else ())
        for key in keys:
            before, after = level(old_map, key, old_rv), level(new_map, key, rv)
            if before == after:
                continue
            if before is not None and before > sender_level:
                raise AuthError(f"cannot change {name}[{key}] from a level above one's own")
            if after is not None and after > sender_level:
                raise AuthError(f"cannot set {name}[{key}] above one's own level")

    old_users, new_users = old.get("users"), content.get("users")
    keys = set(old_users if isinstance(old_users, dict) else ()) | set(new_users if isinstance(new_users, dict) else ())
    for user in keys:
        before, after = level(old_users, user, old_rv), level(new_users, user, rv)
        if before == after:
            continue
        # One may lower oneself, but not anyone at or above one's own level.
        if user != event.sender and before is not None and before >= sender_level:
            raise AuthError(f"cannot change the level of {user}, who has at least as much power")
        if after is not None and after > sender_level:
            raise AuthError(f"cannot give {user} a level above one's own")
