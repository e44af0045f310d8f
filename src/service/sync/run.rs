//! The sync thread's loop: recovery first, then each company's polls on the schedule, all at
//! once on a trigger, and detection whenever the event thread nudges.

use std::sync::Arc;

use crossbeam_channel::{Receiver, select};

use crate::health::TICK;
use crate::service::sync::pass::PassKind;
use crate::service::sync::schedule::PollSchedule;
use crate::service::sync::{Mirror, log_pass};

const COALESCE: std::time::Duration = std::time::Duration::from_millis(5);

/// Pleo is asked something at least this often: when no listing started for this long, the
/// company due first is polled now. So Pleo going down is noticed within minutes whatever
/// `poll_interval_secs` is (`/healthz`, `JobmirrorPleoFailing`), for one request a minute at
/// most.
pub const PROBE_MS: i64 = 60_000;

/// A failed poll is tried again this long after (doubling per failure in a row, at most one
/// poll interval), not a whole interval later.
pub const RETRY_FIRST_MS: i64 = 30_000;

/// After polls finished: a key that failed is tried again soon (a doubling wait, capped at
/// the interval); a key that succeeded starts counting afresh.
fn after_polls(
    schedule: &mut PollSchedule,
    failures: &mut std::collections::HashMap<String, u32>,
    done: &[String],
    report: &crate::service::sync::PassReport,
    now: i64,
) {
    let mut failed_keys: Vec<String> = Vec::new();
    for c in &report.failed_companies {
        let key = if schedule.contains(c) {
            c.clone()
        } else if schedule.contains(crate::service::sync::pass::GROUP_KEY) {
            crate::service::sync::pass::GROUP_KEY.to_owned()
        } else {
            continue;
        };
        if !failed_keys.contains(&key) {
            failed_keys.push(key);
        }
    }
    for key in done {
        if !failed_keys.contains(key) {
            failures.remove(key);
        }
    }
    for key in failed_keys {
        let n = failures.entry(key.clone()).or_insert(0);
        *n += 1;
        let wait = RETRY_FIRST_MS
            .saturating_mul(1 << (*n - 1).min(16))
            .min(schedule.interval_ms());
        schedule.retry_at(&key, now + wait);
    }
}

/// What the sync thread serves from now on, and which of those companies were given a new
/// credential (they get a recovery pass, as new ones do).
#[derive(Debug, Default)]
pub struct CompanyList {
    pub served: Vec<String>,
    pub renewed: Vec<String>,
}

