//! The MoE gate: per token, the router's logits over the experts become the top-k expert
//! ids and their weights, by the architecture's own rule (see [`RoutingSpec`]). One
//! implementation of top-k serves every rule.

use crate::config::RoutingSpec;
use crate::linalg::{sigmoid, softmax, Linear};

/// The gate of one MoE layer.
pub struct Gate {
    linear: Linear,
    /// DeepSeek-V3's `e_score_correction_bias` (selection only, not weights).
    bias: Option<Vec<f32>>,
    rule: RoutingSpec,
    top_k: usize,
}

/// Indices of the `k` largest values, largest first; ties go to the lower index.
pub fn top_k_indices(v: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    let cmp = |a: &usize, b: &usize| {
        v[*b]
            .partial_cmp(&v[*a])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(b))
    };
    let k = k.min(v.len());
    if k < idx.len() && k > 0 {
        idx.select_nth_unstable_by(k - 1, cmp);
    }
    idx.truncate(k);
    idx.sort_by(cmp);
    idx
}

impl Gate {
    pub fn new(linear: Linear, bias: Option<Vec<f32>>, rule: RoutingSpec, top_k: usize) -> Gate {
        Gate {
            linear,
            bias,
            rule,
            top_k,
        }
    }

    pub fn num_experts(&self) -> usize {
        self.linear.out_dim()
    }

    /// `x` is `[m, hidden]`; returns `([m, k] expert ids, [m, k] weights)`.
    pub fn route(&self, x: &[f32], m: usize) -> (Vec<u32>, Vec<f32>) {
        let e = self.num_experts();
        let logits = self.linear.forward(x, m);
        let mut ids = Vec::with_capacity(m * self.top_k);
        let mut weights = Vec::with_capacity(m * self.top_k);
        for row in logits.chunks_exact(e) {
            let (i, w) = self.route_one(row);
            ids.extend(i.into_iter().map(|v| v as u32));
            weights.extend(w);
        }
        (ids, weights)
    }

    fn route_one(&self, logits: &[f32]) -> (Vec<usize>, Vec<f32>) {
        let k = self.top_k;
        match &self.rule {
            RoutingSpec::SoftmaxTopK { norm_topk_prob } => {
                let mut p = logits.to_vec();
                softmax(&mut p);
                let sel = top_k_indices(&p, k);
                let mut w: Vec<f32> = sel.iter().map(|i| p[*i]).collect();
                if *norm_topk_prob {
                    let s: f32 = w.iter().sum();
                    w.iter_mut().for_each(|v| *v /= s);
                }
                (sel, w)
            }
            RoutingSpec::DeepseekV2 {
                group_limited,
                n_group,
                topk_group,
                norm_topk_prob,
                routed_scaling_factor,
            } => {
                let mut p = logits.to_vec();
                softmax(&mut p);
                let choice = if *group_limited {
                    mask_groups(&p, *n_group, *topk_group, |g| {
                        g.iter().copied().fold(f32::NEG_INFINITY, f32::max)
                    })
                } else {
                    p.clone()
                };
                let sel = top_k_indices(&choice, k);
                let mut w: Vec<f32> = sel.iter().map(|i| p[*i]).collect();
                if k > 1 && *norm_topk_prob {
                    let s: f32 = w.iter().sum::<f32>() + 1e-20;
                    w.iter_mut().for_each(|v| *v /= s);
                } else {
                    w.iter_mut().for_each(|v| *v *= routed_scaling_factor);
                }
                (sel, w)
            }
            RoutingSpec::DeepseekV3 {
                n_group,
                topk_group,
                norm_topk_prob,
                routed_scaling_factor,
            } => {
                let scores: Vec<f32> = logits.iter().map(|v| sigmoid(*v)).collect();
                let biased: Vec<f32> = match &self.bias {
                    Some(b) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
                    None => scores.clone(),
                };
                let choice = mask_groups(&biased, *n_group, *topk_group, |g| {
                    let top = top_k_indices(g, 2);
                    top.iter().map(|i| g[*i]).sum()
                });
                let sel = top_k_indices(&choice, k);
                let mut w: Vec<f32> = sel.iter().map(|i| scores[*i]).collect();
                if *norm_topk_prob {
                    let s: f32 = w.iter().sum::<f32>() + 1e-20;
                    w.iter_mut().for_each(|v| *v /= s);
                }
                w.iter_mut().for_each(|v| *v *= routed_scaling_factor);
                (sel, w)
            }
        }
    }
}

