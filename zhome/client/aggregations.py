"""Bundled aggregations: ``unsigned["m.relations"]`` of the events served
to clients.

Spec: client-server-api "Aggregations of child events" (state events get
none; child events of ignored users are not considered), "Server-side
aggregation of m.thread relationships" (``latest_event``, the most recent
reply by an unignored user, served as the event itself is, with its own
aggregations; ``count``; ``current_user_participated``), "Server-side
aggregation of m.replace relationships" (the most recent valid replacement
by ``origin_server_ts`` then the largest ``event_id``; none for a redacted
original; the original's content is left as it is), "Reference relations"
(``chunk`` of event IDs); "Event annotations and reactions" (m.annotation
is not aggregated).

Called by ``serialize_events`` (zhome/client/serialize.py) for every list
of events served to a user, so it reads once for the whole list: the
relations index for all candidate parents (zhome/storage/relations.py,
cached; events of rooms without any relation cost nothing), then the
bundled events together, their visibility together and their own
aggregations together.

Which events are parents: not state events; an edit has no edits (the
original of a valid replacement is no edit itself) and a thread is only
started by an event that relates to nothing (``m.thread`` cannot target a
child); references may point at any event. A bundled event the user may not see
(history visibility) is not bundled: a thread's latest event is then the
newest one they may see among the latest of each participant.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Optional

from zhome.client.serialize import serialize_events
from zhome.rooms.events import Event
from zhome.rooms.visibility import Visibility
from zhome.storage.events import EventsStore
from zhome.storage.relations import REFERENCE, REPLACE, THREAD, AggRow, RelationsStore, latest_edit, replaceable
from zhome.storage.relations import served_relation as own_relation

#: Latest replies of a thread (one per participant, newest first) tried
#: for its latest_event when newer ones are hidden from the user.
LATEST_CANDIDATES = 5


class BundledAggregations:
    def __init__(self, events: EventsStore, relations: RelationsStore, visibility: Visibility,
                 ignored_users: Callable[[str], Awaitable[frozenset[str]]]) -> None:
        self.events = events
        self.relations = relations
        self.visibility = visibility
        self.ignored_users = ignored_users

    async def __call__(self, events: list[Event], requester: Any, with_room_id: bool) -> dict[str, dict[str, Any]]:
        parents: dict[str, tuple[Event, Optional[tuple[str, str]]]] = {}
        for ev in events:
            if not ev.is_state() and not ev.rejected_reason:
                parents[ev.event_id] = (ev, own_relation(ev))
        if not parents:
            return {}
        rows = await self.relations.aggregation_rows([(e.event_id, e.room_id) for e, _ in parents.values()])
        if not rows:
            return {}
        user_id: str = requester.user_id
        ignored = await self.ignored_users(user_id)

        threads: dict[str, tuple[list[AggRow], int, bool]] = {}
        edits: dict[str, AggRow] = {}
        references: dict[str, list[str]] = {}
        for parent_id, parent_rows in rows.items():
            ev, rel = parents[parent_id]
            replies = [r for r in parent_rows if r.rel_type == THREAD and r.sender not in ignored]
            if replies and rel is None:
                participated = ev.sender == user_id or any(
                    r.sender == user_id for r in parent_rows if r.rel_type == THREAD)
                newest = sorted(replies, key=lambda r: r.position, reverse=True)[:LATEST_CANDIDATES]
                threads[parent_id] = (newest, sum(r.number for r in replies), participated)
            # The index gives only edits by the original's sender with its
            # type; an edit cannot be edited.
            newest_edit = latest_edit(parent_rows)
            if newest_edit is not None and not ev.internal.get("redacted_by") and ev.sender not in ignored \
                    and replaceable(rel):
                edits[parent_id] = newest_edit
            refs = [r.event_id for r in parent_rows if r.rel_type == REFERENCE and r.sender not in ignored]
            if refs:
                references[parent_id] = refs

        wanted = [r.event_id for newest, _, _ in threads.values() for r in newest]
        wanted += [r.event_id for r in edits.values()]
        fetched = await self.events.get_events(wanted) if wanted else {}
        usable = [e for e in fetched.values() if not e.rejected_reason and not e.internal.get("soft_failed")
                  and not e.internal.get("outlier") and not e.internal.get("redacted_by")]
        visible = {e.event_id: e for e in await self.visibility.filter_events(user_id, usable)}

        latest: dict[str, Event] = {}
        for parent_id, (newest, _, _) in threads.items():
            for r in newest:
                cand = visible.get(r.event_id)
                if cand is not None and own_relation(cand) == (THREAD, parent_id):
                    latest[parent_id] = cand
                    break
        replacements: dict[str, Event] = {}
        for parent_id, r in edits.items():
            cand = visible.get(r.event_id)
            if cand is not None and own_relation(cand) == (REPLACE, parent_id):
                replacements[parent_id] = cand

        # The bundled events as they are served themselves: a thread's
        # latest event with its own aggregations (it is a thread reply, so
        # no thread of its own: this recursion ends there), an edit without.
        latest_ids = list(dict.fromkeys(e.event_id for e in latest.values()))
        latest_views = dict(zip(latest_ids, await serialize_events(
            self.events, [fetched[i] for i in latest_ids], with_room_id, requester))) if latest_ids else {}
        edit_ids = list(dict.fromkeys(e.event_id for e in replacements.values()))
        edit_views = dict(zip(edit_ids, await serialize_events(
            self.events, [fetched[i] for i in edit_ids], with_room_id, requester, bundle=False))) if edit_ids else {}

        out: dict[str, dict[str, Any]] = {}
        for parent_id, (_, count, participated) in threads.items():
            if parent_id in latest:
                out.setdefault(parent_id, {})[THREAD] = {
                    "latest_event": latest_views[latest[parent_id].event_id],
                    "count": count,
                    "current_user_participated": participated,
                }
        for parent_id, edit in replacements.items():
            out.setdefault(parent_id, {})[REPLACE] = edit_views[edit.event_id]
        for parent_id, refs in references.items():
            out.setdefault(parent_id, {})[REFERENCE] = {"chunk": [{"event_id": e} for e in refs]}
        return out
