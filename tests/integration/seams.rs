//! Issue 28: every feature keeps the contract at its seams, over the real binary against the
//! fake Pleo on loopback. Regression tests named after the defect each pins.

use std::time::Duration;

use crate::cli::{jm, run_service, slow_handler, wait_for};
use crate::companies::{events, job};
use crate::operations::fake;

const W: &str = "aaaaaaaa-0000-4000-8000-00000000aa01";
const X: &str = "bbbbbbbb-0000-4000-8000-00000000bb02";
const Y: &str = "cccccccc-0000-4000-8000-00000000cc03";

/// A configuration serving `companies` with `handler` on `lanes` lanes, no polls to speak of.
fn config(
    d: &std::path::Path,
    f: &jobmirror::sandbox::FakePleo,
    companies: &[&str],
    handler: &std::path::Path,
    lanes: u32,
) -> std::path::PathBuf {
    let cfg = d.join("jobmirror.toml");
    std::fs::write(
        &cfg,
        format!(
            "db = {:?}\npleo_base_url = {:?}\npleo_api_key = {:?}\ncompany_ids = {companies:?}\nhandler_command = {:?}\nlanes = {lanes}\npoll_interval_secs = 600\nadmin_listen = \"\"\n",
            d.join("jm.db").display().to_string(),
            f.base_url(),
            jobmirror::sandbox::DEFAULT_API_KEY,
            handler.display().to_string(),
        ),
    )
    .unwrap();
    cfg
}

/// The item updates Pleo accepted as `successful` for `job`, one entry per report of an item.
fn successes(f: &jobmirror::sandbox::FakePleo, job: &str) -> Vec<String> {
    f.requests()
        .iter()
        .filter(|q| q.method == "PUT" && q.path == format!("/v3/export-jobs/{job}/items"))
        .filter(|q| q.status == 200)
        .filter_map(|q| serde_json::from_str::<serde_json::Value>(&q.body).ok())
        .flat_map(|v| v.as_array().cloned().unwrap_or_default())
        .filter(|u| u["status"] == "successful")
        .filter_map(|u| u["accountingEntryId"].as_str().map(str::to_owned))
        .collect()
}

/// Lanes 0 and 1: X's job runs on lane 1; X is paused, Y added (to lane 1, now the emptier),
/// X resumed (the lanes tie). X goes back to the lane that still holds its job, which alone
/// runs the handler: one run, each item reported once, one final event.
#[test]
fn a_company_paused_and_resumed_while_its_job_runs_is_never_served_by_two_lanes() {
    let f = fake();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let handler = slow_handler(d, "0.8");
    let cfg = config(d, &f, &[W, X], &handler, 2);
    job(&f, "jx-1", X, 8);
    let (_reaper, rx) = run_service(&cfg);
    let mut seen = Vec::new();
    wait_for(&rx, "recovery pass over 2 companies", &mut seen);
    assert!(f.wait_for_requests(Duration::from_secs(20), |r| {
        events(r, "jx-1") == ["started"]
    }));
    let companies = |args: &[&str]| jm(&cfg, &[&["companies"], args].concat());
    companies(&["pause", X]);
    wait_for(&rx, "applied in place (0 added", &mut seen);
    companies(&["add", Y]);
    wait_for(&rx, "applied in place (1 added", &mut seen);
    companies(&["resume", X]);
    wait_for(&rx, "applied in place (1 added", &mut seen);
    assert!(
        f.wait_for_requests(Duration::from_secs(30), |r| events(r, "jx-1")
            == ["started", "completed"]),
        "{:?}",
        events(&f.requests(), "jx-1")
    );
    // A second lane would have started its run while the first one still worked (8 items at
    // 0.8 s each), so before the final event.
    let runs = std::fs::read_to_string(d.join("runs")).unwrap();
    assert_eq!(
        runs.lines().filter(|l| *l == "jx-1").count(),
        1,
        "one handler run: {runs}"
    );
    let mut items = successes(&f, "jx-1");
    let n = items.len();
    items.sort();
    items.dedup();
    assert_eq!((n, items.len()), (8, 8), "each item reported once");
    let finals = f
        .requests()
        .iter()
        .filter(|q| q.path == "/v3/export-job-events" && q.body.contains("jx-1"))
        .count();
    assert_eq!(finals, 2, "started and one final event, nothing refused");
}

