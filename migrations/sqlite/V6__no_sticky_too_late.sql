-- A pending job is never left alone for being close to expiry any more (a claim refreshes its
-- deadline): jobs an earlier version marked `too_late` while Pleo still lists them as pending
-- are eligible again at the next pass.
UPDATE export_jobs SET proc_state = 'new' WHERE proc_state = 'too_late' AND status = 'pending';
