//! Wiring: the one place that builds the workers from a configuration, opens the store for each
//! thread, spawns the named threads and connects them with bounded channels. The threads are
//! siblings here: `sync`, `events`, `processor`; `systemd` is `jobmirror run`, the service
//! under systemd (notify, watchdog, signals), and `notify` its protocol.
//!
//! Threads: `jm-sync` (mirror), `jm-processor` (or `jm-processor-N` per lane), `jm-events` and
//! the webhook listener when configured, the admin listener, `jm-watchdog`, and in `run` the
//! main thread waiting on signals. Channels: `wake` (sync -> each lane, capacity 1: wakes
//! coalesce), `trigger` (signal/CLI -> sync, capacity 1), `shutdown` (closed to stop everyone),
//! `done` (each thread reports its exit, so a stop is bounded in time).
//!
//! Invariant: nothing here decides anything about jobs; a stop never waits longer than the
//! configured bound; `WATCHDOG=1` is sent only while every worker thread makes progress.

pub mod events;
pub mod notify;
pub mod processor;
pub mod reload;
pub mod sockets;
pub mod sync;
pub mod systemd;

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::clock::{SharedClock, monotonic};
use crate::config::Config;
use crate::health::{Metrics, Progress};
use crate::store::Store;
use processor::{Processor, ProcessorConfig, RoundReport};
use reload::Companies;
use sync::Mirror;

pub struct Service {
    threads: Vec<(String, JoinHandle<()>)>,
    shutdown: Option<Sender<()>>,
    trigger: Sender<()>,
    done: Receiver<String>,
    webhook_server: Option<crate::edge::httpd::Server>,
    webhook_counters: Option<Arc<crate::edge::webhook::Counters>>,
    admin_server: Option<crate::edge::httpd::Server>,
    instance_store: Store,
    progress: Arc<Progress>,
    /// The counters `/metrics` shows.
    pub metrics: Arc<Metrics>,
    stopping: Arc<crate::health::Stopping>,
    /// The companies served: the configuration's and the database's (see [`reload::Companies`]).
    companies: Arc<std::sync::Mutex<reload::Companies>>,
    /// Duplicates of the listeners, handed on by a restart in place ([`sockets`]).
    listeners: Vec<(String, std::net::TcpListener)>,
    /// One service per database, for as long as this value lives.
    _lock: crate::store::DbLock,
}

struct DoneGuard(String, Sender<String>);
impl Drop for DoneGuard {
    fn drop(&mut self) {
        let _ = self.1.send(self.0.clone());
    }
}

pub fn processor_config(cfg: &Config) -> ProcessorConfig {
    ProcessorConfig {
        deadline_warning: cfg.deadline_warning,
        claim_min_left: cfg.claim_min_left,
        claims_per_round_max: cfg.claims_per_round_max,
        conflict_backoff: cfg.conflict_backoff,
        // At least every poll interval (and at once on a wake: a poll, trigger or webhook).
        readiness_retry: cfg.poll_interval.min(std::time::Duration::from_secs(300)),
        not_ready_fail_margin: cfg.not_ready_fail_margin,
    }
}

/// The webhook edge, built but not yet listening: the receiver (verify, enqueue, wait for the
/// commit) and what the event thread needs to commit.
pub struct EventEdge {
    pub store: Store,
    pub receiver: crate::edge::webhook::WebhookReceiver,
    pub queue: Receiver<crate::edge::webhook::Job>,
    pub counters: Arc<crate::edge::webhook::Counters>,
    pub quota: events::Quota,
}

/// One processor lane, the channel that wakes it, and the one that changes its companies.
pub struct Lane {
    pub name: String,
    pub processor: Processor,
    pub wake: Receiver<()>,
    pub companies: Receiver<Vec<String>>,
}

