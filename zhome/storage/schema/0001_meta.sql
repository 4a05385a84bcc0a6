-- Facts about this server's database itself (e.g. which server_name it was
-- created for), so a misconfigured start-up can be refused.
CREATE TABLE server_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
