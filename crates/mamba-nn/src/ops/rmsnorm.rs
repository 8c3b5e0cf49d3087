//! RMSNorm and Mamba-2's gated, grouped RMSNorm, fused: one pass per row, the reciprocal RMS of
//! each row (group) saved for the backward.

use crate::ops::activation::sigmoid_row;
use crate::ops::pool;
use crate::ops::rows::for_row_blocks;
use crate::tape::{Backward, Tape, Var};
use crate::tensor::{Tensor, data, data_mut, rows_cols};

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
    let ng = d / gs;
    let (xd, wd) = (data(xv), data(wv));
    let zd = z.map(|z| data(tape.value(z)));
    let mut y = Tensor::zeros(xv.raw_dim());
    let blocks = for_row_blocks(rows, d, [Some(data_mut(&mut y))], |range, [yb]| {
        let yb = yb.expect("y is always written");
        let mut rstd = Vec::with_capacity(range.len() * ng);
        let mut sig = if zd.is_some() { vec![0.0f32; d] } else { Vec::new() };
        for (i, r) in range.enumerate() {
            let (xr, yr) = (&xd[r * d..(r + 1) * d], &mut yb[i * d..(i + 1) * d]);
            // v = x ⊙ silu(z) (or x), written into y, then scaled in place.
            match zd {
                Some(zd) => {
                    let zr = &zd[r * d..(r + 1) * d];
                    sigmoid_row(zr, &mut sig);
                    for (((o, &a), &g), &sg) in yr.iter_mut().zip(xr).zip(zr).zip(&sig) {
                        *o = a * g * sg;
                    }
                }
                None => yr.copy_from_slice(xr),
            }
            for (yg, wg) in yr.chunks_exact_mut(gs).zip(wd.chunks_exact(gs)) {
                let ss: f32 = yg.iter().map(|v| v * v).sum();
                let rs = 1.0 / (ss / gs as f32 + eps).sqrt();
                for (o, &wi) in yg.iter_mut().zip(wg) {
                    *o *= rs * wi;
                }
                rstd.push(rs);
            }
        }
        rstd
    });
    let rstd = blocks.concat();
    let inputs: Vec<Var> = match z {
        Some(z) => vec![x, w, z],
        None => vec![x, w],
    };
    tape.push(y, &inputs, RmsNormBackward { op, d, gs, rstd })
}

/// Saved: the row length `d`, group size and the reciprocal RMS of every (row, group).
struct RmsNormBackward {
    op: &'static str,
    d: usize,
    gs: usize,
    rstd: Vec<f32>,
}

