//! Retention (`prune`), counts for reports and metrics, integrity and checkpoints.

use super::*;

/// Retention for `jobmirror prune`, in days.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Items and raw JSON of jobs finished (done, expired, conflict, too late) this long ago.
    pub jobs_days: u32,
    /// Bodies and headers of handled webhook deliveries.
    pub webhook_bodies_days: u32,
    /// Whole delivery rows (their ids deduplicate retries: at least 4 days).
    pub webhook_ids_days: u32,
    pub sync_runs_days: u32,
}

/// What a prune removed (or would remove, in a dry run).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PruneReport {
    pub jobs_trimmed: usize,
    pub job_items_deleted: usize,
    pub webhook_bodies_cleared: usize,
    pub webhook_rows_deleted: usize,
    pub sync_runs_deleted: usize,
    pub dry_run: bool,
}

/// Health figures for `jobmirror doctor`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveryBacklog {
    pub unprocessed: i64,
    pub oldest_unprocessed: Option<Millis>,
    pub last_received: Option<Millis>,
}

pub(super) const DAY_MS: i64 = 86_400_000;

/// Operator queries: read-only reports, the online backup and retention.
impl Store {
    /// Jobs, optionally of one company and/or in one state, in pick order per company.
    pub fn list_jobs(
        &self,
        company: Option<&str>,
        state: Option<&str>,
        limit: usize,
    ) -> Result<Vec<JobRow>> {
        self.db.rows(
            &format!(
                "SELECT {JOB_COLUMNS} FROM export_jobs WHERE (CAST(?1 AS TEXT) IS NULL OR company_id = ?1) \
                 AND (CAST(?2 AS TEXT) IS NULL OR proc_state = ?2) \
                 ORDER BY company_id, created_at, created_at_sub_ns, id LIMIT ?3"
            ),
            &[&company, &state, &i64::try_from(limit).unwrap_or(i64::MAX)],
            job_row,
        )
    }

    /// Every company's latest webhook delivery (one pass over the deliveries kept: no index
    /// on the hot path of ingest for a report).
    pub fn last_webhooks(&self) -> Result<std::collections::HashMap<String, Millis>> {
        Ok(self
            .db
            .rows(
                "SELECT company_id, max(received_at) FROM webhook_deliveries \
                 WHERE company_id IS NOT NULL GROUP BY company_id",
                &[],
                |r| Ok((r.get::<String>(0)?, Millis(r.get(1)?))),
            )?
            .into_iter()
            .collect())
    }

    /// Claimable jobs of the company that come before `job` in pick order.
    pub fn jobs_ahead(&self, job: &JobRow) -> Result<Vec<String>> {
        self.db.rows(
            "SELECT o.id FROM export_jobs o JOIN export_jobs j ON j.id = ?2 \
             WHERE o.company_id = ?1 AND o.status = 'pending' AND o.proc_state = 'new' \
             AND (o.created_at, o.created_at_sub_ns, o.id) < (j.created_at, j.created_at_sub_ns, j.id) \
             ORDER BY o.created_at, o.created_at_sub_ns, o.id",
            &[&job.company_id, &job.id],
            |r| r.get(0),
        )
    }

    /// Moves everything in the WAL into the main file and empties the WAL
    /// (`wal_checkpoint(TRUNCATE)`), so the `.db` file alone holds every row. Nothing to do on
    /// PostgreSQL.
    pub fn checkpoint(&self) -> Result<()> {
        if self.db.is_pg() {
            return Ok(());
        }
        let busy: i64 = self
            .lite()?
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
        if busy != 0 {
            log::warn!("checkpoint could not finish: another connection is reading");
        }
        Ok(())
    }

