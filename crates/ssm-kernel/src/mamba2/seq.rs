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

use super::common::{BwdShared, GroupPartials, TaskScalars, blocks, dt_eff, state_in, state_out, take};
use super::{Scan2Args, Scan2Dims, Scan2Grads, Scan2Out, check_step, check_upstream};
use crate::par::SharedMut;
use crate::simd::{self, V8, Vf32, W};
use crate::team;

/// In-place update of lanes `j0..j0+M` of the (N, pv) state; when `Y`, returns `Σ_n h·C[n]`.
#[inline(always)]
fn update<V: V8, const M: usize, const Y: bool>(
    st: &mut [V],
    pv: usize,
    j0: usize,
    av: V,
    brow: &[f32],
    crow: &[f32],
    dx: &[V],
) -> [V; M] {
    let dxl: [V; M] = take(dx, j0);
    let mut acc = [V::ZERO; M];
    for (k, (&bk, &ck)) in brow.iter().zip(crow).enumerate() {
        let (bk, ck) = (V::splat(bk), V::splat(ck));
        let row: &mut [V; M] = (&mut st[k * pv + j0..k * pv + j0 + M]).try_into().unwrap();
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
pub(crate) fn step_state<V: V8, const Y: bool>(
    st: &mut [V],
    pv: usize,
    av: V,
    brow: &[f32],
    crow: &[f32],
    dx: &[V],
    acc: &mut [V],
) {
    blocks!(pv, |j0, M| acc[j0..j0 + M].copy_from_slice(&update::<V, M, Y>(st, pv, j0, av, brow, crow, dx)));
}

/// Loads `Δ·x_t` (pv vectors, zero-padded) and `x_t` from the row `xrow` (P values).
#[inline(always)]
pub(crate) fn load_x<V: V8>(xrow: &[f32], dt: f32, xv: &mut [V], dxv: &mut [V]) {
    let dtv = V::splat(dt);
    if xrow.len() == xv.len() * W {
        // P a multiple of 8: plain vector loads.
        for (j, (x, dx)) in xv.iter_mut().zip(dxv.iter_mut()).enumerate() {
            let v = V::load_full(&xrow[j * W..]);
            *x = v;
            *dx = v * dtv;
        }
    } else {
        for j in 0..xv.len() {
            let v = V::load(&xrow[j * W..]);
            xv[j] = v;
            dxv[j] = v * dtv;
        }
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
    let Scan2Dims { batch, nheads, .. } = *dims;
    let Scan2Out { y, h_last } = out;
    let ysh = SharedMut::new(y);
    let hlsh = h_last.map(SharedMut::new);
    (0..batch * nheads).into_par_iter().for_each(|task| fwd_head(dims, args, &ysh, hlsh.as_ref(), task));
}

/// Pass 1 of the backward, lanes `j0..j0+M`: adds `Σ_p h[n][p]·dy'[p]` (that is, `dC_t[n]`)
/// into `dcn[n]` for every `n`.
#[inline(always)]
pub(crate) fn dc_block<V: V8, const M: usize>(st: &[V], pv: usize, j0: usize, dyy: &[V], dcn: &mut [f32]) {
    let dy: [V; M] = take(dyy, j0);
    for (k, o) in dcn.iter_mut().enumerate() {
        let row: &[V; M] = st[k * pv + j0..k * pv + j0 + M].try_into().unwrap();
        let mut acc = row[0] * dy[0];
        for i in 1..M {
            acc = row[i].mul_add(dy[i], acc);
        }
        *o += acc.reduce_add();
    }
}

/// Pass 2 of the backward, lanes `j0..j0+M`: the adjoint step `G = C[n]·dy' + carry` (the
/// carry `gs` holds `ā_{t+1}·G_{t+1}` and becomes `ā_t·G_t`), writing `Σ_n G·B[n]` into
/// `dxacc` and adding `Σ_p G·x` into `sn[n]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn adjoint_block<V: V8, const M: usize>(
    gs: &mut [V],
    pv: usize,
    j0: usize,
    av: V,
    brow: &[f32],
    crow: &[f32],
    dyy: &[V],
    xv: &[V],
    dxacc: &mut [V],
    sn: &mut [f32],
) {
    let dy: [V; M] = take(dyy, j0);
    let x: [V; M] = take(xv, j0);
    let mut dxa = [V::ZERO; M];
    for k in 0..brow.len() {
        let (bk, ck) = (V::splat(brow[k]), V::splat(crow[k]));
        let gr: &mut [V; M] = (&mut gs[k * pv + j0..k * pv + j0 + M]).try_into().unwrap();
        let mut sa = V::ZERO;
        for i in 0..M {
            let gv = ck.mul_add(dy[i], gr[i]);
            sa = gv.mul_add(x[i], sa);
            dxa[i] = gv.mul_add(bk, dxa[i]);
            gr[i] = gv * av;
        }
        sn[k] += sa.reduce_add();
    }
    dxacc[j0..j0 + M].copy_from_slice(&dxa);
}

/// The gated upstream gradient of step `t` into `dyy` (pv vectors): `dy' = dy·silu(z)` (or
/// `dy`). With `ypre` (the pre-gate output, pv vectors) also adds `dz += dy·ypre·silu'(z)` into
/// `dzrow`. Returns the lane partials of `Σ_p dy'·x`.
#[inline(always)]
fn gated_dy<V: V8>(
    dyr: &[f32],
    zr: Option<&[f32]>,
    xv: &[V],
    ypre: Option<&[V]>,
    mut dzrow: Option<&mut [f32]>,
    dyy: &mut [V],
) -> V {
    let mut xdy = V::ZERO;
    for j in 0..dyy.len() {
        let mut d = V::load(&dyr[j * W..]);
        if let Some(zr) = zr {
            let zv = V::load(&zr[j * W..]);
            let s = simd::sigmoid(zv);
            if let (Some(dz), Some(yp)) = (dzrow.as_deref_mut(), ypre) {
                let grad = s * (V::ONE + zv * (V::ONE - s));
                V::add_store(&mut dz[j * W..], d * yp[j] * grad);
            }
            d *= zv * s;
        }
        dyy[j] = d;
        xdy = d.mul_add(xv[j], xdy);
    }
    xdy
}

/// Backward scan: adds the gradients of `Σ dy·y + Σ dh_last·h_last` into `grads`.
///
/// `dy` is (B, L, H, P); `dh_last` (B, H, P, N) is the gradient of the final state (zero when
/// absent). Every gradient formula is that of [`crate::reference::mamba2::scan_bwd`]; what
/// differs is how the one term that pairs the forward state with the backward adjoint,
/// `q_t = Σ G_t ⊙ h_{t−1}` (the gradient of the decay `ā_t`), is obtained without storing or
/// recomputing states.
///
/// **Two scans, no stored states.** Write `W(s, u)` for the contribution of input step `s`
/// through the state to output step `u > s` (decays `ā_{s+1}…ā_u`). Then `ā_t·q_t = M(t) =
/// Σ_{s<t≤u} W(s, u)`, and `M(t) − M(t+1) = α_t − β_t` with
///
/// ```text
/// α_t = Σ_{s<t} W(s, t) = dy'_t·(C_t·h_t) − Δ_t (B_t·C_t)(x_t·dy'_t)     (forward quantities)
/// β_t = Σ_{u>t} W(t, u) = Δ_t Σ_n B_t[n] s_t[n] − Δ_t (B_t·C_t)(x_t·dy'_t), s_t = G_tᵀ x_t
/// M(L) = ⟨h_{L−1}, dh_last⟩
/// ```
///
/// So each (b, h) task runs the state **forward** once (which also gives `dC_t = h_t·dy'_t`,
/// the gate's `dz` and `α_t`), then the adjoint `G_t = C_t ⊗ dy'_t + ā_{t+1} G_{t+1}`
/// **backward** (giving `dx`, `dB`, `β_t`, and `M(t)` by a running sum in `f64`). Memory per
/// task: the state (`N·P` floats, in L1) and `L` scalars; ~4 vector ops per state element per
/// pass. `dB`/`dC` are shared by the heads of a group, so each task writes (L, N) partials into
/// two `(B, H, L, N)` buffers that a parallel pass sums into `db`/`dc`; the per-head `dA`, `dD`
/// and dΔ-bias are returned by the tasks and summed in `f64`.
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
    let Scan2Dims { batch, nheads, .. } = *dims;
    let Scan2Grads { dx, ddelta, da, db, dc, dd, dz, ddelta_bias, dh0 } = grads;
    let mut parts = GroupPartials::new(dims);
    let sh = BwdShared::new(&mut parts, dx, ddelta, dz, dh0);
    let scalars: Vec<TaskScalars> = (0..batch * nheads)
        .into_par_iter()
        .map(|task| bwd_head(dims, args, (dy, dh_last), &sh, task))
        .collect();
    TaskScalars::scatter(&scalars, dims, args, da, dd, ddelta_bias);
    parts.finish(dims, db, dc);
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
    let Scan2Dims { headdim: pd, dstate: n, .. } = *dims;
    let sz = pd * n;
    let tasks = state.len().checked_div(sz).unwrap_or(0);
    {
        let (sts, ys) = (SharedMut::new(state), SharedMut::new(y));
        let part = |p: usize, parts: usize| {
            for task in team::part_range(tasks, p, parts, 1) {
                // SAFETY: the (b, h) state block and output row belong to this task only.
                let (st, yr) = unsafe { (sts.slice(task * sz, sz), ys.slice(task * pd, pd)) };
                step_head(dims, args, task, st, yr);
            }
        };
        // A state element (a multiply-add into it, one out of it) counts as 2 multiply-adds.
        if team::try_run(2 * tasks * sz, &part) {
            return;
        }
    }
    let min_len = (32768 / sz.max(1)).max(1);
    state
        .par_chunks_mut(sz)
        .zip(y.par_chunks_mut(pd))
        .enumerate()
        .with_min_len(min_len)
        .for_each(|(task, (st, yr))| step_head(dims, args, task, st, yr));
}

crate::simd_fn! {
    fn fwd_head[V: f8](
        dims: &Scan2Dims,
        args: &Scan2Args<f32>,
        ysh: &SharedMut<f32>,
        hlsh: Option<&SharedMut<f32>>,
        task: usize,
    ) {
        let Scan2Dims { seqlen, nheads, headdim: pd, dstate: n, ngroups, .. } = *dims;
        let pv = pd.div_ceil(W);
        let (b, h) = (task / nheads, task % nheads);
        let g = dims.group_of(h);
        let mut st = vec![V::ZERO; n * pv];
        let mut xv = vec![V::ZERO; pv];
        let mut dxv = vec![V::ZERO; pv];
        let mut acc = vec![V::ZERO; pv];
        let s0 = task * pd * n;
        if let Some(h0) = args.h0 {
            state_in(&h0[s0..s0 + pd * n], pd, n, pv, &mut st);
        }
        let a = args.a[h];
        let dv = V::splat(args.d.map_or(0.0, |d| d[h]));
        for t in 0..seqlen {
            let ih = (b * seqlen + t) * nheads + h;
            let bc = ((b * seqlen + t) * ngroups + g) * n;
            let (dt, _) = dt_eff(args, ih, h);
            // A sequence start zeroes the state entering the step: decay 0.
            let reset = args.resets.is_some_and(|r| r[b * seqlen + t]);
            let av = V::splat(if reset { 0.0 } else { (dt * a).exp() });
            load_x(&args.x[ih * pd..ih * pd + pd], dt, &mut xv, &mut dxv);
            let (brow, crow) = (&args.b[bc..bc + n], &args.c[bc..bc + n]);
            step_state::<V, true>(&mut st, pv, av, brow, crow, &dxv, &mut acc);
            // SAFETY: row `ih` of y belongs to this (b, h) task only.
            let yrow = unsafe { ysh.slice(ih * pd, pd) };
            for j in 0..pv {
                let mut v = dv.mul_add(xv[j], acc[j]);
                if let Some(z) = args.z {
                    v *= simd::silu(V::load(&z[ih * pd + j * W..ih * pd + pd]));
                }
                V::store(&mut yrow[j * W..], v);
            }
        }
        if let Some(hl) = hlsh {
            // SAFETY: the (b, h) state block belongs to this task only.
            state_out(&st, pd, n, pv, unsafe { hl.slice(s0, pd * n) }, false);
        }
    }
}

crate::simd_fn! {
    fn bwd_head[V: f8](
        dims: &Scan2Dims,
        args: &Scan2Args<f32>,
        up: (&[f32], Option<&[f32]>),
        sh: &BwdShared,
        task: usize,
    ) -> TaskScalars {
        let Scan2Dims { seqlen, nheads, headdim: pd, dstate: n, ngroups, .. } = *dims;
        let (pv, (dy, dh_last)) = (pd.div_ceil(W), up);
        let sz = n * pv;
        let BwdShared { db: dbp, dc: dcp, dx: dxsh, ddelta: ddsh, dz: dzsh, dh0: dh0sh } = *sh;
        let (b, h) = (task / nheads, task % nheads);
        let g = dims.group_of(h);
        let a = args.a[h];
        let dv = V::splat(args.d.map_or(0.0, |d| d[h]));
        let s0 = task * pd * n;
        let row = |t: usize| ((b * seqlen + t) * nheads + h, ((b * seqlen + t) * ngroups + g) * n);
        // Per step: Δ, ∂Δ/∂Δ_raw, ā and α.
        let steps: Vec<(f32, f32, f32)> = (0..seqlen)
            .map(|t| {
                let (dt, dsp) = dt_eff(args, row(t).0, h);
                // A sequence start: the state entering step t is zero (decay 0).
                let reset = args.resets.is_some_and(|r| r[b * seqlen + t]);
                (dt, dsp, if reset { 0.0 } else { (dt * a).exp() })
            })
            .collect();
        let mut alpha = vec![0.0f64; seqlen];
        let mut st = vec![V::ZERO; sz];
        let mut xv = vec![V::ZERO; pv];
        let mut dxv = vec![V::ZERO; pv];
        let mut acc = vec![V::ZERO; pv];
        let mut dyy = vec![V::ZERO; pv];
        let mut ypre = vec![V::ZERO; pv];
        let mut sn = vec![0.0f32; n];
        let mut out = TaskScalars::default();
        // SAFETY (all `slice` calls below): rows indexed by (b, ·, h) and the task's own
        // partial-buffer region belong to this task only.
        // Pass 1, forward: h_t, dC_t, dz and α_t.
        if let Some(h0) = args.h0 {
            state_in(&h0[s0..s0 + pd * n], pd, n, pv, &mut st);
        }
        for t in 0..seqlen {
            let (ih, bc) = row(t);
            let (dt, _, abar) = steps[t];
            load_x(&args.x[ih * pd..ih * pd + pd], dt, &mut xv, &mut dxv);
            let (brow, crow) = (&args.b[bc..bc + n], &args.c[bc..bc + n]);
            step_state::<V, true>(&mut st, pv, V::splat(abar), brow, crow, &dxv, &mut acc);
            for j in 0..pv {
                ypre[j] = dv.mul_add(xv[j], acc[j]);
            }
            let zr = args.z.map(|z| &z[ih * pd..ih * pd + pd]);
            let dzrow = dzsh.as_ref().map(|d| unsafe { d.slice(ih * pd, pd) });
            let xdy = gated_dy(&dy[ih * pd..ih * pd + pd], zr, &xv, Some(&ypre), dzrow, &mut dyy);
            let mut ydy = V::ZERO;
            for j in 0..pv {
                ydy = acc[j].mul_add(dyy[j], ydy);
            }
            let dcr = unsafe { dcp.slice((task * seqlen + t) * n, n) };
            blocks!(pv, |j0, M| dc_block::<V, M>(&st, pv, j0, &dyy, dcr));
            let bcd: f32 = brow.iter().zip(crow).map(|(x, y)| x * y).sum();
            alpha[t] = ydy.reduce_add() as f64 - (dt * bcd * xdy.reduce_add()) as f64;
        }
        // M(L) = ⟨h_{L−1}, dh_last⟩, and the adjoint carry starts at dh_last.
        let mut gs = vec![V::ZERO; sz];
        let mut m = 0.0f64;
        if let Some(dl) = dh_last {
            state_in(&dl[s0..s0 + pd * n], pd, n, pv, &mut gs);
            for (x, y) in st.iter().zip(&gs) {
                    m += (*x * *y).reduce_add() as f64;
                }
        }
        // Pass 2, backward: G_t, dx, dB, β_t, M(t) and dΔ.
        for t in (0..seqlen).rev() {
            let (ih, bc) = row(t);
            let (dt, dsp, abar) = steps[t];
            load_x(&args.x[ih * pd..ih * pd + pd], dt, &mut xv, &mut dxv);
            let zr = args.z.map(|z| &z[ih * pd..ih * pd + pd]);
            let xdy = gated_dy(&dy[ih * pd..ih * pd + pd], zr, &xv, None, None, &mut dyy).reduce_add();
            let (brow, crow) = (&args.b[bc..bc + n], &args.c[bc..bc + n]);
            let av = V::splat(abar);
            sn.fill(0.0);
            blocks!(pv, |j0, M| adjoint_block::<V, M>(&mut gs, pv, j0, av, brow, crow, &dyy, &xv, &mut acc, &mut sn));
            let dbr = unsafe { dbp.slice((task * seqlen + t) * n, n) };
            let (mut sbs, mut bcd) = (0.0f32, 0.0f32);
            for k in 0..n {
                dbr[k] = dt * sn[k];
                sbs += brow[k] * sn[k];
                bcd += brow[k] * crow[k];
            }
            let beta = (dt * sbs) as f64 - (dt * bcd * xdy) as f64;
            m += alpha[t] - beta;
            if args.resets.is_some_and(|r| r[b * seqlen + t]) {
                // Nothing before a sequence start reaches it: M(t) is exactly 0 (the sum
                // above only approaches it through rounding).
                m = 0.0;
            }
            out.da += dt as f64 * m;
            out.dd += xdy as f64;
            let dxrow = unsafe { dxsh.slice(ih * pd, pd) };
            let dtv = V::splat(dt);
            for j in 0..pv {
                V::add_store(&mut dxrow[j * W..], dv.mul_add(dyy[j], dtv * acc[j]));
            }
            let draw = (a as f64 * m + sbs as f64) as f32 * dsp;
            let dd1 = unsafe { ddsh.slice(ih, 1) };
            dd1[0] += draw;
            out.dbias += draw as f64;
        }
        if let Some(dh0) = dh0sh {
            state_out(&gs, pd, n, pv, unsafe { dh0.slice(s0, pd * n) }, true);
        }
        out
    }
}

crate::simd_fn! {
    fn step_head[V: f8](
        dims: &Scan2Dims,
        args: &Scan2Args<f32>,
        task: usize,
        st: &mut [f32],
        yr: &mut [f32],
    ) {
        let Scan2Dims { nheads, headdim: pd, dstate: n, ngroups, .. } = *dims;
        let (b, h) = (task / nheads, task % nheads);
        let bc = (b * ngroups + dims.group_of(h)) * n;
        let (brow, crow) = (&args.b[bc..bc + n], &args.c[bc..bc + n]);
        let (dt, _) = dt_eff(args, task, h);
        let av = V::splat((dt * args.a[h]).exp());
        let dmul = if let Some(d) = args.d { d[h] } else { 0.0 };
        // Blocks of W head channels: their gates SiLU(z) in one vector, then their states.
        for p0 in (0..pd).step_by(W) {
            let p1 = (p0 + W).min(pd);
            let mut gates = [1.0f32; W];
            if let Some(z) = args.z {
                V::store(&mut gates[..p1 - p0], simd::silu(V::load(&z[task * pd + p0..task * pd + p1])));
            }
            for p in p0..p1 {
                let x = args.x[task * pd + p];
                let dxv = V::splat(dt * x);
                let row = &mut st[p * n..(p + 1) * n];
                let mut acc = V::ZERO;
                for k in (0..n).step_by(W) {
                    let v = V::load(&row[k..]).mul_add(av, dxv * V::load(&brow[k..]));
                    V::store(&mut row[k..], v);
                    acc = v.mul_add(V::load(&crow[k..]), acc);
                }
                yr[p] = (acc.reduce_add() + dmul * x) * gates[p - p0];
            }
        }
    }
}
