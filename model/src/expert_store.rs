//! What a device needs from the experts it hosts: [`ExpertStore`]. A store computes MoE
//! layers (it is an [`ExpertBackend`]), says what it holds and how many bytes, drops
//! experts, and takes in experts loaded separately ([`ExpertStore::absorb`]), so that a
//! device can keep computing while the next experts are read from the checkpoint.
//!
//! [`StoreDevice`] is where a store lives and how one is loaded: the CPU kernel of this
//! crate ([`crate::LocalExperts`]) or a candle device ([`crate::CandleExperts`]: candle's
//! CPU device, or a CUDA GPU when candle-core is built with its `cuda` feature).

use std::any::Any;

use crate::candle_experts::CandleExperts;
use crate::checkpoint::Checkpoint;
use crate::config::ModelSpec;
use crate::error::ModelError;
use crate::expert_backend::{ExpertBackend, ExpertError};
use crate::experts::LocalExperts;
use crate::linalg::WeightDtype;
use crate::progress::Progress;

/// Routed experts held on one device, keyed by `(layer, expert)`.
pub trait ExpertStore: ExpertBackend {
    /// The `(layer, expert)` pairs held, sorted.
    fn hosted(&self) -> Vec<(usize, u32)>;

    /// Bytes of expert weights held (on the device, in its storage precision).
    fn weight_bytes(&self) -> usize;

    /// Drops experts; pairs not held are ignored.
    fn remove(&mut self, which: &[(usize, u32)]);

    /// Moves the experts of `other` into this store. `other` must come from the same
    /// [`StoreDevice`] (same kind, device and precision).
    fn absorb(&mut self, other: Box<dyn ExpertStore>) -> Result<(), ExpertError>;

    /// For [`ExpertStore::absorb`]: the concrete store behind a box.
    fn into_any(self: Box<Self>) -> Box<dyn Any>;
}

/// Where a device's experts live and are computed.
#[derive(Debug, Clone)]
pub enum StoreDevice {
    /// This crate's CPU kernel ([`LocalExperts`]), on the process's rayon pool.
    CpuKernel,
    /// A candle device ([`CandleExperts`]).
    Candle(candle_core::Device),
}

impl StoreDevice {
    /// Reads exactly the listed experts from the checkpoint into a new store on this
    /// device, stored in `dtype`.
    pub fn load(
        &self,
        ckpt: &Checkpoint,
        spec: &ModelSpec,
        which: &[(usize, u32)],
        dtype: WeightDtype,
        progress: Progress<'_>,
    ) -> Result<Box<dyn ExpertStore>, ModelError> {
        Ok(match self {
            StoreDevice::CpuKernel => Box::new(LocalExperts::load_with_progress(
                ckpt, spec, which, dtype, progress,
            )?),
            StoreDevice::Candle(device) => Box::new(CandleExperts::load(
                device,
                CandleExperts::device_dtype(dtype)?,
                ckpt,
                spec,
                which,
                progress,
            )?),
        })
    }
}

/// Checks that `(layer, expert)` names a routed expert of the model.
pub(crate) fn check_expert(spec: &ModelSpec, layer: usize, e: u32) -> Result<(), ModelError> {
    if layer >= spec.num_layers || !spec.moe_layers().any(|l| l == layer) {
        return Err(ModelError::InvalidInput {
            field: "experts",
            reason: format!("layer {layer} is not a MoE layer"),
        });
    }
    if e as usize >= spec.moe.num_experts {
        return Err(ModelError::InvalidInput {
            field: "experts",
            reason: format!(
                "expert {e} does not exist (the model has {})",
                spec.moe.num_experts
            ),
        });
    }
    Ok(())
}

/// Expert → its `(row, weight)` slots, in row order, skipping [`crate::expert_backend::NO_EXPERT`]; the
/// map's ascending expert order is the order results are added in, so a row's sum does
/// not depend on what else is in the batch.
pub(crate) fn group_rows(
    req: &crate::MoeRequest<'_>,
) -> std::collections::BTreeMap<u32, Vec<(usize, f32)>> {
    let mut groups: std::collections::BTreeMap<u32, Vec<(usize, f32)>> = Default::default();
    for row in 0..req.num_rows() {
        for s in 0..req.top_k {
            let e = req.expert_ids[row * req.top_k + s];
            if e == crate::expert_backend::NO_EXPERT {
                continue;
            }
            groups
                .entry(e)
                .or_default()
                .push((row, req.weights[row * req.top_k + s]));
        }
    }
    groups
}
