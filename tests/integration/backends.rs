//! The store's statements on both backends: each scenario runs on a SQLite file and on a real
//! PostgreSQL database, and must read back the same.

use jobmirror::clock::Millis;
use jobmirror::store::{CompanyChange, CompanyCredential, Store};

/// Runs `scenario` on a fresh SQLite store and, when PostgreSQL is here, a fresh PostgreSQL one.
fn on_both(scenario: impl Fn(&Store, &str)) {
    let dir = tempfile::tempdir().unwrap();
    let lite = Store::open(&dir.path().join("b.db")).unwrap();
    scenario(&lite, "sqlite");
    if let Some(db) = crate::postgres::database() {
        let pg = Store::open_pg(&db.target()).unwrap();
        scenario(&pg, "postgres");
    }
}

fn journal_kinds(st: &Store, company: &str) -> Vec<String> {
    st.db()
        .rows(
            "SELECT kind FROM job_events WHERE company_id = ?1 ORDER BY seq",
            &[&company],
            |r| r.get(0),
        )
        .unwrap()
}

#[test]
fn companies_are_added_paused_subscribed_and_removed_alike_on_both() {
    on_both(|st, which| {
        let v0 = st.companies_version().unwrap();
        let key = CompanyCredential::ApiKey(jobmirror::wire::Secret::new("k-1"));
        assert_eq!(
            st.company_add("c1", &key, None, Millis(10)).unwrap(),
            CompanyChange::Added,
            "{which}"
        );
        assert_eq!(
            st.company_add("c1", &key, None, Millis(11)).unwrap(),
            CompanyChange::Unchanged
        );
        assert_eq!(
            st.company_add("c1", &CompanyCredential::OAuth, Some("rt-1"), Millis(12))
                .unwrap(),
            CompanyChange::Updated
        );
        assert!(st.has_company_row("c1").unwrap());
        assert!(!st.has_company_row("c2").unwrap());
        assert!(st.company_pause("c2", true, Millis(13)).unwrap());
        assert!(
            !st.company_pause("c2", true, Millis(14)).unwrap(),
            "{which}"
        );
        assert!(st.company_subscription("c1", "sub-1", "whsec_x").unwrap());
        assert!(
            !st.company_subscription("c1", "sub-1", "whsec_x").unwrap(),
            "{which}"
        );
        let rows = st.company_rows().unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].credential, CompanyCredential::OAuth);
        assert_eq!(rows[0].subscription_id.as_deref(), Some("sub-1"));
        assert_eq!(rows[1].paused_at, Some(Millis(13)));
        assert!(st.company_remove("c2", Millis(15)).unwrap());
        assert!(!st.company_remove("c2", Millis(16)).unwrap());
        assert_eq!(
            journal_kinds(st, "c1"),
            ["company_added", "company_credential_changed"],
            "{which}"
        );
        assert_eq!(
            journal_kinds(st, "c2"),
            ["company_paused", "company_removed"],
            "{which}"
        );
        // Each change bumped the version: add, update, pause, subscription, remove.
        assert_eq!(st.companies_version().unwrap() - v0, 5, "{which}");
    });
}

#[test]
fn oauth_pairs_are_seeded_refreshed_refused_and_forgotten_alike_on_both() {
    on_both(|st, which| {
        st.company_add("c9", &CompanyCredential::OAuth, Some("rt-0"), Millis(1))
            .unwrap();
        let cred = jobmirror::store::company_credential("c9");
        let t = st.oauth_get(&cred).unwrap().unwrap();
        assert_eq!(t.refresh_token.expose(), "rt-0", "{which}");
        assert!(t.access_token.is_none());
        st.oauth_begin_refresh(&cred, Millis(2)).unwrap();
        assert_eq!(
            st.oauth_get(&cred).unwrap().unwrap().refresh_started_at,
            Some(Millis(2))
        );
        st.oauth_commit(&cred, "at-1", Millis(3_600_000), "rt-1", Millis(3))
            .unwrap();
        let t = st.oauth_get(&cred).unwrap().unwrap();
        assert_eq!(t.access_token.unwrap().expose(), "at-1");
        assert_eq!(t.refresh_started_at, None);
        assert!(
            st.oauth_refuse(&cred, "rt-1", "invalid_grant", Millis(4))
                .unwrap()
        );
        assert_eq!(
            st.companies_needing_reauthorization().unwrap(),
            [("c9".to_owned(), Millis(4), "invalid_grant".to_owned())],
            "{which}"
        );
        // Still a company with OAuth: the pair is kept.
        assert!(!st.forget_company_pair("c9").unwrap());
        st.company_remove("c9", Millis(5)).unwrap();
        assert!(st.forget_company_pair("c9").unwrap(), "{which}");
        assert!(st.oauth_get(&cred).unwrap().is_none());
        st.oauth_seed("default", "rt-d", Millis(6)).unwrap();
        assert_eq!(
            st.oauth_get("default")
                .unwrap()
                .unwrap()
                .refresh_token
                .expose(),
            "rt-d"
        );
    });
}

