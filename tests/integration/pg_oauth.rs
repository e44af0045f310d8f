//! OAuth pairs on a PostgreSQL database shared by instances: one process refreshes a pair at a
//! time and the others use the pair it stored; a holder that froze is waited for at most its
//! hold; a refusal of a token another process already rotated never ends the pair.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jobmirror::pleo::PleoClient;

use crate::harness::World;
use crate::postgres::{TestDb, database};

const A: &str = "aaaaaaaa-0000-4000-8000-0000000000c1";

/// A client of its own (its own connection and token source, as another instance has) on the
/// shared database, for the world's fake, with `file` as the operator's refresh token file.
fn instance_client(w: &World, db: &TestDb, file: &std::path::Path) -> PleoClient {
    let cfg = w.config(
        &[A],
        &[
            ("JOBMIRROR_DB", db.url.clone()),
            (
                "JOBMIRROR_DB_PASSWORD_FILE",
                db.password_file.display().to_string(),
            ),
            ("JOBMIRROR_PLEO_AUTH", "oauth".into()),
            (
                "JOBMIRROR_PLEO_OAUTH_TOKEN_URL",
                format!("{}/oauth/token", w.fake.base_url()),
            ),
            ("JOBMIRROR_PLEO_OAUTH_CLIENT_ID", "cid".into()),
            ("JOBMIRROR_PLEO_OAUTH_CLIENT_SECRET", "csecret".into()),
            (
                "JOBMIRROR_PLEO_OAUTH_REFRESH_TOKEN_FILE",
                file.display().to_string(),
            ),
            ("JOBMIRROR_PLEO_OAUTH_REFRESH_MARGIN_SECS", "300".into()),
            ("JOBMIRROR_PLEO_REQUEST_TIMEOUT_SECS", "2".into()),
        ],
    );
    cfg.client(w.shared_clock()).unwrap()
}

fn grants(w: &World) -> Vec<(String, bool)> {
    w.fake
        .token_grants()
        .into_iter()
        .map(|g| (g.refresh_token, g.ok))
        .collect()
}

/// Three "instances" (clients on connections of their own), four threads each, all needing a
/// token at once.
fn all_at_once(clients: &[Arc<PleoClient>]) {
    let threads: Vec<_> = clients
        .iter()
        .flat_map(|c| (0..4).map(move |_| c.clone()))
        .map(|c| std::thread::spawn(move || c.get_job("j").map(|j| j.status)))
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap().unwrap(), "pending");
    }
}

struct Shared {
    w: World,
    db: TestDb,
    clients: Vec<Arc<PleoClient>>,
}

fn shared() -> Option<Shared> {
    let db = database()?;
    db.connect().migrate().unwrap();
    let w = World::new();
    w.pending(A, "j", 60);
    w.fake.enable_oauth("cid", "csecret", "R0", 600);
    let file = w.db.parent().unwrap().join("refresh-token");
    std::fs::write(&file, "R0\n").unwrap();
    let clients = (0..3)
        .map(|_| Arc::new(instance_client(&w, &db, &file)))
        .collect();
    Some(Shared { w, db, clients })
}

