//! The fake's answers checked against Pleo's own OpenAPI file (`../shared/pleo-openapi`).

use serde_json::{Value, json};

use crate::harness::{KEY, World};

fn spec() -> Value {
    spec_file("pleo-export-openapi.yml")
}

fn spec_file(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/pleo-openapi")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (the shared folder must sit beside the checkout)",
            path.display()
        )
    });
    serde_norway::from_str(&text).unwrap()
}

fn resolve<'a>(spec: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let name = r.strip_prefix("#/components/schemas/").expect("local ref");
            resolve(spec, &spec["components"]["schemas"][name])
        }
        None => schema,
    }
}

/// Checks `v` against `schema`: types, required fields, enums, nullability, date-times.
fn check(spec: &Value, schema: &Value, v: &Value, at: &str, errors: &mut Vec<String>) {
    let s = resolve(spec, schema);
    if v.is_null() {
        if s.get("nullable") != Some(&Value::Bool(true)) {
            errors.push(format!("{at}: null but not nullable"));
        }
        return;
    }
    if let Some(all) = s.get("allOf").and_then(Value::as_array) {
        for sub in all {
            check(spec, sub, v, at, errors);
        }
    }
    let ty = s.get("type").and_then(Value::as_str);
    let ok = match ty {
        Some("object") => v.is_object(),
        Some("array") => v.is_array(),
        Some("string") => v.is_string(),
        Some("integer") => v.is_i64() || v.is_u64(),
        Some("number") => v.is_number(),
        Some("boolean") => v.is_boolean(),
        _ => true,
    };
    if !ok {
        errors.push(format!("{at}: expected {ty:?}, got {v}"));
        return;
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array)
        && !e.contains(v)
    {
        errors.push(format!("{at}: {v} not in enum"));
    }
    if s.get("format").and_then(Value::as_str) == Some("date-time")
        && jobmirror::clock::Millis::parse_rfc3339(v.as_str().unwrap_or("")).is_none()
    {
        errors.push(format!("{at}: {v} is not a date-time"));
    }
    if let (Some(req), Some(o)) = (s.get("required").and_then(Value::as_array), v.as_object()) {
        for r in req {
            let r = r.as_str().unwrap();
            if !o.contains_key(r) {
                errors.push(format!("{at}: missing required `{r}`"));
            }
        }
    }
    if let (Some(props), Some(o)) = (
        s.get("properties").and_then(Value::as_object),
        v.as_object(),
    ) {
        for (k, sub) in props {
            if let Some(x) = o.get(k) {
                check(spec, sub, x, &format!("{at}.{k}"), errors);
            }
        }
    }
    if let (Some(items), Some(a)) = (s.get("items"), v.as_array()) {
        for (i, x) in a.iter().enumerate() {
            check(spec, items, x, &format!("{at}[{i}]"), errors);
        }
    }
}

struct Call {
    method: &'static str,
    path: String,
    body: Option<Value>,
    spec_path: &'static str,
}

fn send(base: &str, c: &Call) -> (u16, Value) {
    use base64::Engine;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{KEY}:"))
    );
    let url = format!("{base}{}", c.path);
    let mut resp = match (c.method, &c.body) {
        ("GET", _) => agent
            .get(&url)
            .header("Authorization", &auth)
            .call()
            .unwrap(),
        ("POST", Some(b)) => agent
            .post(&url)
            .header("Authorization", &auth)
            .send_json(b)
            .unwrap(),
        ("PUT", Some(b)) => agent
            .put(&url)
            .header("Authorization", &auth)
            .send_json(b)
            .unwrap(),
        ("DELETE", _) => agent
            .delete(&url)
            .header("Authorization", &auth)
            .call()
            .unwrap(),
        _ => unreachable!(),
    };
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap();
    (
        status,
        if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap()
        },
    )
}

