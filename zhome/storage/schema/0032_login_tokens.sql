-- One-use login tokens (client-server-api "Token-based login",
-- POST /_matrix/client/v1/login/get_token and m.login.token). Only a hash of
-- the token is kept, as for access tokens; a token is deleted when it is
-- used, when it expires (swept at use) and with the user's devices.
CREATE TABLE login_tokens (
    token_hash TEXT NOT NULL PRIMARY KEY,
    user_id TEXT NOT NULL,
    expires_ts BIGINT NOT NULL
);
CREATE INDEX login_tokens_user ON login_tokens (user_id);
