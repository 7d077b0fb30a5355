//! A device actor that panics mid-request is invisible to clients: with a worker whose
//! actor panics on its 5th compute (`--test-panic-at-compute 5`), greedy requests through
//! `moe router` still complete with the same tokens and logprobs as offline
//! `moe generate`; the router counts a dispatch retry and the worker a device restart.

use moe_proto::v1::FinishReason;
use moe_tests::{
    assert_same_tokens, generate, generate_offline, metric_sum, metrics, streamed_tokens,
    tiny_checkpoint, GreedyReq, Proc,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_device_actor_is_restarted_and_requests_get_the_right_tokens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 71);
    let reqs = [
        GreedyReq::ids(vec![11, 12, 13, 14, 15], 10).with_logprobs(2),
        GreedyReq::text("Panics are not the end", 10).with_logprobs(2),
        GreedyReq::ids((40..62).collect(), 10).with_logprobs(2),
    ];
    let want = generate_offline(&model, &reqs);

    let worker = Proc::worker(&model, "cpu:0,cpu:1", &["--test-panic-at-compute", "5"]);
    let router = Proc::router(&model, &[&worker], &[]);
    let got =
        futures::future::join_all(reqs.iter().map(|r| generate(router.grpc, r.to_proto()))).await;
    for (i, (w, g)) in want.iter().zip(got).enumerate() {
        let msgs = g.unwrap_or_else(|s| panic!("request {i} failed: {s:?}"));
        let last = msgs.last().expect("a final message");
        assert_eq!(
            last.finish_reason,
            FinishReason::Length as i32,
            "request {i}"
        );
        assert_same_tokens(&format!("request {i}"), w, &streamed_tokens(&msgs), 1e-5);
    }

    let text = metrics(worker.http);
    assert!(
        metric_sum(&text, "moe_worker_device_restarts_total") > 0.0,
        "the worker restarted no device:\n{text}"
    );
    let text = metrics(router.http);
    assert!(
        metric_sum(&text, "moe_dispatch_retries_total") > 0.0,
        "the router retried no dispatch:\n{text}"
    );
}
