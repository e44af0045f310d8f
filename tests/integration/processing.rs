//! The processing stage against the fake: handlers, batches, outcomes, limits and restarts.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use crossbeam_channel::unbounded;
use jobmirror::clock::Clock;
use jobmirror::processing::handler::HandlerSpec;
use jobmirror::processing::pipeline::{HandlerStage, Milestone, PipelineConfig};
use jobmirror::sandbox::{Fault, FaultRule, JobSpec};
use jobmirror::service::processor::{Processor, ProcessorConfig, ReadyStage};
use jobmirror::service::sync::PassKind;
use jobmirror::store::ProcState;
use serde_json::Value;

use crate::harness::World;

const A: &str = "aaaaaaaa-0000-4000-8000-000000000001";
const B: &str = "bbbbbbbb-0000-4000-8000-000000000002";

fn pcfg() -> PipelineConfig {
    PipelineConfig {
        wait_tick: Duration::from_millis(10),
        ..PipelineConfig::default()
    }
}

fn processor_with(
    w: &World,
    companies: &[&str],
    handler: HandlerSpec,
    cfg: PipelineConfig,
) -> Processor {
    let stage = HandlerStage::new(w.clients(), w.shared_clock(), handler, cfg);
    w.processor(companies, ProcessorConfig::default())
        .with_stage(Box::new(stage))
}

fn outbox(w: &World) -> HandlerSpec {
    HandlerSpec::Outbox(w.outbox())
}

fn job(w: &World, company: &str, id: &str, items: usize, without_account: usize) -> String {
    w.fake
        .add_job(JobSpec {
            id: Some(id.into()),
            company_id: company.into(),
            created_secs_ago: Some(60),
            items: Some(items),
            items_without_account: without_account,
            ..JobSpec::default()
        })
        .unwrap()
}

/// A POSIX shell handler from a script body; `$1` is `--check` for the readiness check.
fn script(dir: &Path, name: &str, body: &str) -> HandlerSpec {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    HandlerSpec::Command {
        program: path.display().to_string(),
        args: vec![],
        env: Vec::new(),
    }
}

/// Shell that answers every item line on stdin with the given status JSON tail.
const ANSWER_ALL: &str = r#"[ "$1" = "--check" ] && exit 0
while IFS= read -r line; do
  case "$line" in
    *'"type":"item"'*)
      id=$(printf '%s' "$line" | sed -n 's/.*"accountingEntryId":"\([^"]*\)".*/\1/p')
      echo "{\"accountingEntryId\":\"$id\",\"status\":\"successful\",\"externalId\":\"ERP-$id\"}" ;;
  esac
done"#;

fn event_bodies(w: &World, job: &str) -> Vec<Value> {
    w.fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path == "/v3/export-job-events" && r.status == 202)
        .map(|r| serde_json::from_str::<Value>(&r.body).unwrap())
        .filter(|v| v["jobId"] == job)
        .collect()
}

