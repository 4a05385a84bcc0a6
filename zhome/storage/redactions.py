"""Which recorded redactions apply.

Spec: rooms/v3 and later "Handling redactions", client-server-api
"Redactions": a redaction applies only to an event in its own room, and
(v3 and later) only when its sender is on the target sender's server or
has the redact level. A redaction received over federation (or backfilled)
before its target is recorded in the ``redactions`` table (event_id,
redacts) before anyone can tell the target's room or sender; as the target
is stored, the rows of redactions that may not take effect on it are
deleted (``EventsStore._redacted_on_arrival_txn``), and a row left applies
only when both events are in one room. Every reader that takes a row as
applying goes through here.
"""

from __future__ import annotations

from typing import Optional

from zhome.storage.database import Txn

#: A condition on an events row aliased ``e``: some redaction in its room names it.
REDACTED_IN_ROOM = ("EXISTS (SELECT 1 FROM redactions rd JOIN events re ON re.event_id = rd.event_id"
                    " WHERE rd.redacts = e.event_id AND re.room_id = e.room_id)")


def redacted_in_room_txn(txn: Txn, event_id: str, room_id: str) -> Optional[str]:
    """The first stored redaction of ``event_id`` that is in ``room_id``
    (the target's room), or None."""
    txn.execute("SELECT MIN(rd.event_id) FROM redactions rd JOIN events re ON re.event_id = rd.event_id"
                " WHERE rd.redacts = ? AND re.room_id = ?", (event_id, room_id))
    row = txn.fetchone()
    return str(row[0]) if row is not None and row[0] is not None else None


def redactions_in_room_txn(txn: Txn, event_id: str, room_id: str) -> list[tuple[str, str, Optional[int]]]:
    """Every stored redaction of ``event_id`` that is in ``room_id``, in
    event ID order: (redaction event ID, its sender, the state group
    before it)."""
    txn.execute("SELECT rd.event_id, re.sender, re.prev_state_group FROM redactions rd"
                " JOIN events re ON re.event_id = rd.event_id WHERE rd.redacts = ? AND re.room_id = ?"
                " ORDER BY rd.event_id", (event_id, room_id))
    return [(str(r[0]), str(r[1]), r[2]) for r in txn.fetchall()]
