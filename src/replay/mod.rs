//! `jobmirror replay`: plays a [`Snapshot`] offline. The real mirror, webhook edge and
//! processor (built by [`Workers::build`], the code the service runs on its threads) are
//! driven step by step on a virtual clock against an in-process fake Pleo seeded from the
//! snapshot, as fast as the machine allows; after every step the invariants are checked.
//!
//! Invariants: one driver thread makes every API request, so the fake sees them in one order
//! and a replay is deterministic (the event thread only commits what the driver hands it, and
//! the driver waits for the commit); nothing here decides anything about jobs, the workers do;
//! Pleo's clock never moves backwards (a clock jump moves only jobmirror's view of it).

pub mod simulate;
pub mod snapshot;

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
use crate::service::sync::{Mirror, PassKind, PollSchedule};
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

/// What a replay did, from the fake's log and the database.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Summary {
    pub description: Option<String>,
    pub virtual_secs: f64,
    pub steps: u64,
    /// Jobs of the served companies by Pleo's final status.
    pub jobs_by_pleo_status: BTreeMap<String, u64>,
    /// Jobs in the mirror by jobmirror's processing state.
    pub jobs_by_state: BTreeMap<String, u64>,
    /// `started` events Pleo accepted from jobmirror.
    pub claims: u64,
    /// `started` events Pleo refused with 422 (another integration was first).
    pub conflicts: u64,
    /// Jobs taken back after a restart without `started`.
    pub resumed: u64,
    /// Jobs that expired at Pleo.
    pub expiries: u64,
    pub crashes: u64,
    pub webhooks: WebhookSummary,
    /// API requests by method and path pattern.
    pub api_calls: BTreeMap<String, u64>,
    pub api_calls_total: u64,
    /// API requests answered with an injected fault (429, 500, cut or lost answers).
    pub api_faults: u64,
    /// Jobs acted on while another integration held them, in the two races jobmirror cannot
    /// see: taken for ours after the answer to our `started` was lost (Pleo's job data names
    /// no holder; README, "Claims whose answer is lost"), or sent `failed` from pending (a
    /// readiness check that kept failing) just as someone claimed them.
    pub ambiguous: Vec<String>,
    pub violations: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct WebhookSummary {
    pub delivered: u64,
    pub accepted: u64,
    pub duplicates: u64,
    pub refused: u64,
    /// Answered 503 or sent while jobmirror was down: the sender tries again.
    pub deferred: u64,
}

/// The workers while jobmirror "runs".
struct Running {
    mirror: Mirror,
    lanes: Vec<Processor>,
    edge: Option<Edge>,
    nudge: Receiver<()>,
    /// Pleo (base) times. `None`: the start-up recovery pass is still to do.
    schedule: Option<PollSchedule>,
    deliveries_due: Option<Millis>,
    next_round: Millis,
    trigger: bool,
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
    cfg: Config,
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
    summary: Summary,
    _lock: crate::store::DbLock,
}

