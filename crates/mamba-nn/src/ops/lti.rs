//! The linear time-invariant recurrence — the non-selective baseline:
//! `h_t = A ⊙ h_{t−1} + B ⊙ x_t`, `y_t = C ⊙ h_t + D ⊙ x_t`, with one state per channel and
//! parameters that do not depend on the input (contrast with the selective scan, where Δ, B and
//! C are functions of `x_t`). Stable when `|A| < 1`.

use ssm_kernel::lti::{LtiArgs, LtiDims, LtiGrads, lti_bwd, lti_fwd};
use ssm_kernel::pool::F32Buf;

use crate::tape::{Backward, InputGrad, InputList, Slot, Tape, Var, grad_or_scratch};
use crate::tensor::{Tensor, data, data_mut, for_overwrite};

/// `y = LTI(x)` with per-channel vectors `a`, `b`, `c`, `d` (each (D)); `x` and `y` are
/// (B, L, D). The numerics are [`ssm_kernel::lti`]'s.
///
/// # Panics
/// If `x` is not 3-D or a vector's length is not `D`.
#[track_caller]
pub fn lti_scan(tape: &mut Tape, x: Var, a: Var, b: Var, c: Var, d: Var) -> Var {
    let xv = tape.value(x);
    assert_eq!(xv.ndim(), 3, "lti_scan: x must be (B, L, D), got {:?}", xv.shape());
    let dims = LtiDims::new(xv.shape()[0], xv.shape()[1], xv.shape()[2]);
    for (name, v) in [("a", a), ("b", b), ("c", c), ("d", d)] {
        let s = tape.value(v).shape();
        assert_eq!(
            s,
            &[dims.dim],
            "lti_scan: `{name}` must be ({}) for x {:?}, got {s:?}",
            dims.dim,
            xv.shape()
        );
    }
    let mut inputs = InputList::new();
    let at = LtiInputs {
        x: inputs.push(x),
        a: inputs.push(a),
        b: inputs.push(b),
        c: inputs.push(c),
        d: inputs.push(d),
    };
    let mut y = for_overwrite(xv.shape());
    let val = |v: Var| data(tape.value(v));
    lti_fwd(&dims, &LtiArgs { x: data(xv), a: val(a), b: val(b), c: val(c), d: val(d) }, data_mut(&mut y));
    tape.push(y, inputs.vars(), LtiBackward { at, dims })
}

/// Where `lti_scan`'s inputs sit in its input list.
#[derive(Clone, Copy, Debug)]
struct LtiInputs {
    x: Slot,
    a: Slot,
    b: Slot,
    c: Slot,
    d: Slot,
}

/// Saved: the inputs' positions and the sizes (the kernel recomputes the states).
struct LtiBackward {
    at: LtiInputs,
    dims: LtiDims,
}

impl Backward for LtiBackward {
    fn name(&self) -> &'static str {
        "lti_scan"
    }

    fn reads_output(&self) -> bool {
        false
    }

    /// [`lti_bwd`], which adds into every gradient (fresh buffers are zeroed first; a pooled
    /// scratch stands in for an input that needs none).
    fn backward(
        &self,
        inputs: &[&Tensor],
        _out: &Tensor,
        dout: &Tensor,
        grads: &mut [Option<InputGrad<'_>>],
    ) {
        let (at, dims) = (self.at, self.dims);
        let val = |s: Slot| data(s.value(inputs));
        let args = LtiArgs { x: val(at.x), a: val(at.a), b: val(at.b), c: val(at.c), d: val(at.d) };
        let [mut sx, mut sa, mut sb, mut sc, mut sd]: [F32Buf; 5] = Default::default();
        let g = LtiGrads {
            dx: grad_or_scratch(at.x.grad(grads), &mut sx, dims.n_bld()),
            da: grad_or_scratch(at.a.grad(grads), &mut sa, dims.dim),
            db: grad_or_scratch(at.b.grad(grads), &mut sb, dims.dim),
            dc: grad_or_scratch(at.c.grad(grads), &mut sc, dims.dim),
            dd: grad_or_scratch(at.d.grad(grads), &mut sd, dims.dim),
        };
        lti_bwd(&dims, &args, data(dout), g);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::check::{check_accumulates, check_op, random};
    use crate::tensor::zeros;
    use ssm_kernel::reference::lti::lti;

    #[test]
    fn backward_matches_finite_differences() {
        let (bsz, l, dim) = (2, 9, 5);
        let mut a = random(&[dim], 4);
        a.mapv_inplace(|v| 0.9 * v); // |A| < 1
        let inputs =
            vec![random(&[bsz, l, dim], 1), a, random(&[dim], 5), random(&[dim], 6), random(&[dim], 7)];
        check_op(
            inputs,
            |t, v| lti_scan(t, v[0], v[1], v[2], v[3], v[4]),
            |v| lti(&v[0], [&v[1], &v[2], &v[3], &v[4]], (bsz, l, dim)),
            1e-4,
        );
    }

    #[test]
    #[should_panic(expected = "lti_scan: `c` must be (5) for x [1, 2, 5], got [4]")]
    fn wrong_vector_length_names_it() {
        let store = crate::params::ParamStore::new();
        let mut tape = Tape::new(&store);
        let x = tape.constant(zeros(&[1, 2, 5]));
        let v = tape.constant(zeros(&[5]));
        let c = tape.constant(zeros(&[4]));
        lti_scan(&mut tape, x, v, v, c, v);
    }

    #[test]
    fn fresh_and_accumulated_gradients() {
        let (bsz, l, dim) = (2, 6, 3);
        let a = random(&[dim], 4) * 0.9;
        let ins = vec![random(&[bsz, l, dim], 1), a, random(&[dim], 5), random(&[dim], 6), random(&[dim], 7)];
        check_accumulates(ins, |t, v| lti_scan(t, v[0], v[1], v[2], v[3], v[4]));
    }
}
