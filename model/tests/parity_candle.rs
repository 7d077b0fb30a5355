//! Parity with candle-transformers 0.11.1, an independent implementation of the same
//! Hugging Face architectures, on the same tiny f32 checkpoint: Mixtral, Qwen2-MoE,
//! Qwen3-MoE and DeepSeek-V2 (the four of ours that candle implements).
//!
//! For each, a fixed 12-token prompt is prefilled and 16 tokens are decoded greedily by
//! both engines, each feeding back its own argmax. The last-position logits after the
//! prefill and after every decode step must agree within 1e-4 relative L2, and the two
//! token sequences must be identical. This checks the whole forward pass (attention with
//! its KV cache, RoPE/YaRN, routing, shared experts, norms) against code we did not write,
//! so that a shared misreading of a config field cannot hide in our own unit tests.
//!
//! Qwen2-MoE and DeepSeek-V2 are loaded on our side from a sharded copy of the checkpoint
//! (`model.safetensors.index.json` + several shards) while candle reads the single-file
//! copy written with the same seed, so the sharded loader is checked too.
//!
//! Not covered here: DeepSeek-V2's `group_limited_greedy` routing (candle's top-k picks
//! groups by expert score, not group score, so it is not a reference; the tiny checkpoint
//! uses `greedy`), and mixed batches (tested elsewhere).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{deepseek2, mixtral, qwen2_moe, qwen3_moe};
use moe_model::checkpoint::Checkpoint;
use moe_model::tiny::{self, Size, StoreDtype, TinyOptions};
use moe_model::{Arch, KvPool, LocalExperts, Model, SeqCache, StepSeq, WeightDtype};
use serde_json::{json, Value};

/// A fixed prompt: ids spread over the 512-token tiny vocabulary.
const PROMPT: [u32; 12] = [5, 17, 300, 42, 511, 128, 9, 77, 260, 33, 404, 2];
const DECODE_STEPS: usize = 16;
/// Largest relative L2 distance allowed between our logits and candle's.
const TOLERANCE: f64 = 1e-4;
/// Shard size for the sharded copy: several shards for every tiny architecture.
const SHARD_BYTES: usize = 200_000;

fn write_tiny(dir: &Path, arch: Arch, seed: u64, max_shard_bytes: Option<usize>) {
    let opts = TinyOptions {
        arch,
        size: Size::Tiny,
        dtype: StoreDtype::F32,
        seed,
        max_shard_bytes,
    };
    tiny::write(dir, &opts).expect("write tiny checkpoint");
}

/// Our engine: dense model, every routed expert in-process, one sequence cache.
struct Ours {
    model: Model,
    experts: LocalExperts,
    cache: SeqCache,
}

impl Ours {
    fn load(dir: &Path) -> Ours {
        let model = Model::load(dir, WeightDtype::F32).expect("load our model");
        let spec = model.spec().clone();
        let ckpt = Checkpoint::open(dir, spec.fp8_block).expect("open checkpoint");
        let experts =
            LocalExperts::load(&ckpt, &spec, &LocalExperts::all_of(&spec), WeightDtype::F32)
                .expect("load our experts");
        let cache = KvPool::new(&spec, 4096).new_sequence();
        Ours {
            model,
            experts,
            cache,
        }
    }

    /// Appends `tokens` to the sequence; returns the logits of the last one.
    fn step(&mut self, tokens: &[u32]) -> Vec<f32> {
        let mut batch = [StepSeq {
            tokens,
            cache: &mut self.cache,
        }];
        let mut out = self
            .model
            .forward(&mut batch, &self.experts)
            .expect("our forward");
        assert_eq!(out.len(), 1, "one logits row per sequence");
        out.remove(0)
    }
}

/// candle-transformers' model for the architecture (each keeps its own KV cache).
enum Candle {
    Mixtral(mixtral::Model),
    Qwen2Moe(qwen2_moe::Model),
    Qwen3Moe(qwen3_moe::ModelForCausalLM),
    DeepseekV2(deepseek2::DeepSeekV2),
}

