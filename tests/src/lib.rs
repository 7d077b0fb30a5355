//! moe-tests: end-to-end tests that drive the real `moe` binary live in `tests/`; this
//! library is their shared harness: where the binary is, running it to completion
//! ([`run_moe`]) or as a server ([`Proc`]) so that a failure shows every command line and
//! everything each process printed, scraping `/metrics` over plain HTTP, and the gRPC and
//! offline (`moe generate`) views of the same greedy request ([`GreedyReq`], [`Tok`]).
//! [`http_client`] is a real HTTP/1.1 and HTTP/2 client for many concurrent requests.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

pub mod cluster;
pub mod docker;
pub mod health;
pub mod http_client;
pub mod netns;
pub mod python;
use moe_proto::v1::expert_service_client::ExpertServiceClient;
use moe_proto::v1::generation_client::GenerationClient;
use moe_proto::v1::{GenerateRequest, GenerateResponse, SamplingParameters};
use serde_json::{json, Value};
use tonic::transport::Channel;

/// How long a server may take to print its ready line.
pub const STARTUP: Duration = Duration::from_secs(120);
/// How long one request, one scrape or one wait for a condition may take.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// The `moe` binary of this build (`target/<profile>/moe`), or `$MOE_BIN`.
pub fn moe_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MOE_BIN") {
        return PathBuf::from(p);
    }
    // Test executables live in target/<profile>/deps/; the binary one level up.
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target directory");
    let bin = dir.join(format!("moe{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} does not exist: build it first with `cargo build -p moe-cli` (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// Runs `moe ARGS`, returning its output; panics with the command line, exit status,
/// stdout and stderr when `expect_success` disagrees with the outcome.
pub fn run_moe(args: &[&str], expect_success: bool) -> Output {
    let bin = moe_bin();
    let out = Command::new(&bin)
        .args(args)
        .env("MOE_LOG", "warn")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    if out.status.success() != expect_success {
        panic!(
            "`{} {}` exited with {} (expected {})\n--- stdout ---\n{}\n--- stderr ---\n{}",
            bin.display(),
            args.join(" "),
            out.status,
            if expect_success { "success" } else { "failure" },
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Writes a tiny DeepSeek-V3 checkpoint (vocab 512, context 512) to `dir/dsv3`.
pub fn tiny_checkpoint(dir: &Path, seed: u64) -> PathBuf {
    let model = dir.join("dsv3");
    let seed = seed.to_string();
    run_moe(
        &[
            "checkpoint",
            "new",
            "--arch",
            "deepseek_v3",
            "--out",
            path_str(&model),
            "--seed",
            &seed,
        ],
        true,
    );
    model
}

/// A path as `&str` (every path in these tests is UTF-8).
pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

pub fn server_args<'a>(cmd: &'a str, model: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        cmd,
        "--model",
        path_str(model),
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    // Routers and workers need mutual TLS or an explicit --insecure; tests that are not
    // about TLS run without it.
    if matches!(cmd, "router" | "worker") && !extra.contains(&"--tls-cert") {
        args.push("--insecure");
    }
    args
}

/// A running `moe` server process (`serve`, `router` or `worker`). Dropping it kills the
/// process; if the test is failing by then, it prints the command line, stdout and log.
pub struct Proc {
    child: Child,
    /// The command line, for messages.
    pub cmdline: String,
    /// Its gRPC address.
    pub grpc: SocketAddr,
    /// Its HTTP address (`/metrics`, `/health`).
    pub http: SocketAddr,
    stdout: Arc<Mutex<Vec<String>>>,
    log: PathBuf,
    /// Set once a panic message has shown the log, so `Drop` does not repeat it.
    reported: bool,
    _dir: tempfile::TempDir,
}

impl Proc {
    /// Starts `moe ARGS` (MOE_LOG=info, stderr to a log file) and waits until it prints
    /// `moe <ARGS[0]> listening grpc=IP:PORT http=IP:PORT`; panics with the command line
    /// and its log if it exits first or [`STARTUP`] passes.
    pub fn start(args: &[&str]) -> Proc {
        Proc::start_with_prefix(&[], args)
    }

    /// [`Proc::start`] through a launcher: runs `PREFIX... moe ARGS`, e.g. with
    /// `["ip", "netns", "exec", NS]` inside a network namespace. The launcher must exec
    /// the binary (so that [`Proc::pid`] and kill on drop reach the server itself).
    pub fn start_with_prefix(prefix: &[&str], args: &[&str]) -> Proc {
        let bin = moe_bin();
        let cmdline = format!("{} {}", bin.display(), args.join(" "));
        let cmdline = match prefix {
            [] => cmdline,
            _ => format!("{} {cmdline}", prefix.join(" ")),
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("stderr.log");
        let mut command = match prefix.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let child = command
            .args(args)
            .env("MOE_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("create log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run `{cmdline}`: {e}"));
        let mut p = Proc {
            child,
            cmdline,
            grpc: SocketAddr::from(([0, 0, 0, 0], 0)),
            http: SocketAddr::from(([0, 0, 0, 0], 0)),
            stdout: Arc::default(),
            log,
            reported: false,
            _dir: dir,
        };
        // A thread keeps draining stdout (so the process never blocks on it) and hands
        // each line over until the ready line has been seen.
        let (tx, rx) = mpsc::channel::<String>();
        let out = p.child.stdout.take().expect("piped stdout");
        let lines = p.stdout.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                lines.lock().expect("stdout lines").push(line.clone());
                let _ = tx.send(line);
            }
        });
        let ready = format!("moe {} listening ", args[0]);
        let deadline = Instant::now() + STARTUP;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.starts_with(&ready) => {
                    let addr = |key: &str| -> SocketAddr {
                        line.split_whitespace()
                            .find_map(|w| w.strip_prefix(key))
                            .and_then(|a| a.parse().ok())
                            .unwrap_or_else(|| panic!("no {key}ADDR in ready line {line:?}"))
                    };
                    p.grpc = addr("grpc=");
                    p.http = addr("http=");
                    return p;
                }
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = p.child.wait().expect("wait");
                    p.reported = true;
                    panic!("exited with {status} before it was ready\n{}", p.describe());
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = p.child.kill();
                    let _ = p.child.wait();
                    p.reported = true;
                    panic!("not ready within {STARTUP:?}\n{}", p.describe());
                }
            }
        }
    }

    /// `moe serve --model MODEL` on free local ports, plus `extra` flags.
    pub fn serve(model: &Path, extra: &[&str]) -> Proc {
        Proc::start(&server_args("serve", model, extra))
    }

    /// `moe worker --model MODEL --devices DEVICES` on free local ports, plus `extra`.
    pub fn worker(model: &Path, devices: &str, extra: &[&str]) -> Proc {
        let mut args = vec!["--devices", devices];
        args.extend_from_slice(extra);
        Proc::start(&server_args("worker", model, &args))
    }

    /// `moe router --model MODEL --workers ...` on free local ports, plus `extra`.
    pub fn router(model: &Path, workers: &[&Proc], extra: &[&str]) -> Proc {
        let addrs: Vec<String> = workers.iter().map(|w| w.grpc.to_string()).collect();
        let addrs = addrs.join(",");
        let mut args = vec!["--workers", addrs.as_str()];
        args.extend_from_slice(extra);
        Proc::start(&server_args("router", model, &args))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (`TERM`, `STOP`, `CONT`, ...) with `kill(1)`.
    pub fn signal(&self, name: &str) {
        let st = Command::new("kill")
            .args([format!("-{name}"), self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -{name} {} failed", self.pid());
    }

    /// Asks the process to shut down gracefully.
    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// Waits for the process to exit; panics with its log if `timeout` passes first.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                self.reported = true;
                panic!("did not exit within {timeout:?}\n{}", self.describe());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// True while the process has not exited.
    pub fn is_alive(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Everything the process wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Command line, stdout and log, for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "=== `{}` (pid {}) ===\n--- stdout ---\n{}\n--- log ---\n{}",
            self.cmdline,
            self.child.id(),
            self.stdout.lock().map(|l| l.join("\n")).unwrap_or_default(),
            self.log()
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() && !self.reported {
            eprintln!("{}", self.describe());
        }
    }
}

/// Polls `cond` every 20 ms until it holds (true) or `timeout` passes (false).
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One HTTP/1.1 request over a fresh connection (`Connection: close`): status and body.
pub fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    http_with_headers(addr, method, path, &[], body)
}

/// [`http`] with extra request headers.
pub fn http_with_headers(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, PATIENCE)
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    s.set_read_timeout(Some(PATIENCE)).expect("read timeout");
    let body = body.unwrap_or("");
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("{method} http://{addr}{path}: {e}"));
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP header in {raw:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    (
        status,
        if chunked {
            dechunk(rest)
        } else {
            rest.to_owned()
        },
    )
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// True if `msg` contains `field` as a whole word (`prompt` is not in `prompt_token_ids`).
pub fn names_field(msg: &str, field: &str) -> bool {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    msg.match_indices(field).any(|(i, _)| {
        !msg[..i].chars().next_back().is_some_and(word)
            && !msg[i + field.len()..].chars().next().is_some_and(word)
    })
}

/// GET /metrics; panics unless it answers 200.
pub fn metrics(http_addr: SocketAddr) -> String {
    let (code, body) = http(http_addr, "GET", "/metrics", None);
    assert_eq!(code, 200, "GET http://{http_addr}/metrics: {body}");
    body
}

/// The value of one series, e.g. `moe_requests_total{outcome="ok"}` (labels exactly as
/// exposed) or `moe_num_requests_running`.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The sum of every series of metric `name`, over all label values (0 if none).
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            // `name` may end inside a label set (`m{a="x"`): the rest of it follows.
            let open = name.contains('{') && !name.ends_with('}');
            let rest = match rest.strip_prefix('{') {
                Some(r) => r.split_once("} ")?.1,
                None if open => rest.split_once("} ")?.1,
                None => rest.strip_prefix(' ')?,
            };
            rest.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum()
}

/// A gRPC `Generation` client for a server's address.
pub async fn generation_client(addr: SocketAddr) -> GenerationClient<Channel> {
    GenerationClient::new(channel(addr).await)
}

/// A gRPC `ExpertService` client for a worker's address.
pub async fn expert_client(addr: SocketAddr) -> ExpertServiceClient<Channel> {
    ExpertServiceClient::new(channel(addr).await)
}

async fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(PATIENCE)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

/// Runs one `Generate` call to the end: every message of the stream, or the status that
/// ended it. Panics if it takes longer than [`PATIENCE`].
pub async fn generate(
    addr: SocketAddr,
    req: GenerateRequest,
) -> Result<Vec<GenerateResponse>, tonic::Status> {
    let call = async {
        let mut stream = generation_client(addr)
            .await
            .generate(req)
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(m) = stream.message().await? {
            out.push(m);
        }
        Ok(out)
    };
    tokio::time::timeout(PATIENCE, call)
        .await
        .unwrap_or_else(|_| panic!("Generate on {addr} took longer than {PATIENCE:?}"))
}

/// A greedy request (temperature 0, `ignore_eos`), by prompt text or token ids, in the
/// gRPC and the offline JSONL form.
#[derive(Debug, Clone)]
pub struct GreedyReq {
    pub prompt: Option<String>,
    pub ids: Vec<u32>,
    pub max_tokens: u32,
    pub logprobs: Option<u32>,
}

impl GreedyReq {
    pub fn ids(ids: Vec<u32>, max_tokens: u32) -> GreedyReq {
        GreedyReq {
            prompt: None,
            ids,
            max_tokens,
            logprobs: None,
        }
    }

    pub fn text(prompt: &str, max_tokens: u32) -> GreedyReq {
        GreedyReq {
            prompt: Some(prompt.to_owned()),
            ids: Vec::new(),
            max_tokens,
            logprobs: None,
        }
    }

    pub fn with_logprobs(mut self, n: u32) -> GreedyReq {
        self.logprobs = Some(n);
        self
    }

    pub fn to_proto(&self) -> GenerateRequest {
        GenerateRequest {
            input: self
                .prompt
                .clone()
                .map(moe_proto::v1::generate_request::Input::Prompt),
            prompt_token_ids: self.ids.clone(),
            max_tokens: self.max_tokens,
            sampling: Some(SamplingParameters {
                temperature: Some(0.0),
                ..Default::default()
            }),
            ignore_eos: true,
            logprobs: self.logprobs,
            ..Default::default()
        }
    }

    pub fn to_json(&self) -> Value {
        let mut v = json!({"max_tokens": self.max_tokens, "temperature": 0, "ignore_eos": true});
        match &self.prompt {
            Some(p) => v["prompt"] = json!(p),
            None => v["prompt_token_ids"] = json!(self.ids),
        }
        if let Some(n) = self.logprobs {
            v["logprobs"] = json!(n);
        }
        v
    }
}

/// One generated token: id, logprob and the top alternatives (when asked for).
#[derive(Debug, Clone, PartialEq)]
pub struct Tok {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Runs `moe generate` over request objects (one JSONL line each); its result object for
/// each, in order (panics on an error line).
pub fn generate_json(model: &Path, reqs: &[Value]) -> Vec<Value> {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out.jsonl");
    let lines: Vec<String> = reqs.iter().map(Value::to_string).collect();
    std::fs::write(&input, lines.join("\n") + "\n").expect("write input");
    run_moe(
        &[
            "generate",
            "--model",
            path_str(model),
            "--input",
            path_str(&input),
            "--output",
            path_str(&output),
        ],
        true,
    );
    let text = std::fs::read_to_string(&output).expect("read output");
    let out: Vec<Value> = text
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("output line is JSON");
            assert!(v.get("error").is_none(), "moe generate failed a line: {v}");
            v
        })
        .collect();
    assert_eq!(out.len(), reqs.len(), "one output line per request");
    out
}

