//! Handler runs in a replay, judged where the handler starts and ends, and the world acting on
//! a run while it works.
//!
//! Every lane's handler runs are told to a [`HandlerWatch`]: two runs of one job at once is a
//! violation, whatever lanes and companies did to bring it about. While a `while_handler_runs`
//! plan waits, a lane's round runs on a thread of its own; at a run's start that thread hands
//! the driver the turn and waits, so operators' company changes, Pleo's clock and the other
//! lanes act while the run is in the middle of its work. Only one thread moves at a time: a
//! replay stays deterministic.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

use super::*;
use crate::processing::pipeline::RunWatch;
use crate::replay::snapshot::{CompanyChange, CompanyOp};
use crate::service::processor::RoundReport;
use crate::store::JobRow;

/// The longest a plan moves Pleo's clock on into a job's warning window (the lane is busy
/// that long: other jobs of its companies wait, as they would).
const WARNING_ADVANCE_MAX: Duration = Duration::from_secs(600);

thread_local! {
    /// Set on the thread that runs a lane's round while a plan waits.
    static LANE_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// What happens while the next matching handler run works (a timeline entry).
#[derive(Clone, Debug)]
pub(super) struct RunPlan {
    pub job_id: Option<String>,
    pub ops: Vec<CompanyOp>,
    pub into_warning: bool,
}

/// A run moved into its job's warning window: by the time its round ends, the journal must
/// hold a `deadline_warning` of the job (this one, or one for the same deadline before).
pub(super) struct WarningDue {
    job_id: String,
    deadline: Millis,
    journal_seq: i64,
}

pub(super) struct HandlerWatch {
    /// Runs in progress, by job.
    active: Mutex<HashMap<String, u32>>,
    violations: Arc<Mutex<Vec<String>>>,
    /// Set while a plan waits: a lane's thread then hands over at each run's start.
    armed: AtomicBool,
    started: Sender<String>,
    resume: Receiver<()>,
}

impl RunWatch for HandlerWatch {
    fn run_started(&self, job: &JobRow) {
        let runs = {
            let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
            let n = active.entry(job.id.clone()).or_insert(0);
            *n += 1;
            *n
        };
        if runs > 1 {
            let v = format!(
                "two handler runs of job {} at once (company {}): {runs} running",
                job.id, job.company_id
            );
            let mut all = self.violations.lock().unwrap_or_else(|p| p.into_inner());
            if !all.contains(&v) {
                all.push(v);
            }
        }
        if self.armed.load(Ordering::SeqCst)
            && LANE_THREAD.with(Cell::get)
            && self.started.send(job.id.clone()).is_ok()
        {
            let _ = self.resume.recv();
        }
    }

    fn run_ended(&self, job: &JobRow) {
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = active.get_mut(&job.id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                active.remove(&job.id);
            }
        }
    }
}

/// The driver's side of the hand-over.
pub(super) struct RunTurns {
    pub watch: Arc<HandlerWatch>,
    started: Receiver<String>,
    resume: Sender<()>,
    pub plans: Vec<RunPlan>,
    pub warnings_due: Vec<WarningDue>,
}

impl RunTurns {
    pub(super) fn new(violations: Arc<Mutex<Vec<String>>>) -> RunTurns {
        let (started_tx, started) = bounded(1);
        let (resume, resume_rx) = bounded(1);
        RunTurns {
            watch: Arc::new(HandlerWatch {
                active: Mutex::new(HashMap::new()),
                violations,
                armed: AtomicBool::new(false),
                started: started_tx,
                resume: resume_rx,
            }),
            started,
            resume,
            plans: Vec::new(),
            warnings_due: Vec::new(),
        }
    }
}

pub(super) fn lock(lane: &Mutex<Processor>) -> std::sync::MutexGuard<'_, Processor> {
    lane.lock().unwrap_or_else(|p| p.into_inner())
}

impl Replay {
    /// A timeline's `while_handler_runs`: waits for the next matching run.
    pub(super) fn plan_run(&mut self, plan: RunPlan) {
        self.turns.plans.push(plan);
        self.turns.watch.armed.store(true, Ordering::SeqCst);
    }

