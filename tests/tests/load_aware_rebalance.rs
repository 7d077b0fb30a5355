//! Load-aware replication (DeepSeek's EPLB idea): under a skewed workload, the
//! controller reads the per-expert token counts the routers report to etcd and, every
//! `--rebalance-interval-secs`, gives the hottest experts extra copies; routers spread
//! an expert's rows over its copies. The device load's max/mean, computed from the same
//! observed counts over the placement before and after, must drop; tokens stay
//! identical to the offline run.
//!
//! `cargo nextest run -p moe-tests --test load_aware_rebalance --no-capture` prints the
//! numbers (docs/benchmarks.md quotes them).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moe_tests::cluster::{
    assert_streams_match, cluster_status, etcd_router, keep_streaming, member_args,
    placement_version, Etcd, Streams,
};
use moe_tests::{generate_offline, tiny_checkpoint, wait_until, GreedyReq, Proc};
use serde_json::Value;

const MAX_TOKENS: u32 = 48;
const CLUSTER: &str = "eplb";

type Expert = (u64, u64);

/// Device → experts, from a `/v1/cluster` document.
fn placement(v: &Value) -> BTreeMap<String, BTreeSet<Expert>> {
    v["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| {
            let name = format!("{}/{}", d["worker"].as_str().unwrap_or("?"), d["device"]);
            let experts = d["experts"]
                .as_array()
                .expect("experts")
                .iter()
                .map(|e| {
                    (
                        e[0].as_u64().expect("layer"),
                        e[1].as_u64().expect("expert"),
                    )
                })
                .collect();
            (name, experts)
        })
        .collect()
}

/// Max over mean of the devices' load: each expert's tokens split evenly over its copies.
fn max_over_mean(p: &BTreeMap<String, BTreeSet<Expert>>, tokens: &BTreeMap<Expert, f64>) -> f64 {
    let copies = |e: &Expert| p.values().filter(|s| s.contains(e)).count().max(1) as f64;
    let loads: Vec<f64> = p
        .values()
        .map(|s| {
            s.iter()
                .map(|e| tokens.get(e).copied().unwrap_or(0.0) / copies(e))
                .sum()
        })
        .collect();
    let mean = loads.iter().sum::<f64>() / loads.len() as f64;
    loads.iter().copied().fold(0.0, f64::max) / mean
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_experts_get_copies_and_device_load_evens_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 47);
    // Skewed: the same few tokens over and over send most rows to the same experts.
    let reqs: Vec<GreedyReq> = (0..8u32)
        .map(|r| GreedyReq::ids(vec![7 + (r % 2); 24], MAX_TOKENS).with_logprobs(1))
        .collect();
    let want = generate_offline(&model, &reqs);

    let etcd = Etcd::start();
    let endpoint = etcd.endpoint();
    let member = member_args(&endpoint, CLUSTER, &[]);
    let workers: Vec<Proc> = (0..2)
        .map(|_| Proc::worker(&model, "cpu:0,cpu:1", &member))
        .collect();
    let router = etcd_router(
        &model,
        &endpoint,
        CLUSTER,
        &[
            "--min-workers",
            "2",
            "--rebalance-interval-secs",
            "1",
            "--hot-copies",
            "8",
        ],
    );
    let before = placement(&cluster_status(&router));
    assert_eq!(before.len(), 4, "expected 4 devices: {before:?}");
    assert!(
        before.values().flatten().count()
            == before.values().flatten().collect::<BTreeSet<_>>().len(),
        "one copy per expert at first"
    );

    // The skewed workload runs until the controller has re-planned from the counts the
    // router reports (each report covers the last two intervals).
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let load = keep_streaming(
        router.grpc,
        &reqs,
        Duration::from_secs(120),
        stop.clone(),
        done.clone(),
    );
    let rebalanced = wait_until(Duration::from_secs(60), || {
        placement_version(&router) >= 2.0
    });
    stop.store(true, Ordering::SeqCst);
    let batches = load.await.expect("load task");
    assert!(rebalanced, "no rebalance happened:\n{}", router.describe());
    for (i, got) in batches.into_iter().enumerate() {
        assert_streams_match(&format!("skewed batch {i}"), &want, got, MAX_TOKENS);
    }
    let now = cluster_status(&router);
    let after = placement(&now);
    let tokens: BTreeMap<Expert, f64> = now["experts"]
        .as_array()
        .expect("experts")
        .iter()
        .map(|e| {
            (
                (
                    e["layer"].as_u64().expect("layer"),
                    e["expert"].as_u64().expect("expert"),
                ),
                e["tokens"].as_u64().unwrap_or(0) as f64,
            )
        })
        .collect();
    let (b, a) = (
        max_over_mean(&before, &tokens),
        max_over_mean(&after, &tokens),
    );
    let extra = after.values().map(BTreeSet::len).sum::<usize>()
        - before.values().map(BTreeSet::len).sum::<usize>();
    eprintln!(
        "skewed workload: device load max/mean {b:.3} with one copy each, {a:.3} after the \
         rebalance ({extra} extra copies)"
    );
    assert!(extra > 0, "no extra copies: {after:?}");
    assert!(a < b, "max/mean did not drop: {b:.3} → {a:.3}");

    // Rows now spread over copies; tokens are still identical.
    let got = Streams::start(router.grpc, &reqs, Duration::from_secs(120))
        .finish()
        .await;
    assert_streams_match("after the rebalance", &want, got, MAX_TOKENS);
    drop((router, workers, etcd));
}
