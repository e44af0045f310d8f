//! One request to Pleo, sent well: paced by the credential's request budget, retried after
//! 429, 5xx and transport errors with capped exponential backoff and full jitter (honouring
//! `Retry-After`), and only when repeating cannot act twice; Pleo's `{type, message}` error
//! body is kept in the error, and Pleo's clock is read from each answer's `Date`.
//!
//! Invariant: the credential goes only into the `Authorization` header, never into a log line
//! or an error message.

use std::time::Duration;

use serde_json::Value;

use crate::clock::Millis;
use crate::pleo::{Auth, PleoClient, PleoError, refuses};

/// Which failures a request may be sent again after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Retry {
    /// 429, 5xx and transport errors: for reads and requests that are safe to repeat.
    Transient,
    /// Only after an answer that says the request was not applied ([`refuses`]). A lost
    /// answer (timeout, reset, cut-off body) or a 504 leaves the outcome unknown, and
    /// repeating would act twice.
    UnappliedOnly,
}

pub(crate) struct Reply {
    status: u16,
    body: String,
}

impl PleoClient {
    /// Sends one request with the retry policy. Returns the final reply (any status that is not
    /// retried, or the last one) or the last transport error.
    pub(crate) fn send(
        &self,
        method: &str,
        path: &str,
        query: &[(&str, String)],
        body: Option<&[u8]>,
    ) -> Result<Reply, PleoError> {
        self.send_with(method, path, query, body, Retry::Transient)
    }

    pub(crate) fn send_with(
        &self,
        method: &str,
        path: &str,
        query: &[(&str, String)],
        body: Option<&[u8]>,
        mode: Retry,
    ) -> Result<Reply, PleoError> {
        let policy = &self.cfg.retry;
        let mut attempt: u32 = 0;
        let mut refreshed = false;
        loop {
            attempt += 1;
            self.pace();
            if let Some(p) = &self.progress {
                p.beat();
            }
            let outcome = self.send_once(method, path, query, body);
            if let Some(m) = &self.metrics {
                let status = match &outcome {
                    Ok((reply, _)) => Some(reply.status),
                    Err(_) => None,
                };
                m.api_request(method, path, status);
            }
            // An access token refused before it expired (revoked, clock skew): refresh it once.
            if let (Ok((reply, _)), Auth::OAuth(src)) = (&outcome, &self.cfg.auth)
                && reply.status == 401
                && !refreshed
            {
                refreshed = true;
                src.invalidate();
                continue;
            }
            let (retry, wait) = match &outcome {
                Ok((reply, retry_after))
                    if refuses(reply.status)
                        || (reply.status >= 500 && mode == Retry::Transient) =>
                {
                    (
                        true,
                        retry_after
                            .map(|d| d.min(Duration::from_millis(policy.retry_after_cap_ms))),
                    )
                }
                Ok(_) => (false, None),
                Err(PleoError::Transport(_)) => (mode == Retry::Transient, None),
                Err(_) => (false, None),
            };
            if !retry || attempt >= policy.attempts_max.max(1) {
                if let Some(m) = &self.metrics {
                    let failed = match &outcome {
                        Ok((reply, _)) => reply.status >= 500 || reply.status == 429,
                        Err(PleoError::Transport(_)) => true,
                        Err(_) => false,
                    };
                    m.pleo_outcome(failed, self.clock.now());
                }
                return outcome.map(|(r, _)| r);
            }
            let wait = wait.unwrap_or_else(|| self.backoff(attempt));
            match &outcome {
                Ok((reply, _)) => log::warn!(
                    "{method} {path}: Pleo answered {}, retrying in {} ms (attempt {attempt} of {})",
                    reply.status,
                    wait.as_millis(),
                    policy.attempts_max
                ),
                Err(e) => log::warn!(
                    "{method} {path}: {e}, retrying in {} ms (attempt {attempt} of {})",
                    wait.as_millis(),
                    policy.attempts_max
                ),
            }
            self.clock.sleep(wait);
        }
    }

    /// Waits for a slot of the request budget (on the injected clock, so replays stay fast), at
    /// the calling thread's [`crate::pleo::pacer::Priority`].
    fn pace(&self) {
        if let Some(p) = &self.pacer {
            p.acquire(&*self.clock);
        }
    }