fn job(id: &str, company: &str, status: &str, created: &str) -> jobmirror::wire::Job {
    jobmirror::wire::Job::from_value(serde_json::json!({
        "id": id, "companyId": company, "status": status, "createdAt": created,
        "lastUpdatedAt": created, "expiresIn": 3600, "numberOfItems": 2,
        "isInteractive": true, "vendorBasedBookkeeping": false
    }))
    .unwrap()
}

/// A job's whole life in the store: detected, picked oldest first, claimed, items recorded
/// and reported, finished; the summaries, counts and prune that operators read.
#[test]
fn a_job_lives_the_same_life_on_both() {
    use jobmirror::store::{
        EventKind, ItemResult, ProcState, Retention, Source, SyncCounts, Upsert,
    };
    on_both(|st, which| {
        let t0 = Millis::parse_rfc3339("2026-11-24T10:30:00Z").unwrap();
        let run = st.begin_sync_run("c", "poll", t0).unwrap();
        let ups = st
            .upsert_jobs(
                &[
                    job("b", "c", "pending", "2026-11-24T10:20:00Z"),
                    job("a2", "c", "pending", "2026-11-24T10:01:00.000000002Z"),
                    job("a1", "c", "pending", "2026-11-24T10:01:00.000000001Z"),
                    job("x", "other", "in_progress", "2026-11-24T09:00:00Z"),
                ],
                t0,
                Source::Poll,
            )
            .unwrap();
        assert_eq!(ups, [Upsert::New; 4], "{which}");
        let counts = SyncCounts {
            pages: 1,
            seen: 3,
            new: 3,
            ..SyncCounts::default()
        };
        st.finish_sync_run(run, t0, &counts, None).unwrap();
        // The same listing again changes nothing.
        let again = st
            .upsert_job(
                &job("b", "c", "pending", "2026-11-24T10:20:00Z"),
                t0,
                Source::Poll,
            )
            .unwrap();
        assert_eq!(again, Upsert::Unchanged, "{which}");
        let a1 = st.pick_next("c").unwrap().unwrap();
        assert_eq!(a1.id, "a1", "{which}: oldest first at full precision");
        assert_eq!(
            st.jobs_ahead(&st.job("b").unwrap().unwrap()).unwrap(),
            ["a1", "a2"]
        );
        assert_eq!(
            st.job("x").unwrap().unwrap().proc_state,
            ProcState::Conflict,
            "{which}: in_progress seen by a poll is someone else's"
        );
        st.begin_claim(&a1, t0).unwrap();
        let a1 = st.job("a1").unwrap().unwrap();
        assert_eq!((a1.proc_state, a1.claim_attempts), (ProcState::Claiming, 1));
        st.transition(
            &a1,
            ProcState::Claimed,
            t0,
            EventKind::Claimed,
            serde_json::json!({}),
        )
        .unwrap();
        st.event_accepted("a1", t0).unwrap();
        assert_eq!(st.active_job("c").unwrap().unwrap().id, "a1");
        assert_eq!(st.companies_with_work().unwrap().len(), 1, "{which}");
        st.sync_job_items(
            "a1",
            &[
                ("e1".into(), "pending".into(), Some("r1".into())),
                ("e2".into(), "pending".into(), None),
            ],
            t0,
        )
        .unwrap();
        assert_eq!(st.todo_items("a1").unwrap().len(), 2);
        let ok = ItemResult {
            accounting_entry_id: "e1".into(),
            successful: true,
            external_id: Some("X1".into()),
            external_url: None,
            failure_reason: None,
            failure_reason_type: None,
        };
        let bad = ItemResult {
            accounting_entry_id: "e2".into(),
            successful: false,
            external_id: None,
            external_url: None,
            failure_reason: Some("no account".into()),
            failure_reason_type: Some("validation_failure".into()),
        };
        assert_eq!(
            st.record_results("a1", &[ok.clone(), bad], t0).unwrap(),
            ["e1", "e2"]
        );
        assert!(
            st.record_results("a1", &[ok], t0).unwrap().is_empty(),
            "never twice"
        );
        st.add_handler_budget("a1", 1500, true).unwrap();
        assert_eq!(st.handler_budget("a1").unwrap(), (1500, 1), "{which}");
        assert_eq!(st.unreported_items("a1", 10).unwrap().len(), 2);
        st.mark_reported("a1", &[("e1".into(), "successful".into())], t0)
            .unwrap();
        st.mark_report_error("a1", "e2", "refused", true, t0)
            .unwrap();
        let c = st.item_counts("a1").unwrap();
        assert_eq!(
            (c.todo, c.successful, c.failed, c.unreported),
            (0, 1, 1, 0),
            "{which}"
        );
        assert_eq!(st.problem_items("a1").unwrap().len(), 1);
        assert_eq!(
            st.first_item_failure("a1").unwrap(),
            Some((Some("validation_failure".into()), Some("no account".into())))
        );
        st.journal(
            t0,
            Some("a1"),
            Some("c"),
            EventKind::FinishSent,
            serde_json::json!({"event": "completed_with_errors"}),
        )
        .unwrap();
        let finished = jobmirror::wire::Job::from_value(serde_json::json!({
            "id": "a1", "companyId": "c", "status": "completed_with_errors",
            "createdAt": "2026-11-24T10:01:00.000000001Z", "lastUpdatedAt": "2026-11-24T10:31:00Z",
            "expiresIn": 3600, "numberOfItems": 2, "isInteractive": true,
            "vendorBasedBookkeeping": false
        }))
        .unwrap();
        assert_eq!(
            st.upsert_job(&finished, t0, Source::Reread).unwrap(),
            Upsert::Changed
        );
        assert!(st.has_event("a1", EventKind::Claimed).unwrap());
        let kinds: Vec<String> = st
            .events(Some("a1"))
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(
            kinds,
            [
                "detected",
                "claim_sent",
                "claimed",
                "finish_sent",
                "status_changed",
                "finished"
            ],
            "{which}"
        );
        assert_eq!(
            st.last_event_of(&["claimed", "finished"])
                .unwrap()
                .unwrap()
                .kind,
            "finished"
        );
        assert!(
            st.finish_counts()
                .unwrap()
                .contains(&("completed_with_errors".to_owned(), 1)),
            "{which}"
        );
        let summaries = st.company_summaries().unwrap();
        let c = summaries.iter().find(|s| s.company_id == "c").unwrap();
        assert_eq!(c.next_deadline.as_ref().unwrap().0, "a2", "{which}");
        assert_eq!(c.last_poll_at, Some(t0));
        assert_eq!(st.list_jobs(Some("c"), Some("new"), 10).unwrap().len(), 2);
        assert_eq!(st.list_jobs(None, None, 10).unwrap().len(), 4);
        assert_eq!(st.in_flight().unwrap().len(), 0);
        assert_eq!(st.quick_check().unwrap(), ["ok"]);
        // A company whose polls failed twice in a row since its last success at t0.
        for _ in 0..2 {
            let r = st.begin_sync_run("c", "poll", t0).unwrap();
            st.finish_sync_run(r, t0, &SyncCounts::default(), Some("503"))
                .unwrap();
        }
        assert_eq!(
            st.companies_poll_stale(Millis(t0.0 + 3_600_000), 600_000)
                .unwrap(),
            0,
            "{which}: the last pass is older than twice the stale time"
        );
        assert_eq!(
            st.companies_poll_stale(Millis(t0.0 + 900_000), 600_000)
                .unwrap(),
            1,
            "{which}: its last success is older than the stale time"
        );
        // Thirty days on, the finished job's items and raw JSON go; the journal stays.
        let later = Millis(t0.0 + 31 * 86_400_000);
        let keep = Retention {
            jobs_days: 30,
            webhook_bodies_days: 7,
            webhook_ids_days: 30,
            sync_runs_days: 30,
        };
        let dry = st.prune(later, later, keep, true).unwrap();
        assert_eq!((dry.jobs_trimmed, dry.job_items_deleted), (1, 2), "{which}");
        assert_eq!(
            st.item_counts("a1").unwrap().successful,
            1,
            "a dry run changes nothing"
        );
        let done = st.prune(later, later, keep, false).unwrap();
        assert_eq!(done.job_items_deleted, 2);
        assert_eq!(st.item_counts("a1").unwrap().successful, 0);
        assert!(st.last_event_of(&["pruned"]).unwrap().is_some(), "{which}");
    });
}

