//! Handlers: the accounting-system side of processing, behind one protocol.
//!
//! A command handler is a program started once per job with `JOBMIRROR_JOB_ID` and
//! `JOBMIRROR_COMPANY_ID` in its environment. Its stdin gets JSON lines, `{"type":"job",...}`
//! then one `{"type":"item",...}` per item to do, then EOF; it answers one JSON line per item
//! on stdout, in any order. Started with `--check` it answers readiness by its exit status.
//! `outbox:DIR` is the built-in handler: it writes each item to `DIR/<jobId>/<entry>.json`.
//! `dry-run` validates each item as the outbox does and writes nothing (replays, trials).
//!
//! Invariants: a handler runs in its own process group and is killed with the whole group;
//! both its pipes are read to EOF whatever bytes arrive, holding at most a bounded part of one
//! line; its stderr goes to our log line by line; an output line that is not a valid result
//! (not UTF-8, cut, or not a result) is reported as garbage, never guessed at; nothing here
//! touches the database or Pleo.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, bounded};
use serde_json::{Value, json};

use crate::store::ItemResult;

pub use crate::pleo::{ITEM_FAILURE_TYPES, JOB_FAILURE_TYPES};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandlerSpec {
    /// A program and its arguments (split on whitespace; no shell).
    Command { program: String, args: Vec<String> },
    /// The built-in file handler.
    Outbox(PathBuf),
    /// Validates like the outbox, writes nothing, answers at once (replays, trials).
    DryRun,
}

impl HandlerSpec {
    pub fn parse(s: &str) -> Result<HandlerSpec, String> {
        let s = s.trim();
        if s == "dry-run" {
            return Ok(HandlerSpec::DryRun);
        }
        if let Some(dir) = s.strip_prefix("outbox:") {
            if dir.is_empty() {
                return Err(
                    "outbox: needs a directory, e.g. outbox:/var/lib/jobmirror/outbox".into(),
                );
            }
            return Ok(HandlerSpec::Outbox(PathBuf::from(dir)));
        }
        let mut parts = s.split_whitespace().map(str::to_owned);
        let program = parts.next().ok_or("is empty")?;
        Ok(HandlerSpec::Command {
            program,
            args: parts.collect(),
        })
    }
}

/// The answer to a readiness check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    NotReady {
        failure_reason_type: String,
        failure_reason: String,
    },
    /// The service is stopping: the check was ended (its process group killed), no answer.
    Stopped,
}

/// What a running handler tells the pipeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandlerMsg {
    Result(ItemResult),
    /// An output line that is not a result (kept short for the log).
    Garbage(String),
    /// The handler closed its output; [`Running::wait_exit`] gives its exit status.
    Eof,
}

/// A started handler. Dropping it kills the handler and its whole process group.
pub struct Running {
    pub messages: Receiver<HandlerMsg>,
    child: Option<Child>,
    /// Set once the handler was reaped.
    status: Option<std::process::ExitStatus>,
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
fn child_exited(c: &Child) -> bool {
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

fn kill_group(child: &Child) {
    #[cfg(unix)]
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) on our own child's process group; no memory is involved.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
}

/// The most of one stdout line kept (results are far shorter); the rest of a longer line is
/// read and dropped, and the line reported as garbage.
pub const STDOUT_LINE_MAX: usize = 1 << 20;
/// The most of one stderr line kept for the log.
pub const STDERR_LINE_MAX: usize = 8 << 10;

/// One line read from a handler pipe: any bytes, at most `max` of them kept.
#[derive(Debug, PartialEq, Eq)]
pub struct Line {
    pub kept: Vec<u8>,
    /// The line's whole length in bytes (more than `kept.len()` when it was cut).
    pub len: usize,
}

impl Line {
    pub fn cut(&self) -> bool {
        self.len > self.kept.len()
    }
}

/// Reads newline-terminated lines of any bytes, holding at most `max` bytes of one line
/// whatever the writer sends; a last line without a newline is returned at EOF.
pub struct LineReader<R> {
    r: BufReader<R>,
    max: usize,
}

impl<R: std::io::Read> LineReader<R> {
    pub fn new(r: R, max: usize) -> Self {
        LineReader {
            r: BufReader::with_capacity(8 << 10, r),
            max,
        }
    }

