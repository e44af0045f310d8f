-- Operator reports and metrics in O(companies), and sync_runs without a row per quiet poll.

-- Per-company job counts and the next deadline (status, doctor), and counts by state
-- (metrics), from indexes instead of a scan of export_jobs per company.
CREATE INDEX export_jobs_company_state ON export_jobs (company_id, proc_state, expires_at);
CREATE INDEX export_jobs_state ON export_jobs (proc_state);

-- One row per company: its latest finished listing pass and running totals of all of them.
-- Kept in the transaction that finishes each pass; sync_runs keeps the passes worth reading
-- one by one (recovery, trigger, failed, or finding something), not every quiet poll.
CREATE TABLE company_sync (
    company_id       TEXT    PRIMARY KEY,
    last_kind        TEXT    NOT NULL CHECK (last_kind IN ('recovery', 'poll', 'trigger')),
    last_started_at  INTEGER NOT NULL,
    last_finished_at INTEGER NOT NULL,
    last_error       TEXT,                      -- NULL when the latest pass succeeded
    last_ok_at       INTEGER,                   -- when a pass last succeeded (NULL: never)
    failed_in_a_row  INTEGER NOT NULL DEFAULT 0,
    passes           INTEGER NOT NULL DEFAULT 0, -- finished passes, ever
    failed_passes    INTEGER NOT NULL DEFAULT 0,
    pages            INTEGER NOT NULL DEFAULT 0, -- totals over every finished pass
    jobs_seen        INTEGER NOT NULL DEFAULT 0,
    jobs_new         INTEGER NOT NULL DEFAULT 0,
    jobs_changed     INTEGER NOT NULL DEFAULT 0,
    jobs_reread      INTEGER NOT NULL DEFAULT 0
) STRICT;

INSERT INTO company_sync (company_id, last_kind, last_started_at, last_finished_at, last_error,
                          last_ok_at, failed_in_a_row, passes, failed_passes, pages, jobs_seen,
                          jobs_new, jobs_changed, jobs_reread)
SELECT s.company_id, s.kind, s.started_at, s.finished_at, s.error,
       (SELECT max(finished_at) FROM sync_runs o
         WHERE o.company_id = s.company_id AND o.finished_at IS NOT NULL AND o.error IS NULL),
       (SELECT count(*) FROM sync_runs o
         WHERE o.company_id = s.company_id AND o.finished_at IS NOT NULL AND o.error IS NOT NULL
           AND o.id > coalesce((SELECT max(id) FROM sync_runs k
                                 WHERE k.company_id = s.company_id AND k.finished_at IS NOT NULL
                                   AND k.error IS NULL), 0)),
       a.passes, a.failed_passes, a.pages, a.jobs_seen, a.jobs_new, a.jobs_changed, a.jobs_reread
  FROM sync_runs s
  JOIN (SELECT company_id, max(id) AS last_id, count(*) AS passes,
               count(error) AS failed_passes, sum(pages) AS pages, sum(jobs_seen) AS jobs_seen,
               sum(jobs_new) AS jobs_new, sum(jobs_changed) AS jobs_changed,
               sum(jobs_reread) AS jobs_reread
          FROM sync_runs WHERE finished_at IS NOT NULL GROUP BY company_id) a
    ON s.id = a.last_id;

-- Journal entries by kind and final events by outcome, kept by a trigger in the transaction of
-- each entry, so /metrics reads a few rows instead of counting a journal that only grows.
CREATE TABLE journal_counts (
    kind TEXT    PRIMARY KEY,
    n    INTEGER NOT NULL
) STRICT;
INSERT INTO journal_counts (kind, n) SELECT kind, count(*) FROM job_events GROUP BY kind;

CREATE TABLE finish_counts (
    event TEXT    PRIMARY KEY,
    n     INTEGER NOT NULL
) STRICT;
INSERT INTO finish_counts (event, n)
SELECT coalesce(json_extract(detail, '$.event'), ''), count(*) FROM job_events
 WHERE kind = 'finish_sent' GROUP BY 1;

CREATE TRIGGER job_events_counted AFTER INSERT ON job_events
BEGIN
    INSERT INTO journal_counts (kind, n) VALUES (NEW.kind, 1)
        ON CONFLICT (kind) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER job_events_finish_counted AFTER INSERT ON job_events
WHEN NEW.kind = 'finish_sent'
BEGIN
    INSERT INTO finish_counts (event, n)
        VALUES (coalesce(json_extract(NEW.detail, '$.event'), ''), 1)
        ON CONFLICT (event) DO UPDATE SET n = n + 1;
END;
