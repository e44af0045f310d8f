//! Snapshots: the Pleo side of a world (companies, jobs, job items, export items) and a
//! timeline of what happens when, as versioned JSON. `jobmirror replay` plays one offline,
//! `jobmirror record` writes one from the live API, and the simulation generates them.
//!
//! Invariants: a snapshot is plain data (no code, no secrets but the test signing secret a
//! timeline may name); loading refuses unknown versions, unknown fields and a timeline that is
//! not in time order, with the offending place in the message; `record` only ever GETs.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::clock::{Millis, SharedClock};
use crate::pleo::{PleoClient, status};
use crate::sandbox::{FaultRates, FaultRule, JobSpec};

/// The snapshot format this build reads and writes.
pub const VERSION: u32 = 2;

/// Config keys a snapshot may not set: the replay owns them.
const OWNED_KEYS: &[&str] = &[
    "db",
    "pleo_base_url",
    "pleo_api_key",
    "pleo_api_key_file",
    "company_ids",
    "handler_command",
    "webhook_listen",
    "webhook_secret_file",
    "log",
];

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Snapshot {
    pub version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Where the virtual clock starts (RFC 3339).
    pub start: String,
    /// How long to run, in seconds after `start` (default: the last timeline event plus two
    /// poll intervals, at least one hour).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_secs: Option<f64>,
    /// The companies jobmirror serves in this world.
    pub companies: Vec<String>,
    /// jobmirror settings, by config key (`poll_interval_secs`, `webhook_secret`, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub service: BTreeMap<String, Value>,
    /// API keys the fake accepts (default: one generated key).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_keys: Vec<String>,
    /// Default `expiresIn` of jobs, seconds (default 3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<i64>,
    /// Seed of the fake's fault generator (rates in `faults` events draw from it).
    #[serde(default)]
    pub seed: u64,
    /// Jobs present at `start` (`createdSecsAgo` counts back from `start`).
    #[serde(default)]
    pub jobs: Vec<JobSpec>,
    #[serde(default)]
    pub timeline: Vec<Step>,
}

