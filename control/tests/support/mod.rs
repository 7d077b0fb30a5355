//! Test fixtures over real processes: an `etcd` on free loopback ports with its own data
//! dir (killed on drop, restartable on the same port and data), a TCP proxy that can cut
//! a client off from etcd while etcd keeps running, and deadline helpers (no sleeps as
//! synchronisation: every wait is on a change, under a generous deadline).
//!
//! Needs the `etcd` binary (Debian `etcd-server`, 3.4) on `PATH`.
#![allow(dead_code)] // each test file uses a different part

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use moe_control::{DeviceRecord, EtcdConfig, WorkerRecord};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long any wait may take before the test fails. Generous: shared 2-core machines.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Sends the library's logs to the test's captured output (shown when a test fails).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "moe_control=debug".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Awaits `fut` under [`DEADLINE`], failing the test with `what` on timeout.
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {DEADLINE:?} waiting for {what}"),
    }
}

/// Waits until `rx`'s value satisfies `pred`; returns that value.
pub async fn wait_until<T: Clone>(
    what: &str,
    rx: &mut watch::Receiver<T>,
    pred: impl FnMut(&T) -> bool,
) -> T {
    within(what, async {
        match rx.wait_for(pred).await {
            Ok(v) => v.clone(),
            Err(_) => panic!("the sender of {what} went away"),
        }
    })
    .await
}

/// A worker record for tests.
pub fn record(id: &str) -> WorkerRecord {
    WorkerRecord {
        worker_id: id.into(),
        address: format!("{id}.test:50051"),
        devices: vec![DeviceRecord {
            name: "cpu:0".into(),
            capacity_bytes: 1 << 30,
        }],
        version: "test".into(),
        draining: false,
        incarnation: 1,
    }
}

/// Client settings for tests: the defaults with a short reconnect backoff.
pub fn config(endpoint: &str, cluster: &str) -> EtcdConfig {
    let mut c = EtcdConfig::new([endpoint], cluster).expect("valid config");
    c.backoff_max = Duration::from_millis(500);
    c
}

fn free_port() -> u16 {
    // Bound and released: another process could take it meanwhile; start() retries.
    let l = StdListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// An etcd server of our own.
pub struct Etcd {
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
    command: String,
}

impl Etcd {
    /// Starts etcd on free ports and waits until it answers.
    pub async fn start() -> Self {
        init_tracing();
        let mut last = String::new();
        for _ in 0..3 {
            let mut etcd = Self {
                dir: tempfile::tempdir().expect("temp dir"),
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
                command: String::new(),
            };
            match etcd.launch().await {
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

    /// The client address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.client_port))
    }

    /// Kills etcd with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports and data dir; waits until it answers.
    pub async fn restart(&mut self) {
        self.kill();
        if let Err(e) = self.launch().await {
            panic!("etcd did not restart: {e}\n{}", self.log());
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// The server's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    async fn launch(&mut self) -> Result<(), String> {
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
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
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!("`{}` exited: {status}", self.command));
            }
            if self.answers().await {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!("`{}` not ready after {DEADLINE:?}", self.command));
            }
            // Polling for readiness under a deadline, not synchronising on time.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn answers(&self) -> bool {
        let probe = async {
            let mut c = etcd_client::Client::connect([self.endpoint()], None).await?;
            c.get("/readiness-probe", None).await
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(1), probe).await,
            Ok(Ok(_))
        )
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- ran: {}\n--- etcd log:\n{}", self.command, self.log());
        }
    }
}

/// A TCP proxy in front of etcd that can cut its clients off (connections dropped, new
/// ones closed at once) while etcd itself keeps running.
pub struct TcpProxy {
    addr: SocketAddr,
    cut: Arc<watch::Sender<bool>>,
    task: JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let cut = Arc::new(watch::Sender::new(false));
        let cut_task = cut.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if *cut_task.borrow() {
                    continue; // dropped: closed at once
                }
                let mut cut_rx = cut_task.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut_rx.wait_for(|c| *c) => {}
                    }
                });
            }
        });
        Self { addr, cut, task }
    }

    /// `http://<proxy address>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Lets connections through again.
    pub fn heal(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}