#[test]
fn a_250_item_job_completes_with_put_batches_never_over_100() {
    let w = World::new();
    let j = job(&w, A, "big", 250, 0);
    w.mirror(&[A]).pass(PassKind::Recovery);
    let r = processor_with(&w, &[A], outbox(&w), pcfg()).round();
    assert_eq!(r.finished, ["big"], "{:?}", r.errors);
    let puts: Vec<usize> = w
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "PUT")
        .map(|r| serde_json::from_str::<Vec<Value>>(&r.body).unwrap().len())
        .collect();
    assert!(puts.iter().all(|n| *n <= 100), "{puts:?}");
    assert_eq!(puts.iter().sum::<usize>(), 250);
    let updates = w.fake.item_updates(&j);
    let mut per_entry: HashMap<String, usize> = HashMap::new();
    for (e, s) in &updates {
        assert_eq!(s, "successful");
        *per_entry.entry(e.clone()).or_default() += 1;
    }
    assert_eq!(per_entry.len(), 250);
    assert!(
        per_entry.values().all(|n| *n == 1),
        "each item reported once"
    );
    let fake_job = w.fake.job(&j).unwrap();
    assert_eq!(fake_job.status, "completed");
    assert!(
        fake_job
            .items
            .iter()
            .all(|i| i.status == "successful" && i.external_id.is_some())
    );
    assert_eq!(std::fs::read_dir(w.outbox().join(&j)).unwrap().count(), 250);
    assert_eq!(w.fake.started_events_for(&j), 1);
    assert_eq!(
        event_bodies(&w, &j)
            .iter()
            .map(|v| v["event"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>(),
        ["started", "completed"]
    );
}

#[test]
fn mixed_results_complete_with_errors_and_all_failed_fails_the_job() {
    let w = World::new();
    let mixed = job(&w, A, "mixed", 5, 2);
    let bad = job(&w, B, "bad", 3, 3);
    w.mirror(&[A, B]).pass(PassKind::Recovery);
    let r = processor_with(&w, &[A, B], outbox(&w), pcfg()).round();
    assert_eq!(r.finished, ["mixed", "bad"]);
    let m = w.fake.job(&mixed).unwrap();
    assert_eq!(m.status, "completed_with_errors");
    assert_eq!(
        m.items.iter().filter(|i| i.status == "successful").count(),
        3
    );
    let failed: Vec<_> = m.items.iter().filter(|i| i.status == "failed").collect();
    assert_eq!(failed.len(), 2);
    assert!(
        failed
            .iter()
            .all(|i| i.failure_reason_type.as_deref() == Some("account_unknown"))
    );
    let b = w.fake.job(&bad).unwrap();
    assert_eq!(b.status, "failed");
    assert_eq!(b.failure_reason_type.as_deref(), Some("validation_failure"));
    assert!(
        b.failure_reason
            .as_deref()
            .unwrap()
            .contains("all 3 items failed"),
        "{:?}",
        b.failure_reason
    );
}

/// A handler whose readiness check passes only while `DIR/ready` exists; every check appends
/// a line to `DIR/checks`; items are answered successful.
fn flaky_erp(dir: &Path) -> HandlerSpec {
    let d = dir.display();
    script(
        dir,
        "h",
        &format!(
            r#"if [ "$1" = "--check" ]; then
  echo check >> {d}/checks
  [ -e {d}/ready ] && exit 0
  echo '{{"failureReasonType":"accounting_system_authentication_failure","failureReason":"the ERP token expired; reconnect in settings"}}'
  exit 3
fi
while read -r line; do
  e=$(printf '%s' "$line" | sed 's/.*"accountingEntryId":"\([^"]*\)".*/\1/')
  printf '{{"accountingEntryId":"%s","status":"successful"}}\n' "$e"
done"#
        ),
    )
}

fn checks(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("checks"))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

#[test]
fn a_job_is_started_only_after_the_readiness_check_passes() {
    // Pleo: "An Export Job must only be started after ... pre-processing checks (e.g.
    // validation readiness) have completed."
    let w = World::new();
    let j = job(&w, A, "j", 2, 0);
    let dir = tempfile::tempdir().unwrap();
    w.mirror(&[A]).pass(PassKind::Recovery);
    let mut p = processor_with(&w, &[A], flaky_erp(dir.path()), pcfg());
    let r = p.round();
    assert_eq!(r.not_ready, ["j"]);
    assert!(
        w.job_events_sent().is_empty(),
        "no job event while not ready"
    );
    assert_eq!(w.fake.job(&j).unwrap().status, "pending");
    assert_eq!(checks(dir.path()), 1);
    assert!(w.kinds(&j).contains(&"not_ready".to_owned()));
    // The next round within readiness_retry does not run the check again...
    p.round();
    assert_eq!(checks(dir.path()), 1);
    // ...a wake (a poll, a trigger, a webhook) does, and so does the retry interval.
    p.recheck_now();
    p.round();
    assert_eq!(checks(dir.path()), 2);
    w.clock.advance(Duration::from_secs(61));
    p.round();
    assert_eq!(checks(dir.path()), 3);
    assert!(w.job_events_sent().is_empty());
    // Journaled once for the same reason, not at every check.
    assert_eq!(w.kinds(&j).iter().filter(|k| *k == "not_ready").count(), 1);
    // The accounting side is back: checked, then started, then processed.
    std::fs::write(dir.path().join("ready"), "").unwrap();
    w.clock.advance(Duration::from_secs(61));
    let r = p.round();
    assert_eq!(r.claimed, ["j"]);
    assert_eq!(r.finished, ["j"]);
    assert_eq!(w.fake.job(&j).unwrap().status, "completed");
    let kinds = w.kinds(&j);
    let pos = |k: &str| kinds.iter().position(|x| x == k).unwrap();
    assert!(pos("readiness_restored") < pos("claim_sent"), "{kinds:?}");
}

#[test]
fn a_job_about_to_expire_while_not_ready_is_failed_with_the_checks_reason() {
    let w = World::new();
    let j = job(&w, A, "j", 2, 0);
    let dir = tempfile::tempdir().unwrap();
    w.mirror(&[A]).pass(PassKind::Recovery);
    let mut p = processor_with(&w, &[A], flaky_erp(dir.path()), pcfg());
    p.round();
    // Still failing as the deadline nears: the next check falls due inside the margin.
    let deadline = w.store().job(&j).unwrap().unwrap().expires_at;
    let r = loop {
        let r = p.round();
        if !r.finished.is_empty() {
            break r;
        }
        let due = r.next_due.expect("a next check is due");
        assert!(due < deadline, "the check is retried before the deadline");
        w.clock.set(due);
    };
    assert_eq!(r.failed_not_ready, ["j"]);
    let f = w.fake.job(&j).unwrap();
    assert_eq!(f.status, "failed", "pending -> failed, not expired");
    assert_eq!(
        f.failure_reason_type.as_deref(),
        Some("accounting_system_authentication_failure")
    );
    assert!(
        f.failure_reason
            .as_deref()
            .unwrap()
            .contains("the ERP token expired; reconnect in settings"),
        "{:?}",
        f.failure_reason
    );
    assert_eq!(w.started_sent(), Vec::<String>::new(), "never started");
    assert!(w.clock_now() < deadline);
    assert_eq!(
        w.store().job(&j).unwrap().unwrap().proc_state,
        jobmirror::store::ProcState::Done
    );
}

#[test]
fn a_resumed_job_runs_the_readiness_check_before_its_items() {
    let w = World::new();
    w.in_progress(A, "held", 60);
    let dir = tempfile::tempdir().unwrap();
    w.mirror(&[A]).pass(PassKind::Recovery);
    let mut p = processor_with(&w, &[A], flaky_erp(dir.path()), pcfg());
    let r = p.round();
    assert_eq!(r.resumed, ["held"]);
    assert_eq!(r.not_ready, ["held"]);
    assert!(w.fake.item_updates("held").is_empty());
    assert!(w.job_events_sent().is_empty());
    // A held job waits like a pending one: no check again before the retry is due.
    p.round();
    assert_eq!(checks(dir.path()), 1);
    std::fs::write(dir.path().join("ready"), "").unwrap();
    p.recheck_now();
    let r = p.round();
    assert_eq!(r.finished, ["held"]);
    assert_eq!(w.fake.job("held").unwrap().status, "completed");
    assert_eq!(w.started_sent(), Vec::<String>::new());
}

/// Mirrors the world, then runs one processor round on a thread with a handler that takes its
/// input and hangs (holding its output open); returns once the handler has started.
fn round_with_a_hanging_handler(
    w: &World,
    dir: &Path,
    cfg: PipelineConfig,
    items: usize,
) -> std::thread::JoinHandle<jobmirror::service::processor::RoundReport> {
    let handler = script(
        dir,
        "h",
        "[ \"$1\" = \"--check\" ] && exit 0\ncat >/dev/null\nsleep 3600",
    );
    w.mirror(&[A]).pass(PassKind::Recovery);
    let (tx, rx) = unbounded();
    let stage = HandlerStage::new(w.clients(), w.shared_clock(), handler, cfg).with_milestones(tx);
    let mut p = w
        .processor(&[A], ProcessorConfig::default())
        .with_stage(Box::new(stage));
    let round = std::thread::spawn(move || p.round());
    match rx.recv_timeout(Duration::from_secs(10)).unwrap() {
        Milestone::HandlerStarted { items: n, .. } => assert_eq!(n, items),
        other => panic!("{other:?}"),
    }
    round
}

#[test]
fn a_stalled_handler_is_stopped_and_the_job_failed_before_its_deadline() {
    let w = World::new();
    let j = job(&w, A, "j", 3, 0);
    let dir = tempfile::tempdir().unwrap();
    let round = round_with_a_hanging_handler(&w, dir.path(), pcfg(), 3);
    // No result comes: two minutes pass on the clock.
    let deadline = w.store().job(&j).unwrap().unwrap().expires_at;
    w.clock.advance(Duration::from_secs(121));
    let r = round.join().unwrap();
    assert_eq!(r.finished, ["j"]);
    let f = w.fake.job(&j).unwrap();
    assert_eq!(f.status, "failed");
    assert_eq!(
        f.failure_reason_type.as_deref(),
        Some("accounting_system_timeout")
    );
    assert!(
        f.failure_reason
            .as_deref()
            .unwrap()
            .contains("no result for 120 s"),
        "{:?}",
        f.failure_reason
    );
    assert!(
        f.completed_at.unwrap() < deadline,
        "failed before the deadline"
    );
    assert!(w.kinds(&j).contains(&"handler_timed_out".to_owned()));
}

#[test]
fn a_clock_jump_while_the_handler_works_is_not_a_stall() {
    // The simulation moved the clock 300 s as a handler started; the lane saw "no result for
    // 120 s" before the handler (a process, answering a few hundred milliseconds later) had
    // written anything, and failed the job. A stall needs real time without a result too.
    let w = World::new();
    let j = job(&w, A, "j", 2, 0);
    let dir = tempfile::tempdir().unwrap();
    let handler = script(
        dir.path(),
        "slow",
        r#"[ "$1" = "--check" ] && exit 0
IFS= read -r jobline
ids=""
while IFS= read -r line; do
  ids="$ids $(printf '%s' "$line" | sed -n 's/.*"accountingEntryId":"\([^"]*\)".*/\1/p')"
done
sleep 0.3
for id in $ids; do echo "{\"accountingEntryId\":\"$id\",\"status\":\"successful\"}"; done"#,
    );
    w.mirror(&[A]).pass(PassKind::Recovery);
    let (tx, rx) = unbounded();
    let stage =
        HandlerStage::new(w.clients(), w.shared_clock(), handler, pcfg()).with_milestones(tx);
    let mut p = w
        .processor(&[A], ProcessorConfig::default())
        .with_stage(Box::new(stage));
    let round = std::thread::spawn(move || p.round());
    match rx.recv_timeout(Duration::from_secs(10)).unwrap() {
        Milestone::HandlerStarted { items, .. } => assert_eq!(items, 2),
        other => panic!("{other:?}"),
    }
    // The clock jumps past the item limit before the handler answers.
    w.clock.advance(Duration::from_secs(300));
    let r = round.join().unwrap();
    assert_eq!(r.finished, ["j"]);
    let f = w.fake.job(&j).unwrap();
    assert_eq!(f.status, "completed", "{:?}", f.failure_reason);
    assert!(!w.kinds(&j).contains(&"handler_timed_out".to_owned()));
}

#[test]
fn a_job_about_to_expire_is_failed_with_a_reason_instead_of_expiring() {
    let w = World::new();
    let j = job(&w, A, "j", 2, 0);
    let dir = tempfile::tempdir().unwrap();
    let cfg = PipelineConfig {
        item_timeout: Duration::from_secs(86_400),
        ..pcfg()
    };
    let round = round_with_a_hanging_handler(&w, dir.path(), cfg, 2);
    let expires = w.store().job(&j).unwrap().unwrap().expires_at;
    // Within the 120 s finish margin.
    w.clock.set(expires.plus_secs(-119));
    let r = round.join().unwrap();
    assert_eq!(r.finished, ["j"]);
    let f = w.fake.job(&j).unwrap();
    assert_eq!(
        (f.status.as_str(), f.failure_reason_type.as_deref()),
        ("failed", Some("accounting_system_timeout"))
    );
    assert!(
        f.failure_reason
            .as_deref()
            .unwrap()
            .contains("before the job's deadline")
    );
    assert!(f.expired_at.is_none(), "it never expired");
    assert!(w.clock.now() < expires);
}

#[test]
fn partial_errors_inside_a_200_are_retried_and_never_resend_a_success() {
    let w = World::new();
    let j = job(&w, A, "j", 4, 0);
    let entries: Vec<String> = w
        .fake
        .job(&j)
        .unwrap()
        .items
        .iter()
        .map(|i| i.accounting_entry_id.clone())
        .collect();
    w.fake.refuse_item_updates(&entries[1], 1);
    w.mirror(&[A]).pass(PassKind::Recovery);
    let r = processor_with(&w, &[A], outbox(&w), pcfg()).round();
    assert_eq!(r.finished, ["j"]);
    let sent = w.fake.item_updates(&j);
    let count = |e: &str| sent.iter().filter(|(x, _)| x == e).count();
    assert_eq!(count(&entries[1]), 2, "the refused item was sent again");
    for e in [&entries[0], &entries[2], &entries[3]] {
        assert_eq!(count(e), 1, "an acknowledged success is never sent again");
    }
    assert!(
        w.fake
            .job(&j)
            .unwrap()
            .items
            .iter()
            .all(|i| i.status == "successful")
    );
    assert_eq!(w.fake.job(&j).unwrap().status, "completed");
    let failures = w
        .store()
        .events(Some(&j))
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "item_report_failed")
        .count();
    assert_eq!(failures, 1);
}

/// Counts what the fake accepted per item across the whole run.
fn successes_per_item(w: &World, job: &str) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for (e, s) in w.fake.item_updates(job) {
        if s == "successful" {
            *m.entry(e).or_default() += 1;
        }
    }
    m
}

#[test]
fn after_a_crash_right_after_the_claim_the_job_is_processed_without_a_second_started() {
    let w = World::new();
    let j = job(&w, A, "j", 120, 0);
    w.mirror(&[A]).pass(PassKind::Recovery);
    // First life: claims, then dies before the handler ran (the job is left `processing`).
    let mut first = w
        .processor(&[A], ProcessorConfig::default())
        .with_stage(Box::new(ReadyStage));
    assert_eq!(first.round().claimed, ["j"]);
    drop(first);
    // Second life: the recovery pass finds it in_progress; the processor resumes it.
    w.mirror(&[A]).pass(PassKind::Recovery);
    let r = processor_with(&w, &[A], outbox(&w), pcfg()).round();
    assert_eq!(r.finished, ["j"]);
    assert_eq!(w.fake.started_events_for(&j), 1);
    let s = successes_per_item(&w, &j);
    assert_eq!(s.len(), 120);
    assert!(s.values().all(|n| *n == 1));
    assert_eq!(w.fake.job(&j).unwrap().status, "completed");
}

/// The next `n` item reports are answered 500 (not applied).
fn fail_puts(w: &World, n: usize) {
    for _ in 0..n {
        w.fake.push_fault(FaultRule {
            skip: 0,
            method: Some("PUT".into()),
            path_prefix: None,
            fault: Fault::ServerError,
        });
    }
}

#[test]
fn after_a_crash_between_results_and_report_the_results_are_reported_without_the_handler() {
    let w = World::new();
    let j = job(&w, A, "j", 30, 0);
    w.mirror(&[A]).pass(PassKind::Recovery);
    // First life: every PUT fails (5 attempts of 500), so results stay recorded, unreported.
    fail_puts(&w, 5);
    let r = processor_with(&w, &[A], outbox(&w), pcfg()).round();
    assert!(r.finished.is_empty());
    let st = w.store();
    let counts = st.item_counts(&j).unwrap();
    assert_eq!((counts.successful, counts.unreported), (30, 30));
    assert_eq!(
        st.job(&j).unwrap().unwrap().proc_state,
        ProcState::Processing
    );
    // Second life: a handler that would leave a mark if it were started.
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("h.ran");
    let handler = script(
        dir.path(),
        "h",
        &format!(
            "[ \"$1\" = \"--check\" ] && exit 0\ntouch {}\ncat >/dev/null",
            marker.display()
        ),
    );
    w.mirror(&[A]).pass(PassKind::Recovery);
    let r = processor_with(&w, &[A], handler, pcfg()).round();
    assert_eq!(r.finished, ["j"]);
    assert!(!marker.exists(), "the handler was not asked again");
    let s = successes_per_item(&w, &j);
    assert_eq!(s.len(), 30);
    assert!(s.values().all(|n| *n == 1), "{s:?}");
    assert_eq!(w.fake.started_events_for(&j), 1);
    assert_eq!(w.fake.job(&j).unwrap().status, "completed");
}

#[test]
fn after_a_crash_between_reporting_and_completion_the_job_is_completed_once() {
    let w = World::new();
    let j = job(&w, A, "j", 10, 0);
    w.mirror(&[A]).pass(PassKind::Recovery);
    let mut p = processor_with(&w, &[A], outbox(&w), pcfg());
    // Claim with a ReadyStage first, so the faults below hit only the finishing event.
    let mut claimer = w
        .processor(&[A], ProcessorConfig::default())
        .with_stage(Box::new(ReadyStage));
    assert_eq!(claimer.round().claimed, ["j"]);
    drop(claimer);
    for _ in 0..5 {
        w.fake.push_fault(FaultRule {
            skip: 0,
            method: Some("POST".into()),
            path_prefix: Some("/v3/export-job-events".into()),
            fault: Fault::ServerError,
        });
    }
    let r = p.round();
    assert!(r.finished.is_empty());
    assert_eq!(
        w.store().item_counts(&j).unwrap().unreported,
        0,
        "all reported"
    );
    assert_eq!(w.fake.job(&j).unwrap().status, "in_progress");
    // Restart.
    drop(p);
    w.mirror(&[A]).pass(PassKind::Recovery);
    let r = processor_with(&w, &[A], outbox(&w), pcfg()).round();
    assert_eq!(r.finished, ["j"]);
    let s = successes_per_item(&w, &j);
    assert_eq!(s.len(), 10);
    assert!(s.values().all(|n| *n == 1));
    let events: Vec<String> = event_bodies(&w, &j)
        .iter()
        .map(|v| v["event"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        events,
        ["started", "completed"],
        "one started, one completed accepted"
    );
}

#[test]
fn a_crashing_handler_is_retried_then_its_open_items_fail() {
    let w = World::new();
    let ok = job(&w, A, "ok", 3, 0);
    let dir = tempfile::tempdir().unwrap();
    // Answers only the first item it is given, then crashes; logs what it was given.
    let log = dir.path().join("given.log");
    let handler = script(
        dir.path(),
        "h",
        &format!(
            r#"[ "$1" = "--check" ] && exit 0
IFS= read -r jobline
IFS= read -r line
printf '%s\n' "$line" | sed -n 's/.*"reconciliationId":"\([^"]*\)".*/\1/p' >> {log}
id=$(printf '%s' "$line" | sed -n 's/.*"accountingEntryId":"\([^"]*\)".*/\1/p')
echo "{{\"accountingEntryId\":\"$id\",\"status\":\"successful\"}}"
echo "not json at all"
exit 1"#,
            log = log.display()
        ),
    );
    w.mirror(&[A]).pass(PassKind::Recovery);
    let r = processor_with(&w, &[A], handler.clone(), pcfg()).round();
    assert_eq!(r.finished, ["ok"]);
    // Three runs, one item each: all answered in the end.
    assert_eq!(w.fake.job(&ok).unwrap().status, "completed");
    assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 3);
    let failures = w
        .store()
        .events(Some(&ok))
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "handler_failed")
        .count();
    assert_eq!(failures, 3);

    // A handler that never answers anything fails the items after 3 runs.
    let w2 = World::new();
    let j = job(&w2, A, "j", 2, 0);
    let never = script(
        dir.path(),
        "never",
        "[ \"$1\" = \"--check\" ] && exit 0\ncat >/dev/null\nexit 7",
    );
    w2.mirror(&[A]).pass(PassKind::Recovery);
    let slept_before = w2.clock.sleeps().len();
    let r = processor_with(&w2, &[A], never, pcfg()).round();
    assert_eq!(r.finished, ["j"]);
    let f = w2.fake.job(&j).unwrap();
    assert_eq!(f.status, "failed");
    assert!(
        f.items
            .iter()
            .all(|i| i.failure_reason_type.as_deref() == Some("unexpected_failure"))
    );
    // The job says what happened: the integration could not run (not a validation failure).
    assert_eq!(
        f.failure_reason_type.as_deref(),
        Some("integration_unusable"),
        "{:?}",
        f.failure_reason
    );
    // Runs were spaced by a doubling wait on the (manual) clock: 5 s after the first crash,
    // 10 s after the second, none after the last.
    let waited: Duration = w2.clock.sleeps()[slept_before..].iter().sum();
    assert_eq!(waited, Duration::from_secs(15), "{:?}", w2.clock.sleeps());
    let runs: Vec<_> = w2
        .store()
        .events(Some(&j))
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "handler_failed")
        .map(|e| e.at)
        .collect();
    assert_eq!(runs.len(), 3, "{runs:?}");
    assert!(runs[1].until(runs[2]) >= 10_000, "{runs:?}");
}