fn stored_refresh(db: &TestDb) -> (String, Option<String>, Option<i64>) {
    let r = db
        .connect()
        .client()
        .query_one(
            "SELECT refresh_token, refresh_holder, refused_at FROM oauth_tokens \
             WHERE credential = 'default'",
            &[],
        )
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

#[test]
fn instances_sharing_a_database_refresh_a_pair_once_per_expiry_and_use_the_pair_stored() {
    let Some(s) = shared() else { return };
    all_at_once(&s.clients);
    assert_eq!(grants(&s.w), [("R0".into(), true)], "one first refresh");
    // 301 s later every access token has 299 s left, inside the 300 s margin: due for all.
    s.w.clock.advance(Duration::from_secs(301));
    all_at_once(&s.clients);
    assert_eq!(
        grants(&s.w),
        [("R0".into(), true), ("fake-refresh-0001".into(), true)],
        "one refresh for the three, with the pair the first stored"
    );
    let (refresh, holder, refused) = stored_refresh(&s.db);
    assert_eq!(
        refresh, "fake-refresh-0002",
        "the stored pair is the live one"
    );
    assert_eq!(holder, None, "the hold is given back");
    assert_eq!(refused, None);
}

#[test]
fn a_frozen_holder_is_waited_for_at_most_its_hold_and_its_late_pair_still_counts() {
    let Some(s) = shared() else { return };
    all_at_once(&s.clients[..1]);
    s.w.clock.advance(Duration::from_secs(301));
    // An instance took the refresh, sent the stored refresh token (the endpoint rotated it)
    // and froze before storing the answer; its hold lapses 1.5 s from now.
    let spent = stored_refresh(&s.db).0;
    let late = ureq::post(format!("{}/oauth/token", s.w.fake.base_url()))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .send(format!(
            "grant_type=refresh_token&refresh_token={spent}&client_id=cid&client_secret=csecret"
        ))
        .unwrap()
        .body_mut()
        .read_json::<serde_json::Value>()
        .unwrap();
    s.db.connect()
        .client()
        .execute(
            "UPDATE oauth_tokens SET refresh_holder = 'frozen', refresh_started_at = 1, \
             refresh_held_until = jm_now_ms() + 1500 WHERE credential = 'default'",
            &[],
        )
        .unwrap();
    // Another instance waits for the hold, then refreshes with the stored (spent) token: the
    // endpoint refuses it, and the pair is marked refused (the rotated one is only in the
    // frozen instance's memory).
    let t = Instant::now();
    assert!(s.clients[1].get_job("j").is_err());
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(1_200),
        "waited for the hold: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(10),
        "at most a hold: {waited:?}"
    );
    // (It then tries the operator's file too, in case of a re-authorization: R0, spent.)
    assert!(
        grants(&s.w).contains(&(spent.clone(), false)),
        "{:?}",
        grants(&s.w)
    );
    assert!(stored_refresh(&s.db).2.is_some(), "refused on record");
    // The frozen instance wakes and stores the pair the endpoint gave it: the pair works
    // again, for every instance.
    let st = jobmirror::store::Store::connect_pg(&s.db.target()).unwrap();
    st.oauth_commit(
        "default",
        late["access_token"].as_str().unwrap(),
        s.w.clock_now().plus_secs(600),
        late["refresh_token"].as_str().unwrap(),
        s.w.clock_now(),
    )
    .unwrap();
    assert_eq!(s.clients[2].get_job("j").unwrap().status, "pending");
    assert_eq!(stored_refresh(&s.db).2, None, "the refusal is cleared");
}

#[test]
fn a_refusal_of_a_token_already_rotated_never_ends_the_stored_pair() {
    let Some(s) = shared() else { return };
    all_at_once(&s.clients[..1]);
    let st = jobmirror::store::Store::connect_pg(&s.db.target()).unwrap();
    let now = s.w.clock_now();
    // A refusal of R0 (spent: the pair was rotated to fake-refresh-0001) is not recorded.
    assert!(
        !st.oauth_refuse("default", "R0", "invalid_grant", now)
            .unwrap()
    );
    assert_eq!(
        stored_refresh(&s.db),
        ("fake-refresh-0001".into(), None, None)
    );
    // A 401 for an access token another instance already replaced leaves the new one.
    st.oauth_expire_access("default", "fake-access-0000", now)
        .unwrap();
    assert_eq!(
        st.oauth_get("default")
            .unwrap()
            .unwrap()
            .access_token
            .unwrap()
            .expose(),
        "fake-access-0001"
    );
    // A refusal of the stored token is.
    assert!(
        st.oauth_refuse("default", "fake-refresh-0001", "invalid_grant", now)
            .unwrap()
    );
    assert!(stored_refresh(&s.db).2.is_some());
}
