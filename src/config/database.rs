//! Settings of a database several instances share (`db` as a PostgreSQL URL): the password's
//! file, this instance's name and the company lease. Checked without connecting.

use std::path::PathBuf;

use super::{ConfigError, Shard, err};
use crate::store::pg::{PgTarget, is_postgres_url};

/// The lease settings and the password's file (`db` on PostgreSQL; unused on SQLite).
#[derive(Clone, Debug)]
pub struct SharedDb {
    /// Where `db`'s password is (else `PGPASSWORD`, else none).
    pub password_file: Option<PathBuf>,
    /// This instance's name among those sharing the database (None: host name and pid).
    pub instance_name: Option<String>,
    /// How long a company lease lasts without renewal, seconds.
    pub company_lease_secs: u64,
    /// The running service's leases (set by the service when `db` is PostgreSQL): the stores
    /// it opens are fenced with them, and it serves only the companies held.
    pub fence: Option<std::sync::Arc<crate::store::pg::keeper::LeaseView>>,
}

impl SharedDb {
    /// `db` names a PostgreSQL database.
    pub fn is_postgres(db: &std::path::Path) -> bool {
        db.to_str().is_some_and(is_postgres_url)
    }
}

pub(super) fn parse(
    get: &dyn Fn(&str) -> Option<String>,
    db: &std::path::Path,
    shard: Shard,
) -> Result<SharedDb, ConfigError> {
    let password_file = get("db_password_file")
        .filter(|f| !f.trim().is_empty())
        .map(|f| PathBuf::from(f.trim()));
    let instance_name = get("instance_name").filter(|n| !n.trim().is_empty());
    if let Some(n) = &instance_name
        && (n.len() > 200 || n.chars().any(char::is_control))
    {
        return Err(err(
            "instance_name",
            "at most 200 characters, none of them control characters",
        ));
    }
    let v = get("company_lease_secs").unwrap_or_default();
    let company_lease_secs = match v.trim().parse::<u64>() {
        Ok(n) if (3..=3600).contains(&n) => n,
        _ => {
            return Err(err(
                "company_lease_secs",
                format!("expected whole seconds from 3 to 3600, got {v:?}"),
            ));
        }
    };
    if SharedDb::is_postgres(db) {
        // The URL's form only: the password is read when a command connects.
        PgTarget::parse(&db.to_string_lossy(), None).map_err(|e| err("db", e.to_string()))?;
        if shard != Shard::ALL {
            return Err(err(
                "shard",
                "splits companies between SQLite files; instances sharing a PostgreSQL \
                 database split them by lease: remove shard (docs/several-machines.md)",
            ));
        }
    }
    Ok(SharedDb {
        password_file,
        instance_name,
        company_lease_secs,
        fence: None,
    })
}

/// `n` when it is at most `max`.
pub(super) fn at_most(key: &str, n: u32, max: u32) -> Result<u32, ConfigError> {
    if n > max {
        return Err(err(key, format!("expected at most {max}, got {n}")));
    }
    Ok(n)
}

impl super::Config {
    /// The store `db` names: the SQLite file (created and migrated), or the PostgreSQL
    /// database, fenced with the running service's leases when it has them.
    pub fn open_store(&self) -> anyhow::Result<crate::store::Store> {
        if !SharedDb::is_postgres(&self.db) {
            return Ok(crate::store::Store::open(&self.db)?);
        }
        let file = self.shared_db.password_file.as_deref();
        let password = PgTarget::password(file).map_err(|e| {
            err(
                "db_password_file",
                format!(
                    "cannot read {}: {e}",
                    file.unwrap_or(std::path::Path::new("")).display()
                ),
            )
        })?;
        let target = PgTarget::parse(&self.db.to_string_lossy(), password)?;
        // Connected only: the service migrates when it joins, an operator with `migrate`.
        let mut store = crate::store::Store::connect_pg(&target)?;
        if let Some(view) = &self.shared_db.fence {
            store.set_fence(view.clone());
        }
        Ok(store)
    }
}
