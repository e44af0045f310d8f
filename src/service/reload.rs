//! A reload that changes the companies alone (`company_ids`, `company_ids_file`,
//! `company_api_keys_file`), applied in place: the companies that stay keep their lane, their
//! client (its request budget and Pleo's clock offset) and any job in hand; new ones start with
//! a recovery pass; removed ones are no longer listed, and a job of theirs in hand is finished
//! (or handed back) before their lane lets them go. Any other change restarts in place.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crossbeam_channel::Sender;

use crate::config::Config;
use crate::pleo::{Clients, OwnCredential};

/// Sets `jobmirror_poll_interval_min_seconds`, and warns when the request budget cannot keep
/// `poll_interval_secs` for the companies served (at start-up, and when a reload changes them).
pub fn announce_budget(cfg: &Config, metrics: &crate::health::Metrics) {
    if let Some(min) = cfg.poll_interval_min() {
        let min_secs = min.as_secs_f64().ceil() as u64;
        metrics
            .poll_interval_min_secs
            .store(min_secs, std::sync::atomic::Ordering::Relaxed);
        if min > cfg.poll_interval {
            log::warn!(
                "poll_interval_secs = {} cannot be kept: {} companies share one credential paced at {} requests/s, so a round of their listings takes at least {min_secs} s, and polls will come about that often (raise pleo_requests_per_sec_max if Pleo allows it, give companies keys of their own, or split them with shard)",
                cfg.poll_interval.as_secs(),
                cfg.companies_sharing_default(),
                cfg.pleo_requests_per_sec_max
            );
        }
    }
}

/// What the running service needs to change its companies.
pub struct Reloadable {
    /// To the sync thread: the companies served from now on.
    pub companies: Sender<crate::service::sync::run::CompanyList>,
    /// Each lane's companies, and where to send it new ones.
    pub lanes: Vec<(Sender<Vec<String>>, Vec<String>)>,
    pub clients: Arc<Clients>,
    /// The configuration running now.
    pub cfg: Config,
    /// Which lane holds each company's job in hand: a company that comes back while its old
    /// lane still holds a job of its goes back to that lane.
    pub owners: Arc<crate::service::processor::Owners>,
}

/// What a reload changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CompaniesChanged {
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

impl Reloadable {
    /// Applies `new` if it differs from the running configuration in its companies alone
    /// ([`Config::companies_only_differ`]); `None` (nothing done) when more changed.
    ///
    /// `renewed`: companies served before and after whose credential was given anew (a new
    /// refresh token or key): they are detected anew.
    pub fn apply(
        &mut self,
        new: &Config,
        renewed: &[String],
    ) -> anyhow::Result<Option<CompaniesChanged>> {
        if !self.cfg.companies_only_differ(new) {
            return Ok(None);
        }
        // Credentials of their own: a company whose credential is unchanged keeps its client.
        // A company that leaves keeps its client too: a job of its in hand is finished with it.
        let old = self.clients.companies();
        let before: HashMap<String, OwnCredential> =
            self.cfg.own_credentials().into_iter().collect();
        let mut by_company = old.clone();
        for (company, credential) in new.own_credentials() {
            let unchanged = match (before.get(&company), &credential) {
                (Some(OwnCredential::ApiKey(a)), OwnCredential::ApiKey(b)) => {
                    a.expose() == b.expose()
                }
                (Some(OwnCredential::OAuth), OwnCredential::OAuth) => true,
                _ => false,
            };
            let client = match old.get(&company) {
                Some(c) if unchanged => c.clone(),
                _ => self.clients.own_client(&company, &credential)?,
            };
            by_company.insert(company, client);
        }
        // A company served again with the default credential drops its own.
        let own: HashSet<String> = new.own_credentials().into_iter().map(|(c, _)| c).collect();
        let served: HashSet<&String> = new.company_ids.iter().collect();
        by_company.retain(|c, _| own.contains(c) || !served.contains(c));
        self.clients.replace_companies(by_company);
        // Lanes: the companies that stay keep theirs; a new one goes to the lane with fewest.
        let keep: HashSet<&String> = new.company_ids.iter().collect();
        for (_, list) in self.lanes.iter_mut() {
            list.retain(|c| keep.contains(c));
        }
        let placed: HashSet<String> = self
            .lanes
            .iter()
            .flat_map(|(_, l)| l.iter().cloned())
            .collect();
        let mut changed = CompaniesChanged::default();
        for c in &new.company_ids {
            if placed.contains(c) {
                continue;
            }
            let lane = match self.owners.holder(c) {
                Some(l) if l < self.lanes.len() => Some(&mut self.lanes[l]),
                _ => self.lanes.iter_mut().min_by_key(|(_, l)| l.len()),
            };
            if let Some((_, list)) = lane {
                list.push(c.clone());
            }
            changed.added.push(c.clone());
        }
        changed.removed = self
            .cfg
            .company_ids
            .iter()
            .filter(|c| !keep.contains(c))
            .cloned()
            .collect();
        // The lanes first (they serve a company only once its recovery pass is done), then
        // the sync thread, which runs the new companies' recovery passes.
        for (tx, list) in &self.lanes {
            tx.send(list.clone())
                .map_err(|_| anyhow::anyhow!("a processor lane has stopped"))?;
        }
        let served: HashSet<&String> = new.company_ids.iter().collect();
        self.companies
            .send(crate::service::sync::run::CompanyList {
                served: new.company_ids.clone(),
                renewed: renewed
                    .iter()
                    .filter(|c| served.contains(c))
                    .cloned()
                    .collect(),
            })
            .map_err(|_| anyhow::anyhow!("the sync thread has stopped"))?;
        self.cfg = new.clone();
        Ok(Some(changed))
    }
}

