-- Guest accounts (client-server-api "Guest Access"): registered with
-- POST /register?kind=guest, limited to the endpoints that module lists,
-- and turned into full accounts (is_guest back to 0) by an upgrade.
ALTER TABLE users ADD COLUMN is_guest INTEGER NOT NULL DEFAULT 0;
