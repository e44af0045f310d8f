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

use serde_json::{Value, json};

use crate::clock::{Millis, SharedClock};
use crate::store::Store;
use crate::wire::{PleoError, Secret};

mod hold;
use hold::Held;

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
    /// The OAuth app's standing at the token endpoint, shared by every token source made
    /// from this configuration (the default credential's and each company's).
    pub standing: std::sync::Arc<ClientStanding>,
}

/// Whether the token endpoint accepts the OAuth *client* (the app: its id and secret), and
/// when a refused or failing endpoint may be asked again. RFC 6749 section 5.2: only
/// `invalid_grant` says the refresh token (the customer's grant) is no good; `invalid_client`
/// and `unauthorized_client` refuse the client, and a 5xx or a transport error refuses the
/// moment. Neither uses up a refresh token, so neither ends a pair: the endpoint is asked
/// again after a backoff (5 s doubling to 5 min, one request for every pair at a time), and the
/// pairs work again by themselves once it answers.
#[derive(Debug, Default)]
pub struct ClientStanding {
    state: Mutex<Standing>,
    /// The gauge `jobmirror_oauth_client_refused` (1 while the client is refused).
    metrics: std::sync::OnceLock<std::sync::Arc<crate::health::Metrics>>,
}

#[derive(Debug, Default)]
struct Standing {
    /// Set while the endpoint refuses the client: the error as said.
    refused: Option<String>,
    /// No request before this (a backoff after a refusal or a failure).
    quiet_until: Option<Millis>,
    backoff: Duration,
}

const STANDING_BACKOFF_MIN: Duration = Duration::from_secs(5);
const STANDING_BACKOFF_MAX: Duration = Duration::from_secs(300);

/// How a token endpoint's refusal reads (RFC 6749 section 5.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `invalid_grant`: the refresh token is no good; the pair ends.
    Grant,
    /// `invalid_client`, `unauthorized_client`, or a 401 that names nothing: the app is refused.
    Client,
    /// Anything else (another code, a 5xx): the moment; asked again later.
    Moment,
}

impl Refusal {
    pub fn of(status: u16, code: &str) -> Refusal {
        match (status, code) {
            (400 | 401, "invalid_grant") => Refusal::Grant,
            (_, "invalid_client" | "unauthorized_client") | (401, "") => Refusal::Client,
            _ => Refusal::Moment,
        }
    }
}

