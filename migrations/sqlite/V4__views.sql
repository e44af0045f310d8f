-- Stable views for operators auditing with `sqlite3 -readonly`. Their names and columns are a
-- public interface (README, "Auditing with sqlite3"): change them only by adding new views.
-- Times are shown as RFC 3339 UTC text; `seconds_left` and ages are against the reader's clock.

-- The queue: each company's claimable jobs in the order jobmirror will take them.
CREATE VIEW queue AS
SELECT company_id,
       row_number() OVER (PARTITION BY company_id ORDER BY created_at, id) AS position,
       id AS job_id,
       strftime('%Y-%m-%dT%H:%M:%fZ', created_at / 1000.0, 'unixepoch') AS created,
       strftime('%Y-%m-%dT%H:%M:%fZ', expires_at / 1000.0, 'unixepoch') AS expires,
       (expires_at - CAST(strftime('%s', 'now') AS INTEGER) * 1000) / 1000 AS seconds_left,
       number_of_items
FROM export_jobs
WHERE status = 'pending' AND proc_state = 'new';

-- Jobs jobmirror holds now (at most one per company), with seconds to their deadline.
CREATE VIEW in_flight AS
SELECT company_id,
       id AS job_id,
       proc_state,
       status AS pleo_status,
       strftime('%Y-%m-%dT%H:%M:%fZ', proc_state_at / 1000.0, 'unixepoch') AS state_since,
       strftime('%Y-%m-%dT%H:%M:%fZ', expires_at / 1000.0, 'unixepoch') AS expires,
       (expires_at - CAST(strftime('%s', 'now') AS INTEGER) * 1000) / 1000 AS seconds_left,
       claim_attempts,
       number_of_items
FROM export_jobs
WHERE proc_state IN ('resume', 'claiming', 'claimed', 'processing');

-- The journal with readable times: `WHERE job_id = '...' ORDER BY seq` is one job's timeline.
CREATE VIEW job_timeline AS
SELECT seq,
       strftime('%Y-%m-%dT%H:%M:%fZ', at / 1000.0, 'unixepoch') AS at,
       job_id,
       company_id,
       kind,
       detail
FROM job_events;

-- Webhook deliveries and what reading their job found (`ORDER BY received DESC LIMIT 20`).
CREATE VIEW recent_webhooks AS
SELECT strftime('%Y-%m-%dT%H:%M:%fZ', received_at / 1000.0, 'unixepoch') AS received,
       webhook_id,
       event_type,
       job_id,
       company_id,
       strftime('%Y-%m-%dT%H:%M:%fZ', processed_at / 1000.0, 'unixepoch') AS processed,
       outcome,
       (CAST(strftime('%s', 'now') AS INTEGER) * 1000 - received_at) / 1000 AS age_seconds
FROM webhook_deliveries;

-- Poll health per company: the last pass, the last successful one, failures in the last day.
CREATE VIEW poll_health AS
SELECT company_id,
       strftime('%Y-%m-%dT%H:%M:%fZ', max(started_at) / 1000.0, 'unixepoch') AS last_pass,
       (SELECT kind FROM sync_runs l WHERE l.company_id = s.company_id
         ORDER BY started_at DESC, id DESC LIMIT 1) AS last_kind,
       (SELECT error FROM sync_runs l WHERE l.company_id = s.company_id
         ORDER BY started_at DESC, id DESC LIMIT 1) AS last_error,
       strftime('%Y-%m-%dT%H:%M:%fZ',
                max(CASE WHEN finished_at IS NOT NULL AND error IS NULL THEN finished_at END) / 1000.0,
                'unixepoch') AS last_success,
       (CAST(strftime('%s', 'now') AS INTEGER) * 1000
         - max(CASE WHEN finished_at IS NOT NULL AND error IS NULL THEN finished_at END)) / 1000
         AS seconds_since_success,
       sum(CASE WHEN error IS NOT NULL
                 AND started_at > CAST(strftime('%s', 'now') AS INTEGER) * 1000 - 86400000
                THEN 1 ELSE 0 END) AS failures_24h
FROM sync_runs s
GROUP BY company_id;
