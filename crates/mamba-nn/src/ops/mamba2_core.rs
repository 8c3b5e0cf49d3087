//! The core of the Mamba-2 mixer — everything between `in_proj` and `out_proj` — as one tape
//! node: split of the fused projection, causal conv + SiLU on `xBC`, the selective scan and the
//! gated RMSNorm.
//!
//! Built from the separate ops (`narrow_last`, `conv1d`, `reshape`, `selective_scan2`,
//! `gated_rms_norm`) the same computation makes eleven nodes, copies every slice of the
//! projection out and back, and zero-fills a gradient buffer per node. Here the gate `z` is read
//! in place, the conv runs straight on the `x`, `B` and `C` column blocks (gathered once) so its
//! outputs are the scan's inputs, and the backward writes each column block of the projection's
//! gradient exactly once. The math is unchanged; the test checks it against finite differences
//! and against the composition of the separate ops.

use ssm_kernel::cols::{Cols, ColsMut, gather, scatter};
use ssm_kernel::conv::{
    ConvArgs, ConvDims, ConvGrads, ConvOut, conv_state, conv_state_from, conv1d_bwd, conv1d_bwd_from,
    conv1d_fwd, conv1d_fwd_from,
};
use ssm_kernel::mamba2::{
    self, MixerDims, MixerGrads, MixerOut, MixerParams, Scan2Args, Scan2Dims, Scan2Grads, Scan2Out,
    mixer_bwd, mixer_fwd,
};

use ssm_kernel::norm::{NormArgs, NormDims, NormGrads, norm_bwd, norm_fwd};
use ssm_kernel::pool::{self, F32Buf};

use super::{Resets, check_resets};
use crate::ops::scan::{finish_da, neg_exp};
use crate::tape::{Backward, InputGrad, InputList, Slot, Tape, Var, grad_or_scratch};
use crate::tensor::{Tensor, data, data_mut, for_overwrite, from_vec};

/// Sizes of the Mamba-2 core: `H` heads of `P` channels (`d_inner = H·P`), `G` groups of `B`/`C`
/// of `N` states each, the gated norm's `eps` (its groups are the `G` groups of `d_inner`), and
/// the chunk length of the chunked (SSD) scan (the config's `chunk_size`; used when the separate
/// kernels run and [`ssm_kernel::mamba2::use_ssd`] picks SSD).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mamba2Spec {
    /// `H`.
    pub nheads: usize,
    /// `P` (`headdim`).
    pub headdim: usize,
    /// `G` (`n_groups`).
    pub ngroups: usize,
    /// `N` (`d_state`).
    pub dstate: usize,
    /// The gated RMSNorm's epsilon.
    pub eps: f32,
    /// Steps per SSD chunk (at least 1; [`ssm_kernel::mamba2::AUTO_CHUNK`] is the default).
    pub chunk_size: usize,
}

impl Mamba2Spec {
    fn d_inner(&self) -> usize {
        self.nheads * self.headdim
    }

    fn gn(&self) -> usize {
        self.ngroups * self.dstate
    }

    /// Channels of the conv: `x | B | C`.
    fn conv_dim(&self) -> usize {
        self.d_inner() + 2 * self.gn()
    }

    /// Width of the fused projection: `z | x | B | C | dt`.
    pub fn proj_dim(&self) -> usize {
        2 * self.d_inner() + 2 * self.gn() + self.nheads
    }

    /// Column offsets of `x`, `B`, `C` and `dt` in the projection (`z` starts at 0).
    fn offsets(&self) -> [usize; 4] {
        let (di, gn) = (self.d_inner(), self.gn());
        [di, 2 * di, 2 * di + gn, 2 * di + 2 * gn]
    }

    /// Widths of `x`, `B`, `C` and `dt`.
    fn widths(&self) -> [usize; 4] {
        [self.d_inner(), self.gn(), self.gn(), self.nheads]
    }
}

/// The core's parameters, as HF names them (`conv1d.weight`, …): the required ones in
/// [`Mamba2Params::new`], the optional conv bias by [`Mamba2Params::with_conv_b`], and the
/// batch's document starts by [`Mamba2Params::with_resets`].
#[derive(Clone, Debug)]
pub struct Mamba2Params {
    /// `conv1d.weight`, (C, 1, K) or (C, K) with `C = d_inner + 2·G·N`.
    pub conv_w: Var,
    /// `conv1d.bias`, (C).
    pub conv_b: Option<Var>,
    /// `dt_bias`, (H).
    pub dt_bias: Var,
    /// `A_log`, (H).
    pub a_log: Var,
    /// `D`, (H).
    pub d: Var,
    /// `norm.weight`, (d_inner).
    pub norm_w: Var,
    /// Document starts, (B, L) (see [`Resets`]): conv and scan restart from zero at each.
    pub resets: Option<Resets>,
    /// The conv state (B, C, K) the sequence continues from, differentiable; zero when `None`.
    pub conv0: Option<Var>,
    /// The SSM state (B, H, P, N) the sequence continues from, differentiable; zero when `None`.
    pub h0: Option<Var>,
}

impl Mamba2Params {
    /// The required parameters; no conv bias.
    pub fn new(conv_w: Var, dt_bias: Var, a_log: Var, d: Var, norm_w: Var) -> Self {
        Self { conv_w, conv_b: None, dt_bias, a_log, d, norm_w, resets: None, conv0: None, h0: None }
    }

