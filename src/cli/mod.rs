//! The command line: parses arguments, sets up logging, and maps results to exit codes.
//!
//! Exit codes (documented in the README): 0 success; 1 runtime failure; 2 usage or
//! configuration error (so systemd's `RestartPreventExitStatus=2` stops a restart loop).
//!
//! Files: `args` is the grammar (every command and option), this one dispatches and runs the
//! service and operator commands, `pleo` the commands that talk to Pleo (or stand in for it),
//! `replay` the offline ones, and `common` what they share.

mod args;
mod common;
mod companies;
mod pleo;
mod replay;
mod shared;

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

use crate::cli::common::{
    CONFIG_IN_USE, config_file, db_path, emit, existing_db, init_logging, open_report,
    operator_config, operator_settings, report_time, say_json, signal_usr1,
};
use crate::clock::{SharedClock, SystemClock};
use crate::config::{Config, ConfigError};
use crate::store::Store;

pub use crate::cli::args::{Cli, Command, RecordArgs, ReportArgs, SubscriptionsAction, VERSION};
pub use crate::config::UsageError;

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    // A report read through `head` or a closed pager ends quietly, as every Unix tool does:
    // the default SIGPIPE action for the commands that only print. The service and the
    // commands that run handlers or serve sockets keep Rust's ignored SIGPIPE (a closed pipe
    // there is an error to handle, not a reason to die).
    if !matches!(
        cli.command,
        Command::Run
            | Command::Demo
            | Command::FakePleo { .. }
            | Command::Replay { .. }
            | Command::Simulate { .. }
            | Command::Bench { .. }
    ) {
        // SAFETY: no other thread exists yet; SIG_DFL is a valid disposition for SIGPIPE.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    if let Some(db) = &cli.db {
        // SAFETY: no other thread exists yet; every loader reads the database path from here.
        unsafe { std::env::set_var("JOBMIRROR_DB", db) };
    }
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let usage = e.downcast_ref::<ConfigError>().is_some()
                || e.downcast_ref::<UsageError>().is_some();
            eprintln!("jobmirror: {}", chain(&e));
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}

/// The error with its causes, one line.
fn chain(e: &anyhow::Error) -> String {
    let mut s = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
    }
    s
}

