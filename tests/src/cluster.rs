//! Fixtures of the fault tests: an `etcd` of the test's own ([`Etcd`]: free loopback
//! ports, a temporary data dir, killed on drop), routers and workers that are members of
//! a cluster on it ([`etcd_router`], [`member_args`]), what a router says of the cluster
//! ([`cluster_status`], [`hosted_by`], [`hosting_workers`]), and greedy requests
//! ([`varied_reqs`]) streamed concurrently ([`Streams`], [`keep_streaming`]) so that a
//! test can strike while tokens are flowing.
//!
//! [`Etcd`] needs the `etcd` binary (Debian `etcd-server`) on `PATH`; `scripts/test.sh`
//! installs it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moe_proto::v1::GenerateResponse;
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{generation_client, metric_value, metrics, GreedyReq, Proc, STARTUP};

/// A free 127.0.0.1 port (bound and released: another process could take it meanwhile).
pub fn free_port() -> u16 {
    // Bound and released: another process could take it meanwhile; start() retries.
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// An etcd server of our own, killed on drop (its log is printed if the test fails).
pub struct Etcd {
    dir: tempfile::TempDir,
    client_port: u16,
    child: Option<Child>,
    command: String,
    /// An address clients may use besides 127.0.0.1 ([`Etcd::start_on`]).
    also_on: Option<String>,
}

impl Etcd {
    /// Starts etcd on free ports and waits until it reports healthy.
    pub fn start() -> Etcd {
        Etcd::start_also_on(None)
    }

    /// Like [`Etcd::start`], but clients may also connect on `ip` (a local address, e.g.
    /// the host's end of a veth pair into a test namespace): see [`Etcd::endpoint_on`].
    pub fn start_on(ip: &str) -> Etcd {
        Etcd::start_also_on(Some(ip))
    }

    /// Tries three times (a free port may be taken meanwhile); panics with the last log.
    fn start_also_on(ip: Option<&str>) -> Etcd {
        let mut last = String::new();
        for _ in 0..3 {
            let mut etcd = Etcd {
                dir: tempfile::tempdir().expect("temp dir"),
                client_port: free_port(),
                child: None,
                command: String::new(),
                also_on: ip.map(str::to_owned),
            };
            match etcd.launch(free_port()) {
                Ok(()) => return etcd,
                Err(e) => last = format!("{e}\n{}", etcd.log()),
            }
        }
        match ip {
            Some(ip) => panic!("etcd did not start on {ip}: {last}"),
            None => panic!("etcd did not start: {last}"),
        }
    }

    /// `http://IP:<client port>` of [`Etcd::start_on`]`(IP)`.
    pub fn endpoint_on(&self) -> String {
        let ip = self
            .also_on
            .as_deref()
            .expect("endpoint_on needs an etcd made by Etcd::start_on");
        format!("http://{ip}:{}", self.client_port)
    }

    /// `http://127.0.0.1:<client port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// The server's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn launch(&mut self, peer_port: u16) -> Result<(), String> {
        let client = self.endpoint();
        let client = match &self.also_on {
            Some(ip) => format!("{client},http://{ip}:{}", self.client_port),
            None => client,
        };
        let peer = format!("http://127.0.0.1:{peer_port}");
        let data = self.dir.path().join("data");
        let args = [
            "--name".to_owned(),
            "default".to_owned(),
            "--data-dir".to_owned(),
            data.display().to_string(),
            "--listen-client-urls".to_owned(),
            client.clone(),
            "--advertise-client-urls".to_owned(),
            client,
            "--listen-peer-urls".to_owned(),
            peer.clone(),
            "--initial-advertise-peer-urls".to_owned(),
            peer.clone(),
            "--initial-cluster".to_owned(),
            format!("default={peer}"),
        ];
        self.command = format!("etcd {}", args.join(" "));
        let log: File = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| e.to_string())?;
        let child = Command::new("etcd")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run etcd (apt-get install etcd-server): {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!("`{}` exited: {status}", self.command));
            }
            if self.healthy() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("`{}` not healthy after 30 s", self.command));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// True when `GET /health` says so.
    fn healthy(&self) -> bool {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.client_port));
        let probe = || -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            write!(
                s,
                "GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
            )?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        };
        probe().is_ok_and(|r| r.contains("\"health\":\"true\""))
    }
}

