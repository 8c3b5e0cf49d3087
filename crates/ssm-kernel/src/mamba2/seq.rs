//! Fast sequential Mamba-2 scan (f32, SIMD over the head dimension, threads over (batch, head)).
//!
//! Each task owns one (batch row, head) and keeps the head's state transposed to (N, P) in
//! 8-lane vectors, `P` padded up to a multiple of 8 with zeros (padding lanes stay zero because
//! the padded `x` is zero). One step is then, for every `n`,
//!
//! ```text
//! h[n][p..p+8] = ā · h[n][p..p+8] + B[n] · (Δ·x)[p..p+8]
//! y[p..p+8]   += h[n][p..p+8] · C[n]
//! ```
//!
//! with `y` held in registers across the `n` loop for blocks of up to 64 lanes of `P`: no
//! horizontal sums, one `exp` per (t, h), the state (`N·P` floats, 16 KB for N = P = 64) in L1.

use rayon::prelude::*;
use wide::f32x8;

use super::common::{TaskScalars, blocks, dt_eff, reduce_group_partials, state_in, state_out};
use super::{Scan2Args, Scan2Dims, Scan2Grads, Scan2Out, check_step, check_upstream};
use crate::Real;
use crate::par::SharedMut;
use crate::simd::{self, W};

/// In-place update of lanes `j0..j0+M` of the (N, pv) state; when `Y`, returns `Σ_n h·C[n]`.
#[inline(always)]
fn update<const M: usize, const Y: bool>(
    st: &mut [f32x8],
    pv: usize,
    j0: usize,
    av: f32x8,
    brow: &[f32],
    crow: &[f32],
    dx: &[f32x8],
) -> [f32x8; M] {
    let dxl: [f32x8; M] = std::array::from_fn(|i| dx[j0 + i]);
    let mut acc = [f32x8::ZERO; M];
    for (k, (&bk, &ck)) in brow.iter().zip(crow).enumerate() {
        let (bk, ck) = (f32x8::splat(bk), f32x8::splat(ck));
        let row: &mut [f32x8; M] = (&mut st[k * pv + j0..k * pv + j0 + M]).try_into().unwrap();
        for i in 0..M {
            let v = row[i].mul_add(av, bk * dxl[i]);
            row[i] = v;
            if Y {
                acc[i] = v.mul_add(ck, acc[i]);
            }
        }
    }
    acc
}

/// One full step of the (N, pv) state; when `Y`, writes `Σ_n h·C[n]` into `acc` (pv vectors).
#[inline(always)]
fn step_state<const Y: bool>(
    st: &mut [f32x8],
    pv: usize,
    av: f32x8,
    brow: &[f32],
    crow: &[f32],
    dx: &[f32x8],
    acc: &mut [f32x8],
) {
    blocks(pv, |j0, m| match m {
        8 => acc[j0..j0 + 8].copy_from_slice(&update::<8, Y>(st, pv, j0, av, brow, crow, dx)),
        4 => acc[j0..j0 + 4].copy_from_slice(&update::<4, Y>(st, pv, j0, av, brow, crow, dx)),
        _ => acc[j0..j0 + 1].copy_from_slice(&update::<1, Y>(st, pv, j0, av, brow, crow, dx)),
    });
}

/// Loads `Δ·x_t` (pv vectors, zero-padded) and `x_t` from the row `xrow` (P values).
#[inline(always)]
fn load_x(xrow: &[f32], dt: f32, xv: &mut [f32x8], dxv: &mut [f32x8]) {
    let dtv = f32x8::splat(dt);
    for j in 0..xv.len() {
        let v = simd::load(&xrow[j * W..]);
        xv[j] = v;
        dxv[j] = v * dtv;
    }
}

