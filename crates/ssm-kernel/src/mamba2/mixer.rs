//! The core of the Mamba-2 mixer — causal conv + SiLU on `xBC`, the selective scan and the
//! gated RMSNorm — fused, one task per batch row.
//!
//! Between `in_proj` and `out_proj` a Mamba-2 block does little arithmetic per byte: run as
//! separate kernels (gather, conv, scan, norm), each pass streams multi-megabyte activations
//! through memory, and at the "S" size that memory traffic, not arithmetic, is most of the
//! block's time. Here one task walks its batch row in blocks of 16 time steps and does everything
//! for the block while it is in cache: the conv rows from the projection (`z | x | B | C | dt`),
//! each head's scan over the block (its `N·P` state stays in L1), the gated norm of the rows.
//! The backward needs from the forward only the pre-norm scan output `y` and one reciprocal
//! RMS per (row, group); the conv is recomputed from the projection.
//!
//! The backward is the two-scan form of [`super::scan_bwd`] (see there for `α`, `β` and `M`)
//! with the norm and conv folded in:
//!
//! - **pass 1, forward in time:** conv, the norm's backward for the rows (`dy` of the scan, `dz`
//!   written into the projection's gradient, `d norm.weight`), then each head's state step with
//!   `dC_t = h_t · dy_t` and `α_t`. `dy` (L, d_inner) and `dC` rows are kept for pass 2.
//! - **pass 2, backward in time:** conv recomputed with its pre-activation, the adjoint step of
//!   every head (`dx`, `dB`, `β`, `M(t)`, `dΔ` written into the projection's `dt` column), then
//!   the conv's backward: the SiLU derivative, `d weight` / `d bias`, and — since rows
//!   `t..t+K−1` of the pre-activation gradient are known by then — the finished `x | B | C`
//!   gradient of projection row `t`.
//!
//! Layouts (row-major): `proj` (B, L, 2·d_inner + 2·G·N + H) split as `z | x | B | C | dt`,
//! conv weight (C, K) and bias (C) with `C = d_inner + 2·G·N`, `dt_bias`, `a`, `d` (H),
//! `norm_w` (d_inner), output (B, L, d_inner), `rstd` (B, L, G), `h_last` (B, H, P, N). The
//! kernels need `P` and `G·N` to be multiples of 8 ([`MixerDims::supported`]); callers fall back
//! to the separate kernels otherwise.

use rayon::prelude::*;

use super::common::{blocks, state_out, take};
use super::seq::{adjoint_block, load_x, step_state};
use crate::Real;
use crate::check::{check_dims, check_len, check_opt_len};
use crate::conv::{first_reader_tap, first_tap};
use crate::pool::{self, F32Buf};
use crate::simd::{self, V8, Vf32, W, dot_with};

/// The widest conv the fused kernels take (its per-tap sums live in registers).
const MAX_K: usize = 8;

/// Sizes of the fused Mamba-2 mixer core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MixerDims {
    /// `B`.
    pub batch: usize,
    /// `L`.
    pub seqlen: usize,
    /// `H`.
    pub nheads: usize,
    /// `P`.
    pub headdim: usize,
    /// `N`.
    pub dstate: usize,
    /// `G`.
    pub ngroups: usize,
    /// Conv width `K`.
    pub width: usize,
}

impl MixerDims {
    /// `d_inner = H·P`.
    pub fn d_inner(&self) -> usize {
        self.nheads * self.headdim
    }

    /// `G·N`.
    pub fn gn(&self) -> usize {
        self.ngroups * self.dstate
    }

    /// Conv channels `C = d_inner + 2·G·N`.
    pub fn conv_dim(&self) -> usize {
        self.d_inner() + 2 * self.gn()
    }

    /// Projection width `2·d_inner + 2·G·N + H`.
    pub fn proj_dim(&self) -> usize {
        2 * self.d_inner() + 2 * self.gn() + self.nheads
    }

    /// Whether the fused kernels handle these dims: `P` and `G·N` multiples of 8, `G` dividing
    /// `H`, `1 ≤ K ≤ 8`.
    pub fn supported(&self) -> bool {
        self.headdim.is_multiple_of(W)
            && self.gn().is_multiple_of(W)
            && self.ngroups >= 1
            && self.nheads.is_multiple_of(self.ngroups)
            && (1..=MAX_K).contains(&self.width)
            && self.dstate >= 1
    }

    /// Whether a caller should run the fused [`mixer_fwd`] / [`mixer_bwd`] rather than the
    /// separate conv, scan and norm kernels: when the dims are [`MixerDims::supported`] and
    /// there are at least as many batch rows as threads in the current rayon pool. The fused
    /// kernels' tasks are batch rows; with fewer rows than threads the separate kernels, whose
    /// tasks are (batch, head) pairs and row blocks, keep every thread busy.
    pub fn use_fused(&self) -> bool {
        self.supported() && self.batch >= rayon::current_num_threads()
    }

    #[track_caller]
    fn check(&self, kernel: &str) {
        check_dims(kernel, self.supported(), "P and G·N must be multiples of 8, G must divide H, 1 ≤ K ≤ 8");
    }
}

