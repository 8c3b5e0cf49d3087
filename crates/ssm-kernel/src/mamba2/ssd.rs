//! Chunked SSD ("state-space dual") form of the Mamba-2 scan: forward and hand-derived backward
//! with GEMMs (`matrixmultiply::sgemm`), and the `*_auto` dispatchers.
//!
//! # Algorithm (forward)
//!
//! Split `L` into chunks of `Q` steps (the last one may be shorter, `q ≤ Q`). Inside a chunk,
//! with local times `s ≤ t < q`, `S₀` the (N × P) state entering the chunk (`h` transposed),
//! `dt_s = Δ_s` and the running log-decay `cs_t = Σ_{r ≤ t} dt_r · A`:
//!
//! ```text
//! L[t, s] = exp(cs_t − cs_s)                  (s ≤ t: ≤ 1 for A < 0, never exp of a positive sum)
//! M[t, s] = (C Bᵀ)[t, s] · L[t, s] · dt_s      (s ≤ t, else 0)
//! Y       = M · X  +  diag(exp(cs)) · C · S₀  +  D · X           (then Y ← Y · silu(Z))
//! S₁      = exp(cs_{q−1}) · S₀ + (diag(w) B)ᵀ · X,   w_s = exp(cs_{q−1} − cs_s) · dt_s
//! ```
//!
//! so a chunk costs the GEMMs `C Bᵀ` (q×N×q, shared by the heads of a group and computed once
//! per (b, g, chunk)), `M X` (q×q×P), `C S₀` (q×N×P) and `Bᵀ X` (N×q×P). The recurrence over
//! chunk boundaries (`S₀ ← S₁`) is the short sequential part. Each (b, h) is a task on the
//! current rayon pool; matrices are read in place through strides (no transposed copies).
//!
//! # Backward
//!
//! Given `dy` and `dS₁` (the adjoint of the chunk's end state; `dh_last` for the last chunk),
//! with `dY = dy · silu(z)` (and `dz = dy · Y_pre · silu'(z)`, `Y_pre` recomputed):
//!
//! ```text
//! diagonal:   dX  += Mᵀ dY                      dM = dY Xᵀ            (s ≤ t)
//!             dCB  = dM ∘ L ∘ dt_s               dC += dCB · B          dB += dCBᵀ · C
//!             W    = dM ∘ CB ∘ L                 ddt_s += Σ_t W[t, s]
//!             E    = W ∘ dt_s                    dcs_t += Σ_s E[t, s],  dcs_s −= Σ_t E[t, s]
//! off-diag:   dYs  = diag(exp(cs)) dY            dC += dYs S₀ᵀ          dS₀ = Cᵀ dYs
//!             dcs_t += Σ_p dY[t, p] · Y_off[t, p]       (Y_off = diag(exp(cs)) C S₀)
//! state:      dS₀ += exp(cs_{q−1}) dS₁           dcs_{q−1} += exp(cs_{q−1}) ⟨S₀, dS₁⟩
//!             U = B dS₁                          dX[s] += w_s U[s]      dB[s] += w_s (X dS₁ᵀ)[s]
//!             dw_s = ⟨U[s], X[s]⟩                ddt_s += dw_s exp(cs_{q−1} − cs_s)
//!             dcs_{q−1} += Σ_s dw_s w_s,         dcs_s −= dw_s w_s
//! skip:       dX += D dY,  dD += ⟨dY, X⟩
//! cumsum:     da_r = Σ_{t ≥ r} dcs_t            ddt_r += A · da_r,     dA += Σ_r dt_r · da_r
//! ```
//!
//! then `dΔ_raw = ddt · softplus'(Δ_raw + bias)`, and `dS₀` becomes `dS₁` of the previous chunk
//! (`dh0` after the first). The backward first runs the state recurrence forward keeping the
//! `⌈L/Q⌉` chunk-entry states (`⌈L/Q⌉·N·P` floats per task), then walks the chunks backwards.

use crate::gemm::gemm;
use rayon::prelude::*;

