//! The internet-facing edge of the real binary, over raw sockets (a client library would hide
//! the framing): a signed delivery sent chunked or after `Expect: 100-continue` is accepted,
//! a request hidden behind two `Content-Length`s is never answered, HTTP/1.0 is closed after
//! its answer, and idle sockets by the hundred never refuse a delivery or `/healthz`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use jobmirror::sandbox::FakePleo;

use crate::operations::{fake, hook_addr, http_get, start};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A signed delivery's head lines (no framing headers) and its body.
fn delivery(id: &str) -> (String, Vec<u8>) {
    let body = format!(
        r#"{{"data":{{"id":"e-{id}","companyId":"aaaaaaaa-0000-4000-8000-000000000001"}},"eventType":"v1.export-job.created","eventId":"{id}"}}"#
    )
    .into_bytes();
    let head = crate::webhook::signed(SECRET, id, now(), &body)
        .into_iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect::<String>();
    (head, body)
}

fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The real binary with its webhook receiver on (secret `SECRET`) and `extra` settings: the
/// process, its log lines, the admin address and the receiver's address.
struct Receiver {
    reaper: crate::cli::Reaper,
    log: crossbeam_channel::Receiver<String>,
    _notify: std::os::unix::net::UnixDatagram,
    admin: String,
    hook: SocketAddr,
}

fn receiver(dir: &std::path::Path, f: &FakePleo, extra: &[(&str, &str)]) -> Receiver {
    let mut settings = vec![
        ("JOBMIRROR_WEBHOOK_LISTEN", "127.0.0.1:0"),
        ("JOBMIRROR_WEBHOOK_SECRET", SECRET),
    ];
    settings.extend_from_slice(extra);
    let (reaper, log, notify, admin, seen) = start(dir, &f.base_url(), &settings);
    Receiver {
        reaper,
        log,
        _notify: notify,
        admin,
        hook: hook_addr(&seen),
    }
}