/// Parameters of the mixer core (HF names: `conv1d.weight`, `conv1d.bias`, `dt_bias`,
/// `−exp(A_log)`, `D`, `norm.weight`).
#[derive(Clone, Copy, Debug)]
pub struct MixerParams<'a> {
    /// Conv weight, (C, K).
    pub conv_w: &'a [f32],
    /// Conv bias, (C), optional.
    pub conv_b: Option<&'a [f32]>,
    /// Δ bias, (H).
    pub dt_bias: &'a [f32],
    /// `A = −exp(A_log)`, (H).
    pub a: &'a [f32],
    /// Skip `D`, (H).
    pub d: &'a [f32],
    /// Gated-norm weight, (d_inner).
    pub norm_w: &'a [f32],
    /// Gated-norm epsilon.
    pub eps: f32,
    /// Sequence starts, (B, L), optional: conv and scan restart from zero at each (as in
    /// [`Scan2Args`](super::Scan2Args) and [`ConvArgs`](crate::conv::ConvArgs)).
    pub resets: Option<&'a [bool]>,
}

impl MixerParams<'_> {
    #[track_caller]
    fn check(&self, kernel: &str, dims: &MixerDims) {
        let (c, k, h) = (dims.conv_dim(), dims.width, dims.nheads);
        check_len(kernel, "conv_w", format_args!("(C, K) = ({c}, {k})"), self.conv_w.len(), c * k);
        check_opt_len(kernel, "conv_b", format_args!("(C) = ({c})"), self.conv_b, c);
        for (name, v) in [("dt_bias", self.dt_bias), ("a", self.a), ("d", self.d)] {
            check_len(kernel, name, format_args!("(H) = ({h})"), v.len(), h);
        }
        let di = dims.d_inner();
        check_len(kernel, "norm_w", format_args!("(d_inner) = ({di})"), self.norm_w.len(), di);
        check_opt_len(kernel, "resets", "(B, L)", self.resets, dims.batch * dims.seqlen);
    }
}

/// Gradient buffers of [`mixer_bwd`]; every buffer is added to, except `dproj`, which is
/// overwritten when `overwrite_dproj` is set.
#[derive(Debug)]
pub struct MixerGrads<'a> {
    /// d`proj`, (B, L, proj_dim).
    pub dproj: &'a mut [f32],
    /// Write `dproj` instead of adding to it.
    pub overwrite_dproj: bool,
    /// d conv weight, (C, K).
    pub dconv_w: &'a mut [f32],
    /// d conv bias, (C).
    pub dconv_b: Option<&'a mut [f32]>,
    /// dΔ bias, (H).
    pub ddt_bias: &'a mut [f32],
    /// d`A`, (H).
    pub da: &'a mut [f32],
    /// d`D`, (H).
    pub dd: &'a mut [f32],
    /// d norm weight, (d_inner).
    pub dnorm_w: &'a mut [f32],
}

impl Drop for Conv {
    fn drop(&mut self) {
        pool::give(std::mem::take(&mut self.wt));
        pool::give(std::mem::take(&mut self.bias));
    }
}

/// Where [`Conv::row`] also writes the pre-activation and its sigmoid (for the SiLU derivative).
type Pre<'a> = Option<(&'a mut [f32], &'a mut [f32])>;

/// The conv weight transposed to (K, C) and the bias (C), so a tap of 8 channels is one load.
struct Conv {
    wt: Vec<f32>,
    bias: Vec<f32>,
    c: usize,
    k: usize,
}

impl Conv {
    /// The packed weights, in buffers from [`crate::pool`] (given back on drop).
    fn new(dims: &MixerDims, p: &MixerParams) -> Self {
        let (c, k) = (dims.conv_dim(), dims.width);
        let mut wt = pool::take_for_overwrite(k * c);
        for ch in 0..c {
            for kk in 0..k {
                wt[kk * c + ch] = p.conv_w[ch * k + kk];
            }
        }
        let mut bias = pool::take(c);
        if let Some(b) = p.conv_b {
            bias.copy_from_slice(b);
        }
        Self { wt, bias, c, k }
    }

    /// Row `t` of the conv over the `x | B | C` columns (from `off`) of `proj_b`, one batch row
    /// of the projection ((L, dp) flat), with the taps from `kmin` on (the earlier ones fall
    /// before the row's sequence start, see [`first_tap`]): the SiLU output into `post` (C) and,
    /// when given, the pre-activation and its sigmoid into `pre` (C each).
    #[inline(always)]
    fn row<V: V8>(
        &self,
        proj_b: &[f32],
        (dp, off): (usize, usize),
        (t, kmin): (usize, usize),
        post: &mut [f32],
        pre: Pre,
    ) {
        match self.k {
            1 => self.row_k::<V, 1>(proj_b, dp, off, (t, kmin), post, pre),
            2 => self.row_k::<V, 2>(proj_b, dp, off, (t, kmin), post, pre),
            3 => self.row_k::<V, 3>(proj_b, dp, off, (t, kmin), post, pre),
            4 => self.row_k::<V, 4>(proj_b, dp, off, (t, kmin), post, pre),
            _ => self.row_k::<V, 0>(proj_b, dp, off, (t, kmin), post, pre),
        }
    }

