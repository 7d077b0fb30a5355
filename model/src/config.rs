//! Reads a Hugging Face `config.json` and turns it into one [`ModelSpec`]: the shape of the
//! model as data (attention kind, per-layer feed-forward kind, routing rule, norms, RoPE),
//! so that the six supported architectures share one implementation of every block instead
//! of six copies of it.
//!
//! Field names follow the checkpoints' own `config.json`; every architecture-specific rule
//! (which layers are MoE, how top-k weights are formed) is decided here, once.

use std::path::Path;

use serde::Deserialize;

use crate::error::ModelError;

/// The architectures this engine knows, keyed by `architectures[0]` in `config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    Mixtral,
    Qwen2Moe,
    Qwen3Moe,
    DeepseekV2,
    DeepseekV3,
    Olmoe,
}

impl Arch {
    /// Every architecture, in a fixed order.
    pub const ALL: [Arch; 6] = [
        Arch::Mixtral,
        Arch::Qwen2Moe,
        Arch::Qwen3Moe,
        Arch::DeepseekV2,
        Arch::DeepseekV3,
        Arch::Olmoe,
    ];

    /// The Hugging Face class name (`architectures[0]`).
    pub fn hf_class(self) -> &'static str {
        match self {
            Arch::Mixtral => "MixtralForCausalLM",
            Arch::Qwen2Moe => "Qwen2MoeForCausalLM",
            Arch::Qwen3Moe => "Qwen3MoeForCausalLM",
            Arch::DeepseekV2 => "DeepseekV2ForCausalLM",
            Arch::DeepseekV3 => "DeepseekV3ForCausalLM",
            Arch::Olmoe => "OlmoeForCausalLM",
        }
    }

    /// The Hugging Face `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Mixtral => "mixtral",
            Arch::Qwen2Moe => "qwen2_moe",
            Arch::Qwen3Moe => "qwen3_moe",
            Arch::DeepseekV2 => "deepseek_v2",
            Arch::DeepseekV3 => "deepseek_v3",
            Arch::Olmoe => "olmoe",
        }
    }

    /// Parses the short name used on the command line (`mixtral`, `deepseek_v3`, ...).
    pub fn from_short_name(name: &str) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.model_type() == name)
    }

    fn from_hf_class(name: &str) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.hf_class() == name)
    }
}

/// How attention is computed and what the KV cache holds.
#[derive(Debug, Clone, PartialEq)]
pub enum AttentionSpec {
    /// Multi-head / grouped-query attention with a key and value per KV head.
    Standard {
        num_heads: usize,
        num_kv_heads: usize,
        head_dim: usize,
        /// q, k and v projections carry a bias (Qwen2-MoE).
        qkv_bias: bool,
        /// RMSNorm on q and k before RoPE.
        qk_norm: QkNorm,
        /// Clamp q, k, v to ±this value (OLMoE's `clip_qkv`).
        clip_qkv: Option<f32>,
    },
    /// DeepSeek's multi-head latent attention: the cache holds the compressed latent
    /// (`kv_lora_rank`) plus the shared RoPE key (`qk_rope_head_dim`) per token.
    Mla {
        num_heads: usize,
        q_lora_rank: Option<usize>,
        kv_lora_rank: usize,
        qk_nope_head_dim: usize,
        qk_rope_head_dim: usize,
        v_head_dim: usize,
    },
}

/// Where q/k normalisation applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// One RMSNorm of width `head_dim`, shared by every head (Qwen3-MoE).
    PerHead,
    /// One RMSNorm over the whole projection (OLMoE).
    Full,
}

/// Rotary position embedding parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeSpec {
    pub theta: f64,
    /// Number of rotated dimensions per head.
    pub dim: usize,
    /// Pairs are adjacent (`x[2i], x[2i+1]`, DeepSeek's MLA) instead of split halves.
    pub interleaved: bool,
    pub yarn: Option<YarnSpec>,
}

