//! Failure rule 7: under load (batches of requests back to back until the changes are
//! over), a worker joins and another is told to leave (SIGTERM); no request fails. The joining worker is given experts (loaded before any router
//! routes to them); the leaving one is drained first: it marks itself draining, the
//! controller places its experts on the others, the routers switch, its copies are
//! unloaded, and only then it exits, cleanly. Every stream's greedy tokens match the
//! offline run.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moe_tests::cluster::{
    assert_streams_match, etcd_router, hosting_workers, keep_streaming, member_args, varied_reqs,
    Etcd,
};
use moe_tests::{
    generate_offline, metric_sum, metric_value, metrics, tiny_checkpoint, wait_until, Proc,
};

const MAX_TOKENS: u32 = 400;
const CLUSTER: &str = "t7";

/// Polls `cond` off the runtime's worker threads until it holds (60 s at most).
async fn wait_until_async(cond: impl FnMut() -> bool + Send + 'static) {
    let ok = tokio::task::spawn_blocking(move || wait_until(Duration::from_secs(60), cond))
        .await
        .expect("poll task");
    assert!(ok, "condition not reached within 60 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_joins_and_another_leaves_under_load_and_no_request_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 71);
    let reqs = varied_reqs(4, 7, MAX_TOKENS);
    let want = generate_offline(&model, &reqs);

    let etcd = Etcd::start();
    let endpoint = etcd.endpoint();
    let member = member_args(
        &endpoint,
        CLUSTER,
        &["--lease-ttl-secs", "2", "--leave-timeout-secs", "30"],
    );
    let w0 = Proc::worker(
        &model,
        "cpu:0",
        &[&member[..], &["--worker-id", "w0"]].concat(),
    );
    let mut w1 = Proc::worker(
        &model,
        "cpu:0",
        &[&member[..], &["--worker-id", "w1"]].concat(),
    );
    let router = etcd_router(
        &model,
        &endpoint,
        CLUSTER,
        &["--lease-ttl-secs", "2", "--min-workers", "2"],
    );
    assert_eq!(hosting_workers(&router), ["w0", "w1"]);

    // Load throughout: batch after batch of the same requests, until the join and the
    // leave are over (a tiny model answers a batch in about a second).
    let stop = Arc::new(AtomicBool::new(false));
    let load = keep_streaming(
        router.grpc,
        &reqs,
        Duration::from_secs(120),
        stop.clone(),
        Arc::new(AtomicUsize::new(0)),
    );
    let http_addr = router.http;
    wait_until_async(move || {
        metric_value(&metrics(http_addr), "moe_num_requests_running").unwrap_or(0.0) > 0.0
    })
    .await;

    // Join under load.
    let w2 = Proc::worker(
        &model,
        "cpu:0",
        &[&member[..], &["--worker-id", "w2"]].concat(),
    );
    assert!(
        wait_until(Duration::from_secs(60), || hosting_workers(&router)
            .contains(&"w2".to_owned())),
        "the joining worker was given no experts:\n{}",
        router.describe()
    );
    // Leave under load: drained, then gone.
    let asked_to_leave = std::time::Instant::now();
    w1.sigterm();
    let status = w1.wait_exit(Duration::from_secs(60));
    eprintln!(
        "the leaving worker exited {:?} after SIGTERM",
        asked_to_leave.elapsed()
    );
    assert!(
        status.success(),
        "the leaving worker exited with {status}:\n{}",
        w1.describe()
    );
    assert!(
        w1.log().contains("experts handed over"),
        "the worker left before its experts were placed elsewhere:\n{}",
        w1.describe()
    );
    assert_eq!(hosting_workers(&router), ["w0", "w2"]);

    stop.store(true, Ordering::SeqCst);
    let batches = load.await.expect("load task");
    // Batches ran back to back from before the join (requests were running) until
    // after the leave; how many fit in between depends on the machine's speed.
    assert!(!batches.is_empty(), "no batch ran");
    for (i, got) in batches.into_iter().enumerate() {
        assert_streams_match(
            &format!("batch {i}, across a join and a leave"),
            &want,
            got,
            MAX_TOKENS,
        );
    }
    let text = metrics(router.http);
    let failed = metric_sum(&text, "moe_requests_total")
        - metric_value(&text, "moe_requests_total{outcome=\"ok\"}").unwrap_or(0.0);
    assert_eq!(failed, 0.0, "some requests did not end ok:\n{text}");
    // Copies were loaded before routes pointed at them and dropped only after every
    // router had switched: no dispatch failed, none was retried.
    assert_eq!(
        moe_tests::metric_sum(&text, "moe_dispatch_retries_total"),
        0.0,
        "dispatches were retried across the join and the leave:\n{text}"
    );
    assert!(
        metric_value(&text, "moe_placement_version").unwrap_or(0.0) >= 3.0,
        "expected a placement for the join and one for the leave:\n{text}"
    );
    drop((w0, w2, router, etcd));
}
