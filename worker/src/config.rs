//! What a node is started with: [`NodeConfig`], and device names parsed and checked
//! once, at start, into [`DeviceName`]s, then opened into the [`StoreDevice`] that holds
//! and computes each device's experts:
//!
//! - `cpu:N`: the CPU kernel of `moe-model` ([`moe_model::LocalExperts`]);
//! - `candle-cpu:N`: candle's CPU device ([`moe_model::CandleExperts`]), the same code
//!   path as a GPU, so that a CPU-only machine runs and tests it for real;
//! - `cuda:N`: candle on CUDA GPU N; needs a build with the `cuda` feature, and fails at
//!   start, naming the device, if the GPU cannot be opened.
//!
//! The ordinal of `cpu` and `candle-cpu` devices only tells devices apart (all of them
//! share the process's cores).

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;

use moe_model::StoreDevice;

use crate::error::WorkerError;

/// How to start a [`crate::Node`].
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Hugging Face checkpoint directory (`config.json`, `*.safetensors`).
    pub model_dir: PathBuf,
    /// Device names, e.g. `["cpu:0", "cpu:1"]`, `["candle-cpu:0"]`, `["cuda:0"]` (the
    /// last needs the `cuda` feature).
    pub devices: Vec<String>,
    /// Storage precision of the loaded expert weights.
    pub dtype: moe_model::WeightDtype,
    /// This worker's identifier (reported by `Info`).
    pub worker_id: String,
    /// Compute threads of each device that computes on the host (`cpu:N`,
    /// `candle-cpu:N`); `None` splits the available cores evenly between them.
    pub threads_per_device: Option<usize>,
    /// Bytes each device may give to expert weights, announced to the placement
    /// (0: unlimited).
    pub capacity_bytes: u64,
    /// Test hook: the device actor that performs the Nth compute (1-based, counted per
    /// node) panics once.
    pub test_panic_at_compute: Option<u64>,
}

/// The kind of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    /// The CPU kernel of `moe-model`.
    Cpu,
    /// candle's CPU device.
    CandleCpu,
    /// candle on a CUDA GPU; accepted only with the `cuda` feature.
    Cuda,
}

/// A parsed device name: kind and ordinal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceName {
    pub kind: DeviceKind,
    pub ordinal: u32,
}

impl fmt::Display for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind.as_str(), self.ordinal)
    }
}

impl std::str::FromStr for DeviceName {
    type Err = WorkerError;

    fn from_str(s: &str) -> Result<DeviceName, WorkerError> {
        let bad = |reason: &str| WorkerError::InvalidDevice {
            device: s.to_owned(),
            reason: reason.to_owned(),
        };
        let (kind, ordinal) = s
            .trim()
            .split_once(':')
            .ok_or_else(|| bad("expected KIND:N, e.g. cpu:0"))?;
        let ordinal: u32 = ordinal
            .parse()
            .map_err(|_| bad("the ordinal after `:` must be a non-negative integer"))?;
        let kind = match kind {
            "cpu" => DeviceKind::Cpu,
            "candle-cpu" => DeviceKind::CandleCpu,
            "cuda" if cfg!(feature = "cuda") => DeviceKind::Cuda,
            "cuda" => return Err(bad(
                "CUDA devices need a build with the `cuda` feature (not enabled in this binary)",
            )),
            _ => {
                return Err(bad(
                    "unknown device kind (expected cpu, candle-cpu or cuda)",
                ))
            }
        };
        Ok(DeviceName { kind, ordinal })
    }
}

impl DeviceKind {
    /// The kind's name in device names and registrations.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::CandleCpu => "candle-cpu",
            DeviceKind::Cuda => "cuda",
        }
    }
}

impl DeviceName {
    /// Opens the device its experts will live on. A GPU that cannot be opened (no
    /// driver, no such ordinal) is an error naming the device.
    pub fn open(&self) -> Result<StoreDevice, WorkerError> {
        match self.kind {
            DeviceKind::Cpu => Ok(StoreDevice::CpuKernel),
            DeviceKind::CandleCpu => Ok(StoreDevice::Candle(candle_core::Device::Cpu)),
            DeviceKind::Cuda => candle_core::Device::new_cuda(self.ordinal as usize)
                .map(StoreDevice::Candle)
                .map_err(|e| WorkerError::InvalidDevice {
                    device: self.to_string(),
                    reason: format!("cannot open the GPU: {e}"),
                }),
        }
    }
}

/// Parses a device list: at least one device, no duplicates.
pub fn parse_devices(names: &[String]) -> Result<Vec<DeviceName>, WorkerError> {
    if names.is_empty() {
        return Err(WorkerError::InvalidDevice {
            device: String::new(),
            reason: "at least one device is needed".into(),
        });
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        let d: DeviceName = n.parse()?;
        if !seen.insert(d) {
            return Err(WorkerError::InvalidDevice {
                device: n.clone(),
                reason: "listed twice".into(),
            });
        }
        out.push(d);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_cpu_devices() {
        let d = parse_devices(&names(&["cpu:0", "cpu:1", "candle-cpu:0"])).unwrap();
        assert_eq!(d.len(), 3);
        assert_eq!(d[1].to_string(), "cpu:1");
        assert_eq!(d[2].kind, DeviceKind::CandleCpu);
        assert_eq!(d[2].to_string(), "candle-cpu:0");
        assert!(matches!(d[0].open().unwrap(), StoreDevice::CpuKernel));
        assert!(matches!(d[2].open().unwrap(), StoreDevice::Candle(_)));
    }

    #[test]
    fn rejects_bad_lists() {
        for bad in [
            vec![],
            vec!["cpu:0", "cpu:0"],
            vec!["cpu"],
            vec!["cpu:-1"],
            vec!["tpu:0"],
            vec!["candle-cpu"],
            vec!["candle-cpu:0", "candle-cpu:0"],
        ] {
            let err = parse_devices(&names(&bad)).unwrap_err();
            assert!(matches!(err, WorkerError::InvalidDevice { .. }), "{bad:?}");
        }
    }

    #[test]
    fn cuda_needs_the_feature() {
        let r = "cuda:0".parse::<DeviceName>();
        if cfg!(feature = "cuda") {
            assert_eq!(r.unwrap().kind, DeviceKind::Cuda);
        } else {
            let msg = r.unwrap_err().to_string();
            assert!(msg.contains("cuda"), "{msg}");
        }
    }

    /// Without a GPU (every machine the tests run on), opening `cuda:N` is an error
    /// that names the device, not a panic.
    #[test]
    fn a_gpu_that_cannot_be_opened_is_named() {
        let d = DeviceName {
            kind: DeviceKind::Cuda,
            ordinal: 7,
        };
        if let Err(e) = d.open() {
            assert!(e.to_string().contains("cuda:7"), "{e}");
        }
    }
}