/// Runs `moe generate` over `reqs`; the tokens of each, in order (panics on an error line).
pub fn generate_offline(model: &Path, reqs: &[GreedyReq]) -> Vec<Vec<Tok>> {
    let reqs: Vec<Value> = reqs.iter().map(GreedyReq::to_json).collect();
    generate_json(model, &reqs)
        .iter()
        .map(offline_tokens)
        .collect()
}

fn offline_tokens(v: &Value) -> Vec<Tok> {
    let ids = v["token_ids"].as_array().expect("token_ids");
    let lp = v.get("logprobs").and_then(Value::as_array);
    let num = |x: &Value| x.as_f64().expect("number") as f32;
    ids.iter()
        .enumerate()
        .map(|(i, id)| {
            let id = id.as_u64().expect("token id") as u32;
            match lp {
                None => Tok {
                    id,
                    logprob: 0.0,
                    top: Vec::new(),
                },
                Some(lp) => Tok {
                    id,
                    logprob: num(&lp[i]["logprob"]),
                    top: lp[i]["top_logprobs"]
                        .as_array()
                        .expect("top_logprobs")
                        .iter()
                        .map(|t| {
                            (
                                t["token_id"].as_u64().expect("id") as u32,
                                num(&t["logprob"]),
                            )
                        })
                        .collect(),
                },
            }
        })
        .collect()
}

