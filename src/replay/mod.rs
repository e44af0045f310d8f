//! `jobmirror replay`: plays a [`Snapshot`] offline. The real mirror, webhook edge and
//! processor (built by [`Workers::build`], the code the service runs on its threads) are
//! driven step by step on a virtual clock against an in-process fake Pleo seeded from the
//! snapshot, as fast as the machine allows; after every step the invariants are checked.
//!
//! Invariants: one thread at a time makes API requests, so the fake sees them in one order
//! and a replay is deterministic (the event thread only commits what the driver hands it, and
//! the driver waits for the commit; a lane's round run on a thread of its own hands the driver
//! the turn and waits, see `runs`); nothing here decides anything about jobs, the workers do;
//! Pleo's clock never moves backwards (a clock jump moves only jobmirror's view of it).

mod companies;
pub mod draws;
mod invariants;
mod rng;
mod runs;
mod seams;
pub mod simulate;
pub mod snapshot;
mod summary;
mod timeline;

pub use summary::*;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, bounded};
use serde::Serialize;
use serde_json::Value;

use crate::clock::{Clock, ManualClock, Millis, OffsetClock, SharedClock};
use crate::config::Config;
use crate::edge::httpd::{Handler, Head, Request};
use crate::edge::webhook::WebhookReceiver;
use crate::replay::snapshot::{Event, Snapshot};
use crate::sandbox::{ClaimRecord, Claimant, FakeConfig, FakeJob, FakePleo, LoggedRequest};
use crate::service::Workers;
use crate::service::processor::Processor;
use crate::service::sync::schedule::PollSchedule;
use crate::service::sync::{Mirror, PassKind};
use crate::store::Store;

/// The longest the processor waits between rounds when nothing is due (as in the service).
const IDLE_ROUND: Duration = Duration::from_secs(60);
/// Rounds in one step at most (a round that keeps asking for another at once is cut here).
const ROUNDS_PER_STEP_MAX: u32 = 50;
/// Steps in one replay at most: a timeline that never settles is an error, not a hang.
const STEPS_MAX: u64 = 1_000_000;

#[derive(Clone, Debug)]
pub struct ReplayOptions {
    /// The database to create (it must not exist yet).
    pub db: PathBuf,
    /// The handler, as `handler_command` spells it (default `dry-run`).
    pub handler: String,
    /// Stop at the first invariant violation.
    pub stop_on_violation: bool,
}

impl ReplayOptions {
    pub fn new(db: PathBuf) -> ReplayOptions {
        ReplayOptions {
            db,
            handler: "dry-run".into(),
            stop_on_violation: false,
        }
    }
}

/// The workers while jobmirror "runs".
struct Running {
    mirror: Mirror,
    /// Each lane's processor; locked by whoever runs its round (see `runs`).
    lanes: Vec<Arc<Mutex<Processor>>>,
    /// Lanes that were busy when a company list came: their loop takes a wake first.
    late_list: Vec<bool>,
    edge: Option<Edge>,
    nudge: Receiver<()>,
    /// Pleo (base) times. `None`: the start-up recovery pass is still to do.
    schedule: Option<PollSchedule>,
    deliveries_due: Option<Millis>,
    next_round: Millis,
    trigger: bool,
    /// Company changes, sent as the service's reload sends them (see `companies`).
    reload: crate::service::reload::Reloadable,
    lane_rx: Vec<Receiver<Vec<String>>>,
    sync_rx: Receiver<crate::service::sync::run::CompanyList>,
}

