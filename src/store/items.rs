//! Job items: handler results recorded before they are reported, reports, failed items.

use super::*;

/// An item that failed, or whose report Pleo refused (see [`Store::problem_items`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ProblemItem {
    pub accounting_entry_id: String,
    pub our_status: String,
    pub failure_reason_type: Option<String>,
    pub failure_reason: Option<String>,
    pub report_error: Option<String>,
}

/// A handler's result for one item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ItemResult {
    pub accounting_entry_id: String,
    pub successful: bool,
    pub external_id: Option<String>,
    pub external_url: Option<String>,
    pub failure_reason: Option<String>,
    pub failure_reason_type: Option<String>,
}

/// A recorded result waiting to be reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnreportedItem {
    pub result: ItemResult,
    pub handled_at: Millis,
    pub report_attempts: i64,
}

/// Item totals of one job, by our status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ItemCounts {
    pub todo: i64,
    pub successful: i64,
    pub failed: i64,
    pub unreported: i64,
}

impl Store {
    /// Records the job's items as Pleo lists them. An item Pleo already shows finished counts as
    /// reported (a batch whose answer was lost may have landed: it is never sent twice), and
    /// takes Pleo's outcome if we had none.
    pub fn sync_job_items(
        &self,
        job_id: &str,
        items: &[(String, String, Option<String>)],
        now: Millis,
    ) -> Result<()> {
        let tx = self.db.write_tx()?;
        for (entry, pleo_status, reconciliation) in items {
            let done = matches!(pleo_status.as_str(), "successful" | "failed" | "abandoned");
            let ours = match pleo_status.as_str() {
                "successful" => "successful",
                "failed" | "abandoned" => "failed",
                _ => "todo",
            };
            tx.exec(
                "INSERT INTO job_items (job_id, accounting_entry_id, pleo_status, our_status, reconciliation_id, handled_at, reported_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6) \
                 ON CONFLICT (job_id, accounting_entry_id) DO UPDATE SET pleo_status = excluded.pleo_status, \
                 our_status = CASE WHEN job_items.our_status = 'todo' THEN excluded.our_status ELSE job_items.our_status END, \
                 handled_at = coalesce(job_items.handled_at, excluded.handled_at), \
                 reported_at = coalesce(job_items.reported_at, excluded.reported_at), \
                 reconciliation_id = coalesce(excluded.reconciliation_id, job_items.reconciliation_id)",
                &[&job_id, entry, pleo_status, &ours, reconciliation, &done.then_some(now)],
            )?;
        }
        tx.commit()
    }

