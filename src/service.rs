//! Wiring: the one place that opens the store for each thread, builds the client, spawns the
//! named threads and connects them with bounded channels.
//!
//! Threads: `jm-sync` (mirror), `jm-processor` (processor), and in `run` the main thread
//! waiting on signals. Channels: `wake` (sync -> processor, capacity 1: wakes coalesce),
//! `trigger` (signal/CLI -> sync, capacity 1), `shutdown` (closed to stop everyone),
//! `done` (each thread reports its exit, so a stop is bounded in time).
//!
//! Invariant: nothing here decides anything about jobs; a stop never waits longer than the
//! configured bound.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::clock::{SharedClock, monotonic};
use crate::config::Config;
use crate::mirror::{self, Mirror};
use crate::pleo::PleoClient;
use crate::processor::{self, Processor, ProcessorConfig, RoundReport};
use crate::store::Store;

pub struct Service {
    threads: Vec<(&'static str, JoinHandle<()>)>,
    shutdown: Option<Sender<()>>,
    trigger: Sender<()>,
    done: Receiver<&'static str>,
    webhook_server: Option<crate::httpd::Server>,
    webhook_counters: Option<Arc<crate::webhook::Counters>>,
    instance_store: Store,
}

struct DoneGuard(&'static str, Sender<&'static str>);
impl Drop for DoneGuard {
    fn drop(&mut self) {
        let _ = self.1.send(self.0);
    }
}

pub fn processor_config(cfg: &Config) -> ProcessorConfig {
    ProcessorConfig {
        deadline_warning: cfg.deadline_warning,
        claim_min_left: cfg.claim_min_left,
        claims_per_round_max: cfg.claims_per_round_max,
        conflict_backoff: cfg.conflict_backoff,
    }
}

/// The webhook edge, built but not yet listening: the receiver (verify, enqueue, wait for the
/// commit) and what the event thread needs to commit.
pub struct EventEdge {
    pub store: Store,
    pub receiver: crate::webhook::WebhookReceiver,
    pub queue: Receiver<crate::webhook::Job>,
    pub counters: Arc<crate::webhook::Counters>,
}

/// The workers, built from one configuration but not yet running. The service runs each on
/// its own thread; `jobmirror replay` drives the same objects step by step on a virtual clock.
pub struct Workers {
    pub mirror: Mirror,
    pub processor: Processor,
    pub events: Option<EventEdge>,
}

impl Workers {
    /// Opens the store (applying migrations) and builds the workers. New work found by the
    /// mirror is signalled on `wake`.
    pub fn build(
        cfg: &Config,
        clock: SharedClock,
        wake: Sender<()>,
        milestones: Option<Sender<crate::pipeline::Milestone>>,
    ) -> anyhow::Result<Workers> {
        let handler = cfg.require_handler()?;
        let sync_store = Store::open(&cfg.db)?;
        sync_store.relax_durability()?;
        // The first handle applied the migrations; the others only connect.
        let proc_store = Store::connect(&cfg.db)?;
        let client = Arc::new(PleoClient::new(cfg.client_config(), clock.clone())?);
        let events = match &cfg.webhook {
            Some(wh) => {
                let (queue_tx, queue) = bounded::<crate::webhook::Job>(wh.queue_max);
                let counters = Arc::new(crate::webhook::Counters::default());
                Some(EventEdge {
                    store: Store::connect(&cfg.db)?,
                    receiver: crate::webhook::WebhookReceiver::new(
                        wh.secrets.clone(),
                        clock.clone(),
                        queue_tx,
                        counters.clone(),
                    ),
                    queue,
                    counters,
                })
            }
            None => None,
        };
        let mirror = Mirror::new(
            sync_store,
            client.clone(),
            clock.clone(),
            cfg.company_ids.clone(),
        )
        .with_wake(wake)
        .with_resume_unknown_in_progress(cfg.resume_unknown_in_progress);
        let stage = crate::pipeline::HandlerStage::new(
            client.clone(),
            clock.clone(),
            handler,
            cfg.pipeline.clone(),
        );
        let stage = match milestones {
            Some(tx) => stage.with_milestones(tx),
            None => stage,
        };
        let processor = Processor::new(
            proc_store,
            client,
            clock,
            cfg.company_ids.clone(),
            processor_config(cfg),
        )
        .with_stage(Box::new(stage));
        Ok(Workers {
            mirror,
            processor,
            events,
        })
    }
}

impl Service {
    /// Opens the store (applying migrations), then starts the sync and processor threads.
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
        progress: Option<Sender<RoundReport>>,
        milestones: Option<Sender<crate::pipeline::Milestone>>,
    ) -> anyhow::Result<Service> {
        cfg.require_handler()?;
        // The webhook port first: if it cannot be bound, nothing else starts.
        let listener = match &cfg.webhook {
            Some(wh) => Some(std::net::TcpListener::bind(&wh.listen).map_err(|e| {
                anyhow::anyhow!("cannot listen for webhooks on {}: {e}", wh.listen)
            })?),
            None => None,
        };
        let started_at = clock.now();
        let (shutdown_tx, shutdown_rx) = bounded::<()>(0);
        let (wake_tx, wake_rx) = bounded::<()>(1);
        let (trigger_tx, trigger_rx) = bounded::<()>(1);
        let (nudge_tx, nudge_rx) = bounded::<()>(1);
        let (done_tx, done_rx) = bounded::<&'static str>(8);
        let Workers {
            mirror,
            processor,
            events,
        } = Workers::build(cfg, clock.clone(), wake_tx, milestones)?;
        let instance_store = Store::connect(&cfg.db)?;
        let mut threads = Vec::new();

        let mut webhook_server = None;
        let mut webhook_counters = None;
        if let (Some(edge), Some(listener), Some(wh)) = (events, listener, &cfg.webhook) {
            let (sd, done, c) = (shutdown_rx.clone(), done_tx.clone(), clock.clone());
            let (events_store, queue_rx) = (edge.store, edge.queue);
            threads.push((
                "jm-events",
                std::thread::Builder::new()
                    .name("jm-events".into())
                    .spawn(move || {
                        let _g = DoneGuard("jm-events", done);
                        crate::webhook::run_event_thread(events_store, c, queue_rx, nudge_tx, sd);
                    })?,
            ));
            let limits = crate::httpd::Limits {
                connections_max: wh.connections_max,
                body_bytes_max: wh.body_bytes_max,
                header_bytes_max: 16 * 1024,
                header_timeout: Duration::from_secs(10),
                body_timeout: Duration::from_secs(10),
                idle_timeout: Duration::from_secs(30),
                write_timeout: Duration::from_secs(10),
            };
            let server = crate::httpd::Server::start(
                listener,
                limits,
                Arc::new(edge.receiver),
                "jm-webhook",
            )?;
            log::info!(
                "webhook receiver listening on {}{}",
                server.local_addr(),
                crate::webhook::PATH
            );
            webhook_server = Some(server);
            webhook_counters = Some(edge.counters);
        }

        let interval = cfg.poll_interval;
        let (sd, done) = (shutdown_rx.clone(), done_tx.clone());
        threads.push((
            "jm-sync",
            std::thread::Builder::new()
                .name("jm-sync".into())
                .spawn(move || {
                    let _g = DoneGuard("jm-sync", done);
                    mirror::run(mirror, interval, trigger_rx, nudge_rx, sd);
                })?,
        ));
        let (sd, done) = (shutdown_rx, done_tx);
        threads.push((
            "jm-processor",
            std::thread::Builder::new()
                .name("jm-processor".into())
                .spawn(move || {
                    let _g = DoneGuard("jm-processor", done);
                    processor::run(processor, wake_rx, sd, progress, Duration::from_secs(60));
                })?,
        ));
        log::info!(
            "jobmirror started: {} companies, poll every {} s, database {}",
            cfg.company_ids.len(),
            cfg.poll_interval.as_secs(),
            cfg.db.display()
        );
        if let Err(e) = instance_store.register_instance(std::process::id(), started_at) {
            log::warn!("could not record this process for `jobmirror trigger`: {e}");
        }
        Ok(Service {
            threads,
            shutdown: Some(shutdown_tx),
            trigger: trigger_tx,
            done: done_rx,
            webhook_server,
            webhook_counters,
            instance_store,
        })
    }

    /// Where the webhook receiver listens, if it runs.
    pub fn webhook_addr(&self) -> Option<std::net::SocketAddr> {
        self.webhook_server.as_ref().map(|s| s.local_addr())
    }

    pub fn webhook_counters(&self) -> Option<Arc<crate::webhook::Counters>> {
        self.webhook_counters.clone()
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
        let _ = self.instance_store.unregister_instance(std::process::id());
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

/// `jobmirror run`: the service until SIGTERM or SIGINT; SIGUSR1 runs detection now.
pub fn run(cfg: &Config, clock: SharedClock) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGUSR1])?;
    let service = Service::start(cfg, clock, None)?;
    for sig in signals.forever() {
        match sig {
            SIGUSR1 => {
                log::info!("SIGUSR1: running detection now");
                service.trigger();
            }
            _ => {
                log::info!("signal {sig}: stopping");
                break;
            }
        }
    }
    if service.stop(cfg.shutdown_timeout) {
        log::info!("stopped cleanly");
        Ok(())
    } else {
        anyhow::bail!(
            "some threads did not stop within {} s",
            cfg.shutdown_timeout.as_secs()
        )
    }
}
