//! Operator commands over the database: `status`, `jobs`, `show`, `why`, `doctor`, `backup`
//! and `prune`. Each report is built once as JSON and rendered as text from it, so the two
//! forms never disagree.
//!
//! Invariants: everything but `backup` (which writes only its target) and `prune` opens the
//! database read-only; nothing here talks to Pleo; "now" is a parameter (`--at` in the CLI),
//! so a report can be reproduced for any moment.
//!
//! Files: this one holds `status`, `jobs`, `show`, `backup`, `prune` and the helpers every
//! report shares; `why` and `doctor` are their own files; `admin` serves `/metrics` and
//! `/healthz` from the running service.

pub mod admin;
pub mod doctor;
pub mod shared;
pub mod why;

use std::path::Path;

use serde_json::{Value, json};

use crate::clock::Millis;
use crate::config::Config;
use crate::store::{JobRow, ProcState, Store};

/// The settings the reports need, from the configuration when it loads.
#[derive(Clone, Debug)]
pub struct Settings {
    pub claim_min_left_ms: i64,
    pub poll_interval_ms: i64,
    pub deadline_warning_ms: i64,
    /// The companies served, when the configuration names them.
    pub companies: Option<Vec<String>>,
    /// `doctor --before-start`: the service is not expected to run on the file yet.
    pub before_start: bool,
    /// `company_lease_secs` in milliseconds (a shared PostgreSQL database).
    pub lease_ms: i64,
}

impl Settings {
    pub fn from_config(cfg: &Config, companies_known: bool) -> Settings {
        Settings {
            claim_min_left_ms: cfg.claim_min_left.as_millis() as i64,
            poll_interval_ms: cfg.poll_interval.as_millis() as i64,
            deadline_warning_ms: cfg.deadline_warning.as_millis() as i64,
            companies: companies_known.then(|| cfg.company_ids.clone()),
            before_start: false,
            lease_ms: cfg.shared_db.company_lease_secs as i64 * 1000,
        }
    }
}

pub(crate) fn t(m: Millis) -> String {
    m.to_rfc3339()
}

pub(crate) fn left(now: Millis, at: Millis) -> i64 {
    now.until(at) / 1000
}

pub(crate) fn job_json(j: &JobRow, now: Millis) -> Value {
    json!({
        "job_id": j.id, "company_id": j.company_id, "pleo_status": j.status,
        "state": j.proc_state.as_str(), "created_at": t(j.created_at),
        "expires_at": t(j.expires_at),
        // A finished job has no time left to count: null, shown as "-" (finished).
        "seconds_left": if j.proc_state.is_final() { Value::Null } else { json!(left(now, j.expires_at)) },
        "claim_attempts": j.claim_attempts, "number_of_items": j.number_of_items,
    })
}

/// `jobmirror status`: per company, jobs by state, last poll, last webhook, next deadline.
pub fn status(store: &Store, now: Millis) -> anyhow::Result<Value> {
    let mut companies = Vec::new();
    let webhooks = store.last_webhooks()?;
    let mut reauth = reauthorizations(store)?;
    let mut summaries = store.company_summaries()?;
    // A company needing re-authorization is shown even before it has a pass on record.
    for c in reauth.keys() {
        if !summaries.iter().any(|s| &s.company_id == c) {
            summaries.push(crate::store::CompanySummary::empty(c));
        }
    }
    summaries.sort_by(|a, b| a.company_id.cmp(&b.company_id));
    for s in summaries {
        let last_webhook = webhooks.get(&s.company_id).copied();
        let mut c = json!({
            "company_id": s.company_id,
            "jobs_by_state": s.by_state.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "last_poll_at": s.last_poll_at.map(t),
            "last_poll_error": s.last_poll_error,
            "last_webhook_at": last_webhook.map(t),
            "next_deadline": s.next_deadline.as_ref().map(|(id, at)| json!({"job_id": id, "expires_at": t(*at), "seconds_left": left(now, *at)})),
        });
        if let Some(r) = reauth.remove(&s.company_id) {
            c["needs_reauthorization"] = r;
        }
        companies.push(c);
    }
    Ok(json!({"at": t(now), "companies": companies}))
}

/// Companies whose own OAuth refresh token was refused: `{refused_at, why}` by company.
pub fn reauthorizations(
    store: &Store,
) -> anyhow::Result<std::collections::BTreeMap<String, Value>> {
    // A database from before companies had pairs of their own has none to show.
    Ok(store
        .companies_needing_reauthorization()
        .unwrap_or_default()
        .into_iter()
        .map(|(c, at, why)| (c, json!({"refused_at": t(at), "why": why})))
        .collect())
}

