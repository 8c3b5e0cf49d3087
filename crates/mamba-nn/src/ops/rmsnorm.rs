//! RMSNorm and Mamba-2's gated, grouped RMSNorm, fused: one pass per row, the reciprocal RMS of
//! each row (group) saved for the backward.

use ssm_kernel::par::SharedMut;
use ssm_kernel::pool::F32Buf;
use ssm_kernel::simd::dot;

use crate::ops::activation::sigmoid_row;
use crate::ops::pool;
use crate::ops::rows::{block_rows, for_row_blocks, for_row_blocks_strided};
use crate::tape::{Backward, Tape, Var};
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

/// A column block of a row-major matrix: row `r` is `data[r·stride + offset..][..len]`. Lets
/// the gated norm read its gate `z` straight out of a fused projection (and write `dz` into its
/// gradient) without a copy.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Cols<'a> {
    pub data: &'a [f32],
    pub stride: usize,
    pub offset: usize,
}

/// The sizes of a (gated) RMSNorm over rows of `d` values in groups of `gs`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct NormDims {
    pub rows: usize,
    pub d: usize,
    pub gs: usize,
    pub eps: f32,
}

/// Forward of the (gated) RMSNorm: `x` (rows, d), gate rows from `z`, `w` (d); writes `y`
/// (rows, d) and returns the reciprocal RMS of every (row, group), row-major.
pub(crate) fn norm_forward(nd: NormDims, x: &[f32], z: Option<Cols>, w: &[f32], y: &mut [f32]) -> Vec<f32> {
    let NormDims { rows, d, gs, eps } = nd;
    let ng = d / gs;
    let blocks = for_row_blocks(rows, d, [Some(y)], |range, [yb]| {
        let yb = yb.expect("y is always written");
        let mut rstd = Vec::with_capacity(range.len() * ng);
        let mut sig = if z.is_some() { vec![0.0f32; d] } else { Vec::new() };
        for (i, r) in range.enumerate() {
            let (xr, yr) = (&x[r * d..(r + 1) * d], &mut yb[i * d..(i + 1) * d]);
            // v = x ⊙ silu(z) (or x), written into y, then scaled in place.
            match z {
                Some(z) => {
                    let zr = &z.data[r * z.stride + z.offset..][..d];
                    sigmoid_row(zr, &mut sig);
                    for (((o, &a), &g), &sg) in yr.iter_mut().zip(xr).zip(zr).zip(&sig) {
                        *o = a * g * sg;
                    }
                }
                None => yr.copy_from_slice(xr),
            }
            for (yg, wg) in yr.chunks_exact_mut(gs).zip(w.chunks_exact(gs)) {
                let rs = 1.0 / (dot(yg, yg) / gs as f32 + eps).sqrt();
                for (o, &wi) in yg.iter_mut().zip(wg) {
                    *o *= rs * wi;
                }
                rstd.push(rs);
            }
        }
        rstd
    });
    blocks.concat()
}

/// Per-row scratch of the backward: `v` (the gated input), `s = silu(z)`, `sg` (σ(z), then
/// silu'(z)) and `dv`, the gradient of `v`.
struct Scratch {
    v: F32Buf,
    s: F32Buf,
    sg: F32Buf,
    dv: F32Buf,
}

