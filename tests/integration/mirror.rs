//! The sync thread's passes against the fake: paging, read-only detection, re-reads.

use jobmirror::sandbox::{Fault, FaultRule, JobSpec};
use jobmirror::service::sync::PassKind;
use jobmirror::store::ProcState;

use crate::harness::World;

const A: &str = "aaaaaaaa-0000-4000-8000-000000000001";
const B: &str = "bbbbbbbb-0000-4000-8000-000000000002";

#[test]
fn two_hundred_fifty_jobs_across_pages_are_all_mirrored() {
    let w = World::new();
    for i in 0..250 {
        w.pending(A, &format!("job-{i:03}"), 3000 - i);
    }
    let report = w.mirror(&[A]).pass(PassKind::Recovery);
    assert_eq!(report.counts.seen, 250);
    assert_eq!(report.counts.new, 250);
    assert_eq!(report.counts.pages, 3, "page size 100");
    let st = w.store();
    let n: i64 = st
        .conn()
        .query_row(
            "SELECT count(*) FROM export_jobs WHERE company_id = ?1",
            [A],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 250);
    let (pages, seen, new, err): (i64, i64, i64, Option<String>) = st
        .conn()
        .query_row(
            "SELECT pages, jobs_seen, jobs_new, error FROM sync_runs WHERE kind = 'recovery'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    assert_eq!((pages, seen, new, err), (3, 250, 250, None));
    // The client followed `after` cursors, and asked for both statuses with a repeated key.
    let lists: Vec<_> = w
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.path == "/v3/export-jobs")
        .collect();
    assert_eq!(lists.len(), 3);
    assert!(
        lists[0]
            .query
            .contains("statuses=pending&statuses=in_progress"),
        "{}",
        lists[0].query
    );
    assert!(!lists[0].query.contains("after="));
    assert!(lists[1].query.contains("after=") && lists[2].query.contains("after="));
    // A second pass finds nothing new.
    let again = w.mirror(&[A]).pass(PassKind::Recovery);
    assert_eq!((again.counts.new, again.counts.changed), (0, 0));
}

#[test]
fn detection_only_reads() {
    let w = World::new();
    w.pending(A, "p1", 600);
    w.pending(A, "p2", 500);
    w.in_progress(B, "b-held", 900);
    w.pending(B, "b-p", 100);
    let mut m = w.mirror(&[A, B]);
    m.pass(PassKind::Recovery);
    // Jobs leave the listing in every way: claimed elsewhere, finished, expired.
    assert!(w.fake.claim_as_other("p1"));
    w.complete_at_pleo("b-held");
    let before = w.fake.requests().len();
    m.pass(PassKind::Poll);
    assert_eq!(
        w.store().job("p1").unwrap().unwrap().proc_state,
        ProcState::Conflict
    );
    assert_eq!(
        w.store().job("b-held").unwrap().unwrap().proc_state,
        ProcState::Done
    );
    m.pass(PassKind::Trigger);
    w.clock.advance(std::time::Duration::from_secs(3700));
    m.pass(PassKind::Poll);
    let reqs = w.fake.requests();
    let mine = &reqs[before..];
    assert!(!mine.is_empty());
    assert!(
        mine.iter().all(|r| r.method == "GET"),
        "detection sent {:?}",
        mine.iter()
            .map(|r| (&r.method, &r.path))
            .collect::<Vec<_>>()
    );
    // ... and the mirror followed every change.
    let st = w.store();
    assert_eq!(
        st.job("p1").unwrap().unwrap().status,
        "failed",
        "expired while held elsewhere"
    );
    assert_eq!(
        st.job("p2").unwrap().unwrap().proc_state,
        ProcState::Expired
    );
    assert_eq!(st.job("b-p").unwrap().unwrap().status, "failed");
}