pub fn status_text(v: &Value) -> String {
    let mut out = shared::text(v);
    let companies = v["companies"].as_array().cloned().unwrap_or_default();
    if companies.is_empty() {
        return "no companies in the database yet\n".into();
    }
    for c in companies {
        out.push_str(&format!(
            "company {}\n",
            c["company_id"].as_str().unwrap_or("")
        ));
        let states: Vec<String> = c["jobs_by_state"]
            .as_object()
            .map(|m| m.iter().map(|(k, n)| format!("{k}={n}")).collect())
            .unwrap_or_default();
        out.push_str(&format!(
            "  jobs:          {}\n",
            if states.is_empty() {
                "none".into()
            } else {
                states.join(" ")
            }
        ));
        let poll = match (c["last_poll_at"].as_str(), c["last_poll_error"].as_str()) {
            (None, _) => "never".to_owned(),
            (Some(at), None) => format!("{at} (ok)"),
            (Some(at), Some(e)) => format!("{at} (failed: {e})"),
        };
        out.push_str(&format!("  last poll:     {poll}\n"));
        if let Some(why) = c["needs_reauthorization"]["why"].as_str() {
            out.push_str(&format!("  NEEDS RE-AUTHORIZATION: {why}\n"));
        }
        out.push_str(&format!(
            "  last webhook:  {}\n",
            c["last_webhook_at"].as_str().unwrap_or("never")
        ));
        let d = &c["next_deadline"];
        out.push_str(&format!(
            "  next deadline: {}\n",
            if d.is_null() {
                "none".to_owned()
            } else {
                format!(
                    "job {} expires {} ({} s left)",
                    d["job_id"].as_str().unwrap_or(""),
                    d["expires_at"].as_str().unwrap_or(""),
                    d["seconds_left"]
                )
            }
        ));
    }
    out
}

/// `jobmirror jobs`: jobs in pick order per company.
pub fn jobs(
    store: &Store,
    now: Millis,
    company: Option<&str>,
    state: Option<&str>,
    limit: usize,
) -> anyhow::Result<Value> {
    if let Some(s) = state
        && ProcState::parse(s).is_none()
    {
        anyhow::bail!(crate::config::UsageError(format!(
            "unknown state {s:?}; states: {}",
            ProcState::ALL.map(|p| p.as_str()).join(", ")
        )));
    }
    let rows = store.list_jobs(company, state, limit)?;
    Ok(json!({"at": t(now), "jobs": rows.iter().map(|j| job_json(j, now)).collect::<Vec<_>>()}))
}

pub fn jobs_text(v: &Value) -> String {
    let rows = v["jobs"].as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        return "no jobs\n".into();
    }
    let mut out = format!(
        "{:<38} {:<38} {:<10} {:<21} {:<25} {:>8}\n",
        "company", "job", "state", "pleo status", "created", "left s"
    );
    for j in rows {
        out.push_str(&format!(
            "{:<38} {:<38} {:<10} {:<21} {:<25} {:>8}\n",
            j["company_id"].as_str().unwrap_or(""),
            j["job_id"].as_str().unwrap_or(""),
            j["state"].as_str().unwrap_or(""),
            j["pleo_status"].as_str().unwrap_or(""),
            j["created_at"].as_str().unwrap_or(""),
            j["seconds_left"]
                .as_i64()
                .map_or("-".to_owned(), |s| s.to_string())
        ));
    }
    out
}

pub(crate) fn unknown_job(id: &str) -> anyhow::Error {
    crate::config::UsageError(format!("no job {id:?} in the database")).into()
}

/// `jobmirror show JOB`: the job, its items and its timeline.
pub fn show(store: &Store, now: Millis, id: &str) -> anyhow::Result<Value> {
    let j = store.job(id)?.ok_or_else(|| unknown_job(id))?;
    let items = store.item_counts(id)?;
    let events: Vec<Value> = store
        .events(Some(id))?
        .into_iter()
        .map(|e| json!({"seq": e.seq, "at": t(e.at), "kind": e.kind, "detail": e.detail}))
        .collect();
    let raw = store.job_raw(id)?.unwrap_or_default();
    // The job's failure as Pleo has it (what jobmirror sent with `failed`, or Pleo's own).
    let failure = match (
        raw["failureReasonType"].as_str(),
        raw["failureReason"].as_str(),
    ) {
        (None, None) => Value::Null,
        (kind, reason) => json!({"type": kind, "reason": reason}),
    };
    Ok(json!({
        "at": t(now),
        "job": job_json(&j, now),
        "failure": failure,
        "items": {"todo": items.todo, "successful": items.successful, "failed": items.failed, "unreported": items.unreported},
        "problem_items": store.problem_items(id)?,
        "timeline": events,
    }))
}

