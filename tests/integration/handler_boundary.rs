//! The handler boundary over the real binary: real handler programs (POSIX sh) that do what
//! accounting-side programs do (write bytes that are not UTF-8, write huge lines, leave a
//! child holding their pipes, crash, hang), each checked against the README's handler
//! protocol.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use jobmirror::clock::{SharedClock, SystemClock};
use jobmirror::sandbox::{FakeConfig, FakeJob, FakePleo, JobSpec};

use crate::cli::{Reaper, signal, wait_exit};
use crate::reliability::{pid_in, process_ends};

const CO: &str = "4b4b4b4b-0000-4000-8000-0000000000b0";

/// A fake Pleo on the real clock with one pending job of `items` items.
fn fake_with_job(id: &str, items: usize) -> FakePleo {
    let clock: SharedClock = Arc::new(SystemClock);
    let fake = FakePleo::start("127.0.0.1:0", FakeConfig::default(), clock).unwrap();
    fake.add_job(JobSpec {
        id: Some(id.into()),
        company_id: CO.into(),
        created_secs_ago: Some(60),
        items: Some(items),
        ..JobSpec::default()
    })
    .unwrap();
    fake
}

/// Writes an executable POSIX shell handler; `D` in `body` stands for `dir`.
fn handler(dir: &Path, body: &str) -> String {
    let path = dir.join("handler.sh");
    let body = body.replace("D/", &format!("{}/", dir.display()));
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.display().to_string()
}

/// The shell that takes one item line and names its entry in `$e` (empty for the job line).
const ENTRY: &str =
    r#"e=$(printf '%s' "$line" | sed -n 's/.*"accountingEntryId":"\([^"]*\)".*/\1/p')"#;

/// A handler that answers each item successful, logging each entry to `D/seen` and each run
/// to `D/runs`; `each` runs before each answer (with the entry in `$e`), `end` at the end.
fn answering(dir: &Path, each: &str, end: &str) -> String {
    handler(
        dir,
        &format!(
            r#"[ "$1" = --check ] && exit 0
echo run >> D/runs
while read -r line; do
  {ENTRY}
  [ -n "$e" ] || continue
  echo "$e" >> D/seen
  {each}
  printf '{{"accountingEntryId":"%s","status":"successful"}}\n' "$e"
done
{end}"#
        ),
    )
}

/// The job completed in one handler run, each of its `items` handed to it once.
fn completed_in_one_run(fake: &FakePleo, dir: &Path, id: &str, items: usize) {
    let j = finished(fake, id, Duration::from_secs(30));
    assert_eq!(j.status, "completed", "{:?}", j.failure_reason);
    assert_eq!(successful_items(fake, id), items);
    assert_eq!(file_lines(&dir.join("runs")).len(), 1, "one run");
    each_seen_once(dir, items);
}

/// `jobmirror run` against `fake` with `handler`, logging at info, plus `extra` settings.
fn service(
    dir: &Path,
    fake: &FakePleo,
    handler: &str,
    extra: &[(&str, &str)],
) -> (Reaper, Receiver<String>) {
    let mut settings = vec![("JOBMIRROR_HANDLER_COMMAND", handler)];
    settings.extend_from_slice(extra);
    crate::reliability::instance(dir, "hb", fake, &[CO.to_owned()], &settings)
}

fn db(dir: &Path) -> PathBuf {
    dir.join("hb.db")
}

