//! Companies on a replay's timeline: added and removed as `jobmirror companies` does it (a
//! row in the replay's database, then the change sent to the running workers the way the
//! service's reload sends it), and customers revoking and granting OAuth access at the fake.

use super::*;

/// The snapshot's service settings, with `overrides`, as the environment would give them.
pub(super) fn setting_env(
    snap: &Snapshot,
    overrides: &[(&str, String)],
) -> HashMap<String, String> {
    let mut env: HashMap<String, String> = snap
        .service
        .keys()
        .filter_map(|k| snap.setting(k).map(|v| (crate::config::env_name(k), v)))
        .collect();
    for (k, v) in overrides {
        env.insert(crate::config::env_name(k), v.clone());
    }
    env
}

/// OAuth pairs as the replay knows them: companies with a pair of their own, and whether the
/// default credential's pair was lost (a refresh the token endpoint applied whose answer never
/// came back: Pleo rotates the refresh token at each refresh, so only a new authorization
/// helps).
#[derive(Default)]
pub(super) struct Pairs {
    own: HashSet<String>,
    default_lost: bool,
}

/// The OAuth app the replay's fake knows, and the default credential's first refresh token.
const CLIENT_ID: &str = "replay-client";
const CLIENT_SECRET: &str = "replay-secret";
const DEFAULT_REFRESH: &str = "replay-default-refresh";

/// The credential settings of a replay: the fake's API key, or (when the timeline gives
/// companies OAuth pairs of their own) OAuth with a default pair, through the fake's token
/// endpoint.
pub(super) fn credential_settings(
    snap: &Snapshot,
    fake: &FakePleo,
    db: &std::path::Path,
) -> anyhow::Result<Vec<(&'static str, String)>> {
    if !snap.timeline.iter().any(|s| s.event.uses_oauth()) {
        return Ok(vec![("pleo_api_key", fake.api_key())]);
    }
    fake.enable_oauth(
        CLIENT_ID,
        CLIENT_SECRET,
        DEFAULT_REFRESH,
        snap.expires_in.unwrap_or(3600),
    );
    let mut file = db.as_os_str().to_owned();
    file.push("-refresh-token");
    let file = PathBuf::from(file);
    std::fs::write(&file, format!("{DEFAULT_REFRESH}\n"))?;
    Ok(vec![
        ("pleo_auth", "oauth".into()),
        (
            "pleo_oauth_token_url",
            format!("{}/oauth/token", fake.base_url()),
        ),
        ("pleo_oauth_client_id", CLIENT_ID.into()),
        ("pleo_oauth_client_secret", CLIENT_SECRET.into()),
        ("pleo_oauth_refresh_token_file", file.display().to_string()),
    ])
}

impl Replay {
    /// `companies add` (with a pair of its own when `oauth`).
    pub(super) fn company_added(&mut self, company: &str, oauth: bool) -> anyhow::Result<()> {
        let (credential, token) = if oauth {
            let t = self
                .fake
                .authorize_company(company)
                .ok_or_else(|| anyhow::anyhow!("the fake has no OAuth"))?;
            self.pairs.own.insert(company.to_owned());
            (crate::store::CompanyCredential::OAuth, Some(t))
        } else {
            (crate::store::CompanyCredential::Default, None)
        };
        self.revoked.remove(company);
        Store::open(&self.opts.db)?.company_add(
            company,
            &credential,
            token.as_deref(),
            self.clock.now(),
        )?;
        self.summary.companies_added += 1;
        self.apply_companies(&[])
    }

    /// `companies remove`.
    pub(super) fn company_removed(&mut self, company: &str) -> anyhow::Result<()> {
        if Store::open(&self.opts.db)?.company_remove(company, self.clock.now())? {
            self.summary.companies_removed += 1;
        }
        self.apply_companies(&[])
    }

    /// `companies pause` (`paused`) or `companies resume`.
    pub(super) fn company_paused(&mut self, company: &str, paused: bool) -> anyhow::Result<()> {
        if Store::open(&self.opts.db)?.company_pause(company, paused, self.clock.now())? {
            self.summary.companies_paused += u64::from(paused);
        }
        self.apply_companies(&[])
    }

    /// The token endpoint refuses the OAuth client from now on (its secret changed there), or
    /// accepts it again.
    pub(super) fn oauth_client(&mut self, accepted: bool) {
        self.fake.set_oauth_client_secret(if accepted {
            CLIENT_SECRET
        } else {
            "a-secret-rotated-elsewhere"
        });
    }

