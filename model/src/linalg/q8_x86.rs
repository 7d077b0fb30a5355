//! x86_64 kernels of the int8 product (see [`super::q8`] for the format and the exact
//! arithmetic they reproduce).
//!
//! - AVX-512 VNNI: `vpdpbusd` multiplies *unsigned* by signed bytes, so the weight is
//!   offset to `q + 128` (an xor with 0x80) and the accumulator starts at the
//!   activation's correction `-128 · Σ x` (computed when the activations are quantised):
//!   `Σ (w + 128) · x - 128 · Σ x = Σ w · x`, exact in i32. One register is a block pair.
//! - AVX2: `maddubs` with the sign trick, `|w| · (x · sign w)` (w ≠ -128, so no
//!   overflow; a pair sums to at most 2 · 127² < 2¹⁵), then `madd` by ones to i32.

use std::arch::x86_64::*;
use std::ops::Range;

use super::q8::{bf16_to_f32, hsum16, Q8Matrix, Q8Rows, BLOCK};

pub(crate) fn vnni_available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
}

pub(crate) fn avx2_available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// # Safety
/// As [`super::q8::rows_into`], on a CPU where [`vnni_available`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn rows_vnni(
    w: &Q8Matrix,
    rows: Range<usize>,
    x: &Q8Rows,
    out: *mut f32,
    ldo: usize,
) {
    let kp = w.kp;
    let nb = kp / BLOCK;
    let nbp = nb / 2;
    let m = x.qs.len() / kp;
    let g = kp / 4;
    let flip = _mm512_set1_epi8(0x80u8 as i8);
    let hi_mask = _mm512_set1_epi32(0xffff_0000u32 as i32);
    // The rows' offset weights and expanded scales, prepared once per row and reused
    // by every token (both stay in L1).
    let mut wu = vec![0u8; kp];
    let mut sw = vec![0f32; g];
    for r in rows.clone() {
        let wq = w.qs.as_ptr().add(r * kp);
        let ws = w.scales.as_ptr().add(r * nb);
        for bp in 0..nbp {
            let v = _mm512_loadu_si512(wq.add(64 * bp) as *const _);
            _mm512_storeu_si512(
                wu.as_mut_ptr().add(64 * bp) as *mut _,
                _mm512_xor_si512(v, flip),
            );
            let pair = (ws.add(2 * bp) as *const u32).read_unaligned();
            let s = _mm512_set1_epi32(pair as i32);
            let lo = _mm512_slli_epi32(s, 16);
            let hi = _mm512_and_si512(s, hi_mask);
            let e = _mm512_castsi512_ps(_mm512_mask_blend_epi32(0xff00, lo, hi));
            _mm512_storeu_ps(sw.as_mut_ptr().add(16 * bp), e);
        }
        for t in 0..m {
            let xq = x.qs.as_ptr().add(t * kp);
            let nc = x.negcorr.as_ptr().add(t * g);
            let xs = x.sx.as_ptr().add(t * g);
            let mut acc = _mm512_setzero_ps();
            for bp in 0..nbp {
                let a = _mm512_loadu_si512(wu.as_ptr().add(64 * bp) as *const _);
                let b = _mm512_loadu_si512(xq.add(64 * bp) as *const _);
                let c = _mm512_loadu_si512(nc.add(16 * bp) as *const _);
                let p = _mm512_dpbusd_epi32(c, a, b);
                let d = _mm512_mul_ps(
                    _mm512_loadu_ps(sw.as_ptr().add(16 * bp)),
                    _mm512_loadu_ps(xs.add(16 * bp)),
                );
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), d, acc);
            }
            let mut lanes = [0f32; 16];
            _mm512_storeu_ps(lanes.as_mut_ptr(), acc);
            *out.add(t * ldo + (r - rows.start)) = hsum16(&lanes);
        }
    }
}

/// Tokens per AVX2 tile: each weight block is loaded (and its absolute value taken)
/// once for this many tokens; 4 × 2 accumulators and the operands fit the 16 registers.
const AVX2_TILE: usize = 4;

/// # Safety
/// As [`super::q8::rows_into`], on a CPU where [`avx2_available`].
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn rows_avx2(
    w: &Q8Matrix,
    rows: Range<usize>,
    x: &Q8Rows,
    out: *mut f32,
    ldo: usize,
) {
    let m = x.qs.len() / w.kp;
    for r in rows.clone() {
        let o = out.add(r - rows.start);
        let mut t = 0;
        while t + AVX2_TILE <= m {
            avx2_tile::<AVX2_TILE>(w, r, x, t, o, ldo);
            t += AVX2_TILE;
        }
        while t < m {
            avx2_tile::<1>(w, r, x, t, o, ldo);
            t += 1;
        }
    }
}

/// Row `r` of `w` against tokens `t0..t0 + T`; token t's result goes to `out[t * ldo]`.
/// Each (row, token) keeps the canonical two accumulators (even and odd blocks).
///
/// # Safety
/// As [`rows_avx2`], with `t0 + T` ≤ the number of token rows.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn avx2_tile<const T: usize>(
    w: &Q8Matrix,
    r: usize,
    x: &Q8Rows,
    t0: usize,
    out: *mut f32,
    ldo: usize,
) {
    let kp = w.kp;
    let nb = kp / BLOCK;
    let g = kp / 4;
    let ones = _mm256_set1_epi16(1);
    let wq = w.qs.as_ptr().add(r * kp);
    let ws = w.scales.as_ptr().add(r * nb);
    let xq = x.qs.as_ptr().add(t0 * kp);
    let xs = x.sx.as_ptr().add(t0 * g);
    let mut even = [_mm256_setzero_ps(); T];
    let mut odd = [_mm256_setzero_ps(); T];
    // One block: |w| once, then per token the sign trick, i16 pair sums to i32 lanes,
    // and the lane group's scale product.
    let block = |b: usize, acc: &mut [__m256; T]| {
        let wv = _mm256_loadu_si256(wq.add(BLOCK * b) as *const _);
        let wa = _mm256_abs_epi8(wv);
        let s = _mm256_set1_ps(bf16_to_f32(*ws.add(b)));
        for (i, a) in acc.iter_mut().enumerate() {
            let xv = _mm256_loadu_si256(xq.add(i * kp + BLOCK * b) as *const _);
            let p16 = _mm256_maddubs_epi16(wa, _mm256_sign_epi8(xv, wv));
            let p = _mm256_madd_epi16(p16, ones);
            let d = _mm256_mul_ps(s, _mm256_loadu_ps(xs.add(i * g + 8 * b)));
            *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), d, *a);
        }
    };
    for bp in 0..nb / 2 {
        block(2 * bp, &mut even);
        block(2 * bp + 1, &mut odd);
    }
    for i in 0..T {
        let mut lanes = [0f32; 16];
        _mm256_storeu_ps(lanes.as_mut_ptr(), even[i]);
        _mm256_storeu_ps(lanes.as_mut_ptr().add(8), odd[i]);
        *out.add((t0 + i) * ldo) = hsum16(&lanes);
    }
}
