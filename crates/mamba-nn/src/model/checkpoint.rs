//! Activation checkpointing: a residual block whose activations are not kept for the backward
//! but recomputed in it.
//!
//! On a recording tape a block normally leaves every intermediate (projections, conv and scan
//! outputs, saved chunk states) on the tape until the backward, so training memory grows with
//! `layers × batch × window`. [`checkpointed`] runs the block on a tape of its own that records
//! nothing, keeps only the block's input (already on the tape as the previous block's output)
//! and its output, and records one node whose backward runs the block again on a recording
//! tape from that input and back-propagates through it: the parameters' gradients go straight
//! into the gradient store, the input's gradient back to the outer tape. Peak memory is then
//! one block's activations plus an input per block; the price is a second forward per block.

use super::block::Block;
use super::mixer::{LayerCache, LayerInit, SeqLayout};
use crate::tape::{Backward, InputGrad, ParamCtx, Tape, Var};
use crate::tensor::{Tensor, data, pooled_copy};

/// `block(h)` for `h` (B, L, d_model), checkpointed: equal to `block.forward(tape, h, seq,
/// state)` in value and in every gradient — including those of `seq.init`, the initial state —
/// with only `h` (and the initial state) kept for the backward (see the module docs). With
/// `state`, the block's final recurrent state is written into it.
pub fn checkpointed(
    tape: &mut Tape,
    block: &Block,
    h: Var,
    seq: &SeqLayout,
    state: Option<&mut LayerCache>,
) -> Var {
    let (out, own_params) = {
        let mut inner = Tape::inference(tape.params());
        let x = inner.constant(pooled_copy(tape.value(h)));
        let init = seq.init.map(|i| LayerInit {
            conv: inner.constant(pooled_copy(tape.value(i.conv))),
            ssm: inner.constant(pooled_copy(tape.value(i.ssm))),
        });
        let y = block.forward(&mut inner, x, &SeqLayout { init, ..seq.clone() }, state);
        (pooled_copy(inner.value(y)), inner.read_trainable())
    };
    // The outer tape's initial-state values are inputs of the node (their gradients come back
    // through it); the recompute makes copies of them on its own tape.
    let node = CheckpointBackward { block: block.clone(), seq: SeqLayout { init: None, ..seq.clone() } };
    match seq.init {
        Some(i) => tape.push_tracked(out, &[h, i.conv, i.ssm], own_params, node),
        None => tape.push_tracked(out, &[h], own_params, node),
    }
}

/// Saved: the block (its parameters are read from the store at backward time) and the layout
/// (without the initial state, which is among the node's inputs).
struct CheckpointBackward {
    block: Block,
    seq: SeqLayout,
}

impl Backward for CheckpointBackward {
    fn name(&self) -> &'static str {
        "checkpointed_block"
    }

    fn backward(&self, _: &[&Tensor], _: &Tensor, _: &Tensor, _: &mut [Option<InputGrad<'_>>]) {
        unreachable!("the tape calls backward_with, which needs the parameters")
    }

    /// Re-runs the block on a recording tape from the saved input (and initial state) and
    /// back-propagates `dout` through it.
    fn backward_with(
        &self,
        ctx: ParamCtx<'_>,
        inputs: &[&Tensor],
        _: &Tensor,
        dout: &Tensor,
        grads: &mut [Option<InputGrad<'_>>],
    ) {
        let mut inner = Tape::new(ctx.params);
        inner.release_values_in_backward();
        let leaves: Vec<Var> = inputs.iter().map(|t| inner.leaf(pooled_copy(t))).collect();
        let init = (leaves.len() == 3).then(|| LayerInit { conv: leaves[1], ssm: leaves[2] });
        let seq = SeqLayout { init, ..self.seq.clone() };
        let y = self.block.forward(&mut inner, leaves[0], &seq, None);
        inner.backward_from(y, pooled_copy(dout), ctx.grads);
        for (g, &v) in grads.iter_mut().zip(&leaves) {
            match (g.as_mut(), inner.grad(v)) {
                (Some(g), Some(d)) => g.add_or_write(data(d)),
                // Nothing reached this input (e.g. a state every row restarts before using).
                (Some(g), None) if g.overwrites() => g.data().fill(0.0),
                _ => {}
            }
        }
    }
}