    /// The next line without its newline (and a `\r` before it); `None` at EOF or on a read
    /// error.
    pub fn next_line(&mut self) -> Option<Line> {
        let mut kept = Vec::new();
        let mut len = 0usize;
        loop {
            let avail = match self.r.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => &[],
            };
            if avail.is_empty() {
                return (len > 0).then(|| Self::done(kept, len));
            }
            let (chunk, used, found) = match avail.iter().position(|b| *b == b'\n') {
                Some(i) => (&avail[..i], i + 1, true),
                None => (avail, avail.len(), false),
            };
            let room = self.max.saturating_sub(kept.len());
            kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
            len += chunk.len();
            self.r.consume(used);
            if found {
                return Some(Self::done(kept, len));
            }
        }
    }

    fn done(mut kept: Vec<u8>, mut len: usize) -> Line {
        if kept.len() == len && kept.last() == Some(&b'\r') {
            kept.pop();
            len -= 1;
        }
        Line { kept, len }
    }
}

/// A line as text for the log: invalid UTF-8 shown with replacement characters, at most
/// 200 characters, and a note when the line was cut.
fn printable(line: &Line) -> String {
    let text = String::from_utf8_lossy(&line.kept);
    let mut s = short(&text);
    if line.cut() {
        s.push_str(&format!(" [line of {} bytes, cut]", line.len));
    }
    s
}

/// Parses one output line of a handler.
pub fn parse_result(line: &str) -> Option<ItemResult> {
    let v: Value = serde_json::from_str(line).ok()?;
    let entry = v.get("accountingEntryId")?.as_str()?.to_owned();
    let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    match v.get("status")?.as_str()? {
        "successful" => Some(ItemResult {
            accounting_entry_id: entry,
            successful: true,
            external_id: text("externalId"),
            external_url: text("externalUrl"),
            failure_reason: None,
            failure_reason_type: None,
        }),
        "failed" => {
            let given = text("failureReasonType");
            let (kind, reason) = match given {
                Some(t) if ITEM_FAILURE_TYPES.contains(&t.as_str()) => (t, text("failureReason")),
                other => (
                    "unexpected_failure".to_owned(),
                    Some(format!(
                        "{}{}",
                        text("failureReason").unwrap_or_default(),
                        other
                            .map(|t| format!(" (handler said failureReasonType {t:?})"))
                            .unwrap_or_default()
                    )),
                ),
            };
            Some(ItemResult {
                accounting_entry_id: entry,
                successful: false,
                external_id: None,
                external_url: None,
                failure_reason: reason.filter(|r| !r.is_empty()),
                failure_reason_type: Some(kind),
            })
        }
        _ => None,
    }
}

fn short(s: &str) -> String {
    s.chars().take(200).collect()
}

/// What one stdout line tells the pipeline: a result, garbage (not UTF-8, cut, or not a
/// result; logged and ignored), or nothing (a blank line).
pub fn output_message(line: &Line) -> Option<HandlerMsg> {
    let text = match std::str::from_utf8(&line.kept) {
        Ok(t) if !line.cut() => t,
        Ok(_) => return Some(HandlerMsg::Garbage(printable(line))),
        Err(_) => {
            return Some(HandlerMsg::Garbage(format!(
                "not UTF-8: {}",
                printable(line)
            )));
        }
    };
    if text.trim().is_empty() {
        return None;
    }
    Some(match parse_result(text) {
        Some(r) => HandlerMsg::Result(r),
        None => HandlerMsg::Garbage(short(text)),
    })
}

