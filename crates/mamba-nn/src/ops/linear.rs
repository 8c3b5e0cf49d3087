//! `y = x Wᵀ + b`: a linear layer in PyTorch's weight layout, or a block of its outputs.

use std::ops::Range;

use ssm_kernel::gemm::gemm_par as gemm;

use crate::tape::{Backward, InputGrad, InputList, Slot, Tape, Var};
use crate::tensor::{Tensor, data, data_mut, for_overwrite, rows_cols, zeros};

/// `y = x Wᵀ (+ b)`.
///
/// Shapes: `x` (…, in), `w` (out, in) — PyTorch's `Linear.weight` — and `b` (out); `y` (…, out).
/// One GEMM through `matrixmultiply`, rows split over the rayon pool (the transpose is a stride
/// swap).
///
/// # Panics
/// If the shapes disagree (the message names them).
#[track_caller]
pub fn linear(tape: &mut Tape, x: Var, w: Var, b: Option<Var>) -> Var {
    let n = tape.value(w).shape().first().copied().unwrap_or(0);
    linear_rows(tape, x, w, b, 0..n)
}

/// Outputs `rows` of [`linear`]: `y = x W[rows]ᵀ (+ b[rows])`, without computing the others.
///
/// Shapes: `x` (…, in), `w` (out, in), `b` (out); `y` (…, rows.len()). The gradients of `w`
/// and `b` reach their rows `rows` only. Two calls on complementary blocks give the halves
/// of a layer whose output is split (Mamba-1's `in_proj` → x | z) without materialising the
/// whole output and copying the halves out of it; their `w` gradients add up to the whole
/// layer's.
///
/// # Panics
/// If the shapes disagree or `rows` is not within `0..out` (the message names them).
#[track_caller]
pub fn linear_rows(tape: &mut Tape, x: Var, w: Var, b: Option<Var>, rows: Range<usize>) -> Var {
    let (xv, wv) = (tape.value(x), tape.value(w));
    let (m, k) = rows_cols(xv.shape());
    assert_eq!(wv.ndim(), 2, "linear: weight must be (out, in), got shape {:?}", wv.shape());
    let (nw, kw) = (wv.shape()[0], wv.shape()[1]);
    assert!(
        rows.start <= rows.end && rows.end <= nw,
        "linear: output rows {rows:?} outside a weight of {nw} rows (w {:?})",
        wv.shape()
    );
    let n = rows.len();
    assert_eq!(
        k,
        kw,
        "linear: input features {k} (x {:?}) ≠ weight in-features {kw} (w {:?})",
        xv.shape(),
        wv.shape()
    );
    let mut out_shape = xv.shape().to_vec();
    *out_shape.last_mut().expect("x has a last dimension") = n;
    // β = 0 overwrites every element of y (when k > 0; an empty product leaves it zero).
    let mut y = if k > 0 { for_overwrite(&out_shape) } else { zeros(&out_shape) };
    let wr = &data(wv)[rows.start * k..rows.end * k];
    gemm((m, k, n), 1.0, data(xv), (k, 1), wr, (1, k), 0.0, data_mut(&mut y), (n, 1));
    let mut inputs = InputList::new();
    let at = LinearInputs { x: inputs.push(x), w: inputs.push(w), b: inputs.push_opt(b) };
    if let Some(b) = b {
        let bv = tape.value(b);
        assert_eq!(bv.shape(), &[nw], "linear: bias must be ({nw}), got {:?}", bv.shape());
        let bias = &data(bv)[rows.clone()];
        for row in data_mut(&mut y).chunks_exact_mut(n.max(1)) {
            for (o, bb) in row.iter_mut().zip(bias) {
                *o += bb;
            }
        }
    }
    tape.push(y, inputs.vars(), LinearBackward { at, m, k, rows })
}

/// Where `linear`'s inputs sit in its input list.
#[derive(Clone, Copy, Debug)]
struct LinearInputs {
    x: Slot,
    w: Slot,
    b: Option<Slot>,
}

/// Saved: the inputs' positions and the sizes, `m` rows, `k` in-features, and the weight's
/// output rows used.
struct LinearBackward {
    at: LinearInputs,
    m: usize,
    k: usize,
    rows: Range<usize>,
}

/// The rows `rows` (of `width` values each) of a gradient buffer, and whether they are to be
/// overwritten (they then hold no gradient yet, and its other rows are zeroed here).
fn grad_rows<'a>(g: InputGrad<'a>, rows: &Range<usize>, width: usize) -> (bool, &'a mut [f32]) {
    let over = g.overwrites();
    let buf = g.into_data();
    if over {
        buf[..rows.start * width].fill(0.0);
        buf[rows.end * width..].fill(0.0);
    }
    (over, &mut buf[rows.start * width..rows.end * width])
}

impl Backward for LinearBackward {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn reads_output(&self) -> bool {
        false
    }

