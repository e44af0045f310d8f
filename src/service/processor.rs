//! The processor thread: per company, one job at a time, oldest `createdAt` first.
//!
//! Invariants: nothing of a company is claimed before its recovery pass has completed; the
//! company's oldest pending job is the only candidate (whatever time it has left: `started`
//! refreshes `lastUpdatedAt`); the readiness check passes before `started` is sent, and a job
//! not ready stays pending (no job event) unless it would expire first, when it is `failed`
//! with the check's reason; a job is claimed only after it was read again and found `pending`,
//! and not while fewer than `claim_min_left` remain before its deadline (then the company
//! waits for that deadline and reads again: nothing is sticky); `started` is never sent for a
//! job the mirror holds as `in_progress` (those are resumed, after a readiness check); at most
//! one job per company is active; a 422 on `started` is a conflict, journaled and never
//! retried for that job; claim attempts per company per round are bounded, and a conflict or
//! failure pauses the company for `conflict_backoff`; our clock may warn about a deadline but
//! only a fresh read from Pleo ends a job; every decision reads the time from the injected
//! clock.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, select};
use serde_json::json;

use crate::clock::{Millis, SharedClock};
use crate::pleo::{Clients, JobEvent, JobEventKind, PleoError, status};
use crate::processing::handler::Readiness;
pub use crate::processing::{ReadyStage, Stage, send_final};
use crate::store::{EventKind, JobRow, ProcState, Source, Store, StoreError};

#[derive(Clone, Debug)]
pub struct ProcessorConfig {
    pub deadline_warning: Duration,
    /// A claim is not sent while less than this is left before the deadline (it could not
    /// land in time); the company waits for the deadline and reads the job again.
    pub claim_min_left: Duration,
    pub claims_per_round_max: u32,
    pub conflict_backoff: Duration,
    /// A failed readiness check is tried again after this long (or at once on a wake).
    pub readiness_retry: Duration,
    /// A job whose readiness check still fails with this little left before its deadline is
    /// failed with the check's reason instead of left to expire.
    pub not_ready_fail_margin: Duration,
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        ProcessorConfig {
            deadline_warning: Duration::from_secs(600),
            claim_min_left: Duration::from_secs(10),
            claims_per_round_max: 3,
            conflict_backoff: Duration::from_secs(30),
            readiness_retry: Duration::from_secs(60),
            not_ready_fail_margin: Duration::from_secs(180),
        }
    }
}

/// What one round did, for tests, the demo and the run loop.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RoundReport {
    pub claimed: Vec<String>,
    pub resumed: Vec<String>,
    pub conflicts: Vec<String>,
    pub warned: Vec<String>,
    pub expired: Vec<String>,
    /// Jobs whose readiness check failed this round (they stay as they were).
    pub not_ready: Vec<String>,
    /// Jobs failed because the readiness check still failed close to their deadline.
    pub failed_not_ready: Vec<String>,
    /// Jobs the stage finished this round.
    pub finished: Vec<String>,
    pub errors: Vec<String>,
    /// The earliest time something is due (a warning, an expiry, a backoff's end).
    pub next_due: Option<Millis>,
}

impl RoundReport {
    fn due(&mut self, t: Millis) {
        self.next_due = Some(self.next_due.map_or(t, |d| d.min(t)));
    }
}

pub struct Processor {
    store: Store,
    clients: Arc<Clients>,
    clock: SharedClock,
    companies: Vec<String>,
    cfg: ProcessorConfig,
    stage: Box<dyn Stage>,
    paused_until: HashMap<String, Millis>,
    /// Companies whose readiness check failed: (retry at, the job and reason last journaled).
    not_ready: HashMap<String, NotReadyHold>,
    /// Held jobs whose readiness check passed in this process (a resumed job is checked first).
    checked: HashSet<String>,
    recovered: Option<Arc<crate::service::sync::Recovered>>,
    metrics: Option<Arc<crate::health::Metrics>>,
    /// What this lane last added to `companies_not_ready`.
    not_ready_shown: u64,
    stopping: Option<Arc<crate::health::Stopping>>,
}

