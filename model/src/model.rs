//! The dense part of a MoE model (embeddings, attention, norms, gates, dense and shared
//! FFNs, LM head) and its forward pass over a batch of sequences. Routed experts are not
//! held here: each MoE layer hands its rows to an [`ExpertBackend`], in-process or remote.
//!
//! One forward call runs one scheduler step: any mix of prefill chunks and single decode
//! tokens, each sequence at its own position with its own cache. All linear layers, gates
//! and experts run over every token of the step at once; attention runs per sequence.

use std::path::Path;

use crate::attention::{Attention, MlaAttention, SeqSpan, StandardAttention};
use crate::checkpoint::Checkpoint;
use crate::config::{
    Arch, AttentionSpec, FfnKind, ModelSpec, QkNorm, RoutingSpec, SharedExpertSpec,
};
use crate::error::ModelError;
use crate::expert_backend::ExpertBackend;
use crate::experts::Ffn;
use crate::kv_cache::SeqCache;
use crate::linalg::{rms_norm_rows, Linear, WeightDtype};
use crate::progress::Progress;
use crate::rope::Rope;
use crate::routing::Gate;

mod step;

struct SharedExpert {
    ffn: Ffn,
    /// Qwen2-MoE's `shared_expert_gate` (`[1, hidden]`).
    gate: Option<Linear>,
}

#[allow(clippy::large_enum_variant)] // one per layer, built once
enum LayerFfn {
    Dense(Ffn),
    Moe {
        gate: Gate,
        shared: Option<SharedExpert>,
    },
}

struct Layer {
    input_norm: Vec<f32>,
    post_norm: Vec<f32>,
    attn: Attention,
    ffn: LayerFfn,
}

/// One sequence's part of a step: the new tokens and the cache they extend.
pub struct StepSeq<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut SeqCache,
}

/// The dense model. Immutable once loaded; share it between threads by reference.
pub struct Model {
    spec: ModelSpec,
    embed: Linear,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: Option<Linear>,
    rope: Rope,
}

struct Loader<'a> {
    ckpt: &'a Checkpoint,
    dtype: WeightDtype,
    progress: Progress<'a>,
    total: u64,
    done: std::cell::Cell<u64>,
}

impl Loader<'_> {
    fn vec(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let v = self.ckpt.tensor_f32(name, shape)?;
        let done = self.done.get() + self.ckpt.stored_bytes(&[name.to_owned()]);
        self.done.set(done);
        (self.progress)(done, self.total);
        Ok(v)
    }

    /// Several `[out_i, in]` weights (and optional biases) stacked into one product.
    fn fused(
        &self,
        parts: &[(&str, usize)],
        in_dim: usize,
        bias: bool,
    ) -> Result<Linear, ModelError> {
        let mut w = Vec::new();
        let mut b = Vec::new();
        let mut out = 0;
        for (name, rows) in parts {
            w.extend(self.vec(&format!("{name}.weight"), &[*rows, in_dim])?);
            if bias {
                b.extend(self.vec(&format!("{name}.bias"), &[*rows])?);
            }
            out += rows;
        }
        Ok(Linear::new(w, out, in_dim, bias.then_some(b), self.dtype))
    }

    fn linear(&self, name: &str, out: usize, in_dim: usize) -> Result<Linear, ModelError> {
        self.fused(&[(name, out)], in_dim, false)
    }
}

impl Model {
    /// Loads the dense part of the checkpoint in `dir` (no routed expert is read).
    pub fn load(dir: &Path, dtype: WeightDtype) -> Result<Model, ModelError> {
        let spec = ModelSpec::from_dir(dir)?;
        let ckpt = Checkpoint::open(dir, spec.fp8_block)?;
        Model::load_from(&ckpt, spec, dtype)
    }

