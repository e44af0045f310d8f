//! The store: every SQL statement of jobmirror lives here, and so do the migrations. SQLite
//! here; PostgreSQL (several instances, company leases) in [`pg`].
//!
//! Invariants: the schema only changes through refinery migrations in `migrations/`
//! (append-only); `job_events` is only ever appended to (triggers refuse UPDATE and DELETE);
//! a job's row and the journal entries describing the change are written in one transaction;
//! no function reads the clock: every time is passed in as `now`.

mod companies;
mod deliveries;
mod items;
mod jobs;
pub mod pg;
pub mod sql;
mod tokens;
mod upkeep;

pub use companies::*;
pub use deliveries::*;
pub use items::*;
pub use jobs::*;
pub use tokens::*;
pub use upkeep::*;

use rusqlite::{Connection, OpenFlags};
use serde_json::{Value, json};
use std::path::Path;

use crate::clock::Millis;
use crate::wire::{Job, status};

mod embedded {
    refinery::embed_migrations!("migrations/sqlite");
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database migration failed: {0}")]
    Migrate(String),
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("PostgreSQL: {0}")]
    Pg(#[from] postgres::Error),
    #[error("{0} is not available on a PostgreSQL store")]
    SqliteOnly(&'static str),
    #[error("company {0}: this instance no longer holds its lease; nothing is sent for it")]
    LeaseLost(String),
    #[error("database file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// jobmirror's own processing state of a job (`export_jobs.proc_state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProcState {
    /// Pending at Pleo and not yet tried: a candidate for the pick query.
    New,
    /// Found `in_progress` by the start-up recovery pass: ours to resume, without `started`.
    Resume,
    /// `started` is being sent.
    Claiming,
    /// We hold the claim (Pleo says `in_progress` because of our `started`).
    Claimed,
    /// Handed to the processing stage.
    Processing,
    /// Another integration claimed it (422 on `started`, or seen `in_progress` outside recovery).
    Conflict,
    /// Left alone: less time before expiry than the configured minimum.
    TooLate,
    /// Pleo expired it (`failed` with `job_expired`).
    Expired,
    /// Finished at Pleo in any other way.
    Done,
}

impl ProcState {
    pub const ALL: [ProcState; 9] = [
        ProcState::New,
        ProcState::Resume,
        ProcState::Claiming,
        ProcState::Claimed,
        ProcState::Processing,
        ProcState::Conflict,
        ProcState::TooLate,
        ProcState::Expired,
        ProcState::Done,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            ProcState::New => "new",
            ProcState::Resume => "resume",
            ProcState::Claiming => "claiming",
            ProcState::Claimed => "claimed",
            ProcState::Processing => "processing",
            ProcState::Conflict => "conflict",
            ProcState::TooLate => "too_late",
            ProcState::Expired => "expired",
            ProcState::Done => "done",
        }
    }
    pub fn parse(s: &str) -> Option<ProcState> {
        ProcState::ALL.into_iter().find(|p| p.as_str() == s)
    }
    /// States in which jobmirror is working on the job (at most one per company).
    pub fn is_active(self) -> bool {
        matches!(
            self,
            ProcState::Resume | ProcState::Claiming | ProcState::Claimed | ProcState::Processing
        )
    }
    pub fn is_final(self) -> bool {
        matches!(self, ProcState::Expired | ProcState::Done)
    }
}

