//! Element-wise arithmetic: `add`, `add_broadcast_last`, `mul`, `scale`.

use rayon::prelude::*;

use crate::tape::{Backward, InputGrad, InputList, Slot, Tape, Var};
use crate::tensor::{Tensor, data, data_mut, for_overwrite, pooled_copy, rows_cols};

/// Element-wise loops over at least this many values run in parallel blocks of this size.
const PAR_BLOCK: usize = 1 << 16;

/// `f(dst block, a block, b block)` over matching blocks of `dst`, `a` and `b`, in parallel when
/// the slices are large.
fn zip_blocks(dst: &mut [f32], a: &[f32], b: &[f32], f: impl Fn(&mut [f32], &[f32], &[f32]) + Sync) {
    if dst.len() < 2 * PAR_BLOCK {
        f(dst, a, b);
    } else {
        dst.par_chunks_mut(PAR_BLOCK)
            .zip(a.par_chunks(PAR_BLOCK))
            .zip(b.par_chunks(PAR_BLOCK))
            .for_each(|((d, a), b)| f(d, a, b));
    }
}

/// Panics unless `a` and `b` have the same shape, naming the op and both shapes.
#[track_caller]
fn same_shape(op: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.shape(), b.shape(), "{op}: shapes differ: a {:?} vs b {:?}", a.shape(), b.shape());
}

