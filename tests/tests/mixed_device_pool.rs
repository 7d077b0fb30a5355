//! One membership pooling three kinds of expert host: a worker on the CPU kernel in f32,
//! one on candle's CPU device (the code path of a GPU) and one on the CPU kernel with
//! int8 experts. Each registers its devices' kind, precision and bytes per expert in
//! etcd; the placement sizes each device at its own precision; one router serves greedy
//! requests through all three, and every one of them computes.

use std::time::Duration;

use moe_tests::cluster::{cluster_status, etcd_router, member_args, worker_id, Etcd};
use moe_tests::{metric_sum, metrics, tiny_checkpoint, wait_until, GreedyReq, Proc};
use serde_json::Value;

const MAX_TOKENS: u32 = 10;

/// The device record `worker` registered in etcd.
fn registered_device(etcd: &Etcd, cluster: &str, worker: &Proc) -> Value {
    let key = format!("/moe/{cluster}/workers/{}", worker_id(worker));
    let record = etcd
        .history(&key)
        .pop()
        .unwrap_or_else(|| panic!("{key} is not in etcd:\n{}", worker.log()));
    record["devices"][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_candle_and_int8_workers_serve_through_one_router() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 31);
    let etcd = Etcd::start();
    let endpoint = etcd.endpoint();
    let cluster = "mixed";
    let member = member_args(&endpoint, cluster, &["--threads-per-device", "1"]);
    let with = |extra: &[&'static str]| {
        let mut a = member.clone();
        a.extend_from_slice(extra);
        a
    };
    let cpu = Proc::worker(&model, "cpu:0", &member);
    let candle = Proc::worker(&model, "candle-cpu:0", &member);
    let int8 = Proc::worker(&model, "cpu:0", &with(&["--dtype", "int8"]));
    let router = etcd_router(&model, &endpoint, cluster, &["--min-workers", "3"]);

    // What each worker announced.
    let f32_dev = registered_device(&etcd, cluster, &cpu);
    let candle_dev = registered_device(&etcd, cluster, &candle);
    let int8_dev = registered_device(&etcd, cluster, &int8);
    assert_eq!(f32_dev["kind"], "cpu", "{f32_dev}");
    assert_eq!(f32_dev["dtype"], "f32", "{f32_dev}");
    assert_eq!(candle_dev["kind"], "candle-cpu", "{candle_dev}");
    assert_eq!(candle_dev["dtype"], "f32", "{candle_dev}");
    assert_eq!(int8_dev["kind"], "cpu", "{int8_dev}");
    assert_eq!(int8_dev["dtype"], "int8", "{int8_dev}");
    let f32_bytes = f32_dev["expert_bytes"].as_u64().expect("expert_bytes");
    let int8_bytes = int8_dev["expert_bytes"].as_u64().expect("expert_bytes");
    assert_eq!(candle_dev["expert_bytes"].as_u64(), Some(f32_bytes));
    // Int8 blocks: one byte per weight plus a two-byte scale per 32, rows padded.
    assert!(
        int8_bytes * 3 < f32_bytes && int8_bytes * 4 > f32_bytes,
        "int8 {int8_bytes} vs f32 {f32_bytes} bytes per expert"
    );

    // The placement uses all three, and says how big an expert is on each.
    assert!(
        wait_until(Duration::from_secs(30), || {
            let s = cluster_status(&router);
            s["devices"].as_array().is_some_and(|d| {
                d.iter()
                    .filter(|d| d["experts"].as_array().is_some_and(|e| !e.is_empty()))
                    .count()
                    == 3
            })
        }),
        "the placement does not use all three workers: {}\n{}",
        cluster_status(&router),
        router.log()
    );
    let status = cluster_status(&router);
    let int8_id = worker_id(&int8);
    let on_int8 = status["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["worker"] == int8_id.as_str()))
        .unwrap_or_else(|| panic!("no device of {int8_id} in {status}"));
    assert_eq!(
        on_int8["bytes_per_expert"].as_u64(),
        Some(int8_bytes),
        "{status}"
    );

    let reqs: Vec<GreedyReq> = (0..4u32)
        .map(|r| {
            let ids = (0..6 + 5 * r)
                .map(|j| (7 + 13 * j + 31 * r) % 500 + 3)
                .collect();
            GreedyReq::ids(ids, MAX_TOKENS)
        })
        .collect();
    let got = futures::future::join_all(
        reqs.iter()
            .map(|q| moe_tests::generate(router.grpc, q.to_proto())),
    )
    .await;
    for (i, g) in got.into_iter().enumerate() {
        let msgs = g.unwrap_or_else(|s| panic!("request {i} failed: {s:?}\n{}", router.log()));
        assert_eq!(
            moe_tests::streamed_tokens(&msgs).len(),
            MAX_TOKENS as usize,
            "request {i}"
        );
    }
    for (what, w) in [("cpu", &cpu), ("candle-cpu", &candle), ("int8", &int8)] {
        let served = metric_sum(&metrics(w.http), "moe_worker_expert_tokens_total");
        assert!(
            served > 0.0,
            "the {what} worker computed nothing:\n{}",
            w.log()
        );
    }
}