use super::common::{BwdShared, GroupPartials, TaskScalars, dt_eff};
use super::{Scan2Args, Scan2Dims, Scan2Grads, Scan2Out, check_upstream};
use crate::Real;
use crate::par::SharedMut;
use crate::simd::{self, V8, W};

/// Shape facts of a chunked run.
#[derive(Clone, Copy)]
struct Chunks {
    q: usize,
    nch: usize,
    seqlen: usize,
}

impl Chunks {
    fn new(dims: &Scan2Dims, chunk_size: usize) -> Self {
        let q = chunk_size.max(1).min(dims.seqlen.max(1));
        Self { q, nch: dims.seqlen.div_ceil(q), seqlen: dims.seqlen }
    }
    /// (start, length) of chunk `c`.
    fn range(&self, c: usize) -> (usize, usize) {
        let t0 = c * self.q;
        (t0, self.q.min(self.seqlen - t0))
    }
}

/// `C Bᵀ` for every (b, g, chunk): `(B, G, nch, Q, Q)`, row stride `Q`.
fn chunk_cb(dims: &Scan2Dims, ch: Chunks, args: &Scan2Args<f32>) -> Vec<f32> {
    let Scan2Dims { seqlen, dstate: n, ngroups, .. } = *dims;
    let qq = ch.q * ch.q;
    let mut cb = vec![0.0f32; dims.batch * ngroups * ch.nch * qq];
    cb.par_chunks_mut(qq).enumerate().for_each(|(idx, blk)| {
        let (bg, c) = (idx / ch.nch, idx % ch.nch);
        let (b, g) = (bg / ngroups, bg % ngroups);
        let (t0, q) = ch.range(c);
        let off = ((b * seqlen + t0) * ngroups + g) * n;
        let gn = ngroups * n;
        gemm((q, n, q), 1.0, &args.c[off..], (gn, 1), &args.b[off..], (1, gn), 0.0, blk, (ch.q, 1));
    });
    cb
}

/// Fills `dt[..q]`, `dsp[..q]` and the inclusive cumsum `cs[..q]` of `dt·A` for chunk `t0`.
#[allow(clippy::too_many_arguments)]
fn chunk_dt(
    dims: &Scan2Dims,
    args: &Scan2Args<f32>,
    b: usize,
    h: usize,
    t0: usize,
    q: usize,
    dt: &mut [f32],
    dsp: &mut [f32],
    cs: &mut [f32],
) {
    let a = args.a[h];
    let mut run = 0.0f32;
    for s in 0..q {
        let ih = (b * dims.seqlen + t0 + s) * dims.nheads + h;
        let (d, g) = dt_eff(args, ih, h);
        dt[s] = d;
        dsp[s] = g;
        run += d * a;
        cs[s] = run;
    }
}

/// Sequence starts inside chunk `t0..t0 + q` of batch row `b` (see [`Scan2Args`]'s resets),
/// as the two things the chunked form needs: `lo[t]`, the first local step of `t`'s sequence
/// (0 when it began before the chunk), and `e0[t] = exp(cs_t)`, the decay from the chunk's
/// entry state to step `t` — 0 once a sequence has started inside the chunk at or before `t`.
/// Every decay `exp(cs_t − cs_s)` with `s < lo[t]` crosses a start and counts as 0.
fn chunk_starts(starts: Option<&[bool]>, q: usize, cs: &[f32], lo: &mut [usize], e0: &mut [f32]) {
    let mut first: Option<usize> = None;
    for t in 0..q {
        if starts.is_some_and(|r| r[t]) {
            first = Some(t);
        }
        lo[t] = first.unwrap_or(0);
        e0[t] = if first.is_some() { 0.0 } else { cs[t].exp() };
    }
}

/// The resets of chunk `t0..t0 + q` of batch row `b`, if any.
fn chunk_resets<'a>(
    args: &Scan2Args<'a, f32>,
    seqlen: usize,
    b: usize,
    t0: usize,
    q: usize,
) -> Option<&'a [bool]> {
    args.resets.map(|r| &r[b * seqlen + t0..b * seqlen + t0 + q])
}

