//! The processing stage: from a held job to a finished one, through a handler.
//!
//! Steps (the processor ran the readiness check before `started`, or before a resume): read
//! every job item and export item;
//! record the items in `job_items`; report results recorded earlier but not yet reported;
//! run the handler on the items that are open at Pleo and have no result; commit each result
//! as it arrives and report in batches of at most 100 (at 100 results or after
//! `flush_interval`); finish exactly once with `completed`, `completed_with_errors` or `failed`.
//!
//! Invariants: a result is committed before it is reported; an item reported `successful` is
//! never sent again; the handler never sees an item that already has a result; a handler that
//! stalls, or a job that would expire before it can finish, is stopped and the job failed with
//! `accounting_system_timeout` before its deadline; the job's handler time (`job_timeout`)
//! and failed runs (`attempts_max`) are counted in the database, across runs and restarts;
//! every result the handler delivers is committed whatever a report does; `started` is never
//! sent here.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{RecvTimeoutError, Sender};
use serde_json::{Value, json};

use crate::clock::{Millis, SharedClock};
use crate::pleo::{Clients, JobEvent, JobEventKind, PleoClient, PleoError};
use crate::processing::Stage;
use crate::processing::handler::{HandlerMsg, HandlerSpec, Readiness};
use crate::store::{EventKind, ItemResult, JobRow, ProcState, Source, Store, StoreError};

#[derive(Clone, Debug)]
pub struct PipelineConfig {
    /// Longest wait for the next result before the handler counts as stalled.
    pub item_timeout: Duration,
    /// Longest a handler may run for one job.
    pub job_timeout: Duration,
    /// Handler runs per job (crashes, garbage) before open items fail.
    pub attempts_max: u32,
    /// Report results at least this often while the handler runs.
    pub flush_interval: Duration,
    /// Stop and fail the job when less than this is left before it expires.
    pub finish_margin: Duration,
    pub check_timeout: Duration,
    /// Real-time cap on one wait for handler output (so a moved clock is noticed).
    pub wait_tick: Duration,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            item_timeout: Duration::from_secs(120),
            job_timeout: Duration::from_secs(3000),
            attempts_max: 3,
            flush_interval: Duration::from_secs(5),
            finish_margin: Duration::from_secs(120),
            check_timeout: Duration::from_secs(60),
            wait_tick: Duration::from_millis(50),
        }
    }
}

/// Milestones, for tests and the demo to wait on instead of sleeping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Milestone {
    HandlerStarted { job_id: String, items: usize },
    Finished { job_id: String, event: String },
}

pub struct HandlerStage {
    clients: Arc<Clients>,
    clock: SharedClock,
    handler: HandlerSpec,
    cfg: PipelineConfig,
    milestones: Option<Sender<Milestone>>,
    health: Option<(Arc<crate::health::Progress>, Arc<crate::health::Metrics>)>,
    stopping: Option<Arc<crate::health::Stopping>>,
    /// The database whose service runs the handlers (marks their processes).
    marker_scope: Option<std::path::PathBuf>,
}

impl HandlerStage {
    pub fn new(
        clients: Arc<Clients>,
        clock: SharedClock,
        handler: HandlerSpec,
        cfg: PipelineConfig,
    ) -> HandlerStage {
        HandlerStage {
            clients,
            clock,
            handler,
            cfg,
            milestones: None,
            health: None,
            stopping: None,
            marker_scope: None,
        }
    }

    /// Marks handler processes with the job and `db`, so that a restarted service kills any
    /// handler of the same job left alive (its children included) before starting another.
    pub fn with_marker_scope(mut self, db: &std::path::Path) -> HandlerStage {
        self.marker_scope = Some(db.to_path_buf());
        self
    }

    fn client(&self, job: &JobRow) -> &PleoClient {
        self.clients.for_company(Some(&job.company_id))
    }

    /// A handler run is stopped (its results so far kept) once `stopping` is set.
    pub fn with_stopping(mut self, stopping: Arc<crate::health::Stopping>) -> HandlerStage {
        self.stopping = Some(stopping);
        self
    }

