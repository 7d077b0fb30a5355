//! The engine loop: one thread that owns every running sequence and its KV cache, and
//! runs continuous batching. Each step, every running sequence decodes one token and
//! waiting prompts are prefilled in chunks while the step's token budget allows. Requests
//! arrive through a bounded channel (full → `Overloaded`); each carries its own event
//! channel, and a request whose client went away is dropped at once, freeing its cache.
//!
//! The loop is a plain thread, not a task: a step is seconds of CPU math at worst and
//! calls the expert backend synchronously (the remote backend bridges to async itself).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moe_model::kv_cache::KvPool;
use moe_model::sequence::Sequence;
use moe_model::{ExpertBackend, FinishReason, Model, Sampled, SequenceRequest, StepSeq, Tokenizer};
use moe_proto::traceparent::TraceParent;
use tokio::sync::{mpsc, Notify};

use crate::error::ServeError;
use crate::metrics::RouterMetrics;

/// Scheduler limits.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Tokens per step (decode tokens plus prefill chunks).
    pub max_batch_tokens: usize,
    /// Sequences in the running batch.
    pub max_running: usize,
    /// Requests allowed to wait; one more gets `Overloaded`.
    pub max_waiting: usize,
    /// KV cache capacity in tokens.
    pub kv_capacity_tokens: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch_tokens: 512,
            max_running: 64,
            max_waiting: 256,
            kv_capacity_tokens: 1 << 16,
        }
    }
}

/// Timing and token counts of a finished request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub time_to_first_token_ms: f64,
    pub total_time_ms: f64,
    pub queue_time_ms: f64,
}

/// What a request's stream carries.
#[derive(Debug, Clone)]
pub enum Event {
    /// Tokens produced since the last event, and their completed text.
    Tokens { tokens: Vec<Sampled>, text: String },
    /// The last event of a successful request.
    Done { reason: FinishReason, usage: Usage },
    /// The request failed; nothing follows.
    Error(ServeError),
}

/// One request handed to the engine.
pub struct Job {
    pub id: String,
    /// The client's W3C trace context, if it sent one.
    pub trace: Option<TraceParent>,
    pub req: SequenceRequest,
    pub events: mpsc::Sender<Event>,
    pub arrived: Instant,
    /// Counts the request in flight until it is dropped (finished, failed or cancelled).
    _in_flight: InFlightGuard,
}

/// Requests handed to the engine and not ended yet; [`EngineHandle::drained`] waits on
/// `idle` (a notification, not a poll of the metrics).
#[derive(Default)]
struct InFlight {
    n: AtomicUsize,
    idle: Notify,
}

/// One request's share of [`InFlight`]; dropping it ends the request's count.
struct InFlightGuard(Arc<InFlight>);

impl InFlightGuard {
    fn new(f: &Arc<InFlight>) -> InFlightGuard {
        f.n.fetch_add(1, Ordering::AcqRel);
        InFlightGuard(f.clone())
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.n.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// The cheap, cloneable front of the engine.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Job>,
    shutting_down: Arc<AtomicBool>,
    in_flight: Arc<InFlight>,
    metrics: RouterMetrics,
}

impl EngineHandle {
    /// Queues a request; `Overloaded` when the waiting queue is full, `Unavailable` while
    /// shutting down. Returns the receiver of its events.
    pub fn submit(
        &self,
        id: String,
        trace: Option<TraceParent>,
        req: SequenceRequest,
    ) -> Result<mpsc::Receiver<Event>, ServeError> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(ServeError::Unavailable(
                "the server is shutting down".into(),
            ));
        }
        // One slot per token plus the final event: a send can never find the channel
        // full, so a slow client never stalls the engine.
        let (events, rx) = mpsc::channel(req.stop.max_tokens as usize + 2);
        let job = Job {
            id,
            trace,
            req,
            events,
            arrived: Instant::now(),
            _in_flight: InFlightGuard::new(&self.in_flight),
        };
        match self.tx.try_send(job) {
            Ok(()) => {
                self.metrics.waiting.inc();
                Ok(rx)
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err(ServeError::Overloaded(format!(
                "{} requests are already waiting",
                self.tx.max_capacity()
            ))),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Err(ServeError::Unavailable("the engine has stopped".into()))
            }
        }
    }

    /// Refuse new work from now on (SIGTERM); queued and running requests continue.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    /// Waits until nothing is queued or running, or the deadline passes. True if idle.
    pub async fn drained(&self, deadline: Duration) -> bool {
        let end = tokio::time::Instant::now() + deadline;
        loop {
            let idle = self.in_flight.idle.notified();
            tokio::pin!(idle);
            // Registered before the check, so a request ending in between still wakes us.
            idle.as_mut().enable();
            if self.in_flight.n.load(Ordering::Acquire) == 0 {
                return true;
            }
            if tokio::time::timeout_at(end, idle).await.is_err() {
                return self.in_flight.n.load(Ordering::Acquire) == 0;
            }
        }
    }
}

