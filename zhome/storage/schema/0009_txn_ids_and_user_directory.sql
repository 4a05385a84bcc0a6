-- Transaction IDs are served back to the device that sent the event
-- (client-server-api "Transaction identifiers"): events are read with their
-- row here, found by event ID.
CREATE INDEX event_txn_ids_event ON event_txn_ids (event_id);

-- The user directory (client-server-api "User directory"). Who a search may
-- return is decided at query time from current state: users sharing a
-- joined room with the searcher, or joined to a room that is public for the
-- directory. These two tables hold what current state alone does not give
-- cheaply: which rooms are public (join rule "public" or history visibility
-- "world_readable", kept by the persistence path) and the display name and
-- avatar of remote users (from their latest join event; local users are
-- read from their profiles).
CREATE TABLE user_directory_public_rooms (
    room_id TEXT PRIMARY KEY
);

CREATE TABLE user_directory_remote_profiles (
    user_id TEXT PRIMARY KEY,
    display_name TEXT,
    avatar_url TEXT
);

-- What the rooms already stored say (from then on the persistence path
-- keeps both tables).
-- engine: sqlite3
INSERT INTO user_directory_public_rooms (room_id)
SELECT DISTINCT c.room_id FROM current_state_events c JOIN events e ON e.event_id = c.event_id
WHERE c.state_key = '' AND (
    (c.type = 'm.room.join_rules' AND json_extract(e.json, '$.content.join_rule') = 'public')
    OR (c.type = 'm.room.history_visibility'
        AND json_extract(e.json, '$.content.history_visibility') = 'world_readable'));
INSERT INTO user_directory_remote_profiles (user_id, display_name, avatar_url)
SELECT c.state_key, MAX(json_extract(e.json, '$.content.displayname')),
       MAX(json_extract(e.json, '$.content.avatar_url'))
FROM current_state_events c JOIN events e ON e.event_id = c.event_id
WHERE c.type = 'm.room.member' AND c.membership = 'join'
  AND c.state_key NOT IN (SELECT user_id FROM users)
GROUP BY c.state_key;
-- engine: postgres
INSERT INTO user_directory_public_rooms (room_id)
SELECT DISTINCT c.room_id FROM current_state_events c JOIN events e ON e.event_id = c.event_id
WHERE c.state_key = '' AND (
    (c.type = 'm.room.join_rules' AND (e.json::json -> 'content' ->> 'join_rule') = 'public')
    OR (c.type = 'm.room.history_visibility'
        AND (e.json::json -> 'content' ->> 'history_visibility') = 'world_readable'));
INSERT INTO user_directory_remote_profiles (user_id, display_name, avatar_url)
SELECT c.state_key, MAX(e.json::json -> 'content' ->> 'displayname'),
       MAX(e.json::json -> 'content' ->> 'avatar_url')
FROM current_state_events c JOIN events e ON e.event_id = c.event_id
WHERE c.type = 'm.room.member' AND c.membership = 'join'
  AND c.state_key NOT IN (SELECT user_id FROM users)
GROUP BY c.state_key;
