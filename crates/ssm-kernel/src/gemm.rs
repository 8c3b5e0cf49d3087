//! A safe, bounds-checked front end to `matrixmultiply::sgemm`.

use std::cell::Cell;

use matrixmultiply::sgemm;

thread_local! {
    static IN_SGEMM: Cell<bool> = const { Cell::new(false) };
}

/// Whether this thread is inside `matrixmultiply::sgemm`. `sgemm` allocates a packing
/// workspace on every call; an allocation counter (as in `mamba-nn`'s allocation tests) uses
/// this to tell that workspace from the library's own buffers.
pub fn in_sgemm() -> bool {
    IN_SGEMM.try_with(Cell::get).unwrap_or(false)
}

/// `C ← α·A·B + β·C` for an m×k matrix `A` and a k×n matrix `B`, each given as a slice plus
/// (row stride, column stride) in elements, so a transpose is just swapped strides and `β = 1`
/// accumulates.
///
/// `(m, k, n)` are the sizes; element (i, j) of `A` is `a[i·rsa + j·csa]`, and likewise for `B`
/// and `C`. `C` must be laid out without self-overlap: one of its strides must be 1 and the other
/// at least the extent of the first (row-major `(n, 1)` or column-major `(1, m)` or padded
/// versions of them).
///
/// # Panics
/// If any addressed element lies outside its slice, or `C`'s strides could alias.
#[allow(clippy::too_many_arguments)]
#[inline]
#[track_caller]
pub fn gemm(
    (m, k, n): (usize, usize, usize),
    alpha: f32,
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    beta: f32,
    c: &mut [f32],
    (rsc, csc): (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |r: usize, cc: usize, rs: usize, cs: usize| (r - 1) * rs + (cc - 1) * cs;
    if k > 0 {
        assert!(
            last(m, k, rsa, csa) < a.len(),
            "gemm: A ({m}×{k}, strides ({rsa}, {csa})) exceeds its slice of {}",
            a.len()
        );
        assert!(
            last(k, n, rsb, csb) < b.len(),
            "gemm: B ({k}×{n}, strides ({rsb}, {csb})) exceeds its slice of {}",
            b.len()
        );
    }
    assert!(
        last(m, n, rsc, csc) < c.len(),
        "gemm: C ({m}×{n}, strides ({rsc}, {csc})) exceeds its slice of {}",
        c.len()
    );
    let distinct = m == 1 || n == 1 || (csc == 1 && rsc >= n) || (rsc == 1 && csc >= m);
    assert!(distinct, "gemm: C strides ({rsc}, {csc}) would alias elements of a {m}×{n} matrix");
    IN_SGEMM.set(true);
    // SAFETY: every element addressed through the strides lies inside its slice (checked
    // above); `c` is exclusively borrowed and its strides address distinct elements (checked).
    unsafe {
        sgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            rsa as isize,
            csa as isize,
            b.as_ptr(),
            rsb as isize,
            csb as isize,
            beta,
            c.as_mut_ptr(),
            rsc as isize,
            csc as isize,
        );
    }
    IN_SGEMM.set(false);
}

/// `matrixmultiply`'s column-block width for `f32` (`S_NC`).
const NC: usize = 1024;

