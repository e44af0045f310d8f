//! Webhook deliveries (committed before they are answered, deferred on a transient failure)
//! and the service instances recorded for `jobmirror trigger`.

use super::*;

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
    /// Not stored: the stored deliveries of its company (`company`), or of all, are at their
    /// bound.
    OverQuota {
        company: bool,
    },
}

/// Bytes of stored deliveries (body and headers) allowed per company and in all: a leaked
/// secret, or a sender gone wild, cannot fill the disk. Pruning frees room; usage is read
/// again from the database every minute (`jobmirror prune` runs in another process).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    pub per_company: u64,
    pub total: u64,
}

impl Quota {
    /// No bound (tests that are about something else).
    pub const NONE: Quota = Quota {
        per_company: u64::MAX,
        total: u64::MAX,
    };
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
    /// On a database shared by instances: its company is one no live instance serves (not
    /// listed by any for two leases), so no holder will act on it; given to one instance (the
    /// first live one by name) to mark.
    pub unwanted: bool,
}

/// On a shared database, the deliveries of companies no live instance lists (none listed it
/// for two leases, `two`) go to the first live instance by name (`me` is this one) to be
/// marked: otherwise nobody would.
fn unwanted(me: &str, two: &str) -> String {
    format!(
        "d.company_id IS NOT NULL \
         AND NOT EXISTS (SELECT 1 FROM company_leases w WHERE w.company_id = d.company_id \
                         AND w.wanted_at > jm_now_ms() - {two}) \
         AND {me} = (SELECT min(name) FROM instances \
                     WHERE stopped_at IS NULL AND expires_at > jm_now_ms())"
    )
}

impl Store {
    /// Marks handled deliveries in one transaction.
    pub fn mark_deliveries(&self, marks: &[(String, String)], now: Millis) -> Result<()> {
        let tx = self.db.write_tx()?;
        for (id, outcome) in marks {
            tx.exec(
                "UPDATE webhook_deliveries SET processed_at = ?2, outcome = ?3 WHERE webhook_id = ?1",
                &[id, &now, outcome],
            )?;
        }
        tx.commit()
    }

    /// Bytes of stored deliveries (body and headers) by company (`""` for none named).
    pub fn delivery_bytes_by_company(&self) -> Result<Vec<(String, u64)>> {
        self.db.rows(
            "SELECT coalesce(company_id, ''), sum(length(body) + length(headers)) \
             FROM webhook_deliveries GROUP BY 1",
            &[],
            |r| Ok((r.get(0)?, r.get::<i64>(1)?.max(0) as u64)),
        )
    }

    /// Whether a delivery with this `webhook-id` is stored.
    pub fn delivery_stored(&self, webhook_id: &str) -> Result<bool> {
        Ok(self
            .db
            .value::<i64>(
                "SELECT 1 FROM webhook_deliveries WHERE webhook_id = ?1",
                &[&webhook_id],
            )?
            .is_some())
    }