    /// Beats `progress` while a handler runs and counts its results in `metrics`.
    pub fn with_health(
        mut self,
        progress: Arc<crate::health::Progress>,
        metrics: Arc<crate::health::Metrics>,
    ) -> HandlerStage {
        self.health = Some((progress, metrics));
        self
    }

    pub fn with_milestones(mut self, tx: Sender<Milestone>) -> HandlerStage {
        self.milestones = Some(tx);
        self
    }

    fn note(&self, m: Milestone) {
        if let Some(tx) = &self.milestones {
            let _ = tx.try_send(m);
        }
    }
}

/// Why a run stopped before finishing; the job stays `processing` for the next round.
enum Pause {
    Pleo(PleoError),
    Store(StoreError),
    /// The service is stopping: the handler was stopped; the job resumes at the next start.
    Stopping,
}

impl From<StoreError> for Pause {
    fn from(e: StoreError) -> Self {
        Pause::Store(e)
    }
}
impl From<PleoError> for Pause {
    fn from(e: PleoError) -> Self {
        Pause::Pleo(e)
    }
}

/// How a job ends.
struct Finish {
    event: JobEventKind,
    failure_reason_type: Option<String>,
    failure_reason: Option<String>,
}

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

        // Results recorded before a crash are reported without asking the handler again.
        self.flush(store, job, &mut deadline, usize::MAX)?;

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
                RunEnd::AllAnswered | RunEnd::Crashed => continue,
                RunEnd::TimedOut(reason) => {
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
            let job_kind = kind
                .filter(|k| crate::processing::handler::JOB_FAILURE_TYPES.contains(&k.as_str()))
                .unwrap_or_else(|| "validation_failure".into());
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

    /// One handler run over `items`. The run ends when every item has a result, when the
    /// handler process exits (what it wrote is read to the end, and its process group is
    /// killed, so a child holding its pipes cannot keep the run open), at its end of output,
    /// or at a limit. Every result the handler delivers is committed before anything else is
    /// done about it, whatever a report does; a report that fails transiently pauses
    /// reporting, never the recording.
    #[allow(clippy::too_many_arguments)]
    fn run_handler(
        &mut self,
        store: &Store,
        job: &JobRow,
        raw: &Value,
        items: Vec<Value>,
        attempt: u32,
        deadline: &mut Millis,
    ) -> Result<RunEnd, Pause> {
        /// After the handler exited: the longest wait for the end of its output.
        const AFTER_EXIT: Duration = Duration::from_secs(5);
        /// After every item was answered: the longest wait for the handler to exit.
        const EXIT_GRACE: Duration = Duration::from_secs(5);
        /// After killing the handler: the longest wait for what it wrote before.
        const AFTER_KILL: Duration = Duration::from_secs(1);
        /// Handler time is written to the database at least this often (a crash of the
        /// service loses at most this much of the job's budget).
        const BUDGET_EVERY_MS: i64 = 1000;
        let n = items.len();
        let job_limit = crate::clock::ms(self.cfg.job_timeout);
        let (used_before, _) = store.handler_budget(&job.id)?;
        if used_before >= job_limit {
            let reason = self.over_budget(used_before);
            store.journal(
                self.clock.now(),
                Some(&job.id),
                Some(&job.company_id),
                EventKind::HandlerTimedOut,
                json!({"attempt": attempt, "reason": reason, "handler_ms": used_before}),
            )?;
            return Ok(RunEnd::TimedOut(reason));
        }
        let started = self.clock.now();
        let marker = self
            .marker_scope
            .as_ref()
            .map(|db| crate::processing::handler::handler_marker(db, &job.id));
        let mut running = match self.handler.start_marked(raw, items, marker.as_deref()) {
            Ok(r) => r,
            Err(e) => {
                store.add_handler_budget(&job.id, 0, true)?;
                store.journal(
                    started,
                    Some(&job.id),
                    Some(&job.company_id),
                    EventKind::HandlerFailed,
                    json!({"attempt": attempt, "error": format!("cannot start: {e}")}),
                )?;
                return Ok(RunEnd::Crashed);
            }
        };
        log::info!(
            "job {}: handler started for {n} items (run {attempt})",
            job.id
        );
        self.note(Milestone::HandlerStarted {
            job_id: job.id.clone(),
            items: n,
        });
        let mut run = RunState {
            last_progress: started,
            garbage: 0,
            answered: 0,
            first_unflushed: None,
            unreported: store.item_counts(&job.id)?.unreported,
            counted: started,
            used: used_before,
            report_retry: None,
            report_backoff: self.cfg.flush_interval.max(Duration::from_secs(1)),
        };
        let mut exited_at: Option<std::time::Instant> = None;
        let end = loop {
            if self.stopping.as_ref().is_some_and(|s| s.is_set()) {
                // The job stays `processing`: the next start resumes it without `started`.
                running.kill();
                self.drain_to_end(store, job, &mut running, &mut run, AFTER_KILL)?;
                self.count_time(store, job, &mut run, false)?;
                return Err(Pause::Stopping);
            }
            let now = self.clock.now();
            // Limits first: the job must not expire silently. Its deadline is Pleo's, so it is
            // measured on Pleo's clock (a host clock that is off never ends a job early).
            let pleo_now = self.client(job).pleo_now();
            let margin = Millis(deadline.0 - self.cfg.finish_margin.as_millis() as i64);
            if pleo_now >= margin {
                break Some(format!(
                    "the handler could not finish before the job's deadline ({} left)",
                    secs(pleo_now.until(*deadline))
                ));
            }
            if run.used + run.counted.until(now).max(0) >= job_limit {
                break Some(self.over_budget(run.used + run.counted.until(now).max(0)));
            }
            if now.until(run.last_progress) <= -(self.cfg.item_timeout.as_millis() as i64) {
                break Some(format!(
                    "the handler gave no result for {} s (per-item limit)",
                    self.cfg.item_timeout.as_secs()
                ));
            }
            if let Some((p, _)) = &self.health {
                p.beat();
            }
            let msg = match running.messages.recv_timeout(self.cfg.wait_tick) {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => Some(HandlerMsg::Eof),
            };
            let mut pending = Vec::new();
            let mut eof = false;
            if let Some(m) = msg {
                eof |= absorb(m, &mut pending, &mut run.garbage, &job.id);
                // Take everything already waiting, up to a batch.
                while pending.len() < 100 && !eof {
                    match running.messages.try_recv() {
                        Ok(m) => eof |= absorb(m, &mut pending, &mut run.garbage, &job.id),
                        Err(_) => break,
                    }
                }
            }
            self.record(store, job, &pending, &mut run)?;
            let now = self.clock.now();
            // Counted here rather than queried: a query per message would scan the job's items.
            let due = run
                .first_unflushed
                .is_some_and(|t| now.until(t) <= -(self.cfg.flush_interval.as_millis() as i64));
            let may_report = run.report_retry.is_none_or(|t| now >= t);
            if may_report && (run.unreported >= 100 || (run.unreported > 0 && due)) {
                match self.flush(store, job, deadline, 100) {
                    Ok(()) => {
                        run.report_retry = None;
                        run.report_backoff = self.cfg.flush_interval.max(Duration::from_secs(1));
                    }
                    Err(Pause::Pleo(e)) => {
                        // Whatever the handler delivered meanwhile is committed first.
                        self.drain_to_end(store, job, &mut running, &mut run, Duration::ZERO)?;
                        if !e.is_retryable() {
                            running.kill();
                            self.drain_to_end(store, job, &mut running, &mut run, AFTER_KILL)?;
                            self.count_time(store, job, &mut run, false)?;
                            return Err(Pause::Pleo(e));
                        }
                        log::warn!(
                            "job {}: reporting results failed ({e}); results are still recorded, reporting again in {} s",
                            job.id,
                            run.report_backoff.as_secs()
                        );
                        run.report_retry = Some(self.clock.now().plus(run.report_backoff));
                        run.report_backoff = (run.report_backoff * 2).min(Duration::from_secs(60));
                    }
                    Err(other) => return Err(other),
                }
                run.unreported = store.item_counts(&job.id)?.unreported;
                run.first_unflushed = (run.unreported > 0).then(|| self.clock.now());
            }
            if self.clock.now().until(run.counted) <= -BUDGET_EVERY_MS {
                self.count_time(store, job, &mut run, false)?;
            }
            if eof || run.answered >= n {
                break None;
            }
            match exited_at {
                None if running.exited() => {
                    // The handler is gone; a child it left may hold its stdout. Kill the
                    // group: the output it wrote is still read, then the pipe ends.
                    running.kill();
                    exited_at = Some(std::time::Instant::now());
                }
                Some(t) if t.elapsed() >= AFTER_EXIT => break None,
                _ => {}
            }
        };
        match end {
            Some(reason) => {
                running.kill();
                self.drain_to_end(store, job, &mut running, &mut run, AFTER_KILL)?;
                self.count_time(store, job, &mut run, false)?;
                log::warn!("job {}: stopping the handler: {reason}", job.id);
                store.journal(
                    self.clock.now(),
                    Some(&job.id),
                    Some(&job.company_id),
                    EventKind::HandlerTimedOut,
                    json!({"attempt": attempt, "reason": reason, "handler_ms": run.used}),
                )?;
                Ok(RunEnd::TimedOut(reason))
            }
            None => {
                let exit = running.finish(EXIT_GRACE);
                self.drain_to_end(store, job, &mut running, &mut run, Duration::ZERO)?;
                let left = store.todo_items(&job.id)?.len();
                self.count_time(store, job, &mut run, left > 0)?;
                let garbage = run.garbage;
                if left == 0 && exit.is_ok() && garbage == 0 {
                    Ok(RunEnd::AllAnswered)
                } else if left == 0 {
                    // Every item answered; an odd exit is only worth a journal line.
                    store.journal(self.clock.now(), Some(&job.id), Some(&job.company_id), EventKind::HandlerFailed, json!({"attempt": attempt, "exit": exit.err(), "garbage_lines": garbage, "items_left": 0}))?;
                    Ok(RunEnd::AllAnswered)
                } else {
                    log::warn!(
                        "job {}: handler run {attempt} ended with {left} items unanswered",
                        job.id
                    );
                    store.journal(self.clock.now(), Some(&job.id), Some(&job.company_id), EventKind::HandlerFailed, json!({"attempt": attempt, "exit": exit.err(), "garbage_lines": garbage, "items_left": left}))?;
                    Ok(RunEnd::Crashed)
                }
            }
        }
    }

    fn over_budget(&self, used_ms: i64) -> String {
        format!(
            "the handler ran {} for this job in all (runs and restarts together), over the per-job limit of {} s",
            secs(used_ms),
            self.cfg.job_timeout.as_secs()
        )
    }

    /// Commits `results` (those naming open items of the job) and counts them.
    fn record(
        &self,
        store: &Store,
        job: &JobRow,
        results: &[ItemResult],
        run: &mut RunState,
    ) -> Result<(), Pause> {
        if results.is_empty() {
            return Ok(());
        }
        let now = self.clock.now();
        let recorded = store.record_results(&job.id, results, now)?;
        if let Some((_, m)) = &self.health {
            for r in results
                .iter()
                .filter(|r| recorded.contains(&r.accounting_entry_id))
            {
                m.handler_result(r.successful);
            }
        }
        if !recorded.is_empty() {
            run.last_progress = now;
            run.first_unflushed.get_or_insert(now);
            run.unreported += recorded.len() as i64;
            run.answered += recorded.len();
        }
        if recorded.len() < results.len() {
            log::warn!(
                "job {}: {} results named unknown or already answered items; ignored",
                job.id,
                results.len() - recorded.len()
            );
        }
        Ok(())
    }

    /// Commits what the handler wrote, up to the end of its output or `within` (after its
    /// group was killed the end comes at once, the writers being dead; `ZERO`: only what is
    /// already waiting).
    fn drain_to_end(
        &self,
        store: &Store,
        job: &JobRow,
        running: &mut crate::processing::handler::Running,
        run: &mut RunState,
        within: Duration,
    ) -> Result<(), Pause> {
        let until = std::time::Instant::now() + within;
        let mut pending = Vec::new();
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            match running.messages.recv_timeout(left) {
                Ok(m) => {
                    if absorb(m, &mut pending, &mut run.garbage, &job.id) {
                        break;
                    }
                    if pending.len() >= 100 {
                        self.record(store, job, &pending, run)?;
                        pending.clear();
                    }
                }
                Err(_) => break,
            }
        }
        self.record(store, job, &pending, run)
    }

    /// Adds the handler time since the last count to the job's budget in the database.
    fn count_time(
        &self,
        store: &Store,
        job: &JobRow,
        run: &mut RunState,
        failed_run: bool,
    ) -> Result<(), Pause> {
        let now = self.clock.now();
        let ms = run.counted.until(now).max(0);
        store.add_handler_budget(&job.id, ms, failed_run)?;
        run.used += ms;
        run.counted = now;
        Ok(())
    }

    /// Reports recorded results in batches of at most 100 (at most `limit` items now).
    fn flush(
        &self,
        store: &Store,
        job: &JobRow,
        deadline: &mut Millis,
        limit: usize,
    ) -> Result<(), Pause> {
        const REPORT_ATTEMPTS_MAX: i64 = 3;
        let mut sent = 0usize;
        // Each round either acknowledges items or counts an attempt against them: bounded.
        let mut rounds = 0;
        while sent < limit && rounds < 10_000 {
            rounds += 1;
            let batch = store.unreported_items(&job.id, 100.min(limit - sent))?;
            if batch.is_empty() {
                break;
            }
            let updates: Vec<Value> = batch
                .iter()
                .map(|u| update_json(&u.result, u.handled_at))
                .collect();
            let outcome = self.client(job).put_items(&job.id, &updates)?;
            let acked: Vec<(String, String)> = outcome
                .updated
                .iter()
                .filter_map(|v| {
                    Some((
                        v["accountingEntryId"].as_str()?.to_owned(),
                        v["status"].as_str().unwrap_or("").to_owned(),
                    ))
                })
                .collect();
            store.mark_reported(&job.id, &acked, self.clock.now())?;
            let mut refused = Vec::new();
            for e in &outcome.errors {
                let entry = e["accountingEntryId"].as_str().unwrap_or("");
                let kind = e["type"].as_str().unwrap_or("UNKNOWN");
                let attempts = batch
                    .iter()
                    .find(|u| u.result.accounting_entry_id == entry)
                    .map_or(REPORT_ATTEMPTS_MAX, |u| u.report_attempts + 1);
                let give_up =
                    kind == "ACCOUNTING_ENTRY_DOES_NOT_EXIST" || attempts >= REPORT_ATTEMPTS_MAX;
                store.mark_report_error(
                    &job.id,
                    entry,
                    &format!("{kind}: {}", e["message"].as_str().unwrap_or("")),
                    give_up,
                    self.clock.now(),
                )?;
                refused
                    .push(json!({"accounting_entry_id": entry, "type": kind, "given_up": give_up}));
            }
            // Items Pleo neither updated nor refused: count an attempt so they cannot loop.
            for u in &batch {
                let id = &u.result.accounting_entry_id;
                let seen = acked.iter().any(|(e, _)| e == id)
                    || outcome
                        .errors
                        .iter()
                        .any(|e| e["accountingEntryId"].as_str() == Some(id));
                if !seen {
                    let give_up = u.report_attempts + 1 >= REPORT_ATTEMPTS_MAX;
                    store.mark_report_error(
                        &job.id,
                        id,
                        "not acknowledged by Pleo",
                        give_up,
                        self.clock.now(),
                    )?;
                }
            }
            store.journal(self.clock.now(), Some(&job.id), Some(&job.company_id), EventKind::ItemsReported, json!({"sent": batch.len(), "acknowledged": acked.len(), "refused": outcome.errors.len()}))?;
            if !refused.is_empty() {
                store.journal(
                    self.clock.now(),
                    Some(&job.id),
                    Some(&job.company_id),
                    EventKind::ItemReportFailed,
                    json!({"items": refused}),
                )?;
            }
            sent += batch.len();
        }
        if sent > 0 {
            // Whether item reports refresh `lastUpdatedAt` is not published: read the job, and
            // take its deadline (and status) from Pleo instead of guessing.
            match self.client(job).get_job(&job.id) {
                Ok(fresh) => {
                    store.upsert_job(&fresh, self.clock.now(), Source::Reread)?;
                    *deadline = fresh.expires_at();
                }
                Err(e) => log::debug!("job {}: re-read after a report failed: {e}", job.id),
            }
        }
        Ok(())
    }

    fn finish(&self, store: &Store, job: &JobRow, f: Finish) -> Result<(), Pause> {
        let event = JobEvent {
            event: f.event,
            job_id: job.id.clone(),
            failure_reason: f.failure_reason,
            failure_reason_type: f.failure_reason_type,
        };
        let counts = store.item_counts(&job.id)?;
        let detail = json!({"successful": counts.successful, "failed": counts.failed});
        crate::processing::send_final(self.client(job), store, &self.clock, job, &event, detail)??;
        let name = f.event.as_str();
        log::info!(
            "job {} of company {}: sent {name} ({} successful, {} failed)",
            job.id,
            job.company_id,
            counts.successful,
            counts.failed
        );
        self.note(Milestone::Finished {
            job_id: job.id.clone(),
            event: name.to_owned(),
        });
        Ok(())
    }
}

