//! `y = x Wᵀ (+ b) + s · (x Aᵀ) Bᵀ`: a linear layer with a LoRA adapter, as one node.
//!
//! Fused so that training an adapter costs one (…, r) activation per layer, not the three
//! (…, out)-sized tensors of composing `linear`, `linear` and `add`: the adapter's product is
//! accumulated into the base output (a GEMM with β = 1), and only `t = x Aᵀ` is saved.

use ssm_kernel::gemm::gemm_par as gemm;

use crate::tape::{Backward, InputGrad, InputList, Slot, Tape, Var};
use crate::tensor::{Tensor, data, data_mut, for_overwrite, recycle, rows_cols, zeros};

/// `x Wᵀ (+ b) + scale · (x Aᵀ) Bᵀ`.
///
/// Shapes: `x` (…, in), `w` (out, in), `b` (out), `a` (r, in), `bm` (out, r); `y` (…, out). Four
/// GEMMs forward (the adapter's as (m, in, r) then (m, r, out)); the backward computes the
/// gradient of each input that needs one — a frozen `w` costs nothing.
///
/// # Panics
/// If the shapes disagree (the message names them).
#[track_caller]
pub fn linear_lora(tape: &mut Tape, x: Var, w: Var, b: Option<Var>, a: Var, bm: Var, scale: f32) -> Var {
    let (xv, wv, av, bv) = (tape.value(x), tape.value(w), tape.value(a), tape.value(bm));
    let (m, k) = rows_cols(xv.shape());
    assert!(
        wv.ndim() == 2 && wv.shape()[1] == k,
        "linear_lora: weight {:?} for input {:?}",
        wv.shape(),
        xv.shape()
    );
    let n = wv.shape()[0];
    assert!(av.ndim() == 2 && av.shape()[1] == k, "linear_lora: lora_A {:?} must be (r, {k})", av.shape());
    let r = av.shape()[0];
    assert_eq!(bv.shape(), &[n, r], "linear_lora: lora_B {:?} must be ({n}, {r})", bv.shape());
    let mut out_shape = xv.shape().to_vec();
    *out_shape.last_mut().expect("x has a last dimension") = n;
    let mut y = if k > 0 { for_overwrite(&out_shape) } else { zeros(&out_shape) };
    gemm((m, k, n), 1.0, data(xv), (k, 1), data(wv), (1, k), 0.0, data_mut(&mut y), (n, 1));
    let mut t = if k > 0 { for_overwrite(&[m, r]) } else { zeros(&[m, r]) };
    gemm((m, k, r), 1.0, data(xv), (k, 1), data(av), (1, k), 0.0, data_mut(&mut t), (r, 1));
    gemm((m, r, n), scale, data(&t), (r, 1), data(bv), (1, r), 1.0, data_mut(&mut y), (n, 1));
    if let Some(b) = b {
        let bias = data(tape.value(b));
        assert_eq!(bias.len(), n, "linear_lora: bias of {} for {n} outputs", bias.len());
        for row in data_mut(&mut y).chunks_exact_mut(n) {
            row.iter_mut().zip(bias).for_each(|(o, v)| *o += v);
        }
    }
    let mut inputs = InputList::new();
    let at = LoraInputs {
        x: inputs.push(x),
        w: inputs.push(w),
        b: inputs.push_opt(b),
        a: inputs.push(a),
        bm: inputs.push(bm),
    };
    tape.push(y, inputs.vars(), LinearLoraBackward { at, t, scale, m, k, n, r })
}

/// Where `linear_lora`'s inputs sit in its input list.
#[derive(Clone, Copy, Debug)]
struct LoraInputs {
    x: Slot,
    w: Slot,
    b: Option<Slot>,
    a: Slot,
    bm: Slot,
}

/// Saved: `t = x Aᵀ` (m, r), the scale and the sizes.
struct LinearLoraBackward {
    at: LoraInputs,
    t: Tensor,
    scale: f32,
    m: usize,
    k: usize,
    n: usize,
    r: usize,
}

impl Drop for LinearLoraBackward {
    /// `t` goes back to the buffer pool for the next step's forward.
    fn drop(&mut self) {
        recycle(std::mem::replace(&mut self.t, zeros(&[0])));
    }
}

/// The gradient buffer of `g`, ready for a GEMM that sums over `depth` terms: its β, and the
/// buffer zero-filled first when it must be overwritten but the sum is empty.
fn target<'a>(g: InputGrad<'a>, depth: usize) -> (f32, &'a mut [f32]) {
    let beta = g.beta();
    if depth == 0 { (1.0, g.zero_if_overwrite()) } else { (beta, g.into_data()) }
}

