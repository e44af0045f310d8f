//! Configuration: a flat TOML file (`--config`) whose every key can be overridden by the
//! environment variable `JOBMIRROR_<KEY>` (upper case).
//!
//! Invariants: a bad or missing value is one error naming both the key and its variable; an
//! unknown key in the file is an error (a typo never silently falls back to a default);
//! secrets are read into [`Secret`] and never printed.
//!
//! Files: this one reads and checks every value into [`Config`]; `keys` lists the keys, their
//! defaults and meaning; `companies` the company ids (`company_ids_file`) and the shard;
//! `clients` builds the Pleo clients a configuration describes; `merge` adds the database's
//! companies.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::pleo::{self, Secret};

mod clients;
mod companies;
mod database;
mod handler;
mod keys;
mod merge;

pub use companies::Shard;
pub(crate) use companies::is_company_id;
use companies::read_company_ids_file;
pub use database::SharedDb;
use keys::raw_values;
pub use keys::{DEFAULT_CONFIG_PATH, KEYS, Setting, effective, is_key, reference_markdown};

/// The webhook receiver's settings (present when `webhook_listen` is set).
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    pub listen: String,
    pub secrets: crate::edge::webhook::Secrets,
    pub body_bytes_max: usize,
    pub connections_max: usize,
    pub queue_max: usize,
    /// Bytes of stored deliveries allowed per company and in all.
    pub quota: crate::store::Quota,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("configuration error: {key} ({env}): {message}")]
pub struct ConfigError {
    pub key: String,
    pub env: String,
    pub message: String,
}

pub(crate) fn env_name(key: &str) -> String {
    format!("JOBMIRROR_{}", key.to_ascii_uppercase())
}

fn err(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_owned(),
        env: env_name(key),
        message: message.into(),
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub db: PathBuf,
    pub pleo_base_url: String,
    pub pleo_api_key: Secret,
    pub company_ids: Vec<String>,
    pub poll_interval: Duration,
    pub log: log::LevelFilter,
    pub log_format: crate::logging::LogFormat,
    pub deadline_warning: Duration,
    pub claim_min_left: Duration,
    pub not_ready_fail_margin: Duration,
    pub claims_per_round_max: u32,
    pub conflict_backoff: Duration,
    pub resume_unknown_in_progress: bool,
    /// List the default credential's companies with one listing naming no company (opt-in).
    pub list_by_credential: bool,
    pub pleo_connect_timeout: Duration,
    pub pleo_request_timeout: Duration,
    pub pleo_retry_attempts_max: u32,
    pub shutdown_timeout: Duration,
    /// Processor threads (companies are spread over them).
    pub lanes: u32,
    /// Listing passes that run at once (the listing pool's threads).
    pub listing_threads: u32,
    /// Which part of the listed companies this instance serves (`shard = "i/n"`);
    /// `company_ids` holds only those.
    pub shard: Shard,
    /// `db` on PostgreSQL: the password's file, this instance's name, the company lease.
    pub shared_db: SharedDb,
    /// How many companies were listed before the shard took its part.
    pub companies_listed: usize,
    /// Companies with API keys of their own (`company_api_keys_file`, or the database).
    pub company_api_keys: BTreeMap<String, Secret>,
    /// Companies with OAuth token pairs of their own (the database; see [`Config::with_companies`]).
    pub company_oauth: std::collections::BTreeSet<String>,
    /// OAuth 2.0 instead of the API key (`pleo_auth = "oauth"`).
    pub oauth: Option<crate::pleo::oauth::OAuthConfig>,
    /// Client-side pace of API requests (0: none).
    pub pleo_requests_per_sec_max: u32,
    /// A worker thread silent this long is wedged.
    pub health_stale: Duration,
    /// The admin listener (`/metrics`, `/healthz`), if any.
    pub admin_listen: Option<String>,
    pub retention: crate::store::Retention,
    pub webhook: Option<WebhookConfig>,
    /// Required by the service (see [`Config::require_handler`]); other commands do without.
    pub handler: Option<crate::processing::handler::HandlerSpec>,
    pub pipeline: crate::processing::pipeline::PipelineConfig,
}

