//! [`Cache`]: the recurrent state of a batch of sequences — per layer, the conv and SSM states —
//! and nothing else.

use super::MambaLM;
use super::mixer::{LayerCache, LayerInit};
use crate::tape::{Tape, Var};
use crate::tensor::{from_vec, pooled_vec};

/// The recurrent state of `batch` sequences, one [`LayerCache`] per block (Hugging Face's cache
/// layouts: conv (B, C, K); SSM (B, d_inner, N) for Mamba-1, (B, H, P, N) for Mamba-2).
#[derive(Clone, Debug, PartialEq)]
pub struct Cache {
    /// Number of sequences `B`.
    pub batch: usize,
    /// Per block.
    pub layers: Vec<LayerCache>,
}

impl Cache {
    /// The empty (all-zero) state of `batch` sequences for `model`.
    pub fn new(model: &MambaLM, batch: usize) -> Self {
        let layers = model
            .backbone
            .layers
            .iter()
            .map(|b| {
                let (conv, ssm) = b.mixer.cache_len();
                LayerCache { conv: vec![0.0; batch * conv], ssm: vec![0.0; batch * ssm] }
            })
            .collect();
        Self { batch, layers }
    }

    /// The state as initial states for [`MambaLM::forward_from`]: copies on `tape`, as
    /// constants (carrying a state across windows without a gradient into it) or, with
    /// `differentiable`, as leaves whose gradients the tape keeps ([`Tape::grad`]).
    pub fn to_tape(&self, model: &MambaLM, tape: &mut Tape, differentiable: bool) -> Vec<LayerInit> {
        let mut put = |shape: Vec<usize>, v: &[f32]| -> Var {
            let t = from_vec(&shape, pooled_vec(v));
            if differentiable { tape.leaf(t) } else { tape.constant(t) }
        };
        self.layers
            .iter()
            .zip(&model.backbone.layers)
            .map(|(l, block)| {
                let (cs, ss) = block.mixer.cache_shapes();
                let with_batch = |s: Vec<usize>| [vec![self.batch], s].concat();
                LayerInit { conv: put(with_batch(cs), &l.conv), ssm: put(with_batch(ss), &l.ssm) }
            })
            .collect()
    }

    /// Resets row `row` to the empty state (a sequence ended; another starts there).
    pub fn reset_row(&mut self, row: usize) {
        for l in &mut self.layers {
            let (c, s) = (l.conv.len() / self.batch, l.ssm.len() / self.batch);
            l.conv[row * c..(row + 1) * c].fill(0.0);
            l.ssm[row * s..(row + 1) * s].fill(0.0);
        }
    }

    /// Resets every sequence to the empty state.
    pub fn reset(&mut self) {
        for l in &mut self.layers {
            l.conv.fill(0.0);
            l.ssm.fill(0.0);
        }
    }
}

impl Cache {
    /// Copies sequence `src_row` of `src` into row `row` of this cache (a prompt prefilled on
    /// its own joining a batch).
    ///
    /// # Panics
    /// If a row is out of range or the caches belong to different models.
    #[track_caller]
    pub fn copy_row(&mut self, row: usize, src: &Cache, src_row: usize) {
        assert!(
            row < self.batch && src_row < src.batch,
            "copy_row: row {row} of {} from row {src_row} of {}",
            self.batch,
            src.batch
        );
        assert_eq!(self.layers.len(), src.layers.len(), "copy_row: caches of different models");
        for (dst, s) in self.layers.iter_mut().zip(&src.layers) {
            for (d, sv, (db, sb)) in [
                (&mut dst.conv, &s.conv, (self.batch, src.batch)),
                (&mut dst.ssm, &s.ssm, (self.batch, src.batch)),
            ] {
                let n = sv.len() / sb;
                assert_eq!(d.len() / db, n, "copy_row: caches of different models");
                d[row * n..(row + 1) * n].copy_from_slice(&sv[src_row * n..(src_row + 1) * n]);
            }
        }
    }

    /// Removes sequence `row`, moving the last sequence into its place (so the other rows keep
    /// their order except the last); the batch shrinks by one. No allocation.
    ///
    /// # Panics
    /// If `row` is out of range.
    #[track_caller]
    pub fn swap_remove_row(&mut self, row: usize) {
        let b = self.batch;
        assert!(row < b, "swap_remove_row: row {row} of a batch of {b}");
        for l in &mut self.layers {
            for v in [&mut l.conv, &mut l.ssm] {
                let n = v.len() / b;
                if row != b - 1 {
                    v.copy_within((b - 1) * n..b * n, row * n);
                }
                v.truncate((b - 1) * n);
            }
        }
        self.batch -= 1;
    }
}
