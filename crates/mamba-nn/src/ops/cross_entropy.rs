//! Fused softmax cross-entropy over the last dimension, and the causal language-model loss.

use ssm_kernel::xent::{xent_bwd, xent_fwd};

use crate::tape::{Backward, InputGrad, InputList, Slot, Tape, Var};
use crate::tensor::{Tensor, data, from_vec, rows_cols};

/// Targets equal to this are skipped (PyTorch's default `ignore_index`).
pub const IGNORE_INDEX: i64 = ssm_kernel::xent::IGNORE_INDEX;

/// Mean cross-entropy `−log softmax(logits)[target]` over the rows whose target is not
/// [`IGNORE_INDEX`].
///
/// Shapes: `logits` (…, V), `targets` one per row (the product of the leading dimensions), the
/// result a scalar of shape (1). Each row's log-softmax is one fused pass (max, Σ exp); only the
/// per-row log-sum-exp is saved. The backward adds `(softmax − onehot) · dloss / count`. Rows
/// run in parallel when `rows · V ≥ 65 536`. The numerics are [`ssm_kernel::xent`]'s.
///
/// When every target is ignored the loss is `0` with zero gradient (PyTorch returns NaN).
///
/// # Panics
/// If the number of targets differs from the number of rows, or a target is outside `0..V` and
/// not [`IGNORE_INDEX`] (the message names the target and `V`).
#[track_caller]
pub fn cross_entropy(tape: &mut Tape, logits: Var, targets: &[i64]) -> Var {
    let lv = tape.value(logits);
    let (rows, v) = rows_cols(lv.shape());
    assert_eq!(
        targets.len(),
        rows,
        "cross_entropy: {} targets for logits {:?} ({rows} rows)",
        targets.len(),
        lv.shape()
    );
    if let Some((pos, &t)) =
        targets.iter().enumerate().find(|&(_, &t)| t != IGNORE_INDEX && !(0..v as i64).contains(&t))
    {
        panic!("cross_entropy: target {t} (row {pos}) out of range for {v} classes");
    }
    let mut lse = vec![0.0f32; rows];
    let (sum, count) = xent_fwd(v, data(lv), targets, &mut lse);
    let loss = if count == 0 { 0.0 } else { (sum / count as f64) as f32 };
    let mut inputs = InputList::new();
    let logits = inputs.push(logits);
    let saved = CrossEntropyBackward { logits, targets: targets.to_vec(), lse, count, v };
    tape.push(from_vec(&[1], vec![loss]), inputs.vars(), saved)
}

/// Saved: the logits' position, the targets, every row's log-sum-exp, the number of counted
/// rows and `V`.
struct CrossEntropyBackward {
    logits: Slot,
    targets: Vec<i64>,
    lse: Vec<f32>,
    count: usize,
    v: usize,
}

impl Backward for CrossEntropyBackward {
    fn name(&self) -> &'static str {
        "cross_entropy"
    }

    /// `dx += (softmax − onehot) · dloss / count` on the scored rows; a fresh `dx` is zeroed
    /// first (ignored rows get no gradient).
    fn backward(&self, inputs: &[&Tensor], _: &Tensor, dout: &Tensor, grads: &mut [Option<InputGrad<'_>>]) {
        let Some(dx) = self.logits.grad(grads) else { return };
        let dx = dx.zero_if_overwrite();
        if self.count == 0 {
            return;
        }
        let g = data(dout)[0] / self.count as f32;
        xent_bwd(self.v, data(self.logits.value(inputs)), &self.targets, &self.lse, g, dx);
    }
}

