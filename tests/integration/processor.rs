//! The processor against the fake over loopback: order, conflicts, recovery, deadlines, retries.

use std::time::Duration;

use jobmirror::clock::Clock;
use jobmirror::sandbox::{Fault, FaultRule};
use jobmirror::service::processor::ProcessorConfig;
use jobmirror::service::sync::PassKind;
use jobmirror::store::ProcState;

use crate::harness::World;

const A: &str = "aaaaaaaa-0000-4000-8000-000000000001";
const B: &str = "bbbbbbbb-0000-4000-8000-000000000002";

fn cfg() -> ProcessorConfig {
    ProcessorConfig {
        deadline_warning: Duration::from_secs(600),
        claim_min_left: Duration::from_secs(10),
        claims_per_round_max: 3,
        conflict_backoff: Duration::from_secs(30),
        ..ProcessorConfig::default()
    }
}

#[test]
fn oldest_first_per_company_with_the_listing_shuffled_and_paged() {
    let mut w = World::new();
    w.page_size = 2; // several pages per company
    // Inserted (and so listed) out of creation order, two companies interleaved.
    let ages: &[(&str, &str, i64)] = &[
        (A, "a-3", 400),
        (B, "b-2", 500),
        (A, "a-1", 900),
        (A, "a-5", 10),
        (B, "b-1", 800),
        (A, "a-2", 600),
        (B, "b-3", 50),
        (A, "a-4", 300),
    ];
    for (c, id, age) in ages {
        w.pending(c, id, *age);
    }
    // Two jobs created in the same millisecond: the id breaks the tie.
    w.pending(B, "b-0z", 1000);
    w.pending(B, "b-0a", 1000);

    let mut mirror = w.mirror(&[A, B]);
    let mut processor = w.processor(&[A, B], cfg());
    let mut order_a = Vec::new();
    let mut order_b = Vec::new();
    for round in 0..8 {
        mirror.pass(if round == 0 {
            PassKind::Recovery
        } else {
            PassKind::Poll
        });
        let r = processor.round();
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert!(
            r.claimed.len() <= 2,
            "at most one claim per company per round: {:?}",
            r.claimed
        );
        for id in &r.claimed {
            if id.starts_with("a-") {
                order_a.push(id.clone())
            } else {
                order_b.push(id.clone())
            }
            // Never two jobs in progress for one company at the fake.
            let company = if id.starts_with("a-") { A } else { B };
            let held = w.store().conn()
                .query_row("SELECT count(*) FROM export_jobs WHERE company_id = ?1 AND proc_state IN ('claimed','processing')", [company], |r| r.get::<_, i64>(0))
                .unwrap();
            assert_eq!(held, 1);
            w.complete_at_pleo(id);
        }
    }
    assert_eq!(order_a, ["a-1", "a-2", "a-3", "a-4", "a-5"]);
    assert_eq!(order_b, ["b-0a", "b-0z", "b-1", "b-2", "b-3"]);
    // Exactly one `started` per job.
    let started = w.started_sent();
    assert_eq!(started.len(), 10);
    let mut dedup = started.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(dedup.len(), 10);
}

#[test]
fn conflict_between_verify_and_claim_takes_the_next_job_quietly() {
    let w = World::new();
    w.pending(A, "old", 900);
    w.pending(A, "mid", 600);
    w.pending(A, "new", 300);
    w.fake.steal_after_next_get("old");
    let mut mirror = w.mirror(&[A]);
    mirror.pass(PassKind::Recovery);
    let mut p = w.processor(&[A], cfg());
    let r = p.round();
    assert_eq!(r.conflicts, ["old"]);
    assert_eq!(r.claimed, ["mid"]);
    assert!(
        r.errors.is_empty(),
        "a conflict is not an error: {:?}",
        r.errors
    );
    assert_eq!(w.fake.started_events_for("old"), 1, "no retry of a 422");
    assert_eq!(w.fake.started_events_for("mid"), 1);
    assert_eq!(w.fake.started_events_for("new"), 0);
    let st = w.store();
    assert_eq!(
        st.job("old").unwrap().unwrap().proc_state,
        ProcState::Conflict
    );
    assert_eq!(
        w.kinds("old"),
        [
            "detected",
            "verified",
            "claim_sent",
            "claim_conflict",
            "status_changed",
            "claimed_elsewhere"
        ]
    );
    // Further rounds and polls never try the conflicted job again.
    for _ in 0..3 {
        mirror.pass(PassKind::Poll);
        p.round();
    }
    assert_eq!(w.fake.started_events_for("old"), 1);
}

