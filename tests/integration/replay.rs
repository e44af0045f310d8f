//! Snapshots: every bundled fixture replays to its known outcome, replays are deterministic,
//! `record` reads the fake (GETs only) into a snapshot that replays, and the simulation runs
//! its seeds with the invariants checked after every step.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use jobmirror::clock::{ManualClock, Millis, SharedClock};
use jobmirror::replay::snapshot::{Event, Snapshot};
use jobmirror::replay::{Replay, ReplayOptions, Summary};
use jobmirror::sandbox::{FakeConfig, FakePleo, JobSpec};
use jobmirror::store::Store;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_jobmirror");
const A: &str = "a1a1a1a1-0000-4000-8000-0000000000ac";

fn fixture(name: &str) -> Snapshot {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(format!("{name}.json"));
    Snapshot::load(&path).unwrap()
}

/// Replays `snap` into a fresh database; returns the summary, the replay (for its fake) and
/// the directory holding the database.
pub(crate) fn play(snap: Snapshot) -> (Summary, Replay, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Replay::new(snap, ReplayOptions::new(dir.path().join("replay.db"))).unwrap();
    let s = r.run(&mut |_| Ok(())).unwrap();
    assert!(s.violations.is_empty(), "{}", s.render());
    (s, r, dir)
}

fn counts(pairs: &[(&str, u64)]) -> std::collections::BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

fn journal_kinds(db: &Path, job: &str) -> Vec<String> {
    Store::open_read_only(db)
        .unwrap()
        .events(Some(job))
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect()
}

fn started_for(r: &Replay, job: &str) -> usize {
    r.fake().started_events_for(job)
}

#[test]
fn normal_day_completes_every_job_and_reports_refused_entries() {
    let (s, r, _d) = play(fixture("normal-day"));
    assert_eq!(
        s.jobs_by_pleo_status,
        counts(&[("completed", 19), ("completed_with_errors", 4)])
    );
    assert_eq!(s.jobs_by_state, counts(&[("done", 23)]));
    assert_eq!(
        (s.claims, s.conflicts, s.resumed, s.expiries),
        (23, 0, 0, 0)
    );
    assert_eq!((s.webhooks.accepted, s.webhooks.refused), (17, 0));
    for job in r.fake().jobs() {
        assert_eq!(started_for(&r, &job.id), 1, "{}", job.id);
    }
}

/// The jobs `started` reached the fake for, in order.
fn started_order(r: &Replay) -> Vec<String> {
    r.fake()
        .requests()
        .into_iter()
        .filter(|q| q.method == "POST" && q.path == "/v3/export-job-events" && q.status == 202)
        .filter_map(|q| {
            let v: serde_json::Value = serde_json::from_str(&q.body).ok()?;
            (v["event"] == "started").then(|| v["jobId"].as_str().unwrap_or("").to_owned())
        })
        .collect()
}

#[test]
fn a_webhook_for_a_younger_job_runs_detection_and_the_older_job_goes_first() {
    let (s, r, _d) = play(fixture("younger-job-announced-first"));
    assert_eq!(started_order(&r), ["ya-older", "ya-younger"]);
    assert_eq!(s.jobs_by_pleo_status, counts(&[("completed", 2)]));
    // Both within seconds of the webhook, not at the poll five minutes later.
    let claimed_at: Vec<_> = r
        .fake()
        .requests()
        .into_iter()
        .filter(|q| q.method == "POST" && q.body.contains("\"started\""))
        .map(|q| q.at)
        .collect();
    let start = jobmirror::clock::Millis::parse_rfc3339("2026-11-24T08:00:00Z").unwrap();
    assert!(
        claimed_at.iter().all(|t| start.until(*t) < 120_000),
        "{claimed_at:?}"
    );
}

#[test]
fn recovery_resumes_the_in_progress_job_before_starting_another() {
    let (s, r, d) = play(fixture("recovery-in-progress-not-resumed"));
    assert_eq!(s.resumed, 1);
    assert_eq!(started_for(&r, "rr-held"), 0, "resumed without started");
    assert_eq!(started_order(&r), ["rr-pending-old", "rr-pending-young"]);
    assert_eq!(s.jobs_by_pleo_status, counts(&[("completed", 3)]));
    let kinds = journal_kinds(&d.path().join("replay.db"), "rr-held");
    assert!(kinds.contains(&"resumed".to_owned()), "{kinds:?}");
}

