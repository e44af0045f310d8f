//! The company's job in hand: an interrupted claim or hold is settled with Pleo (resumed
//! without `started`, or back to the queue), a held job is given to the stage, and its
//! deadline is tracked.
//!
//! Invariant: `started` is never sent from here; our clock may warn about a deadline, but only
//! a fresh read from Pleo ends a job.

use serde_json::json;

use crate::service::processor::decide::{self, Deadline, Interrupted, PastDeadline};
use crate::service::processor::{Processor, RoundReport};
use crate::store::{EventKind, JobRow, ProcState, StoreError};

impl Processor {
    /// Looks after the company's active job: resume it, hand it on, or track its deadline.
    pub(super) fn tend(&mut self, job: JobRow, report: &mut RoundReport) -> Result<(), StoreError> {
        // One owner in the process: only the lane holding the company touches its job.
        if !self.owners.take(&job.company_id, self.lane) {
            return Ok(());
        }
        match job.proc_state {
            ProcState::Resume | ProcState::Claiming => {
                // Ask Pleo first: a held job is resumed without `started`; an interrupted claim
                // that did not land goes back to the queue.
                let Some(fresh) = self.reread(&job, report)? else {
                    return Ok(());
                };
                let now = self.clock.now();
                match decide::interrupted(fresh.proc_state, &fresh.status) {
                    Interrupted::Resume => {
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
                    Interrupted::ClaimDidNotLand => {
                        self.store.transition(
                            &fresh,
                            ProcState::New,
                            now,
                            EventKind::ClaimFailed,
                            json!({"error": "claim interrupted; Pleo still says pending"}),
                        )?;
                        Ok(())
                    }
                    Interrupted::NoLongerInProgress => {
                        self.store.transition(
                            &fresh,
                            ProcState::New,
                            now,
                            EventKind::StatusChanged,
                            json!({"to": "pending", "note": "no longer in_progress"}),
                        )?;
                        Ok(())
                    }
                    Interrupted::Nothing => Ok(()),
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

    pub(super) fn track_deadline(
        &mut self,
        job: JobRow,
        report: &mut RoundReport,
    ) -> Result<(), StoreError> {
        let now = self.clock.now();
        match decide::deadline(&job, now, self.cfg.deadline_warning) {
            Deadline::Quiet { due } => report.due(due),
            Deadline::Warn { first, due } => {
                if first {
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
                report.due(due);
            }
            Deadline::AskPleo => {
                // Our clock says it has expired: only Pleo can say so. Read it; a job Pleo
                // still shows open is never abandoned on our clock's word.
                let fresh = self.reread(&job, report)?;
                match decide::past_deadline(fresh.as_ref(), now) {
                    PastDeadline::Ended { expired } => {
                        self.checked.remove(&job.id);
                        if expired {
                            report.expired.push(job.id.clone());
                        }
                    }
                    PastDeadline::Extended => {
                        if let Some(f) = fresh {
                            return self.track_deadline(f, report);
                        }
                    }
                    PastDeadline::StillOpen { first, due } => {
                        if let Some(f) = fresh.filter(|_| first) {
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
                        report.due(due);
                    }
                    PastDeadline::Unknown { due } => report.due(due),
                }
            }
        }
        Ok(())
    }
}