    /// With the conv bias `conv1d.bias` (C).
    pub fn with_conv_b(self, conv_b: Var) -> Self {
        Self { conv_b: Some(conv_b), ..self }
    }

    /// With document starts (B, L).
    pub fn with_resets(self, resets: Option<Resets>) -> Self {
        Self { resets, ..self }
    }

    /// Continuing from the conv state `conv0` (B, C, K) and the SSM state `h0` (B, H, P, N)
    /// (the separate kernels run then: the fused one starts from zero).
    pub fn with_init(self, conv0: Var, h0: Var) -> Self {
        Self { conv0: Some(conv0), h0: Some(h0), ..self }
    }
}

/// The recurrent state a prefill leaves: the conv state (B, C, K) — the last `K` conv inputs of
/// every channel, oldest first — and the SSM state (B, H, P, N).
#[derive(Clone, Debug)]
pub struct Mamba2State {
    /// (B, C, K).
    pub conv: Vec<f32>,
    /// (B, H, P, N).
    pub ssm: Tensor,
}

/// The Mamba-2 mixer between its projections. `proj` (B, L, 2·d_inner + 2·G·N + H) is
/// `in_proj`'s output, split along the last dimension as `z | x | B | C | dt`; then
///
/// ```text
/// x, B, C = silu(conv1d(x | B | C))            causal depthwise, width K
/// y       = selective_scan2(x, dt, A_log, B, C, D, dt_bias, softplus)
/// out     = gated_rms_norm(y, z, norm.weight)  groups of d_inner / G channels
/// ```
///
/// as in transformers' `Mamba2Mixer.torch_forward`. Output (B, L, d_inner).
///
/// # Panics
/// If the shapes disagree with `spec` (the message names the tensor and both shapes).
#[track_caller]
pub fn mamba2_core(tape: &mut Tape, proj: Var, p: Mamba2Params, spec: Mamba2Spec) -> Var {
    core(tape, proj, p, spec, false, Path::Auto).0
}

/// [`mamba2_core`], also returning the recurrent state after the sequence (no gradient flows
/// through it).
#[track_caller]
pub fn mamba2_core_with_state(
    tape: &mut Tape,
    proj: Var,
    p: Mamba2Params,
    spec: Mamba2Spec,
) -> (Var, Mamba2State) {
    let (y, st) = core(tape, proj, p, spec, true, Path::Auto);
    (y, st.expect("the state was requested"))
}

/// The three conv channel blocks: (first channel, count) of `x`, `B` and `C`.
fn conv_blocks(spec: &Mamba2Spec) -> [(usize, usize); 3] {
    let (di, gn) = (spec.d_inner(), spec.gn());
    [(0, di), (di, gn), (di + gn, gn)]
}

