//! The cluster as containers of the shipped image (`MOE_TEST_IMAGE`), faults dealt by
//! Docker: etcd, two workers and two routers (etcd membership, every expert on both
//! workers) on a bridge network of the test's own (a /24 of 198.19.0.0/16, part of the
//! 198.18.0.0/15 benchmarking range). The host reaches the routers only through ports
//! published on 127.0.0.1; the containers reach only each other (no NAT out).
//!
//! Under load (greedy streams, back to back, through the router that is not the
//! controller), in sequence:
//! 1. `docker kill` a worker: routed around; `docker start` it: placed again;
//! 2. `docker pause` a worker: routed around; `docker unpause`: it rejoins;
//! 3. `docker network disconnect` a worker: routed around; `connect` (same IP): rejoins;
//! 4. `docker stop` a worker: SIGTERM reaches `moe`, PID 1, which hands its experts over
//!    and exits 0;
//! 5. `docker kill` the controller router: the other one is elected, keeps serving, and
//!    acts as controller (the stopped worker, started again, is given experts by it).
//!
//! Throughout, no request fails and every stream's tokens and logprobs are those of the
//! offline reference. Each worker's advertised address in the routers' membership is its
//! container IP on the test network, not 0.0.0.0. Recovery times, and any moment the
//! load router's readiness said 503 (see [`under_load`]), are logged, not bounded.
//!
//! `MOE_TEST_IMAGE` unset fails the test saying how to build the image; set to "" it
//! skips (scripts/test.sh with MOE_SKIP_CONTAINERS=1). etcd comes from the local image
//! `moe-test-etcd:3.4` (scripts/images/etcd.Dockerfile, made by scripts/base-images.sh).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moe_tests::cluster::{assert_streams_match, hosted_by, keep_streaming, varied_reqs};
use moe_tests::docker::{generate_in_container, require_image, test_image, Docker};
use moe_tests::{http, metric_sum, metric_value, metrics, wait_until, GreedyReq, Tok};
use serde_json::{json, Value};

const ETCD_IMAGE: &str = "moe-test-etcd:3.4";
const CLUSTER: &str = "containers";
/// Lease TTL of workers and routers.
const TTL_SECS: &str = "2";
const SEED: &str = "83";
const MAX_TOKENS: u32 = 200;
/// Ports inside the containers.
const WORKER_GRPC: u16 = 50061;
const ROUTER_GRPC: u16 = 50051;
/// A bound on every wait for the cluster to notice a change and settle, not a claim
/// about speed (2 cores are shared by five containers and the load).
const SETTLE: Duration = Duration::from_secs(120);
/// How long one streamed request may take.
const PATIENCE: Duration = Duration::from_secs(180);

/// A router container and its published ports on 127.0.0.1.
struct Router {
    name: String,
    grpc: SocketAddr,
    http: SocketAddr,
}

/// The router's `GET /v1/cluster` (placement and membership).
fn status(r: &Router) -> Value {
    let (code, body) = http(r.http, "GET", "/v1/cluster", None);
    assert_eq!(code, 200, "GET /v1/cluster on {}: {body}", r.name);
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/v1/cluster is not JSON ({e}): {body}"))
}

/// True when the router's `GET /health` (readiness) answers 200.
fn ready(r: &Router) -> bool {
    http(r.http, "GET", "/health", None).0 == 200
}

/// True when the router's membership names itself the controller.
fn is_controller(r: &Router) -> bool {
    let m = &status(r)["membership"];
    m["this_router_is_controller"] == json!(true) && m["controller"] == m["router_id"]
}

/// The membership record of worker `id`, per router `r`.
fn member(st: &Value, id: &str) -> Option<Value> {
    st["membership"]["workers"]
        .as_array()?
        .iter()
        .find(|w| w["id"] == id)
        .cloned()
}