    /// Commits verified deliveries in one transaction (duplicates of a stored `webhook_id` are
    /// left as they are) with a journal entry for each new one.
    pub fn insert_deliveries(&self, deliveries: &[&Delivery], now: Millis) -> Result<Vec<Stored>> {
        let tx = self.db.write_tx()?;
        let mut out = Vec::with_capacity(deliveries.len());
        for d in deliveries {
            let n = tx.exec(
                "INSERT OR IGNORE INTO webhook_deliveries (webhook_id, received_at, signed_at, event_type, \
                 event_id, job_id, company_id, body, headers) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                &[
                    &d.webhook_id,
                    &now,
                    &d.signed_at,
                    &d.event_type,
                    &d.event_id,
                    &d.job_id,
                    &d.company_id,
                    &d.body,
                    &d.headers.to_string(),
                ],
            )?;
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
            journal_db(
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

    /// Deliveries not acted on yet and due at `now` (oldest first): new ones, and deferred
    /// ones whose `retry_at` has come.
    /// On a database shared by instances, only those of the companies this instance holds
    /// (and those naming none): the others are their holders' to act on.
    pub fn pending_deliveries(&self, limit: usize, now: Millis) -> Result<Vec<PendingDelivery>> {
        let fence = self.fence().map(|f| (f.instance.as_str(), 2 * f.lease_ms));
        let shared_sql;
        let sql = if fence.is_some() {
            // Received two leases ago at least: a company just added is listed by then.
            let unwanted = format!("{} AND d.received_at <= ?2 - ?4", unwanted("?3", "?4"));
            shared_sql = format!(
                "SELECT webhook_id, event_type, job_id, company_id, attempts, \
                 CAST(CASE WHEN {unwanted} THEN 1 ELSE 0 END AS BIGINT) FROM webhook_deliveries d \
                 WHERE processed_at IS NULL AND (retry_at IS NULL OR retry_at <= ?2) \
                   AND (d.company_id IS NULL OR EXISTS (SELECT 1 FROM company_leases l \
                        WHERE l.company_id = d.company_id AND l.holder = ?3) OR ({unwanted})) \
                 ORDER BY received_at, webhook_id LIMIT ?1"
            );
            shared_sql.as_str()
        } else {
            "SELECT webhook_id, event_type, job_id, company_id, attempts, CAST(0 AS BIGINT) \
             FROM webhook_deliveries \
             WHERE processed_at IS NULL AND (retry_at IS NULL OR retry_at <= ?2) \
             ORDER BY received_at, webhook_id LIMIT ?1"
        };
        let limit = limit as i64;
        let params: Vec<&dyn sql::ToVal> = match &fence {
            Some((me, two_leases)) => vec![&limit, &now, me, two_leases],
            None => vec![&limit, &now],
        };
        self.db.rows(sql, &params, |r| {
            Ok(PendingDelivery {
                webhook_id: r.get(0)?,
                event_type: r.get(1)?,
                job_id: r.get(2)?,
                company_id: r.get(3)?,
                attempts: r.get::<i64>(4)?.clamp(0, i64::from(u32::MAX)) as u32,
                unwanted: r.get::<i64>(5)? == 1,
            })
        })
    }

    /// When the earliest deferred delivery falls due (None: none is waiting).
    /// On a shared database, also when the earliest delivery of a company no instance lists
    /// becomes this instance's to mark, if it is the one that marks them.
    pub fn next_delivery_retry(&self) -> Result<Option<Millis>> {
        let at: Option<Option<i64>> = self.db.value(
            "SELECT MIN(retry_at) FROM webhook_deliveries WHERE processed_at IS NULL AND retry_at IS NOT NULL",
            &[],
        )?;
        let at = at.flatten();
        let Some((me, two_leases)) = self.fence().map(|f| (f.instance.as_str(), 2 * f.lease_ms))
        else {
            return Ok(at.map(Millis));
        };
        // Each becomes due two leases after it was received: the earliest.
        let sql = format!(
            "SELECT MIN(d.received_at) + ?2 FROM webhook_deliveries d \
             WHERE processed_at IS NULL AND ({})",
            unwanted("?1", "?2")
        );
        let unwanted: Option<Option<i64>> = self.db.value(&sql, &[&me, &two_leases])?;
        Ok(match (at, unwanted.flatten()) {
            (Some(a), Some(u)) => Some(Millis(a.min(u))),
            (a, u) => a.or(u).map(Millis),
        })
    }

    /// Names the company a delivery is about, learned by reading its job: on a shared database
    /// it is left pending for that company's holder.
    pub fn delivery_company(&self, webhook_id: &str, company: &str) -> Result<()> {
        self.db.exec(
            "UPDATE webhook_deliveries SET company_id = ?2 WHERE webhook_id = ?1",
            &[&webhook_id, &company],
        )?;
        Ok(())
    }

    /// Defers deliveries whose action failed transiently: one more attempt counted, due again
    /// at `retry_at`, `outcome` saying what this attempt met (they stay unprocessed).
    pub fn defer_deliveries(&self, deferred: &[(String, String, Millis)]) -> Result<()> {
        let tx = self.db.write_tx()?;
        for (id, outcome, retry_at) in deferred {
            tx.exec(
                "UPDATE webhook_deliveries SET attempts = attempts + 1, retry_at = ?2, outcome = ?3 \
                 WHERE webhook_id = ?1 AND processed_at IS NULL",
                &[id, retry_at, outcome],
            )?;
        }
        tx.commit()
    }

    /// Records the process running the service on this database.
    pub fn register_instance(&self, pid: u32, now: Millis) -> Result<()> {
        self.db.exec(
            "INSERT INTO service_instances (pid, started_at, version) VALUES (?1, ?2, ?3) \
             ON CONFLICT (pid) DO UPDATE SET started_at = excluded.started_at, \
             version = excluded.version",
            &[&pid, &now, &env!("CARGO_PKG_VERSION")],
        )?;
        Ok(())
    }

    pub fn unregister_instance(&self, pid: u32) -> Result<()> {
        self.db
            .exec("DELETE FROM service_instances WHERE pid = ?1", &[&pid])?;
        Ok(())
    }

    /// Pids recorded as running the service, newest first.
    pub fn instances(&self) -> Result<Vec<u32>> {
        self.db.rows(
            "SELECT pid FROM service_instances ORDER BY started_at DESC",
            &[],
            |r| Ok(r.get::<i64>(0)?.clamp(0, i64::from(u32::MAX)) as u32),
        )
    }
}
