//! The engine loop: one thread that owns every running sequence and its KV cache, and
//! runs continuous batching. Each step, every running sequence decodes one token and
//! waiting prompts are prefilled in chunks while the step's token budget allows. Requests
//! arrive through a bounded channel (full → `Overloaded`); each carries its own event
//! channel, and a request whose client went away is dropped at once, freeing its cache.
//!
//! The loop is a plain thread, not a task: a step is seconds of CPU math at worst and
//! calls the expert backend synchronously (the remote backend bridges to async itself).
//!
//! [`batch`] holds the decisions (admission, each step's members, ending sequences) as
//! plain state; [`engine`] is the supervised thread that runs them and the model. This
//! module is the front: the request and event types and the [`EngineHandle`].

pub mod batch;
mod engine;

pub use engine::Engine;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moe_model::{FinishReason, Sampled, SequenceRequest};
use moe_proto::traceparent::TraceParent;
use tokio::sync::{mpsc, watch, Notify};

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
    /// Test hook: the engine thread panics before running this step (1-based), to test
    /// what a dead engine does to requests and readiness. Never set in production.
    pub test_panic_at_step: Option<u64>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch_tokens: 512,
            max_running: 64,
            max_waiting: 256,
            kv_capacity_tokens: 1 << 16,
            test_panic_at_step: None,
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
    /// Why the engine thread died, once it has (`None` while it runs).
    stopped: watch::Receiver<Option<String>>,
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
        if let Some(e) = self.stopped_error() {
            return Err(e);
        }
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
            Err(mpsc::error::TrySendError::Closed(_)) => Err(self
                .stopped_error()
                .unwrap_or_else(|| ServeError::Unavailable("the engine has stopped".into()))),
        }
    }

    /// Why the engine thread died (a panic), once it has.
    pub fn stopped(&self) -> Option<String> {
        self.stopped.borrow().clone()
    }

    /// Changes to [`EngineHandle::stopped`], for readiness to follow at once.
    pub fn watch_stopped(&self) -> watch::Receiver<Option<String>> {
        self.stopped.clone()
    }

    /// The error every request gets once the engine died.
    fn stopped_error(&self) -> Option<ServeError> {
        self.stopped()
            .map(|why| ServeError::Internal(format!("the engine stopped: {why}")))
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