    /// `PRAGMA quick_check`: `["ok"]` when the file is sound. On PostgreSQL, whose pages are
    /// its server's to check, `["ok"]` when the schema answers.
    pub fn quick_check(&self) -> Result<Vec<String>> {
        if self.db.is_pg() {
            self.db
                .value::<i64>("SELECT count(*) FROM companies_version", &[])?;
            return Ok(vec!["ok".to_owned()]);
        }
        let mut stmt = self.lite()?.prepare("PRAGMA quick_check")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn delivery_backlog(&self) -> Result<DeliveryBacklog> {
        Ok(self
            .db
            .row(
                "SELECT (SELECT count(*) FROM webhook_deliveries WHERE processed_at IS NULL), \
                 (SELECT min(received_at) FROM webhook_deliveries WHERE processed_at IS NULL), \
                 (SELECT max(received_at) FROM webhook_deliveries)",
                &[],
                |r| {
                    Ok(DeliveryBacklog {
                        unprocessed: r.get(0)?,
                        oldest_unprocessed: r.get::<Option<i64>>(1)?.map(Millis),
                        last_received: r.get::<Option<i64>>(2)?.map(Millis),
                    })
                },
            )?
            .unwrap_or(DeliveryBacklog {
                unprocessed: 0,
                oldest_unprocessed: None,
                last_received: None,
            }))
    }

    /// Jobs held now (`resume`, `claiming`, `claimed`, `processing`), soonest deadline first.
    pub fn in_flight(&self) -> Result<Vec<JobRow>> {
        self.db.rows(
            &format!(
                "SELECT {JOB_COLUMNS} FROM export_jobs \
                 WHERE proc_state IN ('resume', 'claiming', 'claimed', 'processing') ORDER BY expires_at"
            ),
            &[],
            job_row,
        )
    }

    /// Journal entries by kind (for metrics; kept by a trigger, so a scrape never counts the
    /// journal).
    pub fn event_counts(&self) -> Result<Vec<(String, i64)>> {
        self.db.rows(
            "SELECT kind, n FROM journal_counts ORDER BY kind",
            &[],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
    }

    /// Final events sent, by event (`completed`, `completed_with_errors`, `failed`).
    pub fn finish_counts(&self) -> Result<Vec<(String, i64)>> {
        self.db.rows(
            "SELECT event, n FROM finish_counts ORDER BY event",
            &[],
            |r| Ok((r.get::<Option<String>>(0)?.unwrap_or_default(), r.get(1)?)),
        )
    }

    /// When a listing pass last succeeded, over all companies (None: never).
    pub fn last_successful_poll(&self) -> Result<Option<Millis>> {
        let at: Option<Option<i64>> = self
            .db
            .value("SELECT max(last_ok_at) FROM company_sync", &[])?;
        Ok(at.flatten().map(Millis))
    }

    /// Companies whose listing keeps failing and last succeeded more than `stale_ms` before
    /// `now` (or never). A company no longer polled (removed) drops out once its last pass
    /// is twice that old.
    pub fn companies_poll_stale(&self, now: Millis, stale_ms: i64) -> Result<i64> {
        Ok(self
            .db
            .value(
                "SELECT count(*) FROM company_sync
                  WHERE failed_in_a_row > 0
                    AND coalesce(last_ok_at, 0) < CAST(?1 AS BIGINT) - CAST(?2 AS BIGINT)
                    AND last_finished_at >= CAST(?1 AS BIGINT) - 2 * CAST(?2 AS BIGINT)",
                &[&now, &stale_ms.max(1)],
            )?
            .unwrap_or(0))
    }

    /// Jobs by processing state, over all companies.
    pub fn state_counts(&self) -> Result<Vec<(String, i64)>> {
        self.db.rows(
            "SELECT proc_state, count(*) FROM export_jobs GROUP BY proc_state ORDER BY proc_state",
            &[],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
    }

    /// Copies the database to `dest` with SQLite's online backup (a consistent copy while the
    /// service keeps writing), then makes it durable. (PostgreSQL: `pg_dump`, the operator's.)
    pub fn backup_to(&self, dest: &Path) -> Result<()> {
        let mut target = Connection::open(dest).map_err(|source| StoreError::Open {
            path: dest.display().to_string(),
            source,
        })?;
        {
            let b = rusqlite::backup::Backup::new(self.lite()?, &mut target)?;
            b.run_to_completion(256, std::time::Duration::from_millis(5), None)?;
        }
        target.execute_batch("PRAGMA journal_mode = DELETE")?;
        drop(target);
        std::fs::File::open(dest)
            .and_then(|f| f.sync_all())
            .map_err(|source| StoreError::Io {
                path: dest.display().to_string(),
                source,
            })?;
        Ok(())
    }

    /// Removes what is past its retention as of `now` (the report time, `--at`), in one
    /// transaction. A prune that removed anything is journaled `pruned` at `recorded_at` (the
    /// real time: the journal is in the order things happened, so a `--at` in the future never
    /// dates an entry); one that removed nothing leaves no entry. The journal itself is never
    /// pruned (it is append-only).
    pub fn prune(
        &self,
        now: Millis,
        recorded_at: Millis,
        keep: Retention,
        dry_run: bool,
    ) -> Result<PruneReport> {
        let before = |days: u32| now.0 - i64::from(days) * DAY_MS;
        let tx = self.db.write_tx()?;
        let old_jobs = "SELECT id FROM export_jobs WHERE proc_state IN ('done', 'expired', 'conflict', 'too_late') \
             AND status NOT IN ('pending', 'in_progress') AND proc_state_at < ?1";
        // Each change counts the rows it touched; a dry run makes them all and rolls back.
        let mut r = PruneReport {
            dry_run,
            ..PruneReport::default()
        };
        let cut_jobs = before(keep.jobs_days);
        r.job_items_deleted = tx.exec(
            &format!("DELETE FROM job_items WHERE job_id IN ({old_jobs})"),
            &[&cut_jobs],
        )? as usize;
        r.jobs_trimmed = tx.exec(
            &format!(
                "UPDATE export_jobs SET raw_json = '{{}}' WHERE id IN ({old_jobs}) AND raw_json <> '{{}}'"
            ),
            &[&cut_jobs],
        )? as usize;
        r.webhook_bodies_cleared = tx.exec(
            "UPDATE webhook_deliveries SET body = '', headers = '{}' \
             WHERE processed_at IS NOT NULL AND received_at < ?1 AND body <> ''",
            &[&before(keep.webhook_bodies_days)],
        )? as usize;
        r.webhook_rows_deleted = tx.exec(
            "DELETE FROM webhook_deliveries WHERE processed_at IS NOT NULL AND received_at < ?1",
            &[&before(keep.webhook_ids_days.max(4))],
        )? as usize;
        r.sync_runs_deleted = tx.exec(
            "DELETE FROM sync_runs WHERE started_at < ?1 AND finished_at IS NOT NULL",
            &[&before(keep.sync_runs_days)],
        )? as usize;
        let removed = r.jobs_trimmed
            + r.job_items_deleted
            + r.webhook_bodies_cleared
            + r.webhook_rows_deleted
            + r.sync_runs_deleted;
        if dry_run || removed == 0 {
            // Dropped uncommitted: rolled back.
            return Ok(r);
        }
        journal_db(
            &tx,
            recorded_at,
            None,
            None,
            EventKind::Pruned,
            &serde_json::to_value(&r).unwrap_or_default(),
        )?;
        tx.commit()?;
        Ok(r)
    }
}
