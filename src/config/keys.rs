//! Every configuration key with its default and meaning (the README's table and
//! `check-config` read it), and where each effective value came from: the file, the
//! environment, or the default. Secrets are shown as `***`.

use super::*;

/// The configuration file the shipped unit names, and every command reads when neither
/// `--config` nor `JOBMIRROR_CONFIG` names another (and it exists).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/jobmirror/jobmirror.toml";

/// Every key, its default (None: required or optional without default) and what it means.
pub const KEYS: &[(&str, Option<&str>, &str)] = &[
    (
        "db",
        Some("jobmirror.db"),
        "SQLite database file (created with mode 0600)",
    ),
    (
        "pleo_base_url",
        Some("https://external.pleo.io"),
        "Pleo API base URL; plain http only on loopback",
    ),
    (
        "pleo_api_key",
        None,
        "Pleo API key (Basic auth user, empty password)",
    ),
    (
        "company_api_keys_file",
        None,
        "TOML file of \"company id\" = \"API key\" lines: companies with credentials of their own",
    ),
    (
        "pleo_auth",
        Some("api_key"),
        "api_key (HTTP Basic with pleo_api_key) or oauth (access tokens refreshed and rotated)",
    ),
    (
        "pleo_oauth_token_url",
        Some("https://auth.pleo.io/oauth/token"),
        "the OAuth token endpoint",
    ),
    ("pleo_oauth_client_id", None, "the OAuth client id"),
    ("pleo_oauth_client_secret", None, "the OAuth client secret"),
    (
        "pleo_oauth_client_secret_file",
        None,
        "file holding the OAuth client secret, instead of pleo_oauth_client_secret",
    ),
    (
        "pleo_oauth_refresh_token_file",
        None,
        "file holding the default credential's refresh token: read when the database has none, or after the stored one is refused (unset: every company needs a pair of its own)",
    ),
    (
        "pleo_oauth_refresh_margin_secs",
        Some("300"),
        "refresh the access token this long before it expires",
    ),
    (
        "pleo_api_key_file",
        None,
        "file holding the API key (instead of pleo_api_key)",
    ),
    (
        "company_ids",
        None,
        "Pleo company ids to serve, comma-separated (TOML: list or string)",
    ),
    (
        "company_ids_file",
        None,
        "file of more company ids to serve: one a line (# comments), or TOML company_ids = [...]",
    ),
    (
        "poll_interval_secs",
        Some("300"),
        "seconds between listing polls",
    ),
    (
        "log",
        Some("info"),
        "log level: error, warn, info, debug, trace",
    ),
    (
        "log_format",
        Some("text"),
        "text (one line a record, UTC times) or json (one object a line: ts, level, msg); under systemd each line starts with its syslog priority",
    ),
    (
        "shard",
        Some("0/1"),
        "i/n: serve only the listed companies whose id hashes to i of n (n instances split one list)",
    ),
    (
        "lanes",
        Some("4"),
        "processor threads; each company belongs to one lane, so its jobs stay strictly sequential",
    ),
    (
        "listing_threads",
        Some("16"),
        "threads that list companies' jobs side by side (polls, recovery, triggers), within the request budget",
    ),
    (
        "pleo_requests_per_sec_max",
        Some("20"),
        "at most this many Pleo API requests per second (0: no limit), so a thousand companies never burst",
    ),
    (
        "health_stale_secs",
        Some("300"),
        "a worker thread silent this long makes /healthz 503 and stops the systemd watchdog pings",
    ),
    (
        "admin_listen",
        Some("127.0.0.1:9187"),
        "address of the admin listener (/metrics, /healthz); empty: none",
    ),
    (
        "prune_jobs_after_days",
        Some("90"),
        "jobmirror prune: drop items and raw JSON of jobs finished this many days ago",
    ),
    (
        "prune_webhook_bodies_after_days",
        Some("7"),
        "jobmirror prune: clear bodies and headers of handled webhook deliveries this old",
    ),
    (
        "prune_webhook_ids_after_days",
        Some("30"),
        "jobmirror prune: delete handled delivery rows this old (at least 4: senders retry for days)",
    ),
    (
        "prune_sync_runs_after_days",
        Some("30"),
        "jobmirror prune: delete sync_runs rows this old",
    ),
    (
        "deadline_warning_secs",
        Some("600"),
        "journal a deadline_warning this many seconds before a held job expires",
    ),
    (
        "claim_min_left_secs",
        Some("10"),
        "do not send `started` while less than this is left before the job's deadline (it could not land); wait for the deadline and read the job again",
    ),
    (
        "not_ready_fail_margin_secs",
        Some("180"),
        "a job whose readiness check still fails this close to its deadline is sent `failed` with the check's reason instead of left to expire",
    ),
    (
        "claims_per_round_max",
        Some("3"),
        "claim attempts per company per processor round (conflicts included)",
    ),
    (
        "conflict_backoff_secs",
        Some("30"),
        "pause before claiming again for a company after a conflict or failed claim",
    ),
    (
        "resume_unknown_in_progress",
        Some("true"),
        "at every start's recovery pass, resume an in_progress job this database has no record of as ours (Pleo: an interrupted workflow); false where another integration may hold this company's jobs",
    ),
    (
        "list_by_credential",
        Some("false"),
        "opt-in: list the jobs of every company sharing the default credential with one listing that names no company (pages of 100) instead of one listing per company",
    ),
    (
        "pleo_connect_timeout_secs",
        Some("10"),
        "TCP/TLS connect timeout for Pleo",
    ),
    (
        "pleo_request_timeout_secs",
        Some("30"),
        "overall timeout of one Pleo request",
    ),
    (
        "pleo_retry_attempts_max",
        Some("5"),
        "attempts per Pleo request for 429, 5xx and transport errors",
    ),
    (
        "shutdown_timeout_secs",
        Some("10"),
        "how long a stop may take before threads are abandoned",
    ),
    (
        "webhook_listen",
        None,
        "address of the webhook receiver, e.g. 127.0.0.1:8383 (unset: no receiver)",
    ),
    (
        "webhook_secret",
        None,
        "webhook signing secrets (whsec_...), whitespace- or comma-separated",
    ),
    (
        "webhook_secret_file",
        None,
        "file holding webhook signing secrets (merged with webhook_secret)",
    ),
    (
        "webhook_body_bytes_max",
        Some("65536"),
        "largest webhook body accepted (larger: 413); a Pleo webhook is under 1 KiB",
    ),
    (
        "webhook_connections_max",
        Some("4096"),
        "webhook connections held at once (past it the idlest is closed; a request in progress never is)",
    ),
    (
        "webhook_stored_bytes_per_company_max",
        Some("67108864"),
        "bytes of stored webhook deliveries one company may hold (past it: 429 with Retry-After, nothing stored)",
    ),
    (
        "webhook_stored_bytes_max",
        Some("2147483648"),
        "bytes of stored webhook deliveries in all (past it: 503 with Retry-After, nothing stored)",
    ),
    (
        "webhook_queue_max",
        Some("1024"),
        "verified deliveries waiting for their commit (more: 503 with Retry-After)",
    ),
    (
        "handler_command",
        None,
        "the handler: a program (and arguments) speaking the handler protocol, outbox:DIR, or dry-run",
    ),
    (
        "handler_env",
        None,
        "the handler's own environment: NAME=VALUE, or NAME to pass it on from the service's (comma or space separated; never JOBMIRROR_* or CREDENTIALS_DIRECTORY)",
    ),
    (
        "handler_check_timeout_secs",
        Some("60"),
        "how long the handler's readiness check may take",
    ),
    (
        "handler_item_timeout_secs",
        Some("120"),
        "longest wait for the handler's next result before the job is failed",
    ),
    (
        "handler_job_timeout_secs",
        Some("3000"),
        "longest a handler may run for one job",
    ),
    (
        "handler_attempts_max",
        Some("3"),
        "handler runs per job (after crashes) before open items fail",
    ),
    (
        "handler_retry_secs",
        Some("5"),
        "wait after a handler run that crashed before the next run (doubling, at most 60 s, never past the finish margin)",
    ),
    (
        "report_flush_secs",
        Some("5"),
        "report results to Pleo at least this often while the handler runs",
    ),
    (
        "finish_margin_secs",
        Some("120"),
        "stop the handler and fail the job when less than this is left before it expires",
    ),
];

