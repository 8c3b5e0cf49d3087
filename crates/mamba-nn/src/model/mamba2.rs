//! The Mamba-2 mixer (`mamba2.py`): `z, xBC, dt = in_proj(u)`; `xBC = silu(conv1d(xBC))`;
//! `x, B, C = xBC`; `y = scan(x, softplus(dt + dt_bias), A, B, C, D)` with one scalar
//! `A = −exp(A_log)` per head; `out_proj(norm(y · silu(z)))`, the norm over groups of
//! `d_inner / G` channels. Everything between the projections is one fused tape node
//! ([`ops::mamba2_core`]).

use std::sync::Arc;

use ssm_kernel::mamba2::{self, Scan2Args, Scan2Dims, Scan2Out};

use super::builder::{Init, ParamBuilder};
use super::layers::{Conv1d, Linear};
use super::mixer::{LayerCache, Mixer, SeqLayout, carve, neg_exp_of};
use crate::checkpoint::CheckpointError;
use crate::config::MambaConfig;
use crate::ops::{self, Mamba2Params, Mamba2Spec};
use crate::params::{ParamId, ParamStore};
use crate::tape::{Tape, Var};
use crate::tensor::data;
use ssm_kernel::cols::row_cols as cols;
use ssm_kernel::norm::gated_rms_rows;

/// Mamba-2's parameters (Hugging Face names) and sizes.
#[derive(Clone, Debug)]
pub struct Mamba2Mixer {
    /// `in_proj`, (2·d_inner + 2·G·N + H, d_model): `z | x | B | C | dt`.
    pub in_proj: Linear,
    /// `conv1d` over `x | B | C`, (d_inner + 2·G·N, 1, K).
    pub conv1d: Conv1d,
    /// `dt_bias`, (H).
    pub dt_bias: ParamId,
    /// `A_log`, (H).
    pub a_log: ParamId,
    /// `D`, (H).
    pub d: ParamId,
    /// The gated RMSNorm's `norm.weight`, (d_inner).
    pub norm: ParamId,
    /// `out_proj`, (d_model, d_inner).
    pub out_proj: Linear,
    /// Heads, head size, groups, state size and the norm's epsilon.
    pub spec: Mamba2Spec,
}

impl Mamba2Mixer {
    /// Registers the mixer's parameters in scope `b` with the reference initialisation.
    pub fn new(b: &mut ParamBuilder, cfg: &MambaConfig) -> Result<Self, CheckpointError> {
        let (d, di, h) = (cfg.d_model, cfg.d_inner(), cfg.nheads());
        let in_proj =
            Linear::new(&mut b.pp("in_proj"), (cfg.in_proj_dim(), d), cfg.bias, Init::kaiming(d, 1.0))?;
        let conv1d = Conv1d::new(&mut b.pp("conv1d"), cfg.conv_dim(), cfg.d_conv, cfg.conv_bias)?;
        let dt = Init::DtBias { min: cfg.dt_min, max: cfg.dt_max, floor: cfg.dt_init_floor };
        let dt_bias = b.param("dt_bias", &[h], dt)?;
        let a_log = b.param("A_log", &[h], Init::LogUniform(1.0, 16.0))?;
        let d_skip = b.param("D", &[h], Init::Const(1.0))?;
        let norm = b.param("norm.weight", &[di], Init::Const(1.0))?;
        let scale = 1.0 / (cfg.n_layer as f32).sqrt();
        let out_proj = Linear::new(&mut b.pp("out_proj"), (d, di), cfg.bias, Init::kaiming(di, scale))?;
        let spec = Mamba2Spec {
            nheads: h,
            headdim: cfg.headdim,
            ngroups: cfg.ngroups,
            dstate: cfg.d_state,
            eps: cfg.norm_eps,
            chunk_size: cfg.chunk_size,
        };
        Ok(Self { in_proj, conv1d, dt_bias, a_log, d: d_skip, norm, out_proj, spec })
    }

    fn d_inner(&self) -> usize {
        self.spec.nheads * self.spec.headdim
    }

    fn gn(&self) -> usize {
        self.spec.ngroups * self.spec.dstate
    }
}

impl Mixer for Mamba2Mixer {
    fn linears(&self) -> Vec<(&'static str, Linear)> {
        vec![("in_proj", self.in_proj), ("out_proj", self.out_proj)]
    }

