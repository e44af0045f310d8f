//! Watching one handler run: its results committed as they arrive, reported in batches, its
//! time counted against the job's budget, and the run ended at the first of: every item
//! answered, the handler's exit, its end of output, a stall, the budget, or the job's deadline.
//!
//! Invariant: every result the handler delivers is committed before anything else is done
//! about it; a report that fails pauses reporting, never the recording.

use std::time::Duration;

use crossbeam_channel::RecvTimeoutError;
use serde_json::{Value, json};

use crate::clock::Millis;
use crate::processing::output::HandlerMsg;
use crate::processing::pipeline::{HandlerStage, Milestone, Pause};
use crate::store::pg::Step;
use crate::store::{EventKind, ItemResult, JobRow, Store};

impl HandlerStage {
    /// The finish margin is reached by the deadline as last known: before the job is failed
    /// for want of time, Pleo is asked again (a job event of ours, or its item reports, may
    /// have refreshed `lastUpdatedAt`). True when the deadline moved past the margin; a failed
    /// read leaves the deadline as it was (never older than our last accepted event's).
    fn deadline_moved(
        &self,
        store: &Store,
        job: &JobRow,
        deadline: &mut Millis,
    ) -> Result<bool, Pause> {
        let fresh = match self.client(job).get_job(&job.id) {
            Ok(fresh) => fresh,
            Err(e) => {
                log::warn!(
                    "job {}: its deadline is near and it could not be read again: {e}",
                    job.id
                );
                return Ok(false);
            }
        };
        store.upsert_job(&fresh, self.clock.now(), crate::store::Source::Reread)?;
        let known = store
            .job(&job.id)?
            .map_or(fresh.expires_at(), |j| j.expires_at);
        let moved = known > *deadline;
        *deadline = (*deadline).max(known);
        let margin = Millis(deadline.0 - self.cfg.finish_margin.as_millis() as i64);
        Ok(moved && self.client(job).pleo_now() < margin)
    }

    /// Journals the `deadline_warning` for `deadline` (`pleo_now` on Pleo's clock).
    fn warn_deadline(
        &self,
        store: &Store,
        job: &JobRow,
        deadline: Millis,
        pleo_now: Millis,
    ) -> Result<(), Pause> {
        let row = JobRow {
            expires_at: deadline,
            ..job.clone()
        };
        store.warn_deadline(&row, self.clock.now())?;
        log::warn!(
            "job {} of company {} expires at {deadline} ({} s left) while its handler works",
            job.id,
            job.company_id,
            pleo_now.until(deadline) / 1000
        );
        Ok(())
    }

