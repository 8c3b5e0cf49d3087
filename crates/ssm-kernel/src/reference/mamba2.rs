//! Reference Mamba-2 scan: one (batch, head) at a time, every state kept, state indexed `[p][n]`
//! exactly as the (B, H, P, N) layout.

use crate::Real;
use crate::mamba2::{Scan2Args, Scan2Dims, Scan2Grads, Scan2Out, check_upstream};
use crate::reference::mamba1::is_reset;

/// Effective Δ for element `i` (flat (B, L, H) index) of head `h`, and the derivative of the
/// effective Δ with respect to the raw one.
fn delta_eff<T: Real>(args: &Scan2Args<T>, i: usize, h: usize) -> (T, T) {
    let mut v = args.delta[i];
    if let Some(bias) = args.delta_bias {
        v += bias[h];
    }
    if args.delta_softplus { (v.softplus(), v.softplus_grad()) } else { (v, T::one()) }
}

/// Forward scan. Layouts: see [`Scan2Args`] and [`Scan2Out`].
///
/// ```text
/// ā_t = exp(Δ_t · A[h])
/// h_t[p, n] = ā_t · h_{t−1}[p, n] + Δ_t · x_t[p] · B_t[g, n]
/// y_t[p] = Σ_n h_t[p, n] · C_t[g, n] + D[h] · x_t[p],   then y_t[p] ← y_t[p] · silu(z_t[p])
/// ```
///
/// with `h_{t−1}` taken as zero where `args.resets` marks `t`.
#[track_caller]
pub fn scan_fwd<T: Real>(dims: &Scan2Dims, args: &Scan2Args<T>, out: Scan2Out<T>) {
    const K: &str = "reference::mamba2::scan_fwd";
    args.check(K, dims);
    out.check(K, dims);
    let Scan2Dims { batch, seqlen, nheads, headdim: pd, dstate: n, ngroups } = *dims;
    let Scan2Out { y, mut h_last } = out;
    let sz = pd * n;
    let mut st = vec![T::zero(); sz];
    for b in 0..batch {
        for h in 0..nheads {
            let g = dims.group_of(h);
            let s0 = (b * nheads + h) * sz;
            match args.h0 {
                Some(h0) => st.copy_from_slice(&h0[s0..s0 + sz]),
                None => st.fill(T::zero()),
            }
            for t in 0..seqlen {
                let ih = (b * seqlen + t) * nheads + h;
                let bc = ((b * seqlen + t) * ngroups + g) * n;
                let (dt, _) = delta_eff(args, ih, h);
                let abar = (dt * args.a[h]).exp();
                if is_reset(args.resets, b * seqlen + t) {
                    st.fill(T::zero());
                }
                for p in 0..pd {
                    let i = ih * pd + p;
                    let x = args.x[i];
                    let mut acc = T::zero();
                    for k in 0..n {
                        let s = &mut st[p * n + k];
                        *s = abar * *s + dt * x * args.b[bc + k];
                        acc += *s * args.c[bc + k];
                    }
                    if let Some(dd) = args.d {
                        acc += dd[h] * x;
                    }
                    if let Some(z) = args.z {
                        acc *= z[i].silu();
                    }
                    y[i] = acc;
                }
            }
            if let Some(hl) = h_last.as_deref_mut() {
                hl[s0..s0 + sz].copy_from_slice(&st);
            }
        }
    }
}

