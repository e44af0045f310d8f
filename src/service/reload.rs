//! A reload that changes the companies alone (`company_ids`, `company_ids_file`,
//! `company_api_keys_file`), applied in place: the companies that stay keep their lane, their
//! client (its request budget and Pleo's clock offset) and any job in hand; new ones start with
//! a recovery pass; removed ones are no longer listed, and a job of theirs in hand is finished
//! (or handed back) before their lane lets them go. Any other change restarts in place.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crossbeam_channel::Sender;

use crate::config::Config;
use crate::pleo::{Auth, Clients};

/// What the running service needs to change its companies.
pub struct Reloadable {
    /// To the sync thread: the companies served from now on.
    pub companies: Sender<Vec<String>>,
    /// Each lane's companies, and where to send it new ones.
    pub lanes: Vec<(Sender<Vec<String>>, Vec<String>)>,
    pub clients: Arc<Clients>,
    /// The configuration running now.
    pub cfg: Config,
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
    pub fn apply(&mut self, new: &Config) -> anyhow::Result<Option<CompaniesChanged>> {
        if !self.cfg.companies_only_differ(new) {
            return Ok(None);
        }
        // Keys of their own: a company whose key is unchanged keeps its client.
        let old = self.clients.companies();
        let mut by_company = HashMap::new();
        for (company, key) in &new.company_api_keys {
            let unchanged = self
                .cfg
                .company_api_keys
                .get(company)
                .is_some_and(|k| k.expose() == key.expose());
            let client = match old.get(company) {
                Some(c) if unchanged => c.clone(),
                _ => Arc::new(
                    self.clients
                        .default_client()
                        .with_credential(Auth::ApiKey(key.clone())),
                ),
            };
            by_company.insert(company.clone(), client);
        }
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
            if let Some((_, list)) = self.lanes.iter_mut().min_by_key(|(_, l)| l.len()) {
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
        self.companies
            .send(new.company_ids.clone())
            .map_err(|_| anyhow::anyhow!("the sync thread has stopped"))?;
        self.cfg = new.clone();
        Ok(Some(changed))
    }
}
