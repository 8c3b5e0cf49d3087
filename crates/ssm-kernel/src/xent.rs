//! Softmax cross-entropy over the rows of a logits matrix: the fused forward (one pass per row:
//! max, then `Σ exp`) and its backward.
//!
//! # Layouts (row-major)
//!
//! | array | layout |
//! |---|---|
//! | `logits`, `dlogits` | (rows, V) |
//! | `targets` | (rows), a class in `0..V` or [`IGNORE_INDEX`] |
//! | `lse` | (rows): each row's log-sum-exp, saved by the forward for the backward |
//!
//! # Formula
//!
//! `loss_r = lse_r − logits[r, t_r]` with `lse_r = log Σ_j exp(logits[r, j])`, summed over the
//! rows whose target is not [`IGNORE_INDEX`]; the caller divides by the count. Backward, for a
//! scale `g` (`dloss / count` for a mean): `dlogits[r, :] += g · (softmax(logits[r, :]) −
//! onehot(t_r))` on the scored rows. Rows run in blocks on the current rayon pool when
//! `rows · V ≥` [`PAR_MIN_ELEMS`](crate::par::PAR_MIN_ELEMS); the `exp`s are SIMD.
//!
//! ```
//! use ssm_kernel::xent::{xent_fwd, IGNORE_INDEX};
//! let logits = [0.0f32, 0.0, 5.0, 5.0];            // (2, 2)
//! let mut lse = [0.0f32; 2];
//! let (sum, count) = xent_fwd(2, &logits, &[1, IGNORE_INDEX], &mut lse);
//! assert_eq!(count, 1);
//! assert!((sum - 2f64.ln()).abs() < 1e-6);
//! ```

use crate::par::{for_row_blocks, for_row_blocks_strided};
use crate::simd::{self, Vf32};

/// Targets equal to this are skipped (PyTorch's default `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

#[track_caller]
fn check(kernel: &str, v: usize, logits: &[f32], targets: &[i64], lse: &[f32]) {
    let rows = targets.len();
    assert_eq!(logits.len(), rows * v, "{kernel}: logits must be (rows, V) = ({rows}, {v})");
    assert_eq!(lse.len(), rows, "{kernel}: lse must be (rows) = ({rows})");
    if let Some((r, &t)) =
        targets.iter().enumerate().find(|&(_, &t)| t != IGNORE_INDEX && !(0..v as i64).contains(&t))
    {
        panic!("{kernel}: target {t} (row {r}) out of range for {v} classes");
    }
}

/// Forward over `targets.len()` rows of `v` logits: writes every row's log-sum-exp into `lse`
/// and returns `(Σ loss over the scored rows, in f64; the number of scored rows)`.
///
/// # Panics
/// If a length disagrees or a target is outside `0..v` and not [`IGNORE_INDEX`].
#[track_caller]
pub fn xent_fwd(v: usize, logits: &[f32], targets: &[i64], lse: &mut [f32]) -> (f64, usize) {
    check("xent_fwd", v, logits, targets, lse);
    let rows = targets.len();
    let blocks = for_row_blocks_strided(rows, v, [1], [Some(lse)], |range, [lb]| {
        let lb = lb.expect("lse is always written");
        let (mut sum, mut count) = (0.0f64, 0usize);
        for (i, r) in range.enumerate() {
            let row = &logits[r * v..(r + 1) * v];
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let l = m + sum_exp_shifted(row, m).ln();
            lb[i] = l;
            if targets[r] != IGNORE_INDEX {
                sum += (l - row[targets[r] as usize]) as f64;
                count += 1;
            }
        }
        (sum, count)
    });
    blocks.into_iter().fold((0.0, 0), |(s, c), (bs, bc)| (s + bs, c + bc))
}

