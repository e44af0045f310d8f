//! Companies as data (`jobmirror companies`), over the real binary: a company added while the
//! service runs has its pending job claimed without a restart; one removed while its job is
//! in hand finishes that job first (journaled); a paused company is not served until resumed;
//! a company's own API key is used for it.

use std::time::Duration;

use jobmirror::sandbox::{JobSpec, LoggedRequest};

use crate::cli::{cmd, jm, run_service, slow_handler, wait_for};
use crate::operations::fake;

const A: &str = "aaaaaaaa-0000-4000-8000-0000000000a1";
const B: &str = "bbbbbbbb-0000-4000-8000-0000000000b2";
const C: &str = "cccccccc-0000-4000-8000-0000000000c3";

/// The job events Pleo accepted for `job`, in order.
pub(crate) fn events(reqs: &[LoggedRequest], job: &str) -> Vec<String> {
    reqs.iter()
        .filter(|q| q.path == "/v3/export-job-events" && q.status == 202)
        .filter_map(|q| serde_json::from_str::<serde_json::Value>(&q.body).ok())
        .filter(|v| v["jobId"] == job)
        .filter_map(|v| v["event"].as_str().map(str::to_owned))
        .collect()
}

/// A pending job of `company` with `items` items, created a minute ago, at the fake.
pub(crate) fn job(f: &jobmirror::sandbox::FakePleo, id: &str, company: &str, items: usize) {
    f.add_job(JobSpec {
        id: Some(id.into()),
        company_id: company.into(),
        created_secs_ago: Some(60),
        items: Some(items),
        ..JobSpec::default()
    })
    .unwrap();
}

