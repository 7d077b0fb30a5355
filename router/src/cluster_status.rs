//! The cluster as an operator sees it (`GET /v1/cluster`, `moe cluster status`): the
//! placement in force (which device of which worker hosts which experts), and the load:
//! tokens routed to each expert since start, and each device's share of them.

use std::sync::Arc;

use moe_control::PlacementPlan;
use moe_model::ModelSpec;
use serde_json::{json, Value};

use crate::metrics::RouterMetrics;

/// Reads the placement in force.
pub type PlacementSource = Arc<dyn Fn() -> PlacementPlan + Send + Sync>;

/// The status document.
pub fn status(plan: &PlacementPlan, spec: &ModelSpec, metrics: &RouterMetrics) -> Value {
    let tokens = metrics.expert_token_counts(spec);
    let copies = |k: &(usize, u32)| {
        plan.assignments
            .values()
            .filter(|s| s.contains(k))
            .count()
            .max(1) as u64
    };
    let devices: Vec<Value> = plan
        .assignments
        .iter()
        .map(|(slot, experts)| {
            // Rows of an expert are spread over its copies.
            let load: u64 = experts
                .iter()
                .map(|k| tokens.get(k).copied().unwrap_or(0) / copies(k))
                .sum();
            json!({
                "worker": slot.worker,
                "device": slot.device,
                "capacity_bytes": slot.capacity_bytes,
                "bytes_per_expert": if slot.expert_bytes > 0 { slot.expert_bytes } else { spec.expert_bytes_f32() as u64 },
                "experts": experts.iter().map(|(l, e)| json!([l, e])).collect::<Vec<_>>(),
                "tokens": load,
            })
        })
        .collect();
    let loads: Vec<f64> = devices
        .iter()
        .filter_map(|d| d["tokens"].as_u64())
        .map(|v| v as f64)
        .collect();
    let mean = if loads.is_empty() {
        0.0
    } else {
        loads.iter().sum::<f64>() / loads.len() as f64
    };
    let max = loads.iter().copied().fold(0.0, f64::max);
    let missing: Vec<Value> = tokens
        .keys()
        .filter(|k| plan.hosts(**k).is_empty())
        .map(|(l, e)| json!([l, e]))
        .collect();
    json!({
        "placement_version": plan.version,
        "devices": devices,
        "missing_experts": missing,
        "device_load_max_over_mean": if mean > 0.0 { max / mean } else { 0.0 },
        "experts": tokens.iter().map(|((l, e), n)| json!({"layer": l, "expert": e, "tokens": n, "copies": plan.hosts((*l, *e)).len()})).collect::<Vec<_>>(),
    })
}
