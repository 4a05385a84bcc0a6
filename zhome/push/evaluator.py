"""Push rule evaluation: which actions a user's ruleset gives an event.

Spec: client-server-api "Push Notifications" → "Push Rules" (kinds and the
order they are checked in, content/room/sender rules), "Conditions" (every
condition kind), "Actions" (``notify``, the ``highlight`` tweak) and
"Predefined Rules" (the legacy mention rules are only for events without
``m.mentions``); appendices "Dot-separated property paths" and
"Glob-style matching".

Pure code: the caller supplies the ruleset (``zhome.push.rules``), the
user's display name in the room, the joined member count and power levels.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Optional

from zhome.rooms.events import Event

KINDS_IN_ORDER: tuple[str, ...] = ("override", "content", "room", "sender", "underride")

# Predefined Rules: these three are deprecated since v1.7 and "should only be
# enabled if the event does not have an m.mentions property".
_LEGACY_MENTION_RULES = frozenset({".m.rule.contains_display_name", ".m.rule.roomnotif",
                                   ".m.rule.contains_user_name"})

# Spec "sender_notification_permission": m.room.power_levels notifications
# defaults; "room" is the only key the spec defines.
_NOTIFICATION_LEVEL_DEFAULT = 50

# Word characters for the content.body word-boundary rule: anything outside
# [A-Za-z0-9_] is a boundary (not Python's Unicode-aware \w).
_WORD = "A-Za-z0-9_"

_MAX_SAFE_INT = 2**53 - 1
_MISSING = object()

_MEMBER_COUNT_RE = re.compile(r"(==|<=|>=|<|>)?([0-9]+)")


# -- dot-separated property paths ---------------------------------------------
@lru_cache(maxsize=1024)
def split_key(key: str) -> tuple[str, ...]:
    """The property names of a dotted path: ``\\.`` is a literal dot,
    ``\\\\`` a literal backslash; other backslashes are taken as-is."""
    parts: list[str] = []
    cur: list[str] = []
    i, n = 0, len(key)
    while i < n:
        c = key[i]
        if c == "\\" and i + 1 < n and key[i + 1] in ".\\":
            cur.append(key[i + 1])
            i += 2
            continue
        if c == ".":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return tuple(parts)


def lookup(event: Event, key: str) -> Any:
    """The value at ``key`` in the event, or ``_MISSING``."""
    path = split_key(key)
    head = path[0]
    value: Any
    if head == "room_id":
        # A property: v12 create events have no room_id in the PDU.
        value = event.room_id
        if value is None:
            return _MISSING
    elif head == "event_id":
        value = event.event_id
    else:
        value = event.pdu.get(head, _MISSING)
    for name in path[1:]:
        if not isinstance(value, dict):
            return _MISSING
        value = value.get(name, _MISSING)
    return value


# -- glob matching --------------------------------------------------------------
def _glob_body(pattern: str) -> str:
    out = []
    for c in pattern:
        if c == "*":
            out.append(".*?")
        elif c == "?":
            out.append(".")
        else:
            out.append(re.escape(c))
    return "".join(out)


@lru_cache(maxsize=4096)
def _glob_re(pattern: str, words: bool) -> re.Pattern[str]:
    body = _glob_body(pattern)
    if words:
        # The matched substring must start and end at a word boundary: the
        # character just outside it, if any, is not a word character.
        body = f"(?<![{_WORD}])(?:{body})(?![{_WORD}])"
    return re.compile(body, re.IGNORECASE | re.DOTALL)


def glob_matches(pattern: str, value: str, words: bool = False) -> bool:
    """Spec glob match, case-insensitive: the whole value, or (``words``) any
    substring delimited by word boundaries, as for ``content.body``."""
    if words and "*" not in pattern and "?" not in pattern and not _may_contain(value, pattern):
        # A literal word that is not even a substring cannot match; this
        # skips compiling a per-user pattern for most messages.
        return False
    r = _glob_re(pattern, words)
    return (r.search(value) if words else r.fullmatch(value)) is not None


@lru_cache(maxsize=256)
def _folded(text: str) -> str:
    return text.casefold()


def _may_contain(haystack: str, needle: str) -> bool:
    """False when ``needle`` cannot occur in ``haystack`` ignoring case.

    Case-insensitive regex matching equates characters with the same simple
    case folding, which full case folding also equates, so a regex match
    implies this substring test holds.
    """
    return _folded(needle) in _folded(haystack)


@lru_cache(maxsize=4096)
def _literal_words_re(text: str) -> re.Pattern[str]:
    return re.compile(f"(?<![{_WORD}]){re.escape(text)}(?![{_WORD}])", re.IGNORECASE)


# -- exact values -----------------------------------------------------------------
def _is_simple(v: Any) -> bool:
    """A non-compound canonical JSON value: string, integer in range, bool, null."""
    if v is None or isinstance(v, (str, bool)):
        return True
    return isinstance(v, int) and -_MAX_SAFE_INT <= v <= _MAX_SAFE_INT


def _same_value(a: Any, b: Any) -> bool:
    # JSON types do not mix: true is not 1 although Python says so.
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if a is None or b is None:
        return a is None and b is None
    return type(a) is type(b) and a == b


def _as_int(v: Any) -> Optional[int]:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            return None
    return None


# -- conditions -----------------------------------------------------------------------
class _Context:
    __slots__ = ("event", "user_id", "display_name", "member_count", "power_levels", "sender_level")

    def __init__(self, event: Event, user_id: str, display_name: Optional[str], member_count: int,
                 power_levels: dict[str, Any], sender_level: int) -> None:
        self.event = event
        self.user_id = user_id
        self.display_name = display_name
        self.member_count = member_count
        self.power_levels = power_levels
        self.sender_level = sender_level


def _body(event: Event) -> Optional[str]:
    body = event.content.get("body")
    return body if isinstance(body, str) else None


def _event_match(cond: dict[str, Any], ctx: _Context) -> bool:
    key, pattern = cond.get("key"), cond.get("pattern")
    if not isinstance(key, str) or not isinstance(pattern, str):
        return False
    value = lookup(ctx.event, key)
    if not isinstance(value, str):
        return False
    return glob_matches(pattern, value, words=(split_key(key) == ("content", "body")))


def _event_property_is(cond: dict[str, Any], ctx: _Context) -> bool:
    key = cond.get("key")
    if not isinstance(key, str) or "value" not in cond:
        return False
    value = lookup(ctx.event, key)
    if value is _MISSING or not _is_simple(value):
        return False
    return _same_value(value, cond["value"])


def _event_property_contains(cond: dict[str, Any], ctx: _Context) -> bool:
    key = cond.get("key")
    if not isinstance(key, str) or "value" not in cond:
        return False
    value = lookup(ctx.event, key)
    if not isinstance(value, list):
        return False
    wanted = cond["value"]
    return any(_is_simple(v) and _same_value(v, wanted) for v in value)


def _contains_display_name(cond: dict[str, Any], ctx: _Context) -> bool:
    name = ctx.display_name
    body = _body(ctx.event)
    if not name or body is None or not _may_contain(body, name):
        return False
    return _literal_words_re(name).search(body) is not None


def _room_member_count(cond: dict[str, Any], ctx: _Context) -> bool:
    spec = cond.get("is")
    if not isinstance(spec, str):
        return False
    m = _MEMBER_COUNT_RE.fullmatch(spec)
    if m is None:
        return False
    op, n = m.group(1) or "==", int(m.group(2))
    c = ctx.member_count
    if op == "==":
        return c == n
    if op == "<":
        return c < n
    if op == ">":
        return c > n
    if op == "<=":
        return c <= n
    return c >= n


def _sender_notification_permission(cond: dict[str, Any], ctx: _Context) -> bool:
    key = cond.get("key")
    if not isinstance(key, str):
        return False
    notifications = ctx.power_levels.get("notifications")
    required: Optional[int] = None
    if isinstance(notifications, dict) and key in notifications:
        required = _as_int(notifications[key])
    if required is None:
        required = _NOTIFICATION_LEVEL_DEFAULT
    return ctx.sender_level >= required


_CONDITIONS = {
    "event_match": _event_match,
    "event_property_is": _event_property_is,
    "event_property_contains": _event_property_contains,
    "contains_display_name": _contains_display_name,
    "room_member_count": _room_member_count,
    "sender_notification_permission": _sender_notification_permission,
}


def condition_matches(cond: Any, ctx: _Context) -> bool:
    if not isinstance(cond, dict):
        return False
    check = _CONDITIONS.get(cond.get("kind"))  # type: ignore[arg-type]
    # Unrecognised conditions never match, which disables their rule.
    return check is not None and check(cond, ctx)


def _rule_matches(kind: str, rule: dict[str, Any], ctx: _Context) -> bool:
    if kind == "content":
        pattern = rule.get("pattern")
        body = _body(ctx.event)
        return isinstance(pattern, str) and body is not None and glob_matches(pattern, body, words=True)
    if kind == "room":
        return rule.get("rule_id") == ctx.event.room_id
    if kind == "sender":
        return rule.get("rule_id") == ctx.event.sender
    conditions = rule.get("conditions", [])
    if not isinstance(conditions, list):
        return False
    return all(condition_matches(c, ctx) for c in conditions)


def evaluate(
    ruleset: dict[str, Any],
    event: Event,
    user_id: str,
    display_name: Optional[str],
    room_member_count: int,
    power_levels: dict[str, Any],
    sender_power_level: int,
) -> Optional[list[Any]]:
    """The actions of the first enabled rule that matches ``event`` for
    ``user_id``, checking kinds in the spec's order; None when none match.

    ``ruleset`` is ``{"global": {kind: [rule, ...]}}`` or the inner dict.
    """
    rules_by_kind = ruleset.get("global", ruleset)
    ctx = _Context(event, user_id, display_name, room_member_count, power_levels or {}, sender_power_level)
    has_mentions = "m.mentions" in event.content
    for kind in KINDS_IN_ORDER:
        for rule in rules_by_kind.get(kind) or ():
            if not rule.get("enabled", True):
                continue
            if has_mentions and rule.get("rule_id") in _LEGACY_MENTION_RULES:
                continue
            if _rule_matches(kind, rule, ctx):
                actions = rule.get("actions", [])
                return list(actions) if isinstance(actions, list) else []
    return None


# -- actions ---------------------------------------------------------------------------
def actions_notify(actions: Optional[list[Any]]) -> bool:
    return bool(actions) and "notify" in actions  # type: ignore[operator]


def actions_highlight(actions: Optional[list[Any]]) -> bool:
    """Whether the ``highlight`` tweak is on: given with no value or with
    ``true`` (spec "Actions"); a later tweak overrides an earlier one."""
    highlight = False
    for a in actions or ():
        if isinstance(a, dict) and a.get("set_tweak") == "highlight":
            highlight = a.get("value", True) is True
    return highlight
