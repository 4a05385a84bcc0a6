-- Notification rows as the event's transaction writes them
-- (zhome/storage/notifications.py). A message into a room of thousands
-- gives a row per member; inserted straight into user_notifications they
-- land on as many pages of its (user, position) index, and every message
-- rewrites them all. Here they are appended in position order instead, and
-- moved over in user order, many messages at a time, by a background pass
-- and at the start of every transaction that reads or deletes
-- notifications (so nothing ever reads a row that is still here).
CREATE TABLE user_notifications_staging (
    stream_ordering BIGINT NOT NULL,
    user_id TEXT NOT NULL,
    room_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    ts BIGINT NOT NULL,
    actions TEXT NOT NULL,
    highlight SMALLINT NOT NULL
);
CREATE INDEX user_notifications_staging_stream ON user_notifications_staging (stream_ordering);