#[test]
fn a_fast_host_clock_never_abandons_a_job_pleo_shows_in_progress() {
    let (s, r, d) = play(fixture("host-clock-fast-while-processing"));
    assert_eq!(s.jobs_by_pleo_status, counts(&[("completed", 1)]));
    assert_eq!(s.expiries, 0);
    assert_eq!(started_for(&r, "cf-held"), 1);
    let kinds = journal_kinds(&d.path().join("replay.db"), "cf-held");
    assert!(
        kinds.contains(&"processing_error".to_owned()),
        "held across the jump: {kinds:?}"
    );
    assert!(!kinds.contains(&"expired".to_owned()), "{kinds:?}");
}

#[test]
fn nothing_is_started_while_the_accounting_system_is_down() {
    let (s, r, d) = play(fixture("accounting-down-before-claim"));
    assert_eq!(s.expiries, 0, "no silent expiry");
    assert_eq!(
        s.jobs_by_pleo_status,
        counts(&[("completed", 1), ("failed", 1)])
    );
    assert_eq!(started_for(&r, "ad-short"), 0, "failed from pending");
    let short = r.fake().job("ad-short").unwrap();
    assert_eq!(
        short.failure_reason_type.as_deref(),
        Some("invalid_configuration")
    );
    assert!(
        short
            .failure_reason
            .as_deref()
            .unwrap()
            .contains("not ready before this export would expire"),
        "{:?}",
        short.failure_reason
    );
    // ad-waits was started only after the outage (20 minutes in).
    let started_at = r
        .fake()
        .claims()
        .into_iter()
        .find(|c| c.job_id == "ad-waits" && c.accepted)
        .unwrap()
        .at;
    let start = jobmirror::clock::Millis::parse_rfc3339("2026-11-24T08:00:00Z").unwrap();
    assert!(start.until(started_at) >= 1_200_000, "{started_at:?}");
    let kinds = journal_kinds(&d.path().join("replay.db"), "ad-waits");
    assert!(kinds.contains(&"not_ready".to_owned()), "{kinds:?}");
}

#[test]
fn the_oldest_job_is_claimed_first_with_four_minutes_left() {
    let (s, r, _d) = play(fixture("near-expiry-oldest-first"));
    assert_eq!(started_order(&r), ["ne-old", "ne-young"]);
    assert_eq!(s.jobs_by_pleo_status, counts(&[("completed", 2)]));
}

#[test]
fn a_host_clock_set_back_while_not_ready_does_not_let_the_job_expire() {
    let (s, r, d) = play(fixture("host-clock-set-back-while-not-ready"));
    assert_eq!(s.jobs_by_pleo_status, counts(&[("completed", 1)]));
    assert_eq!(s.expiries, 0);
    // Started only once the accounting system was back (8 minutes in) and one retry
    // interval (180 s) later at most.
    let at = r
        .fake()
        .claims()
        .into_iter()
        .find(|c| c.job_id == "cb-job" && c.accepted)
        .unwrap()
        .at;
    let start = jobmirror::clock::Millis::parse_rfc3339("2026-11-24T08:00:00Z").unwrap();
    let secs = start.until(at) / 1000;
    assert!((480..=480 + 180).contains(&secs), "started {secs} s in");
    let kinds = journal_kinds(&d.path().join("replay.db"), "cb-job");
    assert!(kinds.contains(&"not_ready".to_owned()), "{kinds:?}");
}

#[test]
fn the_replay_reports_a_job_left_to_expire_while_it_was_claimable() {
    // The invariant judges Pleo's side, not our settings: a service that defers claims of
    // jobs with under ten minutes left (claim_min_left_secs = 600) lets the oldest job, four
    // minutes from its deadline and claimable the whole time, expire.
    let mut snap = fixture("near-expiry-oldest-first");
    snap.service
        .insert("claim_min_left_secs".into(), serde_json::json!(600));
    let dir = tempfile::tempdir().unwrap();
    let mut r = Replay::new(snap, ReplayOptions::new(dir.path().join("replay.db"))).unwrap();
    let s = r.run(&mut |_| Ok(())).unwrap();
    assert_eq!(s.expiries, 1, "{}", s.render());
    assert!(
        s.violations
            .iter()
            .any(|v| v.starts_with("job ne-old expired at Pleo after")
                && v.contains("oldest pending job and claimable")),
        "{:?}",
        s.violations
    );
    // The younger job, an hour from its deadline, is not judged: it was never the oldest
    // pending job while the older one waited.
    assert!(
        !s.violations.iter().any(|v| v.contains("ne-young")),
        "{:?}",
        s.violations
    );
}

