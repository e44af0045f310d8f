-- jobmirror core schema. Migrations are append-only: never edit a released file, add a new one.
-- All times are integer Unix milliseconds (UTC); `datetime(x/1000, 'unixepoch')` reads them.

-- One row per Pleo export job ever seen.
CREATE TABLE export_jobs (
    id               TEXT    PRIMARY KEY,            -- Pleo job id
    company_id       TEXT    NOT NULL,               -- Pleo company id
    status           TEXT    NOT NULL,               -- Pleo's status, as last read
    created_at       INTEGER NOT NULL,               -- Pleo createdAt
    last_updated_at  INTEGER,                        -- Pleo lastUpdatedAt (NULL when Pleo sent null)
    expires_in       INTEGER NOT NULL,               -- Pleo expiresIn, seconds
    expires_at       INTEGER NOT NULL,               -- coalesce(last_updated_at, created_at) + expires_in * 1000
    number_of_items  INTEGER NOT NULL,               -- Pleo numberOfItems
    raw_json         TEXT    NOT NULL,               -- the job exactly as Pleo last sent it (unknown fields kept)
    first_seen_at    INTEGER NOT NULL,               -- when jobmirror first saw the job
    last_seen_at     INTEGER NOT NULL,               -- when jobmirror last read the job from Pleo
    proc_state       TEXT    NOT NULL DEFAULT 'new'  -- jobmirror's own processing state, see README
        CHECK (proc_state IN ('new', 'resume', 'claiming', 'claimed', 'processing',
                              'conflict', 'too_late', 'expired', 'done')),
    proc_state_at    INTEGER NOT NULL,               -- when proc_state last changed
    claim_attempts   INTEGER NOT NULL DEFAULT 0,     -- `started` requests sent for this job
    warned_expires_at INTEGER                        -- the deadline a deadline_warning was journaled for
) STRICT;

-- The pick query: oldest created_at (then id) among a company's claimable jobs.
-- Partial, so a year of finished jobs does not make picking slower.
CREATE INDEX export_jobs_pick ON export_jobs (company_id, created_at, id, expires_at)
    WHERE status = 'pending' AND proc_state = 'new';
-- Jobs jobmirror is working on (at most one per company).
CREATE INDEX export_jobs_active ON export_jobs (company_id, created_at, id)
    WHERE proc_state IN ('resume', 'claiming', 'claimed', 'processing');
-- Open jobs per company, for re-reading jobs that left the listing.
CREATE INDEX export_jobs_open ON export_jobs (company_id, status)
    WHERE status IN ('pending', 'in_progress');

-- Append-only journal of everything observed and done.
CREATE TABLE job_events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    at          INTEGER NOT NULL,                    -- when (jobmirror's clock)
    job_id      TEXT,                                -- NULL for events not about one job
    company_id  TEXT,
    kind        TEXT    NOT NULL,                    -- detected, verified, claim_sent, claimed, ...
    detail      TEXT    NOT NULL DEFAULT '{}'        -- JSON object
        CHECK (json_valid(detail))
) STRICT;
CREATE INDEX job_events_job ON job_events (job_id, seq);

CREATE TRIGGER job_events_no_update BEFORE UPDATE ON job_events
BEGIN SELECT RAISE(ABORT, 'job_events is append-only'); END;
CREATE TRIGGER job_events_no_delete BEFORE DELETE ON job_events
BEGIN SELECT RAISE(ABORT, 'job_events is append-only'); END;

-- One row per listing pass over one company.
CREATE TABLE sync_runs (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    company_id    TEXT    NOT NULL,
    kind          TEXT    NOT NULL CHECK (kind IN ('recovery', 'poll', 'trigger')),
    started_at    INTEGER NOT NULL,
    finished_at   INTEGER,                           -- NULL while running or if the process died
    pages         INTEGER NOT NULL DEFAULT 0,        -- listing pages read
    jobs_seen     INTEGER NOT NULL DEFAULT 0,        -- jobs in the listing
    jobs_new      INTEGER NOT NULL DEFAULT 0,        -- jobs not in the mirror before
    jobs_changed  INTEGER NOT NULL DEFAULT 0,        -- jobs whose status or lastUpdatedAt changed
    jobs_reread   INTEGER NOT NULL DEFAULT 0,        -- open jobs that left the listing and were read again
    error         TEXT                               -- NULL on success
) STRICT;
CREATE INDEX sync_runs_company ON sync_runs (company_id, started_at);
