//! Many companies over a slow network, through the real binary: listings run side by side in
//! the listing pool, and a webhook-named company goes ahead of a backlog of due polls.

use std::time::Duration;

use jobmirror::sandbox::{FakePleo, JobSpec};

use crate::operations::{fake, start};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn companies(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("{i:08x}-0000-4000-8000-0000000000c5"))
        .collect()
}

/// The company a listing request names.
fn listed_company(q: &jobmirror::sandbox::LoggedRequest) -> Option<String> {
    if q.method != "GET" || q.path != "/v3/export-jobs" {
        return None;
    }
    q.query
        .split('&')
        .find_map(|kv| kv.strip_prefix("company_id="))
        .map(str::to_owned)
}

/// `jobmirror run` (as [`start`]) serving `companies`, listed in `company_ids_file`.
fn start_with(
    dir: &std::path::Path,
    f: &FakePleo,
    companies: &[String],
    extra: &[(&str, &str)],
) -> (
    crate::cli::Reaper,
    crossbeam_channel::Receiver<String>,
    Vec<String>,
) {
    let path = dir.join("companies.txt");
    std::fs::write(&path, companies.join("\n")).unwrap();
    let path = path.display().to_string();
    let mut env = vec![
        ("JOBMIRROR_COMPANY_IDS", ""),
        ("JOBMIRROR_COMPANY_IDS_FILE", path.as_str()),
    ];
    env.extend_from_slice(extra);
    let (reaper, rx, _sock, _addr, seen) = start(dir, &f.base_url(), &env);
    (reaper, rx, seen)
}

#[test]
fn listings_run_side_by_side_in_the_listing_pool() {
    let f: FakePleo = fake();
    // Every answer 100 ms late: one listing at a time could start at most 10 a second.
    f.set_latency(Duration::from_millis(100));
    let dir = tempfile::tempdir().unwrap();
    let all = companies(64);
    let (reaper, rx, mut seen) = start_with(
        dir.path(),
        &f,
        &all,
        &[
            ("JOBMIRROR_PLEO_REQUESTS_PER_SEC_MAX", "0"),
            ("JOBMIRROR_LISTING_THREADS", "8"),
        ],
    );
    crate::cli::wait_for(&rx, "recovery pass over 64 companies", &mut seen);
    drop(reaper);
    let times: Vec<i64> = f
        .requests()
        .iter()
        .filter(|q| listed_company(q).is_some())
        .map(|q| q.at.0)
        .collect();
    assert!(times.len() >= 64, "{} listings", times.len());
    // The most listings that arrived within any 100 ms: one at a time would be 1 (each waits
    // for the answer before the next); the pool's 8 threads send up to 8.
    let most = crate::operations::most_within(&times, 100);
    eprintln!("{most} listings within 100 ms");
    assert!(
        (4..=8).contains(&most),
        "{most} listings within 100 ms (8 threads, each waiting 100 ms for its answer)"
    );
}

