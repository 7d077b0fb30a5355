//! Overload, bounded and on loopback only: 2,000 concurrent streams against one `moe serve`
//! whose queue holds far fewer (`--max-running 8 --max-waiting 32`): 1,500 gRPC
//! `Generate` streams over 6 channels and 500 streaming `/v1/completions` requests over
//! 2 HTTP/2 connections (250 streams per connection, under the default
//! `--max-concurrent-streams` 256). Every stream ends, within a generous deadline,
//! either served (every token, `finish_reason` length) or refused at once
//! (RESOURCE_EXHAUSTED, HTTP 429 `rate_limit_error`); none hangs or fails otherwise.
//! The router's RSS (VmRSS in /proc/PID/status) after the burst stays within
//! [`RSS_BOUND_MIB`] of before it, and normal requests succeed right after.
//!
//! Figures (served, refused, RSS before/after/peak, wall time) are printed; run with
//! `cargo nextest run -p moe-tests --test overload_streams_refused_or_served --no-capture`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use moe_proto::v1::FinishReason;
use moe_tests::http_client::{sse_data, HttpClient};
use moe_tests::{metric_value, metrics, tiny_checkpoint, wait_until, GreedyReq, Proc, PATIENCE};
use serde_json::{json, Value};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

const GRPC_CHANNELS: usize = 6;
const GRPC_STREAMS_PER_CHANNEL: usize = 250;
const HTTP_CONNECTIONS: usize = 2;
const HTTP_STREAMS_PER_CONNECTION: usize = 250;
const MAX_TOKENS: u32 = 32;
/// How long the whole burst may take; far beyond what it needs, so that only a hang
/// (a stream neither served nor refused) trips it.
const BURST_DEADLINE: Duration = Duration::from_secs(300);
/// Growth of the router's RSS allowed across the burst. Afterwards nothing of the 2,000
/// streams may remain (no sequence, KV block, event channel or connection buffer); what
/// may legitimately stay is memory the allocator keeps for reuse, at most the burst's own
/// peak of buffers: 2,000 streams × one 64 KiB HTTP/2 stream window is 125 MiB. A leak of
/// what every stream buffered would pass that. (Measured: about +10 MiB.)
const RSS_BOUND_MIB: u64 = 128;

#[derive(Debug)]
enum Outcome {
    Served,
    Refused,
    /// Anything else: a failure of the test, with what happened.
    Other(String),
}

/// A field (in KiB) of /proc/PID/status, e.g. `VmRSS`, `VmHWM`.
fn status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

async fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(PATIENCE)
        .tcp_nodelay(true)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

async fn grpc_stream(ch: Channel, prompt: Vec<u32>) -> Outcome {
    let mut client = moe_proto::v1::generation_client::GenerationClient::new(ch);
    let mut stream = match client
        .generate(GreedyReq::ids(prompt, MAX_TOKENS).to_proto())
        .await
    {
        Ok(s) => s.into_inner(),
        Err(s) if s.code() == Code::ResourceExhausted => return Outcome::Refused,
        Err(s) => return Outcome::Other(format!("gRPC refused with {s:?}")),
    };
    let mut tokens = 0usize;
    loop {
        match stream.message().await {
            Ok(Some(m)) => {
                tokens += m.tokens.len();
                if m.finish_reason != 0 {
                    let done = m.finish_reason == FinishReason::Length as i32
                        && tokens == MAX_TOKENS as usize;
                    return if done {
                        Outcome::Served
                    } else {
                        Outcome::Other(format!("gRPC ended {m:?} after {tokens} tokens"))
                    };
                }
            }
            Ok(None) => return Outcome::Other(format!("gRPC stream ended after {tokens} tokens")),
            Err(s) => return Outcome::Other(format!("gRPC stream failed: {s:?}")),
        }
    }
}

