//! The Mamba-1 mixer (`mamba_simple.py`): `x, z = in_proj(u)`; `x = silu(conv1d(x))`;
//! `dt, B, C = x_proj(x)`; `Δ = softplus(dt_proj(dt))`; `y = scan(x, Δ, A, B, C, D) · silu(z)`;
//! `out_proj(y)`, with `A = −exp(A_log)` per channel and state.

use std::sync::Arc;

use ssm_kernel::mamba1::{self, Scan1Args, Scan1Dims, Scan1Out};

use super::builder::{Init, ParamBuilder};
use super::layers::{Conv1d, Linear};
use super::mixer::{LayerCache, Mixer, SeqLayout, carve, neg_exp_of};
use crate::checkpoint::CheckpointError;
use crate::config::MambaConfig;
use crate::ops;
use crate::params::{ParamId, ParamStore};
use crate::tape::{Tape, Var};
use crate::tensor::data;
use ssm_kernel::cols::row_cols as cols;

/// Mamba-1's parameters (Hugging Face names) and sizes.
#[derive(Clone, Debug)]
pub struct Mamba1Mixer {
    /// `in_proj`, (2·d_inner, d_model): `x | z`.
    pub in_proj: Linear,
    /// `conv1d`, (d_inner, 1, K).
    pub conv1d: Conv1d,
    /// `x_proj`, (dt_rank + 2N, d_inner): `dt | B | C`.
    pub x_proj: Linear,
    /// `dt_proj`, (d_inner, dt_rank); its bias is Δ's bias inside the scan's softplus.
    pub dt_proj: Linear,
    /// `A_log`, (d_inner, N).
    pub a_log: ParamId,
    /// `D`, (d_inner).
    pub d: ParamId,
    /// `out_proj`, (d_model, d_inner).
    pub out_proj: Linear,
    /// `d_inner`.
    pub d_inner: usize,
    /// `N`.
    pub d_state: usize,
    /// `dt_rank`.
    pub dt_rank: usize,
}

impl Mamba1Mixer {
    /// Registers the mixer's parameters in scope `b` (e.g. `backbone.layers.3.mixer`) with the
    /// reference initialisation.
    pub fn new(b: &mut ParamBuilder, cfg: &MambaConfig) -> Result<Self, CheckpointError> {
        let (d, di, n, r) = (cfg.d_model, cfg.d_inner(), cfg.d_state, cfg.dt_rank);
        let in_proj = Linear::new(&mut b.pp("in_proj"), (2 * di, d), cfg.bias, Init::kaiming(d, 1.0))?;
        let conv1d = Conv1d::new(&mut b.pp("conv1d"), di, cfg.d_conv, cfg.conv_bias)?;
        let x_proj = Linear::new(&mut b.pp("x_proj"), (r + 2 * n, di), false, Init::kaiming(di, 1.0))?;
        let dt_proj = {
            let mut p = b.pp("dt_proj");
            let bound = (r as f64).powf(-0.5);
            let weight = p.matrix("weight", &[di, r], Init::Uniform(-bound, bound))?;
            let dt = Init::DtBias { min: cfg.dt_min, max: cfg.dt_max, floor: cfg.dt_init_floor };
            let bias = p.param("bias", &[di], dt)?;
            Linear { weight, bias: Some(bias), d_in: r, d_out: di, lora: None }
        };
        let a_log = b.param("A_log", &[di, n], Init::S4dReal)?;
        let d_skip = b.param("D", &[di], Init::Const(1.0))?;
        // Pre-norm residual rescale: out_proj divided by √n_layer.
        let scale = 1.0 / (cfg.n_layer as f32).sqrt();
        let out_proj = Linear::new(&mut b.pp("out_proj"), (d, di), cfg.bias, Init::kaiming(di, scale))?;
        Ok(Self {
            in_proj,
            conv1d,
            x_proj,
            dt_proj,
            a_log,
            d: d_skip,
            out_proj,
            d_inner: di,
            d_state: n,
            dt_rank: r,
        })
    }
}

