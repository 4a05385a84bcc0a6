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
