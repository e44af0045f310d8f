//! What tests, the demo and the replay do to the fake: start it, add jobs and faults, read its
//! request and claim logs.

use super::*;

impl FakePleo {
    /// Starts the fake on `listen` (e.g. `127.0.0.1:0`).
    pub fn start(listen: &str, cfg: FakeConfig, clock: SharedClock) -> anyhow::Result<FakePleo> {
        let listener = TcpListener::bind(listen)
            .map_err(|e| anyhow::anyhow!("fake-pleo cannot listen on {listen}: {e}"))?;
        let shared = Arc::new(Shared {
            world: Mutex::new(World {
                jobs: Vec::new(),
                api_keys: cfg.api_keys,
                expires_in_secs: cfg.expires_in_secs,
                requests: Vec::new(),
                script: VecDeque::new(),
                rates: FaultRates::default(),
                rng: cfg.seed | 1,
                steal_on_get: HashSet::new(),
                offset_cursors: false,
                stale_item_updates: Vec::new(),
                claim_after_first_page: Vec::new(),
                claims: Vec::new(),
                blackout_after: None,
                latency: std::time::Duration::ZERO,
                oauth: None,
                key_companies: std::collections::HashMap::new(),
                holders: std::collections::HashMap::new(),
                next_id: 0,
                subscriptions: Vec::new(),
                webhook_options: WebhookOptions::default(),
                webhook_log: Vec::new(),
                outbox: None,
                next_msg: 0,
                refuse_updates: std::collections::HashMap::new(),
                by_company: std::collections::HashMap::new(),
                by_id: std::collections::HashMap::new(),
                next_expiry: Millis(i64::MIN),
            }),
            clock,
            logged: std::sync::Condvar::new(),
            claim_hook: Mutex::new(None),
            token_hook: Mutex::new(None),
        });
        let (outbox_tx, outbox_rx) = crossbeam_channel::bounded::<Outgoing>(10_000);
        shared.lock().outbox = Some(outbox_tx);
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("fake-pleo-webhooks".into())
            .spawn(move || deliver_webhooks(outbox_rx, weak))?;
        let limits = httpd::Limits {
            connections_max: 512,
            body_bytes_max: 16 * 1024 * 1024,
            ..httpd::Limits::default()
        };
        let server = Server::start(
            listener,
            limits,
            Arc::new(FakeHandler(shared.clone())),
            "fake-pleo",
        )?;
        Ok(FakePleo { shared, server })
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.server.local_addr())
    }

    pub fn api_key(&self) -> String {
        self.shared
            .lock()
            .api_keys
            .first()
            .cloned()
            .unwrap_or_default()
    }

    /// Adds the fixture's jobs (times relative to the fake's clock where the fixture says so).
    pub fn load_fixture(&self, f: &Fixture) -> anyhow::Result<Vec<String>> {
        {
            let mut w = self.shared.lock();
            if !f.api_keys.is_empty() {
                w.api_keys = f.api_keys.clone();
            }
            if let Some(e) = f.expires_in {
                w.expires_in_secs = e;
            }
        }
        f.jobs.iter().map(|j| self.add_job(j.clone())).collect()
    }

    /// Adds one job; returns its id.
    pub fn add_job(&self, spec: JobSpec) -> anyhow::Result<String> {
        let now = self.shared.clock.now();
        let mut w = self.shared.lock();
        let id = match spec.id.clone() {
            Some(id) => id,
            None => w.new_id(1),
        };
        if w.job(&id).is_some() {
            anyhow::bail!("job {id} already exists");
        }
        let created_at = match (&spec.created_at, spec.created_secs_ago) {
            (Some(s), _) => Millis::parse_rfc3339(s)
                .ok_or_else(|| anyhow::anyhow!("job {id}: bad createdAt {s:?}"))?,
            (None, Some(ago)) => now.plus_secs(-ago),
            (None, None) => now,
        };
        let last_updated_at = match (
            spec.extra.get("lastUpdatedAt").and_then(Value::as_str),
            spec.last_updated_secs_ago,
        ) {
            (Some(s), _) => Some(
                Millis::parse_rfc3339(s)
                    .ok_or_else(|| anyhow::anyhow!("job {id}: bad lastUpdatedAt {s:?}"))?,
            ),
            (None, Some(ago)) => Some(now.plus_secs(-ago)),
            (None, None) => Some(created_at),
        };
        let mut extra = spec.extra.clone();
        let take_str = |extra: &mut Map<String, Value>, k: &str| {
            extra.remove(k).and_then(|v| v.as_str().map(str::to_owned))
        };
        let started_at = take_str(&mut extra, "startedAt").and_then(|s| Millis::parse_rfc3339(&s));
        let created_by = take_str(&mut extra, "createdBy");
        let failure_reason = take_str(&mut extra, "failureReason");
        let failure_reason_type = take_str(&mut extra, "failureReasonType");
        let is_interactive = extra
            .remove("isInteractive")
            .and_then(|v| v.as_bool())
            .unwrap_or(true);
        let vbb = extra
            .remove("vendorBasedBookkeeping")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        for k in [
            "lastUpdatedAt",
            "completedAt",
            "expiredAt",
            "numberOfItems",
            "expiresIn",
            "companyId",
            "status",
        ] {
            extra.remove(k);
        }
        let status = if spec.status.is_empty() {
            "pending".to_owned()
        } else {
            spec.status.clone()
        };
        if ![
            "pending",
            "in_progress",
            "failed",
            "completed",
            "completed_with_errors",
        ]
        .contains(&status.as_str())
        {
            anyhow::bail!("job {id}: unknown status {status:?}");
        }
        let n_items = spec.items.unwrap_or(1);
        let mut job = FakeJob {
            id: id.clone(),
            company_id: spec.company_id.clone(),
            status: status.clone(),
            created_at,
            last_updated_at,
            started_at: if status == "in_progress" {
                started_at.or(last_updated_at)
            } else {
                started_at
            },
            completed_at: None,
            expired_at: None,
            expires_in_secs: spec.expires_in.unwrap_or(w.expires_in_secs),
            is_interactive,
            vendor_based_bookkeeping: vbb,
            created_by,
            failure_reason,
            failure_reason_type,
            extra,
            served_created_at: spec.served_created_at.clone(),
            items: Vec::new(),
            export_items: Vec::new(),
        };
        if let Some(recorded) = &spec.job_items {
            for v in recorded {
                let mut item: FakeItem = serde_json::from_value(v.clone())
                    .map_err(|e| anyhow::anyhow!("job {id}: bad job item: {e}"))?;
                item.export_job_id = id.clone();
                job.items.push(item);
            }
            job.export_items = spec.export_items.clone().unwrap_or_default();
        } else {
            for i in 0..n_items {
                let entry = format!("{:08x}-{:04x}-4000-8000-{:012x}", hash32(&id), 0xe17u16, i);
                job.items.push(new_item(&id, &entry));
                let with_account = i + spec.items_without_account < n_items;
                job.export_items
                    .push(export_item(&job, &entry, i, with_account));
            }
        }
        if spec.steal_on_verify {
            w.steal_on_get.insert(id.clone());
        }
        w.announce(&job);
        w.push_job(job);
        Ok(id)
    }

    /// A snapshot of one job as the fake holds it (expiry applied).
    pub fn job(&self, id: &str) -> Option<FakeJob> {
        let now = self.shared.clock.now();
        let mut w = self.shared.lock();
        w.expire_due(now);
        w.job(id).cloned()
    }

    /// Every job, in insertion order (expiry applied).
    pub fn jobs(&self) -> Vec<FakeJob> {
        let now = self.shared.clock.now();
        let mut w = self.shared.lock();
        w.expire_due(now);
        w.jobs.clone()
    }

    /// Another integration claims the job now (as if it sent `started`).
    pub fn claim_as_other(&self, id: &str) -> bool {
        let now = self.shared.clock.now();
        let mut w = self.shared.lock();
        w.expire_due(now);
        w.claim(id, Claimant::Other, now)
    }

    /// After `n` more API requests, drop every request unapplied (what Pleo sees when its
    /// client crashes mid-step); `None` ends it.
    pub fn black_out_after(&self, n: Option<u32>) {
        self.shared.lock().blackout_after = n;
    }

    /// Calls `hook` for every `started` that reaches the transition table, while its sender
    /// still waits for the answer (so the sender's state can be inspected at that moment).
    pub fn on_api_claim(&self, hook: ClaimHook) {
        *self
            .shared
            .claim_hook
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(hook);
    }

    /// Turns the token endpoint on (`POST /oauth/token`): `refresh_token` works once, and so
    /// does every refresh token it issues; access tokens live `access_ttl_secs`.
    pub fn enable_oauth(
        &self,
        client_id: &str,
        client_secret: &str,
        refresh_token: &str,
        access_ttl_secs: i64,
    ) {
        self.shared.lock().oauth = Some(FakeOAuth {
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            refresh_tokens: [(refresh_token.to_owned(), None)].into(),
            ttl_secs: access_ttl_secs,
            ..FakeOAuth::default()
        });
    }

    /// The OAuth app's secret as the token endpoint knows it from now on: a client that
    /// sends another one is refused with `invalid_client` (its refresh tokens stay good).
    pub fn set_oauth_client_secret(&self, client_secret: &str) {
        if let Some(o) = self.shared.lock().oauth.as_mut() {
            o.client_secret = client_secret.into();
        }
    }

    /// Every call of the token endpoint.
    pub fn token_grants(&self) -> Vec<TokenGrant> {
        self.shared
            .lock()
            .oauth
            .as_ref()
            .map(|o| o.grants.clone())
            .unwrap_or_default()
    }

    /// Accepts `key` too, for `company` only: other companies' jobs answer 403.
    pub fn add_company_key(&self, key: &str, company: &str) {
        let mut w = self.shared.lock();
        // Found by the key index, whatever the number of companies with keys.
        w.key_companies.insert(key.to_owned(), company.to_owned());
    }

    /// Authorizes `company` (OAuth must be enabled): a refresh token for it alone, as an
    /// integration gets one when a customer installs it. Its access tokens see only its jobs.
    pub fn authorize_company(&self, company: &str) -> Option<String> {
        let mut w = self.shared.lock();
        let o = w.oauth.as_mut()?;
        o.issued += 1;
        let t = format!("fake-refresh-{company}-{:04}", o.issued);
        o.refresh_tokens.insert(t.clone(), Some(company.to_owned()));
        o.issued_to.insert(t.clone(), company.to_owned());
        Some(t)
    }

    /// Revokes every token of `company` (the customer disconnected the integration): its
    /// refresh token is refused (`invalid_grant`) and its access tokens answer 401.
    pub fn revoke_company(&self, company: &str) {
        if let Some(o) = self.shared.lock().oauth.as_mut() {
            o.refresh_tokens
                .retain(|_, c| c.as_deref() != Some(company));
            o.access.retain(|_, (_, c)| c.as_deref() != Some(company));
        }
    }

    /// The live refresh token of `company`, if it has one.
    pub fn company_refresh_token(&self, company: &str) -> Option<String> {
        let w = self.shared.lock();
        let o = w.oauth.as_ref()?;
        o.refresh_tokens
            .iter()
            .find(|(_, c)| c.as_deref() == Some(company))
            .map(|(t, _)| t.clone())
    }

    /// Calls `hook` before each token request is processed (see [`TokenHook`]).
    pub fn on_token_request(&self, hook: TokenHook) {
        *self
            .shared
            .token_hook
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(hook));
    }

    /// Revokes every access token issued so far (the API answers 401 to them).
    pub fn revoke_access_tokens(&self) {
        if let Some(o) = self.shared.lock().oauth.as_mut() {
            o.access.clear();
        }
    }

    /// Issues a fresh refresh token, as an operator re-authorizing would get one.
    pub fn authorize_again(&self) -> Option<String> {
        let mut w = self.shared.lock();
        let o = w.oauth.as_mut()?;
        o.issued += 1;
        let t = format!("fake-refresh-{:04}", o.issued);
        o.refresh_tokens.insert(t.clone(), None);
        Some(t)
    }

    /// Every claim the fake saw, in order.
    pub fn claims(&self) -> Vec<ClaimRecord> {
        self.shared.lock().claims.clone()
    }

    /// The holder of an `in_progress` job completes it (as its `completed` event would).
    pub fn complete(&self, id: &str) -> bool {
        let now = self.shared.clock.now();
        let mut w = self.shared.lock();
        w.expire_due(now);
        match w.job_mut(id) {
            Some(j) if j.status == "in_progress" => {
                j.status = "completed".into();
                j.completed_at = Some(now);
                j.last_updated_at = Some(now);
                true
            }
            _ => false,
        }
    }

    /// Every webhook delivery attempt so far.
    pub fn webhook_log(&self) -> Vec<WebhookAttempt> {
        self.shared.lock().webhook_log.clone()
    }

    pub fn set_webhook_options(&self, o: WebhookOptions) {
        self.shared.lock().webhook_options = o;
    }

    /// The next `times` updates of this item are refused inside a 200 (`errors`).
    pub fn refuse_item_updates(&self, accounting_entry_id: &str, times: u32) {
        self.shared
            .lock()
            .refuse_updates
            .insert(accounting_entry_id.to_owned(), times);
    }

    /// Every item update the fake accepted a request for, in order: (entry, status).
    pub fn item_updates(&self, job_id: &str) -> Vec<(String, String)> {
        let path = format!("/v3/export-jobs/{job_id}/items");
        self.requests()
            .into_iter()
            .filter(|r| r.method == "PUT" && r.path == path && r.status == 200)
            .flat_map(|r| serde_json::from_str::<Vec<Value>>(&r.body).unwrap_or_default())
            .map(|u| {
                (
                    u["accountingEntryId"].as_str().unwrap_or("").to_owned(),
                    u["status"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    }

    /// After the next single-job GET of `id` is answered, another integration claims it.
    pub fn steal_after_next_get(&self, id: &str) {
        self.shared.lock().steal_on_get.insert(id.to_owned());
    }

    /// Item updates applied to an item that was already finished (`job/entry: from -> to`):
    /// the contract says never to send one.
    pub fn stale_item_updates(&self) -> Vec<String> {
        self.shared.lock().stale_item_updates.clone()
    }

    /// Job listings' cursors become positions from now on: a listing whose result set changes
    /// between its pages then shifts, as Pleo's might (its documents do not say).
    pub fn use_offset_cursors(&self) {
        self.shared.lock().offset_cursors = true;
    }

    /// Another integration starts `id` right after the next first page of a job listing is
    /// answered (between that listing's pages).
    pub fn claim_after_first_page(&self, id: &str) {
        self.shared
            .lock()
            .claim_after_first_page
            .push((id.to_owned(), false));
    }

    /// Another integration fails `id` (it leaves every open listing) right after the next
    /// first page of a job listing is answered.
    pub fn fail_after_first_page(&self, id: &str) {
        self.shared
            .lock()
            .claim_after_first_page
            .push((id.to_owned(), true));
    }

    pub fn push_fault(&self, rule: FaultRule) {
        self.shared.lock().script.push_back(rule);
    }

    /// Every API answer from now on comes this much later (the requests are applied at once;
    /// only the answer waits, as over a slow network, on the answering connection's thread).
    pub fn set_latency(&self, latency: std::time::Duration) {
        self.shared.lock().latency = latency;
    }

    pub fn set_fault_rates(&self, rates: FaultRates) {
        self.shared.lock().rates = rates;
    }

    /// The requests received after the first `n`, in order.
    pub fn requests_since(&self, n: usize) -> Vec<LoggedRequest> {
        let w = self.shared.lock();
        w.requests.get(n..).map(<[_]>::to_vec).unwrap_or_default()
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.shared.lock().requests.clone()
    }

    /// Blocks until `pred` holds for the request log, or `timeout` passes; returns whether it
    /// held. Woken by each request, so tests wait for events instead of sleeping.
    pub fn wait_for_requests(
        &self,
        timeout: Duration,
        pred: impl Fn(&[LoggedRequest]) -> bool,
    ) -> bool {
        self.wait_until(timeout, |w| pred(&w.requests))
    }

    /// Blocks until `pred` holds for the webhook delivery log, or `timeout` passes.
    pub fn wait_for_webhooks(
        &self,
        timeout: Duration,
        pred: impl Fn(&[WebhookAttempt]) -> bool,
    ) -> bool {
        self.wait_until(timeout, |w| pred(&w.webhook_log))
    }

    pub(super) fn wait_until(&self, timeout: Duration, holds: impl Fn(&World) -> bool) -> bool {
        let deadline = crate::clock::monotonic() + timeout;
        let mut w = self.shared.lock();
        loop {
            if holds(&w) {
                return true;
            }
            let left = deadline.saturating_duration_since(crate::clock::monotonic());
            if left.is_zero() {
                return false;
            }
            w = self
                .shared
                .logged
                .wait_timeout(w, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// `started` events received for a job (whatever the answer).
    pub fn started_events_for(&self, job_id: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.method == "POST" && r.path == "/v3/export-job-events")
            .filter(|r| {
                serde_json::from_str::<Value>(&r.body)
                    .map(|v| v["event"] == "started" && v["jobId"] == job_id)
                    .unwrap_or(false)
            })
            .count()
    }

    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.server.local_addr()
    }
}