/// The companies the service serves: the configuration's (`base`, replaced by a reload)
/// merged with the database's `companies` rows ([`Config::with_companies`]), applied in place
/// whenever either changes. `jobmirror companies` changes the rows; the `jm-companies` thread
/// notices within [`COMPANIES_CHECK`] and calls [`Companies::check`].
pub struct Companies {
    /// `None` while the table has no rows: the running configuration is then the base (one
    /// copy of a configuration of 50,000 companies fewer).
    base: Option<Config>,
    store: crate::store::Store,
    /// `companies_version` when the rows were last read.
    seen: i64,
    /// The lease view's generation when last applied (a shared database).
    lease_generation: u64,
    /// Each row's `updated_at` then.
    updated: HashMap<String, crate::clock::Millis>,
    reloadable: Reloadable,
    /// The webhook receiver's company secrets, when it runs.
    secrets: Option<Arc<std::sync::RwLock<crate::edge::webhook::CompanySecrets>>>,
    metrics: Arc<crate::health::Metrics>,
}

fn updated_at(rows: &[crate::store::CompanyRow]) -> HashMap<String, crate::clock::Millis> {
    rows.iter()
        .map(|r| (r.company_id.clone(), r.updated_at))
        .collect()
}

/// How often the service reads `companies_version`.
pub const COMPANIES_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

impl Companies {
    /// `base` is the configuration as loaded; `reloadable` runs `effective(base)` now, read
    /// when `companies_version` was `seen` (read before it, so a change made meanwhile is
    /// applied at the first check).
    pub fn new(
        base: Option<Config>,
        store: crate::store::Store,
        seen: i64,
        reloadable: Reloadable,
        secrets: Option<Arc<std::sync::RwLock<crate::edge::webhook::CompanySecrets>>>,
        metrics: Arc<crate::health::Metrics>,
    ) -> anyhow::Result<Companies> {
        let updated = updated_at(&store.company_rows()?);
        let c = Companies {
            base,
            store,
            seen,
            lease_generation: 0,
            updated,
            reloadable,
            secrets,
            metrics,
        };
        c.set_secrets(&c.store.company_rows()?);
        c.count();
        Ok(c)
    }

    /// The configuration merged with the database now: what the service runs.
    pub fn effective(base: &Config, store: &crate::store::Store) -> anyhow::Result<Config> {
        Ok(base.with_companies(&store.company_rows()?))
    }

    /// The companies served now.
    pub fn served(&self) -> usize {
        self.reloadable.cfg.company_ids.len()
    }

