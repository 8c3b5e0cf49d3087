//! `y = x Wᵀ + b`: a linear layer in PyTorch's weight layout.

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
    let (xv, wv) = (tape.value(x), tape.value(w));
    let (m, k) = rows_cols(xv.shape());
    assert_eq!(wv.ndim(), 2, "linear: weight must be (out, in), got shape {:?}", wv.shape());
    let (n, kw) = (wv.shape()[0], wv.shape()[1]);
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
    gemm((m, k, n), 1.0, data(xv), (k, 1), data(wv), (1, k), 0.0, data_mut(&mut y), (n, 1));
    let mut inputs = InputList::new();
    let at = LinearInputs { x: inputs.push(x), w: inputs.push(w), b: inputs.push_opt(b) };
    if let Some(b) = b {
        let bv = tape.value(b);
        assert_eq!(bv.shape(), &[n], "linear: bias must be ({n}), got {:?}", bv.shape());
        let bias = data(bv);
        for row in data_mut(&mut y).chunks_exact_mut(n) {
            for (o, bb) in row.iter_mut().zip(bias) {
                *o += bb;
            }
        }
    }
    tape.push(y, inputs.vars(), LinearBackward { at, m, k, n })
}

/// Where `linear`'s inputs sit in its input list.
#[derive(Clone, Copy, Debug)]
struct LinearInputs {
    x: Slot,
    w: Slot,
    b: Option<Slot>,
}

/// Saved: the inputs' positions and the sizes, `m` rows, `k` in-features, `n` out-features.
struct LinearBackward {
    at: LinearInputs,
    m: usize,
    k: usize,
    n: usize,
}

impl Backward for LinearBackward {
    fn name(&self) -> &'static str {
        "linear"
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
        let LinearBackward { at, m, k, n } = *self;
        let (x, w, dy) = (data(at.x.value(inputs)), data(at.w.value(inputs)), data(dout));
        // dx (m, k) (+)= dy (m, n) · W (n, k)
        if let Some(dx) = at.x.grad(grads) {
            let beta = dx.beta();
            let dx = if n == 0 { dx.zero_if_overwrite() } else { dx.into_data() };
            gemm((m, n, k), 1.0, dy, (n, 1), w, (k, 1), beta, dx, (k, 1));
        }
        // dW (n, k) (+)= dyᵀ (n, m) · x (m, k)
        if let Some(dw) = at.w.grad(grads) {
            let beta = dw.beta();
            let dw = if m == 0 { dw.zero_if_overwrite() } else { dw.into_data() };
            gemm((n, m, k), 1.0, dy, (1, n), x, (k, 1), beta, dw, (k, 1));
        }
        // db (n) (+)= Σ_rows dy
        if let Some(db) = at.b.and_then(|b| b.grad(grads)) {
            let db = db.zero_if_overwrite();
            for row in dy.chunks_exact(n) {
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
    }
}
