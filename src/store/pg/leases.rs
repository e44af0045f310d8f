//! Company leases: which live instance serves which company.
//!
//! The rules, each enforced here in one transaction per round (rounds of all instances are
//! serialized by one advisory lock, so two rounds never race on a count):
//! - an instance is alive while its heartbeat is younger than the lease (`instances.expires_at`);
//!   a graceful stop releases all its leases at once ([`PgStore::stop_instance`]);
//! - live instances split the companies fairly: with `n` live instances and `c` companies each
//!   holds at most `ceil(c/n)`, and at most `floor(c/n)` while another live instance holds fewer
//!   than that (it releases the excess so the newcomer gets its share);
//! - a company with a job in hand (`export_jobs.proc_state` active) is never released by its
//!   live holder; it moves when the job is finished or handed back, or when the holder dies;
//! - an expired lease may be taken by any live instance; the database bumps the epoch at every
//!   take (trigger `jm_lease_change` refuses any other change of epoch or holder), and journals
//!   the change in the same transaction;
//! - a state-changing step is fenced: [`fence`] checks, inside the transaction that records the
//!   intent, that the lease is still this holder's at this epoch and unexpired, and keeps the row
//!   locked against a takeover until that transaction ends.

use std::collections::HashSet;

use super::{PgError, PgStore, Result};
use crate::clock::Millis;

/// Serializes lease rounds across instances (`pg_advisory_xact_lock`): "jobmirl" in ASCII.
const ROUND_LOCK: i64 = 0x006a_6f62_6d69_726c;

/// The processing states in which a company's job is in hand (as `ProcState::is_active`).
const IN_HAND: &str = "('resume', 'claiming', 'claimed', 'processing')";

/// This process, as the `instances` table knows it.
#[derive(Clone, Debug)]
pub struct Instance {
    pub name: String,
    pub incarnation: String,
    pub host: String,
    pub pid: i64,
    pub version: String,
    pub started_at: Millis,
}

impl Instance {
    /// `name` or, when empty, the default: host name and pid (`host-1234`).
    pub fn this_process(name: Option<&str>, started_at: Millis) -> Instance {
        let host = host_name();
        let pid = i64::from(std::process::id());
        Instance {
            name: name
                .filter(|n| !n.trim().is_empty())
                .map(|n| n.trim().to_owned())
                .unwrap_or_else(|| format!("{host}-{pid}")),
            incarnation: uuid::Uuid::new_v4().to_string(),
            host,
            pid,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at,
        }
    }
}

/// The machine's host name (`gethostname`), or `localhost` when it has none.
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into the buffer we own.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..end]) {
        Ok(h) if rc == 0 && !h.is_empty() => h.to_owned(),
        _ => "localhost".to_owned(),
    }
}

/// A lease this instance holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub company_id: String,
    pub epoch: i64,
    /// On the database's clock.
    pub expires_at: Millis,
}

/// What one round did.
#[derive(Clone, Debug, Default)]
pub struct Round {
    /// Every lease held after the round (renewed or taken), by company id.
    pub held: Vec<Lease>,
    pub taken: Vec<Lease>,
    pub released: Vec<String>,
    /// Live instances, this one included.
    pub live: usize,
    /// The fair share's bounds: `floor(c/n)` and `ceil(c/n)`.
    pub share: (usize, usize),
}

/// An instance as `status` and `/metrics` show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceRow {
    pub name: String,
    pub host: String,
    pub pid: i64,
    pub version: String,
    pub heartbeat_at: Millis,
    pub alive: bool,
    pub stopped: bool,
    pub leases: i64,
}

/// Why a round could not run.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "instance name {name:?} is in use by pid {pid} on {host} (heartbeat {age_ms} ms ago): \
         wait for its lease to lapse, or give this instance another instance_name"
    )]
    NameInUse {
        name: String,
        host: String,
        pid: i64,
        age_ms: i64,
    },
    #[error(transparent)]
    Pg(#[from] PgError),
}

impl From<postgres::Error> for LeaseError {
    fn from(e: postgres::Error) -> LeaseError {
        LeaseError::Pg(PgError::Sql(e))
    }
}

/// Inside a transaction that records an intent (a claim, a report, a handler run): whether
/// `holder` still holds `company` at `epoch` at `now`. The lease row stays share-locked until the
/// transaction ends, so no other instance can take it between this check and the commit.
pub fn fence(
    tx: &mut postgres::Transaction<'_>,
    company: &str,
    holder: &str,
    epoch: i64,
    now: Millis,
) -> Result<bool> {
    let row = tx.query_opt(
        "SELECT 1 FROM company_leases
          WHERE company_id = $1 AND holder = $2 AND epoch = $3 AND expires_at > $4
          FOR SHARE",
        &[&company, &holder, &epoch, &now.0],
    )?;
    Ok(row.is_some())
}

