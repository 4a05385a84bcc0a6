-- Pushers (client-server-api "Push Notifications" → "Pushers", POST
-- /pushers/set; zhome/storage/pushers.py) and how far each has delivered.
--
-- A pusher belongs to the device whose access token created it
-- (device_id, access_token_id): logging that device out, deleting it, or a
-- password change that logs the other devices out deletes its pushers.
-- (app_id, pushkey) is unique per user; across users only with append.
-- data is the client's JSON with url and format, sent to the gateway minus
-- url. pushkey_ts is when the pushkey was last set (ms).
--
-- last_stream_ordering is the delivery position: every notification of
-- the user (user_notifications) at or below it has been sent to the push
-- gateway (or given up on). Deliveries pending after a restart are the
-- user's notification rows above it.
CREATE TABLE pushers (
    id BIGINT PRIMARY KEY,
    user_id TEXT NOT NULL,
    device_id TEXT,
    access_token_id BIGINT,
    kind TEXT NOT NULL,
    app_id TEXT NOT NULL,
    pushkey TEXT NOT NULL,
    pushkey_ts BIGINT NOT NULL,
    app_display_name TEXT NOT NULL,
    device_display_name TEXT NOT NULL,
    profile_tag TEXT,
    lang TEXT NOT NULL,
    data TEXT NOT NULL,
    last_stream_ordering BIGINT NOT NULL,
    UNIQUE (user_id, app_id, pushkey)
);
CREATE INDEX pushers_app_pushkey ON pushers (app_id, pushkey);
CREATE INDEX pushers_device ON pushers (user_id, device_id);