#[test]
fn two_companies_never_have_two_jobs_in_progress_for_one_company() {
    let w = World::new();
    for (c, prefix) in [(A, "a"), (B, "b")] {
        for i in 0..3 {
            w.fake
                .add_job(JobSpec {
                    id: Some(format!("{prefix}{i}")),
                    company_id: c.into(),
                    created_secs_ago: Some(600 - i * 10),
                    items: Some(5),
                    ..JobSpec::default()
                })
                .unwrap();
        }
    }
    let mut m = w.mirror(&[A, B]);
    m.pass(PassKind::Recovery);
    let dir = tempfile::tempdir().unwrap();
    let mut p = processor_with(&w, &[A, B], script(dir.path(), "h", ANSWER_ALL), pcfg());
    for _ in 0..5 {
        p.round();
        m.pass(PassKind::Poll);
    }
    // Replay the fake's log: per company, the set of jobs in progress after every event.
    let company = |j: &str| if j.starts_with('a') { A } else { B };
    let mut open: HashMap<&str, Vec<String>> = HashMap::new();
    let mut max_open = 0;
    for r in w
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.path == "/v3/export-job-events" && r.status == 202)
    {
        let v: Value = serde_json::from_str(&r.body).unwrap();
        let j = v["jobId"].as_str().unwrap().to_owned();
        let set = open.entry(company(&j)).or_default();
        if v["event"] == "started" {
            set.push(j);
        } else {
            set.retain(|x| *x != j);
        }
        max_open = max_open.max(set.len());
    }
    assert_eq!(max_open, 1);
    for id in ["a0", "a1", "a2", "b0", "b1", "b2"] {
        assert_eq!(w.fake.job(id).unwrap().status, "completed", "{id}");
    }
    // And oldest first within each company.
    let started = w.started_sent();
    assert_eq!(started, ["a0", "b0", "a1", "b1", "a2", "b2"]);
}

