"""The redaction algorithm of room versions 1 to 12.

Spec: rooms/v1.md "Redactions" (v1-v5), rooms/v6.md (v6-v7: ``m.room.aliases``
loses its protected ``aliases``), rooms/v8.md (``allow`` kept in join rules),
rooms/v9.md (``join_authorised_via_users_server`` kept in members),
rooms/v11.md (v11-v12: new top-level list, whole create content, ``invite``
in power levels, ``redacts`` in redaction content, ``third_party_invite.signed``
in members); server-server-api "Signing Events" (the redacted form is what
event signatures and reference hashes cover).

The result of ``prune_event_dict`` is the form that is signed and hashed, so
it must be byte-for-byte what every other server computes: any deviation
breaks signatures and event IDs. ``unsigned`` is always dropped here; adding
``redacted_because`` when serving a redacted event to clients is done by the
code that serves it.
"""

from __future__ import annotations

from typing import Any

from zhome.rooms.versions import RoomVersion
from zhome.util.fastjson import copy_json

# Top-level keys protected from redaction in v1 to v10.
_TOP_LEVEL_V1 = frozenset(
    {
        "event_id",
        "type",
        "room_id",
        "sender",
        "state_key",
        "content",
        "hashes",
        "signatures",
        "depth",
        "prev_events",
        "prev_state",
        "auth_events",
        "origin",
        "origin_server_ts",
        "membership",
    }
)

# v11 stopped protecting origin, membership and prev_state: nothing in the
# auth rules reads them any more.
_TOP_LEVEL_V11 = _TOP_LEVEL_V1 - {"origin", "membership", "prev_state"}

_POWER_LEVELS_V1 = frozenset(
    {"ban", "events", "events_default", "kick", "redact", "state_default", "users", "users_default"}
)


def _top_level_keys(room_version: RoomVersion) -> frozenset[str]:
    return _TOP_LEVEL_V11 if room_version.updated_redaction_rules else _TOP_LEVEL_V1


def _content_keys(room_version: RoomVersion, event_type: Any) -> frozenset[str]:
    """The keys of ``content`` kept for ``event_type`` (other than v11 specials)."""
    if event_type == "m.room.member":
        if room_version.restricted_join_rule_fix:
            # v9: without it a redacted restricted join fails auth on
            # servers that check the auth chain (spec issue #3373).
            return frozenset({"membership", "join_authorised_via_users_server"})
        return frozenset({"membership"})
    if event_type == "m.room.create":
        # v11+ keeps the whole content; handled by the caller.
        return frozenset({"creator"})
    if event_type == "m.room.join_rules":
        if room_version.restricted_join_rule:
            # v8: "allow" decides who may join a restricted room.
            return frozenset({"join_rule", "allow"})
        return frozenset({"join_rule"})
    if event_type == "m.room.power_levels":
        if room_version.updated_redaction_rules:
            return _POWER_LEVELS_V1 | {"invite"}
        return _POWER_LEVELS_V1
    if event_type == "m.room.history_visibility":
        return frozenset({"history_visibility"})
    if event_type == "m.room.aliases" and room_version.special_case_aliases_auth:
        # v1-v5 only: the aliases event had its own auth rule then.
        return frozenset({"aliases"})
    if event_type == "m.room.redaction" and room_version.updated_redaction_rules:
        # v11: "redacts" moved into content and must survive redaction so a
        # redacted redaction still says what it redacted.
        return frozenset({"redacts"})
    return frozenset()


def _prune_content(room_version: RoomVersion, event_type: Any, content: Any) -> dict[str, Any]:
    if not isinstance(content, dict):
        # Not a valid event; an object is the only shape content can have.
        return {}
    if event_type == "m.room.create" and room_version.updated_redaction_rules:
        return copy_json(content)
    allowed = _content_keys(room_version, event_type)
    pruned = {k: copy_json(v) for k, v in content.items() if k in allowed}
    if event_type == "m.room.member" and room_version.updated_redaction_rules:
        # v11: the identity server's signed block is what authorises a
        # third-party invite, so it is kept (and nothing else from it).
        tpi = content.get("third_party_invite")
        if isinstance(tpi, dict) and "signed" in tpi:
            pruned["third_party_invite"] = {"signed": copy_json(tpi["signed"])}
    return pruned


def prune_event_dict(room_version: RoomVersion, pdu: dict[str, Any]) -> dict[str, Any]:
    """The redacted form of ``pdu`` under ``room_version``'s rules.

    Returns a new dict sharing no mutable values with ``pdu``; ``pdu`` is
    not changed. Keys absent from ``pdu`` are never added.
    """
    keep = _top_level_keys(room_version)
    pruned: dict[str, Any] = {}
    for key, value in pdu.items():
        if key not in keep:
            continue
        if key == "content":
            pruned["content"] = _prune_content(room_version, pdu.get("type"), value)
        else:
            pruned[key] = copy_json(value)
    return pruned