#[test]
fn claim_attempts_are_bounded_when_every_job_is_taken_by_someone_else() {
    let w = World::new();
    for (i, id) in ["j1", "j2", "j3", "j4", "j5"].iter().enumerate() {
        w.pending(A, id, 1000 - i as i64 * 10);
        w.fake.steal_after_next_get(id);
    }
    w.mirror(&[A]).pass(PassKind::Recovery);
    let mut p = w.processor(&[A], cfg());
    let r = p.round();
    assert_eq!(
        r.conflicts,
        ["j1", "j2", "j3"],
        "claims_per_round_max bounds one round"
    );
    assert!(r.claimed.is_empty());
    let backoff_end = w.clock.now().plus(Duration::from_secs(30));
    assert_eq!(r.next_due, Some(backoff_end));
    // Within the backoff nothing is sent, however often the processor runs.
    let before = w.job_events_sent().len();
    for _ in 0..10 {
        let r = p.round();
        assert!(r.conflicts.is_empty() && r.claimed.is_empty());
    }
    assert_eq!(w.job_events_sent().len(), before);
    w.clock.advance(Duration::from_secs(31));
    let r = p.round();
    assert_eq!(r.conflicts, ["j4", "j5"]);
    assert_eq!(
        w.job_events_sent().len(),
        5,
        "one started per job, never more"
    );
}

#[test]
fn in_progress_job_at_start_up_is_resumed_without_started() {
    let w = World::new();
    w.in_progress(A, "held", 1200);
    w.pending(A, "older-pending", 2000);
    // A new database for a job held before: as after losing the database.
    w.mirror(&[A])
        .with_resume_unknown_in_progress(true)
        .pass(PassKind::Recovery);
    let mut p = w.processor(&[A], cfg());
    let r = p.round();
    assert_eq!(r.resumed, ["held"]);
    assert!(
        r.claimed.is_empty(),
        "the held job blocks the company: one job at a time"
    );
    assert_eq!(w.fake.started_events_for("held"), 0);
    assert!(
        w.job_events_sent().is_empty(),
        "no job event at all was sent"
    );
    let resumed = w
        .store()
        .events(Some("held"))
        .unwrap()
        .into_iter()
        .find(|e| e.kind == "resumed")
        .unwrap();
    assert_eq!(resumed.detail["started_sent"], false);
    assert_eq!(
        w.store().job("held").unwrap().unwrap().proc_state,
        ProcState::Processing
    );
}

#[test]
fn a_claim_interrupted_by_a_crash_is_resumed_not_resent() {
    let w = World::new();
    w.pending(A, "j", 600);
    w.mirror(&[A]).pass(PassKind::Recovery);
    // The process recorded `claiming`, its `started` reached Pleo, then it died.
    let st = w.store();
    let row = st.job("j").unwrap().unwrap();
    st.begin_claim(&row, w.clock.now()).unwrap();
    assert!(w.fake.claim_as_other("j"));
    drop(st);
    // A new process: new store handle, new processor.
    let mut p = w.processor(&[A], cfg());
    let r = p.round();
    assert_eq!(r.resumed, ["j"]);
    assert_eq!(
        w.fake.started_events_for("j"),
        0,
        "started is not sent again"
    );
}

