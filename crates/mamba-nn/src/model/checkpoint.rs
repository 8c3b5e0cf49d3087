//! Activation checkpointing: a residual block whose activations are not kept for the backward
//! but recomputed in it — and, for a long window, recomputed a piece of the window at a time.
//!
//! On a recording tape a block normally leaves every intermediate (projections, conv and scan
//! outputs, saved chunk states) on the tape until the backward, so training memory grows with
//! `layers × batch × window`. [`checkpointed`] runs the block on a tape of its own that records
//! nothing, keeps only the block's input (already on the tape as the previous block's output)
//! and its output, and records one node whose backward runs the block again on a recording
//! tape from that input and back-propagates through it: the parameters' gradients go straight
//! into the gradient store, the input's gradient back to the outer tape. The price is a second
//! forward per block.
//!
//! **Pieces.** Recomputing a whole block at once would still hold one block's activations and
//! their gradients for the whole window, several times the window's residual stream. When the
//! mixer can take a gradient for its final state ([`Mixer::takes_final_state_grad`]), the
//! window is cut along time into pieces of about `piece_tokens` (batch rows × positions): the
//! forward runs the pieces in order, each from the previous one's final recurrent state (conv
//! and SSM), and keeps those few states; the backward recomputes the pieces from the last to
//! the first, each seeded with its slice of the output gradient and, through
//! [`SeqLayout::final_grad`], with the gradient of the next piece's initial state. Peak memory
//! is then the blocks' inputs plus one piece's activations, whatever the window.
//!
//! [`Mixer::takes_final_state_grad`]: super::Mixer::takes_final_state_grad

use std::ops::Range;
use std::sync::Arc;

use super::block::Block;
use super::mixer::{LayerCache, LayerInit, SeqLayout};
use crate::ops::Resets;
use crate::tape::{Backward, InputGrad, ParamCtx, Tape, Var};
use crate::tensor::{Tensor, data, data_mut, for_overwrite, from_vec, pooled_vec, recycle};

/// Default tokens (batch rows × positions) per recomputed piece of a checkpointed block
/// ([`Backbone::checkpoint_piece`](super::Backbone::checkpoint_piece)). At 4,096 a piece of
/// the S model's block holds about 90 MB of activations and gradients; smaller pieces save
/// little more, as the blocks' inputs and the model's own state then dominate.
pub const DEFAULT_CHECKPOINT_PIECE: usize = 4096;

/// `block(h)` for `h` (B, L, d_model), checkpointed: equal to `block.forward(tape, h, seq,
/// state)` in value and in every gradient — including those of `seq.init`, the initial state —
/// with only `h` (and the initial state) kept for the backward, recomputed in pieces of about
/// `piece_tokens` rows × positions when the mixer allows (see the module docs). With `state`,
/// the block's final recurrent state is written into it.
///
/// # Panics
/// If `seq` carries a [`SeqLayout::final_grad`] (checkpointed blocks make their own).
pub fn checkpointed(
    tape: &mut Tape,
    block: &Block,
    h: Var,
    seq: &SeqLayout,
    state: Option<&mut LayerCache>,
    piece_tokens: usize,
) -> Var {
    assert!(
        seq.final_grad.is_none(),
        "checkpointed: a final-state gradient is given by the pieces themselves"
    );
    let shape = tape.value(h).shape().to_vec();
    let piece_tokens = if block.mixer.takes_final_state_grad() { piece_tokens } else { usize::MAX };
    let pieces = pieces(shape[0], shape[1], piece_tokens);
    let (out, starts, own_params) = if pieces.len() == 1 {
        let mut inner = Tape::inference(tape.params());
        let x = inner.constant_ref(tape.value(h));
        let init = seq.init.map(|i| LayerInit {
            conv: inner.constant_ref(tape.value(i.conv)),
            ssm: inner.constant_ref(tape.value(i.ssm)),
        });
        let y = block.forward(&mut inner, x, &SeqLayout { init, ..seq.clone() }, state);
        (inner.take_value(y), Vec::new(), inner.read_trainable())
    } else {
        forward_pieces(tape, block, h, seq, state, &pieces)
    };
    // The outer tape's initial-state values are inputs of the node (their gradients come back
    // through it); the recompute reads them in place on its own tape.
    let init = seq.init;
    let node = CheckpointBackward {
        block: block.clone(),
        seq: SeqLayout { init: None, ..seq.clone() },
        pieces,
        starts,
    };
    match init {
        Some(i) => tape.push_tracked(out, &[h, i.conv, i.ssm], own_params, node),
        None => tape.push_tracked(out, &[h], own_params, node),
    }
}

