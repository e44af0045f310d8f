//! What every bench section uses: the service binary as a child process (its RSS and CPU
//! read from `/proc`), the fake Pleo, signed webhook posts, percentiles; the sizes, the
//! figures and what each section is given.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::clock::{Clock, SharedClock, SystemClock, monotonic};
use crate::edge::webhook::{Secrets, sign_with};
use crate::sandbox::{FakeConfig, FakePleo};

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
    /// Companies and jobs in the operator tools' database.
    pub ops_companies: usize,
    pub ops_jobs: usize,
    /// The scale section's runs.
    pub scale_runs: Vec<ScaleRun>,
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
            ops_companies: 10_000,
            ops_jobs: 100_000,
            scale_runs: full_scale_runs(),
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
            ops_companies: 200,
            ops_jobs: 2_000,
            scale_runs: vec![
                ScaleRun {
                    companies: 40,
                    own_keys: true,
                    latency_ms: 20,
                    interval_secs: 4,
                    backlog_jobs: 5,
                    window_secs: 3,
                    webhook_every_ms: 500,
                    by_credential: false,
                },
                ScaleRun {
                    companies: 40,
                    own_keys: false,
                    latency_ms: 20,
                    interval_secs: 4,
                    backlog_jobs: 5,
                    // Longer than the interval, so a round always falls in the window.
                    window_secs: 5,
                    webhook_every_ms: 500,
                    by_credential: true,
                },
            ],
        }
    }
}

/// One configuration to measure.
#[derive(Clone, Debug)]
pub struct ScaleRun {
    pub companies: usize,
    /// A key per company (each with its own request budget), or one key for all.
    pub own_keys: bool,
    pub latency_ms: u64,
    pub interval_secs: u64,
    /// Companies with a pending job at start (the backlog).
    pub backlog_jobs: usize,
    /// The steady window, and how often a webhook announces a new job in it.
    pub window_secs: u64,
    pub webhook_every_ms: u64,
    /// `list_by_credential = true` (one key only).
    pub by_credential: bool,
}

/// The full scale runs: one key at 1,000 companies (polls every 60 s need 16.7 of the 20
/// requests a second), keys of their own at 1,000, 10,000 and 50,000 (polls every 300 s at
/// 50,000 need 167 listings a second), and one key listing by credential at 10,000 and 50,000
/// (listed one by one they would need 33 and 167 requests a second of the 20); every answer
/// 50 ms late but the first run's.
fn full_scale_runs() -> Vec<ScaleRun> {
    let run =
        |companies, own_keys, latency_ms, interval_secs, window_secs, webhook_every_ms| ScaleRun {
            companies,
            own_keys,
            latency_ms,
            interval_secs,
            backlog_jobs: 100,
            window_secs,
            webhook_every_ms,
            by_credential: false,
        };
    let by_credential = |r: ScaleRun| ScaleRun {
        by_credential: true,
        ..r
    };
    vec![
        run(1_000, false, 0, 60, 90, 2_000),
        run(1_000, false, 50, 60, 90, 2_000),
        run(1_000, true, 50, 60, 90, 250),
        run(10_000, true, 50, 300, 120, 250),
        run(50_000, true, 50, 300, 120, 250),
        by_credential(run(10_000, false, 50, 60, 120, 1_000)),
        by_credential(run(50_000, false, 50, 60, 120, 1_000)),
    ]
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

pub(crate) fn fig(
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

/// What every section gets: the binary under test, a work folder, the clock, the sizes and
/// the webhook secret the service under test is given.
pub(crate) struct Ctx {
    pub exe: PathBuf,
    pub dir: PathBuf,
    pub clock: SharedClock,
    pub sizes: Sizes,
    pub secrets: Secrets,
}

pub(crate) const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
pub(crate) const KEY: &str = "bench-key";

/// The service binary, started with `jobmirror run`, killed on drop.
pub(crate) struct ServiceChild {
    pub(crate) child: Child,
    lines: crossbeam_channel::Receiver<String>,
}

impl ServiceChild {
    pub(crate) fn start(
        exe: &Path,
        env: &[(&str, String)],
    ) -> anyhow::Result<(ServiceChild, Duration)> {
        let t0 = Instant::now();
        let mut s = ServiceChild::spawn(exe, env)?;
        s.wait_line("recovery pass", Duration::from_secs(60))?;
        Ok((s, t0.elapsed()))
    }

    /// Starts the service without waiting for anything.
    pub(crate) fn spawn(exe: &Path, env: &[(&str, String)]) -> anyhow::Result<ServiceChild> {
        let mut cmd = Command::new(exe);
        cmd.arg("run")
            .env_clear()
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // libfaketime's variables pass through, so a run under `faketime` shares one clock
        // (webhooks signed here verify there).
        for (k, v) in std::env::vars_os() {
            let name = k.to_string_lossy();
            if name == "LD_PRELOAD" || name.starts_with("FAKETIME") {
                cmd.env(&k, v);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        ServiceChild::spawn_with(cmd)
    }

    fn spawn_with(mut cmd: Command) -> anyhow::Result<ServiceChild> {
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
        Ok(ServiceChild { child, lines: rx })
    }

    pub(crate) fn wait_line(&mut self, needle: &str, within: Duration) -> anyhow::Result<()> {
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
    pub(crate) fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id())
    }
}

impl Drop for ServiceChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn rss_kib(pid: u32) -> u64 {
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
pub(crate) fn task_cpu(pid: u32) -> Duration {
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
pub(crate) fn machine_ticks() -> (u64, u64) {
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

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub(crate) fn agent() -> ureq::Agent {
    crate::pleo::net::agent(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build(),
    )
}

pub(crate) fn start_fake(clock: &SharedClock) -> anyhow::Result<FakePleo> {
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
pub(crate) fn service_env(
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

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A realistic (about 1.5 KiB) webhook body for a job id.
pub(crate) fn body_for(job_id: &str, company: &str) -> Vec<u8> {
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

pub(crate) fn post_signed(
    agent: &ureq::Agent,
    url: &str,
    secrets: &Secrets,
    id: &str,
    body: &[u8],
) -> u16 {
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
