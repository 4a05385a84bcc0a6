-- Removing the notifications of given events (redaction purges, erasure,
-- retention, history purges) without a scan of every user's notifications.
-- By stream ordering rather than event ID: new rows arrive with ever larger
-- positions, so they land at the right-hand edge of this index and a message
-- into a room of thousands adds no scattered page writes here.
CREATE INDEX user_notifications_stream ON user_notifications (stream_ordering);
