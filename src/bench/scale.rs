//! Section "scale": the real binary serving many companies against the fake, with every answer
//! delayed (a stand-in for a real network), one shared key or a key per company. Measured per
//! run: the recovery pass, a backlog of jobs, then a window of steady polls with webhooks for
//! new jobs arriving: polls achieved against what is needed and what the budget leaves,
//! webhook-to-`started` latency, requests per job, RSS, file descriptors, `status` and `doctor`
//! times, and how fast the database grows.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::bench::harness::*;
use crate::clock::{Clock, SystemClock};
use crate::sandbox::{JobSpec, LoggedRequest};

/// The request budget per credential in every run (the default).
const BUDGET_PER_SEC: f64 = 20.0;

fn company(i: usize) -> String {
    format!("{i:08x}-0000-4000-8000-00000000a11e")
}

fn is_listing(q: &LoggedRequest) -> bool {
    q.method == "GET" && q.path == "/v3/export-jobs"
}

fn is_event(q: &LoggedRequest, job: &str, event: &str) -> bool {
    q.path == "/v3/export-job-events"
        && q.body.contains(&format!("\"{job}\""))
        && q.body.contains(&format!("\"{event}\""))
}

pub(crate) fn scale(cx: &Ctx, figures: &mut Vec<Figure>) -> anyhow::Result<()> {
    // `JOBMIRROR_BENCH_SCALE_ONLY=text` runs only the runs whose label contains it (for
    // example "by credential"), to measure one configuration again without the others.
    let only = std::env::var("JOBMIRROR_BENCH_SCALE_ONLY").ok();
    for run in &cx.sizes.scale_runs {
        if only.as_deref().is_some_and(|o| !label(run).contains(o)) {
            continue;
        }
        one(cx, run, figures)?;
    }
    Ok(())
}

