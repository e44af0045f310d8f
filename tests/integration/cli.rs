//! The real binary: exit codes, signals, status, migrate, the demo and the fake server.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, unbounded};
use jobmirror::clock::{SharedClock, SystemClock};
use jobmirror::sandbox::{FakeConfig, FakePleo, JobSpec};

const BIN: &str = env!("CARGO_BIN_EXE_jobmirror");

pub(crate) fn cmd() -> Command {
    let mut c = Command::new(BIN);
    clean_env(&mut c);
    c
}

/// An empty environment but `PATH` and libfaketime's variables: a suite run under
/// `faketime` (as CI does, a month ahead) gives the binary the same shifted clock as the tests.
pub(crate) fn clean_env(c: &mut Command) -> &mut Command {
    c.env_clear();
    for (k, v) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k == "PATH" || k == "LD_PRELOAD" || k.starts_with("FAKETIME") {
            c.env(k, v);
        }
    }
    c
}

/// Runs a command to its end, asserts that it succeeded (showing both streams if it did not)
/// and returns what it printed on stdout.
pub(crate) fn succeeds(c: &mut Command) -> String {
    let out = c.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Runs a command to its end, asserts that it failed and returns its exit code and stderr.
pub(crate) fn fails(c: &mut Command) -> (Option<i32>, String) {
    let out = c.output().unwrap();
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Lines of a child's stream, as they come.
pub(crate) fn lines(stream: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = unbounded();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            match line {
                Ok(l) => {
                    if tx.send(l).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    rx
}

/// Waits (bounded) for a line containing `needle`; returns every line read so far.
pub(crate) fn wait_for(rx: &Receiver<String>, needle: &str, seen: &mut Vec<String>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                let hit = l.contains(needle);
                seen.push(l);
                if hit {
                    return;
                }
            }
            Err(_) => panic!(
                "no line containing {needle:?} within 20 s; got:\n{}",
                seen.join("\n")
            ),
        }
    }
}

/// `jobmirror --config CFG ARGS...`, asserted to succeed; its stdout.
pub(crate) fn jm(cfg: &std::path::Path, args: &[&str]) -> String {
    succeeds(cmd().arg("--config").arg(cfg).args(args))
}

/// `jobmirror --config CFG run` with its log at info on a pipe: the child (killed if the test
/// fails first) and its log lines as they come.
pub(crate) fn run_service(cfg: &std::path::Path) -> (Reaper, Receiver<String>) {
    let mut child = cmd()
        .arg("--config")
        .arg(cfg)
        .arg("run")
        .env("JOBMIRROR_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines(child.stderr.take().unwrap());
    (Reaper(Some(child)), rx)
}

/// A handler that takes `secs` an item and notes each run (the job id, a line in
/// `dir/runs`); its readiness check passes.
pub(crate) fn slow_handler(dir: &std::path::Path, secs: &str) -> std::path::PathBuf {
    let handler = dir.join("handler.sh");
    std::fs::write(
        &handler,
        format!(
            r#"#!/bin/sh
[ "$1" = --check ] && exit 0
echo "$JOBMIRROR_JOB_ID" >> {runs}
while read -r line; do
  case "$line" in *'"type":"item"'*) ;; *) continue ;; esac
  e=$(printf '%s' "$line" | sed -n 's/.*"accountingEntryId":"\([^"]*\)".*/\1/p')
  sleep {secs}
  printf '{{"accountingEntryId":"%s","status":"successful"}}\n' "$e"
done
"#,
            runs = dir.join("runs").display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&handler, std::fs::Permissions::from_mode(0o755)).unwrap();
    handler
}

/// Kills the child if the test fails before it exits, so no orphan keeps cargo's pipes open.
pub(crate) struct Reaper(pub Option<Child>);
impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub(crate) fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(ok.success());
}

pub(crate) fn wait_exit(mut child: Child, within: Duration) -> std::process::ExitStatus {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let pid = child.id();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    match rx.recv_timeout(within) {
        Ok(s) => s.unwrap(),
        Err(_) => {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
            panic!("process did not exit within {within:?}");
        }
    }
}