/// Forward scan. Layouts: see [`Scan2Args`] and [`Scan2Out`]; math: the [module docs](super).
///
/// Each (b, h) task keeps its state transposed to (N, P) in 8-lane vectors (P padded to a
/// multiple of 8), so a step is `h[n][p..p+8] = ā·h[n][p..p+8] + B[n]·(Δx)[p..p+8]` and
/// `y[p..p+8] += h[n][p..p+8]·C[n]` with `y` in registers: no horizontal sums, one `exp` per
/// (t, h), the state in L1 for N·P ≤ 4096.
///
/// Runs `B·H` independent tasks on the current rayon pool. Allocates `(N + 3)·⌈P/8⌉` vectors per
/// task, nothing inside the time loop.
#[track_caller]
pub fn scan_fwd(dims: &Scan2Dims, args: &Scan2Args<f32>, out: Scan2Out<f32>) {
    const K: &str = "mamba2::scan_fwd";
    args.check(K, dims);
    out.check(K, dims);
    let Scan2Dims { batch, seqlen, nheads, headdim: pd, dstate: n, ngroups } = *dims;
    let Scan2Out { y, h_last } = out;
    let ysh = SharedMut::new(y);
    let hlsh = h_last.map(SharedMut::new);
    let pv = pd.div_ceil(W);
    (0..batch * nheads).into_par_iter().for_each(|task| {
        let (b, h) = (task / nheads, task % nheads);
        let g = dims.group_of(h);
        let mut st = vec![f32x8::ZERO; n * pv];
        let mut xv = vec![f32x8::ZERO; pv];
        let mut dxv = vec![f32x8::ZERO; pv];
        let mut acc = vec![f32x8::ZERO; pv];
        let s0 = task * pd * n;
        if let Some(h0) = args.h0 {
            state_in(&h0[s0..s0 + pd * n], pd, n, pv, &mut st);
        }
        let a = args.a[h];
        let dv = f32x8::splat(args.d.map_or(0.0, |d| d[h]));
        for t in 0..seqlen {
            let ih = (b * seqlen + t) * nheads + h;
            let bc = ((b * seqlen + t) * ngroups + g) * n;
            let (dt, _) = dt_eff(args, ih, h);
            let av = f32x8::splat((dt * a).exp());
            load_x(&args.x[ih * pd..ih * pd + pd], dt, &mut xv, &mut dxv);
            let (brow, crow) = (&args.b[bc..bc + n], &args.c[bc..bc + n]);
            step_state::<true>(&mut st, pv, av, brow, crow, &dxv, &mut acc);
            // SAFETY: row `ih` of y belongs to this (b, h) task only.
            let yrow = unsafe { ysh.slice(ih * pd, pd) };
            for j in 0..pv {
                let mut v = dv.mul_add(xv[j], acc[j]);
                if let Some(z) = args.z {
                    v *= simd::silu(simd::load(&z[ih * pd + j * W..ih * pd + pd]));
                }
                simd::store(&mut yrow[j * W..], v);
            }
        }
        if let Some(hl) = hlsh {
            // SAFETY: the (b, h) state block belongs to this task only.
            state_out(&st, pd, n, pv, unsafe { hl.slice(s0, pd * n) }, false);
        }
    });
}

/// Checkpoint interval of the sequential backward: `⌈√L⌉`, at least 8.
fn ckpt_len(seqlen: usize) -> usize {
    (seqlen as f64).sqrt().ceil().max(8.0) as usize
}

/// Backward block: lanes `j0..j0+M`, all `n`; see [`scan_bwd`]. Returns the lane partials of
/// `Σ_{n,p} G·h_{t−1}`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn back<const M: usize>(
    gs: &mut [f32x8],
    hcur: &[f32x8],
    hprev: &[f32x8],
    pv: usize,
    j0: usize,
    av: f32x8,
    brow: &[f32],
    crow: &[f32],
    dyy: &[f32x8],
    xv: &[f32x8],
    dxacc: &mut [f32x8],
    dcn: &mut [f32],
    sn: &mut [f32],
) -> f32x8 {
    let dy: [f32x8; M] = std::array::from_fn(|i| dyy[j0 + i]);
    let x: [f32x8; M] = std::array::from_fn(|i| xv[j0 + i]);
    let mut dxa = [f32x8::ZERO; M];
    let mut q = [f32x8::ZERO; M];
    for k in 0..brow.len() {
        let (bk, ck) = (f32x8::splat(brow[k]), f32x8::splat(crow[k]));
        let off = k * pv + j0;
        let gr: &mut [f32x8; M] = (&mut gs[off..off + M]).try_into().unwrap();
        let hc: &[f32x8; M] = hcur[off..off + M].try_into().unwrap();
        let hp: &[f32x8; M] = hprev[off..off + M].try_into().unwrap();
        let (mut dca, mut sa) = (f32x8::ZERO, f32x8::ZERO);
        for i in 0..M {
            let gv = ck.mul_add(dy[i], gr[i]);
            dca = hc[i].mul_add(dy[i], dca);
            sa = gv.mul_add(x[i], sa);
            dxa[i] = gv.mul_add(bk, dxa[i]);
            q[i] = gv.mul_add(hp[i], q[i]);
            gr[i] = gv * av;
        }
        dcn[k] += dca.reduce_add();
        sn[k] += sa.reduce_add();
    }
    dxacc[j0..j0 + M].copy_from_slice(&dxa);
    q.iter().fold(f32x8::ZERO, |s, &v| s + v)
}

