//! Dense linear algebra on the CPU: the linear layer `y = x·Wᵀ (+ b)` with weights kept
//! row-major `[out, in]` as checkpoints store them, RMSNorm, SiLU and small dot products.
//!
//! Why our own kernel instead of a general GEMM: decoding multiplies a handful of rows
//! (`m` = tokens in the step) by large weights, so the cost is reading each weight once.
//! The kernel walks the weight rows in blocks (split across threads), keeps a block of
//! weight rows hot in L1 while every token row is multiplied against it, and accumulates
//! in 8-lane FMA registers. Every output element is computed by the same sequence of
//! operations whatever the tile shape or batch size, so a sequence gets bit-identical
//! numbers alone or batched with others.
//!
//! Weights may be stored as f32 or bf16 (converted in registers while loading: half the
//! bytes to read, which is what batch-1 decoding is bound by), or as int8 blocks with a
//! scale per 32 weights ([`q8`]: activations are quantised per row at the start of the
//! product, int8 × int8 dot products in i32; the same batch invariance holds).

#[cfg(test)]
mod kernel_tests;
mod q8;
#[cfg(target_arch = "x86_64")]
mod q8_x86;
#[cfg(target_arch = "x86_64")]
mod simd;
#[cfg(target_arch = "x86_64")]
mod simd512;

use rayon::prelude::*;

/// Storage precision of a weight matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    Bf16,
    /// Int8 blocks of 32 with a bf16 scale each (≈ 1.06 bytes per weight).
    Int8,
}

impl std::str::FromStr for WeightDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(WeightDtype::F32),
            "bf16" => Ok(WeightDtype::Bf16),
            "int8" => Ok(WeightDtype::Int8),
            other => Err(format!(
                "unknown dtype `{other}` (expected f32, bf16 or int8)"
            )),
        }
    }
}

impl WeightDtype {
    /// The name `--dtype` takes (`f32`, `bf16`, `int8`).
    pub fn as_str(self) -> &'static str {
        match self {
            WeightDtype::F32 => "f32",
            WeightDtype::Bf16 => "bf16",
            WeightDtype::Int8 => "int8",
        }
    }

    /// Bytes of a `[rows, cols]` weight matrix stored in this precision (int8: rows
    /// padded to whole block pairs, one bf16 scale per 32 weights).
    pub fn matrix_bytes(self, rows: usize, cols: usize) -> usize {
        match self {
            WeightDtype::F32 => rows * cols * 4,
            WeightDtype::Bf16 => rows * cols * 2,
            WeightDtype::Int8 => {
                let kp = cols.div_ceil(q8::PAD).max(1) * q8::PAD;
                rows * (kp + kp / q8::BLOCK * 2)
            }
        }
    }
}

impl std::fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

enum Weights {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
    Int8(q8::Q8Matrix),
}

/// A linear layer `[in] → [out]`.
pub struct Linear {
    out_dim: usize,
    in_dim: usize,
    w: Weights,
    bias: Option<Vec<f32>>,
}

/// Work (multiply-adds) below which a product runs on the calling thread: splitting
/// costs more than it saves.
const PARALLEL_MIN_WORK: usize = 1 << 17;

/// Token blocks up to this size (decoding, and experts' few rows) are read by every
/// x86 kernel a weight row at a time: one sequential stream per thread instead of 4
/// rows interleaved. On Zen 4, `scripts/probes/weight_stream.c` read f32 rows at
/// 18–27 GB/s per thread that way against 15–21 interleaved, and bf16 batch-1 decode
/// went from ~85 to ~120 tokens/s (docs/benchmarks.md). Same bits: each element is
/// still one accumulator over k in order, so the order is free to choose per block.
#[cfg(target_arch = "x86_64")]
const STREAM_TOKENS: usize = 4;