/// The tokens of a `Generate` stream, in order.
pub fn streamed_tokens(msgs: &[GenerateResponse]) -> Vec<Tok> {
    msgs.iter()
        .flat_map(|m| &m.tokens)
        .map(|t| Tok {
            id: t.token_id,
            logprob: t.logprob,
            top: t
                .top_logprobs
                .iter()
                .map(|a| (a.token_id, a.logprob))
                .collect(),
        })
        .collect()
}

/// Asserts the same token ids (and alternatives) with logprobs within `tol`, per token.
pub fn assert_same_tokens(what: &str, want: &[Tok], got: &[Tok], tol: f32) {
    let ids = |t: &[Tok]| t.iter().map(|t| t.id).collect::<Vec<_>>();
    assert_eq!(ids(got), ids(want), "{what}: token ids differ");
    for (i, (w, g)) in want.iter().zip(got).enumerate() {
        let close = |a: f32, b: f32| (a - b).abs() <= tol;
        let top_ids = |t: &Tok| t.top.iter().map(|x| x.0).collect::<Vec<_>>();
        assert!(
            close(w.logprob, g.logprob)
                && top_ids(w) == top_ids(g)
                && w.top.iter().zip(&g.top).all(|(a, b)| close(a.1, b.1)),
            "{what}: token {i} differs beyond {tol}: want {w:?}, got {g:?}"
        );
    }
}