impl HandlerSpec {
    /// Asks the handler whether the accounting system is ready, within `timeout`. Once
    /// `stopping` says so, the check is ended (its process group killed): `Stopped`.
    pub fn check(&self, job: &Value, timeout: Duration, stopping: &dyn Fn() -> bool) -> Readiness {
        match self {
            HandlerSpec::DryRun => Readiness::Ready,
            HandlerSpec::Outbox(dir) => {
                match std::fs::create_dir_all(dir).and_then(|_| probe_writable(dir)) {
                    Ok(()) => Readiness::Ready,
                    Err(e) => Readiness::NotReady {
                        failure_reason_type: "invalid_configuration".into(),
                        failure_reason: format!(
                            "outbox directory {} is not writable: {e}",
                            dir.display()
                        ),
                    },
                }
            }
            HandlerSpec::Command { program, args } => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg("--check");
                set_env(&mut cmd, job);
                cmd.stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                own_group(&mut cmd);
                let mut child = match cmd.spawn() {
                    Ok(c) => c,
                    Err(e) => {
                        return Readiness::NotReady {
                            failure_reason_type: "integration_unusable".into(),
                            failure_reason: format!("cannot start the handler {program}: {e}"),
                        };
                    }
                };
                let stdout = child.stdout.take();
                let stderr = child.stderr.take();
                let job_id = job["id"].as_str().unwrap_or("").to_owned();
                if let Some(e) = stderr {
                    forward_stderr(e, job_id.clone());
                }
                let (tx, rx) = bounded(1);
                std::thread::spawn(move || {
                    let mut last = None;
                    if let Some(out) = stdout {
                        let mut lines = LineReader::new(out, STDOUT_LINE_MAX);
                        while let Some(line) = lines.next_line() {
                            let text = String::from_utf8_lossy(&line.kept);
                            if !text.trim().is_empty() {
                                last = Some(text.into_owned());
                            }
                        }
                    }
                    let _ = tx.send(last);
                });
                let t0 = std::time::Instant::now();
                // The check has answered once its stdout closed, or once it exited (a child
                // it left may hold stdout open: the group is killed, and what it wrote read).
                let mut group_killed = false;
                let last = loop {
                    match rx.recv_timeout(Duration::from_millis(20)) {
                        Ok(l) => break l,
                        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break None,
                        Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                    }
                    let stop = stopping();
                    if stop || t0.elapsed() >= timeout {
                        kill_group(&child);
                        let _ = child.kill();
                        let _ = child.wait();
                        if stop {
                            return Readiness::Stopped;
                        }
                        return Readiness::NotReady {
                            failure_reason_type: "accounting_system_timeout".into(),
                            failure_reason: format!(
                                "the handler's readiness check did not answer within {} s",
                                timeout.as_secs()
                            ),
                        };
                    }
                    if !group_killed && child_exited(&child) {
                        group_killed = true;
                        kill_group(&child);
                    }
                };
                kill_group(&child);
                let status = child.wait();
                match status {
                    Ok(s) if s.success() => Readiness::Ready,
                    other => {
                        let said: Option<Value> =
                            last.as_deref().and_then(|l| serde_json::from_str(l).ok());
                        let given = said
                            .as_ref()
                            .and_then(|v| v["failureReasonType"].as_str())
                            .map(str::to_owned);
                        let reason = said
                            .as_ref()
                            .and_then(|v| v["failureReason"].as_str())
                            .map(str::to_owned)
                            .unwrap_or_else(|| {
                                format!(
                                    "the handler's readiness check failed ({})",
                                    describe_status(&other)
                                )
                            });
                        let failure_reason_type = match given {
                            Some(t) if JOB_FAILURE_TYPES.contains(&t.as_str()) => t,
                            _ => "accounting_system_unreachable".into(),
                        };
                        Readiness::NotReady {
                            failure_reason_type,
                            failure_reason: reason,
                        }
                    }
                }
            }
        }
    }

    /// Starts the handler for `job` with `items` (export items) to do.
    pub fn start(&self, job: &Value, items: Vec<Value>) -> std::io::Result<Running> {
        self.start_marked(job, items, None)
    }

    /// As [`HandlerSpec::start`]; with a `marker` (see [`handler_marker`]), every process
    /// still carrying that marker (a handler of the same job left by a killed service, and its
    /// children) is killed first, and the new handler carries it.
    pub fn start_marked(
        &self,
        job: &Value,
        items: Vec<Value>,
        marker: Option<&str>,
    ) -> std::io::Result<Running> {
        let (tx, rx) = bounded::<HandlerMsg>(4096);
        match self {
            HandlerSpec::DryRun => {
                let job_id = job["id"].as_str().unwrap_or("").to_owned();
                in_process("jm-dry-run", tx, rx, move |emit| {
                    for item in &items {
                        let result = match validate_item(&job_id, item) {
                            (_, Some(refused)) => refused,
                            (entry, None) => ItemResult {
                                external_id: Some(format!("dry-run/{job_id}/{entry}")),
                                external_url: None,
                                accounting_entry_id: entry,
                                successful: true,
                                failure_reason: None,
                                failure_reason_type: None,
                            },
                        };
                        if !emit(result) {
                            return;
                        }
                    }
                })
            }
            HandlerSpec::Outbox(dir) => {
                let dir = dir.clone();
                let job_id = job["id"].as_str().unwrap_or("").to_owned();
                in_process("jm-outbox", tx, rx, move |emit| {
                    // Files are written in batches: every temp file of a batch is made
                    // durable with one sync, then renamed into place, then the renames are
                    // made durable; only then are the batch's results reported.
                    for chunk in items.chunks(64) {
                        let mut results = Vec::with_capacity(chunk.len());
                        let mut staged = Vec::new();
                        for item in chunk {
                            match outbox_stage(&dir, &job_id, item) {
                                Staged::Written(tmp, path, ok) => staged.push((tmp, path, ok)),
                                Staged::Refused(failed) => results.push(failed),
                            }
                        }
                        let job_dir = dir.join(&job_id);
                        if staged.is_empty() {
                            // Every item of the chunk was refused: nothing was written, so
                            // there is nothing to sync (the job's folder may not exist).
                            for r in results {
                                if !emit(r) {
                                    return;
                                }
                            }
                            continue;
                        }
                        let synced = sync_filesystem(&job_dir);
                        for (tmp, path, ok) in staged {
                            let done = synced
                                .as_ref()
                                .map_err(|e| std::io::Error::new(e.kind(), e.to_string()))
                                .and_then(|_| std::fs::rename(&tmp, &path));
                            results.push(match done {
                                Ok(()) => ok,
                                Err(e) => outbox_failure(
                                    &ok.accounting_entry_id,
                                    format!("cannot write {}: {e}", path.display()),
                                ),
                            });
                        }
                        if let Err(e) = sync_filesystem(&job_dir) {
                            log::error!("outbox: cannot sync {}: {e}", job_dir.display());
                            for r in results.iter_mut().filter(|r| r.successful) {
                                *r = outbox_failure(
                                    &r.accounting_entry_id,
                                    format!("cannot sync {}: {e}", job_dir.display()),
                                );
                            }
                        }
                        for r in results {
                            if !emit(r) {
                                return;
                            }
                        }
                    }
                })
            }
            HandlerSpec::Command { program, args } => {
                let mut cmd = Command::new(program);
                cmd.args(args);
                set_env(&mut cmd, job);
                if let Some(m) = marker {
                    let n = stop_earlier_handlers(m);
                    if n > 0 {
                        log::warn!(
                            "job {}: killed {n} processes of an earlier handler run still alive",
                            job["id"].as_str().unwrap_or("")
                        );
                    }
                    cmd.env(MARKER_VAR, m);
                }
                cmd.stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                own_group(&mut cmd);
                let mut child = cmd.spawn()?;
                let stdin = child.stdin.take();
                let stdout = child.stdout.take();
                if let Some(e) = child.stderr.take() {
                    forward_stderr(e, job["id"].as_str().unwrap_or("").to_owned());
                }
                let job_line = json!({"type": "job", "job": job}).to_string();
                std::thread::Builder::new()
                    .name("jm-handler-in".into())
                    .spawn(move || {
                        let Some(mut stdin) = stdin else { return };
                        let mut w = std::io::BufWriter::new(&mut stdin);
                        // A handler that exits early closes the pipe: stop writing, quietly.
                        let _ = writeln!(w, "{job_line}").and_then(|_| {
                            for item in &items {
                                writeln!(w, "{}", json!({"type": "item", "item": item}))?;
                            }
                            w.flush()
                        });
                    })?;
                std::thread::Builder::new()
                    .name("jm-handler-out".into())
                    .spawn(move || {
                        if let Some(out) = stdout {
                            let mut lines = LineReader::new(out, STDOUT_LINE_MAX);
                            while let Some(line) = lines.next_line() {
                                let Some(msg) = output_message(&line) else {
                                    continue;
                                };
                                if tx.send(msg).is_err() {
                                    return;
                                }
                            }
                        }
                        let _ = tx.send(HandlerMsg::Eof);
                    })?;
                Ok(Running {
                    messages: rx,
                    child: Some(child),
                    status: None,
                })
            }
        }
    }
}