#[test]
fn a_failed_pass_is_recorded_and_recovery_is_retried() {
    let w = World::new();
    w.in_progress(A, "held", 600);
    // Every attempt of the first listing fails (5 attempts, all 500).
    for _ in 0..5 {
        w.fake.push_fault(FaultRule {
            skip: 0,
            method: Some("GET".into()),
            path_prefix: Some("/v3/export-jobs".into()),
            fault: Fault::ServerError,
        });
    }
    // A new database: the held job is taken for ours (the database was lost).
    let mut m = w.mirror(&[A]).with_resume_unknown_in_progress(true);
    let r = m.pass(PassKind::Recovery);
    assert_eq!(r.failed_companies, [A]);
    let err: Option<String> = w
        .store()
        .conn()
        .query_row("SELECT error FROM sync_runs", [], |r| r.get(0))
        .unwrap();
    assert!(err.unwrap().contains("500"));
    // The next scheduled pass is still a recovery pass, so the held job is found.
    m.pass(PassKind::Poll);
    assert_eq!(
        w.store().job("held").unwrap().unwrap().proc_state,
        ProcState::Resume
    );
    let kinds: Vec<String> = w
        .store()
        .conn()
        .prepare("SELECT kind FROM sync_runs ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(kinds, ["recovery", "recovery"]);
}

#[test]
fn truncated_listing_is_retried_not_half_stored() {
    let w = World::new();
    for i in 0..5 {
        w.pending(A, &format!("j{i}"), 100 + i);
    }
    w.fake.push_fault(FaultRule {
        skip: 0,
        method: Some("GET".into()),
        path_prefix: Some("/v3/export-jobs".into()),
        fault: Fault::Truncate,
    });
    let r = w.mirror(&[A]).pass(PassKind::Recovery);
    assert!(r.failed_companies.is_empty());
    assert_eq!(r.counts.new, 5);
    assert_eq!(w.clock.sleeps().len(), 1, "one retry after the cut body");
}

#[test]
fn recovery_resumes_every_in_progress_job_it_finds_unless_recorded_as_someone_elses() {
    // Pleo: "An in_progress job found during recovery indicates a previously interrupted
    // workflow: the integration should resume it without sending a started event again."
    // At every start, a job seen pending before (a backup older than the claim) and one never
    // seen (a lost database) are resumed; one this database saw taken while it ran stays
    // someone else's.
    let w = World::new();
    w.pending(A, "seen", 900);
    w.pending(A, "taken", 800);
    let mut m = w.mirror(&[A]);
    m.pass(PassKind::Recovery);
    assert!(w.fake.claim_as_other("taken"));
    m.pass(PassKind::Poll);
    assert_eq!(
        w.store().job("taken").unwrap().unwrap().proc_state,
        ProcState::Conflict
    );
    // Down: the job it had seen and one it never saw are in_progress when it starts again.
    w.pending(A, "unseen", 300);
    assert!(w.fake.claim_as_other("seen"));
    assert!(w.fake.claim_as_other("unseen"));
    w.mirror(&[A]).pass(PassKind::Recovery);
    let st = w.store();
    for (id, want) in [
        ("seen", ProcState::Resume),
        ("unseen", ProcState::Resume),
        ("taken", ProcState::Conflict),
    ] {
        assert_eq!(st.job(id).unwrap().unwrap().proc_state, want, "{id}");
    }
    // The journal says how each was found.
    let kinds: Vec<String> = st
        .events(Some("taken"))
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert!(kinds.contains(&"claimed_elsewhere".to_owned()), "{kinds:?}");
}

#[test]
fn resume_unknown_in_progress_false_leaves_unknown_in_progress_jobs_to_others() {
    // The opt-out, for a deployment where another integration may hold a company's jobs.
    let w = World::new();
    w.in_progress(A, "theirs", 600);
    w.mirror(&[A])
        .with_resume_unknown_in_progress(false)
        .pass(PassKind::Recovery);
    assert_eq!(
        w.store().job("theirs").unwrap().unwrap().proc_state,
        ProcState::Conflict
    );
    // The default resumes it.
    let w = World::new();
    w.in_progress(A, "held", 600);
    w.mirror(&[A]).pass(PassKind::Recovery);
    assert_eq!(
        w.store().job("held").unwrap().unwrap().proc_state,
        ProcState::Resume
    );
}

#[test]
fn one_unreadable_job_in_a_listing_never_hides_the_companys_other_jobs() {
    // A `createdAt` without an offset is not RFC 3339: that entry is skipped and journaled,
    // the rest of the listing is stored, and the company's oldest readable job is claimed.
    let w = World::new();
    w.fake
        .add_job(JobSpec {
            id: Some("bad".into()),
            company_id: A.into(),
            created_secs_ago: Some(900),
            served_created_at: Some("2026-11-24T08:45:00".into()),
            ..JobSpec::default()
        })
        .unwrap();
    w.pending(A, "good-old", 600);
    w.pending(A, "good-young", 300);
    let r = w.mirror(&[A]).pass(PassKind::Recovery);
    assert!(r.failed_companies.is_empty(), "{r:?}");
    assert_eq!(r.counts.new, 2);
    let st = w.store();
    assert!(st.job("bad").unwrap().is_none());
    let skipped = st
        .events(Some("bad"))
        .unwrap()
        .into_iter()
        .find(|e| e.kind == "listing_entry_skipped")
        .expect("journaled");
    assert!(
        skipped.detail["error"]
            .as_str()
            .unwrap()
            .contains("createdAt"),
        "{}",
        skipped.detail
    );
    assert_eq!(st.pick_next(A).unwrap().unwrap().id, "good-old");
}

fn job_delivery(w: &World, webhook_id: &str, company: &str, job: &str) {
    let body = serde_json::json!({"data": {"id": job, "companyId": company},
                                  "eventType": "v1.export-job.created", "eventId": webhook_id})
    .to_string();
    let d = jobmirror::edge::webhook::Delivery {
        webhook_id: webhook_id.into(),
        signed_at: w.clock_now(),
        event_type: Some("v1.export-job.created".into()),
        event_id: Some(webhook_id.into()),
        job_id: Some(job.into()),
        company_id: Some(company.into()),
        body,
        headers: serde_json::json!({"webhook-id": webhook_id}),
    };
    w.store().insert_deliveries(&[&d], w.clock_now()).unwrap();
}

/// (processed, attempts, outcome) of a delivery.
fn delivery(w: &World, webhook_id: &str) -> (bool, u32, String) {
    w.store()
        .conn()
        .query_row(
            "SELECT processed_at IS NOT NULL, attempts, coalesce(outcome, '') FROM webhook_deliveries WHERE webhook_id = ?1",
            [webhook_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap()
}

/// Five 500s: every attempt the client makes at one listing.
fn fail_next_listing(w: &World) {
    for _ in 0..5 {
        w.fake.push_fault(FaultRule {
            method: Some("GET".into()),
            path_prefix: Some("/v3/export-jobs".into()),
            fault: Fault::ServerError,
            skip: 0,
        });
    }
}

#[test]
fn a_delivery_whose_detection_fails_transiently_is_retried_on_its_own_backoff() {
    let w = World::new();
    w.pending(A, "a-1", 60);
    w.pending(B, "b-1", 60);
    let mut m = w.mirror(&[A, B]);
    m.pass(PassKind::Recovery);
    let a_job = w.pending(A, "a-2", 10);
    let b_job = w.pending(B, "b-2", 10);
    job_delivery(&w, "msg_a", A, &a_job);
    job_delivery(&w, "msg_b", B, &b_job);
    // A's listing fails (every client attempt), B's goes through in the same call.
    fail_next_listing(&w);
    assert_eq!(m.process_deliveries().unwrap(), 2);
    let (done, attempts, outcome) = delivery(&w, "msg_a");
    assert!(!done && attempts == 1, "{outcome}");
    assert!(
        outcome.starts_with("attempt 1 of 5 failed: detection for company"),
        "{outcome}"
    );
    assert!(outcome.ends_with("trying again in 5 s"), "{outcome}");
    let (done, _, outcome) = delivery(&w, "msg_b");
    assert!(
        done && outcome.contains("the named job is pending"),
        "{outcome}"
    );
    assert!(w.store().job(&b_job).unwrap().is_some());
    assert!(w.store().job(&a_job).unwrap().is_none());
    // Not due yet: nothing is asked of Pleo.
    assert_eq!(
        m.delivery_retry_in().unwrap(),
        Some(std::time::Duration::from_secs(5))
    );
    let asked = w.fake.requests().len();
    w.clock.advance(std::time::Duration::from_millis(4_999));
    assert_eq!(m.process_deliveries().unwrap(), 0);
    assert_eq!(w.fake.requests().len(), asked);
    // Due: the second attempt fails too and waits twice as long; the third lists the job.
    w.clock.advance(std::time::Duration::from_millis(1));
    fail_next_listing(&w);
    assert_eq!(m.process_deliveries().unwrap(), 1);
    let (done, attempts, outcome) = delivery(&w, "msg_a");
    assert!(
        !done && attempts == 2 && outcome.ends_with("trying again in 10 s"),
        "{outcome}"
    );
    w.clock.advance(std::time::Duration::from_secs(10));
    assert_eq!(m.process_deliveries().unwrap(), 1);
    let (done, attempts, outcome) = delivery(&w, "msg_a");
    assert!(done && attempts == 2, "{outcome}");
    assert!(outcome.contains("the named job is pending"), "{outcome}");
    assert!(w.store().job(&a_job).unwrap().is_some());
    assert_eq!(m.delivery_retry_in().unwrap(), None);
}

#[test]
fn a_delivery_ends_after_five_transient_failures_and_a_refusal_at_once() {
    let w = World::new();
    w.pending(A, "a-1", 60);
    let mut m = w.mirror(&[A]);
    m.pass(PassKind::Recovery);
    job_delivery(&w, "msg_a", A, "a-1");
    let mut waits = Vec::new();
    for attempt in 1..=5 {
        fail_next_listing(&w);
        let asked = w.fake.requests().len();
        assert_eq!(m.process_deliveries().unwrap(), 1, "attempt {attempt}");
        assert_eq!(
            w.fake.requests().len() - asked,
            5,
            "one listing, the client's 5 tries"
        );
        if let Some(wait) = m.delivery_retry_in().unwrap() {
            waits.push(wait.as_secs());
            w.clock.advance(wait);
        }
    }
    assert_eq!(waits, [5, 10, 20, 40]);
    let (done, attempts, outcome) = delivery(&w, "msg_a");
    assert!(done && attempts == 4, "{outcome}");
    assert!(
        outcome.starts_with("not acted on after 5 attempts: detection for company"),
        "{outcome}"
    );
    assert!(outcome.contains("500"), "{outcome}");
    // A refused listing (401 for this company's key) ends its delivery at the first attempt.
    let keyed = World::new();
    keyed.pending(B, "b-1", 60);
    let mut m = keyed.mirror(&[B]);
    m.pass(PassKind::Recovery);
    keyed.fake.push_fault(FaultRule {
        method: Some("GET".into()),
        path_prefix: Some("/v3/export-jobs".into()),
        fault: Fault::Refused { status: 401 },
        skip: 0,
    });
    job_delivery(&keyed, "msg_b", B, "b-1");
    let asked = keyed.fake.requests().len();
    assert_eq!(m.process_deliveries().unwrap(), 1);
    assert_eq!(
        keyed.fake.requests().len() - asked,
        1,
        "a 401 is not retried"
    );
    let (done, attempts, outcome) = delivery(&keyed, "msg_b");
    assert!(done && attempts == 0, "{outcome}");
    assert!(outcome.contains("(refused: not retried)"), "{outcome}");
    assert_eq!(m.delivery_retry_in().unwrap(), None);
}

#[test]
fn a_recovery_pass_journals_its_detections_as_recovery_whatever_it_resumes() {
    for resume in [true, false] {
        let w = World::new();
        w.pending(A, "a-p", 60);
        w.in_progress(A, "a-i", 120);
        w.mirror(&[A])
            .with_resume_unknown_in_progress(resume)
            .pass(PassKind::Recovery);
        for job in ["a-p", "a-i"] {
            let detected = w
                .store()
                .events(Some(job))
                .unwrap()
                .into_iter()
                .find(|e| e.kind == "detected")
                .unwrap();
            assert_eq!(
                detected.detail["source"], "recovery",
                "{job}, resume {resume}"
            );
        }
        let state = w.store().job("a-i").unwrap().unwrap().proc_state;
        let expected = if resume {
            ProcState::Resume
        } else {
            ProcState::Conflict
        };
        assert_eq!(state, expected);
    }
}

/// `sync_runs` keeps the passes worth reading one by one; every pass, quiet polls included,
/// is counted in the company's `company_sync` row (README: "company_sync").
#[test]
fn quiet_polls_leave_no_row_but_are_counted_and_failures_and_findings_keep_theirs() {
    let w = World::new();
    w.pending(A, "j1", 100);
    let mut m = w.mirror(&[A]);
    m.pass(PassKind::Recovery);
    for _ in 0..5 {
        m.pass(PassKind::Poll);
    }
    w.pending(A, "j2", 50);
    m.pass(PassKind::Poll);
    fail_next_listing(&w);
    m.pass(PassKind::Poll);
    let st = w.store();
    let rows: Vec<(String, i64, bool)> = st
        .conn()
        .prepare("SELECT kind, jobs_new, error IS NOT NULL FROM sync_runs ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        rows,
        [
            ("recovery".to_string(), 1, false),
            ("poll".to_string(), 1, false),
            ("poll".to_string(), 0, true),
        ],
        "the five quiet polls left no row"
    );
    let (passes, failed, in_a_row, new, last_error, ok_at): (
        i64,
        i64,
        i64,
        i64,
        Option<String>,
        Option<i64>,
    ) = st
        .conn()
        .query_row(
            "SELECT passes, failed_passes, failed_in_a_row, jobs_new, last_error, last_ok_at \
             FROM company_sync WHERE company_id = ?1",
            [A],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            },
        )
        .unwrap();
    assert_eq!((passes, failed, in_a_row, new), (8, 1, 1, 2));
    assert!(last_error.unwrap().contains("500"));
    assert!(ok_at.is_some());
    let summary = |st: &jobmirror::store::Store| {
        st.company_summaries()
            .unwrap()
            .into_iter()
            .find(|s| s.company_id == A)
            .unwrap()
    };
    let s = summary(&st);
    assert_eq!(s.failed_in_a_row, 1);
    assert!(s.last_poll_error.unwrap().contains("500"));
    // A success ends the failing streak.
    m.pass(PassKind::Poll);
    assert_eq!(summary(&w.store()).failed_in_a_row, 0);
}

/// `shard = "i/n"`: a webhook for a company another shard serves is acknowledged (stored) and
/// left to that shard without a request to Pleo; one for this shard's company is acted on.
#[test]
fn a_delivery_for_another_shards_company_is_left_to_it_without_a_request() {
    use jobmirror::config::Shard;
    let w = World::new();
    let (mine, theirs) = (A, B);
    let count = (2..64)
        .find(|n| Shard::of(mine, *n) != Shard::of(theirs, *n))
        .unwrap();
    let shard = Shard {
        index: Shard::of(mine, count),
        count,
    };
    w.pending(mine, "j-mine", 100);
    w.pending(theirs, "j-theirs", 100);
    let mut m = w.mirror(&[mine]).with_shard(shard);
    m.pass(PassKind::Recovery);
    job_delivery(&w, "msg_0", theirs, "j-theirs");
    job_delivery(&w, "msg_1", mine, "j-mine");
    let before = w.fake.requests().len();
    assert_eq!(m.process_deliveries().unwrap(), 2);
    let outcome = |id: &str| delivery(&w, id).2;
    let left = outcome("msg_0");
    assert!(
        left.starts_with(&format!(
            "left to shard {}/{count}",
            Shard::of(theirs, count)
        )),
        "{left}"
    );
    assert!(
        outcome("msg_1").starts_with("detection"),
        "{}",
        outcome("msg_1")
    );
    // Only this shard's company was listed: nothing asked about the other's job.
    let asked: Vec<String> = w.fake.requests()[before..]
        .iter()
        .map(|q| format!("{} {}?{}", q.method, q.path, q.query))
        .collect();
    assert!(
        asked
            .iter()
            .all(|q| !q.contains("j-theirs") && !q.contains(theirs)),
        "{asked:?}"
    );
    assert!(asked.iter().any(|q| q.contains(mine)), "{asked:?}");
}

#[test]
fn a_job_held_elsewhere_is_journaled_leaving_the_listing_once_not_at_every_poll() {
    // Every poll journaled `left_listing` for a job another integration holds (51 rows in
    // 24 minutes): it is re-read each poll (to see it finish), journaled once per change.
    let w = World::new();
    w.pending(A, "held", 600);
    w.fake.claim_after_first_page("held");
    let mut m = w.mirror(&[A]);
    m.pass(PassKind::Recovery);
    for _ in 0..4 {
        m.pass(PassKind::Poll);
    }
    let left: Vec<_> = w
        .store()
        .events(Some("held"))
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "left_listing")
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].detail["status"], "in_progress");
    assert_eq!(w.fake.job("held").unwrap().status, "in_progress");
}
