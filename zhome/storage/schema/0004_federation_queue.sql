-- The outbound federation queue: one row per PDU or EDU per destination,
-- written in the same transaction as the event, deleted once the
-- destination acknowledged the transaction that carried it.
CREATE TABLE federation_outbound (
    id BIGINT PRIMARY KEY,
    destination TEXT NOT NULL,
    event_id TEXT,
    edu_json TEXT,
    created_ts BIGINT NOT NULL
);
CREATE INDEX federation_outbound_dest ON federation_outbound (destination, id);

CREATE TABLE federation_destinations (
    destination TEXT PRIMARY KEY,
    failure_count INTEGER NOT NULL DEFAULT 0,
    retry_interval_ms BIGINT NOT NULL DEFAULT 0,
    last_failure_ts BIGINT
);

-- Transactions received, for idempotency per (origin, txn_id).
CREATE TABLE federation_received_txns (
    origin TEXT NOT NULL,
    txn_id TEXT NOT NULL,
    response TEXT NOT NULL,
    received_ts BIGINT NOT NULL,
    PRIMARY KEY (origin, txn_id)
);
