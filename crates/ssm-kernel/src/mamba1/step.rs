//! Fast Mamba-1 single-token step for recurrent inference.

use rayon::prelude::*;

use super::{Scan1Args, Scan1Dims};
use crate::check::{check_dims, check_len};
use crate::par::SharedMut;
use crate::simd::x16::{self as simd, V, W};

/// Below this many state updates a step runs on the calling thread (a rayon dispatch costs more).
const PAR_MIN: usize = 1 << 16;

/// One recurrent step for every batch row: `state` (B, D, N) is updated in place and `y` (B, D)
/// overwritten.
///
/// `dims.seqlen` must be 1, so `args.u`, `args.delta`, `args.z` are (B, D) and `args.b`,
/// `args.c` are (B, G, N); `args.h0` must be `None` (the state is `state`). Vectorised over `N`
/// within each channel; allocates nothing.
///
/// # Panics
/// If a slice length does not match `dims` (the message names the argument).
#[track_caller]
pub fn scan_step(dims: &Scan1Dims, args: &Scan1Args<f32>, state: &mut [f32], y: &mut [f32]) {
    const K: &str = "mamba1::scan_step";
    check_dims(K, dims.seqlen == 1, "a step takes seqlen 1");
    check_dims(K, args.h0.is_none(), "a step takes its state in `state`, not `h0`");
    args.check(K, dims);
    let Scan1Dims { batch, dim, dstate: n, ngroups, .. } = *dims;
    check_len(K, "state", format_args!("(B, D, N) = ({batch}, {dim}, {n})"), state.len(), batch * dim * n);
    check_len(K, "y", format_args!("(B, D) = ({batch}, {dim})"), y.len(), batch * dim);
    let gs = dims.group_size();
    let st = SharedMut::new(state);
    let ys = SharedMut::new(y);
    let run = |bd: usize| {
        let (b, d) = (bd / dim, bd % dim);
        let g = d / gs;
        let bc = (b * ngroups + g) * n;
        let mut dt = args.delta[bd] + args.delta_bias.map_or(0.0, |v| v[d]);
        if args.delta_softplus {
            dt = if dt > 20.0 { dt } else { dt.exp().ln_1p() };
        }
        let x = args.u[bd];
        let dtv = V::splat(dt);
        let dx = V::splat(dt * x);
        // SAFETY: channel (b, d) owns its N state elements and its output.
        let h = unsafe { st.slice(bd * n, n) };
        let mut acc = V::ZERO;
        let mut k = 0;
        while k < n {
            let e = (k + W).min(n);
            let a = simd::load(&args.a[d * n + k..d * n + e]);
            let abar = simd::exp(dtv * a);
            let hv = abar.mul_add(simd::load(&h[k..e]), dx * simd::load(&args.b[bc + k..bc + e]));
            simd::store(&mut h[k..e], hv);
            acc = hv.mul_add(simd::load(&args.c[bc + k..bc + e]), acc);
            k = e;
        }
        let mut out = acc.reduce_add() + args.d.map_or(0.0, |v| v[d]) * x;
        if let Some(z) = args.z {
            let zv = z[bd];
            out *= zv / (1.0 + (-zv).exp());
        }
        // SAFETY: as above.
        unsafe { ys.write(bd, out) };
    };
    if batch * dim * n >= PAR_MIN {
        (0..batch * dim).into_par_iter().with_min_len(64).for_each(run);
    } else {
        (0..batch * dim).for_each(run);
    }
}
