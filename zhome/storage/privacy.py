"""What erasure reads and writes: legal holds, rooms' retention floors, the
events a user sent, purging their stored content, and erasure reports.
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterable, Optional

from twisted.internet import threads

from zhome.rooms.redaction import prune_event_dict
from zhome.rooms.versions import get_room_version
from zhome.storage.appservice_ephemeral import AppServiceEphemeralStore
from zhome.storage.at_rest import event_period
from zhome.storage.database import Database, Txn, in_chunks
from zhome.storage.event_media import EventMediaStore
from zhome.storage.event_search import EventSearchStore
from zhome.storage.events import EventsStore
from zhome.storage.ids import IdGenerator
from zhome.storage.notifications import fold_staging_txn, read_marks_txn
from zhome.storage.redactions import REDACTED_IN_ROOM
from zhome.storage.relations import MAIN_THREAD, RelationsStore


def _hold_row(row: tuple[Any, ...]) -> dict[str, Any]:
    hid, kind, target, reason, by, ts = row
    return {"id": hid, "kind": kind, "target": target, "reason": reason, "created_by": by, "created_ts": ts}


class PrivacyStore:
    def __init__(self, db: Database, events: EventsStore, hold_ids: IdGenerator, search: EventSearchStore) -> None:
        self.db = db
        self.events = events
        self.hold_ids = hold_ids
        #: Rewrites the rows of events whose latest edit's content is removed.
        self.search = search

    # -- legal holds ---------------------------------------------------------------------
    async def add_hold(self, kind: str, target: str, reason: str, by: str) -> dict[str, Any]:
        hid = self.hold_ids.next()
        row = (hid, kind, target, reason, by, int(time.time() * 1000))
        await self.db.run_interaction("add_hold", lambda txn: txn.execute(
            "INSERT INTO legal_holds (id, kind, target, reason, created_by, created_ts) VALUES (?,?,?,?,?,?)", row))
        return _hold_row(row)

    async def list_holds(self, kind: Optional[str] = None, target: Optional[str] = None) -> list[dict[str, Any]]:
        sql = "SELECT id, kind, target, reason, created_by, created_ts FROM legal_holds WHERE 1 = 1"
        args: list[Any] = []
        if kind:
            sql += " AND kind = ?"
            args.append(kind)
        if target:
            sql += " AND target = ?"
            args.append(target)
        return [_hold_row(r) for r in await self.db.execute("list_holds", sql + " ORDER BY id", *args)]

    async def delete_hold(self, hold_id: int) -> bool:
        def txn_fn(txn: Txn) -> bool:
            txn.execute("DELETE FROM legal_holds WHERE id = ?", (hold_id,))
            return bool(txn.rowcount)

        return await self.db.run_interaction("delete_hold", txn_fn)

    # -- retention floors ------------------------------------------------------------------
    async def set_floor(self, room_id: str, floor_ms: int, reason: str, by: str) -> None:
        def txn_fn(txn: Txn) -> None:
            txn.execute("DELETE FROM room_retention_floors WHERE room_id = ?", (room_id,))
            txn.execute("INSERT INTO room_retention_floors (room_id, floor_ms, reason, set_by, set_ts)"
                        " VALUES (?,?,?,?,?)", (room_id, floor_ms, reason, by, int(time.time() * 1000)))

        await self.db.run_interaction("set_floor", txn_fn)

    async def get_floor(self, room_id: str) -> Optional[dict[str, Any]]:
        rows = await self.db.execute(
            "get_floor", "SELECT floor_ms, reason, set_by, set_ts FROM room_retention_floors WHERE room_id = ?",
            room_id)
        if not rows:
            return None
        ms, reason, by, ts = rows[0]
        return {"room_id": room_id, "floor_ms": ms, "reason": reason, "set_by": by, "set_ts": ts}

    async def floors(self) -> dict[str, dict[str, Any]]:
        rows = await self.db.execute("floors", "SELECT room_id, floor_ms, reason FROM room_retention_floors")
        return {r: {"floor_ms": ms, "reason": reason} for r, ms, reason in rows}

    async def delete_floor(self, room_id: str) -> bool:
        def txn_fn(txn: Txn) -> bool:
            txn.execute("DELETE FROM room_retention_floors WHERE room_id = ?", (room_id,))
            return bool(txn.rowcount)

        return await self.db.run_interaction("delete_floor", txn_fn)

    # -- a user's events -----------------------------------------------------------------------
    async def events_sent_by(self, user_id: str) -> list[tuple[str, str, str, Optional[str], int]]:
        """(event_id, room_id, type, state_key, origin_server_ts) of every
        event ``user_id`` sent that this server holds, in stream order."""
        rows = await self.db.execute(
            "events_sent_by", "SELECT event_id, room_id, type, state_key, origin_server_ts FROM events"
            " WHERE sender = ? ORDER BY stream_ordering", user_id)
        return [(e, r, t, s, int(ts)) for e, r, t, s, ts in rows]

    async def purge_content(self, event_ids: list[str]) -> int:
        """Replace the stored JSON of each event by its redacted form (the
        room version's redaction algorithm): the content is gone from the
        database, what the graph and the auth rules need stays, and the
        hashes and signatures still verify as those of a redacted event.
        Returns how many rows changed."""
        touched_keys: set[int] = set()

        def txn_fn(txn: Txn) -> int:
            fold_staging_txn(txn)  # staged notifications are deleted like the rest
            changed = 0
            for chunk, qs in in_chunks(event_ids):
                txn.execute("SELECT e.event_id, r.room_version, e.json, e.sealed, e.data_key FROM events e"
                            f" JOIN rooms r ON r.room_id = e.room_id WHERE e.event_id IN ({qs})", tuple(chunk))
                for eid, version, raw, sealed, data_key in txn.fetchall():
                    pdu = json.loads(raw)
                    pruned = prune_event_dict(get_room_version(version), pdu)
                    if pdu.get("type") == "m.room.redaction" and "redacts" in pdu:
                        # Before v11 "redacts" is not protected; it names an
                        # event, not a person, and says what was redacted.
                        pruned["redacts"] = pdu["redacts"]
                    if sealed is not None:
                        pdu = self.events.open_pdu(eid, raw, sealed)
                        if pdu.get("type") == "m.room.redaction" and "redacts" in pdu:
                            pruned["redacts"] = pdu["redacts"]
                    if pruned != pdu or sealed is not None:
                        # With encryption at rest the json column already is
                        # the redacted form and the sealed rest goes; its
                        # data key is destroyed below once nothing else uses it.
                        txn.execute("UPDATE events SET json = ?, sealed = NULL, data_key = 0"
                                    " WHERE event_id = ?",
                                    (json.dumps(pruned, separators=(",", ":"), ensure_ascii=False), eid))
                        changed += 1
                    if data_key:
                        touched_keys.add(int(data_key))
                # Notifications and transaction IDs of these events go too.
                txn.execute("DELETE FROM user_notifications WHERE stream_ordering IN"
                            f" (SELECT stream_ordering FROM events WHERE event_id IN ({qs}))", tuple(chunk))
                txn.execute(f"DELETE FROM event_txn_ids WHERE event_id IN ({qs})", tuple(chunk))
            EventMediaStore.forget_txn(txn, event_ids)
            edited = EventSearchStore.forget_txn(txn, event_ids)
            RelationsStore.forget_txn(txn, event_ids)
            # Events whose latest edit this was read as the edit before it (or as themselves).
            self.search.reindex_txn(txn, edited)
            return changed

        try:
            changed = await self.db.run_interaction("purge_content", txn_fn)
        finally:
            for eid in event_ids:
                self.events.invalidate_event(eid)
        await self.shred_unused_keys(touched_keys)
        return changed

    async def shred_unused_keys(self, candidates: Iterable[int], *, include_current_period: bool = False) -> int:
        """Destroy those of ``candidates`` (data key IDs) that no stored
        event still needs: every copy of what they sealed, backups
        included, becomes unreadable (crypto-shredding). The keys of the
        current month are spared unless asked: a sender may be sealing a new
        event with one at this moment."""
        sealer = self.events.sealer
        ids = sorted(set(candidates))
        if sealer is None or not ids:
            return 0
        still: set[int] = set()
        for chunk, qs in in_chunks(ids):
            rows = await self.db.execute(
                "keys_in_use", f"SELECT DISTINCT data_key FROM events WHERE data_key IN ({qs})", *chunk)
            still.update(int(r[0]) for r in rows)
        unused = [i for i in ids if i not in still]
        if not include_current_period and unused:
            current = event_period(int(time.time() * 1000))
            unused = [i for i in unused if sealer.period_of(i) not in (current, None)]
        return await threads.deferToThread(sealer.destroy, unused) if unused else 0

    async def shred_user_keys(self, user_id: str) -> int:
        """After an erasure: destroy every data key of ``user_id`` that no
        kept event needs (held or under a floor), and the key of their
        own information (profile, account data, device names)."""
        sealer = self.events.sealer
        if sealer is None:
            return 0
        ids = await threads.deferToThread(sealer.key_ids, owner=user_id)
        return await self.shred_unused_keys(ids, include_current_period=True)

    async def media_of(self, user_id: str) -> list[tuple[str, str]]:
        """(origin, media_id) of every file ``user_id`` uploaded."""
        rows = await self.db.execute("media_of", "SELECT origin, media_id FROM media WHERE user_id = ?"
                                     " ORDER BY created_ts", user_id)
        return [(o, m) for o, m in rows]

    async def delete_user_traces(self, user_id: str) -> None:
        """What the user left behind that deactivation keeps: read receipts,
        read markers, presence, notifications, forgotten rooms, transaction
        IDs, and the ephemeral events about them queued for application
        services (their receipts, presence, the typing notices naming them)."""
        def txn_fn(txn: Txn) -> None:
            fold_staging_txn(txn)  # staged notifications are deleted like the rest
            for table in ("receipts", "room_unread", "room_forgotten", "presence", "user_notifications",
                          "event_txn_ids", "sent_read_marks"):
                txn.execute(f"DELETE FROM {table} WHERE user_id = ?", (user_id,))
            AppServiceEphemeralStore.forget_user_txn(txn, user_id)
            self.events.invalidate_user_rooms([user_id])

        try:
            await self.db.run_interaction("delete_user_traces", txn_fn)
        finally:
            self.events.invalidate_user_rooms([user_id])  # forgotten rooms

    # -- purging a room ---------------------------------------------------------------------
    async def purge_room(self, room_id: str) -> int:
        """Delete everything this server holds of a room: its events, state,
        graph, aliases, receipts, read markers, notifications, per-room
        account data, queued federation traffic and the typing notices and
        receipts queued for application services. Returns the number of
        events deleted."""
        def txn_fn(txn: Txn) -> int:
            fold_staging_txn(txn)  # staged notifications are deleted like the rest
            txn.execute("SELECT event_id FROM events WHERE room_id = ?", (room_id,))
            event_ids = [r[0] for r in txn.fetchall()]
            for chunk, qs in in_chunks(event_ids):
                args = tuple(chunk)
                txn.execute(f"DELETE FROM event_edges WHERE event_id IN ({qs})", args)
                txn.execute(f"DELETE FROM redactions WHERE event_id IN ({qs}) OR redacts IN ({qs})", args + args)
                txn.execute(f"DELETE FROM event_txn_ids WHERE event_id IN ({qs})", args)
                txn.execute(f"DELETE FROM federation_outbound WHERE event_id IN ({qs})", args)
            EventSearchStore.forget_room_txn(txn, room_id)
            AppServiceEphemeralStore.forget_room_txn(txn, room_id)
            txn.execute("DELETE FROM state_group_entries WHERE state_group IN"
                        " (SELECT id FROM state_groups WHERE room_id = ?)", (room_id,))
            for table in ("state_groups", "current_state_events", "room_memberships", "room_forgotten",
                          "room_aliases", "account_data", "receipts", "room_unread", "sent_read_marks",
                          "user_notifications",
                          "user_directory_public_rooms", "event_relations", "event_threads",
                          "room_forward_extremities", "server_notice_rooms", "events", "rooms"):
                txn.execute(f"DELETE FROM {table} WHERE room_id = ?", (room_id,))
            return len(event_ids)

        try:
            return await self.db.run_interaction("purge_room", txn_fn)
        finally:
            self.events.drop_room_caches(room_id)

    async def purge_history(self, room_id: str, before_stream: int, delete_local: bool, local_suffix: str) -> int:
        """Take a room's history before ``before_stream`` out of its timeline:
        remote message events are deleted, local ones too with
        ``delete_local`` (else they are kept, as they may be stored nowhere
        else, but leave the timeline: they become outliers, as do the state
        events, which the room's state still needs). Their notifications go,
        and the unread counts drop by as much. Returns how many events left
        the timeline."""
        def txn_fn(txn: Txn) -> int:
            fold_staging_txn(txn)  # staged notifications are deleted like the rest
            txn.execute("SELECT event_id, sender, state_key FROM events WHERE room_id = ? AND stream_ordering < ?"
                        " AND outlier = 0", (room_id, before_stream))
            rows = txn.fetchall()
            delete = [e for e, sender, sk in rows if sk is None and (delete_local or not sender.endswith(local_suffix))]
            hide = [e for e, sender, sk in rows if sk is not None or (not delete_local and sender.endswith(local_suffix))]
            # Each event's notifications come off its thread's count (read
            # from the relations index before its rows go, below).
            in_thread = RelationsStore.stored_threads_txn(txn, [e for e, _, _ in rows])
            by_thread: dict[str, list[str]] = {}
            for e, _, _ in rows:
                by_thread.setdefault(in_thread.get(e, MAIN_THREAD), []).append(e)
            for thread_id, thread_events in sorted(by_thread.items()):
                self._uncount_purged_txn(txn, room_id, thread_id, thread_events)
            for chunk, qs in in_chunks(delete):
                args = tuple(chunk)
                txn.execute(f"DELETE FROM redactions WHERE event_id IN ({qs}) OR redacts IN ({qs})", args + args)
                txn.execute(f"DELETE FROM event_txn_ids WHERE event_id IN ({qs})", args)
                txn.execute(f"DELETE FROM event_edges WHERE event_id IN ({qs})", args)
                txn.execute(f"DELETE FROM events WHERE event_id IN ({qs})", args)
            EventMediaStore.forget_txn(txn, delete)
            # Kept ones leave the timeline: no search finds them either.
            edited = EventSearchStore.forget_txn(txn, [e for e, _, _ in rows])
            # Deleted or hidden, they leave the timeline: their relations and threads go.
            RelationsStore.forget_txn(txn, [e for e, _, _ in rows], roots_gone=True)
            for chunk, qs in in_chunks(hide):
                txn.execute(f"UPDATE events SET outlier = 1 WHERE event_id IN ({qs})", tuple(chunk))
            # Later events edited by one of these read as they did before that edit.
            self.search.reindex_txn(txn, edited)
            return len(rows)

        try:
            return await self.db.run_interaction("purge_history", txn_fn)
        finally:
            self.events.drop_room_caches(room_id)

    @staticmethod
    def _uncount_purged_txn(txn: Txn, room_id: str, thread_id: str, event_ids: list[str]) -> None:
        """Take the purged ``event_ids`` of one thread off the unread counts
        that hold them, and delete their notifications: for each user the
        notification log says they notified, the ones after the user's read
        mark in the thread (a count covers only events after it, "Receiving
        notifications"), and none that a redaction already took off. The
        marks are read while the purged events (which receipts may point
        at) are still stored. The caller keeps persistence and recounts
        out meanwhile (``Persister.writes_paused``)."""
        # user -> (stream ordering, highlight) of each notification of the purged events.
        notified: dict[str, list[tuple[int, int]]] = {}
        for chunk, qs in in_chunks(event_ids):
            args = tuple(chunk)
            by_position = f"stream_ordering IN (SELECT stream_ordering FROM events WHERE event_id IN ({qs}))"
            txn.execute("SELECT n.user_id, n.stream_ordering, n.highlight FROM user_notifications n"
                        f" JOIN events e ON e.event_id = n.event_id WHERE n.{by_position} AND NOT {REDACTED_IN_ROOM}",
                        args)
            for user_id, so, hl in txn.fetchall():
                notified.setdefault(user_id, []).append((int(so), int(hl or 0)))
            txn.execute_later(f"DELETE FROM user_notifications WHERE {by_position}", args)
        marks = read_marks_txn(txn, room_id, thread_id, list(notified))
        for user_id, notes in sorted(notified.items()):
            mark = marks.get(user_id)
            counted = [hl for so, hl in notes if mark is None or so > mark]
            n, hl = len(counted), sum(counted)
            if not n:
                continue
            txn.execute_later("UPDATE room_unread SET notification_count = CASE WHEN notification_count > ?"
                              " THEN notification_count - ? ELSE 0 END, highlight_count = CASE WHEN"
                              " highlight_count > ? THEN highlight_count - ? ELSE 0 END"
                              " WHERE user_id = ? AND room_id = ? AND thread_id = ?",
                              (n, n, hl, hl, user_id, room_id, thread_id))
            # No row is what nothing unread is (EventsStore.set_unread_counts).
            txn.execute_later("DELETE FROM room_unread WHERE user_id = ? AND room_id = ? AND thread_id = ?"
                              " AND notification_count = 0 AND highlight_count = 0", (user_id, room_id, thread_id))

    # -- erasure reports -------------------------------------------------------------------------
    async def save_erasure(self, report: dict[str, Any]) -> None:
        def txn_fn(txn: Txn) -> None:
            txn.execute("DELETE FROM erasures WHERE id = ?", (report["id"],))
            txn.execute("INSERT INTO erasures (id, user_id, requested_by, started_ts, finished_ts, status,"
                        " report_json) VALUES (?,?,?,?,?,?,?)",
                        (report["id"], report["user_id"], report["requested_by"], report["started_ts"],
                         report.get("finished_ts"), report["status"], json.dumps(report)))

        await self.db.run_interaction("save_erasure", txn_fn)

    async def record_redactions(self, erasure_id: str, redaction_ids: list[str], room_id: str,
                                destinations: list[str]) -> None:
        dests = json.dumps(destinations)
        await self.db.run_interaction("record_redactions", lambda txn: txn.executemany(
            "INSERT INTO erasure_redactions (erasure_id, redaction_event_id, room_id, destinations)"
            " VALUES (?,?,?,?)", [(erasure_id, r, room_id, dests) for r in redaction_ids]))

    async def get_erasure(self, erasure_id: str) -> Optional[dict[str, Any]]:
        rows = await self.db.execute("get_erasure", "SELECT report_json FROM erasures WHERE id = ?", erasure_id)
        if not rows:
            return None
        report: dict[str, Any] = json.loads(rows[0][0])
        report["federation"] = await self._delivery(erasure_id)
        return report

    async def list_erasures(self, user_id: Optional[str]) -> list[dict[str, Any]]:
        sql = "SELECT id, user_id, requested_by, started_ts, finished_ts, status FROM erasures"
        args: list[Any] = []
        if user_id:
            sql += " WHERE user_id = ?"
            args.append(user_id)
        rows = await self.db.execute("list_erasures", sql + " ORDER BY started_ts", *args)
        return [{"id": i, "user_id": u, "requested_by": by, "started_ts": s, "finished_ts": f, "status": st}
                for i, u, by, s, f, st in rows]

    async def _delivery(self, erasure_id: str) -> dict[str, dict[str, int]]:
        """Per remote server: redactions sent, and of those how many it
        acknowledged (its transaction succeeded, so the queue no longer holds them)."""
        def txn_fn(txn: Txn) -> dict[str, dict[str, int]]:
            txn.execute("SELECT redaction_event_id, destinations FROM erasure_redactions WHERE erasure_id = ?",
                        (erasure_id,))
            sent: dict[str, list[str]] = {}
            for eid, dests in txn.fetchall():
                for d in json.loads(dests):
                    sent.setdefault(d, []).append(eid)
            out: dict[str, dict[str, int]] = {}
            for dest, eids in sorted(sent.items()):
                pending = 0
                for chunk, qs in in_chunks(eids):
                    txn.execute(f"SELECT COUNT(*) FROM federation_outbound WHERE destination = ? AND event_id IN ({qs})",
                                (dest, *chunk))
                    row = txn.fetchone()
                    pending += int(row[0]) if row else 0
                out[dest] = {"sent": len(eids), "acknowledged": len(eids) - pending, "pending": pending}
            return out

        return await self.db.run_interaction("erasure_delivery", txn_fn)
