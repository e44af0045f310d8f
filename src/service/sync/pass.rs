//! What a listing pass is (its kind) and how it fails: shared by the mirror, the listing
//! pool's workers and the pass itself.

use crate::pleo::PleoError;
use crate::store::StoreError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassKind {
    /// Start-up: `pending` and `in_progress`, so jobs held before a crash are found.
    Recovery,
    /// Scheduled: `pending` only.
    Poll,
    /// Run now on request (SIGUSR1, `jobmirror trigger`): same as a poll.
    Trigger,
}

impl PassKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PassKind::Recovery => "recovery",
            PassKind::Poll => "poll",
            PassKind::Trigger => "trigger",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Pleo(#[from] PleoError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The poll schedule's name for the companies sharing the default credential when they are
/// listed together (`list_by_credential`).
pub const GROUP_KEY: &str = "(companies sharing the default credential)";
