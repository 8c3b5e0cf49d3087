//! RMSNorm and Mamba-2's gated, grouped RMSNorm over rows: forward, backward, and a small
//! variant for the few rows of a decode step.
//!
//! # Layouts (row-major)
//!
//! | array | layout |
//! |---|---|
//! | `x`, `y`, `dy`, `dx` | (rows, d) |
//! | `z`, `dz` (gate) | rows of `d` values in a column block ([`Cols`] / [`ColsMut`]), e.g. the `z` columns of Mamba-2's fused projection |
//! | `w`, `dw` | (d) |
//! | `rstd` | (rows, d / group): the reciprocal RMS of every (row, group) |
//!
//! # Formula
//!
//! With `v = x ⊙ silu(z)` (or `v = x` without a gate), per row and per group of `group`
//! consecutive channels:
//!
//! ```text
//! r = 1 / sqrt(mean(v²) + eps),    y = v · r · w
//! ```
//!
//! The gate is applied **before** the norm, as in transformers' `MambaRMSNormGated` and
//! mamba_ssm's `RMSNormGated(norm_before_gate=False)`; `group = d` is the plain RMSNorm.
//!
//! Backward, per group, with `gw = dy ⊙ w`: `dv = r·gw − (r³/group)·v·Σ(gw ⊙ v)`,
//! `dw += dy ⊙ v · r`; through the gate `dx = dv ⊙ silu(z)`, `dz = dv ⊙ x ⊙ silu'(z)`.
//!
//! [`norm_fwd`] and [`norm_bwd`] run one fused pass per row, in row blocks on the current rayon
//! pool when `rows · d ≥` [`PAR_MIN_ELEMS`](crate::par::PAR_MIN_ELEMS) (see
//! [`for_row_blocks`]). [`rms_rows`] is the plain loop for a handful of rows.
//!
//! ```
//! use ssm_kernel::norm::{NormArgs, NormDims, norm_fwd};
//! let dims = NormDims::new(1, 2, 2, 0.0);
//! let mut y = [0.0f32; 2];
//! let rstd = norm_fwd(&dims, &NormArgs::new(&[3.0, 4.0], &[1.0, 1.0]), &mut y);
//! assert!((rstd[0] - 1.0 / 12.5f32.sqrt()).abs() < 1e-6);
//! ```

use crate::cols::{Cols, ColsMut};
use crate::par::{SharedMut, block_rows, for_row_blocks, for_row_blocks_strided};
use crate::pool::{self, F32Buf};
use crate::simd::{dot_with, sigmoid_slice_in};

/// Sizes of a (gated) RMSNorm: `rows` rows of `d` values, normalised over groups of `group`
/// consecutive channels (`group` divides `d`), with `eps` added to the mean square.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NormDims {
    /// Number of rows.
    pub rows: usize,
    /// Values per row.
    pub d: usize,
    /// Channels per group (`d` for the plain RMSNorm).
    pub group: usize,
    /// Added to the mean square before the reciprocal square root.
    pub eps: f32,
}

impl NormDims {
    /// Dims of `rows` rows of `d` values in groups of `group`.
    pub fn new(rows: usize, d: usize, group: usize, eps: f32) -> Self {
        Self { rows, d, group, eps }
    }

    /// Groups per row, `d / group`.
    pub fn groups(&self) -> usize {
        self.d / self.group.max(1)
    }

    #[track_caller]
    fn check(&self, kernel: &str, args: &NormArgs) {
        let NormDims { rows, d, group, .. } = *self;
        assert!(group >= 1 && d.is_multiple_of(group), "{kernel}: group {group} must divide d = {d}");
        assert_eq!(args.x.len(), rows * d, "{kernel}: x must be (rows, d) = ({rows}, {d})");
        assert_eq!(args.w.len(), d, "{kernel}: w must be (d) = ({d})");
        if let (Some(z), true) = (args.z, rows > 0) {
            let need = (rows - 1) * z.stride + z.offset + d;
            assert!(z.data.len() >= need, "{kernel}: gate z holds {} values, rows need {need}", z.data.len());
        }
    }
}

