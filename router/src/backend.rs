//! The router's expert backends, plugged into the model's `ExpertBackend` seam:
//! [`LocalBackend`] calls device actors in this process (standalone mode);
//! [`RemoteBackend`] sends each worker, concurrently, only the rows and expert slots it
//! hosts, then adds the partial sums. Both retry a failed dispatch within a bound and
//! count tokens per expert (the per-expert load no other server exports).
//!
//! The engine thread calls `forward` synchronously; these bridge into the async runtime
//! with `Handle::block_on` (the engine thread is not a runtime thread).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use moe_control::PlacementPlan;
use moe_model::experts::NO_EXPERT;
use moe_model::{ExpertBackend, ExpertError, MoeBatch, MoeRequest, Pending};
use moe_proto::rows::{decode_rows, encode_rows, RowDtype};
use moe_proto::traceparent::MAX_TRACEPARENTS_PER_DISPATCH;
use moe_proto::v1::DispatchRequest;
use std::future::Future;
use tokio::runtime::Handle;

use crate::metrics::RouterMetrics;
use crate::remote::WorkerClient;

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
/// broke).
fn retry_reason(e: &ExpertError) -> &'static str {
    let m = e.to_string();
    if m.contains("no response within") {
        "deadline"
    } else if m.contains("(code ") {
        "worker_error"
    } else {
        "unavailable"
    }
}

/// Experts held by device actors of this process.
pub struct LocalBackend {
    node: moe_worker::Node,
    rt: Handle,
    cfg: DispatchConfig,
    metrics: RouterMetrics,
}

impl LocalBackend {
    pub fn new(
        node: moe_worker::Node,
        rt: Handle,
        cfg: DispatchConfig,
        metrics: RouterMetrics,
    ) -> LocalBackend {
        LocalBackend {
            node,
            rt,
            cfg,
            metrics,
        }
    }
}

impl ExpertBackend for LocalBackend {
    fn forward(&self, req: &MoeRequest<'_>) -> Result<Vec<f32>, ExpertError> {
        req.validate()?;
        count_expert_tokens(&self.metrics, req);
        let mut backoff = self.cfg.retry_backoff;
        let mut attempt = 0;
        loop {
            let started = Instant::now();
            let call = self.node.compute(
                req.layer,
                req.rows.to_vec(),
                req.top_k,
                req.expert_ids.to_vec(),
                req.weights.to_vec(),
            );
            let result = self
                .rt
                .block_on(async { tokio::time::timeout(self.cfg.deadline, call).await });
            self.metrics
                .dispatch
                .with_label_values(&["local"])
                .observe(started.elapsed().as_secs_f64());
            let err = match result {
                Ok(Ok(out)) => return Ok(out),
                Ok(Err(e @ ExpertError::Unavailable(_))) => e,
                Ok(Err(e)) => return Err(e),
                Err(_) => ExpertError::Unavailable(format!(
                    "local experts gave no answer within {} ms",
                    self.cfg.deadline.as_millis()
                )),
            };
            if attempt >= self.cfg.max_retries {
                return Err(err);
            }
            attempt += 1;
            self.metrics
                .dispatch_retries
                .with_label_values(&["local", "unavailable"])
                .inc();
            tracing::warn!(error = %err, attempt, "local expert call failed; retrying");
            std::thread::sleep(backoff);
            backoff *= 2;
        }
    }
}

/// Experts on remote workers, reached over gRPC.
pub struct RemoteBackend {
    /// Every worker ever added; an index stays valid (routes drop a departed worker).
    workers: RwLock<Vec<Arc<WorkerClient>>>,
    /// Elastic membership (`--etcd`): a dispatch whose experts have no live copy waits,
    /// within `deadline × (max_retries + 1)`, for the placement to give them one.
    wait_for_copies: bool,
    /// `(layer, expert)` → indices of workers hosting it (ready copies only).
    routes: RwLock<HashMap<(usize, u32), Vec<usize>>>,
    hidden: usize,
    rt: Handle,
    cfg: DispatchConfig,
    metrics: RouterMetrics,
    /// Counts MoE layer calls; sent as `step_id` so worker logs line up with the router's.
    calls: std::sync::atomic::AtomicU64,
    /// Workers whose dispatch failed, and until when later calls skip them.
    down_until: Mutex<HashMap<usize, Instant>>,
    /// The placement the routes follow (for `moe cluster status`).
    placement: RwLock<PlacementPlan>,
    /// Bumped after every route change.
    routes_epoch: std::sync::atomic::AtomicU64,
    /// Dispatches in flight, by the route epoch they started under.
    in_flight: Mutex<BTreeMap<u64, usize>>,
    /// The current step's client trace contexts ([`ExpertBackend::begin_step`]), sent
    /// with each of its dispatch messages.
    step_traces: Mutex<Vec<String>>,
}

