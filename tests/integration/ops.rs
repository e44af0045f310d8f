//! Operator commands through the real binary, compared with snapshot files in
//! `tests/snapshots/` (`UPDATE_SNAPSHOTS=1 cargo test ops::` rewrites them); the views; and
//! a reader holding a read transaction beside the working service.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use jobmirror::sandbox::JobSpec;
use jobmirror::service::processor::ProcessorConfig;
use jobmirror::service::sync::PassKind;
use jobmirror::store::Store;

use crate::harness::{T0, World};

const BIN: &str = env!("CARGO_BIN_EXE_jobmirror");
const A: &str = "aaaaaaaa-0000-4000-8000-000000000001";
const B: &str = "bbbbbbbb-0000-4000-8000-000000000002";
const C: &str = "cccccccc-0000-4000-8000-000000000003";

/// A database with a job in hand, jobs waiting behind it, a job too late (retired by the
/// round), a job next in line
/// and a webhook delivery; all times from the world's manual clock (T0).
fn world() -> World {
    let w = World::new();
    w.pending(A, "a-held", 900);
    w.pending(A, "a-waiting-1", 600);
    w.pending(A, "a-waiting-2", 300);
    w.fake
        .add_job(JobSpec {
            id: Some("b-late".into()),
            company_id: B.into(),
            created_secs_ago: Some(3500),
            ..JobSpec::default()
        })
        .unwrap();
    w.pending(C, "c-next", 60);
    w.mirror(&[A, B, C]).pass(PassKind::Recovery);
    // Only company A's processor runs: it claims a-held and keeps it (ReadyStage).
    let r = w.processor(&[A], ProcessorConfig::default()).round();
    assert_eq!(r.claimed, ["a-held"]);
    let st = w.store();
    let body = r#"{"data":{"id":"c-next","companyId":"cccccccc-0000-4000-8000-000000000003"},"eventType":"v1.export-job.created","eventId":"evt_1"}"#;
    let d = jobmirror::edge::webhook::Delivery {
        webhook_id: "msg_1".into(),
        signed_at: w.clock_now(),
        event_type: Some("v1.export-job.created".into()),
        event_id: Some("evt_1".into()),
        job_id: Some("c-next".into()),
        company_id: Some(C.into()),
        body: body.into(),
        headers: serde_json::json!({"webhook-id": "msg_1"}),
    };
    st.insert_deliveries(&[&d], w.clock_now()).unwrap();
    w
}

fn run(w: &World, args: &[&str]) -> (i32, String, String) {
    let cfg = w.db.parent().unwrap().join("ops.toml");
    std::fs::write(
        &cfg,
        format!(
            "db = {:?}\ncompany_ids = [{A:?}, {B:?}, {C:?}]\npleo_api_key = \"unused\"\n",
            w.db.display().to_string()
        ),
    )
    .unwrap();
    let mut c = Command::new(BIN);
    crate::cli::clean_env(&mut c)
        .arg("--config")
        .arg(&cfg)
        .args(args);
    let o = c.output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8(o.stdout).unwrap(),
        String::from_utf8(o.stderr).unwrap(),
    )
}

fn snapshot(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(name);
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_SNAPSHOTS=1 writes it)", path.display()));
    assert_eq!(
        actual,
        expected,
        "{} differs (UPDATE_SNAPSHOTS=1 rewrites it)",
        path.display()
    );
}

/// Ten minutes after T0, so seconds-left figures are fixed.
fn at() -> String {
    jobmirror::clock::Millis::parse_rfc3339(T0)
        .unwrap()
        .plus_secs(600)
        .to_rfc3339()
}

#[test]
fn every_report_matches_its_snapshot_in_text_and_json() {
    let w = world();
    let at = at();
    let cases: &[(&str, &[&str])] = &[
        ("status", &["status"]),
        ("jobs", &["jobs"]),
        ("jobs-company-a", &["jobs", "--company", A]),
        ("show-a-held", &["show", "a-held"]),
        ("why-a-held", &["why", "a-held"]),
        ("why-a-waiting-2", &["why", "a-waiting-2"]),
        ("why-b-late", &["why", "b-late"]),
        ("why-c-next", &["why", "c-next"]),
        ("doctor", &["doctor"]),
    ];
    for (name, args) in cases {
        for json in [false, true] {
            let mut a: Vec<&str> = args.to_vec();
            a.extend(["--at", &at]);
            if json {
                a.push("--json");
            }
            let (code, out, err) = run(&w, &a);
            // doctor fails here: a job is in hand and no service runs on the database.
            let expected = if *name == "doctor" { 1 } else { 0 };
            assert_eq!(code, expected, "{name}: {err}");
            if json {
                serde_json::from_str::<serde_json::Value>(&out)
                    .unwrap_or_else(|e| panic!("{name}: not JSON: {e}\n{out}"));
            }
            snapshot(
                &format!("{name}.{}", if json { "json" } else { "txt" }),
                &out,
            );
        }
    }
}

