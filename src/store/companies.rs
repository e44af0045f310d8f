//! Companies as data (`jobmirror companies`): who is served beside the configuration's
//! `company_ids`, with which credential, paused or not; and each company's webhook
//! subscription secret. Every change is journaled in the same transaction.

use super::*;

/// The credential a company's row names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CompanyCredential {
    /// The service's own credential.
    Default,
    /// A key of its own.
    ApiKey(crate::wire::Secret),
    /// A token pair of its own in `oauth_tokens` (see [`company_credential`]).
    OAuth,
}

impl CompanyCredential {
    pub fn as_str(&self) -> &'static str {
        match self {
            CompanyCredential::Default => "default",
            CompanyCredential::ApiKey(_) => "api_key",
            CompanyCredential::OAuth => "oauth",
        }
    }
}

/// One row of `companies`.
#[derive(Clone, Debug)]
pub struct CompanyRow {
    pub company_id: String,
    pub credential: CompanyCredential,
    pub paused_at: Option<Millis>,
    pub added_at: Millis,
    pub updated_at: Millis,
    pub subscription_id: Option<String>,
    pub webhook_secret: Option<crate::wire::Secret>,
}

/// What [`Store::company_add`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompanyChange {
    Added,
    /// The row existed: its credential was replaced (and a refused pair with it).
    Updated,
    Unchanged,
}

impl CompanyChange {
    pub fn as_str(self) -> &'static str {
        match self {
            CompanyChange::Added => "added",
            CompanyChange::Updated => "updated",
            CompanyChange::Unchanged => "unchanged",
        }
    }
}

/// The company's credential as the two columns hold it.
fn credential_columns(c: &CompanyCredential) -> (&'static str, Option<&str>) {
    (
        c.as_str(),
        match c {
            CompanyCredential::ApiKey(k) => Some(k.expose()),
            _ => None,
        },
    )
}

fn company_journal(
    tx: &sql::Db,
    now: Millis,
    company: &str,
    kind: EventKind,
    detail: Value,
) -> Result<()> {
    journal_db(tx, now, None, Some(company), kind, &detail)
}

impl Store {
    /// Every row of `companies`, by id.
    pub fn company_rows(&self) -> Result<Vec<CompanyRow>> {
        self.db.rows(
            "SELECT company_id, credential, api_key, paused_at, added_at, updated_at, \
             subscription_id, webhook_secret FROM companies ORDER BY company_id",
            &[],
            |r| {
                let kind: String = r.get(1)?;
                let key: Option<String> = r.get(2)?;
                Ok(CompanyRow {
                    company_id: r.get(0)?,
                    credential: match (kind.as_str(), key) {
                        ("api_key", Some(k)) => {
                            CompanyCredential::ApiKey(crate::wire::Secret::new(k))
                        }
                        ("oauth", _) => CompanyCredential::OAuth,
                        _ => CompanyCredential::Default,
                    },
                    paused_at: r.get::<Option<i64>>(3)?.map(Millis),
                    added_at: Millis(r.get(4)?),
                    updated_at: Millis(r.get(5)?),
                    subscription_id: r.get(6)?,
                    webhook_secret: r.get::<Option<String>>(7)?.map(crate::wire::Secret::new),
                })
            },
        )
    }

    /// Whether `company` has a row.
    pub fn has_company_row(&self, company: &str) -> Result<bool> {
        Ok(self
            .db
            .value::<bool>(
                "SELECT EXISTS (SELECT 1 FROM companies WHERE company_id = ?1)",
                &[&company],
            )?
            .unwrap_or(false))
    }

    /// The counter every change to `companies` bumps (one row: cheap to poll).
    pub fn companies_version(&self) -> Result<i64> {
        Ok(self
            .db
            .value("SELECT seq FROM companies_version WHERE id = 1", &[])?
            .unwrap_or(0))
    }

