"""Building, signing, checking and sending local events.

Spec: server-server-api "PDUs" (prev_events, auth_events, depth, hashes,
signatures) and "Authorization rules". A local event is built on the room's
forward extremities and the state after them, hashed and signed, checked
against the auth rules, then handed to the one persistence path.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Optional

from twisted.internet import defer

from unpaddedbase64 import encode_base64

from zhome.crypto.canonical import check_canonical_json_value
from zhome.crypto.event_hashing import compute_reference_hash, hash_and_sign_event
from zhome.rooms.state_res import resolve_state
from zhome.http.errors import MatrixError, bad_json, forbidden, not_found
from zhome.push.bulk import actions_for_members
from zhome.push.evaluator import actions_highlight
from zhome.rooms import auth
from zhome.rooms.events import Event, StateMap
from zhome.rooms.joined_members import JoinedMembers
from zhome.rooms.persistence import Persister
from zhome.rooms.validation import check_pdu_size
from zhome.rooms.versions import EventIdFormat, RoomVersion, get_room_version
from zhome.storage.events import EventsStore, PersistItem, TransactionIdUsed
from zhome.storage.rooms import RoomsStore

MAX_DEPTH = 2**63 - 1
MAX_PREV_EVENTS = 10
# Message types that count towards unread notifications.
_NOTIFYING_TYPES = {"m.room.message", "m.room.encrypted", "m.sticker", "m.call.invite", "m.poll.start"}


class RoomLocks:
    """One lock per room: events of a room are built and persisted in turn,
    so each new local event extends the previous one instead of forking."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[defer.DeferredLock, int]] = {}

    @asynccontextmanager
    async def lock(self, room_id: str) -> AsyncIterator[None]:
        lk, n = self._locks.get(room_id, (defer.DeferredLock(), 0))
        self._locks[room_id] = (lk, n + 1)
        await lk.acquire()
        try:
            yield
        finally:
            lk.release()
            lk2, n2 = self._locks[room_id]
            if n2 <= 1:
                del self._locks[room_id]
            else:
                self._locks[room_id] = (lk2, n2 - 1)


