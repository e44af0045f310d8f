//! Telling Pleo: recorded results reported in batches of at most 100 (each batch marked
//! reported only once Pleo acknowledged it), and the job finished exactly once.
//!
//! Invariant: a success Pleo acknowledged is never sent again; a result is never reported
//! before it is committed; the finishing event is journaled before the job leaves our hands.

use serde_json::{Value, json};

use crate::clock::Millis;
use crate::pleo::JobEvent;
use crate::processing::pipeline::{Finish, HandlerStage, Milestone, Pause};
use crate::store::pg::Step;
use crate::store::{EventKind, ItemResult, JobRow, Source, Store};

impl HandlerStage {
    /// Reports recorded results in batches of at most 100 (at most `limit` items now).
    pub(crate) fn flush(
        &self,
        store: &Store,
        job: &JobRow,
        deadline: &mut Millis,
        limit: usize,
    ) -> Result<(), Pause> {
        const REPORT_ATTEMPTS_MAX: i64 = 3;
        let mut sent = 0usize;
        // Each round either acknowledges items or counts an attempt against them: bounded.
        let mut rounds = 0;
        self.read_items_if_unsure(store, job)?;
        while sent < limit && rounds < 10_000 {
            rounds += 1;
            let batch = store.unreported_items(&job.id, 100.min(limit - sent))?;
            if batch.is_empty() {
                break;
            }
            let updates: Vec<Value> = batch
                .iter()
                .map(|u| update_json(&u.result, u.handled_at))
                .collect();
            // On a shared database, only under this instance's lease, recorded before it is sent.
            let entries: Vec<&str> = batch
                .iter()
                .map(|u| u.result.accounting_entry_id.as_str())
                .collect();
            store.fenced_step(
                &job.company_id,
                &job.id,
                Step::Report,
                &json!({"entries": entries}),
            )?;
            let outcome = match self.client(job).put_items(&job.id, &updates) {
                Ok(o) => o,
                Err(e) => {
                    // An answer that may have been applied: what Pleo shows is read before
                    // anything is sent again (an item reported `successful` is never resent).
                    if !e.is_unapplied() {
                        self.unsure(&job.id, true);
                    }
                    return Err(e.into());
                }
            };
            let acked: Vec<(String, String)> = outcome
                .updated
                .iter()
                .filter_map(|v| {
                    Some((
                        v["accountingEntryId"].as_str()?.to_owned(),
                        v["status"].as_str().unwrap_or("").to_owned(),
                    ))
                })
                .collect();
            store.mark_reported(&job.id, &acked, self.clock.now())?;
            let mut refused = Vec::new();
            for e in &outcome.errors {
                let entry = e["accountingEntryId"].as_str().unwrap_or("");
                let kind = e["type"].as_str().unwrap_or("UNKNOWN");
                let attempts = batch
                    .iter()
                    .find(|u| u.result.accounting_entry_id == entry)
                    .map_or(REPORT_ATTEMPTS_MAX, |u| u.report_attempts + 1);
                let give_up =
                    kind == "ACCOUNTING_ENTRY_DOES_NOT_EXIST" || attempts >= REPORT_ATTEMPTS_MAX;
                store.mark_report_error(
                    &job.id,
                    entry,
                    &format!("{kind}: {}", e["message"].as_str().unwrap_or("")),
                    give_up,
                    self.clock.now(),
                )?;
                refused
                    .push(json!({"accounting_entry_id": entry, "type": kind, "given_up": give_up}));
            }
            // Items Pleo neither updated nor refused: count an attempt so they cannot loop.
            for u in &batch {
                let id = &u.result.accounting_entry_id;
                let seen = acked.iter().any(|(e, _)| e == id)
                    || outcome
                        .errors
                        .iter()
                        .any(|e| e["accountingEntryId"].as_str() == Some(id));
                if !seen {
                    let give_up = u.report_attempts + 1 >= REPORT_ATTEMPTS_MAX;
                    store.mark_report_error(
                        &job.id,
                        id,
                        "not acknowledged by Pleo",
                        give_up,
                        self.clock.now(),
                    )?;
                }
            }
            store.journal(self.clock.now(), Some(&job.id), Some(&job.company_id), EventKind::ItemsReported, json!({"sent": batch.len(), "acknowledged": acked.len(), "refused": outcome.errors.len()}))?;
            if !refused.is_empty() {
                store.journal(
                    self.clock.now(),
                    Some(&job.id),
                    Some(&job.company_id),
                    EventKind::ItemReportFailed,
                    json!({"items": refused}),
                )?;
            }
            sent += batch.len();
        }
        // Whether item reports refresh `lastUpdatedAt` is not published: when the deadline as
        // last read draws near, read the job and take its deadline (and status) from Pleo
        // instead of guessing. While it is far off, there is nothing to learn that changes what
        // happens next, and the read would cost every job a request.
        let near = self.clock.now().plus(self.cfg.reread_within) >= *deadline;
        if sent > 0 && near {
            match self.client(job).get_job(&job.id) {
                Ok(fresh) => {
                    store.upsert_job(&fresh, self.clock.now(), Source::Reread)?;
                    // As stored: never older than our own accepted event's deadline.
                    *deadline = store
                        .job(&job.id)?
                        .map_or(fresh.expires_at(), |j| j.expires_at);
                }
                Err(e) => log::debug!("job {}: re-read after a report failed: {e}", job.id),
            }
        }
        Ok(())
    }