    /// Loads the dense part from an already open checkpoint.
    pub fn load_from(
        ckpt: &Checkpoint,
        spec: ModelSpec,
        dtype: WeightDtype,
    ) -> Result<Model, ModelError> {
        Model::load_with_progress(ckpt, spec, dtype, &crate::progress::quiet)
    }

    /// [`Model::load_from`], reporting the bytes read to `progress`.
    pub fn load_with_progress(
        ckpt: &Checkpoint,
        spec: ModelSpec,
        dtype: WeightDtype,
        progress: Progress<'_>,
    ) -> Result<Model, ModelError> {
        let h = spec.hidden_size;
        let approx = (spec.vocab_size * h * 4 * 2) as u64;
        let ld = Loader {
            ckpt,
            dtype,
            progress,
            total: approx,
            done: std::cell::Cell::new(0),
        };
        let embed = Linear::new(
            ld.vec("model.embed_tokens.weight", &[spec.vocab_size, h])?,
            spec.vocab_size,
            h,
            None,
            WeightDtype::F32,
        );
        let mut layers = Vec::with_capacity(spec.num_layers);
        for i in 0..spec.num_layers {
            let p = format!("model.layers.{i}");
            let attn = load_attention(&ld, &spec, &format!("{p}.self_attn"))?;
            let ffn = match spec.layers[i] {
                FfnKind::Dense => LayerFfn::Dense(Ffn::load(
                    ckpt,
                    &ffn_names(&format!("{p}.mlp")),
                    h,
                    spec.dense_intermediate_size,
                    dtype,
                )?),
                FfnKind::Moe => {
                    let mp = format!("{p}.{}", spec.moe_prefix);
                    let e = spec.moe.num_experts;
                    // The gate stays in f32 whatever the dtype: routing decisions are
                    // sensitive and the matrix is small.
                    let gate_w = ld.vec(&format!("{mp}.gate.weight"), &[e, h])?;
                    let bias = match spec.moe.routing {
                        RoutingSpec::DeepseekV3 { .. } => {
                            Some(ld.vec(&format!("{mp}.gate.e_score_correction_bias"), &[e])?)
                        }
                        _ => None,
                    };
                    let gate = Gate::new(
                        Linear::new(gate_w, e, h, None, WeightDtype::F32),
                        bias,
                        spec.moe.routing.clone(),
                        spec.moe.top_k,
                    );
                    let shared = match spec.moe.shared {
                        SharedExpertSpec::None => None,
                        SharedExpertSpec::GatedQwen { intermediate_size } => Some(SharedExpert {
                            ffn: Ffn::load(
                                ckpt,
                                &ffn_names(&format!("{mp}.shared_expert")),
                                h,
                                intermediate_size,
                                dtype,
                            )?,
                            gate: Some(Linear::new(
                                ld.vec(&format!("{mp}.shared_expert_gate.weight"), &[1, h])?,
                                1,
                                h,
                                None,
                                WeightDtype::F32,
                            )),
                        }),
                        SharedExpertSpec::Plain { intermediate_size } => Some(SharedExpert {
                            ffn: Ffn::load(
                                ckpt,
                                &ffn_names(&format!("{mp}.shared_experts")),
                                h,
                                intermediate_size,
                                dtype,
                            )?,
                            gate: None,
                        }),
                    };
                    LayerFfn::Moe { gate, shared }
                }
            };
            layers.push(Layer {
                input_norm: ld.vec(&format!("{p}.input_layernorm.weight"), &[h])?,
                post_norm: ld.vec(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                attn,
                ffn,
            });
        }
        let norm = ld.vec("model.norm.weight", &[h])?;
        let lm_head = if spec.tie_word_embeddings && !ckpt.contains("lm_head.weight") {
            None
        } else {
            Some(ld.linear("lm_head", spec.vocab_size, h)?)
        };
        let rope = Rope::new(&spec.rope);
        Ok(Model {
            spec,
            embed,
            layers,
            norm,
            lm_head,
            rope,
        })
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Runs one step. Each sequence's tokens are appended to its cache; returns the
    /// logits of each sequence's last new token (`vocab_size` floats each).
    pub fn forward(
        &self,
        batch: &mut [StepSeq<'_>],
        experts: &dyn ExpertBackend,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let h = self.spec.hidden_size;
        let mut spans = Vec::with_capacity(batch.len());
        let mut start = 0;
        for s in batch.iter() {
            if s.tokens.is_empty() {
                return Err(ModelError::InvalidInput {
                    field: "tokens",
                    reason: "a sequence in the step has no tokens".into(),
                });
            }
            if let Some(bad) = s
                .tokens
                .iter()
                .find(|t| **t as usize >= self.spec.vocab_size)
            {
                return Err(ModelError::InvalidInput {
                    field: "prompt_token_ids",
                    reason: format!(
                        "token id {bad} is outside the vocabulary (size {})",
                        self.spec.vocab_size
                    ),
                });
            }
            let pos0 = s.cache.len();
            if pos0 + s.tokens.len() > self.spec.max_position_embeddings {
                return Err(ModelError::InvalidInput {
                    field: "prompt",
                    reason: format!(
                        "sequence would be {} tokens long; the model's context is {}",
                        pos0 + s.tokens.len(),
                        self.spec.max_position_embeddings
                    ),
                });
            }
            spans.push(SeqSpan {
                start,
                len: s.tokens.len(),
                pos0,
            });
            start += s.tokens.len();
        }
        for s in batch.iter_mut() {
            s.cache.reserve(s.tokens.len())?;
        }
        let t_total = start;
        let mut x = vec![0f32; t_total * h];
        for (row, tok) in x
            .chunks_exact_mut(h)
            .zip(batch.iter().flat_map(|s| s.tokens.iter()))
        {
            self.embed.row(*tok as usize, row);
        }
        let caches: Vec<&mut SeqCache> = batch.iter_mut().map(|s| &mut *s.cache).collect();
        // One micro-batch, or two (whole sequences each) where the backend overlaps.
        let split = match experts.micro_batches(spans.len(), t_total) {
            n if n >= 2 => step::split_point(&spans),
            _ => None,
        };
        let mut micros = match split {
            None => vec![step::Micro {
                x,
                spans: spans.clone(),
                caches,
            }],
            Some(at) => {
                let mut caches = caches;
                let b_caches = caches.split_off(at);
                let b0 = spans[at].start;
                let b_spans = spans[at..]
                    .iter()
                    .map(|s| SeqSpan {
                        start: s.start - b0,
                        ..*s
                    })
                    .collect();
                let b_x = x.split_off(b0 * h);
                vec![
                    step::Micro {
                        x,
                        spans: spans[..at].to_vec(),
                        caches,
                    },
                    step::Micro {
                        x: b_x,
                        spans: b_spans,
                        caches: b_caches,
                    },
                ]
            }
        };
        self.run_layers(&mut micros, experts)?;
        let mut x = Vec::with_capacity(t_total * h);
        for m in micros {
            x.extend_from_slice(&m.x);
        }
        for s in batch.iter_mut() {
            s.cache.advance(s.tokens.len());
        }
        // Only each sequence's last position needs logits.
        let mut last = Vec::with_capacity(spans.len() * h);
        for sp in &spans {
            let r = sp.start + sp.len - 1;
            last.extend_from_slice(&x[r * h..(r + 1) * h]);
        }
        rms_norm_rows(&mut last, &self.norm, self.spec.rms_norm_eps);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let logits = head.forward(&last, spans.len());
        Ok(logits
            .chunks_exact(self.spec.vocab_size)
            .map(<[f32]>::to_vec)
            .collect())
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

fn ffn_names(prefix: &str) -> [String; 3] {
    [
        format!("{prefix}.gate_proj.weight"),
        format!("{prefix}.up_proj.weight"),
        format!("{prefix}.down_proj.weight"),
    ]
}

fn load_attention(ld: &Loader<'_>, spec: &ModelSpec, p: &str) -> Result<Attention, ModelError> {
    let h = spec.hidden_size;
    match &spec.attention {
        AttentionSpec::Standard {
            num_heads,
            num_kv_heads,
            head_dim,
            qkv_bias,
            qk_norm,
            clip_qkv,
        } => {
            let (nh, kvh, hd) = (*num_heads, *num_kv_heads, *head_dim);
            let qkv = ld.fused(
                &[
                    (&format!("{p}.q_proj"), nh * hd),
                    (&format!("{p}.k_proj"), kvh * hd),
                    (&format!("{p}.v_proj"), kvh * hd),
                ],
                h,
                *qkv_bias,
            )?;
            let (q_norm, k_norm) = match qk_norm {
                QkNorm::None => (Vec::new(), Vec::new()),
                QkNorm::PerHead => (
                    ld.vec(&format!("{p}.q_norm.weight"), &[hd])?,
                    ld.vec(&format!("{p}.k_norm.weight"), &[hd])?,
                ),
                QkNorm::Full => (
                    ld.vec(&format!("{p}.q_norm.weight"), &[nh * hd])?,
                    ld.vec(&format!("{p}.k_norm.weight"), &[kvh * hd])?,
                ),
            };
            Ok(Attention::Standard(StandardAttention {
                num_heads: nh,
                num_kv_heads: kvh,
                head_dim: hd,
                qkv,
                o_proj: ld.linear(&format!("{p}.o_proj"), h, nh * hd)?,
                qk_norm: *qk_norm,
                q_norm,
                k_norm,
                clip_qkv: *clip_qkv,
                eps: spec.rms_norm_eps,
            }))
        }
        AttentionSpec::Mla {
            num_heads,
            q_lora_rank,
            kv_lora_rank,
            qk_nope_head_dim,
            qk_rope_head_dim,
            v_head_dim,
        } => {
            let nh = *num_heads;
            let qhd = qk_nope_head_dim + qk_rope_head_dim;
            let kv_a = (
                format!("{p}.kv_a_proj_with_mqa"),
                kv_lora_rank + qk_rope_head_dim,
            );
            let (q_kv_a, q_a_norm, q_b) = match q_lora_rank {
                Some(r) => (
                    ld.fused(
                        &[(&format!("{p}.q_a_proj"), *r), (&kv_a.0, kv_a.1)],
                        h,
                        false,
                    )?,
                    ld.vec(&format!("{p}.q_a_layernorm.weight"), &[*r])?,
                    Some(ld.linear(&format!("{p}.q_b_proj"), nh * qhd, *r)?),
                ),
                None => (
                    ld.fused(
                        &[(&format!("{p}.q_proj"), nh * qhd), (&kv_a.0, kv_a.1)],
                        h,
                        false,
                    )?,
                    Vec::new(),
                    None,
                ),
            };
            Ok(Attention::Mla(MlaAttention {
                num_heads: nh,
                q_lora_rank: *q_lora_rank,
                kv_lora_rank: *kv_lora_rank,
                nope: *qk_nope_head_dim,
                rope_dim: *qk_rope_head_dim,
                v_dim: *v_head_dim,
                q_kv_a,
                q_a_norm,
                q_b,
                kv_a_norm: ld.vec(&format!("{p}.kv_a_layernorm.weight"), &[*kv_lora_rank])?,
                kv_b: ld.vec(
                    &format!("{p}.kv_b_proj.weight"),
                    &[nh * (qk_nope_head_dim + v_head_dim), *kv_lora_rank],
                )?,
                o_proj: ld.linear(&format!("{p}.o_proj"), h, nh * v_head_dim)?,
                eps: spec.rms_norm_eps,
            }))
        }
    }
}

impl Model {
    /// The architecture, for logs.
    pub fn arch(&self) -> Arch {
        self.spec.arch
    }
}