/// `r` routes around worker `id`: it hosts nothing, no expert lacks a copy, and `r` is
/// ready.
fn routed_around(r: &Router, id: &str) -> bool {
    let st = status(r);
    hosted_by(&st, id) == 0 && st["missing_experts"] == json!([]) && ready(r)
}

/// `r` routes to worker `id` again: it hosts experts and is routed to, and `r` is ready.
fn placed(r: &Router, id: &str) -> bool {
    let st = status(r);
    hosted_by(&st, id) > 0
        && member(&st, id).is_some_and(|w| w["routed"] == json!(true))
        && ready(r)
}

/// /24s of 198.19.0.0/16 starting at one picked by the pid (tests/src/netns.rs takes
/// /30s anywhere in 198.18.0.0/15, also by pid, skipping addresses already on the host;
/// [`Docker::network`] skips /24s that hold one of theirs).
fn subnets() -> Vec<String> {
    let first = std::process::id() % 256;
    (0..256)
        .map(|i| format!("198.19.{}.0/24", (first + i) % 256))
        .collect()
}

/// The whole run: containers, network, volume, and the reference tokens.
struct Cluster {
    d: Docker,
    image: String,
    net: String,
    etcd_url: String,
    volume: String,
}

impl Cluster {
    /// `moe ARGS` in a container named `what` on the test network with the model volume.
    fn moe(&self, what: &str, publish: &[&str], args: &[&str]) -> String {
        let mount = format!("{}:/models:ro", self.volume);
        let mut options = vec![
            "--network",
            &self.net,
            "-v",
            &mount,
            "-e",
            "MOE_LOG=info",
            "-e",
            "NO_COLOR=1",
        ];
        options.extend_from_slice(publish);
        self.d.run(what, &options, &self.image, args)
    }

    fn worker(&self, id: &str) -> String {
        let membership = [
            "--etcd",
            &self.etcd_url,
            "--cluster",
            CLUSTER,
            "--lease-ttl-secs",
            TTL_SECS,
        ];
        let args = [
            &[
                "worker",
                "--insecure",
                "--model",
                "/models/dsv3",
                "--devices",
                "cpu:0",
                "--listen",
                "0.0.0.0:50061",
                "--http-listen",
                "0.0.0.0:9461",
                "--worker-id",
                id,
                "--leave-timeout-secs",
                "20",
            ][..],
            &membership,
        ]
        .concat();
        self.moe(id, &[], &args)
    }

    /// A router container; returns once it printed its ready line and `/health` is 200.
    fn router(&self, what: &str) -> Router {
        let args = [
            "router",
            "--insecure",
            "--model",
            "/models/dsv3",
            "--listen",
            "0.0.0.0:50051",
            "--http-listen",
            "0.0.0.0:8080",
            "--etcd",
            &self.etcd_url,
            "--cluster",
            CLUSTER,
            "--lease-ttl-secs",
            TTL_SECS,
            "--expert-replicas",
            "2",
            "--min-workers",
            "2",
            // A frozen or cut-off copy is given up on after 1 s and the dispatch retried on
            // the other copy (the default, 10 s, only makes the run longer).
            "--dispatch-timeout-ms",
            "1000",
        ];
        let publish = ["-p", "127.0.0.1::50051", "-p", "127.0.0.1::8080"];
        let name = self.moe(what, &publish, &args);
        self.wait_log(&name, "moe router listening ", 1);
        let r = Router {
            grpc: self.d.port(&name, "50051/tcp"),
            http: self.d.port(&name, "8080/tcp"),
            name,
        };
        self.wait(&format!("{} ready", r.name), || ready(&r));
        r
    }

    /// Waits until `needle` appears `count` times in the container's logs.
    fn wait_log(&self, container: &str, needle: &str, count: usize) {
        self.wait(&format!("{container} logging {needle:?}"), || {
            self.d.logs(container).matches(needle).count() >= count
        });
    }

    /// Waits (at most [`SETTLE`]) until `cond` holds; panics naming `what`.
    fn wait(&self, what: &str, cond: impl FnMut() -> bool) {
        assert!(wait_until(SETTLE, cond), "{what}: not within {SETTLE:?}");
    }