/// X's first job is in hand and its second pending when X is paused; a wake (a trigger)
/// follows at once. Nothing new is claimed for X: the first job is finished, the second
/// stays pending through further detections.
#[test]
fn a_paused_company_gets_no_new_claim_whatever_wakes_the_processor() {
    let f = fake();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let handler = slow_handler(d, "0.5");
    let cfg = config(d, &f, &[X], &handler, 1);
    job(&f, "jx-1", X, 4);
    f.add_job(jobmirror::sandbox::JobSpec {
        id: Some("jx-2".into()),
        company_id: X.into(),
        created_secs_ago: Some(30),
        items: Some(1),
        ..Default::default()
    })
    .unwrap();
    let (_reaper, rx) = run_service(&cfg);
    let mut seen = Vec::new();
    wait_for(&rx, "recovery pass over 1 companies", &mut seen);
    assert!(f.wait_for_requests(Duration::from_secs(20), |r| {
        events(r, "jx-1") == ["started"]
    }));
    jm(&cfg, &["companies", "pause", X]);
    jm(&cfg, &["trigger"]);
    assert!(
        f.wait_for_requests(Duration::from_secs(30), |r| events(r, "jx-1")
            == ["started", "completed"])
    );
    wait_for(
        &rx,
        &format!("company {X} is no longer served here"),
        &mut seen,
    );
    jm(&cfg, &["trigger"]);
    wait_for(&rx, "trigger pass", &mut seen);
    jm(&cfg, &["trigger"]);
    wait_for(&rx, "trigger pass", &mut seen);
    assert!(
        events(&f.requests(), "jx-2").is_empty(),
        "no claim after the pause: {:?}",
        events(&f.requests(), "jx-2")
    );
    assert_eq!(f.job("jx-2").unwrap().status, "pending");
}

/// A pending job with 100 s left (less than `finish_margin_secs`) is claimed (202), and the
/// next five reads of it answer 503. `started` refreshed its `lastUpdatedAt` at Pleo, so it
/// has an hour: it is processed and completed, not failed for want of time.
#[test]
fn a_claim_whose_read_back_fails_keeps_the_fresh_deadline_the_claim_gave() {
    let f = fake();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let handler = slow_handler(d, "0.1");
    let cfg = config(d, &f, &[X], &handler, 1);
    f.add_job(jobmirror::sandbox::JobSpec {
        id: Some("jx-late".into()),
        company_id: X.into(),
        created_secs_ago: Some(3500),
        last_updated_secs_ago: Some(3500),
        expires_in: Some(3600),
        items: Some(2),
        ..Default::default()
    })
    .unwrap();
    // The read before the claim goes through; the five after it (the read-back and its
    // retries) answer 503.
    for skip in [1, 0, 0, 0, 0] {
        f.push_fault(jobmirror::sandbox::FaultRule {
            method: Some("GET".into()),
            path_prefix: Some("/v3/export-jobs/jx-late".into()),
            fault: jobmirror::sandbox::Fault::Refused { status: 503 },
            skip,
        });
    }
    let (_reaper, rx) = run_service(&cfg);
    let mut seen = Vec::new();
    wait_for(&rx, "recovery pass over 1 companies", &mut seen);
    assert!(
        f.wait_for_requests(Duration::from_secs(30), |r| events(r, "jx-late").len() >= 2),
        "the job was finished"
    );
    let sent = f
        .requests()
        .iter()
        .filter(|q| q.path == "/v3/export-job-events" && q.body.contains("jx-late"))
        .map(|q| q.body.clone())
        .collect::<Vec<_>>();
    assert_eq!(
        events(&f.requests(), "jx-late"),
        ["started", "completed"],
        "{sent:?}"
    );
    let reads_503 = f
        .requests()
        .iter()
        .filter(|q| q.method == "GET" && q.path == "/v3/export-jobs/jx-late" && q.status == 503)
        .count();
    assert_eq!(reads_503, 5, "the read-back did fail");
}

