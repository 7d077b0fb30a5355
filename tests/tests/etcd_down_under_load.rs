//! Failure rule 5: etcd is never a single point of failure for serving. etcd killed with
//! SIGKILL for longer than the workers' lease TTL while greedy requests stream costs no
//! request: every one completes with the same tokens as offline `moe generate`, and the
//! router keeps the placement it had. When etcd comes back (same port, same data dir)
//! the membership is rebuilt (every worker registered again) and placement continues: a
//! worker started afterwards registers and is given experts (placement version up,
//! `/v1/cluster` shows it hosting), and a further batch is again identical. Nothing was
//! restarted meanwhile: the router and workers are the processes first started.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moe_tests::cluster::{
    assert_streams_match, cluster_status, etcd_router, hosted_by, keep_streaming, member_args,
    placement_version, varied_reqs, worker_id, Etcd, EtcdEntry, Streams,
};
use moe_tests::{
    generate_offline, metric_sum, metric_value, metrics, tiny_checkpoint, wait_until, Proc,
    PATIENCE,
};
use serde_json::Value;

const MAX_TOKENS: u32 = 300;
/// Lease TTL of the workers.
const TTL: Duration = Duration::from_secs(2);
const CLUSTER: &str = "etcd-down";

fn generated_tokens(router: &Proc) -> f64 {
    metric_sum(&metrics(router.http), "moe_generation_tokens_total")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_killed_under_load_fails_no_request_and_placement_continues_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 71);
    let reqs = varied_reqs(4, 5, MAX_TOKENS);
    let want = generate_offline(&model, &reqs);

    let mut etcd = Etcd::start();
    let endpoint = etcd.endpoint();
    let ttl = TTL.as_secs().to_string();
    let member = member_args(&endpoint, CLUSTER, &["--lease-ttl-secs", &ttl]);
    let mut workers: Vec<Proc> = (0..2)
        .map(|_| Proc::worker(&model, "cpu:0", &member))
        .collect();
    let mut router = etcd_router(
        &model,
        &endpoint,
        CLUSTER,
        &["--min-workers", "2", "--expert-replicas", "1"],
    );
    let pids: Vec<u32> = std::iter::once(router.pid())
        .chain(workers.iter().map(Proc::pid))
        .collect();
    let keys: Vec<String> = workers
        .iter()
        .map(|w| format!("/moe/{CLUSTER}/workers/{}", worker_id(w)))
        .collect();
    let before: Vec<EtcdEntry> = keys
        .iter()
        .map(|k| {
            etcd.entry(k)
                .unwrap_or_else(|| panic!("{k} is not registered"))
        })
        .collect();
    let v1 = placement_version(&router);
    assert_eq!(v1, 1.0);

    // Load from here to the end of the outage and past etcd's return.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let load = keep_streaming(
        router.grpc,
        &reqs,
        Duration::from_secs(120),
        stop.clone(),
        done.clone(),
    );
    assert!(
        wait_until(PATIENCE, || generated_tokens(&router) > 0.0),
        "no token was generated:\n{}",
        router.log()
    );

    let tokens_at_kill = generated_tokens(&router);
    let batches_at_kill = done.load(Ordering::SeqCst);
    etcd.kill();
    let killed_at = Instant::now();
    // The scenario itself, not synchronisation: etcd stays down for three lease TTLs
    // (every lease would have expired by then, were etcd there to expire it). The wait
    // also polls for progress: tokens generated and whole batches finished since the
    // kill, i.e. requests kept streaming without etcd.
    let down_for = 3 * TTL;
    assert!(
        wait_until(down_for + PATIENCE, || {
            killed_at.elapsed() >= down_for
                && generated_tokens(&router) > tokens_at_kill
                && done.load(Ordering::SeqCst) > batches_at_kill + 1
        }),
        "requests stopped while etcd was down ({} batches finished before the kill, {} now):\n{}",
        batches_at_kill,
        done.load(Ordering::SeqCst),
        router.log()
    );
    // Whatever the membership watch lost, the router kept the placement it had.
    assert_eq!(placement_version(&router), v1, "{}", router.log());
    let tokens_at_restart = generated_tokens(&router);
    let batches_at_restart = done.load(Ordering::SeqCst);
    eprintln!(
        "etcd down {:?}: {} tokens and {} batches finished meanwhile",
        killed_at.elapsed(),
        tokens_at_restart - tokens_at_kill,
        batches_at_restart - batches_at_kill
    );

    etcd.restart();
    let restarted_at = Instant::now();
    // The membership is rebuilt: etcd still has the keys (they are in its data dir), so
    // what shows that every worker is in touch again is its record put anew (a worker
    // re-puts it on every reconnection) on a lease: the one it had, kept alive again, or
    // a fresh one if that expired meanwhile.
    let mut after: Vec<Option<EtcdEntry>> = Vec::new();
    assert!(
        wait_until(PATIENCE, || {
            after = keys.iter().map(|k| etcd.entry(k)).collect();
            after
                .iter()
                .zip(&before)
                .all(|(a, b)| a.is_some_and(|a| a.lease != 0 && a.mod_revision > b.mod_revision))
        }),
        "the workers did not register again after etcd returned: {before:?} → {after:?}\n{}",
        workers.iter().map(Proc::log).collect::<Vec<_>>().join("\n")
    );
    eprintln!(
        "membership rebuilt {:?} after etcd returned ({before:?} → {after:?})",
        restarted_at.elapsed()
    );

    // Placement continues: a worker started now registers and is given experts.
    let version_before_join = placement_version(&router);
    let third = Proc::worker(&model, "cpu:0", &member);
    let third_id = worker_id(&third);
    let joined_at = Instant::now();
    let mut status = Value::Null;
    assert!(
        wait_until(PATIENCE, || {
            status = cluster_status(&router);
            status["placement_version"]
                .as_f64()
                .is_some_and(|v| v > version_before_join)
                && hosted_by(&status, &third_id) > 0
        }),
        "the router placed no experts on a worker that joined after etcd returned: {status}\n{}",
        router.log()
    );
    // The plan covers the original workers too: the router's membership is whole again.
    for w in &workers {
        assert!(hosted_by(&status, &worker_id(w)) > 0, "{status}");
    }
    let version_after_join = placement_version(&router);
    assert!(version_after_join > version_before_join);
    eprintln!(
        "a new worker was given {} experts {:?} after it started (placement version {version_before_join} → {version_after_join})",
        hosted_by(&status, &third_id),
        joined_at.elapsed()
    );

    // Requests kept streaming across etcd's return and the join.
    assert!(
        wait_until(PATIENCE, || done.load(Ordering::SeqCst)
            > batches_at_restart + 1),
        "no batch finished after etcd returned"
    );
    stop.store(true, Ordering::SeqCst);
    let batches = load.await.expect("load task");
    assert!(generated_tokens(&router) > tokens_at_restart);
    eprintln!(
        "{} batches of {} requests streamed from before the kill to after the join",
        batches.len(),
        reqs.len()
    );
    for (b, got) in batches.into_iter().enumerate() {
        assert_streams_match(&format!("batch {b}"), &want, got, MAX_TOKENS);
    }

    // A further batch, now spread over three workers, is again identical.
    let ok_series = "moe_worker_dispatch_requests_total{outcome=\"ok\"}";
    let got = Streams::start(router.grpc, &reqs, Duration::from_secs(120))
        .finish()
        .await;
    assert_streams_match("after the join", &want, got, MAX_TOKENS);
    let third_ok = metric_value(&metrics(third.http), ok_series).unwrap_or(0.0);
    assert!(third_ok > 0.0, "the new worker computed nothing");

    // Nobody restarted: the same processes, all still running.
    let now: Vec<u32> = std::iter::once(router.pid())
        .chain(workers.iter().map(Proc::pid))
        .collect();
    assert_eq!(now, pids);
    assert!(router.is_alive(), "the router exited:\n{}", router.log());
    for w in &mut workers {
        assert!(w.is_alive(), "a worker exited:\n{}", w.log());
    }
    drop(third);
    drop(router);
    drop(workers);
    drop(etcd);
}
