//! The non-selective baseline: `x = in_proj(u)`, the linear time-invariant recurrence
//! `h_t = A ⊙ h_{t−1} + B ⊙ x_t`, `y_t = C ⊙ h_t + D ⊙ x_t` with per-channel vectors, `out_proj(y)`.
//! No convolution and no gate: nothing in the layer depends on the input's content, which is
//! what the Mamba paper's selective-copying contrast is about.

use std::sync::Arc;

use ssm_kernel::lti::{LtiArgs, LtiDims, lti_chunk, lti_final_state};

use super::builder::{Init, ParamBuilder};
use super::layers::Linear;
use super::mixer::{LayerCache, Mixer, SeqLayout, carve};
use crate::checkpoint::CheckpointError;
use crate::config::MambaConfig;
use crate::ops;
use crate::params::{ParamId, ParamStore};
use crate::tape::{Tape, Var};
use crate::tensor::data;

/// The LTI baseline's parameters and size.
#[derive(Clone, Debug)]
pub struct LtiMixer {
    /// `in_proj`, (d_inner, d_model).
    pub in_proj: Linear,
    /// `lti_A`, (d_inner): per-channel decay, initialised in (0.5, 0.99).
    pub a: ParamId,
    /// `lti_B`, (d_inner).
    pub b: ParamId,
    /// `lti_C`, (d_inner).
    pub c: ParamId,
    /// `D`, (d_inner).
    pub d: ParamId,
    /// `out_proj`, (d_model, d_inner).
    pub out_proj: Linear,
    /// `d_inner`.
    pub d_inner: usize,
}

impl LtiMixer {
    /// Registers the layer's parameters in scope `b`: stable decays `A` ~ U(0.5, 0.99), `B`,
    /// `C` ~ U(±1), `D = 1`.
    pub fn new(b: &mut ParamBuilder, cfg: &MambaConfig) -> Result<Self, CheckpointError> {
        let (d, di) = (cfg.d_model, cfg.d_inner());
        let in_proj = Linear::new(&mut b.pp("in_proj"), (di, d), cfg.bias, Init::kaiming(d, 1.0))?;
        let a = b.param("lti_A", &[di], Init::Uniform(0.5, 0.99))?;
        let bv = b.param("lti_B", &[di], Init::Uniform(-1.0, 1.0))?;
        let c = b.param("lti_C", &[di], Init::Uniform(-1.0, 1.0))?;
        let d_skip = b.param("D", &[di], Init::Const(1.0))?;
        let scale = 1.0 / (cfg.n_layer as f32).sqrt();
        let out_proj = Linear::new(&mut b.pp("out_proj"), (d, di), cfg.bias, Init::kaiming(di, scale))?;
        Ok(Self { in_proj, a, b: bv, c, d: d_skip, out_proj, d_inner: di })
    }
}

impl Mixer for LtiMixer {
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
        assert!(
            seq.resets.is_none() && seq.init.is_none(),
            "LtiMixer: the LTI baseline has no document resets or initial states; train it on one \
             stream of text from a zero state"
        );
        let x = self.in_proj.forward(tape, u);
        if let Some(st) = state {
            let xv = tape.value(x);
            let dims = LtiDims::new(xv.shape()[0], xv.shape()[1], xv.shape()[2]);
            let (a, b) = (data(tape.params().value(self.a)), data(tape.params().value(self.b)));
            lti_final_state(&dims, a, b, data(xv), &mut st.ssm);
        }
        let (a, b) = (tape.param(self.a), tape.param(self.b));
        let (c, d) = (tape.param(self.c), tape.param(self.d));
        let y = ops::lti_scan(tape, x, a, b, c, d);
        self.out_proj.forward(tape, y)
    }

    fn cache_shapes(&self) -> (Vec<usize>, Vec<usize>) {
        (vec![0], vec![self.d_inner])
    }

    fn decode_consts(&self, _: &ParamStore) -> Vec<f32> {
        Vec::new()
    }

    fn prefill_scratch_len(&self, batch: usize, len: usize) -> usize {
        2 * batch * len * self.d_inner
    }

    fn prefill(
        &self,
        p: &ParamStore,
        _: &[f32],
        u: &[f32],
        len: usize,
        cache: &mut LayerCache,
        scratch: &mut [f32],
        out: &mut [f32],
    ) {
        let di = self.d_inner;
        let rows = u.len() / self.in_proj.d_in;
        let mut s = scratch;
        let x = carve(&mut s, rows * di);
        self.in_proj.rows(p, u, rows, x);
        let y = carve(&mut s, rows * di);
        let v = |id: ParamId| data(p.value(id));
        let args = LtiArgs { x, a: v(self.a), b: v(self.b), c: v(self.c), d: v(self.d) };
        lti_chunk(&LtiDims::new(rows / len, len, di), &args, &mut cache.ssm, y);
        self.out_proj.rows(p, y, rows, out);
    }

    fn scratch_len(&self, batch: usize) -> usize {
        2 * batch * self.d_inner
    }

    /// A chunk of one token (`lti_chunk` over one step is exactly `lti_step`).
    fn step(
        &self,
        p: &ParamStore,
        consts: &[f32],
        u: &[f32],
        cache: &mut LayerCache,
        scratch: &mut [f32],
        out: &mut [f32],
    ) {
        self.prefill(p, consts, u, 1, cache, scratch, out);
    }
}
