//! `moe bench proxy`: a TCP proxy that delays every byte by a fixed one-way time (and
//! optionally caps the bandwidth), to stand in for a real network between a router and
//! a worker on one machine. Each direction of each connection has a reader thread that
//! stamps what it reads and a writer thread that forwards it once its time has come,
//! so the delay adds latency without limiting throughput (many chunks are in flight at
//! once), as a long link does.
//!
//! Timing: threads sleep with the OS timer (`std::thread::sleep`, about 50–100 µs late
//! on Linux with the default timer slack) and spin the last [`SPIN`]; `--check` measures
//! what the proxy really adds (a ping-pong through it) and prints it.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;

/// The final stretch of each wait that is spun rather than slept.
const SPIN: Duration = Duration::from_micros(150);
/// Largest chunk read at once.
const CHUNK: usize = 64 << 10;

#[derive(clap::Args, Debug)]
pub struct BenchProxyArgs {
    /// Address to accept connections on (port 0: any free port; the bound address is
    /// printed as `listening proxy=ADDR`).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Where to forward each connection.
    #[arg(long)]
    upstream: String,
    /// One-way delay added to each direction, in microseconds.
    #[arg(long, default_value_t = 0)]
    delay_us: u64,
    /// Bandwidth cap per direction of each connection, in megabits per second (0: none).
    #[arg(long, default_value_t = 0.0)]
    rate_mbps: f64,
    /// Measure the round trip the proxy adds (1,000 one-byte ping-pongs through it to a
    /// local echo server), print it, and exit.
    #[arg(long)]
    check: bool,
}

pub fn run(a: BenchProxyArgs) -> anyhow::Result<()> {
    let delay = Duration::from_micros(a.delay_us);
    anyhow::ensure!(
        a.rate_mbps >= 0.0 && a.rate_mbps.is_finite(),
        "--rate-mbps must be a non-negative number"
    );
    if a.check {
        return check(delay, a.rate_mbps);
    }
    let listener =
        TcpListener::bind(&a.listen).with_context(|| format!("--listen {}", a.listen))?;
    println!("listening proxy={}", listener.local_addr()?);
    serve(listener, a.upstream, delay, a.rate_mbps)
}

/// Accepts forever, proxying each connection to `upstream`.
fn serve(
    listener: TcpListener,
    upstream: String,
    delay: Duration,
    mbps: f64,
) -> anyhow::Result<()> {
    for conn in listener.incoming() {
        let client = match conn {
            Ok(c) => c,
            Err(e) => {
                eprintln!("accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let upstream = upstream.clone();
        std::thread::spawn(move || {
            if let Err(e) = proxy(client, &upstream, delay, mbps) {
                eprintln!("connection to {upstream}: {e}");
            }
        });
    }
    Ok(())
}

fn proxy(client: TcpStream, upstream: &str, delay: Duration, mbps: f64) -> std::io::Result<()> {
    let server = TcpStream::connect(upstream)?;
    for s in [&client, &server] {
        s.set_nodelay(true)?;
    }
    let (c2, s2) = (client.try_clone()?, server.try_clone()?);
    let up = std::thread::spawn(move || pipe(client, server, delay, mbps));
    pipe(s2, c2, delay, mbps);
    let _ = up.join();
    Ok(())
}

/// Forwards `from` to `to`, each chunk `delay` after it was read (and no faster than
/// `mbps`), then half-closes `to`.
fn pipe(mut from: TcpStream, mut to: TcpStream, delay: Duration, mbps: f64) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = std::thread::spawn(move || {
        // When the link is next free (the bandwidth cap serialises chunks).
        let mut free_at = Instant::now();
        for (read_at, chunk) in rx {
            let mut due = read_at + delay;
            if mbps > 0.0 {
                let wire = Duration::from_secs_f64(chunk.len() as f64 * 8.0 / (mbps * 1e6));
                free_at = free_at.max(read_at) + wire;
                due = due.max(free_at);
            }
            wait_until(due);
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0u8; CHUNK];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.join();
}

/// Sleeps until `t`, spinning the last [`SPIN`] for precision.
fn wait_until(t: Instant) {
    loop {
        let now = Instant::now();
        if now >= t {
            return;
        }
        let left = t - now;
        if left > SPIN {
            std::thread::sleep(left - SPIN);
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Round trips through a proxy to a local echo server, against the same without it.
fn check(delay: Duration, mbps: f64) -> anyhow::Result<()> {
    let echo = TcpListener::bind("127.0.0.1:0")?;
    let echo_addr = echo.local_addr()?;
    std::thread::spawn(move || {
        for c in echo.incoming().flatten() {
            std::thread::spawn(move || {
                let mut c = c;
                let _ = c.set_nodelay(true);
                let mut b = [0u8; 1];
                while c.read_exact(&mut b).is_ok() && c.write_all(&b).is_ok() {}
            });
        }
    });
    let proxy_listener = TcpListener::bind("127.0.0.1:0")?;
    let proxy_addr = proxy_listener.local_addr()?;
    let upstream = echo_addr.to_string();
    std::thread::spawn(move || serve(proxy_listener, upstream, delay, mbps));
    let direct = ping(echo_addr)?;
    let through = ping(proxy_addr)?;
    let (d50, t50) = (percentile(&direct, 0.5), percentile(&through, 0.5));
    println!(
        "round trip: direct p50 {d50:.1} µs; through the proxy (one-way {} µs each way) p50 {t50:.1} µs, p99 {:.1} µs; added {:.1} µs (asked {} µs)",
        delay.as_micros(),
        percentile(&through, 0.99),
        t50 - d50,
        2 * delay.as_micros()
    );
    Ok(())
}

fn ping(addr: SocketAddr) -> anyhow::Result<Vec<f64>> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let mut b = [7u8; 1];
    let mut out = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let t = Instant::now();
        s.write_all(&b)?;
        s.read_exact(&mut b)?;
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(out)
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or(0.0)
}
