//! Pleo's wire model: what its Export API and webhooks say, as types (jobs, job events,
//! statuses and failure types as its OpenAPI files list them, the webhook event types, the
//! errors an answer can be) and the credential type that never shows its value.
//!
//! The invariant: a leaf. It imports nothing of ours but the clock, so the store, the client,
//! the receiver and the fake all speak the same words without depending on one another.

use std::fmt;

use serde::Serialize;
use serde_json::Value;

use crate::clock::Millis;

/// A credential. Its `Debug` and `Display` never show the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Job failure types Pleo accepts (`ExportJobFailureReasonType`).
pub const JOB_FAILURE_TYPES: &[&str] = &[
    "invalid_configuration",
    "missing_configuration",
    "authentication_failure",
    "accounting_system_authentication_failure",
    "pleo_rate_limit",
    "accounting_system_rate_limit",
    "service_unreachable",
    "accounting_system_unreachable",
    "validation_failure",
    "authorization_failure",
    "integration_unusable",
    "job_expired",
    "service_timeout",
    "accounting_system_timeout",
    "canceled_by_user",
];

/// Item failure types Pleo accepts (`ExportJobItemFailureReasonType`).
pub const ITEM_FAILURE_TYPES: &[&str] = &[
    "receipt_upload_failure",
    "receipt_download_failure",
    "receipt_file_size_limit_exceeded",
    "receipt_conversion_failure",
    "unexpected_failure",
    "invalid_configuration",
    "missing_configuration",
    "accounting_system_authentication_failure",
    "accounting_system_rate_limit",
    "accounting_system_unreachable",
    "validation_failure",
    "accounting_system_validation_failure",
    "authorization_failure",
    "accounting_system_timeout",
    "vendor_unknown",
    "account_unknown",
    "tax_code_unknown",
    "tag_unknown",
];

/// Item statuses Pleo knows (`ExportJobItemStatus`).
pub const ITEM_STATUSES: &[&str] = &[
    "pending",
    "in_progress",
    "failed",
    "successful",
    "abandoned",
];

/// Job statuses Pleo knows (`ExportJobStatus`).
pub const JOB_STATUSES: &[&str] = &[
    status::PENDING,
    status::IN_PROGRESS,
    status::FAILED,
    status::COMPLETED,
    status::COMPLETED_WITH_ERRORS,
];

/// Job events Pleo takes (`ExportJobEventType`).
pub const JOB_EVENTS: &[&str] = &["started", "failed", "completed", "completed_with_errors"];

/// Job statuses as Pleo spells them.
pub mod status {
    pub const PENDING: &str = "pending";
    pub const IN_PROGRESS: &str = "in_progress";
    pub const FAILED: &str = "failed";
    pub const COMPLETED: &str = "completed";
    pub const COMPLETED_WITH_ERRORS: &str = "completed_with_errors";

    pub fn is_terminal(s: &str) -> bool {
        matches!(s, FAILED | COMPLETED | COMPLETED_WITH_ERRORS)
    }
}

/// An export job: the fields jobmirror decides on, plus the raw JSON as Pleo sent it.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    pub id: String,
    pub company_id: String,
    pub status: String,
    pub created_at: Millis,
    /// Nanoseconds of `createdAt` past `created_at` (its full precision, for ordering jobs
    /// created within one millisecond).
    pub created_at_sub_ns: i64,
    pub last_updated_at: Option<Millis>,
    pub expires_in_secs: i64,
    pub number_of_items: i64,
    pub failure_reason_type: Option<String>,
    pub raw: Value,
}

impl Job {
    /// Reads a job object; unknown fields are kept in `raw`, missing required ones are an error.
    pub fn from_value(v: Value) -> Result<Job, PleoError> {
        fn text(v: &Value, k: &str) -> Result<String, PleoError> {
            v.get(k)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| PleoError::Decode(format!("export job lacks string field `{k}`")))
        }
        fn time(v: &Value, k: &str) -> Result<Option<Millis>, PleoError> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Millis::parse_rfc3339(s).map(Some).ok_or_else(|| {
                    PleoError::Decode(format!("export job `{k}` is not RFC 3339: {s:?}"))
                }),
                Some(other) => Err(PleoError::Decode(format!(
                    "export job `{k}` is not a string: {other}"
                ))),
            }
        }
        let id = text(&v, "id")?;
        let company_id = text(&v, "companyId")?;
        let status = text(&v, "status")?;
        let created_text = text(&v, "createdAt")?;
        let (created_at, created_at_sub_ns) = Millis::parse_rfc3339_fine(&created_text)
            .ok_or_else(|| {
                PleoError::Decode(format!(
                    "export job `createdAt` is not RFC 3339: {created_text:?}"
                ))
            })?;
        let last_updated_at = time(&v, "lastUpdatedAt")?;
        let expires_in_secs = v
            .get("expiresIn")
            .and_then(Value::as_i64)
            .ok_or_else(|| PleoError::Decode("export job lacks integer `expiresIn`".into()))?;
        let number_of_items = v.get("numberOfItems").and_then(Value::as_i64).unwrap_or(0);
        let failure_reason_type = v
            .get("failureReasonType")
            .and_then(Value::as_str)
            .map(str::to_owned);
        Ok(Job {
            id,
            company_id,
            status,
            created_at,
            created_at_sub_ns,
            last_updated_at,
            expires_in_secs,
            number_of_items,
            failure_reason_type,
            raw: v,
        })
    }

    /// When Pleo expires the job: `expiresIn` seconds after `lastUpdatedAt` (or `createdAt`).
    pub fn expires_at(&self) -> Millis {
        self.last_updated_at
            .unwrap_or(self.created_at)
            .plus_secs(self.expires_in_secs)
    }
}

