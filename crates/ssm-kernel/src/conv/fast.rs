//! The fast `f32` conv kernels: SIMD over channels, rayon over (batch row, time block) tasks.
//!
//! Every time step of a task reads whole contiguous `(C)` rows of `x`/`dy`, so the `K` rows a
//! step needs stay in L1. The weight is transposed once per call to `(K, Cp)` (`Cp` = `C`
//! rounded up to a multiple of 8, zero-padded) so each tap is one full vector load. For the
//! common widths `K ≤ 4` the loops run over register tiles of [`R`] rows × 8 channels: the inputs,
//! the weights and `R` independent SiLU chains stay in registers. The backward keeps the last `K`
//! rows of the pre-SiLU gradient in a small ring buffer and reduces `dweight`/`dbias` through one
//! partial buffer per task, summed in task order (the task split depends only on the dims, so
//! results do not depend on the thread count).

use std::ops::Range;

use rayon::prelude::*;

use super::types::{ConvArgs, ConvDims, ConvGrads, ConvOut, check_step, check_upstream};
use crate::check::check_len;
use crate::par::SharedMut;
use crate::pool::{self, F32Buf};
use crate::simd::{self, V8, W};
use crate::team;

/// Minimum rows per (batch, time block) task: the backward recomputes `K − 1` halo rows per
/// block, which stays cheap at this size.
const MIN_BLOCK: usize = 64;

/// Steps with fewer than this many `B·C·K` multiply-adds run on the calling thread.
const STEP_PAR_MIN: usize = 1 << 15;

/// Rows per task. Depends only on the dims (not the thread count), so results are reproducible
/// across pools: at least [`MIN_BLOCK`], more for long problems so there are at most ~64 tasks.
pub(crate) fn time_block(dims: &ConvDims) -> usize {
    MIN_BLOCK.max((dims.batch * dims.seqlen).div_ceil(64))
}

/// The weight as (K, Cp) and the bias as (Cp), channels zero-padded to a multiple of 8.
/// Its buffers come from [`crate::pool`] and go back when it is dropped.
struct Packed {
    wt: F32Buf,
    bias: F32Buf,
    cp: usize,
}

impl Packed {
    fn new(dims: &ConvDims, args: &ConvArgs<f32>) -> Self {
        let (c, k) = (dims.channels, dims.width);
        let cp = c.div_ceil(W) * W;
        let mut wt = F32Buf::zeroed(k * cp);
        for ch in 0..c {
            for kk in 0..k {
                wt[kk * cp + ch] = args.weight[ch * k + kk];
            }
        }
        let mut bias = F32Buf::zeroed(cp);
        if let Some(b) = args.bias {
            bias[..c].copy_from_slice(b);
        }
        Self { wt, bias, cp }
    }

    /// Tap `kk` of channels `j..j+8`.
    #[inline(always)]
    fn w<V: V8>(&self, kk: usize, j: usize) -> V {
        let o = kk * self.cp + j;
        ld8(&self.wt[o..o + W])
    }

    /// Bias of channels `j..j+8`.
    #[inline(always)]
    fn b<V: V8>(&self, j: usize) -> V {
        ld8(&self.bias[j..j + W])
    }
}

/// Loads 8 lanes from `s` (at least 8 long): one unaligned vector load.
#[inline(always)]
fn ld8<V: V8>(s: &[f32]) -> V {
    V::load_full(s)
}

/// Loads `s[..min(len, 8)]`, zero-filling missing lanes; a plain vector load when 8 are there.
#[inline(always)]
fn ld<V: V8>(s: &[f32]) -> V {
    if s.len() >= W { ld8(s) } else { V::load(s) }
}

/// Stores the first `min(len, 8)` lanes of `v` into `d`; a plain vector store when 8 fit.
#[inline(always)]
fn st<V: V8>(d: &mut [f32], v: V) {
    if d.len() >= W {
        V::store_full(d, v);
    } else {
        V::store(d, v)
    }
}

/// Adds the first `min(len, 8)` lanes of `v` into `d`.
#[inline(always)]
fn add_st<V: V8>(d: &mut [f32], v: V) {
    if d.len() >= W {
        V::add_store_full(d, v);
    } else {
        V::add_store(d, v)
    }
}

