//! The sync thread's side of webhooks: each stored delivery triggers its company's detection
//! (the same listing as a poll), transient failures are retried on the delivery's own backoff,
//! and a refusal ends it at once.
//!
//! Invariant: the body of a delivery is only a hint (what Pleo lists is acted on); one
//! delivery's failure never holds up another's.

use crate::clock::Millis;
use crate::pleo::PleoError;
use crate::service::sync::Mirror;
use crate::service::sync::pass::{PassKind, SyncError};

impl Mirror {
    /// Acts on every stored webhook delivery not handled yet. Pleo: "when the event is
    /// received, proceed to step 2": an export-job delivery triggers its company's detection,
    /// the same listing as a poll (a recovery pass if the company has none yet), so the oldest
    /// eligible job is taken whatever announced it. A batch of deliveries costs one listing per
    /// company. The body is only a hint: the company it names picks the listing (if it names
    /// none, or one not served here, the named job is read to learn its company), and only
    /// what Pleo lists is acted on. Each delivery is marked with what happened; a failure
    /// marks that company's deliveries (the next poll lists it again) and never holds up the
    /// others. Returns how many deliveries were handled.
    pub fn process_deliveries(&mut self) -> Result<usize, SyncError> {
        let mut handled = 0;
        let mut detected_any = false;
        loop {
            if self.stopping() {
                break;
            }
            let now = self.clock.now();
            let batch = self.store.pending_deliveries(100, now)?;
            if batch.is_empty() {
                break;
            }
            let mut marks: Vec<(String, String)> = Vec::new();
            let mut deferred: Vec<(String, String, Millis)> = Vec::new();
            // company -> (webhook id, attempts, named job) of the deliveries that trigger its
            // detection.
            let mut by_company: std::collections::BTreeMap<String, Vec<(String, u32, String)>> =
                std::collections::BTreeMap::new();
            for d in batch {
                if self.stopping() {
                    break;
                }
                handled += 1;
                let known = d
                    .event_type
                    .as_deref()
                    .is_some_and(crate::edge::webhook::is_job_event);
                let id = match (&d.job_id, known) {
                    (None, _) => {
                        marks.push((d.webhook_id, "ignored: names no job".to_owned()));
                        continue;
                    }
                    (Some(_), false) => {
                        let t = d.event_type.as_deref().unwrap_or("").to_owned();
                        marks.push((d.webhook_id, format!("ignored: event type {t:?}")));
                        continue;
                    }
                    (Some(id), true) => id.clone(),
                };
                let company = match d.company_id {
                    Some(c) if d.unwanted => {
                        let why = format!("ignored: company {c} is served by no instance");
                        marks.push((d.webhook_id, why));
                        continue;
                    }
                    Some(c) if self.served.contains(&c) => c,
                    // Another instance's company: left to it, without a request.
                    Some(c) if !self.shard.serves(&c) => {
                        marks.push((d.webhook_id, self.other_shard(&c)));
                        continue;
                    }
                    _ => match self.clients.for_company(None).get_job(&id) {
                        Ok(job) if self.served.contains(&job.company_id) => job.company_id,
                        Ok(job) if !self.shard.serves(&job.company_id) => {
                            marks.push((d.webhook_id, self.other_shard(&job.company_id)));
                            continue;
                        }
                        // A shared database: left pending for the company's holder.
                        Ok(job) if self.store.fence().is_some() => {
                            self.store
                                .delivery_company(&d.webhook_id, &job.company_id)?;
                            continue;
                        }
                        Ok(job) => {
                            let why =
                                format!("ignored: company {} is not served here", job.company_id);
                            marks.push((d.webhook_id, why));
                            continue;
                        }
                        Err(PleoError::Api { status: 404, .. }) => {
                            marks.push((d.webhook_id, "job not found at Pleo (404)".to_owned()));
                            continue;
                        }
                        Err(e) => {
                            let what = format!("reading job {id} to learn its company: {e}");
                            let at = self.clock.now();
                            end_or_defer(
                                &mut marks,
                                &mut deferred,
                                at,
                                (&d.webhook_id, d.attempts),
                                what,
                                e.is_retryable(),
                            );
                            continue;
                        }
                    },
                };
                by_company
                    .entry(company)
                    .or_default()
                    .push((d.webhook_id, d.attempts, id));
            }
            for (company, deliveries) in by_company {
                // The same listing as a poll, journaled as what prompted it.
                self.by_webhook = true;
                let report = self.pass_companies(PassKind::Poll, std::slice::from_ref(&company));
                self.by_webhook = false;
                let failure = report.failures.into_iter().next();
                // Retries count from when this attempt ended (its own retries take time).
                let failed_at = self.clock.now();
                detected_any |= failure.is_none();
                for (webhook_id, attempts, job_id) in deliveries {
                    match &failure {
                        Some((_, e, transient)) => {
                            let what = format!("detection for company {company}: {e}");
                            end_or_defer(
                                &mut marks,
                                &mut deferred,
                                failed_at,
                                (&webhook_id, attempts),
                                what,
                                *transient,
                            );
                        }
                        None => {
                            let outcome = match self.store.job(&job_id)? {
                                Some(j) => format!(
                                    "detection: company listed; the named job is {}",
                                    j.status
                                ),
                                None => "detection: company listed; the named job is not listed as open (yet): polls find it".to_owned(),
                            };
                            marks.push((webhook_id, outcome));
                        }
                    }
                }
            }
            // One commit for the ended deliveries, one for the deferred.
            self.store.mark_deliveries(&marks, self.clock.now())?;
            if !deferred.is_empty() {
                self.store.defer_deliveries(&deferred)?;
            }
        }
        // A webhook also means "check again now" for a readiness check that failed.
        if detected_any {
            self.wake_processors();
        }
        Ok(handled)
    }

