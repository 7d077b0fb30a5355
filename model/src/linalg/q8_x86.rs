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
use super::STREAM_TOKENS;

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
    let m = x.qs.len() / w.kp;
    if m == 1 {
        return rows_vnni_one_token(w, rows, x, out);
    }
    if m <= STREAM_TOKENS {
        // Few tokens: a row at a time, one sequential stream of weights per thread
        // (see super::STREAM_TOKENS).
        for r in rows.clone() {
            let o = out.add(r - rows.start);
            let mut t = 0;
            while t + 2 <= m {
                vnni_tile::<1, 2>(w, r, x, t, o, ldo, false);
                t += 2;
            }
            if t < m {
                vnni_tile::<1, 1>(w, r, x, t, o, ldo, false);
            }
        }
        return;
    }
    let mut r = rows.start;
    while r < rows.end {
        let o = out.add(r - rows.start);
        if r + VNNI_ROWS <= rows.end {
            // The first token tile of a row tile prefetches the next row tile.
            let mut t = 0;
            let mut pf = true;
            while t + 2 <= m {
                vnni_tile::<VNNI_ROWS, 2>(w, r, x, t, o, ldo, pf);
                (t, pf) = (t + 2, false);
            }
            if t < m {
                vnni_tile::<VNNI_ROWS, 1>(w, r, x, t, o, ldo, pf);
            }
            r += VNNI_ROWS;
        } else {
            for t in 0..m {
                vnni_tile::<1, 1>(w, r, x, t, o, ldo, false);
            }
            r += 1;
        }
    }
}

/// One token (batch 1), row by row, all in registers: the weights' sign moves onto the
/// input (`|w|` × `±x`, so no offset and no correction term), and the block scale
/// products `w_scale · x_scale` of a row are computed 16 at a time into a small buffer
/// and widened per block pair from there. The same integer sums and the same float
/// operations as [`vnni_tile`], so the same bits.
///
/// # Safety
/// As [`rows_vnni`], with one token row in `x`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn rows_vnni_one_token(w: &Q8Matrix, rows: Range<usize>, x: &Q8Rows, out: *mut f32) {
    let kp = w.kp;
    let nb = kp / BLOCK;
    let xq = x.qs.as_ptr();
    // The token's block scales, one per block (`sx` repeats each over its 8 lane groups).
    let xsc: Vec<f32> = (0..nb).map(|b| x.sx[8 * b]).collect();
    let mut d = vec![0f32; nb];
    // Lanes 0-7 take the pair's first value, lanes 8-15 its second.
    let halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    let zero = _mm512_setzero_si512();
    for r in rows.clone() {
        let wq = w.qs.as_ptr().add(r * kp);
        let ws = w.scales.as_ptr().add(r * nb);
        let mut b = 0;
        while b + 16 <= nb {
            let h = _mm256_loadu_si256(ws.add(b) as *const __m256i);
            let e = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
            _mm512_storeu_ps(
                d.as_mut_ptr().add(b),
                _mm512_mul_ps(e, _mm512_loadu_ps(xsc.as_ptr().add(b))),
            );
            b += 16;
        }
        for j in b..nb {
            d[j] = bf16_to_f32(*ws.add(j)) * xsc[j];
        }
        let mut acc = _mm512_setzero_ps();
        for bp in 0..nb / 2 {
            // Never dereferenced: a prefetch past the end is harmless.
            _mm_prefetch::<_MM_HINT_T0>(wq.wrapping_add(2 * kp + 64 * bp));
            let wv = _mm512_loadu_si512(wq.add(64 * bp) as *const _);
            let neg = _mm512_movepi8_mask(wv);
            let xv = _mm512_loadu_si512(xq.add(64 * bp) as *const _);
            let sx = _mm512_mask_sub_epi8(xv, neg, zero, xv);
            let p = _mm512_dpbusd_epi32(zero, _mm512_abs_epi8(wv), sx);
            let pair = _mm512_castpd_ps(_mm512_set1_pd(
                (d.as_ptr().add(2 * bp) as *const f64).read_unaligned(),
            ));
            let dv = _mm512_permutexvar_ps(halves, pair);
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), dv, acc);
        }
        let mut lanes = [0f32; 16];
        _mm512_storeu_ps(lanes.as_mut_ptr(), acc);
        *out.add(r - rows.start) = hsum16(&lanes);
    }
}

