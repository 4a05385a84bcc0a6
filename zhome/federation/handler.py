"""Remote events: receiving PDUs, and joining, leaving, knocking and
inviting across servers.

Spec: server-server-api "Checks performed on receipt of a PDU" (format,
signatures, content hash — redact on mismatch —, auth against the event's
auth events, against the state before it, and soft-fail against current
state), "Retrieving events" (get_missing_events, state, event_auth),
"Joining Rooms" (make_join/send_join v2), "Leaving Rooms", "Knocking",
"Inviting to a room" (invite v2). Every accepted event goes through the one
persistence path.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, Optional

from prometheus_client import Counter
from twisted.internet import defer

from zhome.crypto.canonical import check_canonical_json_value
from zhome.crypto.event_hashing import compute_event_id, hash_and_sign_event, verify_content_hash
from zhome.crypto.signing import SignatureError
from zhome.federation.keyring import KeyLookupError
from zhome.http.errors import MatrixError, forbidden, not_found
from zhome.rooms import auth
from zhome.rooms.event_creation import unread_from_actions
from zhome.rooms.events import Event, StateMap
from zhome.rooms.redaction import prune_event_dict
from zhome.rooms.state_res import StateResolutionError, resolve_state
from zhome.rooms.validation import MAX_EVENT_SIZE, MAX_FIELD_BYTES
from zhome.rooms.versions import KNOWN_ROOM_VERSIONS, EventIdFormat, RoomVersion, get_room_version
from zhome.storage.events import PersistItem
from zhome.util.ids import is_valid_user_id, server_of

if TYPE_CHECKING:
    from zhome.server import HomeServer

logger = logging.getLogger(__name__)

PDUS = Counter("zhome_federation_inbound_pdus_total", "Inbound PDUs by outcome", ["outcome"])
REJECTED = Counter("zhome_federation_rejected_pdus_total", "Inbound PDUs refused, by reason", ["reason"])


def rejection_category(reason: str) -> str:
    """A small fixed set of labels for the metric (reasons are free text)."""
    r = reason.lower()
    for key, label in (("signature", "signature"), ("residency", "policy"), ("policy", "policy"),
                       ("not in the room", "unknown_room"), ("state resolution", "state"),
                       ("fetch", "missing_events"), ("missing", "missing_events"), ("json", "format"),
                       ("field", "format"), ("larger", "format"), ("event_id", "format"),
                       ("references", "format"), ("sender", "format")):
        if key in r:
            return label
    return "auth"

# Bounds on what one inbound event may make us fetch.
MAX_MISSING_EVENTS = 20
MAX_AUTH_FETCH = 500
# Events fetched one by one (GET /event) before asking for the whole /state.
MAX_EVENT_FETCH = 50
EVENT_FETCH_PARALLEL = 10
EVENT_FETCH_TIMEOUT = 20.0
MAX_STATE_IDS = 20000


class PduRejected(Exception):
    """The PDU failed a check and was not stored (or stored as rejected)."""


class EventRejected(PduRejected):
    """The PDU was processed and stored as rejected (it failed the auth
    rules): it is remembered so nothing builds on it, and a transaction
    reports it like any other processed PDU."""


def _strip_pdu(pdu: dict[str, Any]) -> dict[str, Any]:
    # Fields a sending server may add that are not part of the event.
    out = dict(pdu)
    for k in ("unsigned", "age_ts", "outlier", "destinations"):
        out.pop(k, None)
    return out


def parse_pdu(rv: RoomVersion, pdu: Any) -> Event:
    """Format checks and the event ID of a received PDU."""
    if not isinstance(pdu, dict):
        raise PduRejected("PDU is not an object")
    for key, typ in (("type", str), ("sender", str), ("content", dict), ("depth", int),
                     ("origin_server_ts", int), ("prev_events", list), ("auth_events", list),
                     ("hashes", dict), ("signatures", dict)):
        v = pdu.get(key)
        if not isinstance(v, typ) or isinstance(v, bool):
            raise PduRejected(f"PDU field {key!r} missing or of the wrong type")
    if not (rv.hydra and pdu["type"] == "m.room.create") and not isinstance(pdu.get("room_id"), str):
        raise PduRejected("PDU has no room_id")
    if "state_key" in pdu and not isinstance(pdu["state_key"], str):
        raise PduRejected("state_key must be a string")
    if not is_valid_user_id(pdu["sender"]):
        raise PduRejected("sender is not a user ID")
    # client-server-api "Size limits": these keys are at most 255 bytes each.
    for key in ("sender", "room_id", "type", "state_key", "event_id"):
        value = pdu.get(key)
        if isinstance(value, str) and len(value.encode("utf-8")) > MAX_FIELD_BYTES:
            raise PduRejected(f"{key} longer than {MAX_FIELD_BYTES} bytes")
    try:
        check_canonical_json_value(pdu, strict=rv.strict_canonical_json)
    except ValueError as e:
        raise PduRejected(f"not canonical JSON: {e}")
    from zhome.crypto.canonical import encode_canonical_json

    if len(encode_canonical_json(pdu)) > MAX_EVENT_SIZE:
        raise PduRejected("PDU larger than 65536 bytes")
    if rv.event_id_format is EventIdFormat.SERVER_CHOSEN:
        event_id = pdu.get("event_id")
        if not isinstance(event_id, str) or not event_id.startswith("$"):
            raise PduRejected("PDU has no event_id")
        refs = [r for r in pdu["prev_events"] + pdu["auth_events"]]
        if not all(isinstance(r, list) and r and isinstance(r[0], str) for r in refs):
            raise PduRejected("bad event references")
    else:
        if not all(isinstance(r, str) for r in pdu["prev_events"] + pdu["auth_events"]):
            raise PduRejected("bad event references")
        event_id = compute_event_id(rv, pdu)
    if len(pdu["prev_events"]) > 20 or len(pdu["auth_events"]) > 10:
        raise PduRejected("too many prev_events or auth_events")
    return Event(pdu, event_id, rv)


class FederationHandler:
    def __init__(self, hs: "HomeServer") -> None:
        self.hs = hs
        self.server_name = hs.server_name
        self.events = hs.events
        self.rooms = hs.rooms
        self.keyring = hs.keyring
        self.client = hs.federation_client
        self.policy = hs.residency_policy

    def is_mine(self, user_id: str) -> bool:
        return server_of(user_id) == self.server_name

    # -- checking received events -------------------------------------------------
    async def check_signatures_and_hash(self, rv: RoomVersion, ev: Event) -> Event:
        """Signature check (reject) and content hash check (redact)."""
        try:
            await self.keyring.verify_event(rv, ev.pdu)
        except (SignatureError, KeyLookupError) as e:
            raise PduRejected(f"bad signature: {e}")
        if not verify_content_hash(ev.pdu):
            logger.info("content hash mismatch on %s: redacting", ev.event_id)
            return Event(prune_event_dict(rv, ev.pdu), ev.event_id, rv)
        return ev

    async def _load_events(self, ids: Iterable[str]) -> dict[str, Event]:
        return await self.events.get_events(ids)

    async def resolve(self, rv: RoomVersion, state_sets: list[StateMap],
                      unstored: Optional[Event] = None) -> StateMap:
        """Resolve ``state_sets``; ``unstored`` is an event in them that is
        being checked and so is not in the database yet."""
        if len(state_sets) == 1:
            return dict(state_sets[0])

        async def load(ids: Iterable[str]) -> dict[str, Event]:
            wanted = list(ids)
            found = await self._load_events([i for i in wanted if unstored is None or i != unstored.event_id])
            if unstored is not None and unstored.event_id in wanted:
                found[unstored.event_id] = unstored
            return found

        try:
            return await resolve_state(rv, state_sets, load)
        except StateResolutionError as e:
            raise PduRejected(f"state resolution failed: {e}")

    def _auth_map(self, ev: Event, state: StateMap, evs: dict[str, Event]) -> dict[tuple[str, str], Event]:
        keys = auth.auth_types_for_event(ev.room_version, ev.type, ev.state_key, ev.sender, ev.content)
        if ("m.room.create", "") not in keys:
            keys = [("m.room.create", "")] + list(keys)
        return {k: evs[state[k]] for k in keys if k in state and state[k] in evs}

    async def check_auth_against(self, ev: Event, state: StateMap) -> Optional[str]:
        """None when ``ev`` passes the auth rules against ``state``, else why not."""
        keys = auth.auth_types_for_event(ev.room_version, ev.type, ev.state_key, ev.sender, ev.content)
        wanted = [state[k] for k in list(keys) + [("m.room.create", "")] if k in state]
        evs = await self.events.get_events(wanted)
        try:
            auth.check_auth_rules(ev, self._auth_map(ev, state, evs))
        except auth.AuthError as e:
            return e.msg
        return None

    async def check_auth_events(self, ev: Event) -> Optional[str]:
        """Auth against the event's own auth_events (which must be stored)."""
        return await self._check_auth_with(ev, {})

    # -- fetching what is missing -----------------------------------------------------
    async def fetch_auth_chain(self, origin: str, room_id: str, event_id: str, rv: RoomVersion) -> None:
        """Store the auth chain of ``event_id`` from ``origin`` as outliers."""
        resp = await self.client.get_json(origin, f"/_matrix/federation/v1/event_auth/{_q(room_id)}/{_q(event_id)}")
        chain = resp.get("auth_chain") if isinstance(resp, dict) else None
        if not isinstance(chain, list):
            raise PduRejected("bad event_auth response")
        await self.store_outliers(rv, chain[:MAX_AUTH_FETCH])

    async def store_state(self, rv: RoomVersion, chain: list[Any], state_pdus: list[Any]) -> StateMap:
        """Store an auth chain and a room state received over federation
        (send_join, /state); the state map of the accepted state events."""
        ids: list[Optional[str]] = []
        stored = await self.store_outliers(rv, chain + state_pdus, ids)
        state: StateMap = {}
        for eid in ids[len(chain):]:
            s = stored.get(eid) if eid is not None else None
            if s is not None and s.is_state() and not s.rejected_reason:
                state[s.state_tuple()] = s.event_id
        return state

    async def store_outliers(self, rv: RoomVersion, pdus: list[Any],
                             ids_out: Optional[list[Optional[str]]] = None) -> dict[str, Event]:
        """Check and store events known only as state or auth chain.

        Events are checked in depth order, each against its own auth events;
        one that fails is stored as rejected so nothing builds on it.
        ``ids_out`` receives each PDU's event ID in input order (None for a
        malformed one), so callers need not hash the events again.
        """
        parsed: dict[str, Event] = {}
        for p in pdus:
            try:
                ev = parse_pdu(rv, _strip_pdu(p))
            except PduRejected as e:
                logger.info("dropping malformed state/auth event: %s", e)
                if ids_out is not None:
                    ids_out.append(None)
                continue
            parsed[ev.event_id] = ev
            if ids_out is not None:
                ids_out.append(ev.event_id)
        known = await self.events.get_events(parsed)
        todo = [e for eid, e in parsed.items() if eid not in known]
        todo.sort(key=lambda e: (e.depth, e.event_id))
        items = []
        for ev in todo:
            try:
                ev = await self.check_signatures_and_hash(rv, ev)
            except PduRejected as e:
                logger.info("dropping %s: %s", ev.event_id, e)
                continue
            items.append(ev)
        # Auth checks need earlier items stored (they are each other's
        # auth events): check against the batch plus the database.
        batch: dict[str, Event] = {}
        out_items = []
        for ev in items:
            reason = await self._check_auth_with(ev, batch)
            if reason:
                ev = Event(ev.pdu, ev.event_id, rv, rejected_reason=reason)
            batch[ev.event_id] = ev
            out_items.append(PersistItem(ev, None, {}, outlier=True))
        if out_items:
            await self.hs.persister.persist_many(out_items)
        result = dict(known)
        result.update(batch)
        return result

    async def _check_auth_with(self, ev: Event, batch: dict[str, Event]) -> Optional[str]:
        ids = list(ev.auth_event_ids)
        if ev.room_version.hydra and ev.type != "m.room.create":
            ids.append("$" + ev.room_id[1:])
        found = {i: batch[i] for i in ids if i in batch}
        missing = [i for i in ids if i not in found]
        if missing:
            found.update(await self.events.get_events(missing))
        if any(i not in found for i in ev.auth_event_ids):
            return "auth events missing"
        state: StateMap = {}
        for e in found.values():
            if e.rejected_reason:
                return f"auth event {e.event_id} was rejected"
            if e.is_state():
                state[e.state_tuple()] = e.event_id
        try:
            auth.check_auth_rules(ev, self._auth_map(ev, state, found))
        except auth.AuthError as e:
            return e.msg
        return None

    async def _fetch_missing_prevs(self, origin: str, ev: Event, missing: list[str]) -> None:
        """One round of /get_missing_events for a pushed event's unknown
        prev events; what comes back is processed oldest first, each asking
        for the state at its own unknown prev events."""
        extremities = await self.events.get_forward_extremities(ev.room_id)
        try:
            resp = await self.client.post_json(
                origin, f"/_matrix/federation/v1/get_missing_events/{_q(ev.room_id)}",
                {"earliest_events": extremities, "latest_events": [ev.event_id], "limit": MAX_MISSING_EVENTS,
                 "min_depth": 0})
        except Exception as e:
            logger.info("get_missing_events from %s failed: %s", origin, e)
            return
        got = resp.get("events") if isinstance(resp, dict) else None
        if not isinstance(got, list):
            return
        parsed = []
        for p in got[:MAX_MISSING_EVENTS]:
            try:
                m = parse_pdu(ev.room_version, _strip_pdu(p))
            except PduRejected:
                continue
            if m.room_id == ev.room_id and m.event_id != ev.event_id:
                parsed.append(m)
        parsed.sort(key=lambda e: (e.depth, e.event_id))
        for m in parsed:
            try:
                await self._process_pdu(origin, m, fetch_missing=False)
            except PduRejected as e:
                logger.info("missing event %s refused: %s", m.event_id, e)

    async def _fetch_events(self, origin: str, rv: RoomVersion, room_id: str, ids: list[str]) -> list[Any]:
        """Fetch events one by one (GET /event), a few at a time and each
        with a short timeout (the room is locked meanwhile); the PDUs that
        came back."""

        async def one(eid: str) -> Any:
            try:
                resp = await self.client.get_json(origin, f"/_matrix/federation/v1/event/{_q(eid)}",
                                                  timeout=EVENT_FETCH_TIMEOUT)
            except Exception as e:
                logger.info("fetching %s from %s failed: %s", eid, origin, e)
                return None
            pdus = resp.get("pdus") if isinstance(resp, dict) else None
            return pdus[0] if isinstance(pdus, list) and pdus and isinstance(pdus[0], dict) else None

        wanted = ids[:MAX_EVENT_FETCH]
        out: list[Any] = []
        for i in range(0, len(wanted), EVENT_FETCH_PARALLEL):
            got = await defer.gatherResults(
                [defer.ensureDeferred(one(eid)) for eid in wanted[i:i + EVENT_FETCH_PARALLEL]], consumeErrors=True)
            out.extend(p for p in got if p is not None)
        return out

    async def _state_after_remote_event(self, origin: str, rv: RoomVersion, room_id: str,
                                        event_id: str) -> StateMap:
        """The state after an event we do not have in the timeline, from
        ``origin``: /state_ids at it, the events we lack fetched (one by one,
        or with /state when there are many) and checked as outliers, plus
        the event itself when it is an accepted state event."""
        resp = await self.client.get_json(origin, f"/_matrix/federation/v1/state_ids/{_q(room_id)}",
                                          query={"event_id": event_id})
        pdu_ids = resp.get("pdu_ids") if isinstance(resp, dict) else None
        chain_ids = resp.get("auth_chain_ids", []) if isinstance(resp, dict) else None
        if not isinstance(pdu_ids, list) or not isinstance(chain_ids, list):
            raise PduRejected("bad /state_ids response")
        pdu_ids = [i for i in pdu_ids[:MAX_STATE_IDS] if isinstance(i, str)]
        chain_ids = [i for i in chain_ids[:MAX_STATE_IDS] if isinstance(i, str)]
        wanted = _dedupe(chain_ids + pdu_ids + [event_id])
        have = await self.events.get_events(wanted)
        missing = [i for i in wanted if i not in have]
        if len(missing) > MAX_EVENT_FETCH:
            state_resp = await self.client.get_json(origin, f"/_matrix/federation/v1/state/{_q(room_id)}",
                                                    query={"event_id": event_id})
            pdus = state_resp.get("pdus") if isinstance(state_resp, dict) else None
            chain = state_resp.get("auth_chain", []) if isinstance(state_resp, dict) else None
            if not isinstance(pdus, list) or not isinstance(chain, list):
                raise PduRejected("bad /state response")
            fetched = chain[:MAX_AUTH_FETCH] + pdus[:MAX_STATE_IDS]
            if event_id not in have:
                fetched += await self._fetch_events(origin, rv, room_id, [event_id])
        else:
            fetched = await self._fetch_events(origin, rv, room_id, missing)
        if fetched:
            await self.store_outliers(rv, fetched)
        evs = await self.events.get_events(pdu_ids + [event_id])
        state: StateMap = {}
        for eid in pdu_ids:
            e = evs.get(eid)
            if e is None or e.rejected_reason or not e.is_state() or e.room_id != room_id:
                continue
            state.setdefault(e.state_tuple(), eid)
        prev = evs.get(event_id)
        if prev is None or prev.room_id != room_id:
            raise PduRejected(f"could not fetch the prev event {event_id}")
        if prev.is_state() and not prev.rejected_reason:
            state[prev.state_tuple()] = prev.event_id
        return state

    async def _fetch_missing_auth(self, origin: str, ev: Event) -> None:
        """Fetch auth events we lack: the auth chain (/event_auth), else each
        missing auth event (/event). Whatever cannot be had leaves the event
        to be rejected by its auth check."""
        rv = ev.room_version
        have = await self.events.get_events(ev.auth_event_ids)
        missing = [a for a in ev.auth_event_ids if a not in have]
        if not missing:
            return
        try:
            await self.fetch_auth_chain(origin, ev.room_id, ev.event_id, rv)
        except Exception as e:
            logger.info("event_auth for %s from %s failed: %s", ev.event_id, origin, e)
        have = await self.events.get_events(missing)
        missing = [a for a in missing if a not in have]
        if missing:
            fetched = await self._fetch_events(origin, rv, ev.room_id, missing)
            if fetched:
                await self.store_outliers(rv, fetched)

    # -- the receive path ---------------------------------------------------------------
    async def on_receive_pdu(self, origin: str, pdu: Any) -> str:
        """Check and persist one PDU from a transaction; returns its event ID."""
        try:
            event_id = await self._receive_pdu(origin, pdu)
        except PduRejected as e:
            REJECTED.labels(rejection_category(str(e))).inc()
            logger.info("inbound PDU from %s refused: %s", origin, str(e)[:200])
            raise
        return event_id

    async def _receive_pdu(self, origin: str, pdu: Any) -> str:
        if not isinstance(pdu, dict):
            raise PduRejected("PDU is not an object")
        room_id = pdu.get("room_id")
        if not isinstance(room_id, str):
            raise PduRejected("PDU has no room_id")
        version = await self.rooms.get_room_version(room_id)
        if version is None:
            raise PduRejected("this server is not in the room")
        rv = get_room_version(version)
        ev = parse_pdu(rv, _strip_pdu(pdu))
        if not await self._room_allows(origin, room_id) or not await self._room_allows(server_of(ev.sender),
                                                                                       room_id):
            self.policy.count_refusal("receive")
            raise PduRejected("server refused by the room's residency policy")
        async with self.hs.event_creator.room_locks.lock(room_id):
            return await self._process_pdu(origin, ev, fetch_missing=True)

    async def _room_allows(self, server: str, room_id: str) -> bool:
        state = await self.events.get_current_state_ids(room_id)
        keys = [k for k in (("m.room.server_acl", ""), ("zhome.residency", "")) if k in state]
        evs = await self.events.get_events(state[k] for k in keys)
        return self.policy.room_allows(server, {k: evs[state[k]].content for k in keys if state[k] in evs})

    async def _process_pdu(self, origin: str, ev: Event, fetch_missing: bool) -> str:
        """Check and persist one event. ``fetch_missing``: the event was
        pushed to us (in a transaction or a membership handshake), so its
        unknown prev events are asked for with /get_missing_events and it is
        refused when they cannot be had; an event pulled that way
        (``fetch_missing`` False) gets the state at its unknown prev events
        from /state_ids instead."""
        rv = ev.room_version
        if await self.events.get_event(ev.event_id) is not None:
            # Already stored (possibly as an outlier fetched for another
            # event's auth chain or state): nothing more to do.
            return ev.event_id
        ev = await self.check_signatures_and_hash(rv, ev)

        def unknown(prevs: dict[str, Event]) -> list[str]:
            return [p for p in ev.prev_event_ids if p not in prevs or prevs[p].internal.get("outlier")]

        prevs = await self.events.get_events(ev.prev_event_ids)
        missing_prevs = unknown(prevs)
        if missing_prevs and fetch_missing:
            await self._fetch_missing_prevs(origin, ev, missing_prevs)
            prevs = await self.events.get_events(ev.prev_event_ids)
            missing_prevs = unknown(prevs)
            if missing_prevs:
                # A pushed event could become our only extremity; its state
                # is never taken on trust (server-server-api "Checks
                # performed on receipt of a PDU").
                raise PduRejected(f"could not fetch the prev events {', '.join(missing_prevs[:3])}")
        known_prevs = [p for p in ev.prev_event_ids if p not in missing_prevs]
        snapshot = False
        group: Optional[int] = None
        sets: list[StateMap] = []
        groups: list[Optional[int]] = []
        for p in known_prevs:
            g = await self.events.get_state_group_for_event(p)
            groups.append(g)
            sets.append(dict(await self.events.get_state_group(g)) if g is not None else {})
        for p in missing_prevs:
            try:
                sets.append(await self._state_after_remote_event(origin, rv, ev.room_id, p))
            except PduRejected:
                raise
            except Exception as e:
                raise PduRejected(f"could not fetch the state before the event: {e}")
        if len(sets) == 1 and not missing_prevs:
            state_before = sets[0]
            group = groups[0]
        else:
            state_before = await self.resolve(rv, sets) if sets else {}
            snapshot = True

        await self._fetch_missing_auth(origin, ev)
        reason = await self.check_auth_events(ev)
        if reason is None:
            reason = await self.check_auth_against(ev, state_before)
        apply_redaction = True
        if reason is None and ev.type == "m.room.redaction" and ev.redacts:
            reason, apply_redaction = await self._check_redaction(ev, state_before)
        if reason is not None:
            PDUS.labels("rejected").inc()
            logger.info("rejecting %s from %s: %s", ev.event_id, origin, reason)
            ev = Event(ev.pdu, ev.event_id, rv, rejected_reason=reason)
            await self.hs.persister.persist(PersistItem(ev, group, state_before, snapshot_before=snapshot))
            raise EventRejected(reason)

        current = await self.events.get_current_state_ids(ev.room_id)
        soft_failed = (await self.check_auth_against(ev, current)) is not None
        new_current: Optional[StateMap] = None
        also_replaces: list[str] = []
        if not soft_failed:
            also_replaces = await self._behind_unaccepted(prevs)
            old_ext = await self.events.get_forward_extremities(ev.room_id)
            replaced = set(ev.prev_event_ids) | set(also_replaces)
            new_ext = [e for e in old_ext if e not in replaced]
            state_after = dict(state_before)
            if ev.is_state():
                state_after[ev.state_tuple()] = ev.event_id
            if new_ext:
                sets = [state_after]
                for x in new_ext:
                    g = await self.events.get_state_group_for_event(x)
                    if g is not None:
                        sets.append(dict(await self.events.get_state_group(g)))
                new_current = await self.resolve(rv, sets, unstored=ev)
            else:
                new_current = state_after
        else:
            PDUS.labels("soft_failed").inc()
            logger.info("soft-failing %s from %s", ev.event_id, origin)
        actions: dict[str, list[Any]] = {}
        if not soft_failed:
            actions = await self.hs.event_creator.push_actions_for(ev, state_before)
        item = PersistItem(ev, group, state_before, snapshot_before=snapshot, soft_failed=soft_failed,
                           current_state=new_current, unread=unread_from_actions(actions, ev), push_actions=actions,
                           apply_redaction=apply_redaction, also_replaces=also_replaces)
        await self.hs.persister.persist(item)
        if not soft_failed:
            PDUS.labels("accepted").inc()
            logger.info("accepted %s (%s) in %s from %s", ev.event_id, ev.type, ev.room_id, origin)
        return ev.event_id

    async def _behind_unaccepted(self, prevs: dict[str, Event]) -> list[str]:
        """The events that soft-failed or rejected prev events (and their
        soft-failed or rejected ancestors) built on: an accepted event
        descends from them too, so they are no longer extremities."""
        frontier = [e for e in prevs.values() if e.rejected_reason or e.internal.get("soft_failed")]
        if not frontier:
            return []
        found: list[str] = []
        seen = set(prevs)
        for _ in range(MAX_MISSING_EVENTS):
            ids = [p for e in frontier for p in e.prev_event_ids if p not in seen]
            if not ids:
                break
            seen.update(ids)
            evs = await self.events.get_events(ids)
            found.extend(i for i in ids if i in evs)
            frontier = [e for e in evs.values() if e.rejected_reason or e.internal.get("soft_failed")]
        return found

    async def _check_redaction(self, ev: Event, state_before: StateMap) -> tuple[Optional[str], bool]:
        """(rejection reason, whether it takes effect) for a received
        redaction. One aimed at an event of another room is rejected; in
        room versions 3 and later (rooms/v3 "Handling redactions") it takes
        effect only when its sender's server is the original's, or its
        sender has the redact level."""
        target = await self.events.get_event(ev.redacts or "")
        if target is None:
            return None, True
        if target.room_id != ev.room_id:
            return "the redacted event is in another room", False
        if ev.room_version.event_id_format is EventIdFormat.SERVER_CHOSEN:
            return None, True  # v1/v2: the auth rules decided already
        keys = [k for k in (("m.room.create", ""), ("m.room.power_levels", "")) if k in state_before]
        evs = await self.events.get_events(state_before[k] for k in keys)
        auth_map = {k: evs[state_before[k]] for k in keys if state_before[k] in evs}
        return None, auth.can_redact(ev.room_version, ev.sender, target.sender, auth_map, same_server_ok=True)

    # -- history from before we joined ----------------------------------------------------
    async def backfill(self, room_id: str, limit: int) -> int:
        """Fetch up to ``limit`` older events from a server in the room.

        Spec: server-server-api "Backfilling and retrieving missing events".
        Each event is checked (signatures, hash, auth against its own auth
        events) and stored below every position already handed out, so
        /messages pages straight on into it. Returns how many were stored.
        """
        extremities = await self.events.get_backward_extremities(room_id)
        if not extremities:
            return 0
        version = await self.rooms.get_room_version(room_id)
        if version is None:
            return 0
        rv = get_room_version(version)
        joined = await self.events.get_joined_users(room_id)
        servers = _dedupe(server_of(u) for u in joined if server_of(u) != self.server_name)
        group = await self.events.get_earliest_state_group(room_id)
        for server in servers[:3]:
            if not await self._room_allows(server, room_id):
                continue
            try:
                resp = await self.client.get_json(
                    server, f"/_matrix/federation/v1/backfill/{_q(room_id)}",
                    query={"v": extremities, "limit": str(min(limit, 100))})
            except Exception as e:
                logger.info("backfill of %s from %s failed: %s", room_id, server, e)
                continue
            pdus = resp.get("pdus") if isinstance(resp, dict) else None
            if not isinstance(pdus, list):
                continue
            return await self._store_backfill(server, rv, room_id, pdus[:limit], group)
        return 0

    async def _store_backfill(self, origin: str, rv: RoomVersion, room_id: str, pdus: list[Any],
                              group: Optional[int]) -> int:
        parsed: list[Event] = []
        for p in pdus:
            try:
                ev = parse_pdu(rv, _strip_pdu(p))
            except PduRejected:
                continue
            if ev.room_id == room_id:
                parsed.append(ev)
        known = await self.events.get_events([e.event_id for e in parsed])
        todo = sorted((e for e in parsed if e.event_id not in known), key=lambda e: (-e.depth, e.event_id))
        state: StateMap = dict(await self.events.get_state_group(group)) if group is not None else {}
        stored = 0
        async with self.hs.event_creator.room_locks.lock(room_id):
            for ev in todo:
                try:
                    ev = await self.check_signatures_and_hash(rv, ev)
                    if [a for a in ev.auth_event_ids if a not in await self.events.get_events([a])]:
                        await self.fetch_auth_chain(origin, room_id, ev.event_id, rv)
                except Exception as e:
                    logger.info("backfilled event %s dropped: %s", ev.event_id, e)
                    continue
                reason = await self.check_auth_events(ev)
                # The state at old events is taken as the state before the
                # oldest event we had; good enough to decide visibility, and
                # what a redaction's power is judged by (here for a target
                # already stored, by the persist path for one stored later:
                # both read this group).
                apply_redaction = True
                if reason is None and ev.type == "m.room.redaction" and ev.redacts:
                    reason, apply_redaction = await self._check_redaction(ev, state)
                if reason is not None:
                    ev = Event(ev.pdu, ev.event_id, rv, rejected_reason=reason)
                await self.hs.persister.persist(PersistItem(ev, group, state, backfilled=True,
                                                            apply_redaction=apply_redaction))
                stored += 1
        return stored

    # -- joining a remote room -----------------------------------------------------------
    async def remote_join(self, user_id: str, room_id: str, servers: list[str], membership: str = "join",
                          content_extra: Optional[dict[str, Any]] = None, guest: bool = False) -> Event:
        """Join (or knock on) a room this server is not in, through ``servers``.

        ``guest``: the joiner is a guest account of this server, who may
        join only if the room's state (as the resident server sends it) is
        ``m.room.guest_access`` ``can_join`` (spec: "Guest Access").
        """
        async def attempt(server: str) -> Event:
            return await self._join_via(server, user_id, room_id, membership, content_extra or {}, guest)

        return await self._through_servers(room_id, servers, attempt)

    async def join_through_resident(self, user_id: str, room_id: str, servers: list[str],
                                    content_extra: Optional[dict[str, Any]] = None) -> Event:
        """A local user's join to a restricted room this server is in but
        none of its users in the room may invite: another resident server
        vouches for it (make_join/send_join), and the join it signed comes
        in like any event from that server."""
        async def attempt(server: str) -> Event:
            _, _, ev, _ = await self._membership_handshake(server, user_id, room_id, "join", content_extra or {})
            await self.on_receive_pdu(server, ev.pdu)
            stored = await self.events.get_event(ev.event_id)
            if stored is None or stored.rejected_reason or stored.internal.get("soft_failed"):
                raise MatrixError(403, "M_FORBIDDEN", f"The join {server} authorised was not accepted here")
            return stored

        return await self._through_servers(room_id, servers, attempt)

    async def _through_servers(self, room_id: str, servers: list[str],
                               attempt: Callable[[str], Awaitable[Event]]) -> Event:
        """``attempt`` with each server in turn until one succeeds."""
        last_error: Optional[Exception] = None
        refusal: Optional[MatrixError] = None
        for server in _dedupe(s for s in servers if s != self.server_name):
            if not self.policy.server_allowed(server):
                self.policy.count_refusal("join")
                continue
            try:
                return await attempt(server)
            except MatrixError as e:
                if e.errcode not in _ASK_ANOTHER_SERVER:
                    raise
                # A restricted room: this resident server cannot vouch for
                # the user, another (in an allowed room) may.
                logger.info("joining %s via %s: %s", room_id, server, e.errcode)
                if refusal is None or e.errcode == "M_UNABLE_TO_GRANT_JOIN":
                    refusal = e
            except Exception as e:
                logger.info("joining %s via %s failed: %s", room_id, server, e)
                last_error = e
        if refusal is not None:
            raise refusal
        if last_error is None:
            raise not_found("No known servers to join the room through")
        raise MatrixError(502, "M_UNKNOWN", f"Could not join through any server: {_describe(last_error)}")

    async def _membership_handshake(self, server: str, user_id: str, room_id: str, membership: str,
                                    content_extra: dict[str, Any]) -> tuple[RoomVersion, str, Event, dict[str, Any]]:
        """make_join/send_join (or make_knock/send_knock) with ``server``:
        (room version, its name, the event as sent or as ``server``
        countersigned it, the send response)."""
        from zhome.federation.transport import FederationHttpError

        make = "make_join" if membership == "join" else "make_knock"
        try:
            resp = await self.client.get_json(
                server, f"/_matrix/federation/v1/{make}/{_q(room_id)}/{_q(user_id)}",
                query={"ver": list(KNOWN_ROOM_VERSIONS)})
        except FederationHttpError as e:
            if 400 <= e.status < 500 and e.status != 429:
                # The resident server's refusal is the client's answer, with
                # its errcode (and the room_version of an incompatible room).
                extra = {}
                if isinstance(e.body, dict) and isinstance(e.body.get("room_version"), str):
                    extra["room_version"] = e.body["room_version"][:100]
                raise MatrixError(e.status, e.errcode or "M_FORBIDDEN",
                                  f"{server} refused the {membership}: {_err_text(e)}", **extra)
            raise
        version = resp.get("room_version", "1") if isinstance(resp, dict) else None
        template = resp.get("event") if isinstance(resp, dict) else None
        if not isinstance(version, str) or version not in KNOWN_ROOM_VERSIONS:
            raise MatrixError(400, "M_INCOMPATIBLE_ROOM_VERSION", "This server does not support the room's version",
                              room_version=str(version)[:100])
        if not isinstance(template, dict):
            raise MatrixError(502, "M_UNKNOWN", f"{server} sent a bad {make} response")
        rv = get_room_version(version)
        pdu = {k: v for k, v in template.items() if k not in ("signatures", "hashes", "unsigned", "event_id")}
        if pdu.get("sender") != user_id or pdu.get("state_key") != user_id or pdu.get("type") != "m.room.member":
            raise PduRejected("bad join template")
        # The template's content is kept: in a restricted room it names the
        # user of the resident server who authorises the join.
        content = dict(pdu.get("content") or {})
        content["membership"] = membership
        content.update(await self.hs.membership._profile_content(user_id))
        content.update(content_extra)
        pdu["content"] = content
        pdu["origin_server_ts"] = int(time.time() * 1000)
        if rv.event_id_format is EventIdFormat.SERVER_CHOSEN:
            pdu["origin"] = self.server_name
        _check_canonical(rv, pdu, f"The {membership} event")
        event_id, signed = hash_and_sign_event(rv, pdu, self.server_name, self.hs.signing_key)
        if membership == "join":
            try:
                result = await self.client.put_json(
                    server, f"/_matrix/federation/v2/send_join/{_q(room_id)}/{_q(event_id)}", signed, timeout=300)
            except FederationHttpError as e:
                if not _unrecognised(e):
                    raise
                # A server without v2: v1 wraps the answer as [200, {...}].
                result = await self.client.put_json(
                    server, f"/_matrix/federation/v1/send_join/{_q(room_id)}/{_q(event_id)}", signed, timeout=300)
                result = _unwrap_v1(result)
        else:
            result = await self.client.put_json(
                server, f"/_matrix/federation/v1/send_knock/{_q(room_id)}/{_q(event_id)}", signed, timeout=300)
        if not isinstance(result, dict):
            raise PduRejected("bad send_join response")
        ev = Event(signed, event_id, rv)
        via = content.get("join_authorised_via_users_server")
        if membership == "join" and isinstance(via, str) and server_of(via) != self.server_name \
                and not isinstance(result.get("event"), dict):
            # Without the authorising server's signature the join is good
            # for nobody: every server would refuse it from us.
            raise PduRejected(f"{server} did not send back the join it authorised, signed")
        if membership == "join" and isinstance(result.get("event"), dict):
            # A restricted join comes back countersigned by the resident
            # server: the same event, more signatures.
            try:
                countersigned = parse_pdu(rv, _strip_pdu(result["event"]))
            except PduRejected as e:
                raise MatrixError(502, "M_UNKNOWN", f"{server} sent a bad join event back: {e}")
            if not _same_but_signatures(countersigned.pdu, signed):
                raise PduRejected(f"{server} sent back another join event than the one it was sent")
            if isinstance(via, str):
                try:
                    await self.keyring.verify_event(rv, countersigned.pdu)
                except Exception as e:
                    raise PduRejected(f"the join {server} sent back is not signed as it must be: {e}")
            ev = countersigned
        return rv, version, ev, result

    async def _join_via(self, server: str, user_id: str, room_id: str, membership: str,
                        content_extra: dict[str, Any], guest: bool = False) -> Event:
        rv, version, ev, result = await self._membership_handshake(server, user_id, room_id, membership,
                                                                   content_extra)
        if membership == "knock":
            # A knock leaves us outside the room: store it like an invite.
            from zhome.federation.servlets import _stripped

            given = result.get("knock_room_state") or result.get("knock_state_events") or []
            stripped = _stripped(given) if isinstance(given, list) else []
            ev.pdu.setdefault("unsigned", {})["knock_room_state"] = stripped
            await self.store_membership_outlier(ev, version)
            return ev
        state_pdus = result.get("state") or []
        chain = result.get("auth_chain") or []
        if not isinstance(state_pdus, list) or not isinstance(chain, list):
            raise PduRejected("bad send_join response")
        await self._ensure_room(room_id, version)
        state = await self.store_state(rv, chain, state_pdus)
        if ("m.room.create", "") not in state:
            raise PduRejected("the room state has no create event")
        reason = await self.check_auth_against(ev, state)
        if reason:
            raise MatrixError(403, "M_FORBIDDEN", f"Join not allowed: {reason}")
        if guest:
            await self._refuse_guest_join_unless_allowed(server, ev, state)
        after = dict(state)
        after[ev.state_tuple()] = ev.event_id
        async with self.hs.event_creator.room_locks.lock(room_id):
            await self.hs.persister.persist(PersistItem(ev, None, state, snapshot_before=True, current_state=after))
        return ev

    async def _refuse_guest_join_unless_allowed(self, server: str, join: Event, state: StateMap) -> None:
        """A guest's join the room's state does not allow is taken back.

        Which accounts are guests is not told over federation, so the
        resident server accepted the join; the state it sent with the
        answer is the first this server sees of the room. The join is not
        stored here, and the guest leaves again through that server.
        """
        try:
            await self.hs.membership.check_guests_may_join(state)
        except MatrixError:
            user_id = join.state_key or ""
            try:
                await self.remote_leave(user_id, join.room_id, [server])
            except MatrixError as e:
                logger.warning("guest %s could not leave %s again: %s", user_id, join.room_id, e.msg)
            raise

    async def _ensure_room(self, room_id: str, version: str) -> None:
        if await self.rooms.get_room_version(room_id) is None:
            await self.hs.db.run_interaction(
                "store_remote_room", lambda txn: self.rooms.store_room_txn(txn, room_id, version, None))

    async def store_membership_outlier(self, ev: Event, version: str) -> None:
        """An invite or knock for a room we are not in: visible to the user only."""
        await self._ensure_room(ev.room_id, version)
        # An invite notifies the invitee by their rules; the room's state is
        # unknown here, so the rules see none of it.
        actions = await self.hs.event_creator.push_actions_for(ev, {}) if ev.membership == "invite" else {}
        await self.hs.persister.persist_membership_outlier(ev, actions)

    # -- leaving a room we are not joined to (rejecting an invite) ------------------------
    async def remote_leave(self, user_id: str, room_id: str, servers: list[str]) -> Event:
        last_error: Optional[Exception] = None
        for server in _dedupe(s for s in servers if s != self.server_name):
            try:
                resp = await self.client.get_json(
                    server, f"/_matrix/federation/v1/make_leave/{_q(room_id)}/{_q(user_id)}")
                version = resp.get("room_version") or await self.rooms.get_room_version(room_id) or "1"
                rv = get_room_version(version)
                pdu = {k: v for k, v in resp["event"].items()
                       if k not in ("signatures", "hashes", "unsigned", "event_id")}
                pdu["origin_server_ts"] = int(time.time() * 1000)
                pdu["content"] = {"membership": "leave"}
                if rv.event_id_format is EventIdFormat.SERVER_CHOSEN:
                    pdu["origin"] = self.server_name
                _check_canonical(rv, pdu, "The leave event")
                event_id, signed = hash_and_sign_event(rv, pdu, self.server_name, self.hs.signing_key)
                await self.client.put_json(
                    server, f"/_matrix/federation/v2/send_leave/{_q(room_id)}/{_q(event_id)}", signed)
                ev = Event(signed, event_id, rv)
                await self.store_membership_outlier(ev, version)
                return ev
            except Exception as e:
                last_error = e
                logger.info("remote leave of %s via %s failed: %s", room_id, server, e)
        local = await self._local_invite_rejection(user_id, room_id)
        if local is not None:
            return local
        raise MatrixError(502, "M_UNKNOWN", f"Could not leave through any server: {_describe(last_error)}")

    async def _local_invite_rejection(self, user_id: str, room_id: str) -> Optional[Event]:
        """No server in the room would take the rejection of an invite (or
        the retraction of a knock): the user still gets out of it here,
        with a leave that follows only the invite and is kept to ourselves
        (the room's servers never see it; the inviter's may retry)."""
        eid = await self.events.get_current_state_event_id(room_id, "m.room.member", user_id)
        invite = await self.events.get_event(eid) if eid else None
        if invite is None or invite.membership not in ("invite", "knock") or not invite.internal.get("outlier"):
            return None
        version = await self.rooms.get_room_version(room_id) or invite.room_version.identifier
        rv = get_room_version(version)
        pdu: dict[str, Any] = {
            "type": "m.room.member", "room_id": room_id, "sender": user_id, "state_key": user_id,
            "content": {"membership": "leave"}, "depth": invite.depth + 1,
            "origin_server_ts": int(time.time() * 1000),
            "prev_events": [_event_ref(rv, invite)], "auth_events": [_event_ref(rv, invite)],
        }
        if rv.event_id_format is EventIdFormat.SERVER_CHOSEN:
            pdu["origin"] = self.server_name
        event_id, signed = hash_and_sign_event(rv, pdu, self.server_name, self.hs.signing_key)
        ev = Event(signed, event_id, rv)
        await self.store_membership_outlier(ev, version)
        logger.info("rejected the invite of %s to %s locally: no server took the leave", user_id, room_id)
        return ev

    # -- inviting a remote user -------------------------------------------------------------
    async def send_invite(self, ev: Event, invite_room_state: list[dict[str, Any]]) -> Event:
        """Have the invitee's server countersign an invite we created."""
        target = ev.state_key or ""
        server = server_of(target)
        if not self.policy.server_allowed(server):
            self.policy.count_refusal("invite")
            raise forbidden(f"Federation with {server} is not allowed by this server's policy")
        body = {"event": ev.pdu, "room_version": ev.room_version.identifier,
                "invite_room_state": invite_room_state}
        from zhome.federation.transport import FederationError, FederationHttpError

        path = f"/{_q(ev.room_id)}/{_q(ev.event_id)}"
        try:
            try:
                resp = await self.client.put_json(server, "/_matrix/federation/v2/invite" + path, body)
            except FederationHttpError as e:
                if not _unrecognised(e):
                    raise
                # The v1 API carries only room versions 1 and 2.
                if ev.room_version.identifier not in ("1", "2"):
                    raise MatrixError(400, "M_UNSUPPORTED_ROOM_VERSION",
                                      f"{server} does not support this room's version")
                v1_body = dict(ev.pdu)
                v1_body["unsigned"] = dict(v1_body.get("unsigned") or {}, invite_room_state=invite_room_state)
                resp = _unwrap_v1(await self.client.put_json(server, "/_matrix/federation/v1/invite" + path, v1_body))
        except FederationHttpError as e:
            raise MatrixError(e.status if 400 <= e.status < 500 and e.status != 429 else 502,
                              e.errcode or "M_FORBIDDEN", f"{server} refused the invite: {_err_text(e)}")
        except FederationError as e:
            # Unreachable, or an answer that is not JSON (NaN included).
            raise MatrixError(502, "M_UNKNOWN", f"Could not invite through {server}: {_describe(e)}")
        signed = resp.get("event") if isinstance(resp, dict) else None
        if not isinstance(signed, dict):
            raise MatrixError(502, "M_UNKNOWN", "Bad invite response")
        signed = _strip_pdu(signed)
        try:
            new = parse_pdu(ev.room_version, signed)
        except PduRejected as e:
            # A float, or an integer out of range, in a room version with
            # strict canonical JSON: the invite cannot be used.
            raise MatrixError(400, "M_BAD_JSON", f"{server} answered the invite with a bad event: {e}")
        if new.event_id != ev.event_id:
            raise MatrixError(502, "M_UNKNOWN", "The invited server changed the invite event")
        try:
            await self.keyring.verify_event(ev.room_version, signed)
            await self.keyring.verify_json(server, prune_event_dict(ev.room_version, signed), None)
        except (SignatureError, KeyLookupError) as e:
            raise MatrixError(502, "M_UNKNOWN", f"Bad signature on the invite: {e}")
        return Event(signed, ev.event_id, ev.room_version)


