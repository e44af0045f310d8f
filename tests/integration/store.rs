//! Store properties that need a realistic table: the pick query's plan.

use jobmirror::clock::Millis;
use jobmirror::pleo::Job;
use jobmirror::store::{PICK_SQL, Source, Store};
use serde_json::json;

#[test]
fn pick_query_uses_the_index_without_scan_or_temp_btree() {
    let dir = tempfile::tempdir().unwrap();
    let st = Store::open(&dir.path().join("m.db")).unwrap();
    let statuses = [
        "pending",
        "in_progress",
        "completed",
        "failed",
        "completed_with_errors",
    ];
    let mut jobs = Vec::new();
    for i in 0..2000 {
        jobs.push(
            Job::from_value(json!({
                "id": format!("j{i:05}"), "companyId": format!("c{}", i % 7), "status": statuses[i % 5],
                "createdAt": Millis(1_700_000_000_000 + (i as i64 * 7919) % 100_000).to_rfc3339(),
                "expiresIn": 3600, "numberOfItems": 1, "isInteractive": true, "vendorBasedBookkeeping": false
            }))
            .unwrap(),
        );
    }
    st.upsert_jobs(&jobs, Millis(1_700_000_000_000), Source::Poll)
        .unwrap();
    st.conn().execute_batch("ANALYZE").unwrap();
    let plan: Vec<String> = st
        .conn()
        .prepare(&format!("EXPLAIN QUERY PLAN {PICK_SQL}"))
        .unwrap()
        .query_map(rusqlite::params!["c3"], |r| r.get::<_, String>(3))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let text = plan.join(" | ");
    assert!(text.contains("USING INDEX export_jobs_pick"), "{text}");
    assert!(!text.contains("SCAN"), "{text}");
    assert!(!text.contains("TEMP B-TREE"), "{text}");
    // And it answers correctly: the oldest pending job of c3.
    let got = st.pick_next("c3").unwrap().unwrap();
    let want = jobs
        .iter()
        .filter(|j| j.company_id == "c3" && j.status == "pending")
        .min_by_key(|j| (j.created_at, j.id.clone()))
        .unwrap();
    assert_eq!(got.id, want.id);
}

/// Regression: `busy_snapshot_on_concurrent_writers`. Write transactions used to begin
/// DEFERRED, read, then write: when another connection committed in between, the first write
/// failed at once with SQLITE_BUSY_SNAPSHOT (no busy timeout helps), and a webhook's job was
/// left unread for an hour. Writers on separate connections must all succeed.
#[test]
fn busy_snapshot_on_concurrent_writers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.db");
    Store::open(&path).unwrap();
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let path = path.clone();
            std::thread::spawn(move || {
                let st = Store::open(&path).unwrap();
                for i in 0..300 {
                    let j = Job::from_value(json!({
                        "id": format!("w{w}-{}", i % 20), "companyId": "c", "status": "pending",
                        "createdAt": Millis(1_700_000_000_000 + i).to_rfc3339(),
                        "expiresIn": 3600, "numberOfItems": i, "isInteractive": true, "vendorBasedBookkeeping": false
                    }))
                    .unwrap();
                    st.upsert_job(&j, Millis(i), Source::Poll).unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("no writer failed");
    }
    let st = Store::open(&path).unwrap();
    let n: i64 = st
        .conn()
        .query_row("SELECT count(*) FROM export_jobs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 60);
}
