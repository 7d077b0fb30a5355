//! A static cluster (`--workers`, no etcd) heals itself: the router is its only
//! controller.
//!
//! - One worker, one copy of each expert: after `kill -9` requests fail UNAVAILABLE
//!   (nothing hosts the experts); a worker restarted on the same address is loaded
//!   again and requests succeed with the same tokens, without restarting the router.
//!   Then someone unloads every expert from that worker behind the router's back
//!   (`UnloadExperts`, allowed with `--insecure`): the router sees the drift and has it
//!   load them again.
//! - Two workers, one copy: `kill -9` of one while requests stream re-places its experts
//!   on the survivor; no request is lost and the tokens are those of `moe generate`.

use std::time::Duration;

use moe_proto::v1::{DeviceAssignment, InfoRequest, UnloadExpertsRequest};
use moe_tests::cluster::{
    assert_streams_match, cluster_status, free_port, hosting_workers, varied_reqs, Streams,
};
use moe_tests::{
    expert_client, generate, generate_offline, metric_value, metrics, path_str, streamed_tokens,
    tiny_checkpoint, Proc,
};

const MAX_TOKENS: u32 = 12;

/// A worker on a fixed gRPC port, so that it can come back at the same address.
fn worker_on(model: &std::path::Path, port: u16) -> Proc {
    let listen = format!("127.0.0.1:{port}");
    Proc::start(&[
        "worker",
        "--insecure",
        "--model",
        path_str(model),
        "--devices",
        "cpu:0",
        "--listen",
        &listen,
        "--http-listen",
        "127.0.0.1:0",
    ])
}

/// Polls `check` every 200 ms until it holds or `timeout` passes.
async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Experts the worker at `addr` hosts, per its `Info`.
async fn hosted(addr: std::net::SocketAddr) -> usize {
    let info = expert_client(addr)
        .await
        .info(InfoRequest {})
        .await
        .expect("Info")
        .into_inner();
    info.devices.iter().map(|d| d.experts.len()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_worker_is_reloaded_and_drift_is_repaired() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 131);
    let reqs = varied_reqs(2, 7, MAX_TOKENS);
    let want = generate_offline(&model, &reqs);
    let port = free_port();
    let mut worker = worker_on(&model, port);
    // A dispatch that finds no copy gives up after 300 ms × 2 attempts.
    let router = Proc::router(
        &model,
        &[&worker],
        &[
            "--expert-replicas",
            "1",
            "--dispatch-timeout-ms",
            "300",
            "--dispatch-retries",
            "1",
        ],
    );
    let serves = |what: &'static str| {
        let reqs = reqs.clone();
        let want = want.clone();
        let addr = router.grpc;
        async move {
            for (r, w) in reqs.iter().zip(&want) {
                let got = generate(addr, r.to_proto())
                    .await
                    .unwrap_or_else(|s| panic!("{what}: {s}"));
                moe_tests::assert_same_tokens(what, w, &streamed_tokens(&got), 1e-3);
            }
        }
    };
    serves("before the kill").await;
    let all = hosted(worker.grpc).await;
    assert!(all > 0);

    worker.signal("KILL");
    worker.wait_exit(Duration::from_secs(30));
    let err = generate(router.grpc, reqs[0].to_proto())
        .await
        .expect_err("no copy of any expert exists: the request must fail");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");

    let worker = worker_on(&model, port);
    assert_eq!(worker.grpc.port(), port);
    let back = eventually(Duration::from_secs(60), || async {
        generate(router.grpc, reqs[0].to_proto()).await.is_ok()
    })
    .await;
    assert!(
        back,
        "requests never succeeded after the restart\n{}",
        router.describe()
    );
    serves("after the restart").await;
    assert_eq!(
        hosted(worker.grpc).await,
        all,
        "the restarted worker was reloaded"
    );

    // Drift: every expert unloaded behind the router's back.
    let info = expert_client(worker.grpc)
        .await
        .info(InfoRequest {})
        .await
        .expect("Info")
        .into_inner();
    let unload = UnloadExpertsRequest {
        placement_version: info.placement_version,
        assignments: info
            .devices
            .iter()
            .map(|d| DeviceAssignment {
                device: d.name.clone(),
                experts: d.experts.clone(),
            })
            .collect(),
    };
    expert_client(worker.grpc)
        .await
        .unload_experts(unload)
        .await
        .expect("UnloadExperts");
    let reloaded = eventually(Duration::from_secs(60), || async {
        hosted(worker.grpc).await == all
    })
    .await;
    assert!(
        reloaded,
        "the router did not reload the unloaded experts\n{}",
        router.describe()
    );
    serves("after the drift was repaired").await;
    assert!(
        router
            .log()
            .contains("lacks copies the placement assigns it"),
        "{}",
        router.describe()
    );
    let status = cluster_status(&router);
    let seen = &status["static_workers"][0];
    assert_eq!(seen["answering"], true, "{status}");
    assert_eq!(seen["hosted"], seen["assigned"], "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_experts_move_to_the_survivor_and_no_request_is_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 137);
    let reqs = varied_reqs(4, 9, 200);
    let want = generate_offline(&model, &reqs);
    let workers: Vec<Proc> = (0..2).map(|_| Proc::worker(&model, "cpu:0", &[])).collect();
    let router = Proc::router(
        &model,
        &[&workers[0], &workers[1]],
        &["--expert-replicas", "1"],
    );
    let (dead, survivor) = (workers[0].grpc.to_string(), workers[1].grpc.to_string());
    assert_eq!(
        hosting_workers(&router).len(),
        2,
        "{}",
        cluster_status(&router)
    );

    let mut streams = Streams::start(router.grpc, &reqs, Duration::from_secs(120));
    streams.wait_all_started().await;
    workers[0].signal("KILL");
    let got = streams.finish().await;
    assert_streams_match("after the kill", &want, got, 200);

    let status = cluster_status(&router);
    assert_eq!(hosting_workers(&router), vec![survivor.clone()], "{status}");
    let seen = status["static_workers"].as_array().expect("static_workers");
    let by_addr = |a: &str| seen.iter().find(|w| w["address"] == a).cloned();
    assert_eq!(
        by_addr(&dead).map(|w| w["answering"].clone()),
        Some(false.into()),
        "{status}"
    );
    assert_eq!(
        by_addr(&survivor).map(|w| w["answering"].clone()),
        Some(true.into()),
        "{status}"
    );
    let text = metrics(router.http);
    assert_eq!(metric_value(&text, "moe_live_workers"), Some(1.0), "{text}");
    assert!(
        metric_value(&text, "moe_placement_version").unwrap_or(0.0) >= 2.0,
        "{text}"
    );
}