/// [`gemm`] split over the current rayon pool: `C`'s rows are divided into one contiguous block
/// per task, each computed by a single-threaded `sgemm`. Small products (under ~1 M
/// multiply-adds) or a 1-thread pool run [`gemm`] directly. Call it from outside parallel
/// regions only (the workspace keeps one level of parallelism); `C` must be row-major
/// (`csc == 1`) to be split, otherwise it runs unsplit.
///
/// When `C` is wider than `matrixmultiply`'s column block (`n > 1024`) but a task's row block is
/// not, the block is computed as `Cᵀ = Bᵀ·Aᵀ` (same products, same summation order): `sgemm`
/// packs its left operand once per column block, so the row-major form would pack the block's
/// `A` twice for, say, a 2048 × 256 × 1064 `in_proj` — the second time for 40 columns. Measured
/// 7–12 % faster on that shape, unchanged on the others.
#[allow(clippy::too_many_arguments)]
#[track_caller]
pub fn gemm_par(
    (m, k, n): (usize, usize, usize),
    alpha: f32,
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    beta: f32,
    c: &mut [f32],
    (rsc, csc): (usize, usize),
) {
    use rayon::prelude::*;
    let threads = rayon::current_num_threads();
    if threads < 2 || m < 2 || csc != 1 || m * k * n < (1 << 20) {
        return gemm((m, k, n), alpha, a, (rsa, csa), b, (rsb, csb), beta, c, (rsc, csc));
    }
    let rows = m.div_ceil(threads);
    assert!(
        (m - 1) * rsc + n <= c.len(),
        "gemm_par: C ({m}×{n}, row stride {rsc}) exceeds its slice of {}",
        c.len()
    );
    let transposed = n > NC && rows <= NC;
    c.par_chunks_mut(rows * rsc).enumerate().for_each(|(j, cj)| {
        let i0 = j * rows;
        let mj = rows.min(m - i0);
        if transposed {
            gemm((n, k, mj), alpha, b, (csb, rsb), &a[i0 * rsa..], (csa, rsa), beta, cj, (1, rsc));
        } else {
            gemm((mj, k, n), alpha, &a[i0 * rsa..], (rsa, csa), b, (rsb, csb), beta, cj, (rsc, 1));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposes_by_strides_and_accumulates() {
        // A = [[1, 2], [3, 4]] row-major; Bᵀ where B = [[5, 6], [7, 8]] stored row-major.
        let a = [1.0f32, 2.0, 3.0, 4.0];
        let b = [5.0f32, 6.0, 7.0, 8.0];
        let mut c = [1.0f32; 4];
        // C = A·Bᵀ + C: Bᵀ[k][j] = b[j*2 + k] → strides (1, 2).
        gemm((2, 2, 2), 1.0, &a, (2, 1), &b, (1, 2), 1.0, &mut c, (2, 1));
        assert_eq!(c, [1.0 + 17.0, 1.0 + 23.0, 1.0 + 39.0, 1.0 + 53.0]);
    }

    #[test]
    fn parallel_split_matches_single() {
        let (m, k, n) = (301, 67, 129);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0).collect();
        let mut c1 = vec![0.5f32; m * n];
        let mut c2 = c1.clone();
        gemm((m, k, n), 1.0, &a, (k, 1), &b, (n, 1), 1.0, &mut c1, (n, 1));
        // Transposed A read through strides, on a 3-thread pool.
        let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        pool.install(|| gemm_par((m, k, n), 1.0, &at, (1, m), &b, (n, 1), 1.0, &mut c2, (n, 1)));
        assert_eq!(c1, c2);
    }

    /// A wide C (n > 1024) takes the transposed per-block product: same values as one `sgemm`.
    #[test]
    fn wide_split_matches_single() {
        let (m, k, n) = (301, 67, 1100);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0).collect();
        let mut c1 = vec![0.5f32; m * n];
        let mut c2 = c1.clone();
        gemm((m, k, n), 0.5, &a, (k, 1), &b, (1, k), 1.0, &mut c1, (n, 1));
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        pool.install(|| gemm_par((m, k, n), 0.5, &a, (k, 1), &b, (1, k), 1.0, &mut c2, (n, 1)));
        let worst = c1.iter().zip(&c2).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(worst <= 1e-5, "max |Δ| = {worst}");
    }

    #[test]
    #[should_panic(expected = "gemm: B (2×2, strides (2, 1)) exceeds its slice of 3")]
    fn out_of_bounds_panics() {
        let mut c = [0.0f32; 4];
        gemm((2, 2, 2), 1.0, &[0.0; 4], (2, 1), &[0.0; 3], (2, 1), 0.0, &mut c, (2, 1));
    }
}