/// Takes one handler message; true at the end of its output.
fn absorb(m: HandlerMsg, pending: &mut Vec<ItemResult>, garbage: &mut u32, job_id: &str) -> bool {
    match m {
        HandlerMsg::Result(r) => pending.push(r),
        HandlerMsg::Garbage(line) => {
            *garbage += 1;
            log::warn!("job {job_id}: handler printed something that is not a result: {line}");
        }
        HandlerMsg::Eof => return true,
    }
    false
}

/// What one handler run keeps track of.
struct RunState {
    last_progress: Millis,
    garbage: u32,
    /// Results of this run committed (new ones only).
    answered: usize,
    first_unflushed: Option<Millis>,
    unreported: i64,
    /// Handler time is counted in the budget up to here.
    counted: Millis,
    /// The job's handler time in all, as counted so far (ms).
    used: i64,
    /// Reporting paused after a failure until then.
    report_retry: Option<Millis>,
    report_backoff: Duration,
}

enum RunEnd {
    AllAnswered,
    Crashed,
    TimedOut(String),
}

fn secs(ms: i64) -> String {
    format!("{} s", ms / 1000)
}

fn update_json(r: &ItemResult, handled_at: Millis) -> Value {
    let mut v = json!({
        "accountingEntryId": r.accounting_entry_id,
        "status": if r.successful { "successful" } else { "failed" },
    });
    if r.successful {
        v["exportedAt"] = json!(handled_at.to_rfc3339());
        if let Some(x) = &r.external_id {
            v["externalId"] = json!(x);
        }
        if let Some(x) = &r.external_url {
            v["externalUrl"] = json!(x);
        }
    } else {
        if let Some(x) = &r.failure_reason {
            v["failureReason"] = json!(x);
        }
        if let Some(x) = &r.failure_reason_type {
            v["failureReasonType"] = json!(x);
        }
    }
    v
}