/// Positions `0..l` cut into balanced pieces of about `piece_tokens / batch` positions (one
/// piece when the window fits).
fn pieces(batch: usize, l: usize, piece_tokens: usize) -> Vec<Range<usize>> {
    let per_piece = (piece_tokens / batch.max(1)).max(1);
    let n = l.div_ceil(per_piece).max(1);
    (0..n).map(|i| i * l / n..(i + 1) * l / n).collect()
}

/// Positions `r` of every row of `t` (B, L, …), copied into a pooled (B, |r|, …) tensor.
fn time_slice(t: &Tensor, r: &Range<usize>) -> Tensor {
    let shape = t.shape();
    let (b, l) = (shape[0], shape[1]);
    let row: usize = shape[2..].iter().product();
    let mut s = shape.to_vec();
    s[1] = r.len();
    let mut out = for_overwrite(&s);
    let (src, n) = (data(t), r.len() * row);
    for (bi, dst) in data_mut(&mut out).chunks_exact_mut(n.max(1)).take(b).enumerate() {
        dst.copy_from_slice(&src[(bi * l + r.start) * row..][..n]);
    }
    out
}

/// The document starts of positions `r` of every row of `resets` (B, L).
fn resets_slice(resets: &Resets, l: usize, r: &Range<usize>) -> Resets {
    resets.chunks_exact(l).flat_map(|row| row[r.clone()].iter().copied()).collect()
}

/// A layer's state (one [`LayerCache`] for B rows) as a tensor of `shape` (per row) with a
/// batch axis.
fn state_tensor(v: &[f32], batch: usize, shape: &[usize]) -> Tensor {
    let mut s = vec![batch];
    s.extend_from_slice(shape);
    from_vec(&s, pooled_vec(v))
}

/// The pieces' forward: each piece from the previous one's final state. Returns the block's
/// output, the state each piece starts from (for the backward; the first piece's is the
/// initial state, empty when zero) and whether a trainable parameter was read.
fn forward_pieces(
    tape: &Tape,
    block: &Block,
    h: Var,
    seq: &SeqLayout,
    state: Option<&mut LayerCache>,
    pieces: &[Range<usize>],
) -> (Tensor, Vec<LayerCache>, bool) {
    let hv = tape.value(h);
    let (bsz, l) = (hv.shape()[0], hv.shape()[1]);
    let row: usize = hv.shape()[2..].iter().product();
    let (cs, ss) = block.mixer.cache_len();
    let (cshape, sshape) = block.mixer.cache_shapes();
    let mut out = for_overwrite(hv.shape());
    let mut starts = Vec::with_capacity(pieces.len());
    let mut st = match seq.init {
        Some(i) => {
            LayerCache { conv: data(tape.value(i.conv)).to_vec(), ssm: data(tape.value(i.ssm)).to_vec() }
        }
        None => LayerCache::default(),
    };
    let mut own_params = false;
    for r in pieces {
        let mut inner = Tape::inference(tape.params());
        let x = inner.constant(time_slice(hv, r));
        let init = (!st.conv.is_empty() || !st.ssm.is_empty()).then(|| LayerInit {
            conv: inner.constant(state_tensor(&st.conv, bsz, &cshape)),
            ssm: inner.constant(state_tensor(&st.ssm, bsz, &sshape)),
        });
        let resets = seq.resets.as_ref().map(|rs| resets_slice(rs, l, r));
        let mut next = LayerCache { conv: vec![0.0; bsz * cs], ssm: vec![0.0; bsz * ss] };
        let y = block.forward(&mut inner, x, &SeqLayout { resets, init, final_grad: None }, Some(&mut next));
        let (yv, o) = (data(inner.value(y)), data_mut(&mut out));
        for bi in 0..bsz {
            let n = r.len() * row;
            o[(bi * l + r.start) * row..][..n].copy_from_slice(&yv[bi * n..][..n]);
        }
        own_params |= inner.read_trainable();
        starts.push(std::mem::replace(&mut st, next));
    }
    if let Some(state) = state {
        state.conv.copy_from_slice(&st.conv);
        state.ssm.copy_from_slice(&st.ssm);
    }
    (out, starts, own_params)
}

/// Saved: the block (its parameters are read from the store at backward time), the layout
/// (without the initial state, which is among the node's inputs), the pieces and the state
/// each piece starts from (none for a single piece).
struct CheckpointBackward {
    block: Block,
    seq: SeqLayout,
    pieces: Vec<Range<usize>>,
    starts: Vec<LayerCache>,
}

