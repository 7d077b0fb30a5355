//! Attention over a batch of sequences of different lengths, each against its own KV
//! cache: standard multi-head / grouped-query attention (with the optional q/k norms,
//! biases and clipping the architectures need) and DeepSeek's multi-head latent
//! attention (MLA).
//!
//! MLA caches only the normalised latent `c` and the roped shared key `k_pe` per token.
//! Instead of decompressing every cached latent into per-head keys and values at every
//! step, it folds the decompression into the query and the output ("weight absorption"):
//! `q_nope · (W_uk c) = (W_ukᵀ q_nope) · c` and `Σ p·(W_uv c) = W_uv (Σ p·c)`. Same
//! numbers, a cache `heads × (nope + v) / (lora + rope)` times smaller, and per-step
//! cost independent of decompressing the history.

use rayon::prelude::*;

use crate::config::QkNorm;
use crate::kv_cache::SeqCache;
use crate::linalg::{axpy, dot, rms_norm_rows, softmax, Linear};
use crate::rope::Rope;

/// One sequence's share of a step: its rows are `start..start + len` of the step's
/// hidden states, at positions `pos0..pos0 + len`.
#[derive(Debug, Clone, Copy)]
pub struct SeqSpan {
    pub start: usize,
    pub len: usize,
    pub pos0: usize,
}

/// Standard attention weights.
pub struct StandardAttention {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// q, k, v fused into one `[ (nh + 2 kvh) · hd, hidden ]` product.
    pub qkv: Linear,
    pub o_proj: Linear,
    pub qk_norm: QkNorm,
    pub q_norm: Vec<f32>,
    pub k_norm: Vec<f32>,
    pub clip_qkv: Option<f32>,
    pub eps: f32,
}

/// MLA weights.
pub struct MlaAttention {
    pub num_heads: usize,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub nope: usize,
    pub rope_dim: usize,
    pub v_dim: usize,
    /// `q_a_proj` (or `q_proj` without q LoRA) and `kv_a_proj_with_mqa`, fused.
    pub q_kv_a: Linear,
    pub q_a_norm: Vec<f32>,
    pub q_b: Option<Linear>,
    pub kv_a_norm: Vec<f32>,
    /// `kv_b_proj`, `[heads · (nope + v), lora]`, kept as plain rows for absorption.
    pub kv_b: Vec<f32>,
    pub o_proj: Linear,
    pub eps: f32,
}

pub enum Attention {
    Standard(StandardAttention),
    Mla(MlaAttention),
}

impl Attention {
    /// `x` is the normalised `[T, hidden]` input of the step; writes this layer's cache
    /// entries for the new tokens and returns the attention output `[T, hidden]`.
    pub fn forward(
        &self,
        layer: usize,
        x: &[f32],
        spans: &[SeqSpan],
        caches: &mut [&mut SeqCache],
        rope: &Rope,
        scale: f32,
    ) -> Vec<f32> {
        match self {
            Attention::Standard(a) => a.forward(layer, x, spans, caches, rope, scale),
            Attention::Mla(a) => a.forward(layer, x, spans, caches, rope, scale),
        }
    }
}

/// Softmax attention of one query over positions `0..=last`: `score(p)` gives the raw
/// q·k, `value(p, weight)` accumulates. Shared by both kinds.
fn attend(
    last: usize,
    scale: f32,
    score: impl Fn(usize) -> f32,
    mut value: impl FnMut(usize, f32),
) {
    let mut s: Vec<f32> = (0..=last).map(|p| score(p) * scale).collect();
    softmax(&mut s);
    for (p, w) in s.into_iter().enumerate() {
        value(p, w);
    }
}

impl StandardAttention {
    fn forward(
        &self,
        layer: usize,
        x: &[f32],
        spans: &[SeqSpan],
        caches: &mut [&mut SeqCache],
        rope: &Rope,
        scale: f32,
    ) -> Vec<f32> {
        let (nh, kvh, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let t_total = x.len() / self.qkv.in_dim();
        let width = (nh + 2 * kvh) * hd;
        let mut qkv = self.qkv.forward(x, t_total);
        if let Some(c) = self.clip_qkv {
            qkv.iter_mut().for_each(|v| *v = v.clamp(-c, c));
        }
        // q/k norms and RoPE, per token.
        for (span_i, span) in spans.iter().enumerate() {
            for j in 0..span.len {
                let row = &mut qkv[(span.start + j) * width..(span.start + j + 1) * width];
                let (q, rest) = row.split_at_mut(nh * hd);
                let (k, v) = rest.split_at_mut(kvh * hd);
                // The norm weight's width decides the grouping: head_dim for a per-head
                // norm (Qwen3), the whole projection for OLMoE.
                if self.qk_norm != QkNorm::None {
                    rms_norm_rows(q, &self.q_norm, self.eps);
                    rms_norm_rows(k, &self.k_norm, self.eps);
                }
                let ang = rope.angles(span.pos0 + j);
                for h in q.chunks_exact_mut(hd).chain(k.chunks_exact_mut(hd)) {
                    rope.apply(&mut h[..rope.dim()], &ang);
                }
                let entry = caches[span_i].entry_mut(layer, span.pos0 + j);
                entry[..kvh * hd].copy_from_slice(k);
                entry[kvh * hd..].copy_from_slice(v);
            }
        }
        // One task per (sequence, head).
        let group = nh / kvh;
        let caches_ro: Vec<&SeqCache> = caches.iter().map(|c| &**c).collect();
        let tasks: Vec<(usize, usize)> = (0..spans.len())
            .flat_map(|s| (0..nh).map(move |h| (s, h)))
            .collect();
        let outs: Vec<Vec<f32>> = tasks
            .par_iter()
            .map(|&(s, h)| {
                let span = spans[s];
                let cache = caches_ro[s];
                let g = h / group;
                let mut out = vec![0f32; span.len * hd];
                for j in 0..span.len {
                    let q = &qkv[(span.start + j) * width + h * hd..][..hd];
                    let o = &mut out[j * hd..(j + 1) * hd];
                    attend(
                        span.pos0 + j,
                        scale,
                        |p| dot(q, &cache.entry(layer, p)[g * hd..(g + 1) * hd]),
                        |p, w| {
                            let e = cache.entry(layer, p);
                            axpy(o, w, &e[(kvh + g) * hd..(kvh + g + 1) * hd]);
                        },
                    );
                }
                out
            })
            .collect();
        let mut attn = vec![0f32; t_total * nh * hd];
        for ((s, h), out) in tasks.iter().zip(outs) {
            let span = spans[*s];
            for j in 0..span.len {
                let dst = (span.start + j) * nh * hd + h * hd;
                attn[dst..dst + hd].copy_from_slice(&out[j * hd..(j + 1) * hd]);
            }
        }
        self.o_proj.forward(&attn, t_total)
    }
}

impl MlaAttention {
    fn q_head_dim(&self) -> usize {
        self.nope + self.rope_dim
    }

