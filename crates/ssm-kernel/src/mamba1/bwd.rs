//! Fast Mamba-1 backward scan (reverse scan with chunked recomputation).
//!
//! # Memory policy: checkpoint and recompute
//! No (B, L, D, N) tensor is ever stored. A task (one batch row, one block of up to 64 channels)
//!
//! 1. runs the forward recurrence once, keeping only each tile's state at the start of every
//!    chunk of [`CHUNK`] time steps: `⌈L / CHUNK⌉ · N` vectors of 16 lanes per tile;
//! 2. walks the chunks last to first; for each chunk and tile it recomputes the chunk's
//!    `CHUNK · N` states and decay factors `exp(Δ·A)` from the checkpoint, then runs the reverse
//!    (adjoint) recurrence over the chunk.
//!
//! Scratch per task (T = 4 tiles): `(T · ⌈L/CHUNK⌉ + 4 · CHUNK + 3 · T) · N` vectors of 64 bytes
//! (L = 256, N = 16: ≈ 170 KiB, within L2)
//! plus, when a batch row is split over several tasks, a (L, G, N) partial of `dB` and of `dC`.
//! Total extra memory is therefore O(B · D · N · L / CHUNK), never O(B · L · D · N). The price is
//! one extra forward pass (two `exp` per state update in all).
//!
//! # The adjoint recurrence
//! With `ā_t = exp(Δ_t A)` and `G_t = ∂loss/∂h_t` (all contributions):
//! `G_t = C_t · dy_t + ā_{t+1} ⊙ G_{t+1}`, started from `dh_last`. Then per time step
//! `dC_t += h_t · dy_t`, `dB_t += G_t · Δ_t u_t`, `du_t += Σ_n G_t Δ_t B_t + D · dy_t`,
//! `dΔ_t += Σ_n G_t (u_t B_t + h_{t−1} A ā_t)`, `dA += G_t h_{t−1} Δ_t ā_t`, and finally
//! `dh0 = ā_0 ⊙ G_0`. `dy_t` is the gradient after the gate (`dy · silu(z)`), and dΔ is chained
//! through softplus (`σ(v)`, or 1 above 20) into the raw Δ and the Δ bias.

use rayon::prelude::*;

use super::fwd::{
    Prefetch, TILES_PER_BLOCK, TIME_BLOCK, advance, block_tiles, prefetch_rows, run_steps_resetting,
};
use super::tile::W;
use super::tile::{Bc, Groups, MixedBc, StateBuf, Tile, UniformBc, dispatch_n, mixed_offsets};
use super::{Scan1Args, Scan1Dims, Scan1Grads, check_upstream};
use crate::par::SharedMut;
use crate::pool::V16Buf;
use crate::simd::{self, V16, Vf32};

/// Time steps per recomputation chunk (a multiple of the forward's time block).
pub const CHUNK: usize = 32;
const _: () = assert!(CHUNK.is_multiple_of(TIME_BLOCK));

/// Per-tile accumulators of a task, `ntl` tiles.
struct TileAcc<V> {
    /// State at each chunk start, (tiles, chunks, N).
    ckpt: V16Buf<V>,
    /// Adjoint `G`, (tiles, N).
    g: V16Buf<V>,
    /// dA, (tiles, N).
    da: V16Buf<V>,
    /// dD and dΔ-bias, (tiles).
    dd: V16Buf<V>,
    dbias: V16Buf<V>,
}

/// Scratch of one chunk of one tile.
struct ChunkBuf<V> {
    states: V16Buf<V>,
    abar: V16Buf<V>,
    /// Lane-wise dB / dC contributions, (CHUNK, N), summed over the tiles of one group before a
    /// single horizontal reduction per (t, n) (see [`flush_bc`]).
    vdb: V16Buf<V>,
    vdc: V16Buf<V>,
    dts: V16Buf<V>,
    dsp: V16Buf<V>,
}

/// Prefetching for the backward's reverse walk: while the first tile of a block walks chunk `c`
/// backwards, it warms the matching row of chunk `c − 1` (inputs and gradient outputs) for the
/// whole block, so the hints are spread over the walk instead of issued in one burst.
struct BackPrefetch<'a> {
    reads: &'a [&'a [f32]],
    ch0: usize,
    ch1: usize,
}