/// The workers, built from one configuration but not yet running. The service runs each on
/// its own thread; `jobmirror replay` drives the same objects step by step on a virtual clock.
pub struct Workers {
    pub mirror: Mirror,
    pub lanes: Vec<Lane>,
    pub events: Option<EventEdge>,
    pub progress: Arc<Progress>,
    pub metrics: Arc<Metrics>,
    pub stopping: Arc<crate::health::Stopping>,
    /// Every credential's client (the per-company ones can be replaced by a reload).
    pub clients: Arc<crate::pleo::Clients>,
    /// Each lane's companies, and where to send it new ones.
    pub lane_companies: Vec<(Sender<Vec<String>>, Vec<String>)>,
    /// Which lane holds each company's work (shared by the lanes and the reload).
    pub owners: Arc<processor::Owners>,
    /// What the lanes call before a claim to catch up with the `companies` table (set once
    /// the service's [`Companies`] exists).
    pub gate: Arc<reload::CompaniesGate>,
}

pub use processor::split_lanes;

impl Workers {
    /// Opens the store (applying migrations) and builds the workers.
    pub fn build(
        cfg: &Config,
        clock: SharedClock,
        milestones: Option<Sender<crate::processing::pipeline::Milestone>>,
    ) -> anyhow::Result<Workers> {
        Workers::build_watched(cfg, clock, milestones, None)
    }

    /// As [`Workers::build`]; every lane's handler runs are told to `watch` (the replay's).
    pub fn build_watched(
        cfg: &Config,
        clock: SharedClock,
        milestones: Option<Sender<crate::processing::pipeline::Milestone>>,
        watch: Option<Arc<dyn crate::processing::pipeline::RunWatch>>,
    ) -> anyhow::Result<Workers> {
        let handler = cfg.require_handler()?;
        let sync_store = Store::open(&cfg.db)?;
        sync_store.relax_durability()?;
        let progress = Arc::new(Progress::new(cfg.health_stale));
        let stopping = Arc::new(crate::health::Stopping::default());
        let metrics = Arc::new(Metrics::default());
        let client = cfg.clients(clock.clone(), &progress, &metrics)?;
        let events = match &cfg.webhook {
            Some(wh) => {
                let (queue_tx, queue) = bounded::<crate::edge::webhook::Job>(wh.queue_max);
                let counters = Arc::new(crate::edge::webhook::Counters::default());
                Some(EventEdge {
                    // The first handle applied the migrations; the others only connect.
                    store: Store::connect(&cfg.db)?,
                    receiver: crate::edge::webhook::WebhookReceiver::new(
                        wh.secrets.clone(),
                        clock.clone(),
                        queue_tx,
                        counters.clone(),
                    ),
                    queue,
                    counters,
                    quota: wh.quota,
                })
            }
            None => None,
        };
        let recovered = Arc::new(crate::service::sync::Recovered::default());
        let groups = split_lanes(&cfg.company_ids, cfg.lanes);
        let owners = Arc::new(processor::Owners::default());
        let gate = Arc::new(reload::CompaniesGate::default());
        let mut lanes = Vec::new();
        let mut wakes = Vec::new();
        let mut lane_companies = Vec::new();
        for (i, companies) in groups.into_iter().enumerate() {
            let (wake_tx, wake_rx) = bounded::<()>(1);
            wakes.push(wake_tx);
            let (companies_tx, companies_rx) = crossbeam_channel::unbounded::<Vec<String>>();
            lane_companies.push((companies_tx, companies.clone()));
            let stage = crate::processing::pipeline::HandlerStage::new(
                client.clone(),
                clock.clone(),
                handler.clone(),
                cfg.pipeline.clone(),
            )
            .with_health(progress.clone(), metrics.clone())
            .with_stopping(stopping.clone())
            .with_marker_scope(&cfg.db);
            let stage = match &milestones {
                Some(tx) => stage.with_milestones(tx.clone()),
                None => stage,
            };
            let stage = match &watch {
                Some(w) => stage.with_watch(w.clone()),
                None => stage,
            };
            let processor = Processor::new(
                Store::connect(&cfg.db)?,
                client.clone(),
                clock.clone(),
                companies,
                processor_config(cfg),
            )
            .with_recovered(recovered.clone())
            .with_metrics(metrics.clone())
            .with_stopping(stopping.clone())
            .with_stage(Box::new(stage))
            .with_lane(i, owners.clone())
            .with_confirm_by_company(cfg.list_by_credential)
            .with_updates(companies_rx.clone())
            .with_catch_up(gate.clone());
            let name = if cfg.lanes <= 1 {
                "jm-processor".to_owned()
            } else {
                format!("jm-processor-{i}")
            };
            lanes.push(Lane {
                name,
                processor,
                wake: wake_rx,
                companies: companies_rx,
            });
        }
        let pool = crate::service::sync::pool::ListingPool::start(
            cfg.listing_threads as usize,
            crate::service::sync::pool::PoolParts {
                clients: client.clone(),
                clock: clock.clone(),
                stopping: Some(stopping.clone()),
            },
        )?;
        let mirror = Mirror::new(sync_store, client.clone(), clock, cfg.company_ids.clone())
            .with_pool(pool)
            .with_wake(wakes)
            .with_metrics(metrics.clone())
            .with_stopping(stopping.clone())
            .with_recovered(recovered)
            .with_resume_unknown_in_progress(cfg.resume_unknown_in_progress)
            .with_listing_by_credential(cfg.list_by_credential)
            .with_shard(cfg.shard);
        Ok(Workers {
            mirror,
            lanes,
            events,
            progress,
            metrics,
            stopping,
            clients: client,
            lane_companies,
            owners,
            gate,
        })
    }
}

