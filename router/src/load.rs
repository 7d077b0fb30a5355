//! Routed-token counts per expert: plain atomic counters the engine's MoE layers add to,
//! read by the controller's load reports (load-aware placement), `/v1/cluster`, the
//! per-layer imbalance gauge, and, with `--metrics-expert-detail`, a Prometheus
//! collector. Metrics are outputs: nothing reads program state back out of Prometheus.
//!
//! By default `/metrics` carries no per-expert series (DeepSeek-V3 has 58 × 256 experts):
//! the load per (layer, device) comes from the workers (`moe_worker_expert_tokens_total`)
//! and the spread per layer from `moe_layer_load_imbalance`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use moe_control::PlacementPlan;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounterVec, Opts};

/// `(layer, expert)`.
pub type ExpertKey = (usize, u32);

/// Tokens routed to each expert since start.
#[derive(Default)]
pub struct ExpertLoad {
    counts: RwLock<BTreeMap<ExpertKey, AtomicU64>>,
}

impl ExpertLoad {
    /// Adds `n` tokens routed to `expert` of `layer`.
    pub fn add(&self, layer: usize, expert: u32, n: u64) {
        let key = (layer, expert);
        {
            let counts = self.counts.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(c) = counts.get(&key) {
                c.fetch_add(n, Ordering::Relaxed);
                return;
            }
        }
        // First token of this expert: once per expert for the life of the process.
        self.counts
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_default()
            .fetch_add(n, Ordering::Relaxed);
    }

    /// The counts of every expert of `spec` (0 for experts no token reached yet).
    pub fn counts(&self, spec: &moe_model::ModelSpec) -> BTreeMap<ExpertKey, u64> {
        let seen = self.counts.read().unwrap_or_else(PoisonError::into_inner);
        let mut out = BTreeMap::new();
        for layer in spec.moe_layers() {
            for e in 0..spec.moe.num_experts as u32 {
                let n = seen
                    .get(&(layer, e))
                    .map_or(0, |c| c.load(Ordering::Relaxed));
                out.insert((layer, e), n);
            }
        }
        out
    }

    /// The counts of every expert a token reached so far.
    pub fn snapshot(&self) -> BTreeMap<ExpertKey, u64> {
        self.seen().into_iter().collect()
    }

    fn seen(&self) -> Vec<(ExpertKey, u64)> {
        let seen = self.counts.read().unwrap_or_else(PoisonError::into_inner);
        seen.iter()
            .map(|(k, c)| (*k, c.load(Ordering::Relaxed)))
            .collect()
    }
}

/// Max over mean of the devices' load per MoE layer, `tokens` being what each expert got
/// over a window; an expert's tokens are split evenly over its copies. 1 is perfectly
/// even; layers with no token are left out.
pub fn layer_imbalance(
    tokens: &BTreeMap<ExpertKey, u64>,
    plan: &PlacementPlan,
) -> BTreeMap<usize, f64> {
    let mut per_layer: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let layers: std::collections::BTreeSet<usize> = tokens.keys().map(|k| k.0).collect();
    for layer in layers {
        let loads: Vec<f64> = plan
            .assignments
            .values()
            .map(|experts| {
                experts
                    .iter()
                    .filter(|k| k.0 == layer)
                    .map(|k| {
                        let copies = plan.hosts(*k).len().max(1) as f64;
                        tokens.get(k).copied().unwrap_or(0) as f64 / copies
                    })
                    .sum()
            })
            .collect();
        per_layer.insert(layer, loads);
    }
    per_layer
        .into_iter()
        .filter_map(|(layer, loads)| {
            let mean = loads.iter().sum::<f64>() / loads.len().max(1) as f64;
            let max = loads.iter().copied().fold(0.0, f64::max);
            (mean > 0.0).then(|| (layer, max / mean))
        })
        .collect()
}

/// `moe_expert_tokens_total{layer,expert}` read from an [`ExpertLoad`] at scrape time
/// (registered only with `--metrics-expert-detail`).
pub struct ExpertLoadCollector {
    load: Arc<ExpertLoad>,
    shape: IntCounterVec,
}

fn opts() -> Opts {
    Opts::new(
        crate::metrics::EXPERT_TOKENS,
        "Tokens routed to each expert (per-expert load; with --metrics-expert-detail).",
    )
}

impl ExpertLoadCollector {
    pub fn new(load: Arc<ExpertLoad>) -> Result<Self, prometheus::Error> {
        Ok(Self {
            load,
            shape: IntCounterVec::new(opts(), &["layer", "expert"])?,
        })
    }
}

impl Collector for ExpertLoadCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.shape.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Ok(v) = IntCounterVec::new(opts(), &["layer", "expert"]) else {
            return Vec::new();
        };
        for ((layer, expert), n) in self.load.seen() {
            v.with_label_values(&[layer.to_string().as_str(), expert.to_string().as_str()])
                .inc_by(n);
        }
        v.collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_control::DeviceSlot;

    fn slot(d: &str) -> DeviceSlot {
        DeviceSlot {
            worker: "w".into(),
            device: d.into(),
            capacity_bytes: 0,
            expert_bytes: 0,
        }
    }

    #[test]
    fn counts_add_up_and_imbalance_is_max_over_mean() {
        let load = ExpertLoad::default();
        load.add(1, 0, 3);
        load.add(1, 0, 1);
        load.add(1, 1, 4);
        let seen: BTreeMap<_, _> = load.seen().into_iter().collect();
        assert_eq!(seen[&(1, 0)], 4);
        let mut plan = PlacementPlan::default();
        plan.assignments.insert(slot("a"), [(1, 0)].into());
        plan.assignments.insert(slot("b"), [(1, 1)].into());
        // 4 and 4: even.
        assert_eq!(layer_imbalance(&seen, &plan)[&1], 1.0);
        load.add(1, 1, 8);
        let seen: BTreeMap<_, _> = load.seen().into_iter().collect();
        // 4 and 12: max 12 over mean 8.
        assert_eq!(layer_imbalance(&seen, &plan)[&1], 1.5);
        // No tokens: no value.
        assert!(layer_imbalance(&BTreeMap::new(), &plan).is_empty());
    }

    #[test]
    fn the_collector_exports_what_was_counted() {
        let load = Arc::new(ExpertLoad::default());
        load.add(2, 7, 5);
        let c = ExpertLoadCollector::new(load).unwrap();
        let fams = c.collect();
        assert_eq!(fams.len(), 1);
        assert_eq!(fams[0].get_metric()[0].get_counter().get_value(), 5.0);
    }
}
