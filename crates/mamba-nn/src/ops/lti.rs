//! The seed's linear time-invariant recurrence — the non-selective baseline:
//! `h_t = A ⊙ h_{t−1} + B ⊙ x_t`, `y_t = C ⊙ h_t + D ⊙ x_t`, with one state per channel and
//! parameters that do not depend on the input (contrast with the selective scan, where Δ, B and
//! C are functions of `x_t`). Stable when `|A| < 1`.

use crate::tape::{Backward, InputGrad, InputList, Slot, Tape, Var};
use crate::tensor::{Tensor, data, data_mut, for_overwrite};

/// `y = LTI(x)` with per-channel vectors `a`, `b`, `c`, `d` (each (D)); `x` and `y` are
/// (B, L, D).
///
/// # Panics
/// If `x` is not 3-D or a vector's length is not `D`.
#[track_caller]
pub fn lti_scan(tape: &mut Tape, x: Var, a: Var, b: Var, c: Var, d: Var) -> Var {
    let xv = tape.value(x);
    assert_eq!(xv.ndim(), 3, "lti_scan: x must be (B, L, D), got {:?}", xv.shape());
    let (bsz, l, dim) = (xv.shape()[0], xv.shape()[1], xv.shape()[2]);
    for (name, v) in [("a", a), ("b", b), ("c", c), ("d", d)] {
        let s = tape.value(v).shape();
        assert_eq!(s, &[dim], "lti_scan: `{name}` must be ({dim}) for x {:?}, got {s:?}", xv.shape());
    }
    let (av, bv, cv, dv) =
        (data(tape.value(a)), data(tape.value(b)), data(tape.value(c)), data(tape.value(d)));
    let xs = data(xv);
    let mut y = for_overwrite(&[bsz, l, dim]);
    let ys = data_mut(&mut y);
    let mut h = vec![0.0f32; dim];
    for bi in 0..bsz {
        h.fill(0.0);
        for t in 0..l {
            let row = (bi * l + t) * dim;
            for k in 0..dim {
                let xk = xs[row + k];
                h[k] = av[k] * h[k] + bv[k] * xk;
                ys[row + k] = cv[k] * h[k] + dv[k] * xk;
            }
        }
    }
    let mut inputs = InputList::new();
    let at = LtiInputs {
        x: inputs.push(x),
        a: inputs.push(a),
        b: inputs.push(b),
        c: inputs.push(c),
        d: inputs.push(d),
    };
    tape.push(y, inputs.vars(), LtiBackward { at, bsz, l, dim })
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

/// Saved: the inputs' positions and the sizes (the backward recomputes the states).
struct LtiBackward {
    at: LtiInputs,
    bsz: usize,
    l: usize,
    dim: usize,
}

impl Backward for LtiBackward {
    fn name(&self) -> &'static str {
        "lti_scan"
    }

    /// Recomputes the states, then the reverse recurrence `g_t = C·dy_t + A·g_{t+1}`.
    fn backward(
        &self,
        inputs: &[&Tensor],
        _out: &Tensor,
        dout: &Tensor,
        grads: &mut [Option<InputGrad<'_>>],
    ) {
        let LtiBackward { at, bsz, l, dim } = *self;
        let val = |s: Slot| data(s.value(inputs));
        let (xs, a, b, c, d) = (val(at.x), val(at.a), val(at.b), val(at.c), val(at.d));
        let dy = data(dout);
        let mut gx = vec![0.0f32; xs.len()];
        let (mut ga, mut gb, mut gc, mut gd) =
            (vec![0.0f32; dim], vec![0.0f32; dim], vec![0.0f32; dim], vec![0.0f32; dim]);
        let mut hs = vec![0.0f32; (l + 1) * dim];
        let mut g = vec![0.0f32; dim];
        for bi in 0..bsz {
            for t in 0..l {
                let row = (bi * l + t) * dim;
                for k in 0..dim {
                    hs[(t + 1) * dim + k] = a[k] * hs[t * dim + k] + b[k] * xs[row + k];
                }
            }
            g.fill(0.0);
            for t in (0..l).rev() {
                let row = (bi * l + t) * dim;
                for k in 0..dim {
                    let (x, dyk, h, hp) = (xs[row + k], dy[row + k], hs[(t + 1) * dim + k], hs[t * dim + k]);
                    gc[k] += dyk * h;
                    gd[k] += dyk * x;
                    g[k] += c[k] * dyk;
                    ga[k] += g[k] * hp;
                    gb[k] += g[k] * x;
                    gx[row + k] += g[k] * b[k] + d[k] * dyk;
                    g[k] *= a[k];
                }
            }
        }
        for (slot, src) in [(at.x, &gx), (at.a, &ga), (at.b, &gb), (at.c, &gc), (at.d, &gd)] {
            if let Some(mut g) = slot.grad(grads) {
                g.add_or_write(src);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::check::{check_op, random};
    use crate::tensor::zeros;

    fn reference(v: &[Vec<f64>], (bsz, l, dim): (usize, usize, usize)) -> Vec<f64> {
        let (x, a, b, c, d) = (&v[0], &v[1], &v[2], &v[3], &v[4]);
        let mut y = vec![0.0; bsz * l * dim];
        for bi in 0..bsz {
            for k in 0..dim {
                let mut h = 0.0;
                for t in 0..l {
                    let i = (bi * l + t) * dim + k;
                    h = a[k] * h + b[k] * x[i];
                    y[i] = c[k] * h + d[k] * x[i];
                }
            }
        }
        y
    }

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
            |v| reference(v, (bsz, l, dim)),
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
}