/// One timeline entry: `at` seconds after `start`, and what happens.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    pub at: f64,
    #[serde(flatten)]
    pub event: Event,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A user clicks Export: the job appears at Pleo (no webhook by itself).
    JobCreated { job: JobSpec },
    /// A webhook delivery reaches jobmirror. A string `body` is sent byte for byte with the
    /// recorded `headers`; an object `body` is signed with the snapshot's `webhook_secret`
    /// as `webhookId`, at `signedAt` (seconds after start; default: now).
    #[serde(rename_all = "camelCase")]
    Webhook {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        webhook_id: Option<String>,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        headers: BTreeMap<String, String>,
        body: Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signed_at: Option<f64>,
    },
    /// From now on, faults at these rates (all zero ends the window).
    Faults { rates: FaultRates },
    /// The next request that matches gets this fault.
    Fault { rule: FaultRule },
    /// Another integration claims the job (it sends `started`).
    #[serde(rename_all = "camelCase")]
    ClaimedByOther { job_id: String },
    /// Another integration claims the job right after jobmirror's next read of it.
    #[serde(rename_all = "camelCase")]
    StealAfterGet { job_id: String },
    /// The holder of an `in_progress` job completes it.
    #[serde(rename_all = "camelCase")]
    CompletedByOther { job_id: String },
    /// jobmirror dies: at once, or after `afterRequests` more API requests (mid-step; later
    /// requests never reach Pleo). It starts again `downSecs` later.
    #[serde(rename_all = "camelCase")]
    Crash {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after_requests: Option<u32>,
        #[serde(default)]
        down_secs: f64,
    },
    /// jobmirror's host clock jumps (negative: backwards); Pleo's does not.
    ClockJump { secs: f64 },
    /// Someone runs `jobmirror trigger` (detection now).
    Trigger,
    /// The accounting side is down for `downSecs`: the handler's readiness check fails (the
    /// replay runs the `outbox:` handler and puts a file where its directory belongs).
    #[serde(rename_all = "camelCase")]
    AccountingDown { down_secs: f64 },
    /// An operator runs `jobmirror companies add` for a company; with `oauth`, the customer
    /// has authorized the integration and the company gets a token pair of its own.
    #[serde(rename_all = "camelCase")]
    CompanyAdded {
        company_id: String,
        #[serde(default)]
        oauth: bool,
    },
    /// An operator runs `jobmirror companies remove` (a job in hand is finished first).
    #[serde(rename_all = "camelCase")]
    CompanyRemoved { company_id: String },
    /// The customer revokes the integration's access: the company's tokens stop working.
    #[serde(rename_all = "camelCase")]
    TokensRevoked { company_id: String },
    /// The customer authorizes again and the operator gives the new refresh token
    /// (`companies add ID --oauth-refresh-token-file`).
    #[serde(rename_all = "camelCase")]
    Reauthorized { company_id: String },
    /// An operator runs `jobmirror companies pause` (nothing new is claimed for the company
    /// once it is committed; a job in hand is finished first).
    #[serde(rename_all = "camelCase")]
    CompanyPaused { company_id: String },
    /// An operator runs `jobmirror companies resume`.
    #[serde(rename_all = "camelCase")]
    CompanyResumed { company_id: String },
    /// From now on the fake's job listings answer with cursors that are positions, and right
    /// after the next first page of a job listing another integration starts the job (or,
    /// with `fail`, the job fails and leaves every open listing): a listing over several
    /// pages shifts.
    #[serde(rename_all = "camelCase")]
    ListingShift {
        job_id: String,
        #[serde(default)]
        fail: bool,
    },
    /// The token endpoint refuses the OAuth client (`invalid_client`), or accepts it again.
    OauthClient { accepted: bool },
    /// While the next handler run (of `jobId`, or of any job) works, before any of its results
    /// is in: an operator changes companies (`ops`, in order; each on the company of the job
    /// the handler works on unless it names another), and with `intoWarning` Pleo's clock moves
    /// on until less than `deadline_warning_secs` remain for the job, as under a slow handler
    /// (by 10 minutes at most). Every other lane takes a round meanwhile; the run's own lane
    /// waits, as a busy lane does.
    #[serde(rename_all = "camelCase")]
    WhileHandlerRuns {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        job_id: Option<String>,
        #[serde(default)]
        ops: Vec<CompanyOp>,
        #[serde(default)]
        into_warning: bool,
    },
}

/// An operator's `jobmirror companies` command, run while a handler works.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CompanyOp {
    pub op: CompanyChange,
    /// The company; none: the company of the job the handler works on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub company_id: Option<String>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CompanyChange {
    Pause,
    Resume,
    Remove,
    Add,
}

impl Event {
    /// Whether the event needs OAuth (companies with pairs of their own).
    pub fn uses_oauth(&self) -> bool {
        matches!(
            self,
            Event::CompanyAdded { oauth: true, .. }
                | Event::TokensRevoked { .. }
                | Event::Reauthorized { .. }
                | Event::OauthClient { .. }
        )
    }
}

