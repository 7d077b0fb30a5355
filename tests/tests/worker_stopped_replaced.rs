//! Failure rule 3 with etcd membership and one copy of each expert
//! (`--expert-replicas 1`): a worker frozen with SIGSTOP keeps its sockets open but
//! answers nothing, and its lease keep-alive stops with it. The router's dispatch
//! deadline marks it down while its lease is still alive; then the lease expires, the
//! router re-places its experts on the survivor (placement version up), and every
//! in-flight request completes with the same greedy tokens as offline `moe generate`
//! (none lost, none repeated). After SIGCONT the worker registers again under a fresh
//! lease, the router places experts on it again (version up again), and a second batch
//! of requests, which it now serves part of, is again identical.

use std::time::{Duration, Instant};

use moe_tests::cluster::{
    assert_streams_match, cluster_status, etcd_router, hosted_by, member_args, placement_version,
    varied_reqs, worker_id, Etcd, Streams,
};
use moe_tests::{
    generate_offline, metric_value, metrics, tiny_checkpoint, wait_until, Proc, PATIENCE,
};

const MAX_TOKENS: u32 = 300;
/// Lease TTL of the workers (kept alive every TTL/2).
const TTL_SECS: &str = "4";
const CLUSTER: &str = "stopped";

/// The placement version in one scrape of `/metrics` (0 before any).
fn placement_version_in(text: &str) -> f64 {
    metric_value(text, "moe_placement_version").unwrap_or(0.0)
}