/// What the journal records. Stored as text in `job_events.kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// First time the job was seen.
    Detected,
    /// Pleo's status for the job changed.
    StatusChanged,
    /// An open job was missing from the listing and was read again.
    LeftListing,
    /// Re-read before claiming; detail says what Pleo answered.
    Verified,
    ClaimSent,
    Claimed,
    /// 422 on `started`: someone else holds the job.
    ClaimConflict,
    /// `started` failed for another reason.
    ClaimFailed,
    /// Seen `in_progress` held by someone else.
    ClaimedElsewhere,
    /// An `in_progress` job taken back after a restart, without `started`.
    Resumed,
    /// Handed to the processing stage.
    Ready,
    DeadlineWarning,
    Expired,
    /// Reached a terminal status other than expiry.
    Finished,
    /// The processing stage began (or resumed) work on a held job.
    ProcessingStarted,
    /// The handler's readiness check failed.
    NotReady,
    /// A handler run ended without answering every item (crash, garbage); it may be retried.
    HandlerFailed,
    /// The handler gave no result in time, or the job would expire first.
    HandlerTimedOut,
    /// Results reported with a PUT (detail: counts).
    ItemsReported,
    /// Pleo refused some item updates inside a 200.
    ItemReportFailed,
    /// Processing hit an error it will retry (Pleo unreachable, ...).
    ProcessingError,
    /// jobmirror sent the final event (completed, completed_with_errors, failed).
    FinishSent,
    /// Not claimed (databases before the claim rules changed): too little time left.
    TooLate,
    /// A claim was put off: too little time left for it to land; read again at the deadline.
    ClaimDeferred,
    /// The readiness check passes again after failing.
    ReadinessRestored,
    /// A sync pass over a company failed.
    SyncFailed,
    /// A listing entry that is not a readable job was skipped (the rest were stored).
    ListingEntrySkipped,
    /// A verified webhook announcing a job was stored.
    WebhookReceived,
    /// A verified webhook of a type we do not act on (or naming no job) was stored.
    WebhookIgnored,
    /// `jobmirror prune` removed details past their retention (detail: counts).
    Pruned,
    /// `jobmirror companies add` added a company (detail: its credential kind).
    CompanyAdded,
    /// `jobmirror companies add` gave a company another credential (or authorized it again).
    CompanyCredentialChanged,
    /// `jobmirror companies remove`.
    CompanyRemoved,
    CompanyPaused,
    CompanyResumed,
    /// The service stopped serving a company that was removed or paused, after its job in
    /// hand (if any) was finished or handed back (detail: that job).
    CompanyLeft,
    /// The OAuth token endpoint refused the client (`invalid_client`, `unauthorized_client`):
    /// no refresh token is used up; refreshes are tried again with a backoff.
    OAuthClientRefused,
    /// The token endpoint accepted the client again.
    OAuthClientAccepted,
    /// A pending job expired at Pleo before jobmirror took it (it waited: for a lane busy with
    /// other companies' jobs, a readiness check, a pause). Journaled beside `expired`.
    ExpiredWaiting,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Detected => "detected",
            EventKind::StatusChanged => "status_changed",
            EventKind::LeftListing => "left_listing",
            EventKind::Verified => "verified",
            EventKind::ClaimSent => "claim_sent",
            EventKind::Claimed => "claimed",
            EventKind::ClaimConflict => "claim_conflict",
            EventKind::ClaimFailed => "claim_failed",
            EventKind::ClaimedElsewhere => "claimed_elsewhere",
            EventKind::Resumed => "resumed",
            EventKind::Ready => "ready",
            EventKind::DeadlineWarning => "deadline_warning",
            EventKind::Expired => "expired",
            EventKind::Finished => "finished",
            EventKind::ProcessingStarted => "processing_started",
            EventKind::NotReady => "not_ready",
            EventKind::HandlerFailed => "handler_failed",
            EventKind::HandlerTimedOut => "handler_timed_out",
            EventKind::ItemsReported => "items_reported",
            EventKind::ItemReportFailed => "item_report_failed",
            EventKind::ProcessingError => "processing_error",
            EventKind::FinishSent => "finish_sent",
            EventKind::TooLate => "too_late",
            EventKind::ClaimDeferred => "claim_deferred",
            EventKind::ReadinessRestored => "readiness_restored",
            EventKind::SyncFailed => "sync_failed",
            EventKind::ListingEntrySkipped => "listing_entry_skipped",
            EventKind::WebhookReceived => "webhook_received",
            EventKind::WebhookIgnored => "webhook_ignored",
            EventKind::Pruned => "pruned",
            EventKind::CompanyAdded => "company_added",
            EventKind::CompanyCredentialChanged => "company_credential_changed",
            EventKind::CompanyRemoved => "company_removed",
            EventKind::CompanyPaused => "company_paused",
            EventKind::CompanyResumed => "company_resumed",
            EventKind::CompanyLeft => "company_left",
            EventKind::OAuthClientRefused => "oauth_client_refused",
            EventKind::OAuthClientAccepted => "oauth_client_accepted",
            EventKind::ExpiredWaiting => "expired_waiting",
        }
    }
}