/// Webhook deliveries: stored once, acted on oldest first, deferred and retried, marked; the
/// service's pid record; and the counts operators and metrics read.
#[test]
fn deliveries_and_counts_are_kept_alike_on_both() {
    use jobmirror::store::{Delivery, EventKind, Source, Stored};
    on_both(|st, which| {
        let d = |id: &str, company: &str| Delivery {
            webhook_id: id.to_owned(),
            signed_at: Millis(1_000),
            event_type: Some("export-job.created".to_owned()),
            event_id: Some(format!("ev-{id}")),
            job_id: Some(format!("job-{id}")),
            company_id: Some(company.to_owned()),
            body: format!("{{\"id\":\"{id}\"}}"),
            headers: serde_json::json!({"webhook-id": id}),
        };
        let (m1, m2, m3) = (d("m1", "c1"), d("m2", "c2"), d("m3", "c1"));
        assert_eq!(
            st.insert_deliveries(&[&m1, &m2], Millis(10)).unwrap(),
            [Stored::New, Stored::New],
            "{which}"
        );
        assert_eq!(
            st.insert_deliveries(&[&m1, &m3], Millis(11)).unwrap(),
            [Stored::Duplicate, Stored::New],
            "{which}: a retried delivery is stored once"
        );
        assert!(st.delivery_stored("m1").unwrap());
        assert!(!st.delivery_stored("m9").unwrap());
        let bytes = st.delivery_bytes_by_company().unwrap();
        assert_eq!(bytes.len(), 2, "{which}");
        let due: Vec<String> = st
            .pending_deliveries(10, Millis(20))
            .unwrap()
            .into_iter()
            .map(|p| p.webhook_id)
            .collect();
        assert_eq!(due, ["m1", "m2", "m3"], "{which}: oldest first");
        st.defer_deliveries(&[("m2".into(), "pleo_http_503".into(), Millis(50))])
            .unwrap();
        st.mark_deliveries(&[("m1".into(), "read".into())], Millis(21))
            .unwrap();
        let due: Vec<(String, u32)> = st
            .pending_deliveries(10, Millis(30))
            .unwrap()
            .into_iter()
            .map(|p| (p.webhook_id, p.attempts))
            .collect();
        assert_eq!(
            due,
            [("m3".to_owned(), 0)],
            "{which}: m2 waits for its retry"
        );
        assert_eq!(st.next_delivery_retry().unwrap(), Some(Millis(50)));
        assert_eq!(st.pending_deliveries(10, Millis(50)).unwrap().len(), 2);
        let b = st.delivery_backlog().unwrap();
        assert_eq!(
            (b.unprocessed, b.oldest_unprocessed, b.last_received),
            (2, Some(Millis(10)), Some(Millis(11))),
            "{which}"
        );
        assert_eq!(st.last_webhooks().unwrap()["c1"], Millis(11));
        assert!(
            st.event_counts()
                .unwrap()
                .contains(&("webhook_received".to_owned(), 3)),
            "{which}"
        );
        // The service's pid, for `trigger`.
        st.register_instance(4242, Millis(5)).unwrap();
        st.register_instance(4242, Millis(6)).unwrap();
        assert_eq!(st.instances().unwrap(), [4242]);
        st.unregister_instance(4242).unwrap();
        assert!(st.instances().unwrap().is_empty());
        // A job that left the listing, its raw JSON, a deadline warning.
        let j = jobmirror::wire::Job::from_value(serde_json::json!({
            "id": "job-m1", "companyId": "c1", "status": "pending",
            "createdAt": "2026-11-24T10:00:00Z", "lastUpdatedAt": "2026-11-24T10:00:00Z",
            "expiresIn": 3600, "numberOfItems": 1, "isInteractive": true,
            "vendorBasedBookkeeping": false, "somethingNew": 7
        }))
        .unwrap();
        st.upsert_job(&j, Millis(100), Source::Webhook).unwrap();
        assert_eq!(st.job_raw("job-m1").unwrap().unwrap()["somethingNew"], 7);
        assert_eq!(
            st.open_jobs_missing("c1", &Default::default()).unwrap(),
            ["job-m1"],
            "{which}"
        );
        let row = st.job("job-m1").unwrap().unwrap();
        st.warn_deadline(&row, Millis(200)).unwrap();
        assert_eq!(
            st.job("job-m1").unwrap().unwrap().warned_expires_at,
            Some(row.expires_at)
        );
        assert!(st.has_event("job-m1", EventKind::DeadlineWarning).unwrap());
        assert_eq!(
            st.state_counts().unwrap(),
            [("new".to_owned(), 1)],
            "{which}"
        );
        assert_eq!(st.companies().unwrap(), ["c1"]);
        st.checkpoint().unwrap();
    });
}