    /// [`Conv::row`] with the width `KS` a constant (0: read at run time), four channel vectors
    /// at a time so the taps' multiply-adds and the SiLUs overlap.
    #[inline(always)]
    fn row_k<V: V8, const KS: usize>(
        &self,
        proj_b: &[f32],
        dp: usize,
        off: usize,
        (t, kmin): (usize, usize),
        post: &mut [f32],
        mut pre: Pre,
    ) {
        const Q: usize = 4;
        let (c, k) = (self.c, if KS == 0 { self.k } else { KS });
        let mut j = 0;
        while j < c {
            let q = ((c - j) / W).min(Q);
            let mut acc = [V::ZERO; Q];
            for (i, a) in acc.iter_mut().enumerate().take(q) {
                *a = V::load_full(&self.bias[j + i * W..]);
            }
            for kk in kmin..k {
                let xr = &proj_b[(t + kk + 1 - k) * dp + off + j..];
                let wr = &self.wt[kk * c + j..];
                for (i, a) in acc.iter_mut().enumerate().take(q) {
                    *a = V::load_full(&wr[i * W..]).mul_add(V::load_full(&xr[i * W..]), *a);
                }
            }
            for (i, &a) in acc.iter().enumerate().take(q) {
                let sig = simd::sigmoid(a);
                if let Some((pre, sg)) = pre.as_mut() {
                    V::store_full(&mut pre[j + i * W..], a);
                    V::store_full(&mut sg[j + i * W..], sig);
                }
                V::store_full(&mut post[j + i * W..], a * sig);
            }
            j += q * W;
        }
    }
}

/// A sequence start at row `t` (of the batch row's starts `rb`) makes every head's decay 0: the
/// state entering the step is zero.
#[inline(always)]
fn restart_at(rb: Option<&[bool]>, t: usize, steps: &mut [(f32, f32, f32)]) {
    if rb.is_some_and(|r| r[t]) {
        steps.iter_mut().for_each(|s| s.2 = 0.0);
    }
}

/// Δ, ∂Δ/∂Δ_raw and `ā = exp(Δ·A)` of every head at projection row `row`; eight heads at a time
/// in SIMD (`softplus` and `σ` from one `exp`), the rest scalar.
#[inline(always)]
fn head_steps<V: V8>(row: &[f32], odt: usize, p: &MixerParams, out: &mut [(f32, f32, f32)]) {
    let h = out.len();
    let mut hh = 0;
    while hh + W <= h {
        let raw = V::load_full(&row[odt + hh..]) + V::load_full(&p.dt_bias[hh..]);
        let (sp, sig) = simd::softplus_sigmoid(raw);
        let abar = simd::exp(sp * V::load_full(&p.a[hh..]));
        let (sp, sig, abar) = (sp.to_array(), sig.to_array(), abar.to_array());
        for i in 0..W {
            out[hh + i] = (sp[i], sig[i], abar[i]);
        }
        hh += W;
    }
    for (i, o) in out.iter_mut().enumerate().skip(hh) {
        let raw = row[odt + i] + p.dt_bias[i];
        let (dt, dsp) = (raw.softplus(), raw.softplus_grad());
        *o = (dt, dsp, (dt * p.a[i]).exp());
    }
}

/// One head's state step without the output, lanes `j0..j0+M`, also adding `Σ_p h[n][p]·dy[p]`
/// (that is, `dC_t[n]` of this head) into `dcn[n]` from the new state while it is in registers.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn advance_dc<V: V8, const M: usize>(
    st: &mut [V],
    pv: usize,
    j0: usize,
    av: V,
    brow: &[f32],
    dxv: &[V],
    dyy: &[V],
    dcn: &mut [f32],
) {
    let dx: [V; M] = take(dxv, j0);
    let dy: [V; M] = take(dyy, j0);
    for (k, (&bk, o)) in brow.iter().zip(dcn.iter_mut()).enumerate() {
        let bk = V::splat(bk);
        let row: &mut [V; M] = (&mut st[k * pv + j0..k * pv + j0 + M]).try_into().unwrap();
        let mut acc = V::ZERO;
        for i in 0..M {
            let v = row[i].mul_add(av, bk * dx[i]);
            row[i] = v;
            acc = v.mul_add(dy[i], acc);
        }
        *o += acc.reduce_add();
    }
}

/// Time steps per block: a task runs the conv for a block of rows, then each head's scan over
/// the block (its state, `N·P` floats, stays in L1 for `TB` steps), then the norm of the rows.
const TB: usize = 16;

/// How many rows ahead the projection is prefetched (its rows cross a page every row or two,
/// where the hardware prefetcher stops).
const PF: usize = 2;