/// Backward scan: adds the gradients of `Σ dy·y + Σ dh_last·h_last` into `grads`.
///
/// `dy` is (B, L, H, P); `dh_last` (B, H, P, N) is the gradient of the final state (zero when
/// absent). The reverse scan runs the state adjoint `G_t = C_t ⊗ dy'_t + ā_{t+1}·G_{t+1}` (see
/// [`crate::reference::mamba2::scan_bwd`] for every gradient formula).
///
/// **Memory policy.** Nothing of size (B, L, H, P, N) is materialised. Each (b, h) task runs the
/// forward once keeping only the state at every `K = max(8, ⌈√L⌉)`-th step (`⌈L/K⌉` checkpoints
/// of `N·P` floats), then walks the chunks backwards, recomputing the `K` states of a chunk from
/// its checkpoint into a `(K + 1)·N·P` buffer: `O(√L·N·P)` floats per task (≈ 0.5 MB for
/// L = 256, N = P = 64) and one extra forward. `dB`/`dC` are shared by the heads of a group, so
/// each task writes its own (L, N) partials into two `(B, H, L, N)` buffers that a parallel pass
/// then sums into `db`/`dc` (`2·B·H·L·N` floats); the per-head `dA`, `dD` and dΔ-bias are
/// returned by the tasks and summed in `f64`.
#[track_caller]
pub fn scan_bwd(
    dims: &Scan2Dims,
    args: &Scan2Args<f32>,
    dy: &[f32],
    dh_last: Option<&[f32]>,
    grads: Scan2Grads<f32>,
) {
    const K: &str = "mamba2::scan_bwd";
    args.check(K, dims);
    check_upstream(K, dims, dy, dh_last);
    grads.check(K, dims);
    let Scan2Dims { batch, seqlen, nheads, headdim: pd, dstate: n, ngroups } = *dims;
    let Scan2Grads { dx, ddelta, da, db, dc, dd, dz, ddelta_bias, dh0 } = grads;
    let pv = pd.div_ceil(W);
    let ck = ckpt_len(seqlen);
    let nck = seqlen.div_ceil(ck);
    let sz = n * pv;
    let mut db_part = vec![0.0f32; batch * nheads * seqlen * n];
    let mut dc_part = vec![0.0f32; batch * nheads * seqlen * n];
    let (dbp, dcp) = (SharedMut::new(&mut db_part), SharedMut::new(&mut dc_part));
    let dxsh = SharedMut::new(dx);
    let ddsh = SharedMut::new(ddelta);
    let dzsh = dz.map(SharedMut::new);
    let dh0sh = dh0.map(SharedMut::new);
    let scalars: Vec<TaskScalars> = (0..batch * nheads)
        .into_par_iter()
        .map(|task| {
            let (b, h) = (task / nheads, task % nheads);
            let g = dims.group_of(h);
            let a = args.a[h];
            let dmul = args.d.map_or(0.0, |d| d[h]);
            let dv = f32x8::splat(dmul);
            let s0 = task * pd * n;
            let mut ckpts = vec![f32x8::ZERO; nck * sz];
            let mut buf = vec![f32x8::ZERO; (ck + 1) * sz];
            let mut ypre = vec![f32x8::ZERO; if args.z.is_some() { ck * pv } else { 0 }];
            let mut gs = vec![f32x8::ZERO; sz];
            let mut xv = vec![f32x8::ZERO; pv];
            let mut dxv = vec![f32x8::ZERO; pv];
            let mut acc = vec![f32x8::ZERO; pv];
            let mut dyy = vec![f32x8::ZERO; pv];
            let (mut dcn, mut sn) = (vec![0.0f32; n], vec![0.0f32; n]);
            let mut out = TaskScalars::default();
            // Forward pass keeping checkpoints.
            let mut st = vec![f32x8::ZERO; sz];
            if let Some(h0) = args.h0 {
                state_in(&h0[s0..s0 + pd * n], pd, n, pv, &mut st);
            }
            for t in 0..seqlen {
                if t % ck == 0 {
                    ckpts[(t / ck) * sz..(t / ck + 1) * sz].copy_from_slice(&st);
                }
                let ih = (b * seqlen + t) * nheads + h;
                let bc = ((b * seqlen + t) * ngroups + g) * n;
                let (dt, _) = dt_eff(args, ih, h);
                let av = f32x8::splat((dt * a).exp());
                load_x(&args.x[ih * pd..ih * pd + pd], dt, &mut xv, &mut dxv);
                let (brow, crow) = (&args.b[bc..bc + n], &args.c[bc..bc + n]);
                step_state::<false>(&mut st, pv, av, brow, crow, &dxv, &mut acc);
            }
            if let Some(dl) = dh_last {
                state_in(&dl[s0..s0 + pd * n], pd, n, pv, &mut gs);
            }
            // SAFETY (all `slice` calls below): rows indexed by (b, ·, h) and the task's own
            // partial-buffer region belong to this task only.
            for c in (0..nck).rev() {
                let (t0, t1) = (c * ck, ((c + 1) * ck).min(seqlen));
                buf[..sz].copy_from_slice(&ckpts[c * sz..(c + 1) * sz]);
                for t in t0..t1 {
                    let i = t - t0;
                    let ih = (b * seqlen + t) * nheads + h;
                    let bc = ((b * seqlen + t) * ngroups + g) * n;
                    let (dt, _) = dt_eff(args, ih, h);
                    let av = f32x8::splat((dt * a).exp());
                    load_x(&args.x[ih * pd..ih * pd + pd], dt, &mut xv, &mut dxv);
                    let (brow, crow) = (&args.b[bc..bc + n], &args.c[bc..bc + n]);
                    let (old, new) = buf.split_at_mut((i + 1) * sz);
                    let new = &mut new[..sz];
                    new.copy_from_slice(&old[i * sz..]);
                    if args.z.is_some() {
                        step_state::<true>(new, pv, av, brow, crow, &dxv, &mut acc);
                        for j in 0..pv {
                            ypre[i * pv + j] = dv.mul_add(xv[j], acc[j]);
                        }
                    } else {
                        step_state::<false>(new, pv, av, brow, crow, &dxv, &mut acc);
                    }
                }
                for t in (t0..t1).rev() {
                    let i = t - t0;
                    let ih = (b * seqlen + t) * nheads + h;
                    let bc = ((b * seqlen + t) * ngroups + g) * n;
                    let (dt, dsp) = dt_eff(args, ih, h);
                    let abar = (dt * a).exp();
                    let av = f32x8::splat(abar);
                    let xr = &args.x[ih * pd..ih * pd + pd];
                    let dyr = &dy[ih * pd..ih * pd + pd];
                    load_x(xr, dt, &mut xv, &mut dxv);
                    let mut ddacc = f32x8::ZERO;
                    for j in 0..pv {
                        let mut d = simd::load(&dyr[j * W..]);
                        if let Some(z) = args.z {
                            let zv = simd::load(&z[ih * pd + j * W..ih * pd + pd]);
                            let s = simd::sigmoid(zv);
                            if let Some(dzs) = dzsh {
                                let grad = s * (f32x8::ONE + zv * (f32x8::ONE - s));
                                let dzrow = unsafe { dzs.slice(ih * pd, pd) };
                                simd::add_store(&mut dzrow[j * W..], d * ypre[i * pv + j] * grad);
                            }
                            d *= zv * s;
                        }
                        dyy[j] = d;
                        ddacc = d.mul_add(xv[j], ddacc);
                    }
                    out.dd += ddacc.reduce_add() as f64;
                    dcn.fill(0.0);
                    sn.fill(0.0);
                    let (brow, crow) = (&args.b[bc..bc + n], &args.c[bc..bc + n]);
                    let hcur = &buf[(i + 1) * sz..(i + 2) * sz];
                    let hprev = &buf[i * sz..(i + 1) * sz];
                    let mut qv = f32x8::ZERO;
                    blocks(pv, |j0, m| {
                        qv += match m {
                            8 => back::<8>(
                                &mut gs, hcur, hprev, pv, j0, av, brow, crow, &dyy, &xv, &mut acc, &mut dcn,
                                &mut sn,
                            ),
                            4 => back::<4>(
                                &mut gs, hcur, hprev, pv, j0, av, brow, crow, &dyy, &xv, &mut acc, &mut dcn,
                                &mut sn,
                            ),
                            _ => back::<1>(
                                &mut gs, hcur, hprev, pv, j0, av, brow, crow, &dyy, &xv, &mut acc, &mut dcn,
                                &mut sn,
                            ),
                        }
                    });
                    let q = qv.reduce_add();
                    let prow = (task * seqlen + t) * n;
                    let dbr = unsafe { dbp.slice(prow, n) };
                    let dcr = unsafe { dcp.slice(prow, n) };
                    let mut ddt = a * abar * q;
                    for k in 0..n {
                        dcr[k] = dcn[k];
                        dbr[k] = dt * sn[k];
                        ddt += brow[k] * sn[k];
                    }
                    out.da += (dt * abar * q) as f64;
                    let dxrow = unsafe { dxsh.slice(ih * pd, pd) };
                    let dtv = f32x8::splat(dt);
                    for j in 0..pv {
                        simd::add_store(&mut dxrow[j * W..], dv.mul_add(dyy[j], dtv * acc[j]));
                    }
                    let draw = ddt * dsp;
                    let dd1 = unsafe { ddsh.slice(ih, 1) };
                    dd1[0] += draw;
                    out.dbias += draw as f64;
                }
            }
            if let Some(dh0) = dh0sh {
                state_out(&gs, pd, n, pv, unsafe { dh0.slice(s0, pd * n) }, true);
            }
            out
        })
        .collect();
    TaskScalars::scatter(&scalars, dims, args, da, dd, ddelta_bias);
    reduce_group_partials(dims, &db_part, db);
    reduce_group_partials(dims, &dc_part, dc);
}

