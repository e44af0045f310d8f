//! The store on a real PostgreSQL: the schema by `jobmirror migrate` (the real binary), the
//! journal's invariants, and company leases between instances (each its own connection), with
//! the database's "now" and each instance's monotonic clock driven by one manual clock.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use jobmirror::clock::{Clock, ManualClock, Millis, SharedClock};
use jobmirror::store::pg::keeper::{LeaseClock, LeaseKeeper, Mono};
use jobmirror::store::pg::leases::{Instance, fence};
use jobmirror::store::pg::{PgStore, PgTarget};

use crate::postgres::{PASSWORD, TestDb, database};

const BIN: &str = env!("CARGO_BIN_EXE_jobmirror");
const LEASE_MS: i64 = 30_000;

fn migrated() -> Option<TestDb> {
    let db = database()?;
    db.connect().migrate().unwrap();
    Some(db)
}

fn companies(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("co-{i:02}")).collect()
}

/// An instance: its keeper (clock and monotonic clock from `clock`) and its own connection.
struct Node {
    keeper: LeaseKeeper,
    store: PgStore,
}

fn node(db: &TestDb, name: &str, clock: &Arc<ManualClock>) -> Node {
    let c: SharedClock = clock.clone();
    let mono_clock = clock.clone();
    let mono: Mono = Arc::new(move || mono_clock.now().0);
    Node {
        keeper: LeaseKeeper::new(
            Instance::this_process(Some(name), c.now()),
            LEASE_MS,
            LeaseClock::Injected(c),
            mono,
        ),
        store: db.connect(),
    }
}

impl Node {
    fn round(&mut self, list: &[String]) -> jobmirror::store::pg::leases::Round {
        self.keeper.round(&mut self.store, list).unwrap()
    }
}

/// Every company some node may act for now, with who: panics on two at once.
fn actors(nodes: &[&Node]) -> BTreeMap<String, String> {
    let mut by = BTreeMap::new();
    for n in nodes {
        for c in n.keeper.serving() {
            if let Some(other) = by.insert(c.clone(), n.keeper.me.name.clone()) {
                panic!("{c} served by {other} and {} at once", n.keeper.me.name);
            }
        }
    }
    by
}

fn put_job_in_hand(store: &mut PgStore, company: &str, job: &str) {
    store
        .client()
        .execute(
            "INSERT INTO export_jobs (id, company_id, status, created_at, expires_in, expires_at,
                 number_of_items, raw_json, first_seen_at, last_seen_at, proc_state, proc_state_at)
             VALUES ($1, $2, 'in_progress', 0, 3600, 3600000, 1, '{}', 0, 0, 'processing', 0)",
            &[&job, &company],
        )
        .unwrap();
}

fn finish_job(store: &mut PgStore, job: &str) {
    store
        .client()
        .execute(
            "UPDATE export_jobs SET proc_state = 'done', status = 'completed' WHERE id = $1",
            &[&job],
        )
        .unwrap();
}

fn journal(store: &mut PgStore, company: &str) -> Vec<(String, serde_json::Value)> {
    store
        .client()
        .query(
            "SELECT kind, detail FROM job_events WHERE company_id = $1 ORDER BY seq",
            &[&company],
        )
        .unwrap()
        .iter()
        .map(|r| {
            let d: String = r.get(1);
            (r.get(0), serde_json::from_str(&d).unwrap())
        })
        .collect()
}

