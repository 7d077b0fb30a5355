//! Failure rule 2: with one copy of each expert (`--expert-replicas 1`) and workers
//! discovered through etcd, a worker killed with SIGKILL while greedy requests are
//! streaming costs a bounded stall, not a request: its lease expires, the router
//! re-places its experts on the survivor (placement version 2), and every request
//! completes with the same tokens as offline `moe generate`.

use std::time::{Duration, Instant};

use moe_tests::cluster::{
    assert_streams_match, etcd_router, member_args, varied_reqs, Etcd, Streams,
};
use moe_tests::{generate_offline, metric_sum, metric_value, metrics, tiny_checkpoint, Proc};

const MAX_TOKENS: u32 = 300;
/// Lease TTL of the workers: the membership notices the death within about this.
const TTL_SECS: &str = "2";
const CLUSTER: &str = "t4";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_experts_are_replaced_and_no_request_is_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 93);
    let reqs = varied_reqs(4, 2, MAX_TOKENS);
    let want = generate_offline(&model, &reqs);

    let etcd = Etcd::start();
    let endpoint = etcd.endpoint();
    let member = member_args(&endpoint, CLUSTER, &["--lease-ttl-secs", TTL_SECS]);
    let workers: Vec<Proc> = (0..2)
        .map(|_| Proc::worker(&model, "cpu:0", &member))
        .collect();
    let router = etcd_router(
        &model,
        &endpoint,
        CLUSTER,
        &["--min-workers", "2", "--expert-replicas", "1"],
    );
    let text = metrics(router.http);
    assert_eq!(
        metric_value(&text, "moe_placement_version"),
        Some(1.0),
        "{text}"
    );

    let mut streams = Streams::start(router.grpc, &reqs, Duration::from_secs(120));
    streams.wait_all_started().await;
    let killed_at = Instant::now();
    workers[0].signal("KILL");
    let got = streams.finish().await;
    let stall = killed_at.elapsed();

    assert_streams_match("after the kill", &want, got, MAX_TOKENS);
    // The stall is bounded by the product, not by this test's clock: a dispatch that
    // found no copy within deadline × (retries + 1) would have failed the requests above.

    let text = metrics(router.http);
    let version = metric_value(&text, "moe_placement_version").unwrap_or(0.0);
    assert!(version >= 2.0, "the placement was not replaced:\n{text}");
    assert!(
        metric_sum(&text, "moe_dispatch_retries_total") > 0.0,
        "no dispatch was retried (did the kill land mid-stream?):\n{text}"
    );
    eprintln!("requests finished {stall:?} after the kill; placement version {version}");
    drop(router);
    drop(workers);
    drop(etcd);
}
