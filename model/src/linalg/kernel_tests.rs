//! The f32/bf16 kernels against a naive product and against each other, on shapes that
//! hit every tile and tail.

use super::tests::{data, naive};
use super::*;

/// Every f32/bf16 kernel this CPU runs, by name, as `(w, x, k, m, out, ldo)` calls.
#[allow(clippy::type_complexity)]
fn kernels() -> Vec<(
    &'static str,
    unsafe fn(&[f32], &[f32], usize, usize, *mut f32, usize),
)> {
    let mut v: Vec<(
        &str,
        unsafe fn(&[f32], &[f32], usize, usize, *mut f32, usize),
    )> = vec![("portable", |w, x, k, m, o, ldo| unsafe {
        portable::rows(w, x, k, m, o, ldo, |v: &f32| *v)
    })];
    #[cfg(target_arch = "x86_64")]
    {
        if simd::available() {
            v.push(("avx2", |w, x, k, m, o, ldo| unsafe {
                simd::rows_f32(w, x, k, m, o, ldo)
            }));
        }
    }
    v
}

#[test]
fn every_f32_kernel_matches_naive_and_is_batch_invariant() {
    // 203 rows: 4-row tiles and a remainder; 11 tokens: 4-token tiles and 3 left;
    // k = 333: 16- and 8-lane steps with a scalar tail; 40 tokens: two token blocks;
    // 36 tokens: a block of 32 in tiles, then 4 read a row at a time (as 2 and 1 are).
    for &(n, k, m) in &[(203, 333, 11), (9, 48, 40), (5, 7, 2), (7, 40, 36)] {
        let w = data(n * k, 11);
        let x = data(m * k, 12);
        let want = naive(&w, &x, n, k, m);
        for (name, f) in kernels() {
            let mut all = vec![0f32; m * n];
            // SAFETY: `all` holds m × n values; `w` is n × k, `x` is m × k.
            unsafe { f(&w, &x, k, m, all.as_mut_ptr(), n) };
            for (g, e) in all.iter().zip(&want) {
                assert!(
                    (g - e).abs() <= 1e-3 * (1.0 + e.abs()),
                    "{name} {n}x{k}x{m}"
                );
            }
            for t in 0..m {
                let mut one = vec![0f32; n];
                // SAFETY: as above, for one token.
                unsafe { f(&w, &x[t * k..(t + 1) * k], k, 1, one.as_mut_ptr(), n) };
                assert_eq!(&all[t * n..(t + 1) * n], &one[..], "{name} token {t}");
            }
        }
    }
}

#[test]
#[cfg(target_arch = "x86_64")]
fn avx512_bf16_kernel_matches_avx2_closely() {
    if !(simd::available() && simd512::available()) {
        return;
    }
    // 6 tokens: tiles; 3: a row at a time; 36: a block of 32 in tiles, then 4 by rows.
    for &(n, k, m) in &[(37, 300, 6), (37, 300, 3), (11, 64, 36)] {
        let w: Vec<u16> = data(n * k, 13)
            .iter()
            .map(|v| half::bf16::from_f32(*v).to_bits())
            .collect();
        let x = data(m * k, 14);
        let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
        // SAFETY: both outputs hold m × n values.
        unsafe {
            simd::rows_bf16(&w, &x, k, m, a.as_mut_ptr(), n);
            simd512::rows_bf16(&w, &x, k, m, b.as_mut_ptr(), n);
        }
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() <= 1e-4 * (1.0 + p.abs()), "{p} vs {q}");
        }
        for t in 0..m {
            let mut one = vec![0f32; n];
            let xt = &x[t * k..(t + 1) * k];
            // SAFETY: `one` holds n values.
            unsafe { simd512::rows_bf16(&w, xt, k, 1, one.as_mut_ptr(), n) };
            assert_eq!(&b[t * n..(t + 1) * n], &one[..], "{n}x{k}x{m} token {t}");
        }
    }
}
