//! The router's status page (`GET /`) in a real browser: with etcd, a router and two
//! workers under a little traffic, headless Chromium shows both workers ready, draws the
//! expert-load heatmap with one cell per (MoE layer, expert) of the model and some heat
//! in it, and, once one worker is killed with SIGKILL, marks that worker down. The page's
//! worker-state rules are also run on a fixture in the browser (`window.MoeStatus`).
//!
//! Screenshots go to `target/test-artifacts/` (`status-page.png`: both workers up under
//! traffic; `status-page-worker-down.png`: after the kill); docs/status-page.png is a copy
//! of the first. Chromium is Debian's `chromium` (`scripts/chromium.sh` installs it when
//! missing; `$MOE_CHROMIUM` names another). It is driven over the DevTools protocol on
//! `--remote-debugging-pipe` (NUL-separated JSON on file descriptors 3 and 4), which
//! needs no port and no websocket client.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use moe_tests::cluster::{
    cluster_status, etcd_router, keep_streaming, member_args, varied_reqs, worker_id, Etcd,
};
use moe_tests::python::repo_root;
use moe_tests::{http, tiny_checkpoint, wait_until, Proc, PATIENCE};
use serde_json::{json, Value};

const CLUSTER: &str = "statuspage";
/// Lease TTL of the workers: the membership notices a death within about this.
const TTL_SECS: &str = "2";
/// How long the page may take to show what happened (it refreshes every 1.5 s).
const DEADLINE: Duration = Duration::from_secs(90);
/// How long one DevTools command may take.
const CALL_DEADLINE: Duration = Duration::from_secs(30);
const VIEWPORT: (u32, u32) = (1400, 900);

/// What the page shows, read from the data attributes it sets for tests.
const SNAPSHOT_JS: &str = r#"JSON.stringify((() => {
  const h = document.getElementById("heatmap").dataset;
  return {
    updates: Number(document.body.dataset.updates || 0),
    error: document.body.dataset.error || null,
    cells: h.heatmapCells || null, drawn: Number(h.drawn || 0), heat_max: Number(h.max || 0),
    placement_cells: document.getElementById("placement").dataset.cells || null,
    points: Number(document.getElementById("s-tok").dataset.points || 0),
    ready: document.getElementById("ready").textContent,
    workers: Object.fromEntries([...document.querySelectorAll("tr[data-worker]")]
      .map(r => [r.dataset.worker, r.dataset.state])),
  };
})())"#;