/// Row `t` of the decay-weighted kernel: `m[s] = cb[s]·exp(cs_t − cs_s)·dt_s` for
/// `lo ≤ s ≤ t`, zero elsewhere (`lo`: the first step of `t`'s sequence, see [`chunk_starts`]);
/// when `l` is given it also receives `exp(cs_t − cs_s)` (zero outside `lo..=t`).
#[inline(always)]
fn kernel_row<V: V8>(
    (t, lo): (usize, usize),
    q: usize,
    cs: &[f32],
    dt: &[f32],
    cb: &[f32],
    m: &mut [f32],
    mut l: Option<&mut [f32]>,
) {
    let ct = V::splat(cs[t]);
    let mut s = 0;
    while s <= t {
        let e = t + 1;
        let lv = simd::exp(ct - V::load(&cs[s..e]));
        let mv = V::load(&cb[s..e]) * lv * V::load(&dt[s..e]);
        V::store(&mut m[s..e], mv);
        if let Some(l) = l.as_deref_mut() {
            V::store(&mut l[s..e], lv);
        }
        s += W;
    }
    m[t + 1..q].fill(0.0);
    m[..lo].fill(0.0);
    if let Some(l) = l {
        l[t + 1..q].fill(0.0);
        l[..lo].fill(0.0);
    }
}

/// Copies a (P, N) slice into an (N, P) matrix (or adds when `add`), and back.
fn transpose_into(src: &[f32], rows: usize, cols: usize, dst: &mut [f32], add: bool) {
    for r in 0..rows {
        for c in 0..cols {
            if add {
                dst[c * rows + r] += src[r * cols + c];
            } else {
                dst[c * rows + r] = src[r * cols + c];
            }
        }
    }
}

/// Chunked (SSD) forward. Same arguments, layouts and results as [`super::scan_fwd`]; `chunk_size`
/// is `Q` (any value ≥ 1; clamped to `L`; a last partial chunk is fine). See the module docs for
/// the algorithm.
///
/// Memory: `B·G·⌈L/Q⌉·Q²` floats for the shared `C Bᵀ` blocks plus `Q² + 2·Q·P + N·P + Q·N`
/// floats per task.
#[track_caller]
pub fn ssd_fwd(dims: &Scan2Dims, chunk_size: usize, args: &Scan2Args<f32>, out: Scan2Out<f32>) {
    const K: &str = "mamba2::ssd_fwd";
    args.check(K, dims);
    out.check(K, dims);
    let Scan2Dims { batch, nheads, .. } = *dims;
    let Scan2Out { y, h_last } = out;
    let ch = Chunks::new(dims, chunk_size);
    let cb = chunk_cb(dims, ch, args);
    let ysh = SharedMut::new(y);
    let hlsh = h_last.map(SharedMut::new);
    (0..batch * nheads)
        .into_par_iter()
        .for_each(|task| ssd_fwd_head(dims, args, (ch, &cb), &ysh, hlsh.as_ref(), task));
}

