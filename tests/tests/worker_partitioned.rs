//! Failure rule: a worker cut off by the network. One worker runs in a network namespace
//! of this test's own, behind a veth pair (198.18.0.0/15, the range reserved for network
//! tests); the other worker, the router and etcd run on the host. With one copy of each
//! expert and workers discovered through etcd, the link is taken down while greedy
//! requests are streaming: the worker falls silent without closing a socket. The router's
//! dispatch deadline marks it down before its lease expires; when the lease expires the
//! router re-places its experts on the survivor, and every in-flight request completes
//! with the same tokens as offline `moe generate`. Then the link heals: the worker
//! registers again in etcd (a fresh lease), the router places experts on it again, and
//! it serves a second batch that again matches the offline run.
//!
//! Needs root and iproute2 (`ip netns`); without them the test fails and says so.

use std::time::Duration;

use moe_tests::cluster::{
    assert_streams_match, cluster_status, etcd_router, hosted_by, member_args, varied_reqs, Etcd,
    Streams,
};
use moe_tests::netns::Netns;
use moe_tests::{
    generate_offline, metric_sum, metric_value, metrics, path_str, tiny_checkpoint, wait_until,
    Proc,
};
use serde_json::{json, Value};

const MAX_TOKENS: u32 = 400;
/// Lease TTL of the workers: the membership drops the cut worker about this long after
/// its last keep-alive.
const TTL_SECS: &str = "2";
const CLUSTER: &str = "partition";
/// How long the membership may take to notice a departure or a return, and the router
/// to re-place experts: generous, as a bound on the wait, not a claim about speed.
const SETTLE: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_worker_is_routed_around_and_rejoins_when_the_link_heals() {
    // First made, last dropped: every process in it is stopped before it goes.
    let netns = Netns::create("part");
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 71);
    let reqs = varied_reqs(4, 4, MAX_TOKENS);
    let want = generate_offline(&model, &reqs);

    // etcd answers on 127.0.0.1 for the host and on the host's end of the pair for the
    // namespace.
    let etcd = Etcd::start_on(netns.host_ip());
    let host_etcd = etcd.endpoint();
    let ns_etcd = etcd.endpoint_on();
    let ttl = ["--lease-ttl-secs", TTL_SECS];
    let ns_listen = format!("{}:0", netns.ns_ip());
    let worker = [
        "worker",
        "--insecure",
        "--model",
        path_str(&model),
        "--devices",
        "cpu:0",
        "--listen",
        &ns_listen,
        "--http-listen",
        &ns_listen,
    ];
    let cut = Proc::start_with_prefix(
        &netns.exec_prefix(),
        &[&worker[..], &member_args(&ns_etcd, CLUSTER, &ttl)].concat(),
    );
    let cut_addr = cut.grpc.to_string();
    let _survivor = Proc::worker(&model, "cpu:0", &member_args(&host_etcd, CLUSTER, &ttl));
    // A dispatch to a silent worker fails after 300 ms; with elastic membership a
    // dispatch keeps retrying (sole copies included) for deadline × (retries + 1) =
    // 18.3 s while it waits for the placement to replace the worker.
    let router = etcd_router(
        &model,
        &host_etcd,
        CLUSTER,
        &[
            "--min-workers",
            "2",
            "--expert-replicas",
            "1",
            "--dispatch-timeout-ms",
            "300",
            "--dispatch-retries",
            "60",
            // A slow answer before the cut may have marked the worker down already; a
            // short window makes the cut's first timeout log a fresh mark-down.
            "--mark-down-ms",
            "50",
        ],
    );
    let text = metrics(router.http);
    assert_eq!(
        metric_value(&text, "moe_placement_version"),
        Some(1.0),
        "{text}"
    );
    let status = cluster_status(&router);
    // The namespace's worker by the id the router knows it by; its record in etcd.
    let cut_id = id_of_worker_at(&status, netns.ns_ip());
    assert!(
        hosted_by(&status, &cut_id) > 0,
        "the namespace's worker hosts no expert at the start:\n{status:#}"
    );
    let key = format!("/moe/{CLUSTER}/workers/{cut_id}");
    let lease_before = etcd
        .entry(&key)
        .unwrap_or_else(|| panic!("{key} is not in etcd"))
        .lease;

    // Cut the link while every request is streaming.
    let mut streams = Streams::start(router.grpc, &reqs, Duration::from_secs(180));
    streams.wait_all_started().await;
    // Only what the router logs from here on counts (a slow answer before the cut could
    // have marked the worker down already).
    let log_lines_before_cut = router.log().lines().count();
    netns.cut();
    assert_streams_match("across the cut", &want, streams.finish().await, MAX_TOKENS);

    let text = metrics(router.http);
    let marked = metric_value(
        &text,
        &format!("moe_worker_marked_down_total{{worker=\"{cut_addr}\"}}"),
    )
    .unwrap_or(0.0);
    assert!(
        marked > 0.0,
        "the cut worker was never marked down (did the cut land mid-stream?):\n{text}"
    );
    assert!(
        metric_sum(&text, "moe_dispatch_retries_total") > 0.0,
        "no dispatch was retried:\n{text}"
    );
    // The requests could only finish once its experts had another home.
    let version_cut = metric_value(&text, "moe_placement_version").unwrap_or(0.0);
    assert!(
        version_cut >= 2.0,
        "the cut worker's experts were not re-placed:\n{text}"
    );
    let status = cluster_status(&router);
    assert_eq!(
        hosted_by(&status, &cut_id),
        0,
        "the cut worker still hosts experts:\n{status:#}"
    );
    assert_eq!(
        status["missing_experts"],
        json!([]),
        "experts without a copy after the re-placement:\n{status:#}"
    );
    // The dispatch deadline noticed the silence first; the lease expiry came after.
    let log = router.log();
    let line_of = |what: &str, who: &str| {
        log.lines()
            .skip(log_lines_before_cut)
            .position(|l| l.contains(what) && l.contains(who))
    };
    let marked_at = line_of("worker marked down", &cut_addr);
    let left_at = line_of("workers left the membership", netns.ns_ip());
    assert!(
        matches!((marked_at, left_at), (Some(m), Some(l)) if m < l),
        "expected the router to mark {cut_addr} down (log line {marked_at:?}) before its \
         lease expired and it left the membership (log line {left_at:?})\n{log}"
    );

    // Heal: the worker registers again under a fresh lease and gets experts back.
    netns.heal();
    let rejoined = wait_until(SETTLE, || {
        let text = metrics(router.http);
        metric_value(&text, "moe_placement_version").unwrap_or(0.0) > version_cut
            && hosted_by(&cluster_status(&router), &cut_id) > 0
    });
    assert!(
        rejoined,
        "the healed worker was not given experts again within {SETTLE:?}:\n{:#}\n{}",
        cluster_status(&router),
        metrics(router.http)
    );
    let lease_after = etcd.entry(&key).map(|e| e.lease);
    assert!(
        lease_after.is_some_and(|l| l != 0 && l != lease_before),
        "the healed worker did not register again under a fresh lease: \
         before {lease_before}, now {lease_after:?}"
    );

    // It serves again: a second batch matches the offline run, partly computed there.
    let ok_series = "moe_worker_dispatch_requests_total{outcome=\"ok\"}";
    let ok_before = metric_value(&metrics(cut.http), ok_series).unwrap_or(0.0);
    let streams = Streams::start(router.grpc, &reqs, Duration::from_secs(180));
    assert_streams_match("after the heal", &want, streams.finish().await, MAX_TOKENS);
    let ok_after = metric_value(&metrics(cut.http), ok_series).unwrap_or(0.0);
    assert!(
        ok_after > ok_before,
        "the healed worker computed no dispatch of the second batch ({ok_before} → {ok_after})"
    );
    eprintln!(
        "marked down {marked} time(s); placement version 1 → {version_cut} (cut) → {} (healed)",
        metric_value(&metrics(router.http), "moe_placement_version").unwrap_or(0.0)
    );
}

/// The id of the worker whose id contains `ip` (the router names workers by their id).
fn id_of_worker_at(status: &Value, ip: &str) -> String {
    status["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["worker"].as_str())
        .find(|w| w.contains(ip))
        .unwrap_or_else(|| panic!("no worker at {ip} in the placement:\n{status:#}"))
        .to_owned()
}
