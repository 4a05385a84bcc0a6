-- Relationships between events (client-server-api "Forming relationships
-- between events"; zhome/storage/relations.py): one row per timeline event
-- whose content has an m.relates_to with a rel_type and an event_id (a
-- reply's m.in_reply_to alone is no row). Event content is sealed at rest,
-- so what the relations API and the bundled aggregations need of it is
-- kept here in the clear: the parent's ID and the rel_type, beside the
-- event's own type, sender, position and timestamp (as events holds them).
-- edit_ok: an m.replace whose own content can make it a valid replacement
-- (not a state event; m.new_content present, or encrypted). Written with
-- the event; a rejected or soft-failed event gets no row, and an event
-- whose content goes (redaction, erasure, retention, purge) loses its row.
-- Rows for events stored before this table are written by a background
-- pass whose progress is at_rest_progress 'event_relations' (position: the
-- last stream ordering done; done once 'event_relations_done' exists).
CREATE TABLE event_relations (
    event_id TEXT NOT NULL PRIMARY KEY,
    room_id TEXT NOT NULL,
    parent_id TEXT NOT NULL,
    rel_type TEXT NOT NULL,
    type TEXT NOT NULL,
    sender TEXT NOT NULL,
    stream_ordering BIGINT NOT NULL,
    origin_server_ts BIGINT NOT NULL,
    edit_ok SMALLINT NOT NULL
);
CREATE INDEX event_relations_parent ON event_relations (parent_id, rel_type, stream_ordering);
CREATE INDEX event_relations_room ON event_relations (room_id);

-- The threads of each room (client-server-api "Threading") with their
-- latest event, for GET /rooms/{roomId}/threads: kept with event_relations
-- (a reply raises latest_*, losing the latest reply lowers them, losing
-- the last one drops the row).
CREATE TABLE event_threads (
    room_id TEXT NOT NULL,
    root_id TEXT NOT NULL,
    latest_event_id TEXT NOT NULL,
    latest_stream_ordering BIGINT NOT NULL,
    PRIMARY KEY (room_id, root_id)
);
CREATE INDEX event_threads_latest ON event_threads (room_id, latest_stream_ordering);