/// The token endpoint refuses the OAuth *client* (`invalid_client`) for a while. That says
/// nothing about the customer's grant (RFC 6749 section 5.2): the refresh token is kept (not
/// marked refused), the refusal is loud (an ERROR, `doctor` fails, `/healthz` degraded, the
/// gauge), and once the endpoint accepts the client again jobmirror recovers by itself.
#[test]
fn a_refused_oauth_client_ends_no_pair_and_recovers_by_itself() {
    use crate::operations::http_get;
    let f = fake();
    f.enable_oauth("cid", "csecret", "the-customers-grant", 3600);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let db = d.join("jm.db");
    std::fs::write(d.join("refresh.token"), "the-customers-grant\n").unwrap();
    let handler = slow_handler(d, "0.05");
    let cfg = d.join("jobmirror.toml");
    std::fs::write(
        &cfg,
        format!(
            "db = {:?}\npleo_base_url = {:?}\npleo_auth = \"oauth\"\npleo_oauth_token_url = \"{}/oauth/token\"\npleo_oauth_client_id = \"cid\"\npleo_oauth_client_secret = \"csecret\"\npleo_oauth_refresh_token_file = {:?}\ncompany_ids = [{X:?}]\nhandler_command = {:?}\npoll_interval_secs = 600\nadmin_listen = \"127.0.0.1:0\"\n",
            db.display().to_string(),
            f.base_url(),
            f.base_url(),
            d.join("refresh.token").display().to_string(),
            handler.display().to_string(),
        ),
    )
    .unwrap();
    job(&f, "jx-1", X, 1);
    let (_reaper, rx) = run_service(&cfg);
    let mut seen = Vec::new();
    wait_for(&rx, "admin listener on http://", &mut seen);
    let admin = crate::company_oauth::admin_addr(&seen);
    assert!(
        f.wait_for_requests(Duration::from_secs(20), |r| events(r, "jx-1")
            == ["started", "completed"])
    );
    // The app's secret is rotated at the endpoint and the access tokens revoked: the next
    // request needs a refresh, and the endpoint refuses the client.
    f.set_oauth_client_secret("rotated");
    f.revoke_access_tokens();
    job(&f, "jx-2", X, 1);
    jm(&cfg, &["trigger"]);
    wait_for(&rx, "refuses the client", &mut seen);
    let refused_line = seen
        .iter()
        .find(|l| l.contains("refuses the client"))
        .unwrap();
    assert!(refused_line.contains("ERROR"), "{refused_line}");
    let (status, body) = http_get(&admin, "/healthz");
    assert_eq!(status, 503, "{body}");
    let (_, metrics) = http_get(&admin, "/metrics");
    assert!(metrics.contains("\njobmirror_oauth_client_refused 1\n"));
    let doctor = crate::cli::cmd()
        .arg("--config")
        .arg(&cfg)
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    assert_eq!(doctor.status.code(), Some(1));
    let text = String::from_utf8_lossy(&doctor.stdout);
    assert!(text.contains("\"oauth_client\""), "{text}");
    let refused_at: Option<i64> = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row(
            "SELECT refused_at FROM oauth_tokens WHERE credential = 'default'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        refused_at, None,
        "the customer's grant is not marked refused"
    );

    // The endpoint accepts the client again: within the backoff jobmirror refreshes with the
    // pair it kept, and the waiting job is taken.
    f.set_oauth_client_secret("csecret");
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while events(&f.requests(), "jx-2") != ["started", "completed"] {
        assert!(
            std::time::Instant::now() < deadline,
            "not recovered: {:?}",
            events(&f.requests(), "jx-2")
        );
        jm(&cfg, &["trigger"]);
        f.wait_for_requests(Duration::from_secs(1), |r| events(r, "jx-2").len() == 2);
    }
    let (status, _) = http_get(&admin, "/healthz");
    assert_eq!(status, 200);
    let doctor = crate::cli::cmd()
        .arg("--config")
        .arg(&cfg)
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&doctor.stdout);
    assert!(!text.contains("\"oauth_client\""), "{text}");
}