    /// `dx` and `dW` are GEMMs with the slot's β (a fresh buffer is written, not zero-filled and
    /// read); `db` sums the rows of `dy`.
    fn backward(
        &self,
        inputs: &[&Tensor],
        _out: &Tensor,
        dout: &Tensor,
        grads: &mut [Option<InputGrad<'_>>],
    ) {
        let LinearBackward { at, m, k, ref rows } = *self;
        let n = rows.len();
        let (x, dy) = (data(at.x.value(inputs)), data(dout));
        let w = &data(at.w.value(inputs))[rows.start * k..rows.end * k];
        // dx (m, k) (+)= dy (m, n) · W (n, k)
        if let Some(dx) = at.x.grad(grads) {
            let beta = dx.beta();
            let dx = if n == 0 { dx.zero_if_overwrite() } else { dx.into_data() };
            gemm((m, n, k), 1.0, dy, (n, 1), w, (k, 1), beta, dx, (k, 1));
        }
        // dW[rows] (n, k) (+)= dyᵀ (n, m) · x (m, k)
        if let Some(dw) = at.w.grad(grads) {
            let (over, dw) = grad_rows(dw, rows, k);
            if m == 0 {
                if over {
                    dw.fill(0.0);
                }
            } else {
                // β = 0 writes every element without reading it.
                gemm((n, m, k), 1.0, dy, (1, n), x, (k, 1), if over { 0.0 } else { 1.0 }, dw, (k, 1));
            }
        }
        // db[rows] (n) (+)= Σ_rows dy
        if let Some(db) = at.b.and_then(|b| b.grad(grads)) {
            let (over, db) = grad_rows(db, rows, 1);
            if over {
                db.fill(0.0);
            }
            for row in dy.chunks_exact(n.max(1)).take(m) {
                for (g, d) in db.iter_mut().zip(row) {
                    *g += d;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::check::{check_accumulates, check_op, random};

    /// f64 reference: y[r, j] = Σ_i x[r, i] w[j, i] + b[j].
    fn reference(x: &[f64], w: &[f64], b: Option<&[f64]>, (m, k, n): (usize, usize, usize)) -> Vec<f64> {
        let mut y = vec![0.0; m * n];
        for r in 0..m {
            for j in 0..n {
                y[r * n + j] =
                    (0..k).map(|i| x[r * k + i] * w[j * k + i]).sum::<f64>() + b.map_or(0.0, |b| b[j]);
            }
        }
        y
    }

    #[test]
    fn backward_matches_finite_differences() {
        for &(with_bias, shape) in &[(true, [2usize, 3, 5]), (false, [1, 4, 7])] {
            let (m, k, n) = (shape[0] * shape[1], shape[2], 6);
            let mut inputs = vec![random(&[shape[0], shape[1], k], 1), random(&[n, k], 2)];
            if with_bias {
                inputs.push(random(&[n], 3));
            }
            check_op(
                inputs,
                |tape, v| linear(tape, v[0], v[1], v.get(2).copied()),
                |x| reference(&x[0], &x[1], x.get(2).map(|b| b.as_slice()), (m, k, n)),
                1e-4,
            );
        }
    }

    #[test]
    #[should_panic(expected = "linear: input features 5 (x [2, 5]) ≠ weight in-features 4 (w [3, 4])")]
    fn shape_mismatch_names_both_shapes() {
        let store = crate::params::ParamStore::new();
        let mut tape = Tape::new(&store);
        let x = tape.constant(zeros(&[2, 5]));
        let w = tape.constant(zeros(&[3, 4]));
        linear(&mut tape, x, w, None);
    }

    #[test]
    fn fresh_and_accumulated_gradients() {
        let ins = vec![random(&[3, 4, 5], 1), random(&[6, 5], 2), random(&[6], 3)];
        check_accumulates(ins, |t, v| linear(t, v[0], v[1], Some(v[2])));
        let ins = vec![random(&[3, 4, 5], 1), random(&[6, 5], 2), random(&[6], 3)];
        check_accumulates(ins, |t, v| linear_rows(t, v[0], v[1], Some(v[2]), 2..5));
    }

    /// A block of outputs — first, middle, last, empty — against finite differences of the f64
    /// reference on those rows: the weight's and bias's other rows get zero gradients.
    #[test]
    fn output_rows_match_finite_differences() {
        let (m, k, n) = (6, 5, 7);
        for rows in [0..3, 2..5, 4..7, 3..3] {
            for with_bias in [true, false] {
                let mut inputs = vec![random(&[2, 3, k], 4), random(&[n, k], 5)];
                if with_bias {
                    inputs.push(random(&[n], 6));
                }
                let r = rows.clone();
                check_op(
                    inputs,
                    |tape, v| linear_rows(tape, v[0], v[1], v.get(2).copied(), rows.clone()),
                    |x| {
                        let full = reference(&x[0], &x[1], x.get(2).map(|b| b.as_slice()), (m, k, n));
                        full.chunks(n).flat_map(|row| row[r.clone()].to_vec()).collect()
                    },
                    1e-4,
                );
            }
        }
    }

    /// Two complementary blocks, joined, are the whole layer: values, and the gradients that
    /// both blocks add into the same weight and bias, against finite differences.
    #[test]
    fn two_blocks_make_the_whole_layer() {
        let (m, k, n) = (4, 5, 8);
        check_op(
            vec![random(&[m, k], 7), random(&[n, k], 8), random(&[n], 9)],
            |tape, v| {
                let lo = linear_rows(tape, v[0], v[1], Some(v[2]), 0..3);
                let hi = linear_rows(tape, v[0], v[1], Some(v[2]), 3..8);
                crate::ops::concat_last(tape, &[lo, hi])
            },
            |x| reference(&x[0], &x[1], Some(&x[2]), (m, k, n)),
            1e-4,
        );
    }
}