/// Why a job is being written: shapes the proc_state a newly `in_progress` job gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The start-up recovery pass: `in_progress` jobs are ours to resume.
    Recovery,
    /// The recovery pass with `resume_unknown_in_progress = false`: an `in_progress` job this
    /// database does not hold is left to whoever holds it.
    RecoveryLeavingInProgress,
    /// A scheduled poll.
    Poll,
    /// A listing run on request (`jobmirror trigger`, SIGUSR1).
    Trigger,
    /// A single-job read (left the listing, verify, deadline check).
    Reread,
    /// A listing prompted by a webhook (the same listing as a poll).
    Webhook,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Recovery | Source::RecoveryLeavingInProgress => "recovery",
            Source::Poll => "poll",
            Source::Trigger => "trigger",
            Source::Reread => "reread",
            Source::Webhook => "webhook",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upsert {
    New,
    Changed,
    Unchanged,
}

/// A row of `export_jobs` as the processor needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct JobRow {
    pub id: String,
    pub company_id: String,
    pub status: String,
    pub created_at: Millis,
    pub last_updated_at: Option<Millis>,
    pub expires_at: Millis,
    pub number_of_items: i64,
    pub proc_state: ProcState,
    pub claim_attempts: i64,
    pub warned_expires_at: Option<Millis>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct EventRow {
    pub seq: i64,
    pub at: Millis,
    pub job_id: Option<String>,
    pub company_id: Option<String>,
    pub kind: String,
    pub detail: Value,
}

/// Counters of one listing pass, for `sync_runs`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncCounts {
    pub pages: u32,
    pub seen: u32,
    pub new: u32,
    pub changed: u32,
    pub reread: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct CompanySummary {
    pub company_id: String,
    pub by_state: Vec<(String, i64)>,
    pub last_poll_at: Option<Millis>,
    pub last_poll_error: Option<String>,
    /// Listing passes that failed in a row, up to the latest (0 once one succeeds).
    pub failed_in_a_row: u32,
    pub next_deadline: Option<(String, Millis)>,
}

impl CompanySummary {
    /// A company with no jobs and no finished pass.
    pub fn empty(company_id: &str) -> CompanySummary {
        CompanySummary {
            company_id: company_id.to_owned(),
            by_state: Vec::new(),
            last_poll_at: None,
            last_poll_error: None,
            failed_in_a_row: 0,
            next_deadline: None,
        }
    }
}

/// `expires_at` is read as the later of Pleo's deadline as last read and the one our last
/// accepted job event guarantees (`accepted_deadline`): never a deadline older than our own
/// accepted event.
const JOB_COLUMNS: &str = "id, company_id, status, created_at, last_updated_at, \
     max(expires_at, coalesce(accepted_deadline, 0)), \
     number_of_items, proc_state, claim_attempts, warned_expires_at";

fn job_row(r: &sql::Row<'_>) -> Result<JobRow> {
    let state: String = r.get(7)?;
    Ok(JobRow {
        id: r.get(0)?,
        company_id: r.get(1)?,
        status: r.get(2)?,
        created_at: Millis(r.get(3)?),
        last_updated_at: r.get::<Option<i64>>(4)?.map(Millis),
        expires_at: Millis(r.get(5)?),
        number_of_items: r.get(6)?,
        proc_state: ProcState::parse(&state).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                7,
                rusqlite::types::Type::Text,
                format!("unknown proc_state {state:?}").into(),
            )
        })?,
        claim_attempts: r.get(8)?,
        warned_expires_at: r.get::<Option<i64>>(9)?.map(Millis),
    })
}