/// Chunked (SSD) backward. Same arguments, layouts and results as [`super::scan_bwd`] (adds into
/// `grads`); `chunk_size` as in [`ssd_fwd`]. The derivation is in the module docs.
///
/// Memory: the shared `C Bᵀ` blocks, `⌈L/Q⌉·N·P` chunk-entry states per task, `3·Q² + 6·Q·P +
/// 3·Q·N + 2·N·P` floats of scratch per task, and two `(B, H, L, N)` partial buffers for the
/// per-group `dB`/`dC` (summed over the heads of each group at the end).
#[track_caller]
pub fn ssd_bwd(
    dims: &Scan2Dims,
    chunk_size: usize,
    args: &Scan2Args<f32>,
    dy: &[f32],
    dh_last: Option<&[f32]>,
    grads: Scan2Grads<f32>,
) {
    const K: &str = "mamba2::ssd_bwd";
    args.check(K, dims);
    check_upstream(K, dims, dy, dh_last);
    grads.check(K, dims);
    let Scan2Dims { batch, nheads, .. } = *dims;
    let Scan2Grads { dx, ddelta, da, db, dc, dd, dz, ddelta_bias, dh0 } = grads;
    let ch = Chunks::new(dims, chunk_size);
    let cb = chunk_cb(dims, ch, args);
    let mut parts = GroupPartials::new(dims);
    let sh = BwdShared::new(&mut parts, dx, ddelta, dz, dh0);
    let scalars: Vec<TaskScalars> = (0..batch * nheads)
        .into_par_iter()
        .map(|task| ssd_bwd_head(dims, args, (ch, &cb), (dy, dh_last), &sh, task))
        .collect();
    TaskScalars::scatter(&scalars, dims, args, da, dd, ddelta_bias);
    parts.finish(dims, db, dc);
}

/// The default SSD chunk length `Q`: what callers without a preference (or a model config's
/// `chunk_size`) pass to [`scan_fwd_auto`] / [`scan_bwd_auto`].
pub const AUTO_CHUNK: usize = 32;

/// Whether the `*_auto` kernels use SSD (`true`) or the sequential kernel for these dims.
///
/// Rule, from rough timings on the target machine (2-core Zen4, 2 threads, B8-L256-H8-P64):
///
/// - **forward: always sequential.** The SIMD recurrence runs at ≈ 23 G state-updates/s
///   (2.9 ms for N = 64), while SSD needs ≈ 2× the FLOPs in small GEMMs and took 4.7 ms (Q = 32);
///   at N = 128 it was 5.0 ms vs 7.8 ms.
/// - **backward: SSD when `N·P > 4096` and `L ≥ 64`.** The sequential backward (two scans, one
///   `N·P` state per pass) wins while that state fits in L1 and loses once it does not
///   (median of 7, B8-H8-P64): L256 N16 3.7 vs 7.4 ms, N64 10.1 vs 14.0 ms, L64 N64 2.3 vs
///   3.2 ms — sequential; L256 N128 39.9 vs 27.6 ms, L1024 N128 175 vs 119 ms — SSD.
pub fn use_ssd(dims: &Scan2Dims, backward: bool) -> bool {
    backward && dims.dstate * dims.headdim > 4096 && dims.seqlen >= 64
}

/// Forward scan by whichever of [`super::scan_fwd`] and [`ssd_fwd`] (chunks of `chunk_size`
/// steps, e.g. [`AUTO_CHUNK`] or a model's `chunk_size`) is expected to be faster, by
/// [`use_ssd`] (currently always the sequential kernel). Both give the same result up to
/// rounding, whatever `chunk_size`.
#[track_caller]
pub fn scan_fwd_auto(dims: &Scan2Dims, chunk_size: usize, args: &Scan2Args<f32>, out: Scan2Out<f32>) {
    if use_ssd(dims, false) { ssd_fwd(dims, chunk_size, args, out) } else { super::scan_fwd(dims, args, out) }
}

/// Backward scan by whichever of [`super::scan_bwd`] and [`ssd_bwd`] (chunks of `chunk_size`
/// steps) is expected to be faster, by [`use_ssd`].
#[track_caller]
pub fn scan_bwd_auto(
    dims: &Scan2Dims,
    chunk_size: usize,
    args: &Scan2Args<f32>,
    dy: &[f32],
    dh_last: Option<&[f32]>,
    grads: Scan2Grads<f32>,
) {
    if use_ssd(dims, true) {
        ssd_bwd(dims, chunk_size, args, dy, dh_last, grads)
    } else {
        super::scan_bwd(dims, args, dy, dh_last, grads)
    }
}