/// YaRN context extension (DeepSeek-V2/V3).
#[derive(Debug, Clone, PartialEq)]
pub struct YarnSpec {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: f64,
    pub mscale_all_dim: f64,
}

/// How a token's gate logits become its top-k experts and their weights.
#[derive(Debug, Clone, PartialEq)]
pub enum RoutingSpec {
    /// softmax over all experts, top-k; optionally renormalised (Mixtral always, Qwen and
    /// OLMoE by `norm_topk_prob`).
    SoftmaxTopK { norm_topk_prob: bool },
    /// DeepSeek-V2: softmax, then greedy or group-limited (group score = max) top-k;
    /// renormalised when `norm_topk_prob` and k > 1, otherwise scaled by
    /// `routed_scaling_factor`.
    DeepseekV2 {
        group_limited: bool,
        n_group: usize,
        topk_group: usize,
        norm_topk_prob: bool,
        routed_scaling_factor: f32,
    },
    /// DeepSeek-V3: sigmoid scores; selection on scores plus `e_score_correction_bias`
    /// within the best `topk_group` groups (group score = sum of its top two); weights are
    /// the unbiased scores, optionally renormalised, always scaled.
    DeepseekV3 {
        n_group: usize,
        topk_group: usize,
        norm_topk_prob: bool,
        routed_scaling_factor: f32,
    },
}

/// Shared (always-on) experts of a MoE layer.
#[derive(Debug, Clone, PartialEq)]
pub enum SharedExpertSpec {
    None,
    /// Qwen2-MoE: one FFN scaled by `sigmoid(shared_expert_gate(x))`.
    GatedQwen {
        intermediate_size: usize,
    },
    /// DeepSeek: one FFN of `n_shared_experts * moe_intermediate_size`, added as is.
    Plain {
        intermediate_size: usize,
    },
}

/// The MoE part shared by every MoE layer of the model.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeSpec {
    pub num_experts: usize,
    pub top_k: usize,
    pub intermediate_size: usize,
    pub routing: RoutingSpec,
    pub shared: SharedExpertSpec,
}

/// One layer's feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FfnKind {
    Dense,
    Moe,
}

/// Largest `config.json` read (real ones are a few kilobytes).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The whole model as data.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub rms_norm_eps: f32,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention: AttentionSpec,
    pub rope: RopeSpec,
    /// Multiplies q·k before the softmax.
    pub softmax_scale: f32,
    /// Intermediate size of the dense (non-MoE) FFN layers.
    pub dense_intermediate_size: usize,
    pub layers: Vec<FfnKind>,
    pub moe: MoeSpec,
    /// Names the tensors of the routed experts and the gate (`block_sparse_moe` for
    /// Mixtral, `mlp` for the others).
    pub moe_prefix: &'static str,
    /// Block-wise FP8 quantisation (`quantization_config`), if the checkpoint uses it.
    pub fp8_block: Option<(usize, usize)>,
}

