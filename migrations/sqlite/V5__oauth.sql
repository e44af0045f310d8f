-- OAuth 2.0 tokens. Every refresh rotates the pair and the old refresh token stops working,
-- so the new pair is committed here before it is used.
CREATE TABLE oauth_tokens (
    credential          TEXT    PRIMARY KEY,   -- which credential ('default')
    access_token        TEXT,                  -- NULL until the first refresh
    access_expires_at   INTEGER,
    refresh_token       TEXT    NOT NULL,
    updated_at          INTEGER NOT NULL,
    refresh_started_at  INTEGER,               -- committed before a refresh request, cleared with its answer:
                                               -- set at start-up means a refresh was interrupted
    last_error          TEXT
) STRICT;
