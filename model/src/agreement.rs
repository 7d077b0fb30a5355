//! How far a lower-precision copy of a model is from the reference: both read the same
//! token sequence one token at a time (teacher forcing, so one early difference does not
//! change everything after it), and at every position we compare the next-token
//! distributions. Used by the int8 test on the tiny checkpoints and by
//! `moe bench agreement` on the bench checkpoint.

use crate::checkpoint::Checkpoint;
use crate::config::ModelSpec;
use crate::error::ModelError;
use crate::experts::LocalExperts;
use crate::kv_cache::KvPool;
use crate::linalg::WeightDtype;
use crate::model::{Model, StepSeq};

/// The comparison of a candidate precision with a reference over one sequence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Agreement {
    /// Positions compared.
    pub positions: usize,
    /// Positions where both pick the same most likely next token.
    pub same_top1: usize,
    /// Mean over positions of |log p_ref(t) − log p_cand(t)|, `t` the reference's most
    /// likely next token.
    pub mean_abs_logprob_diff: f64,
    /// The largest such difference.
    pub max_abs_logprob_diff: f64,
}

impl Agreement {
    /// `same_top1 / positions`.
    pub fn top1_rate(&self) -> f64 {
        self.same_top1 as f64 / self.positions.max(1) as f64
    }
}

fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|v| (*v as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    logits.iter().map(|v| *v as f64 - lse).collect()
}

fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

/// The next-token log-probabilities after each prefix of `tokens` (teacher forcing), with
/// the whole model (dense part and routed experts) stored in `dtype`.
pub fn next_token_logprobs(
    ckpt: &Checkpoint,
    spec: &ModelSpec,
    dtype: WeightDtype,
    tokens: &[u32],
) -> Result<Vec<Vec<f64>>, ModelError> {
    let model = Model::load_from(ckpt, spec.clone(), dtype)?;
    let experts = LocalExperts::load(ckpt, spec, &LocalExperts::all_of(spec), dtype)?;
    let pool = KvPool::new(spec, tokens.len() + 1);
    let mut cache = pool.new_sequence();
    let mut out = Vec::with_capacity(tokens.len());
    for t in tokens {
        let logits = model.forward(
            &mut [StepSeq {
                tokens: std::slice::from_ref(t),
                cache: &mut cache,
            }],
            &experts,
        )?;
        out.push(log_softmax(&logits[0]));
    }
    Ok(out)
}

/// Compares `candidate` with `reference` over `tokens` (see the module doc).
pub fn compare(
    ckpt: &Checkpoint,
    spec: &ModelSpec,
    reference: WeightDtype,
    candidate: WeightDtype,
    tokens: &[u32],
) -> Result<Agreement, ModelError> {
    let want = next_token_logprobs(ckpt, spec, reference, tokens)?;
    let got = next_token_logprobs(ckpt, spec, candidate, tokens)?;
    let mut a = Agreement {
        positions: want.len(),
        same_top1: 0,
        mean_abs_logprob_diff: 0.0,
        max_abs_logprob_diff: 0.0,
    };
    for (w, g) in want.iter().zip(&got) {
        let top = argmax(w);
        if argmax(g) == top {
            a.same_top1 += 1;
        }
        let d = (w[top] - g[top]).abs();
        a.mean_abs_logprob_diff += d;
        a.max_abs_logprob_diff = a.max_abs_logprob_diff.max(d);
    }
    a.mean_abs_logprob_diff /= a.positions.max(1) as f64;
    Ok(a)
}
