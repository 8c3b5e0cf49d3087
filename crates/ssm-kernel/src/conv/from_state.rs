//! The conv of a sequence that continues from a conv state: forward, and a backward that also
//! gives the gradient of that state — what training with state carried across windows needs.
//!
//! A conv state (B, C, K) holds the last `K` inputs before the sequence, oldest first (as
//! [`conv_state`](super::conv_state) and [`conv1d_step`](super::conv1d_step) keep it). The
//! first outputs read its last `K − 1` inputs in place of the zeros before a fresh sequence.
//! Both kernels run the plain ones on the sequence with that history prepended (`L + K − 1`
//! rows), so they are exactly as fast and as tested; the history costs one copy of the input.

use super::fast::{conv_state, conv1d_bwd, conv1d_fwd, state_keep_from};
use super::{ConvArgs, ConvDims, ConvGrads, ConvOut, check_upstream};
use crate::check::{Layout, check_opt_len};
use crate::pool;

/// `x` (B, L, C) with the last `K − 1` inputs of `state0` (B, C, K) before each batch row:
/// (B, L + K − 1, C), in a pooled buffer.
fn with_history(dims: &ConvDims, x: &[f32], state0: &[f32]) -> Vec<f32> {
    let ConvDims { batch, seqlen: l, channels: c, width: k } = *dims;
    let lp = l + k - 1;
    let mut xp = pool::take_for_overwrite(batch * lp * c);
    for b in 0..batch {
        let xb = &mut xp[b * lp * c..(b + 1) * lp * c];
        for kk in 1..k {
            for (ch, v) in xb[(kk - 1) * c..kk * c].iter_mut().enumerate() {
                *v = state0[(b * c + ch) * k + kk];
            }
        }
        xb[(k - 1) * c..].copy_from_slice(&x[b * l * c..(b + 1) * l * c]);
    }
    xp
}

/// The sequence starts (B, L) with `K − 1` history positions (never starts) before each row.
fn resets_with_history(dims: &ConvDims, resets: Option<&[bool]>) -> Option<Vec<bool>> {
    let (l, k) = (dims.seqlen, dims.width);
    resets.map(|r| {
        r.chunks_exact(l.max(1))
            .take(dims.batch)
            .flat_map(|row| std::iter::repeat_n(false, k - 1).chain(row.iter().copied()))
            .collect()
    })
}

#[track_caller]
fn check_state(kernel: &str, dims: &ConvDims, name: &str, s: Option<&[f32]>) {
    let layout = Layout::new("(B, C, K)", &[dims.batch, dims.channels, dims.width]);
    check_opt_len(kernel, name, layout, s, dims.n_bck());
}

/// Forward conv of `args.x` (B, L, C) continuing from the conv state `state0` (B, C, K): `y`
/// (B, L, C) is overwritten; `out.state_out`, if given, receives the state after the sequence.
/// A sequence start in `args.resets` at `t` cuts the history as it cuts earlier inputs.
///
/// # Panics
/// If a length disagrees with `dims` (the message names the argument).
#[track_caller]
pub fn conv1d_fwd_from(dims: &ConvDims, args: &ConvArgs<f32>, state0: &[f32], out: ConvOut<f32>) {
    const K: &str = "conv::conv1d_fwd_from";
    args.check(K, dims);
    out.check(K, dims);
    check_state(K, dims, "state0", Some(state0));
    let ConvDims { batch, seqlen: l, channels: c, width: k } = *dims;
    let ConvOut { y, state_out } = out;
    if l == 0 {
        if let Some(st) = state_out {
            st.copy_from_slice(state0);
        }
        return;
    }
    let padded = ConvDims::new(batch, l + k - 1, c, k);
    let xp = with_history(dims, args.x, state0);
    let rp = resets_with_history(dims, args.resets);
    let pargs = ConvArgs { x: &xp, resets: rp.as_deref(), ..*args };
    let mut yp = pool::take_for_overwrite(padded.n_blc());
    conv1d_fwd(&padded, &pargs, ConvOut { y: &mut yp, state_out: None });
    let lp = l + k - 1;
    for b in 0..batch {
        y[b * l * c..(b + 1) * l * c].copy_from_slice(&yp[(b * lp + k - 1) * c..(b + 1) * lp * c]);
    }
    if let Some(st) = state_out {
        conv_state(&padded, &xp, (c, 0), rp.as_deref(), st);
    }
    pool::give(xp);
    pool::give(yp);
}

