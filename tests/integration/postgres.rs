//! A real PostgreSQL server for the tests: one throw-away cluster per test process (initdb in a
//! temporary directory, as the `postgres` user when the tests run as root, since initdb refuses
//! root), listening on a loopback port with a password (scram-sha-256), and a fresh database per
//! test. Debian's `postgresql` package provides the server; with `JOBMIRROR_REQUIRE_POSTGRES=1`
//! (CI) a missing server fails the test instead of skipping it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

pub const PASSWORD: &str = "s3cret-pg-password";

pub struct Cluster {
    _dir: tempfile::TempDir,
    pub port: u16,
    pub password_file: PathBuf,
}

/// A database of its own for one test.
pub struct TestDb {
    pub url: String,
    pub password_file: PathBuf,
}

impl TestDb {
    pub fn target(&self) -> jobmirror::store::pg::PgTarget {
        jobmirror::store::pg::PgTarget::parse(
            &self.url,
            Some(jobmirror::wire::Secret::new(PASSWORD)),
        )
        .unwrap()
    }
    pub fn connect(&self) -> jobmirror::store::pg::PgStore {
        self.target().connect().unwrap()
    }
}

fn bindir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|b| b.join("postgres").exists() && b.join("initdb").exists())
        .collect();
    dirs.sort();
    dirs.pop()
}

/// Runs `bin` as the `postgres` user when this process is root; without libfaketime's
/// variables (the shifted-clock run must not shift the server's clock).
fn pg_command(bin: &Path, as_postgres: bool) -> Command {
    let mut c = if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    };
    for v in ["LD_PRELOAD", "FAKETIME", "FAKETIME_DONT_FAKE_MONOTONIC"] {
        c.env_remove(v);
    }
    c
}

fn start() -> Option<Cluster> {
    let Some(bin) = bindir() else {
        assert!(
            std::env::var_os("JOBMIRROR_REQUIRE_POSTGRES").is_none(),
            "PostgreSQL's server is not installed and JOBMIRROR_REQUIRE_POSTGRES is set"
        );
        eprintln!("PostgreSQL's server is not installed: skipping the PostgreSQL part");
        return None;
    };
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let dir = tempfile::Builder::new()
        .prefix("jobmirror-pg")
        .tempdir()
        .unwrap();
    let data = dir.path().join("data");
    let pwfile = dir.path().join("pw");
    std::fs::write(&pwfile, format!("{PASSWORD}\n")).unwrap();
    let password_file = dir.path().join("db-password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    if root {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let st = Command::new("chown")
            .args([
                "postgres:",
                pwfile.to_str().unwrap(),
                dir.path().to_str().unwrap(),
            ])
            .status()
            .unwrap();
        assert!(st.success(), "chown to postgres");
    }
    let out = pg_command(&bin.join("initdb"), root)
        .args(["-D", data.to_str().unwrap(), "-U", "postgres", "--pwfile"])
        .arg(&pwfile)
        .args([
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
        ])
        .args(["--locale=C.UTF-8", "--no-sync"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "initdb: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = crate::reliability::free_port();
    let log = dir.path().join("server.log");
    let out = pg_command(&bin.join("pg_ctl"), root)
        .args(["-D", data.to_str().unwrap(), "-w", "-t", "60", "-l"])
        .arg(&log)
        .arg("-o")
        .arg(format!(
            "-c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} \
             -c fsync=off -c max_connections=200 -c shared_buffers=32MB",
            dir.path().display()
        ))
        .arg("start")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pg_ctl start: {} {}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // A test process killed (by a timeout) runs no atexit hook: a watchdog stops the server
    // and removes its files once this process is gone, however it ended.
    let as_postgres = if root { "runuser -u postgres -- " } else { "" };
    let watchdog = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
         {as_postgres}'{pg_ctl}' -D '{data}' -m immediate stop >/dev/null 2>&1; rm -rf '{dir}'",
        pid = std::process::id(),
        pg_ctl = bin.join("pg_ctl").display(),
        data = data.display(),
        dir = dir.path().display(),
    );
    let mut w = Command::new("sh");
    w.arg("-c")
        .arg(watchdog)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    for v in ["LD_PRELOAD", "FAKETIME", "FAKETIME_DONT_FAKE_MONOTONIC"] {
        w.env_remove(v);
    }
    // Never waited for: it outlives this process by design (init reaps it).
    #[allow(clippy::zombie_processes)]
    w.spawn().unwrap();
    // The server is stopped when the test process ends: an atexit hook (tests end by exit).
    STOP.set((bin.join("pg_ctl"), data, root)).ok();
    // SAFETY: registering a plain extern "C" function.
    unsafe { libc::atexit(stop_at_exit) };
    Some(Cluster {
        _dir: dir,
        port,
        password_file,
    })
}

static STOP: OnceLock<(PathBuf, PathBuf, bool)> = OnceLock::new();

extern "C" fn stop_at_exit() {
    if let Some((pg_ctl, data, root)) = STOP.get() {
        let _ = pg_command(pg_ctl, *root)
            .args(["-D", data.to_str().unwrap(), "-m", "immediate", "stop"])
            .output();
    }
}

static CLUSTER: OnceLock<Option<Cluster>> = OnceLock::new();
static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A fresh database on the shared cluster, or None when PostgreSQL is not installed (and not
/// required).
pub fn database() -> Option<TestDb> {
    let c = CLUSTER.get_or_init(start).as_ref()?;
    let name = format!(
        "jm_{}_{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    );
    let admin = format!("postgresql://postgres@127.0.0.1:{}/postgres", c.port);
    let mut client =
        jobmirror::store::pg::PgTarget::parse(&admin, Some(jobmirror::wire::Secret::new(PASSWORD)))
            .unwrap()
            .connect()
            .unwrap();
    client
        .client()
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .unwrap();
    Some(TestDb {
        url: format!("postgresql://postgres@127.0.0.1:{}/{name}", c.port),
        password_file: c.password_file.clone(),
    })
}