/// Runs an in-process handler (`dry-run`, `outbox:`) on a thread of its own: `work` hands
/// each result to `emit` (false once nobody listens any more); the end of its output follows.
fn in_process(
    name: &str,
    tx: Sender<HandlerMsg>,
    rx: Receiver<HandlerMsg>,
    work: impl FnOnce(&dyn Fn(ItemResult) -> bool) + Send + 'static,
) -> std::io::Result<Running> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            work(&|r| tx.send(HandlerMsg::Result(r)).is_ok());
            let _ = tx.send(HandlerMsg::Eof);
        })?;
    Ok(Running {
        messages: rx,
        child: None,
        status: None,
    })
}

fn describe_status(s: &std::io::Result<std::process::ExitStatus>) -> String {
    match s {
        Ok(s) => match s.code() {
            Some(c) => format!("exit status {c}"),
            None => "killed by a signal".into(),
        },
        Err(e) => e.to_string(),
    }
}

fn set_env(cmd: &mut Command, job: &Value) {
    cmd.env("JOBMIRROR_JOB_ID", job["id"].as_str().unwrap_or(""));
    cmd.env(
        "JOBMIRROR_COMPANY_ID",
        job["companyId"].as_str().unwrap_or(""),
    );
    // The handler gets no Pleo credential: it never talks to Pleo.
    cmd.env_remove("JOBMIRROR_PLEO_API_KEY");
    cmd.env_remove("JOBMIRROR_WEBHOOK_SECRET");
}

