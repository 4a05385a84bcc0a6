-- Dehydrated devices (MSC3814, unstable prefix org.matrix.msc3814.v1): at
-- most one per user. The device itself is a row of devices (with no access
-- token), so its keys, one-time keys and to-device inbox are those of any
-- device; this row marks it and keeps the client's encrypted device_data.
CREATE TABLE dehydrated_devices (
    user_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    device_data TEXT NOT NULL,
    ts BIGINT NOT NULL
);