impl BackPrefetch<'_> {
    #[inline(always)]
    fn row(&self, dims: &Scan1Dims, b: usize, outs: &Outs, t: usize) {
        if let Some(t) = t.checked_sub(CHUNK) {
            prefetch_rows(self.reads, dims, b, t, t + 1, self.ch0, self.ch1);
            let row = (b * dims.seqlen + t) * dims.dim;
            for c in (self.ch0..self.ch1).step_by(16) {
                outs.du.prefetch(row + c);
                outs.ddelta.prefetch(row + c);
                if let Some(dz) = &outs.dz {
                    dz.prefetch(row + c);
                }
            }
        }
    }
}

/// Shared views of the per-element outputs (written disjointly by the tasks).
struct Outs {
    du: SharedMut<f32>,
    ddelta: SharedMut<f32>,
    dz: Option<SharedMut<f32>>,
    dh0: Option<SharedMut<f32>>,
}

/// Backward of [`scan_fwd`](super::scan_fwd): adds the gradients of
/// `Σ dy·y + Σ dh_last·h_last` into `grads`.
///
/// `dy` is (B, L, D); `dh_last` (B, D, N) is the gradient of the final state (zero when absent).
/// Every buffer in [`Scan1Grads`] is accumulated into (`+=`). See the module docs for the memory
/// policy. Work is split into (batch row, 64-channel block) tasks on the current rayon pool.
///
/// # Panics
/// If a slice length does not match `dims` (the message names the argument).
#[track_caller]
pub fn scan_bwd(
    dims: &Scan1Dims,
    args: &Scan1Args<f32>,
    dy: &[f32],
    dh_last: Option<&[f32]>,
    grads: Scan1Grads<f32>,
) {
    bwd(dims, args, None, dy, dh_last, grads, "mamba1::scan_bwd");
}

/// [`scan_bwd`] reusing the chunk checkpoints a forward wrote into
/// [`Scan1Out::checkpoints`](super::Scan1Out) ((B, ⌈L/CHUNK⌉, D, N)), which saves the first of
/// its passes over the sequence. The checkpoints must come from a forward with the same inputs.
///
/// # Panics
/// If a slice length does not match `dims` (the message names the argument).
#[track_caller]
pub fn scan_bwd_with_checkpoints(
    dims: &Scan1Dims,
    args: &Scan1Args<f32>,
    checkpoints: &[f32],
    dy: &[f32],
    dh_last: Option<&[f32]>,
    grads: Scan1Grads<f32>,
) {
    const K: &str = "mamba1::scan_bwd_with_checkpoints";
    let layout = dims.ckpt_layout();
    crate::check::check_len(K, "checkpoints", layout, checkpoints.len(), dims.n_checkpoints());
    bwd(dims, args, Some(checkpoints), dy, dh_last, grads, K);
}

