//! The admin listener: `/metrics` (Prometheus text, format 0.0.4) and `/healthz`, on the small
//! HTTP server.
//!
//! The invariant: scraping reads the database through its own read-only connection and never
//! writes; ids never become labels; `/healthz` is 200 only while every thread beats and no
//! company is failing.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::edge::httpd::{Handler, Head, Request, Response};
use crate::health::{Counters, Metrics, Progress};
use crate::store::Store;

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The admin listener's handler.
pub struct Admin {
    /// When the process started (Unix seconds), for `process_start_time_seconds`.
    pub started_at: f64,
    pub progress: std::sync::Arc<Progress>,
    pub metrics: std::sync::Arc<Metrics>,
    pub webhooks: Option<std::sync::Arc<Counters>>,
    /// Each HTTP listener's refusals (framing, time, size, bytes in flight, connections).
    pub http: Vec<(&'static str, std::sync::Arc<crate::edge::httpd::Refusals>)>,
    pub store: Mutex<Store>,
}

impl Admin {
    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut o = String::new();
        let family = |o: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        // A family with one unlabelled sample.
        let single =
            |o: &mut String, name: &str, kind: &str, help: &str, v: &dyn std::fmt::Display| {
                family(o, name, kind, help);
                let _ = writeln!(o, "{name} {v}");
            };
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        family(
            &mut o,
            "jobmirror_jobs",
            "gauge",
            "Jobs in the mirror by processing state.",
        );
        // Every state, present at zero: a query for one state never finds no series.
        let counts: HashMap<String, i64> = store
            .state_counts()
            .unwrap_or_default()
            .into_iter()
            .collect();
        for state in crate::store::ProcState::ALL {
            let n = counts.get(state.as_str()).copied().unwrap_or(0);
            let _ = writeln!(o, "jobmirror_jobs{{state=\"{}\"}} {n}", state.as_str());
        }
        let finished: HashMap<String, i64> = store
            .finish_counts()
            .unwrap_or_default()
            .into_iter()
            .collect();
        family(
            &mut o,
            "jobmirror_finished_total",
            "counter",
            "Final events sent, by outcome (from the journal).",
        );
        for outcome in ["completed", "completed_with_errors", "failed"] {
            let _ = writeln!(
                o,
                "jobmirror_finished_total{{outcome=\"{outcome}\"}} {}",
                finished.get(outcome).copied().unwrap_or(0)
            );
        }
        let last_poll = store.last_successful_poll().ok().flatten();
        let interval_ms = load(&self.metrics.poll_interval_secs) as i64 * 1000;
        let now = crate::clock::Millis(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
        );
        let poll_stale = store
            .companies_poll_stale(now, 3 * interval_ms)
            .map_or_else(|_| "NaN".to_owned(), |n| n.to_string());
        let next_deadline = store
            .in_flight()
            .ok()
            .and_then(|held| held.iter().map(|j| j.expires_at).min());
        let events: HashMap<String, i64> = store
            .event_counts()
            .unwrap_or_default()
            .into_iter()
            .collect();
        crate::ops::shared::metrics(&store, &mut o);
        drop(store);
        for (name, kind, help) in [
            (
                "jobmirror_claims_total",
                "claimed",
                "Jobs claimed with `started` (from the journal).",
            ),
            (
                "jobmirror_conflicts_total",
                "claim_conflict",
                "`started` answered 422: another integration was first.",
            ),
            (
                "jobmirror_resumed_total",
                "resumed",
                "Jobs taken back after a restart without `started`.",
            ),
            ("jobmirror_expiries_total", "expired", "Jobs that expired."),
            (
                "jobmirror_expired_waiting_total",
                "expired_waiting",
                "Pending jobs that expired before jobmirror took them (waiting for a lane, a readiness check, a pause).",
            ),
            (
                "jobmirror_claims_deferred_total",
                "claim_deferred",
                "Claims put off: too little time left for `started` to land before the deadline.",
            ),
            (
                "jobmirror_not_ready_total",
                "not_ready",
                "Readiness failures journaled (once per job and reason): the job was not started.",
            ),
        ] {
            single(
                &mut o,
                name,
                "counter",
                help,
                &events.get(kind).copied().unwrap_or(0),
            );
        }
        single(
            &mut o,
            "jobmirror_readiness_failures_total",
            "counter",
            "Readiness checks that failed (each check; the job was not started).",
            &load(&self.metrics.readiness_failures),
        );
        single(
            &mut o,
            "jobmirror_companies_not_ready",
            "gauge",
            "Companies whose readiness check is failing now.",
            &load(&self.metrics.companies_not_ready),
        );
        single(
            &mut o,
            "jobmirror_companies_failing",
            "gauge",
            "Companies whose listing is failing now (refused, or failed 3 times in a row).",
            &load(&self.metrics.companies_failing),
        );
        single(
            &mut o,
            "jobmirror_companies_refused",
            "gauge",
            "Companies whose credential Pleo refuses now (401 or 403).",
            &load(&self.metrics.companies_refused),
        );
        single(
            &mut o,
            "jobmirror_companies_served",
            "gauge",
            "Companies served now: company_ids and the database's companies, less the paused ones.",
            &load(&self.metrics.companies_served),
        );
        let reauth = self
            .store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .companies_needing_reauthorization()
            .map(|v| v.len().to_string())
            .unwrap_or_else(|_| "NaN".into());
        single(
            &mut o,
            "jobmirror_companies_needing_reauthorization",
            "gauge",
            "Companies whose own OAuth refresh token was refused: nothing is sent for them until they are authorized again.",
            &reauth,
        );
        single(
            &mut o,
            "jobmirror_oauth_client_refused",
            "gauge",
            "1 while the OAuth token endpoint refuses the client (invalid_client, unauthorized_client): no token is refreshed, none is used up, and refreshes resume by themselves once it is accepted.",
            &load(&self.metrics.oauth_client_refused),
        );
        single(
            &mut o,
            "jobmirror_poll_interval_seconds",
            "gauge",
            "The configured poll interval (poll_interval_secs).",
            &load(&self.metrics.poll_interval_secs),
        );
        single(
            &mut o,
            "jobmirror_poll_interval_min_seconds",
            "gauge",
            "The shortest poll interval the request budget allows for the companies served; above jobmirror_poll_interval_seconds, polls fall behind.",
            &load(&self.metrics.poll_interval_min_secs),
        );
        single(
            &mut o,
            "jobmirror_polls_waiting",
            "gauge",
            "Routine polls due and not finished yet (queued or running); staying near the number of companies means polls fall behind.",
            &load(&self.metrics.polls_waiting),
        );
        single(
            &mut o,
            "jobmirror_config_reload_refused",
            "gauge",
            "1 while the last reload (SIGHUP) was refused and the old configuration runs.",
            &load(&self.metrics.reload_refused),
        );
        if let Some(w) = &self.webhooks {
            single(
                &mut o,
                "jobmirror_webhooks_accepted_total",
                "counter",
                "Webhook deliveries stored and acknowledged.",
                &load(&w.accepted),
            );
            single(
                &mut o,
                "jobmirror_webhooks_duplicates_total",
                "counter",
                "Deliveries of a webhook-id already stored (acknowledged).",
                &load(&w.duplicates),
            );
            family(
                &mut o,
                "jobmirror_webhooks_rejected_total",
                "counter",
                "Webhook deliveries refused, by reason.",
            );
            for (reason, c) in [
                ("missing_headers", &w.rejected_missing_headers),
                ("bad_timestamp", &w.rejected_bad_timestamp),
                ("stale_timestamp", &w.rejected_stale_timestamp),
                ("bad_signature", &w.rejected_bad_signature),
                ("malformed", &w.malformed),
                ("queue_full", &w.queue_full),
                ("store_failed", &w.store_failed),
                ("company_quota", &w.rejected_company_quota),
                ("storage_quota", &w.rejected_storage_quota),
            ] {
                let _ = writeln!(
                    o,
                    "jobmirror_webhooks_rejected_total{{reason=\"{reason}\"}} {}",
                    load(c)
                );
            }
        }
        if !self.http.is_empty() {
            family(
                &mut o,
                "jobmirror_http_refused_total",
                "counter",
                "Requests and connections the HTTP listeners refused or closed, by listener and reason.",
            );
            for (listener, r) in &self.http {
                for (reason, n) in r.by_reason() {
                    let _ = writeln!(
                        o,
                        "jobmirror_http_refused_total{{listener=\"{listener}\",reason=\"{reason}\"}} {n}"
                    );
                }
            }
        }
        family(
            &mut o,
            "jobmirror_api_requests_total",
            "counter",
            "Pleo API requests (each attempt) by endpoint and HTTP status code; requests that got no answer are counted in jobmirror_api_errors_total.",
        );
        let api = self
            .metrics
            .api
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for ((endpoint, code), n) in api.iter().filter(|((_, c), _)| c != "error") {
            let _ = writeln!(
                o,
                "jobmirror_api_requests_total{{endpoint=\"{}\",code=\"{}\"}} {n}",
                escape(endpoint),
                escape(code)
            );
        }
        family(
            &mut o,
            "jobmirror_api_errors_total",
            "counter",
            "Pleo API requests (each attempt) that got no answer (connection refused or reset, timeout), by endpoint.",
        );
        for ((endpoint, _), n) in api.iter().filter(|((_, c), _)| c == "error") {
            let _ = writeln!(
                o,
                "jobmirror_api_errors_total{{endpoint=\"{}\"}} {n}",
                escape(endpoint)
            );
        }
        single(
            &mut o,
            "jobmirror_pleo_requests_failed_in_a_row",
            "gauge",
            "Requests to Pleo that failed in a row, each after its retries (no answer, 5xx, 429); 0 once one gets another answer. At 2 or more /healthz says degraded.",
            &load(&self.metrics.pleo_failed_in_a_row),
        );
        let since = load(&self.metrics.pleo_failing_since_ms);
        if since > 0 {
            single(
                &mut o,
                "jobmirror_pleo_failing_since_timestamp_seconds",
                "gauge",
                "When the current streak of failed requests to Pleo began (Unix time; absent while requests succeed).",
                &(since as f64 / 1000.0),
            );
        }
        let m = &self.metrics;
        family(
            &mut o,
            "jobmirror_poll_duration_seconds",
            "histogram",
            "Listing passes over one company (or one credential's companies), by duration.",
        );
        for (bound, n) in crate::health::POLL_BUCKETS.iter().zip(&m.poll_buckets) {
            let _ = writeln!(
                o,
                "jobmirror_poll_duration_seconds_bucket{{le=\"{bound}\"}} {}",
                load(n)
            );
        }
        let _ = writeln!(
            o,
            "jobmirror_poll_duration_seconds_bucket{{le=\"+Inf\"}} {}",
            load(&m.polls)
        );
        let _ = writeln!(
            o,
            "jobmirror_poll_duration_seconds_sum {:.6}",
            load(&m.poll_micros) as f64 / 1e6
        );
        let _ = writeln!(
            o,
            "jobmirror_poll_duration_seconds_count {}",
            load(&m.polls)
        );
        single(
            &mut o,
            "jobmirror_poll_failures_total",
            "counter",
            "Listing passes that failed.",
            &load(&m.polls_failed),
        );
        single(
            &mut o,
            "jobmirror_listing_entries_skipped_total",
            "counter",
            "Listed entries skipped as unusable jobs (unreadable, or an id no request path can hold), each listing counted.",
            &load(&m.listing_entries_skipped),
        );
        family(
            &mut o,
            "jobmirror_handler_results_total",
            "counter",
            "Item results the handler gave, by outcome.",
        );
        let _ = writeln!(
            o,
            "jobmirror_handler_results_total{{outcome=\"successful\"}} {}",
            load(&m.handler_successful)
        );
        let _ = writeln!(
            o,
            "jobmirror_handler_results_total{{outcome=\"failed\"}} {}",
            load(&m.handler_failed)
        );
        for (name, help, n) in [
            (
                "jobmirror_handler_crashes_total",
                "Handler runs that ended before answering every item (a crash, an exit, output that is not a result); the next run waits handler_retry_secs, doubling.",
                &m.handler_crashes,
            ),
            (
                "jobmirror_handler_timeouts_total",
                "Handler runs stopped for time (no result within handler_item_timeout_secs, the job limit, or the job's deadline near); the job failed as accounting_system_timeout.",
                &m.handler_timeouts,
            ),
            (
                "jobmirror_jobs_found_by_poll_total",
                "Jobs a listing poll found before any webhook named them.",
                &m.jobs_found_by_poll,
            ),
        ] {
            single(&mut o, name, "counter", help, &load(n));
        }
        single(
            &mut o,
            "jobmirror_companies_poll_stale",
            "gauge",
            "Companies whose listing keeps failing and last succeeded more than 3 poll intervals ago (or never).",
            &poll_stale,
        );
        single(
            &mut o,
            "jobmirror_threads_progressing",
            "gauge",
            "1 while every worker thread makes progress (0: one is stuck; /healthz names it). Whether the process is reachable is Prometheus's own `up`.",
            &u8::from(self.progress.healthy()),
        );
        if let Some(t) = last_poll {
            single(
                &mut o,
                "jobmirror_last_successful_poll_timestamp_seconds",
                "gauge",
                "When a listing pass last succeeded (Unix time; absent: never).",
                &(t.0 as f64 / 1000.0),
            );
        }
        if let Some(t) = next_deadline {
            single(
                &mut o,
                "jobmirror_next_deadline_timestamp_seconds",
                "gauge",
                "The earliest deadline (Unix time) of the jobs in hand (absent: no job in hand).",
                &(t.0 as f64 / 1000.0),
            );
        }
        family(
            &mut o,
            "jobmirror_build_info",
            "gauge",
            "The running build: always 1, its version and commit as labels.",
        );
        let _ = writeln!(
            o,
            "jobmirror_build_info{{version=\"{}\",commit=\"{}\"}} 1",
            escape(env!("CARGO_PKG_VERSION")),
            escape(env!("JOBMIRROR_COMMIT"))
        );
        process_metrics(&mut o, self.started_at);
        o
    }
}

