-- Invitations by email (zhome/identity/invite_mail.py): the two ways in
-- an invitation mail offers.

-- A registration token bound to one invitation: the link in the mail.
-- token_hash is the SHA-256 of the token (the token itself is never
-- stored); address is sealed (under the identity service's key), found by
-- its blind index like the 3PIDs; used_ts and user_id are set when a
-- registration takes it (reserved before the account is made, so a retry
-- with the same username can finish it), done_ts once the account exists
-- and is in its rooms.
CREATE TABLE invite_registration_tokens (
    token_hash TEXT PRIMARY KEY,
    medium TEXT NOT NULL,
    address_index TEXT NOT NULL,
    address TEXT NOT NULL,
    invite_token TEXT NOT NULL,
    room_id TEXT NOT NULL,
    created_ts BIGINT NOT NULL,
    expires_ts BIGINT NOT NULL,
    used_ts BIGINT,
    user_id TEXT,
    done_ts BIGINT
);
CREATE INDEX invite_registration_tokens_address ON invite_registration_tokens (medium, address_index);

-- Invitations claimed by the email bridge's ghost of the invited address
-- (the reply way): a claim made again (a retried mail) answers the same.
CREATE TABLE email_invite_claims (
    invite_token TEXT PRIMARY KEY,
    room_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    claimed_ts BIGINT NOT NULL
);
