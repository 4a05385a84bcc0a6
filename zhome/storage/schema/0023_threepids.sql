-- Outbound mail, OpenID tokens, third-party identifiers (3PIDs) and the
-- identity service zhome serves itself. Addresses are personal data: they
-- are kept sealed (zhome/storage/at_rest.py) and found by a blind index,
-- the HMAC-SHA256 of the normalised address under a key held in the key
-- store (never the address itself).

-- The persistent outbox of zhome/mail: one row per mail until the relay
-- accepted it. recipient and message are sealed; attempts and
-- next_attempt_ts drive the retries with backoff.
CREATE TABLE mail_outbox (
    id BIGINT PRIMARY KEY,
    created_ts BIGINT NOT NULL,
    sender TEXT NOT NULL,
    recipient TEXT NOT NULL,
    message TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ts BIGINT NOT NULL,
    last_error TEXT
);
CREATE INDEX mail_outbox_next ON mail_outbox (next_attempt_ts);

-- Client-Server API "OpenID": tokens a user hands to a third party, kept
-- as SHA-256 digests.
CREATE TABLE openid_tokens (
    token_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    valid_until_ms BIGINT NOT NULL
);
CREATE INDEX openid_tokens_user ON openid_tokens (user_id);

-- The 3PIDs of local users (client-server "Adding Account Administrative
-- Contact Information"): address_index is the blind index, address the
-- sealed address (under the user's own data key).
CREATE TABLE user_threepids (
    medium TEXT NOT NULL,
    address_index TEXT NOT NULL,
    user_id TEXT NOT NULL,
    address TEXT NOT NULL,
    added_at BIGINT NOT NULL,
    validated_at BIGINT NOT NULL,
    PRIMARY KEY (medium, address_index)
);
CREATE INDEX user_threepids_user ON user_threepids (user_id);

-- The identity servers each 3PID of a local user was bound to through
-- the homeserver (/account/3pid/bind), so deleting the 3PID or
-- deactivating the account unbinds it there. address is sealed under the
-- user's key.
CREATE TABLE user_threepid_id_servers (
    user_id TEXT NOT NULL,
    medium TEXT NOT NULL,
    address_index TEXT NOT NULL,
    id_server TEXT NOT NULL,
    address TEXT NOT NULL,
    PRIMARY KEY (user_id, medium, address_index, id_server)
);

-- Validation sessions of the homeserver ("hs") and of its identity
-- service ("is"): sid, the client secret and the token as digests, the
-- address sealed. send_attempt makes requestToken idempotent.
CREATE TABLE threepid_sessions (
    sid TEXT PRIMARY KEY,
    service TEXT NOT NULL,
    medium TEXT NOT NULL,
    address_index TEXT NOT NULL,
    address TEXT NOT NULL,
    client_secret_hash TEXT NOT NULL,
    token_hash TEXT NOT NULL,
    send_attempt BIGINT NOT NULL,
    created_ts BIGINT NOT NULL,
    expires_ts BIGINT NOT NULL,
    validated_at BIGINT,
    next_link TEXT
);
CREATE INDEX threepid_sessions_lookup ON threepid_sessions (service, medium, address_index);

-- Identity service: associations (address to Matrix user ID), found by the
-- blind index and by the hashed lookup of the spec (sha256 of "address
-- medium pepper", unpadded base64url).
CREATE TABLE identity_associations (
    medium TEXT NOT NULL,
    address_index TEXT NOT NULL,
    lookup_hash TEXT NOT NULL,
    mxid TEXT NOT NULL,
    address TEXT NOT NULL,
    created_ts BIGINT NOT NULL,
    PRIMARY KEY (medium, address_index)
);
CREATE INDEX identity_associations_lookup ON identity_associations (lookup_hash);
CREATE INDEX identity_associations_mxid ON identity_associations (mxid);

-- Identity service accounts (registered with an OpenID token).
CREATE TABLE identity_accounts (
    token_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    created_ts BIGINT NOT NULL
);

-- Identity service: invitations stored for an address not yet bound
-- (store-invite); handed to the homeserver at bind time (3pid/onbind).
CREATE TABLE identity_invites (
    token TEXT PRIMARY KEY,
    medium TEXT NOT NULL,
    address_index TEXT NOT NULL,
    room_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    created_ts BIGINT NOT NULL,
    ephemeral_private_key TEXT NOT NULL,
    ephemeral_public_key TEXT NOT NULL
);
CREATE INDEX identity_invites_address ON identity_invites (medium, address_index);

-- Small named values of the identity service (the lookup pepper).
CREATE TABLE identity_meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
