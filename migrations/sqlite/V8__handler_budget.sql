-- The handler's budget for a job, kept across runs and restarts of the service:
-- milliseconds its handler runs have taken so far (handler_job_timeout_secs is "in all"), and
-- how many runs ended with items unanswered (handler_attempts_max).
ALTER TABLE export_jobs ADD COLUMN handler_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE export_jobs ADD COLUMN handler_failed_runs INTEGER NOT NULL DEFAULT 0;
