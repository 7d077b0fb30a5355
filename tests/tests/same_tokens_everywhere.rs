//! Where the experts run does not change the numbers: six greedy requests (token-id
//! prompts of 3 to 40 tokens and one text prompt), sent concurrently over gRPC, give the
//! same token ids and the same logprobs (within 1e-5 per token) as offline `moe generate`,
//! whether served by `moe serve` with in-process devices, by `moe router` with two
//! `moe worker` processes, or by a router with three workers split unevenly.

use std::net::SocketAddr;
use std::path::Path;

use moe_proto::v1::FinishReason;
use moe_tests::{
    assert_same_tokens, generate, generate_offline, streamed_tokens, tiny_checkpoint, GreedyReq,
    Proc,
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_with_three_uneven_workers_matches_offline_generate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 11);
    let a = Proc::worker(&model, "cpu:0", &[]);
    let b = Proc::worker(&model, "cpu:0,cpu:1", &[]);
    let c = Proc::worker(&model, "cpu:0", &[]);
    let r = Proc::router(&model, &[&a, &b, &c], &[]);
    check_against_offline("router + 3 uneven workers", &model, r.grpc).await;
}
