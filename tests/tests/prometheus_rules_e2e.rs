//! The dashboard and the rules against a real Prometheus (Debian's `prometheus`)
//! scraping a real cluster: etcd, a router with `--etcd` and two workers, under traffic.
//! Through Prometheus' HTTP API: every panel query of `deploy/grafana/moe-cluster.json`
//! (as `scripts/check-monitoring.sh` writes them out, variables substituted) returns
//! data (the failure panels once one worker is SIGKILLed under load), and every rule of
//! `deploy/prometheus/rules.yaml` evaluates without error. Then the other worker is
//! killed too, so the experts have no live copy left, and
//! `MoeExpertWithoutLiveCopy` fires in `/api/v1/alerts` (the test's copy of the rules
//! has `for: 0s`, the shipped file's `for:` would make the test wait a minute).

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moe_tests::cluster::{etcd_router, keep_streaming, member_args, varied_reqs, Etcd};
use moe_tests::python::repo_root;
use moe_tests::{http, tiny_checkpoint, wait_until, Proc, PATIENCE};
use serde_json::Value;

const CLUSTER: &str = "promtest";
/// How long Prometheus may take to gather what a check needs.
const GATHER: Duration = Duration::from_secs(120);

/// A Prometheus server on a free loopback port, stopped on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(router: SocketAddr, workers: &[SocketAddr]) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let rules = std::fs::read_to_string(repo_root().join("deploy/prometheus/rules.yaml"))
            .expect("deploy/prometheus/rules.yaml");
        // Alerts fire at once here; the expressions are the shipped ones.
        let rules: String = rules
            .lines()
            .map(|l| match l.trim_start().strip_prefix("for:") {
                Some(_) => format!("{}for: 0s", &l[..l.len() - l.trim_start().len()]),
                None => l.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(dir.path().join("rules.yaml"), rules).expect("write rules");
        let targets = |addrs: &[SocketAddr]| {
            addrs
                .iter()
                .map(|a| format!("'{a}'"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files: ['rules.yaml']\n\
             scrape_configs:\n\
             - job_name: router\n  static_configs: [{{targets: [{}]}}]\n\
             - job_name: worker\n  static_configs: [{{targets: [{}]}}]\n",
            targets(&[router]),
            targets(workers)
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).expect("write config");
        // Prometheus cannot report a port it picked: take a free one and hand it over.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
        let child = Command::new("prometheus")
            .current_dir(dir.path())
            .arg("--config.file=prometheus.yml")
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run `prometheus` ({e}): apt-get install prometheus (scripts/test.sh does)")
            });
        let p = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        assert!(
            wait_until(Duration::from_secs(60), || {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
                    && http(addr, "GET", "/-/ready", None).0 == 200
            }),
            "prometheus not ready:\n{}",
            p.log()
        );
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    fn get(&self, path: &str) -> Value {
        let (code, body) = http(self.addr, "GET", path, None);
        assert_eq!(code, 200, "GET {path}: {body}");
        serde_json::from_str(&body).expect("prometheus JSON")
    }

    /// The result vector of an instant query (`Err` with Prometheus' error).
    fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let q: String = url_encode(expr);
        let (code, body) = http(self.addr, "GET", &format!("/api/v1/query?query={q}"), None);
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if code != 200 || v["status"] != "success" {
            return Err(format!("{code}: {}", v["error"]));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The dashboard's queries, written by scripts/check-monitoring.sh.
fn panel_queries() -> Vec<String> {
    let root = repo_root();
    let out = Command::new("bash")
        .arg(root.join("scripts/check-monitoring.sh"))
        .current_dir(&root)
        .output()
        .expect("run scripts/check-monitoring.sh");
    assert!(
        out.status.success(),
        "check-monitoring.sh failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let file = root.join("target/monitoring/panel-queries.txt");
    std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panels_have_data_rules_evaluate_and_the_no_copy_alert_fires() {
    let queries = panel_queries();
    assert!(queries.len() > 20, "too few panel queries: {queries:?}");
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 23);
    let etcd = Etcd::start();
    let endpoint = etcd.endpoint();
    let member = member_args(&endpoint, CLUSTER, &["--lease-ttl-secs", "2"]);
    let mut w1 = Proc::worker(&model, "cpu:0,cpu:1", &member);
    let mut w2 = Proc::worker(&model, "cpu:0", &member);
    let router = etcd_router(&model, &endpoint, CLUSTER, &["--min-workers", "2"]);
    let prom = Prometheus::start(router.http, &[w1.http, w2.http]);

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let load = keep_streaming(
        router.grpc,
        &varied_reqs(3, 2, 16),
        PATIENCE,
        stop.clone(),
        done.clone(),
    );

    // Every panel query returns data at some point while the cluster serves (rates need
    // two scrapes; the imbalance gauge a window of load). Once the healthy cluster's
    // panels have data, one worker is killed under load, so the failure panels (retries,
    // marked-down workers) get theirs while the controller moves its experts.
    let failure_panels = ["moe_dispatch_retries_total", "moe_worker_marked_down_total"];
    let mut empty: Vec<&String> = queries.iter().collect();
    let mut errors = Vec::new();
    let mut killed = false;
    wait_until(GATHER, || {
        if !killed
            && empty
                .iter()
                .all(|q| failure_panels.iter().any(|f| q.contains(f)))
        {
            w2.signal("KILL");
            killed = true;
        }
        empty.retain(|q| match prom.query(q) {
            Ok(r) => r.is_empty(),
            Err(e) => {
                errors.push(format!("{q}: {e}"));
                false
            }
        });
        empty.is_empty()
    });
    assert!(
        errors.is_empty(),
        "panel queries Prometheus rejects:\n{}",
        errors.join("\n")
    );
    assert!(
        empty.is_empty(),
        "panel queries with no data after {GATHER:?} of traffic:\n{}",
        empty
            .iter()
            .map(|q| q.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Every rule has been evaluated, and none failed.
    let mut bad = Vec::new();
    let evaluated = wait_until(GATHER, || {
        let rules = prom.get("/api/v1/rules");
        bad = rules["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .filter(|r| r["health"] != "ok")
            .map(|r| format!("{} ({}): {}", r["name"], r["health"], r["lastError"]))
            .collect();
        bad.is_empty()
    });
    assert!(
        evaluated,
        "rules not evaluating cleanly:\n{}",
        bad.join("\n")
    );
    let firing = |name: &str| {
        prom.get("/api/v1/alerts")["data"]["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| a["labels"]["alertname"] == name && a["state"] == "firing")
    };
    // The first kill may have left experts without a copy for a moment; once the
    // controller has moved them to the surviving worker, the alert is not firing.
    assert!(
        wait_until(GATHER, || !firing("MoeExpertWithoutLiveCopy")),
        "the no-copy alert keeps firing after the surviving worker took every expert:\n{}",
        router.describe()
    );

    // No worker left: every expert is without a live copy, and the alert says so.
    assert!(killed, "the second worker was never killed");
    w1.signal("KILL");
    let _ = w1.wait_exit(Duration::from_secs(10));
    let _ = w2.wait_exit(Duration::from_secs(10));
    let fired = wait_until(GATHER, || firing("MoeExpertWithoutLiveCopy"));
    stop.store(true, Ordering::SeqCst);
    assert!(
        fired,
        "MoeExpertWithoutLiveCopy did not fire:\n{}\n--- router ---\n{}",
        prom.get("/api/v1/alerts"),
        router.describe()
    );
    load.abort();
}
