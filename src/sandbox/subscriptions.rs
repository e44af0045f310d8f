//! The fake's webhook subscriptions (list, create, get, update, delete, secret) and its
//! webhook sender.

use super::*;

pub(super) fn subscription_not_found() -> Response {
    error(
        404,
        "SUBSCRIPTION_NOT_FOUND",
        "The subscription record could not be found.",
    )
}

/// A `SubscriptionRequest` as Pleo's OpenAPI file has it: `endpointUrl` (string) and
/// `eventTypes` (unique strings) required, `status` ACTIVE (default) or INACTIVE,
/// `customHeaders` an object of strings, `endpointAuth` an object with `type` NONE or BASIC.
/// Nothing more: a URL the fake cannot deliver to is taken, and its deliveries fail.
/// Returns (url, event types, status) or a 400.
pub(super) fn subscription_request(body: &[u8]) -> Result<(String, Vec<String>, String), Response> {
    let bad = |m: &str| error(400, "INVALID_BODY", m);
    let v: Value =
        serde_json::from_slice(body).map_err(|e| bad(&format!("body is not JSON: {e}")))?;
    let url = match v.get("endpointUrl") {
        Some(Value::String(u)) => u.clone(),
        _ => return Err(bad("endpointUrl is required and must be a string")),
    };
    let mut types: Vec<String> = Vec::new();
    match v.get("eventTypes") {
        Some(Value::Array(a)) => {
            for t in a {
                match t {
                    Value::String(t) if types.contains(t) => {
                        return Err(bad("eventTypes must not repeat a type (uniqueItems)"));
                    }
                    Value::String(t) => types.push(t.clone()),
                    _ => return Err(bad("eventTypes must hold strings")),
                }
            }
        }
        _ => {
            return Err(bad(
                "eventTypes is required and must be an array of strings",
            ));
        }
    }
    // Nothing here is nullable in the file: null is a wrong type, not an absent field.
    let status = match v.get("status") {
        None => "ACTIVE".to_owned(),
        Some(Value::String(s)) if s == "ACTIVE" || s == "INACTIVE" => s.clone(),
        _ => return Err(bad("status must be ACTIVE or INACTIVE")),
    };
    match v.get("customHeaders") {
        None => {}
        Some(Value::Object(m)) if m.values().all(Value::is_string) => {}
        _ => return Err(bad("customHeaders must be an object of strings")),
    }
    let credentials_ok = |c: &Value| {
        c.as_object().is_some_and(|c| {
            ["password", "token", "username"]
                .iter()
                .all(|k| c.get(*k).is_none_or(Value::is_string))
        })
    };
    match v.get("endpointAuth") {
        None => {}
        Some(Value::Object(m))
            if m.get("type").is_none_or(|t| t == "NONE" || t == "BASIC")
                && m.get("credentials").is_none_or(credentials_ok) => {}
        _ => {
            return Err(bad(
                "endpointAuth must be an object with type NONE or BASIC and credentials of strings",
            ));
        }
    }
    Ok((url, types, status))
}

/// Subscriptions belong to the credential that made them: a company's own credential sees
/// and changes only its own, the default credential only those it made.
pub(super) fn create_subscription(
    w: &mut World,
    body: &[u8],
    now: Millis,
    company: Option<String>,
) -> Response {
    let (url, event_types, status) = match subscription_request(body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    use base64::Engine;
    let mut key = [0u8; 24];
    for chunk in key.chunks_mut(8) {
        let r = (w.rand() * u64::MAX as f64) as u64;
        chunk.copy_from_slice(&r.to_le_bytes()[..chunk.len()]);
    }
    let sub = Subscription {
        id: w.new_id(3),
        endpoint_url: url,
        event_types,
        status,
        secret: format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode(key)
        ),
        created_at: now,
        updated_at: now,
        company,
    };
    let out = json!({"data": sub.to_json()});
    w.subscriptions.push(sub);
    Response::json(200, &out)
}

