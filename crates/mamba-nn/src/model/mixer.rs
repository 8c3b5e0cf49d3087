//! The [`Mixer`] trait: what every layer kind inside a residual block provides — its forward on
//! the tape and its recurrent decode step, side by side — and the per-layer recurrent state
//! [`LayerCache`].
//!
//! The kinds: [`Mamba1Mixer`](super::mamba1::Mamba1Mixer),
//! [`Mamba2Mixer`](super::mamba2::Mamba2Mixer), [`LtiMixer`](super::lti::LtiMixer). Adding one
//! (an attention layer, an MLP) is a new file implementing this trait plus one line in
//! [`Block::new`](super::block::Block::new).

use std::fmt::Debug;
use std::sync::Arc;

use super::layers::Linear;
use crate::ops::Resets;
use crate::params::ParamStore;
use crate::tape::{Tape, Var};

/// One layer's recurrent state for a batch of sequences, in Hugging Face's cache layouts.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerCache {
    /// The conv state (B, C, K): the last `K` conv inputs per channel, oldest first (empty for
    /// a layer without a convolution).
    pub conv: Vec<f32>,
    /// The SSM state: (B, d_inner, N) for Mamba-1, (B, H, P, N) for Mamba-2, (B, d_inner) for
    /// the LTI baseline.
    pub ssm: Vec<f32>,
}

/// How the rows of a batch are laid out in time, beyond their tokens: what every layer's
/// [`Mixer::forward`] needs to know besides its input.
#[derive(Clone, Debug, Default)]
pub struct SeqLayout {
    /// Document starts of a packed batch, (B, L) ([`Resets`]): each layer's conv and SSM state
    /// restart from zero there. `None`: each row is one sequence from a zero state.
    pub resets: Option<Resets>,
    /// The initial state of the layer this layout is given to (the blocks' forward sets it per
    /// layer, see [`Backbone::forward_from`](super::Backbone::forward_from)); `None`: zero.
    pub init: Option<LayerInit>,
    /// A gradient of the layer's final recurrent state — conv (B, C, K) and SSM state in the
    /// layouts of [`LayerCache`] with a batch axis — that the layer's backward adds to the one
    /// from its output: the loss has a term `⟨final_grad, state_L⟩`. Activation checkpointing
    /// recomputes a long window in pieces from their last piece back and passes each piece the
    /// gradient of the next one's initial state here. Per layer, like `init`; only for
    /// mixers whose [`Mixer::takes_final_state_grad`] is `true`.
    pub final_grad: Option<Arc<LayerCache>>,
}

/// A layer's initial recurrent state as values on the tape — differentiable when they are
/// leaves or computed, constants to start from a carried state without a gradient: the conv
/// state (B, C, K) and the SSM state (B, …) in the layouts of [`LayerCache`] with a batch axis
/// (see [`Mixer::cache_shapes`]).
#[derive(Clone, Copy, Debug)]
pub struct LayerInit {
    /// Conv state, (B, C, K).
    pub conv: Var,
    /// SSM state: (B, d_inner, N) for Mamba-1, (B, H, P, N) for Mamba-2.
    pub ssm: Var,
}

impl SeqLayout {
    /// Rows packed with several documents, starting where `resets` (B, L) is `true`.
    pub fn packed(resets: impl Into<Resets>) -> Self {
        Self { resets: Some(resets.into()), init: None, final_grad: None }
    }
}

/// A sequence-mixing layer: `(B, L, d_model) → (B, L, d_model)` on the tape, and the same map
/// one time step at a time with a fixed-size [`LayerCache`].
pub trait Mixer: Send + Sync + Debug {
    /// The layer on `x` (B, L, d_model) from a zero state, restarting at the document starts of
    /// `seq`. With `state`, also writes the state after the last time step into it (its buffers
    /// sized by [`Mixer::cache_len`] × B); no gradient flows through that state.
    fn forward(&self, tape: &mut Tape, x: Var, seq: &SeqLayout, state: Option<&mut LayerCache>) -> Var;

    /// Shapes of one sequence's conv state (C, K) and SSM state ((d_inner, N) for Mamba-1,
    /// (H, P, N) for Mamba-2).
    fn cache_shapes(&self) -> (Vec<usize>, Vec<usize>);

    /// Whether [`Mixer::forward`] honours [`SeqLayout::final_grad`] (others panic when given
    /// one). Activation checkpointing recomputes a long window in pieces only for these.
    fn takes_final_state_grad(&self) -> bool {
        false
    }

    /// Lengths of one sequence's conv and SSM states.
    fn cache_len(&self) -> (usize, usize) {
        let (c, s) = self.cache_shapes();
        (c.iter().product(), s.iter().product())
    }

    /// Values derived from the parameters once per decoder (e.g. `A = −exp(A_log)`), passed back
    /// to every [`Mixer::step`] as `consts`.
    fn decode_consts(&self, params: &ParamStore) -> Vec<f32>;

    /// Scratch floats [`Mixer::prefill`] needs for a chunk of `batch` sequences × `len` tokens.
    fn prefill_scratch_len(&self, batch: usize, len: usize) -> usize;

    /// The parallel forward on a chunk, without a tape: `x` (B, len, d_model) → `out`
    /// (B, len, d_model), continuing from the state in `cache` (zero for fresh sequences) and
    /// leaving in it the state after the chunk's last token. Equal, to rounding, to `len` calls
    /// of [`Mixer::step`], at the speed of the parallel forward; memory is `scratch`, at least
    /// [`Mixer::prefill_scratch_len`] floats, whatever the sequence's length.
    fn prefill(
        &self,
        params: &ParamStore,
        consts: &[f32],
        x: &[f32],
        len: usize,
        cache: &mut LayerCache,
        scratch: &mut [f32],
        out: &mut [f32],
    );

    /// Scratch floats [`Mixer::step`] needs for `batch` sequences.
    fn scratch_len(&self, batch: usize) -> usize;

    /// The layer's projections by module name (`in_proj`, `x_proj`, `dt_proj`, `out_proj`), in
    /// that order — what a LoRA adapter can target.
    fn linears(&self) -> Vec<(&'static str, Linear)>;

    /// A copy of the layer with `f` applied to each of its projections (attaching or removing
    /// adapters).
    fn with_linears(&self, f: &mut dyn FnMut(&'static str, &mut Linear)) -> Arc<dyn Mixer>;

    /// One time step: `x` (B, d_model) — one row per sequence — to `out` (B, d_model), updating
    /// `cache`. `scratch` holds at least [`Mixer::scratch_len`] floats. Allocates nothing.
    fn step(
        &self,
        params: &ParamStore,
        consts: &[f32],
        x: &[f32],
        cache: &mut LayerCache,
        scratch: &mut [f32],
        out: &mut [f32],
    );
}

/// Cuts the first `n` floats off `buf` (for laying out a step's scratch).
pub(crate) fn carve<'a>(buf: &mut &'a mut [f32], n: usize) -> &'a mut [f32] {
    let (head, tail) = std::mem::take(buf).split_at_mut(n);
    *buf = tail;
    head
}

/// `A = −exp(A_log)` of parameter `a_log`, for [`Mixer::decode_consts`].
pub(crate) fn neg_exp_of(p: &ParamStore, a_log: crate::params::ParamId) -> Vec<f32> {
    let a_log = crate::tensor::data(p.value(a_log));
    let mut a = vec![0.0; a_log.len()];
    ssm_kernel::activation::neg_exp(a_log, &mut a);
    a
}
