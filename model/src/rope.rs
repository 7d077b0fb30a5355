//! Rotary position embeddings, written once for every architecture: plain RoPE on split
//! halves (Mixtral, Qwen, OLMoE), interleaved pairs (DeepSeek's MLA), and YaRN's
//! frequency blend and magnitude correction for extended context.

use crate::config::{yarn_mscale, RopeSpec};

/// Precomputed frequencies for one model.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    /// Multiplies cos and sin (YaRN's attention correction; 1 otherwise).
    mscale: f32,
    interleaved: bool,
}

/// cos/sin for one position, reused across heads.
pub struct RopeAngles {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl Rope {
    pub fn new(spec: &RopeSpec) -> Rope {
        let dim = spec.dim;
        let theta = spec.theta as f32;
        let base: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / theta.powf(i as f32 / dim as f32))
            .collect();
        let (inv_freq, mscale) = match &spec.yarn {
            None => (base, 1.0),
            Some(y) => {
                let factor = y.factor as f32;
                let corr = |rot: f64| {
                    (dim as f64
                        * (y.original_max_position_embeddings as f64
                            / (rot * 2.0 * std::f64::consts::PI))
                            .ln())
                        / (2.0 * spec.theta.ln())
                };
                let low = corr(y.beta_fast).floor().max(0.0) as f32;
                let high = corr(y.beta_slow).ceil().min(dim as f64 - 1.0) as f32;
                let high = if low == high { high + 0.001 } else { high };
                let inv = base
                    .iter()
                    .enumerate()
                    .map(|(i, extra)| {
                        let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                        let mask = 1.0 - ramp;
                        let inter = extra / factor;
                        inter * (1.0 - mask) + extra * mask
                    })
                    .collect();
                let m = yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim);
                (inv, m as f32)
            }
        };
        Rope {
            inv_freq,
            mscale,
            interleaved: spec.interleaved,
        }
    }

    /// Rotated dimensions per head.
    pub fn dim(&self) -> usize {
        self.inv_freq.len() * 2
    }

    pub fn angles(&self, pos: usize) -> RopeAngles {
        let p = pos as f32;
        let (mut cos, mut sin) = (
            Vec::with_capacity(self.inv_freq.len()),
            Vec::with_capacity(self.inv_freq.len()),
        );
        for f in &self.inv_freq {
            let a = p * f;
            cos.push(a.cos() * self.mscale);
            sin.push(a.sin() * self.mscale);
        }
        RopeAngles { cos, sin }
    }

    /// Rotates one head vector (`dim()` wide) in place.
    pub fn apply(&self, x: &mut [f32], a: &RopeAngles) {
        let half = self.inv_freq.len();
        if self.interleaved {
            for i in 0..half {
                let (x1, x2) = (x[2 * i], x[2 * i + 1]);
                x[2 * i] = x1 * a.cos[i] - x2 * a.sin[i];
                x[2 * i + 1] = x2 * a.cos[i] + x1 * a.sin[i];
            }
        } else {
            for i in 0..half {
                let (x1, x2) = (x[i], x[i + half]);
                x[i] = x1 * a.cos[i] - x2 * a.sin[i];
                x[i + half] = x2 * a.cos[i] + x1 * a.sin[i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::dot;

    fn spec(interleaved: bool) -> RopeSpec {
        RopeSpec {
            theta: 10000.0,
            dim: 8,
            interleaved,
            yarn: None,
        }
    }

    #[test]
    fn position_zero_is_identity_and_norm_is_kept() {
        for inter in [false, true] {
            let r = Rope::new(&spec(inter));
            let mut x: Vec<f32> = (0..8).map(|i| i as f32 - 3.5).collect();
            let orig = x.clone();
            r.apply(&mut x, &r.angles(0));
            assert_eq!(x, orig);
            r.apply(&mut x, &r.angles(17));
            assert!((dot(&x, &x) - dot(&orig, &orig)).abs() < 1e-4);
            assert_ne!(x, orig);
        }
    }

    #[test]
    fn scores_depend_only_on_relative_position() {
        let r = Rope::new(&spec(false));
        let q: Vec<f32> = (0..8).map(|i| (i as f32).sin()).collect();
        let k: Vec<f32> = (0..8).map(|i| (i as f32).cos()).collect();
        let score = |pq: usize, pk: usize| {
            let (mut a, mut b) = (q.clone(), k.clone());
            r.apply(&mut a, &r.angles(pq));
            r.apply(&mut b, &r.angles(pk));
            dot(&a, &b)
        };
        assert!((score(5, 2) - score(13, 10)).abs() < 1e-4);
    }
}