/// Faults and inspection: etcd killed and brought back on the same ports and data dir,
/// and what it holds under a key (read over its JSON gateway, so tests need no client).
impl Etcd {
    /// Kills etcd with SIGKILL and waits for it to exit; its data dir stays.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again (killing it first if it runs) on the same client and peer ports
    /// with the same data dir, and waits, under launch's deadline, until it reports
    /// healthy; panics with its log otherwise.
    pub fn restart(&mut self) {
        self.kill();
        let peer_port = self
            .command
            .split_whitespace()
            .skip_while(|w| *w != "--listen-peer-urls")
            .nth(1)
            .and_then(|url| url.rsplit(':').next()?.parse::<u16>().ok())
            .unwrap_or_else(|| panic!("no peer port in `{}`", self.command));
        if let Err(e) = self.launch(peer_port) {
            panic!("etcd did not restart: {e}\n{}", self.log());
        }
    }

    /// What etcd holds under `key` (read over its JSON gateway), or `None` when the key
    /// does not exist. Panics if etcd does not answer.
    pub fn entry(&self, key: &str) -> Option<EtcdEntry> {
        let v = self.range(key, 0);
        let kv = v["kvs"].as_array()?.first()?;
        // int64 fields come as strings in etcd's JSON; zero values are left out.
        let int = |field: &str| -> i64 {
            kv[field].as_str().map_or(0, |n| {
                n.parse()
                    .unwrap_or_else(|e| panic!("{field} {n:?} in {v}: {e}"))
            })
        };
        Some(EtcdEntry {
            lease: int("lease"),
            mod_revision: int("mod_revision"),
        })
    }

    /// Every value `key` has had (each parsed as JSON), oldest first, read revision by
    /// revision over etcd's JSON gateway. Panics if etcd does not answer.
    pub fn history(&self, key: &str) -> Vec<Value> {
        let head: i64 = self.range(key, 0)["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .expect("header revision");
        let mut seen = Vec::new();
        let mut last_mod = String::new();
        for rev in 1..=head {
            let v = self.range(key, rev);
            let Some(kv) = v["kvs"].as_array().and_then(|a| a.first()) else {
                continue;
            };
            let m = kv["mod_revision"].as_str().unwrap_or_default().to_owned();
            if m == last_mod {
                continue;
            }
            last_mod = m;
            let raw = unbase64(kv["value"].as_str().expect("value"));
            seen.push(serde_json::from_slice(&raw).unwrap_or_else(|e| {
                panic!(
                    "{key} at revision {rev} is not JSON ({e}): {}",
                    String::from_utf8_lossy(&raw)
                )
            }));
        }
        seen
    }

    /// `POST /v3/kv/range` for `key` as of `revision` (0: the latest), as JSON.
    fn range(&self, key: &str, revision: i64) -> Value {
        let endpoint = self.endpoint();
        let addr: SocketAddr = endpoint
            .trim_start_matches("http://")
            .parse()
            .unwrap_or_else(|e| panic!("etcd endpoint {endpoint}: {e}"));
        let body = format!(
            "{{\"key\":\"{}\",\"revision\":\"{revision}\"}}",
            base64(key.as_bytes())
        );
        let (code, text) = crate::http(addr, "POST", "/v3/kv/range", Some(&body));
        assert_eq!(code, 200, "POST {endpoint}/v3/kv/range {body}: {text}");
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("etcd range answer is not JSON ({e}): {text}"))
    }
}

/// A key as etcd holds it ([`Etcd::entry`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EtcdEntry {
    /// The lease the key is attached to (0: none).
    pub lease: i64,
    /// The revision of its last write: it grows each time the key is put again.
    pub mod_revision: i64,
}