#[test]
fn webhook_disorder_claims_in_creation_order() {
    // wd-2's webhook comes before wd-1's: wd-1 (older) is still claimed first.
    let (_s, r, _d) = play(fixture("webhook-disorder"));
    let order = started_order(&r);
    let pos = |id: &str| order.iter().position(|j| j == id).unwrap();
    assert!(pos("wd-1") < pos("wd-2"), "{order:?}");
}

#[test]
fn conflict_takes_the_next_oldest_and_leaves_the_other_integrations_job_alone() {
    let (s, r, d) = play(fixture("conflict"));
    assert_eq!((s.claims, s.conflicts), (2, 1));
    assert_eq!(started_for(&r, "cf-1-oldest"), 1, "no retry after the 422");
    assert_eq!(started_for(&r, "cf-3"), 0, "seen in_progress: nothing sent");
    let db = d.path().join("replay.db");
    assert!(journal_kinds(&db, "cf-1-oldest").contains(&"claim_conflict".to_owned()));
    // Its webhook ran the company's listing, which does not show a job already in_progress
    // elsewhere: it never enters the mirror (only its delivery is journaled), nothing is sent.
    assert_eq!(journal_kinds(&db, "cf-3"), ["webhook_received"]);
    assert_eq!(
        s.jobs_by_pleo_status,
        counts(&[("completed", 3), ("failed (expired)", 1)])
    );
}

#[test]
fn crash_recovery_resumes_without_started_and_finishes_interrupted_jobs() {
    let (s, r, d) = play(fixture("crash-recovery"));
    assert_eq!(s.crashes, 2);
    assert_eq!((s.claims, s.resumed), (2, 1));
    assert_eq!(started_for(&r, "cr-held"), 0);
    assert_eq!(started_for(&r, "cr-b-1"), 1);
    assert_eq!(started_for(&r, "cr-a-2"), 1);
    assert_eq!(s.jobs_by_pleo_status, counts(&[("completed", 3)]));
    let kinds = journal_kinds(&d.path().join("replay.db"), "cr-b-1");
    assert!(
        kinds.contains(&"processing_error".to_owned()),
        "interrupted: {kinds:?}"
    );
    // 300 items, each reported successful exactly once across the crash.
    let mut seen = std::collections::HashMap::new();
    for (entry, status) in r.fake().item_updates("cr-b-1") {
        assert_eq!(status, "successful");
        *seen.entry(entry).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 300);
    assert!(seen.values().all(|n| *n == 1));
}

#[test]
fn expiry_claims_a_job_close_to_its_deadline_and_leaves_one_that_expired_unseen() {
    // `started` refreshes lastUpdatedAt: a job with 3 minutes left is claimed, not skipped.
    let (s, r, d) = play(fixture("expiry"));
    assert_eq!(s.expiries, 1);
    assert_eq!(s.claims, 2);
    assert_eq!(started_for(&r, "ex-late"), 1);
    assert_eq!(started_for(&r, "ex-fresh"), 1);
    assert_eq!(started_for(&r, "ex-short"), 0);
    assert_eq!(
        s.jobs_by_pleo_status,
        counts(&[("completed", 2), ("failed (expired)", 1)])
    );
    // ex-short came and expired while jobmirror was down: never in the mirror, never claimed.
    assert!(journal_kinds(&d.path().join("replay.db"), "ex-short").is_empty());
    let kinds = journal_kinds(&d.path().join("replay.db"), "ex-late");
    assert!(kinds.contains(&"claimed".to_owned()), "{kinds:?}");
}

