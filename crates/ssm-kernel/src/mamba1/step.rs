//! Fast Mamba-1 single-token step for recurrent inference.

use rayon::prelude::*;

use super::tile::W;
use super::{Scan1Args, Scan1Dims};
use crate::check::{check_dims, check_len};
use crate::par::SharedMut;
use crate::simd::{self, Vf32};
use crate::team;

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
    let Scan1Dims { batch, dim, dstate: n, .. } = *dims;
    check_len(K, "state", format_args!("(B, D, N) = ({batch}, {dim}, {n})"), state.len(), batch * dim * n);
    check_len(K, "y", format_args!("(B, D) = ({batch}, {dim})"), y.len(), batch * dim);
    let st = SharedMut::new(state);
    let ys = SharedMut::new(y);
    let rows = batch * dim;
    let part = |p: usize, parts: usize| step_rows(dims, args, &st, &ys, team::part_range(rows, p, parts, W));
    // A state update (an exp and three multiply-adds) counts as 4 multiply-adds.
    if team::try_run(4 * rows * n, &part) {
        return;
    }
    if rows * n >= PAR_MIN {
        (0..rows.div_ceil(ROWS_PER_TASK)).into_par_iter().for_each(|task| {
            let r = task * ROWS_PER_TASK..((task + 1) * ROWS_PER_TASK).min(rows);
            step_rows(dims, args, &st, &ys, r)
        });
    } else {
        step_rows(dims, args, &st, &ys, 0..rows);
    }
}

/// Channels per task of a threaded step.
const ROWS_PER_TASK: usize = 64;

crate::simd_fn! {
    /// The step of channels `rows` (indices `b · D + d`), on the active instruction set. The
    /// per-channel activations (softplus of Δ, SiLU of the gate) are computed for blocks of up
    /// to `W` channels of one batch row at a time in vectors, with the same functions as the
    /// forward scan; then each channel's `N` states are updated.
    fn step_rows[V: f16](
        dims: &Scan1Dims,
        args: &Scan1Args<f32>,
        st: &SharedMut<f32>,
        ys: &SharedMut<f32>,
        rows: std::ops::Range<usize>,
    ) {
        let Scan1Dims { dim, dstate: n, ngroups, .. } = *dims;
        let gs = dims.group_size();
        let mut r0 = rows.start;
        while r0 < rows.end {
            // One block: up to W channels, within one batch row.
            let r1 = (r0 + W).min(rows.end).min((r0 / dim + 1) * dim);
            let (len, d0) = (r1 - r0, r0 % dim);
            let mut dtv = V::load(&args.delta[r0..r1]);
            if let Some(bias) = args.delta_bias {
                dtv += V::load(&bias[d0..d0 + len]);
            }
            if args.delta_softplus {
                dtv = simd::softplus(dtv);
            }
            let mut dts = [0.0f32; W];
            V::store(&mut dts[..len], dtv);
            let mut gates = [1.0f32; W];
            if let Some(z) = args.z {
                V::store(&mut gates[..len], simd::silu(V::load(&z[r0..r1])));
            }
            for (i, bd) in (r0..r1).enumerate() {
                let (b, d) = (bd / dim, d0 + i);
                let bc = (b * ngroups + d / gs) * n;
                let (dt, x) = (dts[i], args.u[bd]);
                let dtv = V::splat(dt);
                let dx = V::splat(dt * x);
                // SAFETY: channel (b, d) owns its N state elements and its output; tasks own
                // disjoint channels.
                let h = unsafe { st.slice(bd * n, n) };
                let mut acc = V::ZERO;
                let mut k = 0;
                while k < n {
                    let e = (k + W).min(n);
                    let a = V::load(&args.a[d * n + k..d * n + e]);
                    let abar = simd::exp(dtv * a);
                    let hv = abar.mul_add(V::load(&h[k..e]), dx * V::load(&args.b[bc + k..bc + e]));
                    V::store(&mut h[k..e], hv);
                    acc = hv.mul_add(V::load(&args.c[bc + k..bc + e]), acc);
                    k = e;
                }
                let skip = if let Some(dv) = args.d { dv[d] * x } else { 0.0 };
                let out = (acc.reduce_add() + skip) * gates[i];
                // SAFETY: as above.
                unsafe { ys.write(bd, out) };
            }
            r0 = r1;
        }
    }
}
