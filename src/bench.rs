//! `jobmirror bench`: figures against the limits of the machine, each with a baseline measured
//! in the same run, printed with units and written as JSON. `--smoke` runs tiny sizes (a test
//! runs it so the harness cannot rot); the full run is `cargo run --release -- bench`.
//!
//! The service under test is the real binary (`jobmirror run`, started as a child process);
//! the fake Pleo, the webhook senders and the baselines run in this process, over loopback.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::clock::{Clock, Millis, SharedClock, SystemClock, monotonic};
use crate::edge::webhook::{Secrets, sign_with};
use crate::pleo::{Auth, ClientConfig, PleoClient, Secret};
use crate::sandbox::{FakeConfig, FakePleo, JobSpec};
use crate::store::{Source, Store};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const KEY: &str = "bench-key";

#[derive(Clone, Debug)]
pub struct Sizes {
    pub ingest_deliveries: usize,
    pub latency_rate_per_sec: u64,
    pub latency_secs: u64,
    pub sync_companies: usize,
    pub sync_jobs_per_company: usize,
    pub pick_sizes: Vec<usize>,
    pub reaction_samples: usize,
    pub processing_items: usize,
}

impl Sizes {
    pub fn full() -> Sizes {
        Sizes {
            ingest_deliveries: 40_000,
            latency_rate_per_sec: 1_000,
            latency_secs: 5,
            sync_companies: 100,
            sync_jobs_per_company: 1_000,
            pick_sizes: vec![10_000, 100_000, 1_000_000],
            reaction_samples: 200,
            processing_items: 10_000,
        }
    }
    pub fn smoke() -> Sizes {
        Sizes {
            ingest_deliveries: 400,
            latency_rate_per_sec: 200,
            latency_secs: 1,
            sync_companies: 4,
            sync_jobs_per_company: 50,
            pick_sizes: vec![1_000, 2_000],
            reaction_samples: 5,
            processing_items: 200,
        }
    }
}

/// One figure with its baseline and target.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Figure {
    pub name: String,
    pub value: f64,
    pub unit: String,
    pub baseline: Option<f64>,
    pub baseline_name: Option<String>,
    /// value / baseline (for rates: higher is better; for costs: lower is better).
    pub ratio: Option<f64>,
    pub target: String,
    pub met: bool,
}

fn fig(
    name: &str,
    value: f64,
    unit: &str,
    baseline: Option<(&str, f64)>,
    target: &str,
    met: bool,
) -> Figure {
    let f = Figure {
        name: name.into(),
        value,
        unit: unit.into(),
        baseline: baseline.map(|b| b.1),
        baseline_name: baseline.map(|b| b.0.to_owned()),
        ratio: baseline.map(|b| if b.1 == 0.0 { 0.0 } else { value / b.1 }),
        target: target.into(),
        met,
    };
    println!(
        "{:<34} {:>12.1} {:<8} {}{}  target {} {}",
        f.name,
        f.value,
        f.unit,
        f.baseline_name
            .as_ref()
            .map(|n| format!("[{n}: {:.1}] ", f.baseline.unwrap_or(0.0)))
            .unwrap_or_default(),
        f.ratio.map(|r| format!("ratio {r:.2}")).unwrap_or_default(),
        f.target,
        if f.met { "MET" } else { "MISSED" }
    );
    f
}

/// The service binary, started with `jobmirror run`, killed on drop.
struct ServiceChild {
    child: Child,
    lines: crossbeam_channel::Receiver<String>,
}

impl ServiceChild {
    fn start(exe: &Path, env: &[(&str, String)]) -> anyhow::Result<(ServiceChild, Duration)> {
        let t0 = Instant::now();
        let mut cmd = Command::new(exe);
        cmd.arg("run")
            .env_clear()
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // libfaketime's variables pass through, so a run under `faketime` shares one clock.
        for (k, v) in std::env::vars_os() {
            let name = k.to_string_lossy();
            if name == "LD_PRELOAD" || name.starts_with("FAKETIME") {
                cmd.env(&k, v);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn()?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let err = child.stderr.take().expect("piped");
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        let mut s = ServiceChild { child, lines: rx };
        s.wait_line("recovery pass", Duration::from_secs(60))?;
        Ok((s, t0.elapsed()))
    }
    fn wait_line(&mut self, needle: &str, within: Duration) -> anyhow::Result<()> {
        let deadline = monotonic() + within;
        loop {
            let left = deadline.saturating_duration_since(monotonic());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return Ok(()),
                Ok(_) => {}
                Err(_) => anyhow::bail!("the service did not log {needle:?} within {within:?}"),
            }
        }
    }
    fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id())
    }
}

