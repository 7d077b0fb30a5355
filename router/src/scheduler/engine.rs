//! The engine thread: moves requests from the channel into the [`Batch`], runs each
//! step the batch plans through the model, sends each request its events, and applies
//! the step's results. The decisions are the batch's; this is the plumbing.
//!
//! The thread is supervised: a panic anywhere in the loop (the model included) is
//! caught, every running and queued request gets an INTERNAL error saying the engine
//! stopped, new requests are refused the same way, the `moe_engine_stopped` gauge goes
//! to 1 and readiness to NOT_SERVING. Nothing waits on a dead engine.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use moe_model::kv_cache::KvPool;
use moe_model::sequence::Sequence;
use moe_model::{ExpertBackend, Model, StepSeq, Tokenizer};
use moe_proto::traceparent::TraceParent;
use tokio::sync::{mpsc, watch};

use super::batch::{Batch, CacheFull, Limits, Outcome, Scheduled};
use super::{EngineConfig, EngineHandle, Event, InFlightGuard, Job, Usage};
use crate::error::ServeError;
use crate::metrics::RouterMetrics;

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

impl Scheduled for Running {
    fn prompt_remaining(&self) -> usize {
        self.seq.prompt_remaining()
    }
}

/// Everything the engine thread needs.
pub struct Engine {
    pub model: Arc<Model>,
    pub tokenizer: Arc<Tokenizer>,
    pub backend: Arc<dyn ExpertBackend>,
    pub config: EngineConfig,
    pub metrics: RouterMetrics,
}

/// What the loop holds between iterations; kept outside the part that may panic, so
/// that its requests can be answered after one.
struct LoopState {
    batch: Batch<Running>,
    /// The oldest request not admitted yet (the channel holds the others).
    head: Option<Job>,
    /// Steps run so far (the test hook counts them).
    steps: u64,
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

/// A panic's message, when it carries one.
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

impl Engine {
    /// Starts the engine thread; the handle is how requests reach it.
    pub fn start(self) -> std::io::Result<EngineHandle> {
        let (tx, rx) = mpsc::channel(self.config.max_waiting.max(1));
        let (stopped_tx, stopped) = watch::channel(None);
        let handle = EngineHandle {
            tx,
            shutting_down: Arc::default(),
            in_flight: Arc::default(),
            metrics: self.metrics.clone(),
            stopped,
        };
        std::thread::Builder::new()
            .name("moe-engine".into())
            .spawn(move || self.supervise(rx, stopped_tx))?;
        Ok(handle)
    }

    /// Runs the loop; if it panics, fails every request it held or that is queued, and
    /// refuses new ones from then on.
    fn supervise(self, mut rx: mpsc::Receiver<Job>, stopped: watch::Sender<Option<String>>) {
        let spec = self.model.spec().clone();
        let pool = KvPool::new(&spec, self.config.kv_capacity_tokens);
        let mut state = LoopState {
            batch: Batch::new(Limits {
                max_batch_tokens: self.config.max_batch_tokens,
                max_running: self.config.max_running,
            }),
            head: None,
            steps: 0,
        };
        let ran = catch_unwind(AssertUnwindSafe(|| self.run(&pool, &mut rx, &mut state)));
        let Err(payload) = ran else {
            return; // every handle is gone
        };
        let why = panic_message(payload.as_ref());
        let m = &self.metrics;
        m.engine_stopped.set(1);
        // Refuse new requests first, then answer everything already handed over.
        stopped.send_replace(Some(why.clone()));
        rx.close();
        let e = ServeError::Internal(format!("the engine stopped: {why}"));
        let running = state.batch.take_all();
        let mut queued: Vec<Job> = state.head.take().into_iter().collect();
        while let Ok(job) = rx.try_recv() {
            queued.push(job);
        }
        tracing::error!(
            panic = %why,
            running = running.len(),
            queued = queued.len(),
            "the engine thread panicked: failing its requests and refusing new ones; the router is NOT_SERVING until restarted"
        );
        for r in running {
            m.requests.with_label_values(&[e.outcome()]).inc();
            m.finished.with_label_values(&["error"]).inc();
            let _ = r.events.try_send(Event::Error(e.clone()));
        }
        for job in queued {
            m.waiting.dec();
            m.requests.with_label_values(&[e.outcome()]).inc();
            m.finished.with_label_values(&["error"]).inc();
            let _ = job.events.try_send(Event::Error(e.clone()));
        }
        m.running.set(0);
    }

    fn send(&self, r: &Running, ev: Event) -> bool {
        r.events.try_send(ev).is_ok()
    }

    fn run(&self, pool: &KvPool, rx: &mut mpsc::Receiver<Job>, state: &mut LoopState) {
        let m = &self.metrics;
        loop {
            if state.batch.is_empty() && state.head.is_none() {
                match rx.blocking_recv() {
                    Some(job) => state.head = Some(job),
                    None => return, // every handle is gone
                }
            }
            self.admit(pool, rx, state);
            // A client that went away frees its sequence now.
            for _ in state.batch.cancel_where(|r| r.events.is_closed()) {
                m.requests.with_label_values(&["cancelled"]).inc();
                m.finished.with_label_values(&["abort"]).inc();
            }
            m.running.set(state.batch.len() as i64);
            m.kv_usage.set(pool.usage());
            if state.batch.is_empty() {
                continue;
            }
            state.steps += 1;
            if self.config.test_panic_at_step == Some(state.steps) {
                panic!("test hook: the engine panics at step {}", state.steps);
            }
            self.step(&mut state.batch);
            m.running.set(state.batch.len() as i64);
            m.kv_usage.set(pool.usage());
        }
    }

