//! The endpoints jobmirror calls, one method each: export jobs (list, read), their job items
//! and export items (read, update), job events, and webhook subscriptions. Paths and bodies
//! are Pleo's OpenAPI files' (`../shared/pleo-openapi/`); ids are checked before they go into
//! a path.

use serde_json::Value;

use crate::pleo::transport::{Retry, ok_json, ok_status};
use crate::pleo::{
    ItemUpdateOutcome, Job, JobEvent, Listing, PleoClient, PleoError, Secret, SubscriptionChange,
};

impl PleoClient {
    /// Lists a company's jobs in the given statuses, following `after` cursors to the last page.
    pub fn list_jobs(&self, company_id: &str, statuses: &[&str]) -> Result<Listing, PleoError> {
        self.list_jobs_of(Some(company_id), statuses)
    }

    /// Every job this credential sees, whatever its company (`company_id` left out, as Pleo's
    /// OpenAPI allows; pages of 100). The caller sorts them out by `companyId`.
    pub fn list_jobs_by_credential(&self, statuses: &[&str]) -> Result<Listing, PleoError> {
        self.list_jobs_of(None, statuses)
    }

    fn list_jobs_of(
        &self,
        company_id: Option<&str>,
        statuses: &[&str],
    ) -> Result<Listing, PleoError> {
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(c) = company_id {
            query.push(("company_id", c.to_owned()));
        }
        for s in statuses {
            query.push(("statuses", (*s).to_owned()));
        }
        let (rows, pages) = self.all_pages("/v3/export-jobs", query, "job listing")?;
        let mut jobs = Vec::with_capacity(rows.len());
        let mut rejected = Vec::new();
        for row in rows {
            let id = row.get("id").and_then(Value::as_str).map(str::to_owned);
            match Job::from_value(row) {
                // A job that cannot be named in a request can be neither read, claimed nor
                // reported: skipped here (and journaled by the caller), so the company's other
                // jobs go on.
                Ok(j) if path_segment(&j.id).is_err() => rejected.push((
                    id,
                    "its id cannot be used in a request path (only letters, digits, - and _ are): it cannot be read, claimed or reported".into(),
                )),
                Ok(j) => jobs.push(j),
                Err(e) => rejected.push((id, e.to_string())),
            }
        }
        Ok(Listing {
            jobs,
            pages,
            rejected,
        })
    }

    /// Every job item of a job (the control layer), all pages.
    pub fn list_job_items(&self, job_id: &str) -> Result<Vec<Value>, PleoError> {
        let path = format!("/v3/export-jobs/{}/items", path_segment(job_id)?);
        Ok(self.all_pages(&path, Vec::new(), "job item listing")?.0)
    }

    /// Every export item of a job (the data layer), all pages.
    pub fn list_export_items(&self, job_id: &str) -> Result<Vec<Value>, PleoError> {
        let query = vec![("job_id", job_id.to_owned())];
        Ok(self
            .all_pages("/v3/export-items", query, "export item listing")?
            .0)
    }

    /// Reports item results (at most 100). A 200 may still carry per-item `errors`.
    pub fn put_items(
        &self,
        job_id: &str,
        updates: &[Value],
    ) -> Result<ItemUpdateOutcome, PleoError> {
        if updates.len() > 100 {
            return Err(PleoError::Config(format!(
                "{} item updates in one request; the limit is 100",
                updates.len()
            )));
        }
        let path = format!("/v3/export-jobs/{}/items", path_segment(job_id)?);
        let body = serde_json::to_vec(updates).map_err(|e| PleoError::Decode(e.to_string()))?;
        // Reporting an item twice is a fault: after an answer that leaves the outcome unknown
        // the caller re-reads the job items instead of sending the batch again.
        let v = ok_json(self.send_with("PUT", &path, &[], Some(&body), Retry::UnappliedOnly)?)?;
        let list = |k: &str| {
            v.get(k)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        };
        Ok(ItemUpdateOutcome {
            updated: list("data"),
            errors: list("errors"),
        })
    }

    /// GETs `path` page by page (`limit`, then `after` cursors) until the last page.
    fn all_pages(
        &self,
        path: &str,
        base: Vec<(&str, String)>,
        what: &str,
    ) -> Result<(Vec<Value>, u32), PleoError> {
        // A bound on pages so a server that never says "last page" cannot loop us forever.
        const PAGES_MAX: u32 = 100_000;
        let mut rows = Vec::new();
        let mut pages = 0u32;
        let mut after: Option<String> = None;
        loop {
            let mut query = base.clone();
            query.push(("limit", self.cfg.page_size.to_string()));
            if let Some(a) = &after {
                query.push(("after", a.clone()));
            }
            let page = ok_json(self.send("GET", path, &query, None)?)?;
            pages += 1;
            let data = page
                .get("data")
                .and_then(Value::as_array)
                .ok_or_else(|| PleoError::Decode(format!("{what} lacks `data` array")))?;
            let empty = data.is_empty();
            rows.extend(data.iter().cloned());
            let pagination = page.get("pagination");
            let has_next = pagination
                .and_then(|p| p.get("hasNextPage"))
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let end_cursor = pagination
                .and_then(|p| p.get("endCursor"))
                .and_then(Value::as_str)
                .map(str::to_owned);
            match (has_next, end_cursor) {
                (true, Some(c)) if Some(&c) != after.as_ref() && !empty => after = Some(c),
                (true, _) => {
                    return Err(PleoError::Decode(format!(
                        "{what} says hasNextPage but gives no new endCursor"
                    )));
                }
                (false, _) => return Ok((rows, pages)),
            }
            if pages >= PAGES_MAX {
                return Err(PleoError::Decode(format!(
                    "{what} exceeded {PAGES_MAX} pages"
                )));
            }
        }
    }

