//! Shared set-up: a fake Pleo on a loopback port, a temp database, a manual clock.

use std::path::PathBuf;
use std::sync::Arc;

use jobmirror::clock::{ManualClock, Millis, SharedClock};
use jobmirror::pleo::{Auth, ClientConfig, PleoClient, Secret};
use jobmirror::sandbox::{FakeConfig, FakePleo, JobSpec};
use jobmirror::service::processor::{Processor, ProcessorConfig};
use jobmirror::service::sync::Mirror;
use jobmirror::store::Store;

pub const T0: &str = "2026-11-24T09:00:00Z";
pub const KEY: &str = "test-key";

pub struct World {
    pub clock: Arc<ManualClock>,
    pub fake: FakePleo,
    pub _dir: tempfile::TempDir,
    pub db: PathBuf,
    pub page_size: u32,
}

impl World {
    pub fn new() -> World {
        let clock = ManualClock::new(Millis::parse_rfc3339(T0).unwrap());
        let shared: SharedClock = clock.clone();
        let fake = FakePleo::start(
            "127.0.0.1:0",
            FakeConfig {
                api_keys: vec![KEY.into()],
                ..FakeConfig::default()
            },
            shared,
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("jobmirror.db");
        World {
            clock,
            fake,
            _dir: dir,
            db,
            page_size: 100,
        }
    }

    pub fn shared_clock(&self) -> SharedClock {
        self.clock.clone()
    }

    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new(&self.fake.base_url(), Auth::ApiKey(Secret::new(KEY)));
        c.page_size = self.page_size;
        c
    }

    pub fn client(&self) -> Arc<PleoClient> {
        Arc::new(PleoClient::new(self.client_config(), self.shared_clock()).unwrap())
    }

    pub fn clock_now(&self) -> jobmirror::clock::Millis {
        use jobmirror::clock::Clock;
        self.clock.now()
    }

    /// The world's client as the only credential.
    pub fn clients(&self) -> Arc<jobmirror::pleo::Clients> {
        jobmirror::pleo::Clients::single(self.client())
    }

    pub fn store(&self) -> Store {
        Store::open(&self.db).unwrap()
    }

    pub fn mirror(&self, companies: &[&str]) -> Mirror {
        Mirror::new(
            self.store(),
            self.clients(),
            self.shared_clock(),
            companies.iter().map(|s| s.to_string()).collect(),
        )
    }

    pub fn processor(&self, companies: &[&str], cfg: ProcessorConfig) -> Processor {
        Processor::new(
            self.store(),
            self.clients(),
            self.shared_clock(),
            companies.iter().map(|s| s.to_string()).collect(),
            cfg,
        )
    }

    /// A processor whose host clock runs `offset_ms` ahead of Pleo's (the fake's); the returned
    /// clock can jump further.
    pub fn processor_skewed(
        &self,
        companies: &[&str],
        cfg: ProcessorConfig,
        offset_ms: i64,
    ) -> (Processor, Arc<jobmirror::clock::OffsetClock>) {
        let host = jobmirror::clock::OffsetClock::new(self.shared_clock());
        host.jump(offset_ms);
        let clock: SharedClock = host.clone();
        let p = Processor::new(
            self.store(),
            self.clients(),
            clock,
            companies.iter().map(|s| s.to_string()).collect(),
            cfg,
        );
        (p, host)
    }

    /// Adds a pending job created `secs_ago` seconds before now.
    pub fn pending(&self, company: &str, id: &str, secs_ago: i64) -> String {
        self.fake
            .add_job(JobSpec {
                id: Some(id.into()),
                company_id: company.into(),
                status: "pending".into(),
                created_secs_ago: Some(secs_ago),
                items: Some(1),
                ..JobSpec::default()
            })
            .unwrap()
    }

    pub fn in_progress(&self, company: &str, id: &str, secs_ago: i64) -> String {
        self.fake
            .add_job(JobSpec {
                id: Some(id.into()),
                company_id: company.into(),
                status: "in_progress".into(),
                created_secs_ago: Some(secs_ago),
                items: Some(1),
                ..JobSpec::default()
            })
            .unwrap()
    }

    /// Journal kinds for one job, in order.
    pub fn kinds(&self, job: &str) -> Vec<String> {
        self.store()
            .events(Some(job))
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect()
    }

    /// Bodies of every `POST /v3/export-job-events` the fake received, as (event, jobId).
    pub fn job_events_sent(&self) -> Vec<(String, String)> {
        self.fake
            .requests()
            .into_iter()
            .filter(|r| r.method == "POST" && r.path == "/v3/export-job-events")
            .map(|r| {
                let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
                (
                    v["event"].as_str().unwrap().to_owned(),
                    v["jobId"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    /// The jobs `started` was sent for, in order.
    pub fn started_sent(&self) -> Vec<String> {
        self.job_events_sent()
            .into_iter()
            .filter(|(e, _)| e == "started")
            .map(|(_, j)| j)
            .collect()
    }

    /// Finishes a job at the fake as its holder would (so the company can take the next one).
    pub fn complete_at_pleo(&self, job: &str) {
        use jobmirror::pleo::{JobEvent, JobEventKind};
        self.client()
            .post_event(&JobEvent::new(JobEventKind::Completed, job))
            .unwrap();
    }
}

impl World {
    /// Where the `outbox:` handler of this world writes.
    pub fn outbox(&self) -> PathBuf {
        self.db.parent().unwrap().join("outbox")
    }

    /// A service configuration pointing at this world's fake and database.
    pub fn config(
        &self,
        companies: &[&str],
        extra: &[(&str, String)],
    ) -> jobmirror::config::Config {
        let mut env: Vec<(String, String)> = vec![
            ("JOBMIRROR_DB".into(), self.db.display().to_string()),
            ("JOBMIRROR_PLEO_BASE_URL".into(), self.fake.base_url()),
            ("JOBMIRROR_PLEO_API_KEY".into(), KEY.into()),
            ("JOBMIRROR_COMPANY_IDS".into(), companies.join(",")),
            ("JOBMIRROR_POLL_INTERVAL_SECS".into(), "3600".into()),
            ("JOBMIRROR_ADMIN_LISTEN".into(), "127.0.0.1:0".into()),
            (
                "JOBMIRROR_HANDLER_COMMAND".into(),
                format!("outbox:{}", self.outbox().display()),
            ),
        ];
        env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        jobmirror::config::Config::load_with(None, &|k| {
            // Later entries (the extras) win.
            env.iter()
                .rev()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
        })
        .unwrap()
    }
}

/// Runs `cmd` with `input` on its stdin; returns what it printed and how it ended.
pub fn pipe_through(cmd: &mut std::process::Command, input: &[u8]) -> std::process::Output {
    use std::io::Write as _;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}
