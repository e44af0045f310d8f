//! The fake's Export API operations: job listings, a job, job events, job items, export
//! items, and creating jobs.

use super::*;

/// A job listing; `scope` (a key that belongs to one company) limits a listing that names no
/// company to that company's jobs.
pub(super) fn list_jobs(w: &World, q: &[(String, String)], scope: Option<&str>) -> Response {
    let q = Query(q);
    let checked = (|| {
        let company = q.id("company_id", &|c| w.by_company.contains_key(c))?;
        let statuses = rules::job_statuses(&q)?;
        let page = q.page(JOB_SORT_KEYS, Some(0))?;
        Ok::<_, Response>((company, statuses, page))
    })();
    let (company, statuses, page) = match checked {
        Ok(c) => c,
        Err(r) => return r,
    };
    let candidates: Box<dyn Iterator<Item = &FakeJob>> = match company.or(scope) {
        Some(c) => Box::new(
            w.by_company
                .get(c)
                .into_iter()
                .flatten()
                .map(|i| &w.jobs[*i]),
        ),
        None => Box::new(w.jobs.iter()),
    };
    let mut matching: Vec<&FakeJob> = candidates
        .filter(|j| statuses.is_empty() || statuses.contains(&j.status.as_str()))
        .collect();
    page.sort(&mut matching, |j, key| match key {
        "createdAt" => sortable_time(Some(j.created_at)),
        "lastUpdatedAt" => sortable_time(j.last_updated_at),
        _ => Some(j.id.clone()),
    });
    let mut params = Map::new();
    if let Some(c) = company {
        params.insert("company_id".into(), json!([c]));
    }
    if !statuses.is_empty() {
        params.insert("statuses".into(), json!(statuses));
    }
    listing_with(
        &matching,
        |j| j.id.clone(),
        &page,
        params,
        |j| j.to_json(),
        w.offset_cursors,
    )
}

/// The keys job listings sort by (the files name none; these are `ExportJobV3` fields).
pub(super) const JOB_SORT_KEYS: &[&str] = &["createdAt", "lastUpdatedAt", "id"];
/// The keys job item listings sort by (`ExportJobItemV3` fields).
pub(super) const ITEM_SORT_KEYS: &[&str] = &["accountingEntryId", "status"];
/// The keys export item listings sort by (`ExportItemV3` fields).
pub(super) const EXPORT_ITEM_SORT_KEYS: &[&str] = &["accountingEntryId", "date"];
/// The keys subscription listings sort by (`SubscriptionModel` fields).
pub(super) const SUBSCRIPTION_SORT_KEYS: &[&str] = &["createdAt", "id"];

/// Whether `id` names a job the world holds (fixtures may use readable ids).
pub(super) fn known_job(w: &World, id: &str) -> bool {
    w.job(id).is_some()
}

pub(super) fn get_job(w: &mut World, id: &str, now: Millis) -> Response {
    if !rules::is_uuid(id) && !known_job(w, id) {
        return error(400, "INVALID_PARAMETER", "jobId must be a UUID");
    }
    let Some(j) = w.job(id) else {
        return error(404, "EXPORT_NOT_FOUND", "Export job not found.");
    };
    let resp = Response::json(200, &json!({"data": j.to_json()}));
    if w.steal_on_get.remove(id) {
        w.claim(id, Claimant::OtherAfterGet, now);
    }
    resp
}

pub(super) fn create_job(w: &mut World, body: &[u8], now: Millis) -> Response {
    let v = match rules::json_body(body).and_then(|v| {
        rules::check_object(&v, rules::CREATE_EXPORT_JOB, "body", &|c| {
            w.by_company.contains_key(c)
        })?;
        Ok(v)
    }) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let company = v["companyId"].as_str().unwrap_or_default().to_owned();
    let entries: Vec<String> = v["accountingEntryIds"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e.as_str().map(str::to_owned))
        .collect();
    if w.company_jobs(&company).any(|j| j.status == "in_progress") {
        return error(
            409,
            "EXPORT_ALREADY_IN_PROGRESS",
            "Export Job already in progress for this company.",
        );
    }
    let id = w.new_id(2);
    let mut job = FakeJob {
        id: id.clone(),
        company_id: company,
        status: "pending".into(),
        created_at: now,
        last_updated_at: Some(now),
        started_at: None,
        completed_at: None,
        expired_at: None,
        expires_in_secs: w.expires_in_secs,
        is_interactive: v
            .get("isInteractive")
            .and_then(Value::as_bool)
            .unwrap_or(true),
        vendor_based_bookkeeping: v["options"]["vendorBasedBookkeeping"]
            .as_bool()
            .unwrap_or(false),
        created_by: v
            .get("employeeId")
            .and_then(Value::as_str)
            .map(str::to_owned),
        failure_reason: None,
        failure_reason_type: None,
        extra: Map::new(),
        served_created_at: None,
        items: Vec::new(),
        export_items: Vec::new(),
    };
    for (i, e) in entries.iter().enumerate() {
        job.items.push(new_item(&id, e));
        job.export_items.push(export_item(&job, e, i, true));
    }
    let out = json!({"data": job.to_json()});
    w.announce(&job);
    w.push_job(job);
    Response::json(201, &out)
}

