//! moe-router: the serving front of moe-cluster.
//!
//! - [`grpc`] and [`http`]: the client APIs (gRPC `moe.v1.Generation`; HTTP: the
//!   OpenAI-compatible `/v1/completions`, `/v1/chat/completions`, `/v1/models`, plus
//!   `/metrics`, `/health`), over one [`grpc::Api`].
//! - [`api_keys`]: the bearer keys both client APIs require when any are configured.
//! - [`chat_template`]: the checkpoint's Jinja chat template, for `/v1/chat/completions`.
//! - [`request`]: client request → validated `SequenceRequest`.
//! - [`limits`]: every bound on what clients send and hold, checked at start-up.
//! - [`scheduler`]: the engine thread with continuous batching.
//! - [`dispatch`]: the expert backends — device actors in this process, or workers over
//!   gRPC (partition, retries, routes, worker health, the worker client).
//! - [`elastic`]: workers from the etcd membership, placement that follows it.
//! - [`serve`]: wiring it all up, placement at start, graceful shutdown.
//! - [`readiness`]: whether the router can serve now (health services, `/health`).
//! - [`metrics`]: Prometheus names and the registry; [`load`]: per-expert load counters.
//! - [`cluster_status`]: placement and per-expert load for operators (`/v1/cluster`).
//! - `fuzzing`: the bodies of the fuzz targets over request bodies and placement
//!   documents (`fuzz/`).

pub mod api_keys;
pub mod chat_template;
pub mod cluster_status;
pub mod dispatch;
pub mod elastic;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod grpc;
pub mod http;
pub mod limits;
pub mod load;
pub mod metrics;
pub mod readiness;
pub mod request;
pub mod scheduler;
pub mod serve;
pub mod static_control;

pub use error::ServeError;
pub use serve::{run_router, Bound, ExpertSource, RouterConfig};