crate::simd_fn! {
    fn ssd_fwd_head[V: f8](
        dims: &Scan2Dims,
        args: &Scan2Args<f32>,
        chcb: (Chunks, &[f32]),
        ysh: &SharedMut<f32>,
        hlsh: Option<&SharedMut<f32>>,
        task: usize,
    ) {
        let Scan2Dims { seqlen, nheads, headdim: pd, dstate: n, ngroups, .. } = *dims;
        let (ch, cb) = chcb;
        let (qm, hp, gn) = (ch.q, nheads * pd, ngroups * n);
        let (b, h) = (task / nheads, task % nheads);
        let g = dims.group_of(h);
        let mut dt = vec![0.0f32; qm];
        let mut dsp = vec![0.0f32; qm];
        let mut cs = vec![0.0f32; qm];
        let mut lo = vec![0usize; qm];
        let mut e0 = vec![0.0f32; qm];
        let mut m = vec![0.0f32; qm * qm];
        let mut yb = vec![0.0f32; qm * pd];
        let mut bw = vec![0.0f32; qm * n];
        let mut st = vec![0.0f32; n * pd];
        let s0 = task * pd * n;
        let mut zero_state = true;
        if let Some(h0) = args.h0 {
            transpose_into(&h0[s0..s0 + pd * n], pd, n, &mut st, false);
            zero_state = false;
        }
        let dmul = args.d.map_or(0.0, |d| d[h]);
        for c in 0..ch.nch {
            let (t0, q) = ch.range(c);
            chunk_dt(dims, args, b, h, t0, q, &mut dt, &mut dsp, &mut cs);
            chunk_starts(chunk_resets(args, seqlen, b, t0, q), q, &cs, &mut lo, &mut e0);
            let cbb = &cb[((b * ngroups + g) * ch.nch + c) * qm * qm..][..qm * qm];
            for t in 0..q {
                kernel_row::<V>((t, lo[t]), q, &cs, &dt, &cbb[t * qm..], &mut m[t * qm..], None);
            }
            let bc = ((b * seqlen + t0) * ngroups + g) * n;
            let xo = ((b * seqlen + t0) * nheads + h) * pd;
            // Off-diagonal: Y = diag(exp(cs)) · C · S₀.
            let mut beta = 0.0;
            if !zero_state {
                gemm((q, n, pd), 1.0, &args.c[bc..], (gn, 1), &st, (pd, 1), 0.0, &mut yb, (pd, 1));
                for t in 0..q {
                    let e = e0[t];
                    yb[t * pd..(t + 1) * pd].iter_mut().for_each(|v| *v *= e);
                }
                beta = 1.0;
            }
            // Diagonal: Y += M · X.
            gemm((q, q, pd), 1.0, &m, (qm, 1), &args.x[xo..], (hp, 1), beta, &mut yb, (pd, 1));
            for t in 0..q {
                let ih = (b * seqlen + t0 + t) * nheads + h;
                // SAFETY: row `ih` of y belongs to this (b, h) task only.
                let yrow = unsafe { ysh.slice(ih * pd, pd) };
                let xr = &args.x[ih * pd..ih * pd + pd];
                let yr = &yb[t * pd..(t + 1) * pd];
                match args.z {
                    Some(z) => {
                        let zr = &z[ih * pd..ih * pd + pd];
                        for p in 0..pd {
                            yrow[p] = (yr[p] + dmul * xr[p]) * zr[p].silu();
                        }
                    }
                    None => {
                        for p in 0..pd {
                            yrow[p] = yr[p] + dmul * xr[p];
                        }
                    }
                }
            }
            // Chunk-end state: S₁ = exp(cs_end) S₀ + (diag(w) B)ᵀ X.
            let ce = cs[q - 1];
            for s in 0..q {
                let w = if s < lo[q - 1] { 0.0 } else { (ce - cs[s]).exp() * dt[s] };
                let br = &args.b[bc + s * gn..bc + s * gn + n];
                bw[s * n..(s + 1) * n].iter_mut().zip(br).for_each(|(o, &v)| *o = v * w);
            }
            let beta = if zero_state { 0.0 } else { e0[q - 1] };
            gemm((n, q, pd), 1.0, &bw, (1, n), &args.x[xo..], (hp, 1), beta, &mut st, (pd, 1));
            zero_state = false;
        }
        if let Some(hl) = hlsh {
            // SAFETY: the (b, h) state block belongs to this task only.
            let dst = unsafe { hl.slice(s0, pd * n) };
            if zero_state {
                dst.fill(0.0);
            } else {
                transpose_into(&st, n, pd, dst, false);
            }
        }
    }
}

