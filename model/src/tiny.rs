//! Writes small random-weight checkpoints in the exact Hugging Face layout: `config.json`
//! with the architecture's own field names, `model.safetensors` (or shards with
//! `model.safetensors.index.json`) with the real tensor names, `generation_config.json`,
//! and a real byte-level BPE `tokenizer.json`. Tests, benchmarks and the standalone demo
//! use them because no model hub is reachable.
//!
//! Weights are deterministic in (architecture, size, seed): each tensor draws from its own
//! stream seeded by its name, so every tool that writes the same checkpoint gets the same
//! bytes. They are scaled so activations keep unit size through the layers and the logits
//! are far from flat (a greedy choice never hinges on rounding).

use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, View};
use serde_json::json;

use crate::checkpoint::f32_to_fp8_e4m3;
use crate::config::{
    Arch, AttentionSpec, FfnKind, ModelSpec, QkNorm, RoutingSpec, SharedExpertSpec,
};
use crate::error::ModelError;

/// How big a checkpoint to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    /// hidden 64, 2–3 layers, vocab 512: for tests.
    Tiny,
    /// The mid-size benchmark shape: hidden 1024, 8 layers, 16 heads / 4 KV heads,
    /// 32 experts top-4, expert intermediate 512, vocab 32000.
    Bench,
}

/// Storage dtype of the written weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreDtype {
    F32,
    Bf16,
    /// FP8 e4m3 with 128×128 block scales (`weight_scale_inv`), DeepSeek-V3 style.
    Fp8,
}

impl std::str::FromStr for StoreDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(StoreDtype::F32),
            "bf16" => Ok(StoreDtype::Bf16),
            "fp8" => Ok(StoreDtype::Fp8),
            other => Err(format!(
                "unknown dtype `{other}` (expected f32, bf16 or fp8)"
            )),
        }
    }
}

/// What to write.
#[derive(Debug, Clone)]
pub struct TinyOptions {
    pub arch: Arch,
    pub size: Size,
    pub dtype: StoreDtype,
    pub seed: u64,
    /// Split into shards of at most this many bytes (`None`: one file up to 1 GiB).
    pub max_shard_bytes: Option<usize>,
}

const FP8_BLOCK: usize = 128;