    /// Adds `company` with `credential`, or replaces the credential of its row. An OAuth
    /// refresh token is seeded in the same transaction (clearing a refused pair: this is how
    /// a company is authorized again). Journaled.
    pub fn company_add(
        &self,
        company: &str,
        credential: &CompanyCredential,
        refresh_token: Option<&str>,
        now: Millis,
    ) -> Result<CompanyChange> {
        let tx = self.db.write_tx()?;
        let old: Option<(String, Option<String>)> = tx.row(
            "SELECT credential, api_key FROM companies WHERE company_id = ?1",
            &[&company],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let (kind, key) = credential_columns(credential);
        let same_row = old
            .as_ref()
            .is_some_and(|(k, v)| k == kind && v.as_deref() == key);
        let change = match (&old, same_row, refresh_token) {
            (None, _, _) => CompanyChange::Added,
            (Some(_), true, None) => CompanyChange::Unchanged,
            _ => CompanyChange::Updated,
        };
        if change == CompanyChange::Unchanged {
            return Ok(change);
        }
        tx.exec(
            "INSERT INTO companies (company_id, credential, api_key, added_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?4) ON CONFLICT (company_id) DO UPDATE SET \
             credential = excluded.credential, api_key = excluded.api_key, updated_at = excluded.updated_at",
            &[&company, &kind, &key, &now],
        )?;
        let cred = company_credential(company);
        match refresh_token {
            Some(t) => {
                super::tokens::seed_pair(&tx, &cred, t, now)?;
            }
            None => {
                tx.exec("DELETE FROM oauth_tokens WHERE credential = ?1", &[&cred])?;
            }
        }
        let what = match change {
            CompanyChange::Added => EventKind::CompanyAdded,
            _ => EventKind::CompanyCredentialChanged,
        };
        company_journal(&tx, now, company, what, json!({"credential": kind}))?;
        tx.commit()?;
        Ok(change)
    }

    /// Removes `company`'s row; `false` when there was none. Its OAuth pair is kept until the
    /// service has let the company go (a job in hand still needs it), then deleted
    /// ([`Store::forget_company_pair`]). Journaled.
    pub fn company_remove(&self, company: &str, now: Millis) -> Result<bool> {
        let tx = self.db.write_tx()?;
        let n = tx.exec("DELETE FROM companies WHERE company_id = ?1", &[&company])?;
        if n > 0 {
            company_journal(&tx, now, company, EventKind::CompanyRemoved, json!({}))?;
        }
        tx.commit()?;
        Ok(n > 0)
    }

    /// Pauses (`true`) or resumes `company`. A company the table lacks gets a row with the
    /// default credential (so a company named only in the configuration can be paused).
    /// Returns whether anything changed. Journaled.
    pub fn company_pause(&self, company: &str, paused: bool, now: Millis) -> Result<bool> {
        let tx = self.db.write_tx()?;
        let was: Option<Option<i64>> = tx.row(
            "SELECT paused_at FROM companies WHERE company_id = ?1",
            &[&company],
            |r| r.get(0),
        )?;
        let is_paused = was.is_some_and(|p| p.is_some());
        if is_paused == paused {
            return Ok(false);
        }
        tx.exec(
            "INSERT INTO companies (company_id, added_at, updated_at, paused_at) \
             VALUES (?1, ?2, ?2, ?3) ON CONFLICT (company_id) DO UPDATE SET \
             paused_at = excluded.paused_at, updated_at = excluded.updated_at",
            &[&company, &now, &paused.then_some(now)],
        )?;
        let kind = if paused {
            EventKind::CompanyPaused
        } else {
            EventKind::CompanyResumed
        };
        company_journal(&tx, now, company, kind, json!({}))?;
        tx.commit()?;
        Ok(true)
    }

    /// Records `company`'s webhook subscription and its signing secret (the receiver accepts
    /// it from the next change it notices). The company must have a row. `updated_at` is left
    /// alone: it marks credential changes (which make the service detect the company anew).
    pub fn company_subscription(
        &self,
        company: &str,
        subscription_id: &str,
        secret: &str,
    ) -> Result<bool> {
        let n = self.db.exec(
            "UPDATE companies SET subscription_id = ?2, webhook_secret = ?3 \
             WHERE company_id = ?1 \
               AND (subscription_id IS DISTINCT FROM ?2 OR webhook_secret IS DISTINCT FROM ?3)",
            &[&company, &subscription_id, &secret],
        )?;
        Ok(n > 0)
    }
}
