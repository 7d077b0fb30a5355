//! Failure rule 3 (static membership, replicas = 2): a worker frozen with SIGSTOP stops
//! answering without closing its sockets. The dispatch deadline marks it down long before
//! any lease could expire, its rows go to the other copy, and every in-flight request
//! completes with the same tokens as offline `moe generate` — each exactly once. After
//! SIGCONT and the mark-down window, the worker gets dispatches again (it rejoined) and
//! answers correctly.

use std::time::Duration;

use moe_tests::cluster::{assert_streams_match, varied_reqs, Streams};
use moe_tests::{generate_offline, metric_value, metrics, tiny_checkpoint, wait_until, Proc};

const MAX_TOKENS: u32 = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_worker_is_routed_around_and_rejoins_after_sigcont() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 57);
    let reqs = varied_reqs(4, 1, MAX_TOKENS);
    let want = generate_offline(&model, &reqs);

    let workers: Vec<Proc> = (0..3).map(|_| Proc::worker(&model, "cpu:0", &[])).collect();
    let refs: Vec<&Proc> = workers.iter().collect();
    let router = Proc::router(
        &model,
        &refs,
        &[
            "--expert-replicas",
            "2",
            "--dispatch-timeout-ms",
            "300",
            "--mark-down-ms",
            "1000",
        ],
    );
    let frozen = workers[1].grpc.to_string();
    let dispatches = |text: &str| {
        metric_value(
            text,
            &format!("moe_dispatch_seconds_count{{worker=\"{frozen}\"}}"),
        )
        .unwrap_or(0.0)
    };

    let mut streams = Streams::start(router.grpc, &reqs, Duration::from_secs(120));
    streams.wait_all_started().await;
    workers[1].signal("STOP");
    assert_streams_match("while frozen", &want, streams.finish().await, MAX_TOKENS);
    let text = metrics(router.http);
    let marked = metric_value(
        &text,
        &format!("moe_worker_marked_down_total{{worker=\"{frozen}\"}}"),
    )
    .unwrap_or(0.0);
    assert!(
        marked > 0.0,
        "the frozen worker was never marked down:\n{text}"
    );

    workers[1].signal("CONT");
    let before = dispatches(&metrics(router.http));
    let ok_series = "moe_worker_dispatch_requests_total{outcome=\"ok\"}";
    let ok_before = metric_value(&metrics(workers[1].http), ok_series).unwrap_or(0.0);
    // Traffic until the resumed worker is used again (after its mark-down window).
    let mut rounds = 0;
    let rejoined = {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let s = Streams::start(router.grpc, &reqs, Duration::from_secs(120));
            assert_streams_match("after SIGCONT", &want, s.finish().await, MAX_TOKENS);
            rounds += 1;
            if dispatches(&metrics(router.http)) > before + 1.0
                || std::time::Instant::now() > deadline
            {
                break dispatches(&metrics(router.http)) > before + 1.0;
            }
        }
    };
    assert!(
        rejoined,
        "the resumed worker got no dispatch in {rounds} rounds"
    );
    // It computed them itself (not only received them and failed). Stale work queued
    // while it was frozen may also count here; the router-side count above is what
    // shows it is routed to again.
    assert!(
        wait_until(Duration::from_secs(10), || {
            metric_value(&metrics(workers[1].http), ok_series).unwrap_or(0.0) > ok_before
        }),
        "the resumed worker computed no dispatch successfully"
    );
}