#[test]
fn deadline_warning_then_expiry_on_a_manual_clock() {
    let w = World::new();
    w.pending(A, "j", 60);
    w.mirror(&[A]).pass(PassKind::Recovery);
    let mut p = w.processor(&[A], cfg());
    let claim_time = w.clock.now();
    let r = p.round();
    assert_eq!(r.claimed, ["j"]);
    let expires = claim_time.plus(Duration::from_secs(3600));
    let warn_at = claim_time.plus(Duration::from_secs(3000));
    assert_eq!(
        w.store().job("j").unwrap().unwrap().expires_at,
        expires,
        "deadline = lastUpdatedAt (the claim) + expiresIn"
    );
    assert_eq!(r.next_due, Some(warn_at));

    w.clock.set(warn_at.plus_secs(-1));
    let r = p.round();
    assert!(r.warned.is_empty());
    w.clock.set(warn_at);
    let r = p.round();
    assert_eq!(r.warned, ["j"]);
    assert_eq!(r.next_due, Some(expires));
    let r = p.round();
    assert!(r.warned.is_empty(), "warned once per deadline");
    let warning = w
        .store()
        .events(Some("j"))
        .unwrap()
        .into_iter()
        .find(|e| e.kind == "deadline_warning")
        .unwrap();
    assert_eq!(warning.detail["seconds_left"], 600);

    w.clock.set(expires.plus_secs(1));
    let r = p.round();
    assert_eq!(r.expired, ["j"]);
    let row = w.store().job("j").unwrap().unwrap();
    assert_eq!(row.proc_state, ProcState::Expired);
    assert_eq!(row.status, "failed");
    let fake_job = w.fake.job("j").unwrap();
    assert_eq!(fake_job.failure_reason_type.as_deref(), Some("job_expired"));
    let kinds = w.kinds("j");
    assert_eq!(
        kinds.iter().filter(|k| *k == "expired").count(),
        1,
        "{kinds:?}"
    );
}

#[test]
fn the_oldest_job_is_claimed_whatever_time_it_has_left_and_its_deadline_refreshed() {
    // `started` refreshes lastUpdatedAt: a pending job with four minutes left gets a fresh
    // expiresIn when claimed, so it is never skipped for a younger one.
    let w = World::new();
    w.pending(A, "old", 3600 - 240); // 240 s left
    w.pending(A, "young", 100);
    w.mirror(&[A]).pass(PassKind::Recovery);
    let r = w.processor(&[A], cfg()).round();
    assert_eq!(r.claimed, ["old"]);
    assert_eq!(w.started_sent(), ["old"]);
    let row = w.store().job("old").unwrap().unwrap();
    assert_eq!(
        row.expires_at,
        w.clock_now().plus_secs(3600),
        "the deadline Pleo gave"
    );
}

#[test]
fn a_claim_that_cannot_land_waits_for_the_deadline_and_nothing_is_sticky() {
    let w = World::new();
    w.pending(A, "last-seconds", 3600 - 5); // 5 s left, under the 10 s claim margin
    w.pending(A, "young", 100);
    w.mirror(&[A]).pass(PassKind::Recovery);
    let mut p = w.processor(&[A], cfg());
    let r = p.round();
    assert!(r.claimed.is_empty(), "neither: oldest first");
    assert!(w.started_sent().is_empty());
    let due = r.next_due.unwrap();
    // At the deadline Pleo expires it; it is journaled `expired` with Pleo's reason, and the
    // next job is taken.
    w.clock.set(due);
    w.mirror(&[A]).pass(PassKind::Poll);
    let r = p.round();
    assert_eq!(r.claimed, ["young"]);
    let st = w.store();
    assert_eq!(
        st.job("last-seconds").unwrap().unwrap().proc_state,
        ProcState::Expired
    );
    let expired = st
        .events(Some("last-seconds"))
        .unwrap()
        .into_iter()
        .find(|e| e.kind == "expired")
        .unwrap();
    assert_eq!(expired.detail["failure_reason_type"], "job_expired");
    assert!(
        w.kinds("last-seconds")
            .contains(&"claim_deferred".to_owned())
    );
}

