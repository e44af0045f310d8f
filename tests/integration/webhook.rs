//! The webhook receiver over real HTTP: signatures, order of checks, durability, the
//! webhook-to-claim path, and a listener that survives idle connections.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::bounded;
use jobmirror::clock::{Clock, SharedClock, SystemClock};
use jobmirror::edge::webhook::{Secrets, sign_with};
use jobmirror::service::Service;
use serde_json::{Value, json};

use crate::harness::World;

const A: &str = "aaaaaaaa-0000-4000-8000-000000000001";
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const OTHER: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

pub(crate) struct Running {
    pub(crate) w: World,
    pub(crate) service: Option<Service>,
    pub(crate) addr: SocketAddr,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.service.take() {
            s.stop(Duration::from_secs(5));
        }
    }
}

pub(crate) fn start(secrets: &str, extra: &[(&str, String)]) -> Running {
    let w = World::new();
    let mut env = vec![
        ("JOBMIRROR_WEBHOOK_LISTEN", "127.0.0.1:0".to_owned()),
        ("JOBMIRROR_WEBHOOK_SECRET", secrets.to_owned()),
    ];
    env.extend(extra.iter().cloned());
    let cfg = w.config(&[A], &env);
    let service = Service::start(&cfg, w.shared_clock(), None).unwrap();
    let addr = service.webhook_addr().unwrap();
    Running {
        w,
        service: Some(service),
        addr,
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

/// Posts `body` with the given headers; returns status, body and the Retry-After header.
pub(crate) fn post(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> (u16, String, Option<String>) {
    let mut req = agent().post(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let mut resp = req
        .header("Content-Type", "application/json")
        .send(body)
        .unwrap();
    let retry = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (
        resp.status().as_u16(),
        resp.body_mut().read_to_string().unwrap_or_default(),
        retry,
    )
}

pub(crate) fn signed(secret: &str, id: &str, ts: i64, body: &[u8]) -> Vec<(&'static str, String)> {
    let s = Secrets::parse(secret).unwrap();
    vec![
        ("webhook-id", id.to_owned()),
        ("webhook-timestamp", ts.to_string()),
        ("webhook-signature", sign_with(&s, id, ts, body)),
    ]
}

fn job_body(job: &str, event_type: &str) -> Vec<u8> {
    json!({"data": {"id": job, "companyId": A, "status": "pending"}, "eventId": "evt_1", "eventType": event_type})
        .to_string()
        .into_bytes()
}

fn stored(r: &Running) -> i64 {
    r.w.store()
        .conn()
        .query_row("SELECT count(*) FROM webhook_deliveries", [], |x| x.get(0))
        .unwrap()
}

fn now_secs(r: &Running) -> i64 {
    r.w.clock.now().0 / 1000
}

#[test]
fn a_signed_delivery_is_stored_once_and_duplicates_are_acknowledged() {
    let r = start(SECRET, &[]);
    let body = job_body("job-1", "v1.export-job.created");
    let h = signed(SECRET, "msg_1", now_secs(&r), &body);
    let (status, text, _) = post(r.addr, "/webhooks/pleo", &h, &body);
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["duplicate"],
        false
    );
    // Committed before the answer: visible to another connection right now.
    assert_eq!(stored(&r), 1);
    let (status, text, _) = post(r.addr, "/webhooks/pleo", &h, &body);
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["duplicate"],
        true
    );
    assert_eq!(stored(&r), 1);
    let (raw, headers, job): (String, String, String) =
        r.w.store()
            .conn()
            .query_row(
                "SELECT body, headers, job_id FROM webhook_deliveries",
                [],
                |x| Ok((x.get(0)?, x.get(1)?, x.get(2)?)),
            )
            .unwrap();
    assert_eq!(
        raw.as_bytes(),
        body.as_slice(),
        "the raw body is kept exactly"
    );
    assert_eq!(job, "job-1");
    let headers: Value = serde_json::from_str(&headers).unwrap();
    assert_eq!(headers["webhook-id"], "msg_1");
}

#[test]
fn bad_signatures_stale_times_and_missing_headers_are_401_and_store_nothing() {
    let r = start(SECRET, &[]);
    let body = job_body("job-1", "v1.export-job.created");
    let now = now_secs(&r);
    type Case = (&'static str, Vec<(&'static str, String)>, Vec<u8>);
    let mut cases: Vec<Case> = vec![
        (
            "wrong secret",
            signed(OTHER, "m1", now, &body),
            body.clone(),
        ),
        (
            "tampered body",
            signed(SECRET, "m2", now, &body),
            job_body("job-2", "v1.export-job.created"),
        ),
        (
            "stale",
            signed(SECRET, "m3", now - 301, &body),
            body.clone(),
        ),
        (
            "future",
            signed(SECRET, "m4", now + 301, &body),
            body.clone(),
        ),
        ("no headers", vec![], body.clone()),
    ];
    for missing in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
        let h: Vec<_> = signed(SECRET, "m5", now, &body)
            .into_iter()
            .filter(|(k, _)| *k != missing)
            .collect();
        cases.push(("missing one header", h, body.clone()));
    }
    // Another id than the one signed.
    let mut h = signed(SECRET, "m6", now, &body);
    h[0].1 = "m7".into();
    cases.push(("other id", h, body.clone()));
    for (what, headers, b) in cases {
        let (status, text, _) = post(r.addr, "/webhooks/pleo", &headers, &b);
        assert_eq!(status, 401, "{what}: {text}");
        assert!(text.len() < 80, "a short fixed reason: {text}");
    }
    assert_eq!(stored(&r), 0);
    // 299 s either way is still accepted.
    for (id, ts) in [("ok-past", now - 299), ("ok-future", now + 299)] {
        assert_eq!(
            post(
                r.addr,
                "/webhooks/pleo",
                &signed(SECRET, id, ts, &body),
                &body
            )
            .0,
            200
        );
    }
    let c = r.service.as_ref().unwrap().webhook_counters().unwrap();
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(c.rejected_bad_signature.load(Relaxed), 3);
    assert_eq!(c.rejected_stale_timestamp.load(Relaxed), 2);
    assert_eq!(c.rejected_missing_headers.load(Relaxed), 4);
    assert_eq!(c.accepted.load(Relaxed), 2);
}