impl ModelSpec {
    /// Indices of the layers whose FFN is a mixture of experts.
    pub fn moe_layers(&self) -> impl Iterator<Item = usize> + '_ {
        self.layers
            .iter()
            .enumerate()
            .filter(|(_, k)| **k == FfnKind::Moe)
            .map(|(i, _)| i)
    }

    /// The tensor names of routed expert `e` of layer `layer`, in (gate, up, down) order.
    pub fn expert_tensor_names(&self, layer: usize, e: usize) -> [String; 3] {
        let p = format!("model.layers.{layer}.{}.experts.{e}", self.moe_prefix);
        if self.arch == Arch::Mixtral {
            [
                format!("{p}.w1.weight"),
                format!("{p}.w3.weight"),
                format!("{p}.w2.weight"),
            ]
        } else {
            [
                format!("{p}.gate_proj.weight"),
                format!("{p}.up_proj.weight"),
                format!("{p}.down_proj.weight"),
            ]
        }
    }

    /// Bytes of one routed expert's weights once loaded in f32.
    pub fn expert_bytes_f32(&self) -> usize {
        self.expert_bytes(crate::WeightDtype::F32)
    }

    /// Bytes of one routed expert's weights stored in `dtype` (gate and up fused into
    /// `[2I, H]`, down `[H, I]`), as the CPU kernel and the candle store hold them.
    pub fn expert_bytes(&self, dtype: crate::WeightDtype) -> usize {
        let (h, i) = (self.hidden_size, self.moe.intermediate_size);
        dtype.matrix_bytes(2 * i, h) + dtype.matrix_bytes(h, i)
    }

    /// Floats per token per layer held in the KV cache.
    pub fn kv_floats_per_token(&self) -> usize {
        match &self.attention {
            AttentionSpec::Standard {
                num_kv_heads,
                head_dim,
                ..
            } => 2 * num_kv_heads * head_dim,
            AttentionSpec::Mla {
                kv_lora_rank,
                qk_rope_head_dim,
                ..
            } => kv_lora_rank + qk_rope_head_dim,
        }
    }

    /// Reads `<dir>/config.json`.
    pub fn from_dir(dir: &Path) -> Result<ModelSpec, ModelError> {
        let path = dir.join("config.json");
        let text = crate::checkpoint::read_capped(&path, MAX_CONFIG_BYTES)?;
        ModelSpec::from_json(&text).map_err(|e| match e {
            ModelError::Config { reason, .. } => ModelError::Config { path, reason },
            other => other,
        })
    }

    /// Parses the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<ModelSpec, ModelError> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| ModelError::Config {
            path: "config.json".into(),
            reason: e.to_string(),
        })?;
        raw.into_spec()
    }
}

fn bad(reason: impl Into<String>) -> ModelError {
    ModelError::Config {
        path: "config.json".into(),
        reason: reason.into(),
    }
}

/// The union of the fields the six architectures use, with their names in `config.json`.
#[derive(Debug, Deserialize)]
struct RawConfig {
    #[serde(default)]
    architectures: Vec<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    tie_word_embeddings: bool,
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    clip_qkv: Option<f64>,
    // MoE, Mixtral / Qwen / OLMoE names
    num_local_experts: Option<usize>,
    num_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_intermediate_size: Option<usize>,
    shared_expert_intermediate_size: Option<usize>,
    norm_topk_prob: Option<bool>,
    decoder_sparse_step: Option<usize>,
    #[serde(default)]
    mlp_only_layers: Vec<usize>,
    // DeepSeek names
    n_routed_experts: Option<usize>,
    n_shared_experts: Option<usize>,
    routed_scaling_factor: Option<f64>,
    topk_method: Option<String>,
    scoring_func: Option<String>,
    n_group: Option<usize>,
    topk_group: Option<usize>,
    first_k_dense_replace: Option<usize>,
    moe_layer_freq: Option<usize>,
    q_lora_rank: Option<usize>,
    kv_lora_rank: Option<usize>,
    qk_nope_head_dim: Option<usize>,
    qk_rope_head_dim: Option<usize>,
    v_head_dim: Option<usize>,
    quantization_config: Option<serde_json::Value>,
}

fn need<T>(v: Option<T>, field: &str) -> Result<T, ModelError> {
    v.ok_or_else(|| bad(format!("missing field `{field}`")))
}

/// Upper bounds on `config.json` sizes, far above any real model's (the largest have a
/// hidden size of 16 384, 128 layers, 384 experts and a 256 k vocabulary) yet low enough
/// that what loading allocates from them (per-layer tables, RoPE frequencies, byte
/// counts) can neither overflow nor exhaust memory. Found by fuzzing: a `head_dim` of
/// 2^32 made the RoPE table alone 8 GiB.
const MAX_DIM: usize = 1 << 20;
const MAX_LAYERS: usize = 1 << 12;
const MAX_HEADS: usize = 1 << 14;
const MAX_EXPERTS: usize = 1 << 16;
const MAX_VOCAB: usize = 1 << 24;
const MAX_CONTEXT: usize = 1 << 30;