#[test]
fn configuration_errors_exit_2_with_one_line_naming_the_key() {
    let out = cmd()
        .arg("run")
        .env("JOBMIRROR_PLEO_API_KEY", "k")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("company_ids") && err.contains("JOBMIRROR_COMPANY_IDS"),
        "{err}"
    );

    let out = cmd()
        .arg("run")
        .env("JOBMIRROR_PLEO_API_KEY", "k")
        .env(
            "JOBMIRROR_COMPANY_IDS",
            "cccccccc-0000-4000-8000-00000000000c",
        )
        .env("JOBMIRROR_HANDLER_COMMAND", "outbox:/tmp/x")
        .env("JOBMIRROR_POLL_INTERVAL_SECS", "-5")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("JOBMIRROR_POLL_INTERVAL_SECS"));

    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.toml");
    std::fs::write(
        &f,
        "pleo_api_key = \"k\"\ncompany_ids = \"cccccccc-0000-4000-8000-00000000000c\"\npoll_interval = 5\n",
    )
    .unwrap();
    let out = cmd().arg("--config").arg(&f).arg("run").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("poll_interval"));

    let out = cmd().arg("no-such-command").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn run_detects_on_sigusr1_claims_and_stops_cleanly_on_sigterm() {
    let clock: SharedClock = Arc::new(SystemClock);
    let secret = "sk-live-DO-NOT-LOG-4242";
    let fake = FakePleo::start(
        "127.0.0.1:0",
        FakeConfig {
            api_keys: vec![secret.into()],
            ..FakeConfig::default()
        },
        clock,
    )
    .unwrap();
    let company = "aaaaaaaa-0000-4000-8000-000000000001";
    fake.add_job(JobSpec {
        id: Some("held".into()),
        company_id: company.into(),
        status: "in_progress".into(),
        created_secs_ago: Some(60),
        ..Default::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The folder exists (as systemd's StateDirectory does): a missing one is refused.
    std::fs::create_dir(dir.path().join("state")).unwrap();
    let db = dir.path().join("state").join("jobmirror.db");
    let mut child = cmd()
        .arg("run")
        .env("JOBMIRROR_DB", &db)
        .env("JOBMIRROR_PLEO_BASE_URL", fake.base_url())
        .env("JOBMIRROR_PLEO_API_KEY", secret)
        .env("JOBMIRROR_COMPANY_IDS", company)
        .env("JOBMIRROR_POLL_INTERVAL_SECS", "3600")
        .env("JOBMIRROR_ADMIN_LISTEN", "127.0.0.1:0")
        // A new database for a job held before: as after losing the database.
        .env("JOBMIRROR_RESUME_UNKNOWN_IN_PROGRESS", "true")
        .env(
            "JOBMIRROR_HANDLER_COMMAND",
            format!("outbox:{}", dir.path().join("outbox").display()),
        )
        .env("JOBMIRROR_LOG", "trace")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines(child.stderr.take().unwrap());
    let mut reaper = Reaper(Some(child));
    let mut seen = Vec::new();
    wait_for(
        &rx,
        "recovery pass over 1 companies: 1 jobs seen, 1 new",
        &mut seen,
    );
    wait_for(&rx, "resumed in_progress job held", &mut seen);
    wait_for(
        &rx,
        "job held of company aaaaaaaa-0000-4000-8000-000000000001: sent completed",
        &mut seen,
    );

    // A job appears; with an hour between polls, SIGUSR1 makes jobmirror look now.
    fake.add_job(JobSpec {
        id: Some("fresh".into()),
        company_id: company.into(),
        created_secs_ago: Some(5),
        ..Default::default()
    })
    .unwrap();
    signal(reaper.0.as_ref().unwrap(), "USR1");
    wait_for(
        &rx,
        "trigger pass over 1 companies: 1 jobs seen, 1 new",
        &mut seen,
    );
    wait_for(&rx, "claimed job fresh", &mut seen);
    wait_for(
        &rx,
        "job fresh of company aaaaaaaa-0000-4000-8000-000000000001: sent completed",
        &mut seen,
    );
    assert_eq!(fake.started_events_for("fresh"), 1);
    assert_eq!(fake.started_events_for("held"), 0);

    // `jobmirror trigger` finds the running service through the database and does the same.
    fake.add_job(JobSpec {
        id: Some("third".into()),
        company_id: company.into(),
        created_secs_ago: Some(1),
        ..Default::default()
    })
    .unwrap();
    let said = succeeds(cmd().arg("trigger").env("JOBMIRROR_DB", &db));
    assert!(said.contains("run detection now"));
    wait_for(
        &rx,
        "trigger pass over 1 companies: 1 jobs seen, 1 new",
        &mut seen,
    );
    wait_for(
        &rx,
        "job third of company aaaaaaaa-0000-4000-8000-000000000001: sent completed",
        &mut seen,
    );
    for job in ["held", "fresh", "third"] {
        let files = std::fs::read_dir(dir.path().join("outbox").join(job))
            .unwrap()
            .count();
        assert_eq!(files, 1, "the outbox holds the item of {job}");
        assert_eq!(fake.job(job).unwrap().status, "completed");
    }

    let child = reaper.0.take().unwrap();
    signal(&child, "TERM");
    let status = wait_exit(child, Duration::from_secs(15));
    seen.extend(rx.iter());
    assert_eq!(status.code(), Some(0), "{}", seen.join("\n"));
    assert!(seen.iter().any(|l| l.contains("stopped cleanly")));
    let all = seen.join("\n");
    use base64::Engine;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{secret}:"));
    assert!(
        !all.contains(secret) && !all.contains(&basic),
        "the API key reached the log"
    );
    assert!(
        all.contains("[TRACE]") || all.contains("[DEBUG]"),
        "the log really was verbose"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&db).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    // `status` reads the same database.
    let out = cmd()
        .arg("status")
        .env("JOBMIRROR_DB", &db)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains(&format!("company {company}")), "{text}");
    assert!(text.contains("jobs:          done=3"), "{text}");
    assert!(text.contains("next deadline: none"), "{text}");
    let out = cmd()
        .args(["status", "--json"])
        .env("JOBMIRROR_DB", &db)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["companies"][0]["jobs_by_state"]["done"], 3);
    assert!(v["companies"][0]["next_deadline"].is_null());
}

#[test]
fn migrate_creates_the_schema_and_status_refuses_a_missing_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("m.db");
    let said = succeeds(cmd().arg("migrate").env("JOBMIRROR_DB", &db));
    for m in [
        "applied V1__core",
        "applied V2__webhooks",
        "applied V3__job_items",
    ] {
        assert!(said.contains(m), "{said}");
    }
    // A second run has nothing left to apply.
    let again = cmd()
        .arg("migrate")
        .env("JOBMIRROR_DB", &db)
        .output()
        .unwrap();
    assert!(again.status.success());
    assert!(!String::from_utf8_lossy(&again.stdout).contains("applied"));
    let conn = rusqlite::Connection::open(&db).unwrap();
    for t in ["export_jobs", "job_events", "sync_runs"] {
        let n: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = ?1",
                [t],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 1, "{t}");
    }
    let out = cmd()
        .arg("status")
        .env("JOBMIRROR_DB", dir.path().join("none.db"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    // A database that exists but cannot be reached is not reported as missing.
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let (code, err) = fails(cmd().arg("status").env("JOBMIRROR_DB", file.join("x.db")));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("cannot be read") && !err.contains("does not exist"),
        "{err}"
    );
    // A mistyped folder is refused, not created.
    let typo = dir.path().join("no-such-folder/m.db");
    let (code, err) = fails(cmd().arg("migrate").env("JOBMIRROR_DB", &typo));
    assert_ne!(code, Some(0));
    assert!(err.contains("does not exist"), "{err}");
    assert!(!typo.parent().unwrap().exists());
}