/// One head's state across the block's rows: `x`, `B`, `C` from the conv rows `xbc` (TB, C),
/// the step scalars from `steps` (TB, H); `Σ_n h·C + D·x` of each row into `y` at `yoff`
/// (rows `ys` apart).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn head_block<V: V8>(
    dims: &MixerDims,
    hh: usize,
    nt: usize,
    xbc: &[f32],
    steps: &[(f32, f32, f32)],
    d: f32,
    st: &mut [V],
    (y, yoff, ys): (&mut [f32], usize, usize),
    sc: &mut [Vec<V>; 3],
) {
    let (pd, n, h, cd, di, gn) =
        (dims.headdim, dims.dstate, dims.nheads, dims.conv_dim(), dims.d_inner(), dims.gn());
    let (pv, g) = (pd / W, hh / (h / dims.ngroups));
    let [xv, dxv, acc] = sc;
    let dv = V::splat(d);
    for i in 0..nt {
        let (dt, _, abar) = steps[i * h + hh];
        let xr = &xbc[i * cd..(i + 1) * cd];
        load_x(&xr[hh * pd..(hh + 1) * pd], dt, xv, dxv);
        let (brow, crow) = (&xr[di + g * n..di + (g + 1) * n], &xr[di + gn + g * n..di + gn + (g + 1) * n]);
        step_state::<V, true>(st, pv, V::splat(abar), brow, crow, dxv, acc);
        let yr = &mut y[yoff + i * ys..];
        for j in 0..pv {
            V::store_full(&mut yr[j * W..], dv.mul_add(xv[j], acc[j]));
        }
    }
}

/// Output buffers of [`mixer_fwd`] (all overwritten).
#[derive(Debug)]
pub struct MixerOut<'a> {
    /// The mixer core's output, (B, L, d_inner).
    pub out: &'a mut [f32],
    /// The gated norm's reciprocal RMS per (row, group), (B, L, G) — needed by [`mixer_bwd`].
    pub rstd: &'a mut [f32],
    /// The scan output before the norm, (B, L, d_inner) — needed by [`mixer_bwd`]; optional.
    pub y: Option<&'a mut [f32]>,
    /// The final SSM state, (B, H, P, N); optional.
    pub h_last: Option<&'a mut [f32]>,
}

/// Forward into `o` (see [`MixerOut`]). One task per batch row on the current rayon pool.
///
/// # Panics
/// If the dims are not [`MixerDims::supported`] or a buffer length disagrees with them (the
/// message names the buffer).
#[track_caller]
pub fn mixer_fwd(dims: &MixerDims, proj: &[f32], p: &MixerParams, o: MixerOut) {
    const K: &str = "mamba2::mixer_fwd";
    let MixerOut { out, rstd, y, h_last } = o;
    dims.check(K);
    p.check(K, dims);
    let MixerDims { batch, seqlen: l, nheads: h, headdim: pd, dstate: n, ngroups: ng, .. } = *dims;
    let (dp, di) = (dims.proj_dim(), dims.d_inner());
    check_len(K, "proj", format_args!("(B, L, {dp})"), proj.len(), batch * l * dp);
    check_len(K, "out", format_args!("(B, L, {di})"), out.len(), batch * l * di);
    check_len(K, "rstd", "(B, L, G)", rstd.len(), batch * l * ng);
    check_opt_len(K, "h_last", "(B, H, P, N)", h_last.as_deref(), batch * h * pd * n);
    check_opt_len(K, "y", format_args!("(B, L, {di})"), y.as_deref(), batch * l * di);
    if batch * l == 0 {
        return;
    }
    let conv = Conv::new(dims, p);
    let mut y_chunks: Vec<Option<&mut [f32]>> = match y {
        Some(y) => y.chunks_mut(l * di).map(Some).collect(),
        None => (0..batch).map(|_| None).collect(),
    };
    let mut hl_chunks: Vec<Option<&mut [f32]>> = match h_last {
        Some(hl) => hl.chunks_mut(h * pd * n).map(Some).collect(),
        None => (0..batch).map(|_| None).collect(),
    };
    out.par_chunks_mut(l * di)
        .zip(rstd.par_chunks_mut(l * ng))
        .zip(hl_chunks.par_iter_mut().zip(y_chunks.par_iter_mut()))
        .enumerate()
        .for_each(|(b, ((ob, rb), (hl, yk)))| fwd_row(dims, proj, p, &conv, b, ob, rb, hl, yk));
}

/// A task's parameter-gradient partials of [`mixer_bwd`], summed in batch order: d conv weight
/// as (K, C), d conv bias (C), d norm weight (d_inner), in one slice of a pooled buffer.
struct Partials<'a> {
    dconv_w: &'a mut [f32],
    dconv_b: &'a mut [f32],
    dnorm_w: &'a mut [f32],
}