/// The sum of the series of metric `name` that carry `label` (`key="value"`).
fn sum_with_label(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix('{')?.split_once("} "))
        .filter(|(labels, _)| labels.split(',').any(|l| l == label))
        .filter_map(|(_, v)| v.split_whitespace().next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_sole_copy_is_marked_down_replaced_and_rejoins_after_sigcont() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 61);
    let reqs = varied_reqs(4, 3, MAX_TOKENS);
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
        &[
            "--min-workers",
            "2",
            "--expert-replicas",
            "1",
            // A dispatch deadline well inside the lease TTL: the frozen worker is marked
            // down long before etcd can notice. The retries only widen the bound a
            // dispatch may wait for a new copy (300 ms × 101), far past the TTL plus a
            // re-placement.
            "--dispatch-timeout-ms",
            "300",
            "--dispatch-retries",
            "100",
            // A slow answer before the stop may already have marked the worker down;
            // a short window lets the frozen worker's first timeout count afresh.
            "--mark-down-ms",
            "50",
        ],
    );
    let (frozen, survivor) = (&workers[0], &workers[1]);
    let (frozen_id, survivor_id) = (worker_id(frozen), worker_id(survivor));
    let frozen_addr = frozen.grpc.to_string();
    let key = format!("/moe/{CLUSTER}/workers/{frozen_id}");
    let retries = |text: &str| {
        sum_with_label(
            text,
            "moe_dispatch_retries_total",
            &format!("worker=\"{frozen_addr}\""),
        )
    };
    let marked_down = |text: &str| {
        metric_value(
            text,
            &format!("moe_worker_marked_down_total{{worker=\"{frozen_addr}\"}}"),
        )
        .unwrap_or(0.0)
    };

    let text = metrics(router.http);
    let v1 = placement_version_in(&text);
    assert_eq!(v1, 1.0, "{text}");
    let status = cluster_status(&router);
    let all_experts = status["experts"].as_array().expect("experts").len();
    assert!(
        hosted_by(&status, &frozen_id) > 0 && hosted_by(&status, &survivor_id) > 0,
        "the first placement does not use both workers: {status}"
    );
    let lease_of = |key: &str| etcd.entry(key).map(|e| e.lease);
    let first_lease = lease_of(&key).unwrap_or_else(|| panic!("{key} is not registered"));

    // Phase 1: freeze a sole copy while every request is streaming.
    let mut streams = Streams::start(router.grpc, &reqs, Duration::from_secs(120));
    streams.wait_all_started().await;
    // Baselines: a slow answer on a busy machine may have counted already.
    let text = metrics(router.http);
    let (marked_before, retries_before) = (marked_down(&text), retries(&text));
    frozen.signal("STOP");
    let stopped_at = Instant::now();

    // The mark-down comes from the dispatch deadline, not from the membership: when the
    // router first reports it, the worker's key (on its lease) is still in etcd. (A key
    // present after the scrape was present at the scrape: it cannot come back while the
    // worker is frozen.)
    let mut seen = None;
    assert!(
        wait_until(PATIENCE, || {
            let text = metrics(router.http);
            if marked_down(&text) <= marked_before {
                return false;
            }
            seen = Some((placement_version_in(&text), lease_of(&key)));
            true
        }),
        "the frozen worker was never marked down:\n{}",
        router.log()
    );
    let (version_at_mark, lease_at_mark) = seen.expect("observed");
    eprintln!(
        "marked down {:?} after SIGSTOP (placement version then {version_at_mark})",
        stopped_at.elapsed()
    );
    assert_eq!(
        lease_at_mark,
        Some(first_lease),
        "the worker was marked down only after its lease expired:\n{}",
        router.log()
    );
    assert_eq!(version_at_mark, v1, "re-placed before the mark-down");

    // Its keep-alive is frozen too: the lease expires and the key goes.
    assert!(
        wait_until(PATIENCE, || lease_of(&key).is_none()),
        "the frozen worker's lease never expired"
    );
    eprintln!("lease expired {:?} after SIGSTOP", stopped_at.elapsed());

    let got = streams.finish().await;
    eprintln!("requests finished {:?} after SIGSTOP", stopped_at.elapsed());
    assert_streams_match("while frozen", &want, got, MAX_TOKENS);

    let text = metrics(router.http);
    let v2 = placement_version_in(&text);
    assert!(v2 > v1, "the placement was not replaced:\n{text}");
    assert!(
        retries(&text) > retries_before,
        "no dispatch to the frozen worker was retried (did the stop land mid-stream?):\n{text}"
    );
    let status = cluster_status(&router);
    assert_eq!(hosted_by(&status, &frozen_id), 0, "{status}");
    assert_eq!(hosted_by(&status, &survivor_id), all_experts, "{status}");
    assert_eq!(status["missing_experts"], serde_json::json!([]), "{status}");

    // Phase 2: thaw it. Its registration is renewed under a fresh lease and the router
    // gives it experts again.
    frozen.signal("CONT");
    let resumed_at = Instant::now();
    let mut second_lease = None;
    assert!(
        wait_until(PATIENCE, || {
            second_lease = lease_of(&key);
            second_lease.is_some_and(|l| l != 0 && l != first_lease)
        }),
        "the resumed worker did not register again under a fresh lease (last: {second_lease:?}):\n{}",
        frozen.log()
    );
    eprintln!(
        "registered again {:?} after SIGCONT (lease {first_lease:x} → {:x})",
        resumed_at.elapsed(),
        second_lease.unwrap_or(0)
    );
    let mut v3 = 0.0;
    assert!(
        wait_until(PATIENCE, || {
            v3 = placement_version(&router);
            v3 > v2 && hosted_by(&cluster_status(&router), &frozen_id) > 0
        }),
        "the router placed no experts on the resumed worker (version {v3}):\n{}",
        router.log()
    );
    eprintln!(
        "experts placed on it again {:?} after SIGCONT (placement version {v1} → {v2} → {v3})",
        resumed_at.elapsed()
    );

    // No traffic since the re-placement: what the worker computes from here is batch 2.
    let ok_series = "moe_worker_dispatch_requests_total{outcome=\"ok\"}";
    let ok_before = metric_value(&metrics(frozen.http), ok_series).unwrap_or(0.0);
    let got = Streams::start(router.grpc, &reqs, Duration::from_secs(120))
        .finish()
        .await;
    assert_streams_match("after the rejoin", &want, got, MAX_TOKENS);
    let ok_after = metric_value(&metrics(frozen.http), ok_series).unwrap_or(0.0);
    assert!(
        ok_after > ok_before,
        "the rejoined worker computed nothing for the second batch ({ok_before} → {ok_after})"
    );
    drop(router);
    drop(workers);
    drop(etcd);
}
