//! The processor's decisions as pure functions: what to do with a job given what Pleo last
//! said of it, the time on each clock and the configuration. No store, no client, no clock
//! is read here; the processor gathers the inputs, asks, and acts on the answer.
//!
//! Times: `now` is our (injected) clock, `pleo_now` is Pleo's clock as the company's client
//! last saw it, and `skew` is Pleo's clock minus ours in ms. Deadlines (`expires_at`) are on
//! Pleo's clock: Pleo decides when a job expires, so what is left is measured on its clock,
//! and a time we wait for is converted to ours.

use std::time::Duration;

use crate::clock::{Millis, ms};
use crate::store::{JobRow, ProcState};
use crate::wire::status;

/// What to do with the oldest pending job once it was read again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimDecision {
    /// It is no longer ours to take (not `pending`, or no longer `new` here); `conflict`
    /// when another integration took it.
    Skip { conflict: bool },
    /// A claim could not land before the deadline: wait until `recheck_at` (our clock, a
    /// second after Pleo's deadline) and read it again. Nothing is decided for good.
    Wait {
        seconds_left: i64,
        recheck_at: Millis,
    },
    /// Send `started`.
    Claim,
}

/// Decides whether a freshly read candidate is claimed. A job with no time left by Pleo's
/// clock is still claimed: only Pleo can say it expired (and a 422 then says so).
pub fn claim(
    fresh: &JobRow,
    pleo_now: Millis,
    skew: i64,
    claim_min_left: Duration,
) -> ClaimDecision {
    if fresh.status != status::PENDING || fresh.proc_state != ProcState::New {
        return ClaimDecision::Skip {
            conflict: fresh.proc_state == ProcState::Conflict,
        };
    }
    let left = pleo_now.until(fresh.expires_at);
    if left > 0 && left <= ms(claim_min_left) {
        return ClaimDecision::Wait {
            seconds_left: left / 1000,
            recheck_at: Millis(fresh.expires_at.0 - skew).plus(Duration::from_secs(1)),
        };
    }
    ClaimDecision::Claim
}

/// What a job whose claim or hold was interrupted (after a restart, or found `in_progress` by
/// recovery) becomes, once Pleo was asked about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interrupted {
    /// Pleo says `in_progress`: it is ours; resume it without sending `started` again.
    Resume,
    /// Our claim did not land (Pleo still says `pending`): back to the queue.
    ClaimDidNotLand,
    /// A job we were to resume is `pending` again at Pleo: back to the queue.
    NoLongerInProgress,
    /// Anything else (finished, expired): the store already moved it; nothing to do.
    Nothing,
}

pub fn interrupted(fresh_state: ProcState, fresh_status: &str) -> Interrupted {
    match (fresh_state, fresh_status) {
        (ProcState::Resume | ProcState::Claiming, status::IN_PROGRESS) => Interrupted::Resume,
        (ProcState::Claiming, status::PENDING) => Interrupted::ClaimDidNotLand,
        (ProcState::Resume, status::PENDING) => Interrupted::NoLongerInProgress,
        _ => Interrupted::Nothing,
    }
}

/// Where a held job stands against its deadline, by our clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deadline {
    /// Past it by our clock: only Pleo can say it expired; read it.
    AskPleo,
    /// Inside the warning window: warn (once per deadline, when `first`), next due at the
    /// deadline.
    Warn { first: bool, due: Millis },
    /// Nothing yet: next due when the warning window opens.
    Quiet { due: Millis },
}

pub fn deadline(job: &JobRow, now: Millis, warning: Duration) -> Deadline {
    if now >= job.expires_at {
        return Deadline::AskPleo;
    }
    let warn_at = Millis(job.expires_at.0 - ms(warning));
    if now >= warn_at {
        Deadline::Warn {
            first: job.warned_expires_at != Some(job.expires_at),
            due: job.expires_at,
        }
    } else {
        Deadline::Quiet { due: warn_at }
    }
}

/// What Pleo's answer means for a job past its deadline by our clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PastDeadline {
    /// It ended (done, failed, expired: `expired` says which).
    Ended { expired: bool },
    /// Pleo's deadline is later than we thought (an event refreshed it): track it again.
    Extended,
    /// Pleo still shows it open: never abandoned on our clock's word. Warn once (`first`),
    /// ask again at `due`.
    StillOpen { first: bool, due: Millis },
    /// Pleo could not be asked: try again at `due`.
    Unknown { due: Millis },
}

pub fn past_deadline(fresh: Option<&JobRow>, now: Millis) -> PastDeadline {
    match fresh {
        Some(f) if f.proc_state.is_final() => PastDeadline::Ended {
            expired: f.proc_state == ProcState::Expired,
        },
        Some(f) if f.expires_at > now => PastDeadline::Extended,
        Some(f) => PastDeadline::StillOpen {
            first: f.warned_expires_at != Some(f.expires_at),
            due: now.plus(Duration::from_secs(30)),
        },
        None => PastDeadline::Unknown {
            due: now.plus(Duration::from_secs(5)),
        },
    }
}

/// Whether a job whose readiness check fails is close enough to its deadline (Pleo's clock)
/// that it must be failed with the check's reason rather than left to expire.
pub fn within_fail_margin(deadline: Millis, pleo_now: Millis, margin: Duration) -> bool {
    pleo_now.until(deadline) <= ms(margin)
}