impl Service {
    /// Applies a reload that changes the companies alone, in place (see [`reload`]); `None`
    /// when `new` changes more (the caller restarts in place).
    pub fn apply_companies(
        &mut self,
        new: &Config,
    ) -> anyhow::Result<Option<reload::CompaniesChanged>> {
        self.companies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .apply_base(new)
    }

    /// How many companies are served now.
    pub fn companies_served(&self) -> usize {
        self.companies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .served()
    }

    /// Opens the store (applying migrations), then starts the threads.
    pub fn start(
        cfg: &Config,
        clock: SharedClock,
        progress: Option<Sender<RoundReport>>,
    ) -> anyhow::Result<Service> {
        Service::start_observed(cfg, clock, progress, None)
    }

    /// As [`Service::start`], also sending processing milestones (tests, the demo).
    pub fn start_observed(
        cfg: &Config,
        clock: SharedClock,
        rounds: Option<Sender<RoundReport>>,
        milestones: Option<Sender<crate::processing::pipeline::Milestone>>,
    ) -> anyhow::Result<Service> {
        cfg.require_handler()?;
        cfg.warnings().iter().for_each(|w| log::warn!("{w}"));
        crate::memory::limit_malloc_arenas();
        crate::edge::raise_fd_limit_logged();
        // One service per database: a second one would process the same jobs twice.
        let lock = crate::store::DbLock::acquire(&cfg.db).map_err(|e| anyhow::anyhow!(e))?;
        // The configuration's companies merged with the database's (migrated first).
        let base = cfg;
        let (rows, seen) = {
            let store = Store::open(&cfg.db)?;
            // The version first: a change made after it is applied at the first check.
            let seen = store.companies_version()?;
            (store.company_rows()?, seen)
        };
        // Merged only when the table has rows (no second copy of a large configuration).
        let merged = (!rows.is_empty()).then(|| base.with_companies(&rows));
        let cfg = merged.as_ref().unwrap_or(base);
        // Ports first: if one cannot be bound, nothing else starts.
        let mut listeners = Vec::new();
        let webhook_listener = match &cfg.webhook {
            Some(wh) => Some(sockets::bind("webhooks", &wh.listen, &mut listeners)?),
            None => None,
        };
        let admin_listener = match &cfg.admin_listen {
            Some(a) => Some(sockets::bind("the admin listener", a, &mut listeners)?),
            None => None,
        };
        sockets::close_unused();
        let started_at = clock.now();
        let (shutdown_tx, shutdown_rx) = bounded::<()>(0);
        let (trigger_tx, trigger_rx) = bounded::<()>(1);
        let (nudge_tx, nudge_rx) = bounded::<()>(1);
        let (done_tx, done_rx) = bounded::<String>(64);
        let Workers {
            mirror,
            lanes,
            events,
            progress,
            metrics,
            stopping,
            clients,
            lane_companies,
            owners,
            gate,
        } = Workers::build(cfg, clock.clone(), milestones)?;
        let (companies_tx, companies_rx) = crossbeam_channel::unbounded::<sync::run::CompanyList>();
        let instance_store = Store::connect(&cfg.db)?;
        let mut threads = Vec::new();
        let mut spawn = |name: String, f: Box<dyn FnOnce() + Send>| -> anyhow::Result<()> {
            let done = done_tx.clone();
            let n = name.clone();
            let h = std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || {
                    let _g = DoneGuard(n, done);
                    f();
                })?;
            threads.push((name, h));
            Ok(())
        };

