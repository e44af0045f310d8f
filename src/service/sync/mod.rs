//! The sync thread: mirrors Pleo's job listings into `export_jobs`.
//!
//! Invariants: detection never changes anything at Pleo (this module only issues GETs); every
//! pass over a company is counted in its `company_sync` row, and leaves a `sync_runs` row of
//! its own unless it was a quiet poll; an open job that left the listing is read again so the
//! mirror stays true; a company is polled for `pending` only after a recovery pass (`pending`
//! and `in_progress`) has succeeded for it.
//!
//! Files: this one owns the mirror's books (recovered, failing, wakes) and runs passes;
//! `pass` names their kinds and errors, `listing` is one company's pass (fetch, then store),
//! `pool` runs fetches side by side, `credential` lists the default credential's companies
//! together (opt-in) and changes the companies served, `deliveries` turns stored webhook
//! deliveries into detection, `schedule` spreads the polls over the interval, and `run` is the
//! thread's loop.

use std::collections::HashSet;
use std::sync::Arc;

use crate::clock::SharedClock;
use crate::pleo::Clients;
use crate::store::{Store, SyncCounts};
use crossbeam_channel::Sender;

pub mod credential;
pub mod deliveries;
pub use pass::{PassKind, SyncError};
pub mod listing;
pub mod pass;
pub mod pool;
pub mod run;
pub mod schedule;

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
    /// Company passes this report covers.
    pub passes: usize,
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
    /// Listing passes run side by side here when there is a pool (the service), on this
    /// thread when not (replays, tests).
    pool: Option<pool::ListingPool>,
    /// Companies with a routine poll in the pool now (a due poll for one is not queued twice).
    polling: HashSet<String>,
    /// Routine polls' results collected since the last [`Mirror::take_poll_report`].
    polled: PassReport,
    /// Listing by credential: the companies sharing the default credential, listed together.
    group: Option<Vec<String>>,
    group_set: HashSet<String>,
    by_credential: bool,
    /// A webhook's detection is running (its listing is journaled as `source: webhook`).
    by_webhook: bool,
    /// The event thread's nudges (the service's), and whether deliveries were acted on
    /// between passes.
    nudge: Option<crossbeam_channel::Receiver<()>>,
    acted_between: bool,
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
            pool: None,
            polling: HashSet::new(),
            polled: PassReport::default(),
            group: None,
            group_set: HashSet::new(),
            by_credential: false,
            by_webhook: false,
            nudge: None,
            acted_between: false,
        }
    }

    /// This instance serves shard `shard` of the listed companies (see
    /// [`crate::config::Shard`]).
    pub fn with_shard(mut self, shard: crate::config::Shard) -> Mirror {
        self.shard = shard;
        self
    }

    /// Run listing passes over many companies in `pool` (see [`pool::ListingPool`]).
    pub fn with_pool(mut self, pool: pool::ListingPool) -> Mirror {
        self.pool = Some(pool);
        self
    }

    /// Runs every listing pass on the calling thread (a replay: the same order each time).
    pub fn without_pool(mut self) -> Mirror {
        self.pool = None;
        self
    }

    /// Where the pool's finished passes arrive ([`crossbeam_channel::never`] without a pool).
    pub fn pool_done(&self) -> crossbeam_channel::Receiver<pool::Done> {
        self.pool
            .as_ref()
            .map_or_else(crossbeam_channel::never, |p| p.done().clone())
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

    /// Counts the jobs a poll (not a webhook) found first.
    pub fn count_found(&self, report: &PassReport) {
        if let Some(m) = &self.metrics {
            m.jobs_found_by_poll.fetch_add(
                report.counts.new as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
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

    /// One pass over the given companies (as [`Mirror::pass`]), returning when every one is
    /// done: side by side in the pool (urgent, ahead of routine polls) when there is one and
    /// more than one company, else on this thread.
    pub fn pass_companies(&mut self, kind: PassKind, companies: &[String]) -> PassReport {
        let mut report = PassReport::default();
        let (together, companies) = self.split_group(companies);
        if !together.is_empty() && !self.stopping() {
            let k = self.group_kind(&together, kind);
            let fetched = listing::fetch_by_credential(&self.clients, &self.clock, k);
            self.store_group(kind, fetched, &together, &mut report);
        }
        self.pass_each(kind, &companies, &mut report);
        if report.woke {
            self.wake_processors();
        }
        report
    }

    /// Each company listed by itself: side by side in the pool when there is one and more
    /// than one company, else on this thread.
    fn pass_each(&mut self, kind: PassKind, companies: &[String], report: &mut PassReport) {
        if self.pool.is_some() && companies.len() > 1 {
            self.pass_in_pool(kind, companies, report);
        } else {
            for company in companies {
                if self.stopping() {
                    break;
                }
                let k = self.kind_for(company, kind);
                let result = self.lister().pass_company(company, k);
                self.record(company, k, result, report);
            }
        }
    }

    /// Where the event thread's nudges arrive: while a long run of passes is stored, waiting
    /// deliveries are acted on between them ([`Mirror::deliveries_between`]).
    pub fn set_nudge(&mut self, nudge: crossbeam_channel::Receiver<()>) {
        self.nudge = Some(nudge);
    }

    /// Acts on waiting webhook deliveries now if the event thread nudged; the sync loop then
    /// looks at their retries again ([`Mirror::take_acted_between`]).
    pub(crate) fn deliveries_between(&mut self) {
        if self.nudge.as_ref().is_some_and(|n| n.try_recv().is_ok()) {
            if let Err(e) = self.process_deliveries() {
                log::warn!("acting on webhook deliveries failed: {e}; the sync loop tries again");
            }
            self.acted_between = true;
        }
    }

    /// Whether deliveries were acted on between passes since the last call.
    pub fn take_acted_between(&mut self) -> bool {
        std::mem::take(&mut self.acted_between)
    }

    /// Recovery for a company not recovered yet, whatever `kind` says.
    fn kind_for(&self, company: &str, kind: PassKind) -> PassKind {
        if self.recovered.contains(company) {
            kind
        } else {
            PassKind::Recovery
        }
    }

    fn pass_in_pool(&mut self, kind: PassKind, companies: &[String], report: &mut PassReport) {
        let Some(pool) = &self.pool else { return };
        let mut waiting: std::collections::HashMap<String, usize> = Default::default();
        for company in companies {
            let k = self.kind_for(company, kind);
            pool.submit(pool::Task {
                company: company.clone(),
                kind: k,
                routine: false,
                group: false,
            });
            *waiting.entry(company.clone()).or_default() += 1;
        }
        let done = pool.done().clone();
        let mut left = companies.len();
        while left > 0 && !self.stopping() {
            let Ok(d) = done.recv_timeout(TICK) else {
                continue;
            };
            if d.routine {
                self.record_poll(d);
                continue;
            }
            if let Some(n) = waiting.get_mut(&d.company).filter(|n| **n > 0) {
                *n -= 1;
                left -= 1;
            }
            let result = self.lister().store_pass(&d.company, d.kind, d.fetched);
            self.record(&d.company, d.kind, result, report);
        }
    }

    /// Queues a routine poll of each company (in the pool: the call returns at once, results
    /// come through [`Mirror::pool_done`] to [`Mirror::record_poll`]). A company whose last
    /// poll is still running is skipped. Without a pool, polls them here and now.
    /// `companies` may name [`pass::GROUP_KEY`] (see [`Mirror::poll_keys`]).
    pub fn start_polls(&mut self, companies: &[String]) {
        if self.pool.is_none() {
            let all = self.expand_keys(companies);
            let report = self.pass_companies(PassKind::Poll, &all);
            self.add_polled(report);
            return;
        }
        for company in companies {
            if !self.polling.insert(company.clone()) {
                continue;
            }
            let group = self.group.as_ref().filter(|_| company == pass::GROUP_KEY);
            let k = match group {
                Some(g) => self.group_kind(g, PassKind::Poll),
                None => self.kind_for(company, PassKind::Poll),
            };
            if let Some(pool) = &self.pool {
                pool.submit(pool::Task {
                    company: company.clone(),
                    kind: k,
                    routine: true,
                    group: group.is_some(),
                });
            }
        }
        self.count_polls_waiting();
    }

    fn count_polls_waiting(&self) {
        if let Some(m) = &self.metrics {
            m.polls_waiting.store(
                self.polling.len() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
    }

    /// Keeps the books for a routine poll the pool finished.
    pub fn record_poll(&mut self, d: pool::Done) {
        self.polling.remove(&d.company);
        self.count_polls_waiting();
        let mut report = PassReport::default();
        if d.group {
            let group = self.group.clone().unwrap_or_default();
            self.store_group(PassKind::Poll, d.fetched, &group, &mut report);
        } else {
            let result = self.lister().store_pass(&d.company, d.kind, d.fetched);
            self.record(&d.company, d.kind, result, &mut report);
        }
        if report.woke {
            self.wake_processors();
        }
        self.add_polled(report);
    }

    fn add_polled(&mut self, r: PassReport) {
        add(&mut self.polled.counts, &r.counts);
        self.polled.failed_companies.extend(r.failed_companies);
        self.polled.failures.extend(r.failures);
        self.polled.woke |= r.woke;
        self.polled.passes += r.passes;
    }

    /// The routine polls' results since the last call, and how many polls they were.
    pub fn take_poll_report(&mut self) -> PassReport {
        std::mem::take(&mut self.polled)
    }

    pub fn has_pool(&self) -> bool {
        self.pool.is_some()
    }

    /// Keeps the books for one company's pass: recovered, failing, counts.
    fn record(
        &mut self,
        company: &str,
        k: PassKind,
        result: Result<(SyncCounts, bool), SyncError>,
        report: &mut PassReport,
    ) {
        report.passes += 1;
        match result {
            Ok((counts, woke)) => {
                if let Some((n, _)) = self.failing.remove(company) {
                    if n >= crate::health::FAILING_AFTER {
                        log::info!("company {company}: listing works again after {n} failures");
                    }
                    self.count_failing();
                }
                if k == PassKind::Recovery {
                    self.recovered.insert(company.to_owned());
                    if let Some(r) = &self.shared_recovered {
                        r.insert(company);
                    }
                    // The processor serves a company only once this pass is done: its jobs
                    // (held ones of a restored database too, which are not new) are work now.
                    report.woke = true;
                }
                report.woke |= woke;
                add(&mut report.counts, &counts);
            }
            Err(e) => {
                let refused = matches!(&e, SyncError::Pleo(p) if p.is_refusal());
                self.listing_failed(company, k, &e, refused);
                let transient = match &e {
                    SyncError::Pleo(p) => p.is_retryable(),
                    SyncError::Store(_) => true,
                };
                report
                    .failures
                    .push((company.to_owned(), e.to_string(), transient));
                report.failed_companies.push(company.to_owned());
            }
        }
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
                "Pleo refuses the credential: fix the key, or authorize the company again (polls go on)".to_owned()
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

    /// What a listing pass over one company needs, from this thread.
    pub(crate) fn lister(&self) -> listing::Lister<'_> {
        listing::Lister {
            store: &self.store,
            clients: &self.clients,
            clock: &self.clock,
            metrics: self.metrics.as_deref(),
            resume_unknown_in_progress: self.resume_unknown_in_progress,
            by_webhook: self.by_webhook,
        }
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
