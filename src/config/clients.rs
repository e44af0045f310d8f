//! The Pleo clients a configuration describes: the default credential's (API key or OAuth),
//! one per company with a key of its own, all over one connection pool; and what the
//! request budget allows; whether a reload changes the companies alone.

use std::time::Duration;

use crate::config::Config;
use crate::pleo;

impl Config {
    /// Every client the service needs: the default credential, and one per company named in
    /// `company_api_keys_file`. Each paces its own requests.
    pub fn clients(
        &self,
        clock: crate::clock::SharedClock,
        progress: &std::sync::Arc<crate::health::Progress>,
        metrics: &std::sync::Arc<crate::health::Metrics>,
    ) -> anyhow::Result<std::sync::Arc<pleo::Clients>> {
        // One connection pool for every credential: a company's own key goes with each of
        // its requests, not into a pool of its own.
        let agent = pleo::PleoClient::agent_for(&self.client_config());
        let default = std::sync::Arc::new(
            self.client_with(clock.clone(), agent.clone())?
                .with_health(progress.clone(), metrics.clone()),
        );
        if let Some(o) = &self.oauth {
            o.standing.attach(metrics.clone());
        }
        // Every company's own OAuth pair goes through one store connection.
        let oauth = match &self.oauth {
            Some(o) => Some(pleo::CompanyOAuth {
                cfg: o.clone(),
                store: std::sync::Arc::new(std::sync::Mutex::new(self.open_store()?)),
            }),
            None => None,
        };
        let clients = pleo::Clients::with_oauth(default, oauth);
        let mut by_company = std::collections::HashMap::new();
        for (company, key) in &self.company_api_keys {
            let credential = pleo::OwnCredential::ApiKey(key.clone());
            by_company.insert(company.clone(), clients.own_client(company, &credential)?);
        }
        for company in &self.company_oauth {
            by_company.insert(
                company.clone(),
                clients.own_client(company, &pleo::OwnCredential::OAuth)?,
            );
        }
        clients.replace_companies(by_company);
        Ok(std::sync::Arc::new(clients))
    }

    /// The companies with credentials of their own, and those credentials.
    pub fn own_credentials(&self) -> Vec<(String, pleo::OwnCredential)> {
        let keys = self
            .company_api_keys
            .iter()
            .map(|(c, k)| (c.clone(), pleo::OwnCredential::ApiKey(k.clone())));
        let oauth = self
            .company_oauth
            .iter()
            .map(|c| (c.clone(), pleo::OwnCredential::OAuth));
        keys.chain(oauth).collect()
    }

    /// The Pleo client this configuration describes (API key, or OAuth tokens kept in the
    /// database).
    pub fn client(&self, clock: crate::clock::SharedClock) -> anyhow::Result<pleo::PleoClient> {
        self.client_with(clock, pleo::PleoClient::agent_for(&self.client_config()))
    }

    fn client_with(
        &self,
        clock: crate::clock::SharedClock,
        agent: ureq::Agent,
    ) -> anyhow::Result<pleo::PleoClient> {
        let mut c = self.client_config();
        if let Some(o) = &self.oauth {
            let store = self.open_store()?;
            c.auth = pleo::Auth::OAuth(std::sync::Arc::new(crate::pleo::oauth::TokenSource::new(
                o.clone(),
                store,
                clock.clone(),
            )?));
        }
        Ok(pleo::PleoClient::with_agent(c, clock, agent)?)
    }

    /// The shortest poll interval the request budget allows: the companies sharing the
    /// default credential each need one listing per pass, paced at
    /// `pleo_requests_per_sec_max` (companies with keys of their own have budgets of their
    /// own). `None` when requests are not paced.
    pub fn poll_interval_min(&self) -> Option<Duration> {
        if self.pleo_requests_per_sec_max == 0 {
            return None;
        }
        Some(Duration::from_secs_f64(
            self.companies_sharing_default().max(1) as f64
                / f64::from(self.pleo_requests_per_sec_max),
        ))
    }

    /// The companies served with the default credential (no key of their own).
    pub fn companies_sharing_default(&self) -> usize {
        self.company_ids
            .iter()
            .filter(|c| !self.company_api_keys.contains_key(*c) && !self.company_oauth.contains(*c))
            .count()
    }

    pub fn client_config(&self) -> pleo::ClientConfig {
        let mut c = pleo::ClientConfig::new(
            &self.pleo_base_url,
            pleo::Auth::ApiKey(self.pleo_api_key.clone()),
        );
        c.connect_timeout = self.pleo_connect_timeout;
        c.request_timeout = self.pleo_request_timeout;
        c.retry.attempts_max = self.pleo_retry_attempts_max;
        c.requests_per_sec_max = (self.pleo_requests_per_sec_max > 0)
            .then_some(f64::from(self.pleo_requests_per_sec_max));
        c
    }
}

impl Config {
    /// Whether `new` differs from this configuration in its companies alone (`company_ids`,
    /// `company_ids_file`, `company_api_keys_file`): then a reload applies in place, and the
    /// companies that stay are not disturbed. Secrets are compared by value (their `Debug`
    /// hides them).
    pub fn companies_only_differ(&self, new: &Config) -> bool {
        let without = |c: &Config| {
            let mut c = c.clone();
            c.company_ids.clear();
            c.company_api_keys.clear();
            c.company_oauth.clear();
            c.companies_listed = 0;
            format!("{c:?}")
        };
        let secrets_same = self.pleo_api_key.expose() == new.pleo_api_key.expose()
            && match (&self.oauth, &new.oauth) {
                (Some(a), Some(b)) => a.client_secret.expose() == b.client_secret.expose(),
                (None, None) => true,
                _ => false,
            }
            && match (&self.webhook, &new.webhook) {
                (Some(a), Some(b)) => a.secrets.same_as(&b.secrets),
                (None, None) => true,
                _ => false,
            };
        secrets_same && without(self) == without(new)
    }
}
