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
//!
//! Files: this one owns the processor's state and its round over the companies; `claim`
//! takes a company's next job, `readiness` runs the check before `started`, `held` looks
//! after the job in hand and its deadline, and `decide` holds the decisions themselves as pure
//! functions of the job, the two clocks and the configuration (unit-tested without a store
//! or a client).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, select};
use serde_json::json;

use crate::clock::{Millis, SharedClock};
use crate::pleo::{Clients, PleoError};
pub use crate::processing::{ReadyStage, Stage, send_final};
use crate::store::{EventKind, JobRow, ProcState, Source, Store, StoreError};

mod claim;
mod decide;
mod held;
pub mod owners;
mod readiness;

pub use owners::Owners;

/// Brings the companies served up to date with what operators committed (`jobmirror
/// companies pause|remove|add`) before a claim, so no claim follows a committed pause or
/// removal, whatever woke the lane. The service implements it over the `companies` table.
pub trait CatchUp: Send + Sync {
    fn catch_up(&self);
}

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
    /// Companies a reload removed while a job of theirs was in hand: served for that job
    /// alone (nothing new is claimed) until it is finished or handed back.
    leaving: Vec<String>,
    /// This lane's number, and which lane holds each company (shared by the lanes).
    lane: usize,
    owners: Arc<Owners>,
    /// New company lists for this lane (a reload), applied before every round and claim.
    updates: Option<Receiver<Vec<String>>>,
    catch_up: Option<Arc<dyn CatchUp>>,
    /// Listing by credential: a company sharing the default credential is listed by itself
    /// before a claim (see `claim::confirm_oldest`).
    confirm_by_company: bool,
}

