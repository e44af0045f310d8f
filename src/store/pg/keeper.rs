//! The lease keeper: runs an instance's lease rounds and answers, at any moment, whether this
//! instance may act for a company.
//!
//! The database fences every recorded intent ([`super::leases::fence`]); the keeper adds the
//! local half: a lease counts as held only until a deadline on this process's monotonic clock,
//! taken *before* the round that renewed it and shortened by a margin. The database's expiry is
//! at least the lease after the round's statement ran, so the local deadline always falls
//! earlier. A process paused past it (SIGSTOP, a frozen VM) finds on waking that it holds
//! nothing until a round says otherwise, so it sends nothing for a company it may have lost.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::leases::{Instance, LeaseError, Round};
use super::{PgStore, Result};
use crate::clock::{Millis, SharedClock};

/// This process's monotonic clock in milliseconds (a test passes one it controls).
pub type Mono = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The real monotonic clock (CLOCK_MONOTONIC: it runs on while the process is stopped), in
/// milliseconds since this clock was made.
pub fn system_mono() -> Mono {
    let start = crate::clock::monotonic();
    Arc::new(move || start.elapsed().as_millis() as i64)
}

/// How a round reads "now" for the leases: the database's clock, or (tests) an injected one.
pub enum LeaseClock {
    Database,
    Injected(SharedClock),
}

/// What this instance holds now, shared by the lease thread (which writes it after each round)
/// and the store's fence and the lanes (which read it): company, epoch and local deadline.
pub struct LeaseView {
    pub instance: String,
    /// `company_lease_secs`, in milliseconds.
    pub lease_ms: i64,
    mono: Mono,
    held: std::sync::Mutex<BTreeMap<String, (i64, i64)>>,
    /// Bumped whenever the set of companies held changes.
    generation: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for LeaseView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LeaseView({})", self.instance)
    }
}

impl LeaseView {
    pub fn new(instance: &str, lease_ms: i64, mono: Mono) -> LeaseView {
        LeaseView {
            instance: instance.to_owned(),
            lease_ms,
            mono,
            held: Default::default(),
            generation: Default::default(),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (i64, i64)>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn replace(&self, new: BTreeMap<String, (i64, i64)>) {
        let mut held = self.held();
        if !held.keys().eq(new.keys()) {
            self.generation
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        *held = new;
    }

    /// The epoch to fence with, when this instance may act for `company` now.
    pub fn may_act(&self, company: &str) -> Option<i64> {
        let now = (self.mono)();
        self.held()
            .get(company)
            .filter(|(_, until)| now < *until)
            .map(|(epoch, _)| *epoch)
    }

    /// The companies this instance may act for now.
    pub fn serving(&self) -> Vec<String> {
        let now = (self.mono)();
        self.held()
            .iter()
            .filter(|(_, (_, until))| now < *until)
            .map(|(c, _)| c.clone())
            .collect()
    }

    /// Changes whenever the set of companies held changes.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }
}

pub struct LeaseKeeper {
    pub me: Instance,
    lease_ms: i64,
    clock: LeaseClock,
    view: Arc<LeaseView>,
    last_round: Option<i64>,
}

impl LeaseKeeper {
    pub fn new(me: Instance, lease_ms: i64, clock: LeaseClock, mono: Mono) -> LeaseKeeper {
        let view = Arc::new(LeaseView::new(&me.name, lease_ms, mono));
        LeaseKeeper {
            me,
            lease_ms,
            clock,
            view,
            last_round: None,
        }
    }

    /// The view the store's fence and the lanes read.
    pub fn view(&self) -> Arc<LeaseView> {
        self.view.clone()
    }

    /// How often rounds run: a third of the lease, so two rounds can fail before it lapses.
    pub fn round_every_ms(&self) -> i64 {
        (self.lease_ms / 3).max(1)
    }

    /// When the last round began, on the keeper's monotonic clock (None: none yet).
    pub fn last_round_ms(&self) -> Option<i64> {
        self.last_round
    }

    /// This keeper's monotonic clock now.
    pub fn mono_now(&self) -> i64 {
        (self.view.mono)()
    }

    /// The part of the lease the keeper trusts locally: a fifth less (at least 1 ms less).
    fn trusted_ms(&self) -> i64 {
        self.lease_ms - (self.lease_ms / 5).max(1)
    }

    fn now(&self, store: &mut PgStore) -> Result<Millis> {
        match &self.clock {
            LeaseClock::Database => store.db_now(),
            LeaseClock::Injected(c) => Ok(c.now()),
        }
    }

    /// One round. On any failure this instance trusts no lease at all (it cannot tell whether
    /// the round's renewal landed), and the error is returned for the caller to log and retry.
    pub fn round(
        &mut self,
        store: &mut PgStore,
        companies: &[String],
    ) -> std::result::Result<Round, LeaseError> {
        let before = (self.view.mono)();
        self.last_round = Some(before);
        let outcome = self
            .now(store)
            .map_err(LeaseError::from)
            .and_then(|now| store.lease_round(&self.me, companies, now, self.lease_ms));
        match outcome {
            Ok(round) => {
                let until = before + self.trusted_ms();
                self.view.replace(
                    round
                        .held
                        .iter()
                        .map(|l| (l.company_id.clone(), (l.epoch, until)))
                        .collect(),
                );
                Ok(round)
            }
            Err(e) => {
                self.view.replace(BTreeMap::new());
                Err(e)
            }
        }
    }

    /// The epoch to fence with, when this instance may act for `company` now.
    pub fn may_act(&self, company: &str) -> Option<i64> {
        self.view.may_act(company)
    }

    /// The companies this instance may act for now.
    pub fn serving(&self) -> Vec<String> {
        self.view.serving()
    }

    /// A graceful stop: every lease released at once.
    pub fn stop(&mut self, store: &mut PgStore) -> Result<u64> {
        self.view.replace(BTreeMap::new());
        let now = self.now(store)?;
        store.stop_instance(&self.me, now)
    }
}
