//! The replay's invariants, checked after every step: ours (the mirror's states, what was
//! sent) and those judged on the fake's world at each claim (readiness, oldest first, one in
//! progress per company, resume before claim, nothing abandoned, nothing left to expire).

use super::*;

impl Replay {
    /// Violations found so far.
    pub fn violations(&self) -> Vec<String> {
        self.violations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records a violation once (a state checked after every step would repeat it).
    pub(super) fn violate(&self, v: String) {
        let mut all = self.violations.lock().unwrap_or_else(|p| p.into_inner());
        if !all.contains(&v) {
            all.push(v);
        }
    }

    /// Checks each `started` at the moment it reaches Pleo, against the database as it is then.
    pub(super) fn install_claim_check(&self) -> anyhow::Result<()> {
        let reader = Mutex::new(Store::open_read_only(&self.opts.db)?);
        let clock = self.clock.clone();
        let min_left = self.cfg.claim_min_left.as_millis() as i64;
        let violations = self.violations.clone();
        let down = self.accounting_down.clone();
        let configured: HashSet<String> = self.base_cfg.company_ids.iter().cloned().collect();
        self.fake.on_api_claim(Box::new(move |c: &ClaimRecord| {
            let mut found = Vec::new();
            if down.load(std::sync::atomic::Ordering::SeqCst) {
                found.push(format!(
                    "`started` sent for job {} while the readiness check fails",
                    c.job_id
                ));
            }
            if c.prior_status == "in_progress" && c.prior_holder != Some(Claimant::OtherAfterGet) {
                found.push(format!(
                    "`started` sent for job {} which was already in_progress (held by {})",
                    c.job_id,
                    c.prior_holder
                        .map_or("an unknown holder, e.g. us before a restart".into(), |h| {
                            format!("{h:?}")
                        })
                ));
            }
            let store = reader.lock().unwrap_or_else(|p| p.into_inner());
            // No claim once a pause or a removal of the company is committed.
            let last_change: rusqlite::Result<(String, Option<String>)> = store.conn().query_row(
                "SELECT j.company_id, (SELECT e.kind FROM job_events e WHERE e.company_id = j.company_id \
                 AND e.job_id IS NULL AND e.kind IN ('company_added', 'company_removed', 'company_paused', \
                 'company_resumed') ORDER BY e.seq DESC LIMIT 1) FROM export_jobs j WHERE j.id = ?1",
                [&c.job_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            );
            if let Ok((company, Some(kind))) = last_change
                && (kind == "company_paused"
                    || (kind == "company_removed" && !configured.contains(&company)))
            {
                found.push(format!(
                    "claimed job {} of company {company} after its {} was committed",
                    c.job_id,
                    kind.trim_start_matches("company_")
                ));
            }
            let older: rusqlite::Result<Vec<String>> = store
                .conn()
                .prepare(
                    "SELECT o.id FROM export_jobs j JOIN export_jobs o ON o.company_id = j.company_id \
                     WHERE j.id = ?1 AND o.status = 'pending' AND o.proc_state = 'new' \
                     AND (o.created_at, o.created_at_sub_ns, o.id) < (j.created_at, j.created_at_sub_ns, j.id) \
                     AND o.expires_at > ?2",
                )
                .and_then(|mut s| {
                    s.query_map(
                        rusqlite::params![c.job_id, clock.now().0.saturating_add(min_left)],
                        |r| r.get(0),
                    )?
                    .collect()
                });
            match older {
                Ok(ids) if !ids.is_empty() => found.push(format!(
                    "claimed job {} while older eligible jobs of its company waited: {}",
                    c.job_id,
                    ids.join(", ")
                )),
                Ok(_) => {}
                Err(e) => found.push(format!("cannot read the database at a claim: {e}")),
            }
            let active: rusqlite::Result<i64> = store.conn().query_row(
                "SELECT count(*) FROM export_jobs a JOIN export_jobs j ON a.company_id = j.company_id \
                 WHERE j.id = ?1 AND a.id <> j.id AND a.proc_state IN ('resume', 'claimed', 'processing')",
                [&c.job_id],
                |r| r.get(0),
            );
            if let Ok(n) = active
                && n > 0
            {
                found.push(format!(
                    "claimed job {} while another job of its company was in hand",
                    c.job_id
                ));
            }
            if !found.is_empty() {
                violations
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(found);
            }
        }));
        Ok(())
    }

    /// After every step: acknowledged webhooks stored, items reported once, `started` reaching
    /// Pleo at most once per job, at most one job in hand per company.
    pub(super) fn check_step(&mut self) {
        let store = match Store::open_read_only(&self.opts.db) {
            Ok(s) => s,
            Err(e) => {
                if self.summary.steps > 1 || self.running.is_some() {
                    self.violate(format!("cannot open the database: {e}"));
                }
                return;
            }
        };
        for id in &self.acked[self.acked_checked..] {
            let stored: rusqlite::Result<i64> = store.conn().query_row(
                "SELECT count(*) FROM webhook_deliveries WHERE webhook_id = ?1",
                [id],
                |r| r.get(0),
            );
            if !matches!(stored, Ok(1)) {
                self.violate(format!(
                    "webhook {id} was acknowledged but is not stored ({stored:?})"
                ));
            }
        }
        self.acked_checked = self.acked.len();
        // Only the requests since the last step (the log only grows).
        let requests = self.fake.requests_since(self.requests_checked);
        self.note_lost_refreshes(&requests);
        let claims = self.fake.claims();
        let holder_at = |job: &str, seq: u64| {
            claims
                .iter()
                .rfind(|c| c.accepted && c.job_id == job && c.after_requests < seq)
                .map(|c| c.by)
        };
        for r in &requests {
            // Status 0: dropped unapplied; 429 and 5xx from a fault: refused unapplied; a 4xx
            // (a refused credential, a 422): refused, nothing applied.
            let applied = r.status != 0
                && !(400..500).contains(&r.status)
                && !matches!(
                    r.fault.as_deref(),
                    Some(f) if f.starts_with("TooManyRequests") || f.starts_with("ServerError")
                );
            if !applied {
                continue;
            }
            let acted_on = if r.method == "PUT" && r.path.ends_with("/items") {
                Some(
                    r.path
                        .trim_start_matches("/v3/export-jobs/")
                        .trim_end_matches("/items")
                        .to_owned(),
                )
            } else if r.method == "POST" && r.path == "/v3/export-job-events" {
                let v: Value = serde_json::from_str(&r.body).unwrap_or_default();
                (v["event"] != "started").then(|| v["jobId"].as_str().unwrap_or("").to_owned())
            } else {
                None
            };
            if let Some(job) = &acted_on
                && let Some(h @ (Claimant::Other | Claimant::OtherAfterGet)) = holder_at(job, r.seq)
            {
                // The one case jobmirror cannot tell apart: the answer to its `started` was
                // lost and Pleo then showed the job in_progress (its data names no holder).
                // The other: `failed` sent from pending (a readiness check that kept failing)
                // right after a read, when someone claimed the job in between; `pending ->
                // failed` is no lock, as `started` is (docs/contract.md).
                let lost_answer = store.events(Some(job)).is_ok_and(|evs| {
                    evs.iter().any(|e| {
                        (e.kind == "claim_failed" && e.detail["outcome"] == "unknown")
                            || (e.kind == "finish_sent" && e.detail["from"] == "pending")
                    })
                });
                if lost_answer {
                    if !self.summary.ambiguous.contains(job) {
                        self.summary.ambiguous.push(job.clone());
                    }
                } else {
                    self.violate(format!(
                        "{} {} (request {}) acted on job {job}, which another integration holds ({h:?})",
                        r.method, r.path, r.seq
                    ));
                }
            }
            if r.method == "PUT" && r.path.ends_with("/items") {
                let job = acted_on.clone().unwrap_or_default();
                let updates: Vec<Value> = serde_json::from_str(&r.body).unwrap_or_default();
                for u in updates.iter().filter(|u| u["status"] == "successful") {
                    let entry = u["accountingEntryId"].as_str().unwrap_or("").to_owned();
                    let n = self
                        .reported
                        .entry((job.clone(), entry.clone()))
                        .or_insert(0);
                    *n += 1;
                    if *n == 2 {
                        self.violations
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(format!(
                                "item {entry} of job {job} was reported successful twice"
                            ));
                    }
                }
            }
            if r.method == "POST" && r.path == "/v3/export-job-events" {
                let v: Value = serde_json::from_str(&r.body).unwrap_or_default();
                if v["event"] == "started" {
                    let job = v["jobId"].as_str().unwrap_or("").to_owned();
                    let n = self.started_seen.entry(job.clone()).or_insert(0);
                    *n += 1;
                    if *n == 2 {
                        self.violations
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(format!("`started` reached Pleo twice for job {job}"));
                    }
                }
            }
        }
        self.requests_checked += requests.len();
        self.check_claims_against_pleo(&claims);
        self.check_nothing_left_to_expire(&store, &requests, &claims);
        self.check_nothing_abandoned(&store);
        self.check_seams(&store, &claims, &requests);
        let doubled: rusqlite::Result<Vec<String>> = store
            .conn()
            .prepare(
                "SELECT company_id FROM export_jobs WHERE proc_state IN ('resume', 'claiming', 'claimed', 'processing') \
                 GROUP BY company_id HAVING count(*) > 1",
            )
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect());
        if let Ok(companies) = doubled {
            for c in companies {
                self.violate(format!("company {c} has more than one job in hand"));
            }
        }
    }

    /// Our new claims, judged on Pleo's side (the fake's world at the moment of each claim),
    /// not on what our database believed: no younger job started while an older one was
    /// pending, listed to us and claimable; no job started while another of the company was
    /// ours in progress, or was found in progress by a recovery pass and waited to be resumed.
    pub(super) fn check_claims_against_pleo(&mut self, claims: &[ClaimRecord]) {
        let new: Vec<&ClaimRecord> = claims[self.claims_checked.min(claims.len())..]
            .iter()
            .filter(|c| c.by == Claimant::Api && c.accepted)
            .collect();
        self.claims_checked = claims.len();
        if new.is_empty() {
            return;
        }
        let company_of: HashMap<String, String> = self
            .fake
            .jobs()
            .into_iter()
            .map(|j| (j.id, j.company_id))
            .collect();
        let log = self.fake.requests();
        // Claimable: time left for a `started` to land (of the order of one request), not
        // our own `claim_min_left` (a claim refreshes the deadline).
        let min_left = self.cfg.pleo_request_timeout.as_millis() as i64;
        // The rule holds with the default settings: only an explicit opt-out lifts it.
        let resume_unknown = self.cfg.resume_unknown_in_progress;
        let mut found = Vec::new();
        for c in new {
            let company = company_of.get(&c.job_id).cloned().unwrap_or_default();
            let key = format!("company_id={company}");
            // Listings of the company that Pleo answered before this claim.
            let listed_at: Vec<Millis> = log
                .iter()
                .filter(|r| {
                    r.seq < c.after_requests
                        && r.method == "GET"
                        && r.path == "/v3/export-jobs"
                        && r.status == 200
                        && r.fault.is_none()
                        && r.query.split('&').any(|kv| kv == key)
                })
                .map(|r| r.at)
                .collect();
            for (older, created, expires) in &c.older_pending {
                // jobmirror had its chance: a listing of the company after the older job was
                // created, or a webhook for the company (a trigger of that listing).
                let listed = listed_at.iter().any(|t| t >= created);
                let announced = self
                    .acked_companies
                    .iter()
                    .any(|(t, co)| *co == company && t >= created && *t <= c.at);
                if (listed || announced) && c.at.until(*expires) > min_left {
                    found.push(format!(
                        "started job {} while the older job {older} of its company was pending at Pleo and claimable ({})",
                        c.job_id,
                        if listed { "listed to us" } else { "a webhook for the company had arrived" }
                    ));
                }
            }
            for (other, holder) in &c.in_progress {
                match holder {
                    Some(Claimant::Api) => found.push(format!(
                        "started job {} while job {other} of its company was ours in progress: two at once",
                        c.job_id
                    )),
                    None if resume_unknown => found.push(format!(
                        "started job {} while job {other} of its company, found in_progress (an interrupted workflow of ours), was not resumed first",
                        c.job_id
                    )),
                    _ => {}
                }
            }
        }
        for v in found {
            self.violate(v);
        }
    }

    /// No job expires at Pleo after it was eligible and claimable for longer than a claim
    /// takes. Judged conservatively, on Pleo's side, from what was true at every step: the
    /// job was pending and its company's oldest pending job; no job of the company was
    /// `in_progress`; the service ran, had listed the company (or stored a webhook naming it)
    /// since the job appeared and since it started; the readiness check passed (and had
    /// passed for one retry interval after an outage); the API answered without faults; a lane
    /// was free. Our own settings (e.g. `claim_min_left_secs`) do not excuse an expiry: the
    /// allowance is two request timeouts and a minute.
    pub(super) fn check_nothing_left_to_expire(
        &mut self,
        store: &Store,
        requests: &[LoggedRequest],
        claims: &[ClaimRecord],
    ) {
        let now = self.base.now();
        let answerable = self.answerable();
        let w = &mut self.expiry_watch;
        let mut clean = true;
        for r in requests {
            let faulty = r.fault.is_some() || r.status == 0 || r.status == 429 || r.status >= 500;
            clean &= !faulty;
            if r.method == "GET"
                && r.path == "/v3/export-jobs"
                && r.status == 200
                && !faulty
                && let Some(co) = r
                    .query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("company_id="))
            {
                w.listed.insert(co.to_owned(), r.at);
            }
        }
        for (t, co) in &self.acked_companies[w.acked_seen.min(self.acked_companies.len())..] {
            let e = w.listed.entry(co.clone()).or_insert(*t);
            *e = (*e).max(*t);
        }
        w.acked_seen = self.acked_companies.len();
        let down = self
            .accounting_down
            .load(std::sync::atomic::Ordering::SeqCst);
        let retry = self.cfg.poll_interval.min(Duration::from_secs(300));
        let ready = !down && w.accounting_up_since.is_none_or(|t| t.plus(retry) <= now);
        let in_hand: i64 = store
            .conn()
            .query_row(
                "SELECT count(*) FROM export_jobs WHERE proc_state IN ('resume', 'claiming', 'claimed', 'processing')",
                [],
                |r| r.get(0),
            )
            .unwrap_or(i64::MAX);
        let lane_free = in_hand < i64::from(self.cfg.lanes);
        let Some(started) = self.running.as_ref().and(w.service_started) else {
            w.visible_since.clear();
            w.claimable_since.clear();
            return;
        };
        // Otherwise nothing is claimable now (what Pleo shows stays visible).
        let judging = clean && ready && lane_free;
        if !judging {
            w.claimable_since.clear();
        }
        let allowance =
            (self.cfg.pleo_request_timeout * 2 + Duration::from_secs(60)).as_millis() as i64;
        let served: HashSet<&String> = answerable.iter().collect();
        let jobs: Vec<FakeJob> = self
            .fake
            .jobs()
            .into_iter()
            .filter(|j| served.contains(&j.company_id))
            .collect();
        let mut found = Vec::new();
        for j in &jobs {
            if let (Some(at), Some(since)) = (j.expired_at, w.claimable_since.get(&j.id))
                && since.until(at) > allowance
            {
                found.push(format!(
                    "job {} expired at Pleo after {} s in which it was its company's oldest pending job and claimable",
                    j.id,
                    since.until(at) / 1000
                ));
            }
        }
        // Whose `in_progress` jobs end without a listing telling us: ours (claimed by us, or
        // found in progress and ours to resume by default). Another integration's end is
        // learnt only from a listing.
        let holders = holders(claims);
        let resume_unknown = self.cfg.resume_unknown_in_progress;
        let ours = |id: &str| match holders.get(id) {
            Some(Claimant::Api) => true,
            Some(_) => false,
            None => resume_unknown,
        };
        let mut by_company: HashMap<&str, Vec<&FakeJob>> = HashMap::new();
        for j in &jobs {
            by_company.entry(j.company_id.as_str()).or_default().push(j);
        }
        let mut visible = HashMap::new();
        let mut claimable = HashMap::new();
        for j in jobs.iter().filter(|j| j.status == "pending") {
            let company = &by_company[j.company_id.as_str()];
            let older_pending = company
                .iter()
                .any(|o| o.status == "pending" && (o.created_at, &o.id) < (j.created_at, &j.id));
            let foreign = company
                .iter()
                .any(|o| o.status == "in_progress" && !ours(&o.id));
            if older_pending || foreign {
                continue;
            }
            // Eligible as far as a listing can show; we must have read the company since.
            let seen = w.visible_since.get(&j.id).copied().unwrap_or(now);
            visible.insert(j.id.clone(), seen);
            let known = w
                .listed
                .get(&j.company_id)
                .is_some_and(|t| *t >= seen && *t >= started && *t >= j.created_at);
            let busy = company.iter().any(|o| o.status == "in_progress");
            if judging && known && !busy {
                let since = w.claimable_since.get(&j.id).copied().unwrap_or(now);
                claimable.insert(j.id.clone(), since);
            }
        }
        w.visible_since = visible;
        w.claimable_since = claimable;
        for v in found {
            self.violate(v);
        }
    }