/// The `config.json` for an architecture and size.
pub fn config_json(arch: Arch, size: Size, dtype: StoreDtype) -> serde_json::Value {
    let bench = size == Size::Bench;
    let (hidden, vocab) = if bench { (1024, 32000) } else { (64, 512) };
    let layers = if bench {
        8
    } else if matches!(arch, Arch::Mixtral | Arch::Olmoe) {
        2
    } else {
        3
    };
    let heads = if bench { 16 } else { 4 };
    let kv_heads = if bench { 4 } else { 2 };
    let experts = if bench {
        32
    } else if arch == Arch::DeepseekV3 {
        16
    } else {
        8
    };
    let top_k = if bench || arch == Arch::DeepseekV3 {
        4
    } else {
        2
    };
    let moe_inter = if bench { 512 } else { 48 };
    let dense_inter = if bench { 2048 } else { 128 };
    let max_pos = if bench { 4096 } else { 512 };
    let mut c = json!({
        "architectures": [arch.hf_class()],
        "model_type": arch.model_type(),
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": max_pos,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": false,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "initializer_range": 0.02,
        "use_cache": true,
        "torch_dtype": match dtype { StoreDtype::Bf16 | StoreDtype::Fp8 => "bfloat16", StoreDtype::F32 => "float32" },
    });
    let obj = c.as_object_mut().expect("json! object");
    let mut set = |k: &str, v: serde_json::Value| {
        obj.insert(k.to_owned(), v);
    };
    match arch {
        Arch::Mixtral => {
            set("num_key_value_heads", json!(kv_heads));
            set("intermediate_size", json!(moe_inter));
            set("num_local_experts", json!(experts));
            set("num_experts_per_tok", json!(top_k));
            set("rope_theta", json!(1e6));
            set("sliding_window", serde_json::Value::Null);
            set("router_aux_loss_coef", json!(0.02));
        }
        Arch::Qwen2Moe | Arch::Qwen3Moe => {
            set("num_key_value_heads", json!(kv_heads));
            set("intermediate_size", json!(dense_inter));
            set("moe_intermediate_size", json!(moe_inter));
            set("num_experts", json!(experts));
            set("num_experts_per_tok", json!(top_k));
            set("decoder_sparse_step", json!(1));
            set("mlp_only_layers", json!([]));
            set("rope_theta", json!(1e6));
            set("use_sliding_window", json!(false));
            set("sliding_window", json!(max_pos));
            set("max_window_layers", json!(layers));
            set("attention_dropout", json!(0.0));
            if arch == Arch::Qwen2Moe {
                set("shared_expert_intermediate_size", json!(2 * moe_inter));
                set("norm_topk_prob", json!(false));
            } else {
                // A head_dim that is not hidden/heads, as in the real Qwen3 models.
                set("head_dim", json!(if bench { 64 } else { 32 }));
                set("norm_topk_prob", json!(true));
                set("attention_bias", json!(false));
            }
        }
        Arch::Olmoe => {
            set("num_key_value_heads", json!(heads));
            set("intermediate_size", json!(moe_inter));
            set("num_experts", json!(experts));
            set("num_experts_per_tok", json!(top_k));
            set("norm_topk_prob", json!(false));
            set("rope_theta", json!(10000.0));
            set("clip_qkv", serde_json::Value::Null);
            set("attention_bias", json!(false));
            set("rms_norm_eps", json!(1e-5));
        }
        Arch::DeepseekV2 | Arch::DeepseekV3 => {
            let v3 = arch == Arch::DeepseekV3;
            let (lora, nope, rope, v) = if bench {
                (256, 64, 32, 64)
            } else {
                (32, 16, 8, 16)
            };
            set("num_key_value_heads", json!(heads));
            set("intermediate_size", json!(dense_inter));
            set("moe_intermediate_size", json!(moe_inter));
            set("n_routed_experts", json!(experts));
            set("n_shared_experts", json!(1));
            set("num_experts_per_tok", json!(top_k));
            set("first_k_dense_replace", json!(1));
            set("moe_layer_freq", json!(1));
            set("kv_lora_rank", json!(lora));
            set(
                "q_lora_rank",
                if v3 {
                    json!(if bench { 384 } else { 48 })
                } else {
                    serde_json::Value::Null
                },
            );
            set("qk_nope_head_dim", json!(nope));
            set("qk_rope_head_dim", json!(rope));
            set("head_dim", json!(rope));
            set("v_head_dim", json!(v));
            set("rope_theta", json!(10000.0));
            set("attention_bias", json!(false));
            set("attention_dropout", json!(0.0));
            set("rope_interleave", json!(true));
            let orig = max_pos / 4;
            let ms = if v3 { 1.0 } else { 0.707 };
            set(
                "rope_scaling",
                json!({"type": "yarn", "rope_type": "yarn", "factor": 4.0,
                       "original_max_position_embeddings": orig, "beta_fast": 32, "beta_slow": 1,
                       "mscale": ms, "mscale_all_dim": ms}),
            );
            if v3 {
                set("n_group", json!(4));
                set("topk_group", json!(2));
                set("topk_method", json!("noaux_tc"));
                set("scoring_func", json!("sigmoid"));
                set("norm_topk_prob", json!(true));
                set("routed_scaling_factor", json!(2.5));
            } else {
                set("n_group", json!(1));
                set("topk_group", json!(1));
                set("topk_method", json!("greedy"));
                set("scoring_func", json!("softmax"));
                set("norm_topk_prob", json!(false));
                set("routed_scaling_factor", json!(1.0));
            }
        }
    }
    if dtype == StoreDtype::Fp8 {
        set(
            "quantization_config",
            json!({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                   "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}),
        );
    }
    c
}

/// How a tensor's random values are drawn.
#[derive(Clone, Copy)]
enum Init {
    /// Uniform with this standard deviation, centred on 0.
    Std(f32),
    /// `1 + U(-a, a)`: norm weights.
    AroundOne(f32),
    /// `U(lo, hi)`.
    Range(f32, f32),
}

struct TensorPlan {
    name: String,
    shape: Vec<usize>,
    init: Init,
    /// Quantised in an FP8 checkpoint (projection matrices, not embeddings/norms/gates).
    quantisable: bool,
}

fn plan(spec: &ModelSpec) -> Vec<TensorPlan> {
    let h = spec.hidden_size;
    let mut out = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, init: Init, q: bool| {
        out.push(TensorPlan {
            name,
            shape,
            init,
            quantisable: q,
        });
    };
    let lin = |fan_in: usize| Init::Std(1.0 / (fan_in as f32).sqrt());
    add(
        "model.embed_tokens.weight".into(),
        vec![spec.vocab_size, h],
        Init::Std(1.0),
        false,
    );
    for i in 0..spec.num_layers {
        let p = format!("model.layers.{i}");
        add(
            format!("{p}.input_layernorm.weight"),
            vec![h],
            Init::AroundOne(0.1),
            false,
        );
        add(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            Init::AroundOne(0.1),
            false,
        );
        let a = format!("{p}.self_attn");
        match &spec.attention {
            AttentionSpec::Standard {
                num_heads,
                num_kv_heads,
                head_dim,
                qkv_bias,
                qk_norm,
                ..
            } => {
                let (q, kv) = (num_heads * head_dim, num_kv_heads * head_dim);
                for (n, rows) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
                    add(format!("{a}.{n}.weight"), vec![rows, h], lin(h), true);
                    if *qkv_bias {
                        add(
                            format!("{a}.{n}.bias"),
                            vec![rows],
                            Init::Range(-0.1, 0.1),
                            false,
                        );
                    }
                }
                add(format!("{a}.o_proj.weight"), vec![h, q], lin(q), true);
                let (qn, kn) = match qk_norm {
                    QkNorm::None => (0, 0),
                    QkNorm::PerHead => (*head_dim, *head_dim),
                    QkNorm::Full => (q, kv),
                };
                if qn > 0 {
                    add(
                        format!("{a}.q_norm.weight"),
                        vec![qn],
                        Init::AroundOne(0.1),
                        false,
                    );
                    add(
                        format!("{a}.k_norm.weight"),
                        vec![kn],
                        Init::AroundOne(0.1),
                        false,
                    );
                }
            }
            AttentionSpec::Mla {
                num_heads,
                q_lora_rank,
                kv_lora_rank,
                qk_nope_head_dim,
                qk_rope_head_dim,
                v_head_dim,
            } => {
                let qhd = qk_nope_head_dim + qk_rope_head_dim;
                match q_lora_rank {
                    Some(r) => {
                        add(format!("{a}.q_a_proj.weight"), vec![*r, h], lin(h), true);
                        add(
                            format!("{a}.q_a_layernorm.weight"),
                            vec![*r],
                            Init::AroundOne(0.1),
                            false,
                        );
                        add(
                            format!("{a}.q_b_proj.weight"),
                            vec![num_heads * qhd, *r],
                            lin(*r),
                            true,
                        );
                    }
                    None => add(
                        format!("{a}.q_proj.weight"),
                        vec![num_heads * qhd, h],
                        lin(h),
                        true,
                    ),
                }
                add(
                    format!("{a}.kv_a_proj_with_mqa.weight"),
                    vec![kv_lora_rank + qk_rope_head_dim, h],
                    lin(h),
                    true,
                );
                add(
                    format!("{a}.kv_a_layernorm.weight"),
                    vec![*kv_lora_rank],
                    Init::AroundOne(0.1),
                    false,
                );
                add(
                    format!("{a}.kv_b_proj.weight"),
                    vec![num_heads * (qk_nope_head_dim + v_head_dim), *kv_lora_rank],
                    lin(*kv_lora_rank),
                    true,
                );
                add(
                    format!("{a}.o_proj.weight"),
                    vec![h, num_heads * v_head_dim],
                    lin(num_heads * v_head_dim),
                    true,
                );
            }
        }
        let ffn = |add: &mut dyn FnMut(String, Vec<usize>, Init, bool),
                   names: [String; 3],
                   inter: usize| {
            add(names[0].clone(), vec![inter, h], lin(h), true);
            add(names[1].clone(), vec![inter, h], lin(h), true);
            add(names[2].clone(), vec![h, inter], lin(inter), true);
        };
        let names3 = |prefix: &str| {
            [
                format!("{prefix}.gate_proj.weight"),
                format!("{prefix}.up_proj.weight"),
                format!("{prefix}.down_proj.weight"),
            ]
        };
        match spec.layers[i] {
            FfnKind::Dense => ffn(
                &mut add,
                names3(&format!("{p}.mlp")),
                spec.dense_intermediate_size,
            ),
            FfnKind::Moe => {
                let mp = format!("{p}.{}", spec.moe_prefix);
                let e = spec.moe.num_experts;
                add(
                    format!("{mp}.gate.weight"),
                    vec![e, h],
                    Init::Std(2.0 / (h as f32).sqrt()),
                    false,
                );
                if matches!(spec.moe.routing, RoutingSpec::DeepseekV3 { .. }) {
                    add(
                        format!("{mp}.gate.e_score_correction_bias"),
                        vec![e],
                        Init::Range(-0.01, 0.03),
                        false,
                    );
                }
                for x in 0..e {
                    ffn(
                        &mut add,
                        spec.expert_tensor_names(i, x),
                        spec.moe.intermediate_size,
                    );
                }
                match spec.moe.shared {
                    SharedExpertSpec::None => {}
                    SharedExpertSpec::GatedQwen { intermediate_size } => {
                        ffn(
                            &mut add,
                            names3(&format!("{mp}.shared_expert")),
                            intermediate_size,
                        );
                        add(
                            format!("{mp}.shared_expert_gate.weight"),
                            vec![1, h],
                            lin(h),
                            false,
                        );
                    }
                    SharedExpertSpec::Plain { intermediate_size } => ffn(
                        &mut add,
                        names3(&format!("{mp}.shared_experts")),
                        intermediate_size,
                    ),
                }
            }
        }
    }
    add(
        "model.norm.weight".into(),
        vec![h],
        Init::AroundOne(0.1),
        false,
    );
    add(
        "lm_head.weight".into(),
        vec![spec.vocab_size, h],
        Init::Std(4.0 / (h as f32).sqrt()),
        false,
    );
    out
}

/// splitmix64: a tiny, well-mixed generator; one stream per tensor.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

fn values(t: &TensorPlan, seed: u64) -> Vec<f32> {
    let n: usize = t.shape.iter().product();
    let mut rng = SplitMix(fnv1a(&t.name) ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    // U(-√3σ, √3σ) has standard deviation σ.
    let s3 = 3f32.sqrt();
    (0..n)
        .map(|_| {
            let u = rng.unit();
            match t.init {
                Init::Std(s) => (2.0 * u - 1.0) * s3 * s,
                Init::AroundOne(a) => 1.0 + (2.0 * u - 1.0) * a,
                Init::Range(lo, hi) => lo + u * (hi - lo),
            }
        })
        .collect()
}

/// A tensor ready to serialise.
struct Blob {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Blob {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn encode(t: &TensorPlan, v: Vec<f32>, dtype: StoreDtype) -> Vec<(String, Blob)> {
    match dtype {
        StoreDtype::F32 => vec![(
            t.name.clone(),
            Blob {
                dtype: Dtype::F32,
                shape: t.shape.clone(),
                data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            },
        )],
        StoreDtype::Fp8 if t.quantisable && t.shape.len() == 2 => {
            let (rows, cols) = (t.shape[0], t.shape[1]);
            let (sr, sc) = (rows.div_ceil(FP8_BLOCK), cols.div_ceil(FP8_BLOCK));
            let mut scales = vec![0f32; sr * sc];
            for r in 0..rows {
                for c in 0..cols {
                    let s = &mut scales[(r / FP8_BLOCK) * sc + c / FP8_BLOCK];
                    *s = s.max(v[r * cols + c].abs());
                }
            }
            for s in scales.iter_mut() {
                *s = if *s > 0.0 { *s / 448.0 } else { 1.0 };
            }
            let q: Vec<u8> = (0..rows * cols)
                .map(|i| {
                    f32_to_fp8_e4m3(
                        v[i] / scales[(i / cols / FP8_BLOCK) * sc + (i % cols) / FP8_BLOCK],
                    )
                })
                .collect();
            vec![
                (
                    t.name.clone(),
                    Blob {
                        dtype: Dtype::F8_E4M3,
                        shape: t.shape.clone(),
                        data: q,
                    },
                ),
                (
                    format!("{}_scale_inv", t.name),
                    Blob {
                        dtype: Dtype::F32,
                        shape: vec![sr, sc],
                        data: scales.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    },
                ),
            ]
        }
        StoreDtype::Bf16 | StoreDtype::Fp8 => vec![(
            t.name.clone(),
            Blob {
                dtype: Dtype::BF16,
                shape: t.shape.clone(),
                data: v
                    .iter()
                    .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                    .collect(),
            },
        )],
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> ModelError + '_ {
    move |e| ModelError::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

fn write_json(path: PathBuf, v: &serde_json::Value) -> Result<(), ModelError> {
    let text = serde_json::to_string_pretty(v).map_err(|e| ModelError::Checkpoint {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    std::fs::write(&path, text + "\n").map_err(io_err(&path))
}

/// Writes a checkpoint into `dir` (created if missing). Returns the parsed spec.
pub fn write(dir: &Path, opts: &TinyOptions) -> Result<ModelSpec, ModelError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let config = config_json(opts.arch, opts.size, opts.dtype);
    let spec = ModelSpec::from_json(&config.to_string())?;
    write_json(dir.join("config.json"), &config)?;
    write_json(
        dir.join("generation_config.json"),
        &json!({"bos_token_id": 0, "eos_token_id": 1, "do_sample": false}),
    )?;
    crate::demo_tokenizer::write(dir, spec.vocab_size).map_err(|e| ModelError::Checkpoint {
        path: dir.join("tokenizer.json"),
        reason: e.to_string(),
    })?;
    // The architecture's own chat template replaces the generic one.
    let tc_path = dir.join(crate::tokenizer::TOKENIZER_CONFIG_FILE);
    let mut tc: serde_json::Value = std::fs::read_to_string(&tc_path)
        .map_err(io_err(&tc_path))
        .and_then(|t| {
            serde_json::from_str(&t).map_err(|e| ModelError::Checkpoint {
                path: tc_path.clone(),
                reason: e.to_string(),
            })
        })?;
    tc["chat_template"] = json!(crate::chat_templates::for_arch(opts.arch));
    write_json(tc_path, &tc)?;

    let max_shard = opts.max_shard_bytes.unwrap_or(1 << 30);
    let mut shards: Vec<Vec<(String, Blob)>> = vec![Vec::new()];
    let mut shard_bytes = 0usize;
    let mut total = 0usize;
    for t in plan(&spec) {
        let blobs = encode(&t, values(&t, opts.seed), opts.dtype);
        let bytes: usize = blobs.iter().map(|(_, b)| b.data.len()).sum();
        if shard_bytes > 0 && shard_bytes + bytes > max_shard {
            shards.push(Vec::new());
            shard_bytes = 0;
        }
        shard_bytes += bytes;
        total += bytes;
        if let Some(last) = shards.last_mut() {
            last.extend(blobs);
        }
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.into_iter().enumerate() {
        let file = if n == 1 {
            "model.safetensors".to_owned()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
        };
        for (name, _) in &shard {
            weight_map.insert(name.clone(), json!(file));
        }
        let path = dir.join(&file);
        let meta = std::collections::HashMap::from([("format".to_owned(), "pt".to_owned())]);
        safetensors::serialize_to_file(
            shard.iter().map(|(k, b)| (k.as_str(), b)),
            Some(meta),
            &path,
        )
        .map_err(|e| ModelError::Checkpoint {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    }
    if n > 1 {
        write_json(
            dir.join("model.safetensors.index.json"),
            &json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
        )?;
    }
    Ok(spec)
}