#[track_caller]
fn bwd(
    dims: &Scan1Dims,
    args: &Scan1Args<f32>,
    saved: Option<&[f32]>,
    dy: &[f32],
    dh_last: Option<&[f32]>,
    grads: Scan1Grads<f32>,
    kernel: &str,
) {
    args.check(kernel, dims);
    check_upstream(kernel, dims, dy, dh_last);
    grads.check(kernel, dims);
    let Scan1Dims { batch, seqlen, dim, dstate: n, ngroups } = *dims;
    if batch == 0 || dim == 0 {
        return;
    }
    let Scan1Grads { du, ddelta, da, db, dc, dd, dz, ddelta_bias, dh0 } = grads;
    let nblk = dim.div_ceil(W).div_ceil(TILES_PER_BLOCK);
    let lgn = seqlen * ngroups * n;
    let outs = Outs {
        du: SharedMut::new(du),
        ddelta: SharedMut::new(ddelta),
        dz: if args.z.is_some() { dz.map(SharedMut::new) } else { None },
        dh0: if args.h0.is_some() { dh0.map(SharedMut::new) } else { None },
    };
    let db_sh = SharedMut::new(db);
    let dc_sh = SharedMut::new(dc);

    // Per task, in one pooled buffer taken (zeroed) and given back on this thread: dA (channels,
    // N), dD and dΔ-bias of its block's channels, and — when a batch row is split over several
    // tasks — its partial dB and dC, (L, G, N) each.
    let maxch = TILES_PER_BLOCK * W;
    let dbc_len = if nblk > 1 { 2 * lgn } else { 0 };
    let plen = maxch * (n + 2) + dbc_len;
    let mut parts = crate::pool::take(batch * nblk * plen);
    parts.par_chunks_mut(plen).enumerate().for_each(|(task, part)| {
        let (b, blk) = (task / nblk, task % nblk);
        let (pda, rest) = part.split_at_mut(maxch * n);
        let (pdd, rest) = rest.split_at_mut(maxch);
        let (pdbias, pdbc) = rest.split_at_mut(maxch);
        let (db_row, dc_row): (&mut [f32], &mut [f32]) = if nblk > 1 {
            pdbc.split_at_mut(lgn)
        } else {
            // SAFETY: with one block per row, this task is the only one touching row b.
            unsafe { (db_sh.slice(b * lgn, lgn), dc_sh.slice(b * lgn, lgn)) }
        };
        let io = BlockIo { saved, dy, dh_last, outs: &outs };
        bwd_block(dims, args, (b, blk), io, (db_row, dc_row), (pda, pdd, pdbias));
    });

    // Sum the partials in task order (deterministic for any thread count).
    let (mut dd, mut ddelta_bias) = (dd, ddelta_bias);
    for (task, part) in parts.chunks_exact(plen).enumerate() {
        let (b, blk) = (task / nblk, task % nblk);
        let ch0 = blk * maxch;
        let nch = maxch.min(dim - ch0);
        let (pda, rest) = part.split_at(maxch * n);
        let (pdd, rest) = rest.split_at(maxch);
        let (pdbias, pdbc) = rest.split_at(maxch);
        for (dst, src) in da[ch0 * n..(ch0 + nch) * n].iter_mut().zip(pda) {
            *dst += src;
        }
        if let (Some(dd), Some(_)) = (dd.as_deref_mut(), args.d) {
            for (dst, src) in dd[ch0..ch0 + nch].iter_mut().zip(pdd) {
                *dst += src;
            }
        }
        if let (Some(bias), Some(_)) = (ddelta_bias.as_deref_mut(), args.delta_bias) {
            for (dst, src) in bias[ch0..ch0 + nch].iter_mut().zip(pdbias) {
                *dst += src;
            }
        }
        if nblk > 1 {
            let (pb, pc) = pdbc.split_at(lgn);
            // SAFETY: the parallel section has finished; this is the only access.
            let (db_row, dc_row) = unsafe { (db_sh.slice(b * lgn, lgn), dc_sh.slice(b * lgn, lgn)) };
            for (dst, src) in db_row.iter_mut().zip(pb) {
                *dst += src;
            }
            for (dst, src) in dc_row.iter_mut().zip(pc) {
                *dst += src;
            }
        }
    }
    crate::pool::give(parts);
}

/// The inputs and shared outputs of every backward task.
#[derive(Clone, Copy)]
struct BlockIo<'a> {
    saved: Option<&'a [f32]>,
    dy: &'a [f32],
    dh_last: Option<&'a [f32]>,
    outs: &'a Outs,
}

crate::simd_fn! {
    /// The task of batch row `b`, channel block `blk`, on the active instruction set: adds into
    /// the per-element outputs and `db_row`/`dc_row`, and writes the block's dA (channels, N),
    /// dD and dΔ-bias sums into `pda`, `pdd`, `pdbias`.
    fn bwd_block[V: f16](
        dims: &Scan1Dims,
        args: &Scan1Args<f32>,
        task: (usize, usize),
        io: BlockIo,
        dbc: (&mut [f32], &mut [f32]),
        partials: (&mut [f32], &mut [f32], &mut [f32]),
    ) {
        let ((b, blk), (db_row, dc_row), (pda, pdd, pdbias)) = (task, dbc, partials);
        let n = dims.dstate;
        let BlockIo { saved, dy, dh_last, outs } = io;
        let tiles = block_tiles::<V>(args, dims, blk, TILES_PER_BLOCK);
        let acc = dispatch_n!(n, bwd_task::<V>(dims, args, &tiles, b, saved, dy, dh_last, outs, db_row, dc_row));
        let ch0 = tiles[0].d0;
        for (ti, tile) in tiles.iter().enumerate() {
            let off = tile.d0 - ch0;
            let (ddv, dbv) = (acc.dd[ti].to_array(), acc.dbias[ti].to_array());
            for l in 0..tile.w {
                pdd[off + l] = ddv[l];
                pdbias[off + l] = dbv[l];
                for k in 0..n {
                    pda[(off + l) * n + k] = acc.da[ti * n + k].to_array()[l];
                }
            }
        }
    }
}

