//! Companies with OAuth token pairs of their own, over the real binary and the fake's token
//! endpoint: 100 companies refresh and rotate through a compressed day (24 lifetimes of their
//! access tokens) with one refresh each per expiry; a kill -9 while refreshes are on their way
//! to the token endpoint loses no pair; a company whose refresh token is revoked is shown as
//! needing re-authorization (status, doctor, the metric, why) and never delays the others,
//! and is served again, without a restart, once it is authorized again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jobmirror::sandbox::{FakePleo, JobSpec, TokenGrant};

use crate::cli::{cmd, jm, run_service, wait_for};
use crate::companies::{add_with_oauth, events};
use crate::operations::{fake, http_get};

/// Access tokens live 2 s and are refreshed 1 s before they expire: one refresh a second
/// per company, so 24 lifetimes (Pleo's tokens over a day, at an hour each) take about 24 s.
const TTL_SECS: i64 = 2;
const MARGIN_SECS: u64 = 1;
const LIFETIMES: u64 = 24;
const N: usize = 100;

fn company(i: usize) -> String {
    format!("c0a0a0a0-0000-4000-8000-{i:012}")
}

fn stored_refresh_token(
    db: &std::path::Path,
    company: &str,
) -> (Option<String>, Option<i64>, Option<i64>) {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    conn.query_row(
        "SELECT refresh_token, refresh_started_at, refused_at FROM oauth_tokens WHERE credential = ?1",
        [format!("company:{company}")],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
    .unwrap_or((None, None, None))
}

/// What the fake's hook does with token requests.
#[derive(Default)]
struct Gate {
    /// Company whose Nth request (from 1) closes the gate.
    close_on: Option<(String, usize)>,
    seen: HashMap<String, usize>,
    closed: bool,
    /// Requests held at the closed gate (dropped unprocessed when it opens).
    held: usize,
}

pub(crate) fn admin_addr(seen: &[String]) -> String {
    let l = seen
        .iter()
        .find(|l| l.contains("admin listener on http://"))
        .unwrap();
    l.split("http://")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_owned()
}

/// `c`'s token grants in `grants` (the fake's log at one moment): when, and whether granted.
fn grants_of(grants: &[TokenGrant], c: &str) -> Vec<(i64, bool)> {
    grants
        .iter()
        .filter(|g| g.company.as_deref() == Some(c))
        .map(|g| (g.at.0, g.ok))
        .collect()
}

/// Waits (bounded) until `cond` holds, looking again every 20 ms.
fn until(within: Duration, what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Successful grants of `c` so far.
fn granted(f: &FakePleo, c: &str) -> usize {
    grants_of(&f.token_grants(), c)
        .iter()
        .filter(|(_, ok)| *ok)
        .count()
}

#[test]
fn a_hundred_companies_refresh_once_per_expiry_survive_a_kill_and_a_revoked_one_delays_no_one() {
    let f = fake();
    f.enable_oauth("cid", "csecret", "default-pair-unused", TTL_SECS);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let db = d.join("jm.db");
    let cfg = d.join("jobmirror.toml");
    // No company_ids and no default pair: every company comes from the database with a pair
    // of its own.
    let companies: Vec<String> = (0..N).map(company).collect();
    let r = companies[N - 1].clone();
    // A handler whose readiness check fails for R while `r-not-ready` exists: R's job waits
    // in the mirror, so `why` has a job of R's to explain.
    let handler = d.join("handler.sh");
    let gate_file = d.join("r-not-ready");
    std::fs::write(&gate_file, "").unwrap();
    std::fs::write(
        &handler,
        format!(
            r#"#!/bin/sh
if [ "$1" = --check ]; then
  [ "$JOBMIRROR_COMPANY_ID" = {r} ] && [ -e {gate} ] && exit 1
  exit 0
fi
while read -r line; do
  case "$line" in *'"type":"item"'*) ;; *) continue ;; esac
  e=$(printf '%s' "$line" | sed -n 's/.*"accountingEntryId":"\([^"]*\)".*/\1/p')
  printf '{{"accountingEntryId":"%s","status":"successful"}}\n' "$e"
done
"#,
            gate = gate_file.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&handler, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(
        &cfg,
        format!(
            "db = {:?}\npleo_base_url = {:?}\npleo_auth = \"oauth\"\npleo_oauth_token_url = \"{}/oauth/token\"\npleo_oauth_client_id = \"cid\"\npleo_oauth_client_secret = \"csecret\"\npleo_oauth_refresh_margin_secs = {MARGIN_SECS}\nhandler_command = {:?}\nlanes = 4\npoll_interval_secs = 600\nadmin_listen = \"127.0.0.1:0\"\n",
            db.display().to_string(),
            f.base_url(),
            f.base_url(),
            handler.display().to_string(),
        ),
    )
    .unwrap();
    f.add_job(JobSpec {
        id: Some("job-99".into()),
        company_id: r.clone(),
        items: Some(1),
        ..JobSpec::default()
    })
    .unwrap();
    for c in &companies {
        add_with_oauth(&f, &cfg, d, c);
    }
    let mode = std::fs::metadata(&db).unwrap().permissions();
    assert_eq!(
        mode.mode() & 0o777,
        0o600,
        "the database holds the pairs: 0600"
    );

    // The gate: the 6th request of company K closes it, and every token request that comes
    // while it is closed is held there, unprocessed, until the service is killed.
    let k = companies[7].clone();
    let gate = Arc::new((Mutex::new(Gate::default()), std::sync::Condvar::new()));
    gate.0.lock().unwrap().close_on = Some((k.clone(), 6));
    {
        let gate = gate.clone();
        f.on_token_request(Box::new(move |c| {
            let (m, cv) = &*gate;
            let mut g = m.lock().unwrap();
            if let Some(c) = c {
                let n = g.seen.entry(c.to_owned()).or_default();
                *n += 1;
                let n = *n;
                if g.close_on
                    .as_ref()
                    .is_some_and(|(k, at)| k == c && *at == n)
                {
                    g.closed = true;
                    g.close_on = None;
                }
            }
            if !g.closed {
                return true;
            }
            g.held += 1;
            cv.notify_all();
            while g.closed {
                g = cv.wait(g).unwrap();
            }
            false
        }));
    }

    let started = Instant::now();
    let (reaper, rx) = run_service(&cfg);
    let mut seen = Vec::new();
    wait_for(&rx, "admin listener on http://", &mut seen);
    wait_for(&rx, &format!("recovery pass over {N} companies"), &mut seen);

    // A few refreshes in, customer R disconnects the integration: its tokens are revoked.
    until(Duration::from_secs(20), "R refreshed twice", || {
        granted(&f, &r) >= 2
    });
    f.revoke_company(&r);
    let revoked_at = Instant::now();
    for (i, c) in [(0, &companies[0]), (1, &companies[1]), (2, &companies[2])] {
        f.add_job(JobSpec {
            id: Some(format!("job-{i}")),
            company_id: c.clone(),
            items: Some(1),
            ..JobSpec::default()
        })
        .unwrap();
    }
    jm(&cfg, &["trigger"]);
    assert!(
        f.wait_for_requests(Duration::from_secs(20), |q| (0..3).all(|i| events(
            q,
            &format!("job-{i}")
        ) == [
            "started",
            "completed"
        ])),
        "the others' jobs are done while R's refresh is refused"
    );
    let others_done = revoked_at.elapsed();
    assert!(
        events(&f.requests(), "job-99").is_empty(),
        "nothing is sent for R"
    );

    // The kill: wait for the gate to close on K (the service committed its intent before
    // the request), then kill -9 while the requests are held, unprocessed.
    {
        let (m, cv) = &*gate;
        let mut g = m.lock().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(g.closed && g.held > 0) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "the gate never closed");
            g = cv.wait_timeout(g, left).unwrap().0;
        }
    }
    let (_, intent, _) = stored_refresh_token(&db, &k);
    assert!(
        intent.is_some(),
        "the intent to refresh is committed before the request"
    );
    // Kill only once every refresh the endpoint did answer is committed: the pairs with an
    // intent on record are then exactly those held at the gate, unprocessed. (One the endpoint
    // answered and jobmirror had not stored yet would be lost whatever jobmirror did: Pleo
    // has rotated it. README says so.)
    until(
        Duration::from_secs(20),
        "the refreshes in flight are the held ones",
        || {
            let held = gate.0.lock().unwrap().held as i64;
            let conn = rusqlite::Connection::open_with_flags(
                &db,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .unwrap();
            let pending: i64 = conn
                .query_row(
                    "SELECT count(*) FROM oauth_tokens WHERE refresh_started_at IS NOT NULL",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            pending == held
        },
    );
    let mut child = reaper;
    let mut c = child.0.take().unwrap();
    c.kill().unwrap();
    c.wait().unwrap();
    {
        let (m, cv) = &*gate;
        let mut g = m.lock().unwrap();
        g.closed = false;
        cv.notify_all();
    }
    // The restart: the interrupted refreshes are made again with the stored pairs.
    let (reaper, rx) = run_service(&cfg);
    let mut seen2 = Vec::new();
    wait_for(&rx, "admin listener on http://", &mut seen2);
    wait_for(
        &rx,
        &format!("recovery pass over {N} companies"),
        &mut seen2,
    );
    let admin = admin_addr(&seen2);
    // The day: every company but R through 24 lifetimes of its access token.
    until(
        Duration::from_secs(90),
        "every company refreshed once per lifetime for 24 lifetimes",
        || {
            companies
                .iter()
                .filter(|c| **c != r)
                .all(|c| granted(&f, c) as u64 >= LIFETIMES)
        },
    );
    // The grants and the time they took, read at one moment.
    let grants = f.token_grants();
    let elapsed_ms = started.elapsed().as_millis() as i64;

    // R: one refused refresh (terminal), shown everywhere, and nothing more sent for it.
    let rg = grants_of(&grants, &r);
    let refused: Vec<_> = rg.iter().filter(|(_, ok)| !ok).collect();
    assert_eq!(refused.len(), 1, "one refused refresh, then none: {rg:?}");
    let status = jm(&cfg, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    let row = v["companies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["company_id"] == r.as_str())
        .cloned()
        .unwrap();
    assert!(
        row["needs_reauthorization"]["why"]
            .as_str()
            .unwrap()
            .contains("re-authorization"),
        "{row}"
    );
    let out = cmd()
        .arg("--config")
        .arg(&cfg)
        .arg("doctor")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("company {r} needs re-authorization")),
        "{text}"
    );
    let why = jm(&cfg, &["why", "job-99", "--json"]);
    let w: serde_json::Value = serde_json::from_str(&why).unwrap();
    assert_eq!(w["rule"], "needs_reauthorization", "{w}");
    let (_, metrics) = http_get(&admin, "/metrics");
    assert!(
        metrics.contains("\njobmirror_companies_needing_reauthorization 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("\njobmirror_companies_served {N}\n")),
        "{metrics}"
    );
    let list = jm(&cfg, &["companies", "list", "--json"]);
    assert!(list.contains("needs_reauthorization"), "{list}");

    // The others: a refresh per lifetime, never two for one token, and every pair good.
    let mut counts = Vec::new();
    for c in companies.iter().filter(|c| **c != r) {
        let g = grants_of(&grants, c);
        assert!(
            g.iter().all(|(_, ok)| *ok),
            "company {c}: a refresh was refused: {g:?}"
        );
        let gaps: Vec<i64> = g.windows(2).map(|w| w[1].0 - w[0].0).collect();
        assert!(
            gaps.iter().all(|gap| *gap >= 800),
            "company {c}: two refreshes for one token: gaps {gaps:?} ms"
        );
        // At most one per (lifetime less margin).
        let most = elapsed_ms / 1000 + 1;
        assert!(
            g.len() as i64 <= most,
            "company {c}: {} refreshes in {elapsed_ms} ms",
            g.len()
        );
        counts.push(g.len());
    }
    counts.sort_unstable();
    eprintln!(
        "refreshes per company over {elapsed_ms} ms: min {} median {} max {}; the others' jobs done {others_done:?} after R's revocation",
        counts[0],
        counts[counts.len() / 2],
        counts[counts.len() - 1]
    );

    // R is authorized again (and ready): served without a restart, its job taken.
    std::fs::remove_file(&gate_file).unwrap();
    let out = add_with_oauth(&f, &cfg, d, &r);
    assert!(out.contains("authorized again"), "{out}");
    assert!(
        f.wait_for_requests(Duration::from_secs(20), |q| events(q, "job-99")
            == ["started", "completed"]),
        "R's job is taken once R is authorized again"
    );
    let (_, metrics) = http_get(&admin, "/metrics");
    assert!(
        metrics.contains("\njobmirror_companies_needing_reauthorization 0\n"),
        "{metrics}"
    );
    // Stopped (SIGTERM, nothing in flight): no pair lost, K's (whose refresh was killed in
    // flight) and R's (authorized again) included. What the database holds is each company's
    // live refresh token at the token endpoint.
    let mut reaper = reaper;
    let child = reaper.0.take().unwrap();
    crate::cli::signal(&child, "TERM");
    assert!(crate::cli::wait_exit(child, Duration::from_secs(20)).success());
    for c in &companies {
        let (stored, _, refused_at) = stored_refresh_token(&db, c);
        assert_eq!(
            stored,
            f.company_refresh_token(c),
            "company {c}: the stored pair is the live one"
        );
        assert!(refused_at.is_none(), "company {c}");
    }
    // No token in any log line.
    let mut all = seen;
    all.extend(seen2);
    while let Ok(l) = rx.try_recv() {
        all.push(l);
    }
    assert!(
        !all.iter()
            .any(|l| l.contains("fake-refresh") || l.contains("fake-access")),
        "a token reached the log"
    );
}