#[test]
fn checks_run_in_order_method_path_size_signature_json() {
    let r = start(SECRET, &[]);
    let now = now_secs(&r);
    let resp = agent()
        .get(format!("http://{}/webhooks/pleo", r.addr))
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 405);
    assert_eq!(post(r.addr, "/webhooks/other", &[], b"{}").0, 404);
    // 2 MiB: refused by size before its (missing) signature is looked at.
    let big = vec![b' '; 2 * 1024 * 1024];
    assert_eq!(post(r.addr, "/webhooks/pleo", &[], &big).0, 413);
    // Signed but not JSON, or not an object: 400.
    for body in [&b"{not json"[..], b"[1,2]"] {
        let (status, _, _) = post(
            r.addr,
            "/webhooks/pleo",
            &signed(SECRET, "m", now, body),
            body,
        );
        assert_eq!(status, 400);
    }
    // Unsigned garbage is 401, not 400: the signature is checked before parsing.
    assert_eq!(post(r.addr, "/webhooks/pleo", &[], b"{not json").0, 401);
    assert_eq!(stored(&r), 0);
}

#[test]
fn rotation_svix_names_and_every_event_type_spelling() {
    let r = start(&format!("{OTHER},{SECRET}"), &[]);
    let now = now_secs(&r);
    let spellings = [
        "v1.export-job.created",
        "v1.export.job-created",
        "v2.export-job.created",
        "export-job.created",
    ];
    for (i, t) in spellings.iter().enumerate() {
        let body = job_body(&format!("job-{i}"), t);
        let secret = if i % 2 == 0 { SECRET } else { OTHER };
        let mut h = signed(secret, &format!("msg_{i}"), now, &body);
        if i == 3 {
            for (k, _) in h.iter_mut() {
                *k = match *k {
                    "webhook-id" => "svix-id",
                    "webhook-timestamp" => "svix-timestamp",
                    _ => "svix-signature",
                };
            }
        }
        assert_eq!(post(r.addr, "/webhooks/pleo", &h, &body).0, 200, "{t}");
    }
    let body = job_body("job-x", "v1.expense.created");
    assert_eq!(
        post(
            r.addr,
            "/webhooks/pleo",
            &signed(SECRET, "msg_other", now, &body),
            &body
        )
        .0,
        200
    );
    let kinds: Vec<String> =
        r.w.store()
            .events(None)
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .filter(|k| k.starts_with("webhook"))
            .collect();
    assert_eq!(
        kinds,
        [
            "webhook_received",
            "webhook_received",
            "webhook_received",
            "webhook_received",
            "webhook_ignored"
        ]
    );
}

