//! A PostgreSQL database shared by instances: the instances, their heartbeats and leases, and
//! the companies no live instance holds, in `status`, `doctor` and `/metrics`.

use serde_json::{Value, json};

use crate::store::Store;
use crate::store::pg::SharedReport;

fn t(m: crate::clock::Millis) -> String {
    m.to_rfc3339()
}

fn report_json(r: &SharedReport) -> Value {
    json!({
        "at": t(r.now),
        "instances": r.instances.iter().map(|i| json!({
            "name": i.name, "host": i.host, "pid": i.pid, "version": i.version,
            "state": if i.alive { "alive" } else if i.stopped { "stopped" } else { "lapsed" },
            "heartbeat_at": t(i.heartbeat_at),
            "heartbeat_age_seconds": (r.now.0 - i.heartbeat_at.0) / 1000,
            "leases": i.leases,
        })).collect::<Vec<_>>(),
        "companies_without_holder": r.unheld,
    })
}

/// `status` on a shared database: its instances and the companies without a holder.
pub fn add_to_status(store: &Store, v: &mut Value, lease_ms: i64) -> anyhow::Result<()> {
    if let Some(r) = store.shared_report(lease_ms)? {
        v["shared"] = report_json(&r);
    }
    Ok(())
}

/// The instances' lines of `status`'s text.
pub fn text(v: &Value) -> String {
    let Some(s) = v.get("shared") else {
        return String::new();
    };
    let mut out = String::from("instances\n");
    for i in s["instances"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  {:<24} {:<8} {} leases, heartbeat {} s ago (host {}, pid {})\n",
            i["name"].as_str().unwrap_or(""),
            i["state"].as_str().unwrap_or(""),
            i["leases"],
            i["heartbeat_age_seconds"],
            i["host"].as_str().unwrap_or(""),
            i["pid"],
        ));
    }
    let unheld = s["companies_without_holder"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    out.push_str(&format!(
        "companies without a live holder: {}\n",
        unheld.len()
    ));
    for c in unheld.iter().take(20) {
        out.push_str(&format!("  {}\n", c.as_str().unwrap_or("")));
    }
    out
}

/// `doctor`'s check of the leases: fail while a company has no live holder, warn when no
/// instance is alive; None on SQLite.
pub fn doctor_check(
    store: &Store,
    lease_ms: i64,
) -> anyhow::Result<Option<(&'static str, String)>> {
    let Some(r) = store.shared_report(lease_ms)? else {
        return Ok(None);
    };
    let live = r.instances.iter().filter(|i| i.alive).count();
    Ok(Some(if !r.unheld.is_empty() {
        (
            "fail",
            format!(
                "{} companies have no live holder (their exports wait): {}",
                r.unheld.len(),
                r.unheld
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    } else if live == 0 {
        ("warn", "no instance is alive on this database".to_owned())
    } else {
        (
            "ok",
            format!("{live} live instances hold every company served"),
        )
    }))
}

/// The lease gauges of `/metrics` (a shared database only).
pub fn metrics(store: &Store, o: &mut String) {
    let Some(view) = store.fence().cloned() else {
        return;
    };
    let Ok(Some(r)) = store.shared_report(view.lease_ms) else {
        return;
    };
    let live = r.instances.iter().filter(|i| i.alive).count();
    for (name, help, v) in [
        (
            "jobmirror_instances_live",
            "Instances alive on the shared database (heartbeat younger than the lease).",
            live,
        ),
        (
            "jobmirror_company_leases_held",
            "Companies this instance holds a lease on (serves) now.",
            view.serving().len(),
        ),
        (
            "jobmirror_companies_without_holder",
            "Companies a live instance serves that no live instance holds: their exports wait.",
            r.unheld.len(),
        ),
    ] {
        o.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n"
        ));
    }
}