impl ClientStanding {
    /// Shows the standing in `metrics` (the service's gauges).
    pub fn attach(&self, metrics: std::sync::Arc<crate::health::Metrics>) {
        let _ = self.metrics.set(metrics);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Standing> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The client is refused now, as said by the endpoint.
    pub fn refused(&self) -> Option<String> {
        self.lock().refused.clone()
    }

    /// May a refresh be sent now? While backing off, the error to answer instead. The first
    /// caller after a backoff is let through and pushes the next try out, so one request at a
    /// time probes the endpoint for every pair.
    fn may_send(&self, now: Millis) -> Result<(), PleoError> {
        let mut s = self.lock();
        match s.quiet_until {
            Some(t) if now < t => Err(auth_error(match &s.refused {
                Some(why) => format!("{why}; asking the token endpoint again at {t}"),
                None => format!("the token endpoint failed; asking it again at {t}"),
            })),
            Some(_) => {
                let probe = s.backoff;
                s.quiet_until = Some(now.plus(probe));
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn back_off(s: &mut Standing, now: Millis) {
        s.backoff = (s.backoff * 2).clamp(STANDING_BACKOFF_MIN, STANDING_BACKOFF_MAX);
        s.quiet_until = Some(now.plus(s.backoff));
    }

    /// The endpoint refused the client: loud once, then backed off.
    fn refuse(&self, why: &str, now: Millis) -> bool {
        let mut s = self.lock();
        let first = s.refused.is_none();
        s.refused = Some(why.to_owned());
        Self::back_off(&mut s, now);
        if let Some(m) = self.metrics.get() {
            m.oauth_client_refused
                .store(1, std::sync::atomic::Ordering::Relaxed);
        }
        first
    }

    /// The endpoint failed (5xx, transport, another code): backed off, nothing ends.
    fn failed(&self, now: Millis) {
        Self::back_off(&mut self.lock(), now);
    }

    /// The endpoint answered a refresh: the client is accepted. True when it was refused.
    fn accepted(&self) -> bool {
        let mut s = self.lock();
        let was = s.refused.take().is_some();
        *s = Standing::default();
        if let Some(m) = self.metrics.get() {
            m.oauth_client_refused
                .store(0, std::sync::atomic::Ordering::Relaxed);
        }
        was
    }
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
    /// This token source's name as a holder of the pair's refresh on a shared database
    /// (`oauth_tokens.refresh_holder`, with the pid: [`TokenSource::holder`]).
    holder: uuid::Uuid,
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
            holder: uuid::Uuid::new_v4(),
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

    /// Whether the token endpoint refuses the OAuth client now (every pair waits for it).
    pub fn client_refused(&self) -> bool {
        self.cfg.standing.refused().is_some()
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
        let refused = self.cached.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((token, _)) = refused {
            // Expire the stored access token if it is still the refused one (keeping the
            // refresh token; a pair stored meanwhile, by this process or another, stays).
            let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
            let _ = store.oauth_expire_access(&self.credential, token.expose(), self.clock.now());
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
        let standing = self.cfg.standing.clone();
        standing.may_send(self.clock.now())?;
        // Processes sharing a PostgreSQL database refresh a pair one at a time: the pair as it
        // is once this one holds the refresh (another may have rotated it meanwhile).
        let (_hold, row) = match self.hold_refresh(row)? {
            Held::Fresh(token) => return Ok(token),
            Held::Taken(hold, row) => (hold, row),
        };
        let interrupted = interrupted.or(row.refresh_started_at);
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
        let mut resp = resp.map_err(|e| {
            standing.failed(self.clock.now());
            PleoError::Transport(format!("OAuth token endpoint: {e}"))
        })?;
        let status = resp.status().as_u16();
        let body: Value = resp.body_mut().read_json().unwrap_or(Value::Null);
        if status == 200 {
            if standing.accepted() {
                log::warn!("the OAuth token endpoint accepts the client again; refreshes resume");
                self.journal_standing(crate::store::EventKind::OAuthClientAccepted, json!({}));
            }
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
        match Refusal::of(status, &code) {
            Refusal::Grant => {}
            Refusal::Client => {
                // The app (its id or secret) is refused, not the customer's grant: every pair
                // is kept, and the endpoint is asked again after a backoff.
                let why = format!(
                    "the OAuth token endpoint refuses the client ({status} {code}): check pleo_oauth_client_id and the client secret; every refresh token is kept and refreshes resume by themselves once the endpoint accepts the client"
                );
                if standing.refuse(&why, self.clock.now()) {
                    log::error!("{why}");
                    self.journal_standing(
                        crate::store::EventKind::OAuthClientRefused,
                        json!({"status": status, "error": code}),
                    );
                }
                return Err(auth_error(why));
            }
            Refusal::Moment => {
                standing.failed(self.clock.now());
                return Err(PleoError::Api {
                    status,
                    kind: "OAUTH_TOKEN_ENDPOINT".into(),
                    message: format!("the token endpoint answered {status} {code}"),
                });
            }
        }
        {
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
            // Terminal: the pair is marked refused and nothing more is sent with it, unless
            // another process rotated it meanwhile (its hold lapsed while this one's request
            // was out): then the refusal was of a spent token, and the stored pair stands.
            let marked = self
                .store
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .oauth_refuse(
                    &self.credential,
                    row.refresh_token.expose(),
                    &why,
                    self.clock.now(),
                );
            if let Ok(false) = marked {
                log::warn!(
                    "the OAuth refresh token of {} was refused ({code}), but another process had already rotated the pair; using the pair it stored",
                    self.who()
                );
                return Err(PleoError::Transport(format!(
                    "the OAuth pair of {} was rotated by another process while this one refreshed it; the next request uses the stored pair",
                    self.who()
                )));
            }
            log::error!("{why}");
            Err(auth_error(why))
        }
    }

    /// Journals a change of the client's standing (for `doctor`); a failure only warns.
    fn journal_standing(&self, kind: crate::store::EventKind, detail: Value) {
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = store.journal(self.clock.now(), None, None, kind, detail) {
            log::warn!("could not journal the OAuth client's standing: {e}");
        }
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
