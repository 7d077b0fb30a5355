//! `moe bench engine`: decode throughput of the in-process engine at several batch sizes
//! after a fixed-length prompt, and of candle-transformers' Mixtral on the same
//! checkpoint in the same run (when the checkpoint is a Mixtral), and the routed experts
//! alone (one MoE layer's call over `batch` rows, on `--device`). Prints numbers;
//! asserts nothing.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use moe_model::checkpoint::Checkpoint;
use moe_model::experts::MoeRequest;
use moe_model::{
    Arch, ExpertBackend, ExpertStore, KvPool, LocalExperts, Model, ModelSpec, StepSeq, WeightDtype,
};

#[derive(clap::Args)]
pub struct BenchEngineArgs {
    /// Checkpoint directory (e.g. written by `moe checkpoint new --size bench`).
    #[arg(long, env = "MOE_MODEL")]
    model: PathBuf,
    /// Batch sizes to measure, comma-separated.
    #[arg(
        long,
        env = "MOE_BENCH_BATCH",
        value_delimiter = ',',
        default_value = "1,8,32"
    )]
    batch: Vec<usize>,
    /// Prompt length before decoding starts.
    #[arg(long, env = "MOE_BENCH_PROMPT_TOKENS", default_value_t = 128)]
    prompt_tokens: usize,
    /// Decode steps timed per batch size.
    #[arg(long, env = "MOE_BENCH_DECODE_TOKENS", default_value_t = 32)]
    decode_tokens: usize,
    /// Weight dtype of our engine.
    #[arg(long, env = "MOE_DTYPE", default_value = "f32")]
    dtype: WeightDtype,
    /// The device the routed experts run on, named as for `moe worker --devices`:
    /// `cpu:0` (our CPU kernel), `candle-cpu:0`, or `cuda:N` (a `cuda` build).
    #[arg(long, env = "MOE_BENCH_DEVICE", default_value = "cpu:0")]
    device: String,
    /// Skip the candle-transformers comparison.
    #[arg(long, env = "MOE_BENCH_NO_CANDLE")]
    no_candle: bool,
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn prompts(batch: usize, len: usize, vocab: usize) -> Vec<Vec<u32>> {
    (0..batch)
        .map(|b| {
            (0..len)
                .map(|i| ((b * 7919 + i * 104_729 + 17) % vocab) as u32)
                .collect()
        })
        .collect()
}

/// Our engine: returns (prefill tokens/s, decode tokens/s).
fn ours(
    model: &Model,
    experts: &dyn ExpertBackend,
    batch: usize,
    a: &BenchEngineArgs,
) -> anyhow::Result<(f64, f64)> {
    let spec = model.spec();
    let pool = KvPool::new(spec, batch * (a.prompt_tokens + a.decode_tokens + 32));
    let ps = prompts(batch, a.prompt_tokens, spec.vocab_size);
    let mut caches: Vec<_> = (0..batch).map(|_| pool.new_sequence()).collect();
    let mut step: Vec<StepSeq<'_>> = ps
        .iter()
        .zip(caches.iter_mut())
        .map(|(p, c)| StepSeq {
            tokens: p,
            cache: c,
        })
        .collect();
    let t_prefill = Instant::now();
    let logits = model.forward(&mut step, experts)?;
    let prefill = (batch * a.prompt_tokens) as f64 / t_prefill.elapsed().as_secs_f64();
    drop(step);
    let mut next: Vec<[u32; 1]> = logits.iter().map(|l| [argmax(l)]).collect();
    let t0 = Instant::now();
    for _ in 0..a.decode_tokens {
        let mut step: Vec<StepSeq<'_>> = next
            .iter()
            .zip(caches.iter_mut())
            .map(|(t, c)| StepSeq {
                tokens: t,
                cache: c,
            })
            .collect();
        let logits = model.forward(&mut step, experts)?;
        next = logits.iter().map(|l| [argmax(l)]).collect();
    }
    let decode = (batch * a.decode_tokens) as f64 / t0.elapsed().as_secs_f64();
    Ok((prefill, decode))
}

