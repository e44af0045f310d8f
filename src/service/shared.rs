//! Several instances on one PostgreSQL database (`db` as a URL): the store each thread opens,
//! one service per SQLite file, and the lease thread that decides which companies this
//! instance serves (see `store::pg::leases` for the rules).
//!
//! At start the instance joins: its first lease round runs before any worker is built, so it
//! serves only what it holds from the first moment. Every third of `company_lease_secs` the
//! `jm-leases` thread runs a round over every company the configuration and the `companies`
//! table name, and when the set held changes the served companies are changed in place, as a
//! `companies` change is (new ones start with a recovery pass: a job a dead holder left
//! `in_progress` is resumed without `started`). A stop releases every lease at once.

use std::sync::Arc;
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;

use crate::config::{Config, SharedDb};
use crate::store::pg::keeper::{LeaseClock, LeaseKeeper, system_mono};
use crate::store::pg::leases::{Instance, LeaseError};
use crate::store::pg::{PgStore, PgTarget};
use crate::store::{DbLock, Store};

/// How a thread opens the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Open {
    /// Creating and migrating a SQLite file; on PostgreSQL, migrating too.
    Migrate,
    Connect,
    ReadOnly,
}

/// The PostgreSQL target of `cfg.db`, with its password.
pub fn target(cfg: &Config) -> anyhow::Result<PgTarget> {
    let file = cfg.shared_db.password_file.as_deref();
    let password = PgTarget::password(file).map_err(|e| {
        crate::config::UsageError(format!(
            "db_password_file {}: cannot read it: {e}",
            file.unwrap_or(std::path::Path::new("")).display()
        ))
    })?;
    Ok(PgTarget::parse(&cfg.db.to_string_lossy(), password)?)
}

/// The store of `cfg.db`: the SQLite file, or the shared PostgreSQL database fenced with this
/// instance's leases ([`Config::open_store`]).
pub fn open(cfg: &Config, how: Open) -> anyhow::Result<Store> {
    if SharedDb::is_postgres(&cfg.db) {
        if how == Open::Migrate {
            let mut store = Store::open_pg(&target(cfg)?)?;
            if let Some(view) = &cfg.shared_db.fence {
                store.set_fence(view.clone());
            }
            return Ok(store);
        }
        return cfg.open_store();
    }
    Ok(match how {
        Open::Migrate => Store::open(&cfg.db)?,
        Open::Connect => Store::connect(&cfg.db)?,
        Open::ReadOnly => Store::open_read_only(&cfg.db)?,
    })
}

/// One service per SQLite file (a lock on it); on PostgreSQL the leases do that per company.
pub fn lock(cfg: &Config) -> anyhow::Result<Option<DbLock>> {
    if SharedDb::is_postgres(&cfg.db) {
        return Ok(None);
    }
    Ok(Some(
        DbLock::acquire(&cfg.db).map_err(|e| anyhow::anyhow!(e))?,
    ))
}

/// This instance's lease keeper, its connection, and what it needs to name every company.
pub struct Leases {
    keeper: LeaseKeeper,
    store: PgStore,
    rows: Store,
    /// The configuration before the `companies` rows were merged in.
    base: Config,
}

impl Leases {
    /// Every company the configuration and the `companies` table name (not paused).
    fn universe(&self) -> anyhow::Result<Vec<String>> {
        Ok(self
            .base
            .with_companies(&self.rows.company_rows()?)
            .company_ids)
    }

    fn round(&mut self) -> Result<(), anyhow::Error> {
        let universe = self.universe()?;
        let r = self.keeper.round(&mut self.store, &universe)?;
        if !r.taken.is_empty() || !r.released.is_empty() {
            log::info!(
                "leases: took {}, released {}; holding {} of {} companies ({} live instances, fair share {}..{})",
                r.taken.len(),
                r.released.len(),
                r.held.len(),
                universe.len(),
                r.live,
                r.share.0,
                r.share.1
            );
        }
        Ok(())
    }
}

