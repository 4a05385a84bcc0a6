-- Media housekeeping (zhome/media/cleanup.py).
--
-- Cached copies of remote media (originals and thumbnails fetched from
-- other servers) are kept while they are in use: one row per remote media
-- ID of which anything is cached here, with the last time it was fetched
-- or served (updated at most about once an hour per item). Remote media
-- not used for media.remote_cache_max_age_ms is removed. A table of its
-- own rather than a column on media: thumbnails are often cached without
-- their original (avatars), and the index then holds remote items only,
-- so finding the stale ones never walks over local media.
CREATE TABLE remote_media_cache (
    origin TEXT NOT NULL,
    media_id TEXT NOT NULL,
    last_access_ts BIGINT NOT NULL,
    PRIMARY KEY (origin, media_id)
);
CREATE INDEX remote_media_cache_last_access ON remote_media_cache (last_access_ts);

-- What was cached before this version counts as used at the upgrade, so an
-- upgrade never drops cached media that is still in use. Cached originals
-- are the media rows without an uploader (every local row has one);
-- thumbnails without an original here were fetched from their origin.
-- engine: sqlite3
INSERT INTO remote_media_cache (origin, media_id, last_access_ts)
    SELECT origin, media_id, CAST(strftime('%s', 'now') AS BIGINT) * 1000 FROM media WHERE user_id IS NULL;
INSERT INTO remote_media_cache (origin, media_id, last_access_ts)
    SELECT t.origin, t.media_id, CAST(strftime('%s', 'now') AS BIGINT) * 1000 FROM media_thumbnails t
    WHERE NOT EXISTS (SELECT 1 FROM media m WHERE m.origin = t.origin AND m.media_id = t.media_id)
    GROUP BY t.origin, t.media_id;
-- engine: postgres
INSERT INTO remote_media_cache (origin, media_id, last_access_ts)
    SELECT origin, media_id, CAST(EXTRACT(EPOCH FROM now()) * 1000 AS BIGINT) FROM media WHERE user_id IS NULL;
INSERT INTO remote_media_cache (origin, media_id, last_access_ts)
    SELECT t.origin, t.media_id, CAST(EXTRACT(EPOCH FROM now()) * 1000 AS BIGINT) FROM media_thumbnails t
    WHERE NOT EXISTS (SELECT 1 FROM media m WHERE m.origin = t.origin AND m.media_id = t.media_id)
    GROUP BY t.origin, t.media_id;
-- engine: all

-- Pending uploads (POST /media/v1/create) whose content never came are
-- found by their expiry; rows with content have it NULL.
CREATE INDEX media_unused_expires_at ON media (unused_expires_at);
