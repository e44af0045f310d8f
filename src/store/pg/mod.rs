//! The store on PostgreSQL: where `db` is a `postgresql://` URL, several instances share one
//! database and split its companies by lease ([`leases`]).
//!
//! Invariants, as on SQLite: the schema only changes through refinery migrations in
//! `migrations/postgres/` (append-only); `job_events` is append-only (triggers refuse UPDATE,
//! DELETE and TRUNCATE); a lease's change and its journal entries are one transaction (a
//! trigger writes them). No function here reads jobmirror's clock: times are passed in; the
//! lease keeper passes the database server's clock ([`PgStore::db_now`]), one clock for every
//! machine. The password never appears in a message: [`PgTarget`] shows the URL without it.

pub mod keeper;
pub mod leases;

use std::fmt;

use crate::clock::Millis;
use crate::wire::Secret;

mod embedded {
    refinery::embed_migrations!("migrations/postgres");
}

/// Applies the PostgreSQL migrations under a session advisory lock, so instances starting
/// together never run them side by side (refinery takes no lock of its own).
pub(crate) fn migrate_locked(
    client: &mut postgres::Client,
) -> std::result::Result<refinery::Report, String> {
    const MIGRATE_LOCK: i64 = 0x006a_6f62_6d69_726d; // "jobmirm"
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATE_LOCK])
        .map_err(|e| e.to_string())?;
    let report = embedded::migrations::runner()
        .run(client)
        .map_err(|e| e.to_string());
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATE_LOCK])
        .map_err(|e| e.to_string());
    let report = report?;
    unlocked?;
    Ok(report)
}

/// Whether a `db` value names a PostgreSQL database rather than a SQLite file.
pub fn is_postgres_url(db: &str) -> bool {
    let l = db.trim_start().to_ascii_lowercase();
    l.starts_with("postgresql://") || l.starts_with("postgres://")
}

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("db: {0}")]
    Url(String),
    #[error("PostgreSQL {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: postgres::Error,
    },
    #[error("PostgreSQL migration failed: {0}")]
    Migrate(String),
    #[error("PostgreSQL: {0}")]
    Sql(#[from] postgres::Error),
}

pub type Result<T, E = PgError> = std::result::Result<T, E>;

/// A parsed `db` URL (libpq's URL form) and its password, kept apart from what is shown.
#[derive(Clone)]
pub struct PgTarget {
    config: postgres::Config,
    shown: String,
}

impl fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PgTarget({})", self.shown)
    }
}

impl fmt::Display for PgTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl PgTarget {
    /// `url` as libpq reads it (`postgresql://user@host:port/dbname?param=value`). A password
    /// inside the URL is refused: the configuration file is not a secret store, and the URL is
    /// shown in messages. It comes from `password` (`db_password_file`, or `PGPASSWORD` in the
    /// environment, in that order, chosen by the caller).
    pub fn parse(url: &str, password: Option<Secret>) -> Result<PgTarget> {
        let url = url.trim();
        let mut config: postgres::Config = url
            .parse()
            .map_err(|e| PgError::Url(format!("not a PostgreSQL URL ({e})")))?;
        if config.get_password().is_some() {
            return Err(PgError::Url(
                "the URL holds a password: give it in db_password_file (or PGPASSWORD) instead"
                    .into(),
            ));
        }
        if config.get_dbname().is_none() {
            return Err(PgError::Url(
                "the URL names no database (postgresql://user@host:port/dbname)".into(),
            ));
        }
        if config.get_user().is_none() {
            let user = std::env::var("PGUSER")
                .ok()
                .or_else(|| std::env::var("USER").ok())
                .unwrap_or_else(|| "postgres".into());
            config.user(&user);
        }
        if config.get_application_name().is_none() {
            config.application_name("jobmirror");
        }
        if let Some(p) = password {
            config.password(p.expose().trim_end_matches(['\r', '\n']));
        }
        config.connect_timeout(std::time::Duration::from_secs(10));
        Ok(PgTarget {
            config,
            shown: url.to_owned(),
        })
    }

    /// The password for `db`: the file's first line, else `PGPASSWORD`, else none.
    pub fn password(file: Option<&std::path::Path>) -> std::io::Result<Option<Secret>> {
        if let Some(f) = file {
            let text = std::fs::read_to_string(f)?;
            return Ok(Some(Secret::new(
                text.lines().next().unwrap_or("").to_owned(),
            )));
        }
        Ok(std::env::var("PGPASSWORD").ok().map(Secret::new))
    }

