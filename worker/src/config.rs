//! What a node is started with: [`NodeConfig`], and device names (`cpu:0`, `cuda:1`)
//! parsed and checked once, at start, into [`DeviceName`]s.
//!
//! Devices run on the CPU kernel of `moe-model`. Real CUDA support is out of scope: a
//! `cuda:N` device is rejected unless the crate is built with the `cuda` feature, and
//! even then its experts run on the CPU (the feature only reserves the name so that
//! deployments and tests can be written against it).

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;

use crate::error::WorkerError;

/// How to start a [`crate::Node`].
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Hugging Face checkpoint directory (`config.json`, `*.safetensors`).
    pub model_dir: PathBuf,
    /// Device names, e.g. `["cpu:0", "cpu:1"]`. `cuda:N` needs the `cuda` feature (a
    /// placeholder: real CUDA support is out of scope and such devices compute on the CPU).
    pub devices: Vec<String>,
    /// Storage precision of the loaded expert weights.
    pub dtype: moe_model::WeightDtype,
    /// This worker's identifier (reported by `Info`).
    pub worker_id: String,
    /// Test hook: the device actor that performs the Nth compute (1-based, counted per
    /// node) panics once.
    pub test_panic_at_compute: Option<u64>,
}

/// The kind of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    Cpu,
    /// Accepted only with the `cuda` feature; computes on the CPU (placeholder).
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
        let kind = match self.kind {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        };
        write!(f, "{kind}:{}", self.ordinal)
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
            "cuda" if cfg!(feature = "cuda") => DeviceKind::Cuda,
            "cuda" => return Err(bad(
                "CUDA devices need a build with the `cuda` feature (not enabled in this binary)",
            )),
            _ => return Err(bad("unknown device kind (expected cpu or cuda)")),
        };
        Ok(DeviceName { kind, ordinal })
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
        let d = parse_devices(&names(&["cpu:0", "cpu:1"])).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[1].to_string(), "cpu:1");
    }

    #[test]
    fn rejects_bad_lists() {
        for bad in [
            vec![],
            vec!["cpu:0", "cpu:0"],
            vec!["cpu"],
            vec!["cpu:-1"],
            vec!["tpu:0"],
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
}
