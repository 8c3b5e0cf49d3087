//! Fast Mamba-1 forward scan.
//!
//! # Work layout
//! A task is one batch row and a block of [`TILES_PER_BLOCK`] 16-channel tiles (64 channels). It
//! walks time in blocks of [`TIME_BLOCK`] steps and, inside each, advances every tile of the
//! block in turn. Rows of `u`, Δ, `z`, `y` are D floats apart, so a tile-at-a-time walk would
//! touch a new cache line (and every other step a new page) per step; visiting the block's tiles
//! together reuses each line while it is hot, and the next time block is prefetched.

use rayon::prelude::*;

use super::tile::W;
use super::tile::{Bc, Groups, MixedBc, StateBuf, Tile, UniformBc, dispatch_n, mixed_offsets};
use super::{CHUNK, Scan1Args, Scan1Dims, Scan1Out};
use crate::par::SharedMut;
use crate::simd::{self, V16};

/// Time steps per block.
pub(crate) const TIME_BLOCK: usize = 16;
/// Tiles (of [`W`] channels) per task: 64 channels.
pub(crate) const TILES_PER_BLOCK: usize = 64 / W;
/// State vectors kept in registers at once by the forward walk.
const K_SLICE: usize = 8;

/// Prefetches rows `t0..t1` of batch row `b`, channels `ch0..ch1`, of each array in `arrays`
/// ((B, L, D) layout), one hint per cache line.
#[inline(always)]
pub(crate) fn prefetch_rows(
    arrays: &[&[f32]],
    dims: &Scan1Dims,
    b: usize,
    t0: usize,
    t1: usize,
    ch0: usize,
    ch1: usize,
) {
    let (seqlen, dim) = (dims.seqlen, dims.dim);
    for t in t0..t1.min(seqlen) {
        let row = (b * seqlen + t) * dim;
        for a in arrays {
            let mut c = ch0;
            while c < ch1 {
                simd::prefetch(a, row + c);
                c += 16;
            }
        }
    }
}

/// Advances a tile's state by one time step and returns `⟨h_t, C_t⟩` per lane (zero unless
/// `WITH_C`). `a` holds `A[·, n]` per lane, `dt` is the effective Δ and `x` the input. When
/// `abar_out` is given, `exp(Δ·A[n])` is written to it for every `n`.
#[inline(always)]
pub(crate) fn advance<V: V16, S: Bc<V>, const WITH_C: bool, const NP: bool>(
    a: &[V],
    h: &mut [V],
    dt: V,
    x: V,
    bc: &S,
    mut abar_out: Option<&mut [V]>,
) -> V {
    let n = h.len();
    let a = &a[..n];
    let dx = dt * x;
    let mut acc = V::ZERO;
    for k in 0..n {
        let abar = simd::exp_impl::<NP, _>(dt * a[k]);
        if let Some(o) = abar_out.as_deref_mut() {
            o[k] = abar;
        }
        h[k] = abar.mul_add(h[k], dx * bc.b(k));
        if WITH_C {
            acc = h[k].mul_add(bc.c(k), acc);
        }
    }
    acc
}

/// What a tile's walk prefetches at each step `t`: row `t + ahead` of every array, channels
/// `ch0..ch1` (the whole block, so one tile's walk warms the rows for the others).
pub(crate) struct Prefetch<'a> {
    pub arrays: &'a [&'a [f32]],
    pub ahead: usize,
    pub ch0: usize,
    pub ch1: usize,
}

impl Prefetch<'_> {
    /// Issues the hints for step `t` of batch row `b`.
    #[inline(always)]
    pub fn at(&self, dims: &Scan1Dims, b: usize, t: usize) {
        let t = t + self.ahead;
        if t < dims.seqlen {
            prefetch_rows(self.arrays, dims, b, t, t + 1, self.ch0, self.ch1);
        }
    }
}