impl RawConfig {
    /// Every size the file gives, within its bound.
    fn check_bounds(&self) -> Result<(), ModelError> {
        let fields: [(&str, Option<usize>, usize); 19] = [
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("hidden_size", self.hidden_size, MAX_DIM),
            ("intermediate_size", self.intermediate_size, MAX_DIM),
            ("moe_intermediate_size", self.moe_intermediate_size, MAX_DIM),
            (
                "shared_expert_intermediate_size",
                self.shared_expert_intermediate_size,
                MAX_DIM,
            ),
            ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
            ("num_attention_heads", self.num_attention_heads, MAX_HEADS),
            ("num_key_value_heads", self.num_key_value_heads, MAX_HEADS),
            ("head_dim", self.head_dim, MAX_DIM),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                MAX_CONTEXT,
            ),
            ("num_local_experts", self.num_local_experts, MAX_EXPERTS),
            ("num_experts", self.num_experts, MAX_EXPERTS),
            ("n_routed_experts", self.n_routed_experts, MAX_EXPERTS),
            ("n_shared_experts", self.n_shared_experts, MAX_EXPERTS),
            ("q_lora_rank", self.q_lora_rank, MAX_DIM),
            ("kv_lora_rank", self.kv_lora_rank, MAX_DIM),
            ("qk_nope_head_dim", self.qk_nope_head_dim, MAX_DIM),
            ("qk_rope_head_dim", self.qk_rope_head_dim, MAX_DIM),
            ("v_head_dim", self.v_head_dim, MAX_DIM),
        ];
        for (name, value, max) in fields {
            if let Some(v) = value.filter(|v| *v > max) {
                return Err(bad(format!("`{name}` is {v}; at most {max} is supported")));
            }
        }
        if self.rope_theta.is_some_and(|t| t <= 0.0 || !t.is_finite()) {
            return Err(bad("`rope_theta` must be positive"));
        }
        Ok(())
    }

    fn into_spec(self) -> Result<ModelSpec, ModelError> {
        self.check_bounds()?;
        let class = self
            .architectures
            .first()
            .ok_or_else(|| bad("missing `architectures`"))?;
        let arch = Arch::from_hf_class(class).ok_or_else(|| {
            let known: Vec<_> = Arch::ALL.iter().map(|a| a.hf_class()).collect();
            bad(format!(
                "unknown architecture `{class}`; supported: {}",
                known.join(", ")
            ))
        })?;
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(bad(format!(
                    "hidden_act `{act}` is not supported (only silu)"
                )));
            }
        }
        let vocab_size = need(self.vocab_size, "vocab_size")?;
        let hidden_size = need(self.hidden_size, "hidden_size")?;
        let num_layers = need(self.num_hidden_layers, "num_hidden_layers")?;
        let num_heads = need(self.num_attention_heads, "num_attention_heads")?;
        let max_pos = need(self.max_position_embeddings, "max_position_embeddings")?;
        let eps = self.rms_norm_eps.unwrap_or(1e-6) as f32;
        let theta = self.rope_theta.unwrap_or(10000.0);
        let is_deepseek = matches!(arch, Arch::DeepseekV2 | Arch::DeepseekV3);
        for (v, name) in [
            (vocab_size, "vocab_size"),
            (hidden_size, "hidden_size"),
            (num_layers, "num_hidden_layers"),
            (num_heads, "num_attention_heads"),
            (max_pos, "max_position_embeddings"),
        ] {
            if v == 0 {
                return Err(bad(format!("`{name}` must be positive")));
            }
        }

        let (attention, rope_dim, interleaved, q_head_dim) = if is_deepseek {
            let kv_lora_rank = need(self.kv_lora_rank, "kv_lora_rank")?;
            let nope = need(self.qk_nope_head_dim, "qk_nope_head_dim")?;
            let rope = need(self.qk_rope_head_dim, "qk_rope_head_dim")?;
            let v = need(self.v_head_dim, "v_head_dim")?;
            if rope % 2 != 0 || kv_lora_rank == 0 || v == 0 {
                return Err(bad(
                    "qk_rope_head_dim must be even; kv_lora_rank and v_head_dim positive",
                ));
            }
            if self.attention_bias == Some(true) {
                return Err(bad("attention_bias=true is not supported for MLA"));
            }
            (
                AttentionSpec::Mla {
                    num_heads,
                    q_lora_rank: self.q_lora_rank,
                    kv_lora_rank,
                    qk_nope_head_dim: nope,
                    qk_rope_head_dim: rope,
                    v_head_dim: v,
                },
                rope,
                true,
                nope + rope,
            )
        } else {
            let num_kv_heads = self.num_key_value_heads.unwrap_or(num_heads);
            let head_dim = self.head_dim.unwrap_or(hidden_size / num_heads);
            if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
                return Err(bad(format!(
                    "num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})"
                )));
            }
            if head_dim == 0 || !head_dim.is_multiple_of(2) {
                return Err(bad("head_dim must be even and positive"));
            }
            let qk_norm = match arch {
                Arch::Qwen3Moe => QkNorm::PerHead,
                Arch::Olmoe => QkNorm::Full,
                _ => QkNorm::None,
            };
            let qkv_bias = match arch {
                Arch::Qwen2Moe => true,
                _ => self.attention_bias.unwrap_or(false),
            };
            (
                AttentionSpec::Standard {
                    num_heads,
                    num_kv_heads,
                    head_dim,
                    qkv_bias,
                    qk_norm,
                    clip_qkv: self.clip_qkv.map(|c| c as f32),
                },
                head_dim,
                false,
                head_dim,
            )
        };

        let yarn = parse_rope_scaling(self.rope_scaling.as_ref())?;
        let mut softmax_scale = 1.0 / (q_head_dim as f64).sqrt();
        if let Some(y) = &yarn {
            if is_deepseek && y.mscale_all_dim != 0.0 {
                let m = yarn_mscale(y.factor, y.mscale_all_dim);
                softmax_scale *= m * m;
            }
        }

        let num_experts = match arch {
            Arch::Mixtral => need(self.num_local_experts, "num_local_experts")?,
            Arch::DeepseekV2 | Arch::DeepseekV3 => need(self.n_routed_experts, "n_routed_experts")?,
            _ => need(self.num_experts, "num_experts")?,
        };
        let top_k = need(self.num_experts_per_tok, "num_experts_per_tok")?;
        if num_experts == 0 || top_k == 0 || top_k > num_experts {
            return Err(bad(format!(
                "num_experts_per_tok ({top_k}) must be in 1..={num_experts} (the number of experts)"
            )));
        }
        let dense_intermediate = self.intermediate_size.unwrap_or(0);
        let moe_intermediate = match arch {
            Arch::Mixtral | Arch::Olmoe => need(self.intermediate_size, "intermediate_size")?,
            _ => need(self.moe_intermediate_size, "moe_intermediate_size")?,
        };

        let routing = match arch {
            Arch::Mixtral => RoutingSpec::SoftmaxTopK {
                norm_topk_prob: true,
            },
            Arch::Qwen2Moe | Arch::Olmoe => RoutingSpec::SoftmaxTopK {
                norm_topk_prob: self.norm_topk_prob.unwrap_or(false),
            },
            Arch::Qwen3Moe => RoutingSpec::SoftmaxTopK {
                norm_topk_prob: self.norm_topk_prob.unwrap_or(true),
            },
            Arch::DeepseekV2 => {
                if let Some(s) = &self.scoring_func {
                    if s != "softmax" {
                        return Err(bad(format!(
                            "scoring_func `{s}` is not supported for DeepSeek-V2"
                        )));
                    }
                }
                let group_limited = match self.topk_method.as_deref().unwrap_or("greedy") {
                    "greedy" => false,
                    "group_limited_greedy" => true,
                    other => return Err(bad(format!("unknown topk_method `{other}`"))),
                };
                let (n_group, topk_group) = groups(&self, num_experts, group_limited)?;
                RoutingSpec::DeepseekV2 {
                    group_limited,
                    n_group,
                    topk_group,
                    norm_topk_prob: self.norm_topk_prob.unwrap_or(false),
                    routed_scaling_factor: self.routed_scaling_factor.unwrap_or(1.0) as f32,
                }
            }
            Arch::DeepseekV3 => {
                if let Some(s) = &self.scoring_func {
                    if s != "sigmoid" {
                        return Err(bad(format!(
                            "scoring_func `{s}` is not supported for DeepSeek-V3"
                        )));
                    }
                }
                let (n_group, topk_group) = groups(&self, num_experts, true)?;
                if num_experts / n_group < 2 {
                    return Err(bad(
                        "DeepSeek-V3 routing needs at least 2 experts per group",
                    ));
                }
                RoutingSpec::DeepseekV3 {
                    n_group,
                    topk_group,
                    norm_topk_prob: self.norm_topk_prob.unwrap_or(true),
                    routed_scaling_factor: self.routed_scaling_factor.unwrap_or(1.0) as f32,
                }
            }
        };

        let shared = match arch {
            Arch::Qwen2Moe => match self.shared_expert_intermediate_size {
                Some(n) if n > 0 => SharedExpertSpec::GatedQwen {
                    intermediate_size: n,
                },
                _ => SharedExpertSpec::None,
            },
            Arch::DeepseekV2 | Arch::DeepseekV3 => match self.n_shared_experts {
                Some(n) if n > 0 => SharedExpertSpec::Plain {
                    intermediate_size: n * moe_intermediate,
                },
                _ => SharedExpertSpec::None,
            },
            _ => SharedExpertSpec::None,
        };

        let layers: Vec<FfnKind> = (0..num_layers)
            .map(|i| {
                let moe = match arch {
                    Arch::Mixtral | Arch::Olmoe => true,
                    Arch::Qwen2Moe | Arch::Qwen3Moe => {
                        let step = self.decoder_sparse_step.unwrap_or(1).max(1);
                        !self.mlp_only_layers.contains(&i) && (i + 1) % step == 0
                    }
                    Arch::DeepseekV2 | Arch::DeepseekV3 => {
                        let freq = self.moe_layer_freq.unwrap_or(1).max(1);
                        i >= self.first_k_dense_replace.unwrap_or(0) && i % freq == 0
                    }
                };
                if moe {
                    FfnKind::Moe
                } else {
                    FfnKind::Dense
                }
            })
            .collect();
        if layers.contains(&FfnKind::Dense) && dense_intermediate == 0 {
            return Err(bad("dense layers need `intermediate_size`"));
        }

        let fp8_block = parse_quantization(self.quantization_config.as_ref())?;

        Ok(ModelSpec {
            arch,
            vocab_size,
            hidden_size,
            num_layers,
            rms_norm_eps: eps,
            max_position_embeddings: max_pos,
            tie_word_embeddings: self.tie_word_embeddings,
            attention,
            rope: RopeSpec {
                theta,
                dim: rope_dim,
                interleaved,
                yarn,
            },
            softmax_scale: softmax_scale as f32,
            dense_intermediate_size: dense_intermediate,
            layers,
            moe: MoeSpec {
                num_experts,
                top_k,
                intermediate_size: moe_intermediate,
                routing,
                shared,
            },
            moe_prefix: if arch == Arch::Mixtral {
                "block_sparse_moe"
            } else {
                "mlp"
            },
            fp8_block,
        })
    }
}

