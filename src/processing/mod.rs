//! Processing a held job: the handler protocol ([`handler`]: the accounting side, a child
//! process or the built-in `outbox:`/`dry-run`) and the pipeline that feeds it items, records
//! and reports results and finishes the job ([`pipeline`]).
//!
//! Files: `handler` (the protocol: readiness, start) with `child` (process groups, markers),
//! `output` (reading a handler's lines) and `outbox` (the built-in handlers' files);
//! `pipeline` (the stage's configuration and state) with `run` (its steps for one job),
//! `supervise` (one handler run: commit, count, stop) and `report` (item batches and the
//! finishing event). Dependencies run that way round: `run` uses `supervise` and `report`,
//! which use `pipeline`; `handler` uses `child`, `output` and `outbox`.
//!
//! The invariant: a result is committed before it is reported, a success Pleo acknowledged is
//! never sent again, and `started` is never sent here (claiming is the processor's). Depends
//! on the Pleo client, the store and the wire model.

pub mod child;
pub mod handler;
pub mod outbox;
pub mod output;
pub mod pipeline;
mod report;
mod run;
mod supervise;

use serde_json::json;

use crate::clock::{Millis, SharedClock};
use crate::pleo::{JobEvent, PleoError};
use crate::processing::handler::Readiness;
use crate::store::pg::Step;
use crate::store::{EventKind, JobRow, ProcState, Source, Store, StoreError};

/// What happens to a job once it is held: [`crate::processing::pipeline::HandlerStage`] in the service.
pub trait Stage: Send {
    /// Works on a held job (`claimed`, or `processing` after a restart or a pause). Returns
    /// when the job is finished, or when it must wait (it stays `processing` and comes back
    /// next round). Must move a `claimed` job on.
    fn process(&mut self, store: &Store, job: &JobRow, now: Millis) -> Result<(), StoreError>;

    /// The accounting side's readiness for this job: run before `started` is sent, and before
    /// a resumed job's items are touched. Sends nothing to Pleo.
    fn ready(&mut self, _store: &Store, _job: &JobRow) -> Result<Readiness, StoreError> {
        Ok(Readiness::Ready)
    }
}

/// Only records that the job is ready (`ready` in the journal, `processing` state) and holds
/// it: for tests of claiming and deadlines that need no handler.
#[derive(Debug, Default)]
pub struct ReadyStage;

impl Stage for ReadyStage {
    fn process(&mut self, store: &Store, job: &JobRow, now: Millis) -> Result<(), StoreError> {
        if job.proc_state != ProcState::Claimed {
            return Ok(());
        }
        store.transition(
            job,
            ProcState::Processing,
            now,
            EventKind::Ready,
            json!({"number_of_items": job.number_of_items}),
        )
    }
}

/// Sends a job's final event (`completed`, `completed_with_errors`, `failed`) and settles the
/// mirror: journals `finish_sent` (the event, its reason, and `detail`), reads the job back,
/// and marks it `done` whatever Pleo then says (a 422 means it was already finished or
/// expired: the read says how). The inner error is Pleo's answer when the event may not have
/// landed; nothing is journaled then, and the caller decides when to try again.
pub fn send_final(
    client: &crate::pleo::PleoClient,
    store: &Store,
    clock: &SharedClock,
    job: &JobRow,
    event: &JobEvent,
    mut detail: serde_json::Value,
) -> Result<Result<(), PleoError>, StoreError> {
    let name = event.event.as_str();
    // Sent at most this often when each answer is lost and a read says the job is still open.
    const SENDS_MAX: u32 = 3;
    let mut sends = 0;
    let mut read_back = false;
    loop {
        sends += 1;
        // On a shared database, only under this instance's lease, recorded before it is sent.
        let intent = json!({"event": name, "send": sends});
        store.fenced_step(&job.company_id, &job.id, Step::Finish, &intent)?;
        match client.post_event(event) {
            Ok(()) => break,
            Err(e) if e.is_status_conflict() => {
                log::warn!(
                    "job {}: Pleo refused `{name}` (422); reading the job again",
                    job.id
                );
                break;
            }
            Err(e) if e.is_unapplied() || !e.is_retryable() => return Ok(Err(e)),
            Err(e) => {
                // A lost answer or a 504: it may have landed. Read the job before anything
                // else, never repeat the event blindly.
                log::warn!(
                    "job {}: the answer to `{name}` was lost ({e}); reading the job before sending it again",
                    job.id
                );
                let fresh = match client.get_job(&job.id) {
                    Ok(f) => f,
                    Err(read) => {
                        log::warn!(
                            "job {}: reading it after a lost answer failed: {read}",
                            job.id
                        );
                        return Ok(Err(e));
                    }
                };
                store.upsert_job(&fresh, clock.now(), Source::Reread)?;
                if crate::pleo::status::is_terminal(&fresh.status) {
                    detail["outcome"] = json!("read after a lost answer");
                    read_back = true;
                    break;
                }
                if sends >= SENDS_MAX {
                    return Ok(Err(e));
                }
            }
        }
    }
    detail["event"] = json!(name);
    detail["failure_reason_type"] = json!(event.failure_reason_type);
    detail["failure_reason"] = json!(event.failure_reason);
    store.journal(
        clock.now(),
        Some(&job.id),
        Some(&job.company_id),
        EventKind::FinishSent,
        detail,
    )?;
    if !read_back {
        match client.get_job(&job.id) {
            Ok(fresh) => {
                store.upsert_job(&fresh, clock.now(), Source::Reread)?;
            }
            Err(e) => log::warn!("job {}: could not read it back after `{name}`: {e}", job.id),
        }
    }
    // Whatever Pleo said, jobmirror is done with this job.
    if let Some(row) = store.job(&job.id)?.filter(|r| !r.proc_state.is_final()) {
        store.transition(
            &row,
            ProcState::Done,
            clock.now(),
            EventKind::Finished,
            json!({"event": name}),
        )?;
    }
    Ok(Ok(()))
}
