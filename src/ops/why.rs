//! `jobmirror why JOB`: which of the processor's rules keeps a job from being processed now
//! (its company's recovery, an older job first, a job in hand, the claim margin, a failed
//! readiness check, a pause, a company needing re-authorization), read from the database alone.

use serde_json::{Value, json};

use crate::clock::Millis;
use crate::ops::{Settings, job_json, left, t, unknown_job};
use crate::store::{ProcState, Store};

/// `jobmirror why JOB`: which rule keeps the job from being processed now.
pub fn why(store: &Store, now: Millis, id: &str, s: &Settings) -> anyhow::Result<Value> {
    let j = store.job(id)?.ok_or_else(|| unknown_job(id))?;
    let last = store.events(Some(id))?.into_iter().last();
    let reauth = crate::ops::reauthorizations(store)?.remove(&j.company_id);
    let open = !matches!(
        j.proc_state,
        ProcState::Done | ProcState::Expired | ProcState::Conflict
    );
    let (verdict, rule, detail): (&str, &str, String) = if let Some(r) = reauth.filter(|_| open) {
        (
            "blocked",
            "needs_reauthorization",
            format!(
                "company {} needs re-authorization: its OAuth refresh token was refused at {}, so nothing is sent to Pleo for it ({})",
                j.company_id,
                r["refused_at"].as_str().unwrap_or(""),
                r["why"].as_str().unwrap_or("")
            ),
        )
    } else if s
        .companies
        .as_ref()
        .is_some_and(|c| !c.contains(&j.company_id))
    {
        (
            "ignored",
            "company_not_served",
            format!(
                "company {} is not served by this configuration (company_ids, or jobmirror companies)",
                j.company_id
            ),
        )
    } else {
        match j.proc_state {
            ProcState::Done => ("finished", "finished", format!("Pleo says {}", j.status)),
            ProcState::Expired => (
                "finished",
                "expired",
                "it expired (expiresIn passed without an update)".into(),
            ),
            ProcState::Conflict => (
                "not ours",
                "held_elsewhere",
                "another integration claimed it (422 on `started`, or seen in_progress)".into(),
            ),
            ProcState::TooLate => (
                "not claimed",
                "too_late",
                "an earlier version left it alone as too close to expiry; it is eligible again while Pleo lists it pending".into(),
            ),
            ProcState::Resume
            | ProcState::Claiming
            | ProcState::Claimed
            | ProcState::Processing => (
                "in hand",
                "being_processed",
                format!(
                    "jobmirror holds it ({}); {} s to its deadline",
                    j.proc_state.as_str(),
                    left(now, j.expires_at)
                ),
            ),
            ProcState::New if j.status != "pending" => (
                "waiting",
                "not_pending",
                format!(
                    "Pleo said {} when last read; the next pass reads it again",
                    j.status
                ),
            ),
            ProcState::New => {
                let active = store.active_job(&j.company_id)?;
                let ahead = store.jobs_ahead(&j)?;
                if let Some(a) = active {
                    (
                        "waiting",
                        "company_busy",
                        format!(
                            "one job per company: {} ({}) is in hand; {} older jobs wait too",
                            a.id,
                            a.proc_state.as_str(),
                            ahead.len()
                        ),
                    )
                } else if now.until(j.expires_at) <= 0 {
                    (
                        "waiting",
                        "deadline_passed",
                        "by this host's clock its deadline has passed; Pleo decides: the next read shows it expired, or it is claimed (a claim refreshes the deadline)".into(),
                    )
                } else if now.until(j.expires_at) <= s.claim_min_left_ms {
                    (
                        "waiting",
                        "claim_cannot_land",
                        format!(
                            "{} s left, under claim_min_left_secs ({} s): `started` could not land in time; it is read again at its deadline",
                            left(now, j.expires_at),
                            s.claim_min_left_ms / 1000
                        ),
                    )
                } else if !ahead.is_empty() {
                    (
                        "waiting",
                        "older_jobs_first",
                        format!(
                            "oldest first: {} older jobs of the company come before it ({})",
                            ahead.len(),
                            ahead.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
                        ),
                    )
                } else {
                    match last.as_ref().map(|e| e.kind.as_str()) {
                        Some("not_ready") => (
                            "waiting",
                            "not_ready",
                            format!(
                                "the readiness check failed ({}): it is not started until the check passes, checked again every poll interval; failed with that reason if it is about to expire",
                                last.as_ref()
                                    .and_then(|e| e.detail["failure_reason"].as_str())
                                    .unwrap_or("no reason given")
                            ),
                        ),
                        Some("claim_failed") => (
                            "waiting",
                            "claim_failed_backoff",
                            "its last claim failed; the company rests conflict_backoff_secs, then it is claimed".into(),
                        ),
                        _ => (
                            "next",
                            "next_in_line",
                            "it is next: the processor claims it at its next round".into(),
                        ),
                    }
                }
            }
        }
    };
    Ok(json!({
        "at": t(now),
        "job": job_json(&j, now),
        "verdict": verdict,
        "rule": rule,
        "detail": detail,
        "last_event": last.map(|e| json!({"seq": e.seq, "at": t(e.at), "kind": e.kind, "detail": e.detail})),
    }))
}

pub fn why_text(v: &Value) -> String {
    let (verdict, rule) = (
        v["verdict"].as_str().unwrap_or(""),
        v["rule"].as_str().unwrap_or(""),
    );
    let mut out = format!(
        "job {}: {verdict}{}\n  {}\n",
        v["job"]["job_id"].as_str().unwrap_or(""),
        if rule == verdict {
            String::new()
        } else {
            format!(" ({rule})")
        },
        v["detail"].as_str().unwrap_or("")
    );
    if let Some(e) = v["last_event"].as_object() {
        out.push_str(&format!(
            "  last journal entry: {} {} {}\n",
            e["at"].as_str().unwrap_or(""),
            e["kind"].as_str().unwrap_or(""),
            e["detail"]
        ));
    }
    out
}