crate::simd_fn! {
    fn ssd_bwd_head[V: f8](
        dims: &Scan2Dims,
        args: &Scan2Args<f32>,
        chcb: (Chunks, &[f32]),
        up: (&[f32], Option<&[f32]>),
        sh: &BwdShared,
        task: usize,
    ) -> TaskScalars {
        let Scan2Dims { seqlen, nheads, headdim: pd, dstate: n, ngroups, .. } = *dims;
        let ((ch, cb), (dy, dh_last)) = (chcb, up);
        let (qm, hp, gn, np) = (ch.q, nheads * pd, ngroups * n, n * pd);
        let BwdShared { db: dbp, dc: dcp, dx: dxsh, ddelta: ddsh, dz: dzsh, dh0: dh0sh } = *sh;
        let (b, h) = (task / nheads, task % nheads);
        let g = dims.group_of(h);
        let a = args.a[h];
        let dmul = args.d.map_or(0.0, |d| d[h]);
        let s0i = task * np;
        let mut out = TaskScalars::default();
        let mut dt = vec![0.0f32; qm];
        let mut dsp = vec![0.0f32; qm];
        let mut cs = vec![0.0f32; qm];
        let mut lo = vec![0usize; qm];
        let mut e0 = vec![0.0f32; qm];
        let mut dcs = vec![0.0f32; qm];
        let mut ddt = vec![0.0f32; qm];
        let mut m = vec![0.0f32; qm * qm];
        let mut lb = vec![0.0f32; qm * qm];
        let mut dm = vec![0.0f32; qm * qm];
        let mut yoff = vec![0.0f32; qm * pd];
        let mut dyb = vec![0.0f32; qm * pd];
        let mut dys = vec![0.0f32; qm * pd];
        let mut dxb = vec![0.0f32; qm * pd];
        let mut ub = vec![0.0f32; qm * pd];
        let mut ypre = vec![0.0f32; if args.z.is_some() { qm * pd } else { 0 }];
        let mut bw = vec![0.0f32; qm * n];
        let mut dcb = vec![0.0f32; qm * n];
        let mut dbb = vec![0.0f32; qm * n];
        let mut tn = vec![0.0f32; qm * n];
        let mut states = vec![0.0f32; ch.nch.max(1) * np];
        let mut ds = vec![0.0f32; np];
        let mut dsprev = vec![0.0f32; np];
        // Forward over chunks keeping the chunk-entry states.
        if let Some(h0) = args.h0 {
            transpose_into(&h0[s0i..s0i + np], pd, n, &mut states[..np], false);
        }
        for c in 0..ch.nch {
            let (t0, q) = ch.range(c);
            chunk_dt(dims, args, b, h, t0, q, &mut dt, &mut dsp, &mut cs);
            chunk_starts(chunk_resets(args, seqlen, b, t0, q), q, &cs, &mut lo, &mut e0);
            let bc = ((b * seqlen + t0) * ngroups + g) * n;
            let xo = ((b * seqlen + t0) * nheads + h) * pd;
            let ce = cs[q - 1];
            for s in 0..q {
                let w = if s < lo[q - 1] { 0.0 } else { (ce - cs[s]).exp() * dt[s] };
                let br = &args.b[bc + s * gn..bc + s * gn + n];
                bw[s * n..(s + 1) * n].iter_mut().zip(br).for_each(|(o, &v)| *o = v * w);
            }
            if c + 1 < ch.nch {
                let (prev, next) = states.split_at_mut((c + 1) * np);
                let next = &mut next[..np];
                next.copy_from_slice(&prev[c * np..]);
                gemm((n, q, pd), 1.0, &bw, (1, n), &args.x[xo..], (hp, 1), e0[q - 1], next, (pd, 1));
            }
        }
        if let Some(dl) = dh_last {
            transpose_into(&dl[s0i..s0i + np], pd, n, &mut ds, false);
        }
        for c in (0..ch.nch).rev() {
            let (t0, q) = ch.range(c);
            let s0 = &states[c * np..(c + 1) * np];
            chunk_dt(dims, args, b, h, t0, q, &mut dt, &mut dsp, &mut cs);
            chunk_starts(chunk_resets(args, seqlen, b, t0, q), q, &cs, &mut lo, &mut e0);
            dcs[..q].fill(0.0);
            ddt[..q].fill(0.0);
            let cbb = &cb[((b * ngroups + g) * ch.nch + c) * qm * qm..][..qm * qm];
            for t in 0..q {
                let (mr, lr) = (&mut m[t * qm..], Some(&mut lb[t * qm..]));
                kernel_row::<V>((t, lo[t]), q, &cs, &dt, &cbb[t * qm..], mr, lr);
            }
            let bc = ((b * seqlen + t0) * ngroups + g) * n;
            let xo = ((b * seqlen + t0) * nheads + h) * pd;
            let (xs, bs, cm) = (&args.x[xo..], &args.b[bc..], &args.c[bc..]);
            // Y_off = diag(exp(cs)) C S₀.
            gemm((q, n, pd), 1.0, cm, (gn, 1), s0, (pd, 1), 0.0, &mut yoff, (pd, 1));
            for t in 0..q {
                let e = e0[t];
                yoff[t * pd..(t + 1) * pd].iter_mut().for_each(|v| *v *= e);
            }
            // Upstream through the gate.
            if let Some(z) = args.z {
                ypre[..q * pd].copy_from_slice(&yoff[..q * pd]);
                gemm((q, q, pd), 1.0, &m, (qm, 1), xs, (hp, 1), 1.0, &mut ypre, (pd, 1));
                for t in 0..q {
                    let ih = (b * seqlen + t0 + t) * nheads + h;
                    let i0 = ih * pd;
                    // SAFETY: row `ih` belongs to this (b, h) task only.
                    let mut dzrow = dzsh.as_ref().map(|s| unsafe { s.slice(i0, pd) });
                    for p in 0..pd {
                        let zv = z[i0 + p];
                        let yp = ypre[t * pd + p] + dmul * args.x[i0 + p];
                        if let Some(dzr) = dzrow.as_deref_mut() {
                            dzr[p] += dy[i0 + p] * yp * zv.silu_grad();
                        }
                        dyb[t * pd + p] = dy[i0 + p] * zv.silu();
                    }
                }
            } else {
                for t in 0..q {
                    let i0 = ((b * seqlen + t0 + t) * nheads + h) * pd;
                    dyb[t * pd..(t + 1) * pd].copy_from_slice(&dy[i0..i0 + pd]);
                }
            }
            // Skip connection and the off-diagonal scalar terms.
            let mut ddacc = 0.0f32;
            for t in 0..q {
                let i0 = ((b * seqlen + t0 + t) * nheads + h) * pd;
                let (dyr, xr) = (&dyb[t * pd..(t + 1) * pd], &args.x[i0..i0 + pd]);
                let yo = &yoff[t * pd..(t + 1) * pd];
                let e = e0[t];
                let mut s1 = 0.0f32;
                for p in 0..pd {
                    ddacc += dyr[p] * xr[p];
                    s1 += dyr[p] * yo[p];
                    dys[t * pd + p] = e * dyr[p];
                }
                dcs[t] += s1;
            }
            out.dd += ddacc as f64;
            // Diagonal block.
            gemm((q, pd, q), 1.0, &dyb, (pd, 1), xs, (1, hp), 0.0, &mut dm, (qm, 1));
            gemm((q, q, pd), 1.0, &m, (1, qm), &dyb, (pd, 1), 0.0, &mut dxb, (pd, 1));
            for t in 0..q {
                let row = t * qm;
                let mut rs = 0.0f32;
                for s in 0..=t {
                    let w = dm[row + s] * cbb[row + s] * lb[row + s];
                    ddt[s] += w;
                    let e = w * dt[s];
                    rs += e;
                    dcs[s] -= e;
                    dm[row + s] *= lb[row + s] * dt[s];
                }
                dcs[t] += rs;
                dm[row + t + 1..row + q].fill(0.0);
            }
            gemm((q, q, n), 1.0, &dm, (qm, 1), bs, (gn, 1), 0.0, &mut dcb, (n, 1));
            gemm((q, q, n), 1.0, &dm, (1, qm), cm, (gn, 1), 0.0, &mut dbb, (n, 1));
            // Off-diagonal block.
            gemm((q, pd, n), 1.0, &dys, (pd, 1), s0, (1, pd), 1.0, &mut dcb, (n, 1));
            gemm((n, q, pd), 1.0, cm, (1, gn), &dys, (pd, 1), 0.0, &mut dsprev, (pd, 1));
            // Chunk-end state.
            let ce = cs[q - 1];
            let ece = e0[q - 1];
            let mut sds = 0.0f32;
            for i in 0..np {
                dsprev[i] += ece * ds[i];
                sds += s0[i] * ds[i];
            }
            dcs[q - 1] += ece * sds;
            gemm((q, n, pd), 1.0, bs, (gn, 1), &ds, (pd, 1), 0.0, &mut ub, (pd, 1));
            gemm((q, pd, n), 1.0, xs, (hp, 1), &ds, (1, pd), 0.0, &mut tn, (n, 1));
            let mut dce = 0.0f32;
            for s in 0..q {
                let i0 = ((b * seqlen + t0 + s) * nheads + h) * pd;
                let el = if s < lo[q - 1] { 0.0 } else { (ce - cs[s]).exp() };
                let w = el * dt[s];
                let (ur, xr) = (&ub[s * pd..(s + 1) * pd], &args.x[i0..i0 + pd]);
                let mut dw = 0.0f32;
                for p in 0..pd {
                    dw += ur[p] * xr[p];
                    dxb[s * pd + p] += w * ur[p];
                }
                for k in 0..n {
                    dbb[s * n + k] += w * tn[s * n + k];
                }
                ddt[s] += dw * el;
                dce += dw * w;
                dcs[s] -= dw * w;
            }
            dcs[q - 1] += dce;
            // Reverse cumsum of dcs → d(dt·A); write per-step results.
            let mut run = 0.0f32;
            for s in (0..q).rev() {
                run += dcs[s];
                ddt[s] += a * run;
                out.da += (dt[s] * run) as f64;
            }
            for s in 0..q {
                let t = t0 + s;
                let ih = (b * seqlen + t) * nheads + h;
                let draw = ddt[s] * dsp[s];
                // SAFETY: rows (b, t, h) and the task's partial rows belong to this task.
                let dd1 = unsafe { ddsh.slice(ih, 1) };
                dd1[0] += draw;
                out.dbias += draw as f64;
                let dxr = unsafe { dxsh.slice(ih * pd, pd) };
                for p in 0..pd {
                    dxr[p] += dxb[s * pd + p] + dmul * dyb[s * pd + p];
                }
                let prow = (task * seqlen + t) * n;
                unsafe { dbp.slice(prow, n) }.copy_from_slice(&dbb[s * n..(s + 1) * n]);
                unsafe { dcp.slice(prow, n) }.copy_from_slice(&dcb[s * n..(s + 1) * n]);
            }
            std::mem::swap(&mut ds, &mut dsprev);
        }
        if let Some(dh0) = dh0sh {
            // SAFETY: the (b, h) state block belongs to this task only.
            transpose_into(&ds, n, pd, unsafe { dh0.slice(s0i, np) }, true);
        }
        out
    }
}
