//! The event thread (`jm-events`): takes verified webhook deliveries from the receiver's
//! bounded queue, commits each batch in one transaction, answers every delivery with what its
//! commit did (so its 2xx goes out only then), and nudges the sync thread to act on them.
//!
//! Invariant: nothing is acknowledged before it is committed; a failed commit answers every
//! delivery of its batch with the error (the receiver turns it into 503), and loses nothing
//! already committed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::clock::SharedClock;
use crate::edge::webhook::Job;
use crate::store::{Delivery, Store, Stored};

/// Largest batch the event thread commits in one transaction.
pub const BATCH_MAX: usize = 256;

pub use crate::store::Quota;

/// What is stored now, as the event thread counts it.
struct Usage {
    by_company: HashMap<String, u64>,
    total: u64,
    read_at: Instant,
}

impl Usage {
    fn read(store: &Store) -> Option<Usage> {
        let rows = match store.delivery_bytes_by_company() {
            Ok(r) => r,
            Err(e) => {
                log::warn!("could not read the stored deliveries' size: {e}");
                return None;
            }
        };
        let total = rows.iter().map(|(_, n)| n).sum();
        Some(Usage {
            by_company: rows.into_iter().collect(),
            total,
            read_at: crate::clock::monotonic(),
        })
    }

    fn size(d: &Delivery) -> u64 {
        (d.body.len() + d.headers.to_string().len()) as u64
    }

    /// `None` when `d` fits; else whether its company's bound (true) or the total is reached.
    fn over(&self, quota: Quota, d: &Delivery) -> Option<bool> {
        let n = Usage::size(d);
        let company = d.company_id.as_deref().unwrap_or("");
        let used = self.by_company.get(company).copied().unwrap_or(0);
        if used.saturating_add(n) > quota.per_company {
            Some(true)
        } else if self.total.saturating_add(n) > quota.total {
            Some(false)
        } else {
            None
        }
    }

    fn add(&mut self, d: &Delivery) {
        let n = Usage::size(d);
        *self
            .by_company
            .entry(d.company_id.clone().unwrap_or_default())
            .or_insert(0) += n;
        self.total += n;
    }
}

/// Deliveries over the quota are answered without being stored (a retry of one already
/// stored is still a duplicate); the others go on to the commit, in order.
fn apply_quota(
    store: &Store,
    quota: Quota,
    usage: &mut Option<Usage>,
    batch: Vec<Job>,
) -> Vec<Job> {
    if quota == Quota::NONE {
        return batch;
    }
    if usage
        .as_ref()
        .is_none_or(|u| u.read_at.elapsed() > Duration::from_secs(60))
    {
        *usage = Usage::read(store).or(usage.take());
    }
    let Some(u) = usage.as_mut() else {
        return batch;
    };
    let mut kept = Vec::with_capacity(batch.len());
    for (d, tx) in batch {
        match u.over(quota, &d) {
            None => {
                // Counted now: the rest of the batch sees it (a duplicate over-counts a little
                // until the next read).
                u.add(&d);
                kept.push((d, tx));
            }
            Some(company) => {
                let answer = match store.delivery_stored(&d.webhook_id) {
                    Ok(true) => Ok(Stored::Duplicate),
                    Ok(false) => Ok(Stored::OverQuota { company }),
                    Err(e) => Err(e.to_string()),
                };
                let _ = tx.send(answer);
            }
        }
    }
    kept
}

/// The event thread: commits deliveries in batches, answers each, then nudges the sync thread
/// (capacity 1) to read the named jobs. Ends when the queue is closed or `shutdown` drops.
pub fn run_event_thread(
    store: Store,
    clock: SharedClock,
    queue: Receiver<Job>,
    nudge: Sender<()>,
    shutdown: Receiver<()>,
    alive: Option<Arc<crate::health::Progress>>,
    quota: Quota,
) {
    let mut usage: Option<Usage> = None;
    let tick = alive.as_ref().map_or(crate::health::TICK, |a| a.tick());
    loop {
        if let Some(a) = &alive {
            a.beat();
        }
        let first = crossbeam_channel::select! {
            recv(queue) -> m => match m { Ok(j) => j, Err(_) => return },
            recv(shutdown) -> _ => return,
            default(tick) => continue,
        };
        // Group commit: everything already queued shares one fsync. (A short wait for more
        // was measured and made 4-client ingest slower: see BENCHMARKS.md.)
        let mut batch = vec![first];
        while batch.len() < BATCH_MAX {
            match queue.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let batch = apply_quota(&store, quota, &mut usage, batch);
        if batch.is_empty() {
            continue;
        }
        let deliveries: Vec<&Delivery> = batch.iter().map(|(d, _)| d).collect();
        match store.insert_deliveries(&deliveries, clock.now()) {
            Ok(results) => {
                let any_new = results.contains(&Stored::New);
                for ((_, tx), stored) in batch.into_iter().zip(results) {
                    let _ = tx.send(Ok(stored));
                }
                if any_new {
                    let _ = nudge.try_send(());
                }
            }
            Err(e) => {
                log::error!("could not commit {} webhook deliveries: {e}", batch.len());
                for (_, tx) in batch {
                    let _ = tx.send(Err(e.to_string()));
                }
            }
        }
    }
}