#[test]
fn the_edge_speaks_http_as_proxies_and_senders_do() {
    let f = fake();
    let dir = tempfile::tempdir().unwrap();
    let r = receiver(dir.path(), &f, &[]);
    let hook = r.hook;
    let admin = r.admin.clone();
    // Chunked, as a proxy such as Caddy forwards a body as it comes.
    let (head, body) = delivery("msg_chunked");
    let mut req = format!(
        "POST /webhooks/pleo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{head}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    let (a, b) = body.split_at(body.len() / 2);
    for part in [a, b] {
        req.extend(format!("{:x}\r\n", part.len()).as_bytes());
        req.extend(part);
        req.extend(b"\r\n");
    }
    req.extend(b"0\r\n\r\n");
    let r = exchange(hook, &req);
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");

    // Expect: 100-continue: the interim answer, then the body, then 200.
    let (head, body) = delivery("msg_expect");
    let mut s = TcpStream::connect(hook).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "POST /webhooks/pleo HTTP/1.1\r\nHost: x\r\n{head}Content-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    let mut interim = [0u8; 25];
    s.read_exact(&mut interim).unwrap();
    assert!(
        interim.starts_with(b"HTTP/1.1 100 Continue"),
        "{}",
        String::from_utf8_lossy(&interim)
    );
    s.write_all(&body).unwrap();
    let mut rest = String::new();
    let _ = s.read_to_string(&mut rest);
    assert!(rest.contains("HTTP/1.1 200"), "{rest}");

    // Two Content-Lengths that disagree: 400, and the request hidden in the body is never
    // answered.
    let (head, body) = delivery("msg_smuggle");
    let mut req = format!(
        "POST /webhooks/pleo HTTP/1.1\r\nHost: x\r\n{head}Content-Length: {}\r\nContent-Length: 9999\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend(&body);
    req.extend(b"GET /webhooks/pleo HTTP/1.1\r\nHost: x\r\n\r\n");
    let r = exchange(hook, &req);
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert_eq!(r.matches("HTTP/1.1").count(), 1, "{r}");
    let r = exchange(
        hook,
        b"POST /webhooks/pleo HTTP/1.1\r\nHost: x\r\nContent-Length: +2\r\n\r\n{}",
    );
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");

    // HTTP/1.0: answered and closed, not kept 30 s.
    let t = std::time::Instant::now();
    let r = exchange(
        hook,
        b"POST /webhooks/pleo HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}",
    );
    assert!(r.starts_with("HTTP/1.0 401"), "{r}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());

    // 600 idle sockets on the receiver and 40 on the admin port: a signed delivery and
    // /healthz are still answered.
    let idle: Vec<TcpStream> = (0..600)
        .map(|_| TcpStream::connect(hook).unwrap())
        .chain((0..40).map(|_| TcpStream::connect(admin.as_str()).unwrap()))
        .collect();
    let (head, body) = delivery("msg_after_idle");
    let mut req = format!(
        "POST /webhooks/pleo HTTP/1.1\r\nHost: x\r\n{head}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend(&body);
    let r = exchange(hook, &req);
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert_eq!(http_get(&admin, "/healthz").0, 200);
    drop(idle);
    let (_, metrics) = http_get(&admin, "/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l == "jobmirror_webhooks_accepted_total 3"),
        "{metrics}"
    );
}

const B: &str = "bbbbbbbb-0000-4000-8000-000000000002";
const SECRET_B: &str = "whsec_c2VjcmV0LW9mLWNvbXBhbnktYi1vbmx5LTAwMQ==";

fn signed_for(secret: &str, id: &str, company: &str, ts: i64) -> Vec<u8> {
    let body = format!(
        r#"{{"data":{{"id":"e-{id}","companyId":"{company}"}},"eventType":"v1.export-job.created","eventId":"{id}"}}"#
    )
    .into_bytes();
    let mut req = b"POST /webhooks/pleo HTTP/1.1\r\nHost: x\r\n".to_vec();
    for (k, v) in crate::webhook::signed(secret, id, ts, &body) {
        req.extend(format!("{k}: {v}\r\n").as_bytes());
    }
    req.extend(
        format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    req.extend(&body);
    req
}

#[test]
fn a_company_secret_opens_only_its_company_and_every_refusal_is_counted() {
    let f = fake();
    let dir = tempfile::tempdir().unwrap();
    // B has a subscription (and secret) of its own; A is on the default one.
    let store = jobmirror::store::Store::open(&dir.path().join("jm.db")).unwrap();
    store
        .company_add(
            B,
            &jobmirror::store::CompanyCredential::Default,
            None,
            jobmirror::clock::Millis(0),
        )
        .unwrap();
    store.company_subscription(B, "sub_b", SECRET_B).unwrap();
    drop(store);
    let r = receiver(dir.path(), &f, &[]);
    let hook = r.hook;
    let admin = r.admin.clone();
    let a = "aaaaaaaa-0000-4000-8000-000000000001";
    let t = now();
    let status = |req: Vec<u8>| exchange(hook, &req)[9..12].to_owned();
    assert_eq!(status(signed_for(SECRET_B, "m_b_as_a", a, t)), "401");
    assert_eq!(status(signed_for(SECRET, "m_default_as_b", B, t)), "401");
    assert_eq!(status(signed_for(SECRET_B, "m_b", B, t)), "200");
    assert_eq!(status(signed_for(SECRET, "m_a", a, t)), "200");
    // A timestamp that would wrap the tolerance check, correctly signed.
    assert_eq!(status(signed_for(SECRET, "m_wrap", a, i64::MIN + t)), "401");
    let r = exchange(
        hook,
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    let store = jobmirror::store::Store::open_read_only(&dir.path().join("jm.db")).unwrap();
    let ids: Vec<String> = store
        .conn()
        .prepare("SELECT webhook_id FROM webhook_deliveries ORDER BY webhook_id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(ids, ["m_a", "m_b"]);
    let (_, metrics) = http_get(&admin, "/metrics");
    for line in [
        "jobmirror_webhooks_rejected_total{reason=\"bad_signature\"} 2",
        "jobmirror_webhooks_rejected_total{reason=\"stale_timestamp\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line} in\n{metrics}"
        );
    }
    let framing = metrics
        .lines()
        .find(|l| {
            l.starts_with("jobmirror_http_refused_total{listener=\"webhook\",reason=\"framing\"}")
        })
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(!framing.ends_with(" 0"), "{framing}");
}

#[test]
fn a_listed_job_whose_id_no_request_can_hold_never_blocks_its_company() {
    let f = fake();
    let a = "aaaaaaaa-0000-4000-8000-000000000001";
    for (id, ago) in [("bad id/..", 120), ("good-1", 60)] {
        f.add_job(jobmirror::sandbox::JobSpec {
            id: Some(id.into()),
            company_id: a.into(),
            created_secs_ago: Some(ago),
            items: Some(1),
            ..jobmirror::sandbox::JobSpec::default()
        })
        .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let (_reaper, rx, _sock, admin, mut seen) = start(dir.path(), &f.base_url(), &[]);
    crate::cli::wait_for(&rx, "skipped an entry that is not a usable job", &mut seen);
    let line = seen.last().unwrap().clone();
    assert!(line.contains("\"bad id/..\""), "{line}");
    let t = std::time::Instant::now();
    while f.job("good-1").unwrap().status != "completed" {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the younger job was not taken: {}",
            f.job("good-1").unwrap().status
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(f.job("bad id/..").unwrap().status, "pending");
    let store = jobmirror::store::Store::open_read_only(&dir.path().join("jm.db")).unwrap();
    let kinds: Vec<String> = store
        .events(Some("bad id/.."))
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, ["listing_entry_skipped"]);
    let (_, metrics) = http_get(&admin, "/metrics");
    let n: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("jobmirror_listing_entries_skipped_total "))
        .unwrap_or_else(|| panic!("{metrics}"))
        .parse()
        .unwrap();
    assert!(n >= 1, "{n}");
}

#[test]
fn an_admin_listener_off_loopback_is_a_warning_in_check_config() {
    let run = |addr: &str| {
        crate::cli::cmd()
            .args(["check-config"])
            .env("JOBMIRROR_DB", "/nonexistent/x.db")
            .env("JOBMIRROR_PLEO_API_KEY", "k")
            .env(
                "JOBMIRROR_COMPANY_IDS",
                "aaaaaaaa-0000-4000-8000-000000000001",
            )
            .env("JOBMIRROR_HANDLER_COMMAND", "dry-run")
            .env("JOBMIRROR_ADMIN_LISTEN", addr)
            .output()
            .unwrap()
    };
    let out = run("0.0.0.0:9187");
    assert_eq!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning: admin_listen") && err.contains("not a loopback address"),
        "{err}"
    );
    let out = run("127.0.0.1:9187");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("warning"));
}

#[test]
fn stored_deliveries_are_bounded_per_company_and_in_all() {
    let f = fake();
    let dir = tempfile::tempdir().unwrap();
    let r = receiver(
        dir.path(),
        &f,
        &[
            ("JOBMIRROR_WEBHOOK_STORED_BYTES_PER_COMPANY_MAX", "2500"),
            ("JOBMIRROR_WEBHOOK_STORED_BYTES_MAX", "4000"),
        ],
    );
    let hook = r.hook;
    let admin = r.admin.clone();
    let a = "aaaaaaaa-0000-4000-8000-000000000001";
    let t = now();
    let send = |id: &str, company: &str| exchange(hook, &signed_for(SECRET, id, company, t));
    // Company A fills its share: the first deliveries are stored, then 429.
    let mut stored_a = Vec::new();
    let refused = loop {
        let id = format!("qa{}", stored_a.len());
        let r = send(&id, a);
        if !r.starts_with("HTTP/1.1 200") {
            break r;
        }
        stored_a.push(id);
        assert!(stored_a.len() < 20, "no bound reached");
    };
    assert!(!stored_a.is_empty());
    assert!(refused.starts_with("HTTP/1.1 429"), "{refused}");
    assert!(
        refused.to_ascii_lowercase().contains("retry-after: 60"),
        "{refused}"
    );
    // A retry of one already stored is still acknowledged as a duplicate.
    let again = send(&stored_a[0], a);
    assert!(
        again.starts_with("HTTP/1.1 200") && again.contains("\"duplicate\":true"),
        "{again}"
    );
    // Another company has room until the total bound: then 503.
    let mut stored_b = 0;
    let refused = loop {
        let r = send(&format!("qb{stored_b}"), B);
        if !r.starts_with("HTTP/1.1 200") {
            break r;
        }
        stored_b += 1;
        assert!(stored_b < 20, "no total bound reached");
    };
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    let store = jobmirror::store::Store::open_read_only(&dir.path().join("jm.db")).unwrap();
    let (rows, bytes): (i64, i64) = store
        .conn()
        .query_row(
            "SELECT count(*), sum(length(body) + length(headers)) FROM webhook_deliveries",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(rows as usize, stored_a.len() + stored_b);
    assert!(bytes <= 4000, "{bytes} bytes stored");
    let (_, metrics) = http_get(&admin, "/metrics");
    for line in [
        "jobmirror_webhooks_rejected_total{reason=\"company_quota\"} 1",
        "jobmirror_webhooks_rejected_total{reason=\"storage_quota\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line} in\n{metrics}"
        );
    }
}

fn proc_field(pid: u32, file: &str, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// User and system CPU time of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn hostile_clients_cost_bounded_memory_and_cpu() {
    let f = fake();
    let dir = tempfile::tempdir().unwrap();
    // The service starts with a soft open-file limit under its hard one (half of it, inherited
    // from this process for the moment of the spawn).
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct we own.
    let lowered = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_max >= 4096 && {
            let low = libc::rlimit {
                rlim_cur: lim.rlim_max / 2,
                rlim_max: lim.rlim_max,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &low) == 0
        }
    };
    // The old body bound, so that 1 MiB announcements are admitted, as far as they fit.
    let r = receiver(
        dir.path(),
        &f,
        &[("JOBMIRROR_WEBHOOK_BODY_BYTES_MAX", "1048576")],
    );
    if lowered {
        // SAFETY: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
    let pid = r.reaper.0.as_ref().unwrap().id();
    // Idle sockets cost a descriptor each: the soft limit is raised to the hard one at start.
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        files[3], files[4],
        "soft and hard open-file limits: {files:?}"
    );
    let hook = r.hook;
    // 300 clients announce 1 MiB each and send all but a byte.
    let body = vec![b'x'; (1 << 20) - 1];
    let clients: Vec<std::thread::JoinHandle<TcpStream>> = (0..300)
        .map(|i| {
            let body = body.clone();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(hook).unwrap();
                let _ = write!(
                    s,
                    "POST /webhooks/pleo HTTP/1.1\r\nHost: x\r\nwebhook-id: big{i}\r\nContent-Length: {}\r\n\r\n",
                    1 << 20
                );
                let _ = s.write_all(&body);
                s
            })
        })
        .collect();
    let held: Vec<TcpStream> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let peak = proc_field(pid, "status", "VmHWM:");
    assert!(
        peak < 100 * 1024,
        "peak RSS {peak} KiB with 300 clients announcing 1 MiB"
    );
    drop(held);
    // What the flood held is given back (bounded wait for the service to see the closes).
    let t0 = std::time::Instant::now();
    let mut rss = proc_field(pid, "status", "VmRSS:");
    while rss > 40 * 1024 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
        rss = proc_field(pid, "status", "VmRSS:");
    }
    eprintln!("peak {peak} KiB, after {rss} KiB");
    assert!(
        rss <= 40 * 1024,
        "RSS {rss} KiB after the flood (peak {peak} KiB)"
    );
    // A signed delivery is still taken.
    let (head, body) = delivery("msg_after_flood");
    let mut req = format!(
        "POST /webhooks/pleo HTTP/1.1\r\nHost: x\r\n{head}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend(&body);
    // The flood's memory permits come back as the service sees each close; until then it
    // answers 503 with Retry-After, which a sender follows (bounded: 10 s).
    let t0 = std::time::Instant::now();
    let mut r = exchange(hook, &req);
    while r.starts_with("HTTP/1.1 503") && t0.elapsed() < Duration::from_secs(10) {
        assert!(r.to_ascii_lowercase().contains("retry-after: 1"), "{r}");
        std::thread::sleep(Duration::from_millis(200));
        r = exchange(hook, &req);
    }
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");

    // Unsigned requests listing 300 well-formed signature entries (all a 16 KiB head holds)
    // over a 1 MiB body: one HMAC each, not one per entry.
    let big = vec![b'{'; 1 << 20];
    let entries = vec!["v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="; 300].join(" ");
    let before = cpu_ticks(pid);
    for i in 0..10 {
        let mut req = format!(
            "POST /webhooks/pleo HTTP/1.1\r\nHost: x\r\nwebhook-id: cpu{i}\r\nwebhook-timestamp: {}\r\nwebhook-signature: {entries}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            now(),
            big.len()
        )
        .into_bytes();
        req.extend(&big);
        let r = exchange(hook, &req);
        assert!(r.starts_with("HTTP/1.1 401"), "{}", &r[..r.len().min(200)]);
    }
    let ticks = cpu_ticks(pid) - before;
    // 300 HMACs over 1 MiB are 300 MB of hashing a request (most of a second of CPU each):
    // ten requests at one HMAC each stay well under a second.
    assert!(ticks < 100, "{ticks} ticks of CPU for 10 unsigned requests");
}

#[test]
fn jobs_and_show_never_print_control_characters_raw() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("jm.db");
    let store = jobmirror::store::Store::open(&db).unwrap();
    let job = jobmirror::wire::Job::from_value(serde_json::json!({
        "id": "j-esc",
        "companyId": "aaaaaaaa-0000-4000-8000-000000000001",
        "status": "failed",
        "createdAt": "2026-11-24T08:00:00Z",
        "lastUpdatedAt": "2026-11-24T08:00:00Z",
        "expiresIn": 3600,
        "failureReasonType": "validation_failure",
        "failureReason": "\u{1b}[2J\u{1b}[31mall clear\u{7}\nfake line",
    }))
    .unwrap();
    store
        .upsert_job(
            &job,
            jobmirror::clock::Millis::parse_rfc3339("2026-11-24T08:00:01Z").unwrap(),
            jobmirror::store::Source::Poll,
        )
        .unwrap();
    drop(store);
    for args in [&["show", "j-esc"][..], &["jobs", "--state", "done"][..]] {
        let out = crate::cli::cmd()
            .args(args)
            .env("JOBMIRROR_DB", &db)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args:?}: {text}");
        assert!(
            !out.stdout.iter().any(|&b| b == 0x1b || b == 0x07),
            "{args:?} printed a control character raw:\n{text}"
        );
        if args[0] == "show" {
            assert!(
                text.contains("\\x1b[2J\\x1b[31mall clear\\x07\\nfake line"),
                "{text}"
            );
        }
    }
}