    /// Full jitter: uniform in [cap/2, cap] where cap = min(base * 2^(attempt-1), backoff cap).
    fn backoff(&self, attempt: u32) -> Duration {
        let p = &self.cfg.retry;
        let exp = p
            .backoff_base_ms
            .saturating_mul(1u64 << (attempt - 1).min(30))
            .min(p.backoff_cap_ms);
        let mut s = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        // xorshift64*
        *s ^= *s >> 12;
        *s ^= *s << 25;
        *s ^= *s >> 27;
        let r = s.wrapping_mul(0x2545_F491_4F6C_DD1D);
        let half = exp / 2;
        Duration::from_millis(half + if half == 0 { 0 } else { r % (exp - half + 1) })
    }

    fn send_once(
        &self,
        method: &str,
        path: &str,
        query: &[(&str, String)],
        body: Option<&[u8]>,
    ) -> Result<(Reply, Option<Duration>), PleoError> {
        let url = format!("{}{}", self.cfg.base_url, path);
        let auth = self.cfg.auth.header()?;
        let result = match method {
            "GET" => {
                let mut req = self.agent.get(&url).header("Authorization", &auth);
                for (k, v) in query {
                    req = req.query(*k, v);
                }
                req.header("Accept", "application/json").call()
            }
            "DELETE" => {
                let mut req = self.agent.delete(&url).header("Authorization", &auth);
                for (k, v) in query {
                    req = req.query(*k, v);
                }
                req.header("Accept", "application/json").call()
            }
            "POST" | "PUT" => {
                let mut req = if method == "POST" {
                    self.agent.post(&url)
                } else {
                    self.agent.put(&url)
                };
                req = req.header("Authorization", &auth);
                for (k, v) in query {
                    req = req.query(*k, v);
                }
                req.header("Content-Type", "application/json")
                    .header("Accept", "application/json")
                    .send(body.unwrap_or(b""))
            }
            other => return Err(PleoError::Config(format!("unsupported method {other}"))),
        };
        let mut resp = result.map_err(|e| PleoError::Transport(describe_ureq_error(&e)))?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|h| h.to_str().ok())
            .and_then(|s| parse_retry_after(s, self.clock.now()));
        if let Some(date) = resp
            .headers()
            .get("date")
            .and_then(|h| h.to_str().ok())
            .and_then(Millis::parse_http_date)
        {
            // Cut to the second: this underestimates Pleo's now by less than a second.
            let off = date.0 - self.clock.now().0;
            self.pleo_offset_ms
                .store(off, std::sync::atomic::Ordering::Relaxed);
        }
        let body = resp
            .body_mut()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_to_string()
            .map_err(|e| {
                PleoError::Transport(format!(
                    "reading {method} {path} reply: {}",
                    describe_ureq_error(&e)
                ))
            })?;
        log::debug!("{method} {path} -> {status} ({} bytes)", body.len());
        Ok((Reply { status, body }, retry_after))
    }
}

fn describe_ureq_error(e: &ureq::Error) -> String {
    // ureq's messages never contain request headers, so the credential cannot leak here.
    e.to_string()
}

/// `Retry-After` as seconds or an HTTP date.
pub fn parse_retry_after(v: &str, now: Millis) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = Millis::parse_http_date(v)?;
    Some(Duration::from_millis(now.until(at).max(0) as u64))
}

fn api_error(reply: &Reply) -> PleoError {
    let parsed: Option<Value> = serde_json::from_str(&reply.body).ok();
    let field = |k: &str| {
        parsed
            .as_ref()
            .and_then(|v| v.get(k))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    PleoError::Api {
        status: reply.status,
        kind: field("type").unwrap_or_else(|| "UNKNOWN".into()),
        message: field("message").unwrap_or_else(|| truncate(&reply.body, 200)),
    }
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

pub(crate) fn ok_status(reply: Reply) -> Result<Reply, PleoError> {
    if (200..300).contains(&reply.status) {
        Ok(reply)
    } else {
        Err(api_error(&reply))
    }
}

pub(crate) fn ok_json(reply: Reply) -> Result<Value, PleoError> {
    let reply = ok_status(reply)?;
    serde_json::from_str(&reply.body).map_err(|e| {
        // A 2xx with a body that does not parse is most often a cut connection.
        PleoError::Transport(format!("reply body is not complete JSON: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        let now = Millis::parse_rfc3339("2026-11-24T10:00:00Z").unwrap();
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Tue, 24 Nov 2026 10:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
