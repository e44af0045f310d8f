//! Every configuration key with its default and meaning (docs/configuration.md and
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
        "SQLite database file (created with mode 0600 by `run` or `migrate` only; the other commands that use it refuse a missing one, exit 2). The shipped `contrib/jobmirror.toml` sets `/var/lib/jobmirror/jobmirror.db`. A `postgresql://user@host:port/dbname` URL (libpq's form, no password in it: see `db_password_file`) names a PostgreSQL database several instances share, each serving the companies it holds a lease on (see [several machines](several-machines.md)); `backup` is SQLite's (use `pg_dump` there)",
    ),
    (
        "db_password_file",
        None,
        "file whose first line is the password of a PostgreSQL `db` (else `PGPASSWORD` from the environment; a password inside the URL is refused, so it never reaches a message)",
    ),
    (
        "instance_name",
        None,
        "this instance's name among those sharing a PostgreSQL `db` (default: host name and pid, `host-1234`); two live processes never share one: the second waits until the first's heartbeat lapses",
    ),
    (
        "company_lease_secs",
        Some("30"),
        "PostgreSQL `db` only: how long a company lease lasts without renewal (3 to 3600). Each instance renews its leases every third of it; an instance that dies loses its companies when its leases lapse, and another takes them over",
    ),
    (
        "pleo_base_url",
        Some("https://external.pleo.io"),
        "Pleo API base URL; plain `http` is refused unless the host is loopback",
    ),
    (
        "pleo_api_key",
        None,
        "Pleo API key: HTTP Basic, key as user name, empty password",
    ),
    (
        "company_api_keys_file",
        None,
        "TOML file of `\"company id\" = \"key\"` lines: companies with API keys of their own (each must be in `company_ids` or `company_ids_file`)",
    ),
    (
        "pleo_auth",
        Some("api_key"),
        "`api_key`, or `oauth` (see [OAuth 2.0](#oauth-20))",
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
        "the default credential's refresh token from the operator: read when the database has none, or after the stored one is refused; unset: only companies with pairs of their own are served",
    ),
    (
        "pleo_oauth_refresh_margin_secs",
        Some("300"),
        "refresh the access token this long before it expires",
    ),
    (
        "pleo_api_key_file",
        None,
        "file holding the key, instead of `pleo_api_key` (trailing newline ignored)",
    ),
    (
        "company_ids",
        None,
        "company ids to serve: comma-separated, or a TOML list; merged with `jobmirror companies` (see [operations](operations.md#onboarding-a-customer)). Each is a UUID, as Pleo's files type `company_id`; anything else is a configuration error naming where it came from (`company_ids`, the file and line of `company_ids_file`, or `companies add`)",
    ),
    (
        "company_ids_file",
        None,
        "more companies, from a file: one id a line (blank lines and `#` comments ignored), or TOML `company_ids = [...]` (a file with a `=` outside a comment is read as TOML). Joined after `company_ids`; a company listed twice (in either, or both) is refused with its line. For many companies: an environment variable holds only a few thousand ids (`execve` limits it), a file any number",
    ),
    (
        "poll_interval_secs",
        Some("300"),
        "seconds between listing polls",
    ),
    (
        "log",
        Some("info"),
        "`off`, `error`, `warn`, `info`, `debug`, `trace` (stderr)",
    ),
    (
        "log_format",
        Some("text"),
        "`text`: one line a record, `2026-12-02T08:00:00.000Z [INFO] ...` (UTC, fixed width); `json`: one object a line for log shippers, `{\"ts\": ..., \"level\": ..., \"priority\": 6, \"msg\": ...}` plus `job_id`, `company_id` and `event` when the line is about one and `error_kind` for a warning or an error (`pleo_unreachable`, `pleo_http_503`, `credential_refused`, `handler_crash`, `handler_timeout`, `not_ready`, `database`), never prefixed. In `text` under systemd (`JOURNAL_STREAM` names stderr) every line starts with its syslog priority (`<3>` error, `<4>` warn, `<6>` info, `<7>` debug), so `journalctl -u jobmirror -p err` shows the errors",
    ),
    (
        "shard",
        Some("0/1"),
        "`i/n`: serve only the listed companies whose id hashes to `i` of `n`, so `n` instances split one list without editing it (see [several machines](several-machines.md)). SQLite only: with a PostgreSQL `db` the instances split the companies by lease, and `shard` is refused",
    ),
    (
        "lanes",
        Some("4"),
        "processor threads; each company belongs to one lane, so its jobs stay strictly sequential (see [several machines](several-machines.md), \"Why 4 lanes by default\")",
    ),
    (
        "listing_threads",
        Some("16"),
        "threads that list companies' jobs side by side (polls, recovery, triggers), within the request budget",
    ),
    (
        "pleo_requests_per_sec_max",
        Some("20"),
        "pace of API requests per credential (0: none): a thousand companies never burst",
    ),
    (
        "health_stale_secs",
        Some("300"),
        "a worker thread silent this long makes `/healthz` 503 and withholds the watchdog ping",
    ),
    (
        "admin_listen",
        Some("127.0.0.1:9187"),
        "the admin listener (`/metrics`, `/healthz`); empty: none",
    ),
    (
        "prune_jobs_after_days",
        Some("90"),
        "`jobmirror prune`: drop items and raw JSON of jobs finished this long ago (the journal stays)",
    ),
    (
        "prune_webhook_bodies_after_days",
        Some("7"),
        "`jobmirror prune`: clear bodies and headers of handled deliveries",
    ),
    (
        "prune_webhook_ids_after_days",
        Some("30"),
        "`jobmirror prune`: delete handled delivery rows (at least 4: senders retry for days)",
    ),
    (
        "prune_sync_runs_after_days",
        Some("30"),
        "`jobmirror prune`: delete `sync_runs` rows",
    ),
    (
        "deadline_warning_secs",
        Some("600"),
        "journal a `deadline_warning` this long before a held job expires (once per deadline; checked between handler runs and, on the same Pleo clock and deadline as the finish margin, while the handler works)",
    ),
    (
        "claim_min_left_secs",
        Some("10"),
        "do not send `started` while less than this is left before the job's deadline (it could not land in time); the company waits for the deadline and reads the job again (of the order of a request, not minutes: `started` refreshes the deadline)",
    ),
    (
        "not_ready_fail_margin_secs",
        Some("180"),
        "a job whose readiness check still fails this close to its deadline is sent `failed` with the check's reason, instead of left to expire silently",
    ),
    (
        "claims_per_round_max",
        Some("3"),
        "claim attempts per company per processor round, conflicts included",
    ),
    (
        "conflict_backoff_secs",
        Some("30"),
        "pause for a company after that bound, or after a failed claim",
    ),
    (
        "resume_unknown_in_progress",
        Some("true"),
        "at every start's recovery pass, resume (without `started`) an `in_progress` job this database has no record of, or saw only as pending: Pleo calls it an interrupted workflow. `false` where another integration may hold this company's jobs: then such a job is left to its holder (and, if it was ours after all, expires)",
    ),
    (
        "list_by_credential",
        Some("false"),
        "opt-in: list the jobs of all companies that share the default credential with one listing that names no company (pages of 100), instead of one listing per company (see [several machines](several-machines.md), \"Listing by credential\")",
    ),
    (
        "pleo_connect_timeout_secs",
        Some("10"),
        "connect timeout for Pleo",
    ),
    (
        "pleo_request_timeout_secs",
        Some("30"),
        "overall timeout of one Pleo request",
    ),
    (
        "pleo_retry_attempts_max",
        Some("5"),
        "attempts per request for 429, 5xx and transport errors",
    ),
    (
        "shutdown_timeout_secs",
        Some("10"),
        "bound on a stop; threads still busy then are abandoned",
    ),
    (
        "webhook_listen",
        None,
        "address of the webhook receiver, e.g. `127.0.0.1:8383`",
    ),
    (
        "webhook_secret",
        None,
        "signing secrets (`whsec_...`), whitespace- or comma-separated (several during a rotation)",
    ),
    (
        "webhook_secret_file",
        None,
        "file holding signing secrets, merged with `webhook_secret`",
    ),
    (
        "webhook_body_bytes_max",
        Some("65536"),
        "largest body accepted (larger: 413, announced or while read); a Pleo webhook is under 1 KiB",
    ),
    (
        "webhook_connections_max",
        Some("4096"),
        "connections held at once; past it the one idle the longest is closed to make room (a request in progress never is)",
    ),
    (
        "webhook_stored_bytes_per_company_max",
        Some("67108864"),
        "bytes of stored deliveries (body and headers) one company may hold; past it a new delivery naming it is answered 429 + `Retry-After: 60` and not stored (a retry of one already stored is still a 200 duplicate); pruning frees room",
    ),
    (
        "webhook_stored_bytes_max",
        Some("2147483648"),
        "the same bound over all companies (past it: 503 + `Retry-After: 60`)",
    ),
    (
        "webhook_queue_max",
        Some("1024"),
        "verified deliveries waiting for their commit (more: 503 with `Retry-After`)",
    ),
    (
        "handler_command",
        None,
        "the handler: a program and its arguments (split on spaces, no shell), `outbox:DIR`, or `dry-run`",
    ),
    (
        "handler_env",
        None,
        "the handler's own environment: `NAME=VALUE`, or `NAME` to pass it on from the service's environment (comma or space separated). Never `JOBMIRROR_*` or `CREDENTIALS_DIRECTORY` (refused: exit 2)",
    ),
    (
        "handler_check_timeout_secs",
        Some("60"),
        "how long the readiness check may take",
    ),
    (
        "handler_item_timeout_secs",
        Some("120"),
        "longest wait for the handler's next result; then the job is failed (`accounting_system_timeout`)",
    ),
    (
        "handler_job_timeout_secs",
        Some("3000"),
        "longest all of one job's handler runs may take together, across restarts of the service",
    ),
    (
        "handler_attempts_max",
        Some("3"),
        "handler runs of one job that may end with items unanswered (a crash, an early exit), counted across restarts, before those items fail (`unexpected_failure`)",
    ),
    (
        "handler_retry_secs",
        Some("5"),
        "wait after a handler run that crashed before the next run (doubling, at most 60 s, never past the finish margin)",
    ),
    (
        "report_flush_secs",
        Some("5"),
        "report results at least this often while the handler runs (and at every 100 results)",
    ),
    (
        "finish_margin_secs",
        Some("120"),
        "stop the handler and fail the job when less than this is left before it expires",
    ),
];

