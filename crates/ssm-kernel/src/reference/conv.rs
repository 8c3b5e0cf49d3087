//! Reference causal depthwise conv: one output element at a time.

use crate::Real;
use crate::conv::{ConvArgs, ConvDims, ConvGrads, ConvOut};
use crate::conv::{check_step, check_upstream};

/// Whether input position `s ≤ t` of batch row `b` belongs to the sequence of position `t`: no
/// reset at any position in `s + 1 ..= t`.
fn same_seq<T>(dims: &ConvDims, args: &ConvArgs<T>, b: usize, s: usize, t: usize) -> bool {
    args.resets.is_none_or(|r| (s + 1..=t).all(|p| !r[b * dims.seqlen + p]))
}

/// Pre-activation output `bias[c] + Σ_k w[c, k] · x[b, t − (K−1) + k, c]`.
fn pre<T: Real>(dims: &ConvDims, args: &ConvArgs<T>, b: usize, t: usize, c: usize) -> T {
    let ConvDims { seqlen: l, channels: ch, width: k, .. } = *dims;
    let mut acc = args.bias.map_or(T::zero(), |bias| bias[c]);
    for kk in 0..k {
        // source time t − (K−1) + kk, skipped when negative or in an earlier sequence
        if t + kk + 1 >= k && same_seq(dims, args, b, t + kk + 1 - k, t) {
            let s = t + kk + 1 - k;
            acc += args.weight[c * k + kk] * args.x[(b * l + s) * ch + c];
        }
    }
    acc
}

/// Forward conv. Layouts: see [`ConvArgs`] and [`ConvOut`].
#[track_caller]
pub fn conv1d_fwd<T: Real>(dims: &ConvDims, args: &ConvArgs<T>, out: ConvOut<T>) {
    const K: &str = "reference::conv::conv1d_fwd";
    args.check(K, dims);
    out.check(K, dims);
    let ConvDims { batch, seqlen: l, channels: ch, width: k } = *dims;
    let ConvOut { y, state_out } = out;
    for b in 0..batch {
        for t in 0..l {
            for c in 0..ch {
                let v = pre(dims, args, b, t, c);
                y[(b * l + t) * ch + c] = if args.silu { v.silu() } else { v };
            }
        }
    }
    if let Some(st) = state_out {
        for b in 0..batch {
            for c in 0..ch {
                for kk in 0..k {
                    // position L − K + kk
                    let inside = l + kk >= k && same_seq(dims, args, b, l + kk - k, l - 1);
                    st[(b * ch + c) * k + kk] =
                        if inside { args.x[(b * l + l + kk - k) * ch + c] } else { T::zero() };
                }
            }
        }
    }
}

/// Backward conv: adds the gradients of `Σ dy·y` into `grads`. `dy` is (B, L, C). The
/// pre-activation is recomputed for the SiLU derivative.
#[track_caller]
pub fn conv1d_bwd<T: Real>(dims: &ConvDims, args: &ConvArgs<T>, dy: &[T], grads: ConvGrads<T>) {
    const K: &str = "reference::conv::conv1d_bwd";
    args.check(K, dims);
    check_upstream(K, dims, dy);
    grads.check(K, dims);
    let ConvDims { batch, seqlen: l, channels: ch, width: k } = *dims;
    let ConvGrads { dx, dweight, dbias } = grads;
    let mut dbias = if args.bias.is_some() { dbias } else { None };
    for b in 0..batch {
        for t in 0..l {
            for c in 0..ch {
                let i = (b * l + t) * ch + c;
                let g = if args.silu { dy[i] * pre(dims, args, b, t, c).silu_grad() } else { dy[i] };
                if let Some(db) = dbias.as_deref_mut() {
                    db[c] += g;
                }
                for kk in 0..k {
                    if t + kk + 1 >= k && same_seq(dims, args, b, t + kk + 1 - k, t) {
                        let s = (b * l + t + kk + 1 - k) * ch + c;
                        dweight[c * k + kk] += g * args.x[s];
                        dx[s] += g * args.weight[c * k + kk];
                    }
                }
            }
        }
    }
}

