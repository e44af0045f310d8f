//! `jobmirror companies`: the companies served beside the configuration's `company_ids`, kept
//! in the database (added, given a credential, paused, resumed, removed). The running service
//! reads the table's version every second and applies a change in place.

use std::path::Path;

use serde_json::{Value, json};

use crate::cli::args::CompaniesAction;
use crate::cli::common::{config_value, open_existing, say_json};
use crate::clock::SharedClock;
use crate::config::{Config, UsageError};
use crate::store::{CompanyChange, CompanyCredential};

/// A secret from a file: trimmed, non-empty, one line.
fn secret_file(path: &Path, what: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        UsageError(format!(
            "cannot read the {what} file {}: {e}",
            path.display()
        ))
    })?;
    let t = text.trim();
    if t.is_empty() {
        return Err(UsageError(format!("the {what} file {} is empty", path.display())).into());
    }
    if t.chars().any(|c| c.is_control()) {
        return Err(UsageError(format!(
            "the {what} file {} holds more than one line",
            path.display()
        ))
        .into());
    }
    Ok(t.to_owned())
}

fn check_id(id: &str) -> anyhow::Result<()> {
    if !crate::config::is_company_id(id) {
        return Err(UsageError(format!(
            "{id:?} is not a company id: Pleo's are UUIDs (8-4-4-4-12 hexadecimal digits)"
        ))
        .into());
    }
    Ok(())
}

pub(super) fn run(
    config: Option<&Path>,
    action: CompaniesAction,
    clock: SharedClock,
) -> anyhow::Result<()> {
    // The configuration as written (operator_config would merge the database in).
    let cfg = Config::load_for(config, crate::config::Needs::OPERATOR)?;
    let now = clock.now();
    match action {
        CompaniesAction::Add {
            id,
            api_key_file,
            oauth_refresh_token_file,
            json,
        } => {
            check_id(&id)?;
            let (credential, refresh) = match (api_key_file, oauth_refresh_token_file) {
                (Some(_), Some(_)) => {
                    return Err(UsageError(
                        "give --api-key-file or --oauth-refresh-token-file, not both".into(),
                    )
                    .into());
                }
                (Some(f), None) => (
                    CompanyCredential::ApiKey(crate::wire::Secret::new(secret_file(
                        &f, "API key",
                    )?)),
                    None,
                ),
                (None, Some(f)) => {
                    // The service refreshes the pair with the OAuth app's settings: refuse a
                    // pair it could not use.
                    let auth = std::env::var("JOBMIRROR_PLEO_AUTH")
                        .ok()
                        .or_else(|| config_value(config, "pleo_auth"));
                    if auth.as_deref().map(str::trim) != Some("oauth")
                        || Config::load_for(config, crate::config::Needs::PLEO)?
                            .oauth
                            .is_none()
                    {
                        return Err(UsageError(
                            "the configuration has no OAuth settings: set pleo_auth = \"oauth\" with pleo_oauth_token_url, pleo_oauth_client_id and its secret, so the service can refresh this company's tokens".into(),
                        )
                        .into());
                    }
                    (
                        CompanyCredential::OAuth,
                        Some(secret_file(&f, "refresh token")?),
                    )
                }
                (None, None) => (CompanyCredential::Default, None),
            };
            let store = open_existing(&cfg.db)?;
            let change = store.company_add(&id, &credential, refresh.as_deref(), now)?;
            let shard_note = (!cfg.shard.serves(&id))
                .then(|| format!("; shard {} does not serve it", cfg.shard));
            if json {
                say_json(&json!({
                    "company_id": id, "change": change.as_str(),
                    "credential": credential.as_str(), "served_by_this_shard": cfg.shard.serves(&id),
                }))?;
            } else {
                let what = match change {
                    CompanyChange::Added => "added",
                    CompanyChange::Updated if refresh.is_some() => {
                        "given a new OAuth refresh token (authorized again)"
                    }
                    CompanyChange::Updated => "given a new credential",
                    CompanyChange::Unchanged => "already there with this credential",
                };
                println!(
                    "company {id} {what} (credential: {}){}; a running service picks it up within a few seconds",
                    credential.as_str(),
                    shard_note.unwrap_or_default()
                );
            }
            Ok(())
        }
        CompaniesAction::List { json } => {
            // Read-only: listing never creates or migrates a database.
            crate::cli::common::require_db(&cfg.db)?;
            let store =
                crate::cli::shared::open_db(&cfg.db, crate::service::shared::Open::ReadOnly)?;
            let (rows, reauth) = (store.company_rows()?, crate::ops::reauthorizations(&store)?);
            let v = list(&cfg, &rows, &reauth);
            if json {
                say_json(&v)?;
            } else {
                print!("{}", list_text(&v));
            }
            Ok(())
        }
        CompaniesAction::Remove { id, json } => {
            check_id(&id)?;
            let store = open_existing(&cfg.db)?;
            let removed = store.company_remove(&id, now)?;
            let in_config = cfg.company_ids.contains(&id);
            if !removed && !in_config {
                return Err(UsageError(format!("company {id} is not in the database")).into());
            }
            if json {
                say_json(
                    &json!({"company_id": id, "removed": removed, "still_in_company_ids": in_config}),
                )?;
            } else if in_config {
                println!(
                    "company {id}: {}; it is still in company_ids, so it stays served until it is taken out of the configuration (or paused with jobmirror companies pause)",
                    if removed {
                        "its database row is removed"
                    } else {
                        "it has no database row"
                    }
                );
            } else {
                println!(
                    "company {id} removed; a running service stops serving it once its job in hand (if any) is finished or handed back"
                );
            }
            Ok(())
        }
        CompaniesAction::Pause { id, json } => pause(&cfg, &id, true, json, now),
        CompaniesAction::Resume { id, json } => pause(&cfg, &id, false, json, now),
    }
}

