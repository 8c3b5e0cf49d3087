//! The linear time-invariant (LTI) recurrence of the non-selective baseline: one state per
//! channel, parameters that do not depend on the input.
//!
//! # Layouts (row-major)
//!
//! | array | layout |
//! |---|---|
//! | `x`, `y`, `dy`, `dx` | (B, L, D) |
//! | `a`, `b`, `c`, `d` and their gradients | (D) |
//!
//! # Recurrence
//!
//! ```text
//! h_t = a ⊙ h_{t−1} + b ⊙ x_t,   h_{−1} = 0
//! y_t = c ⊙ h_t + d ⊙ x_t
//! ```
//!
//! Stable when `|a| < 1`. Backward, with `g_t = c ⊙ dy_t + a ⊙ g_{t+1}` (the reverse
//! recurrence): `da += g_t h_{t−1}`, `db += g_t x_t`, `dx_t += g_t b + d dy_t`,
//! `dc += dy_t h_t`, `dd += dy_t x_t`. Plain loops on the calling thread: the baseline is small.
//!
//! ```
//! use ssm_kernel::lti::{LtiArgs, LtiDims, lti_fwd};
//! let dims = LtiDims::new(1, 2, 1);
//! let mut y = [0.0f32; 2];
//! lti_fwd(&dims, &LtiArgs { x: &[1.0, 1.0], a: &[0.5], b: &[1.0], c: &[1.0], d: &[0.0] }, &mut y);
//! assert_eq!(y, [1.0, 1.5]);
//! ```

use crate::pool;

/// Sizes: `batch` sequences of `seqlen` steps of `dim` channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LtiDims {
    /// `B`.
    pub batch: usize,
    /// `L`.
    pub seqlen: usize,
    /// `D`.
    pub dim: usize,
}

impl LtiDims {
    /// (B, L, D).
    pub fn new(batch: usize, seqlen: usize, dim: usize) -> Self {
        Self { batch, seqlen, dim }
    }

    /// Elements of `x` / `y`, `B·L·D`.
    pub fn n_bld(&self) -> usize {
        self.batch * self.seqlen * self.dim
    }
}

/// The state after the last step, `h` (B, D), of the recurrence over `x` (B, L, D) from
/// `h_{−1} = 0` (what a prefill leaves for [`lti_step`]).
///
/// # Panics
/// If a length does not match `dims`.
#[track_caller]
pub fn lti_final_state(dims: &LtiDims, a: &[f32], b: &[f32], x: &[f32], h: &mut [f32]) {
    let LtiDims { batch, seqlen, dim } = *dims;
    assert!(
        a.len() == dim && b.len() == dim && x.len() == dims.n_bld() && h.len() == batch * dim,
        "lti_final_state: a, b ({dim}), x (B, L, D) = {} and h (B, D) = {} expected, got {}, {}, {} and {}",
        dims.n_bld(),
        batch * dim,
        a.len(),
        b.len(),
        x.len(),
        h.len()
    );
    if seqlen == 0 {
        h.fill(0.0);
        return;
    }
    for (seq, hb) in x.chunks_exact(seqlen * dim).zip(h.chunks_exact_mut(dim)) {
        hb.fill(0.0);
        for row in seq.chunks_exact(dim) {
            for k in 0..dim {
                hb[k] = a[k] * hb[k] + b[k] * row[k];
            }
        }
    }
}

/// One recurrent step for a batch: `x`, `y` and the state `h` are (B, D); `h` is updated in
/// place and `y = c ⊙ h + d ⊙ x` written.
///
/// # Panics
/// If the lengths disagree.
#[track_caller]
pub fn lti_step(args: &LtiArgs, h: &mut [f32], y: &mut [f32]) {
    let dim = args.a.len();
    assert!(
        dim > 0 && args.x.len().is_multiple_of(dim) && h.len() == args.x.len() && y.len() == args.x.len(),
        "lti_step: x, h and y must all be (B, D) with D = {dim}, got {}, {} and {}",
        args.x.len(),
        h.len(),
        y.len()
    );
    let LtiArgs { x, a, b, c, d } = *args;
    for ((hb, xb), yb) in h.chunks_exact_mut(dim).zip(x.chunks_exact(dim)).zip(y.chunks_exact_mut(dim)) {
        for k in 0..dim {
            hb[k] = a[k] * hb[k] + b[k] * xb[k];
            yb[k] = c[k] * hb[k] + d[k] * xb[k];
        }
    }
}