impl Backward for LinearLoraBackward {
    fn name(&self) -> &'static str {
        "linear_lora"
    }

    fn reads_output(&self) -> bool {
        false
    }

    /// With `g = dy B` (m, r): `dx = dy W + s·g A`, `dW = dyᵀ x`, `db = Σ dy`, `dB = s·dyᵀ t`,
    /// `dA = s·gᵀ x`.
    fn backward(
        &self,
        inputs: &[&Tensor],
        _out: &Tensor,
        dout: &Tensor,
        grads: &mut [Option<InputGrad<'_>>],
    ) {
        let Self { at, ref t, scale: s, m, k, n, r } = *self;
        let (x, w, a, bm, dy) = (
            data(at.x.value(inputs)),
            data(at.w.value(inputs)),
            data(at.a.value(inputs)),
            data(at.bm.value(inputs)),
            data(dout),
        );
        let dx = at.x.grad(grads);
        let da = at.a.grad(grads);
        let mut g = (dx.is_some() || da.is_some()).then(|| {
            let mut g = if n > 0 { for_overwrite(&[m, r]) } else { zeros(&[m, r]) };
            gemm((m, n, r), 1.0, dy, (n, 1), bm, (r, 1), 0.0, data_mut(&mut g), (r, 1));
            g
        });
        if let Some(dx) = dx {
            let (beta, dx) = target(dx, n);
            gemm((m, n, k), 1.0, dy, (n, 1), w, (k, 1), beta, dx, (k, 1));
            let g = data(g.as_ref().expect("computed for dx"));
            gemm((m, r, k), s, g, (r, 1), a, (k, 1), 1.0, dx, (k, 1));
        }
        if let Some(dw) = at.w.grad(grads) {
            let (beta, dw) = target(dw, m);
            gemm((n, m, k), 1.0, dy, (1, n), x, (k, 1), beta, dw, (k, 1));
        }
        if let Some(db) = at.b.and_then(|b| b.grad(grads)) {
            let db = db.zero_if_overwrite();
            for row in dy.chunks_exact(n) {
                db.iter_mut().zip(row).for_each(|(g, d)| *g += d);
            }
        }
        if let Some(dbm) = at.bm.grad(grads) {
            let (beta, dbm) = target(dbm, m);
            gemm((n, m, r), s, dy, (1, n), data(t), (r, 1), beta, dbm, (r, 1));
        }
        if let Some(da) = da {
            let (beta, da) = target(da, m);
            let g = data(g.as_ref().expect("computed for dA"));
            gemm((r, m, k), s, g, (1, r), x, (k, 1), beta, da, (k, 1));
        }
        if let Some(g) = g.take() {
            recycle(g);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::check::{check_accumulates, check_op, random};

    /// f64 reference: `x Wᵀ + b + s (x Aᵀ) Bᵀ`.
    fn reference(v: &[Vec<f64>], (m, k, n, r): (usize, usize, usize, usize), s: f64) -> Vec<f64> {
        let (x, w, a, b) = (&v[0], &v[1], &v[2], &v[3]);
        let bias = v.get(4);
        let mut y = vec![0.0; m * n];
        for i in 0..m {
            let t: Vec<f64> = (0..r).map(|q| (0..k).map(|j| x[i * k + j] * a[q * k + j]).sum()).collect();
            for o in 0..n {
                let base: f64 = (0..k).map(|j| x[i * k + j] * w[o * k + j]).sum();
                let lora: f64 = (0..r).map(|q| t[q] * b[o * r + q]).sum();
                y[i * n + o] = base + s * lora + bias.map_or(0.0, |bb| bb[o]);
            }
        }
        y
    }

    #[test]
    fn backward_matches_finite_differences() {
        for (bias, (m, k, n, r)) in [(false, (5, 7, 6, 3)), (true, (4, 3, 9, 1))] {
            let s = 2.5f32;
            let mut inputs =
                vec![random(&[m, k], 1), random(&[n, k], 2), random(&[r, k], 3), random(&[n, r], 4)];
            if bias {
                inputs.push(random(&[n], 5));
            }
            check_op(
                inputs,
                |tape, v| linear_lora(tape, v[0], v[1], v.get(4).copied(), v[2], v[3], s),
                |v| reference(v, (m, k, n, r), s as f64),
                1e-4,
            );
        }
    }

    #[test]
    fn fresh_and_accumulated_gradients() {
        let ins = vec![
            random(&[2, 3, 5], 1),
            random(&[4, 5], 2),
            random(&[2, 5], 3),
            random(&[4, 2], 4),
            random(&[4], 5),
        ];
        check_accumulates(ins, |t, v| linear_lora(t, v[0], v[1], Some(v[4]), v[2], v[3], 0.5));
    }
}