/// Backward of [`conv1d_fwd_from`]: adds the gradients of `Σ dy·y` into `grads` (as
/// [`conv1d_bwd`]) and, when `dstate0` (B, C, K) is given, into it the gradient of `state0` (its
/// oldest slot, which no output reads, gets none).
///
/// # Panics
/// If a length disagrees with `dims` (the message names the argument).
#[track_caller]
pub fn conv1d_bwd_from(
    dims: &ConvDims,
    args: &ConvArgs<f32>,
    state0: &[f32],
    dy: &[f32],
    grads: ConvGrads<f32>,
    dstate0: Option<&mut [f32]>,
) {
    const K: &str = "conv::conv1d_bwd_from";
    args.check(K, dims);
    check_upstream(K, dims, dy);
    grads.check(K, dims);
    check_state(K, dims, "state0", Some(state0));
    check_state(K, dims, "dstate0", dstate0.as_deref());
    let ConvDims { batch, seqlen: l, channels: c, width: k } = *dims;
    if l == 0 {
        return;
    }
    let lp = l + k - 1;
    let padded = ConvDims::new(batch, lp, c, k);
    let xp = with_history(dims, args.x, state0);
    let rp = resets_with_history(dims, args.resets);
    let pargs = ConvArgs { x: &xp, resets: rp.as_deref(), ..*args };
    // No gradient reaches the history rows' own outputs (they are not outputs of this call).
    let mut dyp = pool::take(padded.n_blc());
    for b in 0..batch {
        dyp[(b * lp + k - 1) * c..(b + 1) * lp * c].copy_from_slice(&dy[b * l * c..(b + 1) * l * c]);
    }
    let mut dxp = pool::take(padded.n_blc());
    let ConvGrads { dx, dweight, dbias } = grads;
    conv1d_bwd(&padded, &pargs, &dyp, ConvGrads { dx: &mut dxp, dweight, dbias });
    for b in 0..batch {
        let src = &dxp[(b * lp + k - 1) * c..(b + 1) * lp * c];
        for (d, s) in dx[b * l * c..(b + 1) * l * c].iter_mut().zip(src) {
            *d += s;
        }
    }
    if let Some(ds) = dstate0 {
        for b in 0..batch {
            for kk in 1..k {
                for ch in 0..c {
                    ds[(b * c + ch) * k + kk] += dxp[(b * lp + kk - 1) * c + ch];
                }
            }
        }
    }
    pool::give(xp);
    pool::give(dyp);
    pool::give(dxp);
}

/// [`conv_state`] of a sequence that continued from `state0` (B, C, K): the last `K` inputs
/// after it, taken from `state0` where the sequence is shorter than `K`, unless a sequence
/// start in `resets` (B, L) cut the history off. `x`'s rows and columns as in [`conv_state`].
///
/// # Panics
/// As [`conv_state`], or if `state0` is not (B, C, K).
#[track_caller]
pub fn conv_state_from(
    dims: &ConvDims,
    x: &[f32],
    strides: (usize, usize),
    resets: Option<&[bool]>,
    state0: &[f32],
    st: &mut [f32],
) {
    check_state("conv::conv_state_from", dims, "state0", Some(state0));
    conv_state(dims, x, strides, resets, st);
    let ConvDims { batch, seqlen: l, channels: c, width: k } = *dims;
    for b in 0..batch {
        if resets.is_some_and(|r| r[b * l..(b + 1) * l].contains(&true)) {
            continue;
        }
        // Slot kk holds position L − K + kk; a negative one is slot L + kk of `state0`.
        for kk in 0..k.saturating_sub(l) {
            for ch in 0..c {
                st[(b * c + ch) * k + kk] = state0[(b * c + ch) * k + l + kk];
            }
        }
    }
}

/// The backward of [`conv_state_from`] (and of [`conv_state`] when `dstate0` is `None`): adds
/// `dst` (B, C, K), the gradient of the state after the sequence, into the gradients of the
/// inputs it was taken from — `dx` (rows and columns as `x` in [`conv_state`]) and, where the
/// sequence is shorter than `K`, `dstate0` (B, C, K). Entries the forward zeroed (before a
/// sequence start in `resets`) pass nothing back.
///
/// # Panics
/// If `dst` or `dstate0` is not (B, C, K), `dx` too short for the dims and strides, or
/// `resets` not (B, L).
#[track_caller]
pub fn conv_state_bwd(
    dims: &ConvDims,
    dst: &[f32],
    (row_stride, offset): (usize, usize),
    resets: Option<&[bool]>,
    dx: &mut [f32],
    dstate0: Option<&mut [f32]>,
) {
    const K: &str = "conv::conv_state_bwd";
    let ConvDims { batch, seqlen: l, channels: c, width: k } = *dims;
    check_state(K, dims, "dst", Some(dst));
    check_state(K, dims, "dstate0", dstate0.as_deref());
    if let Some(r) = resets {
        assert_eq!(r.len(), batch * l, "{K}: resets must be (B, L) = ({batch}, {l}), got {}", r.len());
    }
    if batch > 0 && l > 0 && c > 0 {
        let need = (batch * l - 1) * row_stride + offset + c;
        assert!(dx.len() >= need, "{K}: dx has {} values, the strides need {need}", dx.len());
    }
    let mut dstate0 = dstate0;
    for b in 0..batch {
        let row_resets = resets.map(|r| &r[b * l..(b + 1) * l]);
        let keep_from = state_keep_from(row_resets, k);
        for kk in keep_from..k {
            let Some(t) = (l + kk).checked_sub(k) else { continue };
            let row = &mut dx[(b * l + t) * row_stride + offset..][..c];
            for (ch, v) in row.iter_mut().enumerate() {
                *v += dst[(b * c + ch) * k + kk];
            }
        }
        if row_resets.is_some_and(|r| r.contains(&true)) {
            continue;
        }
        if let Some(ds) = dstate0.as_deref_mut() {
            for kk in 0..k.saturating_sub(l) {
                for ch in 0..c {
                    ds[(b * c + ch) * k + l + kk] += dst[(b * c + ch) * k + kk];
                }
            }
        }
    }
}
