//! The layers of one step, in one or two micro-batches.
//!
//! Each micro-batch is a run of whole sequences with its own residual stream. A layer
//! of a micro-batch has two halves: **begin** (attention, the post-attention norm, then
//! for a MoE layer the gate and [`ExpertBackend::submit`] of its rows, and the shared
//! expert while they are away) and **finish** (wait for the routed experts, add them
//! and the shared expert to the residual). The loop runs
//!
//! ```text
//! layer l:   finish A(l-1)  begin A(l)   finish B(l-1)  begin B(l)
//! layer l+1: finish A(l)    begin A(l+1) finish B(l)    begin B(l+1)
//! ```
//!
//! so while A's experts are on the workers, B's attention runs here, and the other way
//! round. With one micro-batch only the shared expert overlaps the dispatch. Every
//! number is computed as without overlap (same rows, same order of additions); the
//! tokens do not change.

use super::{add_into, LayerFfn, Model};
use crate::attention::SeqSpan;
use crate::error::ModelError;
use crate::expert_backend::{ExpertBackend, MoeBatch, Pending};
use crate::kv_cache::SeqCache;
use crate::linalg::{rms_norm_rows, sigmoid};

/// One micro-batch: its tokens' residual stream (`[t, hidden]`), its sequences' spans
/// (starting at 0 within it) and caches.
pub(super) struct Micro<'c> {
    pub x: Vec<f32>,
    pub spans: Vec<SeqSpan>,
    pub caches: Vec<&'c mut SeqCache>,
}

impl Micro<'_> {
    fn tokens(&self) -> usize {
        self.spans.iter().map(|s| s.len).sum()
    }
}

/// A micro-batch's MoE layer waiting for its routed experts.
struct InFlight<'b> {
    experts: Pending<'b>,
    /// The shared expert's contribution (gated where the model gates it), added to
    /// the routed experts' sum element by element.
    shared: Option<Shared>,
}

enum Shared {
    Plain(Vec<f32>),
    /// Per-token gate values and the shared expert's output.
    Gated(Vec<f32>, Vec<f32>),
}

/// Splits `spans` (whole sequences, in order) at the sequence boundary that balances
/// tokens best; `None` when there are fewer than two sequences.
pub(super) fn split_point(spans: &[SeqSpan]) -> Option<usize> {
    if spans.len() < 2 {
        return None;
    }
    let total: usize = spans.iter().map(|s| s.len).sum();
    let mut before = 0;
    let mut best = (usize::MAX, 1);
    for (i, s) in spans.iter().enumerate().take(spans.len() - 1) {
        before += s.len;
        let diff = before.abs_diff(total - before);
        if diff < best.0 {
            best = (diff, i + 1);
        }
    }
    Some(best.1)
}

impl Model {
    /// Runs every layer over the micro-batches, pipelined as the module says.
    pub(super) fn run_layers(
        &self,
        micros: &mut [Micro<'_>],
        experts: &dyn ExpertBackend,
    ) -> Result<(), ModelError> {
        let mut waiting: Vec<Option<InFlight<'_>>> = micros.iter().map(|_| None).collect();
        for li in 0..self.layers.len() {
            for (m, w) in micros.iter_mut().zip(waiting.iter_mut()) {
                if let Some(f) = w.take() {
                    self.finish(m, f)?;
                }
                *w = self.begin(li, m, experts)?;
            }
        }
        for (m, w) in micros.iter_mut().zip(waiting.iter_mut()) {
            if let Some(f) = w.take() {
                self.finish(m, f)?;
            }
        }
        Ok(())
    }

    /// Attention and, for a MoE layer, the submit and the shared expert; a dense layer
    /// is done here (nothing to wait for).
    fn begin<'b>(
        &self,
        li: usize,
        m: &mut Micro<'_>,
        experts: &'b dyn ExpertBackend,
    ) -> Result<Option<InFlight<'b>>, ModelError> {
        let h = self.spec.hidden_size;
        let t = m.tokens();
        let layer = &self.layers[li];
        let mut hs = m.x.clone();
        rms_norm_rows(&mut hs, &layer.input_norm, self.spec.rms_norm_eps);
        let a = layer.attn.forward(
            li,
            &hs,
            &m.spans,
            &mut m.caches,
            &self.rope,
            self.spec.softmax_scale,
        );
        add_into(&mut m.x, &a);
        let mut hs = m.x.clone();
        rms_norm_rows(&mut hs, &layer.post_norm, self.spec.rms_norm_eps);
        match &layer.ffn {
            LayerFfn::Dense(ffn) => {
                let f = ffn.forward(&hs, t);
                add_into(&mut m.x, &f);
                Ok(None)
            }
            LayerFfn::Moe { gate, shared } => {
                let (expert_ids, weights) = gate.route(&hs, t);
                let rows = if shared.is_some() {
                    hs.clone()
                } else {
                    std::mem::take(&mut hs)
                };
                let pending = experts.submit(MoeBatch {
                    layer: li,
                    hidden: h,
                    top_k: self.spec.moe.top_k,
                    rows,
                    expert_ids,
                    weights,
                });
                let shared = shared.as_ref().map(|se| {
                    let s = se.ffn.forward(&hs, t);
                    match &se.gate {
                        Some(g) => Shared::Gated(g.forward(&hs, t), s),
                        None => Shared::Plain(s),
                    }
                });
                Ok(Some(InFlight {
                    experts: pending,
                    shared,
                }))
            }
        }
    }

    /// Waits for the routed experts and adds them, and the shared expert, to the
    /// residual.
    fn finish(&self, m: &mut Micro<'_>, f: InFlight<'_>) -> Result<(), ModelError> {
        let h = self.spec.hidden_size;
        let mut y = f.experts.wait()?;
        match f.shared {
            None => {}
            Some(Shared::Plain(s)) => add_into(&mut y, &s),
            Some(Shared::Gated(gv, s)) => {
                for (t, (yr, sr)) in y.chunks_exact_mut(h).zip(s.chunks_exact(h)).enumerate() {
                    let w = sigmoid(gv[t]);
                    for (a, b) in yr.iter_mut().zip(sr) {
                        *a += w * b;
                    }
                }
            }
        }
        add_into(&mut m.x, &y);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans(lens: &[usize]) -> Vec<SeqSpan> {
        let mut start = 0;
        lens.iter()
            .map(|&len| {
                let s = SeqSpan {
                    start,
                    len,
                    pos0: 0,
                };
                start += len;
                s
            })
            .collect()
    }

    #[test]
    fn splits_at_the_sequence_boundary_that_balances_tokens() {
        assert_eq!(split_point(&spans(&[5])), None);
        assert_eq!(split_point(&spans(&[1, 1])), Some(1));
        assert_eq!(split_point(&spans(&[1, 1, 1, 1])), Some(2));
        assert_eq!(split_point(&spans(&[10, 1, 1, 1])), Some(1));
        assert_eq!(split_point(&spans(&[1, 1, 1, 10])), Some(3));
        assert_eq!(split_point(&spans(&[3, 3, 2, 2, 2])), Some(2));
    }
}
