//! `jobmirror demo`: the real service against a fake Pleo on a loopback port, with the
//! bundled fixture (`fixtures/demo.json`) and the built-in `outbox:` handler, until every
//! company has settled; then a job arrives by webhook; then a report.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::bounded;

use crate::clock::{Millis, SharedClock, SystemClock, monotonic};
use crate::config::Config;
use crate::pleo::{Auth, ClientConfig, PleoClient, Secret};
use crate::sandbox::{FakeConfig, FakePleo, Fixture};
use crate::service::Service;
use crate::store::Store;

pub const DEMO_FIXTURE: &str = include_str!("../fixtures/demo.json");
/// A company with no jobs at the start: its first job arrives by webhook during the demo.
pub const WEBHOOK_COMPANY: &str = "dddddddd-0000-4000-8000-00000000de17";

pub fn run(db: Option<PathBuf>) -> anyhow::Result<()> {
    crate::logging::init(log::LevelFilter::Warn, crate::logging::LogFormat::Text);
    let clock: SharedClock = Arc::new(SystemClock);
    let fixture: Fixture = serde_json::from_str(DEMO_FIXTURE)?;
    let fake = FakePleo::start("127.0.0.1:0", FakeConfig::default(), clock.clone())?;
    fake.load_fixture(&fixture)?;
    let mut companies = fixture.companies();
    companies.push(WEBHOOK_COMPANY.to_owned());

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
    let outbox = db
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .join("outbox");

    // Subscribe our receiver with the fake, as `jobmirror subscribe` does with Pleo.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let api = PleoClient::new(
        ClientConfig::new(&fake.base_url(), Auth::ApiKey(Secret::new(fake.api_key()))),
        clock.clone(),
    )?;
    let url = format!("http://127.0.0.1:{port}{}", crate::edge::webhook::PATH);
    let (_subscription, secret) = api.subscribe(&url, &["v1.export-job.created".to_owned()])?;

    let env = [
        ("JOBMIRROR_DB", db.display().to_string()),
        ("JOBMIRROR_PLEO_BASE_URL", fake.base_url()),
        ("JOBMIRROR_PLEO_API_KEY", fake.api_key()),
        ("JOBMIRROR_COMPANY_IDS", companies.join(",")),
        ("JOBMIRROR_POLL_INTERVAL_SECS", "300".to_owned()),
        ("JOBMIRROR_ADMIN_LISTEN", "127.0.0.1:0".to_owned()),
        (
            "JOBMIRROR_HANDLER_COMMAND",
            format!("outbox:{}", outbox.display()),
        ),
        ("JOBMIRROR_WEBHOOK_LISTEN", format!("127.0.0.1:{port}")),
        ("JOBMIRROR_WEBHOOK_SECRET", secret.expose().to_owned()),
        // acme's job was claimed by a previous run whose database is gone: take it back.
        ("JOBMIRROR_RESUME_UNKNOWN_IN_PROGRESS", "true".to_owned()),
    ];
    let cfg = Config::load_with(None, &|k| {
        env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
    })?;

    println!("jobmirror demo");
    println!(
        "  fake Pleo:  {} ({} jobs for {} companies)",
        fake.base_url(),
        fixture.jobs.len(),
        companies.len() - 1
    );
    println!("  database:   {}", db.display());
    println!(
        "  handler:    outbox:{} (one JSON file per exported item)",
        outbox.display()
    );
    println!();

    let (progress_tx, progress_rx) = bounded(256);
    let service = Service::start(&cfg, clock.clone(), Some(progress_tx))?;
    let watcher = Store::open_read_only(&db)?;
    let wait_until =
        |what: &str,
         done: &dyn Fn(&crate::service::processor::RoundReport) -> anyhow::Result<bool>|
         -> anyhow::Result<()> {
            let deadline = monotonic() + Duration::from_secs(30);
            loop {
                let left = deadline.saturating_duration_since(monotonic());
                match progress_rx.recv_timeout(left) {
                    Ok(r) if done(&r)? => return Ok(()),
                    Ok(_) => {}
                    Err(_) => anyhow::bail!(
                        "the demo did not get to {what} within 30 s; see {}",
                        db.display()
                    ),
                }
            }
        };
    let settled = wait_until("a settled state", &|_| {
        is_settled(&watcher, &companies[..companies.len() - 1])
    });

    // A user clicks Export for delta: the fake creates the job and sends a signed webhook.
    // Polling is 5 minutes away, so a quick claim can only come from the webhook.
    let t0 = monotonic();
    let claimed = settled.and_then(|_| {
        let job = fake.add_job(crate::sandbox::JobSpec {
            company_id: WEBHOOK_COMPANY.into(),
            items: Some(3),
            ..Default::default()
        })?;
        wait_until("the webhook's job", &|r| Ok(r.claimed.contains(&job)))
    });
    let webhook_claim_ms = t0.elapsed().as_millis();
    service.stop(Duration::from_secs(10));
    claimed?;

    let store = Store::open_read_only(&db)?;
    for company in &companies {
        println!("company {company}");
        let mut stmt = store.conn().prepare(
            "SELECT id, status, proc_state, created_at, \
             (SELECT count(*) FROM job_items i WHERE i.job_id = j.id AND our_status = 'successful'), \
             (SELECT count(*) FROM job_items i WHERE i.job_id = j.id AND our_status = 'failed') \
             FROM export_jobs j WHERE company_id = ?1 ORDER BY created_at, id",
        )?;
        let rows = stmt.query_map([company], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
            ))
        })?;
        for row in rows {
            let (id, status, state, created, ok, failed) = row?;
            let started = fake.started_events_for(&id);
            println!(
                "  job {id}  created {}  pleo={status:<21} jobmirror={state:<10} started sent {started}x  items ok {ok} failed {failed}",
                Millis(created)
            );
        }
    }
    println!();
    println!("journal (job_events), oldest first:");
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
        "  - acme: the in_progress job found at start-up was resumed without sending `started`, then"
    );
    println!("    the younger jobs were processed one at a time, oldest first.");
    println!(
        "  - bravo: another integration grabbed the oldest job between our check and our claim (422);"
    );
    println!(
        "    jobmirror journaled the conflict and took the next oldest. One of its items has no GL"
    );
    println!("    account, so the outbox refused it: completed_with_errors.");
    println!(
        "  - charlie: listed out of order; its oldest job had two minutes left and was still claimed"
    );
    println!("    first (`started` refreshes its deadline), then the next oldest.");
    println!("    One job's only item has no account: failed, with the reason sent to Pleo.");
    println!(
        "  - delta: a job created while jobmirror ran was announced by a signed webhook and claimed"
    );
    println!("    {webhook_claim_ms} ms later (the next poll was 5 minutes away).");
    println!();
    println!("Inspect it yourself:");
    println!(
        "  sqlite3 -readonly {} \"SELECT company_id, id, status, proc_state FROM export_jobs ORDER BY company_id, created_at\"",
        db.display()
    );
    println!(
        "  sqlite3 -readonly {} \"SELECT job_id, accounting_entry_id, our_status, failure_reason_type, datetime(reported_at / 1000, 'unixepoch') FROM job_items\"",
        db.display()
    );
    println!("  ls {}", outbox.display());
    println!("  JOBMIRROR_DB={} jobmirror status", db.display());
    // Everything into the main file, so copying the .db alone loses nothing.
    drop(store);
    Store::connect(&db)?.checkpoint()?;
    Ok(())
}

/// Every company was recovered and has nothing in hand and nothing left to claim.
fn is_settled(store: &Store, companies: &[String]) -> anyhow::Result<bool> {
    for c in companies {
        let recovered: i64 = store.conn().query_row(
            "SELECT count(*) FROM sync_runs WHERE company_id = ?1 AND kind = 'recovery' AND finished_at IS NOT NULL AND error IS NULL",
            [c],
            |r| r.get(0),
        )?;
        if recovered == 0 || store.active_job(c)?.is_some() || store.pick_next(c)?.is_some() {
            return Ok(false);
        }
    }
    Ok(true)
}