#[test]
fn demo_runs_to_the_end_against_the_bundled_fake() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("demo.db");
    let out = cmd().arg("demo").arg("--db").arg(&db).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{text}\n{log}");
    // A job whose every item the outbox refused wrote nothing: nothing to sync, no ERROR.
    assert!(!log.contains("outbox: cannot sync"), "{log}");
    let line = |id: &str| {
        text.lines()
            .find(|l| l.contains(&format!("job {id}")))
            .unwrap_or_else(|| panic!("{id} missing:\n{text}"))
            .to_owned()
    };
    // acme: resumed without started; bravo: conflict, then the rest; charlie: too late, then the rest.
    let expect = [
        (
            "a0000000-0000-4000-8000-000000000001",
            "pleo=completed             jobmirror=done       started sent 0x  items ok 2 failed 0",
        ),
        (
            "a0000000-0000-4000-8000-000000000002",
            "pleo=completed             jobmirror=done       started sent 1x  items ok 4 failed 0",
        ),
        (
            "b0000000-0000-4000-8000-000000000001",
            "pleo=in_progress           jobmirror=conflict   started sent 1x",
        ),
        (
            "b0000000-0000-4000-8000-000000000002",
            "pleo=completed_with_errors jobmirror=done       started sent 1x  items ok 2 failed 1",
        ),
        (
            "c0000000-0000-4000-8000-000000000000",
            "pleo=completed             jobmirror=done       started sent 1x  items ok 2 failed 0",
        ),
        (
            "c0000000-0000-4000-8000-000000000001",
            "pleo=completed             jobmirror=done       started sent 1x  items ok 7 failed 0",
        ),
        (
            "c0000000-0000-4000-8000-000000000002",
            "pleo=failed                jobmirror=done       started sent 1x  items ok 0 failed 1",
        ),
    ];
    for (id, want) in expect {
        assert!(line(id).contains(want), "{id}: {}", line(id));
    }
    assert!(text.contains(&db.display().to_string()));
    // delta: its only job arrived by webhook and was claimed, with no poll due for 5 minutes.
    assert!(
        text.contains("announced by a signed webhook and claimed"),
        "{text}"
    );
    let delta = text
        .lines()
        .skip_while(|l| !l.starts_with("company dddddddd"))
        .nth(1)
        .unwrap();
    assert!(
        delta.contains("pleo=completed") && delta.contains("started sent 1x  items ok 3 failed 0"),
        "{delta}"
    );
    // The outbox holds one file per exported item.
    let files = std::fs::read_dir(
        dir.path()
            .join("outbox")
            .join("c0000000-0000-4000-8000-000000000001"),
    )
    .unwrap()
    .count();
    assert_eq!(files, 7);
    // Why did it fail? `show` names the job's failure and each failed item's reason.
    let show = succeeds(
        cmd()
            .args(["show", "c0000000-0000-4000-8000-000000000002"])
            .env("JOBMIRROR_DB", &db),
    );
    assert!(
        show.contains("  failure:      validation_failure: all 1 items failed"),
        "{show}"
    );
    let block = show
        .split("failed or refused items:\n")
        .nth(1)
        .unwrap_or_else(|| panic!("{show}"));
    assert!(
        block
            .lines()
            .next()
            .unwrap()
            .contains("failed  account_unknown: accounting line 1 has no account"),
        "{show}"
    );
    // Everything is in the .db file itself: a copy of it alone has every row.
    let wal = std::fs::metadata(format!("{}-wal", db.display())).map_or(0, |m| m.len());
    assert_eq!(wal, 0, "the demo left {wal} bytes in the WAL");
    let copy = dir.path().join("copy.db");
    std::fs::copy(&db, &copy).unwrap();
    let rows = |p: &std::path::Path| -> i64 {
        rusqlite::Connection::open(p)
            .unwrap()
            .query_row("SELECT count(*) FROM job_events", [], |r| r.get(0))
            .unwrap()
    };
    assert!(rows(&copy) > 0);
    assert_eq!(rows(&copy), rows(&db));
    // The sqlite3 commands it prints work as printed (sqlite3 3.41+ refuses double-quoted
    // string literals).
    let hints: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("sqlite3 "))
        .collect();
    assert_eq!(hints.len(), 2, "{text}");
    if tool_here("sqlite3") {
        for h in hints {
            let run = Command::new("sh").arg("-c").arg(h).output().unwrap();
            assert!(
                run.status.success() && !run.stdout.is_empty(),
                "{h}: {}",
                String::from_utf8_lossy(&run.stderr)
            );
        }
    }
}

