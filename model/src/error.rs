//! The error type of the model crate. Each variant names what was wrong (file, tensor,
//! field) so that a bad checkpoint or request is reported, never a panic; the serving
//! crates map these to gRPC / HTTP codes at their edge.

use std::path::PathBuf;

/// Everything that can go wrong while loading a checkpoint or running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bad model config {path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("bad checkpoint file {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    #[error("tensor `{name}` not found in the checkpoint in {dir}")]
    MissingTensor { name: String, dir: PathBuf },
    #[error("tensor `{name}` in {path} has shape {actual:?}, expected {expected:?}")]
    Shape {
        name: String,
        path: PathBuf,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("tensor `{name}` in {path} has dtype {dtype}, which is not supported")]
    Dtype {
        name: String,
        path: PathBuf,
        dtype: String,
    },
    /// A request-level problem (bad token id, too long); `field` is the request field.
    #[error("invalid {field}: {reason}")]
    InvalidInput { field: &'static str, reason: String },
    /// The KV cache has no room for more tokens.
    #[error("KV cache is full: {0}")]
    KvCacheFull(String),
    /// A forward step failed; every sequence in it gets this.
    #[error("the step failed: {0}")]
    StepFailed(String),
    /// A device could not take or hold weights (e.g. a GPU out of memory).
    #[error("device {device}: {reason}")]
    Device { device: String, reason: String },
    /// The expert backend could not compute a MoE layer (e.g. a worker is gone).
    #[error(transparent)]
    Expert(#[from] crate::expert_backend::ExpertError),
}
