//! The sync thread: mirrors Pleo's job listings into `export_jobs`.
//!
//! Invariants: detection never changes anything at Pleo (this module only issues GETs); every
//! pass over a company is counted in its `company_sync` row, and leaves a `sync_runs` row of
//! its own unless it was a quiet poll; an open job that left the listing is read again so the
//! mirror stays true; a company is polled for `pending` only after a recovery pass (`pending`
//! and `in_progress`) has succeeded for it.
//!
//! Files: this one owns the mirror and its listing passes; `deliveries` turns stored webhook
//! deliveries into detection, `schedule` spreads the companies' polls over the interval, and
//! `run` is the thread's loop.

use std::collections::HashSet;
use std::sync::Arc;

use crossbeam_channel::Sender;
use serde_json::json;

use crate::clock::SharedClock;
use crate::pleo::{Clients, PleoError, status};
use crate::store::{EventKind, Source, Store, StoreError, SyncCounts, Upsert};

pub mod deliveries;
pub mod run;
pub mod schedule;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassKind {
    /// Start-up: `pending` and `in_progress`, so jobs held before a crash are found.
    Recovery,
    /// Scheduled: `pending` only.
    Poll,
    /// Run now on request (SIGUSR1, `jobmirror trigger`): same as a poll.
    Trigger,
}

impl PassKind {
    fn as_str(self) -> &'static str {
        match self {
            PassKind::Recovery => "recovery",
            PassKind::Poll => "poll",
            PassKind::Trigger => "trigger",
        }
    }
}

/// Companies whose start-up recovery pass has completed in this process: shared by the sync
/// thread (which fills it) and the processor lanes (which serve only these companies).
#[derive(Debug, Default)]
pub struct Recovered(std::sync::Mutex<HashSet<String>>);