/// SiLU derivative per lane: `σ(v) · (1 + v · (1 − σ(v)))`.
#[inline(always)]
fn silu_grad<V: V8>(v: V) -> V {
    let s = simd::sigmoid(v);
    let one = V::splat(1.0);
    s * v.mul_add(one - s, one)
}

/// Calls `$f::<V, K>` with `K` a constant for the common widths 1–4 (so the tap loops unroll), and
/// `$f::<0>` (width read at run time) otherwise.
macro_rules! dispatch_width {
    ($k:expr, $f:ident :: <$v:ty> ($($arg:expr),* $(,)?)) => {
        match $k {
            1 => $f::<$v, 1>($($arg),*),
            2 => $f::<$v, 2>($($arg),*),
            3 => $f::<$v, 3>($($arg),*),
            4 => $f::<$v, 4>($($arg),*),
            _ => $f::<$v, 0>($($arg),*),
        }
    };
}

/// Pre-activation of channels `j..j+8` at time `t` of one batch row `xb` (L, C), taps `kmin..k`
/// (the earlier taps fall before the sequence start).
#[inline(always)]
fn pre_act<V: V8>(p: &Packed, xb: &[f32], c: usize, k: usize, kmin: usize, t: usize, j: usize) -> V {
    let mut acc = p.b::<V>(j);
    for kk in kmin..k {
        let s = (t + kk + 1 - k) * c;
        acc = p.w::<V>(kk, j).mul_add(ld(&xb[s + j..s + c]), acc);
    }
    acc
}

/// The first tap of row `t` that reads inside its sequence: the taps reach positions
/// `t + 1 − K ..= t` (tap `kk` reads `t + kk + 1 − K`), and those before the sequence start —
/// position 0, or the last reset in `rb` (the batch row's (L) sequence starts) within reach —
/// read zero.
#[inline(always)]
pub(crate) fn first_tap(k: usize, t: usize, rb: Option<&[bool]>) -> usize {
    let lo = (t + 1).saturating_sub(k);
    let start = rb.and_then(|r| (lo + 1..=t).rev().find(|&s| r[s])).unwrap_or(lo);
    start + k - 1 - t
}

/// The first tap `kk` whose output row `s + K − 1 − kk` reads input row `s`: the rows at or
/// after the first sequence start after `s` (in `rb`, within the `L` rows) do not. The backward
/// of input row `s` sums the taps from here on.
#[inline(always)]
pub(crate) fn first_reader_tap(k: usize, l: usize, s: usize, rb: Option<&[bool]>) -> usize {
    let last = (s + k - 1).min(l - 1);
    rb.and_then(|r| (s + 1..=last).find(|&q| r[q])).map_or(0, |q| s + k - q)
}

/// No sequence start in `rb` at positions `lo ..= hi` (always true without resets).
#[inline(always)]
fn no_start(rb: Option<&[bool]>, lo: usize, hi: usize) -> bool {
    rb.is_none_or(|r| !r[lo..=hi].contains(&true))
}

/// Rows per register tile of the forward (independent SiLU chains that overlap in the core).
const R: usize = 4;

/// Forward of one row `t` of one batch row: `xb` (L, C) → `yrow` (C); `rb` the row's (L)
/// sequence starts.
#[inline(always)]
fn fwd_row<V: V8>(
    (k, c): (usize, usize),
    p: &Packed,
    silu: bool,
    (xb, rb): (&[f32], Option<&[bool]>),
    t: usize,
    yrow: &mut [f32],
) {
    let kmin = first_tap(k, t, rb);
    for j in (0..c).step_by(W) {
        let mut acc = if kmin == 0 {
            pre_act::<V>(p, xb, c, k, 0, t, j)
        } else {
            pre_act::<V>(p, xb, c, k, kmin, t, j)
        };
        if silu {
            acc = simd::silu(acc);
        }
        st(&mut yrow[j..], acc);
    }
}

