//! The gRPC edge of a worker: `ExpertService` over a [`Node`], served together with
//! `grpc.health.v1` and server reflection, plus the HTTP endpoints, by [`serve_worker`].
//!
//! Dispatch streams: each stream gets a task that reads requests in order, answers each
//! on a bounded channel feeding the response stream, and ends when the client closes its
//! side or goes away (a failed send). A malformed request is answered with its
//! `request_id` and a `WorkerErrorCode` in `error_code`; the stream stays open. Errors
//! become codes once, by variant ([`crate::error::wire_code`]): INVALID_ARGUMENT (3),
//! NOT_HOSTED (5) for an expert not hosted here, UNAVAILABLE (14) for a device that
//! failed, is restarting or did not answer in time.
//!
//! Shutdown: cancelling the token turns health to NOT_SERVING (gRPC and HTTP), refuses
//! new work, ends open dispatch streams after their current request (UNAVAILABLE, so the
//! router moves to another replica), waits for in-flight work under one deadline, then
//! stops the gRPC server and the HTTP server.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use moe_model::ExpertError;
use moe_proto::traceparent::{TraceParent, MAX_TRACEPARENTS_PER_DISPATCH};
use moe_proto::v1::expert_service_server::{ExpertService, ExpertServiceServer};
use moe_proto::v1::{
    DispatchRequest, DispatchResponse, InfoRequest, InfoResponse, LoadExpertsRequest,
    LoadExpertsResponse, UnloadExpertsRequest, UnloadExpertsResponse, WorkerErrorCode,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::error::{wire_code, ErrorKind, WorkerError};
use crate::metrics::Outcome;
use crate::node::Node;
use crate::wire::{self, RowDtype};

/// How the servers run.
#[derive(Debug, Clone)]
pub struct WorkerServeConfig {
    /// After shutdown begins, how long in-flight work may take to finish.
    pub drain_timeout: Duration,
    /// Responses buffered per dispatch stream before the worker waits for the client.
    pub dispatch_channel_capacity: usize,
    /// Mutual TLS on the gRPC port (this worker's certificate and the cluster CA):
    /// `ExpertService` then answers only clients with a router certificate; health and
    /// reflection stay open to any TLS client (probes). `None`: plain TCP (`--insecure`).
    pub tls: Option<Arc<moe_tls::Material>>,
    /// Most rows one dispatch may carry (`--max-dispatch-rows`); checked before its rows
    /// are decoded, and the gRPC message limit of `ExpertService` is sized from it.
    pub max_dispatch_rows: usize,
}

impl Default for WorkerServeConfig {
    fn default() -> Self {
        WorkerServeConfig {
            drain_timeout: Duration::from_secs(10),
            dispatch_channel_capacity: 16,
            tls: None,
            max_dispatch_rows: wire::DEFAULT_MAX_DISPATCH_ROWS,
        }
    }
}

/// `ExpertService` over a [`Node`].
pub struct ExpertServer {
    node: Node,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    channel_capacity: usize,
    /// Only callers whose verified certificate carries the router role (mutual TLS).
    require_router: bool,
    max_rows: usize,
}

impl ExpertServer {
    /// A service over `node`; dispatch tasks are tracked by `tracker` and stop when
    /// `shutdown` is cancelled.
    pub fn new(
        node: Node,
        shutdown: CancellationToken,
        tracker: TaskTracker,
        channel_capacity: usize,
    ) -> ExpertServer {
        ExpertServer {
            node,
            shutdown,
            tracker,
            channel_capacity: channel_capacity.max(1),
            require_router: false,
            max_rows: wire::DEFAULT_MAX_DISPATCH_ROWS,
        }
    }

    /// Refuse dispatches of more than `rows` rows (default
    /// [`wire::DEFAULT_MAX_DISPATCH_ROWS`]).
    pub fn with_max_rows(mut self, rows: usize) -> ExpertServer {
        self.max_rows = rows.max(1);
        self
    }

    /// The node's state as `Info` reports it, with this server's row limit.
    fn info_wire(&self, info: &crate::node::NodeInfo) -> InfoResponse {
        InfoResponse {
            max_dispatch_rows: u32::try_from(self.max_rows).unwrap_or(u32::MAX),
            ..wire::info_to_wire(info, self.node.spec())
        }
    }

    /// Refuses every call whose connection did not prove the router role.
    pub fn require_router_certificate(mut self) -> ExpertServer {
        self.require_router = true;
        self
    }

    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        if !self.require_router {
            return Ok(());
        }
        let peer = request.extensions().get::<moe_tls::server::PeerInfo>();
        if peer.is_some_and(|p| p.roles.contains(&moe_tls::Role::Router)) {
            return Ok(());
        }
        tracing::warn!(peer = ?peer.and_then(|p| p.remote), "ExpertService call without a router certificate refused");
        Err(Status::unauthenticated(format!(
            "ExpertService needs a client certificate signed by the cluster CA with the router role (URI SAN {})",
            moe_tls::Role::Router.uri()
        )))
    }

    fn refuse_if_stopping(&self) -> Result<(), Status> {
        if self.shutdown.is_cancelled() {
            Err(Status::unavailable("the worker is shutting down"))
        } else {
            Ok(())
        }
    }
}

