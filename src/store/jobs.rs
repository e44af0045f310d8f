//! Jobs: the upsert of what Pleo lists (with the journal entries for what changed), the
//! pick query, state transitions, claims, deadlines, sync runs, and the per-company summary.

use super::*;

impl Store {
    /// Writes jobs read from Pleo, with the journal entries for what changed, in one transaction.
    pub fn upsert_jobs(&self, jobs: &[Job], now: Millis, source: Source) -> Result<Vec<Upsert>> {
        let tx = self.db.write_tx()?;
        let mut out = Vec::with_capacity(jobs.len());
        for job in jobs {
            out.push(upsert_one(&tx, job, now, source)?);
        }
        tx.commit()?;
        Ok(out)
    }

    pub fn upsert_job(&self, job: &Job, now: Millis, source: Source) -> Result<Upsert> {
        Ok(self.upsert_jobs(std::slice::from_ref(job), now, source)?[0])
    }

    pub fn journal(
        &self,
        now: Millis,
        job_id: Option<&str>,
        company_id: Option<&str>,
        kind: EventKind,
        detail: Value,
    ) -> Result<()> {
        journal_db(&self.db, now, job_id, company_id, kind, &detail)
    }

    /// The pick query: the company's oldest pending job not yet taken, whatever time it has
    /// left (a claim refreshes its deadline).
    pub fn pick_next(&self, company_id: &str) -> Result<Option<JobRow>> {
        self.db.row(PICK_SQL, &[&company_id], job_row)
    }

    /// Companies with a job in hand or a job to claim (both from partial indexes).
    pub fn companies_with_work(&self) -> Result<std::collections::HashSet<String>> {
        Ok(self
            .db
            .rows(
                "SELECT company_id FROM export_jobs WHERE proc_state IN ('resume', 'claiming', 'claimed', 'processing') \
                 UNION SELECT company_id FROM export_jobs WHERE status = 'pending' AND proc_state = 'new'",
                &[],
                |r| r.get(0),
            )?
            .into_iter()
            .collect())
    }

    /// Pleo accepted a job event of ours for `job_id` (a 202) when its clock said `pleo_at`:
    /// a job event refreshes `lastUpdatedAt`, so the job's deadline is at least `pleo_at` plus
    /// its `expiresIn`, whatever the next read answers or fails to answer.
    pub fn event_accepted(&self, job_id: &str, pleo_at: Millis) -> Result<()> {
        self.db.exec(
            "UPDATE export_jobs SET accepted_deadline = \
             max(coalesce(accepted_deadline, 0), ?2 + expires_in * 1000) WHERE id = ?1",
            &[&job_id, &pleo_at],
        )?;
        Ok(())
    }

    /// The newest journal entry of one of `kinds`, if any.
    pub fn last_event_of(&self, kinds: &[&str]) -> Result<Option<EventRow>> {
        let marks = vec!["?"; kinds.len()].join(", ");
        let sql = format!(
            "SELECT seq, at, job_id, company_id, kind, detail FROM job_events \
             WHERE kind IN ({marks}) ORDER BY seq DESC LIMIT 1"
        );
        let params: Vec<&dyn sql::ToVal> = kinds.iter().map(|k| k as &dyn sql::ToVal).collect();
        self.db.row(&sql, &params, event_row)
    }

