//! OAuth 2.0 access tokens for the Pleo client: use, refresh before expiry, rotation.
//!
//! Invariants: one refresher per process (a lock; the service is the only process using the
//! database's tokens); every refresh rotates the pair and the old refresh token stops working,
//! so the new pair is committed to `oauth_tokens` before it is used, and a pair that cannot be
//! committed is never used; the intent to refresh is committed before the request, so after a
//! crash between the token endpoint's answer and the commit jobmirror can say what happened;
//! tokens never reach a log or an error message.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;

use crate::clock::{Millis, SharedClock};
use crate::store::Store;
use crate::wire::{PleoError, Secret};

#[derive(Clone, Debug)]
pub struct OAuthConfig {
    pub token_url: String,
    pub client_id: String,
    pub client_secret: Secret,
    /// Where the operator puts a refresh token: read when the database has none, or when the
    /// stored one is refused (after re-authorizing).
    pub refresh_token_file: Option<PathBuf>,
    /// Refresh this long before the access token expires.
    pub refresh_margin: Duration,
    pub timeout: Duration,
}

/// Hands out a valid access token, refreshing it when due.
pub struct TokenSource {
    cfg: OAuthConfig,
    credential: String,
    /// The company whose own pair this is (`None`: the default credential's).
    company: Option<String>,
    /// Shared by every token source of a service (one connection, whatever the companies).
    store: std::sync::Arc<Mutex<Store>>,
    clock: SharedClock,
    agent: ureq::Agent,
    cached: Mutex<Option<(Secret, Millis)>>,
    refresh_lock: Mutex<()>,
    /// False in a command run beside the service: the service alone refreshes the pairs, so
    /// the command uses a stored access token that has not expired, and never refreshes.
    may_refresh: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource")
            .field("token_url", &self.cfg.token_url)
            .field("credential", &self.credential)
            .finish_non_exhaustive()
    }
}

fn auth_error(message: String) -> PleoError {
    PleoError::Api {
        status: 401,
        kind: "OAUTH_REFRESH_FAILED".into(),
        message,
    }
}

impl TokenSource {
    /// The default credential's token source, on a store of its own.
    pub fn new(
        cfg: OAuthConfig,
        store: Store,
        clock: SharedClock,
    ) -> Result<TokenSource, PleoError> {
        TokenSource::for_credential(cfg, std::sync::Arc::new(Mutex::new(store)), clock, None)
    }

    /// The token source of company `company`'s own pair (`company:<id>` in `oauth_tokens`,
    /// seeded by `jobmirror companies add --oauth-refresh-token-file`), on a shared store.
    pub fn for_company(
        mut cfg: OAuthConfig,
        store: std::sync::Arc<Mutex<Store>>,
        clock: SharedClock,
        company: &str,
    ) -> Result<TokenSource, PleoError> {
        // A company's refresh token comes from `companies add`, never from the default's file.
        cfg.refresh_token_file = None;
        TokenSource::for_credential(cfg, store, clock, Some(company))
    }