impl PgStore {
    /// One lease round for `me` at `now` (the database's clock): heartbeat, renew what it holds,
    /// release beyond its fair share (never a company with a job in hand), take free or expired
    /// leases up to its share. `companies` are the companies served (every instance is given the
    /// same list).
    pub fn lease_round(
        &mut self,
        me: &Instance,
        companies: &[String],
        now: Millis,
        lease_ms: i64,
    ) -> std::result::Result<Round, LeaseError> {
        let until = now.0 + lease_ms;
        let mut tx = self.client().transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&ROUND_LOCK])?;
        heartbeat(&mut tx, me, now, until)?;

        let universe: Vec<&str> = companies.iter().map(String::as_str).collect();
        // Every served company has a row, marked wanted (at most once a half lease).
        tx.execute(
            "INSERT INTO company_leases (company_id, wanted_at) SELECT unnest($1::text[]), $2
             ON CONFLICT (company_id) DO UPDATE SET wanted_at = EXCLUDED.wanted_at
              WHERE company_leases.wanted_at < EXCLUDED.wanted_at - $3",
            &[&universe, &now.0, &(lease_ms / 2)],
        )?;
        let mut held: Vec<Lease> = tx
            .query(
                "UPDATE company_leases SET expires_at = $2, changed_at = $3
                  WHERE holder = $1 AND company_id = ANY($4)
                 RETURNING company_id, epoch, expires_at",
                &[&me.name, &until, &now.0, &universe],
            )?
            .iter()
            .map(|r| Lease {
                company_id: r.get(0),
                epoch: r.get(1),
                expires_at: Millis(r.get(2)),
            })
            .collect();
        // Companies no longer served: let go of them (unless a job is in hand).
        let mut released: Vec<String> = tx
            .query(
                &format!(
                    "UPDATE company_leases l SET holder = NULL, changed_at = $2
                      WHERE l.holder = $1 AND NOT (l.company_id = ANY($3))
                        AND NOT EXISTS (SELECT 1 FROM export_jobs j
                                         WHERE j.company_id = l.company_id
                                           AND j.proc_state IN {IN_HAND})
                     RETURNING l.company_id"
                ),
                &[&me.name, &now.0, &universe],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect();

        let live: Vec<(String, i64)> = tx
            .query(
                "SELECT i.name,
                        (SELECT count(*) FROM company_leases l
                          WHERE l.holder = i.name AND l.expires_at > $1
                            AND l.company_id = ANY($2))
                   FROM instances i
                  WHERE i.stopped_at IS NULL AND i.expires_at > $1",
                &[&now.0, &universe],
            )?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let n = live.len().max(1);
        let (lo, hi) = (universe.len() / n, universe.len().div_ceil(n));
        let starving = live
            .iter()
            .any(|(name, count)| *name != me.name && (*count as usize) < lo);
        let cap = if starving { lo } else { hi };

        if held.len() > cap {
            let in_hand: HashSet<String> = tx
                .query(
                    &format!(
                        "SELECT DISTINCT company_id FROM export_jobs
                          WHERE company_id = ANY($1) AND proc_state IN {IN_HAND}"
                    ),
                    &[&held
                        .iter()
                        .map(|l| l.company_id.as_str())
                        .collect::<Vec<_>>()],
                )?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let mut spare: Vec<String> = held
                .iter()
                .filter(|l| !in_hand.contains(&l.company_id))
                .map(|l| l.company_id.clone())
                .collect();
            spare.sort_unstable_by(|a, b| b.cmp(a));
            spare.truncate(held.len() - cap);
            if !spare.is_empty() {
                tx.execute(
                    "UPDATE company_leases SET holder = NULL, changed_at = $2
                      WHERE holder = $1 AND company_id = ANY($3)",
                    &[&me.name, &now.0, &spare],
                )?;
                held.retain(|l| !spare.contains(&l.company_id));
                released.extend(spare);
            }
        }

        let mut taken = Vec::new();
        if held.len() < cap {
            let want = (cap - held.len()) as i64;
            // Companies with a job in hand first: a dead holder's job is the most urgent.
            taken = tx
                .query(
                    &format!(
                        "UPDATE company_leases SET holder = $1, epoch = epoch + 1, acquired_at = $2,
                                expires_at = $3, changed_at = $2
                          WHERE company_id IN (
                                SELECT l.company_id FROM company_leases l
                                 WHERE l.company_id = ANY($4)
                                   AND (l.holder IS NULL OR l.expires_at <= $2)
                                 ORDER BY EXISTS (SELECT 1 FROM export_jobs j
                                                   WHERE j.company_id = l.company_id
                                                     AND j.proc_state IN {IN_HAND}) DESC,
                                          l.company_id
                                 LIMIT $5
                                 FOR UPDATE SKIP LOCKED)
                         RETURNING company_id, epoch, expires_at"
                    ),
                    &[&me.name, &now.0, &until, &universe, &want],
                )?
                .iter()
                .map(|r| Lease {
                    company_id: r.get(0),
                    epoch: r.get(1),
                    expires_at: Millis(r.get(2)),
                })
                .collect();
            held.extend(taken.iter().cloned());
        }
        tx.commit()?;
        held.sort_by(|a, b| a.company_id.cmp(&b.company_id));
        Ok(Round {
            held,
            taken,
            released,
            live: n,
            share: (lo, hi),
        })
    }

    /// A graceful stop: every lease of `me` is released (journaled) and the instance is marked
    /// stopped, in one transaction. Returns how many leases it let go.
    pub fn stop_instance(&mut self, me: &Instance, now: Millis) -> Result<u64> {
        let mut tx = self.client().transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&ROUND_LOCK])?;
        let mine = tx.query_opt(
            "SELECT 1 FROM instances WHERE name = $1 AND incarnation = $2 FOR UPDATE",
            &[&me.name, &me.incarnation],
        )?;
        if mine.is_none() {
            return Ok(0);
        }
        let n = tx.execute(
            "UPDATE company_leases SET holder = NULL, changed_at = $2 WHERE holder = $1",
            &[&me.name, &now.0],
        )?;
        tx.execute(
            "UPDATE instances SET stopped_at = $2, expires_at = $2 WHERE name = $1",
            &[&me.name, &now.0],
        )?;
        tx.commit()?;
        Ok(n)
    }

    /// Every instance that used this database, newest heartbeat first.
    pub fn instances(&mut self, now: Millis) -> Result<Vec<InstanceRow>> {
        instances_on(self.client(), now)
    }

    /// Companies a live instance lists as served (within two leases of `now`) that no live
    /// instance holds: each one's exports have stopped until a holder takes it.
    pub fn unheld(&mut self, now: Millis, lease_ms: i64) -> Result<Vec<String>> {
        unheld_on(self.client(), now, lease_ms)
    }
}

