//! The commands on a PostgreSQL `db` shared by several instances: `migrate` and `instances`.

use super::common::{config_value, db_path, say_json};
use crate::config::UsageError;
use crate::store::pg::{PgTarget, is_postgres_url};

/// A setting from the environment (`JOBMIRROR_<KEY>`), else the configuration file.
fn setting(file: Option<&std::path::Path>, key: &str) -> Option<String> {
    std::env::var(format!("JOBMIRROR_{}", key.to_ascii_uppercase()))
        .ok()
        .or_else(|| config_value(file, key))
        .filter(|v| !v.trim().is_empty())
}

/// `db` as a PostgreSQL target when it is a URL (its password from `db_password_file`, else
/// `PGPASSWORD`); None for a SQLite file.
pub(super) fn pg_target(file: Option<&std::path::Path>) -> anyhow::Result<Option<PgTarget>> {
    url_target(&db_path(file)?, file)
}

/// The store a command uses: the SQLite file (created only by `Open::Migrate`), or the
/// PostgreSQL database `db` names (its password as for [`pg_target`], with the configuration
/// file this command resolved).
pub(super) fn open_db(
    db: &std::path::Path,
    how: crate::service::shared::Open,
) -> anyhow::Result<crate::store::Store> {
    use crate::service::shared::Open;
    use crate::store::Store;
    let file = super::common::CONFIG_IN_USE
        .get()
        .and_then(|c| c.as_deref());
    if let Some(target) = url_target(db, file)? {
        return Ok(match how {
            Open::Migrate => Store::open_pg(&target)?,
            Open::Connect | Open::ReadOnly => Store::connect_pg(&target)?,
        });
    }
    Ok(match how {
        Open::Migrate => Store::open(db)?,
        Open::Connect => Store::connect(db)?,
        Open::ReadOnly => Store::open_read_only(db)?,
    })
}

fn url_target(
    db: &std::path::Path,
    file: Option<&std::path::Path>,
) -> anyhow::Result<Option<PgTarget>> {
    let Some(url) = db.to_str().filter(|d| is_postgres_url(d)) else {
        return Ok(None);
    };
    let pw_file = setting(file, "db_password_file").map(|f| std::path::PathBuf::from(f.trim()));
    let password = PgTarget::password(pw_file.as_deref()).map_err(|e| {
        UsageError(format!(
            "db_password_file {}: cannot read it: {e}",
            pw_file
                .as_deref()
                .unwrap_or(std::path::Path::new(""))
                .display()
        ))
    })?;
    Ok(Some(
        PgTarget::parse(url, password).map_err(|e| UsageError(e.to_string()))?,
    ))
}

pub(super) fn migrate(target: &PgTarget, json: bool) -> anyhow::Result<()> {
    let mut store = target.connect()?;
    let applied = store.migrate()?;
    if json {
        say_json(&serde_json::json!({"db": target.to_string(), "applied": applied}))?;
    } else {
        for name in &applied {
            println!("applied {name}");
        }
        println!("database {target} is at the current schema");
    }
    Ok(())
}

/// `company_lease_secs` as the service reads it (30 by default).
pub(super) fn lease_secs(file: Option<&std::path::Path>) -> anyhow::Result<i64> {
    match setting(file, "company_lease_secs") {
        None => Ok(30),
        Some(v) => Ok(v.trim().parse().map_err(|_| {
            UsageError(format!(
                "company_lease_secs: expected whole seconds, got {v:?}"
            ))
        })?),
    }
}

pub(super) fn instances(file: Option<&std::path::Path>, json: bool) -> anyhow::Result<()> {
    let Some(target) = pg_target(file)? else {
        return Err(UsageError(format!(
            "instances share a PostgreSQL db; {} is a SQLite file, served by one instance",
            db_path(file)?.display()
        ))
        .into());
    };
    let lease_secs = lease_secs(file)?;
    let mut store = target.connect()?;
    let migrated = store
        .client()
        .query_one("SELECT to_regclass('company_leases') IS NOT NULL", &[])?
        .get::<_, bool>(0);
    if !migrated {
        return Err(UsageError(format!(
            "{target} has no jobmirror schema: run `jobmirror migrate` first"
        ))
        .into());
    }
    let now = store.db_now()?;
    let rows = store.instances(now)?;
    let unheld = store.unheld(now, lease_secs * 1000)?;
    if json {
        let list: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "name": r.name, "host": r.host, "pid": r.pid, "version": r.version,
                    "alive": r.alive, "stopped": r.stopped, "leases": r.leases,
                    "heartbeat_at": r.heartbeat_at.to_rfc3339(),
                    "heartbeat_age_seconds": (now.0 - r.heartbeat_at.0) / 1000,
                })
            })
            .collect();
        say_json(&serde_json::json!({
            "db": target.to_string(), "now": now.to_rfc3339(),
            "instances": list, "unheld_companies": unheld,
        }))?;
    } else {
        println!("instances on {target} (database clock {now}):");
        if rows.is_empty() {
            println!("  none has run on this database yet");
        }
        for r in &rows {
            let state = match (r.alive, r.stopped) {
                (true, _) => "alive",
                (false, true) => "stopped",
                (false, false) => "lapsed",
            };
            println!(
                "  {:<24} {:<8} host {} pid {} heartbeat {} s ago, {} leases",
                r.name,
                state,
                r.host,
                r.pid,
                (now.0 - r.heartbeat_at.0) / 1000,
                r.leases
            );
        }
        println!("companies no live instance holds: {}", unheld.len());
        for c in unheld.iter().take(20) {
            println!("  {c}");
        }
    }
    if !unheld.is_empty() {
        anyhow::bail!(
            "{} companies have no live holder: their exports wait until an instance takes them",
            unheld.len()
        );
    }
    Ok(())
}
