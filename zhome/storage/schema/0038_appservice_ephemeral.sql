-- Ephemeral events (MSC2409: m.typing, m.receipt, m.presence) queued for
-- application services registered with receive_ephemeral
-- (zhome/storage/appservice_ephemeral.py). One row per event per service,
-- the whole ephemeral event as JSON in ``event``. ``user_id`` is the user a
-- receipt or presence row is about (NULL for typing: a typing notice lists
-- the room's typing users), so that erasure finds the rows. ``txn_id`` is
-- the transaction that carries the row once one does: a re-sent transaction
-- carries exactly these rows; they are deleted when the service answered
-- 200 to it. At most 1000 rows per service wait for a transaction (the
-- oldest go first).
CREATE TABLE appservice_ephemeral (
    id BIGINT PRIMARY KEY,
    as_id TEXT NOT NULL,
    edu_type TEXT NOT NULL,
    room_id TEXT,
    user_id TEXT,
    ts BIGINT NOT NULL,
    event TEXT NOT NULL,
    txn_id BIGINT
);
CREATE INDEX appservice_ephemeral_as ON appservice_ephemeral (as_id, id);