/// [`PgStore::instances`] on any connection.
pub fn instances_on(client: &mut postgres::Client, now: Millis) -> Result<Vec<InstanceRow>> {
    Ok(client
        .query(
            "SELECT i.name, i.host, i.pid, i.version, i.heartbeat_at,
                    i.stopped_at IS NULL AND i.expires_at > $1, i.stopped_at IS NOT NULL,
                    (SELECT count(*) FROM company_leases l
                      WHERE l.holder = i.name AND l.expires_at > $1)
               FROM instances i ORDER BY i.heartbeat_at DESC, i.name",
            &[&now.0],
        )?
        .iter()
        .map(|r| InstanceRow {
            name: r.get(0),
            host: r.get(1),
            pid: r.get(2),
            version: r.get(3),
            heartbeat_at: Millis(r.get(4)),
            alive: r.get(5),
            stopped: r.get(6),
            leases: r.get(7),
        })
        .collect())
}

/// [`PgStore::unheld`] on any connection.
pub fn unheld_on(client: &mut postgres::Client, now: Millis, lease_ms: i64) -> Result<Vec<String>> {
    Ok(client
        .query(
            "SELECT company_id FROM company_leases
              WHERE wanted_at > $1::bigint - 2 * $2::bigint
                AND (holder IS NULL OR expires_at <= $1
                     OR holder NOT IN (SELECT name FROM instances
                                        WHERE stopped_at IS NULL AND expires_at > $1))
              ORDER BY company_id",
            &[&now.0, &lease_ms],
        )?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Records `me`'s heartbeat. A live row under the same name from another incarnation refuses
/// (two processes must never share a name); a dead one's leases are released first, so a
/// restarted process takes them afresh, with new epochs.
fn heartbeat(
    tx: &mut postgres::Transaction<'_>,
    me: &Instance,
    now: Millis,
    until: i64,
) -> std::result::Result<(), LeaseError> {
    let row = tx.query_opt(
        "SELECT incarnation, host, pid, heartbeat_at, expires_at > $2 AND stopped_at IS NULL
           FROM instances WHERE name = $1 FOR UPDATE",
        &[&me.name, &now.0],
    )?;
    match row {
        None => {
            tx.execute(
                "INSERT INTO instances (name, incarnation, host, pid, version, started_at,
                                        heartbeat_at, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &[
                    &me.name,
                    &me.incarnation,
                    &me.host,
                    &me.pid,
                    &me.version,
                    &me.started_at.0,
                    &now.0,
                    &until,
                ],
            )?;
        }
        Some(r) => {
            let incarnation: String = r.get(0);
            let alive: bool = r.get(4);
            if incarnation != me.incarnation {
                if alive {
                    let at: i64 = r.get(3);
                    return Err(LeaseError::NameInUse {
                        name: me.name.clone(),
                        host: r.get(1),
                        pid: r.get(2),
                        age_ms: now.0 - at,
                    });
                }
                tx.execute(
                    "UPDATE company_leases SET holder = NULL, changed_at = $2 WHERE holder = $1",
                    &[&me.name, &now.0],
                )?;
            }
            tx.execute(
                "UPDATE instances SET incarnation = $2, host = $3, pid = $4, version = $5,
                        started_at = CASE WHEN incarnation = $2 THEN started_at ELSE $6 END,
                        heartbeat_at = $7, expires_at = $8, stopped_at = NULL
                  WHERE name = $1",
                &[
                    &me.name,
                    &me.incarnation,
                    &me.host,
                    &me.pid,
                    &me.version,
                    &me.started_at.0,
                    &now.0,
                    &until,
                ],
            )?;
        }
    }
    Ok(())
}