#[track_caller]
fn core(
    tape: &mut Tape,
    proj: Var,
    prm: Mamba2Params,
    spec: Mamba2Spec,
    want_state: bool,
    path: Path,
) -> (Var, Option<Mamba2State>) {
    const OP: &str = "mamba2_core";
    let pv = tape.value(proj);
    let (dp, di, cd, h) = (spec.proj_dim(), spec.d_inner(), spec.conv_dim(), spec.nheads);
    let (bsz, l) = match *pv.shape() {
        [b, l, d] if d == dp => (b, l),
        _ => panic!(
            "{OP}: proj must be (B, L, {dp}) = (B, L, 2·d_inner + 2·G·N + H) for {spec:?}, got {:?}",
            pv.shape()
        ),
    };
    assert!(
        spec.ngroups >= 1 && h.is_multiple_of(spec.ngroups),
        "{OP}: ngroups {} must divide nheads {h}",
        spec.ngroups
    );
    assert!(spec.chunk_size >= 1, "{OP}: chunk_size must be at least 1");
    let cwv = tape.value(prm.conv_w);
    let k = match *cwv.shape() {
        [c, 1, k] | [c, k] if c == cd => k,
        _ => panic!("{OP}: conv1d.weight must be ({cd}, 1, K) or ({cd}, K), got {:?}", cwv.shape()),
    };
    let expect = |name: &str, v: Var, want: usize| {
        let s = tape.value(v).shape();
        assert_eq!(s, &[want], "{OP}: {name} must be ({want}), got {s:?}");
    };
    if let Some(b) = prm.conv_b {
        expect("conv1d.bias", b, cd);
    }
    expect("dt_bias", prm.dt_bias, h);
    expect("A_log", prm.a_log, h);
    expect("D", prm.d, h);
    expect("norm.weight", prm.norm_w, di);
    check_resets(OP, prm.resets.as_ref(), bsz, l);
    let resets = prm.resets.as_deref();
    let (hd, n) = (spec.headdim, spec.dstate);
    for (name, v, want) in [("conv0", prm.conv0, vec![bsz, cd, k]), ("h0", prm.h0, vec![bsz, h, hd, n])] {
        if let Some(v) = v {
            let s = tape.value(v).shape();
            assert_eq!(s, &want[..], "{OP}: {name} must be {want:?}, got {s:?}");
        }
    }
    let has_init = prm.conv0.is_some() || prm.h0.is_some();

    let pd = data(pv);
    let (cw, cb) = (data(cwv), prm.conv_b.map(|b| data(tape.value(b))));
    let a = neg_exp(data(tape.value(prm.a_log)));
    let w = Weights {
        cw,
        cb,
        dt_bias: data(tape.value(prm.dt_bias)),
        a: &a,
        d: data(tape.value(prm.d)),
        norm_w: data(tape.value(prm.norm_w)),
        conv0: prm.conv0.map(|v| data(tape.value(v))),
        h0: prm.h0.map(|v| data(tape.value(v))),
    };
    let mdims = MixerDims {
        batch: bsz,
        seqlen: l,
        nheads: h,
        headdim: spec.headdim,
        dstate: spec.dstate,
        ngroups: spec.ngroups,
        width: k,
    };
    let fused = match path {
        Path::Auto => mdims.use_fused() && !has_init,
        Path::Split => false,
        Path::Fused => {
            assert!(!has_init, "{OP}: the fused kernel takes no initial state");
            true
        }
    };
    let mut out = for_overwrite(&[bsz, l, di]);
    let mut h_last = want_state.then(|| vec![0.0f32; bsz * h * spec.headdim * spec.dstate]);
    let saved = if fused {
        let mut rstd = pool::take_for_overwrite(bsz * l * spec.ngroups);
        // The pre-norm output is kept only for a backward (not on an inference tape).
        let keep = tape.is_recording();
        let mut y = if keep { pool::take_for_overwrite(bsz * l * di) } else { Vec::new() };
        let o = MixerOut {
            out: data_mut(&mut out),
            rstd: &mut rstd,
            y: keep.then_some(&mut y[..]),
            h_last: h_last.as_deref_mut(),
        };
        mixer_fwd(&mdims, pd, &w.mixer(spec.eps, resets), o);
        Saved::Fused { dims: mdims, rstd, y, resets: prm.resets.clone() }
    } else {
        let resets = prm.resets.clone();
        split_forward(spec, (bsz, l, k), pd, &w, resets, data_mut(&mut out), h_last.as_deref_mut())
    };
    let state = want_state.then(|| Mamba2State {
        conv: {
            let mut st = vec![0.0f32; bsz * cd * k];
            let cdims = ConvDims::new(bsz, l, cd, k);
            match w.conv0 {
                Some(s0) => conv_state_from(&cdims, pd, (dp, spec.offsets()[0]), resets, s0, &mut st),
                None => conv_state(&cdims, pd, (dp, spec.offsets()[0]), resets, &mut st),
            }
            st
        },
        ssm: from_vec(&[bsz, h, spec.headdim, spec.dstate], h_last.unwrap_or_default()),
    });
    pool::give(a);
    let mut inputs = InputList::new();
    let at = CoreInputs {
        proj: inputs.push(proj),
        conv_w: inputs.push(prm.conv_w),
        dt_bias: inputs.push(prm.dt_bias),
        a_log: inputs.push(prm.a_log),
        d: inputs.push(prm.d),
        norm_w: inputs.push(prm.norm_w),
        conv_b: inputs.push_opt(prm.conv_b),
        conv0: inputs.push_opt(prm.conv0),
        h0: inputs.push_opt(prm.h0),
    };
    (tape.push(out, inputs.vars(), Mamba2CoreBackward { at, spec, k, rows: bsz * l, saved }), state)
}

/// Where the core's inputs sit in its input list.
#[derive(Clone, Copy, Debug)]
struct CoreInputs {
    proj: Slot,
    conv_w: Slot,
    dt_bias: Slot,
    a_log: Slot,
    d: Slot,
    norm_w: Slot,
    conv_b: Option<Slot>,
    conv0: Option<Slot>,
    h0: Option<Slot>,
}

/// Which kernels run the core: by [`MixerDims::use_fused`] (the fused per-batch-row kernel when
/// the dims allow it and there are at least as many batch rows as threads), or one of the two
/// forced (tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Auto,
    #[cfg_attr(not(test), allow(dead_code))]
    Split,
    #[cfg_attr(not(test), allow(dead_code))]
    Fused,
}

/// The parameter values, with `A = −exp(A_log)`.
struct Weights<'a> {
    cw: &'a [f32],
    cb: Option<&'a [f32]>,
    dt_bias: &'a [f32],
    a: &'a [f32],
    d: &'a [f32],
    norm_w: &'a [f32],
    /// The initial conv state (B, C, K) and SSM state (B, H, P, N), when given.
    conv0: Option<&'a [f32]>,
    h0: Option<&'a [f32]>,
}

impl<'a> Weights<'a> {
    /// The conv (with SiLU) of channels `c0..c0 + nc` over `x` ((B, L, nc) rows), width `k`.
    /// `resets` (B, L) as in [`ConvArgs`].
    fn conv_block<'x>(
        &self,
        x: &'x [f32],
        (c0, nc, k): (usize, usize, usize),
        resets: Option<&'x [bool]>,
    ) -> ConvArgs<'x, f32>
    where
        'a: 'x,
    {
        ConvArgs {
            x,
            weight: &self.cw[c0 * k..(c0 + nc) * k],
            bias: self.cb.map(|b| &b[c0..c0 + nc]),
            silu: true,
            resets,
        }
    }

    /// The fused kernel's parameters, with the batch's starts `resets` (B, L).
    fn mixer<'r>(&'r self, eps: f32, resets: Option<&'r [bool]>) -> MixerParams<'r> {
        MixerParams {
            conv_w: self.cw,
            conv_b: self.cb,
            dt_bias: self.dt_bias,
            a: self.a,
            d: self.d,
            norm_w: self.norm_w,
            eps,
            resets,
        }
    }
}

