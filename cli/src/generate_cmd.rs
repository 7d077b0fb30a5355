//! `moe generate`: offline batch inference. Reads one JSON request per line, runs them
//! all through the engine in-process as one continuously batched workload, writes one
//! JSON result per line in input order. A bad line becomes an error line with its index;
//! the other lines still run.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::Context;
use moe_model::checkpoint::Checkpoint;
use moe_model::{FinishReason, Sampled};
use moe_model::{LocalExperts, Model, ModelSpec, SequenceRequest, Tokenizer, WeightDtype};
use moe_router::metrics::RouterMetrics;
use moe_router::request::{self, SamplingFields};
use moe_router::scheduler::{Engine, EngineConfig, Event};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Checkpoint directory (Hugging Face format).
    #[arg(long, env = "MOE_MODEL")]
    model: PathBuf,
    /// JSONL requests: {"prompt": ...} or {"prompt_token_ids": [...]}, plus sampling fields.
    #[arg(long, env = "MOE_INPUT")]
    input: PathBuf,
    /// JSONL results, one per input line, in input order.
    #[arg(long, env = "MOE_OUTPUT")]
    output: PathBuf,
    /// Compute dtype of the weights on CPU.
    #[arg(long, env = "MOE_DTYPE", default_value = "f32")]
    dtype: WeightDtype,
    /// Tokens per forward step (decode tokens plus prefill chunks).
    #[arg(long, env = "MOE_MAX_BATCH_TOKENS", default_value_t = 512)]
    max_batch_tokens: usize,
    /// Sequences decoded at once.
    #[arg(long, env = "MOE_MAX_RUNNING", default_value_t = 64)]
    max_running: usize,
    /// KV cache capacity in tokens.
    #[arg(long, env = "MOE_KV_TOKENS", default_value_t = 1 << 17)]
    kv_tokens: usize,
    /// The device the routed experts run on, named as for `moe worker --devices`:
    /// `cpu:0` (our CPU kernel), `candle-cpu:0`, or `cuda:N` (a `cuda` build).
    #[arg(long, env = "MOE_GENERATE_DEVICE", default_value = "cpu:0")]
    device: String,
}

/// One input line: a prompt form, `max_tokens`, `logprobs` and the sampling fields the
/// HTTP API takes, validated by the same path as HTTP and gRPC requests
/// ([`moe_router::request`]). Unknown fields are errors, so a typo never silently does
/// nothing.
#[derive(Deserialize)]
struct Line {
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    prompt_token_ids: Option<Vec<u32>>,
    #[serde(default = "default_max_tokens")]
    max_tokens: u32,
    #[serde(default)]
    logprobs: Option<u32>,
    #[serde(flatten)]
    sampling: SamplingFields,
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

fn default_max_tokens() -> u32 {
    16
}

fn to_request(line: Line, tok: &Tokenizer, spec: &ModelSpec) -> anyhow::Result<SequenceRequest> {
    request::reject_unknown(&line.rest, &[])?;
    let mut r = line.sampling.request(line.max_tokens, line.logprobs)?;
    r.prompt = line.prompt;
    r.prompt_token_ids = line.prompt_token_ids;
    Ok(request::build(
        r,
        tok,
        spec,
        &moe_router::limits::RequestLimits::default(),
    )?)
}

/// One finished request.
struct Generated {
    text: String,
    token_ids: Vec<u32>,
    finish_reason: FinishReason,
    /// One entry per token when logprobs were asked for.
    logprobs: Vec<Sampled>,
    prompt_tokens: u32,
}

/// Drains one request's events (blocking: this thread is not a runtime thread).
fn collect(
    mut rx: tokio::sync::mpsc::Receiver<Event>,
    want_logprobs: bool,
) -> Result<Generated, String> {
    let (mut text, mut token_ids, mut logprobs) = (String::new(), Vec::new(), Vec::new());
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Tokens { tokens, text: t } => {
                text.push_str(&t);
                token_ids.extend(tokens.iter().map(|s| s.token_id));
                if want_logprobs {
                    logprobs.extend(tokens);
                }
            }
            Event::Done { reason, usage } => {
                return Ok(Generated {
                    text,
                    token_ids,
                    finish_reason: reason,
                    logprobs,
                    prompt_tokens: usage.prompt_tokens,
                })
            }
            Event::Error(e) => return Err(e.to_string()),
        }
    }
    Err("the engine stopped before the request finished".into())
}

