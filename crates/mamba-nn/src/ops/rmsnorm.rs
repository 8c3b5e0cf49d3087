//! RMSNorm and Mamba-2's gated, grouped RMSNorm as tape ops, on [`ssm_kernel::norm`]: one fused
//! pass per row, the reciprocal RMS of each row (group) saved for the backward.

use ssm_kernel::cols::{Cols, ColsMut};
use ssm_kernel::norm::{NormArgs, NormDims, NormGrads, norm_bwd, norm_fwd};

use crate::tape::{Backward, InputGrad, InputList, Slot, Tape, Var};
use crate::tensor::{Tensor, data, data_mut, for_overwrite, rows_cols};

/// `y = x · rsqrt(mean(x²) + eps) · w`, the mean taken over the last dimension.
///
/// Shapes: `x` (…, d), `w` (d), `y` (…, d). One fused pass per row; the per-row reciprocal RMS
/// is saved for the backward. Rows run in parallel when `rows · d ≥ 65 536`.
///
/// # Panics
/// If `w` is not (d) (the message names both shapes).
#[track_caller]
pub fn rms_norm(tape: &mut Tape, x: Var, w: Var, eps: f32) -> Var {
    let d = *tape.value(x).shape().last().expect("rms_norm: x needs at least one dimension");
    norm(tape, "rms_norm", x, None, w, d.max(1), eps)
}

/// Mamba-2's gated RMSNorm: `v = x ⊙ silu(z)`, then `y = v · rsqrt(mean_group(v²) + eps) · w`,
/// where the mean of squares is taken over each group of `group_size` consecutive channels
/// (`group_size = d_inner / ngroups`). The gate is applied **before** the norm, as in
/// transformers' `MambaRMSNormGated` and mamba_ssm's `RMSNormGated(norm_before_gate=False)`.
///
/// Shapes: `x`, `z` (…, d), `w` (d), `y` (…, d); `group_size` divides `d`.
///
/// # Panics
/// If the shapes disagree or `group_size` does not divide `d` (the message names the shapes).
#[track_caller]
pub fn gated_rms_norm(tape: &mut Tape, x: Var, z: Var, w: Var, group_size: usize, eps: f32) -> Var {
    let (xv, zv) = (tape.value(x), tape.value(z));
    assert_eq!(
        xv.shape(),
        zv.shape(),
        "gated_rms_norm: x {:?} and gate z {:?} differ",
        xv.shape(),
        zv.shape()
    );
    norm(tape, "gated_rms_norm", x, Some(z), w, group_size, eps)
}

#[track_caller]
fn norm(tape: &mut Tape, op: &'static str, x: Var, z: Option<Var>, w: Var, gs: usize, eps: f32) -> Var {
    let (xv, wv) = (tape.value(x), tape.value(w));
    let (rows, d) = rows_cols(xv.shape());
    assert_eq!(wv.shape(), &[d], "{op}: weight must be ({d}) for x {:?}, got {:?}", xv.shape(), wv.shape());
    assert!(
        gs >= 1 && d.is_multiple_of(gs),
        "{op}: group size {gs} must divide the last dimension of x {:?}",
        xv.shape()
    );
    let nd = NormDims::new(rows, d, gs, eps);
    let mut args = NormArgs::new(data(xv), data(wv));
    if let Some(z) = z {
        args = args.with_gate(Cols::dense(data(tape.value(z)), d));
    }
    let mut y = for_overwrite(xv.shape());
    let rstd = norm_fwd(&nd, &args, data_mut(&mut y));
    let mut inputs = InputList::new();
    let at = NormInputs { x: inputs.push(x), w: inputs.push(w), z: inputs.push_opt(z) };
    tape.push(y, inputs.vars(), RmsNormBackward { op, at, nd, rstd })
}

/// Where a norm's inputs sit in its input list.
#[derive(Clone, Copy, Debug)]
struct NormInputs {
    x: Slot,
    w: Slot,
    /// The gate (gated norm only).
    z: Option<Slot>,
}

/// Saved: the op's name, the inputs' positions, the sizes and the reciprocal RMS of every
/// (row, group).
struct RmsNormBackward {
    op: &'static str,
    at: NormInputs,
    nd: NormDims,
    rstd: Vec<f32>,
}