/// The routes of a placement: `(layer, expert)` → the indices of the workers (through
/// `worker_index`, by name; workers it lacks are left out) hosting a copy, each once.
pub(crate) fn routes_of(
    plan: &PlacementPlan,
    worker_index: &HashMap<String, usize>,
) -> HashMap<(usize, u32), Vec<usize>> {
    let mut routes: HashMap<(usize, u32), Vec<usize>> = HashMap::new();
    for (slot, experts) in &plan.assignments {
        let Some(&w) = worker_index.get(&slot.worker) else {
            continue;
        };
        for e in experts {
            let hosts = routes.entry(*e).or_default();
            if !hosts.contains(&w) {
                hosts.push(w);
            }
        }
    }
    routes
}

/// A dispatch in flight, counted under the route epoch it started in.
struct InFlight<'a> {
    backend: &'a RemoteBackend,
    epoch: u64,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.backend.in_flight.lock() {
            if let Some(n) = m.get_mut(&self.epoch) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&self.epoch);
                }
            }
        }
    }
}

/// One worker's share of a MoE layer.
struct Part {
    worker: usize,
    /// Row indices of the request, in order.
    rows: Vec<usize>,
    /// `rows.len() × top_k` expert ids, NO_EXPERT where another worker has the slot.
    ids: Vec<u32>,
    weights: Vec<f32>,
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
            routes: RwLock::new(HashMap::new()),
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

    fn addr_of(&self, i: usize) -> String {
        self.worker(i)
            .map(|w| w.addr().to_owned())
            .unwrap_or_else(|| format!("#{i}"))
    }

    /// Skips `worker` in later calls for [`DispatchConfig::mark_down_for`] while other
    /// copies exist; counts the event when it was not down already.
    fn mark_down(&self, worker: usize) {
        let now = Instant::now();
        let until = now + self.cfg.mark_down_for;
        let newly = match self.down_until.lock() {
            Ok(mut d) => {
                let was_up = d.get(&worker).is_none_or(|t| *t <= now);
                d.insert(worker, until);
                was_up
            }
            Err(_) => false,
        };
        if newly {
            let addr = self.addr_of(worker);
            tracing::warn!(worker = %addr, for_ms = self.cfg.mark_down_for.as_millis() as u64, "worker marked down");
            self.metrics
                .worker_marked_down
                .with_label_values(&[addr.as_str()])
                .inc();
        }
    }

    /// Forgets that `worker` failed (it answered again).
    pub(crate) fn mark_up(&self, worker: usize) {
        if let Ok(mut d) = self.down_until.lock() {
            d.remove(&worker);
        }
    }

    /// Whether worker `i` is marked down now (a dispatch to it failed recently).
    pub fn is_marked_down(&self, i: usize) -> bool {
        self.down_now().contains(&i)
    }

    /// Workers marked down now.
    fn down_now(&self) -> Vec<usize> {
        let now = Instant::now();
        match self.down_until.lock() {
            Ok(mut d) => {
                d.retain(|_, t| *t > now);
                d.keys().copied().collect()
            }
            Err(_) => Vec::new(),
        }
    }

    /// Indices of the workers the routes use.
    pub fn routed_workers(&self) -> BTreeSet<usize> {
        self.routes
            .read()
            .map(|r| r.values().flatten().copied().collect())
            .unwrap_or_default()
    }

    /// The experts among `experts` that have no copy on a live worker: one the routes
    /// use, not marked down after a failed dispatch, and not in `unreachable`.
    pub fn experts_without_live_copy(
        &self,
        experts: &[(usize, u32)],
        unreachable: &std::collections::HashSet<usize>,
    ) -> Vec<(usize, u32)> {
        experts
            .iter()
            .zip(self.live_copies(experts, unreachable))
            .filter(|(_, n)| *n == 0)
            .map(|(e, _)| *e)
            .collect()
    }

