//! The command line: parses arguments, sets up logging, and maps results to exit codes.
//!
//! Exit codes (documented in the README): 0 success; 1 runtime failure; 2 usage or
//! configuration error (so systemd's `RestartPreventExitStatus=2` stops a restart loop).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::clock::{SharedClock, SystemClock};
use crate::config::{Config, ConfigError};
use crate::sandbox::{FakeConfig, FakePleo, Fixture};
use crate::store::Store;

/// The version and the commit the binary was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("JOBMIRROR_COMMIT"),
    ")"
);

#[derive(Parser, Debug)]
#[command(
    name = "jobmirror",
    version = VERSION,
    about = "Mirror Pleo export jobs into SQLite and claim them oldest-first"
)]
pub struct Cli {
    /// TOML configuration file; every key can be overridden by JOBMIRROR_<KEY>.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The database file (wins over JOBMIRROR_DB and the file's `db`).
    #[arg(long, global = true, value_name = "FILE")]
    pub db: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum SubscriptionsAction {
    /// Every subscription: id, status, endpoint URL, event types.
    List {
        /// As JSON (Pleo's subscription objects).
        #[arg(long)]
        json: bool,
    },
    /// Delete one subscription by id (Pleo stops delivering to its URL).
    Delete {
        id: String,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the service until SIGTERM or SIGINT (SIGUSR1 runs detection now).
    Run,
    /// Create or upgrade the database schema, then exit.
    Migrate {
        /// Print the migrations applied as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Per company: jobs by state, last poll, last webhook, next deadline (read-only).
    Status {
        #[command(flatten)]
        report: ReportArgs,
    },
    /// Jobs in pick order per company (read-only).
    Jobs {
        #[arg(long)]
        company: Option<String>,
        /// Only jobs in this state (new, resume, claiming, claimed, processing, conflict,
        /// too_late, expired, done).
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 200)]
        limit: usize,
        #[command(flatten)]
        report: ReportArgs,
    },
    /// One job: its state, items and timeline (read-only).
    Show {
        job: String,
        #[command(flatten)]
        report: ReportArgs,
    },
    /// Which rule keeps a job from being processed now (read-only).
    Why {
        job: String,
        #[command(flatten)]
        report: ReportArgs,
    },
    /// Integrity, WAL size, poll and webhook freshness, pending deadlines; exit 1 on a failure.
    Doctor {
        #[command(flatten)]
        report: ReportArgs,
    },
    /// An online copy of the database (SQLite backup API), safe while the service runs.
    Backup {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Remove details past their retention (prune_* settings); the journal is kept.
    Prune {
        /// Count what would go, change nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
        /// Prune as of this time (RFC 3339) instead of now.
        #[arg(long)]
        at: Option<String>,
    },
    /// Run a fake Pleo Export API server (for tests and demos).
    FakePleo {
        #[arg(long, default_value = "127.0.0.1:8180")]
        listen: String,
        /// Fixture file with the jobs to start with.
        #[arg(long)]
        fixture: Option<PathBuf>,
        /// expiresIn of new jobs, seconds.
        #[arg(long, default_value_t = 3600)]
        expires_in: i64,
        /// API key the fake accepts (the fixture's keys win when it names some).
        #[arg(long, default_value = crate::sandbox::DEFAULT_API_KEY)]
        api_key: String,
    },
    /// Register this service's webhook endpoint with Pleo and store the signing secret.
    Subscribe {
        /// The public HTTPS URL that reaches the receiver's /webhooks/pleo.
        #[arg(long)]
        url: String,
        /// Where to write the secret (mode 0600); default: the webhook_secret_file setting.
        #[arg(long)]
        secret_file: Option<PathBuf>,
        /// Event types to subscribe to.
        #[arg(long = "event-type", default_value = "v1.export-job.created")]
        event_types: Vec<String>,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List or delete this credential's webhook subscriptions at Pleo.
    Subscriptions {
        #[command(subcommand)]
        action: SubscriptionsAction,
    },
    /// Make the running service (recorded in the database) run detection now (SIGUSR1).
    Trigger {
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Measure throughput, latency and footprint against the fake (see BENCHMARKS.md).
    Bench {
        /// Tiny sizes: checks the harness runs (a test does this).
        #[arg(long)]
        smoke: bool,
        /// Where to write the JSON summary.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Run only these sections (comma-separated: ingest, sync, pick, reaction,
        /// processing); webhook ingest and the footprint always run.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// Replay a snapshot offline: the real workers against an in-process fake Pleo on a
    /// virtual clock; prints a summary and leaves the database for sqlite3 (at --db, default
    /// <snapshot name>.replay.db here).
    Replay {
        /// The snapshot (JSON, version 2; see fixtures/README.md).
        snapshot: PathBuf,
        /// The handler, as handler_command spells it.
        #[arg(long, default_value = "dry-run")]
        handler: String,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a snapshot of the configured companies' open jobs, read from the API (GETs only).
    Record {
        /// Where to write the snapshot (mode 0600); an existing file is kept unless --force.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing --out file.
        #[arg(long)]
        force: bool,
        /// Print what was recorded as JSON.
        #[arg(long)]
        json: bool,
        /// Replace names, notes and file URLs with placeholders.
        #[arg(long)]
        redact: bool,
        /// A description to put in the snapshot.
        #[arg(long)]
        description: Option<String>,
        /// The snapshot's start (RFC 3339): the moment the listing is taken, on Pleo's clock.
        /// Default: now. Give it when this host's clock differs from Pleo's (each job's
        /// remaining time at replay is `lastUpdatedAt + expiresIn - start`).
        #[arg(long)]
        at: Option<String>,
    },
    /// Generate and replay simulated histories with faults, checking the invariants.
    Simulate {
        /// The first seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// How many seeds, from --seed on.
        #[arg(long, default_value_t = 1)]
        seeds: u64,
        /// Write the first seed's snapshot here instead of replaying (for `jobmirror replay`).
        #[arg(long)]
        write: Option<PathBuf>,
        /// Print the totals as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show jobmirror at work against a bundled fake Pleo; needs no credentials. The
    /// database is left at --db (default: a new folder under the temp dir).
    Demo,
    /// Check a configuration (the file and JOBMIRROR_* variables) as `run` would, and print
    /// the effective settings with secrets masked; exit 2 if it is refused.
    CheckConfig {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Options every read-only report takes.
#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Evaluate as of this time (RFC 3339) instead of now.
    #[arg(long, value_name = "TIME")]
    pub at: Option<String>,
}

pub use crate::config::UsageError;

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    if let Some(db) = &cli.db {
        // SAFETY: no other thread exists yet; every loader reads the database path from here.
        unsafe { std::env::set_var("JOBMIRROR_DB", db) };
    }
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let usage = e.downcast_ref::<ConfigError>().is_some()
                || e.downcast_ref::<UsageError>().is_some();
            eprintln!("jobmirror: {}", chain(&e));
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}

/// The error with its causes, one line.
fn chain(e: &anyhow::Error) -> String {
    let mut s = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
    }
    s
}

/// Logging to stderr in text (see [`crate::logging`]); the service uses its `log_format`.
pub fn init_logging(level: log::LevelFilter) {
    crate::logging::init(level, crate::logging::LogFormat::Text);
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let clock: SharedClock = Arc::new(SystemClock);
    match cli.command {
        Command::Run => {
            let cfg = Config::load(cli.config.as_deref())?;
            crate::logging::init(cfg.log, cfg.log_format);
            crate::service::systemd::run(&cfg, cli.config.as_deref(), clock)
        }
        Command::Migrate { json } => {
            let db = db_path(cli.config.as_deref())?;
            init_logging(log::LevelFilter::Info);
            let mut store = Store::connect(&db)?;
            let applied = store.migrate()?;
            if json {
                say_json(&serde_json::json!({"db": db, "applied": applied}))?;
            } else {
                for name in &applied {
                    println!("applied {name}");
                }
                println!("database {} is at the current schema", db.display());
            }
            Ok(())
        }
        Command::CheckConfig { json } => {
            let (cfg, settings) = crate::config::effective(cli.config.as_deref())?;
            if json {
                let map: serde_json::Map<String, serde_json::Value> = settings
                    .iter()
                    .map(|s| {
                        (
                            s.key.to_owned(),
                            serde_json::json!({"value": s.value, "from": s.from}),
                        )
                    })
                    .collect();
                say_json(&serde_json::json!({"valid": true, "settings": map}))?;
            } else {
                for s in &settings {
                    println!("{:<34} {:<10} {}", s.key, s.from, s.value);
                }
                println!(
                    "configuration valid: {} companies, database {}",
                    cfg.company_ids.len(),
                    cfg.db.display()
                );
            }
            Ok(())
        }
        Command::Status { report } => {
            let (store, _, now) = open_report(cli.config.as_deref(), &report, &clock)?;
            emit(
                &report,
                &crate::ops::status(&store, now)?,
                crate::ops::status_text,
            )
        }
        Command::Jobs {
            company,
            state,
            limit,
            report,
        } => {
            let (store, _, now) = open_report(cli.config.as_deref(), &report, &clock)?;
            let v = crate::ops::jobs(&store, now, company.as_deref(), state.as_deref(), limit)?;
            emit(&report, &v, crate::ops::jobs_text)
        }
        Command::Show { job, report } => {
            let (store, _, now) = open_report(cli.config.as_deref(), &report, &clock)?;
            emit(
                &report,
                &crate::ops::show(&store, now, &job)?,
                crate::ops::show_text,
            )
        }
        Command::Why { job, report } => {
            let (store, _, now) = open_report(cli.config.as_deref(), &report, &clock)?;
            let settings = operator_settings(cli.config.as_deref())?;
            let v = crate::ops::why::why(&store, now, &job, &settings)?;
            emit(&report, &v, crate::ops::why::why_text)
        }
        Command::Doctor { report } => {
            let (store, db, now) = open_report(cli.config.as_deref(), &report, &clock)?;
            let settings = operator_settings(cli.config.as_deref())?;
            let v = crate::ops::doctor::doctor(&store, &db, now, &settings)?;
            emit(&report, &v, crate::ops::doctor::doctor_text)?;
            if v["result"] == "fail" {
                anyhow::bail!("doctor found problems");
            }
            Ok(())
        }
        Command::Backup { file, json } => {
            let db = existing_db(cli.config.as_deref())?;
            let store = Store::open_read_only(&db)?;
            let v = crate::ops::backup(&store, &file)?;
            let args = ReportArgs { json, at: None };
            emit(&args, &v, crate::ops::backup_text)
        }
        Command::Prune { dry_run, json, at } => {
            let db = existing_db(cli.config.as_deref())?;
            let cfg = operator_config(cli.config.as_deref())?.0;
            let args = ReportArgs { json, at };
            let now = report_time(&args, &clock)?;
            let store = Store::connect(&db)?;
            let r = store.prune(now, clock.now(), cfg.retention, dry_run)?;
            emit(&args, &serde_json::to_value(&r)?, crate::ops::prune_text)
        }
        Command::FakePleo {
            listen,
            fixture,
            expires_in,
            api_key,
        } => {
            init_logging(log::LevelFilter::Info);
            let cfg = FakeConfig {
                api_keys: vec![api_key],
                expires_in_secs: expires_in,
                ..FakeConfig::default()
            };
            let fake = FakePleo::start(&listen, cfg, clock)?;
            if let Some(path) = fixture {
                let f = Fixture::load(&path).map_err(|e| UsageError(e.to_string()))?;
                let ids = fake.load_fixture(&f)?;
                println!("loaded {} jobs from {}", ids.len(), path.display());
                let readable = f.readable_ids();
                if !readable.is_empty() {
                    log::warn!(
                        "fixture {}: {} ids are not UUIDs (first: {}): answers that carry them are outside Pleo's schema",
                        path.display(),
                        readable.len(),
                        readable[0]
                    );
                }
            }
            println!("fake-pleo listening on {}", fake.base_url());
            use signal_hook::consts::{SIGINT, SIGTERM};
            let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
            let _ = signals.forever().next();
            drop(fake);
            Ok(())
        }
        Command::Subscribe {
            url,
            secret_file,
            event_types,
            json,
        } => {
            let cfg = Config::load_for(cli.config.as_deref(), crate::config::Needs::PLEO)?;
            init_logging(cfg.log);
            let file = secret_file
                .or_else(|| std::env::var_os("JOBMIRROR_WEBHOOK_SECRET_FILE").map(PathBuf::from))
                .or_else(|| {
                    config_value(cli.config.as_deref(), "webhook_secret_file").map(PathBuf::from)
                })
                .ok_or_else(|| {
                    UsageError(
                        "subscribe needs --secret-file or the webhook_secret_file setting".into(),
                    )
                })?;
            check_subscription_url(&url)?;
            let client = cfg.client(clock)?;
            let (id, secret, change) = client.ensure_subscription(&url, &event_types)?;
            let text = format!("{}\n", secret.expose());
            let same = std::fs::read_to_string(&file).is_ok_and(|t| t == text);
            if !same {
                write_private(&file, &text)?;
            }
            if json {
                say_json(&serde_json::json!({
                    "subscription_id": id, "url": url, "change": change.as_str(),
                    "secret_file": file, "secret_file_changed": !same,
                }))?;
            } else {
                println!(
                    "subscription {id} for {url} {}; its secret is in {} (mode 0600{})",
                    change.as_str(),
                    file.display(),
                    if same { ", unchanged" } else { "" }
                );
            }
            Ok(())
        }
        Command::Subscriptions { action } => {
            let cfg = Config::load_for(cli.config.as_deref(), crate::config::Needs::PLEO)?;
            init_logging(cfg.log);
            let client = cfg.client(clock)?;
            match action {
                SubscriptionsAction::List { json } => {
                    let subs = client.list_subscriptions()?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&subs)?);
                    } else if subs.is_empty() {
                        println!("no subscriptions");
                    } else {
                        for s in &subs {
                            let types: Vec<&str> = s["eventTypes"]
                                .as_array()
                                .map(|a| a.iter().filter_map(|t| t.as_str()).collect())
                                .unwrap_or_default();
                            println!(
                                "{}  {:<8}  {}  {}",
                                s["id"].as_str().unwrap_or("?"),
                                s["status"].as_str().unwrap_or("?"),
                                s["endpointUrl"].as_str().unwrap_or("?"),
                                types.join(",")
                            );
                        }
                    }
                }
                SubscriptionsAction::Delete { id, json } => {
                    client.delete_subscription(&id)?;
                    if json {
                        say_json(&serde_json::json!({"deleted": id}))?;
                    } else {
                        println!("deleted subscription {id}");
                    }
                }
            }
            Ok(())
        }
        Command::Trigger { json } => {
            let db = existing_db(cli.config.as_deref())?;
            let pids = Store::open_read_only(&db)?.instances()?;
            for pid in &pids {
                if signal_usr1(*pid) {
                    if json {
                        say_json(&serde_json::json!({"signalled_pid": pid}))?;
                    } else {
                        println!("asked jobmirror (pid {pid}) to run detection now");
                    }
                    return Ok(());
                }
            }
            anyhow::bail!(
                "no running jobmirror is recorded in {} (tried {:?}); with systemd: systemctl kill -s USR1 jobmirror",
                db.display(),
                pids
            )
        }
        Command::Replay {
            snapshot,
            handler,
            json,
        } => {
            let db = cli.db.clone();
            init_logging(log::LevelFilter::Error);
            let snap = crate::replay::snapshot::Snapshot::load(&snapshot)
                .map_err(|e| UsageError(format!("{e:#}")))?;
            let db = db.unwrap_or_else(|| {
                let stem = snapshot
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or("snapshot");
                PathBuf::from(format!("{stem}.replay.db"))
            });
            let mut opts = crate::replay::ReplayOptions::new(db.clone());
            opts.handler = handler;
            let summary = crate::replay::replay(snap, opts)?;
            // Everything into the main file, so copying the .db alone loses nothing.
            Store::connect(&db)?.checkpoint()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                print!("{}", summary.render());
                println!(
                    "  database: {} (try: sqlite3 -readonly {} \"SELECT * FROM job_events\")",
                    db.display(),
                    db.display()
                );
            }
            if !summary.violations.is_empty() {
                anyhow::bail!("{} invariants violated", summary.violations.len());
            }
            Ok(())
        }
        Command::Record {
            out,
            force,
            json,
            redact,
            description,
            at,
        } => {
            if out.exists() && !force {
                return Err(UsageError(format!(
                    "{} already exists; give --force to replace it",
                    out.display()
                ))
                .into());
            }
            let at = match at {
                None => None,
                Some(s) => Some(
                    crate::clock::Millis::parse_rfc3339(&s)
                        .ok_or_else(|| UsageError(format!("--at {s:?} is not an RFC 3339 time")))?,
                ),
            };
            let cfg =
                Config::load_for(cli.config.as_deref(), crate::config::Needs::PLEO_COMPANIES)?;
            init_logging(cfg.log);
            let client = cfg.client(clock.clone())?;
            let opts = crate::replay::snapshot::RecordOptions {
                redact,
                description,
                at,
            };
            let snap = crate::replay::snapshot::record(&client, &clock, &cfg.company_ids, &opts)?;
            write_private(&out, &(serde_json::to_string_pretty(&snap)? + "\n"))?;
            if json {
                say_json(&serde_json::json!({
                    "out": out, "jobs": snap.jobs.len(), "companies": snap.companies.len(),
                    "redacted": redact,
                }))?;
            } else {
                println!(
                    "recorded {} open jobs of {} companies into {}{}",
                    snap.jobs.len(),
                    snap.companies.len(),
                    out.display(),
                    if redact { " (redacted)" } else { "" }
                );
            }
            Ok(())
        }
        Command::Simulate {
            seed,
            seeds,
            write,
            json,
        } => {
            init_logging(log::LevelFilter::Error);
            if let Some(path) = write {
                let snap = crate::replay::simulate::generate(seed);
                std::fs::write(&path, serde_json::to_string_pretty(&snap)? + "\n")?;
                println!("wrote seed {seed} to {}", path.display());
                return Ok(());
            }
            let dir = std::env::temp_dir().join(format!("jobmirror-sim-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            let mut failed = Vec::new();
            let mut total = crate::replay::Summary::default();
            for s in seed..seed.saturating_add(seeds) {
                let summary = crate::replay::simulate::run_seed(s, &dir)?;
                total.add(&summary);
                if !summary.violations.is_empty() {
                    println!("seed {s}: {}", summary.violations.join("; "));
                    println!(
                        "  reproduce: {}",
                        crate::replay::simulate::reproduce_command(s)
                    );
                    failed.push(s);
                }
            }
            let _ = std::fs::remove_dir_all(&dir);
            total.description = Some(format!("{seeds} simulated histories from seed {seed}"));
            if json {
                say_json(&serde_json::json!({"seeds": seeds, "failed": failed, "totals": total}))?;
            } else {
                print!("{}", total.render());
                println!("{} seeds, {} failed", seeds, failed.len());
            }
            if !failed.is_empty() {
                anyhow::bail!("seeds {failed:?} violated invariants");
            }
            Ok(())
        }
        Command::Demo => crate::demo::run(cli.db.clone()),
        Command::Bench { smoke, json, only } => crate::bench::run(smoke, json, &only),
    }
}

/// Prints a command's outcome as JSON (the `--json` of every command that reports).
fn say_json(v: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Sends SIGUSR1 to `pid` if it is a jobmirror process.
fn signal_usr1(pid: u32) -> bool {
    if !crate::ops::doctor::is_jobmirror_process(pid) {
        return false;
    }
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill(2) with a valid signal number has no memory-safety preconditions.
    unsafe { libc::kill(pid, libc::SIGUSR1) == 0 }
}

/// Writes `text` to `path` with mode 0600, atomically (temp file and rename).
/// A subscription URL must reach the receiver: https (or http on loopback, for tests), and
/// the receiver's one path.
fn check_subscription_url(url: &str) -> Result<(), UsageError> {
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

fn write_private(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
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
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(&tmp)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(())
}

/// One string value from the config file, if any.
fn config_value(file: Option<&std::path::Path>, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(file?).ok()?;
    let t: toml::Table = text.parse().ok()?;
    t.get(key).and_then(|v| v.as_str()).map(str::to_owned)
}

/// The database path alone (for commands that need no credentials).
fn db_path(file: Option<&std::path::Path>) -> anyhow::Result<PathBuf> {
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
fn existing_db(file: Option<&std::path::Path>) -> anyhow::Result<PathBuf> {
    let db = db_path(file)?;
    match std::fs::metadata(&db) {
        Ok(_) => Ok(db),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(UsageError(format!(
            "database {} does not exist (run `jobmirror migrate` or `jobmirror run` first)",
            db.display()
        ))
        .into()),
        Err(e) => Err(UsageError(format!("database {} cannot be read: {e}", db.display())).into()),
    }
}

/// `--at`, or now.
fn report_time(args: &ReportArgs, clock: &SharedClock) -> anyhow::Result<crate::clock::Millis> {
    match &args.at {
        None => Ok(clock.now()),
        Some(s) => crate::clock::Millis::parse_rfc3339(s)
            .ok_or_else(|| UsageError(format!("--at {s:?} is not an RFC 3339 time")).into()),
    }
}

/// A read-only store, its path, and the report time.
fn open_report(
    file: Option<&std::path::Path>,
    args: &ReportArgs,
    clock: &SharedClock,
) -> anyhow::Result<(Store, PathBuf, crate::clock::Millis)> {
    let db = existing_db(file)?;
    let now = report_time(args, clock)?;
    Ok((Store::open_read_only(&db)?, db, now))
}

/// The configuration for commands that never talk to Pleo: only the database and the timing
/// settings are needed, so the service's own file and environment work as they are (its key
/// file, webhook secret and companies are neither required nor read). Returns whether the
/// companies were named.
fn operator_config(file: Option<&std::path::Path>) -> anyhow::Result<(Config, bool)> {
    let cfg = Config::load_for(file, crate::config::Needs::OPERATOR)?;
    let named = !cfg.company_ids.is_empty();
    Ok((cfg, named))
}

fn operator_settings(file: Option<&std::path::Path>) -> anyhow::Result<crate::ops::Settings> {
    let (cfg, named) = operator_config(file)?;
    Ok(crate::ops::Settings::from_config(&cfg, named))
}

/// Prints a report as JSON or text.
fn emit(
    args: &ReportArgs,
    v: &serde_json::Value,
    text: fn(&serde_json::Value) -> String,
) -> anyhow::Result<()> {
    if args.json {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else {
        print!("{}", text(v));
    }
    Ok(())
}