#[test]
fn migrate_on_postgres_builds_the_schema_and_keeps_the_password_out_of_every_message() {
    let Some(db) = database() else { return };
    let run = |extra: &[(&str, &str)], args: &[&str]| {
        let mut c = Command::new(BIN);
        c.args(args)
            .env_remove("JOBMIRROR_CONFIG")
            .env_remove("PGPASSWORD")
            .env("JOBMIRROR_DB", &db.url)
            .env("JOBMIRROR_DB_PASSWORD_FILE", &db.password_file);
        for (k, v) in extra {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!text.contains(PASSWORD), "the password was printed: {text}");
        (out.status.code(), text)
    };
    let (code, text) = run(&[], &["migrate"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("applied V1__schema"), "{text}");
    assert!(text.contains("applied V2__leases"), "{text}");
    assert!(text.contains(&format!("database {} is at the current schema", db.url)));
    let (code, text) = run(&[], &["migrate", "--json"]);
    assert_eq!(code, Some(0), "{text}");
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(v["applied"], serde_json::json!([]), "nothing twice: {text}");

    // The password from the environment works as well; a wrong one is a clear error.
    let (code, text) = run(
        &[("JOBMIRROR_DB_PASSWORD_FILE", ""), ("PGPASSWORD", PASSWORD)],
        &["migrate"],
    );
    assert_eq!(code, Some(0), "{text}");
    let wrong = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(wrong.path(), "not-it\n").unwrap();
    let (code, text) = run(
        &[("JOBMIRROR_DB_PASSWORD_FILE", wrong.path().to_str().unwrap())],
        &["migrate"],
    );
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("password authentication failed"), "{text}");
    assert!(text.contains(&db.url), "names the database: {text}");
    // A password inside the URL is refused, and never echoed.
    let inline = db
        .url
        .replace("postgres@", &format!("postgres:{PASSWORD}@"));
    let (code, text) = run(&[("JOBMIRROR_DB", &inline)], &["migrate"]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("db_password_file"), "{text}");
    // A command that reads a SQLite file only never creates one named like the URL.
    let cwd = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .arg("backup")
        .arg(cwd.path().join("copy.db"))
        .current_dir(cwd.path())
        .env_remove("JOBMIRROR_CONFIG")
        .env("JOBMIRROR_DB", &db.url)
        .env("JOBMIRROR_DB_PASSWORD_FILE", &db.password_file)
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(!String::from_utf8_lossy(&out.stderr).contains(PASSWORD));
    assert_eq!(std::fs::read_dir(cwd.path()).unwrap().count(), 0);

    // The journal is append-only, its counts kept by trigger; the operator views answer.
    let mut s = db.connect();
    let c = s.client();
    c.execute(
        "INSERT INTO job_events (at, job_id, company_id, kind, detail)
         VALUES (1, 'j1', 'c1', 'finish_sent', '{\"event\":\"completed\"}')",
        &[],
    )
    .unwrap();
    for sql in [
        "UPDATE job_events SET kind = 'x'",
        "DELETE FROM job_events",
        "TRUNCATE job_events",
    ] {
        let e = c.batch_execute(sql).unwrap_err();
        assert!(format!("{e:?}").contains("append-only"), "{sql}: {e:?}");
    }
    let bad = c.execute(
        "INSERT INTO job_events (at, kind, detail) VALUES (1, 'x', 'not json')",
        &[],
    );
    assert!(bad.is_err(), "detail must be JSON");
    let n: i64 = c
        .query_one("SELECT n FROM finish_counts WHERE event = 'completed'", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    for view in [
        "in_flight",
        "job_timeline",
        "recent_webhooks",
        "poll_health",
        "queue",
        "leases",
        "live_instances",
        "step_timeline",
    ] {
        c.query(&format!("SELECT * FROM {view}"), &[]).unwrap();
    }
    let at: String = c
        .query_one("SELECT at FROM job_timeline", &[])
        .unwrap()
        .get(0);
    assert_eq!(at, "1970-01-01T00:00:00.001Z");
}

#[test]
fn three_instances_split_thirty_companies_fairly_at_once_and_never_overlap() {
    let Some(db) = migrated() else { return };
    let clock = ManualClock::new(Millis(1_000_000));
    let list = companies(30);
    // Three instances start together: their rounds race on three threads, three times.
    let nodes: Vec<Node> = ["a", "b", "c"]
        .iter()
        .map(|n| node(&db, n, &clock))
        .collect();
    let mut nodes: Vec<Node> = std::thread::scope(|s| {
        let handles: Vec<_> = nodes
            .into_iter()
            .map(|mut n| {
                let list = list.clone();
                s.spawn(move || {
                    for _ in 0..3 {
                        n.round(&list);
                    }
                    n
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Rounds that see the final membership settle the split.
    for _ in 0..2 {
        for n in &mut nodes {
            n.round(&list);
        }
    }
    let refs: Vec<&Node> = nodes.iter().collect();
    let by = actors(&refs);
    assert_eq!(by.len(), 30, "every company served: {by:?}");
    for n in &nodes {
        let mine = n.keeper.serving().len();
        assert_eq!(mine, 10, "{} serves {mine}", n.keeper.me.name);
    }
    // The database agrees, and every take was journaled with its epoch.
    let mut s = db.connect();
    let rows = s
        .client()
        .query("SELECT holder, epoch FROM company_leases", &[])
        .unwrap();
    assert_eq!(rows.len(), 30);
    let takes: i64 = s
        .client()
        .query_one(
            "SELECT count(*) FROM job_events WHERE kind = 'lease_taken'",
            &[],
        )
        .unwrap()
        .get(0);
    let epochs: i64 = rows.iter().map(|r| r.get::<_, i64>(1)).sum();
    assert_eq!(takes, epochs, "one journal entry per epoch");
    // A company's fence holds for its holder at its epoch only.
    let holder = &nodes[0];
    let c = holder.keeper.serving()[0].clone();
    let epoch = holder.keeper.may_act(&c).unwrap();
    let mut tx = s.client().transaction().unwrap();
    let now = clock.now();
    assert!(fence(&mut tx, &c, "a", epoch, now).unwrap());
    assert!(!fence(&mut tx, &c, "a", epoch - 1, now).unwrap());
    assert!(!fence(&mut tx, &c, "b", epoch, now).unwrap());
    assert!(!fence(&mut tx, &c, "a", epoch, now.plus_secs(31)).unwrap());
    drop(tx);
    // The database records a step under the lease and refuses any other (SQLSTATE JM001), and
    // what it recorded stays as it was.
    let mut step = |holder: &str, epoch: i64, at: Millis| {
        s.client()
            .execute(
                "INSERT INTO fenced_steps (at, company_id, job_id, step, holder, epoch)
                 VALUES ($1, $2, 'job-1', 'report', $3, $4)",
                &[&at.0, &c, &holder, &epoch],
            )
            .map_err(|e| e.code().map(|c| c.code().to_owned()))
    };
    assert_eq!(step("a", epoch, now), Ok(1));
    for (holder, epoch, at) in [
        ("a", epoch - 1, now),
        ("b", epoch, now),
        ("a", epoch, now.plus_secs(31)),
    ] {
        assert_eq!(
            step(holder, epoch, at),
            Err(Some(jobmirror::store::pg::LEASE_LOST.to_owned())),
            "{holder} at epoch {epoch}"
        );
    }
    for change in [
        "UPDATE fenced_steps SET epoch = epoch + 1",
        "DELETE FROM fenced_steps",
    ] {
        let refused = s.client().execute(change, &[]).unwrap_err();
        let why = refused.as_db_error().map(|d| d.message().to_owned());
        assert!(
            why.as_deref().is_some_and(|w| w.contains("append-only")),
            "{refused:?}"
        );
    }
}

#[test]
fn a_dead_instance_loses_its_companies_after_the_lease_and_its_job_in_hand_moves_first() {
    let Some(db) = migrated() else { return };
    let clock = ManualClock::new(Millis(5_000_000));
    let list = companies(30);
    let mut a = node(&db, "a", &clock);
    let mut b = node(&db, "b", &clock);
    let mut c = node(&db, "c", &clock);
    for _ in 0..3 {
        for n in [&mut a, &mut b, &mut c] {
            n.round(&list);
        }
    }
    let a_had = a.keeper.serving();
    assert_eq!(a_had.len(), 10);
    let in_hand = a_had[7].clone();
    let old_epoch = a.keeper.may_act(&in_hand).unwrap();
    put_job_in_hand(&mut b.store, &in_hand, "job-1");
    // a dies (kill -9: no more rounds). Until its lease lapses nobody takes its companies.
    clock.advance(Duration::from_millis(LEASE_MS as u64 - 1_000));
    for n in [&mut b, &mut c] {
        n.round(&list);
        assert_eq!(
            n.keeper.serving().len(),
            10,
            "nothing moves while a's lease runs"
        );
    }
    clock.advance(Duration::from_millis(1_000));
    let took = b.round(&list).taken;
    // b takes 5 of a's 10 (up to its 15): the one with a job in hand among them, although
    // by name it is a's eighth.
    assert_eq!(took.len(), 5, "{took:?}");
    let moved = took.iter().find(|l| l.company_id == in_hand);
    assert!(
        moved.is_some_and(|l| l.epoch == old_epoch + 1),
        "the company with a job in hand is taken first, with a new epoch: {took:?}"
    );
    c.round(&list);
    b.round(&list);
    let by = actors(&[&b, &c]);
    assert_eq!(by.len(), 30, "a's companies continue on b and c");
    assert_eq!(b.keeper.serving().len(), 15);
    // The journal tells the story: released by expiry from a, taken by b.
    let j = journal(&mut b.store, &in_hand);
    let tail: Vec<&str> = j.iter().rev().take(2).map(|(k, _)| k.as_str()).collect();
    assert_eq!(tail, ["lease_taken", "lease_released"], "{j:?}");
    assert_eq!(j[j.len() - 2].1["expired"], true);
    assert_eq!(j[j.len() - 2].1["holder"], "a");
    assert_eq!(j[j.len() - 1].1["from"], "a");
    // The dead instance's old epoch is fenced out.
    let now = clock.now();
    let mut tx = b.store.client().transaction().unwrap();
    assert!(!fence(&mut tx, &in_hand, "a", old_epoch, now).unwrap());
    drop(tx);
    // `jobmirror instances` lists the three.
    let out = Command::new(BIN)
        .args(["instances", "--json"])
        .env_remove("JOBMIRROR_CONFIG")
        .env("JOBMIRROR_DB", &db.url)
        .env("JOBMIRROR_DB_PASSWORD_FILE", &db.password_file)
        .output()
        .unwrap();
    // The manual clock is far in the past of the database's: every instance looks lapsed.
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    let names: BTreeSet<&str> = v["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, BTreeSet::from(["a", "b", "c"]));
}

#[test]
fn a_paused_instance_acts_for_nothing_after_waking_and_takes_a_fair_share_again() {
    let Some(db) = migrated() else { return };
    let clock = ManualClock::new(Millis(9_000_000));
    let list = companies(30);
    let mut a = node(&db, "a", &clock);
    let mut b = node(&db, "b", &clock);
    let mut c = node(&db, "c", &clock);
    for _ in 0..3 {
        for n in [&mut a, &mut b, &mut c] {
            n.round(&list);
        }
    }
    let a_had = a.keeper.serving();
    // SIGSTOP: a runs no round for two leases while b and c go on.
    for _ in 0..6 {
        clock.advance(Duration::from_millis(LEASE_MS as u64 / 3));
        b.round(&list);
        c.round(&list);
        actors(&[&a, &b, &c]);
    }
    // Woken (SIGCONT), before its first round: it trusts none of its old leases.
    assert!(
        a.keeper.serving().is_empty(),
        "a paused instance acts for nothing"
    );
    for co in &a_had {
        assert_eq!(a.keeper.may_act(co), None);
    }
    assert_eq!(
        actors(&[&b, &c]).len(),
        30,
        "b and c took all of a's companies"
    );
    // Its first round finds them taken; a few rounds later the split is fair again.
    for _ in 0..3 {
        a.round(&list);
        actors(&[&a, &b, &c]);
        b.round(&list);
        actors(&[&a, &b, &c]);
        c.round(&list);
        actors(&[&a, &b, &c]);
    }
    for n in [&a, &b, &c] {
        assert_eq!(n.keeper.serving().len(), 10, "{}", n.keeper.me.name);
    }
}

#[test]
fn a_fourth_instance_gets_its_share_within_two_leases_without_moving_a_job_in_hand() {
    let Some(db) = migrated() else { return };
    let clock = ManualClock::new(Millis(20_000_000));
    let list = companies(30);
    let mut nodes: Vec<Node> = ["a", "b", "c"]
        .iter()
        .map(|n| node(&db, n, &clock))
        .collect();
    for _ in 0..3 {
        for n in &mut nodes {
            n.round(&list);
        }
    }
    // Every company of a has a job in hand: none of them may move while a lives.
    let a_had = nodes[0].keeper.serving();
    let mut admin = db.connect();
    for (i, co) in a_had.iter().enumerate() {
        put_job_in_hand(&mut admin, co, &format!("job-{i}"));
    }
    let joined_at = clock.now();
    nodes.push(node(&db, "d", &clock));
    let mut rounds = 0;
    while clock.now().0 - joined_at.0 <= 2 * LEASE_MS {
        for n in &mut nodes {
            n.round(&list);
        }
        rounds += 1;
        let refs: Vec<&Node> = nodes.iter().collect();
        actors(&refs);
        for co in &a_had {
            assert!(
                nodes[0].keeper.may_act(co).is_some(),
                "{co} moved with a job in hand"
            );
        }
        clock.advance(Duration::from_millis(LEASE_MS as u64 / 3));
    }
    let counts: Vec<usize> = nodes.iter().map(|n| n.keeper.serving().len()).collect();
    assert_eq!(counts.iter().sum::<usize>(), 30, "{counts:?}");
    // a's ten stay; b, c and d split the other twenty within one of each other.
    assert_eq!(counts[0], 10, "{counts:?}");
    assert!(
        counts[1..].iter().all(|&n| (6..=7).contains(&n)),
        "d got its share within two leases ({rounds} rounds): {counts:?}"
    );
    // a keeps its ten in hand; once their jobs finish, the split becomes 8/8/7/7.
    for i in 0..a_had.len() {
        finish_job(&mut admin, &format!("job-{i}"));
    }
    for _ in 0..3 {
        for n in &mut nodes {
            n.round(&list);
        }
    }
    let mut counts: Vec<usize> = nodes.iter().map(|n| n.keeper.serving().len()).collect();
    counts.sort_unstable();
    assert_eq!(counts, [7, 7, 8, 8]);
}

#[test]
fn a_graceful_stop_releases_every_lease_at_once_and_a_name_is_never_shared() {
    let Some(db) = migrated() else { return };
    let clock = ManualClock::new(Millis(30_000_000));
    let list = companies(6);
    let mut a = node(&db, "a", &clock);
    let mut b = node(&db, "b", &clock);
    for _ in 0..2 {
        a.round(&list);
        b.round(&list);
    }
    assert_eq!(a.keeper.serving().len(), 3);
    assert_eq!(a.keeper.stop(&mut a.store).unwrap(), 3);
    assert!(a.keeper.serving().is_empty());
    // No lease to wait for: b's next round takes all six at the same instant.
    assert_eq!(b.round(&list).held.len(), 6);

    // A second live process under b's name is refused (two processes never share a name)...
    let mut b2 = node(&db, "b", &clock);
    let e = b2.keeper.round(&mut b2.store, &list).unwrap_err();
    assert!(e.to_string().contains("is in use by pid"), "{e}");
    assert!(b2.keeper.serving().is_empty());
    // ...until b's heartbeat lapses (b killed): then it starts afresh, with new epochs.
    let old: BTreeMap<String, i64> = b
        .keeper
        .serving()
        .into_iter()
        .map(|c| {
            let e = b.keeper.may_act(&c).unwrap();
            (c, e)
        })
        .collect();
    clock.advance(Duration::from_millis(LEASE_MS as u64));
    let r = b2.round(&list);
    assert_eq!(r.held.len(), 6);
    for l in &r.held {
        assert!(l.epoch > old[&l.company_id], "{l:?} after {old:?}");
    }
    // The dead incarnation's fence fails although the name is the same.
    let now = clock.now();
    let mut tx = b2.store.client().transaction().unwrap();
    let (co, e) = old.iter().next().unwrap();
    assert!(!fence(&mut tx, co, "b", *e, now).unwrap());
}

/// A seeded walk over instance deaths, pauses, joins, graceful stops, the steps of jobs (claim,
/// handler run, item report, final event, each fenced) and the clock: after every step no
/// company is served by two instances, a holder's fence holds while it may act, epochs only
/// grow, and once the walk settles every company is served and the split is within one of
/// fair. Deaths, pauses and joins meet jobs at every step, and jobs are continued by another
/// instance after every step.
#[test]
fn seeded_walks_over_deaths_pauses_and_joins_keep_one_holder_per_company() {
    let Some(db) = migrated() else { return };
    let seeds: u64 = std::env::var("JOBMIRROR_LEASE_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    let mut all = Coverage::default();
    for seed in 0..seeds {
        let c = walk(&db, seed);
        for k in 0..4 {
            for s in 0..3 {
                all.events[k][s] += c.events[k][s];
            }
        }
        for s in 0..3 {
            all.handovers[s] += c.handovers[s];
        }
    }
    // Every kind of event met jobs at every step they can be left at (claimed, handler run,
    // items reported), and jobs were continued by another instance after each of them.
    eprintln!(
        "{seeds} seeds; jobs in hand after their claim / handler run / item report when an \
         instance died {:?}, paused {:?}, joined {:?}, stopped {:?}; continued by another \
         instance after each {:?}",
        all.events[0], all.events[1], all.events[2], all.events[3], all.handovers
    );
    for (kind, row) in ["died", "paused", "joined"].iter().zip(&all.events) {
        assert!(
            row.iter().all(|n| *n > 0),
            "no instance {kind} at some step: {row:?}"
        );
    }
    assert!(
        all.handovers.iter().all(|n| *n > 0),
        "no handover after some step: {:?}",
        all.handovers
    );
}

/// What a walk drew: `events[kind][step]`, how many jobs were in hand at `step` (0: claimed,
/// 1: handler run, 2: items reported) when an instance died (kind 0), paused (1), joined (2)
/// or stopped (3), counting the jobs of the instance's companies (of every company for a join);
/// `handovers[step]`, how many jobs another instance continued after `step`.
#[derive(Default)]
struct Coverage {
    events: [[u64; 3]; 4],
    handovers: [u64; 3],
}

/// The step each of `companies`' current job in hand is at (none when its last job finished).
fn in_hand(admin: &mut PgStore, seed: u64, companies: &[String]) -> Vec<usize> {
    companies
        .iter()
        .filter_map(|c| {
            let last: Option<i64> = admin
                .client()
                .query_opt(
                    "SELECT step FROM walk_steps WHERE company = $1
                      ORDER BY job_no DESC, step DESC LIMIT 1",
                    &[&format!("s{seed}-{c}")],
                )
                .unwrap()
                .map(|r| r.get(0));
            last.filter(|s| *s < 3).map(|s| s as usize)
        })
        .collect()
}

fn walk(db: &TestDb, seed: u64) -> Coverage {
    let mut admin = db.connect();
    admin
        .client()
        .batch_execute(
            "UPDATE company_leases SET holder = NULL, changed_at = 0; DELETE FROM job_items; \
             DELETE FROM export_jobs; CREATE TABLE IF NOT EXISTS walk_steps (company text, \
             job_no bigint, step bigint, instance text, epoch bigint, \
             PRIMARY KEY (company, job_no, step))",
        )
        .unwrap();
    let clock = ManualClock::new(Millis(100_000_000 * (seed as i64 + 1)));
    let list = companies(24);
    let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    // (node, alive, paused)
    let mut nodes: Vec<(Node, bool, bool)> = Vec::new();
    let mut joined = 0;
    let mut epochs: BTreeMap<String, i64> = BTreeMap::new();
    let mut steps = 0;
    let mut cov = Coverage::default();
    let mut met = |admin: &mut PgStore, kind: usize, companies: &[String]| {
        for s in in_hand(admin, seed, companies) {
            cov.events[kind][s] += 1;
        }
    };
    for step in 0..200 {
        match next(10) {
            0 if nodes.iter().filter(|n| n.1).count() < 5 => {
                met(&mut admin, 2, &list);
                joined += 1;
                nodes.push((node(db, &format!("s{seed}-n{joined}"), &clock), true, false));
            }
            1 => {
                // kill -9 or a lost machine: never runs again.
                if let Some(n) = nodes.iter_mut().filter(|n| n.1).nth(next(5) as usize) {
                    met(&mut admin, 0, &n.0.keeper.serving());
                    n.1 = false;
                }
            }
            2 => {
                if let Some(n) = nodes.iter_mut().filter(|n| n.1).nth(next(5) as usize) {
                    if !n.2 {
                        met(&mut admin, 1, &n.0.keeper.serving());
                    }
                    n.2 = !n.2;
                }
            }
            3 => {
                if let Some(n) = nodes
                    .iter_mut()
                    .filter(|n| n.1 && !n.2)
                    .nth(next(5) as usize)
                {
                    met(&mut admin, 3, &n.0.keeper.serving());
                    n.0.keeper.stop(&mut n.0.store).unwrap();
                    n.1 = false;
                }
            }
            4..=6 => {
                // A holder does the next step of one of its companies' job (claim, handler
                // run, item report, final event), each under its fence, in one transaction.
                let pick = next(24) as usize;
                let awake = nodes.iter().filter(|n| n.1 && !n.2).count().max(1) as u64;
                if let Some(n) = nodes
                    .iter_mut()
                    .filter(|n| n.1 && !n.2)
                    .nth(next(awake) as usize)
                {
                    let serving = n.0.keeper.serving();
                    if !serving.is_empty() {
                        let co = serving[pick % serving.len()].clone();
                        let e = n.0.keeper.may_act(&co).unwrap();
                        let name = n.0.keeper.me.name.clone();
                        job_step(&mut n.0.store, seed, &co, &name, e, clock.now(), step);
                        steps += 1;
                    }
                }
            }
            _ => clock.advance(Duration::from_millis(next(LEASE_MS as u64 / 2))),
        }
        for n in nodes.iter_mut().filter(|n| n.1 && !n.2) {
            let _ = n.0.keeper.round(&mut n.0.store, &list);
        }
        let refs: Vec<&Node> = nodes.iter().map(|n| &n.0).collect();
        actors(&refs);
        for r in admin
            .client()
            .query("SELECT company_id, epoch FROM company_leases", &[])
            .unwrap()
        {
            let (c, e): (String, i64) = (r.get(0), r.get(1));
            let was = epochs.insert(c.clone(), e).unwrap_or(0);
            assert!(
                e >= was,
                "seed {seed} step {step}: {c}'s epoch went from {was} to {e}"
            );
        }
    }
    // Settle: everyone still alive wakes up, jobs finish, rounds run for two leases.
    for n in nodes.iter_mut() {
        n.2 = false;
    }
    if !nodes.iter().any(|n| n.1) {
        nodes.push((node(db, &format!("s{seed}-last"), &clock), true, false));
    }
    finish_all(&mut admin);
    for _ in 0..7 {
        clock.advance(Duration::from_millis(LEASE_MS as u64 / 3));
        for n in nodes.iter_mut().filter(|n| n.1) {
            n.0.round(&list);
        }
    }
    let live: Vec<&Node> = nodes.iter().filter(|n| n.1).map(|n| &n.0).collect();
    let by = actors(&live);
    assert_eq!(
        by.len(),
        list.len(),
        "seed {seed}: every company served at the end"
    );
    let fair = list.len() as f64 / live.len() as f64;
    for n in &live {
        let mine = n.keeper.serving().len() as f64;
        assert!(
            (mine - fair).abs() < 1.0,
            "seed {seed}: {} serves {mine} of fair {fair}",
            n.keeper.me.name
        );
    }
    for n in nodes.iter_mut().filter(|n| n.1) {
        n.0.keeper.stop(&mut n.0.store).unwrap();
    }
    // Every job's steps are contiguous from its claim, each done once (the key), and a job
    // that changed hands went on at a newer epoch, never back to an older one.
    let rows = admin
        .client()
        .query(
            "SELECT company, job_no, step, epoch, instance FROM walk_steps
              WHERE company LIKE $1 ORDER BY company, job_no, step",
            &[&format!("s{seed}-%")],
        )
        .unwrap();
    let mut last: Option<(String, i64, i64, i64)> = None;
    let mut by: Option<String> = None;
    for r in &rows {
        let cur: (String, i64, i64, i64) = (r.get(0), r.get(1), r.get(2), r.get(3));
        let instance: String = r.get(4);
        match &last {
            Some((c, j, st, e)) if *c == cur.0 && *j == cur.1 => {
                assert_eq!(cur.2, st + 1, "seed {seed}: {cur:?} after step {st}");
                if by.as_deref() != Some(instance.as_str()) {
                    cov.handovers[*st as usize] += 1;
                }
                assert!(
                    cur.3 >= *e,
                    "seed {seed}: {cur:?} at an older epoch than {e}"
                );
            }
            _ => assert_eq!(
                cur.2, 0,
                "seed {seed}: {cur:?} does not start with its claim"
            ),
        }
        last = Some(cur);
        by = Some(instance);
    }
    assert!(
        steps > 0 && !rows.is_empty(),
        "seed {seed}: no job step was done"
    );
    let moved: i64 = admin
        .client()
        .query_one(
            "SELECT count(*) FROM (SELECT company, job_no FROM walk_steps WHERE company LIKE $1
              GROUP BY company, job_no HAVING count(DISTINCT instance) > 1) m",
            &[&format!("s{seed}-%")],
        )
        .unwrap()
        .get(0);
    eprintln!(
        "seed {seed}: {} job steps, {moved} jobs continued by another instance mid-way",
        rows.len()
    );
    cov
}

/// The next step of `company`'s current job, done by `holder` at `epoch`: fenced in the
/// transaction that records it. Step 0 (the claim) takes the job in hand; step 3 (the final
/// event) finishes it.
fn job_step(
    store: &mut PgStore,
    seed: u64,
    company: &str,
    holder: &str,
    epoch: i64,
    now: Millis,
    at: usize,
) {
    let key = format!("s{seed}-{company}");
    let mut tx = store.client().transaction().unwrap();
    assert!(
        fence(&mut tx, company, holder, epoch, now).unwrap(),
        "walk step {at}: {holder} trusts its lease on {company} but the database disagrees"
    );
    let last = tx
        .query_opt(
            "SELECT job_no, step FROM walk_steps WHERE company = $1
              ORDER BY job_no DESC, step DESC LIMIT 1",
            &[&key],
        )
        .unwrap()
        .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)));
    let (job, step) = match last {
        None => (1, 0),
        Some((j, 3)) => (j + 1, 0),
        Some((j, s)) => (j, s + 1),
    };
    tx.execute(
        "INSERT INTO walk_steps (company, job_no, step, instance, epoch) VALUES ($1, $2, $3, $4, $5)",
        &[&key, &job, &step, &holder, &epoch],
    )
    .unwrap();
    let id = format!("{key}-{job}");
    // Recorded as the service records its steps: the database's own fence takes it.
    let name = ["claim", "run", "report", "finish"][step as usize];
    tx.execute(
        "INSERT INTO fenced_steps (at, company_id, job_id, step, holder, epoch)
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[&now.0, &company, &id, &name, &holder, &epoch],
    )
    .unwrap();
    match step {
        0 => {
            tx.execute(
                "INSERT INTO export_jobs (id, company_id, status, created_at, expires_in, expires_at,
                     number_of_items, raw_json, first_seen_at, last_seen_at, proc_state, proc_state_at)
                 VALUES ($1, $2, 'in_progress', 0, 3600, 3600000, 1, '{}', 0, 0, 'processing', 0)",
                &[&id, &company],
            )
            .unwrap();
        }
        3 => {
            tx.execute(
                "UPDATE export_jobs SET proc_state = 'done', status = 'completed' WHERE id = $1",
                &[&id],
            )
            .unwrap();
        }
        _ => {}
    }
    tx.commit().unwrap();
}

fn finish_all(admin: &mut PgStore) {
    admin
        .client()
        .execute(
            "UPDATE export_jobs SET proc_state = 'done' WHERE proc_state = 'processing'",
            &[],
        )
        .unwrap();
}

#[test]
fn a_target_shows_no_password() {
    let t = PgTarget::parse(
        "postgresql://jm@db.example:5433/jobs",
        Some(jobmirror::wire::Secret::new(PASSWORD)),
    )
    .unwrap();
    assert_eq!(t.to_string(), "postgresql://jm@db.example:5433/jobs");
    assert!(!format!("{t:?}").contains(PASSWORD));
    assert!(PgTarget::parse("postgresql://jm@db.example/", None).is_err());
}

/// `jobmirror instances` on the database's own clock: the alive instance with its leases, and
/// exit 1 naming the companies nobody holds once it stops.
#[test]
fn instances_shows_heartbeats_and_leases_and_fails_on_a_company_without_a_holder() {
    let Some(db) = migrated() else { return };
    let list = companies(4);
    let mut keeper = LeaseKeeper::new(
        Instance::this_process(Some("edge-1"), Millis(0)),
        LEASE_MS,
        LeaseClock::Database,
        jobmirror::store::pg::keeper::system_mono(),
    );
    let mut store = db.connect();
    keeper.round(&mut store, &list).unwrap();
    assert_eq!(keeper.serving(), list);
    let instances = || {
        let out = Command::new(BIN)
            .arg("instances")
            .env_remove("JOBMIRROR_CONFIG")
            .env("JOBMIRROR_DB", &db.url)
            .env("JOBMIRROR_DB_PASSWORD_FILE", &db.password_file)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };
    let (code, text) = instances();
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("edge-1"), "{text}");
    assert!(text.contains("alive"), "{text}");
    assert!(text.contains("4 leases"), "{text}");
    assert!(
        text.contains("companies no live instance holds: 0"),
        "{text}"
    );
    keeper.stop(&mut store).unwrap();
    let (code, text) = instances();
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("stopped"), "{text}");
    assert!(
        text.contains("companies no live instance holds: 4"),
        "{text}"
    );
    assert!(text.contains("co-03"), "{text}");
    assert!(text.contains("4 companies have no live holder"), "{text}");
}

/// docs/database.md's psql block, as printed (with this test's URL), against a migrated
/// database with instances and leases in it.
#[test]
fn the_psql_audit_block_runs_as_printed() {
    let Some(db) = migrated() else { return };
    if Command::new("psql").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("JOBMIRROR_REQUIRE_POSTGRES").is_none(),
            "psql is not installed and JOBMIRROR_REQUIRE_POSTGRES is set"
        );
        return;
    }
    let clock = ManualClock::new(Millis(1_000));
    let mut a = node(&db, "a", &clock);
    a.round(&companies(3));
    let page = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/database.md"),
    )
    .unwrap();
    let block: String = page
        .split("## Auditing with psql")
        .nth(1)
        .and_then(|s| s.split("```sh\n").nth(1))
        .and_then(|s| s.split("```").next())
        .unwrap()
        .to_owned();
    assert!(
        block.lines().filter(|l| l.starts_with("psql ")).count() >= 8,
        "{block}"
    );
    let script = block
        .replace(
            "DB=postgresql://jobmirror@db.internal:5432/jobmirror",
            &format!("DB={}", db.url),
        )
        .replace("'CO-ID'", "'co-00'");
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .env("PGPASSWORD", PASSWORD)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("lease_taken"), "{text}");
    assert!(text.contains("(3 rows)"), "the three leases: {text}");
}

