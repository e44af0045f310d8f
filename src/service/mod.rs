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
pub mod shared;
pub mod sockets;
pub mod sync;
pub mod systemd;
mod workers;

pub use workers::{EventEdge, Lane, Workers, processor_config};

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::clock::{SharedClock, monotonic};
use crate::config::Config;
use crate::health::{Metrics, Progress};
use crate::store::Store;
use processor::RoundReport;
use reload::Companies;

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
    /// One service per SQLite file, for as long as this value lives.
    _lock: Option<crate::store::DbLock>,
}

struct DoneGuard(String, Sender<String>);
impl Drop for DoneGuard {
    fn drop(&mut self) {
        let _ = self.1.send(self.0.clone());
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
        let lock = shared::lock(cfg)?;
        // The configuration's companies merged with the database's (migrated first).
        let base = cfg;
        let (rows, seen) = {
            let store = shared::open(cfg, shared::Open::Migrate)?;
            // The version first: a change made after it is applied at the first check.
            let seen = store.companies_version()?;
            (store.company_rows()?, seen)
        };
        // Merged only when the table has rows (no second copy of a large configuration).
        let merged = (!rows.is_empty()).then(|| base.with_companies(&rows));
        let cfg = merged.as_ref().unwrap_or(base);
        // A shared PostgreSQL database: only the companies this instance holds a lease on.
        let held_cfg;
        let (cfg, leases) = match shared::join(base, cfg)? {
            Some((c, l)) => {
                held_cfg = c;
                (&held_cfg, Some(l))
            }
            None => (cfg, None),
        };
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
        let listener = shared::listen(cfg, nudge_tx.clone(), shutdown_rx.clone())?;
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
        let instance_store = shared::open(cfg, shared::Open::Connect)?;
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
                    store: std::sync::Mutex::new(shared::open(cfg, shared::Open::ReadOnly)?),
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
            // With leases the served list is narrowed: the base keeps every company.
            (merged.is_some() || leases.is_some()).then(|| base.clone()),
            shared::open(cfg, shared::Open::Connect)?,
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
        if let Some(f) = listener {
            spawn("jm-listen".into(), f)?;
        }
        if let Some(l) = leases {
            let (c, sd) = (companies.clone(), shutdown_rx.clone());
            spawn("jm-leases".into(), Box::new(move || shared::run(l, c, sd)))?;
        }
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
