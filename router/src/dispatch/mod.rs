//! Expert dispatch: the router's expert backends, plugged into the model's
//! `ExpertBackend` seam, by responsibility:
//!
//! - [`local`]: [`LocalBackend`], device actors in this process (standalone mode).
//! - [`remote`]: [`RemoteBackend`]'s dispatch: send each worker, concurrently, only the
//!   rows and expert slots it hosts, retry failed parts on other copies, wait for a copy
//!   under elastic membership, overlap (`submit`).
//! - [`partition`]: splitting a layer's rows into per-worker parts and adding their
//!   partial sums back (pure functions).
//! - [`routes`]: the route table (`(layer, expert)` → workers), its epochs and the drain
//!   of dispatches under older routes, the placement it follows.
//! - [`health`]: workers marked down after a failed dispatch, live copies per expert.
//! - [`client`]: [`WorkerClient`], the gRPC connection to one worker.
//!
//! Both backends retry a failed dispatch within a bound and count tokens per expert
//! (the per-expert load no other server exports). The engine thread calls `forward`
//! synchronously; the backends bridge into the async runtime with `Handle::block_on`
//! (the engine thread is not a runtime thread).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moe_model::experts::NO_EXPERT;
use moe_model::{ExpertError, MoeRequest};
use moe_proto::rows::RowDtype;

use crate::metrics::RouterMetrics;

pub mod client;
mod health;
pub mod local;
mod partition;
pub mod remote;
mod routes;

pub use client::WorkerClient;
pub use local::LocalBackend;
pub use remote::RemoteBackend;
pub(crate) use routes::routes_of;

/// Deadlines and retries of expert dispatch.
#[derive(Clone)]
pub struct DispatchConfig {
    /// Deadline of one dispatch to one worker.
    pub deadline: Duration,
    /// Further attempts after a failed dispatch.
    pub max_retries: u32,
    /// Wait before a retry (doubles each time).
    pub retry_backoff: Duration,
    /// How long a worker whose dispatch failed is skipped by later calls while another
    /// copy of its experts exists (a sole copy is still tried).
    pub mark_down_for: Duration,
    /// Mutual TLS to the workers (the router's certificate, the cluster CA, the worker
    /// role required of them); `None`: plain TCP (`--insecure`).
    pub worker_tls: Option<Arc<moe_tls::ClientConfig>>,
    /// gRPC message limit of dispatch streams, each way: the largest step's dispatch
    /// (`--max-batch-tokens` rows), set by [`crate::run_router`] once the model is known.
    pub max_message_bytes: usize,
    /// Element type of rows on the wire (`--dispatch-dtype`): f32 (exact) or bf16 (half
    /// the bytes; results come back in the same type).
    pub dtype: RowDtype,
    /// Overlap dispatches with computation (`--overlap`): a MoE layer's rows go out and
    /// the engine computes shared experts, and the other micro-batch's attention, while
    /// they are away.
    pub overlap: bool,
    /// Micro-batches a step of two or more sequences is split into, with overlap
    /// (`--micro-batches`, 1 or 2): 2 pipelines one half's dispatch with the other's
    /// attention, at the cost of reading every expert's weights once per half.
    pub micro_batches: usize,
}

impl std::fmt::Debug for DispatchConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DispatchConfig")
            .field("deadline", &self.deadline)
            .field("max_retries", &self.max_retries)
            .field("retry_backoff", &self.retry_backoff)
            .field("mark_down_for", &self.mark_down_for)
            .field("worker_mutual_tls", &self.worker_tls.is_some())
            .field("max_message_bytes", &self.max_message_bytes)
            .field("dtype", &self.dtype)
            .field("overlap", &self.overlap)
            .field("micro_batches", &self.micro_batches)
            .finish()
    }
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            deadline: Duration::from_secs(10),
            max_retries: 3,
            retry_backoff: Duration::from_millis(50),
            mark_down_for: Duration::from_secs(5),
            worker_tls: None,
            max_message_bytes: 256 << 20,
            dtype: RowDtype::F32,
            overlap: true,
            micro_batches: 1,
        }
    }
}

/// Longest wait between two dispatch retries.
const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// How often a dispatch waiting for a copy of an expert looks at the routes again.
const COPY_POLL: Duration = Duration::from_millis(20);

/// Adds this layer's routed tokens to the per-expert load.
fn count_expert_tokens(m: &RouterMetrics, req: &MoeRequest<'_>) {
    let mut counts: BTreeMap<u32, u64> = BTreeMap::new();
    for e in req.expert_ids.iter().filter(|e| **e != NO_EXPERT) {
        *counts.entry(*e).or_default() += 1;
    }
    for (e, n) in counts {
        m.expert_load.add(req.layer, e, n);
    }
}

/// Why a dispatch is retried, for `moe_dispatch_retries_total{reason}`: `deadline` (no
/// answer in time: a hung or cut-off worker), `worker_error` (it answered with an
/// error, e.g. an expert it no longer hosts), `unavailable` (no connection, stream
/// broke, no copy to ask).
fn retry_reason(e: &ExpertError) -> &'static str {
    match e {
        ExpertError::Deadline { .. } => "deadline",
        ExpertError::Rejected { .. } => "worker_error",
        ExpertError::Transport(_)
        | ExpertError::Unavailable(_)
        | ExpertError::NotHosted { .. }
        | ExpertError::Invalid(_) => "unavailable",
    }
}

/// Locks `m`, taking the data of a poisoned lock as it is (it holds plain values).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_model::RejectCode;

    #[test]
    fn retries_are_counted_by_what_happened() {
        let cases = [
            (
                ExpertError::Deadline {
                    who: "worker a:1".into(),
                    after: Duration::from_millis(5),
                },
                "deadline",
            ),
            (
                ExpertError::Rejected {
                    worker: "a:1".into(),
                    code: RejectCode::NotHosted,
                    message: "expert 1 of layer 0 is not hosted here".into(),
                },
                "worker_error",
            ),
            (
                ExpertError::Rejected {
                    worker: "a:1".into(),
                    code: RejectCode::Other(42),
                    message: String::new(),
                },
                "worker_error",
            ),
            (
                ExpertError::Transport("worker a:1: the dispatch stream broke".into()),
                "unavailable",
            ),
            (
                ExpertError::Unavailable("no live worker hosts layer 0 experts {1}".into()),
                "unavailable",
            ),
        ];
        for (e, want) in cases {
            assert_eq!(retry_reason(&e), want, "{e}");
        }
        // The message no longer decides: a deadline whose text mentions a code is still
        // a deadline.
        let odd = ExpertError::Deadline {
            who: "worker (code 3)".into(),
            after: Duration::from_millis(1),
        };
        assert_eq!(retry_reason(&odd), "deadline");
    }
}
