"""Erasure of a user (GDPR art. 17) that erases.

``erase_user`` does, in this order:

1. reads the legal holds on the user and on rooms, and the rooms'
   statutory retention floors: what they cover is kept, and the report
   says what and why;
2. sends a real redaction of every other event the user sent, room by
   room, so that every server in the room is told; the redaction is sent
   by the user while they are still joined, else by a local member with
   the power to redact, else by any local member (rooms v3+ let a server
   redact its own users' events; v1 and v2 check the event ID's domain,
   which is ours);
3. purges the content of those events from this server's database at
   once (the stored event becomes its redacted form), and their
   notifications;
4. deletes every file the user uploaded (thumbnails with them), except
   files referenced by events that are kept;
5. deactivates the account with erase (sessions, devices and their keys,
   pushers, account data, profile, receipts, presence, rooms left,
   ephemeral events about the user queued for application services);
6. stores the erasure report (``GET /_zhome/admin/v1/erasures/{id}``),
   which reads back from the federation queue which servers acknowledged
   the redactions.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Optional

from twisted.internet import task

from zhome.admin.accounts import deactivate_account
from zhome.http.errors import MatrixError
from zhome.rooms import auth as auth_rules
from zhome.rooms.versions import DEFAULT_ROOM_VERSION, get_room_version
from zhome.util.ids import random_string, server_of

if TYPE_CHECKING:
    from zhome.server import HomeServer

logger = logging.getLogger(__name__)

#: The tables erasure overwrites or deletes from.
#: Redactions are sent chained, this many per transaction, with a pause
#: between batches so that other users' requests keep their pace.
REDACTION_BATCH = 50
REDACTION_PAUSE_S = 0.08

SCRUBBED_TABLES = ("events", "profiles", "profile_fields", "account_data", "receipts", "sent_read_marks", "presence",
                   "user_notifications",
                   "user_notifications_staging",
                   "event_txn_ids", "media", "media_thumbnails", "devices", "e2e_device_keys", "e2e_one_time_keys",
                   "e2e_fallback_keys", "device_inbox", "pushers", "push_rules", "user_filters",
                   "current_state_events", "room_memberships", "user_threepids", "user_threepid_id_servers",
                   "openid_tokens", "identity_associations", "event_search", "event_relations", "event_threads",
                   "appservice_ephemeral")

#: Content keys that carry an mxc:// URI of a file an event shows.
_MXC_KEYS = ("url", "thumbnail_url", "avatar_url")


def _mxc_in(content: Any, out: set[str]) -> None:
    if isinstance(content, dict):
        for k, v in content.items():
            if k in _MXC_KEYS and isinstance(v, str) and v.startswith("mxc://"):
                out.add(v)
            else:
                _mxc_in(v, out)
    elif isinstance(content, list):
        for v in content:
            _mxc_in(v, out)


async def _redactor(hs: "HomeServer", room_id: str, user_id: str, still_joined: bool) -> Optional[str]:
    if still_joined:
        return user_id
    joined = sorted(u for u in await hs.events.get_joined_users(room_id) if server_of(u) == hs.server_name)
    if not joined:
        return None
    state = await hs.events.get_current_state_ids(room_id)
    keys = [("m.room.create", ""), ("m.room.power_levels", "")]
    evs = await hs.events.get_events([state[k] for k in keys if k in state])
    auth_events = {k: evs[state[k]] for k in keys if k in state and state[k] in evs}
    rv = get_room_version(await hs.rooms.get_room_version(room_id) or DEFAULT_ROOM_VERSION)
    for member in joined:
        if auth_rules.can_redact(rv, member, user_id, auth_events):
            return member
    return joined[0]


async def _remote_servers(hs: "HomeServer", room_id: str) -> list[str]:
    return sorted({server_of(u) for u in await hs.events.get_joined_users(room_id)} - {hs.server_name})


async def erase_user(hs: "HomeServer", user_id: str, requested_by: str) -> dict[str, Any]:
    store = hs.privacy_store
    now = int(time.time() * 1000)
    report: dict[str, Any] = {
        "id": "er_" + random_string(16), "user_id": user_id, "requested_by": requested_by, "started_ts": now,
        "finished_ts": None, "status": "running",
        "erased": {"events": 0, "rooms": {}, "media": 0, "account": False},
        "kept": [], "not_redacted_remotely": [], "redactions_sent": 0,
    }
    await store.save_erasure(report)

    user_holds = await store.list_holds("user", user_id)
    room_holds: dict[str, list[dict[str, Any]]] = {}
    for h in await store.list_holds("room"):
        room_holds.setdefault(h["target"], []).append(h)
    floors = await store.floors()

    sent = await store.events_sent_by(user_id)
    to_erase: dict[str, list[str]] = {}
    kept_ids: list[str] = []
    kept_groups: dict[tuple[str, str, Any], dict[str, Any]] = {}

    def keep(eid: str, room_id: str, why: str, ref: Any, detail: dict[str, Any]) -> None:
        kept_ids.append(eid)
        g = kept_groups.setdefault((room_id, why, ref), dict(what="events", room_id=room_id, count=0, why=why,
                                                                 **detail))
        g["count"] += 1

    for eid, room_id, etype, _state_key, ts in sent:
        if user_holds:
            h = user_holds[0]
            keep(eid, room_id, "legal_hold", h["id"], {"hold_id": h["id"], "reason": h["reason"]})
        elif room_id in room_holds:
            h = room_holds[room_id][0]
            keep(eid, room_id, "legal_hold", h["id"], {"hold_id": h["id"], "reason": h["reason"]})
        elif room_id in floors and ts + floors[room_id]["floor_ms"] > now:
            f = floors[room_id]
            keep(eid, room_id, "retention_floor", room_id, {"reason": f["reason"], "floor_ms": f["floor_ms"]})
        else:
            to_erase.setdefault(room_id, []).append(eid)
    report["kept"] = list(kept_groups.values())

    memberships = await hs.events.get_rooms_for_user(user_id)
    redaction_ids: list[str] = []
    for room_id, eids in sorted(to_erase.items()):
        joined = memberships.get(room_id, ("", ""))[0] == "join"
        redactor = await _redactor(hs, room_id, user_id, joined)
        evs = await hs.events.get_events(eids)
        targets = [e for e in eids if e in evs and evs[e].type != "m.room.redaction"
                   and not evs[e].internal.get("redacted_by") and not evs[e].internal.get("outlier")]
        if redactor is None:
            if targets:
                report["not_redacted_remotely"].append({
                    "room_id": room_id, "count": len(targets),
                    "why": "no local member is in the room to send the redactions; the content is purged here"})
            continue
        destinations = await _remote_servers(hs, room_id)
        failed = 0
        for i in range(0, len(targets), REDACTION_BATCH):
            batch = targets[i:i + REDACTION_BATCH]
            try:
                reds = await hs.event_creator.send_redactions(room_id, redactor, batch)
            except MatrixError as e:
                failed += len(batch)
                logger.info("erasure %s: %d redactions in %s refused: %s", report["id"], len(batch), room_id, e.msg)
                continue
            redaction_ids += [r.event_id for r in reds]
            await store.record_redactions(report["id"], [r.event_id for r in reds], room_id, destinations)
            # Others' requests get their turn between batches.
            from zhome.util.reactor import reactor

            await task.deferLater(reactor, REDACTION_PAUSE_S, lambda: None)
        if failed:
            report["not_redacted_remotely"].append({
                "room_id": room_id, "count": failed,
                "why": "the room refused the redaction; the content is purged here"})
    report["redactions_sent"] = len(redaction_ids)

    erase_ids = [e for eids in to_erase.values() for e in eids]
    await store.purge_content(erase_ids + redaction_ids)
    report["erased"]["events"] = len(erase_ids)
    report["erased"]["rooms"] = {r: len(e) for r, e in sorted(to_erase.items())}

    # Files: everything the user uploaded, but those that kept events show.
    kept_mxc: set[str] = set()
    if kept_ids:
        for ev in (await hs.events.get_events(kept_ids)).values():
            _mxc_in(ev.content, kept_mxc)
    media_kept = media_erased = 0
    repo = hs.media_repository
    for origin, media_id in await hs.privacy_store.media_of(user_id):
        if user_holds or f"mxc://{origin}/{media_id}" in kept_mxc:
            media_kept += 1
            continue
        if repo is not None and await repo.delete_media(origin, media_id):
            media_erased += 1
    report["erased"]["media"] = media_erased
    if media_kept:
        entry: dict[str, Any] = {"what": "media", "count": media_kept, "why": "shown_by_kept_events"}
        if user_holds:
            entry.update(why="legal_hold", hold_id=user_holds[0]["id"], reason=user_holds[0]["reason"])
        report["kept"].append(entry)

    await deactivate_account(hs, user_id, erase=True)
    await store.delete_user_traces(user_id)
    # Crypto-shredding: the data keys of what was erased (and of the user's
    # own information) are destroyed, so copies of it elsewhere (database
    # backups, dumps) cannot be read either; keys kept events need stay.
    if user_holds:
        report["erased"]["data_keys"] = 0
    else:
        report["erased"]["data_keys"] = await store.shred_user_keys(user_id)
    # What was overwritten or deleted leaves the database files too.
    await hs.event_search.scrub()
    await hs.db.scrub(SCRUBBED_TABLES)
    report["erased"]["account"] = True
    report["finished_ts"] = int(time.time() * 1000)
    report["status"] = "partial" if (report["kept"] or report["not_redacted_remotely"]) else "complete"
    await store.save_erasure(report)
    got = await store.get_erasure(report["id"])
    assert got is not None
    return got
