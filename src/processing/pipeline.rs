//! The processing stage: from a held job to a finished one, through a handler.
//!
//! Steps (the processor ran the readiness check before `started`, or before a resume): read
//! every job item and export item;
//! record the items in `job_items`; report results recorded earlier but not yet reported;
//! run the handler on the items that are open at Pleo and have no result; commit each result
//! as it arrives and report in batches of at most 100 (at 100 results or after
//! `flush_interval`); finish exactly once with `completed`, `completed_with_errors` or `failed`.
//!
//! Invariants: a result is committed before it is reported; an item reported `successful` is
//! never sent again; the handler never sees an item that already has a result; a handler that
//! stalls, or a job that would expire before it can finish, is stopped and the job failed with
//! `accounting_system_timeout` before its deadline; the job's handler time (`job_timeout`)
//! and failed runs (`attempts_max`) are counted in the database, across runs and restarts;
//! every result the handler delivers is committed whatever a report does; `started` is never
//! sent here.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;

use crate::clock::SharedClock;
use crate::pleo::{Clients, JobEventKind, PleoClient, PleoError};
use crate::processing::handler::HandlerSpec;
use crate::store::{JobRow, StoreError};

#[derive(Clone, Debug)]
pub struct PipelineConfig {
    /// Longest wait for the next result before the handler counts as stalled.
    pub item_timeout: Duration,
    /// Longest a handler may run for one job.
    pub job_timeout: Duration,
    /// Handler runs per job (crashes, garbage) before open items fail.
    pub attempts_max: u32,
    /// The wait after a run that crashed, before the next (doubling per run, at most 60 s).
    pub retry_backoff: Duration,
    /// Report results at least this often while the handler runs.
    pub flush_interval: Duration,
    /// Stop and fail the job when less than this is left before it expires.
    pub finish_margin: Duration,
    /// Journal a `deadline_warning` (once per deadline) when less than this is left, while the
    /// handler works too.
    pub deadline_warning: Duration,
    /// After reporting items, read the job again (for its deadline) only when the deadline as
    /// last read is less than this away.
    pub reread_within: Duration,
    pub check_timeout: Duration,
    /// Real-time cap on one wait for handler output (so a moved clock is noticed).
    pub wait_tick: Duration,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            item_timeout: Duration::from_secs(120),
            job_timeout: Duration::from_secs(3000),
            attempts_max: 3,
            retry_backoff: Duration::from_secs(5),
            flush_interval: Duration::from_secs(5),
            finish_margin: Duration::from_secs(120),
            deadline_warning: Duration::from_secs(600),
            reread_within: Duration::from_secs(720),
            check_timeout: Duration::from_secs(60),
            wait_tick: Duration::from_millis(50),
        }
    }
}

/// Milestones, for tests and the demo to wait on instead of sleeping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Milestone {
    HandlerStarted { job_id: String, items: usize },
    Finished { job_id: String, event: String },
}

/// Told, on the lane's own thread, when a handler run of a job starts (its handler is
/// running) and when it has ended, whatever ended it: `jobmirror replay` judges from here that
/// no job ever has two handler runs at once, and acts on the world while a run works.
pub trait RunWatch: Send + Sync {
    fn run_started(&self, job: &JobRow);
    fn run_ended(&self, job: &JobRow);
}

/// Tells the watch a run has ended when dropped (every way out of a run).
pub(crate) struct Watched(Option<(Arc<dyn RunWatch>, JobRow)>);

impl Watched {
    pub(crate) fn start(watch: Option<&Arc<dyn RunWatch>>, job: &JobRow) -> Watched {
        Watched(watch.map(|w| {
            w.run_started(job);
            (w.clone(), job.clone())
        }))
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if let Some((w, job)) = self.0.take() {
            w.run_ended(&job);
        }
    }
}

pub struct HandlerStage {
    pub(crate) clients: Arc<Clients>,
    pub(crate) clock: SharedClock,
    pub(crate) handler: HandlerSpec,
    pub(crate) cfg: PipelineConfig,
    pub(crate) milestones: Option<Sender<Milestone>>,
    pub(crate) health: Option<(Arc<crate::health::Progress>, Arc<crate::health::Metrics>)>,
    pub(crate) stopping: Option<Arc<crate::health::Stopping>>,
    /// The database whose service runs the handlers (marks their processes).
    pub(crate) marker_scope: Option<std::path::PathBuf>,
    /// Jobs whose last item report got an answer that may have been applied (a lost answer,
    /// a cut-off body, a 504): their items are read from Pleo before anything more is sent.
    pub(crate) read_items_first: std::sync::Mutex<std::collections::HashSet<String>>,
    pub(crate) watch: Option<Arc<dyn RunWatch>>,
}

impl HandlerStage {
    pub fn new(
        clients: Arc<Clients>,
        clock: SharedClock,
        handler: HandlerSpec,
        cfg: PipelineConfig,
    ) -> HandlerStage {
        HandlerStage {
            clients,
            clock,
            handler,
            cfg,
            milestones: None,
            health: None,
            stopping: None,
            marker_scope: None,
            read_items_first: Default::default(),
            watch: None,
        }
    }

    /// Marks handler processes with the job and `db`, so that a restarted service kills any
    /// handler of the same job left alive (its children included) before starting another.
    pub fn with_marker_scope(mut self, db: &std::path::Path) -> HandlerStage {
        self.marker_scope = Some(db.to_path_buf());
        self
    }

    pub(crate) fn client(&self, job: &JobRow) -> Arc<PleoClient> {
        self.clients.for_company(Some(&job.company_id))
    }

    /// A handler run is stopped (its results so far kept) once `stopping` is set.
    pub fn with_stopping(mut self, stopping: Arc<crate::health::Stopping>) -> HandlerStage {
        self.stopping = Some(stopping);
        self
    }

    /// Beats `progress` while a handler runs and counts its results in `metrics`.
    pub fn with_health(
        mut self,
        progress: Arc<crate::health::Progress>,
        metrics: Arc<crate::health::Metrics>,
    ) -> HandlerStage {
        self.health = Some((progress, metrics));
        self
    }

    /// Every handler run is told to `watch` as it starts and ends.
    pub fn with_watch(mut self, watch: Arc<dyn RunWatch>) -> HandlerStage {
        self.watch = Some(watch);
        self
    }

    pub fn with_milestones(mut self, tx: Sender<Milestone>) -> HandlerStage {
        self.milestones = Some(tx);
        self
    }

    pub(crate) fn note(&self, m: Milestone) {
        if let Some(tx) = &self.milestones {
            let _ = tx.try_send(m);
        }
    }
}

/// Why a run stopped before finishing; the job stays `processing` for the next round.
pub(crate) enum Pause {
    Pleo(PleoError),
    Store(StoreError),
    /// The service is stopping: the handler was stopped; the job resumes at the next start.
    Stopping,
}

impl From<StoreError> for Pause {
    fn from(e: StoreError) -> Self {
        Pause::Store(e)
    }
}
impl From<PleoError> for Pause {
    fn from(e: PleoError) -> Self {
        Pause::Pleo(e)
    }
}

/// How a job ends.
pub(crate) struct Finish {
    pub(crate) event: JobEventKind,
    pub(crate) failure_reason_type: Option<String>,
    pub(crate) failure_reason: Option<String>,
}