fn own_group(cmd: &mut Command) {
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

/// The marker of `job_id`'s handler runs for the service on `db`.
pub fn handler_marker(db: &std::path::Path, job_id: &str) -> String {
    let db = std::fs::canonicalize(db).unwrap_or_else(|_| db.to_path_buf());
    format!("{job_id} {}", db.display())
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
fn forward_stderr(stderr: std::process::ChildStderr, job_id: String) {
    let _ = std::thread::Builder::new()
        .name("jm-handler-err".into())
        .spawn(move || {
            let mut lines = LineReader::new(stderr, STDERR_LINE_MAX);
            while let Some(line) = lines.next_line() {
                log::info!("handler[{job_id}]: {}", printable(&line));
            }
        });
}

fn probe_writable(dir: &Path) -> std::io::Result<()> {
    let p = dir.join(".jobmirror-probe");
    std::fs::write(&p, b"")?;
    std::fs::remove_file(p)
}

fn outbox_failure(entry: &str, reason: String) -> ItemResult {
    ItemResult {
        accounting_entry_id: entry.to_owned(),
        successful: false,
        external_id: None,
        external_url: None,
        failure_reason: Some(reason),
        failure_reason_type: Some("unexpected_failure".to_owned()),
    }
}

/// Makes everything written under `dir` durable (one `syncfs` on Linux).
fn sync_filesystem(dir: &Path) -> std::io::Result<()> {
    let f = std::fs::File::open(dir)?;
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: syncfs on a file descriptor we own for the duration of the call.
        if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        f.sync_all()
    }
}

/// One item of the outbox: written to a temp file beside its final name, or refused.
enum Staged {
    /// Temp path, final path, and the result once renamed.
    Written(PathBuf, PathBuf, ItemResult),
    Refused(ItemResult),
}

/// What the built-in handlers check of an item before exporting it: a safe entry id and an
/// account on every accounting line. Returns the entry id and, if refused, the failed result.
fn validate_item(job_id: &str, item: &Value) -> (String, Option<ItemResult>) {
    let entry = item["accountingEntryId"].as_str().unwrap_or("").to_owned();
    let fail = |kind: &str, reason: String| ItemResult {
        accounting_entry_id: entry.clone(),
        successful: false,
        external_id: None,
        external_url: None,
        failure_reason: Some(reason),
        failure_reason_type: Some(kind.to_owned()),
    };
    let safe = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if !safe(&entry) || !safe(job_id) {
        return (
            entry.clone(),
            Some(fail(
                "validation_failure",
                "accountingEntryId or job id is not a safe file name".into(),
            )),
        );
    }
    // An import file needs an account on every line.
    let lines = item["accountingEntryLines"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if lines.is_empty() {
        return (
            entry.clone(),
            Some(fail(
                "validation_failure",
                "the entry has no accounting lines".into(),
            )),
        );
    }
    if let Some(i) = lines
        .iter()
        .position(|l| l.get("account").is_none_or(Value::is_null))
    {
        return (
            entry.clone(),
            Some(fail(
                "account_unknown",
                format!("accounting line {} has no account", i + 1),
            )),
        );
    }
    (entry, None)
}

/// The outbox handler's work for one item: validate, then write it to a temp file.
fn outbox_stage(dir: &Path, job_id: &str, item: &Value) -> Staged {
    let (entry, refused) = validate_item(job_id, item);
    if let Some(refused) = refused {
        return Staged::Refused(refused);
    }
    let job_dir = dir.join(job_id);
    let path = job_dir.join(format!("{entry}.json"));
    let tmp = job_dir.join(format!(".{entry}.json.tmp"));
    let written = std::fs::create_dir_all(&job_dir).and_then(|_| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(
            serde_json::to_string_pretty(item)
                .unwrap_or_default()
                .as_bytes(),
        )
    });
    match written {
        Ok(()) => Staged::Written(
            tmp,
            path.clone(),
            ItemResult {
                accounting_entry_id: entry.clone(),
                successful: true,
                external_id: Some(format!("{job_id}/{entry}.json")),
                external_url: Some(format!("file://{}", path.display())),
                failure_reason: None,
                failure_reason_type: None,
            },
        ),
        Err(e) => Staged::Refused(outbox_failure(
            &entry,
            format!("cannot write {}: {e}", path.display()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines() {
        let ok = parse_result(r#"{"accountingEntryId":"e1","status":"successful","externalId":"X","externalUrl":"https://erp/X"}"#).unwrap();
        assert!(ok.successful);
        assert_eq!(ok.external_id.as_deref(), Some("X"));
        let bad = parse_result(r#"{"accountingEntryId":"e2","status":"failed","failureReasonType":"vendor_unknown","failureReason":"no vendor"}"#).unwrap();
        assert_eq!(bad.failure_reason_type.as_deref(), Some("vendor_unknown"));
        let odd = parse_result(
            r#"{"accountingEntryId":"e3","status":"failed","failureReasonType":"nope"}"#,
        )
        .unwrap();
        assert_eq!(
            odd.failure_reason_type.as_deref(),
            Some("unexpected_failure")
        );
        assert!(odd.failure_reason.unwrap().contains("nope"));
        for garbage in [
            "",
            "hello",
            "{}",
            r#"{"accountingEntryId":"e","status":"maybe"}"#,
            r#"{"status":"successful"}"#,
            "[1]",
        ] {
            assert!(parse_result(garbage).is_none(), "{garbage}");
        }
    }

    fn read_all(bytes: &[u8], max: usize) -> Vec<Line> {
        let mut r = LineReader::new(bytes, max);
        std::iter::from_fn(|| r.next_line()).collect()
    }

    #[test]
    fn lines_of_any_bytes_are_read_to_the_end_and_bounded() {
        let mut input = b"caf\xe9\r\n".to_vec();
        input.extend(vec![b'x'; 100_000]);
        input.extend(b"\n\n{\"accountingEntryId\":\"e\",\"status\":\"successful\"}\nlast");
        let lines = read_all(&input, 1000);
        assert_eq!(lines.len(), 5, "{lines:?}");
        assert_eq!(
            lines[0],
            Line {
                kept: b"caf\xe9".to_vec(),
                len: 4
            }
        );
        assert_eq!((lines[1].kept.len(), lines[1].len), (1000, 100_000));
        assert!(lines[1].cut());
        assert_eq!(
            lines[2],
            Line {
                kept: vec![],
                len: 0
            }
        );
        assert!(lines[3].kept.starts_with(b"{"));
        assert_eq!(
            lines[4],
            Line {
                kept: b"last".to_vec(),
                len: 4
            }
        );
        // What the pipeline is told of each.
        let msgs: Vec<Option<HandlerMsg>> = lines.iter().map(output_message).collect();
        assert!(
            matches!(&msgs[0], Some(HandlerMsg::Garbage(g)) if g.starts_with("not UTF-8: caf\u{fffd}")),
            "{msgs:?}"
        );
        assert!(
            matches!(&msgs[1], Some(HandlerMsg::Garbage(g)) if g.ends_with("[line of 100000 bytes, cut]")),
            "{msgs:?}"
        );
        assert!(msgs[2].is_none(), "a blank line says nothing");
        assert!(matches!(&msgs[3], Some(HandlerMsg::Result(r)) if r.accounting_entry_id == "e"));
        assert!(
            output_message(&Line {
                kept: b"  ".to_vec(),
                len: 2
            })
            .is_none()
        );
    }

    #[test]
    fn handler_spec_forms() {
        assert_eq!(
            HandlerSpec::parse("outbox:/tmp/x").unwrap(),
            HandlerSpec::Outbox("/tmp/x".into())
        );
        assert_eq!(
            HandlerSpec::parse("/usr/bin/erp-push --fast").unwrap(),
            HandlerSpec::Command {
                program: "/usr/bin/erp-push".into(),
                args: vec!["--fast".into()]
            }
        );
        assert!(HandlerSpec::parse("  ").is_err());
        assert!(HandlerSpec::parse("outbox:").is_err());
        assert_eq!(
            HandlerSpec::parse(" dry-run ").unwrap(),
            HandlerSpec::DryRun
        );
    }
}