    fn forward(
        &self,
        layer: usize,
        x: &[f32],
        spans: &[SeqSpan],
        caches: &mut [&mut SeqCache],
        rope: &Rope,
        scale: f32,
    ) -> Vec<f32> {
        let (nh, lora, rd, nope, vd) = (
            self.num_heads,
            self.kv_lora_rank,
            self.rope_dim,
            self.nope,
            self.v_dim,
        );
        let qhd = self.q_head_dim();
        let t_total = x.len() / self.q_kv_a.in_dim();
        let a = self.q_kv_a.forward(x, t_total);
        let a_width = self.q_kv_a.out_dim();
        let q_a_width = a_width - lora - rd;
        // Queries: [T, nh * qhd].
        let mut q = match &self.q_b {
            Some(q_b) => {
                let mut qa = Vec::with_capacity(t_total * q_a_width);
                for row in a.chunks_exact(a_width) {
                    qa.extend_from_slice(&row[..q_a_width]);
                }
                rms_norm_rows(&mut qa, &self.q_a_norm, self.eps);
                q_b.forward(&qa, t_total)
            }
            None => {
                let mut qv = Vec::with_capacity(t_total * q_a_width);
                for row in a.chunks_exact(a_width) {
                    qv.extend_from_slice(&row[..q_a_width]);
                }
                qv
            }
        };
        // Latents and shared rope keys go to the cache; queries get their rope.
        for (span_i, span) in spans.iter().enumerate() {
            for j in 0..span.len {
                let t = span.start + j;
                let ang = rope.angles(span.pos0 + j);
                let row = &a[t * a_width + q_a_width..(t + 1) * a_width];
                let entry = caches[span_i].entry_mut(layer, span.pos0 + j);
                entry.copy_from_slice(row);
                rms_norm_rows(&mut entry[..lora], &self.kv_a_norm, self.eps);
                rope.apply(&mut entry[lora..], &ang);
                for h in q[t * nh * qhd..(t + 1) * nh * qhd].chunks_exact_mut(qhd) {
                    rope.apply(&mut h[nope..], &ang);
                }
            }
        }
        let caches_ro: Vec<&SeqCache> = caches.iter().map(|c| &**c).collect();
        let tasks: Vec<(usize, usize)> = (0..spans.len())
            .flat_map(|s| (0..nh).map(move |h| (s, h)))
            .collect();
        let kv_b = &self.kv_b;
        let q = &q;
        let outs: Vec<Vec<f32>> = tasks
            .par_iter()
            .map(|&(s, h)| {
                let span = spans[s];
                let cache = caches_ro[s];
                let head_rows = &kv_b[h * (nope + vd) * lora..(h + 1) * (nope + vd) * lora];
                let (w_uk, w_uv) = head_rows.split_at(nope * lora);
                let mut out = vec![0f32; span.len * vd];
                let mut q_lat = vec![0f32; lora];
                let mut o_lat = vec![0f32; lora];
                for j in 0..span.len {
                    let qh = &q[(span.start + j) * nh * qhd + h * qhd..][..qhd];
                    let (q_nope, q_pe) = qh.split_at(nope);
                    q_lat.fill(0.0);
                    for (i, qi) in q_nope.iter().enumerate() {
                        axpy(&mut q_lat, *qi, &w_uk[i * lora..(i + 1) * lora]);
                    }
                    o_lat.fill(0.0);
                    attend(
                        span.pos0 + j,
                        scale,
                        |p| {
                            let e = cache.entry(layer, p);
                            dot(&q_lat, &e[..lora]) + dot(q_pe, &e[lora..])
                        },
                        |p, w| axpy(&mut o_lat, w, &cache.entry(layer, p)[..lora]),
                    );
                    for (d, o) in out[j * vd..(j + 1) * vd].iter_mut().enumerate() {
                        *o = dot(&w_uv[d * lora..(d + 1) * lora], &o_lat);
                    }
                }
                out
            })
            .collect();
        let mut attn = vec![0f32; t_total * nh * vd];
        for ((s, h), out) in tasks.iter().zip(outs) {
            let span = spans[*s];
            for j in 0..span.len {
                let dst = (span.start + j) * nh * vd + h * vd;
                attn[dst..dst + vd].copy_from_slice(&out[j * vd..(j + 1) * vd]);
            }
        }
        self.o_proj.forward(&attn, t_total)
    }
}
