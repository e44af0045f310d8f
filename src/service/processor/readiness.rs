//! The readiness check before `started` (and before a resumed job's items are touched): a
//! failing check is journaled once per job and reason and tried again later, and a job that
//! would expire first is failed with the check's reason instead of left to expire silently.
//!
//! Invariant: no job event is sent for a job that is not ready, except `failed` inside the
//! failing margin before its deadline, measured on Pleo's clock after reading the job again.

use std::time::Duration;

use serde_json::json;

use crate::pleo::{JobEvent, JobEventKind};
use crate::processing::handler::Readiness;
use crate::service::processor::decide::{self};
use crate::service::processor::{NotReadyHold, Processor, RoundReport, send_final};
use crate::store::{EventKind, JobRow, ProcState, StoreError};

impl Processor {
    /// Whether `job`'s failed readiness check is not due to run again yet.
    pub(super) fn waits_for_readiness(&self, job: &JobRow, report: &mut RoundReport) -> bool {
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
    pub(super) fn check_ready(
        &mut self,
        job: &JobRow,
        report: &mut RoundReport,
    ) -> Result<bool, StoreError> {
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
        let margin = self.cfg.not_ready_fail_margin;
        let mut deadline = job.expires_at;
        if decide::within_fail_margin(deadline, self.pleo_now(&job.company_id), margin) {
            match self.reread(job, report)? {
                Some(fresh)
                    if fresh.status == job.status
                        && (fresh.proc_state == ProcState::New || fresh.proc_state.is_active()) =>
                {
                    deadline = fresh.expires_at;
                    if decide::within_fail_margin(deadline, self.pleo_now(&job.company_id), margin)
                    {
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
        // Try again after `readiness_retry`, and in any case once inside the failing margin
        // (the hold is timed by our clock).
        let until = decide::readiness_retry_at(
            now,
            deadline,
            self.skew(&job.company_id),
            self.cfg.readiness_retry,
            margin,
        );
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
    pub(super) fn fail_not_ready(
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
        if let Err(e) = send_final(&client, &self.store, &self.clock, job, &event, detail)? {
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
}
