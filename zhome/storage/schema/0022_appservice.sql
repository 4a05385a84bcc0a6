-- Application services (zhome/appservice). The queue holds event IDs only,
-- never content: content is read (and opened) from events when a
-- transaction is built. One row per event per interested service, written in
-- the same transaction as the event; deleted once the service answered 200
-- to the transaction that carried it.
CREATE TABLE appservice_queue (
    id BIGINT PRIMARY KEY,
    as_id TEXT NOT NULL,
    event_id TEXT NOT NULL
);
CREATE INDEX appservice_queue_as ON appservice_queue (as_id, id);

-- Per service: the last transaction ID used, the transaction in flight (its
-- ID and the highest queue row it carries, so a retry sends the same ID
-- with the same events), and the retry backoff.
CREATE TABLE appservice_state (
    as_id TEXT PRIMARY KEY,
    last_txn_id BIGINT NOT NULL DEFAULT 0,
    inflight_txn_id BIGINT,
    inflight_max_id BIGINT,
    failure_count INTEGER NOT NULL DEFAULT 0,
    retry_interval_ms BIGINT NOT NULL DEFAULT 0,
    last_failure_ts BIGINT
);

-- Spec: client-server-api "Application service room directories": rooms a
-- service published in its network's directory.
CREATE TABLE appservice_room_list (
    as_id TEXT NOT NULL,
    network_id TEXT NOT NULL,
    room_id TEXT NOT NULL,
    PRIMARY KEY (as_id, network_id, room_id)
);