#[test]
fn a_fast_host_clock_never_makes_a_healthy_job_unclaimable() {
    // Our clock 620 s ahead of Pleo's: by it, a job with 300 s left has expired. Pleo still
    // lists it pending, so it is claimed (Pleo is the judge of its own deadline).
    let w = World::new();
    w.pending(A, "healthy", 3600 - 300);
    w.pending(A, "young", 100);
    w.mirror(&[A]).pass(PassKind::Recovery);
    let (mut p, _) = w.processor_skewed(&[A], cfg(), 620_000);
    let r = p.round();
    assert_eq!(r.claimed, ["healthy"]);
    assert!(r.expired.is_empty());
    assert_eq!(w.fake.job("healthy").unwrap().status, "in_progress");
    assert_eq!(
        w.store().job("healthy").unwrap().unwrap().proc_state,
        ProcState::Processing
    );
}

#[test]
fn a_held_job_past_its_deadline_by_our_clock_is_kept_while_pleo_says_in_progress() {
    let w = World::new();
    w.pending(A, "j", 60);
    w.mirror(&[A]).pass(PassKind::Recovery);
    let (mut p, skewed) = w.processor_skewed(&[A], cfg(), 0);
    assert_eq!(p.round().claimed, ["j"]);
    // The host clock jumps 10 minutes past the deadline; Pleo's has not moved.
    skewed.jump(3_600_000 + 600_000);
    let r = p.round();
    assert!(r.expired.is_empty(), "{r:?}");
    let row = w.store().job("j").unwrap().unwrap();
    assert_eq!(row.proc_state, ProcState::Processing);
    assert_eq!(row.status, "in_progress");
}

#[test]
fn server_error_then_429_then_success_still_claims_and_honours_retry_after() {
    let w = World::new();
    w.pending(A, "j", 60);
    w.mirror(&[A]).pass(PassKind::Recovery);
    let rule = |fault| FaultRule {
        skip: 0,
        method: Some("POST".into()),
        path_prefix: Some("/v3/export-job-events".into()),
        fault,
    };
    w.fake.push_fault(rule(Fault::ServerError));
    w.fake.push_fault(rule(Fault::TooManyRequests {
        retry_after_secs: 7,
    }));
    let r = w.processor(&[A], cfg()).round();
    assert_eq!(r.claimed, ["j"]);
    let statuses: Vec<u16> = w
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.path == "/v3/export-job-events")
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, [500, 429, 202]);
    let sleeps = w.clock.sleeps();
    assert_eq!(sleeps.len(), 2, "{sleeps:?}");
    assert!(
        sleeps[0] >= Duration::from_millis(250) && sleeps[0] <= Duration::from_millis(500),
        "backoff with jitter: {sleeps:?}"
    );
    assert_eq!(sleeps[1], Duration::from_secs(7), "Retry-After honoured");
    assert_eq!(w.fake.job("j").unwrap().status, "in_progress");
}

#[test]
fn a_job_finished_elsewhere_frees_the_company() {
    let w = World::new();
    w.pending(A, "first", 600);
    w.pending(A, "second", 300);
    let mut m = w.mirror(&[A]);
    m.pass(PassKind::Recovery);
    let mut p = w.processor(&[A], cfg());
    assert_eq!(p.round().claimed, ["first"]);
    assert!(p.round().claimed.is_empty());
    w.complete_at_pleo("first");
    let report = m.pass(PassKind::Poll);
    assert_eq!(report.counts.reread, 1, "the held job is read again");
    assert_eq!(
        w.store().job("first").unwrap().unwrap().proc_state,
        ProcState::Done
    );
    assert_eq!(p.round().claimed, ["second"]);
}

// Regressions found by the simulation (`jobmirror simulate`), named after the bug.