    fn for_credential(
        cfg: OAuthConfig,
        store: std::sync::Arc<Mutex<Store>>,
        clock: SharedClock,
        company: Option<&str>,
    ) -> Result<TokenSource, PleoError> {
        crate::pleo::net::check_base_url(&cfg.token_url).map_err(PleoError::Config)?;
        let agent = crate::pleo::net::agent(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(cfg.timeout))
                .max_redirects(0)
                .build(),
        );
        Ok(TokenSource {
            cfg,
            credential: company.map_or_else(|| "default".into(), crate::store::company_credential),
            company: company.map(str::to_owned),
            store,
            clock,
            agent,
            cached: Mutex::new(None),
            refresh_lock: Mutex::new(()),
            may_refresh: std::sync::atomic::AtomicBool::new(true),
        })
    }

    fn fresh(&self, exp: Millis) -> bool {
        self.clock.now().plus(self.cfg.refresh_margin) < exp
    }

    /// The cached access token, if it does not expire within the margin.
    fn cached_fresh(&self) -> Option<Secret> {
        self.cached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .filter(|(_, exp)| self.fresh(*exp))
            .map(|(t, _)| t)
    }

    /// Never refresh (a command run while the service runs: one refresher per pair).
    pub fn never_refresh(&self) {
        self.may_refresh
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// When this pair wants refreshing: the cached access token's expiry less the margin, or
    /// now when none is cached (then [`TokenSource::bearer`] reads the stored one first, and
    /// refreshes only if that is due too).
    pub fn next_refresh(&self) -> Millis {
        match self
            .cached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            Some((_, exp)) => Millis(
                exp.0
                    .saturating_sub(crate::clock::ms(self.cfg.refresh_margin)),
            ),
            None => self.clock.now(),
        }
    }

    /// A valid access token (refreshed first if it expires within the margin).
    pub fn bearer(&self) -> Result<Secret, PleoError> {
        if let Some(t) = self.cached_fresh() {
            return Ok(t);
        }
        // One refresher: others wait here and then find the new token.
        let _one = self.refresh_lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = self.cached_fresh() {
            return Ok(t);
        }
        let row = self.stored()?;
        if row.refused_at.is_some() {
            // Terminal (Pleo: retrying a refused refresh token will not help): nothing is
            // sent until a new refresh token is given, in the file or by `companies add`.
            if let Some(t) = self.file_token()
                && t != row.refresh_token.expose()
            {
                return self.reseed_and_refresh(&t, row.refresh_started_at);
            }
            return Err(auth_error(row.last_error.clone().unwrap_or_else(|| {
                "the OAuth refresh token was refused; authorize again".into()
            })));
        }
        if let (Some(t), Some(exp)) = (&row.access_token, row.access_expires_at)
            && self.fresh(exp)
        {
            *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = Some((t.clone(), exp));
            return Ok(t.clone());
        }
        if !self.may_refresh.load(std::sync::atomic::Ordering::Relaxed) {
            // Any stored access token with a few seconds left will do for a command.
            return match (&row.access_token, row.access_expires_at) {
                (Some(t), Some(exp)) if self.clock.now().plus_secs(5) < exp => Ok(t.clone()),
                _ => Err(auth_error(format!(
                    "the access token of {} is being refreshed by the running service (one process refreshes a pair); try again in a few seconds",
                    self.who()
                ))),
            };
        }
        let interrupted = row.refresh_started_at;
        self.refresh(row, true, interrupted)
    }

    /// The API refused the token (401): forget it, so the next call refreshes.
    pub fn invalidate(&self) {
        *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        if let Ok(Some(row)) = store.oauth_get(&self.credential) {
            // Expire the stored access token (keeping the refresh token).
            let _ = store.oauth_commit(
                &self.credential,
                "",
                Millis(0),
                row.refresh_token.expose(),
                self.clock.now(),
            );
        }
    }

    fn file_token(&self) -> Option<String> {
        let path = self.cfg.refresh_token_file.as_ref()?;
        let t = std::fs::read_to_string(path).ok()?;
        let t = t.trim().to_owned();
        (!t.is_empty()).then_some(t)
    }

    fn stored(&self) -> Result<crate::store::TokenRow, PleoError> {
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        let db = |e: crate::store::StoreError| PleoError::Config(format!("OAuth token store: {e}"));
        if let Some(row) = store.oauth_get(&self.credential).map_err(db)? {
            return Ok(row);
        }
        let Some(t) = self.file_token() else {
            return Err(auth_error(match &self.company {
                None => "no OAuth refresh token yet: put one in the file named by pleo_oauth_refresh_token_file (or give each company a pair of its own with jobmirror companies add --oauth-refresh-token-file)".into(),
                Some(c) => format!(
                    "company {c} has no OAuth refresh token: authorize it again (jobmirror companies add {c} --oauth-refresh-token-file FILE)"
                ),
            }));
        };
        store
            .oauth_seed(&self.credential, &t, self.clock.now())
            .map_err(db)?;
        store
            .oauth_get(&self.credential)
            .map_err(db)?
            .ok_or_else(|| auth_error("the OAuth token row vanished".into()))
    }

    /// `interrupted`: when an earlier refresh began that never stored its answer, if one did.
    fn refresh(
        &self,
        row: crate::store::TokenRow,
        may_reseed: bool,
        interrupted: Option<Millis>,
    ) -> Result<Secret, PleoError> {
        let db = |e: crate::store::StoreError| PleoError::Config(format!("OAuth token store: {e}"));
        self.store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .oauth_begin_refresh(&self.credential, self.clock.now())
            .map_err(db)?;
        let form = format!(
            "grant_type=refresh_token&refresh_token={}&client_id={}&client_secret={}",
            enc(row.refresh_token.expose()),
            enc(&self.cfg.client_id),
            enc(self.cfg.client_secret.expose())
        );
        let resp = self
            .agent
            .post(&self.cfg.token_url)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .header("Accept", "application/json")
            .send(form.as_bytes());
        let mut resp =
            resp.map_err(|e| PleoError::Transport(format!("OAuth token endpoint: {e}")))?;
        let status = resp.status().as_u16();
        let body: Value = resp.body_mut().read_json().unwrap_or(Value::Null);
        if status == 200 {
            let (Some(access), Some(refresh)) = (
                body["access_token"].as_str(),
                body["refresh_token"].as_str(),
            ) else {
                return Err(PleoError::Decode(
                    "the token endpoint's answer lacks access_token or refresh_token".into(),
                ));
            };
            let now = self.clock.now();
            let expires = now.plus_secs(body["expires_in"].as_i64().unwrap_or(3600));
            // Committed before use: if this fails, the new pair is not used at all.
            self.store
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .oauth_commit(&self.credential, access, expires, refresh, now)
                .map_err(|e| {
                    PleoError::Config(format!(
                        "the refreshed OAuth tokens could not be stored, so they are not used: {e}"
                    ))
                })?;
            // One line a refresh for the default credential; a company's at debug (with
            // thousands of companies, a line each would flood the log).
            match &self.company {
                None => log::info!("OAuth access token refreshed; valid until {expires}"),
                Some(c) => {
                    log::debug!(
                        "OAuth access token of company {c} refreshed; valid until {expires}"
                    )
                }
            }
            let token = Secret::new(access);
            *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = Some((token.clone(), expires));
            return Ok(token);
        }
        let code = body["error"].as_str().unwrap_or("").to_owned();
        if status == 400 || status == 401 {
            // The operator may have authorized again and left a new refresh token in the file.
            if may_reseed
                && let Some(t) = self.file_token()
                && t != row.refresh_token.expose()
            {
                log::warn!(
                    "the stored OAuth refresh token was refused ({code}); using the one in pleo_oauth_refresh_token_file"
                );
                return self.reseed_and_refresh(&t, interrupted);
            }
            let how = match &self.company {
                None => {
                    "authorize again and put the new refresh token in pleo_oauth_refresh_token_file"
                        .to_owned()
                }
                Some(c) => format!(
                    "company {c} needs re-authorization: authorize again and give the new refresh token with jobmirror companies add {c} --oauth-refresh-token-file FILE"
                ),
            };
            let why = match interrupted {
                Some(at) => format!(
                    "the OAuth refresh token was refused ({code}). A refresh started at {at} never stored its answer (jobmirror stopped in between), so the token endpoint has already rotated the pair; {how}"
                ),
                None => format!("the OAuth refresh token was refused ({code}); {how}"),
            };
            // Terminal: the pair is marked refused and nothing more is sent with it.
            let _ = self
                .store
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .oauth_refuse(&self.credential, &why, self.clock.now());
            log::error!("{why}");
            return Err(auth_error(why));
        }
        Err(PleoError::Api {
            status,
            kind: "OAUTH_TOKEN_ENDPOINT".into(),
            message: format!("the token endpoint answered {status} {code}"),
        })
    }
}

impl TokenSource {
    /// The credential in words: "the default credential" or "company X".
    fn who(&self) -> String {
        match &self.company {
            Some(c) => format!("company {c}"),
            None => "the default credential".into(),
        }
    }

    /// Stores `token` as the refresh token (re-authorized) and refreshes with it.
    fn reseed_and_refresh(
        &self,
        token: &str,
        interrupted: Option<Millis>,
    ) -> Result<Secret, PleoError> {
        let db = |e: crate::store::StoreError| PleoError::Config(format!("OAuth token store: {e}"));
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        store
            .oauth_seed(&self.credential, token, self.clock.now())
            .map_err(db)?;
        let row = store
            .oauth_get(&self.credential)
            .map_err(db)?
            .ok_or_else(|| auth_error("the OAuth token row vanished".into()))?;
        drop(store);
        self.refresh(row, false, interrupted)
    }
}

/// `application/x-www-form-urlencoded` value encoding.
fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
