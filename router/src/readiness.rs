//! Readiness: "can this router serve a request now?", for load balancers and Kubernetes.
//!
//! A router is ready when it is not draining and every routed expert of the model has a
//! copy on a worker that is live: routed to, not marked down by a failed dispatch, and
//! answering a cheap `Info` probe. A router whose sole copy of an expert died would
//! otherwise keep answering health checks while every request fails UNAVAILABLE.
//!
//! A router whose engine thread died (a panic) is never ready again: every request
//! would fail INTERNAL.
//!
//! The answer is published on `grpc.health.v1` (the overall service `""` and
//! `moe.v1.Generation`) and on `GET /health`. Liveness is separate: the `liveness`
//! health service stays SERVING while the process runs, so an orchestrator restarts a
//! router only when it is wedged (its engine thread died), never because a worker is
//! away.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use moe_proto::v1::generation_server::GenerationServer;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::dispatch::RemoteBackend;
use crate::grpc::Api;

/// The health service name that reports liveness (SERVING while the process runs).
pub const LIVENESS_SERVICE: &str = "liveness";

/// How often readiness is re-evaluated (and workers probed).
const INTERVAL: Duration = Duration::from_millis(500);
/// How long a worker may take to answer the `Info` probe.
const PROBE_DEADLINE: Duration = Duration::from_millis(1_000);

/// The current readiness, shared by the health service, `/health` and the evaluator.
#[derive(Debug, Default)]
pub struct Readiness {
    draining: AtomicBool,
    /// `None` when ready; else why not.
    not_ready: RwLock<Option<String>>,
    /// Why the engine thread died, once it has ([`Readiness::follow_engine`]).
    engine: OnceLock<watch::Receiver<Option<String>>>,
}

impl Readiness {
    /// Starts not ready until the first evaluation.
    pub fn new() -> Arc<Readiness> {
        Arc::new(Readiness {
            draining: AtomicBool::new(false),
            not_ready: RwLock::new(Some("starting".into())),
            engine: OnceLock::new(),
        })
    }

    /// Counts the engine's death (`EngineHandle::watch_stopped`) against readiness, at
    /// once and for good. Only the first call takes effect.
    pub fn follow_engine(&self, stopped: watch::Receiver<Option<String>>) {
        let _ = self.engine.set(stopped);
    }

    /// Why the engine thread died, once it has.
    pub fn engine_stopped(&self) -> Option<String> {
        self.engine.get().and_then(|rx| rx.borrow().clone())
    }

    /// Why the router cannot serve now, or `None` when it can.
    pub fn reason(&self) -> Option<String> {
        if let Some(why) = self.engine_stopped() {
            return Some(format!("the engine stopped: {why}"));
        }
        if self.draining.load(Ordering::Acquire) {
            return Some("draining: shutting down".into());
        }
        self.not_ready
            .read()
            .map(|r| r.clone())
            .unwrap_or_else(|_| Some("readiness state poisoned".into()))
    }

    /// Marks the router draining (never ready again).
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    fn set(&self, reason: Option<String>) -> bool {
        match self.not_ready.write() {
            Ok(mut r) => {
                let changed = *r != reason;
                *r = reason;
                changed
            }
            Err(_) => false,
        }
    }
}

/// What readiness is computed from.
pub enum Source {
    /// In-process device actors: ready while not draining; `copies` of each expert.
    Local { copies: usize },
    /// Remote workers: every routed expert needs a live copy.
    Remote {
        backend: Arc<RemoteBackend>,
        experts: Vec<(usize, u32)>,
    },
}

/// Workers that did not answer the last probe.
async fn probe(backend: &RemoteBackend) -> HashSet<usize> {
    let probes = backend.routed_workers().into_iter().filter_map(|i| {
        let client = backend.worker(i)?;
        Some(async move { (i, client.info(PROBE_DEADLINE).await.is_ok()) })
    });
    futures::future::join_all(probes)
        .await
        .into_iter()
        .filter(|(_, ok)| !ok)
        .map(|(i, _)| i)
        .collect()
}

/// Evaluates readiness every [`INTERVAL`] until `shutdown`, publishing it on the health
/// service. Logs each change once.
pub async fn run(
    source: Source,
    readiness: Arc<Readiness>,
    health: tonic_health::server::HealthReporter,
    metrics: crate::metrics::RouterMetrics,
    shutdown: CancellationToken,
) {
    health
        .set_service_status(LIVENESS_SERVICE, tonic_health::ServingStatus::Serving)
        .await;
    let mut engine = readiness.engine.get().cloned();
    let mut engine_reported = false;
    loop {
        let reason = match &source {
            Source::Local { copies } => {
                metrics.experts_without_copy.set(0);
                metrics.expert_copies_min.set(*copies as i64);
                None
            }
            Source::Remote { backend, experts } => {
                let unreachable = probe(backend).await;
                let copies = backend.live_copies(experts, &unreachable);
                let missing: Vec<(usize, u32)> = experts
                    .iter()
                    .zip(&copies)
                    .filter(|(_, n)| **n == 0)
                    .map(|(e, _)| *e)
                    .collect();
                metrics.experts_without_copy.set(missing.len() as i64);
                metrics
                    .expert_copies_min
                    .set(copies.iter().copied().min().unwrap_or(0) as i64);
                missing.first().map(|(layer, expert)| {
                    format!(
                        "{} expert(s) have no live copy (first: layer {layer} expert {expert})",
                        missing.len()
                    )
                })
            }
        };
        let changed = readiness.set(reason.clone());
        let effective = readiness.reason();
        metrics.ready.set(i64::from(effective.is_none()));
        if effective.is_none() {
            health.set_serving::<GenerationServer<Api>>().await;
            health
                .set_service_status("", tonic_health::ServingStatus::Serving)
                .await;
        } else {
            health.set_not_serving::<GenerationServer<Api>>().await;
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        }
        if let (false, Some(why)) = (engine_reported, readiness.engine_stopped()) {
            tracing::error!(reason = %why, "not ready and not live: the engine stopped (NOT_SERVING until restarted)");
            // A router without its engine never recovers: let the orchestrator restart it.
            health
                .set_service_status(LIVENESS_SERVICE, tonic_health::ServingStatus::NotServing)
                .await;
            engine_reported = true;
        } else if changed {
            match &reason {
                None => tracing::info!("ready: every expert has a live copy"),
                Some(r) => tracing::warn!(reason = %r, "not ready"),
            }
        }
        // The engine dying is published at once, not at the next tick.
        let engine_died = async {
            match engine.as_mut() {
                Some(rx) => {
                    if rx.changed().await.is_err() {
                        // The engine ended normally (shutdown): nothing more to follow.
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(INTERVAL) => {}
            _ = engine_died => {}
        }
    }
}