#[test]
fn lost_answer_to_an_item_report_resent_it_and_reported_items_twice() {
    // Found by the simulation: Pleo applied a PUT of results but the answer was lost; the
    // batch was sent again, reporting each item `successful` twice.
    let w = World::new();
    let j = job(&w, A, "j", 30, 0);
    w.mirror(&[A]).pass(PassKind::Recovery);
    w.fake.push_fault(FaultRule {
        skip: 0,
        method: Some("PUT".into()),
        path_prefix: None,
        fault: Fault::HangUp,
    });
    let mut p = processor_with(&w, &[A], outbox(&w), pcfg());
    let r = p.round();
    assert!(r.finished.is_empty(), "paused after the lost answer: {r:?}");
    let r = p.round();
    assert_eq!(r.finished, ["j"]);
    let s = successes_per_item(&w, &j);
    assert_eq!(s.len(), 30);
    assert!(s.values().all(|n| *n == 1), "{s:?}");
    assert_eq!(w.fake.job(&j).unwrap().status, "completed");
}

#[test]
fn a_host_clock_an_hour_fast_never_ends_a_job_early() {
    // Deadlines are Pleo's (`lastUpdatedAt + expiresIn`) and measured on Pleo's clock (the
    // `Date` of its answers): by our clock this job is past its deadline before it starts.
    let w = World::new();
    let j = job(&w, A, "j", 3, 0);
    w.mirror(&[A]).pass(PassKind::Recovery);
    let (p, host) = w.processor_skewed(&[A], ProcessorConfig::default(), 3_700_000);
    let host: jobmirror::clock::SharedClock = host;
    let stage = HandlerStage::new(w.clients(), host, outbox(&w), pcfg());
    let r = p.with_stage(Box::new(stage)).round();
    assert_eq!(r.claimed, ["j"]);
    assert_eq!(r.finished, ["j"]);
    let f = w.fake.job(&j).unwrap();
    assert_eq!(f.status, "completed", "{:?}", f.failure_reason);
}