/// Forward of the `R` rows `t..t + R` (all taps inside the sequence, `t + 1 ≥ KS`, `KS ≤ 4`):
/// per channel block the `KS + R − 1` input rows are loaded once and the weights stay in
/// registers. `y4` is (R, C).
#[inline(always)]
fn fwd_tile<V: V8, const KS: usize>(c: usize, p: &Packed, silu: bool, xb: &[f32], t: usize, y4: &mut [f32]) {
    let base = t + 1 - KS;
    for j in (0..c).step_by(W) {
        // xs[i] = x row base + i
        let mut xs = [V::ZERO; 4 + R - 1];
        for (i, xv) in xs.iter_mut().enumerate().take(KS + R - 1) {
            let s = (base + i) * c;
            *xv = ld(&xb[s + j..s + c]);
        }
        let mut acc = [p.b::<V>(j); R];
        for kk in 0..KS {
            let w = p.w::<V>(kk, j);
            for r in 0..R {
                acc[r] = w.mul_add(xs[r + kk], acc[r]);
            }
        }
        for (r, &a) in acc.iter().enumerate() {
            let v = if silu { simd::silu(a) } else { a };
            st(&mut y4[r * c + j..(r + 1) * c], v);
        }
    }
}

/// Forward of rows `t0..t1` of one batch row: `xb` (L, C) → `yb` (t1 − t0, C); `rb` the row's
/// (L) sequence starts.
#[inline(always)]
fn fwd_rows<V: V8, const KS: usize>(
    k: usize,
    c: usize,
    p: &Packed,
    silu: bool,
    (xb, rb): (&[f32], Option<&[bool]>),
    t0: usize,
    t1: usize,
    yb: &mut [f32],
) {
    let k = if KS == 0 { k } else { KS };
    let mut t = t0;
    if KS > 0 {
        while t + R <= t1 {
            let y = &mut yb[(t - t0) * c..(t - t0 + R) * c];
            // The tile needs every tap of its rows inside one sequence.
            if t + 1 >= k && no_start(rb, t + 2 - k, t + R - 1) {
                fwd_tile::<V, KS>(c, p, silu, xb, t, y);
                t += R;
            } else {
                fwd_row::<V>((k, c), p, silu, (xb, rb), t, y);
                t += 1;
            }
        }
    }
    while t < t1 {
        fwd_row::<V>((k, c), p, silu, (xb, rb), t, &mut yb[(t - t0) * c..(t - t0 + 1) * c]);
        t += 1;
    }
}

/// Backward of the single row `t` (any `t` in `t0..t1 + K − 1`): see [`bwd_rows`].
#[inline(always)]
fn bwd_row<V: V8>(
    k: usize,
    (c, l): (usize, usize),
    p: &Packed,
    silu: bool,
    (xb, dyb, rb): (&[f32], &[f32], Option<&[bool]>),
    (t, t0, t1): (usize, usize, usize),
    dxb: &mut [f32],
    ring: &mut [f32],
    part: &mut [f32],
) {
    let cp = p.cp;
    let slot = t % k;
    let kmin = if t < l { first_tap(k, t, rb) } else { 0 };
    let dx_row = (t + 1 >= k + t0).then(|| t + 1 - k);
    // dx of row s = t + 1 − K sums g of rows s ..= t (row t − kk through tap kk).
    let dx_kmin = dx_row.map_or(0, |s| first_reader_tap(k, l, s, rb));
    for j in (0..c).step_by(W) {
        let g = if t < l {
            let dyv: V = ld(&dyb[t * c + j..(t + 1) * c]);
            let g = if silu { dyv * silu_grad(pre_act::<V>(p, xb, c, k, kmin, t, j)) } else { dyv };
            if t < t1 {
                let o = k * cp + j;
                let db = &mut part[o..o + W];
                st(db, ld8::<V>(db) + g);
                for kk in kmin..k {
                    let s = (t + kk + 1 - k) * c;
                    let xv = ld(&xb[s + j..s + c]);
                    let o = kk * cp + j;
                    let dw = &mut part[o..o + W];
                    st(dw, g.mul_add(xv, ld8(dw)));
                }
            }
            g
        } else {
            V::ZERO
        };
        st(&mut ring[slot * cp + j..slot * cp + j + W], g);
        if let Some(s) = dx_row {
            let mut acc = V::ZERO;
            for kk in dx_kmin..k {
                // row t − kk sits in slot (slot − kk) mod K
                let r = if slot >= kk { slot - kk } else { slot + k - kk };
                let o = r * cp + j;
                acc = ld8::<V>(&ring[o..o + W]).mul_add(p.w::<V>(kk, j), acc);
            }
            add_st(&mut dxb[(s - t0) * c + j..(s - t0 + 1) * c], acc);
        }
    }
}

