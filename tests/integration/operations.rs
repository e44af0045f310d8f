//! Running under systemd and at scale: the notify protocol and watchdog, health and metrics
//! on the admin listener, SIGHUP, lanes, and a thousand companies polled without a burst.

use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jobmirror::clock::{SharedClock, SystemClock};
use jobmirror::sandbox::{FakeConfig, FakePleo, JobSpec};

use crate::cli::{Reaper, cmd, lines, signal, wait_exit, wait_for};

const A: &str = "aaaaaaaa-0000-4000-8000-000000000001";
const B: &str = "bbbbbbbb-0000-4000-8000-000000000002";

/// The webhook receiver's address, from the service's start-up line.
pub(crate) fn hook_addr(seen: &[String]) -> std::net::SocketAddr {
    seen.iter()
        .find_map(|l| l.split("webhook receiver listening on ").nth(1))
        .unwrap()
        .trim_end_matches("/webhooks/pleo")
        .parse()
        .unwrap()
}

/// The most of `times` (sorted, ms) that fall within any `window_ms`.
pub(crate) fn most_within(times: &[i64], window_ms: i64) -> usize {
    let (mut most, mut j) = (0, 0);
    for i in 0..times.len() {
        while times[i] - times[j] >= window_ms {
            j += 1;
        }
        most = most.max(i - j + 1);
    }
    most
}

pub(crate) fn fake() -> FakePleo {
    let clock: SharedClock = Arc::new(SystemClock);
    FakePleo::start("127.0.0.1:0", FakeConfig::default(), clock).unwrap()
}

/// Datagrams sent to a notify socket, as text, until `pred` holds or `within` passes.
fn notes_until(
    sock: &UnixDatagram,
    within: Duration,
    pred: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !pred(&got) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "notify messages so far: {got:?}");
        sock.set_read_timeout(Some(left)).unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    got
}