impl Linear {
    /// `w` is `[out_dim, in_dim]` row-major.
    pub fn new(
        w: Vec<f32>,
        out_dim: usize,
        in_dim: usize,
        bias: Option<Vec<f32>>,
        dtype: WeightDtype,
    ) -> Linear {
        debug_assert_eq!(w.len(), out_dim * in_dim);
        if dtype == WeightDtype::F32 {
            return Linear {
                out_dim,
                in_dim,
                w: Weights::F32(w),
                bias,
            };
        }
        let mut b = LinearBuilder::new(out_dim, in_dim, dtype);
        for row in w.chunks_exact(in_dim.max(1)) {
            b.push_row(row);
        }
        b.finish(bias)
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    /// Bytes the weights occupy in memory.
    pub fn weight_bytes(&self) -> usize {
        match &self.w {
            Weights::F32(v) => v.len() * 4,
            Weights::Bf16(v) => v.len() * 2,
            Weights::Int8(q) => q.bytes(),
        }
    }

    /// Row `r` of the weight matrix as f32 (used for embedding lookups and MLA's absorbed
    /// projections).
    pub fn row(&self, r: usize, out: &mut [f32]) {
        let k = self.in_dim;
        match &self.w {
            Weights::F32(v) => out.copy_from_slice(&v[r * k..(r + 1) * k]),
            Weights::Bf16(v) => {
                for (o, b) in out.iter_mut().zip(&v[r * k..(r + 1) * k]) {
                    *o = bf16_to_f32(*b);
                }
            }
            Weights::Int8(q) => q.dequantise_row(r, out),
        }
    }

    /// `x` is `[m, in]`; returns `[m, out]`.
    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.in_dim, "linear input size");
        let n = self.out_dim;
        if m == 0 || n == 0 {
            return Vec::new();
        }
        let mut y = vec![0f32; m * n];
        let prepared = self.prepare(x, m);
        let xq = &prepared;
        let threads = rayon::current_num_threads().max(1);
        let out = OutPtr(y.as_mut_ptr());
        if n * self.in_dim * m < PARALLEL_MIN_WORK || threads == 1 {
            // SAFETY: `y` holds m × n floats; rows 0..n of every token are in bounds.
            unsafe { self.rows_into(0..n, x, xq, m, out) };
        } else {
            // Several blocks per thread so that an uneven split still balances.
            let block = (n.div_ceil(threads * 4)).div_ceil(4) * 4;
            (0..n.div_ceil(block)).into_par_iter().for_each(|i| {
                let rows = i * block..((i + 1) * block).min(n);
                // SAFETY: blocks are disjoint row ranges, so no two tasks write the same
                // element; all indices are inside `y`, which outlives the loop.
                unsafe { self.rows_into(rows, x, xq, m, out) };
            });
        }
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(n) {
                for (v, bb) in row.iter_mut().zip(b) {
                    *v += bb;
                }
            }
        }
        y
    }

    /// `x` in the form this layer's kernel reads, once per product.
    fn prepare(&self, x: &[f32], m: usize) -> Prepared {
        match &self.w {
            Weights::Int8(q) => Prepared::Q8(q8::quantise_rows(x, m, self.in_dim, q.kp)),
            _ => Prepared::AsIs,
        }
    }

    /// # Safety
    /// `out` points at an `[m, out_dim]` buffer; no other thread writes `rows`. `xq` is
    /// `x` prepared by [`Linear::prepare`].
    unsafe fn rows_into(
        &self,
        rows: std::ops::Range<usize>,
        x: &[f32],
        xq: &Prepared,
        m: usize,
        out: OutPtr,
    ) {
        let k = self.in_dim;
        let n = self.out_dim;
        let base = out.0.add(rows.start);
        match &self.w {
            Weights::F32(w) => {
                let w = &w[rows.start * k..rows.end * k];
                #[cfg(target_arch = "x86_64")]
                if simd::available() {
                    simd::rows_f32(w, x, k, m, base, n);
                    return;
                }
                portable::rows(w, x, k, m, base, n, |v: &f32| *v);
            }
            Weights::Bf16(w) => {
                let w = &w[rows.start * k..rows.end * k];
                #[cfg(target_arch = "x86_64")]
                match *X86_KERNEL {
                    X86Kernel::Avx512 => return simd512::rows_bf16(w, x, k, m, base, n),
                    X86Kernel::Avx2 => return simd::rows_bf16(w, x, k, m, base, n),
                    X86Kernel::None => {}
                }
                portable::rows(w, x, k, m, base, n, |v: &u16| bf16_to_f32(*v));
            }
            Weights::Int8(q) => {
                let Prepared::Q8(xq) = xq else {
                    unreachable!("prepare quantises x for int8 weights")
                };
                q8::rows_into(*Q8_KERNEL, q, rows, xq, base, n);
            }
        }
    }
}

/// A product's input as its kernel reads it.
enum Prepared {
    AsIs,
    /// Quantised rows, for int8 weights.
    Q8(q8::Q8Rows),
}

/// The bf16 kernel for this CPU, chosen once (`MOE_CPU_KERNEL=avx2` forces the AVX2 one,
/// and the AVX2 int8 kernel, on an AVX-512 machine, for comparisons). f32 always takes
/// the AVX2 kernel: an AVX-512 one measured no faster at batch 1 on Zen 4 (52 against 59
/// tokens/s) and ~10% faster at batch 32, and choosing by batch size would break the
/// same-bits-alone-or-batched rule.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
enum X86Kernel {
    Avx512,
    Avx2,
    None,
}

