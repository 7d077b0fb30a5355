//! AVX2/FMA kernels of the f32 and bf16 products (see [`super::Linear`]).
//!
//! Both share one tile loop (the `kernel!` macro) and differ only in how 8 weights are
//! loaded as f32. Every element (r, t) is one 8-lane accumulator over k in order,
//! whatever the tile shape, so a row gives the same bits alone or batched.
//!
//! Tried and dropped (AVX2-only EPYC, 2 vCPU): splitting 16 bf16 weights from one load
//! into even and odd lanes (a shift and an and, `x` deinterleaved to match) instead of
//! `vpmovzxwd` + shift: batch-1 decode 46.2 → 47.3 tokens/s, within the noise; a C
//! probe showed the bf16 loop there bound by its FMAs (one per weight, as in f32), not
//! by the conversion or by memory.

use std::arch::x86_64::*;

use super::STREAM_TOKENS;

pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// One step of 8 f32 weights at `w` against 8 inputs.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn mac_f32(acc: __m256, w: *const f32, x: __m256) -> __m256 {
    _mm256_fmadd_ps(_mm256_loadu_ps(w), x, acc)
}

/// One step of 8 bf16 weights at `w` (widened to f32 by a shift) against 8 inputs.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn mac_bf16(acc: __m256, w: *const u16, x: __m256) -> __m256 {
    let h = _mm_loadu_si128(w as *const __m128i);
    let v = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    _mm256_fmadd_ps(v, x, acc)
}

#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn finish(acc: __m256) -> f32 {
    let mut a = [0f32; 8];
    _mm256_storeu_ps(a.as_mut_ptr(), acc);
    super::hsum8(&a)
}

/// Tokens per cache block of the kernel (even, so 2-token tiles stay aligned).
const TOKEN_BLOCK: usize = 32;