impl Backward for CheckpointBackward {
    fn name(&self) -> &'static str {
        "checkpointed_block"
    }

    fn backward(&self, _: &[&Tensor], _: &Tensor, _: &Tensor, _: &mut [Option<InputGrad<'_>>]) {
        unreachable!("the tape calls backward_with, which needs the parameters")
    }

    /// The block's output is not needed to recompute it.
    fn reads_output(&self) -> bool {
        false
    }

    /// Re-runs the block on a recording tape from the saved input (and initial state), read in
    /// place, and back-propagates `dout` through it (as the seed, not a copy) — piece by piece
    /// from the last when there are several.
    fn backward_with(
        &self,
        ctx: ParamCtx<'_>,
        inputs: &[&Tensor],
        _: &Tensor,
        dout: Tensor,
        grads: &mut [Option<InputGrad<'_>>],
    ) {
        if self.pieces.len() > 1 {
            return self.backward_pieces(ctx, inputs, dout, grads);
        }
        let mut inner = Tape::new(ctx.params);
        inner.release_values_in_backward();
        let leaves: Vec<Var> = inputs.iter().map(|t| inner.leaf_ref(t)).collect();
        let init = (leaves.len() == 3).then(|| LayerInit { conv: leaves[1], ssm: leaves[2] });
        let seq = SeqLayout { init, ..self.seq.clone() };
        let y = self.block.forward(&mut inner, leaves[0], &seq, None);
        inner.backward_from(y, dout, ctx.grads);
        for (g, &v) in grads.iter_mut().zip(&leaves) {
            add_leaf_grad(g.as_mut(), inner.grad(v).map(data));
        }
    }
}

/// Adds (or writes) a recomputation's gradient of a leaf into the outer tape's slot for it;
/// `None`: nothing reached the leaf (e.g. a state every row restarts before using).
fn add_leaf_grad(slot: Option<&mut InputGrad<'_>>, grad: Option<&[f32]>) {
    match (slot, grad) {
        (Some(g), Some(d)) => g.add_or_write(d),
        (Some(g), None) if g.overwrites() => g.data().fill(0.0),
        _ => {}
    }
}

impl CheckpointBackward {
    /// [`Backward::backward_with`] over the pieces, last first: each recomputed from the state
    /// it started from, seeded with its slice of `dout` and the gradient of the next piece's
    /// initial state as its final state's.
    fn backward_pieces(
        &self,
        ctx: ParamCtx<'_>,
        inputs: &[&Tensor],
        dout: Tensor,
        grads: &mut [Option<InputGrad<'_>>],
    ) {
        let hv = inputs[0];
        let (bsz, l) = (hv.shape()[0], hv.shape()[1]);
        let row: usize = hv.shape()[2..].iter().product();
        let (cshape, sshape) = self.block.mixer.cache_shapes();
        let (cs, ss) = self.block.mixer.cache_len();
        let mut final_grad: Option<Arc<LayerCache>> = None;
        for (pi, r) in self.pieces.iter().enumerate().rev() {
            let mut inner = Tape::new(ctx.params);
            inner.release_values_in_backward();
            let x = inner.leaf(time_slice(hv, r));
            let start = &self.starts[pi];
            let init = if pi == 0 {
                (inputs.len() == 3)
                    .then(|| LayerInit { conv: inner.leaf_ref(inputs[1]), ssm: inner.leaf_ref(inputs[2]) })
            } else {
                Some(LayerInit {
                    conv: inner.leaf(state_tensor(&start.conv, bsz, &cshape)),
                    ssm: inner.leaf(state_tensor(&start.ssm, bsz, &sshape)),
                })
            };
            let resets = self.seq.resets.as_ref().map(|rs| resets_slice(rs, l, r));
            let seq = SeqLayout { resets, init, final_grad: final_grad.take() };
            let y = self.block.forward(&mut inner, x, &seq, None);
            inner.backward_from(y, time_slice(&dout, r), ctx.grads);
            if let Some(g) = grads[0].as_mut() {
                let dx = inner.grad(x).map(data);
                let overwrite = g.overwrites();
                let n = r.len() * row;
                let buf = g.data();
                for bi in 0..bsz {
                    let dst = &mut buf[(bi * l + r.start) * row..][..n];
                    match dx {
                        Some(d) if overwrite => dst.copy_from_slice(&d[bi * n..][..n]),
                        Some(d) => dst.iter_mut().zip(&d[bi * n..][..n]).for_each(|(o, v)| *o += v),
                        None if overwrite => dst.fill(0.0),
                        None => {}
                    }
                }
            }
            match init {
                Some(i) if pi > 0 => {
                    let grad_or_zero =
                        |v: Var, n: usize| inner.grad(v).map_or_else(|| vec![0.0; n], |g| data(g).to_vec());
                    let (conv, ssm) = (grad_or_zero(i.conv, bsz * cs), grad_or_zero(i.ssm, bsz * ss));
                    final_grad = Some(Arc::new(LayerCache { conv, ssm }));
                }
                Some(i) => {
                    add_leaf_grad(grads[1].as_mut(), inner.grad(i.conv).map(data));
                    add_leaf_grad(grads[2].as_mut(), inner.grad(i.ssm).map(data));
                }
                None => {}
            }
        }
        recycle(dout);
    }
}
