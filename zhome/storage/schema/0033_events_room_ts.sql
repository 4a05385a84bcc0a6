-- Jump to a date in a room (GET /v1/rooms/{roomId}/timestamp_to_event and
-- its federation twin): events of a room by the time they were sent.
CREATE INDEX events_room_ts ON events (room_id, origin_server_ts);
