-- Server-side search sees each message as its latest valid edit
-- (zhome/storage/event_search.py): an edit (m.replace) has no row of its
-- own, and the row of the event it replaces holds the tokens of the edit's
-- m.new_content. edit_id names that edit (NULL: the row holds the event's
-- own words), so that losing the edit (a redaction, erasure, retention)
-- finds the row whose words it gave.
-- Rows written before this file were made the other way (edits as events of
-- their own, originals with their first words), which no statement can turn
-- into tokens of the new kind: the index is rebuilt from the stored events
-- by its background pass, which starts over (its progress rows go).
-- engine: sqlite3
DROP TRIGGER event_search_ai;
DROP TRIGGER event_search_ad;
DROP TRIGGER event_search_au;
DROP TABLE event_search_fts;
DROP TABLE event_search;
CREATE TABLE event_search (
    id INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL UNIQUE,
    room_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    key TEXT NOT NULL,
    stream_ordering BIGINT NOT NULL,
    tokens TEXT NOT NULL,
    edit_id TEXT
);
CREATE VIRTUAL TABLE event_search_fts USING fts5(tokens, content='event_search', content_rowid='id');
CREATE TRIGGER event_search_ai AFTER INSERT ON event_search BEGIN
    INSERT INTO event_search_fts (rowid, tokens) VALUES (new.id, new.tokens); END;
CREATE TRIGGER event_search_ad AFTER DELETE ON event_search BEGIN
    INSERT INTO event_search_fts (event_search_fts, rowid, tokens) VALUES ('delete', old.id, old.tokens); END;
CREATE TRIGGER event_search_au AFTER UPDATE ON event_search BEGIN
    INSERT INTO event_search_fts (event_search_fts, rowid, tokens) VALUES ('delete', old.id, old.tokens); INSERT INTO event_search_fts (rowid, tokens) VALUES (new.id, new.tokens); END;
-- engine: postgres
DROP TABLE event_search;
CREATE TABLE event_search (
    event_id TEXT PRIMARY KEY,
    room_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    key TEXT NOT NULL,
    stream_ordering BIGINT NOT NULL,
    vector TSVECTOR NOT NULL,
    edit_id TEXT
);
CREATE INDEX event_search_fts ON event_search USING GIN (vector);
-- engine: all
CREATE INDEX event_search_room ON event_search (room_id, stream_ordering);
-- Only rows of edited events: nothing for a message sent without one.
CREATE INDEX event_search_edit ON event_search (edit_id) WHERE edit_id IS NOT NULL;
DELETE FROM at_rest_progress WHERE name IN ('event_search', 'event_search_done');