/// One task: batch row `b`, the block `tiles`. Adds into the per-element outputs and the row's
/// `db_row`/`dc_row` ((L, G, N)); returns the per-tile dA, dD and dΔ-bias sums.
#[inline(always)]
fn bwd_task<V: V16, const NN: usize>(
    dims: &Scan1Dims,
    args: &Scan1Args<f32>,
    tiles: &[Tile<V>],
    b: usize,
    saved: Option<&[f32]>,
    dy: &[f32],
    dh_last: Option<&[f32]>,
    outs: &Outs,
    db_row: &mut [f32],
    dc_row: &mut [f32],
) -> TileAcc<V> {
    let Scan1Dims { seqlen, dim, dstate, ngroups, .. } = *dims;
    let n = if NN > 0 { NN } else { dstate };
    let gn = ngroups * n;
    let ntl = tiles.len();
    let nchunks = seqlen.div_ceil(CHUNK);
    let (ch0, ch1) = (tiles[0].d0, tiles[ntl - 1].d0 + tiles[ntl - 1].w);
    let mut acc = TileAcc {
        ckpt: V16Buf::zeroed(ntl * nchunks.max(1) * n),
        g: V16Buf::zeroed(ntl * n),
        da: V16Buf::zeroed(ntl * n),
        dd: V16Buf::zeroed(ntl),
        dbias: V16Buf::zeroed(ntl),
    };
    let mut hb = StateBuf::<V, NN>::new(n);
    let h = hb.get();

    // Pass 1: chunk-start checkpoints, walking time blocks over all tiles of the block.
    let mut cur = V16Buf::zeroed(ntl * n);
    let row_b = b * dim * n..(b + 1) * dim * n;
    for (ti, tile) in tiles.iter().enumerate() {
        if let Some(h0) = args.h0 {
            tile.load_state(&h0[row_b.clone()], n, &mut cur[ti * n..(ti + 1) * n]);
        }
        if let Some(dl) = dh_last {
            tile.load_state(&dl[row_b.clone()], n, &mut acc.g[ti * n..(ti + 1) * n]);
        }
    }
    let mut reads: Vec<&[f32]> = vec![args.u, args.delta];
    reads.extend(args.z);
    let pf = Prefetch { arrays: &reads, ahead: TIME_BLOCK, ch0, ch1 };
    // With the forward's checkpoints there is nothing to recompute in pass 1.
    let pass1_steps = match saved {
        Some(saved) => {
            for (ti, tile) in tiles.iter().enumerate() {
                for c in 0..nchunks {
                    let at = (b * nchunks + c) * dim * n;
                    let dst = &mut acc.ckpt[(ti * nchunks + c) * n..(ti * nchunks + c + 1) * n];
                    tile.load_state(&saved[at..at + dim * n], n, dst);
                }
            }
            0
        }
        None => {
            prefetch_rows(&reads, dims, b, 0, TIME_BLOCK, ch0, ch1);
            seqlen
        }
    };
    for t0 in (0..pass1_steps).step_by(TIME_BLOCK) {
        let t1 = (t0 + TIME_BLOCK).min(seqlen);
        for ti in 0..ntl {
            let hs = &mut cur[ti * n..(ti + 1) * n];
            if t0 % CHUNK == 0 {
                let c = t0 / CHUNK;
                acc.ckpt[(ti * nchunks + c) * n..(ti * nchunks + c + 1) * n].copy_from_slice(hs);
            }
            h.copy_from_slice(hs);
            let pf = (ti == 0).then_some(&pf);
            run_steps_resetting::<V, NN, false>(dims, args, &tiles[ti], b, (t0, t1), h, None, pf);
            hs.copy_from_slice(h);
        }
    }

    // Pass 2: chunks last to first; every tile of the block per chunk.
    let mut buf = ChunkBuf {
        states: V16Buf::zeroed(CHUNK * n),
        abar: V16Buf::zeroed(CHUNK * n),
        vdb: V16Buf::zeroed(CHUNK * n),
        vdc: V16Buf::zeroed(CHUNK * n),
        dts: V16Buf::zeroed(CHUNK),
        dsp: V16Buf::zeroed(CHUNK),
    };
    reads.push(dy);
    for c in (0..nchunks).rev() {
        let t0 = c * CHUNK;
        let t1 = (t0 + CHUNK).min(seqlen);
        if c + 1 == nchunks {
            // Later chunks were warmed by the walk over the chunk after them.
            prefetch_rows(&reads, dims, b, t0, t1, ch0, ch1);
        }
        let back = BackPrefetch { reads: &reads, ch0, ch1 };
        // The group whose lane-wise dB/dC sums `buf.vdb`/`buf.vdc` hold.
        let mut pending: Option<usize> = None;
        for (ti, tile) in tiles.iter().enumerate() {
            if let Groups::Uniform(gi) = tile.groups
                && pending != Some(gi)
            {
                flush_bc(&mut buf, pending, n, gn, t0, t1, db_row, dc_row);
                pending = Some(gi);
            }
            h.copy_from_slice(&acc.ckpt[(ti * nchunks + c) * n..(ti * nchunks + c + 1) * n]);
            let (g, da) = (&mut acc.g[ti * n..(ti + 1) * n], &mut acc.da[ti * n..(ti + 1) * n]);
            let mut gb = StateBuf::<V, NN>::new(n);
            let gl = gb.get();
            gl.copy_from_slice(g);
            let mut dab = StateBuf::<V, NN>::new(n);
            let dal = dab.get();
            dal.copy_from_slice(da);
            let pf = (ti == 0).then_some(&back);
            let (dd, dbias) = chunk_bwd::<V, NN>(
                dims, args, tile, b, t0, t1, h, gl, dal, &mut buf, dy, outs, db_row, dc_row, pf,
            );
            g.copy_from_slice(gl);
            da.copy_from_slice(dal);
            acc.dd[ti] += dd;
            acc.dbias[ti] += dbias;
        }
        flush_bc(&mut buf, pending, n, gn, t0, t1, db_row, dc_row);
    }
    if let Some(dh0) = &outs.dh0 {
        for (ti, tile) in tiles.iter().enumerate() {
            // SAFETY: this task is the only one touching channels d0..d0+w of batch row b.
            unsafe { tile.store_state(dh0, b * dim * n, n, &acc.g[ti * n..(ti + 1) * n], true) };
        }
    }
    acc
}