    /// For each of `experts`, its copies on live workers (routed, not marked down, and
    /// not in `unreachable`).
    pub fn live_copies(
        &self,
        experts: &[(usize, u32)],
        unreachable: &std::collections::HashSet<usize>,
    ) -> Vec<usize> {
        let down = self.down_now();
        let Ok(routes) = self.routes.read() else {
            return vec![0; experts.len()];
        };
        experts
            .iter()
            .map(|e| {
                routes.get(e).map_or(0, |hosts| {
                    hosts
                        .iter()
                        .filter(|w| !down.contains(w) && !unreachable.contains(w))
                        .count()
                })
            })
            .collect()
    }

    /// Routes by a placement whose copies are loaded. `worker_index` maps a device slot's
    /// worker name to the index of its client.
    /// Returns the new route epoch: once [`drained`](Self::drained) of it, no dispatch
    /// split by older routes is in flight.
    pub fn set_routes(&self, plan: &PlacementPlan, worker_index: &HashMap<String, usize>) -> u64 {
        let routes = routes_of(plan, worker_index);
        if let Ok(old) = self.routes.read() {
            // A worker the routes take (back) in has just loaded its copies for this
            // placement: forget an old mark-down, or it would get no traffic (and look
            // dead to readiness) until the mark-down expires.
            let before: BTreeSet<usize> = old.values().flatten().copied().collect();
            let joined: BTreeSet<usize> = routes
                .values()
                .flatten()
                .copied()
                .filter(|w| !before.contains(w))
                .collect();
            for w in joined {
                self.mark_up(w);
            }
            // An expert that lost every copy shows 0, not a vanished series.
            for (layer, expert) in old.keys().filter(|k| !routes.contains_key(k)) {
                self.metrics
                    .expert_copies
                    .with_label_values(&[layer.to_string().as_str(), expert.to_string().as_str()])
                    .set(0);
            }
        }
        for ((layer, expert), hosts) in &routes {
            self.metrics
                .expert_copies
                .with_label_values(&[layer.to_string().as_str(), expert.to_string().as_str()])
                .set(hosts.len() as i64);
        }
        let live: BTreeSet<usize> = worker_index.values().copied().collect();
        self.metrics.live_workers.set(live.len() as i64);
        if let Ok(mut r) = self.routes.write() {
            *r = routes;
        }
        if let Ok(mut p) = self.placement.write() {
            *p = plan.clone();
        }
        self.metrics.placement_version.set(plan.version as i64);
        // After the routes are written: a dispatch that sees this epoch sees them.
        self.routes_epoch
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1
    }

