-- The deadline a job event Pleo accepted guarantees: Pleo's time of the 202 (from its Date
-- header) plus expiresIn. A job event refreshes lastUpdatedAt (the contract page), so the job
-- cannot expire before this, even when the read that would show the new lastUpdatedAt failed.
-- Reports take the later of this and the deadline as last read (NULL: no event accepted).
ALTER TABLE export_jobs ADD COLUMN accepted_deadline INTEGER;
