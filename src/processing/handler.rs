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
//! touches the database or Pleo. The process work is in [`crate::processing::child`], the
//! output reading in [`crate::processing::output`], the outbox's files in
//! [`crate::processing::outbox`]; this file is the protocol that joins them.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, bounded};
use serde_json::{Value, json};

use crate::processing::child::{
    child_exited, describe_status, forward_stderr, kill_group, own_group, set_env,
};
use crate::processing::outbox::{self, probe_writable};
use crate::store::ItemResult;

pub use crate::pleo::{ITEM_FAILURE_TYPES, JOB_FAILURE_TYPES};
pub use crate::processing::child::{
    MARKER_VAR, Running, handler_marker, process_running, stop_earlier_handlers,
};
pub use crate::processing::output::{
    HandlerMsg, Line, LineReader, STDERR_LINE_MAX, STDOUT_LINE_MAX, output_message, parse_result,
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandlerSpec {
    /// A program and its arguments (split on whitespace; no shell), and the operator's own
    /// environment for it (`handler_env`), beside the allowlist every handler gets.
    Command {
        program: String,
        args: Vec<String>,
        env: Vec<(String, String)>,
    },
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
            env: Vec::new(),
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
            HandlerSpec::Command { program, args, env } => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg("--check");
                set_env(&mut cmd, job, env);
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
                    outbox::dry_run_items(&job_id, &items, emit)
                })
            }
            HandlerSpec::Outbox(dir) => {
                let dir = dir.clone();
                let job_id = job["id"].as_str().unwrap_or("").to_owned();
                in_process("jm-outbox", tx, rx, move |emit| {
                    outbox::write_items(&dir, &job_id, &items, emit)
                })
            }
            HandlerSpec::Command { program, args, env } => {
                let mut cmd = Command::new(program);
                cmd.args(args);
                set_env(&mut cmd, job, env);
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

#[cfg(test)]
mod tests {
    use super::*;

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
                args: vec!["--fast".into()],
                env: Vec::new(),
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