#[test]
fn a_host_clock_set_back_does_not_delay_the_next_readiness_check() {
    // Found by the replay's "no job left to expire" invariant (simulation seed 304): the
    // retry was timed at an instant on the host clock, so a clock set back 12 minutes delayed
    // the next check by 12 minutes, and a job whose accounting system was back expired.
    let w = World::new();
    let j = job(&w, A, "j", 2, 0);
    let dir = tempfile::tempdir().unwrap();
    w.mirror(&[A]).pass(PassKind::Recovery);
    let (p, host) = w.processor_skewed(&[A], ProcessorConfig::default(), 0);
    let host_clock: jobmirror::clock::SharedClock = host.clone();
    let stage = HandlerStage::new(w.clients(), host_clock, flaky_erp(dir.path()), pcfg());
    let mut p = p.with_stage(Box::new(stage));
    assert_eq!(p.round().not_ready, ["j"]);
    assert_eq!(checks(dir.path()), 1);
    host.jump(-720_000);
    std::fs::write(dir.path().join("ready"), "").unwrap();
    let r = p.round();
    let due = r.next_due.expect("a next check is due");
    assert!(
        host.now().until(due) <= 60_000,
        "the next check is due within readiness_retry (60 s) of the host's now, not {} s",
        host.now().until(due) / 1000
    );
    // One retry interval later (on any clock), the check runs again and the job starts.
    w.clock.advance(Duration::from_secs(61));
    let r = p.round();
    assert_eq!(checks(dir.path()), 2);
    assert_eq!(r.claimed, ["j"]);
    assert_eq!(w.fake.job(&j).unwrap().status, "completed");
}

