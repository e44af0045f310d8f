//! The handler stage's steps for one held job: readiness (the handler's `--check`), then read
//! every job item and export item, record them, report what was recorded earlier, run the
//! handler over the open items (up to `attempts_max` runs), and finish with the right event.
//!
//! Invariant: the handler never sees an item that already has a result, and a job is finished
//! exactly once; `started` is never sent here.

use serde_json::{Value, json};

use std::time::Duration;

use crate::clock::Millis;
use crate::pleo::JobEventKind;
use crate::processing::Stage;
use crate::processing::handler::Readiness;
use crate::processing::pipeline::{Finish, HandlerStage, Pause};
use crate::processing::supervise::RunEnd;
use crate::store::{EventKind, ItemResult, JobRow, ProcState, Source, Store, StoreError};

impl Stage for HandlerStage {
    /// The handler's `--check` (or the outbox probe), with the job's JSON, before `started`
    /// and before a resumed job's items.
    fn ready(&mut self, store: &Store, job: &JobRow) -> Result<Readiness, StoreError> {
        let raw = store
            .job_raw(&job.id)?
            .unwrap_or_else(|| json!({"id": job.id, "companyId": job.company_id}));
        let stopping = self.stopping.clone();
        let stop = move || stopping.as_ref().is_some_and(|s| s.is_set());
        Ok(self.handler.check(&raw, self.cfg.check_timeout, &stop))
    }

    fn process(&mut self, store: &Store, job: &JobRow, now: Millis) -> Result<(), StoreError> {
        // On a shared database, the handler runs only under this instance's lease.
        store.guard(&job.company_id)?;
        if job.proc_state == ProcState::Claimed {
            store.transition(
                job,
                ProcState::Processing,
                now,
                EventKind::ProcessingStarted,
                json!({"number_of_items": job.number_of_items}),
            )?;
        } else {
            store.journal(
                now,
                Some(&job.id),
                Some(&job.company_id),
                EventKind::ProcessingStarted,
                json!({"resumed": true}),
            )?;
        }
        match self.run(store, job) {
            Ok(()) => Ok(()),
            Err(Pause::Store(e)) => Err(e),
            Err(Pause::Stopping) => {
                log::info!(
                    "job {}: handler stopped for shutdown; resumed at the next start",
                    job.id
                );
                Ok(())
            }
            Err(Pause::Pleo(e)) => {
                log::warn!("processing job {} paused: {e}", job.id);
                store.journal(
                    self.clock.now(),
                    Some(&job.id),
                    Some(&job.company_id),
                    EventKind::ProcessingError,
                    json!({"error": e.to_string()}),
                )?;
                // A finished job at Pleo (422 on items) is picked up by the re-read.
                if let Ok(fresh) = self.client(job).get_job(&job.id) {
                    store.upsert_job(&fresh, self.clock.now(), Source::Reread)?;
                }
                Ok(())
            }
        }
    }
}

