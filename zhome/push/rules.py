"""Push rules: the server-default rule set and the merged per-user ruleset.

Spec: client-server-api "Push Notifications" → "Push Rules" (kinds and their
order), "Predefined Rules" (the server-default rules), "Push Rules: API" and
"Push Rules: Events" (the ``m.push_rules`` account data content).

Everything here is pure: the caller reads the user's stored rules and
enabled/actions overrides (``UserDataStore.get_push_rule_changes``) and passes
them to :func:`build_ruleset`.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable, Optional

from zhome.util.ids import split_id

# In the order the spec says they are checked.
KINDS: tuple[str, ...] = ("override", "content", "room", "sender", "underride")

# Placeholders in the templates below, replaced per user.
_USER_ID = "[the user's Matrix ID]"
_LOCALPART = "[the local part of the user's Matrix ID]"

_SOUND_DEFAULT: dict[str, Any] = {"set_tweak": "sound", "value": "default"}
_HIGHLIGHT: dict[str, Any] = {"set_tweak": "highlight"}


def _rule(rule_id: str, actions: list[Any], conditions: Optional[list[dict[str, Any]]] = None,
          pattern: Optional[str] = None, enabled: bool = True) -> dict[str, Any]:
    r: dict[str, Any] = {"rule_id": rule_id, "default": True, "enabled": enabled}
    if conditions is not None:
        r["conditions"] = conditions
    if pattern is not None:
        r["pattern"] = pattern
    r["actions"] = actions
    return r


def _match(key: str, pattern: str) -> dict[str, Any]:
    return {"kind": "event_match", "key": key, "pattern": pattern}


# .m.rule.master is kept apart: it is the one default rule that outranks the
# user's own override rules ("Predefined Rules").
_MASTER = _rule(".m.rule.master", [], [], enabled=False)

_DEFAULT_OVERRIDE: list[dict[str, Any]] = [
    _rule(".m.rule.suppress_notices", [], [_match("content.msgtype", "m.notice")]),
    _rule(
        ".m.rule.invite_for_me",
        ["notify", _SOUND_DEFAULT],
        [_match("type", "m.room.member"), _match("content.membership", "invite"), _match("state_key", _USER_ID)],
    ),
    _rule(".m.rule.member_event", [], [_match("type", "m.room.member")]),
    _rule(
        ".m.rule.is_user_mention",
        ["notify", _SOUND_DEFAULT, _HIGHLIGHT],
        [{"kind": "event_property_contains", "key": "content.m\\.mentions.user_ids", "value": _USER_ID}],
    ),
    _rule(".m.rule.contains_display_name", ["notify", _SOUND_DEFAULT, _HIGHLIGHT],
          [{"kind": "contains_display_name"}]),
    _rule(
        ".m.rule.is_room_mention",
        ["notify", _HIGHLIGHT],
        [
            {"kind": "event_property_is", "key": "content.m\\.mentions.room", "value": True},
            {"kind": "sender_notification_permission", "key": "room"},
        ],
    ),
    _rule(
        ".m.rule.roomnotif",
        ["notify", _HIGHLIGHT],
        [_match("content.body", "@room"), {"kind": "sender_notification_permission", "key": "room"}],
    ),
    _rule(".m.rule.tombstone", ["notify", _HIGHLIGHT], [_match("type", "m.room.tombstone"), _match("state_key", "")]),
    _rule(".m.rule.reaction", [], [_match("type", "m.reaction")]),
    _rule(".m.rule.room.server_acl", [], [_match("type", "m.room.server_acl"), _match("state_key", "")]),
    _rule(
        ".m.rule.suppress_edits",
        [],
        [{"kind": "event_property_is", "key": "content.m\\.relates_to.rel_type", "value": "m.replace"}],
    ),
]

_DEFAULT_CONTENT: list[dict[str, Any]] = [
    _rule(".m.rule.contains_user_name", ["notify", _SOUND_DEFAULT, _HIGHLIGHT], pattern=_LOCALPART),
]

_DEFAULT_UNDERRIDE: list[dict[str, Any]] = [
    _rule(".m.rule.call", ["notify", {"set_tweak": "sound", "value": "ring"}], [_match("type", "m.call.invite")]),
    _rule(
        ".m.rule.encrypted_room_one_to_one",
        ["notify", _SOUND_DEFAULT],
        [{"kind": "room_member_count", "is": "2"}, _match("type", "m.room.encrypted")],
    ),
    _rule(
        ".m.rule.room_one_to_one",
        ["notify", _SOUND_DEFAULT],
        [{"kind": "room_member_count", "is": "2"}, _match("type", "m.room.message")],
    ),
    _rule(".m.rule.message", ["notify"], [_match("type", "m.room.message")]),
    _rule(".m.rule.encrypted", ["notify"], [_match("type", "m.room.encrypted")]),
]

# Historical actions the spec says to strip ("Historical Actions").
HISTORICAL_ACTIONS = frozenset({"dont_notify", "coalesce"})


def _substitute(value: Any, user_id: str, localpart: str) -> Any:
    if isinstance(value, str):
        if value == _USER_ID:
            return user_id
        if value == _LOCALPART:
            return localpart
        return value
    if isinstance(value, list):
        return [_substitute(v, user_id, localpart) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, user_id, localpart) for k, v in value.items()}
    return value


def _localpart(user_id: str) -> str:
    try:
        return split_id(user_id, "@")[0]
    except ValueError:
        # Not a well-formed ID; the rule then matches nothing useful, which
        # is better than failing the whole ruleset.
        return user_id.lstrip("@").split(":", 1)[0]


def default_rules(user_id: str) -> dict[str, list[dict[str, Any]]]:
    """The server-default rules per kind for ``user_id``, master first.

    Fresh copies: callers may mutate them.
    """
    lp = _localpart(user_id)
    return {
        "override": [_substitute(r, user_id, lp) for r in [_MASTER, *_DEFAULT_OVERRIDE]],
        "content": [_substitute(r, user_id, lp) for r in _DEFAULT_CONTENT],
        "room": [],
        "sender": [],
        "underride": [_substitute(r, user_id, lp) for r in _DEFAULT_UNDERRIDE],
    }


def _has_placeholder(value: Any) -> bool:
    if isinstance(value, str):
        return value in (_USER_ID, _LOCALPART)
    if isinstance(value, list):
        return any(_has_placeholder(v) for v in value)
    if isinstance(value, dict):
        return any(_has_placeholder(v) for v in value.values())
    return False


# Per kind: each default rule with whether it names the user. Rules that do
# not are the same for everyone, so every user's merged ruleset shares them
# (a ruleset is read-only once built; a few hundred cached rulesets would
# otherwise hold a few MB of identical dicts).
_TEMPLATES: dict[str, list[tuple[dict[str, Any], bool]]] = {
    "override": [(r, _has_placeholder(r)) for r in [_MASTER, *_DEFAULT_OVERRIDE]],
    "content": [(r, _has_placeholder(r)) for r in _DEFAULT_CONTENT],
    "room": [],
    "sender": [],
    "underride": [(r, _has_placeholder(r)) for r in _DEFAULT_UNDERRIDE],
}


def _shared_default_rules(user_id: str) -> dict[str, list[dict[str, Any]]]:
    """Like ``default_rules`` but user-independent rules are the shared
    templates themselves: never mutate what this returns."""
    lp = _localpart(user_id)
    return {kind: [_substitute(r, user_id, lp) if named else r for r, named in rules]
            for kind, rules in _TEMPLATES.items()}


def default_rule(user_id: str, kind: str, rule_id: str) -> Optional[dict[str, Any]]:
    for r in default_rules(user_id).get(kind, []):
        if r["rule_id"] == rule_id:
            return r
    return None


def is_default_rule_id(rule_id: str) -> bool:
    # Spec: server-default rule IDs, and only they, start with a dot.
    return rule_id.startswith(".")


def render_user_rule(kind: str, rule_id: str, rule: dict[str, Any], enabled: bool = True) -> dict[str, Any]:
    """A stored user-defined rule as the API shows it.

    Only the keys the kind allows are emitted: ``conditions`` for
    override/underride, ``pattern`` for content (spec ``PushRule``).
    """
    out: dict[str, Any] = {"rule_id": rule_id, "default": False, "enabled": enabled}
    if kind in ("override", "underride"):
        out["conditions"] = copy.deepcopy(rule.get("conditions", []))
    elif kind == "content":
        out["pattern"] = rule.get("pattern", "")
    out["actions"] = copy.deepcopy(rule.get("actions", []))
    return out


def build_ruleset(
    user_id: str,
    user_rules: Iterable[tuple[str, str, int, dict[str, Any]]],
    enables: Iterable[tuple[str, str, Any, Optional[list[Any]]]],
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """The user's complete ruleset: ``{"global": {kind: [rule, ...]}}``.

    ``user_rules`` are ``(kind, rule_id, priority, rule)`` with lower
    priority values more important; ``enables`` are ``(kind, rule_id,
    enabled, actions or None)`` overrides for any rule, default or not.

    Order per kind follows "Predefined Rules": user-defined rules outrank the
    server defaults of the same kind, except ``.m.rule.master``, which
    outranks everything.
    """
    overrides: dict[tuple[str, str], tuple[bool, Optional[list[Any]]]] = {
        (k, r): (bool(e), a) for k, r, e, a in enables
    }

    by_kind: dict[str, list[tuple[int, int, dict[str, Any]]]] = {k: [] for k in KINDS}
    for i, (kind, rule_id, priority, rule) in enumerate(user_rules):
        if kind in by_kind:
            # The input position breaks ties so equal priorities stay stable.
            by_kind[kind].append((priority, i, render_user_rule(kind, rule_id, rule)))

    defaults = _shared_default_rules(user_id)
    out: dict[str, list[dict[str, Any]]] = {}
    for kind in KINDS:
        users = [r for _, _, r in sorted(by_kind[kind], key=lambda t: (t[0], t[1]))]
        dflt = defaults[kind]
        if kind == "override":
            rules = dflt[:1] + users + dflt[1:]
        else:
            rules = users + dflt
        for i, r in enumerate(rules):
            ov = overrides.get((kind, r["rule_id"]))
            if ov is not None:
                # A copy: ``r`` may be a template shared by every user.
                r = rules[i] = dict(r)
                r["enabled"] = ov[0]
                if ov[1] is not None:
                    r["actions"] = copy.deepcopy(ov[1])
        out[kind] = rules
    return {"global": out}


def find_rule(ruleset: dict[str, dict[str, list[dict[str, Any]]]], kind: str,
              rule_id: str) -> Optional[dict[str, Any]]:
    for r in ruleset["global"].get(kind, []):
        if r["rule_id"] == rule_id:
            return r
    return None


async def load_ruleset(user_data: Any, user_id: str) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Read the user's stored rules from ``UserDataStore`` and merge them.

    ``/sync`` needs this for the initial ``m.push_rules`` account data when
    the user has never changed a rule (nothing is stored then).
    """
    user_rules, enables = await user_data.get_push_rule_changes(user_id)
    return build_ruleset(user_id, user_rules, enables)