/// Backward of the `R` rows `t..t + R` (inside the block and the sequence, all taps inside the
/// sequence: `t + 1 ≥ KS`, `t + R ≤ t1`, `1 ≤ KS ≤ 4`): per channel block the input rows, the
/// weights, the `R` new gradients and the `KS − 1` previous ones stay in registers. Same ring
/// and outputs as [`bwd_row`].
#[inline(always)]
fn bwd_tile<V: V8, const KS: usize>(
    c: usize,
    p: &Packed,
    silu: bool,
    (xb, dyb): (&[f32], &[f32]),
    (t, t0): (usize, usize),
    dxb: &mut [f32],
    ring: &mut [f32],
    part: &mut [f32],
) {
    let cp = p.cp;
    let h = KS.saturating_sub(1);
    // first input row, and first g row of the window (rows base..t come from the ring)
    let base = t + 1 - KS;
    let mut hoff = [0usize; 4];
    for (i, o) in hoff.iter_mut().enumerate().take(h) {
        *o = ((base + i) % KS) * cp;
    }
    let mut noff = [0usize; R];
    for (r, o) in noff.iter_mut().enumerate() {
        *o = ((t + r) % KS) * cp;
    }
    // dx rows base + r, for those inside the block
    let first_dx = t0.saturating_sub(base).min(R);
    for j in (0..c).step_by(W) {
        let mut w = [V::ZERO; 4];
        for (kk, wv) in w.iter_mut().enumerate().take(KS) {
            *wv = p.w::<V>(kk, j);
        }
        // xs[i] = x row base + i
        let mut xs = [V::ZERO; 4 + R - 1];
        for (i, xv) in xs.iter_mut().enumerate().take(KS + R - 1) {
            let s = (base + i) * c;
            *xv = ld(&xb[s + j..s + c]);
        }
        let mut g = [V::ZERO; R];
        for (r, gr) in g.iter_mut().enumerate() {
            let dyv = ld(&dyb[(t + r) * c + j..(t + r + 1) * c]);
            *gr = if silu {
                let mut pre = p.b::<V>(j);
                for kk in 0..KS {
                    pre = w[kk].mul_add(xs[r + kk], pre);
                }
                dyv * silu_grad(pre)
            } else {
                dyv
            };
        }
        let o = KS * cp + j;
        let db = &mut part[o..o + W];
        st(db, ld8::<V>(db) + ((g[0] + g[1]) + (g[2] + g[3])));
        for kk in 0..KS {
            let o = kk * cp + j;
            let dw = &mut part[o..o + W];
            let mut a = ld8(dw);
            for r in 0..R {
                a = g[r].mul_add(xs[r + kk], a);
            }
            st(dw, a);
        }
        // gw[i] = g row base + i: KS − 1 from the ring, then the R new ones
        let mut gw = [V::ZERO; 3 + R];
        for i in 0..h {
            gw[i] = ld8(&ring[hoff[i] + j..hoff[i] + j + W]);
        }
        gw[h..h + R].copy_from_slice(&g);
        for r in 0..R {
            st(&mut ring[noff[r] + j..noff[r] + j + W], g[r]);
        }
        for r in first_dx..R {
            // dx[base + r] = Σ_kk g[base + r + KS − 1 − kk] · w[kk]
            let mut acc = V::ZERO;
            for kk in 0..KS {
                acc = gw[r + h - kk].mul_add(w[kk], acc);
            }
            let s = base + r - t0;
            add_st(&mut dxb[s * c + j..(s + 1) * c], acc);
        }
    }
}