struct Running {
    _in_flight: InFlightGuard,
    id: String,
    trace: Option<TraceParent>,
    seq: Sequence,
    events: mpsc::Sender<Event>,
    arrived: Instant,
    admitted: Instant,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    want_logprobs: bool,
}

/// Everything the engine thread needs.
pub struct Engine {
    pub model: Arc<Model>,
    pub tokenizer: Arc<Tokenizer>,
    pub backend: Arc<dyn ExpertBackend>,
    pub config: EngineConfig,
    pub metrics: RouterMetrics,
}

static SEED_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A seed for requests that bring none: different per request and per process.
fn fresh_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ SEED_COUNTER.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
        ^ u64::from(std::process::id())
}

impl Engine {
    /// Starts the engine thread; the handle is how requests reach it.
    pub fn start(self) -> std::io::Result<EngineHandle> {
        let (tx, rx) = mpsc::channel(self.config.max_waiting.max(1));
        let handle = EngineHandle {
            tx,
            shutting_down: Arc::new(AtomicBool::new(false)),
            in_flight: Arc::default(),
            metrics: self.metrics.clone(),
        };
        std::thread::Builder::new()
            .name("moe-engine".into())
            .spawn(move || self.run(rx))?;
        Ok(handle)
    }

    fn send(&self, r: &Running, ev: Event) -> bool {
        r.events.try_send(ev).is_ok()
    }

    fn run(self, mut rx: mpsc::Receiver<Job>) {
        let spec = self.model.spec().clone();
        let pool = KvPool::new(&spec, self.config.kv_capacity_tokens);
        let m = &self.metrics;
        let mut running: Vec<Running> = Vec::new();
        let mut head: Option<Job> = None;
        loop {
            if running.is_empty() && head.is_none() {
                match rx.blocking_recv() {
                    Some(job) => head = Some(job),
                    None => return, // every handle is gone
                }
            }
            // Admission: in arrival order, while the batch and the cache have room.
            loop {
                if head.is_none() {
                    match rx.try_recv() {
                        Ok(job) => head = Some(job),
                        Err(_) => break,
                    }
                }
                let Some(job) = head.take() else { break };
                if job.events.is_closed() {
                    m.waiting.dec();
                    m.requests.with_label_values(&["cancelled"]).inc();
                    m.finished.with_label_values(&["abort"]).inc();
                    continue;
                }
                if running.len() >= self.config.max_running {
                    head = Some(job);
                    break;
                }
                let want_logprobs = job.req.sampling.logprobs.is_some();
                let need = (job.req.prompt.len() + job.req.stop.max_tokens as usize)
                    .min(spec.max_position_embeddings);
                let mut seq = match Sequence::new(
                    job.req.clone(),
                    &pool,
                    &self.tokenizer,
                    &spec,
                    fresh_seed(),
                ) {
                    Ok(s) => s,
                    Err(e) => {
                        m.waiting.dec();
                        let e = ServeError::from(e);
                        m.requests.with_label_values(&[e.outcome()]).inc();
                        m.finished.with_label_values(&["error"]).inc();
                        let _ = job.events.try_send(Event::Error(e));
                        continue;
                    }
                };
                if seq.reserve_total(need).is_err() {
                    if running.is_empty() {
                        // It cannot fit even alone.
                        m.waiting.dec();
                        let e = ServeError::Overloaded(format!(
                            "the request needs {need} tokens of KV cache; the capacity is {}",
                            self.config.kv_capacity_tokens
                        ));
                        m.requests.with_label_values(&[e.outcome()]).inc();
                        m.finished.with_label_values(&["error"]).inc();
                        let _ = job.events.try_send(Event::Error(e));
                        continue;
                    }
                    // Wait for running sequences to finish and free their blocks; the
                    // sequence is built again then.
                    head = Some(job);
                    break;
                }
                m.waiting.dec();
                let now = Instant::now();
                m.queue.observe((now - job.arrived).as_secs_f64());
                running.push(Running {
                    _in_flight: job._in_flight,
                    id: job.id,
                    trace: job.trace,
                    seq,
                    events: job.events,
                    arrived: job.arrived,
                    admitted: now,
                    first_token: None,
                    last_token: None,
                    want_logprobs,
                });
            }
            // A client that went away frees its sequence now.
            let before = running.len();
            running.retain(|r| !r.events.is_closed());
            for _ in running.len()..before {
                m.requests.with_label_values(&["cancelled"]).inc();
                m.finished.with_label_values(&["abort"]).inc();
            }
            m.running.set(running.len() as i64);
            m.kv_usage.set(pool.usage());
            if running.is_empty() {
                continue;
            }
            self.step(&mut running);
            m.running.set(running.len() as i64);
            m.kv_usage.set(pool.usage());
        }
    }