/// When a failed readiness check runs again (our clock): after `retry`, and in any case once
/// inside the failing margin before the deadline; at most 5 s from now once inside it.
pub fn readiness_retry_at(
    now: Millis,
    deadline: Millis,
    skew: i64,
    retry: Duration,
    margin: Duration,
) -> Millis {
    let retry_at = now.plus(retry);
    let last_chance = Millis(deadline.0 - ms(margin) - skew);
    if last_chance > now {
        retry_at.min(last_chance)
    } else {
        retry_at.min(now.plus(Duration::from_secs(5)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Millis = Millis(1_000_000_000_000);

    fn job(status: &str, state: ProcState, expires_at: Millis) -> JobRow {
        JobRow {
            id: "j1".into(),
            company_id: "c1".into(),
            status: status.into(),
            created_at: T0,
            last_updated_at: None,
            expires_at,
            number_of_items: 1,
            proc_state: state,
            claim_attempts: 0,
            warned_expires_at: None,
        }
    }

    #[test]
    fn a_pending_job_is_claimed_unless_too_close_to_its_deadline() {
        let min = Duration::from_secs(10);
        let j = job("pending", ProcState::New, T0.plus(Duration::from_secs(60)));
        assert_eq!(claim(&j, T0, 0, min), ClaimDecision::Claim);
        // 10 s left on Pleo's clock: wait for the deadline, on our clock (Pleo 2 s ahead).
        let j = job("pending", ProcState::New, T0.plus(Duration::from_secs(10)));
        assert_eq!(
            claim(&j, T0, 2_000, min),
            ClaimDecision::Wait {
                seconds_left: 10,
                recheck_at: Millis(T0.0 + 10_000 - 2_000 + 1_000)
            }
        );
        // Out of time by Pleo's clock: claimed all the same; Pleo decides.
        assert_eq!(claim(&j, T0.plus(min), 0, min), ClaimDecision::Claim);
        let taken = job("in_progress", ProcState::Conflict, T0);
        assert_eq!(
            claim(&taken, T0, 0, min),
            ClaimDecision::Skip { conflict: true }
        );
        let ours = job("pending", ProcState::Claimed, T0);
        assert_eq!(
            claim(&ours, T0, 0, min),
            ClaimDecision::Skip { conflict: false }
        );
    }

    #[test]
    fn an_interrupted_job_is_resumed_only_when_pleo_says_in_progress() {
        use Interrupted::*;
        assert_eq!(interrupted(ProcState::Resume, "in_progress"), Resume);
        assert_eq!(interrupted(ProcState::Claiming, "in_progress"), Resume);
        assert_eq!(interrupted(ProcState::Claiming, "pending"), ClaimDidNotLand);
        assert_eq!(
            interrupted(ProcState::Resume, "pending"),
            NoLongerInProgress
        );
        assert_eq!(interrupted(ProcState::Done, "completed"), Nothing);
        assert_eq!(interrupted(ProcState::Expired, "pending"), Nothing);
    }

    #[test]
    fn deadlines_warn_once_and_only_pleo_ends_a_job() {
        let w = Duration::from_secs(600);
        let exp = T0.plus(Duration::from_secs(3600));
        let mut j = job("in_progress", ProcState::Processing, exp);
        assert_eq!(
            deadline(&j, T0, w),
            Deadline::Quiet {
                due: Millis(exp.0 - 600_000)
            }
        );
        let late = Millis(exp.0 - 1);
        assert_eq!(
            deadline(&j, late, w),
            Deadline::Warn {
                first: true,
                due: exp
            }
        );
        j.warned_expires_at = Some(exp);
        assert_eq!(
            deadline(&j, late, w),
            Deadline::Warn {
                first: false,
                due: exp
            }
        );
        assert_eq!(deadline(&j, exp, w), Deadline::AskPleo);
        // Pleo's answer decides.
        assert_eq!(
            past_deadline(None, exp),
            PastDeadline::Unknown {
                due: exp.plus(Duration::from_secs(5))
            }
        );
        assert_eq!(
            past_deadline(Some(&j), exp),
            PastDeadline::StillOpen {
                first: false,
                due: exp.plus(Duration::from_secs(30))
            }
        );
        let refreshed = job("in_progress", ProcState::Processing, exp.plus(w));
        assert_eq!(past_deadline(Some(&refreshed), exp), PastDeadline::Extended);
        let gone = job("pending", ProcState::Expired, exp);
        assert_eq!(
            past_deadline(Some(&gone), exp),
            PastDeadline::Ended { expired: true }
        );
    }

    #[test]
    fn a_failing_readiness_check_runs_again_before_the_margin_closes() {
        let (retry, margin) = (Duration::from_secs(60), Duration::from_secs(180));
        let deadline = T0.plus(Duration::from_secs(3600));
        assert!(!within_fail_margin(deadline, T0, margin));
        assert!(within_fail_margin(
            deadline,
            Millis(deadline.0 - 180_000),
            margin
        ));
        assert_eq!(
            readiness_retry_at(T0, deadline, 0, retry, margin),
            T0.plus(retry)
        );
        // Four minutes left, Pleo 1 s behind us: the margin opens in one minute less 1 s.
        let now = Millis(deadline.0 - 240_000);
        assert_eq!(
            readiness_retry_at(now, deadline, -1_000, Duration::from_secs(600), margin),
            Millis(deadline.0 - 180_000 + 1_000)
        );
        // Already inside the margin: at most 5 s.
        let now = Millis(deadline.0 - 60_000);
        assert_eq!(
            readiness_retry_at(now, deadline, 0, retry, margin),
            now.plus(Duration::from_secs(5))
        );
    }
}