/// A processor whose client retries quickly (a failing report costs milliseconds, not seconds).
fn quick_retry_processor(w: &World, handler: HandlerSpec) -> Processor {
    let mut c = w.client_config();
    c.retry.backoff_base_ms = 1;
    c.retry.backoff_cap_ms = 5;
    let clients = jobmirror::pleo::Clients::single(std::sync::Arc::new(
        jobmirror::pleo::PleoClient::new(c, w.shared_clock()).unwrap(),
    ));
    let stage = HandlerStage::new(clients.clone(), w.shared_clock(), handler, pcfg());
    Processor::new(
        w.store(),
        clients,
        w.shared_clock(),
        vec![A.to_owned()],
        ProcessorConfig::default(),
    )
    .with_stage(Box::new(stage))
}

/// A handler that answers every item successful, appending each entry it is handed to
/// `DIR/seen` and a line per run to `DIR/runs`.
fn recording_erp(dir: &Path) -> HandlerSpec {
    let d = dir.display();
    script(
        dir,
        "h",
        &format!(
            r#"[ "$1" = "--check" ] && exit 0
echo run >> {d}/runs
while read -r line; do
  e=$(printf '%s' "$line" | sed -n 's/.*"accountingEntryId":"\([^"]*\)".*/\1/p')
  [ -n "$e" ] || continue
  echo "$e" >> {d}/seen
  printf '{{"accountingEntryId":"%s","status":"successful"}}\n' "$e"
done"#
        ),
    )
}

