//! Reads tensors out of a Hugging Face checkpoint directory: one `model.safetensors` or
//! shards listed in `model.safetensors.index.json`, memory-mapped, never read whole.
//!
//! Each tensor is converted to f32 on the way out (f32, bf16, f16, and FP8 e4m3 with
//! DeepSeek-V3's block-wise `weight_scale_inv`). Only the tensors asked for are touched, so a
//! worker that hosts a few experts reads only their bytes. Every failure names the file
//! and tensor.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::tensor::{Dtype, TensorInfo};
use safetensors::SafeTensors;

use crate::error::ModelError;

/// One memory-mapped shard and its parsed header.
struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Bytes before the data section (8-byte length + JSON header).
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
}

/// An open checkpoint: a name → shard index over all `*.safetensors` files.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Arc<Shard>>,
    index: HashMap<String, usize>,
    fp8_block: Option<(usize, usize)>,
}

impl Checkpoint {
    /// Opens every shard of the checkpoint in `dir` and reads their headers.
    /// `fp8_block` is the model's FP8 block size, if it is quantised.
    pub fn open(dir: &Path, fp8_block: Option<(usize, usize)>) -> Result<Checkpoint, ModelError> {
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| ModelError::Io {
                path: index_path.clone(),
                source: e,
            })?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::Checkpoint {
                    path: index_path.clone(),
                    reason: e.to_string(),
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::Checkpoint {
                    path: index_path.clone(),
                    reason: "no `weight_map` object".into(),
                })?;
            let mut names: Vec<String> = map
                .values()
                .filter_map(|f| f.as_str().map(str::to_owned))
                .collect();
            names.sort();
            names.dedup();
            for n in &names {
                if n.contains('/') || n.contains("..") {
                    return Err(ModelError::Checkpoint {
                        path: index_path.clone(),
                        reason: format!("shard name `{n}` must be a plain file name"),
                    });
                }
            }
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            let single = dir.join("model.safetensors");
            if !single.exists() {
                return Err(ModelError::Checkpoint {
                    path: dir.to_path_buf(),
                    reason: "neither model.safetensors nor model.safetensors.index.json exists"
                        .into(),
                });
            }
            vec![single]
        };

        let mut shards = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for (i, path) in files.into_iter().enumerate() {
            let file = File::open(&path).map_err(|e| ModelError::Io {
                path: path.clone(),
                source: e,
            })?;
            // SAFETY: the mapping is read-only; a checkpoint file changed underneath a
            // running server is outside what any loader can defend against.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::Io {
                path: path.clone(),
                source: e,
            })?;
            let (header_len, metadata) =
                SafeTensors::read_metadata(&mmap).map_err(|e| ModelError::Checkpoint {
                    path: path.clone(),
                    reason: format!("not a valid safetensors file (truncated or corrupt): {e:?}"),
                })?;
            let tensors: HashMap<String, TensorInfo> = metadata
                .tensors()
                .into_iter()
                .map(|(k, v)| (k, v.clone()))
                .collect();
            for name in tensors.keys() {
                index.insert(name.clone(), i);
            }
            shards.push(Arc::new(Shard {
                path,
                mmap,
                data_start: 8 + header_len,
                tensors,
            }));
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            shards,
            index,
            fp8_block,
        })
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the checkpoint has a tensor of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Total bytes of the named tensors as stored (for progress reporting).
    pub fn stored_bytes(&self, names: &[String]) -> u64 {
        names
            .iter()
            .filter_map(|n| {
                let s = &self.shards[*self.index.get(n)?];
                let t = s.tensors.get(n)?;
                Some((t.data_offsets.1 - t.data_offsets.0) as u64)
            })
            .sum()
    }

    fn raw(&self, name: &str) -> Result<(&Shard, &TensorInfo, &[u8]), ModelError> {
        let shard_i = *self
            .index
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_owned(),
                dir: self.dir.clone(),
            })?;
        let shard = &self.shards[shard_i];
        let info = shard
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_owned(),
                dir: self.dir.clone(),
            })?;
        let (a, b) = info.data_offsets;
        let bytes = shard
            .mmap
            .get(shard.data_start + a..shard.data_start + b)
            .ok_or_else(|| ModelError::Checkpoint {
                path: shard.path.clone(),
                reason: format!("tensor `{name}` points outside the file"),
            })?;
        Ok((shard, info, bytes))
    }

    /// Reads tensor `name`, checks it has exactly `shape`, and converts it to f32.
    /// FP8 weights are multiplied by their `<name>_scale_inv` block scales.
    pub fn tensor_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let (shard, info, bytes) = self.raw(name)?;
        if info.shape != shape {
            return Err(ModelError::Shape {
                name: name.to_owned(),
                path: shard.path.clone(),
                expected: shape.to_vec(),
                actual: info.shape.clone(),
            });
        }
        let n: usize = shape.iter().product();
        let dtype_err = || ModelError::Dtype {
            name: name.to_owned(),
            path: shard.path.clone(),
            dtype: format!("{:?}", info.dtype),
        };
        let out: Vec<f32> = match info.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F8_E4M3 => {
                let raw: Vec<f32> = bytes.iter().map(|b| fp8_e4m3_to_f32(*b)).collect();
                self.dequantise_fp8(name, shape, raw)?
            }
            _ => return Err(dtype_err()),
        };
        if out.len() != n {
            return Err(ModelError::Checkpoint {
                path: shard.path.clone(),
                reason: format!("tensor `{name}` holds {} values, expected {n}", out.len()),
            });
        }
        Ok(out)
    }

    fn dequantise_fp8(
        &self,
        name: &str,
        shape: &[usize],
        mut w: Vec<f32>,
    ) -> Result<Vec<f32>, ModelError> {
        let [rows, cols] = shape else {
            return Err(ModelError::Checkpoint {
                path: self.dir.clone(),
                reason: format!("FP8 tensor `{name}` must be 2-D, has shape {shape:?}"),
            });
        };
        let (br, bc) = self.fp8_block.ok_or_else(|| ModelError::Checkpoint {
            path: self.dir.join("config.json"),
            reason: format!(
                "tensor `{name}` is FP8 but config.json has no quantization_config.weight_block_size"
            ),
        })?;
        let scale_name = format!("{name}_scale_inv");
        let sr = rows.div_ceil(br);
        let sc = cols.div_ceil(bc);
        let scales = self.tensor_f32(&scale_name, &[sr, sc])?;
        for r in 0..*rows {
            let srow = &scales[(r / br) * sc..(r / br + 1) * sc];
            for (c, v) in w[r * cols..(r + 1) * cols].iter_mut().enumerate() {
                *v *= srow[c / bc];
            }
        }
        Ok(w)
    }
}

