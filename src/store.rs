//! The SQLite store: every SQL statement of jobmirror lives here, and so do the migrations.
//!
//! Invariants: the schema only changes through refinery migrations in `migrations/`
//! (append-only); `job_events` is only ever appended to (triggers refuse UPDATE and DELETE);
//! a job's row and the journal entries describing the change are written in one transaction;
//! no function reads the clock: every time is passed in as `now`.

use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde_json::{Value, json};

use crate::clock::Millis;
use crate::wire::{Job, status};

mod embedded {
    refinery::embed_migrations!("migrations");
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
    /// A scheduled or triggered poll.
    Poll,
    /// A single-job read (left the listing, verify, deadline check).
    Reread,
    /// A single-job read prompted by a webhook.
    Webhook,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Recovery | Source::RecoveryLeavingInProgress => "recovery",
            Source::Poll => "poll",
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
    /// Listing passes that failed in a row, the latest first (counted up to 100).
    pub failed_in_a_row: u32,
    pub next_deadline: Option<(String, Millis)>,
}

const JOB_COLUMNS: &str = "id, company_id, status, created_at, last_updated_at, expires_at, \
     number_of_items, proc_state, claim_attempts, warned_expires_at";

fn job_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRow> {
    let state: String = r.get(7)?;
    Ok(JobRow {
        id: r.get(0)?,
        company_id: r.get(1)?,
        status: r.get(2)?,
        created_at: Millis(r.get(3)?),
        last_updated_at: r.get::<_, Option<i64>>(4)?.map(Millis),
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
        warned_expires_at: r.get::<_, Option<i64>>(9)?.map(Millis),
    })
}