/// `companies pause` / `resume`: a paused company is not served (its job in hand is finished
/// first), whether the configuration or the database names it.
fn pause(
    cfg: &Config,
    id: &str,
    paused: bool,
    json: bool,
    now: crate::clock::Millis,
) -> anyhow::Result<()> {
    check_id(id)?;
    let store = open_existing(&cfg.db)?;
    let known = cfg.company_ids.iter().any(|c| c == id) || store.has_company_row(id)?;
    if !known {
        return Err(UsageError(format!(
            "company {id} is neither in company_ids nor in the database (add it with jobmirror companies add)"
        ))
        .into());
    }
    let changed = store.company_pause(id, paused, now)?;
    let word = if paused { "paused" } else { "resumed" };
    if json {
        say_json(&json!({"company_id": id, "paused": paused, "changed": changed}))?;
    } else if !changed {
        println!(
            "company {id} was already {}",
            if paused { "paused" } else { "served" }
        );
    } else if paused {
        println!(
            "company {id} {word}; a running service stops serving it once its job in hand (if any) is finished or handed back"
        );
    } else {
        println!("company {id} {word}; a running service serves it again within a few seconds");
    }
    Ok(())
}

/// Every company the configuration or the database names, with its source, credential, state
/// and whether it needs re-authorization.
/// `reauth`: as [`crate::ops::reauthorizations`] gives it.
pub fn list(
    cfg: &Config,
    rows: &[crate::store::CompanyRow],
    reauth: &std::collections::BTreeMap<String, Value>,
) -> Value {
    let in_config: std::collections::HashSet<&str> =
        cfg.company_ids.iter().map(String::as_str).collect();
    let by_row: std::collections::HashMap<&str, &crate::store::CompanyRow> =
        rows.iter().map(|r| (r.company_id.as_str(), r)).collect();
    let mut ids: Vec<&str> = cfg.company_ids.iter().map(String::as_str).collect();
    ids.extend(rows.iter().map(|r| r.company_id.as_str()));
    ids.sort_unstable();
    ids.dedup();
    let mut out = Vec::new();
    for id in ids {
        let row = by_row.get(id);
        let source = match (in_config.contains(id), row.is_some()) {
            (true, true) => "both",
            (true, false) => "config",
            _ => "database",
        };
        let credential = match row.map(|r| &r.credential) {
            Some(CompanyCredential::ApiKey(_)) => "api_key",
            Some(CompanyCredential::OAuth) => "oauth",
            _ if cfg.company_api_keys.contains_key(id) => "api_key (file)",
            _ => "default",
        };
        let paused = row.and_then(|r| r.paused_at);
        let state = if !cfg.shard.serves(id) {
            "other_shard"
        } else if paused.is_some() {
            "paused"
        } else if reauth.contains_key(id) && credential == "oauth" {
            "needs_reauthorization"
        } else {
            "served"
        };
        out.push(json!({
            "company_id": id,
            "source": source,
            "credential": credential,
            "state": state,
            "paused_at": paused.map(|p| p.to_rfc3339()),
            "added_at": row.map(|r| r.added_at.to_rfc3339()),
            "subscription_id": row.and_then(|r| r.subscription_id.clone()),
            "reauthorization": reauth.get(id),
        }));
    }
    Value::Array(out)
}