/// The sync thread's loop: a recovery pass over every company at once, then each company's
/// polls on a [`PollSchedule`] (spread over the interval), everything at once on a trigger,
/// and the detection webhooks trigger whenever the event thread nudges. Ends when `shutdown` is
/// closed or sends. Beats `progress` at least every [`TICK`].
pub fn run(
    mut mirror: Mirror,
    interval: std::time::Duration,
    trigger: Receiver<()>,
    nudge: Receiver<()>,
    companies: Receiver<CompanyList>,
    shutdown: Receiver<()>,
    progress: Option<Arc<crate::health::Progress>>,
) {
    /// After the database failed while acting on deliveries, try again this soon.
    const DELIVERY_RETRY: std::time::Duration = std::time::Duration::from_secs(2);
    let origin = crate::clock::monotonic();
    let ms = || origin.elapsed().as_millis() as i64;
    let tick = progress.as_ref().map_or(TICK, |p| p.tick());
    let beat = || {
        if let Some(p) = &progress {
            p.beat();
        }
    };
    let mut nudge = nudge;
    let mut companies = companies;
    // Returns when to act on deliveries again: a deferred delivery's retry, or soon after a
    // failure of the database.
    let deliveries = |mirror: &mut Mirror| match mirror.process_deliveries() {
        Ok(n) => {
            if n > 0 {
                log::debug!("acted on {n} webhook deliveries");
            }
            match mirror.delivery_retry_in() {
                Ok(wait) => wait.map(|w| ms() + w.as_millis() as i64),
                Err(_) => Some(ms() + DELIVERY_RETRY.as_millis() as i64),
            }
        }
        Err(e) => {
            log::warn!(
                "acting on webhook deliveries failed: {e}; retrying in {} s",
                DELIVERY_RETRY.as_secs()
            );
            Some(ms() + DELIVERY_RETRY.as_millis() as i64)
        }
    };
    beat();
    let all = mirror.companies.clone();
    // Recovery first: stored webhooks are acted on only after it (and the processor serves a
    // company only once its recovery pass has completed).
    let report = mirror.pass(PassKind::Recovery);
    log_pass(PassKind::Recovery, all.len(), &report);
    crate::memory::release_free_memory();
    let mut retry_at = deliveries(&mut mirror);
    let mut last_pass = ms();
    // Listing by credential, the companies sharing the default credential are one entry.
    let mut keys = mirror.poll_keys();
    let mut schedule = PollSchedule::new(&keys, interval, ms());
    let polls_done = mirror.pool_done();
    let mut failures = std::collections::HashMap::new();
    let mut last_listing = ms();
    loop {
        beat();
        let now = ms();
        let next = schedule.next_due().unwrap_or(now + tick.as_millis() as i64);
        let next = retry_at.map_or(next, |r| next.min(r));
        let next = if keys.is_empty() {
            next
        } else {
            next.min(last_listing + PROBE_MS)
        };
        let wait = std::time::Duration::from_millis((next - now).max(0) as u64).min(tick);
        select! {
            recv(shutdown) -> _ => return,
            recv(trigger) -> msg => {
                if msg.is_err() { return; }
                beat();
                let report = mirror.pass(PassKind::Trigger);
                log_pass(PassKind::Trigger, mirror.companies.len(), &report);
                last_listing = ms();
                // "Check now" also means: run failed readiness checks again now.
                mirror.wake_processors();
                let now = ms();
                for c in &keys {
                    schedule.done(c, now);
                }
            }
            recv(companies) -> list => {
                let Ok(list) = list else {
                    // Nothing will change the companies again.
                    companies = crossbeam_channel::never();
                    continue;
                };
                let (mut added, removed) = mirror.set_companies(list.served);
                // A company given a new credential (authorized again) is detected anew.
                for c in list.renewed {
                    if !added.contains(&c) {
                        added.push(c);
                    }
                }
                keys = mirror.poll_keys();
                schedule.set_keys(&keys, ms());
                log::info!(
                    "companies changed: {} added, {} removed, {} served",
                    added.len(),
                    removed.len(),
                    mirror.companies.len()
                );
                if !added.is_empty() {
                    // New companies start with their recovery pass, as at start-up.
                    let report = mirror.pass_companies(PassKind::Recovery, &added);
                    log_pass(PassKind::Recovery, added.len(), &report);
                }
            }
            recv(polls_done) -> d => {
                let Ok(d) = d else { continue };
                let mut done = vec![d.company.clone()];
                mirror.record_poll(d);
                // Log the polls in batches: with many companies, a line per poll would flood.
                while let Ok(d) = polls_done.try_recv() {
                    done.push(d.company.clone());
                    mirror.record_poll(d);
                }
                let report = mirror.take_poll_report();
                mirror.count_found(&report);
                after_polls(&mut schedule, &mut failures, &done, &report, ms());
                log_pass(PassKind::Poll, report.passes, &report);
                if mirror.take_acted_between() {
                    // Deliveries were acted on between passes: their retries, and any left.
                    last_pass = ms();
                    retry_at = deliveries(&mut mirror);
                }
            }
            recv(nudge) -> msg => {
                if msg.is_err() {
                    // No webhook receiver (or it stopped): nothing will nudge again.
                    nudge = crossbeam_channel::never();
                    continue;
                }
                // Under a stream of webhooks, read them in batches: each pass ends in one write
                // transaction, and the event thread needs the same write lock for every commit.
                let since = ms() - last_pass;
                if since < COALESCE.as_millis() as i64 {
                    let at = last_pass + COALESCE.as_millis() as i64;
                    retry_at = Some(retry_at.map_or(at, |r| r.min(at)));
                    continue;
                }
                last_pass = ms();
                retry_at = deliveries(&mut mirror);
            }
            default(wait) => {
                // A delivery retry fell due, or some companies' polls did (deliveries first).
                if retry_at.is_some_and(|r| r <= ms()) {
                    last_pass = ms();
                    retry_at = deliveries(&mut mirror);
                }
                let mut due = schedule.due(ms());
                // Nothing asked of Pleo for a while: the company due first goes now.
                if due.is_empty()
                    && ms() - last_listing >= PROBE_MS
                    && let Some(k) = schedule.earliest()
                {
                    due.push(k);
                }
                if !due.is_empty() {
                    last_listing = ms();
                    // Companies whose recovery failed get it again with their poll. In the pool
                    // the polls run beside this thread, which goes on acting on webhooks.
                    mirror.start_polls(&due);
                    let now = ms();
                    for c in &due {
                        schedule.done(c, now);
                    }
                    if !mirror.has_pool() {
                        let report = mirror.take_poll_report();
                        mirror.count_found(&report);
                        after_polls(&mut schedule, &mut failures, &due, &report, ms());
                        log_pass(PassKind::Poll, due.len(), &report);
                    }
                }
            }
        }
    }
}
