"""Push rules for every member of a room at once.

Spec: client-server-api "Push Notifications" → "Push Rules" ("Predefined
Rules", "Conditions"). A message into a room is evaluated against the rules
of every local member, which in an all-staff room is thousands of times per
message. Most members' rules differ only in the server-default rules that
name them (``.m.rule.invite_for_me``, ``.m.rule.is_user_mention``,
``.m.rule.contains_user_name``) and in ``contains_display_name``; everything
else in a member's context (the event, the member count, the power levels)
is the same for all of them.

So the members are grouped by template (the same stored rules, see
``zhome.push.cache``): a member whose local part and display name occur in
none of the event's strings, ignoring case, gets the template's neutral
answer, evaluated once as a user that no event names. Every such rule
compares one string of the event with the user's ID, local part or name
(case-insensitively, for globs and names), and the local part is part of
the ID, so a rule that names the member can only match when one of those
occurs in a string of the event: the members for whom it does are
evaluated one by one with their own ruleset, as before.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from zhome.push.cache import NO_ONE, RulesetCache, Template
from zhome.push.evaluator import actions_notify, evaluate
from zhome.rooms.events import Event

_NEUTRAL_LOCALPART = "\x00"


def _strings(value: Any, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, dict):
        for v in value.values():
            _strings(v, out)
    elif isinstance(value, list):
        for v in value:
            _strings(v, out)


def event_haystack(event: Event) -> str:
    """Every string an evaluation can compare with a user's ID or name,
    case-folded: the content's string values and the state key."""
    parts: list[str] = []
    _strings(event.content, parts)
    if event.state_key is not None:
        parts.append(event.state_key)
    return "\n".join(parts).casefold()


def _localpart(user_id: str) -> str:
    end = user_id.find(":")
    return user_id[1:end] if end > 0 else user_id.lstrip("@")


def names_user(haystack: str, user_id: str, display_name: Optional[str]) -> bool:
    """Whether the event may name the user, by ID, local part or display
    name; False only when no rule can treat them apart from anyone else."""
    if _localpart(user_id).casefold() in haystack:
        return True
    return bool(display_name) and display_name.casefold() in haystack  # type: ignore[union-attr]


async def actions_for_members(
    cache: RulesetCache,
    event: Event,
    targets: Iterable[tuple[str, Optional[str]]],
    member_count: int,
    power_levels: dict[str, Any],
    sender_level: int,
) -> dict[str, list[Any]]:
    """The notifying actions of each of ``targets`` ((user ID, display
    name) pairs) for ``event``. Members left out are not notified. Members
    with the same answer share one list: it must not be mutated."""
    haystack = event_haystack(event)
    # An event that names the neutral user itself cannot be answered for it.
    grouping = _NEUTRAL_LOCALPART not in haystack and NO_ONE.casefold() not in haystack
    neutral: dict[str, Optional[list[Any]]] = {}
    out: dict[str, list[Any]] = {}
    for user_id, name in targets:
        t: Optional[Template] = cache.cached_template(user_id)
        if t is None:
            t = await cache.template(user_id)
        if grouping and not names_user(haystack, user_id, name):
            if t.key in neutral:
                actions = neutral[t.key]
            else:
                actions = evaluate(t.neutral, event, NO_ONE, None, member_count, power_levels, sender_level)
                if actions is not None and not actions_notify(actions):
                    actions = None
                neutral[t.key] = actions
        else:
            actions = evaluate(await cache.get(user_id), event, user_id, name, member_count, power_levels,
                               sender_level)
            if actions is not None and not actions_notify(actions):
                actions = None
        if actions is not None:
            out[user_id] = actions
    return out