pub struct Store {
    conn: Connection,
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
        let mut store = Store { conn };
        store.configure().map_err(|source| StoreError::Open {
            path: shown,
            source,
        })?;
        Ok(store)
    }

    /// Relaxes this connection's commits to `synchronous = NORMAL`: in WAL mode a commit still
    /// survives a crash of the process, but not a power loss. Only for the mirror's own writes
    /// (what Pleo says about jobs, which the next recovery pass reads again); webhook
    /// deliveries and item results keep FULL.
    /// No fsync at all: for replay and simulation databases, which are scratch copies
    /// (a replay's crashes stop threads, not the machine).
    pub fn scratch_durability(&self) -> Result<()> {
        self.conn.execute_batch("PRAGMA synchronous = OFF")?;
        Ok(())
    }

    pub fn relax_durability(&self) -> Result<()> {
        self.conn.execute_batch("PRAGMA synchronous = NORMAL")?;
        Ok(())
    }

    /// Marks handled deliveries in one transaction.
    pub fn mark_deliveries(&self, marks: &[(String, String)], now: Millis) -> Result<()> {
        let tx = self.write_tx()?;
        for (id, outcome) in marks {
            tx.prepare_cached("UPDATE webhook_deliveries SET processed_at = ?2, outcome = ?3 WHERE webhook_id = ?1")?
                .execute(params![id, now.0, outcome])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Opens an existing database read-only (for `status` and audits); never migrates.
    pub fn open_read_only(path: &Path) -> Result<Store> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(Store { conn })
    }

    fn configure(&mut self) -> rusqlite::Result<()> {
        self.conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let mode: String = self
            .conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            log::warn!("SQLite refused WAL mode (got {mode}); continuing in {mode} mode");
        }
        // FULL: a commit survives power loss, not only a crash of the process.
        self.conn.execute_batch(
            "PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA temp_store = MEMORY;",
        )?;
        Ok(())
    }

    /// Applies pending migrations; returns the names of those applied now.
    pub fn migrate(&mut self) -> Result<Vec<String>> {
        let report = embedded::migrations::runner()
            .run(&mut self.conn)
            .map_err(|e| StoreError::Migrate(e.to_string()))?;
        Ok(report
            .applied_migrations()
            .iter()
            .map(|m| format!("V{}__{}", m.version(), m.name()))
            .collect())
    }

    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    /// A write transaction that takes the write lock at BEGIN (waiting up to the busy timeout).
    /// A deferred transaction that reads first could fail at its first write with
    /// SQLITE_BUSY_SNAPSHOT when another connection wrote in between, which no timeout cures.
    fn write_tx(&self) -> rusqlite::Result<rusqlite::Transaction<'_>> {
        rusqlite::Transaction::new_unchecked(&self.conn, rusqlite::TransactionBehavior::Immediate)
    }

    /// Writes jobs read from Pleo, with the journal entries for what changed, in one transaction.
    pub fn upsert_jobs(&self, jobs: &[Job], now: Millis, source: Source) -> Result<Vec<Upsert>> {
        let tx = self.write_tx()?;
        let mut out = Vec::with_capacity(jobs.len());
        for job in jobs {
            out.push(upsert_one(&tx, job, now, source)?);
        }
        tx.commit()?;
        Ok(out)
    }

    pub fn upsert_job(&self, job: &Job, now: Millis, source: Source) -> Result<Upsert> {
        Ok(self.upsert_jobs(std::slice::from_ref(job), now, source)?[0])
    }

    pub fn journal(
        &self,
        now: Millis,
        job_id: Option<&str>,
        company_id: Option<&str>,
        kind: EventKind,
        detail: Value,
    ) -> Result<()> {
        journal(&self.conn, now, job_id, company_id, kind, &detail)?;
        Ok(())
    }

    /// The pick query: the company's oldest pending job not yet taken, whatever time it has
    /// left (a claim refreshes its deadline).
    pub fn pick_next(&self, company_id: &str) -> Result<Option<JobRow>> {
        Ok(self
            .conn
            .prepare_cached(PICK_SQL)?
            .query_row(params![company_id], job_row)
            .optional()?)
    }

    /// Companies with a job in hand or a job to claim (both from partial indexes).
    pub fn companies_with_work(&self) -> Result<std::collections::HashSet<String>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT company_id FROM export_jobs WHERE proc_state IN ('resume', 'claiming', 'claimed', 'processing') \
             UNION SELECT company_id FROM export_jobs WHERE status = 'pending' AND proc_state = 'new'",
        )?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The job jobmirror is working on for this company, if any.
    pub fn active_job(&self, company_id: &str) -> Result<Option<JobRow>> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM export_jobs \
             WHERE company_id = ?1 AND proc_state IN ('resume', 'claiming', 'claimed', 'processing') \
             ORDER BY created_at, created_at_sub_ns, id LIMIT 1"
        );
        Ok(self
            .conn
            .prepare_cached(&sql)?
            .query_row([company_id], job_row)
            .optional()?)
    }

    pub fn job(&self, job_id: &str) -> Result<Option<JobRow>> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM export_jobs WHERE id = ?1");
        Ok(self
            .conn
            .prepare_cached(&sql)?
            .query_row([job_id], job_row)
            .optional()?)
    }

    pub fn job_raw(&self, job_id: &str) -> Result<Option<Value>> {
        let raw: Option<String> = self
            .conn
            .query_row(
                "SELECT raw_json FROM export_jobs WHERE id = ?1",
                [job_id],
                |r| r.get(0),
            )
            .optional()?;
        Ok(raw.and_then(|s| serde_json::from_str(&s).ok()))
    }

    /// Moves a job to `to`, journaling `kind` with `detail`, in one transaction.
    pub fn transition(
        &self,
        job: &JobRow,
        to: ProcState,
        now: Millis,
        kind: EventKind,
        detail: Value,
    ) -> Result<()> {
        let tx = self.write_tx()?;
        tx.execute(
            "UPDATE export_jobs SET proc_state = ?2, proc_state_at = ?3 WHERE id = ?1",
            params![job.id, to.as_str(), now.0],
        )?;
        journal(
            &tx,
            now,
            Some(&job.id),
            Some(&job.company_id),
            kind,
            &detail,
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Records that a `started` request is about to be sent.
    pub fn begin_claim(&self, job: &JobRow, now: Millis) -> Result<()> {
        let tx = self.write_tx()?;
        tx.execute(
            "UPDATE export_jobs SET proc_state = 'claiming', proc_state_at = ?2, \
             claim_attempts = claim_attempts + 1 WHERE id = ?1",
            params![job.id, now.0],
        )?;
        journal(
            &tx,
            now,
            Some(&job.id),
            Some(&job.company_id),
            EventKind::ClaimSent,
            &json!({"attempt": job.claim_attempts + 1}),
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Records the deadline a warning was journaled for, so it is journaled once.
    pub fn warn_deadline(&self, job: &JobRow, now: Millis) -> Result<()> {
        let tx = self.write_tx()?;
        tx.execute(
            "UPDATE export_jobs SET warned_expires_at = expires_at WHERE id = ?1",
            [&job.id],
        )?;
        journal(
            &tx,
            now,
            Some(&job.id),
            Some(&job.company_id),
            EventKind::DeadlineWarning,
            &json!({"expires_at": job.expires_at.to_rfc3339(), "seconds_left": now.until(job.expires_at) / 1000}),
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Ids of the company's jobs the mirror holds as open (`pending`/`in_progress`) that are not
    /// in `seen`.
    pub fn open_jobs_missing(
        &self,
        company_id: &str,
        seen: &std::collections::HashSet<String>,
    ) -> Result<Vec<String>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id FROM export_jobs WHERE company_id = ?1 AND status IN ('pending', 'in_progress')",
        )?;
        let rows = stmt.query_map([company_id], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for row in rows {
            let id = row?;
            if !seen.contains(&id) {
                out.push(id);
            }
        }
        Ok(out)
    }

    pub fn begin_sync_run(&self, company_id: &str, kind: &str, now: Millis) -> Result<i64> {
        self.conn.execute(
            "INSERT INTO sync_runs (company_id, kind, started_at) VALUES (?1, ?2, ?3)",
            params![company_id, kind, now.0],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    pub fn finish_sync_run(
        &self,
        run_id: i64,
        now: Millis,
        counts: &SyncCounts,
        error: Option<&str>,
    ) -> Result<()> {
        self.conn.execute(
            "UPDATE sync_runs SET finished_at = ?2, pages = ?3, jobs_seen = ?4, jobs_new = ?5, \
             jobs_changed = ?6, jobs_reread = ?7, error = ?8 WHERE id = ?1",
            params![
                run_id,
                now.0,
                counts.pages,
                counts.seen,
                counts.new,
                counts.changed,
                counts.reread,
                error
            ],
        )?;
        Ok(())
    }

    /// The journal, oldest first; for one job when `job_id` is given.
    pub fn events(&self, job_id: Option<&str>) -> Result<Vec<EventRow>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, at, job_id, company_id, kind, detail FROM job_events \
             WHERE ?1 IS NULL OR job_id = ?1 ORDER BY seq",
        )?;
        let rows = stmt.query_map([job_id], |r| {
            let detail: String = r.get(5)?;
            Ok(EventRow {
                seq: r.get(0)?,
                at: Millis(r.get(1)?),
                job_id: r.get(2)?,
                company_id: r.get(3)?,
                kind: r.get(4)?,
                detail: serde_json::from_str(&detail).unwrap_or(Value::Null),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Companies known to the mirror (from jobs and sync runs), sorted.
    pub fn companies(&self) -> Result<Vec<String>> {
        let mut stmt = self.conn.prepare(
            "SELECT company_id FROM export_jobs UNION SELECT company_id FROM sync_runs ORDER BY 1",
        )?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn company_summary(&self, company_id: &str) -> Result<CompanySummary> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT proc_state, count(*) FROM export_jobs WHERE company_id = ?1 GROUP BY proc_state ORDER BY proc_state",
        )?;
        let by_state = stmt
            .query_map([company_id], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let last: Option<(i64, Option<String>)> = self
            .conn
            .query_row(
                "SELECT finished_at, error FROM sync_runs WHERE company_id = ?1 AND finished_at IS NOT NULL \
                 ORDER BY finished_at DESC LIMIT 1",
                [company_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let mut recent = self.conn.prepare_cached(
            "SELECT error IS NOT NULL FROM sync_runs WHERE company_id = ?1 AND finished_at IS NOT NULL \
             ORDER BY finished_at DESC, id DESC LIMIT 100",
        )?;
        let mut failed_in_a_row = 0u32;
        for failed in recent.query_map([company_id], |r| r.get::<_, bool>(0))? {
            if !failed? {
                break;
            }
            failed_in_a_row += 1;
        }
        let next_deadline: Option<(String, i64)> = self
            .conn
            .query_row(
                "SELECT id, expires_at FROM export_jobs WHERE company_id = ?1 \
                 AND proc_state IN ('new', 'resume', 'claiming', 'claimed', 'processing') \
                 ORDER BY expires_at LIMIT 1",
                [company_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(CompanySummary {
            company_id: company_id.to_owned(),
            by_state,
            last_poll_at: last.as_ref().map(|(t, _)| Millis(*t)),
            last_poll_error: last.and_then(|(_, e)| e),
            failed_in_a_row,
            next_deadline: next_deadline.map(|(id, t)| (id, Millis(t))),
        })
    }
}

/// A verified delivery, ready to be committed.
#[derive(Clone, Debug, PartialEq)]
pub struct Delivery {
    pub webhook_id: String,
    pub signed_at: Millis,
    pub event_type: Option<String>,
    pub event_id: Option<String>,
    pub job_id: Option<String>,
    pub company_id: Option<String>,
    pub body: String,
    pub headers: Value,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    New,
    Duplicate,
}

/// An item that failed, or whose report Pleo refused (see [`Store::problem_items`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ProblemItem {
    pub accounting_entry_id: String,
    pub our_status: String,
    pub failure_reason_type: Option<String>,
    pub failure_reason: Option<String>,
    pub report_error: Option<String>,
}

/// A stored webhook delivery whose job has not been read yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingDelivery {
    pub webhook_id: String,
    pub event_type: Option<String>,
    pub job_id: Option<String>,
    /// The company the body names (a hint: it picks the credential to read the job with).
    pub company_id: Option<String>,
    /// Attempts at acting on it that failed transiently so far.
    pub attempts: u32,
}

impl Store {
    /// Commits verified deliveries in one transaction (duplicates of a stored `webhook_id` are
    /// left as they are) with a journal entry for each new one.
    pub fn insert_deliveries(&self, deliveries: &[&Delivery], now: Millis) -> Result<Vec<Stored>> {
        let tx = self.write_tx()?;
        let mut out = Vec::with_capacity(deliveries.len());
        for d in deliveries {
            let n = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO webhook_deliveries (webhook_id, received_at, signed_at, event_type, \
                     event_id, job_id, company_id, body, headers) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )?
                .execute(params![
                    d.webhook_id,
                    now.0,
                    d.signed_at.0,
                    d.event_type,
                    d.event_id,
                    d.job_id,
                    d.company_id,
                    d.body,
                    d.headers.to_string()
                ])?;
            if n == 0 {
                out.push(Stored::Duplicate);
                continue;
            }
            let known = d
                .event_type
                .as_deref()
                .is_some_and(crate::wire::is_job_event);
            let kind = if known && d.job_id.is_some() {
                EventKind::WebhookReceived
            } else {
                EventKind::WebhookIgnored
            };
            journal(
                &tx,
                now,
                d.job_id.as_deref(),
                d.company_id.as_deref(),
                kind,
                &json!({"webhook_id": d.webhook_id, "event_type": d.event_type, "event_id": d.event_id}),
            )?;
            out.push(Stored::New);
        }
        tx.commit()?;
        Ok(out)
    }

    /// Deliveries whose job has not been read yet, oldest first.
    /// Deliveries not acted on yet and due at `now` (oldest first): new ones, and deferred
    /// ones whose `retry_at` has come.
    pub fn pending_deliveries(&self, limit: usize, now: Millis) -> Result<Vec<PendingDelivery>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT webhook_id, event_type, job_id, company_id, attempts FROM webhook_deliveries \
             WHERE processed_at IS NULL AND (retry_at IS NULL OR retry_at <= ?2) \
             ORDER BY received_at, webhook_id LIMIT ?1",
        )?;
        let rows = stmt.query_map(params![limit as i64, now.0], |r| {
            Ok(PendingDelivery {
                webhook_id: r.get(0)?,
                event_type: r.get(1)?,
                job_id: r.get(2)?,
                company_id: r.get(3)?,
                attempts: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// When the earliest deferred delivery falls due (None: none is waiting).
    pub fn next_delivery_retry(&self) -> Result<Option<Millis>> {
        let at: Option<i64> = self.conn.query_row(
            "SELECT MIN(retry_at) FROM webhook_deliveries WHERE processed_at IS NULL AND retry_at IS NOT NULL",
            [],
            |r| r.get(0),
        )?;
        Ok(at.map(Millis))
    }

    /// Defers deliveries whose action failed transiently: one more attempt counted, due again
    /// at `retry_at`, `outcome` saying what this attempt met (they stay unprocessed).
    pub fn defer_deliveries(&self, deferred: &[(String, String, Millis)]) -> Result<()> {
        let tx = self.write_tx()?;
        for (id, outcome, retry_at) in deferred {
            tx.prepare_cached(
                "UPDATE webhook_deliveries SET attempts = attempts + 1, retry_at = ?2, outcome = ?3 \
                 WHERE webhook_id = ?1 AND processed_at IS NULL",
            )?
            .execute(params![id, retry_at.0, outcome])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Records the process running the service on this database.
    pub fn register_instance(&self, pid: u32, now: Millis) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO service_instances (pid, started_at, version) VALUES (?1, ?2, ?3)",
            params![pid, now.0, env!("CARGO_PKG_VERSION")],
        )?;
        Ok(())
    }

    pub fn unregister_instance(&self, pid: u32) -> Result<()> {
        self.conn
            .execute("DELETE FROM service_instances WHERE pid = ?1", [pid])?;
        Ok(())
    }

    /// Pids recorded as running the service, newest first.
    pub fn instances(&self) -> Result<Vec<u32>> {
        let mut stmt = self
            .conn
            .prepare("SELECT pid FROM service_instances ORDER BY started_at DESC")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

/// The pick query. Kept as a constant so tests can `EXPLAIN QUERY PLAN` the exact text.
pub const PICK_SQL: &str = "SELECT id, company_id, status, created_at, last_updated_at, expires_at, \
     number_of_items, proc_state, claim_attempts, warned_expires_at FROM export_jobs \
     WHERE company_id = ?1 AND status = 'pending' AND proc_state = 'new' \
     ORDER BY created_at, created_at_sub_ns, id LIMIT 1";

fn journal(
    conn: &Connection,
    now: Millis,
    job_id: Option<&str>,
    company_id: Option<&str>,
    kind: EventKind,
    detail: &Value,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO job_events (at, job_id, company_id, kind, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        now.0,
        job_id,
        company_id,
        kind.as_str(),
        detail.to_string()
    ])?;
    Ok(())
}

/// The proc_state a job's new Pleo status moves it to, and what to journal; `None` keeps it.
fn next_state(
    prev: Option<ProcState>,
    job: &Job,
    source: Source,
) -> Option<(ProcState, Option<EventKind>)> {
    if status::is_terminal(&job.status) {
        let expired = job.failure_reason_type.as_deref() == Some("job_expired");
        let to = if expired {
            ProcState::Expired
        } else {
            ProcState::Done
        };
        return match prev {
            Some(p) if p.is_final() => None,
            _ => Some((
                to,
                Some(if expired {
                    EventKind::Expired
                } else {
                    EventKind::Finished
                }),
            )),
        };
    }
    match (job.status.as_str(), prev) {
        (status::PENDING, None) => Some((ProcState::New, None)),
        (status::IN_PROGRESS, None | Some(ProcState::New) | Some(ProcState::TooLate)) => {
            // Found by a recovery pass: an interrupted workflow of ours (a lost database, or a
            // backup older than the claim), resumed without `started`. Seen taken while we
            // ran: someone else's. A job recorded as someone else's (`conflict`) stays theirs.
            if source == Source::Recovery {
                Some((ProcState::Resume, None))
            } else {
                Some((ProcState::Conflict, Some(EventKind::ClaimedElsewhere)))
            }
        }
        (_, None) => Some((ProcState::New, None)),
        _ => None,
    }
}

fn upsert_one(conn: &Connection, job: &Job, now: Millis, source: Source) -> Result<Upsert> {
    let raw = job.raw.to_string();
    let company = Some(job.company_id.as_str());
    // Most jobs a listing brings are either new or unchanged: try the insert first, so a new
    // job costs no lookup.
    let if_new = next_state(None, job, source);
    let inserted = conn
        .prepare_cached(
            "INSERT INTO export_jobs (id, company_id, status, created_at, last_updated_at, expires_in, \
             expires_at, number_of_items, raw_json, first_seen_at, last_seen_at, proc_state, proc_state_at, \
             created_at_sub_ns) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10, ?11, ?10, ?12) ON CONFLICT (id) DO NOTHING",
        )?
        .execute(params![
            job.id,
            job.company_id,
            job.status,
            job.created_at.0,
            job.last_updated_at.map(|m| m.0),
            job.expires_in_secs,
            job.expires_at().0,
            job.number_of_items,
            raw,
            now.0,
            if_new.map_or(ProcState::New, |(s, _)| s).as_str(),
            job.created_at_sub_ns,
        ])?;
    if inserted == 1 {
        journal(
            conn,
            now,
            Some(&job.id),
            company,
            EventKind::Detected,
            &json!({"status": job.status, "source": source.as_str(),
                    "created_at": job.created_at.to_rfc3339(),
                    "expires_at": job.expires_at().to_rfc3339()}),
        )?;
        if let Some((_, Some(kind))) = if_new {
            let mut detail = json!({"status": job.status, "source": source.as_str()});
            if let Some(t) = &job.failure_reason_type {
                detail["failure_reason_type"] = json!(t);
            }
            journal(conn, now, Some(&job.id), company, kind, &detail)?;
        }
        return Ok(Upsert::New);
    }
    let prev: Option<(String, String, String, Option<i64>)> = conn
        .prepare_cached(
            "SELECT status, proc_state, raw_json, last_updated_at FROM export_jobs WHERE id = ?1",
        )?
        .query_row([&job.id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .optional()?;
    // Keep the newest observation: every change of a job at Pleo moves its `lastUpdatedAt`,
    // so an answer with an older one (a slow listing that began before our `started`) is
    // older news and changes nothing.
    if let Some((_, _, _, Some(stored))) = &prev
        && job.last_updated_at.is_none_or(|t| t.0 < *stored)
    {
        return Ok(Upsert::Unchanged);
    }
    let prev = prev.map(|(a, b, c, _)| (a, b, c));
    let prev_state = prev.as_ref().and_then(|(_, p, _)| ProcState::parse(p));
    let next = next_state(prev_state, job, source);
    let outcome = match &prev {
        // The insert above found the row, so it exists (jobmirror never deletes jobs).
        None => return Err(StoreError::Sql(rusqlite::Error::QueryReturnedNoRows)),
        Some((prev_status, _, prev_raw)) => {
            conn.prepare_cached(
                "UPDATE export_jobs SET status = ?2, last_updated_at = ?3, expires_in = ?4, expires_at = ?5, \
                 number_of_items = ?6, raw_json = ?7, last_seen_at = ?8 WHERE id = ?1",
            )?
            .execute(params![
                job.id,
                job.status,
                job.last_updated_at.map(|m| m.0),
                job.expires_in_secs,
                job.expires_at().0,
                job.number_of_items,
                raw,
                now.0,
            ])?;
            if *prev_status != job.status {
                journal(
                    conn,
                    now,
                    Some(&job.id),
                    company,
                    EventKind::StatusChanged,
                    &json!({"from": prev_status, "to": job.status, "source": source.as_str()}),
                )?;
            }
            if *prev_raw == raw {
                Upsert::Unchanged
            } else {
                Upsert::Changed
            }
        }
    };
    if let Some((state, event)) = next {
        if prev_state != Some(state) {
            conn.prepare_cached(
                "UPDATE export_jobs SET proc_state = ?2, proc_state_at = ?3 WHERE id = ?1",
            )?
            .execute(params![job.id, state.as_str(), now.0])?;
        }
        if let Some(kind) = event {
            let mut detail = json!({"status": job.status, "source": source.as_str()});
            if let Some(t) = &job.failure_reason_type {
                detail["failure_reason_type"] = json!(t);
            }
            journal(conn, now, Some(&job.id), company, kind, &detail)?;
        }
    }
    Ok(outcome)
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

/// A handler's result for one item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ItemResult {
    pub accounting_entry_id: String,
    pub successful: bool,
    pub external_id: Option<String>,
    pub external_url: Option<String>,
    pub failure_reason: Option<String>,
    pub failure_reason_type: Option<String>,
}

/// A recorded result waiting to be reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnreportedItem {
    pub result: ItemResult,
    pub handled_at: Millis,
    pub report_attempts: i64,
}

/// Item totals of one job, by our status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ItemCounts {
    pub todo: i64,
    pub successful: i64,
    pub failed: i64,
    pub unreported: i64,
}

impl Store {
    /// Records the job's items as Pleo lists them. An item Pleo already shows finished counts as
    /// reported (a batch whose answer was lost may have landed: it is never sent twice), and
    /// takes Pleo's outcome if we had none.
    pub fn sync_job_items(
        &self,
        job_id: &str,
        items: &[(String, String, Option<String>)],
        now: Millis,
    ) -> Result<()> {
        let tx = self.write_tx()?;
        for (entry, pleo_status, reconciliation) in items {
            let done = matches!(pleo_status.as_str(), "successful" | "failed" | "abandoned");
            let ours = match pleo_status.as_str() {
                "successful" => "successful",
                "failed" | "abandoned" => "failed",
                _ => "todo",
            };
            tx.prepare_cached(
                "INSERT INTO job_items (job_id, accounting_entry_id, pleo_status, our_status, reconciliation_id, handled_at, reported_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6) \
                 ON CONFLICT (job_id, accounting_entry_id) DO UPDATE SET pleo_status = excluded.pleo_status, \
                 our_status = CASE WHEN job_items.our_status = 'todo' THEN excluded.our_status ELSE job_items.our_status END, \
                 handled_at = coalesce(job_items.handled_at, excluded.handled_at), \
                 reported_at = coalesce(job_items.reported_at, excluded.reported_at), \
                 reconciliation_id = coalesce(excluded.reconciliation_id, job_items.reconciliation_id)",
            )?
            .execute(params![job_id, entry, pleo_status, ours, reconciliation, if done { Some(now.0) } else { None }])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Items still to be given to the handler: open at Pleo and without a recorded result.
    /// The handler's budget used for `job_id` so far: (milliseconds of handler runs, runs that
    /// ended with items unanswered). Both survive restarts.
    pub fn handler_budget(&self, job_id: &str) -> Result<(i64, u32)> {
        let found = self
            .conn
            .prepare_cached(
                "SELECT handler_ms, handler_failed_runs FROM export_jobs WHERE id = ?1",
            )?
            .query_row([job_id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        Ok(found.unwrap_or((0, 0)))
    }

    /// Adds `ms` of handler time (and `failed_run` to the failed runs) to `job_id`'s budget.
    pub fn add_handler_budget(&self, job_id: &str, ms: i64, failed_run: bool) -> Result<()> {
        self.conn
            .prepare_cached(
                "UPDATE export_jobs SET handler_ms = handler_ms + ?2, \
                 handler_failed_runs = handler_failed_runs + ?3 WHERE id = ?1",
            )?
            .execute(rusqlite::params![job_id, ms.max(0), i64::from(failed_run)])?;
        Ok(())
    }

    pub fn todo_items(&self, job_id: &str) -> Result<std::collections::HashSet<String>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT accounting_entry_id FROM job_items WHERE job_id = ?1 AND our_status = 'todo' \
             AND pleo_status IN ('pending', 'in_progress')",
        )?;
        let rows = stmt.query_map([job_id], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Commits results in one transaction. A result never replaces one already recorded.
    /// Returns the entries that were recorded now.
    pub fn record_results(
        &self,
        job_id: &str,
        results: &[ItemResult],
        now: Millis,
    ) -> Result<Vec<String>> {
        let tx = self.write_tx()?;
        let mut recorded = Vec::new();
        for r in results {
            let n = tx
                .prepare_cached(
                    "UPDATE job_items SET our_status = ?3, external_id = ?4, external_url = ?5, failure_reason = ?6, \
                     failure_reason_type = ?7, handled_at = ?8 \
                     WHERE job_id = ?1 AND accounting_entry_id = ?2 AND our_status = 'todo'",
                )?
                .execute(params![
                    job_id,
                    r.accounting_entry_id,
                    if r.successful { "successful" } else { "failed" },
                    r.external_id,
                    r.external_url,
                    r.failure_reason,
                    r.failure_reason_type,
                    now.0
                ])?;
            if n == 1 {
                recorded.push(r.accounting_entry_id.clone());
            }
        }
        tx.commit()?;
        Ok(recorded)
    }

    /// Recorded results not yet acknowledged by Pleo, oldest first.
    pub fn unreported_items(&self, job_id: &str, limit: usize) -> Result<Vec<UnreportedItem>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT accounting_entry_id, our_status, external_id, external_url, failure_reason, failure_reason_type, \
             handled_at, report_attempts FROM job_items \
             WHERE job_id = ?1 AND handled_at IS NOT NULL AND reported_at IS NULL \
             ORDER BY handled_at, accounting_entry_id LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![job_id, limit as i64], |r| {
            Ok(UnreportedItem {
                result: ItemResult {
                    accounting_entry_id: r.get(0)?,
                    successful: r.get::<_, String>(1)? == "successful",
                    external_id: r.get(2)?,
                    external_url: r.get(3)?,
                    failure_reason: r.get(4)?,
                    failure_reason_type: r.get(5)?,
                },
                handled_at: Millis(r.get(6)?),
                report_attempts: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Pleo acknowledged these items with the given status.
    pub fn mark_reported(
        &self,
        job_id: &str,
        acknowledged: &[(String, String)],
        now: Millis,
    ) -> Result<()> {
        let tx = self.write_tx()?;
        for (entry, status) in acknowledged {
            tx.prepare_cached(
                "UPDATE job_items SET reported_at = ?3, pleo_status = ?4, report_error = NULL, \
                 report_attempts = report_attempts + 1 WHERE job_id = ?1 AND accounting_entry_id = ?2",
            )?
            .execute(params![job_id, entry, now.0, status])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Pleo refused this item's update; after `give_up` it is not sent again.
    pub fn mark_report_error(
        &self,
        job_id: &str,
        entry: &str,
        error: &str,
        give_up: bool,
        now: Millis,
    ) -> Result<()> {
        self.conn.execute(
            "UPDATE job_items SET report_attempts = report_attempts + 1, report_error = ?3, \
             reported_at = CASE WHEN ?4 THEN ?5 ELSE reported_at END WHERE job_id = ?1 AND accounting_entry_id = ?2",
            params![job_id, entry, error, give_up, now.0],
        )?;
        Ok(())
    }

    /// Items without a result are failed with this reason (they count as handled).
    pub fn fail_open_items(
        &self,
        job_id: &str,
        failure_type: &str,
        reason: &str,
        now: Millis,
    ) -> Result<usize> {
        Ok(self.conn.execute(
            "UPDATE job_items SET our_status = 'failed', failure_reason_type = ?2, failure_reason = ?3, handled_at = ?4 \
             WHERE job_id = ?1 AND our_status = 'todo'",
            params![job_id, failure_type, reason, now.0],
        )?)
    }

    pub fn item_counts(&self, job_id: &str) -> Result<ItemCounts> {
        Ok(self.conn.query_row(
            "SELECT coalesce(sum(our_status = 'todo'), 0), coalesce(sum(our_status = 'successful'), 0), \
             coalesce(sum(our_status = 'failed'), 0), \
             coalesce(sum(handled_at IS NOT NULL AND reported_at IS NULL), 0) FROM job_items WHERE job_id = ?1",
            [job_id],
            |r| Ok(ItemCounts { todo: r.get(0)?, successful: r.get(1)?, failed: r.get(2)?, unreported: r.get(3)? }),
        )?)
    }

    /// A job's items that failed, or whose report Pleo refused, oldest result first: what an
    /// operator asks "why did it fail?" for.
    pub fn problem_items(&self, job_id: &str) -> Result<Vec<ProblemItem>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT accounting_entry_id, our_status, failure_reason_type, failure_reason, report_error \
             FROM job_items WHERE job_id = ?1 AND (our_status = 'failed' OR report_error IS NOT NULL) \
             ORDER BY handled_at, accounting_entry_id",
        )?;
        let rows = stmt.query_map([job_id], |r| {
            Ok(ProblemItem {
                accounting_entry_id: r.get(0)?,
                our_status: r.get(1)?,
                failure_reason_type: r.get(2)?,
                failure_reason: r.get(3)?,
                report_error: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The most common failure of a job's failed items, for the job's own failure reason.
    pub fn first_item_failure(
        &self,
        job_id: &str,
    ) -> Result<Option<(Option<String>, Option<String>)>> {
        Ok(self
            .conn
            .query_row(
                "SELECT failure_reason_type, failure_reason FROM job_items WHERE job_id = ?1 AND our_status = 'failed' \
                 GROUP BY failure_reason_type ORDER BY count(*) DESC, failure_reason_type LIMIT 1",
                [job_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }
}

/// Retention for `jobmirror prune`, in days.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Items and raw JSON of jobs finished (done, expired, conflict, too late) this long ago.
    pub jobs_days: u32,
    /// Bodies and headers of handled webhook deliveries.
    pub webhook_bodies_days: u32,
    /// Whole delivery rows (their ids deduplicate retries: at least 4 days).
    pub webhook_ids_days: u32,
    pub sync_runs_days: u32,
}

/// What a prune removed (or would remove, in a dry run).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PruneReport {
    pub jobs_trimmed: usize,
    pub job_items_deleted: usize,
    pub webhook_bodies_cleared: usize,
    pub webhook_rows_deleted: usize,
    pub sync_runs_deleted: usize,
    pub dry_run: bool,
}

/// Health figures for `jobmirror doctor`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveryBacklog {
    pub unprocessed: i64,
    pub oldest_unprocessed: Option<Millis>,
    pub last_received: Option<Millis>,
}

const DAY_MS: i64 = 86_400_000;

/// Operator queries: read-only reports, the online backup and retention.
impl Store {
    /// Jobs, optionally of one company and/or in one state, in pick order per company.
    pub fn list_jobs(
        &self,
        company: Option<&str>,
        state: Option<&str>,
        limit: usize,
    ) -> Result<Vec<JobRow>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {JOB_COLUMNS} FROM export_jobs WHERE (?1 IS NULL OR company_id = ?1) \
             AND (?2 IS NULL OR proc_state = ?2) ORDER BY company_id, created_at, created_at_sub_ns, id LIMIT ?3"
        ))?;
        let rows = stmt.query_map(
            params![company, state, i64::try_from(limit).unwrap_or(i64::MAX)],
            job_row,
        )?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The newest webhook delivery naming the company.
    pub fn last_webhook_at(&self, company: &str) -> Result<Option<Millis>> {
        let t: Option<i64> = self.conn.query_row(
            "SELECT max(received_at) FROM webhook_deliveries WHERE company_id = ?1",
            [company],
            |r| r.get(0),
        )?;
        Ok(t.map(Millis))
    }

    /// Claimable jobs of the company that come before `job` in pick order.
    pub fn jobs_ahead(&self, job: &JobRow) -> Result<Vec<String>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT o.id FROM export_jobs o JOIN export_jobs j ON j.id = ?2 \
             WHERE o.company_id = ?1 AND o.status = 'pending' AND o.proc_state = 'new' \
             AND (o.created_at, o.created_at_sub_ns, o.id) < (j.created_at, j.created_at_sub_ns, j.id) \
             ORDER BY o.created_at, o.created_at_sub_ns, o.id",
        )?;
        let rows = stmt.query_map(params![job.company_id, job.id], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Moves everything in the WAL into the main file and empties the WAL
    /// (`wal_checkpoint(TRUNCATE)`), so the `.db` file alone holds every row.
    pub fn checkpoint(&self) -> Result<()> {
        let busy: i64 = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
        if busy != 0 {
            log::warn!("checkpoint could not finish: another connection is reading");
        }
        Ok(())
    }

    /// `PRAGMA quick_check`: `["ok"]` when the file is sound.
    pub fn quick_check(&self) -> Result<Vec<String>> {
        let mut stmt = self.conn.prepare("PRAGMA quick_check")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn delivery_backlog(&self) -> Result<DeliveryBacklog> {
        Ok(self.conn.query_row(
            "SELECT (SELECT count(*) FROM webhook_deliveries WHERE processed_at IS NULL), \
             (SELECT min(received_at) FROM webhook_deliveries WHERE processed_at IS NULL), \
             (SELECT max(received_at) FROM webhook_deliveries)",
            [],
            |r| {
                Ok(DeliveryBacklog {
                    unprocessed: r.get(0)?,
                    oldest_unprocessed: r.get::<_, Option<i64>>(1)?.map(Millis),
                    last_received: r.get::<_, Option<i64>>(2)?.map(Millis),
                })
            },
        )?)
    }

    /// Jobs held now (`resume`, `claiming`, `claimed`, `processing`), soonest deadline first.
    pub fn in_flight(&self) -> Result<Vec<JobRow>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {JOB_COLUMNS} FROM export_jobs \
             WHERE proc_state IN ('resume', 'claiming', 'claimed', 'processing') ORDER BY expires_at"
        ))?;
        let rows = stmt.query_map([], job_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Journal entries by kind (for metrics: the journal is append-only, so these only grow).
    pub fn event_counts(&self) -> Result<Vec<(String, i64)>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT kind, count(*) FROM job_events GROUP BY kind ORDER BY kind")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Final events sent, by event (`completed`, `completed_with_errors`, `failed`).
    pub fn finish_counts(&self) -> Result<Vec<(String, i64)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT json_extract(detail, '$.event'), count(*) FROM job_events \
             WHERE kind = 'finish_sent' GROUP BY 1 ORDER BY 1",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, Option<String>>(0)?.unwrap_or_default(),
                r.get(1)?,
            ))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// When a listing pass last succeeded, over all companies (None: never).
    pub fn last_successful_poll(&self) -> Result<Option<Millis>> {
        let at: Option<i64> = self.conn.query_row(
            "SELECT max(finished_at) FROM sync_runs WHERE error IS NULL AND finished_at IS NOT NULL",
            [],
            |r| r.get(0),
        )?;
        Ok(at.map(Millis))
    }

    /// Jobs by processing state, over all companies.
    pub fn state_counts(&self) -> Result<Vec<(String, i64)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT proc_state, count(*) FROM export_jobs GROUP BY proc_state ORDER BY proc_state",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Copies the database to `dest` with SQLite's online backup (a consistent copy while the
    /// service keeps writing), then makes it durable.
    pub fn backup_to(&self, dest: &Path) -> Result<()> {
        let mut target = Connection::open(dest).map_err(|source| StoreError::Open {
            path: dest.display().to_string(),
            source,
        })?;
        {
            let b = rusqlite::backup::Backup::new(&self.conn, &mut target)?;
            b.run_to_completion(256, std::time::Duration::from_millis(5), None)?;
        }
        target.execute_batch("PRAGMA journal_mode = DELETE")?;
        drop(target);
        std::fs::File::open(dest)
            .and_then(|f| f.sync_all())
            .map_err(|source| StoreError::Io {
                path: dest.display().to_string(),
                source,
            })?;
        Ok(())
    }

    /// Removes details past their retention, in one transaction, and journals what it did.
    /// The journal itself is never pruned (it is append-only).
    /// Removes what is past its retention as of `now` (the report time, `--at`). A prune that
    /// removed anything is journaled `pruned` at `recorded_at` (the real time: the journal
    /// is in the order things happened, so a `--at` in the future never dates an entry);
    /// one that removed nothing leaves no entry.
    pub fn prune(
        &self,
        now: Millis,
        recorded_at: Millis,
        keep: Retention,
        dry_run: bool,
    ) -> Result<PruneReport> {
        let before = |days: u32| now.0 - i64::from(days) * DAY_MS;
        let tx = self.write_tx()?;
        let old_jobs = "SELECT id FROM export_jobs WHERE proc_state IN ('done', 'expired', 'conflict', 'too_late') \
             AND status NOT IN ('pending', 'in_progress') AND proc_state_at < ?1";
        // Each change counts the rows it touched; a dry run makes them all and rolls back.
        let mut r = PruneReport {
            dry_run,
            ..PruneReport::default()
        };
        let cut_jobs = [before(keep.jobs_days)];
        r.job_items_deleted = tx.execute(
            &format!("DELETE FROM job_items WHERE job_id IN ({old_jobs})"),
            cut_jobs,
        )?;
        r.jobs_trimmed = tx.execute(
            &format!(
                "UPDATE export_jobs SET raw_json = '{{}}' WHERE id IN ({old_jobs}) AND raw_json <> '{{}}'"
            ),
            cut_jobs,
        )?;
        r.webhook_bodies_cleared = tx.execute(
            "UPDATE webhook_deliveries SET body = '', headers = '{}' \
             WHERE processed_at IS NOT NULL AND received_at < ?1 AND body <> ''",
            [before(keep.webhook_bodies_days)],
        )?;
        r.webhook_rows_deleted = tx.execute(
            "DELETE FROM webhook_deliveries WHERE processed_at IS NOT NULL AND received_at < ?1",
            [before(keep.webhook_ids_days.max(4))],
        )?;
        r.sync_runs_deleted = tx.execute(
            "DELETE FROM sync_runs WHERE started_at < ?1 AND finished_at IS NOT NULL",
            [before(keep.sync_runs_days)],
        )?;
        let removed = r.jobs_trimmed
            + r.job_items_deleted
            + r.webhook_bodies_cleared
            + r.webhook_rows_deleted
            + r.sync_runs_deleted;
        if dry_run || removed == 0 {
            tx.rollback()?;
            return Ok(r);
        }
        journal(
            &tx,
            recorded_at,
            None,
            None,
            EventKind::Pruned,
            &serde_json::to_value(&r).unwrap_or_default(),
        )?;
        tx.commit()?;
        Ok(r)
    }
}

/// A stored OAuth token pair.
#[derive(Clone, Debug)]
pub struct TokenRow {
    pub access_token: Option<crate::wire::Secret>,
    pub access_expires_at: Option<Millis>,
    pub refresh_token: crate::wire::Secret,
    pub refresh_started_at: Option<Millis>,
}

/// OAuth token storage (see `oauth`).
impl Store {
    pub fn oauth_get(&self, credential: &str) -> Result<Option<TokenRow>> {
        Ok(self
            .conn
            .query_row(
                "SELECT access_token, access_expires_at, refresh_token, refresh_started_at \
                 FROM oauth_tokens WHERE credential = ?1",
                [credential],
                |r| {
                    Ok(TokenRow {
                        access_token: r.get::<_, Option<String>>(0)?.map(crate::wire::Secret::new),
                        access_expires_at: r.get::<_, Option<i64>>(1)?.map(Millis),
                        refresh_token: crate::wire::Secret::new(r.get::<_, String>(2)?),
                        refresh_started_at: r.get::<_, Option<i64>>(3)?.map(Millis),
                    })
                },
            )
            .optional()?)
    }

    /// Stores a refresh token given by the operator (a first one, or after re-authorizing).
    pub fn oauth_seed(&self, credential: &str, refresh_token: &str, now: Millis) -> Result<()> {
        let tx = self.write_tx()?;
        tx.execute(
            "INSERT INTO oauth_tokens (credential, refresh_token, updated_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (credential) DO UPDATE SET refresh_token = excluded.refresh_token, \
             access_token = NULL, access_expires_at = NULL, refresh_started_at = NULL, \
             last_error = NULL, updated_at = excluded.updated_at",
            params![credential, refresh_token, now.0],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Records, durably, that a refresh request is about to be sent.
    pub fn oauth_begin_refresh(&self, credential: &str, now: Millis) -> Result<()> {
        let tx = self.write_tx()?;
        tx.execute(
            "UPDATE oauth_tokens SET refresh_started_at = ?2 WHERE credential = ?1",
            params![credential, now.0],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Commits a new pair (and clears the refresh mark) in one transaction.
    pub fn oauth_commit(
        &self,
        credential: &str,
        access_token: &str,
        expires_at: Millis,
        refresh_token: &str,
        now: Millis,
    ) -> Result<()> {
        let tx = self.write_tx()?;
        tx.execute(
            "UPDATE oauth_tokens SET access_token = ?2, access_expires_at = ?3, refresh_token = ?4, \
             refresh_started_at = NULL, last_error = NULL, updated_at = ?5 WHERE credential = ?1",
            params![credential, access_token, expires_at.0, refresh_token, now.0],
        )?;
        tx.commit()?;
        Ok(())
    }

    pub fn oauth_error(&self, credential: &str, error: &str, now: Millis) -> Result<()> {
        let tx = self.write_tx()?;
        tx.execute(
            "UPDATE oauth_tokens SET last_error = ?2, updated_at = ?3 WHERE credential = ?1",
            params![credential, error, now.0],
        )?;
        tx.commit()?;
        Ok(())
    }
}