fn dispatch(mut cli: Cli) -> anyhow::Result<()> {
    let clock: SharedClock = Arc::new(SystemClock);
    // Every command that reads a configuration finds the one the service uses: --config,
    // JOBMIRROR_CONFIG, or the default path the shipped unit names.
    let offline = matches!(
        cli.command,
        Command::Demo
            | Command::Replay { .. }
            | Command::Simulate { .. }
            | Command::Bench { .. }
            | Command::FakePleo { .. }
    );
    if !offline {
        cli.config = config_file(cli.config.take())?;
        let _ = CONFIG_IN_USE.set(cli.config.clone());
    }
    match cli.command {
        Command::Instances { json } => shared::instances(cli.config.as_deref(), json),
        Command::Run => {
            let cfg = Config::load(cli.config.as_deref())?;
            crate::logging::init(cfg.log, cfg.log_format);
            crate::service::systemd::run(cfg, cli.config.as_deref(), clock)
        }
        Command::Migrate { json } => {
            if let Some(target) = shared::pg_target(cli.config.as_deref())? {
                return shared::migrate(&target, json);
            }
            let db = db_path(cli.config.as_deref())?;
            init_logging(log::LevelFilter::Info);
            let mut store = Store::connect(&db)?;
            let applied = store.migrate()?;
            if json {
                say_json(&serde_json::json!({"db": db, "applied": applied}))?;
            } else {
                for name in &applied {
                    println!("applied {name}");
                }
                println!("database {} is at the current schema", db.display());
            }
            Ok(())
        }
        Command::CheckConfig { json } => {
            let (mut cfg, settings) = crate::config::effective(cli.config.as_deref())?;
            // The companies `run` serves: the configuration's and the database's.
            if (cfg.db.exists() || crate::config::SharedDb::is_postgres(&cfg.db))
                && let Ok(rows) = shared::open_db(&cfg.db, crate::service::shared::Open::ReadOnly)
                    .and_then(|s| Ok(s.company_rows()?))
            {
                cfg = cfg.with_companies(&rows);
            }
            let warnings = cfg.warnings();
            for w in &warnings {
                eprintln!("warning: {w}");
            }
            if json {
                let map: serde_json::Map<String, serde_json::Value> = settings
                    .iter()
                    .map(|s| {
                        (
                            s.key.to_owned(),
                            serde_json::json!({"value": s.value, "from": s.from}),
                        )
                    })
                    .collect();
                say_json(&serde_json::json!({
                    "valid": true, "settings": map, "warnings": warnings,
                    "config_file": cli.config, "db": cfg.db, "db_exists": cfg.db.exists(),
                }))?;
            } else {
                for s in &settings {
                    println!("{:<34} {:<10} {}", s.key, s.from, s.value);
                }
                println!(
                    "configuration valid: {} companies, database {}{}, file {}",
                    cfg.company_ids.len(),
                    cfg.db.display(),
                    if cfg.db.exists() {
                        ""
                    } else {
                        " (does not exist yet: `run` or `migrate` creates it)"
                    },
                    cli.config
                        .as_deref()
                        .map_or("none (embedded defaults)".into(), |p| p
                            .display()
                            .to_string())
                );
            }
            Ok(())
        }
        Command::Status { report } => {
            let (store, _, now) = open_report(cli.config.as_deref(), &report, &clock)?;
            let mut v = crate::ops::status(&store, now)?;
            let lease_ms = shared::lease_secs(cli.config.as_deref())? * 1000;
            crate::ops::shared::add_to_status(&store, &mut v, lease_ms)?;
            emit(&report, &v, crate::ops::status_text)
        }
        Command::Jobs {
            company,
            state,
            limit,
            report,
        } => {
            let (store, _, now) = open_report(cli.config.as_deref(), &report, &clock)?;
            let v = crate::ops::jobs(&store, now, company.as_deref(), state.as_deref(), limit)?;
            emit(&report, &v, crate::ops::jobs_text)
        }
        Command::Show { job, report } => {
            let (store, _, now) = open_report(cli.config.as_deref(), &report, &clock)?;
            emit(
                &report,
                &crate::ops::show(&store, now, &job)?,
                crate::ops::show_text,
            )
        }
        Command::Why { job, report } => {
            let (store, _, now) = open_report(cli.config.as_deref(), &report, &clock)?;
            let settings = operator_settings(cli.config.as_deref())?;
            let v = crate::ops::why::why(&store, now, &job, &settings)?;
            emit(&report, &v, crate::ops::why::why_text)
        }
        Command::Doctor {
            before_start,
            report,
        } => {
            let (store, db, now) = open_report(cli.config.as_deref(), &report, &clock)?;
            let mut settings = operator_settings(cli.config.as_deref())?;
            settings.before_start = before_start;
            let v = crate::ops::doctor::doctor(&store, &db, now, &settings)?;
            emit(&report, &v, crate::ops::doctor::doctor_text)?;
            if v["result"] == "fail" {
                anyhow::bail!("doctor found problems");
            }
            Ok(())
        }
        Command::Backup { file, json } => {
            let db = existing_db(cli.config.as_deref())?;
            let store = shared::open_db(&db, crate::service::shared::Open::ReadOnly)?;
            let v = crate::ops::backup(&store, &file)?;
            let args = ReportArgs { json, at: None };
            emit(&args, &v, crate::ops::backup_text)
        }
        Command::Prune { dry_run, json, at } => {
            let db = existing_db(cli.config.as_deref())?;
            let cfg = operator_config(cli.config.as_deref())?.0;
            let args = ReportArgs { json, at };
            let now = report_time(&args, &clock)?;
            let store = shared::open_db(&db, crate::service::shared::Open::Connect)?;
            let r = store.prune(now, clock.now(), cfg.retention, dry_run)?;
            emit(&args, &serde_json::to_value(&r)?, crate::ops::prune_text)
        }
        Command::FakePleo {
            listen,
            fixture,
            expires_in,
            api_key,
        } => pleo::fake_pleo(&listen, fixture.as_deref(), expires_in, api_key, clock),
        Command::Subscribe {
            url,
            secret_file: _,
            company,
            all,
            event_types,
            json,
        } if company.is_some() || all => crate::cli::companies::subscribe(
            cli.config.as_deref(),
            &url,
            company.as_deref(),
            &event_types,
            json,
            clock,
        ),
        Command::Subscribe {
            url,
            secret_file,
            event_types,
            json,
            ..
        } => pleo::subscribe(
            cli.config.as_deref(),
            &url,
            secret_file,
            &event_types,
            json,
            clock,
        ),
        Command::Companies { action } => companies::run(cli.config.as_deref(), action, clock),
        Command::Subscriptions { action } => {
            pleo::subscriptions(cli.config.as_deref(), action, clock)
        }
        Command::Trigger { json } => {
            let db = existing_db(cli.config.as_deref())?;
            let pids = shared::open_db(&db, crate::service::shared::Open::ReadOnly)?.instances()?;
            for pid in &pids {
                if signal_usr1(*pid) {
                    if json {
                        say_json(&serde_json::json!({"signalled_pid": pid}))?;
                    } else {
                        println!("asked jobmirror (pid {pid}) to run detection now");
                    }
                    return Ok(());
                }
            }
            anyhow::bail!(
                "no running jobmirror is recorded in {} (tried {:?}); with systemd: systemctl kill -s USR1 jobmirror",
                db.display(),
                pids
            )
        }
        Command::Replay {
            snapshot,
            handler,
            json,
        } => replay::replay(cli.db.clone(), &snapshot, handler, json),
        Command::Record(args) => pleo::record(cli.config.as_deref(), args, clock),
        Command::Simulate {
            seed,
            seeds,
            write,
            json,
        } => replay::simulate(seed, seeds, write, json),
        Command::Demo => crate::demo::run(cli.db.clone()),
        Command::Bench {
            smoke,
            json,
            only,
            postgres,
        } => crate::bench::run(smoke, json, &only, postgres.as_deref()),
    }
}