/// An error that is the user's to fix, outside the configuration keys (exit 2): a missing
/// database, a file that would be overwritten, a job id that is not there.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// What a command uses of the configuration. Only those parts are required and checked, so
/// an operator command runs with the service's own file and environment (its webhook secret,
/// key file and companies included) without reading secrets it has no use for. Every value
/// that is given is still checked for its form, and unknown keys are still errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Needs {
    /// Pleo's credential (API key or OAuth) and the per-company keys.
    pub pleo: bool,
    /// The webhook receiver's secrets (when `webhook_listen` is set).
    pub webhook: bool,
    /// At least one company in `company_ids`.
    pub companies: bool,
}

impl Needs {
    /// `run`: everything.
    pub const SERVICE: Needs = Needs {
        pleo: true,
        webhook: true,
        companies: true,
    };
    /// `record`: Pleo and the companies to read.
    pub const PLEO_COMPANIES: Needs = Needs {
        pleo: true,
        webhook: false,
        companies: true,
    };
    /// `subscribe`, `subscriptions`: Pleo's credential only.
    pub const PLEO: Needs = Needs {
        pleo: true,
        webhook: false,
        companies: false,
    };
    /// Operator commands (`status`, `why`, `doctor`, `prune`, ...): the database and the
    /// timing settings.
    pub const OPERATOR: Needs = Needs {
        pleo: false,
        webhook: false,
        companies: false,
    };
}

