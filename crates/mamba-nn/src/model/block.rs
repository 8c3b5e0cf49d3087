//! The residual pre-norm [`Block`] (`h ← h + Mixer(RMSNorm(h))`) and the [`Backbone`] of blocks
//! with its final `norm_f`.

use std::sync::Arc;

use super::builder::ParamBuilder;
use super::cache::Cache;
use super::checkpoint::DEFAULT_CHECKPOINT_PIECE;
use super::layers::RmsNorm;
use super::lti::LtiMixer;
use super::mamba1::Mamba1Mixer;
use super::mamba2::Mamba2Mixer;
use super::mixer::{LayerCache, LayerInit, Mixer, SeqLayout};
use crate::checkpoint::CheckpointError;
use crate::config::{Arch, MambaConfig};
use crate::ops;
use crate::params::ParamStore;
use crate::tape::{Tape, Var};

/// One residual block: `norm` then `mixer`, added to the residual stream.
#[derive(Clone, Debug)]
pub struct Block {
    /// `norm`, the pre-norm RMSNorm (d_model).
    pub norm: RmsNorm,
    /// `mixer`, the sequence-mixing layer.
    pub mixer: Arc<dyn Mixer>,
}

impl Block {
    /// Registers block `b` (e.g. scope `backbone.layers.3`): `norm.weight`, then the mixer of
    /// `cfg.arch` under `mixer.*`.
    pub fn new(b: &mut ParamBuilder, cfg: &MambaConfig) -> Result<Self, CheckpointError> {
        let norm = RmsNorm::new(&mut b.pp("norm"), cfg.d_model, cfg.norm_eps)?;
        let m = &mut b.pp("mixer");
        let mixer: Arc<dyn Mixer> = match cfg.arch {
            Arch::Mamba1 => Arc::new(Mamba1Mixer::new(m, cfg)?),
            Arch::Mamba2 => Arc::new(Mamba2Mixer::new(m, cfg)?),
            Arch::Lti => Arc::new(LtiMixer::new(m, cfg)?),
        };
        Ok(Self { norm, mixer })
    }

    /// `h + mixer(norm(h))` for `h` (B, L, d_model), restarting at `seq`'s document starts;
    /// with `state`, the mixer's final recurrent state is written into it.
    pub fn forward(&self, tape: &mut Tape, h: Var, seq: &SeqLayout, state: Option<&mut LayerCache>) -> Var {
        let r = self.norm.forward(tape, h);
        let out = self.mixer.forward(tape, r, seq, state);
        ops::add(tape, h, out)
    }

    /// One decode step on the residual rows `h` (B, d_model), in place. `r` and `out` are
    /// (B, d_model) scratch rows, `scratch` the mixer's.
    pub fn step(
        &self,
        p: &ParamStore,
        consts: &[f32],
        h: &mut [f32],
        state: &mut LayerCache,
        bufs: StepBufs,
    ) {
        self.norm.step(p, h, bufs.r);
        self.mixer.step(p, consts, bufs.r, state, bufs.scratch, bufs.out);
        h.iter_mut().zip(bufs.out.iter()).for_each(|(h, o)| *h += o);
    }
}

/// Scratch a [`Block::step`] works in.
pub struct StepBufs<'a> {
    /// The normalised rows, (B, d_model).
    pub r: &'a mut [f32],
    /// The mixer's output rows, (B, d_model).
    pub out: &'a mut [f32],
    /// The mixer's own scratch ([`Mixer::scratch_len`]).
    pub scratch: &'a mut [f32],
}

/// The blocks and the final norm: `(B, L, d_model) → (B, L, d_model)`.
#[derive(Clone, Debug)]
pub struct Backbone {
    /// `layers.{i}`.
    pub layers: Vec<Block>,
    /// `norm_f`.
    pub norm_f: RmsNorm,
    /// Activation checkpointing: on a recording tape each block keeps only its input and is
    /// recomputed in the backward ([`super::checkpoint`]): memory of one block's activations
    /// instead of all of them, for a second forward pass. Off by default.
    pub checkpoint_layers: bool,
    /// With `checkpoint_layers`: about how many tokens (batch rows × positions) of a window
    /// a block is recomputed at a time, for mixers that allow it
    /// ([`super::checkpoint::DEFAULT_CHECKPOINT_PIECE`] by default).
    pub checkpoint_piece: usize,
}

impl Backbone {
    /// Registers `layers.{0..n_layer}` and `norm_f` in scope `b` (usually `backbone`).
    pub fn new(b: &mut ParamBuilder, cfg: &MambaConfig) -> Result<Self, CheckpointError> {
        let layers = (0..cfg.n_layer)
            .map(|i| Block::new(&mut b.pp(&format!("layers.{i}")), cfg))
            .collect::<Result<Vec<_>, _>>()?;
        let norm_f = RmsNorm::new(&mut b.pp("norm_f"), cfg.d_model, cfg.norm_eps)?;
        Ok(Self { layers, norm_f, checkpoint_layers: false, checkpoint_piece: DEFAULT_CHECKPOINT_PIECE })
    }

    /// The blocks and `norm_f` on `h` (B, L, d_model), restarting at `seq`'s document starts.
    /// With `cache` (batch B), every block's final recurrent state is written into it.
    pub fn forward(&self, tape: &mut Tape, h: Var, seq: &SeqLayout, cache: Option<&mut Cache>) -> Var {
        self.forward_from(tape, h, seq, None, cache)
    }

    /// [`Backbone::forward`] with every block starting from its state in `init` (one
    /// [`LayerInit`] per block) instead of zero — differentiable: a gradient reaches `init`'s
    /// values like any other input's.
    ///
    /// # Panics
    /// If `init` does not have one entry per block, or a state's shape is not the layer's.
    #[track_caller]
    pub fn forward_from(
        &self,
        tape: &mut Tape,
        mut h: Var,
        seq: &SeqLayout,
        init: Option<&[LayerInit]>,
        mut cache: Option<&mut Cache>,
    ) -> Var {
        assert!(
            seq.final_grad.is_none(),
            "forward_from: a final-state gradient is per layer; give it to Block::forward"
        );
        if let Some(i) = init {
            let n = self.layers.len();
            assert_eq!(i.len(), n, "forward_from: {} initial states for {n} blocks", i.len());
        }
        for (i, block) in self.layers.iter().enumerate() {
            let layer_seq = init.map(|inits| SeqLayout { init: Some(inits[i]), ..seq.clone() });
            let seq = layer_seq.as_ref().unwrap_or(seq);
            let state = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            h = if self.checkpoint_layers && tape.is_recording() {
                super::checkpoint::checkpointed(tape, block, h, seq, state, self.checkpoint_piece)
            } else {
                block.forward(tape, h, seq, state)
            };
        }
        self.norm_f.forward(tape, h)
    }
}