/// One recurrent step for every batch row: `state` (B, H, P, N) (HF's `ssm_state` layout) is
/// updated in place and `y` (B, H, P) overwritten. `dims.seqlen` must be 1, so `args.x`,
/// `args.z` are (B, H, P), `args.delta` is (B, H) and `args.b`, `args.c` are (B, G, N);
/// `args.h0` must be `None`.
///
/// Works directly in the (P, N) layout, vectorised over `N` (one horizontal sum per `p`), so no
/// transposes; (b, h) tasks run on the current rayon pool in batches of ≥ 32 K state elements.
#[track_caller]
pub fn scan_step(dims: &Scan2Dims, args: &Scan2Args<f32>, state: &mut [f32], y: &mut [f32]) {
    const K: &str = "mamba2::scan_step";
    check_step(K, dims, args, state, y);
    let Scan2Dims { nheads, headdim: pd, dstate: n, ngroups, .. } = *dims;
    let sz = pd * n;
    let min_len = (32768 / sz.max(1)).max(1);
    state.par_chunks_mut(sz).zip(y.par_chunks_mut(pd)).enumerate().with_min_len(min_len).for_each(
        |(task, (st, yr))| {
            let (b, h) = (task / nheads, task % nheads);
            let bc = (b * ngroups + dims.group_of(h)) * n;
            let (brow, crow) = (&args.b[bc..bc + n], &args.c[bc..bc + n]);
            let (dt, _) = dt_eff(args, task, h);
            let av = f32x8::splat((dt * args.a[h]).exp());
            let dmul = args.d.map_or(0.0, |d| d[h]);
            for p in 0..pd {
                let x = args.x[task * pd + p];
                let dxv = f32x8::splat(dt * x);
                let row = &mut st[p * n..(p + 1) * n];
                let mut acc = f32x8::ZERO;
                for k in (0..n).step_by(W) {
                    let v = simd::load(&row[k..]).mul_add(av, dxv * simd::load(&brow[k..]));
                    simd::store(&mut row[k..], v);
                    acc = v.mul_add(simd::load(&crow[k..]), acc);
                }
                let mut v = acc.reduce_add() + dmul * x;
                if let Some(z) = args.z {
                    v *= z[task * pd + p].silu();
                }
                yr[p] = v;
            }
        },
    );
}
