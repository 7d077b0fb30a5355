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
    bytes: ShardBytes,
    /// Bytes before the data section (8-byte length + JSON header).
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
}

/// The shard list of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Largest `model.safetensors.index.json` read (a 671B-parameter model's is ~9 MB).
pub const MAX_INDEX_BYTES: u64 = 64 << 20;

/// A shard's bytes: memory-mapped from its file, or held in memory.
enum ShardBytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for ShardBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            ShardBytes::Mapped(m) => m,
            ShardBytes::Owned(v) => v,
        }
    }
}

impl Shard {
    /// Reads the header of a safetensors file: its length (capped by `safetensors` at
    /// 100 MB), the JSON, and every tensor's offsets checked against the data section.
    fn parse(path: PathBuf, bytes: ShardBytes) -> Result<Shard, ModelError> {
        let (header_len, metadata) =
            SafeTensors::read_metadata(&bytes).map_err(|e| ModelError::Checkpoint {
                path: path.clone(),
                reason: format!("not a valid safetensors file (truncated or corrupt): {e:?}"),
            })?;
        let tensors: HashMap<String, TensorInfo> = metadata
            .tensors()
            .into_iter()
            .map(|(k, v)| (k, v.clone()))
            .collect();
        Ok(Shard {
            path,
            bytes,
            data_start: 8 + header_len,
            tensors,
        })
    }
}

/// The shard file names of `model.safetensors.index.json` (its `weight_map` values),
/// sorted and deduplicated; each must be a plain file name in the checkpoint folder.
pub fn shard_names(index_path: &Path, text: &str) -> Result<Vec<String>, ModelError> {
    let bad = |reason: String| ModelError::Checkpoint {
        path: index_path.to_path_buf(),
        reason,
    };
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut names = Vec::with_capacity(map.len());
    for (tensor, file) in map {
        let Some(file) = file.as_str() else {
            return Err(bad(format!("`weight_map.{tensor}` is not a file name")));
        };
        names.push(file.to_owned());
    }
    names.sort();
    names.dedup();
    for n in &names {
        // One normal path component, spelled exactly: not "", ".", "a/b", "/x" or "..".
        // ("." passed a check for '/' and "..": found by fuzzing.)
        let one = match Path::new(n).components().collect::<Vec<_>>()[..] {
            [std::path::Component::Normal(c)] => c == std::ffi::OsStr::new(n),
            _ => false,
        };
        if !one || n.contains('\\') || n.contains("..") {
            return Err(bad(format!("shard name `{n}` must be a plain file name")));
        }
    }
    Ok(names)
}