impl Handler for Admin {
    fn check_head(&self, head: &Head) -> Option<Response> {
        if head.method != "GET" {
            return Some(Response::text(405, "GET only\n").with_header("Allow", "GET"));
        }
        None
    }

    fn handle(&self, req: Request) -> Response {
        match req.head.path.as_str() {
            "/metrics" => {
                let mut r = Response::text(200, &self.render());
                r.headers
                    .retain(|(k, _)| !k.eq_ignore_ascii_case("content-type"));
                r.with_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            }
            "/healthz" => {
                let stale = self.progress.stale(crate::clock::monotonic());
                let failing = self.metrics.companies_failing.load(Ordering::Relaxed);
                let refused = self.metrics.companies_refused.load(Ordering::Relaxed);
                if !stale.is_empty() {
                    Response::text(503, &format!("not making progress: {}\n", stale.join(", ")))
                } else if self.metrics.oauth_client_refused.load(Ordering::Relaxed) > 0 {
                    Response::text(
                        503,
                        "degraded: the OAuth token endpoint refuses the client (check its id and secret); see jobmirror doctor\n",
                    )
                } else if self.metrics.pleo_failing() {
                    Response::text(
                        503,
                        &format!(
                            "degraded: the last {} requests to Pleo failed (no answer, 5xx or 429); see jobmirror doctor and the log\n",
                            self.metrics.pleo_failed_in_a_row.load(Ordering::Relaxed)
                        ),
                    )
                } else if failing > 0 {
                    Response::text(
                        503,
                        &format!(
                            "degraded: listing fails for {failing} companies ({refused} with a credential Pleo refuses); see jobmirror doctor\n"
                        ),
                    )
                } else {
                    Response::text(200, "ok\n")
                }
            }
            _ => Response::text(404, "not found: try /metrics or /healthz\n"),
        }
    }
}

/// The standard `process_*` metrics (as Prometheus client libraries name them), read from
/// /proc/self: CPU seconds, resident and virtual memory, open and allowed file descriptors,
/// start time.
fn process_metrics(o: &mut String, started_at: f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // SAFETY: sysconf has no memory-safety preconditions.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK).max(1) as f64,
            libc::sysconf(libc::_SC_PAGESIZE).max(1) as f64,
        )
    };
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 (1-based, counting pid and comm): 11 and 12 here.
    let cpu = (field(11) + field(12)) / ticks;
    let vsize = field(20);
    let rss = field(21) * page;
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    let max_fds = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur as f64
    } else {
        0.0
    };
    for (name, kind, help, v) in [
        (
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time spent, seconds.",
            cpu,
        ),
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size, bytes.",
            rss,
        ),
        (
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size, bytes.",
            vsize,
        ),
        (
            "process_open_fds",
            "gauge",
            "Open file descriptors.",
            fds as f64,
        ),
        (
            "process_max_fds",
            "gauge",
            "The limit on open file descriptors.",
            max_fds,
        ),
        (
            "process_start_time_seconds",
            "gauge",
            "When the process started, Unix time.",
            started_at,
        ),
    ] {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    }
}
