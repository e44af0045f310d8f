//! The companies a configuration serves merged with the database's `companies` rows
//! (`jobmirror companies`), and the companies' own webhook secrets.

use crate::config::Config;
use crate::store::{CompanyCredential, CompanyRow};

impl Config {
    /// This configuration merged with the database's `companies` rows: the companies served
    /// are the configuration's `company_ids` and every row's company (this shard's part),
    /// less the paused ones. For a company in both, the database wins: its pause applies, and
    /// a credential of its own there replaces a key from `company_api_keys_file` (a row with
    /// the default credential keeps the file's key).
    pub fn with_companies(&self, rows: &[CompanyRow]) -> Config {
        let mut cfg = self.clone();
        let mut listed: std::collections::HashSet<String> =
            cfg.company_ids.iter().cloned().collect();
        for row in rows {
            if !cfg.shard.serves(&row.company_id) {
                continue;
            }
            if listed.insert(row.company_id.clone()) {
                cfg.company_ids.push(row.company_id.clone());
                cfg.companies_listed += 1;
            }
            match &row.credential {
                CompanyCredential::Default => {}
                CompanyCredential::ApiKey(k) => {
                    cfg.company_api_keys
                        .insert(row.company_id.clone(), k.clone());
                }
                CompanyCredential::OAuth => {
                    cfg.company_api_keys.remove(&row.company_id);
                    cfg.company_oauth.insert(row.company_id.clone());
                }
            }
        }
        let paused: std::collections::HashSet<&str> = rows
            .iter()
            .filter(|r| r.paused_at.is_some())
            .map(|r| r.company_id.as_str())
            .collect();
        if !paused.is_empty() {
            cfg.company_ids.retain(|c| !paused.contains(c.as_str()));
            cfg.company_api_keys
                .retain(|c, _| !paused.contains(c.as_str()));
            cfg.company_oauth.retain(|c| !paused.contains(c.as_str()));
        }
        cfg
    }

    /// The webhook signing secrets of the served companies' own subscriptions
    /// (`jobmirror subscribe --company/--all`), as `whsec_...` text.
    pub fn company_webhook_secrets(rows: &[CompanyRow]) -> Vec<(String, String)> {
        rows.iter()
            .filter_map(|r| {
                r.webhook_secret
                    .as_ref()
                    .map(|s| (r.company_id.clone(), s.expose().to_owned()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Millis;
    use crate::wire::Secret;

    fn base(companies: &str, shard: Option<&str>) -> Config {
        let mut pairs = vec![
            ("JOBMIRROR_PLEO_API_KEY", "k".to_owned()),
            ("JOBMIRROR_COMPANY_IDS", companies.to_owned()),
            ("JOBMIRROR_HANDLER_COMMAND", "dry-run".to_owned()),
            ("JOBMIRROR_DB", "/nonexistent/jm.db".to_owned()),
        ];
        if let Some(s) = shard {
            pairs.push(("JOBMIRROR_SHARD", s.to_owned()));
        }
        Config::load_with(None, &move |k| {
            pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
        })
        .unwrap()
    }

    fn row(id: &str, credential: CompanyCredential, paused: bool) -> CompanyRow {
        CompanyRow {
            company_id: id.into(),
            credential,
            paused_at: paused.then_some(Millis(1)),
            added_at: Millis(0),
            updated_at: Millis(0),
            subscription_id: None,
            webhook_secret: None,
        }
    }

    #[test]
    fn the_database_adds_companies_and_wins_for_credentials_and_pauses() {
        let cfg = base(
            "00000000-0000-4000-8000-0000000000c1, 00000000-0000-4000-8000-0000000000c2, 00000000-0000-4000-8000-0000000000c3",
            None,
        );
        let rows = [
            row(
                "00000000-0000-4000-8000-0000000000c2",
                CompanyCredential::OAuth,
                false,
            ),
            row(
                "00000000-0000-4000-8000-0000000000c3",
                CompanyCredential::Default,
                true,
            ),
            row(
                "00000000-0000-4000-8000-0000000000d1",
                CompanyCredential::ApiKey(Secret::new("kd")),
                false,
            ),
            row(
                "00000000-0000-4000-8000-0000000000d2",
                CompanyCredential::Default,
                true,
            ),
        ];
        let m = cfg.with_companies(&rows);
        // The configuration's order first, then the database's new companies; paused ones out.
        assert_eq!(
            m.company_ids,
            [
                "00000000-0000-4000-8000-0000000000c1",
                "00000000-0000-4000-8000-0000000000c2",
                "00000000-0000-4000-8000-0000000000d1"
            ]
        );
        assert!(
            m.company_oauth
                .contains("00000000-0000-4000-8000-0000000000c2")
        );
        assert_eq!(
            m.company_api_keys
                .get("00000000-0000-4000-8000-0000000000d1")
                .unwrap()
                .expose(),
            "kd"
        );
        assert_eq!(m.companies_sharing_default(), 1);
        // Without rows, the configuration as it is.
        assert_eq!(cfg.with_companies(&[]).company_ids, cfg.company_ids);
    }

    #[test]
    fn a_shard_takes_its_part_of_the_database_companies_too() {
        let ids: Vec<String> = (0..40)
            .map(|i| format!("00000000-0000-4000-8000-db{i:010}"))
            .collect();
        let rows: Vec<CompanyRow> = ids
            .iter()
            .map(|c| row(c, CompanyCredential::Default, false))
            .collect();
        let listed: Vec<String> = (0..30)
            .map(|i| format!("00000000-0000-4000-8000-cf{i:010}"))
            .collect();
        let mut all = Vec::new();
        for i in 0..3 {
            let m = base(&listed.join(","), Some(&format!("{i}/3"))).with_companies(&rows);
            all.extend(
                m.company_ids
                    .into_iter()
                    .filter(|c| c.starts_with("00000000-0000-4000-8000-db")),
            );
        }
        all.sort();
        let mut want = ids.clone();
        want.sort();
        assert_eq!(
            all, want,
            "every database company served by exactly one shard"
        );
    }
}
