-- Jobs created within one millisecond are ordered by createdAt at its full precision, then id:
-- the nanoseconds past the millisecond that Pleo's createdAt carries (0 when it has none).
ALTER TABLE export_jobs ADD COLUMN created_at_sub_ns INTEGER NOT NULL DEFAULT 0;

DROP INDEX export_jobs_pick;
CREATE INDEX export_jobs_pick ON export_jobs (company_id, created_at, created_at_sub_ns, id, expires_at)
    WHERE status = 'pending' AND proc_state = 'new';
DROP INDEX export_jobs_active;
CREATE INDEX export_jobs_active ON export_jobs (company_id, created_at, created_at_sub_ns, id)
    WHERE proc_state IN ('resume', 'claiming', 'claimed', 'processing');

-- The queue view keeps its columns; only its order follows the full precision.
DROP VIEW queue;
CREATE VIEW queue AS
SELECT company_id,
       row_number() OVER (PARTITION BY company_id ORDER BY created_at, created_at_sub_ns, id) AS position,
       id AS job_id,
       strftime('%Y-%m-%dT%H:%M:%fZ', created_at / 1000.0, 'unixepoch') AS created,
       strftime('%Y-%m-%dT%H:%M:%fZ', expires_at / 1000.0, 'unixepoch') AS expires,
       (expires_at - CAST(strftime('%s', 'now') AS INTEGER) * 1000) / 1000 AS seconds_left,
       number_of_items
FROM export_jobs
WHERE status = 'pending' AND proc_state = 'new';