impl Mixer for Mamba1Mixer {
    fn linears(&self) -> Vec<(&'static str, Linear)> {
        vec![
            ("in_proj", self.in_proj),
            ("x_proj", self.x_proj),
            ("dt_proj", self.dt_proj),
            ("out_proj", self.out_proj),
        ]
    }

    fn with_linears(&self, f: &mut dyn FnMut(&'static str, &mut Linear)) -> Arc<dyn Mixer> {
        let mut m = self.clone();
        for (name, l) in [
            ("in_proj", &mut m.in_proj),
            ("x_proj", &mut m.x_proj),
            ("dt_proj", &mut m.dt_proj),
            ("out_proj", &mut m.out_proj),
        ] {
            f(name, l);
        }
        Arc::new(m)
    }

    fn forward(&self, tape: &mut Tape, u: Var, seq: &SeqLayout, mut state: Option<&mut LayerCache>) -> Var {
        let (di, n, r) = (self.d_inner, self.d_state, self.dt_rank);
        // in_proj's two halves as two products: no (…, 2·d_inner) output kept for the backward
        // and copied apart.
        let x = self.in_proj.forward_rows(tape, u, 0..di);
        let z = self.in_proj.forward_rows(tape, u, di..2 * di);
        if let Some(st) = state.as_deref_mut() {
            conv_state(tape, x, self.conv1d.width, seq, &mut st.conv);
        }
        let x = self.conv1d.forward(tape, x, seq);
        let dbc = self.x_proj.forward(tape, x);
        let dt = ops::narrow_last(tape, dbc, 0, r);
        let b = ops::narrow_last(tape, dbc, r, n);
        let c = ops::narrow_last(tape, dbc, r + n, n);
        // dt_proj's bias is added inside the scan's softplus.
        let delta = Linear { bias: None, ..self.dt_proj }.forward(tape, dt);
        let dt_bias = tape.param(self.dt_proj.bias.expect("dt_proj has a bias"));
        let a_log = tape.param(self.a_log);
        let d = tape.param(self.d);
        let scan = ops::Scan1Vars::new(x, delta, a_log, b, c)
            .with_d(d)
            .with_z(z)
            .with_delta_bias(dt_bias)
            .with_delta_softplus(true)
            .with_resets(seq.resets.clone())
            .with_dh_last(seq.final_grad.as_ref().map(|g| g.ssm.clone()));
        let scan = match seq.init {
            Some(i) => scan.with_h0(i.ssm),
            None => scan,
        };
        let y = match state {
            Some(st) => {
                let (y, h) = ops::selective_scan1_with_state(tape, scan);
                st.ssm.copy_from_slice(data(&h));
                y
            }
            None => ops::selective_scan1(tape, scan),
        };
        self.out_proj.forward(tape, y)
    }

    fn cache_shapes(&self) -> (Vec<usize>, Vec<usize>) {
        (vec![self.d_inner, self.conv1d.width], vec![self.d_inner, self.d_state])
    }

    fn takes_final_state_grad(&self) -> bool {
        true
    }

    /// `A = −exp(A_log)`, (d_inner, N).
    fn decode_consts(&self, p: &ParamStore) -> Vec<f32> {
        neg_exp_of(p, self.a_log)
    }

    fn prefill_scratch_len(&self, batch: usize, len: usize) -> usize {
        let (di, n, r) = (self.d_inner, self.d_state, self.dt_rank);
        batch * (len * (7 * di + 2 * (r + 2 * n)) + di * n)
    }

    fn prefill(
        &self,
        p: &ParamStore,
        neg_a: &[f32],
        u: &[f32],
        len: usize,
        cache: &mut LayerCache,
        scratch: &mut [f32],
        out: &mut [f32],
    ) {
        self.run(p, neg_a, u, Some(len), cache, scratch, out);
    }

    fn scratch_len(&self, batch: usize) -> usize {
        let (di, n, r) = (self.d_inner, self.d_state, self.dt_rank);
        batch * (7 * di + 2 * (r + 2 * n))
    }

    fn step(
        &self,
        p: &ParamStore,
        neg_a: &[f32],
        u: &[f32],
        cache: &mut LayerCache,
        scratch: &mut [f32],
        out: &mut [f32],
    ) {
        self.run(p, neg_a, u, None, cache, scratch, out);
    }
}

impl Mamba1Mixer {
    /// [`Mixer::prefill`] of `len` tokens per sequence (`Some(len)`: conv and scan over the
    /// chunk from the state), or [`Mixer::step`] (`None`: one row per sequence, the recurrent
    /// conv and scan steps). The projections are the same code for both.
    fn run(
        &self,
        p: &ParamStore,
        neg_a: &[f32],
        u: &[f32],
        len: Option<usize>,
        cache: &mut LayerCache,
        scratch: &mut [f32],
        out: &mut [f32],
    ) {
        let (di, n, r) = (self.d_inner, self.d_state, self.dt_rank);
        let rows = u.len() / self.in_proj.d_in;
        let bsz = rows / len.unwrap_or(1);
        let mut s = scratch;
        let proj = carve(&mut s, rows * 2 * di);
        self.in_proj.rows(p, u, rows, proj);
        let x = cols(proj, 2 * di, 0, di, carve(&mut s, rows * di));
        let z = cols(proj, 2 * di, di, di, carve(&mut s, rows * di));
        let xc = carve(&mut s, rows * di);
        match len {
            Some(_) => self.conv1d.prefill(p, x, bsz, &mut cache.conv, xc),
            None => self.conv1d.step(p, x, bsz, &mut cache.conv, xc),
        }
        let dbc = carve(&mut s, rows * (r + 2 * n));
        self.x_proj.rows(p, xc, rows, dbc);
        let dt = cols(dbc, r + 2 * n, 0, r, carve(&mut s, rows * r));
        let bm = cols(dbc, r + 2 * n, r, n, carve(&mut s, rows * n));
        let cm = cols(dbc, r + 2 * n, r + n, n, carve(&mut s, rows * n));
        let delta = carve(&mut s, rows * di);
        // dt_proj's bias is Δ's bias inside the scan's softplus.
        Linear { bias: None, ..self.dt_proj }.rows(p, dt, rows, delta);
        let y = carve(&mut s, rows * di);
        let mut args = Scan1Args {
            u: xc,
            delta,
            a: neg_a,
            b: bm,
            c: cm,
            d: Some(data(p.value(self.d))),
            z: Some(z),
            delta_bias: self.dt_proj.bias.map(|b| data(p.value(b))),
            delta_softplus: true,
            h0: None,
            resets: None,
        };
        match len {
            Some(len) => {
                let h0 = carve(&mut s, bsz * di * n);
                h0.copy_from_slice(&cache.ssm);
                args.h0 = Some(h0);
                let dims = Scan1Dims::new(bsz, len, di, n);
                mamba1::scan_fwd(&dims, &args, Scan1Out::with_state(y, &mut cache.ssm));
            }
            None => mamba1::scan_step(&Scan1Dims::new(bsz, 1, di, n), &args, &mut cache.ssm, y),
        }
        self.out_proj.rows(p, y, rows, out);
    }
}

/// Writes HF's conv state for the conv input `x` (B, L, C) into `st` (B, C, K): the last `k`
/// time steps per channel, oldest first — before the sequence, the initial state's (`seq.init`)
/// or zero — cut at the last document start of `seq`.
pub(crate) fn conv_state(tape: &Tape, x: Var, k: usize, seq: &SeqLayout, st: &mut [f32]) {
    let xv = tape.value(x);
    let (bsz, l, c) = (xv.shape()[0], xv.shape()[1], xv.shape()[2]);
    let dims = ssm_kernel::conv::ConvDims::new(bsz, l, c, k);
    let resets = seq.resets.as_deref();
    match seq.init {
        Some(i) => {
            ssm_kernel::conv::conv_state_from(&dims, data(xv), (c, 0), resets, data(tape.value(i.conv)), st)
        }
        None => ssm_kernel::conv::conv_state(&dims, data(xv), (c, 0), resets, st),
    }
}
