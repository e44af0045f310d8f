//! The sync thread: mirrors Pleo's job listings into `export_jobs`.
//!
//! Invariants: detection never changes anything at Pleo (this module only issues GETs); every
//! pass over a company leaves one `sync_runs` row, with its error if it failed; an open job
//! that left the listing is read again so the mirror stays true; a company is polled for
//! `pending` only after a recovery pass (`pending` and `in_progress`) has succeeded for it.

use std::collections::HashSet;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, select};
use serde_json::json;

use crate::clock::{Millis, SharedClock};
use crate::pleo::{Clients, PleoError, status};
use crate::store::{EventKind, Source, Store, StoreError, SyncCounts, Upsert};

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

/// When each company is next due for a listing pass. Each company gets its own offset within
/// the interval (from a hash of its id), and each pass lands within 5% of one interval after
/// the previous, so a thousand companies poll evenly spread instead of all at once. Times are
/// milliseconds on any monotonic scale the caller uses.
#[derive(Clone, Debug)]
pub struct PollSchedule {
    interval_ms: i64,
    due: std::collections::BTreeMap<String, (i64, u64)>,
}

fn mix(company: &str, n: u64) -> u64 {
    // FNV-1a then a splitmix finaliser: a stable, well-spread number per (company, pass).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in company.bytes().chain(n.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^ (h >> 31)
}

impl PollSchedule {
    /// First polls spread over `[start, start + interval)`.
    pub fn new(companies: &[String], interval: std::time::Duration, start_ms: i64) -> Self {
        let interval_ms = (interval.as_millis() as i64).max(1);
        let due = companies
            .iter()
            .map(|c| {
                let offset = (mix(c, 0) % interval_ms as u64) as i64;
                (c.clone(), (start_ms + offset, 0))
            })
            .collect();
        PollSchedule { interval_ms, due }
    }

    /// Companies due at `now_ms`, in due order.
    pub fn due(&self, now_ms: i64) -> Vec<String> {
        let mut d: Vec<(&i64, &String)> = self
            .due
            .iter()
            .filter(|(_, (t, _))| *t <= now_ms)
            .map(|(c, (t, _))| (t, c))
            .collect();
        d.sort();
        d.into_iter().map(|(_, c)| c.clone()).collect()
    }

    /// The company was polled at `now_ms`: its next pass is one interval (±5%) after its due time.
    pub fn done(&mut self, company: &str, now_ms: i64) {
        let interval = self.interval_ms;
        if let Some((t, n)) = self.due.get_mut(company) {
            *n += 1;
            let span = (interval / 10).max(1) as u64;
            let jitter = (mix(company, *n) % span) as i64 - span as i64 / 2;
            // Never in the past: a late pass (a long outage) does not cause a burst of catch-ups.
            *t = (*t + interval + jitter).max(now_ms + interval / 2);
        }
    }

    pub fn next_due(&self) -> Option<i64> {
        self.due.values().map(|(t, _)| *t).min()
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
            companies,
            recovered: HashSet::new(),
            shared_recovered: None,
            resume_unknown_in_progress: true,
            wake: Vec::new(),
            metrics: None,
            stopping: None,
            failing: std::collections::HashMap::new(),
        }
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

