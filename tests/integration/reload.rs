//! A reload (SIGHUP) that changes the companies alone is applied in place: a company added
//! starts with its recovery pass and its job is taken, a company removed while its job is in
//! hand finishes that job first (its handler is not interrupted), and the process is not
//! restarted.

use std::time::Duration;

use jobmirror::sandbox::LoggedRequest;

use crate::cli::{run_service, signal, slow_handler, wait_exit, wait_for};
use crate::companies::{events, job};
use crate::operations::fake;

const A: &str = "aaaaaaaa-0000-4000-8000-0000000000a1";
const B: &str = "bbbbbbbb-0000-4000-8000-0000000000b2";
const C: &str = "cccccccc-0000-4000-8000-0000000000c3";

fn listed(q: &LoggedRequest, company: &str) -> bool {
    q.method == "GET"
        && q.path == "/v3/export-jobs"
        && q.query.contains(&format!("company_id={company}"))
}

#[test]
fn a_reload_that_changes_the_companies_alone_is_applied_in_place() {
    let f = fake();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (id, company, items) in [("ra-1", A, 6), ("rb-1", B, 1), ("rc-1", C, 1)] {
        job(&f, id, company, items);
    }
    // A handler that takes 0.3 s an item, and notes each run (one line per job run).
    let handler = slow_handler(d, "0.3");
    let cfg = d.join("jobmirror.toml");
    let write = |companies: &[&str]| {
        std::fs::write(
            &cfg,
            format!(
                "db = {:?}\npleo_base_url = {:?}\npleo_api_key = {:?}\ncompany_ids = {companies:?}\nhandler_command = {:?}\nlanes = 2\n",
                d.join("jm.db").display().to_string(),
                f.base_url(),
                jobmirror::sandbox::DEFAULT_API_KEY,
                handler.display().to_string(),
            ),
        )
        .unwrap();
    };
    write(&[A, B]);
    let (mut reaper, rx) = run_service(&cfg);
    let pid = reaper.0.as_ref().unwrap().id();
    let mut seen = Vec::new();
    wait_for(&rx, "recovery pass over 2 companies", &mut seen);
    // A's six-item job is in hand (about 1.8 s of handler time): now remove A, add C.
    assert!(f.wait_for_requests(Duration::from_secs(20), |r| {
        events(r, "ra-1").contains(&"started".to_owned())
    }));
    write(&[B, C]);
    signal(reaper.0.as_ref().unwrap(), "HUP");
    wait_for(&rx, "applied in place (1 added, 1 removed", &mut seen);
    assert!(
        f.wait_for_requests(Duration::from_secs(30), |r| {
            ["ra-1", "rb-1", "rc-1"]
                .iter()
                .all(|j| events(r, j).iter().any(|e| e == "completed"))
        }),
        "A's job in hand, B's and C's jobs all finished"
    );
    wait_for(
        &rx,
        &format!("company {A} is no longer served here"),
        &mut seen,
    );
    // No restart: the same process, and no restart line.
    assert_eq!(reaper.0.as_ref().unwrap().id(), pid);
    assert!(!seen.iter().any(|l| l.contains("restarting in place")));
    let reqs = f.requests();
    for j in ["ra-1", "rb-1", "rc-1"] {
        assert_eq!(events(&reqs, j), ["started", "completed"], "job {j}");
    }
    // A's handler ran once: the reload did not interrupt the job in hand.
    let runs = std::fs::read_to_string(d.join("runs")).unwrap();
    assert_eq!(
        runs.lines().filter(|l| *l == "ra-1").count(),
        1,
        "handler runs: {runs}"
    );
    // C started with a recovery pass (pending and in_progress).
    let c_first = reqs.iter().find(|q| listed(q, C)).unwrap();
    assert!(c_first.query.contains("in_progress"), "{}", c_first.query);
    // A is no longer listed: a detection now lists B and C only, and A's new job stays put.
    job(&f, "ra-2", A, 1);
    let before = f.requests().len();
    signal(reaper.0.as_ref().unwrap(), "USR1");
    wait_for(&rx, "trigger pass over 2 companies", &mut seen);
    let after = f.requests_since(before);
    assert!(after.iter().any(|q| listed(q, B)) && after.iter().any(|q| listed(q, C)));
    assert!(
        !after.iter().any(|q| listed(q, A)),
        "A was listed after it was removed"
    );
    let child = reaper.0.take().unwrap();
    signal(&child, "TERM");
    assert!(wait_exit(child, Duration::from_secs(20)).success());
    assert!(events(&f.requests(), "ra-2").is_empty());
}
