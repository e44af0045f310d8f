-- Per-item state of the jobs jobmirror processes. A result is recorded here before it is
-- reported to Pleo; an item reported `successful` is never reported again.
CREATE TABLE job_items (
    job_id               TEXT    NOT NULL REFERENCES export_jobs (id),
    accounting_entry_id  TEXT    NOT NULL,
    pleo_status          TEXT    NOT NULL,      -- the item's status at Pleo, as last read or reported
    our_status           TEXT    NOT NULL DEFAULT 'todo'
        CHECK (our_status IN ('todo', 'successful', 'failed')), -- the handler's result
    external_id          TEXT,
    external_url         TEXT,
    failure_reason       TEXT,
    failure_reason_type  TEXT,
    reconciliation_id    TEXT,                  -- additionalInformation.reconciliationId: the idempotency key
    handled_at           INTEGER,               -- when the result was recorded
    reported_at          INTEGER,               -- when Pleo acknowledged it (or reporting was given up, see report_error)
    report_attempts      INTEGER NOT NULL DEFAULT 0,
    report_error         TEXT,                  -- the last per-item error Pleo answered
    PRIMARY KEY (job_id, accounting_entry_id)
) STRICT, WITHOUT ROWID;
CREATE INDEX job_items_unreported ON job_items (job_id, handled_at) WHERE handled_at IS NOT NULL AND reported_at IS NULL;
