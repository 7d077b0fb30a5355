//! [`RemoteBackend`]: experts on remote workers, reached over gRPC. Each MoE layer is
//! split among the workers hosting its experts ([`partition`](super::partition)); every
//! worker gets, concurrently, only its rows and slots; failed parts are retried on other
//! copies within a bound (with elastic membership, waiting for the placement to give an
//! expert a copy); the partial sums are added. With overlap, `submit` puts the messages
//! on the streams and returns.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use moe_control::PlacementPlan;
use moe_model::{ExpertBackend, ExpertError, MoeBatch, MoeRequest, Pending};
use moe_proto::rows::{decode_rows, encode_rows, RowDtype};
use moe_proto::traceparent::MAX_TRACEPARENTS_PER_DISPATCH;
use moe_proto::v1::DispatchRequest;
use tokio::runtime::Handle;

use super::client::reject_code;
use super::partition::{self, Part, Routes};
use super::{count_expert_tokens, lock, retry_reason, DispatchConfig, WorkerClient};
use super::{COPY_POLL, MAX_BACKOFF};
use crate::metrics::RouterMetrics;

/// Experts on remote workers, reached over gRPC.
pub struct RemoteBackend {
    /// Every worker ever added; an index stays valid (routes drop a departed worker).
    pub(super) workers: RwLock<Vec<Arc<WorkerClient>>>,
    /// Elastic membership (`--etcd`): a dispatch whose experts have no live copy waits,
    /// within `deadline × (max_retries + 1)`, for the placement to give them one.
    pub(super) wait_for_copies: bool,
    /// `(layer, expert)` → indices of workers hosting it (ready copies only).
    pub(super) routes: RwLock<Routes>,
    pub(super) hidden: usize,
    pub(super) rt: Handle,
    pub(super) cfg: DispatchConfig,
    pub(super) metrics: RouterMetrics,
    /// Counts MoE layer calls; sent as `step_id` so worker logs line up with the router's.
    pub(super) calls: std::sync::atomic::AtomicU64,
    /// Workers whose dispatch failed, and until when later calls skip them.
    pub(super) down_until: Mutex<HashMap<usize, Instant>>,
    /// The placement the routes follow (for `moe cluster status`).
    pub(super) placement: RwLock<PlacementPlan>,
    /// Bumped after every route change.
    pub(super) routes_epoch: std::sync::atomic::AtomicU64,
    /// Dispatches in flight, by the route epoch they started under.
    pub(super) in_flight: Mutex<BTreeMap<u64, usize>>,
    /// The current step's client trace contexts ([`ExpertBackend::begin_step`]), sent
    /// with each of its dispatch messages.
    pub(super) step_traces: Mutex<Vec<String>>,
}

impl RemoteBackend {
    pub fn new(
        workers: Vec<Arc<WorkerClient>>,
        hidden: usize,
        rt: Handle,
        cfg: DispatchConfig,
        metrics: RouterMetrics,
    ) -> RemoteBackend {
        for w in &workers {
            w.set_max_message_bytes(cfg.max_message_bytes);
        }
        RemoteBackend {
            workers: RwLock::new(workers),
            wait_for_copies: false,
            routes: RwLock::new(Routes::new()),
            hidden,
            rt,
            cfg,
            metrics,
            calls: Default::default(),
            down_until: Mutex::new(HashMap::new()),
            placement: RwLock::new(PlacementPlan::default()),
            routes_epoch: Default::default(),
            in_flight: Mutex::new(BTreeMap::new()),
            step_traces: Mutex::new(Vec::new()),
        }
    }

    /// Makes dispatch wait for a copy of an expert that has none (elastic membership).
    pub fn with_wait_for_copies(mut self) -> RemoteBackend {
        self.wait_for_copies = true;
        self
    }

    /// Adds a worker; returns its index for [`set_routes`](Self::set_routes).
    pub fn add_worker(&self, client: Arc<WorkerClient>) -> usize {
        client.set_max_message_bytes(self.cfg.max_message_bytes);
        match self.workers.write() {
            Ok(mut w) => {
                w.push(client);
                w.len() - 1
            }
            Err(p) => {
                let mut w = p.into_inner();
                w.push(client);
                w.len() - 1
            }
        }
    }