impl Backward for RmsNormBackward {
    fn name(&self) -> &'static str {
        self.op
    }

    /// Per group, with `v` the normalised input, `r` its reciprocal RMS and `gw = dy ⊙ w`:
    /// `dv = r·gw − (r³/gs)·v·Σ(gw ⊙ v)`, `dw += dy ⊙ v · r`; through the gate
    /// `dx = dv ⊙ silu(z)`, `dz = dv ⊙ x ⊙ silu'(z)`.
    fn backward(&self, inputs: &[&Tensor], _: &Tensor, dout: &Tensor, dinputs: &mut [Option<&mut Tensor>]) {
        let (d, gs) = (self.d, self.gs);
        let ng = d / gs;
        let rows = self.rstd.len() / ng.max(1);
        let (xd, wd, dy) = (data(inputs[0]), data(inputs[1]), data(dout));
        let zd = inputs.get(2).map(|z| data(z));
        let (dx_slot, rest) = dinputs.split_at_mut(1);
        let (dw_slot, dz_slot) = rest.split_at_mut(1);
        let dx = dx_slot[0].as_deref_mut().map(data_mut);
        let want_dw = dw_slot[0].is_some();
        let dz = dz_slot.first_mut().and_then(|s| s.as_deref_mut()).map(data_mut);
        let partials = for_row_blocks(rows, d, [dx, dz], |range, [mut dxb, mut dzb]| {
            let mut dw = if want_dw { pool::take(d) } else { Vec::new() };
            // Scratch rows: v (normalised input before scaling), silu(z) and silu'(z), from one
            // SIMD sigmoid per element.
            let (mut v, mut s) = (vec![0.0f32; d], vec![1.0f32; d]);
            let mut sg = if zd.is_some() { vec![0.0f32; d] } else { Vec::new() };
            for (i, r) in range.enumerate() {
                let (xr, gr) = (&xd[r * d..(r + 1) * d], &dy[r * d..(r + 1) * d]);
                match zd {
                    Some(zd) => {
                        let zr = &zd[r * d..(r + 1) * d];
                        sigmoid_row(zr, &mut sg);
                        for ((((vi, si), gi), &a), &g) in
                            v.iter_mut().zip(&mut s).zip(&mut sg).zip(xr).zip(zr)
                        {
                            let sig = *gi;
                            *si = g * sig;
                            *vi = a * *si;
                            *gi = sig * (1.0 + g * (1.0 - sig));
                        }
                    }
                    None => v.copy_from_slice(xr),
                }
                for g in 0..ng {
                    let rs = self.rstd[r * ng + g];
                    let cols = g * gs..(g + 1) * gs;
                    // Group slices, so the loops below run over zipped slices and vectorise.
                    let (gg, wg, vg) = (&gr[cols.clone()], &wd[cols.clone()], &v[cols.clone()]);
                    let dot: f32 = gg.iter().zip(wg).zip(vg).map(|((a, b), c)| a * b * c).sum();
                    let k = rs * rs * rs / gs as f32 * dot;
                    if want_dw {
                        for ((o, a), b) in dw[cols.clone()].iter_mut().zip(gg).zip(vg) {
                            *o += a * b * rs;
                        }
                    }
                    let dvs = gg.iter().zip(wg).zip(vg).map(|((a, b), c)| rs * a * b - k * c);
                    match (dxb.as_deref_mut(), dzb.as_deref_mut(), zd) {
                        (Some(dxb), None, _) => {
                            let row = &mut dxb[i * d + g * gs..i * d + (g + 1) * gs];
                            for ((o, dv), sj) in row.iter_mut().zip(dvs).zip(&s[cols]) {
                                *o += dv * sj;
                            }
                        }
                        (dxb, dzb, _) => {
                            let mut dxb = dxb;
                            let mut dzb = dzb;
                            for (j, dv) in cols.zip(dvs) {
                                if let Some(dxb) = dxb.as_deref_mut() {
                                    dxb[i * d + j] += dv * s[j];
                                }
                                if let Some(dzb) = dzb.as_deref_mut() {
                                    dzb[i * d + j] += dv * xr[j] * sg[j];
                                }
                            }
                        }
                    }
                }
            }
            dw
        });
        if let Some(dw) = dw_slot[0].as_deref_mut() {
            let dw = data_mut(dw);
            for p in &partials {
                for (g, v) in dw.iter_mut().zip(p) {
                    *g += v;
                }
            }
        }
        for p in partials {
            pool::give(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::check::{check_op, random};
    use crate::params::ParamStore;
    use crate::tensor::zeros;

    /// f64 reference of the (gated, grouped) RMSNorm.
    fn reference(x: &[f64], z: Option<&[f64]>, w: &[f64], d: usize, gs: usize, eps: f64) -> Vec<f64> {
        let v: Vec<f64> = match z {
            Some(z) => x.iter().zip(z).map(|(a, g)| a * g / (1.0 + (-g).exp())).collect(),
            None => x.to_vec(),
        };
        let mut y = vec![0.0; x.len()];
        for (row, vr) in v.chunks(d).enumerate() {
            for (g, vg) in vr.chunks(gs).enumerate() {
                let r = 1.0 / (vg.iter().map(|a| a * a).sum::<f64>() / gs as f64 + eps).sqrt();
                for (j, a) in vg.iter().enumerate() {
                    y[row * d + g * gs + j] = a * r * w[g * gs + j];
                }
            }
        }
        y
    }

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
        // dw for dy = 1 is Σ_rows v·r: compare with the reference's finite difference in w[0].
        let mut grads = crate::params::Grads::new(&store);
        tape.backward_from(y, Tensor::ones(tape.value(y).raw_dim()), &mut grads);
        let dw0 = tape.grad(wv).unwrap()[0] as f64;
        let yw = want.iter().enumerate().filter(|(i, _)| i % d == 0).map(|(_, v)| v).sum::<f64>();
        let w0 = data(&w)[0] as f64;
        assert!((dw0 - yw / w0).abs() < 1e-3 * yw.abs().max(1.0), "dw[0] {dw0} vs {}", yw / w0);
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
}
