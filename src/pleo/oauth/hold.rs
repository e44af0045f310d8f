//! One refresher for a pair across processes: instances sharing a PostgreSQL database share its
//! OAuth pairs, and the token endpoint rotates the refresh token at every refresh, so one
//! process at a time holds a pair's refresh (`oauth_tokens.refresh_holder`, until
//! `refresh_held_until` on the database's clock); the others wait for the pair it stores and
//! use it. A hold that lapsed (its holder died or froze) may be taken by another. On SQLite the
//! hold is always this process's (one service per file; its commands never refresh).

use std::time::Duration;

use super::{TokenSource, auth_error};
use crate::wire::{PleoError, Secret};

/// What [`TokenSource::hold_refresh`] found.
pub(super) enum Held<'a> {
    /// Another process stored a fresh pair meanwhile: use its access token.
    Fresh(Secret),
    /// This process holds the refresh, with the pair as stored now.
    Taken(HeldRefresh<'a>, crate::store::TokenRow),
}

/// A pair's refresh held by this process, given back when dropped.
pub(super) struct HeldRefresh<'a>(&'a TokenSource);

impl Drop for HeldRefresh<'_> {
    fn drop(&mut self) {
        let s = self.0;
        let store = s.store.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = store.oauth_release_refresh(&s.credential, &s.holder()) {
            log::warn!(
                "could not give back the OAuth refresh hold of {}: {e}",
                s.who()
            );
        }
    }
}

impl TokenSource {
    /// The right to refresh this pair. On SQLite it is at once this process's. On a shared
    /// PostgreSQL database another instance may hold it: this waits (polling the row) until
    /// that one stored its new pair, which is then used, or until its hold lapsed (it died or
    /// froze), at most one hold long; past that, a transient error (the request is tried again
    /// later).
    pub(super) fn hold_refresh(&self, row: crate::store::TokenRow) -> Result<Held<'_>, PleoError> {
        let db = |e: crate::store::StoreError| PleoError::Config(format!("OAuth token store: {e}"));
        // Longer than the holder's request may take (it gives up after the timeout).
        let hold = self.cfg.timeout + Duration::from_secs(5);
        let give_up = std::time::Instant::now() + hold + Duration::from_secs(1);
        loop {
            let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
            let taken = store
                .oauth_take_refresh(&self.credential, &self.holder(), hold)
                .map_err(db)?;
            let now_row = store.oauth_get(&self.credential).map_err(db)?;
            drop(store);
            let held = taken.then(|| HeldRefresh(self));
            let Some(now_row) = now_row else {
                // The row vanished (a company removed): refresh as asked, nothing to share.
                return Ok(Held::Taken(held.unwrap_or(HeldRefresh(self)), row));
            };
            if now_row.refused_at.is_none()
                && let (Some(t), Some(exp)) = (&now_row.access_token, now_row.access_expires_at)
                && self.fresh(exp)
            {
                *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = Some((t.clone(), exp));
                return Ok(Held::Fresh(t.clone()));
            }
            if let Some(held) = held {
                if now_row.refused_at.is_some() && row.refused_at.is_none() {
                    // Another process was refused meanwhile: terminal, as in `bearer`.
                    return Err(auth_error(now_row.last_error.unwrap_or_else(|| {
                        "the OAuth refresh token was refused; authorize again".into()
                    })));
                }
                return Ok(Held::Taken(held, now_row));
            }
            if std::time::Instant::now() >= give_up {
                return Err(PleoError::Transport(format!(
                    "another jobmirror instance has held the OAuth refresh of {} for longer than a refresh takes; trying again later",
                    self.who()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// This token source as a holder of its pair's refresh.
    pub(super) fn holder(&self) -> String {
        format!("pid {} {}", std::process::id(), self.holder)
    }
}
