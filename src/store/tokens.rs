//! OAuth token pairs (see `pleo::oauth`): the intent before the request, the new pair
//! before its use.

use super::*;

/// A stored OAuth token pair.
#[derive(Clone, Debug)]
pub struct TokenRow {
    pub access_token: Option<crate::wire::Secret>,
    pub access_expires_at: Option<Millis>,
    pub refresh_token: crate::wire::Secret,
    pub refresh_started_at: Option<Millis>,
    /// When the token endpoint refused the refresh token (terminal until a new one is given).
    pub refused_at: Option<Millis>,
    /// Why, in words without any token.
    pub last_error: Option<String>,
}

/// The credential name of `company`'s own OAuth pair in `oauth_tokens`.
pub fn company_credential(company: &str) -> String {
    format!("company:{company}")
}

/// Puts `refresh_token` in place of the credential's pair (no access token yet; a refusal or
/// an interrupted refresh on record is cleared), in the caller's transaction.
pub(super) fn seed_pair(
    tx: &sql::Db,
    credential: &str,
    refresh_token: &str,
    now: Millis,
) -> Result<u64> {
    tx.exec(
        "INSERT INTO oauth_tokens (credential, refresh_token, updated_at) VALUES (?1, ?2, ?3) \
         ON CONFLICT (credential) DO UPDATE SET refresh_token = excluded.refresh_token, \
         access_token = NULL, access_expires_at = NULL, refresh_started_at = NULL, \
         last_error = NULL, refused_at = NULL, updated_at = excluded.updated_at",
        &[&credential, &refresh_token, &now],
    )
}

/// OAuth token storage (see `oauth`).
impl Store {
    pub fn oauth_get(&self, credential: &str) -> Result<Option<TokenRow>> {
        self.db.row(
            "SELECT access_token, access_expires_at, refresh_token, refresh_started_at, \
             refused_at, last_error FROM oauth_tokens WHERE credential = ?1",
            &[&credential],
            |r| {
                Ok(TokenRow {
                    access_token: r.get::<Option<String>>(0)?.map(crate::wire::Secret::new),
                    access_expires_at: r.get::<Option<i64>>(1)?.map(Millis),
                    refresh_token: crate::wire::Secret::new(r.get::<String>(2)?),
                    refresh_started_at: r.get::<Option<i64>>(3)?.map(Millis),
                    refused_at: r.get::<Option<i64>>(4)?.map(Millis),
                    last_error: r.get(5)?,
                })
            },
        )
    }

    /// Stores a refresh token given by the operator (a first one, or after re-authorizing).
    pub fn oauth_seed(&self, credential: &str, refresh_token: &str, now: Millis) -> Result<()> {
        let tx = self.db.write_tx()?;
        seed_pair(&tx, credential, refresh_token, now)?;
        tx.commit()
    }

    /// Records, durably, that a refresh request is about to be sent.
    pub fn oauth_begin_refresh(&self, credential: &str, now: Millis) -> Result<()> {
        self.db.exec(
            "UPDATE oauth_tokens SET refresh_started_at = ?2 WHERE credential = ?1",
            &[&credential, &now],
        )?;
        Ok(())
    }

    /// On a shared PostgreSQL database: takes the right to refresh `credential`'s pair for
    /// `hold` (the database's clock) if no other process holds it, or its hold lapsed; false
    /// when another process holds it. Always true on SQLite (one service per file, and its
    /// commands never refresh).
    pub fn oauth_take_refresh(
        &self,
        credential: &str,
        holder: &str,
        hold: std::time::Duration,
    ) -> Result<bool> {
        if !self.db.is_pg() {
            return Ok(true);
        }
        let n = self.db.exec(
            "UPDATE oauth_tokens SET refresh_holder = ?2, \
             refresh_held_until = jm_now_ms() + ?3 WHERE credential = ?1 \
             AND (refresh_holder IS NULL OR refresh_holder = ?2 \
                  OR refresh_held_until <= jm_now_ms())",
            &[&credential, &holder, &crate::clock::ms(hold)],
        )?;
        Ok(n == 1)
    }