/// An item report is applied at Pleo but its answer is lost (a 504 from a gateway). Reporting
/// pauses; before it resumes, the job's items are read, and what Pleo already shows finished
/// is not sent again: every item is reported `successful` exactly once.
#[test]
fn a_report_whose_answer_was_lost_is_not_sent_again_before_the_items_are_read() {
    let f = fake();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Results come while the handler runs, and are reported every second: the lost answer
    // is met in the middle of the run, and reporting resumes in the same run.
    let handler = slow_handler(d, "0.4");
    let cfg = config(d, &f, &[X], &handler, 1);
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str("report_flush_secs = 1\n");
    std::fs::write(&cfg, text).unwrap();
    job(&f, "jx-lost", X, 10);
    f.push_fault(jobmirror::sandbox::FaultRule {
        method: Some("PUT".into()),
        path_prefix: Some("/v3/export-jobs/jx-lost/items".into()),
        fault: jobmirror::sandbox::Fault::GatewayTimeout,
        skip: 0,
    });
    let (_reaper, rx) = run_service(&cfg);
    let mut seen = Vec::new();
    wait_for(&rx, "recovery pass over 1 companies", &mut seen);
    assert!(
        f.wait_for_requests(Duration::from_secs(40), |r| events(r, "jx-lost")
            == ["started", "completed"]),
        "{:?}",
        events(&f.requests(), "jx-lost")
    );
    let puts: Vec<_> = f
        .requests()
        .iter()
        .filter(|q| q.method == "PUT" && q.path == "/v3/export-jobs/jx-lost/items")
        .map(|q| q.status)
        .collect();
    assert_eq!(
        puts.first(),
        Some(&504),
        "the first report's answer was lost: {puts:?}"
    );
    // Applied at Pleo: the 504's request and every 200.
    let applied: Vec<String> = f
        .requests()
        .iter()
        .filter(|q| q.method == "PUT" && q.path == "/v3/export-jobs/jx-lost/items")
        .filter(|q| q.status == 200 || q.status == 504)
        .flat_map(|q| serde_json::from_str::<Vec<serde_json::Value>>(&q.body).unwrap_or_default())
        .filter(|u| u["status"] == "successful")
        .map(|u| u["accountingEntryId"].as_str().unwrap_or("").to_owned())
        .collect();
    let mut entries = applied.clone();
    let n = entries.len();
    entries.sort();
    entries.dedup();
    assert_eq!(
        (n, entries.len()),
        (10, 10),
        "each success applied once: {applied:?}"
    );
    let runs = std::fs::read_to_string(d.join("runs")).unwrap();
    assert_eq!(runs.lines().count(), 1, "one handler run: {runs}");
}

/// The handler works on a job whose deadline comes within `deadline_warning_secs` during the
/// run: the `deadline_warning` is journaled while it works (once), not only between runs.
#[test]
fn the_deadline_warning_is_journaled_while_the_handler_works() {
    let f = fake();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let handler = slow_handler(d, "0.5");
    let cfg = config(d, &f, &[X], &handler, 1);
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    // Claimed with 200 s to go: the warning is due a second into the run, which takes 8 s
    // (before the first report, which refreshes the deadline at the fake).
    text.push_str("deadline_warning_secs = 199\nfinish_margin_secs = 10\n");
    std::fs::write(&cfg, text).unwrap();
    f.add_job(jobmirror::sandbox::JobSpec {
        id: Some("jx-warn".into()),
        company_id: X.into(),
        created_secs_ago: Some(60),
        expires_in: Some(200),
        items: Some(16),
        ..Default::default()
    })
    .unwrap();
    let (_reaper, rx) = run_service(&cfg);
    let mut seen = Vec::new();
    wait_for(&rx, "recovery pass over 1 companies", &mut seen);
    // Logged after the finish is journaled.
    wait_for(&rx, "jx-warn of company", &mut seen);
    wait_for(&rx, "sent completed", &mut seen);
    assert_eq!(events(&f.requests(), "jx-warn"), ["started", "completed"]);
    let conn = rusqlite::Connection::open(d.join("jm.db")).unwrap();
    let kinds: Vec<String> = conn
        .prepare(
            "SELECT kind FROM job_events WHERE job_id = 'jx-warn' \
             AND kind IN ('processing_started', 'deadline_warning', 'finish_sent') ORDER BY seq",
        )
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    // Between the start of processing and the finish: warnings, one per deadline (the fake
    // refreshes lastUpdatedAt on item reports, so a later report may move it).
    let warnings = kinds.iter().filter(|k| *k == "deadline_warning").count();
    assert!(warnings >= 1, "{kinds:?}");
    assert_eq!(
        kinds.first().map(String::as_str),
        Some("processing_started")
    );
    assert_eq!(kinds.last().map(String::as_str), Some("finish_sent"));
    let deadlines: i64 = conn
        .query_row(
            "SELECT count(DISTINCT json_extract(detail, '$.expires_at')) FROM job_events \
             WHERE job_id = 'jx-warn' AND kind = 'deadline_warning'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(deadlines as usize, warnings, "once per deadline");
}

/// Pleo's files type `company_id` as a UUID: a company id that is not one is a configuration
/// error naming where it came from, not a 400 from Pleo at the first listing.
#[test]
fn a_company_id_that_is_not_a_uuid_is_a_configuration_error_naming_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = d.join("jobmirror.toml");
    let write = |companies: &str| {
        std::fs::write(
            &cfg,
            format!(
                "db = {:?}\npleo_api_key = \"k\"\n{companies}\nhandler_command = \"dry-run\"\n",
                d.join("jm.db").display().to_string()
            ),
        )
        .unwrap()
    };
    let check = || {
        crate::cli::cmd()
            .arg("--config")
            .arg(&cfg)
            .arg("check-config")
            .output()
            .unwrap()
    };
    // The demo's company id before this fix: the hex digits end in "delta".
    write("company_ids = [\"dddddddd-0000-4000-8000-0000000delta\"]");
    let out = check();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("company_ids") && err.contains("UUID"), "{err}");
    let file = d.join("companies.txt");
    std::fs::write(&file, format!("{X}\nacme\n")).unwrap();
    write(&format!(
        "company_ids_file = {:?}",
        file.display().to_string()
    ));
    let out = check();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("companies.txt:2"), "{err}");
    let out = crate::cli::cmd()
        .env("JOBMIRROR_DB", d.join("jm.db"))
        .args(["companies", "add", "acme"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("UUID"));
    assert!(
        !d.join("jm.db").exists(),
        "nothing created for a refused id"
    );
}