pub(super) fn job_event(w: &mut World, body: &[u8], now: Millis) -> Response {
    let v = match rules::json_body(body).and_then(|v| {
        rules::check_object(&v, rules::CREATE_EXPORT_JOB_EVENT, "body", &|j| {
            known_job(w, j)
        })?;
        Ok(v)
    }) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let event = v["event"].as_str().unwrap_or_default();
    let job_id = v["jobId"].as_str().unwrap_or_default();
    if event == "started" {
        return if w.claim(job_id, Claimant::Api, now) {
            Response::empty(202)
        } else if w.job(job_id).is_some() {
            error(
                422,
                "INVALID_EXPORT_JOB_STATUS_CHANGE",
                "Export Job status change failed",
            )
        } else {
            error(404, "EXPORT_NOT_FOUND", "Export job not found.")
        };
    }
    let Some(j) = w.job_mut(job_id) else {
        return error(404, "EXPORT_NOT_FOUND", "Export job not found.");
    };
    let to = match (j.status.as_str(), event) {
        ("pending", "started") => "in_progress",
        ("pending", "failed") => "failed",
        ("in_progress", "completed") => "completed",
        ("in_progress", "completed_with_errors") => "completed_with_errors",
        ("in_progress", "failed") => "failed",
        _ => {
            return error(
                422,
                "INVALID_EXPORT_JOB_STATUS_CHANGE",
                "Export Job status change failed",
            );
        }
    };
    j.status = to.into();
    j.last_updated_at = Some(now);
    if to == "in_progress" {
        j.started_at = Some(now);
    } else {
        j.completed_at = Some(now);
    }
    if to == "failed" {
        j.failure_reason = v
            .get("failureReason")
            .and_then(Value::as_str)
            .map(str::to_owned);
        j.failure_reason_type = v
            .get("failureReasonType")
            .and_then(Value::as_str)
            .map(str::to_owned);
    }
    Response::empty(202)
}

pub(super) fn list_items(w: &World, id: &str, q: &[(String, String)]) -> Response {
    if !rules::is_uuid(id) && !known_job(w, id) {
        return error(400, "INVALID_PARAMETER", "jobId must be a UUID");
    }
    let q = Query(q);
    let checked =
        (|| Ok::<_, Response>((rules::item_status(&q)?, q.page(ITEM_SORT_KEYS, Some(0))?)))();
    let (status, page) = match checked {
        Ok(c) => c,
        Err(r) => return r,
    };
    let Some(j) = w.job(id) else {
        return error(404, "EXPORT_NOT_FOUND", "Export job not found.");
    };
    let mut items: Vec<&FakeItem> = j
        .items
        .iter()
        .filter(|i| status.is_none_or(|s| i.status == s))
        .collect();
    page.sort(&mut items, |i, key| match key {
        "status" => Some(i.status.clone()),
        _ => Some(i.accounting_entry_id.clone()),
    });
    let mut params = Map::new();
    if let Some(s) = status {
        params.insert("status".into(), json!([s]));
    }
    listing(
        &items,
        |i| i.accounting_entry_id.clone(),
        &page,
        params,
        |i| json!(i),
    )
}

