//! Sections 4 and 5: a job's way through the service. Reaction: a signed webhook's 2xx to
//! `started` at the fake, measured from idle; processing: one big job through `outbox:`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::bench::harness::*;
use crate::pleo::{Auth, ClientConfig, PleoClient, Secret};
use crate::sandbox::JobSpec;
use crate::store::Store;

pub(crate) fn reaction(cx: &Ctx, figures: &mut Vec<Figure>) -> anyhow::Result<()> {
    let (exe, dir, clock, sizes, secrets) = (&cx.exe, &cx.dir, &cx.clock, &cx.sizes, &cx.secrets);
    let fake3 = start_fake(clock)?;
    let port3 = free_port()?;
    let rc: Vec<String> = (0..sizes.reaction_samples)
        .map(|i| format!("0000a000-0000-4000-8000-{i:012}"))
        .collect();
    let env3 = service_env(
        &fake3,
        &dir.join("reaction.db"),
        &dir.join("outbox3"),
        &rc.join(","),
        port3,
    );
    let (service3, _) = ServiceChild::start(exe, &env3)?;
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
        let status = post_signed(&a, &url3, secrets, &format!("msg_r{i}"), body.as_bytes());
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
    Ok(())
}

pub(crate) fn processing(cx: &Ctx, figures: &mut Vec<Figure>) -> anyhow::Result<()> {
    let (dir, clock, sizes) = (&cx.dir, &cx.clock, &cx.sizes);
    let fake4 = start_fake(clock)?;
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
    Ok(())
}
