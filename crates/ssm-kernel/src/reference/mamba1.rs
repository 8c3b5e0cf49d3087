//! Reference Mamba-1 selective scan: one channel at a time, every state kept.

use crate::Real;
use crate::mamba1::{Scan1Args, Scan1Dims, Scan1Grads, Scan1Out, check_upstream};

/// Effective Δ for element `i` (flat (B, L, D) index) of channel `d`, and the derivative of the
/// effective Δ with respect to the raw one.
fn delta_eff<T: Real>(args: &Scan1Args<T>, i: usize, d: usize) -> (T, T) {
    let mut v = args.delta[i];
    if let Some(bias) = args.delta_bias {
        v += bias[d];
    }
    if args.delta_softplus { (v.softplus(), v.softplus_grad()) } else { (v, T::one()) }
}

/// Whether flat (B, L) position `bt` starts a new sequence.
pub(crate) fn is_reset(resets: Option<&[bool]>, bt: usize) -> bool {
    resets.is_some_and(|r| r[bt])
}

/// Forward scan. Layouts: see [`Scan1Args`] and [`Scan1Out`].
#[track_caller]
pub fn scan_fwd<T: Real>(dims: &Scan1Dims, args: &Scan1Args<T>, out: Scan1Out<T>) {
    const K: &str = "reference::mamba1::scan_fwd";
    args.check(K, dims);
    out.check(K, dims);
    let Scan1Dims { batch, seqlen, dim, dstate: n, ngroups } = *dims;
    let Scan1Out { y, mut h_last, mut checkpoints } = out;
    let nchunks = dims.n_chunks();
    let mut h = vec![T::zero(); n];
    for b in 0..batch {
        for d in 0..dim {
            let g = dims.group_of(d);
            let s0 = (b * dim + d) * n;
            match args.h0 {
                Some(h0) => h.copy_from_slice(&h0[s0..s0 + n]),
                None => h.fill(T::zero()),
            }
            for t in 0..seqlen {
                if let (Some(ck), true) = (checkpoints.as_deref_mut(), t % crate::mamba1::CHUNK == 0) {
                    let at = ((b * nchunks + t / crate::mamba1::CHUNK) * dim + d) * n;
                    ck[at..at + n].copy_from_slice(&h);
                }
                if is_reset(args.resets, b * seqlen + t) {
                    h.fill(T::zero());
                }
                let i = (b * seqlen + t) * dim + d;
                let bc = ((b * seqlen + t) * ngroups + g) * n;
                let (dt, _) = delta_eff(args, i, d);
                let x = args.u[i];
                let mut acc = T::zero();
                for k in 0..n {
                    h[k] = (dt * args.a[d * n + k]).exp() * h[k] + dt * x * args.b[bc + k];
                    acc += h[k] * args.c[bc + k];
                }
                if let Some(dd) = args.d {
                    acc += dd[d] * x;
                }
                if let Some(z) = args.z {
                    acc *= z[i].silu();
                }
                y[i] = acc;
            }
            if let Some(hl) = h_last.as_deref_mut() {
                hl[s0..s0 + n].copy_from_slice(&h);
            }
        }
    }
}

