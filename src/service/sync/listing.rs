//! One company's listing pass, in two halves: [`fetch`] (requests only, run by a listing pool
//! worker or the sync thread) and [`Lister::store_pass`] (the database, on the sync thread).

use std::collections::HashSet;

use serde_json::json;

use crate::clock::SharedClock;
use crate::pleo::{Clients, Listing, PleoError, status};
use crate::service::sync::pass::{PassKind, SyncError};
use crate::store::{EventKind, Source, Store, SyncCounts, Upsert};

/// What a listing pass needs.
pub struct Lister<'a> {
    pub store: &'a Store,
    pub clients: &'a Clients,
    pub clock: &'a SharedClock,
    pub metrics: Option<&'a crate::health::Metrics>,
    pub resume_unknown_in_progress: bool,
    /// The pass was prompted by a webhook (journaled as the jobs' `source`).
    pub by_webhook: bool,
}

/// One company's listing as fetched (on a pool worker or the sync thread), to store.
#[derive(Debug)]
pub struct Fetched {
    /// When the fetch began, and how long it took.
    pub at: crate::clock::Millis,
    pub took: std::time::Duration,
    pub listing: Result<Listing, PleoError>,
    /// Whether the `in_progress` jobs listed are all of them: one company's listing, or a
    /// credential listing whose `in_progress` part came in one page (one answer). A credential
    /// listing over several pages may have shifted between pages (Pleo does not say how its
    /// cursors behave when the result set changes), so it can miss a job: never complete.
    pub complete: bool,
}

/// Lists `company`'s eligible jobs for a `kind` pass (all pages). Only requests: no database,
/// so any thread can do it.
pub fn fetch(clients: &Clients, clock: &SharedClock, company: &str, kind: PassKind) -> Fetched {
    timed(clock, || {
        clients
            .for_company(Some(company))
            .list_jobs(company, statuses(kind))
    })
}

/// Lists the jobs of every company the default credential sees, for a `kind` pass (all pages,
/// no company named: see [`crate::service::sync::credential`]).
///
/// A recovery pass lists the `in_progress` jobs first, on their own: there are few (at most
/// one per company in hand somewhere), so they usually come in one page, one answer, which is
/// a complete observation of them ([`Fetched::complete`]); the `pending` jobs follow in a
/// listing of their own.
pub fn fetch_by_credential(clients: &Clients, clock: &SharedClock, kind: PassKind) -> Fetched {
    let client = clients.for_company(None);
    if kind != PassKind::Recovery {
        let mut f = timed(clock, || client.list_jobs_by_credential(statuses(kind)));
        f.complete = false;
        return f;
    }
    let mut held = timed(clock, || {
        client.list_jobs_by_credential(&[status::IN_PROGRESS])
    });
    let complete = matches!(&held.listing, Ok(l) if l.pages <= 1);
    let pending = timed(clock, || client.list_jobs_by_credential(&[status::PENDING]));
    held.took += pending.took;
    held.listing = match (held.listing, pending.listing) {
        (Ok(mut a), Ok(b)) => {
            a.jobs.extend(b.jobs);
            a.pages += b.pages;
            a.rejected.extend(b.rejected);
            Ok(a)
        }
        (Err(e), _) | (_, Err(e)) => Err(e),
    };
    held.complete = complete;
    held
}

/// Runs a listing, noting when it began and how long it took.
fn timed(clock: &SharedClock, list: impl FnOnce() -> Result<Listing, PleoError>) -> Fetched {
    let at = clock.now();
    let started = crate::clock::monotonic();
    let listing = list();
    Fetched {
        at,
        took: started.elapsed(),
        listing,
        complete: true,
    }
}

fn statuses(kind: PassKind) -> &'static [&'static str] {
    match kind {
        PassKind::Recovery => &[status::PENDING, status::IN_PROGRESS],
        PassKind::Poll | PassKind::Trigger => &[status::PENDING],
    }
}

impl Lister<'_> {
    /// One listing pass over `company` on this thread: [`fetch`], then [`Lister::store_pass`].
    pub fn pass_company(
        &self,
        company: &str,
        kind: PassKind,
    ) -> Result<(SyncCounts, bool), SyncError> {
        let fetched = fetch(self.clients, self.clock, company, kind);
        self.store_pass(company, kind, fetched)
    }

    /// Stores a fetched listing: a `sync_runs` row, the jobs upserted, open jobs that left the
    /// listing read again. Returns the counts and whether new work appeared.
    pub fn store_pass(
        &self,
        company: &str,
        kind: PassKind,
        fetched: Fetched,
    ) -> Result<(SyncCounts, bool), SyncError> {
        let run = self
            .store
            .begin_sync_run(company, kind.as_str(), fetched.at)?;
        let mut counts = SyncCounts::default();
        let started = crate::clock::monotonic();
        let result = match fetched.listing {
            Ok(listing) => self.store_listing(company, kind, listing, &mut counts),
            Err(e) => Err(e.into()),
        };
        if let Some(m) = self.metrics {
            m.poll_done(fetched.took + started.elapsed(), result.is_err());
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

    fn store_listing(
        &self,
        company: &str,
        kind: PassKind,
        listing: Listing,
        counts: &mut SyncCounts,
    ) -> Result<bool, SyncError> {
        let client = self.clients.for_company(Some(company));
        counts.pages = listing.pages;
        counts.seen = listing.jobs.len() as u32;
        for (id, error) in &listing.rejected {
            if let Some(m) = self.metrics {
                m.listing_entries_skipped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            // Once per entry: a poll finds it again every interval.
            if id.as_deref().is_some_and(|i| {
                self.store
                    .has_event(i, EventKind::ListingEntrySkipped)
                    .unwrap_or(false)
            }) {
                continue;
            }
            log::warn!(
                "listing for company {company}: skipped an entry that is not a usable job ({}): {error}",
                id.as_deref().map_or("no id".into(), |i| format!("{i:?}"))
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
            PassKind::Trigger => Source::Trigger,
            PassKind::Poll if self.by_webhook => Source::Webhook,
            PassKind::Poll => Source::Poll,
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
                    // Journaled once per change: a job held elsewhere stays `in_progress` off
                    // the pending listing poll after poll, and is re-read each time, but it left
                    // the listing once.
                    let before = self.store.job(&id)?.map(|r| r.status);
                    if before.as_deref() != Some(job.status.as_str()) {
                        self.store.journal(
                            now,
                            Some(&id),
                            Some(company),
                            EventKind::LeftListing,
                            json!({"status": job.status, "was": before}),
                        )?;
                    }
                    if self.store.upsert_job(&job, now, Source::Reread)? == Upsert::Changed {
                        counts.changed += 1;
                    }
                }
                Err(PleoError::Api { status: 404, .. }) => {
                    // Once, as above: not again while it stays gone.
                    let said = self.store.events(Some(&id))?.last().is_some_and(|e| {
                        e.kind == EventKind::LeftListing.as_str() && !e.detail["error"].is_null()
                    });
                    if said {
                        continue;
                    }
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
