"""Room versions 1 to 12 and the algorithm choices each makes.

Spec: "Room Versions" (rooms/v1.md ... rooms/v12.md). Each version is a
bundle of choices: how event IDs are formed, which redaction algorithm and
auth rules apply, which state resolution algorithm is used. The rest of the
code asks a ``RoomVersion`` rather than comparing version strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class EventIdFormat(Enum):
    # v1, v2: "$localpart:server", chosen by the origin server.
    SERVER_CHOSEN = 1
    # v3: "$" + standard unpadded base64 of the reference hash.
    REFERENCE_HASH_STD = 2
    # v4 and later: "$" + URL-safe unpadded base64 of the reference hash.
    REFERENCE_HASH_URLSAFE = 3


class StateResAlgorithm(Enum):
    V1 = 1
    V2 = 2
    # v12: state resolution v2.1 (conflicted state starts from an empty set,
    # the create event is never part of the conflicted set).
    V2_1 = 3


@dataclass(frozen=True)
class RoomVersion:
    identifier: str
    event_id_format: EventIdFormat
    state_res: StateResAlgorithm
    # v5+: signing keys must be valid at the event's origin_server_ts.
    enforce_key_validity: bool
    # v6+: integers outside [-(2**53)+1, (2**53)-1] make JSON invalid.
    strict_canonical_json: bool
    # v6+: m.room.aliases loses its special auth rule.
    special_case_aliases_auth: bool
    # v6+: the "notifications" power levels are checked by the auth rules.
    limit_notifications_power_levels: bool
    # v7+: "knock" membership and join rule.
    knock_join_rule: bool
    # v8+: "restricted" join rule.
    restricted_join_rule: bool
    # v9+: join_authorised_via_users_server kept on redaction of members.
    restricted_join_rule_fix: bool
    # v10+: "knock_restricted" join rule.
    knock_restricted_join_rule: bool
    # v10+: power level values must be integers (not strings).
    enforce_int_power_levels: bool
    # v11+: the redaction algorithm of v11 (keeps all create content,
    # "redacts" moves into content, "invite" kept in power levels, and the
    # top-level origin/membership/prev_state are no longer kept).
    updated_redaction_rules: bool
    # v11+: create event has no "creator" in content; the sender is creator.
    implicit_room_creator: bool
    # v1..v10: m.room.redaction has a top-level "redacts"; v11+: in content.
    redacts_in_content: bool
    # v12: room ID is "!" + the create event's reference hash, the create
    # event carries no room_id, creators (sender + additional_creators) have
    # infinite power and may not appear in m.room.power_levels users.
    hydra: bool


def _v(identifier: str, n: int) -> RoomVersion:
    if n <= 2:
        fmt = EventIdFormat.SERVER_CHOSEN
    elif n == 3:
        fmt = EventIdFormat.REFERENCE_HASH_STD
    else:
        fmt = EventIdFormat.REFERENCE_HASH_URLSAFE
    if n == 1:
        res = StateResAlgorithm.V1
    elif n >= 12:
        res = StateResAlgorithm.V2_1
    else:
        res = StateResAlgorithm.V2
    return RoomVersion(
        identifier=identifier,
        event_id_format=fmt,
        state_res=res,
        enforce_key_validity=n >= 5,
        strict_canonical_json=n >= 6,
        special_case_aliases_auth=n < 6,
        limit_notifications_power_levels=n >= 6,
        knock_join_rule=n >= 7,
        restricted_join_rule=n >= 8,
        restricted_join_rule_fix=n >= 9,
        knock_restricted_join_rule=n >= 10,
        enforce_int_power_levels=n >= 10,
        updated_redaction_rules=n >= 11,
        implicit_room_creator=n >= 11,
        redacts_in_content=n >= 11,
        hydra=n >= 12,
    )


KNOWN_ROOM_VERSIONS: dict[str, RoomVersion] = {str(n): _v(str(n), n) for n in range(1, 13)}

# Versions this server offers for new rooms (the others can still be joined).
STABLE_ROOM_VERSIONS = tuple(KNOWN_ROOM_VERSIONS)
DEFAULT_ROOM_VERSION = "12"


def get_room_version(identifier: str) -> RoomVersion:
    """The RoomVersion for ``identifier``; KeyError when unknown."""
    return KNOWN_ROOM_VERSIONS[identifier]