#[test]
fn the_readmes_audit_commands_run_against_a_demo_database() {
    if !tool_here("sqlite3") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("demo.db");
    succeeds(cmd().arg("demo").arg("--db").arg(&db));
    let readme = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/database.md"),
    )
    .unwrap();
    let section = readme
        .split("## Auditing with sqlite3")
        .nth(1)
        .unwrap()
        .split("```sh\n")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    // One command per `sqlite3` line, continuation lines joined.
    let mut commands: Vec<String> = Vec::new();
    for line in section.lines() {
        if line.starts_with("sqlite3 ") {
            commands.push(line.to_owned());
        } else if line.starts_with("  ") {
            commands.last_mut().unwrap().push_str(line);
        }
    }
    assert!(commands.len() >= 6, "{commands:?}");
    for c in &commands {
        let c = c.replace("JOB-ID", "c0000000-0000-4000-8000-000000000002");
        let out = Command::new("sh")
            .arg("-c")
            .arg(&c)
            .env("DB", &db)
            .output()
            .unwrap();
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{c}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Whether a command-line tool the tests can use is installed; with
/// `JOBMIRROR_REQUIRE_TOOLS=1` (CI) a missing one fails the test instead of skipping its part.
pub(crate) fn tool_here(name: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("JOBMIRROR_REQUIRE_TOOLS").is_none(),
            "{name} is not installed and JOBMIRROR_REQUIRE_TOOLS is set"
        );
        eprintln!("{name} not installed: that part of the test is skipped");
    }
    found
}

#[test]
fn fake_pleo_command_serves_a_fixture_and_stops_on_sigterm() {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/demo.json");
    let mut child = cmd()
        .args(["fake-pleo", "--listen", "127.0.0.1:0", "--fixture"])
        .arg(&fixture)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rx = lines(child.stdout.take().unwrap());
    let mut reaper = Reaper(Some(child));
    let mut seen = Vec::new();
    wait_for(&rx, "listening on", &mut seen);
    let url = seen.last().unwrap().rsplit(' ').next().unwrap().to_owned();
    assert!(seen.iter().any(|l| l.contains("loaded 10 jobs")));
    let clock: SharedClock = Arc::new(SystemClock);
    let client = jobmirror::pleo::PleoClient::new(
        jobmirror::pleo::ClientConfig::new(
            &url,
            jobmirror::pleo::Auth::ApiKey(jobmirror::pleo::Secret::new("demo-key")),
        ),
        clock,
    )
    .unwrap();
    let listing = client
        .list_jobs("cccccccc-0000-4000-8000-0000000000c3", &["pending"])
        .unwrap();
    assert_eq!(listing.jobs.len(), 4);
    let child = reaper.0.take().unwrap();
    signal(&child, "TERM");
    assert!(wait_exit(child, Duration::from_secs(10)).success());

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"version": 9, "jobs": []}"#).unwrap();
    let (code, err) = fails(
        cmd()
            .args(["fake-pleo", "--listen", "127.0.0.1:0", "--fixture"])
            .arg(&bad),
    );
    assert_eq!(code, Some(2));
    assert!(err.contains("version 9"), "{err}");
}

/// A fake Pleo on the real clock that takes the API key `k`.
fn fake_on_the_real_clock() -> FakePleo {
    let clock: SharedClock = Arc::new(SystemClock);
    FakePleo::start(
        "127.0.0.1:0",
        FakeConfig {
            api_keys: vec!["k".into()],
            ..FakeConfig::default()
        },
        clock,
    )
    .unwrap()
}

