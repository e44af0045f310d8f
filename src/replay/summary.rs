//! What a replay (or a sum of simulations) shows: the summary, its text and its JSON.

use super::*;

/// What a replay did, from the fake's log and the database.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Summary {
    pub description: Option<String>,
    pub virtual_secs: f64,
    pub steps: u64,
    /// Jobs of the served companies by Pleo's final status.
    pub jobs_by_pleo_status: BTreeMap<String, u64>,
    /// Jobs in the mirror by jobmirror's processing state.
    pub jobs_by_state: BTreeMap<String, u64>,
    /// `started` events Pleo accepted from jobmirror.
    pub claims: u64,
    /// `started` events Pleo refused with 422 (another integration was first).
    pub conflicts: u64,
    /// Jobs taken back after a restart without `started`.
    pub resumed: u64,
    /// Jobs that expired at Pleo.
    pub expiries: u64,
    pub crashes: u64,
    /// Timeline company changes: `companies add`, `companies remove`, revoked access.
    #[serde(skip_serializing_if = "is_zero")]
    pub companies_added: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub companies_removed: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub tokens_revoked: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub companies_paused: u64,
    /// Handler runs the timeline acted on while they worked (`while_handler_runs`).
    #[serde(skip_serializing_if = "is_zero")]
    pub acted_on_runs: u64,
    pub webhooks: WebhookSummary,
    /// API requests by method and path pattern.
    pub api_calls: BTreeMap<String, u64>,
    pub api_calls_total: u64,
    /// API requests answered with an injected fault (429, 500, cut or lost answers).
    pub api_faults: u64,
    /// Jobs acted on while another integration held them, in the two races jobmirror cannot
    /// see: taken for ours after the answer to our `started` was lost (Pleo's job data names
    /// no holder; docs/contract.md, "Claims whose answer is lost"), or sent `failed` from pending (a
    /// readiness check that kept failing) just as someone claimed them.
    pub ambiguous: Vec<String>,
    pub violations: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct WebhookSummary {
    pub delivered: u64,
    pub accepted: u64,
    pub duplicates: u64,
    pub refused: u64,
    /// Answered 503 or sent while jobmirror was down: the sender tries again.
    pub deferred: u64,
}

impl Replay {
    pub(super) fn finish_summary(&mut self) -> Summary {
        let mut s = std::mem::take(&mut self.summary);
        s.virtual_secs = self.start.until(self.base.now()) as f64 / 1000.0;
        // The snapshot's companies and every company the timeline added.
        let served: HashSet<String> = self
            .snap
            .companies
            .iter()
            .cloned()
            .chain(self.snap.timeline.iter().filter_map(|s| match &s.event {
                crate::replay::snapshot::Event::CompanyAdded { company_id, .. } => {
                    Some(company_id.clone())
                }
                _ => None,
            }))
            .collect();
        for job in self.fake.jobs() {
            if !served.contains(&job.company_id) {
                continue;
            }
            let status = if job.failure_reason_type.as_deref() == Some("job_expired") {
                s.expiries += 1;
                "failed (expired)".to_owned()
            } else {
                job.status.clone()
            };
            *s.jobs_by_pleo_status.entry(status).or_default() += 1;
        }
        for c in self.fake.claims().iter().filter(|c| c.by == Claimant::Api) {
            if c.accepted {
                s.claims += 1;
            } else {
                s.conflicts += 1;
            }
        }
        for r in self.fake.requests() {
            if r.path.starts_with("/_fake/") {
                continue;
            }
            *s.api_calls
                .entry(crate::health::endpoint_pattern(&r.method, &r.path))
                .or_default() += 1;
            s.api_calls_total += 1;
            s.api_faults += u64::from(r.fault.is_some());
        }
        if let Ok(store) = Store::open_read_only(&self.opts.db)
            && let Ok(mut stmt) = store
                .conn()
                .prepare("SELECT proc_state, count(*) FROM export_jobs GROUP BY proc_state")
            && let Ok(rows) =
                stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
        {
            for (state, n) in rows.flatten() {
                s.jobs_by_state.insert(state, n as u64);
            }
        }
        s.violations = self.violations();
        s
    }
}

