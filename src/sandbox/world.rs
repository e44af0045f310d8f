//! The fake's world as a state machine: claims (the `started` lock), expiry on the fake's
//! clock, announcements to subscribers, and the jobs and items it generates.

use super::*;

impl World {
    /// Queues `v1.export-job.created` (or the configured spelling) for every active subscription.
    pub(super) fn announce(&mut self, job: &FakeJob) {
        let Some(outbox) = self.outbox.clone() else {
            return;
        };
        let opts = self.webhook_options.clone();
        for sub in self
            .subscriptions
            .clone()
            .iter()
            .filter(|s| s.status == "ACTIVE")
            .filter(|s| s.company.as_ref().is_none_or(|c| *c == job.company_id))
        {
            let event_type = opts.event_type.clone().or_else(|| {
                sub.event_types
                    .iter()
                    .find(|t| crate::edge::webhook::is_job_event(t))
                    .cloned()
            });
            let Some(event_type) = event_type else {
                continue;
            };
            self.next_msg += 1;
            let mut data = job.to_json();
            if opts.upper_case_status {
                data["status"] = json!(job.status.to_ascii_uppercase());
            }
            let mut body = json!({"data": data, "eventId": format!("evt_{:08}", self.next_msg), "eventType": event_type});
            if opts.payload_envelope {
                body = json!({ "payload": body });
            }
            let _ = outbox.try_send(Outgoing {
                url: sub.endpoint_url.clone(),
                secret: sub.secret.clone(),
                webhook_id: format!("msg_fake{:08}", self.next_msg),
                job_id: job.id.clone(),
                body: body.to_string(),
                options: opts.clone(),
            });
        }
    }

    /// `pending` -> `in_progress` by `by`, logged whatever the outcome (false: refused).
    pub(super) fn claim(&mut self, id: &str, by: Claimant, now: Millis) -> bool {
        let prior_holder = self.holders.get(id).copied();
        // What else the company had at Pleo at this moment (for invariants on claims).
        let (mut older_pending, mut in_progress) = (Vec::new(), Vec::new());
        if let Some(me) = self.job(id) {
            for o in self.company_jobs(&me.company_id).filter(|o| o.id != id) {
                if o.status == "pending" && (o.created_at, &o.id) < (me.created_at, &me.id) {
                    older_pending.push((o.id.clone(), o.created_at, o.expires_at()));
                } else if o.status == "in_progress" {
                    in_progress.push((o.id.clone(), self.holders.get(&o.id).copied()));
                }
            }
        }
        let Some(j) = self.job_mut(id) else {
            return false;
        };
        let prior_status = j.status.clone();
        let accepted = prior_status == "pending";
        if accepted {
            j.status = "in_progress".into();
            j.started_at = Some(now);
            j.last_updated_at = Some(now);
            self.holders.insert(id.to_owned(), by);
        }
        let after_requests = self.requests.len() as u64;
        self.claims.push(ClaimRecord {
            at: now,
            after_requests,
            job_id: id.to_owned(),
            by,
            prior_status: prior_status.clone(),
            prior_holder: if prior_status == "in_progress" {
                prior_holder
            } else {
                None
            },
            accepted,
            older_pending,
            in_progress,
        });
        accepted
    }

    pub(super) fn rand(&mut self) -> f64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
    pub(super) fn job(&self, id: &str) -> Option<&FakeJob> {
        self.by_id.get(id).map(|i| &self.jobs[*i])
    }
    pub(super) fn job_mut(&mut self, id: &str) -> Option<&mut FakeJob> {
        self.by_id.get(id).map(|i| &mut self.jobs[*i])
    }
    /// The company's jobs, in insertion order.
    pub(super) fn company_jobs<'a>(&'a self, company: &str) -> impl Iterator<Item = &'a FakeJob> {
        self.by_company
            .get(company)
            .into_iter()
            .flatten()
            .map(|i| &self.jobs[*i])
    }
    pub(super) fn new_id(&mut self, kind: u16) -> String {
        self.next_id += 1;
        format!(
            "{:08x}-{kind:04x}-4000-8000-{:012x}",
            0xfa4e_0000u32, self.next_id
        )
    }
    pub(super) fn expire_due(&mut self, now: Millis) {
        // No open job can expire before `next_expiry`: skip the scan (listings stay cheap).
        if now < self.next_expiry {
            return;
        }
        let mut next = Millis(i64::MAX);
        for j in self.jobs.iter_mut().filter(|j| j.is_open()) {
            let at = j.expires_at();
            if now >= at {
                j.status = "failed".into();
                j.failure_reason_type = Some("job_expired".into());
                j.failure_reason = Some("The export job expired before it was completed.".into());
                j.expired_at = Some(at);
                j.last_updated_at = Some(at);
                for it in j.items.iter_mut() {
                    if it.status == "pending" || it.status == "in_progress" {
                        it.status = "abandoned".into();
                    }
                }
            } else {
                next = next.min(at);
            }
        }
        self.next_expiry = next;
    }

    /// Adds a job, keeping the company index and the expiry bound.
    pub(super) fn push_job(&mut self, job: FakeJob) {
        self.next_expiry = self.next_expiry.min(job.expires_at());
        self.by_company
            .entry(job.company_id.clone())
            .or_default()
            .push(self.jobs.len());
        self.by_id.insert(job.id.clone(), self.jobs.len());
        self.jobs.push(job);
    }
}

pub(super) fn hash32(s: &str) -> u32 {
    // FNV-1a: stable item ids from a job id.
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

pub(super) fn new_item(job_id: &str, entry: &str) -> FakeItem {
    FakeItem {
        export_job_id: job_id.to_owned(),
        accounting_entry_id: entry.to_owned(),
        status: "pending".into(),
        exported_at: None,
        external_id: None,
        external_url: None,
        failure_reason: None,
        failure_reason_type: None,
    }
}

/// The id of an export item's one line: a UUID derived from the entry's id.
pub(super) fn line_id(entry: &str) -> String {
    format!(
        "{:08x}-{:04x}-4000-8000-{:012x}",
        hash32(entry),
        0x11e,
        u64::from(hash32(&format!("{entry}/1")))
    )
}

pub(super) fn export_item(job: &FakeJob, entry: &str, i: usize, with_account: bool) -> Value {
    let minor = 1_000 + (i as i64 * 137) % 90_000;
    let account = if with_account {
        json!({"id": "0000acc0-0000-4000-8000-000000004000", "code": "4000", "identifier": "4000", "name": "Office supplies"})
    } else {
        Value::Null
    };
    json!({
        "_links": {"self": {"href": format!("/v3/export-items/{entry}")}},
        "accountingEntryId": entry,
        "accountingEntryLines": [{
            "accountingEntryLineId": line_id(entry),
            "account": account,
            "lineAmount": {"inSupplierCurrency": {"currency": "DKK", "value": minor},
                           "inWalletCurrency": {"currency": "DKK", "value": minor}},
            "netAmount": {"inSupplierCurrency": {"currency": "DKK", "value": minor * 4 / 5},
                          "inWalletCurrency": {"currency": "DKK", "value": minor * 4 / 5}},
        }],
        "additionalInformation": {"reconciliationId": format!("rec-{}-{i}", &job.id)},
        "amount": {"inSupplierCurrency": {"currency": "DKK", "value": minor},
                   "inWalletCurrency": {"currency": "DKK", "value": minor}},
        "companyId": job.company_id,
        "date": job.created_at.to_rfc3339(),
        "type": "card_purchase",
        "note": null,
        "files": [],
    })
}