/// Decodes one FP8 e4m3 (the "fn" variant: no infinities, 0x7f/0xff are NaN) byte.
pub fn fp8_e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let exp = ((b >> 3) & 0x0f) as i32;
    let man = (b & 0x07) as f32;
    if exp == 0x0f && (b & 0x07) == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * man / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
    }
}

/// Encodes an f32 as FP8 e4m3fn, rounding to nearest and saturating at ±448.
pub fn f32_to_fp8_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign: u8 = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs().min(448.0);
    // Exhaustive nearest search over the 127 non-negative finite codes: simple and exact,
    // and only used when writing test checkpoints.
    let mut best = 0u8;
    let mut best_err = f32::INFINITY;
    for code in 0u8..0x7f {
        let err = (fp8_e4m3_to_f32(code) - a).abs();
        if err < best_err {
            best_err = err;
            best = code;
        }
    }
    sign | best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_codes_round_trip() {
        for code in 0u8..=255 {
            if code & 0x7f == 0x7f {
                assert!(fp8_e4m3_to_f32(code).is_nan());
                continue;
            }
            let v = fp8_e4m3_to_f32(code);
            let back = f32_to_fp8_e4m3(v);
            // ±0 both decode to 0.0; compare values, not codes.
            assert_eq!(fp8_e4m3_to_f32(back), v, "code {code:#x}");
        }
        assert_eq!(fp8_e4m3_to_f32(0x7e), 448.0);
        assert_eq!(fp8_e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(fp8_e4m3_to_f32(0x38), 1.0);
        assert_eq!(f32_to_fp8_e4m3(1e6), 0x7e);
    }
}