_ASK_ANOTHER_SERVER = ("M_UNABLE_TO_AUTHORISE_JOIN", "M_UNABLE_TO_GRANT_JOIN")


def _same_but_signatures(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two PDUs are the same event, ``a`` with at least ``b``'s signatures."""
    def rest(p: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in p.items() if k not in ("signatures", "unsigned")}

    sig_a, sig_b = a.get("signatures"), b.get("signatures")
    if rest(a) != rest(b) or not isinstance(sig_a, dict) or not isinstance(sig_b, dict):
        return False
    return all(isinstance(sig_a.get(s), dict) and all(sig_a[s].get(k) == v for k, v in sigs.items())
               for s, sigs in sig_b.items())


def _check_canonical(rv: RoomVersion, pdu: dict[str, Any], what: str) -> None:
    """An event we are about to sign must be canonical JSON (no floats or
    NaN, integers in range from v6); 400 M_BAD_JSON otherwise."""
    try:
        check_canonical_json_value(pdu, strict=rv.strict_canonical_json)
    except ValueError as e:
        raise MatrixError(400, "M_BAD_JSON", f"{what} is not valid JSON for the room version: {e}")


def _event_ref(rv: RoomVersion, ev: Event) -> Any:
    """How an event is cited in prev_events/auth_events in its room version."""
    if rv.event_id_format is EventIdFormat.SERVER_CHOSEN:
        return [ev.event_id, {"sha256": (ev.pdu.get("hashes") or {}).get("sha256", "")}]
    return ev.event_id


def _unrecognised(e: Any) -> bool:
    """A remote answer meaning "no such endpoint" (so try the older one)."""
    return e.status == 404 or (e.status in (400, 405) and e.errcode == "M_UNRECOGNIZED")


def _unwrap_v1(resp: Any) -> Any:
    """The body of a v1 answer, which wraps it as ``[200, {...}]``."""
    if isinstance(resp, list) and len(resp) == 2 and isinstance(resp[1], dict):
        return resp[1]
    return resp


def _dedupe(xs: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for x in xs:
        if x and x not in seen:
            seen.add(x)
            out.append(x)
    return out


def _q(s: str) -> str:
    from urllib.parse import quote

    return quote(s, safe="")


def _describe(e: Optional[Exception]) -> str:
    return f"{type(e).__name__}: {e}"[:300] if e else "unknown error"


def _err_text(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return body["error"][:300]
    return str(e)[:300]
