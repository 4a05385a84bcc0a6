-- Encryption at rest (zhome/storage/at_rest.py). An event's json column
-- holds its redacted form (what the graph, the auth rules and federation
-- need: IDs, type, state key, edges, hashes, signatures, the content keys
-- the redaction algorithm keeps); sealed holds the rest (content and any
-- other top-level key) AES-256-GCM-sealed under data key data_key, which
-- lives only in the key store. data_key 0: nothing to seal (the event is
-- its own redacted form); NULL: written before sealing (plain json, sealed
-- by the background job) or purged.
ALTER TABLE events ADD COLUMN sealed TEXT;
ALTER TABLE events ADD COLUMN data_key BIGINT;
CREATE INDEX events_data_key ON events (data_key);

-- How far the background job that seals rows written before encryption at
-- rest has come, per table.
CREATE TABLE at_rest_progress (
    name TEXT PRIMARY KEY,
    position BIGINT NOT NULL
);