impl Drop for ServiceChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time the live threads of a process have run so far, from the
/// scheduler's own clock (`/proc/<pid>/task/*/schedstat`). The tick-sampled utime and stime
/// in `/proc/<pid>/stat` undercount on this VM: during ingest they added up to 36% of the two
/// cores while `perf record -a` and `/proc/stat` both saw about 70% busy.
fn task_cpu(pid: u32) -> Duration {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten();
    let ns: u64 = tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(ns)
}

/// The machine's (busy, all) time in clock ticks so far, from the first line of `/proc/stat`:
/// busy is everything but idle and iowait.
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    let all: u64 = f.iter().sum();
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    (all - idle, all)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn agent() -> ureq::Agent {
    crate::pleo::net::agent(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build(),
    )
}

fn start_fake(clock: &SharedClock) -> anyhow::Result<FakePleo> {
    FakePleo::start(
        "127.0.0.1:0",
        FakeConfig {
            api_keys: vec![KEY.into()],
            ..FakeConfig::default()
        },
        clock.clone(),
    )
}

/// The service's environment: the fake, a database, the outbox handler and a webhook port.
fn service_env(
    fake: &FakePleo,
    db: &Path,
    outbox: &Path,
    companies: &str,
    port: u16,
) -> Vec<(&'static str, String)> {
    vec![
        ("JOBMIRROR_DB", db.display().to_string()),
        ("JOBMIRROR_PLEO_BASE_URL", fake.base_url()),
        ("JOBMIRROR_PLEO_API_KEY", KEY.to_owned()),
        ("JOBMIRROR_COMPANY_IDS", companies.to_owned()),
        ("JOBMIRROR_POLL_INTERVAL_SECS", "3600".to_owned()),
        ("JOBMIRROR_ADMIN_LISTEN", "127.0.0.1:0".to_owned()),
        // The bench measures jobmirror, not its pacing of Pleo.
        ("JOBMIRROR_PLEO_REQUESTS_PER_SEC_MAX", "0".to_owned()),
        (
            "JOBMIRROR_HANDLER_COMMAND",
            format!("outbox:{}", outbox.display()),
        ),
        ("JOBMIRROR_WEBHOOK_LISTEN", format!("127.0.0.1:{port}")),
        ("JOBMIRROR_WEBHOOK_SECRET", SECRET.to_owned()),
        ("JOBMIRROR_LOG", "info".to_owned()),
    ]
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A realistic (about 1.5 KiB) webhook body for a job id.
fn body_for(job_id: &str, company: &str) -> Vec<u8> {
    json!({
        "data": {
            "id": job_id, "companyId": company, "status": "pending", "createdAt": "2026-11-24T10:00:00.000Z",
            "lastUpdatedAt": "2026-11-24T10:00:00.000Z", "expiresIn": 3600, "isInteractive": true,
            "numberOfItems": 42, "vendorBasedBookkeeping": true, "createdBy": "0f1e2d3c-4b5a-4968-8776-655443322110",
            "startedAt": null, "completedAt": null, "expiredAt": null, "failureReason": null,
            "notes": "x".repeat(1100),
        },
        "eventId": format!("evt_{job_id}"),
        "eventType": "v1.export-job.created",
    })
    .to_string()
    .into_bytes()
}

fn post_signed(agent: &ureq::Agent, url: &str, secrets: &Secrets, id: &str, body: &[u8]) -> u16 {
    let ts = SystemClock.now().0 / 1000;
    agent
        .post(url)
        .header("webhook-id", id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", sign_with(secrets, id, ts, body))
        .header("Content-Type", "application/json")
        .send(body)
        .map(|mut r| {
            // Read the answer to the end, or ureq cannot reuse the connection (no keep-alive).
            let _ = r.body_mut().read_to_string();
            r.status().as_u16()
        })
        .unwrap_or(0)
}

/// The sections `--only` can name (ingest, with the footprint, always runs).
pub const SECTIONS: [&str; 4] = ["sync", "pick", "reaction", "processing"];

pub fn run(smoke: bool, json_out: Option<PathBuf>, only: &[String]) -> anyhow::Result<()> {
    if let Some(bad) = only
        .iter()
        .find(|s| !SECTIONS.contains(&s.as_str()) && *s != "ingest")
    {
        anyhow::bail!(
            "--only {bad:?}: the sections are ingest, {}",
            SECTIONS.join(", ")
        );
    }
    let want = |s: &str| only.is_empty() || only.iter().any(|o| o == s);
    crate::logging::init(log::LevelFilter::Error, crate::logging::LogFormat::Text);
    let sizes = if smoke { Sizes::smoke() } else { Sizes::full() };
    let exe = std::env::current_exe()?;
    let dir = std::env::temp_dir().join(format!(
        "jobmirror-bench-{}-{}",
        std::process::id(),
        SystemClock.now().0
    ));
    std::fs::create_dir_all(&dir)?;
    println!(
        "jobmirror bench ({}), {} cores, work dir {}",
        if smoke { "smoke" } else { "full" },
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        dir.display()
    );
    let mut figures = Vec::new();
    let clock: SharedClock = Arc::new(SystemClock);

    // --- 1 and 6: webhook ingest, its baselines, footprint -----------------------------------
    let fake = start_fake(&clock)?;
    let port = free_port()?;
    let db = dir.join("ingest.db");
    let env = service_env(&fake, &db, &dir.join("outbox"), "bench-company", port);
    let (service, ready) = ServiceChild::start(&exe, &env)?;
    let idle_rss = service.rss_kib();
    let url = format!("http://127.0.0.1:{port}/webhooks/pleo");
    let secrets = Secrets::parse(SECRET).map_err(anyhow::Error::msg)?;

    let clients = 4;
    let per_client = sizes.ingest_deliveries / clients;
    let peak_rss = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (peak, on, pid) = (peak_rss.clone(), sampling.clone(), service.child.id());
        std::thread::spawn(move || {
            while on.load(std::sync::atomic::Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let (machine0, cpu_svc0) = (machine_ticks(), task_cpu(service.child.id()));
    let t = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let (url, secrets) = (url.clone(), secrets.clone());
            std::thread::spawn(move || {
                let a = agent();
                let mut ok = 0usize;
                for i in 0..per_client {
                    let id = format!("msg_ingest_{c}_{i}");
                    let body = body_for(&format!("nojob-{c}-{i}"), "bench-company");
                    if post_signed(&a, &url, &secrets, &id, &body) == 200 {
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect();
    let acked: usize = handles.into_iter().map(|h| h.join().unwrap_or(0)).sum();
    let ingest_wall = t.elapsed();
    let ingest_rate = acked as f64 / ingest_wall.as_secs_f64();
    let cpu_svc = task_cpu(service.child.id()).saturating_sub(cpu_svc0);
    let machine1 = machine_ticks();
    let machine_busy = 100.0 * machine1.0.saturating_sub(machine0.0) as f64
        / machine1.1.saturating_sub(machine0.1).max(1) as f64;
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let _ = sampler.join();
    let stored: i64 = Store::open_read_only(&db)?.conn().query_row(
        "SELECT count(*) FROM webhook_deliveries",
        [],
        |r| r.get(0),
    )?;
    anyhow::ensure!(
        stored as usize >= acked,
        "acknowledged {acked} but stored {stored}"
    );

    // Latency at a fixed offered rate (open loop, 4 senders).
    let rate_each = sizes.latency_rate_per_sec / clients as u64;
    let n_each = (rate_each * sizes.latency_secs) as usize;
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let (url, secrets) = (url.clone(), secrets.clone());
            std::thread::spawn(move || {
                let a = agent();
                let start = Instant::now();
                let mut lat = Vec::with_capacity(n_each);
                for i in 0..n_each {
                    let due = start + Duration::from_secs_f64(i as f64 / rate_each as f64);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let body = body_for(&format!("lat-{c}-{i}"), "bench-company");
                    let t = Instant::now();
                    if post_signed(&a, &url, &secrets, &format!("msg_lat_{c}_{i}"), &body) == 200 {
                        lat.push(t.elapsed());
                    }
                }
                lat
            })
        })
        .collect();
    let mut lat: Vec<Duration> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap_or_default())
        .collect();
    lat.sort();
    drop(service);

    // Baseline: the same rows straight into SQLite, one durable commit each.
    let base_db = dir.join("baseline.db");
    let st = Store::open(&base_db)?;
    let n_base = (sizes.ingest_deliveries / 4).max(100);
    let t = Instant::now();
    for i in 0..n_base {
        let d = crate::edge::webhook::Delivery {
            webhook_id: format!("b{i}"),
            signed_at: Millis(0),
            event_type: Some("v1.export-job.created".into()),
            event_id: None,
            job_id: Some(format!("j{i}")),
            company_id: Some("bench-company".into()),
            body: String::from_utf8(body_for(&format!("j{i}"), "bench-company"))?,
            headers: json!({"webhook-id": format!("b{i}"), "content-type": "application/json"}),
        };
        st.insert_deliveries(&[&d], Millis(0))?;
    }
    let storage_rate = n_base as f64 / t.elapsed().as_secs_f64();
    drop(st);

    // Baseline: the same HTTP server answering 204 with no work.
    struct Nothing;
    impl crate::edge::httpd::Handler for Nothing {
        fn handle(&self, _r: crate::edge::httpd::Request) -> crate::edge::httpd::Response {
            crate::edge::httpd::Response::empty(204)
        }
    }
    let mut noop = crate::edge::httpd::Server::start(
        std::net::TcpListener::bind("127.0.0.1:0")?,
        crate::edge::httpd::Limits::default(),
        Arc::new(Nothing),
        "bench-noop",
    )?;
    let noop_url = format!("http://{}/webhooks/pleo", noop.local_addr());
    let t = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let (url, secrets) = (noop_url.clone(), secrets.clone());
            std::thread::spawn(move || {
                let a = agent();
                (0..per_client)
                    .filter(|i| {
                        post_signed(
                            &a,
                            &url,
                            &secrets,
                            &format!("n{c}_{i}"),
                            &body_for("x", "y"),
                        ) == 204
                    })
                    .count()
            })
        })
        .collect();
    let noop_ok: usize = handles.into_iter().map(|h| h.join().unwrap_or(0)).sum();
    let http_rate = noop_ok as f64 / t.elapsed().as_secs_f64();
    noop.shutdown();
    let lower = storage_rate.min(http_rate);
    figures.push(fig(
        "webhook ingest (durable 2xx)",
        ingest_rate,
        "acks/s",
        Some(("lower of storage/http", lower)),
        ">= 5000/s and >= 0.5x lower baseline",
        ingest_rate >= 5000.0 && ingest_rate >= 0.5 * lower,
    ));
    figures.push(fig(
        "  baseline: SQLite row commits",
        storage_rate,
        "rows/s",
        None,
        "(baseline)",
        true,
    ));
    figures.push(fig(
        "  baseline: HTTP 204, no work",
        http_rate,
        "req/s",
        None,
        "(baseline)",
        true,
    ));
    figures.push(fig(
        "  ingest: machine CPU busy",
        machine_busy,
        "%",
        None,
        "(evidence)",
        true,
    ));
    figures.push(fig(
        "  ingest: service CPU per ack",
        cpu_svc.as_secs_f64() * 1e6 / acked.max(1) as f64,
        "us",
        None,
        "(evidence)",
        true,
    ));
    let p99 = percentile(&lat, 0.99).as_secs_f64() * 1000.0;
    figures.push(fig(
        &format!("ack latency p99 @{}/s", sizes.latency_rate_per_sec),
        p99,
        "ms",
        None,
        "<= 20 ms",
        p99 <= 20.0,
    ));
    figures.push(fig(
        &format!("ack latency p50 @{}/s", sizes.latency_rate_per_sec),
        percentile(&lat, 0.5).as_secs_f64() * 1000.0,
        "ms",
        None,
        "(info)",
        true,
    ));

    // --- 2: mirror sync ---------------------------------------------------------------------
    if want("sync") {
        let fake2 = start_fake(&clock)?;
        let companies: Vec<String> = (0..sizes.sync_companies)
            .map(|c| format!("c{c:04}"))
            .collect();
        for j in 0..sizes.sync_jobs_per_company {
            for c in &companies {
                fake2.add_job(JobSpec {
                    id: Some(format!("{c}-{j:05}")),
                    company_id: c.clone(),
                    created_secs_ago: Some((j % 3000) as i64),
                    items: Some(0),
                    ..JobSpec::default()
                })?;
            }
        }
        let total = sizes.sync_companies * sizes.sync_jobs_per_company;
        let client = Arc::new(PleoClient::new(
            ClientConfig::new(&fake2.base_url(), Auth::ApiKey(Secret::new(KEY))),
            clock.clone(),
        )?);
        let sync_db = dir.join("sync.db");
        let mut mirror = crate::service::sync::Mirror::new(
            Store::open(&sync_db)?,
            crate::pleo::Clients::single(client.clone()),
            clock.clone(),
            companies.clone(),
        );
        let t = Instant::now();
        let report = mirror.pass(crate::service::sync::PassKind::Recovery);
        let sync_secs = t.elapsed().as_secs_f64();
        anyhow::ensure!(
            report.counts.new as usize == total,
            "mirrored {} of {total}",
            report.counts.new
        );
        let sync_rate = total as f64 / sync_secs;
        // Store upserts against plain INSERTs of the same rows.
        let jobs = client.list_jobs(&companies[0], &["pending"])?.jobs;
        let mut all_jobs = Vec::with_capacity(total);
        for c in &companies {
            for j in &jobs {
                let mut v = j.raw.clone();
                v["companyId"] = json!(c);
                v["id"] = json!(format!("{c}-{}", j.id));
                all_jobs.push(crate::pleo::Job::from_value(v)?);
            }
        }
        let up_store = Store::open(&dir.join("upsert.db"))?;
        let t = Instant::now();
        for chunk in all_jobs.chunks(100) {
            up_store.upsert_jobs(chunk, Millis(0), Source::Poll)?;
        }
        let upsert_rate = all_jobs.len() as f64 / t.elapsed().as_secs_f64();
        let ins_store = Store::open(&dir.join("insert.db"))?;
        let t = Instant::now();
        for chunk in all_jobs.chunks(100) {
            let tx = ins_store.conn().unchecked_transaction()?;
            for j in chunk {
                tx.prepare_cached(
                "INSERT INTO export_jobs (id, company_id, status, created_at, last_updated_at, expires_in, expires_at, number_of_items, raw_json, first_seen_at, last_seen_at, proc_state, proc_state_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 0, 0, 'new', 0)",
            )?
            .execute(rusqlite::params![j.id, j.company_id, j.status, j.created_at.0, j.last_updated_at.map(|m| m.0), j.expires_in_secs, j.expires_at().0, j.number_of_items, j.raw.to_string()])?;
            }
            tx.commit()?;
        }
        let insert_rate = all_jobs.len() as f64 / t.elapsed().as_secs_f64();
        figures.push(fig(
            &format!("mirror sync ({total} jobs, loopback)"),
            sync_rate,
            "jobs/s",
            None,
            ">= 20000 jobs/s",
            sync_rate >= 20_000.0,
        ));
        figures.push(fig(
            "store upserts vs plain INSERTs",
            upsert_rate,
            "rows/s",
            Some(("plain INSERT", insert_rate)),
            ">= 0.5x INSERT",
            upsert_rate >= 0.5 * insert_rate,
        ));
        drop(fake2);
    }

    // --- 3: pick cost as the table grows ------------------------------------------------------
    if want("pick") {
        let mut pick_medians = Vec::new();
        for &n in &sizes.pick_sizes {
            let st = Store::open(&dir.join(format!("pick-{n}.db")))?;
            let tx = st.conn().unchecked_transaction()?;
            for i in 0..n {
                // Mostly finished jobs, as after a year; 1 in 100 pending and new.
                let open = i % 100 == 0;
                tx.prepare_cached(
                "INSERT INTO export_jobs (id, company_id, status, created_at, expires_in, expires_at, number_of_items, raw_json, first_seen_at, last_seen_at, proc_state, proc_state_at) VALUES (?1, ?2, ?3, ?4, 3600, ?5, 1, '{}', 0, 0, ?6, 0)",
            )?
            .execute(rusqlite::params![
                format!("j{i:08}"),
                format!("c{}", (i / 100) % 20),
                if open { "pending" } else { "completed" },
                1_700_000_000_000i64 + i as i64,
                4_000_000_000_000i64,
                if open { "new" } else { "done" }
            ])?;
            }
            tx.commit()?;
            st.conn().execute_batch("ANALYZE")?;
            let mut samples = Vec::with_capacity(2000);
            let with_work = (n / 100).clamp(1, 20);
            for k in 0..2000 {
                let t = Instant::now();
                let got = st.pick_next(&format!("c{}", k % with_work))?;
                samples.push(t.elapsed());
                anyhow::ensure!(got.is_some(), "pick found nothing");
            }
            samples.sort();
            let us = percentile(&samples, 0.5).as_secs_f64() * 1e6;
            pick_medians.push((n, us));
        }
        let base = pick_medians[0].1;
        for (n, us) in &pick_medians {
            let last = *n == *sizes.pick_sizes.last().unwrap_or(&0);
            figures.push(fig(
                &format!("pick query median @{n} rows"),
                *us,
                "us",
                Some(("smallest table", base)),
                if last {
                    "<= 50 us and <= 2x smallest"
                } else {
                    "(info)"
                },
                !last || (*us <= 50.0 && *us <= 2.0 * base.max(1.0)),
            ));
        }
    }

    // --- 4: reaction time, webhook 2xx to `started` at the fake -------------------------------
    if want("reaction") {
        let fake3 = start_fake(&clock)?;
        let port3 = free_port()?;
        let rc: Vec<String> = (0..sizes.reaction_samples)
            .map(|i| format!("r{i:04}"))
            .collect();
        let env3 = service_env(
            &fake3,
            &dir.join("reaction.db"),
            &dir.join("outbox3"),
            &rc.join(","),
            port3,
        );
        let (service3, _) = ServiceChild::start(&exe, &env3)?;
        let url3 = format!("http://127.0.0.1:{port3}/webhooks/pleo");
        let a = agent();
        let mut reactions = Vec::new();
        for (i, c) in rc.iter().enumerate() {
            let job = fake3.add_job(JobSpec {
                id: Some(format!("job-{c}")),
                company_id: c.clone(),
                items: Some(1),
                ..JobSpec::default()
            })?;
            let body = json!({"data": fake3.job(&job).map(|j| j.to_json()), "eventId": format!("e{i}"), "eventType": "v1.export-job.created"}).to_string();
            let before = fake3.requests().len();
            let status = post_signed(&a, &url3, &secrets, &format!("msg_r{i}"), body.as_bytes());
            let t = Instant::now();
            anyhow::ensure!(status == 200, "webhook answered {status}");
            let seen = fake3.wait_for_requests(Duration::from_secs(10), |reqs| {
                reqs[before.min(reqs.len())..].iter().any(|r| {
                    r.path == "/v3/export-job-events"
                        && r.body.contains(&job)
                        && r.body.contains("started")
                })
            });
            anyhow::ensure!(seen, "no started for {job}");
            reactions.push(t.elapsed());
            // Measure from idle: let the job finish before the next webhook (one processor).
            let finished = fake3.wait_for_requests(Duration::from_secs(10), |reqs| {
                reqs[before.min(reqs.len())..].iter().any(|r| {
                    r.path == "/v3/export-job-events"
                        && r.body.contains(&job)
                        && r.body.contains("completed")
                })
            });
            anyhow::ensure!(finished, "{job} did not finish");
        }
        drop(service3);
        reactions.sort();
        let p50 = percentile(&reactions, 0.5).as_secs_f64() * 1000.0;
        let p99r = percentile(&reactions, 0.99).as_secs_f64() * 1000.0;
        figures.push(fig(
            "reaction webhook 2xx -> started p50",
            p50,
            "ms",
            None,
            "<= 5 ms",
            p50 <= 5.0,
        ));
        figures.push(fig(
            "reaction webhook 2xx -> started p99",
            p99r,
            "ms",
            None,
            "<= 50 ms",
            p99r <= 50.0,
        ));
        drop(fake3);
    }

    // --- 5: processing one big job through outbox: ---------------------------------------------
    if want("processing") {
        let fake4 = start_fake(&clock)?;
        fake4.add_job(JobSpec {
            id: Some("big".into()),
            company_id: "p".into(),
            created_secs_ago: Some(10),
            items: Some(sizes.processing_items),
            ..JobSpec::default()
        })?;
        let client4 = Arc::new(PleoClient::new(
            ClientConfig::new(&fake4.base_url(), Auth::ApiKey(Secret::new(KEY))),
            clock.clone(),
        )?);
        let pdb = dir.join("processing.db");
        crate::service::sync::Mirror::new(
            Store::open(&pdb)?,
            crate::pleo::Clients::single(client4.clone()),
            clock.clone(),
            vec!["p".into()],
        )
        .pass(crate::service::sync::PassKind::Recovery);
        let stage = crate::processing::pipeline::HandlerStage::new(
            crate::pleo::Clients::single(client4.clone()),
            clock.clone(),
            crate::processing::handler::HandlerSpec::Outbox(dir.join("outbox4")),
            crate::processing::pipeline::PipelineConfig::default(),
        );
        let mut p = crate::service::processor::Processor::new(
            Store::open(&pdb)?,
            crate::pleo::Clients::single(client4),
            clock.clone(),
            vec!["p".into()],
            crate::service::processor::ProcessorConfig::default(),
        )
        .with_stage(Box::new(stage));
        let t = Instant::now();
        let r = p.round();
        let secs = t.elapsed().as_secs_f64();
        anyhow::ensure!(
            r.finished == ["big"],
            "the job did not finish: {:?}",
            r.errors
        );
        let items_rate = sizes.processing_items as f64 / secs;
        figures.push(fig(
            &format!("processing ({} items, outbox)", sizes.processing_items),
            items_rate,
            "items/s",
            None,
            ">= 2000 items/s",
            items_rate >= 2000.0,
        ));
        drop(fake4);
    }

    // --- 6: footprint ----------------------------------------------------------------------------
    let binary = std::fs::metadata(&exe).map(|m| m.len()).unwrap_or(0) as f64 / 1_048_576.0;
    figures.push(fig(
        "idle RSS",
        idle_rss as f64 / 1024.0,
        "MiB",
        None,
        "<= 15 MiB",
        idle_rss as f64 / 1024.0 <= 15.0,
    ));
    let peak = peak_rss.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1024.0;
    figures.push(fig(
        "RSS under ingest load",
        peak,
        "MiB",
        None,
        "<= 50 MiB",
        peak <= 50.0,
    ));
    figures.push(fig(
        "binary size (this build)",
        binary,
        "MiB",
        None,
        "<= 10 MiB stripped release",
        binary <= 10.0,
    ));
    let ready_ms = ready.as_secs_f64() * 1000.0;
    figures.push(fig(
        "start to ready (recovery pass done)",
        ready_ms,
        "ms",
        None,
        "<= 100 ms",
        ready_ms <= 100.0,
    ));

    let summary = json!({
        "mode": if smoke { "smoke" } else { "full" },
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "figures": figures,
    });
    let out = json_out.unwrap_or_else(|| dir.join("bench.json"));
    std::fs::write(&out, serde_json::to_string_pretty(&summary)? + "\n")?;
    println!("summary written to {}", out.display());
    let _ = std::fs::remove_dir_all(dir.join("outbox4"));
    Ok(())
}

/// For tests: the figures in a summary file.
pub fn read_summary(path: &Path) -> anyhow::Result<Vec<Value>> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    Ok(v["figures"].as_array().cloned().unwrap_or_default())
}