        let mut webhook_server = None;
        let mut http_refusals: Vec<(&'static str, Arc<crate::edge::httpd::Refusals>)> = Vec::new();
        let mut webhook_counters = None;
        let mut company_secrets = None;
        if let (Some(edge), Some(listener), Some(wh)) = (events, webhook_listener, &cfg.webhook) {
            company_secrets = Some(edge.receiver.company_secrets());
            // Before the first delivery can arrive: a company's own secret opens only it.
            *edge
                .receiver
                .company_secrets()
                .write()
                .unwrap_or_else(|p| p.into_inner()) = reload::served_secrets(cfg, &rows);
            let (sd, c, alive) = (shutdown_rx.clone(), clock.clone(), progress.clone());
            let (events_store, queue_rx, quota) = (edge.store, edge.queue, edge.quota);
            progress.expect("jm-events");
            spawn(
                "jm-events".into(),
                Box::new(move || {
                    crate::service::events::run_event_thread(
                        events_store,
                        c,
                        queue_rx,
                        nudge_tx,
                        sd,
                        Some(alive),
                        quota,
                    )
                }),
            )?;
            let limits = crate::edge::httpd::Limits {
                connections_max: wh.connections_max,
                body_bytes_max: wh.body_bytes_max,
                header_bytes_max: 16 * 1024,
                header_timeout: Duration::from_secs(10),
                body_timeout: Duration::from_secs(10),
                idle_timeout: Duration::from_secs(30),
                write_timeout: Duration::from_secs(10),
                ..crate::edge::httpd::Limits::default()
            };
            let server = crate::edge::httpd::Server::start(
                listener,
                limits,
                Arc::new(edge.receiver),
                "jm-webhook",
            )?;
            http_refusals.push(("webhook", server.refusals()));
            log::info!(
                "webhook receiver listening on {}{}",
                server.local_addr(),
                crate::edge::webhook::PATH
            );
            webhook_server = Some(server);
            webhook_counters = Some(edge.counters);
        }

        let interval = cfg.poll_interval;
        let (sd, alive) = (shutdown_rx.clone(), progress.clone());
        let mut mirror = mirror;
        mirror.set_nudge(nudge_rx.clone());
        progress.expect("jm-sync");
        spawn(
            "jm-sync".into(),
            Box::new(move || {
                sync::run::run(
                    mirror,
                    interval,
                    trigger_rx,
                    nudge_rx,
                    companies_rx,
                    sd,
                    Some(alive),
                );
            }),
        )?;
        for lane in lanes {
            let (sd, alive, rounds) = (shutdown_rx.clone(), progress.clone(), rounds.clone());
            progress.expect(&lane.name);
            let (processor, wake, lane_rx) = (lane.processor, lane.wake, lane.companies);
            spawn(
                lane.name,
                Box::new(move || {
                    processor::run(
                        processor,
                        wake,
                        lane_rx,
                        sd,
                        rounds,
                        alive.tick().min(Duration::from_secs(60)),
                        Some(alive),
                    );
                }),
            )?;
        }

        let admin_server = match admin_listener {
            Some(listener) => {
                let refusals = Arc::new(crate::edge::httpd::Refusals::default());
                http_refusals.push(("admin", refusals.clone()));
                let admin = crate::ops::admin::Admin {
                    http: http_refusals.clone(),
                    started_at: started_at.0 as f64 / 1000.0,
                    progress: progress.clone(),
                    metrics: metrics.clone(),
                    webhooks: webhook_counters.clone(),
                    store: std::sync::Mutex::new(Store::open_read_only(&cfg.db)?),
                };
                let server = crate::edge::httpd::Server::start_counted(
                    listener,
                    crate::edge::httpd::Limits {
                        connections_max: 16,
                        ..crate::edge::httpd::Limits::default()
                    },
                    Arc::new(admin),
                    "jm-admin",
                    refusals,
                )?;
                log::info!(
                    "admin listener on http://{} (/metrics, /healthz)",
                    server.local_addr()
                );
                Some(server)
            }
            None => None,
        };
        log::info!(
            "jobmirror started: {} companies on {} lanes, poll every {} s, database {}",
            cfg.company_ids.len(),
            cfg.lanes.max(1).min(cfg.company_ids.len().max(1) as u32),
            cfg.poll_interval.as_secs(),
            cfg.db.display()
        );
        if cfg.shard.count > 1 {
            log::info!(
                "shard {}: serving {} of the {} companies listed",
                cfg.shard,
                cfg.company_ids.len(),
                cfg.companies_listed
            );
        }
        metrics.poll_interval_secs.store(
            cfg.poll_interval.as_secs(),
            std::sync::atomic::Ordering::Relaxed,
        );
        reload::announce_budget(cfg, &metrics);
        if let Err(e) = instance_store.register_instance(std::process::id(), started_at) {
            log::warn!("could not record this process for `jobmirror trigger`: {e}");
        }
        if cfg.company_ids.is_empty() {
            log::warn!(
                "no companies to serve yet: add one with `jobmirror companies add ID` (picked up within seconds) or in company_ids"
            );
        }
        let companies = Arc::new(std::sync::Mutex::new(Companies::new(
            merged.is_some().then(|| base.clone()),
            Store::connect(&cfg.db)?,
            seen,
            reload::Reloadable {
                companies: companies_tx,
                lanes: lane_companies,
                clients,
                cfg: cfg.clone(),
                owners,
            },
            company_secrets,
            metrics.clone(),
        )?));
        let _ = gate.0.set(companies.clone());
        {
            let (c, sd, clk) = (companies.clone(), shutdown_rx.clone(), clock.clone());
            spawn(
                "jm-companies".into(),
                Box::new(move || reload::watch(c, clk, sd)),
            )?;
        }
        Ok(Service {
            threads,
            shutdown: Some(shutdown_tx),
            trigger: trigger_tx,
            done: done_rx,
            webhook_server,
            webhook_counters,
            admin_server,
            instance_store,
            progress,
            metrics,
            stopping,
            companies,
            listeners,
            _lock: lock,
        })
    }