impl Config {
    /// Loads from an optional file and the process environment, for the service.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Config::load_for(file, Needs::SERVICE)
    }

    /// Loads from an optional file and the process environment what `needs` names.
    pub fn load_for(file: Option<&Path>, needs: Needs) -> Result<Config, ConfigError> {
        Config::load_with_needs(file, &|k| std::env::var(k).ok(), needs)
    }

    /// Loads from an optional file and the given environment lookup, for the service.
    pub fn load_with(
        file: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        Config::load_with_needs(file, env, Needs::SERVICE)
    }

    /// Loads from an optional file and the given environment lookup what `needs` names.
    pub fn load_with_needs(
        file: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
        needs: Needs,
    ) -> Result<Config, ConfigError> {
        Config::from_values(&raw_values(file, env)?, needs)
    }

    /// The configuration the given values (as [`raw_values`] reads them) describe, checked for
    /// what `needs` names.
    fn from_values(
        given: &BTreeMap<&'static str, (String, &'static str)>,
        needs: Needs,
    ) -> Result<Config, ConfigError> {
        let values: BTreeMap<&'static str, String> =
            given.iter().map(|(k, (v, _))| (*k, v.clone())).collect();
        let get = |k: &str| -> Option<String> {
            values.get(k).cloned().or_else(|| {
                KEYS.iter()
                    .find(|(n, _, _)| *n == k)
                    .and_then(|(_, d, _)| d.map(str::to_owned))
            })
        };
        let secs = |k: &str, min: u64| -> Result<Duration, ConfigError> {
            let v = get(k).unwrap_or_default();
            let n: u64 = v
                .trim()
                .parse()
                .map_err(|_| err(k, format!("expected a whole number of seconds, got {v:?}")))?;
            if n < min {
                return Err(err(k, format!("must be at least {min}, got {n}")));
            }
            Ok(Duration::from_secs(n))
        };
        let count = |k: &str| -> Result<u32, ConfigError> {
            let v = get(k).unwrap_or_default();
            match v.trim().parse::<u32>() {
                Ok(n) if n >= 1 => Ok(n),
                _ => Err(err(
                    k,
                    format!("expected a whole number of at least 1, got {v:?}"),
                )),
            }
        };
        let bytes = |k: &str| -> Result<u64, ConfigError> {
            let v = get(k).unwrap_or_default();
            match v.trim().parse::<u64>() {
                Ok(n) if n >= 1 => Ok(n),
                _ => Err(err(
                    k,
                    format!("expected a number of bytes, at least 1, got {v:?}"),
                )),
            }
        };

        let db = PathBuf::from(get("db").unwrap_or_default());
        if db.as_os_str().is_empty() {
            return Err(err("db", "must not be empty"));
        }
        let pleo_base_url = get("pleo_base_url")
            .unwrap_or_default()
            .trim()
            .trim_end_matches('/')
            .to_owned();
        pleo::check_base_url(&pleo_base_url).map_err(|m| err("pleo_base_url", m))?;

        let auth_mode = get("pleo_auth").unwrap_or_default();
        let oauth_mode = match auth_mode.trim() {
            "api_key" => false,
            "oauth" => true,
            other => {
                return Err(err(
                    "pleo_auth",
                    format!("expected api_key or oauth, got {other:?}"),
                ));
            }
        };
        let key = match (values.get("pleo_api_key"), values.get("pleo_api_key_file")) {
            _ if !needs.pleo => "-".to_owned(),
            (None, None) if oauth_mode => "-".to_owned(),
            (Some(_), Some(_)) => {
                return Err(err(
                    "pleo_api_key",
                    "set either pleo_api_key or pleo_api_key_file, not both",
                ));
            }
            (Some(k), None) => k.trim().to_owned(),
            (None, Some(f)) => std::fs::read_to_string(f)
                .map_err(|e| err("pleo_api_key_file", format!("cannot read {f}: {e}")))?
                .trim()
                .to_owned(),
            (None, None) => return Err(err("pleo_api_key", "is required (or pleo_api_key_file)")),
        };
        if key.is_empty() {
            return Err(err("pleo_api_key", "is empty"));
        }
        if key.chars().any(|c| c.is_control()) {
            return Err(err("pleo_api_key", "contains control characters"));
        }

        let oauth = if oauth_mode && needs.pleo {
            let need = |k: &str| -> Result<String, ConfigError> {
                get(k)
                    .map(|v| v.trim().to_owned())
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| err(k, "is required when pleo_auth = \"oauth\""))
            };
            let client_secret = match (
                values.get("pleo_oauth_client_secret"),
                values.get("pleo_oauth_client_secret_file"),
            ) {
                (Some(s), None) => s.trim().to_owned(),
                (None, Some(f)) => std::fs::read_to_string(f)
                    .map_err(|e| {
                        err(
                            "pleo_oauth_client_secret_file",
                            format!("cannot read {f}: {e}"),
                        )
                    })?
                    .trim()
                    .to_owned(),
                _ => {
                    return Err(err(
                        "pleo_oauth_client_secret",
                        "set exactly one of pleo_oauth_client_secret and pleo_oauth_client_secret_file",
                    ));
                }
            };
            let token_url = need("pleo_oauth_token_url")?;
            pleo::check_base_url(&token_url).map_err(|m| err("pleo_oauth_token_url", m))?;
            Some(crate::pleo::oauth::OAuthConfig {
                token_url,
                client_id: need("pleo_oauth_client_id")?,
                client_secret: Secret::new(client_secret),
                // Optional: without it the default credential has no pair, and every company
                // needs one of its own (`jobmirror companies add --oauth-refresh-token-file`).
                refresh_token_file: get("pleo_oauth_refresh_token_file")
                    .map(|f| f.trim().to_owned())
                    .filter(|f| !f.is_empty())
                    .map(PathBuf::from),
                refresh_margin: secs("pleo_oauth_refresh_margin_secs", 0)?,
                timeout: secs("pleo_request_timeout_secs", 1)?,
                standing: Default::default(),
            })
        } else {
            None
        };
        let company_api_keys: BTreeMap<String, Secret> = match get("company_api_keys_file")
            .filter(|f| needs.pleo && !f.trim().is_empty())
        {
            None => BTreeMap::new(),
            Some(f) => {
                let k = "company_api_keys_file";
                let text = std::fs::read_to_string(&f)
                    .map_err(|e| err(k, format!("cannot read {f}: {e}")))?;
                let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
                    err(k, format!("{f} is not valid TOML: {}", e.message()))
                })?;
                let mut out = BTreeMap::new();
                for (company, v) in table {
                    let key = v.as_str().map(str::trim).filter(|s| !s.is_empty()).ok_or_else(|| {
                        err(k, format!("{f}: the key for company {company:?} must be a non-empty string"))
                    })?;
                    out.insert(company, Secret::new(key));
                }
                out
            }
        };
        let mut company_ids: Vec<String> = get("company_ids")
            .unwrap_or_default()
            .split([',', ' ', '\n', '\t'])
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        if let Some(f) = get("company_ids_file").filter(|f| !f.trim().is_empty()) {
            match read_company_ids_file(f.trim()) {
                Ok(more) => {
                    let mut seen: std::collections::HashSet<String> =
                        company_ids.iter().cloned().collect();
                    for (line, id) in more {
                        if !is_company_id(&id) {
                            return Err(err(
                                "company_ids_file",
                                format!("{f}:{line}: {id:?} is not a company id (a UUID)"),
                            ));
                        }
                        if !seen.insert(id.clone()) {
                            return Err(err(
                                "company_ids_file",
                                format!("{f}:{line}: company {id:?} is listed more than once"),
                            ));
                        }
                        company_ids.push(id);
                    }
                }
                Err(e) if needs.companies => return Err(err("company_ids_file", e)),
                // A command that does not serve companies goes on, knowing none of them (a
                // list that lacks the file's would be wrong, not just short).
                Err(_) => company_ids.clear(),
            }
        }
        let served: std::collections::HashSet<&String> = company_ids.iter().collect();
        if let Some(c) = company_api_keys.keys().find(|c| !served.contains(c)) {
            return Err(err(
                "company_api_keys_file",
                format!("company {c} has a key but is not in company_ids"),
            ));
        }
        if company_ids.is_empty() && needs.companies && !companies::database_has_companies(&db) {
            return Err(err(
                "company_ids",
                "is required: at least one Pleo company id (here, in company_ids_file, or added with jobmirror companies add)",
            ));
        }
        if let Some(bad) = company_ids.iter().find(|c| !is_company_id(c)) {
            return Err(err(
                "company_ids",
                format!("{bad:?} is not a company id (a UUID)"),
            ));
        }
        let mut dedup = company_ids.clone();
        dedup.sort();
        dedup.dedup();
        if dedup.len() != company_ids.len() {
            return Err(err("company_ids", "lists a company more than once"));
        }
        let shard = match get("shard") {
            None => Shard::ALL,
            Some(s) => Shard::parse(&s).map_err(|m| err("shard", m))?,
        };
        let shared_db = database::parse(&get, &db, shard)?;
        let companies_listed = company_ids.len();
        company_ids.retain(|c| shard.serves(c));
        let company_api_keys: BTreeMap<String, Secret> = company_api_keys
            .into_iter()
            .filter(|(c, _)| shard.serves(c))
            .collect();
        if company_ids.is_empty() && companies_listed > 0 && needs.companies {
            return Err(err(
                "shard",
                format!("shard {shard} serves none of the {companies_listed} companies listed"),
            ));
        }

        let log_text = get("log").unwrap_or_default();
        let log = match log_text.trim().to_ascii_lowercase().as_str() {
            "off" => log::LevelFilter::Off,
            "error" => log::LevelFilter::Error,
            "warn" => log::LevelFilter::Warn,
            "info" => log::LevelFilter::Info,
            "debug" => log::LevelFilter::Debug,
            "trace" => log::LevelFilter::Trace,
            _ => {
                return Err(err(
                    "log",
                    format!("expected off, error, warn, info, debug or trace, got {log_text:?}"),
                ));
            }
        };
        let format_text = get("log_format").unwrap_or_default();
        let log_format = crate::logging::LogFormat::parse(&format_text).ok_or_else(|| {
            err(
                "log_format",
                format!("expected text or json, got {format_text:?}"),
            )
        })?;
        let flag = |k: &str| -> Result<bool, ConfigError> {
            let v = get(k).unwrap_or_default();
            match v.trim() {
                "true" | "1" | "yes" => Ok(true),
                "false" | "0" | "no" => Ok(false),
                _ => Err(err(k, format!("expected true or false, got {v:?}"))),
            }
        };
        let resume_unknown_in_progress = flag("resume_unknown_in_progress")?;

        let mut secret_text = values.get("webhook_secret").cloned().unwrap_or_default();
        if let Some(f) = values.get("webhook_secret_file").filter(|_| needs.webhook) {
            let t = std::fs::read_to_string(f)
                .map_err(|e| err("webhook_secret_file", format!("cannot read {f}: {e}")))?;
            secret_text.push('\n');
            secret_text.push_str(&t);
        }
        let webhook = match get("webhook_listen")
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
        {
            None => None,
            Some(listen) if listen.parse::<std::net::SocketAddr>().is_err() => {
                return Err(err(
                    "webhook_listen",
                    format!("expected an address like 127.0.0.1:8383, got {listen:?}"),
                ));
            }
            // A command without a receiver has no use for its secrets.
            Some(_) if !needs.webhook => None,
            Some(listen) => {
                let secrets = crate::edge::webhook::Secrets::parse(&secret_text).map_err(|m| {
                    let key = if values.contains_key("webhook_secret_file") {
                        "webhook_secret_file"
                    } else {
                        "webhook_secret"
                    };
                    err(
                        key,
                        format!("{m}; a receiver needs the whsec_ secret of its Pleo subscription"),
                    )
                })?;
                Some(WebhookConfig {
                    listen,
                    secrets,
                    body_bytes_max: count("webhook_body_bytes_max")? as usize,
                    connections_max: count("webhook_connections_max")? as usize,
                    queue_max: count("webhook_queue_max")? as usize,
                    quota: crate::store::Quota {
                        per_company: bytes("webhook_stored_bytes_per_company_max")?,
                        total: bytes("webhook_stored_bytes_max")?,
                    },
                })
            }
        };

        let handler = handler::spec(
            get("handler_command").as_deref(),
            get("handler_env").as_deref(),
        )?;
        let admin_listen = get("admin_listen")
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty());
        if let Some(a) = &admin_listen
            && a.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(err(
                "admin_listen",
                format!("expected an address like 127.0.0.1:9187, got {a:?}"),
            ));
        }
        let days = |k: &str, min: u32| -> Result<u32, ConfigError> {
            let v = get(k).unwrap_or_default();
            match v.trim().parse::<u32>() {
                Ok(n) if n >= min => Ok(n),
                _ => Err(err(
                    k,
                    format!("expected a whole number of days, at least {min}, got {v:?}"),
                )),
            }
        };
        let retention = crate::store::Retention {
            jobs_days: days("prune_jobs_after_days", 1)?,
            webhook_bodies_days: days("prune_webhook_bodies_after_days", 1)?,
            // Senders retry for more than a day, and duplicates must still be recognised.
            webhook_ids_days: days("prune_webhook_ids_after_days", 4)?,
            sync_runs_days: days("prune_sync_runs_after_days", 1)?,
        };
        let pipeline = crate::processing::pipeline::PipelineConfig {
            item_timeout: secs("handler_item_timeout_secs", 1)?,
            job_timeout: secs("handler_job_timeout_secs", 1)?,
            attempts_max: count("handler_attempts_max")?,
            retry_backoff: secs("handler_retry_secs", 0)?,
            flush_interval: secs("report_flush_secs", 1)?,
            finish_margin: secs("finish_margin_secs", 0)?,
            // Close enough that the deadline decides something: know it from Pleo.
            reread_within: secs("finish_margin_secs", 0)? + secs("deadline_warning_secs", 0)?,
            deadline_warning: secs("deadline_warning_secs", 0)?,
            check_timeout: secs("handler_check_timeout_secs", 1)?,
            wait_tick: Duration::from_millis(50),
        };

        Ok(Config {
            handler,
            pipeline,
            webhook,
            db,
            pleo_base_url,
            pleo_api_key: Secret::new(key),
            company_ids,
            poll_interval: secs("poll_interval_secs", 1)?,
            log,
            log_format,
            deadline_warning: secs("deadline_warning_secs", 0)?,
            claim_min_left: secs("claim_min_left_secs", 0)?,
            not_ready_fail_margin: secs("not_ready_fail_margin_secs", 0)?,
            claims_per_round_max: count("claims_per_round_max")?,
            conflict_backoff: secs("conflict_backoff_secs", 0)?,
            resume_unknown_in_progress,
            list_by_credential: flag("list_by_credential")?,
            pleo_connect_timeout: secs("pleo_connect_timeout_secs", 1)?,
            pleo_request_timeout: secs("pleo_request_timeout_secs", 1)?,
            pleo_retry_attempts_max: count("pleo_retry_attempts_max")?,
            shutdown_timeout: secs("shutdown_timeout_secs", 1)?,
            lanes: count("lanes")?,
            listing_threads: database::at_most("listing_threads", count("listing_threads")?, 64)?,
            shared_db,
            shard,
            companies_listed,
            company_api_keys,
            company_oauth: Default::default(),
            oauth,
            pleo_requests_per_sec_max: {
                let v = get("pleo_requests_per_sec_max").unwrap_or_default();
                v.trim().parse::<u32>().map_err(|_| {
                    err(
                        "pleo_requests_per_sec_max",
                        format!("expected a whole number (0: no limit), got {v:?}"),
                    )
                })?
            },
            health_stale: secs("health_stale_secs", 1)?,
            admin_listen,
            retention,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        move |k| m.get(k).cloned()
    }

    const MIN: &[(&str, &str)] = &[
        ("JOBMIRROR_PLEO_API_KEY", "k"),
        (
            "JOBMIRROR_COMPANY_IDS",
            "00000000-0000-4000-8000-0000000000c1, 00000000-0000-4000-8000-0000000000c2",
        ),
        (
            "JOBMIRROR_HANDLER_COMMAND",
            "outbox:/tmp/jobmirror-test-outbox",
        ),
    ];

    #[test]
    fn a_webhook_listener_without_a_secret_is_refused() {
        let mut pairs = MIN.to_vec();
        pairs.push(("JOBMIRROR_WEBHOOK_LISTEN", "127.0.0.1:0"));
        let e = Config::load_with(None, &env(&pairs)).unwrap_err();
        assert_eq!(e.key, "webhook_secret");
        assert!(e.message.contains("whsec_"), "{}", e.message);
        pairs.push((
            "JOBMIRROR_WEBHOOK_SECRET",
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        ));
        assert!(
            Config::load_with(None, &env(&pairs))
                .unwrap()
                .webhook
                .is_some()
        );
    }

    #[test]
    fn defaults_and_env() {
        let c = Config::load_with(None, &env(MIN)).unwrap();
        assert_eq!(
            c.company_ids,
            [
                "00000000-0000-4000-8000-0000000000c1",
                "00000000-0000-4000-8000-0000000000c2"
            ]
        );
        assert_eq!(c.poll_interval, Duration::from_secs(300));
        assert_eq!(c.pleo_base_url, "https://external.pleo.io");
        assert!(
            !format!("{c:?}").contains("\"k\""),
            "the key never shows in Debug"
        );
    }

    #[test]
    fn env_overrides_file_and_unknown_file_keys_fail() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "poll_interval_secs = 60\ncompany_ids = [\"00000000-0000-4000-8000-00000000000a\"]\npleo_api_key = \"x\"\n",
        )
        .unwrap();
        let c = Config::load_with(
            Some(&f),
            &env(&[
                ("JOBMIRROR_POLL_INTERVAL_SECS", "7"),
                ("JOBMIRROR_HANDLER_COMMAND", "outbox:/tmp/o"),
            ]),
        )
        .unwrap();
        assert_eq!(c.poll_interval, Duration::from_secs(7));
        assert_eq!(c.company_ids, ["00000000-0000-4000-8000-00000000000a"]);
        std::fs::write(&f, "poll_intervall_secs = 60\n").unwrap();
        let e = Config::load_with(Some(&f), &env(MIN)).unwrap_err();
        assert_eq!(e.key, "poll_intervall_secs");
    }

    #[test]
    fn bad_values_name_key_and_variable() {
        let mut pairs = MIN.to_vec();
        pairs.push(("JOBMIRROR_POLL_INTERVAL_SECS", "soon"));
        let e = Config::load_with(None, &env(&pairs)).unwrap_err();
        assert_eq!(e.env, "JOBMIRROR_POLL_INTERVAL_SECS");
        assert!(e.to_string().contains("poll_interval_secs"), "{e}");
        let e = Config::load_with(None, &env(&[("JOBMIRROR_PLEO_API_KEY", "k")])).unwrap_err();
        assert_eq!(e.key, "company_ids");
        let mut pairs = MIN.to_vec();
        pairs.push(("JOBMIRROR_PLEO_BASE_URL", "http://pleo.example.com"));
        let e = Config::load_with(None, &env(&pairs)).unwrap_err();
        assert_eq!(e.key, "pleo_base_url");
    }

    #[test]
    fn api_key_from_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("key");
        std::fs::write(&f, "s3cret\n").unwrap();
        let fs = f.display().to_string();
        let c = Config::load_with(
            None,
            &env(&[
                ("JOBMIRROR_PLEO_API_KEY_FILE", &fs),
                ("JOBMIRROR_HANDLER_COMMAND", "outbox:/tmp/o"),
                (
                    "JOBMIRROR_COMPANY_IDS",
                    "00000000-0000-4000-8000-00000000000c",
                ),
            ]),
        )
        .unwrap();
        assert_eq!(c.pleo_api_key.expose(), "s3cret");
        let e = Config::load_with(
            None,
            &env(&[
                ("JOBMIRROR_PLEO_API_KEY_FILE", "/nonexistent/k"),
                (
                    "JOBMIRROR_COMPANY_IDS",
                    "00000000-0000-4000-8000-00000000000c",
                ),
            ]),
        )
        .unwrap_err();
        assert_eq!(e.key, "pleo_api_key_file");
    }

    #[test]
    fn company_ids_from_a_file_of_lines_or_toml_join_the_list() {
        let dir = tempfile::tempdir().unwrap();
        let lines = dir.path().join("companies.txt");
        let many: String = (0..20_000)
            .map(|i| format!("00000000-0000-4000-8000-{i:012}\n"))
            .collect();
        std::fs::write(&lines, format!("# served by this instance\n\n{many}")).unwrap();
        let load = |file: &std::path::Path, inline: &str| {
            Config::load_with(
                None,
                &env(&[
                    ("JOBMIRROR_PLEO_API_KEY", "k"),
                    ("JOBMIRROR_COMPANY_IDS", inline),
                    ("JOBMIRROR_COMPANY_IDS_FILE", &file.display().to_string()),
                ]),
            )
        };
        let c = load(&lines, "00000000-0000-4000-8000-0000000000f1").unwrap();
        assert_eq!(c.company_ids.len(), 20_001);
        assert_eq!(c.company_ids[0], "00000000-0000-4000-8000-0000000000f1");
        assert_eq!(c.company_ids[1], "00000000-0000-4000-8000-000000000000");
        let toml = dir.path().join("companies.toml");
        std::fs::write(&toml, "company_ids = [\"00000000-0000-4000-8000-0000000000a1\", \"00000000-0000-4000-8000-0000000000b2\"]\n").unwrap();
        assert_eq!(
            load(&toml, "").unwrap().company_ids,
            [
                "00000000-0000-4000-8000-0000000000a1",
                "00000000-0000-4000-8000-0000000000b2"
            ]
        );
        // A company twice (here across the list and the file) is refused with its line.
        let e = load(&lines, "00000000-0000-4000-8000-000000000007").unwrap_err();
        assert_eq!(e.key, "company_ids_file");
        assert!(e.message.contains(":10:"), "{}", e.message);
        let bad = dir.path().join("bad.txt");
        std::fs::write(&bad, "00000000-0000-4000-8000-000000000001\nnot-a-uuid\n").unwrap();
        let e = load(&bad, "").unwrap_err();
        assert!(e.message.contains(":2:"), "{}", e.message);
        let e = load(
            &dir.path().join("missing"),
            "00000000-0000-4000-8000-00000000000e",
        )
        .unwrap_err();
        assert_eq!(e.key, "company_ids_file");
        assert!(e.message.contains("cannot read"), "{}", e.message);
        // Commands that serve no company go on without an unreadable file, knowing none.
        let c = Config::load_with_needs(
            None,
            &env(&[
                (
                    "JOBMIRROR_COMPANY_IDS",
                    "00000000-0000-4000-8000-00000000000e",
                ),
                ("JOBMIRROR_COMPANY_IDS_FILE", "/nonexistent/companies"),
            ]),
            Needs::OPERATOR,
        )
        .unwrap();
        assert!(c.company_ids.is_empty());
    }

    #[test]
    fn shards_split_any_list_evenly_and_disjointly() {
        for bad in ["", "1", "3/3", "0/0", "a/b", "-1/2", "0/5000"] {
            assert!(Shard::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(Shard::parse(" 2/5 ").unwrap(), Shard { index: 2, count: 5 });
        let ids: Vec<String> = (0..9_000)
            .map(|i| format!("{i:08x}-0000-4000-8000-000000000000"))
            .collect();
        let shards: Vec<Shard> = (0..3).map(|i| Shard { index: i, count: 3 }).collect();
        let mut total = 0;
        for s in &shards {
            let mine = ids.iter().filter(|c| s.serves(c)).count();
            assert!((2_700..=3_300).contains(&mine), "shard {s}: {mine} of 9000");
            total += mine;
        }
        assert_eq!(total, ids.len(), "every company on exactly one shard");
        // A company keeps its shard whatever else the list holds.
        assert_eq!(Shard::of(&ids[7], 3), Shard::of(&ids[7], 3));
        let cfg = |shard: &str| {
            Config::load_with(
                None,
                &env(&[
                    ("JOBMIRROR_PLEO_API_KEY", "k"),
                    ("JOBMIRROR_COMPANY_IDS", &ids[..30].join(",")),
                    ("JOBMIRROR_SHARD", shard),
                ]),
            )
        };
        let parts: Vec<Vec<String>> = (0..3)
            .map(|i| cfg(&format!("{i}/3")).unwrap().company_ids)
            .collect();
        assert_eq!(parts.iter().map(Vec::len).sum::<usize>(), 30);
        assert!(parts.iter().all(|p| !p.is_empty()));
        let c = cfg("1/3").unwrap();
        assert_eq!(
            (c.companies_listed, c.shard.to_string()),
            (30, "1/3".into())
        );
        assert_eq!(cfg("9/3").unwrap_err().key, "shard");
    }

    #[test]
    fn the_poll_budget_says_what_interval_it_allows() {
        let ids: Vec<String> = (0..10_000)
            .map(|i| format!("00000000-0000-4000-8000-{i:012}"))
            .collect();
        let c = Config::load_with(
            None,
            &env(&[
                ("JOBMIRROR_PLEO_API_KEY", "k"),
                ("JOBMIRROR_COMPANY_IDS", &ids.join(",")),
                ("JOBMIRROR_PLEO_REQUESTS_PER_SEC_MAX", "20"),
            ]),
        )
        .unwrap();
        assert_eq!(c.poll_interval_min(), Some(Duration::from_secs(500)));
    }
}
