//! Failure rule 6: two routers share a cluster; the elected placement controller is
//! killed with SIGKILL while the other router streams greedy requests. The survivor
//! takes over the election once the dead one's lease expires, keeps serving with
//! identical tokens throughout, and acts as controller: a worker that joins afterwards
//! gets experts from it. Every placement ever written (read back from etcd's history)
//! was written by one leadership at a time: versions rise, and once a newer leadership
//! wrote, an older one never wrote again (the writes are fenced by the leadership).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use moe_tests::cluster::{assert_streams_match, Etcd, Streams};
use moe_tests::{
    generate_offline, http, metric_value, metrics, path_str, tiny_checkpoint, wait_until,
    GreedyReq, Proc,
};
use serde_json::Value;

const MAX_TOKENS: u32 = 300;
/// Lease TTL of routers and workers.
const TTL_SECS: &str = "2";
const CLUSTER: &str = "t6";

fn router(model: &std::path::Path, endpoint: &str, id: &str) -> Proc {
    Proc::start(&[
        "router",
        "--model",
        path_str(model),
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--etcd",
        endpoint,
        "--cluster",
        CLUSTER,
        "--router-id",
        id,
        "--lease-ttl-secs",
        TTL_SECS,
        "--min-workers",
        "2",
        "--expert-replicas",
        "1",
    ])
}

fn is_leader(p: &Proc) -> bool {
    metric_value(&metrics(p.http), "moe_controller_is_leader") == Some(1.0)
}

/// Every value the key has had, oldest first, read revision by revision over etcd's
/// JSON gateway.
fn history(etcd: &Etcd, key: &str) -> Vec<Value> {
    let addr: SocketAddr = etcd
        .endpoint()
        .trim_start_matches("http://")
        .parse()
        .expect("etcd address");
    let range = |rev: i64| -> Value {
        let body = format!(
            "{{\"key\":\"{}\",\"revision\":\"{rev}\"}}",
            b64(key.as_bytes())
        );
        let (code, text) = http(addr, "POST", "/v3/kv/range", Some(&body));
        assert_eq!(code, 200, "range {body}: {text}");
        serde_json::from_str(&text).expect("JSON")
    };
    let head: i64 = range(0)["header"]["revision"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .expect("header revision");
    let mut seen = Vec::new();
    let mut last_mod = String::new();
    for rev in 1..=head {
        let v = range(rev);
        let Some(kv) = v["kvs"].as_array().and_then(|a| a.first()) else {
            continue;
        };
        let m = kv["mod_revision"].as_str().unwrap_or_default().to_owned();
        if m == last_mod {
            continue;
        }
        last_mod = m;
        let raw = unb64(kv["value"].as_str().expect("value"));
        seen.push(serde_json::from_slice(&raw).expect("placement JSON"));
    }
    seen
}

fn b64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn unb64(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let clean: Vec<u8> = s.bytes().filter(|c| *c != b'=').collect();
    let mut out = Vec::new();
    for chunk in clean.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= val(*c) << (18 - 6 * i);
        }
        for i in 0..chunk.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

/// Workers hosting at least one expert, per `GET /v1/cluster`.
fn hosting_workers(router: &Proc) -> Vec<String> {
    let (code, body) = http(router.http, "GET", "/v1/cluster", None);
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("JSON");
    let mut w: Vec<String> = v["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["experts"].as_array().is_some_and(|e| !e.is_empty()))
        .filter_map(|d| d["worker"].as_str().map(str::to_owned))
        .collect();
    w.dedup();
    w
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_controller_is_replaced_and_placements_never_interleave() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 61);
    let reqs: Vec<GreedyReq> = (0..3u32)
        .map(|r| {
            let ids = (0..5 + 4 * r)
                .map(|j| (3 + 31 * j + 17 * r) % 500 + 2)
                .collect();
            GreedyReq::ids(ids, MAX_TOKENS).with_logprobs(1)
        })
        .collect();
    let want = generate_offline(&model, &reqs);

    let etcd = Etcd::start();
    let endpoint = etcd.endpoint();
    let member = [
        "--etcd",
        &endpoint,
        "--cluster",
        CLUSTER,
        "--lease-ttl-secs",
        TTL_SECS,
    ];
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
    let mut a = router(&model, &endpoint, "ra");
    let b = router(&model, &endpoint, "rb");
    assert!(
        is_leader(&a),
        "the first router did not lead:\n{}",
        a.describe()
    );
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
        text.contains("controller rb | this router rb (controller)"),
        "{text}"
    );
    assert!(text.contains("worker w2"), "{text}");
    assert!(!text.contains("router ra"), "{text}");

    let placements = history(&etcd, &format!("/moe/{CLUSTER}/placement"));
    let writers: Vec<(u64, String, i64)> = placements
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
        .collect();
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
        by("ra") >= 1 && by("rb") >= 1,
        "both routers should have published: {writers:?}"
    );
    let metrics_b = metrics(b.http);
    assert!(
        metric_value(&metrics_b, "moe_controller_leader_changes_total").unwrap_or(0.0) >= 2.0,
        "the follower did not count the change of leader:\n{metrics_b}"
    );
    drop((w0, w1, w2, b, etcd));
}