    /// Where the webhook receiver listens, if it runs.
    pub fn webhook_addr(&self) -> Option<std::net::SocketAddr> {
        self.webhook_server.as_ref().map(|s| s.local_addr())
    }

    /// Where the admin listener listens, if it runs.
    pub fn admin_addr(&self) -> Option<std::net::SocketAddr> {
        self.admin_server.as_ref().map(|s| s.local_addr())
    }

    pub fn webhook_counters(&self) -> Option<Arc<crate::edge::webhook::Counters>> {
        self.webhook_counters.clone()
    }

    /// Whether every worker thread has made progress recently.
    pub fn healthy(&self) -> bool {
        self.progress.healthy()
    }

    /// Asks the sync thread to run detection now (coalesced with a trigger already queued).
    pub fn trigger(&self) {
        let _ = self.trigger.try_send(());
    }

    /// Stops all threads; returns false if some did not stop within `timeout` (they are
    /// abandoned: every store write is a transaction, so nothing half-written remains).
    pub fn stop(mut self, timeout: Duration) -> bool {
        // Stop taking webhooks first; deliveries already queued are still committed and
        // answered before the event thread sees the shutdown.
        if let Some(mut s) = self.webhook_server.take() {
            s.shutdown();
        }
        if let Some(mut s) = self.admin_server.take() {
            s.shutdown();
        }
        let _ = self.instance_store.unregister_instance(std::process::id());
        self.stopping.set();
        drop(self.shutdown.take());
        let deadline = monotonic() + timeout;
        let mut finished = Vec::new();
        while finished.len() < self.threads.len() {
            let left = deadline.saturating_duration_since(monotonic());
            match self.done.recv_timeout(left) {
                Ok(name) => finished.push(name),
                Err(_) => break,
            }
        }
        let mut all = true;
        for (name, handle) in self.threads.drain(..) {
            if finished.contains(&name) {
                let _ = handle.join();
            } else {
                log::error!(
                    "thread {name} did not stop within {} s; abandoning it",
                    timeout.as_secs()
                );
                all = false;
            }
        }
        all
    }
}