/// Backward of one tile over the chunk `t0..t1` (monomorphised on its group layout). `h` holds
/// the chunk's start state, `g` the adjoint after the chunk (updated to the adjoint before it),
/// `da` the running dA. Returns this chunk's (dD, dΔ-bias) lane sums.
#[inline(always)]
fn chunk_bwd<V: V16, const NN: usize>(
    dims: &Scan1Dims,
    args: &Scan1Args<f32>,
    tile: &Tile<V>,
    b: usize,
    t0: usize,
    t1: usize,
    h: &mut [V],
    g: &mut [V],
    da: &mut [V],
    buf: &mut ChunkBuf<V>,
    dy: &[f32],
    outs: &Outs,
    db_row: &mut [f32],
    dc_row: &mut [f32],
    pf: Option<&BackPrefetch>,
) -> (V, V) {
    let Scan1Dims { seqlen, ngroups, dstate, .. } = *dims;
    let n = if NN > 0 { NN } else { dstate };
    let gn = ngroups * n;
    match tile.groups {
        Groups::Uniform(gi) => {
            let bc_at = |t: usize| {
                let row = (b * seqlen + t) * gn + gi * n;
                UniformBc { b: &args.b[row..row + n], c: &args.c[row..row + n], goff: gi * n }
            };
            chunk_bwd_np::<V, NN, true, _, _>(
                dims, args, tile, b, t0, t1, h, g, da, buf, dy, outs, db_row, dc_row, pf, bc_at,
            )
        }
        Groups::Mixed(gs) => {
            let off = mixed_offsets(&gs, n);
            let bc_at = |t: usize| {
                let row = (b * seqlen + t) * gn;
                MixedBc { b: &args.b[row..row + gn], c: &args.c[row..row + gn], off }
            };
            chunk_bwd_np::<V, NN, false, _, _>(
                dims, args, tile, b, t0, t1, h, g, da, buf, dy, outs, db_row, dc_row, pf, bc_at,
            )
        }
    }
}

