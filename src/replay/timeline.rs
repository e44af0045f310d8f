//! Playing a snapshot's timeline: its events applied to the fake at their moments, and the
//! webhooks it delivers to the receiver.

use super::*;

impl Replay {
    /// Applies every timeline event due by now.
    pub(super) fn apply_events(&mut self) -> anyhow::Result<()> {
        while let Some(step) = self.snap.timeline.get(self.next_event) {
            if self.at(step.at) > self.base.now() {
                break;
            }
            let step = step.clone();
            self.next_event += 1;
            match step.event {
                Event::JobCreated { job } => {
                    self.fake.add_job(job)?;
                }
                Event::Webhook {
                    webhook_id,
                    headers,
                    body,
                    signed_at,
                } => {
                    let d = self.webhook_request(webhook_id, headers, body, signed_at)?;
                    self.waiting.push_back(d);
                }
                Event::Faults { rates } => self.fake.set_fault_rates(rates),
                Event::Fault { rule } => self.fake.push_fault(rule),
                Event::ClaimedByOther { job_id } => {
                    self.fake.claim_as_other(&job_id);
                }
                Event::StealAfterGet { job_id } => self.fake.steal_after_next_get(&job_id),
                Event::CompletedByOther { job_id } => {
                    self.fake.complete(&job_id);
                }
                Event::Crash {
                    after_requests,
                    down_secs,
                } => match after_requests {
                    Some(n) if self.running.is_some() => {
                        self.fake.black_out_after(Some(n));
                        self.crash_after_step = Some(down_secs);
                    }
                    _ => {
                        self.crash_after_step = Some(down_secs);
                        self.crash();
                    }
                },
                Event::ClockJump { secs } => self.clock.jump((secs * 1000.0) as i64),
                Event::Trigger => {
                    if let Some(r) = &mut self.running {
                        r.trigger = true;
                    }
                }
                Event::AccountingDown { down_secs } => {
                    let until = self
                        .base
                        .now()
                        .plus(Duration::from_secs_f64(down_secs.max(0.0)));
                    self.accounting_up_at =
                        Some(self.accounting_up_at.map_or(until, |u| u.max(until)));
                    self.set_accounting(false)?;
                }
                Event::CompanyAdded { company_id, oauth } => {
                    self.company_added(&company_id, oauth)?;
                }
                Event::CompanyRemoved { company_id } => self.company_removed(&company_id)?,
                Event::TokensRevoked { company_id } => self.tokens_revoked(&company_id),
                Event::Reauthorized { company_id } => self.reauthorized(&company_id)?,
                Event::CompanyPaused { company_id } => self.company_paused(&company_id, true)?,
                Event::CompanyResumed { company_id } => self.company_paused(&company_id, false)?,
                Event::ListingShift { job_id, fail } => {
                    self.fake.use_offset_cursors();
                    if fail {
                        self.fake.fail_after_first_page(&job_id);
                    } else {
                        self.fake.claim_after_first_page(&job_id);
                    }
                }
                Event::OauthClient { accepted } => self.oauth_client(accepted),
                Event::WhileHandlerRuns {
                    job_id,
                    ops,
                    into_warning,
                } => self.plan_run(runs::RunPlan {
                    job_id,
                    ops,
                    into_warning,
                }),
            }
        }
        if self.accounting_up_at.is_some_and(|t| t <= self.base.now()) {
            self.accounting_up_at = None;
            self.set_accounting(true)?;
        }
        Ok(())
    }

    pub(super) fn webhook_request(
        &self,
        webhook_id: Option<String>,
        headers: BTreeMap<String, String>,
        body: Value,
        signed_at: Option<f64>,
    ) -> anyhow::Result<Delivery> {
        let (raw, headers, id) = match body {
            Value::String(raw) => {
                let id = headers
                    .iter()
                    .find(|(k, _)| {
                        k.eq_ignore_ascii_case("webhook-id") || k.eq_ignore_ascii_case("svix-id")
                    })
                    .map(|(_, v)| v.clone())
                    .or(webhook_id)
                    .unwrap_or_default();
                let headers: Vec<(String, String)> = headers.into_iter().collect();
                (raw.into_bytes(), headers, id)
            }
            body => {
                let id = webhook_id.unwrap_or_default();
                let raw = serde_json::to_vec(&body)?;
                let ts = signed_at.map_or(self.clock.now(), |s| {
                    Millis(self.at(s).0 + self.clock.offset_ms())
                });
                let secrets = self
                    .cfg
                    .webhook
                    .as_ref()
                    .map(|w| w.secrets.clone())
                    .ok_or_else(|| anyhow::anyhow!("no webhook_secret to sign with"))?;
                let sig = crate::edge::webhook::sign_with(&secrets, &id, ts.0 / 1000, &raw);
                let headers = vec![
                    ("webhook-id".to_owned(), id.clone()),
                    ("webhook-timestamp".to_owned(), (ts.0 / 1000).to_string()),
                    ("webhook-signature".to_owned(), sig),
                    ("content-type".to_owned(), "application/json".to_owned()),
                ];
                (raw, headers, id)
            }
        };
        let request = Request {
            head: Head {
                method: "POST".into(),
                path: crate::edge::webhook::PATH.into(),
                query: String::new(),
                headers,
                content_length: raw.len(),
                peer: std::net::SocketAddr::from(([127, 0, 0, 1], 9)),
            },
            body: raw,
        };
        Ok(Delivery {
            webhook_id: id,
            request,
        })
    }
}

impl Replay {
    /// Takes the accounting side down (a file where the outbox directory belongs: the
    /// readiness check fails) or brings it back.
    pub(super) fn set_accounting(&mut self, up: bool) -> anyhow::Result<()> {
        let Some(dir) = &self.outbox else {
            return Ok(());
        };
        let mut away = dir.as_os_str().to_owned();
        away.push(".away");
        let away = PathBuf::from(away);
        if up {
            if dir.is_file() {
                std::fs::remove_file(dir)?;
            }
            if away.exists() {
                std::fs::rename(&away, dir)?;
            }
        } else if !dir.is_file() {
            if dir.exists() {
                std::fs::rename(dir, &away)?;
            }
            std::fs::write(dir, "the accounting system is down (replay)\n")?;
        }
        let was_down = self
            .accounting_down
            .swap(!up, std::sync::atomic::Ordering::SeqCst);
        if up && was_down {
            self.expiry_watch.accounting_up_since = Some(self.base.now());
        }
        Ok(())
    }
}
