//! The event thread (`jm-events`): takes verified webhook deliveries from the receiver's
//! bounded queue, commits each batch in one transaction, answers every delivery with what its
//! commit did (so its 2xx goes out only then), and nudges the sync thread to act on them.
//!
//! Invariant: nothing is acknowledged before it is committed; a failed commit answers every
//! delivery of its batch with the error (the receiver turns it into 503), and loses nothing
//! already committed.

use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use crate::clock::SharedClock;
use crate::edge::webhook::Job;
use crate::store::{Delivery, Store, Stored};

/// Largest batch the event thread commits in one transaction.
pub const BATCH_MAX: usize = 256;

/// The event thread: commits deliveries in batches, answers each, then nudges the sync thread
/// (capacity 1) to read the named jobs. Ends when the queue is closed or `shutdown` drops.
pub fn run_event_thread(
    store: Store,
    clock: SharedClock,
    queue: Receiver<Job>,
    nudge: Sender<()>,
    shutdown: Receiver<()>,
    alive: Option<Arc<crate::health::Progress>>,
) {
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
