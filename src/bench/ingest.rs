//! Section 1: webhook ingest (durable 2xx) against its two baselines in the same run: the same
//! rows committed straight into SQLite, and the same HTTP server answering 204 with no work;
//! the ack latency at a fixed offered rate; and what the footprint section reads of the run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::bench::harness::*;
use crate::clock::Millis;
use crate::store::Store;

/// What the footprint section needs from the ingest run.
pub(crate) struct Footprint {
    pub idle_rss_kib: u64,
    pub peak_rss_kib: u64,
    pub ready: Duration,
}

pub(crate) fn ingest(cx: &Ctx, figures: &mut Vec<Figure>) -> anyhow::Result<Footprint> {
    let (exe, dir, clock, sizes, secrets) = (&cx.exe, &cx.dir, &cx.clock, &cx.sizes, &cx.secrets);
    let fake = start_fake(clock)?;
    let port = free_port()?;
    let db = dir.join("ingest.db");
    let mut env = service_env(
        &fake,
        &db,
        &dir.join("outbox"),
        "be0c0000-0000-4000-8000-000000000001",
        port,
    );
    // Every delivery of this section names one company: its stored bytes may reach the bound
    // over all companies (the per-company default, 64 MiB, ran out during the ingest run and
    // answered the whole latency run 429).
    env.push((
        "JOBMIRROR_WEBHOOK_STORED_BYTES_PER_COMPANY_MAX",
        "2147483648".to_owned(),
    ));
    let (service, ready) = ServiceChild::start(exe, &env)?;
    let idle_rss = service.rss_kib();
    let url = format!("http://127.0.0.1:{port}/webhooks/pleo");

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
                    let body = body_for(
                        &format!("nojob-{c}-{i}"),
                        "be0c0000-0000-4000-8000-000000000001",
                    );
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
                // Answers other than 200, by status: a latency is only measured over acks.
                let mut other: Vec<u16> = Vec::new();
                for i in 0..n_each {
                    let due = start + Duration::from_secs_f64(i as f64 / rate_each as f64);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let body = body_for(
                        &format!("lat-{c}-{i}"),
                        "be0c0000-0000-4000-8000-000000000001",
                    );
                    let t = Instant::now();
                    match post_signed(&a, &url, &secrets, &format!("msg_lat_{c}_{i}"), &body) {
                        200 => lat.push(t.elapsed()),
                        status => other.push(status),
                    }
                }
                (lat, other)
            })
        })
        .collect();
    let (mut lat, mut not_acked) = (Vec::new(), std::collections::BTreeMap::new());
    for h in handles {
        let (l, other) = h.join().unwrap_or_default();
        lat.extend(l);
        for status in other {
            *not_acked.entry(status).or_insert(0usize) += 1;
        }
    }
    lat.sort();
    let sent = n_each * clients;
    if !not_acked.is_empty() {
        eprintln!(
            "ack latency: {} of {sent} deliveries not acknowledged (status: count) {not_acked:?}",
            sent - lat.len()
        );
    }
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
            company_id: Some("be0c0000-0000-4000-8000-000000000001".into()),
            body: String::from_utf8(body_for(
                &format!("j{i}"),
                "be0c0000-0000-4000-8000-000000000001",
            ))?,
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
        "<= 20 ms, every delivery acknowledged",
        p99 <= 20.0 && not_acked.is_empty() && !lat.is_empty(),
    ));
    figures.push(fig(
        &format!("ack latency p50 @{}/s", sizes.latency_rate_per_sec),
        percentile(&lat, 0.5).as_secs_f64() * 1000.0,
        "ms",
        None,
        "(info)",
        true,
    ));
    Ok(Footprint {
        idle_rss_kib: idle_rss,
        peak_rss_kib: peak_rss.load(std::sync::atomic::Ordering::Relaxed),
        ready,
    })
}
