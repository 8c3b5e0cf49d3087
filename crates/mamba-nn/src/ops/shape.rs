//! Shape ops: `reshape`, `narrow_last` (a column slice of the last dimension) and
//! `concat_last`.

use crate::tape::{Backward, InputGrad, InputList, Slot, Tape, Var};
use crate::tensor::{Tensor, data, data_mut, for_overwrite, rows_cols};

/// `y = x` viewed with shape `new_shape` (same elements, row-major order kept; the data is
/// copied).
///
/// # Panics
/// If `new_shape` does not hold exactly `x`'s number of elements (the message names both shapes).
#[track_caller]
pub fn reshape(tape: &mut Tape, x: Var, new_shape: &[usize]) -> Var {
    let xv = tape.value(x);
    let n: usize = new_shape.iter().product();
    assert_eq!(
        n,
        xv.len(),
        "reshape: x {:?} ({} elements) cannot become {new_shape:?} ({n} elements)",
        xv.shape(),
        xv.len()
    );
    let mut y = for_overwrite(new_shape);
    data_mut(&mut y).copy_from_slice(data(xv));
    let mut inputs = InputList::new();
    let x = inputs.push(x);
    tape.push(y, inputs.vars(), ReshapeBackward { x })
}

/// Saved: the input's position. `dx (+)= dy` in flat order.
struct ReshapeBackward {
    x: Slot,
}

impl Backward for ReshapeBackward {
    fn name(&self) -> &'static str {
        "reshape"
    }

    fn backward(&self, _: &[&Tensor], _: &Tensor, dout: &Tensor, grads: &mut [Option<InputGrad<'_>>]) {
        if let Some(mut dx) = self.x.grad(grads) {
            dx.add_or_write(data(dout));
        }
    }
}

/// `y = x[…, start .. start + len]`: a contiguous slice of the last dimension, as a new tensor.
///
/// Shapes: `x` (…, d), `y` (…, len). Used to split fused projections (`in_proj` → x | z,
/// `x_proj` → dt | B | C).
///
/// # Panics
/// If `start + len > d` (the message names the range and `x`'s shape).
#[track_caller]
pub fn narrow_last(tape: &mut Tape, x: Var, start: usize, len: usize) -> Var {
    let xv = tape.value(x);
    let (rows, d) = rows_cols(xv.shape());
    assert!(
        start + len <= d,
        "narrow_last: columns {start}..{} out of range for x {:?} (last dimension {d})",
        start + len,
        xv.shape()
    );
    let mut shape = xv.shape().to_vec();
    *shape.last_mut().expect("x has a last dimension") = len;
    // Every element is written below (a zero-width result has none).
    let mut y = for_overwrite(&shape);
    if len > 0 {
        for (dst, src) in data_mut(&mut y).chunks_exact_mut(len).zip(data(xv).chunks_exact(d)) {
            dst.copy_from_slice(&src[start..start + len]);
        }
    }
    debug_assert_eq!(y.len(), rows * len);
    let mut inputs = InputList::new();
    let x = inputs.push(x);
    tape.push(y, inputs.vars(), NarrowLastBackward { x, start, len, d })
}

/// Saved: the input's position, the column range and the input's last dimension. `dx[…, range]
/// (+)= dy`; a fresh `dx` gets zeros in the other columns.
struct NarrowLastBackward {
    x: Slot,
    start: usize,
    len: usize,
    d: usize,
}

impl Backward for NarrowLastBackward {
    fn name(&self) -> &'static str {
        "narrow_last"
    }

    fn backward(&self, _: &[&Tensor], _: &Tensor, dout: &Tensor, grads: &mut [Option<InputGrad<'_>>]) {
        let NarrowLastBackward { x, start, len, d } = *self;
        let Some(mut dx) = x.grad(grads) else { return };
        let overwrite = dx.overwrites();
        if len == 0 || d == 0 {
            if overwrite {
                dx.data().fill(0.0);
            }
            return;
        }
        for (dst, src) in dx.data().chunks_exact_mut(d).zip(data(dout).chunks_exact(len)) {
            if overwrite {
                dst[..start].fill(0.0);
                dst[start..start + len].copy_from_slice(src);
                dst[start + len..].fill(0.0);
            } else {
                for (g, s) in dst[start..start + len].iter_mut().zip(src) {
                    *g += s;
                }
            }
        }
    }
}

/// `y = [x₀ | x₁ | …]` along the last dimension.
///
/// Shapes: every `xs[i]` (…, dᵢ) with the same leading dimensions; `y` (…, Σ dᵢ).
///
/// # Panics
/// If `xs` is empty or the leading dimensions differ (the message names both shapes).
#[track_caller]
pub fn concat_last(tape: &mut Tape, xs: &[Var]) -> Var {
    assert!(!xs.is_empty(), "concat_last: no inputs");
    let first = tape.value(xs[0]).shape().to_vec();
    let lead = &first[..first.len() - 1];
    let mut widths = Vec::with_capacity(xs.len());
    for &x in xs {
        let s = tape.value(x).shape();
        assert!(
            s.len() == first.len() && &s[..s.len() - 1] == lead,
            "concat_last: leading dimensions differ: {first:?} vs {s:?}"
        );
        widths.push(s[s.len() - 1]);
    }
    let total: usize = widths.iter().sum();
    let rows: usize = lead.iter().product();
    let mut shape = first.clone();
    *shape.last_mut().expect("at least one dimension") = total;
    // Every element is written below.
    let mut y = for_overwrite(&shape);
    let yd = data_mut(&mut y);
    let mut off = 0;
    for (&x, &w) in xs.iter().zip(&widths) {
        let xd = data(tape.value(x));
        for r in 0..rows {
            yd[r * total + off..r * total + off + w].copy_from_slice(&xd[r * w..(r + 1) * w]);
        }
        off += w;
    }
    let mut inputs = InputList::new();
    let parts = xs.iter().map(|&x| inputs.push(x)).collect();
    tape.push(y, inputs.vars(), ConcatLastBackward { parts, widths })
}

