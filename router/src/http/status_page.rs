//! The live status page: `GET /` serves one self-contained HTML document
//! (`router/assets/status.html`, embedded with `include_str!`: no external asset, so it
//! works in a cluster with no way out) that polls `GET /v1/cluster` and `GET /v1/status`
//! every 1.5 s and draws workers, routers, the placement grid, the expert-load heatmap
//! and throughput/latency sparklines.
//!
//! `GET /v1/status` is the page's small, cheap document: the router's cumulative
//! counters as they stand (requests by outcome, tokens, latency sums and counts) and its
//! gauges (running, waiting, KV usage, readiness), stamped with the router's clock so
//! that the page turns two samples into rates. It reads the same [`RouterMetrics`]
//! values `/metrics` exposes (the values themselves, not their text).
//! Like `/metrics` and `/v1/cluster`, both routes are outside the API-key layer: they
//! carry no request content.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use moe_model::ModelSpec;
use prometheus::core::Collector;
use prometheus::Histogram;
use serde_json::{json, Map, Value};

use super::HttpState;
use crate::metrics::RouterMetrics;

/// The page: HTML, CSS and JavaScript in one file.
pub const PAGE: &str = include_str!("../../assets/status.html");

/// What the page may load: itself, and JSON from this origin. Nothing else, so a page
/// that grows an external asset by mistake breaks visibly instead of phoning out.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// `GET /`: the status page.
pub async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        PAGE,
    )
        .into_response()
}

/// `GET /v1/status`: the counters and gauges the page turns into rates.
pub async fn status(State(s): State<HttpState>) -> Json<Value> {
    let not_ready = if s.serving.load(Ordering::Acquire) {
        s.readiness.reason()
    } else {
        Some("shutting down".to_owned())
    };
    let name = s
        .api
        .served_model_names
        .first()
        .cloned()
        .unwrap_or_default();
    Json(snapshot(
        &s.api.metrics,
        &s.api.spec,
        &name,
        not_ready,
        unix_millis(),
    ))
}

/// The `/v1/status` document: `not_ready` is why the router cannot serve (`None`: it
/// can), `unix_ms` the router's clock when the values were read.
pub fn snapshot(
    metrics: &RouterMetrics,
    spec: &ModelSpec,
    model_name: &str,
    not_ready: Option<String>,
    unix_ms: u64,
) -> Value {
    let by_outcome = requests_by_outcome(metrics);
    let total: u64 = by_outcome.values().filter_map(Value::as_u64).sum();
    json!({
        "model": {
            "name": model_name,
            "arch": spec.arch.model_type(),
            "moe_layers": spec.moe_layers().collect::<Vec<_>>(),
            "num_experts": spec.moe.num_experts,
            "top_k": spec.moe.top_k,
        },
        "ready": not_ready.is_none(),
        "not_ready_reason": not_ready,
        "unix_ms": unix_ms,
        "requests": by_outcome,
        "requests_total": total,
        "prompt_tokens": metrics.prompt_tokens.get(),
        "generated_tokens": metrics.generation_tokens.get(),
        "ttft_seconds": sum_count(&metrics.ttft),
        "itl_seconds": sum_count(&metrics.itl),
        "e2e_seconds": sum_count(&metrics.e2e),
        "running": metrics.running.get(),
        "waiting": metrics.waiting.get(),
        "kv_usage": metrics.kv_usage.get(),
        "placement_version": metrics.placement_version.get(),
    })
}

/// Finished requests per outcome label, for the outcomes seen so far (reading the
/// series that exist, so that this endpoint never creates a zero series in `/metrics`).
fn requests_by_outcome(metrics: &RouterMetrics) -> Map<String, Value> {
    let mut out = Map::new();
    for family in metrics.requests.collect() {
        for m in family.get_metric() {
            let outcome = m
                .get_label()
                .iter()
                .find(|l| l.name() == "outcome")
                .map(|l| l.value().to_owned())
                .unwrap_or_default();
            // Counters of whole requests: exact in an f64 far beyond any real count.
            out.insert(outcome, json!(m.get_counter().get_value() as u64));
        }
    }
    out
}

fn sum_count(h: &Histogram) -> Value {
    json!({"sum": h.get_sample_sum(), "count": h.get_sample_count()})
}

fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ModelSpec {
        let cfg = json!({
            "architectures": ["DeepseekV3ForCausalLM"],
            "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
            "moe_intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
            "max_position_embeddings": 1024, "n_routed_experts": 8, "n_shared_experts": 1,
            "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2, "first_k_dense_replace": 1,
            "kv_lora_rank": 32, "q_lora_rank": 48, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
            "v_head_dim": 16, "scoring_func": "sigmoid", "routed_scaling_factor": 2.5
        });
        ModelSpec::from_json(&cfg.to_string()).expect("tiny DeepSeek-V3 config")
    }

    #[test]
    fn snapshot_reads_the_counters_as_they_stand() {
        let m = RouterMetrics::new();
        m.requests.with_label_values(&["ok"]).inc_by(3);
        m.requests.with_label_values(&["overloaded"]).inc();
        m.generation_tokens.inc_by(42);
        m.prompt_tokens.inc_by(7);
        m.ttft.observe(0.25);
        m.ttft.observe(0.75);
        m.running.set(2);
        m.waiting.set(5);
        m.kv_usage.set(0.5);
        let v = snapshot(&m, &spec(), "tiny", None, 1234);
        assert_eq!(v["requests"], json!({"ok": 3, "overloaded": 1}));
        assert_eq!(v["requests_total"], 4);
        assert_eq!(v["generated_tokens"], 42);
        assert_eq!(v["prompt_tokens"], 7);
        assert_eq!(v["ttft_seconds"], json!({"sum": 1.0, "count": 2}));
        assert_eq!(v["e2e_seconds"], json!({"sum": 0.0, "count": 0}));
        assert_eq!(
            (v["running"].clone(), v["waiting"].clone()),
            (json!(2), json!(5))
        );
        assert_eq!(v["kv_usage"], 0.5);
        assert_eq!(v["ready"], true);
        assert_eq!(v["not_ready_reason"], Value::Null);
        assert_eq!(v["unix_ms"], 1234);
        assert_eq!(
            v["model"],
            json!({"name": "tiny", "arch": "deepseek_v3", "moe_layers": [1, 2], "num_experts": 8, "top_k": 2})
        );
    }

    #[test]
    fn snapshot_creates_no_series_and_reports_why_not_ready() {
        let m = RouterMetrics::new();
        let v = snapshot(&m, &spec(), "tiny", Some("starting".into()), 0);
        assert_eq!(v["requests"], json!({}));
        assert_eq!(v["requests_total"], 0);
        assert_eq!(v["ready"], false);
        assert_eq!(v["not_ready_reason"], "starting");
        assert!(
            !m.render(&[]).contains("moe_requests_total{"),
            "reading the counters must not create series"
        );
    }

    #[test]
    fn the_page_is_self_contained() {
        // No asset from anywhere: no URL with a scheme or protocol-relative, no src/href.
        for banned in ["http://", "https://", "src=", "href=", "@import", "url("] {
            assert!(!PAGE.contains(banned), "status.html contains {banned:?}");
        }
        // It polls exactly the two documents it is built on.
        assert!(PAGE.contains("\"/v1/status\"") && PAGE.contains("\"/v1/cluster\""));
        assert!(PAGE.trim_start().starts_with("<!doctype html>"));
        assert!(PAGE.trim_end().ends_with("</html>"));
    }

    #[test]
    fn the_grids_are_canvases_the_tests_can_read() {
        // Large grids (58 × 256 experts) must be drawn, not built from DOM nodes.
        for id in ["heatmap", "placement", "s-tok", "s-req", "s-ttft"] {
            assert!(
                PAGE.contains(&format!("<canvas id=\"{id}\"></canvas>")),
                "no canvas {id}"
            );
        }
        for hook in ["heatmapCells", "dataset.state", "window.MoeStatus"] {
            assert!(PAGE.contains(hook), "the page lost the test hook {hook}");
        }
    }

    #[tokio::test]
    async fn the_page_is_served_as_html_under_a_strict_policy() {
        let r = page().await;
        let h = r.headers();
        assert_eq!(h[header::CONTENT_TYPE], "text/html; charset=utf-8");
        let csp = h[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .expect("ascii policy");
        assert!(csp.starts_with("default-src 'none'") && csp.contains("connect-src 'self'"));
    }
}
