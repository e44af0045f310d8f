//! What the commands share: the database and configuration they open, report times, JSON
//! output, private files, logging set-up.

use std::path::PathBuf;

use crate::cli::args::ReportArgs;
use crate::clock::SharedClock;
use crate::config::{Config, ConfigError, SharedDb, UsageError};
use crate::store::Store;

/// Logging to stderr in text (see [`crate::logging`]); the service uses its `log_format`.
pub fn init_logging(level: log::LevelFilter) {
    crate::logging::init(level, crate::logging::LogFormat::Text);
}

/// Prints a command's outcome as JSON (the `--json` of every command that reports).
pub(super) fn say_json(v: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Sends SIGUSR1 to `pid` if it is a jobmirror process.
pub(super) fn signal_usr1(pid: u32) -> bool {
    if !crate::ops::doctor::is_jobmirror_process(pid) {
        return false;
    }
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill(2) with a valid signal number has no memory-safety preconditions.
    unsafe { libc::kill(pid, libc::SIGUSR1) == 0 }
}

/// A subscription URL must reach the receiver: https (or http on loopback, for tests), and
/// the receiver's one path.
pub(super) fn check_subscription_url(url: &str) -> Result<(), UsageError> {
    let rest = if let Some(r) = url.strip_prefix("https://") {
        r
    } else if url.starts_with("http://127.") || url.starts_with("http://localhost") {
        url.trim_start_matches("http://")
    } else {
        return Err(UsageError(format!(
            "{url:?}: Pleo delivers only to https URLs"
        )));
    };
    let path = rest.find('/').map_or("", |i| &rest[i..]);
    if path != crate::edge::webhook::PATH {
        return Err(UsageError(format!(
            "{url:?}: the receiver serves only {} (got path {:?}); a proxy must pass that path through unchanged",
            crate::edge::webhook::PATH,
            if path.is_empty() { "/" } else { path }
        )));
    }
    Ok(())
}

/// Writes `text` to `path` with mode 0600, atomically (temp file and rename).
pub(super) fn write_private(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("secret")
    ));
    // A new file only (O_EXCL), never through a symlink (O_NOFOLLOW): a file or link left in
    // the way is refused, not written through.
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600).custom_flags(libc::O_NOFOLLOW);
    }
    let mut f = opts.open(&tmp).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            anyhow::anyhow!(
                "cannot write {}: {} is in the way (a file or link left by an earlier run?); remove it and try again",
                path.display(),
                tmp.display()
            )
        } else {
            anyhow::anyhow!("cannot write {}: {e}", tmp.display())
        }
    })?;
    let written = f.write_all(text.as_bytes()).and_then(|_| f.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(anyhow::anyhow!("cannot write {}: {e}", tmp.display()));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow::anyhow!("cannot write {}: {e}", path.display())
    })?;
    Ok(())
}

/// One string value from the config file, if any.
pub(super) fn config_value(file: Option<&std::path::Path>, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(file?).ok()?;
    let t: toml::Table = text.parse().ok()?;
    t.get(key).and_then(|v| v.as_str()).map(str::to_owned)
}

/// The configuration file every command reads: `--config`, else `JOBMIRROR_CONFIG`, else
/// [`crate::config::DEFAULT_CONFIG_PATH`] when it exists (the file the shipped unit names), else
/// none (the embedded defaults). A file named by `--config` or `JOBMIRROR_CONFIG` must exist.
pub(super) fn config_file(given: Option<PathBuf>) -> anyhow::Result<Option<PathBuf>> {
    let named = given.map(|p| (p, "--config")).or_else(|| {
        std::env::var_os("JOBMIRROR_CONFIG")
            .filter(|v| !v.is_empty())
            .map(|v| (PathBuf::from(v), "JOBMIRROR_CONFIG"))
    });
    match named {
        Some((path, from)) => {
            if !path.exists() {
                return Err(ConfigError {
                    key: "config".into(),
                    env: "JOBMIRROR_CONFIG".into(),
                    message: format!("{} (from {from}) does not exist", path.display()),
                }
                .into());
            }
            Ok(Some(path))
        }
        None => {
            let default = PathBuf::from(crate::config::DEFAULT_CONFIG_PATH);
            Ok(default.exists().then_some(default))
        }
    }
}

/// Refuses a database that does not exist: only `run` and `migrate` create one, so a command
/// pointed at the wrong path says so (exit 2) instead of working on a new, empty file.
pub(super) fn require_db(db: &std::path::Path) -> anyhow::Result<()> {
    if db.to_str().is_some_and(crate::store::pg::is_postgres_url) {
        return Ok(());
    }
    match std::fs::metadata(db) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(UsageError(format!(
            "database {} does not exist (looked there because of {}); `jobmirror run` or `jobmirror migrate` creates it, or name the service's configuration with --config",
            db.display(),
            db_origin()
        ))
        .into()),
        Err(e) => Err(UsageError(format!("database {} cannot be read: {e}", db.display())).into()),
    }
}

/// An existing database, migrated: for the commands that change it (never creating it).
pub(super) fn open_existing(db: &std::path::Path) -> anyhow::Result<Store> {
    require_db(db)?;
    super::shared::open_db(db, crate::service::shared::Open::Migrate)
}