/// Reduces the lane-wise dB/dC sums of `buf` into group `g`'s columns of `db_row`/`dc_row` for
/// steps `t0..t1`, and clears them. Nothing to do when `g` is `None`.
#[inline(always)]
fn flush_bc<V: V16>(
    buf: &mut ChunkBuf<V>,
    g: Option<usize>,
    n: usize,
    gn: usize,
    t0: usize,
    t1: usize,
    db_row: &mut [f32],
    dc_row: &mut [f32],
) {
    let Some(g) = g else { return };
    for t in t0..t1 {
        let j = t - t0;
        let row = t * gn + g * n;
        for k in 0..n {
            db_row[row + k] += buf.vdb[j * n + k].reduce_add();
            dc_row[row + k] += buf.vdc[j * n + k].reduce_add();
        }
    }
    buf.vdb[..(t1 - t0) * n].fill(V::ZERO);
    buf.vdc[..(t1 - t0) * n].fill(V::ZERO);
}

/// Dispatches [`chunk_bwd_impl`] on the tile's `nonpos` flag (which `exp` to use).
#[inline(always)]
fn chunk_bwd_np<V: V16, const NN: usize, const VEC: bool, S: Bc<V>, F: Fn(usize) -> S>(
    dims: &Scan1Dims,
    args: &Scan1Args<f32>,
    tile: &Tile<V>,
    b: usize,
    t0: usize,
    t1: usize,
    h: &mut [V],
    g: &mut [V],
    da_acc: &mut [V],
    buf: &mut ChunkBuf<V>,
    dy: &[f32],
    outs: &Outs,
    db_row: &mut [f32],
    dc_row: &mut [f32],
    pf: Option<&BackPrefetch>,
    bc_at: F,
) -> (V, V) {
    if tile.nonpos {
        chunk_bwd_impl::<V, NN, VEC, true, S, F>(
            dims, args, tile, b, t0, t1, h, g, da_acc, buf, dy, outs, db_row, dc_row, pf, bc_at,
        )
    } else {
        chunk_bwd_impl::<V, NN, VEC, false, S, F>(
            dims, args, tile, b, t0, t1, h, g, da_acc, buf, dy, outs, db_row, dc_row, pf, bc_at,
        )
    }
}