impl Backward for RmsNormBackward {
    fn name(&self) -> &'static str {
        self.op
    }

    fn reads_output(&self) -> bool {
        false
    }

    /// [`norm_bwd`]: `dx` and `dz` are written in place when fresh (no zero-fill), `dw` is
    /// added to.
    fn backward(&self, inputs: &[&Tensor], _: &Tensor, dout: &Tensor, grads: &mut [Option<InputGrad<'_>>]) {
        let (at, d) = (self.at, self.nd.d);
        let mut args = NormArgs::new(data(at.x.value(inputs)), data(at.w.value(inputs)));
        if let Some(z) = at.z {
            args = args.with_gate(Cols::dense(data(z.value(inputs)), d));
        }
        let dx = at.x.grad(grads);
        let dz = at.z.and_then(|z| z.grad(grads));
        let g = NormGrads {
            overwrite_dx: dx.as_ref().is_some_and(InputGrad::overwrites),
            dx: dx.map(InputGrad::into_data),
            dw: at.w.grad(grads).map(InputGrad::zero_if_overwrite),
            overwrite_dz: dz.as_ref().is_some_and(InputGrad::overwrites),
            dz: dz.map(|g| ColsMut { data: g.into_data(), stride: d, offset: 0 }),
        };
        norm_bwd(&self.nd, &args, &self.rstd, data(dout), g);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::check::{check_accumulates, check_op, random};
    use crate::params::ParamStore;
    use crate::tensor::zeros;
    use ssm_kernel::reference::norm::rms_norm as reference;

    #[test]
    fn rms_norm_backward_matches_finite_differences() {
        let d = 7;
        check_op(
            vec![random(&[3, 5, d], 1), random(&[d], 2) + 1.0],
            |t, v| rms_norm(t, v[0], v[1], 1e-5),
            |x| reference(&x[0], None, &x[1], d, d, 1e-5),
            1e-4,
        );
    }

    #[test]
    fn gated_rms_norm_backward_matches_finite_differences() {
        for (d, gs) in [(9, 3), (5, 5)] {
            check_op(
                vec![random(&[2, 3, d], 1) * 2.0, random(&[d], 2) + 1.0, random(&[2, 3, d], 3) * 3.0],
                |t, v| gated_rms_norm(t, v[0], v[2], v[1], gs, 1e-5),
                |x| reference(&x[0], Some(&x[2]), &x[1], d, gs, 1e-5),
                1e-4,
            );
        }
    }

    /// The parallel path (rows · d ≥ 2¹⁶) gives the same values and gradients as one block.
    #[test]
    fn parallel_rows_match_reference() {
        let (rows, d, gs) = (300, 256, 64);
        let (x, z, w) = (random(&[rows, d], 1), random(&[rows, d], 2), random(&[d], 3) + 1.0);
        let store = ParamStore::new();
        let mut tape = Tape::new(&store);
        let (xv, zv, wv) = (tape.leaf(x.clone()), tape.leaf(z.clone()), tape.leaf(w.clone()));
        let y = gated_rms_norm(&mut tape, xv, zv, wv, gs, 1e-5);
        let f64v = |t: &Tensor| data(t).iter().map(|&v| v as f64).collect::<Vec<_>>();
        let want = reference(&f64v(&x), Some(&f64v(&z)), &f64v(&w), d, gs, 1e-5);
        ssm_kernel::testing::assert_rel_max("y", data(tape.value(y)), &want, 1e-5, 1.0);
        // dw for dy = 1 is Σ_rows v·r = Σ_rows y / w, per column: every block's partial counts.
        let mut grads = crate::params::Grads::new(&store);
        tape.backward_from(y, Tensor::ones(tape.value(y).raw_dim()), &mut grads);
        let dw = tape.grad(wv).unwrap();
        for j in 0..d {
            let yw = want.iter().skip(j).step_by(d).sum::<f64>() / data(&w)[j] as f64;
            let got = dw[j] as f64;
            assert!((got - yw).abs() < 1e-3 * yw.abs().max(1.0), "dw[{j}] {got} vs {yw}");
        }
    }

    #[test]
    #[should_panic(expected = "rms_norm: weight must be (4) for x [2, 4], got [3]")]
    fn weight_shape_mismatch_panics() {
        let store = ParamStore::new();
        let mut tape = Tape::new(&store);
        let x = tape.constant(zeros(&[2, 4]));
        let w = tape.constant(zeros(&[3]));
        rms_norm(&mut tape, x, w, 1e-5);
    }

    #[test]
    #[should_panic(expected = "gated_rms_norm: group size 3 must divide the last dimension of x [2, 4]")]
    fn group_size_must_divide() {
        let store = ParamStore::new();
        let mut tape = Tape::new(&store);
        let x = tape.constant(zeros(&[2, 4]));
        let z = tape.constant(zeros(&[2, 4]));
        let w = tape.constant(zeros(&[4]));
        gated_rms_norm(&mut tape, x, z, w, 3, 1e-5);
    }

    #[test]
    fn fresh_and_accumulated_gradients() {
        let ins = vec![random(&[300, 256], 1), random(&[256], 2) + 1.0, random(&[300, 256], 3)];
        check_accumulates(ins.clone(), |t, v| gated_rms_norm(t, v[0], v[2], v[1], 64, 1e-5));
        check_accumulates(ins[..2].to_vec(), |t, v| rms_norm(t, v[0], v[1], 1e-5));
    }
}
