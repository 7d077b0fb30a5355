//! Int8 block-quantised weights and the int8 × int8 product.
//!
//! Format: each weight row is split along the input dimension into blocks of 32 int8
//! values with one scale per block, `w ≈ scale · q`, `q ∈ [-127, 127]`. The scale is
//! stored as **bf16**: two bytes like Q8_0's f16 (34 bytes per 32 weights, the figure
//! that bounds batch-1 decoding), but with f32's exponent range, so blocks of very small
//! weights keep a normal scale instead of an f16 subnormal one. The scale is rounded *up*
//! to a bf16 value before the weights are quantised against it, so |q| never exceeds 127
//! and every weight is within scale/2 of its dequantised value. Rows are padded with
//! zero blocks to a multiple of 64 inputs (one 512-bit register holds a block pair).
//!
//! Activations are quantised per row to the same layout at the start of each product
//! (f32 scale per block; the row's own values only, so a row quantises the same alone or
//! batched). A block's dot product is exact in i32; the float part is fixed by
//! [`canonical`]: lane group `g` (4 consecutive products) of block `b` adds
//! `fma(i32 sum as f32, w_scale · x_scale, acc[(b % 2) · 8 + g % 8])`, and the 16 lanes
//! are summed in one fixed order. The portable, AVX2 and AVX-512 VNNI kernels all do
//! exactly that, so they give the same bits.

pub(crate) const BLOCK: usize = 32;
/// Input dims are padded to a multiple of this: a block pair.
pub(crate) const PAD: usize = 64;

/// A quantised `[rows, cols]` matrix.
pub(crate) struct Q8Matrix {
    pub(crate) cols: usize,
    /// Padded row length (multiple of [`PAD`]).
    pub(crate) kp: usize,
    pub(crate) qs: Vec<i8>,
    /// bf16 bits, `kp / BLOCK` per row.
    pub(crate) scales: Vec<u16>,
}

/// The smallest bf16 value ≥ `x` (x finite and ≥ 0), as bits.
fn bf16_round_up(x: f32) -> u16 {
    let bits = x.to_bits();
    let hi = (bits >> 16) as u16;
    if bits & 0xffff == 0 {
        hi
    } else {
        hi + 1
    }
}

/// `v` rounded to the nearest integer, ties to even: `round_ties_even` without the libm
/// call it becomes on baseline x86_64 (no SSE4.1 `roundss`), which took 40% of a model's
/// int8 load time. Exact for |v| < 2²² (`v + 1.5·2²³` lands where the float spacing is 1);
/// larger values, infinities and NaN come out as they go in, or close enough for the
/// clamp to ±127 that follows.
#[inline]
fn round_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}

#[inline]
pub(crate) fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// Quantises one block of up to 32 weights into `dst` (32 values, zero-filled past
/// `src`), returning the bf16 scale bits.
pub(crate) fn quantise_weight_block(src: &[f32], dst: &mut [i8]) -> u16 {
    let amax = src.iter().fold(0f32, |a, v| a.max(v.abs()));
    let scale_bits = if amax.is_finite() {
        bf16_round_up(amax / 127.0)
    } else {
        half::bf16::INFINITY.to_bits()
    };
    let s = bf16_to_f32(scale_bits);
    let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
    for (i, d) in dst.iter_mut().enumerate() {
        let v = src.get(i).copied().unwrap_or(0.0);
        // `as` saturates and maps NaN to 0.
        *d = round_even(v * inv).clamp(-127.0, 127.0) as i8;
    }
    scale_bits
}

impl Q8Matrix {
    pub(crate) fn with_capacity(rows: usize, cols: usize) -> Q8Matrix {
        let kp = cols.div_ceil(PAD).max(1) * PAD;
        Q8Matrix {
            cols,
            kp,
            qs: Vec::with_capacity(rows * kp),
            scales: Vec::with_capacity(rows * kp / BLOCK),
        }
    }

    pub(crate) fn rows(&self) -> usize {
        self.qs.len() / self.kp
    }

    /// Appends one row of `cols` values.
    pub(crate) fn push_row(&mut self, row: &[f32]) {
        debug_assert_eq!(row.len(), self.cols);
        let start = self.qs.len();
        self.qs.resize(start + self.kp, 0);
        for (b, dst) in self.qs[start..].chunks_exact_mut(BLOCK).enumerate() {
            let lo = (b * BLOCK).min(row.len());
            let hi = ((b + 1) * BLOCK).min(row.len());
            self.scales.push(quantise_weight_block(&row[lo..hi], dst));
        }
    }

