//! Fixtures of the fault tests: an `etcd` of the test's own ([`Etcd`], from
//! `moe-testkit`, shared with moe-control's tests), routers and workers that are members of
//! a cluster on it ([`etcd_router`], [`member_args`]), what a router says of the cluster
//! ([`cluster_status`], [`hosted_by`], [`hosting_workers`]), and greedy requests
//! ([`varied_reqs`]) streamed concurrently ([`Streams`], [`keep_streaming`]) so that a
//! test can strike while tokens are flowing.
//!
//! [`Etcd`] needs the `etcd` binary (Debian `etcd-server`) on `PATH`; `scripts/test.sh`
//! installs it.

pub use moe_testkit::{free_port, Etcd, EtcdEntry};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moe_proto::v1::GenerateResponse;
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{generation_client, metric_value, metrics, GreedyReq, Proc, STARTUP};

/// `--etcd ENDPOINT --cluster CLUSTER` and then `extra` (e.g. `--lease-ttl-secs`,
/// `--worker-id`): the flags that make a worker a member of `cluster`.
pub fn member_args<'a>(endpoint: &'a str, cluster: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--etcd", endpoint, "--cluster", cluster];
    args.extend_from_slice(extra);
    args
}

/// `moe router --model MODEL --etcd ENDPOINT --cluster CLUSTER` on free local ports, plus
/// `extra` flags: a router that finds its workers (and placements) through etcd.
pub fn etcd_router(model: &Path, endpoint: &str, cluster: &str, extra: &[&str]) -> Proc {
    let args = member_args(endpoint, cluster, extra);
    Proc::start(&crate::server_args("router", model, &args))
}

/// The id a worker started without `--worker-id` registers under: derived from its
/// advertised (gRPC) address.
pub fn worker_id(w: &Proc) -> String {
    format!("worker-{}-{}", w.grpc.ip(), w.grpc.port())
}

/// The version of the placement `router` follows, per its `/metrics` (0 before any).
pub fn placement_version(router: &Proc) -> f64 {
    metric_value(&metrics(router.http), "moe_placement_version").unwrap_or(0.0)
}

/// The router's `GET /v1/cluster`: the placement in force and the load.
pub fn cluster_status(router: &Proc) -> Value {
    let addr = router.http;
    let (code, body) = crate::http(addr, "GET", "/v1/cluster", None);
    assert_eq!(code, 200, "GET http://{addr}/v1/cluster: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/v1/cluster is not JSON ({e}): {body}"))
}