#[derive(Clone, Debug)]
struct NotReadyHold {
    until: Millis,
    job_id: String,
    reason: String,
}

impl Processor {
    pub fn new(
        store: Store,
        clients: Arc<Clients>,
        clock: SharedClock,
        companies: Vec<String>,
        cfg: ProcessorConfig,
    ) -> Processor {
        Processor {
            store,
            clients,
            clock,
            companies,
            cfg,
            stage: Box::new(ReadyStage),
            paused_until: HashMap::new(),
            not_ready: HashMap::new(),
            checked: HashSet::new(),
            recovered: None,
            metrics: None,
            not_ready_shown: 0,
            stopping: None,
        }
    }

    /// Companies are served only once the sync thread's recovery pass over them completed.
    pub fn with_recovered(mut self, recovered: Arc<crate::service::sync::Recovered>) -> Processor {
        self.recovered = Some(recovered);
        self
    }

    /// Counts readiness failures.
    pub fn with_metrics(mut self, metrics: Arc<crate::health::Metrics>) -> Processor {
        self.metrics = Some(metrics);
        self
    }

    /// Something new was detected (a poll, a trigger, a webhook): readiness checks that
    /// failed are tried again at the next round instead of after `readiness_retry`.
    pub fn recheck_now(&mut self) {
        let now = self.clock.now();
        for h in self.not_ready.values_mut() {
            h.until = h.until.min(now);
        }
    }

    /// A round ends early once `stopping` is set.
    pub fn with_stopping(mut self, stopping: Arc<crate::health::Stopping>) -> Processor {
        self.stopping = Some(stopping);
        self
    }

