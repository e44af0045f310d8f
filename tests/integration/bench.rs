//! A short smoke run of the benchmark harness, so it cannot rot. The figures of a smoke run
//! are not judged (debug build, tiny sizes); the harness must run end to end and report all.

use std::process::Command;

use crate::cli::succeeds;

#[test]
fn the_benchmark_harness_runs_end_to_end_and_reports_every_figure() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    succeeds(
        Command::new(env!("CARGO_BIN_EXE_jobmirror"))
            .args(["bench", "--smoke", "--json"])
            .arg(&json),
    );
    let figures = jobmirror::bench::read_summary(&json).unwrap();
    let names: Vec<String> = figures
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_owned())
        .collect();
    for want in [
        "webhook ingest (durable 2xx)",
        "  baseline: SQLite row commits",
        "  baseline: HTTP 204, no work",
        "ack latency p99",
        "mirror sync",
        "store upserts vs plain INSERTs",
        "pick query median",
        "reaction webhook 2xx -> started p50",
        "reaction webhook 2xx -> started p99",
        "processing (",
        "idle RSS",
        "RSS under ingest load",
        "binary size",
        "start to ready",
    ] {
        assert!(
            names.iter().any(|n| n.starts_with(want)),
            "{want} missing from {names:?}"
        );
    }
    for f in &figures {
        let v = f["value"].as_f64().unwrap();
        assert!(v.is_finite() && v > 0.0, "{f}");
        assert!(f["unit"].as_str().is_some_and(|u| !u.is_empty()));
    }
}

#[test]
fn the_benchmark_refuses_an_unknown_section_before_measuring_anything() {
    let out = Command::new(env!("CARGO_BIN_EXE_jobmirror"))
        .args(["bench", "--smoke", "--only", "sync,ingst"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("\"ingst\"") && stderr.contains("ingest, sync, pick, reaction, processing"),
        "{stderr}"
    );
    // Nothing was started: no figure was printed.
    assert!(!String::from_utf8_lossy(&out.stdout).contains("acks/s"));
}

/// The "shared" section on a real PostgreSQL: three instances against one on SQLite, and a
/// takeover after kill -9, reported (smoke sizes).
#[test]
fn the_shared_section_runs_three_instances_on_postgres_against_one_on_sqlite() {
    let Some(db) = crate::postgres::database() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    succeeds(
        Command::new(env!("CARGO_BIN_EXE_jobmirror"))
            .args([
                "bench",
                "--smoke",
                "--only",
                "shared",
                "--postgres",
                &db.url,
                "--json",
            ])
            .arg(&json)
            .env("PGPASSWORD", crate::postgres::PASSWORD),
    );
    let figures = jobmirror::bench::read_summary(&json).unwrap();
    for want in [
        "reaction, 3 x PostgreSQL p50",
        "reaction, 3 x PostgreSQL p99",
        "batch jobs/s, 3 x PostgreSQL",
        "API requests a job, 3 x PostgreSQL",
        "takeover after kill -9",
    ] {
        let f = figures
            .iter()
            .find(|f| f["name"].as_str().unwrap().starts_with(want))
            .unwrap_or_else(|| panic!("{want} missing"));
        let v = f["value"].as_f64().unwrap();
        assert!(v.is_finite() && v > 0.0, "{f}");
    }
}
