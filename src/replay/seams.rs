//! The invariants at the seams between features, checked after every step beside the others:
//! a company is marked recovered only after a complete observation of its `in_progress` jobs
//! (every one of ours that Pleo shows is in the mirror once the company is recovered); no
//! OAuth pair is marked refused unless the token endpoint refused its refresh token
//! (`invalid_grant`); no item update reaches an item Pleo already shows finished.

use super::*;

impl Replay {
    pub(super) fn check_seams(&mut self, store: &Store, claims: &[ClaimRecord]) {
        let mut found = Vec::new();
        if let Some(r) = &self.running {
            let unrecovered: HashSet<String> = r.mirror.unrecovered().into_iter().collect();
            let served = self.answerable();
            let held = invariants::holders(claims);
            for j in self.fake.jobs() {
                let ours = match held.get(&j.id) {
                    None => true,
                    Some(h) => *h == Claimant::Api,
                };
                if j.status != "in_progress"
                    || !ours
                    || !served.contains(&j.company_id)
                    || unrecovered.contains(&j.company_id)
                {
                    continue;
                }
                if matches!(store.job(&j.id), Ok(None)) {
                    found.push(format!(
                        "company {} is marked recovered, but its in_progress job {} is not in the mirror (the observation was not complete)",
                        j.company_id, j.id
                    ));
                }
            }
        }
        let refused: rusqlite::Result<Vec<String>> = store
            .conn()
            .prepare("SELECT credential FROM oauth_tokens WHERE refused_at IS NOT NULL")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect());
        let grants = self.fake.token_grants();
        for credential in refused.unwrap_or_default() {
            let company = credential.strip_prefix("company:").map(str::to_owned);
            let grant_refused = grants.iter().any(|g| !g.ok && g.company == company);
            if !grant_refused {
                found.push(format!(
                    "the OAuth pair of {credential} is marked refused, but the token endpoint never refused its refresh token (invalid_grant)"
                ));
            }
        }
        for u in self.fake.stale_item_updates() {
            found.push(format!(
                "an item update reached an item Pleo already showed finished: {u}"
            ));
        }
        for v in found {
            self.violate(v);
        }
    }
}