/// The routed experts alone: one MoE layer's call over `batch` rows routed top-k over
/// every expert, repeated over each MoE layer; returns rows/s.
fn experts_alone(
    spec: &ModelSpec,
    experts: &dyn ExpertBackend,
    batch: usize,
) -> anyhow::Result<f64> {
    let (h, k, e) = (spec.hidden_size, spec.moe.top_k, spec.moe.num_experts);
    let rows: Vec<f32> = (0..batch * h)
        .map(|i| ((i * 2_654_435_761) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let ids: Vec<u32> = (0..batch * k)
        .map(|i| ((i / k * 7 + i % k) % e) as u32)
        .collect();
    let weights = vec![1.0 / k as f32; batch * k];
    let layers: Vec<usize> = spec.moe_layers().collect();
    let call = |layer| {
        experts.forward(&MoeRequest {
            layer,
            hidden: h,
            top_k: k,
            rows: &rows,
            expert_ids: &ids,
            weights: &weights,
        })
    };
    call(layers[0])?; // warm up (a GPU compiles its kernels on first use)
    let reps = 3;
    let t0 = Instant::now();
    for _ in 0..reps {
        for &l in &layers {
            call(l)?;
        }
    }
    Ok((reps * layers.len() * batch) as f64 / t0.elapsed().as_secs_f64())
}

/// candle-transformers' Mixtral on the same files: returns decode tokens/s.
#[cfg(feature = "candle-reference")]
fn candle_mixtral(
    dir: &std::path::Path,
    spec: &ModelSpec,
    batch: usize,
    a: &BenchEngineArgs,
) -> anyhow::Result<f64> {
    use candle_core::{DType, Device, Tensor};
    use candle_transformers::models::mixtral;
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    cfg["use_flash_attn"] = false.into();
    if cfg["sliding_window"].is_null() {
        cfg["sliding_window"] = spec.max_position_embeddings.into();
    }
    let cfg: mixtral::Config = serde_json::from_value(cfg).context("candle mixtral config")?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    let dev = Device::Cpu;
    // SAFETY: read-only mapping of files this process does not modify.
    let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&files, DType::F32, &dev)? };
    let mut m = mixtral::Model::new(&cfg, vb)?;
    let ps = prompts(batch, a.prompt_tokens, spec.vocab_size);
    let flat: Vec<u32> = ps.concat();
    let input = Tensor::from_vec(flat, (batch, a.prompt_tokens), &dev)?;
    let logits = m.forward(&input, 0)?;
    let mut next = logits
        .squeeze(1)
        .unwrap_or(logits)
        .argmax(candle_core::D::Minus1)?;
    let t0 = Instant::now();
    for i in 0..a.decode_tokens {
        let input = next.reshape((batch, 1))?;
        let logits = m.forward(&input, a.prompt_tokens + i)?;
        next = logits
            .squeeze(1)
            .unwrap_or(logits)
            .argmax(candle_core::D::Minus1)?;
    }
    Ok((batch * a.decode_tokens) as f64 / t0.elapsed().as_secs_f64())
}

/// Built without the reference engine (the container image leaves it out).
#[cfg(not(feature = "candle-reference"))]
fn candle_mixtral(
    _: &std::path::Path,
    _: &ModelSpec,
    _: usize,
    _: &BenchEngineArgs,
) -> anyhow::Result<f64> {
    anyhow::bail!("this moe was built without the candle-reference feature; pass --no-candle")
}

pub fn run(a: BenchEngineArgs) -> anyhow::Result<()> {
    let spec = ModelSpec::from_dir(&a.model)?;
    let ckpt = Checkpoint::open(&a.model, spec.fp8_block)?;
    let model = Model::load_from(&ckpt, spec.clone(), a.dtype)?;
    let device = a
        .device
        .parse::<moe_worker::config::DeviceName>()
        .context("--device")?;
    let experts: Box<dyn ExpertStore> = device.open()?.load(
        &ckpt,
        &spec,
        &LocalExperts::all_of(&spec),
        a.dtype,
        &moe_model::progress::quiet,
    )?;
    let with_candle = !a.no_candle && spec.arch == Arch::Mixtral;
    crate::out!(
        "engine bench: {} hidden {} layers {} experts {} top-{} vocab {}; weights {:?}; experts on {}; {} threads; prompt {} tokens, {} decode steps",
        spec.arch.hf_class(),
        spec.hidden_size,
        spec.num_layers,
        spec.moe.num_experts,
        spec.moe.top_k,
        spec.vocab_size,
        a.dtype,
        device,
        rayon::current_num_threads(),
        a.prompt_tokens,
        a.decode_tokens
    );
    let hosted = experts.hosted().len().max(1);
    crate::out!(
        "memory: {:.2} MB per routed expert ({} experts, {:.1} MB in all)",
        experts.weight_bytes() as f64 / hosted as f64 / 1e6,
        experts.hosted().len(),
        experts.weight_bytes() as f64 / 1e6
    );
    crate::out!(
        "{:>6} {:>16} {:>22} {:>20} {:>18}",
        "batch",
        "moe decode tok/s",
        "candle decode tok/s",
        "moe prefill tok/s",
        "experts rows/s"
    );
    for &b in &a.batch {
        let (prefill, ours) = ours(&model, &*experts, b, &a)?;
        let alone = experts_alone(&spec, &*experts, b)?;
        let theirs = if with_candle {
            format!("{:.1}", candle_mixtral(&a.model, &spec, b, &a)?)
        } else {
            "n/a".to_owned()
        };
        crate::out!("{b:>6} {ours:>16.1} {theirs:>22} {prefill:>20.0} {alone:>18.0}");
    }
    Ok(())
}
