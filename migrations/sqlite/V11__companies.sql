-- Companies as data: added, paused and removed with `jobmirror companies`, merged with the
-- configuration's company_ids (the database wins for a company named in both; see README).
CREATE TABLE companies (
    company_id       TEXT    PRIMARY KEY,
    -- 'default': the service's own credential; 'api_key': api_key below; 'oauth': a token
    -- pair in oauth_tokens under credential 'company:<id>'.
    credential       TEXT    NOT NULL DEFAULT 'default'
        CHECK (credential IN ('default', 'api_key', 'oauth')),
    api_key          TEXT,                      -- stored as given (the database is 0600)
    paused_at        INTEGER,                   -- set: not served until resumed
    added_at         INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    subscription_id  TEXT,                      -- this company's webhook subscription at Pleo
    webhook_secret   TEXT,                      -- its signing secret (whsec_...), accepted by the receiver
    CHECK ((credential = 'api_key') = (api_key IS NOT NULL))
) STRICT;

-- Bumped by every change to companies, so the running service notices one with a read of
-- one row.
CREATE TABLE companies_version (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL
) STRICT;
INSERT INTO companies_version (id, seq) VALUES (1, 0);
CREATE TRIGGER companies_added AFTER INSERT ON companies
BEGIN UPDATE companies_version SET seq = seq + 1 WHERE id = 1; END;
CREATE TRIGGER companies_changed AFTER UPDATE ON companies
BEGIN UPDATE companies_version SET seq = seq + 1 WHERE id = 1; END;
CREATE TRIGGER companies_removed AFTER DELETE ON companies
BEGIN UPDATE companies_version SET seq = seq + 1 WHERE id = 1; END;

-- Set when the token endpoint refused the stored refresh token: terminal (Pleo: "always treat
-- refresh token failures as terminal"), so nothing is sent with it again until a new refresh
-- token is given (re-authorization), which clears it.
ALTER TABLE oauth_tokens ADD COLUMN refused_at INTEGER;
