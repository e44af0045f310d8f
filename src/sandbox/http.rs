//! The fake's HTTP side: authentication, fault injection, routing, and paging with Pleo's
//! cursors.

use super::*;

/// RFC 4648 base32 (alphabet A-Z2-7, `=` padding): Pleo's cursor alphabet.
pub(super) fn base32(data: &[u8]) -> String {
    const A: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    for chunk in data.chunks(5) {
        let mut buf = [0u8; 5];
        buf[..chunk.len()].copy_from_slice(chunk);
        let n = u64::from_be_bytes([0, 0, 0, buf[0], buf[1], buf[2], buf[3], buf[4]]);
        let chars = (chunk.len() * 8).div_ceil(5);
        for i in 0..8 {
            if i < chars {
                out.push(A[((n >> (35 - i * 5)) & 31) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub(super) fn unbase32(s: &str) -> Option<Vec<u8>> {
    let mut bits: u64 = 0;
    let mut nbits = 0;
    let mut out = Vec::new();
    for c in s.bytes().filter(|&c| c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'2'..=b'7' => c - b'2' + 26,
            _ => return None,
        };
        bits = (bits << 5) | u64::from(v);
        nbits += 5;
        if nbits >= 8 {
            nbits -= 8;
            out.push((bits >> nbits) as u8);
            bits &= (1 << nbits) - 1;
        }
    }
    Some(out)
}

pub(super) fn cursor_for(id: &str) -> String {
    base32(id.as_bytes())
}

pub(super) fn id_from_cursor(c: &str) -> Option<String> {
    unbase32(c).and_then(|b| String::from_utf8(b).ok())
}

/// A page of `items` (already filtered and in the order asked for), keyed by `key` for
/// cursors, as `page` (checked by [`Query::page`]) asks.
///
/// A cursor names the item it stands at; with `offset_cursors` it names its position instead
/// (`@N`), as a server whose cursors are offsets would: then a listing whose result set
/// changes between pages shifts (an item leaving page 1 moves the next page one later).
pub(super) fn paginate<T: Clone>(
    items: &[T],
    key: impl Fn(&T) -> String,
    page: &Page,
    params: Map<String, Value>,
    offset_cursors: bool,
) -> Result<(Vec<T>, Value), Response> {
    let limit = page.limit;
    let position = |c: &str| -> Result<usize, Response> {
        let id =
            id_from_cursor(c).ok_or_else(|| error(400, "INVALID_CURSOR", "cursor is not valid"))?;
        if let Some(n) = id.strip_prefix('@').and_then(|n| n.parse::<usize>().ok()) {
            return Ok(n.min(items.len()));
        }
        items.iter().position(|i| key(i) == id).ok_or_else(|| {
            error(
                400,
                "INVALID_CURSOR",
                "cursor does not point into this listing",
            )
        })
    };
    let (start, end) = if let Some(a) = &page.after {
        let p = position(a)? + 1;
        (p, (p + limit).min(items.len()))
    } else if let Some(b) = &page.before {
        let p = position(b)?;
        (p.saturating_sub(limit), p)
    } else {
        let s = usize::try_from(page.offset.unwrap_or(0).max(0))
            .unwrap_or(usize::MAX)
            .min(items.len());
        (s, s.saturating_add(limit).min(items.len()))
    };
    let rows = items[start..end].to_vec();
    let mut current = json!({"parameters": params, "limit": limit});
    if let Some(a) = &page.after {
        current["after"] = json!(a);
    }
    if let Some(b) = &page.before {
        current["before"] = json!(b);
    }
    if let Some(o) = page.offset {
        current["offset"] = json!(o);
    }
    if !page.sort.is_empty() {
        current["sortingKeys"] = json!(page.sort.iter().map(|(k, _)| k).collect::<Vec<_>>());
        current["sortingOrder"] = json!(page.sort.iter().map(|(_, o)| o).collect::<Vec<_>>());
    }
    let mut pagination = json!({
        "currentRequestPagination": current,
        "hasNextPage": end < items.len(),
        "hasPreviousPage": start > 0,
        "total": items.len(),
    });
    if let (Some(f), Some(l)) = (rows.first(), rows.last()) {
        if offset_cursors {
            pagination["startCursor"] = json!(cursor_for(&format!("@{start}")));
            pagination["endCursor"] = json!(cursor_for(&format!("@{}", end - 1)));
        } else {
            pagination["startCursor"] = json!(cursor_for(&key(f)));
            pagination["endCursor"] = json!(cursor_for(&key(l)));
        }
    }
    Ok((rows, pagination))
}

/// A listing's answer: the page of `items` that `page` asks for, each row as `row` renders
/// it, with Pleo's pagination block (or the 400 a bad cursor gets).
pub(super) fn listing<T: Clone>(
    items: &[T],
    key: impl Fn(&T) -> String,
    page: &Page,
    params: Map<String, Value>,
    row: impl Fn(&T) -> Value,
) -> Response {
    listing_with(items, key, page, params, row, false)
}

/// [`listing`], with the cursors `offset_cursors` asks for (see [`paginate`]).
pub(super) fn listing_with<T: Clone>(
    items: &[T],
    key: impl Fn(&T) -> String,
    page: &Page,
    params: Map<String, Value>,
    row: impl Fn(&T) -> Value,
    offset_cursors: bool,
) -> Response {
    match paginate(items, key, page, params, offset_cursors) {
        Ok((rows, pagination)) => Response::json(
            200,
            &json!({"data": rows.iter().map(row).collect::<Vec<_>>(), "pagination": pagination}),
        ),
        Err(r) => r,
    }
}

/// A time as text that sorts as the time does (fixed-width milliseconds).
pub(super) fn sortable_time(t: Option<Millis>) -> Option<String> {
    t.map(|t| format!("{:020}", t.0.saturating_add(i64::MAX / 2)))
}

pub(super) struct FakeHandler(pub(super) Arc<Shared>);

impl Handler for FakeHandler {
    fn handle(&self, req: Request) -> Response {
        if req.head.method == "POST" && req.head.path == "/oauth/token" {
            // Cloned out, so one request held by the hook never holds up another.
            let hook = self
                .0
                .token_hook
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if let Some(h) = hook {
                let company = offered_company(&self.0.lock(), &req.body);
                if !h(company.as_deref()) {
                    // Dropped unprocessed: the pair offered stays good.
                    let mut r = Response::empty(0);
                    r.hang_up = true;
                    return r;
                }
            }
        }
        let now = self.0.clock.now();
        let mut w = self.0.lock();
        let claims_before = w.claims.len();
        let dropped = match &mut w.blackout_after {
            Some(0) => !req.head.path.starts_with("/_fake/"),
            Some(n) if !req.head.path.starts_with("/_fake/") => {
                *n -= 1;
                false
            }
            _ => false,
        };
        let fault = if dropped {
            Some(Fault::HangUp)
        } else {
            choose_fault(&mut w, &req.head)
        };
        let mut resp = match &fault {
            _ if dropped => Response::empty(0),
            Some(Fault::Dropped) => Response::empty(0),
            Some(Fault::TooManyRequests { retry_after_secs }) => {
                error(429, "TOO_MANY_REQUESTS", "rate limit exceeded")
                    .with_header("Retry-After", &retry_after_secs.to_string())
            }
            Some(Fault::ServerError) => error(500, "INTERNAL_SERVER_ERROR", "injected failure"),
            Some(Fault::Refused { status }) => {
                error(*status, "INJECTED_REFUSAL", "injected refusal")
            }
            _ => {
                w.expire_due(now);
                route(&mut w, &req, now)
            }
        };
        // As any origin server with a clock: the time of the answer, on the fake's clock.
        resp = resp.with_header("Date", &now.to_http_date());
        if !w.latency.is_zero() && !req.head.path.starts_with("/_fake/") {
            resp.delay = Some(w.latency);
        }
        match &fault {
            Some(Fault::Slow { millis }) => {
                resp.delay = Some(Duration::from_millis(*millis) + w.latency)
            }
            Some(Fault::Truncate) => resp.truncate_at = Some(resp.body.len() / 2),
            Some(Fault::HangUp) => resp.hang_up = true,
            Some(Fault::GatewayTimeout) => {
                resp = error(504, "GATEWAY_TIMEOUT", "the gateway gave up waiting")
                    .with_header("Date", &now.to_http_date());
            }
            _ => {}
        }
        let seq = w.requests.len() as u64 + 1;
        w.requests.push(LoggedRequest {
            seq,
            at: now,
            method: req.head.method.clone(),
            path: req.head.path.clone(),
            query: req.head.query.clone(),
            body: String::from_utf8_lossy(&req.body).into_owned(),
            status: resp.status,
            fault: if dropped {
                Some("Blackout".into())
            } else {
                fault.map(|f| format!("{f:?}"))
            },
        });
        let new_claims: Vec<ClaimRecord> = w.claims[claims_before..]
            .iter()
            .filter(|c| c.by == Claimant::Api)
            .cloned()
            .collect();
        drop(w);
        if !new_claims.is_empty()
            && let Some(hook) = self
                .0
                .claim_hook
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
        {
            for c in &new_claims {
                hook(c);
            }
        }
        self.0.logged.notify_all();
        resp
    }
}

pub(super) fn choose_fault(w: &mut World, head: &Head) -> Option<Fault> {
    if head.path.starts_with("/_fake/") {
        return None;
    }
    let hit = w.script.iter().position(|r| {
        r.method
            .as_deref()
            .is_none_or(|m| m.eq_ignore_ascii_case(&head.method))
            && r.path_prefix
                .as_deref()
                .is_none_or(|p| head.path.starts_with(p))
    });
    if let Some(i) = hit {
        if w.script[i].skip > 0 {
            w.script[i].skip -= 1;
        } else {
            return w.script.remove(i).map(|r| r.fault);
        }
    }
    let rates = w.rates.clone();
    let roll = w.rand();
    let mut edge = rates.too_many_requests;
    if roll < edge {
        return Some(Fault::TooManyRequests {
            retry_after_secs: rates.retry_after_secs,
        });
    }
    edge += rates.server_error;
    if roll < edge {
        return Some(Fault::ServerError);
    }
    edge += rates.slow;
    if roll < edge {
        return Some(Fault::Slow {
            millis: rates.slow_millis,
        });
    }
    edge += rates.truncate;
    if roll < edge {
        return Some(Fault::Truncate);
    }
    edge += rates.hang_up;
    if roll < edge {
        return Some(Fault::HangUp);
    }
    None
}

/// The API key of a Basic authorization header.
pub(super) fn basic_user(head: &Head) -> Option<String> {
    use base64::Engine;
    let b64 = head.header("authorization")?.strip_prefix("Basic ")?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    Some(text.split_once(':')?.0.to_owned())
}

pub(super) fn authorized(w: &World, head: &Head, now: Millis) -> bool {
    use base64::Engine;
    let Some(h) = head.header("authorization") else {
        return false;
    };
    if let (Some(t), Some(o)) = (h.strip_prefix("Bearer "), &w.oauth) {
        return o.access.get(t.trim()).is_some_and(|(exp, _)| *exp > now);
    }
    let Some(b64) = h.strip_prefix("Basic ") else {
        return false;
    };
    let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64.trim()) else {
        return false;
    };
    let Ok(text) = String::from_utf8(raw) else {
        return false;
    };
    let Some((user, pass)) = text.split_once(':') else {
        return false;
    };
    pass.is_empty() && (w.key_companies.contains_key(user) || w.api_keys.iter().any(|k| k == user))
}

pub(super) fn route(w: &mut World, req: &Request, now: Millis) -> Response {
    let head = &req.head;
    let segs: Vec<&str> = head.path.trim_matches('/').split('/').collect();
    if segs.first() == Some(&"_fake") {
        return control(w, req, &segs);
    }
    if head.method == "POST" && segs == ["oauth", "token"] {
        return token_endpoint(w, &req.body, now);
    }
    if !authorized(w, head, now) {
        return error(401, "UNAUTHORIZED", "missing or invalid credentials");
    }
    let q = head.query_pairs();
    // A key that belongs to one company sees only that company's jobs in a listing that names
    // no company.
    let key_company = basic_user(head)
        .and_then(|k| w.key_companies.get(&k).cloned())
        .or_else(|| bearer_company(w, head));
    if let Some(allowed) = key_company.clone() {
        let job_company = |id: &str| w.job(id).map(|j| j.company_id.clone());
        let param = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let touched = match segs.as_slice() {
            ["v3", "export-jobs"] => param("company_id"),
            ["v3", "export-jobs", id, ..] => job_company(id),
            ["v3", "export-items"] => param("job_id").and_then(|j| job_company(&j)),
            ["v3", "export-job-events"] => serde_json::from_slice::<Value>(&req.body)
                .ok()
                .and_then(|v| v["jobId"].as_str().and_then(job_company)),
            _ => None,
        };
        if touched.is_some_and(|c| c != allowed) {
            return error(
                403,
                "FORBIDDEN",
                "this credential belongs to another company",
            );
        }
    }
    match (head.method.as_str(), segs.as_slice()) {
        ("GET", ["v3", "export-jobs"]) => {
            let r = list_jobs(w, &q, key_company.as_deref());
            // Another integration starts jobs right after a first page was answered.
            let first_page = !q.iter().any(|(k, _)| k == "after" || k == "offset");
            if first_page && r.status == 200 && !w.claim_after_first_page.is_empty() {
                for (id, fail) in std::mem::take(&mut w.claim_after_first_page) {
                    w.claim(&id, Claimant::Other, now);
                    if fail && let Some(j) = w.job_mut(&id) {
                        j.status = "failed".into();
                        j.failure_reason_type = Some("validation_failure".into());
                        j.completed_at = Some(now);
                        j.last_updated_at = Some(now);
                    }
                }
            }
            r
        }
        ("POST", ["v3", "export-jobs"]) => create_job(w, &req.body, now),
        ("GET", ["v3", "export-jobs", id]) => get_job(w, id, now),
        ("POST", ["v3", "export-job-events"]) => job_event(w, &req.body, now),
        ("GET", ["v3", "export-jobs", id, "items"]) => list_items(w, id, &q),
        ("PUT", ["v3", "export-jobs", id, "items"]) => put_items(w, id, &req.body, now),
        ("GET", ["v3", "export-items"]) => list_export_items(w, &q),
        ("POST", ["v1", "subscriptions"]) => {
            create_subscription(w, &req.body, now, key_company.clone())
        }
        ("GET" | "PUT" | "DELETE", ["v1", "subscriptions", id])
        | ("GET", ["v1", "subscriptions", id, "secret"])
            if !rules::is_uuid(id) =>
        {
            error(400, "INVALID_PARAMETER", "id must be a UUID")
        }
        ("GET", ["v1", "subscriptions"]) => list_subscriptions(w, &q, key_company.as_deref()),
        ("GET", ["v1", "subscriptions", id]) => {
            match w
                .subscriptions
                .iter()
                .find(|s| s.id == *id && s.company == key_company)
            {
                Some(sub) => Response::json(200, &json!({"data": sub.to_json()})),
                None => subscription_not_found(),
            }
        }
        ("PUT", ["v1", "subscriptions", id]) => {
            update_subscription(w, id, &req.body, now, key_company.as_deref())
        }
        ("DELETE", ["v1", "subscriptions", id]) => {
            let before = w.subscriptions.len();
            w.subscriptions
                .retain(|s| !(s.id == *id && s.company == key_company));
            if w.subscriptions.len() < before {
                Response::empty(204)
            } else {
                subscription_not_found()
            }
        }
        (_, ["v1", "subscriptions"]) => not_allowed("GET, POST"),
        (_, ["v1", "subscriptions", _]) => not_allowed("GET, PUT, DELETE"),
        ("GET", ["v1", "subscriptions", id, "secret"]) => {
            match w
                .subscriptions
                .iter()
                .find(|s| s.id == *id && s.company == key_company)
            {
                Some(sub) => Response::json(200, &json!({"data": {"secretKey": sub.secret}})),
                None => error(
                    404,
                    "SUBSCRIPTION_NOT_FOUND",
                    "The subscription secret record could not be found.",
                ),
            }
        }
        (_, ["v1", "subscriptions", _, "secret"]) => not_allowed("GET"),
        (_, ["v3", "export-jobs"]) => not_allowed("GET, POST"),
        (_, ["v3", "export-jobs", _]) => not_allowed("GET"),
        (_, ["v3", "export-job-events"]) => not_allowed("POST"),
        (_, ["v3", "export-jobs", _, "items"]) => not_allowed("GET, PUT"),
        (_, ["v3", "export-items"]) => not_allowed("GET"),
        _ => error(404, "NOT_FOUND", "no such endpoint"),
    }
}

/// 405 with the methods the path serves (RFC 9110 requires `Allow`).
pub(super) fn not_allowed(allow: &str) -> Response {
    error(405, "METHOD_NOT_ALLOWED", "method not allowed").with_header("Allow", allow)
}

pub(super) fn control(w: &mut World, req: &Request, segs: &[&str]) -> Response {
    match (req.head.method.as_str(), segs) {
        ("GET", ["_fake", "requests"]) => Response::json(200, &json!(w.requests)),
        ("GET", ["_fake", "webhooks"]) => Response::json(200, &json!(w.webhook_log)),
        ("POST", ["_fake", "webhook-options"]) => {
            match serde_json::from_slice::<WebhookOptions>(&req.body) {
                Ok(o) => {
                    w.webhook_options = o;
                    Response::empty(204)
                }
                Err(e) => error(400, "INVALID_BODY", &e.to_string()),
            }
        }
        ("POST", ["_fake", "fault-rates"]) => match serde_json::from_slice::<FaultRates>(&req.body)
        {
            Ok(r) => {
                w.rates = r;
                Response::empty(204)
            }
            Err(e) => error(400, "INVALID_BODY", &e.to_string()),
        },
        ("POST", ["_fake", "faults"]) => match serde_json::from_slice::<FaultRule>(&req.body) {
            Ok(rule) => {
                w.script.push_back(rule);
                Response::empty(204)
            }
            Err(e) => error(400, "INVALID_BODY", &e.to_string()),
        },
        _ => error(404, "NOT_FOUND", "no such fake control endpoint"),
    }
}
