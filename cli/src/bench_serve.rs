//! `moe bench serve`: a gRPC load generator against a running router's `Generation`
//! service. N workers issue streaming `Generate` requests with distinct pseudo-random
//! prompts (`ignore_eos`, greedy), so every request produces exactly `--max-tokens`
//! tokens, and the run reports throughput and latency: time to first token (TTFT),
//! inter-token latency (ITL) and end-to-end latency (E2E), plus failures by gRPC code.
//! Optional warmup requests run first, to completion, and are not measured. Prints
//! numbers (or one JSON object with `--json`); asserts nothing.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use moe_proto::v1::generation_client::GenerationClient;
use moe_proto::v1::{GenerateRequest, SamplingParameters};
use tonic::transport::{Channel, Endpoint};

#[derive(clap::Args, Clone)]
pub struct BenchServeArgs {
    /// Router address, HOST:PORT (an `http://` prefix is accepted).
    #[arg(long, env = "MOE_TARGET")]
    target: String,
    /// Concurrent requests in flight (one worker each).
    #[arg(long, env = "MOE_BENCH_CONCURRENCY", default_value_t = 8)]
    concurrency: usize,
    /// Prompt length in tokens (random ids, different per request).
    #[arg(long, env = "MOE_BENCH_PROMPT_TOKENS", default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens generated per request (`max_tokens`, with `ignore_eos`).
    #[arg(long, env = "MOE_BENCH_MAX_TOKENS", default_value_t = 64)]
    max_tokens: u32,
    /// Measured requests.
    #[arg(long, env = "MOE_BENCH_REQUESTS", default_value_t = 64)]
    requests: usize,
    /// Unmeasured requests run before the measured ones.
    #[arg(long, env = "MOE_BENCH_WARMUP", default_value_t = 0)]
    warmup: usize,
    /// Lowest prompt token id (inclusive); skip special tokens.
    #[arg(long, env = "MOE_BENCH_VOCAB_LOW", default_value_t = 3)]
    vocab_low: u32,
    /// Highest prompt token id (exclusive).
    #[arg(long, env = "MOE_BENCH_VOCAB_HIGH", default_value_t = 500)]
    vocab_high: u32,
    /// Print one JSON object instead of text.
    #[arg(long, env = "MOE_BENCH_JSON")]
    json: bool,
    /// API key the router requires (sent as `authorization: Bearer <key>`).
    #[arg(long, env = "MOE_BENCH_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

/// What one request measured. Latencies in milliseconds.
#[derive(Default)]
struct Outcome {
    /// `None` when ok, else the gRPC code of the failure.
    error: Option<tonic::Code>,
    tokens: usize,
    ttft_ms: Option<f64>,
    itl_ms: Vec<f64>,
    e2e_ms: f64,
}

/// Deterministic prompt of request `index`: splitmix64 ids in `[low, high)`.
fn prompt(index: usize, len: usize, low: u32, high: u32) -> Vec<u32> {
    let mut state = (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5EED;
    let span = u64::from(high - low);
    (0..len)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            low + (z % span) as u32
        })
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One streaming `Generate`; never fails, a failure is recorded in the outcome.
async fn one(client: &mut GenerationClient<Channel>, a: &BenchServeArgs, index: usize) -> Outcome {
    let request = GenerateRequest {
        prompt_token_ids: prompt(index, a.prompt_tokens, a.vocab_low, a.vocab_high),
        max_tokens: a.max_tokens,
        sampling: Some(SamplingParameters {
            temperature: Some(0.0),
            ..Default::default()
        }),
        ignore_eos: true,
        request_id: format!("bench-{index}"),
        ..Default::default()
    };
    let mut request = tonic::Request::new(request);
    if let Some(key) = &a.api_key {
        match format!("Bearer {key}").parse() {
            Ok(v) => {
                request.metadata_mut().insert("authorization", v);
            }
            // Checked once at start (`run`); a key that is not ASCII never gets here.
            Err(_) => {
                return Outcome {
                    error: Some(tonic::Code::InvalidArgument),
                    ..Outcome::default()
                }
            }
        }
    }
    let mut out = Outcome::default();
    let t0 = Instant::now();
    let result = async {
        let mut stream = client.generate(request).await?.into_inner();
        let mut last: Option<Instant> = None;
        while let Some(msg) = stream.message().await? {
            let k = msg.tokens.len();
            if k == 0 {
                continue;
            }
            let now = Instant::now();
            match last {
                // The first token sets TTFT; the rest of its message came with it.
                None => {
                    out.ttft_ms = Some(ms(now - t0));
                    out.itl_ms.extend(std::iter::repeat_n(0.0, k - 1));
                }
                // A message of k tokens: its gap is spread evenly over them.
                Some(prev) => {
                    let gap = ms(now - prev) / k as f64;
                    out.itl_ms.extend(std::iter::repeat_n(gap, k));
                }
            }
            last = Some(now);
            out.tokens += k;
        }
        Ok::<(), tonic::Status>(())
    }
    .await;
    out.e2e_ms = ms(t0.elapsed());
    if let Err(status) = result {
        tracing::debug!(request = index, %status, "request failed");
        out.error = Some(status.code());
    }
    out
}

/// Runs requests `first..first + count` on `concurrency` workers sharing a counter.
async fn phase(
    client: &GenerationClient<Channel>,
    a: &Arc<BenchServeArgs>,
    first: usize,
    count: usize,
) -> anyhow::Result<Vec<Outcome>> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..a.concurrency.min(count) {
        let (mut client, a, next) = (client.clone(), a.clone(), next.clone());
        workers.spawn(async move {
            let mut outcomes = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    break outcomes;
                }
                outcomes.push(one(&mut client, &a, first + i).await);
            }
        });
    }
    let mut all = Vec::with_capacity(count);
    while let Some(done) = workers.join_next().await {
        all.extend(done.context("bench worker panicked")?);
    }
    Ok(all)
}

