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

impl From<ModelError> for ServeError {
    fn from(e: ModelError) -> ServeError {
        match e {
            ModelError::InvalidInput { field, reason } => ServeError::invalid(field, reason),
            ModelError::KvCacheFull(r) => ServeError::Overloaded(format!("KV cache full: {r}")),
            ModelError::Expert(ExpertError::Unavailable(r)) => ServeError::Unavailable(r),
            ModelError::Expert(ExpertError::NotHosted { layer, expert }) => {
                ServeError::Unavailable(format!(
                    "expert {expert} of layer {layer} is not hosted by any live worker"
                ))
            }
            other => ServeError::Internal(other.to_string()),
        }
    }
}