/// Whether `name` is a configuration key.
pub fn is_key(name: &str) -> bool {
    KEYS.iter().any(|(k, _, _)| *k == name)
}

/// The values the file and the environment give (the environment wins), each with where it
/// came from (`file` or `env`). Unknown file keys are errors.
pub(super) fn raw_values(
    file: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<BTreeMap<&'static str, (String, &'static str)>, ConfigError> {
    let mut values: BTreeMap<&'static str, (String, &'static str)> = BTreeMap::new();
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err("config", format!("cannot read {}: {e}", path.display())))?;
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            err(
                "config",
                format!("{} is not valid TOML: {}", path.display(), e.message()),
            )
        })?;
        for (k, v) in table {
            let Some((key, _, _)) = KEYS.iter().find(|(name, _, _)| *name == k) else {
                return Err(err(&k, format!("unknown key in {}", path.display())));
            };
            let s = match v {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Array(a) => a
                    .iter()
                    .map(|x| {
                        x.as_str()
                            .map(str::to_owned)
                            .ok_or_else(|| err(key, "list entries must be strings"))
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .join(","),
                other => return Err(err(key, format!("unsupported value {other}"))),
            };
            values.insert(key, (s, "file"));
        }
    }
    for (key, _, _) in KEYS {
        if let Some(v) = env(&env_name(key)) {
            values.insert(key, (v, "env"));
        }
    }
    Ok(values)
}

/// One effective setting, for `jobmirror check-config`.
pub struct Setting {
    pub key: &'static str,
    /// The value, or `***` for a secret that is set.
    pub value: String,
    /// `file`, `env` or `default`.
    pub from: &'static str,
}

/// Settings whose value is a secret: shown as `***`, never as given.
const SECRET_KEYS: &[&str] = &["pleo_api_key", "pleo_oauth_client_secret", "webhook_secret"];

/// Checks the configuration as `run` would (every part required) and lists every setting
/// with its effective value and origin; secrets are masked.
pub fn effective(file: Option<&Path>) -> Result<(Config, Vec<Setting>), ConfigError> {
    let env = |k: &str| std::env::var(k).ok();
    // One read of the file and the environment, for the check and the listing alike.
    let values = raw_values(file, &env)?;
    let cfg = Config::from_values(&values, Needs::SERVICE)?;
    let settings = KEYS
        .iter()
        .map(|(key, default, _)| {
            let (value, from) = match values.get(key) {
                Some((v, from)) => (v.clone(), *from),
                None => (default.unwrap_or("").to_owned(), "default"),
            };
            let value = if SECRET_KEYS.contains(key) && !value.is_empty() {
                "***".to_owned()
            } else {
                value
            };
            Setting { key, value, from }
        })
        .collect();
    Ok((cfg, settings))
}