/// Saved: the parts' positions and last dimensions. `dparts[i] (+)= dy[…, its columns]`.
struct ConcatLastBackward {
    parts: Vec<Slot>,
    widths: Vec<usize>,
}

impl Backward for ConcatLastBackward {
    fn name(&self) -> &'static str {
        "concat_last"
    }

    fn backward(&self, _: &[&Tensor], _: &Tensor, dout: &Tensor, grads: &mut [Option<InputGrad<'_>>]) {
        let total: usize = self.widths.iter().sum();
        let dy = data(dout);
        let rows = dy.len().checked_div(total).unwrap_or(0);
        let mut off = 0;
        for (&part, &w) in self.parts.iter().zip(&self.widths) {
            if let Some(mut dx) = part.grad(grads) {
                let overwrite = dx.overwrites();
                let dx = dx.data();
                for r in 0..rows {
                    let (dst, src) = (&mut dx[r * w..(r + 1) * w], &dy[r * total + off..][..w]);
                    if overwrite {
                        dst.copy_from_slice(src);
                    } else {
                        dst.iter_mut().zip(src).for_each(|(g, s)| *g += s);
                    }
                }
            }
            off += w;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::check::{check_accumulates, check_op, random};
    use crate::params::ParamStore;
    use crate::tensor::zeros;

    #[test]
    fn reshape_backward_matches_finite_differences() {
        check_op(vec![random(&[3, 10], 1)], |t, v| reshape(t, v[0], &[2, 5, 3]), |x| x[0].clone(), 1e-5);
    }

    #[test]
    fn narrow_last_backward_matches_finite_differences() {
        let (rows, d, start, len) = (6, 7, 2, 3);
        check_op(
            vec![random(&[2, 3, d], 1)],
            |t, v| narrow_last(t, v[0], start, len),
            |x| (0..rows).flat_map(|r| x[0][r * d + start..r * d + start + len].to_vec()).collect(),
            1e-5,
        );
    }

    #[test]
    fn concat_last_backward_matches_finite_differences() {
        let ws = [3usize, 1, 4];
        check_op(
            ws.iter().enumerate().map(|(i, &w)| random(&[5, w], i as u64)).collect(),
            |t, v| concat_last(t, v),
            |x| {
                (0..5)
                    .flat_map(|r| {
                        ws.iter().enumerate().flat_map(move |(i, &w)| (0..w).map(move |j| (i, r * w + j)))
                    })
                    .map(|(i, k)| x[i][k])
                    .collect()
            },
            1e-5,
        );
    }

    #[test]
    fn narrow_then_concat_round_trips() {
        let store = ParamStore::new();
        let mut tape = Tape::new(&store);
        let x = tape.constant(random(&[3, 9], 4));
        let a = narrow_last(&mut tape, x, 0, 2);
        let b = narrow_last(&mut tape, x, 2, 7);
        let y = concat_last(&mut tape, &[a, b]);
        assert_eq!(tape.value(y), tape.value(x));
    }

    #[test]
    #[should_panic(expected = "narrow_last: columns 5..9 out of range for x [2, 8] (last dimension 8)")]
    fn narrow_last_out_of_range_panics() {
        let store = ParamStore::new();
        let mut tape = Tape::new(&store);
        let x = tape.constant(zeros(&[2, 8]));
        narrow_last(&mut tape, x, 5, 4);
    }

    #[test]
    #[should_panic(expected = "reshape: x [2, 3] (6 elements) cannot become [4] (4 elements)")]
    fn reshape_wrong_count_panics() {
        let store = ParamStore::new();
        let mut tape = Tape::new(&store);
        let x = tape.constant(zeros(&[2, 3]));
        reshape(&mut tape, x, &[4]);
    }

    #[test]
    #[should_panic(expected = "concat_last: leading dimensions differ: [2, 3] vs [3, 3]")]
    fn concat_last_mismatch_panics() {
        let store = ParamStore::new();
        let mut tape = Tape::new(&store);
        let a = tape.constant(zeros(&[2, 3]));
        let b = tape.constant(zeros(&[3, 3]));
        concat_last(&mut tape, &[a, b]);
    }

    #[test]
    fn fresh_and_accumulated_gradients() {
        let x = vec![random(&[3, 10], 1)];
        check_accumulates(x.clone(), |t, v| reshape(t, v[0], &[2, 5, 3]));
        check_accumulates(x.clone(), |t, v| narrow_last(t, v[0], 2, 5));
        check_accumulates(vec![random(&[3, 2], 2), random(&[3, 4], 3)], |t, v| concat_last(t, v));
    }
}
