//! Element-wise activations: `silu`, `softplus`, `exp`.

use ssm_kernel::activation::{silu_grad, softplus_grad};

use crate::tape::{Backward, InputGrad, InputList, Slot, Tape, Var};
use crate::tensor::{Tensor, data, data_mut, for_overwrite};

/// Applies `f` element-wise into a new tensor shaped like `x`.
fn map(x: &Tensor, f: impl Fn(f32) -> f32) -> Tensor {
    let mut y = for_overwrite(x.shape());
    for (o, &v) in data_mut(&mut y).iter_mut().zip(data(x)) {
        *o = f(v);
    }
    y
}

/// Pushes the element-wise op `f(x)` with the backward `g`.
fn unary(tape: &mut Tape, x: Var, f: impl Fn(f32) -> f32, name: &'static str, g: fn(f32, f32) -> f32) -> Var {
    let y = map(tape.value(x), f);
    let mut inputs = InputList::new();
    let x = inputs.push(x);
    tape.push(y, inputs.vars(), Elementwise { x, name, g })
}

/// The backward of an element-wise op: `dx (+)= dy ⊙ g(x, y)`. Saved: the input's position,
/// the op's name and its derivative `g(x, y)` (nothing else: the input and output are on the
/// tape).
struct Elementwise {
    x: Slot,
    name: &'static str,
    g: fn(f32, f32) -> f32,
}

impl Backward for Elementwise {
    fn name(&self) -> &'static str {
        self.name
    }

    fn backward(&self, inputs: &[&Tensor], out: &Tensor, dout: &Tensor, grads: &mut [Option<InputGrad<'_>>]) {
        let Some(mut dx) = self.x.grad(grads) else { return };
        let x = data(self.x.value(inputs));
        let g = self.g;
        dx.add_or_write_each(x.iter().zip(data(out)).zip(data(dout)).map(|((&x, &y), &dy)| dy * g(x, y)));
    }
}

/// `y = silu(x) = x · σ(x)` element-wise. Shapes: `y` like `x`. Backward:
/// `dx = dy · σ(x)(1 + x(1 − σ(x)))`.
pub fn silu(tape: &mut Tape, x: Var) -> Var {
    unary(tape, x, ssm_kernel::activation::silu, "silu", |x, _| silu_grad(x))
}

/// `y = softplus(x)` element-wise (`x` passes through above 20, as in PyTorch). Shapes: `y`
/// like `x`. Backward: `dx = dy · σ(x)` (`dy` above the threshold).
pub fn softplus(tape: &mut Tape, x: Var) -> Var {
    unary(tape, x, ssm_kernel::activation::softplus, "softplus", |x, _| softplus_grad(x))
}

/// `y = eˣ` element-wise. Shapes: `y` like `x`. Backward: `dx = dy · y`.
pub fn exp(tape: &mut Tape, x: Var) -> Var {
    unary(tape, x, f32::exp, "exp", |_, y| y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::check::{check_accumulates, check_op, random};
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

    #[test]
    fn fresh_and_accumulated_gradients() {
        check_accumulates(vec![random(&[3, 7], 4) * 3.0], |t, v| silu(t, v[0]));
        check_accumulates(vec![random(&[3, 7], 5) * 3.0], |t, v| softplus(t, v[0]));
        check_accumulates(vec![random(&[3, 7], 6)], |t, v| exp(t, v[0]));
    }
}