/// Backward of rows `t0..t1` of one batch row. Adds into `dxb` (t1 − t0, C) and writes this
/// task's partial sums into `part`: `dweight` as (K, Cp), then `dbias` as (Cp).
/// `ring` (K, Cp) holds the pre-SiLU gradient `g` of the last `K` rows (row `t` in slot `t % K`).
#[inline(always)]
fn bwd_rows<V: V8, const KS: usize>(
    k: usize,
    c: usize,
    l: usize,
    p: &Packed,
    silu: bool,
    (xb, dyb, rb): (&[f32], &[f32], Option<&[bool]>),
    (t0, t1): (usize, usize),
    dxb: &mut [f32],
    ring: &mut [f32],
    part: &mut [f32],
) {
    let k = if KS == 0 { k } else { KS };
    part.fill(0.0);
    ring.fill(0.0);
    // dx[s] = Σ_kk g[s + K − 1 − kk] · w[kk] needs g up to row s + K − 1, so the loop runs K − 1
    // rows past the block (recomputing them; rows ≥ L have g = 0).
    let mut t = t0;
    while t < t1 + k - 1 {
        // The tile needs every tap of its rows (and so every row of its dx sums) in one sequence.
        if KS > 0 && t + 1 >= k && t + R <= t1 && no_start(rb, t + 2 - k, t + R - 1) {
            bwd_tile::<V, KS>(c, p, silu, (xb, dyb), (t, t0), dxb, ring, part);
            t += R;
        } else {
            bwd_row::<V>(k, (c, l), p, silu, (xb, dyb, rb), (t, t0, t1), dxb, ring, part);
            t += 1;
        }
    }
}

/// The conv state after a sequence, `st[b, c, kk] = x[b, L − K + kk, c]` (zero before the
/// start), as (B, C, K) — the `state` [`conv1d_step`] continues from.
///
/// `x` holds the conv input's rows `row_stride` values apart, its `C` channels starting at
/// column `offset` of each row: `(C, 0)` for a plain (B, L, C) input, or a column block of a
/// wider matrix (the `x | B | C` columns of a Mamba-2 projection). With `resets` (B, L) (see
/// [`ConvArgs`]), entries before the last sequence start of their batch row are zero too: the
/// next step continues the last sequence only.
///
/// # Panics
/// If `x` is too short for the dims and strides, or `st` is not (B, C, K), or `resets` not (B, L).
#[track_caller]
pub fn conv_state(
    dims: &ConvDims,
    x: &[f32],
    (row_stride, offset): (usize, usize),
    resets: Option<&[bool]>,
    st: &mut [f32],
) {
    let ConvDims { batch, seqlen: l, channels: ch, width: k } = *dims;
    assert_eq!(st.len(), batch * ch * k, "conv::conv_state: state must be (B, C, K) = {}", dims.bck());
    if let Some(r) = resets {
        assert_eq!(r.len(), batch * l, "conv::conv_state: resets must be (B, L) = ({batch}, {l})");
    }
    st.fill(0.0);
    for b in 0..batch {
        let keep_from = state_keep_from(resets.map(|r| &r[b * l..(b + 1) * l]), k);
        for kk in keep_from..k {
            let Some(t) = (l + kk).checked_sub(k) else { continue };
            let row = &x[(b * l + t) * row_stride + offset..][..ch];
            for (c, &v) in row.iter().enumerate() {
                st[(b * ch + c) * k + kk] = v;
            }
        }
    }
}

/// The first slot of a conv state (K slots, slot `kk` holding position `L − K + kk`) that
/// comes from the sequence of one batch row with sequence starts `row` (L): the slot of the
/// last start within the state's K positions, if any, else 0.
pub(super) fn state_keep_from(row: Option<&[bool]>, k: usize) -> usize {
    let Some(r) = row else { return 0 };
    let l = r.len();
    (0..k).rev().find(|&kk| l + kk >= k && r[l + kk - k]).unwrap_or(0)
}

