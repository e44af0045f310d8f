-- jobmirror's schema on PostgreSQL: the same tables, views and invariants as the SQLite
-- migrations in ../sqlite (V1..V12) reach, written once in PostgreSQL's dialect. Migrations are
-- append-only: never edit a released file, add a new one. All times are bigint Unix
-- milliseconds (UTC); `jm_iso(x)` reads one, `jm_now_ms()` is the database server's clock.

CREATE FUNCTION jm_iso(ms bigint) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT to_char(to_timestamp(ms / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
$$;
CREATE FUNCTION jm_now_ms() RETURNS bigint LANGUAGE sql VOLATILE AS $$
    SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint
$$;

-- One row per Pleo export job ever seen.
CREATE TABLE export_jobs (
    id                 text    PRIMARY KEY,          -- Pleo job id
    company_id         text    NOT NULL,             -- Pleo company id
    status             text    NOT NULL,             -- Pleo's status, as last read
    created_at         bigint  NOT NULL,             -- Pleo createdAt (milliseconds)
    created_at_sub_ns  bigint  NOT NULL DEFAULT 0,   -- createdAt's digits below the millisecond
    last_updated_at    bigint,                       -- Pleo lastUpdatedAt (NULL when Pleo sent null)
    expires_in         bigint  NOT NULL,             -- Pleo expiresIn, seconds
    expires_at         bigint  NOT NULL,             -- coalesce(last_updated_at, created_at) + expires_in * 1000
    number_of_items    bigint  NOT NULL,             -- Pleo numberOfItems
    raw_json           text    NOT NULL,             -- the job exactly as Pleo last sent it
    first_seen_at      bigint  NOT NULL,
    last_seen_at       bigint  NOT NULL,
    proc_state         text    NOT NULL DEFAULT 'new'
        CHECK (proc_state IN ('new', 'resume', 'claiming', 'claimed', 'processing',
                              'conflict', 'too_late', 'expired', 'done')),
    proc_state_at      bigint  NOT NULL,
    claim_attempts     bigint  NOT NULL DEFAULT 0,
    warned_expires_at  bigint,
    handler_ms         bigint  NOT NULL DEFAULT 0,
    handler_failed_runs bigint NOT NULL DEFAULT 0,
    accepted_deadline  bigint
);
CREATE INDEX export_jobs_pick ON export_jobs (company_id, created_at, created_at_sub_ns, id, expires_at)
    WHERE status = 'pending' AND proc_state = 'new';
CREATE INDEX export_jobs_active ON export_jobs (company_id, created_at, created_at_sub_ns, id)
    WHERE proc_state IN ('resume', 'claiming', 'claimed', 'processing');
CREATE INDEX export_jobs_open ON export_jobs (company_id, status)
    WHERE status IN ('pending', 'in_progress');
CREATE INDEX export_jobs_company_state ON export_jobs (company_id, proc_state, expires_at);
CREATE INDEX export_jobs_state ON export_jobs (proc_state);

-- Append-only journal of everything observed and done.
CREATE TABLE job_events (
    seq         bigint  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          bigint  NOT NULL,
    job_id      text,
    company_id  text,
    kind        text    NOT NULL,
    detail      text    NOT NULL DEFAULT '{}' CHECK (detail::jsonb IS NOT NULL)
);
CREATE INDEX job_events_job ON job_events (job_id, seq);

CREATE FUNCTION jm_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME;
END $$;
CREATE TRIGGER job_events_no_update BEFORE UPDATE ON job_events
    FOR EACH ROW EXECUTE FUNCTION jm_append_only();
CREATE TRIGGER job_events_no_delete BEFORE DELETE ON job_events
    FOR EACH ROW EXECUTE FUNCTION jm_append_only();
CREATE TRIGGER job_events_no_truncate BEFORE TRUNCATE ON job_events
    FOR EACH STATEMENT EXECUTE FUNCTION jm_append_only();

CREATE TABLE journal_counts (
    kind text   PRIMARY KEY,
    n    bigint NOT NULL
);
CREATE TABLE finish_counts (
    event text   PRIMARY KEY,
    n     bigint NOT NULL
);
CREATE FUNCTION jm_count_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO journal_counts (kind, n) VALUES (NEW.kind, 1)
        ON CONFLICT (kind) DO UPDATE SET n = journal_counts.n + 1;
    IF NEW.kind = 'finish_sent' THEN
        INSERT INTO finish_counts (event, n)
            VALUES (coalesce(NEW.detail::jsonb ->> 'event', ''), 1)
            ON CONFLICT (event) DO UPDATE SET n = finish_counts.n + 1;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER job_events_counted AFTER INSERT ON job_events
    FOR EACH ROW EXECUTE FUNCTION jm_count_event();

-- One row per listing pass over one company.
CREATE TABLE sync_runs (
    id            bigint  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    company_id    text    NOT NULL,
    kind          text    NOT NULL CHECK (kind IN ('recovery', 'poll', 'trigger')),
    started_at    bigint  NOT NULL,
    finished_at   bigint,
    pages         bigint  NOT NULL DEFAULT 0,
    jobs_seen     bigint  NOT NULL DEFAULT 0,
    jobs_new      bigint  NOT NULL DEFAULT 0,
    jobs_changed  bigint  NOT NULL DEFAULT 0,
    jobs_reread   bigint  NOT NULL DEFAULT 0,
    error         text
);
CREATE INDEX sync_runs_company ON sync_runs (company_id, started_at);

CREATE TABLE company_sync (
    company_id       text    PRIMARY KEY,
    last_kind        text    NOT NULL CHECK (last_kind IN ('recovery', 'poll', 'trigger')),
    last_started_at  bigint  NOT NULL,
    last_finished_at bigint  NOT NULL,
    last_error       text,
    last_ok_at       bigint,
    failed_in_a_row  bigint  NOT NULL DEFAULT 0,
    passes           bigint  NOT NULL DEFAULT 0,
    failed_passes    bigint  NOT NULL DEFAULT 0,
    pages            bigint  NOT NULL DEFAULT 0,
    jobs_seen        bigint  NOT NULL DEFAULT 0,
    jobs_new         bigint  NOT NULL DEFAULT 0,
    jobs_changed     bigint  NOT NULL DEFAULT 0,
    jobs_reread      bigint  NOT NULL DEFAULT 0
);

-- Signed webhook deliveries, committed before the 200 (any instance may take one).
CREATE TABLE webhook_deliveries (
    webhook_id    text    PRIMARY KEY,
    received_at   bigint  NOT NULL,
    signed_at     bigint  NOT NULL,
    event_type    text,
    event_id      text,
    job_id        text,
    company_id    text,
    body          text    NOT NULL,
    headers       text    NOT NULL CHECK (headers::jsonb IS NOT NULL),
    processed_at  bigint,
    outcome       text,
    attempts      bigint  NOT NULL DEFAULT 0,
    retry_at      bigint
);
CREATE INDEX webhook_deliveries_todo ON webhook_deliveries (received_at) WHERE processed_at IS NULL;
CREATE INDEX webhook_deliveries_received ON webhook_deliveries (received_at);
-- A stored delivery wakes the instances (LISTEN jobmirror_webhook): the payload is the company.
CREATE FUNCTION jm_notify_delivery() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('jobmirror_webhook', coalesce(NEW.company_id, ''));
    RETURN NULL;
END $$;
CREATE TRIGGER webhook_deliveries_notify AFTER INSERT ON webhook_deliveries
    FOR EACH ROW EXECUTE FUNCTION jm_notify_delivery();

-- The process running the service on this database, per host (for `jobmirror trigger`).
CREATE TABLE service_instances (
    pid         bigint  NOT NULL PRIMARY KEY,
    started_at  bigint  NOT NULL,
    version     text    NOT NULL
);

CREATE TABLE job_items (
    job_id               text    NOT NULL REFERENCES export_jobs (id),
    accounting_entry_id  text    NOT NULL,
    pleo_status          text    NOT NULL,
    our_status           text    NOT NULL DEFAULT 'todo'
        CHECK (our_status IN ('todo', 'successful', 'failed')),
    external_id          text,
    external_url         text,
    failure_reason       text,
    failure_reason_type  text,
    reconciliation_id    text,
    handled_at           bigint,
    reported_at          bigint,
    report_attempts      bigint  NOT NULL DEFAULT 0,
    report_error         text,
    PRIMARY KEY (job_id, accounting_entry_id)
);
CREATE INDEX job_items_unreported ON job_items (job_id, handled_at)
    WHERE handled_at IS NOT NULL AND reported_at IS NULL;

CREATE TABLE oauth_tokens (
    credential          text    PRIMARY KEY,
    access_token        text,
    access_expires_at   bigint,
    refresh_token       text    NOT NULL,
    updated_at          bigint  NOT NULL,
    refresh_started_at  bigint,
    last_error          text,
    refused_at          bigint
);

CREATE TABLE companies (
    company_id       text    PRIMARY KEY,
    credential       text    NOT NULL DEFAULT 'default'
        CHECK (credential IN ('default', 'api_key', 'oauth')),
    api_key          text,
    paused_at        bigint,
    added_at         bigint  NOT NULL,
    updated_at       bigint  NOT NULL,
    subscription_id  text,
    webhook_secret   text,
    CHECK ((credential = 'api_key') = (api_key IS NOT NULL))
);
CREATE TABLE companies_version (
    id  integer PRIMARY KEY CHECK (id = 1),
    seq bigint  NOT NULL
);
INSERT INTO companies_version (id, seq) VALUES (1, 0);
CREATE FUNCTION jm_companies_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE companies_version SET seq = seq + 1 WHERE id = 1;
    RETURN NULL;
END $$;
CREATE TRIGGER companies_changed AFTER INSERT OR UPDATE OR DELETE ON companies
    FOR EACH ROW EXECUTE FUNCTION jm_companies_changed();

-- The operator views, as on SQLite.
CREATE VIEW in_flight AS
SELECT company_id,
       id AS job_id,
       proc_state,
       status AS pleo_status,
       jm_iso(proc_state_at) AS state_since,
       jm_iso(expires_at) AS expires,
       (expires_at - jm_now_ms()) / 1000 AS seconds_left,
       claim_attempts,
       number_of_items
FROM export_jobs
WHERE proc_state IN ('resume', 'claiming', 'claimed', 'processing');

CREATE VIEW job_timeline AS
SELECT seq, jm_iso(at) AS at, job_id, company_id, kind, detail
FROM job_events;

CREATE VIEW recent_webhooks AS
SELECT jm_iso(received_at) AS received,
       webhook_id,
       event_type,
       job_id,
       company_id,
       jm_iso(processed_at) AS processed,
       outcome,
       (jm_now_ms() - received_at) / 1000 AS age_seconds
FROM webhook_deliveries;

CREATE VIEW poll_health AS
SELECT company_id,
       jm_iso(max(started_at)) AS last_pass,
       (SELECT kind FROM sync_runs l WHERE l.company_id = s.company_id
         ORDER BY started_at DESC, id DESC LIMIT 1) AS last_kind,
       (SELECT error FROM sync_runs l WHERE l.company_id = s.company_id
         ORDER BY started_at DESC, id DESC LIMIT 1) AS last_error,
       jm_iso(max(CASE WHEN finished_at IS NOT NULL AND error IS NULL THEN finished_at END))
         AS last_success,
       (jm_now_ms() - max(CASE WHEN finished_at IS NOT NULL AND error IS NULL THEN finished_at END))
         / 1000 AS seconds_since_success,
       sum(CASE WHEN error IS NOT NULL AND started_at > jm_now_ms() - 86400000
                THEN 1 ELSE 0 END) AS failures_24h
FROM sync_runs s
GROUP BY company_id;

CREATE VIEW queue AS
SELECT company_id,
       row_number() OVER (PARTITION BY company_id ORDER BY created_at, created_at_sub_ns, id) AS position,
       id AS job_id,
       jm_iso(created_at) AS created,
       jm_iso(expires_at) AS expires,
       (expires_at - jm_now_ms()) / 1000 AS seconds_left,
       number_of_items
FROM export_jobs
WHERE status = 'pending' AND proc_state = 'new';
