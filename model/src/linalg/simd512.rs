//! The AVX-512 kernel of the bf16 product (see [`super::Linear`]), chosen over the AVX2
//! one in [`super::simd`] where the CPU has AVX-512F: one `vpmovzxwd` widens 16 weights
//! instead of 8, which took bf16 batch-1 decoding from ~63 to ~75 tokens/s on Zen 4. (An
//! f32 instance of the same tiles was no faster there than the AVX2 f32 kernel.)
//!
//! Every element (r, t) is one 16-lane accumulator over k in order, then a fixed lane
//! sum and the leftover products in order, whatever the tile shape: a row gives the same
//! bits alone or batched. (Not the AVX2 kernel's bits: its accumulators have 8 lanes.)
//!
//! Blocks of more than 4 tokens use tiles of 4 weight rows × up to 4 tokens (16
//! accumulators, 4 inputs and a weight vector: 21 of the 32 registers), so each weight
//! vector loaded feeds 4 FMAs; the first token tile of each row block prefetches the
//! next row block. Up to 4 tokens (decoding, experts' few rows) read one row at a time
//! with no software prefetch: one sequential stream, which the hardware prefetcher
//! follows better than 4 interleaved rows (see [`super::STREAM_TOKENS`]).

use std::arch::x86_64::*;

use super::STREAM_TOKENS;

pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx512f")
}

/// 16 bf16 weights, widened to f32 by a shift.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn load_bf16(w: *const u16) -> __m512 {
    let h = _mm256_loadu_si256(w as *const __m256i);
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
}

/// The 16 lanes summed in a fixed order: the two halves lane by lane, then
/// [`super::hsum8`].
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn finish(acc: __m512) -> f32 {
    let mut a = [0f32; 16];
    _mm512_storeu_ps(a.as_mut_ptr(), acc);
    let mut h = [0f32; 8];
    for (i, v) in h.iter_mut().enumerate() {
        *v = a[i] + a[i + 8];
    }
    super::hsum8(&h)
}

/// Tokens per cache block (their rows of x stay in L2 while the weights stream past).
const TOKEN_BLOCK: usize = 32;
/// Weight rows per tile.
const ROWS: usize = 4;

macro_rules! kernel512 {
    ($name:ident, $tile:ident, $wty:ty, $load:ident, $conv:expr) => {
        /// Rows `r0..r0 + R` of `w` against tokens `t0..t0 + T`; element (r, t) goes to
        /// `out[t * ldo + r]`. With `PF`, the next `R` rows are prefetched on the way.
        ///
        /// # Safety
        /// The rows and tokens exist in `w` and `x`; `out` is valid at those elements.
        #[target_feature(enable = "avx512f")]
        #[inline]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $tile<const R: usize, const T: usize, const PF: bool>(
            w: &[$wty],
            x: &[f32],
            k: usize,
            r0: usize,
            t0: usize,
            out: *mut f32,
            ldo: usize,
        ) {
            let kk = k / 16 * 16;
            let wp = w.as_ptr().add(r0 * k);
            let xp = x.as_ptr().add(t0 * k);
            let mut acc = [[_mm512_setzero_ps(); T]; R];
            let mut i = 0;
            while i < kk {
                let mut xv = [_mm512_setzero_ps(); T];
                for (t, v) in xv.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(xp.add(t * k + i));
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let at = wp.add(r * k + i);
                    if PF {
                        // Never dereferenced: a prefetch past the end is harmless.
                        _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(R * k) as *const i8);
                    }
                    let wv = $load(at);
                    for (a, v) in row.iter_mut().zip(&xv) {
                        *a = _mm512_fmadd_ps(wv, *v, *a);
                    }
                }
                i += 16;
            }
            for (r, row) in acc.iter().enumerate() {
                for (t, a) in row.iter().enumerate() {
                    let mut s = finish(*a);
                    for j in kk..k {
                        s += $conv(&w[(r0 + r) * k + j]) * x[(t0 + t) * k + j];
                    }
                    *out.add((t0 + t) * ldo + r0 + r) = s;
                }
            }
        }

        /// All of `w`'s rows against all `m` token rows of `x`; element (r, t) goes to
        /// `out[t * ldo + r]`.
        ///
        /// # Safety
        /// `out` must be valid for writes at every `t * ldo + r` (t < m, r < rows), and
        /// the CPU must have AVX-512F ([`available`]).
        #[target_feature(enable = "avx512f")]
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
            let mut t_lo = 0;
            while t_lo < m {
                let t_hi = (t_lo + TOKEN_BLOCK).min(m);
                if t_hi - t_lo <= STREAM_TOKENS {
                    // Few tokens: a row at a time, one sequential stream per thread
                    // (see super::STREAM_TOKENS); no software prefetch.
                    for r in 0..n {
                        match t_hi - t_lo {
                            1 => $tile::<1, 1, false>(w, x, k, r, t_lo, out, ldo),
                            2 => $tile::<1, 2, false>(w, x, k, r, t_lo, out, ldo),
                            3 => $tile::<1, 3, false>(w, x, k, r, t_lo, out, ldo),
                            _ => $tile::<1, 4, false>(w, x, k, r, t_lo, out, ldo),
                        }
                    }
                    t_lo = t_hi;
                    continue;
                }
                let mut r = 0;
                while r + ROWS <= n {
                    let mut t = t_lo;
                    // The first tile of the row block prefetches the next block.
                    match t_hi - t {
                        1 => $tile::<ROWS, 1, true>(w, x, k, r, t, out, ldo),
                        2 => $tile::<ROWS, 2, true>(w, x, k, r, t, out, ldo),
                        3 => $tile::<ROWS, 3, true>(w, x, k, r, t, out, ldo),
                        _ => $tile::<ROWS, 4, true>(w, x, k, r, t, out, ldo),
                    }
                    t += (t_hi - t).min(4);
                    while t + 4 <= t_hi {
                        $tile::<ROWS, 4, false>(w, x, k, r, t, out, ldo);
                        t += 4;
                    }
                    match t_hi - t {
                        1 => $tile::<ROWS, 1, false>(w, x, k, r, t, out, ldo),
                        2 => $tile::<ROWS, 2, false>(w, x, k, r, t, out, ldo),
                        3 => $tile::<ROWS, 3, false>(w, x, k, r, t, out, ldo),
                        _ => {}
                    }
                    r += ROWS;
                }
                while r < n {
                    for t in t_lo..t_hi {
                        $tile::<1, 1, false>(w, x, k, r, t, out, ldo);
                    }
                    r += 1;
                }
                t_lo = t_hi;
            }
        }
    };
}

kernel512!(rows_bf16, tile_bf16, u16, load_bf16, |v: &u16| {
    super::bf16_to_f32(*v)
});