pub struct Store {
    db: sql::Db,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating with mode 0600 if needed) the database, sets WAL, busy timeout and
    /// foreign keys, and applies pending migrations.
    pub fn open(path: &Path) -> Result<Store> {
        let mut store = Store::connect(path)?;
        store.migrate()?;
        Ok(store)
    }

    /// As [`Store::open`] without applying migrations: for further connections to a database
    /// already opened (and so migrated) by this process, and for `jobmirror migrate`.
    pub fn connect(path: &Path) -> Result<Store> {
        pg::refuse_url(path)?;
        let shown = path.display().to_string();
        if !path.exists() {
            create_private_file(path).map_err(|source| StoreError::Io {
                path: shown.clone(),
                source,
            })?;
        }
        let conn = Connection::open(path).map_err(|source| StoreError::Open {
            path: shown.clone(),
            source,
        })?;
        Store::configure(&conn).map_err(|source| StoreError::Open {
            path: shown,
            source,
        })?;
        Ok(Store {
            db: sql::Db::Lite(conn),
        })
    }

    /// Relaxes this connection's commits to `synchronous = NORMAL`: in WAL mode a commit still
    /// survives a crash of the process, but not a power loss. Only for the mirror's own writes
    /// (what Pleo says about jobs, which the next recovery pass reads again); webhook
    /// deliveries and item results keep FULL.
    /// No fsync at all: for replay and simulation databases, which are scratch copies
    /// (a replay's crashes stop threads, not the machine).
    pub fn scratch_durability(&self) -> Result<()> {
        if self.db.is_pg() {
            return Ok(());
        }
        self.lite()?.execute_batch("PRAGMA synchronous = OFF")?;
        Ok(())
    }

    pub fn relax_durability(&self) -> Result<()> {
        if self.db.is_pg() {
            return Ok(());
        }
        self.lite()?.execute_batch("PRAGMA synchronous = NORMAL")?;
        Ok(())
    }

    /// Opens an existing database read-only (for `status` and audits); never migrates.
    pub fn open_read_only(path: &Path) -> Result<Store> {
        pg::refuse_url(path)?;
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(Store {
            db: sql::Db::Lite(conn),
        })
    }

    fn configure(conn: &Connection) -> rusqlite::Result<()> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            log::warn!("SQLite refused WAL mode (got {mode}); continuing in {mode} mode");
        }
        // FULL: a commit survives power loss, not only a crash of the process.
        conn.execute_batch(
            "PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA temp_store = MEMORY;",
        )?;
        Ok(())
    }

    /// Applies pending migrations; returns the names of those applied now.
    pub fn migrate(&mut self) -> Result<Vec<String>> {
        let report = match &mut self.db {
            sql::Db::Lite(c) => embedded::migrations::runner()
                .run(c)
                .map_err(|e| e.to_string()),
            sql::Db::Pg(c) => pg::migrate_locked(&mut c.client()),
        }
        .map_err(StoreError::Migrate)?;
        Ok(report
            .applied_migrations()
            .iter()
            .map(|m| format!("V{}__{}", m.version(), m.name()))
            .collect())
    }
}

/// One service per database: an exclusive `flock` on `<db>.lock`, held for the life of the
/// value. The kernel releases it when the holder dies (kill -9 leaves no stale lock); the file
/// names the holder's pid for the refusal message.
#[derive(Debug)]
pub struct DbLock {
    _file: std::fs::File,
    pub path: std::path::PathBuf,
}

impl DbLock {
    pub fn path_for(db: &Path) -> std::path::PathBuf {
        let mut p = db.as_os_str().to_owned();
        p.push(".lock");
        std::path::PathBuf::from(p)
    }

    /// Takes the lock or says who holds it.
    pub fn acquire(db: &Path) -> std::result::Result<DbLock, String> {
        use std::io::{Read, Seek, Write};
        let path = Self::path_for(db);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.is_dir()
        {
            return Err(format!(
                "the folder {} does not exist (create it, or correct `db`)",
                dir.display()
            ));
        }
        let mut opts = std::fs::OpenOptions::new();
        opts.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut file = opts
            .open(&path)
            .map_err(|e| format!("cannot open the lock file {}: {e}", path.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::io::AsRawFd;
            // SAFETY: flock on a file descriptor we own; no memory is involved.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc != 0 {
                let err = std::io::Error::last_os_error();
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    format!(
                        "database {} is held by a running jobmirror (pid {}); one service per database (lock {})",
                        db.display(),
                        if holder.is_empty() { "unknown" } else { holder },
                        path.display()
                    )
                } else {
                    format!("cannot lock {}: {err}", path.display())
                });
            }
        }
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = writeln!(file, "{}", std::process::id());
        let _ = file.flush();
        Ok(DbLock { _file: file, path })
    }
}