/// The customer authorizes the integration at the fake and the operator runs `companies add
/// ID --oauth-refresh-token-file` with the refresh token it got; its stdout.
pub(crate) fn add_with_oauth(
    f: &jobmirror::sandbox::FakePleo,
    cfg: &std::path::Path,
    dir: &std::path::Path,
    company: &str,
) -> String {
    let token = f.authorize_company(company).unwrap();
    // Only `run` and `migrate` create the database.
    jm(cfg, &["migrate"]);
    let file = dir.join("refresh-token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    let file = file.display().to_string();
    jm(
        cfg,
        &[
            "companies",
            "add",
            company,
            "--oauth-refresh-token-file",
            &file,
        ],
    )
}

/// The journal's company-level rows and the finish of `job`, in order: (kind, company).
fn journal(db: &std::path::Path, job: &str) -> Vec<(String, String)> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut st = conn
        .prepare(
            "SELECT kind, coalesce(company_id, '') FROM job_events \
             WHERE (job_id IS NULL AND kind LIKE 'company_%') OR (job_id = ?1 AND kind = 'finish_sent') \
             ORDER BY seq",
        )
        .unwrap();
    st.query_map([job], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[test]
fn companies_added_removed_and_paused_while_the_service_runs_take_effect_without_a_restart() {
    let f = fake();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let db = d.join("jm.db");
    // A handler that takes 0.3 s an item and notes each run.
    let handler = slow_handler(d, "0.3");
    let cfg = d.join("jobmirror.toml");
    std::fs::write(
        &cfg,
        format!(
            "db = {:?}\npleo_base_url = {:?}\npleo_api_key = {:?}\ncompany_ids = [{A:?}]\nhandler_command = {:?}\nlanes = 2\npoll_interval_secs = 600\nadmin_listen = \"\"\n",
            db.display().to_string(),
            f.base_url(),
            jobmirror::sandbox::DEFAULT_API_KEY,
            handler.display().to_string(),
        ),
    )
    .unwrap();
    let companies = |args: &[&str]| jm(&cfg, &[&["companies"], args].concat());
    job(&f, "ja-1", A, 1);
    job(&f, "jb-1", B, 1);
    let (reaper, rx) = run_service(&cfg);
    let pid = reaper.0.as_ref().unwrap().id();
    let mut seen = Vec::new();
    wait_for(&rx, "recovery pass over 1 companies", &mut seen);
    assert!(f.wait_for_requests(Duration::from_secs(20), |r| events(r, "ja-1").len() == 2));
    assert!(
        events(&f.requests(), "jb-1").is_empty(),
        "B is not served yet"
    );

    // B is added while the service runs, with a key of its own: its job is claimed with it.
    f.add_company_key("key-of-b", B);
    std::fs::write(d.join("b.key"), "key-of-b\n").unwrap();
    let out = companies(&[
        "add",
        B,
        "--api-key-file",
        d.join("b.key").to_str().unwrap(),
    ]);
    assert!(out.contains("added"), "{out}");
    wait_for(&rx, "applied in place (1 added", &mut seen);
    assert!(
        f.wait_for_requests(Duration::from_secs(20), |r| events(r, "jb-1")
            == ["started", "completed"]),
        "B's pending job was claimed and completed without a restart"
    );
    let b_auth: Vec<bool> = f
        .requests()
        .iter()
        .filter(|q| q.path == "/v3/export-job-events" && q.body.contains("jb-1"))
        .map(|q| q.status == 202)
        .collect();
    assert!(b_auth.iter().all(|ok| *ok));
    // Adding it again changes nothing.
    let again = companies(&[
        "add",
        B,
        "--api-key-file",
        d.join("b.key").to_str().unwrap(),
        "--json",
    ]);
    assert!(again.contains("\"unchanged\""), "{again}");

    // C is added; its six-item job (about 1.8 s of handler time) is in hand when C is removed.
    job(&f, "jc-1", C, 6);
    companies(&["add", C]);
    assert!(f.wait_for_requests(Duration::from_secs(20), |r| {
        events(r, "jc-1").contains(&"started".to_owned())
    }));
    let out = companies(&["remove", C]);
    assert!(out.contains("removed"), "{out}");
    wait_for(&rx, "1 removed", &mut seen);
    assert!(
        f.wait_for_requests(Duration::from_secs(30), |r| events(r, "jc-1")
            == ["started", "completed"]),
        "C's job in hand was finished"
    );
    wait_for(
        &rx,
        &format!("company {C} is no longer served here"),
        &mut seen,
    );
    let runs = std::fs::read_to_string(d.join("runs")).unwrap();
    assert_eq!(runs.lines().filter(|l| *l == "jc-1").count(), 1, "{runs}");
    // Journaled: removed, then the job's finish, then the company left.
    let j = journal(&db, "jc-1");
    let pos = |kind: &str| {
        j.iter()
            .position(|(k, c)| k == kind && (c == C || kind == "finish_sent"))
    };
    let (removed, finished, left) = (
        pos("company_removed").expect("company_removed journaled"),
        pos("finish_sent").expect("finish_sent journaled"),
        pos("company_left").expect("company_left journaled"),
    );
    assert!(removed < finished && finished < left, "{j:?}");
    // C is no longer listed: its new job stays put through a detection.
    job(&f, "jc-2", C, 1);
    let before = f.requests().len();
    jm(&cfg, &["trigger"]);
    assert!(f.wait_for_requests(Duration::from_secs(20), |r| {
        r[before..]
            .iter()
            .any(|q| q.path == "/v3/export-jobs" && q.query.contains(A))
    }));
    assert!(
        !f.requests()[before..]
            .iter()
            .any(|q| q.path == "/v3/export-jobs" && q.query.contains(C)),
        "a removed company is not listed"
    );

    // A (named in the configuration) is paused: not served until resumed.
    companies(&["pause", A]);
    wait_for(
        &rx,
        &format!("company {A} is no longer served here"),
        &mut seen,
    );
    job(&f, "ja-2", A, 1);
    let list = companies(&["list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let row = |id: &str| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|r| r["company_id"] == id)
            .cloned()
            .unwrap()
    };
    assert_eq!(row(A)["source"], "both");
    assert_eq!(row(A)["state"], "paused");
    assert_eq!(row(B)["source"], "database");
    assert_eq!(row(B)["credential"], "api_key");
    assert!(
        !list.contains("key-of-b"),
        "no secret in the listing: {list}"
    );
    assert!(v.as_array().unwrap().iter().all(|r| r["company_id"] != C));
    // A detection while A is paused lists B alone, and A's job stays put.
    let before = f.requests().len();
    jm(&cfg, &["trigger"]);
    wait_for(&rx, "trigger pass over 1 companies", &mut seen);
    assert!(
        !f.requests()[before..]
            .iter()
            .any(|q| q.path == "/v3/export-jobs" && q.query.contains(A)),
        "a paused company is not listed"
    );
    assert!(
        events(&f.requests(), "ja-2").is_empty(),
        "nothing sent for a paused company"
    );
    companies(&["resume", A]);
    wait_for(&rx, "applied in place (1 added", &mut seen);
    assert!(
        f.wait_for_requests(Duration::from_secs(20), |r| events(r, "ja-2")
            == ["started", "completed"]),
        "A's job is taken once A is resumed"
    );
    assert!(events(&f.requests(), "jc-2").is_empty());

    // One process throughout.
    assert_eq!(reaper.0.as_ref().unwrap().id(), pid);
    assert!(!seen.iter().any(|l| l.contains("restarting in place")));
    assert!(
        !seen.iter().any(|l| l.contains("key-of-b")),
        "no key in the log"
    );
}

#[test]
fn companies_commands_refuse_bad_input_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("jm.db");
    let run = |args: &[&str]| {
        cmd()
            .env("JOBMIRROR_DB", &db)
            .arg("companies")
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["add", "not a company"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a company id"));
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let out = run(&["add", A, "--api-key-file", empty.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is empty"));
    // OAuth needs the OAuth app's settings, or the service could never refresh the pair.
    std::fs::write(&empty, "a-refresh-token\n").unwrap();
    let out = run(&[
        "add",
        A,
        "--oauth-refresh-token-file",
        empty.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("pleo_auth"), "{err}");
    assert!(!err.contains("a-refresh-token"), "{err}");
    // Only `run` and `migrate` create a database: a command pointed at a missing one names
    // the path it looked for and changes nothing.
    let out = run(&["add", A]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        err.contains(&format!("database {} does not exist", db.display())),
        "{err}"
    );
    assert!(!db.exists(), "a refused command created the database");
    let out = cmd()
        .env("JOBMIRROR_DB", &db)
        .arg("migrate")
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = run(&["remove", A]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not in the database"));
    let out = run(&["pause", A]);
    assert_eq!(out.status.code(), Some(2));
    // Nothing was added by the refused commands.
    let listed = run(&["list", "--json"]);
    assert!(listed.status.success());
    assert_eq!(String::from_utf8_lossy(&listed.stdout).trim(), "[]");
}

#[test]
fn subscribe_all_gives_each_company_one_subscription_and_its_secret_joins_the_receiver() {
    let f = fake();
    f.enable_oauth("cid", "csecret", "default-refresh", 3600);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = d.join("jobmirror.toml");
    std::fs::write(
        d.join("hook.secret"),
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n",
    )
    .unwrap();
    std::fs::write(d.join("default.token"), "default-refresh\n").unwrap();
    std::fs::write(
        &cfg,
        format!(
            "db = {:?}\npleo_base_url = {:?}\npleo_auth = \"oauth\"\npleo_oauth_token_url = \"{}/oauth/token\"\npleo_oauth_client_id = \"cid\"\npleo_oauth_client_secret = \"csecret\"\npleo_oauth_refresh_token_file = {:?}\ncompany_ids = [{A:?}]\nhandler_command = \"dry-run\"\npoll_interval_secs = 600\nwebhook_listen = \"127.0.0.1:0\"\nwebhook_secret_file = {:?}\nadmin_listen = \"\"\n",
            d.join("jm.db").display().to_string(),
            f.base_url(),
            f.base_url(),
            d.join("default.token").display().to_string(),
            d.join("hook.secret").display().to_string(),
        ),
    )
    .unwrap();
    let jm = |args: &[&str]| jm(&cfg, args);
    for c in [B, C] {
        add_with_oauth(&f, &cfg, d, c);
    }
    let (_reaper, rx) = run_service(&cfg);
    let mut seen = Vec::new();
    wait_for(&rx, "webhook receiver listening on", &mut seen);
    wait_for(&rx, "recovery pass over 3 companies", &mut seen);
    let url = format!(
        "http://{}/webhooks/pleo",
        crate::operations::hook_addr(&seen)
    );

    // A served with the default credential is not --all's to subscribe; B and C each get one,
    // made with their own tokens (the service keeps refreshing them meanwhile).
    let out = jm(&["subscribe", "--all", "--url", &url, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["failed"], 0, "{v}");
    assert_eq!(v["default_credential_companies"], 1, "{v}");
    let changes: Vec<&str> = v["companies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["change"].as_str().unwrap())
        .collect();
    assert_eq!(changes, ["created", "created"], "{v}");
    // Idempotent: again, and for one company, nothing new at Pleo.
    let again = jm(&["subscribe", "--all", "--url", &url, "--json"]);
    assert!(!again.contains("created"), "{again}");
    let one = jm(&["subscribe", "--company", B, "--url", &url]);
    assert!(one.contains("reused"), "{one}");
    let posts = f
        .requests()
        .iter()
        .filter(|q| q.method == "POST" && q.path == "/v1/subscriptions")
        .count();
    assert_eq!(posts, 2, "one subscription per company");
    assert!(
        !out.contains("whsec_") && !again.contains("whsec_"),
        "no secret printed"
    );
    let err = cmd()
        .arg("--config")
        .arg(&cfg)
        .args(["subscribe", "--company", A, "--url", &url])
        .output()
        .unwrap();
    assert_eq!(err.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&err.stderr).contains("default credential"));

    // The receiver takes C's secret within seconds: C's new job, announced only to C's
    // subscription and signed with its secret, is claimed from the webhook (polls are 10
    // minutes apart).
    wait_for(&rx, "companies changed in the database", &mut seen);
    job(&f, "jc-hook", C, 1);
    assert!(
        f.wait_for_requests(Duration::from_secs(20), |r| events(r, "jc-hook")
            == ["started", "completed"]),
        "C's webhook was accepted and its job taken"
    );
    let log = f.webhook_log();
    let to_c: Vec<_> = log.iter().filter(|a| a.job_id == "jc-hook").collect();
    assert!(
        !to_c.is_empty()
            && to_c
                .iter()
                .all(|a| a.status == Some(204) || a.status == Some(200) || a.status == Some(202)),
        "{to_c:?}"
    );
    assert!(
        !seen.iter().any(|l| l.contains("refused: bad signature")),
        "{seen:?}"
    );
}
