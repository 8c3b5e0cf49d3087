//! Products of a few rows with a weight matrix, for decode steps: `out = x · Wᵀ (+ b)`.
//!
//! A decode step multiplies a handful of rows (one per sequence) by each weight matrix, where a
//! GEMM's packing costs more than the product. [`matvec_rows`] computes every output as one
//! SIMD dot product ([`crate::simd::dot`]) of a row of `x` with a contiguous row of `W`,
//! splitting the outputs over the current rayon pool when the matrix is large;
//! [`linear_rows`] picks it or the GEMM by the number of rows and adds the bias.
//!
//! # Layouts (row-major)
//!
//! | array | layout |
//! |---|---|
//! | `x` | (m, k) |
//! | `w` | (n, k) — PyTorch's `Linear.weight` |
//! | `b` | (n) |
//! | `out` | (m, n) |
//!
//! ```
//! use ssm_kernel::matvec::matvec_rows;
//! let x = [1.0f32, 2.0];                 // (1, 2)
//! let w = [1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0]; // (3, 2)
//! let mut out = [0.0f32; 3];
//! matvec_rows(&x, &w, (1, 2, 3), &mut out);
//! assert_eq!(out, [1.0, 2.0, 3.0]);
//! ```

use rayon::prelude::*;

use crate::gemm::gemm;
use crate::simd::dot_with;

/// At least this many multiply-adds in one call split its outputs over the rayon pool. Below it
/// the pool's other threads are not woken: waking one costs microseconds, as much as they save
/// on a matrix that fits in the caches (at 1 << 17, a 2-thread batch-1 decode of a model whose
/// largest matrix is 1 MB of f32 ran 1.25× slower than at 1 << 19, and slower than one thread;
/// `docs/results.md`).
pub const PAR_MIN_MACS: usize = 1 << 19;

/// Rows of `x` up to which [`linear_rows`] uses [`matvec_rows`] instead of the GEMM.
pub const MATVEC_MAX_ROWS: usize = 4;

/// Outputs per parallel task of [`matvec_rows`].
const OUTS_PER_TASK: usize = 64;

#[track_caller]
fn check(kernel: &str, x: &[f32], w: &[f32], (m, k, n): (usize, usize, usize), out: &[f32]) {
    assert_eq!(x.len(), m * k, "{kernel}: x must be (m, k) = ({m}, {k}), got {} values", x.len());
    assert_eq!(w.len(), n * k, "{kernel}: w must be (n, k) = ({n}, {k}), got {} values", w.len());
    assert_eq!(out.len(), m * n, "{kernel}: out must be (m, n) = ({m}, {n}), got {} values", out.len());
}

/// `out[r, j] = ⟨x[r, :], w[j, :]⟩` for every row `r < m` and output `j < n`: one SIMD dot
/// product per output, the outputs of a row split over the current rayon pool in tasks of 64
/// when `n · k ≥` [`PAR_MIN_MACS`]. `out` is overwritten.
///
/// # Panics
/// If a length disagrees with `(m, k, n)`.
#[track_caller]
pub fn matvec_rows(x: &[f32], w: &[f32], (m, k, n): (usize, usize, usize), out: &mut [f32]) {
    check("matvec_rows", x, w, (m, k, n), out);
    if n == 0 {
        return;
    }
    for r in 0..m {
        let xr = &x[r * k..(r + 1) * k];
        let row = &mut out[r * n..(r + 1) * n];
        if n * k >= PAR_MIN_MACS {
            row.par_chunks_mut(OUTS_PER_TASK)
                .enumerate()
                .for_each(|(c, oc)| dots(xr, w, k, c * OUTS_PER_TASK, oc));
        } else {
            dots(xr, w, k, 0, row);
        }
    }
}

crate::simd_fn! {
    /// `out[jj] = ⟨xr, W[j0 + jj, :]⟩` for the outputs `out` of one row, on the active
    /// instruction set.
    fn dots[V: f16](xr: &[f32], w: &[f32], k: usize, j0: usize, out: &mut [f32]) {
        for (jj, o) in out.iter_mut().enumerate() {
            let j = j0 + jj;
            *o = dot_with::<V>(xr, &w[j * k..(j + 1) * k]);
        }
    }
}

/// `out (m, n) = x (m, k) · Wᵀ (+ b)`: [`matvec_rows`] for at most [`MATVEC_MAX_ROWS`] rows,
/// else the GEMM; then the bias is added to every row. `out` is overwritten.
///
/// # Panics
/// If a length disagrees with `(m, k, n)` or `b` is not (n).
#[track_caller]
pub fn linear_rows(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    (m, k, n): (usize, usize, usize),
    out: &mut [f32],
) {
    check("linear_rows", x, w, (m, k, n), out);
    if m <= MATVEC_MAX_ROWS {
        matvec_rows(x, w, (m, k, n), out);
    } else {
        if k == 0 {
            out.fill(0.0);
        }
        gemm((m, k, n), 1.0, x, (k, 1), w, (1, k), 0.0, out, (n, 1));
    }
    if let Some(b) = b {
        assert_eq!(b.len(), n, "linear_rows: b must be (n) = ({n}), got {} values", b.len());
        if n == 0 {
            return;
        }
        for row in out.chunks_exact_mut(n) {
            row.iter_mut().zip(b).for_each(|(o, v)| *o += v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Rng, assert_rel_max, naive_linear as naive, to_f32};

    /// Odd sizes (partial SIMD chunks, a last partial task), the parallel split, and the GEMM
    /// path of `linear_rows`.
    #[test]
    fn match_naive_loop() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for (m, k, n) in
            [(1, 1, 1), (1, 7, 3), (3, 17, 5), (2, 33, 129), (1, 513, 1030), (4, 257, 2100), (6, 19, 23)]
        {
            let mut r = Rng((m * 1000 + k * 10 + n) as u64);
            let x = to_f32(&r.vec(m * k, -1.0, 1.0));
            let w = to_f32(&r.vec(n * k, -1.0, 1.0));
            let b = to_f32(&r.vec(n, -1.0, 1.0));
            if m <= MATVEC_MAX_ROWS {
                let mut out = vec![f32::NAN; m * n];
                pool.install(|| matvec_rows(&x, &w, (m, k, n), &mut out));
                assert_rel_max("matvec_rows", &out, &naive(&x, &w, None, (m, k, n)), 1e-5, 1.0);
            }
            let mut out = vec![f32::NAN; m * n];
            pool.install(|| linear_rows(&x, &w, Some(&b), (m, k, n), &mut out));
            assert_rel_max("linear_rows", &out, &naive(&x, &w, Some(&b), (m, k, n)), 1e-5, 1.0);
        }
    }
}