#[test]
fn subscribe_registers_the_endpoint_and_writes_the_secret_privately() {
    let fake = fake_on_the_real_clock();
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("webhook-secret");
    let stdout = succeeds(
        cmd()
            .args([
                "subscribe",
                "--url",
                "https://jobmirror.example.com/webhooks/pleo",
                "--secret-file",
            ])
            .arg(&secret_file)
            .env("JOBMIRROR_PLEO_BASE_URL", fake.base_url())
            .env("JOBMIRROR_PLEO_API_KEY", "k")
            .env(
                "JOBMIRROR_COMPANY_IDS",
                "cccccccc-0000-4000-8000-00000000000c",
            ),
    );
    let secret = std::fs::read_to_string(&secret_file).unwrap();
    assert!(secret.starts_with("whsec_"));
    assert!(jobmirror::edge::webhook::Secrets::parse(&secret).is_ok());
    assert!(!stdout.contains(secret.trim()), "the secret is not printed");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&secret_file)
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
    }
    let posted = fake
        .requests()
        .into_iter()
        .find(|r| r.path == "/v1/subscriptions" && r.method == "POST")
        .unwrap();
    let body: serde_json::Value = serde_json::from_str(&posted.body).unwrap();
    assert_eq!(
        body["endpointUrl"],
        "https://jobmirror.example.com/webhooks/pleo"
    );
    assert_eq!(body["eventTypes"][0], "v1.export-job.created");
    // A plain-http public URL is refused before anything is sent.
    let out = cmd()
        .args([
            "subscribe",
            "--url",
            "http://jobmirror.example.com/webhooks/pleo",
            "--secret-file",
        ])
        .arg(&secret_file)
        .env("JOBMIRROR_PLEO_BASE_URL", fake.base_url())
        .env("JOBMIRROR_PLEO_API_KEY", "k")
        .env(
            "JOBMIRROR_COMPANY_IDS",
            "cccccccc-0000-4000-8000-00000000000c",
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn subscribe_is_idempotent_and_subscriptions_can_be_listed_and_deleted() {
    // Run twice, subscribe created two subscriptions and overwrote the secret file with the
    // second one's secret while Pleo still delivered with the first.
    let fake = fake_on_the_real_clock();
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("webhook-secret");
    let url = "https://jobmirror.example.com/webhooks/pleo";
    let run = |args: &[&str]| {
        let mut c = cmd();
        c.args(args)
            .env("JOBMIRROR_PLEO_BASE_URL", fake.base_url())
            .env("JOBMIRROR_PLEO_API_KEY", "k")
            .env(
                "JOBMIRROR_COMPANY_IDS",
                "cccccccc-0000-4000-8000-00000000000c",
            );
        c
    };
    let file = secret_file.to_str().unwrap();
    let first = succeeds(&mut run(&[
        "subscribe",
        "--url",
        url,
        "--secret-file",
        file,
    ]));
    assert!(first.contains("created"), "{first}");
    let secret = std::fs::read_to_string(&secret_file).unwrap();
    let second = succeeds(&mut run(&[
        "subscribe",
        "--url",
        url,
        "--secret-file",
        file,
    ]));
    assert!(
        second.contains("reused") && second.contains("unchanged"),
        "{second}"
    );
    assert_eq!(std::fs::read_to_string(&secret_file).unwrap(), secret);
    let listed: serde_json::Value =
        serde_json::from_str(&succeeds(&mut run(&["subscriptions", "list", "--json"]))).unwrap();
    let subs = listed.as_array().unwrap();
    assert_eq!(subs.len(), 1, "{listed}");
    assert_eq!(subs[0]["endpointUrl"], url);
    // Another event type for the same URL: the subscription is updated, not duplicated.
    let third = succeeds(&mut run(&[
        "subscribe",
        "--url",
        url,
        "--secret-file",
        file,
        "--event-type",
        "v2.export-job.created",
    ]));
    assert!(third.contains("updated"), "{third}");
    let text = succeeds(&mut run(&["subscriptions", "list"]));
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        text.contains("v1.export-job.created,v2.export-job.created"),
        "{text}"
    );
    // A path the receiver does not serve is refused before anything is sent.
    let before = fake.requests().len();
    let (code, err) = fails(&mut run(&[
        "subscribe",
        "--url",
        "https://jobmirror.example.com/hooks",
        "--secret-file",
        file,
    ]));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("/webhooks/pleo"), "{err}");
    assert_eq!(fake.requests().len(), before);
    // Delete it: nothing is listed any more; deleting again is an error.
    let id = subs[0]["id"].as_str().unwrap();
    let out = succeeds(&mut run(&["subscriptions", "delete", id]));
    assert!(out.contains(id), "{out}");
    assert_eq!(
        succeeds(&mut run(&["subscriptions", "list"])).trim(),
        "no subscriptions"
    );
    let (code, err) = fails(&mut run(&["subscriptions", "delete", id]));
    assert_ne!(code, Some(0));
    assert!(err.contains("404"), "{err}");
}

#[test]
fn trigger_without_a_running_service_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("m.db");
    assert!(
        cmd()
            .arg("migrate")
            .env("JOBMIRROR_DB", &db)
            .status()
            .unwrap()
            .success()
    );
    let out = cmd()
        .arg("trigger")
        .env("JOBMIRROR_DB", &db)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no running jobmirror"));
}

