//! `jobmirror doctor`: the database's health and the service's: integrity, WAL size, poll and
//! webhook freshness, deadlines of jobs in hand, companies whose listing fails or whose
//! credential Pleo refuses, and whether a service runs. Each check is `ok`, `warn` or `fail`.

use std::path::Path;

use serde_json::{Value, json};

use crate::clock::Millis;
use crate::ops::{Settings, t};
use crate::store::Store;

/// `jobmirror doctor`: integrity, WAL size, poll and webhook freshness, pending deadlines.
/// Each check is `ok`, `warn` or `fail`.
pub fn doctor(store: &Store, db: &Path, now: Millis, s: &Settings) -> anyhow::Result<Value> {
    let mut checks = Vec::new();
    // Before the service's first start on this file (a restored replica, a copy): what only a
    // running service keeps fresh (polls, a service on the file, deadlines) is a warning at
    // most; the file itself (integrity) still fails. So a sound restored file passes and a
    // broken one does not.
    let mut check = |name: &str, level: &str, detail: String| {
        let level = if s.before_start && level == "fail" && name != "integrity" {
            "warn"
        } else {
            level
        };
        checks.push(json!({"check": name, "level": level, "detail": detail}));
    };
    let qc = store.quick_check()?;
    if qc == ["ok"] {
        check("integrity", "ok", "PRAGMA quick_check: ok".into());
    } else {
        check("integrity", "fail", qc.join("; "));
    }
    let wal = std::fs::metadata(format!("{}-wal", db.display()))
        .map(|m| m.len())
        .unwrap_or(0);
    let wal_level = if wal > 256 * 1024 * 1024 {
        "warn"
    } else {
        "ok"
    };
    check(
        "wal_size",
        wal_level,
        format!(
            "{} KiB (a long-held read transaction stops checkpoints)",
            wal / 1024
        ),
    );
    let stale_ms = 3 * s.poll_interval_ms;
    let mut known: std::collections::HashMap<String, crate::store::CompanySummary> = store
        .company_summaries()?
        .into_iter()
        .map(|s| (s.company_id.clone(), s))
        .collect();
    let companies = match &s.companies {
        Some(c) => c.clone(),
        None => {
            let mut all: Vec<String> = known.keys().cloned().collect();
            all.sort();
            all
        }
    };
    for c in &companies {
        let sum = known
            .remove(c)
            .unwrap_or_else(|| crate::store::CompanySummary::empty(c));
        let (level, detail) = match (sum.last_poll_at, &sum.last_poll_error) {
            (None, _) => ("fail", format!("company {c}: never polled")),
            (Some(at), Some(e))
                if crate::wire::is_refusal_text(e)
                    || sum.failed_in_a_row >= crate::health::FAILING_AFTER =>
            {
                (
                    "fail",
                    format!(
                        "company {c}: the last {} passes failed, the last at {at}: {e}{}",
                        sum.failed_in_a_row,
                        if crate::wire::is_refusal_text(e) {
                            " (Pleo refuses the credential: fix the key, or authorize the company again)"
                        } else {
                            ""
                        }
                    ),
                )
            }
            (Some(at), Some(e)) => ("warn", format!("company {c}: last pass {at} failed: {e}")),
            (Some(at), None) if now.until(at) < -stale_ms => (
                "fail",
                format!(
                    "company {c}: last poll {at}, {} s ago (more than 3 poll intervals)",
                    -now.until(at) / 1000
                ),
            ),
            (Some(at), None) => ("ok", format!("company {c}: last poll {at}")),
        };
        check("poll", level, detail);
    }
    // A company whose own OAuth refresh token was refused is not served until it is
    // authorized again: its jobs would expire unseen.
    for (c, r) in crate::ops::reauthorizations(store)? {
        check(
            "oauth",
            "fail",
            format!(
                "company {c} needs re-authorization (refused at {}): {}",
                r["refused_at"].as_str().unwrap_or(""),
                r["why"].as_str().unwrap_or("")
            ),
        );
    }
    // The OAuth app itself refused at the token endpoint (journaled by the service when it
    // starts and when it ends): every pair is kept, but nothing is refreshed meanwhile.
    if let Some(e) = store.last_event_of(&["oauth_client_refused", "oauth_client_accepted"])?
        && e.kind == "oauth_client_refused"
    {
        check(
            "oauth_client",
            "fail",
            format!(
                "the OAuth token endpoint refuses the client since {} ({} {}): check pleo_oauth_client_id and the client secret; refreshes resume by themselves once it is accepted",
                e.at,
                e.detail["status"],
                e.detail["error"].as_str().unwrap_or("")
            ),
        );
    }
    let b = store.delivery_backlog()?;
    let (level, detail) = match b.oldest_unprocessed {
        Some(o) if now.until(o) < -60_000 => (
            "warn",
            format!(
                "{} deliveries not read yet, the oldest {} s old",
                b.unprocessed,
                -now.until(o) / 1000
            ),
        ),
        _ => (
            "ok",
            format!(
                "{} deliveries waiting; last received {}",
                b.unprocessed,
                b.last_received.map_or("never".into(), t)
            ),
        ),
    };
    check("webhooks", level, detail);
    let held = store.in_flight()?;
    if held.is_empty() {
        check("deadlines", "ok", "no job in hand".into());
    }
    // A shared database: instances are known by their heartbeats, on whatever host.
    let shared = crate::ops::shared::doctor_check(store, s.lease_ms)?;
    let running: Vec<u32> = store
        .instances()?
        .into_iter()
        .filter(|p| is_jobmirror_process(*p))
        .collect();
    if let Some((level, detail)) = shared {
        check("leases", level, detail);
    } else {
        match (held.len(), running.is_empty()) {
            (0, _) => check("service", "ok", service_detail(&running)),
            (n, true) if s.before_start => check(
                "service",
                "ok",
                format!(
                    "{n} jobs in hand and no service running yet (--before-start): the service resumes them at its start, without `started`"
                ),
            ),
            (n, true) => check(
                "service",
                "fail",
                format!(
                    "{n} jobs in hand and no service running on this database: their deadlines pass unattended"
                ),
            ),
            (_, false) => check("service", "ok", service_detail(&running)),
        }
    }
    for j in held {
        let l = now.until(j.expires_at);
        let level = if l <= 0 {
            "fail"
        } else if l <= s.deadline_warning_ms {
            "warn"
        } else {
            "ok"
        };
        check(
            "deadlines",
            level,
            format!(
                "job {} of company {} ({}): {} s left",
                j.id,
                j.company_id,
                j.proc_state.as_str(),
                l / 1000
            ),
        );
    }
    let worst = ["fail", "warn", "ok"]
        .into_iter()
        .find(|w| checks.iter().any(|c| c["level"] == *w))
        .unwrap_or("ok");
    Ok(json!({"at": t(now), "result": worst, "checks": checks}))
}

/// Whether `pid` is a live jobmirror process (a recorded pid may have died or been reused).
/// A process of another user counts when it exists and its command line, if readable, names
/// jobmirror.
pub fn is_jobmirror_process(pid: u32) -> bool {
    let Ok(p) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill(2) with signal 0 sends nothing; it has no memory-safety preconditions.
    let exists = unsafe { libc::kill(p, 0) == 0 }
        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    if !exists {
        return false;
    }
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => String::from_utf8_lossy(&cmdline).contains("jobmirror"),
        Err(_) => true,
    }
}

fn service_detail(running: &[u32]) -> String {
    match running {
        [] => "no service running on this database".to_owned(),
        pids => format!(
            "service running (pid {})",
            pids.iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

pub fn doctor_text(v: &Value) -> String {
    let mut out = String::new();
    for c in v["checks"].as_array().cloned().unwrap_or_default() {
        out.push_str(&format!(
            "{:<4}  {:<10} {}\n",
            c["level"].as_str().unwrap_or(""),
            c["check"].as_str().unwrap_or(""),
            c["detail"].as_str().unwrap_or("")
        ));
    }
    out.push_str(&format!("doctor: {}\n", v["result"].as_str().unwrap_or("")));
    out
}
