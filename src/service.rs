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

impl Service {
    /// Opens the store (applying migrations), then starts the sync and processor threads.
    pub fn start(
        cfg: &Config,
        clock: SharedClock,
        progress: Option<Sender<RoundReport>>,
    ) -> anyhow::Result<Service> {
        let sync_store = Store::open(&cfg.db)?;
        let proc_store = Store::open(&cfg.db)?;
        let client = Arc::new(PleoClient::new(cfg.client_config(), clock.clone())?);
        let (shutdown_tx, shutdown_rx) = bounded::<()>(0);
        let (wake_tx, wake_rx) = bounded::<()>(1);
        let (trigger_tx, trigger_rx) = bounded::<()>(1);
        let (done_tx, done_rx) = bounded::<&'static str>(4);

        let mirror = Mirror::new(
            sync_store,
            client.clone(),
            clock.clone(),
            cfg.company_ids.clone(),
        )
        .with_wake(wake_tx)
        .with_resume_unknown_in_progress(cfg.resume_unknown_in_progress);
        let processor = Processor::new(
            proc_store,
            client,
            clock,
            cfg.company_ids.clone(),
            processor_config(cfg),
        );

        let mut threads = Vec::new();
        let interval = cfg.poll_interval;
        let (sd, done) = (shutdown_rx.clone(), done_tx.clone());
        threads.push((
            "jm-sync",
            std::thread::Builder::new()
                .name("jm-sync".into())
                .spawn(move || {
                    let _g = DoneGuard("jm-sync", done);
                    mirror::run(mirror, interval, trigger_rx, sd);
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
        Ok(Service {
            threads,
            shutdown: Some(shutdown_tx),
            trigger: trigger_tx,
            done: done_rx,
        })
    }

    /// Asks the sync thread to run detection now (coalesced with a trigger already queued).
    pub fn trigger(&self) {
        let _ = self.trigger.try_send(());
    }

    /// Stops all threads; returns false if some did not stop within `timeout` (they are
    /// abandoned: every store write is a transaction, so nothing half-written remains).
    pub fn stop(mut self, timeout: Duration) -> bool {
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
