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
//! bytes to read, which is what batch-1 decoding is bound by).

use rayon::prelude::*;

/// Storage precision of a weight matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    Bf16,
}

impl std::str::FromStr for WeightDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(WeightDtype::F32),
            "bf16" => Ok(WeightDtype::Bf16),
            other => Err(format!("unknown dtype `{other}` (expected f32 or bf16)")),
        }
    }
}

enum Weights {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
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
        let w = match dtype {
            WeightDtype::F32 => Weights::F32(w),
            WeightDtype::Bf16 => Weights::Bf16(
                w.iter()
                    .map(|v| half::bf16::from_f32(*v).to_bits())
                    .collect(),
            ),
        };
        Linear {
            out_dim,
            in_dim,
            w,
            bias,
        }
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
        }
    }

    /// `x` is `[m, in]`; returns `[m, out]`.
    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        debug_assert_eq!(x.len(), m * self.in_dim);
        let (n, k) = (self.out_dim, self.in_dim);
        if m == 0 || n == 0 {
            return Vec::new();
        }
        // Computed as [out, m] so each thread owns a contiguous block of output rows.
        let mut yt = vec![0f32; n * m];
        let threads = rayon::current_num_threads().max(1);
        if n * k * m < PARALLEL_MIN_WORK || threads == 1 {
            self.rows_into(0..n, x, m, &mut yt);
        } else {
            // Several blocks per thread so that an uneven split still balances.
            let block = (n.div_ceil(threads * 4)).div_ceil(4) * 4;
            yt.par_chunks_mut(block * m)
                .enumerate()
                .for_each(|(i, chunk)| {
                    let start = i * block;
                    let end = (start + block).min(n);
                    self.rows_into(start..end, x, m, chunk);
                });
        }
        let mut y = if m == 1 {
            yt
        } else {
            let mut y = vec![0f32; m * n];
            for (r, row) in yt.chunks_exact(m).enumerate() {
                for (t, v) in row.iter().enumerate() {
                    y[t * n + r] = *v;
                }
            }
            y
        };
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(n) {
                for (v, bb) in row.iter_mut().zip(b) {
                    *v += bb;
                }
            }
        }
        y
    }

    fn rows_into(&self, rows: std::ops::Range<usize>, x: &[f32], m: usize, out: &mut [f32]) {
        let k = self.in_dim;
        match &self.w {
            Weights::F32(w) => {
                let w = &w[rows.start * k..rows.end * k];
                #[cfg(target_arch = "x86_64")]
                if simd::available() {
                    // SAFETY: the CPU supports AVX2 and FMA (checked above); slice bounds
                    // are checked inside.
                    unsafe { simd::rows_f32(w, x, k, m, out) };
                    return;
                }
                portable::rows(w, x, k, m, out, |v: &f32| *v);
            }
            Weights::Bf16(w) => {
                let w = &w[rows.start * k..rows.end * k];
                #[cfg(target_arch = "x86_64")]
                if simd::available() {
                    // SAFETY: as above.
                    unsafe { simd::rows_bf16(w, x, k, m, out) };
                    return;
                }
                portable::rows(w, x, k, m, out, |v: &u16| bf16_to_f32(*v));
            }
        }
    }
}

#[inline]
fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// The fallback kernel: 8 independent accumulators per output (vectorisable by the
/// compiler), the same lane structure as the SIMD kernel.
mod portable {
    pub(super) fn rows<W>(
        w: &[W],
        x: &[f32],
        k: usize,
        m: usize,
        out: &mut [f32],
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
                out[r * m + t] = s;
            }
        }
    }
}

/// Sums 8 lanes in a fixed order (pairwise), shared by both kernels' final step.
#[inline]
fn hsum8(a: &[f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    pub(super) fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn load_f32(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn load_bf16(p: *const u16) -> __m256 {
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn finish(acc: __m256) -> f32 {
        let mut a = [0f32; 8];
        _mm256_storeu_ps(a.as_mut_ptr(), acc);
        super::hsum8(&a)
    }

    macro_rules! kernel {
        ($name:ident, $tile:ident, $wty:ty, $load:ident, $conv:expr) => {
            /// One tile: R weight rows × T token rows, 8 lanes each.
            #[target_feature(enable = "avx2,fma")]
            #[inline]
            unsafe fn $tile<const R: usize, const T: usize>(
                w: &[$wty],
                x: &[f32],
                k: usize,
                r0: usize,
                t0: usize,
                m: usize,
                out: &mut [f32],
            ) {
                let kk = k / 8 * 8;
                let mut acc = [[_mm256_setzero_ps(); T]; R];
                let wp = w.as_ptr().add(r0 * k);
                let xp = x.as_ptr().add(t0 * k);
                let mut i = 0;
                while i < kk {
                    let mut wv = [_mm256_setzero_ps(); R];
                    for r in 0..R {
                        wv[r] = $load(wp.add(r * k + i));
                    }
                    for t in 0..T {
                        let xv = _mm256_loadu_ps(xp.add(t * k + i));
                        for r in 0..R {
                            acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
                        }
                    }
                    i += 8;
                }
                for r in 0..R {
                    for t in 0..T {
                        let mut s = finish(acc[r][t]);
                        let wrow = &w[(r0 + r) * k..(r0 + r + 1) * k];
                        let xrow = &x[(t0 + t) * k..(t0 + t + 1) * k];
                        for j in kk..k {
                            s += $conv(&wrow[j]) * xrow[j];
                        }
                        out[(r0 + r) * m + t0 + t] = s;
                    }
                }
            }

            /// All of `w`'s rows against all `m` token rows of `x`; `out` is `[rows, m]`.
            #[target_feature(enable = "avx2,fma")]
            pub(super) unsafe fn $name(w: &[$wty], x: &[f32], k: usize, m: usize, out: &mut [f32]) {
                let n = w.len() / k;
                assert!(x.len() >= m * k && out.len() >= n * m);
                let mut r = 0;
                while r + 4 <= n {
                    let mut t = 0;
                    while t + 2 <= m {
                        $tile::<4, 2>(w, x, k, r, t, m, out);
                        t += 2;
                    }
                    if t < m {
                        $tile::<4, 1>(w, x, k, r, t, m, out);
                    }
                    r += 4;
                }
                while r < n {
                    let mut t = 0;
                    while t + 2 <= m {
                        $tile::<1, 2>(w, x, k, r, t, m, out);
                        t += 2;
                    }
                    if t < m {
                        $tile::<1, 1>(w, x, k, r, t, m, out);
                    }
                    r += 1;
                }
            }
        };
    }

    kernel!(rows_f32, tile_f32, f32, load_f32, |v: &f32| *v);
    kernel!(rows_bf16, tile_bf16, u16, load_bf16, |v: &u16| {
        super::bf16_to_f32(*v)
    });
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

    fn naive(w: &[f32], x: &[f32], n: usize, k: usize, m: usize) -> Vec<f32> {
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

    fn data(len: usize, seed: u32) -> Vec<f32> {
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
    fn rms_norm_normalises() {
        let mut x = vec![3.0, 4.0];
        rms_norm_rows(&mut x, &[1.0, 2.0], 0.0);
        let rms = (12.5f32).sqrt();
        assert!((x[0] - 3.0 / rms).abs() < 1e-6 && (x[1] - 8.0 / rms).abs() < 1e-6);
    }
}