/// Backward scan: adds the gradients of `Σ dy·y + Σ dh_last·h_last` into `grads`.
///
/// `dy` is (B, L, D); `dh_last`, (B, D, N), is the gradient of the final state (zero when
/// absent). Keeps all `L·N` states of one channel at a time.
#[track_caller]
pub fn scan_bwd<T: Real>(
    dims: &Scan1Dims,
    args: &Scan1Args<T>,
    dy: &[T],
    dh_last: Option<&[T]>,
    grads: Scan1Grads<T>,
) {
    const K: &str = "reference::mamba1::scan_bwd";
    args.check(K, dims);
    check_upstream(K, dims, dy, dh_last);
    grads.check(K, dims);
    let Scan1Dims { batch, seqlen, dim, dstate: n, ngroups } = *dims;
    let Scan1Grads { du, ddelta, da, db, dc, mut dd, mut dz, mut ddelta_bias, mut dh0 } = grads;
    // hs[(t + 1) * n + k] = h_t[k]; hs[k] = h_{-1}[k] = h0[k].
    let mut hs = vec![T::zero(); (seqlen + 1) * n];
    let mut g = vec![T::zero(); n];
    let zeros = vec![T::zero(); n];
    for b in 0..batch {
        for d in 0..dim {
            let grp = dims.group_of(d);
            let s0 = (b * dim + d) * n;
            match args.h0 {
                Some(h0) => hs[..n].copy_from_slice(&h0[s0..s0 + n]),
                None => hs[..n].fill(T::zero()),
            }
            for t in 0..seqlen {
                let i = (b * seqlen + t) * dim + d;
                let bc = ((b * seqlen + t) * ngroups + grp) * n;
                let (dt, _) = delta_eff(args, i, d);
                let reset = is_reset(args.resets, b * seqlen + t);
                for k in 0..n {
                    // A reset makes the state entering step t zero.
                    let prev = if reset { T::zero() } else { hs[t * n + k] };
                    hs[(t + 1) * n + k] =
                        (dt * args.a[d * n + k]).exp() * prev + dt * args.u[i] * args.b[bc + k];
                }
            }
            match dh_last {
                Some(dl) => g.copy_from_slice(&dl[s0..s0 + n]),
                None => g.fill(T::zero()),
            }
            for t in (0..seqlen).rev() {
                let i = (b * seqlen + t) * dim + d;
                let bc = ((b * seqlen + t) * ngroups + grp) * n;
                let (dt, ddt_draw) = delta_eff(args, i, d);
                let x = args.u[i];
                let h = &hs[(t + 1) * n..(t + 2) * n];
                let reset = is_reset(args.resets, b * seqlen + t);
                let hprev = if reset { &zeros[..] } else { &hs[t * n..(t + 1) * n] };
                // Output before the gate.
                let mut ypre: T = (0..n).map(|k| h[k] * args.c[bc + k]).sum();
                let dmul = args.d.map_or(T::zero(), |dv| dv[d]);
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
                if let (Some(ddv), Some(_)) = (dd.as_deref_mut(), args.d) {
                    ddv[d] += dyy * x;
                }
                du[i] += dmul * dyy;
                let mut ddt = T::zero();
                for k in 0..n {
                    let a = args.a[d * n + k];
                    let abar = (dt * a).exp();
                    g[k] += args.c[bc + k] * dyy;
                    dc[bc + k] += h[k] * dyy;
                    db[bc + k] += g[k] * dt * x;
                    du[i] += g[k] * dt * args.b[bc + k];
                    ddt += g[k] * (x * args.b[bc + k] + hprev[k] * a * abar);
                    da[d * n + k] += g[k] * hprev[k] * dt * abar;
                    // Nothing flows back across a reset.
                    g[k] = if reset { T::zero() } else { g[k] * abar };
                }
                let draw = ddt * ddt_draw;
                ddelta[i] += draw;
                if let (Some(bias), Some(_)) = (ddelta_bias.as_deref_mut(), args.delta_bias) {
                    bias[d] += draw;
                }
            }
            if let (Some(dh0), Some(_)) = (dh0.as_deref_mut(), args.h0) {
                for k in 0..n {
                    dh0[s0 + k] += g[k];
                }
            }
        }
    }
}

/// One recurrent step for every batch row: `state` (B, D, N) is updated in place and `y` (B, D)
/// overwritten. `dims.seqlen` must be 1, so `args.u`, `args.delta`, `args.z` are (B, D) and
/// `args.b`, `args.c` are (B, G, N); `args.h0` must be `None` (the state is `state`).
#[track_caller]
pub fn scan_step<T: Real>(dims: &Scan1Dims, args: &Scan1Args<T>, state: &mut [T], y: &mut [T]) {
    const K: &str = "reference::mamba1::scan_step";
    crate::check::check_dims(K, dims.seqlen == 1, "a step takes seqlen 1");
    crate::check::check_dims(K, args.h0.is_none(), "a step takes its state in `state`, not `h0`");
    let args = Scan1Args { h0: Some(&*state), ..*args };
    let mut h_last = vec![T::zero(); state.len()];
    scan_fwd(dims, &args, Scan1Out::with_state(y, &mut h_last));
    state.copy_from_slice(&h_last);
}
