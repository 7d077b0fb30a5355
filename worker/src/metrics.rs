//! Prometheus metrics of a worker: every metric and label name as a constant, and
//! [`WorkerMetrics`], which owns a per-node [`prometheus::Registry`] (not the global one,
//! so several nodes in one process, as in tests or standalone mode, never clash).
//!
//! Labels are low-cardinality by construction: `device` is a configured device name,
//! `outcome` is one of four fixed values; no label ever carries request data.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Dispatch requests answered, by outcome.
pub const DISPATCH_REQUESTS_TOTAL: &str = "moe_worker_dispatch_requests_total";
/// Rows received in valid dispatch requests.
pub const DISPATCH_ROWS_TOTAL: &str = "moe_worker_dispatch_rows_total";
/// Token-expert slots a device computed, by MoE layer: the load of each (layer, device).
pub const EXPERT_TOKENS_TOTAL: &str = "moe_worker_expert_tokens_total";
/// Time a device spent computing one request's rows.
pub const COMPUTE_SECONDS: &str = "moe_worker_compute_seconds";
/// Device actors restarted after a failure.
pub const DEVICE_RESTARTS_TOTAL: &str = "moe_worker_device_restarts_total";
/// Bytes of expert weights held by a device.
pub const EXPERT_BYTES: &str = "moe_worker_expert_bytes";
/// Number of experts held by a device.
pub const HOSTED_EXPERTS: &str = "moe_worker_hosted_experts";
/// Placement version of the last completed load.
pub const PLACEMENT_VERSION: &str = "moe_worker_placement_version";
/// Always 1: version, git commit and model of the binary (routers export the same name).
pub const BUILD_INFO: &str = "moe_build_info";

/// The version and commit this binary was built from (`MOE_GIT_COMMIT` at build time,
/// else what `git` said, else "unknown"; see `build.rs`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const GIT_COMMIT: &str = env!("MOE_GIT_COMMIT");

/// Label: the outcome of a dispatch request ([`Outcome`]).
pub const LABEL_OUTCOME: &str = "outcome";
/// Label: a device name (`cpu:0`).
pub const LABEL_DEVICE: &str = "device";
/// Label: a MoE layer index.
pub const LABEL_LAYER: &str = "layer";

/// Buckets of [`COMPUTE_SECONDS`]: 50 µs to 5 s.
const COMPUTE_BUCKETS: [f64; 16] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
];

/// The outcome of one dispatch request: the values of [`LABEL_OUTCOME`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Invalid,
    NotHosted,
    Unavailable,
}

impl Outcome {
    /// Every outcome, so each series exists (at 0) from the start.
    pub const ALL: [Outcome; 4] = [
        Outcome::Ok,
        Outcome::Invalid,
        Outcome::NotHosted,
        Outcome::Unavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Invalid => "invalid",
            Outcome::NotHosted => "not_hosted",
            Outcome::Unavailable => "unavailable",
        }
    }
}

/// The metrics of one node and the registry that holds them.
pub struct WorkerMetrics {
    registry: Registry,
    pub dispatch_requests: IntCounterVec,
    pub dispatch_rows: IntCounter,
    pub expert_tokens: IntCounterVec,
    pub compute_seconds: HistogramVec,
    pub device_restarts: IntCounterVec,
    pub expert_bytes: IntGaugeVec,
    pub hosted_experts: IntGaugeVec,
    pub placement_version: IntGauge,
}

