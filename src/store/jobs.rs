//! Jobs: the upsert of what Pleo lists (with the journal entries for what changed), the
//! pick query, state transitions, claims, deadlines, sync runs, and the per-company summary.

use super::*;

impl Store {
    /// Writes jobs read from Pleo, with the journal entries for what changed, in one transaction.
    pub fn upsert_jobs(&self, jobs: &[Job], now: Millis, source: Source) -> Result<Vec<Upsert>> {
        let tx = self.write_tx()?;
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
        journal(&self.conn, now, job_id, company_id, kind, &detail)?;
        Ok(())
    }

    /// The pick query: the company's oldest pending job not yet taken, whatever time it has
    /// left (a claim refreshes its deadline).
    pub fn pick_next(&self, company_id: &str) -> Result<Option<JobRow>> {
        Ok(self
            .conn
            .prepare_cached(PICK_SQL)?
            .query_row(params![company_id], job_row)
            .optional()?)
    }

    /// Companies with a job in hand or a job to claim (both from partial indexes).
    pub fn companies_with_work(&self) -> Result<std::collections::HashSet<String>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT company_id FROM export_jobs WHERE proc_state IN ('resume', 'claiming', 'claimed', 'processing') \
             UNION SELECT company_id FROM export_jobs WHERE status = 'pending' AND proc_state = 'new'",
        )?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The job jobmirror is working on for this company, if any.
    pub fn active_job(&self, company_id: &str) -> Result<Option<JobRow>> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM export_jobs \
             WHERE company_id = ?1 AND proc_state IN ('resume', 'claiming', 'claimed', 'processing') \
             ORDER BY created_at, created_at_sub_ns, id LIMIT 1"
        );
        Ok(self
            .conn
            .prepare_cached(&sql)?
            .query_row([company_id], job_row)
            .optional()?)
    }

    pub fn job(&self, job_id: &str) -> Result<Option<JobRow>> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM export_jobs WHERE id = ?1");
        Ok(self
            .conn
            .prepare_cached(&sql)?
            .query_row([job_id], job_row)
            .optional()?)
    }

    pub fn job_raw(&self, job_id: &str) -> Result<Option<Value>> {
        let raw: Option<String> = self
            .conn
            .query_row(
                "SELECT raw_json FROM export_jobs WHERE id = ?1",
                [job_id],
                |r| r.get(0),
            )
            .optional()?;
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
        let tx = self.write_tx()?;
        tx.execute(
            "UPDATE export_jobs SET proc_state = ?2, proc_state_at = ?3 WHERE id = ?1",
            params![job.id, to.as_str(), now.0],
        )?;
        journal(
            &tx,
            now,
            Some(&job.id),
            Some(&job.company_id),
            kind,
            &detail,
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Records that a `started` request is about to be sent.
    pub fn begin_claim(&self, job: &JobRow, now: Millis) -> Result<()> {
        let tx = self.write_tx()?;
        tx.execute(
            "UPDATE export_jobs SET proc_state = 'claiming', proc_state_at = ?2, \
             claim_attempts = claim_attempts + 1 WHERE id = ?1",
            params![job.id, now.0],
        )?;
        journal(
            &tx,
            now,
            Some(&job.id),
            Some(&job.company_id),
            EventKind::ClaimSent,
            &json!({"attempt": job.claim_attempts + 1}),
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Records the deadline a warning was journaled for, so it is journaled once.
    pub fn warn_deadline(&self, job: &JobRow, now: Millis) -> Result<()> {
        let tx = self.write_tx()?;
        tx.execute(
            "UPDATE export_jobs SET warned_expires_at = expires_at WHERE id = ?1",
            [&job.id],
        )?;
        journal(
            &tx,
            now,
            Some(&job.id),
            Some(&job.company_id),
            EventKind::DeadlineWarning,
            &json!({"expires_at": job.expires_at.to_rfc3339(), "seconds_left": now.until(job.expires_at) / 1000}),
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Ids of the company's jobs the mirror holds as open (`pending`/`in_progress`) that are not
    /// in `seen`.
    pub fn open_jobs_missing(
        &self,
        company_id: &str,
        seen: &std::collections::HashSet<String>,
    ) -> Result<Vec<String>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id FROM export_jobs WHERE company_id = ?1 AND status IN ('pending', 'in_progress')",
        )?;
        let rows = stmt.query_map([company_id], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for row in rows {
            let id = row?;
            if !seen.contains(&id) {
                out.push(id);
            }
        }
        Ok(out)
    }

    pub fn begin_sync_run(&self, company_id: &str, kind: &str, now: Millis) -> Result<i64> {
        self.conn.execute(
            "INSERT INTO sync_runs (company_id, kind, started_at) VALUES (?1, ?2, ?3)",
            params![company_id, kind, now.0],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    pub fn finish_sync_run(
        &self,
        run_id: i64,
        now: Millis,
        counts: &SyncCounts,
        error: Option<&str>,
    ) -> Result<()> {
        self.conn.execute(
            "UPDATE sync_runs SET finished_at = ?2, pages = ?3, jobs_seen = ?4, jobs_new = ?5, \
             jobs_changed = ?6, jobs_reread = ?7, error = ?8 WHERE id = ?1",
            params![
                run_id,
                now.0,
                counts.pages,
                counts.seen,
                counts.new,
                counts.changed,
                counts.reread,
                error
            ],
        )?;
        Ok(())
    }

    /// The journal, oldest first; for one job when `job_id` is given.
    pub fn events(&self, job_id: Option<&str>) -> Result<Vec<EventRow>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, at, job_id, company_id, kind, detail FROM job_events \
             WHERE ?1 IS NULL OR job_id = ?1 ORDER BY seq",
        )?;
        let rows = stmt.query_map([job_id], |r| {
            let detail: String = r.get(5)?;
            Ok(EventRow {
                seq: r.get(0)?,
                at: Millis(r.get(1)?),
                job_id: r.get(2)?,
                company_id: r.get(3)?,
                kind: r.get(4)?,
                detail: serde_json::from_str(&detail).unwrap_or(Value::Null),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Companies known to the mirror (from jobs and sync runs), sorted.
    pub fn companies(&self) -> Result<Vec<String>> {
        let mut stmt = self.conn.prepare(
            "SELECT company_id FROM export_jobs UNION SELECT company_id FROM sync_runs ORDER BY 1",
        )?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn company_summary(&self, company_id: &str) -> Result<CompanySummary> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT proc_state, count(*) FROM export_jobs WHERE company_id = ?1 GROUP BY proc_state ORDER BY proc_state",
        )?;
        let by_state = stmt
            .query_map([company_id], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let last: Option<(i64, Option<String>)> = self
            .conn
            .query_row(
                "SELECT finished_at, error FROM sync_runs WHERE company_id = ?1 AND finished_at IS NOT NULL \
                 ORDER BY finished_at DESC LIMIT 1",
                [company_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let mut recent = self.conn.prepare_cached(
            "SELECT error IS NOT NULL FROM sync_runs WHERE company_id = ?1 AND finished_at IS NOT NULL \
             ORDER BY finished_at DESC, id DESC LIMIT 100",
        )?;
        let mut failed_in_a_row = 0u32;
        for failed in recent.query_map([company_id], |r| r.get::<_, bool>(0))? {
            if !failed? {
                break;
            }
            failed_in_a_row += 1;
        }
        let next_deadline: Option<(String, i64)> = self
            .conn
            .query_row(
                "SELECT id, expires_at FROM export_jobs WHERE company_id = ?1 \
                 AND proc_state IN ('new', 'resume', 'claiming', 'claimed', 'processing') \
                 ORDER BY expires_at LIMIT 1",
                [company_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(CompanySummary {
            company_id: company_id.to_owned(),
            by_state,
            last_poll_at: last.as_ref().map(|(t, _)| Millis(*t)),
            last_poll_error: last.and_then(|(_, e)| e),
            failed_in_a_row,
            next_deadline: next_deadline.map(|(id, t)| (id, Millis(t))),
        })
    }
}

/// The pick query. Kept as a constant so tests can `EXPLAIN QUERY PLAN` the exact text.
pub const PICK_SQL: &str = "SELECT id, company_id, status, created_at, last_updated_at, expires_at, \
     number_of_items, proc_state, claim_attempts, warned_expires_at FROM export_jobs \
     WHERE company_id = ?1 AND status = 'pending' AND proc_state = 'new' \
     ORDER BY created_at, created_at_sub_ns, id LIMIT 1";

pub(super) fn journal(
    conn: &Connection,
    now: Millis,
    job_id: Option<&str>,
    company_id: Option<&str>,
    kind: EventKind,
    detail: &Value,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO job_events (at, job_id, company_id, kind, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        now.0,
        job_id,
        company_id,
        kind.as_str(),
        detail.to_string()
    ])?;
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

pub(super) fn upsert_one(
    conn: &Connection,
    job: &Job,
    now: Millis,
    source: Source,
) -> Result<Upsert> {
    let raw = job.raw.to_string();
    let company = Some(job.company_id.as_str());
    // Most jobs a listing brings are either new or unchanged: try the insert first, so a new
    // job costs no lookup.
    let if_new = next_state(None, job, source);
    let inserted = conn
        .prepare_cached(
            "INSERT INTO export_jobs (id, company_id, status, created_at, last_updated_at, expires_in, \
             expires_at, number_of_items, raw_json, first_seen_at, last_seen_at, proc_state, proc_state_at, \
             created_at_sub_ns) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10, ?11, ?10, ?12) ON CONFLICT (id) DO NOTHING",
        )?
        .execute(params![
            job.id,
            job.company_id,
            job.status,
            job.created_at.0,
            job.last_updated_at.map(|m| m.0),
            job.expires_in_secs,
            job.expires_at().0,
            job.number_of_items,
            raw,
            now.0,
            if_new.map_or(ProcState::New, |(s, _)| s).as_str(),
            job.created_at_sub_ns,
        ])?;
    if inserted == 1 {
        journal(
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
            journal(conn, now, Some(&job.id), company, kind, &detail)?;
        }
        return Ok(Upsert::New);
    }
    let prev: Option<(String, String, String, Option<i64>)> = conn
        .prepare_cached(
            "SELECT status, proc_state, raw_json, last_updated_at FROM export_jobs WHERE id = ?1",
        )?
        .query_row([&job.id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .optional()?;
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
            conn.prepare_cached(
                "UPDATE export_jobs SET status = ?2, last_updated_at = ?3, expires_in = ?4, expires_at = ?5, \
                 number_of_items = ?6, raw_json = ?7, last_seen_at = ?8 WHERE id = ?1",
            )?
            .execute(params![
                job.id,
                job.status,
                job.last_updated_at.map(|m| m.0),
                job.expires_in_secs,
                job.expires_at().0,
                job.number_of_items,
                raw,
                now.0,
            ])?;
            if *prev_status != job.status {
                journal(
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
            conn.prepare_cached(
                "UPDATE export_jobs SET proc_state = ?2, proc_state_at = ?3 WHERE id = ?1",
            )?
            .execute(params![job.id, state.as_str(), now.0])?;
        }
        if let Some(kind) = event {
            let mut detail = json!({"status": job.status, "source": source.as_str()});
            if let Some(t) = &job.failure_reason_type {
                detail["failure_reason_type"] = json!(t);
            }
            journal(conn, now, Some(&job.id), company, kind, &detail)?;
        }
    }
    Ok(outcome)
}