#[test]
fn fake_answers_match_pleos_openapi() {
    let spec = spec();
    let w = World::new();
    w.fake
        .add_job(jobmirror::sandbox::JobSpec {
            id: Some("11111111-1111-4111-8111-111111111111".into()),
            company_id: "22222222-2222-4222-8222-222222222222".into(),
            status: "pending".into(),
            created_secs_ago: Some(60),
            items: Some(3),
            ..Default::default()
        })
        .unwrap();
    let job = "11111111-1111-4111-8111-111111111111";
    let company = "22222222-2222-4222-8222-222222222222";
    let item = w.fake.job(job).unwrap().items[0]
        .accounting_entry_id
        .clone();
    let calls = [
        Call {
            method: "GET",
            path: format!("/v3/export-jobs?company_id={company}&statuses=pending&limit=1"),
            body: None,
            spec_path: "/v3/export-jobs",
        },
        Call {
            method: "GET",
            path: format!("/v3/export-jobs/{job}"),
            body: None,
            spec_path: "/v3/export-jobs/{jobId}",
        },
        Call {
            method: "GET",
            path: "/v3/export-jobs/33333333-3333-4333-8333-333333333333".into(),
            body: None,
            spec_path: "/v3/export-jobs/{jobId}",
        },
        Call {
            method: "GET",
            path: format!("/v3/export-jobs/{job}/items?limit=2"),
            body: None,
            spec_path: "/v3/export-jobs/{jobId}/items",
        },
        Call {
            method: "GET",
            path: format!("/v3/export-items?job_id={job}"),
            body: None,
            spec_path: "/v3/export-items",
        },
        Call {
            method: "POST",
            path: "/v3/export-job-events".into(),
            body: Some(json!({"event": "started", "jobId": job})),
            spec_path: "/v3/export-job-events",
        },
        Call {
            method: "POST",
            path: "/v3/export-job-events".into(),
            body: Some(json!({"event": "started", "jobId": job})),
            spec_path: "/v3/export-job-events",
        },
        Call {
            method: "PUT",
            path: format!("/v3/export-jobs/{job}/items"),
            body: Some(
                json!([{"accountingEntryId": item, "status": "successful", "externalId": "X-1"},
                              {"accountingEntryId": "44444444-4444-4444-8444-444444444444", "status": "successful"}]),
            ),
            spec_path: "/v3/export-jobs/{jobId}/items",
        },
        Call {
            method: "PUT",
            path: format!("/v3/export-jobs/{job}/items"),
            body: Some(Value::Array(vec![
                json!({"accountingEntryId": item, "status": "successful"});
                101
            ])),
            spec_path: "/v3/export-jobs/{jobId}/items",
        },
        Call {
            method: "POST",
            path: "/v3/export-jobs".into(),
            body: Some(
                json!({"companyId": "55555555-5555-4555-8555-555555555555", "accountingEntryIds": ["66666666-6666-4666-8666-666666666666"]}),
            ),
            spec_path: "/v3/export-jobs",
        },
        Call {
            method: "POST",
            path: "/v3/export-job-events".into(),
            body: Some(json!({"event": "completed", "jobId": job})),
            spec_path: "/v3/export-job-events",
        },
        Call {
            method: "GET",
            path: format!("/v3/export-items?job_id={job}"),
            body: None,
            spec_path: "/v3/export-items",
        },
    ];
    let expected_status = [200, 200, 404, 200, 200, 202, 422, 200, 413, 201, 202, 422];
    let mut errors = Vec::new();
    for (c, want) in calls.iter().zip(expected_status) {
        let (status, body) = send(&w.fake.base_url(), c);
        assert_eq!(status, want, "{} {}: {body}", c.method, c.path);
        let op = &spec["paths"][c.spec_path][c.method.to_ascii_lowercase()];
        assert!(
            op.is_object(),
            "no operation {} {} in the spec",
            c.method,
            c.spec_path
        );
        let resp = &op["responses"][status.to_string()];
        assert!(
            resp.is_object(),
            "{} {} answered {status}, which the spec does not list",
            c.method,
            c.spec_path
        );
        match resp["content"].as_object().and_then(|m| m.values().next()) {
            Some(content) => check(
                &spec,
                &content["schema"],
                &body,
                &format!("{} {} {status}", c.method, c.spec_path),
                &mut errors,
            ),
            None => assert!(
                body.is_null(),
                "{} {} {status}: the spec lists no body",
                c.method,
                c.spec_path
            ),
        }
        // Cursors use Pleo's cursor alphabet.
        for k in ["startCursor", "endCursor"] {
            if let Some(cur) = body["pagination"][k].as_str() {
                assert!(
                    cur.bytes().all(|b| b.is_ascii_uppercase()
                        || (b'2'..=b'7').contains(&b)
                        || b == b'='
                        || b == b'~'),
                    "{cur}"
                );
            }
        }
    }
    assert!(
        errors.is_empty(),
        "shape mismatches:\n{}",
        errors.join("\n")
    );
}