impl Snapshot {
    pub fn load(path: &Path) -> anyhow::Result<Snapshot> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("snapshot {}: {e}", path.display()))?;
        Snapshot::parse(&text).map_err(|e| anyhow::anyhow!("snapshot {}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Snapshot> {
        let probe: Value = serde_json::from_str(text)?;
        match probe.get("version").and_then(Value::as_u64) {
            Some(v) if v == u64::from(VERSION) => {}
            Some(v) => anyhow::bail!("version {v} is not supported (expected {VERSION})"),
            None => anyhow::bail!("no \"version\" field"),
        }
        let s: Snapshot = serde_json::from_value(probe)?;
        s.validate()?;
        Ok(s)
    }

    pub fn start_millis(&self) -> anyhow::Result<Millis> {
        Millis::parse_rfc3339(&self.start)
            .ok_or_else(|| anyhow::anyhow!("start {:?} is not an RFC 3339 time", self.start))
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.start_millis()?;
        if self.companies.is_empty() {
            anyhow::bail!("companies: at least one company is needed");
        }
        for key in self.service.keys() {
            if OWNED_KEYS.contains(&key.as_str()) {
                anyhow::bail!("service.{key}: set by the replay itself, not by a snapshot");
            }
            if !crate::config::is_key(key) {
                anyhow::bail!("service.{key}: not a jobmirror setting");
            }
        }
        let mut last = f64::NEG_INFINITY;
        for (i, step) in self.timeline.iter().enumerate() {
            if !step.at.is_finite() || step.at < 0.0 {
                anyhow::bail!("timeline[{i}]: at {} is not a time after start", step.at);
            }
            if step.at < last {
                anyhow::bail!(
                    "timeline[{i}]: at {} comes before the entry above it",
                    step.at
                );
            }
            last = step.at;
            if let Event::Webhook {
                webhook_id, body, ..
            } = &step.event
                && body.is_object()
                && webhook_id.is_none()
            {
                anyhow::bail!("timeline[{i}]: a webhook to be signed needs a webhookId");
            }
        }
        if let Some(e) = self.end_secs
            && (!e.is_finite() || e < last)
        {
            anyhow::bail!("endSecs {e} ends before the timeline does ({last})");
        }
        Ok(())
    }

    /// The service setting `key` as text, if the snapshot sets it.
    pub fn setting(&self, key: &str) -> Option<String> {
        self.service.get(key).map(|v| match v {
            Value::String(s) => s.clone(),
            Value::Array(a) => a
                .iter()
                .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_owned))
                .collect::<Vec<_>>()
                .join(","),
            other => other.to_string(),
        })
    }

    /// When the replay ends, in seconds after start.
    pub fn end(&self, poll_interval_secs: f64) -> f64 {
        self.end_secs.unwrap_or_else(|| {
            let last = self.timeline.last().map_or(0.0, |s| s.at);
            (last + 2.0 * poll_interval_secs).max(3600.0)
        })
    }
}

/// Options of `jobmirror record`.
#[derive(Clone, Debug, Default)]
pub struct RecordOptions {
    /// Replace names, notes and file URLs.
    pub redact: bool,
    pub description: Option<String>,
    /// The snapshot's start; default: the clock's now.
    pub at: Option<Millis>,
}

/// Reads the open jobs of `companies` (with their items) through the API, GETs only.
pub fn record(
    client: &PleoClient,
    clock: &SharedClock,
    companies: &[String],
    opts: &RecordOptions,
) -> anyhow::Result<Snapshot> {
    let start = opts.at.unwrap_or_else(|| clock.now());
    let mut jobs = Vec::new();
    for company in companies {
        let listing = client
            .list_jobs(company, &[status::PENDING, status::IN_PROGRESS])
            .map_err(|e| anyhow::anyhow!("listing jobs of company {company}: {e}"))?;
        for (id, error) in &listing.rejected {
            log::warn!(
                "company {company}: not recorded, not a readable job ({}): {error}",
                id.as_deref().unwrap_or("no id")
            );
        }
        for job in listing.jobs {
            let items = client
                .list_job_items(&job.id)
                .map_err(|e| anyhow::anyhow!("job items of {}: {e}", job.id))?;
            let mut export_items = client
                .list_export_items(&job.id)
                .map_err(|e| anyhow::anyhow!("export items of {}: {e}", job.id))?;
            if opts.redact {
                for item in &mut export_items {
                    redact(item, false);
                }
            }
            let mut extra: Map<String, Value> = match job.raw.clone() {
                Value::Object(m) => m,
                _ => Map::new(),
            };
            if opts.redact {
                let mut v = Value::Object(extra);
                redact(&mut v, false);
                extra = match v {
                    Value::Object(m) => m,
                    _ => Map::new(),
                };
            }
            // The fields JobSpec models by name; the rest travels in `extra`.
            for k in [
                "id",
                "companyId",
                "status",
                "createdAt",
                "expiresIn",
                "numberOfItems",
            ] {
                extra.remove(k);
            }
            jobs.push(JobSpec {
                id: Some(job.id.clone()),
                company_id: job.company_id.clone(),
                status: job.status.clone(),
                created_at: Some(job.created_at.to_rfc3339()),
                expires_in: Some(job.expires_in_secs),
                job_items: Some(items),
                export_items: Some(export_items),
                extra,
                ..JobSpec::default()
            });
        }
    }
    Ok(Snapshot {
        version: VERSION,
        description: Some(opts.description.clone().unwrap_or_else(|| {
            format!(
                "recorded from the Pleo API at {start}{}",
                if opts.redact { " (redacted)" } else { "" }
            )
        })),
        start: start.to_rfc3339(),
        end_secs: None,
        companies: companies.to_vec(),
        service: BTreeMap::new(),
        api_keys: Vec::new(),
        expires_in: None,
        seed: 0,
        jobs,
        timeline: Vec::new(),
    })
}