#[test]
fn a_failed_commit_is_503_and_nothing_is_lost_once_it_works_again() {
    let r = start(SECRET, &[]);
    let body = job_body("job-1", "v1.export-job.created");
    let h = signed(SECRET, "msg_1", now_secs(&r), &body);
    let st = r.w.store();
    st.conn()
        .execute_batch("CREATE TRIGGER fail_insert BEFORE INSERT ON webhook_deliveries BEGIN SELECT RAISE(ABORT, 'disk full'); END;")
        .unwrap();
    let (status, _, retry) = post(r.addr, "/webhooks/pleo", &h, &body);
    assert_eq!(status, 503);
    assert!(retry.is_some(), "503 carries Retry-After");
    assert_eq!(stored(&r), 0);
    st.conn().execute_batch("DROP TRIGGER fail_insert").unwrap();
    // The sender retries with the same id.
    assert_eq!(post(r.addr, "/webhooks/pleo", &h, &body).0, 200);
    assert_eq!(stored(&r), 1);
}

#[test]
fn the_listener_answers_a_webhook_within_a_second_with_200_idle_connections_open() {
    let r = start(SECRET, &[]);
    let mut idle = Vec::new();
    for i in 0..200 {
        let mut s = TcpStream::connect(r.addr).unwrap();
        if i % 2 == 0 {
            // Half send a partial head and stall.
            s.write_all(b"POST /webhooks/pleo HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
        }
        idle.push(s);
    }
    let body = job_body("job-1", "v1.export-job.created");
    let h = signed(SECRET, "msg_idle", now_secs(&r), &body);
    let t = std::time::Instant::now();
    let (status, _, _) = post(r.addr, "/webhooks/pleo", &h, &body);
    let took = t.elapsed();
    assert_eq!(status, 200);
    assert!(took < Duration::from_secs(1), "acknowledged in {took:?}");
    drop(idle);
}

/// The real clock, a world for the database, and a fake Pleo on the real clock.
fn real_time_world() -> (SharedClock, World, jobmirror::sandbox::FakePleo) {
    let clock: SharedClock = Arc::new(SystemClock);
    let fake = jobmirror::sandbox::FakePleo::start(
        "127.0.0.1:0",
        jobmirror::sandbox::FakeConfig {
            api_keys: vec![crate::harness::KEY.into()],
            ..Default::default()
        },
        clock.clone(),
    )
    .unwrap();
    (clock, World::new(), fake)
}

#[test]
fn a_job_announced_by_webhook_is_claimed_within_two_seconds_with_hourly_polling() {
    // Real time here: the figure is wall-clock latency.
    let (clock, w, fake) = real_time_world();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/webhooks/pleo");
    let api = jobmirror::pleo::PleoClient::new(
        jobmirror::pleo::ClientConfig::new(
            &fake.base_url(),
            jobmirror::pleo::Auth::ApiKey(jobmirror::pleo::Secret::new(crate::harness::KEY)),
        ),
        clock.clone(),
    )
    .unwrap();
    let (_id, secret) = api
        .subscribe(&url, &["v1.export-job.created".into()])
        .unwrap();
    let env = [
        ("JOBMIRROR_DB", w.db.display().to_string()),
        ("JOBMIRROR_PLEO_BASE_URL", fake.base_url()),
        ("JOBMIRROR_PLEO_API_KEY", crate::harness::KEY.to_owned()),
        ("JOBMIRROR_COMPANY_IDS", A.to_owned()),
        ("JOBMIRROR_POLL_INTERVAL_SECS", "3600".to_owned()),
        ("JOBMIRROR_ADMIN_LISTEN", "127.0.0.1:0".to_owned()),
        (
            "JOBMIRROR_HANDLER_COMMAND",
            format!("outbox:{}", w.outbox().display()),
        ),
        ("JOBMIRROR_WEBHOOK_LISTEN", format!("127.0.0.1:{port}")),
        ("JOBMIRROR_WEBHOOK_SECRET", secret.expose().to_owned()),
    ];
    let cfg = jobmirror::config::Config::load_with(None, &|k| {
        env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
    })
    .unwrap();
    let (ptx, prx) = bounded(256);
    let service = Service::start(&cfg, clock.clone(), Some(ptx)).unwrap();
    // The start-up recovery listing has been answered (it finds nothing): from now on only the
    // webhook can bring the new job in before the next poll, an hour away.
    let is_listing =
        |r: &jobmirror::sandbox::LoggedRequest| r.path == "/v3/export-jobs" && r.method == "GET";
    assert!(fake.wait_for_requests(Duration::from_secs(10), |reqs| reqs.iter().any(is_listing)));
    let listing = || fake.requests().iter().filter(|r| is_listing(r)).count();

    // A user clicks Export: Pleo creates the job and sends the webhook.
    let t = std::time::Instant::now();
    let created: Value = agent()
        .post(format!("{}/v3/export-jobs", fake.base_url()))
        .header(
            "Authorization",
            &format!("Basic {}", {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD
                    .encode(format!("{}:", crate::harness::KEY))
            }),
        )
        .send_json(json!({"companyId": A, "accountingEntryIds": [
            "0000e100-0000-4000-8000-000000000001",
            "0000e100-0000-4000-8000-000000000002"
        ]}))
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap();
    let job = created["data"]["id"].as_str().unwrap().to_owned();
    let mut claimed_after = None;
    while t.elapsed() < Duration::from_secs(5) {
        match prx.recv_timeout(Duration::from_secs(5).saturating_sub(t.elapsed())) {
            Ok(rep) if rep.claimed.contains(&job) => {
                claimed_after = Some(t.elapsed());
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    service.stop(Duration::from_secs(5));
    let took = claimed_after.expect("the job was claimed");
    assert!(
        took < Duration::from_secs(2),
        "claimed {took:?} after the click"
    );
    assert_eq!(fake.started_events_for(&job), 1);
    // The recovery listing, then the company's detection the webhook triggered: no poll.
    assert_eq!(
        listing(),
        2,
        "the webhook ran the company's listing, no poll happened"
    );
    let log = fake.webhook_log();
    assert!(
        log.iter().any(|a| a.job_id == job && a.status == Some(200)),
        "{log:?}"
    );
    let outcome: String = w
        .store()
        .conn()
        .query_row("SELECT outcome FROM webhook_deliveries", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        outcome,
        "detection: company listed; the named job is pending"
    );
}

#[test]
fn a_receiver_without_a_secret_is_a_configuration_error() {
    let w = World::new();
    let env = [("JOBMIRROR_WEBHOOK_LISTEN", "127.0.0.1:0".to_owned())];
    let cfg_env: Vec<(String, String)> = vec![
        ("JOBMIRROR_PLEO_API_KEY".into(), "k".into()),
        ("JOBMIRROR_COMPANY_IDS".into(), A.into()),
        ("JOBMIRROR_WEBHOOK_LISTEN".into(), env[0].1.clone()),
    ];
    let e = jobmirror::config::Config::load_with(None, &|k| {
        cfg_env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    })
    .unwrap_err();
    assert_eq!(e.key, "webhook_secret");
    drop(w);
}

#[test]
fn the_fakes_duplicate_and_retried_deliveries_are_stored_once() {
    let w = World::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = w.client();
    let (_sub, secret) = client
        .subscribe(
            &format!("http://127.0.0.1:{port}/webhooks/pleo"),
            &["v2.export-job.created".into()],
        )
        .unwrap();
    // A second subscription nobody listens on: the fake retries it, a bounded number of times.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    client
        .subscribe(
            &format!("http://{closed}/webhooks/pleo"),
            &["v1.export-job.created".into()],
        )
        .unwrap();
    let cfg = w.config(
        &[A],
        &[
            ("JOBMIRROR_WEBHOOK_LISTEN", format!("127.0.0.1:{port}")),
            ("JOBMIRROR_WEBHOOK_SECRET", secret.expose().to_owned()),
        ],
    );
    let service = Service::start(&cfg, w.shared_clock(), None).unwrap();
    // As Pleo's events list shows them: wrapped in `payload`, the status in upper case.
    w.fake
        .set_webhook_options(jobmirror::sandbox::WebhookOptions {
            duplicate: true,
            svix_headers: true,
            attempts_max: 3,
            payload_envelope: true,
            upper_case_status: true,
            ..Default::default()
        });
    let job = w.pending(A, "dup-job", 5);
    let done = w.fake.wait_for_webhooks(Duration::from_secs(10), |log| {
        let ok = log
            .iter()
            .filter(|a| {
                a.job_id == job && a.url.contains(&format!(":{port}/")) && a.status == Some(200)
            })
            .count();
        let failed = log
            .iter()
            .filter(|a| a.url.contains(&closed.to_string()))
            .count();
        ok == 2 && failed == 6
    });
    service.stop(Duration::from_secs(5));
    assert!(done, "{:?}", w.fake.webhook_log());
    let (n, event_type): (i64, String) = w
        .store()
        .conn()
        .query_row(
            "SELECT count(*), max(event_type) FROM webhook_deliveries WHERE job_id = ?1",
            [&job],
            |x| Ok((x.get(0)?, x.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        (n, event_type.as_str()),
        (1, "v2.export-job.created"),
        "two copies, one row"
    );
    let body: Value = w
        .store()
        .conn()
        .query_row(
            "SELECT body FROM webhook_deliveries WHERE job_id = ?1",
            [&job],
            |x| x.get::<_, String>(0),
        )
        .map(|b| serde_json::from_str(&b).unwrap())
        .unwrap();
    assert_eq!(body["payload"]["data"]["status"], "PENDING", "{body}");
}

/// A Python with the `standardwebhooks` package (Standard Webhooks' own implementation), from
/// `JOBMIRROR_TEST_PYTHON` (`.ci/run` makes a venv and sets it) or `python3` on PATH. `None`
/// when there is none; `.ci/run` sets `JOBMIRROR_REQUIRE_INTEROP=1`, and then it is a failure.
fn standard_webhooks_python() -> Option<String> {
    let python = std::env::var("JOBMIRROR_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = std::process::Command::new(&python)
        .args(["-c", "import standardwebhooks"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok && std::env::var("JOBMIRROR_REQUIRE_INTEROP").is_ok_and(|v| v == "1") {
        panic!("{python} cannot import standardwebhooks (pip install standardwebhooks)");
    }
    ok.then_some(python)
}

/// Signs each (secret, webhook id, timestamp, body) with the `standardwebhooks` package.
fn sign_with_standard_webhooks(
    python: &str,
    msgs: &[(String, String, i64, String)],
) -> Vec<String> {
    const SCRIPT: &str = r#"
import datetime, json, sys
from standardwebhooks import Webhook
out = []
for secret, msg_id, ts, body in json.load(sys.stdin):
    at = datetime.datetime.fromtimestamp(ts, tz=datetime.timezone.utc)
    out.append(Webhook(secret).sign(msg_id, at, body))
print(json.dumps(out))
"#;
    let out = crate::harness::pipe_through(
        std::process::Command::new(python).args(["-c", SCRIPT]),
        json!(msgs).to_string().as_bytes(),
    );
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Waits (bounded) until Pleo has accepted `started` for every job in `jobs`; returns the
/// order in which the jobs were claimed.
fn claimed_in_order(w: &World, jobs: &[&str]) -> Vec<String> {
    let t0 = std::time::Instant::now();
    loop {
        let order: Vec<String> = w
            .fake
            .claims()
            .into_iter()
            .filter(|c| c.accepted && jobs.contains(&c.job_id.as_str()))
            .map(|c| c.job_id)
            .collect();
        if order.len() == jobs.len() {
            return order;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "claimed so far: {order:?} of {jobs:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn every_envelope_and_spelling_signed_by_standard_webhooks_runs_detection_oldest_first() {
    let Some(python) = standard_webhooks_python() else {
        eprintln!("skipped: no Python with standardwebhooks (set JOBMIRROR_TEST_PYTHON)");
        return;
    };
    // A secret whose base64 has no padding: the Standard Webhooks libraries take it.
    let padded = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(b"jobmirror interop key!!")
    };
    assert!(padded.ends_with('='), "{padded}");
    let unpadded = format!("whsec_{}", padded.trim_end_matches('='));
    let r = start(&unpadded, &[]);
    let spellings = [
        "v1.export-job.created",
        "v1.export.job-created",
        "v2.export-job.created",
        "export-job.created",
    ];
    let mut cases = Vec::new();
    for (n, spelling) in spellings.iter().enumerate() {
        for wrapped in [false, true] {
            cases.push((n * 2 + usize::from(wrapped), *spelling, wrapped));
        }
    }
    let listings = || {
        r.w.fake
            .requests()
            .iter()
            .filter(|q| q.method == "GET" && q.path == "/v3/export-jobs")
            .count()
    };
    // Polls are an hour apart: only a webhook brings a new job in.
    assert!(r.w.fake.wait_for_requests(Duration::from_secs(10), |q| {
        q.iter().any(|x| x.path == "/v3/export-jobs")
    }));
    for (n, spelling, wrapped) in cases {
        // An older job nobody announces, and a younger one the webhook names.
        let older = r.w.pending(A, &format!("env-old-{n}"), 120);
        let younger = r.w.pending(A, &format!("env-new-{n}"), 5);
        let event = json!({
            "data": {"id": younger, "companyId": A, "status": "PENDING"},
            "eventId": format!("evt_env_{n}"),
            "eventType": spelling,
        });
        let body = if wrapped {
            json!({ "payload": event })
        } else {
            event
        }
        .to_string();
        let id = format!("msg_env_{n}");
        let ts = now_secs(&r);
        let sig = sign_with_standard_webhooks(
            &python,
            &[(unpadded.clone(), id.clone(), ts, body.clone())],
        )
        .remove(0);
        let headers = vec![
            ("webhook-id", id.clone()),
            ("webhook-timestamp", ts.to_string()),
            ("webhook-signature", sig),
        ];
        let before = listings();
        for _ in 0..2 {
            let (status, text, _) = post(r.addr, "/webhooks/pleo", &headers, body.as_bytes());
            assert_eq!(status, 200, "{spelling} wrapped={wrapped}: {text}");
        }
        assert_eq!(
            claimed_in_order(&r.w, &[&older, &younger]),
            [older.clone(), younger.clone()],
            "{spelling} wrapped={wrapped}: the oldest first"
        );
        assert!(listings() > before, "the company's detection ran");
        let (rows, job_id, event_type): (i64, Option<String>, Option<String>) =
            r.w.store()
                .conn()
                .query_row(
                    "SELECT count(*), max(job_id), max(event_type) FROM webhook_deliveries WHERE webhook_id = ?1",
                    [&id],
                    |x| Ok((x.get(0)?, x.get(1)?, x.get(2)?)),
                )
                .unwrap();
        assert_eq!(rows, 1, "stored once");
        assert_eq!(job_id.as_deref(), Some(younger.as_str()));
        assert_eq!(event_type.as_deref(), Some(spelling));
    }
}

#[test]
fn another_events_data_id_is_never_filed_as_a_job() {
    let r = start(SECRET, &[]);
    for (n, wrapped) in [(0, false), (1, true)] {
        let event = json!({
            "data": {"id": "vendor-123", "companyId": A, "name": "Café Noir"},
            "eventId": format!("evt_vendor_{n}"),
            "eventType": "v1.vendor.created",
        });
        let body = if wrapped {
            json!({ "payload": event })
        } else {
            event
        }
        .to_string();
        let id = format!("msg_vendor_{n}");
        let headers = signed(SECRET, &id, now_secs(&r), body.as_bytes());
        let (status, _, _) = post(r.addr, "/webhooks/pleo", &headers, body.as_bytes());
        assert_eq!(status, 200);
        let st = r.w.store();
        let (event_type, job_id): (Option<String>, Option<String>) = st
            .conn()
            .query_row(
                "SELECT event_type, job_id FROM webhook_deliveries WHERE webhook_id = ?1",
                [&id],
                |x| Ok((x.get(0)?, x.get(1)?)),
            )
            .unwrap();
        assert_eq!(event_type.as_deref(), Some("v1.vendor.created"));
        assert_eq!(job_id, None, "a vendor id is not a job id");
        for table in ["job_events", "recent_webhooks"] {
            let filed: i64 = st
                .conn()
                .query_row(
                    &format!("SELECT count(*) FROM {table} WHERE job_id = 'vendor-123'"),
                    [],
                    |x| x.get(0),
                )
                .unwrap();
            assert_eq!(filed, 0, "{table}");
        }
        // Journaled as ignored, naming no job.
        let ignored: Option<String> = st
            .conn()
            .query_row(
                "SELECT job_id FROM job_events WHERE kind = 'webhook_ignored' \
                 AND json_extract(detail, '$.webhook_id') = ?1",
                [&id],
                |x| x.get(0),
            )
            .unwrap();
        assert_eq!(ignored, None);
    }
}

#[test]
fn a_company_pleo_refuses_never_delays_another_companys_webhook() {
    // One company's refused key (401) kept its stored delivery first in line, retried every
    // 2 s, and every other company's webhooks waited for a poll.
    const B: &str = "bbbbbbbb-0000-4000-8000-000000000002";
    let (clock, w, fake) = real_time_world();
    let keys = w.outbox().with_file_name("company-keys.toml");
    std::fs::write(&keys, format!("\"{B}\" = \"a-key-pleo-refuses\"\n")).unwrap();
    let add = |company: &str, id: &str, secs_ago: i64| {
        fake.add_job(jobmirror::sandbox::JobSpec {
            id: Some(id.into()),
            company_id: company.into(),
            created_secs_ago: Some(secs_ago),
            items: Some(2),
            ..Default::default()
        })
        .unwrap()
    };
    let b_job = add(B, "b-job", 30);
    let env = [
        ("JOBMIRROR_DB", w.db.display().to_string()),
        ("JOBMIRROR_PLEO_BASE_URL", fake.base_url()),
        ("JOBMIRROR_PLEO_API_KEY", crate::harness::KEY.to_owned()),
        ("JOBMIRROR_COMPANY_IDS", format!("{A},{B}")),
        (
            "JOBMIRROR_COMPANY_API_KEYS_FILE",
            keys.display().to_string(),
        ),
        ("JOBMIRROR_POLL_INTERVAL_SECS", "3600".to_owned()),
        ("JOBMIRROR_ADMIN_LISTEN", "127.0.0.1:0".to_owned()),
        ("JOBMIRROR_HANDLER_COMMAND", "dry-run".to_owned()),
        ("JOBMIRROR_WEBHOOK_LISTEN", "127.0.0.1:0".to_owned()),
        ("JOBMIRROR_WEBHOOK_SECRET", SECRET.to_owned()),
    ];
    let cfg = jobmirror::config::Config::load_with(None, &|k| {
        env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
    })
    .unwrap();
    let service = Service::start(&cfg, clock.clone(), None).unwrap();
    let addr = service.webhook_addr().unwrap();
    let deliver = |id: &str, company: &str, job: &str| {
        let body = json!({"data": {"id": job, "companyId": company, "status": "pending"},
                          "eventId": format!("evt_{id}"), "eventType": "v1.export-job.created"})
        .to_string();
        let headers = signed(SECRET, id, clock.now().0 / 1000, body.as_bytes());
        let (status, text, _) = post(addr, "/webhooks/pleo", &headers, body.as_bytes());
        assert_eq!(status, 200, "{text}");
    };
    // Five deliveries for the refused company first, then one for the other.
    for n in 0..5 {
        deliver(&format!("msg_b_{n}"), B, &b_job);
    }
    let a_old = add(A, "a-old", 120);
    let a_new = add(A, "a-new", 1);
    let t = std::time::Instant::now();
    deliver("msg_a", A, &a_new);
    let mut order = Vec::new();
    while t.elapsed() < Duration::from_secs(5) && order.len() < 2 {
        order = fake
            .claims()
            .into_iter()
            .filter(|c| c.accepted && (c.job_id == a_old || c.job_id == a_new))
            .map(|c| c.job_id)
            .collect();
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = t.elapsed();
    assert_eq!(order, [a_old.clone(), a_new.clone()], "after {took:?}");
    assert!(
        took < Duration::from_secs(3),
        "claimed {took:?} after its webhook"
    );
    // Every delivery of the refused company ended with an outcome an operator can read.
    let t0 = std::time::Instant::now();
    let outcomes = loop {
        let rows: Vec<Option<String>> = w
            .store()
            .conn()
            .prepare("SELECT outcome FROM webhook_deliveries WHERE company_id = ?1")
            .unwrap()
            .query_map([B], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        if rows.iter().all(Option::is_some) || t0.elapsed() > Duration::from_secs(10) {
            break rows;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    service.stop(Duration::from_secs(5));
    assert_eq!(outcomes.len(), 5);
    for o in &outcomes {
        let o = o.as_deref().unwrap_or("none");
        assert!(
            o.starts_with("not acted on: detection for company") && o.contains("401"),
            "{o}"
        );
        assert!(o.contains("(refused: not retried)"), "{o}");
    }
    // A bound on what the refused company cost: no blind retries of a 401.
    let b_requests = fake
        .requests()
        .iter()
        .filter(|r| r.query.contains(B) || r.path.contains(&b_job))
        .count();
    eprintln!("refused company: {b_requests} requests; the other's webhook claimed in {took:?}");
    assert!(
        b_requests <= 7,
        "{b_requests} requests for the refused company"
    );
    assert_eq!(fake.job(&b_job).unwrap().status, "pending");
}