/// Reads a text file of at most `max` bytes (a larger one is an error, not a huge read).
pub(crate) fn read_capped(path: &Path, max: u64) -> Result<String, ModelError> {
    use std::io::Read;
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let mut text = String::new();
    file.take(max + 1).read_to_string(&mut text).map_err(io)?;
    if text.len() as u64 > max {
        return Err(ModelError::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("larger than {max} bytes: not a checkpoint file"),
        });
    }
    Ok(text)
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
        let index_path = dir.join(INDEX_FILE);
        let files: Vec<PathBuf> = if index_path.exists() {
            let text = read_capped(&index_path, MAX_INDEX_BYTES)?;
            shard_names(&index_path, &text)?
                .into_iter()
                .map(|n| dir.join(n))
                .collect()
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
        for path in files {
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
            shards.push(Shard::parse(path, ShardBytes::Mapped(mmap))?);
        }
        Ok(Checkpoint::from_shards(dir, shards, fp8_block))
    }

    /// A checkpoint whose shards are held in memory (`(file name, bytes)`), read exactly
    /// as [`Checkpoint::open`] reads files: for tests and fuzzing of hostile headers.
    #[doc(hidden)]
    pub fn from_memory(
        shards: Vec<(String, Vec<u8>)>,
        fp8_block: Option<(usize, usize)>,
    ) -> Result<Checkpoint, ModelError> {
        let shards = shards
            .into_iter()
            .map(|(name, bytes)| Shard::parse(PathBuf::from(name), ShardBytes::Owned(bytes)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Checkpoint::from_shards(Path::new(""), shards, fp8_block))
    }

    fn from_shards(dir: &Path, shards: Vec<Shard>, fp8_block: Option<(usize, usize)>) -> Self {
        let mut index = HashMap::new();
        for (i, shard) in shards.iter().enumerate() {
            for name in shard.tensors.keys() {
                index.insert(name.clone(), i);
            }
        }
        Checkpoint {
            dir: dir.to_path_buf(),
            shards: shards.into_iter().map(Arc::new).collect(),
            index,
            fp8_block,
        }
    }

    /// Every tensor's name and stored shape, sorted by name.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut all: Vec<(String, Vec<usize>)> = self
            .shards
            .iter()
            .flat_map(|s| s.tensors.iter().map(|(n, t)| (n.clone(), t.shape.clone())))
            .collect();
        all.sort();
        all
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
            .bytes
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
        self.read_f32(name, shape, true)
    }

    /// [`Self::tensor_f32`]; `fp8`: whether the tensor may be FP8 (block scales may not:
    /// an FP8 scale would need scales of its own, a chain a hostile header could make
    /// as deep as it likes).
    fn read_f32(&self, name: &str, shape: &[usize], fp8: bool) -> Result<Vec<f32>, ModelError> {
        let (info, bytes) = self.checked(name, shape, fp8)?;
        if info.dtype == Dtype::F8_E4M3 {
            let [rows, cols] = *shape else {
                return Err(self.not_2d(name, shape));
            };
            let mut out = Vec::with_capacity(rows * cols);
            self.for_each_row(name, [rows, cols], |row| out.extend_from_slice(row))?;
            return Ok(out);
        }
        let mut out = vec![0f32; bytes.len() / elem_bytes(info.dtype)];
        decode(info.dtype, bytes, &mut out);
        Ok(out)
    }

    /// Reads the 2-D tensor `name`, checks it has exactly `shape`, and hands it to `f` one
    /// row at a time, converted to f32 (FP8 rows multiplied by their block scales). Only
    /// one row of f32 exists at a time, so a caller that stores rows in bf16 or int8
    /// never holds an f32 copy of the tensor.
    pub fn for_each_row(
        &self,
        name: &str,
        shape: [usize; 2],
        mut f: impl FnMut(&[f32]),
    ) -> Result<(), ModelError> {
        let (info, bytes) = self.checked(name, &shape, true)?;
        let [rows, cols] = shape;
        let elem = elem_bytes(info.dtype);
        let scales = if info.dtype == Dtype::F8_E4M3 {
            Some(self.fp8_scales(name, rows, cols)?)
        } else {
            None
        };
        let mut row = vec![0f32; cols];
        for r in 0..rows {
            decode(
                info.dtype,
                &bytes[r * cols * elem..(r + 1) * cols * elem],
                &mut row,
            );
            if let Some((br, bc, sc, scales)) = &scales {
                let srow = &scales[(r / br) * sc..(r / br + 1) * sc];
                for (c, v) in row.iter_mut().enumerate() {
                    *v *= srow[c / bc];
                }
            }
            f(&row);
        }
        Ok(())
    }

    /// The tensor's header entry and bytes, after checking its shape, its dtype (FP8
    /// only where `fp8`) and that its bytes hold exactly that many values.
    fn checked(
        &self,
        name: &str,
        shape: &[usize],
        fp8: bool,
    ) -> Result<(&TensorInfo, &[u8]), ModelError> {
        let (shard, info, bytes) = self.raw(name)?;
        if info.shape != shape {
            return Err(ModelError::Shape {
                name: name.to_owned(),
                path: shard.path.clone(),
                expected: shape.to_vec(),
                actual: info.shape.clone(),
            });
        }
        let supported = match info.dtype {
            Dtype::F32 | Dtype::BF16 | Dtype::F16 => true,
            Dtype::F8_E4M3 => fp8,
            _ => false,
        };
        if !supported {
            return Err(ModelError::Dtype {
                name: name.to_owned(),
                path: shard.path.clone(),
                dtype: format!("{:?}", info.dtype),
            });
        }
        let elem = elem_bytes(info.dtype);
        // The header was checked against the data, but the values are counted here too,
        // before any indexing by shape.
        let n = shape.iter().try_fold(1usize, |a, d| a.checked_mul(*d));
        if n.and_then(|n| n.checked_mul(elem)) != Some(bytes.len()) {
            return Err(ModelError::Checkpoint {
                path: shard.path.clone(),
                reason: format!(
                    "tensor `{name}` holds {} bytes, not {shape:?} values of {elem} bytes",
                    bytes.len()
                ),
            });
        }
        Ok((info, bytes))
    }

    fn not_2d(&self, name: &str, shape: &[usize]) -> ModelError {
        ModelError::Checkpoint {
            path: self.dir.clone(),
            reason: format!("FP8 tensor `{name}` must be 2-D, has shape {shape:?}"),
        }
    }

    /// An FP8 tensor's block size and its `<name>_scale_inv` block scales:
    /// `(block rows, block cols, scale columns, scales)`.
    fn fp8_scales(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<(usize, usize, usize, Vec<f32>), ModelError> {
        let (br, bc) = self.fp8_block.ok_or_else(|| ModelError::Checkpoint {
            path: self.dir.join("config.json"),
            reason: format!(
                "tensor `{name}` is FP8 but config.json has no quantization_config.weight_block_size"
            ),
        })?;
        if br == 0 || bc == 0 {
            return Err(ModelError::Checkpoint {
                path: self.dir.join("config.json"),
                reason: format!("FP8 block size {br}×{bc} must be positive"),
            });
        }
        let scale_name = format!("{name}_scale_inv");
        let sr = rows.div_ceil(br);
        let sc = cols.div_ceil(bc);
        let scales = self.read_f32(&scale_name, &[sr, sc], false)?;
        Ok((br, bc, sc, scales))
    }
}