/// Forward conv. Layouts: see [`ConvArgs`] and [`ConvOut`]; `y` is overwritten.
#[track_caller]
pub fn conv1d_fwd(dims: &ConvDims, args: &ConvArgs<f32>, out: ConvOut<f32>) {
    conv1d_fwd_tb(dims, args, out, time_block(dims));
}

/// [`conv1d_fwd`] with an explicit rows-per-task `tb` (tests use small blocks).
#[track_caller]
pub(crate) fn conv1d_fwd_tb(dims: &ConvDims, args: &ConvArgs<f32>, out: ConvOut<f32>, tb: usize) {
    const K: &str = "conv::conv1d_fwd";
    args.check(K, dims);
    out.check(K, dims);
    let ConvOut { y, state_out } = out;
    if let Some(st) = state_out {
        conv_state(dims, args.x, (dims.channels, 0), args.resets, st);
    }
    if dims.n_blc() == 0 {
        return;
    }
    let ConvDims { seqlen: l, channels: c, width: k, .. } = *dims;
    let p = Packed::new(dims, args);
    let tb = tb.clamp(1, l);
    let nblk = l.div_ceil(tb);
    let ys = SharedMut::new(y);
    (0..dims.batch * nblk).into_par_iter().for_each(|task| {
        let (b, blk) = (task / nblk, task % nblk);
        let (t0, t1) = (blk * tb, ((blk + 1) * tb).min(l));
        let xb = &args.x[b * l * c..(b + 1) * l * c];
        let rb = args.resets.map(|r| &r[b * l..(b + 1) * l]);
        // SAFETY: rows t0..t1 of batch row b belong to this task alone.
        let yb = unsafe { ys.slice((b * l + t0) * c, (t1 - t0) * c) };
        fwd_task((k, c), &p, args.silu, (xb, rb), (t0, t1), yb);
    });
}

/// Forward conv over a chunk of `L` new inputs `args.x` (B, L, C) that continues a sequence:
/// the `K − 1` inputs before the chunk come from `state` (B, C, K) — the conv state after the
/// previous chunk (as [`conv_state`] and [`conv1d_step`] keep it; all zero for a fresh sequence)
/// — and `state` is left holding the last `K` inputs after the chunk. `y` (B, L, C) is
/// overwritten. Equal to `L` calls of [`conv1d_step`], at the speed of [`conv1d_fwd`] (it runs on
/// the chunk with its history prepended).
///
/// # Panics
/// If a length disagrees with `dims`.
#[track_caller]
pub fn conv1d_chunk(dims: &ConvDims, args: &ConvArgs<f32>, state: &mut [f32], y: &mut [f32]) {
    const K: &str = "conv::conv1d_chunk";
    args.check(K, dims);
    check_len(K, "state", dims.bck(), state.len(), dims.n_bck());
    check_len(K, "y", dims.blc(), y.len(), dims.n_blc());
    let ConvDims { batch, seqlen: l, channels: c, width: k } = *dims;
    if l == 0 || c == 0 {
        return;
    }
    let lp = l + k - 1;
    let padded = ConvDims::new(batch, lp, c, k);
    let mut xp = pool::take_for_overwrite(padded.n_blc());
    for b in 0..batch {
        let xb = &mut xp[b * lp * c..(b + 1) * lp * c];
        for kk in 1..k {
            let row = &mut xb[(kk - 1) * c..kk * c];
            for (ch, v) in row.iter_mut().enumerate() {
                *v = state[(b * c + ch) * k + kk];
            }
        }
        xb[(k - 1) * c..].copy_from_slice(&args.x[b * l * c..(b + 1) * l * c]);
    }
    let mut yp = pool::take_for_overwrite(padded.n_blc());
    let pargs = ConvArgs { x: &xp, ..*args };
    conv1d_fwd(&padded, &pargs, ConvOut { y: &mut yp, state_out: Some(state) });
    for b in 0..batch {
        y[b * l * c..(b + 1) * l * c].copy_from_slice(&yp[(b * lp + k - 1) * c..(b + 1) * lp * c]);
    }
    pool::give(xp);
    pool::give(yp);
}

