//! `moe bench agreement`: how close a lower precision stays to f32 on a checkpoint
//! (teacher-forced next-token agreement and log-probability differences, see
//! `moe_model::agreement`). Prints numbers; asserts nothing.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use moe_model::agreement::compare;
use moe_model::checkpoint::Checkpoint;
use moe_model::{ModelSpec, WeightDtype};

#[derive(clap::Args)]
pub struct BenchAgreementArgs {
    /// Checkpoint directory (e.g. written by `moe checkpoint new --size bench`).
    #[arg(long, env = "MOE_MODEL")]
    model: PathBuf,
    /// The precision compared with the reference.
    #[arg(long, default_value = "int8")]
    dtype: WeightDtype,
    /// The reference precision.
    #[arg(long, default_value = "f32")]
    reference: WeightDtype,
    /// Tokens read (each position is compared).
    #[arg(long, default_value_t = 128)]
    tokens: usize,
}

pub fn run(a: BenchAgreementArgs) -> anyhow::Result<()> {
    let spec = ModelSpec::from_dir(&a.model).context("reading config.json")?;
    let ckpt = Checkpoint::open(&a.model, spec.fp8_block).context("opening the checkpoint")?;
    anyhow::ensure!(a.tokens > 0, "--tokens must be positive");
    let vocab = spec.vocab_size.max(1);
    // A fixed, varied sequence (the same one for every run of this command).
    let tokens: Vec<u32> = (0..a.tokens)
        .map(|i| ((17 + i * 104_729 + i * i * 31) % vocab) as u32)
        .collect();
    let started = Instant::now();
    let r = compare(&ckpt, &spec, a.reference, a.dtype, &tokens)?;
    println!(
        "{} vs {} on {} ({:?}), {} positions: top-1 agreement {:.3} ({} of {}), mean |Δ logprob| {:.4}, max {:.4} ({:.1} s)",
        a.dtype,
        a.reference,
        a.model.display(),
        spec.arch,
        r.positions,
        r.top1_rate(),
        r.same_top1,
        r.positions,
        r.mean_abs_logprob_diff,
        r.max_abs_logprob_diff,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