pub fn show_text(v: &Value) -> String {
    let j = &v["job"];
    let i = &v["items"];
    let mut out = format!(
        "job {} of company {}\n  pleo status:  {}\n  state:        {}\n  created:      {}\n  expires:      {} ({})\n  claims sent:  {}\n  items:        {} in all: {} successful, {} failed, {} to do, {} not yet reported\ntimeline:\n",
        j["job_id"].as_str().unwrap_or(""),
        j["company_id"].as_str().unwrap_or(""),
        j["pleo_status"].as_str().unwrap_or(""),
        j["state"].as_str().unwrap_or(""),
        j["created_at"].as_str().unwrap_or(""),
        j["expires_at"].as_str().unwrap_or(""),
        j["seconds_left"]
            .as_i64()
            .map_or("finished".to_owned(), |s| format!("{s} s left")),
        j["claim_attempts"],
        j["number_of_items"],
        i["successful"],
        i["failed"],
        i["todo"],
        i["unreported"],
    );
    if let Some(f) = v["failure"].as_object() {
        let header_end = out.find("\ntimeline:\n").map_or(out.len(), |i| i + 1);
        out.insert_str(
            header_end,
            &format!(
                "  failure:      {}: {}\n",
                f["type"].as_str().unwrap_or("-"),
                f["reason"].as_str().unwrap_or("-")
            ),
        );
    }
    let problems = v["problem_items"].as_array().cloned().unwrap_or_default();
    if !problems.is_empty() {
        let at = out.find("timeline:\n").unwrap_or(out.len());
        let mut block = String::from("failed or refused items:\n");
        for p in &problems {
            block.push_str(&format!(
                "  {}  {}  {}: {}{}\n",
                p["accounting_entry_id"].as_str().unwrap_or(""),
                p["our_status"].as_str().unwrap_or(""),
                p["failure_reason_type"].as_str().unwrap_or("-"),
                p["failure_reason"].as_str().unwrap_or("-"),
                p["report_error"]
                    .as_str()
                    .map(|e| format!("; report refused: {e}"))
                    .unwrap_or_default()
            ));
        }
        out.insert_str(at, &block);
    }
    for e in v["timeline"].as_array().cloned().unwrap_or_default() {
        out.push_str(&format!(
            "  {:>5}  {}  {:<18} {}\n",
            e["seq"].as_i64().unwrap_or(0),
            e["at"].as_str().unwrap_or(""),
            e["kind"].as_str().unwrap_or(""),
            e["detail"]
        ));
    }
    out
}

/// `jobmirror backup FILE`: an online copy, created with mode 0600; refuses to overwrite. A
/// FILE that is a folder gets a new file in it named by the time taken
/// (`jobmirror-20261206T190000.123Z.db`), so a daily or hourly backup never collides.
pub fn backup(store: &Store, dest: &Path) -> anyhow::Result<Value> {
    if dest.is_dir() {
        let stamp = time::OffsetDateTime::now_utc()
            .format(time::macros::format_description!(
                "[year][month][day]T[hour][minute][second].[subsecond digits:3]Z"
            ))
            .unwrap_or_else(|_| "now".into());
        let mut path = dest.join(format!("jobmirror-{stamp}.db"));
        let mut n = 1;
        while path.exists() {
            n += 1;
            path = dest.join(format!("jobmirror-{stamp}-{n}.db"));
        }
        return backup(store, &path);
    }
    if dest.exists() {
        anyhow::bail!(crate::config::UsageError(format!(
            "{} already exists; backup writes a new file",
            dest.display()
        )));
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(dest)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dest.display()))?;
    if let Err(e) = store.backup_to(dest) {
        let _ = std::fs::remove_file(dest);
        return Err(e.into());
    }
    let bytes = std::fs::metadata(dest).map(|m| m.len()).unwrap_or(0);
    let copy = Store::open_read_only(dest)?;
    let check = copy.quick_check()?;
    Ok(json!({"file": dest.display().to_string(), "bytes": bytes, "quick_check": check.join("; ")}))
}

pub fn backup_text(v: &Value) -> String {
    format!(
        "backed up to {} ({} bytes; quick_check: {})\n",
        v["file"].as_str().unwrap_or(""),
        v["bytes"],
        v["quick_check"].as_str().unwrap_or("")
    )
}

pub fn prune_text(v: &Value) -> String {
    format!(
        "{}{} jobs trimmed ({} item rows), {} webhook bodies cleared, {} delivery rows and {} sync runs deleted\n",
        if v["dry_run"] == true {
            "would prune: "
        } else {
            "pruned: "
        },
        v["jobs_trimmed"],
        v["job_items_deleted"],
        v["webhook_bodies_cleared"],
        v["webhook_rows_deleted"],
        v["sync_runs_deleted"]
    )
}
