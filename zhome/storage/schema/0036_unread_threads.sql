-- Unread counts by thread (client-server-api "Receiving notifications",
-- "Threaded read receipts"): one row per user, room and thread, where
-- thread_id is a thread root's event ID or 'main' for the main timeline
-- (every event not in a thread, thread roots included). A threaded receipt
-- clears its thread's row; /sync with unread_thread_notifications shows
-- the rows apart, without it their sum.
-- The counts kept so far were not split by thread: they become the main
-- timeline's, until the user's next read receipt in the room recounts.
CREATE TABLE room_unread_threads (
    user_id TEXT NOT NULL,
    room_id TEXT NOT NULL,
    thread_id TEXT NOT NULL,
    notification_count INTEGER NOT NULL,
    highlight_count INTEGER NOT NULL,
    PRIMARY KEY (user_id, room_id, thread_id)
);
INSERT INTO room_unread_threads (user_id, room_id, thread_id, notification_count, highlight_count)
    SELECT user_id, room_id, 'main', notification_count, highlight_count FROM room_unread;
DROP TABLE room_unread;
ALTER TABLE room_unread_threads RENAME TO room_unread;