fn groups(
    raw: &RawConfig,
    num_experts: usize,
    required: bool,
) -> Result<(usize, usize), ModelError> {
    let n_group = raw.n_group.unwrap_or(1).max(1);
    let topk_group = raw.topk_group.unwrap_or(n_group).max(1);
    if required && (!num_experts.is_multiple_of(n_group) || topk_group > n_group) {
        return Err(bad(format!(
            "n_group ({n_group}) must divide the number of experts ({num_experts}) and topk_group ({topk_group}) must be at most n_group"
        )));
    }
    Ok((n_group, topk_group))
}

/// YaRN's attention-magnitude correction, as DeepSeek defines it.
pub fn yarn_mscale(factor: f64, mscale: f64) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        0.1 * mscale * factor.ln() + 1.0
    }
}

fn parse_rope_scaling(v: Option<&serde_json::Value>) -> Result<Option<YarnSpec>, ModelError> {
    let Some(v) = v else { return Ok(None) };
    if v.is_null() {
        return Ok(None);
    }
    let kind = v
        .get("type")
        .or_else(|| v.get("rope_type"))
        .and_then(|t| t.as_str())
        .unwrap_or("");
    let num = |k: &str| v.get(k).and_then(|x| x.as_f64());
    match kind {
        "yarn" => Ok(Some(YarnSpec {
            factor: num("factor")
                .ok_or_else(|| bad("rope_scaling.factor is missing"))
                .and_then(|f| match f > 0.0 {
                    true => Ok(f),
                    false => Err(bad("rope_scaling.factor must be positive")),
                })?,
            original_max_position_embeddings: num("original_max_position_embeddings")
                .ok_or_else(|| bad("rope_scaling.original_max_position_embeddings is missing"))?
                as usize,
            beta_fast: num("beta_fast").unwrap_or(32.0),
            beta_slow: num("beta_slow").unwrap_or(1.0),
            mscale: num("mscale").unwrap_or(1.0),
            mscale_all_dim: num("mscale_all_dim").unwrap_or(0.0),
        })),
        "default" => Ok(None),
        other => Err(bad(format!(
            "rope_scaling type `{other}` is not supported (only yarn)"
        ))),
    }
}

