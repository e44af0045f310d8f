//! Reliability under faults and hostile input (RELIABILITY.md lists each test, what it
//! injects, how many times, and what it checks). `JOBMIRROR_RELIABILITY_SCALE` multiplies
//! the counts for longer runs.

use jobmirror::replay::{Replay, ReplayOptions};
use jobmirror::snapshot::Snapshot;
use serde_json::json;

fn scale() -> usize {
    std::env::var("JOBMIRROR_RELIABILITY_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

#[test]
fn fault_soak_a_thousand_jobs_all_finish_with_bounded_calls() {
    // 1,000 jobs over 20 companies, created through 4 hours, against an API answering 10%
    // 500s, 5% 429s with Retry-After, 2% lost answers (timeouts) and 1% cut-off bodies.
    let jobs_n = 1000 * scale();
    let companies: Vec<String> = (0..20).map(|i| format!("soak-{i:02}")).collect();
    let timeline: Vec<serde_json::Value> = (0..jobs_n)
        .map(|i| {
            json!({"at": (i as f64) * 14.4, "event": "job_created",
                   "job": {"id": format!("s{i:05}"), "companyId": companies[i % 20], "items": 1 + i % 7}})
        })
        .collect();
    let mut tl = vec![json!({"at": 0, "event": "faults", "rates": {
        "server_error": 0.10, "too_many_requests": 0.05, "retry_after_secs": 3,
        "hang_up": 0.02, "truncate": 0.01, "slow": 0, "slow_millis": 0}})];
    tl.extend(timeline);
    let snap = Snapshot::parse(
        &json!({
            "version": 2, "description": "fault soak", "start": "2026-11-24T08:00:00Z",
            "endSecs": jobs_n as f64 * 14.4 + 3600.0, "seed": 11,
            "companies": companies, "service": {"poll_interval_secs": 300},
            "timeline": tl,
        })
        .to_string(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut r = Replay::new(snap, ReplayOptions::new(dir.path().join("soak.db"))).unwrap();
    let s = r.run(&mut |_| Ok(())).unwrap();
    assert!(s.violations.is_empty(), "{}", s.render());
    let done: u64 = s
        .jobs_by_pleo_status
        .iter()
        .filter(|(k, _)| k.starts_with("completed"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(done as usize, jobs_n, "{}", s.render());
    assert_eq!(s.claims as usize, jobs_n);
    // Faults were felt.
    assert!(
        s.api_faults as f64 > 0.1 * s.api_calls_total as f64,
        "{}",
        s.render()
    );
    // Calls per job, polls excluded: verify, claim, read back, items (2 lists), a report,
    // the final event and its read back is 8; retries of refused calls come on top.
    let per_job: u64 = s
        .api_calls
        .iter()
        .filter(|(k, _)| {
            !k.starts_with("GET /v3/export-jobs ") && k.as_str() != "GET /v3/export-jobs"
        })
        .map(|(_, v)| v)
        .sum();
    let per_job = per_job as f64 / jobs_n as f64;
    assert!(
        per_job <= 12.0,
        "{per_job:.1} calls per job\n{}",
        s.render()
    );
    eprintln!(
        "fault soak: {jobs_n} jobs, {} API calls ({} faulted), {per_job:.2} calls per job besides listings",
        s.api_calls_total, s.api_faults
    );
}

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use jobmirror::clock::{SharedClock, SystemClock};
use jobmirror::fake::{FakeConfig, FakePleo, JobSpec};

use crate::cli::{Reaper, cmd, lines, signal, wait_exit};

/// `jobmirror run` on its own database against `fake`, for `companies`, with its log lines.
fn instance(
    dir: &std::path::Path,
    name: &str,
    fake: &FakePleo,
    companies: &[String],
    extra: &[(&str, &str)],
) -> (Reaper, crossbeam_channel::Receiver<String>) {
    let mut c = cmd();
    c.arg("run")
        .env("JOBMIRROR_DB", dir.join(format!("{name}.db")))
        .env("JOBMIRROR_PLEO_BASE_URL", fake.base_url())
        .env("JOBMIRROR_PLEO_API_KEY", fake.api_key())
        .env("JOBMIRROR_COMPANY_IDS", companies.join(","))
        .env("JOBMIRROR_HANDLER_COMMAND", "dry-run")
        .env("JOBMIRROR_ADMIN_LISTEN", "127.0.0.1:0")
        .env("JOBMIRROR_POLL_INTERVAL_SECS", "1")
        .env("JOBMIRROR_CONFLICT_BACKOFF_SECS", "1")
        .env("JOBMIRROR_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in extra {
        c.env(k, v);
    }
    let mut child = c.spawn().unwrap();
    let rx = lines(child.stderr.take().unwrap());
    (Reaper(Some(child)), rx)
}

fn completions(fake: &FakePleo) -> usize {
    fake.requests()
        .iter()
        .filter(|q| {
            q.path == "/v3/export-job-events"
                && q.status == 202
                && (q.body.contains("\"completed\"")
                    || q.body.contains("\"completed_with_errors\""))
        })
        .count()
}

#[test]
fn two_instances_on_the_same_companies_process_every_job_exactly_once() {
    let clock: SharedClock = Arc::new(SystemClock);
    let fake = FakePleo::start("127.0.0.1:0", FakeConfig::default(), clock).unwrap();
    let companies: Vec<String> = (0..4).map(|i| format!("two-{i}")).collect();
    let n = 40 * scale();
    for i in 0..n {
        fake.add_job(JobSpec {
            id: Some(format!("t{i:03}")),
            company_id: companies[i % 4].clone(),
            created_secs_ago: Some(600 - i as i64),
            items: Some(3),
            ..JobSpec::default()
        })
        .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let (a, rx_a) = instance(dir.path(), "a", &fake, &companies, &[]);
    let (b, rx_b) = instance(dir.path(), "b", &fake, &companies, &[]);
    let all_done = fake.wait_for_requests(Duration::from_secs(60), |r| {
        r.iter()
            .filter(|q| {
                q.path == "/v3/export-job-events"
                    && q.status == 202
                    && q.body.contains("\"completed\"")
            })
            .count()
            >= n
    });
    for r in [a, b] {
        let child = { r }.0.take().unwrap();
        signal(&child, "TERM");
        assert!(wait_exit(child, Duration::from_secs(20)).success());
    }
    assert!(all_done, "{} of {n} jobs completed", completions(&fake));
    // Exactly one accepted claim per job; the others were 422s.
    let claims = fake.claims();
    for i in 0..n {
        let id = format!("t{i:03}");
        let accepted = claims
            .iter()
            .filter(|c| c.job_id == id && c.accepted)
            .count();
        assert_eq!(accepted, 1, "job {id}");
        let mut per_item = std::collections::HashMap::new();
        for (entry, status) in fake.item_updates(&id) {
            assert_eq!(status, "successful");
            *per_item.entry(entry).or_insert(0) += 1;
        }
        assert!(per_item.values().all(|c| *c == 1), "job {id}: {per_item:?}");
    }
    assert_eq!(completions(&fake), n, "each job completed once");
    let conflicts = claims.iter().filter(|c| !c.accepted).count();
    // Conflicts are quiet: journaled and logged at info, never as errors.
    let mut logs: Vec<String> = rx_a.try_iter().collect();
    logs.extend(rx_b.try_iter());
    assert!(
        !logs.iter().any(|l| l.contains("[ERROR]")),
        "{}",
        logs.iter()
            .filter(|l| l.contains("[ERROR]"))
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    let took = |db: &str| -> i64 {
        let st = jobmirror::store::Store::open_read_only(&dir.path().join(db)).unwrap();
        st.conn()
            .query_row(
                "SELECT count(*) FROM job_events WHERE kind = 'claimed'",
                [],
                |r| r.get(0),
            )
            .unwrap()
    };
    let (ta, tb) = (took("a.db"), took("b.db"));
    assert_eq!(
        (ta + tb) as usize,
        n,
        "every job claimed by exactly one instance"
    );
    eprintln!("two instances: {n} jobs, a took {ta}, b took {tb}, {conflicts} 422s");
}

/// A small seeded generator for kill moments.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

fn kill9(r: &mut Reaper) {
    if let Some(mut c) = r.0.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Every 5th cycle stops with SIGTERM instead, which must end the process within the bound.
fn stop(r: &mut Reaper, cycle: usize, log: &crossbeam_channel::Receiver<String>) -> &'static str {
    if cycle % 5 == 4 {
        let child = r.0.take().unwrap();
        signal(&child, "TERM");
        let status = wait_exit(child, Duration::from_secs(15));
        if !status.success() {
            std::thread::sleep(Duration::from_millis(100));
            let tail: Vec<String> = log.try_iter().collect();
            panic!(
                "SIGTERM in cycle {cycle}: {status:?}\n{}",
                tail[tail.len().saturating_sub(15)..].join("\n")
            );
        }
        "term"
    } else {
        kill9(r);
        "kill"
    }
}

const HOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[test]
fn kill_9_during_webhook_load_loses_no_acknowledged_delivery() {
    let clock: SharedClock = Arc::new(SystemClock);
    let fake = FakePleo::start("127.0.0.1:0", FakeConfig::default(), clock).unwrap();
    let companies = vec!["hook-co".to_owned()];
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let extra = [
        ("JOBMIRROR_WEBHOOK_LISTEN", listen.as_str()),
        ("JOBMIRROR_WEBHOOK_SECRET", HOOK_SECRET),
        ("JOBMIRROR_POLL_INTERVAL_SECS", "3600"),
    ];
    // Four senders post unique deliveries all the time; they keep the ids that got a 2xx.
    let stop_senders = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let senders: Vec<_> = (0..4)
        .map(|s| {
            let stop_senders = stop_senders.clone();
            std::thread::spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(5)))
                    .build()
                    .into();
                let secrets = jobmirror::webhook::Secrets::parse(HOOK_SECRET).unwrap();
                let mut acked = Vec::new();
                let mut i = 0u64;
                while !stop_senders.load(std::sync::atomic::Ordering::Relaxed) {
                    i += 1;
                    let id = format!("msg_k{s}_{i}");
                    let body = format!(r#"{{"data":{{"id":"none-{s}-{i}","companyId":"hook-co"}},"eventType":"v1.export-job.created","eventId":"e{i}"}}"#);
                    let ts = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_secs() as i64;
                    let sig = jobmirror::webhook::sign_with(&secrets, &id, ts, body.as_bytes());
                    let r = agent
                        .post(format!("http://127.0.0.1:{port}/webhooks/pleo"))
                        .header("webhook-id", &id)
                        .header("webhook-timestamp", &ts.to_string())
                        .header("webhook-signature", &sig)
                        .header("content-type", "application/json")
                        .send(body.as_bytes());
                    match r {
                        Ok(resp) if resp.status().as_u16() == 200 => acked.push(id),
                        Ok(_) => {}
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
                acked
            })
        })
        .collect();
    let mut rng = Rng(0x5eed_0001);
    let kills = 20 * scale();
    let mut kinds = Vec::new();
    for cycle in 0..kills {
        let (mut r, rx) = instance(dir.path(), "hooks", &fake, &companies, &extra);
        let mut seen = Vec::new();
        crate::cli::wait_for(&rx, "webhook receiver listening", &mut seen);
        std::thread::sleep(Duration::from_millis(rng.range(5, 120)));
        kinds.push(stop(&mut r, cycle, &rx));
    }
    stop_senders.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked: Vec<String> = senders
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let st = jobmirror::store::Store::open_read_only(&dir.path().join("hooks.db")).unwrap();
    let mut missing = Vec::new();
    for id in &acked {
        let n: i64 = st
            .conn()
            .query_row(
                "SELECT count(*) FROM webhook_deliveries WHERE webhook_id = ?1",
                [id],
                |r| r.get(0),
            )
            .unwrap();
        if n != 1 {
            missing.push(id.clone());
        }
    }
    assert!(
        acked.len() > 100,
        "the load ran: {} acknowledged",
        acked.len()
    );
    assert!(
        missing.is_empty(),
        "acknowledged but not stored: {missing:?}"
    );
    assert_eq!(st.quick_check().unwrap(), ["ok"]);
    eprintln!(
        "kill -9 during webhook load: {} stops ({} SIGKILL, {} SIGTERM), {} deliveries acknowledged, all stored",
        kinds.len(),
        kinds.iter().filter(|k| **k == "kill").count(),
        kinds.iter().filter(|k| **k == "term").count(),
        acked.len()
    );
}

#[test]
fn kill_9_during_thousand_item_jobs_each_item_reported_once_and_started_once() {
    let clock: SharedClock = Arc::new(SystemClock);
    let fake = FakePleo::start("127.0.0.1:0", FakeConfig::default(), clock).unwrap();
    let companies: Vec<String> = vec!["items-co".into()];
    let jobs = 6;
    for i in 0..jobs {
        fake.add_job(JobSpec {
            id: Some(format!("big{i}")),
            company_id: companies[0].clone(),
            created_secs_ago: Some(600 - i as i64),
            items: Some(1000),
            items_without_account: 7,
            ..JobSpec::default()
        })
        .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x5eed_0002);
    let kills = 20 * scale();
    for cycle in 0..kills {
        let (mut r, rx) = instance(dir.path(), "items", &fake, &companies, &[]);
        let mut seen = Vec::new();
        crate::cli::wait_for(&rx, "jobmirror started", &mut seen);
        std::thread::sleep(Duration::from_millis(rng.range(5, 150)));
        stop(&mut r, cycle, &rx);
    }
    // A last life to finish whatever is left.
    let (r, _rx) = instance(dir.path(), "items", &fake, &companies, &[]);
    let done = fake.wait_for_requests(Duration::from_secs(60), |q| {
        q.iter()
            .filter(|x| {
                x.path == "/v3/export-job-events"
                    && x.status == 202
                    && x.body.contains("completed_with_errors")
            })
            .count()
            >= jobs
    });
    drop(r);
    assert!(done, "{} of {jobs} jobs completed", completions(&fake));
    for i in 0..jobs {
        let id = format!("big{i}");
        assert_eq!(fake.started_events_for(&id), 1, "{id}: one started");
        let mut per_item = std::collections::HashMap::new();
        for (entry, status) in fake.item_updates(&id) {
            *per_item.entry((entry, status)).or_insert(0) += 1;
        }
        let ok = per_item.keys().filter(|(_, s)| s == "successful").count();
        let failed = per_item.keys().filter(|(_, s)| s == "failed").count();
        assert_eq!((ok, failed), (993, 7), "{id}");
        assert!(
            per_item.values().all(|n| *n == 1),
            "{id}: an item reported twice"
        );
    }
    eprintln!("kill -9 during 1,000-item jobs: {kills} stops, {jobs} jobs, each item once");
}

#[test]
fn sigterm_with_a_backlog_of_webhook_named_jobs_overran_the_stop_bound() {
    // Found by the kill test: with thousands of stored deliveries still to read (at 20
    // requests a second), the sync thread did not look at the stop until it had read them
    // all, and the service was abandoned after shutdown_timeout_secs (exit 1).
    let clock: SharedClock = Arc::new(SystemClock);
    let fake = FakePleo::start("127.0.0.1:0", FakeConfig::default(), clock).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let st = jobmirror::store::Store::open(&dir.path().join("backlog.db")).unwrap();
    let ds: Vec<jobmirror::webhook::Delivery> = (0..2000)
        .map(|i| jobmirror::webhook::Delivery {
            webhook_id: format!("msg_b{i}"),
            signed_at: jobmirror::clock::Millis(0),
            event_type: Some("v1.export-job.created".into()),
            event_id: None,
            job_id: Some(format!("gone-{i}")),
            company_id: Some("backlog-co".into()),
            body: "{}".into(),
            headers: serde_json::json!({}),
        })
        .collect();
    st.insert_deliveries(&ds.iter().collect::<Vec<_>>(), jobmirror::clock::Millis(0))
        .unwrap();
    drop(st);
    let (mut r, rx) = instance(
        dir.path(),
        "backlog",
        &fake,
        &["backlog-co".to_owned()],
        &[("JOBMIRROR_SHUTDOWN_TIMEOUT_SECS", "3")],
    );
    let mut seen = Vec::new();
    crate::cli::wait_for(&rx, "jobmirror started", &mut seen);
    let child = r.0.take().unwrap();
    let t = std::time::Instant::now();
    signal(&child, "TERM");
    let status = wait_exit(child, Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "stopped in {:?}",
        t.elapsed()
    );
    // What was not read stays for the next start.
    let st = jobmirror::store::Store::open_read_only(&dir.path().join("backlog.db")).unwrap();
    assert!(st.delivery_backlog().unwrap().unprocessed > 0);
}