    pub(crate) fn bytes(&self) -> usize {
        self.qs.len() + self.scales.len() * 2
    }

    /// Row `r` dequantised into `out` (`cols` values).
    pub(crate) fn dequantise_row(&self, r: usize, out: &mut [f32]) {
        let q = &self.qs[r * self.kp..r * self.kp + self.cols];
        let s = &self.scales[r * self.kp / BLOCK..];
        for (i, (o, v)) in out.iter_mut().zip(q).enumerate() {
            *o = bf16_to_f32(s[i / BLOCK]) * *v as f32;
        }
    }
}

/// Activation rows quantised for one product.
pub(crate) struct Q8Rows {
    pub(crate) kp: usize,
    pub(crate) qs: Vec<i8>,
    /// Per lane group (4 inputs): `-128 · Σ q`, the correction of VNNI's unsigned operand.
    pub(crate) negcorr: Vec<i32>,
    /// Per lane group: the scale of its block (expanded so kernels load 8/16 at once).
    pub(crate) sx: Vec<f32>,
}

/// Quantises `m` rows of `k` values each into blocks padded to `kp`.
pub(crate) fn quantise_rows(x: &[f32], m: usize, k: usize, kp: usize) -> Q8Rows {
    let g = kp / 4;
    let mut out = Q8Rows {
        kp,
        qs: vec![0; m * kp],
        negcorr: vec![0; m * g],
        sx: vec![0.0; m * g],
    };
    #[cfg(target_arch = "x86_64")]
    let vector = super::q8_x86::vnni_available();
    for t in 0..m {
        let row = &x[t * k..(t + 1) * k];
        let qrow = &mut out.qs[t * kp..(t + 1) * kp];
        for (b, dst) in qrow.chunks_exact_mut(BLOCK).enumerate() {
            let lo = (b * BLOCK).min(k);
            let hi = ((b + 1) * BLOCK).min(k);
            let gi = t * g + b * 8;
            let (nc, sx) = (&mut out.negcorr[gi..gi + 8], &mut out.sx[gi..gi + 8]);
            #[cfg(target_arch = "x86_64")]
            if vector && hi - lo == BLOCK {
                // SAFETY: the CPU has AVX-512 VNNI; the slices have the lengths it reads.
                unsafe { super::q8_x86::quantise_block_avx512(&row[lo..hi], dst, nc, sx) };
                continue;
            }
            quantise_block(&row[lo..hi], dst, nc, sx);
        }
    }
    out
}

/// One activation block: up to 32 values of `src` (zeros past its end) into `dst`, with
/// its 8 lane groups' scale and VNNI correction. The vector form
/// (`q8_x86::quantise_block_avx512`) gives the same values.
pub(crate) fn quantise_block(src: &[f32], dst: &mut [i8], negcorr: &mut [i32], sx: &mut [f32]) {
    let amax = src.iter().fold(0f32, |a, v| a.max(v.abs()));
    let s = amax / 127.0;
    let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
    for (i, d) in dst.iter_mut().enumerate() {
        let v = src.get(i).copied().unwrap_or(0.0);
        *d = round_even(v * inv).clamp(-127.0, 127.0) as i8;
    }
    for j in 0..8 {
        sx[j] = s;
        let sum: i32 = dst[4 * j..4 * j + 4].iter().map(|v| *v as i32).sum();
        negcorr[j] = -128 * sum;
    }
}

/// Sums the 16 lane accumulators in one fixed order (shared by every kernel).
#[inline]
pub(crate) fn hsum16(a: &[f32; 16]) -> f32 {
    let h = |o: usize| {
        ((a[o] + a[o + 4]) + (a[o + 2] + a[o + 6]))
            + ((a[o + 1] + a[o + 5]) + (a[o + 3] + a[o + 7]))
    };
    h(0) + h(8)
}

/// Which kernel computes a product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
}

impl Kernel {
    /// The fastest kernel this CPU runs.
    pub(crate) fn best() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2_only = std::env::var("MOE_CPU_KERNEL").is_ok_and(|v| v == "avx2");
            if super::q8_x86::vnni_available() && !avx2_only {
                return Kernel::Avx512Vnni;
            }
            if super::q8_x86::avx2_available() {
                return Kernel::Avx2;
            }
        }
        Kernel::Portable
    }

    /// Every kernel this CPU runs (for tests comparing them).
    #[cfg(test)]
    pub(crate) fn all_available() -> Vec<Kernel> {
        #[allow(unused_mut)]
        let mut v = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if super::q8_x86::avx2_available() {
                v.push(Kernel::Avx2);
            }
            let avx2_only = std::env::var("MOE_CPU_KERNEL").is_ok_and(|v| v == "avx2");
            if super::q8_x86::vnni_available() && !avx2_only {
                v.push(Kernel::Avx512Vnni);
            }
        }
        v
    }
}