/// Channels `c0..c0 + nc` of a conv state (B, C, K), as the column block `c0·K .. (c0 + nc)·K`
/// of its (B, C·K) rows.
fn state_cols(s: &[f32], (c, k): (usize, usize), c0: usize) -> Cols<'_> {
    Cols { data: s, stride: c * k, offset: c0 * k }
}

/// The forward on the separate kernels: gather `x | B | C` and `dt`, conv per block, scan,
/// gated norm into `out`. Returns what their backward needs.
fn split_forward(
    spec: Mamba2Spec,
    (bsz, l, k): (usize, usize, usize),
    pd: &[f32],
    w: &Weights,
    resets: Option<Resets>,
    out: &mut [f32],
    h_last: Option<&mut [f32]>,
) -> Saved {
    let (dp, di, h, rows) = (spec.proj_dim(), spec.d_inner(), spec.nheads, bsz * l);
    let [ox, _, _, odt] = spec.offsets();
    let [wx, wb, wc, wdt] = spec.widths();
    // x | B | C before the conv, and dt, as dense buffers.
    let cols = |offset: usize| Cols { data: pd, stride: dp, offset };
    let conv_in =
        [gather(cols(ox), wx, rows), gather(cols(ox + wx), wb, rows), gather(cols(ox + wx + wb), wc, rows)];
    let dt = gather(cols(odt), wdt, rows);
    let conv_out: [Vec<f32>; 3] = std::array::from_fn(|i| {
        let (c0, nc) = conv_blocks(&spec)[i];
        let dims = ConvDims::new(bsz, l, nc, k);
        let args = w.conv_block(&conv_in[i], (c0, nc, k), resets.as_deref());
        let mut y = pool::take_for_overwrite(rows * nc);
        let out = ConvOut { y: &mut y, state_out: None };
        match w.conv0 {
            Some(s0) => {
                let st = gather(state_cols(s0, (spec.conv_dim(), k), c0), nc * k, bsz);
                conv1d_fwd_from(&dims, &args, &st, out);
                pool::give(st);
            }
            None => conv1d_fwd(&dims, &args, out),
        }
        y
    });
    let dims = Scan2Dims::new(bsz, l, h, spec.headdim, spec.dstate).with_groups(spec.ngroups);
    let args = Scan2Args {
        d: Some(w.d),
        delta_bias: Some(w.dt_bias),
        delta_softplus: true,
        resets: resets.as_deref(),
        h0: w.h0,
        ..Scan2Args::new(&conv_out[0], &dt, w.a, &conv_out[1], &conv_out[2])
    };
    let mut y = pool::take_for_overwrite(rows * di);
    mamba2::scan_fwd_auto(&dims, spec.chunk_size, &args, Scan2Out { y: &mut y, h_last });
    let nd = NormDims::new(rows, di, di / spec.ngroups, spec.eps);
    let rstd = norm_fwd(&nd, &NormArgs::new(&y, w.norm_w).with_gate(cols(0)), out);
    Saved::Split(Box::new(SplitSaved { dims, conv_in, conv_out, dt, y, nd, rstd, resets }))
}

/// What the backward needs besides the inputs: their positions, the sizes and the path's saved
/// values.
struct Mamba2CoreBackward {
    at: CoreInputs,
    spec: Mamba2Spec,
    k: usize,
    rows: usize,
    saved: Saved,
}

/// The separate kernels' conv inputs and outputs (= the scan's `x`, `B`, `C`), `dt`, the scan
/// output `y` and the norm's reciprocal RMS.
struct SplitSaved {
    dims: Scan2Dims,
    conv_in: [Vec<f32>; 3],
    conv_out: [Vec<f32>; 3],
    dt: Vec<f32>,
    y: Vec<f32>,
    nd: NormDims,
    rstd: Vec<f32>,
    resets: Option<Resets>,
}

enum Saved {
    /// See [`SplitSaved`].
    Split(Box<SplitSaved>),
    /// The fused kernel's reciprocal RMS and pre-norm scan output (it recomputes everything
    /// else from `proj`), and the batch's starts.
    Fused { dims: MixerDims, rstd: Vec<f32>, y: Vec<f32>, resets: Option<Resets> },
}

/// The saved buffers go back to the pool for the next step's forward.
impl Drop for Mamba2CoreBackward {
    fn drop(&mut self) {
        match &mut self.saved {
            Saved::Split(sv) => {
                let SplitSaved { conv_in, conv_out, dt, y, rstd, .. } = &mut **sv;
                for v in [dt, y, rstd].into_iter().chain(conv_in).chain(conv_out) {
                    pool::give(std::mem::take(v));
                }
            }
            Saved::Fused { rstd, y, .. } => {
                pool::give(std::mem::take(rstd));
                pool::give(std::mem::take(y));
            }
        }
    }
}

