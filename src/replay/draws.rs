//! What each simulated seed also draws, from a generator of its own (so the rest of a seed's
//! world is what it was): the settings users configure and the trouble at the seams between
//! features; and `dimensions`, what a snapshot draws, for `simulate`'s totals.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::replay::rng::Rng;
use crate::replay::snapshot::{CompanyChange, CompanyOp, Event, Snapshot, Step};
use crate::sandbox::{Fault, FaultRule, JobSpec};

/// What users configure and what happens at the seams between features, drawn from a
/// generator of its own (so the rest of each seed's world is what it was): `lanes` 1 to 4;
/// `list_by_credential` on or off, with listings that shift between their pages; companies
/// paused and resumed at any moment (a job of theirs may be in hand); answers lost after the
/// request was applied, for every kind of request; reads failing after a claim.
pub(super) fn seams(
    seed: u64,
    companies: &[String],
    jobs: &[(String, String)],
    last: f64,
    service: &mut BTreeMap<String, Value>,
    timeline: &mut Vec<Step>,
) {
    let mut rng = Rng::new(seed ^ 0x7365_616d_7332_3821);
    let at = |rng: &mut Rng| rng.range(0, last.max(1.0) as u64) as f64;
    service.insert("lanes".to_owned(), json!(rng.range(1, 4)));
    let by_credential = rng.chance(0.5);
    service.insert("list_by_credential".to_owned(), json!(by_credential));
    if by_credential && rng.chance(0.5) {
        for _ in 0..rng.range(1, 3) {
            let Some((id, _)) = rng.pick(jobs).cloned() else {
                break;
            };
            let fail = rng.chance(0.5);
            timeline.push(Step {
                at: at(&mut rng),
                event: Event::ListingShift { job_id: id, fail },
            });
        }
    }
    if rng.chance(0.35) {
        for _ in 0..rng.range(1, 2) {
            let Some(company) = rng.pick(companies).cloned() else {
                break;
            };
            let from = at(&mut rng);
            timeline.push(Step {
                at: from,
                event: Event::CompanyPaused {
                    company_id: company.clone(),
                },
            });
            if rng.chance(0.8) {
                timeline.push(Step {
                    at: from + rng.range(1, 1200) as f64,
                    event: Event::CompanyResumed {
                        company_id: company,
                    },
                });
            }
        }
    }
    // A big export (reports go out in batches of 100 while the handler still works), with an
    // item report whose answer is lost soon after it is created.
    if rng.chance(0.2) {
        let company = rng.pick(companies).cloned().unwrap_or_default();
        let created = at(&mut rng);
        timeline.push(Step {
            at: created,
            event: Event::JobCreated {
                job: JobSpec {
                    id: Some(format!("jbig-{seed:x}")),
                    company_id: company,
                    status: "pending".into(),
                    items: Some(rng.range(120, 250) as usize),
                    expires_in: Some(3600),
                    ..JobSpec::default()
                },
            },
        });
        if rng.chance(0.7) {
            timeline.push(Step {
                at: created,
                event: Event::Fault {
                    rule: FaultRule {
                        skip: 0,
                        method: Some("PUT".into()),
                        path_prefix: Some(format!("/v3/export-jobs/jbig-{seed:x}/items")),
                        fault: if rng.chance(0.5) {
                            Fault::GatewayTimeout
                        } else {
                            Fault::HangUp
                        },
                    },
                },
            });
        }
    }
    // Answers lost after the request was applied: claims, final events, item reports, reads.
    if rng.chance(0.5) {
        for _ in 0..rng.range(1, 4) {
            let (method, path) = match rng.range(0, 4) {
                0 | 1 => ("POST", "/v3/export-job-events"),
                2 => ("PUT", "/v3/export-jobs/"),
                3 => ("GET", "/v3/export-jobs/"),
                _ => ("GET", "/v3/export-jobs"),
            };
            let fault = match rng.range(0, 2) {
                0 => Fault::HangUp,
                1 => Fault::GatewayTimeout,
                _ => Fault::Truncate,
            };
            timeline.push(Step {
                at: at(&mut rng),
                event: Event::Fault {
                    rule: FaultRule {
                        skip: 0,
                        method: Some(method.into()),
                        path_prefix: Some(path.into()),
                        fault,
                    },
                },
            });
        }
    }
    // A read after a claim fails: the next job read goes through (the one before `started`),
    // the ones after it answer 503.
    if rng.chance(0.25) {
        // Half of them at the start, where the first claims (of jobs close to expiry too) are.
        let when = if rng.chance(0.5) { 0.0 } else { at(&mut rng) };
        for skip in [1, 0, 0, 0, 0] {
            timeline.push(Step {
                at: when,
                event: Event::Fault {
                    rule: FaultRule {
                        skip,
                        method: Some("GET".into()),
                        path_prefix: Some("/v3/export-jobs/".into()),
                        fault: Fault::Refused { status: 503 },
                    },
                },
            });
        }
    }
}