/// Advances one tile of batch row `b` over steps `t0..t1` from state `h`, writing `y` when
/// `y_out` is given and issuing `pf`'s hints at each step; `h` ends as the state after step
/// `t1 − 1`.
#[inline(always)]
pub(crate) fn run_steps<V: V16, const NN: usize, const WITH_Y: bool>(
    dims: &Scan1Dims,
    args: &Scan1Args<f32>,
    tile: &Tile<V>,
    b: usize,
    t0: usize,
    t1: usize,
    h: &mut [V],
    y_out: Option<&SharedMut<f32>>,
    pf: Option<&Prefetch>,
) {
    let Scan1Dims { seqlen, dstate, ngroups, .. } = *dims;
    let n = if NN > 0 { NN } else { dstate };
    let gn = ngroups * n;
    match tile.groups {
        Groups::Uniform(g) => {
            let bc_at = |t: usize| {
                let row = (b * seqlen + t) * gn + g * n;
                UniformBc { b: &args.b[row..row + n], c: &args.c[row..row + n], goff: g * n }
            };
            if tile.nonpos {
                run_steps_impl::<V, NN, WITH_Y, true, _, _>(dims, args, tile, b, t0, t1, h, y_out, pf, bc_at);
            } else {
                run_steps_impl::<V, NN, WITH_Y, false, _, _>(
                    dims, args, tile, b, t0, t1, h, y_out, pf, bc_at,
                );
            }
        }
        Groups::Mixed(gs) => {
            let off = mixed_offsets(&gs, n);
            let bc_at = |t: usize| {
                let row = (b * seqlen + t) * gn;
                MixedBc { b: &args.b[row..row + gn], c: &args.c[row..row + gn], off }
            };
            if tile.nonpos {
                run_steps_impl::<V, NN, WITH_Y, true, _, _>(dims, args, tile, b, t0, t1, h, y_out, pf, bc_at);
            } else {
                run_steps_impl::<V, NN, WITH_Y, false, _, _>(
                    dims, args, tile, b, t0, t1, h, y_out, pf, bc_at,
                );
            }
        }
    }
}

/// [`run_steps`] honouring `args.resets`: the steps are split before every sequence start in
/// `t0..t1`, where the state is zeroed (see [`Scan1Args`]).
#[inline(always)]
pub(crate) fn run_steps_resetting<V: V16, const NN: usize, const WITH_Y: bool>(
    dims: &Scan1Dims,
    args: &Scan1Args<f32>,
    tile: &Tile<V>,
    b: usize,
    (t0, t1): (usize, usize),
    h: &mut [V],
    y_out: Option<&SharedMut<f32>>,
    pf: Option<&Prefetch>,
) {
    // One call site of `run_steps` (it is inlined, and large): each pass runs the steps up to
    // the next start, zeroing the state first when the pass begins at one.
    let row = args.resets.map(|r| &r[b * dims.seqlen..(b + 1) * dims.seqlen]);
    let mut s = t0;
    while s < t1 {
        let e = row.map_or(t1, |r| (s + 1..t1).find(|&t| r[t]).unwrap_or(t1));
        if row.is_some_and(|r| r[s]) {
            h.fill(V::ZERO);
        }
        run_steps::<V, NN, WITH_Y>(dims, args, tile, b, s, e, h, y_out, pf);
        s = e;
    }
}

#[inline(always)]
fn run_steps_impl<
    V: V16,
    const NN: usize,
    const WITH_Y: bool,
    const NP: bool,
    S: Bc<V>,
    F: Fn(usize) -> S,
>(
    dims: &Scan1Dims,
    args: &Scan1Args<f32>,
    tile: &Tile<V>,
    b: usize,
    t0: usize,
    t1: usize,
    h: &mut [V],
    y_out: Option<&SharedMut<f32>>,
    pf: Option<&Prefetch>,
    bc_at: F,
) {
    let Scan1Dims { seqlen, dim, dstate, .. } = *dims;
    let n = if NN > 0 { NN } else { dstate };
    let (d0, w) = (tile.d0, tile.w);
    debug_assert!(t1 - t0 <= TIME_BLOCK);
    // Per-step inputs of the block, computed once: Δ, Δ·u and u.
    let mut dts = [V::ZERO; TIME_BLOCK];
    let mut dxs = [V::ZERO; TIME_BLOCK];
    let mut xs = [V::ZERO; TIME_BLOCK];
    for t in t0..t1 {
        if let Some(pf) = pf {
            pf.at(dims, b, t);
        }
        let (j, i) = (t - t0, (b * seqlen + t) * dim + d0);
        let x = V::load(&args.u[i..i + w]);
        let (dt, _) = tile.delta(V::load(&args.delta[i..i + w]), args.delta_softplus, false);
        (dts[j], dxs[j], xs[j]) = (dt, dt * x, x);
    }
    // ⟨h_t, C_t⟩ per step, summed over the state slices.
    let mut ys = [V::ZERO; TIME_BLOCK];
    // One slice of at most K_SLICE state vectors at a time, held in registers for the whole
    // block (a full N = 16 state plus its A row and the exp constants would not fit).
    let mut k0 = 0;
    while k0 < n {
        let kn = (n - k0).min(K_SLICE);
        let (a, hs) = (&tile.a[k0..k0 + kn], &mut h[k0..k0 + kn]);
        let y = WITH_Y.then_some(&mut ys);
        match kn {
            8 => walk_slice::<V, 8, NP, S, F>(a, hs, k0, t0, t1, &dts, &dxs, y, &bc_at),
            4 => walk_slice::<V, 4, NP, S, F>(a, hs, k0, t0, t1, &dts, &dxs, y, &bc_at),
            2 => walk_slice::<V, 2, NP, S, F>(a, hs, k0, t0, t1, &dts, &dxs, y, &bc_at),
            1 => walk_slice::<V, 1, NP, S, F>(a, hs, k0, t0, t1, &dts, &dxs, y, &bc_at),
            _ => walk_slice::<V, 0, NP, S, F>(a, hs, k0, t0, t1, &dts, &dxs, y, &bc_at),
        }
        k0 += kn;
    }
    if WITH_Y {
        for t in t0..t1 {
            let (j, i) = (t - t0, (b * seqlen + t) * dim + d0);
            let mut y = tile.dskip.mul_add(xs[j], ys[j]);
            if let Some(z) = args.z {
                y *= simd::silu(V::load(&z[i..i + w]));
            }
            if let Some(yo) = y_out {
                // SAFETY: (b, t, tile) owns y[i .. i + w]; tasks own disjoint (b, tiles).
                V::store(unsafe { yo.slice(i, w) }, y);
            }
        }
    }
}