    pub fn with_stage(mut self, stage: Box<dyn Stage>) -> Processor {
        self.stage = stage;
        self
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// One round over every company.
    pub fn round(&mut self) -> RoundReport {
        let mut report = RoundReport::default();
        // Only companies with something to do: with hundreds of companies a round must not
        // cost two queries for each of them.
        let with_work = match self.store.companies_with_work() {
            Ok(c) => c,
            Err(e) => {
                report.errors.push(e.to_string());
                return report;
            }
        };
        let now = self.clock.now();
        // Waits are instants on the host clock: one set back (or forward) must not stretch a
        // wait beyond its length from now.
        let (retry_max, backoff_max) = (
            now.plus(self.cfg.readiness_retry),
            now.plus(self.cfg.conflict_backoff),
        );
        for h in self.not_ready.values_mut() {
            h.until = h.until.min(retry_max);
        }
        for until in self.paused_until.values_mut() {
            *until = (*until).min(backoff_max);
        }
        self.paused_until.retain(|_, until| *until > now);
        for until in self.paused_until.values() {
            report.due(*until);
        }
        for company in self.companies.clone() {
            if self.stopping.as_ref().is_some_and(|s| s.is_set()) {
                break;
            }
            if !with_work.contains(&company) {
                self.not_ready.remove(&company);
                continue;
            }
            if self
                .recovered
                .as_ref()
                .is_some_and(|r| !r.contains(&company))
            {
                // Its recovery pass has not completed: an older job may not be known yet, and
                // an `in_progress` one of ours may be waiting to be resumed.
                continue;
            }
            if let Err(e) = self.company_round(&company, &mut report) {
                log::error!("processor: company {company}: {e}");
                report.errors.push(format!("{company}: {e}"));
            }
        }
        if let Some(m) = &self.metrics {
            // Each lane adds its own count to the shared gauge: move it by the difference.
            let shown = self.not_ready.len() as u64;
            let g = &m.companies_not_ready;
            g.fetch_add(shown, std::sync::atomic::Ordering::Relaxed);
            g.fetch_sub(self.not_ready_shown, std::sync::atomic::Ordering::Relaxed);
            self.not_ready_shown = shown;
        }
        report
    }

    fn company_round(&mut self, company: &str, report: &mut RoundReport) -> Result<(), StoreError> {
        if let Some(active) = self.store.active_job(company)? {
            return self.tend(active, report);
        }
        let now = self.clock.now();
        if let Some(until) = self.paused_until.get(company).copied() {
            if now < until {
                report.due(until);
                return Ok(());
            }
            self.paused_until.remove(company);
        }
        for _ in 0..self.cfg.claims_per_round_max {
            let Some(candidate) = self.store.pick_next(company)? else {
                self.not_ready.remove(company);
                return Ok(());
            };
            // Pleo: a job is started only after the pre-processing checks have completed.
            if self.waits_for_readiness(&candidate, report)
                || !self.check_ready(&candidate, report)?
            {
                return Ok(());
            }
            match self.try_claim(candidate, report)? {
                Claim::Held(job) => return self.tend(job, report),
                Claim::Wait => return Ok(()),
                Claim::Lost | Claim::Skipped => {
                    // Whatever happened, one job in hand per company: never pick past one.
                    if let Some(active) = self.store.active_job(company)? {
                        return self.tend(active, report);
                    }
                    continue;
                }
                Claim::Failed => {
                    self.pause(company, report);
                    return Ok(());
                }
            }
        }
        // The bound was reached (conflicts, skips): let the company rest before trying again.
        self.pause(company, report);
        Ok(())
    }

    /// Whether `job`'s failed readiness check is not due to run again yet.
    fn waits_for_readiness(&self, job: &JobRow, report: &mut RoundReport) -> bool {
        match self.not_ready.get(&job.company_id) {
            Some(h) if h.job_id == job.id && self.clock.now() < h.until => {
                report.due(h.until);
                true
            }
            _ => false,
        }
    }

    /// Runs the readiness check for `job` (pending, or held and not yet checked here). Not
    /// ready: journaled (once per job and reason), the company waits `readiness_retry` (or a
    /// wake), and a job that would expire first is failed with the check's reason. Returns
    /// whether the job may go on.
    fn check_ready(&mut self, job: &JobRow, report: &mut RoundReport) -> Result<bool, StoreError> {
        let readiness = self.stage.ready(&self.store, job)?;
        let now = self.clock.now();
        let (failure_reason_type, failure_reason) = match readiness {
            Readiness::Ready => {
                if let Some(h) = self.not_ready.remove(&job.company_id) {
                    self.store.journal(
                        now,
                        Some(&job.id),
                        Some(&job.company_id),
                        EventKind::ReadinessRestored,
                        json!({"was": h.reason}),
                    )?;
                    log::info!(
                        "company {}: the readiness check passes again (job {})",
                        job.company_id,
                        job.id
                    );
                }
                if job.proc_state.is_active() {
                    self.checked.insert(job.id.clone());
                }
                return Ok(true);
            }
            Readiness::NotReady {
                failure_reason_type,
                failure_reason,
            } => (failure_reason_type, failure_reason),
            // The service is stopping: no answer, nothing to journal; the job waits.
            Readiness::Stopped => return Ok(false),
        };
        report.not_ready.push(job.id.clone());
        if let Some(m) = &self.metrics {
            m.readiness_failed();
        }
        let same = self
            .not_ready
            .get(&job.company_id)
            .is_some_and(|h| h.job_id == job.id && h.reason == failure_reason);
        if !same {
            self.store.journal(
                now,
                Some(&job.id),
                Some(&job.company_id),
                EventKind::NotReady,
                json!({"failure_reason_type": failure_reason_type, "failure_reason": failure_reason,
                       "status": job.status, "action": "not started; checked again later"}),
            )?;
            log::warn!(
                "job {} of company {}: the readiness check failed ({failure_reason_type}: {failure_reason}); not starting it, checking again in {} s",
                job.id,
                job.company_id,
                self.cfg.readiness_retry.as_secs()
            );
        }
        // Close to the deadline? Ask Pleo first: the deadline is Pleo's, not our guess, and
        // measured on Pleo's clock.
        let margin = crate::clock::ms(self.cfg.not_ready_fail_margin);
        let mut deadline = job.expires_at;
        if self.pleo_now(&job.company_id).until(deadline) <= margin {
            match self.reread(job, report)? {
                Some(fresh)
                    if fresh.status == job.status
                        && (fresh.proc_state == ProcState::New || fresh.proc_state.is_active()) =>
                {
                    deadline = fresh.expires_at;
                    if self.pleo_now(&job.company_id).until(deadline) <= margin {
                        self.fail_not_ready(&fresh, &failure_reason_type, &failure_reason, report)?;
                        self.not_ready.remove(&job.company_id);
                        return Ok(false);
                    }
                }
                Some(_) => {
                    // It changed at Pleo (taken, finished, expired): the next round sees it.
                    self.not_ready.remove(&job.company_id);
                    report.due(self.clock.now());
                    return Ok(false);
                }
                None => {}
            }
        }
        // Try again after `readiness_retry`, and in any case once inside the failing margin.
        let retry = now.plus(self.cfg.readiness_retry);
        // Pleo's deadline on our clock (the hold is timed by our clock).
        let last_chance = Millis(deadline.0 - margin - self.skew(&job.company_id));
        let until = if last_chance > now {
            retry.min(last_chance)
        } else {
            retry.min(now.plus(Duration::from_secs(5)))
        };
        self.not_ready.insert(
            job.company_id.clone(),
            NotReadyHold {
                until,
                job_id: job.id.clone(),
                reason: failure_reason,
            },
        );
        report.due(until);
        Ok(false)
    }

    /// Sends `failed` with the readiness check's reason (Pleo allows it from `pending` and
    /// `in_progress`), so the user sees why in Pleo instead of a silent expiry. The check's
    /// type was already mapped to one of Pleo's job failure types by the handler module.
    fn fail_not_ready(
        &mut self,
        job: &JobRow,
        failure_reason_type: &str,
        failure_reason: &str,
        report: &mut RoundReport,
    ) -> Result<(), StoreError> {
        let event = JobEvent {
            event: JobEventKind::Failed,
            job_id: job.id.clone(),
            failure_reason: Some(format!(
                "the accounting system was not ready before this export would expire: {failure_reason}. Fix it, then export again from Pleo."
            )),
            failure_reason_type: Some(failure_reason_type.to_owned()),
        };
        let client = self.clients.for_company(Some(&job.company_id));
        let detail = json!({"why": "not ready before the deadline", "from": job.status});
        if let Err(e) = send_final(client, &self.store, &self.clock, job, &event, detail)? {
            log::warn!("job {}: sending `failed` (not ready) failed: {e}", job.id);
            report.errors.push(format!("{}: {e}", job.id));
            report.due(self.clock.now().plus(Duration::from_secs(5)));
            return Ok(());
        }
        log::error!(
            "job {} of company {}: sent failed ({failure_reason_type}): the readiness check kept failing and the job was about to expire",
            job.id,
            job.company_id
        );
        self.checked.remove(&job.id);
        report.failed_not_ready.push(job.id.clone());
        report.finished.push(job.id.clone());
        report.due(self.clock.now());
        Ok(())
    }

    /// Now on Pleo's clock, as the company's client last saw it (deadlines are Pleo's).
    fn pleo_now(&self, company: &str) -> Millis {
        self.clients.for_company(Some(company)).pleo_now()
    }

    /// Pleo's clock minus ours, in ms: converts a Pleo time into a time on our clock.
    fn skew(&self, company: &str) -> i64 {
        self.pleo_now(company).0 - self.clock.now().0
    }

    fn pause(&mut self, company: &str, report: &mut RoundReport) {
        let until = self.clock.now().plus(self.cfg.conflict_backoff);
        self.paused_until.insert(company.to_owned(), until);
        report.due(until);
    }

    /// Re-reads the job and stores what Pleo says; `None` when Pleo could not be asked.
    fn reread(&self, job: &JobRow, report: &mut RoundReport) -> Result<Option<JobRow>, StoreError> {
        match self
            .clients
            .for_company(Some(&job.company_id))
            .get_job(&job.id)
        {
            Ok(fresh) => {
                self.store
                    .upsert_job(&fresh, self.clock.now(), Source::Reread)?;
                self.store.job(&job.id)
            }
            Err(PleoError::Api { status: 404, .. }) => {
                self.store.transition(
                    job,
                    ProcState::Done,
                    self.clock.now(),
                    EventKind::Finished,
                    json!({"error": "404 EXPORT_NOT_FOUND"}),
                )?;
                self.store.job(&job.id)
            }
            Err(e) => {
                report.errors.push(format!("{}: {e}", job.id));
                Ok(None)
            }
        }
    }

    fn try_claim(
        &mut self,
        candidate: JobRow,
        report: &mut RoundReport,
    ) -> Result<Claim, StoreError> {
        let Some(fresh) = self.reread(&candidate, report)? else {
            return Ok(Claim::Failed);
        };
        let now = self.clock.now();
        self.store.journal(
            now,
            Some(&fresh.id),
            Some(&fresh.company_id),
            EventKind::Verified,
            json!({"status": fresh.status, "expires_at": fresh.expires_at.to_rfc3339()}),
        )?;
        if fresh.status != status::PENDING || fresh.proc_state != ProcState::New {
            if fresh.proc_state == ProcState::Conflict {
                report.conflicts.push(fresh.id.clone());
            }
            return Ok(Claim::Skipped);
        }
        // Time left on Pleo's clock (the fresh read just told us what it is).
        let left = self.pleo_now(&fresh.company_id).until(fresh.expires_at);
        if left > 0 && left <= crate::clock::ms(self.cfg.claim_min_left) {
            // A claim could not land before the deadline. Nothing is decided for good: at the
            // deadline Pleo says whether it expired (journaled `expired`) or is still pending
            // (our clock was off: then it is claimed).
            self.store.journal(
                now,
                Some(&fresh.id),
                Some(&fresh.company_id),
                EventKind::ClaimDeferred,
                json!({"seconds_left": left / 1000, "expires_at": fresh.expires_at.to_rfc3339(),
                       "claim_min_left_secs": self.cfg.claim_min_left.as_secs()}),
            )?;
            // Pleo's deadline, on our clock.
            let skew = self.skew(&fresh.company_id);
            report.due(Millis(fresh.expires_at.0 - skew).plus(Duration::from_secs(1)));
            return Ok(Claim::Wait);
        }
        self.store.begin_claim(&fresh, now)?;
        let event = JobEvent::new(JobEventKind::Started, &fresh.id);
        let client = self.clients.for_company(Some(&fresh.company_id));
        match client.post_event(&event) {
            Ok(()) => {
                // Read back what Pleo now says (new lastUpdatedAt, so the new deadline).
                // Read back what Pleo now says (new lastUpdatedAt, so the new deadline). If
                // that read fails the claim still stands: hold the job with the deadline known.
                if let Ok(j) = client.get_job(&fresh.id) {
                    self.store
                        .upsert_job(&j, self.clock.now(), Source::Reread)?;
                }
                let held = self.store.job(&fresh.id)?.unwrap_or(fresh.clone());
                if held.proc_state != ProcState::Claiming {
                    // It finished or expired in between: nothing to hold.
                    return Ok(Claim::Skipped);
                }
                self.store.transition(
                    &held,
                    ProcState::Claimed,
                    self.clock.now(),
                    EventKind::Claimed,
                    json!({"expires_at": held.expires_at.to_rfc3339()}),
                )?;
                log::info!("claimed job {} of company {}", held.id, held.company_id);
                // Its readiness check passed just before the claim.
                self.checked.insert(held.id.clone());
                report.claimed.push(held.id.clone());
                Ok(Claim::Held(self.store.job(&held.id)?.unwrap_or(held)))
            }
            Err(e) if e.is_status_conflict() => {
                let now = self.clock.now();
                self.store.journal(
                    now,
                    Some(&fresh.id),
                    Some(&fresh.company_id),
                    EventKind::ClaimConflict,
                    json!({"error": e.to_string()}),
                )?;
                log::info!(
                    "job {} of company {} was claimed by another integration (422); taking the next one",
                    fresh.id,
                    fresh.company_id
                );
                report.conflicts.push(fresh.id.clone());
                // What does Pleo say now? A terminal status moves it to done/expired.
                let after = self.reread(&fresh, report)?;
                if let Some(row) = after
                    .as_ref()
                    .filter(|r| r.proc_state == ProcState::Claiming)
                {
                    self.store.transition(
                        row,
                        ProcState::Conflict,
                        self.clock.now(),
                        EventKind::ClaimedElsewhere,
                        json!({"status": row.status}),
                    )?;
                } else if after.is_none() {
                    self.store.transition(
                        &fresh,
                        ProcState::Conflict,
                        self.clock.now(),
                        EventKind::ClaimedElsewhere,
                        json!({"status": "unknown"}),
                    )?;
                }
                Ok(Claim::Lost)
            }
            Err(e) => {
                let now = self.clock.now();
                log::warn!("claiming job {} failed: {e}", fresh.id);
                report.errors.push(format!("{}: {e}", fresh.id));
                // A 429 or 5xx answer says the claim was not applied: the job goes back to the
                // queue, and an `in_progress` seen later is someone else's. A lost answer
                // leaves the outcome unknown: ask Pleo at once, while no one else is likely to
                // have claimed it, rather than at the next round. (Pleo's job data does not
                // say who holds a job, so `in_progress` then is taken for ours.)
                let unapplied = e.is_unapplied();
                let detail = json!({
                    "error": e.to_string(), "retryable": e.is_retryable(),
                    "outcome": if unapplied { "not applied" } else { "unknown" },
                });
                match self
                    .store
                    .job(&fresh.id)?
                    .filter(|r| r.proc_state == ProcState::Claiming)
                {
                    Some(row) if unapplied => self.store.transition(
                        &row,
                        ProcState::New,
                        now,
                        EventKind::ClaimFailed,
                        detail,
                    )?,
                    Some(row) => {
                        self.store.journal(
                            now,
                            Some(&fresh.id),
                            Some(&fresh.company_id),
                            EventKind::ClaimFailed,
                            detail,
                        )?;
                        self.tend(row, report)?;
                    }
                    None => self.store.journal(
                        now,
                        Some(&fresh.id),
                        Some(&fresh.company_id),
                        EventKind::ClaimFailed,
                        detail,
                    )?,
                }
                Ok(Claim::Failed)
            }
        }
    }

    /// Looks after the company's active job: resume it, hand it on, or track its deadline.
    fn tend(&mut self, job: JobRow, report: &mut RoundReport) -> Result<(), StoreError> {
        match job.proc_state {
            ProcState::Resume | ProcState::Claiming => {
                // Ask Pleo first: a held job is resumed without `started`; an interrupted claim
                // that did not land goes back to the queue.
                let Some(fresh) = self.reread(&job, report)? else {
                    return Ok(());
                };
                let now = self.clock.now();
                match (fresh.proc_state, fresh.status.as_str()) {
                    (ProcState::Resume | ProcState::Claiming, status::IN_PROGRESS) => {
                        self.store.transition(
                            &fresh,
                            ProcState::Claimed,
                            now,
                            EventKind::Resumed,
                            json!({"from": job.proc_state.as_str(), "started_sent": false, "expires_at": fresh.expires_at.to_rfc3339()}),
                        )?;
                        log::info!(
                            "resumed in_progress job {} of company {} without sending started",
                            fresh.id,
                            fresh.company_id
                        );
                        report.resumed.push(fresh.id.clone());
                        let held = self.store.job(&fresh.id)?.unwrap_or(fresh);
                        self.tend(held, report)
                    }
                    (ProcState::Claiming, status::PENDING) => {
                        self.store.transition(
                            &fresh,
                            ProcState::New,
                            now,
                            EventKind::ClaimFailed,
                            json!({"error": "claim interrupted; Pleo still says pending"}),
                        )?;
                        Ok(())
                    }
                    (ProcState::Resume, status::PENDING) => {
                        self.store.transition(
                            &fresh,
                            ProcState::New,
                            now,
                            EventKind::StatusChanged,
                            json!({"to": "pending", "note": "no longer in_progress"}),
                        )?;
                        Ok(())
                    }
                    _ => Ok(()),
                }
            }
            ProcState::Claimed | ProcState::Processing => {
                // A job resumed in this process (after a restart, or found by recovery) is
                // checked before its items are touched; a claimed one was checked before
                // `started`.
                if !self.checked.contains(&job.id)
                    && (self.waits_for_readiness(&job, report)
                        || !self.check_ready(&job, report)?)
                {
                    return Ok(());
                }
                self.stage.process(&self.store, &job, self.clock.now())?;
                let next = self
                    .store
                    .job(&job.id)?
                    .filter(|j| j.proc_state != ProcState::Claimed);
                match next {
                    Some(j) if j.proc_state.is_active() => self.track_deadline(j, report),
                    Some(j) => {
                        if j.proc_state.is_final() {
                            self.checked.remove(&j.id);
                            report.finished.push(j.id.clone());
                            // The company is free again: its next job can be taken at once.
                            report.due(self.clock.now());
                        }
                        Ok(())
                    }
                    None => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }

    fn track_deadline(&mut self, job: JobRow, report: &mut RoundReport) -> Result<(), StoreError> {
        let now = self.clock.now();
        if now >= job.expires_at {
            // Our clock says it has expired: only Pleo can say so. Read it; a job Pleo still
            // shows open is never abandoned on our clock's word.
            match self.reread(&job, report)? {
                Some(f) if f.proc_state.is_final() => {
                    self.checked.remove(&f.id);
                    if f.proc_state == ProcState::Expired {
                        report.expired.push(f.id.clone());
                    }
                    Ok(())
                }
                Some(f) if f.expires_at > now => self.track_deadline(f, report),
                Some(f) => {
                    if f.warned_expires_at != Some(f.expires_at) {
                        self.store.warn_deadline(&f, now)?;
                        log::warn!(
                            "job {} of company {}: past its deadline by our clock ({}), but Pleo still says {}; carrying on",
                            f.id,
                            f.company_id,
                            f.expires_at,
                            f.status
                        );
                        report.warned.push(f.id.clone());
                    }
                    // Ask again in a while (the stage's own reads also refresh it).
                    report.due(now.plus(Duration::from_secs(30)));
                    Ok(())
                }
                None => {
                    report.due(now.plus(Duration::from_secs(5)));
                    Ok(())
                }
            }
        } else {
            let warn_at = Millis(job.expires_at.0 - crate::clock::ms(self.cfg.deadline_warning));
            if now >= warn_at {
                if job.warned_expires_at != Some(job.expires_at) {
                    self.store.warn_deadline(&job, now)?;
                    log::warn!(
                        "job {} of company {} expires at {} ({} s left)",
                        job.id,
                        job.company_id,
                        job.expires_at,
                        now.until(job.expires_at) / 1000
                    );
                    report.warned.push(job.id.clone());
                }
                report.due(job.expires_at);
            } else {
                report.due(warn_at);
            }
            Ok(())
        }
    }
}

enum Claim {
    Held(JobRow),
    /// Too close to the deadline for a claim to land: wait for it, then read again.
    Wait,
    Lost,
    Skipped,
    Failed,
}

/// The processor thread's loop: a round, then wait for a wake, the next due time (at most
/// `idle_max`), or shutdown. `progress` (if any) gets every round's report.
pub fn run(
    mut processor: Processor,
    wake: Receiver<()>,
    shutdown: Receiver<()>,
    progress: Option<Sender<RoundReport>>,
    idle_max: Duration,
    alive: Option<Arc<crate::health::Progress>>,
) {
    loop {
        if let Some(a) = &alive {
            a.beat();
        }
        let report = processor.round();
        let now = processor.clock.now();
        let wait = report
            .next_due
            .map(|t| Duration::from_millis(now.until(t).max(0) as u64 + 1))
            .unwrap_or(idle_max)
            .min(idle_max);
        if let Some(p) = &progress {
            let _ = p.try_send(report);
        }
        select! {
            recv(shutdown) -> _ => return,
            recv(wake) -> msg => {
                if msg.is_err() { return; }
                processor.recheck_now();
            },
            default(wait) => {}
        }
    }
}
