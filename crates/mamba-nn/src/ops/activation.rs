//! Element-wise activations: `silu`, `softplus`, `exp`.

use crate::tape::{Backward, Tape, Var};
use crate::tensor::{Tensor, data, data_mut};

/// Logistic sigmoid `1 / (1 + e^{−v})`.
#[inline]
pub(crate) fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

/// `v · σ(v)`.
#[inline]
pub(crate) fn silu_f(v: f32) -> f32 {
    v * sigmoid(v)
}

/// `out[j] = σ(z[j])` for a whole row, eight lanes at a time (SIMD `exp`).
pub(crate) fn sigmoid_row(z: &[f32], out: &mut [f32]) {
    use ssm_kernel::simd::{self, W};
    for (zc, oc) in z.chunks(W).zip(out.chunks_mut(W)) {
        simd::store(oc, simd::sigmoid(simd::load(zc)));
    }
}

/// `d silu / dv = σ(v) · (1 + v · (1 − σ(v)))`.
#[inline]
pub(crate) fn silu_grad(v: f32) -> f32 {
    let s = sigmoid(v);
    s * (1.0 + v * (1.0 - s))
}

/// Applies `f` element-wise into a new tensor shaped like `x`.
fn map(x: &Tensor, f: impl Fn(f32) -> f32) -> Tensor {
    let mut y = crate::tensor::for_overwrite(x.shape());
    for (o, &v) in crate::tensor::data_mut(&mut y).iter_mut().zip(crate::tensor::data(x)) {
        *o = f(v);
    }
    y
}

/// `dx += dy ⊙ g(x, y)` element-wise, when `dx` is wanted.
fn chain(
    inputs: &[&Tensor],
    out: &Tensor,
    dout: &Tensor,
    dinputs: &mut [Option<&mut Tensor>],
    g: impl Fn(f32, f32) -> f32,
) {
    if let Some(dx) = dinputs[0].as_deref_mut() {
        let it = data(inputs[0]).iter().zip(data(out)).zip(data(dout));
        for (gx, ((&x, &y), &dy)) in data_mut(dx).iter_mut().zip(it) {
            *gx += dy * g(x, y);
        }
    }
}

/// `y = silu(x) = x · σ(x)` element-wise. Shapes: `y` like `x`.
pub fn silu(tape: &mut Tape, x: Var) -> Var {
    let y = map(tape.value(x), silu_f);
    tape.push(y, &[x], SiluBackward)
}

/// Nothing saved: `dx += dy · σ(x)(1 + x(1 − σ(x)))`.
struct SiluBackward;

impl Backward for SiluBackward {
    fn name(&self) -> &'static str {
        "silu"
    }

    fn backward(&self, inputs: &[&Tensor], out: &Tensor, dout: &Tensor, dinputs: &mut [Option<&mut Tensor>]) {
        chain(inputs, out, dout, dinputs, |x, _| silu_grad(x));
    }
}

/// Softplus as PyTorch computes it (threshold 20): `x` for `x > 20`, else `ln(1 + eˣ)`.
#[inline]
pub(crate) fn softplus_f(v: f32) -> f32 {
    if v > 20.0 { v } else { v.exp().ln_1p() }
}

/// `y = softplus(x)` element-wise (`x` passes through above 20, as in PyTorch). Shapes: `y`
/// like `x`.
pub fn softplus(tape: &mut Tape, x: Var) -> Var {
    let y = map(tape.value(x), softplus_f);
    tape.push(y, &[x], SoftplusBackward)
}

/// Nothing saved: `dx += dy · σ(x)` (`dy` above the threshold).
struct SoftplusBackward;

impl Backward for SoftplusBackward {
    fn name(&self) -> &'static str {
        "softplus"
    }

    fn backward(&self, inputs: &[&Tensor], out: &Tensor, dout: &Tensor, dinputs: &mut [Option<&mut Tensor>]) {
        chain(inputs, out, dout, dinputs, |x, _| if x > 20.0 { 1.0 } else { sigmoid(x) });
    }
}

/// `y = eˣ` element-wise. Shapes: `y` like `x`.
pub fn exp(tape: &mut Tape, x: Var) -> Var {
    let y = map(tape.value(x), f32::exp);
    tape.push(y, &[x], ExpBackward)
}

/// Nothing saved (the output is on the tape): `dx += dy · y`.
struct ExpBackward;

impl Backward for ExpBackward {
    fn name(&self) -> &'static str {
        "exp"
    }

    fn backward(&self, inputs: &[&Tensor], out: &Tensor, dout: &Tensor, dinputs: &mut [Option<&mut Tensor>]) {
        chain(inputs, out, dout, dinputs, |_, y| y);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::check::{check_op, random};
    use crate::params::ParamStore;
    use crate::tensor::from_vec;

    fn sig(v: f64) -> f64 {
        1.0 / (1.0 + (-v).exp())
    }

    #[test]
    fn silu_backward_matches_finite_differences() {
        let x = random(&[3, 7], 1) * 4.0;
        check_op(vec![x], |t, v| silu(t, v[0]), |x| x[0].iter().map(|&v| v * sig(v)).collect(), 1e-4);
    }

    #[test]
    fn softplus_backward_matches_finite_differences() {
        let x = random(&[3, 7], 2) * 6.0;
        check_op(
            vec![x],
            |t, v| softplus(t, v[0]),
            |x| x[0].iter().map(|&v| v.exp().ln_1p()).collect(),
            1e-4,
        );
    }

    #[test]
    fn exp_backward_matches_finite_differences() {
        check_op(
            vec![random(&[11], 3)],
            |t, v| exp(t, v[0]),
            |x| x[0].iter().map(|v| v.exp()).collect(),
            1e-4,
        );
    }

    #[test]
    fn softplus_passes_large_values_through() {
        let store = ParamStore::new();
        let mut tape = Tape::new(&store);
        let x = tape.constant(from_vec(&[3], vec![20.5, 100.0, -100.0]));
        let y = softplus(&mut tape, x);
        assert_eq!(data(tape.value(y)), &[20.5, 100.0, (-100.0f32).exp()]);
    }
}
