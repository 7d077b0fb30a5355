//! `moe checkpoint new`: writes a small random-weight checkpoint in the Hugging Face
//! format (see `moe_model::tiny`).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Subcommand, ValueEnum};
use moe_model::tiny::{self, Size, StoreDtype, TinyOptions};
use moe_model::Arch;

#[derive(Subcommand)]
pub enum CheckpointCommand {
    /// Write a random-weight checkpoint (config.json, safetensors, tokenizer.json).
    New(NewArgs),
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ArchArg {
    Mixtral,
    #[value(name = "qwen2_moe")]
    Qwen2Moe,
    #[value(name = "qwen3_moe")]
    Qwen3Moe,
    #[value(name = "deepseek_v2")]
    DeepseekV2,
    #[value(name = "deepseek_v3")]
    DeepseekV3,
    Olmoe,
}

impl From<ArchArg> for Arch {
    fn from(a: ArchArg) -> Arch {
        match a {
            ArchArg::Mixtral => Arch::Mixtral,
            ArchArg::Qwen2Moe => Arch::Qwen2Moe,
            ArchArg::Qwen3Moe => Arch::Qwen3Moe,
            ArchArg::DeepseekV2 => Arch::DeepseekV2,
            ArchArg::DeepseekV3 => Arch::DeepseekV3,
            ArchArg::Olmoe => Arch::Olmoe,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum SizeArg {
    /// hidden 64, vocab 512: for tests and demos.
    Tiny,
    /// hidden 1024, 8 layers, 32 experts top-4, vocab 32000: for benchmarks.
    Bench,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum DtypeArg {
    F32,
    Bf16,
    Fp8,
}

#[derive(clap::Args)]
pub struct NewArgs {
    /// Architecture to write.
    #[arg(long, env = "MOE_ARCH", value_enum)]
    arch: ArchArg,
    /// Output directory (created if missing).
    #[arg(long, env = "MOE_OUT")]
    out: PathBuf,
    /// Storage dtype of the weights.
    #[arg(long, env = "MOE_DTYPE", value_enum, default_value = "f32")]
    dtype: DtypeArg,
    /// Seed of the random weights (same seed, same bytes).
    #[arg(long, env = "MOE_SEED", default_value_t = 0)]
    seed: u64,
    /// Model size preset.
    #[arg(long, env = "MOE_SIZE", value_enum, default_value = "tiny")]
    size: SizeArg,
    /// Split the weights into shards of at most this many MiB.
    #[arg(long, env = "MOE_SHARD_MIB")]
    shard_mib: Option<usize>,
}

pub fn run(cmd: CheckpointCommand) -> anyhow::Result<()> {
    match cmd {
        CheckpointCommand::New(a) => {
            let opts = TinyOptions {
                arch: a.arch.into(),
                size: match a.size {
                    SizeArg::Tiny => Size::Tiny,
                    SizeArg::Bench => Size::Bench,
                },
                dtype: match a.dtype {
                    DtypeArg::F32 => StoreDtype::F32,
                    DtypeArg::Bf16 => StoreDtype::Bf16,
                    DtypeArg::Fp8 => StoreDtype::Fp8,
                },
                seed: a.seed,
                max_shard_bytes: a.shard_mib.map(|m| m.max(1) << 20),
            };
            let spec = tiny::write(&a.out, &opts)
                .with_context(|| format!("writing checkpoint to {}", a.out.display()))?;
            crate::out!(
                "wrote {} checkpoint ({} layers, {} experts top-{}, hidden {}, vocab {}) with random weights to {}",
                spec.arch.hf_class(),
                spec.num_layers,
                spec.moe.num_experts,
                spec.moe.top_k,
                spec.hidden_size,
                spec.vocab_size,
                a.out.display()
            );
            Ok(())
        }
    }
}
