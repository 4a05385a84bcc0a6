-- The media repository (client-server-api "Content repository").
--
-- One row per piece of media, local (origin = this server) or a cached copy
-- of remote media. The bytes live encrypted in the media store under
-- storage_name; wrapped_key is the per-file AES key wrapped by the server
-- media key named key_id. size and uploaded_ts are NULL while an
-- asynchronous upload (POST /media/v1/create) is pending.
CREATE TABLE media (
    origin TEXT NOT NULL,
    media_id TEXT NOT NULL,
    user_id TEXT,
    content_type TEXT,
    sniffed_type TEXT,
    upload_name TEXT,
    size BIGINT,
    created_ts BIGINT NOT NULL,
    uploaded_ts BIGINT,
    unused_expires_at BIGINT,
    storage_name TEXT,
    key_id TEXT,
    wrapped_key TEXT,
    PRIMARY KEY (origin, media_id)
);
CREATE INDEX media_user_id ON media (user_id);

-- Thumbnails, generated on demand (or fetched from the origin for remote
-- media) and cached, encrypted like the originals.
CREATE TABLE media_thumbnails (
    origin TEXT NOT NULL,
    media_id TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    method TEXT NOT NULL,
    animated INTEGER NOT NULL,
    content_type TEXT NOT NULL,
    size BIGINT NOT NULL,
    storage_name TEXT NOT NULL,
    key_id TEXT NOT NULL,
    wrapped_key TEXT NOT NULL,
    created_ts BIGINT NOT NULL,
    PRIMARY KEY (origin, media_id, width, height, method, animated)
);