#[test]
fn fake_subscription_answers_match_pleos_openapi() {
    let spec = spec_file("pleo-webhook-subscriptions-openapi.yml");
    let w = World::new();
    let (status, created) = send(
        &w.fake.base_url(),
        &Call {
            method: "POST",
            path: "/v1/subscriptions".into(),
            body: Some(
                json!({"endpointUrl": "https://example.com/webhooks/pleo", "eventTypes": ["v1.export-job.created"]}),
            ),
            spec_path: "/v1/subscriptions",
        },
    );
    assert_eq!(status, 200);
    let id = created["data"]["id"].as_str().unwrap().to_owned();
    let (status2, secret) = send(
        &w.fake.base_url(),
        &Call {
            method: "GET",
            path: format!("/v1/subscriptions/{id}/secret"),
            body: None,
            spec_path: "/v1/subscriptions/{id}/secret",
        },
    );
    assert_eq!(status2, 200);
    let mut errors = Vec::new();
    for (path, method, status, body) in [
        ("/v1/subscriptions", "post", status, &created),
        ("/v1/subscriptions/{id}/secret", "get", status2, &secret),
    ] {
        let resp = &spec["paths"][path][method]["responses"][status.to_string()];
        let schema = &resp["content"]
            .as_object()
            .unwrap()
            .values()
            .next()
            .unwrap()["schema"];
        check(&spec, schema, body, path, &mut errors);
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    assert!(
        secret["data"]["secretKey"]
            .as_str()
            .unwrap()
            .starts_with("whsec_")
    );
    // List, get, update, delete: each answer in its schema.
    let base = w.fake.base_url();
    let call = |method: &'static str, path: String, body: Option<Value>| {
        send(
            &base,
            &Call {
                method,
                path,
                body,
                spec_path: "",
            },
        )
    };
    let schema_of = |path: &str, method: &str, status: u16| {
        spec["paths"][path][method]["responses"][status.to_string()]["content"]
            .as_object()
            .map(|c| c.values().next().unwrap()["schema"].clone())
    };
    let mut errors = Vec::new();
    let (st, listed) = call("GET", "/v1/subscriptions?status=ACTIVE".into(), None);
    assert_eq!(st, 200);
    assert_eq!(listed["data"].as_array().unwrap().len(), 1);
    check(
        &spec,
        &schema_of("/v1/subscriptions", "get", 200).unwrap(),
        &listed,
        "list",
        &mut errors,
    );
    let (st, got) = call("GET", format!("/v1/subscriptions/{id}"), None);
    assert_eq!(st, 200);
    check(
        &spec,
        &schema_of("/v1/subscriptions/{id}", "get", 200).unwrap(),
        &got,
        "get",
        &mut errors,
    );
    // eventTypes has uniqueItems: a repeated type is a bad request, not quietly merged.
    let (st, err) = call(
        "PUT",
        format!("/v1/subscriptions/{id}"),
        Some(json!({"endpointUrl": "https://example.com/webhooks/pleo",
                    "eventTypes": ["v1.export-job.created", "v1.export-job.created", "v2.export-job.created"],
                    "status": "INACTIVE"})),
    );
    assert_eq!(
        (st, err["type"].as_str()),
        (400, Some("INVALID_BODY")),
        "{err}"
    );
    let (st, updated) = call(
        "PUT",
        format!("/v1/subscriptions/{id}"),
        Some(json!({"endpointUrl": "https://example.com/webhooks/pleo",
                    "eventTypes": ["v1.export-job.created", "v2.export-job.created"],
                    "status": "INACTIVE"})),
    );
    assert_eq!(st, 200);
    check(
        &spec,
        &schema_of("/v1/subscriptions/{id}", "put", 200).unwrap(),
        &updated,
        "put",
        &mut errors,
    );
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    assert_eq!(
        updated["data"]["eventTypes"],
        json!(["v1.export-job.created", "v2.export-job.created"])
    );
    assert_eq!(updated["data"]["status"], "INACTIVE");
    let (st, _) = call("GET", "/v1/subscriptions?status=ACTIVE".into(), None);
    assert_eq!(st, 200);
    // Refused as the file says: an unknown status, a wrongly typed field, a bad filter.
    for body in [
        json!({"endpointUrl": "https://e.com/webhooks/pleo", "eventTypes": ["x"], "status": "AAA"}),
        json!({"endpointUrl": "https://e.com/webhooks/pleo", "eventTypes": ["x"], "customHeaders": [1]}),
        json!({"endpointUrl": "https://e.com/webhooks/pleo", "eventTypes": ["x"], "endpointAuth": {"type": "OAUTH"}}),
        json!({"endpointUrl": "https://e.com/webhooks/pleo", "eventTypes": ["x"], "status": null}),
        json!({"endpointUrl": "https://e.com/webhooks/pleo", "eventTypes": ["x", "x"]}),
        json!({"eventTypes": ["x"]}),
    ] {
        let (st, err) = call("POST", "/v1/subscriptions".into(), Some(body.clone()));
        assert_eq!(st, 400, "{body}");
        assert!(
            err["type"].is_string() && err["message"].is_string(),
            "{err}"
        );
    }
    // `status` is any text in the file: one no subscription has lists none.
    let (st, none) = call("GET", "/v1/subscriptions?status=AAA".into(), None);
    assert_eq!((st, none["data"].as_array().map(Vec::len)), (200, Some(0)));
    let (st, _) = call("DELETE", format!("/v1/subscriptions/{id}"), None);
    assert_eq!(st, 204);
    assert_eq!(call("GET", format!("/v1/subscriptions/{id}"), None).0, 404);
    assert_eq!(
        call("DELETE", format!("/v1/subscriptions/{id}"), None).0,
        404
    );
    // Another method: 405 with Allow.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let auth = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("{KEY}:"))
    };
    let resp = agent
        .delete(format!("{base}/v1/subscriptions"))
        .header("Authorization", &format!("Basic {auth}"))
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 405);
    assert_eq!(
        resp.headers().get("allow").and_then(|v| v.to_str().ok()),
        Some("GET, POST")
    );
}