#[test]
fn a_webhook_named_company_goes_ahead_of_a_backlog_of_due_polls() {
    let f = fake();
    f.set_latency(Duration::from_millis(10));
    let dir = tempfile::tempdir().unwrap();
    // 200 companies polled every second on a budget of 40 requests a second: polls are
    // always due, far more than the budget lets through.
    let all = companies(200);
    let (reaper, rx, mut seen) = start_with(
        dir.path(),
        &f,
        &all,
        &[
            ("JOBMIRROR_POLL_INTERVAL_SECS", "1"),
            ("JOBMIRROR_PLEO_REQUESTS_PER_SEC_MAX", "40"),
            ("JOBMIRROR_LISTING_THREADS", "4"),
            ("JOBMIRROR_WEBHOOK_LISTEN", "127.0.0.1:0"),
            ("JOBMIRROR_WEBHOOK_SECRET", SECRET),
        ],
    );
    crate::cli::wait_for(&rx, "recovery pass over 200 companies", &mut seen);
    let hook = crate::operations::hook_addr(&seen);
    // Let the backlog build: polls of other companies keep arriving.
    let before = f.requests().len();
    assert!(
        f.wait_for_requests(Duration::from_secs(20), |r| {
            r[before.min(r.len())..]
                .iter()
                .filter(|q| listed_company(q).is_some())
                .count()
                >= 40
        }),
        "routine polls go on after recovery"
    );
    let named = &all[137];
    let job = f
        .add_job(JobSpec {
            id: Some("wh-1".into()),
            company_id: named.clone(),
            items: Some(1),
            ..JobSpec::default()
        })
        .unwrap();
    let body = serde_json::json!({
        "data": f.job(&job).map(|j| j.to_json()),
        "eventId": "e1",
        "eventType": "v1.export-job.created"
    })
    .to_string();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let headers = crate::webhook::signed(SECRET, "msg_1", now, body.as_bytes());
    let at = f.requests().len();
    assert_eq!(
        crate::webhook::post(hook, "/webhooks/pleo", &headers, body.as_bytes()).0,
        200
    );
    let started = |q: &jobmirror::sandbox::LoggedRequest| {
        q.path == "/v3/export-job-events" && q.body.contains(&job) && q.body.contains("started")
    };
    assert!(
        f.wait_for_requests(Duration::from_secs(20), |r| r.iter().any(started)),
        "the webhook-named job is started"
    );
    drop(reaper);
    let reqs = f.requests();
    let until = reqs.iter().position(started).unwrap();
    let between: Vec<String> = reqs[at..until]
        .iter()
        .filter_map(listed_company)
        .filter(|c| c != named)
        .collect();
    eprintln!(
        "{} other companies listed between the webhook and `started`",
        between.len()
    );
    // Serving the due polls first would list up to 200 other companies (five seconds of the
    // budget) before this one; going ahead, only polls already under way (4 threads) and the
    // gaps between this job's own requests let a few through.
    assert!(
        between.len() <= 24,
        "{} other companies listed between the webhook and `started`",
        between.len()
    );
    let named_listed = reqs[at..until]
        .iter()
        .filter_map(listed_company)
        .any(|c| &c == named);
    assert!(named_listed, "the named company was listed for the webhook");
}

#[test]
fn the_service_lists_by_credential_when_asked() {
    let f = fake();
    let dir = tempfile::tempdir().unwrap();
    let all = companies(30);
    for (i, c) in all.iter().enumerate().take(5) {
        f.add_job(JobSpec {
            id: Some(format!("bc-{i}")),
            company_id: c.clone(),
            items: Some(1),
            ..JobSpec::default()
        })
        .unwrap();
    }
    let (reaper, rx, mut seen) = start_with(
        dir.path(),
        &f,
        &all,
        &[("JOBMIRROR_LIST_BY_CREDENTIAL", "true")],
    );
    crate::cli::wait_for(&rx, "recovery pass over 30 companies", &mut seen);
    let done = |r: &[jobmirror::sandbox::LoggedRequest]| {
        r.iter()
            .filter(|q| q.path == "/v3/export-job-events" && q.body.contains("completed"))
            .count()
            == 5
    };
    assert!(
        f.wait_for_requests(Duration::from_secs(20), done),
        "every job finished"
    );
    drop(reaper);
    let listings: Vec<String> = f
        .requests()
        .into_iter()
        .filter(|q| q.method == "GET" && q.path == "/v3/export-jobs")
        .map(|q| q.query)
        .collect();
    // Listings for all 30 (5 jobs: one page each), none per company, but for the one of each
    // company before its claim (a credential listing may have shifted between pages).
    assert!(!listings.is_empty());
    let (alone, together): (Vec<&String>, Vec<&String>) =
        listings.iter().partition(|q| q.contains("company_id"));
    assert!(
        together[0].contains("statuses=in_progress") && !together[0].contains("pending"),
        "the recovery pass lists the in_progress jobs on their own: {listings:?}"
    );
    assert_eq!(alone.len(), 5, "one before each claim: {listings:?}");
    assert!(
        alone.iter().all(|q| !q.contains("in_progress")),
        "{alone:?}"
    );
}