impl Recovered {
    pub fn insert(&self, company: &str) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(company.to_owned());
    }
    pub fn contains(&self, company: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(company)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Pleo(#[from] PleoError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What one pass over all companies did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassReport {
    pub counts: SyncCounts,
    pub failed_companies: Vec<String>,
    /// For each failed company: what failed, and whether trying again soon may help (429,
    /// 5xx, no answer) or not (a refused credential, another 4xx).
    pub failures: Vec<(String, String, bool)>,
    /// New work for the processor appeared (a new pending job, or a job to resume).
    pub woke: bool,
}

pub struct Mirror {
    store: Store,
    clients: Arc<Clients>,
    clock: SharedClock,
    companies: Vec<String>,
    /// `companies`, to look up.
    served: HashSet<String>,
    /// The part of the listed companies this instance serves (a webhook for another shard's
    /// company is left to it).
    shard: crate::config::Shard,
    recovered: HashSet<String>,
    shared_recovered: Option<Arc<Recovered>>,
    resume_unknown_in_progress: bool,
    wake: Vec<Sender<()>>,
    metrics: Option<Arc<crate::health::Metrics>>,
    stopping: Option<Arc<crate::health::Stopping>>,
    /// company -> (listings failed in a row, the last one refused the credential).
    failing: std::collections::HashMap<String, (u32, bool)>,
}

impl Mirror {
    pub fn new(
        store: Store,
        clients: Arc<Clients>,
        clock: SharedClock,
        companies: Vec<String>,
    ) -> Mirror {
        Mirror {
            store,
            clients,
            clock,
            served: companies.iter().cloned().collect(),
            companies,
            shard: crate::config::Shard::ALL,
            recovered: HashSet::new(),
            shared_recovered: None,
            resume_unknown_in_progress: true,
            wake: Vec::new(),
            metrics: None,
            stopping: None,
            failing: std::collections::HashMap::new(),
        }
    }

    /// This instance serves shard `shard` of the listed companies (see
    /// [`crate::config::Shard`]).
    pub fn with_shard(mut self, shard: crate::config::Shard) -> Mirror {
        self.shard = shard;
        self
    }

    /// Where to signal new work (bounded channels, one per processor lane; a full one means a
    /// wake is already queued).
    pub fn with_wake(mut self, wake: Vec<Sender<()>>) -> Mirror {
        self.wake = wake;
        self
    }

    /// Long loops end early once `stopping` is set.
    pub fn with_stopping(mut self, stopping: Arc<crate::health::Stopping>) -> Mirror {
        self.stopping = Some(stopping);
        self
    }

    fn stopping(&self) -> bool {
        self.stopping.as_ref().is_some_and(|s| s.is_set())
    }

    /// Counts passes and their durations.
    pub fn with_metrics(mut self, metrics: Arc<crate::health::Metrics>) -> Mirror {
        self.metrics = Some(metrics);
        self
    }

    fn wake_processors(&self) {
        for w in &self.wake {
            let _ = w.try_send(());
        }
    }

    /// Where to record each company whose recovery pass completed (the processor waits for it).
    pub fn with_recovered(mut self, recovered: Arc<Recovered>) -> Mirror {
        self.shared_recovered = Some(recovered);
        self
    }

    pub fn with_resume_unknown_in_progress(mut self, yes: bool) -> Mirror {
        self.resume_unknown_in_progress = yes;
        self
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// One pass over every company. Companies not yet recovered get a recovery pass whatever
    /// `kind` says.
    pub fn pass(&mut self, kind: PassKind) -> PassReport {
        let all = self.companies.clone();
        self.pass_companies(kind, &all)
    }

    /// Companies that still need their start-up recovery pass.
    pub fn unrecovered(&self) -> Vec<String> {
        self.companies
            .iter()
            .filter(|c| !self.recovered.contains(*c))
            .cloned()
            .collect()
    }

    /// One pass over the given companies (as [`Mirror::pass`]).
    pub fn pass_companies(&mut self, kind: PassKind, companies: &[String]) -> PassReport {
        let mut report = PassReport::default();
        for company in companies.iter().cloned() {
            if self.stopping() {
                break;
            }
            let k = if self.recovered.contains(&company) {
                kind
            } else {
                PassKind::Recovery
            };
            match self.pass_company(&company, k) {
                Ok((counts, woke)) => {
                    if let Some((n, _)) = self.failing.remove(&company) {
                        if n >= crate::health::FAILING_AFTER {
                            log::info!("company {company}: listing works again after {n} failures");
                        }
                        self.count_failing();
                    }
                    if k == PassKind::Recovery {
                        self.recovered.insert(company.clone());
                        if let Some(r) = &self.shared_recovered {
                            r.insert(&company);
                        }
                    }
                    report.woke |= woke;
                    add(&mut report.counts, &counts);
                }
                Err(e) => {
                    let refused = matches!(&e, SyncError::Pleo(p) if p.is_refusal());
                    self.listing_failed(&company, k, &e, refused);
                    let transient = match &e {
                        SyncError::Pleo(p) => p.is_retryable(),
                        SyncError::Store(_) => true,
                    };
                    report
                        .failures
                        .push((company.clone(), e.to_string(), transient));
                    report.failed_companies.push(company);
                }
            }
        }
        if report.woke {
            self.wake_processors();
        }
        report
    }

    /// Counts a failed listing. A company whose credential Pleo refuses (401, 403), or whose
    /// listing failed [`crate::health::FAILING_AFTER`] times in a row, is failing: that is an
    /// ERROR when it starts (and every 100th failure after), a warning otherwise.
    fn listing_failed(&mut self, company: &str, kind: PassKind, e: &SyncError, refused: bool) {
        let entry = self.failing.entry(company.to_owned()).or_insert((0, false));
        entry.0 += 1;
        entry.1 = refused;
        let n = entry.0;
        let lasting = refused || n >= crate::health::FAILING_AFTER;
        let starts = if refused {
            n == 1
        } else {
            n == crate::health::FAILING_AFTER
        };
        // The gauges first: whoever reads the log line finds them already set.
        self.count_failing();
        if lasting && (starts || n.is_multiple_of(100)) {
            let why = if refused {
                "Pleo refuses the credential: fix the key (polls go on)".to_owned()
            } else {
                format!("{n} listings in a row failed (polls go on)")
            };
            log::error!(
                "company {company}: {} pass failed: {e}; {why}",
                kind.as_str()
            );
        } else {
            log::warn!("{} pass for company {company} failed: {e}", kind.as_str());
        }
    }

    /// Sets the failing-companies gauges.
    fn count_failing(&self) {
        let Some(m) = &self.metrics else {
            return;
        };
        let lasting = self
            .failing
            .values()
            .filter(|(n, refused)| *refused || *n >= crate::health::FAILING_AFTER);
        let (mut failing, mut refused) = (0, 0);
        for (_, r) in lasting {
            failing += 1;
            refused += u64::from(*r);
        }
        use std::sync::atomic::Ordering::Relaxed;
        m.companies_failing.store(failing, Relaxed);
        m.companies_refused.store(refused, Relaxed);
    }

    fn pass_company(
        &mut self,
        company: &str,
        kind: PassKind,
    ) -> Result<(SyncCounts, bool), SyncError> {
        let now = self.clock.now();
        let run = self.store.begin_sync_run(company, kind.as_str(), now)?;
        let mut counts = SyncCounts::default();
        let started = crate::clock::monotonic();
        let result = self.list_and_store(company, kind, &mut counts);
        if let Some(m) = &self.metrics {
            m.poll_done(started.elapsed(), result.is_err());
        }
        let end = self.clock.now();
        match &result {
            Ok(_) => self.store.finish_sync_run(run, end, &counts, None)?,
            Err(e) => {
                let msg = e.to_string();
                self.store.finish_sync_run(run, end, &counts, Some(&msg))?;
                self.store.journal(
                    end,
                    None,
                    Some(company),
                    EventKind::SyncFailed,
                    json!({"pass": kind.as_str(), "error": msg}),
                )?;
            }
        }
        result.map(|woke| (counts, woke))
    }

    fn list_and_store(
        &mut self,
        company: &str,
        kind: PassKind,
        counts: &mut SyncCounts,
    ) -> Result<bool, SyncError> {
        let statuses: &[&str] = match kind {
            PassKind::Recovery => &[status::PENDING, status::IN_PROGRESS],
            PassKind::Poll | PassKind::Trigger => &[status::PENDING],
        };
        let client = self.clients.for_company(Some(company));
        let listing = client.list_jobs(company, statuses)?;
        counts.pages = listing.pages;
        counts.seen = listing.jobs.len() as u32;
        for (id, error) in &listing.rejected {
            log::warn!(
                "listing for company {company}: skipped an entry that is not a readable job ({}): {error}",
                id.as_deref().unwrap_or("no id")
            );
            self.store.journal(
                self.clock.now(),
                id.as_deref(),
                Some(company),
                EventKind::ListingEntrySkipped,
                json!({"error": error, "pass": kind.as_str()}),
            )?;
        }
        // Pleo: an `in_progress` job found during recovery is an interrupted workflow of ours,
        // to resume without `started`. That holds at every start (a new, lost or restored
        // database alike), unless this database recorded the job as someone else's.
        let source = match kind {
            PassKind::Recovery if self.resume_unknown_in_progress => Source::Recovery,
            PassKind::Recovery => Source::RecoveryLeavingInProgress,
            _ => Source::Poll,
        };
        // A listing may carry another company's job if the server ignores the filter: skip it.
        let (mine, foreign): (Vec<_>, Vec<_>) = listing
            .jobs
            .into_iter()
            .partition(|j| j.company_id == company);
        if !foreign.is_empty() {
            log::warn!(
                "listing for company {company} returned {} jobs of other companies; ignored",
                foreign.len()
            );
        }
        let now = self.clock.now();
        let outcomes = self.store.upsert_jobs(&mine, now, source)?;
        let mut woke = false;
        for (job, o) in mine.iter().zip(&outcomes) {
            match o {
                Upsert::New => {
                    counts.new += 1;
                    woke |= job.status == status::PENDING || job.status == status::IN_PROGRESS;
                }
                Upsert::Changed => counts.changed += 1,
                Upsert::Unchanged => {}
            }
        }
        // Open jobs the mirror holds that this listing does not show (left it, or `in_progress`
        // outside a recovery listing): read them again so the mirror stays true.
        let seen: HashSet<String> = mine.iter().map(|j| j.id.clone()).collect();
        for id in self.store.open_jobs_missing(company, &seen)? {
            counts.reread += 1;
            match client.get_job(&id) {
                Ok(job) => {
                    let now = self.clock.now();
                    self.store.journal(
                        now,
                        Some(&id),
                        Some(company),
                        EventKind::LeftListing,
                        json!({"status": job.status}),
                    )?;
                    if self.store.upsert_job(&job, now, Source::Reread)? == Upsert::Changed {
                        counts.changed += 1;
                    }
                }
                Err(PleoError::Api { status: 404, .. }) => {
                    log::warn!("job {id} of company {company} is gone from Pleo (404)");
                    self.store.journal(
                        self.clock.now(),
                        Some(&id),
                        Some(company),
                        EventKind::LeftListing,
                        json!({"status": null, "error": "404 EXPORT_NOT_FOUND"}),
                    )?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(woke)
    }
}

fn add(total: &mut SyncCounts, c: &SyncCounts) {
    total.pages += c.pages;
    total.seen += c.seen;
    total.new += c.new;
    total.changed += c.changed;
    total.reread += c.reread;
}

pub use crate::health::TICK;

fn log_pass(kind: PassKind, companies: usize, report: &PassReport) {
    let line = format!(
        "{} pass over {companies} companies: {} jobs seen, {} new, {} changed, {} re-read, {} pages{}",
        kind.as_str(),
        report.counts.seen,
        report.counts.new,
        report.counts.changed,
        report.counts.reread,
        report.counts.pages,
        if report.failed_companies.is_empty() {
            String::new()
        } else {
            format!(", failed for {}", report.failed_companies.join(", "))
        }
    );
    // With many companies polled one by one, quiet passes would flood the log.
    if kind == PassKind::Poll
        && report.counts.new == 0
        && report.counts.changed == 0
        && report.failed_companies.is_empty()
    {
        log::debug!("{line}");
    } else {
        log::info!("{line}");
    }
}