impl Backward for Mamba2CoreBackward {
    fn name(&self) -> &'static str {
        "mamba2_core"
    }

    fn reads_output(&self) -> bool {
        false
    }

    /// A fresh gradient of the projection is written column block by column block (every
    /// column is written exactly once), without a zero-fill; the parameters' gradients are added
    /// to (zeroed first when fresh).
    fn backward(&self, inputs: &[&Tensor], _: &Tensor, dout: &Tensor, grads: &mut [Option<InputGrad<'_>>]) {
        let (at, spec, k, rows) = (self.at, self.spec, self.k, self.rows);
        let (dp, cd) = (spec.proj_dim(), spec.conv_dim());
        let val = |s: Slot| data(s.value(inputs));
        let mut s0 = Vec::new();
        let [mut s1, mut s2, mut s3, mut s4]: [F32Buf; 4] = Default::default();
        let a = neg_exp(val(at.a_log));
        let mut da = pool::take(spec.nheads);
        let dproj = at.proj.grad(grads);
        let ow = dproj.as_ref().is_some_and(InputGrad::overwrites);
        let da_log = at.a_log.grad(grads);
        let g = Grads {
            dproj: match dproj {
                Some(g) => g.into_data(),
                None => {
                    s0 = pool::take(rows * dp);
                    &mut s0
                }
            },
            dcw: grad_or_scratch(at.conv_w.grad(grads), &mut s1, cd * k),
            dcb: at.conv_b.and_then(|b| b.grad(grads)).map(InputGrad::zero_if_overwrite),
            ddt_bias: grad_or_scratch(at.dt_bias.grad(grads), &mut s2, spec.nheads),
            da: &mut da,
            dd: grad_or_scratch(at.d.grad(grads), &mut s3, spec.nheads),
            dnorm_w: grad_or_scratch(at.norm_w.grad(grads), &mut s4, spec.d_inner()),
            dconv0: at.conv0.and_then(|s| s.grad(grads)).map(InputGrad::zero_if_overwrite),
            dh0: at.h0.and_then(|s| s.grad(grads)).map(InputGrad::zero_if_overwrite),
        };
        let w = Weights {
            cw: val(at.conv_w),
            cb: at.conv_b.map(val),
            dt_bias: val(at.dt_bias),
            a: &a,
            d: val(at.d),
            norm_w: val(at.norm_w),
            conv0: at.conv0.map(val),
            h0: at.h0.map(val),
        };
        let (pd, dy) = (val(at.proj), data(dout));
        match &self.saved {
            Saved::Fused { dims, rstd, y, resets } => {
                let grads = MixerGrads {
                    dproj: g.dproj,
                    overwrite_dproj: ow,
                    dconv_w: g.dcw,
                    dconv_b: g.dcb,
                    ddt_bias: g.ddt_bias,
                    da: g.da,
                    dd: g.dd,
                    dnorm_w: g.dnorm_w,
                };
                mixer_bwd(dims, pd, &w.mixer(spec.eps, resets.as_deref()), (rstd, y), dy, grads);
            }
            split => split_backward(spec, k, split, pd, &w, dy, g, ow),
        }
        finish_da(da_log, da, a);
        pool::give(s0);
    }
}

/// The gradient buffers of a backward call (scratch for the inputs that need none).
struct Grads<'a> {
    dproj: &'a mut [f32],
    dcw: &'a mut [f32],
    dcb: Option<&'a mut [f32]>,
    ddt_bias: &'a mut [f32],
    da: &'a mut [f32],
    dd: &'a mut [f32],
    dnorm_w: &'a mut [f32],
    /// Gradients of the initial states, when given and needed.
    dconv0: Option<&'a mut [f32]>,
    dh0: Option<&'a mut [f32]>,
}