/// The service ready to mount on a tonic server (or an in-process one in tests), with
/// message size limits raised for large batches; it never shuts down by itself.
pub fn expert_service(node: Node) -> ExpertServiceServer<ExpertServer> {
    let cfg = WorkerServeConfig::default();
    let server = ExpertServer::new(
        node,
        CancellationToken::new(),
        TaskTracker::new(),
        cfg.dispatch_channel_capacity,
    );
    with_limits(server, &cfg)
}

/// The service with its row limit, and gRPC message limits sized from it: a message
/// bigger than the largest dispatch allowed is refused (the stream ends OUT_OF_RANGE)
/// before tonic buffers it.
fn with_limits(server: ExpertServer, cfg: &WorkerServeConfig) -> ExpertServiceServer<ExpertServer> {
    let spec = server.node.spec();
    let bytes =
        wire::max_dispatch_message_bytes(cfg.max_dispatch_rows, spec.hidden_size, spec.moe.top_k);
    ExpertServiceServer::new(server.with_max_rows(cfg.max_dispatch_rows))
        .max_decoding_message_size(bytes)
        .max_encoding_message_size(bytes)
}

/// The gRPC status of a [`WorkerError`]. Internal failures keep their detail in the log.
fn status_of(e: &WorkerError) -> Status {
    match e.kind() {
        ErrorKind::InvalidArgument => Status::invalid_argument(e.to_string()),
        ErrorKind::Unavailable => Status::unavailable(e.to_string()),
        ErrorKind::Internal => {
            tracing::error!(error = %e, "worker request failed");
            Status::internal("the worker failed to carry out the request; see its logs")
        }
    }
}

/// The wire code and metric outcome of a compute error.
fn classify(e: &ExpertError) -> (WorkerErrorCode, Outcome) {
    let code = wire_code(e);
    let outcome = match code {
        WorkerErrorCode::InvalidArgument => Outcome::Invalid,
        WorkerErrorCode::NotHosted => Outcome::NotHosted,
        WorkerErrorCode::Ok | WorkerErrorCode::Unavailable => Outcome::Unavailable,
    };
    (code, outcome)
}

fn error_response(
    request_id: u64,
    dtype: i32,
    code: WorkerErrorCode,
    message: String,
) -> DispatchResponse {
    DispatchResponse {
        request_id,
        output: Vec::new(),
        dtype,
        num_rows: 0,
        error_code: code as i32,
        error_message: message,
        compute_us: 0,
    }
}