impl WorkerMetrics {
    /// Creates the metrics in a fresh registry, with a series for every outcome and for
    /// each of `devices` (all at 0), so dashboards see them before the first request.
    pub fn new(devices: &[String]) -> Result<WorkerMetrics, prometheus::Error> {
        let registry = Registry::new();
        let dispatch_requests = IntCounterVec::new(
            Opts::new(
                DISPATCH_REQUESTS_TOTAL,
                "Dispatch requests answered, by outcome.",
            ),
            &[LABEL_OUTCOME],
        )?;
        let dispatch_rows = IntCounter::with_opts(Opts::new(
            DISPATCH_ROWS_TOTAL,
            "Rows received in valid dispatch requests.",
        ))?;
        let expert_tokens = IntCounterVec::new(
            Opts::new(
                EXPERT_TOKENS_TOTAL,
                "Token-expert slots a device computed, by MoE layer (the load of each layer on each device).",
            ),
            &[LABEL_LAYER, LABEL_DEVICE],
        )?;
        let compute_seconds = HistogramVec::new(
            HistogramOpts::new(
                COMPUTE_SECONDS,
                "Time a device spent computing one request's rows, in seconds.",
            )
            .buckets(COMPUTE_BUCKETS.to_vec()),
            &[LABEL_DEVICE],
        )?;
        let device_restarts = IntCounterVec::new(
            Opts::new(
                DEVICE_RESTARTS_TOTAL,
                "Device actors restarted after a failure.",
            ),
            &[LABEL_DEVICE],
        )?;
        let expert_bytes = IntGaugeVec::new(
            Opts::new(EXPERT_BYTES, "Bytes of expert weights held by a device."),
            &[LABEL_DEVICE],
        )?;
        let hosted_experts = IntGaugeVec::new(
            Opts::new(HOSTED_EXPERTS, "Number of experts held by a device."),
            &[LABEL_DEVICE],
        )?;
        let placement_version = IntGauge::with_opts(Opts::new(
            PLACEMENT_VERSION,
            "Placement version of the last completed expert load.",
        ))?;
        registry.register(Box::new(dispatch_requests.clone()))?;
        registry.register(Box::new(dispatch_rows.clone()))?;
        registry.register(Box::new(expert_tokens.clone()))?;
        registry.register(Box::new(compute_seconds.clone()))?;
        registry.register(Box::new(device_restarts.clone()))?;
        registry.register(Box::new(expert_bytes.clone()))?;
        registry.register(Box::new(hosted_experts.clone()))?;
        registry.register(Box::new(placement_version.clone()))?;
        for o in Outcome::ALL {
            dispatch_requests.with_label_values(&[o.as_str()]);
        }
        for d in devices {
            let d = d.as_str();
            compute_seconds.with_label_values(&[d]);
            device_restarts.with_label_values(&[d]);
            expert_bytes.with_label_values(&[d]);
            hosted_experts.with_label_values(&[d]);
        }
        Ok(WorkerMetrics {
            registry,
            dispatch_requests,
            dispatch_rows,
            expert_tokens,
            compute_seconds,
            device_restarts,
            expert_bytes,
            hosted_experts,
            placement_version,
        })
    }

    /// Registers `moe_build_info` for a worker process serving `model`. Not part of
    /// [`new`](Self::new): a standalone server exports its node's registry next to the
    /// router's, which has its own.
    pub fn set_build_info(&self, model: &str) -> Result<(), prometheus::Error> {
        let info = IntGaugeVec::new(
            Opts::new(
                BUILD_INFO,
                "Always 1: the version and git commit of this binary and the model it serves.",
            ),
            &["version", "git_commit", "model"],
        )?;
        info.with_label_values(&[VERSION, GIT_COMMIT, model]).set(1);
        self.registry.register(Box::new(info))
    }

    /// The registry, for callers that export it together with their own metrics.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Counts one dispatch request.
    pub fn count_dispatch(&self, outcome: Outcome) {
        self.dispatch_requests
            .with_label_values(&[outcome.as_str()])
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode_text(&self) -> Result<String, prometheus::Error> {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        String::from_utf8(buf).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_nodes_have_separate_registries() {
        let a = WorkerMetrics::new(&["cpu:0".into()]).unwrap();
        let b = WorkerMetrics::new(&["cpu:0".into()]).unwrap();
        a.count_dispatch(Outcome::Ok);
        assert_eq!(a.dispatch_requests.with_label_values(&["ok"]).get(), 1);
        assert_eq!(b.dispatch_requests.with_label_values(&["ok"]).get(), 0);
    }

    #[test]
    fn text_exposition_has_every_series() {
        let m = WorkerMetrics::new(&["cpu:0".into(), "cpu:1".into()]).unwrap();
        m.placement_version.set(7);
        let text = m.encode_text().unwrap();
        for name in [
            DISPATCH_REQUESTS_TOTAL,
            DISPATCH_ROWS_TOTAL,
            COMPUTE_SECONDS,
            DEVICE_RESTARTS_TOTAL,
            EXPERT_BYTES,
            HOSTED_EXPERTS,
            PLACEMENT_VERSION,
        ] {
            assert!(text.contains(name), "{name} missing:\n{text}");
        }
        assert!(text.contains("moe_worker_placement_version 7"));
        assert!(text.contains(r#"moe_worker_dispatch_requests_total{outcome="not_hosted"} 0"#));
        assert!(text.contains(r#"moe_worker_hosted_experts{device="cpu:1"} 0"#));
    }
}
