//! moe-worker: the worker side of moe-cluster. A worker process hosts routed experts on
//! its devices and computes `sum_k w_k · FFN_e_k(x)` for the rows routers send it; it
//! keeps no per-request state, so any copy of an expert gives the same numbers.
//!
//! - [`Node`] ([`node`]): the in-process API, also used by the router's standalone mode:
//!   start, load/unload experts, compute a MoE layer, info, stop.
//! - `supervisor` and `actor`: one ractor `DeviceActor` per device under a supervisor that
//!   restarts a failed device and reloads the experts it held; `slot` is the shared view
//!   of each device (its live actor and the experts it holds); `device` opens each
//!   device with its own compute threads and the sizes it announces.
//! - `fanout`: splits a request's expert slots among the devices and adds the partial sums
//!   back together.
//! - [`server`]: the gRPC `ExpertService` (plus health and reflection) over a [`Node`];
//!   [`wire`] decodes and validates its messages; `http` serves `/metrics` and `/health`.
//! - [`metrics`]: Prometheus metric names and the per-node registry.
//! - `fuzzing`: the body of the dispatch-message fuzz target (`fuzz/`).

mod actor;
pub mod config;
mod device;
pub mod error;
mod fanout;
#[doc(hidden)]
pub mod fuzzing;
mod http;
pub mod metrics;
pub mod node;
pub mod server;
mod slot;
mod supervisor;
pub mod wire;

pub use config::{DeviceKind, DeviceName, NodeConfig};
pub use error::WorkerError;
pub use metrics::WorkerMetrics;
pub use node::{DeviceState, Node, NodeInfo};
pub use server::{
    expert_service, serve_worker, serve_worker_with, ExpertServer, WorkerServeConfig,
};
