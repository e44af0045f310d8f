//! `jobmirror demo`: the real service against a fake Pleo on a loopback port, with the
//! bundled fixture (`fixtures/demo.json`), until every company has settled; then a report.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::bounded;

use crate::clock::{SharedClock, SystemClock, monotonic};
use crate::config::Config;
use crate::fake::{FakeConfig, FakePleo, Fixture};
use crate::service::Service;
use crate::store::Store;

pub const DEMO_FIXTURE: &str = include_str!("../fixtures/demo.json");
/// A company with no jobs at the start: its first job arrives by webhook during the demo.
pub const WEBHOOK_COMPANY: &str = "dddddddd-0000-4000-8000-0000000delta";

pub fn run(db: Option<PathBuf>) -> anyhow::Result<()> {
    crate::cli::init_logging(log::LevelFilter::Warn);
    let clock: SharedClock = Arc::new(SystemClock);
    let fixture: Fixture = serde_json::from_str(DEMO_FIXTURE)?;
    let fake = FakePleo::start("127.0.0.1:0", FakeConfig::default(), clock.clone())?;
    fake.load_fixture(&fixture)?;
    let companies = fixture.companies();
    let mut served = companies.clone();
    served.push(WEBHOOK_COMPANY.to_owned());

    // Subscribe our receiver with the fake, as `jobmirror subscribe` does with Pleo.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let webhook_url = format!("http://127.0.0.1:{port}{}", crate::webhook::PATH);
    let api = crate::pleo::PleoClient::new(
        crate::pleo::ClientConfig::new(
            &fake.base_url(),
            crate::pleo::Auth::ApiKey(crate::pleo::Secret::new(fake.api_key())),
        ),
        clock.clone(),
    )?;
    let (_subscription, secret) =
        api.subscribe(&webhook_url, &["v1.export-job.created".to_owned()])?;

    let db = match db {
        Some(p) => p,
        None => {
            let dir = std::env::temp_dir().join(format!(
                "jobmirror-demo-{}-{}",
                std::process::id(),
                clock.now().0
            ));
            std::fs::create_dir_all(&dir)?;
            dir.join("jobmirror.db")
        }
    };
    if db.exists() {
        anyhow::bail!(
            "{} already exists; the demo wants a fresh database",
            db.display()
        );
    }
    let env = [
        ("JOBMIRROR_DB", db.display().to_string()),
        ("JOBMIRROR_PLEO_BASE_URL", fake.base_url()),
        ("JOBMIRROR_PLEO_API_KEY", fake.api_key()),
        ("JOBMIRROR_COMPANY_IDS", served.join(",")),
        ("JOBMIRROR_POLL_INTERVAL_SECS", "300".to_owned()),
        ("JOBMIRROR_WEBHOOK_LISTEN", format!("127.0.0.1:{port}")),
        ("JOBMIRROR_WEBHOOK_SECRET", secret.expose().to_owned()),
    ];
    let cfg = Config::load_with(None, &|k| {
        env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
    })?;

    println!("jobmirror demo");
    println!(
        "  fake Pleo:  {} ({} jobs for {} companies)",
        fake.base_url(),
        fixture.jobs.len(),
        companies.len()
    );
    println!("  database:   {}", db.display());
    println!();

    let (progress_tx, progress_rx) = bounded(64);
    let service = Service::start(&cfg, clock.clone(), Some(progress_tx))?;
    let watcher = Store::open_read_only(&db)?;
    let deadline = monotonic() + Duration::from_secs(30);
    let mut settled = false;
    while !settled {
        let left = deadline.saturating_duration_since(monotonic());
        if left.is_zero() || progress_rx.recv_timeout(left).is_err() {
            break;
        }
        settled = is_settled(&watcher, &companies, clock.now())?;
    }
    if !settled {
        service.stop(Duration::from_secs(10));
        anyhow::bail!("the demo did not settle within 30 s; see {}", db.display());
    }

    // A user clicks Export for delta: the fake creates the job and sends a signed webhook.
    // Polling is 5 minutes away, so a quick claim can only come from the webhook.
    let t0 = monotonic();
    let new_job = fake.add_job(crate::fake::JobSpec {
        company_id: WEBHOOK_COMPANY.into(),
        items: Some(3),
        ..Default::default()
    })?;
    let mut webhook_claim_ms = None;
    while webhook_claim_ms.is_none() {
        let left = Duration::from_secs(10).saturating_sub(t0.elapsed());
        match progress_rx.recv_timeout(left) {
            Ok(report) if report.claimed.contains(&new_job) => {
                webhook_claim_ms = Some(t0.elapsed().as_millis())
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    service.stop(Duration::from_secs(10));
    let Some(webhook_claim_ms) = webhook_claim_ms else {
        anyhow::bail!(
            "the job announced by webhook was not claimed within 10 s; see {}",
            db.display()
        );
    };
    let mut companies = companies;
    companies.push(WEBHOOK_COMPANY.to_owned());

    let store = Store::open_read_only(&db)?;
    for company in &companies {
        println!("company {company}");
        let mut stmt = store.conn().prepare(
            "SELECT id, status, proc_state, created_at FROM export_jobs WHERE company_id = ?1 ORDER BY created_at, id",
        )?;
        let rows = stmt.query_map([company], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?;
        for row in rows {
            let (id, status, state, created) = row?;
            let started = fake.started_events_for(&id);
            println!(
                "  job {id}  created {}  pleo={status:<12} jobmirror={state:<10} started sent {started}x",
                crate::clock::Millis(created)
            );
        }
    }
    println!();
    println!("journal (job_events):");
    for e in store.events(None)? {
        println!(
            "  {}  {:<18} {}  {}",
            e.at,
            e.kind,
            e.job_id.as_deref().unwrap_or("-"),
            e.detail
        );
    }
    let reqs = fake.requests();
    let gets = reqs.iter().filter(|r| r.method == "GET").count();
    println!();
    println!(
        "the fake received {} requests: {} GET, {} other",
        reqs.len(),
        gets,
        reqs.len() - gets
    );
    println!();
    println!("What happened:");
    println!(
        "  - acme: the in_progress job found at start-up was resumed without sending `started`;"
    );
    println!("    the younger jobs wait, one job at a time per company.");
    println!(
        "  - bravo: another integration grabbed the oldest job between our check and our claim (422);"
    );
    println!("    jobmirror journaled the conflict and claimed the next oldest.");
    println!(
        "  - charlie: listed out of order; the oldest job had too little time left and was left alone,"
    );
    println!("    the next oldest was claimed.");
    println!(
        "  - delta: a job created while jobmirror ran was announced by a signed webhook and claimed"
    );
    println!("    {webhook_claim_ms} ms later (the next poll was 5 minutes away).");
    println!();
    println!("Inspect it yourself:");
    println!(
        "  sqlite3 {} 'SELECT company_id, id, status, proc_state FROM export_jobs ORDER BY company_id, created_at'",
        db.display()
    );
    println!("  jobmirror status  (with JOBMIRROR_DB={})", db.display());
    Ok(())
}

/// Every company was recovered and has either a job in hand or nothing left to claim.
fn is_settled(
    store: &Store,
    companies: &[String],
    now: crate::clock::Millis,
) -> anyhow::Result<bool> {
    for c in companies {
        let recovered: i64 = store.conn().query_row(
            "SELECT count(*) FROM sync_runs WHERE company_id = ?1 AND kind = 'recovery' AND finished_at IS NOT NULL AND error IS NULL",
            [c],
            |r| r.get(0),
        )?;
        if recovered == 0 {
            return Ok(false);
        }
        let busy = store
            .active_job(c)?
            .is_some_and(|j| j.proc_state == crate::store::ProcState::Processing);
        if !busy && store.pick_next(c, now, 0)?.is_some() {
            return Ok(false);
        }
    }
    Ok(true)
}