impl HandlerStage {
    fn run(&mut self, store: &Store, job: &JobRow) -> Result<(), Pause> {
        let raw = store
            .job_raw(&job.id)?
            .unwrap_or_else(|| json!({"id": job.id, "companyId": job.company_id}));
        let mut deadline = job.expires_at;

        // Both layers, every page.
        let job_items = self.client(job).list_job_items(&job.id)?;
        let export_items = self.client(job).list_export_items(&job.id)?;
        let by_entry: std::collections::HashMap<String, &Value> = export_items
            .iter()
            .filter_map(|i| i["accountingEntryId"].as_str().map(|e| (e.to_owned(), i)))
            .collect();
        let rows: Vec<(String, String, Option<String>)> = job_items
            .iter()
            .filter_map(|i| {
                let entry = i["accountingEntryId"].as_str()?.to_owned();
                let status = i["status"].as_str().unwrap_or("pending").to_owned();
                let rec = by_entry
                    .get(&entry)
                    .and_then(|x| x["additionalInformation"]["reconciliationId"].as_str())
                    .map(str::to_owned);
                Some((entry, status, rec))
            })
            .collect();
        store.sync_job_items(&job.id, &rows, self.clock.now())?;
        // Pleo's items were just read: nothing is unsure about earlier reports any more.
        self.unsure(&job.id, false);

        // Results recorded before a crash are reported without asking the handler again.
        self.flush(store, job, &mut deadline, usize::MAX)?;

        // Whether open items were failed because the handler kept crashing.
        let mut crashed_out = false;
        loop {
            let todo = store.todo_items(&job.id)?;
            if todo.is_empty() {
                break;
            }
            // Failed runs count across restarts of the service (the budget is stored).
            let (_, failed_runs) = store.handler_budget(&job.id)?;
            let attempt = failed_runs + 1;
            if failed_runs >= self.cfg.attempts_max {
                let reason =
                    format!("the handler did not answer these items after {failed_runs} runs");
                let n = store.fail_open_items(
                    &job.id,
                    "unexpected_failure",
                    &reason,
                    self.clock.now(),
                )?;
                log::warn!(
                    "job {}: {n} items failed with unexpected_failure: {reason}",
                    job.id
                );
                crashed_out = true;
                break;
            }
            let mut items: Vec<Value> = Vec::with_capacity(todo.len());
            let mut missing = Vec::new();
            for entry in &todo {
                match by_entry.get(entry) {
                    Some(v) => items.push((*v).clone()),
                    None => missing.push(entry.clone()),
                }
            }
            for entry in &missing {
                // Pleo listed the job item but not its export item: nothing to give the handler.
                store.record_results(
                    &job.id,
                    &[ItemResult {
                        accounting_entry_id: entry.clone(),
                        successful: false,
                        external_id: None,
                        external_url: None,
                        failure_reason: Some("Pleo returned no export item for this entry".into()),
                        failure_reason_type: Some("unexpected_failure".into()),
                    }],
                    self.clock.now(),
                )?;
            }
            if items.is_empty() {
                continue;
            }
            // Stable order for the handler: by entry id.
            items.sort_by(|a, b| {
                a["accountingEntryId"]
                    .as_str()
                    .cmp(&b["accountingEntryId"].as_str())
            });
            match self.run_handler(store, job, &raw, items, attempt, &mut deadline)? {
                RunEnd::AllAnswered => continue,
                RunEnd::Crashed => {
                    if let Some((_, m)) = &self.health {
                        m.handler_crashes
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    if attempt < self.cfg.attempts_max {
                        self.wait_after_crash(job, attempt, deadline)?;
                    }
                    continue;
                }
                RunEnd::TimedOut(reason) => {
                    if let Some((_, m)) = &self.health {
                        m.handler_timeouts
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    self.flush(store, job, &mut deadline, usize::MAX)?;
                    return self.finish(
                        store,
                        job,
                        Finish {
                            event: JobEventKind::Failed,
                            failure_reason_type: Some("accounting_system_timeout".into()),
                            failure_reason: Some(reason),
                        },
                    );
                }
            }
        }

        self.flush(store, job, &mut deadline, usize::MAX)?;
        let counts = store.item_counts(&job.id)?;
        let finish = if counts.failed == 0 {
            Finish {
                event: JobEventKind::Completed,
                failure_reason_type: None,
                failure_reason: None,
            }
        } else if counts.successful > 0 {
            Finish {
                event: JobEventKind::CompletedWithErrors,
                failure_reason_type: None,
                failure_reason: None,
            }
        } else {
            let (kind, reason) = store.first_item_failure(&job.id)?.unwrap_or((None, None));
            // A handler that kept crashing left the integration unusable for this job ("Integration
            // service blocked or unusable for the customer"); otherwise the items' own type
            // when it is a job type too.
            let job_kind = kind
                .filter(|k| crate::processing::handler::JOB_FAILURE_TYPES.contains(&k.as_str()))
                .unwrap_or_else(|| {
                    if crashed_out {
                        "integration_unusable".into()
                    } else {
                        "validation_failure".into()
                    }
                });
            Finish {
                event: JobEventKind::Failed,
                failure_reason_type: Some(job_kind),
                failure_reason: Some(format!(
                    "all {} items failed; the most common reason: {}",
                    counts.failed,
                    reason.unwrap_or_else(|| "unknown".into())
                )),
            }
        };
        self.finish(store, job, finish)
    }

    /// The pause after handler run `attempt` crashed: `retry_backoff` doubled per run, at most
    /// 60 s, never past the finish margin before `deadline`. Slept in ticks, so a shutdown
    /// ends it and the lane keeps beating.
    fn wait_after_crash(&self, job: &JobRow, attempt: u32, deadline: Millis) -> Result<(), Pause> {
        let wanted = self
            .cfg
            .retry_backoff
            .saturating_mul(1u32 << (attempt - 1).min(6))
            .min(Duration::from_secs(60));
        let room = self.clock.now().until(deadline) - self.cfg.finish_margin.as_millis() as i64;
        let wait = wanted.min(Duration::from_millis(room.max(0) as u64));
        if wait.is_zero() {
            return Ok(());
        }
        log::info!(
            "job {}: handler run {attempt} crashed; the next run in {} ms",
            job.id,
            wait.as_millis()
        );
        let until = self.clock.now().plus(wait);
        loop {
            if self.stopping.as_ref().is_some_and(|s| s.is_set()) {
                return Err(Pause::Stopping);
            }
            let left = self.clock.now().until(until);
            if left <= 0 {
                return Ok(());
            }
            if let Some((p, _)) = &self.health {
                p.beat();
            }
            self.clock
                .sleep(Duration::from_millis(left as u64).min(Duration::from_millis(200)));
        }
    }
}
