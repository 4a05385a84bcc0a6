-- "Receiving notifications": when a user sends an event, the notifications
-- before it and including it are read, as by a read receipt. The newest
-- event each local user sent in each room, as a stream position: read
-- beside their read receipts (zhome/storage/notifications.py) and written
-- in the transaction that stores the event (zhome/storage/events.py).
CREATE TABLE sent_read_marks (
    user_id TEXT NOT NULL,
    room_id TEXT NOT NULL,
    stream_ordering BIGINT NOT NULL,
    PRIMARY KEY (user_id, room_id)
);
