-- End-to-end encryption (client-server-api "End-to-End Encryption",
-- "Send-to-Device messaging"; server-server-api "Device Management").

-- The identity keys of a local device, as the device signed them.
CREATE TABLE e2e_device_keys (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    key_json TEXT NOT NULL,
    ts BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id)
);

-- One-time keys: each is handed out once (the claim deletes its row).
CREATE TABLE e2e_one_time_keys (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    key_id TEXT NOT NULL,
    key_json TEXT NOT NULL,
    ts BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id, algorithm, key_id)
);

-- One fallback key per device and algorithm, given out (and marked used)
-- when the device has no one-time key of that algorithm left.
CREATE TABLE e2e_fallback_keys (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    key_id TEXT NOT NULL,
    key_json TEXT NOT NULL,
    used INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, device_id, algorithm)
);

-- The device-list stream: one row per change to a user's devices or device
-- keys, local users and remote ones (from m.device_list_update). prev_id
-- is the user's previous local stream_id, sent in the EDU.
CREATE TABLE device_list_changes (
    stream_id BIGINT PRIMARY KEY,
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    prev_id BIGINT
);
CREATE INDEX device_list_changes_user ON device_list_changes (user_id, stream_id);

-- Remote users' device lists, cached while a room is shared with them.
-- stream_id is the origin's latest m.device_list_update stream_id.
CREATE TABLE remote_device_list_streams (
    user_id TEXT PRIMARY KEY,
    stream_id BIGINT NOT NULL,
    updated_ts BIGINT NOT NULL
);

CREATE TABLE remote_devices (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    display_name TEXT,
    keys_json TEXT,
    PRIMARY KEY (user_id, device_id)
);

-- The to-device stream: messages waiting for a local device, deleted once
-- the device syncs with a since token at or after their stream_id.
CREATE TABLE device_inbox (
    stream_id BIGINT PRIMARY KEY,
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    message_json TEXT NOT NULL
);
CREATE INDEX device_inbox_device ON device_inbox (user_id, device_id, stream_id);

-- PUT /sendToDevice is idempotent per device and transaction ID.
CREATE TABLE to_device_txns (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    txn_id TEXT NOT NULL,
    ts BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id, txn_id)
);

-- /sync's device_lists needs the membership changes of the rooms that
-- changed since the token, without a scan of the whole table.
CREATE INDEX room_memberships_room_stream ON room_memberships (room_id, stream_ordering);

-- The highest position each stream has handed out, for streams whose rows
-- are deleted (the to-device inbox empties as devices acknowledge): a
-- restart must never hand out a position again.
CREATE TABLE stream_positions (
    stream TEXT PRIMARY KEY,
    pos BIGINT NOT NULL
);
INSERT INTO stream_positions (stream, pos) VALUES ('to_device', 0);