    /// Admission: in arrival order, while the batch and the cache have room.
    fn admit(&self, pool: &KvPool, rx: &mut mpsc::Receiver<Job>, state: &mut LoopState) {
        let m = &self.metrics;
        let spec = self.model.spec();
        loop {
            if state.head.is_none() {
                match rx.try_recv() {
                    Ok(job) => state.head = Some(job),
                    Err(_) => break,
                }
            }
            let Some(job) = state.head.take() else { break };
            if job.events.is_closed() {
                m.waiting.dec();
                m.requests.with_label_values(&["cancelled"]).inc();
                m.finished.with_label_values(&["abort"]).inc();
                continue;
            }
            if !state.batch.has_room() {
                state.head = Some(job);
                break;
            }
            let want_logprobs = job.req.sampling.logprobs.is_some();
            let need = (job.req.prompt.len() + job.req.stop.max_tokens as usize)
                .min(spec.max_position_embeddings);
            let mut seq =
                match Sequence::new(job.req.clone(), pool, &self.tokenizer, spec, fresh_seed()) {
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
                match state.batch.on_cache_full() {
                    CacheFull::Refuse => {
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
                    // Running sequences free their blocks as they finish; the sequence
                    // is built again then.
                    CacheFull::Wait => {
                        state.head = Some(job);
                        break;
                    }
                }
            }
            m.waiting.dec();
            let now = Instant::now();
            m.queue.observe((now - job.arrived).as_secs_f64());
            state.batch.admit(Running {
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
    }

    fn step(&self, batch: &mut Batch<Running>) {
        let m = &self.metrics;
        let started = Instant::now();
        let plan = batch.plan();
        let mut prefill = false;
        let mut traces: Vec<String> = Vec::new();
        let mut members: Vec<(usize, bool)> = Vec::with_capacity(plan.len());
        let mut ids: Vec<String> = Vec::with_capacity(plan.len());
        let result = {
            let mut chunks: Vec<StepSeq<'_>> = Vec::with_capacity(plan.len());
            let mut planned = plan.iter().peekable();
            for (i, r) in batch.running_mut().enumerate() {
                let Some(p) = planned.next_if(|p| p.index == i) else {
                    break;
                };
                prefill |= r.seq.prompt_remaining() > 0;
                let (tokens, cache, sample) = r.seq.next_chunk(p.budget);
                members.push((i, sample));
                ids.push(r.id.clone());
                traces.extend(r.trace.as_ref().map(|t| t.to_string()));
                chunks.push(StepSeq { tokens, cache });
            }
            m.step_tokens
                .observe(chunks.iter().map(|b| b.tokens.len()).sum::<usize>() as f64);
            m.step_sequences.observe(chunks.len() as f64);
            self.backend.begin_step(&traces);
            self.model.forward(&mut chunks, self.backend.as_ref())
        };
        m.step
            .with_label_values(&[if prefill { "prefill" } else { "decode" }])
            .observe(started.elapsed().as_secs_f64());
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                let e = ServeError::from(e);
                tracing::warn!(error = %e, request_ids = ?ids, traceparents = ?traces, "step failed; failing its requests");
                let all: Vec<(usize, Outcome)> =
                    members.iter().map(|(i, _)| (*i, Outcome::End)).collect();
                for r in batch.apply(&all) {
                    m.requests.with_label_values(&[e.outcome()]).inc();
                    m.finished.with_label_values(&["error"]).inc();
                    let _ = r.events.try_send(Event::Error(e.clone()));
                }
                return;
            }
        };
        let now = Instant::now();
        let mut outcomes: Vec<(usize, Outcome)> = Vec::with_capacity(members.len());
        for ((i, sample), lg) in members.iter().zip(&logits) {
            let Some(r) = batch.get_mut(*i) else { continue };
            if !*sample {
                continue;
            }
            outcomes.push((*i, self.on_logits(r, lg, now)));
        }
        batch.apply(&outcomes);
    }

    /// Samples a sequence's next token, sends it, and says whether the sequence ended
    /// (stop condition, length, its client gone, or a sampling error).
    fn on_logits(&self, r: &mut Running, lg: &[f32], now: Instant) -> Outcome {
        let m = &self.metrics;
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
                    Outcome::End
                } else if !alive {
                    m.requests.with_label_values(&["cancelled"]).inc();
                    m.finished.with_label_values(&["abort"]).inc();
                    Outcome::End
                } else {
                    Outcome::Continue
                }
            }
            Err(e) => {
                let e = ServeError::from(e);
                tracing::warn!(request_id = %r.id, trace_id = r.trace.as_ref().map(|t| t.trace_id()), error = %e, "sampling failed");
                m.requests.with_label_values(&[e.outcome()]).inc();
                m.finished.with_label_values(&["error"]).inc();
                let _ = self.send(r, Event::Error(e));
                Outcome::End
            }
        }
    }
}