/// docs/several-machines.md's configuration, as printed but for the database's address and
/// password file: `migrate`, `instances` and `status` take it from the file.
#[test]
fn the_several_machines_configuration_works_as_printed() {
    let Some(db) = database() else { return };
    let page = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/several-machines.md"),
    )
    .unwrap();
    let block = page
        .split("## PostgreSQL with several instances")
        .nth(1)
        .and_then(|s| s.split("```toml\n").nth(1))
        .and_then(|s| s.split("```").next())
        .expect("a toml block in the PostgreSQL section");
    let (printed_url, printed_pw) = (
        "postgresql://jobmirror@db.internal:5432/jobmirror",
        "/etc/jobmirror/db-password",
    );
    assert!(
        block.contains(printed_url) && block.contains(printed_pw),
        "{block}"
    );
    let file = block
        .replace(printed_url, &db.url)
        .replace(printed_pw, &db.password_file.display().to_string());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("jobmirror.toml");
    std::fs::write(&config, file).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&config)
            .current_dir(dir.path())
            .env_remove("JOBMIRROR_CONFIG")
            .env_remove("JOBMIRROR_DB")
            .env_remove("PGPASSWORD")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!text.contains(PASSWORD), "the password was printed: {text}");
        (out.status.code(), text)
    };
    let (code, text) = run(&["migrate"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains(&db.url), "{text}");
    let (code, text) = run(&["instances"]);
    assert_eq!(code, Some(0), "{text}");
    let (code, text) = run(&["status"]);
    assert_eq!(code, Some(0), "{text}");
    // Nothing was made in the working directory (no SQLite file named after anything).
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}