    /// Asserts that router `r` knows worker `id` at its container IP on the test network.
    fn assert_advertised_ip(&self, r: &Router, id: &str) {
        let ip = self.d.ip(&self.d.name(id), &self.net);
        assert!(!ip.is_empty(), "{id} has no address on {}", self.net);
        let st = status(r);
        let w = member(&st, id).unwrap_or_else(|| panic!("{id} not in the membership: {st:#}"));
        assert_eq!(
            w["address"],
            json!(format!("{ip}:{WORKER_GRPC}")),
            "{id} advertises something else than its container IP on the test network: {w}"
        );
    }
}

/// Polls `router`'s `/health` every 50 ms until `stop` is set; returns each window in
/// which it was not ready: how long, and the reasons it gave.
fn watch_readiness(
    router: SocketAddr,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<(Duration, String)>> {
    std::thread::spawn(move || {
        let mut windows = Vec::new();
        let mut open: Option<(Instant, String)> = None;
        while !stop.load(Ordering::SeqCst) {
            let (code, body) = http(router, "GET", "/health", None);
            match (code == 200, open.take()) {
                (true, Some((since, why))) => windows.push((since.elapsed(), why)),
                (true, None) => {}
                (false, Some((since, mut why))) => {
                    if !why.contains(body.trim()) {
                        why = format!("{why}; {}", body.trim());
                    }
                    open = Some((since, why));
                }
                (false, None) => open = Some((Instant::now(), body.trim().to_owned())),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        windows.extend(open.map(|(since, why)| (since.elapsed(), why)));
        windows
    })
}

/// Streams `reqs` through `via` batch after batch while `strike` runs (it starts once
/// requests are running); then asserts every batch matches `want` and that `via` counted
/// no failed request.
///
/// `via`'s readiness is watched meanwhile: with one fault at a time and every expert on
/// both workers, some copy is always live, so it must stay ready throughout (a worker the
/// routes take back in is no longer skipped as marked down).
async fn under_load(
    phase: &str,
    via: &Router,
    reqs: &[GreedyReq],
    want: &[Vec<Tok>],
    strike: impl FnOnce(),
) {
    eprintln!("[{phase}] under load through {}", via.name);
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let watch = watch_readiness(via.http, stop.clone());
    let load = keep_streaming(
        via.grpc,
        reqs,
        PATIENCE,
        stop.clone(),
        Arc::new(AtomicUsize::new(0)),
    );
    // The docker commands and the polling block: off the runtime's other thread, which
    // keeps the streams flowing.
    tokio::task::block_in_place(|| {
        assert!(
            wait_until(SETTLE, || metric_value(
                &metrics(via.http),
                "moe_num_requests_running"
            )
            .unwrap_or(0.0)
                > 0.0),
            "[{phase}] no request started through {}",
            via.name
        );
        strike();
    });
    stop.store(true, Ordering::SeqCst);
    let batches = load.await.expect("load task");
    let not_ready = watch.join().expect("readiness watcher");
    for (how_long, why) in &not_ready {
        eprintln!(
            "[{phase}] {} was NOT READY for {how_long:.1?} although a live copy of every \
             expert existed: {why}",
            via.name
        );
    }
    assert!(
        not_ready.is_empty(),
        "[{phase}] {} reported not ready while a live copy of every expert existed: {not_ready:?}",
        via.name
    );
    assert!(!batches.is_empty(), "[{phase}] no batch ran");
    let n = batches.len();
    for (i, got) in batches.into_iter().enumerate() {
        assert_streams_match(&format!("[{phase}] batch {i}"), want, got, MAX_TOKENS);
    }
    let text = metrics(via.http);
    let failed = metric_sum(&text, "moe_requests_total")
        - metric_value(&text, "moe_requests_total{outcome=\"ok\"}").unwrap_or(0.0);
    assert_eq!(failed, 0.0, "[{phase}] requests did not end ok:\n{text}");
    eprintln!(
        "[{phase}] done in {:.1?}: {n} batch(es) of {} streams, every token as offline; \
         dispatch retries so far {}",
        started.elapsed(),
        reqs.len(),
        metric_sum(&text, "moe_dispatch_retries_total")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_containerised_cluster_survives_docker_faults_without_failing_a_request() {
    let Some(image) = test_image("containers_faults") else {
        return;
    };
    require_image(&image, "build it with scripts/build-image.sh");
    require_image(ETCD_IMAGE, "make it with `bash scripts/base-images.sh`");
    let t0 = Instant::now();
    let d = Docker::new("cf");
    let (net, subnet) = d.network("net", &subnets());
    eprintln!("network {net} on {subnet}");

    // The model: a volume filled once by the image itself, readable by its user 10001.
    let volume = d.volume("models");
    d.run_once(
        &[
            "--user",
            "0",
            "-v",
            &format!("{volume}:/models"),
            "--entrypoint",
            "sh",
        ],
        &image,
        &[
            "-c",
            &format!(
                "moe checkpoint new --log warn --arch deepseek_v3 --out /models/dsv3 --seed {SEED} \
                 && chmod -R a+rX /models"
            ),
        ],
        "",
    );
    // The reference: `moe generate` in a container of the same image on the same volume,
    // so that reference and cluster run the very same binary.
    let reqs = varied_reqs(4, 11, MAX_TOKENS);
    let want = generate_in_container(
        &d,
        &image,
        &format!("{volume}:/models:ro"),
        "/models/dsv3",
        &reqs,
    );

    let etcd = d.name("etcd");
    d.run(
        "etcd",
        &["--network", &net],
        ETCD_IMAGE,
        &[
            "--name",
            "default",
            "--data-dir",
            "/tmp/etcd",
            "--listen-client-urls",
            "http://0.0.0.0:2379",
            "--advertise-client-urls",
            &format!("http://{etcd}:2379"),
        ],
    );
    let c = Cluster {
        d,
        image,
        net,
        etcd_url: format!("http://{etcd}:2379"),
        volume,
    };
    c.wait_log(&etcd, "ready to serve client requests", 1);

    let (w0, w1) = (c.worker("w0"), c.worker("w1"));
    let ra = c.router("ra");
    let rb = c.router("rb");
    c.wait("one controller elected", || {
        is_controller(&ra) != is_controller(&rb)
    });
    let (controller, follower) = if is_controller(&ra) {
        (ra, rb)
    } else {
        (rb, ra)
    };
    eprintln!(
        "cluster up in {:.1?}: controller {}, load through {}",
        t0.elapsed(),
        controller.name,
        follower.name
    );
    for id in ["w0", "w1"] {
        c.wait(&format!("{id} placed"), || placed(&follower, id));
        c.assert_advertised_ip(&follower, id);
        c.assert_advertised_ip(&controller, id);
    }
    // The routers advertise their own container IPs too.
    for r in [&controller, &follower] {
        let ip = c.d.ip(&r.name, &c.net);
        let st = status(r);
        let routers = st["membership"]["routers"].as_array().cloned();
        assert!(
            routers
                .unwrap_or_default()
                .iter()
                .any(|x| x["address"] == json!(format!("{ip}:{ROUTER_GRPC}"))),
            "{} is not in the membership at {ip}:{ROUTER_GRPC}: {st:#}",
            r.name
        );
    }

    under_load("docker kill w0", &follower, &reqs, &want, || {
        let at = Instant::now();
        c.d.kill(&w0);
        c.wait("killed w0 routed around", || routed_around(&follower, "w0"));
        eprintln!(
            "[docker kill w0] routed around {:.1?} after the kill",
            at.elapsed()
        );
        let at = Instant::now();
        c.d.start(&w0);
        c.wait("restarted w0 placed again", || placed(&follower, "w0"));
        eprintln!(
            "[docker kill w0] placed again {:.1?} after docker start",
            at.elapsed()
        );
        c.assert_advertised_ip(&follower, "w0");
    })
    .await;

    under_load("docker pause w1", &follower, &reqs, &want, || {
        let at = Instant::now();
        c.d.pause(&w1);
        c.wait("paused w1 routed around", || routed_around(&follower, "w1"));
        eprintln!(
            "[docker pause w1] routed around {:.1?} after the pause",
            at.elapsed()
        );
        let at = Instant::now();
        c.d.unpause(&w1);
        c.wait("unpaused w1 placed again", || placed(&follower, "w1"));
        eprintln!(
            "[docker pause w1] placed again {:.1?} after the unpause",
            at.elapsed()
        );
    })
    .await;

    under_load("network disconnect w0", &follower, &reqs, &want, || {
        let ip = c.d.ip(&w0, &c.net);
        let at = Instant::now();
        c.d.disconnect(&c.net, &w0);
        c.wait("cut-off w0 routed around", || {
            routed_around(&follower, "w0")
        });
        eprintln!(
            "[network disconnect w0] routed around {:.1?} after the disconnect",
            at.elapsed()
        );
        let at = Instant::now();
        c.d.connect(&c.net, &w0, &ip);
        c.wait("reconnected w0 placed again", || placed(&follower, "w0"));
        eprintln!(
            "[network disconnect w0] placed again {:.1?} after the connect",
            at.elapsed()
        );
        c.assert_advertised_ip(&follower, "w0");
    })
    .await;

    under_load("docker stop w1", &follower, &reqs, &want, || {
        // The drain below is the binary's own: it is PID 1 of its container.
        assert_eq!(c.d.exec(&w1, &["cat", "/proc/1/comm"]), "moe");
        let at = Instant::now();
        c.d.stop(&w1, Duration::from_secs(90));
        eprintln!("[docker stop w1] exited {:.1?} after SIGTERM", at.elapsed());
        let code = c.d.exit_code(&w1);
        let log = c.d.logs(&w1);
        assert_eq!(code, 0, "w1 did not exit cleanly on docker stop:\n{log}");
        assert!(
            log.contains("experts handed over"),
            "w1 left before its experts were placed elsewhere:\n{log}"
        );
        c.wait("stopped w1 routed around", || {
            routed_around(&follower, "w1")
        });
    })
    .await;

    // The controller may have changed hands meanwhile: strike whichever leads now.
    let (controller, survivor) = if is_controller(&controller) {
        (controller, follower)
    } else {
        (follower, controller)
    };
    let dead_id = status(&controller)["membership"]["router_id"].clone();
    under_load(
        "docker kill the controller",
        &survivor,
        &reqs,
        &want,
        || {
            let at = Instant::now();
            c.d.kill(&controller.name);
            c.wait(&format!("{} elected controller", survivor.name), || {
                is_controller(&survivor)
            });
            eprintln!(
                "[docker kill the controller] {} took over {:.1?} after the kill",
                survivor.name,
                at.elapsed()
            );
            // The new controller acts: the stopped worker, started again, gets experts.
            let at = Instant::now();
            c.d.start(&w1);
            c.wait("w1 placed by the new controller", || {
                placed(&survivor, "w1")
            });
            eprintln!(
                "[docker kill the controller] restarted w1 placed by {} {:.1?} after docker start",
                survivor.name,
                at.elapsed()
            );
            c.assert_advertised_ip(&survivor, "w1");
            c.wait("the dead router's presence expired", || {
                let st = status(&survivor);
                let routers = st["membership"]["routers"].as_array().cloned();
                !routers
                    .unwrap_or_default()
                    .iter()
                    .any(|r| r["id"] == dead_id)
            });
        },
    )
    .await;
    assert!(c.d.is_running(&w0), "w0 is not running at the end");
    eprintln!("all phases passed in {:.1?}", t0.elapsed());
}