fn setting_env(snap: &Snapshot, overrides: &[(&str, String)]) -> HashMap<String, String> {
    let mut env: HashMap<String, String> = snap
        .service
        .keys()
        .filter_map(|k| snap.setting(k).map(|v| (crate::config::env_name(k), v)))
        .collect();
    for (k, v) in overrides {
        env.insert(crate::config::env_name(k), v.clone());
    }
    env
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
            ("pleo_api_key", fake.api_key()),
            ("company_ids", snap.companies.join(",")),
            ("handler_command", handler),
        ];
        if has_secret {
            // Never bound: the replay hands requests to the receiver itself.
            overrides.push(("webhook_listen", "127.0.0.1:9".into()));
        }
        let env = setting_env(&snap, &overrides);
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
            cfg,
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

    /// Applies every timeline event due by now.
    fn apply_events(&mut self) -> anyhow::Result<()> {
        while let Some(step) = self.snap.timeline.get(self.next_event) {
            if self.at(step.at) > self.base.now() {
                break;
            }
            let step = step.clone();
            self.next_event += 1;
            match step.event {
                Event::JobCreated { job } => {
                    self.fake.add_job(job)?;
                }
                Event::Webhook {
                    webhook_id,
                    headers,
                    body,
                    signed_at,
                } => {
                    let d = self.webhook_request(webhook_id, headers, body, signed_at)?;
                    self.waiting.push_back(d);
                }
                Event::Faults { rates } => self.fake.set_fault_rates(rates),
                Event::Fault { rule } => self.fake.push_fault(rule),
                Event::ClaimedByOther { job_id } => {
                    self.fake.claim_as_other(&job_id);
                }
                Event::StealAfterGet { job_id } => self.fake.steal_after_next_get(&job_id),
                Event::CompletedByOther { job_id } => {
                    self.fake.complete(&job_id);
                }
                Event::Crash {
                    after_requests,
                    down_secs,
                } => match after_requests {
                    Some(n) if self.running.is_some() => {
                        self.fake.black_out_after(Some(n));
                        self.crash_after_step = Some(down_secs);
                    }
                    _ => {
                        self.crash_after_step = Some(down_secs);
                        self.crash();
                    }
                },
                Event::ClockJump { secs } => self.clock.jump((secs * 1000.0) as i64),
                Event::Trigger => {
                    if let Some(r) = &mut self.running {
                        r.trigger = true;
                    }
                }
                Event::AccountingDown { down_secs } => {
                    let until = self
                        .base
                        .now()
                        .plus(Duration::from_secs_f64(down_secs.max(0.0)));
                    self.accounting_up_at =
                        Some(self.accounting_up_at.map_or(until, |u| u.max(until)));
                    self.set_accounting(false)?;
                }
            }
        }
        if self.accounting_up_at.is_some_and(|t| t <= self.base.now()) {
            self.accounting_up_at = None;
            self.set_accounting(true)?;
        }
        Ok(())
    }

    fn webhook_request(
        &self,
        webhook_id: Option<String>,
        headers: BTreeMap<String, String>,
        body: Value,
        signed_at: Option<f64>,
    ) -> anyhow::Result<Delivery> {
        let (raw, headers, id) = match body {
            Value::String(raw) => {
                let id = headers
                    .iter()
                    .find(|(k, _)| {
                        k.eq_ignore_ascii_case("webhook-id") || k.eq_ignore_ascii_case("svix-id")
                    })
                    .map(|(_, v)| v.clone())
                    .or(webhook_id)
                    .unwrap_or_default();
                let headers: Vec<(String, String)> = headers.into_iter().collect();
                (raw.into_bytes(), headers, id)
            }
            body => {
                let id = webhook_id.unwrap_or_default();
                let raw = serde_json::to_vec(&body)?;
                let ts = signed_at.map_or(self.clock.now(), |s| {
                    Millis(self.at(s).0 + self.clock.offset_ms())
                });
                let secrets = self
                    .cfg
                    .webhook
                    .as_ref()
                    .map(|w| w.secrets.clone())
                    .ok_or_else(|| anyhow::anyhow!("no webhook_secret to sign with"))?;
                let sig = crate::edge::webhook::sign_with(&secrets, &id, ts.0 / 1000, &raw);
                let headers = vec![
                    ("webhook-id".to_owned(), id.clone()),
                    ("webhook-timestamp".to_owned(), (ts.0 / 1000).to_string()),
                    ("webhook-signature".to_owned(), sig),
                    ("content-type".to_owned(), "application/json".to_owned()),
                ];
                (raw, headers, id)
            }
        };
        let request = Request {
            head: Head {
                method: "POST".into(),
                path: crate::edge::webhook::PATH.into(),
                query: String::new(),
                headers,
                content_length: raw.len(),
                peer: std::net::SocketAddr::from(([127, 0, 0, 1], 9)),
            },
            body: raw,
        };
        Ok(Delivery {
            webhook_id: id,
            request,
        })
    }

    fn start_service(&mut self) -> anyhow::Result<()> {
        let clock: SharedClock = self.clock.clone();
        let workers = Workers::build(&self.cfg, clock.clone(), None)?;
        workers.mirror.store().scratch_durability()?;
        for lane in &workers.lanes {
            lane.processor.store().scratch_durability()?;
        }
        let (nudge_tx, nudge_rx) = bounded::<()>(1);
        let edge = match workers.events {
            Some(e) => {
                e.store.scratch_durability()?;
                let (sd_tx, sd_rx) = bounded::<()>(0);
                let (store, queue) = (e.store, e.queue);
                let thread =
                    std::thread::Builder::new()
                        .name("jm-events".into())
                        .spawn(move || {
                            crate::edge::webhook::run_event_thread(
                                store, clock, queue, nudge_tx, sd_rx, None,
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
        self.running = Some(Running {
            mirror: workers.mirror,
            lanes: workers.lanes.into_iter().map(|l| l.processor).collect(),
            edge,
            nudge: nudge_rx,
            schedule: None,
            deliveries_due: Some(now),
            next_round: now,
            trigger: false,
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
                    r.mirror.pass_companies(PassKind::Poll, &due);
                    let now = self.base.now().0;
                    for c in &due {
                        schedule.done(c, now);
                    }
                }
            }
        }
        let mut next_due: Option<Millis> = None;
        for lane in &mut r.lanes {
            let mut rounds = 0;
            let due = loop {
                let report = lane.round();
                rounds += 1;
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
            consider(Some(match &r.schedule {
                None => now,
                Some(s) => s.next_due().map_or(now, Millis),
            }));
            consider(r.deliveries_due);
            consider(Some(r.next_round));
            if !self.waiting.is_empty() {
                // Deferred webhooks: the sender tries again (Svix: 5 s, then longer).
                consider(Some(now.plus(Duration::from_secs(5))));
            }
        }
        next
    }

    /// Takes the accounting side down (a file where the outbox directory belongs: the
    /// readiness check fails) or brings it back.
    fn set_accounting(&mut self, up: bool) -> anyhow::Result<()> {
        let Some(dir) = &self.outbox else {
            return Ok(());
        };
        let mut away = dir.as_os_str().to_owned();
        away.push(".away");
        let away = PathBuf::from(away);
        if up {
            if dir.is_file() {
                std::fs::remove_file(dir)?;
            }
            if away.exists() {
                std::fs::rename(&away, dir)?;
            }
        } else if !dir.is_file() {
            if dir.exists() {
                std::fs::rename(dir, &away)?;
            }
            std::fs::write(dir, "the accounting system is down (replay)\n")?;
        }
        let was_down = self
            .accounting_down
            .swap(!up, std::sync::atomic::Ordering::SeqCst);
        if up && was_down {
            self.expiry_watch.accounting_up_since = Some(self.base.now());
        }
        Ok(())
    }

    /// Violations found so far.
    pub fn violations(&self) -> Vec<String> {
        self.violations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records a violation once (a state checked after every step would repeat it).
    fn violate(&self, v: String) {
        let mut all = self.violations.lock().unwrap_or_else(|p| p.into_inner());
        if !all.contains(&v) {
            all.push(v);
        }
    }

    /// Checks each `started` at the moment it reaches Pleo, against the database as it is then.
    fn install_claim_check(&self) -> anyhow::Result<()> {
        let reader = Mutex::new(Store::open_read_only(&self.opts.db)?);
        let clock = self.clock.clone();
        let min_left = self.cfg.claim_min_left.as_millis() as i64;
        let violations = self.violations.clone();
        let down = self.accounting_down.clone();
        self.fake.on_api_claim(Box::new(move |c: &ClaimRecord| {
            let mut found = Vec::new();
            if down.load(std::sync::atomic::Ordering::SeqCst) {
                found.push(format!(
                    "`started` sent for job {} while the readiness check fails",
                    c.job_id
                ));
            }
            if c.prior_status == "in_progress" && c.prior_holder != Some(Claimant::OtherAfterGet) {
                found.push(format!(
                    "`started` sent for job {} which was already in_progress (held by {})",
                    c.job_id,
                    c.prior_holder
                        .map_or("an unknown holder, e.g. us before a restart".into(), |h| {
                            format!("{h:?}")
                        })
                ));
            }
            let store = reader.lock().unwrap_or_else(|p| p.into_inner());
            let older: rusqlite::Result<Vec<String>> = store
                .conn()
                .prepare(
                    "SELECT o.id FROM export_jobs j JOIN export_jobs o ON o.company_id = j.company_id \
                     WHERE j.id = ?1 AND o.status = 'pending' AND o.proc_state = 'new' \
                     AND (o.created_at, o.created_at_sub_ns, o.id) < (j.created_at, j.created_at_sub_ns, j.id) \
                     AND o.expires_at > ?2",
                )
                .and_then(|mut s| {
                    s.query_map(
                        rusqlite::params![c.job_id, clock.now().0.saturating_add(min_left)],
                        |r| r.get(0),
                    )?
                    .collect()
                });
            match older {
                Ok(ids) if !ids.is_empty() => found.push(format!(
                    "claimed job {} while older eligible jobs of its company waited: {}",
                    c.job_id,
                    ids.join(", ")
                )),
                Ok(_) => {}
                Err(e) => found.push(format!("cannot read the database at a claim: {e}")),
            }
            let active: rusqlite::Result<i64> = store.conn().query_row(
                "SELECT count(*) FROM export_jobs a JOIN export_jobs j ON a.company_id = j.company_id \
                 WHERE j.id = ?1 AND a.id <> j.id AND a.proc_state IN ('resume', 'claimed', 'processing')",
                [&c.job_id],
                |r| r.get(0),
            );
            if let Ok(n) = active
                && n > 0
            {
                found.push(format!(
                    "claimed job {} while another job of its company was in hand",
                    c.job_id
                ));
            }
            if !found.is_empty() {
                violations
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(found);
            }
        }));
        Ok(())
    }

    /// After every step: acknowledged webhooks stored, items reported once, `started` reaching
    /// Pleo at most once per job, at most one job in hand per company.
    fn check_step(&mut self) {
        let store = match Store::open_read_only(&self.opts.db) {
            Ok(s) => s,
            Err(e) => {
                if self.summary.steps > 1 || self.running.is_some() {
                    self.violate(format!("cannot open the database: {e}"));
                }
                return;
            }
        };
        for id in &self.acked[self.acked_checked..] {
            let stored: rusqlite::Result<i64> = store.conn().query_row(
                "SELECT count(*) FROM webhook_deliveries WHERE webhook_id = ?1",
                [id],
                |r| r.get(0),
            );
            if !matches!(stored, Ok(1)) {
                self.violate(format!(
                    "webhook {id} was acknowledged but is not stored ({stored:?})"
                ));
            }
        }
        self.acked_checked = self.acked.len();
        // Only the requests since the last step (the log only grows).
        let requests = self.fake.requests_since(self.requests_checked);
        let claims = self.fake.claims();
        let holder_at = |job: &str, seq: u64| {
            claims
                .iter()
                .rfind(|c| c.accepted && c.job_id == job && c.after_requests < seq)
                .map(|c| c.by)
        };
        for r in &requests {
            // Status 0: dropped unapplied; 429 and 5xx from a fault: refused unapplied.
            let applied = r.status != 0
                && !matches!(
                    r.fault.as_deref(),
                    Some(f) if f.starts_with("TooManyRequests") || f.starts_with("ServerError")
                );
            if !applied {
                continue;
            }
            let acted_on = if r.method == "PUT" && r.path.ends_with("/items") {
                Some(
                    r.path
                        .trim_start_matches("/v3/export-jobs/")
                        .trim_end_matches("/items")
                        .to_owned(),
                )
            } else if r.method == "POST" && r.path == "/v3/export-job-events" {
                let v: Value = serde_json::from_str(&r.body).unwrap_or_default();
                (v["event"] != "started").then(|| v["jobId"].as_str().unwrap_or("").to_owned())
            } else {
                None
            };
            if let Some(job) = &acted_on
                && let Some(h @ (Claimant::Other | Claimant::OtherAfterGet)) = holder_at(job, r.seq)
            {
                // The one case jobmirror cannot tell apart: the answer to its `started` was
                // lost and Pleo then showed the job in_progress (its data names no holder).
                // The other: `failed` sent from pending (a readiness check that kept failing)
                // right after a read, when someone claimed the job in between; `pending ->
                // failed` is no lock, as `started` is (README).
                let lost_answer = store.events(Some(job)).is_ok_and(|evs| {
                    evs.iter().any(|e| {
                        (e.kind == "claim_failed" && e.detail["outcome"] == "unknown")
                            || (e.kind == "finish_sent" && e.detail["from"] == "pending")
                    })
                });
                if lost_answer {
                    if !self.summary.ambiguous.contains(job) {
                        self.summary.ambiguous.push(job.clone());
                    }
                } else {
                    self.violate(format!(
                        "{} {} (request {}) acted on job {job}, which another integration holds ({h:?})",
                        r.method, r.path, r.seq
                    ));
                }
            }
            if r.method == "PUT" && r.path.ends_with("/items") {
                let job = acted_on.clone().unwrap_or_default();
                let updates: Vec<Value> = serde_json::from_str(&r.body).unwrap_or_default();
                for u in updates.iter().filter(|u| u["status"] == "successful") {
                    let entry = u["accountingEntryId"].as_str().unwrap_or("").to_owned();
                    let n = self
                        .reported
                        .entry((job.clone(), entry.clone()))
                        .or_insert(0);
                    *n += 1;
                    if *n == 2 {
                        self.violations
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(format!(
                                "item {entry} of job {job} was reported successful twice"
                            ));
                    }
                }
            }
            if r.method == "POST" && r.path == "/v3/export-job-events" {
                let v: Value = serde_json::from_str(&r.body).unwrap_or_default();
                if v["event"] == "started" {
                    let job = v["jobId"].as_str().unwrap_or("").to_owned();
                    let n = self.started_seen.entry(job.clone()).or_insert(0);
                    *n += 1;
                    if *n == 2 {
                        self.violations
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(format!("`started` reached Pleo twice for job {job}"));
                    }
                }
            }
        }
        self.requests_checked += requests.len();
        self.check_claims_against_pleo(&claims);
        self.check_nothing_left_to_expire(&store, &requests, &claims);
        self.check_nothing_abandoned(&store);
        let doubled: rusqlite::Result<Vec<String>> = store
            .conn()
            .prepare(
                "SELECT company_id FROM export_jobs WHERE proc_state IN ('resume', 'claiming', 'claimed', 'processing') \
                 GROUP BY company_id HAVING count(*) > 1",
            )
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect());
        if let Ok(companies) = doubled {
            for c in companies {
                self.violate(format!("company {c} has more than one job in hand"));
            }
        }
    }

    /// Our new claims, judged on Pleo's side (the fake's world at the moment of each claim),
    /// not on what our database believed: no younger job started while an older one was
    /// pending, listed to us and claimable; no job started while another of the company was
    /// ours in progress, or was found in progress by a recovery pass and waited to be resumed.
    fn check_claims_against_pleo(&mut self, claims: &[ClaimRecord]) {
        let new: Vec<&ClaimRecord> = claims[self.claims_checked.min(claims.len())..]
            .iter()
            .filter(|c| c.by == Claimant::Api && c.accepted)
            .collect();
        self.claims_checked = claims.len();
        if new.is_empty() {
            return;
        }
        let company_of: HashMap<String, String> = self
            .fake
            .jobs()
            .into_iter()
            .map(|j| (j.id, j.company_id))
            .collect();
        let log = self.fake.requests();
        // Claimable: time left for a `started` to land (of the order of one request), not
        // our own `claim_min_left` (a claim refreshes the deadline).
        let min_left = self.cfg.pleo_request_timeout.as_millis() as i64;
        // The rule holds with the default settings: only an explicit opt-out lifts it.
        let resume_unknown = self.cfg.resume_unknown_in_progress;
        let mut found = Vec::new();
        for c in new {
            let company = company_of.get(&c.job_id).cloned().unwrap_or_default();
            let key = format!("company_id={company}");
            // Listings of the company that Pleo answered before this claim.
            let listed_at: Vec<Millis> = log
                .iter()
                .filter(|r| {
                    r.seq < c.after_requests
                        && r.method == "GET"
                        && r.path == "/v3/export-jobs"
                        && r.status == 200
                        && r.fault.is_none()
                        && r.query.split('&').any(|kv| kv == key)
                })
                .map(|r| r.at)
                .collect();
            for (older, created, expires) in &c.older_pending {
                // jobmirror had its chance: a listing of the company after the older job was
                // created, or a webhook for the company (a trigger of that listing).
                let listed = listed_at.iter().any(|t| t >= created);
                let announced = self
                    .acked_companies
                    .iter()
                    .any(|(t, co)| *co == company && t >= created && *t <= c.at);
                if (listed || announced) && c.at.until(*expires) > min_left {
                    found.push(format!(
                        "started job {} while the older job {older} of its company was pending at Pleo and claimable ({})",
                        c.job_id,
                        if listed { "listed to us" } else { "a webhook for the company had arrived" }
                    ));
                }
            }
            for (other, holder) in &c.in_progress {
                match holder {
                    Some(Claimant::Api) => found.push(format!(
                        "started job {} while job {other} of its company was ours in progress: two at once",
                        c.job_id
                    )),
                    None if resume_unknown => found.push(format!(
                        "started job {} while job {other} of its company, found in_progress (an interrupted workflow of ours), was not resumed first",
                        c.job_id
                    )),
                    _ => {}
                }
            }
        }
        for v in found {
            self.violate(v);
        }
    }

    /// No job expires at Pleo after it was eligible and claimable for longer than a claim
    /// takes. Judged conservatively, on Pleo's side, from what was true at every step: the
    /// job was pending and its company's oldest pending job; no job of the company was
    /// `in_progress`; the service ran, had listed the company (or stored a webhook naming it)
    /// since the job appeared and since it started; the readiness check passed (and had
    /// passed for one retry interval after an outage); the API answered without faults; a lane
    /// was free. Our own settings (e.g. `claim_min_left_secs`) do not excuse an expiry: the
    /// allowance is two request timeouts and a minute.
    fn check_nothing_left_to_expire(
        &mut self,
        store: &Store,
        requests: &[LoggedRequest],
        claims: &[ClaimRecord],
    ) {
        let now = self.base.now();
        let w = &mut self.expiry_watch;
        let mut clean = true;
        for r in requests {
            let faulty = r.fault.is_some() || r.status == 0 || r.status == 429 || r.status >= 500;
            clean &= !faulty;
            if r.method == "GET"
                && r.path == "/v3/export-jobs"
                && r.status == 200
                && !faulty
                && let Some(co) = r
                    .query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("company_id="))
            {
                w.listed.insert(co.to_owned(), r.at);
            }
        }
        for (t, co) in &self.acked_companies[w.acked_seen.min(self.acked_companies.len())..] {
            let e = w.listed.entry(co.clone()).or_insert(*t);
            *e = (*e).max(*t);
        }
        w.acked_seen = self.acked_companies.len();
        let down = self
            .accounting_down
            .load(std::sync::atomic::Ordering::SeqCst);
        let retry = self.cfg.poll_interval.min(Duration::from_secs(300));
        let ready = !down && w.accounting_up_since.is_none_or(|t| t.plus(retry) <= now);
        let in_hand: i64 = store
            .conn()
            .query_row(
                "SELECT count(*) FROM export_jobs WHERE proc_state IN ('resume', 'claiming', 'claimed', 'processing')",
                [],
                |r| r.get(0),
            )
            .unwrap_or(i64::MAX);
        let lane_free = in_hand < i64::from(self.cfg.lanes);
        let Some(started) = self.running.as_ref().and(w.service_started) else {
            w.visible_since.clear();
            w.claimable_since.clear();
            return;
        };
        // Otherwise nothing is claimable now (what Pleo shows stays visible).
        let judging = clean && ready && lane_free;
        if !judging {
            w.claimable_since.clear();
        }
        let allowance =
            (self.cfg.pleo_request_timeout * 2 + Duration::from_secs(60)).as_millis() as i64;
        let served: HashSet<&String> = self.snap.companies.iter().collect();
        let jobs: Vec<FakeJob> = self
            .fake
            .jobs()
            .into_iter()
            .filter(|j| served.contains(&j.company_id))
            .collect();
        let mut found = Vec::new();
        for j in &jobs {
            if let (Some(at), Some(since)) = (j.expired_at, w.claimable_since.get(&j.id))
                && since.until(at) > allowance
            {
                found.push(format!(
                    "job {} expired at Pleo after {} s in which it was its company's oldest pending job and claimable",
                    j.id,
                    since.until(at) / 1000
                ));
            }
        }
        // Whose `in_progress` jobs end without a listing telling us: ours (claimed by us, or
        // found in progress and ours to resume by default). Another integration's end is
        // learnt only from a listing.
        let holders = holders(claims);
        let resume_unknown = self.cfg.resume_unknown_in_progress;
        let ours = |id: &str| match holders.get(id) {
            Some(Claimant::Api) => true,
            Some(_) => false,
            None => resume_unknown,
        };
        let mut by_company: HashMap<&str, Vec<&FakeJob>> = HashMap::new();
        for j in &jobs {
            by_company.entry(j.company_id.as_str()).or_default().push(j);
        }
        let mut visible = HashMap::new();
        let mut claimable = HashMap::new();
        for j in jobs.iter().filter(|j| j.status == "pending") {
            let company = &by_company[j.company_id.as_str()];
            let older_pending = company
                .iter()
                .any(|o| o.status == "pending" && (o.created_at, &o.id) < (j.created_at, &j.id));
            let foreign = company
                .iter()
                .any(|o| o.status == "in_progress" && !ours(&o.id));
            if older_pending || foreign {
                continue;
            }
            // Eligible as far as a listing can show; we must have read the company since.
            let seen = w.visible_since.get(&j.id).copied().unwrap_or(now);
            visible.insert(j.id.clone(), seen);
            let known = w
                .listed
                .get(&j.company_id)
                .is_some_and(|t| *t >= seen && *t >= started && *t >= j.created_at);
            let busy = company.iter().any(|o| o.status == "in_progress");
            if judging && known && !busy {
                let since = w.claimable_since.get(&j.id).copied().unwrap_or(now);
                claimable.insert(j.id.clone(), since);
            }
        }
        w.visible_since = visible;
        w.claimable_since = claimable;
        for v in found {
            self.violate(v);
        }
    }

    /// No job is marked finished or expired by us while Pleo says it is ours in progress.
    fn check_nothing_abandoned(&mut self, store: &Store) {
        let ended: rusqlite::Result<Vec<(String, String)>> = store
            .conn()
            .prepare("SELECT id, proc_state FROM export_jobs WHERE proc_state IN ('done', 'expired') AND status = 'in_progress'")
            .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect());
        let Ok(ended) = ended else { return };
        if ended.is_empty() {
            return;
        }
        let holders = holders(&self.fake.claims());
        let at_pleo: HashMap<String, String> = self
            .fake
            .jobs()
            .into_iter()
            .map(|j| (j.id, j.status))
            .collect();
        for (id, state) in ended {
            let ours = !matches!(
                holders.get(&id),
                Some(Claimant::Other | Claimant::OtherAfterGet)
            );
            if ours && at_pleo.get(&id).is_some_and(|s| s == "in_progress") {
                self.violate(format!(
                    "job {id} is {state} in our database while Pleo says it is in_progress (ours)"
                ));
            }
        }
    }

    /// At the end: every job of a served company is finished, held by someone else, or its
    /// state is explained in the journal; jobmirror holds nothing Pleo has finished.
    fn check_final(&mut self) {
        self.check_step();
        let Ok(store) = Store::open_read_only(&self.opts.db) else {
            self.violate("no database at the end of the replay".into());
            return;
        };
        let holders = holders(&self.fake.claims());
        let served: HashSet<&String> = self.snap.companies.iter().collect();
        let now = self.clock.now();
        let min_left = self.cfg.claim_min_left.as_millis() as i64;
        for job in self.fake.jobs() {
            if !served.contains(&job.company_id) {
                continue;
            }
            let row = store.job(&job.id).ok().flatten();
            let events = store.events(Some(&job.id)).unwrap_or_default();
            match job.status.as_str() {
                "in_progress" => {
                    let holder = holders.get(&job.id).copied();
                    if !matches!(holder, Some(Claimant::Other | Claimant::OtherAfterGet)) {
                        self.violate(format!(
                            "job {} is still in_progress, held by jobmirror, at the end",
                            job.id
                        ));
                    }
                }
                "pending" => {
                    let explained = row.as_ref().is_some_and(|r| {
                        r.proc_state.is_final()
                            || now.until(r.expires_at) <= min_left
                            || events.iter().any(|e| {
                                matches!(
                                    e.kind.as_str(),
                                    "claim_failed" | "not_ready" | "processing_error"
                                )
                            })
                    });
                    if !explained {
                        self.violate(format!(
                            "job {} is still pending at the end with nothing in the journal saying why{}",
                            job.id,
                            if row.is_none() { " (never seen)" } else { "" }
                        ));
                    }
                }
                _ => {
                    if let Some(r) = row.filter(|r| r.proc_state.is_active()) {
                        self.violate(format!(
                            "jobmirror still holds job {} ({}) but Pleo says {}",
                            r.id,
                            r.proc_state.as_str(),
                            job.status
                        ));
                    }
                }
            }
        }
    }

    fn finish_summary(&mut self) -> Summary {
        let mut s = std::mem::take(&mut self.summary);
        s.virtual_secs = self.start.until(self.base.now()) as f64 / 1000.0;
        let served: HashSet<&String> = self.snap.companies.iter().collect();
        for job in self.fake.jobs() {
            if !served.contains(&job.company_id) {
                continue;
            }
            let status = if job.failure_reason_type.as_deref() == Some("job_expired") {
                s.expiries += 1;
                "failed (expired)".to_owned()
            } else {
                job.status.clone()
            };
            *s.jobs_by_pleo_status.entry(status).or_default() += 1;
        }
        for c in self.fake.claims().iter().filter(|c| c.by == Claimant::Api) {
            if c.accepted {
                s.claims += 1;
            } else {
                s.conflicts += 1;
            }
        }
        for r in self.fake.requests() {
            if r.path.starts_with("/_fake/") {
                continue;
            }
            *s.api_calls
                .entry(crate::health::endpoint_pattern(&r.method, &r.path))
                .or_default() += 1;
            s.api_calls_total += 1;
            s.api_faults += u64::from(r.fault.is_some());
        }
        if let Ok(store) = Store::open_read_only(&self.opts.db)
            && let Ok(mut stmt) = store
                .conn()
                .prepare("SELECT proc_state, count(*) FROM export_jobs GROUP BY proc_state")
            && let Ok(rows) =
                stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
        {
            for (state, n) in rows.flatten() {
                s.jobs_by_state.insert(state, n as u64);
            }
        }
        s.violations = self.violations();
        s
    }
}

/// Who holds each job now, from the claim log.
fn holders(claims: &[ClaimRecord]) -> HashMap<String, Claimant> {
    let mut h = HashMap::new();
    for c in claims.iter().filter(|c| c.accepted) {
        h.insert(c.job_id.clone(), c.by);
    }
    h
}

impl Summary {
    /// Adds another run's figures (for totals over many simulated histories).
    pub fn add(&mut self, o: &Summary) {
        self.virtual_secs += o.virtual_secs;
        self.steps += o.steps;
        for (k, v) in &o.jobs_by_pleo_status {
            *self.jobs_by_pleo_status.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.jobs_by_state {
            *self.jobs_by_state.entry(k.clone()).or_default() += v;
        }
        self.claims += o.claims;
        self.conflicts += o.conflicts;
        self.resumed += o.resumed;
        self.expiries += o.expiries;
        self.crashes += o.crashes;
        let (w, ow) = (&mut self.webhooks, &o.webhooks);
        w.delivered += ow.delivered;
        w.accepted += ow.accepted;
        w.duplicates += ow.duplicates;
        w.refused += ow.refused;
        w.deferred += ow.deferred;
        for (k, v) in &o.api_calls {
            *self.api_calls.entry(k.clone()).or_default() += v;
        }
        self.api_calls_total += o.api_calls_total;
        self.api_faults += o.api_faults;
        self.ambiguous.extend(o.ambiguous.iter().cloned());
        self.violations.extend(o.violations.iter().cloned());
    }

    /// The summary as text, for `jobmirror replay`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let line = |out: &mut String, s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        if let Some(d) = &self.description {
            line(&mut out, format!("replay: {d}"));
        }
        line(
            &mut out,
            format!(
                "  virtual time {:.0} s in {} steps, {} crashes",
                self.virtual_secs, self.steps, self.crashes
            ),
        );
        let by = |m: &BTreeMap<String, u64>| {
            m.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        line(
            &mut out,
            format!("  jobs at Pleo:   {}", by(&self.jobs_by_pleo_status)),
        );
        line(
            &mut out,
            format!("  jobs in mirror: {}", by(&self.jobs_by_state)),
        );
        line(
            &mut out,
            format!(
                "  claims {}, conflicts {}, resumed {}, expiries {}",
                self.claims, self.conflicts, self.resumed, self.expiries
            ),
        );
        let w = &self.webhooks;
        line(
            &mut out,
            format!(
                "  webhooks: {} delivered, {} accepted, {} duplicates, {} refused, {} deferred",
                w.delivered, w.accepted, w.duplicates, w.refused, w.deferred
            ),
        );
        line(
            &mut out,
            format!(
                "  API calls: {} ({} answered with an injected fault)",
                self.api_calls_total, self.api_faults
            ),
        );
        for (k, v) in &self.api_calls {
            line(&mut out, format!("    {v:>6}  {k}"));
        }
        if !self.ambiguous.is_empty() {
            line(
                &mut out,
                format!(
                    "  acted on while held elsewhere, in a race jobmirror cannot see (a lost answer to `started`, or `failed` from pending): {}",
                    self.ambiguous.join(", ")
                ),
            );
        }
        if self.violations.is_empty() {
            line(&mut out, "  invariants: all held".into());
        } else {
            line(
                &mut out,
                format!("  invariants: {} violated", self.violations.len()),
            );
            for v in &self.violations {
                line(&mut out, format!("    - {v}"));
            }
        }
        out
    }
}

/// Replays `snap` into `opts.db` to the end of its timeline.
pub fn replay(snap: Snapshot, opts: ReplayOptions) -> anyhow::Result<Summary> {
    let mut r = Replay::new(snap, opts)?;
    r.run(&mut |_| Ok(()))
}