/// The page's state rules on fixtures. With etcd: draining, routed, loading, registered
/// but not placed, placed but not registered, and vanished since the previous refresh.
/// Static (`--workers`): routed, silent, loading, answering but not placed.
const RULES_JS: &str = r#"JSON.stringify((() => {
  const c = { devices: [
      { worker: "a", device: "cpu:0", experts: [[1, 0]], tokens: 1 },
      { worker: "e", device: "cpu:0", experts: [[1, 1]], tokens: 1 } ],
    membership: { workers: [
      { id: "a", address: "A", devices: ["cpu:0"], draining: false, routed: true },
      { id: "b", address: "B", devices: ["cpu:0"], draining: true, routed: true },
      { id: "c", address: "C", devices: ["cpu:0"], draining: false, routed: false },
      { id: "d", address: "D", devices: ["cpu:0"], draining: false, routed: false } ],
      loading: { devices: [{ worker: "c", device: "cpu:0", experts: [] }] }, routers: [] } };
  const prev = [{ id: "f", address: "F", devices: [], state: "ready", detail: "" }];
  const fixed = { devices: [
      { worker: "p", device: "cpu:0", experts: [[1, 0]], tokens: 1 },
      { worker: "q", device: "cpu:0", experts: [[1, 1]], tokens: 1 } ],
    static_workers: [
      { address: "p", answering: true, routed: true, hosted: 1, assigned: 1 },
      { address: "q", answering: false, routed: true, hosted: null, assigned: 1 },
      { address: "r", answering: true, routed: false, hosted: 0, assigned: 1 },
      { address: "s", answering: true, routed: false, hosted: 0, assigned: 0 } ] };
  const states = s => Object.fromEntries(s.map(w => [w.id, w.state]));
  return { etcd: states(MoeStatus.workerStates(c, prev)),
           static: states(MoeStatus.workerStates(fixed, [])) };
})())"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_cluster_and_a_killed_worker_goes_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 31);
    let etcd = Etcd::start();
    let endpoint = etcd.endpoint();
    let member = member_args(&endpoint, CLUSTER, &["--lease-ttl-secs", TTL_SECS]);
    let w1 = Proc::worker(&model, "cpu:0,cpu:1", &member);
    let w2 = Proc::worker(&model, "cpu:0", &member);
    let router = etcd_router(&model, &endpoint, CLUSTER, &["--min-workers", "2"]);
    assert!(
        wait_until(PATIENCE, || http(router.http, "GET", "/health", None).0
            == 200),
        "the router never became ready"
    );
    let (id1, id2) = (worker_id(&w1), worker_id(&w2));

    // GET /v1/status: the model's grid, and counters that start at zero traffic.
    let status = get_json(router.http, "/v1/status");
    let layers = status["model"]["moe_layers"].as_array().map_or(0, Vec::len);
    let experts = status["model"]["num_experts"].as_u64().unwrap_or(0) as usize;
    assert!(layers > 0 && experts > 0, "{status}");
    assert_eq!(status["ready"], true, "{status}");
    assert_eq!(status["generated_tokens"], 0, "{status}");
    let grid = cluster_status(&router)["experts"]
        .as_array()
        .map_or(0, Vec::len);
    assert_eq!(
        grid,
        layers * experts,
        "/v1/cluster and /v1/status disagree"
    );
    let cells = format!("{layers}x{experts}");

    let (code, body) = http(router.http, "GET", "/", None);
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("<canvas id=\"heatmap\">"),
        "GET / is not the page"
    );

    // A little traffic, kept flowing while the page watches.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let reqs = varied_reqs(3, 1, 24);
    let load = keep_streaming(router.grpc, &reqs, PATIENCE, stop.clone(), done.clone());

    let mut page = Browser::open(&format!("http://{}/", router.http));
    let shown = page.wait_for("both workers ready and the heatmap drawn with heat", |v| {
        v["cells"] == cells.as_str()
            && v["drawn"].as_u64() >= Some(2)
            && v["heat_max"].as_f64() > Some(0.0)
            && v["points"].as_u64() >= Some(3)
            && v["workers"][&id1] == "ready"
            && v["workers"][&id2] == "ready"
    });
    assert_eq!(shown["placement_cells"], cells.as_str(), "{shown}");
    assert_eq!(shown["ready"], "ready", "{shown}");
    assert_eq!(
        shown["workers"].as_object().map(|w| w.len()),
        Some(2),
        "{shown}"
    );
    let rules = page.eval_json(RULES_JS);
    assert_eq!(
        rules,
        json!({
            "etcd": {"a": "ready", "b": "draining", "c": "joining", "d": "joining", "e": "down", "f": "down"},
            "static": {"p": "ready", "q": "down", "r": "joining", "s": "joining"},
        })
    );
    let artifacts = artifacts_dir();
    page.screenshot(&artifacts.join("status-page.png"));

    stop.store(true, Ordering::SeqCst);
    let batches = load.await.expect("traffic task");
    assert!(
        done.load(Ordering::SeqCst) > 0,
        "no batch of traffic finished"
    );
    for (i, r) in batches.iter().flatten().enumerate() {
        assert!(r.is_ok(), "request {i} of the traffic failed: {r:?}");
    }

    w2.signal("KILL");
    let after = page.wait_for("the killed worker marked down", |v| {
        v["workers"][&id2] == "down" && v["workers"].get(&id1).is_some()
    });
    eprintln!("after the kill the page shows {after}");
    page.screenshot(&artifacts.join("status-page-worker-down.png"));
    drop(page);
    drop(router);
    drop((w1, w2));
    drop(etcd);
}

fn get_json(addr: std::net::SocketAddr, path: &str) -> Value {
    let (code, body) = http(addr, "GET", path, None);
    assert_eq!(code, 200, "GET http://{addr}{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path} is not JSON ({e}): {body}"))
}

/// `$CARGO_TARGET_DIR/test-artifacts` (default `target/test-artifacts`), created.
fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// `$MOE_CHROMIUM`, else what `scripts/chromium.sh` prints (it installs Debian's
/// chromium when none is on PATH).
fn chromium() -> String {
    moe_tests::python::tool_path("MOE_CHROMIUM", "chromium.sh")
}