/// [`super::q8::quantise_block`] on a full block of 32 values, in registers: the same
/// scale, the same rounding (`vcvtps2dq` rounds to nearest even, as `round_even`) and
/// NaN to 0.
///
/// # Safety
/// On a CPU where [`vnni_available`]; `src` and `dst` hold 32 values, `negcorr` and
/// `sx` 8.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn quantise_block_avx512(
    src: &[f32],
    dst: &mut [i8],
    negcorr: &mut [i32],
    sx: &mut [f32],
) {
    debug_assert!(src.len() == BLOCK && dst.len() == BLOCK && negcorr.len() == 8 && sx.len() == 8);
    let a = _mm512_loadu_ps(src.as_ptr());
    let b = _mm512_loadu_ps(src.as_ptr().add(16));
    // `maxps` returns its second operand when either is NaN: NaNs drop out, as in
    // the scalar fold.
    let zero = _mm512_setzero_ps();
    let m = _mm512_max_ps(_mm512_abs_ps(b), _mm512_max_ps(_mm512_abs_ps(a), zero));
    let amax = _mm512_reduce_max_ps(m);
    let s = amax / 127.0;
    let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
    let (lo, hi) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
    let quant = |v: __m512| -> __m128i {
        let p = _mm512_mul_ps(v, _mm512_set1_ps(inv));
        let ordered = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(p, p);
        let c = _mm512_min_ps(_mm512_max_ps(p, lo), hi);
        _mm512_cvtepi32_epi8(_mm512_maskz_mov_epi32(ordered, _mm512_cvtps_epi32(c)))
    };
    let q = _mm256_set_m128i(quant(b), quant(a));
    _mm256_storeu_si256(dst.as_mut_ptr() as *mut __m256i, q);
    let sums = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(1), q);
    let nc = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(sums, 7));
    _mm256_storeu_si256(negcorr.as_mut_ptr() as *mut __m256i, nc);
    _mm256_storeu_ps(sx.as_mut_ptr(), _mm256_set1_ps(s));
}

/// Runs `$body` for `$i` = 0, 1, ... `$n - 1` (`$n` ≤ 4, a constant), written out so that
/// the tile's accumulator arrays are indexed by constants and stay in registers (LLVM
/// kept the loop form, with its arrays on the stack).
macro_rules! unroll {
    ($n:expr, |$i:ident| $body:block) => {{
        const { assert!($n <= 4) };
        if $n > 0 {
            let $i = 0;
            $body
        }
        if $n > 1 {
            let $i = 1;
            $body
        }
        if $n > 2 {
            let $i = 2;
            $body
        }
        if $n > 3 {
            let $i = 3;
            $body
        }
    }};
}

/// Weight rows per VNNI tile: 4 rows × 2 tokens keep 8 accumulators, the rows' weights
/// and scales and the tokens' inputs in registers, and each weight block pair loaded (and
/// its scales expanded) serves both tokens.
const VNNI_ROWS: usize = 4;

/// Rows `r0..r0 + R` of `w` against tokens `t0..t0 + T`; element (r, t) goes to
/// `out[t * ldo + r - r0]`. With `pf`, the next `R` rows are prefetched on the way (at
/// batch 1 the hardware prefetcher alone left the weight loads waiting on memory).
///
/// # Safety
/// As [`rows_vnni`], with the rows and tokens inside `w` and `x`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn vnni_tile<const R: usize, const T: usize>(
    w: &Q8Matrix,
    r0: usize,
    x: &Q8Rows,
    t0: usize,
    out: *mut f32,
    ldo: usize,
    pf: bool,
) {
    let kp = w.kp;
    let nb = kp / BLOCK;
    let g = kp / 4;
    let flip = _mm512_set1_epi8(0x80u8 as i8);
    let hi_mask = _mm512_set1_epi32(0xffff_0000u32 as i32);
    let wq = w.qs.as_ptr().add(r0 * kp);
    let ws = w.scales.as_ptr().add(r0 * nb);
    let xq = x.qs.as_ptr().add(t0 * kp);
    let nc = x.negcorr.as_ptr().add(t0 * g);
    let xs = x.sx.as_ptr().add(t0 * g);
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    for bp in 0..nb / 2 {
        let mut xv = [_mm512_setzero_si512(); T];
        let mut cv = [_mm512_setzero_si512(); T];
        let mut sv = [_mm512_setzero_ps(); T];
        unroll!(T, |t| {
            xv[t] = _mm512_loadu_si512(xq.add(t * kp + 64 * bp) as *const _);
            cv[t] = _mm512_loadu_si512(nc.add(t * g + 16 * bp) as *const _);
            sv[t] = _mm512_loadu_ps(xs.add(t * g + 16 * bp));
        });
        unroll!(R, |r| {
            let at = wq.add(r * kp + 64 * bp);
            if pf {
                // Never dereferenced: a prefetch past the end is harmless.
                _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(R * kp));
            }
            let a = _mm512_xor_si512(_mm512_loadu_si512(at as *const _), flip);
            // The block pair's two bf16 scales, each widened over its 8 lane groups.
            let pair = (ws.add(r * nb + 2 * bp) as *const u32).read_unaligned();
            let s = _mm512_set1_epi32(pair as i32);
            let lo = _mm512_slli_epi32(s, 16);
            let hi = _mm512_and_si512(s, hi_mask);
            let e = _mm512_castsi512_ps(_mm512_mask_blend_epi32(0xff00, lo, hi));
            unroll!(T, |t| {
                let p = _mm512_dpbusd_epi32(cv[t], a, xv[t]);
                let d = _mm512_mul_ps(e, sv[t]);
                acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), d, acc[r][t]);
            });
        });
    }
    for (r, row) in acc.iter().enumerate() {
        for (t, a) in row.iter().enumerate() {
            let mut lanes = [0f32; 16];
            _mm512_storeu_ps(lanes.as_mut_ptr(), *a);
            *out.add((t0 + t) * ldo + r) = hsum16(&lanes);
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