class EventCreator:
    def __init__(
        self,
        server_name: str,
        signing_key: Any,
        events: EventsStore,
        rooms: RoomsStore,
        persister: Persister,
        push_rules_cache: Any = None,
    ) -> None:
        self.server_name = server_name
        self.signing_key = signing_key
        self.events = events
        self.rooms = rooms
        self.persister = persister
        # zhome.push.cache.RulesetCache; None counts messages without push rules.
        self.push_rules_cache = push_rules_cache
        self.joined_members = JoinedMembers(events)
        self.room_locks = RoomLocks()
        #: async (event, state) checks run on every local event before it is
        #: persisted (a check refuses by raising a MatrixError).
        self.pre_send_checks: list[Any] = []

    async def room_version_of(self, room_id: str) -> RoomVersion:
        v = await self.rooms.get_room_version(room_id)
        if v is None:
            raise not_found("Unknown room")
        return get_room_version(v)

    async def state_before_new_event(self, room_id: str) -> tuple[list[str], Optional[int], StateMap, int]:
        """(prev_events, state group, state, depth) for the next local event."""
        prevs = await self.events.get_forward_extremities(room_id)
        if not prevs:
            raise not_found("Unknown room")
        evs = await self.events.get_events(prevs)
        ordered = sorted(evs.values(), key=lambda e: (e.depth, e.internal.get("stream_ordering", 0)), reverse=True)
        ordered = ordered[:MAX_PREV_EVENTS]
        depth = min(MAX_DEPTH, max(e.depth for e in ordered) + 1)
        group = await self.events.get_state_group_for_event(ordered[0].event_id)
        state = dict(await self.events.get_state_group(group)) if group is not None else {}
        if len(ordered) > 1:
            # A fork (only federation makes them): the new event merges it,
            # with the state resolved from every branch. group None asks the
            # persistence path for a new snapshot group.
            sets = [state]
            for e in ordered[1:]:
                g = await self.events.get_state_group_for_event(e.event_id)
                sets.append(dict(await self.events.get_state_group(g)) if g is not None else {})
            rv = ordered[0].room_version
            state = await resolve_state(rv, sets, self.events.get_events)
            group = None
        return [e.event_id for e in ordered], group, state, depth

    def build_pdu(
        self,
        rv: RoomVersion,
        room_id: Optional[str],
        etype: str,
        sender: str,
        content: dict[str, Any],
        state_key: Optional[str],
        prev_events: list[str],
        auth_events: list[str],
        depth: int,
        redacts: Optional[str] = None,
    ) -> dict[str, Any]:
        pdu: dict[str, Any] = {
            "type": etype,
            "sender": sender,
            "content": content,
            "prev_events": prev_events,
            "auth_events": auth_events,
            "depth": depth,
            "origin_server_ts": int(time.time() * 1000),
        }
        if room_id is not None:
            pdu["room_id"] = room_id
        if state_key is not None:
            pdu["state_key"] = state_key
        if redacts is not None and not rv.redacts_in_content:
            pdu["redacts"] = redacts
        if rv.event_id_format is EventIdFormat.SERVER_CHOSEN:
            # v1/v2 carry "origin" and reference events by (id, hashes) pairs;
            # hashes may be empty for references we make ourselves.
            pdu["origin"] = self.server_name
            pdu["prev_events"] = [[e, {}] for e in prev_events]
            pdu["auth_events"] = [[e, {}] for e in auth_events]
        return pdu

    def finish_event(self, rv: RoomVersion, pdu: dict[str, Any]) -> Event:
        # Whatever the content came from (a request body, a profile, a
        # template), an event must be canonical JSON: no floats, no NaN, no
        # integers out of range in v6+. Checked before hashing, which would
        # otherwise fail with a 500.
        try:
            check_canonical_json_value(pdu, strict=rv.strict_canonical_json)
        except ValueError as e:
            raise bad_json(f"Bad event content: {e}")
        event_id, signed = hash_and_sign_event(rv, pdu, self.server_name, self.signing_key)
        check_pdu_size(signed)
        return Event(signed, event_id, rv)

    async def create_event(
        self,
        room_id: str,
        etype: str,
        sender: str,
        content: dict[str, Any],
        state_key: Optional[str] = None,
        redacts: Optional[str] = None,
    ) -> tuple[Event, Optional[int], StateMap]:
        """Build and auth-check an event; the caller holds the room lock."""
        rv = await self.room_version_of(room_id)
        if redacts is not None and rv.redacts_in_content:
            content = dict(content, redacts=redacts)
        prevs, group, state, depth = await self.state_before_new_event(room_id)
        auth_keys = auth.auth_types_for_event(rv, etype, state_key, sender, content)
        auth_ids = [state[k] for k in auth_keys if k in state]
        pdu = self.build_pdu(rv, room_id, etype, sender, content, state_key, prevs, auth_ids, depth, redacts)
        if rv.event_id_format is EventIdFormat.SERVER_CHOSEN:
            # v1/v2 reference events together with their reference hashes.
            refs = await self.events.get_events(prevs + auth_ids)
            pdu["prev_events"] = [[e, _ref_hash(refs.get(e))] for e in prevs]
            pdu["auth_events"] = [[e, _ref_hash(refs.get(e))] for e in auth_ids]
        event = self.finish_event(rv, pdu)
        await self.check_auth(event, state)
        return event, group, state

    async def check_auth(self, event: Event, state: StateMap) -> None:
        rv = event.room_version
        keys = auth.auth_types_for_event(rv, event.type, event.state_key, event.sender, event.content)
        if rv.hydra and ("m.room.create", "") not in keys:
            keys = [("m.room.create", "")] + list(keys)
        wanted = {k: state[k] for k in keys if k in state}
        evs = await self.events.get_events(wanted.values())
        auth_events = {k: evs[v] for k, v in wanted.items() if v in evs}
        try:
            auth.check_auth_rules(event, auth_events)
        except auth.AuthError as e:
            raise forbidden(e.msg)

    async def send(
        self,
        room_id: str,
        etype: str,
        sender: str,
        content: dict[str, Any],
        state_key: Optional[str] = None,
        txn_id: Optional[str] = None,
        device_id: Optional[str] = None,
        redacts: Optional[str] = None,
        extra_check: Any = None,
        transform: Any = None,
    ) -> Event:
        """Create, check and persist a local event; returns it once durable."""
        async with self.room_locks.lock(room_id):
            # Whether the transaction ID was used is asked by the transaction
            # that persists the event, so a send costs one interaction (a
            # retry then costs a discarded event); or here when this one
            # cannot be built or checked, since the answer to a retry is the
            # first event even then (a repeated reaction is no duplicate).
            keyed = txn_id is not None and device_id is not None
            try:
                event, group, state = await self.create_event(room_id, etype, sender, content, state_key, redacts)
                for check in self.pre_send_checks:
                    await check(event, state)
                if extra_check is not None:
                    await extra_check(event, state)
                if transform is not None:
                    # E.g. an invite countersigned by the invitee's server.
                    event = await transform(event, state)
            except Exception:
                if txn_id is not None and device_id is not None:
                    sent = await self._event_for(await self.events.get_event_id_for_txn(sender, device_id, txn_id))
                    if sent is not None:
                        return sent
                raise
            actions = await self.push_actions_for(event, state, group=group)
            item = PersistItem(event, group, state, txn_id=txn_id, device_id=device_id,
                               unread=unread_from_actions(actions, event), push_actions=actions,
                               snapshot_before=group is None and bool(state), sender_read=True,
                               check_txn_id=keyed)
            try:
                await self.persister.persist(item)
            except TransactionIdUsed as used:
                sent = await self._event_for(used.event_id)
                if sent is None:
                    raise
                return sent
            return event

    async def _event_for(self, event_id: Optional[str]) -> Optional[Event]:
        return await self.events.get_event(event_id) if event_id is not None else None

    async def send_redactions(self, room_id: str, sender: str, targets: list[str]) -> list[Event]:
        """Redact each of ``targets`` as ``sender``, the redactions chained
        and persisted in one transaction (an erasure sends thousands).
        Raises MatrixError as ``send`` would when ``sender`` may not redact;
        then none is sent."""
        if not targets:
            return []
        async with self.room_locks.lock(room_id):
            rv = await self.room_version_of(room_id)
            prevs, group, state, depth = await self.state_before_new_event(room_id)
            if group is None:
                # A fork to merge first: one ordinary send does it.
                first = await self._send_locked_redaction(room_id, sender, targets[0])
                return [first] + (await self._chain_redactions(room_id, sender, targets[1:], rv))
            return await self._chain_redactions(room_id, sender, targets, rv, (prevs, group, state, depth))

    async def _send_locked_redaction(self, room_id: str, sender: str, target: str) -> Event:
        event, group, state = await self.create_event(room_id, "m.room.redaction", sender, {}, None, target)
        for check in self.pre_send_checks:
            await check(event, state)
        item = PersistItem(event, group, state, snapshot_before=group is None and bool(state))
        await self.persister.persist(item)
        return event

    async def _chain_redactions(self, room_id: str, sender: str, targets: list[str], rv: RoomVersion,
                                before: Optional[tuple[list[str], Optional[int], StateMap, int]] = None
                                ) -> list[Event]:
        if not targets:
            return []
        prevs, group, state, depth = before or await self.state_before_new_event(room_id)
        auth_keys = auth.auth_types_for_event(rv, "m.room.redaction", None, sender, {})
        auth_ids = [state[k] for k in auth_keys if k in state]
        v1_refs = (await self.events.get_events(prevs + auth_ids)
                   if rv.event_id_format is EventIdFormat.SERVER_CHOSEN else {})
        items: list[PersistItem] = []
        for n, target in enumerate(targets):
            content: dict[str, Any] = {"redacts": target} if rv.redacts_in_content else {}
            pdu = self.build_pdu(rv, room_id, "m.room.redaction", sender, content, None, prevs, auth_ids,
                                 depth, target)
            if rv.event_id_format is EventIdFormat.SERVER_CHOSEN:
                pdu["prev_events"] = [[e, _ref_hash(v1_refs.get(e))] for e in prevs]
                pdu["auth_events"] = [[e, _ref_hash(v1_refs.get(e))] for e in auth_ids]
            event = self.finish_event(rv, pdu)
            if n == 0:
                # The same sender against the same state: one check holds for all.
                await self.check_auth(event, state)
                for check in self.pre_send_checks:
                    await check(event, state)
            items.append(PersistItem(event, group, state))
            prevs, depth = [event.event_id], min(MAX_DEPTH, depth + 1)
            v1_refs[event.event_id] = event  # its reference hash, for the next one (v1/v2)
        await self.persister.persist_chain(items)
        return [i.event for i in items]

    async def unread_for(self, event: Event, state: StateMap,
                         for_user: Optional[str] = None) -> dict[str, tuple[bool, bool]]:
        """Local members of ``state`` whose unread counts ``event`` raises: (notify, highlight).

        ``for_user`` limits the answer to that one member.
        """
        return unread_from_actions(await self.push_actions_for(event, state, for_user), event)

    async def push_actions_for(self, event: Event, state: StateMap, for_user: Optional[str] = None,
                               group: Optional[int] = None) -> dict[str, list[Any]]:
        """The push rule actions for each local member of ``state`` (never
        the sender) that ``event`` notifies; members it does not notify are
        left out. ``for_user`` limits the answer to that one member.
        ``group``: the state group ``state`` is, when known (a big room's
        members are then reused from the last event)."""
        if self.push_rules_cache is not None:
            return await self._actions_by_push_rules(event, state, for_user, group)
        if event.type not in _NOTIFYING_TYPES or event.is_state():
            return {}
        suffix = ":" + self.server_name
        members = [
            sk for (t, sk) in state if t == "m.room.member" and sk.endswith(suffix) and sk != event.sender
            and (for_user is None or sk == for_user)
        ]
        if not members:
            return {}
        member_evs = await self.events.get_events(state[("m.room.member", m)] for m in members)
        body = event.content.get("body")
        mentions = event.content.get("m.mentions")
        mentioned = set(mentions.get("user_ids", [])) if isinstance(mentions, dict) and isinstance(
            mentions.get("user_ids"), list) else set()
        out: dict[str, list[Any]] = {}
        for m in members:
            mev = member_evs.get(state[("m.room.member", m)])
            if mev is None or mev.membership != "join":
                continue
            highlight = m in mentioned
            if not highlight and isinstance(body, str):
                name = mev.content.get("displayname")
                highlight = m in body or (isinstance(name, str) and len(name) > 1 and name in body)
            out[m] = ["notify", {"set_tweak": "highlight"}] if highlight else ["notify"]
        return out

    async def _actions_by_push_rules(self, event: Event, state: StateMap, for_user: Optional[str],
                                     group: Optional[int] = None) -> dict[str, list[Any]]:
        """Spec "Receiving notifications": notifications (and so unread
        counts) follow each member's push rules. The joined members come
        from ``joined_members`` (reused while the room's state group is
        the same), rules from the per-user cache, and members whose rules
        cannot tell them apart are evaluated once (``zhome.push.bulk``),
        so a message into a big room costs little per member."""
        members = await self.joined_members.of(event.room_id, state, group)
        suffix = ":" + self.server_name
        joined = members.joined
        targets: list[tuple[str, Optional[str]]]
        if for_user is not None:
            targets = ([(for_user, joined[for_user])] if for_user in joined and for_user != event.sender
                       and for_user.endswith(suffix) else [])
        else:
            targets = [(u, n) for u, n in joined.items() if u != event.sender and u.endswith(suffix)]
        invitee = invite_target(event, self.server_name)
        if invitee is not None and (for_user is None or invitee == for_user) and invitee not in joined:
            # Spec ".m.rule.invite_for_me": the invitee is not a member yet
            # but is notified by their own rules.
            targets.append((invitee, None))
        if not targets:
            return {}
        wanted = [state[k] for k in ((auth.CREATE, ""), (auth.POWER_LEVELS, "")) if k in state]
        evs = await self.events.get_events(wanted)
        auth_events = {k: evs[state[k]] for k in ((auth.CREATE, ""), (auth.POWER_LEVELS, ""))
                       if k in state and state[k] in evs}
        pl = auth_events.get((auth.POWER_LEVELS, ""))
        power_levels = pl.content if pl is not None else {}
        level = auth.get_user_power_level(event.sender, auth_events)
        # v12 creators have infinite power; any finite threshold is below it.
        sender_level = int(level) if level != float("inf") else 2**63
        return await actions_for_members(self.push_rules_cache, event, targets, len(joined), power_levels,
                                         sender_level)

    async def create_room_event(self, rv: RoomVersion, pdu: dict[str, Any]) -> Event:
        return self.finish_event(rv, pdu)


def invite_target(event: Event, server_name: str) -> Optional[str]:
    """The local user an invite event invites (never its sender), if any."""
    if event.type != "m.room.member" or event.membership != "invite":
        return None
    target = event.state_key
    if not target or target == event.sender or not target.endswith(":" + server_name):
        return None
    return target


def unread_from_actions(actions: dict[str, list[Any]], event: Optional[Event] = None) -> dict[str, tuple[bool, bool]]:
    """Unread count increments, (notify, highlight), from ``push_actions_for``.

    With ``event``, an invite does not count for its invitee: the room's
    counts are those of a member, and the invitee is not one (they get the
    notification, not an unread message)."""
    skip = event.state_key if event is not None and event.type == "m.room.member" and \
        event.membership == "invite" else None
    return {user_id: (True, actions_highlight(a)) for user_id, a in actions.items() if user_id != skip}


def _ref_hash(ev: Optional[Event]) -> dict[str, str]:
    if ev is None:
        return {}
    return {"sha256": encode_base64(compute_reference_hash(ev.room_version, ev.pdu), urlsafe=False)}


def raise_if_not_member(membership: Optional[str], msg: str = "You are not in this room") -> None:
    if membership != "join":
        raise MatrixError(403, "M_FORBIDDEN", msg)
