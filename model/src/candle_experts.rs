//! [`CandleExperts`]: routed experts on a candle [`Device`] (candle's CPU device, or a
//! CUDA GPU when candle-core is built with `cuda`). Weights are uploaded once, in the
//! device precision (f32, bf16 or f16), with gate and up fused into one `[2I, H]`
//! matrix. A MoE request is computed grouped per expert: the rows routed to an expert
//! are gathered, multiplied by gate·up, SiLU(gate)·up, multiplied by down, scaled by
//! their routing weights and scatter-added into the `[n, H]` output, which stays f32 on
//! the device and comes back to the host as f32. Experts are added in ascending id
//! order, as the CPU kernel does.

use std::any::Any;
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::Checkpoint;
use crate::config::ModelSpec;
use crate::error::ModelError;
use crate::expert_backend::{ExpertBackend, ExpertError, MoeRequest};
use crate::expert_store::{check_expert, group_rows, ExpertStore};
use crate::linalg::WeightDtype;
use crate::progress::Progress;

/// One expert's weights on the device.
struct DeviceFfn {
    /// `[2I, H]`: gate rows, then up rows.
    gate_up: Tensor,
    /// `[H, I]`.
    down: Tensor,
}

/// Routed experts on one candle device, keyed by `(layer, expert)`.
pub struct CandleExperts {
    device: Device,
    dtype: DType,
    hidden: usize,
    intermediate: usize,
    experts: HashMap<(usize, u32), DeviceFfn>,
}

/// A short name for a device in messages (`cpu`, `cuda:0`).
fn device_label(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "candle cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

impl CandleExperts {
    /// The device precision for a `--dtype`: f32 stays f32, bf16 is bf16 (f16 is
    /// available through [`CandleExperts::load`] directly). Int8 blocks are a format of
    /// the CPU kernel only: asking for them on a candle device is an error naming both.
    pub fn device_dtype(dtype: WeightDtype) -> Result<DType, ModelError> {
        match dtype {
            WeightDtype::F32 => Ok(DType::F32),
            WeightDtype::Bf16 => Ok(DType::BF16),
            WeightDtype::Int8 => Err(ModelError::InvalidInput {
                field: "dtype",
                reason: "int8 experts run on the CPU kernel (`cpu:N` devices); candle devices \
                         take f32 or bf16"
                    .into(),
            }),
        }
    }

    /// Reads exactly the listed experts from the checkpoint and uploads them to
    /// `device` in `dtype` (F32, BF16 or F16).
    pub fn load(
        device: &Device,
        dtype: DType,
        ckpt: &Checkpoint,
        spec: &ModelSpec,
        which: &[(usize, u32)],
        progress: Progress<'_>,
    ) -> Result<CandleExperts, ModelError> {
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(ModelError::InvalidInput {
                field: "dtype",
                reason: format!("experts on a candle device are f32, bf16 or f16, not {dtype:?}"),
            });
        }
        let (h, i) = (spec.hidden_size, spec.moe.intermediate_size);
        let names: Vec<String> = which
            .iter()
            .flat_map(|(l, e)| spec.expert_tensor_names(*l, *e as usize))
            .collect();
        let total = ckpt.stored_bytes(&names);
        let mut done = 0;
        let upload = |v: Vec<f32>, rows: usize, cols: usize| -> Result<Tensor, ModelError> {
            Tensor::from_vec(v, (rows, cols), &Device::Cpu)
                .and_then(|t| t.to_dtype(dtype))
                .and_then(|t| t.to_device(device))
                .map_err(|e| ModelError::Device {
                    device: device_label(device),
                    reason: format!("uploading expert weights: {e}"),
                })
        };
        let mut experts = HashMap::with_capacity(which.len());
        for &(layer, e) in which {
            check_expert(spec, layer, e)?;
            let n = spec.expert_tensor_names(layer, e as usize);
            let mut gu = ckpt.tensor_f32(&n[0], &[i, h])?;
            gu.extend(ckpt.tensor_f32(&n[1], &[i, h])?);
            let down = ckpt.tensor_f32(&n[2], &[h, i])?;
            let ffn = DeviceFfn {
                gate_up: upload(gu, 2 * i, h)?,
                down: upload(down, h, i)?,
            };
            done += ckpt.stored_bytes(&n);
            progress(done, total);
            experts.insert((layer, e), ffn);
        }
        Ok(CandleExperts {
            device: device.clone(),
            dtype,
            hidden: h,
            intermediate: i,
            experts,
        })
    }

    /// The device the weights are on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The device precision of the weights.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    fn compute(
        &self,
        req: &MoeRequest<'_>,
        work: Vec<(&DeviceFfn, Vec<u32>, Vec<f32>)>,
    ) -> candle_core::Result<Vec<f32>> {
        let (n, h, i) = (req.num_rows(), self.hidden, self.intermediate);
        let dev = &self.device;
        let x = Tensor::from_slice(req.rows, (n, h), dev)?.to_dtype(self.dtype)?;
        let mut out = Tensor::zeros((n, h), DType::F32, dev)?;
        for (ffn, rows, weights) in work {
            let m = rows.len();
            let idx = Tensor::from_vec(rows, m, dev)?;
            let xe = x.index_select(&idx, 0)?;
            let gu = xe.matmul(&ffn.gate_up.t()?)?;
            let act = (gu.narrow(1, 0, i)?.silu()? * gu.narrow(1, i, i)?)?;
            let y = act.matmul(&ffn.down.t()?)?.to_dtype(DType::F32)?;
            let w = Tensor::from_vec(weights, (m, 1), dev)?;
            out = out.index_add(&idx, &y.broadcast_mul(&w)?, 0)?;
        }
        out.flatten_all()?.to_vec1::<f32>()
    }
}

