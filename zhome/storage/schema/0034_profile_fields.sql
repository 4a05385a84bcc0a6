-- Extended profile fields (client-server-api "Profiles", v1.16): m.tz and
-- custom namespaced keys beside displayname and avatar_url (which stay in
-- profiles). value is the field's JSON, sealed under the user's key like
-- the rest of the profile. Deleted with the account (deactivation and
-- erasure).
CREATE TABLE profile_fields (
    user_id TEXT NOT NULL,
    field TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (user_id, field)
);