pub(super) fn put_items(w: &mut World, id: &str, body: &[u8], now: Millis) -> Response {
    if !rules::is_uuid(id) && !known_job(w, id) {
        return error(400, "INVALID_PARAMETER", "jobId must be a UUID");
    }
    let known_entry = |e: &str| {
        w.job(id)
            .is_some_and(|j| j.items.iter().any(|i| i.accounting_entry_id == e))
    };
    let updates: Vec<Value> = match rules::json_body(body).and_then(|v| {
        rules::check_item_updates(&v, &known_entry)?;
        Ok(v)
    }) {
        Ok(Value::Array(a)) => a,
        Ok(_) => return error(400, "INVALID_BODY", "body must be a JSON array"),
        Err(r) => return r,
    };
    let mut refuse = std::mem::take(&mut w.refuse_updates);
    let result = put_items_inner(w, id, &updates, now, &mut refuse);
    w.refuse_updates = refuse;
    result
}

pub(super) fn put_items_inner(
    w: &mut World,
    id: &str,
    updates: &[Value],
    now: Millis,
    refuse: &mut std::collections::HashMap<String, u32>,
) -> Response {
    let Some(j) = w.job_mut(id) else {
        return error(404, "EXPORT_NOT_FOUND", "Export job not found.");
    };
    if updates.len() > 100 {
        return error(
            413,
            "EXPORT_JOB_ITEMS_UPDATE_LIMIT",
            "Number of items to update is more than 100.",
        );
    }
    if !j.is_open() {
        return error(
            422,
            "EXPORT_JOB_STATUS_UNPROCESSABLE",
            "Export job is finished.",
        );
    }
    let mut data = Vec::new();
    let mut errors = Vec::new();
    let mut w_stale = Vec::new();
    for u in updates {
        let entry = u
            .get("accountingEntryId")
            .and_then(Value::as_str)
            .unwrap_or("");
        if let Some(left) = refuse.get_mut(entry).filter(|n| **n > 0) {
            *left -= 1;
            errors.push(json!({"accountingEntryId": entry, "type": "EXPORT_ENTRY_STATUS_UPDATE_FAILED", "message": "injected failure"}));
            continue;
        }
        // The body was checked against UpdateExportJobItemV3 before this.
        let status = u.get("status").and_then(Value::as_str).unwrap_or("");
        let Some(item) = j.items.iter_mut().find(|i| i.accounting_entry_id == entry) else {
            errors.push(json!({"accountingEntryId": entry, "type": "ACCOUNTING_ENTRY_DOES_NOT_EXIST", "message": "Accounting entry does not exist."}));
            continue;
        };
        let s = |k: &str| u.get(k).and_then(Value::as_str).map(str::to_owned);
        if matches!(item.status.as_str(), "successful" | "failed" | "abandoned") {
            // The contract: never send an update again for an item already reported.
            w_stale.push(format!("{id}/{entry}: {} -> {status}", item.status));
        }
        item.status = status.into();
        item.exported_at = s("exportedAt").or(item.exported_at.take());
        item.external_id = s("externalId").or(item.external_id.take());
        item.external_url = s("externalUrl").or(item.external_url.take());
        item.failure_reason = s("failureReason");
        item.failure_reason_type = s("failureReasonType");
        data.push(json!(item));
    }
    j.last_updated_at = Some(now);
    w.stale_item_updates.extend(w_stale);
    Response::json(200, &json!({"data": data, "errors": errors}))
}

pub(super) fn list_export_items(w: &World, q: &[(String, String)]) -> Response {
    let q = Query(q);
    let checked = (|| {
        let job = q.id("job_id", &|j| known_job(w, j))?;
        Ok::<_, Response>((job, q.page(EXPORT_ITEM_SORT_KEYS, Some(0))?))
    })();
    let (job_id, page) = match checked {
        Ok(c) => c,
        Err(r) => return r,
    };
    // The files make job_id optional; export items only exist within a job, so without one
    // there is nothing to list (a decision: docs/contract.md, "Contract decisions").
    let Some(job_id) = job_id else {
        return error(400, "INVALID_PARAMETER", "job_id is required");
    };
    let Some(j) = w.job(job_id) else {
        return error(404, "EXPORT_NOT_FOUND", "Export job not found.");
    };
    if !j.is_open() {
        return error(
            422,
            "EXPORT_JOB_STATUS_UNPROCESSABLE",
            "Export Job is finished and can no longer be processed.",
        );
    }
    let mut items: Vec<&Value> = j.export_items.iter().collect();
    page.sort(&mut items, |v, key| v[key].as_str().map(str::to_owned));
    let mut params = Map::new();
    params.insert("job_id".into(), json!([job_id]));
    let key = |v: &&Value| v["accountingEntryId"].as_str().unwrap_or("").to_owned();
    listing(&items, key, &page, params, |v| (*v).clone())
}