/// Backward: `dlogits[r, :] += g · (softmax(logits[r, :]) − onehot(t_r))` for every scored row
/// (from the forward's `lse`); ignored rows are not touched.
///
/// # Panics
/// If a length disagrees or a target is out of range.
#[track_caller]
pub fn xent_bwd(v: usize, logits: &[f32], targets: &[i64], lse: &[f32], g: f32, dlogits: &mut [f32]) {
    check("xent_bwd", v, logits, targets, lse);
    assert_eq!(dlogits.len(), logits.len(), "xent_bwd: dlogits must be shaped like logits");
    for_row_blocks(targets.len(), v, [Some(dlogits)], |range, [db]| {
        let db = db.expect("dlogits is wanted");
        for (i, r) in range.enumerate() {
            let t = targets[r];
            if t == IGNORE_INDEX {
                continue;
            }
            let (row, drow) = (&logits[r * v..(r + 1) * v], &mut db[i * v..(i + 1) * v]);
            add_scaled_exp_shifted(drow, row, lse[r], g);
            drow[t as usize] -= g;
        }
    });
}

crate::simd_fn! {
    /// `Σ_j exp(row[j] − m)`, SIMD over the row.
    fn sum_exp_shifted[V: f8](row: &[f32], m: f32) -> f32 {
        let mv = V::splat(m);
        let mut acc = V::ZERO;
        let mut chunks = row.chunks_exact(V::LANES);
        for ch in &mut chunks {
            acc += simd::exp(V::load(ch) - mv);
        }
        acc.reduce_add() + chunks.remainder().iter().map(|&a| (a - m).exp()).sum::<f32>()
    }
}

crate::simd_fn! {
    /// `d[j] += g · exp(row[j] − l)`: adds `g · softmax(row)` when `l` is the row's log-sum-exp.
    fn add_scaled_exp_shifted[V: f8](d: &mut [f32], row: &[f32], l: f32, g: f32) {
        let (lv, gv) = (V::splat(l), V::splat(g));
        let split = row.len() - row.len() % V::LANES;
        for (dc, rc) in d[..split].chunks_exact_mut(V::LANES).zip(row[..split].chunks_exact(V::LANES)) {
            V::add_store(dc, gv * simd::exp(V::load(rc) - lv));
        }
        for (dd, &a) in d[split..].iter_mut().zip(&row[split..]) {
            *dd += g * (a - l).exp();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Rng, assert_rel_max, to_f32};

    /// Against f64 loops: lse, the loss sum and count, and the backward's added rows, for a tail
    /// of the SIMD width (V = 11) and the parallel row blocks (rows · V ≥ 2¹⁶).
    #[test]
    fn match_f64_loops() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for (rows, v) in [(9usize, 11usize), (40, 2000)] {
            let mut r = Rng(v as u64);
            let x = to_f32(&r.vec(rows * v, -5.0, 5.0));
            let targets: Vec<i64> =
                (0..rows as i64).map(|i| if i % 4 == 1 { IGNORE_INDEX } else { i * 37 % v as i64 }).collect();
            let mut lse = vec![f32::NAN; rows];
            let (sum, count) = pool.install(|| xent_fwd(v, &x, &targets, &mut lse));
            let (mut want_lse, mut want_sum, mut want_count) = (Vec::new(), 0.0f64, 0usize);
            for (row, &t) in x.chunks(v).zip(&targets) {
                let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
                let l = m + row.iter().map(|&a| (a as f64 - m).exp()).sum::<f64>().ln();
                want_lse.push(l);
                if t != IGNORE_INDEX {
                    want_sum += l - row[t as usize] as f64;
                    want_count += 1;
                }
            }
            assert_rel_max("lse", &lse, &want_lse, 1e-6, 1.0);
            assert_eq!(count, want_count);
            assert!((sum - want_sum).abs() < 1e-4 * want_sum.abs(), "{sum} vs {want_sum}");
            let g = 0.25f32;
            let mut d = vec![1.0f32; rows * v];
            pool.install(|| xent_bwd(v, &x, &targets, &lse, g, &mut d));
            let mut want = vec![1.0f64; rows * v];
            for (ri, (row, &t)) in x.chunks(v).zip(&targets).enumerate() {
                if t == IGNORE_INDEX {
                    continue;
                }
                for j in 0..v {
                    want[ri * v + j] += g as f64 * (row[j] as f64 - want_lse[ri]).exp();
                }
                want[ri * v + t as usize] -= g as f64;
            }
            assert_rel_max("dlogits", &d, &want, 1e-5, 1.0);
        }
    }
}