struct Edge {
    receiver: WebhookReceiver,
    shutdown: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Edge {
    fn drop(&mut self) {
        drop(self.shutdown.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A webhook waiting to be delivered (the sender retries while jobmirror is down).
struct Delivery {
    webhook_id: String,
    request: Request,
}

/// What the "no job left to expire" invariant remembers between steps.
#[derive(Default)]
struct ExpiryWatch {
    /// When the service last started (base time): what it knew before does not count.
    service_started: Option<Millis>,
    /// When the readiness check last started to pass again after an outage.
    accounting_up_since: Option<Millis>,
    /// Per company, the last listing Pleo answered cleanly (base time).
    listed: HashMap<String, Millis>,
    /// Jobs pending, their company's oldest, no other integration's job in progress, at
    /// every step since (base time): eligible as far as a listing would show.
    visible_since: HashMap<String, Millis>,
    /// Of those, listed to us since, no job of the company in progress: claimable since.
    claimable_since: HashMap<String, Millis>,
    /// Stored webhooks already counted in `listed`.
    acked_seen: usize,
}

pub struct Replay {
    snap: Snapshot,
    opts: ReplayOptions,
    start: Millis,
    end: Millis,
    base: Arc<ManualClock>,
    clock: Arc<OffsetClock>,
    fake: FakePleo,
    /// The snapshot's configuration, and `cfg`: it merged with the database's companies (what
    /// runs).
    base_cfg: Config,
    cfg: Config,
    /// Companies whose tokens the customer revoked (until authorized again).
    revoked: HashSet<String>,
    /// Companies whose customer revoked access at some point (their pair may be refused).
    revoked_ever: HashSet<String>,
    pairs: companies::Pairs,
    running: Option<Running>,
    restart_at: Option<Millis>,
    crash_after_step: Option<f64>,
    next_event: usize,
    waiting: VecDeque<Delivery>,
    acked: Vec<String>,
    acked_checked: usize,
    /// (when, the company its body names) of each webhook stored: a trigger of detection.
    acked_companies: Vec<(Millis, String)>,
    /// While set, the readiness check fails (an `accounting_down` window); `started` then is a
    /// violation.
    accounting_down: Arc<std::sync::atomic::AtomicBool>,
    accounting_up_at: Option<Millis>,
    /// The `outbox:` directory of a snapshot with `accounting_down` windows.
    outbox: Option<PathBuf>,
    requests_checked: usize,
    claims_checked: usize,
    reported: HashMap<(String, String), u32>,
    started_seen: HashMap<String, u32>,
    expiry_watch: ExpiryWatch,
    violations: Arc<Mutex<Vec<String>>>,
    /// Handler runs, watched; plans that act while one works.
    turns: runs::RunTurns,
    summary: Summary,
    _lock: crate::store::DbLock,
}

impl Replay {
    /// Sets the world up: the fake seeded from the snapshot at its start time, the database.
    pub fn new(snap: Snapshot, opts: ReplayOptions) -> anyhow::Result<Replay> {
        if opts.db.exists() {
            anyhow::bail!(
                "{} already exists; a replay writes a fresh database",
                opts.db.display()
            );
        }
        let lock = crate::store::DbLock::acquire(&opts.db).map_err(|e| anyhow::anyhow!(e))?;
        let start = snap.start_millis()?;
        let base = ManualClock::new(start);
        let clock = OffsetClock::new(base.clone());
        let base_shared: SharedClock = base.clone();
        let fake = FakePleo::start(
            "127.0.0.1:0",
            FakeConfig {
                api_keys: if snap.api_keys.is_empty() {
                    vec!["replay-key".into()]
                } else {
                    snap.api_keys.clone()
                },
                expires_in_secs: snap.expires_in.unwrap_or(3600),
                seed: snap.seed,
            },
            base_shared,
        )?;
        for job in &snap.jobs {
            fake.add_job(job.clone())?;
        }
        let has_secret = snap.service.contains_key("webhook_secret");
        let has_webhooks = snap
            .timeline
            .iter()
            .any(|s| matches!(s.event, Event::Webhook { .. }));
        if has_webhooks && !has_secret {
            anyhow::bail!("the timeline has webhooks but service.webhook_secret is not set");
        }
        // Accounting outages need a handler whose readiness the replay controls.
        let outbox = snap
            .timeline
            .iter()
            .any(|s| matches!(s.event, Event::AccountingDown { .. }))
            .then(|| {
                let mut p = opts.db.as_os_str().to_owned();
                p.push("-outbox");
                PathBuf::from(p)
            });
        let handler = match &outbox {
            Some(dir) => format!("outbox:{}", dir.display()),
            None => opts.handler.clone(),
        };
        let mut overrides = vec![
            ("db", opts.db.display().to_string()),
            ("pleo_base_url", fake.base_url()),
            ("company_ids", snap.companies.join(",")),
            ("handler_command", handler),
        ];
        overrides.extend(companies::credential_settings(&snap, &fake, &opts.db)?);
        if has_secret {
            // Never bound: the replay hands requests to the receiver itself.
            overrides.push(("webhook_listen", "127.0.0.1:9".into()));
        }
        let env = companies::setting_env(&snap, &overrides);
        let cfg = Config::load_with(None, &|k| env.get(k).cloned())
            .map_err(|e| anyhow::anyhow!("snapshot service settings: {e}"))?;
        let end = start.plus(Duration::from_secs_f64(
            snap.end(cfg.poll_interval.as_secs_f64()),
        ));
        let violations = Arc::new(Mutex::new(Vec::new()));
        let summary = Summary {
            description: snap.description.clone(),
            ..Summary::default()
        };
        let replay = Replay {
            snap,
            opts,
            start,
            end,
            base,
            clock,
            fake,
            base_cfg: cfg.clone(),
            cfg,
            revoked: HashSet::new(),
            revoked_ever: HashSet::new(),
            pairs: companies::Pairs::default(),
            running: None,
            restart_at: Some(start),
            crash_after_step: None,
            next_event: 0,
            waiting: VecDeque::new(),
            acked: Vec::new(),
            acked_companies: Vec::new(),
            accounting_down: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            accounting_up_at: None,
            outbox,
            acked_checked: 0,
            requests_checked: 0,
            claims_checked: 0,
            reported: HashMap::new(),
            started_seen: HashMap::new(),
            expiry_watch: ExpiryWatch::default(),
            turns: runs::RunTurns::new(violations.clone()),
            violations,
            summary,
            _lock: lock,
        };
        Ok(replay)
    }

    /// The fake Pleo of this replay (tests look at its log).
    pub fn fake(&self) -> &FakePleo {
        &self.fake
    }

    pub fn db(&self) -> &std::path::Path {
        &self.opts.db
    }

    /// Runs to the end of the timeline; `after_step` sees the replay after every step.
    pub fn run(
        &mut self,
        after_step: &mut dyn FnMut(&Replay) -> anyhow::Result<()>,
    ) -> anyhow::Result<Summary> {
        let mut now = self.start;
        let mut stopped = false;
        loop {
            self.base.set(now.max(self.base.now()));
            // A restart due now comes first: events at the same moment meet a running service.
            if self.running.is_none() && self.restart_at.is_some_and(|t| t <= self.base.now()) {
                self.start_service()?;
            }
            self.apply_events()?;
            if self.running.is_some() {
                self.service_step()?;
            }
            if let Some(_down) = self.crash_after_step {
                self.crash();
            }
            self.summary.steps += 1;
            self.check_step();
            after_step(self)?;
            if self.opts.stop_on_violation && !self.violations().is_empty() {
                stopped = true;
                break;
            }
            if self.summary.steps >= STEPS_MAX {
                anyhow::bail!("the replay did not settle within {STEPS_MAX} steps");
            }
            let base_now = self.base.now();
            let Some(next) = self.next_time(base_now) else {
                break;
            };
            if next > self.end {
                break;
            }
            now = next.max(Millis(base_now.0 + 1));
        }
        if !stopped {
            self.base.set(self.end.max(self.base.now()));
            self.check_final();
        }
        Ok(self.finish_summary())
    }

    fn at(&self, secs: f64) -> Millis {
        self.start.plus(Duration::from_secs_f64(secs.max(0.0)))
    }

    fn start_service(&mut self) -> anyhow::Result<()> {
        let clock: SharedClock = self.clock.clone();
        // The snapshot's companies merged with those the timeline added (as `run` starts).
        if self.opts.db.exists() {
            self.cfg = crate::service::reload::Companies::effective(
                &self.base_cfg,
                &Store::open(&self.opts.db)?,
            )?;
        }
        let watch: Arc<dyn crate::processing::pipeline::RunWatch> = self.turns.watch.clone();
        let workers = Workers::build_watched(&self.cfg, clock.clone(), None, Some(watch))?;
        workers.mirror.store().scratch_durability()?;
        for lane in &workers.lanes {
            lane.processor.store().scratch_durability()?;
        }
        let lanes_n = workers.lanes.len();
        let (nudge_tx, nudge_rx) = bounded::<()>(1);
        let edge = match workers.events {
            Some(e) => {
                e.store.scratch_durability()?;
                let (sd_tx, sd_rx) = bounded::<()>(0);
                let (store, queue, quota) = (e.store, e.queue, e.quota);
                let thread =
                    std::thread::Builder::new()
                        .name("jm-events".into())
                        .spawn(move || {
                            crate::service::events::run_event_thread(
                                store, clock, queue, nudge_tx, sd_rx, None, quota,
                            )
                        })?;
                Some(Edge {
                    receiver: e.receiver,
                    shutdown: Some(sd_tx),
                    thread: Some(thread),
                })
            }
            None => None,
        };
        if self.summary.steps == 0 {
            self.install_claim_check()?;
        }
        let now = self.base.now();
        let (sync_tx, sync_rx) = crossbeam_channel::unbounded();
        let lane_rx = workers.lanes.iter().map(|l| l.companies.clone()).collect();
        let reload = crate::service::reload::Reloadable {
            companies: sync_tx,
            lanes: workers.lane_companies,
            clients: workers.clients,
            cfg: self.cfg.clone(),
            owners: workers.owners,
        };
        self.running = Some(Running {
            // Listing passes run here one at a time: the pool's threads would finish them in
            // an order that differs between two replays.
            mirror: workers.mirror.without_pool(),
            lanes: workers
                .lanes
                .into_iter()
                .map(|l| Arc::new(Mutex::new(l.processor)))
                .collect(),
            late_list: vec![false; lanes_n],
            edge,
            nudge: nudge_rx,
            schedule: None,
            deliveries_due: Some(now),
            next_round: now,
            trigger: false,
            reload,
            lane_rx,
            sync_rx,
        });
        self.restart_at = None;
        self.expiry_watch.service_started = Some(now);
        Ok(())
    }

    fn crash(&mut self) {
        let down = self.crash_after_step.take().unwrap_or(0.0);
        self.fake.black_out_after(None);
        if self.running.take().is_some() {
            self.summary.crashes += 1;
        }
        let now = self.base.now();
        self.restart_at = Some(now.plus(Duration::from_secs_f64(down.max(0.0))));
    }

    /// Base (Pleo) time of a time read from jobmirror's clock.
    fn to_base(&self, t: Millis) -> Millis {
        Millis(t.0.saturating_sub(self.clock.offset_ms()))
    }

    fn service_step(&mut self) -> anyhow::Result<()> {
        let interval = self.cfg.poll_interval;
        let base_now = self.base.now();
        // Webhooks first: the sender is waiting for its answer.
        let mut refused_retry = VecDeque::new();
        let mut stored_now = false;
        while let Some(d) = self.waiting.pop_front() {
            let Some(edge) = self.running.as_ref().and_then(|r| r.edge.as_ref()) else {
                self.summary.webhooks.deferred += 1;
                refused_retry.push_back(d);
                break;
            };
            self.summary.webhooks.delivered += 1;
            let resp = edge.receiver.handle(d.request.clone());
            match resp.status {
                200..=299 => {
                    let dup = String::from_utf8_lossy(&resp.body).contains("\"duplicate\":true");
                    if dup {
                        self.summary.webhooks.duplicates += 1;
                    } else {
                        self.summary.webhooks.accepted += 1;
                        stored_now = true;
                    }
                    self.acked.push(d.webhook_id.clone());
                    let body: Value = serde_json::from_slice(&d.request.body).unwrap_or_default();
                    let data = if body["payload"].is_object() {
                        &body["payload"]["data"]
                    } else {
                        &body["data"]
                    };
                    if let Some(c) = data["companyId"].as_str() {
                        self.acked_companies.push((base_now, c.to_owned()));
                    }
                }
                503 => {
                    self.summary.webhooks.deferred += 1;
                    refused_retry.push_back(d);
                }
                _ => self.summary.webhooks.refused += 1,
            }
        }
        self.waiting.extend(refused_retry);
        let r = self.running.as_mut().expect("running");
        // The event thread nudges after it answers, so the nudge may not be there yet: a
        // delivery stored in this step is read in this step whatever the channel says.
        let nudged = r.nudge.try_recv().is_ok();
        if stored_now || nudged || r.deliveries_due.is_some_and(|t| t <= base_now) {
            r.deliveries_due = match r.mirror.process_deliveries() {
                Ok(_) => match r.mirror.delivery_retry_in() {
                    Ok(wait) => wait.map(|w| self.base.now().plus(w)),
                    Err(_) => Some(self.base.now().plus(Duration::from_secs(2))),
                },
                Err(_) => Some(self.base.now().plus(Duration::from_secs(2))),
            };
        }
        // As `mirror::run`: a recovery pass over everyone first, then polls on the schedule.
        let all = self.cfg.company_ids.clone();
        match &mut r.schedule {
            None => {
                r.mirror.pass(PassKind::Recovery);
                r.schedule = Some(PollSchedule::new(&all, interval, self.base.now().0));
            }
            Some(schedule) if r.trigger => {
                r.trigger = false;
                r.mirror.pass(PassKind::Trigger);
                let now = self.base.now().0;
                for c in &all {
                    schedule.done(c, now);
                }
            }
            Some(schedule) => {
                let due = schedule.due(base_now.0);
                if !due.is_empty() {
                    // A key may stand for the companies listed together by credential.
                    let companies = r.mirror.expand_keys(&due);
                    r.mirror.pass_companies(PassKind::Poll, &companies);
                    let now = self.base.now().0;
                    for c in &due {
                        schedule.done(c, now);
                    }
                }
            }
        }
        let mut next_due: Option<Millis> = None;
        for i in 0..r.lanes.len() {
            // A lane that was busy when its company list came takes a wake first (the
            // service's loop may), then the list; an idle lane has taken it already.
            let late = std::mem::take(&mut self.running.as_mut().expect("running").late_list[i]);
            if !late {
                self.drain_lane(i);
            }
            let mut rounds = 0;
            let due = loop {
                let report = self.lane_round(i)?;
                rounds += 1;
                if late && rounds == 1 {
                    self.drain_lane(i);
                }
                self.summary.resumed += report.resumed.len() as u64;
                let svc_now = self.clock.now();
                match report.next_due {
                    Some(t) if t <= svc_now && rounds < ROUNDS_PER_STEP_MAX => continue,
                    other => break other,
                }
            };
            if let Some(d) = due {
                next_due = Some(next_due.map_or(d, |n| n.min(d)));
            }
        }
        let idle = self.base.now().plus(IDLE_ROUND);
        let due = next_due.map_or(idle, |t| self.to_base(t).min(idle));
        let r = self.running.as_mut().expect("running");
        r.next_round = due;
        Ok(())
    }

    fn next_time(&self, now: Millis) -> Option<Millis> {
        let mut next: Option<Millis> = None;
        let mut consider = |t: Option<Millis>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n: Millis| n.min(t)));
            }
        };
        consider(
            self.snap
                .timeline
                .get(self.next_event)
                .map(|s| self.at(s.at)),
        );
        consider(self.restart_at);
        consider(self.accounting_up_at);
        if let Some(r) = &self.running {
            // No poll is due while no company is served (all paused or removed).
            consider(match &r.schedule {
                None => Some(now),
                Some(s) => s.next_due().map(Millis),
            });
            consider(r.deliveries_due);
            consider(Some(r.next_round));
            if !self.waiting.is_empty() {
                // Deferred webhooks: the sender tries again (Svix: 5 s, then longer).
                consider(Some(now.plus(Duration::from_secs(5))));
            }
        }
        next
    }
}

/// Replays `snap` into `opts.db` to the end of its timeline.
pub fn replay(snap: Snapshot, opts: ReplayOptions) -> anyhow::Result<Summary> {
    let mut r = Replay::new(snap, opts)?;
    r.run(&mut |_| Ok(()))
}