/// The valid trace contexts of a dispatch message (at most
/// [`MAX_TRACEPARENTS_PER_DISPATCH`]), in their canonical form; others are dropped.
pub(crate) fn trace_contexts(values: &[String]) -> Vec<String> {
    values
        .iter()
        .take(MAX_TRACEPARENTS_PER_DISPATCH)
        .filter_map(|t| TraceParent::parse(t).map(|t| t.to_string()))
        .collect()
}

/// Answers one dispatch request (never fails: errors go into the response).
pub(crate) async fn handle_dispatch(
    node: &Node,
    req: DispatchRequest,
    max_rows: usize,
) -> DispatchResponse {
    // The client requests' trace contexts (valid ones, bounded) go on every log line of
    // this message: worker logs join the router's by trace id. Parsed only when the
    // span is recorded (debug), not on every message of the hot path.
    let traces: Vec<String> = if tracing::enabled!(tracing::Level::DEBUG) {
        trace_contexts(&req.traceparents)
    } else {
        Vec::new()
    };
    let span = tracing::debug_span!(
        "dispatch",
        step_id = req.step_id,
        layer = req.layer,
        traceparents = ?traces
    );
    handle_dispatch_in_span(node, req, max_rows)
        .instrument(span)
        .await
}

async fn handle_dispatch_in_span(
    node: &Node,
    req: DispatchRequest,
    max_rows: usize,
) -> DispatchResponse {
    let metrics = node.metrics();
    let (request_id, raw_dtype) = (req.request_id, req.dtype);
    tracing::debug!(request_id, rows = req.num_rows, "dispatch received");
    let d = match wire::decode_dispatch(req, node.spec(), max_rows) {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(request_id, error = %e, "invalid dispatch request");
            metrics.count_dispatch(Outcome::Invalid);
            return error_response(
                request_id,
                raw_dtype,
                WorkerErrorCode::InvalidArgument,
                e.to_string(),
            );
        }
    };
    metrics.dispatch_rows.inc_by(d.num_rows as u64);
    let start = Instant::now();
    let dtype: RowDtype = d.dtype;
    let result = node
        .compute(d.layer, d.rows, d.top_k, d.expert_ids, d.weights)
        .await;
    match result {
        Ok(out) => {
            metrics.count_dispatch(Outcome::Ok);
            DispatchResponse {
                request_id,
                output: wire::encode_rows(&out, dtype),
                dtype: dtype.to_wire() as i32,
                num_rows: u32::try_from(d.num_rows).unwrap_or(u32::MAX),
                error_code: WorkerErrorCode::Ok as i32,
                error_message: String::new(),
                compute_us: u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX),
            }
        }
        Err(e) => {
            let (code, outcome) = classify(&e);
            if outcome == Outcome::Unavailable {
                tracing::warn!(request_id, error = %e, "dispatch failed");
            } else {
                tracing::debug!(request_id, error = %e, "dispatch rejected");
            }
            metrics.count_dispatch(outcome);
            error_response(request_id, raw_dtype, code, e.to_string())
        }
    }
}

/// Dispatch messages of one stream handled at once: a router with overlap has two
/// micro-batches' layers in flight on a stream; answers go back as each finishes, and
/// the router matches them by `request_id`.
pub const MAX_IN_FLIGHT_PER_STREAM: usize = 4;