/// Nearest-rank percentile of sorted values; `None` when empty.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// p50, p99 and mean of a set of values.
fn summary(mut v: Vec<f64>) -> [Option<f64>; 3] {
    v.sort_by(f64::total_cmp);
    [percentile(&v, 50.0), percentile(&v, 99.0), mean(&v)]
}

fn fmt(x: Option<f64>) -> String {
    x.map_or_else(|| "n/a".to_string(), |x| format!("{x:.2}"))
}

pub fn run(args: BenchServeArgs) -> anyhow::Result<()> {
    if args.concurrency == 0 || args.requests == 0 || args.max_tokens == 0 {
        bail!("--concurrency, --requests and --max-tokens must be >= 1");
    }
    if args.prompt_tokens == 0 {
        bail!("--prompt-tokens must be >= 1");
    }
    if args.vocab_high <= args.vocab_low {
        bail!("--vocab-high must be greater than --vocab-low");
    }
    if let Some(key) = &args.api_key {
        if format!("Bearer {key}")
            .parse::<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>()
            .is_err()
        {
            bail!("--api-key must be printable ASCII");
        }
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?
        .block_on(run_async(args))
}

async fn run_async(args: BenchServeArgs) -> anyhow::Result<()> {
    let target = args.target.clone();
    let uri = if target.contains("://") {
        target.clone()
    } else {
        format!("http://{target}")
    };
    let channel = Endpoint::from_shared(uri)
        .with_context(|| format!("invalid --target {target:?}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .with_context(|| format!("cannot connect to {target}"))?;
    let client = GenerationClient::new(channel);
    let a = Arc::new(args);

    if a.warmup > 0 {
        let warm = phase(&client, &a, 0, a.warmup).await?;
        let failed = warm.iter().filter(|o| o.error.is_some()).count();
        tracing::info!(requests = a.warmup, failed, "warmup done");
    }
    let t0 = Instant::now();
    let outcomes = phase(&client, &a, a.warmup, a.requests).await?;
    let wall = t0.elapsed().as_secs_f64();

    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let (mut ttft, mut itl, mut e2e) = (Vec::new(), Vec::new(), Vec::new());
    let (mut tokens, mut short) = (0usize, 0usize);
    for o in outcomes {
        // Tokens of failed requests were generated too: they count toward throughput.
        tokens += o.tokens;
        if let Some(code) = o.error {
            *errors.entry(format!("{code:?}")).or_default() += 1;
            continue;
        }
        if o.tokens != a.max_tokens as usize {
            short += 1;
        }
        ttft.extend(o.ttft_ms);
        itl.extend(o.itl_ms);
        e2e.push(o.e2e_ms);
    }
    let failed: usize = errors.values().sum();
    let ok = a.requests - failed;
    let tok_s = tokens as f64 / wall;
    // Only successful requests: fast failures (e.g. RESOURCE_EXHAUSTED) must not inflate it.
    let req_s = ok as f64 / wall;
    let [ttft50, ttft99, ttft_mean] = summary(ttft);
    let [itl50, itl99, itl_mean] = summary(itl);
    let [e2e50, e2e99, _] = summary(e2e);

    if a.json {
        let obj = serde_json::json!({
            "target": target, "concurrency": a.concurrency, "prompt_tokens": a.prompt_tokens,
            "max_tokens": a.max_tokens, "warmup": a.warmup, "requests": a.requests,
            "ok": ok, "failed": failed, "errors": errors, "short_ok_requests": short,
            "wall_s": wall, "output_tokens": tokens, "output_tokens_per_s": tok_s,
            "requests_per_s": req_s,
            "ttft_ms": { "p50": ttft50, "p99": ttft99, "mean": ttft_mean },
            "itl_ms": { "p50": itl50, "p99": itl99, "mean": itl_mean },
            "e2e_ms": { "p50": e2e50, "p99": e2e99 },
        });
        crate::out!("{obj}");
        return Ok(());
    }
    let codes: Vec<String> = errors.iter().map(|(c, n)| format!("{c}: {n}")).collect();
    let codes = if codes.is_empty() {
        String::new()
    } else {
        format!(" ({})", codes.join(", "))
    };
    crate::out!(
        "target {target}: concurrency {}, prompt {} tokens, max {} tokens, warmup {}",
        a.concurrency,
        a.prompt_tokens,
        a.max_tokens,
        a.warmup
    );
    crate::out!("requests:        {ok} ok, {failed} failed{codes}");
    if short > 0 {
        crate::out!(
            "warning:         {short} ok requests returned != {} tokens",
            a.max_tokens
        );
    }
    crate::out!("wall time:       {wall:.3} s");
    crate::out!("output tokens/s: {tok_s:.1} ({tokens} tokens)");
    crate::out!("requests/s:      {req_s:.2}");
    crate::out!(
        "TTFT ms:         p50 {}  p99 {}  mean {}",
        fmt(ttft50),
        fmt(ttft99),
        fmt(ttft_mean)
    );
    crate::out!(
        "ITL ms:          p50 {}  p99 {}  mean {}",
        fmt(itl50),
        fmt(itl99),
        fmt(itl_mean)
    );
    crate::out!("E2E ms:          p50 {}  p99 {}", fmt(e2e50), fmt(e2e99));
    Ok(())
}