/// The recurrence over a chunk `x` (B, L, D) continuing from the state `h` (B, D) — the state
/// after the previous chunk, zero for a fresh sequence — writing `y` (B, L, D) and leaving in `h`
/// the state after the chunk's last step. Equal to `L` calls of [`lti_step`].
///
/// # Panics
/// If a length disagrees with `dims`.
#[track_caller]
pub fn lti_chunk(dims: &LtiDims, args: &LtiArgs, h: &mut [f32], y: &mut [f32]) {
    args.check("lti_chunk", dims);
    let LtiDims { batch, seqlen: l, dim } = *dims;
    assert_eq!(y.len(), dims.n_bld(), "lti_chunk: y must be (B, L, D) = {dims:?}");
    assert_eq!(h.len(), batch * dim, "lti_chunk: h must be (B, D) = ({batch}, {dim})");
    if l == 0 || dim == 0 {
        return;
    }
    let LtiArgs { x, a, b, c, d } = *args;
    for ((hb, xs), ys) in
        h.chunks_exact_mut(dim).zip(x.chunks_exact(l * dim)).zip(y.chunks_exact_mut(l * dim))
    {
        for (xr, yr) in xs.chunks_exact(dim).zip(ys.chunks_exact_mut(dim)) {
            for k in 0..dim {
                hb[k] = a[k] * hb[k] + b[k] * xr[k];
                yr[k] = c[k] * hb[k] + d[k] * xr[k];
            }
        }
    }
}

/// Inputs: `x` (B, L, D) and the per-channel `a`, `b`, `c`, `d` (D).
#[derive(Clone, Copy, Debug)]
pub struct LtiArgs<'a> {
    /// (B, L, D).
    pub x: &'a [f32],
    /// Decay, (D).
    pub a: &'a [f32],
    /// Input weight, (D).
    pub b: &'a [f32],
    /// Output weight, (D).
    pub c: &'a [f32],
    /// Skip, (D).
    pub d: &'a [f32],
}

impl LtiArgs<'_> {
    #[track_caller]
    fn check(&self, kernel: &str, dims: &LtiDims) {
        assert_eq!(self.x.len(), dims.n_bld(), "{kernel}: x must be (B, L, D) = {dims:?}");
        for (name, v) in [("a", self.a), ("b", self.b), ("c", self.c), ("d", self.d)] {
            assert_eq!(v.len(), dims.dim, "{kernel}: `{name}` must be (D) = ({})", dims.dim);
        }
    }
}

/// Gradients, each added to (`+=`); shapes as the inputs'.
#[derive(Debug)]
pub struct LtiGrads<'a> {
    /// (B, L, D).
    pub dx: &'a mut [f32],
    /// (D).
    pub da: &'a mut [f32],
    /// (D).
    pub db: &'a mut [f32],
    /// (D).
    pub dc: &'a mut [f32],
    /// (D).
    pub dd: &'a mut [f32],
}

/// Forward: writes `y` (B, L, D).
///
/// # Panics
/// If a length disagrees with `dims`.
#[track_caller]
pub fn lti_fwd(dims: &LtiDims, args: &LtiArgs, y: &mut [f32]) {
    args.check("lti_fwd", dims);
    assert_eq!(y.len(), dims.n_bld(), "lti_fwd: y must be (B, L, D) = {dims:?}");
    let LtiDims { batch, seqlen: l, dim } = *dims;
    let LtiArgs { x, a, b, c, d } = *args;
    let mut h = pool::take(dim);
    for bi in 0..batch {
        h.fill(0.0);
        for t in 0..l {
            let row = (bi * l + t) * dim;
            for k in 0..dim {
                let xk = x[row + k];
                h[k] = a[k] * h[k] + b[k] * xk;
                y[row + k] = c[k] * h[k] + d[k] * xk;
            }
        }
    }
    pool::give(h);
}