async fn http_stream(client: HttpClient, prompt: Vec<u32>) -> Outcome {
    let body = json!({"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                      "ignore_eos": true, "stream": true});
    let (status, text) = match client.post_json("/v1/completions", &body).await {
        Ok(r) => r,
        Err(e) => return Outcome::Other(format!("HTTP request failed: {e}")),
    };
    match status {
        200 => {
            let data = sse_data(&text);
            let finished = data
                .iter()
                .filter_map(|d| serde_json::from_str::<Value>(d).ok())
                .any(|c| c["choices"][0]["finish_reason"] == "length");
            if finished && data.last() == Some(&"[DONE]") {
                Outcome::Served
            } else {
                Outcome::Other(format!("HTTP stream incomplete: {text}"))
            }
        }
        429 => {
            let v: Value = serde_json::from_str(&text).unwrap_or_default();
            if v["error"]["type"] == "rate_limit_error" {
                Outcome::Refused
            } else {
                Outcome::Other(format!("429 not in OpenAI's shape: {text}"))
            }
        }
        other => Outcome::Other(format!("HTTP {other}: {text}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_streams_are_each_served_or_refused_and_memory_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 71);
    let serve = Proc::serve(&model, &["--max-running", "8", "--max-waiting", "32"]);
    let pid = serve.pid();

    // Warm up both APIs once, so that "before" counts what serving needs at all.
    let ch = channel(serve.grpc).await;
    assert!(matches!(
        grpc_stream(ch.clone(), vec![3, 4, 5]).await,
        Outcome::Served
    ));
    let h = HttpClient::http2(serve.http);
    assert!(matches!(
        http_stream(h, vec![3, 4, 5]).await,
        Outcome::Served
    ));
    let rss_before = status_kib(pid, "VmRSS");

    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..GRPC_CHANNELS {
        let ch = channel(serve.grpc).await;
        for i in 0..GRPC_STREAMS_PER_CHANNEL {
            let prompt = vec![3 + (c * 7 + i) as u32 % 400, 5, 6];
            tasks.push(tokio::spawn(grpc_stream(ch.clone(), prompt)));
        }
    }
    for c in 0..HTTP_CONNECTIONS {
        let client = HttpClient::http2(serve.http);
        for i in 0..HTTP_STREAMS_PER_CONNECTION {
            let prompt = vec![3 + (c * 11 + i) as u32 % 400, 7, 8];
            tasks.push(tokio::spawn(http_stream(client.clone(), prompt)));
        }
    }
    let total = tasks.len();
    let outcomes = tokio::time::timeout(BURST_DEADLINE, futures::future::join_all(tasks))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "some of {total} streams neither finished nor were refused in {BURST_DEADLINE:?}"
            )
        });
    let wall = started.elapsed();
    let (mut served, mut refused, mut other) = (0, 0, Vec::new());
    for o in outcomes {
        match o.expect("stream task") {
            Outcome::Served => served += 1,
            Outcome::Refused => refused += 1,
            Outcome::Other(why) => other.push(why),
        }
    }

    // Nothing may be left behind in the engine.
    let mut last = String::new();
    assert!(
        wait_until(PATIENCE, || {
            last = metrics(serve.http);
            metric_value(&last, "moe_num_requests_running") == Some(0.0)
                && metric_value(&last, "moe_num_requests_waiting") == Some(0.0)
        }),
        "requests left in the engine after the burst:\n{last}"
    );
    let rss_after = status_kib(pid, "VmRSS");
    let rss_peak = status_kib(pid, "VmHWM");
    println!(
        "overload: {total} streams ({} gRPC over {GRPC_CHANNELS} channels, {} HTTP/2 over \
         {HTTP_CONNECTIONS} connections), --max-running 8 --max-waiting 32: served {served}, \
         refused {refused}, other {}; router RSS before {} MiB, after {} MiB, peak {} MiB; \
         wall {:.1} s",
        GRPC_CHANNELS * GRPC_STREAMS_PER_CHANNEL,
        HTTP_CONNECTIONS * HTTP_STREAMS_PER_CONNECTION,
        other.len(),
        rss_before / 1024,
        rss_after / 1024,
        rss_peak / 1024,
        wall.as_secs_f64()
    );
    assert!(
        other.is_empty(),
        "{} streams were neither served nor refused; first: {}",
        other.len(),
        other[0]
    );
    assert_eq!(served + refused, total);
    assert!(
        served >= 8,
        "at least one full batch must be served: {served}"
    );
    assert!(
        refused >= 1,
        "{total} streams against a queue of 40 must see refusals"
    );
    assert!(
        rss_after <= rss_before + RSS_BOUND_MIB * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB (bound +{RSS_BOUND_MIB} MiB)"
    );
    assert!(
        metric_value(&last, r#"moe_requests_total{outcome="overloaded"}"#).unwrap_or(0.0)
            >= refused as f64,
        "every refusal is counted as overloaded:\n{last}"
    );

    // Normal service right after, on both APIs.
    assert!(matches!(
        grpc_stream(ch, vec![9, 8, 7]).await,
        Outcome::Served
    ));
    let h = HttpClient::http1(serve.http);
    let (status, body) = h
        .post_json(
            "/v1/completions",
            &json!({"prompt": "Hello", "max_tokens": 4, "temperature": 0}),
        )
        .await
        .expect("a request after the burst");
    assert_eq!(status, 200, "{body}");
}