    /// The customer revokes access: every token of the company stops working at the fake.
    pub(super) fn tokens_revoked(&mut self, company: &str) {
        self.fake.revoke_company(company);
        self.revoked.insert(company.to_owned());
        self.revoked_ever.insert(company.to_owned());
        self.summary.tokens_revoked += 1;
    }

    /// The customer authorizes again: a new refresh token, given with `companies add`.
    pub(super) fn reauthorized(&mut self, company: &str) -> anyhow::Result<()> {
        let t = self
            .fake
            .authorize_company(company)
            .ok_or_else(|| anyhow::anyhow!("the fake has no OAuth"))?;
        Store::open(&self.opts.db)?.company_add(
            company,
            &crate::store::CompanyCredential::OAuth,
            Some(&t),
            self.clock.now(),
        )?;
        self.pairs.own.insert(company.to_owned());
        self.revoked.remove(company);
        self.apply_companies(&[company.to_owned()])
    }

    /// The database's companies merged in again and, when jobmirror runs, sent to its
    /// workers as the service's reload sends them; the sync side then runs the recovery
    /// passes of the new (and `renewed`) companies, as the sync thread does.
    fn apply_companies(&mut self, renewed: &[String]) -> anyhow::Result<()> {
        let eff = crate::service::reload::Companies::effective(
            &self.base_cfg,
            &Store::open(&self.opts.db)?,
        )?;
        if let Some(r) = &mut self.running {
            r.reload
                .apply(&eff, renewed)?
                .ok_or_else(|| anyhow::anyhow!("a company change changed more than companies"))?;
            // An idle lane takes its list at once; a busy one (its round under way) when its
            // loop gets to it.
            for (i, (lane, rx)) in r.lanes.iter().zip(&r.lane_rx).enumerate() {
                match lane.try_lock() {
                    Ok(mut p) => {
                        while let Ok(list) = rx.try_recv() {
                            p.set_companies(list);
                        }
                    }
                    Err(_) => r.late_list[i] = true,
                }
            }
            while let Ok(list) = r.sync_rx.try_recv() {
                let (mut added, _) = r.mirror.set_companies(list.served);
                for c in list.renewed {
                    if !added.contains(&c) {
                        added.push(c);
                    }
                }
                if let Some(s) = &mut r.schedule {
                    s.set_keys(&r.mirror.poll_keys(), self.base.now().0);
                }
                if !added.is_empty() {
                    r.mirror.pass_companies(PassKind::Recovery, &added);
                }
            }
            r.next_round = self.base.now();
        }
        self.cfg = eff;
        Ok(())
    }

    /// The companies whose jobs jobmirror answers for now: served, and not revoked.
    pub(super) fn answerable(&self) -> HashSet<String> {
        self.cfg
            .company_ids
            .iter()
            .filter(|c| !self.pair_lost(c))
            .cloned()
            .collect()
    }

    /// Whether the company's credential cannot work until someone authorizes again: its
    /// customer revoked access, or its pair was lost.
    pub(super) fn pair_lost(&self, company: &str) -> bool {
        self.revoked.contains(company)
            || (self.pairs.default_lost && !self.pairs.own.contains(company))
    }

    /// A refresh the token endpoint applied whose answer was lost (cut, hung up, a 504) ends
    /// that pair: the refresh token offered is used up and the new one never arrived. Its
    /// companies are answered for no more, as after a revocation.
    pub(super) fn note_lost_refreshes(&mut self, requests: &[LoggedRequest]) {
        let lost: Vec<String> = requests
            .iter()
            .filter(|r| r.method == "POST" && r.path == "/oauth/token")
            .filter(|r| {
                matches!(r.fault.as_deref(), Some(f) if f.starts_with("HangUp")
                    || f.starts_with("Truncate") || f.starts_with("GatewayTimeout"))
            })
            .filter_map(|r| {
                r.body.split('&').find_map(|kv| {
                    kv.strip_prefix("refresh_token=")
                        .map(crate::edge::httpd::percent_decode)
                })
            })
            .collect();
        if lost.is_empty() {
            return;
        }
        let grants = self.fake.token_grants();
        for offered in lost {
            let Some(g) = grants.iter().find(|g| g.ok && g.refresh_token == offered) else {
                continue;
            };
            match &g.company {
                Some(c) => {
                    self.revoked.insert(c.clone());
                    self.revoked_ever.insert(c.clone());
                }
                None => {
                    self.pairs.default_lost = true;
                    for c in self.cfg.company_ids.clone() {
                        if !self.pairs.own.contains(&c) {
                            self.revoked_ever.insert(c);
                        }
                    }
                }
            }
        }
    }
}
