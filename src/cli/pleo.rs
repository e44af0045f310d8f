//! The commands that talk to Pleo or stand in for it: `subscribe`, `subscriptions`, `record`
//! (GETs only) and `fake-pleo` (the bundled fake, for demos and tests).

use std::path::{Path, PathBuf};

use crate::cli::args::{RecordArgs, SubscriptionsAction};
use crate::cli::common::{
    check_subscription_url, config_value, init_logging, say_json, write_private,
};
use crate::clock::SharedClock;
use crate::config::{Config, UsageError};
use crate::sandbox::{FakeConfig, FakePleo, Fixture};

/// `jobmirror fake-pleo`: the fake until SIGTERM or SIGINT.
pub(super) fn fake_pleo(
    listen: &str,
    fixture: Option<&Path>,
    expires_in: i64,
    api_key: String,
    clock: SharedClock,
) -> anyhow::Result<()> {
    init_logging(log::LevelFilter::Info);
    let cfg = FakeConfig {
        api_keys: vec![api_key],
        expires_in_secs: expires_in,
        ..FakeConfig::default()
    };
    let fake = FakePleo::start(listen, cfg, clock)?;
    if let Some(path) = fixture {
        let f = Fixture::load(path).map_err(|e| UsageError(e.to_string()))?;
        let ids = fake.load_fixture(&f)?;
        println!("loaded {} jobs from {}", ids.len(), path.display());
        let readable = f.readable_ids();
        if !readable.is_empty() {
            log::warn!(
                "fixture {}: {} ids are not UUIDs (first: {}): answers that carry them are outside Pleo's schema",
                path.display(),
                readable.len(),
                readable[0]
            );
        }
    }
    println!("fake-pleo listening on {}", fake.base_url());
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    let _ = signals.forever().next();
    drop(fake);
    Ok(())
}

/// `jobmirror subscribe`: makes sure one subscription delivers to `url` and keeps its secret.
pub(super) fn subscribe(
    config: Option<&Path>,
    url: &str,
    secret_file: Option<PathBuf>,
    event_types: &[String],
    json: bool,
    clock: SharedClock,
) -> anyhow::Result<()> {
    let cfg = Config::load_for(config, crate::config::Needs::PLEO)?;
    init_logging(cfg.log);
    let file = secret_file
        .or_else(|| std::env::var_os("JOBMIRROR_WEBHOOK_SECRET_FILE").map(PathBuf::from))
        .or_else(|| config_value(config, "webhook_secret_file").map(PathBuf::from))
        .ok_or_else(|| {
            UsageError("subscribe needs --secret-file or the webhook_secret_file setting".into())
        })?;
    check_subscription_url(url)?;
    // OAuth keeps its rotated tokens in the database: it must be the service's, not a new one.
    if cfg.oauth.is_some() {
        crate::cli::common::require_db(&cfg.db)?;
    }
    let client = cfg.client(clock)?;
    let (id, secret, change) = client.ensure_subscription(url, event_types)?;
    let text = format!("{}\n", secret.expose());
    let same = std::fs::read_to_string(&file).is_ok_and(|t| t == text);
    if !same {
        write_private(&file, &text)?;
    }
    if json {
        say_json(&serde_json::json!({
            "subscription_id": id, "url": url, "change": change.as_str(),
            "secret_file": file, "secret_file_changed": !same,
        }))?;
    } else {
        println!(
            "subscription {id} for {url} {}; its secret is in {} (mode 0600{})",
            change.as_str(),
            file.display(),
            if same { ", unchanged" } else { "" }
        );
    }
    Ok(())
}

/// `jobmirror subscriptions list|delete`.
pub(super) fn subscriptions(
    config: Option<&Path>,
    action: SubscriptionsAction,
    clock: SharedClock,
) -> anyhow::Result<()> {
    let cfg = Config::load_for(config, crate::config::Needs::PLEO)?;
    init_logging(cfg.log);
    // OAuth keeps its rotated tokens in the database: it must be the service's, not a new one.
    if cfg.oauth.is_some() {
        crate::cli::common::require_db(&cfg.db)?;
    }
    let client = cfg.client(clock)?;
    match action {
        SubscriptionsAction::List { json } => {
            let subs = client.list_subscriptions()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&subs)?);
            } else if subs.is_empty() {
                println!("no subscriptions");
            } else {
                for s in &subs {
                    let types: Vec<&str> = s["eventTypes"]
                        .as_array()
                        .map(|a| a.iter().filter_map(|t| t.as_str()).collect())
                        .unwrap_or_default();
                    println!(
                        "{}  {:<8}  {}  {}",
                        s["id"].as_str().unwrap_or("?"),
                        s["status"].as_str().unwrap_or("?"),
                        s["endpointUrl"].as_str().unwrap_or("?"),
                        types.join(",")
                    );
                }
            }
        }
        SubscriptionsAction::Delete { id, json } => {
            client.delete_subscription(&id)?;
            if json {
                say_json(&serde_json::json!({"deleted": id}))?;
            } else {
                println!("deleted subscription {id}");
            }
        }
    }
    Ok(())
}

/// `jobmirror record`: a snapshot of the configured companies' open jobs.
pub(super) fn record(
    config: Option<&Path>,
    args: RecordArgs,
    clock: SharedClock,
) -> anyhow::Result<()> {
    let RecordArgs {
        out,
        force,
        json,
        redact,
        description,
        at,
    } = args;
    if out.exists() && !force {
        return Err(UsageError(format!(
            "{} already exists; give --force to replace it",
            out.display()
        ))
        .into());
    }
    let at = match at {
        None => None,
        Some(s) => Some(
            crate::clock::Millis::parse_rfc3339(&s)
                .ok_or_else(|| UsageError(format!("--at {s:?} is not an RFC 3339 time")))?,
        ),
    };
    let cfg = Config::load_for(config, crate::config::Needs::PLEO_COMPANIES)?;
    init_logging(cfg.log);
    // OAuth keeps its rotated tokens in the database: it must be the service's, not a new one.
    if cfg.oauth.is_some() {
        crate::cli::common::require_db(&cfg.db)?;
    }
    let client = cfg.client(clock.clone())?;
    let opts = crate::replay::snapshot::RecordOptions {
        redact,
        description,
        at,
    };
    let snap = crate::replay::snapshot::record(&client, &clock, &cfg.company_ids, &opts)?;
    write_private(&out, &(serde_json::to_string_pretty(&snap)? + "\n"))?;
    if json {
        say_json(&serde_json::json!({
            "out": out, "jobs": snap.jobs.len(), "companies": snap.companies.len(),
            "redacted": redact,
        }))?;
    } else {
        println!(
            "recorded {} open jobs of {} companies into {}{}",
            snap.jobs.len(),
            snap.companies.len(),
            out.display(),
            if redact { " (redacted)" } else { "" }
        );
    }
    Ok(())
}