/// Inputs of the norm: `x` (rows, d), an optional gate `z` (rows of `d` in a column block) and the
/// weight `w` (d).
#[derive(Clone, Copy, Debug)]
pub struct NormArgs<'a> {
    /// (rows, d).
    pub x: &'a [f32],
    /// The gate, rows of `d` values; `None` for the plain RMSNorm.
    pub z: Option<Cols<'a>>,
    /// (d).
    pub w: &'a [f32],
}

impl<'a> NormArgs<'a> {
    /// The plain (ungated) norm of `x` with weight `w`.
    pub fn new(x: &'a [f32], w: &'a [f32]) -> Self {
        Self { x, z: None, w }
    }

    /// With the gate `z`.
    pub fn with_gate(self, z: Cols<'a>) -> Self {
        Self { z: Some(z), ..self }
    }
}

/// Gradient outputs of [`norm_bwd`]; `None` skips one. `dw` is added to (`+=`); `dx` and `dz`
/// are added to, or written when their `overwrite_*` flag is set (so a fresh buffer needs no
/// zero-fill).
#[derive(Debug, Default)]
pub struct NormGrads<'a> {
    /// (rows, d).
    pub dx: Option<&'a mut [f32]>,
    /// Write `dx` instead of adding into it.
    pub overwrite_dx: bool,
    /// (d), always added to.
    pub dw: Option<&'a mut [f32]>,
    /// The gate's gradient, rows of `d` values in a column block (only with a gate).
    pub dz: Option<ColsMut<'a>>,
    /// Write `dz` instead of adding into it.
    pub overwrite_dz: bool,
}

