//! The built-in `outbox:DIR` handler's file work and the item checks it shares with `dry-run`:
//! each item written to a temp file beside its final name, the batch made durable with one
//! `syncfs`, then renamed.
//!
//! Invariant: an item is reported successful only once its file is durable under its final
//! name; an item with an unsafe id or a line without an account is refused, never written.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::store::ItemResult;

/// The `dry-run` handler's work: each item validated as the outbox would, nothing written.
/// `emit` hands one result on (false once nobody listens any more).
pub(crate) fn dry_run_items(job_id: &str, items: &[Value], emit: &dyn Fn(ItemResult) -> bool) {
    for item in items {
        let result = match validate_item(job_id, item) {
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
}

/// The `outbox:` handler's work: files are written in batches; every temp file of a batch is
/// made durable with one sync, then renamed into place, then the renames are made durable;
/// only then are the batch's results handed to `emit`.
pub(crate) fn write_items(
    dir: &Path,
    job_id: &str,
    items: &[Value],
    emit: &dyn Fn(ItemResult) -> bool,
) {
    // Files are written in batches: every temp file of a batch is made
    // durable with one sync, then renamed into place, then the renames are
    // made durable; only then are the batch's results reported.
    for chunk in items.chunks(64) {
        let mut results = Vec::with_capacity(chunk.len());
        let mut staged = Vec::new();
        for item in chunk {
            match outbox_stage(dir, job_id, item) {
                Staged::Written(tmp, path, ok) => staged.push((tmp, path, ok)),
                Staged::Refused(failed) => results.push(failed),
            }
        }
        let job_dir = dir.join(job_id);
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
}

///
/// Each probe has a name of its own: lanes check at once, and a shared name let one lane's
/// clean-up remove the file another had just written (its check then failed, ENOENT).
pub(crate) fn probe_writable(dir: &Path) -> std::io::Result<()> {
    static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let p = dir.join(format!(".jobmirror-probe-{}-{n}", std::process::id()));
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