/// W and X served, listed by credential, by a fake whose cursors are positions, with a page of
/// another company's pending jobs (`jz-000` to `jz-099`, Z's) listed before anything of ours.
fn crowded_by_credential() -> (
    jobmirror::sandbox::FakePleo,
    tempfile::TempDir,
    std::path::PathBuf,
) {
    let f = fake();
    f.use_offset_cursors();
    let dir = tempfile::tempdir().unwrap();
    let handler = slow_handler(dir.path(), "0");
    let cfg = config(dir.path(), &f, &[W, X], &handler, 1);
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str("list_by_credential = true\n");
    std::fs::write(&cfg, text).unwrap();
    const Z: &str = "dddddddd-0000-4000-8000-0000000000dd";
    for i in 0..100 {
        f.add_job(jobmirror::sandbox::JobSpec {
            id: Some(format!("jz-{i:03}")),
            company_id: Z.into(),
            created_secs_ago: Some(3000 - i),
            items: Some(1),
            ..Default::default()
        })
        .unwrap();
    }
    (f, dir, cfg)
}

/// Listing by credential, with cursors that are positions (Pleo does not say how its cursors
/// behave when the result set changes): 100 pending jobs of a company this service does not
/// serve fill page 1, our own `in_progress` job of X sits just past it, and another
/// integration fails a job on page 1 between the pages (it leaves the listing). The recovery pass still sees X's
/// job (its `in_progress` jobs are listed on their own, in one answer) and resumes it without
/// `started`.
#[test]
fn recovery_by_credential_sees_our_in_progress_job_though_the_listing_shifts() {
    let (f, _dir, cfg) = crowded_by_credential();
    f.add_job(jobmirror::sandbox::JobSpec {
        id: Some("jx-held".into()),
        company_id: X.into(),
        status: "in_progress".into(),
        created_secs_ago: Some(600),
        last_updated_secs_ago: Some(60),
        items: Some(2),
        ..Default::default()
    })
    .unwrap();
    f.fail_after_first_page("jz-000");
    let (_reaper, rx) = run_service(&cfg);
    let mut seen = Vec::new();
    wait_for(&rx, "recovery pass over 2 companies", &mut seen);
    assert!(
        f.wait_for_requests(Duration::from_secs(20), |r| events(r, "jx-held")
            == ["completed"]),
        "our in_progress job was resumed (without started) and finished: {:?}",
        events(&f.requests(), "jx-held")
    );
    assert_eq!(
        f.job("jz-000").unwrap().status,
        "failed",
        "the shift did happen"
    );
}