/// The events a job can be sent (`POST /v3/export-job-events`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobEventKind {
    Started,
    Completed,
    CompletedWithErrors,
    Failed,
}

impl JobEventKind {
    /// The name on the wire (and in the journal).
    pub fn as_str(self) -> &'static str {
        match self {
            JobEventKind::Started => "started",
            JobEventKind::Completed => "completed",
            JobEventKind::CompletedWithErrors => "completed_with_errors",
            JobEventKind::Failed => "failed",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JobEvent {
    pub event: JobEventKind,
    pub job_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_reason_type: Option<String>,
}

impl JobEvent {
    /// An event without a failure reason.
    pub fn new(event: JobEventKind, job_id: &str) -> JobEvent {
        JobEvent {
            event,
            job_id: job_id.to_owned(),
            failure_reason: None,
            failure_reason_type: None,
        }
    }
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum PleoError {
    /// Pleo answered with an error status; `kind` and `message` come from its error body.
    #[error("Pleo answered {status} {kind}: {message}")]
    Api {
        status: u16,
        kind: String,
        message: String,
    },
    /// No usable answer (connect, timeout, reset, truncated body).
    #[error("transport error talking to Pleo: {0}")]
    Transport(String),
    /// An answer that does not match the contract.
    #[error("unexpected answer from Pleo: {0}")]
    Decode(String),
    #[error("Pleo client configuration: {0}")]
    Config(String),
}

/// Statuses that answer "not done, try later": the request was not applied. (A 504 is a
/// gateway giving up waiting, so whatever was behind it may have happened.)
pub fn refuses(status: u16) -> bool {
    matches!(status, 429 | 500 | 502 | 503)
}

impl PleoError {
    /// Pleo answered, and the answer says the request was not applied (see [`refuses`]).
    pub fn is_unapplied(&self) -> bool {
        matches!(self, PleoError::Api { status, .. } if refuses(*status))
    }
    /// Whether repeating the same request later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            PleoError::Api { status, .. } => *status == 429 || *status >= 500,
            PleoError::Transport(_) => true,
            PleoError::Decode(_) | PleoError::Config(_) => false,
        }
    }
    /// 401 or 403: Pleo refuses the credential (revoked, wrong, or not for this company).
    /// Trying again does not help; someone has to fix the key.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            PleoError::Api {
                status: 401 | 403,
                ..
            }
        )
    }
    /// `422 INVALID_EXPORT_JOB_STATUS_CHANGE`: another claimer won, or the job moved on.
    pub fn is_status_conflict(&self) -> bool {
        matches!(self, PleoError::Api { status: 422, kind, .. } if kind == "INVALID_EXPORT_JOB_STATUS_CHANGE")
    }
    pub fn status(&self) -> Option<u16> {
        match self {
            PleoError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Whether a stored error text (a [`PleoError`]'s message, as `sync_runs.error` keeps it)
/// says Pleo refused the credential.
pub fn is_refusal_text(error: &str) -> bool {
    error.starts_with("Pleo answered 401 ") || error.starts_with("Pleo answered 403 ")
}

/// Event types that announce a new export job, in every spelling Pleo's pages use.
pub const JOB_EVENT_TYPES: &[&str] = &[
    "v1.export-job.created",
    "v1.export.job-created",
    "v2.export-job.created",
    "export-job.created",
];

/// Whether `event_type` announces a new export job (any spelling above, any letter case).
pub fn is_job_event(event_type: &str) -> bool {
    JOB_EVENT_TYPES
        .iter()
        .any(|t| t.eq_ignore_ascii_case(event_type.trim()))
}

/// A UUID in its canonical text form (8-4-4-4-12 hexadecimal digits), as Pleo's files type
/// ids (`format: uuid`: company ids, job ids in requests).
pub fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}
