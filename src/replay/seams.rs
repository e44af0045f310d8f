//! The invariants at the seams between features, checked after every step beside the others:
//! a company is marked recovered only after a complete observation of its `in_progress` jobs
//! (every one of ours that Pleo shows is in the mirror once the company is recovered); no
//! OAuth pair is marked refused unless the token endpoint refused its refresh token
//! (`invalid_grant`); no item update reaches an item Pleo already shows finished; no job is
//! failed for want of time while our own accepted `started` had given it more than the
//! finish margin (and a minute) at Pleo.

use super::*;

impl Replay {
    pub(super) fn check_seams(
        &mut self,
        store: &Store,
        claims: &[ClaimRecord],
        requests: &[crate::sandbox::LoggedRequest],
    ) {
        let mut found = Vec::new();
        let margin_ms = self.cfg.pipeline.finish_margin.as_millis() as i64 + 60_000;
        for r in requests.iter().filter(|r| {
            r.method == "POST"
                && r.path == "/v3/export-job-events"
                && (r.status == 202 || r.status == 504 || r.status == 0)
                && r.body.contains("before the job's deadline")
        }) {
            let v: Value = serde_json::from_str(&r.body).unwrap_or_default();
            let job = v["jobId"].as_str().unwrap_or("");
            let claimed = claims
                .iter()
                .rfind(|c| c.accepted && c.by == Claimant::Api && c.job_id == job && c.at <= r.at);
            let expires_in_ms = self.fake.job(job).map_or(0, |j| j.expires_in_secs * 1000);
            if let Some(c) = claimed {
                let left = c.at.0 + expires_in_ms - r.at.0;
                if left > margin_ms {
                    found.push(format!(
                        "job {job} was failed for want of time with {} s left at Pleo since our accepted `started`",
                        left / 1000
                    ));
                }
            }
        }
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
