//! The fake's OAuth token endpoint: grants, refresh-token rotation, revocation.

use super::*;

pub(super) fn form_pairs(body: &[u8]) -> std::collections::HashMap<String, String> {
    String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (httpd::percent_decode(k), httpd::percent_decode(v)))
        .collect()
}

pub(super) fn token_endpoint(w: &mut World, body: &[u8], now: Millis) -> Response {
    let Some(o) = w.oauth.as_mut() else {
        return error(404, "NOT_FOUND", "OAuth is not enabled on this fake");
    };
    let f = form_pairs(body);
    let get = |k: &str| f.get(k).cloned().unwrap_or_default();
    if get("client_id") != o.client_id || get("client_secret") != o.client_secret {
        return Response::json(401, &json!({"error": "invalid_client"}));
    }
    if get("grant_type") != "refresh_token" {
        return Response::json(400, &json!({"error": "unsupported_grant_type"}));
    }
    let offered = get("refresh_token");
    let granted = o.refresh_tokens.remove(&offered);
    let ok = granted.is_some();
    let company = granted
        .flatten()
        .or_else(|| o.issued_to.get(&offered).cloned());
    o.grants.push(TokenGrant {
        at: now,
        refresh_token: offered,
        ok,
        company: company.clone(),
    });
    if !ok {
        return Response::json(400, &json!({"error": "invalid_grant"}));
    }
    o.issued += 1;
    let (access, refresh) = match &company {
        Some(c) => (
            format!("fake-access-{c}-{:04}", o.issued),
            format!("fake-refresh-{c}-{:04}", o.issued),
        ),
        None => (
            format!("fake-access-{:04}", o.issued),
            format!("fake-refresh-{:04}", o.issued),
        ),
    };
    o.access
        .insert(access.clone(), (now.plus_secs(o.ttl_secs), company.clone()));
    if let Some(c) = &company {
        o.issued_to.insert(refresh.clone(), c.clone());
    }
    o.refresh_tokens.insert(refresh.clone(), company);
    Response::json(
        200,
        &json!({"access_token": access, "refresh_token": refresh, "token_type": "bearer", "expires_in": o.ttl_secs}),
    )
}

/// The company a token request's refresh token was granted for (for the token hook).
pub(super) fn offered_company(w: &World, body: &[u8]) -> Option<String> {
    let f = form_pairs(body);
    let o = w.oauth.as_ref()?;
    o.refresh_tokens
        .get(f.get("refresh_token")?)
        .cloned()
        .flatten()
}

/// The company a bearer token belongs to, if it is one of a company's.
pub(super) fn bearer_company(w: &World, head: &Head) -> Option<String> {
    let t = head.header("authorization")?.strip_prefix("Bearer ")?;
    w.oauth.as_ref()?.access.get(t.trim())?.1.clone()
}