/// Backward conv: adds the gradients of `Σ dy·y` into `grads`. `dy` is (B, L, C); the
/// pre-activation is recomputed for the SiLU derivative.
#[track_caller]
pub fn conv1d_bwd(dims: &ConvDims, args: &ConvArgs<f32>, dy: &[f32], grads: ConvGrads<f32>) {
    conv1d_bwd_tb(dims, args, dy, grads, time_block(dims));
}

/// [`conv1d_bwd`] with an explicit rows-per-task `tb` (tests use small blocks).
#[track_caller]
pub(crate) fn conv1d_bwd_tb(
    dims: &ConvDims,
    args: &ConvArgs<f32>,
    dy: &[f32],
    grads: ConvGrads<f32>,
    tb: usize,
) {
    const K: &str = "conv::conv1d_bwd";
    args.check(K, dims);
    check_upstream(K, dims, dy);
    grads.check(K, dims);
    if dims.n_blc() == 0 {
        return;
    }
    let ConvDims { seqlen: l, channels: c, width: k, .. } = *dims;
    let ConvGrads { dx, dweight, dbias } = grads;
    let mut dbias = if args.bias.is_some() { dbias } else { None };
    let p = Packed::new(dims, args);
    let cp = p.cp;
    let tb = tb.clamp(1, l);
    let nblk = l.div_ceil(tb);
    let ntask = dims.batch * nblk;
    let plen = (k + 1) * cp;
    let mut parts = F32Buf::zeroed(ntask * plen);
    let dxs = SharedMut::new(dx);
    parts.par_chunks_mut(plen).enumerate().for_each_init(
        || F32Buf::zeroed(k * cp),
        |ring, (task, part)| {
            let (b, blk) = (task / nblk, task % nblk);
            let (t0, t1) = (blk * tb, ((blk + 1) * tb).min(l));
            let xb = &args.x[b * l * c..(b + 1) * l * c];
            let dyb = &dy[b * l * c..(b + 1) * l * c];
            let rb = args.resets.map(|r| &r[b * l..(b + 1) * l]);
            // SAFETY: rows t0..t1 of batch row b belong to this task alone.
            let dxb = unsafe { dxs.slice((b * l + t0) * c, (t1 - t0) * c) };
            let xdy = (xb, dyb, rb);
            bwd_task((k, c, l), &p, args.silu, xdy, (t0, t1), (dxb, ring, part));
        },
    );
    for part in parts.chunks_exact(plen) {
        for ch in 0..c {
            for kk in 0..k {
                dweight[ch * k + kk] += part[kk * cp + ch];
            }
        }
        if let Some(db) = dbias.as_deref_mut() {
            for ch in 0..c {
                db[ch] += part[k * cp + ch];
            }
        }
    }
}

/// One recurrent step of channels `chans` of batch row `b`: `st` (|chans|, K) and `yb`
/// (|chans|) are those channels' state and outputs.
#[inline(always)]
fn step_row<V: V8>(
    args: &ConvArgs<f32>,
    (c, k): (usize, usize),
    b: usize,
    chans: Range<usize>,
    st: &mut [f32],
    yb: &mut [f32],
) {
    let xb = &args.x[b * c..(b + 1) * c];
    for j in chans.clone().step_by(W) {
        let n = (chans.end - j).min(W);
        let mut pre = [0.0f32; W];
        for (jj, pre) in pre.iter_mut().enumerate().take(n) {
            let (ch, local) = (j + jj, j + jj - chans.start);
            let s = &mut st[local * k..(local + 1) * k];
            s.copy_within(1.., 0);
            s[k - 1] = xb[ch];
            let w = &args.weight[ch * k..(ch + 1) * k];
            let mut acc = args.bias.map_or(0.0, |bias| bias[ch]);
            for (sv, wv) in s.iter().zip(w) {
                acc = sv.mul_add(*wv, acc);
            }
            *pre = acc;
        }
        let mut v = V::from_array(pre);
        if args.silu {
            v = simd::silu(v);
        }
        let o = j - chans.start;
        V::store(&mut yb[o..o + n], v);
    }
}