fn lines_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|s| s.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

#[test]
fn results_delivered_while_a_report_fails_are_recorded_and_never_handed_out_again() {
    // A report batch that failed mid-run ended the run: results the handler had delivered
    // were dropped, and it was started again for items it had already posted to the ERP.
    let w = World::new();
    let j = job(&w, A, "j", 150, 0);
    w.mirror(&[A]).pass(PassKind::Recovery);
    // The first report (at 100 results) fails through every retry (5 attempts of 500).
    fail_puts(&w, 5);
    let dir = tempfile::tempdir().unwrap();
    let mut p = quick_retry_processor(&w, recording_erp(dir.path()));
    let mut rounds = 0;
    while w.fake.job(&j).unwrap().status != "completed" {
        rounds += 1;
        assert!(rounds <= 3, "not completed after 3 rounds");
        p.round();
    }
    assert_eq!(
        lines_of(&dir.path().join("runs")).len(),
        1,
        "one handler run"
    );
    let mut seen = lines_of(&dir.path().join("seen"));
    assert_eq!(seen.len(), 150);
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 150, "no item handed to the handler twice");
    let s = successes_per_item(&w, &j);
    assert_eq!(s.len(), 150);
    assert!(s.values().all(|n| *n == 1), "each reported once");
    // The failed report was answered 500 five times before anything was acknowledged.
    let puts: Vec<u16> = w
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "PUT")
        .map(|r| r.status)
        .collect();
    assert_eq!(&puts[..5], &[500; 5], "{puts:?}");
}

