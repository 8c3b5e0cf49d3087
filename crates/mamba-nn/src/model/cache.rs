//! [`Cache`]: the recurrent state of a batch of sequences — per layer, the conv and SSM states —
//! and nothing else.

use super::MambaLM;
use super::mixer::LayerCache;

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

    /// Resets every sequence to the empty state.
    pub fn reset(&mut self) {
        for l in &mut self.layers {
            l.conv.fill(0.0);
            l.ssm.fill(0.0);
        }
    }
}