/// Keys whose string values are people's or suppliers' words, not identifiers.
const REDACTED_KEYS: &[&str] = &[
    "name",
    "firstname",
    "lastname",
    "displayname",
    "email",
    "note",
    "notes",
    "comment",
    "description",
    "merchantname",
    "suppliername",
    "vendorname",
];

/// Replaces names and notes with `[redacted]` and file URLs with placeholders, in place.
pub fn redact(v: &mut Value, in_files: bool) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                let key = k.to_ascii_lowercase();
                if REDACTED_KEYS.contains(&key.as_str()) && x.is_string() {
                    *x = json!("[redacted]");
                } else {
                    redact(x, in_files || key == "files");
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| redact(x, in_files)),
        Value::String(s) if in_files && (s.starts_with("http://") || s.starts_with("https://")) => {
            *s = "https://redacted.invalid/file".into();
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal(timeline: &str) -> String {
        format!(
            r#"{{"version":2,"start":"2026-11-24T08:00:00Z","companies":["c1"],"timeline":{timeline}}}"#
        )
    }

    #[test]
    fn refuses_what_it_cannot_replay() {
        assert!(Snapshot::parse(&minimal("[]")).is_ok());
        let refused = |text: &str| Snapshot::parse(text).unwrap_err().to_string();
        assert!(refused(r#"{"version":1,"jobs":[]}"#).contains("version 1"));
        let unordered = minimal(r#"[{"at":5,"event":"trigger"},{"at":2,"event":"trigger"}]"#);
        assert!(refused(&unordered).contains("timeline[1]"));
        let unsigned = minimal(r#"[{"at":1,"event":"webhook","body":{"eventType":"x"}}]"#);
        assert!(refused(&unsigned).contains("webhookId"));
        let owned = r#"{"version":2,"start":"2026-11-24T08:00:00Z","companies":["c1"],"service":{"db":"/tmp/x"}}"#;
        assert!(refused(owned).contains("service.db"));
        let unknown = r#"{"version":2,"start":"2026-11-24T08:00:00Z","companies":["c1"],"service":{"pol_interval":"1"}}"#;
        assert!(Snapshot::parse(unknown).is_err());
    }

    #[test]
    fn redaction_keeps_ids_and_amounts() {
        let mut item = json!({
            "accountingEntryId": "e1", "note": "dinner with Ann",
            "supplier": {"name": "Cafe Ann", "id": "s1"},
            "amount": {"inWalletCurrency": {"currency": "DKK", "value": 1200}},
            "files": [{"url": "https://files.pleo.io/r/1.png", "id": "f1"}],
            "_links": {"self": {"href": "/v3/export-items/e1"}},
        });
        redact(&mut item, false);
        assert_eq!(item["note"], "[redacted]");
        assert_eq!(item["supplier"]["name"], "[redacted]");
        assert_eq!(item["supplier"]["id"], "s1");
        assert_eq!(item["files"][0]["url"], "https://redacted.invalid/file");
        assert_eq!(item["files"][0]["id"], "f1");
        assert_eq!(item["amount"]["inWalletCurrency"]["value"], 1200);
        assert_eq!(item["_links"]["self"]["href"], "/v3/export-items/e1");
    }
}
