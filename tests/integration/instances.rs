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

/// `id` was started once and finished once at the fake and, with `items`, each of its items
/// was reported exactly once.
fn done_once(fake: &FakePleo, id: &str, items: Option<usize>) {
    assert_eq!(fake.started_events_for(id), 1, "{id}: started once");
    assert_eq!(final_events_for(fake, id), 1, "{id}: finished once");
    if let Some(n) = items {
        let mut per_item = std::collections::HashMap::new();
        for (entry, status) in fake.item_updates(id) {
            *per_item.entry((entry, status)).or_insert(0) += 1;
        }
        assert_eq!(per_item.len(), n, "{id}: {per_item:?}");
        assert!(
            per_item.values().all(|n| *n == 1),
            "{id}: an item reported twice"
        );
    }
}

/// On the database: `id`'s fenced steps, in order, begin with its one claim (also when
/// another instance resumed it) and end with its one final event; each was taken by the
/// instance that took the company's lease at the step's epoch; epochs never go back; within
/// one epoch no item is reported twice.
fn fenced_in_order(s: &mut jobmirror::store::pg::PgStore, id: &str) {
    let rows = s
        .client()
        .query(
            "SELECT f.step, f.holder, f.epoch, f.detail,
                    (SELECT t.detail::jsonb ->> 'holder' FROM job_events t
                      WHERE t.kind = 'lease_taken' AND t.company_id = f.company_id
                        AND (t.detail::jsonb ->> 'epoch')::bigint = f.epoch) AS taker
               FROM fenced_steps f WHERE f.job_id = $1 ORDER BY f.seq",
            &[&id],
        )
        .unwrap();
    let steps: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let count = |name: &str| steps.iter().filter(|s| *s == name).count();
    assert_eq!(
        steps.first().map(String::as_str),
        Some("claim"),
        "{id}: {steps:?}"
    );
    assert_eq!(count("claim"), 1, "{id}: {steps:?}");
    assert_eq!(
        steps.last().map(String::as_str),
        Some("finish"),
        "{id}: {steps:?}"
    );
    assert_eq!(count("finish"), 1, "{id}: {steps:?}");
    assert!(count("run") >= 1 && count("report") >= 1, "{id}: {steps:?}");
    let mut last_epoch = 0;
    let mut reported = std::collections::HashSet::new();
    for r in &rows {
        let (step, holder, epoch): (String, String, i64) = (r.get(0), r.get(1), r.get(2));
        let taker: Option<String> = r.get(4);
        assert_eq!(
            taker.as_deref(),
            Some(holder.as_str()),
            "{id}: {step} at epoch {epoch}"
        );
        assert!(
            epoch >= last_epoch,
            "{id}: {step} at epoch {epoch} after {last_epoch}"
        );
        last_epoch = epoch;
        if step == "report" {
            let detail: serde_json::Value = serde_json::from_str(&r.get::<_, String>(3)).unwrap();
            for entry in detail["entries"].as_array().unwrap() {
                let fresh = reported.insert((epoch, entry.as_str().unwrap().to_owned()));
                assert!(fresh, "{id}: {entry} reported twice under epoch {epoch}");
            }
        }
    }
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
    if !finished(&fake, 30, Duration::from_secs(90)) {
        let logs: Vec<String> = running
            .iter()
            .flat_map(|(_, rx)| rx.try_iter().collect::<Vec<_>>())
            .filter(|l| !l.contains("[INFO] claimed") && !l.contains("handler started"))
            .collect();
        panic!("not every job finished:\n{}", logs.join("\n"));
    }
    let mut s = db.connect();
    for i in 0..30 {
        let id = format!("job-{i:02}");
        done_once(&fake, &id, Some(3));
        fenced_in_order(&mut s, &id);
    }
    // The split: every company held by one live instance, each within one of ten.
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
    // Operators see the three in `status`, `doctor` and `/metrics`.
    let op = |args: &[&str]| {
        let out = crate::cli::cmd()
            .args(args)
            .env("JOBMIRROR_DB", &db.url)
            .env("JOBMIRROR_DB_PASSWORD_FILE", &db.password_file)
            .env("JOBMIRROR_COMPANY_LEASE_SECS", "3")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, text) = op(&["status", "--json"]);
    assert_eq!(code, Some(0), "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let alive = v["shared"]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["state"] == "alive")
        .count();
    assert_eq!(alive, 3, "{}", v["shared"]);
    assert_eq!(
        v["shared"]["companies_without_holder"],
        serde_json::json!([])
    );
    let (_, text) = op(&["status"]);
    assert!(
        text.contains("companies without a live holder: 0"),
        "{text}"
    );
    let (code, text) = op(&["doctor", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let leases = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "leases")
        .cloned()
        .unwrap_or_default();
    assert_eq!(leases["level"], "ok", "{text} (exit {code:?})");
    let admin = running
        .iter()
        .flat_map(|(_, rx)| rx.try_iter().collect::<Vec<_>>())
        .find_map(|l| {
            l.split("admin listener on http://")
                .nth(1)
                .map(|a| a.split_whitespace().next().unwrap().to_owned())
        })
        .expect("an admin address in the logs");
    let metrics = ureq::get(format!("http://{admin}/metrics"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(metrics.contains("jobmirror_instances_live 3"), "{metrics}");
    assert!(
        metrics.contains("jobmirror_companies_without_holder 0"),
        "{metrics}"
    );
    let held: i64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("jobmirror_company_leases_held "))
        .unwrap()
        .parse()
        .unwrap();
    assert!((9..=11).contains(&held), "{held}");
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
    // Thirty companies wanted and no holder: `doctor` fails and `instances` says so (exit 1).
    let (code, text) = op(&["doctor"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("30 companies have no live holder"), "{text}");
    let (code, text) = op(&["instances"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("companies no live instance holds: 30"),
        "{text}"
    );
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

/// Three instances (a, b, c) on a fresh database, each with a handler that takes 0.25 s an
/// item, and a 12-item job for each of the companies `range` (ids `prefix-i`). None when
/// PostgreSQL or python3 (the handler) is missing.
struct SlowThree {
    fake: FakePleo,
    s: jobmirror::store::pg::PgStore,
    running: std::collections::BTreeMap<
        &'static str,
        (crate::cli::Reaper, crossbeam_channel::Receiver<String>),
    >,
    db: TestDb,
    dir: tempfile::TempDir,
}

fn three_with_slow_jobs(prefix: &str, range: std::ops::Range<usize>) -> Option<SlowThree> {
    let db = database()?;
    std::process::Command::new("python3")
        .arg("-V")
        .output()
        .ok()?;
    let fake = crate::reliability::real_time_fake();
    let companies: Vec<String> = range.map(company).collect();
    for (i, c) in companies.iter().enumerate() {
        fake.add_job(JobSpec {
            id: Some(format!("{prefix}-{i}")),
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
    Some(SlowThree {
        fake,
        s,
        running,
        db,
        dir,
    })
}

impl SlowThree {
    /// A job being processed with between `lo` and `hi` items handled: (its company's holder,
    /// the job, the company). Fails after 60 s.
    fn job_under_way(&mut self, lo: i64, hi: i64) -> (String, String, String) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            assert!(std::time::Instant::now() < deadline, "no job got under way");
            let row = self
                .s
                .client()
                .query_opt(
                    "SELECT j.id, j.company_id, l.holder FROM export_jobs j
                       JOIN company_leases l ON l.company_id = j.company_id
                      WHERE j.proc_state = 'processing'
                        AND (SELECT count(*) FROM job_items i
                              WHERE i.job_id = j.id AND i.handled_at IS NOT NULL)
                            BETWEEN $1 AND $2
                      LIMIT 1",
                    &[&lo, &hi],
                )
                .unwrap();
            if let Some(r) = row {
                return (r.get(2), r.get(0), r.get(1));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn kill_9_of_an_instance_with_a_job_in_hand_moves_its_companies_and_resumes_without_started() {
    let Some(mut t) = three_with_slow_jobs("slow", 0..6) else {
        return;
    };
    // Wait until some job is half handled, then kill -9 the instance holding its company.
    let (victim, job, company) = t.job_under_way(2, 8);
    // The database and the folder live until the test ends.
    let SlowThree {
        fake,
        mut s,
        mut running,
        db: _db,
        dir,
    } = t;
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
        done_once(&fake, &id, Some(12));
        fenced_in_order(&mut s, &id);
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

/// Waits (bounded, polling the database every 50 ms) until `sql` answers a count of at least
/// `n`.
fn wait_count(s: &mut jobmirror::store::pg::PgStore, sql: &str, n: i64, within: Duration) -> i64 {
    let deadline = std::time::Instant::now() + within;
    loop {
        let got: i64 = s.client().query_one(sql, &[]).map_or(0, |r| r.get(0));
        if got >= n || std::time::Instant::now() >= deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal_pid(pid: u32, sig: &str) {
    let st = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn an_instance_stopped_past_its_lease_sends_nothing_for_what_it_lost_and_takes_a_share_again() {
    let Some(mut t) = three_with_slow_jobs("stop", 10..16) else {
        return;
    };
    // A job under way: SIGSTOP its holder for three leases.
    let (victim, job, company) = t.job_under_way(1, 6);
    // The database and the folder live until the test ends.
    let SlowThree {
        fake,
        mut s,
        running,
        db: _db,
        dir: _dir,
    } = t;
    let pid = running[victim.as_str()].0.0.as_ref().unwrap().id();
    signal_pid(pid, "STOP");
    // The others take the stopped one's companies and finish its job.
    let done_by_others = finished(&fake, 6, Duration::from_secs(90));
    assert!(
        done_by_others,
        "the others did not finish every job while {victim} was stopped"
    );
    let moved: String = s
        .client()
        .query_one(
            "SELECT holder FROM company_leases WHERE company_id = $1",
            &[&company],
        )
        .unwrap()
        .get(0);
    assert_ne!(moved, victim, "{company} moved while {victim} was stopped");
    // Woken: from now on, nothing may be sent for the job it lost (its new holder finished it),
    // and its handler run for that job is stopped.
    let mark = fake.requests().len();
    signal_pid(pid, "CONT");
    let mut seen = Vec::new();
    crate::cli::wait_for(
        &running[victim.as_str()].1,
        &format!(
            "company {company}: this instance no longer holds its lease; nothing is sent for it"
        ),
        &mut seen,
    );
    let rejoined = wait_count(
        &mut s,
        &format!(
            "SELECT count(*) FROM company_leases WHERE holder = '{victim}' AND expires_at > jm_now_ms()"
        ),
        2,
        Duration::from_secs(20),
    );
    assert_eq!(rejoined, 2, "{victim} took its fair share again (2 of 6)");
    let after: Vec<_> = fake
        .requests_since(mark)
        .into_iter()
        .filter(|r| r.method != "GET" && (r.body.contains(&job) || r.path.contains(&job)))
        .collect();
    assert!(
        after.is_empty(),
        "{victim} sent for {job} after waking: {after:?}"
    );
    for i in 0..6 {
        let id = format!("stop-{i}");
        done_once(&fake, &id, Some(12));
        fenced_in_order(&mut s, &id);
    }
}

#[test]
fn a_fourth_instance_takes_its_share_within_two_leases_without_moving_a_job_in_hand() {
    let Some(db) = database() else { return };
    if std::process::Command::new("python3")
        .arg("-V")
        .output()
        .is_err()
    {
        return;
    }
    let fake = crate::reliability::real_time_fake();
    let companies: Vec<String> = (20..32).map(company).collect();
    for (i, c) in companies.iter().enumerate() {
        fake.add_job(JobSpec {
            id: Some(format!("join-{i}")),
            company_id: c.clone(),
            created_secs_ago: Some(600),
            items: Some(16),
            ..JobSpec::default()
        })
        .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let handler = slow_handler(dir.path(), 0.2);
    let mut s = db.connect();
    s.migrate().unwrap();
    let pw = db.password_file.to_string_lossy().into_owned();
    let mut running = Vec::new();
    for name in ["a", "b", "c"] {
        let mut env = shared_env(&db, name, &pw);
        env.push(("JOBMIRROR_HANDLER_COMMAND", handler.as_str()));
        running.push(instance(dir.path(), name, &fake, &companies, &env));
    }
    // Jobs in hand on the three, then a fourth joins.
    let in_hand = wait_count(
        &mut s,
        "SELECT count(*) FROM export_jobs WHERE proc_state = 'processing'",
        3,
        Duration::from_secs(60),
    );
    assert!(in_hand >= 3, "{in_hand} jobs in hand");
    let joined_at: i64 = s
        .client()
        .query_one("SELECT jm_now_ms()", &[])
        .unwrap()
        .get(0);
    let mut env = shared_env(&db, "d", &pw);
    env.push(("JOBMIRROR_HANDLER_COMMAND", handler.as_str()));
    running.push(instance(dir.path(), "d", &fake, &companies, &env));
    let share = wait_count(
        &mut s,
        "SELECT count(*) FROM company_leases WHERE holder = 'd' AND expires_at > jm_now_ms()",
        2,
        Duration::from_secs(20),
    );
    let got_at: i64 = s
        .client()
        .query_one("SELECT jm_now_ms()", &[])
        .unwrap()
        .get(0);
    eprintln!(
        "d holds {share} companies {} ms after joining",
        got_at - joined_at
    );
    assert!(share >= 2, "d holds {share}");
    assert!(
        got_at - joined_at <= 2 * 3_000 + 2_000,
        "d got its share after {} ms",
        got_at - joined_at
    );
    assert!(
        finished(&fake, 12, Duration::from_secs(120)),
        "not every job finished"
    );
    // No company changed holder between its job's claim and its final event.
    let moved: i64 = s
        .client()
        .query_one(
            "SELECT count(*) FROM job_events c
               JOIN job_events f ON f.job_id = c.job_id AND f.kind = 'finish_sent'
               JOIN job_events l ON l.company_id = c.company_id AND l.kind = 'lease_taken'
              WHERE c.kind = 'claim_sent' AND l.seq > c.seq AND l.seq < f.seq",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(moved, 0, "a company moved while its job was in hand");
    for i in 0..12 {
        let id = format!("join-{i}");
        done_once(&fake, &id, None);
        fenced_in_order(&mut s, &id);
    }
}

/// Behind a load balancer any instance may take a delivery: one for a company another
/// instance holds is stored in the shared database, and `NOTIFY` wakes the holder, which
/// claims the job at once (polls are an hour apart here).
#[test]
fn a_webhook_taken_by_one_instance_wakes_the_holder_of_its_company() {
    let Some(db) = database() else { return };
    let fake = crate::reliability::real_time_fake();
    let companies: Vec<String> = (40..44).map(company).collect();
    let mut s = db.connect();
    s.migrate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pw = db.password_file.to_string_lossy().into_owned();
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let mut ports = std::collections::BTreeMap::new();
    let mut running = Vec::new();
    for name in ["a", "b"] {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listen = format!("127.0.0.1:{port}");
        let mut env = shared_env(&db, name, &pw);
        env.push(("JOBMIRROR_POLL_INTERVAL_SECS", "3600"));
        env.push(("JOBMIRROR_WEBHOOK_LISTEN", listen.as_str()));
        env.push(("JOBMIRROR_WEBHOOK_SECRET", secret));
        let (r, rx) = instance(dir.path(), name, &fake, &companies, &env);
        let mut seen = Vec::new();
        crate::cli::wait_for(&rx, "LISTEN jobmirror_webhook", &mut seen);
        running.push((r, rx));
        ports.insert(name, port);
    }
    // Both hold two companies; pick one b holds and post its webhook to a.
    let split = wait_count(
        &mut s,
        "SELECT count(*) FROM company_leases WHERE holder = 'b' AND expires_at > jm_now_ms()",
        2,
        Duration::from_secs(20),
    );
    assert_eq!(split, 2);
    let target: String = s
        .client()
        .query_one(
            "SELECT company_id FROM company_leases WHERE holder = 'b' ORDER BY company_id LIMIT 1",
            &[],
        )
        .unwrap()
        .get(0);
    let job = fake
        .add_job(JobSpec {
            id: Some("hook-1".into()),
            company_id: target.clone(),
            items: Some(1),
            ..JobSpec::default()
        })
        .unwrap();
    let body = format!(
        r#"{{"data":{{"id":"{job}","companyId":"{target}"}},"eventType":"v1.export-job.created","eventId":"evt-hook-1"}}"#
    );
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let secrets = jobmirror::edge::webhook::Secrets::parse(secret).unwrap();
    let sig = jobmirror::edge::webhook::sign_with(&secrets, "msg_hook_1", ts, body.as_bytes());
    let sent = std::time::Instant::now();
    let status = ureq::post(format!("http://127.0.0.1:{}/webhooks/pleo", ports["a"]))
        .header("webhook-id", "msg_hook_1")
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", sig)
        .send(body.as_bytes())
        .unwrap()
        .status()
        .as_u16();
    assert_eq!(status, 200);
    let started = fake.wait_for_requests(Duration::from_secs(10), |q| {
        q.iter().any(|r| {
            r.path == "/v3/export-job-events" && r.body.contains(&job) && r.body.contains("started")
        })
    });
    let took = sent.elapsed();
    assert!(started, "the holder did not claim {job} after a's delivery");
    eprintln!(
        "delivery to a, job claimed by b after {} ms",
        took.as_millis()
    );
    assert!(
        took < Duration::from_secs(5),
        "{took:?}: a poll, not the wake"
    );
    // b claimed it (a never holds b's company), and the delivery is marked handled.
    let claimed_by_b = s
        .client()
        .query_one(
            "SELECT count(*) FROM job_events e JOIN company_leases l ON l.company_id = e.company_id
              WHERE e.job_id = $1 AND e.kind = 'claim_sent' AND l.holder = 'b'",
            &[&job],
        )
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(claimed_by_b, 1);
    assert_eq!(fake.started_events_for(&job), 1);
    // A delivery naming a company no instance lists: nobody holds it, so the first live
    // instance by name marks it once two leases passed, instead of leaving it pending forever.
    let stranger = company(99);
    let job = fake
        .add_job(JobSpec {
            id: Some("hook-2".into()),
            company_id: stranger.clone(),
            items: Some(1),
            ..JobSpec::default()
        })
        .unwrap();
    let body = format!(
        r#"{{"data":{{"id":"{job}","companyId":"{stranger}"}},"eventType":"v1.export-job.created","eventId":"evt-hook-2"}}"#
    );
    let sig = jobmirror::edge::webhook::sign_with(&secrets, "msg_hook_2", ts, body.as_bytes());
    let status = ureq::post(format!("http://127.0.0.1:{}/webhooks/pleo", ports["b"]))
        .header("webhook-id", "msg_hook_2")
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", sig)
        .send(body.as_bytes())
        .unwrap()
        .status()
        .as_u16();
    assert_eq!(status, 200);
    let marked = wait_count(
        &mut s,
        "SELECT count(*) FROM webhook_deliveries WHERE webhook_id = 'msg_hook_2' \
           AND processed_at IS NOT NULL AND outcome LIKE '%served by no instance%'",
        1,
        Duration::from_secs(20),
    );
    assert_eq!(
        marked, 1,
        "the delivery for an unlisted company is still pending"
    );
    assert_eq!(fake.started_events_for(&job), 0);
}

/// `pleo_auth = "oauth"` on a shared database: the three instances use the one pair and refresh
/// it one at a time (the token endpoint rotates it at every refresh, so a second refresh with
/// the same token would be refused and end the pair).
#[test]
fn three_instances_share_one_oauth_pair_and_never_refresh_it_twice() {
    let Some(db) = database() else { return };
    let fake = crate::reliability::real_time_fake();
    // Access tokens live 4 s and are refreshed 2 s before expiry: every 2 s, while the
    // instances poll every second.
    fake.enable_oauth("cid", "csecret", "R0", 4);
    // The endpoint takes 300 ms to answer, as one across the internet may: long enough for
    // the others to need a token while one refresh is out.
    fake.on_token_request(Box::new(|_| {
        std::thread::sleep(Duration::from_millis(300));
        true
    }));
    let companies: Vec<String> = (0..6).map(company).collect();
    for (i, c) in companies.iter().enumerate() {
        fake.add_job(JobSpec {
            id: Some(format!("oauth-{i}")),
            company_id: c.clone(),
            created_secs_ago: Some(600),
            items: Some(3),
            ..JobSpec::default()
        })
        .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("refresh-token");
    std::fs::write(&file, "R0\n").unwrap();
    let (file, url) = (
        file.display().to_string(),
        format!("{}/oauth/token", fake.base_url()),
    );
    let pw = db.password_file.to_string_lossy().into_owned();
    let started = std::time::Instant::now();
    let mut running = Vec::new();
    for name in ["a", "b", "c"] {
        let mut env = shared_env(&db, name, &pw);
        env.extend([
            ("JOBMIRROR_PLEO_AUTH", "oauth"),
            ("JOBMIRROR_PLEO_OAUTH_TOKEN_URL", url.as_str()),
            ("JOBMIRROR_PLEO_OAUTH_CLIENT_ID", "cid"),
            ("JOBMIRROR_PLEO_OAUTH_CLIENT_SECRET", "csecret"),
            ("JOBMIRROR_PLEO_OAUTH_REFRESH_TOKEN_FILE", file.as_str()),
            ("JOBMIRROR_PLEO_OAUTH_REFRESH_MARGIN_SECS", "2"),
        ]);
        running.push(instance(dir.path(), name, &fake, &companies, &env));
    }
    assert!(
        finished(&fake, 6, Duration::from_secs(60)),
        "every job finished"
    );
    // Several lifetimes of the access token with all three polling.
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while fake.token_grants().len() < 6 && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
    for (mut r, _rx) in running {
        let child = r.0.take().unwrap();
        crate::cli::signal(&child, "TERM");
        let st = crate::cli::wait_exit(child, Duration::from_secs(20));
        assert!(st.success(), "{st:?}");
    }
    let elapsed = started.elapsed().as_secs();
    let grants = fake.token_grants();
    let refused: Vec<_> = grants.iter().filter(|g| !g.ok).collect();
    assert!(
        refused.is_empty(),
        "a refresh token was offered twice: {refused:?}"
    );
    assert!(grants.len() >= 6, "{} refreshes", grants.len());
    // Once per lifetime (2 s) for the three together, not once each.
    assert!(
        grants.len() as u64 <= elapsed / 2 + 3,
        "{} refreshes in {elapsed} s",
        grants.len()
    );
    for i in 0..6 {
        done_once(&fake, &format!("oauth-{i}"), Some(3));
    }
    // The stored pair is the live one: the endpoint takes its refresh token.
    let stored: String = db
        .connect()
        .client()
        .query_one(
            "SELECT refresh_token FROM oauth_tokens WHERE credential = 'default'",
            &[],
        )
        .unwrap()
        .get(0);
    let answer = ureq::post(&url)
        .config()
        .http_status_as_error(false)
        .build()
        .header("Content-Type", "application/x-www-form-urlencoded")
        .send(format!(
            "grant_type=refresh_token&refresh_token={stored}&client_id=cid&client_secret=csecret"
        ))
        .unwrap();
    assert_eq!(answer.status(), 200, "the stored refresh token is live");
}

/// Waits until both instances had two lease rounds and four listings went out since now: by
/// then a company either would have been claimed or is not served.
fn settled(fake: &FakePleo, s: &mut jobmirror::store::pg::PgStore) {
    let t0: i64 = s
        .client()
        .query_one("SELECT jm_now_ms()", &[])
        .unwrap()
        .get(0);
    let mark = fake.requests().len();
    let end = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let rounds: i64 = s
            .client()
            .query_one(
                "SELECT count(*) FROM instances WHERE stopped_at IS NULL AND heartbeat_at > $1",
                &[&(t0 + 1_000)],
            )
            .unwrap()
            .get(0);
        let listings = fake.requests()[mark..]
            .iter()
            .filter(|r| r.path == "/v3/export-jobs")
            .count();
        if rounds >= 2 && listings >= 4 {
            return;
        }
        assert!(std::time::Instant::now() < end, "the instances went quiet");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Companies changed live on a shared database (`jobmirror companies` writes the one shared
/// table): a company added is taken by one instance and its job done once; a paused one gets
/// no claim until resumed; a removed one is given up by its holder. Two lanes each.
#[test]
fn companies_changed_live_reach_every_instance_and_each_is_served_by_one() {
    let Some(db) = database() else { return };
    let fake = crate::reliability::real_time_fake();
    let companies: Vec<String> = (50..54).map(company).collect();
    let dir = tempfile::tempdir().unwrap();
    let pw = db.password_file.to_string_lossy().into_owned();
    let mut s = db.connect();
    s.migrate().unwrap();
    let mut running = Vec::new();
    for name in ["a", "b"] {
        let mut env = shared_env(&db, name, &pw);
        env.push(("JOBMIRROR_LANES", "2"));
        running.push(instance(dir.path(), name, &fake, &companies, &env));
    }
    let held = |s: &mut jobmirror::store::pg::PgStore, c: &str| -> Option<String> {
        s.client()
            .query_opt(
                "SELECT holder FROM company_leases WHERE company_id = $1 AND holder IS NOT NULL \
                 AND expires_at > jm_now_ms()",
                &[&c],
            )
            .unwrap()
            .map(|r| r.get(0))
    };
    let companies_cmd = |args: &[&str]| {
        let out = crate::cli::cmd()
            .arg("companies")
            .args(args)
            // The instances' configuration: their company_ids and database.
            .env("JOBMIRROR_COMPANY_IDS", companies.join(","))
            .env("JOBMIRROR_DB", &db.url)
            .env("JOBMIRROR_DB_PASSWORD_FILE", &db.password_file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "companies {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let until = |what: &str, cond: &mut dyn FnMut() -> bool| {
        let end = std::time::Instant::now() + Duration::from_secs(30);
        while !cond() {
            assert!(std::time::Instant::now() < end, "{what} within 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // Added: one instance takes it, and its job is done once.
    let added = company(59);
    fake.add_job(JobSpec {
        id: Some("live-added".into()),
        company_id: added.clone(),
        items: Some(2),
        ..JobSpec::default()
    })
    .unwrap();
    companies_cmd(&["add", &added]);
    assert!(
        finished(&fake, 1, Duration::from_secs(30)),
        "the added company's job"
    );
    done_once(&fake, "live-added", Some(2));
    fenced_in_order(&mut s, "live-added");
    assert!(held(&mut s, &added).is_some());
    // Paused: its holder gives it up, and a new job gets no claim until it is resumed.
    let paused = companies[0].clone();
    companies_cmd(&["pause", &paused]);
    until("the paused company given up", &mut || {
        held(&mut s, &paused).is_none()
    });
    fake.add_job(JobSpec {
        id: Some("live-paused".into()),
        company_id: paused.clone(),
        items: Some(1),
        ..JobSpec::default()
    })
    .unwrap();
    settled(&fake, &mut s);
    assert_eq!(
        fake.started_events_for("live-paused"),
        0,
        "claimed while paused"
    );
    companies_cmd(&["resume", &paused]);
    assert!(
        finished(&fake, 2, Duration::from_secs(30)),
        "the resumed company's job"
    );
    done_once(&fake, "live-paused", Some(1));
    fenced_in_order(&mut s, "live-paused");
    // Removed: given up, and never served again.
    companies_cmd(&["remove", &added]);
    until("the removed company given up", &mut || {
        held(&mut s, &added).is_none()
    });
    fake.add_job(JobSpec {
        id: Some("live-removed".into()),
        company_id: added.clone(),
        items: Some(1),
        ..JobSpec::default()
    })
    .unwrap();
    settled(&fake, &mut s);
    assert_eq!(
        fake.started_events_for("live-removed"),
        0,
        "claimed after removal"
    );
    // Throughout, each company had one holder at a time: every lease change is journaled.
    let overlaps: i64 = s
        .client()
        .query_one(
            "SELECT count(*) FROM (SELECT company_id, count(*) FROM company_leases \
             WHERE holder IS NOT NULL AND expires_at > jm_now_ms() GROUP BY company_id \
             HAVING count(*) > 1) o",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(overlaps, 0);
    drop(running);
}

/// `list_by_credential` on a shared database: each instance's one listing names every company
/// of the key, and it acts only on the jobs of the companies it holds (the others' are
/// ignored): every job done once, under the fence of its company's holder.
#[test]
fn instances_listing_by_credential_act_only_on_the_companies_they_hold() {
    let Some(db) = database() else { return };
    let fake = crate::reliability::real_time_fake();
    let companies: Vec<String> = (60..68).map(company).collect();
    for (i, c) in companies.iter().enumerate() {
        for j in 0..2 {
            fake.add_job(JobSpec {
                id: Some(format!("cred-{i}-{j}")),
                company_id: c.clone(),
                created_secs_ago: Some(600 - j),
                items: Some(2),
                ..JobSpec::default()
            })
            .unwrap();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let pw = db.password_file.to_string_lossy().into_owned();
    let mut running = Vec::new();
    for name in ["a", "b"] {
        let mut env = shared_env(&db, name, &pw);
        env.push(("JOBMIRROR_LIST_BY_CREDENTIAL", "true"));
        running.push(instance(dir.path(), name, &fake, &companies, &env));
    }
    assert!(
        finished(&fake, 16, Duration::from_secs(60)),
        "every job finished"
    );
    let mut s = db.connect();
    for i in 0..8 {
        for j in 0..2 {
            let id = format!("cred-{i}-{j}");
            done_once(&fake, &id, Some(2));
            fenced_in_order(&mut s, &id);
        }
    }
    // One listing names no company: the instances listed by credential.
    let by_credential = fake
        .requests()
        .iter()
        .filter(|r| r.path == "/v3/export-jobs" && !r.query.contains("company_id"))
        .count();
    assert!(by_credential > 0, "no listing by credential");
    drop(running);
}

/// Companies with OAuth pairs of their own (`companies add --oauth-refresh-token-file`) on a
/// shared database, two instances, a token endpoint that takes 300 ms: every refresh is
/// accepted (never a refresh token offered twice), every job done once, and each company's
/// stored refresh token is the live one.
#[test]
fn company_oauth_pairs_on_a_shared_database_are_refreshed_once_each_time() {
    let Some(db) = database() else { return };
    let fake = crate::reliability::real_time_fake();
    fake.enable_oauth("cid", "csecret", "default-pair-unused", 4);
    fake.on_token_request(Box::new(|_| {
        std::thread::sleep(Duration::from_millis(300));
        true
    }));
    let listed = vec![company(70)];
    let own: Vec<String> = (71..75).map(company).collect();
    let dir = tempfile::tempdir().unwrap();
    let pw = db.password_file.to_string_lossy().into_owned();
    let url = format!("{}/oauth/token", fake.base_url());
    // The listed company uses the default credential's pair, shared by both instances too.
    let default_file = dir.path().join("default-refresh");
    std::fs::write(&default_file, "default-pair-unused\n").unwrap();
    let default_file = default_file.display().to_string();
    let oauth = [
        ("JOBMIRROR_PLEO_AUTH", "oauth"),
        (
            "JOBMIRROR_PLEO_OAUTH_REFRESH_TOKEN_FILE",
            default_file.as_str(),
        ),
        ("JOBMIRROR_PLEO_OAUTH_TOKEN_URL", url.as_str()),
        ("JOBMIRROR_PLEO_OAUTH_CLIENT_ID", "cid"),
        ("JOBMIRROR_PLEO_OAUTH_CLIENT_SECRET", "csecret"),
        ("JOBMIRROR_PLEO_OAUTH_REFRESH_MARGIN_SECS", "2"),
    ];
    db.connect().migrate().unwrap();
    for (i, c) in own.iter().enumerate() {
        let token = fake.authorize_company(c).unwrap();
        let file = dir.path().join(format!("refresh-{i}"));
        std::fs::write(&file, format!("{token}\n")).unwrap();
        let out = crate::cli::cmd()
            .args(["companies", "add", c, "--oauth-refresh-token-file"])
            .arg(&file)
            .env("JOBMIRROR_COMPANY_IDS", listed.join(","))
            .env("JOBMIRROR_DB", &db.url)
            .env("JOBMIRROR_DB_PASSWORD_FILE", &db.password_file)
            .envs(oauth)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for j in 0..2 {
            fake.add_job(JobSpec {
                id: Some(format!("own-{i}-{j}")),
                company_id: c.clone(),
                created_secs_ago: Some(600 - j),
                items: Some(2),
                ..JobSpec::default()
            })
            .unwrap();
        }
    }
    let mut running = Vec::new();
    for name in ["a", "b"] {
        let mut env = shared_env(&db, name, &pw);
        env.extend(oauth);
        running.push(instance(dir.path(), name, &fake, &listed, &env));
    }
    assert!(
        finished(&fake, 8, Duration::from_secs(60)),
        "every job finished"
    );
    // Three lifetimes of every company's access token (one refresh each 2 s).
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while fake.token_grants().len() < 4 * 4 && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
    for (mut r, _rx) in running {
        let child = r.0.take().unwrap();
        crate::cli::signal(&child, "TERM");
        let st = crate::cli::wait_exit(child, Duration::from_secs(20));
        assert!(st.success(), "{st:?}");
    }
    let grants = fake.token_grants();
    assert!(grants.len() >= 16, "{} refreshes", grants.len());
    let refused: Vec<_> = grants.iter().filter(|g| !g.ok).collect();
    assert!(
        refused.is_empty(),
        "a refresh token was offered twice: {refused:?}"
    );
    let mut s = db.connect();
    for i in 0..4 {
        for j in 0..2 {
            let id = format!("own-{i}-{j}");
            done_once(&fake, &id, Some(2));
            fenced_in_order(&mut s, &id);
        }
    }
    for c in &own {
        let stored: String = s
            .client()
            .query_one(
                "SELECT refresh_token FROM oauth_tokens WHERE credential = $1",
                &[&format!("company:{c}")],
            )
            .unwrap()
            .get(0);
        assert_eq!(
            Some(stored),
            fake.company_refresh_token(c),
            "{c}: the stored pair is the live one"
        );
    }
}
