//! Failure rule 6: two routers share a cluster; the elected placement controller is
//! killed with SIGKILL while the other router streams greedy requests. The survivor
//! takes over the election once the dead one's lease expires, keeps serving with
//! identical tokens throughout, and acts as controller: a worker that joins afterwards
//! gets experts from it. Every placement ever written (read back from etcd's history)
//! was written by one leadership at a time: versions rise, and once a newer leadership
//! wrote, an older one never wrote again (the writes are fenced by the leadership).

use std::path::Path;
use std::time::{Duration, Instant};

use moe_tests::cluster::{
    assert_streams_match, etcd_router, hosting_workers, member_args, varied_reqs, Etcd, Streams,
};
use moe_tests::{generate_offline, metric_value, metrics, tiny_checkpoint, wait_until, Proc};

const MAX_TOKENS: u32 = 300;
/// Lease TTL of routers and workers.
const TTL_SECS: &str = "2";
const CLUSTER: &str = "t6";

fn router(model: &Path, endpoint: &str, id: &str) -> Proc {
    etcd_router(
        model,
        endpoint,
        CLUSTER,
        &[
            "--router-id",
            id,
            "--lease-ttl-secs",
            TTL_SECS,
            "--min-workers",
            "2",
            "--expert-replicas",
            "1",
        ],
    )
}

/// Every placement ever written, oldest first: (version, controller, fencing revision).
fn placement_writers(etcd: &Etcd) -> Vec<(u64, String, i64)> {
    etcd.history(&format!("/moe/{CLUSTER}/placement"))
        .iter()
        .map(|p| {
            (
                p["version"].as_u64().expect("version"),
                p["placement"]["controller"]
                    .as_str()
                    .expect("controller")
                    .to_owned(),
                p["placement"]["token"].as_i64().expect("token"),
            )
        })
        .collect()
}

fn is_leader(p: &Proc) -> bool {
    metric_value(&metrics(p.http), "moe_controller_is_leader") == Some(1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_controller_is_replaced_and_placements_never_interleave() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 61);
    let reqs = varied_reqs(3, 6, MAX_TOKENS);
    let want = generate_offline(&model, &reqs);

    let etcd = Etcd::start();
    let endpoint = etcd.endpoint();
    let member = member_args(&endpoint, CLUSTER, &["--lease-ttl-secs", TTL_SECS]);
    let w0 = Proc::worker(
        &model,
        "cpu:0",
        &[&member[..], &["--worker-id", "w0"]].concat(),
    );
    let w1 = Proc::worker(
        &model,
        "cpu:0",
        &[&member[..], &["--worker-id", "w1"]].concat(),
    );
    let ra = router(&model, &endpoint, "ra");
    let rb = router(&model, &endpoint, "rb");
    // Whichever was elected is killed (normally the first started).
    assert!(
        wait_until(Duration::from_secs(60), || is_leader(&ra) || is_leader(&rb)),
        "no controller elected"
    );
    let (mut a, b) = if is_leader(&ra) { (ra, rb) } else { (rb, ra) };
    let (a_id, b_id) = if a.describe().contains("--router-id ra") {
        ("ra", "rb")
    } else {
        ("rb", "ra")
    };
    assert!(!is_leader(&b), "two leaders at once");
    assert_eq!(
        metric_value(&metrics(b.http), "moe_placement_version"),
        Some(1.0),
        "the follower does not route by the published placement"
    );

    let streams = Streams::start(b.grpc, &reqs, Duration::from_secs(120));
    let mut streams = streams;
    streams.wait_all_started().await;
    let killed_at = Instant::now();
    a.signal("KILL");
    a.wait_exit(Duration::from_secs(10));
    assert!(
        wait_until(Duration::from_secs(60), || is_leader(&b)),
        "the surviving router never became controller:\n{}",
        b.describe()
    );
    let takeover = killed_at.elapsed();

    // The new controller acts: a worker that joins now is given experts.
    let w2 = Proc::worker(
        &model,
        "cpu:0",
        &[&member[..], &["--worker-id", "w2"]].concat(),
    );
    assert!(
        wait_until(Duration::from_secs(60), || hosting_workers(&b)
            .contains(&"w2".to_owned())),
        "the new controller placed nothing on a joining worker:\n{}",
        b.describe()
    );
    let got = streams.finish().await;
    assert_streams_match("across the controller's death", &want, got, MAX_TOKENS);

    // What an operator sees: the survivor is the controller, and the dead router's
    // presence is gone with its lease.
    let out = moe_tests::run_moe(
        &["cluster", "status", "--router", &b.http.to_string()],
        true,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "controller {b_id} | this router {b_id} (controller)"
        )),
        "{text}"
    );
    assert!(text.contains("worker w2"), "{text}");
    // The dead router's presence goes with its lease (its own TTL).
    assert!(
        wait_until(Duration::from_secs(60), || {
            let out = moe_tests::run_moe(
                &["cluster", "status", "--router", &b.http.to_string()],
                true,
            );
            !String::from_utf8_lossy(&out.stdout).contains(&format!("router {a_id}"))
        }),
        "the dead router is still listed"
    );

    let writers = placement_writers(&etcd);
    eprintln!("controller taken over {takeover:?} after the kill; placements: {writers:?}");
    assert!(
        writers.windows(2).all(|w| w[0].0 < w[1].0),
        "placement versions did not rise: {writers:?}"
    );
    assert!(
        writers.windows(2).all(|w| w[0].2 <= w[1].2),
        "an older leadership wrote after a newer one: {writers:?}"
    );
    let by = |who: &str| writers.iter().filter(|w| w.1 == who).count();
    assert!(
        by(a_id) >= 1 && by(b_id) >= 1,
        "both routers should have published: {writers:?}"
    );
    let metrics_b = metrics(b.http);
    assert!(
        metric_value(&metrics_b, "moe_controller_leader_changes_total").unwrap_or(0.0) >= 2.0,
        "the follower did not count the change of leader:\n{metrics_b}"
    );
    drop((w0, w1, w2, b, etcd));
}

