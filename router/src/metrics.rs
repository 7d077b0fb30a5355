//! The router's Prometheus metrics. Names follow vLLM's meanings (time to first token,
//! inter-token latency, queue time, running/waiting, KV usage, prompt/generation tokens)
//! so existing dashboards carry over, with prefix `moe_`; plus what nobody exports yet:
//! per-layer load imbalance, per-worker dispatch latency, bytes and retries, experts
//! without a live copy, placement version. Base units (`_seconds`, `_bytes`), `_total`
//! counters, HELP on every metric. Cardinality is bounded by layers × devices: the
//! per-expert series (`moe_expert_tokens_total`, `moe_expert_copies`) are exported only
//! with `--metrics-expert-detail` ([`crate::load`]).

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub const REQUESTS: &str = "moe_requests_total";
pub const TTFT: &str = "moe_time_to_first_token_seconds";
pub const ITL: &str = "moe_inter_token_latency_seconds";
pub const E2E: &str = "moe_e2e_request_latency_seconds";
pub const QUEUE: &str = "moe_request_queue_time_seconds";
pub const RUNNING: &str = "moe_num_requests_running";
pub const WAITING: &str = "moe_num_requests_waiting";
pub const PROMPT_TOKENS: &str = "moe_prompt_tokens_total";
pub const GENERATION_TOKENS: &str = "moe_generation_tokens_total";
pub const KV_USAGE: &str = "moe_kv_cache_usage_ratio";
pub const STEP: &str = "moe_engine_step_seconds";
pub const DISPATCH: &str = "moe_dispatch_seconds";
pub const DISPATCH_RETRIES: &str = "moe_dispatch_retries_total";
pub const EXPERT_TOKENS: &str = "moe_expert_tokens_total";
pub const PLACEMENT_VERSION: &str = "moe_placement_version";
pub const WORKER_MARKED_DOWN: &str = "moe_worker_marked_down_total";
pub const LIVE_WORKERS: &str = "moe_live_workers";
pub const EXPERT_COPIES: &str = "moe_expert_copies";
pub const CONTROLLER_LEADER: &str = "moe_controller_is_leader";
pub const LEADER_CHANGES: &str = "moe_controller_leader_changes_total";
pub const ETCD_CONNECTED: &str = "moe_etcd_connected";
pub const PLACEMENTS_PUBLISHED: &str = "moe_placements_published_total";
pub const SPLIT_STEPS: &str = "moe_split_steps_total";
pub const READY: &str = "moe_router_ready";
pub const ENGINE_STOPPED: &str = "moe_engine_stopped";
pub const FINISHED: &str = "moe_requests_finished_total";
pub const STEP_TOKENS: &str = "moe_engine_step_tokens";
pub const STEP_SEQUENCES: &str = "moe_engine_step_sequences";
pub const DISPATCH_REQUESTS: &str = "moe_dispatch_requests_total";
pub const DISPATCH_BYTES: &str = "moe_dispatch_bytes_total";
pub const WITHOUT_COPY: &str = "moe_experts_without_live_copy";
pub const COPIES_MIN: &str = "moe_expert_copies_min";
pub const LAYER_IMBALANCE: &str = "moe_layer_load_imbalance";
pub const BUILD_INFO: &str = "moe_build_info";
pub const MAX_WAITING: &str = "moe_max_num_requests_waiting";

/// The version and commit this binary was built from (recorded by the worker crate's
/// `build.rs`: one build, one identity).
pub use moe_worker::metrics::{GIT_COMMIT, VERSION};

/// Latency buckets from 1 ms to ~30 s.
fn latency_buckets() -> Vec<f64> {
    vec![
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ]
}

/// Buckets of per-step sizes (tokens, sequences): powers of two up to 8192.
fn size_buckets() -> Vec<f64> {
    (0..14).map(|i| f64::from(1u32 << i)).collect()
}

