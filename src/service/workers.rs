//! The workers built from one configuration (the mirror, the lanes, the webhook edge), not yet
//! running: the service runs each on its own thread; `jobmirror replay` drives them step by
//! step on a virtual clock.

use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, bounded};

use super::sync::Mirror;
use super::{events, processor, reload};
use crate::clock::SharedClock;
use crate::config::Config;
use crate::health::{Metrics, Progress};
use crate::store::Store;
use processor::{Processor, ProcessorConfig};

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
        let sync_store = super::shared::open(cfg, super::shared::Open::Migrate)?;
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
                    store: super::shared::open(cfg, super::shared::Open::Connect)?,
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
                super::shared::open(cfg, super::shared::Open::Connect)?,
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
