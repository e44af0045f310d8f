//! The listing pool: a few plain threads that run companies' listing passes side by side, so
//! that with a real network (each request some tens of milliseconds) the sync thread is not
//! limited to one listing at a time, and never itself waits behind a batch of due polls.
//!
//! Workers only fetch (requests, no database: the pool costs no file descriptors beyond its
//! connections); the sync thread stores what they fetched. Work comes in two queues: *urgent* (recovery
//! passes, triggers) is always taken first, *routine* (scheduled polls) otherwise; a routine
//! pass's requests are also routine for the credential's pacer ([`crate::pleo::pacer`]), so a
//! job in hand or a webhook-named company goes ahead of them. Results go back to the sync
//! thread, which stores them and alone keeps the books (recovered companies, failing companies,
//! wakes).

use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, select};

use crate::clock::SharedClock;
use crate::pleo::Clients;
use crate::pleo::pacer::Priority;
use crate::service::sync::listing::{Fetched, fetch, fetch_by_credential};
use crate::service::sync::pass::PassKind;

/// One company's pass, to run.
#[derive(Debug)]
pub struct Task {
    pub company: String,
    pub kind: PassKind,
    /// A scheduled poll: taken after urgent passes, its requests routine for the pacer, its
    /// result not waited for.
    pub routine: bool,
    /// A listing by credential for the default credential's companies (`company` unused).
    pub group: bool,
}

/// One company's pass, done.
#[derive(Debug)]
pub struct Done {
    pub company: String,
    pub kind: PassKind,
    pub routine: bool,
    pub group: bool,
    pub fetched: Fetched,
}

pub struct ListingPool {
    urgent: Option<Sender<Task>>,
    routine: Option<Sender<Task>>,
    done: Receiver<Done>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// What every worker shares.
#[derive(Clone)]
pub struct PoolParts {
    pub clients: Arc<Clients>,
    pub clock: SharedClock,
    pub stopping: Option<Arc<crate::health::Stopping>>,
}

impl ListingPool {
    /// `threads` workers (at least one).
    pub fn start(threads: usize, parts: PoolParts) -> anyhow::Result<ListingPool> {
        let (urgent_tx, urgent_rx) = crossbeam_channel::unbounded::<Task>();
        let (routine_tx, routine_rx) = crossbeam_channel::unbounded::<Task>();
        let (done_tx, done_rx) = crossbeam_channel::unbounded::<Done>();
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let (urgent, routine, done, parts) = (
                urgent_rx.clone(),
                routine_rx.clone(),
                done_tx.clone(),
                parts.clone(),
            );
            handles.push(
                std::thread::Builder::new()
                    .name(format!("jm-listing-{i}"))
                    .spawn(move || work(parts, urgent, routine, done))?,
            );
        }
        Ok(ListingPool {
            urgent: Some(urgent_tx),
            routine: Some(routine_tx),
            done: done_rx,
            threads: handles,
        })
    }

    pub fn submit(&self, task: Task) {
        let queue = if task.routine {
            &self.routine
        } else {
            &self.urgent
        };
        if let Some(q) = queue {
            // The workers end only when the pool is dropped.
            let _ = q.send(task);
        }
    }

    /// Where finished passes arrive.
    pub fn done(&self) -> &Receiver<Done> {
        &self.done
    }
}

impl Drop for ListingPool {
    fn drop(&mut self) {
        // Closing the queues ends each worker after its current pass.
        self.urgent = None;
        self.routine = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn work(parts: PoolParts, urgent: Receiver<Task>, routine: Receiver<Task>, done: Sender<Done>) {
    loop {
        let task = match urgent.try_recv() {
            Ok(t) => t,
            Err(_) => select! {
                recv(urgent) -> t => match t { Ok(t) => t, Err(_) => return },
                recv(routine) -> t => match t { Ok(t) => t, Err(_) => return },
            },
        };
        if parts.stopping.as_ref().is_some_and(|s| s.is_set()) {
            return;
        }
        let _priority = if task.routine {
            Priority::Routine
        } else {
            Priority::Urgent
        }
        .enter();
        let fetched = if task.group {
            fetch_by_credential(&parts.clients, &parts.clock, task.kind)
        } else {
            fetch(&parts.clients, &parts.clock, &task.company, task.kind)
        };
        if done
            .send(Done {
                company: task.company,
                kind: task.kind,
                routine: task.routine,
                group: task.group,
                fetched,
            })
            .is_err()
        {
            return;
        }
    }
}