fn result_json(index: usize, g: &Generated) -> serde_json::Value {
    let mut v = json!({
        "index": index,
        "text": g.text,
        "token_ids": g.token_ids,
        "finish_reason": g.finish_reason.as_str(),
        "usage": {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.token_ids.len()},
    });
    if !g.logprobs.is_empty() {
        v["logprobs"] = g
            .logprobs
            .iter()
            .map(|s| {
                json!({
                    "token_id": s.token_id,
                    "logprob": s.logprob,
                    "top_logprobs": s.top_logprobs.iter().map(|(t, l)| json!({"token_id": t, "logprob": l})).collect::<Vec<_>>(),
                })
            })
            .collect();
    }
    v
}

pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    let spec = ModelSpec::from_dir(&a.model)?;
    let ckpt = Checkpoint::open(&a.model, spec.fp8_block)?;
    let tok = Tokenizer::from_dir(&a.model)?;
    let started = std::time::Instant::now();
    let model = {
        let bar = crate::progress::LoadBar::new("dense weights");
        Model::load_with_progress(&ckpt, spec.clone(), a.dtype, &|d, t| bar.report(d, t))?
    };
    let experts = {
        let bar = crate::progress::LoadBar::new("experts");
        let all = LocalExperts::all_of(&spec);
        let device = a
            .device
            .parse::<moe_worker::config::DeviceName>()
            .context("--device")?;
        device
            .open()?
            .load(&ckpt, &spec, &all, a.dtype, &|d, t| bar.report(d, t))?
    };
    tracing::info!(arch = ?spec.arch, dtype = ?a.dtype, secs = started.elapsed().as_secs_f32(), "model loaded");

    let file =
        std::fs::File::open(&a.input).with_context(|| format!("opening {}", a.input.display()))?;
    let mut slots: Vec<Result<usize, String>> = Vec::new();
    let mut requests = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", a.input.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<Line>(&line)
            .map_err(|e| format!("line {}: {e}", i + 1))
            .and_then(|l| to_request(l, &tok, &spec).map_err(|e| format!("line {}: {e:#}", i + 1)));
        match parsed {
            Ok(r) => {
                slots.push(Ok(requests.len()));
                requests.push(r);
            }
            Err(e) => slots.push(Err(e)),
        }
    }
    let n_req = requests.len();
    // The same engine loop as the router's (continuous batching), fed from this file.
    let engine = Engine {
        model: Arc::new(model),
        tokenizer: Arc::new(tok),
        backend: Arc::<dyn moe_model::ExpertStore>::from(experts),
        config: EngineConfig {
            max_batch_tokens: a.max_batch_tokens.max(1),
            max_running: a.max_running.max(1),
            max_waiting: n_req.max(1),
            kv_capacity_tokens: a.kv_tokens,
            test_panic_at_step: None,
        },
        metrics: RouterMetrics::new(),
    }
    .start()?;
    let gen_start = std::time::Instant::now();
    let receivers: Vec<_> = requests
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let want_logprobs = r.sampling.logprobs.is_some();
            (engine.submit(format!("line-{i}"), None, r), want_logprobs)
        })
        .collect();
    let results: Vec<Result<Generated, String>> = receivers
        .into_iter()
        .map(|(rx, want_logprobs)| match rx {
            Ok(rx) => collect(rx, want_logprobs),
            Err(e) => Err(e.to_string()),
        })
        .collect();
    let secs = gen_start.elapsed().as_secs_f64();

    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&a.output)
            .with_context(|| format!("creating {}", a.output.display()))?,
    );
    let (mut ok, mut failed, mut tokens) = (0usize, 0usize, 0usize);
    for (index, slot) in slots.iter().enumerate() {
        let v = match slot {
            Err(e) => {
                failed += 1;
                json!({"index": index, "error": e})
            }
            Ok(ri) => match &results[*ri] {
                Ok(g) => {
                    ok += 1;
                    tokens += g.token_ids.len();
                    result_json(index, g)
                }
                Err(e) => {
                    failed += 1;
                    json!({"index": index, "error": e})
                }
            },
        };
        writeln!(out, "{v}")?;
    }
    out.flush()?;
    eprintln!(
        "{ok} done, {failed} failed; {n_req} requests, {tokens} tokens generated in {secs:.2}s ({:.1} tokens/s)",
        tokens as f64 / secs.max(1e-9)
    );
    Ok(())
}