    /// Acts on every stored webhook delivery not handled yet. Pleo: "when the event is
    /// received, proceed to step 2": an export-job delivery triggers its company's detection,
    /// the same listing as a poll (a recovery pass if the company has none yet), so the oldest
    /// eligible job is taken whatever announced it. A batch of deliveries costs one listing per
    /// company. The body is only a hint: the company it names picks the listing (if it names
    /// none, or one not served here, the named job is read to learn its company), and only
    /// what Pleo lists is acted on. Each delivery is marked with what happened; a failure
    /// marks that company's deliveries (the next poll lists it again) and never holds up the
    /// others. Returns how many deliveries were handled.
    pub fn process_deliveries(&mut self) -> Result<usize, SyncError> {
        let mut handled = 0;
        let mut detected_any = false;
        loop {
            if self.stopping() {
                break;
            }
            let now = self.clock.now();
            let batch = self.store.pending_deliveries(100, now)?;
            if batch.is_empty() {
                break;
            }
            let mut marks: Vec<(String, String)> = Vec::new();
            let mut deferred: Vec<(String, String, Millis)> = Vec::new();
            // company -> (webhook id, attempts, named job) of the deliveries that trigger its
            // detection.
            let mut by_company: std::collections::BTreeMap<String, Vec<(String, u32, String)>> =
                std::collections::BTreeMap::new();
            for d in batch {
                if self.stopping() {
                    break;
                }
                handled += 1;
                let known = d
                    .event_type
                    .as_deref()
                    .is_some_and(crate::edge::webhook::is_job_event);
                let id = match (&d.job_id, known) {
                    (None, _) => {
                        marks.push((d.webhook_id, "ignored: names no job".to_owned()));
                        continue;
                    }
                    (Some(_), false) => {
                        let t = d.event_type.as_deref().unwrap_or("").to_owned();
                        marks.push((d.webhook_id, format!("ignored: event type {t:?}")));
                        continue;
                    }
                    (Some(id), true) => id.clone(),
                };
                let company = match d.company_id.filter(|c| self.companies.contains(c)) {
                    Some(c) => c,
                    None => match self.clients.for_company(None).get_job(&id) {
                        Ok(job) if self.companies.contains(&job.company_id) => job.company_id,
                        Ok(job) => {
                            let why =
                                format!("ignored: company {} is not served here", job.company_id);
                            marks.push((d.webhook_id, why));
                            continue;
                        }
                        Err(PleoError::Api { status: 404, .. }) => {
                            marks.push((d.webhook_id, "job not found at Pleo (404)".to_owned()));
                            continue;
                        }
                        Err(e) => {
                            let what = format!("reading job {id} to learn its company: {e}");
                            let at = self.clock.now();
                            end_or_defer(
                                &mut marks,
                                &mut deferred,
                                at,
                                (&d.webhook_id, d.attempts),
                                what,
                                e.is_retryable(),
                            );
                            continue;
                        }
                    },
                };
                by_company
                    .entry(company)
                    .or_default()
                    .push((d.webhook_id, d.attempts, id));
            }
            for (company, deliveries) in by_company {
                let report = self.pass_companies(PassKind::Poll, std::slice::from_ref(&company));
                let failure = report.failures.into_iter().next();
                // Retries count from when this attempt ended (its own retries take time).
                let failed_at = self.clock.now();
                detected_any |= failure.is_none();
                for (webhook_id, attempts, job_id) in deliveries {
                    match &failure {
                        Some((_, e, transient)) => {
                            let what = format!("detection for company {company}: {e}");
                            end_or_defer(
                                &mut marks,
                                &mut deferred,
                                failed_at,
                                (&webhook_id, attempts),
                                what,
                                *transient,
                            );
                        }
                        None => {
                            let outcome = match self.store.job(&job_id)? {
                                Some(j) => format!(
                                    "detection: company listed; the named job is {}",
                                    j.status
                                ),
                                None => "detection: company listed; the named job is not listed as open (yet): polls find it".to_owned(),
                            };
                            marks.push((webhook_id, outcome));
                        }
                    }
                }
            }
            // One commit for the ended deliveries, one for the deferred.
            self.store.mark_deliveries(&marks, self.clock.now())?;
            if !deferred.is_empty() {
                self.store.defer_deliveries(&deferred)?;
            }
        }
        // A webhook also means "check again now" for a readiness check that failed.
        if detected_any {
            self.wake_processors();
        }
        Ok(handled)
    }

