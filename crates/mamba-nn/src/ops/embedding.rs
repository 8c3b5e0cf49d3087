//! Token embedding lookup with a sparse backward.

use crate::tape::{Backward, InputGrad, InputList, Slot, Tape, Var};
use crate::tensor::{Tensor, data, data_mut, for_overwrite};

/// `y[b, l, :] = weight[ids[b, l], :]`.
///
/// Shapes: `ids` holds `ids_shape.iter().product()` token ids in row-major order (usually
/// `ids_shape = [B, L]`), `weight` (V, d), `y` (…ids_shape, d). The backward adds each output
/// row's gradient into its token's row only (rows of tokens absent from `ids` are not touched).
///
/// # Panics
/// If `weight` is not 2-D, `ids.len()` does not match `ids_shape`, or an id is `≥ V` (the message
/// names the id and the vocabulary size).
#[track_caller]
pub fn embedding(tape: &mut Tape, ids: &[usize], ids_shape: &[usize], weight: Var) -> Var {
    let wv = tape.value(weight);
    assert_eq!(wv.ndim(), 2, "embedding: weight must be (V, d), got {:?}", wv.shape());
    let n: usize = ids_shape.iter().product();
    assert_eq!(ids.len(), n, "embedding: {} ids do not fill shape {ids_shape:?} ({n})", ids.len());
    let (vocab, d) = (wv.shape()[0], wv.shape()[1]);
    if let Some((pos, &id)) = ids.iter().enumerate().find(|&(_, &id)| id >= vocab) {
        panic!("embedding: token id {id} (position {pos}) out of range for vocabulary size {vocab}");
    }
    let mut shape = ids_shape.to_vec();
    shape.push(d);
    // Every row is copied from the table.
    let mut y = for_overwrite(&shape);
    let w = data(wv);
    if d > 0 {
        for (row, &id) in data_mut(&mut y).chunks_exact_mut(d).zip(ids) {
            row.copy_from_slice(&w[id * d..(id + 1) * d]);
        }
    }
    let ids = if tape.is_recording() && tape.needs_grad(weight) { ids.to_vec() } else { Vec::new() };
    let mut inputs = InputList::new();
    let weight = inputs.push(weight);
    tape.push(y, inputs.vars(), EmbeddingBackward { weight, ids, d })
}

/// Saved: the weight's position, the token ids (only when the weight needs a gradient) and the
/// embedding width.
struct EmbeddingBackward {
    weight: Slot,
    ids: Vec<usize>,
    d: usize,
}

impl Backward for EmbeddingBackward {
    fn name(&self) -> &'static str {
        "embedding"
    }

    fn reads_output(&self) -> bool {
        false
    }

    /// `dW[id] += dy[row]` for each row; a fresh `dW` is zeroed first (rows of absent tokens
    /// get no gradient).
    fn backward(&self, _: &[&Tensor], _: &Tensor, dout: &Tensor, grads: &mut [Option<InputGrad<'_>>]) {
        let d = self.d;
        let Some(dw) = self.weight.grad(grads) else { return };
        let dw = dw.zero_if_overwrite();
        if d > 0 {
            for (g, &id) in data(dout).chunks_exact(d).zip(&self.ids) {
                for (a, b) in dw[id * d..(id + 1) * d].iter_mut().zip(g) {
                    *a += b;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::check::{check_op, random};
    use crate::params::{Grads, ParamStore};

    #[test]
    fn backward_matches_finite_differences() {
        let (vocab, d) = (6, 5);
        let ids = [3usize, 0, 3, 5, 1, 3, 2];
        check_op(
            vec![random(&[vocab, d], 1)],
            |t, v| embedding(t, &ids, &[1, 7], v[0]),
            |x| ids.iter().flat_map(|&id| x[0][id * d..(id + 1) * d].to_vec()).collect(),
            1e-5,
        );
    }

    #[test]
    fn backward_touches_only_used_rows() {
        let mut store = ParamStore::new();
        let w = store.add("emb", random(&[5, 3], 1), true);
        let mut grads = Grads::new(&store);
        grads.get_mut(w).fill(7.0); // pre-existing gradient must be added to, not overwritten
        let mut tape = Tape::new(&store);
        let wv = tape.param(w);
        let y = embedding(&mut tape, &[1, 4, 1], &[3], wv);
        tape.backward_from(y, Tensor::ones(tape.value(y).raw_dim()), &mut grads);
        for (r, row) in data(grads.get(w)).chunks_exact(3).enumerate() {
            let want = 7.0 + [0.0, 2.0, 0.0, 0.0, 1.0][r];
            assert!(row.iter().all(|&v| v == want), "row {r}: {row:?}");
        }
    }

    #[test]
    #[should_panic(expected = "embedding: token id 9 (position 1) out of range for vocabulary size 5")]
    fn out_of_range_id_panics() {
        let store = ParamStore::new();
        let mut tape = Tape::new(&store);
        let w = tape.constant(crate::tensor::zeros(&[5, 3]));
        embedding(&mut tape, &[0, 9], &[1, 2], w);
    }
}
