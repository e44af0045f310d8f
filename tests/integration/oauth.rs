//! OAuth 2.0 against the fake's token endpoint: use, refresh before expiry, rotation with the
//! pair committed first, one refresher, a revoked token, and a crash between a refresh and
//! its commit.

use std::sync::Arc;
use std::time::Duration;

use jobmirror::pleo::PleoClient;
use jobmirror::store::Store;

use crate::harness::World;

const A: &str = "aaaaaaaa-0000-4000-8000-000000000001";

/// A client configured for OAuth against the world's fake (access tokens live 600 s, refreshed
/// 300 s before expiry), with `R0` as the operator's first refresh token.
fn oauth_client(w: &World) -> (PleoClient, std::path::PathBuf) {
    w.fake.enable_oauth("cid", "csecret", "R0", 600);
    let file = w.db.parent().unwrap().join("refresh-token");
    std::fs::write(&file, "R0\n").unwrap();
    (oauth_client_again(w, &file), file)
}

fn grants(w: &World) -> Vec<(String, bool)> {
    w.fake
        .token_grants()
        .into_iter()
        .map(|g| (g.refresh_token, g.ok))
        .collect()
}

fn stored(w: &World) -> jobmirror::store::TokenRow {
    w.store().oauth_get("default").unwrap().unwrap()
}

#[test]
fn tokens_are_used_refreshed_before_expiry_and_rotated_with_the_new_pair_stored() {
    let w = World::new();
    w.pending(A, "j", 60);
    let (client, _) = oauth_client(&w);
    assert_eq!(client.get_job("j").unwrap().status, "pending");
    assert_eq!(grants(&w), [("R0".into(), true)]);
    let row = stored(&w);
    assert_eq!(row.refresh_token.expose(), "fake-refresh-0001");
    assert_eq!(row.access_token.unwrap().expose(), "fake-access-0001");
    assert!(row.refresh_started_at.is_none());
    // Still fresh: no refresh.
    client.get_job("j").unwrap();
    assert_eq!(grants(&w).len(), 1);
    // 301 s later the token has 299 s left, inside the 300 s margin: refreshed first.
    w.clock.advance(Duration::from_secs(301));
    client.get_job("j").unwrap();
    assert_eq!(
        grants(&w),
        [("R0".into(), true), ("fake-refresh-0001".into(), true)]
    );
    assert_eq!(stored(&w).refresh_token.expose(), "fake-refresh-0002");
    // The token endpoint rotates: a used refresh token never works again.
    let again = ureq::post(format!("{}/oauth/token", w.fake.base_url()))
        .config()
        .http_status_as_error(false)
        .build()
        .header("Content-Type", "application/x-www-form-urlencoded")
        .send("grant_type=refresh_token&refresh_token=R0&client_id=cid&client_secret=csecret")
        .unwrap();
    assert_eq!(again.status(), 400);
}

#[test]
fn one_refresher_when_many_threads_need_a_token_at_once() {
    let w = World::new();
    w.pending(A, "j", 60);
    let (client, _) = oauth_client(&w);
    let client = Arc::new(client);
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let c = client.clone();
            std::thread::spawn(move || c.get_job("j").map(|j| j.status))
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap().unwrap(), "pending");
    }
    assert_eq!(
        grants(&w),
        [("R0".into(), true)],
        "one refresh for eight callers"
    );
}

#[test]
fn a_revoked_access_token_is_refreshed_once_on_401() {
    let w = World::new();
    w.pending(A, "j", 60);
    let (client, _) = oauth_client(&w);
    client.get_job("j").unwrap();
    w.fake.revoke_access_tokens();
    assert_eq!(client.get_job("j").unwrap().status, "pending");
    assert_eq!(grants(&w).len(), 2, "{:?}", grants(&w));
    let statuses: Vec<u16> = w
        .fake
        .requests()
        .iter()
        .filter(|r| r.path == "/v3/export-jobs/j")
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, [200, 401, 200]);
}

#[test]
fn a_crash_between_a_refresh_and_its_commit_is_explained_and_recovers_once_authorized_again() {
    let w = World::new();
    w.pending(A, "j", 60);
    let (client, file) = oauth_client(&w);
    client.get_job("j").unwrap();
    assert_eq!(stored(&w).refresh_token.expose(), "fake-refresh-0001");
    // The crashed process: it committed its intent, sent the refresh, the token endpoint
    // rotated the pair, and the process died before committing the answer.
    let st = Store::open(&w.db).unwrap();
    st.oauth_begin_refresh("default", w.clock_now()).unwrap();
    let lost = ureq::post(format!("{}/oauth/token", w.fake.base_url()))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .send("grant_type=refresh_token&refresh_token=fake-refresh-0001&client_id=cid&client_secret=csecret")
        .unwrap();
    assert_eq!(lost.status(), 200);
    drop(client);

    // The restart: the stored pair is stale and its refresh token was rotated away.
    w.clock.advance(Duration::from_secs(900));
    let client = oauth_client_again(&w, &file);
    let e = client.get_job("j").unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("never stored its answer"), "{msg}");
    assert!(msg.contains("authorize again"), "{msg}");
    assert!(!e.is_retryable());
    assert!(!msg.contains("fake-refresh"), "no token in messages: {msg}");
    // The operator authorizes again and leaves the new refresh token in the file.
    let fresh = w.fake.authorize_again().unwrap();
    std::fs::write(&file, format!("{fresh}\n")).unwrap();
    assert_eq!(client.get_job("j").unwrap().status, "pending");
    let row = stored(&w);
    assert!(row.refresh_started_at.is_none());
    assert_ne!(row.refresh_token.expose(), fresh, "rotated on use");
}

/// A client on the world's database and fake (a second one: a restarted process).
fn oauth_client_again(w: &World, file: &std::path::Path) -> PleoClient {
    let cfg = w.config(
        &[A],
        &[
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
        ],
    );
    cfg.client(w.shared_clock()).unwrap()
}
