//! Section "shared" (`--postgres URL`): three instances sharing a PostgreSQL database against
//! one instance on SQLite, in the same run and on the same fake: webhook 2xx to `started`
//! (p50/p99, the webhook sent to any instance, as behind a load balancer), jobs a second and
//! API requests a job for a batch, and the takeover time after a kill -9. A fresh database is
//! made on the server the URL names (its user may create databases) and dropped at the end;
//! the password comes from `PGPASSWORD`.

use std::time::{Duration, Instant};

use crate::bench::harness::*;
use crate::sandbox::{FakePleo, JobSpec};
use crate::store::pg::PgTarget;

/// The lease the bench runs with (the default is 30 s; a kill costs at most this plus a round).
const LEASE_SECS: u64 = 5;

struct Backend {
    label: &'static str,
    services: Vec<ServiceChild>,
    ports: Vec<u16>,
}

fn password() -> Option<crate::wire::Secret> {
    std::env::var("PGPASSWORD")
        .ok()
        .map(crate::wire::Secret::new)
}

/// `url` with its database name replaced by `name`.
fn with_dbname(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let cut = base
        .rfind('/')
        .filter(|i| *i > base.find("//").unwrap_or(0) + 1);
    let mut out = match cut {
        Some(i) => format!("{}/{name}", &base[..i]),
        None => format!("{base}/{name}"),
    };
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

fn start(
    cx: &Ctx,
    fake: &FakePleo,
    companies: &[String],
    label: &'static str,
    shared: Option<(&str, &std::path::Path)>,
) -> anyhow::Result<Backend> {
    let n = if shared.is_some() { 3 } else { 1 };
    let mut services = Vec::new();
    let mut ports = Vec::new();
    for i in 0..n {
        let port = free_port()?;
        let mut env = service_env(
            fake,
            &cx.dir.join(format!("shared-{label}.db")),
            &cx.dir.join(format!("outbox-{label}-{i}")),
            &companies.join(","),
            port,
        );
        if let Some((url, pw)) = shared {
            env.retain(|(k, _)| *k != "JOBMIRROR_DB");
            env.push(("JOBMIRROR_DB", url.to_owned()));
            env.push(("JOBMIRROR_DB_PASSWORD_FILE", pw.display().to_string()));
            env.push(("JOBMIRROR_INSTANCE_NAME", format!("bench-{i}")));
            env.push(("JOBMIRROR_COMPANY_LEASE_SECS", LEASE_SECS.to_string()));
        }
        let mut s = ServiceChild::spawn(&cx.exe, &env)?;
        s.wait_line("jobmirror started", Duration::from_secs(60))?;
        services.push(s);
        ports.push(port);
    }
    Ok(Backend {
        label,
        services,
        ports,
    })
}

/// Whether the requests after the first `since` hold the job's final `completed`.
fn completed(reqs: &[crate::sandbox::LoggedRequest], since: usize, job: &str) -> bool {
    reqs[since.min(reqs.len())..].iter().any(|r| {
        r.path == "/v3/export-job-events" && r.body.contains(job) && r.body.contains("completed")
    })
}

/// Reaction samples, then a batch; returns (p50 ms, p99 ms, jobs/s, requests a job).
fn measure(
    cx: &Ctx,
    fake: &FakePleo,
    b: &Backend,
    companies: &[String],
    samples: usize,
    batch: usize,
) -> anyhow::Result<(f64, f64, f64, f64)> {
    let a = agent();
    let url = |i: usize| {
        format!(
            "http://127.0.0.1:{}/webhooks/pleo",
            b.ports[i % b.ports.len()]
        )
    };
    let mut reactions = Vec::new();
    for i in 0..samples {
        let c = &companies[i % companies.len()];
        let job = fake.add_job(JobSpec {
            id: Some(format!("{}-r{i}", b.label)),
            company_id: c.clone(),
            items: Some(1),
            ..JobSpec::default()
        })?;
        let before = fake.requests().len();
        let body = body_for(&job, c);
        let status = post_signed(
            &a,
            &url(i),
            &cx.secrets,
            &format!("msg_{}_{i}", b.label),
            &body,
        );
        let t = Instant::now();
        anyhow::ensure!(status == 200, "webhook answered {status}");
        let seen = fake.wait_for_requests(Duration::from_secs(30), |reqs| {
            reqs[before.min(reqs.len())..].iter().any(|r| {
                r.path == "/v3/export-job-events"
                    && r.body.contains(&job)
                    && r.body.contains("started")
            })
        });
        anyhow::ensure!(seen, "{}: no started for {job}", b.label);
        reactions.push(t.elapsed());
        let done = fake.wait_for_requests(Duration::from_secs(30), |reqs| {
            completed(reqs, before, &job)
        });
        anyhow::ensure!(done, "{}: {job} did not finish", b.label);
    }
    reactions.sort();
    let p50 = percentile(&reactions, 0.5).as_secs_f64() * 1000.0;
    let p99 = percentile(&reactions, 0.99).as_secs_f64() * 1000.0;
    // The batch: every job announced by its webhook at once, spread over the instances.
    let before = fake.requests().len();
    let mut ids = Vec::new();
    for i in 0..batch {
        let c = &companies[i % companies.len()];
        ids.push(fake.add_job(JobSpec {
            id: Some(format!("{}-b{i}", b.label)),
            company_id: c.clone(),
            items: Some(1),
            ..JobSpec::default()
        })?);
    }
    let t = Instant::now();
    for (i, job) in ids.iter().enumerate() {
        let c = &companies[i % companies.len()];
        let status = post_signed(
            &a,
            &url(i),
            &cx.secrets,
            &format!("msg_{}_b{i}", b.label),
            &body_for(job, c),
        );
        anyhow::ensure!(status == 200, "webhook answered {status}");
    }
    let all = fake.wait_for_requests(Duration::from_secs(300), |reqs| {
        let tail = &reqs[before.min(reqs.len())..];
        tail.iter()
            .filter(|r| r.path == "/v3/export-job-events" && r.body.contains("completed"))
            .count()
            >= batch
    });
    anyhow::ensure!(all, "{}: the batch did not finish", b.label);
    let secs = t.elapsed().as_secs_f64();
    let requests = fake.requests().len() - before;
    Ok((
        p50,
        p99,
        batch as f64 / secs,
        requests as f64 / batch as f64,
    ))
}

pub(crate) fn shared(cx: &Ctx, url: &str, figures: &mut Vec<Figure>) -> anyhow::Result<()> {
    let admin = PgTarget::parse(url, password())?;
    let mut admin_store = admin.connect()?;
    let name = format!("jm_bench_{}", std::process::id());
    for sql in [
        format!("DROP DATABASE IF EXISTS {name}"),
        format!("CREATE DATABASE {name}"),
    ] {
        admin_store.client().batch_execute(&sql)?;
    }
    let db_url = with_dbname(&admin.to_string(), &name);
    let pw = cx.dir.join("pg-password");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&pw)?;
        writeln!(
            f,
            "{}",
            password()
                .map(|p| p.expose().to_owned())
                .unwrap_or_default()
        )?;
    }
    let result = run_both(cx, &db_url, &pw, figures);
    let _ = admin_store
        .client()
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
    result
}

