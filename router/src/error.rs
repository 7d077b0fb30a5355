//! Errors of the serving path, classified where they arise and mapped to a gRPC status or
//! HTTP code once, at the edge. Clients get a clear message; operator detail goes to logs.

use moe_model::{ExpertError, ModelError};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ServeError {
    /// The request is wrong; `field` names the request field.
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// Too much work queued; try later.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// Experts (workers) could not be reached, or the server is shutting down.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A bug or an unexpected failure.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServeError {
    pub fn invalid(field: &str, reason: impl Into<String>) -> ServeError {
        ServeError::InvalidArgument {
            field: field.to_owned(),
            reason: reason.into(),
        }
    }

    /// The `outcome` label of the request counter.
    pub fn outcome(&self) -> &'static str {
        match self {
            ServeError::InvalidArgument { .. } => "invalid",
            ServeError::Overloaded(_) => "overloaded",
            ServeError::Unavailable(_) => "unavailable",
            ServeError::Internal(_) => "error",
        }
    }

    pub fn to_status(&self) -> tonic::Status {
        match self {
            ServeError::InvalidArgument { .. } => tonic::Status::invalid_argument(self.to_string()),
            ServeError::Overloaded(_) => tonic::Status::resource_exhausted(self.to_string()),
            ServeError::Unavailable(_) => tonic::Status::unavailable(self.to_string()),
            ServeError::Internal(_) => tonic::Status::internal(self.to_string()),
        }
    }

    pub fn http_status(&self) -> u16 {
        match self {
            ServeError::InvalidArgument { .. } => 400,
            ServeError::Overloaded(_) => 429,
            ServeError::Unavailable(_) => 503,
            ServeError::Internal(_) => 500,
        }
    }
}

/// A MoE layer that could not be computed, once the dispatch has used up its retries.
///
/// Every failure to reach or hear from the experts is UNAVAILABLE (gRPC) / 503 (HTTP):
/// no copy left, no connection, a worker that refused for a reason of its own (not
/// hosted, restarting), and a worker that gave no answer in time. The last is not
/// DEADLINE_EXCEEDED on purpose: that code tells a client its own deadline passed, and
/// common retry policies do not retry it, while a silent worker is a server-side outage
/// the client should retry (after the router has already tried every copy within
/// `deadline × (retries + 1)`); the placement usually heals it within seconds.
///
/// A malformed expert request (`Invalid`, or a worker refusing one as INVALID_ARGUMENT)
/// is INTERNAL / 500, not INVALID_ARGUMENT: the router built it from a request it had
/// validated, so the mismatch is the cluster's (e.g. a worker serving another model),
/// and the client's request is not wrong.
impl From<ExpertError> for ServeError {
    fn from(e: ExpertError) -> ServeError {
        match e {
            ExpertError::Unavailable(r) | ExpertError::Transport(r) => ServeError::Unavailable(r),
            ExpertError::NotHosted { layer, expert } => ServeError::Unavailable(format!(
                "expert {expert} of layer {layer} is not hosted by any live worker"
            )),
            e @ ExpertError::Deadline { .. } => ServeError::Unavailable(e.to_string()),
            ExpertError::Rejected { ref code, .. } if code.is_retryable() => {
                ServeError::Unavailable(e.to_string())
            }
            e @ (ExpertError::Invalid(_) | ExpertError::Rejected { .. }) => {
                ServeError::Internal(e.to_string())
            }
        }
    }
}

impl From<ModelError> for ServeError {
    fn from(e: ModelError) -> ServeError {
        match e {
            ModelError::InvalidInput { field, reason } => ServeError::invalid(field, reason),
            ModelError::KvCacheFull(r) => ServeError::Overloaded(format!("KV cache full: {r}")),
            ModelError::Expert(e) => ServeError::from(e),
            other => ServeError::Internal(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_model::RejectCode;
    use std::time::Duration;

    fn status(e: ExpertError) -> (tonic::Code, u16, String) {
        let s = ServeError::from(ModelError::Expert(e));
        (s.to_status().code(), s.http_status(), s.to_string())
    }

    #[test]
    fn expert_errors_become_the_status_a_client_should_act_on() {
        let (code, http, m) = status(ExpertError::Unavailable(
            "no live worker hosts layer 1 experts {3}".into(),
        ));
        assert_eq!((code, http), (tonic::Code::Unavailable, 503));
        assert!(
            m.contains("no live worker hosts layer 1 experts {3}"),
            "{m}"
        );

        let (code, http, m) = status(ExpertError::Deadline {
            who: "worker w:1".into(),
            after: Duration::from_millis(250),
        });
        assert_eq!((code, http), (tonic::Code::Unavailable, 503));
        assert!(m.contains("worker w:1: no response within 250 ms"), "{m}");

        let (code, http, m) = status(ExpertError::Transport(
            "worker w:1: the dispatch stream is closed".into(),
        ));
        assert_eq!((code, http), (tonic::Code::Unavailable, 503));
        assert!(m.contains("the dispatch stream is closed"), "{m}");

        for c in [
            RejectCode::NotHosted,
            RejectCode::Unavailable,
            RejectCode::Other(77),
        ] {
            let (code, http, _) = status(ExpertError::Rejected {
                worker: "w:1".into(),
                code: c,
                message: "no".into(),
            });
            assert_eq!((code, http), (tonic::Code::Unavailable, 503), "{c}");
        }
        let (code, http, m) = status(ExpertError::NotHosted {
            layer: 2,
            expert: 5,
        });
        assert_eq!((code, http), (tonic::Code::Unavailable, 503));
        assert!(m.contains("expert 5 of layer 2"), "{m}");
    }

    #[test]
    fn a_malformed_expert_request_is_the_cluster_s_fault_not_the_client_s() {
        let (code, http, _) = status(ExpertError::Invalid("sizes".into()));
        assert_eq!((code, http), (tonic::Code::Internal, 500));
        let (code, http, m) = status(ExpertError::Rejected {
            worker: "w:1".into(),
            code: RejectCode::InvalidArgument,
            message: "hidden_size 8 is not the model's 16".into(),
        });
        assert_eq!((code, http), (tonic::Code::Internal, 500));
        assert!(m.contains("hidden_size 8"), "{m}");
    }
}