/// The fake's requests for job events naming a terminal event, and the reads of `job` between
/// them: ("event", status) or ("read", status).
fn finishing_requests(w: &World, job: &str) -> Vec<(String, u16)> {
    let path = format!("/v3/export-jobs/{job}");
    w.fake
        .requests()
        .into_iter()
        .filter_map(|r| {
            if r.method == "POST" && r.path == "/v3/export-job-events" {
                let v: Value = serde_json::from_str(&r.body).unwrap();
                (v["event"] != "started")
                    .then(|| (v["event"].as_str().unwrap().to_owned(), r.status))
            } else if r.method == "GET" && r.path == path {
                Some(("read".to_owned(), r.status))
            } else {
                None
            }
        })
        .collect()
}

#[test]
fn a_terminal_event_whose_answer_is_lost_is_not_sent_again_without_a_read() {
    // After a lost answer or a 504 the event was sent again at once (and met a 422). (The
    // fake's `Truncate` cuts a body; the answer to an event has none, so it is no loss here.)
    for fault in [Fault::GatewayTimeout, Fault::HangUp] {
        let w = World::new();
        let j = job(&w, A, "j", 3, 0);
        w.mirror(&[A]).pass(PassKind::Recovery);
        w.fake.push_fault(FaultRule {
            skip: 1, // `started` goes through
            method: Some("POST".into()),
            path_prefix: Some("/v3/export-job-events".into()),
            fault: fault.clone(),
        });
        let mut p = quick_retry_processor(&w, outbox(&w));
        let r = p.round();
        assert_eq!(r.finished, ["j"], "{fault:?}");
        assert_eq!(w.fake.job(&j).unwrap().status, "completed", "{fault:?}");
        let seq = finishing_requests(&w, &j);
        let events: Vec<&(String, u16)> = seq.iter().filter(|(k, _)| k != "read").collect();
        assert_eq!(events.len(), 1, "{fault:?}: sent once: {seq:?}");
        let at = seq.iter().position(|(k, _)| k == "completed").unwrap();
        assert!(
            seq[at + 1..].iter().any(|(k, s)| k == "read" && *s == 200),
            "{fault:?}: read after the lost answer: {seq:?}"
        );
        let detail = w
            .store()
            .events(Some(&j))
            .unwrap()
            .into_iter()
            .find(|e| e.kind == "finish_sent")
            .unwrap()
            .detail;
        assert_eq!(detail["outcome"], "read after a lost answer", "{fault:?}");
        assert_eq!(
            w.store().job(&j).unwrap().unwrap().proc_state,
            ProcState::Done
        );
    }
}
