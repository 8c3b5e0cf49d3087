//! Few-row decode numerics (a step has one row per sequence): mat-vec projections, row RMSNorm
//! and column gathers.

use ssm_kernel::gemm::gemm;

/// `out (m, n) = x (m, k) · Wᵀ (+ b)` with `w` (n, k).
///
/// A decode step has a handful of rows, where GEMM's packing costs more than the product: each
/// output is then a SIMD dot product of `x`'s row with one contiguous row of `W`, split over the
/// rayon pool when the matrix is large.
pub(crate) fn linear_rows(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    (m, k, n): (usize, usize, usize),
    out: &mut [f32],
) {
    if m <= 4 {
        matvec_rows(x, w, (m, k, n), out);
    } else {
        gemm((m, k, n), 1.0, x, (k, 1), w, (1, k), 0.0, out, (n, 1));
    }
    if let Some(b) = b {
        for row in out.chunks_exact_mut(n) {
            row.iter_mut().zip(b).for_each(|(o, v)| *o += v);
        }
    }
}

/// `out[r, j] = ⟨x[r, :], w[j, :]⟩` for few rows `r`.
pub(crate) fn matvec_rows(x: &[f32], w: &[f32], (m, k, n): (usize, usize, usize), out: &mut [f32]) {
    use rayon::prelude::*;
    use ssm_kernel::simd::{self, W};
    let dot = |xr: &[f32], wr: &[f32]| -> f32 {
        let (mut a0, mut a1) = (wide::f32x8::ZERO, wide::f32x8::ZERO);
        let mut i = 0;
        while i + 2 * W <= k {
            a0 = simd::load(&xr[i..]).mul_add(simd::load(&wr[i..]), a0);
            a1 = simd::load(&xr[i + W..]).mul_add(simd::load(&wr[i + W..]), a1);
            i += 2 * W;
        }
        while i < k {
            let e = (i + W).min(k);
            a0 = simd::load(&xr[i..e]).mul_add(simd::load(&wr[i..e]), a0);
            i = e;
        }
        (a0 + a1).reduce_add()
    };
    for r in 0..m {
        let xr = &x[r * k..(r + 1) * k];
        let row = &mut out[r * n..(r + 1) * n];
        if n * k >= 1 << 17 {
            row.par_chunks_mut(64).enumerate().for_each(|(c, oc)| {
                for (jj, o) in oc.iter_mut().enumerate() {
                    let j = c * 64 + jj;
                    *o = dot(xr, &w[j * k..(j + 1) * k]);
                }
            });
        } else {
            for (j, o) in row.iter_mut().enumerate() {
                *o = dot(xr, &w[j * k..(j + 1) * k]);
            }
        }
    }
}

/// RMSNorm of each row of `x` over groups of `group` channels: `x · rsqrt(mean(x²) + eps) · w`.
pub(crate) fn rms_rows(x: &[f32], w: &[f32], group: usize, eps: f32, out: &mut [f32]) {
    for (xs, os) in x.chunks_exact(group).zip(out.chunks_exact_mut(group)) {
        let ms = xs.iter().map(|v| v * v).sum::<f32>() / group as f32;
        let r = 1.0 / (ms + eps).sqrt();
        os.copy_from_slice(xs);
        os.iter_mut().for_each(|o| *o *= r);
    }
    let d = w.len();
    for row in out.chunks_exact_mut(d) {
        row.iter_mut().zip(w).for_each(|(o, g)| *o *= g);
    }
}

/// Columns `start..start + len` of the rows (width `n`) of `src`, as a contiguous (rows, len)
/// slice: borrowed in place for a single row, else copied into `dst` (at least rows · len long).
pub(crate) fn cols<'a>(src: &'a [f32], n: usize, start: usize, len: usize, dst: &'a mut [f32]) -> &'a [f32] {
    let rows = src.len() / n;
    if rows == 1 {
        return &src[start..start + len];
    }
    for (s, d) in src.chunks_exact(n).zip(dst.chunks_exact_mut(len)) {
        d.copy_from_slice(&s[start..start + len]);
    }
    &dst[..rows * len]
}

/// `v · σ(v)`.
pub(crate) fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}
