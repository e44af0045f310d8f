//! Replays that act on a handler run while it works (`while_handler_runs`): operators move
//! companies between lanes, pause them, and Pleo's clock runs into the job's warning window.
//! Every run is watched where the handler starts and ends; the invariants are checked after
//! every step.

use std::path::Path;

use jobmirror::replay::snapshot::Snapshot;

use crate::replay::play;
use jobmirror::store::Store;
use serde_json::{Value, json};

const A: &str = "a1a1a1a1-0000-4000-8000-0000000000a1";
const B: &str = "b2b2b2b2-0000-4000-8000-0000000000b2";
const C: &str = "c3c3c3c3-0000-4000-8000-0000000000c3";

fn snapshot(service: Value, jobs: Value, timeline: Value) -> Snapshot {
    Snapshot::parse(
        &json!({
            "version": 2,
            "start": "2026-11-24T08:00:00Z",
            "endSecs": 3000,
            "companies": [A, B],
            "service": service,
            "jobs": jobs,
            "timeline": timeline,
        })
        .to_string(),
    )
    .unwrap()
}

fn kinds(db: &Path, job: &str) -> Vec<String> {
    Store::open_read_only(db)
        .unwrap()
        .events(Some(job))
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect()
}

#[test]
fn a_company_paused_resumed_around_a_new_one_keeps_its_running_job_on_one_lane() {
    // Two lanes: A on lane 0, B on lane 1. While B's job runs, B is paused (lane 1 empties),
    // C is added (to the emptier lane 1) and B resumed: counting companies alone would put B
    // on lane 0, which would find B's job in hand and run its handler a second time.
    let snap = snapshot(
        json!({"lanes": 2, "poll_interval_secs": 60}),
        json!([{"id": "jb", "companyId": B, "items": 8, "createdSecsAgo": 30}]),
        json!([{"at": 0, "event": "while_handler_runs", "jobId": "jb", "ops": [
            {"op": "pause"}, {"op": "add", "companyId": C}, {"op": "resume"}]}]),
    );
    let (s, r, d) = play(snap);
    assert_eq!(s.acted_on_runs, 1, "{}", s.render());
    assert_eq!(r.fake().job("jb").unwrap().status, "completed");
    assert_eq!(r.fake().started_events_for("jb"), 1);
    let updates = r.fake().item_updates("jb");
    let mut entries: Vec<&String> = updates.iter().map(|(e, _)| e).collect();
    entries.sort();
    entries.dedup();
    assert_eq!(
        (updates.len(), entries.len()),
        (8, 8),
        "each item reported once: {updates:?}"
    );
    let k = kinds(&d.path().join("replay.db"), "jb");
    assert_eq!(
        k.iter().filter(|k| *k == "processing_started").count(),
        1,
        "{k:?}"
    );
}

#[test]
fn a_company_paused_while_its_job_runs_claims_nothing_new_until_resumed() {
    let snap = snapshot(
        json!({"lanes": 1, "poll_interval_secs": 60}),
        json!([
            {"id": "ja1", "companyId": A, "items": 2, "createdSecsAgo": 60},
            {"id": "ja2", "companyId": A, "items": 2, "createdSecsAgo": 30}
        ]),
        json!([
            {"at": 0, "event": "while_handler_runs", "jobId": "ja1", "ops": [{"op": "pause"}]},
            {"at": 5, "event": "trigger"},
            {"at": 600, "event": "company_resumed", "companyId": A}
        ]),
    );
    let (s, r, _d) = play(snap);
    assert_eq!(s.acted_on_runs, 1, "{}", s.render());
    assert_eq!(r.fake().job("ja1").unwrap().status, "completed");
    let start = jobmirror::clock::Millis::parse_rfc3339("2026-11-24T08:00:00Z").unwrap();
    let claim = r
        .fake()
        .claims()
        .into_iter()
        .find(|c| c.job_id == "ja2" && c.accepted)
        .expect("ja2 is claimed once A is resumed");
    assert!(
        start.until(claim.at) >= 600_000,
        "ja2 claimed {} ms after the start, before the resume",
        start.until(claim.at)
    );
}

#[test]
fn a_handler_working_into_the_warning_window_journals_the_warning_while_it_runs() {
    // 900 s to live; the handler works until less than the 600 s warning remain.
    let snap = snapshot(
        json!({"lanes": 1, "poll_interval_secs": 60}),
        json!([{"id": "jw", "companyId": A, "items": 3, "createdSecsAgo": 10, "expiresIn": 900}]),
        json!([{"at": 0, "event": "while_handler_runs", "jobId": "jw", "intoWarning": true}]),
    );
    let (s, r, d) = play(snap);
    assert_eq!(s.acted_on_runs, 1, "{}", s.render());
    let k = kinds(&d.path().join("replay.db"), "jw");
    let events: Vec<String> = Store::open_read_only(&d.path().join("replay.db"))
        .unwrap()
        .events(Some("jw"))
        .unwrap()
        .into_iter()
        .map(|e| format!("{} {}", e.kind, e.detail))
        .collect();
    assert_eq!(
        r.fake().job("jw").unwrap().status,
        "completed",
        "{events:#?}"
    );
    let pos = |kind: &str| k.iter().position(|x| x == kind);
    let (started, warned, finished) = (
        pos("processing_started"),
        pos("deadline_warning"),
        pos("finish_sent"),
    );
    assert!(
        started.is_some() && started < warned && warned < finished,
        "the warning sits between the run's start and the finishing event: {k:?}"
    );
}
