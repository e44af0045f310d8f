-- Webhook deliveries, committed before the 2xx goes out, and the running service's pid.

CREATE TABLE webhook_deliveries (
    webhook_id    TEXT    PRIMARY KEY,               -- webhook-id (svix-id): the sender's dedup key
    received_at   INTEGER NOT NULL,                  -- when jobmirror committed it
    signed_at     INTEGER NOT NULL,                  -- webhook-timestamp, as milliseconds
    event_type    TEXT,                              -- eventType from the body
    event_id      TEXT,                              -- eventId from the body
    job_id        TEXT,                              -- data.id from the body (a hint, not the truth)
    company_id    TEXT,                              -- data.companyId from the body
    body          TEXT    NOT NULL,                  -- the raw body, exactly as signed
    headers       TEXT    NOT NULL CHECK (json_valid(headers)), -- request headers (no Authorization/Cookie)
    processed_at  INTEGER,                           -- when the named job was read again; NULL = to do
    outcome       TEXT                               -- what that read found, or why nothing was read
) STRICT;
CREATE INDEX webhook_deliveries_todo ON webhook_deliveries (received_at) WHERE processed_at IS NULL;
CREATE INDEX webhook_deliveries_received ON webhook_deliveries (received_at);

-- The process running `jobmirror run` on this database (for `jobmirror trigger`).
CREATE TABLE service_instances (
    pid         INTEGER NOT NULL PRIMARY KEY,
    started_at  INTEGER NOT NULL,
    version     TEXT    NOT NULL
) STRICT;