/// Our `config.json`, adapted to what candle's config structs deserialise, with the same
/// meaning.
fn candle_config(arch: Arch, dir: &Path) -> Value {
    let text = std::fs::read_to_string(dir.join("config.json")).expect("read config.json");
    let mut cfg: Value = serde_json::from_str(&text).expect("parse config.json");
    let max_pos = cfg["max_position_embeddings"].clone();
    let obj = cfg.as_object_mut().expect("config.json is an object");
    match arch {
        Arch::Mixtral => {
            // candle wants an integer window; `null` (no window) is a window as long as
            // the model's context.
            if obj.get("sliding_window").is_none_or(Value::is_null) {
                obj.insert("sliding_window".into(), max_pos);
            }
            obj.insert("use_flash_attn".into(), json!(false));
        }
        Arch::Qwen2Moe | Arch::Qwen3Moe => {
            // Required by candle; the defaults are those of the HF config classes.
            obj.entry("use_sliding_window").or_insert(json!(false));
            obj.entry("sliding_window").or_insert(max_pos);
            let layers = obj["num_hidden_layers"].clone();
            obj.entry("max_window_layers").or_insert(layers);
            obj.entry("tie_word_embeddings").or_insert(json!(false));
        }
        Arch::DeepseekV2 => {
            // candle's untagged `DeepSeekV2RopeScaling::Yarn` needs `type` and every
            // YaRN field; take `type` from `rope_type` if only the latter is written.
            if let Some(rs) = obj.get_mut("rope_scaling").and_then(Value::as_object_mut) {
                if !rs.contains_key("type") {
                    let t = rs.get("rope_type").cloned().unwrap_or(json!("yarn"));
                    rs.insert("type".into(), t);
                }
            }
        }
        other => panic!("candle-transformers has no {other:?}"),
    }
    cfg
}

fn parse<T: serde::de::DeserializeOwned>(arch: Arch, cfg: Value) -> T {
    serde_json::from_value(cfg).unwrap_or_else(|e| panic!("candle {arch:?} config: {e}"))
}

impl Candle {
    fn load(arch: Arch, dir: &Path) -> Candle {
        let cfg = candle_config(arch, dir);
        let files: Vec<PathBuf> = vec![dir.join("model.safetensors")];
        // SAFETY: the files are ours, in a private temporary directory, and nothing
        // writes them while they are mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &Device::Cpu) }
            .expect("candle var builder");
        let built = match arch {
            Arch::Mixtral => {
                let c: mixtral::Config = parse(arch, cfg);
                mixtral::Model::new(&c, vb).map(Candle::Mixtral)
            }
            Arch::Qwen2Moe => {
                let c: qwen2_moe::Config = parse(arch, cfg);
                qwen2_moe::Model::new(&c, vb).map(Candle::Qwen2Moe)
            }
            Arch::Qwen3Moe => {
                let c: qwen3_moe::Config = parse(arch, cfg);
                qwen3_moe::ModelForCausalLM::new(&c, vb).map(Candle::Qwen3Moe)
            }
            Arch::DeepseekV2 => {
                let c: deepseek2::DeepSeekV2Config = parse(arch, cfg);
                deepseek2::DeepSeekV2::new(&c, vb).map(Candle::DeepseekV2)
            }
            other => panic!("candle-transformers has no {other:?}"),
        };
        built.unwrap_or_else(|e| panic!("build candle {arch:?}: {e}"))
    }

    /// Runs `tokens` at position `offset`; returns the last position's logits (candle's
    /// models return `[1, 1, vocab]` or `[1, vocab]`: only the last position).
    fn step(&mut self, tokens: &[u32], offset: usize) -> Vec<f32> {
        let input = Tensor::new(tokens, &Device::Cpu)
            .and_then(|t| t.unsqueeze(0))
            .expect("input tensor");
        let out = match self {
            Candle::Mixtral(m) => m.forward(&input, offset),
            Candle::Qwen2Moe(m) => m.forward(&input, offset),
            Candle::Qwen3Moe(m) => m.forward(&input, offset),
            Candle::DeepseekV2(m) => m.forward(&input, offset),
        };
        out.and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .expect("candle forward")
    }
}