/// Bytes of one stored value of a dtype [`Checkpoint::checked`] accepts.
fn elem_bytes(dtype: Dtype) -> usize {
    match dtype {
        Dtype::F32 => 4,
        Dtype::BF16 | Dtype::F16 => 2,
        _ => 1,
    }
}

/// Converts stored values (`out.len()` of them) to f32; FP8 without its block scales.
fn decode(dtype: Dtype, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        Dtype::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Dtype::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        Dtype::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        _ => {
            for (o, b) in out.iter_mut().zip(bytes) {
                *o = fp8_e4m3_to_f32(*b);
            }
        }
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

    /// Found by the `checkpoint_index` fuzz target: a shard named "." joined to the
    /// checkpoint folder is the folder itself.
    #[test]
    fn shard_names_must_be_plain_file_names() {
        let path = Path::new("model.safetensors.index.json");
        let regression =
            include_str!("../../fuzz/regressions/checkpoint_index/invalid-shard-named-dot.json");
        let e = shard_names(path, regression).unwrap_err();
        assert!(
            e.to_string()
                .contains("shard name `.` must be a plain file name"),
            "{e}"
        );
        for bad in ["", ".", "..", "a/b", "/etc/passwd", "a\\b", "x/.", "./x"] {
            let text = serde_json::json!({"weight_map": {"t": bad}}).to_string();
            assert!(shard_names(path, &text).is_err(), "{bad:?} accepted");
        }
        let text = r#"{"weight_map": {"a": "m-2.safetensors", "b": "m-1.safetensors", "c": "m-2.safetensors"}}"#;
        assert_eq!(
            shard_names(path, text).unwrap(),
            ["m-1.safetensors", "m-2.safetensors"]
        );
        let text = r#"{"weight_map": {"a": 3}}"#;
        assert!(shard_names(path, text)
            .unwrap_err()
            .to_string()
            .contains("weight_map.a"));
    }

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
