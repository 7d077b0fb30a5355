//! moe-model: the math of moe-cluster, with no networking.
//!
//! - [`config`]: a Hugging Face `config.json` → one [`ModelSpec`] for all six architectures.
//! - [`checkpoint`]: memory-mapped safetensors (sharded, f32/bf16/f16/FP8) → f32 tensors.
//! - [`model`]: the dense model and its batched forward step; [`experts`]: the routed
//!   experts and the [`ExpertBackend`] seam that the router fills with remote workers;
//!   [`expert_store`]: what a device hosts ([`ExpertStore`]: the CPU kernel's
//!   [`LocalExperts`] or [`CandleExperts`] on a candle device).
//! - [`agreement`]: how close a lower precision (int8, bf16) stays to f32.
//! - [`kv_cache`], [`attention`], [`rope`], [`routing`], [`linalg`]: the blocks.
//! - [`sampling`], [`stop`], [`tokenizer`]: from logits to text.
//! - [`tiny`]: writes small random-weight checkpoints in the exact Hugging Face format.
//! - `fuzzing`: the bodies of the fuzz targets over checkpoint files and tokenizer input
//!   (`fuzz/`).

pub mod agreement;
pub mod attention;
pub mod candle_experts;
pub mod chat_templates;
pub mod checkpoint;
pub mod config;
pub mod demo_tokenizer;
pub mod error;
pub mod expert_backend;
pub mod expert_store;
pub mod experts;
#[doc(hidden)]
pub mod fuzzing;
pub mod kv_cache;
pub mod linalg;
pub mod model;
pub mod progress;
pub mod rope;
pub mod routing;
pub mod sampling;
pub mod sequence;
pub mod stop;
pub mod tiny;
pub mod tokenizer;

pub use candle_experts::CandleExperts;
pub use config::{Arch, ModelSpec};
pub use error::ModelError;
pub use expert_backend::{ExpertBackend, ExpertError, MoeBatch, MoeRequest, Pending, RejectCode};
pub use expert_store::{ExpertStore, StoreDevice};
pub use experts::LocalExperts;
pub use kv_cache::{KvPool, SeqCache};
pub use linalg::WeightDtype;
pub use model::{Model, StepSeq};
pub use progress::Progress;
pub use sampling::{Sampled, SamplingParams};
pub use sequence::{Sequence, SequenceRequest};
pub use stop::{FinishReason, StopParams};
pub use tokenizer::Tokenizer;
