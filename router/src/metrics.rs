//! The router's Prometheus metrics. Names follow vLLM's meanings (time to first token,
//! inter-token latency, queue time, running/waiting, KV usage, prompt/generation tokens)
//! so existing dashboards carry over, with prefix `moe_`; plus what nobody exports yet:
//! per-expert load, per-worker dispatch latency and retries, placement version.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
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
pub const READY: &str = "moe_router_ready";

/// Latency buckets from 1 ms to ~30 s.
fn latency_buckets() -> Vec<f64> {
    vec![
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ]
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
    pub step: Histogram,
    pub dispatch: HistogramVec,
    pub dispatch_retries: IntCounterVec,
    pub expert_tokens: IntCounterVec,
    pub placement_version: IntGauge,
    pub worker_marked_down: IntCounterVec,
    pub live_workers: IntGauge,
    pub expert_copies: IntGaugeVec,
    pub controller_leader: IntGauge,
    pub leader_changes: IntCounter,
    pub etcd_connected: IntGauge,
    pub placements_published: IntCounter,
    pub ready: IntGauge,
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
    pub fn new() -> RouterMetrics {
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
        RouterMetrics {
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
            step: reg(&r, hist(STEP, "Duration of one engine step (all layers, all sequences of the batch).")),
            dispatch: reg(
                &r,
                HistogramVec::new(HistogramOpts::new(DISPATCH, "Round trip of one MoE layer's rows to one worker.").buckets(latency_buckets()), &["worker"])
                    .unwrap_or_else(|_| unreachable_metric(DISPATCH)),
            ),
            dispatch_retries: reg(&r, counter_vec(DISPATCH_RETRIES, "Expert dispatches sent again, by worker and reason.", &["worker", "reason"])),
            expert_tokens: reg(&r, counter_vec(EXPERT_TOKENS, "Tokens routed to each expert (per-expert load).", &["layer", "expert"])),
            placement_version: reg(&r, int_gauge(PLACEMENT_VERSION, "Version of the expert placement in force.")),
            worker_marked_down: reg(&r, counter_vec(WORKER_MARKED_DOWN, "Times a worker was marked down after a failed dispatch (skipped while other copies exist).", &["worker"])),
            live_workers: reg(&r, int_gauge(LIVE_WORKERS, "Workers routed to: registered (or listed) and answering, not drained away.")),
            expert_copies: reg(&r, IntGaugeVec::new(Opts::new(EXPERT_COPIES, "Ready copies of each expert the routes use (0: requests needing it wait, then fail UNAVAILABLE)."), &["layer", "expert"]).unwrap_or_else(|_| unreachable_metric(EXPERT_COPIES))),
            controller_leader: reg(&r, int_gauge(CONTROLLER_LEADER, "1 while this router is the elected placement controller.")),
            leader_changes: reg(&r, counter(LEADER_CHANGES, "Times this router saw a new placement controller elected (itself or another).")),
            etcd_connected: reg(&r, int_gauge(ETCD_CONNECTED, "1 while this router's membership watch is connected to etcd (serving continues on the last view when 0).")),
            placements_published: reg(&r, counter(PLACEMENTS_PUBLISHED, "Placements this router published as controller.")),
            ready: reg(&r, int_gauge(READY, "1 while this router can serve: not draining, and every routed expert has a copy on a live worker (its readiness probe).")),
            registry: r,
        }
    }

    /// Tokens routed to each expert of `spec` since start, from the per-expert counters.
    pub fn expert_token_counts(
        &self,
        spec: &moe_model::ModelSpec,
    ) -> std::collections::BTreeMap<(usize, u32), u64> {
        let mut tokens = std::collections::BTreeMap::new();
        for layer in spec.moe_layers() {
            let l = layer.to_string();
            for e in 0..spec.moe.num_experts as u32 {
                let n = self
                    .expert_tokens
                    .with_label_values(&[l.as_str(), e.to_string().as_str()])
                    .get();
                tokens.insert((layer, e), n);
            }
        }
        tokens
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