    pub fn connect(&self) -> Result<PgStore> {
        let client = self
            .config
            .connect(postgres::NoTls)
            .map_err(|source| PgError::Connect {
                target: self.shown.clone(),
                source,
            })?;
        Ok(PgStore {
            client,
            target: self.clone(),
        })
    }
}

/// One connection to the shared database.
pub struct PgStore {
    client: postgres::Client,
    target: PgTarget,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PgStore({})", self.target)
    }
}

impl PgStore {
    pub fn target(&self) -> &PgTarget {
        &self.target
    }

    /// Applies the migrations not applied yet; returns their names.
    pub fn migrate(&mut self) -> Result<Vec<String>> {
        let report = migrate_locked(&mut self.client).map_err(PgError::Migrate)?;
        Ok(report
            .applied_migrations()
            .iter()
            .map(|m| m.to_string())
            .collect())
    }

    /// The database server's clock: the one clock every instance's leases are read on.
    pub fn db_now(&mut self) -> Result<Millis> {
        let row = self.client.query_one("SELECT jm_now_ms()", &[])?;
        Ok(Millis(row.get(0)))
    }

    /// The connection, for the store's own modules and tests.
    pub fn client(&mut self) -> &mut postgres::Client {
        &mut self.client
    }
}

/// The SQLite store's guard: a PostgreSQL URL is never opened (nor created) as a file name.
pub(crate) fn refuse_url(path: &std::path::Path) -> Result<(), super::StoreError> {
    if path.to_str().is_some_and(is_postgres_url) {
        return Err(super::StoreError::Io {
            path: path.display().to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "a PostgreSQL database serves `jobmirror migrate` and `jobmirror instances` \
                 so far; the service and this command need a SQLite file \
                 (docs/several-machines.md)",
            ),
        });
    }
    Ok(())
}

impl super::Store {
    /// A store on a PostgreSQL database: connects and applies pending migrations. The statements
    /// written against [`super::sql::Db`] run on it; the rest answer
    /// [`super::StoreError::SqliteOnly`] until they are.
    pub fn open_pg(target: &PgTarget) -> Result<super::Store, super::StoreError> {
        let mut store = super::Store::connect_pg(target)?;
        store.migrate()?;
        Ok(store)
    }

    /// As [`super::Store::open_pg`] without applying migrations (the service migrated when it
    /// joined; an operator runs `jobmirror migrate`).
    pub fn connect_pg(target: &PgTarget) -> Result<super::Store, super::StoreError> {
        let client = target
            .config
            .connect(postgres::NoTls)
            .map_err(|e| super::StoreError::Migrate(format!("PostgreSQL {target}: {e}")))?;
        Ok(super::Store {
            db: super::sql::Db::Pg(Box::new(super::sql::PgConn::new(client))),
        })
    }
}

impl super::Store {
    /// Fences this store's state-changing steps with `view`, this instance's leases.
    pub fn set_fence(&mut self, view: std::sync::Arc<keeper::LeaseView>) {
        if let super::sql::Db::Pg(c) = &mut self.db {
            c.fence = Some(view);
        }
    }

    /// The leases this store is fenced with (a PostgreSQL store shared by instances).
    pub fn fence(&self) -> Option<&std::sync::Arc<keeper::LeaseView>> {
        match &self.db {
            super::sql::Db::Pg(c) => c.fence.as_ref(),
            super::sql::Db::Lite(_) => None,
        }
    }

    /// Ok when this instance may act for `company` now: always on SQLite (one service per
    /// file); on a shared PostgreSQL database, when its local deadline has not passed and the
    /// database says the lease is still ours at our epoch. Inside a transaction the lease row
    /// stays share-locked until it ends, so no takeover lands between the check and the
    /// commit of what it guards.
    pub fn guard(&self, company: &str) -> Result<(), super::StoreError> {
        let Some(view) = self.fence() else {
            return Ok(());
        };
        let lost = || super::StoreError::LeaseLost(company.to_owned());
        let epoch = view.may_act(company).ok_or_else(lost)?;
        let held: Option<i64> = self.db.value(
            "SELECT 1 FROM company_leases WHERE company_id = ?1 AND holder = ?2 AND epoch = ?3 \
             AND expires_at > jm_now_ms() FOR SHARE",
            &[&company, &view.instance, &epoch],
        )?;
        held.map(|_| ()).ok_or_else(lost)
    }
}

