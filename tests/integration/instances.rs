//! Several `jobmirror run` processes on one real PostgreSQL database and one fake Pleo: the
//! companies are split by lease, and every job is started once and finished once.

use std::time::Duration;

use jobmirror::sandbox::{FakePleo, JobSpec};

use crate::postgres::{TestDb, database};
use crate::reliability::instance;

fn company(i: usize) -> String {
    format!("5a4e0000-0000-4000-8000-{i:012}")
}

fn shared_env<'a>(db: &'a TestDb, name: &'a str, pw: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("JOBMIRROR_DB", db.url.as_str()),
        ("JOBMIRROR_DB_PASSWORD_FILE", pw),
        ("JOBMIRROR_INSTANCE_NAME", name),
        ("JOBMIRROR_COMPANY_LEASE_SECS", "3"),
    ]
}

/// Every job of the fake finished at Pleo (a final event answered 202).
fn finished(fake: &FakePleo, jobs: usize, within: Duration) -> bool {
    fake.wait_for_requests(within, |q| {
        q.iter()
            .filter(|r| {
                r.path == "/v3/export-job-events"
                    && r.status == 202
                    && !r.body.contains("\"started\"")
            })
            .count()
            >= jobs
    })
}

fn final_events_for(fake: &FakePleo, job: &str) -> usize {
    fake.requests()
        .iter()
        .filter(|r| r.path == "/v3/export-job-events" && r.status == 202)
        .filter(|r| {
            serde_json::from_str::<serde_json::Value>(&r.body)
                .is_ok_and(|v| v["jobId"] == job && v["event"] != "started")
        })
        .count()
}

