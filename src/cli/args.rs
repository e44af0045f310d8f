//! The command line's grammar: every command, its options and their help (clap derives the
//! parser from these types). What each command does is in the other files of `cli`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

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
    /// TOML configuration file (default: $JOBMIRROR_CONFIG, else /etc/jobmirror/jobmirror.toml
    /// when it exists); every key can be overridden by JOBMIRROR_<KEY>.
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
pub enum CompaniesAction {
    /// Serve a company (or give it another credential; with a new refresh token this is how
    /// a company is authorized again). The running service starts it within seconds.
    Add {
        id: String,
        /// A file holding the company's own API key.
        #[arg(long, value_name = "FILE")]
        api_key_file: Option<PathBuf>,
        /// A file holding the company's OAuth refresh token (its pair is refreshed and
        /// rotated by the service from then on; the file is not read again).
        #[arg(long, value_name = "FILE")]
        oauth_refresh_token_file: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Every company, from the configuration and the database: source, credential, state.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Stop serving a company once its job in hand (if any) is finished or handed back.
    Remove {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Stop serving a company for now (its job in hand is finished first); it keeps its row.
    Pause {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Serve a paused company again.
    Resume {
        id: String,
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
    /// Instances sharing a PostgreSQL `db`: heartbeats, leases, and companies no live
    /// instance holds (exit 1 when there are any). Read-only.
    Instances {
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
        /// Check a file the service has not started on yet (a restored replica, a copy):
        /// integrity still fails, while stale polls, past deadlines and no service running
        /// are warnings at most.
        #[arg(long)]
        before_start: bool,
        #[command(flatten)]
        report: ReportArgs,
    },
    /// An online copy of the database (SQLite backup API), safe while the service runs; into
    /// a folder: a new file named by the time.
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
        #[arg(long, conflicts_with_all = ["company", "all"])]
        secret_file: Option<PathBuf>,
        /// With this company's own credential; its secret is kept in the database and the
        /// running receiver accepts it within seconds.
        #[arg(long, value_name = "ID", conflicts_with = "all")]
        company: Option<String>,
        /// Make sure every served company with a credential of its own has one subscription
        /// for --url (idempotent).
        #[arg(long)]
        all: bool,
        /// Event types to subscribe to.
        #[arg(long = "event-type", default_value = "v1.export-job.created")]
        event_types: Vec<String>,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add, list, pause, resume or remove the companies kept in the database.
    Companies {
        #[command(subcommand)]
        action: CompaniesAction,
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
        /// A PostgreSQL server for the "shared" section (three instances on it against one on
        /// SQLite): `postgresql://user@host:port/dbname`, a user that may create databases,
        /// the password in PGPASSWORD.
        #[arg(long, value_name = "URL")]
        postgres: Option<String>,
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
    Record(RecordArgs),
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

/// `jobmirror record`'s options.
#[derive(clap::Args, Debug)]
pub struct RecordArgs {
    /// Where to write the snapshot (mode 0600); an existing file is kept unless --force.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing --out file.
    #[arg(long)]
    pub force: bool,
    /// Print what was recorded as JSON.
    #[arg(long)]
    pub json: bool,
    /// Replace names, notes and file URLs with placeholders.
    #[arg(long)]
    pub redact: bool,
    /// A description to put in the snapshot.
    #[arg(long)]
    pub description: Option<String>,
    /// The snapshot's start (RFC 3339): the moment the listing is taken, on Pleo's clock.
    /// Default: now. Give it when this host's clock differs from Pleo's (each job's
    /// remaining time at replay is `lastUpdatedAt + expiresIn - start`).
    #[arg(long)]
    pub at: Option<String>,
}