/// `dst += src`, element-wise.
fn add_into(dst: &mut [f32], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

/// `y = a + b`.
///
/// Shapes: `a`, `b` and `y` all the same (any rank).
///
/// # Panics
/// If the shapes differ (the message names both).
#[track_caller]
pub fn add(tape: &mut Tape, a: Var, b: Var) -> Var {
    let (av, bv) = (tape.value(a), tape.value(b));
    same_shape("add", av, bv);
    let mut y = for_overwrite(av.shape());
    zip_blocks(data_mut(&mut y), data(av), data(bv), |y, a, b| {
        for ((o, &p), &q) in y.iter_mut().zip(a).zip(b) {
            *o = p + q;
        }
    });
    let mut inputs = InputList::new();
    let (a, b) = (inputs.push(a), inputs.push(b));
    tape.push(y, inputs.vars(), AddBackward { a, b })
}

/// Saved: the inputs' positions. `da (+)= dy`, `db (+)= dy` (a fresh buffer is a copy of `dy`).
struct AddBackward {
    a: Slot,
    b: Slot,
}

impl Backward for AddBackward {
    fn name(&self) -> &'static str {
        "add"
    }

    fn reads_output(&self) -> bool {
        false
    }

    fn backward(&self, _: &[&Tensor], _: &Tensor, dout: &Tensor, grads: &mut [Option<InputGrad<'_>>]) {
        let g = data(dout);
        for slot in [self.a, self.b] {
            let Some(mut d) = slot.grad(grads) else { continue };
            if d.overwrites() {
                zip_blocks(d.data(), g, g, |d, g, _| d.copy_from_slice(g));
            } else {
                zip_blocks(d.data(), g, g, |d, g, _| add_into(d, g));
            }
        }
    }
}

/// `y[…, j] = x[…, j] + b[j]`: adds a vector along the last dimension.
///
/// Shapes: `x` (…, d), `b` (d), `y` (…, d).
///
/// # Panics
/// If `b` is not a vector of length `d` (the message names both shapes).
#[track_caller]
pub fn add_broadcast_last(tape: &mut Tape, x: Var, b: Var) -> Var {
    let (xv, bv) = (tape.value(x), tape.value(b));
    let (_, d) = rows_cols(xv.shape());
    assert_eq!(
        bv.shape(),
        &[d],
        "add_broadcast_last: b must be ({d}) to match x {:?}, got {:?}",
        xv.shape(),
        bv.shape()
    );
    let mut y = pooled_copy(xv);
    if d > 0 {
        for row in data_mut(&mut y).chunks_exact_mut(d) {
            add_into(row, data(bv));
        }
    }
    let mut inputs = InputList::new();
    let (x, b) = (inputs.push(x), inputs.push(b));
    tape.push(y, inputs.vars(), AddBroadcastLastBackward { x, b, d })
}

/// Saved: the inputs' positions and the broadcast length `d`. `dx (+)= dy`,
/// `db (+)= Σ_rows dy`.
struct AddBroadcastLastBackward {
    x: Slot,
    b: Slot,
    d: usize,
}

impl Backward for AddBroadcastLastBackward {
    fn name(&self) -> &'static str {
        "add_broadcast_last"
    }

    fn reads_output(&self) -> bool {
        false
    }

    fn backward(&self, _: &[&Tensor], _: &Tensor, dout: &Tensor, grads: &mut [Option<InputGrad<'_>>]) {
        let dy = data(dout);
        if let Some(mut dx) = self.x.grad(grads) {
            dx.add_or_write(dy);
        }
        if let Some(db) = self.b.grad(grads) {
            let db = db.zero_if_overwrite();
            if self.d > 0 {
                for row in dy.chunks_exact(self.d) {
                    add_into(db, row);
                }
            }
        }
    }
}

/// `y = a ⊙ b` (element-wise product).
///
/// Shapes: `a`, `b` and `y` all the same (any rank). `mul(x, x)` is allowed.
///
/// # Panics
/// If the shapes differ (the message names both).
#[track_caller]
pub fn mul(tape: &mut Tape, a: Var, b: Var) -> Var {
    let (av, bv) = (tape.value(a), tape.value(b));
    same_shape("mul", av, bv);
    let mut y = pooled_copy(av);
    for (o, v) in data_mut(&mut y).iter_mut().zip(data(bv)) {
        *o *= v;
    }
    let mut inputs = InputList::new();
    let (a, b) = (inputs.push(a), inputs.push(b));
    tape.push(y, inputs.vars(), MulBackward { a, b })
}

/// Saved: the inputs' positions (their values are on the tape). `da (+)= dy ⊙ b`,
/// `db (+)= dy ⊙ a`.
struct MulBackward {
    a: Slot,
    b: Slot,
}

impl Backward for MulBackward {
    fn name(&self) -> &'static str {
        "mul"
    }

    fn reads_output(&self) -> bool {
        false
    }

    fn backward(&self, inputs: &[&Tensor], _: &Tensor, dout: &Tensor, grads: &mut [Option<InputGrad<'_>>]) {
        let dy = data(dout);
        for (slot, other) in [(self.a, self.b), (self.b, self.a)] {
            if let Some(mut d) = slot.grad(grads) {
                let o = data(other.value(inputs));
                d.add_or_write_each(dy.iter().zip(o).map(|(&y, &o)| y * o));
            }
        }
    }
}

/// `y = s · x` for a constant scalar `s` (`scale(x, -1.0)` negates).
///
/// Shapes: `x` and `y` the same (any rank).
pub fn scale(tape: &mut Tape, x: Var, s: f32) -> Var {
    let y = tape.value(x) * s;
    let mut inputs = InputList::new();
    let x = inputs.push(x);
    tape.push(y, inputs.vars(), ScaleBackward { x, s })
}

/// Saved: the input's position and the factor `s`. `dx (+)= s · dy`.
struct ScaleBackward {
    x: Slot,
    s: f32,
}

impl Backward for ScaleBackward {
    fn name(&self) -> &'static str {
        "scale"
    }

    fn backward(&self, _: &[&Tensor], _: &Tensor, dout: &Tensor, grads: &mut [Option<InputGrad<'_>>]) {
        if let Some(mut dx) = self.x.grad(grads) {
            let s = self.s;
            dx.add_or_write_each(data(dout).iter().map(|&d| s * d));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::check::{check_accumulates, check_op, random};
    use crate::params::{Grads, ParamStore};
    use crate::tensor::{from_vec, zeros};

    #[test]
    fn add_backward_matches_finite_differences() {
        check_op(
            vec![random(&[3, 5], 1), random(&[3, 5], 2)],
            |t, v| add(t, v[0], v[1]),
            |x| x[0].iter().zip(&x[1]).map(|(a, b)| a + b).collect(),
            1e-5,
        );
    }

    #[test]
    fn add_broadcast_last_backward_matches_finite_differences() {
        check_op(
            vec![random(&[2, 3, 7], 1), random(&[7], 2)],
            |t, v| add_broadcast_last(t, v[0], v[1]),
            |x| x[0].iter().enumerate().map(|(i, a)| a + x[1][i % 7]).collect(),
            1e-5,
        );
    }

    #[test]
    fn mul_backward_matches_finite_differences() {
        check_op(
            vec![random(&[3, 5], 1), random(&[3, 5], 2)],
            |t, v| mul(t, v[0], v[1]),
            |x| x[0].iter().zip(&x[1]).map(|(a, b)| a * b).collect(),
            1e-5,
        );
    }

    #[test]
    fn scale_backward_matches_finite_differences() {
        check_op(
            vec![random(&[7], 1)],
            |t, v| scale(t, v[0], -2.5),
            |x| x[0].iter().map(|a| -2.5 * a).collect(),
            1e-5,
        );
    }

    #[test]
    #[should_panic(expected = "mul: shapes differ: a [2, 3] vs b [3, 2]")]
    fn mul_shape_mismatch_names_both_shapes() {
        let store = ParamStore::new();
        let mut tape = Tape::new(&store);
        let a = tape.constant(zeros(&[2, 3]));
        let b = tape.constant(zeros(&[3, 2]));
        mul(&mut tape, a, b);
    }

    #[test]
    #[should_panic(expected = "add_broadcast_last: b must be (3) to match x [2, 3], got [2]")]
    fn add_broadcast_last_shape_mismatch_names_both_shapes() {
        let store = ParamStore::new();
        let mut tape = Tape::new(&store);
        let x = tape.constant(zeros(&[2, 3]));
        let b = tape.constant(zeros(&[2]));
        add_broadcast_last(&mut tape, x, b);
    }

    /// The tape accumulates gradients of a value used twice by one op (`x ⊙ x`) and of a value
    /// feeding two ops whose results meet again (a diamond), for a leaf and for a parameter.
    #[test]
    fn tape_reused_var_and_diamond() {
        let mut store = ParamStore::new();
        let p = store.add("p", from_vec(&[3], vec![0.5, -1.0, 2.0]), true);
        let mut grads = Grads::new(&store);
        let mut tape = Tape::new(&store);
        let xs = [1.0f32, 2.0, -3.0];
        let x = tape.leaf(from_vec(&[3], xs.to_vec()));
        let pv = tape.param(p);
        // y = x⊙x + (3x + x⊙p) + p⊙p   (x: reused by one op, and a diamond through two branches)
        let sq = mul(&mut tape, x, x);
        let left = scale(&mut tape, x, 3.0);
        let right = mul(&mut tape, x, pv);
        let branch = add(&mut tape, left, right);
        let pp = mul(&mut tape, pv, pv);
        let s = add(&mut tape, sq, branch);
        let y = add(&mut tape, s, pp);
        tape.backward_from(y, from_vec(&[3], vec![1.0, 1.0, 1.0]), &mut grads);
        let ps = [0.5f32, -1.0, 2.0];
        // dy/dx = 2x + 3 + p,  dy/dp = x + 2p
        let dx: Vec<f32> = (0..3).map(|i| 2.0 * xs[i] + 3.0 + ps[i]).collect();
        let dp: Vec<f32> = (0..3).map(|i| xs[i] + 2.0 * ps[i]).collect();
        assert_eq!(data(tape.grad(x).unwrap()), dx.as_slice());
        assert_eq!(data(grads.get(p)), dp.as_slice());
    }

    #[test]
    fn small_ops_fresh_and_accumulated_gradients() {
        let ins = vec![random(&[4, 7], 1), random(&[4, 7], 2), random(&[7], 3)];
        check_accumulates(ins.clone(), |t, v| mul(t, v[0], v[1]));
        check_accumulates(ins.clone(), |t, v| scale(t, v[0], -1.5));
        check_accumulates(vec![ins[0].clone(), ins[2].clone()], |t, v| add_broadcast_last(t, v[0], v[1]));
    }

    #[test]
    fn add_fresh_and_accumulated_gradients() {
        // 3 · 2¹⁶ elements: the parallel blocks.
        check_accumulates(vec![random(&[3, 256, 256], 1), random(&[3, 256, 256], 2)], |t, v| {
            add(t, v[0], v[1])
        });
    }
}
