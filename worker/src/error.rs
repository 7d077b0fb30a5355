//! The worker's error type. Each variant says what went wrong and is classified here, near
//! the cause ([`WorkerError::kind`]); the gRPC edge (`server`) turns the kind into a
//! status code once, without looking at message text.

use moe_model::{ExpertError, ModelError, RejectCode};
use moe_proto::v1::WorkerErrorCode;

/// Everything that can go wrong starting a node or changing what it hosts. Computing a
/// MoE layer reports [`moe_model::ExpertError`] instead, the error the router already
/// understands for every expert backend.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Reading the checkpoint or its config failed, or the model rejected the input.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A request named a device this node does not have.
    #[error("unknown device `{0}`")]
    UnknownDevice(String),
    /// The device list given at start is malformed (bad name, duplicate, unsupported).
    #[error("invalid device `{device}`: {reason}")]
    InvalidDevice { device: String, reason: String },
    /// A request named an expert the model does not have.
    #[error("invalid expert {expert} of layer {layer}: {reason}")]
    InvalidExpert {
        layer: usize,
        expert: u32,
        reason: String,
    },
    /// A device could not take the request (it failed and is restarting, or is stopped).
    #[error("device {device} is unavailable: {reason}")]
    Unavailable { device: String, reason: String },
    /// The actor system itself failed (an actor could not be spawned or answered nothing).
    #[error("actor system: {0}")]
    Actor(String),
}

/// How a caller should treat a [`WorkerError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is wrong; retrying it unchanged cannot help.
    InvalidArgument,
    /// Transient: try again later or on another replica.
    Unavailable,
    /// The worker itself is broken (bad checkpoint, actor system failure).
    Internal,
}

impl WorkerError {
    /// Classifies the error (by variant, never by message).
    pub fn kind(&self) -> ErrorKind {
        match self {
            WorkerError::Model(ModelError::InvalidInput { .. }) => ErrorKind::InvalidArgument,
            WorkerError::UnknownDevice(_)
            | WorkerError::InvalidDevice { .. }
            | WorkerError::InvalidExpert { .. } => ErrorKind::InvalidArgument,
            WorkerError::Unavailable { .. } => ErrorKind::Unavailable,
            WorkerError::Model(_) | WorkerError::Actor(_) => ErrorKind::Internal,
        }
    }
}

/// The `error_code` a dispatch answer carries for a compute error, by variant. A device
/// that did not answer in time is UNAVAILABLE to the router (another copy may answer);
/// a rejection passed on keeps its code.
pub fn wire_code(e: &ExpertError) -> WorkerErrorCode {
    match e {
        ExpertError::Invalid(_) => WorkerErrorCode::InvalidArgument,
        ExpertError::NotHosted { .. } => WorkerErrorCode::NotHosted,
        ExpertError::Deadline { .. } | ExpertError::Transport(_) | ExpertError::Unavailable(_) => {
            WorkerErrorCode::Unavailable
        }
        ExpertError::Rejected { code, .. } => match code {
            RejectCode::InvalidArgument => WorkerErrorCode::InvalidArgument,
            RejectCode::NotHosted => WorkerErrorCode::NotHosted,
            RejectCode::Unavailable | RejectCode::Other(_) => WorkerErrorCode::Unavailable,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compute_errors_get_their_wire_codes() {
        let cases = [
            (
                ExpertError::Invalid("rows".into()),
                WorkerErrorCode::InvalidArgument,
                3,
            ),
            (
                ExpertError::NotHosted {
                    layer: 1,
                    expert: 2,
                },
                WorkerErrorCode::NotHosted,
                5,
            ),
            (
                ExpertError::Deadline {
                    who: "device cpu:0".into(),
                    after: std::time::Duration::from_secs(1),
                },
                WorkerErrorCode::Unavailable,
                14,
            ),
            (
                ExpertError::Unavailable("restarting".into()),
                WorkerErrorCode::Unavailable,
                14,
            ),
        ];
        for (e, code, n) in cases {
            assert_eq!(wire_code(&e), code, "{e}");
            // The numbers on the wire are the gRPC codes routers already read.
            assert_eq!(wire_code(&e) as i32, n, "{e}");
        }
    }

    #[test]
    fn errors_are_classified_by_variant() {
        assert_eq!(
            WorkerError::UnknownDevice("cpu:9".into()).kind(),
            ErrorKind::InvalidArgument
        );
        assert_eq!(
            WorkerError::Unavailable {
                device: "cpu:0".into(),
                reason: "restarting".into()
            }
            .kind(),
            ErrorKind::Unavailable
        );
        assert_eq!(
            WorkerError::Actor("gone".into()).kind(),
            ErrorKind::Internal
        );
        let bad_input = ModelError::InvalidInput {
            field: "experts",
            reason: "no".into(),
        };
        assert_eq!(
            WorkerError::from(bad_input).kind(),
            ErrorKind::InvalidArgument
        );
    }
}