/// One recurrent step for every batch row. `dims.seqlen` must be 1, so `args.x` is (B, C);
/// `state` (B, C, K) holds the last `K` inputs of every channel, oldest first, and is updated in
/// place (shifted left by one, `x` appended); `y` (B, C) is overwritten with
/// `bias + Σ_k state[k] · w[k]` (then SiLU when `args.silu`).
#[track_caller]
pub fn conv1d_step(dims: &ConvDims, args: &ConvArgs<f32>, state: &mut [f32], y: &mut [f32]) {
    const K: &str = "conv::conv1d_step";
    check_step(K, dims, args, state, y);
    let (c, k) = (dims.channels, dims.width);
    if dims.batch == 0 || c == 0 {
        return;
    }
    let (sts, ys) = (SharedMut::new(state), SharedMut::new(y));
    // Part `p` of `parts`: a contiguous run of (row, channel-block) units of W channels.
    let part = |p: usize, parts: usize| {
        let blocks = c.div_ceil(W);
        let units = team::part_range(dims.batch * blocks, p, parts, 1);
        // One call per batch row the part's units cover.
        let mut unit = units.start;
        while unit < units.end {
            let b = unit / blocks;
            let last = units.end.min((b + 1) * blocks);
            let (j0, j1) = (unit % blocks * W, ((last - 1) % blocks * W + W).min(c));
            // SAFETY: the state and outputs of channels j0..j1 of row b belong to this part alone.
            let st = unsafe { sts.slice((b * c + j0) * k, (j1 - j0) * k) };
            let yb = unsafe { ys.slice(b * c + j0, j1 - j0) };
            step_task(args, (c, k), b, j0..j1, st, yb);
            unit = last;
        }
    };
    // A tap (a shift, a load and a multiply-add, done one channel at a time) counts as 4.
    if team::try_run(4 * dims.n_bck(), &part) {
        return;
    }
    if dims.n_bck() >= STEP_PAR_MIN && dims.batch > 1 {
        (0..dims.batch).into_par_iter().for_each(|b| {
            // SAFETY: one task per batch row.
            let (st, yb) = unsafe { (sts.slice(b * c * k, c * k), ys.slice(b * c, c)) };
            step_task(args, (c, k), b, 0..c, st, yb);
        });
    } else {
        part(0, 1);
    }
}

crate::simd_fn! {
    /// Forward rows `t0..t1` of one batch row on the active instruction set (see [`fwd_rows`]).
    fn fwd_task[V: f8](
        kc: (usize, usize),
        p: &Packed,
        silu: bool,
        xr: (&[f32], Option<&[bool]>),
        tt: (usize, usize),
        yb: &mut [f32],
    ) {
        let ((k, c), (t0, t1)) = (kc, tt);
        dispatch_width!(k, fwd_rows::<V>(k, c, p, silu, xr, t0, t1, yb))
    }
}

crate::simd_fn! {
    /// Backward rows `t0..t1` of one batch row on the active instruction set (see [`bwd_rows`]).
    fn bwd_task[V: f8](
        kcl: (usize, usize, usize),
        p: &Packed,
        silu: bool,
        xdy: (&[f32], &[f32], Option<&[bool]>),
        tt: (usize, usize),
        bufs: (&mut [f32], &mut [f32], &mut [f32]),
    ) {
        let ((k, c, l), (dxb, ring, part)) = (kcl, bufs);
        dispatch_width!(k, bwd_rows::<V>(k, c, l, p, silu, xdy, tt, dxb, ring, part))
    }
}

crate::simd_fn! {
    /// One recurrent step of channels `chans` of batch row `b` on the active instruction set
    /// (see [`step_row`]).
    fn step_task[V: f8](args: &ConvArgs<f32>, ck: (usize, usize), b: usize, chans: Range<usize>, st: &mut [f32], yb: &mut [f32]) {
        // The usual width as a constant, so the shift and the dot product unroll.
        match ck.1 {
            4 => step_row::<V>(args, (ck.0, 4), b, chans, st, yb),
            _ => step_row::<V>(args, ck, b, chans, st, yb),
        }
    }
}