impl ExpertBackend for CandleExperts {
    fn forward(&self, req: &MoeRequest<'_>) -> Result<Vec<f32>, ExpertError> {
        req.validate()?;
        if req.hidden != self.hidden {
            return Err(ExpertError::Invalid(format!(
                "rows are {} wide, the model's hidden size is {}",
                req.hidden, self.hidden
            )));
        }
        let mut work = Vec::new();
        for (e, slots) in group_rows(req) {
            let ffn = self
                .experts
                .get(&(req.layer, e))
                .ok_or(ExpertError::NotHosted {
                    layer: req.layer,
                    expert: e,
                })?;
            // Row indices fit u32: a request's row count is bounded far below it.
            let rows = slots.iter().map(|(r, _)| *r as u32).collect();
            let weights = slots.iter().map(|(_, w)| *w).collect();
            work.push((ffn, rows, weights));
        }
        if work.is_empty() {
            return Ok(vec![0f32; req.rows.len()]);
        }
        self.compute(req, work)
            .map_err(|e| ExpertError::Unavailable(format!("{}: {e}", device_label(&self.device))))
    }
}

impl ExpertStore for CandleExperts {
    fn hosted(&self) -> Vec<(usize, u32)> {
        let mut v: Vec<_> = self.experts.keys().copied().collect();
        v.sort_unstable();
        v
    }

    fn weight_bytes(&self) -> usize {
        let per = (3 * self.hidden * self.intermediate) * self.dtype.size_in_bytes();
        per * self.experts.len()
    }

    fn remove(&mut self, which: &[(usize, u32)]) {
        for k in which {
            self.experts.remove(k);
        }
    }

    fn absorb(&mut self, other: Box<dyn ExpertStore>) -> Result<(), ExpertError> {
        let other = other
            .into_any()
            .downcast::<CandleExperts>()
            .map_err(|_| ExpertError::Invalid("experts loaded for another device kind".into()))?;
        if !self.device.same_device(&other.device) || self.dtype != other.dtype {
            return Err(ExpertError::Invalid(format!(
                "experts loaded on {} in {:?} cannot join those on {} in {:?}",
                device_label(&other.device),
                other.dtype,
                device_label(&self.device),
                self.dtype
            )));
        }
        self.experts.extend(other.experts);
        Ok(())
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}