/// Backward of [`mixer_fwd`] for upstream `dout` (B, L, d_inner), from the forward's `rstd`
/// and pre-norm `y` (see [`MixerOut`]): gradients into `grads` (see [`MixerGrads`]). Each task
/// keeps its row's scan `dy` (L, d_inner) and `dC` (L, G·N) between the passes; these and the
/// parameter-gradient partials live in two buffers from [`crate::pool`], taken and given back
/// on the calling thread, so a training step reuses them.
///
/// # Panics
/// As [`mixer_fwd`], naming the buffer whose length disagrees.
#[track_caller]
pub fn mixer_bwd(
    dims: &MixerDims,
    proj: &[f32],
    p: &MixerParams,
    (rstd, y): (&[f32], &[f32]),
    dout: &[f32],
    grads: MixerGrads,
) {
    const K: &str = "mamba2::mixer_bwd";
    dims.check(K);
    p.check(K, dims);
    let MixerDims { batch, seqlen: l, nheads: h, ngroups: ng, width: k, .. } = *dims;
    let (dp, di, gn, cd) = (dims.proj_dim(), dims.d_inner(), dims.gn(), dims.conv_dim());
    check_len(K, "proj", format_args!("(B, L, {dp})"), proj.len(), batch * l * dp);
    check_len(K, "rstd", "(B, L, G)", rstd.len(), batch * l * ng);
    check_len(K, "y", format_args!("(B, L, {di})"), y.len(), batch * l * di);
    check_len(K, "dout", format_args!("(B, L, {di})"), dout.len(), batch * l * di);
    let MixerGrads { dproj, overwrite_dproj: ow, dconv_w, dconv_b, ddt_bias, da, dd, dnorm_w } = grads;
    check_len(K, "dproj", format_args!("(B, L, {dp})"), dproj.len(), batch * l * dp);
    check_len(K, "dconv_w", "(C, K)", dconv_w.len(), cd * k);
    check_opt_len(K, "dconv_b", "(C)", dconv_b.as_deref(), cd);
    for (name, v) in [("ddt_bias", &*ddt_bias), ("da", &*da), ("dd", &*dd)] {
        check_len(K, name, "(H)", v.len(), h);
    }
    check_len(K, "dnorm_w", "(d_inner)", dnorm_w.len(), di);
    if batch * l == 0 {
        return;
    }
    let conv = Conv::new(dims, p);

    // Per task: the partials (zeroed), and pass 1's dy, dC and B·C rows (written before read).
    let (plen, wlen) = (k * cd + cd + di, l * (di + gn + ng));
    let mut parts = pool::take(batch * plen);
    let mut work = pool::take_for_overwrite(batch * wlen);
    let heads: Vec<Vec<[f64; 3]>> = dproj
        .par_chunks_mut(l * dp)
        .zip(parts.par_chunks_mut(plen).zip(work.par_chunks_mut(wlen)))
        .enumerate()
        .map(|(b, (dpb, (pb, wb)))| bwd_row(dims, proj, p, &conv, (rstd, y, dout, ow), b, dpb, pb, wb))
        .collect();
    // Sum the partials in batch order (deterministic for any thread count).
    let mut dconv_b = dconv_b;
    for pb in parts.chunks_exact(plen) {
        let (pw, rest) = pb.split_at(k * cd);
        let (pbias, pnorm) = rest.split_at(cd);
        for ch in 0..cd {
            for kk in 0..k {
                dconv_w[ch * k + kk] += pw[kk * cd + ch];
            }
        }
        for (o, v) in dnorm_w.iter_mut().zip(pnorm) {
            *o += v;
        }
        if let Some(db) = dconv_b.as_deref_mut() {
            for (o, v) in db.iter_mut().zip(pbias) {
                *o += v;
            }
        }
    }
    pool::give(parts);
    pool::give(work);
    for hh in 0..h {
        let sum = |i: usize| heads.iter().map(|q| q[hh][i]).sum::<f64>();
        da[hh] += sum(0) as f32;
        dd[hh] += sum(1) as f32;
        ddt_bias[hh] += sum(2) as f32;
    }
}

crate::simd_fn! {
    fn fwd_row[V: f8](
        dims: &MixerDims,
        proj: &[f32],
        p: &MixerParams,
        conv: &Conv,
        b: usize,
        ob: &mut [f32],
        rb: &mut [f32],
        hl: &mut Option<&mut [f32]>,
        yk: &mut Option<&mut [f32]>,
    ) {
        let MixerDims { seqlen: l, nheads: h, headdim: pd, dstate: n, ngroups: ng, .. } = *dims;
        let (dp, di, gn, cd) = (dims.proj_dim(), dims.d_inner(), dims.gn(), dims.conv_dim());
        let (pv, sz, gs) = (pd / W, n * pd / W, di / ng);
        let (ox, odt) = (di, 2 * di + 2 * gn);
        let proj_b = &proj[b * l * dp..(b + 1) * l * dp];
        let starts = p.resets.map(|r| &r[b * l..(b + 1) * l]);
        let mut st = vec![V::ZERO; h * sz];
        let mut xbc = F32Buf::zeroed(TB * cd);
        let mut steps = vec![(0.0f32, 0.0f32, 0.0f32); TB * h];
        let mut sc = [vec![V::ZERO; pv], vec![V::ZERO; pv], vec![V::ZERO; pv]];
        let mut v = vec![V::ZERO; di / W];
        for t0 in (0..l).step_by(TB) {
            let nt = TB.min(l - t0);
            for i in 0..nt {
                let t = t0 + i;
                simd::prefetch_range_l2(proj_b, (t + PF) * dp, dp);
                let kmin = first_tap(conv.k, t, starts);
                conv.row::<V>(proj_b, (dp, ox), (t, kmin), &mut xbc[i * cd..(i + 1) * cd], None);
            }
            for i in 0..nt {
                let hs = &mut steps[i * h..(i + 1) * h];
                head_steps::<V>(&proj_b[(t0 + i) * dp..], odt, p, hs);
                restart_at(starts, t0 + i, hs);
            }
            // The scan output goes where the backward keeps it, if it does, else into `out`.
            for hh in 0..h {
                let sth = &mut st[hh * sz..(hh + 1) * sz];
                let dst: &mut [f32] = match yk.as_deref_mut() {
                    Some(yk) => yk,
                    None => &mut *ob,
                };
                let y = (dst, t0 * di + hh * pd, di);
                head_block(dims, hh, nt, &xbc, &steps, p.d[hh], sth, y, &mut sc);
            }
            // Gated norm of the rows into `out`: v = y · silu(z), then v · r · w per group.
            for t in t0..t0 + nt {
                let row = &proj_b[t * dp..(t + 1) * dp];
                let ysrc: &[f32] = yk.as_deref().unwrap_or(ob);
                let ysrc = &ysrc[t * di..(t + 1) * di];
                for j in 0..di / W {
                    v[j] = V::load_full(&ysrc[j * W..]) * simd::silu(V::load_full(&row[j * W..]));
                }
                let yrow = &mut ob[t * di..(t + 1) * di];
                for g in 0..ng {
                    let vg = &v[g * gs / W..(g + 1) * gs / W];
                    let mut ss = V::ZERO;
                        for &x in vg {
                            ss = x.mul_add(x, ss);
                        }
                        let ss = ss.reduce_add();
                    let r = 1.0 / (ss / gs as f32 + p.eps).sqrt();
                    rb[t * ng + g] = r;
                    let rv = V::splat(r);
                    for (j, &x) in vg.iter().enumerate() {
                        let c = g * gs + j * W;
                        V::store_full(&mut yrow[c..], x * rv * V::load_full(&p.norm_w[c..]));
                    }
                }
            }
        }
        if let Some(hl) = hl.as_deref_mut() {
            for hh in 0..h {
                state_out(
                    &st[hh * sz..(hh + 1) * sz],
                    pd,
                    n,
                    pv,
                    &mut hl[hh * pd * n..(hh + 1) * pd * n],
                    false,
                );
            }
        }
    }
}