pub(crate) fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// `jobmirror run` against `base_url` with a notify socket; returns the child, its log lines,
/// the socket and the admin address (from the log).
pub(crate) fn start(
    dir: &std::path::Path,
    base_url: &str,
    extra: &[(&str, &str)],
) -> (
    Reaper,
    crossbeam_channel::Receiver<String>,
    UnixDatagram,
    String,
    Vec<String>,
) {
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let mut c = cmd();
    c.arg("run")
        .env("JOBMIRROR_DB", dir.join("jm.db"))
        .env("JOBMIRROR_PLEO_BASE_URL", base_url)
        .env(
            "JOBMIRROR_PLEO_API_KEY",
            jobmirror::sandbox::DEFAULT_API_KEY,
        )
        .env("JOBMIRROR_COMPANY_IDS", A)
        .env("JOBMIRROR_HANDLER_COMMAND", "dry-run")
        .env("JOBMIRROR_ADMIN_LISTEN", "127.0.0.1:0")
        .env("JOBMIRROR_LOG", "info")
        .env("NOTIFY_SOCKET", &sock_path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in extra {
        c.env(k, v);
    }
    let mut child = c.spawn().unwrap();
    let rx = lines(child.stderr.take().unwrap());
    let reaper = Reaper(Some(child));
    let mut seen = Vec::new();
    wait_for(&rx, "admin listener on http://", &mut seen);
    let addr = seen
        .last()
        .unwrap()
        .split("http://")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_owned();
    (reaper, rx, sock, addr, seen)
}

#[test]
fn notify_protocol_ready_status_watchdog_and_stopping() {
    let f = fake();
    let dir = tempfile::tempdir().unwrap();
    let (mut reaper, _rx, sock, addr, _) =
        start(dir.path(), &f.base_url(), &[("WATCHDOG_USEC", "400000")]);
    let notes = notes_until(&sock, Duration::from_secs(20), |n| {
        n.iter().filter(|m| *m == "WATCHDOG=1").count() >= 2
    });
    assert!(notes[0].starts_with("READY=1\nSTATUS="), "{notes:?}");
    assert!(notes[0].contains("1 companies"), "{notes:?}");
    assert!(notes.iter().any(|m| m.starts_with("STATUS=")));
    assert_eq!(http_get(&addr, "/healthz"), (200, "ok\n".into()));
    let child = reaper.0.take().unwrap();
    signal(&child, "TERM");
    let notes = notes_until(&sock, Duration::from_secs(20), |n| {
        n.iter().any(|m| m == "STOPPING=1")
    });
    assert!(notes.contains(&"STOPPING=1".to_owned()));
    assert!(wait_exit(child, Duration::from_secs(20)).success());
}

#[test]
fn a_wedged_thread_stops_the_watchdog_and_fails_healthz() {
    // A Pleo that accepts connections and never answers: the sync thread hangs in its first
    // listing (request timeout 60 s), while the other threads go on beating.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", hole.local_addr().unwrap());
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    let h = held.clone();
    std::thread::spawn(move || {
        for s in hole.incoming().flatten() {
            h.lock().unwrap().push(s);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let (reaper, _rx, sock, addr, _) = start(
        dir.path(),
        &url,
        &[
            ("WATCHDOG_USEC", "200000"),
            ("JOBMIRROR_HEALTH_STALE_SECS", "1"),
            ("JOBMIRROR_PLEO_REQUEST_TIMEOUT_SECS", "60"),
        ],
    );
    let notes = notes_until(&sock, Duration::from_secs(20), |n| {
        n.iter().any(|m| m.starts_with("STATUS=stalled"))
    });
    let stalled = notes
        .iter()
        .position(|m| m.starts_with("STATUS=stalled"))
        .unwrap();
    assert_eq!(notes[stalled], "STATUS=stalled: jm-sync", "{notes:?}");
    let (status, body) = http_get(&addr, "/healthz");
    assert_eq!(status, 503);
    assert_eq!(body, "not making progress: jm-sync\n");
    // While it stays wedged, no more pings (a window of 5 ping periods).
    let after = notes_for(&sock, Duration::from_secs(1));
    assert!(!after.iter().any(|m| m == "WATCHDOG=1"), "{after:?}");
    drop(reaper);
}

/// Every datagram that arrives within `d`.
fn notes_for(sock: &UnixDatagram, d: Duration) -> Vec<String> {
    let deadline = Instant::now() + d;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return got;
        }
        sock.set_read_timeout(Some(left)).unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
}

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[test]
fn metrics_expose_jobs_claims_api_calls_webhooks_and_handler_results() {
    let f = fake();
    f.add_job(JobSpec {
        id: Some("m-1".into()),
        company_id: A.into(),
        created_secs_ago: Some(60),
        items: Some(3),
        items_without_account: 1,
        ..JobSpec::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (reaper, rx, _sock, addr, mut seen) = start(
        dir.path(),
        &f.base_url(),
        &[
            ("JOBMIRROR_WEBHOOK_LISTEN", "127.0.0.1:0"),
            ("JOBMIRROR_WEBHOOK_SECRET", SECRET),
        ],
    );
    wait_for(&rx, "sent completed_with_errors", &mut seen);
    let hook = hook_addr(&seen);
    let body = br#"{"data":{"id":"m-2","companyId":"x"},"eventType":"v1.export-job.created","eventId":"e"}"#;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let good = crate::webhook::signed(SECRET, "msg_ok", now, body);
    assert_eq!(
        crate::webhook::post(hook, "/webhooks/pleo", &good, body).0,
        200
    );
    let mut bad = good.clone();
    bad[0].1 = "msg_forged".into();
    assert_eq!(
        crate::webhook::post(hook, "/webhooks/pleo", &bad, body).0,
        401
    );

    let (status, text) = http_get(&addr, "/metrics");
    assert_eq!(status, 200);
    for line in [
        "jobmirror_jobs{state=\"done\"} 1",
        "jobmirror_claims_total 1",
        "jobmirror_conflicts_total 0",
        "jobmirror_finished_total{outcome=\"completed_with_errors\"} 1",
        "jobmirror_finished_total{outcome=\"completed\"} 0",
        "jobmirror_finished_total{outcome=\"failed\"} 0",
        "jobmirror_jobs{state=\"expired\"} 0",
        "jobmirror_jobs{state=\"conflict\"} 0",
        "jobmirror_companies_failing 0",
        "jobmirror_config_reload_refused 0",
        "jobmirror_webhooks_accepted_total 1",
        "jobmirror_webhooks_rejected_total{reason=\"bad_signature\"} 1",
        "jobmirror_api_requests_total{endpoint=\"POST /v3/export-job-events\",code=\"202\"} 2",
        "jobmirror_api_requests_total{endpoint=\"PUT /v3/export-jobs/{id}/items\",code=\"200\"} 1",
        "jobmirror_handler_results_total{outcome=\"successful\"} 2",
        "jobmirror_handler_results_total{outcome=\"failed\"} 1",
        "jobmirror_threads_progressing 1",
        "jobmirror_pleo_requests_failed_in_a_row 0",
        "jobmirror_handler_crashes_total 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in:\n{text}"
        );
    }
    assert!(text.contains("# TYPE jobmirror_poll_duration_seconds histogram"));
    assert!(text.contains("jobmirror_poll_duration_seconds_bucket{le=\"+Inf\"} "));
    // "Never" is an absent series, not a 0: no job is in hand, and Pleo has not failed.
    assert!(
        !text.contains("\njobmirror_next_deadline_timestamp_seconds "),
        "{text}"
    );
    assert!(
        !text.contains("\njobmirror_pleo_failing_since_timestamp_seconds "),
        "{text}"
    );
    for prefix in [
        "process_open_fds ",
        "process_resident_memory_bytes ",
        "process_cpu_seconds_total ",
        "process_start_time_seconds ",
        "jobmirror_build_info{version=\"",
        "jobmirror_last_successful_poll_timestamp_seconds ",
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in:\n{text}"));
        let v: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(v > 0.0, "{line}");
    }
    // promtool (Prometheus's own checker) accepts the exposition, when it is installed.
    if crate::cli::tool_here("promtool") {
        let out = crate::harness::pipe_through(
            std::process::Command::new("promtool").args(["check", "metrics"]),
            text.as_bytes(),
        );
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        text.lines().filter(|l| !l.starts_with('#')).all(|l| l
            .rsplit(' ')
            .next()
            .unwrap()
            .parse::<f64>()
            .is_ok()),
        "every sample ends with a number"
    );
    // No job id ever becomes a label.
    assert!(!text.contains("m-1"), "{text}");
    assert_eq!(http_get(&addr, "/nope").0, 404);
    drop(reaper);
}

/// A service run from a configuration file the test rewrites (its poll interval) before a
/// SIGHUP: company A on the fake, the dry-run handler, the admin listener on an ephemeral
/// port, and `extra` lines.
struct Reloadable {
    cfg: std::path::PathBuf,
    base: String,
}

impl Reloadable {
    fn new(dir: &std::path::Path, f: &FakePleo, extra: &str) -> Reloadable {
        Reloadable {
            cfg: dir.join("jobmirror.toml"),
            base: format!(
                "db = {:?}\npleo_base_url = {:?}\npleo_api_key = {:?}\ncompany_ids = [{A:?}]\nhandler_command = \"dry-run\"\nadmin_listen = \"127.0.0.1:0\"\n{extra}",
                dir.join("jm.db").display().to_string(),
                f.base_url(),
                jobmirror::sandbox::DEFAULT_API_KEY,
            ),
        }
    }

    /// The file, with `poll` as `poll_interval_secs` (written as given: a bad value too).
    fn write(&self, poll: &str) {
        std::fs::write(
            &self.cfg,
            format!("{}poll_interval_secs = {poll}\n", self.base),
        )
        .unwrap();
    }

    /// `jobmirror --config FILE run` with `env`; its stderr as lines.
    fn spawn(&self, env: &[(&str, String)]) -> (Reaper, crossbeam_channel::Receiver<String>) {
        let mut c = cmd();
        c.arg("--config").arg(&self.cfg).arg("run");
        for (k, v) in env {
            c.env(k, v);
        }
        let mut child = c
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let rx = lines(child.stderr.take().unwrap());
        (Reaper(Some(child)), rx)
    }
}

#[test]
fn sighup_restarts_in_place_with_a_valid_config_and_refuses_a_broken_one() {
    let f = fake();
    let dir = tempfile::tempdir().unwrap();
    let svc = Reloadable::new(dir.path(), &f, "");
    let write = |poll: &str| svc.write(poll);
    write("3600");
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let (mut reaper, rx) = svc.spawn(&[
        ("NOTIFY_SOCKET", sock_path.display().to_string()),
        ("WATCHDOG_USEC", "400000".into()),
    ]);
    let pid = reaper.0.as_ref().unwrap().id();
    let mut seen = Vec::new();
    wait_for(&rx, "poll every 3600 s", &mut seen);
    write("1800");
    signal(reaper.0.as_ref().unwrap(), "HUP");
    wait_for(&rx, "restarting in place", &mut seen);
    wait_for(&rx, "poll every 1800 s", &mut seen);
    // The same process (systemd keeps tracking its main pid).
    assert_eq!(reaper.0.as_ref().unwrap().id(), pid);
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    write("\"soon\"");
    signal(reaper.0.as_ref().unwrap(), "HUP");
    wait_for(&rx, "new configuration is refused", &mut seen);
    let line = seen.last().unwrap();
    assert!(line.contains("poll_interval_secs"), "{line}");
    // The refusal stays visible until a reload is taken: in the STATUS line the watchdog
    // thread keeps sending, and in a metric.
    let notes = notes_until(&sock, Duration::from_secs(20), |n| {
        n.iter()
            .filter(|m| m.starts_with("STATUS=reload refused ("))
            .count()
            >= 2
    });
    assert!(notes.iter().any(|m| m.contains("1 companies")), "{notes:?}");
    let addr = seen
        .iter()
        .rev()
        .find_map(|l| l.split("admin listener on http://").nth(1))
        .and_then(|rest| rest.split(' ').next())
        .unwrap()
        .to_owned();
    let (_, metrics) = http_get(&addr, "/metrics");
    assert!(
        metrics.contains("\njobmirror_config_reload_refused 1\n"),
        "{metrics}"
    );
    // Still running on the old configuration: it stops cleanly on SIGTERM.
    let child = reaper.0.take().unwrap();
    signal(&child, "TERM");
    assert!(wait_exit(child, Duration::from_secs(20)).success());
}

/// A two-item job for company A (`a`) and one for company B (`b`).
fn one_job_each(w: &crate::harness::World, a: &str, b: &str) {
    for (id, company) in [(a, A), (b, B)] {
        w.fake
            .add_job(JobSpec {
                id: Some(id.into()),
                company_id: company.into(),
                created_secs_ago: Some(60),
                items: Some(2),
                ..JobSpec::default()
            })
            .unwrap();
    }
}

/// Waits (at most 30 s) until the fake has seen two `completed` events.
fn both_completed(w: &crate::harness::World) -> bool {
    w.fake.wait_for_requests(Duration::from_secs(30), |r| {
        r.iter()
            .filter(|q| q.path == "/v3/export-job-events" && q.body.contains("\"completed\""))
            .count()
            == 2
    })
}

#[test]
fn lanes_let_two_companies_run_their_handlers_at_once() {
    let w = crate::harness::World::new();
    one_job_each(&w, "la", "lb");
    let dir = tempfile::tempdir().unwrap();
    let marks = dir.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    // Each run marks that it started, then waits (at most 10 s) until both have started.
    let script = dir.path().join("barrier.sh");
    std::fs::write(
        &script,
        format!(
            r#"#!/bin/sh
[ "$1" = "--check" ] && exit 0
M={m}
touch "$M/started-$JOBMIRROR_COMPANY_ID"
i=0
while [ "$(ls "$M" | grep -c '^started-')" -lt 2 ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
ls "$M" | grep -c '^started-' > "$M/saw-$JOBMIRROR_COMPANY_ID"
while read -r line; do
  e=$(printf '%s' "$line" | sed -n 's/.*"accountingEntryId":"\([^"]*\)".*/\1/p')
  [ -n "$e" ] && printf '{{"accountingEntryId":"%s","status":"successful"}}\n' "$e"
done
"#,
            m = marks.display()
        ),
    )
    .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let cfg = w.config(
        &[A, B],
        &[
            ("JOBMIRROR_LANES", "2".into()),
            ("JOBMIRROR_HANDLER_COMMAND", script.display().to_string()),
        ],
    );
    let service = jobmirror::service::Service::start(&cfg, w.shared_clock(), None).unwrap();
    let done = both_completed(&w);
    assert!(service.stop(Duration::from_secs(10)));
    assert!(done, "both jobs completed");
    let listing: Vec<String> = std::fs::read_dir(&marks)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for c in [A, B] {
        let saw = std::fs::read_to_string(marks.join(format!("saw-{c}")))
            .unwrap_or_else(|e| panic!("{e}: {listing:?}"));
        assert_eq!(
            saw.trim(),
            "2",
            "company {c}'s handler ran while the other's did"
        );
    }
}

#[test]
fn a_thousand_companies_are_polled_paced_and_spread_without_a_burst() {
    let companies: Vec<String> = (0..1000)
        .map(|i| format!("c0c0c0c0-0000-4000-8000-{i:012}"))
        .collect();
    let snap = jobmirror::replay::snapshot::Snapshot::parse(
        &serde_json::json!({
            "version": 2,
            "start": "2026-11-24T08:00:00Z",
            "endSecs": 1800,
            "companies": companies,
            "service": {"poll_interval_secs": 300, "pleo_requests_per_sec_max": 20},
        })
        .to_string(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut r = jobmirror::replay::Replay::new(
        snap,
        jobmirror::replay::ReplayOptions::new(dir.path().join("r.db")),
    )
    .unwrap();
    let s = r.run(&mut |_| Ok(())).unwrap();
    assert!(s.violations.is_empty(), "{}", s.render());
    let start = jobmirror::clock::Millis::parse_rfc3339("2026-11-24T08:00:00Z").unwrap();
    let times: Vec<i64> = r
        .fake()
        .requests()
        .iter()
        .filter(|q| q.method == "GET" && q.path == "/v3/export-jobs")
        .map(|q| start.until(q.at))
        .collect();
    // Paced: a full bucket (20) plus 20 per second at most, in any one-second window.
    let worst = most_within(&times, 1000);
    assert!(worst <= 40, "{worst} listings within one second");
    // The start-up recovery pass over 1,000 companies is paced out, not a burst.
    assert!(times[999] >= 45_000, "recovery took {} ms", times[999]);
    // Afterwards, polls are spread: per 10 s, close to 1000 / 300 s * 10 s = 33.
    let mut buckets = std::collections::BTreeMap::new();
    for t in times
        .iter()
        .skip(1000)
        .filter(|t| **t >= 400_000 && **t < 1_700_000)
    {
        *buckets.entry(t / 10_000).or_insert(0) += 1;
    }
    let (min, max) = (
        *buckets.values().min().unwrap(),
        *buckets.values().max().unwrap(),
    );
    assert!(buckets.len() >= 125, "{} ten-second buckets", buckets.len());
    assert!(min >= 15 && max <= 60, "per 10 s: min {min}, max {max}");
    // Every company is polled about every 300 s.
    let per_company = times.len() as f64 / 1000.0;
    assert!(
        (6.0..=8.0).contains(&per_company),
        "{per_company} listings per company in 30 minutes"
    );
}

#[test]
fn a_company_with_its_own_api_key_is_served_with_it() {
    let w = crate::harness::World::new();
    // The world's key may touch only company A; company B has a key of its own.
    w.fake.add_company_key(crate::harness::KEY, A);
    w.fake.add_company_key("key-b", B);
    one_job_each(&w, "ka", "kb");
    let keys = w.db.parent().unwrap().join("company-keys.toml");
    std::fs::write(&keys, format!("{B:?} = \"key-b\"\n")).unwrap();
    let cfg = w.config(
        &[A, B],
        &[(
            "JOBMIRROR_COMPANY_API_KEYS_FILE",
            keys.display().to_string(),
        )],
    );
    let service = jobmirror::service::Service::start(&cfg, w.shared_clock(), None).unwrap();
    let done = both_completed(&w);
    assert!(service.stop(Duration::from_secs(10)));
    let seen: Vec<String> = w
        .fake
        .requests()
        .iter()
        .map(|q| {
            format!(
                "{} {}?{} {} {}",
                q.method, q.path, q.query, q.status, q.body
            )
        })
        .collect();
    let journal: Vec<String> = w
        .store()
        .events(Some("ka"))
        .unwrap()
        .iter()
        .map(|e| format!("{} {}", e.kind, e.detail))
        .collect();
    assert!(
        done,
        "both companies' jobs completed: {seen:#?} {journal:#?}"
    );
    let refused: Vec<String> = w
        .fake
        .requests()
        .iter()
        .filter(|q| q.status == 403 || q.status == 401)
        .map(|q| format!("{} {}?{}", q.method, q.path, q.query))
        .collect();
    assert!(refused.is_empty(), "{refused:?}");

    // A key for a company that is not served is a configuration error.
    std::fs::write(&keys, "\"other\" = \"key-x\"\n").unwrap();
    let env = [
        ("JOBMIRROR_PLEO_API_KEY", "k".to_owned()),
        ("JOBMIRROR_COMPANY_IDS", A.to_owned()),
        (
            "JOBMIRROR_COMPANY_API_KEYS_FILE",
            keys.display().to_string(),
        ),
    ];
    let e = jobmirror::config::Config::load_with(None, &|k| {
        env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
    })
    .unwrap_err();
    assert_eq!(e.key, "company_api_keys_file");
    assert!(e.message.contains("other"), "{}", e.message);
}

#[test]
fn a_credential_pleo_refuses_is_an_error_a_failed_doctor_and_a_degraded_healthz() {
    // With a key Pleo refuses, the log said WARN, doctor warn (exit 0), /healthz ok and
    // jobmirror_up 1: nobody was told.
    let f = fake();
    let dir = tempfile::tempdir().unwrap();
    let (mut reaper, rx, _sock, addr, mut seen) = start(
        dir.path(),
        &f.base_url(),
        &[("JOBMIRROR_PLEO_API_KEY", "a-key-pleo-refuses")],
    );
    wait_for(&rx, "Pleo refuses the credential", &mut seen);
    let line = seen.last().unwrap();
    assert!(line.contains("[ERROR]") && line.contains("401"), "{line}");
    assert!(
        !line.contains("a-key-pleo-refuses"),
        "the key in the log: {line}"
    );
    let (status, body) = http_get(&addr, "/healthz");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.starts_with(
            "degraded: listing fails for 1 companies (1 with a credential Pleo refuses)"
        ),
        "{body}"
    );
    let (_, metrics) = http_get(&addr, "/metrics");
    assert!(
        metrics.contains("\njobmirror_companies_refused 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("\njobmirror_companies_failing 1\n"),
        "{metrics}"
    );
    // The company id never becomes a label.
    assert!(!metrics.contains(A), "{metrics}");
    let out = cmd()
        .arg("doctor")
        .env("JOBMIRROR_DB", dir.path().join("jm.db"))
        .env("JOBMIRROR_COMPANY_IDS", A)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("fail") && l.contains("Pleo refuses the credential")),
        "{text}"
    );
    let child = reaper.0.take().unwrap();
    signal(&child, "TERM");
    assert!(wait_exit(child, Duration::from_secs(20)).success());
}

/// Every credential's client shares one connection pool: with a key per company the service
/// holds a bounded number of file descriptors, not one connection per company.
#[test]
fn three_hundred_companies_with_keys_of_their_own_share_one_connection_pool() {
    let f = fake();
    let dir = tempfile::tempdir().unwrap();
    let companies: Vec<String> = (0..300)
        .map(|i| format!("{i:08x}-0000-4000-8000-00000000000c"))
        .collect();
    let mut keys = String::new();
    for (i, c) in companies.iter().enumerate() {
        f.add_company_key(&format!("key-{i}"), c);
        keys.push_str(&format!("{c:?} = \"key-{i}\"\n"));
    }
    let keys_file = dir.path().join("company-keys.toml");
    std::fs::write(&keys_file, keys).unwrap();
    let ids_file = dir.path().join("companies.txt");
    std::fs::write(&ids_file, companies.join("\n")).unwrap();
    let (reaper, rx, _sock, _addr, mut seen) = start(
        dir.path(),
        &f.base_url(),
        &[
            ("JOBMIRROR_COMPANY_IDS", ""),
            ("JOBMIRROR_COMPANY_IDS_FILE", ids_file.to_str().unwrap()),
            (
                "JOBMIRROR_COMPANY_API_KEYS_FILE",
                keys_file.to_str().unwrap(),
            ),
        ],
    );
    let pid = reaper.0.as_ref().unwrap().id();
    // The recovery pass over all of them is logged once every company's pass is committed.
    wait_for(&rx, "recovery pass over 300 companies", &mut seen);
    let line = seen.last().unwrap();
    assert!(!line.contains("failed for"), "{line}");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let sockets = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .filter(|l| l.to_string_lossy().starts_with("socket:"))
        .count();
    eprintln!("{fds} file descriptors ({sockets} sockets) after 300 companies");
    assert!(
        fds <= 64,
        "{fds} file descriptors ({sockets} sockets) after 300 companies"
    );
    // Each company was listed with its own key, none refused.
    let reqs = f.requests();
    assert!(reqs.iter().all(|q| q.status != 401 && q.status != 403));
    assert!(reqs.iter().filter(|q| q.path == "/v3/export-jobs").count() >= 300);
    drop(reaper);
}

#[test]
fn pleo_failing_every_request_makes_healthz_degraded_and_an_answer_ends_it() {
    // /healthz said 200 for the first 11.5 minutes of a Pleo outage: only a company failing
    // three polls in a row counted. Now two requests failing in a row (after their retries)
    // is enough, and any answer that is not a failure ends it.
    let f = fake();
    let dir = tempfile::tempdir().unwrap();
    let (mut reaper, rx, _sock, addr, mut seen) = start(
        dir.path(),
        &f.base_url(),
        &[("JOBMIRROR_PLEO_RETRY_ATTEMPTS_MAX", "1")],
    );
    wait_for(&rx, "recovery pass over 1 companies", &mut seen);
    let (status, body) = http_get(&addr, "/healthz");
    assert_eq!(status, 200, "{body}");
    f.set_fault_rates(jobmirror::sandbox::FaultRates {
        server_error: 1.0,
        ..Default::default()
    });
    let child = reaper.0.as_ref().unwrap();
    for _ in 0..2 {
        signal(child, "USR1");
        wait_for(&rx, "trigger pass over 1 companies", &mut seen);
    }
    let (status, body) = http_get(&addr, "/healthz");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.starts_with("degraded: the last 2 requests to Pleo failed"),
        "{body}"
    );
    let (_, metrics) = http_get(&addr, "/metrics");
    assert!(
        metrics.contains("\njobmirror_pleo_requests_failed_in_a_row 2\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("\njobmirror_pleo_failing_since_timestamp_seconds "),
        "{metrics}"
    );
    // Pleo answers again: the next request ends the streak.
    f.set_fault_rates(jobmirror::sandbox::FaultRates::default());
    signal(child, "USR1");
    wait_for(&rx, "trigger pass over 1 companies", &mut seen);
    let (status, body) = http_get(&addr, "/healthz");
    assert_eq!(status, 200, "{body}");
    let (_, metrics) = http_get(&addr, "/metrics");
    assert!(
        metrics.contains("\njobmirror_pleo_requests_failed_in_a_row 0\n"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("\njobmirror_pleo_failing_since_timestamp_seconds "),
        "{metrics}"
    );
    let child = reaper.0.take().unwrap();
    signal(&child, "TERM");
    assert!(wait_exit(child, Duration::from_secs(20)).success());
}

#[test]
fn a_restart_in_place_keeps_its_listening_sockets_and_refuses_no_connection() {
    // A SIGHUP that restarts in place closed both listeners for up to 2.5 s: clients were
    // refused. The listeners now pass to the new process; a client waits in the backlog.
    let f = fake();
    let dir = tempfile::tempdir().unwrap();
    let svc = Reloadable::new(
        dir.path(),
        &f,
        "webhook_listen = \"127.0.0.1:0\"\nwebhook_secret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n",
    );
    let write = |poll: &str| svc.write(poll);
    write("3600");
    let (mut reaper, rx) = svc.spawn(&[]);
    let mut seen = Vec::new();
    wait_for(&rx, "poll every 3600 s", &mut seen);
    let addr_of = |seen: &[String], marker: &str| {
        seen.iter()
            .rev()
            .find_map(|l| l.split(marker).nth(1))
            .and_then(|rest| rest.split([' ', '/']).next())
            .unwrap()
            .to_owned()
    };
    let admin = addr_of(&seen, "admin listener on http://");
    let hooks = addr_of(&seen, "webhook receiver listening on ");
    // Connect to both, over and over, until the new process has started.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let (stop, admin, hooks) = (stop.clone(), admin.clone(), hooks.clone());
        std::thread::spawn(move || {
            let (mut ok, mut refused) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for a in [&admin, &hooks] {
                    match std::net::TcpStream::connect(a) {
                        Ok(_) => ok += 1,
                        Err(e) => refused.push(format!("{a}: {e}")),
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            (ok, refused)
        })
    };
    write("1800");
    signal(reaper.0.as_ref().unwrap(), "HUP");
    wait_for(&rx, "restarting in place", &mut seen);
    // A request sent while the old process stops is answered by the new one.
    let mut during = std::net::TcpStream::connect(&admin).unwrap();
    during
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    wait_for(&rx, "poll every 1800 s", &mut seen);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, refused) = prober.join().unwrap();
    assert!(refused.is_empty(), "{} refused: {refused:?}", refused.len());
    assert!(ok > 10, "{ok} connections");
    during
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut answer = String::new();
    during.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // The same addresses (an ephemeral port kept too), served by the new process.
    assert_eq!(addr_of(&seen, "admin listener on http://"), admin);
    assert_eq!(addr_of(&seen, "webhook receiver listening on "), hooks);
    let (status, _) = http_get(&admin, "/healthz");
    assert_eq!(status, 200);
    let child = reaper.0.take().unwrap();
    signal(&child, "TERM");
    assert!(wait_exit(child, Duration::from_secs(20)).success());
}
