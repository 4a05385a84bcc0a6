-- The notification log behind GET /notifications (client-server-api
-- "Listing Notifications"; zhome/storage/notifications.py).
--
-- One row per local user whose push rules gave an event a "notify" action,
-- written in the transaction that persists the event. stream_ordering is
-- the event's stream position: pages run from the newest down and a
-- `from` token is a position. Whether a row is read is not stored: it
-- follows the user's read receipts at query time. actions is the JSON of
-- the rule's actions; highlight (0/1) lets only=highlight filter in SQL.
-- Rows are bounded per user and by age (see the retention rule in
-- zhome/push/notifications.py).
CREATE TABLE user_notifications (
    user_id TEXT NOT NULL,
    room_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    stream_ordering BIGINT NOT NULL,
    ts BIGINT NOT NULL,
    actions TEXT NOT NULL,
    highlight SMALLINT NOT NULL
);
CREATE INDEX user_notifications_user_stream ON user_notifications (user_id, stream_ordering DESC);
-- For the periodic removal of rows past their age.
CREATE INDEX user_notifications_ts ON user_notifications (ts);
