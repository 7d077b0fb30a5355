//! The worker's error type. Each variant says what went wrong and is classified here, near
//! the cause ([`WorkerError::kind`]); the gRPC edge (`server`) turns the kind into a
//! status code once, without looking at message text.

use moe_model::ModelError;

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

#[cfg(test)]
mod tests {
    use super::*;

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
