-- Account states an administrator sets (client-server-api "Account
-- locking" and "Account suspension", and the Synapse-compatible admin API):
-- a locked account's tokens answer M_USER_LOCKED; a suspended account reads
-- but does not write; user_type is Synapse's (null, "bot", "support");
-- erased is set by a deactivation with erase.
ALTER TABLE users ADD COLUMN locked INTEGER NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN suspended INTEGER NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN user_type TEXT;
ALTER TABLE users ADD COLUMN erased INTEGER NOT NULL DEFAULT 0;
CREATE INDEX users_created ON users (created_ts);