/// Waits (bounded) until Pleo shows the job finished; returns it.
fn finished(fake: &FakePleo, id: &str, within: Duration) -> FakeJob {
    let t0 = Instant::now();
    loop {
        let j = fake.job(id).unwrap();
        if jobmirror::pleo::status::is_terminal(&j.status) {
            return j;
        }
        assert!(
            t0.elapsed() < within,
            "job {id} not finished within {within:?}: {}",
            j.status
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The lines of a file the handler appends to (none if it does not exist).
fn file_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|s| s.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// The first log line containing `needle`, among those read so far (`seen`) or, waiting for
/// it (bounded), those still to come.
fn logged(rx: &Receiver<String>, seen: &mut Vec<String>, needle: &str) -> String {
    if let Some(l) = seen.iter().find(|l| l.contains(needle)) {
        return l.clone();
    }
    crate::cli::wait_for(rx, needle, seen);
    seen.last().cloned().unwrap_or_default()
}

/// Each entry the handler saw exactly once, and as many as the job has items.
fn each_seen_once(dir: &Path, items: usize) {
    let mut seen = file_lines(&dir.join("seen"));
    assert_eq!(seen.len(), items, "{seen:?}");
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), items, "an item was handed to the handler twice");
}

fn successful_items(fake: &FakePleo, id: &str) -> usize {
    fake.job(id)
        .unwrap()
        .items
        .iter()
        .filter(|i| i.status == "successful")
        .count()
}

#[test]
fn latin1_bytes_on_stderr_reach_the_log_and_the_job_completes_in_one_run() {
    // The stderr reader stopped at the first byte that was not UTF-8 and closed the pipe; the
    // handler's next write to stderr killed it (SIGPIPE), run after run.
    let fake = fake_with_job("hb-err", 3);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let h = answering(
        d,
        r#"printf 'ERP: fournisseur \351t\351 inconnu (%s)\n' "$e" >&2"#,
        r#"printf 'bye \377\376\n' >&2"#,
    );
    let (_svc, rx) = service(d, &fake, &h, &[]);
    completed_in_one_run(&fake, d, "hb-err", 3);
    logged(
        &rx,
        &mut Vec::new(),
        "handler[hb-err]: ERP: fournisseur \u{fffd}t\u{fffd} inconnu",
    );
}

#[test]
fn a_line_on_stdout_that_is_not_utf8_is_logged_and_ignored() {
    // The stdout reader stopped there: the results after it were lost, the handler started
    // again, and items already posted to the ERP were handed to it twice.
    let fake = fake_with_job("hb-out", 4);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let h = answering(d, r#"printf 'cr\350me br\373l\351e\n'"#, "");
    let (_svc, rx) = service(d, &fake, &h, &[]);
    completed_in_one_run(&fake, d, "hb-out", 4);
    logged(
        &rx,
        &mut Vec::new(),
        "not a result: not UTF-8: cr\u{fffd}me",
    );
}

#[test]
fn a_child_holding_stdout_neither_keeps_the_run_open_nor_outlives_it() {
    // Run 0 answers one item and exits 0; run 1 answers the rest and exits 0. Each leaves a
    // child holding stdout. The run ended only at EOF: the job was failed with
    // accounting_system_timeout after the item timeout.
    let fake = fake_with_job("hb-child", 3);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let h = handler(
        d,
        &format!(
            r#"[ "$1" = --check ] && exit 0
n=$(cat D/runs 2>/dev/null | wc -l)
echo run >> D/runs
sleep 300 &
echo $! > D/child-$n
while read -r line; do
  {ENTRY}
  [ -n "$e" ] || continue
  echo "$e" >> D/seen
  printf '{{"accountingEntryId":"%s","status":"successful"}}\n' "$e"
  [ "$n" = 0 ] && exit 0
done
exit 0"#
        ),
    );
    let t0 = Instant::now();
    let extra = [("JOBMIRROR_HANDLER_ITEM_TIMEOUT_SECS", "60")];
    let (_svc, _rx) = service(d, &fake, &h, &extra);
    // Well inside the item timeout: the runs ended with the handler, not with the limit.
    let j = finished(&fake, "hb-child", Duration::from_secs(30));
    assert_eq!(j.status, "completed", "{:?}", j.failure_reason);
    assert!(t0.elapsed() < Duration::from_secs(60));
    assert_eq!(successful_items(&fake, "hb-child"), 3);
    assert_eq!(file_lines(&d.join("runs")).len(), 2);
    each_seen_once(d, 3);
    for n in 0..2 {
        let child = pid_in(&d.join(format!("child-{n}")), Duration::from_secs(5));
        assert!(
            process_ends(child, Duration::from_secs(5)),
            "run {n}'s child outlived the run"
        );
    }
}

#[test]
fn the_job_timeout_counts_every_run_and_survives_a_restart() {
    // handler_job_timeout_secs was per run: slow crashing runs never reached it.
    let fake = fake_with_job("hb-slow", 2);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Run 0 hangs (the service is stopped during it); later runs crash after 0.7 s.
    let h = handler(
        d,
        r#"[ "$1" = --check ] && exit 0
n=$(cat D/runs 2>/dev/null | wc -l)
echo run >> D/runs
if [ "$n" = 0 ]; then echo $$ > D/hang; sleep 300; fi
sleep 0.7
exit 1"#,
    );
    let extra = [
        ("JOBMIRROR_HANDLER_JOB_TIMEOUT_SECS", "4"),
        ("JOBMIRROR_HANDLER_ITEM_TIMEOUT_SECS", "60"),
        ("JOBMIRROR_HANDLER_ATTEMPTS_MAX", "20"),
        ("JOBMIRROR_HANDLER_RETRY_SECS", "1"),
    ];
    let (mut svc, _rx) = service(d, &fake, &h, &extra);
    let hang = pid_in(&d.join("hang"), Duration::from_secs(30));
    // Wait until at least 2 s of handler time are in the database, then stop the service.
    let used = || {
        jobmirror::store::Store::open_read_only(&db(d))
            .and_then(|s| s.handler_budget("hb-slow"))
            .map(|(ms, _)| ms)
            .unwrap_or(0)
    };
    let t0 = Instant::now();
    while used() < 2000 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no handler time counted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let child = svc.0.take().unwrap();
    signal(&child, "TERM");
    assert_eq!(wait_exit(child, Duration::from_secs(15)).code(), Some(0));
    assert!(
        process_ends(hang, Duration::from_secs(5)),
        "the hanging run outlived the stop"
    );
    let before_restart = used();
    assert!(before_restart >= 2000, "{before_restart}");
    assert_eq!(fake.job("hb-slow").unwrap().status, "in_progress");
    let (_svc, _rx) = service(d, &fake, &h, &extra);
    let j = finished(&fake, "hb-slow", Duration::from_secs(30));
    assert_eq!(j.status, "failed");
    assert_eq!(
        j.failure_reason_type.as_deref(),
        Some("accounting_system_timeout")
    );
    let reason = j.failure_reason.unwrap_or_default();
    assert!(reason.contains("in all"), "{reason}");
    // The limit is for all runs together: about 4 s, not 4 s per run.
    let total = used();
    assert!((4000..5500).contains(&total), "{total} ms of handler time");
    let runs = file_lines(&d.join("runs")).len();
    assert!((2..=6).contains(&runs), "{runs} runs");
}

#[test]
fn a_stop_during_a_hanging_readiness_check_ends_it_and_exits_0_in_time() {
    let fake = fake_with_job("hb-check", 2);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let h = handler(
        d,
        r#"if [ "$1" = --check ]; then
  echo $$ > D/check
  sleep 300 &
  echo $! > D/check-child
  wait
  exit 0
fi
exit 1"#,
    );
    let (mut svc, _rx) = service(d, &fake, &h, &[]);
    let check = pid_in(&d.join("check"), Duration::from_secs(30));
    let check_child = pid_in(&d.join("check-child"), Duration::from_secs(5));
    let child = svc.0.take().unwrap();
    let t0 = Instant::now();
    signal(&child, "TERM");
    let status = wait_exit(child, Duration::from_secs(15));
    assert_eq!(status.code(), Some(0));
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "{:?} to stop",
        t0.elapsed()
    );
    assert!(process_ends(check, Duration::from_secs(2)));
    assert!(process_ends(check_child, Duration::from_secs(2)));
    assert_eq!(fake.job("hb-check").unwrap().status, "pending");
    assert!(
        fake.requests()
            .iter()
            .all(|r| r.path != "/v3/export-job-events"),
        "nothing sent while the check had not answered"
    );
}

/// The service's peak resident memory (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn lines_of_48_mib_are_cut_and_memory_stays_bounded() {
    // A 48 MiB stderr line without a newline was buffered whole (RSS 73 MiB).
    let fake = fake_with_job("hb-long", 2);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Before the first answer: 48 MiB on each pipe, each as one line.
    let h = answering(
        d,
        r#"[ -e D/long ] || { touch D/long
    head -c 50331648 /dev/zero | tr '\0' x >&2; printf '\n' >&2
    head -c 50331648 /dev/zero | tr '\0' y; printf '\n'; }"#,
        "",
    );
    let (svc, rx) = service(d, &fake, &h, &[]);
    let pid = svc.0.as_ref().unwrap().id();
    completed_in_one_run(&fake, d, "hb-long", 2);
    let peak = peak_rss_kib(pid);
    eprintln!("peak RSS of the service: {peak} KiB");
    assert!(peak < 40 * 1024, "peak RSS {peak} KiB");
    let mut seen = Vec::new();
    let stderr_line = logged(&rx, &mut seen, "handler[hb-long]: xxxx");
    assert!(
        stderr_line.contains("[line of 50331648 bytes, cut]"),
        "stderr line cut and logged: {}",
        stderr_line.chars().take(300).collect::<String>()
    );
    let stdout_line = logged(&rx, &mut seen, "not a result: yyyy");
    assert!(
        stdout_line.contains("[line of 50331648 bytes, cut]"),
        "stdout line cut and logged as garbage: {}",
        stdout_line.chars().take(300).collect::<String>()
    );
}