pub fn list_text(v: &Value) -> String {
    let empty = Vec::new();
    let rows = v.as_array().unwrap_or(&empty);
    if rows.is_empty() {
        return "no companies (add one with jobmirror companies add ID)\n".into();
    }
    let mut s = format!(
        "{:<38} {:<8} {:<14} {:<22} SUBSCRIPTION\n",
        "COMPANY", "SOURCE", "CREDENTIAL", "STATE"
    );
    for r in rows {
        let sub = r["subscription_id"].as_str().unwrap_or("-");
        s.push_str(&format!(
            "{:<38} {:<8} {:<14} {:<22} {sub}\n",
            r["company_id"].as_str().unwrap_or(""),
            r["source"].as_str().unwrap_or(""),
            r["credential"].as_str().unwrap_or(""),
            r["state"].as_str().unwrap_or(""),
        ));
    }
    s
}

/// `jobmirror subscribe --company ID` / `--all`: one subscription for `url` per company with a
/// credential of its own, made with that credential; each secret is kept in the company's row
/// (the running receiver accepts it within seconds). Idempotent: an existing subscription for
/// the URL is reused (or made active with the missing event types).
pub(super) fn subscribe(
    config: Option<&Path>,
    url: &str,
    company: Option<&str>,
    event_types: &[String],
    json: bool,
    clock: SharedClock,
) -> anyhow::Result<()> {
    crate::cli::common::check_subscription_url(url)?;
    let base = Config::load_for(config, crate::config::Needs::PLEO)?;
    crate::cli::common::init_logging(base.log);
    let store = open_existing(&base.db)?;
    let rows = store.company_rows()?;
    let cfg = base.with_companies(&rows);
    // The service refreshes the pairs while it runs; without it, this command may (it holds
    // the database's lock meanwhile, so the service cannot start in between).
    let lock = crate::store::DbLock::acquire(&cfg.db).ok();
    let own: std::collections::HashMap<String, crate::pleo::OwnCredential> =
        cfg.own_credentials().into_iter().collect();
    let targets: Vec<String> = match company {
        Some(c) => {
            check_id(c)?;
            if !cfg.company_ids.iter().any(|x| x == c) {
                return Err(UsageError(format!(
                    "company {c} is not served here (not in company_ids or the database, paused, or another shard's)"
                ))
                .into());
            }
            if !own.contains_key(c) {
                return Err(UsageError(format!(
                    "company {c} is served with the default credential: one subscription covers all such companies (jobmirror subscribe --url {url})"
                ))
                .into());
            }
            vec![c.to_owned()]
        }
        None => cfg
            .company_ids
            .iter()
            .filter(|c| own.contains_key(*c))
            .cloned()
            .collect(),
    };
    let progress = std::sync::Arc::new(crate::health::Progress::new(cfg.health_stale));
    let metrics = std::sync::Arc::new(crate::health::Metrics::default());
    let clients = cfg.clients(clock.clone(), &progress, &metrics)?;
    let mut out = Vec::new();
    let mut failed = 0;
    for c in &targets {
        let client = clients.for_company(Some(c));
        if lock.is_none()
            && let Some(t) = client.token_source()
        {
            t.never_refresh();
        }
        match client.ensure_subscription(url, event_types) {
            Ok((id, secret, change)) => {
                // A row for a company the configuration names with a key from the file.
                if !rows.iter().any(|r| &r.company_id == c) {
                    store.company_add(c, &CompanyCredential::Default, None, clock.now())?;
                }
                store.company_subscription(c, &id, secret.expose())?;
                if !json {
                    println!(
                        "company {c}: subscription {id} for {url} {}",
                        change.as_str()
                    );
                }
                out.push(
                    json!({"company_id": c, "subscription_id": id, "change": change.as_str()}),
                );
            }
            Err(e) => {
                failed += 1;
                if !json {
                    println!("company {c}: failed: {e}");
                }
                out.push(json!({"company_id": c, "error": e.to_string()}));
            }
        }
    }
    let skipped = cfg.company_ids.len() - targets.len();
    if json {
        say_json(
            &json!({"url": url, "companies": out, "failed": failed, "default_credential_companies": if company.is_none() { skipped } else { 0 }}),
        )?;
    } else if company.is_none() {
        println!(
            "{} companies with credentials of their own: {} subscribed, {failed} failed{}",
            targets.len(),
            targets.len() - failed,
            if skipped > 0 {
                format!(
                    "; {skipped} served with the default credential are covered by its own subscription (jobmirror subscribe --url {url})"
                )
            } else {
                String::new()
            }
        );
    }
    drop(lock);
    if failed > 0 {
        anyhow::bail!(
            "{failed} of {} companies could not be subscribed",
            targets.len()
        );
    }
    Ok(())
}