/// What a snapshot draws, by dimension (for `simulate`'s totals): the settings, and how
/// often each kind of trouble happens on its timeline.
pub fn dimensions(snap: &Snapshot) -> BTreeMap<String, u64> {
    let mut d = BTreeMap::new();
    let mut add = |k: String| *d.entry(k).or_insert(0) += 1;
    let lanes = snap
        .service
        .get("lanes")
        .and_then(Value::as_u64)
        .unwrap_or(1);
    add(format!("lanes = {lanes}"));
    let by_credential = snap.service.get("list_by_credential") == Some(&json!(true));
    add(format!("list_by_credential = {by_credential}"));
    for s in &snap.timeline {
        match &s.event {
            Event::ListingShift { fail, .. } => add(format!(
                "listing shifted between pages ({})",
                if *fail {
                    "a job failed"
                } else {
                    "a job started elsewhere"
                }
            )),
            Event::CompanyPaused { .. } => add("company paused".into()),
            Event::CompanyResumed { .. } => add("company resumed".into()),
            Event::CompanyAdded { oauth, .. } => add(format!(
                "company added ({})",
                if *oauth {
                    "own OAuth pair"
                } else {
                    "default credential"
                }
            )),
            Event::CompanyRemoved { .. } => add("company removed".into()),
            Event::TokensRevoked { .. } => add("OAuth: access revoked (invalid_grant)".into()),
            Event::OauthClient { accepted: false } => {
                add("OAuth: client refused (invalid_client)".into())
            }
            Event::Fault { rule } => {
                let what = match (rule.method.as_deref(), rule.path_prefix.as_deref()) {
                    (_, Some("/oauth/token")) => "OAuth token endpoint",
                    (Some("POST"), _) => "job event",
                    (Some("PUT"), _) => "item report",
                    (Some("GET"), Some("/v3/export-jobs/")) => "job or item read",
                    _ => "listing or export items",
                };
                let how = match &rule.fault {
                    Fault::HangUp | Fault::GatewayTimeout | Fault::Truncate => {
                        "answer lost after it was applied"
                    }
                    Fault::Refused { .. }
                        if rule.path_prefix.as_deref() == Some("/oauth/token") =>
                    {
                        "5xx"
                    }
                    Fault::Refused { .. } => "read refused (503)",
                    Fault::Dropped => "lost unapplied",
                    _ => "refused unapplied (429, 500)",
                };
                add(format!("{what}: {how}"));
            }
            Event::Faults { rates } if rates.server_error > 0.0 => add("fault window".into()),
            Event::Crash { .. } => add("crash".into()),
            Event::ClockJump { .. } => add("host clock jump".into()),
            Event::AccountingDown { .. } => add("accounting side down".into()),
            Event::ClaimedByOther { .. } | Event::StealAfterGet { .. } => {
                add("another integration claims".into())
            }
            Event::WhileHandlerRuns {
                ops, into_warning, ..
            } => {
                let what: Vec<&str> = ops
                    .iter()
                    .map(|o| match o.op {
                        CompanyChange::Pause => "pause",
                        CompanyChange::Resume => "resume",
                        CompanyChange::Remove => "remove",
                        CompanyChange::Add => "add",
                    })
                    .chain(into_warning.then_some("into the warning window"))
                    .collect();
                add(format!("while a handler runs: {}", what.join(", ")))
            }
            _ => {}
        }
    }
    d
}

/// Listing by credential, some seeds start with a crowd: exactly a page (100) of pending jobs
/// of a company this service does not serve, listed first, then the jobs left `in_progress`
/// by a lost database; another integration fails one of the crowd right after the first page
/// of the first listing. A recovery listing that spans pages then shifts, and the job at the
/// head of page 2, one of ours in progress, is never seen by it.
pub(super) fn crowd(
    seed: u64,
    service: &BTreeMap<String, Value>,
    jobs: &mut Vec<JobSpec>,
    timeline: &mut Vec<Step>,
) {
    let mut rng = Rng::new(seed ^ 0x6372_6f77_6432_3821);
    if service.get("list_by_credential") != Some(&json!(true))
        || !rng.chance(0.3)
        || !jobs.iter().any(|j| j.status == "in_progress")
    {
        return;
    }
    let other = format!("{:08x}-0000-4000-8000-00000000cccc", seed as u32);
    let mut listed: Vec<JobSpec> = (0..100)
        .map(|i| JobSpec {
            id: Some(format!("jcrowd{i:03}-{seed:x}")),
            company_id: other.clone(),
            status: "pending".into(),
            created_secs_ago: Some(3000),
            items: Some(1),
            expires_in: Some(3600),
            ..JobSpec::default()
        })
        .collect();
    let (held, rest): (Vec<JobSpec>, Vec<JobSpec>) = std::mem::take(jobs)
        .into_iter()
        .partition(|j| j.status == "in_progress");
    listed.extend(held);
    listed.extend(rest);
    *jobs = listed;
    timeline.push(Step {
        at: 0.0,
        event: Event::ListingShift {
            job_id: format!("jcrowd000-{seed:x}"),
            fail: true,
        },
    });
}