crate::simd_fn! {
    fn bwd_row[V: f8](
        dims: &MixerDims,
        proj: &[f32],
        p: &MixerParams,
        conv: &Conv,
        saved: (&[f32], &[f32], &[f32], bool),
        b: usize,
        dpb: &mut [f32],
        pb: &mut [f32],
        wb: &mut [f32],
    ) -> Vec<[f64; 3]> {
        let MixerDims { seqlen: l, nheads: h, headdim: pd, dstate: n, ngroups: ng, width: k, .. } = *dims;
        let (dp, di, gn, cd) = (dims.proj_dim(), dims.d_inner(), dims.gn(), dims.conv_dim());
        let (pv, sz, hpg, gs) = (pd / W, n * pd / W, h / ng, di / ng);
        let (ox, odt) = (di, 2 * di + 2 * gn);
        let (rstd, y, dout, ow) = saved;
        let proj_b = &proj[b * l * dp..(b + 1) * l * dp];
        let starts = p.resets.map(|r| &r[b * l..(b + 1) * l]);
        let dout_b = &dout[b * l * di..(b + 1) * l * di];
        let y_b = &y[b * l * di..(b + 1) * l * di];
        let (dconv_w, rest) = pb.split_at_mut(k * cd);
        let (dconv_b, dnorm_w) = rest.split_at_mut(cd);
        let part = Partials { dconv_w, dconv_b, dnorm_w };
        // Per head: dA, dD, dΔ-bias.
        let mut heads = vec![[0.0f64; 3]; h];
        // Kept from pass 1 for pass 2: dy of the scan (L, d_inner), dC (L, G·N), B·C per
        // (t, group) and per (t, head) the step scalars and α.
        let (dyb, rest) = wb.split_at_mut(l * di);
        let (dcb, bdc) = rest.split_at_mut(l * gn);
        let mut steps = vec![(0.0f32, 0.0f32, 0.0f32); l * h];
        let mut alpha = vec![0.0f64; l * h];
        let mut st = vec![V::ZERO; h * sz];
        let mut xbc = F32Buf::zeroed(TB * cd);
        let mut sc = [vec![V::ZERO; pv], vec![V::ZERO; pv], vec![V::ZERO; pv]];
        let (mut vv, mut sil, mut gz) =
            (vec![V::ZERO; di / W], vec![V::ZERO; di / W], vec![V::ZERO; di / W]);
        let mut dyy = vec![V::ZERO; pv];
        // Pass 1: forward in time, a block of TB rows at a time.
        for t0 in (0..l).step_by(TB) {
            let nt = TB.min(l - t0);
            for i in 0..nt {
                let t = t0 + i;
                simd::prefetch_range_l2(proj_b, (t + PF) * dp, dp);
                simd::prefetch_range_l2(dout_b, (t + TB) * di, di);
                let xr = &mut xbc[i * cd..(i + 1) * cd];
                conv.row::<V>(proj_b, (dp, ox), (t, first_tap(k, t, starts)), xr, None);
                let hs = &mut steps[t * h..(t + 1) * h];
                head_steps::<V>(&proj_b[t * dp..], odt, p, hs);
                restart_at(starts, t, hs);
                for g in 0..ng {
                    let (bo, co) = (di + g * n, di + gn + g * n);
                    bdc[t * ng + g] = dot_with::<V>(&xr[bo..bo + n], &xr[co..co + n]);
                }
            }
            // Norm backward of the rows: v = y·s with s = silu(z); per group
            // dv = r·(dout⊙w) − (r³/gs)·v·Σ(dout⊙w⊙v); dy = dv·s; dz = dv·y·silu'(z).
            for i in 0..nt {
                let t = t0 + i;
                let (row, yrow) = (&proj_b[t * dp..(t + 1) * dp], &y_b[t * di..(t + 1) * di]);
                let drow = &dout_b[t * di..(t + 1) * di];
                for j in 0..di / W {
                    let z = V::load_full(&row[j * W..]);
                    let sg = simd::sigmoid(z);
                    let s = z * sg;
                    sil[j] = s;
                    gz[j] = sg * (V::ONE + z * (V::ONE - sg));
                    vv[j] = V::load_full(&yrow[j * W..]) * s;
                }
                let dyrow = &mut dyb[t * di..(t + 1) * di];
                for g in 0..ng {
                    let r = rstd[(b * l + t) * ng + g];
                    let (rv, c0) = (V::splat(r), g * gs);
                    let mut dot = V::ZERO;
                    for j in c0 / W..(c0 + gs) / W {
                        let gw = V::load_full(&drow[j * W..]) * V::load_full(&p.norm_w[j * W..]);
                        dot = gw.mul_add(vv[j], dot);
                    }
                    let kk = V::splat(r * r * r / gs as f32 * dot.reduce_add());
                    for j in c0 / W..(c0 + gs) / W {
                        let d = V::load_full(&drow[j * W..]);
                        let dvj = rv * d * V::load_full(&p.norm_w[j * W..]) - kk * vv[j];
                        V::add_store_full(&mut part.dnorm_w[j * W..], d * vv[j] * rv);
                        V::store_full(&mut dyrow[j * W..], dvj * sil[j]);
                        let dz = dvj * V::load_full(&yrow[j * W..]) * gz[j];
                        let o = &mut dpb[t * dp + j * W..];
                        if ow { V::store_full(o, dz) } else { V::add_store_full(o, dz) }
                    }
                }
                dcb[t * gn..(t + 1) * gn].fill(0.0);
            }
            // Per head, the block again from its state at t0: dC_t = h_t·dy_t and α_t.
            for hh in 0..h {
                let g = hh / hpg;
                let sth = &mut st[hh * sz..(hh + 1) * sz];
                let dv = V::splat(p.d[hh]);
                for i in 0..nt {
                    let t = t0 + i;
                    let (dt, _, abar) = steps[t * h + hh];
                    let xr = &xbc[i * cd..(i + 1) * cd];
                    let [xv, dxv, _] = &mut sc;
                    load_x(&xr[hh * pd..(hh + 1) * pd], dt, xv, dxv);
                    let brow = &xr[di + g * n..di + (g + 1) * n];
                    let yr = &y_b[t * di + hh * pd..];
                    let dyr = &dyb[t * di + hh * pd..];
                    let (mut ydy, mut xdy) = (V::ZERO, V::ZERO);
                    for j in 0..pv {
                        let d = V::load_full(&dyr[j * W..]);
                        dyy[j] = d;
                        xdy = d.mul_add(xv[j], xdy);
                        // Σ_p (C·h)_p dy_p, with C·h = y − D·x.
                        ydy = (V::load_full(&yr[j * W..]) - dv * xv[j]).mul_add(d, ydy);
                    }
                    let dcg = &mut dcb[t * gn + g * n..t * gn + (g + 1) * n];
                    let av = V::splat(abar);
                    blocks!(pv, |j0, M| advance_dc::<V, M>(sth, pv, j0, av, brow, dxv, &dyy, dcg));
                    let bcd = bdc[t * ng + g];
                    alpha[t * h + hh] = ydy.reduce_add() as f64 - (dt * bcd * xdy.reduce_add()) as f64;
                }
            }
        }
        // Pass 2: backward in time. `gsv` holds ā_{t+1}·G_{t+1} per head; `ring` the conv's
        // pre-activation gradients of rows t..t+K−1 (row r in slot r % K).
        let mut gsv = vec![V::ZERO; h * sz];
        let mut m = vec![0.0f64; h];
        // Block rows and the (K, C) ring come from this worker's pool: the ring is the conv
        // weight's size, and this runs every step.
        let mut pre = F32Buf::zeroed(TB * cd);
        let mut sgm = F32Buf::zeroed(TB * cd);
        let mut dxbc = F32Buf::zeroed(TB * cd);
        let mut ring = F32Buf::zeroed(k * cd);
        let mut sn = vec![0.0f32; n];
        let nblk = l.div_ceil(TB);
        for blk in (0..nblk).rev() {
            let (t0, nt) = (blk * TB, TB.min(l - blk * TB));
            for i in 0..nt {
                let t = t0 + i;
                if let Some(tp) = t0.checked_sub(TB - i) {
                    simd::prefetch_range_l2(proj_b, tp * dp, dp);
                }
                let (xr, pr) = (&mut xbc[i * cd..(i + 1) * cd], &mut pre[i * cd..(i + 1) * cd]);
                let pre = Some((pr, &mut sgm[i * cd..(i + 1) * cd]));
                conv.row::<V>(proj_b, (dp, ox), (t, first_tap(k, t, starts)), xr, pre);
                let dr = &mut dxbc[i * cd..(i + 1) * cd];
                dr[di..di + gn].fill(0.0);
                dr[di + gn..].copy_from_slice(&dcb[t * gn..(t + 1) * gn]);
            }
            for hh in 0..h {
                let g = hh / hpg;
                let gh = &mut gsv[hh * sz..(hh + 1) * sz];
                let (dv, e) = (V::splat(p.d[hh]), &mut heads[hh]);
                for i in (0..nt).rev() {
                    let t = t0 + i;
                    let (dt, dsp, abar) = steps[t * h + hh];
                    let xr = &xbc[i * cd..(i + 1) * cd];
                    let [xv, dxv, acc] = &mut sc;
                    load_x(&xr[hh * pd..(hh + 1) * pd], dt, xv, dxv);
                    let dyr = &dyb[t * di + hh * pd..];
                    let mut xdy = V::ZERO;
                    for j in 0..pv {
                        dyy[j] = V::load_full(&dyr[j * W..]);
                        xdy = dyy[j].mul_add(xv[j], xdy);
                    }
                    let xdy = xdy.reduce_add();
                    let brow = &xr[di + g * n..di + (g + 1) * n];
                    let crow = &xr[di + gn + g * n..di + gn + (g + 1) * n];
                    let av = V::splat(abar);
                    sn.fill(0.0);
                    blocks!(pv, |j0, M| adjoint_block::<V, M>(gh, pv, j0, av, brow, crow, &dyy, xv, acc, &mut sn));
                    let dr = &mut dxbc[i * cd..(i + 1) * cd];
                    for (o, &v) in dr[di + g * n..di + (g + 1) * n].iter_mut().zip(&sn) {
                        *o += dt * v;
                    }
                    let (sbs, bcd) = (dot_with::<V>(brow, &sn), bdc[t * ng + g]);
                    let beta = (dt * sbs) as f64 - (dt * bcd * xdy) as f64;
                    m[hh] += alpha[t * h + hh] - beta;
                    if starts.is_some_and(|r| r[t]) {
                        // Nothing before a start reaches it: M(t) is exactly 0.
                        m[hh] = 0.0;
                    }
                    let draw = (p.a[hh] as f64 * m[hh] + sbs as f64) as f32 * dsp;
                    e[0] += dt as f64 * m[hh];
                    e[1] += xdy as f64;
                    e[2] += draw as f64;
                    let o = &mut dpb[t * dp + odt + hh];
                    *o = if ow { draw } else { *o + draw };
                    let dtv = V::splat(dt);
                    for j in 0..pv {
                        V::store_full(&mut dr[hh * pd + j * W..], dv.mul_add(dyy[j], dtv * acc[j]));
                    }
                }
            }
            // Conv backward of the block's rows, last first, one channel vector at a time so
            // its d weight / d bias sums stay in registers across the block.
            for j in (0..cd).step_by(W) {
                let mut dw = [V::ZERO; MAX_K];
                let mut db = V::ZERO;
                let mut wj = [V::ZERO; MAX_K];
                for (kk, w) in wj.iter_mut().enumerate().take(k) {
                    *w = V::load_full(&conv.wt[kk * cd + j..]);
                }
                for i in (0..nt).rev() {
                    let t = t0 + i;
                    let (a, sg) =
                        (V::load_full(&pre[i * cd + j..]), V::load_full(&sgm[i * cd + j..]));
                    // silu'(a) = σ(a)·(1 + a·(1 − σ(a))).
                    let gpre = V::load_full(&dxbc[i * cd + j..])
                        * sg
                        * a.mul_add(V::ONE - sg, V::ONE);
                    V::store_full(&mut ring[(t % k) * cd + j..], gpre);
                    db += gpre;
                    for kk in first_tap(k, t, starts)..k {
                        let xin = V::load_full(&proj_b[(t + kk + 1 - k) * dp + ox + j..]);
                        dw[kk] = gpre.mul_add(xin, dw[kk]);
                    }
                    // d x_in[t] = Σ_kk g[t + K − 1 − kk] · w[kk], rows past the end zero and
                    // rows from the next sequence start on not reading x_in[t].
                    let mut dxin = V::ZERO;
                    let kk0 = first_reader_tap(k, l, t, starts);
                    for (kk, &w) in wj.iter().enumerate().take(k).skip(kk0) {
                        let r = t + k - 1 - kk;
                        if r < l {
                            dxin = V::load_full(&ring[(r % k) * cd + j..]).mul_add(w, dxin);
                        }
                    }
                    let o = &mut dpb[t * dp + ox + j..];
                    if ow { V::store_full(o, dxin) } else { V::add_store_full(o, dxin) }
                }
                V::add_store_full(&mut part.dconv_b[j..], db);
                for (kk, &v) in dw.iter().enumerate().take(k) {
                    V::add_store_full(&mut part.dconv_w[kk * cd + j..], v);
                }
            }
        }
        heads
    }
}