/// One recurrent step for every batch row. `dims.seqlen` must be 1, so `args.x` is (B, C);
/// `state` (B, C, K) holds the last `K` inputs of every channel, oldest first, and is updated in
/// place (shifted left by one, `x` appended); `y` (B, C) is overwritten with
/// `bias + Σ_k state[k] · w[k]` (then SiLU when `args.silu`).
#[track_caller]
pub fn conv1d_step<T: Real>(dims: &ConvDims, args: &ConvArgs<T>, state: &mut [T], y: &mut [T]) {
    const K: &str = "reference::conv::conv1d_step";
    check_step(K, dims, args, state, y);
    let ConvDims { batch, channels: ch, width: k, .. } = *dims;
    for b in 0..batch {
        for c in 0..ch {
            let st = &mut state[(b * ch + c) * k..(b * ch + c + 1) * k];
            for kk in 1..k {
                st[kk - 1] = st[kk];
            }
            st[k - 1] = args.x[b * ch + c];
            let mut acc = args.bias.map_or(T::zero(), |bias| bias[c]);
            for kk in 0..k {
                acc += st[kk] * args.weight[c * k + kk];
            }
            y[b * ch + c] = if args.silu { acc.silu() } else { acc };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Rng, assert_close, dot, numeric_grad};

    /// Random f64 problem: (x, weight, bias).
    fn problem(dims: &ConvDims, seed: u64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let mut r = Rng(seed);
        (r.vec(dims.n_blc(), -1.5, 1.5), r.vec(dims.n_ck(), -1.0, 1.0), r.vec(dims.channels, -0.5, 0.5))
    }

    fn fwd(dims: &ConvDims, x: &[f64], w: &[f64], bias: Option<&[f64]>, silu: bool) -> Vec<f64> {
        let mut y = vec![0.0; dims.n_blc()];
        let args = ConvArgs { x, weight: w, bias, silu, resets: None };
        conv1d_fwd(dims, &args, ConvOut { y: &mut y, state_out: None });
        y
    }

    #[test]
    fn hand_computed_example() {
        // B=1, L=3, C=1, K=2: y_t = b + w0·x_{t−1} + w1·x_t
        let dims = ConvDims::new(1, 3, 1, 2);
        let x = [1.0f64, 2.0, 3.0];
        let w = [10.0, 1.0];
        let mut y = [0.0; 3];
        let mut st = [0.0; 2];
        let args = ConvArgs { bias: Some(&[0.5][..]), ..ConvArgs::new(&x[..], &w[..]) };
        conv1d_fwd(&dims, &args, ConvOut { y: &mut y, state_out: Some(&mut st) });
        assert_eq!(y, [1.5, 12.5, 23.5]);
        assert_eq!(st, [2.0, 3.0]);
    }

    #[test]
    fn reference_backward_matches_finite_differences() {
        for (i, &(b, l, c, k, with_bias, silu)) in [
            (2, 5, 3, 4, true, true),
            (1, 2, 2, 4, false, true),
            (2, 7, 1, 3, true, false),
            (1, 1, 3, 1, true, true),
            (3, 4, 2, 5, false, false),
        ]
        .iter()
        .enumerate()
        {
            let dims = ConvDims::new(b, l, c, k);
            let (x, w, bias) = problem(&dims, 100 + i as u64);
            let wy = Rng(7 + i as u64).vec(dims.n_blc(), -1.0, 1.0);
            let bias_opt = with_bias.then_some(&bias[..]);
            let mut dx = vec![0.0; dims.n_blc()];
            let mut dw = vec![0.0; dims.n_ck()];
            let mut db = vec![0.0; c];
            let args = ConvArgs { x: &x, weight: &w, bias: bias_opt, silu, resets: None };
            conv1d_bwd(&dims, &args, &wy, ConvGrads { dx: &mut dx, dweight: &mut dw, dbias: Some(&mut db) });
            let eps = 1e-6;
            let ndx = numeric_grad(&x, eps, |x| dot(&wy, &fwd(&dims, x, &w, bias_opt, silu)));
            let ndw = numeric_grad(&w, eps, |w| dot(&wy, &fwd(&dims, &x, w, bias_opt, silu)));
            let ndb = numeric_grad(&bias, eps, |bb| dot(&wy, &fwd(&dims, &x, &w, Some(bb), silu)));
            assert_close("dx", &dx, &ndx, 1e-6, 1e-7);
            assert_close("dweight", &dw, &ndw, 1e-6, 1e-7);
            if with_bias {
                assert_close("dbias", &db, &ndb, 1e-6, 1e-7);
            }
        }
    }

    #[test]
    #[should_panic(expected = "`bias` has 2 elements")]
    fn wrong_bias_length_panics_naming_it() {
        let dims = ConvDims::new(1, 2, 3, 2);
        let mut y = vec![0.0f64; 6];
        let args = ConvArgs { bias: Some(&[0.0, 0.0][..]), ..ConvArgs::new(&[0.0; 6][..], &[0.0; 6][..]) };
        conv1d_fwd(&dims, &args, ConvOut { y: &mut y, state_out: None });
    }
}