/// Experts the placement in a [`cluster_status`] document puts on `worker`'s devices.
pub fn hosted_by(status: &Value, worker: &str) -> usize {
    status["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .filter(|d| d["worker"] == worker)
        .map(|d| d["experts"].as_array().map_or(0, Vec::len))
        .sum()
}

/// Workers hosting at least one expert, per the router's [`cluster_status`], in order.
pub fn hosting_workers(router: &Proc) -> Vec<String> {
    let status = cluster_status(router);
    let mut w: Vec<String> = status["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .filter(|d| d["experts"].as_array().is_some_and(|e| !e.is_empty()))
        .filter_map(|d| d["worker"].as_str().map(str::to_owned))
        .collect();
    w.dedup();
    w
}

/// `n` greedy requests (one logprob each) of varied token-id prompts: request `r` has
/// 5 + 4 × (r mod 6) tokens (25 at most), ids within 2..500; `salt` picks another set.
pub fn varied_reqs(n: u32, salt: u32, max_tokens: u32) -> Vec<GreedyReq> {
    let base = 3 + 53 * (salt % 498);
    (0..n)
        .map(|r| {
            let ids = (0..5 + 4 * (r % 6))
                .map(|j| (base + 29 * j + 41 * r) % 498 + 2)
                .collect();
            GreedyReq::ids(ids, max_tokens).with_logprobs(1)
        })
        .collect()
}

/// What became of each request of a batch: its messages or the status that ended it.
pub type Batch = Vec<Result<Vec<GenerateResponse>, tonic::Status>>;

/// Load: streams `reqs` to the gRPC server at `addr` batch after batch (the next as
/// soon as one has ended; each request may take up to `patience`) until `stop` is set,
/// counting finished batches in `done`. The task returns every batch.
pub fn keep_streaming(
    addr: SocketAddr,
    reqs: &[GreedyReq],
    patience: Duration,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
) -> JoinHandle<Vec<Batch>> {
    let reqs = reqs.to_vec();
    tokio::spawn(async move {
        let mut batches = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            batches.push(Streams::start(addr, &reqs, patience).finish().await);
            done.fetch_add(1, Ordering::SeqCst);
        }
        batches
    })
}

/// Greedy requests streaming concurrently from one server.
pub struct Streams {
    /// How many requests have received at least one token.
    started: watch::Receiver<usize>,
    tasks: Vec<JoinHandle<Result<Vec<GenerateResponse>, tonic::Status>>>,
}

impl Streams {
    /// Sends every request at once to the gRPC server at `addr`; each may take up to
    /// `patience` to finish.
    pub fn start(addr: SocketAddr, reqs: &[GreedyReq], patience: Duration) -> Streams {
        let (tx, started) = watch::channel(0usize);
        let tasks = reqs
            .iter()
            .map(|r| {
                let (req, tx) = (r.to_proto(), tx.clone());
                tokio::spawn(async move {
                    let call = async {
                        let mut stream = generation_client(addr)
                            .await
                            .generate(req)
                            .await?
                            .into_inner();
                        let mut out: Vec<GenerateResponse> = Vec::new();
                        while let Some(m) = stream.message().await? {
                            let first = !m.tokens.is_empty()
                                && out.iter().all(|o: &GenerateResponse| o.tokens.is_empty());
                            out.push(m);
                            if first {
                                tx.send_modify(|n| *n += 1);
                            }
                        }
                        Ok(out)
                    };
                    tokio::time::timeout(patience, call)
                        .await
                        .unwrap_or_else(|_| panic!("Generate on {addr} took over {patience:?}"))
                })
            })
            .collect();
        Streams { started, tasks }
    }

    /// Waits until every request has received a token; panics after [`STARTUP`].
    pub async fn wait_all_started(&mut self) {
        let n = self.tasks.len();
        let waited = tokio::time::timeout(STARTUP, self.started.wait_for(|s| *s >= n)).await;
        assert!(
            matches!(waited, Ok(Ok(_))),
            "not every request received a token within {STARTUP:?}"
        );
    }

    /// Waits for every request to end: its messages or the status that ended it.
    pub async fn finish(self) -> Batch {
        let mut out = Vec::new();
        for t in self.tasks {
            out.push(t.await.unwrap_or_else(|e| panic!("request task: {e}")));
        }
        out
    }
}

/// Asserts that every stream finished with `max_tokens` tokens (none lost, none
/// repeated), finish reason LENGTH, and the same tokens and logprobs (within 1e-5) as
/// the offline reference `want`.
pub fn assert_streams_match(what: &str, want: &[Vec<crate::Tok>], got: Batch, max_tokens: u32) {
    assert_eq!(want.len(), got.len(), "{what}: one result per request");
    for (i, (w, g)) in want.iter().zip(got).enumerate() {
        let msgs = g.unwrap_or_else(|s| panic!("{what}: request {i} failed: {s:?}"));
        let last = msgs.last().expect("a final message");
        assert_eq!(
            last.finish_reason,
            moe_proto::v1::FinishReason::Length as i32,
            "{what}: request {i}"
        );
        let toks = crate::streamed_tokens(&msgs);
        assert_eq!(toks.len(), max_tokens as usize, "{what}: request {i}");
        crate::assert_same_tokens(&format!("{what}: request {i}"), w, &toks, 1e-5);
    }
}