#[test]
fn a_finished_job_shows_no_time_left() {
    let w = world();
    w.complete_at_pleo("a-held");
    w.mirror(&[A, B, C]).pass(PassKind::Poll);
    let at = at();
    let (_, jobs, _) = run(&w, &["jobs", "--company", A, "--at", &at]);
    let line = jobs.lines().find(|l| l.contains("a-held")).unwrap();
    assert!(line.trim_end().ends_with(" -"), "{line}");
    let (_, json, _) = run(&w, &["show", "a-held", "--json", "--at", &at]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(v["job"]["seconds_left"].is_null(), "{v}");
    let (_, show, _) = run(&w, &["show", "a-held", "--at", &at]);
    assert!(
        show.contains("(finished)") && !show.contains("s left"),
        "{show}"
    );
    let (_, why, _) = run(&w, &["why", "a-held", "--at", &at]);
    assert!(why.starts_with("job a-held: finished\n"), "{why}");
}

#[test]
fn why_names_each_rule() {
    let w = world();
    let at = at();
    let rule = |job: &str| -> String {
        let (_, out, err) = run(&w, &["why", job, "--at", &at, "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("{err}"));
        v["rule"].as_str().unwrap().to_owned()
    };
    assert_eq!(rule("a-held"), "being_processed");
    assert_eq!(rule("a-waiting-1"), "company_busy");
    assert_eq!(rule("b-late"), "deadline_passed");
    assert_eq!(rule("c-next"), "next_in_line");
    let (code, _, err) = run(&w, &["why", "nope"]);
    assert_eq!(code, 2);
    assert!(err.contains("no job \"nope\""), "{err}");
}

#[test]
fn doctor_fails_when_polls_are_stale_and_warns_near_a_deadline() {
    let w = world();
    // Three hours later: no poll since (interval 300 s), and the held job expired.
    let late = jobmirror::clock::Millis::parse_rfc3339(T0)
        .unwrap()
        .plus_secs(3 * 3600)
        .to_rfc3339();
    let (code, out, _) = run(&w, &["doctor", "--at", &late]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("fail  poll"), "{out}");
    assert!(out.contains("fail  deadlines"), "{out}");
    assert!(out.ends_with("doctor: fail\n"), "{out}");
}

#[test]
fn backup_is_a_consistent_private_copy_and_never_overwrites() {
    let w = world();
    let dest = w.db.parent().unwrap().join("copy.db");
    let (code, out, err) = run(&w, &["backup", dest.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["quick_check"], "ok");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let copy = Store::open_read_only(&dest).unwrap();
    assert_eq!(copy.list_jobs(None, None, 100).unwrap().len(), 5);
    assert_eq!(
        copy.events(Some("a-held")).unwrap().len(),
        w.kinds("a-held").len()
    );
    let text_dest = w.db.parent().unwrap().join("copy2.db");
    let (code, out, err) = run(&w, &["backup", text_dest.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let bytes = std::fs::metadata(&text_dest).unwrap().len().to_string();
    snapshot(
        "backup.txt",
        &out.replace(text_dest.to_str().unwrap(), "<FILE>")
            .replace(&bytes, "<BYTES>"),
    );
    let (code, _, err) = run(&w, &["backup", dest.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("already exists"), "{err}");
}

#[test]
fn prune_keeps_the_journal_and_recent_webhook_ids() {
    let w = world();
    // Finish everything at Pleo and in the mirror, then prune as of 100 days later.
    w.complete_at_pleo("a-held");
    w.clock.advance(Duration::from_secs(3600));
    w.mirror(&[A, B, C]).pass(PassKind::Poll);
    let journal_before = w.store().events(None).unwrap().len();
    let later = jobmirror::clock::Millis::parse_rfc3339(T0)
        .unwrap()
        .plus_secs(100 * 86_400)
        .to_rfc3339();
    let (code, out, err) = run(&w, &["prune", "--dry-run", "--json", "--at", &later]);
    assert_eq!(code, 0, "{err}");
    snapshot("prune-dry-run.json", &out);
    let (_, out, _) = run(&w, &["prune", "--at", &later]);
    snapshot("prune.txt", &out);
    let st = w.store();
    // The journal only grows: one `pruned` entry more, dated when the prune ran (the real
    // clock), never at `--at` 100 days ahead.
    let events = st.events(None).unwrap();
    assert_eq!(events.len(), journal_before + 1);
    let pruned = events.last().unwrap();
    assert_eq!(pruned.kind, "pruned");
    let real_now = jobmirror::clock::Millis(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64,
    );
    assert!(
        (pruned.at.0 - real_now.0).abs() < 600_000,
        "pruned entry dated {:?}",
        pruned.at
    );
    // A prune that removes nothing journals nothing.
    let (code, out, err) = run(&w, &["prune", "--at", &later]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains('0'), "{out}");
    assert_eq!(st.events(None).unwrap().len(), journal_before + 1);
    let raw = st.job_raw("a-held").unwrap().unwrap();
    assert_eq!(raw, serde_json::json!({}));
    // Three days later, webhook ids are kept (senders retry for days); bodies are not.
    let w2 = world();
    let soon = jobmirror::clock::Millis::parse_rfc3339(T0)
        .unwrap()
        .plus_secs(3 * 86_400)
        .to_rfc3339();
    w2.mirror(&[A, B, C]).process_deliveries().unwrap();
    run(&w2, &["prune", "--at", &soon]);
    let (n, body): (i64, String) = w2
        .store()
        .conn()
        .query_row(
            "SELECT count(*), max(body) FROM webhook_deliveries",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(n, 1, "the id is kept for at least 4 days");
    assert!(!body.is_empty(), "7 days for bodies by default");
}

#[test]
fn the_views_answer_the_operators_questions() {
    let w = world();
    let st = Store::open_read_only(&w.db).unwrap();
    let rows = |sql: &str| -> Vec<String> {
        let mut s = st.conn().prepare(sql).unwrap();
        let n = s.column_count();
        s.query_map([], |r| {
            Ok((0..n)
                .map(|i| match r.get_ref(i).unwrap() {
                    rusqlite::types::ValueRef::Null => "NULL".to_owned(),
                    rusqlite::types::ValueRef::Integer(x) => x.to_string(),
                    rusqlite::types::ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
                    other => format!("{other:?}"),
                })
                .collect::<Vec<_>>()
                .join("|"))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
    };
    assert_eq!(
        rows("SELECT company_id, position, job_id FROM queue ORDER BY company_id, position"),
        [
            format!("{A}|1|a-waiting-1"),
            format!("{A}|2|a-waiting-2"),
            // Past its deadline by our clock but still pending when last read: Pleo decides.
            format!("{B}|1|b-late"),
            format!("{C}|1|c-next"),
        ]
    );
    assert_eq!(
        rows("SELECT company_id, job_id, proc_state, claim_attempts FROM in_flight"),
        [format!("{A}|a-held|processing|1")]
    );
    let timeline = rows("SELECT kind FROM job_timeline WHERE job_id = 'a-held' ORDER BY seq");
    assert_eq!(
        timeline,
        [
            "detected",
            "verified",
            "claim_sent",
            "status_changed",
            "claimed",
            "ready"
        ]
    );
    assert_eq!(
        rows("SELECT webhook_id, job_id, processed FROM recent_webhooks"),
        ["msg_1|c-next|NULL"]
    );
    let health = rows(
        "SELECT company_id, last_kind, last_error, failures_24h FROM poll_health ORDER BY company_id",
    );
    assert_eq!(health.len(), 3);
    assert!(
        health.iter().all(|h| h.ends_with("|recovery|NULL|0")),
        "{health:?}"
    );
    // The column names are part of the interface.
    let cols = |view: &str| -> Vec<String> {
        st.conn()
            .prepare(&format!("SELECT * FROM {view}"))
            .unwrap()
            .column_names()
            .map(str::to_owned)
            .collect()
    };
    snapshot(
        "view-columns.txt",
        &[
            "queue",
            "in_flight",
            "job_timeline",
            "recent_webhooks",
            "poll_health",
        ]
        .iter()
        .map(|v| format!("{v}: {}\n", cols(v).join(", ")))
        .collect::<String>(),
    );
}

#[test]
fn a_reader_holding_a_read_transaction_never_blocks_the_service() {
    let w = world();
    // An operator opens sqlite3 and leaves a read transaction open on the views.
    let reader =
        rusqlite::Connection::open_with_flags(&w.db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let before: i64 = reader
        .query_row("SELECT count(*) FROM job_timeline", [], |r| r.get(0))
        .unwrap();
    // Meanwhile the service works: new jobs, a pass, claims, finishing, webhooks.
    w.pending(B, "b-new", 30);
    w.complete_at_pleo("a-held");
    let t = std::time::Instant::now();
    let mut m = w.mirror(&[A, B, C]);
    m.pass(PassKind::Poll);
    m.process_deliveries().unwrap();
    let r = w.processor(&[A, B, C], ProcessorConfig::default()).round();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(!r.claimed.is_empty(), "{r:?}");
    let d = jobmirror::edge::webhook::Delivery {
        webhook_id: "msg_2".into(),
        signed_at: w.clock_now(),
        event_type: None,
        event_id: None,
        job_id: None,
        company_id: None,
        body: "{}".into(),
        headers: serde_json::json!({}),
    };
    w.store().insert_deliveries(&[&d], w.clock_now()).unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "writers waited on the reader: {:?}",
        t.elapsed()
    );
    // The reader still sees its snapshot, then the new state once it ends its transaction.
    let during: i64 = reader
        .query_row("SELECT count(*) FROM job_timeline", [], |r| r.get(0))
        .unwrap();
    assert_eq!(during, before);
    reader.execute_batch("COMMIT").unwrap();
    let after: i64 = reader
        .query_row("SELECT count(*) FROM job_timeline", [], |r| r.get(0))
        .unwrap();
    assert!(after > before);
    let p: PathBuf = w.db.clone();
    assert!(Store::open_read_only(&p).unwrap().quick_check().unwrap() == ["ok"]);
}

/// The counts `/metrics` reads and the per-company pass summary are kept as rows change; they
/// agree with the journal and `sync_runs` they summarise, and the migration that adds them
/// fills them from an existing database.
#[test]
fn maintained_counts_agree_with_what_they_summarise_and_the_migration_fills_them() {
    let w = world();
    w.complete_at_pleo("a-held");
    w.clock.advance(Duration::from_secs(60));
    w.mirror(&[A, B, C]).pass(PassKind::Poll);
    w.processor(&[A, B, C], ProcessorConfig::default()).round();
    let st = w.store();
    let counted = |sql: &str| -> Vec<(String, i64)> {
        st.conn()
            .prepare(sql)
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let journal = counted("SELECT kind, count(*) FROM job_events GROUP BY kind ORDER BY kind");
    assert!(journal.iter().any(|(k, _)| k == "claimed"), "{journal:?}");
    assert_eq!(st.event_counts().unwrap(), journal);
    let summaries = |st: &Store| -> Vec<String> {
        st.company_summaries()
            .unwrap()
            .iter()
            .map(|s| format!("{s:?}"))
            .collect()
    };
    let before = summaries(&st);
    // One summary per company, its counts those of its jobs.
    let all = st.company_summaries().unwrap();
    assert_eq!(
        all.iter()
            .map(|s| s.company_id.as_str())
            .collect::<Vec<_>>(),
        [A, B, C]
    );
    for s in &all {
        let direct: Vec<(String, i64)> = st
            .conn()
            .prepare(
                "SELECT proc_state, count(*) FROM export_jobs WHERE company_id = ?1 \
                 GROUP BY proc_state ORDER BY proc_state",
            )
            .unwrap()
            .query_map([&s.company_id], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(s.by_state, direct, "{}", s.company_id);
    }
    assert!(
        before.iter().any(|s| s.contains("next_deadline: Some")),
        "{before:?}"
    );
    let finished = st.finish_counts().unwrap();
    let last_poll = st.last_successful_poll().unwrap();
    assert!(last_poll.is_some());
    // An existing database: the tables, trigger and indexes as they were before V10, then
    // V10's own text run on it.
    st.conn()
        .execute_batch(
            "DROP TRIGGER job_events_counted; DROP TRIGGER job_events_finish_counted; \
             DROP TABLE journal_counts; DROP TABLE finish_counts; DROP TABLE company_sync; \
             DROP INDEX export_jobs_company_state; DROP INDEX export_jobs_state;",
        )
        .unwrap();
    let v10 = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite/V10__operator_summaries.sql"),
    )
    .unwrap();
    st.conn().execute_batch(&v10).unwrap();
    assert_eq!(st.event_counts().unwrap(), journal);
    assert_eq!(st.finish_counts().unwrap(), finished);
    assert_eq!(st.last_successful_poll().unwrap(), last_poll);
    assert_eq!(summaries(&st), before);
}