/// Forward: writes `y` (rows, d) and returns the reciprocal RMS of every (row, group), (rows,
/// d / group) row-major, for [`norm_bwd`].
///
/// # Panics
/// If a length disagrees with `dims` or `group` does not divide `d`.
#[track_caller]
pub fn norm_fwd(dims: &NormDims, args: &NormArgs, y: &mut [f32]) -> Vec<f32> {
    dims.check("norm_fwd", args);
    let NormDims { rows, d, .. } = *dims;
    assert_eq!(y.len(), rows * d, "norm_fwd: y must be (rows, d) = ({rows}, {d})");
    let blocks = for_row_blocks(rows, d, [Some(y)], |range, [yb]| fwd_block(dims, args, range, yb));
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

/// Backward of [`norm_fwd`] for the upstream gradient `dy` (rows, d), with the forward's `rstd`;
/// see the module docs for the formulas and [`NormGrads`] for how each gradient is written.
///
/// # Panics
/// If a length disagrees with `dims`, or `dz` is given without a gate.
#[track_caller]
pub fn norm_bwd(dims: &NormDims, args: &NormArgs, rstd: &[f32], dy: &[f32], grads: NormGrads) {
    dims.check("norm_bwd", args);
    let NormDims { rows, d, .. } = *dims;
    let ng = dims.groups();
    assert_eq!(rstd.len(), rows * ng, "norm_bwd: rstd must be (rows, d / group) = ({rows}, {ng})");
    assert_eq!(dy.len(), rows * d, "norm_bwd: dy must be (rows, d) = ({rows}, {d})");
    let z = args.z;
    let NormGrads { dx, overwrite_dx, dw, dz, overwrite_dz } = grads;
    assert!(dz.is_none() || z.is_some(), "norm_bwd: dz without a gate");
    let want_dw = dw.is_some();
    let (dz, dz_stride, dz_off) = match dz {
        Some(ColsMut { data, stride, offset }) => (Some(data), stride, offset),
        None => (None, d, 0),
    };
    // Each block's d weight partial is a slice of one buffer taken here and given back below, so
    // the partials stay in this thread's pool step after step; row scratch comes from the pool of
    // the thread running the block.
    let per = block_rows(rows, d);
    let nblocks = rows.div_ceil(per);
    let mut partials = if want_dw { pool::take(nblocks * d) } else { Vec::new() };
    let shared = SharedMut::new(&mut partials);
    for_row_blocks_strided(rows, d, [d, dz_stride], [dx, dz], |range, [dxb, dzb]| {
        bwd_block(
            dims,
            args,
            (rstd, dy),
            range,
            dxb,
            dzb,
            (want_dw, overwrite_dx, overwrite_dz),
            (dz_stride, dz_off),
            (&shared, per),
        )
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

/// RMSNorm of the few rows of a decode step, on the calling thread: each row of `x` (rows, d),
/// `d = w.len()`, is normalised over groups of `group` channels and scaled by `w` (d) into
/// `out` (rows, d): `out = x · rsqrt(mean_group(x²) + eps) · w`. No saved state; the gated form
/// is [`gated_rms_rows`].
///
/// # Panics
/// If `group` does not divide `d`, or `x` and `out` are not whole rows of the same length.
#[track_caller]
pub fn rms_rows(x: &[f32], w: &[f32], group: usize, eps: f32, out: &mut [f32]) {
    let d = w.len();
    assert!(group >= 1 && d.is_multiple_of(group), "rms_rows: group {group} must divide d = {d}");
    assert!(
        x.len() == out.len() && x.len().is_multiple_of(d.max(1)),
        "rms_rows: x ({}) and out ({}) must be whole rows of {d}",
        x.len(),
        out.len()
    );
    rms_rows_in(x, w, group, eps, out);
}

/// The gated RMSNorm of a decode step's rows (Mamba-2's output norm): `v = x · silu(z)` with
/// `x`, `z` (rows, d), then `out = v · rsqrt(mean_group(v²) + eps) · w` over groups of `group`
/// channels, `w` (d). `x` is overwritten with `v`.
///
/// # Panics
/// If `group` does not divide `d`, or `x`, `z` and `out` are not whole rows of the same length.
#[track_caller]
pub fn gated_rms_rows(x: &mut [f32], z: &[f32], w: &[f32], group: usize, eps: f32, out: &mut [f32]) {
    assert_eq!(x.len(), z.len(), "gated_rms_rows: x has {} values, the gate z {}", x.len(), z.len());
    for (v, &g) in x.iter_mut().zip(z) {
        *v *= crate::activation::silu(g);
    }
    rms_rows(x, w, group, eps, out);
}

crate::simd_fn! {
    fn fwd_block[V: f8](
        dims: &NormDims,
        args: &NormArgs,
        range: std::ops::Range<usize>,
        yb: Option<&mut [f32]>,
    ) -> Vec<f32> {
        let NormDims { d, group: gs, eps, .. } = *dims;
        let (x, z, w) = (args.x, args.z, args.w);
        let ng = dims.groups();
        let yb = yb.expect("y is always written");
        let mut rstd = Vec::with_capacity(range.len() * ng);
        let mut sig = if z.is_some() { vec![0.0f32; d] } else { Vec::new() };
        for (i, r) in range.enumerate() {
            let (xr, yr) = (&x[r * d..(r + 1) * d], &mut yb[i * d..(i + 1) * d]);
            // v = x ⊙ silu(z) (or x), written into y, then scaled in place.
            match z {
                Some(z) => {
                    let zr = z.row(r, d);
                    sigmoid_slice_in::<V>(zr, &mut sig);
                    for (((o, &a), &g), &sg) in yr.iter_mut().zip(xr).zip(zr).zip(&sig) {
                        *o = a * g * sg;
                    }
                }
                None => yr.copy_from_slice(xr),
            }
            for (yg, wg) in yr.chunks_exact_mut(gs).zip(w.chunks_exact(gs)) {
                let rs = 1.0 / (dot_with::<V>(yg, yg) / gs as f32 + eps).sqrt();
                for (o, &wi) in yg.iter_mut().zip(wg) {
                    *o *= rs * wi;
                }
                rstd.push(rs);
            }
        }
        rstd
    }
}

crate::simd_fn! {
    fn bwd_block[V: f8](
        dims: &NormDims,
        args: &NormArgs,
        up: (&[f32], &[f32]),
        range: std::ops::Range<usize>,
        dxb: Option<&mut [f32]>,
        dzb: Option<&mut [f32]>,
        flags: (bool, bool, bool),
        dz_at: (usize, usize),
        partials: (&SharedMut<f32>, usize),
    ) {
        let NormDims { d, group: gs, .. } = *dims;
        let (x, z, w) = (args.x, args.z, args.w);
        let ng = dims.groups();
        let ((rstd, dy), (mut dxb, mut dzb)) = (up, (dxb, dzb));
        let ((want_dw, overwrite_dx, overwrite_dz), (dz_stride, dz_off), (shared, per)) = (flags, dz_at, partials);
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
                let zr = z.row(r, d);
                sigmoid_slice_in::<V>(zr, &mut sc.sg);
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
                let k = rs * rs * rs / gs as f32 * dot_with::<V>(dvg, vg);
                for (o, &c) in dvg.iter_mut().zip(vg) {
                    *o = rs * *o - k * c;
                }
                if want_dw {
                    for ((o, &a), &b) in dwp[cols].iter_mut().zip(gg).zip(vg) {
                        *o += a * b * rs;
                    }
                }
            }
            match (dxb.as_deref_mut(), z, overwrite_dx) {
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
                if overwrite_dz {
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
    }
}

crate::simd_fn! {
    /// The loops of [`rms_rows`], on the active instruction set.
    fn rms_rows_in[S: isa](x: &[f32], w: &[f32], group: usize, eps: f32, out: &mut [f32]) {
        let d = w.len();
        for (xs, os) in x.chunks_exact(group).zip(out.chunks_exact_mut(group)) {
            let ms = xs.iter().map(|v| v * v).sum::<f32>() / group as f32;
            let r = 1.0 / (ms + eps).sqrt();
            os.copy_from_slice(xs);
            os.iter_mut().for_each(|o| *o *= r);
        }
        if d > 0 {
            for row in out.chunks_exact_mut(d) {
                row.iter_mut().zip(w).for_each(|(o, g)| *o *= g);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::norm::rms_norm as reference;
    use crate::testing::{Rng, assert_rel_max, numeric_grad, to_f32};

    /// Forward and every gradient against the f64 reference and its central differences, the
    /// gate read from (and `dz` written into) a strided column block, in both write modes; small
    /// rows and the parallel row blocks.
    #[test]
    fn forward_and_backward_match_reference() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for (rows, d, gs, gated) in [(3, 7, 7, false), (4, 9, 3, true), (300, 256, 64, true)] {
            let mut r = Rng(rows as u64 * 31 + d as u64);
            let (stride, off) = (d + 5, 2);
            let x = r.vec(rows * d, -2.0, 2.0);
            let zb = r.vec(rows * stride, -3.0, 3.0);
            let w = r.vec(d, 0.5, 1.5);
            let dy = r.vec(rows * d, -1.0, 1.0);
            let z: Vec<f64> = (0..rows).flat_map(|i| zb[i * stride + off..][..d].to_vec()).collect();
            let (xf, zf, wf, dyf) = (to_f32(&x), to_f32(&zb), to_f32(&w), to_f32(&dy));
            let dims = NormDims::new(rows, d, gs, 1e-5);
            let mut args = NormArgs::new(&xf, &wf);
            if gated {
                args = args.with_gate(Cols { data: &zf, stride, offset: off });
            }
            let zr = gated.then_some(&z[..]);
            let mut y = vec![f32::NAN; rows * d];
            let rstd = pool.install(|| norm_fwd(&dims, &args, &mut y));
            assert_rel_max("y", &y, &reference(&x, zr, &w, d, gs, 1e-5), 1e-5, 1.0);
            let loss = |x: &[f64], z: Option<&[f64]>, w: &[f64]| {
                reference(x, z, w, d, gs, 1e-5).iter().zip(&dy).map(|(a, b)| a * b).sum::<f64>()
            };
            let small = rows * d < 100;
            for overwrite in [false, true] {
                let mut dx = vec![if overwrite { f32::NAN } else { 0.5 }; rows * d];
                let mut dzb = vec![if overwrite { f32::NAN } else { 0.5 }; rows * stride];
                let mut dw = vec![0.0f32; d];
                let grads = NormGrads {
                    dx: Some(&mut dx),
                    overwrite_dx: overwrite,
                    dw: Some(&mut dw),
                    dz: gated.then(|| ColsMut { data: &mut dzb[..], stride, offset: off }),
                    overwrite_dz: overwrite,
                };
                pool.install(|| norm_bwd(&dims, &args, &rstd, &dyf, grads));
                let base = if overwrite { 0.0 } else { 0.5 };
                let unbase = |v: &[f32]| v.iter().map(|g| g - base).collect::<Vec<f32>>();
                if small {
                    let want_dx = numeric_grad(&x, 1e-6, |xi| loss(xi, zr, &w));
                    assert_rel_max("dx", &unbase(&dx), &want_dx, 1e-4, 1e-3);
                    let want_dw = numeric_grad(&w, 1e-6, |wi| loss(&x, zr, wi));
                    assert_rel_max("dw", &dw, &want_dw, 1e-4, 1e-3);
                    if gated {
                        let want_dz = numeric_grad(&z, 1e-6, |zi| loss(&x, Some(zi), &w));
                        let got: Vec<f32> =
                            (0..rows).flat_map(|i| unbase(&dzb[i * stride + off..][..d])).collect();
                        assert_rel_max("dz", &got, &want_dz, 1e-4, 1e-3);
                    }
                } else {
                    // Large: dw for this dy against the f64 formula Σ_rows dy ⊙ v · r.
                    let yr = reference(&x, zr, &vec![1.0; d], d, gs, 1e-5);
                    let want: Vec<f64> =
                        (0..d).map(|j| (0..rows).map(|i| dy[i * d + j] * yr[i * d + j]).sum()).collect();
                    assert_rel_max("dw (parallel)", &dw, &want, 1e-4, 1e-3);
                }
                // Columns outside the gate block are untouched.
                if gated {
                    assert!(
                        dzb.chunks(stride).all(|row| row[..off].iter().all(|&v| v == base || v.is_nan()))
                    );
                }
            }
        }
    }

    #[test]
    fn rms_rows_matches_naive_loop() {
        for (rows, d, group) in [(1usize, 7usize, 7usize), (3, 12, 4), (2, 33, 11), (5, 64, 64)] {
            let mut r = Rng(d as u64);
            let x = to_f32(&r.vec(rows * d, -2.0, 2.0));
            let w = to_f32(&r.vec(d, 0.5, 1.5));
            let mut out = vec![f32::NAN; rows * d];
            rms_rows(&x, &w, group, 1e-5, &mut out);
            let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            let w64: Vec<f64> = w.iter().map(|&v| v as f64).collect();
            assert_rel_max("rms_rows", &out, &reference(&x64, None, &w64, d, group, 1e-5), 1e-5, 1.0);
        }
    }

    #[test]
    fn gated_rms_rows_matches_naive_loop() {
        for (rows, d, group) in [(1usize, 8usize, 4usize), (3, 12, 12), (2, 33, 11)] {
            let mut r = Rng(100 + d as u64);
            let mut x = to_f32(&r.vec(rows * d, -2.0, 2.0));
            let z = to_f32(&r.vec(rows * d, -3.0, 3.0));
            let w = to_f32(&r.vec(d, 0.5, 1.5));
            let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            let z64: Vec<f64> = z.iter().map(|&v| v as f64).collect();
            let w64: Vec<f64> = w.iter().map(|&v| v as f64).collect();
            let mut out = vec![f32::NAN; rows * d];
            gated_rms_rows(&mut x, &z, &w, group, 1e-5, &mut out);
            let want = reference(&x64, Some(&z64), &w64, d, group, 1e-5);
            assert_rel_max("gated_rms_rows", &out, &want, 1e-5, 1.0);
        }
    }
}