    /// Reads one job.
    pub fn get_job(&self, job_id: &str) -> Result<Job, PleoError> {
        let path = format!("/v3/export-jobs/{}", path_segment(job_id)?);
        let v = ok_json(self.send("GET", &path, &[], None)?)?;
        let data = v
            .get("data")
            .cloned()
            .ok_or_else(|| PleoError::Decode("job reply lacks `data`".into()))?;
        Job::from_value(data)
    }

    /// Sends a job event. Success is 202 (any 2xx is accepted; no body is required).
    pub fn post_event(&self, event: &JobEvent) -> Result<(), PleoError> {
        let body = serde_json::to_vec(event).map_err(|e| PleoError::Decode(e.to_string()))?;
        // Never repeated after an unknown outcome (a lost answer, a 504): `started` is the
        // claim, and a second one would meet our own claim (422) and read as a conflict; a
        // terminal event may have landed. The caller reads the job instead.
        let reply = self.send_with(
            "POST",
            "/v3/export-job-events",
            &[],
            Some(&body),
            Retry::UnappliedOnly,
        )?;
        ok_status(reply).map(|_| ())
    }

    /// Makes sure `endpoint_url` has a subscription for `event_types` and fetches its signing
    /// secret (see [`PleoClient::ensure_subscription`]).
    pub fn subscribe(
        &self,
        endpoint_url: &str,
        event_types: &[String],
    ) -> Result<(String, Secret), PleoError> {
        self.ensure_subscription(endpoint_url, event_types)
            .map(|(id, secret, _)| (id, secret))
    }

    /// Idempotent: a subscription whose `endpointUrl` is `endpoint_url` is reused (updated to
    /// ACTIVE with the missing event types added, if need be), else one is created. Returns its
    /// id, its signing secret and what was done.
    pub fn ensure_subscription(
        &self,
        endpoint_url: &str,
        event_types: &[String],
    ) -> Result<(String, Secret, SubscriptionChange), PleoError> {
        let existing = self
            .list_subscriptions()?
            .into_iter()
            .find(|s| s["endpointUrl"].as_str() == Some(endpoint_url));
        let (id, change) = match existing {
            Some(sub) => {
                let id = text_field(&sub, "id")?;
                let mut types: Vec<String> = sub["eventTypes"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|t| t.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                let missing: Vec<&String> =
                    event_types.iter().filter(|t| !types.contains(t)).collect();
                if missing.is_empty() && sub["status"] == "ACTIVE" {
                    (id, SubscriptionChange::Reused)
                } else {
                    types.extend(missing.into_iter().cloned());
                    let body = serde_json::to_vec(&serde_json::json!({
                        "endpointUrl": endpoint_url, "eventTypes": types, "status": "ACTIVE"
                    }))
                    .map_err(|e| PleoError::Decode(e.to_string()))?;
                    let path = format!("/v1/subscriptions/{}", path_segment(&id)?);
                    ok_json(self.send("PUT", &path, &[], Some(&body))?)?;
                    (id, SubscriptionChange::Updated)
                }
            }
            None => {
                let body = serde_json::to_vec(&serde_json::json!({
                    "endpointUrl": endpoint_url, "eventTypes": event_types, "status": "ACTIVE"
                }))
                .map_err(|e| PleoError::Decode(e.to_string()))?;
                // Not repeated after a lost answer: it could create a second subscription.
                let created = ok_json(self.send_with(
                    "POST",
                    "/v1/subscriptions",
                    &[],
                    Some(&body),
                    Retry::UnappliedOnly,
                )?)?;
                (
                    text_field(&created["data"], "id")?,
                    SubscriptionChange::Created,
                )
            }
        };
        let path = format!("/v1/subscriptions/{}/secret", path_segment(&id)?);
        let secret = ok_json(self.send("GET", &path, &[], None)?)?;
        let key = secret["data"]["secretKey"]
            .as_str()
            .ok_or_else(|| PleoError::Decode("secret reply lacks data.secretKey".into()))?;
        Ok((id, Secret::new(key), change))
    }

    /// Every webhook subscription of this credential (all pages).
    pub fn list_subscriptions(&self) -> Result<Vec<Value>, PleoError> {
        Ok(self
            .all_pages("/v1/subscriptions", Vec::new(), "subscription listing")?
            .0)
    }

    /// Deletes subscription `id` (a 404 is an error: nothing was deleted).
    pub fn delete_subscription(&self, id: &str) -> Result<(), PleoError> {
        let path = format!("/v1/subscriptions/{}", path_segment(id)?);
        ok_status(self.send("DELETE", &path, &[], None)?).map(|_| ())
    }
}

fn text_field(v: &Value, k: &str) -> Result<String, PleoError> {
    v.get(k)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| PleoError::Decode(format!("subscription lacks string field `{k}`")))
}

fn path_segment(id: &str) -> Result<&str, PleoError> {
    if !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Ok(id)
    } else {
        Err(PleoError::Config(format!(
            "job id {id:?} is not a valid path segment"
        )))
    }
}