#[derive(Clone)]
pub struct RouterMetrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    pub queue: Histogram,
    pub running: IntGauge,
    pub waiting: IntGauge,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub kv_usage: Gauge,
    /// By `kind`: `prefill` (the step carried a prompt chunk) or `decode`.
    pub step: HistogramVec,
    pub step_tokens: Histogram,
    pub step_sequences: Histogram,
    /// By `reason`: `stop`, `length`, `abort` (the client left), `error`.
    pub finished: IntCounterVec,
    pub dispatch: HistogramVec,
    pub dispatch_requests: IntCounterVec,
    /// By `worker` and `direction` (`sent`, `received`): hidden-state bytes on the wire.
    pub dispatch_bytes: IntCounterVec,
    pub dispatch_retries: IntCounterVec,
    /// Tokens routed to each expert since start (the load placement balances).
    pub expert_load: std::sync::Arc<crate::load::ExpertLoad>,
    pub placement_version: IntGauge,
    pub worker_marked_down: IntCounterVec,
    pub live_workers: IntGauge,
    /// Per expert; registered only with `--metrics-expert-detail`.
    pub expert_copies: IntGaugeVec,
    pub experts_without_copy: IntGauge,
    pub expert_copies_min: IntGauge,
    pub layer_imbalance: GaugeVec,
    pub build_info: IntGaugeVec,
    pub max_waiting: IntGauge,
    pub controller_leader: IntGauge,
    pub leader_changes: IntCounter,
    pub etcd_connected: IntGauge,
    pub placements_published: IntCounter,
    pub split_steps: IntCounter,
    pub ready: IntGauge,
    pub engine_stopped: IntGauge,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    // Names are constants and unique, so registration cannot collide.
    if let Err(e) = r.register(Box::new(c.clone())) {
        tracing::error!(error = %e, "metric registration failed");
    }
    c
}

fn hist(name: &str, help: &str) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(latency_buckets()))
        .unwrap_or_else(|_| unreachable_metric(name))
}

#[cold]
fn unreachable_metric(name: &str) -> ! {
    // Only reachable with an invalid constant name: a programming error caught by tests.
    panic!("invalid metric definition {name}")
}

impl RouterMetrics {
    /// The metrics without per-expert series.
    pub fn new() -> RouterMetrics {
        RouterMetrics::with_detail(false)
    }