/// Serves one dispatch stream until the client closes it, goes away, or shutdown; up to
/// [`MAX_IN_FLIGHT_PER_STREAM`] of its messages at once.
async fn run_dispatch_stream(
    node: Node,
    mut inbound: Streaming<DispatchRequest>,
    tx: mpsc::Sender<Result<DispatchResponse, Status>>,
    shutdown: CancellationToken,
    max_rows: usize,
) {
    let mut running = FuturesUnordered::new();
    let mut inbound_open = true;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                let _ = tx.send(Err(Status::unavailable("the worker is shutting down"))).await;
                return;
            }
            _ = tx.closed() => return,
            Some(resp) = running.next(), if !running.is_empty() => {
                if tx.send(Ok(resp)).await.is_err() {
                    // The client left: nothing holds state for it, so just stop.
                    return;
                }
            }
            next = inbound.message(), if inbound_open && running.len() < MAX_IN_FLIGHT_PER_STREAM => {
                match next {
                    Ok(Some(req)) => running.push(handle_dispatch(&node, req, max_rows)),
                    Ok(None) => inbound_open = false,
                    Err(status) => {
                        // The client went away, or sent what cannot be read (a message
                        // over the size limit: OUT_OF_RANGE): say so, if anyone listens.
                        tracing::debug!(%status, "dispatch stream ended");
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
            }
            // The client closed its side and every answer is sent.
            else => return,
        }
    }
}

#[tonic::async_trait]
impl ExpertService for ExpertServer {
    type DispatchStream = ReceiverStream<Result<DispatchResponse, Status>>;