    /// No job is marked finished or expired by us while Pleo says it is ours in progress.
    pub(super) fn check_nothing_abandoned(&mut self, store: &Store) {
        let ended: rusqlite::Result<Vec<(String, String)>> = store
            .conn()
            .prepare("SELECT id, proc_state FROM export_jobs WHERE proc_state IN ('done', 'expired') AND status = 'in_progress'")
            .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect());
        let Ok(ended) = ended else { return };
        if ended.is_empty() {
            return;
        }
        let holders = holders(&self.fake.claims());
        let at_pleo: HashMap<String, String> = self
            .fake
            .jobs()
            .into_iter()
            .map(|j| (j.id, j.status))
            .collect();
        for (id, state) in ended {
            let ours = !matches!(
                holders.get(&id),
                Some(Claimant::Other | Claimant::OtherAfterGet)
            );
            if ours && at_pleo.get(&id).is_some_and(|s| s == "in_progress") {
                self.violate(format!(
                    "job {id} is {state} in our database while Pleo says it is in_progress (ours)"
                ));
            }
        }
    }

    /// At the end: every job of a served company is finished, held by someone else, or its
    /// state is explained in the journal; jobmirror holds nothing Pleo has finished.
    pub(super) fn check_final(&mut self) {
        self.check_step();
        let Ok(store) = Store::open_read_only(&self.opts.db) else {
            self.violate("no database at the end of the replay".into());
            return;
        };
        let holders = holders(&self.fake.claims());
        let answerable = self.answerable();
        let now = self.clock.now();
        let min_left = self.cfg.claim_min_left.as_millis() as i64;
        for job in self.fake.jobs() {
            // A job jobmirror took is its to finish, even if its company was removed since;
            // a company whose access was revoked cannot be answered for.
            let taken = store.job(&job.id).ok().flatten().is_some_and(|r| {
                r.proc_state.is_active() || r.proc_state == crate::store::ProcState::Done
            });
            if self.pair_lost(&job.company_id) || (!answerable.contains(&job.company_id) && !taken)
            {
                continue;
            }
            let row = store.job(&job.id).ok().flatten();
            let events = store.events(Some(&job.id)).unwrap_or_default();
            match job.status.as_str() {
                "in_progress" => {
                    let holder = holders.get(&job.id).copied();
                    if !matches!(holder, Some(Claimant::Other | Claimant::OtherAfterGet)) {
                        self.violate(format!(
                            "job {} is still in_progress, held by jobmirror, at the end",
                            job.id
                        ));
                    }
                }
                "pending" => {
                    let explained = row.as_ref().is_some_and(|r| {
                        r.proc_state.is_final()
                            || now.until(r.expires_at) <= min_left
                            || events.iter().any(|e| {
                                matches!(
                                    e.kind.as_str(),
                                    "claim_failed" | "not_ready" | "processing_error"
                                )
                            })
                    });
                    if !explained {
                        self.violate(format!(
                            "job {} is still pending at the end with nothing in the journal saying why{}",
                            job.id,
                            if row.is_none() { " (never seen)" } else { "" }
                        ));
                    }
                }
                _ => {
                    if let Some(r) = row.filter(|r| r.proc_state.is_active()) {
                        self.violate(format!(
                            "jobmirror still holds job {} ({}) but Pleo says {}",
                            r.id,
                            r.proc_state.as_str(),
                            job.status
                        ));
                    }
                }
            }
        }
    }
}

/// Who holds each job now, from the claim log.
pub(super) fn holders(claims: &[ClaimRecord]) -> HashMap<String, Claimant> {
    let mut h = HashMap::new();
    for c in claims.iter().filter(|c| c.accepted) {
        h.insert(c.job_id.clone(), c.by);
    }
    h
}