fn parse_quantization(v: Option<&serde_json::Value>) -> Result<Option<(usize, usize)>, ModelError> {
    let Some(v) = v else { return Ok(None) };
    if v.is_null() {
        return Ok(None);
    }
    let method = v.get("quant_method").and_then(|m| m.as_str()).unwrap_or("");
    if method != "fp8" {
        return Err(bad(format!(
            "quantization_config.quant_method `{method}` is not supported (only fp8)"
        )));
    }
    if let Some(fmt) = v.get("fmt").and_then(|f| f.as_str()) {
        if fmt != "e4m3" {
            return Err(bad(format!(
                "fp8 format `{fmt}` is not supported (only e4m3)"
            )));
        }
    }
    let block = v
        .get("weight_block_size")
        .and_then(|b| b.as_array())
        .ok_or_else(|| bad("quantization_config.weight_block_size is missing"))?;
    let dims: Vec<usize> = block
        .iter()
        .filter_map(|x| x.as_u64().map(|n| n as usize))
        .collect();
    match dims.as_slice() {
        [a, b] if *a > 0 && *b > 0 => Ok(Some((*a, *b))),
        _ => Err(bad(
            "quantization_config.weight_block_size must be two positive integers",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mixtral_json() -> serde_json::Value {
        serde_json::json!({
            "architectures": ["MixtralForCausalLM"],
            "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
            "num_local_experts": 4, "num_experts_per_tok": 2, "hidden_act": "silu"
        })
    }

    #[test]
    fn mixtral_is_all_moe_with_renormalised_softmax() {
        let spec = ModelSpec::from_json(&mixtral_json().to_string()).unwrap();
        assert_eq!(spec.layers, vec![FfnKind::Moe, FfnKind::Moe]);
        assert_eq!(
            spec.moe.routing,
            RoutingSpec::SoftmaxTopK {
                norm_topk_prob: true
            }
        );
        assert_eq!(spec.kv_floats_per_token(), 2 * 2 * 16);
        assert!((spec.softmax_scale - 0.25).abs() < 1e-7);
    }

    #[test]
    fn unknown_architecture_is_named() {
        let mut j = mixtral_json();
        j["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
        let err = ModelSpec::from_json(&j.to_string())
            .unwrap_err()
            .to_string();
        assert!(err.contains("LlamaForCausalLM"), "{err}");
    }

    #[test]
    fn missing_field_is_named() {
        let mut j = mixtral_json();
        j.as_object_mut().unwrap().remove("num_local_experts");
        let err = ModelSpec::from_json(&j.to_string())
            .unwrap_err()
            .to_string();
        assert!(err.contains("num_local_experts"), "{err}");
    }

    #[test]
    fn top_k_larger_than_experts_is_rejected() {
        let mut j = mixtral_json();
        j["num_experts_per_tok"] = serde_json::json!(5);
        let err = ModelSpec::from_json(&j.to_string())
            .unwrap_err()
            .to_string();
        assert!(err.contains("num_experts_per_tok"), "{err}");
    }

    #[test]
    fn deepseek_v3_dense_first_layers_and_yarn_scale() {
        let j = serde_json::json!({
            "architectures": ["DeepseekV3ForCausalLM"],
            "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
            "moe_intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
            "max_position_embeddings": 1024, "n_routed_experts": 8, "n_shared_experts": 1,
            "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2, "first_k_dense_replace": 1,
            "kv_lora_rank": 32, "q_lora_rank": 48, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
            "v_head_dim": 16, "scoring_func": "sigmoid", "routed_scaling_factor": 2.5,
            "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
                             "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
        });
        let spec = ModelSpec::from_json(&j.to_string()).unwrap();
        assert_eq!(
            spec.layers,
            vec![FfnKind::Dense, FfnKind::Moe, FfnKind::Moe]
        );
        assert_eq!(spec.kv_floats_per_token(), 40);
        assert_eq!(
            spec.moe.shared,
            SharedExpertSpec::Plain {
                intermediate_size: 32
            }
        );
        let m = 0.1 * 4f64.ln() + 1.0;
        let want = (1.0 / 24f64.sqrt() * m * m) as f32;
        assert!((spec.softmax_scale - want).abs() < 1e-7);
        assert!(spec.rope.interleaved);
    }

    /// Found by the fuzz corpus replay's mutations: `head_dim` 2^32 parsed, and the RoPE
    /// table built from it asked for 8 GiB; every size is now bounded.
    #[test]
    fn sizes_beyond_any_real_model_are_refused() {
        let regression =
            include_str!("../../fuzz/regressions/config_json/invalid-head-dim-2-pow-32.json");
        let err = ModelSpec::from_json(regression).unwrap_err().to_string();
        assert!(
            err.contains("`head_dim` is 4294967296; at most 1048576"),
            "{err}"
        );
        for (field, value) in [
            ("num_hidden_layers", 1u64 << 40),
            ("hidden_size", 1 << 21),
            ("num_local_experts", 1 << 17),
            ("vocab_size", 1 << 25),
            ("max_position_embeddings", 1 << 31),
        ] {
            let mut j = mixtral_json();
            j[field] = serde_json::json!(value);
            let err = ModelSpec::from_json(&j.to_string())
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("`{field}` is {value}")), "{err}");
        }
        let mut j = mixtral_json();
        j["rope_theta"] = serde_json::json!(-1.0);
        assert!(ModelSpec::from_json(&j.to_string()).is_err());
        let mut j = mixtral_json();
        j["num_hidden_layers"] = serde_json::json!(MAX_LAYERS);
        assert_eq!(
            ModelSpec::from_json(&j.to_string()).unwrap().layers.len(),
            MAX_LAYERS
        );
    }

    #[test]
    fn fp8_quantisation_needs_block_size() {
        let mut j = mixtral_json();
        j["quantization_config"] = serde_json::json!({"quant_method": "fp8"});
        let err = ModelSpec::from_json(&j.to_string())
            .unwrap_err()
            .to_string();
        assert!(err.contains("weight_block_size"), "{err}");
        j["quantization_config"] = serde_json::json!({"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]});
        assert_eq!(
            ModelSpec::from_json(&j.to_string()).unwrap().fp8_block,
            Some((128, 128))
        );
    }
}