    /// The handler's budget used for `job_id` so far: (milliseconds of handler runs, runs that
    /// ended with items unanswered). Both survive restarts.
    pub fn handler_budget(&self, job_id: &str) -> Result<(i64, u32)> {
        let found = self.db.row(
            "SELECT handler_ms, handler_failed_runs FROM export_jobs WHERE id = ?1",
            &[&job_id],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get::<i64>(1)?.clamp(0, i64::from(u32::MAX)) as u32,
                ))
            },
        )?;
        Ok(found.unwrap_or((0, 0)))
    }

    /// Adds `ms` of handler time (and `failed_run` to the failed runs) to `job_id`'s budget.
    pub fn add_handler_budget(&self, job_id: &str, ms: i64, failed_run: bool) -> Result<()> {
        self.db.exec(
            "UPDATE export_jobs SET handler_ms = handler_ms + ?2, \
             handler_failed_runs = handler_failed_runs + ?3 WHERE id = ?1",
            &[&job_id, &ms.max(0), &i64::from(failed_run)],
        )?;
        Ok(())
    }

    /// Items still to be given to the handler: open at Pleo and without a recorded result.
    pub fn todo_items(&self, job_id: &str) -> Result<std::collections::HashSet<String>> {
        Ok(self
            .db
            .rows(
                "SELECT accounting_entry_id FROM job_items WHERE job_id = ?1 AND our_status = 'todo' \
                 AND pleo_status IN ('pending', 'in_progress')",
                &[&job_id],
                |r| r.get(0),
            )?
            .into_iter()
            .collect())
    }

    /// Commits results in one transaction. A result never replaces one already recorded.
    /// Returns the entries that were recorded now.
    pub fn record_results(
        &self,
        job_id: &str,
        results: &[ItemResult],
        now: Millis,
    ) -> Result<Vec<String>> {
        let tx = self.db.write_tx()?;
        let mut recorded = Vec::new();
        for r in results {
            let n = tx.exec(
                "UPDATE job_items SET our_status = ?3, external_id = ?4, external_url = ?5, failure_reason = ?6, \
                 failure_reason_type = ?7, handled_at = ?8 \
                 WHERE job_id = ?1 AND accounting_entry_id = ?2 AND our_status = 'todo'",
                &[
                    &job_id,
                    &r.accounting_entry_id,
                    &if r.successful { "successful" } else { "failed" },
                    &r.external_id,
                    &r.external_url,
                    &r.failure_reason,
                    &r.failure_reason_type,
                    &now,
                ],
            )?;
            if n == 1 {
                recorded.push(r.accounting_entry_id.clone());
            }
        }
        tx.commit()?;
        Ok(recorded)
    }

    /// Recorded results not yet acknowledged by Pleo, oldest first.
    pub fn unreported_items(&self, job_id: &str, limit: usize) -> Result<Vec<UnreportedItem>> {
        self.db.rows(
            "SELECT accounting_entry_id, our_status, external_id, external_url, failure_reason, failure_reason_type, \
             handled_at, report_attempts FROM job_items \
             WHERE job_id = ?1 AND handled_at IS NOT NULL AND reported_at IS NULL \
             ORDER BY handled_at, accounting_entry_id LIMIT ?2",
            &[&job_id, &(limit as i64)],
            |r| {
                Ok(UnreportedItem {
                    result: ItemResult {
                        accounting_entry_id: r.get(0)?,
                        successful: r.get::<String>(1)? == "successful",
                        external_id: r.get(2)?,
                        external_url: r.get(3)?,
                        failure_reason: r.get(4)?,
                        failure_reason_type: r.get(5)?,
                    },
                    handled_at: Millis(r.get(6)?),
                    report_attempts: r.get(7)?,
                })
            },
        )
    }

    /// Pleo acknowledged these items with the given status.
    pub fn mark_reported(
        &self,
        job_id: &str,
        acknowledged: &[(String, String)],
        now: Millis,
    ) -> Result<()> {
        let tx = self.db.write_tx()?;
        for (entry, status) in acknowledged {
            tx.exec(
                "UPDATE job_items SET reported_at = ?3, pleo_status = ?4, report_error = NULL, \
                 report_attempts = report_attempts + 1 WHERE job_id = ?1 AND accounting_entry_id = ?2",
                &[&job_id, entry, &now, status],
            )?;
        }
        tx.commit()
    }

    /// Pleo refused this item's update; after `give_up` it is not sent again.
    pub fn mark_report_error(
        &self,
        job_id: &str,
        entry: &str,
        error: &str,
        give_up: bool,
        now: Millis,
    ) -> Result<()> {
        self.db.exec(
            "UPDATE job_items SET report_attempts = report_attempts + 1, report_error = ?3, \
             reported_at = CASE WHEN ?4 THEN ?5 ELSE reported_at END WHERE job_id = ?1 AND accounting_entry_id = ?2",
            &[&job_id, &entry, &error, &give_up, &now],
        )?;
        Ok(())
    }

    /// Items without a result are failed with this reason (they count as handled).
    pub fn fail_open_items(
        &self,
        job_id: &str,
        failure_type: &str,
        reason: &str,
        now: Millis,
    ) -> Result<usize> {
        Ok(self.db.exec(
            "UPDATE job_items SET our_status = 'failed', failure_reason_type = ?2, failure_reason = ?3, handled_at = ?4 \
             WHERE job_id = ?1 AND our_status = 'todo'",
            &[&job_id, &failure_type, &reason, &now],
        )? as usize)
    }

    pub fn item_counts(&self, job_id: &str) -> Result<ItemCounts> {
        Ok(self
            .db
            .row(
                "SELECT coalesce(sum(CASE WHEN our_status = 'todo' THEN 1 ELSE 0 END), 0), \
                 coalesce(sum(CASE WHEN our_status = 'successful' THEN 1 ELSE 0 END), 0), \
                 coalesce(sum(CASE WHEN our_status = 'failed' THEN 1 ELSE 0 END), 0), \
                 coalesce(sum(CASE WHEN handled_at IS NOT NULL AND reported_at IS NULL THEN 1 ELSE 0 END), 0) \
                 FROM job_items WHERE job_id = ?1",
                &[&job_id],
                |r| {
                    Ok(ItemCounts {
                        todo: r.get(0)?,
                        successful: r.get(1)?,
                        failed: r.get(2)?,
                        unreported: r.get(3)?,
                    })
                },
            )?
            .unwrap_or_default())
    }

    /// A job's items that failed, or whose report Pleo refused, oldest result first: what an
    /// operator asks "why did it fail?" for.
    pub fn problem_items(&self, job_id: &str) -> Result<Vec<ProblemItem>> {
        self.db.rows(
            "SELECT accounting_entry_id, our_status, failure_reason_type, failure_reason, report_error \
             FROM job_items WHERE job_id = ?1 AND (our_status = 'failed' OR report_error IS NOT NULL) \
             ORDER BY handled_at NULLS FIRST, accounting_entry_id",
            &[&job_id],
            |r| {
                Ok(ProblemItem {
                    accounting_entry_id: r.get(0)?,
                    our_status: r.get(1)?,
                    failure_reason_type: r.get(2)?,
                    failure_reason: r.get(3)?,
                    report_error: r.get(4)?,
                })
            },
        )
    }

    /// The most common failure of a job's failed items, for the job's own failure reason (of
    /// that type, the first reason in text order).
    pub fn first_item_failure(
        &self,
        job_id: &str,
    ) -> Result<Option<(Option<String>, Option<String>)>> {
        self.db.row(
            "SELECT failure_reason_type, min(failure_reason) FROM job_items WHERE job_id = ?1 AND our_status = 'failed' \
             GROUP BY failure_reason_type ORDER BY count(*) DESC, failure_reason_type NULLS FIRST LIMIT 1",
            &[&job_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
    }
}
