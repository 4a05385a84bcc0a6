-- Cross-signing (client-server-api "Cross-signing", POST
-- /keys/device_signing/upload and /keys/signatures/upload; server-server-api
-- "End-to-End Encryption" and "Device Management", m.signing_key_update).

-- A user's cross-signing keys: master, self_signing and (local users only)
-- user_signing, as uploaded. Remote users' master and self-signing keys are
-- cached here too, from their server, while a room is shared with them.
CREATE TABLE e2e_cross_signing_keys (
    user_id TEXT NOT NULL,
    key_type TEXT NOT NULL,
    key_id TEXT NOT NULL,
    key_json TEXT NOT NULL,
    ts BIGINT NOT NULL,
    PRIMARY KEY (user_id, key_type)
);

-- Signatures uploaded with /keys/signatures/upload, kept apart from the
-- signed keys so that a device re-uploading its keys does not drop them.
-- target_key_id is a device ID (a device signed by its user's self-signing
-- key) or the unpadded base64 public key of a master key (signed by one of
-- its user's devices, or by another user's user-signing key).
CREATE TABLE e2e_cross_signing_signatures (
    target_user_id TEXT NOT NULL,
    target_key_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    signature TEXT NOT NULL,
    PRIMARY KEY (target_user_id, target_key_id, user_id, key_id)
);
CREATE INDEX e2e_cross_signing_signatures_signer ON e2e_cross_signing_signatures (user_id, key_id);

-- A change of cross-signing keys joins the device-list stream (so /sync and
-- /keys/changes report it) but is not part of the prev_id chain of
-- m.device_list_update: it travels as m.signing_key_update. Some changes
-- concern one reader only (a user's own user-signing key, their signature of
-- another user's master key): visible_to names them; NULL is everyone who
-- shares a room with user_id.
ALTER TABLE device_list_changes ADD COLUMN cross_signing INTEGER NOT NULL DEFAULT 0;
ALTER TABLE device_list_changes ADD COLUMN visible_to TEXT;

-- Remote device lists cached before this version lack the users'
-- cross-signing keys: the next query or update fetches them again.
DELETE FROM remote_devices;
DELETE FROM remote_device_list_streams;
