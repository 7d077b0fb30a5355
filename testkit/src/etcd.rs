//! An etcd server of the test's own ([`Etcd`]: free loopback ports, a temporary data
//! dir, killed on drop, restartable on the same ports and data), and what it holds
//! under a key, read over its JSON gateway so that tests need no etcd client.
//!
//! Needs the `etcd` binary (Debian `etcd-server`) on `PATH`; `scripts/test.sh`
//! installs it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

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

    /// The client address, 127.0.0.1:<client port>.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.client_port))
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
        let addr = self.addr();
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
        let addr = self.addr();
        let body = format!(
            "{{\"key\":\"{}\",\"revision\":\"{revision}\"}}",
            base64(key.as_bytes())
        );
        let (code, text) = post(addr, "/v3/kv/range", &body);
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

/// `POST path` with a JSON `body` to `addr` (HTTP/1.1, one connection): the status and
/// the body. Panics if the server does not answer.
fn post(addr: SocketAddr, path: &str, body: &str) -> (u16, String) {
    let exchange = || -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    };
    let raw = exchange().unwrap_or_else(|e| panic!("POST http://{addr}{path}: {e}"));
    let code = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("POST http://{addr}{path}: no status line in {raw:?}"));
    let body = match raw.split_once("\r\n\r\n") {
        Some((head, rest))
            if head
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked") =>
        {
            unchunk(rest)
        }
        Some((_, rest)) => rest.to_owned(),
        None => String::new(),
    };
    (code, body)
}

/// The body of a chunked HTTP/1.1 response.
fn unchunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
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