#[test]
fn a_link_or_file_in_the_way_of_a_written_snapshot_is_refused_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "keep me\n").unwrap();
    let out = dir.path().join("sim.json");
    std::os::unix::fs::symlink(&victim, dir.path().join(".sim.json.tmp")).unwrap();
    let write = || {
        crate::cli::cmd()
            .args(["simulate", "--seed", "1", "--write"])
            .arg(&out)
            .output()
            .unwrap()
    };
    let r = write();
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains(".sim.json.tmp is in the way"), "{err}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me\n");
    assert!(!out.exists());
    // Once it is removed, the snapshot is written, private.
    std::fs::remove_file(dir.path().join(".sim.json.tmp")).unwrap();
    let r = write();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn a_flood_of_refused_deliveries_is_counted_in_full_and_logged_a_few_lines_a_second() {
    let f = fake();
    let dir = tempfile::tempdir().unwrap();
    let r = receiver(dir.path(), &f, &[]);
    let hook = r.hook;
    let admin = r.admin.clone();
    let rx = &r.log;
    let a = "aaaaaaaa-0000-4000-8000-000000000001";
    let forged = "whsec_Zm9yZ2VkLXNlY3JldC1mb3ItdGhlLWZsb29kLTAwMQ==";
    let t0 = std::time::Instant::now();
    for i in 0..200 {
        let r = exchange(hook, &signed_for(forged, &format!("flood{i}"), a, now()));
        assert!(r.starts_with("HTTP/1.1 401"), "{r}");
    }
    let secs = t0.elapsed().as_secs() + 2;
    // Everything the service logged until now (a stored delivery marks the end).
    let r = exchange(hook, &signed_for(SECRET, "after_flood", a, now()));
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let (_, metrics) = http_get(&admin, "/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l == "jobmirror_webhooks_rejected_total{reason=\"bad_signature\"} 200"),
        "{metrics}"
    );
    let mut logged = 0u64;
    while let Ok(l) = rx.recv_timeout(Duration::from_millis(300)) {
        if l.contains("refused: invalid signature") {
            logged += 1;
        }
    }
    assert!(logged >= 1, "the refusals are logged at all");
    assert!(
        logged <= 5 * secs,
        "{logged} log lines for 200 refusals in about {secs} s"
    );
}