#[cfg(target_arch = "x86_64")]
static X86_KERNEL: std::sync::LazyLock<X86Kernel> = std::sync::LazyLock::new(|| {
    let avx2_only = std::env::var("MOE_CPU_KERNEL").is_ok_and(|v| v == "avx2");
    if simd512::available() && !avx2_only {
        X86Kernel::Avx512
    } else if simd::available() {
        X86Kernel::Avx2
    } else {
        X86Kernel::None
    }
});

/// The int8 kernel for this CPU, chosen once.
static Q8_KERNEL: std::sync::LazyLock<q8::Kernel> = std::sync::LazyLock::new(q8::Kernel::best);

/// Builds a [`Linear`] one weight row at a time, so that a checkpoint tensor can be
/// converted to its storage type without a whole f32 copy of it.
pub struct LinearBuilder {
    out_dim: usize,
    in_dim: usize,
    w: Weights,
}

impl LinearBuilder {
    pub fn new(out_dim: usize, in_dim: usize, dtype: WeightDtype) -> LinearBuilder {
        let w = match dtype {
            WeightDtype::F32 => Weights::F32(Vec::with_capacity(out_dim * in_dim)),
            WeightDtype::Bf16 => Weights::Bf16(Vec::with_capacity(out_dim * in_dim)),
            WeightDtype::Int8 => Weights::Int8(q8::Q8Matrix::with_capacity(out_dim, in_dim)),
        };
        LinearBuilder { out_dim, in_dim, w }
    }

    /// Appends the next weight row (`in_dim` values).
    pub fn push_row(&mut self, row: &[f32]) {
        debug_assert_eq!(row.len(), self.in_dim);
        match &mut self.w {
            Weights::F32(v) => v.extend_from_slice(row),
            Weights::Bf16(v) => v.extend(row.iter().map(|x| half::bf16::from_f32(*x).to_bits())),
            Weights::Int8(q) => q.push_row(row),
        }
    }

    /// The layer, once all `out_dim` rows are in.
    pub fn finish(self, bias: Option<Vec<f32>>) -> Linear {
        let rows = match &self.w {
            Weights::F32(v) => v.len() / self.in_dim.max(1),
            Weights::Bf16(v) => v.len() / self.in_dim.max(1),
            Weights::Int8(q) => q.rows(),
        };
        debug_assert_eq!(rows, self.out_dim, "rows pushed");
        Linear {
            out_dim: self.out_dim,
            in_dim: self.in_dim,
            w: self.w,
            bias,
        }
    }
}

/// The output buffer shared by the threads of one product; each writes its own rows.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: only used for disjoint writes within `Linear::forward`, which waits for all
// writers before the buffer is read.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

#[inline]
fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// The fallback kernel: 8 independent accumulators per output (vectorisable by the
/// compiler), the same lane structure as the SIMD kernel.
mod portable {
    /// # Safety
    /// `out` must be valid for writes at `t * ldo + r` for every t < m and row r of `w`.
    pub(super) unsafe fn rows<W>(
        w: &[W],
        x: &[f32],
        k: usize,
        m: usize,
        out: *mut f32,
        ldo: usize,
        conv: impl Fn(&W) -> f32,
    ) {
        let kk = k / 8 * 8;
        for (r, wrow) in w.chunks_exact(k).enumerate() {
            for t in 0..m {
                let xrow = &x[t * k..(t + 1) * k];
                let mut acc = [0f32; 8];
                for (wc, xc) in wrow[..kk].chunks_exact(8).zip(xrow[..kk].chunks_exact(8)) {
                    for l in 0..8 {
                        acc[l] += conv(&wc[l]) * xc[l];
                    }
                }
                let mut s = super::hsum8(&acc);
                for i in kk..k {
                    s += conv(&wrow[i]) * xrow[i];
                }
                *out.add(t * ldo + r) = s;
            }
        }
    }
}

/// Sums 8 lanes in a fixed order (pairwise), shared by both kernels' final step.
#[inline]
fn hsum8(a: &[f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

/// RMSNorm of each `dim`-wide row of `x`, in place: `x / rms(x) * w`.
pub fn rms_norm_rows(x: &mut [f32], w: &[f32], eps: f32) {
    let dim = w.len();
    for row in x.chunks_exact_mut(dim) {
        let ss: f32 = row.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        for (v, g) in row.iter_mut().zip(w) {
            *v = *v * inv * g;
        }
    }
}

/// `x · sigmoid(x)`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `1 / (1 + e^-x)`.
#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Dot product with 8 independent partial sums (vectorises well; used by attention).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let nn = n / 8 * 8;
    let mut acc = [0f32; 8];
    for (ac, bc) in a[..nn].chunks_exact(8).zip(b[..nn].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += ac[l] * bc[l];
        }
    }
    let mut s = hsum8(&acc);
    for i in nn..n {
        s += a[i] * b[i];
    }
    s
}

