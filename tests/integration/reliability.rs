//! Reliability under faults and hostile input (RELIABILITY.md lists each test, what it
//! injects, how many times, and what it checks). `JOBMIRROR_RELIABILITY_SCALE` multiplies
//! the counts for longer runs.

use jobmirror::replay::snapshot::Snapshot;
use jobmirror::replay::{Replay, ReplayOptions};
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
    let companies: Vec<String> = (0..20)
        .map(|i| format!("50a50a00-0000-4000-8000-{i:012}"))
        .collect();
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
use jobmirror::sandbox::{FakeConfig, FakePleo, JobSpec};

use crate::cli::{Reaper, cmd, lines, signal, wait_exit};

/// A fake Pleo on the real clock (the binaries under test run on it too).
pub(crate) fn real_time_fake() -> FakePleo {
    let clock: SharedClock = Arc::new(SystemClock);
    FakePleo::start("127.0.0.1:0", FakeConfig::default(), clock).unwrap()
}

/// A loopback port nobody listens on now.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `jobmirror run` on its own database against `fake`, for `companies`, with its log lines.
pub(crate) fn instance(
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
    let fake = real_time_fake();
    let companies: Vec<String> = (0..4)
        .map(|i| format!("20202020-0000-4000-8000-{i:012}"))
        .collect();
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
    // As README says for instances that may hold each other's jobs: an `in_progress` job a
    // recovery pass finds is left to its holder (the other instance), never resumed.
    let leave = [("JOBMIRROR_RESUME_UNKNOWN_IN_PROGRESS", "false")];
    let (a, rx_a) = instance(dir.path(), "a", &fake, &companies, &leave);
    let (b, rx_b) = instance(dir.path(), "b", &fake, &companies, &leave);
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
    // Both processes have exited: their logs end, so these read to the end.
    let mut logs: Vec<String> = rx_a.iter().collect();
    logs.extend(rx_b.iter());
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
            // The process has exited: its log ends, so this reads to the end.
            let tail: Vec<String> = log.iter().collect();
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
    let fake = real_time_fake();
    let companies = vec!["400c0000-0000-4000-8000-000000000001".to_owned()];
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
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
                let secrets = jobmirror::edge::webhook::Secrets::parse(HOOK_SECRET).unwrap();
                let mut acked = Vec::new();
                let mut i = 0u64;
                while !stop_senders.load(std::sync::atomic::Ordering::Relaxed) {
                    i += 1;
                    let id = format!("msg_k{s}_{i}");
                    let body = format!(r#"{{"data":{{"id":"none-{s}-{i}","companyId":"400c0000-0000-4000-8000-000000000001"}},"eventType":"v1.export-job.created","eventId":"e{i}"}}"#);
                    let ts = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_secs() as i64;
                    let sig = jobmirror::edge::webhook::sign_with(&secrets, &id, ts, body.as_bytes());
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
    let fake = real_time_fake();
    let companies: Vec<String> = vec!["17e50000-0000-4000-8000-000000000001".into()];
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
    let fake = real_time_fake();
    let dir = tempfile::tempdir().unwrap();
    let st = jobmirror::store::Store::open(&dir.path().join("backlog.db")).unwrap();
    let ds: Vec<jobmirror::edge::webhook::Delivery> = (0..2000)
        .map(|i| jobmirror::edge::webhook::Delivery {
            webhook_id: format!("msg_b{i}"),
            signed_at: jobmirror::clock::Millis(0),
            event_type: Some("v1.export-job.created".into()),
            event_id: None,
            job_id: Some(format!("gone-{i}")),
            company_id: Some("bac10900-0000-4000-8000-000000000001".into()),
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
        &["bac10900-0000-4000-8000-000000000001".to_owned()],
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

/// Sends raw bytes on a fresh connection; returns the status code (None: closed without one).
fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(15))).ok()?;
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let line = String::from_utf8_lossy(&out);
    line.get(9..12)?.parse().ok()
}

#[test]
fn hostile_requests_get_the_right_status_and_never_break_the_listener() {
    // Thousands of seeded cases over real HTTP: mutated heads, headers, bodies and
    // signatures, invalid UTF-8, huge numbers, 10,000-deep JSON. No panic (a panic would be a
    // 500), no hang (each answer within 15 s), only the statuses the contract allows, and
    // after every 250 cases a genuine delivery is still stored.
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let r = crate::webhook::start(
        SECRET,
        &[("JOBMIRROR_WEBHOOK_BODY_BYTES_MAX", "65536".into())],
    );
    let secrets = jobmirror::edge::webhook::Secrets::parse(SECRET).unwrap();
    let now = r.w.clock_now().0 / 1000;
    let mut rng = Rng(0x5eed_0004);
    let cases = 3000 * scale();
    let deep = "[".repeat(10_000) + &"]".repeat(10_000);
    let mut seen = std::collections::BTreeMap::new();
    for case in 0..cases {
        let id = format!("msg_h{case}");
        let mut body: Vec<u8> = match rng.range(0, 7) {
            0 => br#"{"data":{"id":"j","companyId":"c"},"eventType":"v1.export-job.created"}"#
                .to_vec(),
            1 => deep.clone().into_bytes(),
            2 => format!(
                r#"{{"data":{{"id":1e99999999,"companyId":{}}},"eventType":"x"}}"#,
                "9".repeat(5000)
            )
            .into_bytes(),
            3 => vec![0xff, 0xfe, b'{', 0xc3, 0x28, b'}'],
            4 => (0..rng.range(0, 3000)).map(|_| rng.next() as u8).collect(),
            5 => br#"[1,2,3]"#.to_vec(),
            6 => format!(
                r#"{{"data":{{"id":"{}"}},"eventType":"v1.export-job.created"}}"#,
                "\\ud800".repeat(50)
            )
            .into_bytes(),
            _ => Vec::new(),
        };
        let ts = match rng.range(0, 5) {
            0 => (now - 301).to_string(),
            1 => "not-a-number".into(),
            2 => "99999999999999999999999".into(),
            _ => now.to_string(),
        };
        let mut sig =
            jobmirror::edge::webhook::sign_with(&secrets, &id, ts.parse().unwrap_or(0), &body);
        match rng.range(0, 6) {
            0 => sig = "v1,".into(),
            1 => sig = format!("v1a,{}", &sig[3..]),
            2 => sig = "v1,!!!not base64!!!".into(),
            3 => sig = " ".repeat(rng.range(0, 300) as usize),
            _ => {}
        }
        let path = if rng.range(0, 9) == 0 {
            "/other"
        } else {
            "/webhooks/pleo"
        };
        let method = if rng.range(0, 9) == 0 { "GET" } else { "POST" };
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: x\r\n").into_bytes();
        let flood = rng.range(0, 9) == 0;
        if flood {
            for i in 0..2000 {
                head.extend(format!("X-Flood-{i}: {}\r\n", "a".repeat(20)).into_bytes());
            }
        }
        if rng.range(0, 9) == 0 {
            head.extend(b"X-Bad: \xff\xfe\xfd\r\n");
        }
        head.extend(
            format!("webhook-id: {id}\r\nwebhook-timestamp: {ts}\r\nwebhook-signature: {sig}\r\n")
                .into_bytes(),
        );
        let declared = match rng.range(0, 9) {
            0 => "18446744073709551616".to_owned(),
            1 => "-5".to_owned(),
            2 => (body.len() + 10).to_string(),
            _ => body.len().to_string(),
        };
        if rng.range(0, 19) == 0 {
            head.extend(b"Transfer-Encoding: chunked\r\n");
        }
        head.extend(
            format!("Content-Length: {declared}\r\nConnection: close\r\n\r\n").into_bytes(),
        );
        let full = body.len();
        if rng.range(0, 9) == 0 {
            body.truncate(body.len() / 2);
        }
        // The client stopped before the body it announced: closing without an answer is fine.
        let incomplete = declared.parse::<usize>().is_ok_and(|d| d > body.len())
            && body.len() < full
            || declared.parse::<usize>().is_ok_and(|d| d > full);
        head.extend(&body);
        let status = raw(r.addr, &head);
        assert!(
            status.is_some() || incomplete,
            "case {case}: closed without an answer: {:?}",
            String::from_utf8_lossy(&head[..head.len().min(400)])
        );
        *seen.entry(status).or_insert(0) += 1;
        assert!(
            matches!(
                status,
                Some(200 | 400 | 401 | 404 | 405 | 408 | 411 | 413 | 431 | 501 | 503) | None
            ),
            "case {case}: status {status:?}"
        );
        assert_ne!(status, Some(500), "case {case}: the handler panicked");
        if case % 250 == 249 {
            let body = format!(
                r#"{{"data":{{"id":"ok-{case}","companyId":"c"}},"eventType":"v1.export-job.created"}}"#
            );
            let id = format!("msg_ok_{case}");
            let h = crate::webhook::signed(SECRET, &id, now, body.as_bytes());
            assert_eq!(
                crate::webhook::post(r.addr, "/webhooks/pleo", &h, body.as_bytes()).0,
                200,
                "after case {case}"
            );
        }
    }
    let stored: i64 =
        r.w.store()
            .conn()
            .query_row(
                "SELECT count(*) FROM webhook_deliveries WHERE webhook_id LIKE 'msg_ok_%'",
                [],
                |x| x.get(0),
            )
            .unwrap();
    assert_eq!(stored as usize, cases / 250);
    assert!(
        seen.get(&Some(200)).copied().unwrap_or(0) > 0,
        "some hostile-looking cases were valid: {seen:?}"
    );
    eprintln!("hostile input: {cases} cases, statuses {seen:?}");
}

#[test]
fn trace_logs_never_show_a_secret_and_state_files_are_private() {
    let fake = real_time_fake();
    fake.enable_oauth("cid", "client-secret-value-7", "R0-refresh-secret", 3600);
    fake.add_job(JobSpec {
        id: Some("sec-1".into()),
        company_id: "5ec00000-0000-4000-8000-000000000001".into(),
        created_secs_ago: Some(30),
        items: Some(2),
        ..JobSpec::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rt = dir.path().join("refresh");
    std::fs::write(&rt, "R0-refresh-secret\n").unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let token_url = format!("{}/oauth/token", fake.base_url());
    let (mut r, rx) = instance(
        dir.path(),
        "secrets",
        &fake,
        &["5ec00000-0000-4000-8000-000000000001".to_owned()],
        &[
            ("JOBMIRROR_LOG", "trace"),
            ("JOBMIRROR_PLEO_AUTH", "oauth"),
            ("JOBMIRROR_PLEO_OAUTH_TOKEN_URL", &token_url),
            ("JOBMIRROR_PLEO_OAUTH_CLIENT_ID", "cid"),
            (
                "JOBMIRROR_PLEO_OAUTH_CLIENT_SECRET",
                "client-secret-value-7",
            ),
            (
                "JOBMIRROR_PLEO_OAUTH_REFRESH_TOKEN_FILE",
                rt.to_str().unwrap(),
            ),
            ("JOBMIRROR_WEBHOOK_LISTEN", &listen),
            ("JOBMIRROR_WEBHOOK_SECRET", HOOK_SECRET),
        ],
    );
    let mut seen = Vec::new();
    crate::cli::wait_for(&rx, "sent completed", &mut seen);
    // A signed webhook and a forged one, so the receiver logs too.
    let body =
        br#"{"data":{"id":"sec-1","companyId":"5ec00000-0000-4000-8000-000000000001"},"eventType":"v1.export-job.created"}"#;
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let h = crate::webhook::signed(HOOK_SECRET, "msg_sec", ts, body);
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    assert_eq!(
        crate::webhook::post(addr, "/webhooks/pleo", &h, body).0,
        200
    );
    let mut forged = h.clone();
    forged[2].1 = "v1,AAAA".into();
    assert_eq!(
        crate::webhook::post(addr, "/webhooks/pleo", &forged, body).0,
        401
    );
    let child = r.0.take().unwrap();
    signal(&child, "TERM");
    assert!(wait_exit(child, Duration::from_secs(20)).success());
    // The process has exited: its log ends, so this reads to the end.
    seen.extend(rx.iter());
    let log = seen.join("\n");
    assert!(
        log.contains("[TRACE]") || log.contains("[DEBUG]"),
        "trace level was on"
    );
    for secret in [
        "client-secret-value-7",
        "R0-refresh-secret",
        "fake-access-",
        "fake-refresh-",
        HOOK_SECRET,
        &HOOK_SECRET["whsec_".len()..],
        "Bearer ",
        "Authorization",
    ] {
        assert!(!log.contains(secret), "{secret:?} appears in the log");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for f in ["secrets.db", "secrets.db-wal", "secrets.db-shm"] {
            let p = dir.path().join(f);
            if let Ok(m) = std::fs::metadata(&p) {
                assert_eq!(
                    m.permissions().mode() & 0o077,
                    0,
                    "{f} is readable by others"
                );
            }
        }
        let m = std::fs::metadata(dir.path().join("secrets.db")).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
    }
}

#[test]
fn a_corrupt_database_is_a_clear_error_and_doctor_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("corrupt.db");
    std::fs::write(&db, vec![0x5a; 64 * 1024]).unwrap();
    let fake = real_time_fake();
    let (mut r, rx) = instance(
        dir.path(),
        "corrupt",
        &fake,
        &["cccccccc-0000-4000-8000-00000000000c".to_owned()],
        &[],
    );
    let child = r.0.take().unwrap();
    let status = wait_exit(child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(1));
    let err: Vec<String> = rx.iter().collect();
    let err = err.join("\n");
    assert!(
        err.contains("corrupt.db") && err.contains("not a database"),
        "{err}"
    );
    let (_, err) = crate::cli::fails(cmd().args(["doctor"]).env("JOBMIRROR_DB", &db));
    assert!(err.contains("not a database"), "{err}");
}

#[test]
fn a_full_disk_answers_503_keeps_every_acknowledged_delivery_and_recovers() {
    // The service runs with a file size limit (SIGXFSZ ignored, so writes fail with EFBIG,
    // as on a full disk). Deliveries are acknowledged until the database cannot grow, then
    // answered 503 (the sender retries); after a restart without the limit, the retries are
    // stored and everything acknowledged before is still there.
    let fake = real_time_fake();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("full.db");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let exe = env!("CARGO_BIN_EXE_jobmirror");
    let mut sh = std::process::Command::new("sh");
    let mut child = crate::cli::clean_env(&mut sh)
        .arg("-c")
        .arg(format!("trap '' XFSZ; ulimit -f 8000; exec {exe} run"))
        .env("JOBMIRROR_DB", &db)
        .env("JOBMIRROR_PLEO_BASE_URL", fake.base_url())
        .env("JOBMIRROR_PLEO_API_KEY", fake.api_key())
        .env(
            "JOBMIRROR_COMPANY_IDS",
            "f0f0f0f0-0000-4000-8000-0000000000f0",
        )
        .env("JOBMIRROR_HANDLER_COMMAND", "dry-run")
        .env("JOBMIRROR_ADMIN_LISTEN", "127.0.0.1:0")
        .env("JOBMIRROR_POLL_INTERVAL_SECS", "3600")
        .env("JOBMIRROR_WEBHOOK_LISTEN", &listen)
        .env("JOBMIRROR_WEBHOOK_SECRET", HOOK_SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines(child.stderr.take().unwrap());
    let mut reaper = Reaper(Some(child));
    let mut seen = Vec::new();
    crate::cli::wait_for(&rx, "webhook receiver listening", &mut seen);
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    let send = |i: usize| -> u16 {
        let id = format!("msg_full_{i}");
        let body = format!(
            r#"{{"data":{{"id":"j{i}","companyId":"f0f0f0f0-0000-4000-8000-0000000000f0"}},"eventType":"v1.export-job.created","pad":"{}"}}"#,
            "x".repeat(1500)
        );
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let h = crate::webhook::signed(HOOK_SECRET, &id, ts, body.as_bytes());
        crate::webhook::post(addr, "/webhooks/pleo", &h, body.as_bytes()).0
    };
    let mut acked = Vec::new();
    let mut refused = Vec::new();
    for i in 0..3000 {
        match send(i) {
            200 => acked.push(i),
            503 => {
                refused.push(i);
                if refused.len() >= 20 {
                    break;
                }
            }
            other => panic!("delivery {i}: {other}"),
        }
    }
    assert!(
        !refused.is_empty(),
        "the limit was reached ({} acknowledged)",
        acked.len()
    );
    assert!(
        acked.len() > 50,
        "{} acknowledged before the disk filled",
        acked.len()
    );
    let child = reaper.0.take().unwrap();
    signal(&child, "TERM");
    let _ = wait_exit(child, Duration::from_secs(20));
    seen.extend(rx.iter());
    let log = seen.join("\n");
    assert!(
        log.contains("could not commit"),
        "a clear error in the log:\n{log}"
    );
    // Restart without the limit: the sender's retries are stored.
    let (r2, rx2) = instance(
        dir.path(),
        "full",
        &fake,
        &["f0f0f0f0-0000-4000-8000-0000000000f0".to_owned()],
        &[
            ("JOBMIRROR_WEBHOOK_LISTEN", listen.as_str()),
            ("JOBMIRROR_WEBHOOK_SECRET", HOOK_SECRET),
            ("JOBMIRROR_POLL_INTERVAL_SECS", "3600"),
        ],
    );
    let mut seen2 = Vec::new();
    crate::cli::wait_for(&rx2, "webhook receiver listening", &mut seen2);
    for i in &refused {
        assert_eq!(send(*i), 200, "retry of {i}");
    }
    drop(r2);
    let st = jobmirror::store::Store::open_read_only(&db).unwrap();
    assert_eq!(st.quick_check().unwrap(), ["ok"]);
    for i in acked.iter().chain(&refused) {
        let n: i64 = st
            .conn()
            .query_row(
                "SELECT count(*) FROM webhook_deliveries WHERE webhook_id = ?1",
                [format!("msg_full_{i}")],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 1, "delivery {i}");
    }
    eprintln!(
        "full disk: {} acknowledged, {} answered 503 then stored after the restart",
        acked.len(),
        refused.len()
    );
}

#[test]
fn a_database_locked_by_another_writer_answers_503_then_recovers() {
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let r = crate::webhook::start(SECRET, &[]);
    let now = r.w.clock_now().0 / 1000;
    let body = br#"{"data":{"id":"lk","companyId":"c"},"eventType":"v1.export-job.created"}"#;
    let h = crate::webhook::signed(SECRET, "msg_locked", now, body);
    // Another process takes the write lock and keeps it past the 5 s the service waits.
    let other = rusqlite::Connection::open(&r.w.db).unwrap();
    other.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let t = std::time::Instant::now();
    let (status, _, retry) = crate::webhook::post(r.addr, "/webhooks/pleo", &h, body);
    assert_eq!(status, 503);
    assert!(retry.is_some(), "503 carries Retry-After");
    assert!(
        t.elapsed() < Duration::from_secs(12),
        "answered within the sender's patience"
    );
    other.execute_batch("ROLLBACK").unwrap();
    assert_eq!(
        crate::webhook::post(r.addr, "/webhooks/pleo", &h, body).0,
        200
    );
    let n: i64 =
        r.w.store()
            .conn()
            .query_row("SELECT count(*) FROM webhook_deliveries", [], |x| x.get(0))
            .unwrap();
    assert_eq!(n, 1);
}

#[test]
fn kill_9_during_polls_the_mirror_converges() {
    let fake = real_time_fake();
    let companies: Vec<String> = (0..30)
        .map(|i| format!("90119000-0000-4000-8000-{i:012}"))
        .collect();
    for i in 0..600 {
        fake.add_job(JobSpec {
            id: Some(format!("p{i:03}")),
            company_id: companies[i % 30].clone(),
            created_secs_ago: Some(900 - i as i64),
            ..JobSpec::default()
        })
        .unwrap();
    }
    // A third of them are another integration's: jobmirror must mirror them, not take them.
    for i in (0..600).step_by(3) {
        assert!(fake.claim_as_other(&format!("p{i:03}")));
    }
    let dir = tempfile::tempdir().unwrap();
    let extra = [("JOBMIRROR_PLEO_REQUESTS_PER_SEC_MAX", "0")];
    let mut rng = Rng(0x5eed_0005);
    let kills = 20 * scale();
    for cycle in 0..kills {
        let (mut r, rx) = instance(dir.path(), "polls", &fake, &companies, &extra);
        let mut seen = Vec::new();
        crate::cli::wait_for(&rx, "jobmirror started", &mut seen);
        std::thread::sleep(Duration::from_millis(rng.range(1, 60)));
        stop(&mut r, cycle, &rx);
    }
    let (r, _rx) = instance(dir.path(), "polls", &fake, &companies, &extra);
    let settled = fake.wait_for_requests(Duration::from_secs(60), |q| {
        q.iter()
            .filter(|x| {
                x.path == "/v3/export-job-events"
                    && x.status == 202
                    && x.body.contains("\"completed\"")
            })
            .count()
            >= 400
    });
    assert!(settled, "{} of 400 completed", completions(&fake));
    // The mirror catches up with its next passes: wait (bounded) until it agrees with Pleo.
    let db = dir.path().join("polls.db");
    let disagreements = || -> Vec<String> {
        let st = jobmirror::store::Store::open_read_only(&db).unwrap();
        fake.jobs()
            .into_iter()
            .filter_map(|job| match st.job(&job.id).unwrap() {
                Some(row) if row.status == job.status => None,
                other => Some(format!(
                    "{}: fake {} mirror {:?}",
                    job.id,
                    job.status,
                    other.map(|r| r.status)
                )),
            })
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut wrong = disagreements();
    while !wrong.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        wrong = disagreements();
    }
    drop(r);
    assert!(
        wrong.is_empty(),
        "{} not converged: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    for i in (0..600).step_by(3) {
        assert_eq!(
            fake.started_events_for(&format!("p{i:03}")),
            0,
            "never claims another's job"
        );
    }
    eprintln!("kill -9 during polls: {kills} stops, 600 jobs over 30 companies, mirror converged");
}

#[test]
fn the_fuzz_entry_point_survives_arbitrary_bytes() {
    // The entry point `fuzz/` drives under cargo fuzz, run here on seeded inputs: mutations of a
    // valid signed request and plain random bytes. It must return for every input, and accept
    // the genuine request.
    let body = br#"{"data":{"id":"f","companyId":"c"},"eventType":"v1.export-job.created"}"#;
    let secrets =
        jobmirror::edge::webhook::Secrets::parse(jobmirror::edge::fuzzing::FUZZ_SECRET).unwrap();
    let ts = 1_795_507_200i64;
    let sig = jobmirror::edge::webhook::sign_with(&secrets, "msg_f", ts, body);
    let mut valid = format!(
        "POST /webhooks/pleo HTTP/1.1\r\nwebhook-id: msg_f\r\nwebhook-timestamp: {ts}\r\nwebhook-signature: {sig}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    valid.extend_from_slice(body);
    assert_eq!(jobmirror::edge::fuzzing::webhook_request(&valid), 200);
    let mut rng = Rng(0x5eed_0006);
    let mut outcomes = std::collections::BTreeMap::new();
    for _ in 0..20_000 * scale() {
        let mut d = valid.clone();
        for _ in 0..rng.range(1, 8) {
            let i = rng.range(0, d.len() as u64 - 1) as usize;
            match rng.range(0, 3) {
                0 => d[i] = rng.next() as u8,
                1 => d.insert(i, rng.next() as u8),
                2 => {
                    d.remove(i);
                }
                _ => d.truncate(i),
            }
            if d.is_empty() {
                break;
            }
        }
        *outcomes
            .entry(jobmirror::edge::fuzzing::webhook_request(&d))
            .or_insert(0) += 1;
        let noise: Vec<u8> = (0..rng.range(0, 512)).map(|_| rng.next() as u8).collect();
        *outcomes
            .entry(jobmirror::edge::fuzzing::webhook_request(&noise))
            .or_insert(0) += 1;
    }
    assert!(!outcomes.contains_key(&500), "{outcomes:?}");
    eprintln!("fuzz entry point: {outcomes:?}");
}

#[test]
fn a_database_directory_it_cannot_write_is_a_clear_error_until_fixed() {
    use std::os::unix::fs::PermissionsExt;
    let fake = real_time_fake();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o555)).unwrap();
    // Root writes anywhere: run the service as nobody then (CI runs as root).
    let root = unsafe { libc::geteuid() } == 0;
    let run = || {
        let mut c = if root {
            let mut c = std::process::Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(env!("CARGO_BIN_EXE_jobmirror"));
            c
        } else {
            std::process::Command::new(env!("CARGO_BIN_EXE_jobmirror"))
        };
        crate::cli::clean_env(&mut c)
            .arg("run")
            .env("JOBMIRROR_DB", state.join("jm.db"))
            .env("JOBMIRROR_PLEO_BASE_URL", fake.base_url())
            .env("JOBMIRROR_PLEO_API_KEY", fake.api_key())
            .env(
                "JOBMIRROR_COMPANY_IDS",
                "0e0e0e0e-0000-4000-8000-0000000000e0",
            )
            .env("JOBMIRROR_HANDLER_COMMAND", "dry-run")
            .env("JOBMIRROR_ADMIN_LISTEN", "127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    };
    let o = run().output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("jm.db") && err.contains("Permission denied"),
        "{err}"
    );
    // Fixed: it starts.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut child = run().spawn().unwrap();
    let rx = lines(child.stderr.take().unwrap());
    let mut r = Reaper(Some(child));
    let mut seen = Vec::new();
    crate::cli::wait_for(&rx, "jobmirror started", &mut seen);
    let child = r.0.take().unwrap();
    signal(&child, "TERM");
    assert!(wait_exit(child, Duration::from_secs(20)).success());
}

/// Waits (bounded) until `pid` is gone or a zombie; false if it still runs after `within`.
pub(crate) fn process_ends(pid: u32, within: Duration) -> bool {
    let t0 = std::time::Instant::now();
    loop {
        if !jobmirror::processing::handler::process_running(pid) {
            return true;
        }
        if t0.elapsed() > within {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (bounded) for a file to hold a pid.
pub(crate) fn pid_in(path: &std::path::Path, within: Duration) -> u32 {
    let t0 = std::time::Instant::now();
    loop {
        if let Some(p) = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return p;
        }
        assert!(t0.elapsed() < within, "{} never got a pid", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn one_service_per_database_and_kill_9_leaves_no_stale_lock() {
    // Two services on one database both processed one job (each item posted twice).
    let fake = real_time_fake();
    let dir = tempfile::tempdir().unwrap();
    let companies = vec!["10c10c10-0000-4000-8000-0000000000c0".to_owned()];
    let (mut first, rx) = instance(dir.path(), "held", &fake, &companies, &[]);
    let mut seen = Vec::new();
    crate::cli::wait_for(&rx, "recovery pass", &mut seen);
    let pid = first.0.as_ref().unwrap().id();
    let second = cmd()
        .arg("run")
        .env("JOBMIRROR_DB", dir.path().join("held.db"))
        .env("JOBMIRROR_PLEO_BASE_URL", fake.base_url())
        .env("JOBMIRROR_PLEO_API_KEY", fake.api_key())
        .env(
            "JOBMIRROR_COMPANY_IDS",
            "10c10c10-0000-4000-8000-0000000000c0",
        )
        .env("JOBMIRROR_HANDLER_COMMAND", "dry-run")
        .env("JOBMIRROR_ADMIN_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("held by a running jobmirror (pid {pid})")),
        "{err}"
    );
    // kill -9: the kernel drops the lock with the process.
    let child = first.0.as_ref().unwrap();
    signal(child, "KILL");
    let _ = first.0.take().unwrap().wait();
    let (_again, rx) = instance(dir.path(), "held", &fake, &companies, &[]);
    crate::cli::wait_for(&rx, "recovery pass", &mut seen);
}

#[test]
fn a_handler_dies_with_its_service_and_a_restart_kills_what_it_left() {
    // After a kill -9 the handler's process group ran on while the restarted service started a
    // second handler for the same items.
    let fake = real_time_fake();
    fake.add_job(JobSpec {
        id: Some("pd-1".into()),
        company_id: "9d000000-0000-4000-8000-000000000001".into(),
        created_secs_ago: Some(60),
        items: Some(2),
        ..JobSpec::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let handler = d.join("h");
    // The run writes its pid, leaves a child of its own, and hangs.
    std::fs::write(
        &handler,
        format!(
            "#!/bin/sh\n[ \"$1\" = --check ] && exit 0\nn=$(ls {d}/run-* 2>/dev/null | wc -l)\necho $$ > {d}/run-$n\nsleep 300 &\necho $! > {d}/child-$n\nwait\n",
            d = d.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&handler, std::fs::Permissions::from_mode(0o755)).unwrap();
    let h = handler.display().to_string();
    let extra = [("JOBMIRROR_HANDLER_COMMAND", h.as_str())];
    let companies = vec!["9d000000-0000-4000-8000-000000000001".to_owned()];
    let (mut svc, _rx) = instance(d, "pd", &fake, &companies, &extra);
    let run0 = pid_in(&d.join("run-0"), Duration::from_secs(30));
    let child0 = pid_in(&d.join("child-0"), Duration::from_secs(30));
    signal(svc.0.as_ref().unwrap(), "KILL");
    let _ = svc.0.take().unwrap().wait();
    assert!(
        process_ends(run0, Duration::from_secs(10)),
        "the handler outlived its service"
    );
    // Its own child is still there (the parent-death signal reaches only the handler)...
    assert!(!process_ends(child0, Duration::from_millis(200)));
    // ...until a restarted service, before starting the job's handler again, kills it.
    let (_svc, _rx) = instance(d, "pd", &fake, &companies, &extra);
    let run1 = pid_in(&d.join("run-1"), Duration::from_secs(30));
    assert_ne!(run1, run0);
    assert!(
        process_ends(child0, Duration::from_secs(5)),
        "a process of the earlier run was alive beside the new handler"
    );
}
