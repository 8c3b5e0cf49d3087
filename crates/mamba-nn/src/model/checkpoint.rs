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
use super::mixer::SeqLayout;
use crate::tape::{Backward, InputGrad, ParamCtx, Tape, Var};
use crate::tensor::{Tensor, data, pooled_copy};

/// `block(h)` for `h` (B, L, d_model), checkpointed: equal to `block.forward(tape, h, seq,
/// None)` in value and in every gradient, with only `h` kept for the backward (see the module
/// docs).
pub fn checkpointed(tape: &mut Tape, block: &Block, h: Var, seq: &SeqLayout) -> Var {
    let (out, own_params) = {
        let mut inner = Tape::inference(tape.params());
        let x = inner.constant(pooled_copy(tape.value(h)));
        let y = block.forward(&mut inner, x, seq, None);
        (pooled_copy(inner.value(y)), inner.read_trainable())
    };
    let node = CheckpointBackward { block: block.clone(), seq: seq.clone() };
    tape.push_tracked(out, &[h], own_params, node)
}

/// Saved: the block (its parameters are read from the store at backward time) and the layout.
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

    /// Re-runs the block on a recording tape from the saved input and back-propagates `dout`
    /// through it.
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
        let x = inner.leaf(pooled_copy(inputs[0]));
        let y = self.block.forward(&mut inner, x, &self.seq, None);
        inner.backward_from(y, pooled_copy(dout), ctx.grads);
        if let Some(g) = grads[0].as_mut() {
            let dx = inner.grad(x).expect("the block's input is a leaf of the recompute tape");
            g.add_or_write(data(dx));
        }
    }
}
