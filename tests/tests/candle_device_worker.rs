//! A worker whose experts run on candle (its CPU device, `candle-cpu:0`: the code path
//! of a GPU) serves the same greedy tokens as the CPU kernel: a router with two workers,
//! one on `cpu:0` and one on `candle-cpu:0`, each holding about half of the experts,
//! answers six concurrent greedy requests with the token ids (and logprobs within 1e-5)
//! of offline `moe generate`. The worker also reports the candle device by name.

use moe_proto::v1::FinishReason;
use moe_tests::{
    assert_same_tokens, generate, generate_offline, metrics, streamed_tokens, tiny_checkpoint,
    GreedyReq, Proc,
};

const MAX_TOKENS: u32 = 12;

fn requests() -> Vec<GreedyReq> {
    let mut reqs: Vec<GreedyReq> = [2usize, 8, 15, 27, 39]
        .iter()
        .enumerate()
        .map(|(r, &len)| {
            let ids = (0..len)
                .map(|j| ((11 + 29 * j + 17 * len + 97 * r) % 509 + 2) as u32)
                .collect();
            GreedyReq::ids(ids, MAX_TOKENS).with_logprobs(2)
        })
        .collect();
    reqs.push(GreedyReq::text("Experts on another device", MAX_TOKENS).with_logprobs(2));
    reqs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_kernel_and_candle_workers_serve_offline_tokens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 23);
    let cpu = Proc::worker(&model, "cpu:0", &[]);
    let candle = Proc::worker(&model, "candle-cpu:0", &[]);
    let r = Proc::router(&model, &[&cpu, &candle], &[]);

    let reqs = requests();
    let want = generate_offline(&model, &reqs);
    let got = futures::future::join_all(reqs.iter().map(|q| generate(r.grpc, q.to_proto()))).await;
    for (i, (w, g)) in want.iter().zip(got).enumerate() {
        let msgs = g.unwrap_or_else(|s| panic!("request {i} failed: {s:?}"));
        let last = msgs.last().expect("at least the final message");
        assert_eq!(
            last.finish_reason,
            FinishReason::Length as i32,
            "request {i}"
        );
        assert_same_tokens(
            &format!("cpu + candle workers, request {i}"),
            w,
            &streamed_tokens(&msgs),
            1e-5,
        );
    }

    // The candle worker really computed: its device hosts experts and served tokens.
    let text = metrics(candle.http);
    let hosted = text
        .lines()
        .find(|l| l.starts_with("moe_worker_hosted_experts{") && l.contains("candle-cpu:0"))
        .unwrap_or_else(|| panic!("no hosted-experts gauge for candle-cpu:0:\n{text}"));
    let n: f64 = hosted
        .rsplit_once(' ')
        .and_then(|(_, v)| v.parse().ok())
        .expect("a number");
    assert!(n > 0.0, "{hosted}");
    let served: f64 = text
        .lines()
        .filter(|l| l.starts_with("moe_worker_expert_tokens_total{") && l.contains("candle-cpu:0"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    assert!(served > 0.0, "the candle device computed nothing:\n{text}");
}
