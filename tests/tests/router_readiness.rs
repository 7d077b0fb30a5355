//! Readiness means "can serve now". A router stays ready while every expert has a copy
//! on a live worker; when the last copy of some expert dies its readiness turns
//! NOT_SERVING (gRPC health `""` and `moe.v1.Generation`, `/health` 503 naming why) while
//! its liveness (`liveness` health service, `/health/live`) stays SERVING, so Kubernetes
//! takes it out of the Service without restarting it.

use std::time::Duration;

use moe_tests::health::{grpc_health as health, wait_grpc_health as wait_health};
use moe_tests::{http, metric_value, metrics, tiny_checkpoint, wait_until, Proc, PATIENCE};
use tonic_health::pb::health_check_response::ServingStatus;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_live_copies_and_liveness_stays_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 83);
    let mut w0 = Proc::worker(&model, "cpu:0", &[]);
    let mut w1 = Proc::worker(&model, "cpu:0", &[]);
    let router = Proc::router(
        &model,
        &[&w0, &w1],
        &["--expert-replicas", "2", "--dispatch-timeout-ms", "500"],
    );

    wait_health(router.grpc, "", ServingStatus::Serving).await;
    wait_health(router.grpc, "moe.v1.Generation", ServingStatus::Serving).await;
    assert_eq!(
        health(router.grpc, "liveness").await,
        ServingStatus::Serving
    );
    assert_eq!(http(router.http, "GET", "/health", None).0, 200);

    // One copy of every expert is left: still ready, and requests still succeed.
    w0.signal("KILL");
    let body = r#"{"prompt": [4, 5, 6], "max_tokens": 8, "temperature": 0}"#;
    let reply = http(router.http, "POST", "/v1/completions", Some(body));
    assert_eq!(reply.0, 200, "request with one copy left: {}", reply.1);
    // Several probe rounds (500 ms each) see w0 gone and w1 alive.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (code, body) = http(router.http, "GET", "/health", None);
        assert_eq!(code, 200, "ready with a live copy of every expert: {body}");
    }
    assert_eq!(health(router.grpc, "").await, ServingStatus::Serving);

    // The last copy goes: not ready, but alive.
    w1.signal("KILL");
    wait_health(router.grpc, "", ServingStatus::NotServing).await;
    wait_health(router.grpc, "moe.v1.Generation", ServingStatus::NotServing).await;
    assert_eq!(
        health(router.grpc, "liveness").await,
        ServingStatus::Serving
    );
    let (code, body) = http(router.http, "GET", "/health", None);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("no live copy"), "the reason names it: {body}");
    assert_eq!(http(router.http, "GET", "/health/live", None).0, 200);
    assert!(wait_until(PATIENCE, || metric_value(
        &metrics(router.http),
        "moe_router_ready"
    ) == Some(0.0)));
    let _ = (w0.wait_exit(PATIENCE), w1.wait_exit(PATIENCE));
}