#[test]
fn three_instances_on_postgres_share_thirty_companies_and_do_each_job_once() {
    let Some(db) = database() else { return };
    let fake = crate::reliability::real_time_fake();
    let companies: Vec<String> = (0..30).map(company).collect();
    for (i, c) in companies.iter().enumerate() {
        fake.add_job(JobSpec {
            id: Some(format!("job-{i:02}")),
            company_id: c.clone(),
            created_secs_ago: Some(600),
            items: Some(3),
            ..JobSpec::default()
        })
        .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let pw = db.password_file.to_string_lossy().into_owned();
    let mut running = Vec::new();
    for name in ["a", "b", "c"] {
        let env = shared_env(&db, name, &pw);
        running.push(instance(dir.path(), name, &fake, &companies, &env));
    }
    assert!(
        finished(&fake, 30, Duration::from_secs(90)),
        "not every job finished"
    );
    for i in 0..30 {
        let id = format!("job-{i:02}");
        assert_eq!(fake.started_events_for(&id), 1, "{id}: started once");
        assert_eq!(final_events_for(&fake, &id), 1, "{id}: finished once");
        let mut per_item = std::collections::HashMap::new();
        for (entry, status) in fake.item_updates(&id) {
            *per_item.entry((entry, status)).or_insert(0) += 1;
        }
        assert_eq!(per_item.len(), 3, "{id}: {per_item:?}");
        assert!(
            per_item.values().all(|n| *n == 1),
            "{id}: an item reported twice"
        );
    }
    // The split: every company held by one live instance, each within one of ten.
    let mut s = db.connect();
    let rows = s
        .client()
        .query(
            "SELECT holder, count(*) FROM company_leases
              WHERE expires_at > jm_now_ms() GROUP BY holder ORDER BY holder",
            &[],
        )
        .unwrap();
    let split: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(split.iter().map(|(_, n)| n).sum::<i64>(), 30, "{split:?}");
    assert_eq!(split.len(), 3, "{split:?}");
    assert!(split.iter().all(|(_, n)| (9..=11).contains(n)), "{split:?}");
    // Each instance's processors claimed only companies it held at the time: every claim
    // journaled falls inside a lease of one holder (the journal is one sequence for all).
    let lease_events = s
        .client()
        .query(
            "SELECT count(*) FROM job_events WHERE kind = 'claim_sent'",
            &[],
        )
        .unwrap()[0]
        .get::<_, i64>(0);
    assert_eq!(lease_events, 30, "one claim per job");
    // A graceful stop releases at once: after SIGTERM of all three nothing is held.
    for (mut r, _rx) in running {
        let child = r.0.take().unwrap();
        crate::cli::signal(&child, "TERM");
        let st = crate::cli::wait_exit(child, Duration::from_secs(20));
        assert!(st.success(), "{st:?}");
    }
    let held: i64 = s
        .client()
        .query_one(
            "SELECT count(*) FROM company_leases WHERE holder IS NOT NULL",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(held, 0, "every lease released by the stops");
}

/// A handler that takes `secs` an item and notes every item it is given (entry id and pid).
fn slow_handler(dir: &std::path::Path, secs: f64) -> String {
    let path = dir.join("slow-handler.py");
    let log = dir.join("handed.log");
    std::fs::write(
        &path,
        format!(
            r#"#!/usr/bin/env python3
import json, os, sys, time
if "--check" in sys.argv:
    sys.exit(0)
for line in sys.stdin:
    m = json.loads(line)
    if m.get("type") != "item":
        continue
    e = m["item"]["accountingEntryId"]
    with open({log:?}, "a") as f:
        f.write(os.environ["JOBMIRROR_JOB_ID"] + " " + e + " " + str(os.getpid()) + "\n")
    time.sleep({secs})
    print(json.dumps({{"accountingEntryId": e, "status": "successful", "externalId": "X-" + e}}), flush=True)
"#,
            log = log.to_string_lossy()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn kill_9_of_an_instance_with_a_job_in_hand_moves_its_companies_and_resumes_without_started() {
    let Some(db) = database() else { return };
    if std::process::Command::new("python3")
        .arg("-V")
        .output()
        .is_err()
    {
        return;
    }
    let fake = crate::reliability::real_time_fake();
    let companies: Vec<String> = (0..6).map(company).collect();
    for (i, c) in companies.iter().enumerate() {
        fake.add_job(JobSpec {
            id: Some(format!("slow-{i}")),
            company_id: c.clone(),
            created_secs_ago: Some(600),
            items: Some(12),
            ..JobSpec::default()
        })
        .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let handler = slow_handler(dir.path(), 0.25);
    let mut s = db.connect();
    s.migrate().unwrap();
    let pw = db.password_file.to_string_lossy().into_owned();
    let mut running = std::collections::BTreeMap::new();
    for name in ["a", "b", "c"] {
        let mut env = shared_env(&db, name, &pw);
        env.push(("JOBMIRROR_HANDLER_COMMAND", handler.as_str()));
        running.insert(name, instance(dir.path(), name, &fake, &companies, &env));
    }
    // Wait until some job is half handled, then kill -9 the instance holding its company.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (victim, job, company) = loop {
        assert!(std::time::Instant::now() < deadline, "no job got under way");
        let row = s
            .client()
            .query_opt(
                "SELECT j.id, j.company_id, l.holder FROM export_jobs j
                   JOIN company_leases l ON l.company_id = j.company_id
                  WHERE j.proc_state = 'processing'
                    AND (SELECT count(*) FROM job_items i
                          WHERE i.job_id = j.id AND i.handled_at IS NOT NULL) BETWEEN 2 AND 8
                  LIMIT 1",
                &[],
            )
            .unwrap();
        if let Some(r) = row {
            break (
                r.get::<_, String>(2),
                r.get::<_, String>(0),
                r.get::<_, String>(1),
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let lease = s
        .client()
        .query_one(
            "SELECT epoch, expires_at, jm_now_ms(), holder FROM company_leases WHERE company_id = $1",
            &[&company],
        )
        .unwrap();
    let (old_epoch, expires_at, killed_at, holder): (i64, i64, i64, String) =
        (lease.get(0), lease.get(1), lease.get(2), lease.get(3));
    assert_eq!(holder, victim);
    eprintln!(
        "{victim}'s lease on {company} runs {} ms more at the kill",
        expires_at - killed_at
    );
    let (mut reaper, _log) = running.remove(victim.as_str()).unwrap();
    let mut child = reaper.0.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    // Every job finishes; the victim's company moved to a survivor.
    assert!(
        finished(&fake, 6, Duration::from_secs(90)),
        "not every job finished after the kill"
    );
    let taken = s
        .client()
        .query_one(
            "SELECT at, detail FROM job_events WHERE company_id = $1 AND kind = 'lease_taken'
              AND seq > (SELECT max(seq) FROM job_events WHERE company_id = $1
                           AND kind = 'lease_taken' AND detail::jsonb ->> 'holder' = $2)
              ORDER BY seq LIMIT 1",
            &[&company, &victim],
        )
        .unwrap();
    let (at, detail): (i64, String) = (taken.get(0), taken.get(1));
    let detail: serde_json::Value = serde_json::from_str(&detail).unwrap();
    assert_ne!(detail["holder"], victim.as_str());
    assert_eq!(detail["epoch"], old_epoch + 1, "{detail}");
    let takeover_ms = at - killed_at;
    eprintln!(
        "kill -9 of {victim} holding {company} ({job}): taken over by {} after {takeover_ms} ms",
        detail["holder"]
    );
    // Within the lease (3 s) plus a round (1 s) plus a poll interval (1 s).
    assert!(takeover_ms <= 5_000, "takeover after {takeover_ms} ms");
    for i in 0..6 {
        let id = format!("slow-{i}");
        assert_eq!(fake.started_events_for(&id), 1, "{id}: started once");
        assert_eq!(final_events_for(&fake, &id), 1, "{id}: finished once");
        let mut per_item = std::collections::HashMap::new();
        for (entry, status) in fake.item_updates(&id) {
            *per_item.entry((entry, status)).or_insert(0) += 1;
        }
        assert_eq!(per_item.len(), 12, "{id}");
        assert!(
            per_item.values().all(|n| *n == 1),
            "{id}: an item reported twice"
        );
    }
    // The victim's job was resumed by its new holder, without `started`; an item whose result
    // the dead instance had committed was not handed to a handler again (at most the one it
    // was working on when killed is).
    let resumed: i64 = s
        .client()
        .query_one(
            "SELECT count(*) FROM job_events WHERE job_id = $1 AND kind = 'processing_started'",
            &[&job],
        )
        .unwrap()
        .get(0);
    assert!(resumed >= 2, "{job}: processing started {resumed} times");
    let handed = std::fs::read_to_string(dir.path().join("handed.log")).unwrap();
    let mut times = std::collections::HashMap::new();
    for l in handed.lines().filter(|l| l.starts_with(&format!("{job} "))) {
        let entry = l.split(' ').nth(1).unwrap().to_owned();
        *times.entry(entry).or_insert(0) += 1;
    }
    let twice = times.values().filter(|n| **n > 1).count();
    eprintln!("{job}: {twice} item(s) handed to a handler twice (in hand at the kill)");
    assert!(twice <= 1, "{job}: {times:?}");
}