    /// Marks (or clears) `job_id` as having an item report whose outcome is unknown.
    pub(crate) fn unsure(&self, job_id: &str, unsure: bool) {
        let mut s = self
            .read_items_first
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if unsure {
            s.insert(job_id.to_owned());
        } else {
            s.remove(job_id);
        }
    }

    /// After a report whose answer was lost: the job's items as Pleo shows them now, so that
    /// an item Pleo already shows finished is marked reported and not sent again.
    fn read_items_if_unsure(&self, store: &Store, job: &JobRow) -> Result<(), Pause> {
        let unsure = self
            .read_items_first
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&job.id);
        if !unsure {
            return Ok(());
        }
        let items = self.client(job).list_job_items(&job.id)?;
        let rows: Vec<(String, String, Option<String>)> = items
            .iter()
            .filter_map(|i| {
                let entry = i["accountingEntryId"].as_str()?.to_owned();
                let status = i["status"].as_str().unwrap_or("pending").to_owned();
                Some((entry, status, None))
            })
            .collect();
        store.sync_job_items(&job.id, &rows, self.clock.now())?;
        self.unsure(&job.id, false);
        log::info!(
            "job {}: read its {} items again after a report whose answer was lost; only what Pleo does not show finished is sent",
            job.id,
            rows.len()
        );
        Ok(())
    }

    pub(crate) fn finish(&self, store: &Store, job: &JobRow, f: Finish) -> Result<(), Pause> {
        let event = JobEvent {
            event: f.event,
            job_id: job.id.clone(),
            failure_reason: f.failure_reason,
            failure_reason_type: f.failure_reason_type,
        };
        let counts = store.item_counts(&job.id)?;
        let detail = json!({"successful": counts.successful, "failed": counts.failed});
        crate::processing::send_final(&self.client(job), store, &self.clock, job, &event, detail)??;
        let name = f.event.as_str();
        log::info!(
            "job {} of company {}: sent {name} ({} successful, {} failed)",
            job.id,
            job.company_id,
            counts.successful,
            counts.failed
        );
        self.note(Milestone::Finished {
            job_id: job.id.clone(),
            event: name.to_owned(),
        });
        Ok(())
    }
}

fn update_json(r: &ItemResult, handled_at: Millis) -> Value {
    let mut v = json!({
        "accountingEntryId": r.accounting_entry_id,
        "status": if r.successful { "successful" } else { "failed" },
    });
    if r.successful {
        v["exportedAt"] = json!(handled_at.to_rfc3339());
        if let Some(x) = &r.external_id {
            v["externalId"] = json!(x);
        }
        if let Some(x) = &r.external_url {
            v["externalUrl"] = json!(x);
        }
    } else {
        if let Some(x) = &r.failure_reason {
            v["failureReason"] = json!(x);
        }
        if let Some(x) = &r.failure_reason_type {
            v["failureReasonType"] = json!(x);
        }
    }
    v
}