impl Summary {
    /// Adds another run's figures (for totals over many simulated histories).
    pub fn add(&mut self, o: &Summary) {
        self.virtual_secs += o.virtual_secs;
        self.steps += o.steps;
        for (k, v) in &o.jobs_by_pleo_status {
            *self.jobs_by_pleo_status.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.jobs_by_state {
            *self.jobs_by_state.entry(k.clone()).or_default() += v;
        }
        self.claims += o.claims;
        self.conflicts += o.conflicts;
        self.resumed += o.resumed;
        self.acted_on_runs += o.acted_on_runs;
        self.expiries += o.expiries;
        self.crashes += o.crashes;
        self.companies_added += o.companies_added;
        self.companies_removed += o.companies_removed;
        self.tokens_revoked += o.tokens_revoked;
        let (w, ow) = (&mut self.webhooks, &o.webhooks);
        w.delivered += ow.delivered;
        w.accepted += ow.accepted;
        w.duplicates += ow.duplicates;
        w.refused += ow.refused;
        w.deferred += ow.deferred;
        for (k, v) in &o.api_calls {
            *self.api_calls.entry(k.clone()).or_default() += v;
        }
        self.api_calls_total += o.api_calls_total;
        self.api_faults += o.api_faults;
        self.ambiguous.extend(o.ambiguous.iter().cloned());
        self.violations.extend(o.violations.iter().cloned());
    }

    /// The summary as text, for `jobmirror replay`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let line = |out: &mut String, s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        if let Some(d) = &self.description {
            line(&mut out, format!("replay: {d}"));
        }
        line(
            &mut out,
            format!(
                "  virtual time {:.0} s in {} steps, {} crashes",
                self.virtual_secs, self.steps, self.crashes
            ),
        );
        if self.companies_added + self.companies_removed + self.tokens_revoked > 0 {
            line(
                &mut out,
                format!(
                    "  companies: {} added, {} removed, {} revoked access",
                    self.companies_added, self.companies_removed, self.tokens_revoked
                ),
            );
        }
        let by = |m: &BTreeMap<String, u64>| {
            m.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        line(
            &mut out,
            format!("  jobs at Pleo:   {}", by(&self.jobs_by_pleo_status)),
        );
        line(
            &mut out,
            format!("  jobs in mirror: {}", by(&self.jobs_by_state)),
        );
        line(
            &mut out,
            format!(
                "  claims {}, conflicts {}, resumed {}, expiries {}",
                self.claims, self.conflicts, self.resumed, self.expiries
            ),
        );
        if self.acted_on_runs > 0 {
            line(
                &mut out,
                format!(
                    "  handler runs acted on while they worked: {}",
                    self.acted_on_runs
                ),
            );
        }
        let w = &self.webhooks;
        line(
            &mut out,
            format!(
                "  webhooks: {} delivered, {} accepted, {} duplicates, {} refused, {} deferred",
                w.delivered, w.accepted, w.duplicates, w.refused, w.deferred
            ),
        );
        line(
            &mut out,
            format!(
                "  API calls: {} ({} answered with an injected fault)",
                self.api_calls_total, self.api_faults
            ),
        );
        for (k, v) in &self.api_calls {
            line(&mut out, format!("    {v:>6}  {k}"));
        }
        if !self.ambiguous.is_empty() {
            line(
                &mut out,
                format!(
                    "  acted on while held elsewhere, in a race jobmirror cannot see (a lost answer to `started`, or `failed` from pending): {}",
                    self.ambiguous.join(", ")
                ),
            );
        }
        if self.violations.is_empty() {
            line(&mut out, "  invariants: all held".into());
        } else {
            line(
                &mut out,
                format!("  invariants: {} violated", self.violations.len()),
            );
            for v in &self.violations {
                line(&mut out, format!("    - {v}"));
            }
        }
        out
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}
