//! A handler's process: started in its own process group, killed with the whole group, its
//! stderr sent to our log, and marked with the job (and database) it works for so that a
//! handler left behind by a killed service is found and stopped before the job is resumed.
//!
//! Invariant: a [`Running`] handler never outlives its value (dropping it kills the group) nor
//! the service (the kernel kills it when the service dies).

use std::process::{Child, Command};
use std::time::Duration;

use crossbeam_channel::Receiver;
use serde_json::Value;

use crate::processing::output::{HandlerMsg, LineReader, STDERR_LINE_MAX, printable};

/// A started handler. Dropping it kills the handler and its whole process group.
pub struct Running {
    pub messages: Receiver<HandlerMsg>,
    pub(crate) child: Option<Child>,
    /// Set once the handler was reaped.
    pub(crate) status: Option<std::process::ExitStatus>,
}

impl Running {
    /// Kills the handler's process group (children holding its pipes included) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // The group is signalled before the leader is reaped, so its id cannot have been
            // reused by then.
            kill_group(&c);
            let _ = c.kill();
            self.status = c.wait().ok();
        }
    }

    /// Whether the handler process itself has exited (without reaping it; its children may
    /// live on). In-process handlers never "exit": their end is [`HandlerMsg::Eof`].
    pub fn exited(&self) -> bool {
        match &self.child {
            Some(c) => child_exited(c),
            None => self.status.is_some(),
        }
    }

    /// Ends the run: waits up to `grace` for the handler to exit by itself, then kills what is
    /// left of its process group, and gives its exit status.
    pub fn finish(&mut self, grace: Duration) -> Result<(), String> {
        if self.child.is_none() && self.status.is_none() {
            return Ok(());
        }
        let t0 = std::time::Instant::now();
        let mut lingered = false;
        while self.child.is_some() && !self.exited() {
            if t0.elapsed() >= grace {
                lingered = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
        match self.status {
            _ if lingered => Err(format!(
                "did not exit within {} s of its last answer; killed",
                grace.as_secs()
            )),
            Some(s) if s.success() => Ok(()),
            Some(s) => Err(describe_status(&Ok(s))),
            None => Err("its exit status could not be read".into()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether `c` has exited, without reaping it (so its process group id stays reserved).
pub(crate) fn child_exited(c: &Child) -> bool {
    #[cfg(target_os = "linux")]
    {
        let pid: libc::id_t = c.id();
        // SAFETY: waitid(2) with WNOWAIT on our own child writes only into `info`.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let r = libc::waitid(
                libc::P_PID,
                pid,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            );
            r == 0 && info.si_pid() != 0
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = c;
        false
    }
}

pub(crate) fn kill_group(child: &Child) {
    #[cfg(unix)]
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) on our own child's process group; no memory is involved.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
}

pub(crate) fn describe_status(s: &std::io::Result<std::process::ExitStatus>) -> String {
    match s {
        Ok(s) => match s.code() {
            Some(c) => format!("exit status {c}"),
            None => "killed by a signal".into(),
        },
        Err(e) => e.to_string(),
    }
}

/// What every handler gets from the service's environment, when it is set there: nothing
/// else of it (no credential, no path to one, no `CREDENTIALS_DIRECTORY`, no database path).
pub const HANDLER_ENV_ALLOWED: [&str; 6] = ["PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ"];

/// A handler's environment, built from nothing: the allowlist, the protocol's values, and the
/// operator's own (`handler_env`).
pub(crate) fn set_env(cmd: &mut Command, job: &Value, extra: &[(String, String)]) {
    cmd.env_clear();
    for name in HANDLER_ENV_ALLOWED {
        if let Some(v) = std::env::var_os(name) {
            cmd.env(name, v);
        }
    }
    if std::env::var_os("PATH").is_none() {
        cmd.env("PATH", "/usr/local/bin:/usr/bin:/bin");
    }
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.env("JOBMIRROR_JOB_ID", job["id"].as_str().unwrap_or(""));
    cmd.env(
        "JOBMIRROR_COMPANY_ID",
        job["companyId"].as_str().unwrap_or(""),
    );
}

pub(crate) fn own_group(cmd: &mut Command) {
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    // A handler never outlives the service that started it: the kernel kills it when the
    // starting thread (a processor lane, which lives as long as the service) dies, kill -9
    // included. Its own children are found by their marker at the next start.
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The service died between fork and prctl: do not run orphaned.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
    }
}

/// The environment variable that marks a handler's processes with the job (and database) it
/// works for.
pub const MARKER_VAR: &str = "JOBMIRROR_HANDLER_OF";

/// The marker of `job_id`'s handler runs for the service on `db`: opaque (a digest), so a
/// handler learns neither the database's path nor anything else from it.
pub fn handler_marker(db: &std::path::Path, job_id: &str) -> String {
    use sha2::Digest;
    let db = std::fs::canonicalize(db).unwrap_or_else(|_| db.to_path_buf());
    let mut h = sha2::Sha256::new();
    h.update(job_id.as_bytes());
    h.update([0]);
    h.update(db.as_os_str().as_encoded_bytes());
    h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `pid` exists and is not a zombie (read from `/proc`; false where there is none).
pub fn process_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        // The state follows the parenthesised command name, which may itself hold spaces.
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// Kills (SIGKILL) every process whose environment carries `MARKER_VAR=marker`, other than
/// this one, and waits (at most 2 s) until they are gone. Returns how many were found.
pub fn stop_earlier_handlers(marker: &str) -> usize {
    #[cfg(target_os = "linux")]
    {
        let want = format!("{MARKER_VAR}={marker}").into_bytes();
        let me = std::process::id();
        let mut found = Vec::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for e in dir.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                    continue;
                };
                if pid == me {
                    continue;
                }
                // Unreadable (another user's, or gone): not ours.
                let Ok(env) = std::fs::read(e.path().join("environ")) else {
                    continue;
                };
                if env.split(|b| *b == 0).any(|kv| kv == want.as_slice()) {
                    found.push(pid);
                }
            }
        }
        for pid in &found {
            // SAFETY: a plain kill(2) of a pid whose environment names this job and database.
            unsafe {
                libc::kill(*pid as libc::pid_t, libc::SIGKILL);
            }
        }
        let t0 = std::time::Instant::now();
        while t0.elapsed() < Duration::from_secs(2) && found.iter().any(|p| process_running(*p)) {
            std::thread::sleep(Duration::from_millis(10));
        }
        found.len()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = marker;
        0
    }
}

/// Logs the handler's stderr line by line, any bytes (invalid UTF-8 shown with replacement
/// characters), each line cut to a bounded length; reads to EOF, so the handler never meets
/// a closed pipe.
pub(crate) fn forward_stderr(stderr: std::process::ChildStderr, job_id: String) {
    let _ = std::thread::Builder::new()
        .name("jm-handler-err".into())
        .spawn(move || {
            let mut lines = LineReader::new(stderr, STDERR_LINE_MAX);
            while let Some(line) = lines.next_line() {
                log::info!("handler[{job_id}]: {}", printable(&line));
            }
        });
}