    fn count(&self) {
        self.metrics
            .companies_served
            .store(self.served() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    fn set_secrets(&self, rows: &[crate::store::CompanyRow]) {
        if let Some(s) = &self.secrets {
            *s.write().unwrap_or_else(|p| p.into_inner()) =
                served_secrets(&self.reloadable.cfg, rows);
        }
    }

    /// A reload: `new` replaces the configuration, merged with the rows as they are now.
    /// `None` when it changes more than the companies (the caller restarts in place).
    pub fn apply_base(&mut self, new: &Config) -> anyhow::Result<Option<CompaniesChanged>> {
        self.seen = self.store.companies_version()?;
        let rows = self.store.company_rows()?;
        let mut eff = new.with_companies(&rows);
        let leases = self.reloadable.cfg.shared_db.fence.clone();
        if let Some(view) = &leases {
            let held: HashSet<String> = view.serving().into_iter().collect();
            eff.company_ids.retain(|c| held.contains(c));
            // Their own OAuth pairs too: the refresher keeps ahead of expiry only the pairs
            // of companies held here (another instance's are its holder's to keep fresh).
            eff.company_oauth.retain(|c| held.contains(c));
            eff.shared_db.fence = leases.clone();
        }
        let changed = self.reloadable.apply(&eff, &[])?;
        if changed.is_some() {
            self.base = (!rows.is_empty() || leases.is_some()).then(|| new.clone());
            self.updated = updated_at(&rows);
            self.set_secrets(&rows);
            self.count();
            announce_budget(&self.reloadable.cfg, &self.metrics);
        }
        Ok(changed)
    }

    /// Applies the `companies` rows if they changed since last read; `None` when they did not.
    pub fn check(&mut self) -> anyhow::Result<Option<CompaniesChanged>> {
        let version = self.store.companies_version()?;
        let leases = self.reloadable.cfg.shared_db.fence.clone();
        let generation = leases.as_ref().map_or(0, |l| l.generation());
        if version == self.seen && generation == self.lease_generation {
            return Ok(None);
        }
        let rows = self.store.company_rows()?;
        let base = self.base.as_ref().unwrap_or(&self.reloadable.cfg);
        let mut eff = base.with_companies(&rows);
        // On a shared database: only the companies this instance holds a lease on.
        if let Some(view) = &leases {
            let held: HashSet<String> = view.serving().into_iter().collect();
            eff.company_ids.retain(|c| held.contains(c));
            // Their own OAuth pairs too: the refresher keeps ahead of expiry only the pairs
            // of companies held here (another instance's are its holder's to keep fresh).
            eff.company_oauth.retain(|c| held.contains(c));
            eff.shared_db.fence = leases.clone();
        }
        let base = (!rows.is_empty()).then(|| base.clone());
        // Rows changed while served (a new credential, or authorized again).
        let renewed: Vec<String> = rows
            .iter()
            .filter(|r| {
                self.updated
                    .get(&r.company_id)
                    .is_some_and(|at| *at != r.updated_at)
            })
            .map(|r| r.company_id.clone())
            .collect();
        let changed = self
            .reloadable
            .apply(&eff, &renewed)?
            .ok_or_else(|| anyhow::anyhow!("the companies table changed more than companies"))?;
        self.seen = version;
        self.lease_generation = generation;
        self.base = base.or_else(|| leases.is_some().then(|| self.base.clone()).flatten());
        self.updated = updated_at(&rows);
        self.set_secrets(&rows);
        self.count();
        announce_budget(&eff, &self.metrics);
        Ok(Some(changed))
    }
}

impl Companies {
    /// The served companies with OAuth pairs of their own, and their clients.
    fn oauth_clients(&self) -> Vec<(String, Arc<crate::pleo::PleoClient>)> {
        self.reloadable
            .cfg
            .company_oauth
            .iter()
            .filter(|c| self.reloadable.clients.has_own(c))
            .map(|c| (c.clone(), self.reloadable.clients.for_company(Some(c))))
            .collect()
    }
}

/// The one place companies' OAuth pairs are refreshed ahead of expiry: each pair when its
/// access token comes within `pleo_oauth_refresh_margin_secs` of expiring. A request that
/// finds a pair due refreshes it through the same token source and lock, so a pair is never
/// refreshed twice. Refreshes run on up to [`REFRESHES_AT_ONCE`] short-lived threads, so a
/// slow token endpoint for one company never holds up another's; a pair that fails is tried
/// again after [`RETRY_FAILED`]; a refused one costs no request at all (its token source
/// answers at once).
struct Refresher {
    clock: crate::clock::SharedClock,
    /// Companies whose refresh is running now.
    running: Arc<std::sync::Mutex<HashSet<String>>>,
    /// Companies whose last refresh failed, and when to try again.
    failed: Arc<std::sync::Mutex<HashMap<String, crate::clock::Millis>>>,
}

const RETRY_FAILED: std::time::Duration = std::time::Duration::from_secs(30);
const REFRESHES_AT_ONCE: usize = 8;

impl Refresher {
    /// At a stop: waits for the refreshes already running (each is bounded by the token
    /// endpoint's timeout). A refresh cut off after the endpoint rotated the pair but before
    /// the new one was stored would end the pair (the stored refresh token is spent). The
    /// service's stop waits for this thread at most `shutdown_timeout_secs`.
    fn finish_running(&self) {
        let waiting = || {
            !self
                .running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
        };
        if waiting() {
            log::info!("waiting for the OAuth refreshes in flight before stopping");
        }
        while waiting() {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Starts the refreshes that are due; returns when the next one is.
    fn run_due(
        &mut self,
        clients: &[(String, Arc<crate::pleo::PleoClient>)],
    ) -> crate::clock::Millis {
        let now = self.clock.now();
        let mut next = now.plus(COMPANIES_CHECK);
        for (company, client) in clients {
            let Some(tokens) = client.token_source() else {
                continue;
            };
            let retry_at = self
                .failed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(company)
                .copied();
            if let Some(at) = retry_at
                && at > now
            {
                next = next.min(at);
                continue;
            }
            let due = tokens.next_refresh();
            if due > now {
                next = next.min(due);
                continue;
            }
            let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            if running.contains(company) || running.len() >= REFRESHES_AT_ONCE {
                // Looked at again shortly.
                next = next.min(now.plus(std::time::Duration::from_millis(20)));
                continue;
            }
            running.insert(company.clone());
            drop(running);
            let (name, client) = (company.clone(), client.clone());
            let (running, failed, clock) = (
                self.running.clone(),
                self.failed.clone(),
                self.clock.clone(),
            );
            let spawned = std::thread::Builder::new()
                .name("jm-token".into())
                .spawn(move || {
                    let result = client.token_source().map(|t| t.bearer());
                    // A refused client is said once, for every company, by the token source.
                    let quiet = client.token_source().is_some_and(|t| t.client_refused());
                    let mut f = failed.lock().unwrap_or_else(|p| p.into_inner());
                    match result {
                        Some(Err(e)) => {
                            if f.insert(name.clone(), clock.now().plus(RETRY_FAILED))
                                .is_none()
                                && !quiet
                            {
                                log::warn!("company {name}: OAuth refresh failed: {e}");
                            }
                        }
                        _ => {
                            f.remove(&name);
                        }
                    }
                    drop(f);
                    running
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&name);
                });
            if let Err(e) = spawned {
                // Tried again at the next pass (a request that needs the token refreshes it).
                log::warn!("could not start an OAuth refresh: {e}");
                self.running
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(company);
            }
            next = next.min(now.plus(std::time::Duration::from_millis(20)));
        }
        let served: HashSet<&String> = clients.iter().map(|(c, _)| c).collect();
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|c, _| served.contains(c));
        next
    }
}

/// Applies the `companies` rows if they changed, and says so in the log.
pub fn check_logged(c: &mut Companies) {
    match c.check() {
        Ok(Some(changed)) => log::info!(
            "companies changed in the database; applied in place ({} added: {}; {} removed: {}; {} served)",
            changed.added.len(),
            changed.added.join(", "),
            changed.removed.len(),
            changed.removed.join(", "),
            c.served()
        ),
        Ok(None) => {}
        // Tried again at the next check (the version is not marked seen).
        Err(e) => log::error!("could not apply the companies table: {e}"),
    }
}

/// The `jm-companies` thread: applies changes to the `companies` table, and refreshes the
/// companies' own OAuth pairs ahead of expiry, until shutdown.
pub fn watch(
    companies: Arc<std::sync::Mutex<Companies>>,
    clock: crate::clock::SharedClock,
    shutdown: crossbeam_channel::Receiver<()>,
) {
    let mut refresher = Refresher {
        clock: clock.clone(),
        running: Arc::default(),
        failed: Arc::default(),
    };
    let mut next_check = clock.now();
    loop {
        if clock.now() >= next_check {
            next_check = clock.now().plus(COMPANIES_CHECK);
            check_logged(&mut companies.lock().unwrap_or_else(|p| p.into_inner()));
        }
        // Refreshed outside the lock: a slow token endpoint never holds up a reload.
        let clients = companies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .oauth_clients();
        let next = refresher.run_due(&clients).min(next_check);
        let wait = std::time::Duration::from_millis(clock.now().until(next).clamp(10, 1000) as u64);
        match shutdown.recv_timeout(wait) {
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            _ => {
                refresher.finish_running();
                return;
            }
        }
    }
}
/// The webhook secrets of the served companies that have subscriptions of their own.
pub fn served_secrets(
    cfg: &Config,
    rows: &[crate::store::CompanyRow],
) -> crate::edge::webhook::CompanySecrets {
    let served: HashSet<&String> = cfg.company_ids.iter().collect();
    let rows: Vec<_> = rows
        .iter()
        .filter(|r| served.contains(&r.company_id))
        .cloned()
        .collect();
    crate::edge::webhook::Secrets::by_company(&Config::company_webhook_secrets(&rows))
}

/// The lanes' way to the `companies` table: before a claim, a change committed there is
/// applied at once (as the `jm-companies` thread would within a second), so no claim follows a
/// committed pause or removal.
#[derive(Default)]
pub struct CompaniesGate(pub(super) std::sync::OnceLock<Arc<std::sync::Mutex<Companies>>>);

impl crate::service::processor::CatchUp for CompaniesGate {
    fn catch_up(&self) {
        if let Some(c) = self.0.get() {
            check_logged(&mut c.lock().unwrap_or_else(|p| p.into_inner()));
        }
    }
}
