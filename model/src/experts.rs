//! The expert feed-forward network (SwiGLU: `down(silu(gate(x)) * up(x))`), written once
//! for routed experts, shared experts and dense layers, and [`LocalExperts`], the
//! in-process [`ExpertBackend`] (the seam itself is in [`crate::expert_backend`]).

use std::any::Any;
use std::collections::HashMap;

use rayon::prelude::*;

use crate::checkpoint::Checkpoint;
use crate::config::ModelSpec;
use crate::error::ModelError;
use crate::expert_store::{check_expert, group_rows, ExpertStore};
use crate::linalg::{silu, Linear, LinearBuilder, WeightDtype};
use crate::progress::Progress;

pub use crate::expert_backend::{ExpertBackend, ExpertError, MoeRequest, NO_EXPERT};

/// A SwiGLU feed-forward block with gate and up fused into one matrix.
pub struct Ffn {
    gate_up: Linear,
    down: Linear,
    intermediate: usize,
}

impl Ffn {
    /// Loads `gate`, `up`, `down` (each `[out, in]` as stored) from the checkpoint.
    pub fn load(
        ckpt: &Checkpoint,
        names: &[String; 3],
        hidden: usize,
        intermediate: usize,
        dtype: WeightDtype,
    ) -> Result<Ffn, ModelError> {
        // Row by row into the storage precision: a bf16 or int8 expert (from an FP8,
        // bf16 or f32 checkpoint) never exists as f32.
        let mut gate_up = LinearBuilder::new(2 * intermediate, hidden, dtype);
        for name in &names[..2] {
            ckpt.for_each_row(name, [intermediate, hidden], |r| gate_up.push_row(r))?;
        }
        let mut down = LinearBuilder::new(hidden, intermediate, dtype);
        ckpt.for_each_row(&names[2], [hidden, intermediate], |r| down.push_row(r))?;
        Ok(Ffn {
            gate_up: gate_up.finish(None),
            down: down.finish(None),
            intermediate,
        })
    }

    /// `x` is `[m, hidden]`; returns `[m, hidden]`.
    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        let i = self.intermediate;
        let gu = self.gate_up.forward(x, m);
        let mut h = vec![0f32; m * i];
        for (t, row) in gu.chunks_exact(2 * i).enumerate() {
            let (g, u) = row.split_at(i);
            for ((o, gg), uu) in h[t * i..(t + 1) * i].iter_mut().zip(g).zip(u) {
                *o = silu(*gg) * uu;
            }
        }
        self.down.forward(&h, m)
    }

    pub fn weight_bytes(&self) -> usize {
        self.gate_up.weight_bytes() + self.down.weight_bytes()
    }
}

/// Routed experts held in this process, keyed by `(layer, expert)`.
pub struct LocalExperts {
    hidden: usize,
    experts: HashMap<(usize, u32), Ffn>,
}

impl LocalExperts {
    /// Loads exactly the listed experts, touching no other tensor of the checkpoint.
    pub fn load(
        ckpt: &Checkpoint,
        spec: &ModelSpec,
        which: &[(usize, u32)],
        dtype: WeightDtype,
    ) -> Result<LocalExperts, ModelError> {
        LocalExperts::load_with_progress(ckpt, spec, which, dtype, &crate::progress::quiet)
    }

    /// [`LocalExperts::load`], reporting the bytes read to `progress`.
    pub fn load_with_progress(
        ckpt: &Checkpoint,
        spec: &ModelSpec,
        which: &[(usize, u32)],
        dtype: WeightDtype,
        progress: Progress<'_>,
    ) -> Result<LocalExperts, ModelError> {
        let names: Vec<String> = which
            .iter()
            .flat_map(|(l, e)| spec.expert_tensor_names(*l, *e as usize))
            .collect();
        let total = ckpt.stored_bytes(&names);
        let mut done = 0;
        let mut experts = HashMap::with_capacity(which.len());
        for &(layer, e) in which {
            check_expert(spec, layer, e)?;
            let n = spec.expert_tensor_names(layer, e as usize);
            let ffn = Ffn::load(
                ckpt,
                &n,
                spec.hidden_size,
                spec.moe.intermediate_size,
                dtype,
            )?;
            done += ckpt.stored_bytes(&n);
            progress(done, total);
            experts.insert((layer, e), ffn);
        }
        Ok(LocalExperts {
            hidden: spec.hidden_size,
            experts,
        })
    }