/// One headless Chromium with one page, driven over the DevTools protocol on a pipe.
/// Dropping it closes the browser (killing it if it does not exit).
struct Browser {
    child: Child,
    commands: ChildStdin,
    replies: mpsc::Receiver<Value>,
    next_id: u64,
    /// The page's DevTools session.
    session: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium, opens a page at `url` in a [`VIEWPORT`]-sized window.
    fn open(url: &str) -> Browser {
        let bin = chromium();
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("chromium.log");
        let profile = dir.path().join("profile");
        // DevTools reads commands on fd 3 and writes replies on fd 4: the shell moves our
        // stdin/stdout pipes there before it execs the browser.
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>&2"#)
            .arg(&bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-extensions",
                "--disable-background-networking",
                "--no-first-run",
                "--no-default-browser-check",
                "--hide-scrollbars",
                "--remote-debugging-pipe",
                &format!("--user-data-dir={}", profile.display()),
                "about:blank",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("create chromium log"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
        let commands = child.stdin.take().expect("piped stdin");
        let mut out = child.stdout.take().expect("piped stdout");
        let (tx, replies) = mpsc::channel();
        std::thread::spawn(move || {
            let (mut buf, mut chunk) = (Vec::new(), vec![0u8; 1 << 16]);
            while let Ok(n @ 1..) = out.read(&mut chunk) {
                buf.extend_from_slice(&chunk[..n]);
                while let Some(end) = buf.iter().position(|b| *b == 0) {
                    let msg: Vec<u8> = buf.drain(..=end).collect();
                    if let Ok(v) = serde_json::from_slice::<Value>(&msg[..end]) {
                        if tx.send(v).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let mut b = Browser {
            child,
            commands,
            replies,
            next_id: 1,
            session: String::new(),
            log,
            _dir: dir,
        };
        let target = b.call("Target.createTarget", json!({"url": "about:blank"}));
        let attached = b.call(
            "Target.attachToTarget",
            json!({"targetId": target["targetId"], "flatten": true}),
        );
        b.session = attached["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no sessionId in {attached}"))
            .to_owned();
        b.resize(VIEWPORT.1);
        b.call("Page.navigate", json!({"url": url}));
        b
    }

    /// Sends one command (to the page's session once there is one); its id.
    fn send(&mut self, method: &str, params: Value) -> std::io::Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(0);
        self.commands.write_all(&bytes)?;
        self.commands.flush()?;
        Ok(id)
    }

    /// Runs one command and returns its result; panics (with the browser's log) on an
    /// error or when no answer comes within [`CALL_DEADLINE`].
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self
            .send(method, params)
            .unwrap_or_else(|e| panic!("{method}: chromium's pipe: {e}\n{}", self.log()));
        let deadline = Instant::now() + CALL_DEADLINE;
        loop {
            match self
                .replies
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(v) if v["id"] == id => {
                    if let Some(e) = v.get("error") {
                        panic!("{method} failed: {e}");
                    }
                    return v["result"].clone();
                }
                Ok(_) => {} // an event, or the answer to another command
                Err(e) => panic!("no answer to {method} ({e:?})\n{}", self.log()),
            }
        }
    }

    /// Evaluates an expression that returns JSON text in the page; its value.
    fn eval_json(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true}),
        );
        if let Some(e) = r.get("exceptionDetails") {
            panic!("the page threw: {e}");
        }
        let text = r["result"]["value"].as_str().unwrap_or("null");
        serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    }

    /// Polls what the page shows until `cond` holds; panics after [`DEADLINE`] with the
    /// last view. A page still loading (its script not run yet) reads as `null`.
    fn wait_for(&mut self, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
        let probe = format!(
            "(document.getElementById('heatmap') && window.MoeStatus) ? {SNAPSHOT_JS} : 'null'"
        );
        let mut v = Value::Null;
        let shown = wait_until(DEADLINE, || {
            v = self.eval_json(&probe);
            cond(&v)
        });
        assert!(
            shown,
            "the page did not show {what} within {DEADLINE:?}; it shows {v}"
        );
        v
    }

    /// Sets the viewport to [`VIEWPORT`]'s width and `height`.
    fn resize(&mut self, height: u32) {
        let (width, _) = VIEWPORT;
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        );
    }

    /// Saves a PNG of the whole page (the viewport grown to the document's height).
    fn screenshot(&mut self, path: &Path) {
        let h = self.eval_json("JSON.stringify(document.documentElement.scrollHeight)");
        let height = h.as_u64().unwrap_or(u64::from(VIEWPORT.1));
        self.resize(u32::try_from(height).unwrap_or(VIEWPORT.1).max(VIEWPORT.1));
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let data = shot["data"].as_str().expect("screenshot data");
        std::fs::write(path, unbase64(data))
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        eprintln!("screenshot: {}", path.display());
        self.resize(VIEWPORT.1);
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.session.clear();
        let _ = self.send("Browser.close", json!({}));
        let closed = wait_until(Duration::from_secs(10), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        if !closed {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- chromium log:\n{}", self.log());
        }
    }
}

/// The bytes of standard base64 (DevTools sends screenshots so).
fn unbase64(s: &str) -> Vec<u8> {
    let val = |c: u8| -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        }))
    };
    let digits: Vec<u32> = s.bytes().filter_map(val).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, d)| n | d << (18 - 6 * i));
        for i in 0..chunk.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}