    fn step(&self, running: &mut Vec<Running>) {
        let m = &self.metrics;
        let started = Instant::now();
        // Decoding sequences first (one token each), then prefill chunks in arrival order.
        running.sort_by_key(|r| (r.seq.prompt_remaining() > 0, r.admitted));
        let mut budget = self.config.max_batch_tokens.max(1);
        let mut batch: Vec<StepSeq<'_>> = Vec::new();
        let mut members: Vec<(usize, bool)> = Vec::new();
        let mut prefill = false;
        let mut traces: Vec<String> = Vec::new();
        for (i, r) in running.iter_mut().enumerate() {
            if budget == 0 {
                break;
            }
            prefill |= r.seq.prompt_remaining() > 0;
            let (tokens, cache, sample) = r.seq.next_chunk(budget);
            budget = budget.saturating_sub(tokens.len());
            members.push((i, sample));
            traces.extend(r.trace.as_ref().map(|t| t.to_string()));
            batch.push(StepSeq { tokens, cache });
        }
        m.step_tokens
            .observe(batch.iter().map(|b| b.tokens.len()).sum::<usize>() as f64);
        m.step_sequences.observe(batch.len() as f64);
        self.backend.begin_step(&traces);
        let result = self.model.forward(&mut batch, self.backend.as_ref());
        drop(batch);
        m.step
            .with_label_values(&[if prefill { "prefill" } else { "decode" }])
            .observe(started.elapsed().as_secs_f64());
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                let e = ServeError::from(e);
                let ids: Vec<&str> = members
                    .iter()
                    .map(|(i, _)| running[*i].id.as_str())
                    .collect();
                tracing::warn!(error = %e, request_ids = ?ids, traceparents = ?traces, "step failed; failing its requests");
                let mut failed: Vec<usize> = members.iter().map(|(i, _)| *i).collect();
                failed.sort_unstable();
                for i in failed.into_iter().rev() {
                    let r = running.remove(i);
                    m.requests.with_label_values(&[e.outcome()]).inc();
                    m.finished.with_label_values(&["error"]).inc();
                    let _ = r.events.try_send(Event::Error(e.clone()));
                }
                return;
            }
        };
        let now = Instant::now();
        let mut finished: Vec<usize> = Vec::new();
        for ((i, sample), lg) in members.iter().zip(&logits) {
            let r = &mut running[*i];
            if !*sample {
                continue;
            }
            if r.seq.generated().is_empty() {
                m.prompt_tokens.inc_by((r.seq.prompt_len()) as u64);
            }
            match r.seq.on_logits(lg, &self.tokenizer) {
                Ok(ev) => {
                    m.generation_tokens.inc();
                    match r.last_token {
                        None => m.ttft.observe((now - r.arrived).as_secs_f64()),
                        Some(t) => m.itl.observe((now - t).as_secs_f64()),
                    }
                    r.first_token.get_or_insert(now);
                    r.last_token = Some(now);
                    let mut token = ev.token;
                    if !r.want_logprobs {
                        token.top_logprobs.clear();
                    }
                    let mut alive = self.send(
                        r,
                        Event::Tokens {
                            tokens: vec![token],
                            text: ev.text,
                        },
                    );
                    if let Some(reason) = ev.finish {
                        let usage = Usage {
                            prompt_tokens: r.seq.prompt_len() as u32,
                            completion_tokens: r.seq.generated().len() as u32,
                            time_to_first_token_ms: r
                                .first_token
                                .map(|t| (t - r.arrived).as_secs_f64() * 1e3)
                                .unwrap_or(0.0),
                            total_time_ms: (now - r.arrived).as_secs_f64() * 1e3,
                            queue_time_ms: (r.admitted - r.arrived).as_secs_f64() * 1e3,
                        };
                        alive &= self.send(r, Event::Done { reason, usage });
                        tracing::debug!(request_id = %r.id, trace_id = r.trace.as_ref().map(|t| t.trace_id()), reason = reason.as_str(), tokens = r.seq.generated().len(), "request finished");
                        m.e2e.observe((now - r.arrived).as_secs_f64());
                        m.requests
                            .with_label_values(&[if alive { "ok" } else { "cancelled" }])
                            .inc();
                        m.finished
                            .with_label_values(&[if alive { reason.as_str() } else { "abort" }])
                            .inc();
                        finished.push(*i);
                    } else if !alive {
                        m.requests.with_label_values(&["cancelled"]).inc();
                        m.finished.with_label_values(&["abort"]).inc();
                        finished.push(*i);
                    }
                }
                Err(e) => {
                    let e = ServeError::from(e);
                    tracing::warn!(request_id = %r.id, trace_id = r.trace.as_ref().map(|t| t.trace_id()), error = %e, "sampling failed");
                    m.requests.with_label_values(&[e.outcome()]).inc();
                    m.finished.with_label_values(&["error"]).inc();
                    let _ = self.send(r, Event::Error(e));
                    finished.push(*i);
                }
            }
        }
        finished.sort_unstable();
        for i in finished.into_iter().rev() {
            running.remove(i);
        }
    }
}