    /// Waits (at most `bound`) until no dispatch that started under a route epoch older
    /// than `epoch` is in flight; false if some still are.
    pub async fn drained(&self, epoch: u64, bound: Duration) -> bool {
        let deadline = Instant::now() + bound;
        loop {
            let busy = self
                .in_flight
                .lock()
                .map(|m| m.range(..epoch).any(|(_, n)| *n > 0))
                .unwrap_or(false);
            if !busy {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The longest one dispatch may take, retries included.
    pub fn dispatch_bound(&self) -> Duration {
        self.cfg.deadline * (self.cfg.max_retries + 1)
    }

    /// Counts a dispatch in flight under the current route epoch (read before the
    /// routes, so a dispatch never uses routes older than its epoch).
    fn track(&self) -> InFlight<'_> {
        let epoch = self.routes_epoch.load(std::sync::atomic::Ordering::SeqCst);
        if let Ok(mut m) = self.in_flight.lock() {
            *m.entry(epoch).or_default() += 1;
        }
        InFlight {
            backend: self,
            epoch,
        }
    }

    /// The placement the routes follow.
    pub fn placement(&self) -> PlacementPlan {
        self.placement.read().map(|p| p.clone()).unwrap_or_default()
    }

    /// Splits the request among workers; `avoid` lists workers that failed this call.
    fn split(&self, req: &MoeRequest<'_>, avoid: &[usize]) -> Result<Vec<Part>, ExpertError> {
        let routes = self
            .routes
            .read()
            .map_err(|_| ExpertError::Unavailable("routing table poisoned".into()))?;
        let k = req.top_k;
        let down = self.down_now();
        let mut parts: BTreeMap<usize, Part> = BTreeMap::new();
        let mut missing: BTreeSet<u32> = BTreeSet::new();
        for row in 0..req.num_rows() {
            for s in 0..k {
                let e = req.expert_ids[row * k + s];
                if e == NO_EXPERT {
                    continue;
                }
                let hosts = routes
                    .get(&(req.layer, e))
                    .map(Vec::as_slice)
                    .unwrap_or(&[]);
                let healthy: Vec<usize> = hosts
                    .iter()
                    .copied()
                    .filter(|w| !avoid.contains(w) && !down.contains(w))
                    .collect();
                // Spread an expert's rows over its copies; fall back to a worker that
                // failed in this call or recently only when no other copy is left (it
                // may have recovered), preferring one that did not fail in this call.
                let pool = if !healthy.is_empty() {
                    healthy
                } else {
                    let fresh: Vec<usize> = hosts
                        .iter()
                        .copied()
                        .filter(|w| !avoid.contains(w))
                        .collect();
                    if fresh.is_empty() {
                        hosts.to_vec()
                    } else {
                        fresh
                    }
                };
                let Some(&w) = pool.get(row % pool.len().max(1)) else {
                    missing.insert(e);
                    continue;
                };
                let part = parts.entry(w).or_insert_with(|| Part {
                    worker: w,
                    rows: Vec::new(),
                    ids: Vec::new(),
                    weights: Vec::new(),
                });
                if part.rows.last() != Some(&row) {
                    part.rows.push(row);
                    part.ids.extend(std::iter::repeat_n(NO_EXPERT, k));
                    part.weights.extend(std::iter::repeat_n(0.0, k));
                }
                let base = (part.rows.len() - 1) * k;
                part.ids[base + s] = e;
                part.weights[base + s] = req.weights[row * k + s];
            }
        }
        if !missing.is_empty() {
            return Err(ExpertError::Unavailable(format!(
                "no live worker hosts layer {} experts {:?}",
                req.layer, missing
            )));
        }
        Ok(parts.into_values().collect())
    }

    async fn send_part(
        &self,
        req: &MoeRequest<'_>,
        part: &Part,
        call: u64,
    ) -> Result<Vec<f32>, ExpertError> {
        let h = self.hidden;
        let mut rows = Vec::with_capacity(part.rows.len() * h);
        for r in &part.rows {
            rows.extend_from_slice(&req.rows[r * h..(r + 1) * h]);
        }
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
        if resp.error_code != 0 {
            let what = format!(
                "worker {}: {} (code {})",
                worker.addr(),
                resp.error_message,
                resp.error_code
            );
            return Err(match resp.error_code {
                3 => ExpertError::Invalid(what),
                _ => ExpertError::Unavailable(what),
            });
        }
        let dtype = RowDtype::from_wire(resp.dtype);
        match dtype {
            Some(d) if resp.output.len() == part.rows.len() * h * d.size() => {
                Ok(decode_rows(&resp.output, d))
            }
            _ => Err(ExpertError::Unavailable(format!(
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
                        for (j, r) in part.rows.iter().enumerate() {
                            for (o, v) in out[r * h..(r + 1) * h]
                                .iter_mut()
                                .zip(&y[j * h..(j + 1) * h])
                            {
                                *o += v;
                            }
                        }
                    }
                    Err(e @ ExpertError::Invalid(_)) => return Err(e),
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
            let mut retry_ids = vec![NO_EXPERT; req.expert_ids.len()];
            for (part, e) in &failed_parts {
                let addr = self.addr_of(part.worker);
                tracing::warn!(worker = %addr, error = %e, attempt, "dispatch failed; retrying");
                self.metrics
                    .dispatch_retries
                    .with_label_values(&[addr.as_str(), retry_reason(e)])
                    .inc();
                avoid.push(part.worker);
                self.mark_down(part.worker);
                for (j, r) in part.rows.iter().enumerate() {
                    for s in 0..req.top_k {
                        let id = part.ids[j * req.top_k + s];
                        if id != NO_EXPERT {
                            retry_ids[r * req.top_k + s] = id;
                        }
                    }
                }
            }
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

/// Locks `m`, taking the data of a poisoned lock as it is (it holds plain values).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
