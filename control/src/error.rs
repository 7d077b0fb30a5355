//! The error of the control plane (membership, election, placement storage).
//!
//! Classified near the cause so the edges (gRPC, HTTP, CLI) can map it without reading
//! strings: [`ControlError::is_unavailable`] says "etcd could not be reached in time,
//! try later", the other variants are definite answers.

use std::time::Duration;

/// Why a control-plane operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A caller-supplied value is unusable (empty id, bad cluster name, TTL too short).
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// etcd answered with an error or the connection failed.
    #[error("etcd {op} failed: {source}")]
    Etcd {
        /// The operation that failed (`get`, `lease grant`, ...).
        op: &'static str,
        /// The client's error.
        #[source]
        source: etcd_client::Error,
    },
    /// etcd did not answer within the deadline: silence is failure.
    #[error("etcd {op} timed out after {after:?}")]
    DeadlineExceeded {
        /// The operation that timed out.
        op: &'static str,
        /// The deadline it ran under.
        after: Duration,
    },
    /// A fenced write was refused: the writer's leadership (token) is no longer current.
    #[error("write refused: leadership with fencing token {token} is no longer current")]
    Fenced {
        /// The stale token's revision.
        token: i64,
    },
    /// A compare-and-swap lost against a concurrent write of the same key.
    #[error("write of {key} lost a race with a concurrent write")]
    Conflict {
        /// The key written.
        key: String,
    },
    /// A placement version that does not advance the stored one.
    #[error("placement version {proposed} does not advance the stored version {current}")]
    StaleVersion {
        /// The version already stored.
        current: u64,
        /// The version proposed.
        proposed: u64,
    },
    /// A stored value could not be decoded.
    #[error("undecodable value at {key}: {source}")]
    Decode {
        /// The key read.
        key: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// The background task that served this handle has stopped.
    #[error("the {0} task has stopped")]
    Stopped(&'static str),
}

impl ControlError {
    /// True when etcd was unreachable or too slow: the operation may succeed later.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Etcd { .. } | Self::DeadlineExceeded { .. })
    }

    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }
}