/// Standard base64 with padding (etcd's JSON gateway carries keys and values so).
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ABC[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The bytes of standard base64 (padding optional); panics on any other character.
fn unbase64(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {:?} in {s:?}", char::from(c)),
        }
    };
    let clean: Vec<u8> = s.bytes().filter(|c| *c != b'=').collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
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

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- ran: {}\n--- etcd log:\n{}", self.command, self.log());
        }
    }
}

/// `--etcd ENDPOINT --cluster CLUSTER` and then `extra` (e.g. `--lease-ttl-secs`,
/// `--worker-id`): the flags that make a worker a member of `cluster`.
pub fn member_args<'a>(endpoint: &'a str, cluster: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--etcd", endpoint, "--cluster", cluster];
    args.extend_from_slice(extra);
    args
}

/// `moe router --model MODEL --etcd ENDPOINT --cluster CLUSTER` on free local ports, plus
/// `extra` flags: a router that finds its workers (and placements) through etcd.
pub fn etcd_router(model: &Path, endpoint: &str, cluster: &str, extra: &[&str]) -> Proc {
    let args = member_args(endpoint, cluster, extra);
    Proc::start(&crate::server_args("router", model, &args))
}

/// The id a worker started without `--worker-id` registers under: derived from its
/// advertised (gRPC) address.
pub fn worker_id(w: &Proc) -> String {
    format!("worker-{}-{}", w.grpc.ip(), w.grpc.port())
}

/// The version of the placement `router` follows, per its `/metrics` (0 before any).
pub fn placement_version(router: &Proc) -> f64 {
    metric_value(&metrics(router.http), "moe_placement_version").unwrap_or(0.0)
}

/// The router's `GET /v1/cluster`: the placement in force and the load.
pub fn cluster_status(router: &Proc) -> Value {
    let addr = router.http;
    let (code, body) = crate::http(addr, "GET", "/v1/cluster", None);
    assert_eq!(code, 200, "GET http://{addr}/v1/cluster: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/v1/cluster is not JSON ({e}): {body}"))
}