    /// Gives back a hold taken with [`Store::oauth_take_refresh`] (nothing on SQLite).
    pub fn oauth_release_refresh(&self, credential: &str, holder: &str) -> Result<()> {
        if self.db.is_pg() {
            self.db.exec(
                "UPDATE oauth_tokens SET refresh_holder = NULL, refresh_held_until = NULL \
                 WHERE credential = ?1 AND refresh_holder = ?2",
                &[&credential, &holder],
            )?;
        }
        Ok(())
    }

    /// Commits a new pair (and clears the refresh mark) in one statement. A pair the token
    /// endpoint just issued is good whatever was recorded before, so a refusal on record is
    /// cleared too.
    pub fn oauth_commit(
        &self,
        credential: &str,
        access_token: &str,
        expires_at: Millis,
        refresh_token: &str,
        now: Millis,
    ) -> Result<()> {
        self.db.exec(
            "UPDATE oauth_tokens SET access_token = ?2, access_expires_at = ?3, refresh_token = ?4, \
             refresh_started_at = NULL, last_error = NULL, refused_at = NULL, updated_at = ?5 \
             WHERE credential = ?1",
            &[&credential, &access_token, &expires_at, &refresh_token, &now],
        )?;
        Ok(())
    }

    /// The token endpoint refused the refresh token `sent`: terminal. The access token is
    /// dropped, `refused_at` set, and nothing is sent with this pair again until a new refresh
    /// token is seeded (re-authorization). Only while `sent` is still the stored refresh token:
    /// a refusal of a token another process already rotated says nothing about the pair stored
    /// now. Returns whether the pair was marked refused.
    pub fn oauth_refuse(
        &self,
        credential: &str,
        sent: &str,
        error: &str,
        now: Millis,
    ) -> Result<bool> {
        let n = self.db.exec(
            "UPDATE oauth_tokens SET access_token = NULL, access_expires_at = NULL, \
             refresh_started_at = NULL, refused_at = ?3, last_error = ?2, updated_at = ?3 \
             WHERE credential = ?1 AND refresh_token = ?4",
            &[&credential, &error, &now, &sent],
        )?;
        Ok(n == 1)
    }

    /// The API refused `access` (401): the stored access token is expired if it is still that
    /// one (the refresh token is kept; a pair another process stored meanwhile is untouched).
    pub fn oauth_expire_access(&self, credential: &str, access: &str, now: Millis) -> Result<()> {
        self.db.exec(
            "UPDATE oauth_tokens SET access_token = '', access_expires_at = 0, updated_at = ?3 \
             WHERE credential = ?1 AND access_token = ?2",
            &[&credential, &access, &now],
        )?;
        Ok(())
    }

    /// Companies whose own OAuth pair was refused: company id, when, and why.
    pub fn companies_needing_reauthorization(&self) -> Result<Vec<(String, Millis, String)>> {
        self.db.rows(
            "SELECT substr(credential, 9), refused_at, coalesce(last_error, '') FROM oauth_tokens \
             WHERE credential LIKE 'company:%' AND refused_at IS NOT NULL ORDER BY credential",
            &[],
            |r| Ok((r.get(0)?, Millis(r.get(1)?), r.get(2)?)),
        )
    }

    /// Deletes `company`'s own OAuth pair once it is no longer in `companies` (it was removed
    /// and has left). Returns whether a pair was deleted.
    pub fn forget_company_pair(&self, company: &str) -> Result<bool> {
        let n = self.db.exec(
            "DELETE FROM oauth_tokens WHERE credential = ?1 \
             AND NOT EXISTS (SELECT 1 FROM companies WHERE company_id = ?2 AND credential = 'oauth')",
            &[&company_credential(company), &company],
        )?;
        Ok(n > 0)
    }
}