/// Fencing, proved with a deposed controller that is still alive: the controller is
/// frozen (SIGSTOP) past its lease, the other router is elected and publishes a
/// placement for a joining worker, then the old controller resumes believing it leads.
/// Whatever it tries, no placement of its own lands after its successor's, and it ends
/// up routing by the successor's placement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_controller_cannot_overwrite_its_successor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 62);
    let reqs = varied_reqs(2, 9, 32);
    let want = generate_offline(&model, &reqs);

    let etcd = Etcd::start();
    let endpoint = etcd.endpoint();
    let member = member_args(&endpoint, CLUSTER, &["--lease-ttl-secs", TTL_SECS]);
    let workers: Vec<Proc> = ["w0", "w1"]
        .iter()
        .map(|id| {
            Proc::worker(
                &model,
                "cpu:0",
                &[&member[..], &["--worker-id", id]].concat(),
            )
        })
        .collect();
    let ra = router(&model, &endpoint, "ra");
    let rb = router(&model, &endpoint, "rb");
    assert!(
        wait_until(Duration::from_secs(60), || is_leader(&ra) || is_leader(&rb)),
        "no controller elected"
    );
    let (old, new) = if is_leader(&ra) { (ra, rb) } else { (rb, ra) };
    let (old_id, new_id) = if old.describe().contains("--router-id ra") {
        ("ra", "rb")
    } else {
        ("rb", "ra")
    };

    old.signal("STOP");
    assert!(
        wait_until(Duration::from_secs(60), || is_leader(&new)),
        "no successor elected while the controller was frozen:\n{}",
        new.describe()
    );
    // A change only the successor can place: a worker joins.
    let w2 = Proc::worker(
        &model,
        "cpu:0",
        &[&member[..], &["--worker-id", "w2"]].concat(),
    );
    assert!(
        wait_until(Duration::from_secs(60), || hosting_workers(&new)
            .contains(&"w2".to_owned())),
        "the successor placed nothing on the joining worker:\n{}",
        new.describe()
    );
    let successor_version =
        metric_value(&metrics(new.http), "moe_placement_version").unwrap_or(0.0);

    old.signal("CONT");
    // The old controller notices it was deposed and follows its successor.
    assert!(
        wait_until(Duration::from_secs(60), || !is_leader(&old)
            && metric_value(&metrics(old.http), "moe_placement_version")
                .unwrap_or(0.0)
                >= successor_version),
        "the resumed controller did not step down and follow:\n{}",
        old.describe()
    );
    assert!(
        wait_until(Duration::from_secs(60), || is_leader(&new)),
        "the successor lost its leadership"
    );
    let got = Streams::start(old.grpc, &reqs, Duration::from_secs(120))
        .finish()
        .await;
    assert_streams_match("on the resumed router", &want, got, 32);

    let writers = placement_writers(&etcd);
    eprintln!("placements: {writers:?}");
    let first_new = writers
        .iter()
        .position(|w| w.1 == new_id)
        .expect("the successor published nothing");
    assert!(
        writers[first_new..].iter().all(|w| w.1 != old_id),
        "the deposed controller wrote after its successor: {writers:?}"
    );
    assert!(
        writers
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].2 <= w[1].2),
        "versions or leaderships went backwards: {writers:?}"
    );
    drop((w2, workers, old, new, etcd));
}