/// `y += a · x`.
#[inline]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (yy, xx) in y.iter_mut().zip(x) {
        *yy += a * xx;
    }
}

/// Numerically stable softmax in place.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn naive(w: &[f32], x: &[f32], n: usize, k: usize, m: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for t in 0..m {
            for r in 0..n {
                let mut s = 0f64;
                for i in 0..k {
                    s += w[r * k + i] as f64 * x[t * k + i] as f64;
                }
                y[t * n + r] = s as f32;
            }
        }
        y
    }

    pub(super) fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn linear_matches_naive_for_odd_shapes() {
        for &(n, k, m) in &[
            (1, 1, 1),
            (5, 13, 3),
            (37, 64, 7),
            (300, 1030, 5),
            (1024, 512, 1),
        ] {
            let w = data(n * k, 1);
            let x = data(m * k, 2);
            let lin = Linear::new(w.clone(), n, k, None, WeightDtype::F32);
            let got = lin.forward(&x, m);
            let want = naive(&w, &x, n, k, m);
            for (g, e) in got.iter().zip(&want) {
                assert!(
                    (g - e).abs() <= 1e-3 * (1.0 + e.abs()),
                    "{n}x{k}x{m}: {g} vs {e}"
                );
            }
        }
    }

    #[test]
    fn each_row_is_bit_identical_alone_or_batched() {
        let (n, k, m) = (200, 333, 9);
        let lin = Linear::new(data(n * k, 3), n, k, Some(data(n, 4)), WeightDtype::F32);
        let x = data(m * k, 5);
        let all = lin.forward(&x, m);
        for t in 0..m {
            let one = lin.forward(&x[t * k..(t + 1) * k], 1);
            assert_eq!(&all[t * n..(t + 1) * n], &one[..], "row {t}");
        }
    }

    #[test]
    fn bf16_weights_are_close_to_f32() {
        let (n, k, m) = (64, 256, 3);
        let w = data(n * k, 6);
        let x = data(m * k, 7);
        let a = Linear::new(w.clone(), n, k, None, WeightDtype::F32).forward(&x, m);
        let b = Linear::new(w, n, k, None, WeightDtype::Bf16).forward(&x, m);
        let num: f32 = a.iter().zip(&b).map(|(p, q)| (p - q) * (p - q)).sum();
        let den: f32 = a.iter().map(|p| p * p).sum();
        assert!((num / den).sqrt() < 1e-2);
        assert_ne!(a, b, "bf16 rounding must actually happen");
    }

    #[test]
    fn int8_rows_are_bit_identical_alone_or_in_a_batch_of_8() {
        let (n, k, m) = (700, 520, 8);
        let lin = Linear::new(data(n * k, 8), n, k, Some(data(n, 9)), WeightDtype::Int8);
        let x = data(m * k, 10);
        let all = lin.forward(&x, m);
        for t in 0..m {
            let one = lin.forward(&x[t * k..(t + 1) * k], 1);
            let same = all[t * n..(t + 1) * n]
                .iter()
                .zip(&one)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "row {t}");
        }
        let f = Linear::new(data(n * k, 8), n, k, Some(data(n, 9)), WeightDtype::F32);
        let want = f.forward(&x, m);
        let num: f32 = want.iter().zip(&all).map(|(p, q)| (p - q) * (p - q)).sum();
        let den: f32 = want.iter().map(|p| p * p).sum();
        assert!(
            (num / den).sqrt() < 2e-2,
            "int8 vs f32: {}",
            (num / den).sqrt()
        );
        assert!(lin.weight_bytes() * 3 < f.weight_bytes());
        let mut row = vec![0f32; k];
        lin.row(3, &mut row);
        assert!(row
            .iter()
            .zip(&data(n * k, 8)[3 * k..])
            .all(|(a, b)| (a - b).abs() < 1e-2));
    }

    #[test]
    fn rms_norm_normalises() {
        let mut x = vec![3.0, 4.0];
        rms_norm_rows(&mut x, &[1.0, 2.0], 0.0);
        let rms = (12.5f32).sqrt();
        assert!((x[0] - 3.0 / rms).abs() < 1e-6 && (x[1] - 8.0 / rms).abs() < 1e-6);
    }
}
