-- Other servers' signing keys, as fetched from their key server
-- (server-server-api "Retrieving server keys", "Publishing Keys").
--
-- One row per (server, key). valid_until_ts is the response's own
-- valid_until_ts for a key listed in verify_keys (NULL for a key listed in
-- old_verify_keys); expired_ts is set only for old_verify_keys. The
-- 7-day cap the spec puts on valid_until_ts is applied when the key is
-- used, from fetched_ts, so the columns keep what the server said.
-- key_json is the whole signed response the key was last seen in,
-- canonical JSON, so the notary endpoint can serve it unchanged (with its
-- own signature added).
CREATE TABLE server_signature_keys (
    server_name TEXT NOT NULL,
    key_id TEXT NOT NULL,
    verify_key TEXT NOT NULL,
    valid_until_ts BIGINT,
    expired_ts BIGINT,
    fetched_ts BIGINT NOT NULL,
    key_json TEXT NOT NULL,
    PRIMARY KEY (server_name, key_id)
);