/// `docs/configuration.md`: the configuration reference, made from [`KEYS`] (a test checks the
/// file is current, so the page and the code cannot drift).
pub fn reference_markdown() -> String {
    let mut o = String::from(
        "# Configuration reference\n\n\
<!-- Generated from src/config/keys.rs (config::KEYS): edit the keys there, then run\n\
     JOBMIRROR_BLESS=1 cargo test --test integration configuration_page -->\n\n\
Every command reads one configuration: the file named by `--config`, else by the\n\
environment variable `JOBMIRROR_CONFIG`, else `/etc/jobmirror/jobmirror.toml` when it exists\n\
(the file the shipped unit names), else none (the embedded defaults). So `jobmirror status`,\n\
`why`, `companies add` and the others find the service's database and companies with no flag\n\
to remember. A file named by `--config` or `JOBMIRROR_CONFIG` that does not exist is an error\n\
(exit 2). `check-config` prints the file it read.\n\n\
The file is flat TOML. Every key can be overridden by the environment variable\n\
`JOBMIRROR_<KEY>` in upper case; `--db FILE` wins over both for `db`. An unknown key in the\n\
file is an error, so a typo never falls back to a default silently. Only `run` and `migrate`\n\
create the database. The commands that read or change it (`status`, `jobs`, `show`, `why`,\n\
`doctor`, `backup`, `prune`, `trigger`, `companies`, `subscribe --company`/`--all`, and with\n\
OAuth `subscribe`, `subscriptions` and `record`, whose tokens live there) exit 2 on a missing\n\
one, naming the path they looked for and where it came from; `check-config` says it does not\n\
exist yet.\n\n\
```toml\n\
# /etc/jobmirror/jobmirror.toml (contrib/jobmirror.toml is the shipped example)\n\
db = \"/var/lib/jobmirror/jobmirror.db\"\n\
company_ids = [\"6b2c0a5e-...\", \"0f9d3c11-...\"]\n\
pleo_api_key_file = \"/etc/jobmirror/pleo-api-key\"\n\
handler_command = \"/usr/local/bin/erp-import\"\n\
```\n\n\
| key | environment variable | default | meaning |\n\
| --- | --- | --- | --- |\n",
    );
    for (key, default, meaning) in KEYS {
        let default = match default {
            Some("") => "(empty)".to_owned(),
            Some(d) => format!("`{d}`"),
            None => String::new(),
        };
        o.push_str(&format!(
            "| `{key}` | `{}` | {default} | {} |\n",
            env_name(key),
            meaning.replace('|', "\\|")
        ));
    }
    o.push_str(
        "\nSecrets (`pleo_api_key`, `pleo_oauth_client_secret`, `webhook_secret`) are shown as `***` by\n\
`check-config` and never reach a log line or an error message. Prefer their `_file` forms: under\n\
systemd the unit hands the files over with `LoadCredential=` (see [operations](operations.md)).\n",
    );
    o
}

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
