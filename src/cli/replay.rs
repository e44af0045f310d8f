//! The commands that replay and simulate offline: `replay` (a snapshot against the fake, on a
//! simulated clock) and `simulate` (generated histories with faults, checked for invariants).

use std::path::{Path, PathBuf};

use crate::cli::common::{init_logging, say_json};
use crate::config::UsageError;
use crate::store::Store;

/// `jobmirror replay SNAPSHOT`.
pub(super) fn replay(
    db: Option<PathBuf>,
    snapshot: &Path,
    handler: String,
    json: bool,
) -> anyhow::Result<()> {
    init_logging(log::LevelFilter::Error);
    let snap = crate::replay::snapshot::Snapshot::load(snapshot)
        .map_err(|e| UsageError(format!("{e:#}")))?;
    let db = db.unwrap_or_else(|| {
        let stem = snapshot
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("snapshot");
        PathBuf::from(format!("{stem}.replay.db"))
    });
    let mut opts = crate::replay::ReplayOptions::new(db.clone());
    opts.handler = handler;
    let summary = crate::replay::replay(snap, opts)?;
    // Everything into the main file, so copying the .db alone loses nothing.
    Store::connect(&db)?.checkpoint()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print!("{}", summary.render());
        println!(
            "  database: {} (try: sqlite3 -readonly {} \"SELECT * FROM job_events\")",
            db.display(),
            db.display()
        );
    }
    if !summary.violations.is_empty() {
        anyhow::bail!("{} invariants violated", summary.violations.len());
    }
    Ok(())
}

/// `jobmirror simulate`.
pub(super) fn simulate(
    seed: u64,
    seeds: u64,
    write: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<()> {
    init_logging(log::LevelFilter::Error);
    if let Some(path) = write {
        let snap = crate::replay::simulate::generate(seed);
        super::common::write_private(&path, &(serde_json::to_string_pretty(&snap)? + "\n"))?;
        println!("wrote seed {seed} to {}", path.display());
        return Ok(());
    }
    let dir = std::env::temp_dir().join(format!("jobmirror-sim-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut failed = Vec::new();
    let mut total = crate::replay::Summary::default();
    // How many seeds drew each dimension (a seed counts once per dimension it draws).
    let mut drawn: std::collections::BTreeMap<String, u64> = Default::default();
    for s in seed..seed.saturating_add(seeds) {
        for (k, _) in crate::replay::draws::dimensions(&crate::replay::simulate::generate(s)) {
            *drawn.entry(k).or_insert(0) += 1;
        }
        let summary = crate::replay::simulate::run_seed(s, &dir)?;
        total.add(&summary);
        if !summary.violations.is_empty() {
            println!("seed {s}: {}", summary.violations.join("; "));
            println!(
                "  reproduce: {}",
                crate::replay::simulate::reproduce_command(s)
            );
            failed.push(s);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    total.description = Some(format!("{seeds} simulated histories from seed {seed}"));
    if json {
        say_json(
            &serde_json::json!({"seeds": seeds, "failed": failed, "totals": total, "seeds_drawing": drawn}),
        )?;
    } else {
        print!("{}", total.render());
        println!("seeds drawing each dimension:");
        for (k, n) in &drawn {
            println!("  {k}: {n}");
        }
        println!("{} seeds, {} failed", seeds, failed.len());
    }
    if !failed.is_empty() {
        anyhow::bail!("seeds {failed:?} violated invariants");
    }
    Ok(())
}
