-- Server-side key backups (client-server-api "End-to-End Encryption" →
-- "Server-side key backups", /room_keys/*).

-- The last backup version handed out to each user. Versions are never
-- handed out twice, even after the backup that had one is deleted, so a
-- client holding an old version can never write into a newer backup.
CREATE TABLE e2e_room_keys_version_seq (
    user_id TEXT PRIMARY KEY,
    last_version BIGINT NOT NULL
);

-- The user's live backups; the current one is the highest version. etag
-- counts the changes to the version's stored keys.
CREATE TABLE e2e_room_keys_versions (
    user_id TEXT NOT NULL,
    version BIGINT NOT NULL,
    algorithm TEXT NOT NULL,
    auth_data TEXT NOT NULL,
    etag BIGINT NOT NULL,
    PRIMARY KEY (user_id, version)
);

-- One backed-up megolm session key per version, room and session. The
-- metadata columns decide whether a later upload replaces the key.
CREATE TABLE e2e_room_keys (
    user_id TEXT NOT NULL,
    version BIGINT NOT NULL,
    room_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    first_message_index BIGINT NOT NULL,
    forwarded_count BIGINT NOT NULL,
    is_verified INTEGER NOT NULL,
    session_data TEXT NOT NULL,
    PRIMARY KEY (user_id, version, room_id, session_id)
);