/// Experts the placement in a [`cluster_status`] document puts on `worker`'s devices.
pub fn hosted_by(status: &Value, worker: &str) -> usize {
    status["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .filter(|d| d["worker"] == worker)
        .map(|d| d["experts"].as_array().map_or(0, Vec::len))
        .sum()
}

/// Workers hosting at least one expert, per the router's [`cluster_status`], in order.
pub fn hosting_workers(router: &Proc) -> Vec<String> {
    let status = cluster_status(router);
    let mut w: Vec<String> = status["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .filter(|d| d["experts"].as_array().is_some_and(|e| !e.is_empty()))
        .filter_map(|d| d["worker"].as_str().map(str::to_owned))
        .collect();
    w.dedup();
    w
}

/// `n` greedy requests (one logprob each) of varied token-id prompts: request `r` has
/// 5 + 4 × (r mod 6) tokens (25 at most), ids within 2..500; `salt` picks another set.
pub fn varied_reqs(n: u32, salt: u32, max_tokens: u32) -> Vec<GreedyReq> {
    let base = 3 + 53 * (salt % 498);
    (0..n)
        .map(|r| {
            let ids = (0..5 + 4 * (r % 6))
                .map(|j| (base + 29 * j + 41 * r) % 498 + 2)
                .collect();
            GreedyReq::ids(ids, max_tokens).with_logprobs(1)
        })
        .collect()
}

/// What became of each request of a batch: its messages or the status that ended it.
pub type Batch = Vec<Result<Vec<GenerateResponse>, tonic::Status>>;

/// Load: streams `reqs` to the gRPC server at `addr` batch after batch (the next as
/// soon as one has ended; each request may take up to `patience`) until `stop` is set,
/// counting finished batches in `done`. The task returns every batch.
pub fn keep_streaming(
    addr: SocketAddr,
    reqs: &[GreedyReq],
    patience: Duration,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
) -> JoinHandle<Vec<Batch>> {
    let reqs = reqs.to_vec();
    tokio::spawn(async move {
        let mut batches = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            batches.push(Streams::start(addr, &reqs, patience).finish().await);
            done.fetch_add(1, Ordering::SeqCst);
        }
        batches
    })
}

/// Greedy requests streaming concurrently from one server.
pub struct Streams {
    /// How many requests have received at least one token.
    started: watch::Receiver<usize>,
    tasks: Vec<JoinHandle<Result<Vec<GenerateResponse>, tonic::Status>>>,
}

impl Streams {
    /// Sends every request at once to the gRPC server at `addr`; each may take up to
    /// `patience` to finish.
    pub fn start(addr: SocketAddr, reqs: &[GreedyReq], patience: Duration) -> Streams {
        let (tx, started) = watch::channel(0usize);
        let tasks = reqs
            .iter()
            .map(|r| {
                let (req, tx) = (r.to_proto(), tx.clone());
                tokio::spawn(async move {
                    let call = async {
                        let mut stream = generation_client(addr)
                            .await
                            .generate(req)
                            .await?
                            .into_inner();
                        let mut out: Vec<GenerateResponse> = Vec::new();
                        while let Some(m) = stream.message().await? {
                            let first = !m.tokens.is_empty()
                                && out.iter().all(|o: &GenerateResponse| o.tokens.is_empty());
                            out.push(m);
                            if first {
                                tx.send_modify(|n| *n += 1);
                            }
                        }
                        Ok(out)
                    };
                    tokio::time::timeout(patience, call)
                        .await
                        .unwrap_or_else(|_| panic!("Generate on {addr} took over {patience:?}"))
                })
            })
            .collect();
        Streams { started, tasks }
    }

    /// Waits until every request has received a token; panics after [`STARTUP`].
    pub async fn wait_all_started(&mut self) {
        let n = self.tasks.len();
        let waited = tokio::time::timeout(STARTUP, self.started.wait_for(|s| *s >= n)).await;
        assert!(
            matches!(waited, Ok(Ok(_))),
            "not every request received a token within {STARTUP:?}"
        );
    }

    /// Waits for every request to end: its messages or the status that ended it.
    pub async fn finish(self) -> Batch {
        let mut out = Vec::new();
        for t in self.tasks {
            out.push(t.await.unwrap_or_else(|e| panic!("request task: {e}")));
        }
        out
    }
}

/// Asserts that every stream finished with `max_tokens` tokens (none lost, none
/// repeated), finish reason LENGTH, and the same tokens and logprobs (within 1e-5) as
/// the offline reference `want`.
pub fn assert_streams_match(what: &str, want: &[Vec<crate::Tok>], got: Batch, max_tokens: u32) {
    assert_eq!(want.len(), got.len(), "{what}: one result per request");
    for (i, (w, g)) in want.iter().zip(got).enumerate() {
        let msgs = g.unwrap_or_else(|s| panic!("{what}: request {i} failed: {s:?}"));
        let last = msgs.last().expect("a final message");
        assert_eq!(
            last.finish_reason,
            moe_proto::v1::FinishReason::Length as i32,
            "{what}: request {i}"
        );
        let toks = crate::streamed_tokens(&msgs);
        assert_eq!(toks.len(), max_tokens as usize, "{what}: request {i}");
        crate::assert_same_tokens(&format!("{what}: request {i}"), w, &toks, 1e-5);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_pads_like_the_standard() {
        assert_eq!(super::base64(b"/a/b"), "L2EvYg==");
        assert_eq!(super::base64(b"/moe"), "L21vZQ==");
        assert_eq!(super::base64(b"abc"), "YWJj");
        assert_eq!(super::base64(b"ab"), "YWI=");
        assert_eq!(super::base64(b""), "");
    }

    #[test]
    fn unbase64_inverts_base64() {
        assert_eq!(super::unbase64("L2EvYg=="), b"/a/b");
        assert_eq!(super::unbase64("YWI="), b"ab");
        assert_eq!(super::unbase64(""), b"");
        let all: Vec<u8> = (0..=255).collect();
        for n in 0..all.len() {
            assert_eq!(super::unbase64(&super::base64(&all[..n])), &all[..n]);
        }
    }
}
