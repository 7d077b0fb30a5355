//! A device as the node runs it ([`DeviceHost`]): where its experts live (the CPU kernel
//! or a candle device), the compute threads it owns, and what it announces to the
//! placement (kind, precision, bytes per expert, capacity).
//!
//! Devices that compute on the host's cores (`cpu:N`, `candle-cpu:N`) each get a rayon
//! pool of their own, so two such devices on one machine split its cores instead of
//! contending for one global pool: `--threads-per-device`, or the available cores split
//! evenly between them (at least one thread each). A CUDA device computes on the GPU
//! from the blocking task that calls it and has no pool.

use moe_model::{ModelSpec, StoreDevice, WeightDtype};

use crate::config::{DeviceKind, DeviceName};
use crate::error::WorkerError;

/// One device of a node.
pub(crate) struct DeviceHost {
    pub name: DeviceName,
    pub store: StoreDevice,
    /// The device's own compute threads (host-computing devices only).
    pub pool: Option<rayon::ThreadPool>,
    /// Bytes one expert takes here, at the node's precision.
    pub bytes_per_expert: u64,
    /// Bytes the device may give to experts (0: unlimited).
    pub capacity_bytes: u64,
}

impl DeviceHost {
    /// Runs `f` on this device's threads (or on the calling thread for a GPU).
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(pool) => pool.install(f),
            None => f(),
        }
    }

    /// `cpu`, `candle-cpu` or `cuda`.
    pub fn kind(&self) -> &'static str {
        self.name.kind.as_str()
    }

    /// Threads computing this device's experts (0 for a GPU).
    pub fn threads(&self) -> usize {
        self.pool.as_ref().map_or(0, |p| p.current_num_threads())
    }
}

/// Threads for each host-computing device: `per_device`, or `cores` split evenly among
/// `host_devices` (at least one each).
pub(crate) fn threads_for(per_device: Option<usize>, cores: usize, host_devices: usize) -> usize {
    match per_device {
        Some(n) => n.max(1),
        None => (cores / host_devices.max(1)).max(1),
    }
}

/// Opens every device: the GPU itself for `cuda:N` (an error naming it if it cannot be
/// opened), a thread pool for each host-computing device, and the sizes it announces.
/// An int8 node with a candle device is refused here, before anything loads.
pub(crate) fn open_devices(
    names: &[DeviceName],
    spec: &ModelSpec,
    dtype: WeightDtype,
    threads_per_device: Option<usize>,
    capacity_bytes: u64,
) -> Result<Vec<DeviceHost>, WorkerError> {
    let host_devices = names.iter().filter(|d| d.kind != DeviceKind::Cuda).count();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = threads_for(threads_per_device, cores, host_devices);
    names
        .iter()
        .map(|name| {
            let store = name.open()?;
            if let StoreDevice::Candle(_) = store {
                moe_model::CandleExperts::device_dtype(dtype).map_err(|e| {
                    WorkerError::InvalidDevice {
                        device: name.to_string(),
                        reason: e.to_string(),
                    }
                })?;
            }
            let pool = if name.kind == DeviceKind::Cuda {
                None
            } else {
                let label = name.to_string();
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(move |i| format!("{label}-{i}"))
                    .build()
                    .map_err(|e| WorkerError::InvalidDevice {
                        device: name.to_string(),
                        reason: format!("cannot start its {threads} compute threads: {e}"),
                    })?;
                Some(pool)
            };
            #[cfg(feature = "cuda")]
            let capacity_bytes = match capacity_bytes {
                0 => gpu_capacity(name, &store)?,
                set => set,
            };
            Ok(DeviceHost {
                name: *name,
                store,
                pool,
                bytes_per_expert: spec.expert_bytes(dtype) as u64,
                capacity_bytes,
            })
        })
        .collect()
}

/// Share of a GPU's free memory (read when the device opens) that its experts may take
/// when `--capacity-mib` is not given; the rest is for activations and cuBLAS.
#[cfg(feature = "cuda")]
const GPU_EXPERT_SHARE: (u64, u64) = (9, 10);

/// The capacity a device announces when no `--capacity-mib` is given: 9/10 of the free
/// memory for a GPU, 0 (unlimited) for host memory.
#[cfg(feature = "cuda")]
fn gpu_capacity(name: &DeviceName, store: &StoreDevice) -> Result<u64, WorkerError> {
    match store {
        StoreDevice::Candle(candle_core::Device::Cuda(gpu)) => {
            let (free, _total) = gpu.cuda_stream().context().mem_get_info().map_err(|e| {
                WorkerError::InvalidDevice {
                    device: name.to_string(),
                    reason: format!("cannot read its free memory: {e}"),
                }
            })?;
            Ok(free as u64 / GPU_EXPERT_SHARE.1 * GPU_EXPERT_SHARE.0)
        }
        _ => Ok(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cores_are_split_evenly_unless_told() {
        assert_eq!(threads_for(None, 16, 2), 8);
        assert_eq!(threads_for(None, 2, 3), 1);
        assert_eq!(threads_for(None, 8, 0), 8);
        assert_eq!(threads_for(Some(3), 16, 2), 3);
        assert_eq!(threads_for(Some(0), 16, 2), 1);
    }
}
