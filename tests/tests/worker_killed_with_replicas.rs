//! Failure rule 1: with every expert on two workers (`--expert-replicas 2`), a worker
//! killed with SIGKILL while greedy requests are streaming is invisible to clients:
//! every request completes with the same tokens as offline `moe generate`. The router
//! shows the dispatch retries and marks the dead worker down (so later steps skip it
//! instead of paying for it again).

use std::time::{Duration, Instant};

use moe_tests::cluster::{assert_streams_match, varied_reqs, Streams};
use moe_tests::{generate_offline, metric_sum, metrics, tiny_checkpoint, Proc};

const MAX_TOKENS: u32 = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_with_replicas_loses_no_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 91);
    let reqs = varied_reqs(6, 0, MAX_TOKENS);
    let want = generate_offline(&model, &reqs);

    let workers: Vec<Proc> = (0..3).map(|_| Proc::worker(&model, "cpu:0", &[])).collect();
    let refs: Vec<&Proc> = workers.iter().collect();
    let router = Proc::router(&model, &refs, &["--expert-replicas", "2"]);

    let mut streams = Streams::start(router.grpc, &reqs, Duration::from_secs(120));
    streams.wait_all_started().await;
    let killed_at = Instant::now();
    workers[1].signal("KILL");
    let got = streams.finish().await;
    let after_kill = killed_at.elapsed();

    assert_streams_match("after the kill", &want, got, MAX_TOKENS);

    let text = metrics(router.http);
    assert!(
        metric_sum(&text, "moe_dispatch_retries_total") > 0.0,
        "the router retried no dispatch:\n{text}"
    );
    let dead = workers[1].grpc.to_string();
    let marked = format!("moe_worker_marked_down_total{{worker=\"{dead}\"}}");
    assert!(
        moe_tests::metric_value(&text, &marked).unwrap_or(0.0) > 0.0,
        "the dead worker {dead} was never marked down:\n{text}"
    );
    eprintln!("requests finished {after_kill:?} after the kill");
}