    /// One handler run over `items`. The run ends when every item has a result, when the
    /// handler process exits (what it wrote is read to the end, and its process group is
    /// killed, so a child holding its pipes cannot keep the run open), at its end of output,
    /// or at a limit. Every result the handler delivers is committed before anything else is
    /// done about it, whatever a report does; a report that fails transiently pauses
    /// reporting, never the recording.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run_handler(
        &mut self,
        store: &Store,
        job: &JobRow,
        raw: &Value,
        items: Vec<Value>,
        attempt: u32,
        deadline: &mut Millis,
    ) -> Result<RunEnd, Pause> {
        /// After the handler exited: the longest wait for the end of its output.
        const AFTER_EXIT: Duration = Duration::from_secs(5);
        /// After every item was answered: the longest wait for the handler to exit.
        const EXIT_GRACE: Duration = Duration::from_secs(5);
        /// After killing the handler: the longest wait for what it wrote before.
        const AFTER_KILL: Duration = Duration::from_secs(1);
        /// Handler time is written to the database at least this often (a crash of the
        /// service loses at most this much of the job's budget).
        const BUDGET_EVERY_MS: i64 = 1000;
        let n = items.len();
        let job_limit = crate::clock::ms(self.cfg.job_timeout);
        let (used_before, _) = store.handler_budget(&job.id)?;
        if used_before >= job_limit {
            let reason = self.over_budget(used_before);
            store.journal(
                self.clock.now(),
                Some(&job.id),
                Some(&job.company_id),
                EventKind::HandlerTimedOut,
                json!({"attempt": attempt, "reason": reason, "handler_ms": used_before}),
            )?;
            return Ok(RunEnd::TimedOut(reason));
        }
        // On a shared database, only under this instance's lease, recorded before it starts.
        let intent = json!({"attempt": attempt, "items": n});
        store.fenced_step(&job.company_id, &job.id, Step::Run, &intent)?;
        let started = self.clock.now();
        let marker = self
            .marker_scope
            .as_ref()
            .map(|db| crate::processing::handler::handler_marker(db, &job.id));
        let mut running = match self.handler.start_marked(raw, items, marker.as_deref()) {
            Ok(r) => r,
            Err(e) => {
                store.add_handler_budget(&job.id, 0, true)?;
                store.journal(
                    started,
                    Some(&job.id),
                    Some(&job.company_id),
                    EventKind::HandlerFailed,
                    json!({"attempt": attempt, "error": format!("cannot start: {e}")}),
                )?;
                return Ok(RunEnd::Crashed);
            }
        };
        log::info!(
            "job {}: handler started for {n} items (run {attempt})",
            job.id
        );
        self.note(Milestone::HandlerStarted {
            job_id: job.id.clone(),
            items: n,
        });
        let _watched = crate::processing::pipeline::Watched::start(self.watch.as_ref(), job);
        let mut run = RunState {
            last_progress: started,
            last_progress_real: crate::clock::monotonic(),
            garbage: 0,
            answered: 0,
            first_unflushed: None,
            unreported: store.item_counts(&job.id)?.unreported,
            counted: started,
            used: used_before,
            report_retry: None,
            report_backoff: self.cfg.flush_interval.max(Duration::from_secs(1)),
        };
        let mut exited_at: Option<std::time::Instant> = None;
        // The deadline a warning was journaled for (the stored one, read as the run starts).
        let mut warned = store.job(&job.id)?.and_then(|j| j.warned_expires_at);
        let end = loop {
            if self.stopping.as_ref().is_some_and(|s| s.is_set()) {
                // The job stays `processing`: the next start resumes it without `started`.
                running.kill();
                self.drain_to_end(store, job, &mut running, &mut run, AFTER_KILL)?;
                self.count_time(store, job, &mut run, false)?;
                return Err(Pause::Stopping);
            }
            // A shared database: a lease lost (this process was paused past it) stops the run;
            // the company's new holder resumes the job.
            if store
                .fence()
                .is_some_and(|v| v.may_act(&job.company_id).is_none())
            {
                running.kill();
                self.drain_to_end(store, job, &mut running, &mut run, AFTER_KILL)?;
                self.count_time(store, job, &mut run, false)?;
                log::warn!(
                    "job {}: this instance lost company {}'s lease; handler stopped",
                    job.id,
                    job.company_id
                );
                return Err(Pause::Store(crate::store::StoreError::LeaseLost(
                    job.company_id.clone(),
                )));
            }
            let now = self.clock.now();
            // Limits first: the job must not expire silently. Its deadline is Pleo's, so it is
            // measured on Pleo's clock (a host clock that is off never ends a job early).
            let pleo_now = self.client(job).pleo_now();
            let margin = Millis(deadline.0 - self.cfg.finish_margin.as_millis() as i64);
            if pleo_now >= margin && !self.deadline_moved(store, job, deadline)? {
                break Some(format!(
                    "the handler could not finish before the job's deadline ({} left)",
                    secs(pleo_now.until(*deadline))
                ));
            }
            // The deadline warning, from the same clock and deadline as the margin: once per
            // deadline, while the handler works as between runs.
            let warn_at = Millis(deadline.0 - self.cfg.deadline_warning.as_millis() as i64);
            if pleo_now >= warn_at && warned != Some(*deadline) {
                warned = Some(*deadline);
                self.warn_deadline(store, job, *deadline, pleo_now)?;
            }
            if run.used + run.counted.until(now).max(0) >= job_limit {
                break Some(self.over_budget(run.used + run.counted.until(now).max(0)));
            }
            // A stall is judged on what the handler said, not on when this thread last read
            // it: results already waiting (the lane was held up by a slow report, say) are
            // progress. It is judged on the clock (tests and replays move it), and confirmed by
            // a little real time without a result: a clock that jumps while the handler works
            // is not a handler that stopped answering.
            if now.until(run.last_progress) <= -(self.cfg.item_timeout.as_millis() as i64)
                && running.messages.is_empty()
                && run.last_progress_real.elapsed() >= STALL_CONFIRM
            {
                break Some(format!(
                    "the handler gave no result for {} s (per-item limit)",
                    self.cfg.item_timeout.as_secs()
                ));
            }
            if let Some((p, _)) = &self.health {
                p.beat();
            }
            let msg = match running.messages.recv_timeout(self.cfg.wait_tick) {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => Some(HandlerMsg::Eof),
            };
            let mut pending = Vec::new();
            let mut eof = false;
            if let Some(m) = msg {
                eof |= absorb(m, &mut pending, &mut run.garbage, &job.id);
                // Take everything already waiting, up to a batch.
                while pending.len() < 100 && !eof {
                    match running.messages.try_recv() {
                        Ok(m) => eof |= absorb(m, &mut pending, &mut run.garbage, &job.id),
                        Err(_) => break,
                    }
                }
            }
            self.record(store, job, &pending, &mut run)?;
            let now = self.clock.now();
            // Counted here rather than queried: a query per message would scan the job's items.
            let due = run
                .first_unflushed
                .is_some_and(|t| now.until(t) <= -(self.cfg.flush_interval.as_millis() as i64));
            let may_report = run.report_retry.is_none_or(|t| now >= t);
            if may_report && (run.unreported >= 100 || (run.unreported > 0 && due)) {
                match self.flush(store, job, deadline, 100) {
                    Ok(()) => {
                        run.report_retry = None;
                        run.report_backoff = self.cfg.flush_interval.max(Duration::from_secs(1));
                    }
                    Err(Pause::Pleo(e)) => {
                        // Whatever the handler delivered meanwhile is committed first.
                        self.drain_to_end(store, job, &mut running, &mut run, Duration::ZERO)?;
                        if !e.is_retryable() {
                            running.kill();
                            self.drain_to_end(store, job, &mut running, &mut run, AFTER_KILL)?;
                            self.count_time(store, job, &mut run, false)?;
                            return Err(Pause::Pleo(e));
                        }
                        log::warn!(
                            "job {}: reporting results failed ({e}); results are still recorded, reporting again in {} s",
                            job.id,
                            run.report_backoff.as_secs()
                        );
                        run.report_retry = Some(self.clock.now().plus(run.report_backoff));
                        run.report_backoff = (run.report_backoff * 2).min(Duration::from_secs(60));
                    }
                    Err(other) => return Err(other),
                }
                run.unreported = store.item_counts(&job.id)?.unreported;
                run.first_unflushed = (run.unreported > 0).then(|| self.clock.now());
            }
            if self.clock.now().until(run.counted) <= -BUDGET_EVERY_MS {
                self.count_time(store, job, &mut run, false)?;
            }
            if eof || run.answered >= n {
                break None;
            }
            match exited_at {
                None if running.exited() => {
                    // The handler is gone; a child it left may hold its stdout. Kill the
                    // group: the output it wrote is still read, then the pipe ends.
                    running.kill();
                    exited_at = Some(std::time::Instant::now());
                }
                Some(t) if t.elapsed() >= AFTER_EXIT => break None,
                _ => {}
            }
        };
        match end {
            Some(reason) => {
                running.kill();
                self.drain_to_end(store, job, &mut running, &mut run, AFTER_KILL)?;
                self.count_time(store, job, &mut run, false)?;
                log::warn!("job {}: stopping the handler: {reason}", job.id);
                store.journal(
                    self.clock.now(),
                    Some(&job.id),
                    Some(&job.company_id),
                    EventKind::HandlerTimedOut,
                    json!({"attempt": attempt, "reason": reason, "handler_ms": run.used}),
                )?;
                Ok(RunEnd::TimedOut(reason))
            }
            None => {
                let exit = running.finish(EXIT_GRACE);
                self.drain_to_end(store, job, &mut running, &mut run, Duration::ZERO)?;
                let left = store.todo_items(&job.id)?.len();
                self.count_time(store, job, &mut run, left > 0)?;
                let garbage = run.garbage;
                if left == 0 && exit.is_ok() && garbage == 0 {
                    Ok(RunEnd::AllAnswered)
                } else if left == 0 {
                    // Every item answered; an odd exit is only worth a journal line.
                    store.journal(self.clock.now(), Some(&job.id), Some(&job.company_id), EventKind::HandlerFailed, json!({"attempt": attempt, "exit": exit.err(), "garbage_lines": garbage, "items_left": 0}))?;
                    Ok(RunEnd::AllAnswered)
                } else {
                    log::warn!(
                        "job {}: handler run {attempt} ended with {left} items unanswered",
                        job.id
                    );
                    store.journal(self.clock.now(), Some(&job.id), Some(&job.company_id), EventKind::HandlerFailed, json!({"attempt": attempt, "exit": exit.err(), "garbage_lines": garbage, "items_left": left}))?;
                    Ok(RunEnd::Crashed)
                }
            }
        }
    }

    pub(crate) fn over_budget(&self, used_ms: i64) -> String {
        format!(
            "the handler ran {} for this job in all (runs and restarts together), over the per-job limit of {} s",
            secs(used_ms),
            self.cfg.job_timeout.as_secs()
        )
    }

    /// Commits `results` (those naming open items of the job) and counts them.
    pub(crate) fn record(
        &self,
        store: &Store,
        job: &JobRow,
        results: &[ItemResult],
        run: &mut RunState,
    ) -> Result<(), Pause> {
        if results.is_empty() {
            return Ok(());
        }
        let now = self.clock.now();
        let recorded = store.record_results(&job.id, results, now)?;
        if let Some((_, m)) = &self.health {
            for r in results
                .iter()
                .filter(|r| recorded.contains(&r.accounting_entry_id))
            {
                m.handler_result(r.successful);
            }
        }
        if !recorded.is_empty() {
            run.last_progress = now;
            run.last_progress_real = crate::clock::monotonic();
            run.first_unflushed.get_or_insert(now);
            run.unreported += recorded.len() as i64;
            run.answered += recorded.len();
        }
        if recorded.len() < results.len() {
            log::warn!(
                "job {}: {} results named unknown or already answered items; ignored",
                job.id,
                results.len() - recorded.len()
            );
        }
        Ok(())
    }

    /// Commits what the handler wrote, up to the end of its output or `within` (after its
    /// group was killed the end comes at once, the writers being dead; `ZERO`: only what is
    /// already waiting).
    pub(crate) fn drain_to_end(
        &self,
        store: &Store,
        job: &JobRow,
        running: &mut crate::processing::handler::Running,
        run: &mut RunState,
        within: Duration,
    ) -> Result<(), Pause> {
        let until = std::time::Instant::now() + within;
        let mut pending = Vec::new();
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            match running.messages.recv_timeout(left) {
                Ok(m) => {
                    if absorb(m, &mut pending, &mut run.garbage, &job.id) {
                        break;
                    }
                    if pending.len() >= 100 {
                        self.record(store, job, &pending, run)?;
                        pending.clear();
                    }
                }
                Err(_) => break,
            }
        }
        self.record(store, job, &pending, run)
    }

    /// Adds the handler time since the last count to the job's budget in the database.
    pub(crate) fn count_time(
        &self,
        store: &Store,
        job: &JobRow,
        run: &mut RunState,
        failed_run: bool,
    ) -> Result<(), Pause> {
        let now = self.clock.now();
        let ms = run.counted.until(now).max(0);
        store.add_handler_budget(&job.id, ms, failed_run)?;
        run.used += ms;
        run.counted = now;
        Ok(())
    }
}