    async fn dispatch(
        &self,
        request: Request<Streaming<DispatchRequest>>,
    ) -> Result<Response<Self::DispatchStream>, Status> {
        self.authorize(&request)?;
        self.refuse_if_stopping()?;
        let (tx, rx) = mpsc::channel(self.channel_capacity);
        self.tracker.spawn(run_dispatch_stream(
            self.node.clone(),
            request.into_inner(),
            tx,
            self.shutdown.clone(),
            self.max_rows,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn info(&self, request: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        self.authorize(&request)?;
        Ok(Response::new(self.info_wire(&self.node.info())))
    }

    async fn load_experts(
        &self,
        request: Request<LoadExpertsRequest>,
    ) -> Result<Response<LoadExpertsResponse>, Status> {
        self.authorize(&request)?;
        self.refuse_if_stopping()?;
        let req = request.into_inner();
        let info = self
            .node
            .load(
                req.placement_version,
                wire::assignments_from_wire(req.assignments),
            )
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(LoadExpertsResponse {
            info: Some(self.info_wire(&info)),
        }))
    }

    async fn unload_experts(
        &self,
        request: Request<UnloadExpertsRequest>,
    ) -> Result<Response<UnloadExpertsResponse>, Status> {
        self.authorize(&request)?;
        self.refuse_if_stopping()?;
        let req = request.into_inner();
        let info = self
            .node
            .unload(
                req.placement_version,
                wire::assignments_from_wire(req.assignments),
            )
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(UnloadExpertsResponse {
            info: Some(self.info_wire(&info)),
        }))
    }
}

/// [`serve_worker_with`] with the default [`WorkerServeConfig`].
pub async fn serve_worker(
    node: Node,
    grpc_listener: TcpListener,
    http_listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serve_worker_with(
        node,
        grpc_listener,
        http_listener,
        shutdown,
        WorkerServeConfig::default(),
    )
    .await
}

/// Serves `ExpertService`, health and reflection on `grpc_listener` (TCP_NODELAY on every
/// accepted socket) and `/metrics`, `/health` on `http_listener`, until `shutdown` is
/// cancelled; then drains as described in the module docs and returns. The caller owns
/// `node` and stops it afterwards.
pub async fn serve_worker_with(
    node: Node,
    grpc_listener: TcpListener,
    http_listener: TcpListener,
    shutdown: CancellationToken,
    cfg: WorkerServeConfig,
) -> anyhow::Result<()> {
    type Svc = ExpertServiceServer<ExpertServer>;
    if let Err(e) = node.metrics().set_build_info(node.model_name()) {
        // Already registered: this node was served before (tests restart servers).
        tracing::debug!(error = %e, "moe_build_info not registered again");
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<Svc>().await;
    // Liveness (for orchestrators) stays SERVING while the process runs, drain included.
    health
        .set_service_status("liveness", tonic_health::ServingStatus::Serving)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(moe_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    // grpcio-reflection and older tools still ask v1alpha.
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(moe_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let tracker = TaskTracker::new();
    let mut server = ExpertServer::new(
        node.clone(),
        shutdown.clone(),
        tracker.clone(),
        cfg.dispatch_channel_capacity,
    );
    let tls = match &cfg.tls {
        Some(m) => {
            server = server.require_router_certificate();
            Some(moe_tls::server::config(
                m.clone(),
                Some(moe_tls::Role::Router),
                moe_tls::server::ALPN_GRPC,
            )?)
        }
        None => None,
    };
    let expert = with_limits(server, &cfg);
    let grpc_addr = grpc_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;
    let incoming = moe_tls::server::incoming_stream(grpc_listener, tls);
    let grpc_stop = CancellationToken::new();
    let grpc = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(expert)
        .serve_with_incoming_shutdown(incoming, grpc_stop.clone().cancelled_owned());
    let mut grpc_task = tokio::spawn(grpc);

    let serving = Arc::new(AtomicBool::new(true));
    let http_stop = CancellationToken::new();
    let app = crate::http::router(node.clone(), Arc::clone(&serving));
    let http =
        axum::serve(http_listener, app).with_graceful_shutdown(http_stop.clone().cancelled_owned());
    let mut http_task = tokio::spawn(async move { http.await });
    tracing::info!(grpc = %grpc_addr, http = %http_addr, worker_id = node.worker_id(), mutual_tls = cfg.tls.is_some(), "worker serving");

    let early: Option<anyhow::Error> = tokio::select! {
        _ = shutdown.cancelled() => None,
        r = &mut grpc_task => Some(match r {
            Ok(Ok(())) => anyhow::anyhow!("the gRPC server stopped unexpectedly"),
            Ok(Err(e)) => anyhow::Error::new(e).context("the gRPC server failed"),
            Err(e) => anyhow::Error::new(e).context("the gRPC server task failed"),
        }),
        r = &mut http_task => Some(match r {
            Ok(Ok(())) => anyhow::anyhow!("the HTTP server stopped unexpectedly"),
            Ok(Err(e)) => anyhow::Error::new(e).context("the HTTP server failed"),
            Err(e) => anyhow::Error::new(e).context("the HTTP server task failed"),
        }),
    };
    if let Some(e) = early {
        // One server died: take the other down too and report.
        shutdown.cancel();
        grpc_stop.cancel();
        http_stop.cancel();
        grpc_task.abort();
        http_task.abort();
        return Err(e);
    }

    tracing::info!(
        drain_timeout_s = cfg.drain_timeout.as_secs_f64(),
        "shutting down: draining in-flight work"
    );
    serving.store(false, Ordering::Release);
    health.set_not_serving::<Svc>().await;
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let deadline = tokio::time::Instant::now() + cfg.drain_timeout;
    tracker.close();
    if tokio::time::timeout_at(deadline, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            streams = tracker.len(),
            "drain deadline passed with dispatch streams still busy; closing them"
        );
    }
    // Let the gRPC server finish its in-flight calls, within what is left of the
    // deadline (at least a moment, so GOAWAY reaches the clients).
    grpc_stop.cancel();
    let grace = deadline.max(tokio::time::Instant::now() + Duration::from_millis(500));
    match tokio::time::timeout_at(grace, &mut grpc_task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "the gRPC server ended with an error"),
        Ok(Err(e)) => tracing::warn!(error = %e, "the gRPC server task failed"),
        Err(_) => {
            tracing::warn!("gRPC calls still open at the drain deadline; closing them");
            grpc_task.abort();
        }
    }
    http_stop.cancel();
    match tokio::time::timeout(Duration::from_secs(2), &mut http_task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "the HTTP server ended with an error"),
        Ok(Err(e)) => tracing::warn!(error = %e, "the HTTP server task failed"),
        Err(_) => http_task.abort(),
    }
    tracing::info!("worker drained");
    Ok(())
}
