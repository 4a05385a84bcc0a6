-- Each user's invite permissions (as healthcare messengers on Matrix, e.g.
-- gematik's TI-Messenger, require): from whom the user accepts invites.
-- settings is the JSON document the user or an admin set: a default
-- ("allow" or "block") and lists of user-ID and server-name globs allowed
-- or blocked. No row: every invite is accepted.
CREATE TABLE user_invite_permissions (
    user_id TEXT PRIMARY KEY,
    settings TEXT NOT NULL,
    set_by TEXT NOT NULL,
    set_ts BIGINT NOT NULL
);
