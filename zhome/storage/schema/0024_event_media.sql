-- Which events show which files: each mxc:// URI found in an event's
-- content under the keys url, thumbnail_url and avatar_url (at any depth,
-- as m.image's info.thumbnail_url or an encrypted file's file.url). Written
-- with the event; an event whose content is purged loses its rows. Rows
-- for events stored before this table are written by a background pass
-- whose progress is at_rest_progress 'event_media' (position: the last
-- stream ordering done; done once the row 'event_media_done' exists).
CREATE TABLE event_media (
    event_id TEXT NOT NULL,
    room_id TEXT NOT NULL,
    origin TEXT NOT NULL,
    media_id TEXT NOT NULL,
    UNIQUE (event_id, origin, media_id)
);
CREATE INDEX event_media_file ON event_media (origin, media_id);
CREATE INDEX event_media_room ON event_media (room_id);