    /// A client for the worker at `addr`, over mutual TLS when the router has it.
    pub fn connect(&self, addr: &str) -> Result<WorkerClient, ExpertError> {
        WorkerClient::new(addr, Duration::from_secs(2), self.cfg.worker_tls.clone())
    }

    /// The client of worker `i`.
    pub fn worker(&self, i: usize) -> Option<Arc<WorkerClient>> {
        self.workers.read().ok().and_then(|w| w.get(i).cloned())
    }

    pub(super) fn addr_of(&self, i: usize) -> String {
        self.worker(i)
            .map(|w| w.addr().to_owned())
            .unwrap_or_else(|| format!("#{i}"))
    }

    /// Splits the request among workers by the current routes, skipping workers marked
    /// down; `avoid` lists workers that failed this call.
    fn split(&self, req: &MoeRequest<'_>, avoid: &[usize]) -> Result<Vec<Part>, ExpertError> {
        let routes = self
            .routes
            .read()
            .map_err(|_| ExpertError::Unavailable("routing table poisoned".into()))?;
        partition::split(req, &routes, avoid, &self.down_now())
    }

    async fn send_part(
        &self,
        req: &MoeRequest<'_>,
        part: &Part,
        call: u64,
    ) -> Result<Vec<f32>, ExpertError> {
        let h = self.hidden;
        let rows = partition::gather_rows(req, part, h);
        let msg = DispatchRequest {
            request_id: 0,
            step_id: call,
            layer: req.layer as u32,
            num_rows: part.rows.len() as u32,
            hidden_size: h as u32,
            dtype: self.cfg.dtype.to_wire() as i32,
            rows: encode_rows(&rows, self.cfg.dtype),
            top_k: req.top_k as u32,
            expert_ids: part.ids.clone(),
            expert_weights: part.weights.clone(),
            traceparents: lock(&self.step_traces).clone(),
        };
        let worker = self
            .worker(part.worker)
            .ok_or_else(|| ExpertError::Unavailable(format!("no worker #{}", part.worker)))?;
        let sent = (msg.rows.len() + 4 * (msg.expert_ids.len() + msg.expert_weights.len())) as u64;
        let started = Instant::now();
        let resp = worker.dispatch(msg, self.cfg.deadline).await;
        let m = &self.metrics;
        m.dispatch
            .with_label_values(&[worker.addr()])
            .observe(started.elapsed().as_secs_f64());
        m.dispatch_requests
            .with_label_values(&[worker.addr()])
            .inc();
        m.dispatch_bytes
            .with_label_values(&[worker.addr(), "sent"])
            .inc_by(sent);
        let resp = resp?;
        m.dispatch_bytes
            .with_label_values(&[worker.addr(), "received"])
            .inc_by(resp.output.len() as u64);
        if let Some(code) = reject_code(resp.error_code) {
            return Err(ExpertError::Rejected {
                worker: worker.addr().to_owned(),
                code,
                message: resp.error_message,
            });
        }
        let dtype = RowDtype::from_wire(resp.dtype);
        match dtype {
            Some(d) if resp.output.len() == part.rows.len() * h * d.size() => {
                Ok(decode_rows(&resp.output, d))
            }
            _ => Err(ExpertError::Transport(format!(
                "worker {} answered {} bytes of dtype {} for {} rows",
                worker.addr(),
                resp.output.len(),
                resp.dtype,
                part.rows.len()
            ))),
        }
    }

