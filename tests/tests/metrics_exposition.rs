//! The `/metrics` pages of `moe serve`, `moe router` and `moe worker` are valid
//! Prometheus text that `promtool check metrics` accepts (syntax and naming lint), and,
//! after traffic, carry the serving metrics dashboards rely on: time to first token,
//! per-(layer, device) load, dispatch latency and bytes, step sizes and kinds, finish
//! reasons, build info, KV cache usage and worker compute time; per-expert series only
//! with `--metrics-expert-detail`.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use moe_tests::{generate, metric_sum, metrics, tiny_checkpoint, GreedyReq, Proc};

/// Runs `promtool check metrics` on `text`; panics with its output unless it exits 0.
fn promtool_check(what: &str, text: &str) {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => panic!(
            "cannot run `promtool` ({e}): install it (Debian package `prometheus`: \
             `apt-get install -y prometheus`; scripts/test.sh installs it)"
        ),
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool output");
    assert!(
        out.status.success(),
        "promtool check metrics rejects the {what} page ({}):\n{}{}\n--- page ---\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn traffic(grpc: SocketAddr) {
    let reqs = [
        GreedyReq::ids(vec![3, 4, 5, 6], 6).with_logprobs(2),
        GreedyReq::text("Metrics, please", 6),
        GreedyReq::ids((10..40).collect(), 3),
    ];
    for r in futures::future::join_all(reqs.iter().map(|r| generate(grpc, r.to_proto()))).await {
        r.expect("request served");
    }
}

/// Every name in `names` appears, with a sample > 0 where `nonzero` says so.
fn assert_has(what: &str, text: &str, names: &[&str], nonzero: &[&str]) {
    for n in names {
        assert!(text.contains(n), "{what}: {n} missing:\n{text}");
    }
    for n in nonzero {
        assert!(
            metric_sum(text, n) > 0.0,
            "{what}: {n} is 0 after traffic:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_metrics_pass_promtool() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 41);
    let serve = Proc::serve(&model, &[]);
    traffic(serve.grpc).await;
    let text = metrics(serve.http);
    promtool_check("moe serve", &text);
    assert_has(
        "moe serve",
        &text,
        &[
            "moe_time_to_first_token_seconds",
            "moe_dispatch_seconds",
            "moe_kv_cache_usage_ratio",
            "moe_worker_compute_seconds",
            "moe_experts_without_live_copy",
            "moe_expert_copies_min",
            "moe_engine_step_seconds_bucket{kind=\"prefill\"",
            "moe_engine_step_seconds_bucket{kind=\"decode\"",
        ],
        &[
            "moe_time_to_first_token_seconds_count",
            "moe_dispatch_seconds_count",
            "moe_worker_compute_seconds_count",
            "moe_worker_expert_tokens_total",
            "moe_requests_finished_total{reason=\"length\"}",
            "moe_engine_step_tokens_count",
            "moe_engine_step_sequences_sum",
            "moe_build_info",
            "moe_max_num_requests_waiting",
        ],
    );
    // Bounded cardinality: no per-expert series without --metrics-expert-detail.
    assert!(
        !text.contains("moe_expert_tokens_total") && !text.contains("moe_expert_copies{"),
        "per-expert series exported by default:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_and_worker_metrics_pass_promtool() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 41);
    let worker = Proc::worker(&model, "cpu:0,cpu:1", &[]);
    let router = Proc::router(&model, &[&worker], &["--metrics-expert-detail"]);
    traffic(router.grpc).await;

    let text = metrics(router.http);
    promtool_check("moe router", &text);
    assert_has(
        "moe router",
        &text,
        &[
            "moe_time_to_first_token_seconds",
            "moe_expert_tokens_total",
            "moe_dispatch_seconds",
            "moe_kv_cache_usage_ratio",
        ],
        &[
            "moe_time_to_first_token_seconds_count",
            "moe_expert_tokens_total",
            "moe_dispatch_seconds_count",
            "moe_dispatch_requests_total",
            "moe_dispatch_bytes_total{direction=\"sent\"",
            "moe_dispatch_bytes_total{direction=\"received\"",
            "moe_expert_copies{",
            "moe_expert_copies_min",
        ],
    );

    let text = metrics(worker.http);
    promtool_check("moe worker", &text);
    assert_has(
        "moe worker",
        &text,
        &[
            "moe_worker_compute_seconds",
            "moe_worker_dispatch_requests_total",
        ],
        &[
            "moe_worker_compute_seconds_count",
            "moe_worker_dispatch_requests_total",
            "moe_worker_expert_tokens_total",
        ],
    );
}