/// The backward on the separate kernels: gated norm (dz straight into the projection's z
/// columns), scan, conv per block, each column block of `dproj` written (`ow`) or added once.
#[allow(clippy::too_many_arguments)]
fn split_backward(
    spec: Mamba2Spec,
    k: usize,
    saved: &Saved,
    pd: &[f32],
    w: &Weights,
    dout: &[f32],
    g: Grads,
    ow: bool,
) {
    let Saved::Split(sv) = saved else { unreachable!("split_backward takes the split path's saved values") };
    let SplitSaved { dims, conv_in, conv_out, dt, y, nd, rstd, resets } = &**sv;
    let resets = resets.as_deref();
    let (dp, di, rows) = (spec.proj_dim(), spec.d_inner(), nd.rows);
    let Grads { dproj, dcw, mut dcb, ddt_bias, da, dd, dnorm_w, mut dconv0, dh0 } = g;
    let mut dy = pool::take_for_overwrite(rows * di);
    let args = NormArgs::new(y, w.norm_w).with_gate(Cols { data: pd, stride: dp, offset: 0 });
    let ng = NormGrads {
        dx: Some(&mut dy),
        overwrite_dx: true,
        dw: Some(dnorm_w),
        dz: Some(ColsMut { data: &mut *dproj, stride: dp, offset: 0 }),
        overwrite_dz: ow,
    };
    norm_bwd(nd, &args, rstd, dout, ng);

    // Scan: gradients of the conv outputs and of dt.
    let args = Scan2Args {
        d: Some(w.d),
        delta_bias: Some(w.dt_bias),
        delta_softplus: true,
        resets,
        h0: w.h0,
        ..Scan2Args::new(&conv_out[0], dt, w.a, &conv_out[1], &conv_out[2])
    };
    let mut dconv_out: [Vec<f32>; 3] = conv_blocks(&spec).map(|(_, nc)| pool::take(rows * nc));
    let mut ddt = pool::take(rows * spec.nheads);
    {
        let [dx, db, dc] = &mut dconv_out;
        let grads = Scan2Grads {
            dx,
            ddelta: &mut ddt,
            da,
            db,
            dc,
            dd: Some(dd),
            dz: None,
            ddelta_bias: Some(ddt_bias),
            dh0,
        };
        mamba2::scan_bwd_auto(dims, spec.chunk_size, &args, &dy, None, grads);
    }
    pool::give(dy);
    let [ox, _, _, odt] = spec.offsets();
    scatter(ColsMut { data: &mut *dproj, stride: dp, offset: odt }, &ddt, spec.nheads, ow);
    pool::give(ddt);

    // Conv, per channel block, then into the projection's x | B | C columns.
    for (i, (c0, nc)) in conv_blocks(&spec).into_iter().enumerate() {
        let cdims = ConvDims::new(dims.batch, dims.seqlen, nc, k);
        let args = w.conv_block(&conv_in[i], (c0, nc, k), resets);
        let mut dx = pool::take(rows * nc);
        let grads = ConvGrads {
            dx: &mut dx,
            dweight: &mut dcw[c0 * k..(c0 + nc) * k],
            dbias: dcb.as_deref_mut().map(|b| &mut b[c0..c0 + nc]),
        };
        match (w.conv0, dconv0.as_deref_mut()) {
            (Some(s0), ds) => {
                let cd = spec.conv_dim();
                let st = gather(state_cols(s0, (cd, k), c0), nc * k, dims.batch);
                let mut dst = ds.as_ref().map(|_| pool::take(st.len()));
                conv1d_bwd_from(&cdims, &args, &st, &dconv_out[i], grads, dst.as_deref_mut());
                if let (Some(ds), Some(d)) = (ds, dst) {
                    scatter(ColsMut { data: ds, stride: cd * k, offset: c0 * k }, &d, nc * k, false);
                    pool::give(d);
                }
                pool::give(st);
            }
            (None, _) => conv1d_bwd(&cdims, &args, &dconv_out[i], grads),
        }
        scatter(ColsMut { data: &mut *dproj, stride: dp, offset: ox + c0 }, &dx, nc, ow);
        pool::give(dx);
    }
    for v in dconv_out {
        pool::give(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::check::{check_accumulates, check_op, random};
    use crate::ops::{Scan2Vars, conv1d, gated_rms_norm, narrow_last, reshape, selective_scan2};
    use crate::params::{Grads, ParamStore};
    use ssm_kernel::reference;

    /// A spec with two groups of two heads, `P = 3`, `N = 2`, and conv width 3.
    fn small() -> (Mamba2Spec, usize) {
        (Mamba2Spec { nheads: 4, headdim: 3, ngroups: 2, dstate: 2, eps: 1e-5, chunk_size: 32 }, 3)
    }

    fn inputs(spec: &Mamba2Spec, k: usize, bsz: usize, l: usize) -> Vec<Tensor> {
        let (dp, cd, h, di) = (spec.proj_dim(), spec.conv_dim(), spec.nheads, spec.d_inner());
        vec![
            random(&[bsz, l, dp], 1) * 1.5,
            random(&[cd, 1, k], 2),
            random(&[h], 3) * 0.5,
            random(&[h], 4) * 0.5,
            random(&[h], 5),
            random(&[di], 6) + 1.0,
            random(&[cd], 7) * 0.3,
        ]
    }

    fn params(v: &[Var]) -> Mamba2Params {
        Mamba2Params::new(v[1], v[2], v[3], v[4], v[5]).with_conv_b(v[6])
    }

    /// f64 reference: the split, `reference::conv` + SiLU, `reference::mamba2` and the gated norm
    /// written out.
    fn reference(x: &[Vec<f64>], spec: &Mamba2Spec, k: usize, bsz: usize, l: usize) -> Vec<f64> {
        let (dp, di, cd, h, gn) = (spec.proj_dim(), spec.d_inner(), spec.conv_dim(), spec.nheads, spec.gn());
        let rows = bsz * l;
        let cols = |off: usize, w: usize| -> Vec<f64> {
            (0..rows).flat_map(|r| x[0][r * dp + off..r * dp + off + w].to_vec()).collect()
        };
        let (z, xbc, dt) = (cols(0, di), cols(di, cd), cols(di + cd, h));
        let mut conv = vec![0.0; rows * cd];
        let cargs = ConvArgs { x: &xbc, weight: &x[1], bias: Some(&x[6]), silu: true, resets: None };
        reference::conv::conv1d_fwd(
            &ConvDims::new(bsz, l, cd, k),
            &cargs,
            ConvOut { y: &mut conv, state_out: None },
        );
        let part = |off: usize, w: usize| -> Vec<f64> {
            (0..rows).flat_map(|r| conv[r * cd + off..r * cd + off + w].to_vec()).collect()
        };
        let (xs, bs, cs) = (part(0, di), part(di, gn), part(di + gn, gn));
        let a: Vec<f64> = x[3].iter().map(|v| -v.exp()).collect();
        let dims = Scan2Dims::new(bsz, l, h, spec.headdim, spec.dstate).with_groups(spec.ngroups);
        let args = Scan2Args {
            d: Some(&x[4]),
            delta_bias: Some(&x[2]),
            delta_softplus: true,
            ..Scan2Args::new(&xs, &dt, &a, &bs, &cs)
        };
        let mut y = vec![0.0; rows * di];
        reference::mamba2::scan_fwd(&dims, &args, Scan2Out { y: &mut y, h_last: None });
        let gs = di / spec.ngroups;
        let mut out = vec![0.0; rows * di];
        for r in 0..rows {
            for g in 0..spec.ngroups {
                let c0 = r * di + g * gs;
                let v: Vec<f64> = (c0..c0 + gs).map(|i| y[i] * z[i] / (1.0 + (-z[i]).exp())).collect();
                let rs = 1.0 / (v.iter().map(|a| a * a).sum::<f64>() / gs as f64 + spec.eps as f64).sqrt();
                for (j, vj) in v.iter().enumerate() {
                    out[c0 + j] = vj * rs * x[5][g * gs + j];
                }
            }
        }
        out
    }

    fn run(t: &mut Tape, v: &[Var], spec: Mamba2Spec, path: Path) -> Var {
        core(t, v[0], params(v), spec, false, path).0
    }

    #[test]
    fn split_backward_matches_finite_differences() {
        let (spec, k) = small();
        let (bsz, l) = (2, 7);
        check_op(
            inputs(&spec, k, bsz, l),
            |t, v| run(t, v, spec, Path::Split),
            |x| reference(x, &spec, k, bsz, l),
            2e-3,
        );
    }

    #[test]
    fn fused_backward_matches_finite_differences() {
        // The smallest dims the fused kernel takes: P = 8, G·N = 8; K = 3, L = 7.
        let spec = Mamba2Spec { nheads: 2, headdim: 8, ngroups: 2, dstate: 4, eps: 1e-5, chunk_size: 32 };
        let (k, bsz, l) = (3, 2, 7);
        check_op(
            inputs(&spec, k, bsz, l),
            |t, v| run(t, v, spec, Path::Fused),
            |x| reference(x, &spec, k, bsz, l),
            2e-3,
        );
    }

    /// The separate ops, as the mixer composed them before this node existed.
    fn composed(t: &mut Tape, v: &[Var], spec: &Mamba2Spec, bsz: usize, l: usize) -> Var {
        let (di, cd, h, gn) = (spec.d_inner(), spec.conv_dim(), spec.nheads, spec.gn());
        let z = narrow_last(t, v[0], 0, di);
        let xbc = narrow_last(t, v[0], di, cd);
        let dt = narrow_last(t, v[0], di + cd, h);
        let xbc = conv1d(t, xbc, v[1], Some(v[6]), true, None, None, None);
        let x = narrow_last(t, xbc, 0, di);
        let b = narrow_last(t, xbc, di, gn);
        let c = narrow_last(t, xbc, di + gn, gn);
        let x = reshape(t, x, &[bsz, l, h, spec.headdim]);
        let b = reshape(t, b, &[bsz, l, spec.ngroups, spec.dstate]);
        let c = reshape(t, c, &[bsz, l, spec.ngroups, spec.dstate]);
        let args =
            Scan2Vars::new(x, dt, v[3], b, c).with_d(v[4]).with_delta_bias(v[2]).with_delta_softplus(true);
        let y = selective_scan2(t, args.with_chunk_size(spec.chunk_size));
        let y = reshape(t, y, &[bsz, l, di]);
        gated_rms_norm(t, y, z, v[5], di / spec.ngroups, spec.eps)
    }

    /// At a size that takes the parallel paths, values and every gradient of both paths equal
    /// those of the composition of the separate (each finite-difference-checked) ops.
    #[test]
    fn both_paths_equal_the_composed_ops() {
        for path in [Path::Split, Path::Fused] {
            equals_the_composed_ops(path);
        }
    }

    fn equals_the_composed_ops(path: Path) {
        let spec = Mamba2Spec { nheads: 4, headdim: 16, ngroups: 2, dstate: 8, eps: 1e-5, chunk_size: 32 };
        let (k, bsz, l) = (4, 3, 150);
        let ins = inputs(&spec, k, bsz, l);
        let run = |fused: bool| {
            let store = ParamStore::new();
            let mut tape = Tape::new(&store);
            let v: Vec<Var> = ins.iter().map(|t| tape.leaf(t.clone())).collect();
            let out =
                if fused { run(&mut tape, &v, spec, path) } else { composed(&mut tape, &v, &spec, bsz, l) };
            let y = data(tape.value(out)).to_vec();
            let seed = random(tape.value(out).shape(), 11);
            tape.backward_from(out, seed, &mut Grads::new(&store));
            let g: Vec<Vec<f32>> =
                v.iter().map(|&x| data(tape.grad(x).expect("every input has a gradient")).to_vec()).collect();
            (y, g)
        };
        let ((y1, g1), (y0, g0)) = (run(true), run(false));
        let f64s = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
        ssm_kernel::testing::assert_rel_max("out", &y1, &f64s(&y0), 1e-5, 1e-3);
        for (i, (a, b)) in g1.iter().zip(&g0).enumerate() {
            ssm_kernel::testing::assert_rel_max(&format!("d(input {i})"), a, &f64s(b), 1e-4, 1e-3);
        }
    }

    #[test]
    fn state_is_the_last_conv_inputs_and_the_final_scan_state() {
        let (spec, k) = small();
        let (bsz, l) = (2, 5);
        let ins = inputs(&spec, k, bsz, l);
        let store = ParamStore::new();
        let mut tape = Tape::inference(&store);
        let v: Vec<Var> = ins.iter().map(|t| tape.constant(t.clone())).collect();
        let (_, st) = mamba2_core_with_state(&mut tape, v[0], params(&v), spec);
        let (dp, di, cd) = (spec.proj_dim(), spec.d_inner(), spec.conv_dim());
        let proj = data(&ins[0]);
        // Channel 5 of batch row 1: the last K = 3 inputs, oldest first.
        for j in 0..k {
            let t = l - k + j;
            assert_eq!(st.conv[(cd + 5) * k + j], proj[(l + t) * dp + di + 5]);
        }
        assert_eq!(st.ssm.shape(), &[bsz, spec.nheads, spec.headdim, spec.dstate]);
        assert!(data(&st.ssm).iter().any(|&v| v != 0.0), "the final state is written");
    }

    #[test]
    #[should_panic(expected = "mamba2_core: proj must be (B, L, 36)")]
    fn wrong_projection_width_panics() {
        let (spec, k) = small();
        let store = ParamStore::new();
        let mut tape = Tape::new(&store);
        let mut ins = inputs(&spec, k, 1, 2);
        ins[0] = crate::tensor::zeros(&[1, 2, 35]);
        let v: Vec<Var> = ins.iter().map(|t| tape.constant(t.clone())).collect();
        mamba2_core(&mut tape, v[0], params(&v), spec);
    }

    #[test]
    fn fresh_and_accumulated_gradients() {
        let spec = Mamba2Spec { nheads: 4, headdim: 16, ngroups: 2, dstate: 8, eps: 1e-5, chunk_size: 32 };
        for path in [Path::Split, Path::Fused] {
            check_accumulates(inputs(&spec, 4, 2, 70), |t, v| run(t, v, spec, path));
        }
    }

    /// With document starts, the fused kernel gives the split kernels' values and gradients
    /// (each side checked against running documents alone or finite differences elsewhere).
    #[test]
    fn fused_and_split_agree_with_document_starts() {
        let spec = Mamba2Spec { nheads: 4, headdim: 16, ngroups: 2, dstate: 8, eps: 1e-5, chunk_size: 32 };
        let (bsz, l) = (3, 53);
        let ins = inputs(&spec, 4, bsz, l);
        let resets: Resets =
            (0..bsz * l).map(|i| [0, 1, 17, 18, 40].contains(&(i % l))).collect::<Vec<_>>().into();
        let run = |path: Path| {
            let store = ParamStore::new();
            let mut tape = Tape::new(&store);
            let v: Vec<Var> = ins.iter().map(|t| tape.leaf(t.clone())).collect();
            let out =
                core(&mut tape, v[0], params(&v).with_resets(Some(resets.clone())), spec, false, path).0;
            let y = data(tape.value(out)).to_vec();
            tape.backward_from(out, random(tape.value(out).shape(), 12), &mut Grads::new(&store));
            let g: Vec<Vec<f32>> =
                v.iter().map(|&x| data(tape.grad(x).expect("a gradient")).to_vec()).collect();
            (y, g)
        };
        let ((y1, g1), (y0, g0)) = (run(Path::Fused), run(Path::Split));
        let f64s = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
        ssm_kernel::testing::assert_rel_max("out", &y1, &f64s(&y0), 1e-5, 1e-3);
        for (i, (a, b)) in g1.iter().zip(&g0).enumerate() {
            ssm_kernel::testing::assert_rel_max(&format!("d(input {i})"), a, &f64s(b), 1e-4, 1e-3);
        }
    }

    #[test]
    fn fused_and_split_final_states_agree() {
        let spec = Mamba2Spec { nheads: 4, headdim: 16, ngroups: 2, dstate: 8, eps: 1e-5, chunk_size: 32 };
        let ins = inputs(&spec, 4, 3, 40);
        let state = |path: Path| {
            let store = ParamStore::new();
            let mut tape = Tape::inference(&store);
            let v: Vec<Var> = ins.iter().map(|t| tape.constant(t.clone())).collect();
            let (_, st) = core(&mut tape, v[0], params(&v), spec, true, path);
            data(&st.expect("requested").ssm).to_vec()
        };
        let (fused, split) = (state(Path::Fused), state(Path::Split));
        let want: Vec<f64> = split.iter().map(|&v| v as f64).collect();
        ssm_kernel::testing::assert_rel_max("h_last", &fused, &want, 1e-5, 1e-3);
    }
}
