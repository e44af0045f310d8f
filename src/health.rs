//! Liveness and counters: per-thread progress beats, the counters and gauges the workers bump,
//! and what "failing" means for a company. The admin listener that shows them is
//! [`crate::ops::admin`].
//!
//! Invariants: a beat is a timestamp per thread name, taken on monotonic time, never business
//! time; a service is healthy only while every thread it expects has beaten recently (so a
//! wedged thread stops the systemd watchdog pings); counters only grow; scraping reads the
//! database through its own read-only connection and never writes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A company whose listing failed this many times in a row (or was refused once) is failing:
/// logged at ERROR, counted in `jobmirror_companies_failing`, reported by `/healthz` and
/// `doctor`.
pub const FAILING_AFTER: u32 = 3;

/// When each thread last showed it was making progress.
#[derive(Debug)]
pub struct Progress {
    beats: Mutex<HashMap<String, Instant>>,
    expected: Mutex<Vec<String>>,
    stale_after: Duration,
}

impl Progress {
    pub fn new(stale_after: Duration) -> Progress {
        Progress {
            beats: Mutex::new(HashMap::new()),
            expected: Mutex::new(Vec::new()),
            stale_after,
        }
    }

    /// Names a thread that must keep beating for the service to be healthy.
    pub fn expect(&self, thread: &str) {
        let mut e = self.expected.lock().unwrap_or_else(|p| p.into_inner());
        if !e.iter().any(|t| t == thread) {
            e.push(thread.to_owned());
        }
    }

    /// The calling thread made progress now.
    pub fn beat(&self) {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        let now = crate::clock::monotonic();
        let mut beats = self.beats.lock().unwrap_or_else(|p| p.into_inner());
        // Called on every API attempt and handler wait: no allocation once a thread is known.
        match beats.get_mut(name) {
            Some(t) => *t = now,
            None => {
                beats.insert(name.to_owned(), now);
            }
        }
    }

    /// Expected threads that have not beaten within the bound at `now` (never: also stale).
    pub fn stale(&self, now: Instant) -> Vec<String> {
        let beats = self.beats.lock().unwrap_or_else(|p| p.into_inner());
        let expected = self.expected.lock().unwrap_or_else(|p| p.into_inner());
        expected
            .iter()
            .filter(|t| {
                beats
                    .get(*t)
                    .is_none_or(|b| now.saturating_duration_since(*b) > self.stale_after)
            })
            .cloned()
            .collect()
    }

    /// How often an idle thread should beat: well inside the staleness bound.
    pub fn tick(&self) -> Duration {
        (self.stale_after / 3).clamp(Duration::from_millis(50), Duration::from_secs(20))
    }

    pub fn healthy(&self) -> bool {
        self.stale(crate::clock::monotonic()).is_empty()
    }
}

/// Set when the service is stopping: long loops (a pass over many companies, a backlog of
/// webhook-named jobs, a handler run) check it between items and leave the rest, which is
/// durable, for the next start.
#[derive(Debug, Default)]
pub struct Stopping(std::sync::atomic::AtomicBool);

