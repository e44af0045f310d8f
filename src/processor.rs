//! The processor thread: per company, one job at a time, oldest `createdAt` first.
//!
//! Invariants: a job is claimed only after it was read again and found `pending` with more
//! than `claim_min_left` to live; `started` is never sent for a job the mirror holds as
//! `in_progress` (those are resumed); at most one job per company is active; a 422 on
//! `started` is a conflict, journaled and never retried for that job; claim attempts per
//! company per round are bounded, and a conflict or failure pauses the company for
//! `conflict_backoff`; every decision reads the time from the injected clock.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, select};
use serde_json::json;

use crate::clock::{Millis, SharedClock};
use crate::pleo::{Clients, JobEvent, JobEventKind, PleoError, status};
use crate::store::{EventKind, JobRow, ProcState, Source, Store, StoreError};

#[derive(Clone, Debug)]
pub struct ProcessorConfig {
    pub deadline_warning: Duration,
    pub claim_min_left: Duration,
    pub claims_per_round_max: u32,
    pub conflict_backoff: Duration,
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        ProcessorConfig {
            deadline_warning: Duration::from_secs(600),
            claim_min_left: Duration::from_secs(300),
            claims_per_round_max: 3,
            conflict_backoff: Duration::from_secs(30),
        }
    }
}

/// What happens to a job once it is held: [`crate::pipeline::HandlerStage`] in the service.
pub trait Stage: Send {
    /// Works on a held job (`claimed`, or `processing` after a restart or a pause). Returns
    /// when the job is finished, or when it must wait (it stays `processing` and comes back
    /// next round). Must move a `claimed` job on.
    fn process(&mut self, store: &Store, job: &JobRow, now: Millis) -> Result<(), StoreError>;
}

/// Only records that the job is ready (`ready` in the journal, `processing` state) and holds
/// it: for tests of claiming and deadlines that need no handler.
#[derive(Debug, Default)]
pub struct ReadyStage;

impl Stage for ReadyStage {
    fn process(&mut self, store: &Store, job: &JobRow, now: Millis) -> Result<(), StoreError> {
        if job.proc_state != ProcState::Claimed {
            return Ok(());
        }
        store.transition(
            job,
            ProcState::Processing,
            now,
            EventKind::Ready,
            json!({"number_of_items": job.number_of_items}),
        )
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
    stopping: Option<Arc<crate::health::Stopping>>,
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
            stopping: None,
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

    fn ms(d: Duration) -> i64 {
        d.as_millis().min(i64::MAX as u128) as i64
    }

    /// One round over every company.
    pub fn round(&mut self) -> RoundReport {
        let mut report = RoundReport::default();
        let now = self.clock.now();
        let min_left = Self::ms(self.cfg.claim_min_left);
        match self.store.retire_too_late(now, min_left) {
            Ok(rows) => {
                for r in rows {
                    log::warn!(
                        "job {} of company {} expires at {} and is too close to expiry to claim",
                        r.id,
                        r.company_id,
                        r.expires_at
                    );
                }
            }
            Err(e) => report.errors.push(e.to_string()),
        }
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
        self.paused_until.retain(|_, until| *until > now);
        for until in self.paused_until.values() {
            report.due(*until);
        }
        for company in self.companies.clone() {
            if self.stopping.as_ref().is_some_and(|s| s.is_set()) {
                break;
            }
            if !with_work.contains(&company) {
                continue;
            }
            if let Err(e) = self.company_round(&company, &mut report) {
                log::error!("processor: company {company}: {e}");
                report.errors.push(format!("{company}: {e}"));
            }
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
        let min_left = Self::ms(self.cfg.claim_min_left);
        for _ in 0..self.cfg.claims_per_round_max {
            let now = self.clock.now();
            let Some(candidate) = self.store.pick_next(company, now, min_left)? else {
                return Ok(());
            };
            match self.try_claim(candidate, report)? {
                Claim::Held(job) => return self.tend(job, report),
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
        if now.until(fresh.expires_at) <= Self::ms(self.cfg.claim_min_left) {
            self.store
                .retire_too_late(now, Self::ms(self.cfg.claim_min_left))?;
            return Ok(Claim::Skipped);
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
                self.stage.process(&self.store, &job, self.clock.now())?;
                let next = self
                    .store
                    .job(&job.id)?
                    .filter(|j| j.proc_state != ProcState::Claimed);
                match next {
                    Some(j) if j.proc_state.is_active() => self.track_deadline(j, report),
                    Some(j) => {
                        if j.proc_state.is_final() {
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
            // Our clock says it has expired: confirm with Pleo (someone may have refreshed it).
            let fresh = self.reread(&job, report)?;
            match fresh {
                Some(f) if f.proc_state.is_final() => {
                    if f.proc_state == ProcState::Expired {
                        report.expired.push(f.id.clone());
                    }
                    Ok(())
                }
                Some(f) if f.expires_at > now => self.track_deadline(f, report),
                other => {
                    let row = other.unwrap_or(job);
                    self.store.transition(
                        &row,
                        ProcState::Expired,
                        now,
                        EventKind::Expired,
                        json!({"expires_at": row.expires_at.to_rfc3339(), "observed": "local clock", "pleo_status": row.status}),
                    )?;
                    report.expired.push(row.id.clone());
                    Ok(())
                }
            }
        } else {
            let warn_at = Millis(job.expires_at.0 - Self::ms(self.cfg.deadline_warning));
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
            recv(wake) -> msg => if msg.is_err() { return; },
            default(wait) => {}
        }
    }
}