#[test]
fn operator_commands_run_with_the_units_configuration_and_environment() {
    // With the shipped configuration (webhook_listen set) and the unit's environment
    // (JOBMIRROR_PLEO_API_KEY_FILE, a webhook secret file that does not exist yet), prune,
    // doctor, why and record exited 2 on settings they never use, and subscribe could not
    // write the secret file it was asked for.
    let fake = fake_on_the_real_clock();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("jobmirror.toml");
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/jobmirror.toml"),
    )
    .unwrap();
    std::fs::write(&config, &shipped).unwrap();
    assert!(
        shipped.contains("\nwebhook_listen = "),
        "the shipped file has a receiver"
    );
    let key_file = dir.path().join("pleo-api-key");
    std::fs::write(&key_file, "k\n").unwrap();
    let secret_file = dir.path().join("webhook-secret");
    let db = dir.path().join("jobmirror.db");
    let unit = |args: &[&str], key_file: &std::path::Path| {
        let mut c = cmd();
        c.arg("--config")
            .arg(&config)
            .args(args)
            .env("JOBMIRROR_DB", &db)
            .env("JOBMIRROR_PLEO_BASE_URL", fake.base_url())
            .env("JOBMIRROR_PLEO_API_KEY_FILE", key_file)
            .env("JOBMIRROR_WEBHOOK_SECRET_FILE", &secret_file);
        c
    };
    succeeds(&mut unit(&["migrate"], &key_file));
    // An operator's shell cannot read the unit's credentials: the commands that do not talk
    // to Pleo do not read them.
    let unreadable = dir.path().join("credentials/pleo-api-key");
    succeeds(&mut unit(&["prune"], &unreadable));
    succeeds(&mut unit(&["status"], &unreadable));
    let doctor = unit(&["doctor", "--json"], &unreadable).output().unwrap();
    assert_ne!(
        doctor.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&doctor.stderr)
    );
    // why gets past the configuration to the database (which has no such job).
    let (_, err) = fails(&mut unit(
        &["why", "00000000-0000-4000-8000-0000000000aa"],
        &unreadable,
    ));
    assert!(
        err.contains("no job") && !err.contains("pleo_api_key"),
        "{err}"
    );
    // record needs Pleo and the companies, not the webhook secret.
    let snap = dir.path().join("snapshot.json");
    let out = succeeds(&mut unit(
        &["record", "--out", snap.to_str().unwrap()],
        &key_file,
    ));
    assert!(out.contains("recorded 0 open jobs of 1 companies"), "{out}");
    // subscribe, from a fresh install: the secret file it writes need not exist beforehand.
    assert!(!secret_file.exists());
    let out = succeeds(&mut unit(
        &[
            "subscribe",
            "--url",
            "https://jobmirror.example.com/webhooks/pleo",
        ],
        &key_file,
    ));
    assert!(out.contains("created"), "{out}");
    let secret = std::fs::read_to_string(&secret_file).unwrap();
    assert!(secret.starts_with("whsec_"), "{secret}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&secret_file)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // The service itself still needs everything: with the file in place it loads; without a
    // key it is a configuration error naming the setting.
    let (code, err) = fails(&mut unit(&["run"], &unreadable));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("pleo_api_key_file"), "{err}");
}

#[test]
fn logs_carry_syslog_priorities_under_the_journal_and_json_is_one_object_a_line() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("l.db");
    // stderr into a file whose device and inode JOURNAL_STREAM names, as systemd sets it up.
    let log = dir.path().join("stderr.log");
    let file = std::fs::File::create(&log).unwrap();
    let meta = file.metadata().unwrap();
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    let status = cmd()
        .arg("migrate")
        .env("JOBMIRROR_DB", &db)
        .env("JOURNAL_STREAM", &stream)
        .stdout(Stdio::null())
        .stderr(file)
        .status()
        .unwrap();
    assert!(status.success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.is_empty());
    for line in text.lines() {
        assert!(line.starts_with("<6>20"), "{line}");
    }
    // Elsewhere (JOURNAL_STREAM naming another file, as when a child of the service's
    // stderr is redirected): no prefix, and fixed-width UTC times.
    let out = cmd()
        .arg("migrate")
        .env("JOBMIRROR_DB", dir.path().join("m.db"))
        .env("JOURNAL_STREAM", &stream)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!text.is_empty());
    for line in text.lines() {
        let ts = line.split(' ').next().unwrap();
        assert_eq!(ts.len(), "2026-12-02T08:00:00.000Z".len(), "{line}");
        assert!(ts.ends_with('Z') && line.contains(" [INFO] "), "{line}");
    }
    // log_format = "json" under the journal: one object a line and nothing before it (the
    // priority is a field), what a line is about in fields of its own; jq reads the stream.
    let fake = fake_on_the_real_clock();
    let company = "aaaaaaaa-0000-4000-8000-000000000001";
    fake.add_job(JobSpec {
        id: Some("json-job-1".into()),
        company_id: company.into(),
        created_secs_ago: Some(60),
        ..Default::default()
    })
    .unwrap();
    let log = dir.path().join("json.log");
    let file = std::fs::File::create(&log).unwrap();
    let meta = file.metadata().unwrap();
    let child = cmd()
        .arg("run")
        .env("JOBMIRROR_DB", &db)
        .env("JOBMIRROR_PLEO_BASE_URL", fake.base_url())
        .env("JOBMIRROR_PLEO_API_KEY", "k")
        .env("JOBMIRROR_COMPANY_IDS", company)
        .env("JOBMIRROR_HANDLER_COMMAND", "dry-run")
        .env("JOBMIRROR_LOG_FORMAT", "json")
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .unwrap();
    let reaper = Reaper(Some(child));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !std::fs::read_to_string(&log)
        .unwrap()
        .contains("claimed job json-job-1")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    drop(reaper);
    let text = std::fs::read_to_string(&log).unwrap();
    let mut claimed = None;
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(line.starts_with("{\"ts\":"), "{line}");
        assert!(
            v["ts"].is_string() && v["level"].is_string() && v["msg"].is_string(),
            "{line}"
        );
        let want = match v["level"].as_str().unwrap() {
            "error" => 3,
            "warn" => 4,
            "info" => 6,
            _ => 7,
        };
        assert_eq!(v["priority"], want, "{line}");
        if v["msg"]
            .as_str()
            .unwrap()
            .starts_with("claimed job json-job-1")
        {
            claimed = Some(v);
        }
    }
    let claimed = claimed.unwrap_or_else(|| panic!("{text}"));
    assert_eq!(claimed["job_id"], "json-job-1", "{claimed}");
    assert_eq!(claimed["company_id"], company, "{claimed}");
    // jq, line by line, as a shipper would read the journal's stream.
    if tool_here("jq") {
        let out = std::process::Command::new("jq")
            .args(["-r", "select(.job_id != null) | .job_id"])
            .arg(&log)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l == "json-job-1"),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[test]