    /// How long until the earliest deferred delivery falls due (None: none waits).
    pub fn delivery_retry_in(&self) -> Result<Option<std::time::Duration>, SyncError> {
        let now = self.clock.now();
        Ok(self
            .store
            .next_delivery_retry()?
            .map(|at| std::time::Duration::from_millis((at.0 - now.0).max(0) as u64)))
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
        self.count_failing();
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

/// Webhook-named jobs are read at most this often while deliveries keep coming (a single
/// delivery after a quiet spell is read at once).
/// A delivery's action (its company's detection, or the read that learns the company) is
/// tried at most this many times when it fails transiently (429, 5xx, no answer), waiting
/// [`delivery_backoff`] between attempts (5, 10, 20, 40 s: about 75 s in all); then the
/// delivery ends with what the last attempt met, and the company's polls cover it.
pub const DELIVERY_ATTEMPTS: u32 = 5;

/// The wait after the `failures`-th failed attempt at a delivery's action (0-based).
pub fn delivery_backoff(failures: u32) -> std::time::Duration {
    std::time::Duration::from_secs(5 << failures.min(4))
}

/// Ends a delivery whose action failed, or defers it when trying again may help: transient
/// failures are tried again up to [`DELIVERY_ATTEMPTS`]; a refusal (401, 403, another 4xx)
/// ends it at once. Each delivery fails on its own schedule: no delivery waits for another.
fn end_or_defer(
    marks: &mut Vec<(String, String)>,
    deferred: &mut Vec<(String, String, Millis)>,
    now: Millis,
    (webhook_id, attempts): (&str, u32),
    what: String,
    transient: bool,
) {
    let attempt = attempts + 1;
    if transient && attempt < DELIVERY_ATTEMPTS {
        let wait = delivery_backoff(attempts);
        deferred.push((
            webhook_id.to_owned(),
            format!(
                "attempt {attempt} of {DELIVERY_ATTEMPTS} failed: {what}; trying again in {} s",
                wait.as_secs()
            ),
            now.plus(wait),
        ));
    } else if transient {
        marks.push((
            webhook_id.to_owned(),
            format!(
                "not acted on after {attempt} attempts: {what}; the next poll lists the company again"
            ),
        ));
    } else {
        marks.push((
            webhook_id.to_owned(),
            format!(
                "not acted on: {what} (refused: not retried); the next poll lists the company again"
            ),
        ));
    }
}

const COALESCE: std::time::Duration = std::time::Duration::from_millis(5);

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

/// The sync thread's loop: a recovery pass over every company at once, then each company's
/// polls on a [`PollSchedule`] (spread over the interval), everything at once on a trigger,
/// and the detection webhooks trigger whenever the event thread nudges. Ends when `shutdown` is
/// closed or sends. Beats `progress` at least every [`TICK`].
pub fn run(
    mut mirror: Mirror,
    interval: std::time::Duration,
    trigger: Receiver<()>,
    nudge: Receiver<()>,
    shutdown: Receiver<()>,
    progress: Option<Arc<crate::health::Progress>>,
) {
    /// After the database failed while acting on deliveries, try again this soon.
    const DELIVERY_RETRY: std::time::Duration = std::time::Duration::from_secs(2);
    let origin = crate::clock::monotonic();
    let ms = || origin.elapsed().as_millis() as i64;
    let tick = progress.as_ref().map_or(TICK, |p| p.tick());
    let beat = || {
        if let Some(p) = &progress {
            p.beat();
        }
    };
    let mut nudge = nudge;
    // Returns when to act on deliveries again: a deferred delivery's retry, or soon after a
    // failure of the database.
    let deliveries = |mirror: &mut Mirror| match mirror.process_deliveries() {
        Ok(n) => {
            if n > 0 {
                log::debug!("acted on {n} webhook deliveries");
            }
            match mirror.delivery_retry_in() {
                Ok(wait) => wait.map(|w| ms() + w.as_millis() as i64),
                Err(_) => Some(ms() + DELIVERY_RETRY.as_millis() as i64),
            }
        }
        Err(e) => {
            log::warn!(
                "acting on webhook deliveries failed: {e}; retrying in {} s",
                DELIVERY_RETRY.as_secs()
            );
            Some(ms() + DELIVERY_RETRY.as_millis() as i64)
        }
    };
    beat();
    let all = mirror.companies.clone();
    // Recovery first: stored webhooks are acted on only after it (and the processor serves a
    // company only once its recovery pass has completed).
    let report = mirror.pass(PassKind::Recovery);
    log_pass(PassKind::Recovery, all.len(), &report);
    let mut retry_at = deliveries(&mut mirror);
    let mut last_pass = ms();
    let mut schedule = PollSchedule::new(&all, interval, ms());
    loop {
        beat();
        let now = ms();
        let next = schedule.next_due().unwrap_or(now + tick.as_millis() as i64);
        let next = retry_at.map_or(next, |r| next.min(r));
        let wait = std::time::Duration::from_millis((next - now).max(0) as u64).min(tick);
        select! {
            recv(shutdown) -> _ => return,
            recv(trigger) -> msg => {
                if msg.is_err() { return; }
                beat();
                let report = mirror.pass(PassKind::Trigger);
                log_pass(PassKind::Trigger, all.len(), &report);
                // "Check now" also means: run failed readiness checks again now.
                mirror.wake_processors();
                let now = ms();
                for c in &all {
                    schedule.done(c, now);
                }
            }
            recv(nudge) -> msg => {
                if msg.is_err() {
                    // No webhook receiver (or it stopped): nothing will nudge again.
                    nudge = crossbeam_channel::never();
                    continue;
                }
                // Under a stream of webhooks, read them in batches: each pass ends in one write
                // transaction, and the event thread needs the same write lock for every commit.
                let since = ms() - last_pass;
                if since < COALESCE.as_millis() as i64 {
                    let at = last_pass + COALESCE.as_millis() as i64;
                    retry_at = Some(retry_at.map_or(at, |r| r.min(at)));
                    continue;
                }
                last_pass = ms();
                retry_at = deliveries(&mut mirror);
            }
            default(wait) => {
                // A delivery retry fell due, or some companies' polls did (deliveries first).
                if retry_at.is_some_and(|r| r <= ms()) {
                    last_pass = ms();
                    retry_at = deliveries(&mut mirror);
                }
                let due = schedule.due(ms());
                if !due.is_empty() {
                    // Companies whose recovery failed get it again with their poll.
                    let report = mirror.pass_companies(PassKind::Poll, &due);
                    log_pass(PassKind::Poll, due.len(), &report);
                    let now = ms();
                    for c in &due {
                        schedule.done(c, now);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thousand_companies_are_spread_over_the_interval_and_stay_spread() {
        let companies: Vec<String> = (0..1000).map(|i| format!("company-{i:04}")).collect();
        let interval = std::time::Duration::from_secs(300);
        let mut s = PollSchedule::new(&companies, interval, 0);
        // Count passes per 10 s bucket over an hour, polling every second.
        let mut buckets = vec![0u32; 360];
        let mut per_company = std::collections::HashMap::new();
        for now in (0..3_600_000).step_by(1000) {
            let due = s.due(now);
            buckets[(now / 10_000) as usize] += due.len() as u32;
            for c in due {
                *per_company.entry(c.clone()).or_insert(0) += 1;
                s.done(&c, now);
            }
        }
        // Even spread: 1000 companies / 300 s = 33 per 10 s.
        let max = *buckets.iter().max().unwrap();
        let min = *buckets.iter().min().unwrap();
        assert!(max <= 66 && min >= 10, "min {min}, max {max} per 10 s");
        assert_eq!(per_company.len(), 1000);
        assert!(
            per_company.values().all(|n| (11..=13).contains(n)),
            "about 12 passes each"
        );
    }
}