fn run_both(
    cx: &Ctx,
    db_url: &str,
    pw: &std::path::Path,
    figures: &mut Vec<Figure>,
) -> anyhow::Result<()> {
    let sizes = &cx.sizes;
    let (companies_n, samples, batch) = if sizes.reaction_samples < 50 {
        (6, 6, 12)
    } else {
        (30, 60, 300)
    };
    let companies: Vec<String> = (0..companies_n)
        .map(|i| format!("5a4eb000-0000-4000-8000-{i:012}"))
        .collect();
    // One instance on SQLite: the baseline.
    let fake = start_fake(&cx.clock)?;
    let lite = start(cx, &fake, &companies, "sqlite", None)?;
    let (l50, l99, ljobs, lreq) = measure(cx, &fake, &lite, &companies, samples, batch)?;
    drop(lite);
    drop(fake);
    // Three instances on PostgreSQL: all companies held before measuring.
    let fake = start_fake(&cx.clock)?;
    let pg = start(cx, &fake, &companies, "postgres", Some((db_url, pw)))?;
    let target = PgTarget::parse(db_url, password())?;
    let mut st = target.connect()?;
    let held = |st: &mut crate::store::pg::PgStore| -> anyhow::Result<(i64, i64)> {
        let r = st.client().query_one(
            "SELECT count(*), count(DISTINCT holder) FROM company_leases
              WHERE holder IS NOT NULL AND expires_at > jm_now_ms()",
            &[],
        )?;
        Ok((r.get(0), r.get(1)))
    };
    let settle = Instant::now() + Duration::from_secs(30);
    while held(&mut st)? != (companies_n as i64, 3) && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(50));
    }
    let (p50, p99, jobs, req) = measure(cx, &fake, &pg, &companies, samples, batch)?;
    // kill -9 of one instance: how long until every company is held again.
    let mut pg = pg;
    let mut victim = pg.services.remove(0);
    let killed_at: i64 = st.client().query_one("SELECT jm_now_ms()", &[])?.get(0);
    victim.child.kill()?;
    victim.child.wait()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let back_at = loop {
        let r = st.client().query_one(
            "SELECT count(*) FILTER (WHERE holder <> 'bench-0' AND expires_at > jm_now_ms()),
                    jm_now_ms()
               FROM company_leases",
            &[],
        )?;
        let (n, now): (i64, i64) = (r.get(0), r.get(1));
        if n == companies_n as i64 {
            break now;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the companies were not taken over"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let takeover = (back_at - killed_at) as f64 / 1000.0;
    drop(pg);
    let bound = LEASE_SECS as f64 * 4.0 / 3.0;
    figures.push(fig(
        "reaction, 3 x PostgreSQL p50",
        p50,
        "ms",
        Some(("1 x SQLite", l50)),
        "<= 5x SQLite",
        p50 <= 5.0 * l50.max(1.0),
    ));
    figures.push(fig(
        "reaction, 3 x PostgreSQL p99",
        p99,
        "ms",
        Some(("1 x SQLite", l99)),
        "<= 50 ms",
        p99 <= 50.0,
    ));
    figures.push(fig(
        "batch jobs/s, 3 x PostgreSQL",
        jobs,
        "jobs/s",
        Some(("1 x SQLite", ljobs)),
        ">= 0.5x SQLite",
        jobs >= 0.5 * ljobs,
    ));
    figures.push(fig(
        "API requests a job, 3 x PostgreSQL",
        req,
        "req",
        Some(("1 x SQLite", lreq)),
        "<= SQLite + 1",
        req <= lreq + 1.0,
    ));
    figures.push(fig(
        &format!("takeover after kill -9 (lease {LEASE_SECS} s)"),
        takeover,
        "s",
        None,
        &format!("<= lease + a round ({bound:.1} s)"),
        takeover <= bound,
    ));
    Ok(())
}
