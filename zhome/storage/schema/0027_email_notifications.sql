-- Email notifications of missed messages (zhome/push/email_notify.py):
-- per user, the notification log position up to which rows were
-- considered, and when the last mail went (ms).
CREATE TABLE email_notify_state (
    user_id TEXT PRIMARY KEY,
    position BIGINT NOT NULL,
    last_mail_ts BIGINT NOT NULL
);