/// Walks steps `t0..t1` for the state vectors `k0..k0 + h.len()` (at most [`K_SLICE`]),
/// adding `⟨h_t, C_t⟩` over them into `ys` when given. With `KN > 0` (`== h.len()`) the loop over
/// the slice is unrolled and the slice lives in registers; `KN = 0` is the runtime-length path.
#[inline(always)]
fn walk_slice<V: V16, const KN: usize, const NP: bool, S: Bc<V>, F: Fn(usize) -> S>(
    a: &[V],
    h: &mut [V],
    k0: usize,
    t0: usize,
    t1: usize,
    dts: &[V; TIME_BLOCK],
    dxs: &[V; TIME_BLOCK],
    mut ys: Option<&mut [V; TIME_BLOCK]>,
    bc_at: &F,
) {
    let kn = if KN > 0 { KN } else { h.len() };
    let a = &a[..kn];
    let mut hl = [V::ZERO; K_SLICE];
    hl[..kn].copy_from_slice(&h[..kn]);
    for t in t0..t1 {
        let j = t - t0;
        let bc = bc_at(t);
        let (dt, dx) = (dts[j], dxs[j]);
        let mut acc = V::ZERO;
        for k in 0..kn {
            let abar = simd::exp_impl::<NP, _>(dt * a[k]);
            hl[k] = abar.mul_add(hl[k], dx * bc.b(k0 + k));
            if ys.is_some() {
                acc = hl[k].mul_add(bc.c(k0 + k), acc);
            }
        }
        if let Some(ys) = ys.as_deref_mut() {
            ys[j] += acc;
        }
    }
    h[..kn].copy_from_slice(&hl[..kn]);
}

