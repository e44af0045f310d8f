//! `jobmirror bench`: figures against the limits of the machine, each with a baseline measured
//! in the same run, printed with units and written as JSON. `--smoke` runs tiny sizes (a test
//! runs it so the harness cannot rot); the full run is `cargo run --release -- bench`.
//!
//! The service under test is the real binary (`jobmirror run`, started as a child process);
//! the fake Pleo, the webhook senders and the baselines run in this process, over loopback.

mod harness;
mod ingest;
mod jobs;
mod operators;
pub mod scale;
mod shared;
mod store;

use harness::{Ctx, fig};
pub use harness::{Figure, Sizes};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Value, json};

use crate::clock::{Clock, SharedClock, SystemClock};
use crate::edge::webhook::Secrets;

/// The sections `--only` can name (ingest, with the footprint, always runs).
pub const SECTIONS: [&str; 7] = [
    "sync",
    "pick",
    "reaction",
    "processing",
    "operators",
    "scale",
    "shared",
];

/// `postgres`: a PostgreSQL server (a URL whose user may create databases) for the "shared"
/// section; without it that section is skipped (named in `--only`, it is an error).
pub fn run(
    smoke: bool,
    json_out: Option<PathBuf>,
    only: &[String],
    postgres: Option<&str>,
) -> anyhow::Result<()> {
    if let Some(bad) = only
        .iter()
        .find(|s| !SECTIONS.contains(&s.as_str()) && *s != "ingest")
    {
        anyhow::bail!(
            "--only {bad:?}: the sections are ingest, {}",
            SECTIONS.join(", ")
        );
    }
    let want = |s: &str| only.is_empty() || only.iter().any(|o| o == s);
    if postgres.is_none() && only.iter().any(|o| o == "shared") {
        anyhow::bail!(
            "--only shared needs --postgres URL (a server whose user may create databases)"
        );
    }
    crate::logging::init(log::LevelFilter::Error, crate::logging::LogFormat::Text);
    let sizes = if smoke { Sizes::smoke() } else { Sizes::full() };
    let exe = std::env::current_exe()?;
    let dir = std::env::temp_dir().join(format!(
        "jobmirror-bench-{}-{}",
        std::process::id(),
        SystemClock.now().0
    ));
    std::fs::create_dir_all(&dir)?;
    println!(
        "jobmirror bench ({}), {} cores, work dir {}",
        if smoke { "smoke" } else { "full" },
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        dir.display()
    );
    let mut figures = Vec::new();
    let clock: SharedClock = Arc::new(SystemClock);
    let secrets = Secrets::parse(harness::SECRET).map_err(anyhow::Error::msg)?;
    let cx = Ctx {
        exe,
        dir,
        clock,
        sizes,
        secrets,
    };
    let (exe, dir) = (&cx.exe, &cx.dir);

    let fp = ingest::ingest(&cx, &mut figures)?;
    if want("sync") {
        store::sync(&cx, &mut figures)?;
    }
    if want("pick") {
        store::pick(&cx, &mut figures)?;
    }
    if want("reaction") {
        jobs::reaction(&cx, &mut figures)?;
    }
    if want("processing") {
        jobs::processing(&cx, &mut figures)?;
    }
    if want("operators") {
        operators::operators(&cx, &mut figures)?;
    }
    if want("scale") {
        scale::scale(&cx, &mut figures)?;
    }
    if let Some(url) = postgres.filter(|_| want("shared")) {
        shared::shared(&cx, url, &mut figures)?;
    }

    // --- 6: footprint ----------------------------------------------------------------------------
    let binary = std::fs::metadata(exe).map(|m| m.len()).unwrap_or(0) as f64 / 1_048_576.0;
    figures.push(fig(
        "idle RSS",
        fp.idle_rss_kib as f64 / 1024.0,
        "MiB",
        None,
        "<= 15 MiB",
        fp.idle_rss_kib as f64 / 1024.0 <= 15.0,
    ));
    let peak = fp.peak_rss_kib as f64 / 1024.0;
    figures.push(fig(
        "RSS under ingest load",
        peak,
        "MiB",
        None,
        "<= 50 MiB",
        peak <= 50.0,
    ));
    figures.push(fig(
        "binary size (this build)",
        binary,
        "MiB",
        None,
        "<= 10 MiB stripped release",
        binary <= 10.0,
    ));
    let ready_ms = fp.ready.as_secs_f64() * 1000.0;
    figures.push(fig(
        "start to ready (recovery pass done)",
        ready_ms,
        "ms",
        None,
        "<= 100 ms",
        ready_ms <= 100.0,
    ));

    let summary = json!({
        "mode": if smoke { "smoke" } else { "full" },
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "figures": figures,
    });
    let out = json_out.unwrap_or_else(|| dir.join("bench.json"));
    std::fs::write(&out, serde_json::to_string_pretty(&summary)? + "\n")?;
    println!("summary written to {}", out.display());
    let _ = std::fs::remove_dir_all(dir.join("outbox4"));
    Ok(())
}

/// For tests: the figures in a summary file.
pub fn read_summary(path: &Path) -> anyhow::Result<Vec<Value>> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    Ok(v["figures"].as_array().cloned().unwrap_or_default())
}
