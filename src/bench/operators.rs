//! Section 6: operator tools at scale. A database as a year of service would leave it, with
//! many companies and many finished jobs, then the real binary's `status`, `doctor` and
//! `jobs` against it, one `/metrics` rendering over it, and what quiet polls leave behind.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::bench::harness::{Ctx, Figure, fig};
use crate::clock::Millis;
use crate::store::{Delivery, Store, SyncCounts};

const T0: i64 = 1_780_000_000_000;

pub(crate) fn operators(cx: &Ctx, figures: &mut Vec<Figure>) -> anyhow::Result<()> {
    let (n_companies, n_jobs) = (cx.sizes.ops_companies, cx.sizes.ops_jobs);
    let db = cx.dir.join("operators.db");
    let st = Store::open(&db)?;
    let company = |c: usize| format!("{c:08x}-0000-4000-8000-000000000000");
    let t = Instant::now();
    {
        let tx = st.conn().unchecked_transaction()?;
        for i in 0..n_jobs {
            let c = company(i % n_companies);
            // One company in ten has a job waiting; the rest are finished, as after a year.
            let open = i < n_companies && i % 10 == 0;
            let id = format!("{i:08x}-1111-4000-8000-000000000000");
            tx.prepare_cached(
                "INSERT INTO export_jobs (id, company_id, status, created_at, expires_in, expires_at, \
                 number_of_items, raw_json, first_seen_at, last_seen_at, proc_state, proc_state_at) \
                 VALUES (?1, ?2, ?3, ?4, 3600, ?5, 1, '{}', ?4, ?4, ?6, ?4)",
            )?
            .execute(rusqlite::params![
                id,
                c,
                if open { "pending" } else { "completed" },
                T0 + i as i64,
                T0 + i as i64 + 3_600_000,
                if open { "new" } else { "done" },
            ])?;
            if !open {
                for (kind, detail) in [
                    ("claimed", json!({})),
                    ("finish_sent", json!({"event": "completed"})),
                    ("finished", json!({})),
                ] {
                    tx.prepare_cached(
                        "INSERT INTO job_events (at, job_id, company_id, kind, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
                    )?
                    .execute(rusqlite::params![T0 + i as i64, id, c, kind, detail.to_string()])?;
                }
            }
        }
        tx.commit()?;
    }
    // Every company: a recovery pass and quiet polls, one in fifty with a failed last pass,
    // and one webhook delivery.
    let quiet_polls = 3;
    for c in 0..n_companies {
        let id = company(c);
        let now = Millis(T0 + 10_000_000);
        let run = st.begin_sync_run(&id, "recovery", now)?;
        st.finish_sync_run(run, now, &SyncCounts::default(), None)?;
        for p in 0..quiet_polls {
            let at = Millis(now.0 + 300_000 * (p + 1));
            let run = st.begin_sync_run(&id, "poll", at)?;
            let error =
                (c % 50 == 0 && p == quiet_polls - 1).then_some("500 Internal Server Error");
            st.finish_sync_run(run, at, &SyncCounts::default(), error)?;
        }
    }
    let deliveries: Vec<Delivery> = (0..n_companies)
        .map(|c| Delivery {
            webhook_id: format!("msg_{c}"),
            signed_at: Millis(T0),
            event_type: Some("v1.export-job.created".into()),
            event_id: None,
            job_id: None,
            company_id: Some(company(c)),
            body: "{}".into(),
            headers: json!({}),
        })
        .collect();
    for chunk in deliveries.chunks(500) {
        st.insert_deliveries(&chunk.iter().collect::<Vec<_>>(), Millis(T0))?;
    }
    st.checkpoint()?;
    let build_secs = t.elapsed().as_secs_f64();
    let sync_rows: i64 = st
        .conn()
        .query_row("SELECT count(*) FROM sync_runs", [], |r| r.get(0))?;
    let passes = n_companies as i64 * (1 + quiet_polls);
    figures.push(fig(
        &format!("sync_runs rows after {passes} passes"),
        sync_rows as f64,
        "rows",
        None,
        "one per recovery or failed pass, none per quiet poll",
        sync_rows == n_companies as i64 + (n_companies as i64 + 49) / 50,
    ));
    let label = format!("{n_companies} companies, {n_jobs} jobs");
    for (name, args) in [
        ("status", vec!["status", "--json"]),
        ("doctor", vec!["doctor", "--json"]),
        ("jobs", vec!["jobs", "--json"]),
    ] {
        let t = Instant::now();
        let out = Command::new(&cx.exe)
            .args(&args)
            .arg("--db")
            .arg(&db)
            .output()?;
        let secs = t.elapsed().as_secs_f64();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
            anyhow::anyhow!(
                "{name} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        anyhow::ensure!(!v.is_null(), "{name} printed null");
        figures.push(fig(
            &format!("`{name}` ({label})"),
            secs * 1000.0,
            "ms",
            None,
            "<= 1000 ms",
            secs <= 1.0,
        ));
    }
    let admin = crate::ops::admin::Admin {
        http: Vec::new(),
        started_at: 0.0,
        progress: Arc::new(crate::health::Progress::new(Duration::from_secs(10))),
        metrics: Arc::default(),
        webhooks: None,
        store: std::sync::Mutex::new(Store::open_read_only(&db)?),
    };
    let t = Instant::now();
    let text = admin.render();
    let scrape_ms = t.elapsed().as_secs_f64() * 1000.0;
    anyhow::ensure!(
        text.contains(&format!(
            "jobmirror_finished_total{{outcome=\"completed\"}} {}",
            n_jobs - n_companies / 10
        )),
        "the scrape does not count the finished jobs"
    );
    figures.push(fig(
        &format!("/metrics rendering ({label})"),
        scrape_ms,
        "ms",
        None,
        "<= 1000 ms",
        scrape_ms <= 1000.0,
    ));
    figures.push(fig(
        "  building that database",
        build_secs,
        "s",
        None,
        "(info)",
        true,
    ));
    Ok(())
}