/// Operators and time acting on a handler run while it works, drawn from a generator of its
/// own: a company paused while its job is in hand (a younger job of the company waits behind
/// it); a company paused, another added and the first resumed (the lanes rebalance), or
/// removed and added again, while its job is in hand; a job whose handler works into the
/// last `deadline_warning_secs` before its deadline.
pub(super) fn while_running(seed: u64, companies: &[String], last: f64, timeline: &mut Vec<Step>) {
    let mut rng = Rng::new(seed ^ 0x7275_6e6e_696e_6721);
    let at = |rng: &mut Rng| rng.range(0, last.max(1.0) as u64) as f64;
    let job = |id: String, company: &str, expires_in: i64, items: u64| JobSpec {
        id: Some(id),
        company_id: company.to_owned(),
        status: "pending".into(),
        items: Some(items as usize),
        expires_in: Some(expires_in),
        ..JobSpec::default()
    };
    let plan = |job_id: &str, ops: Vec<CompanyOp>, into_warning: bool| Event::WhileHandlerRuns {
        job_id: Some(job_id.to_owned()),
        ops,
        into_warning,
    };
    let op = |op: CompanyChange, company_id: Option<&str>| CompanyOp {
        op,
        company_id: company_id.map(str::to_owned),
    };
    if rng.chance(0.3)
        && let Some(company) = rng.pick(companies).cloned()
    {
        let (first, second) = (format!("jpause-a-{seed:x}"), format!("jpause-b-{seed:x}"));
        let t = at(&mut rng);
        for (k, id) in [&first, &second].into_iter().enumerate() {
            timeline.push(Step {
                at: t + k as f64,
                event: Event::JobCreated {
                    job: job(id.clone(), &company, 3600, rng.range(1, 6)),
                },
            });
        }
        timeline.push(Step {
            at: t,
            event: plan(&first, vec![op(CompanyChange::Pause, None)], false),
        });
        if rng.chance(0.8) {
            timeline.push(Step {
                at: t + rng.range(300, 1500) as f64,
                event: Event::CompanyResumed {
                    company_id: company,
                },
            });
        }
    }
    if rng.chance(0.35) {
        let id = format!("jmove-{seed:x}");
        let t = at(&mut rng);
        let (company, ops) = if rng.chance(0.6) {
            let Some(company) = rng.pick(companies).cloned() else {
                return;
            };
            let other = format!("{:08x}-0000-4000-8000-0000000000d7", seed as u32);
            let ops = vec![
                op(CompanyChange::Pause, None),
                op(CompanyChange::Add, Some(&other)),
                op(CompanyChange::Resume, None),
            ];
            (company, ops)
        } else {
            // A company added at run time, removed and added again while its job is in hand.
            let company = format!("{:08x}-0000-4000-8000-0000000000d8", seed as u32);
            timeline.push(Step {
                at: t,
                event: Event::CompanyAdded {
                    company_id: company.clone(),
                    oauth: false,
                },
            });
            let ops = vec![
                op(CompanyChange::Remove, None),
                op(CompanyChange::Add, None),
            ];
            (company, ops)
        };
        timeline.push(Step {
            at: t,
            event: Event::JobCreated {
                job: job(id.clone(), &company, 3600, rng.range(1, 8)),
            },
        });
        timeline.push(Step {
            at: t,
            event: plan(&id, ops, false),
        });
    }
    if rng.chance(0.25)
        && let Some(company) = rng.pick(companies).cloned()
    {
        let id = format!("jwarn-{seed:x}");
        let t = at(&mut rng);
        timeline.push(Step {
            at: t,
            event: Event::JobCreated {
                job: job(id.clone(), &company, 900, rng.range(1, 6)),
            },
        });
        timeline.push(Step {
            at: t,
            event: plan(&id, Vec::new(), true),
        });
    }
}

/// Where companies have OAuth pairs, the token endpoint has trouble too, drawn from a
/// generator of its own: 5xx and 429 answers, and requests lost before the endpoint applied
/// them. (A refresh whose answer is lost after the endpoint applied it ends the pair: Pleo
/// rotates the refresh token at every refresh; that is a re-authorization, drawn as
/// `tokens_revoked`.)
pub(super) fn token_trouble(seed: u64, last: f64, timeline: &mut Vec<Step>) {
    let mut rng = Rng::new(seed ^ 0x746f_6b65_6e32_3821);
    if !timeline.iter().any(|s| s.event.uses_oauth()) || !rng.chance(0.6) {
        return;
    }
    for _ in 0..rng.range(1, 3) {
        let fault = match rng.range(0, 3) {
            0 => Fault::Refused { status: 503 },
            1 => Fault::ServerError,
            2 => Fault::TooManyRequests {
                retry_after_secs: 2,
            },
            _ => Fault::Dropped,
        };
        timeline.push(Step {
            at: rng.range(0, last.max(1.0) as u64) as f64,
            event: Event::Fault {
                rule: FaultRule {
                    skip: 0,
                    method: Some("POST".into()),
                    path_prefix: Some("/oauth/token".into()),
                    fault,
                },
            },
        });
    }
}
