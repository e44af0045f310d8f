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

use crate::clock::SharedClock;
use crate::pleo::{PleoClient, PleoError, status};
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
    /// New work for the processor appeared (a new pending job, or a job to resume).
    pub woke: bool,
}

pub struct Mirror {
    store: Store,
    client: Arc<PleoClient>,
    clock: SharedClock,
    companies: Vec<String>,
    recovered: HashSet<String>,
    resume_unknown_in_progress: bool,
    wake: Option<Sender<()>>,
}

impl Mirror {
    pub fn new(
        store: Store,
        client: Arc<PleoClient>,
        clock: SharedClock,
        companies: Vec<String>,
    ) -> Mirror {
        Mirror {
            store,
            client,
            clock,
            companies,
            recovered: HashSet::new(),
            resume_unknown_in_progress: false,
            wake: None,
        }
    }

    /// Where to signal new work (a bounded channel; a full one means a wake is already queued).
    pub fn with_wake(mut self, wake: Sender<()>) -> Mirror {
        self.wake = Some(wake);
        self
    }

    pub fn with_resume_unknown_in_progress(mut self, yes: bool) -> Mirror {
        self.resume_unknown_in_progress = yes;
        self
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Reads again every job named by a stored webhook delivery not handled yet (a webhook is
    /// a hint, never the truth), and marks each delivery with what was found. Returns how many
    /// deliveries were handled; stops at the first API failure (the rest wait for the next
    /// nudge or pass).
    pub fn process_deliveries(&mut self) -> Result<usize, SyncError> {
        let mut handled = 0;
        let mut woke = false;
        let result = loop {
            let batch = self.store.pending_deliveries(100)?;
            if batch.is_empty() {
                break Ok(handled);
            }
            let mut failed = None;
            let mut marks: Vec<(String, String)> = Vec::new();
            for d in batch {
                let known = d
                    .event_type
                    .as_deref()
                    .is_some_and(|t| crate::webhook::JOB_EVENT_TYPES.contains(&t));
                let outcome = match (&d.job_id, known) {
                    (None, _) => "ignored: names no job".to_owned(),
                    (Some(_), false) => format!(
                        "ignored: event type {:?}",
                        d.event_type.as_deref().unwrap_or("")
                    ),
                    (Some(id), true) => match self.client.get_job(id) {
                        Ok(job) if !self.companies.contains(&job.company_id) => {
                            format!("ignored: company {} is not served here", job.company_id)
                        }
                        Ok(job) => {
                            let up =
                                self.store
                                    .upsert_job(&job, self.clock.now(), Source::Webhook)?;
                            woke |= up == Upsert::New && job.status == status::PENDING;
                            format!("read: {}", job.status)
                        }
                        Err(PleoError::Api { status: 404, .. }) => {
                            "job not found at Pleo (404)".to_owned()
                        }
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    },
                };
                marks.push((d.webhook_id.clone(), outcome));
                handled += 1;
            }
            // One commit for the batch, also when it stopped at a failure.
            self.store.mark_deliveries(&marks, self.clock.now())?;
            if let Some(e) = failed {
                break Err(SyncError::Pleo(e));
            }
        };
        if woke && let Some(w) = &self.wake {
            let _ = w.try_send(());
        }
        result
    }

    /// One pass over every company. Companies not yet recovered get a recovery pass whatever
    /// `kind` says.
    pub fn pass(&mut self, kind: PassKind) -> PassReport {
        let mut report = PassReport::default();
        for company in self.companies.clone() {
            let k = if self.recovered.contains(&company) {
                kind
            } else {
                PassKind::Recovery
            };
            match self.pass_company(&company, k) {
                Ok((counts, woke)) => {
                    if k == PassKind::Recovery {
                        self.recovered.insert(company.clone());
                    }
                    report.woke |= woke;
                    add(&mut report.counts, &counts);
                }
                Err(e) => {
                    log::warn!("{} pass for company {company} failed: {e}", k.as_str());
                    report.failed_companies.push(company);
                }
            }
        }
        if report.woke
            && let Some(w) = &self.wake
        {
            let _ = w.try_send(());
        }
        report
    }

    fn pass_company(
        &mut self,
        company: &str,
        kind: PassKind,
    ) -> Result<(SyncCounts, bool), SyncError> {
        let now = self.clock.now();
        let run = self.store.begin_sync_run(company, kind.as_str(), now)?;
        let mut counts = SyncCounts::default();
        let result = self.list_and_store(company, kind, &mut counts);
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
        let listing = self.client.list_jobs(company, statuses)?;
        counts.pages = listing.pages;
        counts.seen = listing.jobs.len() as u32;
        // A job we hold was recorded (`claiming`) before its `started` was sent, so once the
        // database has history for the company an unknown `in_progress` job is someone
        // else's. Only a company's first pass (a new or lost database) may resume one.
        let source = if kind == PassKind::Recovery
            && self.resume_unknown_in_progress
            && !self.store.has_synced(company)?
        {
            Source::Recovery
        } else {
            Source::Poll
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
            match self.client.get_job(&id) {
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

/// The sync thread's loop: a recovery pass at once, then a poll every `interval`, or at once on
/// a trigger. Ends when `shutdown` is closed or sends.
pub fn run(
    mut mirror: Mirror,
    interval: std::time::Duration,
    trigger: Receiver<()>,
    nudge: Receiver<()>,
    shutdown: Receiver<()>,
) {
    /// After a failure to read webhook-named jobs, try again this soon (not at the next poll).
    const DELIVERY_RETRY: std::time::Duration = std::time::Duration::from_secs(2);
    let mut kind = PassKind::Recovery;
    let mut nudge = nudge;
    let deliveries = |mirror: &mut Mirror| match mirror.process_deliveries() {
        Ok(n) => {
            if n > 0 {
                log::debug!("read {n} jobs named by webhooks");
            }
            None
        }
        Err(e) => {
            log::warn!(
                "reading jobs named by webhooks failed: {e}; retrying in {} s",
                DELIVERY_RETRY.as_secs()
            );
            Some(crate::clock::monotonic() + DELIVERY_RETRY)
        }
    };
    let mut retry_at = deliveries(&mut mirror);
    loop {
        let report = mirror.pass(kind);
        log::info!(
            "{} pass: {} jobs seen, {} new, {} changed, {} re-read, {} pages{}",
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
        // Webhook nudges are handled without a listing pass; the poll timer keeps running.
        let next_poll = crate::clock::monotonic() + interval;
        'wait: loop {
            let now = crate::clock::monotonic();
            let left = next_poll.saturating_duration_since(now);
            let wait = retry_at.map_or(left, |r| left.min(r.saturating_duration_since(now)));
            select! {
                recv(shutdown) -> _ => return,
                recv(trigger) -> msg => {
                    if msg.is_err() { return; }
                    kind = PassKind::Trigger;
                    break 'wait;
                }
                recv(nudge) -> msg => {
                    if msg.is_err() {
                        // No webhook receiver (or it stopped): nothing will nudge again.
                        nudge = crossbeam_channel::never();
                        continue 'wait;
                    }
                    retry_at = deliveries(&mut mirror);
                }
                default(wait) => {
                    // A delivery retry fell due, or the poll did (deliveries first, then the pass).
                    retry_at = deliveries(&mut mirror);
                    if crate::clock::monotonic() >= next_poll {
                        kind = PassKind::Poll;
                        break 'wait;
                    }
                }
            }
        }
    }
}
