-- Presence (client-server-api "Presence", server-server-api "Presence"):
-- one row per user, local or remote, holding their latest state. Each
-- change takes a new position on the presence stream (stream_id), which
-- /sync folds into its token and reads changes from.
CREATE TABLE presence (
    user_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    status_msg TEXT,
    -- Milliseconds since the epoch of the user's last activity (a request
    -- that showed them at the keyboard) and of their last /sync; for a
    -- remote user, as their server last told us.
    last_active_ts BIGINT NOT NULL,
    last_sync_ts BIGINT NOT NULL,
    currently_active SMALLINT NOT NULL,
    -- 1 when the user chose this state (PUT /presence); a /sync that marks
    -- the user online then leaves "unavailable" alone.
    explicit SMALLINT NOT NULL,
    stream_id BIGINT NOT NULL
);
CREATE INDEX presence_stream ON presence (stream_id);