/// Keeps the scores of the `topk_group` best groups (by `group_score`) and sets every
/// other expert to -∞ so it cannot be chosen.
fn mask_groups(
    scores: &[f32],
    n_group: usize,
    topk_group: usize,
    group_score: impl Fn(&[f32]) -> f32,
) -> Vec<f32> {
    let per = scores.len() / n_group.max(1);
    let gs: Vec<f32> = scores.chunks(per.max(1)).map(&group_score).collect();
    let keep = top_k_indices(&gs, topk_group);
    let mut out = vec![f32::NEG_INFINITY; scores.len()];
    for g in keep {
        out[g * per..(g + 1) * per].copy_from_slice(&scores[g * per..(g + 1) * per]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::WeightDtype;

    /// A gate whose logits equal the input row (identity weights).
    fn gate(rule: RoutingSpec, e: usize, k: usize, bias: Option<Vec<f32>>) -> Gate {
        let mut w = vec![0f32; e * e];
        for i in 0..e {
            w[i * e + i] = 1.0;
        }
        Gate::new(Linear::new(w, e, e, None, WeightDtype::F32), bias, rule, k)
    }

    #[test]
    fn top_k_orders_and_breaks_ties_low() {
        assert_eq!(top_k_indices(&[1.0, 3.0, 3.0, 2.0], 3), vec![1, 2, 3]);
        assert_eq!(top_k_indices(&[1.0], 4), vec![0]);
    }

    #[test]
    fn softmax_top_k_renormalises_only_when_asked() {
        let logits = [0.0, 2.0, 1.0, -1.0];
        let g = gate(
            RoutingSpec::SoftmaxTopK {
                norm_topk_prob: true,
            },
            4,
            2,
            None,
        );
        let (ids, w) = g.route(&logits, 1);
        assert_eq!(ids, vec![1, 2]);
        assert!((w[0] + w[1] - 1.0).abs() < 1e-6);
        let g = gate(
            RoutingSpec::SoftmaxTopK {
                norm_topk_prob: false,
            },
            4,
            2,
            None,
        );
        let (_, w2) = g.route(&logits, 1);
        assert!(w2[0] + w2[1] < 0.95);
        assert!((w2[0] / w2[1] - std::f32::consts::E).abs() < 1e-4);
    }

    #[test]
    fn deepseek_v3_selects_within_best_groups_with_bias_but_weights_without() {
        // 4 groups of 2. Group scores (sum of top 2 of sigmoid+bias) make groups 0 and 3 win.
        let logits = [3.0, 3.0, 0.0, 4.0, -5.0, -5.0, 2.5, 2.5];
        let bias = vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let rule = RoutingSpec::DeepseekV3 {
            n_group: 4,
            topk_group: 2,
            norm_topk_prob: true,
            routed_scaling_factor: 2.0,
        };
        let g = gate(rule.clone(), 8, 2, Some(bias));
        let (ids, w) = g.route(&logits, 1);
        // Expert 3 has the highest score but its group (2,3) loses to groups 0 and 3.
        assert_eq!(ids, vec![0, 1]);
        assert!((w[0] + w[1] - 2.0).abs() < 1e-5, "normalised then scaled");
        // A bias that lifts expert 6 changes the choice, not the weight formula.
        let mut b = vec![0.0; 8];
        b[6] = 1.0;
        let g = gate(rule, 8, 2, Some(b));
        let (ids, w) = g.route(&logits, 1);
        assert_eq!(ids, vec![6, 0]);
        let (s6, s0) = (sigmoid(2.5), sigmoid(3.0));
        assert!((w[0] - 2.0 * s6 / (s6 + s0)).abs() < 1e-5);
    }

    #[test]
    fn deepseek_v2_group_limited_uses_group_max() {
        let logits = [5.0, -9.0, 1.0, 1.0, 4.0, 4.0];
        let rule = RoutingSpec::DeepseekV2 {
            group_limited: true,
            n_group: 3,
            topk_group: 1,
            norm_topk_prob: false,
            routed_scaling_factor: 1.5,
        };
        let (ids, w) = gate(rule, 6, 2, None).route(&logits, 1);
        // Group 0 has the single best expert, so only experts 0 and 1 are eligible.
        assert_eq!(ids, vec![0, 1]);
        let mut p = logits.to_vec();
        softmax(&mut p);
        assert!((w[0] - 1.5 * p[0]).abs() < 1e-6);
    }
}
