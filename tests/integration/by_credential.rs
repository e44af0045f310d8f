//! Listing by credential (opt-in): the companies sharing the default credential are listed
//! with one paginated listing that names no company; each gets its own jobs from it.

use jobmirror::service::sync::PassKind;

use crate::harness::World;

fn company(i: usize) -> String {
    format!("{i:08x}-0000-4000-8000-0000000000cc")
}

fn listings(w: &World) -> Vec<String> {
    w.fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path == "/v3/export-jobs")
        .map(|r| r.query)
        .collect()
}

fn stored(w: &World, company: &str) -> Vec<String> {
    let st = w.store();
    let mut q = st
        .conn()
        .prepare("SELECT id FROM export_jobs WHERE company_id = ?1 ORDER BY id")
        .unwrap();
    q.query_map([company], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[test]
fn fifty_companies_sharing_a_key_are_listed_in_pages_of_100_not_one_by_one() {
    let w = World::new();
    let companies: Vec<String> = (0..50).map(company).collect();
    // 150 pending jobs over 50 companies (3 each), an in_progress one (recovery lists it), and
    // a job of a company this service does not serve.
    for (i, c) in companies.iter().enumerate() {
        for k in 0..3 {
            w.pending(c, &format!("j-{i:02}-{k}"), 3000 - (i * 3 + k) as i64);
        }
    }
    w.fake
        .add_job(jobmirror::sandbox::JobSpec {
            id: Some("held-elsewhere".into()),
            company_id: companies[7].clone(),
            status: "in_progress".into(),
            created_secs_ago: Some(3500),
            items: Some(1),
            ..Default::default()
        })
        .unwrap();
    w.pending(&company(999), "not-ours", 100);
    let names: Vec<&str> = companies.iter().map(String::as_str).collect();
    let mut m = w.mirror(&names).with_listing_by_credential(true);
    let report = m.pass(PassKind::Recovery);
    assert!(report.failed_companies.is_empty(), "{report:?}");
    assert_eq!(report.passes, 50, "every company had its pass");
    assert_eq!(
        report.counts.new,
        151,
        "{:?} {:?}",
        report.counts,
        stored(&w, &companies[7])
    );
    // 152 jobs at Pleo in that credential's view, no company named: the one `in_progress` job
    // in a listing of its own (one page: a complete observation), then two pages of `pending`.
    let first = listings(&w);
    assert_eq!(first.len(), 3, "{first:?}");
    assert!(first.iter().all(|q| !q.contains("company_id")), "{first:?}");
    assert!(first[0].contains("statuses=in_progress") && !first[0].contains("pending"));
    assert!(first[1].contains("statuses=pending") && !first[1].contains("in_progress"));
    for (i, c) in companies.iter().enumerate() {
        let mut want: Vec<String> = (0..3).map(|k| format!("j-{i:02}-{k}")).collect();
        if i == 7 {
            want.push("held-elsewhere".into());
        }
        want.sort();
        assert_eq!(stored(&w, c), want, "company {c}");
    }
    assert!(stored(&w, &company(999)).is_empty(), "not served: ignored");
    // Each company's pass is on record as its own: 50 recovery rows, one with the pages.
    let st = w.store();
    let (rows, pages): (i64, i64) = st
        .conn()
        .query_row(
            "SELECT count(*), sum(pages) FROM sync_runs WHERE kind = 'recovery'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((rows, pages), (50, 3));

    // A poll lists `pending` only, again once for all of them.
    w.pending(&companies[33], "j-new", 10);
    let report = m.pass(PassKind::Poll);
    assert_eq!(report.counts.new, 1);
    let polls = listings(&w);
    assert_eq!(polls.len(), 5, "two more pages: {polls:?}");
    assert!(polls[3].contains("statuses=pending") && !polls[3].contains("in_progress"));
    assert!(stored(&w, &companies[33]).contains(&"j-new".to_owned()));

    // One company named alone (a webhook's detection) is listed by itself.
    m.pass_companies(PassKind::Poll, std::slice::from_ref(&companies[5]));
    let last = listings(&w).pop().unwrap();
    assert!(
        last.contains(&format!("company_id={}", companies[5])),
        "{last}"
    );
}

#[test]
fn off_by_default_and_a_company_with_its_own_key_is_listed_by_itself() {
    let w = World::new();
    let (a, b, c) = (company(1), company(2), company(3));
    for x in [&a, &b, &c] {
        w.pending(x, &format!("job-{x}"), 100);
    }
    // Off: one listing per company.
    w.mirror(&[&a, &b, &c]).pass(PassKind::Recovery);
    let off = listings(&w);
    assert_eq!(off.len(), 3);
    assert!(off.iter().all(|q| q.contains("company_id=")));
    // On, with c on a key of its own: a and b together, c alone with its key.
    w.fake.add_company_key("key-c", &c);
    let mut by_company = std::collections::HashMap::new();
    let mut cfg = w.client_config();
    cfg.auth = jobmirror::pleo::Auth::ApiKey(jobmirror::pleo::Secret::new("key-c"));
    by_company.insert(
        c.clone(),
        std::sync::Arc::new(jobmirror::pleo::PleoClient::new(cfg, w.shared_clock()).unwrap()),
    );
    let clients = jobmirror::pleo::Clients::new(w.client(), by_company);
    let mut m = jobmirror::service::sync::Mirror::new(
        w.store(),
        clients,
        w.shared_clock(),
        vec![a.clone(), b.clone(), c.clone()],
    )
    .with_listing_by_credential(true);
    assert_eq!(
        m.poll_keys(),
        [
            c.clone(),
            jobmirror::service::sync::pass::GROUP_KEY.to_owned()
        ]
    );
    let report = m.pass(PassKind::Poll);
    assert!(report.failed_companies.is_empty(), "{report:?}");
    // Not recovered yet: the group's recovery (its `in_progress` jobs, then its `pending` ones,
    // each one page) and c alone.
    let on = &listings(&w)[3..];
    assert_eq!(on.len(), 3, "{on:?}");
    assert_eq!(on.iter().filter(|q| !q.contains("company_id")).count(), 2);
    assert!(on.iter().any(|q| q.contains(&format!("company_id={c}"))));
}

#[test]
fn a_key_that_belongs_to_one_company_lists_only_that_companys_jobs_at_the_fake() {
    let w = World::new();
    let (a, b) = (company(1), company(2));
    w.pending(&a, "ja", 100);
    w.pending(&b, "jb", 100);
    w.fake.add_company_key("key-a", &a);
    let mut cfg = w.client_config();
    cfg.auth = jobmirror::pleo::Auth::ApiKey(jobmirror::pleo::Secret::new("key-a"));
    let client = jobmirror::pleo::PleoClient::new(cfg, w.shared_clock()).unwrap();
    let l = client.list_jobs_by_credential(&["pending"]).unwrap();
    let ids: Vec<&str> = l.jobs.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids, ["ja"]);
    let all = w.client().list_jobs_by_credential(&["pending"]).unwrap();
    assert_eq!(all.jobs.len(), 2, "the default key sees both");
}