/// Hugging Face's causal-LM loss with `labels = ids`: the mean cross-entropy of `logits[:, :-1]`
/// against `ids[:, 1:]`.
///
/// Shapes: `logits` (B, L, V), `ids` (B, L) row-major; the result a scalar (1). Implemented
/// without copying the logits: position `l` of row `b` is scored against `ids[b, l + 1]` and
/// the last position of each row is [`IGNORE_INDEX`], which gives the same mean.
///
/// # Panics
/// If `logits` is not 3-D or `ids` is not (B, L) (the message names both).
#[track_caller]
pub fn causal_lm_loss(tape: &mut Tape, logits: Var, ids: &[usize]) -> Var {
    let shape = tape.value(logits).shape();
    assert_eq!(shape.len(), 3, "causal_lm_loss: logits must be (B, L, V), got {shape:?}");
    let (b, l) = (shape[0], shape[1]);
    assert_eq!(ids.len(), b * l, "causal_lm_loss: {} ids for logits {shape:?} (B·L = {})", ids.len(), b * l);
    let mut targets = vec![IGNORE_INDEX; b * l];
    for (trow, irow) in targets.chunks_exact_mut(l.max(1)).zip(ids.chunks_exact(l.max(1))) {
        for (t, &id) in trow.iter_mut().zip(&irow[1..]) {
            *t = id as i64;
        }
    }
    cross_entropy(tape, logits, &targets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::check::{check_op, random};
    use crate::params::{Grads, ParamStore};
    use crate::tensor::zeros;

    /// f64 reference: mean over counted rows of `logsumexp(row) − row[t]`.
    fn reference(x: &[f64], targets: &[i64], v: usize) -> Vec<f64> {
        let (mut sum, mut n) = (0.0, 0);
        for (row, &t) in x.chunks(v).zip(targets) {
            if t == IGNORE_INDEX {
                continue;
            }
            let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            sum += m + row.iter().map(|a| (a - m).exp()).sum::<f64>().ln() - row[t as usize];
            n += 1;
        }
        vec![sum / n as f64]
    }

    #[test]
    fn backward_matches_finite_differences() {
        // V = 11: one SIMD chunk of 8 and a scalar tail.
        let v = 11;
        let targets = [3i64, IGNORE_INDEX, 0, 6, 2, IGNORE_INDEX, 5, 1, 1];
        check_op(
            vec![random(&[3, 3, v], 1) * 4.0],
            |t, x| cross_entropy(t, x[0], &targets),
            |x| reference(&x[0], &targets, v),
            1e-4,
        );
    }

    #[test]
    fn causal_lm_loss_shifts_targets() {
        let (b, l, v) = (2, 5, 19);
        let ids = [1usize, 6, 0, 3, 3, 2, 2, 5, 0, 4];
        let mut shifted = vec![IGNORE_INDEX; b * l];
        for r in 0..b {
            for t in 0..l - 1 {
                shifted[r * l + t] = ids[r * l + t + 1] as i64;
            }
        }
        check_op(
            vec![random(&[b, l, v], 2) * 3.0],
            |t, x| causal_lm_loss(t, x[0], &ids),
            |x| reference(&x[0], &shifted, v),
            1e-4,
        );
    }

    /// Parallel rows (rows · V ≥ 2¹⁶) agree with the reference; gradient rows sum to zero.
    #[test]
    fn large_vocab_parallel_path() {
        let (rows, v) = (40, 2000);
        let x = random(&[rows, v], 3) * 5.0;
        let targets: Vec<i64> =
            (0..rows as i64).map(|r| if r % 7 == 3 { IGNORE_INDEX } else { r * 37 % 2000 }).collect();
        let store = ParamStore::new();
        let mut tape = Tape::new(&store);
        let xv = tape.leaf(x.clone());
        let loss = cross_entropy(&mut tape, xv, &targets);
        let want = reference(&data(&x).iter().map(|&a| a as f64).collect::<Vec<_>>(), &targets, v);
        ssm_kernel::testing::assert_rel_max("loss", data(tape.value(loss)), &want, 1e-5, 1.0);
        tape.backward(loss, &mut Grads::new(&store));
        for (r, row) in data(tape.grad(xv).unwrap()).chunks(v).enumerate() {
            let s: f32 = row.iter().sum();
            assert!(s.abs() < 1e-6, "row {r} sums to {s}");
            if targets[r] == IGNORE_INDEX {
                assert!(row.iter().all(|&g| g == 0.0));
            }
        }
    }

    #[test]
    fn all_ignored_gives_zero() {
        let store = ParamStore::new();
        let mut tape = Tape::new(&store);
        let x = tape.leaf(random(&[2, 3], 1));
        let loss = cross_entropy(&mut tape, x, &[IGNORE_INDEX, IGNORE_INDEX]);
        assert_eq!(data(tape.value(loss)), &[0.0]);
        tape.backward(loss, &mut Grads::new(&store));
        assert!(data(tape.grad(x).unwrap()).iter().all(|&g| g == 0.0));
    }

    #[test]
    #[should_panic(expected = "cross_entropy: target 4 (row 1) out of range for 4 classes")]
    fn out_of_range_target_panics() {
        let store = ParamStore::new();
        let mut tape = Tape::new(&store);
        let x = tape.constant(zeros(&[2, 4]));
        cross_entropy(&mut tape, x, &[0, 4]);
    }

    #[test]
    #[should_panic(expected = "cross_entropy: 3 targets for logits [2, 4] (2 rows)")]
    fn target_count_mismatch_panics() {
        let store = ParamStore::new();
        let mut tape = Tape::new(&store);
        let x = tape.constant(zeros(&[2, 4]));
        cross_entropy(&mut tape, x, &[0, 1, 2]);
    }
}