    /// The job jobmirror is working on for this company, if any.
    pub fn active_job(&self, company_id: &str) -> Result<Option<JobRow>> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM export_jobs \
             WHERE company_id = ?1 AND proc_state IN ('resume', 'claiming', 'claimed', 'processing') \
             ORDER BY created_at, created_at_sub_ns, id LIMIT 1"
        );
        self.db.row(&sql, &[&company_id], job_row)
    }

    pub fn job(&self, job_id: &str) -> Result<Option<JobRow>> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM export_jobs WHERE id = ?1");
        self.db.row(&sql, &[&job_id], job_row)
    }

    pub fn job_raw(&self, job_id: &str) -> Result<Option<Value>> {
        let raw: Option<String> = self
            .db
            .value("SELECT raw_json FROM export_jobs WHERE id = ?1", &[&job_id])?;
        Ok(raw.and_then(|s| serde_json::from_str(&s).ok()))
    }

    /// Moves a job to `to`, journaling `kind` with `detail`, in one transaction.
    pub fn transition(
        &self,
        job: &JobRow,
        to: ProcState,
        now: Millis,
        kind: EventKind,
        detail: Value,
    ) -> Result<()> {
        let tx = self.db.write_tx()?;
        tx.exec(
            "UPDATE export_jobs SET proc_state = ?2, proc_state_at = ?3 WHERE id = ?1",
            &[&job.id, &to.as_str(), &now],
        )?;
        journal_db(
            &tx,
            now,
            Some(&job.id),
            Some(&job.company_id),
            kind,
            &detail,
        )?;
        tx.commit()
    }

    /// Records that a `started` request is about to be sent.
    /// On a shared database, only under this instance's lease, checked in the same transaction.
    pub fn begin_claim(&self, job: &JobRow, now: Millis) -> Result<()> {
        let tx = self.db.write_tx()?;
        let attempt = json!({"attempt": job.claim_attempts + 1});
        self.record_step(&job.company_id, &job.id, super::pg::Step::Claim, &attempt)?;
        tx.exec(
            "UPDATE export_jobs SET proc_state = 'claiming', proc_state_at = ?2, \
             claim_attempts = claim_attempts + 1 WHERE id = ?1",
            &[&job.id, &now],
        )?;
        journal_db(
            &tx,
            now,
            Some(&job.id),
            Some(&job.company_id),
            EventKind::ClaimSent,
            &attempt,
        )?;
        tx.commit()
    }

    /// Records the deadline a warning was journaled for, so it is journaled once.
    pub fn warn_deadline(&self, job: &JobRow, now: Millis) -> Result<()> {
        let tx = self.db.write_tx()?;
        tx.exec(
            "UPDATE export_jobs SET warned_expires_at = ?2 WHERE id = ?1",
            &[&job.id, &job.expires_at],
        )?;
        journal_db(
            &tx,
            now,
            Some(&job.id),
            Some(&job.company_id),
            EventKind::DeadlineWarning,
            &json!({"expires_at": job.expires_at.to_rfc3339(), "seconds_left": now.until(job.expires_at) / 1000}),
        )?;
        tx.commit()
    }

    /// Ids of the company's jobs the mirror holds as open (`pending`/`in_progress`) that are not
    /// in `seen`.
    pub fn open_jobs_missing(
        &self,
        company_id: &str,
        seen: &std::collections::HashSet<String>,
    ) -> Result<Vec<String>> {
        let ids: Vec<String> = self.db.rows(
            "SELECT id FROM export_jobs WHERE company_id = ?1 AND status IN ('pending', 'in_progress')",
            &[&company_id],
            |r| r.get(0),
        )?;
        Ok(ids.into_iter().filter(|id| !seen.contains(id)).collect())
    }

    pub fn begin_sync_run(&self, company_id: &str, kind: &str, now: Millis) -> Result<i64> {
        self.db
            .value(
                "INSERT INTO sync_runs (company_id, kind, started_at) VALUES (?1, ?2, ?3) RETURNING id",
                &[&company_id, &kind, &now],
            )?
            .ok_or(StoreError::SqliteOnly("sync_runs without RETURNING"))
    }

    /// Ends a listing pass: its counts and error into its `sync_runs` row and the company's
    /// `company_sync` row, in one transaction. A quiet poll (it succeeded and found nothing
    /// new, changed or gone) leaves only its mark in `company_sync`: its own row is removed,
    /// so `sync_runs` grows with what happened, not with the number of polls.
    pub fn finish_sync_run(
        &self,
        run_id: i64,
        now: Millis,
        counts: &SyncCounts,
        error: Option<&str>,
    ) -> Result<()> {
        let tx = self.db.write_tx()?;
        let run: Option<(String, String, i64)> = tx.row(
            "UPDATE sync_runs SET finished_at = ?2, pages = ?3, jobs_seen = ?4, jobs_new = ?5, \
             jobs_changed = ?6, jobs_reread = ?7, error = ?8 WHERE id = ?1 \
             RETURNING company_id, kind, started_at",
            &[
                &run_id,
                &now,
                &counts.pages,
                &counts.seen,
                &counts.new,
                &counts.changed,
                &counts.reread,
                &error,
            ],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        if let Some((company, kind, started_at)) = run {
            let failed = error.is_some();
            tx.exec(
                "INSERT INTO company_sync (company_id, last_kind, last_started_at, last_finished_at, \
                 last_error, last_ok_at, failed_in_a_row, passes, failed_passes, pages, jobs_seen, \
                 jobs_new, jobs_changed, jobs_reread) \
                 VALUES (?1, ?2, ?3, ?4, ?5, CASE WHEN ?6 = 1 THEN NULL ELSE CAST(?4 AS BIGINT) END, ?6, 1, ?6, ?7, ?8, ?9, ?10, ?11) \
                 ON CONFLICT (company_id) DO UPDATE SET last_kind = ?2, last_started_at = ?3, \
                 last_finished_at = ?4, last_error = ?5, \
                 last_ok_at = CASE WHEN ?6 = 1 THEN company_sync.last_ok_at ELSE ?4 END, \
                 failed_in_a_row = CASE WHEN ?6 = 1 THEN company_sync.failed_in_a_row + 1 ELSE 0 END, \
                 passes = company_sync.passes + 1, failed_passes = company_sync.failed_passes + ?6, \
                 pages = company_sync.pages + ?7, jobs_seen = company_sync.jobs_seen + ?8, \
                 jobs_new = company_sync.jobs_new + ?9, jobs_changed = company_sync.jobs_changed + ?10, \
                 jobs_reread = company_sync.jobs_reread + ?11",
                &[
                    &company,
                    &kind,
                    &started_at,
                    &now,
                    &error,
                    &i64::from(failed),
                    &counts.pages,
                    &counts.seen,
                    &counts.new,
                    &counts.changed,
                    &counts.reread,
                ],
            )?;
            let quiet = kind == "poll"
                && !failed
                && counts.new == 0
                && counts.changed == 0
                && counts.reread == 0;
            if quiet {
                tx.exec("DELETE FROM sync_runs WHERE id = ?1", &[&run_id])?;
            }
        }
        tx.commit()
    }

    /// Whether the journal holds an entry of `kind` about `job_id`.
    pub fn has_event(&self, job_id: &str, kind: EventKind) -> Result<bool> {
        Ok(self
            .db
            .value::<i64>(
                "SELECT 1 FROM job_events WHERE job_id = ?1 AND kind = ?2 LIMIT 1",
                &[&job_id, &kind.as_str()],
            )?
            .is_some())
    }

    /// The journal, oldest first; for one job when `job_id` is given.
    pub fn events(&self, job_id: Option<&str>) -> Result<Vec<EventRow>> {
        self.db.rows(
            "SELECT seq, at, job_id, company_id, kind, detail FROM job_events \
             WHERE CAST(?1 AS TEXT) IS NULL OR job_id = ?1 ORDER BY seq",
            &[&job_id],
            event_row,
        )
    }

    /// Companies known to the mirror (from jobs, finished passes, and a first pass under way),
    /// sorted.
    pub fn companies(&self) -> Result<Vec<String>> {
        self.db.rows(
            "SELECT company_id FROM export_jobs UNION SELECT company_id FROM company_sync \
             UNION SELECT company_id FROM sync_runs WHERE finished_at IS NULL ORDER BY 1",
            &[],
            |r| r.get(0),
        )
    }

    /// Every known company's summary, sorted by company id: four queries over indexes however
    /// many companies there are (`status` and `doctor` at tens of thousands of companies).
    pub fn company_summaries(&self) -> Result<Vec<CompanySummary>> {
        let mut by: std::collections::BTreeMap<String, CompanySummary> = self
            .companies()?
            .into_iter()
            .map(|c| (c.clone(), CompanySummary::empty(&c)))
            .collect();
        let counts: Vec<(String, String, i64)> = self.db.rows(
            "SELECT company_id, proc_state, count(*) FROM export_jobs \
             GROUP BY company_id, proc_state ORDER BY company_id, proc_state",
            &[],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        for (company, state, n) in counts {
            if let Some(s) = by.get_mut(&company) {
                s.by_state.push((state, n));
            }
        }
        let sync: Vec<(String, i64, Option<String>, i64)> = self.db.rows(
            "SELECT company_id, last_finished_at, last_error, failed_in_a_row FROM company_sync",
            &[],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )?;
        for (company, at, error, in_a_row) in sync {
            if let Some(s) = by.get_mut(&company) {
                s.last_poll_at = Some(Millis(at));
                s.last_poll_error = error;
                s.failed_in_a_row = in_a_row.clamp(0, i64::from(u32::MAX)) as u32;
            }
        }
        // Each company's soonest deadline and its job (the first by id among equals).
        let deadlines: Vec<(String, String, i64)> = self.db.rows(
            "SELECT company_id, id, expires_at FROM ( \
               SELECT company_id, id, expires_at, row_number() OVER \
                 (PARTITION BY company_id ORDER BY expires_at, id) AS n FROM export_jobs \
               WHERE proc_state IN ('new', 'resume', 'claiming', 'claimed', 'processing')) AS firsts \
             WHERE n = 1",
            &[],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        for (company, id, at) in deadlines {
            if let Some(s) = by.get_mut(&company) {
                s.next_deadline = Some((id, Millis(at)));
            }
        }
        Ok(by.into_values().collect())
    }
}

/// A `job_events` row selected as `seq, at, job_id, company_id, kind, detail`.
fn event_row(r: &sql::Row<'_>) -> Result<EventRow> {
    let detail: String = r.get(5)?;
    Ok(EventRow {
        seq: r.get(0)?,
        at: Millis(r.get(1)?),
        job_id: r.get(2)?,
        company_id: r.get(3)?,
        kind: r.get(4)?,
        detail: serde_json::from_str(&detail).unwrap_or(Value::Null),
    })
}

/// The pick query. Kept as a constant so tests can `EXPLAIN QUERY PLAN` the exact text.
pub const PICK_SQL: &str = "SELECT id, company_id, status, created_at, last_updated_at, expires_at, \
     number_of_items, proc_state, claim_attempts, warned_expires_at FROM export_jobs \
     WHERE company_id = ?1 AND status = 'pending' AND proc_state = 'new' \
     ORDER BY created_at, created_at_sub_ns, id LIMIT 1";

/// [`journal`] on either backend (in the caller's transaction).
pub(super) fn journal_db(
    db: &sql::Db,
    now: Millis,
    job_id: Option<&str>,
    company_id: Option<&str>,
    kind: EventKind,
    detail: &Value,
) -> Result<()> {
    db.exec(
        "INSERT INTO job_events (at, job_id, company_id, kind, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        &[
            &now,
            &job_id,
            &company_id,
            &kind.as_str(),
            &detail.to_string(),
        ],
    )?;
    Ok(())
}

/// The proc_state a job's new Pleo status moves it to, and what to journal; `None` keeps it.
pub(super) fn next_state(
    prev: Option<ProcState>,
    job: &Job,
    source: Source,
) -> Option<(ProcState, Option<EventKind>)> {
    if status::is_terminal(&job.status) {
        let expired = job.failure_reason_type.as_deref() == Some("job_expired");
        let to = if expired {
            ProcState::Expired
        } else {
            ProcState::Done
        };
        return match prev {
            Some(p) if p.is_final() => None,
            _ => Some((
                to,
                Some(if expired {
                    EventKind::Expired
                } else {
                    EventKind::Finished
                }),
            )),
        };
    }
    match (job.status.as_str(), prev) {
        (status::PENDING, None) => Some((ProcState::New, None)),
        (status::IN_PROGRESS, None | Some(ProcState::New) | Some(ProcState::TooLate)) => {
            // Found by a recovery pass: an interrupted workflow of ours (a lost database, or a
            // backup older than the claim), resumed without `started`. Seen taken while we
            // ran: someone else's. A job recorded as someone else's (`conflict`) stays theirs.
            if source == Source::Recovery {
                Some((ProcState::Resume, None))
            } else {
                Some((ProcState::Conflict, Some(EventKind::ClaimedElsewhere)))
            }
        }
        (_, None) => Some((ProcState::New, None)),
        _ => None,
    }
}

pub(super) fn upsert_one(conn: &sql::Db, job: &Job, now: Millis, source: Source) -> Result<Upsert> {
    let raw = job.raw.to_string();
    let company = Some(job.company_id.as_str());
    // Most jobs a listing brings are either new or unchanged: try the insert first, so a new
    // job costs no lookup.
    let if_new = next_state(None, job, source);
    let inserted = conn.exec(
        "INSERT INTO export_jobs (id, company_id, status, created_at, last_updated_at, expires_in, \
         expires_at, number_of_items, raw_json, first_seen_at, last_seen_at, proc_state, proc_state_at, \
         created_at_sub_ns) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10, ?11, ?10, ?12) ON CONFLICT (id) DO NOTHING",
        &[
            &job.id,
            &job.company_id,
            &job.status,
            &job.created_at,
            &job.last_updated_at,
            &job.expires_in_secs,
            &job.expires_at(),
            &job.number_of_items,
            &raw,
            &now,
            &if_new.map_or(ProcState::New, |(s, _)| s).as_str(),
            &job.created_at_sub_ns,
        ],
    )?;
    if inserted == 1 {
        journal_db(
            conn,
            now,
            Some(&job.id),
            company,
            EventKind::Detected,
            &json!({"status": job.status, "source": source.as_str(),
                    "created_at": job.created_at.to_rfc3339(),
                    "expires_at": job.expires_at().to_rfc3339()}),
        )?;
        if let Some((_, Some(kind))) = if_new {
            let mut detail = json!({"status": job.status, "source": source.as_str()});
            if let Some(t) = &job.failure_reason_type {
                detail["failure_reason_type"] = json!(t);
            }
            journal_db(conn, now, Some(&job.id), company, kind, &detail)?;
        }
        return Ok(Upsert::New);
    }
    let prev: Option<(String, String, String, Option<i64>)> = conn.row(
        "SELECT status, proc_state, raw_json, last_updated_at FROM export_jobs WHERE id = ?1",
        &[&job.id],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
    )?;
    // Keep the newest observation: every change of a job at Pleo moves its `lastUpdatedAt`,
    // so an answer with an older one (a slow listing that began before our `started`) is
    // older news and changes nothing.
    if let Some((_, _, _, Some(stored))) = &prev
        && job.last_updated_at.is_none_or(|t| t.0 < *stored)
    {
        return Ok(Upsert::Unchanged);
    }
    let prev = prev.map(|(a, b, c, _)| (a, b, c));
    let prev_state = prev.as_ref().and_then(|(_, p, _)| ProcState::parse(p));
    let next = next_state(prev_state, job, source);
    let outcome = match &prev {
        // The insert above found the row, so it exists (jobmirror never deletes jobs).
        None => return Err(StoreError::Sql(rusqlite::Error::QueryReturnedNoRows)),
        Some((prev_status, _, prev_raw)) => {
            conn.exec(
                "UPDATE export_jobs SET status = ?2, last_updated_at = ?3, expires_in = ?4, expires_at = ?5, \
                 number_of_items = ?6, raw_json = ?7, last_seen_at = ?8 WHERE id = ?1",
                &[
                    &job.id,
                    &job.status,
                    &job.last_updated_at,
                    &job.expires_in_secs,
                    &job.expires_at(),
                    &job.number_of_items,
                    &raw,
                    &now,
                ],
            )?;
            if *prev_status != job.status {
                journal_db(
                    conn,
                    now,
                    Some(&job.id),
                    company,
                    EventKind::StatusChanged,
                    &json!({"from": prev_status, "to": job.status, "source": source.as_str()}),
                )?;
            }
            if *prev_raw == raw {
                Upsert::Unchanged
            } else {
                Upsert::Changed
            }
        }
    };
    if let Some((state, event)) = next {
        if prev_state != Some(state) {
            conn.exec(
                "UPDATE export_jobs SET proc_state = ?2, proc_state_at = ?3 WHERE id = ?1",
                &[&job.id, &state.as_str(), &now],
            )?;
        }
        if let Some(kind) = event {
            let mut detail = json!({"status": job.status, "source": source.as_str()});
            if let Some(t) = &job.failure_reason_type {
                detail["failure_reason_type"] = json!(t);
            }
            journal_db(conn, now, Some(&job.id), company, kind, &detail)?;
            if kind == EventKind::Expired && prev_state == Some(ProcState::New) {
                // Never taken: it expired while it waited (a lane busy with other companies'
                // jobs, a failing readiness check, a pause). Counted apart, so it is seen.
                journal_db(
                    conn,
                    now,
                    Some(&job.id),
                    company,
                    EventKind::ExpiredWaiting,
                    &json!({"created_at": job.created_at.to_rfc3339()}),
                )?;
            }
        }
    }
    Ok(outcome)
}