/// One task: batch row `b`, tiles `tiles`.
#[inline(always)]
fn fwd_task<V: V16, const NN: usize>(
    dims: &Scan1Dims,
    args: &Scan1Args<f32>,
    tiles: &[Tile<V>],
    b: usize,
    y: &SharedMut<f32>,
    h_last: Option<&SharedMut<f32>>,
    ckpt: Option<&SharedMut<f32>>,
) {
    let Scan1Dims { seqlen, dim, dstate, .. } = *dims;
    let n = if NN > 0 { NN } else { dstate };
    let nchunks = dims.n_chunks();
    let (ch0, ch1) = (tiles[0].d0, tiles[tiles.len() - 1].d0 + tiles[tiles.len() - 1].w);
    // Every tile's state, (tiles, N) vectors.
    let mut states = crate::pool::V16Buf::zeroed(tiles.len() * n);
    if let Some(h0) = args.h0 {
        for (ti, tile) in tiles.iter().enumerate() {
            tile.load_state(&h0[b * dim * n..(b + 1) * dim * n], n, &mut states[ti * n..(ti + 1) * n]);
        }
    }
    let mut hb = StateBuf::<V, NN>::new(n);
    let h = hb.get();
    let mut arrays: Vec<&[f32]> = vec![args.u, args.delta];
    arrays.extend(args.z);
    prefetch_rows(&arrays, dims, b, 0, TIME_BLOCK, ch0, ch1);
    let pf = Prefetch { arrays: &arrays, ahead: TIME_BLOCK, ch0, ch1 };
    for t0 in (0..seqlen).step_by(TIME_BLOCK) {
        let t1 = (t0 + TIME_BLOCK).min(seqlen);
        for (ti, tile) in tiles.iter().enumerate() {
            h.copy_from_slice(&states[ti * n..(ti + 1) * n]);
            if let (Some(ck), true) = (ckpt, t0 % CHUNK == 0) {
                // SAFETY: this task alone writes channels d0..d0+w of batch row b.
                unsafe { tile.store_state(ck, (b * nchunks + t0 / CHUNK) * dim * n, n, h, false) };
            }
            if ti == 0 {
                // Warm this block's y rows for the stores, and the next block's input rows.
                for t in t0..t1 {
                    let row = (b * seqlen + t) * dim;
                    for c in (ch0..ch1).step_by(16) {
                        y.prefetch(row + c);
                    }
                }
            }
            let pf = (ti == 0).then_some(&pf);
            run_steps_resetting::<V, NN, true>(dims, args, tile, b, (t0, t1), h, Some(y), pf);
            states[ti * n..(ti + 1) * n].copy_from_slice(h);
        }
    }
    if let Some(hl) = h_last {
        for (ti, tile) in tiles.iter().enumerate() {
            // SAFETY: this task is the only one writing channels d0..d0+w of batch row b.
            unsafe { tile.store_state(hl, b * dim * n, n, &states[ti * n..(ti + 1) * n], false) };
        }
    }
}

/// The tiles of channel block `blk`.
#[inline(always)]
pub(crate) fn block_tiles<V: V16>(
    args: &Scan1Args<f32>,
    dims: &Scan1Dims,
    blk: usize,
    tiles_per_blk: usize,
) -> Vec<Tile<V>> {
    let ntiles = dims.dim.div_ceil(W);
    let gs = dims.group_size();
    // A loop, not `map(…).collect()`: the closure would be compiled for the baseline unless
    // LLVM inlined it.
    let range = blk * tiles_per_blk..((blk + 1) * tiles_per_blk).min(ntiles);
    let mut tiles = Vec::with_capacity(range.len());
    for ti in range {
        tiles.push(Tile::new(args, dims.dim, dims.dstate, gs, ti * W));
    }
    tiles
}

/// Forward selective scan (see the [module docs](super) for the recurrence).
///
/// Layouts: [`Scan1Args`] (inputs) and [`Scan1Out`] (`y` (B, L, D), optional final state
/// (B, D, N) and chunk checkpoints (B, ⌈L/CHUNK⌉, D, N)). Work is split into (batch row, 64-channel block) tasks on the current rayon pool
/// (see the file's work-layout notes); state vectors stay in registers or L1, and nothing is
/// allocated per time step.
///
/// # Panics
/// If a slice length does not match `dims` (the message names the argument).
#[track_caller]
pub fn scan_fwd(dims: &Scan1Dims, args: &Scan1Args<f32>, out: Scan1Out<f32>) {
    const K: &str = "mamba1::scan_fwd";
    args.check(K, dims);
    out.check(K, dims);
    let Scan1Dims { batch, dim, .. } = *dims;
    let nblk = dim.div_ceil(W).div_ceil(TILES_PER_BLOCK);
    let y = SharedMut::new(out.y);
    let h_last = out.h_last.map(SharedMut::new);
    let ckpt = out.checkpoints.map(SharedMut::new);
    (0..batch * nblk).into_par_iter().for_each(|task| {
        let (b, blk) = (task / nblk, task % nblk);
        fwd_block(dims, args, (b, blk), &y, h_last.as_ref(), ckpt.as_ref());
    });
}

crate::simd_fn! {
    /// The task of batch row `b`, channel block `blk`, on the active instruction set.
    fn fwd_block[V: f16](
        dims: &Scan1Dims,
        args: &Scan1Args<f32>,
        task: (usize, usize),
        y: &SharedMut<f32>,
        h_last: Option<&SharedMut<f32>>,
        ckpt: Option<&SharedMut<f32>>,
    ) {
        let (b, blk) = task;
        let tiles = block_tiles::<V>(args, dims, blk, TILES_PER_BLOCK);
        dispatch_n!(dims.dstate, fwd_task::<V>(dims, args, &tiles, b, y, h_last, ckpt))
    }
}