/// Takes one handler message; true at the end of its output.
pub(crate) fn absorb(
    m: HandlerMsg,
    pending: &mut Vec<ItemResult>,
    garbage: &mut u32,
    job_id: &str,
) -> bool {
    match m {
        HandlerMsg::Result(r) => pending.push(r),
        HandlerMsg::Garbage(line) => {
            *garbage += 1;
            log::warn!("job {job_id}: handler printed something that is not a result: {line}");
        }
        HandlerMsg::Eof => return true,
    }
    false
}

/// Real time without a result that confirms a stall the clock shows (see the loop).
const STALL_CONFIRM: Duration = Duration::from_secs(1);

/// What one handler run keeps track of.
pub(crate) struct RunState {
    last_progress: Millis,
    /// The same moment on monotonic time: a stall also needs [`STALL_CONFIRM`] of real time.
    last_progress_real: std::time::Instant,
    garbage: u32,
    /// Results of this run committed (new ones only).
    answered: usize,
    first_unflushed: Option<Millis>,
    unreported: i64,
    /// Handler time is counted in the budget up to here.
    counted: Millis,
    /// The job's handler time in all, as counted so far (ms).
    used: i64,
    /// Reporting paused after a failure until then.
    report_retry: Option<Millis>,
    report_backoff: Duration,
}

pub(crate) enum RunEnd {
    AllAnswered,
    Crashed,
    TimedOut(String),
}

pub(crate) fn secs(ms: i64) -> String {
    format!("{} s", ms / 1000)
}