#[cfg(unix)]
fn create_private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    // A missing folder is more likely a mistyped `db` than a wish for a new tree: say so
    // instead of creating it.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "the folder {} does not exist (create it, or correct `db`)",
                dir.display()
            ),
        ));
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map(|_| ())
        .or_else(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Ok(())
            } else {
                Err(e)
            }
        })
}

#[cfg(not(unix))]
fn create_private_file(path: &Path) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .open(path)
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, company: &str, status: &str, created: &str) -> Job {
        Job::from_value(json!({
            "id": id, "companyId": company, "status": status, "createdAt": created,
            "lastUpdatedAt": created, "expiresIn": 3600, "numberOfItems": 1,
            "isInteractive": true, "vendorBasedBookkeeping": false
        }))
        .unwrap()
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("m.db")).unwrap();
        (dir, s)
    }

    #[test]
    fn migrations_apply_to_an_empty_database_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let mut s = Store::open(&path).unwrap();
        assert!(
            s.migrate().unwrap().is_empty(),
            "second run applies nothing"
        );
        let mode: String = s
            .conn()
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let m = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(m & 0o777, 0o600);
        }
    }

    #[test]
    fn pick_is_oldest_first_then_id_whatever_time_is_left() {
        let (_d, s) = store();
        let now = Millis::parse_rfc3339("2026-11-24T10:30:00Z").unwrap();
        s.upsert_jobs(
            &[
                job("b", "c", "pending", "2026-11-24T10:20:00Z"),
                job("a2", "c", "pending", "2026-11-24T10:01:00Z"),
                job("a1", "c", "pending", "2026-11-24T10:01:00Z"),
                job("x", "other", "pending", "2026-11-24T09:00:00Z"),
            ],
            now,
            Source::Poll,
        )
        .unwrap();
        // a1 and a2 expire at 11:01, b at 11:20: a claim refreshes the deadline, so the
        // oldest stays first however little time it has left.
        assert_eq!(s.pick_next("c").unwrap().unwrap().id, "a1");
        assert_eq!(
            s.job("a1").unwrap().unwrap().expires_at.to_rfc3339(),
            "2026-11-24T11:01:00.000Z"
        );
    }

    #[test]
    fn jobs_created_within_one_millisecond_are_ordered_at_full_precision_then_id() {
        let (_d, s) = store();
        // "b" is 0.4 ms older than "a"; "c" and "d" share the instant: id decides.
        s.upsert_jobs(
            &[
                job("a", "c", "pending", "2026-11-24T10:00:00.123900Z"),
                job("b", "c", "pending", "2026-11-24T10:00:00.1235Z"),
                job("d", "c", "pending", "2026-11-24T10:00:00.123456789Z"),
                job("c", "c", "pending", "2026-11-24T10:00:00.123456789Z"),
            ],
            Millis(0),
            Source::Poll,
        )
        .unwrap();
        let order: Vec<String> = s
            .list_jobs(Some("c"), None, 10)
            .unwrap()
            .into_iter()
            .map(|j| j.id)
            .collect();
        assert_eq!(order, ["c", "d", "b", "a"]);
        assert_eq!(s.pick_next("c").unwrap().unwrap().id, "c");
        let a = s.job("a").unwrap().unwrap();
        assert_eq!(s.jobs_ahead(&a).unwrap(), ["c", "d", "b"]);
    }

    #[test]
    fn an_older_observation_never_overwrites_a_newer_one() {
        let (_d, s) = store();
        let mut pending = job("j", "c", "pending", "2026-11-24T10:00:00Z");
        pending.last_updated_at = Some(Millis::parse_rfc3339("2026-11-24T10:00:00Z").unwrap());
        let mut started = job("j", "c", "in_progress", "2026-11-24T10:00:00Z");
        started.last_updated_at = Some(Millis::parse_rfc3339("2026-11-24T10:30:00Z").unwrap());
        s.upsert_job(&pending, Millis(1), Source::Poll).unwrap();
        s.upsert_job(&started, Millis(2), Source::Reread).unwrap();
        // A slow listing that was read before `started` answers last.
        assert_eq!(
            s.upsert_job(&pending, Millis(3), Source::Poll).unwrap(),
            Upsert::Unchanged
        );
        let row = s.job("j").unwrap().unwrap();
        assert_eq!(row.status, "in_progress");
        assert_eq!(row.expires_at.to_rfc3339(), "2026-11-24T11:30:00.000Z");
    }

    #[test]
    fn recovery_resumes_a_job_seen_pending_but_never_one_recorded_as_someone_elses() {
        let (_d, s) = store();
        // Seen pending (e.g. a backup taken before our claim), in_progress at recovery: ours.
        s.upsert_job(
            &job("b", "c", "pending", "2026-11-24T10:00:00Z"),
            Millis(0),
            Source::Poll,
        )
        .unwrap();
        s.upsert_job(
            &job("b", "c", "in_progress", "2026-11-24T10:00:00Z"),
            Millis(1),
            Source::Recovery,
        )
        .unwrap();
        assert_eq!(s.job("b").unwrap().unwrap().proc_state, ProcState::Resume);
        // Recorded as someone else's while we ran: it stays theirs at the next recovery.
        s.upsert_job(
            &job("t", "c", "pending", "2026-11-24T10:00:00Z"),
            Millis(0),
            Source::Poll,
        )
        .unwrap();
        s.upsert_job(
            &job("t", "c", "in_progress", "2026-11-24T10:00:00Z"),
            Millis(1),
            Source::Poll,
        )
        .unwrap();
        assert_eq!(s.job("t").unwrap().unwrap().proc_state, ProcState::Conflict);
        s.upsert_job(
            &job("t", "c", "in_progress", "2026-11-24T10:00:00Z"),
            Millis(2),
            Source::Recovery,
        )
        .unwrap();
        assert_eq!(s.job("t").unwrap().unwrap().proc_state, ProcState::Conflict);
    }

    #[test]
    fn journal_refuses_update_and_delete() {
        let (_d, s) = store();
        s.journal(Millis(1), None, None, EventKind::SyncFailed, json!({}))
            .unwrap();
        assert!(
            s.conn()
                .execute("UPDATE job_events SET kind = 'x'", [])
                .is_err()
        );
        assert!(s.conn().execute("DELETE FROM job_events", []).is_err());
        assert_eq!(s.events(None).unwrap().len(), 1);
    }

    #[test]
    fn in_progress_is_resume_in_recovery_and_conflict_otherwise() {
        let (_d, s) = store();
        let now = Millis(0);
        s.upsert_job(
            &job("r", "c", "in_progress", "2026-11-24T10:00:00Z"),
            now,
            Source::Recovery,
        )
        .unwrap();
        s.upsert_job(
            &job("o", "c", "pending", "2026-11-24T10:00:00Z"),
            now,
            Source::Poll,
        )
        .unwrap();
        s.upsert_job(
            &job("o", "c", "in_progress", "2026-11-24T10:00:00Z"),
            now,
            Source::Reread,
        )
        .unwrap();
        assert_eq!(s.job("r").unwrap().unwrap().proc_state, ProcState::Resume);
        assert_eq!(s.job("o").unwrap().unwrap().proc_state, ProcState::Conflict);
        let kinds: Vec<String> = s
            .events(Some("o"))
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(kinds, ["detected", "status_changed", "claimed_elsewhere"]);
    }

    #[test]
    fn unchanged_changed_new() {
        let (_d, s) = store();
        let j = job("a", "c", "pending", "2026-11-24T10:00:00Z");
        assert_eq!(
            s.upsert_job(&j, Millis(0), Source::Poll).unwrap(),
            Upsert::New
        );
        assert_eq!(
            s.upsert_job(&j, Millis(1), Source::Poll).unwrap(),
            Upsert::Unchanged
        );
        let mut j2 = j.clone();
        j2.raw["numberOfItems"] = json!(2);
        assert_eq!(
            s.upsert_job(&j2, Millis(2), Source::Poll).unwrap(),
            Upsert::Changed
        );
    }
}