#[test]
fn api_outage_ends_with_every_job_finished_and_bounded_calls() {
    let (s, r, _d) = play(fixture("api-outage"));
    assert_eq!(s.jobs_by_pleo_status, counts(&[("completed", 3)]));
    assert_eq!(s.claims, 3);
    let faults = r
        .fake()
        .requests()
        .iter()
        .filter(|q| q.fault.is_some())
        .count();
    assert!(faults >= 10, "the outage was felt: {faults} faults");
    // Three jobs with 50 items: a bound on calls, so retries cannot run away.
    assert!(s.api_calls_total < 200, "{}", s.render());
}

#[test]
fn webhook_disorder_is_deduplicated_and_stale_deliveries_refused() {
    let (s, r, d) = play(fixture("webhook-disorder"));
    let w = &s.webhooks;
    assert_eq!(
        (w.delivered, w.accepted, w.duplicates, w.refused),
        (8, 5, 2, 1)
    );
    assert_eq!(s.jobs_by_pleo_status, counts(&[("completed", 6)]));
    for job in r.fake().jobs() {
        assert_eq!(started_for(&r, &job.id), 1, "{}", job.id);
    }
    let db = d.path().join("replay.db");
    let store = Store::open_read_only(&db).unwrap();
    let outcome: String = store
        .conn()
        .query_row(
            "SELECT outcome FROM webhook_deliveries WHERE webhook_id = 'msg_wd_ghost'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    // Pleo does not list the announced job yet: the company's listing ran, a later poll finds it.
    assert!(outcome.contains("not listed as open"), "{outcome}");
    let stored: i64 = store
        .conn()
        .query_row(
            "SELECT count(*) FROM webhook_deliveries WHERE webhook_id = 'msg_wd_4_stale'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(stored, 0, "a refused delivery is not stored");
}

#[test]
fn recorded_webhooks_verify_against_their_recorded_receipt_time() {
    // The same recorded bytes, received six minutes after their timestamp: refused.
    let mut snap = fixture("webhook-disorder");
    for step in &mut snap.timeline {
        if let Event::Webhook { headers, .. } = &step.event
            && headers.contains_key("webhook-signature")
        {
            step.at += 360.0;
        }
    }
    snap.timeline.sort_by(|a, b| a.at.total_cmp(&b.at));
    let (s, _r, _d) = play(snap);
    assert_eq!(s.webhooks.refused, 3, "{}", s.render());
}

#[test]
fn a_five_thousand_item_job_is_reported_in_batches_of_at_most_100() {
    let (s, r, _d) = play(fixture("big-job"));
    assert_eq!(
        s.jobs_by_pleo_status,
        counts(&[("completed_with_errors", 1)])
    );
    let puts: Vec<usize> = r
        .fake()
        .requests()
        .iter()
        .filter(|q| q.method == "PUT")
        .map(|q| serde_json::from_str::<Vec<Value>>(&q.body).unwrap().len())
        .collect();
    assert_eq!(puts.iter().sum::<usize>(), 5000);
    assert!(puts.iter().all(|n| *n <= 100), "{puts:?}");
    let updates = r.fake().item_updates("big-5000");
    assert_eq!(updates.iter().filter(|(_, s)| s == "failed").count(), 200);
}

/// Everything in the journal, as text.
fn journal(db: &Path) -> Vec<String> {
    let store = Store::open_read_only(db).unwrap();
    let mut stmt = store
        .conn()
        .prepare("SELECT seq, at, job_id, company_id, kind, detail FROM job_events ORDER BY seq")
        .unwrap();
    stmt.query_map([], |r| {
        Ok(format!(
            "{}|{}|{:?}|{:?}|{}|{}",
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, Option<String>>(2)?,
            r.get::<_, Option<String>>(3)?,
            r.get::<_, String>(4)?,
            r.get::<_, String>(5)?
        ))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

#[test]
fn two_replays_of_one_snapshot_write_identical_journals() {
    for name in ["api-outage", "webhook-disorder", "crash-recovery"] {
        let (a, ra, da) = play(fixture(name));
        let (b, rb, db) = play(fixture(name));
        let ja = journal(&da.path().join("replay.db"));
        let jb = journal(&db.path().join("replay.db"));
        assert!(ja.len() > 10, "{name}: {} journal rows", ja.len());
        assert_eq!(ja, jb, "{name}");
        assert_eq!(a, b, "{name}");
        let log = |r: &Replay| -> Vec<String> {
            r.fake()
                .requests()
                .iter()
                .map(|q| {
                    format!(
                        "{} {} {} {} {}",
                        q.method, q.path, q.query, q.status, q.body
                    )
                })
                .collect()
        };
        assert_eq!(
            log(&ra),
            log(&rb),
            "{name}: the same API calls in the same order"
        );
    }
}

fn cmd() -> Command {
    let mut c = Command::new(BIN);
    crate::cli::clean_env(&mut c);
    c
}

#[test]
fn record_reads_the_fake_with_gets_only_and_the_snapshot_replays() {
    // The fake's clock is a week before any date this test may run on: `--at` puts the
    // snapshot on Pleo's clock, so nothing here reads the host's date.
    const PLEO_NOW: &str = "2026-11-24T09:00:00Z";
    let clock: SharedClock = ManualClock::new(Millis::parse_rfc3339(PLEO_NOW).unwrap());
    let fake = FakePleo::start("127.0.0.1:0", FakeConfig::default(), clock).unwrap();
    let b = "b2b2b2b2-0000-4000-8000-0000000000b2";
    for (id, company, status, items) in [
        ("r-1", A, "pending", 3),
        ("r-2", A, "pending", 120),
        ("r-3", b, "pending", 2),
        ("r-done", b, "completed", 1),
    ] {
        let mut spec = JobSpec {
            id: Some(id.into()),
            company_id: company.into(),
            status: status.into(),
            created_secs_ago: Some(600),
            items: Some(items),
            ..JobSpec::default()
        };
        spec.extra.insert("createdBy".into(), json!("employee-7"));
        fake.add_job(spec).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("recorded.json");
    let run = |redact: bool, out: &PathBuf| {
        let mut c = cmd();
        c.arg("record")
            .arg("--at")
            .arg(PLEO_NOW)
            .arg("--out")
            .arg(out)
            .env("JOBMIRROR_DB", dir.path().join("unused.db"))
            .env("JOBMIRROR_PLEO_BASE_URL", fake.base_url())
            .env("JOBMIRROR_PLEO_API_KEY", fake.api_key())
            .env("JOBMIRROR_COMPANY_IDS", format!("{A},{b}"));
        if redact {
            c.arg("--redact");
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let said = run(true, &out);
    assert!(
        said.contains("recorded 3 open jobs of 2 companies"),
        "{said}"
    );
    let methods: std::collections::HashSet<String> =
        fake.requests().into_iter().map(|r| r.method).collect();
    assert_eq!(methods, ["GET".to_owned()].into(), "record only reads");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let text = std::fs::read_to_string(&out).unwrap();
    let snap = Snapshot::parse(&text).unwrap();
    assert_eq!(snap.companies, [A, b]);
    assert_eq!(snap.start, "2026-11-24T09:00:00.000Z");
    let r2 = snap
        .jobs
        .iter()
        .find(|j| j.id.as_deref() == Some("r-2"))
        .unwrap();
    assert_eq!(r2.job_items.as_ref().unwrap().len(), 120);
    let items = r2.export_items.as_ref().unwrap();
    assert_eq!(items.len(), 120);
    // The fake's export items carry an account name; redaction replaces names.
    let name = &items[0]["accountingEntryLines"][0]["account"]["name"];
    assert_eq!(name, "[redacted]");
    assert_eq!(r2.extra["createdBy"], "employee-7", "ids are kept");
    // Unredacted, the names are there.
    let plain = dir.path().join("plain.json");
    run(false, &plain);
    assert!(
        std::fs::read_to_string(&plain)
            .unwrap()
            .contains("Office supplies")
    );

    // The recording replays: every open job is claimed once and completed.
    let (s, replay, _d) = play(snap);
    assert_eq!(s.jobs_by_pleo_status, counts(&[("completed", 3)]));
    for id in ["r-1", "r-2", "r-3"] {
        assert_eq!(started_for(&replay, id), 1, "{id}");
    }
}

#[test]
fn replay_command_prints_a_summary_and_refuses_a_broken_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/conflict.json");
    let o = cmd()
        .arg("replay")
        .arg(&fixture)
        .arg("--db")
        .arg(&db)
        .arg("--json")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["claims"], 2);
    assert_eq!(v["conflicts"], 1);
    assert_eq!(v["violations"], json!([]));
    // The database is left for sqlite3, checkpointed (the .db alone holds every row), and a
    // second replay will not overwrite it.
    assert!(db.exists());
    let wal = std::fs::metadata(format!("{}-wal", db.display())).map_or(0, |m| m.len());
    assert_eq!(wal, 0, "{wal} bytes left in the WAL");
    let again = cmd()
        .arg("replay")
        .arg(&fixture)
        .arg("--db")
        .arg(&db)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    let broken = dir.path().join("broken.json");
    std::fs::write(
        &broken,
        r#"{"version":2,"start":"2026-11-24T08:00:00Z","companies":["c"],"timeline":[{"at":9,"event":"trigger"},{"at":1,"event":"trigger"}]}"#,
    )
    .unwrap();
    let o = cmd().arg("replay").arg(&broken).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("timeline[1]"), "{err}");
}

#[test]
fn simulation_holds_the_invariants_for_every_seed() {
    // CI runs 200 seeds; JOBMIRROR_SIM_SEEDS (and JOBMIRROR_SIM_SEED_START) run more.
    let seeds: u64 = std::env::var("JOBMIRROR_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let first: u64 = std::env::var("JOBMIRROR_SIM_SEED_START")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let workers = 2;
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let dir = dir.clone();
            std::thread::spawn(move || {
                // Yield to the latency-bound tests running beside this one (threads started
                // from here inherit it).
                #[cfg(target_os = "linux")]
                // SAFETY: setpriority on the calling thread; no memory is involved.
                unsafe {
                    libc::setpriority(libc::PRIO_PROCESS, 0, 10);
                }
                let mut failed = Vec::new();
                let mut steps = 0;
                for seed in (first..first + seeds).filter(|s| s % workers == w) {
                    let s = jobmirror::replay::simulate::run_seed(seed, dir.path())
                        .unwrap_or_else(|e| panic!("seed {seed}: {e:#}"));
                    steps += s.steps;
                    if !s.violations.is_empty() {
                        failed.push(format!(
                            "seed {seed}: {}\n  reproduce: {}",
                            s.violations.join("; "),
                            jobmirror::replay::simulate::reproduce_command(seed)
                        ));
                    }
                }
                (failed, steps)
            })
        })
        .collect();
    let mut failed = Vec::new();
    let mut steps = 0;
    for h in handles {
        let (f, s) = h.join().unwrap();
        failed.extend(f);
        steps += s;
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    assert!(steps > seeds * 10, "the seeds ran ({steps} steps)");
}

#[test]
fn onboarding_adds_removes_and_reauthorizes_companies_on_the_timeline() {
    let (s, r, d) = play(fixture("onboarding"));
    assert_eq!(
        (s.companies_added, s.companies_removed, s.tokens_revoked),
        (2, 1, 1)
    );
    assert_eq!(
        s.jobs_by_pleo_status,
        counts(&[("completed", 5), ("pending", 1)])
    );
    for job in [
        "ob-acme-1",
        "ob-delta-1",
        "ob-echo-1",
        "ob-bravo-1",
        "ob-delta-2",
    ] {
        assert_eq!(started_for(&r, job), 1, "{job}");
    }
    // The removed company's later export is left alone.
    assert_eq!(started_for(&r, "ob-echo-2"), 0);
    // Nothing is sent for the revoked company until it is authorized again (at 1,200 s).
    let start = jobmirror::clock::Millis::parse_rfc3339("2026-11-24T08:00:00Z").unwrap();
    let claim = r
        .fake()
        .claims()
        .into_iter()
        .find(|c| c.job_id == "ob-delta-2" && c.accepted)
        .unwrap();
    assert!(
        start.until(claim.at) >= 1_200_000,
        "{}",
        start.until(claim.at)
    );
    let db = d.path().join("replay.db");
    let kinds = journal_kinds(&db, "ob-delta-2");
    assert_eq!(
        kinds.iter().filter(|k| *k == "claimed").count(),
        1,
        "{kinds:?}"
    );
    let store = Store::open_read_only(&db).unwrap();
    let company: Vec<String> = store
        .events(None)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind.starts_with("company_"))
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        company,
        [
            "company_added",
            "company_added",
            "company_removed",
            "company_left",
            "company_credential_changed"
        ]
    );
}