impl Stopping {
    pub fn set(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Counters of the webhook receiver (it bumps them; `/metrics` shows them).
#[derive(Debug, Default)]
pub struct Counters {
    pub accepted: AtomicU64,
    pub duplicates: AtomicU64,
    pub rejected_missing_headers: AtomicU64,
    pub rejected_bad_timestamp: AtomicU64,
    pub rejected_stale_timestamp: AtomicU64,
    pub rejected_bad_signature: AtomicU64,
    pub malformed: AtomicU64,
    pub queue_full: AtomicU64,
    pub store_failed: AtomicU64,
    /// Not stored: the company's stored deliveries at `webhook_stored_bytes_per_company_max`.
    pub rejected_company_quota: AtomicU64,
    /// Not stored: all stored deliveries at `webhook_stored_bytes_max`.
    pub rejected_storage_quota: AtomicU64,
}

/// How often a thread with nothing else to do shows it is alive (the sync thread's idle
/// wait; the event thread's default beat).
pub const TICK: Duration = Duration::from_secs(20);

/// Counters the workers bump. (Webhook counters live in [`Counters`].)
#[derive(Debug, Default)]
pub struct Metrics {
    /// (endpoint pattern, status or "error") -> requests.
    pub(crate) api: Mutex<BTreeMap<(String, String), u64>>,
    pub polls: AtomicU64,
    pub polls_failed: AtomicU64,
    /// Listed entries that are not usable jobs (unreadable, or an id no request can name).
    pub listing_entries_skipped: AtomicU64,
    /// Sum of pass durations, microseconds.
    pub poll_micros: AtomicU64,
    pub handler_successful: AtomicU64,
    pub handler_failed: AtomicU64,
    /// Readiness checks that failed (the job was not started, or not resumed yet).
    pub readiness_failures: AtomicU64,
    /// Companies whose readiness check is failing now (set by the processor lanes).
    pub companies_not_ready: AtomicU64,
    /// Companies whose listing is failing now: refused (401, 403) or failed
    /// [`crate::health::FAILING_AFTER`] times in a row (set by the sync thread).
    pub companies_failing: AtomicU64,
    /// Of those, the ones whose credential Pleo refuses.
    pub companies_refused: AtomicU64,
    /// 1 after a SIGHUP whose configuration was refused, until a reload is taken.
    pub reload_refused: AtomicU64,
    /// The configured poll interval, and the shortest the request budget allows for the
    /// companies served (seconds; set at start-up).
    pub poll_interval_secs: AtomicU64,
    pub poll_interval_min_secs: AtomicU64,
    /// Routine polls that fell due and have not finished yet (queued for the listing pool, or
    /// running): near the number of companies, polls are falling behind.
    pub polls_waiting: AtomicU64,
    /// The companies served now (the configuration's and the database's; set when they change).
    pub companies_served: AtomicU64,
    /// 1 while the OAuth token endpoint refuses the client (`invalid_client`,
    /// `unauthorized_client`); no refresh token is used up meanwhile.
    pub oauth_client_refused: AtomicU64,
    /// Requests to Pleo that failed in a row, each after its retries (no answer, 5xx, 429);
    /// any other answer ends the streak. Pleo is down for this instance while it grows.
    pub pleo_failed_in_a_row: AtomicU64,
    /// When the streak began (Unix ms on the client's clock; 0: no streak).
    pub pleo_failing_since_ms: AtomicU64,
    /// Handler runs that ended before answering every item (a crash, an exit, garbage).
    pub handler_crashes: AtomicU64,
    /// Handler runs stopped for time: no result within the item limit, the job limit, or
    /// too close to the job's deadline.
    pub handler_timeouts: AtomicU64,
    /// Jobs first seen by a listing poll (not a webhook): with webhooks set up, these should
    /// be rare.
    pub jobs_found_by_poll: AtomicU64,
    /// Listing passes by duration: counts at or under each of [`POLL_BUCKETS`].
    pub poll_buckets: [AtomicU64; POLL_BUCKETS.len()],
}

/// The upper bounds (seconds) of `jobmirror_poll_duration_seconds`' histogram buckets.
pub const POLL_BUCKETS: [f64; 8] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// How many requests to Pleo must fail in a row before Pleo counts as failing for
/// `/healthz` (degraded) and `JobmirrorPleoFailing`.
pub const PLEO_FAILING_AFTER: u64 = 2;

impl Metrics {
    pub fn api_request(&self, method: &str, path: &str, status: Option<u16>) {
        let key = (
            endpoint_pattern(method, path),
            status.map_or("error".to_owned(), |s| s.to_string()),
        );
        *self
            .api
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default() += 1;
    }

    /// A request to Pleo ended (after its retries) at `now`: `failed` when it got no answer,
    /// a 5xx or a 429.
    pub fn pleo_outcome(&self, failed: bool, now: crate::clock::Millis) {
        if failed {
            if self.pleo_failed_in_a_row.fetch_add(1, Ordering::Relaxed) == 0 {
                self.pleo_failing_since_ms
                    .store(now.0.max(1) as u64, Ordering::Relaxed);
            }
        } else if self.pleo_failed_in_a_row.swap(0, Ordering::Relaxed) > 0 {
            self.pleo_failing_since_ms.store(0, Ordering::Relaxed);
        }
    }

    /// Whether Pleo is failing: [`PLEO_FAILING_AFTER`] requests or more failed in a row.
    pub fn pleo_failing(&self) -> bool {
        self.pleo_failed_in_a_row.load(Ordering::Relaxed) >= PLEO_FAILING_AFTER
    }

    pub fn poll_done(&self, took: Duration, failed: bool) {
        let secs = took.as_secs_f64();
        for (bound, n) in POLL_BUCKETS.iter().zip(&self.poll_buckets) {
            if secs <= *bound {
                n.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.polls.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.polls_failed.fetch_add(1, Ordering::Relaxed);
        }
        self.poll_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn readiness_failed(&self) {
        self.readiness_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn handler_result(&self, successful: bool) {
        if successful {
            &self.handler_successful
        } else {
            &self.handler_failed
        }
        .fetch_add(1, Ordering::Relaxed);
    }
}

/// `GET /v3/export-jobs/{id}` from `GET /v3/export-jobs/8c1e...` (ids never become labels).
pub fn endpoint_pattern(method: &str, path: &str) -> String {
    let ids = path.starts_with("/v3/export-jobs/") || path.starts_with("/v1/subscriptions/");
    let parts: Vec<&str> = path
        .split('/')
        .enumerate()
        .map(|(i, p)| {
            if i == 3 && ids && !p.is_empty() {
                "{id}"
            } else {
                p
            }
        })
        .collect();
    format!("{method} {}", parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_that_stops_beating_makes_the_service_unhealthy() {
        let p = Progress::new(Duration::from_secs(10));
        p.expect("jm-test-a");
        p.expect("jm-test-b");
        let start = crate::clock::monotonic();
        assert_eq!(p.stale(start).len(), 2, "never beaten: stale");
        let a = std::thread::Builder::new().name("jm-test-a".into()).spawn({
            let p = std::sync::Arc::new(Progress::new(Duration::from_secs(10)));
            move || {
                p.expect("jm-test-a");
                p.beat();
                p.stale(crate::clock::monotonic())
            }
        });
        assert!(a.unwrap().join().unwrap().is_empty());
        let p = std::sync::Arc::new(p);
        for name in ["jm-test-a", "jm-test-b"] {
            let p = p.clone();
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || p.beat())
                .unwrap()
                .join()
                .unwrap();
        }
        let now = crate::clock::monotonic();
        assert!(p.stale(now).is_empty());
        assert_eq!(
            p.stale(now + Duration::from_secs(11)),
            ["jm-test-a", "jm-test-b"]
        );
    }

    #[test]
    fn endpoint_patterns_hide_ids() {
        assert_eq!(
            endpoint_pattern("GET", "/v3/export-jobs/abc"),
            "GET /v3/export-jobs/{id}"
        );
        assert_eq!(
            endpoint_pattern("PUT", "/v3/export-jobs/abc/items"),
            "PUT /v3/export-jobs/{id}/items"
        );
        assert_eq!(
            endpoint_pattern("GET", "/v3/export-jobs"),
            "GET /v3/export-jobs"
        );
    }
}