#[test]
fn a_handler_gets_its_allowlist_and_never_the_services_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fake_with_job("env-1", 2);
    let creds = dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    let h = answering(dir.path(), "", "env > D/env");
    let (_svc, _rx) = service(
        dir.path(),
        &fake,
        &h,
        &[
            ("JOBMIRROR_WEBHOOK_LISTEN", "127.0.0.1:0"),
            (
                "JOBMIRROR_WEBHOOK_SECRET",
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            ),
            ("CREDENTIALS_DIRECTORY", creds.to_str().unwrap()),
            ("SOME_OTHER", "leak-me"),
            ("PASS_ME", "pass-me"),
            (
                "JOBMIRROR_HANDLER_ENV",
                "ERP_URL=https://erp.example PASS_ME",
            ),
        ],
    );
    let j = finished(&fake, "env-1", Duration::from_secs(30));
    assert_eq!(j.status, "completed", "{:?}", j.failure_reason);
    let env = std::fs::read_to_string(dir.path().join("env")).unwrap();
    let names: Vec<&str> = env.lines().filter_map(|l| l.split('=').next()).collect();
    for want in [
        "JOBMIRROR_JOB_ID=env-1",
        "ERP_URL=https://erp.example",
        "PASS_ME=pass-me",
    ] {
        assert!(env.lines().any(|l| l == want), "{want} missing:\n{env}");
    }
    assert!(names.contains(&"PATH"), "{env}");
    for never in [
        fake.api_key().as_str(),
        "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "leak-me",
        "CREDENTIALS_DIRECTORY",
        "_FILE=",
        dir.path().join("hb.db").to_str().unwrap(),
        "JOBMIRROR_DB",
        "JOBMIRROR_PLEO",
        "JOBMIRROR_WEBHOOK",
    ] {
        assert!(!env.contains(never), "{never} reached the handler:\n{env}");
    }
    let marker = env
        .lines()
        .find_map(|l| l.strip_prefix("JOBMIRROR_HANDLER_OF="))
        .unwrap_or_else(|| panic!("no marker:\n{env}"));
    assert!(
        marker.len() == 32 && marker.chars().all(|c| c.is_ascii_hexdigit()),
        "opaque marker: {marker}"
    );
}

#[test]
fn handler_env_refuses_the_services_own_names() {
    for bad in ["JOBMIRROR_PLEO_API_KEY", "CREDENTIALS_DIRECTORY=/x", "1BAD"] {
        let out = crate::cli::cmd()
            .args(["check-config"])
            .env("JOBMIRROR_DB", "/nonexistent/x.db")
            .env("JOBMIRROR_PLEO_API_KEY", "k")
            .env("JOBMIRROR_COMPANY_IDS", CO)
            .env("JOBMIRROR_HANDLER_COMMAND", "/bin/true")
            .env("JOBMIRROR_HANDLER_ENV", bad)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("handler_env"), "{bad}: {err}");
    }
}