/// ||a - b|| / ||b||, in f64.
fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut diff, mut norm) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        diff += (f64::from(*x) - f64::from(*y)).powi(2);
        norm += f64::from(*y).powi(2);
    }
    (diff / norm).sqrt()
}

/// The `k` highest-scoring token ids, best first (ties: lowest id first).
fn top_k(logits: &[f32], k: usize) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    ids.sort_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    ids.truncate(k);
    ids
}

fn argmax(logits: &[f32]) -> u32 {
    top_k(logits, 1)[0]
}

/// Asserts that the two logits rows agree; returns their relative L2 distance.
fn compare(arch: Arch, step: &str, ours: &[f32], theirs: &[f32]) -> f64 {
    assert_eq!(
        ours.len(),
        theirs.len(),
        "{arch:?} {step}: vocab sizes differ (ours {}, candle {})",
        ours.len(),
        theirs.len()
    );
    assert!(
        ours.iter().chain(theirs).all(|x| x.is_finite()),
        "{arch:?} {step}: non-finite logits"
    );
    let err = rel_l2(ours, theirs);
    assert!(
        err < TOLERANCE,
        "{arch:?} {step}: logits differ by {err:.3e} relative L2 (limit {TOLERANCE:.0e}); \
         top-5 ours {:?}, candle {:?}",
        top_k(ours, 5),
        top_k(theirs, 5)
    );
    err
}

/// Writes the tiny checkpoint for `arch`, runs prefill + greedy decode in both engines and
/// compares them at every step. Ours loads from a sharded copy when `sharded`. Returns the
/// largest relative L2 distance seen.
fn check_parity(arch: Arch, seed: u64, sharded: bool) -> f64 {
    let single = tempfile::tempdir().expect("tempdir");
    write_tiny(single.path(), arch, seed, None);
    let shards = tempfile::tempdir().expect("tempdir");
    let ours_dir = if sharded {
        write_tiny(shards.path(), arch, seed, Some(SHARD_BYTES));
        let n = std::fs::read_dir(shards.path())
            .expect("list shards")
            .filter_map(Result::ok)
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with("model-") && name.ends_with(".safetensors")
            })
            .count();
        assert!(n >= 2, "{arch:?}: expected several shards, got {n}");
        assert!(shards.path().join("model.safetensors.index.json").exists());
        assert!(!shards.path().join("model.safetensors").exists());
        shards.path()
    } else {
        single.path()
    };

    let mut ours = Ours::load(ours_dir);
    let mut theirs = Candle::load(arch, single.path());

    let mut a = ours.step(&PROMPT);
    let mut b = theirs.step(&PROMPT, 0);
    let mut max_err = compare(arch, "prefill", &a, &b);

    let mut ours_tokens = Vec::with_capacity(DECODE_STEPS);
    let mut candle_tokens = Vec::with_capacity(DECODE_STEPS);
    for step in 0..DECODE_STEPS {
        let (ta, tb) = (argmax(&a), argmax(&b));
        ours_tokens.push(ta);
        candle_tokens.push(tb);
        assert_eq!(
            ours_tokens,
            candle_tokens,
            "{arch:?} decode step {step}: greedy tokens diverge; top-5 ours {:?}, candle {:?}",
            top_k(&a, 5),
            top_k(&b, 5)
        );
        a = ours.step(&[ta]);
        b = theirs.step(&[tb], PROMPT.len() + step);
        max_err = max_err.max(compare(arch, &format!("decode step {step}"), &a, &b));
    }
    println!("{arch:?}: tokens {ours_tokens:?}, max relative L2 {max_err:.3e}");
    max_err
}

#[test]
fn mixtral_matches_candle() {
    check_parity(Arch::Mixtral, 11, false);
}

#[test]
fn qwen2_moe_matches_candle() {
    check_parity(Arch::Qwen2Moe, 12, true);
}

#[test]
fn qwen3_moe_matches_candle() {
    check_parity(Arch::Qwen3Moe, 13, false);
}

#[test]
fn deepseek_v2_matches_candle() {
    check_parity(Arch::DeepseekV2, 14, true);
}