/// How soon a lane looks again at a company another lane still holds.
const OWNER_WAIT: Duration = Duration::from_secs(1);

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
            leaving: Vec::new(),
            lane: 0,
            owners: Arc::default(),
            updates: None,
            catch_up: None,
            confirm_by_company: false,
        }
    }

    /// With `yes` (listing by credential), a company sharing the default credential is listed
    /// by itself before each claim, so the claim takes its oldest job.
    pub fn with_confirm_by_company(mut self, yes: bool) -> Processor {
        self.confirm_by_company = yes;
        self
    }

    /// This processor is lane `lane` among those sharing `owners`.
    pub fn with_lane(mut self, lane: usize, owners: Arc<Owners>) -> Processor {
        self.lane = lane;
        self.owners = owners;
        self
    }

    /// Where this lane's new company lists arrive; they are applied before every round and
    /// before every claim.
    pub fn with_updates(mut self, updates: Receiver<Vec<String>>) -> Processor {
        self.updates = Some(updates);
        self
    }

    /// Asked before every claim to bring the companies up to date with the database.
    pub fn with_catch_up(mut self, catch_up: Arc<dyn CatchUp>) -> Processor {
        self.catch_up = Some(catch_up);
        self
    }

    /// Applies the company lists that arrived (the newest wins).
    fn take_updates(&mut self) {
        let Some(rx) = &self.updates else { return };
        let mut last = None;
        while let Ok(list) = rx.try_recv() {
            last = Some(list);
        }
        if let Some(list) = last {
            self.set_companies(list);
        }
    }

    /// Whether `company` is served by this lane now, after catching up with the companies
    /// operators committed (checked before every pick and claim).
    fn serves(&mut self, company: &str) -> bool {
        if let Some(c) = &self.catch_up {
            c.catch_up();
        }
        self.take_updates();
        self.companies.iter().any(|c| c == company)
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

    /// The companies this lane serves from now on (a reload). A company dropped while a job
    /// of its is in hand stays until that job is finished or handed back; one added starts
    /// once its recovery pass has completed.
    pub fn set_companies(&mut self, companies: Vec<String>) {
        let keep: HashSet<&String> = companies.iter().collect();
        let mut leaving: Vec<String> = self
            .companies
            .iter()
            .chain(&self.leaving)
            .filter(|c| !keep.contains(c))
            .cloned()
            .collect();
        leaving.sort();
        leaving.dedup();
        self.leaving = leaving;
        self.companies = companies;
    }

    /// `company` has left (removed or paused, with no job in hand any more): journaled, and a
    /// removed company's own OAuth pair is deleted.
    fn company_left(&mut self, company: &str) {
        let now = self.clock.now();
        if let Err(e) = self.store.journal(
            now,
            None,
            Some(company),
            crate::store::EventKind::CompanyLeft,
            serde_json::json!({}),
        ) {
            log::warn!("company {company} left, but the journal could not say so: {e}");
        }
        match self.store.forget_company_pair(company) {
            Ok(true) => log::info!(
                "company {company} is no longer served here; its OAuth token pair is deleted"
            ),
            Ok(false) => log::info!("company {company} is no longer served here (no job in hand)"),
            Err(e) => log::warn!("company {company} left; its OAuth pair is kept for now: {e}"),
        }
    }

    /// Tends the job in hand of each company that is leaving; one with none has left. A
    /// company another lane holds now is that lane's (it came back, and its job was let go).
    fn tend_leaving(&mut self, report: &mut RoundReport) {
        for company in std::mem::take(&mut self.leaving) {
            if !self.owners.take(&company, self.lane) {
                continue;
            }
            match self.store.active_job(&company) {
                Ok(Some(job)) => {
                    if let Err(e) = self.tend(job, report) {
                        report.errors.push(format!("{company}: {e}"));
                    }
                    self.leaving.push(company);
                }
                Ok(None) => {
                    self.not_ready.remove(&company);
                    self.paused_until.remove(&company);
                    self.owners.release(&company, self.lane);
                    self.company_left(&company);
                }
                Err(e) => {
                    report.errors.push(format!("{company}: {e}"));
                    self.leaving.push(company);
                }
            }
        }
    }

    /// One round over every company.
    pub fn round(&mut self) -> RoundReport {
        let mut report = RoundReport::default();
        self.take_updates();
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
        if !self.leaving.is_empty() {
            self.tend_leaving(&mut report);
        }
        for company in self.companies.clone() {
            if self.stopping.as_ref().is_some_and(|s| s.is_set()) {
                break;
            }
            if !with_work.contains(&company) {
                self.not_ready.remove(&company);
                self.owners.release(&company, self.lane);
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
            if !self.owners.take(&company, self.lane) {
                // Another lane still has a job of this company in hand (it came back to this
                // lane while that one ran): it waits until that lane lets the job go.
                report.due(now.plus(OWNER_WAIT));
                continue;
            }
            if let Err(e) = self.company_round(&company, &mut report) {
                log::error!("processor: company {company}: {e}");
                report.errors.push(format!("{company}: {e}"));
            }
            // Let the company go once nothing of it is in hand (a failed read keeps it).
            if let Ok(None) = self.store.active_job(&company) {
                self.owners.release(&company, self.lane);
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
}

/// Company `i` (in configuration order) goes to lane `i % lanes`: a company's jobs always run
/// on one lane, so they stay strictly sequential.
pub fn split_lanes(companies: &[String], lanes: u32) -> Vec<Vec<String>> {
    let n = (lanes.max(1) as usize).min(companies.len().max(1));
    let mut out = vec![Vec::new(); n];
    for (i, c) in companies.iter().enumerate() {
        out[i % n].push(c.clone());
    }
    out
}

/// The processor thread's loop: a round, then wait for a wake, the next due time (at most
/// `idle_max`), or shutdown. `progress` (if any) gets every round's report.
pub fn run(
    mut processor: Processor,
    wake: Receiver<()>,
    companies: Receiver<Vec<String>>,
    shutdown: Receiver<()>,
    progress: Option<Sender<RoundReport>>,
    idle_max: Duration,
    alive: Option<Arc<crate::health::Progress>>,
) {
    let mut companies = companies;
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
            recv(companies) -> list => match list {
                Ok(list) => processor.set_companies(list),
                Err(_) => companies = crossbeam_channel::never(),
            },
            default(wait) => {}
        }
    }
}
