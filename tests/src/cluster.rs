//! Fixtures of the fault tests: an `etcd` of the test's own ([`Etcd`]: free loopback
//! ports, a temporary data dir, killed on drop) and greedy requests streamed
//! concurrently ([`Streams`]) so that a test can strike while tokens are flowing.
//!
//! [`Etcd`] needs the `etcd` binary (Debian `etcd-server`) on `PATH`; `scripts/test.sh`
//! installs it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use moe_proto::v1::GenerateResponse;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{generation_client, GreedyReq, STARTUP};

fn free_port() -> u16 {
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
}

impl Etcd {
    /// Starts etcd on free ports and waits until it reports healthy.
    pub fn start() -> Etcd {
        let mut last = String::new();
        for _ in 0..3 {
            let mut etcd = Etcd {
                dir: tempfile::tempdir().expect("temp dir"),
                client_port: free_port(),
                child: None,
                command: String::new(),
            };
            match etcd.launch(free_port()) {
                Ok(()) => return etcd,
                Err(e) => last = format!("{e}\n{}", etcd.log()),
            }
        }
        panic!("etcd did not start: {last}");
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
    pub async fn finish(self) -> Vec<Result<Vec<GenerateResponse>, tonic::Status>> {
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
pub fn assert_streams_match(
    what: &str,
    want: &[Vec<crate::Tok>],
    got: Vec<Result<Vec<GenerateResponse>, tonic::Status>>,
    max_tokens: u32,
) {
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