fn one_consistent_command_line_version_db_check_config_json_and_no_overwrite() {
    // --version names the commit the binary was built from.
    let v = succeeds(cmd().arg("--version"));
    let commit = v
        .split("(commit ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .unwrap_or_else(|| panic!("{v}"));
    assert!(
        commit == "unknown"
            || commit.trim_end_matches("-dirty").len() == 12
                && commit
                    .trim_end_matches("-dirty")
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit()),
        "{v}"
    );
    // --db wins over JOBMIRROR_DB, for every command.
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("flag.db");
    let out = succeeds(
        cmd()
            .args(["--db", db.to_str().unwrap(), "migrate", "--json"])
            .env("JOBMIRROR_DB", dir.path().join("env.db")),
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["applied"].as_array().unwrap().len() >= 9, "{v}");
    assert!(db.exists() && !dir.path().join("env.db").exists());
    succeeds(cmd().args(["status", "--db", db.to_str().unwrap()]));
    // check-config: the effective settings, secrets masked, where each came from.
    let file = dir.path().join("c.toml");
    std::fs::write(&file, "poll_interval_secs = 120\nhandler_command = \"dry-run\"\ncompany_ids = [\"aaaaaaaa-0000-4000-8000-000000000001\"]\n").unwrap();
    let check = |extra: &[(&str, &str)]| {
        let mut c = cmd();
        c.args(["--config", file.to_str().unwrap(), "check-config", "--json"])
            .env("JOBMIRROR_PLEO_API_KEY", "super-secret-key");
        for (k, v) in extra {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let out = check(&[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("super-secret-key"), "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let s = &v["settings"];
    assert_eq!(
        s["pleo_api_key"],
        serde_json::json!({"value": "***", "from": "env"})
    );
    assert_eq!(
        s["poll_interval_secs"],
        serde_json::json!({"value": "120", "from": "file"})
    );
    assert_eq!(s["lanes"]["from"], "default");
    let bad = check(&[("JOBMIRROR_POLL_INTERVAL_SECS", "soon")]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("poll_interval_secs"));
    // record --out keeps an existing file unless told.
    let fake = fake_on_the_real_clock();
    let snap = dir.path().join("snap.json");
    std::fs::write(&snap, "keep me").unwrap();
    let record = |force: bool| {
        let mut c = cmd();
        c.args(["record", "--out", snap.to_str().unwrap(), "--json"])
            .env("JOBMIRROR_PLEO_BASE_URL", fake.base_url())
            .env("JOBMIRROR_PLEO_API_KEY", "k")
            .env(
                "JOBMIRROR_COMPANY_IDS",
                "aaaaaaaa-0000-4000-8000-000000000001",
            );
        if force {
            c.arg("--force");
        }
        c.output().unwrap()
    };
    let refused = record(false);
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--force"));
    assert_eq!(std::fs::read_to_string(&snap).unwrap(), "keep me");
    let forced = record(true);
    assert!(forced.status.success());
    let v: serde_json::Value = serde_json::from_slice(&forced.stdout).unwrap();
    assert_eq!(
        (v["jobs"].as_u64(), v["companies"].as_u64()),
        (Some(0), Some(1))
    );
    assert_ne!(std::fs::read_to_string(&snap).unwrap(), "keep me");
}

#[test]
fn a_closed_stdout_ends_a_report_quietly() {
    // `jobmirror status --json | head -c 10`: the reader goes away before the report is
    // written. Every try ends quietly (SIGPIPE, as any Unix tool), never a panic (exit 101).
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("p.db");
    succeeds(cmd().arg("migrate").env("JOBMIRROR_DB", &db));
    for args in [&["status", "--json"][..], &["jobs", "--json"], &["doctor"]] {
        for _ in 0..10 {
            let mut child = cmd()
                .args(args)
                .env("JOBMIRROR_DB", &db)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            // The pipe's read end closed before anything is read.
            drop(child.stdout.take());
            let out = child.wait_with_output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!err.contains("panicked"), "{args:?}: {err}");
            assert_ne!(out.status.code(), Some(101), "{args:?}: {err}");
            assert!(
                out.status.success()
                    || out.status.signal() == Some(libc::SIGPIPE)
                    || out.status.code() == Some(1) && args[0] == "doctor",
                "{args:?}: {:?} {err}",
                out.status
            );
        }
    }
}

#[test]
fn the_configuration_page_is_generated_from_the_keys() {
    // docs/configuration.md is made from config::KEYS, so the page and the code cannot drift.
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md");
    let want = jobmirror::config::reference_markdown();
    if std::env::var_os("JOBMIRROR_BLESS").is_some() {
        std::fs::write(&path, &want).unwrap();
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "docs/configuration.md is not what config::KEYS makes: run JOBMIRROR_BLESS=1 cargo test --test integration configuration_page"
    );
    for (key, _, _) in jobmirror::config::KEYS {
        assert!(have.contains(&format!("| `{key}` |")), "{key} missing");
    }
    // Every key the shipped configuration sets is a key.
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/jobmirror.toml"),
    )
    .unwrap();
    let table: toml::Table = shipped.parse().unwrap();
    for k in table.keys() {
        assert!(jobmirror::config::is_key(k), "{k}");
    }
}

#[test]
fn every_command_finds_the_services_configuration_and_only_run_and_migrate_create_a_database() {
    // The shipped unit passes the database path nowhere but in its configuration file: an
    // operator's command with no flags must find the same file and database.
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state").join("jm.db");
    std::fs::create_dir(dir.path().join("state")).unwrap();
    let config = dir.path().join("jobmirror.toml");
    std::fs::write(
        &config,
        format!(
            "db = {:?}\npleo_api_key = \"k\"\ncompany_ids = [\"aaaaaaaa-0000-4000-8000-000000000001\"]\nhandler_command = \"dry-run\"\n",
            db.display().to_string()
        ),
    )
    .unwrap();
    let jm = |args: &[&str]| {
        cmd()
            .args(args)
            .env("JOBMIRROR_CONFIG", &config)
            .env_remove("JOBMIRROR_DB")
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    // Before the database exists: every command but run and migrate refuses, naming the
    // path, and creates nothing (not in the working directory either).
    for args in [
        &["status"][..],
        &["why", "j"],
        &["companies", "list"],
        &["companies", "add", "bbbbbbbb-0000-4000-8000-000000000002"],
        &["backup", "copy.db"],
        &["prune"],
        &["trigger"],
        &["doctor"],
    ] {
        let out = jm(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(&format!("database {} does not exist", db.display())),
            "{args:?}: {err}"
        );
        assert!(
            err.contains(&config.display().to_string()),
            "{args:?}: {err}"
        );
    }
    assert!(!db.exists());
    assert!(!dir.path().join("jobmirror.db").exists());
    // check-config names the file and the database it would use.
    let out = jm(&["check-config"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("database {} (does not exist yet", db.display())),
        "{text}"
    );
    assert!(
        text.contains(&format!("file {}", config.display())),
        "{text}"
    );
    assert!(jm(&["migrate"]).status.success());
    assert!(db.exists());
    // Now the commands see the configuration's company and the database's.
    assert!(
        jm(&["companies", "add", "bbbbbbbb-0000-4000-8000-000000000002"])
            .status
            .success()
    );
    let list = String::from_utf8_lossy(&jm(&["companies", "list"]).stdout).into_owned();
    assert!(
        list.contains("aaaaaaaa-0000-4000-8000-000000000001"),
        "{list}"
    );
    assert!(
        list.contains("bbbbbbbb-0000-4000-8000-000000000002"),
        "{list}"
    );
    // A configuration named but missing is an error, not the defaults.
    let out = cmd()
        .arg("status")
        .env("JOBMIRROR_CONFIG", dir.path().join("nope.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.toml"));
}

#[test]
fn doctor_before_start_passes_a_sound_file_with_a_job_in_hand_and_fails_a_broken_one() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("restored.db");
    succeeds(cmd().arg("demo").arg("--db").arg(&db));
    // A job in hand, as a restored replica of a primary that died holding it.
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute(
        "UPDATE export_jobs SET proc_state = 'processing', status = 'in_progress'
          WHERE id = (SELECT id FROM export_jobs ORDER BY id LIMIT 1)",
        [],
    )
    .unwrap();
    drop(conn);
    let doctor = |extra: &[&str]| {
        cmd()
            .arg("doctor")
            .args(extra)
            .env("JOBMIRROR_DB", &db)
            .output()
            .unwrap()
    };
    let out = doctor(&[]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a running deployment: jobs in hand, no service"
    );
    let out = doctor(&["--before-start"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("ok") && l.contains("integrity")),
        "{text}"
    );
    assert!(text.contains("no service running yet"), "{text}");
    // A broken file still fails.
    let mut broken = std::fs::read(&db).unwrap();
    let mid = broken.len() / 2;
    let end = (mid + 4096).min(broken.len());
    for b in &mut broken[mid..end] {
        *b = 0xA5;
    }
    std::fs::write(&db, &broken).unwrap();
    let out = doctor(&["--before-start"]);
    assert_ne!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
