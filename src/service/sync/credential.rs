//! Listing by credential (opt-in: `list_by_credential`). Pleo's OpenAPI makes `company_id`
//! optional on `GET /v3/export-jobs`: the companies that share the default credential are
//! listed with one paginated listing that names no company, and each gets its own jobs from it
//! as if it had been listed alone (its own `sync_runs` row, counts, re-reads, failures). What
//! Pleo returns across companies for one credential is not documented, hence opt-in: jobs of
//! companies not served with the credential are ignored, and a webhook-named company is still
//! listed by itself. Here too: which companies are served, as a reload changes them.

use std::collections::HashMap;

use crate::pleo::{Listing, status};
use crate::service::sync::listing::Fetched;
use crate::service::sync::pass::{GROUP_KEY, PassKind};
use crate::service::sync::{Mirror, PassReport};

/// While the passes of a credential listing are stored, waiting webhook deliveries are acted
/// on after every this many companies.
const YIELD_EVERY: usize = 256;

impl Mirror {
    /// With `yes`, the companies without credentials of their own are listed together (when
    /// there are at least two).
    pub fn with_listing_by_credential(mut self, yes: bool) -> Mirror {
        self.by_credential = yes;
        self.regroup();
        self
    }

    /// Works out the group listed together again (the companies or their keys changed).
    pub(crate) fn regroup(&mut self) {
        let group: Vec<String> = self
            .companies
            .iter()
            .filter(|c| !self.clients.has_own(c))
            .cloned()
            .collect();
        if self.by_credential && group.len() > 1 {
            self.group_set = group.iter().cloned().collect();
            self.group = Some(group);
        } else {
            self.group = None;
            self.group_set.clear();
        }
    }

    /// The companies to serve from now on (a reload): returns those added and those removed.
    /// Added ones get a recovery pass before their polls (the caller runs it); removed ones
    /// are no longer listed, and their webhooks are answered as not served here. The others'
    /// state (recovered, failing, polls under way) is kept.
    pub fn set_companies(&mut self, companies: Vec<String>) -> (Vec<String>, Vec<String>) {
        let new: std::collections::HashSet<String> = companies.iter().cloned().collect();
        let added: Vec<String> = companies
            .iter()
            .filter(|c| !self.served.contains(*c))
            .cloned()
            .collect();
        let removed: Vec<String> = self
            .companies
            .iter()
            .filter(|c| !new.contains(*c))
            .cloned()
            .collect();
        for c in &removed {
            self.failing.remove(c);
        }
        self.count_failing();
        self.companies = companies;
        self.served = new;
        self.regroup();
        (added, removed)
    }

    /// What the poll schedule spreads over the interval: each company, or, listing by
    /// credential, the companies with credentials of their own and [`GROUP_KEY`].
    pub fn poll_keys(&self) -> Vec<String> {
        match &self.group {
            None => self.companies.clone(),
            Some(_) => self
                .companies
                .iter()
                .filter(|c| !self.group_set.contains(*c))
                .cloned()
                .chain([GROUP_KEY.to_owned()])
                .collect(),
        }
    }

    /// The companies a list of poll keys stands for.
    pub(crate) fn expand_keys(&self, keys: &[String]) -> Vec<String> {
        let mut out = Vec::new();
        for k in keys {
            match (&self.group, k.as_str()) {
                (Some(g), GROUP_KEY) => out.extend(g.iter().cloned()),
                _ => out.push(k.clone()),
            }
        }
        out
    }

    /// Splits `companies` into those listed together (when at least two are) and the rest.
    pub(crate) fn split_group(&self, companies: &[String]) -> (Vec<String>, Vec<String>) {
        if self.group.is_none() || companies.len() < 2 {
            return (Vec::new(), companies.to_vec());
        }
        let (together, rest): (Vec<String>, Vec<String>) = companies
            .iter()
            .cloned()
            .partition(|c| self.group_set.contains(c));
        if together.len() < 2 {
            return (Vec::new(), companies.to_vec());
        }
        (together, rest)
    }

    /// What one listing for `companies` must cover: a recovery pass's statuses while any of
    /// them still needs one.
    pub(crate) fn group_kind(&self, companies: &[String], base: PassKind) -> PassKind {
        if companies.iter().any(|c| !self.recovered.contains(c)) {
            PassKind::Recovery
        } else {
            base
        }
    }

    /// Stores one credential listing for each of `companies`: each gets the jobs of its own,
    /// of the statuses its pass lists (`base`, or recovery for a company that needs one).
    pub(crate) fn store_group(
        &mut self,
        base: PassKind,
        fetched: Fetched,
        companies: &[String],
        report: &mut PassReport,
    ) {
        let Fetched {
            at,
            took,
            listing,
            complete,
        } = fetched;
        let listing = match listing {
            Ok(l) => l,
            Err(e) => {
                for c in companies {
                    let k = self.kind_for(c, base);
                    let failed = Fetched {
                        at,
                        took,
                        listing: Err(e.clone()),
                        complete,
                    };
                    let result = self.lister().store_pass(c, k, failed);
                    self.record(c, k, result, report);
                }
                return;
            }
        };
        let mut by_company: HashMap<String, Vec<crate::pleo::Job>> = HashMap::new();
        let mut elsewhere = 0usize;
        let Listing {
            jobs,
            pages,
            rejected,
        } = listing;
        for j in jobs {
            if self.group_set.contains(&j.company_id) {
                by_company.entry(j.company_id.clone()).or_default().push(j);
            } else {
                elsewhere += 1;
            }
        }
        if elsewhere > 0 {
            log::debug!(
                "listing by credential: {elsewhere} jobs of companies not served with it, ignored"
            );
        }
        // The pages and the skipped entries are counted once, with the first company.
        let (mut pages, mut rejected) = (Some(pages), Some(rejected));
        // A company needing its recovery pass is marked recovered only after a complete
        // observation of its `in_progress` jobs: when the credential listing of them spanned
        // pages, each such company is listed by itself instead.
        let mut alone = Vec::new();
        for (n, c) in companies.iter().enumerate() {
            if self.stopping() {
                break;
            }
            // A webhook never waits behind a whole round of quiet passes.
            if n % YIELD_EVERY == YIELD_EVERY - 1 {
                self.deliveries_between();
            }
            let k = self.kind_for(c, base);
            if k == PassKind::Recovery && !complete {
                alone.push(c.clone());
                continue;
            }
            let mut jobs = by_company.remove(c).unwrap_or_default();
            if k != PassKind::Recovery {
                jobs.retain(|j| j.status == status::PENDING);
            }
            let own = Fetched {
                at,
                took,
                listing: Ok(Listing {
                    jobs,
                    pages: pages.take().unwrap_or(0),
                    rejected: rejected.take().unwrap_or_default(),
                }),
                complete,
            };
            let result = self.lister().store_pass(c, k, own);
            self.record(c, k, result, report);
        }
        if !alone.is_empty() {
            log::warn!(
                "listing by credential: the in_progress jobs spanned pages, so the listing may have shifted between them; {} companies get their recovery pass listed one by one",
                alone.len()
            );
            // On this thread, not in the pool: this may run inside the pool's own wait for
            // other results. Webhooks are acted on between them.
            for c in &alone {
                if self.stopping() {
                    break;
                }
                self.deliveries_between();
                let result = self.lister().pass_company(c, PassKind::Recovery);
                self.record(c, PassKind::Recovery, result, report);
            }
        }
    }
}