    fn with_linears(&self, f: &mut dyn FnMut(&'static str, &mut Linear)) -> Arc<dyn Mixer> {
        let mut m = self.clone();
        for (name, l) in [("in_proj", &mut m.in_proj), ("out_proj", &mut m.out_proj)] {
            f(name, l);
        }
        Arc::new(m)
    }

    fn forward(&self, tape: &mut Tape, u: Var, seq: &SeqLayout, state: Option<&mut LayerCache>) -> Var {
        assert!(seq.final_grad.is_none(), "this mixer does not take a final-state gradient");
        let proj = self.in_proj.forward(tape, u);
        let prm = Mamba2Params {
            conv_w: tape.param(self.conv1d.weight),
            conv_b: self.conv1d.bias.map(|b| tape.param(b)),
            dt_bias: tape.param(self.dt_bias),
            a_log: tape.param(self.a_log),
            d: tape.param(self.d),
            norm_w: tape.param(self.norm),
            resets: seq.resets.clone(),
            conv0: seq.init.map(|i| i.conv),
            h0: seq.init.map(|i| i.ssm),
        };
        let y = match state {
            Some(st) => {
                let (y, s) = ops::mamba2_core_with_state(tape, proj, prm, self.spec);
                st.conv.copy_from_slice(&s.conv);
                st.ssm.copy_from_slice(data(&s.ssm));
                y
            }
            None => ops::mamba2_core(tape, proj, prm, self.spec),
        };
        self.out_proj.forward(tape, y)
    }

    fn cache_shapes(&self) -> (Vec<usize>, Vec<usize>) {
        let s = &self.spec;
        (vec![self.conv1d.channels, self.conv1d.width], vec![s.nheads, s.headdim, s.dstate])
    }

    /// `A = −exp(A_log)`, (H).
    fn decode_consts(&self, p: &ParamStore) -> Vec<f32> {
        neg_exp_of(p, self.a_log)
    }

    fn prefill_scratch_len(&self, batch: usize, len: usize) -> usize {
        let (di, cd, h, gn) = (self.d_inner(), self.conv1d.channels, self.spec.nheads, self.gn());
        let s = &self.spec;
        batch
            * (len * (self.in_proj.d_out + 2 * cd + di + 2 * gn + h + 3 * di)
                + s.nheads * s.headdim * s.dstate)
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
        let (di, cd, h, gn) = (self.d_inner(), self.conv1d.channels, self.spec.nheads, self.gn());
        batch * (self.in_proj.d_out + 2 * cd + di + 2 * gn + h + 3 * di)
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

impl Mamba2Mixer {
    /// [`Mixer::prefill`] of `len` tokens per sequence (`Some(len)`: conv and scan over the
    /// chunk from the state), or [`Mixer::step`] (`None`: one row per sequence, the recurrent
    /// conv and scan steps). The projections, column splits and gated norm are shared.
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
        let Mamba2Spec { nheads: h, headdim: hp, ngroups: g, dstate: n, eps, chunk_size } = self.spec;
        let (di, cd, gn, pd) = (self.d_inner(), self.conv1d.channels, self.gn(), self.in_proj.d_out);
        let rows = u.len() / self.in_proj.d_in;
        let bsz = rows / len.unwrap_or(1);
        let mut s = scratch;
        let proj = carve(&mut s, rows * pd);
        self.in_proj.rows(p, u, rows, proj);
        let xbc = cols(proj, pd, di, cd, carve(&mut s, rows * cd));
        let xc = carve(&mut s, rows * cd);
        match len {
            Some(_) => self.conv1d.prefill(p, xbc, bsz, &mut cache.conv, xc),
            None => self.conv1d.step(p, xbc, bsz, &mut cache.conv, xc),
        }
        let x = cols(xc, cd, 0, di, carve(&mut s, rows * di));
        let bm = cols(xc, cd, di, gn, carve(&mut s, rows * gn));
        let cm = cols(xc, cd, di + gn, gn, carve(&mut s, rows * gn));
        let delta = cols(proj, pd, di + cd, h, carve(&mut s, rows * h));
        let z = cols(proj, pd, 0, di, carve(&mut s, rows * di));
        let y = carve(&mut s, rows * di);
        let mut args = Scan2Args {
            x,
            delta,
            a: neg_a,
            b: bm,
            c: cm,
            d: Some(data(p.value(self.d))),
            z: None,
            delta_bias: Some(data(p.value(self.dt_bias))),
            delta_softplus: true,
            h0: None,
            resets: None,
        };
        match len {
            Some(len) => {
                let h0 = carve(&mut s, bsz * h * hp * n);
                h0.copy_from_slice(&cache.ssm);
                args.h0 = Some(h0);
                let dims = Scan2Dims::new(bsz, len, h, hp, n).with_groups(g);
                let out_y = Scan2Out { y: &mut *y, h_last: Some(&mut cache.ssm) };
                mamba2::scan_fwd_auto(&dims, chunk_size, &args, out_y);
            }
            None => {
                let dims = Scan2Dims::new(bsz, 1, h, hp, n).with_groups(g);
                mamba2::scan_step(&dims, &args, &mut cache.ssm, y);
            }
        }
        // Gated RMSNorm over groups of d_inner / G channels.
        let normed = carve(&mut s, rows * di);
        gated_rms_rows(y, z, data(p.value(self.norm)), di / g, eps, normed);
        self.out_proj.rows(p, normed, rows, out);
    }
}