/// Backward for the upstream `dy` (B, L, D): recomputes the states, then runs the reverse
/// recurrence (see the module docs), adding into every gradient.
///
/// # Panics
/// If a length disagrees with `dims`.
#[track_caller]
pub fn lti_bwd(dims: &LtiDims, args: &LtiArgs, dy: &[f32], grads: LtiGrads) {
    args.check("lti_bwd", dims);
    let LtiDims { batch, seqlen: l, dim } = *dims;
    assert_eq!(dy.len(), dims.n_bld(), "lti_bwd: dy must be (B, L, D) = {dims:?}");
    assert_eq!(grads.dx.len(), dims.n_bld(), "lti_bwd: dx must be (B, L, D) = {dims:?}");
    let LtiArgs { x, a, b, c, d } = *args;
    let LtiGrads { dx, da, db, dc, dd } = grads;
    let mut hs = pool::take((l + 1) * dim);
    let mut g = pool::take(dim);
    for bi in 0..batch {
        for t in 0..l {
            let row = (bi * l + t) * dim;
            for k in 0..dim {
                hs[(t + 1) * dim + k] = a[k] * hs[t * dim + k] + b[k] * x[row + k];
            }
        }
        g.fill(0.0);
        for t in (0..l).rev() {
            let row = (bi * l + t) * dim;
            for k in 0..dim {
                let (xk, dyk, h, hp) = (x[row + k], dy[row + k], hs[(t + 1) * dim + k], hs[t * dim + k]);
                dc[k] += dyk * h;
                dd[k] += dyk * xk;
                g[k] += c[k] * dyk;
                da[k] += g[k] * hp;
                db[k] += g[k] * xk;
                dx[row + k] += g[k] * b[k] + d[k] * dyk;
                g[k] *= a[k];
            }
        }
    }
    pool::give(hs);
    pool::give(g);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::lti::lti as reference;
    use crate::testing::{Rng, assert_rel_max, numeric_grad, to_f32, to_f64};

    #[test]
    fn forward_and_backward_match_reference() {
        let (bsz, l, dim) = (2, 9, 5);
        let mut r = Rng(3);
        let x = r.vec(bsz * l * dim, -1.0, 1.0);
        let p: Vec<Vec<f64>> = (0..4).map(|i| r.vec(dim, if i == 0 { -0.9 } else { -1.0 }, 0.9)).collect();
        let dy = r.vec(bsz * l * dim, -1.0, 1.0);
        let (xf, pf, dyf) = (to_f32(&x), p.iter().map(|v| to_f32(v)).collect::<Vec<_>>(), to_f32(&dy));
        let dims = LtiDims::new(bsz, l, dim);
        let args = LtiArgs { x: &xf, a: &pf[0], b: &pf[1], c: &pf[2], d: &pf[3] };
        let mut y = vec![f32::NAN; dims.n_bld()];
        lti_fwd(&dims, &args, &mut y);
        let ps = |p: &[Vec<f64>]| -> [Vec<f64>; 4] { std::array::from_fn(|i| p[i].clone()) };
        let run = |x: &[f64], p: &[Vec<f64>; 4]| reference(x, [&p[0], &p[1], &p[2], &p[3]], (bsz, l, dim));
        assert_rel_max("y", &y, &run(&x, &ps(&p)), 1e-5, 1.0);
        let mut dx = vec![1.0f32; dims.n_bld()];
        let mut dp: Vec<Vec<f32>> = vec![vec![1.0f32; dim]; 4];
        let [da, db, dc, dd] = &mut dp[..] else { unreachable!() };
        lti_bwd(&dims, &args, &dyf, LtiGrads { dx: &mut dx, da, db, dc, dd });
        let loss = |x: &[f64], p: &[Vec<f64>; 4]| run(x, p).iter().zip(&dy).map(|(a, b)| a * b).sum::<f64>();
        let less1 = |v: &[f32]| v.iter().map(|g| g - 1.0).collect::<Vec<f32>>();
        assert_rel_max("dx", &less1(&dx), &numeric_grad(&x, 1e-6, |xi| loss(xi, &ps(&p))), 1e-4, 1e-3);
        for i in 0..4 {
            let want = numeric_grad(&p[i], 1e-6, |pi| {
                let mut q = ps(&p);
                q[i] = pi.to_vec();
                loss(&x, &q)
            });
            assert_rel_max(&format!("d param {i}"), &less1(&dp[i]), &want, 1e-4, 1e-3);
        }
    }

    /// A sequence cut into chunks of every size, the state carried, equals the whole forward.
    #[test]
    fn chunks_carrying_the_state_match_the_sequence_forward() {
        let (bsz, l, dim) = (2, 11, 5);
        let dims = LtiDims::new(bsz, l, dim);
        let mut r = Rng(7);
        let v = |r: &mut Rng, n, lo, hi| to_f32(&r.vec(n, lo, hi));
        let x = v(&mut r, dims.n_bld(), -1.0, 1.0);
        let (a, b, c, d) = (
            v(&mut r, dim, 0.5, 0.99),
            v(&mut r, dim, -1.0, 1.0),
            v(&mut r, dim, -1.0, 1.0),
            v(&mut r, dim, -1.0, 1.0),
        );
        let mut whole = vec![0.0; dims.n_bld()];
        lti_fwd(&dims, &LtiArgs { x: &x, a: &a, b: &b, c: &c, d: &d }, &mut whole);
        let mut last = vec![0.0; bsz * dim];
        lti_final_state(&dims, &a, &b, &x, &mut last);
        for chunk in 1..=l {
            let mut h = vec![0.0; bsz * dim];
            let mut y = vec![f32::NAN; dims.n_bld()];
            for t0 in (0..l).step_by(chunk) {
                let lc = chunk.min(l - t0);
                let rows = |v: &[f32]| -> Vec<f32> {
                    (0..bsz)
                        .flat_map(|bi| v[(bi * l + t0) * dim..(bi * l + t0 + lc) * dim].to_vec())
                        .collect()
                };
                let xc = rows(&x);
                let mut yc = vec![0.0; bsz * lc * dim];
                lti_chunk(
                    &LtiDims::new(bsz, lc, dim),
                    &LtiArgs { x: &xc, a: &a, b: &b, c: &c, d: &d },
                    &mut h,
                    &mut yc,
                );
                for bi in 0..bsz {
                    y[(bi * l + t0) * dim..(bi * l + t0 + lc) * dim]
                        .copy_from_slice(&yc[bi * lc * dim..(bi + 1) * lc * dim]);
                }
            }
            assert_rel_max(&format!("chunk {chunk}: y"), &y, &to_f64(&whole), 1e-6, 1e-6);
            assert_rel_max(&format!("chunk {chunk}: h"), &h, &to_f64(&last), 1e-6, 1e-6);
        }
    }

    #[test]
    fn steps_and_final_state_match_the_sequence_forward() {
        let (bsz, l, dim) = (3, 7, 5);
        let mut rng = Rng(21);
        let x = to_f32(&rng.vec(bsz * l * dim, -1.0, 1.0));
        let [a, b, c, d] = [0.5, 1.0, 1.0, 1.0].map(|s| to_f32(&rng.vec(dim, -s, s)));
        let dims = LtiDims::new(bsz, l, dim);
        let mut y = vec![0.0f32; bsz * l * dim];
        lti_fwd(&dims, &LtiArgs { x: &x, a: &a, b: &b, c: &c, d: &d }, &mut y);
        let mut h = vec![0.0f32; bsz * dim];
        let (mut xt, mut yt) = (vec![0.0f32; bsz * dim], vec![0.0f32; bsz * dim]);
        for t in 0..l {
            for bi in 0..bsz {
                xt[bi * dim..(bi + 1) * dim].copy_from_slice(&x[(bi * l + t) * dim..][..dim]);
            }
            lti_step(&LtiArgs { x: &xt, a: &a, b: &b, c: &c, d: &d }, &mut h, &mut yt);
            for bi in 0..bsz {
                let want: Vec<f64> = y[(bi * l + t) * dim..][..dim].iter().map(|&v| v as f64).collect();
                assert_rel_max("lti_step y", &yt[bi * dim..(bi + 1) * dim], &want, 1e-6, 1e-6);
            }
        }
        let mut last = vec![1.0f32; bsz * dim];
        lti_final_state(&dims, &a, &b, &x, &mut last);
        let want: Vec<f64> = h.iter().map(|&v| v as f64).collect();
        assert_rel_max("lti_final_state", &last, &want, 1e-6, 1e-6);
    }
}