/// On a PostgreSQL `db`: joins the instances sharing it (the first lease round) and returns
/// `merged` narrowed to the companies held, with the fence set, and the keeper for the
/// `jm-leases` thread. None on SQLite. A live process under the same `instance_name` is
/// waited for until its heartbeat lapses (a restart after kill -9), at most two leases.
pub fn join(base: &Config, merged: &Config) -> anyhow::Result<Option<(Config, Leases)>> {
    if !SharedDb::is_postgres(&merged.db) {
        return Ok(None);
    }
    let target = target(merged)?;
    let mut store = target.connect()?;
    store.migrate()?;
    let now = store.db_now()?;
    let me = Instance::this_process(merged.shared_db.instance_name.as_deref(), now);
    let lease_ms = merged.shared_db.company_lease_secs as i64 * 1000;
    let keeper = LeaseKeeper::new(me, lease_ms, LeaseClock::Database, system_mono());
    let mut leases = Leases {
        keeper,
        store,
        rows: Store::connect_pg(&target)?,
        base: base.clone(),
    };
    let give_up = crate::clock::monotonic() + Duration::from_millis(2 * lease_ms as u64);
    loop {
        match leases.round() {
            Ok(()) => break,
            Err(e) => match e.downcast_ref::<LeaseError>() {
                Some(LeaseError::NameInUse { .. }) if crate::clock::monotonic() < give_up => {
                    log::warn!("{e}; waiting");
                    std::thread::sleep(Duration::from_secs(1));
                }
                _ => return Err(e),
            },
        }
    }
    let view = leases.keeper.view();
    let mut cfg = merged.clone();
    cfg.shared_db.fence = Some(view.clone());
    let held: std::collections::HashSet<String> = view.serving().into_iter().collect();
    cfg.company_ids.retain(|c| held.contains(c));
    // The refresher keeps ahead of expiry only the OAuth pairs of companies held here.
    cfg.company_oauth.retain(|c| held.contains(c));
    log::info!(
        "instance {} joined the instances on {target}: holding {} of {} companies",
        view.instance,
        cfg.company_ids.len(),
        merged.company_ids.len()
    );
    Ok(Some((cfg, leases)))
}

/// The `jm-leases` thread: a round every third of the lease; a change of the companies held is
/// applied in place at once. At shutdown every lease is released.
pub fn run(
    mut leases: Leases,
    companies: Arc<std::sync::Mutex<crate::service::reload::Companies>>,
    shutdown: crossbeam_channel::Receiver<()>,
) {
    let every = leases.keeper.round_every_ms();
    let view = leases.keeper.view();
    let mut failing = false;
    loop {
        // A round every third of the lease, counted from when the last one began (the first
        // from the join, however long the start took since).
        let since = leases
            .keeper
            .last_round_ms()
            .map_or(every, |t| leases.keeper.mono_now() - t);
        let wait = Duration::from_millis((every - since).clamp(0, every) as u64);
        match shutdown.recv_timeout(wait) {
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            _ => break,
        }
        let before = view.generation();
        match leases.round() {
            Ok(()) => failing = false,
            Err(e) => {
                if !failing {
                    log::error!(
                        "lease round failed (this instance acts for no company until one succeeds): {e}"
                    );
                }
                failing = true;
            }
        }
        if view.generation() != before {
            crate::service::reload::check_logged(
                &mut companies.lock().unwrap_or_else(|p| p.into_inner()),
            );
        }
    }
    match leases.keeper.stop(&mut leases.store) {
        Ok(n) => log::info!("released {n} company leases"),
        Err(e) => {
            log::warn!("could not release the company leases (they lapse by themselves): {e}")
        }
    }
}

/// The `jm-listen` thread (a shared PostgreSQL database): `LISTEN jobmirror_webhook`, so a
/// delivery another instance stored (behind a load balancer any instance may take one) wakes
/// this one's sync thread at once, as its own receiver's would: it acts on those of companies
/// it holds, and works out when to mark those of companies no instance lists (the first live
/// instance by name marks them after two leases). Polling stays the safety net: a lost
/// connection is logged and made again a second later.
pub fn listen(
    cfg: &Config,
    nudge: crossbeam_channel::Sender<()>,
    shutdown: crossbeam_channel::Receiver<()>,
) -> anyhow::Result<Option<Box<dyn FnOnce() + Send>>> {
    if cfg.shared_db.fence.is_none() {
        return Ok(None);
    }
    let target = target(cfg)?;
    Ok(Some(Box::new(move || {
        let mut failing = false;
        loop {
            let session = target.connect().and_then(|mut s| {
                s.client().batch_execute("LISTEN jobmirror_webhook")?;
                Ok(s)
            });
            let mut s = match session {
                Ok(s) => {
                    if !failing {
                        log::info!(
                            "listening for the deliveries other instances store (LISTEN jobmirror_webhook)"
                        );
                    }
                    failing = false;
                    // Whatever was stored before the LISTEN took hold is looked at once now.
                    let _ = nudge.try_send(());
                    s
                }
                Err(e) => {
                    if !failing {
                        log::warn!("LISTEN jobmirror_webhook: {e}; polls still find every job");
                    }
                    failing = true;
                    match shutdown.recv_timeout(Duration::from_secs(1)) {
                        Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
                        _ => return,
                    }
                }
            };
            loop {
                match shutdown.try_recv() {
                    Err(crossbeam_channel::TryRecvError::Empty) => {}
                    _ => return,
                }
                let mut notes = s.client().notifications();
                let next = notes.timeout_iter(Duration::from_millis(250)).next();
                match next {
                    Ok(Some(_)) => {
                        let _ = nudge.try_send(());
                    }
                    Ok(None) => {}
                    Err(e) => {
                        log::warn!("LISTEN jobmirror_webhook lost: {e}; connecting again");
                        break;
                    }
                }
            }
        }
    })))
}