/// With `VEC`, dB/dC contributions go lane-wise into `buf.vdb`/`buf.vdc` (reduced later by
/// [`flush_bc`]); otherwise they are reduced into `db_row`/`dc_row` at once per lane group.
#[inline(always)]
fn chunk_bwd_impl<V: V16, const NN: usize, const VEC: bool, const NP: bool, S: Bc<V>, F: Fn(usize) -> S>(
    dims: &Scan1Dims,
    args: &Scan1Args<f32>,
    tile: &Tile<V>,
    b: usize,
    t0: usize,
    t1: usize,
    h: &mut [V],
    g: &mut [V],
    da_acc: &mut [V],
    buf: &mut ChunkBuf<V>,
    dy: &[f32],
    outs: &Outs,
    db_row: &mut [f32],
    dc_row: &mut [f32],
    pf: Option<&BackPrefetch>,
    bc_at: F,
) -> (V, V) {
    let Scan1Dims { seqlen, dim, dstate, ngroups, .. } = *dims;
    let n = if NN > 0 { NN } else { dstate };
    let (d0, w) = (tile.d0, tile.w);
    let gn = ngroups * n;
    let sp = args.delta_softplus;
    let a = &tile.a[..n];
    let (h, g, da_acc) = (&mut h[..n], &mut g[..n], &mut da_acc[..n]);
    let h_start = {
        let mut s = StateBuf::<V, NN>::new(n);
        s.get().copy_from_slice(h);
        s
    };

    // Recompute the chunk's states and decay factors. At a sequence start the state entering
    // the step is zero and the decay is taken as 0: no dA / dΔ term from the earlier state, and
    // the adjoint stops there.
    let resets = args.resets.map(|r| &r[b * seqlen..(b + 1) * seqlen]);
    for t in t0..t1 {
        let j = t - t0;
        let i = (b * seqlen + t) * dim + d0;
        let x = V::load(&args.u[i..i + w]);
        let (dt, dsp) = tile.delta(V::load(&args.delta[i..i + w]), sp, true);
        buf.dts[j] = dt;
        buf.dsp[j] = dsp;
        let reset = resets.is_some_and(|r| r[t]);
        if reset {
            h.fill(V::ZERO);
        }
        let abar = &mut buf.abar[j * n..(j + 1) * n];
        advance::<V, _, false, NP>(a, h, dt, x, &bc_at(t), Some(&mut *abar));
        if reset {
            abar.fill(V::ZERO);
        }
        buf.states[j * n..(j + 1) * n].copy_from_slice(h);
    }

    // Reverse over the chunk.
    let (mut dd_acc, mut dbias_acc) = (V::ZERO, V::ZERO);
    for t in (t0..t1).rev() {
        if let Some(pf) = pf {
            pf.row(dims, b, outs, t);
        }
        let j = t - t0;
        let i = (b * seqlen + t) * dim + d0;
        let bc = bc_at(t);
        let db_t = &mut db_row[t * gn..(t + 1) * gn];
        let dc_t = &mut dc_row[t * gn..(t + 1) * gn];
        let x = V::load(&args.u[i..i + w]);
        let dt = buf.dts[j];
        let dout = V::load(&dy[i..i + w]);
        let hs = &buf.states[j * n..(j + 1) * n];
        let hprev: &[V] = if j > 0 {
            &buf.states[(j - 1) * n..j * n]
        } else {
            // The chunk's start state was overwritten by the recompute; it is `h_start`.
            &h_start.arr_or_vec()[..n]
        };
        let abar = &buf.abar[j * n..(j + 1) * n];
        let dyy = match args.z {
            Some(z) => {
                let zv = V::load(&z[i..i + w]);
                let s = simd::sigmoid(zv);
                if let Some(dz) = &outs.dz {
                    let mut ypre = tile.dskip * x;
                    for k in 0..n {
                        ypre = hs[k].mul_add(bc.c(k), ypre);
                    }
                    let sg = s * (V::splat(1.0) + zv * (V::splat(1.0) - s));
                    // SAFETY: (b, t, tile) owns these elements.
                    V::add_store(unsafe { dz.slice(i, w) }, dout * ypre * sg);
                }
                dout * zv * s
            }
            None => dout,
        };
        dd_acc = dyy.mul_add(x, dd_acc);
        let dx = dt * x;
        let (mut gb, mut sa) = (V::ZERO, V::ZERO);
        for k in 0..n {
            let gk = bc.c(k).mul_add(dyy, g[k]);
            if VEC {
                let v = j * n + k;
                buf.vdc[v] = hs[k].mul_add(dyy, buf.vdc[v]);
                buf.vdb[v] = gk.mul_add(dx, buf.vdb[v]);
            } else {
                bc.accum(dc_t, k, w, hs[k] * dyy);
                bc.accum(db_t, k, w, gk * dx);
            }
            gb = gk.mul_add(bc.b(k), gb);
            let s = gk * hprev[k] * abar[k];
            sa = s.mul_add(a[k], sa);
            da_acc[k] = s.mul_add(dt, da_acc[k]);
            g[k] = gk * abar[k];
        }
        let du = tile.dskip.mul_add(dyy, gb * dt);
        let ddt = gb.mul_add(x, sa) * buf.dsp[j];
        dbias_acc += ddt;
        // SAFETY: (b, t, tile) owns these elements.
        unsafe {
            V::add_store(outs.du.slice(i, w), du);
            V::add_store(outs.ddelta.slice(i, w), ddt);
        }
    }
    (dd_acc, dbias_acc)
}