/// A processor for company A whose client sends each request once (no retries).
fn single_attempt_processor(w: &World) -> jobmirror::service::processor::Processor {
    let mut c = w.client_config();
    c.retry.attempts_max = 1;
    let client =
        std::sync::Arc::new(jobmirror::pleo::PleoClient::new(c, w.shared_clock()).unwrap());
    jobmirror::service::processor::Processor::new(
        w.store(),
        jobmirror::pleo::Clients::single(client),
        w.shared_clock(),
        vec![A.into()],
        cfg(),
    )
}

fn hang_up(method: &str, path: &str) -> FaultRule {
    FaultRule {
        skip: 0,
        method: Some(method.into()),
        path_prefix: Some(path.into()),
        fault: Fault::HangUp,
    }
}

#[test]
fn lost_answer_to_started_was_resent_and_read_as_a_conflict() {
    // The answer to `started` is lost after Pleo applied it. Resending it met our own claim
    // (422) and the job was taken for someone else's, left to expire.
    let w = World::new();
    w.pending(A, "j", 60);
    w.mirror(&[A]).pass(PassKind::Recovery);
    w.fake.push_fault(hang_up("POST", "/v3/export-job-events"));
    let r = w.processor(&[A], cfg()).round();
    assert_eq!(w.fake.started_events_for("j"), 1, "never resent");
    assert_eq!(r.resumed, ["j"], "{r:?}");
    assert!(r.conflicts.is_empty());
    assert_eq!(
        w.store().job("j").unwrap().unwrap().proc_state,
        ProcState::Processing
    );
    let detail = w
        .store()
        .events(Some("j"))
        .unwrap()
        .into_iter()
        .find(|e| e.kind == "claim_failed")
        .unwrap()
        .detail;
    assert_eq!(detail["outcome"], "unknown");
}

#[test]
fn failed_read_back_after_started_let_a_second_job_be_picked() {
    // `started` landed but reading the job back failed: the claim was treated as skipped,
    // the job stayed `claiming`, and the next job of the company was claimed too.
    let w = World::new();
    w.pending(A, "old", 600);
    w.pending(A, "new", 60);
    w.mirror(&[A]).pass(PassKind::Recovery);
    // The verify GET is answered; the read-back GET after `started` is refused.
    w.fake.push_fault(FaultRule {
        skip: 1,
        method: Some("GET".into()),
        path_prefix: Some("/v3/export-jobs/old".into()),
        fault: Fault::ServerError,
    });
    let mut p = single_attempt_processor(&w);
    let r = p.round();
    assert_eq!(w.fake.started_events_for("new"), 0, "{r:?}");
    assert_eq!(w.fake.started_events_for("old"), 1);
    let held = w.store().job("old").unwrap().unwrap();
    assert!(held.proc_state.is_active(), "{:?}", held.proc_state);
    assert_eq!(w.fake.job("old").unwrap().status, "in_progress");
}

#[test]
fn a_429_on_started_then_a_claim_elsewhere_was_resumed_as_ours() {
    // A 429 proves `started` was not applied; another integration claimed the job right
    // after our read. Re-reading found it in_progress and took it for our own claim.
    let w = World::new();
    w.pending(A, "j", 60);
    w.mirror(&[A]).pass(PassKind::Recovery);
    w.fake.steal_after_next_get("j");
    w.fake.push_fault(FaultRule {
        skip: 0,
        method: Some("POST".into()),
        path_prefix: Some("/v3/export-job-events".into()),
        fault: Fault::TooManyRequests {
            retry_after_secs: 5,
        },
    });
    let mut p = single_attempt_processor(&w);
    let r = p.round();
    assert!(r.resumed.is_empty(), "{r:?}");
    assert!(r.claimed.is_empty(), "{r:?}");
    // Back in the queue; the next look finds it held elsewhere.
    w.clock
        .advance(cfg().conflict_backoff + Duration::from_secs(1));
    let r = p.round();
    assert!(r.resumed.is_empty() && r.claimed.is_empty(), "{r:?}");
    assert_eq!(
        w.store().job("j").unwrap().unwrap().proc_state,
        ProcState::Conflict
    );
    assert!(w.job_events_sent().iter().all(|(e, _)| e == "started"));
}