pub(super) fn update_subscription(
    w: &mut World,
    id: &str,
    body: &[u8],
    now: Millis,
    company: Option<&str>,
) -> Response {
    let (url, event_types, status) = match subscription_request(body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let Some(sub) = w
        .subscriptions
        .iter_mut()
        .find(|s| s.id == id && s.company.as_deref() == company)
    else {
        return subscription_not_found();
    };
    sub.endpoint_url = url;
    sub.event_types = event_types;
    sub.status = status;
    sub.updated_at = now;
    Response::json(200, &json!({"data": sub.to_json()}))
}

/// `GET /v1/subscriptions`: filtered by `status` (any text: one no subscription has lists
/// none) and `event_types` (repeated, unique), paginated as every listing.
pub(super) fn list_subscriptions(
    w: &World,
    q: &[(String, String)],
    company: Option<&str>,
) -> Response {
    let q = Query(q);
    let checked = (|| {
        let status = q.single("status")?;
        let types: Vec<&str> =
            q.0.iter()
                .filter(|(k, _)| k == "event_types")
                .map(|(_, v)| v.as_str())
                .collect();
        if types
            .iter()
            .enumerate()
            .any(|(i, t)| types[..i].contains(t))
        {
            return Err(error(
                400,
                "INVALID_PARAMETER",
                "event_types must not repeat a type",
            ));
        }
        Ok((status, types, q.page(SUBSCRIPTION_SORT_KEYS, None)?))
    })();
    let (status, types, page) = match checked {
        Ok(c) => c,
        Err(r) => return r,
    };
    let mut subs: Vec<&Subscription> = w
        .subscriptions
        .iter()
        .filter(|s| s.company.as_deref() == company)
        .filter(|s| status.is_none_or(|st| s.status == st))
        .filter(|s| types.is_empty() || s.event_types.iter().any(|t| types.contains(&t.as_str())))
        .collect();
    page.sort(&mut subs, |s, key| match key {
        "createdAt" => sortable_time(Some(s.created_at)),
        _ => Some(s.id.clone()),
    });
    let mut params = Map::new();
    if let Some(st) = status {
        params.insert("status".into(), json!([st]));
    }
    if !types.is_empty() {
        params.insert("event_types".into(), json!(types));
    }
    listing(&subs, |s| s.id.clone(), &page, params, |s| s.to_json())
}

/// The fake's webhook sender: signs with the fake's clock, retries failures with a short
/// real-time backoff (the fake is a test double; a real sender retries for a day).
pub(super) fn deliver_webhooks(
    outbox: crossbeam_channel::Receiver<Outgoing>,
    shared: std::sync::Weak<Shared>,
) {
    let agent = crate::pleo::net::agent(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(5)))
            .build(),
    );
    for out in outbox {
        if out.options.delay_millis > 0 {
            std::thread::sleep(Duration::from_millis(out.options.delay_millis));
        }
        let copies = if out.options.duplicate { 2 } else { 1 };
        for _ in 0..copies {
            for attempt in 0..out.options.attempts_max.max(1) {
                let Some(world) = shared.upgrade() else {
                    return;
                };
                let ts = world.clock.now().0.div_euclid(1000);
                drop(world);
                let key = crate::edge::webhook::Secrets::parse(&out.secret).ok();
                let sig = key
                    .as_ref()
                    .map(|k| {
                        crate::edge::webhook::sign_with(k, &out.webhook_id, ts, out.body.as_bytes())
                    })
                    .unwrap_or_default();
                let p = if out.options.svix_headers {
                    "svix"
                } else {
                    "webhook"
                };
                let status = agent
                    .post(&out.url)
                    .header(format!("{p}-id"), &out.webhook_id)
                    .header(format!("{p}-timestamp"), ts.to_string())
                    .header(format!("{p}-signature"), &sig)
                    .header("Content-Type", "application/json")
                    .send(out.body.as_bytes())
                    .ok()
                    .map(|r| r.status().as_u16());
                if let Some(world) = shared.upgrade() {
                    world.lock().webhook_log.push(WebhookAttempt {
                        webhook_id: out.webhook_id.clone(),
                        url: out.url.clone(),
                        job_id: out.job_id.clone(),
                        status,
                    });
                    world.logged.notify_all();
                }
                if status.is_some_and(|s| (200..300).contains(&s)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50 << attempt.min(6)));
            }
        }
    }
}