macro_rules! kernel {
    ($name:ident, $wty:ty, $mac:ident, $conv:expr) => {
        /// All of `w`'s rows against all `m` token rows of `x`; element (r, t) goes to
        /// `out[t * ldo + r]`. Blocks of more than `STREAM_TOKENS` tokens use tiles
        /// of 4 weight rows × 2 tokens (8 accumulators and the operands in registers);
        /// smaller ones a row at a time.
        ///
        /// # Safety
        /// `out` must be valid for writes at every `t * ldo + r` (t < m, r < rows).
        #[target_feature(enable = "avx2,fma")]
        pub(super) unsafe fn $name(
            w: &[$wty],
            x: &[f32],
            k: usize,
            m: usize,
            out: *mut f32,
            ldo: usize,
        ) {
            let n = w.len() / k;
            assert!(x.len() >= m * k && w.len() == n * k && ldo >= n);
            let kk = k / 8 * 8;
            let wp = w.as_ptr();
            let xp = x.as_ptr();
            /// One weight row against `T` consecutive token rows of `x`: one accumulator
            /// per token over k in order.
            #[target_feature(enable = "avx2,fma")]
            #[inline]
            unsafe fn row_tile<const T: usize>(
                w: *const $wty,
                x: *const f32,
                k: usize,
                kk: usize,
            ) -> [__m256; T] {
                let mut acc = [_mm256_setzero_ps(); T];
                let mut i = 0;
                while i < kk {
                    for (t, a) in acc.iter_mut().enumerate() {
                        *a = $mac(*a, w.add(i), _mm256_loadu_ps(x.add(t * k + i)));
                    }
                    i += 8;
                }
                acc
            }
            // Finishes an element from its vector accumulator: lane sum, then the
            // leftover products in order.
            let complete = |acc: __m256, r: usize, t: usize| -> f32 {
                let mut s = finish(acc);
                for j in kk..k {
                    s += $conv(&w[r * k + j]) * x[t * k + j];
                }
                s
            };
            // Token blocks keep their rows of x in L2 while every weight row block
            // streams past; without this, prefill re-reads x from memory per row block.
            let mut t_lo = 0;
            while t_lo < m {
                let t_hi = (t_lo + TOKEN_BLOCK).min(m);
                let tb = t_hi - t_lo;
                if tb <= STREAM_TOKENS {
                    // Few tokens: the weights are read as one sequential stream, a row
                    // at a time (see STREAM_TOKENS).
                    let xt = xp.add(t_lo * k);
                    for r in 0..n {
                        let wr = wp.add(r * k);
                        let put = |accs: &[__m256]| {
                            for (j, a) in accs.iter().enumerate() {
                                *out.add((t_lo + j) * ldo + r) = complete(*a, r, t_lo + j);
                            }
                        };
                        match tb {
                            1 => put(&row_tile::<1>(wr, xt, k, kk)),
                            2 => put(&row_tile::<2>(wr, xt, k, kk)),
                            3 => put(&row_tile::<3>(wr, xt, k, kk)),
                            _ => put(&row_tile::<4>(wr, xt, k, kk)),
                        }
                    }
                    t_lo = t_hi;
                    continue;
                }
                let mut r = 0;
                while r + 4 <= n {
                    let w0 = wp.add(r * k);
                    let w1 = wp.add((r + 1) * k);
                    let w2 = wp.add((r + 2) * k);
                    let w3 = wp.add((r + 3) * k);
                    let mut t = t_lo;
                    while t + 2 <= t_hi {
                        let x0 = xp.add(t * k);
                        let x1 = xp.add((t + 1) * k);
                        let z = _mm256_setzero_ps();
                        let (mut a00, mut a01, mut a10, mut a11) = (z, z, z, z);
                        let (mut a20, mut a21, mut a30, mut a31) = (z, z, z, z);
                        let mut i = 0;
                        while i < kk {
                            let v0 = _mm256_loadu_ps(x0.add(i));
                            let v1 = _mm256_loadu_ps(x1.add(i));
                            a00 = $mac(a00, w0.add(i), v0);
                            a01 = $mac(a01, w0.add(i), v1);
                            a10 = $mac(a10, w1.add(i), v0);
                            a11 = $mac(a11, w1.add(i), v1);
                            a20 = $mac(a20, w2.add(i), v0);
                            a21 = $mac(a21, w2.add(i), v1);
                            a30 = $mac(a30, w3.add(i), v0);
                            a31 = $mac(a31, w3.add(i), v1);
                            i += 8;
                        }
                        for (dr, (c0, c1)) in [(a00, a01), (a10, a11), (a20, a21), (a30, a31)]
                            .into_iter()
                            .enumerate()
                        {
                            *out.add(t * ldo + r + dr) = complete(c0, r + dr, t);
                            *out.add((t + 1) * ldo + r + dr) = complete(c1, r + dr, t + 1);
                        }
                        t += 2;
                    }
                    if t < t_hi {
                        let x0 = xp.add(t * k);
                        let z = _mm256_setzero_ps();
                        let (mut a0, mut a1, mut a2, mut a3) = (z, z, z, z);
                        let mut i = 0;
                        while i < kk {
                            let v0 = _mm256_loadu_ps(x0.add(i));
                            a0 = $mac(a0, w0.add(i), v0);
                            a1 = $mac(a1, w1.add(i), v0);
                            a2 = $mac(a2, w2.add(i), v0);
                            a3 = $mac(a3, w3.add(i), v0);
                            i += 8;
                        }
                        for (dr, c) in [a0, a1, a2, a3].into_iter().enumerate() {
                            *out.add(t * ldo + r + dr) = complete(c, r + dr, t);
                        }
                    }
                    r += 4;
                }
                while r < n {
                    for t in t_lo..t_hi {
                        let [a] = row_tile::<1>(wp.add(r * k), xp.add(t * k), k, kk);
                        *out.add(t * ldo + r) = complete(a, r, t);
                    }
                    r += 1;
                }
                t_lo = t_hi;
            }
        }
    };
}

kernel!(rows_f32, f32, mac_f32, |v: &f32| *v);
kernel!(rows_bf16, u16, mac_bf16, |v: &u16| super::bf16_to_f32(*v));