/// Backward scan: adds the gradients of `Σ dy·y + Σ dh_last·h_last` into `grads`.
///
/// `dy` is (B, L, H, P); `dh_last`, (B, H, P, N), is the gradient of the final state (zero when
/// absent). Keeps all `(L + 1)·P·N` states of one head at a time. With the state adjoint
/// `G_t = ∂loss/∂h_t` (including the path through later states):
///
/// ```text
/// G_t = C_t ⊗ dy'_t + ā_{t+1} · G_{t+1}             (dy' = dy · silu(z), G_L starts at dh_last)
/// dx_t[p] += D·dy'_t[p] + Δ_t Σ_n G_t[p, n] B_t[n]
/// dB_t[n] += Δ_t Σ_p G_t[p, n] x_t[p],   dC_t[n] += Σ_p h_t[p, n] dy'_t[p]
/// dΔ_t    += Σ_{p,n} G_t[p, n] (x_t[p] B_t[n] + A ā_t h_{t−1}[p, n])
/// dA      += Σ_{t,p,n} G_t[p, n] Δ_t ā_t h_{t−1}[p, n],   dh0 += ā_0 · G_0
/// ```
#[track_caller]
pub fn scan_bwd<T: Real>(
    dims: &Scan2Dims,
    args: &Scan2Args<T>,
    dy: &[T],
    dh_last: Option<&[T]>,
    grads: Scan2Grads<T>,
) {
    const K: &str = "reference::mamba2::scan_bwd";
    args.check(K, dims);
    check_upstream(K, dims, dy, dh_last);
    grads.check(K, dims);
    let Scan2Dims { batch, seqlen, nheads, headdim: pd, dstate: n, ngroups } = *dims;
    let Scan2Grads { dx, ddelta, da, db, dc, mut dd, mut dz, mut ddelta_bias, mut dh0 } = grads;
    let sz = pd * n;
    // hs[(t + 1) * sz + ..] = h_t; hs[..sz] = h0.
    let mut hs = vec![T::zero(); (seqlen + 1) * sz];
    let mut gs = vec![T::zero(); sz];
    let zeros = vec![T::zero(); sz];
    for b in 0..batch {
        for h in 0..nheads {
            let grp = dims.group_of(h);
            let s0 = (b * nheads + h) * sz;
            match args.h0 {
                Some(h0) => hs[..sz].copy_from_slice(&h0[s0..s0 + sz]),
                None => hs[..sz].fill(T::zero()),
            }
            for t in 0..seqlen {
                let ih = (b * seqlen + t) * nheads + h;
                let bc = ((b * seqlen + t) * ngroups + grp) * n;
                let (dt, _) = delta_eff(args, ih, h);
                let abar = (dt * args.a[h]).exp();
                let reset = is_reset(args.resets, b * seqlen + t);
                for p in 0..pd {
                    let x = args.x[ih * pd + p];
                    for k in 0..n {
                        let j = p * n + k;
                        // A reset makes the state entering step t zero.
                        let prev = if reset { T::zero() } else { hs[t * sz + j] };
                        hs[(t + 1) * sz + j] = abar * prev + dt * x * args.b[bc + k];
                    }
                }
            }
            match dh_last {
                Some(dl) => gs.copy_from_slice(&dl[s0..s0 + sz]),
                None => gs.fill(T::zero()),
            }
            let a = args.a[h];
            let dmul = args.d.map_or(T::zero(), |dv| dv[h]);
            for t in (0..seqlen).rev() {
                let ih = (b * seqlen + t) * nheads + h;
                let bc = ((b * seqlen + t) * ngroups + grp) * n;
                let (dt, ddt_draw) = delta_eff(args, ih, h);
                let abar = (dt * a).exp();
                let reset = is_reset(args.resets, b * seqlen + t);
                let hcur = &hs[(t + 1) * sz..(t + 2) * sz];
                let hprev = if reset { &zeros[..] } else { &hs[t * sz..(t + 1) * sz] };
                let mut ddt = T::zero();
                for p in 0..pd {
                    let i = ih * pd + p;
                    let x = args.x[i];
                    let mut ypre: T = (0..n).map(|k| hcur[p * n + k] * args.c[bc + k]).sum();
                    ypre += dmul * x;
                    let dyy = match args.z {
                        Some(z) => {
                            if let Some(dz) = dz.as_deref_mut() {
                                dz[i] += dy[i] * ypre * z[i].silu_grad();
                            }
                            dy[i] * z[i].silu()
                        }
                        None => dy[i],
                    };
                    if let Some(ddv) = dd.as_deref_mut() {
                        ddv[h] += dyy * x;
                    }
                    dx[i] += dmul * dyy;
                    for k in 0..n {
                        let j = p * n + k;
                        gs[j] += args.c[bc + k] * dyy;
                        dc[bc + k] += hcur[j] * dyy;
                        db[bc + k] += gs[j] * dt * x;
                        dx[i] += gs[j] * dt * args.b[bc + k];
                        ddt += gs[j] * (x * args.b[bc + k] + hprev[j] * a * abar);
                        da[h] += gs[j] * hprev[j] * dt * abar;
                        // Nothing flows back across a reset.
                        gs[j] = if reset { T::zero() } else { gs[j] * abar };
                    }
                }
                let draw = ddt * ddt_draw;
                ddelta[ih] += draw;
                if let Some(bias) = ddelta_bias.as_deref_mut()
                    && args.delta_bias.is_some()
                {
                    bias[h] += draw;
                }
            }
            if let Some(dh0) = dh0.as_deref_mut() {
                for j in 0..sz {
                    dh0[s0 + j] += gs[j];
                }
            }
        }
    }
}

/// One recurrent step for every batch row: `state` (B, H, P, N) is updated in place and `y`
/// (B, H, P) overwritten. `dims.seqlen` must be 1, so `args.x`, `args.z` are (B, H, P),
/// `args.delta` is (B, H) and `args.b`, `args.c` are (B, G, N); `args.h0` must be `None` (the
/// state is `state`).
#[track_caller]
pub fn scan_step<T: Real>(dims: &Scan2Dims, args: &Scan2Args<T>, state: &mut [T], y: &mut [T]) {
    const K: &str = "reference::mamba2::scan_step";
    crate::mamba2::check_step(K, dims, args, state, y);
    let args = Scan2Args { h0: Some(&*state), ..*args };
    let mut h_last = vec![T::zero(); state.len()];
    scan_fwd(dims, &args, Scan2Out { y, h_last: Some(&mut h_last) });
    state.copy_from_slice(&h_last);
}
