-- Account states an administrator sets (client-server-api "Account
-- locking" and "Account suspension", and the Synapse-compatible admin API):
-- a locked account's tokens answer M_USER_LOCKED; a suspended account reads
-- but does not write; user_type is Synapse's (null, "bot", "support");
-- erased is set by a deactivation with erase.
ALTER TABLE users ADD COLUMN locked INTEGER NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN suspended INTEGER NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN user_type TEXT;
ALTER TABLE users ADD COLUMN erased INTEGER NOT NULL DEFAULT 0;
CREATE INDEX users_created ON users (created_ts);

-- Reports of events, rooms and users (client-server-api "Reporting
-- content"), read by admins through the event_reports endpoints.
-- kind: 'event' (room_id and event_id set), 'room' (room_id set) or 'user'
-- (target_user_id set).
CREATE TABLE content_reports (
    id BIGINT PRIMARY KEY,
    kind TEXT NOT NULL,
    received_ts BIGINT NOT NULL,
    reporter TEXT NOT NULL,
    room_id TEXT,
    event_id TEXT,
    target_user_id TEXT,
    reason TEXT,
    score BIGINT
);
CREATE INDEX content_reports_kind ON content_reports (kind, received_ts);

-- Rooms an admin has blocked: no local user may join them.
CREATE TABLE blocked_rooms (
    room_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    blocked_ts BIGINT NOT NULL
);

-- Legal holds (an admin keeps a user's or a room's data from erasure, with
-- a reason) and statutory retention floors (a room's events are kept for at
-- least floor_ms from their origin_server_ts, e.g. 20 years for a medical
-- file).
CREATE TABLE legal_holds (
    id BIGINT PRIMARY KEY,
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    reason TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_ts BIGINT NOT NULL
);
CREATE INDEX legal_holds_target ON legal_holds (kind, target);

CREATE TABLE room_retention_floors (
    room_id TEXT PRIMARY KEY,
    floor_ms BIGINT NOT NULL,
    reason TEXT NOT NULL,
    set_by TEXT NOT NULL,
    set_ts BIGINT NOT NULL
);

-- One row per erasure of a user (GDPR art. 17): what was erased and kept,
-- and the redactions it sent, whose delivery the report reads back from the
-- federation queue.
CREATE TABLE erasures (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    requested_by TEXT NOT NULL,
    started_ts BIGINT NOT NULL,
    finished_ts BIGINT,
    status TEXT NOT NULL,
    report_json TEXT NOT NULL
);
CREATE INDEX erasures_user ON erasures (user_id);

CREATE TABLE erasure_redactions (
    erasure_id TEXT NOT NULL,
    redaction_event_id TEXT NOT NULL,
    room_id TEXT NOT NULL,
    destinations TEXT NOT NULL,
    PRIMARY KEY (erasure_id, redaction_event_id)
);

-- The audit log: every admin action and data-subject request, append-only
-- and hash-chained (hash = SHA-256 of the previous hash and this entry), so
-- that any later edit of a stored entry breaks the chain from there on.
CREATE TABLE audit_log (
    seq BIGINT PRIMARY KEY,
    ts BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    outcome TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);

-- Media an admin quarantined (never served, locally or over federation) or
-- protected from quarantine.
CREATE TABLE media_quarantine (
    origin TEXT NOT NULL,
    media_id TEXT NOT NULL,
    quarantined_by TEXT,
    protected INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (origin, media_id)
);

-- Each user's server notices room (client-server-api "Server Notices").
CREATE TABLE server_notice_rooms (
    user_id TEXT PRIMARY KEY,
    room_id TEXT NOT NULL
);

-- Room deletions by the admin API (v2 runs in the background): status is
-- scheduled, active, complete or failed; result_json holds the shutdown
-- result (kicked users, aliases removed, new room).
CREATE TABLE room_deletions (
    delete_id TEXT PRIMARY KEY,
    room_id TEXT NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    result_json TEXT NOT NULL,
    started_ts BIGINT NOT NULL
);
CREATE INDEX room_deletions_room ON room_deletions (room_id);

-- How far the retention purge got in each room (stream ordering).
CREATE TABLE retention_positions (
    room_id TEXT PRIMARY KEY,
    stream_ordering BIGINT NOT NULL
);

-- A user's transfer settings (GDPR: the right to block transfer to third
-- parties): with do_not_transfer, their data goes to no server outside
-- allowed_servers (a JSON list of server-name globs; empty: none).
CREATE TABLE user_privacy (
    user_id TEXT PRIMARY KEY,
    do_not_transfer INTEGER NOT NULL DEFAULT 0,
    allowed_servers TEXT NOT NULL DEFAULT '[]',
    set_by TEXT NOT NULL,
    set_ts BIGINT NOT NULL
);

-- The transfer log: what went to which server, per room and sender: the
-- number of events and the first and last time.
CREATE TABLE transfer_log (
    destination TEXT NOT NULL,
    room_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    events BIGINT NOT NULL,
    first_ts BIGINT NOT NULL,
    last_ts BIGINT NOT NULL,
    PRIMARY KEY (destination, room_id, sender)
);
CREATE INDEX transfer_log_sender ON transfer_log (sender);
CREATE INDEX transfer_log_room ON transfer_log (room_id);

-- History purges by the admin API (status: active, complete or failed).
CREATE TABLE history_purges (
    purge_id TEXT PRIMARY KEY,
    room_id TEXT NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    started_ts BIGINT NOT NULL
);