    /// One round of lane `i`. While a plan waits, on a thread of its own, and every handler run
    /// that starts in it hands the driver the turn until the plan's work is done.
    pub(super) fn lane_round(&mut self, i: usize) -> anyhow::Result<RoundReport> {
        let lane = self.running.as_ref().expect("running").lanes[i].clone();
        if self.turns.plans.is_empty() {
            return Ok(lock(&lane).round());
        }
        let (done_tx, done_rx) = bounded(1);
        let thread = std::thread::Builder::new()
            .name("jm-replay-lane".into())
            .spawn(move || {
                LANE_THREAD.with(|l| l.set(true));
                let report = lock(&lane).round();
                let _ = done_tx.send(report);
            })?;
        let started = self.turns.started.clone();
        let mut failed = None;
        let report = loop {
            crossbeam_channel::select! {
                recv(started) -> job => {
                    if let Ok(job) = job
                        && let Err(e) = self.while_handler_runs(&job)
                    {
                        failed.get_or_insert(e);
                    }
                    // The lane goes on whatever happened here: it must not wait forever.
                    let _ = self.turns.resume.send(());
                }
                recv(done_rx) -> r => break r,
            }
        };
        let _ = thread.join();
        self.turns
            .watch
            .armed
            .store(!self.turns.plans.is_empty(), Ordering::SeqCst);
        self.check_warnings_due();
        if let Some(e) = failed {
            return Err(e);
        }
        report.map_err(|_| anyhow::anyhow!("lane {i}'s round ended without a report (a panic)"))
    }

    /// The plan waiting for `job_id`'s run, if any, done while the run waits at its start.
    fn while_handler_runs(&mut self, job_id: &str) -> anyhow::Result<()> {
        let Some(pos) = self
            .turns
            .plans
            .iter()
            .position(|p| p.job_id.as_deref().is_none_or(|j| j == job_id))
        else {
            return Ok(());
        };
        let plan = self.turns.plans.remove(pos);
        self.summary.acted_on_runs += 1;
        let company = self
            .fake
            .job(job_id)
            .map(|j| j.company_id)
            .unwrap_or_default();
        for op in &plan.ops {
            let c = op.company_id.clone().unwrap_or_else(|| company.clone());
            match op.op {
                CompanyChange::Pause => self.company_paused(&c, true)?,
                CompanyChange::Resume => self.company_paused(&c, false)?,
                CompanyChange::Remove => self.company_removed(&c)?,
                CompanyChange::Add => self.company_added(&c, false)?,
            }
        }
        if plan.into_warning {
            self.advance_into_warning(job_id)?;
        }
        // Every other lane takes a round (the run's own lane is busy: its lock is held).
        let lanes = self
            .running
            .as_ref()
            .map(|r| r.lanes.clone())
            .unwrap_or_default();
        for lane in lanes {
            if let Ok(mut p) = lane.try_lock() {
                let report = p.round();
                self.summary.resumed += report.resumed.len() as u64;
            }
        }
        Ok(())
    }

    /// Pleo's clock moves on until less than `deadline_warning_secs` remain for the job as
    /// jobmirror knows its deadline (not more than [`WARNING_ADVANCE_MAX`]).
    fn advance_into_warning(&mut self, job_id: &str) -> anyhow::Result<()> {
        let store = Store::open_read_only(&self.opts.db)?;
        let Some(job) = store.job(job_id)? else {
            return Ok(());
        };
        let warning = self.cfg.pipeline.deadline_warning;
        // Two seconds past: jobmirror reads Pleo's clock from whole-second `Date` headers.
        let target = Millis(job.expires_at.0 - warning.as_millis() as i64 + 2000);
        let now = self.base.now();
        if target <= now || now.until(target) > WARNING_ADVANCE_MAX.as_millis() as i64 {
            return Ok(());
        }
        let journal_seq: i64 =
            store
                .conn()
                .query_row("SELECT coalesce(max(seq), 0) FROM job_events", [], |r| {
                    r.get(0)
                })?;
        self.base.set(target);
        self.turns.warnings_due.push(WarningDue {
            job_id: job_id.to_owned(),
            deadline: job.expires_at,
            journal_seq,
        });
        Ok(())
    }

    /// Each run moved into its warning window has had its `deadline_warning` journaled (while
    /// it worked, or for the same deadline before).
    fn check_warnings_due(&mut self) {
        if self.turns.warnings_due.is_empty() {
            return;
        }
        let Ok(store) = Store::open_read_only(&self.opts.db) else {
            return;
        };
        for due in std::mem::take(&mut self.turns.warnings_due) {
            let journaled: rusqlite::Result<i64> = store.conn().query_row(
                "SELECT count(*) FROM job_events WHERE job_id = ?1 AND kind = 'deadline_warning' \
                 AND (seq > ?2 OR json_extract(detail, '$.expires_at') = ?3)",
                rusqlite::params![due.job_id, due.journal_seq, due.deadline.to_rfc3339()],
                |r| r.get(0),
            );
            if journaled.is_ok_and(|n| n == 0) {
                self.violate(format!(
                    "job {}'s handler worked with less than deadline_warning_secs left before its deadline {} and no deadline_warning was journaled",
                    due.job_id,
                    due.deadline.to_rfc3339()
                ));
            }
        }
    }

    /// Lane `i` takes the company lists sent to it (an idle lane's loop takes them at once).
    pub(super) fn drain_lane(&mut self, i: usize) {
        let Some(r) = &self.running else { return };
        let mut p = lock(&r.lanes[i]);
        while let Ok(list) = r.lane_rx[i].try_recv() {
            p.set_companies(list);
        }
    }
}