    /// The outcome of a delivery for a company another shard serves.
    fn other_shard(&self, company: &str) -> String {
        let n = self.shard.count;
        format!(
            "left to shard {}/{n}: company {company} is not served by this shard ({})",
            crate::config::Shard::of(company, n),
            self.shard
        )
    }

    /// How long until the earliest deferred delivery falls due (None: none waits).
    pub fn delivery_retry_in(&self) -> Result<Option<std::time::Duration>, SyncError> {
        let now = self.clock.now();
        Ok(self
            .store
            .next_delivery_retry()?
            .map(|at| std::time::Duration::from_millis((at.0 - now.0).max(0) as u64)))
    }
}

/// A delivery's action (its company's detection, or the read that learns the company) is
/// tried at most this many times when it fails transiently (429, 5xx, no answer), waiting
/// [`delivery_backoff`] between attempts (5, 10, 20, 40 s: about 75 s in all); then the
/// delivery ends with what the last attempt met, and the company's polls cover it.
pub const DELIVERY_ATTEMPTS: u32 = 5;

/// The wait after the `failures`-th failed attempt at a delivery's action (0-based).
pub fn delivery_backoff(failures: u32) -> std::time::Duration {
    std::time::Duration::from_secs(5 << failures.min(4))
}

/// Ends a delivery whose action failed, or defers it when trying again may help: transient
/// failures are tried again up to [`DELIVERY_ATTEMPTS`]; a refusal (401, 403, another 4xx)
/// ends it at once. Each delivery fails on its own schedule: no delivery waits for another.
fn end_or_defer(
    marks: &mut Vec<(String, String)>,
    deferred: &mut Vec<(String, String, Millis)>,
    now: Millis,
    (webhook_id, attempts): (&str, u32),
    what: String,
    transient: bool,
) {
    let attempt = attempts + 1;
    if transient && attempt < DELIVERY_ATTEMPTS {
        let wait = delivery_backoff(attempts);
        deferred.push((
            webhook_id.to_owned(),
            format!(
                "attempt {attempt} of {DELIVERY_ATTEMPTS} failed: {what}; trying again in {} s",
                wait.as_secs()
            ),
            now.plus(wait),
        ));
    } else if transient {
        marks.push((
            webhook_id.to_owned(),
            format!(
                "not acted on after {attempt} attempts: {what}; the next poll lists the company again"
            ),
        ));
    } else {
        marks.push((
            webhook_id.to_owned(),
            format!(
                "not acted on: {what} (refused: not retried); the next poll lists the company again"
            ),
        ));
    }
}
