-- Server-side search (client-server-api "Server Side Search"): one row per
-- searchable event (m.room.message content.body, m.room.name content.name,
-- m.room.topic content.topic), written with the event and dropped with its
-- content (redaction, erasure, retention, purges). The text is never stored:
-- each word is an opaque keyed HMAC token (zhome/storage/event_search.py),
-- and the index holds those tokens, space separated, in word order.
-- Events stored before this table are indexed by a background pass whose
-- progress is at_rest_progress 'event_search' (done once the row
-- 'event_search_done' exists).
-- engine: sqlite3
CREATE TABLE event_search (
    id INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL UNIQUE,
    room_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    key TEXT NOT NULL,
    stream_ordering BIGINT NOT NULL,
    tokens TEXT NOT NULL
);
-- An external-content FTS5 table over the tokens: the triggers keep it in
-- step with event_search, so any DELETE of rows there (by event or by
-- room) leaves the full-text index too.
CREATE VIRTUAL TABLE event_search_fts USING fts5(tokens, content='event_search', content_rowid='id');
CREATE TRIGGER event_search_ai AFTER INSERT ON event_search BEGIN
    INSERT INTO event_search_fts (rowid, tokens) VALUES (new.id, new.tokens); END;
CREATE TRIGGER event_search_ad AFTER DELETE ON event_search BEGIN
    INSERT INTO event_search_fts (event_search_fts, rowid, tokens) VALUES ('delete', old.id, old.tokens); END;
CREATE TRIGGER event_search_au AFTER UPDATE ON event_search BEGIN
    INSERT INTO event_search_fts (event_search_fts, rowid, tokens) VALUES ('delete', old.id, old.tokens); INSERT INTO event_search_fts (rowid, tokens) VALUES (new.id, new.tokens); END;
-- engine: postgres
-- The 'simple' configuration: no stemming or stop words to mangle the tokens.
CREATE TABLE event_search (
    event_id TEXT PRIMARY KEY,
    room_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    key TEXT NOT NULL,
    stream_ordering BIGINT NOT NULL,
    vector TSVECTOR NOT NULL
);
CREATE INDEX event_search_fts ON event_search USING GIN (vector);
-- engine: all
CREATE INDEX event_search_room ON event_search (room_id, stream_ordering);
