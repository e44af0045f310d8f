//! Sections 2 and 3: the mirror's sync rate over loopback (and store upserts against plain
//! INSERTs of the same rows), and the pick query's cost as the table grows.

use std::sync::Arc;
use std::time::Instant;

use serde_json::json;

use crate::bench::harness::*;
use crate::clock::Millis;
use crate::pleo::{Auth, ClientConfig, PleoClient, Secret};
use crate::sandbox::JobSpec;
use crate::store::{Source, Store};

pub(crate) fn sync(cx: &Ctx, figures: &mut Vec<Figure>) -> anyhow::Result<()> {
    let (dir, clock, sizes) = (&cx.dir, &cx.clock, &cx.sizes);
    let fake2 = start_fake(clock)?;
    let companies: Vec<String> = (0..sizes.sync_companies)
        .map(|c| format!("c{c:04}"))
        .collect();
    let loading = Instant::now();
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
    let load_secs = loading.elapsed().as_secs_f64();
    let client = Arc::new(PleoClient::new(
        ClientConfig::new(&fake2.base_url(), Auth::ApiKey(Secret::new(KEY))),
        clock.clone(),
    )?);
    // The fake finds a job by its id in an index: one GET costs the same at any size.
    let mut gets = Vec::with_capacity(1000);
    for k in 0..1000 {
        let c = &companies[k % companies.len()];
        let id = format!("{c}-{:05}", (k * 7) % sizes.sync_jobs_per_company);
        let t = Instant::now();
        client.get_job(&id)?;
        gets.push(t.elapsed());
    }
    gets.sort();
    figures.push(fig(
        &format!("fake: load {total} jobs"),
        load_secs,
        "s",
        None,
        "(info)",
        true,
    ));
    figures.push(fig(
        &format!("fake: GET one job of {total}, p50"),
        percentile(&gets, 0.5).as_secs_f64() * 1e6,
        "us",
        None,
        "(info: never the bottleneck)",
        true,
    ));
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
    Ok(())
}

pub(crate) fn pick(cx: &Ctx, figures: &mut Vec<Figure>) -> anyhow::Result<()> {
    let (dir, sizes) = (&cx.dir, &cx.sizes);
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
    Ok(())
}