/// Listing by credential, the pending listing shifts between its pages: X's older job slides
/// onto page 1 after page 1 was answered and is missed, its younger one is seen. Before the
/// claim X is listed by itself, so the older job is claimed first.
#[test]
fn a_shifted_credential_listing_never_lets_a_younger_job_be_claimed_first() {
    let (f, _dir, cfg) = crowded_by_credential();
    let (_reaper, rx) = run_service(&cfg);
    let mut seen = Vec::new();
    wait_for(&rx, "recovery pass over 2 companies", &mut seen);
    for (id, ago) in [("jx-older", 200), ("jx-younger", 100)] {
        f.add_job(jobmirror::sandbox::JobSpec {
            id: Some(id.into()),
            company_id: X.into(),
            created_secs_ago: Some(ago),
            items: Some(1),
            ..Default::default()
        })
        .unwrap();
    }
    f.claim_after_first_page("jz-000");
    jm(&cfg, &["trigger"]);
    assert!(
        f.wait_for_requests(Duration::from_secs(20), |r| {
            events(r, "jx-older").len() == 2 && events(r, "jx-younger").len() == 2
        }),
        "{:?} {:?}",
        events(&f.requests(), "jx-older"),
        events(&f.requests(), "jx-younger")
    );
    assert_eq!(
        f.job("jz-000").unwrap().status,
        "in_progress",
        "the shift did happen"
    );
    let started: Vec<String> = f
        .requests()
        .iter()
        .filter(|q| q.path == "/v3/export-job-events" && q.body.contains("\"started\""))
        .filter_map(|q| serde_json::from_str::<serde_json::Value>(&q.body).ok())
        .filter_map(|v| v["jobId"].as_str().map(str::to_owned))
        .filter(|id| id.starts_with("jx-"))
        .collect();
    assert_eq!(started, ["jx-older", "jx-younger"], "oldest first");
}

/// One lane: W's long export holds it while X's pending job runs out its time at Pleo. The
/// job that expired unstarted is journaled `expired_waiting` beside `expired`, and counted.
#[test]
fn a_job_that_expires_waiting_for_a_lane_is_journaled_and_counted() {
    let f = fake();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let handler = slow_handler(d, "0.5");
    let cfg = config(d, &f, &[W, X], &handler, 1);
    job(&f, "jw-long", W, 12);
    f.add_job(jobmirror::sandbox::JobSpec {
        id: Some("jx-short".into()),
        company_id: X.into(),
        created_secs_ago: Some(1),
        expires_in: Some(4),
        items: Some(1),
        ..Default::default()
    })
    .unwrap();
    let (_reaper, rx) = run_service(&cfg);
    let mut seen = Vec::new();
    wait_for(&rx, "recovery pass over 2 companies", &mut seen);
    assert!(
        f.wait_for_requests(Duration::from_secs(30), |r| events(r, "jw-long")
            == ["started", "completed"])
    );
    assert_eq!(f.job("jx-short").unwrap().status, "failed");
    let db = d.join("jm.db");
    let kinds = || -> Vec<String> {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.prepare("SELECT kind FROM job_events WHERE job_id = 'jx-short' ORDER BY seq")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !kinds().iter().any(|k| k == "expired_waiting") {
        assert!(std::time::Instant::now() < deadline, "{:?}", kinds());
        jm(&cfg, &["trigger"]);
        wait_for(&rx, "trigger pass", &mut seen);
    }
    let k = kinds();
    let expired = k
        .iter()
        .position(|k| k == "expired")
        .expect("expired journaled");
    assert_eq!(
        k.get(expired + 1).map(String::as_str),
        Some("expired_waiting"),
        "{k:?}"
    );
    assert!(!k.iter().any(|k| k == "claimed"), "never taken: {k:?}");
    assert!(events(&f.requests(), "jx-short").is_empty());
    let counted: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row(
            "SELECT n FROM journal_counts WHERE kind = 'expired_waiting'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(counted, 1);
}

/// A job found by a triggered listing is journaled as detected by `trigger`, not `poll`.
#[test]
fn a_job_detected_by_a_trigger_is_journaled_with_that_source() {
    let f = fake();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let handler = slow_handler(d, "0");
    let cfg = config(d, &f, &[X], &handler, 1);
    let (_reaper, rx) = run_service(&cfg);
    let mut seen = Vec::new();
    wait_for(&rx, "recovery pass over 1 companies", &mut seen);
    job(&f, "jx-trig", X, 1);
    jm(&cfg, &["trigger"]);
    assert!(
        f.wait_for_requests(Duration::from_secs(20), |r| events(r, "jx-trig")
            == ["started", "completed"])
    );
    let source: String = rusqlite::Connection::open(d.join("jm.db"))
        .unwrap()
        .query_row(
            "SELECT json_extract(detail, '$.source') FROM job_events \
             WHERE job_id = 'jx-trig' AND kind = 'detected'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(source, "trigger");
}