    /// With `expert_detail`, also the per-expert series (`--metrics-expert-detail`).
    pub fn with_detail(expert_detail: bool) -> RouterMetrics {
        let r = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|_| unreachable_metric(name))
        };
        let int_gauge = |name: &str, help: &str| {
            IntGauge::new(name, help).unwrap_or_else(|_| unreachable_metric(name))
        };
        let counter = |name: &str, help: &str| {
            IntCounter::new(name, help).unwrap_or_else(|_| unreachable_metric(name))
        };
        let m = RouterMetrics {
            requests: reg(&r, counter_vec(REQUESTS, "Finished requests by outcome (ok, invalid, overloaded, unavailable, cancelled, error).", &["outcome"])),
            ttft: reg(&r, hist(TTFT, "Time from arrival to the first generated token.")),
            itl: reg(&r, hist(ITL, "Time between consecutive generated tokens of a request.")),
            e2e: reg(&r, hist(E2E, "Time from arrival to the last token of a request.")),
            queue: reg(&r, hist(QUEUE, "Time a request waited before its first step.")),
            running: reg(&r, int_gauge(RUNNING, "Requests in the running batch.")),
            waiting: reg(&r, int_gauge(WAITING, "Requests waiting to be admitted.")),
            prompt_tokens: reg(&r, counter(PROMPT_TOKENS, "Prompt tokens processed.")),
            generation_tokens: reg(&r, counter(GENERATION_TOKENS, "Tokens generated.")),
            kv_usage: reg(&r, Gauge::new(KV_USAGE, "Fraction of KV cache blocks in use (0 to 1).").unwrap_or_else(|_| unreachable_metric(KV_USAGE))),
            step: reg(&r, HistogramVec::new(HistogramOpts::new(STEP, "Duration of one engine step (all layers, all sequences of the batch), by kind: prefill (a prompt chunk was in it) or decode.").buckets(latency_buckets()), &["kind"]).unwrap_or_else(|_| unreachable_metric(STEP))),
            step_tokens: reg(&r, Histogram::with_opts(HistogramOpts::new(STEP_TOKENS, "Tokens in one engine step (decode tokens plus prefill chunks).").buckets(size_buckets())).unwrap_or_else(|_| unreachable_metric(STEP_TOKENS))),
            step_sequences: reg(&r, Histogram::with_opts(HistogramOpts::new(STEP_SEQUENCES, "Sequences in one engine step (the batch size).").buckets(size_buckets())).unwrap_or_else(|_| unreachable_metric(STEP_SEQUENCES))),
            finished: reg(&r, counter_vec(FINISHED, "Requests the engine finished, by reason: stop, length, abort (the client left), error.", &["reason"])),
            dispatch_requests: reg(&r, counter_vec(DISPATCH_REQUESTS, "MoE-layer dispatches sent to each worker (retries included).", &["worker"])),
            dispatch_bytes: reg(&r, counter_vec(DISPATCH_BYTES, "Hidden-state bytes exchanged with each worker, by direction (sent, received).", &["worker", "direction"])),
            dispatch: reg(
                &r,
                HistogramVec::new(HistogramOpts::new(DISPATCH, "Round trip of one MoE layer's rows to one worker.").buckets(latency_buckets()), &["worker"])
                    .unwrap_or_else(|_| unreachable_metric(DISPATCH)),
            ),
            dispatch_retries: reg(&r, counter_vec(DISPATCH_RETRIES, "Expert dispatches sent again, by worker and reason.", &["worker", "reason"])),
            expert_load: Default::default(),
            placement_version: reg(&r, int_gauge(PLACEMENT_VERSION, "Version of the expert placement in force.")),
            worker_marked_down: reg(&r, counter_vec(WORKER_MARKED_DOWN, "Times a worker was marked down after a failed dispatch (skipped while other copies exist).", &["worker"])),
            live_workers: reg(&r, int_gauge(LIVE_WORKERS, "Workers routed to: registered (or listed) and answering, not drained away.")),
            expert_copies: {
                let v = IntGaugeVec::new(Opts::new(EXPERT_COPIES, "Ready copies of each expert the routes use (0: requests needing it wait, then fail UNAVAILABLE); with --metrics-expert-detail."), &["layer", "expert"]).unwrap_or_else(|_| unreachable_metric(EXPERT_COPIES));
                if expert_detail { reg(&r, v) } else { v }
            },
            experts_without_copy: reg(&r, int_gauge(WITHOUT_COPY, "Experts of the model with no copy on a live worker (requests needing one wait, then fail UNAVAILABLE).")),
            expert_copies_min: reg(&r, int_gauge(COPIES_MIN, "Fewest ready copies any expert has on live workers.")),
            layer_imbalance: reg(&r, GaugeVec::new(Opts::new(LAYER_IMBALANCE, "Max over mean of the devices' routed-token load in each MoE layer over the last window (1 is even)."), &["layer"]).unwrap_or_else(|_| unreachable_metric(LAYER_IMBALANCE))),
            build_info: reg(&r, IntGaugeVec::new(Opts::new(BUILD_INFO, "Always 1: the version and git commit of this binary and the model it serves."), &["version", "git_commit", "model"]).unwrap_or_else(|_| unreachable_metric(BUILD_INFO))),
            max_waiting: reg(&r, int_gauge(MAX_WAITING, "Most requests the waiting queue holds (--max-waiting); beyond it requests get RESOURCE_EXHAUSTED / 429.")),
            controller_leader: reg(&r, int_gauge(CONTROLLER_LEADER, "1 while this router is the elected placement controller.")),
            leader_changes: reg(&r, counter(LEADER_CHANGES, "Times this router saw a new placement controller elected (itself or another).")),
            etcd_connected: reg(&r, int_gauge(ETCD_CONNECTED, "1 while this router's membership watch is connected to etcd (serving continues on the last view when 0).")),
            placements_published: reg(&r, counter(PLACEMENTS_PUBLISHED, "Placements this router published as controller (with etcd), or re-placed on its static workers.")),
            split_steps: reg(&r, counter(SPLIT_STEPS, "Engine steps run as two micro-batches, so that one's expert dispatch overlaps the other's attention (--overlap).")),
            ready: reg(&r, int_gauge(READY, "1 while this router can serve: not draining, and every routed expert has a copy on a live worker (its readiness probe).")),
            engine_stopped: reg(&r, int_gauge(ENGINE_STOPPED, "1 once the engine thread died (a panic): every request fails INTERNAL and the router is NOT_SERVING until restarted.")),
            registry: r,
        };
        if expert_detail {
            match crate::load::ExpertLoadCollector::new(m.expert_load.clone()) {
                Ok(c) => {
                    if let Err(e) = m.registry.register(Box::new(c)) {
                        tracing::error!(error = %e, "registering the per-expert load failed");
                    }
                }
                Err(e) => tracing::error!(error = %e, "the per-expert load collector failed"),
            }
        }
        m
    }

    /// Tokens routed to each expert of `spec` since start.
    pub fn expert_token_counts(
        &self,
        spec: &moe_model::ModelSpec,
    ) -> std::collections::BTreeMap<(usize, u32), u64> {
        self.expert_load.counts(spec)
    }

    /// Sets `moe_build_info` for the model served.
    pub fn set_build_info(&self, model: &str) {
        self.build_info
            .with_label_values(&[VERSION, GIT_COMMIT, model])
            .set(1);
    }

    /// The text exposition of this registry and any others (e.g. in-process workers).
    pub fn render(&self, extra: &[&Registry]) -> String {
        let mut families = self.registry.gather();
        for r in extra {
            families.extend(r.gather());
        }
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&families, &mut buf) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

impl Default for RouterMetrics {
    fn default() -> Self {
        Self::new()
    }
}