/// Where the database path came from, for [`require_db`]'s message.
fn db_origin() -> String {
    if std::env::var_os("JOBMIRROR_DB").is_some() {
        return "--db or JOBMIRROR_DB".into();
    }
    match CONFIG_IN_USE.get().and_then(|c| c.as_ref()) {
        Some(f) => format!("the `db` setting of {} or its default", f.display()),
        None => format!(
            "the default `db` (no configuration file: {} does not exist and neither --config nor JOBMIRROR_CONFIG is given)",
            crate::config::DEFAULT_CONFIG_PATH
        ),
    }
}

/// The configuration file this command resolved, for messages.
pub(super) static CONFIG_IN_USE: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();

/// The database path alone (for commands that need no credentials).
pub(super) fn db_path(file: Option<&std::path::Path>) -> anyhow::Result<PathBuf> {
    let mut db: Option<String> = std::env::var("JOBMIRROR_DB").ok();
    if db.is_none()
        && let Some(f) = file
    {
        let text = std::fs::read_to_string(f).map_err(|e| ConfigError {
            key: "config".into(),
            env: "JOBMIRROR_CONFIG".into(),
            message: format!("cannot read {}: {e}", f.display()),
        })?;
        let t: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError {
            key: "config".into(),
            env: "JOBMIRROR_CONFIG".into(),
            message: format!("{} is not valid TOML: {}", f.display(), e.message()),
        })?;
        db = t.get("db").and_then(|v| v.as_str()).map(str::to_owned);
    }
    Ok(PathBuf::from(db.unwrap_or_else(|| "jobmirror.db".into())))
}

/// The database named by the configuration, which must exist.
pub(super) fn existing_db(file: Option<&std::path::Path>) -> anyhow::Result<PathBuf> {
    let db = db_path(file)?;
    require_db(&db)?;
    Ok(db)
}

/// `--at`, or now.
pub(super) fn report_time(
    args: &ReportArgs,
    clock: &SharedClock,
) -> anyhow::Result<crate::clock::Millis> {
    match &args.at {
        None => Ok(clock.now()),
        Some(s) => crate::clock::Millis::parse_rfc3339(s)
            .ok_or_else(|| UsageError(format!("--at {s:?} is not an RFC 3339 time")).into()),
    }
}

/// A read-only store, its path, and the report time.
pub(super) fn open_report(
    file: Option<&std::path::Path>,
    args: &ReportArgs,
    clock: &SharedClock,
) -> anyhow::Result<(Store, PathBuf, crate::clock::Millis)> {
    let db = existing_db(file)?;
    let now = report_time(args, clock)?;
    let store = super::shared::open_db(&db, crate::service::shared::Open::ReadOnly)?;
    Ok((store, db, now))
}

/// The configuration for commands that never talk to Pleo: only the database and the timing
/// settings are needed, so the service's own file and environment work as they are (its key
/// file, webhook secret and companies are neither required nor read). Returns whether the
/// companies were named.
pub(super) fn operator_config(file: Option<&std::path::Path>) -> anyhow::Result<(Config, bool)> {
    let mut cfg = Config::load_for(file, crate::config::Needs::OPERATOR)?;
    // The companies kept in the database count as named too.
    if (cfg.db.exists() || SharedDb::is_postgres(&cfg.db))
        && let Ok(store) = super::shared::open_db(&cfg.db, crate::service::shared::Open::ReadOnly)
        && let Ok(rows) = store.company_rows()
    {
        cfg = cfg.with_companies(&rows);
    }
    let named = !cfg.company_ids.is_empty();
    Ok((cfg, named))
}

pub(super) fn operator_settings(
    file: Option<&std::path::Path>,
) -> anyhow::Result<crate::ops::Settings> {
    let (cfg, named) = operator_config(file)?;
    Ok(crate::ops::Settings::from_config(&cfg, named))
}

/// Prints a report as JSON or text.
pub(super) fn emit(
    args: &ReportArgs,
    v: &serde_json::Value,
    text: fn(&serde_json::Value) -> String,
) -> anyhow::Result<()> {
    if args.json {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else {
        // Text goes to a terminal: what Pleo or a client sent (a job id, a reason) never
        // reaches it with control characters raw (JSON escapes them by itself).
        print!("{}", text(&printable(v)));
    }
    Ok(())
}

/// `v` with every control character in its strings written out (`\n`, `\x1b`, `\u{..}`).
pub(super) fn printable(v: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::String(s) if s.chars().any(char::is_control) => Value::String(
            s.chars()
                .map(|c| match c {
                    '\n' => "\\n".to_owned(),
                    '\t' => "\\t".to_owned(),
                    '\r' => "\\r".to_owned(),
                    c if (c as u32) < 0x100 && c.is_control() => format!("\\x{:02x}", c as u32),
                    c if c.is_control() => format!("\\u{{{:x}}}", c as u32),
                    c => c.to_string(),
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(printable).collect()),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| {
                    (
                        printable(&Value::String(k.clone()))
                            .as_str()
                            .unwrap_or(k)
                            .to_owned(),
                        printable(v),
                    )
                })
                .collect(),
        ),
        other => other.clone(),
    }
}