/// A step for a job that changes something at Pleo or hands items to a handler: on a shared
/// database each is recorded in `fenced_steps` under the lease before it is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// `started` is about to be sent.
    Claim,
    /// The handler is about to be given items.
    Run,
    /// A batch of item results is about to be reported.
    Report,
    /// A final event (`completed`, `completed_with_errors`, `failed`) is about to be sent.
    Finish,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Claim => "claim",
            Step::Run => "run",
            Step::Report => "report",
            Step::Finish => "finish",
        }
    }
}

impl super::Store {
    /// Ok when this instance may take `step` for `job_id` of `company` now, recorded. Always Ok
    /// on SQLite (one service per file). On a shared PostgreSQL database: when its local
    /// deadline has not passed and a row in `fenced_steps` naming this instance and its epoch
    /// committed; the database refuses that row unless the lease is still ours at that epoch,
    /// unexpired on its clock (`LeaseLost` then, and nothing is recorded).
    pub fn fenced_step(
        &self,
        company: &str,
        job_id: &str,
        step: Step,
        detail: &serde_json::Value,
    ) -> Result<(), super::StoreError> {
        if self.fence().is_none() {
            return Ok(());
        }
        let tx = self.db.write_tx()?;
        self.record_step(company, job_id, step, detail)?;
        tx.commit()
    }

    /// [`Self::fenced_step`] inside the caller's transaction (the claim records its step with
    /// its state change).
    pub(crate) fn record_step(
        &self,
        company: &str,
        job_id: &str,
        step: Step,
        detail: &serde_json::Value,
    ) -> Result<(), super::StoreError> {
        let Some(view) = self.fence() else {
            return Ok(());
        };
        let lost = || super::StoreError::LeaseLost(company.to_owned());
        let epoch = view.may_act(company).ok_or_else(lost)?;
        let recorded = self.db.exec(
            "INSERT INTO fenced_steps (company_id, job_id, step, holder, epoch, detail) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            &[
                &company,
                &job_id,
                &step.as_str(),
                &view.instance,
                &epoch,
                &detail.to_string(),
            ],
        );
        match recorded {
            Err(super::StoreError::Pg(e)) if e.code().map(|c| c.code()) == Some(LEASE_LOST) => {
                Err(lost())
            }
            other => other.map(|_| ()),
        }
    }
}

/// The SQLSTATE `fenced_steps` refuses a step with when the lease is not the instance's.
pub const LEASE_LOST: &str = "JM001";

/// The instances sharing a database and the companies none holds, as operators read them.
#[derive(Clone, Debug)]
pub struct SharedReport {
    /// The database server's clock.
    pub now: crate::clock::Millis,
    pub instances: Vec<leases::InstanceRow>,
    pub unheld: Vec<String>,
    /// This process's instance, when it is the service.
    pub me: Option<String>,
}

impl super::Store {
    /// On a PostgreSQL database: its instances and the companies without a live holder (with
    /// leases of `lease_ms`). None on SQLite, or before `migrate` made the lease tables.
    pub fn shared_report(&self, lease_ms: i64) -> Result<Option<SharedReport>, super::StoreError> {
        let super::sql::Db::Pg(c) = &self.db else {
            return Ok(None);
        };
        let mut client = c.client();
        let migrated: bool = client
            .query_one("SELECT to_regclass('company_leases') IS NOT NULL", &[])?
            .get(0);
        if !migrated {
            return Ok(None);
        }
        let now = crate::clock::Millis(client.query_one("SELECT jm_now_ms()", &[])?.get(0));
        let map = |e: PgError| match e {
            PgError::Sql(e) => super::StoreError::Pg(e),
            other => super::StoreError::Migrate(other.to_string()),
        };
        Ok(Some(SharedReport {
            now,
            instances: leases::instances_on(&mut client, now).map_err(map)?,
            unheld: leases::unheld_on(&mut client, now, lease_ms).map_err(map)?,
            me: c.fence.as_ref().map(|f| f.instance.clone()),
        }))
    }
}