    async fn dispatch(&self, req: &MoeRequest<'_>) -> Result<Vec<f32>, ExpertError> {
        let _in_flight = self.track();
        let h = self.hidden;
        let mut out = vec![0f32; req.num_rows() * h];
        let mut avoid: Vec<usize> = Vec::new();
        let mut backoff = self.cfg.retry_backoff;
        let started = Instant::now();
        let bound = self.cfg.deadline * (self.cfg.max_retries + 1);
        let mut todo = self.split_waiting(req, &avoid, started, bound).await?;
        let call = self
            .calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut attempt: u32 = 0;
        loop {
            let results =
                futures::future::join_all(todo.iter().map(|p| self.send_part(req, p, call))).await;
            let mut failed_parts = Vec::new();
            for (part, res) in todo.into_iter().zip(results) {
                match res {
                    Ok(y) => {
                        self.mark_up(part.worker);
                        partition::add_partial(&mut out, &part, &y, h);
                    }
                    // Sending it again, anywhere, cannot help.
                    Err(e @ ExpertError::Invalid(_)) => return Err(e),
                    Err(e @ ExpertError::Rejected { code, .. }) if !code.is_retryable() => {
                        return Err(e)
                    }
                    Err(e) => failed_parts.push((part, e)),
                }
            }
            if failed_parts.is_empty() {
                return Ok(out);
            }
            let out_of_time = started.elapsed() + backoff >= bound;
            if (!self.wait_for_copies && attempt == self.cfg.max_retries)
                || (self.wait_for_copies && out_of_time)
            {
                let (_, e) = failed_parts.swap_remove(0);
                return Err(e);
            }
            // Retry the failed workers' slots, on other copies where there are any.
            for (part, e) in &failed_parts {
                let addr = self.addr_of(part.worker);
                tracing::warn!(worker = %addr, error = %e, attempt, "dispatch failed; retrying");
                self.metrics
                    .dispatch_retries
                    .with_label_values(&[addr.as_str(), retry_reason(e)])
                    .inc();
                avoid.push(part.worker);
                self.mark_down(part.worker);
            }
            let retry_ids = partition::retry_slots(req, failed_parts.iter().map(|(p, _)| p));
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            attempt += 1;
            if self.wait_for_copies {
                // The failed workers may be all the copies there are: try them again
                // (they may have come back) until the placement replaces them.
                avoid.clear();
            }
            let retry_req = MoeRequest {
                expert_ids: &retry_ids,
                ..*req
            };
            todo = self
                .split_waiting(&retry_req, &avoid, started, bound)
                .await?;
        }
    }

    /// [`split`](Self::split); with elastic membership, waits while an expert has no
    /// copy, until `started + bound`, then fails naming the missing experts.
    async fn split_waiting(
        &self,
        req: &MoeRequest<'_>,
        avoid: &[usize],
        started: Instant,
        bound: Duration,
    ) -> Result<Vec<Part>, ExpertError> {
        loop {
            match self.split(req, avoid) {
                Ok(parts) => return Ok(parts),
                Err(e) if !self.wait_for_copies || started.elapsed() >= bound => {
                    return Err(match e {
                        ExpertError::Unavailable(m) if self.wait_for_copies => {
                            ExpertError::Unavailable(format!(
                                "{m} (waited {} ms for a new placement)",
                                started.elapsed().as_millis()
                            ))
                        }
                        e => e,
                    })
                }
                Err(_) => tokio::time::sleep(COPY_POLL).await,
            }
        }
    }
}

impl ExpertBackend for RemoteBackend {
    fn forward(&self, req: &MoeRequest<'_>) -> Result<Vec<f32>, ExpertError> {
        req.validate()?;
        count_expert_tokens(&self.metrics, req);
        self.rt.block_on(self.dispatch(req))
    }

    /// Sends the layer's rows now and returns; the answer is awaited by
    /// [`Pending::wait`]. The dispatch future is polled once here, inside the runtime,
    /// which puts its messages on the workers' streams; `wait` drives it to the end.
    fn submit(&self, batch: MoeBatch) -> Pending<'_> {
        if !self.cfg.overlap {
            return Pending::done(self.forward(&batch.as_request()));
        }
        if let Err(e) = batch.as_request().validate() {
            return Pending::done(Err(e));
        }
        count_expert_tokens(&self.metrics, &batch.as_request());
        let mut call = Box::pin(async move {
            let req = batch.as_request();
            self.dispatch(&req).await
        });
        let first = {
            let _in_runtime = self.rt.enter();
            let mut cx = std::task::Context::from_waker(futures::task::noop_waker_ref());
            call.as_mut().poll(&mut cx)
        };
        match first {
            std::task::Poll::Ready(r) => Pending::done(r),
            std::task::Poll::Pending => Pending::later(move || self.rt.block_on(call)),
        }
    }

    fn micro_batches(&self, seqs: usize, _tokens: usize) -> usize {
        if self.cfg.overlap && self.cfg.micro_batches >= 2 && seqs >= 2 {
            self.metrics.split_steps.inc();
            2
        } else {
            1
        }
    }

    fn begin_step(&self, traceparents: &[String]) {
        let mut t = lock(&self.step_traces);
        t.clear();
        t.extend(
            traceparents
                .iter()
                .take(MAX_TRACEPARENTS_PER_DISPATCH)
                .cloned(),
        );
    }
}
