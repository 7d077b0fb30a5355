//! Where the experts run does not change the numbers: six greedy requests (token-id
//! prompts of 3 to 40 tokens and one text prompt), sent concurrently over gRPC, give the
//! same token ids and the same logprobs (within 1e-5 per token) as offline `moe generate`,
//! whether served by `moe serve` with in-process devices, by `moe router` with two
//! `moe worker` processes, or by a router with three workers split unevenly.

use std::net::SocketAddr;
use std::path::Path;

use moe_proto::v1::FinishReason;
use moe_tests::{
    assert_same_tokens, generate, generate_offline, metric_value, metrics, streamed_tokens,
    tiny_checkpoint, GreedyReq, Proc,
};

const MAX_TOKENS: u32 = 12;

fn requests() -> Vec<GreedyReq> {
    let mut reqs: Vec<GreedyReq> = [3usize, 9, 17, 28, 40]
        .iter()
        .enumerate()
        .map(|(r, &len)| {
            let ids = (0..len)
                .map(|j| ((7 + 31 * j + 13 * len + 101 * r) % 509 + 2) as u32)
                .collect();
            GreedyReq::ids(ids, MAX_TOKENS).with_logprobs(2)
        })
        .collect();
    reqs.push(GreedyReq::text("The café opens at nine", MAX_TOKENS).with_logprobs(2));
    reqs
}

/// Sends every request at once to `grpc` and compares each with the offline reference.
async fn check_against_offline(what: &str, model: &Path, grpc: SocketAddr) {
    let reqs = requests();
    let want = generate_offline(model, &reqs);
    let got = futures::future::join_all(reqs.iter().map(|r| generate(grpc, r.to_proto()))).await;
    for (i, (w, g)) in want.iter().zip(got).enumerate() {
        let msgs = g.unwrap_or_else(|s| panic!("{what}: request {i} failed: {s:?}"));
        let last = msgs.last().expect("at least the final message");
        assert_eq!(
            last.finish_reason,
            FinishReason::Length as i32,
            "{what}: request {i}"
        );
        let usage = last.usage.expect("usage on the final message");
        assert_eq!(usage.completion_tokens, MAX_TOKENS, "{what}: request {i}");
        assert_same_tokens(
            &format!("{what}, request {i}"),
            w,
            &streamed_tokens(&msgs),
            1e-5,
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_serve_matches_offline_generate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 11);
    let serve = Proc::serve(&model, &["--devices", "cpu:0,cpu:1"]);
    check_against_offline("moe serve", &model, serve.grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_with_two_workers_matches_offline_generate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 11);
    let a = Proc::worker(&model, "cpu:0,cpu:1", &[]);
    let b = Proc::worker(&model, "cpu:0,cpu:1", &[]);
    let r = Proc::router(&model, &[&a, &b], &[]);
    check_against_offline("router + 2 workers", &model, r.grpc).await;
    let split = metric_value(&metrics(r.http), "moe_split_steps_total").unwrap_or(0.0);
    assert_eq!(split, 0.0, "steps are whole by default (--micro-batches 1)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_with_two_micro_batches_matches_offline_generate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 11);
    let a = Proc::worker(&model, "cpu:0,cpu:1", &[]);
    let b = Proc::worker(&model, "cpu:0,cpu:1", &[]);
    let r = Proc::router(&model, &[&a, &b], &["--micro-batches", "2"]);
    check_against_offline("router + 2 workers, 2 micro-batches", &model, r.grpc).await;
    // Concurrent requests made steps of two micro-batches.
    let split = metric_value(&metrics(r.http), "moe_split_steps_total").unwrap_or(0.0);
    assert!(split > 0.0, "no step was split into micro-batches");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_without_overlap_matches_offline_generate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 11);
    let a = Proc::worker(&model, "cpu:0,cpu:1", &[]);
    let b = Proc::worker(&model, "cpu:0", &[]);
    let r = Proc::router(
        &model,
        &[&a, &b],
        &["--overlap", "false", "--micro-batches", "2"],
    );
    check_against_offline("router + 2 workers, --overlap false", &model, r.grpc).await;
    let split = metric_value(&metrics(r.http), "moe_split_steps_total").unwrap_or(0.0);
    assert_eq!(split, 0.0, "--overlap false split steps");
}

/// bf16 rows on the wire: the requests are served to the end (the tokens may drift from
/// f32's; docs/benchmarks.md measures by how much), with about half the bytes sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_with_bf16_dispatch_serves_with_fewer_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 11);
    let reqs = requests();
    let mut sent = Vec::new();
    for dtype in ["f32", "bf16"] {
        let w = Proc::worker(&model, "cpu:0", &[]);
        // One request at a time: both runs make the same steps.
        let r = Proc::router(&model, &[&w], &["--dispatch-dtype", dtype]);
        for (i, q) in reqs.iter().enumerate() {
            let msgs = generate(r.grpc, q.to_proto())
                .await
                .unwrap_or_else(|s| panic!("{dtype} request {i} failed: {s:?}"));
            assert_eq!(
                streamed_tokens(&msgs).len(),
                MAX_TOKENS as usize,
                "{dtype} request {i}"
            );
        }
        let text = metrics(r.http);
        let bytes: f64 = text
            .lines()
            .filter(|l| {
                l.starts_with("moe_dispatch_bytes_total{") && l.contains("direction=\"sent\"")
            })
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum();
        assert!(bytes > 0.0, "{text}");
        sent.push(bytes);
    }
    assert!(
        sent[1] < 0.75 * sent[0],
        "bf16 sent {} bytes, f32 {}",
        sent[1],
        sent[0]
    );
}