    /// Every routed expert of every MoE layer.
    pub fn all_of(spec: &ModelSpec) -> Vec<(usize, u32)> {
        spec.moe_layers()
            .flat_map(|l| (0..spec.moe.num_experts as u32).map(move |e| (l, e)))
            .collect()
    }

    /// The `(layer, expert)` pairs held, sorted.
    pub fn hosted(&self) -> Vec<(usize, u32)> {
        let mut v: Vec<_> = self.experts.keys().copied().collect();
        v.sort_unstable();
        v
    }

    pub fn weight_bytes(&self) -> usize {
        self.experts.values().map(Ffn::weight_bytes).sum()
    }

    /// Adds experts (e.g. a new placement) to those held.
    pub fn extend(&mut self, other: LocalExperts) {
        self.experts.extend(other.experts);
    }

    /// Drops experts no longer assigned here.
    pub fn remove(&mut self, which: &[(usize, u32)]) {
        for k in which {
            self.experts.remove(k);
        }
    }
}

impl ExpertBackend for LocalExperts {
    fn forward(&self, req: &MoeRequest<'_>) -> Result<Vec<f32>, ExpertError> {
        req.validate()?;
        if req.hidden != self.hidden {
            return Err(ExpertError::Invalid(format!(
                "rows are {} wide, the model's hidden size is {}",
                req.hidden, self.hidden
            )));
        }
        let h = self.hidden;
        let n = req.num_rows();
        let groups = group_rows(req);
        let work: Vec<(&Ffn, &[(usize, f32)])> = groups
            .iter()
            .map(|(e, rows)| {
                self.experts
                    .get(&(req.layer, *e))
                    .map(|f| (f, rows.as_slice()))
                    .ok_or(ExpertError::NotHosted {
                        layer: req.layer,
                        expert: *e,
                    })
            })
            .collect::<Result<_, _>>()?;
        // One matmul per expert over all its rows; experts run in parallel.
        let outputs: Vec<Vec<f32>> = work
            .par_iter()
            .map(|(ffn, rows)| {
                let mut x = Vec::with_capacity(rows.len() * h);
                for (r, _) in rows.iter() {
                    x.extend_from_slice(&req.rows[r * h..(r + 1) * h]);
                }
                ffn.forward(&x, rows.len())
            })
            .collect();
        // Weighted sums, added in ascending expert order so a row's result does not
        // depend on what else is in the batch.
        let mut out = vec![0f32; n * h];
        for ((_, rows), y) in work.iter().zip(&outputs) {
            for (j, (r, w)) in rows.iter().enumerate() {
                let dst = &mut out[r * h..(r + 1) * h];
                for (d, v) in dst.iter_mut().zip(&y[j * h..(j + 1) * h]) {
                    *d += w * v;
                }
            }
        }
        Ok(out)
    }
}

impl ExpertStore for LocalExperts {
    fn hosted(&self) -> Vec<(usize, u32)> {
        LocalExperts::hosted(self)
    }

    fn weight_bytes(&self) -> usize {
        LocalExperts::weight_bytes(self)
    }

    fn remove(&mut self, which: &[(usize, u32)]) {
        LocalExperts::remove(self, which)
    }

    fn absorb(&mut self, other: Box<dyn ExpertStore>) -> Result<(), ExpertError> {
        let other = other.into_any().downcast::<LocalExperts>().map_err(|_| {
            ExpertError::Invalid(
                "experts loaded for another device kind than the CPU kernel".into(),
            )
        })?;
        self.extend(*other);
        Ok(())
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}