fn one(cx: &Ctx, run: &ScaleRun, figures: &mut Vec<Figure>) -> anyhow::Result<()> {
    let label = label(run);
    let dir = cx.dir.join(format!(
        "scale-{}-{}-{}-{}",
        run.companies, run.own_keys, run.by_credential, run.latency_ms
    ));
    std::fs::create_dir_all(&dir)?;
    let fake = start_fake(&cx.clock)?;
    let ids: Vec<String> = (0..run.companies).map(company).collect();
    std::fs::write(dir.join("companies.txt"), ids.join("\n"))?;
    let mut keys = String::new();
    if run.own_keys {
        for (i, c) in ids.iter().enumerate() {
            fake.add_company_key(&format!("k{i}"), c);
            keys.push_str(&format!("{c:?} = \"k{i}\"\n"));
        }
    }
    std::fs::write(dir.join("keys.toml"), &keys)?;
    let backlog: Vec<String> = (0..run.backlog_jobs.min(run.companies))
        .map(|i| {
            fake.add_job(JobSpec {
                id: Some(format!("b-{i}")),
                company_id: ids[i].clone(),
                created_secs_ago: Some(60),
                items: Some(1),
                ..JobSpec::default()
            })
        })
        .collect::<anyhow::Result<_>>()?;
    fake.set_latency(Duration::from_millis(run.latency_ms));
    let db = dir.join("scale.db");
    let port = free_port()?;
    let mut env = service_env(&fake, &db, &dir.join("outbox"), "", port);
    let set = |env: &mut Vec<(&'static str, String)>, k: &'static str, v: String| {
        env.retain(|(n, _)| *n != k);
        env.push((k, v));
    };
    set(
        &mut env,
        "JOBMIRROR_COMPANY_IDS_FILE",
        path(&dir, "companies.txt"),
    );
    if run.own_keys {
        set(
            &mut env,
            "JOBMIRROR_COMPANY_API_KEYS_FILE",
            path(&dir, "keys.toml"),
        );
    }
    set(
        &mut env,
        "JOBMIRROR_POLL_INTERVAL_SECS",
        run.interval_secs.to_string(),
    );
    set(
        &mut env,
        "JOBMIRROR_PLEO_REQUESTS_PER_SEC_MAX",
        format!("{BUDGET_PER_SEC}"),
    );
    set(&mut env, "JOBMIRROR_HANDLER_COMMAND", "dry-run".into());
    set(&mut env, "JOBMIRROR_LANES", "4".into());
    set(
        &mut env,
        "JOBMIRROR_LIST_BY_CREDENTIAL",
        run.by_credential.to_string(),
    );
    let admin = free_port()?;
    set(
        &mut env,
        "JOBMIRROR_ADMIN_LISTEN",
        format!("127.0.0.1:{admin}"),
    );
    let t0 = Instant::now();
    let mut service = ServiceChild::spawn(&cx.exe, &env)?;
    let pid = service.child.id();
    service.wait_line(
        &format!("recovery pass over {} companies", run.companies),
        Duration::from_secs(900),
    )?;
    let recovery = t0.elapsed().as_secs_f64();
    figures.push(fig(
        &format!("recovery pass ({label})"),
        recovery,
        "s",
        None,
        "reported",
        true,
    ));
    // The backlog: every job finished.
    let all_done = fake.wait_for_requests(Duration::from_secs(900), |reqs| {
        let done = reqs
            .iter()
            .filter(|q| q.path == "/v3/export-job-events" && q.body.contains("\"completed\""))
            .count();
        done >= backlog.len()
    });
    anyhow::ensure!(all_done, "{label}: the backlog did not finish");
    let backlog_secs = t0.elapsed().as_secs_f64();
    let jobs_per_sec = backlog.len() as f64 / backlog_secs.max(0.001);
    figures.push(fig(
        &format!("backlog jobs/s ({label}, {} jobs)", backlog.len()),
        jobs_per_sec,
        "jobs/s",
        None,
        "reported (from start, recovery included)",
        true,
    ));
    let job_requests = fake.requests().iter().filter(|q| !is_listing(q)).count();
    let per_job = job_requests as f64 / backlog.len().max(1) as f64;
    figures.push(fig(
        &format!("requests per job, listings aside ({label})"),
        per_job,
        "requests",
        None,
        "<= 8 (was 8.0 with listings)",
        per_job <= 8.0,
    ));

    // The steady window: polls, and webhooks for new jobs of companies without a backlog.
    let (rows0, bytes0) = db_size(&db)?;
    let n0 = fake.requests().len();
    let w0 = SystemClock.now().0;
    let url = format!("http://127.0.0.1:{port}/webhooks/pleo");
    let a = agent();
    let mut posted: Vec<(String, i64)> = Vec::new();
    let window = Duration::from_secs(run.window_secs);
    let started = Instant::now();
    let mut k = 0usize;
    while started.elapsed() < window {
        let c = &ids[(run.backlog_jobs + k * 7919) % run.companies];
        let job = fake.add_job(JobSpec {
            id: Some(format!("w-{k}")),
            company_id: c.clone(),
            items: Some(1),
            ..JobSpec::default()
        })?;
        let body = json!({"data": fake.job(&job).map(|j| j.to_json()), "eventId": format!("e{k}"),
                          "eventType": "v1.export-job.created"})
        .to_string();
        let at = SystemClock.now().0;
        let status = post_signed(&a, &url, &cx.secrets, &format!("msg_s{k}"), body.as_bytes());
        anyhow::ensure!(status == 200, "{label}: webhook answered {status}");
        posted.push((job, at));
        k += 1;
        std::thread::sleep(Duration::from_millis(run.webhook_every_ms));
    }
    let w1 = SystemClock.now().0;
    let window_s = (w1 - w0) as f64 / 1000.0;
    let (rows1, bytes1) = db_size(&db)?;
    let rss = rss_kib(pid) as f64 / 1024.0;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    // Stragglers: give the last webhooks' jobs time to start.
    let last: Vec<String> = posted.iter().map(|(j, _)| j.clone()).collect();
    fake.wait_for_requests(Duration::from_secs(30), |reqs| {
        last.iter().all(|j| {
            reqs[n0.min(reqs.len())..]
                .iter()
                .any(|q| is_event(q, j, "started"))
        })
    });
    let reqs = fake.requests_since(n0);
    let in_window: Vec<&LoggedRequest> = reqs
        .iter()
        .filter(|q| q.at.0 >= w0 && q.at.0 < w1)
        .collect();
    let listings = in_window.iter().filter(|q| is_listing(q)).count();
    let others = (in_window.len() - listings) as f64 / window_s;
    if run.by_credential {
        // One listing naming no company covers them all: its first pages are the rounds.
        let rounds = in_window
            .iter()
            .filter(|q| {
                is_listing(q) && !q.query.contains("company_id") && !q.query.contains("after=")
            })
            .count();
        let per_round = listings.saturating_sub(posted.len()) as f64 / rounds.max(1) as f64;
        figures.push(fig(
            &format!(
                "listing rounds in {window_s:.0} s ({label}, every {} s)",
                run.interval_secs
            ),
            rounds as f64,
            "rounds",
            None,
            "one per poll interval",
            rounds as f64 >= (window_s / run.interval_secs as f64).floor(),
        ));
        figures.push(fig(
            &format!(
                "requests per round for {} companies ({label})",
                run.companies
            ),
            per_round,
            "requests",
            Some(("one by one", run.companies as f64)),
            "reported",
            true,
        ));
    } else {
        // One listing per webhook is the webhook's detection, not a poll.
        let polls = listings.saturating_sub(posted.len()) as f64 / window_s;
        let needed = run.companies as f64 / run.interval_secs as f64;
        let allowed = if run.own_keys {
            needed
        } else {
            needed.min(BUDGET_PER_SEC - others - posted.len() as f64 / window_s)
        };
        let ratio = polls / allowed.max(0.001);
        figures.push(fig(
            &format!("polls/s ({label}, needed {needed:.1}/s)"),
            polls,
            "polls/s",
            Some(("budget allows", allowed)),
            ">= 95% of what the budget allows",
            ratio >= 0.95,
        ));
    }
    let mut reactions: Vec<Duration> = posted
        .iter()
        .filter_map(|(job, at)| {
            let s = reqs.iter().find(|q| is_event(q, job, "started"))?;
            Some(Duration::from_millis((s.at.0 - at).max(0) as u64))
        })
        .collect();
    anyhow::ensure!(
        reactions.len() == posted.len(),
        "{label}: {} of {} webhook jobs were started",
        reactions.len(),
        posted.len()
    );
    reactions.sort();
    let p50 = percentile(&reactions, 0.5).as_secs_f64() * 1000.0;
    let p99 = percentile(&reactions, 0.99).as_secs_f64() * 1000.0;
    figures.push(fig(
        &format!("webhook -> started p50 ({label})"),
        p50,
        "ms",
        None,
        "reported",
        true,
    ));
    figures.push(fig(
        &format!("webhook -> started p99 ({label})"),
        p99,
        "ms",
        None,
        "<= 1000 ms",
        p99 <= 1000.0,
    ));
    figures.push(fig(
        &format!("RSS ({label})"),
        rss,
        "MiB",
        None,
        "<= 100 MiB",
        rss <= 100.0,
    ));
    figures.push(fig(
        &format!("file descriptors ({label})"),
        fds as f64,
        "fds",
        None,
        "<= 64",
        fds <= 64,
    ));
    for cmd in ["status", "doctor"] {
        let t = Instant::now();
        let out = Command::new(&cx.exe)
            .args([cmd, "--json", "--db"])
            .arg(&db)
            .output()?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        anyhow::ensure!(
            serde_json::from_slice::<serde_json::Value>(&out.stdout).is_ok(),
            "{cmd} printed no JSON: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        figures.push(fig(
            &format!("`{cmd}` ({label}, service running)"),
            ms,
            "ms",
            None,
            "<= 1000 ms",
            ms <= 1000.0,
        ));
    }
    let t = Instant::now();
    let scrape = a
        .get(format!("http://127.0.0.1:{admin}/metrics"))
        .call()
        .map(|mut r| r.body_mut().read_to_string().unwrap_or_default())
        .unwrap_or_default();
    let scrape_ms = t.elapsed().as_secs_f64() * 1000.0;
    anyhow::ensure!(
        scrape.contains("jobmirror_threads_progressing 1"),
        "{label}: /metrics did not answer"
    );
    figures.push(fig(
        &format!("/metrics scrape ({label})"),
        scrape_ms,
        "ms",
        None,
        "<= 1000 ms",
        scrape_ms <= 1000.0,
    ));
    let day = 86_400.0 / window_s;
    figures.push(fig(
        &format!(
            "database growth per day ({label}, a job every {} ms)",
            run.webhook_every_ms
        ),
        (bytes1 - bytes0) as f64 * day / 1_048_576.0,
        "MiB/day",
        None,
        "reported (the window's growth, scaled; mostly the jobs)",
        true,
    ));
    figures.push(fig(
        &format!("sync_runs rows per day ({label})"),
        (rows1 - rows0) as f64 * day,
        "rows/day",
        None,
        "none per quiet poll",
        true,
    ));
    drop(service);
    drop(fake);
    Ok(())
}

fn label(run: &ScaleRun) -> String {
    format!(
        "{} companies, {}, {} ms",
        run.companies,
        match (run.own_keys, run.by_credential) {
            (true, _) => "own keys",
            (false, false) => "one key",
            (false, true) => "one key by credential",
        },
        run.latency_ms
    )
}

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

/// `sync_runs` rows and the database's size in bytes (pages in use, WAL included).
fn db_size(db: &Path) -> anyhow::Result<(i64, i64)> {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let rows: i64 = c.query_row("SELECT count(*) FROM sync_runs", [], |r| r.get(0))?;
    let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let size: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    Ok((rows, pages * size))
}
