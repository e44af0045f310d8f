//! The Pleo client's error handling against the fake.

use jobmirror::pleo::{Auth, ClientConfig, JobEvent, JobEventKind, PleoClient, PleoError, Secret};

use crate::harness::World;

#[test]
fn errors_keep_pleos_type_and_message_and_4xx_is_not_retried() {
    let w = World::new();
    let c = w.client();
    match c.get_job("00000000-0000-4000-8000-00000000dead") {
        Err(PleoError::Api {
            status,
            kind,
            message,
        }) => {
            assert_eq!((status, kind.as_str()), (404, "EXPORT_NOT_FOUND"));
            assert_eq!(message, "Export job not found.");
        }
        other => panic!("{other:?}"),
    }
    // An id that is not a UUID (format: uuid) is refused as a bad request, not looked up.
    match c.get_job("nope") {
        Err(PleoError::Api { status, kind, .. }) => {
            assert_eq!((status, kind.as_str()), (400, "INVALID_PARAMETER"));
        }
        other => panic!("{other:?}"),
    }
    w.pending("c", "j", 10);
    c.post_event(&JobEvent::new(JobEventKind::Started, "j"))
        .unwrap();
    let e = c
        .post_event(&JobEvent::new(JobEventKind::Started, "j"))
        .unwrap_err();
    assert!(e.is_status_conflict(), "{e}");
    assert!(!e.is_retryable());
    assert_eq!(w.fake.requests().len(), 4, "no retries of 404, 400 or 422");
    assert!(w.clock.sleeps().is_empty());
}

#[test]
fn wrong_key_is_401_once_and_the_key_never_shows() {
    let w = World::new();
    let cfg = ClientConfig::new(
        &w.fake.base_url(),
        Auth::ApiKey(Secret::new("wrong-key-123")),
    );
    let c = PleoClient::new(cfg, w.shared_clock()).unwrap();
    let e = c.list_jobs("c", &["pending"]).unwrap_err();
    assert_eq!(e.status(), Some(401));
    assert_eq!(w.fake.requests().len(), 1);
    assert!(!e.to_string().contains("wrong-key-123"));
    assert!(!format!("{c:?}").contains("wrong-key-123"));
}

#[test]
fn plain_http_off_loopback_is_refused() {
    let w = World::new();
    let cfg = ClientConfig::new("http://pleo.example.com", Auth::ApiKey(Secret::new("k")));
    let e = PleoClient::new(cfg, w.shared_clock()).unwrap_err();
    assert!(matches!(e, PleoError::Config(_)), "{e}");
}

#[test]
fn transport_errors_are_retried_a_bounded_number_of_times() {
    let w = World::new();
    // A port nobody listens on: connection refused every time.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let mut cfg = ClientConfig::new(&format!("http://{addr}"), Auth::ApiKey(Secret::new("k")));
    cfg.retry.attempts_max = 4;
    let c = PleoClient::new(cfg, w.shared_clock()).unwrap();
    let e = c.get_job("j").unwrap_err();
    assert!(matches!(e, PleoError::Transport(_)), "{e}");
    let sleeps = w.clock.sleeps();
    assert_eq!(sleeps.len(), 3, "4 attempts, 3 waits");
    // Exponential with a cap: each wait is within [cap/2, cap] of its step.
    for (i, s) in sleeps.iter().enumerate() {
        let cap = 500u128 << i;
        assert!(
            s.as_millis() >= cap / 2 && s.as_millis() <= cap,
            "wait {i}: {s:?}"
        );
    }
}

#[test]
fn a_read_that_times_out_is_retried_and_a_claim_that_times_out_is_not() {
    // Real socket timeouts (the simulation models them as lost answers, which cost no time).
    let w = World::new();
    w.pending("c", "j", 60);
    let mut cfg = w.client_config();
    cfg.request_timeout = std::time::Duration::from_millis(300);
    let c = PleoClient::new(cfg, w.shared_clock()).unwrap();
    let slow = |method: &str, path: &str| jobmirror::sandbox::FaultRule {
        skip: 0,
        method: Some(method.into()),
        path_prefix: Some(path.into()),
        fault: jobmirror::sandbox::Fault::Slow { millis: 1_500 },
    };
    w.fake.push_fault(slow("GET", "/v3/export-jobs/j"));
    let job = c.get_job("j").unwrap();
    assert_eq!(job.status, "pending");
    assert_eq!(w.clock.sleeps().len(), 1, "one timeout, one retry");
    w.fake.push_fault(slow("POST", "/v3/export-job-events"));
    let e = c
        .post_event(&JobEvent::new(JobEventKind::Started, "j"))
        .unwrap_err();
    assert!(matches!(e, PleoError::Transport(_)), "{e}");
    assert!(!e.is_unapplied(), "a timeout leaves the outcome unknown");
    assert_eq!(w.fake.started_events_for("j"), 1, "not resent");
    assert_eq!(w.clock.sleeps().len(), 1);
    // The fake applied it before its slow answer: the claim landed.
    assert_eq!(w.fake.job("j").unwrap().status, "in_progress");
}

#[test]
fn pleo_now_follows_the_date_of_pleos_answers_not_our_clock() {
    use jobmirror::clock::{OffsetClock, SharedClock};
    let w = World::new();
    let host = OffsetClock::new(w.shared_clock());
    host.jump(-600_000); // ten minutes slow
    let host: SharedClock = host;
    let c = jobmirror::pleo::PleoClient::new(w.client_config(), host.clone()).unwrap();
    // Before any answer: our clock.
    assert_eq!(c.pleo_now(), host.now());
    c.list_jobs("00000000-0000-4000-8000-0000000000c1", &["pending"])
        .unwrap();
    // After one: Pleo's (the fake's) clock, to the second its `Date` carries.
    let pleo = w.clock_now();
    assert!(
        pleo.0 - c.pleo_now().0 < 1000 && c.pleo_now() <= pleo,
        "{:?} vs {pleo:?}",
        c.pleo_now()
    );
    assert_eq!(
        jobmirror::clock::Millis::parse_http_date(&pleo.to_http_date()).unwrap(),
        jobmirror::clock::Millis(pleo.0 - pleo.0 % 1000)
    );
}