/// Rows `rows` of `w` against every row of `x`; element (r, t) goes to
/// `out[t * ldo + (r - rows.start)]`.
///
/// # Safety
/// `out` must be valid for those writes; `x` must have been quantised with `w.kp`.
pub(crate) unsafe fn rows_into(
    kernel: Kernel,
    w: &Q8Matrix,
    rows: std::ops::Range<usize>,
    x: &Q8Rows,
    out: *mut f32,
    ldo: usize,
) {
    assert_eq!(x.kp, w.kp, "activation and weight padding");
    assert!(rows.end <= w.rows());
    match kernel {
        Kernel::Portable => canonical(w, rows, x, out, ldo),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => super::q8_x86::rows_avx2(w, rows, x, out, ldo),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Vnni => super::q8_x86::rows_vnni(w, rows, x, out, ldo),
    }
}

/// The portable kernel, and the definition the SIMD kernels reproduce bit for bit.
///
/// # Safety
/// As [`rows_into`].
unsafe fn canonical(
    w: &Q8Matrix,
    rows: std::ops::Range<usize>,
    x: &Q8Rows,
    out: *mut f32,
    ldo: usize,
) {
    let kp = w.kp;
    let nb = kp / BLOCK;
    let m = x.qs.len() / kp;
    for r in rows.clone() {
        let wq = &w.qs[r * kp..(r + 1) * kp];
        let ws = &w.scales[r * nb..(r + 1) * nb];
        for t in 0..m {
            let xq = &x.qs[t * kp..(t + 1) * kp];
            let xs = &x.sx[t * kp / 4..(t + 1) * kp / 4];
            let mut acc = [0f32; 16];
            for b in 0..nb {
                let d = bf16_to_f32(ws[b]) * xs[b * 8];
                for j in 0..8 {
                    let o = b * BLOCK + 4 * j;
                    let p: i32 = (0..4).map(|i| wq[o + i] as i32 * xq[o + i] as i32).sum();
                    let lane = (b % 2) * 8 + j;
                    acc[lane] = (p as f32).mul_add(d, acc[lane]);
                }
            }
            *out.add(t * ldo + (r - rows.start)) = hsum16(&acc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-amp, amp) (xorshift), with blocks of varied magnitude.
    fn data(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let u = (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                u * [1.0, 0.01, 3e-6, 40.0][(i / 32) % 4]
            })
            .collect()
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn vector_activation_quantiser_gives_the_scalar_values() {
        if !crate::linalg::q8_x86::vnni_available() {
            return;
        }
        let mut blocks: Vec<Vec<f32>> = (0..64).map(|s| data(32, s)).collect();
        let mut odd = data(32, 99);
        odd[3] = f32::NAN;
        odd[7] = -0.0;
        blocks.push(odd);
        let mut inf = data(32, 98);
        inf[30] = f32::NEG_INFINITY;
        blocks.push(inf);
        blocks.push(vec![0.0; 32]);
        blocks.push((0..32).map(|i| (i as f32 - 16.0) * 0.5).collect());
        for src in &blocks {
            let (mut q1, mut q2) = ([0i8; 32], [0i8; 32]);
            let (mut c1, mut c2) = ([0i32; 8], [0i32; 8]);
            let (mut s1, mut s2) = ([0f32; 8], [0f32; 8]);
            quantise_block(src, &mut q1, &mut c1, &mut s1);
            // SAFETY: checked above that the CPU has AVX-512 VNNI.
            unsafe { crate::linalg::q8_x86::quantise_block_avx512(src, &mut q2, &mut c2, &mut s2) };
            assert_eq!((q1, c1), (q2, c2), "{src:?}");
            assert_eq!(s1.map(f32::to_bits), s2.map(f32::to_bits));
        }
    }

    #[test]
    fn round_even_is_round_ties_even_in_the_quantiser_range() {
        let mut v: Vec<f32> = (-600..=600).map(|i| i as f32 * 0.25).collect();
        v.extend(data(4096, 7).iter().map(|x| x * 3.2));
        v.extend([
            0.49999997,
            -0.49999997,
            126.5,
            -126.5,
            127.5,
            4_194_303.5,
            -0.0,
        ]);
        for x in v {
            // `==`: a result of -0.0 may come out as +0.0, the same i8 either way.
            assert_eq!(round_even(x), x.round_ties_even(), "{x}");
        }
        for x in [f32::INFINITY, f32::NEG_INFINITY, 1e30, -1e30] {
            assert_eq!(
                round_even(x).clamp(-127.0, 127.0),
                x.clamp(-127.0, 127.0),
                "{x}"
            );
        }
        assert!(round_even(f32::NAN).is_nan());
    }

    fn product(w: &Q8Matrix, x: &Q8Rows, m: usize, kernel: Kernel) -> Vec<f32> {
        let n = w.rows();
        let mut y = vec![0f32; m * n];
        // SAFETY: y holds m × n values.
        unsafe { rows_into(kernel, w, 0..n, x, y.as_mut_ptr(), n) };
        y
    }

    fn matrix(w: &[f32], n: usize, k: usize) -> Q8Matrix {
        let mut q = Q8Matrix::with_capacity(n, k);
        for row in w.chunks_exact(k) {
            q.push_row(row);
        }
        q
    }

    #[test]
    fn round_trip_error_is_at_most_half_a_scale_per_block() {
        let (n, k) = (7, 200);
        let w = data(n * k, 1);
        let q = matrix(&w, n, k);
        assert_eq!(q.kp, 256);
        let mut row = vec![0f32; k];
        for r in 0..n {
            q.dequantise_row(r, &mut row);
            for (i, (a, b)) in w[r * k..(r + 1) * k].iter().zip(&row).enumerate() {
                let s = bf16_to_f32(q.scales[r * q.kp / BLOCK + i / BLOCK]);
                assert!(
                    (a - b).abs() <= s / 2.0,
                    "row {r} col {i}: {a} vs {b}, scale {s}"
                );
                // The scale is no coarser than one bf16 step above amax / 127.
                let amax = w[r * k + i / BLOCK * BLOCK..r * k + ((i / BLOCK + 1) * BLOCK).min(k)]
                    .iter()
                    .fold(0f32, |m, v| m.max(v.abs()));
                assert!(s >= amax / 127.0 && s <= amax / 127.0 * (1.0 + 1.0 / 128.0));
            }
        }
        assert!(
            q.qs.iter().all(|v| *v >= -127),
            "-128 must never be produced"
        );
    }

    #[test]
    fn every_kernel_gives_the_same_bits() {
        let kernels = Kernel::all_available();
        for &(n, k, m) in &[(5, 64, 1), (9, 96, 3), (33, 1000, 8), (64, 512, 17)] {
            let w = matrix(&data(n * k, 2), n, k);
            let x = quantise_rows(&data(m * k, 3), m, k, w.kp);
            let want = product(&w, &x, m, Kernel::Portable);
            for &kern in &kernels {
                let got = product(&w, &x, m, kern);
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{kern:?} differs from portable at {n}x{k}x{m}");
            }
        }
        eprintln!("kernels compared: {kernels:?}");
    }

    #[test]
    fn product_is_close_to_f32() {
        // Bound: each operand's rounding error is ≤ half a step of its block (1/254 of the
        // block's max), so the error of a block is ≤ Σ |w||x| / 127 roughly; relative to
        // the f64 sum of |w·x| we require < 2% (random signs make it far smaller).
        let (n, k, m) = (48, 768, 4);
        let wf: Vec<f32> = data(n * k, 4)
            .iter()
            .map(|v| v.signum() * v.abs().min(1.0))
            .collect();
        let xf = data(m * k, 5);
        let w = matrix(&wf, n, k);
        let x = quantise_rows(&xf, m, k, w.kp);
        let got = product(&w, &x, m, Kernel::best());
        let mut worst = 0f64;
        for t in 0..m {
            for r in 0..n {
                let (mut s, mut abs) = (0f64, 0f64);
                for i in 0..k {
                    let p = wf[r * k + i] as f64 * xf[t * k + i] as f64;
                    s += p;
                    abs += p.abs();
                }
                worst = worst.max((got[t * n + r] as f64 - s).abs() / abs);
            }
        }
        assert!(worst < 0.02, "relative error {worst}");
        assert!(worst > 0.0, "quantisation must actually happen");
    }

    #[test]
    fn non_finite_weights_do_not_panic() {
        let mut w = data(64, 6);
        w[3] = f32::NAN;
        w[40] = f32::INFINITY;
        let q = matrix(&w, 1, 64);
        let x = quantise_rows(&data(64, 7), 1, 64, q.kp);
        let _ = product(&q, &x, 1, Kernel::best());
    }
}