/// Backward of [`norm_forward`] for upstream `dy` (rows, d): adds into `dx` (rows, d), `dw` (d)
/// and the gate gradient `dz` (rows `dz_stride` apart, starting at column `dz_offset` of its
/// slice) — or writes `dx` / `dz` when `overwrite.0` / `overwrite.1`. Per group, with `v` the gated input, `r` its reciprocal RMS and `gw = dy ⊙ w`:
/// `dv = r·gw − (r³/gs)·v·Σ(gw ⊙ v)`, `dw += dy ⊙ v · r`; through the gate
/// `dx = dv ⊙ silu(z)`, `dz = dv ⊙ x ⊙ silu'(z)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn norm_backward(
    nd: NormDims,
    (x, z, w): (&[f32], Option<Cols>, &[f32]),
    rstd: &[f32],
    dy: &[f32],
    dx: Option<&mut [f32]>,
    dw: Option<&mut [f32]>,
    dz: Option<(&mut [f32], usize, usize)>,
    overwrite: (bool, bool),
) {
    let NormDims { rows, d, gs, .. } = nd;
    let ng = d / gs;
    let want_dw = dw.is_some();
    let (dz, dz_stride, dz_off) = match dz {
        Some((s, stride, off)) => (Some(s), stride, off),
        None => (None, d, 0),
    };
    // Each block's d weight partial is a slice of one buffer taken here and given back below, so
    // the partials stay in this thread's pool step after step; row scratch comes from the pool of
    // the thread running the block.
    let per = block_rows(rows, d);
    let nblocks = rows.div_ceil(per);
    let mut partials = if want_dw { pool::take(nblocks * d) } else { Vec::new() };
    let shared = SharedMut::new(&mut partials);
    for_row_blocks_strided(rows, d, [d, dz_stride], [dx, dz], |range, [mut dxb, mut dzb]| {
        let dwp: &mut [f32] = if want_dw {
            // SAFETY: blocks start `per` rows apart, so each block owns its own d values.
            unsafe { shared.slice(range.start / per * d, d) }
        } else {
            &mut []
        };
        let gated = if z.is_some() { d } else { 0 };
        let mut sc = Scratch {
            v: F32Buf::zeroed(gated),
            s: F32Buf::zeroed(gated),
            sg: F32Buf::zeroed(gated),
            dv: F32Buf::zeroed(d),
        };
        for (i, r) in range.enumerate() {
            let (xr, gr) = (&x[r * d..(r + 1) * d], &dy[r * d..(r + 1) * d]);
            // v = x ⊙ silu(z), with silu(z) and silu'(z) from one SIMD sigmoid per element.
            if let Some(z) = z {
                let zr = &z.data[r * z.stride + z.offset..][..d];
                sigmoid_row(zr, &mut sc.sg);
                for ((((vi, si), gi), &a), &g) in
                    sc.v.iter_mut().zip(&mut sc.s).zip(&mut sc.sg).zip(xr).zip(zr)
                {
                    let sig = *gi;
                    *si = g * sig;
                    *vi = a * *si;
                    *gi = sig * (1.0 + g * (1.0 - sig));
                }
            }
            let v: &[f32] = if z.is_some() { &sc.v } else { xr };
            for g in 0..ng {
                let rs = rstd[r * ng + g];
                let cols = g * gs..(g + 1) * gs;
                // Group slices, so the loops below run over zipped slices and vectorise.
                let (gg, wg, vg) = (&gr[cols.clone()], &w[cols.clone()], &v[cols.clone()]);
                let dvg = &mut sc.dv[cols.clone()];
                for ((o, &a), &b) in dvg.iter_mut().zip(gg).zip(wg) {
                    *o = a * b;
                }
                let k = rs * rs * rs / gs as f32 * dot(dvg, vg);
                for (o, &c) in dvg.iter_mut().zip(vg) {
                    *o = rs * *o - k * c;
                }
                if want_dw {
                    for ((o, &a), &b) in dwp[cols].iter_mut().zip(gg).zip(vg) {
                        *o += a * b * rs;
                    }
                }
            }
            match (dxb.as_deref_mut(), z, overwrite.0) {
                (Some(dxb), Some(_), false) => {
                    for ((o, &a), &b) in dxb[i * d..(i + 1) * d].iter_mut().zip(&sc.dv).zip(&sc.s) {
                        *o += a * b;
                    }
                }
                (Some(dxb), Some(_), true) => {
                    for ((o, &a), &b) in dxb[i * d..(i + 1) * d].iter_mut().zip(&sc.dv).zip(&sc.s) {
                        *o = a * b;
                    }
                }
                (Some(dxb), None, false) => {
                    for (o, &a) in dxb[i * d..(i + 1) * d].iter_mut().zip(&sc.dv) {
                        *o += a;
                    }
                }
                (Some(dxb), None, true) => dxb[i * d..(i + 1) * d].copy_from_slice(&sc.dv),
                (None, ..) => {}
            }
            if let Some(dzb) = dzb.as_deref_mut() {
                let row = &mut dzb[i * dz_stride + dz_off..][..d];
                let it = row.iter_mut().zip(&sc.dv).zip(xr).zip(&sc.sg);
                if overwrite.1 {
                    for (((o, &a), &b), &c) in it {
                        *o = a * b * c;
                    }
                } else {
                    for (((o, &a), &b), &c) in it {
                        *o += a * b * c;
                    }
                }
            }
        }
    });
    if let Some(dw) = dw {
        for p in partials.chunks_exact(d) {
            for (g, v) in dw.iter_mut().zip(p) {
                *g += v;
            }
        }
    }
    pool::give(partials);
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
    let nd = NormDims { rows, d, gs, eps };
    let zc = z.map(|z| Cols { data: data(tape.value(z)), stride: d, offset: 0 });
    let mut y = for_overwrite(xv.shape());
    let rstd = norm_forward(nd, data(xv), zc, data(wv), data_mut(&mut y));
    let inputs: Vec<Var> = match z {
        Some(z) => vec![x, w, z],
        None => vec![x, w],
    };
    tape.push(y, &inputs, RmsNormBackward { op, nd, rstd })
}

/// Saved: the sizes and the reciprocal RMS of every (row, group).
struct RmsNormBackward {
    op: &'static str,
    nd: NormDims,
    rstd: Vec<f32>,
}

impl Backward for RmsNormBackward {
    fn name(&self) -> &'static str {
        self.op
    }

    fn backward(&self, inputs: &[&Tensor], out: &Tensor, dout: &Tensor, dinputs: &mut [Option<&mut Tensor>]) {
        self.backward_fresh(inputs, out, dout, dinputs, &[false; 3]);
    }

    /// See [`norm_backward`]; fresh `dx` / `dz` buffers are written, not added to.
    fn backward_fresh(
        &self,
        inputs: &[&Tensor],
        _: &Tensor,
        dout: &Tensor,
        dinputs: &mut [Option<&mut Tensor>],
        fresh: &[bool],
    ) {
        let d = self.nd.d;
        if let (Some(dw), true) = (dinputs[1].as_deref_mut(), fresh[1]) {
            dw.fill(0.0);
        }
        let z = inputs.get(2).map(|z| Cols { data: data(z), stride: d, offset: 0 });
        let (dx_slot, rest) = dinputs.split_at_mut(1);
        let (dw_slot, dz_slot) = rest.split_at_mut(1);
        let dx = dx_slot[0].as_deref_mut().map(data_mut);
        let dw = dw_slot[0].as_deref_mut().map(data_mut);
        let dz = dz_slot.first_mut().and_then(|s| s.as_deref_mut()).map(|t| (data_mut(t), d, 0));
        let io = (data(inputs[0]), z, data(inputs[1]));
        let overwrite = (fresh[0], fresh.get(2) == Some(&true));
        norm_backward(self.nd, io, &self.rstd, data(dout), dx, dw, dz, overwrite);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::check::{check_accumulates, check_op, random};
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
