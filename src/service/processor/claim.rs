//! Taking a company's next job: the oldest pending one is read again, checked for readiness,
//! and claimed with `started`, at most `claims_per_round_max` tries a round.
//!
//! Invariant: `started` is sent only for a job just read as `pending` and `new` here, after
//! its readiness check passed, with enough time left for the claim to land; a 422 is a
//! conflict (journaled, never retried for that job), and an answer lost on the way leaves the
//! job `claiming` until Pleo is asked what became of it.

use serde_json::json;

use crate::clock::Millis;
use crate::pleo::{JobEvent, JobEventKind};
use crate::service::processor::decide::{self, ClaimDecision};
use crate::service::processor::{Processor, RoundReport};
use crate::service::sync::pass::{PassKind, SyncError};
use crate::store::{EventKind, JobRow, ProcState, Source, StoreError};

/// What the company's own listing before a claim said of the candidate.
enum Confirmed {
    Oldest,
    Changed,
    Failed,
}

/// How a claim attempt ended.
enum Claim {
    Held(JobRow),
    /// Too close to the deadline for a claim to land: wait for it, then read again.
    Wait,
    Lost,
    Skipped,
    Failed,
}

impl Processor {
    pub(super) fn company_round(
        &mut self,
        company: &str,
        report: &mut RoundReport,
    ) -> Result<(), StoreError> {
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
            // A company paused or removed since the lane last looked takes nothing new,
            // whatever woke the lane.
            if !self.serves(company) {
                return Ok(());
            }
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
            if self.confirm_by_company && !self.clients.has_own(company) {
                match self.confirm_oldest(&candidate, report)? {
                    Confirmed::Oldest => {}
                    // An older job came to light, or this one left: take the oldest again.
                    Confirmed::Changed => continue,
                    Confirmed::Failed => {
                        self.pause(company, report);
                        return Ok(());
                    }
                }
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

    /// Listing by credential, the company's jobs came from a listing over many companies'
    /// pages, which may have shifted between pages and missed an older job. Before a claim
    /// the company is listed by itself (the same listing as a poll, one request for most
    /// companies), so the claim takes the oldest job Pleo lists for it.
    fn confirm_oldest(
        &mut self,
        candidate: &JobRow,
        report: &mut RoundReport,
    ) -> Result<Confirmed, StoreError> {
        let lister = crate::service::sync::listing::Lister {
            store: &self.store,
            clients: &self.clients,
            clock: &self.clock,
            metrics: self.metrics.as_deref(),
            resume_unknown_in_progress: false,
            by_webhook: false,
        };
        match lister.pass_company(&candidate.company_id, PassKind::Poll) {
            Ok(_) => {}
            Err(SyncError::Store(e)) => return Err(e),
            Err(SyncError::Pleo(e)) => {
                report.errors.push(format!(
                    "{}: listing before the claim: {e}",
                    candidate.company_id
                ));
                return Ok(Confirmed::Failed);
            }
        }
        Ok(match self.store.pick_next(&candidate.company_id)? {
            Some(oldest) if oldest.id == candidate.id => Confirmed::Oldest,
            _ => Confirmed::Changed,
        })
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
        // Time left on Pleo's clock (the fresh read just told us what it is).
        let (pleo_now, skew) = (
            self.pleo_now(&fresh.company_id),
            self.skew(&fresh.company_id),
        );
        match decide::claim(&fresh, pleo_now, skew, self.cfg.claim_min_left) {
            ClaimDecision::Skip { conflict } => {
                if conflict {
                    report.conflicts.push(fresh.id.clone());
                }
                return Ok(Claim::Skipped);
            }
            ClaimDecision::Wait {
                seconds_left,
                recheck_at,
            } => {
                // A claim could not land before the deadline. Nothing is decided for good: at
                // the deadline Pleo says whether it expired (journaled `expired`) or is still
                // pending (our clock was off: then it is claimed).
                self.store.journal(
                    now,
                    Some(&fresh.id),
                    Some(&fresh.company_id),
                    EventKind::ClaimDeferred,
                    json!({"seconds_left": seconds_left, "expires_at": fresh.expires_at.to_rfc3339(),
                           "claim_min_left_secs": self.cfg.claim_min_left.as_secs()}),
                )?;
                report.due(recheck_at);
                return Ok(Claim::Wait);
            }
            ClaimDecision::Claim => {}
        }
        // The readiness check and the read took time: the company may have been paused or
        // removed meanwhile.
        if !self.serves(&fresh.company_id) {
            return Ok(Claim::Wait);
        }
        self.store.begin_claim(&fresh, now)?;
        let event = JobEvent::new(JobEventKind::Started, &fresh.id);
        let client = self.clients.for_company(Some(&fresh.company_id));
        match client.post_event(&event) {
            Ok(()) => {
                // `started` refreshed lastUpdatedAt: the deadline is at least Pleo's time of
                // this answer (its Date is whole seconds) plus expiresIn, read back or not.
                let accepted_at = Millis(client.pleo_now().0 - 1000);
                self.store.event_accepted(&fresh.id, accepted_at)?;
                // Read back what Pleo now says (new lastUpdatedAt, so the new deadline). If
                // that read fails the claim still stands, with the deadline the claim gave.
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
}