/// A request over loopback with any method and a raw body: (status, Allow header, JSON body).
fn raw(base: &str, method: &str, path: &str, body: Option<&str>) -> (u16, Option<String>, Value) {
    use base64::Engine;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .allow_non_standard_methods(true)
        .build()
        .into();
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{KEY}:"))
    );
    let req = ureq::http::Request::builder()
        .method(method)
        .uri(format!("{base}{path}"))
        .header("Authorization", &auth)
        .header("Content-Type", "application/json;charset=UTF-8")
        .body(body.unwrap_or("").to_owned())
        .unwrap();
    let mut resp = agent.run(req).unwrap();
    let allow = resp
        .headers()
        .get("Allow")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = resp.body_mut().read_to_string().unwrap();
    (
        resp.status().as_u16(),
        allow,
        serde_json::from_str(&text).unwrap_or(Value::Null),
    )
}

#[test]
fn the_fake_refuses_what_pleos_files_call_invalid_and_sorts_only_when_asked() {
    const C: &str = "0c0c0c0c-0000-4000-8000-000000000001";
    const JOB: &str = "0c0c0c0c-0000-4000-8000-0000000000b1";
    const ENTRY: &str = "0c0c0c0c-0000-4000-8000-0000000000e1";
    let w = World::new();
    let base = w.fake.base_url();
    // Three jobs inserted out of creation order.
    for (id, ago) in [("b2", 100), ("b1", 300), ("b3", 200)] {
        w.pending(C, &format!("0c0c0c0c-0000-4000-8000-0000000000{id}"), ago);
    }
    let before = w.fake.jobs();
    let refused = [
        (
            "GET",
            format!("/v3/export-jobs?company_id={C}&limit=-1"),
            None,
        ),
        (
            "GET",
            format!("/v3/export-jobs?company_id={C}&limit=2147483648"),
            None,
        ),
        (
            "GET",
            format!("/v3/export-jobs?company_id={C}&offset=-1"),
            None,
        ),
        ("GET", "/v3/export-jobs?company_id=not-a-uuid".into(), None),
        (
            "GET",
            format!("/v3/export-jobs?company_id={C}&statuses=pending,in_progress"),
            None,
        ),
        (
            "GET",
            format!("/v3/export-jobs?company_id={C}&sorting_order=UP"),
            None,
        ),
        (
            "GET",
            format!("/v3/export-jobs?company_id={C}&sorting_keys=colour"),
            None,
        ),
        (
            "GET",
            format!(
                "/v3/export-jobs?company_id={C}&sorting_keys=createdAt&sorting_keys=id&sorting_order=ASC"
            ),
            None,
        ),
        (
            "GET",
            format!("/v3/export-jobs?company_id={C}&after=abc"),
            None,
        ),
        (
            "GET",
            format!("/v3/export-jobs?company_id={C}&limit=1&limit=2"),
            None,
        ),
        ("GET", "/v3/export-jobs/not-a-uuid".into(), None),
        (
            "GET",
            format!("/v3/export-jobs/{JOB}/items?status=done"),
            None,
        ),
        (
            "POST",
            "/v3/export-jobs".into(),
            Some(r#"{"companyId": "", "accountingEntryIds": []}"#.to_owned()),
        ),
        (
            "POST",
            "/v3/export-jobs".into(),
            Some(format!(
                r#"{{"companyId": "{C}", "accountingEntryIds": [[]]}}"#
            )),
        ),
        (
            "POST",
            "/v3/export-jobs".into(),
            Some(format!(
                r#"{{"companyId": "{C}", "accountingEntryIds": [], "employeeId": "AAA"}}"#
            )),
        ),
        ("POST", "/v3/export-jobs".into(), None),
        (
            "POST",
            "/v3/export-job-events".into(),
            Some(format!(
                r#"{{"event": "started", "jobId": "{JOB}", "failureReasonType": "gremlins"}}"#
            )),
        ),
        (
            "POST",
            "/v3/export-job-events".into(),
            Some(r#"{"event": "started", "jobId": "job-1"}"#.to_owned()),
        ),
        (
            "PUT",
            format!("/v3/export-jobs/{JOB}/items"),
            Some(format!(
                r#"[{{"accountingEntryId": "{ENTRY}", "status": "done"}}]"#
            )),
        ),
        (
            "PUT",
            format!("/v3/export-jobs/{JOB}/items"),
            Some(format!(
                r#"[{{"accountingEntryId": "{ENTRY}", "status": "failed", "failureReasonType": "gremlins"}}]"#
            )),
        ),
        (
            "PUT",
            format!("/v3/export-jobs/{JOB}/items"),
            Some(format!(
                r#"[{{"accountingEntryId": "{ENTRY}", "status": "successful", "exportedAt": "yesterday"}}]"#
            )),
        ),
        (
            "PUT",
            format!("/v3/export-jobs/{JOB}/items"),
            Some(r#"{"status": "successful"}"#.to_owned()),
        ),
    ];
    for (method, path, body) in &refused {
        let (st, _, err) = raw(&base, method, path, body.as_deref());
        assert_eq!(st, 400, "{method} {path} {body:?}: {err}");
        assert!(
            err["type"].is_string() && err["message"].is_string(),
            "{err}"
        );
    }
    // A refusal names the bad value without echoing it whole.
    let long = "x".repeat(5000);
    let (st, _, err) = raw(
        &base,
        "PUT",
        &format!("/v3/export-jobs/{JOB}/items"),
        Some(&format!(
            r#"[{{"accountingEntryId": "{ENTRY}", "status": "{long}"}}]"#
        )),
    );
    assert_eq!(st, 400);
    let message = err["message"].as_str().unwrap();
    assert!(
        message.contains("status") && !message.contains(&long[..100]),
        "{message}"
    );
    assert_eq!(
        w.fake.jobs().len(),
        before.len(),
        "a refused request changes nothing"
    );
    for (j, b) in w.fake.jobs().iter().zip(&before) {
        assert_eq!((&j.id, &j.status), (&b.id, &b.status));
    }

    // Without sorting keys: the fake's own order (as inserted), promised to nobody.
    let ids = |v: &Value| -> Vec<String> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap()[34..].to_owned())
            .collect()
    };
    let (st, _, plain) = raw(
        &base,
        "GET",
        &format!("/v3/export-jobs?company_id={C}"),
        None,
    );
    assert_eq!(
        (st, ids(&plain)),
        (200, vec!["b2".into(), "b1".into(), "b3".into()])
    );
    // Asked for: honoured, and said so in currentRequestPagination.
    let (_, _, desc) = raw(
        &base,
        "GET",
        &format!("/v3/export-jobs?company_id={C}&sorting_keys=createdAt&sorting_order=DESC"),
        None,
    );
    assert_eq!(ids(&desc), ["b2", "b3", "b1"]);
    let current = &desc["pagination"]["currentRequestPagination"];
    assert_eq!(current["sortingKeys"], json!(["createdAt"]));
    assert_eq!(current["sortingOrder"], json!(["DESC"]));
    // Cursors follow the order asked for.
    let (_, _, first) = raw(
        &base,
        "GET",
        &format!("/v3/export-jobs?company_id={C}&sorting_keys=createdAt&limit=1"),
        None,
    );
    assert_eq!(ids(&first), ["b1"]);
    let after = first["pagination"]["endCursor"].as_str().unwrap();
    let (_, _, next) = raw(
        &base,
        "GET",
        &format!("/v3/export-jobs?company_id={C}&sorting_keys=createdAt&limit=1&after={after}"),
        None,
    );
    assert_eq!(ids(&next), ["b3"]);

    // Schema-valid data is generated: export item line ids are UUIDs.
    let job = "0c0c0c0c-0000-4000-8000-0000000000b1";
    let (st, _, items) = raw(
        &base,
        "GET",
        &format!("/v3/export-items?job_id={job}"),
        None,
    );
    assert_eq!(st, 200, "{items}");
    for item in items["data"].as_array().unwrap() {
        for line in item["accountingEntryLines"].as_array().unwrap() {
            let id = line["accountingEntryLineId"].as_str().unwrap();
            assert!(jobmirror::sandbox::rules::is_uuid(id), "{id}");
        }
    }

    // Every served path answers another method with 405 and the methods it serves.
    for (path, allow) in [
        ("/v3/export-jobs".to_owned(), "GET, POST"),
        (format!("/v3/export-jobs/{job}"), "GET"),
        (format!("/v3/export-jobs/{job}/items"), "GET, PUT"),
        ("/v3/export-job-events".to_owned(), "POST"),
        ("/v3/export-items".to_owned(), "GET"),
        ("/v1/subscriptions".to_owned(), "GET, POST"),
    ] {
        for method in ["DELETE", "PATCH", "TRACE"] {
            let (st, got, _) = raw(&base, method, &path, None);
            assert_eq!((st, got.as_deref()), (405, Some(allow)), "{method} {path}");
        }
    }
}
